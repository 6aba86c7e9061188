//! Tests of the state machine, driven with explicit times.

use super::*;
use crate::config::{InhibitRule, Receiver, ReceiverKind, RuleOverride};
use crate::retrain::RetrainRequest;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

fn manager(config: AlertsConfig) -> AlertManager {
    AlertManager::new(config).unwrap()
}

fn default_manager() -> AlertManager {
    manager(AlertsConfig::default())
}

fn with_rule(name: &str, o: RuleOverride) -> AlertsConfig {
    let mut c = AlertsConfig::default();
    c.rules.insert(name.to_owned(), o);
    c
}

fn drift(device: &str, value: f64) -> Condition {
    Condition::new("FeatureDrift", value)
        .label("device", device)
        .label("kind", "drift")
        .annotation("summary", format!("drift on {device}"))
}

fn offline(device: &str) -> Condition {
    Condition::new("DeviceOffline", 1.0).label("device", device)
}

fn kinds(ns: &[Notification]) -> Vec<(NotificationKind, String)> {
    ns.iter()
        .map(|n| (n.kind, n.labels["alertname"].clone()))
        .collect()
}

fn view<'a>(views: &'a [AlertView], alertname: &str, device: &str) -> &'a AlertView {
    views
        .iter()
        .find(|v| {
            v.labels["alertname"] == alertname
                && v.labels.get("device").map(String::as_str) == Some(device)
        })
        .unwrap()
}

#[test]
fn pending_then_firing_after_for_duration() {
    let mut m = manager(with_rule(
        "FeatureDrift",
        RuleOverride {
            for_ms: Some(5 * MIN as u64),
            ..RuleOverride::default()
        },
    ));
    assert!(m.evaluate(0, "drift", vec![drift("d1", 0.3)]).is_empty());
    assert_eq!(m.alerts(0)[0].state, AlertState::Pending);
    assert!(
        m.evaluate(4 * MIN, "drift", vec![drift("d1", 0.4)])
            .is_empty()
    );
    let ns = m.evaluate(5 * MIN, "drift", vec![drift("d1", 0.5)]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Firing, "FeatureDrift".into())]
    );
    assert_eq!(ns[0].starts_at_ms, 5 * MIN);
    assert_eq!(ns[0].value, 0.5);
    assert_eq!(ns[0].ends_at_ms, None);
    assert_eq!(ns[0].status(), AlertStatus::Firing);
    let v = &m.alerts(5 * MIN)[0];
    assert_eq!(v.state, AlertState::Firing);
    assert_eq!(v.active_at_ms, 0);
    assert_eq!(v.starts_at_ms, Some(5 * MIN));
    // Still true: no second notification before the repeat interval.
    for t in 6..60 {
        assert!(
            m.evaluate(t * MIN, "drift", vec![drift("d1", 0.5)])
                .is_empty()
        );
    }
}

#[test]
fn zero_for_fires_at_first_evaluation_and_severity_is_added() {
    let mut m = manager(with_rule(
        "DeviceOffline",
        RuleOverride {
            severity: Some("critical".into()),
            ..RuleOverride::default()
        },
    ));
    let ns = m.evaluate(1000, "presence", vec![offline("d1")]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Firing, "DeviceOffline".into())]
    );
    assert_eq!(ns[0].labels["severity"], "critical");
    assert_eq!(ns[0].source, "presence");
    assert_eq!(ns[0].starts_at_ms, 1000);
    // A severity the condition carries wins.
    let ns = m.evaluate(
        1000,
        "health",
        vec![Condition::new("Hot", 90.0).label("severity", "page")],
    );
    assert_eq!(ns[0].labels["severity"], "page");
    assert_eq!(ns[0].fingerprint, fingerprint(&ns[0].labels));
}

#[test]
fn pending_that_disappears_ends_silently() {
    let mut m = manager(with_rule(
        "FeatureDrift",
        RuleOverride {
            for_ms: Some(5 * MIN as u64),
            ..RuleOverride::default()
        },
    ));
    m.evaluate(0, "drift", vec![drift("d1", 0.3)]);
    assert!(m.evaluate(MIN, "drift", vec![]).is_empty());
    assert!(m.alerts(MIN).is_empty());
    // Coming back starts a new pending period.
    m.evaluate(2 * MIN, "drift", vec![drift("d1", 0.3)]);
    assert!(
        m.evaluate(6 * MIN, "drift", vec![drift("d1", 0.3)])
            .is_empty()
    );
    assert_eq!(m.alerts(6 * MIN)[0].active_at_ms, 2 * MIN);
    assert_eq!(
        m.evaluate(7 * MIN, "drift", vec![drift("d1", 0.3)]).len(),
        1
    );
}

#[test]
fn resolves_at_first_evaluation_without_it_by_default() {
    let mut m = default_manager();
    m.evaluate(0, "drift", vec![drift("d1", 0.3)]);
    let ns = m.evaluate(MIN, "drift", vec![]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Resolved, "FeatureDrift".into())]
    );
    assert_eq!(ns[0].status(), AlertStatus::Resolved);
    assert_eq!(ns[0].starts_at_ms, 0);
    assert_eq!(ns[0].ends_at_ms, Some(MIN));
    let v = &m.alerts(MIN)[0];
    assert_eq!(v.state, AlertState::Resolved);
    assert_eq!(v.ends_at_ms, Some(MIN));
    // Resolved once: further evaluations without it say nothing.
    assert!(m.evaluate(2 * MIN, "drift", vec![]).is_empty());
    // Listed for the retention (15 min by default), then forgotten.
    assert_eq!(m.alerts(2 * MIN).len(), 1);
    m.evaluate(MIN + 15 * MIN, "drift", vec![]);
    assert!(m.alerts(16 * MIN).is_empty());
}

#[test]
fn flapping_within_resolve_after_keeps_the_incident() {
    let mut m = manager(with_rule(
        "FeatureDrift",
        RuleOverride {
            resolve_after_ms: Some(10 * MIN as u64),
            ..RuleOverride::default()
        },
    ));
    let ns = m.evaluate(0, "drift", vec![drift("d1", 0.3)]);
    assert_eq!(ns.len(), 1);
    let fp = ns[0].fingerprint.clone();
    // Absent for 9 minutes: still firing, nothing sent.
    assert!(m.evaluate(MIN, "drift", vec![]).is_empty());
    assert!(m.evaluate(9 * MIN, "drift", vec![]).is_empty());
    assert_eq!(m.alerts(9 * MIN)[0].state, AlertState::Firing);
    // Back: same incident, same startsAt, no new firing notification.
    assert!(
        m.evaluate(10 * MIN, "drift", vec![drift("d1", 0.4)])
            .is_empty()
    );
    let v = &m.alerts(10 * MIN)[0];
    assert_eq!(v.fingerprint, fp);
    assert_eq!(v.starts_at_ms, Some(0));
    assert_eq!(v.value, 0.4);
    // Absent for exactly resolve_after: resolved, once.
    assert!(m.evaluate(15 * MIN, "drift", vec![]).is_empty());
    let ns = m.evaluate(20 * MIN, "drift", vec![]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Resolved, "FeatureDrift".into())]
    );
    assert_eq!(ns[0].starts_at_ms, 0);
    assert!(m.evaluate(21 * MIN, "drift", vec![]).is_empty());
}

#[test]
fn flapping_while_pending_keeps_active_at() {
    let mut m = manager(with_rule(
        "FeatureDrift",
        RuleOverride {
            for_ms: Some(5 * MIN as u64),
            resolve_after_ms: Some(4 * MIN as u64),
            ..RuleOverride::default()
        },
    ));
    m.evaluate(0, "drift", vec![drift("d1", 0.3)]);
    m.evaluate(MIN, "drift", vec![]);
    m.evaluate(2 * MIN, "drift", vec![drift("d1", 0.3)]);
    assert_eq!(m.alerts(2 * MIN)[0].active_at_ms, 0);
    // Absent at the moment for_ms elapses: it does not fire while false.
    assert!(m.evaluate(5 * MIN, "drift", vec![]).is_empty());
    assert_eq!(m.alerts(5 * MIN)[0].state, AlertState::Pending);
    let ns = m.evaluate(6 * MIN, "drift", vec![drift("d1", 0.3)]);
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].starts_at_ms, 6 * MIN);
    assert_eq!(m.alerts(6 * MIN)[0].active_at_ms, 0);
}

#[test]
fn one_incident_per_fingerprint() {
    let mut m = default_manager();
    // The same labels twice in one evaluation, and a label with an empty value (absent).
    let ns = m.evaluate(
        0,
        "drift",
        vec![drift("d1", 0.1), drift("d1", 0.2).label("empty", "")],
    );
    assert_eq!(ns.len(), 1);
    assert_eq!(m.alerts(0).len(), 1);
    assert_eq!(m.alerts(0)[0].value, 0.2);
    // Different label values are different alerts.
    let ns = m.evaluate(MIN, "drift", vec![drift("d1", 0.1), drift("d2", 0.1)]);
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].labels["device"], "d2");
    assert_eq!(m.alerts(MIN).len(), 2);
    // Resolved, then back: a new incident with a new startsAt and a new firing notification.
    m.evaluate(2 * MIN, "drift", vec![]);
    let ns = m.evaluate(3 * MIN, "drift", vec![drift("d1", 0.1)]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Firing, "FeatureDrift".into())]
    );
    assert_eq!(ns[0].starts_at_ms, 3 * MIN);
    let views = m.alerts(3 * MIN);
    assert_eq!(views.len(), 2, "d1 firing again, d2 resolved");
    assert_eq!(view(&views, "FeatureDrift", "d1").state, AlertState::Firing);
    assert_eq!(
        view(&views, "FeatureDrift", "d2").state,
        AlertState::Resolved
    );
}

#[test]
fn sources_are_independent() {
    let mut m = default_manager();
    m.evaluate(0, "drift", vec![drift("d1", 0.3)]);
    m.evaluate(0, "presence", vec![offline("d2")]);
    // The drift source reporting nothing resolves only its own alert.
    let ns = m.evaluate(MIN, "drift", vec![]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Resolved, "FeatureDrift".into())]
    );
    let views = m.alerts(MIN);
    assert_eq!(
        view(&views, "DeviceOffline", "d2").state,
        AlertState::Firing
    );
}

#[test]
fn repeat_interval() {
    let mut m = default_manager();
    assert_eq!(m.evaluate(0, "presence", vec![offline("d1")]).len(), 1);
    assert!(
        m.evaluate(4 * HOUR - 1, "presence", vec![offline("d1")])
            .is_empty()
    );
    let ns = m.evaluate(4 * HOUR, "presence", vec![offline("d1")]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Repeat, "DeviceOffline".into())]
    );
    assert_eq!(ns[0].starts_at_ms, 0, "a repeat keeps startsAt");
    assert!(
        m.evaluate(5 * HOUR, "presence", vec![offline("d1")])
            .is_empty()
    );
    // Any evaluation (or tick) is a clock tick for every alert.
    let ns = m.tick(8 * HOUR);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Repeat, "DeviceOffline".into())]
    );
    assert_eq!(m.alerts(8 * HOUR)[0].last_notified_ms, Some(8 * HOUR));

    // repeat_interval 0: never repeats.
    let mut m = manager(with_rule(
        "DeviceOffline",
        RuleOverride {
            repeat_interval_ms: Some(0),
            ..RuleOverride::default()
        },
    ));
    assert_eq!(m.evaluate(0, "presence", vec![offline("d1")]).len(), 1);
    assert!(
        m.evaluate(100 * HOUR, "presence", vec![offline("d1")])
            .is_empty()
    );
}

#[test]
fn time_going_backwards_does_not_panic_or_fire_early() {
    let mut m = manager(with_rule(
        "FeatureDrift",
        RuleOverride {
            for_ms: Some(5 * MIN as u64),
            ..RuleOverride::default()
        },
    ));
    m.evaluate(10 * MIN, "drift", vec![drift("d1", 0.3)]);
    assert!(m.evaluate(0, "drift", vec![drift("d1", 0.3)]).is_empty());
    assert!(
        m.evaluate(i64::MIN, "drift", vec![drift("d1", 0.3)])
            .is_empty()
    );
    assert_eq!(
        m.evaluate(i64::MAX, "drift", vec![drift("d1", 0.3)]).len(),
        1
    );
    m.tick(i64::MIN);
}

#[test]
fn invalid_conditions_are_counted_and_alerts_bounded() {
    let mut m = manager(AlertsConfig {
        max_alerts: 2,
        ..AlertsConfig::default()
    });
    let no_name = Condition {
        labels: Labels::new(),
        annotations: Labels::new(),
        value: 1.0,
    };
    let empty_name = Condition::new("", 1.0);
    let ns = m.evaluate(
        0,
        "drift",
        vec![
            no_name,
            empty_name,
            drift("d1", 0.1),
            drift("d2", 0.1),
            drift("d3", 0.1),
        ],
    );
    assert_eq!(ns.len(), 2);
    assert_eq!(m.stats().invalid_conditions, 2);
    assert_eq!(m.stats().refused_alerts, 1);
    assert_eq!(m.alerts(0).len(), 2);
}

#[test]
fn receivers_come_from_the_rule_or_the_defaults() {
    let hook = |name: &str| Receiver {
        name: name.into(),
        kind: ReceiverKind::AlertmanagerWebhook {
            url: "http://h/x".into(),
            max_alerts: 0,
        },
        bearer_token: None,
    };
    let mut c = with_rule(
        "DeviceOffline",
        RuleOverride {
            receivers: Some(vec!["pager".into()]),
            ..RuleOverride::default()
        },
    );
    c.receivers = vec![hook("ops"), hook("pager")];
    c.default_receivers = vec!["ops".into()];
    let mut m = manager(c);
    let ns = m.evaluate(
        0,
        "presence",
        vec![offline("d1"), Condition::new("Other", 1.0)],
    );
    let by_name: BTreeMap<_, _> = ns
        .iter()
        .map(|n| (n.labels["alertname"].clone(), n.receivers.clone()))
        .collect();
    assert_eq!(by_name["DeviceOffline"], vec!["pager".to_owned()]);
    assert_eq!(by_name["Other"], vec!["ops".to_owned()]);
}

fn silence(matchers: Vec<Matcher>, starts_at_ms: i64, ends_at_ms: i64) -> Silence {
    Silence {
        id: String::new(),
        matchers,
        starts_at_ms,
        ends_at_ms,
        created_by: "ops@example".into(),
        comment: "maintenance".into(),
    }
}

#[test]
fn silenced_alert_keeps_state_is_listed_and_notified_when_silence_ends() {
    let mut m = default_manager();
    let id = m
        .add_silence(
            0,
            silence(vec![Matcher::equal("device", "d1")], 0, 10 * MIN),
        )
        .unwrap();
    assert_eq!(id.len(), 32);
    let ns = m.evaluate(MIN, "drift", vec![drift("d1", 0.3), drift("d2", 0.3)]);
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].labels["device"], "d2");
    let views = m.alerts(MIN);
    let v1 = view(&views, "FeatureDrift", "d1");
    assert_eq!(
        v1.state,
        AlertState::Firing,
        "silenced alerts keep their state"
    );
    assert!(v1.suppressed);
    assert_eq!(v1.silenced_by, vec![id.clone()]);
    assert_eq!(v1.last_notified_ms, None);
    assert!(!view(&views, "FeatureDrift", "d2").suppressed);
    // Still silenced just before the end.
    assert!(
        m.evaluate(
            10 * MIN - 1,
            "drift",
            vec![drift("d1", 0.3), drift("d2", 0.3)]
        )
        .is_empty()
    );
    // At ends_at the silence stops applying by itself: d1 is notified once, as firing, with
    // its original startsAt.
    let ns = m.evaluate(10 * MIN, "drift", vec![drift("d1", 0.3), drift("d2", 0.3)]);
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].kind, NotificationKind::Firing);
    assert_eq!(ns[0].labels["device"], "d1");
    assert_eq!(ns[0].starts_at_ms, MIN);
    assert!(m.alerts(10 * MIN).iter().all(|v| !v.suppressed));
    assert_eq!(m.silences(10 * MIN)[0].state, SilenceState::Expired);
    // A silenced alert that resolves without ever being notified sends nothing.
    let mut m = default_manager();
    m.add_silence(0, silence(vec![Matcher::equal("device", "d1")], 0, HOUR))
        .unwrap();
    assert!(m.evaluate(0, "drift", vec![drift("d1", 0.3)]).is_empty());
    assert!(m.evaluate(MIN, "drift", vec![]).is_empty());
}

#[test]
fn silence_suppresses_repeats_but_not_the_resolution_of_a_notified_alert() {
    let mut m = default_manager();
    assert_eq!(m.evaluate(0, "presence", vec![offline("d1")]).len(), 1);
    m.add_silence(
        MIN,
        silence(
            vec![Matcher::regex("alertname", "Device.*")],
            MIN,
            10 * HOUR,
        ),
    )
    .unwrap();
    assert!(
        m.evaluate(5 * HOUR, "presence", vec![offline("d1")])
            .is_empty()
    );
    let ns = m.evaluate(6 * HOUR, "presence", vec![]);
    assert_eq!(
        kinds(&ns),
        vec![(NotificationKind::Resolved, "DeviceOffline".into())]
    );
}

#[test]
fn silence_lifecycle_and_validation() {
    let mut m = default_manager();
    // Pending silence: listed as pending, does not apply yet.
    let id = m
        .add_silence(
            0,
            silence(vec![Matcher::equal("device", "d1")], HOUR, 2 * HOUR),
        )
        .unwrap();
    assert_eq!(m.silences(0)[0].state, SilenceState::Pending);
    assert_eq!(m.evaluate(0, "drift", vec![drift("d1", 0.3)]).len(), 1);
    assert!(m.alerts(0)[0].silenced_by.is_empty());
    assert_eq!(m.alerts(HOUR)[0].silenced_by, vec![id.clone()]);
    assert_eq!(m.silences(HOUR)[0].state, SilenceState::Active);
    // Update by id.
    let mut updated = m.silences(HOUR)[0].silence.clone();
    updated.comment = "longer".into();
    updated.ends_at_ms = 3 * HOUR;
    assert_eq!(m.add_silence(HOUR, updated).unwrap(), id);
    assert_eq!(m.silences(HOUR).len(), 1);
    assert_eq!(m.silences(HOUR)[0].silence.ends_at_ms, 3 * HOUR);
    // Expire: stops applying at once, listed as expired, then garbage-collected.
    m.expire_silence(HOUR + 1, &id).unwrap();
    assert_eq!(m.silences(HOUR + 1)[0].state, SilenceState::Expired);
    assert!(m.alerts(HOUR + 1)[0].silenced_by.is_empty());
    m.expire_silence(HOUR + 2, &id).unwrap();
    assert_eq!(
        m.expire_silence(0, "nope"),
        Err(SilenceError::NotFound("nope".into()))
    );
    m.tick(HOUR + 1 + 24 * HOUR);
    assert!(m.silences(HOUR + 1 + 24 * HOUR).is_empty());

    // Validation.
    let bad = |m: &mut AlertManager, s: Silence| m.add_silence(100, s).unwrap_err();
    assert!(matches!(
        bad(&mut m, silence(vec![], 0, HOUR)),
        SilenceError::Invalid(_)
    ));
    assert!(matches!(
        bad(&mut m, silence(vec![Matcher::regex("a", "(")], 0, HOUR)),
        SilenceError::Matcher(_)
    ));
    let e = bad(
        &mut m,
        silence(vec![Matcher::regex("device", ".*")], 0, HOUR),
    );
    assert!(e.to_string().contains("empty string"), "{e}");
    let e = bad(
        &mut m,
        silence(vec![Matcher::not_equal("device", "d1")], 0, HOUR),
    );
    assert!(e.to_string().contains("empty string"), "{e}");
    let e = bad(
        &mut m,
        silence(vec![Matcher::equal("device", "d1")], 0, 100),
    );
    assert!(e.to_string().contains("not in the future"), "{e}");
    let e = bad(
        &mut m,
        silence(vec![Matcher::equal("device", "d1")], 3 * HOUR, 2 * HOUR),
    );
    assert!(e.to_string().contains("not after"), "{e}");
    let mut s = silence(vec![Matcher::equal("device", "d1")], 0, HOUR);
    s.created_by = " ".into();
    assert!(bad(&mut m, s).to_string().contains("created_by"));
    let mut s = silence(vec![Matcher::equal("device", "d1")], 0, HOUR);
    s.id = "unknown".into();
    assert_eq!(bad(&mut m, s), SilenceError::NotFound("unknown".into()));
    // Limit.
    let mut m = manager(AlertsConfig {
        max_silences: 1,
        ..AlertsConfig::default()
    });
    m.add_silence(0, silence(vec![Matcher::equal("a", "b")], 0, HOUR))
        .unwrap();
    assert_eq!(
        m.add_silence(0, silence(vec![Matcher::equal("a", "c")], 0, HOUR)),
        Err(SilenceError::TooMany(1))
    );
    // Ids are unique even for identical silences at the same instant.
    let mut m = default_manager();
    let a = m
        .add_silence(0, silence(vec![Matcher::equal("a", "b")], 0, HOUR))
        .unwrap();
    let b = m
        .add_silence(0, silence(vec![Matcher::equal("a", "b")], 0, HOUR))
        .unwrap();
    assert_ne!(a, b);
    // A start in the past is moved to now.
    assert!(m.silences(0).iter().all(|s| s.silence.starts_at_ms == 0));
}

#[test]
fn device_offline_inhibits_drift_and_quality_of_the_same_device() {
    let mut m = default_manager();
    let quality = |d: &str| {
        Condition::new("LowConfidence", 0.2)
            .label("device", d)
            .label("kind", "quality")
    };
    let ns = m.evaluate(0, "presence", vec![offline("d1")]);
    assert_eq!(ns.len(), 1);
    let offline_fp = ns[0].fingerprint.clone();
    let ns = m.evaluate(
        MIN,
        "drift",
        vec![drift("d1", 0.3), drift("d2", 0.3), quality("d1")],
    );
    // Only d2's drift is notified.
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].labels["device"], "d2");
    let views = m.alerts(MIN);
    let d1 = view(&views, "FeatureDrift", "d1");
    assert_eq!(d1.state, AlertState::Firing);
    assert!(d1.suppressed);
    assert_eq!(d1.inhibited_by, vec![offline_fp.clone()]);
    assert_eq!(
        view(&views, "LowConfidence", "d1").inhibited_by,
        vec![offline_fp]
    );
    assert!(view(&views, "FeatureDrift", "d2").inhibited_by.is_empty());
    assert!(view(&views, "DeviceOffline", "d1").inhibited_by.is_empty());
    // The device comes back: the presence evaluation resolves DeviceOffline, and since every
    // evaluation is a tick for all alerts, the inhibited alerts (still firing) are notified in
    // the same batch, once.
    let mut ns = m.evaluate(2 * MIN, "presence", vec![]);
    ns.sort_by(|a, b| a.labels["alertname"].cmp(&b.labels["alertname"]));
    assert_eq!(
        kinds(&ns),
        vec![
            (NotificationKind::Resolved, "DeviceOffline".into()),
            (NotificationKind::Firing, "FeatureDrift".into()),
            (NotificationKind::Firing, "LowConfidence".into()),
        ]
    );
    assert!(ns.iter().all(|n| n.labels["device"] == "d1"));
    assert!(
        m.evaluate(
            3 * MIN,
            "drift",
            vec![drift("d1", 0.3), drift("d2", 0.3), quality("d1")]
        )
        .is_empty()
    );
}

#[test]
fn pending_source_does_not_inhibit_and_custom_rules_apply() {
    let mut m = manager(with_rule(
        "DeviceOffline",
        RuleOverride {
            for_ms: Some(10 * MIN as u64),
            ..RuleOverride::default()
        },
    ));
    m.evaluate(0, "presence", vec![offline("d1")]);
    assert_eq!(m.evaluate(0, "drift", vec![drift("d1", 0.3)]).len(), 1);

    // A custom rule with two-sided matches: two critical alerts do not inhibit each other,
    // a critical one inhibits a warning of the same cohort.
    let c = AlertsConfig {
        inhibit_rules: Some(vec![InhibitRule {
            source_matchers: vec![Matcher::equal("severity", "critical")],
            target_matchers: vec![Matcher::regex("severity", "warning|critical")],
            equal: vec!["cohort".into()],
        }]),
        ..AlertsConfig::default()
    };
    let mut m = manager(c);
    let cond = |name: &str, sev: &str, cohort: &str| {
        Condition::new(name, 1.0)
            .label("severity", sev)
            .label("cohort", cohort)
    };
    let ns = m.evaluate(
        0,
        "health",
        vec![
            cond("A", "critical", "eu"),
            cond("B", "critical", "eu"),
            cond("C", "warning", "eu"),
            cond("D", "warning", "us"),
        ],
    );
    let mut names: Vec<_> = ns.iter().map(|n| n.labels["alertname"].clone()).collect();
    names.sort();
    assert_eq!(names, vec!["A", "B", "D"]);
    let views = m.alerts(0);
    let c_view = views.iter().find(|v| v.labels["alertname"] == "C").unwrap();
    assert_eq!(c_view.inhibited_by.len(), 2);
    // Disabled inhibition: nothing inhibited.
    let mut m = manager(AlertsConfig {
        inhibit_rules: Some(vec![]),
        ..AlertsConfig::default()
    });
    m.evaluate(0, "presence", vec![offline("d1")]);
    assert_eq!(m.evaluate(0, "drift", vec![drift("d1", 0.3)]).len(), 1);
}

#[test]
fn snapshot_restore_round_trip() {
    let config = with_rule(
        "FeatureDrift",
        RuleOverride {
            for_ms: Some(5 * MIN as u64),
            ..RuleOverride::default()
        },
    );
    let mut m = manager(config.clone());
    m.evaluate(0, "presence", vec![offline("d1"), offline("d3")]);
    m.evaluate(0, "drift", vec![drift("d2", f64::NAN), drift("d4", 0.1)]);
    let sid = m
        .add_silence(0, silence(vec![Matcher::equal("device", "d3")], 0, HOUR))
        .unwrap();
    let request = RetrainRequest {
        model_id: "kws".into(),
        model_version: "1".into(),
        cohort: "eu".into(),
        reason: "psi".into(),
        window_start_ms: 0,
        payload: serde_json::json!({ "f": [1, 2] }),
    };
    assert!(matches!(
        m.retrain(0, request.clone()),
        RetrainDecision::Trigger(_)
    ));

    let json = serde_json::to_string(&m.snapshot()).unwrap();
    let snap: Snapshot = serde_json::from_str(&json).unwrap();
    let mut r = AlertManager::restore(config.clone(), snap).unwrap();

    let before = m.alerts(MIN);
    let after = r.alerts(MIN);
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.fingerprint, a.fingerprint);
        assert_eq!(b.state, a.state);
        assert_eq!(b.active_at_ms, a.active_at_ms);
        assert_eq!(b.starts_at_ms, a.starts_at_ms);
        assert_eq!(b.last_notified_ms, a.last_notified_ms);
        assert_eq!(b.silenced_by, a.silenced_by);
        assert_eq!(b.inhibited_by, a.inhibited_by);
        assert!(b.value == a.value || (b.value.is_nan() && a.value.is_nan()));
    }
    assert_eq!(r.silences(MIN), m.silences(MIN));
    assert_eq!(r.silences(MIN)[0].silence.id, sid);
    assert_eq!(r.stats(), m.stats());
    // The restored engine continues where the old one stopped: no duplicate notifications,
    // pending alerts fire on time, cool-downs still hold.
    assert!(
        r.evaluate(MIN, "presence", vec![offline("d1"), offline("d3")])
            .is_empty()
    );
    let ns = r.evaluate(5 * MIN, "drift", vec![drift("d2", 0.5), drift("d4", 0.1)]);
    // d2 is inhibited by nothing (no DeviceOffline for d2): both fire.
    assert_eq!(ns.len(), 2);
    assert!(matches!(
        r.retrain(MIN, request),
        RetrainDecision::Duplicate { .. }
    ));
    // A snapshot survives a second round trip unchanged.
    let again = serde_json::to_string(&r.snapshot()).unwrap();
    let snap2: Snapshot = serde_json::from_str(&again).unwrap();
    assert_eq!(
        serde_json::to_value(&snap2).unwrap(),
        serde_json::from_str::<serde_json::Value>(&again).unwrap()
    );

    // Unsupported version and an invalid silence are errors, not panics.
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["version"] = 99.into();
    let snap: Snapshot = serde_json::from_value(v).unwrap();
    assert!(matches!(
        AlertManager::restore(config.clone(), snap),
        Err(RestoreError::Version { found: 99 })
    ));
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["silences"][0]["matchers"][0] = serde_json::json!({ "name": "a", "value": "(", "op": "=~" });
    let snap: Snapshot = serde_json::from_value(v).unwrap();
    assert!(matches!(
        AlertManager::restore(config, snap),
        Err(RestoreError::Silence { .. })
    ));
}

#[test]
fn retrain_goes_through_the_cooldown_and_is_counted() {
    let mut m = manager(AlertsConfig {
        retrain: crate::config::TriggerPolicy {
            cooldown_ms: HOUR as u64,
        },
        ..AlertsConfig::default()
    });
    let req = |w: i64| RetrainRequest {
        model_id: "kws".into(),
        model_version: "1".into(),
        cohort: "eu".into(),
        reason: "psi".into(),
        window_start_ms: w,
        payload: serde_json::Value::Null,
    };
    let RetrainDecision::Trigger(t) = m.retrain(0, req(0)) else {
        panic!("first request must trigger");
    };
    assert_eq!(t.idempotency_key, req(0).idempotency_key());
    assert_eq!(
        m.retrain(MIN, req(MIN)),
        RetrainDecision::CoolingDown { until_ms: HOUR }
    );
    assert!(matches!(
        m.retrain(HOUR, req(HOUR)),
        RetrainDecision::Trigger(_)
    ));
    assert_eq!(m.stats().retrain_triggered, 2);
    assert_eq!(m.stats().retrain_suppressed, 1);
}
