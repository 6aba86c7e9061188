//! Property test of the rollout state machine over random fleets, plans, install outcomes,
//! report delays, duplicates and replays, restarts, and operator actions at random times:
//!
//! - no stage is skipped: stages open in order, each once, the next only after the previous
//!   one advanced;
//! - no device receives two different offers within the rollout: one forward offer per device,
//!   of the target, never while paused or after the abort; the rollback is its own phase with
//!   at most one rollback offer per device, only after the abort and after the device's
//!   forward offer was withdrawn;
//! - a device's stage never changes once it has been offered;
//! - `offers_in_force` always equals what the broker should retain (checked at each restart
//!   and at the end);
//! - an abort always ends with every device that took (or may be taking) the new version
//!   offered its old one, and, given time, no device runs the new version.

mod rollout_sim;

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rollout_sim::*;
use tinyfleet_ota_service::rollout::plan::{HOUR_MS, MINUTE_MS};
use tinyfleet_ota_service::rollout::{Action, AuditEvent, Phase, RolloutState, Stage, VersionRef};

#[derive(Debug, Clone, Copy)]
enum Op {
    Pause,
    Resume,
    Advance,
    Abort,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Pause),
        3 => Just(Op::Resume),
        3 => Just(Op::Advance),
        1 => Just(Op::Abort)
    ]
}

fn stage_list() -> impl Strategy<Value = Vec<Stage>> {
    (
        proptest::collection::vec((1u32..100, 0u32..15), 1..5),
        any::<bool>(),
        0i64..180,
        1i64..300,
    )
        .prop_map(|(raw, to_everyone, soak_min, extra_min)| {
            let mut pct: Vec<(u32, u32)> = raw;
            pct.sort();
            pct.dedup_by_key(|p| p.0);
            if to_everyone && let Some(last) = pct.last_mut() {
                last.0 = 100;
            }
            pct.dedup_by_key(|p| p.0);
            pct.iter()
                .map(|&(p, min)| Stage {
                    share: f64::from(p) / 100.0,
                    min_devices: min,
                    soak_ms: soak_min * MINUTE_MS,
                    deadline_ms: (soak_min + extra_min) * MINUTE_MS,
                })
                .collect()
        })
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    devices: usize,
    stages: Vec<Stage>,
    fail: f64,
    revert: f64,
    accuracy: f64,
    duplicate: f64,
    replay: f64,
    max_delay_min: i64,
    offline: f64,
    ops: Vec<(i64, Op)>,
    restarts: Vec<i64>,
    rollback_delay_min: Option<i64>,
    offers_per_minute: u32,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (any::<u64>(), 20usize..140, stage_list()),
        prop_oneof![
            // Mostly healthy models, so that stages advance...
            2 => (0.0..0.02f64, Just(0.0), 0.90..0.95f64),
            // ...and some that fail to install, revert or lose accuracy.
            1 => (0.0..0.5f64, 0.0..0.2f64, 0.75..0.95f64),
        ],
        (0.0..0.5f64, 0.0..0.3f64, 0i64..40, 0.0..0.4f64),
        proptest::collection::vec((0i64..(30 * 60), op()), 0..6),
        proptest::collection::vec(0i64..(36 * 60), 0..4),
        (proptest::option::of(0i64..600), 1u32..50),
    )
        .prop_map(
            |(
                (seed, devices, stages),
                (fail, revert, accuracy),
                (duplicate, replay, max_delay_min, offline),
                mut ops,
                mut restarts,
                (rollback_delay_min, offers_per_minute),
            )| {
                ops.sort_by_key(|o| o.0);
                restarts.sort();
                Case {
                    seed,
                    devices,
                    stages,
                    fail,
                    revert,
                    accuracy,
                    duplicate,
                    replay,
                    max_delay_min,
                    offline,
                    ops,
                    restarts,
                    rollback_delay_min,
                    offers_per_minute,
                }
            },
        )
}

const TICK: i64 = 5 * MINUTE_MS;

fn run(c: &Case) -> Result<(), TestCaseError> {
    let new = Behaviour {
        fail: c.fail,
        revert: c.revert,
        ..Behaviour::good(2, c.accuracy)
    };
    let mut config = FleetConfig::new(c.devices, c.seed, new);
    config.duplicate_prob = c.duplicate;
    config.max_net_delay_ms = c.max_delay_min * MINUTE_MS;
    config.offline_share = c.offline;
    config.labels_per_window = 20;
    let mut plan = test_plan("prop");
    plan.stages = c.stages.clone();
    plan.offers_per_minute = c.offers_per_minute;
    plan.quality.min_labelled = 100;
    let mut h = Harness::start(config, plan);
    h.replay_prob = c.replay;
    h.register_rollback = c.rollback_delay_min.is_none();
    h.restarts = c
        .restarts
        .iter()
        .map(|m| START_MS + m * MINUTE_MS)
        .collect();

    // Stage of each device when it was offered.
    let mut offered_stage: BTreeMap<String, Option<u32>> = BTreeMap::new();
    let mut seen = 0;
    let mut ops = c.ops.clone();
    let mut rollback_at: Option<i64> = None;
    let end = START_MS + 36 * HOUR_MS;
    // Once aborted, run on until the rollback has had time to finish (the late rollback
    // version included).
    let rolling_back =
        |h: &Harness| matches!(h.state(), RolloutState::RollingBack | RolloutState::Aborted);
    while h.now < end || (rolling_back(&h) && h.now < end + 12 * HOUR_MS) {
        let next = h.now + TICK;
        h.step_to(next);
        while let Some(&(at, op)) = ops.first() {
            if START_MS + at * MINUTE_MS > h.now {
                break;
            }
            ops.remove(0);
            let now = h.now;
            let r = &mut h.rollout;
            let step = match op {
                Op::Pause => r.pause("prop", "random pause", now),
                Op::Resume => r.resume("prop", now),
                Op::Advance => r.advance_now("prop", now),
                Op::Abort => r.abort("prop", "random abort", now),
            };
            if let Ok(step) = step {
                h.apply(step);
            }
        }
        // The shell registers the rollback version late, when told to.
        if let Some(delay) = c.rollback_delay_min {
            let needed = h.log.iter().any(|(_, e)| {
                matches!(e, rollout_sim::Entry::Action(Action::RollbackNeeded { .. }))
            });
            if needed && rollback_at.is_none() {
                rollback_at = Some(h.now + delay * MINUTE_MS);
            }
            if rollback_at.is_some_and(|t| t <= h.now) {
                let step = h
                    .rollout
                    .rollback_version_ready(OLD, VersionRef::new(ROLLBACK, 3), h.now)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                h.apply(step);
                rollback_at = Some(i64::MAX);
            }
        }
        for (_, e) in &h.log[seen..] {
            if let rollout_sim::Entry::Action(Action::Offer(o)) = e
                && o.phase == Phase::Forward
            {
                offered_stage.insert(o.device.clone(), h.rollout.device_stage(&o.device));
            }
        }
        seen = h.log.len();
    }
    let aborted = rolling_back(&h);

    check_log(&h, c)?;
    for (device, stage) in &offered_stage {
        prop_assert_eq!(
            h.rollout.device_stage(device),
            *stage,
            "stage of {} moved",
            device
        );
        prop_assert!(stage.is_some());
    }
    let retained: BTreeMap<_, _> = h
        .rollout
        .offers_in_force()
        .into_iter()
        .map(|o| (o.device, (o.version, o.seq)))
        .collect();
    prop_assert_eq!(&retained, &h.fleet.retained);

    if aborted {
        let rolled: BTreeSet<&str> = h
            .offers(Phase::Rollback)
            .iter()
            .map(|o| o.device.as_str())
            .collect();
        for d in &h.fleet.devices {
            // The device saw the new version's offer, and its newest report on it does not say
            // the install ended without it.
            let last = h
                .fleet
                .sent
                .iter()
                .filter(|r| r.device == d.id && r.manifest_seq == 2)
                .max_by_key(|r| (r.boot, r.seq));
            let clean =
                last.is_some_and(|r| matches!(r.state, 6 | 7) || (r.state == 8 && r.error != 12));
            if d.seen_offers.contains(&2) && !clean {
                prop_assert!(rolled.contains(d.id.as_str()), "{} not rolled back", d.id);
            }
            prop_assert!(d.running.0 != NEW, "{} still runs the new version", d.id);
        }
        prop_assert_eq!(
            h.state(),
            RolloutState::Aborted,
            "{:?}",
            h.rollout.status().rollback
        );
    }
    Ok(())
}

/// Walks the log: stage order, offers per phase and state.
fn check_log(h: &Harness, c: &Case) -> Result<(), TestCaseError> {
    let mut next_stage = 0u32;
    let mut advanced = true;
    let (mut paused, mut aborted, mut completed) = (false, false, false);
    let mut forward = BTreeSet::new();
    let mut withdrawn = BTreeSet::new();
    let mut rollback = BTreeSet::new();
    for (_, e) in &h.log {
        match e {
            rollout_sim::Entry::Audit(a) => match a.event {
                AuditEvent::StageOpened => {
                    prop_assert!(advanced, "stage opened without the previous one advancing");
                    prop_assert_eq!(a.stage, Some(next_stage), "stage skipped");
                    prop_assert!((next_stage as usize) < c.stages.len());
                    next_stage += 1;
                    advanced = false;
                }
                AuditEvent::Advanced => {
                    prop_assert_eq!(a.stage, Some(next_stage - 1));
                    prop_assert!(!advanced && !aborted && !completed);
                    advanced = true;
                }
                AuditEvent::Completed => {
                    prop_assert_eq!(next_stage as usize, c.stages.len());
                    completed = true;
                }
                AuditEvent::Paused => paused = true,
                AuditEvent::Resumed => paused = false,
                AuditEvent::Aborted => {
                    prop_assert!(!aborted);
                    aborted = true;
                    paused = false;
                }
                AuditEvent::RollbackStarted
                | AuditEvent::RollbackCompleted
                | AuditEvent::RollbackVersionReady => prop_assert!(aborted),
                AuditEvent::Created => {}
            },
            rollout_sim::Entry::Action(Action::Offer(o)) => match o.phase {
                Phase::Forward => {
                    prop_assert!(!paused && !aborted, "forward offer while paused or aborted");
                    prop_assert!(
                        forward.insert(o.device.clone()),
                        "second offer to {}",
                        o.device
                    );
                    prop_assert_eq!((o.version.as_str(), o.seq), (NEW, 2));
                }
                Phase::Rollback => {
                    prop_assert!(aborted);
                    prop_assert!(
                        withdrawn.contains(&o.device),
                        "rolled back before withdrawn"
                    );
                    prop_assert!(
                        rollback.insert(o.device.clone()),
                        "two rollbacks to {}",
                        o.device
                    );
                    prop_assert_eq!((o.version.as_str(), o.seq), (ROLLBACK, 3));
                }
            },
            rollout_sim::Entry::Action(Action::Withdraw { device }) => {
                prop_assert!(aborted);
                prop_assert!(forward.contains(device));
                prop_assert!(withdrawn.insert(device.clone()));
            }
            rollout_sim::Entry::Action(Action::RollbackNeeded { old_version }) => {
                prop_assert!(aborted);
                prop_assert_eq!(old_version.as_str(), OLD);
            }
        }
    }
    if aborted {
        prop_assert_eq!(
            &withdrawn,
            &forward,
            "every forward offer withdrawn on abort"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rollout_state_machine(c in case()) {
        run(&c)?;
    }
}
