//! The synchronous pipeline over a real SQLite store: dedup across restarts, presence in any
//! order, gaps, aggregation, and refusals with reasons.

use std::collections::BTreeMap;
use std::sync::Arc;

use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};
use tinyfleet_ingest::aggregate::WindowAgg;
use tinyfleet_ingest::metrics::{Drop, Metrics};
use tinyfleet_ingest::pipeline::{Outcome, Pipeline, PipelineConfig};
use tinyfleet_store::Store;

struct Device {
    id: String,
    key: DeviceKey,
    monitor_seed: u64,
}

fn key_of(hex_key: &str) -> DeviceKey {
    DeviceKey(hex::decode(hex_key).unwrap().try_into().unwrap())
}

fn provision(store: &Store, id: &str, tags: &[(&str, &str)]) -> Device {
    let tags = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<BTreeMap<_, _>>();
    let creds = store.registry().provision(id, tags).unwrap();
    Device {
        id: id.to_owned(),
        key: key_of(&creds.mac_key),
        monitor_seed: id.len() as u64,
    }
}

/// `msg` sealed by `d` as a `kind` message: `(topic, payload)`.
fn sealed<T: serde::Serialize>(d: &Device, kind: Kind, msg: &T) -> (String, Vec<u8>) {
    let id = DeviceId::new(&d.id).unwrap();
    let mut out = [0u8; 256];
    let n = wire::seal(id, &d.key, kind, msg, &mut out).unwrap();
    (Topic::new(id, kind).as_str().to_owned(), out[..n].to_vec())
}

fn hello(d: &Device, boot: u32, seq: u32) -> (String, Vec<u8>) {
    hello_with(d, boot, seq, "3")
}

fn will(d: &Device, boot: u32, seq: u32) -> (String, Vec<u8>) {
    sealed(d, Kind::Will, &wire::Will { boot, seq })
}

/// `count` summaries of boot `boot`, 50 inferences each.
fn summaries(d: &Device, boot: u32, count: usize) -> Vec<(String, Vec<u8>)> {
    let profile = ReferenceProfile::default();
    let id = DeviceId::new(&d.id).unwrap();
    let mut m = ReferenceMonitor::new(profile.config(3), boot, wire::reset::WATCHDOG, 0);
    let mut rng = Rng::new(d.monitor_seed + u64::from(boot));
    let topic = Topic::new(id, Kind::Summary).as_str().to_owned();
    (0..count)
        .map(|w| {
            for _ in 0..50 {
                m.record(&sample(&mut rng, &StreamParams::default()).inference())
                    .unwrap();
            }
            m.set_battery_mv(3300);
            let mut out = [0u8; 512];
            let n = m
                .finish_window(60_000 * (w as u64 + 1), None, id, &d.key, &mut out)
                .unwrap();
            (topic.clone(), out[..n].to_vec())
        })
        .collect()
}

fn pipeline(store: &Store) -> Pipeline {
    Pipeline::new(
        PipelineConfig::default(),
        store.clone(),
        Arc::new(Metrics::default()),
    )
}

fn commit(p: &mut Pipeline) {
    let (batch, _) = p.take_batch();
    p.store().commit(&batch).unwrap();
}

const T0: i64 = 1_764_000_000_000;

#[test]
fn summaries_are_counted_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = provision(&store, "dev-a", &[("site", "north")]);
    let mut p = pipeline(&store);
    let (t, m) = hello(&d, 1, 0);
    assert_eq!(p.handle(&t, &m, T0), Outcome::Accepted(Kind::Hello));
    let sums = summaries(&d, 1, 6);
    for (t, m) in &sums[..4] {
        assert_eq!(p.handle(t, m, T0 + 1), Outcome::Accepted(Kind::Summary));
    }
    // A QoS 1 redelivery and a replay by an attacker are both dropped.
    assert_eq!(
        p.handle(&sums[1].0, &sums[1].1, T0 + 2),
        Outcome::Dropped(Drop::Duplicate)
    );
    commit(&mut p);
    drop(p);

    // Restart: the broker redelivers everything unacknowledged, including committed ones.
    let store = Store::open(dir.path()).unwrap();
    let mut p = pipeline(&store);
    for (t, m) in &sums[2..4] {
        assert_eq!(p.handle(t, m, T0 + 3), Outcome::Dropped(Drop::Duplicate));
    }
    for (t, m) in &sums[4..] {
        assert_eq!(p.handle(t, m, T0 + 3), Outcome::Accepted(Kind::Summary));
    }
    commit(&mut p);
    let state = store.device_state("dev-a").unwrap().unwrap();
    assert_eq!(state.summaries, 6);
    assert_eq!(state.lost_summaries, 0);
    assert_eq!(state.model_id.as_deref(), Some("kws"));
    assert!(state.presence.online);
    assert_eq!(p.metrics().rejected("duplicate"), 3);
    assert_eq!(p.metrics().accepted("summary"), 6);
    // The counters persisted with the data.
    assert_eq!(store.counters().unwrap()["accepted.summary"], 6);

    // Aggregates: all six windows of 50 inferences in one 5-minute window, for the model cohort
    // and the tag cohort.
    let start = T0.div_euclid(300_000) * 300_000;
    for cohort in ["kws@3/nrf52840", "tag:site=north"] {
        let w = store.cohort_window(cohort, start).unwrap().unwrap();
        let agg: WindowAgg = serde_json::from_value(w.agg).unwrap();
        assert_eq!(agg.summaries, 6, "{cohort}");
        assert_eq!(agg.inferences, 300, "{cohort}");
    }
    assert_eq!(
        store
            .cohort_window_devices("kws@3/nrf52840", start)
            .unwrap(),
        1
    );
}

#[test]
fn gaps_are_lost_summaries_until_filled() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = provision(&store, "dev-g", &[]);
    let mut p = pipeline(&store);
    let sums = summaries(&d, 1, 5);
    for i in [0, 1, 4] {
        p.handle(&sums[i].0, &sums[i].1, T0);
    }
    commit(&mut p);
    assert_eq!(
        store.device_state("dev-g").unwrap().unwrap().lost_summaries,
        2
    );
    p.handle(&sums[2].0, &sums[2].1, T0);
    commit(&mut p);
    assert_eq!(
        store.device_state("dev-g").unwrap().unwrap().lost_summaries,
        1
    );
    // A new boot starts over; summaries of the old boot are now stale.
    let next = summaries(&d, 2, 1);
    assert_eq!(
        p.handle(&next[0].0, &next[0].1, T0),
        Outcome::Accepted(Kind::Summary)
    );
    assert_eq!(
        p.handle(&sums[3].0, &sums[3].1, T0),
        Outcome::Dropped(Drop::StaleBoot)
    );
}

#[test]
fn forged_misrouted_and_unknown_are_rejected_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = provision(&store, "dev-a", &[]);
    let _b = provision(&store, "dev-b", &[]);
    let mut p = pipeline(&store);
    let sums = summaries(&a, 1, 2);
    // Device A publishes its valid summary on device B's topic.
    let outcome = p.handle("tf/v1/dev-b/sum", &sums[0].1, T0);
    assert_eq!(
        outcome,
        Outcome::Rejected(tinyfleet_ingest::decode::Reject::Forged)
    );
    let outcome = p.handle("tf/v1/nobody/sum", &sums[0].1, T0);
    assert_eq!(
        outcome,
        Outcome::Rejected(tinyfleet_ingest::decode::Reject::UnknownDevice)
    );
    // Valid messages around the bad ones are kept.
    assert_eq!(
        p.handle(&sums[0].0, &sums[0].1, T0),
        Outcome::Accepted(Kind::Summary)
    );
    let mut bad = sums[1].1.clone();
    bad[20] ^= 0x40;
    assert!(matches!(
        p.handle(&sums[1].0, &bad, T0),
        Outcome::Rejected(_)
    ));
    assert_eq!(
        p.handle(&sums[1].0, &sums[1].1, T0),
        Outcome::Accepted(Kind::Summary)
    );
    // Revoked devices are refused from then on.
    store.registry().revoke("dev-a").unwrap();
    let later = summaries(&a, 2, 1);
    assert_eq!(
        p.handle(&later[0].0, &later[0].1, T0),
        Outcome::Rejected(tinyfleet_ingest::decode::Reject::UnknownDevice)
    );
    // The misrouted summary and the corrupted one.
    assert_eq!(p.metrics().rejected("forged"), 2);
    assert_eq!(p.metrics().rejected("unknown_device"), 2);
}

#[test]
fn presence_follows_boot_and_seq_not_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = provision(&store, "dev-p", &[]);
    let online = |p: &mut Pipeline| {
        commit(p);
        store
            .device_state("dev-p")
            .unwrap()
            .unwrap()
            .presence
            .online
    };
    let mut p = pipeline(&store);
    // Retained will of connection (1, 0) arrives before its hello: offline, and the hello does
    // not bring it back.
    let (t, m) = will(&d, 1, 0);
    p.handle(&t, &m, T0);
    let (t, m) = hello(&d, 1, 0);
    p.handle(&t, &m, T0);
    assert!(!online(&mut p));
    // What the hello says the device runs is kept all the same.
    let state = store.device_state("dev-p").unwrap().unwrap();
    assert_eq!(state.model_version.as_deref(), Some("3"));
    // The next connection's hello: online. An old will replayed: nothing changes.
    let (t, m) = hello(&d, 1, 1);
    p.handle(&t, &m, T0);
    assert!(online(&mut p));
    let (t, m) = will(&d, 1, 0);
    assert_eq!(p.handle(&t, &m, T0), Outcome::Dropped(Drop::Duplicate));
    assert!(online(&mut p));
    // Silence: the inactivity timer marks it offline; a summary brings it back.
    assert_eq!(p.sweep_inactive(T0 + 16 * 60_000), 1);
    assert!(!online(&mut p));
    let s = summaries(&d, 1, 1);
    p.handle(&s[0].0, &s[0].1, T0 + 17 * 60_000);
    assert!(online(&mut p));
    // The will of connection (1, 1): offline for good until the next hello.
    let (t, m) = will(&d, 1, 1);
    p.handle(&t, &m, T0 + 18 * 60_000);
    assert!(!online(&mut p));
    let state = store.device_state("dev-p").unwrap().unwrap();
    assert_eq!(state.presence.offline_reason.as_deref(), Some("will"));
    // rumqttd keeps one will per client id: a device that reconnected before the broker noticed
    // its old connection died gets its *new* connection's will fired. A summary newer than any
    // seen before the will proves that connection alive; one from before it does not.
    let s = summaries(&d, 1, 3);
    assert_eq!(
        p.handle(&s[0].0, &s[0].1, T0 + 19 * 60_000),
        Outcome::Dropped(Drop::Duplicate)
    );
    assert!(!online(&mut p));
    p.handle(&s[2].0, &s[2].1, T0 + 19 * 60_000);
    assert!(online(&mut p), "a newer summary after the will");
}

fn hello_with(d: &Device, boot: u32, seq: u32, model_version: &str) -> (String, Vec<u8>) {
    let msg = wire::Hello {
        boot,
        seq,
        fw: "1.0.0",
        model_id: "kws",
        model_version,
        model_seq: 3,
        hw: "nrf52840",
        caps: 0,
        reset: wire::reset::POWER_ON,
        unix_s: None,
    };
    sealed(d, Kind::Hello, &msg)
}

/// Which windows a summary lands in, and what they hold: the device window keeps the cohort it
/// opened with; cohort windows follow the newest hello; every tag has its own cohort; each
/// window is the merge of its summaries' one-summary aggregates (gaps included); the stored
/// health is the newest summary's, as JSON.
#[test]
fn windows_follow_the_hello_and_the_tags() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = provision(&store, "dev-w", &[("site", "north"), ("zone", "z1")]);
    let mut p = pipeline(&store);
    let sums = summaries(&d, 1, 6);
    let decoded: Vec<_> = sums
        .iter()
        .map(|(t, m)| {
            match tinyfleet_ingest::decode::Decoder::default()
                .decode(t, m, store.registry())
                .unwrap()
                .1
            {
                tinyfleet_ingest::decode::DeviceMessage::Summary(s) => s,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let (t, m) = hello_with(&d, 1, 0, "3");
    p.handle(&t, &m, T0);
    // Summaries 0, 1 and (after a gap at 2) 3 under model version 3.
    for i in [0, 1, 3] {
        p.handle(&sums[i].0, &sums[i].1, T0);
    }
    let (t, m) = hello_with(&d, 1, 1, "4");
    p.handle(&t, &m, T0);
    // 2 fills the gap, then 4 and 5, under version 4.
    for i in [2, 4, 5] {
        p.handle(&sums[i].0, &sums[i].1, T0);
    }
    commit(&mut p);

    let one = |i: usize, lost: i64| {
        let mut w = WindowAgg::default();
        w.add(&decoded[i], false);
        w.lost_summaries = lost;
        w
    };
    let merged = |parts: &[(usize, i64)]| {
        let mut w = WindowAgg::default();
        for &(i, lost) in parts {
            w.merge(&one(i, lost));
        }
        w
    };
    let v3 = [(0, 0), (1, 0), (3, 1)];
    let v4 = [(2, -1), (4, 0), (5, 0)];
    let all = [(0, 0), (1, 0), (3, 1), (2, -1), (4, 0), (5, 0)];
    let start = T0.div_euclid(300_000) * 300_000;
    let stored = |cohort: &str| -> WindowAgg {
        serde_json::from_value(store.cohort_window(cohort, start).unwrap().unwrap().agg).unwrap()
    };
    assert_eq!(stored("kws@3/nrf52840"), merged(&v3));
    assert_eq!(stored("kws@4/nrf52840"), merged(&v4));
    assert_eq!(stored("tag:site=north"), merged(&all));
    assert_eq!(stored("tag:zone=z1"), merged(&all));
    let w = store.device_window("dev-w", start).unwrap().unwrap();
    assert_eq!(w.cohort, "kws@3/nrf52840");
    let agg: WindowAgg = serde_json::from_value(w.agg).unwrap();
    assert_eq!(agg, merged(&all));
    assert_eq!(agg.lost_summaries, 0);
    let state = store.device_state("dev-w").unwrap().unwrap();
    assert_eq!(
        state.health,
        Some(serde_json::to_value(decoded[5].health).unwrap())
    );
    assert_eq!((state.health_boot, state.health_seq), (Some(1), Some(5)));
}

/// The verify stage alone, then the rest: the same as `handle`.
#[test]
fn verify_then_apply_is_handle() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = provision(&store, "dev-v", &[]);
    let mut p = pipeline(&store);
    let sums = summaries(&d, 1, 2);
    let verifier = p.verifier().clone();
    let verified = std::thread::spawn(move || {
        sums.iter()
            .map(|(t, m)| verifier.verify(t, m))
            .chain([verifier.verify("tf/v1/dev-v/sum", b"junk")])
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let outcomes: Vec<_> = verified.into_iter().map(|v| p.apply(v, T0)).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Accepted(Kind::Summary),
            Outcome::Accepted(Kind::Summary),
            Outcome::Rejected(tinyfleet_ingest::decode::Reject::Malformed)
        ]
    );
    assert_eq!(p.metrics().accepted("summary"), 2);
    assert_eq!(p.metrics().rejected("malformed"), 1);
}

#[test]
fn ota_messages_reach_the_ota_service_once_and_progress_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = provision(&store, "ota-1", &[]);
    let mut p = pipeline(&store);
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    p.on_block_request(Arc::new(move |r| seen.lock().unwrap().push(r)));

    let object = [7u8; 32];
    let breq = |seq, offset| {
        sealed(
            &d,
            Kind::BlockRequest,
            &wire::BlockRequest {
                boot: 1,
                seq,
                object: &object,
                offset,
                len: 1024,
            },
        )
    };
    let prog = |seq, state, bytes| {
        sealed(
            &d,
            Kind::Progress,
            &wire::Progress {
                boot: 1,
                seq,
                manifest_seq: 4,
                state,
                bytes,
                error: 0,
            },
        )
    };
    let msgs = [
        breq(1, 0),
        breq(2, 1024),
        breq(2, 1024), // replayed: no second answer
        prog(1, wire::ota_state::ACCEPTED, 0),
        prog(3, wire::ota_state::DOWNLOADING, 2048),
        prog(2, wire::ota_state::DOWNLOADING, 1024), // late: reported, not stored over seq 3
        prog(3, wire::ota_state::DOWNLOADING, 2048), // replayed
    ];
    for (topic, payload) in &msgs {
        p.handle(topic, payload, T0);
    }
    let offsets: Vec<u32> = requests.lock().unwrap().iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 1024]);
    assert!(
        requests
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.object == object && r.device == "ota-1")
    );

    let (batch, events) = p.take_batch();
    store.commit(&batch).unwrap();
    let seqs: Vec<u32> = events.progress.iter().map(|e| e.progress.seq).collect();
    assert_eq!(
        seqs,
        [1, 3, 2],
        "every accepted report, in arrival order, once"
    );
    let stored = store.device_ota("ota-1").unwrap().unwrap();
    assert_eq!(
        (stored.seq, stored.bytes, stored.manifest_seq),
        (3, 2048, 4)
    );
}

/// Two pipelines on one store take turns, as ingest replicas sharing a store do: each batch
/// starts from `forget_cached` and `prefetch`, so what the other committed (replay windows,
/// state, device and cohort windows) is read, never overwritten, whether a device's messages
/// are prefetched or read one by one.
#[test]
fn replicas_taking_turns_count_each_summary_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = provision(&store, "dev-a", &[("site", "north")]);
    let b = provision(&store, "dev-b", &[("site", "north")]);
    let mut replicas = [pipeline(&store), pipeline(&store)];
    let sums_a = summaries(&a, 1, 8);
    let sums_b = summaries(&b, 1, 8);
    let mut turn = 0;
    let mut batch_of = |messages: &[(String, Vec<u8>)], prefetch: bool| {
        let p = &mut replicas[turn % 2];
        turn += 1;
        p.forget_cached();
        if prefetch {
            p.prefetch(&["dev-a", "dev-b"], T0);
        }
        let outcomes: Vec<Outcome> = messages.iter().map(|(t, m)| p.handle(t, m, T0)).collect();
        commit(p);
        outcomes
    };
    let accepted = Outcome::Accepted(Kind::Summary);
    let duplicate = Outcome::Dropped(Drop::Duplicate);
    batch_of(&[hello(&a, 1, 0), hello(&b, 1, 0)], true);
    for round in 0..4 {
        let i = round * 2;
        let msgs = [
            sums_a[i].clone(),
            sums_b[i].clone(),
            sums_a[i + 1].clone(),
            sums_b[i + 1].clone(),
        ];
        // Odd rounds read lazily, even ones prefetch: both see the other replica's commits.
        assert_eq!(batch_of(&msgs, round % 2 == 0), vec![accepted; 4]);
        // The same messages again, on the other replica: all refused.
        assert_eq!(batch_of(&msgs, round % 2 == 1), vec![duplicate; 4]);
    }
    for id in ["dev-a", "dev-b"] {
        let state = store.device_state(id).unwrap().unwrap();
        assert_eq!((state.summaries, state.lost_summaries), (8, 0), "{id}");
    }
    let start = T0.div_euclid(300_000) * 300_000;
    let w = store
        .cohort_window("tag:site=north", start)
        .unwrap()
        .unwrap();
    let agg: WindowAgg = serde_json::from_value(w.agg).unwrap();
    assert_eq!((agg.summaries, agg.inferences), (16, 800));
    let w = store.device_window("dev-a", start).unwrap().unwrap();
    let agg: WindowAgg = serde_json::from_value(w.agg).unwrap();
    assert_eq!(agg.summaries, 8);
}

/// What the rollouts follow goes into the store's change feed with the batch that commits it:
/// devices whose presence or hello changed, and devices with a new progress report; a summary
/// that changes neither adds nothing.
#[test]
fn presence_hellos_and_progress_enter_the_rollouts_change_feed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b, c) = (
        provision(&store, "feed-a", &[]),
        provision(&store, "feed-b", &[]),
        provision(&store, "feed-c", &[]),
    );
    let mut p = pipeline(&store);
    let progress = sealed(
        &c,
        Kind::Progress,
        &wire::Progress {
            boot: 1,
            seq: 4,
            manifest_seq: 2,
            state: wire::ota_state::DOWNLOADING,
            bytes: 512,
            error: 0,
        },
    );
    let b_summaries = summaries(&b, 1, 2);
    for (topic, payload) in [hello(&a, 1, 0), b_summaries[0].clone(), progress] {
        p.handle(&topic, &payload, T0);
    }
    let (batch, _) = p.take_batch();
    assert_eq!(
        batch.changed,
        ["feed-a", "feed-b"],
        "hello; online by a summary"
    );
    store.commit(&batch).unwrap();
    let feed = store.device_changes(0, 100).unwrap();
    assert_eq!(feed.devices, ["feed-a", "feed-b"]);
    assert_eq!(
        feed.progress
            .iter()
            .map(|o| (o.id.as_str(), o.seq, o.bytes))
            .collect::<Vec<_>>(),
        [("feed-c", 4, 512)]
    );

    // Another summary of an online device: nothing for the feed.
    p.handle(&b_summaries[1].0, &b_summaries[1].1, T0 + 1);
    let (batch, _) = p.take_batch();
    assert!(batch.changed.is_empty() && batch.ota.is_empty());
    store.commit(&batch).unwrap();
    assert_eq!(
        store.device_changes(feed.cursor, 100).unwrap().cursor,
        feed.cursor
    );

    // A will takes the device offline: it is in the feed again, after the others.
    let (topic, payload) = will(&a, 1, 0);
    p.handle(&topic, &payload, T0 + 2);
    commit(&mut p);
    let next = store.device_changes(feed.cursor, 100).unwrap();
    assert_eq!(next.devices, ["feed-a"]);
    assert!(next.progress.is_empty());
}
