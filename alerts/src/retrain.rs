//! Retraining triggers: the request the drift engine raises, its idempotency key, and the gate
//! that lets at most one trigger per cohort through per cool-down.
//!
//! Synchronous and clock-free like the engine (time comes in as milliseconds). The gate must
//! never let the same `(model, version, cohort, window)` through twice while it remembers it,
//! and never more than one window per `(model, version, cohort)` within the cool-down.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TriggerPolicy;

/// A request to retrain a model because one cohort drifted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainRequest {
    /// Model identifier.
    pub model_id: String,
    /// Model version the drift was measured on.
    pub model_version: String,
    /// Cohort (group of devices) that drifted.
    pub cohort: String,
    /// Human-readable reason, e.g. "PSI 0.31 on feature 3 > 0.2".
    pub reason: String,
    /// Start of the window in which drift was detected, milliseconds since the Unix epoch.
    pub window_start_ms: i64,
    /// Whatever the drift engine attaches (drifted features with scores, histograms,
    /// importance weights); forwarded as is.
    pub payload: serde_json::Value,
}

impl RetrainRequest {
    /// Hex SHA-256 over the model id, model version, cohort and window start: the same for a
    /// retry or a duplicate of this request, different for any other window or cohort.
    ///
    /// Input encoding (unambiguous): `"tinyfleet.retrain.v1"`, then each string as its length
    /// (u64 big-endian) followed by its UTF-8 bytes, then `window_start_ms` as i64 big-endian.
    pub fn idempotency_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"tinyfleet.retrain.v1");
        for s in [&self.model_id, &self.model_version, &self.cohort] {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        }
        h.update(self.window_start_ms.to_be_bytes());
        hex::encode(h.finalize())
    }

    fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("model_id", &self.model_id),
            ("model_version", &self.model_version),
            ("cohort", &self.cohort),
        ] {
            if v.trim().is_empty() {
                return Err(format!("retrain request has an empty `{name}`"));
            }
        }
        Ok(())
    }
}

/// A request the gate let through, with its idempotency key: hand it to the deliverer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrainTrigger {
    /// The request.
    pub request: RetrainRequest,
    /// [`RetrainRequest::idempotency_key`] of the request.
    pub idempotency_key: String,
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum RetrainDecision {
    /// Send it.
    Trigger(RetrainTrigger),
    /// This exact request (same idempotency key) was already triggered.
    Duplicate {
        /// Its idempotency key.
        idempotency_key: String,
    },
    /// Another window of the same cohort triggered less than the cool-down ago.
    CoolingDown {
        /// When a new window may trigger, milliseconds since the Unix epoch.
        until_ms: i64,
    },
    /// The request is unusable (empty model id, version or cohort).
    Invalid {
        /// Why.
        reason: String,
    },
}

/// What the gate remembers about one `(model_id, model_version, cohort)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GateRecord {
    pub model_id: String,
    pub model_version: String,
    pub cohort: String,
    pub last_trigger_ms: i64,
    pub last_key: String,
}

/// Entries older than this and the cool-down are forgotten (duplicates of a window older than
/// this are let through again; the idempotency key still lets the receiver drop them).
const GATE_MEMORY_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// The per-cohort rate limit of retraining triggers.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetrainGate {
    last: BTreeMap<(String, String, String), (i64, String)>,
}

impl RetrainGate {
    pub(crate) fn decide(
        &mut self,
        policy: &TriggerPolicy,
        now_ms: i64,
        request: RetrainRequest,
    ) -> RetrainDecision {
        if let Err(reason) = request.check() {
            return RetrainDecision::Invalid { reason };
        }
        let cooldown = i64::try_from(policy.cooldown_ms).unwrap_or(i64::MAX);
        self.last.retain(|_, (at, _)| {
            now_ms.saturating_sub(*at) < cooldown.max(GATE_MEMORY_MS) || *at > now_ms
        });
        let key = request.idempotency_key();
        let id = (
            request.model_id.clone(),
            request.model_version.clone(),
            request.cohort.clone(),
        );
        if let Some((at, last_key)) = self.last.get(&id) {
            if *last_key == key {
                return RetrainDecision::Duplicate {
                    idempotency_key: key,
                };
            }
            if now_ms.saturating_sub(*at) < cooldown {
                return RetrainDecision::CoolingDown {
                    until_ms: at.saturating_add(cooldown),
                };
            }
        }
        self.last.insert(id, (now_ms, key.clone()));
        RetrainDecision::Trigger(RetrainTrigger {
            request,
            idempotency_key: key,
        })
    }

    pub(crate) fn records(&self) -> Vec<GateRecord> {
        self.last
            .iter()
            .map(
                |((model_id, model_version, cohort), (at, key))| GateRecord {
                    model_id: model_id.clone(),
                    model_version: model_version.clone(),
                    cohort: cohort.clone(),
                    last_trigger_ms: *at,
                    last_key: key.clone(),
                },
            )
            .collect()
    }

    pub(crate) fn from_records(records: Vec<GateRecord>) -> Self {
        let last = records
            .into_iter()
            .map(|r| {
                (
                    (r.model_id, r.model_version, r.cohort),
                    (r.last_trigger_ms, r.last_key),
                )
            })
            .collect();
        Self { last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(cohort: &str, window_start_ms: i64) -> RetrainRequest {
        RetrainRequest {
            model_id: "kws".into(),
            model_version: "1.2.0".into(),
            cohort: cohort.into(),
            reason: "psi 0.3 > 0.2".into(),
            window_start_ms,
            payload: serde_json::json!({ "features": [{ "index": 3, "psi": 0.3 }] }),
        }
    }

    #[test]
    fn idempotency_key_is_stable_and_field_sensitive() {
        let a = request("eu", 1000);
        let key = a.idempotency_key();
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        // Reason and payload do not change the key (a retry may carry fresher numbers).
        let mut b = a.clone();
        b.reason = "other".into();
        b.payload = serde_json::json!(null);
        assert_eq!(b.idempotency_key(), key);
        // Every identifying field does.
        assert_ne!(request("us", 1000).idempotency_key(), key);
        assert_ne!(request("eu", 1001).idempotency_key(), key);
        let mut c = a.clone();
        c.model_version = "1.2.1".into();
        assert_ne!(c.idempotency_key(), key);
        // Length prefixes: moving a character between fields changes the key.
        let mut d = a.clone();
        d.model_id = "kw".into();
        d.model_version = "s1.2.0".into();
        assert_ne!(d.idempotency_key(), key);
        // Pinned value (computed independently with Python's hashlib), so a change of encoding
        // is noticed: receivers store these keys.
        assert_eq!(
            key,
            "c0f60eb3a80accdaa272d4f19daf8cb381c68d17a85351f2e3067e8b6f950b20"
        );
    }

    #[test]
    fn cooldown_and_duplicates() {
        let policy = TriggerPolicy { cooldown_ms: 1000 };
        let mut gate = RetrainGate::default();
        let first = gate.decide(&policy, 10_000, request("eu", 0));
        assert!(matches!(first, RetrainDecision::Trigger(_)));
        // Same window again: duplicate, even after the cool-down.
        assert!(matches!(
            gate.decide(&policy, 10_500, request("eu", 0)),
            RetrainDecision::Duplicate { .. }
        ));
        assert!(matches!(
            gate.decide(&policy, 20_000, request("eu", 0)),
            RetrainDecision::Duplicate { .. }
        ));
        // Next window within the cool-down: suppressed until 11_000.
        assert_eq!(
            gate.decide(&policy, 10_999, request("eu", 60_000)),
            RetrainDecision::CoolingDown { until_ms: 11_000 }
        );
        // Another cohort is independent.
        assert!(matches!(
            gate.decide(&policy, 10_999, request("us", 60_000)),
            RetrainDecision::Trigger(_)
        ));
        // After the cool-down, the next window triggers.
        assert!(matches!(
            gate.decide(&policy, 11_000, request("eu", 60_000)),
            RetrainDecision::Trigger(_)
        ));
        // Zero cool-down: every new window triggers, duplicates still do not.
        let zero = TriggerPolicy { cooldown_ms: 0 };
        let mut gate = RetrainGate::default();
        assert!(matches!(
            gate.decide(&zero, 0, request("eu", 0)),
            RetrainDecision::Trigger(_)
        ));
        assert!(matches!(
            gate.decide(&zero, 0, request("eu", 1)),
            RetrainDecision::Trigger(_)
        ));
        assert!(matches!(
            gate.decide(&zero, 0, request("eu", 1)),
            RetrainDecision::Duplicate { .. }
        ));
        // Invalid requests are refused, not triggered.
        let mut bad = request("", 0);
        bad.cohort = " ".into();
        assert!(matches!(
            gate.decide(&zero, 0, bad),
            RetrainDecision::Invalid { .. }
        ));
    }
}
