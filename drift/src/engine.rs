//! The drift engine: from closed windows of device aggregates to scores and findings.
//!
//! Each evaluation takes one closed window of every device (its aggregate, model, hardware and
//! tags) and:
//!
//! 1. checks every device's features for **sensor faults** (NaN bursts, readings all out of
//!    range, a stuck or constant reading) and leaves faulty devices out of the cohorts, so one
//!    broken sensor is reported as a device fault, never as cohort drift;
//! 2. builds the **scopes**: per model version (fleet-wide), per model version and hardware,
//!    per model version and user tag, and per device;
//! 3. **pools** each scope's windows until it holds `min_inferences` (a device seeing 100
//!    inferences per window is tested every few windows, a large cohort every window);
//! 4. tests each pooled scope against the model's monitoring profile: per feature the
//!    two-sample chi-square (its critical PSI depends on the sample sizes and cell count) with PSI
//!    and Jensen-Shannon distance as effect sizes; the predicted-class histogram (label shift);
//!    inference latency; observed accuracy from confusion counts (one-sided test against the
//!    reference accuracy over a sliding horizon, DDM's rule); and the confidence-based
//!    performance estimate (CBPE) with its band;
//! 5. controls false alarms: Benjamini-Hochberg over every test of the evaluation (all features
//!    x scopes x devices), an effect-size floor (a significant but tiny PSI on a huge sample is
//!    not drift), and persistence (several consecutive significant evaluations of a scope);
//! 6. **localises**: a finding in a wide scope that a narrower flagged scope explains (the wide
//!    scope without the narrower one's devices is not drifted) is left out, and a cohort finding
//!    carried by at most `max_local_devices` devices is reported as those devices' drift instead.
//!
//! Plain synchronous code: the caller hands in windows and profiles and gets an
//! [`Evaluation`]; persisting scores and raising alerts is the service's job.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tinyfleet_ingest::aggregate::{FeatureAgg, HistAgg, WindowAgg};

use crate::profile::{HistProfile, MonitoringProfile};
use crate::stats;

/// Detector settings; the defaults work out of the box.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    /// False-discovery rate over all tests of one evaluation.
    pub fdr: f64,
    /// A scope is tested once its pooled windows hold this many inferences.
    pub min_inferences: u64,
    /// A scope's pool is dropped untested after this many windows without reaching the minimum.
    pub max_pool_windows: u32,
    /// Effect-size floor: drift needs a PSI at least this large (besides significance).
    pub psi_floor: f64,
    /// The floor for one device's windows (small and noisy samples).
    pub device_psi_floor: f64,
    /// Consecutive significant evaluations of a scope before a finding is reported.
    pub persistence: u32,
    /// A cohort finding carried by at most this many devices is reported as device drift.
    pub max_local_devices: usize,
    /// Sensor faults: share of NaN readings in a window.
    pub nan_fraction: f64,
    /// Sensor faults: share of readings outside the profile's range.
    pub out_of_range_fraction: f64,
    /// Sensor faults: share of finite readings in a single bin (where the reference puts at most
    /// half of its mass in any bin).
    pub stuck_bin_share: f64,
    /// Fewest readings in a device window to judge a sensor fault.
    pub fault_min_readings: u64,
    /// Labelled accuracy: z score of the error rate above the reference's (DDM uses 3).
    pub accuracy_z: f64,
    /// Labelled accuracy: fewest labels before testing.
    pub accuracy_min_labels: u64,
    /// Labelled accuracy: evaluations summed into the tested error rate.
    pub accuracy_horizon: usize,
    /// CBPE: an estimated accuracy drop must exceed this (besides its band).
    pub cbpe_tolerance: f64,
    /// CBPE: the band is this many standard errors.
    pub cbpe_sigmas: f64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            fdr: 0.01,
            min_inferences: 400,
            max_pool_windows: 24,
            psi_floor: 0.1,
            device_psi_floor: 0.2,
            persistence: 2,
            max_local_devices: 2,
            nan_fraction: 0.2,
            out_of_range_fraction: 0.9,
            stuck_bin_share: 0.95,
            fault_min_readings: 20,
            accuracy_z: 3.0,
            accuracy_min_labels: 30,
            accuracy_horizon: 12,
            cbpe_tolerance: 0.03,
            cbpe_sigmas: 3.0,
        }
    }
}

impl DriftConfig {
    /// Checks the settings; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if v > 0.0 && v < 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "drift.{name} must be between 0 and 1 (exclusive), got {v}"
                ))
            }
        };
        unit("fdr", self.fdr)?;
        unit("nan_fraction", self.nan_fraction)?;
        unit("out_of_range_fraction", self.out_of_range_fraction)?;
        unit("stuck_bin_share", self.stuck_bin_share)?;
        if self.min_inferences == 0 {
            return Err("drift.min_inferences must be at least 1".into());
        }
        if self.persistence == 0 {
            return Err("drift.persistence must be at least 1".into());
        }
        if self.accuracy_horizon == 0 {
            return Err("drift.accuracy_horizon must be at least 1".into());
        }
        if !(self.psi_floor >= 0.0 && self.cbpe_tolerance >= 0.0 && self.accuracy_z > 0.0) {
            return Err("drift.psi_floor, cbpe_tolerance must be >= 0 and accuracy_z > 0".into());
        }
        Ok(())
    }
}

/// Monitoring profiles by model id and version.
pub trait Profiles {
    fn profile(&self, model_id: &str, model_version: &str) -> Option<&MonitoringProfile>;
}

impl Profiles for HashMap<(String, String), MonitoringProfile> {
    fn profile(&self, model_id: &str, model_version: &str) -> Option<&MonitoringProfile> {
        self.get(&(model_id.to_owned(), model_version.to_owned()))
    }
}

/// One device's closed window.
#[derive(Debug, Clone)]
pub struct DeviceWindow {
    pub device: String,
    pub model_id: String,
    pub model_version: String,
    pub hw: String,
    pub tags: BTreeMap<String, String>,
    pub agg: WindowAgg,
}

/// What a scope covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    /// Every device running the model version.
    Model,
    /// The model version on one hardware.
    Hardware,
    /// The model version on devices with one user tag.
    Tag,
    /// One device.
    Device,
}

/// A population the engine tests: a cohort or one device, always within one model version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scope {
    pub kind: ScopeKind,
    pub model_id: String,
    pub model_version: String,
    /// `""` (model), the hardware, `key=value` (tag) or the device id.
    pub key: String,
}

impl Scope {
    /// Stable display id: `model@version`, `model@version/hw=X`, `model@version/site=a`,
    /// `model@version/device=D`.
    pub fn id(&self) -> String {
        let base = format!("{}@{}", self.model_id, self.model_version);
        match self.kind {
            ScopeKind::Model => base,
            ScopeKind::Hardware => format!("{base}/hw={}", self.key),
            ScopeKind::Tag => format!("{base}/{}", self.key),
            ScopeKind::Device => format!("{base}/device={}", self.key),
        }
    }

    fn is_cohort(&self) -> bool {
        self.kind != ScopeKind::Device
    }
}

/// What a test looked at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "name")]
pub enum Subject {
    /// An input feature, by profile name.
    Feature(String),
    /// The predicted-class histogram (prior / label shift).
    Classes,
    /// Inference latency.
    Latency,
    /// Observed accuracy from confusion counts.
    Accuracy,
    /// Confidence-based accuracy estimate.
    EstimatedAccuracy,
}

impl Subject {
    pub fn label(&self) -> String {
        match self {
            Self::Feature(f) => f.clone(),
            Self::Classes => "classes".into(),
            Self::Latency => "latency".into(),
            Self::Accuracy => "accuracy".into(),
            Self::EstimatedAccuracy => "estimated_accuracy".into(),
        }
    }
}

/// One distribution test of one pooled scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub scope: Scope,
    pub subject: Subject,
    pub window_start_ms: i64,
    /// Inferences (or labels, for accuracy) in the pooled sample.
    pub n: u64,
    /// Windows pooled.
    pub windows: u32,
    pub psi: Option<f64>,
    /// The PSI that is significant at the FDR level for these sample sizes.
    pub psi_critical: Option<f64>,
    pub js: Option<f64>,
    pub chi2: Option<f64>,
    /// `None` when the statistic is below the FDR level's critical value (never significant).
    pub p_value: Option<f64>,
    /// Accuracy tests: the estimate (CBPE) or the observed accuracy.
    pub accuracy: Option<f64>,
    /// CBPE: half-width of the band.
    pub band: Option<f64>,
    /// CBPE: the observed accuracy over the same horizon, where labels exist.
    pub observed_accuracy: Option<f64>,
    pub reference_accuracy: Option<f64>,
    /// A Benjamini-Hochberg discovery with an effect above the floor.
    pub significant: bool,
    /// Consecutive significant evaluations so far.
    pub streak: u32,
}

/// A sensor fault seen in one device window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Many readings were NaN.
    NanBurst,
    /// (Almost) every reading was outside the profile's range.
    OutOfRange,
    /// The readings did not vary at all.
    ZeroVariance,
    /// (Almost) every reading fell in one bin, where the reference spreads out.
    Stuck,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NanBurst => "nan_burst",
            Self::OutOfRange => "out_of_range",
            Self::ZeroVariance => "zero_variance",
            Self::Stuck => "stuck",
        }
    }
}

/// What a finding says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum FindingKind {
    /// A cohort's input feature distribution moved (covariate shift).
    FeatureDrift { feature: String },
    /// One device's feature differs from the reference while its cohort does not.
    DeviceDrift { feature: String },
    /// The predicted-class distribution moved (prior / label shift).
    LabelShift,
    /// Inference latency moved.
    LatencyShift,
    /// Observed accuracy (labels) is significantly below the reference.
    AccuracyDrop {
        observed: f64,
        reference: f64,
        labels: u64,
    },
    /// The confidence-based estimate is significantly below the reference.
    EstimatedAccuracyDrop {
        estimate: f64,
        band: f64,
        reference: f64,
        observed: Option<f64>,
    },
    /// A device's sensor is broken.
    SensorFault { feature: String, fault: Fault },
}

impl FindingKind {
    /// Alert name.
    pub fn alertname(&self) -> &'static str {
        match self {
            Self::FeatureDrift { .. } => "FeatureDrift",
            Self::DeviceDrift { .. } => "DeviceFeatureDrift",
            Self::LabelShift => "PredictionShift",
            Self::LatencyShift => "LatencyShift",
            Self::AccuracyDrop { .. } => "AccuracyDrop",
            Self::EstimatedAccuracyDrop { .. } => "EstimatedAccuracyDrop",
            Self::SensorFault { .. } => "SensorFault",
        }
    }

    /// Alert class: `drift`, `quality` or `fault`.
    pub fn class(&self) -> &'static str {
        match self {
            Self::FeatureDrift { .. }
            | Self::DeviceDrift { .. }
            | Self::LabelShift
            | Self::LatencyShift => "drift",
            Self::AccuracyDrop { .. } | Self::EstimatedAccuracyDrop { .. } => "quality",
            Self::SensorFault { .. } => "fault",
        }
    }
}

/// Something worth telling an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub scope: Scope,
    pub kind: FindingKind,
    pub window_start_ms: i64,
    /// The score behind it (PSI for distributions, the accuracy drop for quality).
    pub value: f64,
    pub summary: String,
}

impl Finding {
    /// Alert labels: `alertname`, `kind`, `model`, `model_version`, `scope`, and `feature`,
    /// `device`, `fault` where they apply.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            ("alertname".to_owned(), self.kind.alertname().to_owned()),
            ("kind".to_owned(), self.kind.class().to_owned()),
            ("model".to_owned(), self.scope.model_id.clone()),
            ("model_version".to_owned(), self.scope.model_version.clone()),
            ("scope".to_owned(), self.scope.id()),
        ]);
        if self.scope.kind == ScopeKind::Device {
            l.insert("device".into(), self.scope.key.clone());
        }
        match &self.kind {
            FindingKind::FeatureDrift { feature } | FindingKind::DeviceDrift { feature } => {
                l.insert("feature".into(), feature.clone());
            }
            FindingKind::SensorFault { feature, fault } => {
                l.insert("feature".into(), feature.clone());
                l.insert("fault".into(), fault.as_str().into());
            }
            _ => {}
        }
        l
    }
}

/// Scope sizes of one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalStats {
    pub devices: usize,
    /// Devices whose model version has no monitoring profile (not evaluated).
    pub without_profile: usize,
    pub faulty_devices: usize,
    pub scopes_tested: usize,
    pub tests: usize,
    pub discoveries: usize,
}

/// The result of one evaluation.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub window_start_ms: i64,
    /// Every cohort-level test, and device-level tests that were significant.
    pub scores: Vec<Score>,
    pub findings: Vec<Finding>,
    pub stats: EvalStats,
    /// Pooled aggregates of the cohorts with findings (for retraining triggers).
    pub evidence: HashMap<Scope, WindowAgg>,
}

/// A scope's pooled windows and its test history.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ScopeState {
    pool: WindowAgg,
    pooled_windows: u32,
    /// Consecutive significant evaluations per subject.
    #[serde(with = "pairs")]
    streaks: HashMap<Subject, u32>,
    /// Recent (errors, labels) of evaluated pools, newest last.
    accuracy: Vec<(u64, u64)>,
}

impl ScopeState {
    /// Adds one window. Once the pool holds `min_inferences`, returns the sample to test and
    /// the windows in it: `None` as the sample means `agg` alone is enough (tested where it
    /// lies, nothing copied). A pool that stays short for `max_pool_windows` is dropped.
    fn add(&mut self, agg: &WindowAgg, cfg: &DriftConfig) -> Option<(Option<WindowAgg>, u32)> {
        self.pooled_windows += 1;
        let sample = if self.pool.inferences == 0 && agg.inferences >= cfg.min_inferences {
            None
        } else {
            self.pool.merge(agg);
            if self.pool.inferences < cfg.min_inferences {
                if self.pooled_windows >= cfg.max_pool_windows {
                    self.pool = WindowAgg::default();
                    self.pooled_windows = 0;
                }
                return None;
            }
            Some(std::mem::take(&mut self.pool))
        };
        Some((sample, std::mem::take(&mut self.pooled_windows)))
    }
}

/// The detector with its per-scope state (serialisable, so it survives restarts).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Engine {
    config: DriftConfig,
    #[serde(with = "pairs")]
    scopes: HashMap<Scope, ScopeState>,
    /// Device scopes by device id.
    devices: HashMap<String, ScopeState>,
}

mod pairs {
    //! JSON objects need string keys; maps with structured keys are stored as lists of pairs.
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::HashMap;
    use std::hash::Hash;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &HashMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        m.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// One test before false-discovery control.
struct Pending {
    score: Score,
    /// Effect large enough (PSI floor, accuracy tolerance).
    effect: bool,
}

/// Cells of a feature histogram
/// (Neighbours adjacent, as the chi-square's sparse-cell merging wants: underflow, bins,
/// overflow, then NaN.)
fn cells(h: &HistAgg, bins: usize, out: &mut Vec<u64>) {
    out.clear();
    out.push(h.underflow);
    out.extend((0..bins).map(|i| h.bins.get(i).copied().unwrap_or(0)));
    out.extend([h.overflow, h.nan]);
}

/// PSI of a window's feature histogram against the profile's reference, over the cells the
/// engine tests (underflow, bins, overflow, NaN); `None` when the window has no value.
pub fn feature_psi(reference: &HistProfile, current: &HistAgg) -> Option<f64> {
    if current.total() == 0 {
        return None;
    }
    let mut cur = Vec::new();
    cells(current, reference.counts.len(), &mut cur);
    Some(stats::psi(&profile_cells(reference), &cur))
}

fn profile_cells(h: &HistProfile) -> Vec<u64> {
    let mut v = Vec::with_capacity(h.counts.len() + 3);
    v.push(h.underflow);
    v.extend_from_slice(&h.counts);
    v.extend([h.overflow, h.nan]);
    v
}

/// Devices alike in model version, hardware and tags.
type GroupKey<'a> = (&'a str, &'a str, &'a str, &'a BTreeMap<String, String>);

/// A model version's profile with what every device test needs of it, computed once per
/// evaluation.
struct Reference<'p> {
    profile: &'p MonitoringProfile,
    features: Vec<ReferenceShape>,
}

impl<'p> Reference<'p> {
    fn of(profile: &'p MonitoringProfile) -> Self {
        Self {
            profile,
            features: profile
                .features
                .iter()
                .map(|f| ReferenceShape::of(&f.hist))
                .collect(),
        }
    }
}

/// The profile of a model version, if it has one.
fn reference_of<'m, 'p>(
    by_model: &'m HashMap<(&'m str, &'m str), Option<Reference<'p>>>,
    model_id: &'m str,
    model_version: &'m str,
) -> Option<&'m Reference<'p>> {
    by_model.get(&(model_id, model_version))?.as_ref()
}

/// One feature's reference: its cells and the shares the fault checks compare with.
#[derive(Debug, Clone)]
struct ReferenceShape {
    cells: Vec<u64>,
    nan_share: f64,
    out_share: f64,
    max_bin_share: f64,
}

impl ReferenceShape {
    fn of(reference: &HistProfile) -> Self {
        let total = (reference.counts.iter().sum::<u64>()
            + reference.underflow
            + reference.overflow
            + reference.nan)
            .max(1) as f64;
        Self {
            cells: profile_cells(reference),
            nan_share: reference.nan as f64 / total,
            out_share: (reference.underflow + reference.overflow) as f64 / total,
            max_bin_share: reference.counts.iter().copied().max().unwrap_or(0) as f64 / total,
        }
    }

    fn fault(&self, f: &FeatureAgg, config: &DriftConfig) -> Option<Fault> {
        let total =
            f.hist.underflow + f.hist.overflow + f.hist.nan + f.hist.bins.iter().sum::<u64>();
        if total < config.fault_min_readings {
            return None;
        }
        if f.hist.nan as f64 / total as f64 >= config.nan_fraction
            && self.nan_share < config.nan_fraction / 2.0
        {
            return Some(Fault::NanBurst);
        }
        let finite = total - f.hist.nan;
        if finite < config.fault_min_readings {
            return None;
        }
        let out = (f.hist.underflow + f.hist.overflow) as f64 / finite as f64;
        if out >= config.out_of_range_fraction
            && self.out_share < config.out_of_range_fraction / 2.0
        {
            return Some(Fault::OutOfRange);
        }
        if f.sd().is_some_and(|sd| sd <= 1e-6) {
            return Some(Fault::ZeroVariance);
        }
        let max_share = f.hist.bins.iter().copied().max().unwrap_or(0) as f64 / finite as f64;
        if self.max_bin_share <= 0.5 && max_share >= config.stuck_bin_share {
            return Some(Fault::Stuck);
        }
        None
    }
}

/// CBPE: estimated accuracy of a confidence histogram (`confidence[class][bin]`) and the
/// standard error of the estimate (sampling of this window plus the calibration's own).
pub fn cbpe(confidence: &[Vec<u64>], profile: &MonitoringProfile) -> Option<(f64, f64)> {
    let k = profile.calibration.len();
    let mut per_bin = vec![0u64; k];
    for row in confidence {
        for (b, &c) in row.iter().enumerate().take(k) {
            per_bin[b] += c;
        }
    }
    let n: u64 = per_bin.iter().sum();
    if n == 0 {
        return None;
    }
    let n = n as f64;
    let (mut est, mut var) = (0.0, 0.0);
    for (b, &c) in per_bin.iter().enumerate() {
        let g = profile.calibration[b].clamp(0.0, 1.0);
        let c = c as f64;
        est += c * g;
        var += c * g * (1.0 - g);
        let support = profile.calibration_n.get(b).copied().unwrap_or(0).max(1) as f64;
        var += (c * c) * g * (1.0 - g) / support;
    }
    Some((est / n, var.sqrt() / n))
}

/// The accuracy the profile expects: measured on the labelled reference, else its CBPE.
pub fn reference_accuracy(profile: &MonitoringProfile) -> Option<f64> {
    profile
        .accuracy
        .or_else(|| cbpe(&profile.confidence, profile).map(|(a, _)| a))
}

fn confusion_errors(confusion: &[Vec<u64>]) -> (u64, u64) {
    let mut errors = 0;
    let mut total = 0;
    for (t, row) in confusion.iter().enumerate() {
        for (p, &c) in row.iter().enumerate() {
            total += c;
            if t != p {
                errors += c;
            }
        }
    }
    (errors, total)
}

/// Current / reference proportion per cell of a feature: importance weights for covariate-shift
/// re-weighting of the reference (training) data.
pub fn importance_weights(reference: &HistProfile, current: &HistAgg) -> Vec<f64> {
    let mut cur = Vec::new();
    cells(current, reference.counts.len(), &mut cur);
    let (r, c) = (
        stats::proportions(&profile_cells(reference)),
        stats::proportions(&cur),
    );
    r.iter().zip(&c).map(|(r, c)| c / r).collect()
}

impl Engine {
    pub fn new(config: DriftConfig) -> Self {
        Self {
            config,
            scopes: HashMap::new(),
            devices: HashMap::new(),
        }
    }

    pub fn config(&self) -> &DriftConfig {
        &self.config
    }

    /// The same state under another configuration (a restored engine takes the configuration
    /// the service runs with now, not the one it was saved with).
    pub fn with_config(mut self, config: DriftConfig) -> Self {
        self.config = config;
        self
    }

    /// Scopes with state (pooled windows or history), devices included.
    pub fn scopes(&self) -> usize {
        self.scopes.len() + self.devices.len()
    }

    /// Evaluates one closed window.
    pub fn evaluate(
        &mut self,
        window_start_ms: i64,
        windows: &[DeviceWindow],
        profiles: &dyn Profiles,
    ) -> Evaluation {
        let cfg = self.config.clone();
        let mut eval = Evaluation {
            window_start_ms,
            ..Evaluation::default()
        };
        eval.stats.devices = windows.len();

        // Profiles looked up once per model version, not per device.
        let mut by_model: HashMap<(&str, &str), Option<Reference>> = HashMap::new();
        for w in windows {
            by_model
                .entry((&w.model_id, &w.model_version))
                .or_insert_with(|| {
                    profiles
                        .profile(&w.model_id, &w.model_version)
                        .map(Reference::of)
                });
        }
        let profile_of: Vec<Option<&Reference>> = windows
            .iter()
            .map(|w| reference_of(&by_model, &w.model_id, &w.model_version))
            .collect();

        // 1. Sensor faults; faulty devices stay out of cohorts.
        let mut faulty: HashSet<usize> = HashSet::new();
        for (i, w) in windows.iter().enumerate() {
            let Some(reference) = profile_of[i] else {
                eval.stats.without_profile += 1;
                continue;
            };
            let features = w.agg.features.iter().zip(&reference.profile.features);
            for ((f, fp), shape) in features.zip(&reference.features) {
                if let Some(fault) = shape.fault(f, &cfg) {
                    faulty.insert(i);
                    let scope = device_scope(w);
                    eval.findings.push(Finding {
                        summary: format!(
                            "sensor fault on device {}: feature {} shows {} ({} readings)",
                            w.device,
                            fp.name,
                            fault.as_str().replace('_', " "),
                            f.hist.total()
                        ),
                        scope,
                        kind: FindingKind::SensorFault {
                            feature: fp.name.clone(),
                            fault,
                        },
                        window_start_ms,
                        value: 1.0,
                    });
                }
            }
        }
        eval.stats.faulty_devices = faulty.len();

        // 2. Cohorts of this window: devices are merged once into their group (model, hardware,
        // tags), groups into the cohorts they belong to.
        let mut groups: HashMap<GroupKey<'_>, (WindowAgg, Vec<usize>)> = HashMap::new();
        for (i, w) in windows.iter().enumerate() {
            if profile_of[i].is_none() || faulty.contains(&i) {
                continue;
            }
            let g = groups
                .entry((&w.model_id, &w.model_version, &w.hw, &w.tags))
                .or_default();
            g.0.merge(&w.agg);
            g.1.push(i);
        }
        let mut members: HashMap<Scope, Vec<usize>> = HashMap::new();
        let mut cohort_aggs: HashMap<Scope, WindowAgg> = HashMap::new();
        for ((model_id, model_version, hw, tags), (agg, idx)) in &groups {
            let base = |kind, key: String| Scope {
                kind,
                model_id: (*model_id).to_owned(),
                model_version: (*model_version).to_owned(),
                key,
            };
            let scopes = [
                base(ScopeKind::Model, String::new()),
                base(ScopeKind::Hardware, (*hw).to_owned()),
            ]
            .into_iter()
            .chain(
                tags.iter()
                    .map(|(k, v)| base(ScopeKind::Tag, format!("{k}={v}"))),
            );
            for scope in scopes {
                members
                    .entry(scope.clone())
                    .or_default()
                    .extend_from_slice(idx);
                cohort_aggs.entry(scope).or_default().merge(agg);
            }
        }

        // 3-4. Pool and test.
        let mut pending: Vec<Pending> = Vec::new();
        let mut tested = 0usize;
        let mut tests = 0usize;
        let mut scratch = Vec::new();
        // Devices: 100k of them, so no per-device allocation unless something looks drifted.
        for (w, reference) in windows.iter().zip(&profile_of) {
            let Some(reference) = reference else {
                continue;
            };
            let state = match self.devices.get_mut(&w.device) {
                Some(s) => s,
                None => self.devices.entry(w.device.clone()).or_default(),
            };
            let Some((sample, pooled)) = state.add(&w.agg, &cfg) else {
                continue;
            };
            tested += 1;
            let sample = Sample {
                agg: sample.as_ref().unwrap_or(&w.agg),
                windows: pooled,
                window_start_ms,
            };
            test_device(
                &cfg,
                w,
                &sample,
                reference,
                state,
                &mut pending,
                &mut tests,
                &mut scratch,
            );
        }
        for (scope, agg) in cohort_aggs {
            let Some(reference) = reference_of(&by_model, &scope.model_id, &scope.model_version)
            else {
                continue;
            };
            let state = self.scopes.entry(scope.clone()).or_default();
            let Some((sample, pooled)) = state.add(&agg, &cfg) else {
                continue;
            };
            let pool = sample.unwrap_or(agg);
            tested += 1;
            let before = pending.len();
            let sample = Sample {
                agg: &pool,
                windows: pooled,
                window_start_ms,
            };
            test_cohort(
                &cfg,
                &scope,
                &sample,
                reference.profile,
                state,
                &mut pending,
            );
            tests += pending.len() - before;
            eval.evidence.insert(scope, pool);
        }
        eval.stats.scopes_tested = tested;
        eval.stats.tests = tests;

        // 5. False-discovery control, effect floor, persistence.
        let p: Vec<f64> = pending
            .iter()
            .map(|t| t.score.p_value.unwrap_or(f64::NAN))
            .collect();
        // Tests left out of `pending` had statistics below the FDR level's critical value:
        // never discoveries, but they count in the number of hypotheses.
        let discoveries = stats::benjamini_hochberg_of(&p, cfg.fdr, tests);
        eval.stats.discoveries = discoveries.iter().filter(|&&d| d).count();
        let mut flagged: Vec<Score> = Vec::new();
        for (t, discovery) in pending.into_iter().zip(discoveries) {
            let mut score = t.score;
            score.significant = discovery && t.effect;
            let state = if score.scope.is_cohort() {
                self.scopes.entry(score.scope.clone()).or_default()
            } else {
                self.devices.entry(score.scope.key.clone()).or_default()
            };
            let streak = state.streaks.entry(score.subject.clone()).or_insert(0);
            *streak = if score.significant { *streak + 1 } else { 0 };
            score.streak = *streak;
            if score.significant && score.streak >= cfg.persistence {
                flagged.push(score.clone());
            }
            if score.scope.is_cohort() || score.significant {
                eval.scores.push(score);
            }
        }

        // 6. Localise and report.
        let faults: HashSet<(String, String)> = eval
            .findings
            .iter()
            .filter_map(|f| match &f.kind {
                FindingKind::SensorFault { feature, .. } => {
                    Some((f.scope.key.clone(), feature.clone()))
                }
                _ => None,
            })
            .collect();
        let flagged_set: HashSet<(Scope, Subject)> = flagged
            .iter()
            .map(|s| (s.scope.clone(), s.subject.clone()))
            .collect();
        let mut device_findings: Vec<&Score> = Vec::new();
        for score in &flagged {
            let Some(profile) = profiles.profile(&score.scope.model_id, &score.scope.model_version)
            else {
                continue;
            };
            if score.scope.is_cohort() {
                let mine = &members[&score.scope];
                // Explained by a narrower flagged cohort: the rest of this one is fine.
                let explained = flagged_set.iter().any(|(other, subject)| {
                    other != &score.scope
                        && other.is_cohort()
                        && subject == &score.subject
                        && members.get(other).is_some_and(|theirs| {
                            theirs.len() < mine.len()
                                && !complement_drifted(
                                    &cfg,
                                    windows,
                                    mine,
                                    theirs,
                                    &score.subject,
                                    profile,
                                )
                        })
                });
                if explained {
                    continue;
                }
                // Carried by a few devices: their drift, not the cohort's.
                if let Subject::Feature(name) = &score.subject {
                    let drifted: Vec<usize> = mine
                        .iter()
                        .copied()
                        .filter(|&i| {
                            subject_drifted(&cfg, &windows[i].agg, &score.subject, profile, true)
                        })
                        .collect();
                    if !drifted.is_empty()
                        && drifted.len() <= cfg.max_local_devices
                        && mine.len() > drifted.len()
                        && !complement_drifted(
                            &cfg,
                            windows,
                            mine,
                            &drifted,
                            &score.subject,
                            profile,
                        )
                    {
                        for &i in &drifted {
                            let w = &windows[i];
                            eval.findings.push(Finding {
                                scope: device_scope(w),
                                kind: FindingKind::DeviceDrift {
                                    feature: name.clone(),
                                },
                                window_start_ms,
                                value: score.psi.unwrap_or(0.0),
                                summary: format!(
                                    "device {} alone moves feature {} of {}",
                                    w.device,
                                    name,
                                    score.scope.id()
                                ),
                            });
                        }
                        continue;
                    }
                }
            } else {
                let Subject::Feature(name) = &score.subject else {
                    continue;
                };
                if !faults.contains(&(score.scope.key.clone(), name.clone())) {
                    device_findings.push(score);
                }
                continue;
            }
            if let Some(f) = finding_of(score, window_start_ms) {
                eval.findings.push(f);
            }
        }
        report_devices(
            &cfg,
            &mut eval,
            &device_findings,
            &flagged_set,
            &members,
            windows,
        );
        eval.evidence
            .retain(|scope, _| eval.findings.iter().any(|f| &f.scope == scope));
        eval
    }
}

/// Device-level feature drift: reported per device when a few devices of a model show it;
/// when more do, it is a population shift, reported once on the cohort where the drifted
/// devices concentrate (unless a cohort finding already covers it).
fn report_devices(
    cfg: &DriftConfig,
    eval: &mut Evaluation,
    device_findings: &[&Score],
    flagged: &HashSet<(Scope, Subject)>,
    members: &HashMap<Scope, Vec<usize>>,
    windows: &[DeviceWindow],
) {
    let mut by_subject: BTreeMap<(String, String, Subject), Vec<&Score>> = BTreeMap::new();
    for s in device_findings {
        by_subject
            .entry((
                s.scope.model_id.clone(),
                s.scope.model_version.clone(),
                s.subject.clone(),
            ))
            .or_default()
            .push(s);
    }
    for ((model_id, model_version, subject), scores) in by_subject {
        let covered = flagged.iter().any(|(scope, sub)| {
            scope.is_cohort()
                && sub == &subject
                && scope.model_id == model_id
                && scope.model_version == model_version
        });
        if covered {
            continue;
        }
        if scores.len() <= cfg.max_local_devices {
            for s in scores {
                if let Some(f) = finding_of(s, eval.window_start_ms) {
                    eval.findings.push(f);
                }
            }
            continue;
        }
        // Where do the drifted devices concentrate? The cohort with the largest share of
        // them among its members (the narrowest on ties).
        let drifted: HashSet<&str> = scores.iter().map(|s| s.scope.key.as_str()).collect();
        let mut best: Option<(f64, usize, &Scope)> = None;
        for (scope, idx) in members {
            if !scope.is_cohort()
                || scope.model_id != model_id
                || scope.model_version != model_version
            {
                continue;
            }
            let hits = idx
                .iter()
                .filter(|&&i| drifted.contains(windows[i].device.as_str()))
                .count();
            let share = hits as f64 / idx.len().max(1) as f64;
            let better = match best {
                None => true,
                Some((s, n, _)) => share > s || (share == s && idx.len() < n),
            };
            if hits > 0 && better {
                best = Some((share, idx.len(), scope));
            }
        }
        let Some((share, size, scope)) = best else {
            continue;
        };
        let mean_psi = scores.iter().filter_map(|s| s.psi).sum::<f64>() / scores.len() as f64;
        let name = subject.label();
        eval.findings.push(Finding {
                scope: scope.clone(),
                kind: FindingKind::FeatureDrift {
                    feature: name.clone(),
                },
                window_start_ms: eval.window_start_ms,
                value: mean_psi,
                summary: format!(
                    "feature {name} drifted on {} of {size} devices of {} ({:.0}%), mean device PSI {mean_psi:.3}; the cohort as a whole is below the alert threshold",
                    scores.len(),
                    scope.id(),
                    share * 100.0
                ),
            });
    }
}

fn device_scope(w: &DeviceWindow) -> Scope {
    Scope {
        kind: ScopeKind::Device,
        model_id: w.model_id.clone(),
        model_version: w.model_version.clone(),
        key: w.device.clone(),
    }
}

/// The reference and current cells of a distribution subject.
fn subject_cells(
    agg: &WindowAgg,
    subject: &Subject,
    profile: &MonitoringProfile,
) -> Option<(Vec<u64>, Vec<u64>)> {
    let mut cur = Vec::new();
    match subject {
        Subject::Feature(name) => {
            let fi = profile.features.iter().position(|f| &f.name == name)?;
            let fp = &profile.features[fi].hist;
            cells(&agg.features.get(fi)?.hist, fp.counts.len(), &mut cur);
            Some((profile_cells(fp), cur))
        }
        Subject::Classes => Some((
            profile.classes.clone(),
            (0..profile.classes.len())
                .map(|i| agg.classes.get(i).copied().unwrap_or(0))
                .collect(),
        )),
        Subject::Latency => {
            let lat = profile.latency.as_ref()?;
            cells(&agg.latency, lat.counts.len(), &mut cur);
            Some((profile_cells(lat), cur))
        }
        Subject::Accuracy | Subject::EstimatedAccuracy => None,
    }
}

/// Whether `agg` alone shows `subject` drifted (one window, no pooling or persistence).
fn subject_drifted(
    cfg: &DriftConfig,
    agg: &WindowAgg,
    subject: &Subject,
    profile: &MonitoringProfile,
    device: bool,
) -> bool {
    let Some(reference) = reference_accuracy(profile) else {
        return false;
    };
    match subject {
        Subject::Accuracy => {
            let (errors, labels) = confusion_errors(&agg.confusion);
            stats::error_rate_z(errors, labels, 1.0 - reference, cfg.accuracy_min_labels)
                .is_some_and(|z| {
                    z >= cfg.accuracy_z
                        && reference - (1.0 - errors as f64 / labels as f64) >= cfg.cbpe_tolerance
                })
        }
        Subject::EstimatedAccuracy => cbpe(&agg.confidence, profile)
            .is_some_and(|(e, se)| reference - e >= cfg.cbpe_tolerance.max(cfg.cbpe_sigmas * se)),
        _ => subject_cells(agg, subject, profile).is_some_and(|(r, c)| {
            let floor = if device {
                cfg.device_psi_floor
            } else {
                cfg.psi_floor
            };
            stats::chi2_two_sample(&r, &c).is_some_and(|t| t.p_value < cfg.fdr)
                && stats::psi(&r, &c) >= floor
        }),
    }
}

/// Whether the devices in `all` but not in `without` still show `subject` drifted.
fn complement_drifted(
    cfg: &DriftConfig,
    windows: &[DeviceWindow],
    all: &[usize],
    without: &[usize],
    subject: &Subject,
    profile: &MonitoringProfile,
) -> bool {
    let exclude: HashSet<usize> = without.iter().copied().collect();
    let mut rest = WindowAgg::default();
    for &i in all {
        if !exclude.contains(&i) {
            rest.merge(&windows[i].agg);
        }
    }
    if rest.inferences < cfg.min_inferences / 4 {
        return false;
    }
    subject_drifted(cfg, &rest, subject, profile, false)
}

/// A pooled sample of one scope, ready to test.
struct Sample<'a> {
    agg: &'a WindowAgg,
    /// Windows pooled into it.
    windows: u32,
    window_start_ms: i64,
}

impl Sample<'_> {
    /// A score of `subject` in `scope` with no statistic filled in yet.
    fn score(&self, scope: Scope, subject: Subject, n: u64) -> Score {
        Score {
            scope,
            subject,
            window_start_ms: self.window_start_ms,
            n,
            windows: self.windows,
            psi: None,
            psi_critical: None,
            js: None,
            chi2: None,
            p_value: None,
            accuracy: None,
            band: None,
            observed_accuracy: None,
            reference_accuracy: None,
            significant: false,
            streak: 0,
        }
    }
}

/// Tests one device's pooled features. Only statistics beyond the FDR level's critical value
/// become [`Pending`] tests (with distances); the rest are counted in `tests` and reset their
/// streaks.
#[allow(clippy::too_many_arguments)]
fn test_device(
    cfg: &DriftConfig,
    w: &DeviceWindow,
    sample: &Sample<'_>,
    reference: &Reference<'_>,
    state: &mut ScopeState,
    out: &mut Vec<Pending>,
    tests: &mut usize,
    scratch: &mut Vec<u64>,
) {
    let features = sample.agg.features.iter().zip(&reference.profile.features);
    for ((f, fp), shape) in features.zip(&reference.features) {
        cells(&f.hist, fp.hist.counts.len(), scratch);
        let Some((statistic, df)) = stats::chi2_two_sample_statistic(&shape.cells, scratch) else {
            continue;
        };
        *tests += 1;
        let critical = chi2_critical(cfg.fdr, df);
        if statistic < critical {
            if !state.streaks.is_empty() {
                state.streaks.remove(&Subject::Feature(fp.name.clone()));
            }
            continue;
        }
        let n = sample.agg.inferences.max(1) as f64;
        let m = reference.profile.n.max(1) as f64;
        let psi = stats::psi(&shape.cells, scratch);
        let mut score = sample.score(
            device_scope(w),
            Subject::Feature(fp.name.clone()),
            sample.agg.inferences,
        );
        score.psi = Some(psi);
        score.psi_critical = Some(critical * (1.0 / n + 1.0 / m));
        score.js = Some(stats::js_distance(&shape.cells, scratch));
        score.chi2 = Some(statistic);
        score.p_value = Some(stats::chi2_sf(statistic, f64::from(df)));
        out.push(Pending {
            effect: psi >= cfg.device_psi_floor,
            score,
        });
    }
}

/// Runs every test of one pooled cohort: each feature, the predicted classes and latency
/// against the profile, labelled accuracy over the horizon, and CBPE.
fn test_cohort(
    cfg: &DriftConfig,
    scope: &Scope,
    sample: &Sample<'_>,
    profile: &MonitoringProfile,
    state: &mut ScopeState,
    out: &mut Vec<Pending>,
) {
    let pool = sample.agg;
    let subjects = profile
        .features
        .iter()
        .map(|f| Subject::Feature(f.name.clone()))
        .chain([Subject::Classes, Subject::Latency]);
    for subject in subjects {
        let Some((reference, current)) = subject_cells(pool, &subject, profile) else {
            continue;
        };
        let Some(t) = stats::chi2_two_sample(&reference, &current) else {
            continue;
        };
        let n: u64 = current.iter().sum();
        let m: u64 = reference.iter().sum();
        let critical = chi2_critical(cfg.fdr, t.df);
        let psi = stats::psi(&reference, &current);
        let mut score = sample.score(scope.clone(), subject, n);
        score.chi2 = Some(t.statistic);
        score.p_value = (t.statistic >= critical).then_some(t.p_value);
        score.psi = Some(psi);
        score.js = Some(stats::js_distance(&reference, &current));
        score.psi_critical = Some(critical * (1.0 / n.max(1) as f64 + 1.0 / m.max(1) as f64));
        out.push(Pending {
            effect: psi >= cfg.psi_floor,
            score,
        });
    }
    let Some(reference) = reference_accuracy(profile) else {
        return;
    };
    // Observed accuracy over a sliding horizon of evaluations (DDM's rule against the
    // reference error rate).
    let (errors, labels) = confusion_errors(&pool.confusion);
    if labels > 0 || !state.accuracy.is_empty() {
        state.accuracy.push((errors, labels));
        if state.accuracy.len() > cfg.accuracy_horizon {
            state.accuracy.remove(0);
        }
    }
    let (errors, labels) = state
        .accuracy
        .iter()
        .fold((0, 0), |(e, n), &(de, dn)| (e + de, n + dn));
    let observed = (labels > 0).then(|| 1.0 - errors as f64 / labels as f64);
    if let Some(z) = stats::error_rate_z(errors, labels, 1.0 - reference, cfg.accuracy_min_labels) {
        let mut score = sample.score(scope.clone(), Subject::Accuracy, labels);
        score.accuracy = observed;
        score.reference_accuracy = Some(reference);
        score.p_value = Some(stats::normal_sf(z));
        out.push(Pending {
            effect: z >= cfg.accuracy_z
                && observed.is_some_and(|o| reference - o >= cfg.cbpe_tolerance),
            score,
        });
    }
    if let Some((estimate, se)) = cbpe(&pool.confidence, profile) {
        let mut score = sample.score(scope.clone(), Subject::EstimatedAccuracy, pool.inferences);
        let band = cfg.cbpe_sigmas * se;
        score.accuracy = Some(estimate);
        score.band = Some(band);
        score.observed_accuracy = observed;
        score.reference_accuracy = Some(reference);
        let z = (reference - estimate) / se.max(1e-12);
        score.p_value = Some(stats::normal_sf(z));
        out.push(Pending {
            effect: reference - estimate >= cfg.cbpe_tolerance.max(band),
            score,
        });
    }
}

/// Chi-square critical values by degrees of freedom, at the FDR level (cached per thread: the
/// engine asks for the same few hundreds of thousands of times).
fn chi2_critical(alpha: f64, df: u32) -> f64 {
    thread_local! {
        static CACHE: std::cell::RefCell<HashMap<(u64, u32), f64>> =
            std::cell::RefCell::new(HashMap::new());
    }
    CACHE.with(|c| {
        *c.borrow_mut()
            .entry((alpha.to_bits(), df))
            .or_insert_with(|| stats::chi2_quantile(1.0 - alpha, f64::from(df)))
    })
}

fn finding_of(score: &Score, window_start_ms: i64) -> Option<Finding> {
    let scope = score.scope.clone();
    let id = scope.id();
    let (kind, value, summary) = match &score.subject {
        Subject::Feature(feature) => {
            let psi = score.psi.unwrap_or(0.0);
            let kind = if scope.is_cohort() {
                FindingKind::FeatureDrift {
                    feature: feature.clone(),
                }
            } else {
                FindingKind::DeviceDrift {
                    feature: feature.clone(),
                }
            };
            (
                kind,
                psi,
                format!(
                    "feature {feature} drifted in {id}: PSI {psi:.3} (significant above {:.3}), JS {:.3}, n {}",
                    score.psi_critical.unwrap_or(f64::NAN),
                    score.js.unwrap_or(f64::NAN),
                    score.n
                ),
            )
        }
        Subject::Classes => {
            let psi = score.psi.unwrap_or(0.0);
            (
                FindingKind::LabelShift,
                psi,
                format!(
                    "predicted-class distribution moved in {id}: PSI {psi:.3}, n {}",
                    score.n
                ),
            )
        }
        Subject::Latency => {
            let psi = score.psi.unwrap_or(0.0);
            (
                FindingKind::LatencyShift,
                psi,
                format!(
                    "inference latency moved in {id}: PSI {psi:.3}, n {}",
                    score.n
                ),
            )
        }
        Subject::Accuracy => {
            let observed = score.accuracy?;
            let reference = score.reference_accuracy?;
            (
                FindingKind::AccuracyDrop {
                    observed,
                    reference,
                    labels: score.n,
                },
                reference - observed,
                format!(
                    "accuracy of {id} is {observed:.3} on {} labels, reference {reference:.3}",
                    score.n
                ),
            )
        }
        Subject::EstimatedAccuracy => {
            let estimate = score.accuracy?;
            let reference = score.reference_accuracy?;
            let band = score.band.unwrap_or(0.0);
            (
                FindingKind::EstimatedAccuracyDrop {
                    estimate,
                    band,
                    reference,
                    observed: score.observed_accuracy,
                },
                reference - estimate,
                format!(
                    "estimated accuracy of {id} is {estimate:.3} +/- {band:.3} (CBPE), reference {reference:.3}{}",
                    score
                        .observed_accuracy
                        .map(|o| format!(", observed {o:.3}"))
                        .unwrap_or_default()
                ),
            )
        }
    };
    Some(Finding {
        scope,
        kind,
        window_start_ms,
        value,
        summary,
    })
}
