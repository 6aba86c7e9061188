//! OTA block answers as a device decodes them (`tf/v1/{device}/ota/blk`): the device's strict
//! reader `ota::decode_block` (no serde_cbor on the device) and serde_cbor's `wire::from_cbor`
//! (what `tinyfleet-sim` uses).
//!
//! Properties: never panics; where both decoders accept a block they read the same block; a
//! block either returns re-encodes to bytes both read back as that block
//! (`decode(encode(b)) == b`). (The two differ on what they skip: the device's reader does not
//! check UTF-8 inside an unknown, future field, serde_cbor refuses it; serde_cbor accepts a
//! struct written as an array, the device's reader does not. Neither matters for a block, whose
//! bytes are checked against the signed digest.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::ota::decode_block;
use tinyfleet_device::wire::{self, Block};

fn encode(block: &Block<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; block.object.len() + block.data.len() + 64];
    let n = wire::to_cbor(block, &mut buf).expect("a decoded block re-encodes");
    buf.truncate(n);
    buf
}

fuzz_target!(|bytes: &[u8]| {
    let strict = decode_block(bytes);
    let generic = wire::from_cbor::<Block<'_>>(bytes);
    if let (Some(a), Ok(b)) = (strict, generic) {
        assert_eq!(a, b, "the two decoders read different blocks");
    }
    for b in strict.into_iter().chain(generic.ok()) {
        let bytes = encode(&b);
        assert_eq!(decode_block(&bytes), Some(b), "decode(encode(b)) == b");
        assert_eq!(wire::from_cbor::<Block<'_>>(&bytes), Ok(b));
    }
});
