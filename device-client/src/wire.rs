//! Protocol v1: topics and message types, the only place a message layout is defined.
//!
//! Every message body is CBOR written by serde_cbor in *packed* form: a struct is a map whose keys
//! are the fields' positions (0, 1, 2, ...) in declaration order. **Field order is the wire
//! contract**: fields are only ever appended (with `#[serde(default)]`), never reordered or
//! removed. Decoders ignore keys they do not know, so old backends accept newer devices.
//! `docs/protocol.md` holds the CDDL of each message; a test checks the two agree.
//!
//! Device->cloud messages travel inside a COSE_Mac0 envelope ([`crate::cose`]) whose external AAD
//! is the topic. Each carries `(boot, seq)`: `boot` is a counter the device persists and
//! increments at every boot, `seq` counts that kind of message from 0 within a boot. The cloud
//! orders events by `(boot, seq)`, drops replays and duplicates, and sees gaps (lost summaries).

use serde::{Deserialize, Serialize};

use crate::cose::{self, CoseError, DeviceKey};

/// Every topic starts with this prefix; a protocol v2 would live beside it.
pub const TOPIC_PREFIX: &str = "tf/v1/";
/// Longest device id.
pub const MAX_DEVICE_ID: usize = 64;
/// Longest topic: prefix, device id, longest suffix.
pub const MAX_TOPIC: usize = TOPIC_PREFIX.len() + MAX_DEVICE_ID + 9;

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum WireError {
    /// The caller's buffer cannot hold the message.
    BufferTooSmall,
    /// The envelope is malformed or does not verify.
    Cose(CoseError),
    /// The CBOR body does not match the message type.
    Cbor,
    /// The `counts` bitstream is malformed.
    Counts(crate::counts::CountsError),
    /// A dimension or length is out of the protocol's range.
    OutOfRange,
    /// The histograms of a summary disagree on how many inferences the window held.
    Inconsistent,
    /// A device id is empty, too long, or has characters other than `A-Z a-z 0-9 . _ -`.
    BadDeviceId,
}

impl From<CoseError> for WireError {
    fn from(e: CoseError) -> Self {
        match e {
            CoseError::BufferTooSmall => WireError::BufferTooSmall,
            e => WireError::Cose(e),
        }
    }
}

impl core::fmt::Display for WireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WireError::BufferTooSmall => f.write_str("output buffer too small for the message"),
            WireError::Cose(CoseError::BadTag) => {
                f.write_str("authentication tag does not verify for this device and topic")
            }
            WireError::Cose(e) => write!(f, "not a protocol v1 COSE_Mac0 envelope ({e:?})"),
            WireError::Cbor => f.write_str("CBOR body does not match the message type"),
            WireError::Counts(e) => write!(f, "malformed counts bitstream ({e:?})"),
            WireError::OutOfRange => f.write_str("a dimension or length is out of range"),
            WireError::Inconsistent => {
                f.write_str("summary histograms disagree on the number of inferences")
            }
            WireError::BadDeviceId => f.write_str(
                "device id must be 1-64 characters of A-Z a-z 0-9 . _ - (no MQTT wildcards)",
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for WireError {}

/// A validated device id: 1 to 64 of `A-Z a-z 0-9 . _ -`, so it is always one topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceId<'a>(&'a str);

impl<'a> DeviceId<'a> {
    pub fn new(id: &'a str) -> Result<Self, WireError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_DEVICE_ID
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(id))
        } else {
            Err(WireError::BadDeviceId)
        }
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// The kinds of message, one topic each under `tf/v1/{device}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Birth certificate, device->cloud, QoS 1, retained.
    Hello,
    /// Last will (registered at CONNECT), device->cloud via the broker, QoS 1, retained.
    Will,
    /// Monitoring summary, device->cloud, QoS 1.
    Summary,
    /// Signed OTA manifest, cloud->device, QoS 1, retained.
    Offer,
    /// OTA progress report, device->cloud, QoS 1.
    Progress,
    /// Request for one block of an OTA object, device->cloud, QoS 1.
    BlockRequest,
    /// One block of an OTA object, cloud->device, QoS 1.
    Block,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Hello,
        Kind::Will,
        Kind::Summary,
        Kind::Offer,
        Kind::Progress,
        Kind::BlockRequest,
        Kind::Block,
    ];

    /// The topic level(s) after the device id.
    pub const fn suffix(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Will => "will",
            Kind::Summary => "sum",
            Kind::Offer => "ota/offer",
            Kind::Progress => "ota/prog",
            Kind::BlockRequest => "ota/breq",
            Kind::Block => "ota/blk",
        }
    }

    /// True for messages a device sends (and authenticates).
    pub const fn from_device(self) -> bool {
        !matches!(self, Kind::Offer | Kind::Block)
    }

    /// MQTT QoS of the kind (all are QoS 1: at least once, deduplicated by `(boot, seq)`).
    pub const fn qos(self) -> u8 {
        1
    }

    /// Whether the message is published retained.
    pub const fn retain(self) -> bool {
        matches!(self, Kind::Hello | Kind::Will | Kind::Offer)
    }

    pub fn from_suffix(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.suffix() == s)
    }
}

/// Splits `tf/v1/{device}/{suffix}` into the device id and the kind.
pub fn parse_topic(topic: &str) -> Option<(DeviceId<'_>, Kind)> {
    let rest = topic.strip_prefix(TOPIC_PREFIX)?;
    let (id, suffix) = rest.split_once('/')?;
    Some((DeviceId::new(id).ok()?, Kind::from_suffix(suffix)?))
}

/// A topic written into a fixed buffer (no allocation).
#[derive(Debug, Clone, Copy)]
pub struct Topic {
    buf: [u8; MAX_TOPIC],
    len: usize,
}

impl Topic {
    pub fn new(device: DeviceId<'_>, kind: Kind) -> Self {
        let mut buf = [0u8; MAX_TOPIC];
        let mut len = 0;
        for part in [TOPIC_PREFIX, device.as_str(), "/", kind.suffix()] {
            buf[len..len + part.len()].copy_from_slice(part.as_bytes());
            len += part.len();
        }
        Self { buf, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Built only from ASCII parts.
        core::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

/// Device capabilities announced in [`Hello::caps`] (bit flags).
pub mod caps {
    /// Can download OTA objects over HTTP(S) with Range requests.
    pub const HTTP_DOWNLOAD: u32 = 1 << 0;
    /// Can fetch OTA objects by MQTT block transfer.
    pub const MQTT_BLOCKS: u32 = 1 << 1;
    /// Can apply delta patches.
    pub const DELTA: u32 = 1 << 2;
    /// Sometimes learns ground-truth labels (sends confusion counts).
    pub const LABELS: u32 = 1 << 3;
    /// Has a real-time clock (fills `unix_s` fields).
    pub const RTC: u32 = 1 << 4;
}

/// Birth certificate, sent after every CONNECT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello<'a> {
    pub boot: u32,
    pub seq: u32,
    /// Firmware version string.
    pub fw: &'a str,
    /// Deployed model id and version string.
    pub model_id: &'a str,
    pub model_version: &'a str,
    /// Sequence number of the deployed model version (anti-rollback counter; also names the
    /// monitoring profile whose bin edges the summaries use).
    pub model_seq: u32,
    /// Hardware id (board / MCU family), the OTA target.
    pub hw: &'a str,
    /// [`caps`] bit flags.
    pub caps: u32,
    /// Why the device last reset ([`reset`] codes).
    pub reset: u8,
    /// Unix time in seconds when sent, if the device has a clock.
    pub unix_s: Option<u64>,
}

/// Last will: published by the broker when the device's connection dies. `(boot, seq)` equal
/// those of the hello sent on the same connection, so a will only ever ends the connection it
/// was registered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Will {
    pub boot: u32,
    pub seq: u32,
}

/// Reset-reason codes ([`Hello::reset`], [`Health::reset`]).
pub mod reset {
    pub const UNKNOWN: u8 = 0;
    pub const POWER_ON: u8 = 1;
    pub const PIN: u8 = 2;
    pub const BROWN_OUT: u8 = 3;
    pub const WATCHDOG: u8 = 4;
    pub const SOFTWARE: u8 = 5;
    pub const FAULT: u8 = 6;
    /// The bootloader reverted an unconfirmed OTA image.
    pub const OTA_REVERT: u8 = 7;
}

/// Dimensions of a summary: they tell a decoder how to read `counts` and `moments`.
/// Encoded as an array `[features, bins, classes, conf_bins, latency_bins, labelled]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape(pub u8, pub u8, pub u8, pub u8, pub u8, pub bool);

impl Shape {
    pub fn features(&self) -> usize {
        usize::from(self.0)
    }
    pub fn bins(&self) -> usize {
        usize::from(self.1)
    }
    pub fn classes(&self) -> usize {
        usize::from(self.2)
    }
    pub fn conf_bins(&self) -> usize {
        usize::from(self.3)
    }
    pub fn latency_bins(&self) -> usize {
        usize::from(self.4)
    }
    pub fn labelled(&self) -> bool {
        self.5
    }
}

/// Device health at the end of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "std", derive(Hash))]
pub struct Health {
    /// Why the device last reset ([`reset`] codes).
    pub reset: u8,
    /// Battery voltage in millivolts, if measured.
    pub battery_mv: Option<u16>,
    /// Lowest free heap/arena bytes seen in the window, if measured.
    pub min_free_heap: Option<u32>,
    /// Radio signal strength in dBm, if known.
    pub rssi_dbm: Option<i8>,
    /// Summaries this boot that could not be sent and were dropped (cumulative).
    pub dropped: u32,
}

/// A monitoring summary of one window of inferences.
///
/// `M` is how the moments are held: a borrowing serializer on the device, `Vec<f32>` when
/// decoding. `moments` holds, per feature, the mean and the standard deviation of its finite
/// values, both *normalised* by the feature's profile range: `(mean - lo) / (hi - lo)` and
/// `sd / (hi - lo)`, rounded to half precision (serde_cbor then writes each in 3 bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary<'a, M> {
    pub boot: u32,
    /// Summary sequence number within the boot.
    pub seq: u32,
    /// Sequence number of the model version whose monitoring profile gave the bin edges.
    pub profile: u32,
    /// Device uptime in milliseconds at the end of the window.
    pub t_end_ms: u64,
    /// Length of the window in milliseconds.
    pub span_ms: u32,
    /// Unix time in seconds at the end of the window, if the device has a clock.
    pub unix_s: Option<u64>,
    pub shape: Shape,
    /// Every histogram, packed ([`crate::counts`]); see [`counts_layout`].
    #[serde(borrow, with = "serde_bytes")]
    pub counts: &'a [u8],
    pub moments: M,
    pub health: Health,
}

/// OTA install states reported in [`Progress::state`].
pub mod ota_state {
    /// Manifest verified and accepted; download about to start.
    pub const ACCEPTED: u8 = 1;
    pub const DOWNLOADING: u8 = 2;
    /// The new image is complete in the inactive slot and its digest matches.
    pub const VERIFIED: u8 = 3;
    /// Rebooting into the new image in test mode.
    pub const SWITCHING: u8 = 4;
    /// Self-test passed; the new image is permanent.
    pub const CONFIRMED: u8 = 5;
    /// Install failed (see `error`); the old image keeps running.
    pub const FAILED: u8 = 6;
    /// The new image did not confirm and the old one was restored.
    pub const REVERTED: u8 = 7;
    /// The manifest was refused (signature, hardware, anti-rollback, base digest).
    pub const REJECTED: u8 = 8;
}

/// OTA progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub boot: u32,
    pub seq: u32,
    /// Sequence number of the manifest this report is about.
    pub manifest_seq: u32,
    /// An [`ota_state`] code.
    pub state: u8,
    /// Bytes of the OTA object received so far.
    pub bytes: u32,
    /// Device-specific error code, 0 when none.
    pub error: u16,
}

/// Request for one block of an OTA object (patch or image) named by its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRequest<'a> {
    pub boot: u32,
    pub seq: u32,
    #[serde(borrow, with = "serde_bytes")]
    pub object: &'a [u8],
    pub offset: u32,
    pub len: u16,
}

/// One block of an OTA object. Not authenticated itself: the device checks the object's
/// SHA-256, signed in the manifest, before using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block<'a> {
    #[serde(borrow, with = "serde_bytes")]
    pub object: &'a [u8],
    pub offset: u32,
    /// Size of the whole object.
    pub total: u32,
    #[serde(borrow, with = "serde_bytes")]
    pub data: &'a [u8],
}

/// Writes `value` as packed CBOR into `buf`; returns the length.
pub fn to_cbor<T: Serialize + ?Sized>(value: &T, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut ser =
        serde_cbor::Serializer::new(serde_cbor::ser::SliceWrite::new(buf)).packed_format();
    match value.serialize(&mut ser) {
        Ok(()) => Ok(ser.into_inner().bytes_written()),
        Err(e) if e.is_scratch_too_small() => Err(WireError::BufferTooSmall),
        Err(_) => Err(WireError::Cbor),
    }
}

/// Reads a CBOR body. The whole slice must be one value.
pub fn from_cbor<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    let mut scratch = [0u8; 0];
    serde_cbor::de::from_slice_with_scratch(bytes, &mut scratch).map_err(|_| WireError::Cbor)
}

/// Seals a device->cloud message for `device` into `out`; returns the envelope's length.
pub fn seal<T: Serialize + ?Sized>(
    device: DeviceId<'_>,
    key: &DeviceKey,
    kind: Kind,
    msg: &T,
    out: &mut [u8],
) -> Result<usize, WireError> {
    let topic = Topic::new(device, kind);
    cose::seal(key, &[topic.as_bytes()], out, |buf| to_cbor(msg, buf))
}

/// Verifies a device->cloud envelope received on `topic` and returns its CBOR body.
pub fn open<'a>(topic: &str, key: &DeviceKey, bytes: &'a [u8]) -> Result<&'a [u8], WireError> {
    Ok(cose::open(key, &[topic.as_bytes()], bytes)?)
}

/// Largest dimensions a decoder accepts (summaries beyond them are out of range).
pub mod limits {
    pub const MAX_FEATURES: usize = 64;
    pub const MAX_BINS: usize = 64;
    pub const MAX_CLASSES: usize = 64;
    pub const MAX_CONF_BINS: usize = 32;
    pub const MAX_LATENCY_BINS: usize = 32;
    pub const MAX_BLOCK: usize = 4096;
}

/// The vectors of the `counts` bitstream for `shape`, in order, as lengths:
/// one per feature (`bins + 3`: bins, underflow, overflow, NaN), the confidence histogram
/// (`classes x conf_bins`, row = predicted class; its row sums are the predicted-class
/// histogram, which is therefore not sent again),
/// latency (`latency_bins + 3`), and, if labelled, confusion (`classes x classes`, row = true
/// label, column = predicted class).
pub fn counts_layout(shape: &Shape) -> impl Iterator<Item = usize> {
    let feature = shape.bins() + 3;
    let c = shape.classes();
    core::iter::repeat_n(feature, shape.features())
        .chain([c * shape.conf_bins(), shape.latency_bins() + 3])
        .chain(shape.labelled().then_some(c * c))
}

impl Shape {
    /// Checks the dimensions against [`limits`].
    pub fn check(&self) -> Result<(), WireError> {
        use limits::*;
        let ok = self.features() <= MAX_FEATURES
            && (1..=MAX_BINS).contains(&self.bins())
            && (1..=MAX_CLASSES).contains(&self.classes())
            && (1..=MAX_CONF_BINS).contains(&self.conf_bins())
            && (1..=MAX_LATENCY_BINS).contains(&self.latency_bins());
        if ok {
            Ok(())
        } else {
            Err(WireError::OutOfRange)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_roundtrip() {
        let id = DeviceId::new("dev-01.a_b").unwrap();
        for kind in Kind::ALL {
            let t = Topic::new(id, kind);
            assert_eq!(parse_topic(t.as_str()), Some((id, kind)));
        }
        assert_eq!(
            Topic::new(id, Kind::Summary).as_str(),
            "tf/v1/dev-01.a_b/sum"
        );
        let longest = "x".repeat(MAX_DEVICE_ID);
        let t = Topic::new(DeviceId::new(&longest).unwrap(), Kind::BlockRequest);
        assert_eq!(t.as_str().len(), MAX_TOPIC);
    }

    #[test]
    fn device_ids_are_one_level() {
        for bad in ["", "a/b", "a+", "#", "ü", &"x".repeat(65), "a b"] {
            assert_eq!(DeviceId::new(bad), Err(WireError::BadDeviceId), "{bad}");
        }
        assert_eq!(parse_topic("tf/v1/a/b/sum"), None);
        assert_eq!(parse_topic("tf/v2/a/sum"), None);
        assert_eq!(parse_topic("tf/v1/a/nope"), None);
    }

    #[test]
    fn packed_keys_are_field_positions() {
        let mut buf = [0u8; 16];
        let n = to_cbor(&Will { boot: 3, seq: 24 }, &mut buf).unwrap();
        // {0: 3, 1: 24}
        assert_eq!(&buf[..n], &[0xa2, 0x00, 0x03, 0x01, 0x18, 0x18]);
        assert_eq!(
            from_cbor::<Will>(&buf[..n]).unwrap(),
            Will { boot: 3, seq: 24 }
        );
    }

    #[test]
    fn unknown_appended_fields_are_ignored() {
        // {0: 3, 1: 4, 2: "future"}
        let bytes = [
            0xa3, 0x00, 0x03, 0x01, 0x04, 0x02, 0x66, b'f', b'u', b't', b'u', b'r', b'e',
        ];
        assert_eq!(from_cbor::<Will>(&bytes).unwrap(), Will { boot: 3, seq: 4 });
    }

    #[test]
    fn small_buffer_is_an_error() {
        let mut buf = [0u8; 3];
        assert_eq!(
            to_cbor(&Will { boot: 3, seq: 24 }, &mut buf),
            Err(WireError::BufferTooSmall)
        );
    }
}
