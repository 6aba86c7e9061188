//! COSE_Mac0 envelopes of device messages (`device-client/src/cose.rs`).
//!
//! Properties: parsing and verifying any bytes under any topic never panics; nothing but a
//! sealed envelope verifies (a fuzzed envelope is accepted only if it is byte-for-byte what
//! `seal` writes for its payload); `open(seal(p)) == p` for any payload and topic, and the
//! envelope does not verify under another topic or key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::DeviceKey;
use tinyfleet_device::cose::{self, CoseError};
use tinyfleet_fuzz::Input;

const KEY: DeviceKey = DeviceKey([0x42; 32]);

fn seal(topic: &[u8], payload: &[u8], key: &DeviceKey) -> Result<Vec<u8>, CoseError> {
    let mut out = vec![0u8; payload.len() + cose::OVERHEAD + 1];
    let n = cose::seal::<CoseError>(key, &[topic], &mut out, |buf| {
        let dst = buf
            .get_mut(..payload.len())
            .ok_or(CoseError::BufferTooSmall)?;
        dst.copy_from_slice(payload);
        Ok(payload.len())
    })?;
    out.truncate(n);
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let topic = input.frame();
    let bytes = input.rest();

    // Arbitrary bytes: parse, then verify.
    if let Ok(env) = cose::parse(bytes) {
        assert!(env.payload.len() <= cose::MAX_PAYLOAD);
        assert_eq!(env.tag.len(), cose::TAG_LEN);
    }
    if let Ok(payload) = cose::open(&KEY, &[topic], bytes) {
        // Only the canonical envelope can verify (a forgery of a 64-bit tag is not something a
        // fuzzer finds; this catches a parser that accepts two forms of one message).
        assert_eq!(seal(topic, payload, &KEY).as_deref(), Ok(bytes));
    }

    // Round trip: the input as a payload.
    if bytes.len() <= cose::MAX_PAYLOAD {
        let env = seal(topic, bytes, &KEY).expect("seal into a large enough buffer");
        assert_eq!(cose::open(&KEY, &[topic], &env), Ok(bytes));
        // The AAD in parts equals the whole.
        let (a, b) = topic.split_at(topic.len() / 2);
        assert_eq!(cose::open(&KEY, &[a, b], &env), Ok(bytes));
        let mut other = topic.to_vec();
        other.push(b'x');
        assert_eq!(cose::open(&KEY, &[&other], &env), Err(CoseError::BadTag));
        assert_eq!(
            cose::open(&DeviceKey([0x43; 32]), &[topic], &env),
            Err(CoseError::BadTag)
        );
    } else {
        assert!(seal(topic, bytes, &KEY).is_err());
    }
});
