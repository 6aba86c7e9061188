//! Deterministic inference streams for tests, benchmarks, test vectors and the demo (`std`).
//!
//! The reference configuration (8 features x 16 bins, 10 classes, 8 confidence bins, 8 latency
//! bins) with a profile whose edges are the 16-quantiles of a standard normal, and a generator of
//! inferences whose features are normal with a chosen mean shift.
//!
//! Test support: its constant edges are known to be valid, so building them may panic.
#![allow(clippy::panic)]

use crate::monitor::{Inference, MonitorConfig};
use crate::sketch::Edges;

/// Upper edges of 16 equal-probability bins of N(0, 1), with the last edge at the 0.999
/// quantile; `lo` is the 0.001 quantile.
pub const NORMAL_16: [f32; 16] = [
    -1.534, -1.150, -0.887, -0.674, -0.489, -0.319, -0.157, 0.0, 0.157, 0.319, 0.489, 0.674, 0.887,
    1.150, 1.534, 3.090,
];
pub const NORMAL_LO: f32 = -3.090;

/// Latency edges in microseconds: 0, then doubling from 1 ms to 128 ms.
pub const LATENCY_US: [f32; 8] = [
    1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0, 32_000.0, 64_000.0, 128_000.0,
];

/// The reference profile's edges, built once by the caller (they are borrowed by the monitor).
#[derive(Debug, Clone)]
pub struct ReferenceProfile {
    pub features: [Edges<16>; 8],
    pub latency: Edges<8>,
}

impl Default for ReferenceProfile {
    fn default() -> Self {
        let edges = match Edges::new(NORMAL_LO, NORMAL_16) {
            Ok(e) => e,
            Err(e) => panic!("reference edges are increasing: {e:?}"),
        };
        let latency = match Edges::new(0.0, LATENCY_US) {
            Ok(e) => e,
            Err(e) => panic!("latency edges are increasing: {e:?}"),
        };
        Self {
            features: [edges; 8],
            latency,
        }
    }
}

impl ReferenceProfile {
    /// The monitor configuration for model sequence number `profile`.
    pub fn config(&self, profile: u32) -> MonitorConfig<'_, 8, 16, 8> {
        MonitorConfig {
            profile,
            features: &self.features,
            latency_us: &self.latency,
        }
    }
}

/// xorshift64*: small, fast and deterministic; not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// How a simulated device's inputs and model behave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamParams {
    /// Added to every feature's N(0, 1) value.
    pub feature_shift: f32,
    /// Probability that the prediction is correct (for labels).
    pub accuracy: f64,
}

impl Default for StreamParams {
    fn default() -> Self {
        Self {
            feature_shift: 0.0,
            accuracy: 0.9,
        }
    }
}

/// One generated inference with its ground truth.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub features: [f32; 8],
    pub predicted: usize,
    pub actual: usize,
    pub confidence: f32,
    pub latency_us: u32,
}

impl Sample {
    pub fn inference(&self) -> Inference<'_, 8> {
        Inference {
            features: &self.features,
            predicted: self.predicted,
            confidence: self.confidence,
            latency_us: self.latency_us,
        }
    }
}

/// Draws one inference of the reference configuration.
pub fn sample(rng: &mut Rng, params: &StreamParams) -> Sample {
    let mut features = [0f32; 8];
    for f in &mut features {
        *f = rng.normal() as f32 + params.feature_shift;
    }
    // A skewed class prior: class i with weight 10 - i.
    let mut pick = rng.uniform() * 55.0;
    let mut actual = 0;
    while actual < 9 && pick >= (10 - actual) as f64 {
        pick -= (10 - actual) as f64;
        actual += 1;
    }
    let correct = rng.uniform() < params.accuracy;
    let predicted = if correct {
        actual
    } else {
        (actual + 1 + (rng.next_u64() % 9) as usize) % 10
    };
    // Confident when right, less so when wrong.
    let u = rng.uniform() as f32;
    let confidence = if correct {
        1.0 - 0.35 * u * u
    } else {
        0.3 + 0.5 * u
    };
    let latency_us = (9_000.0 + 2_000.0 * rng.normal()).max(500.0) as u32;
    Sample {
        features,
        predicted,
        actual,
        confidence,
        latency_us,
    }
}
