//! Monitoring profile uploads (`PUT /api/v1/models/{id}/{version}/profile`): the JSON body as
//! the API decodes it into a `MonitoringProfile`, then `validate()` (`drift/src/profile.rs`),
//! and, for a profile that passes, what the service does with it afterwards: stores it as JSON,
//! gives firmware its edges, and evaluates windows against it in the drift engine.
//!
//! Properties: never panics on any body; an accepted profile round-trips through its stored
//! JSON (the store keeps the text, the monitor parses it back) and still validates; the drift
//! engine never panics on an accepted profile, whether the windows match its shape or not.
#![no_main]

use std::collections::{BTreeMap, HashMap};

use libfuzzer_sys::fuzz_target;
use tinyfleet_drift::engine::{DeviceWindow, DriftConfig, Engine};
use tinyfleet_drift::profile::{HistProfile, MonitoringProfile, device_edges};
use tinyfleet_ingest::aggregate::{FeatureAgg, HistAgg, WindowAgg};

/// `c` of `n` rescaled to a window of at most 100,000 inferences.
fn scale(c: u64, n: u64, to: u64) -> u64 {
    if n == 0 {
        0
    } else {
        (u128::from(c) * u128::from(to) / u128::from(n)) as u64
    }
}

fn hist(h: &HistProfile, n: u64, to: u64) -> HistAgg {
    HistAgg {
        bins: h.counts.iter().map(|&c| scale(c, n, to)).collect(),
        underflow: scale(h.underflow, n, to),
        overflow: scale(h.overflow, n, to),
        nan: scale(h.nan, n, to),
    }
}

/// A window with the profile's own reference proportions (its shape).
fn reference_window(p: &MonitoringProfile) -> WindowAgg {
    let to = p.n.min(100_000);
    WindowAgg {
        summaries: 1,
        inferences: to,
        profile: Some(1),
        features: p
            .features
            .iter()
            .map(|f| {
                let hist = hist(&f.hist, p.n, to);
                let w = (hist.total() - hist.nan) as f64;
                FeatureAgg {
                    hist,
                    w,
                    wm: 0.5 * w,
                    wq: 0.3 * w,
                }
            })
            .collect(),
        classes: p.classes.iter().map(|&c| scale(c, p.n, to)).collect(),
        confidence: p
            .confidence
            .iter()
            .map(|row| row.iter().map(|&c| scale(c, p.n, to)).collect())
            .collect(),
        latency: p
            .latency
            .as_ref()
            .map(|l| hist(l, p.n, to))
            .unwrap_or_default(),
        ..WindowAgg::default()
    }
}

fuzz_target!(|body: &[u8]| {
    let Ok(profile) = serde_json::from_slice::<MonitoringProfile>(body) else {
        return;
    };
    if profile.validate().is_err() {
        return;
    }
    let stored = serde_json::to_string(&profile).expect("an accepted profile serialises");
    let back: MonitoringProfile = serde_json::from_str(&stored).expect("stored JSON parses");
    assert_eq!(back, profile, "the stored profile reads back the same");
    back.validate().expect("the stored profile validates");
    for f in &profile.features {
        let _ = device_edges::<16>(&f.hist);
        let _ = device_edges::<8>(&f.hist);
    }
    let _ = profile.latency_edges::<8>();

    let key = (profile.model_id.clone(), profile.model_version.clone());
    let window = |device: &str, agg: WindowAgg| DeviceWindow {
        device: device.into(),
        model_id: key.0.clone(),
        model_version: key.1.clone(),
        hw: "nrf52840".into(),
        tags: BTreeMap::from([("site".to_owned(), "a".to_owned())]),
        agg,
    };
    let mut rng = tinyfleet_device::testkit::Rng::new(3);
    let (sim, _) = tinyfleet_drift::sim::window(
        &mut rng,
        &tinyfleet_drift::sim::Condition::shifted(0, 1.0),
        500,
        0.3,
    );
    let windows = vec![
        window("dev-1", reference_window(&profile)),
        window("dev-2", reference_window(&profile)),
        window("dev-3", sim),
    ];
    let profiles = HashMap::from([(key.clone(), profile)]);
    let mut engine = Engine::new(DriftConfig::default());
    for w in 0..3 {
        let _ = engine.evaluate(w * 60_000, &windows, &profiles);
    }
});
