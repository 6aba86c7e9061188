//! The manifest decoder behind an offer's signature. The fuzz input is the manifest payload:
//! it is decoded directly (`Manifest::decode`, the device's strict reader), and also signed with
//! the fixed key the device trusts and verified as a whole offer, both ways.
//!
//! Properties: never panics; a signed payload is accepted exactly when it decodes and its
//! fields are consistent (`Manifest::check`), with the same manifest from both verifiers; where
//! the device's reader and serde_cbor's generic decoder (the service's view) both accept a
//! payload they read the same manifest, and both read the re-encoding of anything the device
//! accepts as that manifest (`decode(encode(m)) == m`); `verify(sign_offer(m)) == m` for every
//! consistent manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::ota::manifest::{self, Manifest, OfferError};
use tinyfleet_device::wire;
use tinyfleet_fuzz::{sign_payload, signing_key, trusted};

fuzz_target!(|payload: &[u8]| {
    let decoded = Manifest::decode(payload);
    if let Ok(m) = &decoded {
        // The service's serde_cbor must read the same manifest (it may refuse what the device
        // skips, such as invalid UTF-8 inside an unknown field).
        if let Ok(generic) = wire::from_cbor::<Manifest<'_>>(payload) {
            assert_eq!(&generic, m, "serde_cbor reads another manifest");
        }
        let mut buf = vec![0u8; payload.len() + 64];
        let n = manifest::encode_manifest(m, &mut buf).expect("a decoded manifest re-encodes");
        assert_eq!(
            Manifest::decode(&buf[..n]).as_ref(),
            Ok(m),
            "decode(encode(m)) == m"
        );
        assert_eq!(wire::from_cbor::<Manifest<'_>>(&buf[..n]).as_ref(), Ok(m));
        if m.check().is_ok() {
            let kid = manifest::kid_of(signing_key().verifying_key().as_bytes());
            if let Ok(offer) = manifest::sign_offer(m, &signing_key(), &kid) {
                let mut scratch = [0u8; manifest::MAX_OFFER];
                let back = manifest::verify_offer(&offer, trusted(), &mut scratch);
                assert_eq!(back.as_ref(), Ok(m), "verify(sign(m)) == m");
            }
        }
    }

    let Some(offer) = sign_payload(payload) else {
        return;
    };
    let mut scratch = [0u8; manifest::MAX_OFFER];
    let with_scratch = manifest::verify_offer(&offer, trusted(), &mut scratch);
    let mut buf = offer.clone();
    let in_place = manifest::verify_offer_in_place(&mut buf, trusted());
    assert_eq!(with_scratch, in_place, "the two verifiers disagree");
    let expected = if offer.len() > manifest::MAX_OFFER {
        Err(OfferError::Malformed)
    } else {
        decoded.and_then(|m| m.check().map(|()| m))
    };
    assert_eq!(with_scratch, expected);
});
