//! The monitoring service: once an ingest window has closed (plus a grace period for late
//! summaries), it reads every device's window from the store, runs the drift engine, derives
//! health conditions, and feeds both, with presence, into the alert manager; it records the
//! evaluation, writes drift scores to the time-series sink, sends retraining triggers and
//! publishes alert events on MQTT.
//!
//! ```text
//! store (device windows, presence, profiles) --> Monitor::step --> AlertManager --> Deliverer
//!                                                   |   \--> retraining triggers ---/
//!                                                   |--> drift_evaluations, snapshots (store)
//!                                                   \--> tf_drift points, MQTT alert events
//! ```
//!
//! Invariants:
//! - Each window is evaluated once, in order; the engine's state and the cursor past that
//!   window are saved in one transaction, so a restart neither skips nor repeats a window.
//! - Presence is evaluated before drift in every step, so once an offline device's
//!   `DeviceOffline` fires (after its rule's `for_ms`), it inhibits that device's drift alerts
//!   from the same step on.
//! - What the alert manager has decided is delivered even when a store write fails.
//! - The monitor reads ingest's results through the store only; it never touches ingest.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod conditions;
pub mod config;
pub mod failures;
pub mod retrain;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::json;
use tinyfleet_alerts::{
    AlertManager, AlertView, Deliverer, Notification, RetrainDecision, RetrainTrigger, Silence,
    SilenceError, SilenceView, Snapshot,
};
use tinyfleet_drift::engine::{DeviceWindow, Engine, Finding, Score};
use tinyfleet_drift::profile::MonitoringProfile;
use tinyfleet_ingest::aggregate::WindowAgg;
use tinyfleet_sink_influx::{InfluxSink, Point};
use tinyfleet_store::{Store, StoreError, parse_cohort_key};

pub use config::{HealthRules, MonitorConfig, MonitorSettings};

use conditions::{ActiveFindings, HealthInput};

const ENGINE_STATE: &str = "drift.engine";
const CURSOR_STATE: &str = "drift.cursor";
const ACTIVE_STATE: &str = "drift.active";
const ALERTS_STATE: &str = "alerts";
/// Scores kept per evaluation record (cohort scores come first; the rest are counted).
const MAX_RECORDED_SCORES: usize = 5_000;

/// Publishes one MQTT message (topic, payload); must not block.
pub type Publish = Arc<dyn Fn(String, Vec<u8>) + Send + Sync>;

/// Why a monitor call failed.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Silence(#[from] SilenceError),
    /// A profile upload that cannot be used.
    #[error("invalid profile: {0}")]
    Profile(String),
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Windows evaluated.
    pub windows: usize,
    pub notifications: usize,
    pub retrain_triggers: usize,
}

#[derive(Debug, Default)]
struct Stats {
    evaluations: AtomicU64,
    last_window_start_ms: AtomicU64,
    last_duration_us: AtomicU64,
    bad_windows: AtomicU64,
    mqtt_events: AtomicU64,
}

struct State {
    engine: Engine,
    /// Start of the next window to evaluate; `None` until the first window with data.
    cursor: Option<i64>,
    active: ActiveFindings,
    alerts: AlertManager,
}

/// What one step hands to delivery.
#[derive(Default)]
struct Outbox {
    notes: Vec<Notification>,
    triggers: Vec<RetrainTrigger>,
}

struct Shared {
    store: Store,
    config: MonitorConfig,
    state: Mutex<State>,
    /// Held while a snapshot is taken and written (see `Monitor::save_alerts`).
    save_lock: Mutex<()>,
    deliverer: Deliverer,
    influx: Option<InfluxSink>,
    publish: Option<Publish>,
    stats: Stats,
    window_observer: std::sync::OnceLock<WindowObserver>,
}

/// Told every evaluated window, once, in order: its start, every device window with the
/// device's model, and the monitoring profiles by `(model id, version)`. The rollout engine's
/// canary-vs-control comparison reads its quality observations from here. Runs on the
/// monitor's thread: must not block for long.
pub type WindowObserver =
    Arc<dyn Fn(i64, &[DeviceWindow], &HashMap<(String, String), MonitoringProfile>) + Send + Sync>;

/// The monitoring service; cheap to clone (the API holds one to list alerts and silences).
#[derive(Clone)]
pub struct Monitor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("window_ms", &self.shared.config.window_ms)
            .finish_non_exhaustive()
    }
}

fn restore<T: serde::de::DeserializeOwned>(
    store: &Store,
    name: &str,
) -> Result<Option<T>, StoreError> {
    let Some(text) = store.service_state(name)? else {
        return Ok(None);
    };
    match serde_json::from_str(&text) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            tracing::warn!(state = name, error = %e, "saved state unreadable; starting it afresh");
            Ok(None)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Monitor {
    /// Restores the saved state (engine, cursor, findings, alerts and silences) from `store`.
    pub fn open(
        store: Store,
        config: MonitorConfig,
        deliverer: Deliverer,
        influx: Option<InfluxSink>,
        publish: Option<Publish>,
    ) -> Result<Self, String> {
        config.validate()?;
        let alerts = match restore::<Snapshot>(&store, ALERTS_STATE).map_err(|e| e.to_string())? {
            Some(snapshot) => match AlertManager::restore(config.alerts.clone(), snapshot) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "saved alerts unusable; starting without them");
                    AlertManager::new(config.alerts.clone()).map_err(|e| e.to_string())?
                }
            },
            None => AlertManager::new(config.alerts.clone()).map_err(|e| e.to_string())?,
        };
        let engine = restore::<Engine>(&store, ENGINE_STATE)
            .map_err(|e| e.to_string())?
            .map_or_else(
                || Engine::new(config.drift.clone()),
                |e| e.with_config(config.drift.clone()),
            );
        let cursor = restore::<i64>(&store, CURSOR_STATE).map_err(|e| e.to_string())?;
        let active = restore::<ActiveFindings>(&store, ACTIVE_STATE)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                config,
                save_lock: Mutex::new(()),
                state: Mutex::new(State {
                    engine,
                    cursor,
                    active,
                    alerts,
                }),
                deliverer,
                influx,
                publish,
                stats: Stats::default(),
                window_observer: std::sync::OnceLock::new(),
            }),
        })
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.shared.config
    }

    /// Sets the [`WindowObserver`] (once; later calls are ignored).
    pub fn observe_windows(&self, observer: WindowObserver) {
        let _ = self.shared.window_observer.set(observer);
    }

    fn grace_ms(&self) -> i64 {
        let c = &self.shared.config;
        (c.settings.grace_secs as i64 * 1000).max(c.min_grace_ms)
    }

    /// Presence, then every window that has closed (plus grace) by `now_ms`, then alert
    /// timers; delivers what comes out. Synchronous (store and CPU): run it off the runtime.
    ///
    /// What the alert manager decided is delivered even when a store write fails half-way (the
    /// alert manager has already recorded those notifications as sent).
    pub fn step(&self, now_ms: i64) -> Result<StepReport, MonitorError> {
        let mut out = Outbox::default();
        let mut report = StepReport::default();
        let result = self.step_into(now_ms, &mut out, &mut report);
        report.notifications = out.notes.len();
        report.retrain_triggers = out.triggers.len();
        self.deliver(&out);
        result.map(|()| report)
    }

    fn step_into(
        &self,
        now_ms: i64,
        out: &mut Outbox,
        report: &mut StepReport,
    ) -> Result<(), MonitorError> {
        let s = &*self.shared;
        let offline = s.store.offline_devices()?;
        out.notes.extend(lock(&s.state).alerts.evaluate(
            now_ms,
            "presence",
            conditions::presence(&offline, now_ms),
        ));
        // Profiles are read once per step, however many windows are due (catch-up).
        let mut profiles = None;
        while let Some(start) = self.next_due(now_ms)? {
            let profiles = match &profiles {
                Some(p) => p,
                None => profiles.insert(self.load_profiles()?),
            };
            self.evaluate_window(start, now_ms, profiles, out)?;
            report.windows += 1;
        }
        self.save_alerts(now_ms, |st| out.notes.extend(st.alerts.tick(now_ms)))
    }

    /// The start of the next window to evaluate if it is due.
    fn next_due(&self, now_ms: i64) -> Result<Option<i64>, MonitorError> {
        let s = &*self.shared;
        let window = s.config.window_ms;
        let grace = self.grace_ms();
        // The newest window that has closed, plus grace, by now.
        let newest_due = (now_ms - grace).div_euclid(window) * window - window;
        let oldest_kept =
            newest_due - window * i64::from(s.config.settings.max_catch_up_windows - 1);
        let cursor = lock(&s.state).cursor;
        let next = match cursor {
            Some(c) => c.max(oldest_kept),
            None => match s.store.first_window_since(oldest_kept)? {
                Some(first) => first,
                None => return Ok(None),
            },
        };
        Ok((next <= newest_due).then_some(next))
    }

    /// Evaluates the window starting at `start`, adding what is to be delivered to `out`.
    fn evaluate_window(
        &self,
        start: i64,
        now_ms: i64,
        profiles: &HashMap<(String, String), MonitoringProfile>,
        out: &mut Outbox,
    ) -> Result<(), MonitorError> {
        let s = &*self.shared;
        let began = std::time::Instant::now();
        let inputs = s.store.drift_inputs(start)?;
        let mut windows: Vec<DeviceWindow> = Vec::with_capacity(inputs.len());
        // The stored cohort key of each entry of `windows`, for the health labels.
        let mut cohorts: Vec<String> = Vec::with_capacity(inputs.len());
        let mut unassigned: Vec<(String, String, WindowAgg)> = Vec::new();
        for input in inputs {
            let agg: WindowAgg = match serde_json::from_str(&input.agg_json) {
                Ok(a) => a,
                Err(e) => {
                    s.stats.bad_windows.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(device = %input.id, start, error = %e, "unreadable window aggregate skipped");
                    continue;
                }
            };
            match parse_cohort_key(&input.cohort) {
                Some((model_id, model_version, hw)) => {
                    windows.push(DeviceWindow {
                        device: input.id,
                        model_id: model_id.to_owned(),
                        model_version: model_version.to_owned(),
                        hw: hw.to_owned(),
                        tags: input.tags,
                        agg,
                    });
                    cohorts.push(input.cohort);
                }
                // A device that has not said hello yet has no model: health only.
                None => unassigned.push((input.id, input.cohort, agg)),
            }
        }
        let health_inputs: Vec<HealthInput<'_>> = windows
            .iter()
            .zip(&cohorts)
            .map(|(w, c)| HealthInput {
                device: &w.device,
                cohort: c,
                agg: &w.agg,
            })
            .chain(unassigned.iter().map(|(d, c, a)| HealthInput {
                device: d,
                cohort: c,
                agg: a,
            }))
            .collect();
        if let Some(observe) = s.window_observer.get() {
            observe(start, &windows, profiles);
        }
        let health = conditions::health(&health_inputs, &s.config.health);
        let reported: HashSet<&str> = health_inputs.iter().map(|h| h.device).collect();

        // Saves are serialised and snapshot under `save_lock`, so an older snapshot can never
        // overwrite a newer one (the API saves silences concurrently).
        let saving = lock(&s.save_lock);
        let mut st = lock(&s.state);
        let evaluation = s
            .config
            .settings
            .drift
            .then(|| st.engine.evaluate(start, &windows, profiles));
        if let Some(eval) = &evaluation {
            let max_age = s.config.drift.max_pool_windows;
            st.active
                .update(eval, &reported, s.config.window_ms, max_age);
            let drift: Vec<_> = st.active.iter().map(conditions::finding).collect();
            out.notes.extend(st.alerts.evaluate(now_ms, "drift", drift));
            for request in retrain::requests(eval, profiles) {
                if let RetrainDecision::Trigger(t) = st.alerts.retrain(now_ms, request) {
                    out.triggers.push(t);
                }
            }
        }
        out.notes
            .extend(st.alerts.evaluate(now_ms, "health", health));
        st.cursor = Some(start + s.config.window_ms);
        let saved = (
            serde_json::to_string(&st.engine),
            serde_json::to_string(&st.cursor),
            serde_json::to_string(&st.active),
            serde_json::to_string(&st.alerts.snapshot()),
        );
        let active_findings: Vec<Finding> = st.active.iter().cloned().collect();
        drop(st);

        let duration = began.elapsed();
        match saved {
            (Ok(engine), Ok(cursor), Ok(active), Ok(alerts)) => s.store.put_service_state(
                &[
                    (ENGINE_STATE, &engine),
                    (CURSOR_STATE, &cursor),
                    (ACTIVE_STATE, &active),
                    (ALERTS_STATE, &alerts),
                ],
                now_ms,
            )?,
            _ => tracing::error!("cannot serialise the monitor state; it is not saved"),
        }
        drop(saving);
        if let Some(eval) = &evaluation {
            let mut scores: Vec<&Score> = eval.scores.iter().collect();
            scores.sort_by_key(|s| s.scope.kind == tinyfleet_drift::engine::ScopeKind::Device);
            let record = json!({
                "window_start_ms": start,
                "window_ms": s.config.window_ms,
                "evaluated_ms": now_ms,
                "duration_ms": duration.as_secs_f64() * 1000.0,
                "stats": eval.stats,
                "findings": eval.findings,
                "active_findings": active_findings,
                "scores": scores.iter().take(MAX_RECORDED_SCORES).collect::<Vec<_>>(),
                "scores_omitted": scores.len().saturating_sub(MAX_RECORDED_SCORES),
            });
            s.store
                .put_drift_evaluation(start, &record.to_string(), now_ms)?;
            let keep_ms = s.config.settings.retention_days as i64 * 86_400_000;
            s.store.prune_drift_evaluations(start - keep_ms)?;
            if let Some(sink) = &s.influx {
                sink.send(eval.scores.iter().map(drift_point).collect());
            }
            if !eval.findings.is_empty() {
                tracing::info!(
                    window_start_ms = start,
                    findings = eval.findings.len(),
                    devices = eval.stats.devices,
                    "drift evaluation found something"
                );
            }
        }
        let stats = &s.stats;
        stats.evaluations.fetch_add(1, Ordering::Relaxed);
        stats
            .last_window_start_ms
            .store(start.max(0) as u64, Ordering::Relaxed);
        stats
            .last_duration_us
            .store(duration.as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn load_profiles(&self) -> Result<HashMap<(String, String), MonitoringProfile>, MonitorError> {
        let mut out = HashMap::new();
        for (model_id, model_version, json) in self.shared.store.profiles()? {
            match serde_json::from_str::<MonitoringProfile>(&json) {
                Ok(p) => {
                    out.insert((model_id, model_version), p);
                }
                Err(e) => {
                    tracing::warn!(model = %model_id, version = %model_version, error = %e, "stored profile unreadable; model not evaluated");
                }
            }
        }
        Ok(out)
    }

    fn deliver(&self, out: &Outbox) {
        let s = &*self.shared;
        for t in &out.triggers {
            tracing::info!(
                model = %t.request.model_id,
                version = %t.request.model_version,
                cohort = %t.request.cohort,
                reason = %t.request.reason,
                "retraining triggered"
            );
            s.deliverer.retrain(t);
        }
        let notes = &out.notes;
        if notes.is_empty() {
            return;
        }
        s.deliverer.notify(notes);
        let (Some(publish), prefix) = (&s.publish, &s.config.settings.alert_topic) else {
            return;
        };
        if prefix.is_empty() {
            return;
        }
        for n in notes {
            let name = n.labels.get("alertname").map_or("unknown", String::as_str);
            match tinyfleet_alerts::payload::mqtt_alert_event(n) {
                Ok(body) => {
                    publish(format!("{prefix}/{name}"), body);
                    s.stats.mqtt_events.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::error!(error = %e, "cannot encode an alert event"),
            }
        }
    }

    /// Runs [`Monitor::step`] every `tick_ms` until `shutdown` turns true.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let period = std::time::Duration::from_millis(self.shared.config.settings.tick_ms);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A full disk or a database away fails every tick: log it once a minute, not 12 times.
        let mut failures = failures::RepeatedFailure::default();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            let me = self.clone();
            let error =
                match tokio::task::spawn_blocking(move || me.step(tinyfleet_store::now_ms())).await
                {
                    Ok(Ok(_)) => {
                        if let Some(n) = failures.succeeded() {
                            tracing::info!(failed_steps = n, "monitor steps succeed again");
                        }
                        continue;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("the step panicked: {e}"),
                };
            if let Some(n) = failures.failed(std::time::Instant::now()) {
                tracing::error!(
                    error = %error,
                    failed_steps = n,
                    "monitor step failed; retrying every tick (logged once a minute)"
                );
            }
        }
    }

    /// Waits up to `timeout` for queued notifications and triggers to be delivered; `false`
    /// if some are still waiting.
    pub async fn flush(&self, timeout: std::time::Duration) -> bool {
        self.shared.deliverer.flush(timeout).await
    }

    // ----- what the API shows and changes -----

    /// Every tracked alert (pending, firing, recently resolved).
    pub fn alerts(&self, now_ms: i64) -> Vec<AlertView> {
        lock(&self.shared.state).alerts.alerts(now_ms)
    }

    pub fn silences(&self, now_ms: i64) -> Vec<SilenceView> {
        lock(&self.shared.state).alerts.silences(now_ms)
    }

    /// Adds (or, with an existing id, updates) a silence and saves the alert state.
    pub fn add_silence(&self, now_ms: i64, silence: Silence) -> Result<String, MonitorError> {
        let mut result = Ok(String::new());
        self.save_alerts(now_ms, |st| {
            result = st.alerts.add_silence(now_ms, silence);
        })?;
        Ok(result?)
    }

    /// Ends a silence now and saves the alert state.
    pub fn expire_silence(&self, now_ms: i64, id: &str) -> Result<(), MonitorError> {
        let mut result = Ok(());
        self.save_alerts(now_ms, |st| {
            result = st.alerts.expire_silence(now_ms, id);
        })?;
        Ok(result?)
    }

    /// Applies `change` to the state, then saves the alert state as it is after the change.
    /// Saves are serialised and snapshot under `save_lock`, so they land in snapshot order.
    fn save_alerts(
        &self,
        now_ms: i64,
        change: impl FnOnce(&mut State),
    ) -> Result<(), MonitorError> {
        let s = &*self.shared;
        let _saving = lock(&s.save_lock);
        let json = {
            let mut st = lock(&s.state);
            change(&mut st);
            serde_json::to_string(&st.alerts.snapshot())
        };
        let json = json.map_err(|e| StoreError::Corrupt {
            table: "service_state",
            detail: e.to_string(),
        })?;
        Ok(s.store
            .put_service_state(&[(ALERTS_STATE, &json)], now_ms)?)
    }

    /// Validates and stores the monitoring profile of `model_id`/`model_version`.
    pub fn put_profile(
        &self,
        model_id: &str,
        model_version: &str,
        profile: &MonitoringProfile,
        by: &str,
        now_ms: i64,
    ) -> Result<(), MonitorError> {
        if profile.model_id != model_id || profile.model_version != model_version {
            return Err(MonitorError::Profile(format!(
                "the profile is for {}@{}, not {model_id}@{model_version}",
                profile.model_id, profile.model_version
            )));
        }
        profile
            .validate()
            .map_err(|e| MonitorError::Profile(e.to_string()))?;
        let json =
            serde_json::to_string(profile).map_err(|e| MonitorError::Profile(e.to_string()))?;
        Ok(self
            .shared
            .store
            .put_profile(model_id, model_version, &json, by, now_ms)?)
    }

    /// Recorded evaluations of windows from `since_ms` on, newest first.
    pub fn evaluations(
        &self,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, MonitorError> {
        self.shared
            .store
            .drift_evaluations(since_ms, limit)?
            .into_iter()
            .map(|(_, text)| {
                serde_json::from_str(&text).map_err(|e| {
                    MonitorError::Store(StoreError::Corrupt {
                        table: "drift_evaluations",
                        detail: e.to_string(),
                    })
                })
            })
            .collect()
    }

    /// Findings in force now.
    pub fn active_findings(&self) -> Vec<Finding> {
        lock(&self.shared.state).active.iter().cloned().collect()
    }

    /// The monitor's and the deliverer's counters in the Prometheus text format.
    pub fn render_prometheus(&self, now_ms: i64) -> String {
        let s = &*self.shared;
        let (firing, pending, active, engine) = {
            let st = lock(&s.state);
            let alerts = st.alerts.alerts(now_ms);
            let count = |state| alerts.iter().filter(|a| a.state == state).count();
            (
                count(tinyfleet_alerts::AlertState::Firing),
                count(tinyfleet_alerts::AlertState::Pending),
                st.active.len(),
                st.alerts.stats().clone(),
            )
        };
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "tinyfleet_drift_evaluations_total",
            "counter",
            "Windows evaluated.",
            get(&s.stats.evaluations).to_string(),
        );
        metric(
            "tinyfleet_drift_last_window_start_seconds",
            "gauge",
            "Start of the newest evaluated window.",
            (get(&s.stats.last_window_start_ms) as f64 / 1000.0).to_string(),
        );
        metric(
            "tinyfleet_drift_last_evaluation_seconds",
            "gauge",
            "How long the newest evaluation took.",
            (get(&s.stats.last_duration_us) as f64 / 1e6).to_string(),
        );
        metric(
            "tinyfleet_drift_active_findings",
            "gauge",
            "Drift findings in force.",
            active.to_string(),
        );
        metric(
            "tinyfleet_drift_unreadable_windows_total",
            "counter",
            "Stored window aggregates that could not be read (skipped).",
            get(&s.stats.bad_windows).to_string(),
        );
        metric(
            "tinyfleet_alerts_firing",
            "gauge",
            "Alerts firing.",
            firing.to_string(),
        );
        metric(
            "tinyfleet_alerts_pending",
            "gauge",
            "Alerts pending.",
            pending.to_string(),
        );
        metric(
            "tinyfleet_alerts_notifications_total",
            "counter",
            "Notifications emitted.",
            engine.notifications.to_string(),
        );
        metric(
            "tinyfleet_alerts_refused_total",
            "counter",
            "Conditions for new alerts refused at max_alerts.",
            engine.refused_alerts.to_string(),
        );
        metric(
            "tinyfleet_retrain_triggers_total",
            "counter",
            "Retraining triggers sent.",
            engine.retrain_triggered.to_string(),
        );
        metric(
            "tinyfleet_retrain_suppressed_total",
            "counter",
            "Retraining requests suppressed by the cool-down or as duplicates.",
            engine.retrain_suppressed.to_string(),
        );
        metric(
            "tinyfleet_alert_events_published_total",
            "counter",
            "Alert events published on MQTT.",
            get(&s.stats.mqtt_events).to_string(),
        );
        out.push_str(&s.deliverer.render_prometheus());
        out
    }
}

/// One score as a `tf_drift` point (`docs/influxdb.md`).
fn drift_point(s: &Score) -> Point {
    let mut p = Point::new("tf_drift", s.window_start_ms.saturating_mul(1_000_000))
        .tag("model", &s.scope.model_id)
        .tag("model_version", &s.scope.model_version)
        .tag("scope", s.scope.id())
        .tag("scope_kind", format!("{:?}", s.scope.kind).to_lowercase())
        .tag("subject", s.subject.label())
        .field("n", s.n)
        .field("windows", u64::from(s.windows))
        .field("significant", s.significant)
        .field("streak", u64::from(s.streak));
    for (name, v) in [
        ("psi", s.psi),
        ("psi_critical", s.psi_critical),
        ("js", s.js),
        ("p_value", s.p_value),
        ("accuracy", s.accuracy),
        ("band", s.band),
        ("observed_accuracy", s.observed_accuracy),
        ("reference_accuracy", s.reference_accuracy),
    ] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            p = p.field(name, v);
        }
    }
    p
}
