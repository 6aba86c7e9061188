//! COSE_Mac0 (RFC 9052 section 6.2) envelopes for every device->cloud message.
//!
//! The broker cannot stop a device from publishing on another device's topics, so each message
//! authenticates itself: `HMAC 256/64` (COSE algorithm 4: HMAC-SHA256 truncated to 8 bytes) under
//! the sending device's 32-byte key, with the MQTT topic as external AAD. A message is therefore
//! bound to its device *and* its kind: a valid hello replayed on the summary topic, or device A's
//! summary republished on device B's topic, fails verification.
//!
//! The encoding is fixed so that small devices can write it without a CBOR library and so that
//! verification never has to parse attacker-controlled headers:
//!
//! ```text
//! d1                 tag 17 (COSE_Mac0)
//! 84                 array(4)
//! 43 a1 01 04        protected: bstr .cbor {1: 4}   (alg: HMAC 256/64)
//! a0                 unprotected: {}
//! 4x / 58 xx / 59 xxxx  payload: bstr (the message, CBOR)
//! 48 <8 bytes>       tag
//! ```
//!
//! Nothing here allocates; sealing writes into a caller buffer and reports a too-small buffer as
//! an error.

use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes before the payload's bstr header: tag 17, array(4), protected, unprotected.
pub const PREFIX: [u8; 7] = [0xd1, 0x84, 0x43, 0xa1, 0x01, 0x04, 0xa0];
/// The protected header map `{1: 4}` (alg = HMAC 256/64), as it appears inside its bstr.
pub const PROTECTED: [u8; 3] = [0xa1, 0x01, 0x04];
/// Length of the truncated HMAC tag.
pub const TAG_LEN: usize = 8;
/// Bytes an envelope adds around a payload of up to 255 bytes (prefix, 2-byte bstr header,
/// tag bstr). Payloads of 256..=65535 bytes take one more.
pub const OVERHEAD: usize = PREFIX.len() + 2 + 1 + TAG_LEN;
/// Largest payload an envelope carries (3-byte bstr header).
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// A device's 32-byte message authentication key. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(pub [u8; 32]);

impl core::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

/// Why an envelope could not be written or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CoseError {
    /// The output buffer cannot hold the envelope.
    BufferTooSmall,
    /// The payload is larger than [`MAX_PAYLOAD`].
    PayloadTooLarge,
    /// The bytes are not a COSE_Mac0 envelope of the fixed form above.
    Malformed,
    /// The tag does not verify under this key and topic.
    BadTag,
}

/// Writes the CBOR header of a byte string of `len` bytes; returns its length.
fn bstr_header(len: usize, out: &mut [u8; 3]) -> usize {
    match len {
        0..=23 => {
            out[0] = 0x40 | len as u8;
            1
        }
        24..=255 => {
            out[0] = 0x58;
            out[1] = len as u8;
            2
        }
        _ => {
            out[0] = 0x59;
            out[1..3].copy_from_slice(&(len as u16).to_be_bytes());
            3
        }
    }
}

/// The MAC over `MAC_structure = ["MAC0", protected, external_aad, payload]`, fed piecewise so
/// that the AAD (the topic) can be given in parts without a buffer.
fn tag(key: &DeviceKey, aad: &[&[u8]], payload: &[u8]) -> HmacSha256 {
    // HMAC zero-pads a key shorter than the hash block; doing it here uses the infallible
    // fixed-size constructor.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(&key.0);
    let mut mac = HmacSha256::new(&block.into());
    // array(4), text(4) "MAC0", protected as bstr
    mac.update(&[0x84, 0x64, b'M', b'A', b'C', b'0', 0x43]);
    mac.update(&PROTECTED);
    let mut hdr = [0u8; 3];
    let aad_len: usize = aad.iter().map(|p| p.len()).sum();
    let n = bstr_header(aad_len, &mut hdr);
    mac.update(&hdr[..n]);
    for part in aad {
        mac.update(part);
    }
    let n = bstr_header(payload.len(), &mut hdr);
    mac.update(&hdr[..n]);
    mac.update(payload);
    mac
}

/// Wraps a payload into a COSE_Mac0 envelope in `out`.
///
/// `write_payload` gets the free part of `out` and returns how many bytes of payload it wrote
/// (or an error, passed through). The envelope is built in place: no copy of the message exists
/// outside `out`. Returns the envelope's length.
pub fn seal<E: From<CoseError>>(
    key: &DeviceKey,
    aad: &[&[u8]],
    out: &mut [u8],
    write_payload: impl FnOnce(&mut [u8]) -> Result<usize, E>,
) -> Result<usize, E> {
    // Reserve the largest payload header; close the gap afterwards.
    let body_at = PREFIX.len() + 3;
    if out.len() < body_at + 1 + TAG_LEN {
        return Err(CoseError::BufferTooSmall.into());
    }
    let room = out.len() - body_at - 1 - TAG_LEN;
    let len = write_payload(&mut out[body_at..body_at + room])?;
    if len > room {
        return Err(CoseError::BufferTooSmall.into());
    }
    if len > MAX_PAYLOAD {
        return Err(CoseError::PayloadTooLarge.into());
    }
    out[..PREFIX.len()].copy_from_slice(&PREFIX);
    let mut hdr = [0u8; 3];
    let hlen = bstr_header(len, &mut hdr);
    let payload_at = PREFIX.len() + hlen;
    out[PREFIX.len()..payload_at].copy_from_slice(&hdr[..hlen]);
    // Close the gap of at most 2 bytes left by the reserved header. A forward byte loop instead
    // of `copy_within`: it is correct for this overlap and keeps `memmove` (1.5 KB of flash on
    // Cortex-M) out of the firmware.
    for i in 0..len {
        out[payload_at + i] = out[body_at + i];
    }
    let end = payload_at + len;
    let mac = tag(key, aad, &out[payload_at..end]).finalize().into_bytes();
    out[end] = 0x40 | TAG_LEN as u8;
    out[end + 1..end + 1 + TAG_LEN].copy_from_slice(&mac[..TAG_LEN]);
    Ok(end + 1 + TAG_LEN)
}

/// The parts of an envelope, not yet verified.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub payload: &'a [u8],
    pub tag: &'a [u8],
}

/// Splits an envelope of the fixed form without checking its tag.
pub fn parse(bytes: &[u8]) -> Result<Envelope<'_>, CoseError> {
    let rest = bytes
        .strip_prefix(&PREFIX[..])
        .ok_or(CoseError::Malformed)?;
    let (len, rest) = match rest {
        [h @ 0x40..=0x57, rest @ ..] => (usize::from(h & 0x1f), rest),
        [0x58, n, rest @ ..] if *n >= 24 => (usize::from(*n), rest),
        [0x59, a, b, rest @ ..] if u16::from_be_bytes([*a, *b]) >= 256 => {
            (usize::from(u16::from_be_bytes([*a, *b])), rest)
        }
        _ => return Err(CoseError::Malformed),
    };
    if rest.len() != len + 1 + TAG_LEN || rest[len] != 0x40 | TAG_LEN as u8 {
        return Err(CoseError::Malformed);
    }
    Ok(Envelope {
        payload: &rest[..len],
        tag: &rest[len + 1..],
    })
}

/// Verifies an envelope under `key` with the topic as external AAD; returns the payload.
/// The tag comparison is constant-time.
pub fn open<'a>(key: &DeviceKey, aad: &[&[u8]], bytes: &'a [u8]) -> Result<&'a [u8], CoseError> {
    let env = parse(bytes)?;
    tag(key, aad, env.payload)
        .verify_truncated_left(env.tag)
        .map_err(|_| CoseError::BadTag)?;
    Ok(env.payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: DeviceKey = DeviceKey([7; 32]);

    fn sealed(payload: &[u8], topic: &str) -> std::vec::Vec<u8> {
        let mut out = [0u8; 70_000];
        let n = seal::<CoseError>(&KEY, &[topic.as_bytes()], &mut out, |buf| {
            buf[..payload.len()].copy_from_slice(payload);
            Ok(payload.len())
        })
        .unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn roundtrip_every_header_size() {
        for len in [0, 1, 23, 24, 255, 256, 1000, 65535] {
            let payload: std::vec::Vec<u8> = (0..len).map(|i| i as u8).collect();
            let env = sealed(&payload, "tf/v1/d1/sum");
            assert_eq!(open(&KEY, &[b"tf/v1/d1/sum"], &env).unwrap(), &payload[..]);
        }
    }

    #[test]
    fn aad_in_parts_equals_whole() {
        let env = sealed(b"\xa0", "tf/v1/dev-7/sum");
        assert!(open(&KEY, &[b"tf/v1/", b"dev-7", b"/sum"], &env).is_ok());
        assert_eq!(
            open(&KEY, &[b"tf/v1/dev-8/sum"], &env),
            Err(CoseError::BadTag)
        );
        assert_eq!(
            open(&KEY, &[b"tf/v1/dev-7/hello"], &env),
            Err(CoseError::BadTag)
        );
        assert_eq!(
            open(&DeviceKey([8; 32]), &[b"tf/v1/dev-7/sum"], &env),
            Err(CoseError::BadTag)
        );
    }

    #[test]
    fn small_buffers_are_errors() {
        for size in 0..20 {
            let mut out = std::vec![0u8; size];
            let r = seal::<CoseError>(&KEY, &[], &mut out, |buf| {
                if buf.len() < 4 {
                    return Err(CoseError::BufferTooSmall);
                }
                Ok(4)
            });
            assert_eq!(r.is_ok(), size >= 4 + OVERHEAD, "size {size}");
        }
    }

    #[test]
    fn interoperates_with_coset() {
        use coset::{CborSerializable, CoseMac0, TaggedCborSerializable};
        let env = sealed(b"\xa1\x00\x01", "tf/v1/x/sum");
        let parsed = CoseMac0::from_tagged_slice(&env).unwrap();
        assert_eq!(
            parsed.protected.header.alg,
            Some(coset::RegisteredLabelWithPrivate::Assigned(
                coset::iana::Algorithm::HMAC_256_64
            ))
        );
        parsed
            .verify_payload_tag(
                b"tf/v1/x/sum",
                || "no payload",
                |tag, data| {
                    let mut mac = HmacSha256::new_from_slice(&KEY.0).unwrap();
                    mac.update(data);
                    mac.verify_truncated_left(tag).map_err(|_| "bad tag")
                },
            )
            .unwrap();
        // And an envelope coset builds is accepted by `open`.
        let built = coset::CoseMac0Builder::new()
            .protected(
                coset::HeaderBuilder::new()
                    .algorithm(coset::iana::Algorithm::HMAC_256_64)
                    .build(),
            )
            .payload(b"\xa0".to_vec())
            .create_tag(b"tf/v1/x/hello", |data| {
                let mut mac = HmacSha256::new_from_slice(&KEY.0).unwrap();
                mac.update(data);
                mac.finalize().into_bytes()[..TAG_LEN].to_vec()
            })
            .build();
        let bytes = built.to_tagged_vec().unwrap();
        assert_eq!(open(&KEY, &[b"tf/v1/x/hello"], &bytes).unwrap(), b"\xa0");
        let _ = parsed.to_vec();
    }

    #[test]
    fn key_never_printed() {
        assert_eq!(std::format!("{KEY:?}"), "DeviceKey(<redacted>)");
    }

    proptest! {
        #[test]
        fn any_flipped_byte_fails(payload in proptest::collection::vec(any::<u8>(), 0..300),
                                  pos in any::<proptest::sample::Index>(),
                                  bit in 0u8..8) {
            let mut env = sealed(&payload, "tf/v1/p/sum");
            let i = pos.index(env.len());
            env[i] ^= 1 << bit;
            prop_assert!(open(&KEY, &[b"tf/v1/p/sum"], &env).is_err());
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = open(&KEY, &[b"t"], &bytes);
        }
    }
}
