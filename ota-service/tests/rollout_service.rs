//! The rollout service over a real store, a real OTA service and a recording offer sink:
//! offers are published only after the state is saved and verify on the device's own code;
//! progress and time take a rollout through its stages to completion; an abort registers a
//! rollback version above the target and offers it; a restart mid-rollout re-publishes the
//! offers in force and changes nothing; a second active rollout of a model is refused;
//! continuous-delivery policies start rollouts of newly registered versions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey, verify_offer};
use tinyfleet_device::wire::ota_state;
use tinyfleet_ota_service::rollout::plan::MINUTE_MS;
use tinyfleet_ota_service::rollout::{
    AuditEvent, Cause, InstallGate, ProgressReport, QualityGate, RolloutState, Stage,
};
use tinyfleet_ota_service::service::{
    CreateRollout, OfferSink, RolloutPolicy, Rollouts, ServiceError,
};
use tinyfleet_ota_service::{Ota, OtaConfig, Upload};
use tinyfleet_store::{Batch, DeviceState, Presence, Store};

const T0: i64 = 1_700_000_000_000;
const SOAK: i64 = 10 * MINUTE_MS;

/// Records every publish; `retained` is what a broker would hold per device.
#[derive(Debug, Default)]
struct Recorder {
    log: Mutex<Vec<(String, Option<Vec<u8>>)>>,
}

impl OfferSink for Recorder {
    fn publish(&self, device: &str, offer: Option<Vec<u8>>) {
        self.log.lock().unwrap().push((device.to_owned(), offer));
    }
}

impl Recorder {
    fn take(&self) -> Vec<(String, Option<Vec<u8>>)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

fn retained(log: &[(String, Option<Vec<u8>>)]) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for (d, o) in log {
        match o {
            Some(b) => m.insert(d.clone(), b.clone()),
            None => m.remove(d),
        };
    }
    m
}

fn model(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn upload(version: &str, seq: u32) -> Upload {
    Upload {
        model_id: "kws".into(),
        model_version: version.into(),
        seq,
        hw: "nrf52840".into(),
        min_fw: 0,
        arena: 40_000,
        by: "ops".into(),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
    ota: Arc<Ota>,
    v1: Vec<u8>,
    v2: Vec<u8>,
}

impl Env {
    fn new(devices: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ota = Arc::new(Ota::open(store.clone(), dir.path(), OtaConfig::default()).unwrap());
        let v1 = model(20_000, 7);
        let mut v2 = v1.clone();
        for b in v2.iter_mut().step_by(97) {
            *b = b.wrapping_add(1);
        }
        ota.register(&upload("v1", 1), &v1, T0).unwrap();
        ota.register(&upload("v2", 2), &v2, T0).unwrap();
        let env = Self {
            _dir: dir,
            store,
            ota,
            v1,
            v2,
        };
        for i in 0..devices {
            env.add_device(&format!("d{i:03}"), "v1", true);
        }
        // Another model and another hardware: never in the target.
        env.store
            .registry()
            .provision("other-hw", BTreeMap::new())
            .unwrap();
        env.set_state("other-hw", "kws", "v1", "esp32s3", true);
        env
    }

    fn add_device(&self, id: &str, version: &str, online: bool) {
        self.store
            .registry()
            .provision(id, BTreeMap::from([("site".into(), "a".into())]))
            .unwrap();
        self.set_state(id, "kws", version, "nrf52840", online);
    }

    fn set_state(&self, id: &str, model: &str, version: &str, hw: &str, online: bool) {
        self.store
            .commit(&Batch {
                states: vec![DeviceState {
                    id: id.into(),
                    presence: Presence {
                        online,
                        ..Presence::default()
                    },
                    model_id: Some(model.into()),
                    model_version: Some(version.into()),
                    hw: Some(hw.into()),
                    updated_ms: T0,
                    ..DeviceState::default()
                }],
                ..Batch::default()
            })
            .unwrap();
    }

    fn open(&self, sink: &Arc<Recorder>, now: i64) -> Rollouts {
        Rollouts::open(self.store.clone(), self.ota.clone(), sink.clone(), now).unwrap()
    }

    /// Verifies an offer with the device's own code; returns (version, seq, image sha,
    /// delta base sha).
    fn verify(&self, offer: &[u8]) -> (String, u32, [u8; 32], Option<[u8; 32]>) {
        let signer = self.ota.signer();
        let kid = signer.kid();
        let trusted = [TrustedKey {
            kid: &kid,
            public: signer.public_key(),
        }];
        let mut scratch = [0u8; MAX_OFFER + 64];
        let m = verify_offer(offer, &trusted, &mut scratch).unwrap();
        assert_eq!(m.model_id, "kws");
        assert_eq!(m.hw, "nrf52840");
        (
            m.model_version.to_owned(),
            m.seq,
            m.image_sha256.0,
            m.delta.map(|d| d.base_sha256.0),
        )
    }
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn request(id: &str) -> CreateRollout {
    CreateRollout {
        id: Some(id.into()),
        stages: Some(vec![
            Stage {
                share: 0.25,
                min_devices: 5,
                soak_ms: SOAK,
                deadline_ms: 6 * SOAK,
            },
            Stage {
                share: 1.0,
                min_devices: 0,
                soak_ms: SOAK,
                deadline_ms: 6 * SOAK,
            },
        ]),
        install: Some(InstallGate {
            min_done: 5,
            ..InstallGate::default()
        }),
        quality: Some(QualityGate {
            required: false,
            ..QualityGate::default()
        }),
        ..CreateRollout::new("kws", "v2")
    }
}

fn report(device: &str, seq: u32, manifest: u32, state: u8) -> ProgressReport {
    ProgressReport {
        device: device.into(),
        boot: 1,
        seq,
        manifest_seq: manifest,
        state,
        bytes: 0,
        error: 0,
    }
}

fn confirm(rollouts: &Rollouts, devices: &BTreeSet<String>, manifest: u32, now: i64) {
    let reports: Vec<ProgressReport> = devices
        .iter()
        .flat_map(|d| {
            [
                report(d, 1, manifest, ota_state::ACCEPTED),
                report(d, 2, manifest, ota_state::DOWNLOADING),
                report(d, 3, manifest, ota_state::CONFIRMED),
            ]
        })
        .collect();
    rollouts.on_progress(&reports, now);
}

fn offered(log: &[(String, Option<Vec<u8>>)]) -> BTreeSet<String> {
    log.iter()
        .filter(|(_, o)| o.is_some())
        .map(|(d, _)| d.clone())
        .collect()
}

fn events(rollouts: &Rollouts, id: &str) -> Vec<(AuditEvent, Option<u32>)> {
    rollouts
        .audit(id, 0, 1000)
        .unwrap()
        .into_iter()
        .map(|a| (a.record.event, a.record.stage))
        .collect()
}

#[test]
fn a_rollout_goes_through_its_stages_to_completion() {
    let env = Env::new(40);
    let sink = Arc::new(Recorder::default());
    let rollouts = env.open(&sink, T0);
    assert!(rollouts.list().is_empty());
    let status = rollouts.create(request("r1"), "alice", T0).unwrap();
    assert_eq!(status.state, RolloutState::Running);
    assert_eq!(status.target.version, "v2");
    assert_eq!(status.replaces.len(), 1);
    assert_eq!(status.totals.targeted, 40, "other-hw is not in the target");

    // Stage 0's offers went out, each a signed patch from v1 the device's code accepts.
    let log = sink.take();
    let first = offered(&log);
    assert_eq!(first.len() as u64, status.stages[0].counts.offered);
    assert!(first.len() >= 5);
    for (_, offer) in &log {
        let (version, seq, image, base) = env.verify(offer.as_ref().unwrap());
        assert_eq!((version.as_str(), seq), ("v2", 2));
        assert_eq!(image, sha(&env.v2));
        assert_eq!(base, Some(sha(&env.v1)), "a patch from the running image");
    }

    // The state was saved before the offers went out: a fresh read of the store agrees.
    let row = env.store.rollout("r1").unwrap().unwrap();
    assert_eq!(row.state, "running");
    assert_eq!(
        events(&rollouts, "r1"),
        [
            (AuditEvent::Created, None),
            (AuditEvent::StageOpened, Some(0))
        ]
    );

    // Every canary confirms; after the soak the rollout advances and offers the rest.
    confirm(&rollouts, &first, 2, T0 + MINUTE_MS);
    let s = rollouts.status("r1").unwrap();
    assert_eq!(s.stages[0].counts.confirmed, first.len() as u64);
    assert_eq!(s.reports.applied, 3 * first.len() as u64);
    rollouts.tick(T0 + SOAK / 2);
    assert!(sink.take().is_empty(), "nothing new before the soak ends");
    rollouts.tick(T0 + SOAK + MINUTE_MS);
    let s = rollouts.status("r1").unwrap();
    assert_eq!(s.stage, 1, "{:?}", s.holding);
    let rest = offered(&sink.take());
    assert_eq!(rest.len(), 40 - first.len());
    assert!(rest.is_disjoint(&first));

    confirm(&rollouts, &rest, 2, T0 + SOAK + 2 * MINUTE_MS);
    rollouts.tick(T0 + 2 * SOAK + 3 * MINUTE_MS);
    let s = rollouts.status("r1").unwrap();
    assert_eq!(s.state, RolloutState::Completed, "{:?}", s.holding);
    assert_eq!(s.totals.confirmed, 40);
    assert_eq!(
        events(&rollouts, "r1"),
        [
            (AuditEvent::Created, None),
            (AuditEvent::StageOpened, Some(0)),
            (AuditEvent::Advanced, Some(0)),
            (AuditEvent::StageOpened, Some(1)),
            (AuditEvent::Advanced, Some(1)),
            (AuditEvent::Completed, Some(1)),
        ]
    );
    let audit = rollouts.audit("r1", 0, 1000).unwrap();
    assert_eq!(audit[0].record.cause, Cause::Operator("alice".into()));
    // Paging by audit id.
    let page = rollouts.audit("r1", audit[1].id, 2).unwrap();
    assert_eq!(page, audit[2..4].to_vec());

    // A completed rollout still offers the update to devices that join its target later.
    env.add_device("late", "v1", true);
    rollouts.on_devices_changed(&["late".into()], T0 + 3 * SOAK);
    let log = sink.take();
    assert_eq!(offered(&log), BTreeSet::from(["late".to_owned()]));
    assert_eq!(env.verify(log[0].1.as_ref().unwrap()).0, "v2");
    // Revoking a device that never installed makes it leave.
    env.store.registry().revoke("late").unwrap();
    rollouts.on_devices_changed(&["late".into()], T0 + 3 * SOAK + 1);
    assert_eq!(rollouts.status("r1").unwrap().totals.targeted, 40);

    assert_eq!(rollouts.offer_failures(), 0);
    assert!(matches!(
        rollouts.status("nope"),
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(
        rollouts.pause("r1", "bob", "why", T0 + 3 * SOAK),
        Err(ServiceError::Conflict(_))
    ));
}

#[test]
fn abort_registers_a_rollback_version_above_the_target_and_offers_it() {
    let env = Env::new(20);
    let sink = Arc::new(Recorder::default());
    let rollouts = env.open(&sink, T0);
    rollouts.create(request("r2"), "alice", T0).unwrap();
    let first = offered(&sink.take());
    // Some canaries confirm, one is still downloading, the others never reported.
    let confirmed: BTreeSet<String> = first.iter().take(3).cloned().collect();
    confirm(&rollouts, &confirmed, 2, T0 + MINUTE_MS);
    let downloading = first.iter().nth(3).unwrap().clone();
    rollouts.on_progress(
        &[report(&downloading, 1, 2, ota_state::DOWNLOADING)],
        T0 + MINUTE_MS,
    );

    // A second active rollout of the model is refused while this one runs.
    let err = rollouts.create(request("r3"), "bob", T0 + MINUTE_MS);
    assert!(matches!(err, Err(ServiceError::Conflict(_))), "{err:?}");
    // So is an id taken, and a plan the engine cannot run is a bad request.
    assert!(matches!(
        rollouts.create(request("r2"), "bob", T0),
        Err(ServiceError::Conflict(_))
    ));
    let mut bad = request("r-bad");
    bad.stages.as_mut().unwrap()[0].share = 0.0;
    assert!(matches!(
        rollouts.create(bad, "bob", T0),
        Err(ServiceError::Invalid(_))
    ));
    assert!(matches!(
        rollouts.create(CreateRollout::new("kws", "v9"), "bob", T0),
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(
        rollouts.resume("r2", "bob", T0),
        Err(ServiceError::Conflict(_))
    ));

    let s = rollouts
        .abort(
            "r2",
            "bob",
            "bad reports from the field",
            T0 + 2 * MINUTE_MS,
        )
        .unwrap();
    assert_eq!(s.state, RolloutState::RollingBack);
    let log = sink.take();
    // Every forward offer is withdrawn first ...
    let withdrawn: BTreeSet<String> = log
        .iter()
        .filter(|(_, o)| o.is_none())
        .map(|(d, _)| d.clone())
        .collect();
    assert_eq!(withdrawn, first);
    let first_rollback = log.iter().position(|(_, o)| o.is_some()).unwrap();
    assert!(log[..first_rollback].iter().all(|(_, o)| o.is_none()));
    // ... then the rollback version (v1's artifact, seq above the target's) is offered to
    // every device that took or may be taking v2.
    let versions = env.ota.versions("kws").unwrap();
    let rb = &versions[0];
    assert_eq!((rb.model_version.as_str(), rb.seq), ("v1+rb3", 3));
    assert_eq!(rb.created_by, "rollout:r2");
    assert_eq!(rb.sha256, hex::encode(sha(&env.v1)));
    let rolled: BTreeSet<String> = offered(&log);
    assert!(rolled.is_superset(&confirmed));
    assert!(rolled.contains(&downloading));
    for (_, offer) in log.iter().filter(|(_, o)| o.is_some()) {
        let (version, seq, image, base) = env.verify(offer.as_ref().unwrap());
        assert_eq!((version.as_str(), seq), ("v1+rb3", 3));
        assert_eq!(image, sha(&env.v1));
        assert_eq!(base, Some(sha(&env.v2)), "a patch from the new image");
    }
    let s = rollouts.status("r2").unwrap();
    let rbs = s.rollback.as_ref().unwrap();
    assert!(rbs.waiting_for_versions.is_empty());
    assert_eq!(rbs.versions["v1"].seq, 3);

    // The rollback installs finish: the rollout is aborted.
    confirm(&rollouts, &rolled, 3, T0 + 3 * MINUTE_MS);
    rollouts.tick(T0 + 4 * MINUTE_MS);
    let s = rollouts.status("r2").unwrap();
    assert_eq!(s.state, RolloutState::Aborted, "{:?}", s.rollback);
    let ev: Vec<AuditEvent> = events(&rollouts, "r2").into_iter().map(|e| e.0).collect();
    for e in [
        AuditEvent::Aborted,
        AuditEvent::RollbackStarted,
        AuditEvent::RollbackVersionReady,
        AuditEvent::RollbackCompleted,
    ] {
        assert!(ev.contains(&e), "{e:?} in {ev:?}");
    }
    let aborted = rollouts
        .audit("r2", 0, 100)
        .unwrap()
        .into_iter()
        .find(|a| a.record.event == AuditEvent::Aborted)
        .unwrap();
    assert_eq!(aborted.record.cause, Cause::Operator("bob".into()));
    assert_eq!(aborted.record.note, "bad reports from the field");

    // Once aborted, a new rollout of the model may start; the old one is superseded.
    env.ota.register(&upload("v4", 4), &env.v2, T0).unwrap();
    let mut next = request("r4");
    next.version = "v4".into();
    let s = rollouts.create(next, "alice", T0 + 5 * MINUTE_MS).unwrap();
    assert_eq!(
        s.replaces.iter().map(|v| v.seq).collect::<Vec<_>>(),
        [3, 2, 1]
    );
    assert!(rollouts.superseded("r2").unwrap());
    assert!(matches!(
        rollouts.abort("r2", "bob", "", T0 + 5 * MINUTE_MS),
        Err(ServiceError::Conflict(_))
    ));
    assert_eq!(
        rollouts
            .list()
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        ["r4", "r2"]
    );
}

#[test]
fn a_rollback_version_registered_before_a_crash_is_reused() {
    let env = Env::new(10);
    let sink = Arc::new(Recorder::default());
    let rollouts = env.open(&sink, T0);
    rollouts.create(request("r5"), "alice", T0).unwrap();
    // As if a previous run registered it and died before saving the rollout.
    let mut up = upload("v1+rb3", 3);
    up.by = "rollout:r5".into();
    env.ota.register(&up, &env.v1, T0).unwrap();
    rollouts.abort("r5", "bob", "", T0 + MINUTE_MS).unwrap();
    let versions = env.ota.versions("kws").unwrap();
    assert_eq!(versions.len(), 3, "no second rollback version");
    let s = rollouts.status("r5").unwrap();
    assert_eq!(s.rollback.unwrap().versions["v1"].version, "v1+rb3");
}

/// Runs the same inputs on a service that restarts after `restart_after` steps (or never) and
/// returns the final status and audit events, and the publishes after the restart.
/// The final status, the audit events, and the offers re-published at the restart.
type Outcome = (
    serde_json::Value,
    Vec<(AuditEvent, Option<u32>)>,
    BTreeMap<String, Vec<u8>>,
);

/// One input to the service.
type Input<'a> = Box<dyn Fn(&Rollouts) + 'a>;

fn scripted(restart_after: Option<usize>) -> Outcome {
    let env = Env::new(30);
    let sink = Arc::new(Recorder::default());
    let mut rollouts = env.open(&sink, T0);
    rollouts.create(request("r6"), "alice", T0).unwrap();
    let first = offered(&sink.log.lock().unwrap());
    let half: BTreeSet<String> = first.iter().take(first.len() / 2).cloned().collect();
    let other: BTreeSet<String> = first.difference(&half).cloned().collect();
    let mut republished = BTreeMap::new();
    let steps: Vec<Input> = vec![
        Box::new(|r| confirm(r, &half, 2, T0 + MINUTE_MS)),
        Box::new(|r| r.tick(T0 + 2 * MINUTE_MS)),
        Box::new(|r| {
            r.pause("r6", "ops", "lunch", T0 + 3 * MINUTE_MS)
                .map(drop)
                .unwrap()
        }),
        Box::new(|r| confirm(r, &other, 2, T0 + 4 * MINUTE_MS)),
        Box::new(|r| r.resume("r6", "ops", T0 + 5 * MINUTE_MS).map(drop).unwrap()),
        Box::new(|r| r.tick(T0 + SOAK + 6 * MINUTE_MS)),
        Box::new(|r| r.tick(T0 + SOAK + 7 * MINUTE_MS)),
    ];
    for (i, step) in steps.iter().enumerate() {
        if restart_after == Some(i) {
            let before = serde_json::to_value(rollouts.status("r6").unwrap()).unwrap();
            let in_force = retained(&sink.take());
            drop(rollouts);
            // The broker kept nothing.
            rollouts = env.open(&sink, T0 + 3 * MINUTE_MS + 1);
            let after = serde_json::to_value(rollouts.status("r6").unwrap()).unwrap();
            assert_eq!(before, after, "the same status after a restart");
            republished = retained(&sink.take());
            assert_eq!(
                republished.keys().collect::<Vec<_>>(),
                in_force.keys().collect::<Vec<_>>(),
                "the offers in force are published again"
            );
            for offer in republished.values() {
                assert_eq!(env.verify(offer).0, "v2");
            }
        }
        step(&rollouts);
    }
    let status = serde_json::to_value(rollouts.status("r6").unwrap()).unwrap();
    (status, events(&rollouts, "r6"), republished)
}

#[test]
fn a_restart_mid_rollout_republishes_offers_and_changes_nothing() {
    let (straight, straight_events, _) = scripted(None);
    let (restarted, restarted_events, republished) = scripted(Some(3));
    assert!(!republished.is_empty());
    assert_eq!(straight_events, restarted_events);
    assert_eq!(straight, restarted);
    assert_eq!(straight["stage"], 1);
    assert!(
        straight_events.contains(&(AuditEvent::Paused, Some(0)))
            && straight_events.contains(&(AuditEvent::StageOpened, Some(1)))
    );
}

#[test]
fn a_policy_starts_rollouts_of_new_versions() {
    let env = Env::new(10);
    let sink = Arc::new(Recorder::default());
    let rollouts = env.open(&sink, T0);
    assert_eq!(rollouts.policy("kws").unwrap(), None);
    assert_eq!(
        rollouts.on_version_registered("kws", "v2", T0).unwrap(),
        None
    );
    let template = request("unused");
    let policy = RolloutPolicy {
        stages: template.stages.clone(),
        install: template.install.clone(),
        quality: template.quality.clone(),
        ..RolloutPolicy::default()
    };
    let mut bad = policy.clone();
    bad.offers_per_minute = Some(0);
    assert!(matches!(
        rollouts.set_policy("kws", Some(&bad), T0),
        Err(ServiceError::Invalid(_))
    ));
    assert!(!rollouts.set_policy("kws", Some(&policy), T0).unwrap());
    assert_eq!(rollouts.policy("kws").unwrap(), Some(policy.clone()));

    let s = rollouts
        .on_version_registered("kws", "v2", T0)
        .unwrap()
        .expect("a rollout started");
    assert_eq!(s.target.version, "v2");
    assert!(s.id.starts_with("kws-v2-"), "{}", s.id);
    let audit = rollouts.audit(&s.id, 0, 1).unwrap();
    assert_eq!(audit[0].record.cause, Cause::Operator("policy".into()));
    assert!(!offered(&sink.take()).is_empty());

    // While it runs, a newer version waits.
    env.ota.register(&upload("v3", 3), &env.v2, T0).unwrap();
    assert_eq!(
        rollouts.on_version_registered("kws", "v3", T0).unwrap(),
        None
    );
    assert_eq!(rollouts.list().len(), 1);

    assert!(rollouts.set_policy("kws", None, T0).unwrap());
    assert!(!rollouts.set_policy("kws", None, T0).unwrap());
    assert_eq!(rollouts.policy("kws").unwrap(), None);
}

/// `serve` hands the rollouts what its own ingest committed at once and what every process
/// committed from the store's change feed, so the same reports and device changes arrive
/// twice (and again after a restart): the second delivery changes no count (successes,
/// failures, stale reports), writes no audit record and does not even save the rollout.
#[test]
fn reports_and_device_changes_delivered_twice_change_nothing() {
    let env = Env::new(20);
    let sink = Arc::new(Recorder::default());
    let rollouts = env.open(&sink, T0);
    rollouts.create(request("r1"), "alice", T0).unwrap();
    let first: Vec<String> = offered(&sink.take()).into_iter().collect();
    let (ok, failed, away) = (&first[0], &first[1], &first[2]);
    let reports = [
        report(ok, 1, 2, ota_state::ACCEPTED),
        report(ok, 2, 2, ota_state::CONFIRMED),
        report(failed, 1, 2, ota_state::FAILED),
    ];
    let t1 = T0 + MINUTE_MS;
    assert!(rollouts.on_progress(&reports, t1));
    env.set_state(away, "kws", "v1", "nrf52840", false);
    assert!(rollouts.on_devices_changed(std::slice::from_ref(away), t1));

    let status = rollouts.status("r1").unwrap();
    assert_eq!(
        (status.totals.confirmed, status.totals.failed),
        (1, 1),
        "{status:?}"
    );
    assert_eq!(status.reports.applied, 3);
    let audit = rollouts.audit("r1", 0, 1000).unwrap();
    let row = env.store.rollout("r1").unwrap().unwrap();

    // Again, as the store's feed delivers them (each device's newest report), twice, and the
    // devices whose presence changed.
    let t2 = t1 + MINUTE_MS;
    assert!(rollouts.on_progress(&reports[1..], t2));
    assert!(rollouts.on_progress(&reports[1..], t2));
    assert!(rollouts.on_devices_changed(&first, t2));
    assert!(rollouts.on_devices_changed(std::slice::from_ref(away), t2));

    let again = rollouts.status("r1").unwrap();
    assert_eq!(again.totals, status.totals);
    assert_eq!(again.reports, status.reports, "nothing counted twice");
    assert_eq!(again.stages, status.stages);
    assert_eq!(rollouts.audit("r1", 0, 1000).unwrap(), audit);
    assert_eq!(
        env.store.rollout("r1").unwrap().unwrap(),
        row,
        "not saved again"
    );
    assert!(sink.take().is_empty(), "nothing published");

    // An older report is still a late arrival, as before (when the store's feed overtakes the
    // in-process one, a batch's older reports arrive after its newest: counted once, as
    // stale, and no install changes).
    assert!(rollouts.on_progress(&[report(ok, 0, 2, ota_state::DOWNLOADING)], t2));
    assert_eq!(rollouts.status("r1").unwrap().reports.stale, 1);

    // After a restart (the rollout read back from the store), the feed's redelivery from the
    // saved cursor changes nothing either.
    drop(rollouts);
    let rollouts = env.open(&sink, t2);
    sink.take();
    let row = env.store.rollout("r1").unwrap().unwrap();
    assert!(rollouts.on_progress(&reports[1..], t2 + 1));
    assert!(rollouts.on_devices_changed(&first, t2 + 1));
    assert_eq!(env.store.rollout("r1").unwrap().unwrap(), row);
    assert_eq!(rollouts.status("r1").unwrap().totals, status.totals);
}
