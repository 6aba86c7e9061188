//! Staged rollouts over a simulated fleet of 2,000 devices (three kinds of hardware): a healthy
//! model goes 1 % -> 10 % -> 50 % -> 100 % by itself; a model that installs fine but loses
//! accuracy is stopped at the canary stage and rolled back; a model that fails to install on
//! 30 % of the canaries is aborted once the minimum sample is done; an inconclusive quality
//! test holds the stage and pauses it past the deadline; a service restart (engine serialised
//! and read back, broker's retained offers lost and re-published) changes nothing. Devices
//! report predicted-class counts and drift scores too: a model biased towards one class, or
//! whose inputs drift from its own profile, is stopped at the canary stage without any label,
//! and a healthy model with strongly device-dependent class mixes is not.

mod rollout_sim;

use std::collections::BTreeSet;

use rollout_sim::*;
use tinyfleet_ota_service::rollout::plan::{HOUR_MS, MINUTE_MS};
use tinyfleet_ota_service::rollout::{
    AuditEvent, Cause, DeviceInfo, Phase, ProgressReport, Rollout, RolloutState, StageState,
    Verdict, VersionRef,
};

use AuditEvent::*;

fn done(state: RolloutState) -> impl Fn(&Harness) -> bool {
    move |h| h.state() == state
}

#[test]
fn a_healthy_model_goes_from_one_percent_to_everyone_on_its_own() {
    let mut h = Harness::start(
        FleetConfig::new(2_000, 1, Behaviour::good(2, 0.90)),
        test_plan("healthy"),
    );
    let target = h.rollout.status().totals.targeted;
    assert!((1_200..1_450).contains(&target), "{target}");
    h.run_until(
        START_MS + 48 * HOUR_MS,
        MINUTE_MS,
        done(RolloutState::Completed),
    );
    let status = h.rollout.status();
    assert_eq!(h.state(), RolloutState::Completed, "{:#?}", status.gates);
    assert_eq!(
        h.events(),
        [
            (Created, None),
            (StageOpened, Some(0)),
            (Advanced, Some(0)),
            (StageOpened, Some(1)),
            (Advanced, Some(1)),
            (StageOpened, Some(2)),
            (Advanced, Some(2)),
            (StageOpened, Some(3)),
            (Advanced, Some(3)),
            (Completed, Some(3)),
        ]
    );
    for a in h.audit().iter().filter(|a| a.event == Advanced) {
        assert_eq!(a.cause, Cause::Soak);
        let g = a.gates.as_ref().expect("gate values recorded");
        assert_eq!(g.verdict, Verdict::Pass);
        assert_eq!(g.quality.verdict, Verdict::Pass);
        assert_eq!(g.quality.classes.verdict, Verdict::Pass, "{:?}", g.quality);
        assert_eq!(g.quality.drift.verdict, Verdict::Pass, "{:?}", g.quality);
        assert!(g.install.cumulative.counts.done() >= 10);
    }
    // The canary stage: 1 % of the target is ~13 devices; never below 10.
    let canary = &status.stages[0];
    assert!((10..=20).contains(&canary.counts.targeted), "{canary:?}");
    assert!(status.stages.iter().all(|s| s.state == StageState::Closed));
    let counts: u64 = status.stages.iter().map(|s| s.counts.targeted).sum();
    assert_eq!(counts, status.totals.targeted);

    // Each device offered once, only target devices.
    let offers = h.offers(Phase::Forward);
    let devices: BTreeSet<String> = offers.iter().map(|o| o.device.clone()).collect();
    assert_eq!(devices.len(), offers.len());
    for o in &offers {
        let d = h.fleet.device(&o.device).expect("known device");
        assert_eq!(d.hw, HW);
        assert_eq!((o.version.as_str(), o.seq), (NEW, 2));
    }

    // Latecomers (offline at the start) get it too: after a while every target device that
    // has been online runs the new version.
    let end = h.now + 8 * HOUR_MS;
    h.run_until(end, MINUTE_MS, |_| false);
    for d in &h.fleet.devices {
        let in_target = d.hw == HW && d.running.0 != LEGACY;
        if in_target && d.online {
            assert_eq!(d.running.0, NEW, "{}", d.id);
        }
        if !in_target {
            assert!(!devices.contains(&d.id), "{} is not in the target", d.id);
        }
    }
    let status = h.rollout.status();
    assert_eq!(status.totals.failed + status.totals.reverted, 0);
    assert!(status.reports.stale > 0, "duplicates were sent and ignored");
    assert_eq!(status.state, RolloutState::Completed);
}

#[test]
fn a_model_that_loses_accuracy_is_stopped_at_the_canary_stage_and_rolled_back() {
    let mut h = Harness::start(
        FleetConfig::new(2_000, 2, Behaviour::good(2, 0.80)),
        test_plan("worse"),
    );
    h.run_until(
        START_MS + 24 * HOUR_MS,
        MINUTE_MS,
        done(RolloutState::Aborted),
    );
    assert_eq!(
        h.state(),
        RolloutState::Aborted,
        "{:#?}",
        h.rollout.status()
    );
    let abort = h
        .audit()
        .into_iter()
        .find(|a| a.event == Aborted)
        .cloned()
        .expect("aborted");
    assert_eq!(abort.cause, Cause::QualityGate);
    assert_eq!(abort.stage, Some(0), "stopped at the canary stage");
    let gates = abort.gates.expect("gate values");
    assert_eq!(gates.quality.verdict, Verdict::Fail);
    assert_eq!(gates.install.verdict, Verdict::Pass, "it installed fine");
    let drop = gates.quality.labelled.harm.expect("labelled test ran");
    assert!(drop.low > 0.02 && drop.estimate > 0.05, "{drop:?}");
    assert!(!h.events().contains(&(StageOpened, Some(1))));
    let events: Vec<_> = h.events().iter().map(|e| e.0).collect();
    assert!(events.ends_with(&[
        Aborted,
        RollbackStarted,
        RollbackVersionReady,
        RollbackCompleted
    ]));

    // Every device that took the new version was offered the old one (as v1-rb, seq 3), and
    // now runs it.
    let forward: BTreeSet<_> = h
        .offers(Phase::Forward)
        .iter()
        .map(|o| o.device.clone())
        .collect();
    let rollback: BTreeSet<_> = h
        .offers(Phase::Rollback)
        .iter()
        .map(|o| o.device.clone())
        .collect();
    let took: BTreeSet<_> = h
        .fleet
        .sent
        .iter()
        .filter(|r| r.manifest_seq == 2 && r.state != 8 && r.state != 6 && r.state != 7)
        .map(|r| r.device.clone())
        .collect();
    assert!(took.len() >= 10, "{took:?}");
    assert!(took.is_subset(&rollback));
    assert!(rollback.is_subset(&forward));
    for o in h.offers(Phase::Rollback) {
        assert_eq!((o.version.as_str(), o.seq), (ROLLBACK, 3));
    }
    for id in &took {
        let d = h.fleet.device(id).expect("device");
        assert_eq!(d.running.0, ROLLBACK, "{id}");
    }
    // Nothing of the new version remains retained; the rollback offers are.
    assert!(h.fleet.retained.values().all(|(v, _)| v == ROLLBACK));
    assert_eq!(h.rollout.offers_in_force().len(), rollback.len());
    let status = h.rollout.status();
    let rb = status.rollback.expect("rollback status");
    assert_eq!(rb.counts.confirmed, rollback.len() as u64);
    assert!(rb.completed_ms.is_some());
}

#[test]
fn a_model_failing_to_install_on_30_percent_of_canaries_is_aborted_after_the_minimum_sample() {
    let new = Behaviour {
        fail: 0.3,
        ..Behaviour::good(2, 0.90)
    };
    let mut config = FleetConfig::new(2_000, 3, new);
    config.duplicate_prob = 0.3;
    let mut h = Harness::start(config, test_plan("failing"));
    h.run_until(
        START_MS + 24 * HOUR_MS,
        MINUTE_MS,
        done(RolloutState::Aborted),
    );
    let abort = h
        .audit()
        .into_iter()
        .find(|a| a.event == Aborted)
        .cloned()
        .expect("aborted");
    assert_eq!(abort.cause, Cause::InstallGate);
    assert_eq!(abort.stage, Some(0));
    let g = abort.gates.expect("gate values");
    let counts = &g.install.cumulative.counts;
    assert!(counts.done() >= 10, "decided on {} done", counts.done());
    assert!(
        g.install
            .cumulative
            .failure
            .rate
            .is_some_and(|r| r.low > 0.05)
    );
    // Devices known to have failed at the abort keep the old image; only those that installed
    // (or might be installing) get the rollback.
    let failed: BTreeSet<_> = h
        .fleet
        .delivered
        .iter()
        .filter(|(t, r)| *t <= abort.at_ms && r.manifest_seq == 2 && r.state == 6)
        .map(|(_, r)| r.device.clone())
        .collect();
    assert!(failed.len() >= 3, "{failed:?}");
    let rollback = h.offers(Phase::Rollback);
    assert!(!rollback.is_empty());
    for o in rollback {
        assert!(
            !failed.contains(&o.device),
            "{} failed, it keeps v1",
            o.device
        );
    }
    assert_eq!(h.state(), RolloutState::Aborted);
}

/// The install gate directly: 3 done devices (all failed) decide nothing; 10 done with 3
/// failures abort.
#[test]
fn three_failed_devices_decide_nothing() {
    let mut plan = test_plan("three");
    plan.stages = stages(&[(0.5, 20), (1.0, 0)], HOUR_MS, 6 * HOUR_MS);
    let fleet: Vec<DeviceInfo> = (0..40)
        .map(|i| DeviceInfo {
            id: format!("d{i}"),
            hw: Some(HW.into()),
            tags: Default::default(),
            model_id: Some(MODEL.into()),
            model_version: Some(OLD.into()),
            online: true,
        })
        .collect();
    let (mut r, step) = Rollout::start(plan, &fleet, "bob", 0).expect("plan");
    let offered: Vec<String> = step
        .actions
        .iter()
        .filter_map(|a| match a {
            tinyfleet_ota_service::rollout::Action::Offer(o) => Some(o.device.clone()),
            _ => None,
        })
        .collect();
    assert!(offered.len() >= 20);
    let report = |device: &str, state: u8| ProgressReport {
        device: device.into(),
        boot: 1,
        seq: 0,
        manifest_seq: 2,
        state,
        bytes: 0,
        error: if state == 6 { 22 } else { 0 },
    };
    for d in &offered[..3] {
        r.report(&report(d, 6), 1_000);
    }
    r.tick(2_000);
    assert_eq!(r.state(), RolloutState::Running);
    let g = r.gates().expect("evaluated");
    assert_eq!(g.install.verdict, Verdict::Insufficient, "{}", g.reason);
    for d in &offered[3..10] {
        r.report(&report(d, 5), 3_000);
    }
    let step = r.tick(4_000);
    assert_eq!(r.state(), RolloutState::RollingBack);
    assert_eq!(step.audit[0].cause, Cause::InstallGate);
    // The seven confirmed and the ten still silent (they may be installing) need v1 back;
    // the three failed keep it.
    let status = r.status();
    assert_eq!(
        status.rollback.expect("rollback").devices,
        offered.len() as u64 - 3
    );
}

#[test]
fn an_inconclusive_quality_test_holds_the_stage_then_pauses_it_at_the_deadline() {
    // Accuracy drops by exactly the tolerated 2 points: the interval keeps straddling the
    // limit.
    let new = Behaviour::good(2, 0.88);
    let mut h = Harness::start(FleetConfig::new(2_000, 4, new), test_plan("unsure"));
    h.run_until(
        START_MS + 24 * HOUR_MS,
        MINUTE_MS,
        done(RolloutState::Paused),
    );
    assert_eq!(
        h.state(),
        RolloutState::Paused,
        "{:#?}",
        h.rollout.status().gates
    );
    let pause = h
        .audit()
        .into_iter()
        .find(|a| a.event == Paused)
        .cloned()
        .expect("paused");
    assert_eq!(pause.cause, Cause::Deadline);
    assert_eq!(pause.stage, Some(0));
    let g = pause.gates.expect("gate values");
    assert_eq!(g.verdict, Verdict::Inconclusive);
    assert_eq!(g.quality.labelled.verdict, Verdict::Inconclusive);
    assert!(g.reason.contains("labelled accuracy"), "{}", g.reason);
    let status = h.rollout.status();
    let stage = &status.stages[0];
    let full = stage.fully_offered_ms.expect("fully offered");
    assert!(pause.at_ms >= full + 6 * HOUR_MS);
    assert_eq!(stage.deadline_ms, Some(full + 6 * HOUR_MS));
    assert!(
        !h.events().contains(&(StageOpened, Some(1))),
        "never advanced"
    );
    let offered = h.offers(Phase::Forward).len();

    // Paused: no new offers, even for devices returning.
    h.run_until(h.now + 2 * HOUR_MS, MINUTE_MS, |_| false);
    assert_eq!(h.offers(Phase::Forward).len(), offered);
    assert_eq!(h.state(), RolloutState::Paused);

    // An operator resumes (the deadline starts over), then advances by hand.
    let step = h.rollout.resume("carol", h.now).expect("resume");
    h.apply(step);
    assert_eq!(h.state(), RolloutState::Running);
    h.run_until(h.now + HOUR_MS, MINUTE_MS, |_| false);
    assert_eq!(
        h.state(),
        RolloutState::Running,
        "held, not paused again yet"
    );
    assert!(h.rollout.status().holding.is_some());
    let step = h.rollout.advance_now("carol", h.now).expect("advance");
    h.apply(step);
    let audit = h.audit();
    let adv = audit
        .iter()
        .rev()
        .find(|a| a.event == Advanced)
        .expect("advanced");
    assert_eq!(adv.cause, Cause::Operator("carol".into()));
    assert_eq!(
        adv.gates.as_ref().map(|g| g.verdict),
        Some(Verdict::Inconclusive)
    );
    assert!(h.events().contains(&(StageOpened, Some(1))));
    assert!(h.offers(Phase::Forward).len() > offered);
    assert!(h.rollout.pause("carol", "lunch", h.now).is_ok());
    assert!(h.rollout.pause("carol", "again", h.now).is_err());
}

/// Runs a scenario with and without restarts and compares everything.
fn same_with_restarts(seed: u64, new: Behaviour, hours: i64, restarts: &[i64]) {
    let run = |restart_at: &[i64]| {
        let mut h = Harness::start(
            FleetConfig::new(2_000, seed, new.clone()),
            test_plan("restart"),
        );
        h.restarts = restart_at
            .iter()
            .map(|m| START_MS + m * MINUTE_MS)
            .collect();
        h.run_until(START_MS + hours * HOUR_MS, MINUTE_MS, |_| false);
        assert_eq!(h.restarted as usize, restart_at.len());
        h
    };
    let plain = run(&[]);
    let restarted = run(restarts);
    assert_eq!(plain.log.len(), restarted.log.len());
    for (i, (a, b)) in plain.log.iter().zip(&restarted.log).enumerate() {
        assert_eq!(a, b, "entry {i} differs");
    }
    assert_eq!(plain.rollout, restarted.rollout);
    assert_eq!(plain.rollout.status(), restarted.rollout.status());
    assert_eq!(plain.fleet.sent, restarted.fleet.sent);
}

#[test]
fn a_restart_mid_rollout_changes_nothing() {
    // Healthy: restarts during the canary soak, mid-stage-2 offers, and stage 3.
    same_with_restarts(
        5,
        Behaviour::good(2, 0.90),
        8,
        &[37, 61, 150, 200, 301, 420],
    );
    // Bad model: restarts before and during the rollback.
    same_with_restarts(6, Behaviour::good(2, 0.80), 6, &[20, 45, 90, 91, 130]);
}

#[test]
fn operators_can_abort_a_completed_rollout_and_rollback_versions_are_checked() {
    let mut h = Harness::start(FleetConfig::new(300, 7, Behaviour::good(2, 0.90)), {
        let mut p = test_plan("late-abort");
        p.stages = stages(&[(0.2, 10), (1.0, 0)], HOUR_MS, 6 * HOUR_MS);
        p.quality.required = false;
        p
    });
    h.run_until(
        START_MS + 24 * HOUR_MS,
        MINUTE_MS,
        done(RolloutState::Completed),
    );
    assert_eq!(h.state(), RolloutState::Completed);
    h.run_until(h.now + 2 * HOUR_MS, MINUTE_MS, |_| false);
    h.register_rollback = false;
    let step = h
        .rollout
        .abort("dave", "customer complaints", h.now)
        .expect("abort");
    assert!(step.actions.iter().any(|a| matches!(
        a,
        tinyfleet_ota_service::rollout::Action::RollbackNeeded { old_version } if old_version == OLD
    )));
    h.apply(step);
    assert_eq!(h.state(), RolloutState::RollingBack);
    let now = h.now;
    let r = &mut h.rollout;
    assert!(
        r.rollback_version_ready(OLD, VersionRef::new(ROLLBACK, 2), now)
            .is_err()
    );
    assert!(
        r.rollback_version_ready("v9", VersionRef::new(ROLLBACK, 3), now)
            .is_err()
    );
    assert!(r.abort("dave", "twice", now).is_err());
    let step = r
        .rollback_version_ready(OLD, VersionRef::new(ROLLBACK, 3), now)
        .expect("ready");
    assert!(
        r.rollback_version_ready(OLD, VersionRef::new("other", 4), now)
            .is_err()
    );
    h.apply(step);
    h.run_until(h.now + 12 * HOUR_MS, MINUTE_MS, done(RolloutState::Aborted));
    assert_eq!(h.state(), RolloutState::Aborted);
    for d in &h.fleet.devices {
        assert_ne!(d.running.0, NEW, "{} still runs the new version", d.id);
    }
}

/// Runs a model without labels until it aborts; returns the quality gate at the abort.
fn aborted_without_labels(
    seed: u64,
    new: Behaviour,
    id: &str,
) -> tinyfleet_ota_service::rollout::QualityReport {
    let mut config = FleetConfig::new(2_000, seed, new);
    config.labels_per_window = 0;
    let mut h = Harness::start(config, test_plan(id));
    h.run_until(
        START_MS + 24 * HOUR_MS,
        MINUTE_MS,
        done(RolloutState::Aborted),
    );
    assert_eq!(
        h.state(),
        RolloutState::Aborted,
        "{:#?}",
        h.rollout.status()
    );
    let abort = h
        .audit()
        .into_iter()
        .find(|a| a.event == Aborted)
        .cloned()
        .expect("aborted");
    assert_eq!(abort.cause, Cause::QualityGate);
    assert_eq!(abort.stage, Some(0), "stopped at the canary stage");
    assert!(!h.events().contains(&(StageOpened, Some(1))));
    let gates = abort.gates.expect("gate values");
    assert_eq!(gates.install.verdict, Verdict::Pass, "it installed fine");
    assert_eq!(gates.quality.labelled.verdict, Verdict::NoData, "no labels");
    assert!(gates.reason.starts_with("quality: "), "{}", gates.reason);
    gates.quality
}

#[test]
fn a_model_biased_towards_one_class_is_stopped_at_the_canary_stage_without_labels() {
    // Twice as many predictions of class 0 (20 % -> 44 %), same accuracy estimate.
    let q = aborted_without_labels(
        8,
        Behaviour {
            class_skew: 0.3,
            ..Behaviour::good(2, 0.90)
        },
        "biased",
    );
    assert_eq!(q.classes.verdict, Verdict::Fail, "{q:#?}");
    assert!(q.reason.contains("predicted classes"), "{}", q.reason);
    assert_eq!(q.shifted_class, Some(0));
    let psi = q.classes.harm.expect("class test ran");
    assert!(psi.low > 0.1, "{psi:?}");
    assert!(q.class_test.is_some_and(|t| t.different));
    assert!(q.classes.canary > q.classes.control);
    assert_ne!(q.drift.verdict, Verdict::Fail);
    assert_ne!(q.estimated.verdict, Verdict::Fail);
}

#[test]
fn a_model_whose_inputs_drift_from_its_profile_is_stopped_at_the_canary_stage() {
    let q = aborted_without_labels(
        9,
        Behaviour {
            drift: 0.3,
            ..Behaviour::good(2, 0.90)
        },
        "drifting",
    );
    assert_eq!(q.drift.verdict, Verdict::Fail, "{q:#?}");
    assert!(q.reason.contains("drift score"), "{}", q.reason);
    assert!(!q.reason.contains("predicted classes"), "{}", q.reason);
    let up = q.drift.harm.expect("drift test ran");
    assert!(up.low > 0.1 && up.estimate > 0.2, "{up:?}");
    assert_ne!(q.classes.verdict, Verdict::Fail);
}

#[test]
fn a_healthy_model_with_device_dependent_class_mixes_is_not_aborted() {
    // Each device's class shares vary by a factor of up to e^1 either way: pooled over the
    // dozen canaries, their mix differs from the control's by much more than multinomial
    // noise; the per-device design effect keeps that from looking like a shift. No labels:
    // accuracy comes from the CBPE estimates.
    let mut config = FleetConfig::new(2_000, 10, Behaviour::good(2, 0.90));
    config.class_spread = 1.0;
    config.labels_per_window = 0;
    let mut h = Harness::start(config, test_plan("mixes"));
    h.run_until(
        START_MS + 48 * HOUR_MS,
        MINUTE_MS,
        done(RolloutState::Completed),
    );
    assert_eq!(
        h.state(),
        RolloutState::Completed,
        "{:#?}",
        h.rollout.status().gates
    );
    let advanced: Vec<_> = h
        .audit()
        .into_iter()
        .filter(|a| a.event == Advanced)
        .cloned()
        .collect();
    assert_eq!(advanced.len(), 4);
    for a in advanced {
        let g = a.gates.expect("gate values");
        assert_eq!(a.cause, Cause::Soak);
        assert_eq!(g.quality.classes.verdict, Verdict::Pass, "{:?}", g.quality);
        assert_eq!(g.quality.drift.verdict, Verdict::Pass);
        assert_eq!(g.quality.labelled.verdict, Verdict::NoData);
        let t = g.quality.class_test.expect("class test ran");
        assert!(t.design_effect > 2.0, "{t:?}");
    }
}
