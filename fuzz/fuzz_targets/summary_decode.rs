//! Summary bodies, untagged (`decoded::decode_summary`: packed CBOR, the counts bitstream, the
//! shape limits and the consistency check), so the fuzzer works on the decoder itself rather
//! than on the MAC in front of it (`ingest_sealed` covers the path through the MAC).
//!
//! Properties: never panics; an accepted summary is within the protocol's limits and
//! consistent (every histogram holds the same number of inferences); re-encoding it (counts
//! packed again by `BitWriter`, packed CBOR) decodes to the same summary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::counts::BitWriter;
use tinyfleet_device::decoded::{DecodedSummary, HistCounts, decode_summary};
use tinyfleet_device::wire::{self, Summary};

fn hist_cells(h: &HistCounts) -> Vec<u32> {
    let mut v = h.bins.clone();
    v.extend([h.underflow, h.overflow, h.nan]);
    v
}

/// The wire form of a decoded summary.
fn encode(s: &DecodedSummary) -> Vec<u8> {
    let mut vectors: Vec<Vec<u32>> = s.features.iter().map(|f| hist_cells(&f.hist)).collect();
    vectors.push(s.confidence.concat());
    vectors.push(hist_cells(&s.latency));
    if let Some(c) = &s.confusion {
        vectors.push(c.concat());
    }
    let values: usize = vectors.iter().map(Vec::len).sum();
    let mut counts = vec![0u8; values * 8 + vectors.len() + 1];
    let mut w = BitWriter::new(&mut counts);
    for v in &vectors {
        w.vector(v.iter().copied()).expect("counts re-encode");
    }
    let n = w.byte_len();
    let moments: Vec<f32> = s.features.iter().flat_map(|f| [f.mean, f.sd]).collect();
    let raw = Summary {
        boot: s.boot,
        seq: s.seq,
        profile: s.profile,
        t_end_ms: s.t_end_ms,
        span_ms: s.span_ms,
        unix_s: s.unix_s,
        shape: s.shape,
        counts: &counts[..n],
        moments,
        health: s.health,
    };
    let mut out = vec![0u8; n + 16 * s.features.len() + 256];
    let len = wire::to_cbor(&raw, &mut out).expect("summary re-encodes");
    out.truncate(len);
    out
}

fn same_float(a: f32, b: f32) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fuzz_target!(|body: &[u8]| {
    let Ok(s) = decode_summary(body) else {
        return;
    };
    s.shape
        .check()
        .expect("accepted shapes are within the limits");
    let n = s.inferences();
    assert!(s.features.iter().all(|f| f.hist.total() == n));
    assert_eq!(s.latency.total(), n);
    assert_eq!(s.features.len(), s.shape.features());
    assert_eq!(s.classes.len(), s.shape.classes());
    assert_eq!(s.confusion.is_some(), s.shape.labelled());

    let again = decode_summary(&encode(&s)).expect("a re-encoded summary decodes");
    let mut a = again.clone();
    let mut b = s.clone();
    for (x, y) in a.features.iter().zip(&b.features) {
        assert!(same_float(x.mean, y.mean) && same_float(x.sd, y.sd));
    }
    for f in a.features.iter_mut().chain(b.features.iter_mut()) {
        (f.mean, f.sd) = (0.0, 0.0);
    }
    assert_eq!(a, b, "decode(encode(x)) == x");
});
