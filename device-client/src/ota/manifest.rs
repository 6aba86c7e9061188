//! The OTA manifest and its signed envelope, `offer-msg` (`docs/protocol.md`, "OTA offer").
//!
//! An offer is a COSE_Sign1 (RFC 9052 section 4.2, CBOR tag 18) over the CBOR manifest, signed
//! with EdDSA (Ed25519, COSE alg -8) by the OTA service; the key id is in the protected header so
//! a device can hold several trusted keys (rotation). Like [`crate::cose`], the device accepts
//! one fixed form only, so verification never walks attacker-controlled header maps:
//!
//! ```text
//! d2                          tag 18 (COSE_Sign1)
//! 84                          array(4)
//! 4n / 58 nn                  protected: bstr .cbor {1: -8, 4: kid}
//!   a2 01 27 04 4k <kid>        (alg: EdDSA, kid: bstr of 1..=MAX_KID bytes)
//! a0                          unprotected: {}
//! 4n / 58 nn / 59 nnnn        payload: bstr .cbor manifest
//! 58 40 <64 bytes>            signature
//! ```
//!
//! This is also exactly what standard libraries write for those headers (`coset` is tested),
//! and they verify it. The signature covers `Sig_structure = ["Signature1", protected, h'',
//! payload]` ([`to_be_signed`]), checked with ed25519-dalek's `verify_strict` rules (no malleable
//! or small-order signatures), implemented in [`super::ed25519`] with a smaller stack.
//!
//! The manifest ([`Manifest`]) is CBOR in the packed form of [`crate::wire`]: a map whose keys
//! are the field positions. The service encodes it with serde_cbor ([`sign_offer`], `std`); the
//! device decodes it with [`Manifest::decode`], a small strict reader of exactly this map, because
//! serde_cbor's generic decoder costs more flash than the whole installer.

use serde::{Deserialize, Serialize};

use super::cbor::Reader;

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Longest key id (so the protected header stays below 24 bytes + header).
pub const MAX_KID: usize = 16;
/// Largest offer a device accepts (and so the scratch [`verify_offer`] may need).
pub const MAX_OFFER: usize = 1024;
/// Bytes `to_be_signed` adds around the protected header and the payload (at most).
pub const TBS_OVERHEAD: usize = 1 + 11 + 2 + 1 + 3;
/// Smallest and largest manifest block size.
pub const MIN_BLOCK: u16 = 256;
pub const MAX_BLOCK: u16 = 4096;

/// The COSE algorithm id of EdDSA.
const ALG_EDDSA: u8 = 0x27; // -8

/// A SHA-256 digest; CBOR `bstr .size 32`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl core::fmt::Debug for Digest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..")
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Digest;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("a 32-byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Digest, E> {
                <[u8; 32]>::try_from(v)
                    .map(Digest)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// How to build the image from the installed one: a `TFP1` patch (`ota::patch`).
/// CBOR: an array `[base_sha256, patch_size, patch_sha256, base_size]` (the draft's three, and
/// `base_size` appended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DeltaArray", into = "DeltaArray")]
pub struct Delta {
    /// SHA-256 of the image the patch applies to (the first `base_size` bytes of the active
    /// slot).
    pub base_sha256: Digest,
    pub patch_size: u32,
    pub patch_sha256: Digest,
    /// Size of that image.
    pub base_size: u32,
}

/// [`Delta`] as it is encoded (serde_cbor writes a tuple struct as an array).
#[derive(Serialize, Deserialize)]
struct DeltaArray(Digest, u32, Digest, u32);

impl From<DeltaArray> for Delta {
    fn from(DeltaArray(base_sha256, patch_size, patch_sha256, base_size): DeltaArray) -> Self {
        Self {
            base_sha256,
            patch_size,
            patch_sha256,
            base_size,
        }
    }
}

impl From<Delta> for DeltaArray {
    fn from(d: Delta) -> Self {
        Self(d.base_sha256, d.patch_size, d.patch_sha256, d.base_size)
    }
}

/// Golden self-test vectors of the model, checked before a new image is confirmed.
/// CBOR: an array `[count, sha256]`. The vectors themselves travel with the model (they are the
/// caller's business); the digest, over `input_0 || expected_0 || input_1 || ...` in the order
/// they run, proves the device ran the signed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "GoldenArray", into = "GoldenArray")]
pub struct Golden {
    pub count: u16,
    pub sha256: Digest,
}

/// [`Golden`] as it is encoded.
#[derive(Serialize, Deserialize)]
struct GoldenArray(u16, Digest);

impl From<GoldenArray> for Golden {
    fn from(GoldenArray(count, sha256): GoldenArray) -> Self {
        Self { count, sha256 }
    }
}

impl From<Golden> for GoldenArray {
    fn from(g: Golden) -> Self {
        Self(g.count, g.sha256)
    }
}

/// An OTA manifest (`manifest` in the CDDL). Field order is the wire contract: only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest<'a> {
    pub model_id: &'a str,
    pub model_version: &'a str,
    /// Strictly increasing per model: the anti-rollback counter.
    pub seq: u32,
    /// Target hardware id (`hello.hw`).
    pub hw: &'a str,
    pub image_size: u32,
    pub image_sha256: Digest,
    /// `None`: the object is the full image.
    pub delta: Option<Delta>,
    /// For a delta, the patch's block size (its header must agree); the block size to request
    /// over MQTT in any case. 256..=4096.
    pub block_size: u16,
    /// HTTP(S) source of the object, with Range support; may be empty for MQTT-only fleets.
    pub url: &'a str,
    /// SHA-256 of what to fetch: the patch for a delta, else the image.
    pub object: Digest,
    /// Lowest firmware build number (a device's own, increasing integer) that runs the model;
    /// 0: any.
    #[serde(default)]
    pub min_fw: u32,
    /// Tensor arena the model needs, in bytes; 0: not stated.
    #[serde(default)]
    pub arena: u32,
    /// Golden self-test vectors, if the model version has some.
    #[serde(default)]
    pub golden: Option<Golden>,
}

impl Manifest<'_> {
    /// Size of the object to fetch (the patch or the image).
    pub fn object_size(&self) -> u32 {
        self.delta.map_or(self.image_size, |d| d.patch_size)
    }

    /// Checks the fields against each other (not against a device).
    pub fn check(&self) -> Result<(), OfferError> {
        let object_ok = match &self.delta {
            Some(d) => self.object == d.patch_sha256 && d.patch_size > 0,
            None => self.object == self.image_sha256,
        };
        let golden_ok = self.golden.is_none_or(|g| g.count > 0);
        if object_ok
            && golden_ok
            && self.image_size > 0
            && (MIN_BLOCK..=MAX_BLOCK).contains(&self.block_size)
        {
            Ok(())
        } else {
            Err(OfferError::Invalid)
        }
    }
}

/// Why an offer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OfferError {
    /// Not a COSE_Sign1 of the fixed form above, or longer than [`MAX_OFFER`].
    Malformed,
    /// No trusted key has the offer's key id.
    UnknownKey,
    /// The signature does not verify under the trusted key of that id.
    BadSignature,
    /// The signed payload is not a manifest.
    Manifest,
    /// The manifest's fields disagree with each other ([`Manifest::check`]).
    Invalid,
    /// The scratch buffer (or output buffer) is too small.
    BufferTooSmall,
}

impl core::fmt::Display for OfferError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OfferError::Malformed => "not a COSE_Sign1 offer of the expected form",
            OfferError::UnknownKey => "offer signed with a key id the device does not trust",
            OfferError::BadSignature => "offer signature does not verify",
            OfferError::Manifest => "signed payload is not a manifest",
            OfferError::Invalid => "manifest fields are inconsistent",
            OfferError::BufferTooSmall => "buffer too small",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for OfferError {}

/// A public key a device trusts for offers, with its key id. Both can live in flash (`const`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedKey<'a> {
    pub kid: &'a [u8],
    /// Ed25519 public key (RFC 8032 encoding).
    pub public: [u8; 32],
}

/// The recommended key id of a public key: the first 8 bytes of its SHA-256.
pub fn kid_of(public: &[u8; 32]) -> [u8; 8] {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(public);
    let mut kid = [0u8; 8];
    kid.copy_from_slice(&h[..8]);
    kid
}

/// The parts of an offer, not yet verified.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    /// The protected header's bytes (inside its bstr).
    pub protected: &'a [u8],
    pub kid: &'a [u8],
    pub payload: &'a [u8],
    pub signature: &'a [u8; SIGNATURE_LEN],
}

/// Reads a definite-length byte string with the shortest length header.
fn bstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = match b {
        [h @ 0x40..=0x57, rest @ ..] => (usize::from(h & 0x1f), rest),
        [0x58, n, rest @ ..] if *n >= 24 => (usize::from(*n), rest),
        [0x59, a, c, rest @ ..] if u16::from_be_bytes([*a, *c]) >= 256 => {
            (usize::from(u16::from_be_bytes([*a, *c])), rest)
        }
        _ => return None,
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Writes the shortest bstr header of `len` (at most 65535) into `out`; returns its length.
fn bstr_header(len: usize, out: &mut [u8]) -> Option<usize> {
    let n = match len {
        0..=23 => {
            *out.first_mut()? = 0x40 | len as u8;
            1
        }
        24..=255 => {
            out.get_mut(..2)?.copy_from_slice(&[0x58, len as u8]);
            2
        }
        256..=65535 => {
            let l = (len as u16).to_be_bytes();
            out.get_mut(..3)?.copy_from_slice(&[0x59, l[0], l[1]]);
            3
        }
        _ => return None,
    };
    Some(n)
}

/// Splits an offer of the fixed form without checking its signature.
pub fn parse_offer(bytes: &[u8]) -> Result<Offer<'_>, OfferError> {
    const M: OfferError = OfferError::Malformed;
    if bytes.len() > MAX_OFFER {
        return Err(M);
    }
    let rest = bytes.strip_prefix(&[0xd2, 0x84]).ok_or(M)?;
    let (protected, rest) = bstr(rest).ok_or(M)?;
    let (kid, tail) = bstr(
        protected
            .strip_prefix(&[0xa2, 0x01, ALG_EDDSA, 0x04])
            .ok_or(M)?,
    )
    .ok_or(M)?;
    if !tail.is_empty() || kid.is_empty() || kid.len() > MAX_KID {
        return Err(M);
    }
    let rest = rest.strip_prefix(&[0xa0]).ok_or(M)?;
    let (payload, rest) = bstr(rest).ok_or(M)?;
    let signature = rest
        .strip_prefix(&[0x58, SIGNATURE_LEN as u8])
        .and_then(|s| <&[u8; SIGNATURE_LEN]>::try_from(s).ok())
        .ok_or(M)?;
    Ok(Offer {
        protected,
        kid,
        payload,
        signature,
    })
}

/// Writes `Sig_structure = ["Signature1", protected, h'', payload]` (RFC 9052 section 4.4),
/// the bytes an offer's signature covers, into `out`; returns its length.
pub fn to_be_signed(protected: &[u8], payload: &[u8], out: &mut [u8]) -> Result<usize, OfferError> {
    const SMALL: OfferError = OfferError::BufferTooSmall;
    let mut at = 0;
    let mut put = |bytes: &[u8], out: &mut [u8]| -> Result<(), OfferError> {
        out.get_mut(at..at + bytes.len())
            .ok_or(SMALL)?
            .copy_from_slice(bytes);
        at += bytes.len();
        Ok(())
    };
    let mut hdr = [0u8; 3];
    put(b"\x84\x6aSignature1", out)?;
    let n = bstr_header(protected.len(), &mut hdr).ok_or(SMALL)?;
    put(&hdr[..n], out)?;
    put(protected, out)?;
    put(&[0x40], out)?;
    let n = bstr_header(payload.len(), &mut hdr).ok_or(SMALL)?;
    put(&hdr[..n], out)?;
    put(payload, out)?;
    Ok(at)
}

/// Ed25519 with `verify_strict`'s rules ([`super::ed25519`]): a trusted key that is not a curve
/// point is treated as unknown, every other failure is a bad signature.
fn check_signature(
    key: &TrustedKey<'_>,
    signed: &[u8],
    signature: &[u8; SIGNATURE_LEN],
) -> Result<(), OfferError> {
    super::ed25519::verify_strict(&key.public, signed, signature).map_err(|e| match e {
        super::ed25519::Error::Key => OfferError::UnknownKey,
        super::ed25519::Error::Signature => OfferError::BadSignature,
    })
}

/// Decodes and checks the manifest of an offer whose signature verified. Not inlined, so that
/// its temporaries stay out of the frames above the signature check.
#[inline(never)]
fn decode_checked(payload: &[u8]) -> Result<Manifest<'_>, OfferError> {
    let manifest = Manifest::decode(payload)?;
    manifest.check()?;
    Ok(manifest)
}

/// Verifies an offer against the trusted keys (selected by key id) and decodes its manifest.
///
/// `scratch` receives the signed bytes (`payload.len() + TBS_OVERHEAD + protected` bytes;
/// `MAX_OFFER` always suffices). The manifest borrows from `bytes`.
pub fn verify_offer<'a>(
    bytes: &'a [u8],
    trusted: &[TrustedKey<'_>],
    scratch: &mut [u8],
) -> Result<Manifest<'a>, OfferError> {
    decode_checked(signed_payload(bytes, trusted, scratch)?)
}

/// The signature check of [`verify_offer`]; returns the payload. Not inlined, like
/// [`signed_payload_in_place`].
#[inline(never)]
fn signed_payload<'a>(
    bytes: &'a [u8],
    trusted: &[TrustedKey<'_>],
    scratch: &mut [u8],
) -> Result<&'a [u8], OfferError> {
    let offer = parse_offer(bytes)?;
    let key = trusted
        .iter()
        .find(|k| k.kid == offer.kid)
        .ok_or(OfferError::UnknownKey)?;
    let n = to_be_signed(offer.protected, offer.payload, scratch)?;
    check_signature(key, &scratch[..n], offer.signature)?;
    Ok(offer.payload)
}

/// [`verify_offer`] without a scratch buffer: the signed bytes are built over the offer itself
/// (they are shorter than it: the payload moves 10 bytes up, the header bytes before it are
/// rewritten, the signature is copied out first). `buf` must be exactly the offer; its contents
/// are lost, and the manifest borrows from it.
pub fn verify_offer_in_place<'a>(
    buf: &'a mut [u8],
    trusted: &[TrustedKey<'_>],
) -> Result<Manifest<'a>, OfferError> {
    let payload = signed_payload_in_place(buf, trusted)?;
    decode_signed(buf, payload)
}

/// The manifest of an offer whose signature [`signed_payload_in_place`] checked: `payload` is
/// where it returned the payload is now in `buf`.
pub(crate) fn decode_signed(
    buf: &[u8],
    payload: core::ops::Range<usize>,
) -> Result<Manifest<'_>, OfferError> {
    decode_checked(buf.get(payload).ok_or(OfferError::Malformed)?)
}

/// The signature check of [`verify_offer_in_place`]; returns where the payload is now.
///
/// Not inlined: the signature check is the device's deepest stack (~2.3 KB below this), and
/// the manifest's decoding temporaries (several copies of a ~250-byte `Manifest`) must not sit
/// in the frames above it (`docs/benchmarks.md`, "With the OTA installer"). The offer is
/// rewritten in `sig_structure_in_place`, so that only the signature and the payload's range
/// are held here during the check.
#[inline(never)]
pub(crate) fn signed_payload_in_place(
    buf: &mut [u8],
    trusted: &[TrustedKey<'_>],
) -> Result<core::ops::Range<usize>, OfferError> {
    let mut signature = [0u8; SIGNATURE_LEN];
    let (key, payload) = sig_structure_in_place(buf, trusted, &mut signature)?;
    let key = trusted.get(key).ok_or(OfferError::UnknownKey)?;
    check_signature(key, &buf[..payload.end], &signature)?;
    Ok(payload)
}

/// The rewriting half of [`signed_payload_in_place`]: copies the signature out, rewrites `buf`
/// into the signed bytes, and returns the index of the trusted key and where the payload is.
/// Not inlined, so that its buffers are off the stack during the signature check.
#[inline(never)]
fn sig_structure_in_place(
    buf: &mut [u8],
    trusted: &[TrustedKey<'_>],
    signature_out: &mut [u8; SIGNATURE_LEN],
) -> Result<(usize, core::ops::Range<usize>), OfferError> {
    let (key, signature, protected, payload) = {
        let offer = parse_offer(buf)?;
        let key = trusted
            .iter()
            .position(|k| k.kid == offer.kid)
            .ok_or(OfferError::UnknownKey)?;
        let mut protected = [0u8; 4 + 1 + MAX_KID];
        let p = protected
            .get_mut(..offer.protected.len())
            .ok_or(OfferError::Malformed)?;
        p.copy_from_slice(offer.protected);
        // The signature (2 + 64 bytes) ends the offer; the payload is just before it.
        let at = buf.len() - 2 - SIGNATURE_LEN - offer.payload.len();
        (
            key,
            *offer.signature,
            (protected, offer.protected.len()),
            at..at + offer.payload.len(),
        )
    };
    let protected = &protected.0[..protected.1];
    // The Sig_structure's header bytes, then where its payload goes.
    let mut head = [0u8; 12 + 1 + 4 + 1 + MAX_KID + 1 + 3];
    let n = to_be_signed(protected, &[], &mut head)?;
    // `to_be_signed` wrote a zero-length payload header (0x40); the real one replaces it.
    let mut hdr = [0u8; 3];
    let h = bstr_header(payload.len(), &mut hdr).ok_or(OfferError::Malformed)?;
    let prefix = n - 1 + h;
    let end = prefix + payload.len();
    if end > buf.len() || prefix < payload.start {
        return Err(OfferError::Malformed);
    }
    // Move the payload up (backwards, it overlaps), then write the header bytes before it.
    for i in (0..payload.len()).rev() {
        buf[prefix + i] = buf[payload.start + i];
    }
    buf[..n - 1].copy_from_slice(&head[..n - 1]);
    buf[n - 1..prefix].copy_from_slice(&hdr[..h]);
    *signature_out = signature;
    Ok((key, prefix..end))
}

/// Encodes a manifest as packed CBOR into `buf` (no allocation); returns its length.
pub fn encode_manifest(
    manifest: &Manifest<'_>,
    buf: &mut [u8],
) -> Result<usize, crate::wire::WireError> {
    crate::wire::to_cbor(manifest, buf)
}

/// Builds and signs an offer (the service side).
#[cfg(feature = "std")]
pub fn sign_offer(
    manifest: &Manifest<'_>,
    key: &ed25519_dalek::SigningKey,
    kid: &[u8],
) -> Result<std::vec::Vec<u8>, OfferError> {
    use ed25519_dalek::Signer;
    use std::vec::Vec;
    if kid.is_empty() || kid.len() > MAX_KID {
        return Err(OfferError::Malformed);
    }
    manifest.check()?;
    let payload = serde_cbor::ser::to_vec_packed(manifest).map_err(|_| OfferError::Manifest)?;
    let mut protected = Vec::from([0xa2, 0x01, ALG_EDDSA, 0x04, 0x40 | kid.len() as u8]);
    protected.extend_from_slice(kid);
    let mut tbs = std::vec![0u8; payload.len() + protected.len() + TBS_OVERHEAD];
    let n = to_be_signed(&protected, &payload, &mut tbs)?;
    let signature = key.sign(&tbs[..n]).to_bytes();
    let mut out = Vec::from([0xd2, 0x84]);
    let mut hdr = [0u8; 3];
    for (i, part) in [&protected[..], &payload[..]].into_iter().enumerate() {
        let h = bstr_header(part.len(), &mut hdr).ok_or(OfferError::Malformed)?;
        out.extend_from_slice(&hdr[..h]);
        out.extend_from_slice(part);
        if i == 0 {
            out.push(0xa0);
        }
    }
    out.extend_from_slice(&[0x58, SIGNATURE_LEN as u8]);
    out.extend_from_slice(&signature);
    if out.len() > MAX_OFFER {
        return Err(OfferError::Malformed);
    }
    Ok(out)
}

// ------------------------------------------------------------------ the device's decoder

fn decode_delta(r: &mut Reader<'_>) -> Option<Delta> {
    r.array(4)?;
    Some(Delta {
        base_sha256: Digest(r.digest()?),
        patch_size: r.u32()?,
        patch_sha256: Digest(r.digest()?),
        base_size: r.u32()?,
    })
}

fn decode_golden(r: &mut Reader<'_>) -> Option<Golden> {
    r.array(2)?;
    Some(Golden {
        count: r.u16()?,
        sha256: Digest(r.digest()?),
    })
}

impl<'a> Manifest<'a> {
    /// Decodes a manifest (strict CBOR: definite lengths, keys at most once; keys it does not
    /// know are skipped). The whole slice must be the manifest.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, OfferError> {
        let mut m = Manifest {
            model_id: "",
            model_version: "",
            seq: 0,
            hw: "",
            image_size: 0,
            image_sha256: Digest::default(),
            delta: None,
            block_size: 0,
            url: "",
            object: Digest::default(),
            min_fw: 0,
            arena: 0,
            golden: None,
        };
        let mut r = Reader::new(bytes);
        let seen = r
            .fields(13, |k, r| {
                match k {
                    0 => m.model_id = r.text()?,
                    1 => m.model_version = r.text()?,
                    2 => m.seq = r.u32()?,
                    3 => m.hw = r.text()?,
                    4 => m.image_size = r.u32()?,
                    5 => m.image_sha256 = Digest(r.digest()?),
                    6 => {
                        m.delta = if r.null() {
                            None
                        } else {
                            Some(decode_delta(r)?)
                        }
                    }
                    7 => m.block_size = r.u16()?,
                    8 => m.url = r.text()?,
                    9 => m.object = Digest(r.digest()?),
                    10 => m.min_fw = r.u32()?,
                    11 => m.arena = r.u32()?,
                    _ => {
                        m.golden = if r.null() {
                            None
                        } else {
                            Some(decode_golden(r)?)
                        }
                    }
                }
                Some(())
            })
            .ok_or(OfferError::Manifest)?;
        // Keys 0..=9 are required; 10.. were appended with defaults.
        if seen & 0x3ff != 0x3ff || !r.is_empty() {
            return Err(OfferError::Manifest);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bstr_headers_are_shortest() {
        assert_eq!(bstr(&[0x41, 7]), Some((&[7u8][..], &[][..])));
        assert_eq!(bstr(&[0x58, 1, 7]), None);
        assert_eq!(bstr(&[0x59, 0, 30]), None);
        assert_eq!(bstr(&[0x42, 7]), None);
    }
}
