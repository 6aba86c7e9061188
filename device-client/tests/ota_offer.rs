//! Signed offers: round trip, interop with coset, key rotation, and refusal of any change.

mod ota_util;

use coset::{CborSerializable, TaggedCborSerializable};
use ed25519_dalek::Signer;
use ota_util::*;
use proptest::prelude::*;
use tinyfleet_device::ota::manifest::{
    self, Digest, Golden, MAX_OFFER, Manifest, OfferError, TrustedKey, verify_offer,
};

fn keys() -> [TrustedKey<'static>; 2] {
    trusted()
}

/// Verifies with a scratch buffer and in place; both must agree.
fn verify(offer: &[u8]) -> Result<Manifest<'_>, OfferError> {
    let mut scratch = [0u8; MAX_OFFER];
    let with_scratch = verify_offer(offer, &keys(), &mut scratch);
    let mut buf = offer.to_vec();
    let in_place = manifest::verify_offer_in_place(&mut buf, &keys()).map(|m| format!("{m:?}"));
    assert_eq!(in_place, with_scratch.map(|m| format!("{m:?}")));
    with_scratch
}

fn sample() -> Manifest<'static> {
    let old = image(1, 9000);
    let new = retrained(&old, 9500);
    let patch = literal_patch(&old, &new, BLOCK);
    with_golden(
        delta_manifest(7, &old, &new, &patch),
        &[(b"in-0", b"out-0"), (b"in-1", b"out-1")],
    )
}

#[test]
fn offers_round_trip() {
    for m in [sample(), full_manifest(3, &image(2, 100))] {
        let offer = sign(&m);
        assert_eq!(verify(&offer), Ok(m));
        // The service's decoder (serde_cbor) reads the same manifest.
        let payload = manifest::parse_offer(&offer).unwrap().payload;
        let decoded: Manifest<'_> = serde_cbor::from_slice(payload).unwrap();
        assert_eq!(decoded, m);
    }
}

#[test]
fn fixed_header_bytes() {
    let offer = sign(&sample());
    let mut head = vec![0xd2, 0x84, 0x4d, 0xa2, 0x01, 0x27, 0x04, 0x48];
    head.extend_from_slice(&kid(1));
    head.push(0xa0);
    assert_eq!(&offer[..head.len()], &head[..]);
    assert_eq!(&offer[offer.len() - 66..offer.len() - 64], &[0x58, 0x40]);
}

#[test]
fn coset_parses_and_verifies_our_offers() {
    let m = sample();
    let offer = sign(&m);
    let parsed = coset::CoseSign1::from_tagged_slice(&offer).unwrap();
    assert_eq!(
        parsed.protected.header.alg,
        Some(coset::RegisteredLabelWithPrivate::Assigned(
            coset::iana::Algorithm::EdDSA
        ))
    );
    assert_eq!(parsed.protected.header.key_id, kid(1).to_vec());
    assert!(parsed.unprotected.is_empty());
    let public = signing_key(1).verifying_key();
    parsed
        .verify_signature(b"", |sig, data| {
            let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| "length")?;
            public
                .verify_strict(data, &sig)
                .map_err(|_| "bad signature")
        })
        .unwrap();
    // Our Sig_structure is coset's tbs_data, byte for byte.
    let o = manifest::parse_offer(&offer).unwrap();
    let mut tbs = [0u8; MAX_OFFER];
    let n = manifest::to_be_signed(o.protected, o.payload, &mut tbs).unwrap();
    assert_eq!(&tbs[..n], &parsed.tbs_data(b"")[..]);
    // coset re-encodes it identically.
    assert_eq!(parsed.to_tagged_vec().unwrap(), offer);
}

#[test]
fn coset_built_offers_verify() {
    let m = sample();
    let payload = serde_cbor::ser::to_vec_packed(&m).unwrap();
    let key = signing_key(2);
    let built = coset::CoseSign1Builder::new()
        .protected(
            coset::HeaderBuilder::new()
                .algorithm(coset::iana::Algorithm::EdDSA)
                .key_id(kid(2).to_vec())
                .build(),
        )
        .payload(payload)
        .create_signature(b"", |data| key.sign(data).to_bytes().to_vec())
        .build();
    let bytes = built.clone().to_tagged_vec().unwrap();
    assert_eq!(verify(&bytes), Ok(m));
    // Untagged is not the fixed form.
    assert_eq!(verify(&built.to_vec().unwrap()), Err(OfferError::Malformed));
}

#[test]
fn key_rotation_and_unknown_keys() {
    let m = sample();
    // Key 2 is trusted too.
    let offer2 = manifest::sign_offer(&m, &signing_key(2), &kid(2)).unwrap();
    assert_eq!(verify(&offer2), Ok(m));
    // Key 3 is not.
    let offer3 = manifest::sign_offer(&m, &signing_key(3), &kid(3)).unwrap();
    assert_eq!(verify(&offer3), Err(OfferError::UnknownKey));
    // Key 3 claiming key 1's id.
    let forged = manifest::sign_offer(&m, &signing_key(3), &kid(1)).unwrap();
    assert_eq!(verify(&forged), Err(OfferError::BadSignature));
    // Only key 2 trusted: key 1's offers are refused.
    let only2 = [keys()[1]];
    let mut scratch = [0u8; MAX_OFFER];
    assert_eq!(
        verify_offer(&sign(&m), &only2, &mut scratch),
        Err(OfferError::UnknownKey)
    );
}

#[test]
fn small_scratch_is_an_error() {
    let offer = sign(&sample());
    let mut scratch = [0u8; 64];
    assert_eq!(
        verify_offer(&offer, &keys(), &mut scratch),
        Err(OfferError::BufferTooSmall)
    );
}

#[test]
fn inconsistent_manifests_are_not_signed_or_accepted() {
    let mut m = full_manifest(3, &image(2, 100));
    m.object = Digest([9; 32]);
    assert_eq!(
        manifest::sign_offer(&m, &signing_key(1), &kid(1)),
        Err(OfferError::Invalid)
    );
    m = full_manifest(3, &image(2, 100));
    m.block_size = 100;
    assert_eq!(m.check(), Err(OfferError::Invalid));
    m.block_size = 256;
    m.golden = Some(Golden {
        count: 0,
        sha256: Digest([0; 32]),
    });
    assert_eq!(m.check(), Err(OfferError::Invalid));
}

/// Manifest bytes with one more map entry (key, value) appended at the end.
fn with_entry(payload: &[u8], entry: &[u8]) -> Vec<u8> {
    assert!((0xa0..0xb7).contains(&payload[0]));
    let mut b = vec![payload[0] + 1];
    b.extend_from_slice(&payload[1..]);
    b.extend_from_slice(entry);
    b
}

#[test]
fn decoder_is_strict_but_skips_future_keys() {
    let m = sample();
    let payload = serde_cbor::ser::to_vec_packed(&m).unwrap();
    assert_eq!(Manifest::decode(&payload), Ok(m));
    // An appended key 13 (a future field, here a nested map) is skipped.
    let future = with_entry(&payload, &[0x0d, 0xa1, 0x00, 0x82, 0x01, 0x61, b'x']);
    assert_eq!(Manifest::decode(&future), Ok(m));
    // A key seen twice, trailing bytes, a wrong type, a short digest: refused.
    let dup = with_entry(&payload, &[0x02, 0x05]);
    assert_eq!(Manifest::decode(&dup), Err(OfferError::Manifest));
    let mut trailing = payload.clone();
    trailing.push(0x00);
    assert_eq!(Manifest::decode(&trailing), Err(OfferError::Manifest));
    let mut m2 = full_manifest(3, &image(2, 100));
    m2.golden = None;
    let small = serde_cbor::ser::to_vec_packed(&m2).unwrap();
    // Drop key 12 (golden) and the optional keys 10..=12 altogether: still a manifest.
    let cut = small.iter().rposition(|&b| b == 0x0a).unwrap();
    let mut short = small[..cut].to_vec();
    short[0] -= 3;
    assert_eq!(Manifest::decode(&short), Ok(m2));
    // Dropping a required key is not.
    let url_at = small.windows(2).position(|w| w == [0x08, 0x78]).unwrap();
    let no_url: Vec<u8> = small[..url_at]
        .iter()
        .chain(&small[url_at + 3 + small[url_at + 2] as usize..])
        .copied()
        .collect();
    let mut no_url = no_url;
    no_url[0] -= 1;
    assert_eq!(Manifest::decode(&no_url), Err(OfferError::Manifest));
}

/// The CDDL of `docs/protocol.md` (its first cddl block), with `rule` as the root.
fn documented_cddl(rule: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let start = doc.find("```cddl\n").unwrap() + "```cddl\n".len();
    let len = doc[start..].find("```").unwrap();
    format!("root = {rule}\n{}", &doc[start..start + len])
}

#[test]
fn offers_match_the_documented_cddl() {
    let offer_rule = documented_cddl("offer-msg");
    let manifest_rule = documented_cddl("manifest");
    let mut minimal = full_manifest(3, &image(2, 100));
    minimal.url = "";
    for m in [sample(), full_manifest(3, &image(2, 100)), minimal] {
        let offer = sign(&m);
        if let Err(e) = cddl::validate_cbor_from_slice(&offer_rule, &offer, None) {
            panic!("{m:?}: {e}");
        }
        let payload = manifest::parse_offer(&offer).unwrap().payload;
        cddl::validate_cbor_from_slice(&manifest_rule, payload, None).unwrap();
    }
    // And the CDDL is not vacuous: a manifest without its url, a 17-byte kid, are not offers.
    let m = sample();
    let payload = serde_cbor::ser::to_vec_packed(&m).unwrap();
    let serde_cbor::Value::Map(mut map) = serde_cbor::from_slice(&payload).unwrap() else {
        panic!("a manifest is a map")
    };
    map.remove(&serde_cbor::Value::Integer(8));
    let no_url = serde_cbor::to_vec(&serde_cbor::Value::Map(map)).unwrap();
    assert!(cddl::validate_cbor_from_slice(&manifest_rule, &no_url, None).is_err());
    assert_eq!(Manifest::decode(&no_url), Err(OfferError::Manifest));
    let long_kid = manifest::sign_offer(&m, &signing_key(1), &[7; 17]);
    assert_eq!(long_kid, Err(OfferError::Malformed));
}

fn arb_manifest() -> impl Strategy<Value = (Manifest<'static>, bool)> {
    (
        any::<u32>(),
        1u32..,
        any::<[u8; 32]>(),
        prop::option::of((any::<[u8; 32]>(), 1u32.., any::<[u8; 32]>(), any::<u32>())),
        256u16..=4096,
        "[a-z0-9.]{0,20}",
        any::<(u32, u32)>(),
        prop::option::of((1u16.., any::<[u8; 32]>())),
    )
        .prop_map(|(seq, size, sha, delta, bs, ver, (fw, arena), golden)| {
            let ver: &'static str = Box::leak(ver.into_boxed_str());
            let delta = delta.map(|(b, ps, p, bsz)| manifest::Delta {
                base_sha256: Digest(b),
                patch_size: ps,
                patch_sha256: Digest(p),
                base_size: bsz,
            });
            let m = Manifest {
                model_id: "kws",
                model_version: ver,
                seq,
                hw: HW,
                image_size: size,
                image_sha256: Digest(sha),
                delta,
                block_size: bs,
                url: "",
                object: delta.map_or(Digest(sha), |d| d.patch_sha256),
                min_fw: fw,
                arena,
                golden: golden.map(|(count, s)| Golden {
                    count,
                    sha256: Digest(s),
                }),
            };
            (m, delta.is_some())
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_flipped_bit_is_rejected((m, _) in arb_manifest(), pos in any::<prop::sample::Index>(),
                                   bit in 0u8..8) {
        let mut offer = sign(&m);
        prop_assert_eq!(verify(&offer), Ok(m));
        let i = pos.index(offer.len());
        offer[i] ^= 1 << bit;
        prop_assert!(verify(&offer).is_err());
    }

    #[test]
    fn both_decoders_agree((m, _) in arb_manifest()) {
        let payload = serde_cbor::ser::to_vec_packed(&m).unwrap();
        prop_assert_eq!(Manifest::decode(&payload), Ok(m));
        let mut buf = [0u8; 1024];
        let n = manifest::encode_manifest(&m, &mut buf).unwrap();
        prop_assert_eq!(&buf[..n], &payload[..]);
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = verify(&bytes);
        let _ = Manifest::decode(&bytes);
        let mut offer = vec![0xd2, 0x84, 0x4d, 0xa2, 0x01, 0x27, 0x04, 0x48];
        offer.extend_from_slice(&kid(1));
        offer.push(0xa0);
        offer.extend_from_slice(&bytes);
        let _ = verify(&offer);
    }
}
