//! The test vectors of `docs/protocol.md`: regenerated from their documented inputs with the
//! device encoder, compared byte for byte with the document, decoded by the backend's decoder,
//! and validated against the document's CDDL.
//!
//! `TF_BLESS=1` rewrites the vectors section of the document instead of comparing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use tinyfleet_device::decoded::{BlockRequestOwned, HelloOwned};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic, caps, ota_state, reset};
use tinyfleet_device::{DeviceKey, Edges, Inference, Monitor, MonitorConfig};
use tinyfleet_ingest::decode::{Decoder, DeviceMessage};

const DEVICE: &str = "vec-1";
const BEGIN: &str = "<!-- vectors:begin -->";
const END: &str = "<!-- vectors:end -->";

fn key() -> DeviceKey {
    let mut k = [0u8; 32];
    k.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    DeviceKey(k)
}

fn id() -> DeviceId<'static> {
    DeviceId::new(DEVICE).unwrap()
}

struct Vector {
    name: &'static str,
    kind: Kind,
    /// CDDL rule of the whole payload.
    rule: &'static str,
    about: &'static str,
    bytes: Vec<u8>,
}

fn seal<T: serde::Serialize>(kind: Kind, msg: &T) -> Vec<u8> {
    let mut out = [0u8; 512];
    let n = wire::seal(id(), &key(), kind, msg, &mut out).unwrap();
    out[..n].to_vec()
}

fn summary_vector() -> Vec<u8> {
    let features = [
        Edges::new(0.0, [1.0, 2.0, 3.0, 4.0]).unwrap(),
        Edges::new(-1.0, [0.0, 1.0, 2.0, 3.0]).unwrap(),
    ];
    let latency = Edges::new(0.0, [1000.0, 10000.0]).unwrap();
    let config = MonitorConfig {
        profile: 4,
        features: &features,
        latency_us: &latency,
    };
    let mut m = Monitor::<2, 4, 3, 2, 2>::new(config, 1, reset::POWER_ON, 0);
    let inferences: [([f32; 2], usize, f32, u32); 5] = [
        ([0.5, -0.5], 0, 0.95, 800),
        ([1.5, 2.5], 1, 0.60, 4000),
        ([3.9, f32::NAN], 0, 0.80, 12000),
        ([-1.0, 0.0], 2, 0.99, 900),
        ([4.0, 7.0], 1, 0.45, 2000),
    ];
    for (x, predicted, confidence, latency_us) in &inferences {
        m.record(&Inference {
            features: x,
            predicted: *predicted,
            confidence: *confidence,
            latency_us: *latency_us,
        })
        .unwrap();
    }
    m.record_label(1, 2).unwrap();
    m.set_battery_mv(3300);
    m.set_rssi_dbm(-80);
    m.observe_free_heap(10_240);
    let mut out = [0u8; 512];
    let n = m
        .finish_window(60_000, None, id(), &key(), &mut out)
        .unwrap();
    out[..n].to_vec()
}

const OBJECT: [u8; 32] = [0xab; 32];

fn vectors() -> Vec<Vector> {
    let hello = wire::Hello {
        boot: 1,
        seq: 0,
        fw: "1.4.2",
        model_id: "kws",
        model_version: "2026.11.1",
        model_seq: 4,
        hw: "nrf52840",
        caps: caps::MQTT_BLOCKS | caps::DELTA | caps::LABELS,
        reset: reset::POWER_ON,
        unix_s: None,
    };
    vec![
        Vector {
            name: "hello",
            kind: Kind::Hello,
            rule: "hello-msg",
            about: "boot 1, seq 0, fw \"1.4.2\", model \"kws\" \"2026.11.1\" seq 4, hw \"nrf52840\", \
                    caps 14 (mqtt blocks, delta, labels), reset 1, no clock",
            bytes: seal(Kind::Hello, &hello),
        },
        Vector {
            name: "will",
            kind: Kind::Will,
            rule: "will-msg",
            about: "boot 1, seq 0 (the hello above)",
            bytes: seal(Kind::Will, &wire::Will { boot: 1, seq: 0 }),
        },
        Vector {
            name: "summary",
            kind: Kind::Summary,
            rule: "summary-msg",
            about: "the five inferences above, seq 0",
            bytes: summary_vector(),
        },
        Vector {
            name: "progress",
            kind: Kind::Progress,
            rule: "progress-msg",
            about: "boot 1, seq 3, manifest 5, state 2 (downloading), 8192 bytes, error 0",
            bytes: seal(
                Kind::Progress,
                &wire::Progress {
                    boot: 1,
                    seq: 3,
                    manifest_seq: 5,
                    state: ota_state::DOWNLOADING,
                    bytes: 8192,
                    error: 0,
                },
            ),
        },
        Vector {
            name: "block-request",
            kind: Kind::BlockRequest,
            rule: "block-request-msg",
            about: "boot 1, seq 2, object ab x 32, offset 8192, len 1024",
            bytes: seal(
                Kind::BlockRequest,
                &wire::BlockRequest {
                    boot: 1,
                    seq: 2,
                    object: &OBJECT,
                    offset: 8192,
                    len: 1024,
                },
            ),
        },
        Vector {
            name: "block",
            kind: Kind::Block,
            rule: "block",
            about: "object ab x 32, offset 8192 of 20000, data 01 02 03 04 (not enveloped)",
            bytes: {
                let mut out = [0u8; 128];
                let n = wire::to_cbor(
                    &wire::Block {
                        object: &OBJECT,
                        offset: 8192,
                        total: 20_000,
                        data: &[1, 2, 3, 4],
                    },
                    &mut out,
                )
                .unwrap();
                out[..n].to_vec()
            },
        },
    ]
}

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md")
}

fn render(vectors: &[Vector]) -> String {
    let mut s = String::from(BEGIN);
    s.push('\n');
    for v in vectors {
        let topic = Topic::new(id(), v.kind);
        let _ = write!(
            s,
            "\n#### {}\n\nTopic `{}`, CDDL `{}`: {}.\n\n```vector {}\n",
            v.name,
            topic.as_str(),
            v.rule,
            v.about,
            v.name
        );
        for chunk in v.bytes.chunks(32) {
            let _ = writeln!(s, "{}", hex::encode(chunk));
        }
        s.push_str("```\n");
    }
    s.push('\n');
    s.push_str(END);
    s
}

/// `(name, bytes)` of every ```vector block in the document.
fn parse_vectors(doc: &str) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(name) = line.strip_prefix("```vector ") {
            let hex: String = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            out.insert(name.trim().to_owned(), hex::decode(hex).unwrap());
        }
    }
    out
}

fn cddl_of(doc: &str) -> String {
    let start = doc.find("```cddl\n").expect("a ```cddl block") + "```cddl\n".len();
    let len = doc[start..].find("```").unwrap();
    doc[start..start + len].to_owned()
}

#[test]
fn vectors_match_the_document() {
    let path = doc_path();
    let doc = std::fs::read_to_string(&path).unwrap();
    let vectors = vectors();
    if std::env::var_os("TF_BLESS").is_some() {
        let (head, rest) = doc.split_once(BEGIN).unwrap();
        let (_, tail) = rest.split_once(END).unwrap();
        std::fs::write(&path, format!("{head}{}{tail}", render(&vectors))).unwrap();
        return;
    }
    let documented = parse_vectors(&doc);
    for v in &vectors {
        let want = documented
            .get(v.name)
            .unwrap_or_else(|| panic!("docs/protocol.md has no vector {}", v.name));
        assert_eq!(
            hex::encode(&v.bytes),
            hex::encode(want),
            "vector {} differs from the encoder (TF_BLESS=1 regenerates after a deliberate change)",
            v.name
        );
    }
    assert_eq!(documented.len(), vectors.len(), "unexpected extra vectors");
}

#[test]
fn documented_vectors_decode_with_the_backend() {
    let doc = std::fs::read_to_string(doc_path()).unwrap();
    let documented = parse_vectors(&doc);
    let keys = HashMap::from([(DEVICE.to_owned(), key())]);
    let decoder = Decoder::default();
    let decode = |kind: Kind| {
        let v = &documented[vectors().iter().find(|v| v.kind == kind).unwrap().name];
        let topic = Topic::new(id(), kind);
        decoder.decode(topic.as_str(), v, &keys).unwrap().1
    };
    let DeviceMessage::Hello(h) = decode(Kind::Hello) else {
        panic!("not a hello")
    };
    assert_eq!(
        h,
        HelloOwned {
            boot: 1,
            seq: 0,
            fw: "1.4.2".into(),
            model_id: "kws".into(),
            model_version: "2026.11.1".into(),
            model_seq: 4,
            hw: "nrf52840".into(),
            caps: 14,
            reset: 1,
            unix_s: None,
        }
    );
    assert_eq!(
        decode(Kind::Will),
        DeviceMessage::Will(wire::Will { boot: 1, seq: 0 })
    );
    let DeviceMessage::Summary(s) = decode(Kind::Summary) else {
        panic!("not a summary")
    };
    assert_eq!((s.boot, s.seq, s.profile, s.span_ms), (1, 0, 4, 60_000));
    assert_eq!(s.inferences(), 5);
    // Feature 0: 0.5 -> bin 0, 1.5 -> bin 1, 3.9 -> bin 3, -1.0 -> underflow, 4.0 -> bin 3.
    assert_eq!(s.features[0].hist.bins, [1, 1, 0, 2]);
    assert_eq!(s.features[0].hist.underflow, 1);
    // Feature 1: -0.5 -> bin 0, 2.5 -> bin 3, NaN, 0.0 -> bin 1, 7.0 -> overflow.
    assert_eq!(s.features[1].hist.bins, [1, 1, 0, 1]);
    assert_eq!(
        (s.features[1].hist.overflow, s.features[1].hist.nan),
        (1, 1)
    );
    assert_eq!(s.classes, [2, 2, 1]);
    assert_eq!(s.confidence, [[0, 2], [1, 1], [0, 1]]);
    // Latency: 800 and 900 -> bin 0, 4000 and 2000 -> bin 1, 12000 -> overflow.
    assert_eq!(s.latency.bins, [2, 2]);
    assert_eq!(s.latency.overflow, 1);
    assert_eq!(
        s.confusion,
        Some(vec![vec![0; 3], vec![0; 3], vec![0, 1, 0]])
    );
    assert_eq!(s.health.battery_mv, Some(3300));
    assert_eq!(s.health.rssi_dbm, Some(-80));
    // Feature 0 mean of [0.5, 1.5, 3.9, -1.0, 4.0] = 1.78, normalised by range 4: 0.445.
    assert!((s.features[0].mean - 0.445).abs() < 1e-3);
    let DeviceMessage::Progress(p) = decode(Kind::Progress) else {
        panic!("not progress")
    };
    assert_eq!((p.manifest_seq, p.state, p.bytes), (5, 2, 8192));
    assert_eq!(
        decode(Kind::BlockRequest),
        DeviceMessage::BlockRequest(BlockRequestOwned {
            boot: 1,
            seq: 2,
            object: OBJECT,
            offset: 8192,
            len: 1024
        })
    );
    let block: wire::Block<'_> = wire::from_cbor(&documented["block"]).unwrap();
    assert_eq!(
        (block.offset, block.total, block.data),
        (8192, 20_000, &[1u8, 2, 3, 4][..])
    );
}

#[test]
fn documented_vectors_match_the_cddl() {
    let doc = std::fs::read_to_string(doc_path()).unwrap();
    let cddl = cddl_of(&doc);
    let documented = parse_vectors(&doc);
    for v in vectors() {
        // The validator checks against the first rule of the document.
        let rooted = format!("root = {}\n{cddl}", v.rule);
        let bytes = &documented[v.name];
        if let Err(e) = cddl::validate_cbor_from_slice(&rooted, bytes, None) {
            panic!("vector {} does not match CDDL rule {}: {e}", v.name, v.rule);
        }
    }
}

#[test]
fn the_cddl_rejects_a_wrong_body() {
    let doc = std::fs::read_to_string(doc_path()).unwrap();
    let cddl = cddl_of(&doc);
    let documented = parse_vectors(&doc);
    // A will is not a hello, and a hello envelope is not a summary envelope.
    let rooted = format!("root = hello-msg\n{cddl}");
    assert!(cddl::validate_cbor_from_slice(&rooted, &documented["will"], None).is_err());
    let rooted = format!("root = summary-msg\n{cddl}");
    assert!(cddl::validate_cbor_from_slice(&rooted, &documented["hello"], None).is_err());
}
