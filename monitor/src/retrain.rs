//! Retraining requests from an evaluation: one per cohort with a new data-drift or quality
//! finding, carrying what a retraining job can use without raw data.
//!
//! The payload (JSON, documented in `docs/alerts.md`):
//! - `findings`: alertname, feature, value and summary of each finding in the cohort;
//! - `scores`: the cohort's tests in this evaluation (PSI, JS, p-value, sample size, ...);
//! - `features`: per feature, the profile's bin edges, the reference counts, the cohort's
//!   current (pooled) counts and the importance weights `current / reference` per cell, cells
//!   ordered underflow, bins..., overflow, NaN, for covariate-shift re-weighting of the
//!   training data;
//! - `classes`: reference and current predicted-class counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};
use tinyfleet_alerts::RetrainRequest;
use tinyfleet_drift::engine::{Evaluation, FindingKind, Scope, importance_weights};
use tinyfleet_drift::profile::MonitoringProfile;

/// Whether a finding asks for retraining: cohort-level data drift or a quality drop. Device
/// findings (one device's sensor or placement) and latency ask for an engineer, not a model.
fn retrains(kind: &FindingKind) -> bool {
    matches!(
        kind,
        FindingKind::FeatureDrift { .. }
            | FindingKind::LabelShift
            | FindingKind::AccuracyDrop { .. }
            | FindingKind::EstimatedAccuracyDrop { .. }
    )
}

/// The retraining requests of one evaluation, one per cohort with such a finding.
pub fn requests(
    eval: &Evaluation,
    profiles: &HashMap<(String, String), MonitoringProfile>,
) -> Vec<RetrainRequest> {
    let mut by_scope: BTreeMap<&Scope, Vec<_>> = BTreeMap::new();
    for f in eval.findings.iter().filter(|f| retrains(&f.kind)) {
        by_scope.entry(&f.scope).or_default().push(f);
    }
    by_scope
        .into_iter()
        .map(|(scope, findings)| {
            let profile = profiles.get(&(scope.model_id.clone(), scope.model_version.clone()));
            let evidence = eval.evidence.get(scope);
            let features: Vec<Value> = match (profile, evidence) {
                (Some(p), Some(agg)) => p
                    .features
                    .iter()
                    .zip(&agg.features)
                    .map(|(fp, fa)| {
                        json!({
                            "name": fp.name,
                            "lo": fp.hist.lo,
                            "upper": fp.hist.upper,
                            "reference": {
                                "bins": fp.hist.counts,
                                "underflow": fp.hist.underflow,
                                "overflow": fp.hist.overflow,
                                "nan": fp.hist.nan,
                            },
                            "current": fa.hist,
                            "importance_weights": importance_weights(&fp.hist, &fa.hist),
                        })
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let reasons: BTreeSet<&str> = findings.iter().map(|f| f.kind.alertname()).collect();
            let payload = json!({
                "scope": scope,
                "findings": findings.iter().map(|f| {
                    let labels = f.labels();
                    json!({
                        "alertname": f.kind.alertname(),
                        "feature": labels.get("feature"),
                        "value": f.value,
                        "summary": f.summary,
                        "detail": f.kind,
                    })
                }).collect::<Vec<_>>(),
                "scores": eval.scores.iter().filter(|s| &s.scope == scope).collect::<Vec<_>>(),
                "inferences": evidence.map(|a| a.inferences),
                "features": features,
                "classes": {
                    "reference": profile.map(|p| &p.classes),
                    "current": evidence.map(|a| &a.classes),
                },
                "reference_accuracy": profile.and_then(|p| p.accuracy),
                "observed_accuracy": evidence.and_then(|a| a.accuracy()),
            });
            RetrainRequest {
                model_id: scope.model_id.clone(),
                model_version: scope.model_version.clone(),
                cohort: scope.id(),
                reason: reasons.into_iter().collect::<Vec<_>>().join(","),
                window_start_ms: eval.window_start_ms,
                payload,
            }
        })
        .collect()
}
