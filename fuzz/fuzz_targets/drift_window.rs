//! What becomes of a summary a malicious (or broken) device sends with its own valid key: it
//! passes the MAC, so its body is all the device's choice. The fuzz input is one or more
//! summary bodies (`decode_summary`), aggregated as ingest does (`WindowAgg`: per device, then
//! merged into a cohort) and evaluated by the drift engine against a real monitoring profile
//! over a few windows, next to honest devices.
//!
//! Properties: never panics, whatever the shape, counts and moments of accepted summaries
//! (shapes that differ from the profile's, counts near `u32::MAX`, NaN and infinite moments);
//! a window's aggregate serialises to JSON and reads back (ingest stores it so, the monitor
//! reads it so).
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::decoded::decode_summary;
use tinyfleet_device::testkit::Rng;
use tinyfleet_drift::engine::{DeviceWindow, DriftConfig, Engine};
use tinyfleet_drift::profile::MonitoringProfile;
use tinyfleet_drift::sim::{self, Condition};
use tinyfleet_fuzz::Input;
use tinyfleet_ingest::aggregate::WindowAgg;

fn profiles() -> &'static HashMap<(String, String), MonitoringProfile> {
    static P: OnceLock<HashMap<(String, String), MonitoringProfile>> = OnceLock::new();
    P.get_or_init(|| {
        let p = sim::profile(4_000, 7);
        HashMap::from([((p.model_id.clone(), p.model_version.clone()), p)])
    })
}

fn honest(seed: u64) -> WindowAgg {
    let mut rng = Rng::new(seed);
    sim::window(&mut rng, &Condition::none(), 300, 0.2).0
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut malicious = WindowAgg::default();
    let mut any = false;
    while !input.is_empty() {
        let flags = input.byte();
        let Ok(s) = decode_summary(input.frame()) else {
            continue;
        };
        // As ingest aggregates: into the device window, with the sequence gap it saw.
        malicious.merge_summary(&s, flags.is_multiple_of(2), i64::from(flags >> 1));
        any = true;
    }
    if !any {
        return;
    }
    let json = serde_json::to_string(&malicious).expect("a window serialises");
    let back: WindowAgg = serde_json::from_str(&json).expect("a stored window reads back");
    let mut cohort = honest(1);
    cohort.merge(&back);

    let window = |device: &str, agg: WindowAgg| DeviceWindow {
        device: device.into(),
        model_id: "sim".into(),
        model_version: "1".into(),
        hw: "nrf52840".into(),
        tags: BTreeMap::from([("site".to_owned(), "a".to_owned())]),
        agg,
    };
    let mut engine = Engine::new(DriftConfig::default());
    for w in 0..3 {
        let windows = vec![
            window("evil", back.clone()),
            window("honest-1", honest(10 + w)),
            window("honest-2", honest(20 + w)),
        ];
        let _ = engine.evaluate(w as i64 * 60_000, &windows, profiles());
    }
    let _ = cohort.accuracy();
});
