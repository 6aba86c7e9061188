//! `ota::ed25519::verify_strict` (the device's offer signature check) must accept exactly what
//! ed25519-dalek 3's `VerifyingKey::from_bytes(pk)?.verify_strict(msg, sig)` accepts, and fail
//! with `Error::Key` exactly when `from_bytes` does. Checked on:
//!
//! - RFC 8032 section 7.1 TEST 1..3;
//! - Wycheproof's EdDSA set (`tests/data/wycheproof_eddsa_test.json`, 145 cases: RFC 8032
//!   vectors, malleability and non-canonical cases), Apache-2.0, from Google's Project
//!   Wycheproof via the `salty` crate (copied from `scripts/ed25519-stack/vlib/tests/`);
//! - hand-made cases around what `verify_strict` rejects (non-canonical S, small-order keys and
//!   R, mixed-order R);
//!
//! 165 cases with 64-byte signatures in all (the same set as `scripts/ed25519-stack`), then
//! random keys, messages and signatures, and valid signatures with one bit flipped (proptest).
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::Signer as _;
use proptest::prelude::*;
use sha2::{Digest as _, Sha512};
use tinyfleet_device::ota::ed25519::{Error, verify_strict};

/// ed25519-dalek's answer, in `verify_strict`'s error terms.
fn dalek(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Result<(), Error> {
    let vk = ed25519_dalek::VerifyingKey::from_bytes(pk).map_err(|_| Error::Key)?;
    vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
        .map_err(|_| Error::Signature)
}

struct Case {
    name: String,
    pk: [u8; 32],
    msg: Vec<u8>,
    sig: Vec<u8>,
    /// What `verify_strict` must say, where the source says it.
    expect: Option<bool>,
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn rfc8032() -> Vec<Case> {
    // RFC 8032 section 7.1: TEST 1, 2, 3 (public key, message, signature).
    let t = [
        (
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    ];
    t.iter()
        .enumerate()
        .map(|(i, (pk, m, s))| Case {
            name: format!("rfc8032 test {}", i + 1),
            pk: h(pk).try_into().unwrap(),
            msg: h(m),
            sig: h(s),
            expect: Some(true),
        })
        .collect()
}

fn wycheproof() -> Vec<Case> {
    let d: serde_json::Value =
        serde_json::from_str(include_str!("data/wycheproof_eddsa_test.json")).unwrap();
    let mut out = vec![];
    for g in d["testGroups"].as_array().unwrap() {
        let pk: [u8; 32] = h(g["key"]["pk"].as_str().unwrap()).try_into().unwrap();
        for t in g["tests"].as_array().unwrap() {
            out.push(Case {
                name: format!("wycheproof {} {}", t["tcId"], t["comment"]),
                pk,
                msg: h(t["msg"].as_str().unwrap()),
                sig: h(t["sig"].as_str().unwrap()),
                // Wycheproof's "invalid" must be rejected, its "valid" accepted.
                expect: Some(t["result"].as_str().unwrap() == "valid"),
            });
        }
    }
    assert_eq!(out.len(), 145);
    out
}

/// The group order l, little-endian.
const L: &str = "edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010";
/// A point of order 8.
const ORDER_8: &str = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a";

/// Hand-made cases around what `verify_strict` rejects.
fn edge_cases() -> Vec<Case> {
    let seed = [7u8; 32];
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    let pk = sk.verifying_key().to_bytes();
    let msg = b"tinyfleet offer".to_vec();
    let good = sk.sign(&msg).to_bytes();
    let case = |name: &str, pk: [u8; 32], msg: &[u8], sig: &[u8], expect: bool| Case {
        name: name.into(),
        pk,
        msg: msg.to_vec(),
        sig: sig.to_vec(),
        expect: Some(expect),
    };
    let mut out = vec![case("good", pk, &msg, &good, true)];

    // An offer-sized message.
    let long: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
    out.push(case(
        "good, 1000-byte message",
        pk,
        &long,
        &sk.sign(&long).to_bytes(),
        true,
    ));

    // Wrong message, flipped signature bit.
    out.push(case("other message", pk, b"tinyfleet offes", &good, false));
    let mut bad = good;
    bad[5] ^= 1;
    out.push(case("R bit flipped", pk, &msg, &bad, false));

    // S + l (malleability: non-canonical S for the same scalar), and S >= 2^253.
    let l: [u8; 32] = h(L).try_into().unwrap();
    let mut s_plus_l = good;
    let mut carry = 0u16;
    for i in 0..32 {
        let v = u16::from(s_plus_l[32 + i]) + u16::from(l[i]) + carry;
        s_plus_l[32 + i] = v as u8;
        carry = v >> 8;
    }
    out.push(case("S + l (malleable)", pk, &msg, &s_plus_l, false));
    let mut s_high = good;
    s_high[63] |= 0xe0;
    out.push(case("S >= 2^253", pk, &msg, &s_high, false));

    // Small-order keys: the identity, order 2 and order 8 points; with S = 0 and R small too,
    // [0]B - [k]A = -[k]A can match R for any message (the forgery small-order A allows).
    let small = [
        (
            "identity",
            "0100000000000000000000000000000000000000000000000000000000000000",
        ),
        (
            "order 2",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ),
        ("order 8", ORDER_8),
        (
            "order 8 (non-canonical y = p + 1 encoding)",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ),
    ];
    for (n, a) in small {
        let a: [u8; 32] = h(a).try_into().unwrap();
        for (rn, r) in small {
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&h(r));
            out.push(case(
                &format!("small-order A {n}, R {rn}, S = 0"),
                a,
                &msg,
                &sig,
                false,
            ));
        }
        let mut sig = good;
        sig[..32].copy_from_slice(&a);
        out.push(case(
            &format!("small-order R {n}, real key"),
            pk,
            &msg,
            &sig,
            false,
        ));
    }

    // Signatures whose R has a small-order part, made with the secret scalar a: s = r + k*a.
    let a_scalar = Scalar::from_bytes_mod_order(curve25519_dalek::scalar::clamp_integer(
        Sha512::digest(seed)[..32].try_into().unwrap(),
    ));
    assert_eq!(EdwardsPoint::mul_base(&a_scalar).compress().to_bytes(), pk);
    let torsion = CompressedEdwardsY(h(ORDER_8).try_into().unwrap())
        .decompress()
        .unwrap();
    assert!(torsion.is_small_order());
    let sign_with_r = |r_point: EdwardsPoint, r_scalar: Scalar| {
        let r_bytes = r_point.compress().to_bytes();
        let mut hh = Sha512::new();
        hh.update(r_bytes);
        hh.update(pk);
        hh.update(&msg);
        let k = Scalar::from_bytes_mod_order_wide(&hh.finalize().into());
        let s = r_scalar + k * a_scalar;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r_bytes);
        sig[32..].copy_from_slice(s.as_bytes());
        sig
    };
    // R = T8, s = k*a: the cofactored equation holds, R is small order.
    out.push(case(
        "R = order-8 point, s = k*a",
        pk,
        &msg,
        &sign_with_r(torsion, Scalar::ZERO),
        false,
    ));
    // Mixed-order R = [r]B + T8: the cofactored equation holds, the cofactorless one does not.
    let r = Scalar::from_bytes_mod_order([42u8; 32]);
    out.push(case(
        "mixed-order R = [r]B + T8",
        pk,
        &msg,
        &sign_with_r(EdwardsPoint::mul_base(&r) + torsion, r),
        false,
    ));
    // The same r without the torsion: valid.
    out.push(case(
        "R = [r]B (control)",
        pk,
        &msg,
        &sign_with_r(EdwardsPoint::mul_base(&r), r),
        true,
    ));
    out
}

#[test]
fn agrees_with_verify_strict_on_the_vectors() {
    let cases: Vec<Case> = rfc8032()
        .into_iter()
        .chain(wycheproof())
        .chain(edge_cases())
        .collect();
    let (mut accepted, mut rejected, mut bad_keys) = (0, 0, 0);
    let mut mismatches = vec![];
    for c in &cases {
        let Ok(sig) = <[u8; 64]>::try_from(&c.sig[..]) else {
            continue; // a wrong-length signature never reaches a verifier (`parse_offer`)
        };
        let reference = dalek(&c.pk, &c.msg, &sig);
        if let Some(e) = c.expect {
            assert_eq!(reference.is_ok(), e, "ed25519-dalek on {}", c.name);
        }
        match reference {
            Ok(()) => accepted += 1,
            Err(Error::Key) => bad_keys += 1,
            Err(Error::Signature) => rejected += 1,
        }
        let got = verify_strict(&c.pk, &c.msg, &sig);
        if got != reference {
            mismatches.push(format!("{}: dalek {reference:?}, got {got:?}", c.name));
        }
    }
    assert!(mismatches.is_empty(), "mismatches: {mismatches:#?}");
    // The same 165 as scripts/ed25519-stack.
    assert_eq!(
        (accepted, rejected + bad_keys),
        (90, 75),
        "accepted, rejected ({bad_keys} for the key)"
    );
}

#[test]
fn key_that_is_not_a_point() {
    // The first y = 2, 3, ... that does not decompress (about half do not).
    let mut pk = [0u8; 32];
    let y = (2u8..)
        .find(|y| {
            pk[0] = *y;
            ed25519_dalek::VerifyingKey::from_bytes(&pk).is_err()
        })
        .unwrap();
    pk[0] = y;
    assert_eq!(verify_strict(&pk, b"m", &[0; 64]), Err(Error::Key));
}

/// A key pair and a valid signature from a seed.
fn signed(seed: [u8; 32], msg: &[u8]) -> ([u8; 32], [u8; 64]) {
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    (sk.verifying_key().to_bytes(), sk.sign(msg).to_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Valid signatures verify, and each single flipped bit of the key, the signature or the
    /// message gets the same answer from both (a rejection, almost always).
    #[test]
    fn valid_and_one_bit_flipped(
        seed in any::<[u8; 32]>(),
        msg in proptest::collection::vec(any::<u8>(), 0..300),
        bit in 0usize..(8 * (32 + 64 + 300)),
    ) {
        let (pk, sig) = signed(seed, &msg);
        prop_assert_eq!(verify_strict(&pk, &msg, &sig), Ok(()));
        prop_assert_eq!(dalek(&pk, &msg, &sig), Ok(()));
        let (mut pk2, mut sig2, mut msg2) = (pk, sig, msg.clone());
        let (byte, mask) = (bit / 8, 1u8 << (bit % 8));
        if byte < 32 {
            pk2[byte] ^= mask;
        } else if byte < 96 {
            sig2[byte - 32] ^= mask;
        } else if byte - 96 < msg2.len() {
            msg2[byte - 96] ^= mask;
        } else {
            msg2.push(mask); // past the end: one byte more
        }
        prop_assert_eq!(verify_strict(&pk2, &msg2, &sig2), dalek(&pk2, &msg2, &sig2));
    }

    /// Random bytes: keys that are or are not points, S canonical or not, R a point or not.
    #[test]
    fn random_inputs(
        pk in any::<[u8; 32]>(),
        r in any::<[u8; 32]>(),
        s in any::<[u8; 32]>(),
        s_top in 0u8..0x20,
        msg in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r);
        sig[32..].copy_from_slice(&s);
        prop_assert_eq!(verify_strict(&pk, &msg, &sig), dalek(&pk, &msg, &sig));
        // Most random S are >= l and rejected at once; with S < 2^253 (canonical 15 times in
        // 16) the remaining checks run too.
        sig[63] = s_top;
        prop_assert_eq!(verify_strict(&pk, &msg, &sig), dalek(&pk, &msg, &sig));
    }

    /// A valid signature under another key, or on another message.
    #[test]
    fn wrong_key_or_message(
        seed in any::<[u8; 32]>(),
        other in any::<[u8; 32]>(),
        msg in proptest::collection::vec(any::<u8>(), 0..64),
        other_msg in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let (pk, sig) = signed(seed, &msg);
        let (other_pk, _) = signed(other, &msg);
        prop_assert_eq!(verify_strict(&other_pk, &msg, &sig), dalek(&other_pk, &msg, &sig));
        prop_assert_eq!(verify_strict(&pk, &other_msg, &sig), dalek(&pk, &other_msg, &sig));
    }
}
