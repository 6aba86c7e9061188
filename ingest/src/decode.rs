//! The verify and decode stages: from `(topic, payload)` to a typed, authenticated event.
//!
//! Order matters: the size is checked before anything is parsed, the topic names the device
//! whose key is looked up, the tag is verified before the body is decoded, and decoding is
//! strict. Any failure is one [`Reject`] reason; nothing is partially accepted.

use tinyfleet_device::DeviceKey;
use tinyfleet_device::decoded::{BlockRequestOwned, DecodedSummary, HelloOwned, decode_summary};
use tinyfleet_device::wire::{self, Kind, WireError};

/// Where the verifier finds device keys (the device registry implements it).
pub trait KeyStore {
    /// The message key of an active device; `None` for unknown or revoked devices.
    fn key(&self, device_id: &str) -> Option<DeviceKey>;
}

impl<S: std::hash::BuildHasher> KeyStore for std::collections::HashMap<String, DeviceKey, S> {
    fn key(&self, device_id: &str) -> Option<DeviceKey> {
        self.get(device_id).cloned()
    }
}

/// A verified, decoded device message.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceMessage {
    Hello(HelloOwned),
    Will(wire::Will),
    Summary(Box<DecodedSummary>),
    Progress(wire::Progress),
    BlockRequest(BlockRequestOwned),
}

impl DeviceMessage {
    /// The message's kind (and so its sequence-number space).
    pub fn kind(&self) -> Kind {
        match self {
            DeviceMessage::Hello(_) => Kind::Hello,
            DeviceMessage::Will(_) => Kind::Will,
            DeviceMessage::Summary(_) => Kind::Summary,
            DeviceMessage::Progress(_) => Kind::Progress,
            DeviceMessage::BlockRequest(_) => Kind::BlockRequest,
        }
    }

    /// `(boot, seq)` of the message.
    pub fn boot_seq(&self) -> (u32, u32) {
        match self {
            DeviceMessage::Hello(h) => (h.boot, h.seq),
            DeviceMessage::Will(w) => (w.boot, w.seq),
            DeviceMessage::Summary(s) => (s.boot, s.seq),
            DeviceMessage::Progress(p) => (p.boot, p.seq),
            DeviceMessage::BlockRequest(r) => (r.boot, r.seq),
        }
    }
}

/// Why a message was rejected. Each is a counter label (never a device id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Not `tf/v1/{device}/{kind}` with a known kind.
    BadTopic,
    /// A cloud->device kind published by someone else.
    WrongDirection,
    /// Larger than the configured maximum.
    Oversized,
    /// The device is not registered, or revoked.
    UnknownDevice,
    /// Not a COSE_Mac0 envelope of the protocol's form.
    Malformed,
    /// The tag does not verify: forged, corrupted, or sent on another device's topic.
    Forged,
    /// The body is not the CBOR of the topic's message type.
    BadBody,
    /// A dimension, length or count is out of range or inconsistent.
    OutOfRange,
}

impl Reject {
    pub const ALL: [Reject; 8] = [
        Reject::BadTopic,
        Reject::WrongDirection,
        Reject::Oversized,
        Reject::UnknownDevice,
        Reject::Malformed,
        Reject::Forged,
        Reject::BadBody,
        Reject::OutOfRange,
    ];

    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::BadTopic => "bad_topic",
            Reject::WrongDirection => "wrong_direction",
            Reject::Oversized => "oversized",
            Reject::UnknownDevice => "unknown_device",
            Reject::Malformed => "malformed",
            Reject::Forged => "forged",
            Reject::BadBody => "bad_body",
            Reject::OutOfRange => "out_of_range",
        }
    }
}

impl From<WireError> for Reject {
    fn from(e: WireError) -> Self {
        use tinyfleet_device::cose::CoseError;
        match e {
            WireError::Cose(CoseError::BadTag) => Reject::Forged,
            WireError::Cose(_) | WireError::BufferTooSmall => Reject::Malformed,
            WireError::Cbor | WireError::Counts(_) => Reject::BadBody,
            WireError::OutOfRange | WireError::Inconsistent => Reject::OutOfRange,
            WireError::BadDeviceId => Reject::BadTopic,
        }
    }
}

/// Verifies and decodes device messages.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_payload: usize,
}

/// The default largest payload: a summary of the largest shape the protocol allows stays far
/// below it, and it bounds the work an attacker can cause per message.
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * 1024;

impl Default for Decoder {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl Decoder {
    pub fn new(max_payload: usize) -> Self {
        Self { max_payload }
    }

    /// Verifies `payload` received on `topic` and decodes it. Returns the device id and the
    /// message.
    pub fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        keys: &impl KeyStore,
    ) -> Result<(String, DeviceMessage), Reject> {
        let (device, kind) = wire::parse_topic(topic).ok_or(Reject::BadTopic)?;
        if !kind.from_device() {
            return Err(Reject::WrongDirection);
        }
        if payload.len() > self.max_payload {
            return Err(Reject::Oversized);
        }
        let key = keys.key(device.as_str()).ok_or(Reject::UnknownDevice)?;
        let body = wire::open(topic, &key, payload)?;
        let msg = match kind {
            Kind::Hello => {
                DeviceMessage::Hello(HelloOwned::from(&wire::from_cbor::<wire::Hello<'_>>(body)?))
            }
            Kind::Will => DeviceMessage::Will(wire::from_cbor(body)?),
            Kind::Summary => DeviceMessage::Summary(Box::new(decode_summary(body)?)),
            Kind::Progress => DeviceMessage::Progress(wire::from_cbor(body)?),
            Kind::BlockRequest => {
                DeviceMessage::BlockRequest(BlockRequestOwned::try_from(&wire::from_cbor::<
                    wire::BlockRequest<'_>,
                >(body)?)?)
            }
            Kind::Offer | Kind::Block => return Err(Reject::WrongDirection),
        };
        Ok((device.as_str().to_owned(), msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tinyfleet_device::ReferenceMonitor;
    use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
    use tinyfleet_device::wire::{DeviceId, Topic};

    fn keys() -> HashMap<String, DeviceKey> {
        HashMap::from([
            ("a".to_owned(), DeviceKey([1; 32])),
            ("b".to_owned(), DeviceKey([2; 32])),
        ])
    }

    fn summary_of(device: &str, key: &DeviceKey) -> Vec<u8> {
        let profile = ReferenceProfile::default();
        let mut m = ReferenceMonitor::new(profile.config(1), 1, 0, 0);
        let mut rng = Rng::new(5);
        for _ in 0..20 {
            m.record(&sample(&mut rng, &StreamParams::default()).inference())
                .unwrap();
        }
        let mut out = [0u8; 512];
        let n = m
            .finish_window(1000, None, DeviceId::new(device).unwrap(), key, &mut out)
            .unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn accepts_a_valid_summary() {
        let bytes = summary_of("a", &DeviceKey([1; 32]));
        let (dev, msg) = Decoder::default()
            .decode("tf/v1/a/sum", &bytes, &keys())
            .unwrap();
        assert_eq!(dev, "a");
        assert_eq!(msg.kind(), Kind::Summary);
        assert_eq!(msg.boot_seq(), (1, 0));
    }

    #[test]
    fn each_failure_has_its_reason() {
        let d = Decoder::default();
        let ks = keys();
        let a = summary_of("a", &DeviceKey([1; 32]));
        assert_eq!(d.decode("tf/v1/a/nope", &a, &ks), Err(Reject::BadTopic));
        assert_eq!(d.decode("other/a/sum", &a, &ks), Err(Reject::BadTopic));
        assert_eq!(
            d.decode("tf/v1/a/ota/offer", &a, &ks),
            Err(Reject::WrongDirection)
        );
        assert_eq!(
            d.decode("tf/v1/zz/sum", &a, &ks),
            Err(Reject::UnknownDevice)
        );
        // Device a's summary republished on device b's topic.
        assert_eq!(d.decode("tf/v1/b/sum", &a, &ks), Err(Reject::Forged));
        // Device a signing as b with its own key.
        let forged = summary_of("b", &DeviceKey([1; 32]));
        assert_eq!(d.decode("tf/v1/b/sum", &forged, &ks), Err(Reject::Forged));
        // A summary on the hello topic.
        assert_eq!(d.decode("tf/v1/a/hello", &a, &ks), Err(Reject::Forged));
        assert_eq!(
            d.decode("tf/v1/a/sum", &a[..10], &ks),
            Err(Reject::Malformed)
        );
        assert_eq!(
            Decoder::new(64).decode("tf/v1/a/sum", &a, &ks),
            Err(Reject::Oversized)
        );
    }

    #[test]
    fn authenticated_garbage_is_a_bad_body() {
        let key = DeviceKey([1; 32]);
        let id = DeviceId::new("a").unwrap();
        let mut out = [0u8; 64];
        // A valid tag over a hello body, sent as a summary.
        let hello = wire::Will { boot: 1, seq: 1 };
        let n = wire::seal(id, &key, Kind::Summary, &hello, &mut out).unwrap();
        let topic = Topic::new(id, Kind::Summary);
        assert_eq!(
            Decoder::default().decode(topic.as_str(), &out[..n], &keys()),
            Err(Reject::BadBody)
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = Decoder::default().decode("tf/v1/a/sum", &bytes, &keys());
        }
    }
}
