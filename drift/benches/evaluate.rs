//! Evaluating one window of 100,000 devices x 8 features (docs/benchmarks.md).
//!
//! cargo bench -p tinyfleet-drift --bench evaluate
//!
//! The engine has evaluated one window before (its device states exist, as in a running
//! service); the measured evaluation is the second. Every device window holds 400 inferences, so every device and cohort scope is tested in
//! every evaluation (the most work one evaluation can do): sensor-fault checks, 100k device
//! scopes plus 2 hardware, 10 site and 1 model cohort, 8 feature tests each plus class, latency,
//! accuracy and CBPE tests per cohort, Benjamini-Hochberg over all of them.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tinyfleet_drift::engine::{DriftConfig, Engine};
use tinyfleet_drift::sim::{self, Fleet};

fn bench(c: &mut Criterion) {
    let profiles = sim::profiles();
    let mut fleet = Fleet::new(100_000, 10, 1);
    let (first, _) = fleet.windows(400, 0.05);
    let (windows, _) = fleet.windows(400, 0.05);
    // A running service's engine already knows its devices.
    let mut warm = Engine::new(DriftConfig::default());
    warm.evaluate(0, &first, &profiles);
    let mut group = c.benchmark_group("drift");
    group.sample_size(10);
    group.bench_function("evaluate_100k_devices_8_features", |b| {
        b.iter_batched(
            || warm.clone(),
            |mut engine| {
                let eval = engine.evaluate(300_000, &windows, &profiles);
                (engine, eval)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
