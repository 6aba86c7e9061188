//! The monitoring service over real components: a SQLite store in a temporary directory, the
//! alert manager inside `Monitor`, and a `Deliverer` posting to an axum server on 127.0.0.1:0
//! that records every request. Time is driven explicitly through `Monitor::step(now_ms)`;
//! HTTP deliveries are awaited on a channel with a timeout, and their absence is checked after
//! `Deliverer::flush`, never by sleeping.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use serde_json::Value;
use tokio::sync::mpsc;

use tinyfleet_alerts::{
    AlertState, AlertView, AlertsConfig, Deliverer, DeliveryConfig, Matcher, Receiver,
    ReceiverKind, Silence, SilenceState,
};
use tinyfleet_drift::engine::{DeviceWindow, DriftConfig};
use tinyfleet_drift::sim::{self, Condition, Fleet};
use tinyfleet_monitor::{HealthRules, Monitor, MonitorConfig, MonitorError, MonitorSettings};
use tinyfleet_store::{Batch, DeviceState, Presence, Store, WindowWrite, cohort_key};

/// Window length.
const W: i64 = 60_000;
/// Start of the first window (a whole minute, 2023-11-14).
const T0: i64 = 1_700_000_040_000;
/// How long after a window's end the test steps the monitor (grace is 0).
const LATE: i64 = 1_000;
const WAIT: Duration = Duration::from_secs(10);
/// The feature the shifted devices move.
const SHIFTED: usize = 3;

fn start(k: i64) -> i64 {
    T0 + k * W
}

/// When window `k` is due (its end plus a little).
fn due(k: i64) -> i64 {
    start(k) + W + LATE
}

// ----- the recording HTTP receiver -----

#[derive(Debug, Clone)]
struct Received {
    path: String,
    idempotency_key: Option<String>,
    body: Value,
}

async fn record(
    State(tx): State<mpsc::UnboundedSender<Received>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let received = Received {
        path: uri.path().to_owned(),
        idempotency_key: headers
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let _ = tx.send(received);
    StatusCode::OK
}

/// Everything the receiver got so far, and the channel of what comes next.
struct Hook {
    rx: mpsc::UnboundedReceiver<Received>,
    seen: Vec<Received>,
}

impl Hook {
    async fn start() -> (SocketAddr, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = Router::new().fallback(record).with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (
            addr,
            Self {
                rx,
                seen: Vec::new(),
            },
        )
    }

    /// The first request (already received or arriving within [`WAIT`]) that `pred` accepts.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Received) -> bool) -> Received {
        if let Some(r) = self.seen.iter().find(|r| pred(r)) {
            return r.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(r)) => r,
                Ok(None) => panic!("receiver gone while waiting for {what}"),
                Err(_) => panic!(
                    "no {what} within {WAIT:?}; received: {:#?}",
                    self.seen
                        .iter()
                        .map(|r| (&r.path, &r.body))
                        .collect::<Vec<_>>()
                ),
            };
            self.seen.push(r.clone());
            if pred(&r) {
                return r;
            }
        }
    }

    /// Takes in what has arrived (call after `Deliverer::flush`).
    fn drain(&mut self) -> &[Received] {
        while let Ok(r) = self.rx.try_recv() {
            self.seen.push(r);
        }
        &self.seen
    }
}

/// The webhook alerts (`alerts[]` of every Alertmanager message) among `received`.
fn webhook_alerts(received: &[Received]) -> Vec<&Value> {
    received
        .iter()
        .filter(|r| r.path == "/am")
        .flat_map(|r| r.body["alerts"].as_array().into_iter().flatten())
        .collect()
}

/// Whether a webhook request holds an alert with this status and these label values.
fn has_alert(r: &Received, status: &str, labels: &[(&str, &str)]) -> bool {
    r.path == "/am"
        && r.body["alerts"].as_array().is_some_and(|alerts| {
            alerts
                .iter()
                .any(|a| a["status"] == status && labels.iter().all(|(k, v)| a["labels"][*k] == *v))
        })
}

// ----- the service under test -----

fn alerts_config(addr: SocketAddr) -> AlertsConfig {
    AlertsConfig {
        receivers: vec![
            Receiver {
                name: "am".into(),
                kind: ReceiverKind::AlertmanagerWebhook {
                    url: format!("http://{addr}/am"),
                    max_alerts: 0,
                },
                bearer_token: None,
            },
            Receiver {
                name: "retrain".into(),
                kind: ReceiverKind::RetrainWebhook {
                    url: format!("http://{addr}/retrain"),
                },
                bearer_token: None,
            },
        ],
        default_receivers: vec!["am".into()],
        delivery: DeliveryConfig {
            queue_capacity: 100,
            max_attempts: 3,
            backoff_min_ms: 5,
            backoff_max_ms: 20,
            request_timeout_ms: 5_000,
        },
        ..AlertsConfig::default()
    }
}

struct Env {
    dir: tempfile::TempDir,
    store: Store,
    config: MonitorConfig,
    deliverer: Deliverer,
    hook: Hook,
}

impl Env {
    async fn start(persistence: u32) -> Self {
        let (addr, hook) = Hook::start().await;
        let alerts = alerts_config(addr);
        let (deliverer, _workers) = Deliverer::spawn(&alerts).unwrap();
        let config = MonitorConfig {
            window_ms: W,
            min_grace_ms: 0,
            settings: MonitorSettings {
                grace_secs: 0,
                ..MonitorSettings::default()
            },
            health: HealthRules::default(),
            drift: DriftConfig {
                persistence,
                ..DriftConfig::default()
            },
            alerts,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        Self {
            dir,
            store,
            config,
            deliverer,
            hook,
        }
    }

    fn open_monitor(&self) -> Monitor {
        Monitor::open(
            self.store.clone(),
            self.config.clone(),
            self.deliverer.clone(),
            None,
            None,
        )
        .unwrap()
    }

    /// Registers the fleet's devices with their `site` tag.
    fn provision(&self, fleet: &Fleet) {
        for d in &fleet.devices {
            self.store
                .registry()
                .provision(&d.id, [("site".to_owned(), d.site.clone())].into())
                .unwrap();
        }
    }

    /// Commits the windows as ingest would (one device window each, with its cohort).
    fn commit(&self, start_ms: i64, windows: &[DeviceWindow]) {
        let device_windows = windows
            .iter()
            .map(|w| WindowWrite {
                key: w.device.clone(),
                start_ms,
                cohort: Some(cohort_key(&w.model_id, &w.model_version, &w.hw)),
                json: serde_json::to_string(&w.agg).unwrap(),
            })
            .collect();
        self.store
            .commit(&Batch {
                device_windows,
                ..Batch::default()
            })
            .unwrap();
    }

    async fn flush(&self) {
        assert!(
            self.deliverer.flush(WAIT).await,
            "deliveries did not finish"
        );
    }
}

fn put_sim_profile(monitor: &Monitor) {
    monitor
        .put_profile("sim", "1", &sim::profile(40_000, 7), "test", T0)
        .unwrap();
}

fn named<'a>(alerts: &'a [AlertView], name: &str) -> Vec<&'a AlertView> {
    alerts
        .iter()
        .filter(|a| a.labels["alertname"] == name)
        .collect()
}

fn label<'a>(a: &'a AlertView, name: &str) -> &'a str {
    a.labels.get(name).map_or("", String::as_str)
}

fn shift_site(fleet: &mut Fleet, site: &str, by: f64) {
    for d in fleet.devices.iter_mut().filter(|d| d.site == site) {
        d.condition = Condition::shifted(SHIFTED, by);
    }
}

fn feature_name() -> String {
    format!("f{SHIFTED}")
}

/// A FeatureDrift on site s1's feature: what the shifted site must produce.
fn is_site_drift(a: &AlertView) -> bool {
    a.labels["alertname"] == "FeatureDrift"
        && label(a, "scope").contains("site=s1")
        && label(a, "feature") == feature_name()
}

// ----- tests -----

/// 40 devices over four sites; from window 2 on, site s1's devices see feature 3 shifted by one
/// standard deviation. With persistence 2 the finding comes at window 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_drift_end_to_end_through_the_store() {
    let mut env = Env::start(2).await;
    let monitor = env.open_monitor();
    put_sim_profile(&monitor);
    let mut fleet = Fleet::new(40, 4, 11);
    env.provision(&fleet);

    let mut triggers = Vec::new();
    for k in 0..5 {
        if k == 2 {
            shift_site(&mut fleet, "s1", 1.0);
        }
        let (windows, _) = fleet.windows(200, 0.0);
        env.commit(start(k), &windows);
        let report = monitor.step(due(k)).unwrap();
        assert_eq!(report.windows, 1, "window {k}");
        triggers.push(report.retrain_triggers);
        let alerts = monitor.alerts(due(k));
        if k < 3 {
            assert!(
                alerts.is_empty(),
                "no alert before the shift is persistent (window {k}): {alerts:#?}"
            );
            assert_eq!(report.notifications, 0, "window {k}");
        }
        if k == 3 {
            assert!(report.notifications >= 1);
        }
    }
    assert_eq!(triggers[..3], [0, 0, 0], "no retraining before the finding");
    assert!(
        triggers[3] >= 1,
        "the finding triggers retraining: {triggers:?}"
    );
    assert_eq!(triggers[4], 0, "the cool-down holds the next request back");

    // The alert: firing, on site s1's cohort and the shifted feature, nothing on other sites.
    let now = due(4);
    let alerts = monitor.alerts(now);
    let drift: Vec<_> = alerts.iter().filter(|a| is_site_drift(a)).collect();
    assert_eq!(drift.len(), 1, "{alerts:#?}");
    let a = drift[0];
    assert_eq!(a.state, AlertState::Firing);
    assert_eq!(a.labels["kind"], "drift");
    assert_eq!(a.labels["model"], "sim");
    assert_eq!(a.labels["model_version"], "1");
    assert_eq!(a.labels["scope"], "sim@1/site=s1");
    assert_eq!(a.source, "drift");
    assert!(!a.suppressed);
    assert_eq!(a.starts_at_ms, Some(due(3)));
    assert!(a.value >= DriftConfig::default().psi_floor, "{}", a.value);
    for other in ["s0", "s2", "s3"] {
        assert!(
            !alerts
                .iter()
                .any(|a| label(a, "scope").contains(&format!("site={other}"))),
            "site {other} did not move: {alerts:#?}"
        );
    }
    assert!(
        named(&alerts, "DeviceFeatureDrift").is_empty(),
        "a site-wide shift is not reported per device: {alerts:#?}"
    );
    assert_eq!(monitor.active_findings().len(), drift.len());

    // The Alertmanager v4 webhook.
    let msg = env
        .hook
        .wait_for("the FeatureDrift webhook", |r| {
            has_alert(
                r,
                "firing",
                &[
                    ("alertname", "FeatureDrift"),
                    ("scope", "sim@1/site=s1"),
                    ("feature", feature_name().as_str()),
                ],
            )
        })
        .await;
    assert_eq!(msg.body["version"], "4");
    assert_eq!(msg.body["receiver"], "am");
    assert_eq!(msg.body["status"], "firing");
    assert!(msg.idempotency_key.is_none());
    let alert = webhook_alerts(std::slice::from_ref(&msg))
        .into_iter()
        .find(|a| a["labels"]["alertname"] == "FeatureDrift")
        .unwrap();
    assert_eq!(alert["fingerprint"], a.fingerprint.as_str());
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains(&feature_name())
    );

    // The retraining trigger.
    let req = env
        .hook
        .wait_for("the retraining request", |r| r.path == "/retrain")
        .await;
    let body = &req.body;
    let key = req
        .idempotency_key
        .as_deref()
        .expect("Idempotency-Key header");
    assert!(!key.is_empty());
    assert_eq!(body["idempotency_key"], key);
    assert_eq!(body["event"], "tinyfleet.retrain");
    assert_eq!(body["model"]["id"], "sim");
    assert_eq!(body["model"]["version"], "1");
    assert_eq!(body["cohort"], "sim@1/site=s1");
    assert_eq!(body["window_start_ms"], start(3));
    assert!(body["reason"].as_str().unwrap().contains("FeatureDrift"));
    let payload = &body["payload"];
    assert_eq!(payload["findings"][0]["feature"], feature_name().as_str());
    let features = payload["features"].as_array().unwrap();
    assert_eq!(features.len(), sim::FEATURES);
    for f in features {
        assert!(
            f["importance_weights"]
                .as_array()
                .is_some_and(|w| !w.is_empty()),
            "{f}"
        );
    }
    let shifted = &features[SHIFTED];
    assert_eq!(shifted["name"], feature_name().as_str());
    // Cells: underflow, bins..., overflow, NaN. The shift moved mass from low to high bins.
    let weights: Vec<f64> = shifted["importance_weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap_or(f64::NAN))
        .collect();
    assert_eq!(weights.len(), sim::BINS + 3, "{weights:?}");
    assert!(
        weights[1] < 0.5,
        "lowest bin under-represented: {weights:?}"
    );
    assert!(
        weights[sim::BINS] > 1.5,
        "highest bin over-represented: {weights:?}"
    );
    let unshifted: Vec<f64> = features[0]["importance_weights"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .take(sim::BINS)
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert!(
        unshifted.iter().all(|w| (0.5..1.5).contains(w)),
        "{unshifted:?}"
    );

    // Exactly one retraining request was sent, exactly one firing notification for the alert.
    env.flush().await;
    let received = env.hook.drain();
    assert_eq!(
        received.iter().filter(|r| r.path == "/retrain").count(),
        1,
        "{received:#?}"
    );
    let firing = webhook_alerts(received)
        .into_iter()
        .filter(|w| w["status"] == "firing" && w["fingerprint"] == a.fingerprint.as_str())
        .count();
    assert_eq!(firing, 1);

    // The evaluation records, newest first; findings only once the shift persisted.
    let evals = monitor.evaluations(T0, 10).unwrap();
    let starts: Vec<i64> = evals
        .iter()
        .map(|e| e["window_start_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(starts, [start(4), start(3), start(2), start(1), start(0)]);
    for e in &evals {
        let k = (e["window_start_ms"].as_i64().unwrap() - T0) / W;
        let findings = e["findings"].as_array().unwrap();
        assert_eq!(e["window_ms"], W);
        assert_eq!(e["stats"]["devices"], 40);
        assert!(!e["scores"].as_array().unwrap().is_empty());
        if k < 3 {
            assert!(findings.is_empty(), "window {k}: {findings:#?}");
        } else {
            assert!(
                findings.iter().any(|f| f["scope"]["key"] == "site=s1"
                    && f["kind"]["type"] == "feature_drift"
                    && f["kind"]["feature"] == feature_name().as_str()),
                "window {k}: {findings:#?}"
            );
        }
    }
    let metrics = monitor.render_prometheus(now);
    assert!(
        metrics.contains("\ntinyfleet_drift_evaluations_total 5\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ntinyfleet_retrain_triggers_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ntinyfleet_drift_unreadable_windows_total 0\n"),
        "{metrics}"
    );
}

/// A restart between two shifted windows: nothing is evaluated twice, the engine's streaks,
/// the alerts and a silence come back, and the finding needs the restored streak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_repeating_windows() {
    let mut env = Env::start(2).await;
    let monitor = env.open_monitor();
    put_sim_profile(&monitor);
    let mut fleet = Fleet::new(40, 4, 23);
    env.provision(&fleet);
    let low = fleet.devices[0].id.clone();

    // Window 0 clean; window 1 shifted (streak 1 of 2) with one device on a low battery.
    let (windows, _) = fleet.windows(200, 0.0);
    env.commit(start(0), &windows);
    assert_eq!(monitor.step(due(0)).unwrap().windows, 1);
    shift_site(&mut fleet, "s1", 1.0);
    let (mut windows, _) = fleet.windows(200, 0.0);
    windows[0].agg.health.battery_min_mv = Some(3_100);
    env.commit(start(1), &windows);
    assert_eq!(monitor.step(due(1)).unwrap().windows, 1);

    let before = monitor.alerts(due(1));
    let battery: Vec<_> = named(&before, "LowBattery");
    assert_eq!(battery.len(), 1, "{before:#?}");
    assert_eq!(battery[0].state, AlertState::Firing);
    assert_eq!(label(battery[0], "device"), low);
    assert!(
        named(&before, "FeatureDrift").is_empty(),
        "one significant window is not enough: {before:#?}"
    );
    env.hook
        .wait_for("the LowBattery webhook", |r| {
            has_alert(r, "firing", &[("alertname", "LowBattery")])
        })
        .await;
    let silence = monitor
        .add_silence(
            due(1),
            Silence {
                id: String::new(),
                matchers: vec![Matcher::equal("alertname", "FeatureDrift")],
                starts_at_ms: due(1),
                ends_at_ms: due(1) + 3_600_000,
                created_by: "test".into(),
                comment: "site s1 maintenance".into(),
            },
        )
        .unwrap();

    // Restart: a new process opens the same database.
    drop(monitor);
    env.store = Store::open(env.dir.path()).unwrap();
    let monitor = env.open_monitor();

    let after = monitor.alerts(due(1));
    assert_eq!(after, before, "alerts are restored as they were");
    let silences = monitor.silences(due(1));
    assert_eq!(silences.len(), 1);
    assert_eq!(silences[0].silence.id, silence);
    assert_eq!(silences[0].state, SilenceState::Active);

    // Stepping at the same time again evaluates nothing.
    let report = monitor.step(due(1)).unwrap();
    assert_eq!(report.windows, 0);
    assert_eq!(report.notifications, 0);

    // Window 2, still shifted: only it is evaluated, and the restored streak reaches 2.
    let (windows, _) = fleet.windows(200, 0.0);
    env.commit(start(2), &windows);
    let report = monitor.step(due(2)).unwrap();
    assert_eq!(report.windows, 1, "only the new window");
    assert_eq!(
        report.retrain_triggers, 1,
        "a silence does not stop retraining"
    );
    let alerts = monitor.alerts(due(2));
    let drift: Vec<_> = alerts.iter().filter(|a| is_site_drift(a)).collect();
    assert_eq!(
        drift.len(),
        1,
        "the finding continues the streak of before the restart: {alerts:#?}"
    );
    assert_eq!(drift[0].state, AlertState::Firing);
    assert!(drift[0].suppressed);
    assert_eq!(drift[0].silenced_by, std::slice::from_ref(&silence));
    // The battery recovered in window 2: resolved, and the resolution is sent because the
    // firing was notified before the restart.
    let battery = named(&alerts, "LowBattery");
    assert_eq!(battery.len(), 1);
    assert_eq!(battery[0].state, AlertState::Resolved);

    env.hook
        .wait_for("the LowBattery resolution", |r| {
            has_alert(r, "resolved", &[("alertname", "LowBattery")])
        })
        .await;
    env.hook
        .wait_for("the retraining request", |r| r.path == "/retrain")
        .await;
    env.flush().await;
    let received = env.hook.drain();
    assert!(
        !webhook_alerts(received)
            .iter()
            .any(|a| a["labels"]["alertname"] == "FeatureDrift"),
        "the silenced alert is not notified: {received:#?}"
    );

    let starts: Vec<i64> = monitor
        .evaluations(T0, 10)
        .unwrap()
        .iter()
        .map(|e| e["window_start_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(starts, [start(2), start(1), start(0)]);
    let metrics = monitor.render_prometheus(due(2));
    assert!(
        metrics.contains("\ntinyfleet_drift_evaluations_total 1\n"),
        "counted since the restart: {metrics}"
    );
}

/// An offline device's DeviceOffline fires before its drift is judged and inhibits its
/// device-level drift alert; another drifted device that is online is alerted normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_inhibits_its_drift_alert() {
    let mut env = Env::start(1).await;
    let monitor = env.open_monitor();
    put_sim_profile(&monitor);
    let mut fleet = Fleet::new(20, 2, 5);
    env.provision(&fleet);
    fleet.devices[0].condition = Condition::shifted(SHIFTED, 2.5);
    fleet.devices[1].condition = Condition::shifted(SHIFTED, 2.5);
    let offline = fleet.devices[0].id.clone();
    let online = fleet.devices[1].id.clone();

    // The device sent its window, then its connection died (the broker published the will).
    let last_seen = start(0) + 30_000;
    let (windows, _) = fleet.windows(400, 0.0);
    env.commit(start(0), &windows);
    env.store
        .commit(&Batch {
            states: vec![DeviceState {
                id: offline.clone(),
                presence: Presence {
                    online: false,
                    offline_reason: Some("will".into()),
                    ..Presence::default()
                },
                last_seen_ms: Some(last_seen),
                updated_ms: last_seen,
                ..DeviceState::default()
            }],
            ..Batch::default()
        })
        .unwrap();

    let now = due(0);
    let report = monitor.step(now).unwrap();
    assert_eq!(report.windows, 1);
    let alerts = monitor.alerts(now);

    let off = named(&alerts, "DeviceOffline");
    assert_eq!(off.len(), 1, "{alerts:#?}");
    let off = off[0];
    assert_eq!(label(off, "device"), offline);
    assert_eq!(label(off, "kind"), "presence");
    assert_eq!(off.state, AlertState::Firing);
    assert_eq!(off.source, "presence");
    assert_eq!(off.value, (now - last_seen) as f64 / 1000.0);
    assert!(off.annotations["summary"].contains("will"));

    let drift = named(&alerts, "DeviceFeatureDrift");
    let of = |device: &str| {
        drift
            .iter()
            .copied()
            .find(|a| label(a, "device") == device)
            .unwrap_or_else(|| panic!("no DeviceFeatureDrift for {device}: {alerts:#?}"))
    };
    let inhibited = of(&offline);
    assert_eq!(label(inhibited, "feature"), feature_name());
    assert_eq!(inhibited.state, AlertState::Firing);
    assert!(inhibited.suppressed);
    assert_eq!(
        inhibited.inhibited_by,
        std::slice::from_ref(&off.fingerprint)
    );
    assert!(inhibited.silenced_by.is_empty());
    assert!(inhibited.last_notified_ms.is_none());
    let normal = of(&online);
    assert_eq!(normal.state, AlertState::Firing);
    assert!(!normal.suppressed);
    assert!(normal.inhibited_by.is_empty());
    assert!(
        drift.len() == 2,
        "only the two shifted devices drift: {alerts:#?}"
    );
    assert!(
        named(&alerts, "FeatureDrift").is_empty(),
        "two devices are local drift, not a cohort's: {alerts:#?}"
    );

    env.hook
        .wait_for("the DeviceOffline webhook", |r| {
            has_alert(
                r,
                "firing",
                &[("alertname", "DeviceOffline"), ("device", offline.as_str())],
            )
        })
        .await;
    env.hook
        .wait_for("the online device's drift webhook", |r| {
            has_alert(
                r,
                "firing",
                &[
                    ("alertname", "DeviceFeatureDrift"),
                    ("device", online.as_str()),
                ],
            )
        })
        .await;
    env.flush().await;
    let received = env.hook.drain();
    assert!(
        !webhook_alerts(received)
            .iter()
            .any(|a| a["labels"]["alertname"] == "DeviceFeatureDrift"
                && a["labels"]["device"] == offline.as_str()),
        "the inhibited alert is not notified: {received:#?}"
    );
    assert!(
        !received.iter().any(|r| r.path == "/retrain"),
        "device drift asks for an engineer, not retraining"
    );
}

/// A window whose lowest battery reading is under 3300 mV raises LowBattery for its device,
/// whether or not the device has announced its model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_battery_window_raises_low_battery() {
    let mut env = Env::start(2).await;
    let monitor = env.open_monitor();
    put_sim_profile(&monitor);
    let mut fleet = Fleet::new(3, 1, 9);
    env.provision(&fleet);
    let (mut windows, _) = fleet.windows(100, 0.0);
    windows[0].agg.health.battery_min_mv = Some(3_150);
    windows[1].agg.health.battery_min_mv = Some(3_700);
    windows[2].agg.health.battery_min_mv = Some(3_000);
    let ids: Vec<String> = windows.iter().map(|w| w.device.clone()).collect();
    env.commit(start(0), &windows[..2]);
    // The third device has not said hello yet: its window has no cohort.
    env.store
        .commit(&Batch {
            device_windows: vec![WindowWrite {
                key: ids[2].clone(),
                start_ms: start(0),
                cohort: None,
                json: serde_json::to_string(&windows[2].agg).unwrap(),
            }],
            ..Batch::default()
        })
        .unwrap();

    let now = due(0);
    let report = monitor.step(now).unwrap();
    assert_eq!(report.windows, 1);
    let alerts = monitor.alerts(now);
    let low = named(&alerts, "LowBattery");
    assert_eq!(low.len(), 2, "{alerts:#?}");
    let of = |device: &str| low.iter().copied().find(|a| label(a, "device") == device);
    let a = of(&ids[0]).expect("LowBattery for the first device");
    assert_eq!(a.state, AlertState::Firing);
    assert_eq!(a.value, 3_150.0);
    assert_eq!(label(a, "kind"), "health");
    assert_eq!(label(a, "cohort"), cohort_key("sim", "1", &windows[0].hw));
    assert_eq!(label(a, "severity"), "warning");
    assert_eq!(a.source, "health");
    assert!(of(&ids[1]).is_none(), "3700 mV is fine");
    let unassigned = of(&ids[2]).expect("LowBattery for the device without a model");
    assert_eq!(unassigned.state, AlertState::Firing);
    assert_eq!(label(unassigned, "cohort"), "", "no cohort label");

    env.hook
        .wait_for("the LowBattery webhook", |r| {
            has_alert(
                r,
                "firing",
                &[("alertname", "LowBattery"), ("device", ids[0].as_str())],
            )
        })
        .await;

    // The next window is fine: the alert resolves.
    let (mut windows, _) = fleet.windows(100, 0.0);
    for w in &mut windows {
        w.agg.health.battery_min_mv = Some(3_800);
    }
    env.commit(start(1), &windows);
    monitor.step(due(1)).unwrap();
    let alerts = monitor.alerts(due(1));
    assert!(
        named(&alerts, "LowBattery")
            .iter()
            .all(|a| a.state == AlertState::Resolved),
        "{alerts:#?}"
    );
    env.hook
        .wait_for("the LowBattery resolution", |r| {
            has_alert(
                r,
                "resolved",
                &[("alertname", "LowBattery"), ("device", ids[0].as_str())],
            )
        })
        .await;
}

/// An unreadable stored window is skipped and counted while the rest of the window is
/// evaluated; a profile whose model differs from the one it is uploaded for is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_windows_are_skipped_and_bad_profiles_refused() {
    let env = Env::start(2).await;
    let monitor = env.open_monitor();

    let profile = sim::profile(5_000, 3);
    for (model, version) in [("kws", "1"), ("sim", "2")] {
        match monitor.put_profile(model, version, &profile, "test", T0) {
            Err(MonitorError::Profile(why)) => {
                assert!(why.contains("sim@1"), "{why}");
                assert!(why.contains(&format!("{model}@{version}")), "{why}");
            }
            other => panic!("profile for {model}@{version} accepted: {other:?}"),
        }
        assert_eq!(env.store.profile(model, version).unwrap(), None);
    }
    let mut invalid = profile.clone();
    invalid.features[1].name = "f0".into();
    assert!(matches!(
        monitor.put_profile("sim", "1", &invalid, "test", T0),
        Err(MonitorError::Profile(_))
    ));
    assert!(env.store.profile_list().unwrap().is_empty());
    monitor
        .put_profile("sim", "1", &profile, "test", T0)
        .unwrap();
    assert_eq!(env.store.profile_list().unwrap()[0].updated_by, "test");

    let mut fleet = Fleet::new(4, 1, 17);
    env.provision(&fleet);
    let (mut windows, _) = fleet.windows(100, 0.0);
    windows[1].agg.health.battery_min_mv = Some(3_000);
    env.commit(start(0), &windows);
    // Device 0's stored aggregate is not a WindowAgg.
    env.store
        .commit(&Batch {
            device_windows: vec![WindowWrite {
                key: windows[0].device.clone(),
                start_ms: start(0),
                cohort: Some(cohort_key("sim", "1", &windows[0].hw)),
                json: r#"{"summaries":"many"}"#.into(),
            }],
            ..Batch::default()
        })
        .unwrap();

    let now = due(0);
    let report = monitor.step(now).unwrap();
    assert_eq!(report.windows, 1);
    let metrics = monitor.render_prometheus(now);
    assert!(
        metrics.contains("\ntinyfleet_drift_unreadable_windows_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ntinyfleet_drift_evaluations_total 1\n"),
        "{metrics}"
    );
    let evals = monitor.evaluations(T0, 10).unwrap();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0]["stats"]["devices"], 3, "the other three evaluated");
    assert_eq!(evals[0]["stats"]["without_profile"], 0);
    let alerts = monitor.alerts(now);
    let low = named(&alerts, "LowBattery");
    assert_eq!(low.len(), 1, "{alerts:#?}");
    assert_eq!(label(low[0], "device"), windows[1].device);
    assert!(
        !alerts
            .iter()
            .any(|a| label(a, "device") == windows[0].device),
        "{alerts:#?}"
    );
}

/// When a store write fails after a window was evaluated, the notifications the alert manager
/// already marked as sent are still delivered (the window is not evaluated again: the engine's
/// pools already hold it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_survive_a_failed_store_write() {
    let mut env = Env::start(2).await;
    let monitor = env.open_monitor();
    let mut fleet = Fleet::new(2, 1, 31);
    env.provision(&fleet);
    let (mut windows, _) = fleet.windows(100, 0.0);
    windows[0].agg.health.battery_min_mv = Some(3_000);
    env.commit(start(0), &windows);

    // The evaluation record cannot be written (as on a full disk).
    let db = rusqlite::Connection::open(env.store.path()).unwrap();
    db.execute_batch(
        "CREATE TRIGGER fail BEFORE INSERT ON drift_evaluations \
         BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    )
    .unwrap();
    assert!(matches!(monitor.step(due(0)), Err(MonitorError::Store(_))));
    db.execute_batch("DROP TRIGGER fail;").unwrap();

    // The next tick: the window is either evaluated again or its LowBattery was delivered.
    let report = monitor.step(due(0) + 5_000).unwrap();
    env.flush().await;
    let delivered = env
        .hook
        .drain()
        .iter()
        .any(|r| has_alert(r, "firing", &[("alertname", "LowBattery")]));
    assert!(
        delivered || report.windows == 1,
        "LowBattery is {:?} but was never delivered; windows re-evaluated: {}",
        named(&monitor.alerts(due(0) + 5_000), "LowBattery")
            .iter()
            .map(|a| (a.state, a.last_notified_ms))
            .collect::<Vec<_>>(),
        report.windows
    );
}
