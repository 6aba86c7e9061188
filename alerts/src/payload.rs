//! Wire shapes of what leaves the engine: Alertmanager webhook v4 messages, retraining request
//! bodies (generic webhook and GitHub `repository_dispatch`), and the MQTT alert event.
//!
//! This module owns the field names; it must not change them without changing the tests that
//! pin them, because receivers parse them. Times are RFC 3339 in UTC, formatted like Go's
//! `time.RFC3339Nano` (what Alertmanager sends): fraction only when non-zero, trailing zeros
//! trimmed, and `0001-01-01T00:00:00Z` for "not ended".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::{AlertStatus, Notification};
use crate::matcher::Labels;
use crate::retrain::RetrainTrigger;

/// Go's zero `time.Time`, which Alertmanager sends as `endsAt` of an alert that has not ended.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// `event` of the generic retraining webhook body.
pub const RETRAIN_EVENT: &str = "tinyfleet.retrain";
/// `event_type` of the GitHub `repository_dispatch` (what workflows filter on in
/// `on: repository_dispatch: types: [tinyfleet-retrain]`).
pub const GITHUB_EVENT_TYPE: &str = "tinyfleet-retrain";
/// GitHub refuses a `client_payload` with more top-level properties than this.
pub const GITHUB_MAX_CLIENT_PAYLOAD_KEYS: usize = 10;

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC (`2024-05-01T12:00:00.25Z`).
/// Values outside years 1..=9999 are clamped to that range.
pub fn rfc3339_ms(ms: i64) -> String {
    const MIN_MS: i64 = -62_135_596_800_000; // 0001-01-01T00:00:00Z
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = ms.clamp(MIN_MS, MAX_MS);
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    let mut out = format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}");
    if milli != 0 {
        let frac = format!("{milli:03}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One alert in an Alertmanager webhook message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookAlert {
    /// `firing` or `resolved`.
    pub status: AlertStatus,
    /// Labels.
    pub labels: Labels,
    /// Annotations.
    pub annotations: Labels,
    /// RFC 3339 time it went firing.
    pub starts_at: String,
    /// RFC 3339 time it resolved, or [`ZERO_TIME`].
    pub ends_at: String,
    /// Link back to this service.
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    /// Fingerprint of the labels.
    pub fingerprint: String,
}

/// An Alertmanager webhook message, version 4, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookMessage {
    /// The receiver's name.
    pub receiver: String,
    /// `firing` if any alert fires, else `resolved`.
    pub status: AlertStatus,
    /// The alerts.
    pub alerts: Vec<WebhookAlert>,
    /// The labels the group is keyed on (we group by receiver only: empty).
    pub group_labels: Labels,
    /// Labels equal in every alert.
    pub common_labels: Labels,
    /// Annotations equal in every alert.
    pub common_annotations: Labels,
    /// This service's URL.
    #[serde(rename = "externalURL")]
    pub external_url: String,
    /// Always `"4"`.
    pub version: String,
    /// Stable identifier of the group (the receiver's route).
    pub group_key: String,
    /// Alerts left out because of the receiver's `max_alerts`.
    pub truncated_alerts: u64,
}

impl WebhookMessage {
    /// Keeps the first `max_alerts` alerts (0 keeps all), counting the rest in
    /// `truncatedAlerts`, as Alertmanager's `max_alerts`.
    pub fn truncate(&mut self, max_alerts: usize) {
        if max_alerts > 0 && self.alerts.len() > max_alerts {
            self.truncated_alerts += (self.alerts.len() - max_alerts) as u64;
            self.alerts.truncate(max_alerts);
        }
    }
}

fn common(maps: &[&Labels]) -> Labels {
    let Some((first, rest)) = maps.split_first() else {
        return Labels::new();
    };
    first
        .iter()
        .filter(|(k, v)| rest.iter().all(|m| m.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The webhook messages for one evaluation's notifications: one per receiver, holding every
/// notification addressed to it, in order. `external_url` fills `externalURL` and
/// `generatorURL`.
pub fn webhook_messages(notifications: &[Notification], external_url: &str) -> Vec<WebhookMessage> {
    let mut by_receiver: BTreeMap<&str, Vec<&Notification>> = BTreeMap::new();
    for n in notifications {
        for r in &n.receivers {
            by_receiver.entry(r.as_str()).or_default().push(n);
        }
    }
    by_receiver
        .into_iter()
        .map(|(receiver, ns)| {
            let alerts: Vec<WebhookAlert> = ns
                .iter()
                .map(|n| WebhookAlert {
                    status: n.status(),
                    labels: n.labels.clone(),
                    annotations: n.annotations.clone(),
                    starts_at: rfc3339_ms(n.starts_at_ms),
                    ends_at: n
                        .ends_at_ms
                        .map_or_else(|| ZERO_TIME.to_owned(), rfc3339_ms),
                    generator_url: external_url.to_owned(),
                    fingerprint: n.fingerprint.clone(),
                })
                .collect();
            let status = if alerts.iter().any(|a| a.status == AlertStatus::Firing) {
                AlertStatus::Firing
            } else {
                AlertStatus::Resolved
            };
            let labels: Vec<&Labels> = ns.iter().map(|n| &n.labels).collect();
            let annotations: Vec<&Labels> = ns.iter().map(|n| &n.annotations).collect();
            WebhookMessage {
                receiver: receiver.to_owned(),
                status,
                alerts,
                group_labels: Labels::new(),
                common_labels: common(&labels),
                common_annotations: common(&annotations),
                external_url: external_url.to_owned(),
                version: "4".to_owned(),
                group_key: format!("{{}}/{{receiver={receiver:?}}}:{{}}"),
                truncated_alerts: 0,
            }
        })
        .collect()
}

/// The common part of both retraining bodies (7 top-level keys).
fn retrain_fields(t: &RetrainTrigger) -> serde_json::Map<String, Value> {
    let r = &t.request;
    let Value::Object(map) = json!({
        "idempotency_key": t.idempotency_key,
        "model": { "id": r.model_id, "version": r.model_version },
        "cohort": r.cohort,
        "reason": r.reason,
        "window_start": rfc3339_ms(r.window_start_ms),
        "window_start_ms": r.window_start_ms,
        "payload": r.payload,
    }) else {
        return serde_json::Map::new();
    };
    map
}

/// Body of the generic retraining webhook (sent with an `Idempotency-Key` header equal to
/// `idempotency_key`):
///
/// ```json
/// { "idempotency_key": "…64 hex…", "event": "tinyfleet.retrain",
///   "model": { "id": "kws", "version": "1.2.0" }, "cohort": "eu", "reason": "…",
///   "window_start": "2024-05-01T00:00:00Z", "window_start_ms": 1714521600000,
///   "payload": { …whatever the drift engine attached… } }
/// ```
///
/// The drift engine's payload is nested under `payload` rather than merged into the top level,
/// so it can never overwrite `idempotency_key` or `event`.
pub fn retrain_webhook_body(trigger: &RetrainTrigger) -> Value {
    let mut map = retrain_fields(trigger);
    map.insert("event".to_owned(), Value::from(RETRAIN_EVENT));
    Value::Object(map)
}

/// Body of `POST /repos/{owner}/{repo}/dispatches`: `event_type` [`GITHUB_EVENT_TYPE`] and a
/// `client_payload` of 7 top-level properties (GitHub allows at most 10), the drift engine's
/// data under `payload`.
pub fn github_dispatch_body(trigger: &RetrainTrigger) -> Value {
    json!({
        "event_type": GITHUB_EVENT_TYPE,
        "client_payload": Value::Object(retrain_fields(trigger)),
    })
}

/// One alert transition as published on the MQTT alert topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttAlertEvent {
    /// `firing` or `resolved`.
    pub status: AlertStatus,
    /// `firing`, `repeat` or `resolved`.
    pub kind: crate::engine::NotificationKind,
    /// Labels.
    pub labels: Labels,
    /// Annotations.
    pub annotations: Labels,
    /// Fingerprint of the labels.
    pub fingerprint: String,
    /// RFC 3339 time it went firing.
    pub starts_at: String,
    /// RFC 3339 time it resolved, or [`ZERO_TIME`].
    pub ends_at: String,
    /// The latest value (`null` if not finite).
    #[serde(with = "crate::float")]
    pub value: f64,
    /// The source that reported it.
    pub source: String,
}

impl MqttAlertEvent {
    /// The event for one notification.
    pub fn from_notification(n: &Notification) -> Self {
        Self {
            status: n.status(),
            kind: n.kind,
            labels: n.labels.clone(),
            annotations: n.annotations.clone(),
            fingerprint: n.fingerprint.clone(),
            starts_at: rfc3339_ms(n.starts_at_ms),
            ends_at: n
                .ends_at_ms
                .map_or_else(|| ZERO_TIME.to_owned(), rfc3339_ms),
            value: n.value,
            source: n.source.clone(),
        }
    }
}

/// The JSON bytes of the MQTT event for `notification`, ready to publish.
pub fn mqtt_alert_event(notification: &Notification) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&MqttAlertEvent::from_notification(notification))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NotificationKind;
    use crate::retrain::RetrainRequest;

    #[test]
    fn rfc3339_like_go() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_714_521_600_000), "2024-05-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_714_521_600_250), "2024-05-01T00:00:00.25Z");
        assert_eq!(rfc3339_ms(1_714_521_600_001), "2024-05-01T00:00:00.001Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(i64::MIN), ZERO_TIME);
        assert_eq!(rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    fn notification(kind: NotificationKind, fp: &str, device: &str) -> Notification {
        let mut labels = Labels::new();
        labels.insert("alertname".into(), "Drift".into());
        labels.insert("severity".into(), "warning".into());
        labels.insert("device".into(), device.into());
        let mut annotations = Labels::new();
        annotations.insert("summary".into(), format!("drift on {device}"));
        annotations.insert("runbook".into(), "r".into());
        Notification {
            kind,
            receivers: vec!["ops".into()],
            fingerprint: fp.into(),
            labels,
            annotations,
            value: 0.5,
            source: "drift".into(),
            starts_at_ms: 1_714_521_600_000,
            ends_at_ms: (kind == NotificationKind::Resolved).then_some(1_714_521_660_000),
        }
    }

    #[test]
    fn webhook_v4_has_alertmanagers_exact_fields() {
        let ns = vec![
            notification(NotificationKind::Firing, "aaaaaaaaaaaaaaaa", "d1"),
            notification(NotificationKind::Resolved, "bbbbbbbbbbbbbbbb", "d2"),
        ];
        let msgs = webhook_messages(&ns, "http://fleet:8080");
        assert_eq!(msgs.len(), 1);
        let v = serde_json::to_value(&msgs[0]).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = vec![
            "version",
            "groupKey",
            "truncatedAlerts",
            "status",
            "receiver",
            "groupLabels",
            "commonLabels",
            "commonAnnotations",
            "externalURL",
            "alerts",
        ];
        expected.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, expected);
        assert_eq!(v["version"], "4");
        assert_eq!(v["status"], "firing");
        assert_eq!(v["receiver"], "ops");
        assert_eq!(v["truncatedAlerts"], 0);
        assert_eq!(v["externalURL"], "http://fleet:8080");
        assert_eq!(v["groupKey"], "{}/{receiver=\"ops\"}:{}");
        assert_eq!(v["groupLabels"], json!({}));
        assert_eq!(
            v["commonLabels"],
            json!({ "alertname": "Drift", "severity": "warning" })
        );
        assert_eq!(v["commonAnnotations"], json!({ "runbook": "r" }));
        let a0 = &v["alerts"][0];
        let mut akeys: Vec<&str> = a0.as_object().unwrap().keys().map(String::as_str).collect();
        akeys.sort_unstable();
        assert_eq!(
            akeys,
            vec![
                "annotations",
                "endsAt",
                "fingerprint",
                "generatorURL",
                "labels",
                "startsAt",
                "status"
            ]
        );
        assert_eq!(a0["status"], "firing");
        assert_eq!(a0["startsAt"], "2024-05-01T00:00:00Z");
        assert_eq!(a0["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(a0["fingerprint"], "aaaaaaaaaaaaaaaa");
        assert_eq!(a0["generatorURL"], "http://fleet:8080");
        let a1 = &v["alerts"][1];
        assert_eq!(a1["status"], "resolved");
        assert_eq!(a1["endsAt"], "2024-05-01T00:01:00Z");
        // All resolved: the message is resolved.
        let msgs = webhook_messages(&ns[1..], "");
        assert_eq!(
            serde_json::to_value(&msgs[0]).unwrap()["status"],
            "resolved"
        );
    }

    #[test]
    fn webhook_groups_by_receiver_and_truncates() {
        let mut a = notification(NotificationKind::Firing, "aaaaaaaaaaaaaaaa", "d1");
        a.receivers = vec!["ops".into(), "team".into()];
        let b = notification(NotificationKind::Repeat, "bbbbbbbbbbbbbbbb", "d2");
        let mut c = notification(NotificationKind::Firing, "cccccccccccccccc", "d3");
        c.receivers = vec![];
        let msgs = webhook_messages(&[a, b, c], "");
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].receiver, "ops");
        assert_eq!(msgs[0].alerts.len(), 2);
        assert_eq!(msgs[1].receiver, "team");
        assert_eq!(msgs[1].alerts.len(), 1);
        assert_eq!(msgs[1].common_labels["device"], "d1");
        let mut m = msgs[0].clone();
        m.truncate(1);
        assert_eq!(m.alerts.len(), 1);
        assert_eq!(m.truncated_alerts, 1);
        m.truncate(0);
        assert_eq!(m.alerts.len(), 1);
    }

    fn trigger() -> RetrainTrigger {
        let request = RetrainRequest {
            model_id: "kws".into(),
            model_version: "1.2.0".into(),
            cohort: "eu".into(),
            reason: "psi".into(),
            window_start_ms: 1_714_521_600_000,
            payload: json!({ "features": [{ "index": 3, "psi": 0.31 }], "event": "evil" }),
        };
        RetrainTrigger {
            idempotency_key: request.idempotency_key(),
            request,
        }
    }

    #[test]
    fn retrain_webhook_body_shape() {
        let t = trigger();
        let v = retrain_webhook_body(&t);
        assert_eq!(v["idempotency_key"], t.idempotency_key.as_str());
        assert_eq!(v["event"], "tinyfleet.retrain");
        assert_eq!(v["model"], json!({ "id": "kws", "version": "1.2.0" }));
        assert_eq!(v["cohort"], "eu");
        assert_eq!(v["reason"], "psi");
        assert_eq!(v["window_start"], "2024-05-01T00:00:00Z");
        assert_eq!(v["window_start_ms"], 1_714_521_600_000i64);
        assert_eq!(v["payload"]["features"][0]["psi"], 0.31);
        assert_eq!(v.as_object().unwrap().len(), 8);
    }

    #[test]
    fn github_dispatch_body_within_limits() {
        let t = trigger();
        let v = github_dispatch_body(&t);
        assert_eq!(v.as_object().unwrap().len(), 2);
        assert_eq!(v["event_type"], "tinyfleet-retrain");
        let cp = v["client_payload"].as_object().unwrap();
        assert!(cp.len() <= GITHUB_MAX_CLIENT_PAYLOAD_KEYS, "{}", cp.len());
        assert_eq!(cp["idempotency_key"], t.idempotency_key.as_str());
        assert_eq!(cp["payload"]["event"], "evil");
        assert_eq!(cp["model"]["version"], "1.2.0");
    }

    #[test]
    fn mqtt_event_shape() {
        let mut n = notification(NotificationKind::Resolved, "bbbbbbbbbbbbbbbb", "d2");
        n.value = f64::NAN;
        let bytes = mqtt_alert_event(&n).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["status"], "resolved");
        assert_eq!(v["kind"], "resolved");
        assert_eq!(v["fingerprint"], "bbbbbbbbbbbbbbbb");
        assert_eq!(v["startsAt"], "2024-05-01T00:00:00Z");
        assert_eq!(v["endsAt"], "2024-05-01T00:01:00Z");
        assert_eq!(v["labels"]["device"], "d2");
        assert_eq!(v["annotations"]["summary"], "drift on d2");
        assert_eq!(v["value"], Value::Null);
        let back: MqttAlertEvent = serde_json::from_slice(&bytes).unwrap();
        assert!(back.value.is_nan());
        let firing = notification(NotificationKind::Firing, "aaaaaaaaaaaaaaaa", "d1");
        let v: Value = serde_json::from_slice(&mqtt_alert_event(&firing).unwrap()).unwrap();
        assert_eq!(v["endsAt"], ZERO_TIME);
        assert_eq!(v["status"], "firing");
    }
}
