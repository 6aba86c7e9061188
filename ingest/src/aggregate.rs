//! The aggregate stage: summaries merged per device and per cohort per time window.
//!
//! A [`WindowAgg`] is the sum of the summaries that fell into one window: histograms add,
//! moments pool, health keeps minima, sums and counts. Adding is associative and commutative,
//! so the order summaries arrive in never matters, and re-aggregation from stored windows gives
//! the same result as aggregating live.

use serde::{Deserialize, Serialize};
use tinyfleet_device::decoded::{DecodedSummary, HistCounts};
use tinyfleet_device::wire::reset;

/// Counts of one histogram.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HistAgg {
    pub bins: Vec<u64>,
    pub underflow: u64,
    pub overflow: u64,
    pub nan: u64,
}

impl HistAgg {
    fn add(&mut self, h: &HistCounts) {
        add_into(&mut self.bins, &h.bins);
        self.underflow += u64::from(h.underflow);
        self.overflow += u64::from(h.overflow);
        self.nan += u64::from(h.nan);
    }

    fn merge(&mut self, o: &HistAgg) {
        add_into(&mut self.bins, &o.bins);
        self.underflow += o.underflow;
        self.overflow += o.overflow;
        self.nan += o.nan;
    }

    pub fn total(&self) -> u64 {
        self.bins.iter().sum::<u64>() + self.underflow + self.overflow + self.nan
    }
}

fn add_into<T: Copy + Into<u64>>(acc: &mut Vec<u64>, add: &[T]) {
    if acc.len() < add.len() {
        acc.resize(add.len(), 0);
    }
    for (a, &b) in acc.iter_mut().zip(add) {
        *a += b.into();
    }
}

fn add_matrix<T: Copy + Into<u64>>(acc: &mut Vec<Vec<u64>>, add: &[Vec<T>]) {
    if acc.len() < add.len() {
        acc.resize(add.len(), Vec::new());
    }
    for (a, b) in acc.iter_mut().zip(add) {
        add_into(a, b);
    }
}

/// One feature: its histogram and pooled moments (normalised units, see protocol.md).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FeatureAgg {
    pub hist: HistAgg,
    /// Pooling sums: weight (finite values), weight x mean, weight x (sd^2 + mean^2).
    pub w: f64,
    pub wm: f64,
    pub wq: f64,
}

impl FeatureAgg {
    /// Pooled mean of the window, `None` without data.
    pub fn mean(&self) -> Option<f64> {
        (self.w > 0.0).then(|| self.wm / self.w)
    }

    /// Pooled standard deviation of the window.
    pub fn sd(&self) -> Option<f64> {
        let m = self.mean()?;
        Some((self.wq / self.w - m * m).max(0.0).sqrt())
    }
}

/// Health over a window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HealthAgg {
    pub battery_min_mv: Option<u16>,
    pub battery_sum_mv: u64,
    pub battery_n: u64,
    pub rssi_sum_dbm: i64,
    pub rssi_n: u64,
    pub min_free_heap: Option<u32>,
    /// Reboots seen (a summary from a new boot), and those that were watchdog, brown-out or
    /// fault resets.
    pub reboots: u64,
    pub bad_resets: u64,
    /// Summaries the devices reported as dropped on their side.
    pub dropped: u64,
}

/// The aggregate of one window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WindowAgg {
    pub summaries: u64,
    pub inferences: u64,
    /// Model sequence number of the profile whose bins the histograms hold (the first
    /// summary's). Summaries binned with another profile (a device that switched models in the
    /// middle of the window) count in `shape_mismatches` and stay out of the histograms, so a
    /// window never mixes two models' bins.
    pub profile: Option<u32>,
    pub features: Vec<FeatureAgg>,
    pub classes: Vec<u64>,
    pub confidence: Vec<Vec<u64>>,
    pub latency: HistAgg,
    pub confusion: Vec<Vec<u64>>,
    /// Summaries whose shape or profile differed from the window's first one (not merged into
    /// histograms).
    pub shape_mismatches: u64,
    pub health: HealthAgg,
    /// Summaries lost in transit (sequence gaps), net of late arrivals.
    pub lost_summaries: i64,
}

impl WindowAgg {
    fn shape_matches(&self, s: &DecodedSummary) -> bool {
        self.summaries == 0
            || (self.features.len() == s.features.len()
                && self.profile.is_none_or(|p| p == s.profile)
                && self
                    .features
                    .first()
                    .zip(s.features.first())
                    .is_none_or(|(a, b)| a.hist.bins.len() == b.hist.bins.len())
                && self.classes.len() == s.classes.len()
                && self.latency.bins.len() == s.latency.bins.len())
    }

    /// Adds one summary. `new_boot` is true when it is the first summary of a boot the backend
    /// had not seen from this device.
    pub fn add(&mut self, s: &DecodedSummary, new_boot: bool) {
        if !self.shape_matches(s) {
            self.shape_mismatches += 1;
        } else {
            self.add_counts(s);
        }
        self.add_totals(s, new_boot);
    }

    /// Adds one summary as [`WindowAgg::merge`] would add the one-summary aggregate
    /// `{ add(s, new_boot); lost_summaries = lost }`, without building it: this is how ingest
    /// aggregates, into the device window and each cohort window of the summary.
    ///
    /// So a summary's shape is compared with the window's by feature count only (as `merge`
    /// does); histograms of other lengths add element-wise, growing where longer.
    pub fn merge_summary(&mut self, s: &DecodedSummary, new_boot: bool, lost: i64) {
        let profile_differs = self.profile.is_some_and(|p| p != s.profile);
        if self.summaries > 0 && (self.features.len() != s.features.len() || profile_differs) {
            self.shape_mismatches += 1;
        } else {
            self.add_counts(s);
        }
        self.add_totals(s, new_boot);
        self.lost_summaries += lost;
    }

    /// Histograms, moments, classes, confidence, latency and confusion of one summary.
    fn add_counts(&mut self, s: &DecodedSummary) {
        if self.features.len() < s.features.len() {
            self.features
                .resize(s.features.len(), FeatureAgg::default());
        }
        for (agg, f) in self.features.iter_mut().zip(&s.features) {
            agg.hist.add(&f.hist);
            let w = (f.hist.total() - u64::from(f.hist.nan)) as f64;
            let (m, sd) = (f64::from(f.mean), f64::from(f.sd));
            if w > 0.0 && m.is_finite() && sd.is_finite() {
                agg.w += w;
                agg.wm += w * m;
                agg.wq += w * (sd * sd + m * m);
            }
        }
        add_into(&mut self.classes, &s.classes);
        add_matrix(&mut self.confidence, &s.confidence);
        self.latency.add(&s.latency);
        if let Some(c) = &s.confusion {
            add_matrix(&mut self.confusion, c);
        }
    }

    /// Counts, profile and health of one summary.
    fn add_totals(&mut self, s: &DecodedSummary, new_boot: bool) {
        self.summaries += 1;
        self.inferences += s.inferences();
        self.profile = self.profile.or(Some(s.profile));
        let h = &mut self.health;
        if let Some(mv) = s.health.battery_mv {
            h.battery_min_mv = Some(h.battery_min_mv.map_or(mv, |m| m.min(mv)));
            h.battery_sum_mv += u64::from(mv);
            h.battery_n += 1;
        }
        if let Some(rssi) = s.health.rssi_dbm {
            h.rssi_sum_dbm += i64::from(rssi);
            h.rssi_n += 1;
        }
        if let Some(heap) = s.health.min_free_heap {
            h.min_free_heap = Some(h.min_free_heap.map_or(heap, |m| m.min(heap)));
        }
        if new_boot {
            h.reboots += 1;
            if matches!(
                s.health.reset,
                reset::WATCHDOG | reset::BROWN_OUT | reset::FAULT
            ) {
                h.bad_resets += 1;
            }
        }
        h.dropped = h.dropped.max(u64::from(s.health.dropped));
    }

    /// Adds another window's aggregate into this one.
    pub fn merge(&mut self, o: &WindowAgg) {
        let profile_differs = matches!((self.profile, o.profile), (Some(a), Some(b)) if a != b);
        if self.summaries > 0
            && o.summaries > 0
            && (self.features.len() != o.features.len() || profile_differs)
        {
            self.shape_mismatches += o.summaries;
        } else {
            if self.features.len() < o.features.len() {
                self.features
                    .resize(o.features.len(), FeatureAgg::default());
            }
            for (a, b) in self.features.iter_mut().zip(&o.features) {
                a.hist.merge(&b.hist);
                a.w += b.w;
                a.wm += b.wm;
                a.wq += b.wq;
            }
            add_into(&mut self.classes, &o.classes);
            add_matrix(&mut self.confidence, &o.confidence);
            self.latency.merge(&o.latency);
            add_matrix(&mut self.confusion, &o.confusion);
        }
        self.summaries += o.summaries;
        self.inferences += o.inferences;
        self.profile = self.profile.or(o.profile);
        self.shape_mismatches += o.shape_mismatches;
        self.lost_summaries += o.lost_summaries;
        let (h, oh) = (&mut self.health, &o.health);
        h.battery_min_mv = min_opt(h.battery_min_mv, oh.battery_min_mv);
        h.min_free_heap = min_opt(h.min_free_heap, oh.min_free_heap);
        h.battery_sum_mv += oh.battery_sum_mv;
        h.battery_n += oh.battery_n;
        h.rssi_sum_dbm += oh.rssi_sum_dbm;
        h.rssi_n += oh.rssi_n;
        h.reboots += oh.reboots;
        h.bad_resets += oh.bad_resets;
        h.dropped = h.dropped.max(oh.dropped);
    }

    /// Observed accuracy from confusion counts, when any labels arrived.
    pub fn accuracy(&self) -> Option<f64> {
        let total: u64 = self.confusion.iter().flatten().sum();
        let right: u64 = self
            .confusion
            .iter()
            .enumerate()
            .filter_map(|(i, row)| row.get(i))
            .sum();
        (total > 0).then(|| right as f64 / total as f64)
    }
}

fn min_opt<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Start of the window of `window_ms` that holds `event_ms`.
pub fn window_start(event_ms: i64, window_ms: i64) -> i64 {
    event_ms.div_euclid(window_ms.max(1)) * window_ms.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tinyfleet_device::decoded::decode_summary;
    use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
    use tinyfleet_device::wire::{self, DeviceId, Kind, Topic};
    use tinyfleet_device::{DeviceKey, ReferenceMonitor};

    fn summary(seed: u64, n: usize, labels: bool) -> DecodedSummary {
        let profile = ReferenceProfile::default();
        let mut m = ReferenceMonitor::new(profile.config(1), 1, 0, 0);
        let mut rng = Rng::new(seed);
        for _ in 0..n {
            let s = sample(&mut rng, &StreamParams::default());
            m.record(&s.inference()).unwrap();
            if labels {
                m.record_label(s.predicted, s.actual).unwrap();
            }
        }
        m.set_battery_mv(3000 + seed as u16);
        let key = DeviceKey([1; 32]);
        let id = DeviceId::new("x").unwrap();
        let mut out = [0u8; 1024];
        let len = m.finish_window(1000, None, id, &key, &mut out).unwrap();
        let body = wire::open(Topic::new(id, Kind::Summary).as_str(), &key, &out[..len]).unwrap();
        decode_summary(body).unwrap()
    }

    #[test]
    fn a_model_switch_in_the_window_does_not_mix_bins() {
        let a = summary(1, 200, false);
        let mut b = summary(2, 300, false);
        b.profile = 2; // binned with the next model's profile
        for one_by_one in [true, false] {
            let mut agg = WindowAgg::default();
            if one_by_one {
                agg.merge_summary(&a, false, 0);
                agg.merge_summary(&b, false, 0);
            } else {
                let (mut x, mut y) = (WindowAgg::default(), WindowAgg::default());
                x.add(&a, false);
                y.add(&b, false);
                agg.merge(&x);
                agg.merge(&y);
            }
            assert_eq!(agg.profile, Some(1));
            assert_eq!(
                agg.features[0].hist.total(),
                200,
                "only the first profile's bins"
            );
            assert_eq!(
                (agg.summaries, agg.inferences, agg.shape_mismatches),
                (2, 500, 1)
            );
        }
    }

    #[test]
    fn pooled_moments_match_one_big_window() {
        let a = summary(1, 200, false);
        let b = summary(2, 300, false);
        let mut agg = WindowAgg::default();
        agg.add(&a, false);
        agg.add(&b, false);
        assert_eq!(agg.inferences, 500);
        assert_eq!(agg.features[0].hist.total(), 500);
        let m = agg.features[0].mean().unwrap();
        // N(0,1) normalised over [-3.09, 3.09]: mean near 0.5, sd near 1/6.18.
        assert!((m - 0.5).abs() < 0.03, "{m}");
        let sd = agg.features[0].sd().unwrap();
        assert!((sd - 1.0 / 6.18).abs() < 0.02, "{sd}");
        assert_eq!(agg.health.battery_min_mv, Some(3001));
    }

    #[test]
    fn accuracy_from_confusion() {
        let mut agg = WindowAgg::default();
        agg.add(&summary(3, 400, true), false);
        let acc = agg.accuracy().unwrap();
        assert!((acc - 0.9).abs() < 0.05, "{acc}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn add_order_and_merge_grouping_do_not_matter(seeds in proptest::collection::vec((0u64..1000, 0usize..80, any::<bool>()), 1..6)) {
            let sums: Vec<_> = seeds.iter().map(|&(s, n, l)| summary(s, n, l)).collect();
            let mut fwd = WindowAgg::default();
            sums.iter().for_each(|s| fwd.add(s, false));
            let mut rev = WindowAgg::default();
            sums.iter().rev().for_each(|s| rev.add(s, false));
            let mut merged = WindowAgg::default();
            for s in &sums {
                let mut one = WindowAgg::default();
                one.add(s, false);
                merged.merge(&one);
            }
            for other in [&rev, &merged] {
                prop_assert_eq!(&fwd.classes, &other.classes);
                prop_assert_eq!(&fwd.confidence, &other.confidence);
                prop_assert_eq!(&fwd.confusion, &other.confusion);
                prop_assert_eq!(fwd.inferences, other.inferences);
                for (a, b) in fwd.features.iter().zip(&other.features) {
                    prop_assert_eq!(&a.hist, &b.hist);
                    prop_assert!((a.wm - b.wm).abs() < 1e-6 * (1.0 + a.wm.abs()));
                }
            }
        }
    }

    /// A summary, reshaped by `shape` (0: as is, 1: one feature fewer, 2: shorter first
    /// histogram, 3: two classes fewer) so windows see mismatches.
    fn reshaped(seed: u64, n: usize, labels: bool, shape: u8) -> DecodedSummary {
        let mut s = summary(seed, n, labels);
        match shape {
            1 => {
                s.features.pop();
            }
            2 => {
                s.features[0].hist.bins.truncate(5);
            }
            3 => {
                s.classes.truncate(8);
                s.confidence.truncate(8);
            }
            _ => {}
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// `merge_summary` is exactly `merge` of the one-summary aggregate, shapes that differ
        /// included (serialised the same, so the stored JSON is too).
        #[test]
        fn merge_summary_is_merge_of_one(
            steps in proptest::collection::vec(
                (0u64..1000, 0usize..60, any::<bool>(), 0u8..4, any::<bool>(), -3i64..5), 1..8)) {
            let mut direct = WindowAgg::default();
            let mut merged = WindowAgg::default();
            for &(seed, n, labels, shape, new_boot, lost) in &steps {
                let s = reshaped(seed, n, labels, shape);
                direct.merge_summary(&s, new_boot, lost);
                let mut one = WindowAgg::default();
                one.add(&s, new_boot);
                one.lost_summaries = lost;
                merged.merge(&one);
                prop_assert_eq!(&direct, &merged);
                prop_assert_eq!(
                    serde_json::to_string(&direct).unwrap(),
                    serde_json::to_string(&merged).unwrap()
                );
            }
        }
    }

    #[test]
    fn windows_are_aligned() {
        assert_eq!(window_start(299_999, 300_000), 0);
        assert_eq!(window_start(300_000, 300_000), 300_000);
        assert_eq!(window_start(-1, 300_000), -300_000);
    }
}
