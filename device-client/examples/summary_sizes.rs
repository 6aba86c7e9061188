//! Prints the size of a reference-configuration summary by window length (docs/benchmarks.md).
//!
//! cargo run -p tinyfleet-device --example summary_sizes

use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};

fn main() -> Result<(), wire::WireError> {
    let profile = ReferenceProfile::default();
    let key = DeviceKey([1; 32]);
    let id = DeviceId::new("dev-0001")?;
    let topic = Topic::new(id, Kind::Summary);
    println!("| inferences | labels | message bytes (max of 20 seeds) | of which counts |");
    println!("|---:|---|---:|---:|");
    for n in [0usize, 10, 50, 100, 200, 600, 1000, 5000] {
        for labels in [false, true] {
            let (mut worst, mut worst_counts) = (0, 0);
            for seed in 0..20 {
                let mut m = ReferenceMonitor::new(profile.config(3), 7, wire::reset::POWER_ON, 0);
                let mut rng = Rng::new(seed);
                for i in 0..n {
                    let s = sample(&mut rng, &StreamParams::default());
                    m.record(&s.inference())
                        .map_err(|_| wire::WireError::OutOfRange)?;
                    if labels && i % 10 == 0 {
                        m.record_label(s.predicted, s.actual)
                            .map_err(|_| wire::WireError::OutOfRange)?;
                    }
                }
                m.set_battery_mv(3712);
                m.set_rssi_dbm(-71);
                m.observe_free_heap(20_480);
                let mut out = [0u8; 2048];
                let len = m.finish_window(600_000, Some(1_764_000_000), id, &key, &mut out)?;
                let body = wire::open(topic.as_str(), &key, &out[..len])?;
                let raw: wire::Summary<'_, Vec<f32>> = wire::from_cbor(body)?;
                if len > worst {
                    (worst, worst_counts) = (len, raw.counts.len());
                }
            }
            let labels = if labels { "1 in 10" } else { "none" };
            println!("| {n} | {labels} | {worst} | {worst_counts} |");
        }
    }
    Ok(())
}
