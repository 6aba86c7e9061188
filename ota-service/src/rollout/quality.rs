//! Model quality, canary against control.
//!
//! The shell feeds per-device, per-window [`QualityObservation`]s (from the windows ingest
//! aggregated: labelled confusion counts, the CBPE estimate of the confidence histogram,
//! mean latency, bad resets). The engine sorts each into the *canary* side (a device of this
//! rollout on the new version) or the *control* side (a device of the same target still on a
//! replaced version); anything else is ignored.
//!
//! **Same time windows.** A window is *folded* once: when both sides have at least one
//! observation in it, every observation of the window is added to its device's running
//! totals on its side; a window with only one side is dropped. So both sides always cover the
//! same windows and a change of conditions over time (a season, a holiday, a firmware push)
//! hits both alike. Pass all observations of a window in one call (the monitor's
//! per-window step reads them together); a window seen again is ignored, so re-feeding after a
//! restart is harmless.
//!
//! **Per-device totals, not per-window rows**, keep the persisted state bounded by the size of
//! the target, whatever the length of the rollout.
//!
//! **The tests** (defaults in [`QualityGate`]), each a *harm* interval judged against its
//! limit (see [`super::gates::judge`]):
//!
//! - *Labelled accuracy*: pooled accuracy of each side; the difference control - canary with
//!   `z = Phi^-1(confidence)` standard errors each way. The variance of each side is the larger
//!   of the binomial one (with a +1/+2 Agresti-Caffo adjustment so 0 or 100 % errors still
//!   have a width) and the cluster-robust one over devices,
//!   `m/(m-1) * sum_i (c_i - p n_i)^2 / (sum_i n_i)^2`: labels from one device are correlated
//!   (its environment, its users), and treating 5,000 labels from 20 devices as 5,000
//!   independent trials would make a noisy device look like a regression.
//! - *Estimated accuracy* (CBPE, when the version has a monitoring profile): Welch's t on the
//!   per-device mean estimates (each device one value), standard deviation floored at 0.01.
//! - *Latency*: ratio of the side means of per-device mean latencies, Welch's t on the log
//!   ratio (delta method), standard deviation floored at 1 % of the mean.
//! - *Resets*: bad resets per device-window, difference of Poisson rates with a normal
//!   approximation (variance `(R + 0.5) / W^2` each side, so zero resets still have a width).
//!
//! Nothing is decided before `min_canary_devices`, `min_control_devices` and `min_windows`
//! are reached, and the labelled test also waits for `min_labelled` labels per side.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::gates::{Verdict, judge};
use super::plan::QualityGate;
use super::stats::{self, Interval, Moments};

/// What one device's window says about its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityObservation {
    pub device: String,
    pub window_start_ms: i64,
    /// The model version the device ran in this window (a window that saw the switch should
    /// be left out, or attributed to the version of most of its inferences).
    pub on_version: String,
    /// Labelled inferences (the confusion matrix's diagonal and total).
    pub labelled_correct: u64,
    pub labelled_total: u64,
    /// CBPE estimate (`drift::engine::cbpe` with the version's profile), when there is one.
    pub estimated_accuracy: Option<f64>,
    /// Mean inference latency, when reported.
    pub mean_latency_us: Option<f64>,
    /// Watchdog, brown-out and fault resets in the window (`HealthAgg::bad_resets`).
    pub resets: u64,
}

impl QualityObservation {
    fn valid(&self) -> bool {
        self.labelled_correct <= self.labelled_total
            && self
                .estimated_accuracy
                .is_none_or(|a| a.is_finite() && (0.0..=1.0).contains(&a))
            && self
                .mean_latency_us
                .is_none_or(|l| l.is_finite() && (0.0..=MAX_LATENCY_US).contains(&l))
    }
}

/// Latencies above this (an hour) are taken for garbage and the observation ignored.
const MAX_LATENCY_US: f64 = 3.6e9;

/// Which side an observation is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Canary,
    Control,
}

/// One device's totals over the folded windows, on one side.
///
/// Estimates and latencies are summed as integers (millionths of accuracy, nanoseconds), so
/// the state has no long floating-point numbers: it reads back bit for bit from any format,
/// JSON included, and a restart cannot shift a verdict by a rounding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTotals {
    pub windows: u32,
    pub correct: u64,
    pub labelled: u64,
    /// Sum of CBPE estimates, in millionths.
    pub estimate_micros: u64,
    pub estimates: u32,
    /// Sum of mean latencies, in nanoseconds.
    pub latency_ns: u64,
    pub latencies: u32,
    pub resets: u64,
}

impl DeviceTotals {
    fn add(&mut self, o: &QualityObservation) {
        self.windows = self.windows.saturating_add(1);
        self.correct = self.correct.saturating_add(o.labelled_correct);
        self.labelled = self.labelled.saturating_add(o.labelled_total);
        if let Some(a) = o.estimated_accuracy {
            let micros = (a * 1e6).round() as u64;
            self.estimate_micros = self.estimate_micros.saturating_add(micros);
            self.estimates = self.estimates.saturating_add(1);
        }
        if let Some(l) = o.mean_latency_us {
            self.latency_ns = self.latency_ns.saturating_add((l * 1e3).round() as u64);
            self.latencies = self.latencies.saturating_add(1);
        }
        self.resets = self.resets.saturating_add(o.resets);
    }

    fn mean_estimate(&self) -> Option<f64> {
        (self.estimates > 0).then(|| self.estimate_micros as f64 / 1e6 / f64::from(self.estimates))
    }

    fn mean_latency_us(&self) -> Option<f64> {
        (self.latencies > 0).then(|| self.latency_ns as f64 / 1e3 / f64::from(self.latencies))
    }
}

/// How many window starts are remembered individually; older ones are below `floor_ms` and
/// count as folded.
const REMEMBERED_WINDOWS: usize = 512;

/// The quality evidence of a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualityState {
    pub canary: BTreeMap<String, DeviceTotals>,
    pub control: BTreeMap<String, DeviceTotals>,
    /// Windows already folded (paired or not).
    pub seen_windows: BTreeSet<i64>,
    /// Windows at or before this start count as seen.
    pub floor_ms: Option<i64>,
    /// Windows with both sides, folded into the totals.
    pub paired_windows: u32,
    /// Windows with one side only, dropped.
    pub unpaired_windows: u32,
    /// Observations of windows already seen, invalid, duplicated or from devices on neither
    /// side.
    pub ignored: u64,
}

/// What [`QualityState::fold`] did with one call's observations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualityIntake {
    pub paired_windows: u32,
    pub unpaired_windows: u32,
    pub used: u64,
    pub ignored: u64,
}

impl QualityState {
    fn seen(&self, window: i64) -> bool {
        self.floor_ms.is_some_and(|f| window <= f) || self.seen_windows.contains(&window)
    }

    /// Folds the observations of one call, grouped by window; `side` says which side a
    /// device's observation is on (`None`: neither).
    pub fn fold(
        &mut self,
        observations: &[QualityObservation],
        side: impl Fn(&QualityObservation) -> Option<Side>,
    ) -> QualityIntake {
        let mut intake = QualityIntake::default();
        let mut windows: BTreeMap<i64, Vec<(&QualityObservation, Side)>> = BTreeMap::new();
        for o in observations {
            let classified = if self.seen(o.window_start_ms) || !o.valid() {
                None
            } else {
                side(o)
            };
            match classified {
                Some(s) => windows.entry(o.window_start_ms).or_default().push((o, s)),
                None => intake.ignored += 1,
            }
        }
        for (window, mut obs) in windows {
            // One observation per device and window: the first one given.
            let mut devices = BTreeSet::new();
            let before = obs.len();
            obs.retain(|(o, _)| devices.insert(o.device.as_str()));
            intake.ignored += (before - obs.len()) as u64;
            let has = |s: Side| obs.iter().any(|(_, side)| *side == s);
            if has(Side::Canary) && has(Side::Control) {
                for (o, s) in &obs {
                    let totals = match s {
                        Side::Canary => &mut self.canary,
                        Side::Control => &mut self.control,
                    };
                    totals.entry(o.device.clone()).or_default().add(o);
                }
                intake.paired_windows += 1;
                intake.used += obs.len() as u64;
            } else {
                intake.unpaired_windows += 1;
                intake.ignored += obs.len() as u64;
            }
            self.seen_windows.insert(window);
        }
        while self.seen_windows.len() > REMEMBERED_WINDOWS {
            if let Some(first) = self.seen_windows.pop_first() {
                self.floor_ms = Some(self.floor_ms.map_or(first, |f| f.max(first)));
            }
        }
        self.paired_windows += intake.paired_windows;
        self.unpaired_windows += intake.unpaired_windows;
        self.ignored += intake.ignored;
        intake
    }

    /// Runs the tests.
    pub fn evaluate(&self, gate: &QualityGate) -> QualityReport {
        let enough = self.canary.len() >= gate.min_canary_devices as usize
            && self.control.len() >= gate.min_control_devices as usize
            && self.paired_windows >= gate.min_windows;
        let labelled = labelled_check(&self.canary, &self.control, gate, enough);
        let estimated = welch_check(
            per_device(&self.canary, DeviceTotals::mean_estimate),
            per_device(&self.control, DeviceTotals::mean_estimate),
            gate,
            enough,
        );
        let latency = latency_check(
            per_device(&self.canary, DeviceTotals::mean_latency_us),
            per_device(&self.control, DeviceTotals::mean_latency_us),
            gate,
            enough,
        );
        let resets = resets_check(&self.canary, &self.control, gate, enough);
        QualityReport::new(
            self.canary.len() as u32,
            self.control.len() as u32,
            self.paired_windows,
            [labelled, estimated, latency, resets],
            gate,
        )
    }
}

fn per_device(
    totals: &BTreeMap<String, DeviceTotals>,
    value: impl Fn(&DeviceTotals) -> Option<f64>,
) -> Vec<f64> {
    totals.values().filter_map(value).collect()
}

/// One quality metric on both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// The side values (accuracy, mean estimate, mean latency in us, resets per window).
    pub canary: Option<f64>,
    pub control: Option<f64>,
    /// The harm (larger is worse) with its interval.
    pub harm: Option<Interval>,
    pub limit: f64,
    /// Sample on each side (labels, devices, or device-windows).
    pub n_canary: u64,
    pub n_control: u64,
    pub verdict: Verdict,
}

impl Check {
    fn empty(limit: f64, verdict: Verdict) -> Self {
        Self {
            canary: None,
            control: None,
            harm: None,
            limit,
            n_canary: 0,
            n_control: 0,
            verdict,
        }
    }
}

/// Side sums of labels, with the variance of the side's accuracy.
fn labelled_side(t: &BTreeMap<String, DeviceTotals>) -> (u64, u64, f64) {
    let (c, n) = t
        .values()
        .fold((0u64, 0u64), |(c, n), d| (c + d.correct, n + d.labelled));
    if n == 0 {
        return (0, 0, 0.0);
    }
    let nf = n as f64;
    let p = c as f64 / nf;
    let adj = (c as f64 + 1.0) / (nf + 2.0);
    let binomial = adj * (1.0 - adj) / nf;
    let devices: Vec<&DeviceTotals> = t.values().filter(|d| d.labelled > 0).collect();
    let m = devices.len();
    let cluster = if m > 1 {
        let ss: f64 = devices
            .iter()
            .map(|d| {
                let r = d.correct as f64 - p * d.labelled as f64;
                r * r
            })
            .sum();
        m as f64 / (m - 1) as f64 * ss / (nf * nf)
    } else {
        0.0
    };
    (c, n, binomial.max(cluster))
}

fn labelled_check(
    canary: &BTreeMap<String, DeviceTotals>,
    control: &BTreeMap<String, DeviceTotals>,
    gate: &QualityGate,
    enough: bool,
) -> Check {
    let (cc, nc, vc) = labelled_side(canary);
    let (ck, nk, vk) = labelled_side(control);
    let limit = gate.max_accuracy_drop;
    if nc == 0 && nk == 0 {
        return Check::empty(limit, Verdict::NoData);
    }
    let mut check = Check::empty(limit, Verdict::Insufficient);
    check.n_canary = nc;
    check.n_control = nk;
    if nc == 0 || nk == 0 {
        return check;
    }
    let (pc, pk) = (cc as f64 / nc as f64, ck as f64 / nk as f64);
    let z = stats::normal_quantile(gate.confidence);
    let d = pk - pc;
    let half = z * (vc + vk).sqrt();
    let harm = Interval {
        estimate: d,
        low: d - half,
        high: d + half,
    };
    check.canary = Some(pc);
    check.control = Some(pk);
    check.verdict = if enough && nc >= gate.min_labelled && nk >= gate.min_labelled {
        judge(&harm, limit)
    } else {
        Verdict::Insufficient
    };
    check.harm = Some(harm);
    check
}

fn welch_check(canary: Vec<f64>, control: Vec<f64>, gate: &QualityGate, enough: bool) -> Check {
    let limit = gate.max_estimated_drop;
    let (Some(c), Some(k)) = (Moments::of(&canary), Moments::of(&control)) else {
        let v = if canary.is_empty() && control.is_empty() {
            Verdict::NoData
        } else {
            Verdict::Insufficient
        };
        let mut check = Check::empty(limit, v);
        check.n_canary = canary.len() as u64;
        check.n_control = control.len() as u64;
        return check;
    };
    // control - canary: how much accuracy the canary lost.
    let harm = stats::welch_difference(&c, &k, 0.01, gate.confidence);
    let sized = c.n >= gate.min_canary_devices as usize && k.n >= gate.min_control_devices as usize;
    Check {
        canary: Some(c.mean),
        control: Some(k.mean),
        harm: Some(harm),
        limit,
        n_canary: c.n as u64,
        n_control: k.n as u64,
        verdict: if enough && sized {
            judge(&harm, limit)
        } else {
            Verdict::Insufficient
        },
    }
}

fn latency_check(canary: Vec<f64>, control: Vec<f64>, gate: &QualityGate, enough: bool) -> Check {
    let limit = gate.max_latency_ratio;
    let (Some(c), Some(k)) = (Moments::of(&canary), Moments::of(&control)) else {
        let v = if canary.is_empty() && control.is_empty() {
            Verdict::NoData
        } else {
            Verdict::Insufficient
        };
        let mut check = Check::empty(limit, v);
        check.n_canary = canary.len() as u64;
        check.n_control = control.len() as u64;
        return check;
    };
    let mut check = Check {
        canary: Some(c.mean),
        control: Some(k.mean),
        harm: None,
        limit,
        n_canary: c.n as u64,
        n_control: k.n as u64,
        verdict: Verdict::Insufficient,
    };
    if !(c.mean > 0.0 && k.mean > 0.0) {
        return check;
    }
    let (sc, sk) = (c.se2(0.01 * c.mean), k.se2(0.01 * k.mean));
    let (rc, rk) = (sc / (c.mean * c.mean), sk / (k.mean * k.mean));
    let t = stats::t_quantile(gate.confidence, stats::welch_df(rc, c.n, rk, k.n));
    let log_ratio = (c.mean / k.mean).ln();
    let half = t * (rc + rk).sqrt();
    let harm = Interval {
        estimate: log_ratio.exp(),
        low: (log_ratio - half).exp(),
        high: (log_ratio + half).exp(),
    };
    let sized = c.n >= gate.min_canary_devices as usize && k.n >= gate.min_control_devices as usize;
    check.verdict = if enough && sized {
        judge(&harm, limit)
    } else {
        Verdict::Insufficient
    };
    check.harm = Some(harm);
    check
}

fn resets_check(
    canary: &BTreeMap<String, DeviceTotals>,
    control: &BTreeMap<String, DeviceTotals>,
    gate: &QualityGate,
    enough: bool,
) -> Check {
    let limit = gate.max_reset_increase;
    let side = |t: &BTreeMap<String, DeviceTotals>| {
        t.values().fold((0u64, 0u64), |(r, w), d| {
            (r + d.resets, w + u64::from(d.windows))
        })
    };
    let ((rc, wc), (rk, wk)) = (side(canary), side(control));
    if wc == 0 && wk == 0 {
        return Check::empty(limit, Verdict::NoData);
    }
    let mut check = Check::empty(limit, Verdict::Insufficient);
    check.n_canary = wc;
    check.n_control = wk;
    if wc == 0 || wk == 0 {
        return check;
    }
    let (wcf, wkf) = (wc as f64, wk as f64);
    let (lc, lk) = (rc as f64 / wcf, rk as f64 / wkf);
    let var = (rc as f64 + 0.5) / (wcf * wcf) + (rk as f64 + 0.5) / (wkf * wkf);
    let half = stats::normal_quantile(gate.confidence) * var.sqrt();
    let harm = Interval {
        estimate: lc - lk,
        low: lc - lk - half,
        high: lc - lk + half,
    };
    check.canary = Some(lc);
    check.control = Some(lk);
    check.harm = Some(harm);
    check.verdict = if enough {
        judge(&harm, limit)
    } else {
        Verdict::Insufficient
    };
    check
}

/// The quality gate at one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    /// Devices with folded windows on each side, and windows folded.
    pub canary_devices: u32,
    pub control_devices: u32,
    pub windows: u32,
    pub labelled: Check,
    pub estimated: Check,
    pub latency: Check,
    pub resets: Check,
    pub verdict: Verdict,
    pub reason: String,
}

impl QualityReport {
    fn new(
        canary_devices: u32,
        control_devices: u32,
        windows: u32,
        [labelled, estimated, latency, resets]: [Check; 4],
        gate: &QualityGate,
    ) -> Self {
        let named = [
            ("labelled accuracy", &labelled),
            ("estimated accuracy", &estimated),
            ("latency", &latency),
            ("resets", &resets),
        ];
        let with = |v: Verdict| -> Vec<&str> {
            named
                .iter()
                .filter(|(_, c)| c.verdict == v)
                .map(|(n, _)| *n)
                .collect()
        };
        let (failing, unsure) = (with(Verdict::Fail), with(Verdict::Inconclusive));
        let accuracy_shown =
            labelled.verdict == Verdict::Pass || estimated.verdict == Verdict::Pass;
        let (verdict, reason) = if !failing.is_empty() {
            (
                Verdict::Fail,
                format!(
                    "canary worse than control beyond the limit: {}",
                    failing.join(", ")
                ),
            )
        } else if !unsure.is_empty() {
            (
                Verdict::Inconclusive,
                format!("not yet shown within the limit: {}", unsure.join(", ")),
            )
        } else if accuracy_shown || !gate.required {
            (Verdict::Pass, String::new())
        } else if canary_devices < gate.min_canary_devices
            || control_devices < gate.min_control_devices
            || windows < gate.min_windows
        {
            (
                Verdict::Insufficient,
                format!(
                    "{canary_devices} canary / {control_devices} control devices over {windows} \
                     windows (need {} / {} over {})",
                    gate.min_canary_devices, gate.min_control_devices, gate.min_windows
                ),
            )
        } else {
            (
                Verdict::Insufficient,
                "no accuracy evidence yet (labels or CBPE estimates)".to_owned(),
            )
        };
        Self {
            canary_devices,
            control_devices,
            windows,
            labelled,
            estimated,
            latency,
            resets,
            verdict,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(
        device: usize,
        window: i64,
        version: &str,
        correct: u64,
        total: u64,
    ) -> QualityObservation {
        QualityObservation {
            device: format!("d{device}"),
            window_start_ms: window,
            on_version: version.into(),
            labelled_correct: correct,
            labelled_total: total,
            estimated_accuracy: Some(correct as f64 / total.max(1) as f64),
            mean_latency_us: Some(1000.0 + device as f64),
            resets: 0,
        }
    }

    fn side(o: &QualityObservation) -> Option<Side> {
        match o.on_version.as_str() {
            "new" => Some(Side::Canary),
            "old" => Some(Side::Control),
            _ => None,
        }
    }

    fn fleet(state: &mut QualityState, window: i64, canary_acc: f64) {
        let mut batch = Vec::new();
        for d in 0..40 {
            let (v, acc) = if d < 10 {
                ("new", canary_acc)
            } else {
                ("old", 0.9)
            };
            // Device-level spread of +-1 point.
            let acc = acc + (d % 3) as f64 * 0.01 - 0.01;
            batch.push(obs(d, window, v, (acc * 200.0).round() as u64, 200));
        }
        state.fold(&batch, side);
    }

    #[test]
    fn only_windows_with_both_sides_count_and_each_once() {
        let mut s = QualityState::default();
        let only_control: Vec<_> = (10..20).map(|d| obs(d, 0, "old", 90, 100)).collect();
        let intake = s.fold(&only_control, side);
        assert_eq!((intake.paired_windows, intake.unpaired_windows), (0, 1));
        assert!(s.canary.is_empty() && s.control.is_empty());
        fleet(&mut s, 600, 0.9);
        let before = s.clone();
        fleet(&mut s, 600, 0.9);
        assert_eq!(s.canary, before.canary);
        assert_eq!(s.paired_windows, 1);
        let stray = s.fold(&[obs(1, 1200, "other", 1, 1)], side);
        assert_eq!(stray.ignored, 1);
        let bad = s.fold(&[obs(1, 1800, "new", 5, 1)], side);
        assert_eq!(bad.ignored, 1);
    }

    #[test]
    fn equal_models_pass_and_a_drop_fails() {
        let gate = QualityGate::default();
        let mut good = QualityState::default();
        let mut bad = QualityState::default();
        for w in 0..3 {
            fleet(&mut good, w * 600, 0.9);
            fleet(&mut bad, w * 600, 0.8);
        }
        let r = good.evaluate(&gate);
        assert_eq!(r.verdict, Verdict::Pass, "{r:#?}");
        let r = bad.evaluate(&gate);
        assert_eq!(r.verdict, Verdict::Fail, "{r:#?}");
        assert_eq!(r.labelled.verdict, Verdict::Fail);
        assert!(r.labelled.harm.is_some_and(|h| h.estimate > 0.09));
        assert!(r.reason.contains("labelled accuracy"), "{}", r.reason);
    }

    #[test]
    fn too_little_evidence_decides_nothing() {
        let gate = QualityGate::default();
        let mut s = QualityState::default();
        fleet(&mut s, 0, 0.5);
        // One window of two needed: even a large drop is not a decision yet.
        let r = s.evaluate(&gate);
        assert_eq!(r.verdict, Verdict::Insufficient, "{r:#?}");
        // Without any quality data the gate can be waived.
        let empty = QualityState::default().evaluate(&QualityGate {
            required: false,
            ..gate.clone()
        });
        assert_eq!(empty.verdict, Verdict::Pass);
        assert_eq!(empty.labelled.verdict, Verdict::NoData);
        assert_eq!(
            QualityState::default().evaluate(&gate).verdict,
            Verdict::Insufficient
        );
    }

    #[test]
    fn a_small_drop_near_the_limit_is_inconclusive() {
        let gate = QualityGate::default();
        let mut s = QualityState::default();
        for w in 0..3 {
            fleet(&mut s, w * 600, 0.88);
        }
        let r = s.evaluate(&gate);
        assert_eq!(r.verdict, Verdict::Inconclusive, "{r:#?}");
    }

    #[test]
    fn slow_or_crashing_canaries_fail() {
        let gate = QualityGate::default();
        let mut s = QualityState::default();
        for w in 0..3 {
            let batch: Vec<_> = (0..40)
                .map(|d| {
                    let mut o = obs(d, w * 600, if d < 10 { "new" } else { "old" }, 90, 100);
                    if d < 10 {
                        o.mean_latency_us = Some(2000.0 + d as f64);
                        o.resets = 1;
                    }
                    o
                })
                .collect();
            s.fold(&batch, side);
        }
        let r = s.evaluate(&gate);
        assert_eq!(r.latency.verdict, Verdict::Fail, "{r:#?}");
        assert_eq!(r.resets.verdict, Verdict::Fail);
        assert_eq!(r.verdict, Verdict::Fail);
    }

    #[test]
    fn remembered_windows_are_bounded() {
        let mut s = QualityState::default();
        for w in 0..(REMEMBERED_WINDOWS as i64 + 10) {
            s.fold(&[obs(1, w, "new", 1, 1), obs(20, w, "old", 1, 1)], side);
        }
        assert_eq!(s.seen_windows.len(), REMEMBERED_WINDOWS);
        assert_eq!(s.floor_ms, Some(9));
        assert_eq!(
            s.fold(&[obs(1, 3, "new", 1, 1), obs(20, 3, "old", 1, 1)], side)
                .ignored,
            2
        );
    }
}
