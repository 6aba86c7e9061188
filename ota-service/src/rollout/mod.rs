//! Staged rollouts gated on install health and model quality, with automatic rollback: the
//! synchronous core.
//!
//! No I/O, no clock, no async: time comes in as `now_ms`, and every piece of state
//! ([`Rollout`]) is serde-serialisable so the service can keep it in the database and resume
//! every rollout exactly where it was after a restart. The shell (the service around it) feeds
//! devices, progress reports and quality observations in, calls [`Rollout::tick`], carries out
//! the returned [`Action`]s (sign and publish offers, clear retained offers, register rollback
//! versions) and persists the returned [`AuditRecord`]s.
//!
//! # The shell's calls, in order
//!
//! 1. [`Rollout::start`]`(plan, fleet, who, now)`: validates the [`RolloutPlan`], takes the
//!    devices the shell knows ([`DeviceInfo`]), opens stage 1 and returns the first offers.
//! 2. On every change of a device (new device, presence, model from its hello):
//!    [`Rollout::observe_device`]; when a device is decommissioned: [`Rollout::forget_device`].
//! 3. For every verified progress message: [`Rollout::report`] ([`ProgressReport`]).
//! 4. For every closed ingest window, all its device windows at once:
//!    [`Rollout::observe_quality`] ([`QualityObservation`]).
//! 5. After each batch and on a timer (every few seconds): [`Rollout::tick`].
//! 6. Operators: [`Rollout::pause`], [`Rollout::resume`], [`Rollout::advance_now`],
//!    [`Rollout::abort`], each with who; the API shows [`Rollout::status`].
//! 7. On [`Action::RollbackNeeded`]: register a rollback version (the old artifact under a new
//!    version name with a `seq` above the target's), then [`Rollout::rollback_version_ready`].
//! 8. After a restart: deserialise, re-publish [`Rollout::offers_in_force`], carry on.
//!
//! Every mutating call that returns a [`Step`] should be followed by persisting the state and
//! the step's audit records in one transaction, and only then by publishing its actions.
//!
//! # The state machine
//!
//! See [`RolloutState`]. A rollout runs its stages in order and never skips one: it advances
//! from stage `k` only after stage `k` has been fully offered, has soaked for its `soak_ms`,
//! and both gates pass (or when an operator says "advance now"); after the last stage it is
//! completed (and still offers the update to devices that join the target later). When a gate
//! *fails*, at any time, including while paused, the rollout aborts: the new version's offers
//! are withdrawn and every device that took it, or may be taking it, is offered its old
//! version again. When a gate stays *inconclusive*, the stage holds; once fully offered for
//! longer than its `deadline_ms`, it pauses for an operator. Pausing stops new offers (those
//! out stay out); resuming restarts the stage's deadline. hawkBit's error action is a pause and
//! its rollback is the operator assigning the old version by hand; AWS IoT Jobs can only
//! cancel; neither looks at what the new model does once installed.
//!
//! # Selection ([`select`])
//!
//! A device's stage comes from a hash of the rollout id and the device id, stable across
//! evaluations and restarts, so the canaries are a random sample of the target. Devices that
//! join the target later fall into stages by the same rule (hawkBit's groups are fixed at
//! creation, its issue #1548). A device offline when its stage opens is offered anyway (the
//! retained offer reaches it when it returns), after the online ones, and counts as targeted.
//! A stage's `min_devices` counts devices *taking part* (online, or reached by their offer),
//! so switched-off devices cannot starve the canary of the sample the gates need. Offers go
//! out within `offers_per_minute` and the maintenance windows; the soak and the deadline run
//! from the moment the stage is fully offered.
//!
//! # Install state ([`track`])
//!
//! Per device, from its progress reports ordered by `(boot, seq)`: duplicates and late
//! arrivals change nothing. An online device that stays silent for
//! `install.report_timeout_ms` after its offer (or its last report, or its return online) is
//! timed out until it reports again; offline time never counts.
//!
//! # Gates ([`gates`], [`quality`], [`stats`])
//!
//! Evaluated at every [`Rollout::tick`] while the rollout runs or is paused.
//!
//! - *Install health* ([`InstallGate`]): failure, revert and timeout rates over the devices
//!   done, with at least `min_done` done before any decision and a Wilson bound so a
//!   percentage of three devices decides nothing; both over the whole rollout and over the
//!   current stage alone, whose devices must also be done in a minimum share.
//! - *Quality* ([`QualityGate`]): canary (devices of this rollout on the new version) against
//!   control (devices of the same target still on the old one) over the same windows:
//!   labelled accuracy (two-proportion z with a cluster-robust variance), CBPE-estimated
//!   accuracy (Welch's t over devices), latency ratio, resets, predicted-class distribution
//!   (a design-effect-corrected chi-square with a PSI effect size), drift score against the
//!   version's profile (Welch's t); minimum samples; an inconclusive result holds the stage.
//!   Evidence accumulates over the whole rollout.
//!
//! # Rollback
//!
//! On abort: [`Action::Withdraw`] for every device offered the new version, then
//! [`Action::RollbackNeeded`] per old version. Once [`Rollout::rollback_version_ready`] names
//! the rollback version, every device that may have the new version gets a rollback [`Offer`]
//! ([`Phase::Rollback`]): every device reached by the offer (online since it was sent, or
//! reporting on it) whose install did not end in a failure, a refusal or a revert, including
//! devices that never reported and may be installing, and every device seen running the new
//! version (its hello), whatever its reports said. A device that comes back after the
//! withdrawal is rolled back only if it then reports the new version. The rollback's installs
//! are tracked like the rollout's; when all have finished the state becomes
//! [`RolloutState::Aborted`] (a device that stays away keeps it rolling back; the status says
//! how many, and [`Rollout::forget_device`] lets it go).
//!
//! # Persisted state
//!
//! [`Rollout`] holds the plan, the opened stages, one entry per target device (its bucket,
//! old version, presence, install tracks) and per-device quality totals: a few hundred bytes
//! of JSON per device. Only integers and the plan's own numbers are stored (gate reports are
//! recomputed), so it reads back bit for bit from JSON, and a restart changes nothing.

pub mod engine;
pub mod gates;
pub mod plan;
pub mod quality;
pub mod select;
pub mod stats;
pub mod track;

pub use engine::{
    Action, AuditEvent, AuditRecord, Cause, DeviceInfo, DeviceView, Offer, OpError, PauseInfo,
    Phase, ReportCounters, RollbackStatus, Rollout, RolloutState, RolloutStatus, StageState,
    StageStatus, Step,
};
pub use gates::{Gate, GateReport, InstallCounts, InstallEval, InstallReport, RateCheck, Verdict};
pub use plan::{
    HourWindow, InstallGate, PlanError, QualityGate, RolloutPlan, Stage, TagMatch, TargetFilter,
    VersionRef,
};
pub use quality::{Check, QualityIntake, QualityObservation, QualityReport};
pub use track::{InstallState, ProgressReport, ReportOutcome, Track};
