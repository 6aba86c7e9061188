//! The rollout engine: one [`Rollout`] per rollout, driven by the shell's calls, answering
//! with [`Step`]s (actions to carry out and audit records to persist).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tinyfleet_device::wire::ota_state;

use super::gates::{Gate, GateReport, InstallCounts, InstallReport, Verdict};
use super::plan::{MINUTE_MS, PlanError, RolloutPlan, VersionRef};
use super::quality::{QualityIntake, QualityObservation, QualityState, Side};
use super::select;
use super::track::{InstallState, ProgressReport, ReportOutcome, Track};

/// What the shell knows about a device (registry tags, presence and the device state from
/// its hello). Feed it at start, then on every change (presence, new device, new model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub hw: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub model_id: Option<String>,
    pub model_version: Option<String>,
    pub online: bool,
}

/// Where a rollout stands.
///
/// ```text
///          tick: stage fully offered, soaked, both gates pass (or advance_now())
///  start --> Running(0) --> Running(1) --> ... --> Running(last) --> Completed
///             |    ^                                                  |
///   pause(),  |    | resume(),                                        |
///   deadline  v    | advance_now()                                    |
///            Paused                                                   |
///             |                                                       |
///             +-- a gate fails (tick), or abort() ---+---- abort() ---+
///                 (from Running or Paused)           |
///                                                    v
///   RollingBack: offers withdrawn, the old version offered to every device that took
///                (or may be taking) the new one
///        |   ^
///        |   +-- a device reports the new version after all (it got the offer just
///        v   |   before it was withdrawn)
///      Aborted: every rollback install finished
/// ```
///
/// A gate failure aborts in `Paused` too: bad news does not wait for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    RollingBack,
    Aborted,
    Completed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::RollingBack => "rolling_back",
            Self::Aborted => "aborted",
            Self::Completed => "completed",
        }
    }
}

/// Forward offers take a device to the target; rollback offers take it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Forward,
    Rollback,
}

/// An offer that should be published (retained) to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub device: String,
    pub version: String,
    pub seq: u32,
    pub phase: Phase,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Sign and publish this offer (retained, so an offline device gets it when it returns).
    Offer(Offer),
    /// Clear the device's retained offer of this rollout (on abort, before the rollback).
    Withdraw { device: String },
    /// Register a rollback version of `old_version`: the same artifact, a new version name,
    /// a `seq` above the target's (so devices' anti-rollback accepts it), then call
    /// [`Rollout::rollback_version_ready`].
    RollbackNeeded { old_version: String },
}

/// Who or what caused a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// An operator (API or CLI user).
    Operator(String),
    /// The install-health gate failed.
    InstallGate,
    /// The quality gate failed.
    QualityGate,
    /// The soak time passed with every gate passing.
    Soak,
    /// The deadline passed with a gate still inconclusive.
    Deadline,
    /// The engine's own bookkeeping (rollback finished or reopened).
    Engine,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Operator(who) => write!(f, "operator:{who}"),
            Self::InstallGate => f.write_str("gate:install"),
            Self::QualityGate => f.write_str("gate:quality"),
            Self::Soak => f.write_str("soak"),
            Self::Deadline => f.write_str("deadline"),
            Self::Engine => f.write_str("engine"),
        }
    }
}

/// The transitions the audit log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    Created,
    StageOpened,
    /// The stage named in the record passed (or an operator advanced it).
    Advanced,
    Paused,
    Resumed,
    Aborted,
    RollbackStarted,
    RollbackVersionReady,
    RollbackCompleted,
    Completed,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub rollout: String,
    pub at_ms: i64,
    pub event: AuditEvent,
    /// The stage concerned (0-based).
    pub stage: Option<u32>,
    pub cause: Cause,
    pub note: String,
    /// The gate values at the time (the latest evaluation for an operator's action).
    pub gates: Option<GateReport>,
}

/// What one call asks of the shell: carry out `actions` in order, persist `audit` (with the
/// engine's state, in one transaction, before publishing anything).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub actions: Vec<Action>,
    pub audit: Vec<AuditRecord>,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.audit.is_empty()
    }

    fn extend(&mut self, other: Step) {
        self.actions.extend(other.actions);
        self.audit.extend(other.audit);
    }
}

/// Why an operator's call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("cannot {op} a rollout that is {state}")]
    State {
        op: &'static str,
        state: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
}

/// One opened stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StageRun {
    cut: u64,
    opened_ms: i64,
    fully_offered_ms: Option<i64>,
    closed_ms: Option<i64>,
}

/// A device of the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    bucket: u64,
    /// The replaced version it runs (frozen at the offer): what a rollback takes it back to.
    from_version: String,
    online: bool,
    online_since_ms: Option<i64>,
    /// Its stage, fixed when it is offered.
    stage: Option<u32>,
    forward: Option<Track>,
    rollback: Option<Track>,
    /// Forgotten by the shell (decommissioned) after its offer.
    gone: bool,
    /// Seen running the target version (its hello) after the offer, whatever its reports say.
    #[serde(default)]
    ran_target: bool,
}

impl Member {
    fn participates(&self) -> bool {
        !self.gone && (self.online || self.forward.as_ref().is_some_and(|t| t.reached))
    }

    /// Needs the old version back: it took, or may be taking, the new one.
    fn needs_rollback(&self) -> bool {
        !self.gone
            && self
                .forward
                .as_ref()
                .is_some_and(|t| self.ran_target || t.may_have_installed())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RateWindow {
    minute: i64,
    sent: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RollbackRun {
    started_ms: i64,
    /// Rollback version per old version, once registered.
    versions: BTreeMap<String, VersionRef>,
    /// Old versions a rollback version was asked for.
    requested: BTreeSet<String>,
    completed_ms: Option<i64>,
}

/// Why and since when a rollout is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseInfo {
    pub at_ms: i64,
    pub cause: Cause,
    pub note: String,
}

/// What happened to the progress reports given to [`Rollout::report`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportCounters {
    pub applied: u64,
    pub stale: u64,
    pub unknown_device: u64,
    pub other_manifest: u64,
    pub bad_state: u64,
}

/// One staged rollout: its plan and everything it has seen and decided. Serialise it whole
/// after every call that returned a non-empty [`Step`] (or simply after every batch); a
/// deserialised copy carries on exactly where the original would have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    plan: RolloutPlan,
    state: RolloutState,
    created_ms: i64,
    /// The latest `now_ms` seen; time never goes back inside the engine.
    clock_ms: i64,
    stages: Vec<StageRun>,
    members: BTreeMap<String, Member>,
    quality: QualityState,
    rate: RateWindow,
    rollback: Option<RollbackRun>,
    pause: Option<PauseInfo>,
    resumed_ms: Option<i64>,
    reports: ReportCounters,
}

/// Where a stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Not opened yet (its device counts are provisional).
    Pending,
    Open,
    /// Closed by an advance (or by the abort).
    Closed,
}

/// Per-stage view for the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStatus {
    pub index: u32,
    pub share: f64,
    pub min_devices: u32,
    pub state: StageState,
    /// Share of the bucket space covered (after the minimum-devices rule).
    pub cut: f64,
    pub opened_ms: Option<i64>,
    pub fully_offered_ms: Option<i64>,
    /// When the soak ends and when the stage pauses if still inconclusive (once fully offered).
    pub soak_until_ms: Option<i64>,
    pub deadline_ms: Option<i64>,
    pub closed_ms: Option<i64>,
    pub counts: InstallCounts,
}

/// The rollback's view for the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackStatus {
    pub started_ms: i64,
    pub completed_ms: Option<i64>,
    /// Devices that need the old version back.
    pub devices: u64,
    /// Rollback versions per old version, and old versions still waiting for one.
    pub versions: BTreeMap<String, VersionRef>,
    pub waiting_for_versions: Vec<String>,
    pub counts: InstallCounts,
}

/// One device of the target, for the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device: String,
    /// Its bucket as a fraction in [0, 1).
    pub bucket: f64,
    /// Fixed once offered, provisional before; `None` beyond the last stage's share.
    pub stage: Option<u32>,
    /// The replaced version it ran when offered (what a rollback takes it back to).
    pub from_version: String,
    pub online: bool,
    /// Its install of the target, and of the rollback version.
    pub forward: Option<Track>,
    pub rollback: Option<Track>,
    pub rollback_version: Option<VersionRef>,
    pub needs_rollback: bool,
    pub gone: bool,
}

/// The whole view for the API (`show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub id: String,
    pub model_id: String,
    pub target: VersionRef,
    pub replaces: Vec<VersionRef>,
    pub state: RolloutState,
    /// The current (latest opened) stage, 0-based.
    pub stage: u32,
    pub stages: Vec<StageStatus>,
    /// All stages together.
    pub totals: InstallCounts,
    /// Both gates evaluated now (values and verdicts), while running or paused; the audit log
    /// keeps the values at each transition.
    pub gates: Option<GateReport>,
    /// Why the rollout is not advancing, when running and holding.
    pub holding: Option<String>,
    pub paused: Option<PauseInfo>,
    pub rollback: Option<RollbackStatus>,
    pub reports: ReportCounters,
    pub quality_windows: u32,
    pub created_ms: i64,
}

impl Rollout {
    /// Validates the plan, takes the initial fleet, opens the first stage and makes the first
    /// offers. `who` is the operator (or policy) that created it.
    pub fn start(
        plan: RolloutPlan,
        fleet: &[DeviceInfo],
        who: &str,
        now_ms: i64,
    ) -> Result<(Self, Step), PlanError> {
        plan.validate()?;
        let mut r = Self {
            plan,
            state: RolloutState::Running,
            created_ms: now_ms,
            clock_ms: now_ms,
            stages: Vec::new(),
            members: BTreeMap::new(),
            quality: QualityState::default(),
            rate: RateWindow::default(),
            rollback: None,
            pause: None,
            resumed_ms: None,
            reports: ReportCounters::default(),
        };
        for d in fleet {
            r.observe_device(d, now_ms);
        }
        let mut step = Step::default();
        let note = format!(
            "{}@{} (seq {}) replacing {} on {}: {} devices in the target",
            r.plan.model_id,
            r.plan.target.version,
            r.plan.target.seq,
            r.plan
                .replaces
                .iter()
                .map(|v| v.version.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            r.plan.filter.hw,
            r.members.len()
        );
        let cause = Cause::Operator(who.to_owned());
        r.audit(
            &mut step,
            now_ms,
            AuditEvent::Created,
            None,
            cause.clone(),
            note,
            None,
        );
        r.open_stage(now_ms, cause, &mut step);
        step.extend(r.tick(now_ms));
        Ok((r, step))
    }

    pub fn plan(&self) -> &RolloutPlan {
        &self.plan
    }

    pub fn id(&self) -> &str {
        &self.plan.id
    }

    pub fn state(&self) -> RolloutState {
        self.state
    }

    /// Both gates evaluated now (as of the latest `now_ms` seen), while the rollout runs or is
    /// paused. Nothing of it is stored: every report is recomputed from the evidence, so the
    /// persisted state holds no derived floating-point values.
    pub fn gates(&self) -> Option<GateReport> {
        matches!(self.state, RolloutState::Running | RolloutState::Paused)
            .then(|| self.gate_report(self.clock_ms))
    }

    fn clock(&mut self, now_ms: i64) -> i64 {
        self.clock_ms = self.clock_ms.max(now_ms);
        self.clock_ms
    }

    fn current(&self) -> u32 {
        self.stages.len().saturating_sub(1) as u32
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        step: &mut Step,
        at_ms: i64,
        event: AuditEvent,
        stage: Option<u32>,
        cause: Cause,
        note: String,
        gates: Option<GateReport>,
    ) {
        step.audit.push(AuditRecord {
            rollout: self.plan.id.clone(),
            at_ms,
            event,
            stage,
            cause,
            note,
            gates,
        });
    }

    /// The replaced version a device runs, when it belongs to the target.
    fn eligible(&self, d: &DeviceInfo) -> Option<String> {
        if !self.plan.filter.matches(d.hw.as_deref(), &d.tags)
            || d.model_id.as_deref() != Some(self.plan.model_id.as_str())
        {
            return None;
        }
        let v = d.model_version.as_deref()?;
        self.plan.replaced(v).map(|r| r.version.clone())
    }

    /// Takes what the shell knows about a device: a new device of the target joins (while
    /// the rollout runs, is paused or has completed), presence changes restart timeout
    /// clocks, and a device not yet offered leaves the target when it no longer matches.
    /// Returns whether the device is in the target.
    pub fn observe_device(&mut self, d: &DeviceInfo, now_ms: i64) -> bool {
        let now = self.clock(now_ms);
        let eligible = self.eligible(d);
        if let Some(m) = self.members.get_mut(&d.id) {
            if d.online && !m.online {
                m.online_since_ms = Some(now);
                // The broker hands over the retained offer on connect; once aborted, the new
                // version's offer has been withdrawn, so only a report can show it arrived.
                let forward_in_force = !matches!(
                    self.state,
                    RolloutState::RollingBack | RolloutState::Aborted
                );
                if let Some(t) = m.forward.as_mut().filter(|_| forward_in_force) {
                    t.reached = true;
                }
                if let Some(t) = m.rollback.as_mut() {
                    t.reached = true;
                }
            } else if !d.online {
                m.online_since_ms = None;
            }
            m.online = d.online;
            m.gone = false;
            if m.forward.is_some()
                && d.model_version.as_deref() == Some(self.plan.target.version.as_str())
            {
                m.ran_target = true;
            }
            if m.forward.is_none() {
                match eligible {
                    Some(v) => m.from_version = v,
                    None => {
                        self.members.remove(&d.id);
                        return false;
                    }
                }
            }
            return true;
        }
        let accepting = matches!(
            self.state,
            RolloutState::Running | RolloutState::Paused | RolloutState::Completed
        );
        match eligible {
            Some(from_version) if accepting => {
                let member = Member {
                    bucket: select::bucket(&self.plan.id, &d.id),
                    from_version,
                    online: d.online,
                    online_since_ms: d.online.then_some(now),
                    stage: None,
                    forward: None,
                    rollback: None,
                    gone: false,
                    ran_target: false,
                };
                self.members.insert(d.id.clone(), member);
                true
            }
            _ => false,
        }
    }

    /// [`Rollout::observe_device`], and whether the rollout's view of the device changed: a
    /// device shown again with nothing new (the same change delivered twice) changes nothing,
    /// so the shell need not save the rollout. Returns `(in target, changed)`.
    pub fn observe_device_changed(&mut self, d: &DeviceInfo, now_ms: i64) -> (bool, bool) {
        let before = self.members.get(&d.id).cloned();
        let in_target = self.observe_device(d, now_ms);
        (in_target, self.members.get(&d.id) != before.as_ref())
    }

    /// Whether this exact report has been applied already: it is the newest report applied to
    /// the install it is about (same `(boot, seq)`, which names one message of the device, and
    /// the same content). Such a report delivered again changes nothing and need not be given
    /// to [`Rollout::report`] (which would count it as stale).
    pub fn applied(&self, r: &ProgressReport) -> bool {
        let Some(m) = self.members.get(&r.device).filter(|m| !m.gone) else {
            return false;
        };
        // The track `report` would apply it to.
        let unreadable = r.manifest_seq == 0 && r.state == ota_state::REJECTED;
        let track = if m.rollback.as_ref().is_some_and(|t| t.seq == r.manifest_seq) {
            m.rollback.as_ref()
        } else if m.forward.as_ref().is_some_and(|t| t.seq == r.manifest_seq) {
            m.forward.as_ref()
        } else if unreadable {
            m.rollback.as_ref().or(m.forward.as_ref())
        } else {
            None
        };
        track.is_some_and(|t| {
            t.last == Some((r.boot, r.seq))
                && InstallState::from_code(r.state) == Some(t.state)
                && (t.error, t.bytes) == (r.error, r.bytes)
        })
    }

    /// The shell forgot a device (decommissioned, revoked): it leaves the target, or, once
    /// offered, stops counting in gates, offers and rollback.
    pub fn forget_device(&mut self, device: &str) {
        if let Some(m) = self.members.get_mut(device) {
            if m.forward.is_none() {
                self.members.remove(device);
            } else {
                m.gone = true;
            }
        }
    }

    /// Applies one progress report (idempotent: duplicates and late arrivals by `(boot, seq)`
    /// are ignored). Call [`Rollout::tick`] after a batch.
    pub fn report(&mut self, r: &ProgressReport, now_ms: i64) -> ReportOutcome {
        let now = self.clock(now_ms);
        let outcome = match self.members.get_mut(&r.device) {
            Some(m) if !m.gone => {
                let unreadable = r.manifest_seq == 0 && r.state == ota_state::REJECTED;
                let track = if m.rollback.as_ref().is_some_and(|t| t.seq == r.manifest_seq) {
                    m.rollback.as_mut()
                } else if m.forward.as_ref().is_some_and(|t| t.seq == r.manifest_seq) {
                    m.forward.as_mut()
                } else if unreadable {
                    // A device that could not read the offer reports manifest 0: it is about
                    // the newest offer it holds.
                    match m.rollback.as_mut() {
                        Some(t) => Some(t),
                        None => m.forward.as_mut(),
                    }
                } else {
                    None
                };
                match track {
                    Some(t) => t.apply(r, now),
                    None => ReportOutcome::OtherManifest,
                }
            }
            _ => ReportOutcome::UnknownDevice,
        };
        let c = &mut self.reports;
        *match outcome {
            ReportOutcome::Applied => &mut c.applied,
            ReportOutcome::Stale => &mut c.stale,
            ReportOutcome::UnknownDevice => &mut c.unknown_device,
            ReportOutcome::OtherManifest => &mut c.other_manifest,
            ReportOutcome::BadState => &mut c.bad_state,
        } += 1;
        outcome
    }

    /// Takes quality observations (all of a window in one call; a window seen before is
    /// ignored). Used while the rollout runs or is paused.
    pub fn observe_quality(
        &mut self,
        observations: &[QualityObservation],
        now_ms: i64,
    ) -> QualityIntake {
        self.clock(now_ms);
        if !matches!(self.state, RolloutState::Running | RolloutState::Paused) {
            return QualityIntake {
                ignored: observations.len() as u64,
                ..QualityIntake::default()
            };
        }
        let (plan, members) = (&self.plan, &self.members);
        let side = |o: &QualityObservation| {
            let m = members.get(&o.device).filter(|m| !m.gone)?;
            if o.on_version == plan.target.version {
                m.forward.is_some().then_some(Side::Canary)
            } else if plan.replaced(&o.on_version).is_some() {
                Some(Side::Control)
            } else {
                None
            }
        };
        self.quality.fold(observations, side)
    }

    /// Everything time-driven, in order: timeouts; while running or paused, the gates (a
    /// failure aborts; after the soak a pass advances or completes; past the deadline an
    /// inconclusive stage pauses); the rollback's bookkeeping; offers within the rate cap and
    /// maintenance windows. Call it after every batch of inputs and on a timer.
    pub fn tick(&mut self, now_ms: i64) -> Step {
        let now = self.clock(now_ms);
        let mut step = Step::default();
        self.check_timeouts(now);
        if matches!(self.state, RolloutState::Running | RolloutState::Paused) {
            self.grow_cut();
            self.evaluate(now, &mut step);
        }
        if matches!(
            self.state,
            RolloutState::RollingBack | RolloutState::Aborted
        ) {
            self.drive_rollback(now, &mut step);
        }
        self.pump(now, &mut step);
        step
    }

    fn check_timeouts(&mut self, now: i64) {
        let timeout = self.plan.install.report_timeout_ms;
        for m in self.members.values_mut().filter(|m| !m.gone) {
            let since = if m.online { m.online_since_ms } else { None };
            for t in [m.forward.as_mut(), m.rollback.as_mut()]
                .into_iter()
                .flatten()
            {
                t.check_timeout(since, now, timeout);
            }
        }
    }

    /// Buckets, ascending, of the devices that can take part now: online, or reached by
    /// their offer. The minimum-devices rule counts these, so a canary of "at least 10" is
    /// not 10 devices of which some are switched off.
    fn participant_buckets(&self) -> Vec<u64> {
        let mut b: Vec<u64> = self
            .members
            .values()
            .filter(|m| m.participates())
            .map(|m| m.bucket)
            .collect();
        b.sort_unstable();
        b
    }

    /// The current stage's cut grows when its minimum needs more devices taking part (devices
    /// joined, or some went offline before their offer reached them).
    fn grow_cut(&mut self) {
        let k = self.current() as usize;
        let (Some(run), Some(spec)) = (self.stages.get(k), self.plan.stages.get(k)) else {
            return;
        };
        if spec.min_devices == 0 {
            return;
        }
        let below = self
            .members
            .values()
            .filter(|m| m.participates() && m.bucket < run.cut)
            .count();
        if below >= spec.min_devices as usize {
            return;
        }
        let floor = k
            .checked_sub(1)
            .and_then(|p| self.stages.get(p))
            .map_or(0, |s| s.cut);
        let cut = select::stage_cut(
            spec.share,
            spec.min_devices,
            &self.participant_buckets(),
            floor,
        );
        if let Some(run) = self.stages.get_mut(k) {
            run.cut = run.cut.max(cut);
        }
    }

    /// Cuts of every stage: frozen or current for opened ones, provisional for the others.
    fn cuts(&self) -> Vec<u64> {
        let sorted = self.participant_buckets();
        let mut cuts: Vec<u64> = Vec::with_capacity(self.plan.stages.len());
        for (i, spec) in self.plan.stages.iter().enumerate() {
            let floor = cuts.last().copied().unwrap_or(0);
            let cut = match self.stages.get(i) {
                Some(run) => run.cut,
                None => select::stage_cut(spec.share, spec.min_devices, &sorted, floor),
            };
            cuts.push(cut.max(floor));
        }
        cuts
    }

    fn open_stage(&mut self, now: i64, cause: Cause, step: &mut Step) {
        let k = self.stages.len();
        let Some(spec) = self.plan.stages.get(k) else {
            return;
        };
        let floor = self.stages.last().map_or(0, |s| s.cut);
        let cut = select::stage_cut(
            spec.share,
            spec.min_devices,
            &self.participant_buckets(),
            floor,
        );
        self.stages.push(StageRun {
            cut,
            opened_ms: now,
            fully_offered_ms: None,
            closed_ms: None,
        });
        let covered = self
            .members
            .values()
            .filter(|m| !m.gone && m.bucket < cut)
            .count();
        let note = format!(
            "stage {} of {}: {} % (at least {} devices); {covered} devices covered",
            k + 1,
            self.plan.stages.len(),
            spec.share * 100.0,
            spec.min_devices
        );
        self.audit(
            step,
            now,
            AuditEvent::StageOpened,
            Some(k as u32),
            cause,
            note,
            None,
        );
    }

    /// Install counts over every offered device (`cumulative`) and the current stage's.
    fn install_counts(&self) -> (InstallCounts, InstallCounts) {
        let k = self.current();
        let cut = self.stages.last().map_or(0, |s| s.cut);
        let floor = (k as usize)
            .checked_sub(1)
            .and_then(|p| self.stages.get(p))
            .map_or(0, |s| s.cut);
        let (mut all, mut stage) = (InstallCounts::default(), InstallCounts::default());
        for m in self.members.values().filter(|m| !m.gone) {
            if m.bucket < cut || m.forward.is_some() {
                all.targeted += 1;
            }
            let in_stage = match m.stage {
                Some(s) => s == k,
                None => m.bucket >= floor && m.bucket < cut,
            };
            if in_stage {
                stage.targeted += 1;
            }
            if let Some(t) = &m.forward {
                all.add(t);
                if in_stage {
                    stage.add(t);
                }
            }
        }
        (all, stage)
    }

    fn gate_report(&self, now: i64) -> GateReport {
        let (all, stage) = self.install_counts();
        let install = InstallReport::new(all, stage, &self.plan.install);
        let quality = self.quality.evaluate(&self.plan.quality);
        GateReport::new(now, self.current(), install, quality)
    }

    fn evaluate(&mut self, now: i64, step: &mut Step) {
        let report = self.gate_report(now);
        if report.verdict == Verdict::Fail {
            let cause = match report.failed_gate {
                Some(Gate::Quality) => Cause::QualityGate,
                _ => Cause::InstallGate,
            };
            let note = report.reason.clone();
            self.do_abort(now, cause, note, Some(report), step);
            return;
        }
        if self.state != RolloutState::Running {
            return;
        }
        let k = self.current() as usize;
        let (Some(run), Some(spec)) = (self.stages.get(k), self.plan.stages.get(k)) else {
            return;
        };
        let Some(full) = run.fully_offered_ms else {
            return;
        };
        if now.saturating_sub(full) < spec.soak_ms {
            return;
        }
        if report.verdict == Verdict::Pass {
            self.advance(now, Cause::Soak, Some(report), step);
            return;
        }
        let base = full.max(self.resumed_ms.unwrap_or(i64::MIN));
        if now.saturating_sub(base) >= spec.deadline_ms {
            let note = format!("inconclusive past the stage's deadline: {}", report.reason);
            self.set_paused(now, Cause::Deadline, note, Some(report), step);
        }
    }

    fn advance(&mut self, now: i64, cause: Cause, gates: Option<GateReport>, step: &mut Step) {
        let k = self.current();
        if let Some(run) = self.stages.last_mut() {
            run.closed_ms = Some(now);
        }
        let note = match &gates {
            Some(g) if g.verdict != Verdict::Pass => format!("gates not passed: {}", g.reason),
            _ => String::new(),
        };
        self.audit(
            step,
            now,
            AuditEvent::Advanced,
            Some(k),
            cause.clone(),
            note,
            gates,
        );
        if self.stages.len() >= self.plan.stages.len() {
            self.state = RolloutState::Completed;
            let note = format!("{} devices offered", self.offered_count());
            self.audit(step, now, AuditEvent::Completed, Some(k), cause, note, None);
        } else {
            self.open_stage(now, cause, step);
        }
    }

    fn offered_count(&self) -> usize {
        self.members
            .values()
            .filter(|m| !m.gone && m.forward.is_some())
            .count()
    }

    fn set_paused(
        &mut self,
        now: i64,
        cause: Cause,
        note: String,
        gates: Option<GateReport>,
        step: &mut Step,
    ) {
        self.state = RolloutState::Paused;
        self.pause = Some(PauseInfo {
            at_ms: now,
            cause: cause.clone(),
            note: note.clone(),
        });
        let k = self.current();
        self.audit(step, now, AuditEvent::Paused, Some(k), cause, note, gates);
    }

    fn do_abort(
        &mut self,
        now: i64,
        cause: Cause,
        note: String,
        gates: Option<GateReport>,
        step: &mut Step,
    ) {
        let k = self.current();
        self.state = RolloutState::RollingBack;
        self.pause = None;
        if let Some(run) = self.stages.last_mut() {
            run.closed_ms.get_or_insert(now);
        }
        self.audit(
            step,
            now,
            AuditEvent::Aborted,
            Some(k),
            cause.clone(),
            note,
            gates,
        );
        for (id, m) in &self.members {
            if m.forward.is_some() && !m.gone {
                step.actions.push(Action::Withdraw { device: id.clone() });
            }
        }
        self.rollback = Some(RollbackRun {
            started_ms: now,
            ..RollbackRun::default()
        });
        let needing = self.members.values().filter(|m| m.needs_rollback()).count();
        if needing > 0 {
            let note = format!("{needing} devices took or may be taking the new version");
            self.audit(
                step,
                now,
                AuditEvent::RollbackStarted,
                Some(k),
                cause,
                note,
                None,
            );
        }
        self.drive_rollback(now, step);
    }

    /// Requests rollback versions, offers them to every device needing one, and notes when
    /// the rollback is complete (every such device finished its rollback install).
    fn drive_rollback(&mut self, now: i64, step: &mut Step) {
        let Some(rb) = self.rollback.as_mut() else {
            return;
        };
        let mut offered = 0usize;
        let mut unfinished = 0usize;
        for (id, m) in self.members.iter_mut() {
            if !m.needs_rollback() {
                continue;
            }
            match (&m.rollback, rb.versions.get(&m.from_version)) {
                (Some(t), _) => {
                    if !t.terminal() {
                        unfinished += 1;
                    }
                }
                (None, Some(v)) => {
                    m.rollback = Some(Track::offered(v.seq, now, m.online));
                    step.actions.push(Action::Offer(Offer {
                        device: id.clone(),
                        version: v.version.clone(),
                        seq: v.seq,
                        phase: Phase::Rollback,
                    }));
                    offered += 1;
                    unfinished += 1;
                }
                (None, None) => {
                    if rb.requested.insert(m.from_version.clone()) {
                        step.actions.push(Action::RollbackNeeded {
                            old_version: m.from_version.clone(),
                        });
                    }
                    unfinished += 1;
                }
            }
        }
        let k = self.current();
        match self.state {
            RolloutState::RollingBack if unfinished == 0 => {
                self.state = RolloutState::Aborted;
                let rb = self.rollback.get_or_insert_with(RollbackRun::default);
                rb.completed_ms = Some(now);
                let devices = self
                    .members
                    .values()
                    .filter(|m| m.rollback.is_some())
                    .count();
                let note = format!("{devices} devices finished their rollback");
                self.audit(
                    step,
                    now,
                    AuditEvent::RollbackCompleted,
                    Some(k),
                    Cause::Engine,
                    note,
                    None,
                );
            }
            RolloutState::Aborted if unfinished > 0 => {
                self.state = RolloutState::RollingBack;
                if let Some(rb) = self.rollback.as_mut() {
                    rb.completed_ms = None;
                }
                let note = format!(
                    "{unfinished} more devices reported the new version; {offered} offered the old one"
                );
                self.audit(
                    step,
                    now,
                    AuditEvent::RollbackStarted,
                    Some(k),
                    Cause::Engine,
                    note,
                    None,
                );
            }
            _ => {}
        }
    }

    /// Forward offers: devices of opened stages without an offer, online ones first, then by
    /// bucket, within the per-minute cap and the maintenance windows.
    fn pump(&mut self, now: i64, step: &mut Step) {
        if !matches!(self.state, RolloutState::Running | RolloutState::Completed) {
            return;
        }
        let Some(cut) = self.stages.last().map(|s| s.cut) else {
            return;
        };
        let mut candidates: Vec<(bool, u64, &String)> = self
            .members
            .iter()
            .filter(|(_, m)| !m.gone && m.forward.is_none() && m.bucket < cut)
            .map(|(id, m)| (!m.online, m.bucket, id))
            .collect();
        let open = self.plan.maintenance.is_empty()
            || self.plan.maintenance.iter().any(|w| w.contains(now));
        let minute = now.div_euclid(MINUTE_MS);
        if self.rate.minute != minute {
            self.rate = RateWindow { minute, sent: 0 };
        }
        let budget = if open {
            self.plan.offers_per_minute.saturating_sub(self.rate.sent) as usize
        } else {
            0
        };
        candidates.sort_unstable();
        let chosen: Vec<String> = candidates
            .iter()
            .take(budget)
            .map(|(_, _, id)| (*id).clone())
            .collect();
        let remaining = candidates.len() - chosen.len();
        let cuts: Vec<u64> = self.stages.iter().map(|s| s.cut).collect();
        let target = &self.plan.target;
        for id in chosen {
            let Some(m) = self.members.get_mut(&id) else {
                continue;
            };
            let stage = cuts.iter().position(|&c| m.bucket < c).unwrap_or(0) as u32;
            m.stage = Some(stage);
            m.forward = Some(Track::offered(target.seq, now, m.online));
            self.rate.sent += 1;
            step.actions.push(Action::Offer(Offer {
                device: id,
                version: target.version.clone(),
                seq: target.seq,
                phase: Phase::Forward,
            }));
        }
        if remaining == 0
            && self.state == RolloutState::Running
            && let Some(run) = self.stages.last_mut()
            && run.fully_offered_ms.is_none()
        {
            run.fully_offered_ms = Some(now);
        }
    }

    /// Pauses: no new offers until resumed (offers already out stay; gates keep being
    /// evaluated, and a failure still aborts).
    pub fn pause(&mut self, who: &str, reason: &str, now_ms: i64) -> Result<Step, OpError> {
        let now = self.clock(now_ms);
        self.require("pause", &[RolloutState::Running])?;
        let mut step = Step::default();
        let gates = Some(self.gate_report(now));
        self.set_paused(
            now,
            Cause::Operator(who.to_owned()),
            reason.to_owned(),
            gates,
            &mut step,
        );
        step.extend(self.tick(now));
        Ok(step)
    }

    /// Resumes a paused rollout; the current stage's deadline starts over.
    pub fn resume(&mut self, who: &str, now_ms: i64) -> Result<Step, OpError> {
        let now = self.clock(now_ms);
        self.require("resume", &[RolloutState::Paused])?;
        let mut step = Step::default();
        self.set_running(now, who, &mut step);
        step.extend(self.tick(now));
        Ok(step)
    }

    fn set_running(&mut self, now: i64, who: &str, step: &mut Step) {
        self.state = RolloutState::Running;
        self.pause = None;
        self.resumed_ms = Some(now);
        let (k, gates) = (self.current(), Some(self.gate_report(now)));
        let cause = Cause::Operator(who.to_owned());
        self.audit(
            step,
            now,
            AuditEvent::Resumed,
            Some(k),
            cause,
            String::new(),
            gates,
        );
    }

    /// Opens the next stage now (or completes the last), whatever the gates and the soak
    /// say; a paused rollout resumes.
    pub fn advance_now(&mut self, who: &str, now_ms: i64) -> Result<Step, OpError> {
        let now = self.clock(now_ms);
        self.require("advance", &[RolloutState::Running, RolloutState::Paused])?;
        let mut step = Step::default();
        if self.state == RolloutState::Paused {
            self.set_running(now, who, &mut step);
        }
        // Gate values as of now, for the record.
        let gates = Some(self.gate_report(now));
        self.advance(now, Cause::Operator(who.to_owned()), gates, &mut step);
        step.extend(self.tick(now));
        Ok(step)
    }

    /// Aborts and rolls back: withdraws the new version's offers and takes every device that
    /// took (or may be taking) it back to its old version. Also allowed after completion.
    pub fn abort(&mut self, who: &str, reason: &str, now_ms: i64) -> Result<Step, OpError> {
        let now = self.clock(now_ms);
        self.require(
            "abort",
            &[
                RolloutState::Running,
                RolloutState::Paused,
                RolloutState::Completed,
            ],
        )?;
        let mut step = Step::default();
        let gates = Some(self.gate_report(now));
        let cause = Cause::Operator(who.to_owned());
        self.do_abort(now, cause, reason.to_owned(), gates, &mut step);
        step.extend(self.tick(now));
        Ok(step)
    }

    /// The shell registered `version` as the rollback of `old_version` (same artifact, a seq
    /// above the target's): offers of it go out to every device that needs it. Idempotent.
    pub fn rollback_version_ready(
        &mut self,
        old_version: &str,
        version: VersionRef,
        now_ms: i64,
    ) -> Result<Step, OpError> {
        let now = self.clock(now_ms);
        self.require(
            "register a rollback version for",
            &[RolloutState::RollingBack, RolloutState::Aborted],
        )?;
        if self.plan.replaced(old_version).is_none() {
            return Err(OpError::Invalid(format!(
                "{old_version:?} is not a version this rollout replaces"
            )));
        }
        if version.seq <= self.plan.target.seq {
            return Err(OpError::Invalid(format!(
                "rollback seq {} must be above the target's {} or devices refuse it",
                version.seq, self.plan.target.seq
            )));
        }
        let k = self.current();
        let Some(rb) = self.rollback.as_mut() else {
            return Err(OpError::Conflict("no rollback under way".into()));
        };
        if let Some(existing) = rb.versions.get(old_version) {
            return if *existing == version {
                Ok(self.tick(now))
            } else {
                Err(OpError::Conflict(format!(
                    "{old_version} already rolls back as {}@{}",
                    existing.version, existing.seq
                )))
            };
        }
        rb.versions.insert(old_version.to_owned(), version.clone());
        let mut step = Step::default();
        let note = format!(
            "{old_version} rolls back as {} (seq {})",
            version.version, version.seq
        );
        self.audit(
            &mut step,
            now,
            AuditEvent::RollbackVersionReady,
            Some(k),
            Cause::Engine,
            note,
            None,
        );
        step.extend(self.tick(now));
        Ok(step)
    }

    fn require(&self, op: &'static str, allowed: &[RolloutState]) -> Result<(), OpError> {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(OpError::State {
                op,
                state: self.state.as_str(),
            })
        }
    }

    /// Every offer that should currently be retained for a device: forward offers while the
    /// rollout runs, is paused or has completed, rollback offers once aborted. Re-publish these
    /// after a restart (the broker keeps nothing) and clear retained offers of this rollout
    /// for any other device.
    pub fn offers_in_force(&self) -> Vec<Offer> {
        let rolling_back = matches!(
            self.state,
            RolloutState::RollingBack | RolloutState::Aborted
        );
        self.members
            .iter()
            .filter(|(_, m)| !m.gone)
            .filter_map(|(id, m)| {
                let (version, phase) = if rolling_back {
                    m.rollback.as_ref()?;
                    (self.rollback_version(m)?, Phase::Rollback)
                } else {
                    m.forward.as_ref()?;
                    (&self.plan.target, Phase::Forward)
                };
                Some(Offer {
                    device: id.clone(),
                    version: version.version.clone(),
                    seq: version.seq,
                    phase,
                })
            })
            .collect()
    }

    /// The rollback version of a device's old version, once registered.
    fn rollback_version(&self, m: &Member) -> Option<&VersionRef> {
        self.rollback.as_ref()?.versions.get(&m.from_version)
    }

    /// One device as the rollout sees it, for the API.
    pub fn device(&self, device: &str) -> Option<DeviceView> {
        let m = self.members.get(device)?;
        Some(DeviceView {
            device: device.to_owned(),
            bucket: select::fraction(m.bucket),
            stage: self.device_stage(device),
            from_version: m.from_version.clone(),
            online: m.online,
            forward: m.forward.clone(),
            rollback: m.rollback.clone(),
            rollback_version: self.rollback_version(m).cloned(),
            needs_rollback: self.rollback.is_some() && m.needs_rollback(),
            gone: m.gone,
        })
    }

    /// A device's stage (0-based; fixed once offered, provisional before), `None` when it is
    /// not in the target or beyond the last stage's share.
    pub fn device_stage(&self, device: &str) -> Option<u32> {
        let m = self.members.get(device)?;
        m.stage.or_else(|| {
            self.cuts()
                .iter()
                .position(|&c| m.bucket < c)
                .map(|i| i as u32)
        })
    }

    /// The view for the API.
    pub fn status(&self) -> RolloutStatus {
        let cuts = self.cuts();
        let mut counts = vec![InstallCounts::default(); self.plan.stages.len()];
        let mut totals = InstallCounts::default();
        let mut rb_counts = InstallCounts::default();
        let mut rb_devices = 0;
        for m in self.members.values().filter(|m| !m.gone) {
            let stage = m
                .stage
                .map(|s| s as usize)
                .or_else(|| cuts.iter().position(|&c| m.bucket < c));
            if let Some(c) = stage.and_then(|s| counts.get_mut(s)) {
                c.targeted += 1;
                if let Some(t) = &m.forward {
                    c.add(t);
                }
            }
            if stage.is_some() || m.forward.is_some() {
                totals.targeted += 1;
            }
            if let Some(t) = &m.forward {
                totals.add(t);
            }
            if m.needs_rollback() && self.rollback.is_some() {
                rb_devices += 1;
                rb_counts.targeted += 1;
            }
            if let Some(t) = &m.rollback {
                rb_counts.add(t);
            }
        }
        let current = self.current() as usize;
        let stages = self
            .plan
            .stages
            .iter()
            .zip(counts)
            .enumerate()
            .map(|(i, (spec, counts))| {
                let run = self.stages.get(i);
                let state = match run {
                    None => StageState::Pending,
                    Some(r) if r.closed_ms.is_some() || i < current => StageState::Closed,
                    Some(_) => StageState::Open,
                };
                let full = run.and_then(|r| r.fully_offered_ms);
                StageStatus {
                    index: i as u32,
                    share: spec.share,
                    min_devices: spec.min_devices,
                    state,
                    cut: select::fraction(cuts.get(i).copied().unwrap_or(0)),
                    opened_ms: run.map(|r| r.opened_ms),
                    fully_offered_ms: full,
                    soak_until_ms: full.map(|f| f.saturating_add(spec.soak_ms)),
                    deadline_ms: full.map(|f| {
                        f.max(self.resumed_ms.unwrap_or(i64::MIN))
                            .saturating_add(spec.deadline_ms)
                    }),
                    closed_ms: run.and_then(|r| r.closed_ms),
                    counts,
                }
            })
            .collect();
        let gates = self.gates();
        let holding = match (&gates, self.state) {
            (Some(g), RolloutState::Running) if g.verdict != Verdict::Pass => {
                Some(g.reason.clone())
            }
            _ => None,
        };
        let rollback = self.rollback.as_ref().map(|rb| RollbackStatus {
            started_ms: rb.started_ms,
            completed_ms: rb.completed_ms,
            devices: rb_devices,
            versions: rb.versions.clone(),
            waiting_for_versions: rb
                .requested
                .iter()
                .filter(|v| !rb.versions.contains_key(*v))
                .cloned()
                .collect(),
            counts: rb_counts,
        });
        RolloutStatus {
            id: self.plan.id.clone(),
            model_id: self.plan.model_id.clone(),
            target: self.plan.target.clone(),
            replaces: self.plan.replaces.clone(),
            state: self.state,
            stage: self.current(),
            stages,
            totals,
            gates,
            holding,
            paused: self.pause.clone(),
            rollback,
            reports: self.reports.clone(),
            quality_windows: self.quality.paired_windows,
            created_ms: self.created_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::plan::{HOUR_MS, HourWindow, Stage};

    fn info(id: &str, version: &str, online: bool) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            hw: Some("nrf52840".into()),
            tags: BTreeMap::new(),
            model_id: Some("kws".into()),
            model_version: Some(version.into()),
            online,
        }
    }

    fn fleet(n: usize) -> Vec<DeviceInfo> {
        (0..n)
            .map(|i| info(&format!("d{i:03}"), "v1", true))
            .collect()
    }

    fn plan(stages: &[(f64, u32)]) -> RolloutPlan {
        let mut p = RolloutPlan::new(
            "r",
            "kws",
            VersionRef::new("v2", 5),
            vec![VersionRef::new("v1", 1), VersionRef::new("v1b", 2)],
            "nrf52840",
        );
        p.stages = stages
            .iter()
            .map(|&(share, min_devices)| Stage {
                share,
                min_devices,
                soak_ms: HOUR_MS,
                deadline_ms: 2 * HOUR_MS,
            })
            .collect();
        p.quality.required = false;
        p
    }

    fn offered(step: &Step, phase: Phase) -> Vec<String> {
        step.actions
            .iter()
            .filter_map(|a| match a {
                Action::Offer(o) if o.phase == phase => Some(o.device.clone()),
                _ => None,
            })
            .collect()
    }

    fn rep(device: &str, boot: u32, seq: u32, manifest: u32, state: u8) -> ProgressReport {
        ProgressReport {
            device: device.into(),
            boot,
            seq,
            manifest_seq: manifest,
            state,
            bytes: 0,
            error: if state == ota_state::REJECTED { 4 } else { 0 },
        }
    }

    fn confirm_all(r: &mut Rollout, devices: &[String], manifest: u32, now: i64) {
        for d in devices {
            assert_eq!(
                r.report(&rep(d, 7, 0, manifest, ota_state::CONFIRMED), now),
                ReportOutcome::Applied
            );
        }
    }

    #[test]
    fn latecomers_join_by_the_same_rule_and_stages_never_move() {
        let (mut r, step) =
            Rollout::start(plan(&[(0.1, 0), (1.0, 0)]), &fleet(200), "a", 0).expect("plan");
        let first = offered(&step, Phase::Forward);
        assert!((8..40).contains(&first.len()), "{}", first.len());
        for d in &first {
            assert_eq!(r.device_stage(d), Some(0));
        }
        // 100 devices join; those below the open stage's cut get the offer at the next tick.
        let late: Vec<DeviceInfo> = (0..100)
            .map(|i| info(&format!("late{i}"), "v1b", true))
            .collect();
        for d in &late {
            assert!(r.observe_device(d, 10));
        }
        assert!(!r.observe_device(&info("other", "v0", true), 10));
        let step = r.tick(20);
        let joined = offered(&step, Phase::Forward);
        assert!(!joined.is_empty() && joined.iter().all(|d| d.starts_with("late")));
        for d in &joined {
            assert_eq!(r.device_stage(d), Some(0));
            assert_eq!(r.device(d).map(|v| v.from_version), Some("v1b".into()));
        }
        // A device not offered yet leaves the target when it stops matching.
        let waiting = late
            .iter()
            .find(|d| !joined.contains(&d.id))
            .expect("a later-stage device");
        assert_eq!(r.device_stage(&waiting.id), Some(1));
        let mut moved = waiting.clone();
        moved.model_version = Some("v0".into());
        assert!(!r.observe_device(&moved, 30));
        assert!(r.device(&waiting.id).is_none());
        // Advancing never moves an offered device.
        let all: Vec<String> = first.iter().chain(&joined).cloned().collect();
        confirm_all(&mut r, &all, 5, 40);
        r.tick(HOUR_MS + 100);
        assert_eq!(r.status().stage, 1, "{:?}", r.gates().map(|g| g.reason));
        // The default cap is 120 offers a minute.
        r.tick(HOUR_MS + MINUTE_MS);
        r.tick(HOUR_MS + 2 * MINUTE_MS);
        for d in &all {
            assert_eq!(r.device_stage(d), Some(0));
        }
        assert_eq!(r.status().stages[1].counts.offered, 299 - all.len() as u64);
    }

    #[test]
    fn offline_devices_are_offered_last_and_time_out_only_online() {
        let mut devices = fleet(30);
        for d in devices.iter_mut().take(10) {
            d.online = false;
        }
        let mut p = plan(&[(1.0, 0)]);
        p.offers_per_minute = 25;
        p.install.report_timeout_ms = 10 * MINUTE_MS;
        let (mut r, step) = Rollout::start(p, &devices, "a", 0).expect("plan");
        let first = offered(&step, Phase::Forward);
        assert_eq!(first.len(), 25);
        assert_eq!(first.iter().filter(|d| d.as_str() < "d010").count(), 5);
        assert_eq!(r.status().stages[0].fully_offered_ms, None);
        let step = r.tick(MINUTE_MS);
        assert_eq!(offered(&step, Phase::Forward).len(), 5);
        assert_eq!(r.status().stages[0].fully_offered_ms, Some(MINUTE_MS));
        let s = r.status().totals;
        assert_eq!(
            (s.targeted, s.offered, s.pending, s.unreached),
            (30, 30, 30, 10)
        );
        // A device returning starts its clock then: it is not timed out with the others.
        r.observe_device(&info("d000", "v1", true), 5 * MINUTE_MS);
        assert!(
            r.device("d000")
                .is_some_and(|d| d.forward.is_some_and(|t| t.reached))
        );
        // Twenty online devices stay silent past the timeout; the offline ones do not count,
        // and 20 of 20 timed out is beyond the timeout limit: abort.
        let step = r.tick(MINUTE_MS + 10 * MINUTE_MS);
        assert_eq!(r.status().totals.timed_out, 20);
        assert_eq!(step.audit[0].cause, Cause::InstallGate);
        assert_eq!(r.state(), RolloutState::RollingBack);
        // The silent ones may be installing, d000 too; the nine offline ones cannot have the
        // offer, and one returning now finds it withdrawn.
        assert_eq!(r.status().rollback.map(|rb| rb.devices), Some(21));
        r.observe_device(&info("d001", "v1", true), 12 * MINUTE_MS);
        assert!(r.device("d001").is_some_and(|d| !d.needs_rollback));
        assert_eq!(r.status().rollback.map(|rb| rb.devices), Some(21));
    }

    #[test]
    fn the_rate_cap_and_maintenance_windows_pace_offers() {
        let mut p = plan(&[(1.0, 0)]);
        p.offers_per_minute = 7;
        p.maintenance = vec![HourWindow {
            start_hour: 2,
            end_hour: 3,
        }];
        let (mut r, step) = Rollout::start(p, &fleet(20), "a", 0).expect("plan");
        assert!(
            offered(&step, Phase::Forward).is_empty(),
            "00:00 is outside the window"
        );
        assert!(offered(&r.tick(HOUR_MS), Phase::Forward).is_empty());
        let at = 2 * HOUR_MS;
        assert_eq!(offered(&r.tick(at), Phase::Forward).len(), 7);
        assert_eq!(offered(&r.tick(at + 30_000), Phase::Forward).len(), 0);
        assert_eq!(offered(&r.tick(at + MINUTE_MS), Phase::Forward).len(), 7);
        assert_eq!(
            offered(&r.tick(at + 2 * MINUTE_MS), Phase::Forward).len(),
            6
        );
        assert_eq!(
            r.status().stages[0].fully_offered_ms,
            Some(at + 2 * MINUTE_MS)
        );
    }

    #[test]
    fn each_old_version_rolls_back_to_its_own_rollback_version() {
        let devices: Vec<DeviceInfo> = (0..20)
            .map(|i| {
                info(
                    &format!("d{i:02}"),
                    if i % 2 == 0 { "v1" } else { "v1b" },
                    true,
                )
            })
            .collect();
        let (mut r, step) = Rollout::start(plan(&[(1.0, 0)]), &devices, "a", 0).expect("plan");
        let all = offered(&step, Phase::Forward);
        assert_eq!(all.len(), 20);
        confirm_all(&mut r, &all[..18], 5, 10);
        // One refused the offer: it keeps v1 or v1b and only loses the retained offer.
        r.report(&rep(&all[18], 1, 0, 5, ota_state::REJECTED), 10);
        let refused_v1 = r.device(&all[18]).is_some_and(|d| d.from_version == "v1");
        let (n_v1, n_v1b) = if refused_v1 { (9, 10) } else { (10, 9) };
        let step = r.abort("ops", "bad", 20).expect("abort");
        let withdrawn = step
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Withdraw { .. }))
            .count();
        assert_eq!(withdrawn, 20);
        let needed: Vec<&Action> = step
            .actions
            .iter()
            .filter(|a| matches!(a, Action::RollbackNeeded { .. }))
            .collect();
        assert_eq!(needed.len(), 2);
        assert!(r.offers_in_force().is_empty());
        assert_eq!(
            r.rollback_version_ready("v1", VersionRef::new("v1-rb", 5), 30),
            Err(OpError::Invalid(
                "rollback seq 5 must be above the target's 5 or devices refuse it".into()
            ))
        );
        let step = r
            .rollback_version_ready("v1", VersionRef::new("v1-rb", 6), 30)
            .expect("ready");
        let v1 = offered(&step, Phase::Rollback);
        assert_eq!(
            v1.len(),
            n_v1,
            "the v1 half but the refusal, the silent one included"
        );
        assert!(
            v1.iter()
                .all(|d| r.device(d).is_some_and(|v| v.from_version == "v1"))
        );
        let step = r
            .rollback_version_ready("v1b", VersionRef::new("v1b-rb", 7), 40)
            .expect("ready");
        let v1b = offered(&step, Phase::Rollback);
        assert_eq!(v1b.len(), n_v1b);
        let in_force = r.offers_in_force();
        assert_eq!(in_force.len(), 19);
        for o in &in_force {
            let want = if v1.contains(&o.device) {
                ("v1-rb", 6)
            } else {
                ("v1b-rb", 7)
            };
            assert_eq!(
                (o.phase, o.version.as_str(), o.seq),
                (Phase::Rollback, want.0, want.1)
            );
        }
        // Finishing every rollback install completes the rollback.
        confirm_all(&mut r, &v1, 6, 50);
        assert_eq!(r.tick(60).audit.len(), 0);
        confirm_all(&mut r, &v1b, 7, 70);
        let step = r.tick(80);
        assert_eq!(step.audit.len(), 1);
        assert_eq!(step.audit[0].event, AuditEvent::RollbackCompleted);
        assert_eq!(r.state(), RolloutState::Aborted);
        let rb = r.status().rollback.expect("rollback");
        assert_eq!((rb.devices, rb.counts.confirmed), (19, 19));
        assert!(rb.waiting_for_versions.is_empty());
    }

    #[test]
    fn a_device_reporting_the_new_version_after_the_abort_is_rolled_back_too() {
        let (mut r, step) = Rollout::start(plan(&[(1.0, 0)]), &fleet(12), "a", 0).expect("plan");
        let all = offered(&step, Phase::Forward);
        r.report(&rep(&all[0], 1, 0, 5, ota_state::FAILED), 5);
        r.abort("ops", "bad", 10).expect("abort");
        let step = r
            .rollback_version_ready("v1", VersionRef::new("v1-rb", 6), 20)
            .expect("ready");
        assert_eq!(offered(&step, Phase::Rollback).len(), 11);
        confirm_all(&mut r, &all[1..], 6, 30);
        let step = r.tick(40);
        assert_eq!(step.audit[0].event, AuditEvent::RollbackCompleted);
        // The failed device had retried before the offer was withdrawn, and succeeded.
        r.report(&rep(&all[0], 2, 0, 5, ota_state::CONFIRMED), 50);
        let step = r.tick(60);
        assert_eq!(offered(&step, Phase::Rollback), vec![all[0].clone()]);
        assert_eq!(step.audit[0].event, AuditEvent::RollbackStarted);
        assert_eq!(r.state(), RolloutState::RollingBack);
    }

    #[test]
    fn a_device_seen_running_the_new_version_is_rolled_back_whatever_it_reported() {
        let (mut r, step) = Rollout::start(plan(&[(1.0, 0)]), &fleet(12), "a", 0).expect("plan");
        let all = offered(&step, Phase::Forward);
        // Its newest report says the install failed, but its hello says it runs v2.
        r.report(&rep(&all[0], 1, 0, 5, ota_state::FAILED), 5);
        r.observe_device(&info(&all[0], "v2", true), 6);
        r.report(&rep(&all[1], 1, 0, 5, ota_state::FAILED), 5);
        r.abort("ops", "bad", 10).expect("abort");
        let step = r
            .rollback_version_ready("v1", VersionRef::new("v1-rb", 6), 20)
            .expect("ready");
        let rolled = offered(&step, Phase::Rollback);
        assert!(rolled.contains(&all[0]) && !rolled.contains(&all[1]));
        assert_eq!(rolled.len(), 11);
    }

    #[test]
    fn reports_are_attributed_by_manifest_and_counted() {
        let (mut r, step) = Rollout::start(plan(&[(1.0, 0)]), &fleet(10), "a", 0).expect("plan");
        let d = &offered(&step, Phase::Forward)[0];
        assert_eq!(
            r.report(&rep("nobody", 1, 0, 5, 1), 1),
            ReportOutcome::UnknownDevice
        );
        assert_eq!(
            r.report(&rep(d, 1, 0, 4, 1), 1),
            ReportOutcome::OtherManifest
        );
        assert_eq!(r.report(&rep(d, 1, 1, 5, 1), 1), ReportOutcome::Applied);
        assert_eq!(r.report(&rep(d, 1, 1, 5, 2), 1), ReportOutcome::Stale);
        // A device that cannot read the offer says manifest 0.
        assert_eq!(
            r.report(&rep(d, 1, 2, 0, ota_state::REJECTED), 1),
            ReportOutcome::Applied
        );
        assert_eq!(
            r.report(&rep(d, 1, 3, 0, ota_state::ACCEPTED), 1),
            ReportOutcome::OtherManifest
        );
        let c = r.status().reports;
        assert_eq!(
            (c.applied, c.stale, c.unknown_device, c.other_manifest),
            (2, 1, 1, 2)
        );
        assert_eq!(r.status().totals.rejected, 1);
        // Forgotten devices leave the counts and the offers.
        r.forget_device(d);
        assert_eq!(r.status().totals.offered, 9);
        assert_eq!(r.offers_in_force().len(), 9);
        assert_eq!(
            r.report(&rep(d, 1, 9, 5, 1), 1),
            ReportOutcome::UnknownDevice
        );
    }

    #[test]
    fn a_completed_rollout_still_offers_latecomers() {
        let (mut r, step) = Rollout::start(plan(&[(1.0, 0)]), &fleet(12), "a", 0).expect("plan");
        confirm_all(&mut r, &offered(&step, Phase::Forward), 5, 10);
        r.tick(HOUR_MS);
        assert_eq!(r.state(), RolloutState::Completed);
        assert!(r.advance_now("a", HOUR_MS).is_err());
        assert!(r.observe_device(&info("new", "v1", false), HOUR_MS + 1));
        assert_eq!(
            offered(&r.tick(HOUR_MS + 2), Phase::Forward),
            vec!["new".to_owned()]
        );
    }

    #[test]
    fn operators_need_the_right_state_and_are_recorded() {
        let (mut r, _) =
            Rollout::start(plan(&[(0.5, 0), (1.0, 0)]), &fleet(20), "a", 0).expect("plan");
        assert_eq!(
            r.resume("bob", 1),
            Err(OpError::State {
                op: "resume",
                state: "running"
            })
        );
        let step = r.pause("bob", "checking dashboards", 2).expect("pause");
        assert_eq!(step.audit[0].cause.to_string(), "operator:bob");
        assert_eq!(step.audit[0].note, "checking dashboards");
        assert_eq!(r.status().paused.map(|p| p.at_ms), Some(2));
        assert!(offered(&r.tick(MINUTE_MS), Phase::Forward).is_empty());
        let step = r.advance_now("carol", 3).expect("advance");
        let events: Vec<_> = step.audit.iter().map(|a| (a.event, a.stage)).collect();
        assert_eq!(
            events,
            [
                (AuditEvent::Resumed, Some(0)),
                (AuditEvent::Advanced, Some(0)),
                (AuditEvent::StageOpened, Some(1))
            ]
        );
        assert!(step.audit[1].gates.is_some(), "gate values at the time");
        assert_eq!(r.state(), RolloutState::Running);
        assert_eq!(r.offers_in_force().len(), 20);
    }
}
