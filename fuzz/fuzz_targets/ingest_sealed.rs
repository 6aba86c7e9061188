//! The decoders behind the MAC, through ingest's real path: the fuzz input is a message body
//! that is sealed (COSE_Mac0, the topic as AAD) with the provisioned device's own key, then
//! handed to `Verifier::verify`, as a malicious device holding its key could. This reaches the
//! strict decoding of hellos, wills, summaries, progress reports and block requests.
//!
//! Properties: never panics; an accepted message has the topic's kind and device, and its
//! `(boot, seq)` is the body's; the same body sealed for another topic, or with another key,
//! is refused as `forged`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::DeviceKey;
use tinyfleet_device::cose::{self, CoseError};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic, Will};
use tinyfleet_fuzz::{DEVICE, Input, registry};
use tinyfleet_ingest::decode::Reject;
use tinyfleet_ingest::pipeline::Verifier;

const KINDS: [Kind; 5] = [
    Kind::Summary,
    Kind::Hello,
    Kind::Will,
    Kind::Progress,
    Kind::BlockRequest,
];

fn seal(key: &DeviceKey, topic: &str, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; body.len() + cose::OVERHEAD + 1];
    let n = cose::seal::<CoseError>(key, &[topic.as_bytes()], &mut out, |buf| {
        buf[..body.len()].copy_from_slice(body);
        Ok(body.len())
    })
    .expect("seal");
    out.truncate(n);
    out
}

fuzz_target!(|data: &[u8]| {
    let (registry, key) = registry();
    let verifier = Verifier::new(16 * 1024, registry.clone());
    let mut input = Input::new(data);
    let kind = KINDS[usize::from(input.byte()) % KINDS.len()];
    let body = input.rest();
    if body.len() > cose::MAX_PAYLOAD {
        return;
    }
    let id = DeviceId::new(DEVICE).expect("device id");
    let topic = Topic::new(id, kind);
    let payload = seal(key, topic.as_str(), body);
    match verifier.verify(topic.as_str(), &payload) {
        Ok((device, msg)) => {
            assert_eq!(device, DEVICE);
            assert_eq!(msg.kind(), kind);
            // Every device message starts with `boot` and `seq` (keys 0 and 1), so a body in
            // the protocol's map form also reads as a will, with the same pair. (serde_cbor
            // also accepts a struct written as an array; such a body has more than a will's
            // two elements and does not read as one.)
            if let Ok(will) = wire::from_cbor::<Will>(body) {
                assert_eq!(msg.boot_seq(), (will.boot, will.seq));
            }
        }
        Err(reason) => assert!(
            matches!(
                reason,
                Reject::BadBody | Reject::OutOfRange | Reject::Oversized
            ),
            "a body sealed with the right key refused as {reason:?}"
        ),
    }
    // Bound to its topic and key.
    let next = KINDS.iter().position(|k| *k == kind).unwrap_or(0) + 1;
    let other = Topic::new(id, KINDS[next % KINDS.len()]);
    assert_eq!(
        verifier.verify(other.as_str(), &payload),
        Err(Reject::Forged)
    );
    let forged = seal(&DeviceKey([0x99; 32]), topic.as_str(), body);
    assert_eq!(
        verifier.verify(topic.as_str(), &forged),
        Err(Reject::Forged)
    );
});
