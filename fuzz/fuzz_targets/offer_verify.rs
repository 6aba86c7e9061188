//! OTA offers as a device receives them (`device-client/src/ota/manifest.rs`): the fixed-form
//! COSE_Sign1 parser and Ed25519 `verify_strict` against a trusted key, both with a scratch
//! buffer (`verify_offer`) and in place over the received bytes (`verify_offer_in_place`).
//!
//! Properties: never panics; both verifiers give the same answer for any bytes; a scratch of
//! `MAX_OFFER` bytes always suffices (no `BufferTooSmall`); an accepted offer is exactly the one
//! the trusted key signs for its payload (Ed25519 signatures are deterministic, and the form is
//! fixed: no second encoding of one offer is accepted).
//! `manifest_signed` signs fuzzed payloads to reach the manifest decoder behind the signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::ota::manifest::{self, OfferError};
use tinyfleet_fuzz::{sign_payload, trusted};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(offer) = manifest::parse_offer(bytes) {
        assert!(bytes.len() <= manifest::MAX_OFFER);
        assert!((1..=manifest::MAX_KID).contains(&offer.kid.len()));
    }
    let mut scratch = [0u8; manifest::MAX_OFFER];
    let with_scratch = manifest::verify_offer(bytes, trusted(), &mut scratch);
    let mut buf = bytes.to_vec();
    let in_place = manifest::verify_offer_in_place(&mut buf, trusted());
    assert_eq!(with_scratch, in_place, "the two verifiers disagree");
    assert_ne!(with_scratch.err(), Some(OfferError::BufferTooSmall));
    if with_scratch.is_ok() {
        let payload = manifest::parse_offer(bytes)
            .expect("verified offers parse")
            .payload;
        assert_eq!(
            sign_payload(payload).as_deref(),
            Some(bytes),
            "an offer verified that is not the signer's own encoding"
        );
    }
});
