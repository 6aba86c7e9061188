//! `cargo bench -p tinyfleet-ingest`: ingest's synchronous core per summary, on one core.
//!
//! - `verify_decode`: COSE_Mac0 verify + strict decode (the decode stage alone).
//! - `pipeline`: verify + decode + dedup + presence + aggregate into device, cohort and tag
//!   windows (what ingest does per summary between commits), 1,000 devices round-robin, with a
//!   batch taken every 5,000 summaries.
//! - `apply`: the same without verify and decode (messages verified outside the timing): dedup,
//!   presence and aggregation alone.
//! - `take_batch_1000`: the changes of 1,000 summaries of 1,000 devices as a store batch (state,
//!   health and every changed window serialised as JSON), what a checkpoint does first.
//! - `commit_1000`: one store transaction holding the changes of 1,000 summaries.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
use tinyfleet_device::wire::{DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};
use tinyfleet_ingest::decode::Decoder;
use tinyfleet_ingest::metrics::Metrics;
use tinyfleet_ingest::pipeline::{Pipeline, PipelineConfig};
use tinyfleet_store::Store;

const DEVICES: usize = 1000;
const PER_DEVICE: usize = 200;

/// `PER_DEVICE` summaries of 100 inferences for each of `DEVICES` devices, interleaved.
fn messages(store: &Store) -> Vec<(String, Vec<u8>)> {
    let profile = ReferenceProfile::default();
    let mut per_device = Vec::new();
    for d in 0..DEVICES {
        let id = format!("dev-{d:05}");
        let creds = store
            .registry()
            .provision(
                &id,
                BTreeMap::from([("site".to_owned(), format!("s{}", d % 4))]),
            )
            .expect("provision");
        let key = DeviceKey(
            hex::decode(&creds.mac_key)
                .expect("hex")
                .try_into()
                .expect("32"),
        );
        let did = DeviceId::new(&id).expect("id");
        let topic = Topic::new(did, Kind::Summary).as_str().to_owned();
        let mut m = ReferenceMonitor::new(profile.config(1), 1, 0, 0);
        let mut rng = Rng::new(d as u64);
        let mut msgs = Vec::new();
        for w in 0..PER_DEVICE {
            for _ in 0..100 {
                m.record(&sample(&mut rng, &StreamParams::default()).inference())
                    .expect("record");
            }
            let mut out = [0u8; 512];
            let n = m
                .finish_window(60_000 * (w as u64 + 1), None, did, &key, &mut out)
                .expect("encode");
            msgs.push((topic.clone(), out[..n].to_vec()));
        }
        per_device.push(msgs);
    }
    let mut all = Vec::with_capacity(DEVICES * PER_DEVICE);
    for w in 0..PER_DEVICE {
        for d in &per_device {
            all.push(d[w].clone());
        }
    }
    all
}

/// A pipeline that keeps no sink events, as `serve` runs it without sinks.
fn new_pipeline(store: &Store) -> Pipeline {
    Pipeline::new(
        PipelineConfig {
            collect_events: false,
            ..PipelineConfig::default()
        },
        store.clone(),
        Arc::new(Metrics::default()),
    )
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let msgs = messages(&store);
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(1));

    let decoder = Decoder::default();
    let mut i = 0;
    group.bench_function("verify_decode", |b| {
        b.iter(|| {
            let (t, m) = &msgs[i % msgs.len()];
            i += 1;
            black_box(decoder.decode(t, m, store.registry()).expect("valid"))
        })
    });

    // Each message is accepted once; replays would only measure the duplicate path, so the
    // pipeline is rebuilt (cheaply) when the messages run out.
    let now = 1_764_000_000_000;
    let mut pipeline = new_pipeline(&store);
    let mut i = 0;
    group.bench_function("pipeline", |b| {
        b.iter(|| {
            if i == msgs.len() {
                pipeline = new_pipeline(&store);
                i = 0;
            }
            let (t, m) = &msgs[i];
            i += 1;
            let out = pipeline.handle(t, m, now);
            if i % 5000 == 0 {
                // Keep the dirty sets bounded as a real shell would.
                black_box(pipeline.take_batch());
            }
            black_box(out)
        })
    });

    // Setup (not timed) and routine (timed) both need the pipeline.
    let verifier = new_pipeline(&store).verifier().clone();
    let pipeline = std::cell::RefCell::new(new_pipeline(&store));
    let mut i = 0;
    group.bench_function("apply", |b| {
        b.iter_batched(
            || {
                if i == msgs.len() {
                    *pipeline.borrow_mut() = new_pipeline(&store);
                    i = 0;
                }
                let (t, m) = &msgs[i];
                i += 1;
                if i % 5000 == 0 {
                    black_box(pipeline.borrow_mut().take_batch());
                }
                verifier.verify(t, m)
            },
            |verified| black_box(pipeline.borrow_mut().apply(verified, now)),
            criterion::BatchSize::SmallInput,
        )
    });

    group.throughput(Throughput::Elements(1000));
    // Batches are taken without a commit, so a fresh pipeline accepts the messages again.
    let pipeline = std::cell::RefCell::new(new_pipeline(&store));
    let mut chunks = msgs.chunks(1000);
    group.bench_function("take_batch_1000", |b| {
        b.iter_batched(
            || {
                let chunk = chunks.next().unwrap_or_else(|| {
                    *pipeline.borrow_mut() = new_pipeline(&store);
                    chunks = msgs.chunks(1000);
                    chunks.next().expect("messages")
                });
                let mut p = pipeline.borrow_mut();
                for (t, m) in chunk {
                    p.handle(t, m, now);
                }
            },
            |()| black_box(pipeline.borrow_mut().take_batch()),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1000));
    group.bench_function("commit_1000", |b| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let msgs = messages(&store);
        let mut pipeline = new_pipeline(&store);
        let mut chunks = msgs.chunks(1000).cycle();
        b.iter_batched(
            || {
                let chunk = chunks.next().expect("cycle");
                for (t, m) in chunk {
                    pipeline.handle(t, m, now);
                }
                pipeline.take_batch().0
            },
            |batch| store.commit(&batch).expect("commit"),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
