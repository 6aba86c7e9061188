//! `cargo bench -p tinyfleet-device`: the device-side costs on the host.
//!
//! - `record`: one inference into the reference monitor (8 features x 16 bins, 10 classes).
//! - `finish_window`: encoding and authenticating one reference summary (100 inferences).
//! - `verify_decode`: the backend's side of the same summary (COSE verify + strict decode).
//! - `offer_signature/*`: an offer's Ed25519 check on a 1 KB message, the device's
//!   `ota::ed25519::verify_strict` (one table-free double-and-add, for its stack) beside
//!   ed25519-dalek's `verify_strict` (tables, variable-time double-base multiplication).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tinyfleet_device::decoded::decode_summary;
use tinyfleet_device::testkit::{ReferenceProfile, Rng, Sample, StreamParams, sample};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};

const KEY: DeviceKey = DeviceKey([3; 32]);

fn samples(n: usize) -> Vec<Sample> {
    let mut rng = Rng::new(42);
    (0..n)
        .map(|_| sample(&mut rng, &StreamParams::default()))
        .collect()
}

fn bench(c: &mut Criterion) {
    let profile = ReferenceProfile::default();
    let id = DeviceId::new("bench-1").expect("valid id");
    let inputs = samples(1024);

    c.bench_function("record", |b| {
        let mut m = ReferenceMonitor::new(profile.config(1), 1, 0, 0);
        let mut i = 0;
        b.iter(|| {
            let s = &inputs[i & 1023];
            i += 1;
            m.record(black_box(&s.inference()))
                .expect("valid inference");
        })
    });

    let mut filled = ReferenceMonitor::new(profile.config(1), 1, 0, 0);
    for s in &inputs[..100] {
        filled.record(&s.inference()).expect("valid inference");
    }
    let mut out = [0u8; 512];
    c.bench_function("finish_window", |b| {
        b.iter(|| {
            // Cloning the filled window keeps every iteration at 100 inferences.
            let mut m = filled.clone();
            black_box(
                m.finish_window(60_000, None, id, &KEY, &mut out)
                    .expect("fits"),
            )
        })
    });

    let mut m = filled.clone();
    let len = m
        .finish_window(60_000, None, id, &KEY, &mut out)
        .expect("fits");
    let msg = out[..len].to_vec();
    let topic = Topic::new(id, Kind::Summary);
    c.bench_function("verify_decode", |b| {
        b.iter(|| {
            let body = wire::open(topic.as_str(), &KEY, black_box(&msg)).expect("verifies");
            black_box(decode_summary(body).expect("decodes"))
        })
    });
}

fn offer_signature(c: &mut Criterion) {
    use ed25519_dalek::{Signer, SigningKey};
    let key = SigningKey::from_bytes(&[7; 32]);
    let message = [0x5a_u8; 1024];
    let signature = key.sign(&message);
    let (public, sig) = (key.verifying_key(), signature.to_bytes());
    let mut group = c.benchmark_group("offer_signature");
    group.bench_function("device", |b| {
        b.iter(|| {
            tinyfleet_device::ota::ed25519::verify_strict(
                black_box(public.as_bytes()),
                black_box(&message),
                black_box(&sig),
            )
            .expect("verifies")
        })
    });
    group.bench_function("ed25519_dalek", |b| {
        b.iter(|| {
            black_box(&public)
                .verify_strict(black_box(&message), black_box(&signature))
                .expect("verifies")
        })
    });
    group.finish();
}

criterion_group!(benches, bench, offer_signature);
criterion_main!(benches);
