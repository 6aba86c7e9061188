//! Ingest's way in for device messages: `tinyfleet_ingest::pipeline::Verifier::verify(topic,
//! payload)` (topic routing, size limit, key lookup in a real registry, COSE_Mac0 check, strict
//! decoding), with arbitrary topics and payloads.
//!
//! Properties: never panics on any topic or payload; nothing is accepted that does not carry a
//! valid tag under the provisioned device's key (the fuzzer cannot forge one, so every
//! arbitrary message must be refused with exactly one reason), and every refusal of an
//! over-long payload is `oversized` whatever else is wrong with it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_fuzz::{DEVICE, Input, registry};
use tinyfleet_ingest::decode::Reject;
use tinyfleet_ingest::pipeline::Verifier;

/// A small limit, so the fuzzer reaches it.
const MAX_PAYLOAD: usize = 512;

fuzz_target!(|data: &[u8]| {
    let (registry, _) = registry();
    let verifier = Verifier::new(MAX_PAYLOAD, registry.clone());
    let mut input = Input::new(data);
    // Mostly the provisioned device's topics, so the payload reaches the tag check.
    let topic = match input.byte() % 8 {
        0 => format!("tf/v1/{DEVICE}/sum"),
        1 => format!("tf/v1/{DEVICE}/hello"),
        2 => format!("tf/v1/{DEVICE}/will"),
        3 => format!("tf/v1/{DEVICE}/ota/prog"),
        4 => format!("tf/v1/{DEVICE}/ota/breq"),
        5 => format!("tf/v1/{DEVICE}/ota/blk"),
        _ => String::from_utf8_lossy(input.frame()).into_owned(),
    };
    let payload = input.rest();
    match verifier.verify(&topic, payload) {
        Ok((device, msg)) => panic!("accepted an unsigned message from {device}: {msg:?}"),
        Err(Reject::Oversized) => assert!(payload.len() > MAX_PAYLOAD),
        Err(reason) => {
            assert!(Reject::ALL.contains(&reason));
            let known = tinyfleet_device::wire::parse_topic(&topic)
                .is_some_and(|(_, kind)| kind.from_device());
            if payload.len() > MAX_PAYLOAD && known {
                panic!("an oversized payload on {topic} refused as {reason:?}");
            }
        }
    }
});
