//! The windowing API: record inferences, then finish a window into an authenticated summary.
//!
//! ```text
//! record(inference)*  record_label(..)*  set_*/observe_*(health)*
//!        \__________________ finish_window(now) -> COSE_Mac0(Summary) bytes in a caller buffer
//! ```
//!
//! A [`Monitor`] owns fixed-size sketches only; its size is known at compile time (1.5 KB for the
//! reference configuration, see `docs/benchmarks.md`) and it never allocates. Bin edges are
//! borrowed from the monitoring profile, which can stay in flash. `finish_window` either returns
//! the encoded summary and starts a new window, or returns an error and changes nothing, so a
//! caller can retry with a larger buffer without losing the window.

use half::f16;
use serde::ser::{Serialize, SerializeSeq, Serializer};

use crate::cose::DeviceKey;
use crate::counts::{BitWriter, CountsError};
use crate::sketch::{CountMatrix, Edges, FeatureSketch, Histogram, confidence_bin};
use crate::wire::{self, DeviceId, Health, Kind, Shape, Summary, WireError};

/// The monitoring part of a model's profile, as the device needs it.
#[derive(Debug, Clone, Copy)]
pub struct MonitorConfig<'p, const F: usize, const B: usize, const L: usize> {
    /// Sequence number of the model version the profile belongs to.
    pub profile: u32,
    /// Bin edges of each input feature.
    pub features: &'p [Edges<B>; F],
    /// Bin edges of inference latency, in microseconds.
    pub latency_us: &'p Edges<L>,
}

/// One inference as the monitor sees it.
#[derive(Debug, Clone, Copy)]
pub struct Inference<'a, const F: usize> {
    /// The model's input features (the monitored ones), in profile order.
    pub features: &'a [f32; F],
    /// Index of the predicted (top-1) class.
    pub predicted: usize,
    /// Probability the model gave the predicted class.
    pub confidence: f32,
    /// Time the inference took, in microseconds.
    pub latency_us: u32,
}

/// Why an observation was refused (nothing was recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RecordError {
    /// A class index is not below the number of classes.
    ClassOutOfRange,
    /// The confidence is NaN.
    ConfidenceNan,
}

/// Monitoring state of one device: the sketches of the current window plus health.
///
/// `F` features with `B` bins each, `C` classes, `K` confidence bins, `L` latency bins.
#[derive(Debug, Clone)]
pub struct Monitor<
    'p,
    const F: usize,
    const B: usize,
    const C: usize,
    const K: usize,
    const L: usize,
> {
    config: MonitorConfig<'p, F, B, L>,
    boot: u32,
    seq: u32,
    window_start_ms: u64,
    features: [FeatureSketch<B>; F],
    classes: CountMatrix<1, C>,
    confidence: CountMatrix<C, K>,
    latency: Histogram<L>,
    confusion: CountMatrix<C, C>,
    health: Health,
}

/// The reference configuration: 8 features x 16 bins, 10 classes, 8 confidence bins, 8 latency
/// bins. Budgets in `docs/benchmarks.md` are stated for it.
pub type ReferenceMonitor<'p> = Monitor<'p, 8, 16, 10, 8, 8>;

impl<'p, const F: usize, const B: usize, const C: usize, const K: usize, const L: usize>
    Monitor<'p, F, B, C, K, L>
{
    /// Starts monitoring at device uptime `now_ms` in boot number `boot` (a counter the device
    /// persists and increments at every boot), after a reset for `reset_reason`
    /// ([`wire::reset`]).
    ///
    /// Cannot fail at run time: the edges were validated when built ([`Edges::new`]), and
    /// dimensions beyond the protocol's [`wire::limits`] fail to compile.
    ///
    /// Not inlined: its temporaries (empty sketches copied into place) then stay out of the
    /// caller's frame.
    #[inline(never)]
    pub fn new(
        config: MonitorConfig<'p, F, B, L>,
        boot: u32,
        reset_reason: u8,
        now_ms: u64,
    ) -> Self {
        const {
            use wire::limits::*;
            assert!(F <= MAX_FEATURES && B <= MAX_BINS && B > 0);
            assert!(C <= MAX_CLASSES && C > 0 && K <= MAX_CONF_BINS && K > 0);
            assert!(L <= MAX_LATENCY_BINS && L > 0);
        };
        Self {
            config,
            boot,
            seq: 0,
            window_start_ms: now_ms,
            features: [FeatureSketch::default(); F],
            classes: CountMatrix::default(),
            confidence: CountMatrix::default(),
            latency: Histogram::default(),
            confusion: CountMatrix::default(),
            health: Health {
                reset: reset_reason,
                ..Health::default()
            },
        }
    }

    /// Records one inference. O(F log B); refuses (recording nothing) a class out of range or
    /// a NaN confidence.
    pub fn record(&mut self, inference: &Inference<'_, F>) -> Result<(), RecordError> {
        if inference.predicted >= C {
            return Err(RecordError::ClassOutOfRange);
        }
        let conf_bin =
            confidence_bin::<K>(inference.confidence).ok_or(RecordError::ConfidenceNan)?;
        for ((sketch, edges), &x) in self
            .features
            .iter_mut()
            .zip(self.config.features.iter())
            .zip(inference.features.iter())
        {
            sketch.add(edges, x);
        }
        self.classes.add(0, inference.predicted);
        self.confidence.add(inference.predicted, conf_bin);
        self.latency
            .add(self.config.latency_us.cell(inference.latency_us as f32));
        Ok(())
    }

    /// Records a ground-truth label that arrived for an earlier inference.
    pub fn record_label(&mut self, predicted: usize, actual: usize) -> Result<(), RecordError> {
        if self.confusion.add(actual, predicted) {
            Ok(())
        } else {
            Err(RecordError::ClassOutOfRange)
        }
    }

    /// Sets the battery voltage reported in the next summary.
    pub fn set_battery_mv(&mut self, mv: u16) {
        self.health.battery_mv = Some(mv);
    }

    /// Sets the radio signal strength reported in the next summary.
    pub fn set_rssi_dbm(&mut self, dbm: i8) {
        self.health.rssi_dbm = Some(dbm);
    }

    /// Notes the current free heap; the summary reports the lowest value of the window.
    pub fn observe_free_heap(&mut self, bytes: u32) {
        let min = self.health.min_free_heap.map_or(bytes, |m| m.min(bytes));
        self.health.min_free_heap = Some(min);
    }

    /// Notes that a finished summary could not be sent and was dropped.
    pub fn note_dropped(&mut self) {
        self.health.dropped = self.health.dropped.saturating_add(1);
    }

    /// Inferences recorded in the current window.
    pub fn inferences(&self) -> u64 {
        self.classes.total()
    }

    /// Sequence number the next summary will carry.
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// The current window's sketches of each feature.
    pub fn features(&self) -> &[FeatureSketch<B>; F] {
        &self.features
    }

    /// Ends the window at uptime `now_ms` and writes the authenticated summary into `out`.
    ///
    /// `out` must hold the envelope plus, during encoding, a second copy of the packed counts
    /// (the bitstream is staged at the end of `out`): 512 bytes suffice for the reference
    /// configuration. On success returns the envelope's length and starts the next window; on
    /// error nothing changes.
    ///
    /// Not inlined (nor is the reset of the sketches it ends with), so that its temporaries
    /// (the summary being encoded, the new window's sketches) take stack only while it runs
    /// instead of sitting in the caller's frame, which on a device usually holds its long-lived
    /// state.
    #[inline(never)]
    pub fn finish_window(
        &mut self,
        now_ms: u64,
        unix_s: Option<u64>,
        device: DeviceId<'_>,
        key: &DeviceKey,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let labelled = self.confusion.total() > 0;
        let shape = Shape(F as u8, B as u8, C as u8, K as u8, L as u8, labelled);
        let span_ms =
            u32::try_from(now_ms.saturating_sub(self.window_start_ms)).unwrap_or(u32::MAX);
        let topic = wire::Topic::new(device, Kind::Summary);
        let n = crate::cose::seal(key, &[topic.as_bytes()], out, |buf: &mut [u8]| {
            let counts_len = self.write_counts(None, labelled).map_err(counts_err)?;
            if counts_len > buf.len() {
                return Err(WireError::BufferTooSmall);
            }
            let (front, tail) = buf.split_at_mut(buf.len() - counts_len);
            self.write_counts(Some(tail), labelled)
                .map_err(counts_err)?;
            let summary = Summary {
                boot: self.boot,
                seq: self.seq,
                profile: self.config.profile,
                t_end_ms: now_ms,
                span_ms,
                unix_s,
                shape,
                counts: tail,
                moments: MomentsOut {
                    sketches: &self.features,
                    edges: self.config.features,
                },
                health: self.health,
            };
            wire::to_cbor(&summary, front)
        });
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                crate::device_log!(warn, "summary {} not encoded; window kept", self.seq);
                return Err(e);
            }
        };
        crate::device_log!(
            debug,
            "summary {} finished: {} inferences in {} bytes",
            self.seq,
            self.inferences(),
            n
        );
        self.start_window(now_ms);
        Ok(n)
    }

    /// Writes the counts bitstream into `buf`, or with `None` only measures it.
    fn write_counts(&self, buf: Option<&mut [u8]>, labelled: bool) -> Result<usize, CountsError> {
        let mut w = match buf {
            Some(buf) => BitWriter::new(buf),
            None => BitWriter::counting(),
        };
        for f in &self.features {
            w.vector(f.hist.cells())?;
        }
        w.vector(self.confidence.cells())?;
        w.vector(self.latency.cells())?;
        if labelled {
            w.vector(self.confusion.cells())?;
        }
        Ok(w.byte_len())
    }

    #[inline(never)]
    fn start_window(&mut self, now_ms: u64) {
        self.seq = self.seq.wrapping_add(1);
        self.window_start_ms = now_ms;
        self.features = [FeatureSketch::default(); F];
        self.classes = CountMatrix::default();
        self.confidence = CountMatrix::default();
        self.latency = Histogram::default();
        self.confusion = CountMatrix::default();
        self.health.min_free_heap = None;
    }
}

fn counts_err(e: CountsError) -> WireError {
    match e {
        CountsError::BufferFull => WireError::BufferTooSmall,
        e => WireError::Counts(e),
    }
}

/// Serializes the per-feature (mean, sd), normalised by the profile range and rounded to f16.
struct MomentsOut<'s, const B: usize> {
    sketches: &'s [FeatureSketch<B>],
    edges: &'s [Edges<B>],
}

/// Square root to well beyond half precision, without libm's 0.5 KB of tables: an exponent-halving
/// first guess and three Newton steps (relative error below 1e-6 for every positive f32).
fn sqrt(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 || x == f32::INFINITY {
        return x;
    }
    let mut y = f32::from_bits((x.to_bits() >> 1) + 0x1fc0_0000);
    for _ in 0..3 {
        y = 0.5 * (y + x / y);
    }
    y
}

/// Rounds to half precision so that serde_cbor writes the value in 3 bytes.
fn half(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl<const B: usize> Serialize for MomentsOut<'_, B> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.sketches.len() * 2))?;
        for (sketch, edges) in self.sketches.iter().zip(self.edges) {
            let range = edges.hi() - edges.lo();
            let m = &sketch.moments;
            let (mean, sd) = if m.n == 0 {
                (f32::NAN, f32::NAN)
            } else {
                ((m.mean - edges.lo()) / range, sqrt(m.variance()) / range)
            };
            seq.serialize_element(&half(mean))?;
            seq.serialize_element(&half(sd))?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sqrt_is_accurate() {
        let mut x = 1e-30f32;
        while x < 1e30 {
            let want = f64::from(x).sqrt();
            let got = f64::from(super::sqrt(x));
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "sqrt({x}) = {got}, want {want}"
            );
            x *= 1.37;
        }
        assert_eq!(super::sqrt(0.0), 0.0);
        assert!(super::sqrt(-1.0).is_nan());
    }
}
