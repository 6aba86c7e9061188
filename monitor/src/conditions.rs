//! Pure translations from what the detectors and the store report into alert conditions.
//!
//! Three sources feed the alert manager, each evaluated as a whole (a condition missing from
//! its source's next evaluation resolves, after the rule's `resolve_after_ms`):
//! - `presence`: one `DeviceOffline` per device the presence state says is offline;
//! - `health`: `LowBattery`, `BadResets`, `SummariesLost` from each device's closed window;
//! - `drift`: the drift engine's findings, carried between evaluations by [`ActiveFindings`]
//!   while their scope is not re-tested (a cohort tested every third window must not resolve
//!   and re-fire in between).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use tinyfleet_alerts::Condition;
use tinyfleet_drift::engine::{Evaluation, Finding, ScopeKind};
use tinyfleet_ingest::aggregate::WindowAgg;
use tinyfleet_store::OfflineDevice;

use crate::config::HealthRules;

/// `DeviceOffline` for every offline device; the value is seconds since it was last seen.
pub fn presence(offline: &[OfflineDevice], now_ms: i64) -> Vec<Condition> {
    offline
        .iter()
        .map(|d| {
            let silent_s = (now_ms - d.last_seen_ms).max(0) as f64 / 1000.0;
            Condition::new("DeviceOffline", silent_s)
                .label("kind", "presence")
                .label("device", &d.id)
                .annotation(
                    "summary",
                    format!(
                        "device {} is offline ({}), last seen {silent_s:.0} s ago",
                        d.id,
                        d.reason.as_deref().unwrap_or("unknown reason")
                    ),
                )
        })
        .collect()
}

/// One device's closed window, as the health rules see it.
#[derive(Debug, Clone, Copy)]
pub struct HealthInput<'a> {
    pub device: &'a str,
    /// `model_id@model_version/hw`.
    pub cohort: &'a str,
    pub agg: &'a WindowAgg,
}

/// Health conditions of the devices' closed windows.
pub fn health(windows: &[HealthInput<'_>], rules: &HealthRules) -> Vec<Condition> {
    let mut out = Vec::new();
    for w in windows {
        let cond = |name: &str, value: f64, summary: String| {
            Condition::new(name, value)
                .label("kind", "health")
                .label("device", w.device)
                .label("cohort", w.cohort)
                .annotation("summary", summary)
        };
        let h = &w.agg.health;
        if let Some(mv) = h.battery_min_mv
            && rules.battery_low_mv > 0
            && mv < rules.battery_low_mv
        {
            out.push(cond(
                "LowBattery",
                f64::from(mv),
                format!(
                    "device {} battery at {mv} mV (below {} mV)",
                    w.device, rules.battery_low_mv
                ),
            ));
        }
        if rules.bad_resets > 0 && h.bad_resets >= rules.bad_resets {
            out.push(cond(
                "BadResets",
                h.bad_resets as f64,
                format!(
                    "device {} had {} watchdog, brown-out or fault resets in one window",
                    w.device, h.bad_resets
                ),
            ));
        }
        let lost = w.agg.lost_summaries.max(0) as u64 + h.dropped;
        if rules.lost_summaries > 0 && lost >= rules.lost_summaries {
            out.push(cond(
                "SummariesLost",
                lost as f64,
                format!(
                    "device {}: {lost} summaries of one window lost in transit or dropped",
                    w.device
                ),
            ));
        }
    }
    out
}

/// The alert condition of one finding: its labels, the value, and the summary annotation.
pub fn finding(f: &Finding) -> Condition {
    let mut c = Condition::new(f.kind.alertname(), f.value).annotation("summary", &f.summary);
    for (k, v) in f.labels() {
        if k != "alertname" {
            c = c.label(k, v);
        }
    }
    c
}

/// Findings in force: each stays until its scope is tested again (or its device reports
/// again) without it, or until it is `max_age_windows` windows old.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActiveFindings {
    /// By `scope id / alertname / feature`.
    findings: BTreeMap<String, Finding>,
}

fn key(f: &Finding) -> String {
    let labels = f.labels();
    format!(
        "{}/{}/{}",
        f.scope.id(),
        f.kind.alertname(),
        labels.get("feature").map_or("", String::as_str)
    )
}

impl ActiveFindings {
    /// Takes in one evaluation. `reported` are the devices that had a window in it.
    pub fn update(
        &mut self,
        eval: &Evaluation,
        reported: &HashSet<&str>,
        window_ms: i64,
        max_age_windows: u32,
    ) {
        let tested: HashSet<String> = eval.scores.iter().map(|s| s.scope.id()).collect();
        let oldest = eval.window_start_ms - window_ms * i64::from(max_age_windows);
        self.findings.retain(|_, f| {
            let retested = match f.scope.kind {
                ScopeKind::Device => reported.contains(f.scope.key.as_str()),
                _ => tested.contains(&f.scope.id()),
            };
            !retested && f.window_start_ms > oldest
        });
        for f in &eval.findings {
            self.findings.insert(key(f), f.clone());
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Finding> {
        self.findings.values()
    }

    pub fn len(&self) -> usize {
        self.findings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.findings.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tinyfleet_drift::engine::{FindingKind, Scope, Score, Subject};

    fn scope(kind: ScopeKind, key: &str) -> Scope {
        Scope {
            kind,
            model_id: "kws".into(),
            model_version: "3".into(),
            key: key.into(),
        }
    }

    fn finding_at(scope: Scope, start: i64) -> Finding {
        Finding {
            scope,
            kind: FindingKind::FeatureDrift {
                feature: "f1".into(),
            },
            window_start_ms: start,
            value: 0.4,
            summary: "moved".into(),
        }
    }

    fn score(scope: Scope) -> Score {
        Score {
            scope,
            subject: Subject::Feature("f1".into()),
            window_start_ms: 0,
            n: 500,
            windows: 1,
            psi: Some(0.01),
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

    #[test]
    fn findings_persist_until_their_scope_is_tested_again() {
        let cohort = scope(ScopeKind::Tag, "site=a");
        let device = scope(ScopeKind::Device, "d1");
        let mut active = ActiveFindings::default();
        let first = Evaluation {
            window_start_ms: 0,
            findings: vec![finding_at(cohort.clone(), 0), finding_at(device.clone(), 0)],
            ..Evaluation::default()
        };
        active.update(&first, &HashSet::new(), 1000, 24);
        assert_eq!(active.len(), 2);
        // Next window: the cohort is not tested (still pooling), the device did not report.
        let quiet = Evaluation {
            window_start_ms: 1000,
            ..Evaluation::default()
        };
        active.update(&quiet, &HashSet::new(), 1000, 24);
        assert_eq!(active.len(), 2, "untested scopes keep their findings");
        // Then the cohort is tested clean and the device reports without a finding.
        let clean = Evaluation {
            window_start_ms: 2000,
            scores: vec![score(cohort)],
            ..Evaluation::default()
        };
        active.update(&clean, &HashSet::from(["d1"]), 1000, 24);
        assert!(active.is_empty());
        // A finding expires after max_age windows even when never re-tested.
        active.update(&first, &HashSet::new(), 1000, 2);
        active.update(&quiet, &HashSet::new(), 1000, 2);
        assert_eq!(active.len(), 2);
        let later = Evaluation {
            window_start_ms: 2000,
            ..Evaluation::default()
        };
        active.update(&later, &HashSet::new(), 1000, 2);
        assert!(active.is_empty());
    }

    #[test]
    fn health_rules_and_presence() {
        let mut agg = WindowAgg::default();
        agg.health.battery_min_mv = Some(3100);
        agg.health.bad_resets = 2;
        agg.lost_summaries = 2;
        agg.health.dropped = 1;
        let input = [HealthInput {
            device: "d1",
            cohort: "kws@3/nrf",
            agg: &agg,
        }];
        let names = |c: Vec<Condition>| {
            c.iter()
                .map(|c| c.labels["alertname"].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(health(&input, &HealthRules::default())),
            ["LowBattery", "BadResets", "SummariesLost"]
        );
        let off = HealthRules {
            battery_low_mv: 0,
            bad_resets: 0,
            lost_summaries: 0,
        };
        assert!(health(&input, &off).is_empty());
        agg.health.battery_min_mv = Some(3600);
        agg.health.bad_resets = 0;
        agg.lost_summaries = -1;
        agg.health.dropped = 0;
        let input = [HealthInput {
            device: "d1",
            cohort: "kws@3/nrf",
            agg: &agg,
        }];
        assert!(health(&input, &HealthRules::default()).is_empty());

        let offline = [OfflineDevice {
            id: "d2".into(),
            reason: Some("will".into()),
            last_seen_ms: 1_000,
        }];
        let c = presence(&offline, 61_000);
        assert_eq!(c[0].labels["alertname"], "DeviceOffline");
        assert_eq!(c[0].labels["device"], "d2");
        assert_eq!(c[0].value, 60.0);
    }

    #[test]
    fn finding_conditions_carry_the_finding_labels() {
        let f = finding_at(scope(ScopeKind::Device, "d9"), 0);
        let c = finding(&f);
        assert_eq!(c.labels["alertname"], "FeatureDrift");
        assert_eq!(c.labels["device"], "d9");
        assert_eq!(c.labels["feature"], "f1");
        assert_eq!(c.labels["kind"], "drift");
        assert_eq!(c.annotations["summary"], "moved");
    }
}
