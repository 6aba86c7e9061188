//! Owned, expanded forms of device messages, for the backend (`std` feature).
//!
//! Decoding is strict: a summary whose dimensions are beyond [`crate::wire::limits`], whose
//! `counts` bitstream has the wrong length, or whose histograms disagree on how many inferences
//! the window held is refused. Nothing here trusts its input or panics on it.

use serde::Serialize;
use std::vec::Vec;

use crate::counts::BitReader;
use crate::wire::{self, Health, Shape, Summary, WireError};

/// One feature's histogram and moments from a summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureCounts {
    pub hist: HistCounts,
    /// Mean of the finite values, normalised by the profile range: `(mean - lo) / (hi - lo)`.
    /// NaN when the window held no finite value.
    pub mean: f32,
    /// Standard deviation of the finite values divided by `hi - lo`.
    pub sd: f32,
}

/// A histogram without moments (latency).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistCounts {
    pub bins: Vec<u32>,
    pub underflow: u32,
    pub overflow: u32,
    pub nan: u32,
}

impl HistCounts {
    fn from_cells(cells: &[u32], bins: usize) -> Self {
        Self {
            bins: cells[..bins].to_vec(),
            underflow: cells[bins],
            overflow: cells[bins + 1],
            nan: cells[bins + 2],
        }
    }

    /// Every observation, out-of-range and NaN included.
    pub fn total(&self) -> u64 {
        self.bins
            .iter()
            .chain([&self.underflow, &self.overflow, &self.nan])
            .map(|&c| u64::from(c))
            .sum()
    }
}

/// A summary with every histogram expanded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodedSummary {
    pub boot: u32,
    pub seq: u32,
    pub profile: u32,
    pub t_end_ms: u64,
    pub span_ms: u32,
    pub unix_s: Option<u64>,
    pub shape: Shape,
    pub features: Vec<FeatureCounts>,
    /// Predicted-class histogram (the row sums of `confidence`).
    pub classes: Vec<u32>,
    /// Top-1 confidence histogram per predicted class: `confidence[class][bin]`.
    pub confidence: Vec<Vec<u32>>,
    /// Inference latency in microseconds.
    pub latency: HistCounts,
    /// `confusion[true_label][predicted]`, when labels arrived in the window.
    pub confusion: Option<Vec<Vec<u32>>>,
    pub health: Health,
}

impl DecodedSummary {
    /// Inferences in the window.
    pub fn inferences(&self) -> u64 {
        self.classes.iter().map(|&c| u64::from(c)).sum()
    }
}

/// Decodes a verified summary body (the COSE payload).
pub fn decode_summary(body: &[u8]) -> Result<DecodedSummary, WireError> {
    let raw: Summary<'_, Vec<f32>> = wire::from_cbor(body)?;
    let shape = raw.shape;
    shape.check()?;
    let (nf, nb, nc, nk, nl) = (
        shape.features(),
        shape.bins(),
        shape.classes(),
        shape.conf_bins(),
        shape.latency_bins(),
    );
    if raw.moments.len() != 2 * nf {
        return Err(WireError::OutOfRange);
    }
    let mut reader = BitReader::new(raw.counts);
    let mut vectors: Vec<Vec<u32>> = Vec::new();
    for len in wire::counts_layout(&shape) {
        let mut v = Vec::with_capacity(len);
        reader
            .vector(len, |x| v.push(x))
            .map_err(WireError::Counts)?;
        vectors.push(v);
    }
    reader.finish().map_err(WireError::Counts)?;
    let mut vectors = vectors.into_iter();
    let mut next = || vectors.next().ok_or(WireError::OutOfRange);

    let mut features = Vec::with_capacity(nf);
    for i in 0..nf {
        features.push(FeatureCounts {
            hist: HistCounts::from_cells(&next()?, nb),
            mean: raw.moments[2 * i],
            sd: raw.moments[2 * i + 1],
        });
    }
    let confidence: Vec<Vec<u32>> = next()?.chunks(nk).map(<[u32]>::to_vec).collect();
    let classes = confidence
        .iter()
        .map(|row| row.iter().fold(0u32, |a, &b| a.saturating_add(b)))
        .collect();
    let latency = HistCounts::from_cells(&next()?, nl);
    let confusion = if shape.labelled() {
        Some(next()?.chunks(nc).map(<[u32]>::to_vec).collect())
    } else {
        None
    };
    let summary = DecodedSummary {
        boot: raw.boot,
        seq: raw.seq,
        profile: raw.profile,
        t_end_ms: raw.t_end_ms,
        span_ms: raw.span_ms,
        unix_s: raw.unix_s,
        shape,
        features,
        classes,
        confidence,
        latency,
        confusion,
        health: raw.health,
    };
    check_consistent(&summary)?;
    Ok(summary)
}

/// Every inference lands once in each feature histogram, once in the latency histogram and once
/// in the confidence histogram; a summary that says otherwise is refused.
fn check_consistent(s: &DecodedSummary) -> Result<(), WireError> {
    let n = s.inferences();
    let features_ok = s.features.iter().all(|f| f.hist.total() == n);
    if features_ok && s.latency.total() == n {
        Ok(())
    } else {
        Err(WireError::Inconsistent)
    }
}

/// A hello with owned strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HelloOwned {
    pub boot: u32,
    pub seq: u32,
    pub fw: std::string::String,
    pub model_id: std::string::String,
    pub model_version: std::string::String,
    pub model_seq: u32,
    pub hw: std::string::String,
    pub caps: u32,
    pub reset: u8,
    pub unix_s: Option<u64>,
}

impl From<&wire::Hello<'_>> for HelloOwned {
    fn from(h: &wire::Hello<'_>) -> Self {
        Self {
            boot: h.boot,
            seq: h.seq,
            fw: h.fw.into(),
            model_id: h.model_id.into(),
            model_version: h.model_version.into(),
            model_seq: h.model_seq,
            hw: h.hw.into(),
            caps: h.caps,
            reset: h.reset,
            unix_s: h.unix_s,
        }
    }
}

/// A block request with an owned object digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockRequestOwned {
    pub boot: u32,
    pub seq: u32,
    pub object: [u8; 32],
    pub offset: u32,
    pub len: u16,
}

impl TryFrom<&wire::BlockRequest<'_>> for BlockRequestOwned {
    type Error = WireError;

    fn try_from(r: &wire::BlockRequest<'_>) -> Result<Self, WireError> {
        let object = r.object.try_into().map_err(|_| WireError::OutOfRange)?;
        if r.len == 0 || usize::from(r.len) > wire::limits::MAX_BLOCK {
            return Err(WireError::OutOfRange);
        }
        Ok(Self {
            boot: r.boot,
            seq: r.seq,
            object,
            offset: r.offset,
            len: r.len,
        })
    }
}
