//! Several stores on one database (the `serve` replicas), on both backends: migrations, the
//! registry catching up, sections, concurrent writers, calls from async threads, reconnection.
//! Plus `bench_commit` (ignored): commit and read timings of a 1,000-device batch.

use std::collections::BTreeMap;
use std::sync::Barrier;
use std::time::Instant;

use crate::db::args;
use crate::registry::lock;
use crate::testing::TestDb;
use crate::{Batch, DeviceState, Presence, ReplayWindow, Store, StoreError, WindowWrite, schema};

fn schema_version(t: &TestDb) -> i64 {
    match t.raw_postgres() {
        Some(mut pg) => pg
            .query_one("SELECT version FROM schema_version", &[])
            .unwrap()
            .get(0),
        None => rusqlite::Connection::open(t.dir().join("tinyfleet.db"))
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap(),
    }
}

#[test]
fn migrations_from_empty_are_complete_and_reopening_changes_nothing() {
    for t in TestDb::all() {
        let store = t.open();
        assert_eq!(schema_version(&t), schema::VERSION, "{}", t.name());
        store.registry().provision("d1", BTreeMap::new()).unwrap();
        drop(store);
        let store = t.open();
        assert_eq!(schema_version(&t), schema::VERSION, "{}", t.name());
        assert!(store.registry().get("d1").is_some());
        drop(store);
        // A database from a newer build is refused, by both backends.
        match t.raw_postgres() {
            Some(mut pg) => {
                pg.execute("UPDATE schema_version SET version = 99", &[])
                    .unwrap();
            }
            None => {
                rusqlite::Connection::open(t.dir().join("tinyfleet.db"))
                    .unwrap()
                    .pragma_update(None, "user_version", 99)
                    .unwrap();
            }
        }
        match t.try_open() {
            Err(StoreError::SchemaTooNew { found, known, .. }) => {
                assert_eq!((found, known), (99, schema::VERSION));
            }
            other => panic!("{}: {other:?}", t.name()),
        }
    }
}

#[test]
fn replicas_opening_at_once_migrate_once() {
    for t in TestDb::all() {
        const N: usize = 6;
        let barrier = Barrier::new(N);
        let stores: Vec<Store> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..N)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        t.open()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(schema_version(&t), schema::VERSION, "{}", t.name());
        // They all work on the same data.
        stores[0]
            .registry()
            .provision("d1", BTreeMap::new())
            .unwrap();
        for s in &stores {
            assert!(s.registry().get("d1").is_some(), "{}", t.name());
        }
    }
}

#[test]
fn the_registry_sees_other_replicas_provisioning_and_revocation() {
    for t in TestDb::all() {
        let a = t.open();
        let b = t.open();
        let (ra, rb) = (a.registry(), b.registry());
        // Provisioned elsewhere: found by the first lookup, at once.
        let y = ra
            .provision("y", BTreeMap::from([("site".into(), "n".into())]))
            .unwrap();
        assert!(rb.check_password("y", &y.mqtt_password), "{}", t.name());
        assert_eq!(
            rb.mac_key("y").map(|k| hex::encode(k.0)),
            Some(y.mac_key.clone())
        );
        assert_eq!(rb.tags("y")["site"], "n");
        // An id another replica already holds is refused even if this map lacks it.
        ra.provision("z", BTreeMap::new()).unwrap();
        assert!(matches!(
            rb.provision("z", BTreeMap::new()),
            Err(StoreError::DeviceExists(_))
        ));
        // Unknown ids are remembered as unknown for a while...
        assert!(rb.get("x").is_none());
        let x = ra.provision("x", BTreeMap::new()).unwrap();
        assert!(!rb.check_password("x", &x.mqtt_password), "negative cache");
        // ...and a refresh brings in what changed.
        assert!(rb.refresh().unwrap() >= 3);
        assert!(rb.check_password("x", &x.mqtt_password));
        // Revoked elsewhere: refused here from the next refresh on.
        ra.revoke("y").unwrap();
        assert!(rb.mac_key("y").is_some(), "not before the refresh");
        assert_eq!(rb.refresh().unwrap(), 1, "only the changed row is read");
        assert!(rb.mac_key("y").is_none(), "{}", t.name());
        assert!(!rb.check_password("y", &y.mqtt_password));
        assert!(rb.get("y").unwrap().revoked_ms.is_some());
        assert_eq!(rb.refresh().unwrap(), 0);
        let exported: Vec<String> = rb.broker_passwords().0.into_iter().map(|p| p.0).collect();
        assert_eq!(exported, ["x", "z"]);
        // A revocation made here and one read back from the database agree.
        rb.revoke("x").unwrap();
        ra.refresh().unwrap();
        assert_eq!(ra.get("x"), rb.get("x"));
    }
}

#[test]
fn lookups_of_unknown_ids_are_rationed() {
    for t in TestDb::all() {
        let a = t.open();
        let b = t.open();
        // A flood of unknown (valid) ids spends the lookup budget...
        for i in 0..(crate::LOOKUP_BURST as usize + 50) {
            assert!(!b.registry().check_password(&format!("ghost-{i}"), "pw"));
        }
        // ...so a device provisioned meanwhile is found by the refresh, not by a lookup.
        let c = a.registry().provision("late", BTreeMap::new()).unwrap();
        let found_now = b.registry().check_password("late", &c.mqtt_password);
        b.registry().refresh().unwrap();
        assert!(b.registry().check_password("late", &c.mqtt_password));
        // (Refilled at LOOKUP_RATE per second: a lookup may have been allowed by then.)
        let _ = found_now;
        // Invalid ids never reach the database.
        assert!(b.registry().get("no/such id").is_none());
    }
}

/// Two replicas read-modify-write the same device, windows, counter and replay window,
/// each batch under the `ingest` section: every increment survives.
#[test]
fn two_writers_under_the_section_lose_nothing() {
    for t in TestDb::all() {
        let setup = t.open();
        setup.registry().provision("d1", BTreeMap::new()).unwrap();
        const ROUNDS: u32 = 40;
        let writer = |store: Store| {
            move || {
                for _ in 0..ROUNDS {
                    let _section = store.exclusive("ingest").unwrap();
                    let mut state = store.device_state("d1").unwrap().unwrap_or(DeviceState {
                        id: "d1".into(),
                        ..DeviceState::default()
                    });
                    state.summaries += 1;
                    let n = |agg: Option<serde_json::Value>| {
                        agg.map_or(0, |a| a["n"].as_u64().unwrap()) + 1
                    };
                    let dw = n(store.device_window("d1", 0).unwrap().map(|w| w.agg));
                    let cw = n(store.cohort_window("c", 0).unwrap().map(|w| w.agg));
                    let counter = store
                        .counters()
                        .unwrap()
                        .get("accepted")
                        .copied()
                        .unwrap_or(0)
                        + 1;
                    let replay = store.replay_window("d1", 2).unwrap().unwrap_or_default();
                    let batch = Batch {
                        replay: vec![(
                            "d1".into(),
                            2,
                            ReplayWindow {
                                max_seq: replay.max_seq + 1,
                                ..replay
                            },
                        )],
                        states: vec![state],
                        device_windows: vec![WindowWrite {
                            key: "d1".into(),
                            start_ms: 0,
                            cohort: Some("c".into()),
                            json: format!(r#"{{"n":{dw}}}"#),
                        }],
                        cohort_windows: vec![WindowWrite {
                            key: "c".into(),
                            start_ms: 0,
                            cohort: None,
                            json: format!(r#"{{"n":{cw}}}"#),
                        }],
                        counters: vec![("accepted".into(), counter)],
                        ota: vec![],
                        changed: vec![],
                    };
                    store.commit(&batch).unwrap();
                }
            }
        };
        let one = std::thread::spawn(writer(t.open()));
        let two = std::thread::spawn(writer(t.open()));
        one.join().unwrap();
        two.join().unwrap();
        let total = 2 * ROUNDS as u64;
        assert_eq!(
            setup.device_state("d1").unwrap().unwrap().summaries,
            total,
            "{}",
            t.name()
        );
        assert_eq!(
            setup.device_window("d1", 0).unwrap().unwrap().agg["n"],
            total
        );
        assert_eq!(
            setup.cohort_window("c", 0).unwrap().unwrap().agg["n"],
            total
        );
        assert_eq!(setup.counters().unwrap()["accepted"], total as i64);
        assert_eq!(
            setup.replay_window("d1", 2).unwrap().unwrap().max_seq as u64,
            total
        );
    }
}

/// The sync PostgreSQL client would panic if run on a thread driving async tasks; the store
/// moves such calls off it. Calls from both runtime flavours, a drop included, must work.
#[test]
fn calls_from_async_threads_do_not_panic() {
    for t in TestDb::all() {
        let store = t.open();
        store.registry().provision("d1", BTreeMap::new()).unwrap();
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = t.open();
        current.block_on(async move {
            // A lookup that misses the map reads the database (the embedded broker's case).
            assert!(s.registry().get("d1").is_some());
            assert!(s.counters().unwrap().is_empty());
            drop(s.exclusive("x").unwrap());
            drop(s);
        });
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let s = t.open();
        multi.block_on(async move {
            tokio::spawn(async move {
                assert!(s.registry().get("d1").is_some());
                assert!(s.device_state("d1").unwrap().is_none());
                drop(s.exclusive("x").unwrap());
                drop(s);
            })
            .await
            .unwrap();
        });
        drop(store);
    }
}

#[test]
fn a_lost_connection_is_opened_again() {
    let Some(t) = TestDb::postgres() else {
        return;
    };
    let store = t.open();
    drop(store.exclusive("ingest").unwrap());
    let kill = || {
        let mut admin = t.raw_postgres().unwrap();
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap();
    };
    kill();
    // A read on the broken connection is tried again on a new one.
    assert!(store.counters().unwrap().is_empty());
    // A broken spare is replaced.
    drop(store.exclusive("ingest").unwrap());
    // A transaction's BEGIN on a broken connection is too; the commit goes through whole.
    kill();
    let batch = Batch {
        counters: vec![("a".into(), 1), ("b".into(), 2)],
        ..Batch::default()
    };
    store.commit(&batch).unwrap();
    assert_eq!(store.counters().unwrap().len(), 2);
    // A registry refresh after a break.
    kill();
    assert_eq!(store.registry().refresh().unwrap(), 0);
}

#[test]
fn batches_with_a_key_twice_keep_its_last_row() {
    for t in TestDb::all() {
        let store = t.open();
        store.registry().provision("d1", BTreeMap::new()).unwrap();
        let w = |max_seq| {
            (
                "d1".to_owned(),
                2,
                ReplayWindow {
                    boot: 1,
                    max_seq,
                    bitmap: 1,
                },
            )
        };
        let state = |summaries| DeviceState {
            id: "d1".into(),
            presence: Presence {
                online: true,
                ..Presence::default()
            },
            summaries,
            ..DeviceState::default()
        };
        store
            .commit(&Batch {
                replay: vec![w(5), w(7)],
                states: vec![state(1), state(2)],
                counters: vec![("a".into(), 1), ("a".into(), 3)],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(store.replay_window("d1", 2).unwrap().unwrap().max_seq, 7);
        assert_eq!(store.device_state("d1").unwrap().unwrap().summaries, 2);
        assert_eq!(store.counters().unwrap()["a"], 3, "{}", t.name());
    }
}

/// Commit and read timings of a 1,000-device batch on each backend:
/// `cargo test -p tinyfleet-store --release bench_commit -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_commit() {
    const DEVICES: usize = 1000;
    const COMMITS: u32 = 20;
    for t in TestDb::all() {
        let store = t.open();
        let ids: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:05}")).collect();
        // Rows written directly: provisioning one by one is not what is measured.
        lock(store.conn())
            .transaction(|db| {
                for id in &ids {
                    db.execute(
                        "INSERT INTO devices (id, salt, password_hash, created_ms) \
                         VALUES (?1, ?2, ?2, 0)",
                        args![id, &[0u8; 32][..]],
                    )?;
                }
                Ok(())
            })
            .unwrap();
        let agg = format!(
            r#"{{"inferences":100,"hist":[{}]}}"#,
            vec!["12"; 120].join(",")
        );
        let batch = |round: u32| Batch {
            replay: ids
                .iter()
                .map(|id| {
                    (
                        id.clone(),
                        2,
                        ReplayWindow {
                            boot: 1,
                            max_seq: round,
                            bitmap: u64::MAX,
                        },
                    )
                })
                .collect(),
            states: ids
                .iter()
                .map(|id| DeviceState {
                    id: id.clone(),
                    presence: Presence {
                        online: true,
                        ..Presence::default()
                    },
                    model_id: Some("kws".into()),
                    model_version: Some("1".into()),
                    hw: Some("nrf".into()),
                    health: Some(serde_json::json!({"battery_mv": 3300, "temp_c": 21})),
                    summaries: u64::from(round),
                    last_seen_ms: Some(i64::from(round)),
                    updated_ms: i64::from(round),
                    ..DeviceState::default()
                })
                .collect(),
            device_windows: ids
                .iter()
                .map(|id| WindowWrite {
                    key: id.clone(),
                    // A new window each round: a device sends one summary per window.
                    start_ms: 60_000 * i64::from(round),
                    cohort: Some("kws@1/nrf".into()),
                    json: agg.clone(),
                })
                .collect(),
            cohort_windows: (0..10)
                .map(|i| WindowWrite {
                    key: format!("kws@1/nrf{i}"),
                    start_ms: 60_000,
                    cohort: None,
                    json: agg.clone(),
                })
                .collect(),
            counters: (0..30)
                .map(|i| (format!("c{i}"), i64::from(round)))
                .collect(),
            ota: vec![],
            changed: vec![],
        };
        let batches: Vec<Batch> = (0..=COMMITS).map(batch).collect();
        store.commit(&batches[0]).unwrap();
        let started = Instant::now();
        for b in &batches[1..] {
            store.commit(b).unwrap();
        }
        let per_commit = started.elapsed() / COMMITS;
        // Where the time goes: one table per commit.
        let mut parts = Vec::new();
        for (name, keep) in [("replay", 0), ("states", 1), ("device windows", 2)] {
            let started = Instant::now();
            for b in &batches[1..] {
                let mut part = Batch::default();
                match keep {
                    0 => part.replay = b.replay.clone(),
                    1 => part.states = b.states.clone(),
                    _ => part.device_windows = b.device_windows.clone(),
                }
                store.commit(&part).unwrap();
            }
            let ms = (started.elapsed() / COMMITS).as_secs_f64() * 1e3;
            parts.push(format!("{name} {ms:.1} ms"));
        }
        drop(store.exclusive("ingest").unwrap());
        let started = Instant::now();
        for id in &ids {
            store.device_state(id).unwrap().unwrap();
        }
        let per_read = started.elapsed() / DEVICES as u32;
        // The same reads for the whole batch at once (states, replay windows, windows).
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(store.device_states(&refs).unwrap().len(), DEVICES);
            assert_eq!(store.replay_windows(&refs).unwrap().len(), DEVICES);
            assert_eq!(
                store
                    .device_windows_at(&refs, 60_000 * i64::from(COMMITS))
                    .unwrap()
                    .len(),
                DEVICES
            );
        }
        let bulk = started.elapsed() / 5;
        let started = Instant::now();
        for _ in 0..COMMITS {
            let _section = store.exclusive("ingest").unwrap();
        }
        let per_section = started.elapsed() / COMMITS;
        println!(
            "{:>8}: commit of {DEVICES} devices (state + replay + window, 10 cohort windows, \
             30 counters): {:.1} ms = {:.1} commits/s; one device_state read: {:.0} µs; all \
             {DEVICES} states, replay windows and windows in 3 bulk reads: {:.1} ms; \
             exclusive take+release: {:.0} µs; one table per commit: {}",
            t.name(),
            per_commit.as_secs_f64() * 1e3,
            1.0 / per_commit.as_secs_f64(),
            per_read.as_secs_f64() * 1e6,
            bulk.as_secs_f64() * 1e3,
            per_section.as_secs_f64() * 1e6,
            parts.join(", "),
        );
    }
}
