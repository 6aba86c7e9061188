//! Ed25519 verifiers under test. Each `verify` is `#[inline(never)]` so that its whole stack use
//! sits below the probe's `Reset` (which `stack.py` does not count).
#![no_std]

/// ed25519-dalek 3 `verify_strict`, as device-client/src/ota/manifest.rs calls it.
#[cfg(feature = "dalek")]
pub mod dalek {
    #[inline(never)]
    pub fn verify(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(pk) else {
            return false;
        };
        vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
            .is_ok()
    }
}

/// curve25519-dalek 5 directly: the same checks and equation as `verify_strict`.
#[cfg(feature = "direct")]
pub mod direct {
    use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
    use curve25519_dalek::scalar::Scalar;
    use sha2::{Digest, Sha512};

    /// Canonical S, A and R decompress, neither is small order. Returns (s, A, R bytes).
    #[inline(never)]
    pub fn checks(pk: &[u8; 32], sig: &[u8; 64]) -> Option<(Scalar, EdwardsPoint)> {
        let s: Scalar = Option::from(Scalar::from_canonical_bytes(
            sig[32..].try_into().unwrap(),
        ))?;
        let a = CompressedEdwardsY(*pk).decompress()?;
        let r = CompressedEdwardsY(sig[..32].try_into().unwrap()).decompress()?;
        if a.is_small_order() || r.is_small_order() {
            return None;
        }
        Some((s, a))
    }

    /// k = SHA-512(R || A || M) mod l.
    #[inline(never)]
    pub fn challenge(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Scalar {
        let mut h = Sha512::new();
        h.update(&sig[..32]);
        h.update(pk);
        h.update(msg);
        Scalar::from_bytes_mod_order_wide(&h.finalize().into())
    }

    /// [s]B - [k]A, compressed, compared with R's bytes.
    #[inline(never)]
    pub fn equation(k: &Scalar, a: &EdwardsPoint, s: &Scalar, r: &[u8]) -> bool {
        EdwardsPoint::vartime_double_scalar_mul_basepoint(k, &-a, s)
            .compress()
            .as_bytes()[..]
            == *r
    }

    #[inline(never)]
    pub fn verify(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        let Some((s, a)) = checks(pk, sig) else {
            return false;
        };
        let k = challenge(pk, msg, sig);
        equation(&k, &a, &s, &sig[..32])
    }

    /// Same checks, but [s]B and [k](-A) as two separate constant-time scalar multiplications
    /// (`mul_base`, `Mul`), so only one 8-entry table is live at a time.
    #[inline(never)]
    pub fn verify_two_mults(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        let Some((s, a)) = checks(pk, sig) else {
            return false;
        };
        let k = challenge(pk, msg, sig);
        let sb = sb(&s);
        let ka = ka(&k, &a);
        (sb - ka).compress().as_bytes()[..] == sig[..32]
    }
    #[inline(never)]
    fn sb(s: &Scalar) -> EdwardsPoint {
        EdwardsPoint::mul_base(s)
    }
    #[inline(never)]
    fn ka(k: &Scalar, a: &EdwardsPoint) -> EdwardsPoint {
        a * k
    }
}

/// ed25519-compact (jedisct1): its only `verify`.
#[cfg(feature = "compact")]
pub mod compact {
    #[inline(never)]
    pub fn verify(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        ed25519_compact::PublicKey::new(*pk)
            .verify(msg, &ed25519_compact::Signature::new(*sig))
            .is_ok()
    }
}

/// salty: its `verify` (cofactorless, but no S / small-order checks) plus the checks
/// `verify_strict` makes.
#[cfg(feature = "salty")]
pub mod salty {
    use salty::{CompressedY, EdwardsPoint, PublicKey, Signature};

    fn small_order(p: &EdwardsPoint) -> bool {
        let p2 = p + p;
        let p4 = &p2 + &p2;
        let p8 = &p4 + &p4;
        p8 == EdwardsPoint::neutral_element()
    }

    #[inline(never)]
    pub fn verify(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        let signature = Signature::from(sig);
        if !signature.s.is_canonical() {
            return false;
        }
        let Ok(a) = CompressedY(*pk).decompressed() else {
            return false;
        };
        let Ok(r) = signature.r.decompressed() else {
            return false;
        };
        if small_order(&a) || small_order(&r) {
            return false;
        }
        let Ok(key) = PublicKey::try_from(pk) else {
            return false;
        };
        key.verify(msg, &signature).is_ok()
    }
}
