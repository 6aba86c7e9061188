//! The service around the rollout engine ([`crate::rollout`]): it keeps every [`Rollout`] in
//! the store, feeds it devices, progress reports, quality observations and time, and carries
//! out its [`Action`]s (signed offers and withdrawals through an [`OfferSink`], rollback
//! versions registered with [`Ota::register`]).
//!
//! # Order of effects
//!
//! Every engine call that returns a [`Step`] is followed, under one mutex, by: persisting the
//! rollout's whole state and the step's audit records in one transaction
//! ([`Store::save_rollout`]), and only then carrying out the step's actions. When the write
//! fails, the rollout goes back to its state before the step and nothing is published, so the
//! broker never holds an offer the database does not know about; the next tick tries again.
//!
//! # One live rollout per model
//!
//! Offers are retained per device (`tf/v1/{device}/ota/offer`), not per rollout, so only the
//! newest rollout of a model is *live*: fed, ticked and re-published after a restart. Creating
//! a rollout is refused while the model's live one is active (running, paused or rolling
//! back); once it is created, the older ones (completed or aborted) are *superseded*: their
//! status and audit stay readable, operators can no longer change them, and their offers are
//! no longer re-published (the new rollout's offers replace them).
//!
//! # Restart
//!
//! [`Rollouts::open`] reads every stored rollout and re-publishes the offers in force of each
//! live one ([`Rollout::offers_in_force`]): the embedded broker keeps no retained message
//! across a restart. Rollback versions asked for but not registered yet (a crash in between)
//! are registered then; a rollback version registered before the crash is found again by its
//! artifact and creator, so a restart never registers two.
//!
//! The engine and the store are synchronous, and so is this service: async callers use
//! `spawn_blocking`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tinyfleet_store::{DeviceQuery, RolloutRow, Store, StoreError, cohort_key};

use crate::rollout::{
    Action, AuditRecord, DeviceInfo, HourWindow, InstallGate, OpError, Phase, PlanError,
    ProgressReport, QualityGate, QualityObservation, Rollout, RolloutPlan, RolloutState,
    RolloutStatus, Stage, Step, TargetFilter, VersionRef,
};
use crate::{Ota, OtaError, Upload};

/// Where offers go: a retained MQTT publish on `tf/v1/{device}/ota/offer`; `None` = withdraw
/// (an empty retained message).
pub trait OfferSink: Send + Sync {
    fn publish(&self, device: &str, offer: Option<Vec<u8>>);
}

/// Why a rollout call failed. The API maps `NotFound` to 404, `Conflict` to 409, `Invalid`
/// to 400, the rest to 500.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    NotFound(String),
    /// The rollout's state does not allow the call, or another rollout is in the way.
    #[error("{0}")]
    Conflict(String),
    /// A bad request or plan; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<OtaError> for ServiceError {
    fn from(e: OtaError) -> Self {
        match e {
            OtaError::NotFound(m) => Self::NotFound(m),
            OtaError::Conflict(m) => Self::Conflict(m),
            OtaError::Invalid(m) => Self::Invalid(m),
            OtaError::Store(e) => Self::Store(e),
            e @ OtaError::Io(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<OpError> for ServiceError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::State { .. } | OpError::Conflict(_) => Self::Conflict(e.to_string()),
            OpError::Invalid(m) => Self::Invalid(m),
        }
    }
}

impl From<PlanError> for ServiceError {
    fn from(e: PlanError) -> Self {
        Self::Invalid(format!("plan: {e}"))
    }
}

/// A request to start a rollout (the API's body). Everything but `model_id` and `version`
/// is optional; a missing plan field takes the plan's default ([`RolloutPlan::new`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub model_id: String,
    /// The version rolled out (registered); it replaces every registered version of the model
    /// with a lower seq.
    pub version: String,
    /// Default: `{model}-{version}-{6 hex}`.
    #[serde(default)]
    pub id: Option<String>,
    /// Default: the version's hardware, no tag.
    #[serde(default)]
    pub filter: Option<TargetFilter>,
    #[serde(default)]
    pub stages: Option<Vec<Stage>>,
    #[serde(default)]
    pub install: Option<InstallGate>,
    #[serde(default)]
    pub quality: Option<QualityGate>,
    #[serde(default)]
    pub offers_per_minute: Option<u32>,
    #[serde(default)]
    pub maintenance: Option<Vec<HourWindow>>,
}

impl CreateRollout {
    /// A request with every plan field at its default.
    pub fn new(model_id: impl Into<String>, version: impl Into<String>) -> Self {
        RolloutPolicy::default().request(model_id, version)
    }
}

/// Continuous delivery: the plan fields a rollout started by [`Rollouts::on_version_registered`]
/// takes (each optional, defaults otherwise).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    #[serde(default)]
    pub filter: Option<TargetFilter>,
    #[serde(default)]
    pub stages: Option<Vec<Stage>>,
    #[serde(default)]
    pub install: Option<InstallGate>,
    #[serde(default)]
    pub quality: Option<QualityGate>,
    #[serde(default)]
    pub offers_per_minute: Option<u32>,
    #[serde(default)]
    pub maintenance: Option<Vec<HourWindow>>,
}

impl RolloutPolicy {
    /// The request this policy makes for a newly registered version.
    pub fn request(
        &self,
        model_id: impl Into<String>,
        version: impl Into<String>,
    ) -> CreateRollout {
        CreateRollout {
            model_id: model_id.into(),
            version: version.into(),
            id: None,
            filter: self.filter.clone(),
            stages: self.stages.clone(),
            install: self.install.clone(),
            quality: self.quality.clone(),
            offers_per_minute: self.offers_per_minute,
            maintenance: self.maintenance.clone(),
        }
    }
}

/// One audit record with its id (pass the last id as `after` for the next page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
}

/// Who a policy-started rollout is created by.
pub const POLICY_WHO: &str = "policy";

fn policy_key(model_id: &str) -> String {
    format!("rollout_policy/{model_id}")
}

/// What the service knows about a device, for the engine: registry tags and revocation,
/// hardware, model and presence from the device state. `None` for unknown or revoked devices.
pub fn device_info(store: &Store, id: &str) -> Result<Option<DeviceInfo>, StoreError> {
    let Some(record) = store.registry().get(id) else {
        return Ok(None);
    };
    if record.revoked_ms.is_some() {
        return Ok(None);
    }
    let state = store.device_state(id)?.unwrap_or_default();
    Ok(Some(DeviceInfo {
        id: id.to_owned(),
        hw: state.hw,
        tags: record.tags,
        model_id: state.model_id,
        model_version: state.model_version,
        online: state.presence.online,
    }))
}

struct Entry {
    rollout: Rollout,
    /// A newer rollout of the same model exists.
    superseded: bool,
}

impl Entry {
    fn live(&self) -> bool {
        !self.superseded
    }

    fn active(&self) -> bool {
        matches!(
            self.rollout.state(),
            RolloutState::Running | RolloutState::Paused | RolloutState::RollingBack
        )
    }
}

/// Every rollout, oldest first.
#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
}

impl Inner {
    fn index(&self, id: &str) -> Result<usize, ServiceError> {
        self.entries
            .iter()
            .position(|e| e.rollout.id() == id)
            .ok_or_else(|| ServiceError::NotFound(format!("no rollout {id}")))
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rollouts of the fleet: see the [module](self) documentation.
pub struct Rollouts {
    store: Store,
    ota: Arc<Ota>,
    sink: Arc<dyn OfferSink>,
    inner: Mutex<Inner>,
    offer_failures: AtomicU64,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts")
            .field("store", &self.store)
            .field("rollouts", &lock(&self.inner).entries.len())
            .finish_non_exhaustive()
    }
}

/// Signed offers of one carry-out, by (version, base image).
type OfferCache = HashMap<(String, Option<String>), Option<Vec<u8>>>;

impl Rollouts {
    /// Loads every stored rollout and re-publishes the offers in force of the live ones.
    pub fn open(
        store: Store,
        ota: Arc<Ota>,
        sink: Arc<dyn OfferSink>,
        now_ms: i64,
    ) -> Result<Self, ServiceError> {
        let mut entries = Vec::new();
        for row in store.rollouts()?.into_iter().rev() {
            let rollout: Rollout = serde_json::from_str(&row.body).map_err(|e| {
                ServiceError::Internal(format!("stored rollout {} is unreadable: {e}", row.id))
            })?;
            entries.push(Entry {
                rollout,
                superseded: false,
            });
        }
        for i in 0..entries.len() {
            let model = entries[i].rollout.plan().model_id.clone();
            entries[i].superseded = entries[i + 1..]
                .iter()
                .any(|e| e.rollout.plan().model_id == model);
        }
        let this = Self {
            store,
            ota,
            sink,
            inner: Mutex::new(Inner { entries }),
            offer_failures: AtomicU64::new(0),
        };
        {
            let mut inner = lock(&this.inner);
            for entry in inner.entries.iter_mut().filter(|e| e.live()) {
                let offers: Vec<Action> = entry
                    .rollout
                    .offers_in_force()
                    .into_iter()
                    .map(Action::Offer)
                    .collect();
                tracing::info!(rollout = %entry.rollout.id(), state = entry.rollout.state().as_str(), offers = offers.len(), "rollout loaded; offers re-published");
                this.carry_out(&entry.rollout, &offers, now_ms);
                this.ensure_rollback_versions(entry, now_ms);
            }
        }
        Ok(this)
    }

    /// Offers that could not be built or signed since start (each is logged).
    pub fn offer_failures(&self) -> u64 {
        self.offer_failures.load(Ordering::Relaxed)
    }

    /// Starts a rollout: the target version and what it replaces come from the registry, the
    /// devices from the store.
    pub fn create(
        &self,
        req: CreateRollout,
        who: &str,
        now_ms: i64,
    ) -> Result<RolloutStatus, ServiceError> {
        let target = self.ota.version(&req.model_id, &req.version)?;
        let replaces: Vec<VersionRef> = self
            .ota
            .versions(&req.model_id)?
            .into_iter()
            .filter(|v| v.seq < target.seq)
            .map(|v| VersionRef::new(v.model_version, v.seq))
            .collect();
        if replaces.is_empty() {
            return Err(ServiceError::Invalid(format!(
                "{}@{} has the lowest seq of the model: there is nothing to replace (or roll back to)",
                req.model_id, req.version
            )));
        }
        let filter = req.filter.unwrap_or_else(|| TargetFilter {
            hw: target.hw.clone(),
            tag: None,
        });
        if filter.hw != target.hw {
            return Err(ServiceError::Invalid(format!(
                "filter.hw {:?}: {}@{} is built for {:?}",
                filter.hw, req.model_id, req.version, target.hw
            )));
        }
        let id = match req.id {
            Some(id) => id,
            None => {
                let mut prefix = format!("{}-{}", req.model_id, req.version);
                prefix.truncate(57);
                format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff)
            }
        };
        let mut plan = RolloutPlan::new(
            id,
            req.model_id,
            VersionRef::new(target.model_version.clone(), target.seq),
            replaces,
            filter.hw.clone(),
        );
        plan.filter = filter;
        if let Some(s) = req.stages {
            plan.stages = s;
        }
        if let Some(g) = req.install {
            plan.install = g;
        }
        if let Some(g) = req.quality {
            plan.quality = g;
        }
        if let Some(n) = req.offers_per_minute {
            plan.offers_per_minute = n;
        }
        if let Some(m) = req.maintenance {
            plan.maintenance = m;
        }
        plan.validate()?;

        let mut inner = lock(&self.inner);
        if inner.entries.iter().any(|e| e.rollout.id() == plan.id) {
            return Err(ServiceError::Conflict(format!(
                "a rollout {} exists already",
                plan.id
            )));
        }
        if let Some(e) = inner
            .entries
            .iter()
            .find(|e| e.live() && e.active() && e.rollout.plan().model_id == plan.model_id)
        {
            return Err(ServiceError::Conflict(format!(
                "rollout {} of {} is {}: finish or abort it first",
                e.rollout.id(),
                plan.model_id,
                e.rollout.state().as_str()
            )));
        }
        let fleet = self.fleet(&plan)?;
        let (rollout, step) = Rollout::start(plan, &fleet, who, now_ms)?;
        self.persist(&rollout, &step.audit, now_ms)?;
        let model = rollout.plan().model_id.clone();
        for e in inner
            .entries
            .iter_mut()
            .filter(|e| e.rollout.plan().model_id == model)
        {
            e.superseded = true;
        }
        tracing::info!(rollout = %rollout.id(), by = %who, devices = fleet.len(), "rollout created");
        inner.entries.push(Entry {
            rollout,
            superseded: false,
        });
        let entry = inner
            .entries
            .last_mut()
            .ok_or_else(|| ServiceError::Internal("rollout vanished".into()))?;
        if self.carry_out(&entry.rollout, &step.actions, now_ms) {
            self.ensure_rollback_versions(entry, now_ms);
        }
        Ok(entry.rollout.status())
    }

    /// Devices that may belong to the plan's target: those running a replaced version on its
    /// hardware (the engine applies the rest of the filter).
    fn fleet(&self, plan: &RolloutPlan) -> Result<Vec<DeviceInfo>, StoreError> {
        let mut fleet = Vec::new();
        for v in &plan.replaces {
            let mut q = DeviceQuery {
                cohort: Some(cohort_key(&plan.model_id, &v.version, &plan.filter.hw)),
                limit: 1000,
                ..DeviceQuery::default()
            };
            loop {
                let page = self.store.list_devices(&q)?;
                for d in page.devices.iter().filter(|d| !d.revoked) {
                    fleet.extend(device_info(&self.store, &d.id)?);
                }
                match page.next {
                    Some(next) => q.after = Some(next),
                    None => break,
                }
            }
        }
        Ok(fleet)
    }

    /// Every rollout, newest first.
    pub fn list(&self) -> Vec<RolloutStatus> {
        lock(&self.inner)
            .entries
            .iter()
            .rev()
            .map(|e| e.rollout.status())
            .collect()
    }

    pub fn status(&self, id: &str) -> Result<RolloutStatus, ServiceError> {
        let inner = lock(&self.inner);
        Ok(inner.entries[inner.index(id)?].rollout.status())
    }

    /// Whether a newer rollout of the same model replaced this one.
    pub fn superseded(&self, id: &str) -> Result<bool, ServiceError> {
        let inner = lock(&self.inner);
        Ok(inner.entries[inner.index(id)?].superseded)
    }

    /// A rollout's audit records with an id above `after`, oldest first.
    pub fn audit(&self, id: &str, after: i64, limit: u32) -> Result<Vec<AuditEntry>, ServiceError> {
        lock(&self.inner).index(id)?;
        self.store
            .rollout_audit(id, after, limit)?
            .into_iter()
            .map(|(id, json)| {
                serde_json::from_str(&json)
                    .map(|record| AuditEntry { id, record })
                    .map_err(|e| ServiceError::Internal(format!("audit record {id}: {e}")))
            })
            .collect()
    }

    pub fn pause(
        &self,
        id: &str,
        who: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<RolloutStatus, ServiceError> {
        self.operate(id, now_ms, |r| r.pause(who, reason, now_ms))
    }

    pub fn resume(&self, id: &str, who: &str, now_ms: i64) -> Result<RolloutStatus, ServiceError> {
        self.operate(id, now_ms, |r| r.resume(who, now_ms))
    }

    /// Opens the next stage (or completes the last) now, whatever the gates say.
    pub fn advance(&self, id: &str, who: &str, now_ms: i64) -> Result<RolloutStatus, ServiceError> {
        self.operate(id, now_ms, |r| r.advance_now(who, now_ms))
    }

    /// Aborts and rolls back.
    pub fn abort(
        &self,
        id: &str,
        who: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<RolloutStatus, ServiceError> {
        self.operate(id, now_ms, |r| r.abort(who, reason, now_ms))
    }

    fn operate(
        &self,
        id: &str,
        now_ms: i64,
        op: impl FnOnce(&mut Rollout) -> Result<Step, OpError>,
    ) -> Result<RolloutStatus, ServiceError> {
        let mut inner = lock(&self.inner);
        let i = inner.index(id)?;
        let entry = &mut inner.entries[i];
        if entry.superseded {
            return Err(ServiceError::Conflict(format!(
                "rollout {id} was superseded by a newer rollout of {}",
                entry.rollout.plan().model_id
            )));
        }
        let backup = entry.rollout.clone();
        match op(&mut entry.rollout) {
            Ok(step) => self.commit(entry, backup, step, now_ms)?,
            Err(e) => {
                entry.rollout = backup;
                return Err(e.into());
            }
        }
        Ok(entry.rollout.status())
    }

    /// Verified progress reports (`ota/prog`). Each goes to the live rollouts that offered the
    /// device the manifest it reports on (or manifest 0: an offer it could not read).
    ///
    /// Idempotent: a report a rollout has applied already (the same `(boot, seq)`, delivered
    /// once by the in-process feed and once by the store's change feed, or again after a
    /// restart) is skipped, so it changes no count, no state and writes nothing; older ones are
    /// ignored by the engine. Returns whether every rollout it changed was saved (when not, that
    /// rollout is back where it was before the call and the caller may deliver the reports
    /// again).
    pub fn on_progress(&self, reports: &[ProgressReport], now_ms: i64) -> bool {
        let mut inner = lock(&self.inner);
        let mut saved = true;
        for entry in inner.entries.iter_mut().filter(|e| e.live()) {
            // Taken before the first report applied, so a failed save undoes the reports too
            // and delivering them again applies them.
            let mut backup = None;
            for r in reports {
                if entry.rollout.applied(r) {
                    continue;
                }
                let relevant = entry.rollout.device(&r.device).is_some_and(|d| {
                    r.manifest_seq == 0
                        || [d.forward, d.rollback]
                            .iter()
                            .flatten()
                            .any(|t| t.seq == r.manifest_seq)
                });
                if relevant {
                    backup.get_or_insert_with(|| entry.rollout.clone());
                    entry.rollout.report(r, now_ms);
                }
            }
            if let Some(backup) = backup {
                let step = entry.rollout.tick(now_ms);
                if let Err(e) = self.commit(entry, backup, step, now_ms) {
                    tracing::error!(rollout = %entry.rollout.id(), error = %e, "cannot save the rollout; its reports are undone");
                    saved = false;
                }
            }
        }
        saved
    }

    /// Devices whose registry entry, presence or hello changed: each is read again from the
    /// store and shown to every live rollout (unknown or revoked devices are forgotten). A
    /// device that shows nothing new to a rollout (the same change delivered twice) leaves it
    /// untouched and unsaved. Returns whether every device was read and every rollout it
    /// changed was saved (when not, the caller may deliver the ids again).
    pub fn on_devices_changed(&self, ids: &[String], now_ms: i64) -> bool {
        let mut saved = true;
        let mut infos = Vec::with_capacity(ids.len());
        for id in ids {
            match device_info(&self.store, id) {
                Ok(info) => infos.push((id, info)),
                Err(e) => {
                    saved = false;
                    tracing::warn!(device = %id, error = %e, "cannot read device for rollouts")
                }
            }
        }
        let mut inner = lock(&self.inner);
        for entry in inner.entries.iter_mut().filter(|e| e.live()) {
            let mut touched = false;
            for (id, info) in &infos {
                match info {
                    Some(d) => touched |= entry.rollout.observe_device_changed(d, now_ms).1,
                    None if entry.rollout.device(id).is_some() => {
                        entry.rollout.forget_device(id);
                        touched = true;
                    }
                    None => {}
                }
            }
            if touched {
                saved &= self.tick_entry(entry, now_ms, true);
            }
        }
        saved
    }

    /// All device observations of one closed window.
    pub fn on_window(&self, obs: &[QualityObservation], now_ms: i64) {
        let mut inner = lock(&self.inner);
        for entry in inner.entries.iter_mut().filter(|e| e.live()) {
            if !matches!(
                entry.rollout.state(),
                RolloutState::Running | RolloutState::Paused
            ) {
                continue;
            }
            let intake = entry.rollout.observe_quality(obs, now_ms);
            let touched = intake.used > 0 || intake.paired_windows + intake.unpaired_windows > 0;
            self.tick_entry(entry, now_ms, touched);
        }
    }

    /// Time passes: every live rollout ticks (call every few seconds).
    pub fn tick(&self, now_ms: i64) {
        let mut inner = lock(&self.inner);
        for entry in inner.entries.iter_mut().filter(|e| e.live()) {
            self.tick_entry(entry, now_ms, false);
            if matches!(
                entry.rollout.state(),
                RolloutState::RollingBack | RolloutState::Aborted
            ) {
                self.ensure_rollback_versions(entry, now_ms);
            }
        }
    }

    /// Ticks one rollout and commits the step; `dirty`: its state changed before the tick
    /// (reports, devices, observations), so it is saved even when the step is empty.
    /// Returns whether the rollout was saved (or needed no saving).
    fn tick_entry(&self, entry: &mut Entry, now_ms: i64, dirty: bool) -> bool {
        let backup = entry.rollout.clone();
        let step = entry.rollout.tick(now_ms);
        if step.is_empty() && !dirty {
            return true;
        }
        if let Err(e) = self.commit(entry, backup, step, now_ms) {
            tracing::error!(rollout = %entry.rollout.id(), error = %e, "cannot save the rollout; its step is undone and retried");
            return false;
        }
        true
    }

    /// Persists the rollout and the step's audit, then carries out the actions. When the
    /// write fails, the rollout goes back to `backup` and nothing is carried out.
    fn commit(
        &self,
        entry: &mut Entry,
        backup: Rollout,
        step: Step,
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        if let Err(e) = self.persist(&entry.rollout, &step.audit, now_ms) {
            entry.rollout = backup;
            return Err(e);
        }
        for a in &step.audit {
            tracing::info!(rollout = %a.rollout, event = ?a.event, stage = ?a.stage, cause = %a.cause, note = %a.note, "rollout");
        }
        if self.carry_out(&entry.rollout, &step.actions, now_ms) {
            self.ensure_rollback_versions(entry, now_ms);
        }
        Ok(())
    }

    fn persist(
        &self,
        rollout: &Rollout,
        audit: &[AuditRecord],
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        let body = serde_json::to_string(rollout)
            .map_err(|e| ServiceError::Internal(format!("cannot serialise the rollout: {e}")))?;
        let audit = audit
            .iter()
            .map(|a| serde_json::to_string(a).map(|j| (a.at_ms, j)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ServiceError::Internal(format!("cannot serialise audit: {e}")))?;
        let row = RolloutRow {
            id: rollout.id().to_owned(),
            model_id: rollout.plan().model_id.clone(),
            state: rollout.state().as_str().to_owned(),
            body,
            // Only the first save's creation time is kept.
            created_ms: now_ms,
            updated_ms: now_ms,
        };
        Ok(self.store.save_rollout(&row, &audit)?)
    }

    /// Publishes offers and withdrawals; returns whether a rollback version was asked for.
    fn carry_out(&self, rollout: &Rollout, actions: &[Action], now_ms: i64) -> bool {
        let mut cache = OfferCache::new();
        let mut rollback_needed = false;
        for a in actions {
            match a {
                Action::Offer(o) => {
                    let model = &rollout.plan().model_id;
                    // The image the device runs now: a patch from it when smaller.
                    let base_version = match o.phase {
                        Phase::Forward => rollout.device(&o.device).map(|d| d.from_version),
                        Phase::Rollback => Some(rollout.plan().target.version.clone()),
                    };
                    let base = base_version
                        .and_then(|v| self.ota.version(model, &v).ok())
                        .map(|m| m.sha256);
                    let bytes = cache
                        .entry((o.version.clone(), base.clone()))
                        .or_insert_with(|| {
                            let signed = self.ota.version(model, &o.version).and_then(|t| {
                                if t.seq != o.seq {
                                    return Err(OtaError::Invalid(format!(
                                        "{model}@{} has seq {}, the rollout offers seq {}",
                                        o.version, t.seq, o.seq
                                    )));
                                }
                                self.ota.offer(&t, base.as_deref(), now_ms)
                            });
                            match signed {
                                Ok(b) => Some(b),
                                Err(e) => {
                                    tracing::error!(rollout = %rollout.id(), version = %o.version, error = %e, "cannot build the offer");
                                    None
                                }
                            }
                        });
                    match bytes {
                        Some(b) => self.sink.publish(&o.device, Some(b.clone())),
                        None => {
                            self.offer_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Action::Withdraw { device } => self.sink.publish(device, None),
                Action::RollbackNeeded { .. } => rollback_needed = true,
            }
        }
        rollback_needed
    }

    /// Registers the rollback versions the rollout waits for and hands them to it, carrying
    /// out what follows; failures are logged and retried at the next tick.
    fn ensure_rollback_versions(&self, entry: &mut Entry, now_ms: i64) {
        // Each round registers at least one version or stops; a rollout replaces finitely many.
        loop {
            let waiting = entry
                .rollout
                .status()
                .rollback
                .map(|rb| rb.waiting_for_versions)
                .unwrap_or_default();
            let mut progressed = false;
            for old in waiting {
                let version = match self.rollback_version(&entry.rollout, &old, now_ms) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(rollout = %entry.rollout.id(), old_version = %old, error = %e, "cannot register the rollback version; retrying at the next tick");
                        continue;
                    }
                };
                let backup = entry.rollout.clone();
                match entry.rollout.rollback_version_ready(&old, version, now_ms) {
                    Ok(step) => {
                        if let Err(e) = self.persist(&entry.rollout, &step.audit, now_ms) {
                            entry.rollout = backup;
                            tracing::error!(rollout = %entry.rollout.id(), error = %e, "cannot save the rollout; retrying at the next tick");
                            return;
                        }
                        self.carry_out(&entry.rollout, &step.actions, now_ms);
                        progressed = true;
                    }
                    Err(e) => {
                        entry.rollout = backup;
                        tracing::error!(rollout = %entry.rollout.id(), old_version = %old, error = %e, "rollback version refused");
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// The rollback version of `old`: its artifact under a new name with a seq above every
    /// registered version of the model. One registered earlier by this rollout (a crash before
    /// the rollout was saved) is reused.
    fn rollback_version(
        &self,
        rollout: &Rollout,
        old: &str,
        now_ms: i64,
    ) -> Result<VersionRef, ServiceError> {
        let plan = rollout.plan();
        let model = &plan.model_id;
        let old_mv = self.ota.version(model, old)?;
        let by = format!("rollout:{}", plan.id);
        let versions = self.ota.versions(model)?;
        if let Some(v) = versions
            .iter()
            .find(|v| v.created_by == by && v.sha256 == old_mv.sha256 && v.seq > plan.target.seq)
        {
            return Ok(VersionRef::new(v.model_version.clone(), v.seq));
        }
        let highest = versions.iter().map(|v| v.seq).max().unwrap_or(0);
        let seq = highest
            .max(plan.target.seq)
            .checked_add(1)
            .ok_or_else(|| ServiceError::Invalid(format!("{model}: seq exhausted")))?;
        let bytes = self
            .ota
            .artifacts()
            .get(&old_mv.sha256)
            .map_err(OtaError::from)?
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "the artifact of {model}@{old} ({}) is missing",
                    old_mv.sha256
                ))
            })?;
        let suffix = format!("+rb{seq}");
        let mut name = old.to_owned();
        // Names are ASCII (checked at registration).
        name.truncate(64usize.saturating_sub(suffix.len()));
        name.push_str(&suffix);
        let up = Upload {
            model_id: model.clone(),
            model_version: name,
            seq,
            hw: old_mv.hw.clone(),
            min_fw: old_mv.min_fw,
            arena: old_mv.arena,
            by,
        };
        let registered = self.ota.register(&up, &bytes, now_ms)?;
        tracing::info!(rollout = %plan.id, old_version = %old, version = %registered.model_version, seq, "rollback version registered");
        Ok(VersionRef::new(registered.model_version, registered.seq))
    }

    /// The continuous-delivery policy of a model, if set.
    pub fn policy(&self, model_id: &str) -> Result<Option<RolloutPolicy>, ServiceError> {
        self.store
            .service_state(&policy_key(model_id))?
            .map(|json| {
                serde_json::from_str(&json).map_err(|e| {
                    ServiceError::Internal(format!("stored policy of {model_id}: {e}"))
                })
            })
            .transpose()
    }

    /// Sets (validated like a plan) or, with `None`, removes a model's continuous-delivery
    /// policy; returns whether one was set before.
    pub fn set_policy(
        &self,
        model_id: &str,
        policy: Option<&RolloutPolicy>,
        now_ms: i64,
    ) -> Result<bool, ServiceError> {
        let key = policy_key(model_id);
        let Some(policy) = policy else {
            return Ok(self.store.delete_service_state(&key)?);
        };
        // A plan with this policy's fields must be valid whatever the version.
        let req = policy.request(model_id, "policy");
        let hw = req.filter.as_ref().map_or("any", |f| f.hw.as_str());
        let mut plan = RolloutPlan::new(
            "policy-check",
            model_id,
            VersionRef::new("next", 2),
            vec![VersionRef::new("previous", 1)],
            hw,
        );
        if let Some(f) = req.filter {
            plan.filter = f;
        }
        if let Some(s) = req.stages {
            plan.stages = s;
        }
        if let Some(g) = req.install {
            plan.install = g;
        }
        if let Some(g) = req.quality {
            plan.quality = g;
        }
        if let Some(n) = req.offers_per_minute {
            plan.offers_per_minute = n;
        }
        if let Some(m) = req.maintenance {
            plan.maintenance = m;
        }
        plan.validate()?;
        let json = serde_json::to_string(policy)
            .map_err(|e| ServiceError::Internal(format!("cannot serialise the policy: {e}")))?;
        let existed = self.store.service_state(&key)?.is_some();
        self.store.put_service_state(&[(&key, &json)], now_ms)?;
        Ok(existed)
    }

    /// A version was registered: with a policy set for its model and no active rollout of the
    /// model, a rollout of it starts (`Ok(None)` when nothing started).
    pub fn on_version_registered(
        &self,
        model_id: &str,
        version: &str,
        now_ms: i64,
    ) -> Result<Option<RolloutStatus>, ServiceError> {
        let Some(policy) = self.policy(model_id)? else {
            return Ok(None);
        };
        let busy = lock(&self.inner)
            .entries
            .iter()
            .find(|e| e.live() && e.active() && e.rollout.plan().model_id == model_id)
            .map(|e| e.rollout.id().to_owned());
        if let Some(id) = busy {
            tracing::info!(model = %model_id, version = %version, active = %id, "policy: a rollout of the model is active; not starting one");
            return Ok(None);
        }
        match self.create(policy.request(model_id, version), POLICY_WHO, now_ms) {
            Ok(status) => Ok(Some(status)),
            // Raced with another creation: the same outcome as `busy`.
            Err(ServiceError::Conflict(m)) => {
                tracing::info!(model = %model_id, version = %version, reason = %m, "policy: not starting a rollout");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
