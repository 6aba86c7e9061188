//! Synthetic fleets with known ground truth, for tests, the evaluation command and benchmarks.
//!
//! A model with 8 standard-normal input features, 4 classes (the predicted class is the quartile
//! of feature 1) and calibrated confidences (a prediction with confidence `c` is right with
//! probability `c`; confidence grows with `|feature 0|`). Its monitoring profile is computed
//! from a large reference sample drawn the same way. Devices then draw windows from the same
//! process, altered by a [`Condition`]: a mean shift of some features, a broken sensor, or a
//! concept drift (right less often than the confidence says).

use std::collections::{BTreeMap, HashMap};

use tinyfleet_device::testkit::Rng;
use tinyfleet_ingest::aggregate::{FeatureAgg, HistAgg, WindowAgg};

use crate::engine::DeviceWindow;
use crate::profile::{FeatureProfile, HistProfile, MonitoringProfile};

pub const FEATURES: usize = 8;
pub const BINS: usize = 16;
pub const CLASSES: usize = 4;
pub const CONF_BINS: usize = 8;
/// The device's latency edges (us): lo 0, then 1, 2, 4 ... 128 ms.
pub const LATENCY_UPPER: [f32; 8] = [
    1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0, 32_000.0, 64_000.0, 128_000.0,
];
const LO: f32 = -3.5;
const HI: f32 = 3.5;

/// The standard normal quantile function (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Feature bin upper edges: equal-probability bins of N(0, 1) inside `[LO, HI)`.
fn feature_upper() -> Vec<f32> {
    let mut v: Vec<f32> = (1..BINS)
        .map(|i| normal_quantile(i as f64 / BINS as f64) as f32)
        .collect();
    v.push(HI);
    v
}

fn bin_of(x: f32, lo: f32, upper: &[f32]) -> Cell {
    if x.is_nan() {
        Cell::Nan
    } else if x < lo {
        Cell::Under
    } else {
        match upper.iter().position(|&u| x < u) {
            Some(i) => Cell::Bin(i),
            None => Cell::Over,
        }
    }
}

enum Cell {
    Bin(usize),
    Under,
    Over,
    Nan,
}

/// How one device's stream differs from the reference ([`Condition::none`]: not at all).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Added to the latent value of each feature (in reference standard deviations).
    pub shift: [f64; FEATURES],
    /// Multiplies the spread of each feature.
    pub scale: [f64; FEATURES],
    /// A broken sensor: (feature, fault).
    pub fault: Option<(usize, SimFault)>,
    /// Concept drift: probability that a prediction the model would get right is wrong anyway.
    pub concept_flip: f64,
    /// Multiplies inference latency.
    pub latency_factor: f64,
}

impl Condition {
    pub fn none() -> Self {
        Self {
            shift: [0.0; FEATURES],
            scale: [1.0; FEATURES],
            fault: None,
            concept_flip: 0.0,
            latency_factor: 1.0,
        }
    }

    pub fn shifted(feature: usize, by: f64) -> Self {
        let mut c = Self::none();
        c.shift[feature] = by;
        c
    }

    pub fn scaled(feature: usize, by: f64) -> Self {
        let mut c = Self::none();
        c.scale[feature] = by;
        c
    }

    pub fn faulty(feature: usize, fault: SimFault) -> Self {
        Self {
            fault: Some((feature, fault)),
            ..Self::none()
        }
    }

    pub fn concept(flip: f64) -> Self {
        Self {
            concept_flip: flip,
            ..Self::none()
        }
    }
}

/// Simulated sensor faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimFault {
    /// Always the same reading.
    Constant,
    /// A reading stuck near one value with a little noise.
    StuckNoisy,
    /// Half the readings are NaN.
    NanBurst,
    /// Every reading far above the range.
    Saturated,
}

/// One simulated inference's observations.
struct Draw {
    features: [f32; FEATURES],
    class: usize,
    confidence: f64,
    correct: bool,
    latency_us: f32,
}

fn draw(rng: &mut Rng, c: &Condition) -> Draw {
    let mut features = [0f32; FEATURES];
    for (f, x) in features.iter_mut().enumerate() {
        *x = (rng.normal() * c.scale[f] + c.shift[f]) as f32;
    }
    if let Some((f, fault)) = c.fault {
        features[f] = match fault {
            SimFault::Constant => 0.3,
            SimFault::StuckNoisy => 0.2 + 0.01 * rng.uniform() as f32,
            SimFault::NanBurst if rng.uniform() < 0.5 => f32::NAN,
            SimFault::NanBurst => features[f],
            SimFault::Saturated => 50.0,
        };
    }
    let x0 = if features[0].is_finite() {
        f64::from(features[0])
    } else {
        0.0
    };
    let x1 = if features[1].is_finite() {
        f64::from(features[1])
    } else {
        0.0
    };
    let class = match x1 {
        v if v < -0.674_49 => 0,
        v if v < 0.0 => 1,
        v if v < 0.674_49 => 2,
        _ => 3,
    };
    let confidence = 0.25 + 0.74 * (1.0 - (-1.1 * x0.abs()).exp());
    let correct = rng.uniform() < confidence && rng.uniform() >= c.concept_flip;
    let latency_us = (8_000.0 * (0.25 * rng.normal()).exp() * c.latency_factor) as f32;
    Draw {
        features,
        class,
        confidence,
        correct,
        latency_us,
    }
}

/// The window aggregate of `n` inferences under `condition`; a `labelled` share carries labels.
/// Returns the aggregate and the number of correct predictions (the truth CBPE estimates).
pub fn window(rng: &mut Rng, condition: &Condition, n: usize, labelled: f64) -> (WindowAgg, u64) {
    let upper = feature_upper();
    let mut agg = WindowAgg {
        summaries: 1,
        inferences: n as u64,
        profile: Some(1),
        features: vec![
            FeatureAgg {
                hist: HistAgg {
                    bins: vec![0; BINS],
                    ..HistAgg::default()
                },
                ..FeatureAgg::default()
            };
            FEATURES
        ],
        classes: vec![0; CLASSES],
        confidence: vec![vec![0; CONF_BINS]; CLASSES],
        latency: HistAgg {
            bins: vec![0; LATENCY_UPPER.len()],
            ..HistAgg::default()
        },
        ..WindowAgg::default()
    };
    let mut confusion = vec![vec![0u64; CLASSES]; CLASSES];
    let mut any_label = false;
    let mut correct_total = 0;
    for _ in 0..n {
        let d = draw(rng, condition);
        for (f, &x) in d.features.iter().enumerate() {
            let fa = &mut agg.features[f];
            match bin_of(x, LO, &upper) {
                Cell::Bin(i) => fa.hist.bins[i] += 1,
                Cell::Under => fa.hist.underflow += 1,
                Cell::Over => fa.hist.overflow += 1,
                Cell::Nan => fa.hist.nan += 1,
            }
            if x.is_finite() {
                let norm = f64::from((x - LO) / (HI - LO));
                fa.w += 1.0;
                fa.wm += norm;
                fa.wq += norm * norm;
            }
        }
        agg.classes[d.class] += 1;
        let cb = ((d.confidence * CONF_BINS as f64) as usize).min(CONF_BINS - 1);
        agg.confidence[d.class][cb] += 1;
        match bin_of(d.latency_us, 0.0, &LATENCY_UPPER) {
            Cell::Bin(i) => agg.latency.bins[i] += 1,
            Cell::Under => agg.latency.underflow += 1,
            Cell::Over | Cell::Nan => agg.latency.overflow += 1,
        }
        correct_total += u64::from(d.correct);
        if rng.uniform() < labelled {
            any_label = true;
            let truth = if d.correct {
                d.class
            } else {
                (d.class + 1 + (rng.uniform() * (CLASSES - 1) as f64) as usize % (CLASSES - 1))
                    % CLASSES
            };
            confusion[truth][d.class] += 1;
        }
    }
    if any_label {
        agg.confusion = confusion;
    }
    (agg, correct_total)
}

/// The simulated model's monitoring profile, from `n` reference inferences (all labelled).
pub fn profile(n: usize, seed: u64) -> MonitoringProfile {
    let mut rng = Rng::new(seed);
    let (agg, _) = window(&mut rng, &Condition::none(), n, 1.0);
    let upper = feature_upper();
    let hist = |h: &HistAgg, lo: f32, upper: &[f32]| HistProfile {
        lo,
        upper: upper.to_vec(),
        counts: h.bins.clone(),
        underflow: h.underflow,
        overflow: h.overflow,
        nan: h.nan,
    };
    // Calibration per confidence bin: right / labelled, made monotone by pooling violators.
    let mut right = vec![0u64; CONF_BINS];
    let mut seen = vec![0u64; CONF_BINS];
    let mut rng = Rng::new(seed ^ 0x5eed);
    for _ in 0..n {
        let d = draw(&mut rng, &Condition::none());
        let cb = ((d.confidence * CONF_BINS as f64) as usize).min(CONF_BINS - 1);
        seen[cb] += 1;
        right[cb] += u64::from(d.correct);
    }
    let calibration = crate::profile::isotonic_calibration(&right, &seen);
    let accuracy = right.iter().sum::<u64>() as f64 / seen.iter().sum::<u64>().max(1) as f64;
    MonitoringProfile {
        model_id: "sim".into(),
        model_version: "1".into(),
        n: n as u64,
        features: agg
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| FeatureProfile {
                name: format!("f{i}"),
                hist: hist(&f.hist, LO, &upper),
            })
            .collect(),
        classes: agg.classes.clone(),
        confidence: agg.confidence.clone(),
        conf_bins: CONF_BINS,
        calibration,
        calibration_n: seen,
        accuracy: Some(accuracy),
        labelled: n as u64,
        latency: Some(hist(&agg.latency, 0.0, &LATENCY_UPPER)),
    }
}

/// The simulated model's profile from 40,000 reference inferences, as a profile store.
pub fn profiles() -> HashMap<(String, String), MonitoringProfile> {
    let p = profile(40_000, 7);
    HashMap::from([((p.model_id.clone(), p.model_version.clone()), p)])
}

/// A simulated fleet: devices with cohorts (hardware and a `site` tag) and conditions.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub devices: Vec<SimDevice>,
}

#[derive(Debug, Clone)]
pub struct SimDevice {
    pub id: String,
    pub hw: String,
    pub site: String,
    pub condition: Condition,
    pub rng: Rng,
}

impl Fleet {
    /// `n` devices over `sites` sites and two hardware kinds, all on the reference.
    pub fn new(n: usize, sites: usize, seed: u64) -> Self {
        Self {
            devices: (0..n)
                .map(|i| SimDevice {
                    id: format!("dev-{i:06}"),
                    hw: if i % 2 == 0 {
                        "nrf52".into()
                    } else {
                        "stm32".into()
                    },
                    site: format!("s{}", i % sites.max(1)),
                    condition: Condition::none(),
                    rng: Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(i as u64)),
                })
                .collect(),
        }
    }

    /// One window of every device, `n` inferences each, with a `labelled` share of labels.
    /// Also returns the true accuracy per site (what CBPE should track).
    pub fn windows(
        &mut self,
        n: usize,
        labelled: f64,
    ) -> (Vec<DeviceWindow>, HashMap<String, f64>) {
        let mut truth: HashMap<String, (u64, u64)> = HashMap::new();
        let windows = self
            .devices
            .iter_mut()
            .map(|d| {
                let (agg, correct) = window(&mut d.rng, &d.condition, n, labelled);
                let t = truth.entry(d.site.clone()).or_default();
                t.0 += correct;
                t.1 += n as u64;
                DeviceWindow {
                    device: d.id.clone(),
                    model_id: "sim".into(),
                    model_version: "1".into(),
                    hw: d.hw.clone(),
                    tags: BTreeMap::from([("site".to_owned(), d.site.clone())]),
                    agg,
                }
            })
            .collect();
        let truth = truth
            .into_iter()
            .map(|(k, (c, n))| (k, c as f64 / n.max(1) as f64))
            .collect();
        (windows, truth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_is_the_inverse_of_known_points() {
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.01) + 2.326_348).abs() < 1e-5);
    }

    #[test]
    fn the_reference_fleet_matches_its_profile() {
        let p = profile(50_000, 1);
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(p.features.len(), FEATURES);
        // Equal-probability bins: each holds about 1/16.
        let c = &p.features[3].hist.counts;
        assert!(
            c.iter()
                .all(|&x| (x as f64 - 50_000.0 / 16.0).abs() < 250.0),
            "{c:?}"
        );
        let acc = p.accuracy.unwrap_or(0.0);
        assert!((0.6..0.9).contains(&acc), "{acc}");
        assert!(p.calibration.windows(2).all(|w| w[0] <= w[1]));
    }
}
