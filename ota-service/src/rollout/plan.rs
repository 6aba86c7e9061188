//! What a rollout is asked to do: the target, the stages, the gates and the pacing, with
//! defaults and validation ([`RolloutPlan::validate`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One minute, in milliseconds.
pub const MINUTE_MS: i64 = 60_000;
/// One hour, in milliseconds.
pub const HOUR_MS: i64 = 60 * MINUTE_MS;

/// Most stages a plan may have.
pub const MAX_STAGES: usize = 20;
/// The lowest `install.min_done` a plan may set: below it a percentage is noise.
pub const MIN_DONE_FLOOR: u32 = 5;

/// A registered model version: its name and its anti-rollback sequence number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionRef {
    pub version: String,
    pub seq: u32,
}

impl VersionRef {
    pub fn new(version: impl Into<String>, seq: u32) -> Self {
        Self {
            version: version.into(),
            seq,
        }
    }
}

/// A tag the target devices must carry (`key=value` in the registry's tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagMatch {
    pub key: String,
    pub value: String,
}

/// Which devices the rollout is for, besides running one of the replaced versions of the
/// model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFilter {
    /// Hardware id; a model version is built for exactly one (`ModelVersion::hw`).
    pub hw: String,
    /// Optional cohort: only devices with this tag.
    #[serde(default)]
    pub tag: Option<TagMatch>,
}

impl TargetFilter {
    /// Whether a device with this hardware and these tags is in the target.
    pub fn matches(&self, hw: Option<&str>, tags: &BTreeMap<String, String>) -> bool {
        hw == Some(self.hw.as_str())
            && self
                .tag
                .as_ref()
                .is_none_or(|t| tags.get(&t.key) == Some(&t.value))
    }
}

/// One stage of a rollout.
///
/// Shares are cumulative: a stage with `share: 0.10` after one with `0.01` adds the next 9 %
/// of the target. Soak and deadline both run from the moment the stage's last device was
/// offered the update (`fully offered`), so a rate cap or maintenance windows never eat into
/// the observation time; the deadline restarts when an operator resumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Cumulative share of the target covered once this stage is open, in (0, 1].
    pub share: f64,
    /// Stages 1..=this together hold at least this many devices *taking part* (online, or
    /// reached by their offer), or the whole target when it is smaller: the devices with the
    /// smallest buckets are added, while the stage is open. Cumulative, like `share`. Counting
    /// participants rather than devices keeps a switched-off device from shrinking the sample
    /// the gates need (with `install.min_done` equal to this minimum, one offline canary
    /// would otherwise hold the stage until its deadline).
    #[serde(default)]
    pub min_devices: u32,
    /// Minimum time the stage runs, fully offered, before it may advance.
    pub soak_ms: i64,
    /// Once fully offered for this long, a stage whose gates are still inconclusive pauses
    /// (an operator decides). Must exceed `soak_ms`.
    pub deadline_ms: i64,
}

/// The default stages: 1 % (at least 10 devices) -> 10 % -> 50 % -> 100 %.
///
/// Soaks of 24 h, 24 h, 12 h and 12 h (the last one is the watch before the rollout is
/// declared complete); each stage pauses when still inconclusive 72 h after it was fully
/// offered. Compare Memfault's own guide (5 -> 25 -> 50 -> 100 % raised by hand every two
/// days) and hawkBit's groups, which advance on "% finished" alone.
pub fn default_stages() -> Vec<Stage> {
    let stage = |share, min_devices, soak_h| Stage {
        share,
        min_devices,
        soak_ms: soak_h * HOUR_MS,
        deadline_ms: 72 * HOUR_MS,
    };
    vec![
        stage(0.01, 10, 24),
        stage(0.10, 0, 24),
        stage(0.50, 0, 12),
        stage(1.00, 0, 12),
    ]
}

/// The install-health gate.
///
/// Over the devices that are *done* (confirmed, failed, rejected, reverted, or timed out), three
/// rates are checked against their limits with a one-sided Wilson score bound at
/// `confidence`:
///
/// - **fail** when the *lower* bound of a rate is above its limit (we are `confidence` sure
///   the true rate exceeds it): the rollout aborts and rolls back;
/// - **pass** when the observed rate is within the limit;
/// - **hold** (inconclusive) in between: the observed rate is above the limit but the sample
///   cannot prove it, so more devices must finish.
///
/// Nothing is decided before `min_done` devices are done. With the defaults, 3 failures of 10
/// done devices abort (Wilson lower bound 12.7 % > 5 %), 1 of 3 decides nothing, and 1 of 10
/// holds. hawkBit divides errors by the group's full size with no minimum sample; AWS IoT Jobs
/// compares a raw percentage once `minNumberOfExecutedThings` have run, and can only cancel.
///
/// Passing uses the observed rate rather than the upper bound on purpose: 0 failures of 20
/// canaries still allow 12 % at 95 %, so an upper-bound rule could never let a 1 % canary of a
/// fleet of a few thousand advance. The confidence bound protects the *abort* decision from
/// noise; the stages protect the fleet from what a small sample cannot prove.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstallGate {
    /// Devices done (over the stages opened so far) before any decision. At least 5.
    pub min_done: u32,
    /// One-sided confidence of the Wilson bounds, in [0.5, 0.9999].
    pub confidence: f64,
    /// Failed installs plus refused offers (progress states 6 and 8).
    pub max_failure_rate: f64,
    /// Trial images that did not confirm and were reverted (state 7).
    pub max_revert_rate: f64,
    /// Devices online with an offer that stopped reporting for `report_timeout_ms`.
    pub max_timeout_rate: f64,
    /// An online device with an unfinished install and no report for this long is timed out
    /// (it stays so until it reports again). Offline time does not count.
    pub report_timeout_ms: i64,
    /// Share of the current stage's offered devices that must be done before it may advance,
    /// so a stage is exercised by its own devices, not only by the earlier stages' evidence.
    pub min_stage_done_share: f64,
}

impl Default for InstallGate {
    fn default() -> Self {
        Self {
            min_done: 10,
            confidence: 0.95,
            max_failure_rate: 0.05,
            max_revert_rate: 0.02,
            max_timeout_rate: 0.10,
            report_timeout_ms: HOUR_MS,
            min_stage_done_share: 0.5,
        }
    }
}

/// The model-quality gate: canary (devices of this rollout running the new version) against
/// control (devices of the same target still running a replaced version) over the same
/// ingest windows.
///
/// Every metric is turned into a *harm* (larger is worse) with a two-sided interval at
/// `confidence` (each side one-sided at `confidence`), then judged like the install rates:
/// **fail** when the interval's low end is above the limit, **pass** when its high end is at
/// or below the limit, **inconclusive** otherwise (the stage holds; past its deadline it
/// pauses). A metric below its minimum sample is *insufficient* and decides nothing.
///
/// | metric | harm | test | default limit |
/// |---|---|---|---|
/// | labelled accuracy | control - canary accuracy | two-proportion z, cluster-robust variance | 0.02 |
/// | estimated (CBPE) accuracy | control - canary mean of per-device estimates | Welch t | 0.03 |
/// | latency | canary / control mean of per-device means | Welch t on the log ratio | 1.25 |
/// | resets | canary - control resets per device-window | Poisson normal approximation | 0.05 |
/// | predicted classes | PSI between the pooled predicted-class histograms | Rao-Scott chi-square with a per-device design effect, and PSI bounds | 0.1 |
/// | drift score | canary - control mean of per-device mean drift scores | Welch t | 0.1 |
///
/// The predicted-class check fails only when the chi-square test says the distributions
/// differ *and* the PSI's lower bound is above the limit, so a huge sample cannot fail a
/// negligible shift (see [`super::quality`]).
///
/// The gate passes when no metric fails or is inconclusive and at least one accuracy metric
/// (labelled or estimated) passes; `required: false` lets a rollout without any quality data
/// (no labels, no monitoring profile) pass on install health alone. A metric without data
/// (no class counts, no drift scores) decides nothing and holds nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QualityGate {
    /// Whether a passing accuracy metric is needed to advance.
    pub required: bool,
    /// Confidence of each side of the intervals, in [0.5, 0.9999].
    pub confidence: f64,
    /// Devices with data on each side, and windows with both sides, before any decision.
    pub min_canary_devices: u32,
    pub min_control_devices: u32,
    pub min_windows: u32,
    /// Labelled inferences on each side before the labelled test decides.
    pub min_labelled: u64,
    /// Largest tolerated accuracy drop (absolute), observed on labels.
    pub max_accuracy_drop: f64,
    /// Largest tolerated drop of the CBPE estimate (absolute).
    pub max_estimated_drop: f64,
    /// Largest tolerated ratio of mean inference latency, canary over control.
    pub max_latency_ratio: f64,
    /// Largest tolerated extra resets per device and window on the canary side.
    pub max_reset_increase: f64,
    /// Predictions on each side before the predicted-class test decides.
    ///
    /// 1,000: with ten classes, 1,000 independent predictions per side put the PSI's noise
    /// floor at about `9 * (1/1000 + 1/1000) = 0.018` with a spread well under the 0.1
    /// limit, so the bounds can tell "within" from "beyond"; per-device variation raises the
    /// floor (the test measures it), more predictions cannot lower it below that. A dozen
    /// canaries reach 1,000 within a window or two.
    pub min_class_predictions: u64,
    /// Largest tolerated divergence (PSI) between the canary's and the control's pooled
    /// predicted-class distributions.
    ///
    /// 0.1 is the conventional PSI boundary of "no significant change" (Evidently's default
    /// drift threshold; 0.1-0.2 "moderate", above 0.2 "significant"). Both sides see the same
    /// population over the same windows, so two models of similar accuracy predict nearly
    /// the same mix: moving 2 % of the predictions from one class of ten to another is a PSI of
    /// about 0.01, while doubling a 10 % class is 0.08 and tripling it 0.27. A canary beyond
    /// 0.1 behaves differently on the same inputs, which the labels may not show for days. A
    /// model that deliberately predicts a different mix (a fixed bias, a new class) should
    /// raise it for its rollout.
    pub max_class_divergence: f64,
    /// Largest tolerated increase of the mean drift score (PSI against each version's own
    /// monitoring profile), canary over control.
    ///
    /// 0.1, the same PSI boundary: a canary whose inputs look that much further from its own
    /// profile than the control's from theirs has a model/profile mismatch (changed
    /// preprocessing, quantisation or feature scaling), which accuracy cannot show without
    /// labels.
    pub max_drift_increase: f64,
}

impl Default for QualityGate {
    fn default() -> Self {
        Self {
            required: true,
            confidence: 0.95,
            min_canary_devices: 5,
            min_control_devices: 5,
            min_windows: 2,
            min_labelled: 300,
            max_accuracy_drop: 0.02,
            max_estimated_drop: 0.03,
            max_latency_ratio: 1.25,
            max_reset_increase: 0.05,
            min_class_predictions: 1_000,
            max_class_divergence: 0.1,
            max_drift_increase: 0.1,
        }
    }
}

/// Hours of the day (UTC) when offers may go out: `[start_hour, end_hour)`, wrapping past
/// midnight when `end_hour < start_hour` (22 -> 4 is 22:00-03:59).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourWindow {
    pub start_hour: u8,
    pub end_hour: u8,
}

impl HourWindow {
    pub fn contains(&self, now_ms: i64) -> bool {
        let hour = now_ms.div_euclid(HOUR_MS).rem_euclid(24) as u8;
        if self.start_hour < self.end_hour {
            (self.start_hour..self.end_hour).contains(&hour)
        } else {
            hour >= self.start_hour || hour < self.end_hour
        }
    }
}

/// Default cap on offers sent per minute (AWS IoT Jobs' `baseRatePerMinute` ranges 1-1000).
pub const DEFAULT_OFFERS_PER_MINUTE: u32 = 120;

fn default_offers_per_minute() -> u32 {
    DEFAULT_OFFERS_PER_MINUTE
}

/// A staged rollout of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// Unique id; also the seed of device selection, so two rollouts pick different canaries.
    pub id: String,
    pub model_id: String,
    /// The version rolled out.
    pub target: VersionRef,
    /// The versions it replaces: devices running one of them are in the target, and a
    /// rollback takes each device back to the one it ran. All below `target.seq`.
    pub replaces: Vec<VersionRef>,
    pub filter: TargetFilter,
    #[serde(default = "default_stages")]
    pub stages: Vec<Stage>,
    #[serde(default)]
    pub install: InstallGate,
    #[serde(default)]
    pub quality: QualityGate,
    /// Offers sent per minute at most (rollback offers are not capped).
    #[serde(default = "default_offers_per_minute")]
    pub offers_per_minute: u32,
    /// When non-empty, offers go out only inside one of these windows (rollback offers
    /// always go out at once).
    #[serde(default)]
    pub maintenance: Vec<HourWindow>,
}

/// A plan that cannot run, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PlanError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_name(field: &str, s: &str) -> Result<(), PlanError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(
            field,
            format!("{s:?}: use 1-64 of A-Z a-z 0-9 . _ - +"),
        ))
    }
}

fn check_unit(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), PlanError> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(bad(field, format!("{v} must be in [{lo}, {hi}]")))
    }
}

impl RolloutPlan {
    /// A plan with the default stages, gates and pacing.
    pub fn new(
        id: impl Into<String>,
        model_id: impl Into<String>,
        target: VersionRef,
        replaces: Vec<VersionRef>,
        hw: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            model_id: model_id.into(),
            target,
            replaces,
            filter: TargetFilter {
                hw: hw.into(),
                tag: None,
            },
            stages: default_stages(),
            install: InstallGate::default(),
            quality: QualityGate::default(),
            offers_per_minute: DEFAULT_OFFERS_PER_MINUTE,
            maintenance: Vec::new(),
        }
    }

    /// The replaced version with this name.
    pub fn replaced(&self, version: &str) -> Option<&VersionRef> {
        self.replaces.iter().find(|v| v.version == version)
    }

    /// Checks everything a rollout relies on; the error names the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        check_name("id", &self.id)?;
        check_name("model_id", &self.model_id)?;
        check_name("target.version", &self.target.version)?;
        check_name("filter.hw", &self.filter.hw)?;
        if self.target.seq == 0 {
            return Err(bad("target.seq", "must be at least 1"));
        }
        if self.replaces.is_empty() {
            return Err(bad(
                "replaces",
                "name at least one version the rollout replaces (the rollback goes back to it)",
            ));
        }
        for (i, v) in self.replaces.iter().enumerate() {
            let field = format!("replaces[{i}]");
            check_name(&field, &v.version)?;
            if v.version == self.target.version {
                return Err(bad(field, "a rollout cannot replace its own target"));
            }
            if v.seq >= self.target.seq {
                return Err(bad(
                    format!("{field}.seq"),
                    format!(
                        "{} must be below the target's seq {} (anti-rollback)",
                        v.seq, self.target.seq
                    ),
                ));
            }
            if self.replaces[..i].iter().any(|w| w.version == v.version) {
                return Err(bad(field, format!("{:?} is listed twice", v.version)));
            }
        }
        if let Some(t) = &self.filter.tag
            && (t.key.is_empty() || t.key.len() > 64 || t.value.len() > 256)
        {
            return Err(bad("filter.tag", "key must be 1-64 bytes, value up to 256"));
        }
        self.validate_stages()?;
        self.validate_gates()?;
        if !(1..=100_000).contains(&self.offers_per_minute) {
            return Err(bad("offers_per_minute", "must be 1..=100000"));
        }
        for (i, w) in self.maintenance.iter().enumerate() {
            if w.start_hour > 23 || w.end_hour > 23 || w.start_hour == w.end_hour {
                return Err(bad(
                    format!("maintenance[{i}]"),
                    "hours are 0-23 and start differs from end (no window means always)",
                ));
            }
        }
        Ok(())
    }

    fn validate_stages(&self) -> Result<(), PlanError> {
        if self.stages.is_empty() || self.stages.len() > MAX_STAGES {
            return Err(bad("stages", format!("need 1..={MAX_STAGES} stages")));
        }
        let mut prev = 0.0;
        for (i, s) in self.stages.iter().enumerate() {
            let field = |f: &str| format!("stages[{i}].{f}");
            if !(s.share.is_finite() && s.share > prev && s.share <= 1.0) {
                return Err(bad(
                    field("share"),
                    format!(
                        "{} must be above the previous stage's {prev} and at most 1 (shares are cumulative)",
                        s.share
                    ),
                ));
            }
            prev = s.share;
            if s.soak_ms < 0 {
                return Err(bad(field("soak_ms"), "must not be negative"));
            }
            if s.deadline_ms <= s.soak_ms {
                return Err(bad(
                    field("deadline_ms"),
                    format!("{} must exceed soak_ms {}", s.deadline_ms, s.soak_ms),
                ));
            }
        }
        Ok(())
    }

    fn validate_gates(&self) -> Result<(), PlanError> {
        let g = &self.install;
        if g.min_done < MIN_DONE_FLOOR {
            return Err(bad(
                "install.min_done",
                format!(
                    "{} is below {MIN_DONE_FLOOR}: a rate over so few devices is noise",
                    g.min_done
                ),
            ));
        }
        check_unit("install.confidence", g.confidence, 0.5, 0.9999)?;
        check_unit("install.max_failure_rate", g.max_failure_rate, 0.0, 1.0)?;
        check_unit("install.max_revert_rate", g.max_revert_rate, 0.0, 1.0)?;
        check_unit("install.max_timeout_rate", g.max_timeout_rate, 0.0, 1.0)?;
        check_unit(
            "install.min_stage_done_share",
            g.min_stage_done_share,
            0.0,
            1.0,
        )?;
        if g.report_timeout_ms < MINUTE_MS {
            return Err(bad(
                "install.report_timeout_ms",
                "must be at least one minute",
            ));
        }
        let q = &self.quality;
        check_unit("quality.confidence", q.confidence, 0.5, 0.9999)?;
        if q.min_canary_devices < 2 || q.min_control_devices < 2 {
            return Err(bad(
                "quality.min_canary_devices",
                "both device minimums must be at least 2 (a variance needs two devices)",
            ));
        }
        if q.min_windows == 0 {
            return Err(bad("quality.min_windows", "must be at least 1"));
        }
        check_unit("quality.max_accuracy_drop", q.max_accuracy_drop, 0.0, 1.0)?;
        check_unit("quality.max_estimated_drop", q.max_estimated_drop, 0.0, 1.0)?;
        check_unit("quality.max_latency_ratio", q.max_latency_ratio, 1.0, 100.0)?;
        check_unit(
            "quality.max_reset_increase",
            q.max_reset_increase,
            0.0,
            1000.0,
        )?;
        if q.min_class_predictions < 100 {
            return Err(bad(
                "quality.min_class_predictions",
                format!(
                    "{} is below 100: the chi-square approximation needs expected counts",
                    q.min_class_predictions
                ),
            ));
        }
        for (field, v) in [
            ("quality.max_class_divergence", q.max_class_divergence),
            ("quality.max_drift_increase", q.max_drift_increase),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 10.0) {
                return Err(bad(
                    field,
                    format!("{v} must be in (0, 10] (a PSI; 0 could never pass)"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RolloutPlan {
        RolloutPlan::new(
            "r1",
            "kws",
            VersionRef::new("v2", 2),
            vec![VersionRef::new("v1", 1)],
            "nrf52840",
        )
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(plan().validate(), Ok(()));
        let shares: Vec<f64> = default_stages().iter().map(|s| s.share).collect();
        assert_eq!(shares, [0.01, 0.10, 0.50, 1.0]);
        assert_eq!(default_stages()[0].min_devices, 10);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |f: &dyn Fn(&mut RolloutPlan)| {
            let mut p = plan();
            f(&mut p);
            p.validate().map_err(|e| e.field)
        };
        assert_eq!(
            field(&|p| p.stages[2].share = 0.05),
            Err("stages[2].share".into())
        );
        assert_eq!(
            field(&|p| p.stages[0].deadline_ms = p.stages[0].soak_ms),
            Err("stages[0].deadline_ms".into())
        );
        assert_eq!(field(&|p| p.stages.clear()), Err("stages".into()));
        assert_eq!(
            field(&|p| p.install.min_done = 3),
            Err("install.min_done".into())
        );
        assert_eq!(
            field(&|p| p.replaces[0].seq = 2),
            Err("replaces[0].seq".into())
        );
        assert_eq!(field(&|p| p.replaces.clear()), Err("replaces".into()));
        assert_eq!(
            field(&|p| p.quality.confidence = 1.0),
            Err("quality.confidence".into())
        );
        assert_eq!(
            field(&|p| p.quality.min_class_predictions = 10),
            Err("quality.min_class_predictions".into())
        );
        assert_eq!(
            field(&|p| p.quality.max_class_divergence = 0.0),
            Err("quality.max_class_divergence".into())
        );
        assert_eq!(
            field(&|p| p.quality.max_drift_increase = f64::NAN),
            Err("quality.max_drift_increase".into())
        );
        assert_eq!(
            field(&|p| p.maintenance.push(HourWindow {
                start_hour: 3,
                end_hour: 3
            })),
            Err("maintenance[0]".into())
        );
        assert_eq!(
            field(&|p| p.offers_per_minute = 0),
            Err("offers_per_minute".into())
        );
        assert_eq!(field(&|p| p.id = "a b".into()), Err("id".into()));
        let msg = {
            let mut p = plan();
            p.install.min_done = 3;
            p.validate().map(|_| ()).unwrap_err().to_string()
        };
        assert!(msg.starts_with("install.min_done: 3 is below 5"), "{msg}");
    }

    #[test]
    fn maintenance_windows_wrap_midnight() {
        let at = |h: i64| h * HOUR_MS + 59 * MINUTE_MS;
        let night = HourWindow {
            start_hour: 22,
            end_hour: 4,
        };
        let day = HourWindow {
            start_hour: 9,
            end_hour: 17,
        };
        assert!(night.contains(at(23)) && night.contains(at(0)) && night.contains(at(3)));
        assert!(!night.contains(at(4)) && !night.contains(at(21)));
        assert!(day.contains(at(9)) && day.contains(at(16)) && !day.contains(at(17)));
        assert!(day.contains(at(24 * 400 + 12)));
    }

    #[test]
    fn target_filter_checks_hardware_and_tag() {
        let mut f = TargetFilter {
            hw: "nrf52840".into(),
            tag: None,
        };
        let mut tags = BTreeMap::new();
        assert!(f.matches(Some("nrf52840"), &tags));
        assert!(!f.matches(Some("esp32"), &tags) && !f.matches(None, &tags));
        f.tag = Some(TagMatch {
            key: "site".into(),
            value: "north".into(),
        });
        assert!(!f.matches(Some("nrf52840"), &tags));
        tags.insert("site".into(), "north".into());
        assert!(f.matches(Some("nrf52840"), &tags));
    }
}
