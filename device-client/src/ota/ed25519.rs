//! Ed25519 signature verification (RFC 8032, pure Ed25519) for OTA offers, with exactly the
//! acceptance rules of ed25519-dalek's `VerifyingKey::verify_strict`, written over
//! curve25519-dalek so that the device needs about a third of the stack.
//!
//! [`verify_strict`] accepts a signature `(R, S)` on message `M` under the public key `A` if and
//! only if:
//!
//! 1. `A` decompresses to a curve point (else [`Error::Key`]; the other failures are
//!    [`Error::Signature`]),
//! 2. `S` is canonical (`S < l`, the order of the base point: no malleable `S + l`),
//! 3. `R` decompresses to a curve point,
//! 4. neither `A` nor `R` is of small order (no weak keys, no small-order forgeries),
//! 5. the cofactorless equation `[S]B = R + [k]A` holds, with `k = SHA-512(R || A || M) mod l`
//!    over the encodings as received, checked as ed25519-dalek does: `[S]B - [k]A` is compressed
//!    and compared with the 32 bytes of `R` (so a non-canonical encoding of `R` never matches).
//!
//! ed25519-dalek computes `[k](-A) + [S]B` with a variable-time double-base multiplication that
//! builds two 1,280-byte lookup tables (the base point's at run time, without its precomputed
//! tables, which cost ~7.7 KB of flash) and two 256-byte NAF arrays: about 8 KB of stack on a
//! Cortex-M4. Here `[S]B + [k](-A)` is one left-to-right double-and-add over the bits of both
//! scalars (Shamir's trick) with no table at all, points are written into their callers' frames
//! instead of being returned, and the hashing, the decoding checks, the loop and each point
//! operation sit in their own non-inlined function so that their temporaries never share a
//! frame: 2.1 KB of stack below [`verify_strict`]'s own 232 bytes in the size probe (the deepest
//! is curve25519-dalek's point decompression), and 1 KB less flash than ed25519-dalek,
//! `docs/benchmarks.md` ("With the OTA installer"). About 2.7 times slower than ed25519-dalek on
//! the host (no windowing), once per offer. Everything here is public data, so variable time is
//! fine.
//!
//! Tested against `verify_strict` on RFC 8032's and Wycheproof's vectors and hand-made
//! malleability and small-order cases (`tests/ed25519_strict.rs`), and on random keys, messages,
//! signatures and single flipped bits (proptest, same file).

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity as _;
use sha2::{Digest as _, Sha512};

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature (`R || S`).
pub const SIGNATURE_LEN: usize = 64;

/// Why a signature was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Error {
    /// The public key is not the encoding of a curve point (ed25519-dalek's
    /// `VerifyingKey::from_bytes` fails on it).
    Key,
    /// Anything else: non-canonical `S`, `R` not a point, small-order `A` or `R`, or the
    /// equation does not hold.
    Signature,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::Key => "public key is not a curve point",
            Error::Signature => "signature rejected",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// Verifies `signature` (`R || S`) on `message` under `public`, accepting exactly what
/// ed25519-dalek's `VerifyingKey::from_bytes(public)?.verify_strict(message, signature)`
/// accepts (see the module documentation). No allocation, no panic on any input.
///
/// Not inlined, and each step below is a function of its own, so that this frame holds only
/// what lives across the steps (`-A` and `k`): 232 bytes on a Cortex-M4, above ~2 KB for the
/// deepest step.
#[inline(never)]
pub fn verify_strict(
    public: &[u8; PUBLIC_KEY_LEN],
    message: &[u8],
    signature: &[u8; SIGNATURE_LEN],
) -> Result<(), Error> {
    let (Some(r), Some(s)) = (signature.first_chunk::<32>(), signature.last_chunk::<32>()) else {
        return Err(Error::Signature); // unreachable: a signature is 32 + 32 bytes
    };
    // 1. A is a point (the only `Error::Key`), 4. not of small order.
    let mut neg_a = EdwardsPoint::identity();
    negated_public_point(public, &mut neg_a)?;
    // 2. S < l.
    if !canonical(s) {
        return Err(Error::Signature);
    }
    // 3. R is a point, 4. not of small order.
    if !r_is_valid(r) {
        return Err(Error::Signature);
    }
    // 5. [S]B - [k]A == R, on encodings.
    let k = challenge(r, public, message);
    if equation(s, &k, &neg_a, r) {
        Ok(())
    } else {
        Err(Error::Signature)
    }
}

/// `-A` into `neg_a`, with `A` decompressed as ed25519-dalek does (a non-canonical `y >= p`
/// decodes) and of large order. The point goes to the caller's frame rather than through a
/// return value, which would add its own copies to this frame, above the decompression.
#[inline(never)]
fn negated_public_point(public: &[u8; 32], neg_a: &mut EdwardsPoint) -> Result<(), Error> {
    if !decompress_into(public, neg_a) {
        return Err(Error::Key);
    }
    if small_order(neg_a) {
        return Err(Error::Signature);
    }
    negate(neg_a);
    Ok(())
}

/// Decompresses `bytes` into `p`; false if they are not the encoding of a point.
#[inline(never)]
fn decompress_into(bytes: &[u8; 32], p: &mut EdwardsPoint) -> bool {
    match CompressedEdwardsY(*bytes).decompress() {
        Some(q) => {
            *p = q;
            true
        }
        None => false,
    }
}

/// `p = -p`.
#[inline(never)]
fn negate(p: &mut EdwardsPoint) {
    *p = -&*p;
}

/// Whether `S < l` (then its bytes are the scalar's: little-endian, as `Scalar::as_bytes`).
#[inline(never)]
fn canonical(s: &[u8; 32]) -> bool {
    Scalar::from_canonical_bytes(*s).is_some().into()
}

/// `R` decompresses and is of large order (the point itself is not needed: the equation
/// compares encodings).
#[inline(never)]
fn r_is_valid(r: &[u8; 32]) -> bool {
    CompressedEdwardsY(*r)
        .decompress()
        .is_some_and(|p| !small_order(&p))
}

/// Whether `[8]P` is the identity.
#[inline(never)]
fn small_order(p: &EdwardsPoint) -> bool {
    p.is_small_order()
}

/// `k = SHA-512(R || A || M) mod l`, over the encodings as received.
#[inline(never)]
fn challenge(r: &[u8; 32], public: &[u8; 32], message: &[u8]) -> Scalar {
    let mut h = Sha512::new();
    h.update(r);
    h.update(public);
    h.update(message);
    Scalar::from_bytes_mod_order_wide(&h.finalize().into())
}

/// `[s]B - [k]A`, compressed, equals the bytes of `r`.
#[inline(never)]
fn equation(s: &[u8; 32], k: &Scalar, neg_a: &EdwardsPoint, r: &[u8; 32]) -> bool {
    let mut sum = EdwardsPoint::identity();
    double_base(s, k, neg_a, &mut sum);
    encodes_as(&sum, r)
}

/// `p`, compressed, is `r` (an inversion: its temporaries stay below this frame only).
#[inline(never)]
fn encodes_as(p: &EdwardsPoint, r: &[u8; 32]) -> bool {
    p.compress().as_bytes() == r
}

/// `sum = [s]B + [k](-A)` (`sum` starts as the identity) by one left-to-right double-and-add
/// over the bits of both scalars at once (Shamir's trick): per bit a doubling, plus `B` where
/// `s` has a one and `-A` where `k` has one. No table, so nothing but the running sum lives
/// across the loop; variable time, which is fine for public data. Both scalars are below
/// `2^253` (`s` is canonical, `k` reduced mod `l`).
#[inline(never)]
fn double_base(s: &[u8; 32], k: &Scalar, neg_a: &EdwardsPoint, sum: &mut EdwardsPoint) {
    let k = k.as_bytes();
    let bit = |bytes: &[u8; 32], i: usize| (bytes[i / 8] >> (i % 8)) & 1 == 1;
    for i in (0..253).rev() {
        double(sum);
        if bit(s, i) {
            add(sum, &ED25519_BASEPOINT_POINT);
        }
        if bit(k, i) {
            add(sum, neg_a);
        }
    }
}

/// `p = 2p` (by the complete addition formula).
#[inline(never)]
fn double(p: &mut EdwardsPoint) {
    let q = *p;
    *p = q + q;
}

/// `p = p + q`.
#[inline(never)]
fn add(p: &mut EdwardsPoint, q: &EdwardsPoint) {
    *p += q;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032 section 7.1, TEST 2.
    const PK: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
    const SIG: &str = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
                       085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00";

    fn vector() -> ([u8; 32], [u8; 64]) {
        let pk = hex::decode(PK).unwrap().try_into().unwrap();
        let sig = hex::decode(SIG).unwrap().try_into().unwrap();
        (pk, sig)
    }

    #[test]
    fn rfc8032_test_2() {
        let (pk, sig) = vector();
        assert_eq!(verify_strict(&pk, &[0x72], &sig), Ok(()));
        assert_eq!(verify_strict(&pk, &[0x73], &sig), Err(Error::Signature));
        assert_eq!(verify_strict(&pk, &[], &sig), Err(Error::Signature));
    }

    #[test]
    fn small_order_key_is_a_signature_error() {
        // The identity is a point (so not `Error::Key`), but of small order: rejected as in
        // dalek, whose `VerifyingKey::from_bytes` accepts it and `verify_strict` does not.
        let (_, sig) = vector();
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(verify_strict(&identity, b"m", &sig), Err(Error::Signature));
    }
}
