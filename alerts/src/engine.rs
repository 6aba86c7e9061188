//! The alert state machine: conditions in, notifications out. Synchronous, no I/O, no clock.
//!
//! Detectors report, per *source* ("drift", "health", "presence"...), the complete set of
//! conditions true right now; [`AlertManager::evaluate`] turns them into alerts identified by
//! the fingerprint of their labels, moves each through `pending -> firing -> resolved`, applies
//! silences and inhibition, and returns the notifications due. Time is passed in as
//! milliseconds since the Unix epoch, so tests drive it directly.
//!
//! What this module must never do:
//! - open a second incident for a fingerprint while one is pending or firing (a condition that
//!   flaps back within `resolve_after_ms` continues the incident, `startsAt` unchanged);
//! - notify the same transition twice: a firing alert is notified once, then only every
//!   `repeat_interval_ms`; a resolution only if the firing was notified;
//! - notify a silenced or inhibited firing alert (its state still advances and is listed);
//! - panic on input: conditions without `alertname` are skipped and counted, time going
//!   backwards is treated as no time passing, and the number of alerts is bounded.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ALERTNAME, AlertRule, AlertsConfig, ConfigError};
use crate::matcher::{CompiledMatcher, Labels, Matcher, MatcherError, compile_all, fingerprint};
use crate::retrain::{GateRecord, RetrainDecision, RetrainGate, RetrainRequest};

/// Something a detector says is true right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// Identifying labels; must contain a non-empty `alertname`. Labels with an empty value
    /// are dropped (as in Prometheus, empty means absent).
    pub labels: Labels,
    /// Descriptive, non-identifying text (summary, description, runbook...). The latest
    /// evaluation's annotations replace earlier ones.
    pub annotations: Labels,
    /// The measured value (a drift score, minutes offline...). Non-finite values are kept but
    /// serialised as `null`.
    pub value: f64,
}

impl Condition {
    /// A condition with `alertname` set and no other label.
    pub fn new(alertname: impl Into<String>, value: f64) -> Self {
        let mut labels = Labels::new();
        labels.insert(ALERTNAME.to_owned(), alertname.into());
        Self {
            labels,
            annotations: Labels::new(),
            value,
        }
    }

    /// Adds a label.
    #[must_use]
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }

    /// Adds an annotation.
    #[must_use]
    pub fn annotation(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(name.into(), value.into());
        self
    }
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// True, but not yet for `for_ms`.
    Pending,
    /// True for at least `for_ms`.
    Firing,
    /// Was firing, then absent for `resolve_after_ms`. Kept listed for a while.
    Resolved,
}

/// The two statuses receivers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The alert is firing.
    Firing,
    /// The alert is resolved.
    Resolved,
}

impl AlertStatus {
    /// `"firing"` or `"resolved"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// Why a notification is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationKind {
    /// The alert went firing (or a silence/inhibition of a firing, never-notified alert ended).
    Firing,
    /// Still firing, `repeat_interval_ms` after the last notification.
    Repeat,
    /// It resolved after its firing had been notified.
    Resolved,
}

/// One alert transition to deliver: to the listed receivers, and as an MQTT event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Why.
    pub kind: NotificationKind,
    /// Receivers (by name) that should get it; empty when the rule names none (the MQTT event
    /// is still due).
    pub receivers: Vec<String>,
    /// The alert's fingerprint.
    pub fingerprint: String,
    /// The alert's labels.
    pub labels: Labels,
    /// The alert's latest annotations.
    pub annotations: Labels,
    /// The latest value.
    #[serde(with = "crate::float")]
    pub value: f64,
    /// The source that reported it.
    pub source: String,
    /// When it went firing (Alertmanager's `startsAt`), ms since the epoch.
    pub starts_at_ms: i64,
    /// When it resolved, for a resolution.
    pub ends_at_ms: Option<i64>,
}

impl Notification {
    /// `Firing` for firing and repeat notifications, `Resolved` for resolutions.
    pub fn status(&self) -> AlertStatus {
        match self.kind {
            NotificationKind::Firing | NotificationKind::Repeat => AlertStatus::Firing,
            NotificationKind::Resolved => AlertStatus::Resolved,
        }
    }
}

/// An alert as listed by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertView {
    /// 16 hex digits identifying the label set.
    pub fingerprint: String,
    /// Labels (including `alertname` and `severity`).
    pub labels: Labels,
    /// Latest annotations.
    pub annotations: Labels,
    /// Pending, firing or resolved.
    pub state: AlertState,
    /// The source that last reported it.
    pub source: String,
    /// Latest value.
    #[serde(with = "crate::float")]
    pub value: f64,
    /// When this incident's condition was first seen (start of pending).
    pub active_at_ms: i64,
    /// When it went firing.
    pub starts_at_ms: Option<i64>,
    /// When it resolved.
    pub ends_at_ms: Option<i64>,
    /// When the condition was last reported.
    pub last_seen_ms: i64,
    /// When a firing notification was last emitted.
    pub last_notified_ms: Option<i64>,
    /// Silenced or inhibited.
    pub suppressed: bool,
    /// Ids of the active silences that match it.
    pub silenced_by: Vec<String>,
    /// Fingerprints of the firing alerts that inhibit it.
    pub inhibited_by: Vec<String>,
}

/// A silence: mutes notifications of matching alerts between `starts_at_ms` and `ends_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Silence {
    /// Identifier; leave empty when adding to have one generated, or give an existing id to
    /// update that silence.
    #[serde(default)]
    pub id: String,
    /// All must match. At least one must not match the empty string (as in Alertmanager, so a
    /// silence cannot match every alert by accident).
    pub matchers: Vec<Matcher>,
    /// Start, ms since the epoch (a start in the past is moved to now for a new silence).
    pub starts_at_ms: i64,
    /// End, ms since the epoch; the silence stops applying at this instant.
    pub ends_at_ms: i64,
    /// Who created it.
    pub created_by: String,
    /// Why.
    pub comment: String,
}

/// Whether a silence applies now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SilenceState {
    /// Starts in the future.
    Pending,
    /// Applies now.
    Active,
    /// Ended (expired or reached `ends_at_ms`).
    Expired,
}

/// A silence as listed by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SilenceView {
    /// The silence.
    #[serde(flatten)]
    pub silence: Silence,
    /// Its state at the time of listing.
    pub state: SilenceState,
}

/// Why a silence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SilenceError {
    /// No silence has this id.
    #[error("no silence with id {0:?}")]
    NotFound(String),
    /// A matcher is invalid.
    #[error("silence matcher: {0}")]
    Matcher(#[from] MatcherError),
    /// Something else is wrong with it.
    #[error("invalid silence: {0}")]
    Invalid(String),
    /// `max_silences` are stored.
    #[error("too many silences (limit {0}); expire some first")]
    TooMany(usize),
}

/// Counters of the engine (for metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Conditions skipped because they had no `alertname`.
    pub invalid_conditions: u64,
    /// Conditions for new alerts refused because `max_alerts` were tracked.
    pub refused_alerts: u64,
    /// Notifications emitted.
    pub notifications: u64,
    /// Retraining requests let through / suppressed by the cool-down or as duplicates.
    pub retrain_triggered: u64,
    /// See `retrain_triggered`.
    pub retrain_suppressed: u64,
}

/// The persisted form of an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Alert {
    labels: Labels,
    annotations: Labels,
    #[serde(with = "crate::float")]
    value: f64,
    source: String,
    state: AlertState,
    active_at_ms: i64,
    fired_at_ms: Option<i64>,
    last_seen_ms: i64,
    ends_at_ms: Option<i64>,
    last_notified_ms: Option<i64>,
}

/// Everything [`AlertManager`] knows that is not configuration: alerts, silences, retraining
/// cool-downs and counters. Serialise it to persist across restarts; restore with
/// [`AlertManager::restore`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    version: u32,
    alerts: Vec<Alert>,
    silences: Vec<Silence>,
    silence_seq: u64,
    retrain: Vec<GateRecord>,
    stats: EngineStats,
}

const SNAPSHOT_VERSION: u32 = 1;

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Written by an incompatible version.
    #[error("alerts snapshot version {found} is not supported (expected {SNAPSHOT_VERSION})")]
    Version {
        /// The snapshot's version.
        found: u32,
    },
    /// A silence in the snapshot does not compile.
    #[error("alerts snapshot: silence {id:?}: {error}")]
    Silence {
        /// The silence id.
        id: String,
        /// What is wrong.
        error: MatcherError,
    },
}

#[derive(Debug, Clone)]
struct StoredSilence {
    silence: Silence,
    matchers: Vec<CompiledMatcher>,
}

impl StoredSilence {
    fn state(&self, now_ms: i64) -> SilenceState {
        if now_ms >= self.silence.ends_at_ms {
            SilenceState::Expired
        } else if now_ms < self.silence.starts_at_ms {
            SilenceState::Pending
        } else {
            SilenceState::Active
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledInhibit {
    source: Vec<CompiledMatcher>,
    target: Vec<CompiledMatcher>,
    equal: Vec<String>,
}

/// Who mutes an alert.
#[derive(Debug, Default)]
struct Mute {
    silenced_by: Vec<String>,
    inhibited_by: Vec<String>,
}

impl Mute {
    fn muted(&self) -> bool {
        !self.silenced_by.is_empty() || !self.inhibited_by.is_empty()
    }
}

/// The alert engine. See the module documentation.
#[derive(Debug)]
pub struct AlertManager {
    config: AlertsConfig,
    rules: BTreeMap<String, AlertRule>,
    inhibit: Vec<CompiledInhibit>,
    alerts: BTreeMap<String, Alert>,
    silences: BTreeMap<String, StoredSilence>,
    silence_seq: u64,
    retrain: RetrainGate,
    stats: EngineStats,
}

/// `now - since` in ms, never negative (time going backwards counts as no time).
fn elapsed(now_ms: i64, since_ms: i64) -> u64 {
    u64::try_from(now_ms.saturating_sub(since_ms)).unwrap_or(0)
}

impl AlertManager {
    /// An engine with no state, after validating `config`.
    pub fn new(config: AlertsConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let rules = config
            .rules
            .iter()
            .map(|(name, o)| (name.clone(), o.apply(&config.default_rule)))
            .collect();
        let mut inhibit = Vec::new();
        for (i, r) in config.effective_inhibit_rules().into_iter().enumerate() {
            let err = |e: MatcherError| ConfigError {
                field: format!("inhibit_rules[{i}]"),
                reason: e.to_string(),
            };
            inhibit.push(CompiledInhibit {
                source: compile_all(&r.source_matchers).map_err(err)?,
                target: compile_all(&r.target_matchers).map_err(err)?,
                equal: r.equal,
            });
        }
        Ok(Self {
            config,
            rules,
            inhibit,
            alerts: BTreeMap::new(),
            silences: BTreeMap::new(),
            silence_seq: 0,
            retrain: RetrainGate::default(),
            stats: EngineStats::default(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &AlertsConfig {
        &self.config
    }

    fn rule(&self, labels: &Labels) -> &AlertRule {
        labels
            .get(ALERTNAME)
            .and_then(|name| self.rules.get(name))
            .unwrap_or(&self.config.default_rule)
    }

    fn receivers_for(&self, labels: &Labels) -> Vec<String> {
        self.rule(labels)
            .receivers
            .clone()
            .unwrap_or_else(|| self.config.default_receivers.clone())
    }

    /// Applies the complete set of conditions currently true for `source` and returns the
    /// notifications due at `now_ms`. Alerts of `source` missing from `conditions` move
    /// towards resolved. Also applies time-based changes to every alert (repeats, silences
    /// that ended, retention), so any source's evaluation is a tick for all.
    pub fn evaluate(
        &mut self,
        now_ms: i64,
        source: &str,
        conditions: Vec<Condition>,
    ) -> Vec<Notification> {
        let mut present = BTreeSet::new();
        for c in conditions {
            let mut labels = c.labels;
            labels.retain(|_, v| !v.is_empty());
            if !labels.contains_key(ALERTNAME) {
                self.stats.invalid_conditions = self.stats.invalid_conditions.saturating_add(1);
                continue;
            }
            if !labels.contains_key("severity") {
                let severity = self.rule(&labels).severity.clone();
                labels.insert("severity".to_owned(), severity);
            }
            let fp = fingerprint(&labels);
            let at_capacity = self.alerts.len() >= self.config.max_alerts;
            match self.alerts.get_mut(&fp) {
                Some(a) if a.state != AlertState::Resolved => {
                    a.annotations = c.annotations;
                    a.value = c.value;
                    a.last_seen_ms = now_ms;
                    a.source = source.to_owned();
                }
                existing => {
                    // New alert, or a resolved one coming back: a new incident.
                    if existing.is_none() && at_capacity {
                        self.stats.refused_alerts = self.stats.refused_alerts.saturating_add(1);
                        continue;
                    }
                    let alert = Alert {
                        labels,
                        annotations: c.annotations,
                        value: c.value,
                        source: source.to_owned(),
                        state: AlertState::Pending,
                        active_at_ms: now_ms,
                        fired_at_ms: None,
                        last_seen_ms: now_ms,
                        ends_at_ms: None,
                        last_notified_ms: None,
                    };
                    self.alerts.insert(fp.clone(), alert);
                }
            }
            present.insert(fp);
        }

        // Advance the alerts of this source.
        let mut resolved_now = Vec::new();
        let mut gone = Vec::new();
        for (fp, a) in &mut self.alerts {
            if a.source != source || a.state == AlertState::Resolved {
                continue;
            }
            let rule = a
                .labels
                .get(ALERTNAME)
                .and_then(|n| self.rules.get(n))
                .unwrap_or(&self.config.default_rule);
            if present.contains(fp) {
                if a.state == AlertState::Pending && elapsed(now_ms, a.active_at_ms) >= rule.for_ms
                {
                    a.state = AlertState::Firing;
                    a.fired_at_ms = Some(now_ms);
                }
            } else if elapsed(now_ms, a.last_seen_ms) >= rule.resolve_after_ms {
                match a.state {
                    // Never fired: it simply ends, silently.
                    AlertState::Pending => gone.push(fp.clone()),
                    AlertState::Firing => {
                        a.state = AlertState::Resolved;
                        a.ends_at_ms = Some(now_ms);
                        resolved_now.push(fp.clone());
                    }
                    AlertState::Resolved => {}
                }
            }
        }
        for fp in gone {
            self.alerts.remove(&fp);
        }

        self.gc(now_ms);
        let notifications = self.notifications_due(now_ms, &resolved_now);
        self.stats.notifications = self
            .stats
            .notifications
            .saturating_add(notifications.len() as u64);
        notifications
    }

    /// Time-based changes only (repeats, silences that ended, retention), for when no source
    /// evaluated recently.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Notification> {
        self.gc(now_ms);
        let notifications = self.notifications_due(now_ms, &[]);
        self.stats.notifications = self
            .stats
            .notifications
            .saturating_add(notifications.len() as u64);
        notifications
    }

    fn gc(&mut self, now_ms: i64) {
        let keep_resolved = self.config.resolved_retention_ms;
        self.alerts.retain(|_, a| match (a.state, a.ends_at_ms) {
            (AlertState::Resolved, Some(end)) => elapsed(now_ms, end) < keep_resolved,
            _ => true,
        });
        let keep_silence = self.config.silence_retention_ms;
        self.silences.retain(|_, s| {
            now_ms < s.silence.ends_at_ms || elapsed(now_ms, s.silence.ends_at_ms) < keep_silence
        });
    }

    fn notifications_due(&mut self, now_ms: i64, resolved_now: &[String]) -> Vec<Notification> {
        let mutes = self.mutes(now_ms);
        let mut due: Vec<(String, NotificationKind)> = Vec::new();
        for (fp, a) in &self.alerts {
            if a.state != AlertState::Firing {
                continue;
            }
            if mutes.get(fp).is_some_and(Mute::muted) {
                continue;
            }
            let repeat = self.rule(&a.labels).repeat_interval_ms;
            match a.last_notified_ms {
                None => due.push((fp.clone(), NotificationKind::Firing)),
                Some(last) if repeat > 0 && elapsed(now_ms, last) >= repeat => {
                    due.push((fp.clone(), NotificationKind::Repeat));
                }
                Some(_) => {}
            }
        }
        // A resolution is sent when the firing was notified, even if the alert is muted now:
        // the receiver holds an open incident that only this closes. (Alertmanager drops it
        // when muted, which leaves incidents open in pagers; we prefer closing them.)
        for fp in resolved_now {
            if self
                .alerts
                .get(fp)
                .is_some_and(|a| a.last_notified_ms.is_some())
            {
                due.push((fp.clone(), NotificationKind::Resolved));
            }
        }
        let mut out = Vec::with_capacity(due.len());
        for (fp, kind) in due {
            let receivers = match self.alerts.get(&fp) {
                Some(a) => self.receivers_for(&a.labels),
                None => continue,
            };
            let Some(a) = self.alerts.get_mut(&fp) else {
                continue;
            };
            if kind != NotificationKind::Resolved {
                a.last_notified_ms = Some(now_ms);
            }
            out.push(Notification {
                kind,
                receivers,
                fingerprint: fp,
                labels: a.labels.clone(),
                annotations: a.annotations.clone(),
                value: a.value,
                source: a.source.clone(),
                starts_at_ms: a.fired_at_ms.unwrap_or(a.active_at_ms),
                ends_at_ms: a.ends_at_ms,
            });
        }
        out
    }

    /// Silences and inhibitions of every alert at `now_ms`.
    fn mutes(&self, now_ms: i64) -> HashMap<String, Mute> {
        let mut mutes: HashMap<String, Mute> = HashMap::new();
        let active: Vec<&StoredSilence> = self
            .silences
            .values()
            .filter(|s| s.state(now_ms) == SilenceState::Active)
            .collect();
        for (fp, a) in &self.alerts {
            for s in &active {
                if crate::matcher::matches_all(&s.matchers, &a.labels) {
                    mutes
                        .entry(fp.clone())
                        .or_default()
                        .silenced_by
                        .push(s.silence.id.clone());
                }
            }
        }
        for rule in &self.inhibit {
            // Index the firing sources by their `equal` label values (absent = "").
            let key = |labels: &Labels| -> Vec<String> {
                rule.equal
                    .iter()
                    .map(|n| labels.get(n).cloned().unwrap_or_default())
                    .collect()
            };
            let mut sources: HashMap<Vec<String>, Vec<(&str, bool)>> = HashMap::new();
            for (fp, a) in &self.alerts {
                if a.state == AlertState::Firing
                    && crate::matcher::matches_all(&rule.source, &a.labels)
                {
                    let also_target = crate::matcher::matches_all(&rule.target, &a.labels);
                    sources
                        .entry(key(&a.labels))
                        .or_default()
                        .push((fp.as_str(), also_target));
                }
            }
            if sources.is_empty() {
                continue;
            }
            for (fp, a) in &self.alerts {
                if !crate::matcher::matches_all(&rule.target, &a.labels) {
                    continue;
                }
                let Some(candidates) = sources.get(&key(&a.labels)) else {
                    continue;
                };
                // As Alertmanager: an alert matching both sides is only inhibited by sources
                // that do not also match the target, so two alerts never inhibit each other.
                let two_sided = crate::matcher::matches_all(&rule.source, &a.labels);
                for (src_fp, src_also_target) in candidates {
                    if *src_fp == fp.as_str() || (two_sided && *src_also_target) {
                        continue;
                    }
                    let m = mutes.entry(fp.clone()).or_default();
                    if !m.inhibited_by.iter().any(|x| x == src_fp) {
                        m.inhibited_by.push((*src_fp).to_owned());
                    }
                }
            }
        }
        mutes
    }

    /// Every tracked alert (pending, firing, and resolved within the retention), by
    /// fingerprint, with silences and inhibitions as of `now_ms`.
    pub fn alerts(&self, now_ms: i64) -> Vec<AlertView> {
        let mut mutes = self.mutes(now_ms);
        self.alerts
            .iter()
            .map(|(fp, a)| {
                let m = mutes.remove(fp).unwrap_or_default();
                AlertView {
                    fingerprint: fp.clone(),
                    labels: a.labels.clone(),
                    annotations: a.annotations.clone(),
                    state: a.state,
                    source: a.source.clone(),
                    value: a.value,
                    active_at_ms: a.active_at_ms,
                    starts_at_ms: a.fired_at_ms,
                    ends_at_ms: a.ends_at_ms,
                    last_seen_ms: a.last_seen_ms,
                    last_notified_ms: a.last_notified_ms,
                    suppressed: a.state != AlertState::Resolved && m.muted(),
                    silenced_by: m.silenced_by,
                    inhibited_by: m.inhibited_by,
                }
            })
            .collect()
    }

    /// Adds a silence, or updates the one with the same id; returns its id. A silence is
    /// refused when it has no matchers, a matcher is invalid, every matcher matches the empty
    /// string, it ends before it starts or before `now_ms`, or `created_by`/`comment` is empty.
    pub fn add_silence(
        &mut self,
        now_ms: i64,
        mut silence: Silence,
    ) -> Result<String, SilenceError> {
        if silence.matchers.is_empty() {
            return Err(SilenceError::Invalid(
                "at least one matcher is needed".into(),
            ));
        }
        let matchers = compile_all(&silence.matchers)?;
        if matchers.iter().all(|m| m.matches_value("")) {
            return Err(SilenceError::Invalid(
                "at least one matcher must not match the empty string (this silence would \
                 match alerts that lack its labels)"
                    .into(),
            ));
        }
        if silence.created_by.trim().is_empty() {
            return Err(SilenceError::Invalid("`created_by` is empty".into()));
        }
        if silence.comment.trim().is_empty() {
            return Err(SilenceError::Invalid("`comment` is empty".into()));
        }
        if silence.ends_at_ms <= now_ms {
            return Err(SilenceError::Invalid(format!(
                "ends_at_ms {} is not in the future (now {now_ms})",
                silence.ends_at_ms
            )));
        }
        if silence.ends_at_ms <= silence.starts_at_ms {
            return Err(SilenceError::Invalid(format!(
                "ends_at_ms {} is not after starts_at_ms {}",
                silence.ends_at_ms, silence.starts_at_ms
            )));
        }
        if silence.id.is_empty() {
            if self.silences.len() >= self.config.max_silences {
                self.gc(now_ms);
                if self.silences.len() >= self.config.max_silences {
                    return Err(SilenceError::TooMany(self.config.max_silences));
                }
            }
            silence.starts_at_ms = silence.starts_at_ms.max(now_ms);
            silence.id = self.new_silence_id(now_ms, &silence);
        } else if !self.silences.contains_key(&silence.id) {
            return Err(SilenceError::NotFound(silence.id));
        }
        let id = silence.id.clone();
        self.silences
            .insert(id.clone(), StoredSilence { silence, matchers });
        Ok(id)
    }

    fn new_silence_id(&mut self, now_ms: i64, silence: &Silence) -> String {
        loop {
            self.silence_seq = self.silence_seq.wrapping_add(1);
            let mut h = Sha256::new();
            h.update(self.silence_seq.to_be_bytes());
            h.update(now_ms.to_be_bytes());
            h.update(silence.created_by.as_bytes());
            h.update([0]);
            h.update(silence.comment.as_bytes());
            let digest = h.finalize();
            let id = hex::encode(&digest[..16]);
            if !self.silences.contains_key(&id) {
                return id;
            }
        }
    }

    /// Ends a silence now (it stays listed as expired for `silence_retention_ms`). Expiring an
    /// expired silence is not an error.
    pub fn expire_silence(&mut self, now_ms: i64, id: &str) -> Result<(), SilenceError> {
        let s = self
            .silences
            .get_mut(id)
            .ok_or_else(|| SilenceError::NotFound(id.to_owned()))?;
        if s.state(now_ms) != SilenceState::Expired {
            s.silence.starts_at_ms = s.silence.starts_at_ms.min(now_ms);
            s.silence.ends_at_ms = now_ms;
        }
        Ok(())
    }

    /// Every stored silence with its state at `now_ms`.
    pub fn silences(&self, now_ms: i64) -> Vec<SilenceView> {
        self.silences
            .values()
            .map(|s| SilenceView {
                silence: s.silence.clone(),
                state: s.state(now_ms),
            })
            .collect()
    }

    /// Passes a retraining request through the cool-down of [`AlertsConfig::retrain`].
    pub fn retrain(&mut self, now_ms: i64, request: RetrainRequest) -> RetrainDecision {
        let decision = self.retrain.decide(&self.config.retrain, now_ms, request);
        match decision {
            RetrainDecision::Trigger(_) => {
                self.stats.retrain_triggered = self.stats.retrain_triggered.saturating_add(1);
            }
            _ => {
                self.stats.retrain_suppressed = self.stats.retrain_suppressed.saturating_add(1);
            }
        }
        decision
    }

    /// Counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The whole state, for persisting.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            alerts: self.alerts.values().cloned().collect(),
            silences: self.silences.values().map(|s| s.silence.clone()).collect(),
            silence_seq: self.silence_seq,
            retrain: self.retrain.records(),
            stats: self.stats.clone(),
        }
    }

    /// An engine with `config` and the state of `snapshot`. Fingerprints are recomputed from
    /// the labels; alerts beyond `max_alerts` are dropped.
    pub fn restore(config: AlertsConfig, snapshot: Snapshot) -> Result<Self, RestoreError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version {
                found: snapshot.version,
            });
        }
        let mut m = Self::new(config)?;
        for a in snapshot.alerts {
            if m.alerts.len() >= m.config.max_alerts {
                break;
            }
            m.alerts.insert(fingerprint(&a.labels), a);
        }
        for s in snapshot.silences {
            let matchers = compile_all(&s.matchers).map_err(|error| RestoreError::Silence {
                id: s.id.clone(),
                error,
            })?;
            m.silences.insert(
                s.id.clone(),
                StoredSilence {
                    silence: s,
                    matchers,
                },
            );
        }
        m.silence_seq = snapshot.silence_seq;
        m.retrain = RetrainGate::from_records(snapshot.retrain);
        m.stats = snapshot.stats;
        Ok(m)
    }
}

#[cfg(test)]
mod tests;
