//! The service side of MQTT block transfer: a block request body as ingest decodes it
//! (`wire::from_cbor::<BlockRequest>`, then `BlockRequestOwned`: a 32-byte object, a length in
//! 1..=4096), answered by `tinyfleet_ota_service::blocks::answer` from a content-addressed store
//! holding one object.
//!
//! Properties: never panics; an answer exists exactly for a request inside the stored object,
//! and it is a `block` the device decodes (`decode_block`) into that object's bytes at that
//! offset, never more than asked for.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::decoded::BlockRequestOwned;
use tinyfleet_device::ota::decode_block;
use tinyfleet_device::wire::{self, BlockRequest};
use tinyfleet_fuzz::{Input, scratch_dir};
use tinyfleet_ota_service::artifacts::Artifacts;
use tinyfleet_ota_service::blocks;

struct Stored {
    artifacts: Artifacts,
    object: [u8; 32],
    bytes: Vec<u8>,
}

fn stored() -> &'static Stored {
    static STORED: OnceLock<Stored> = OnceLock::new();
    STORED.get_or_init(|| {
        let artifacts = Artifacts::open(&scratch_dir("artifacts")).expect("artifacts");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let sha = artifacts.put(&bytes).expect("put");
        let object: [u8; 32] = (0..32)
            .map(|i| u8::from_str_radix(&sha[2 * i..2 * i + 2], 16).expect("hex"))
            .collect::<Vec<u8>>()
            .try_into()
            .expect("32 bytes");
        Stored {
            artifacts,
            object,
            bytes,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = stored();
    let mut input = Input::new(data);
    // Half of the inputs name the stored object, so requests reach the reading code.
    let named = input.byte().is_multiple_of(2);
    let body = input.rest();
    let Ok(raw) = wire::from_cbor::<BlockRequest<'_>>(body) else {
        return;
    };
    let mut req = raw;
    if named && req.object.len() == 32 {
        req.object = &s.object;
    }
    let Ok(req) = BlockRequestOwned::try_from(&req) else {
        return;
    };
    let answer = blocks::answer(&s.artifacts, "dev-1", &req.object, req.offset, req.len);
    let inside = req.object == s.object && (req.offset as usize) < s.bytes.len();
    match answer {
        Ok((topic, msg)) => {
            assert!(inside, "answered a request outside the object: {req:?}");
            assert_eq!(topic, "tf/v1/dev-1/ota/blk");
            let block = decode_block(&msg).expect("the device decodes the answer");
            assert_eq!(block.object, &s.object);
            assert_eq!(block.offset, req.offset);
            assert_eq!(block.total as usize, s.bytes.len());
            let at = req.offset as usize;
            let end = (at + usize::from(req.len)).min(s.bytes.len());
            assert_eq!(block.data, &s.bytes[at..end]);
        }
        Err(e) => assert!(!inside, "no answer for {req:?}: {e}"),
    }
});
