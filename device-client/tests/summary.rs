//! The windowing API end to end on the host: record, finish, verify, decode.

use proptest::prelude::*;
use tinyfleet_device::decoded::decode_summary;
use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic, WireError};
use tinyfleet_device::{DeviceKey, Inference, RecordError, ReferenceMonitor};

const KEY: DeviceKey = DeviceKey([0x42; 32]);

fn device() -> DeviceId<'static> {
    DeviceId::new("dev-0001").unwrap()
}

/// Records `n` inferences (every tenth with a label when `labels`), returns the summary bytes.
fn window(profile: &ReferenceProfile, seed: u64, n: usize, labels: bool) -> Vec<u8> {
    let mut m = ReferenceMonitor::new(profile.config(3), 7, wire::reset::POWER_ON, 0);
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let s = sample(&mut rng, &StreamParams::default());
        m.record(&s.inference()).unwrap();
        if labels && i % 10 == 0 {
            m.record_label(s.predicted, s.actual).unwrap();
        }
    }
    m.set_battery_mv(3712);
    m.set_rssi_dbm(-71);
    m.observe_free_heap(20_480);
    let mut out = [0u8; 512];
    let len = m
        .finish_window(600_000, Some(1_764_000_000), device(), &KEY, &mut out)
        .unwrap();
    out[..len].to_vec()
}

fn open_summary(bytes: &[u8]) -> Result<tinyfleet_device::decoded::DecodedSummary, WireError> {
    let topic = Topic::new(device(), Kind::Summary);
    decode_summary(wire::open(topic.as_str(), &KEY, bytes)?)
}

#[test]
fn reference_summary_fits_256_bytes() {
    let profile = ReferenceProfile::default();
    // The reference window (100 inferences, 1 in 10 labelled) and 150 unlabelled ones fit
    // (measured sizes per window length are in docs/benchmarks.md).
    for n in [0, 1, 10, 50, 100] {
        for seed in 0..20 {
            let len = window(&profile, seed, n, true).len();
            assert!(len <= 256, "{n} labelled inferences: {len} bytes");
        }
    }
    for seed in 0..20 {
        let len = window(&profile, seed, 150, false).len();
        assert!(len <= 256, "150 inferences: {len} bytes");
    }
}

#[test]
fn decoded_summary_matches_what_was_recorded() {
    let profile = ReferenceProfile::default();
    let mut m = ReferenceMonitor::new(profile.config(3), 7, wire::reset::WATCHDOG, 1_000);
    let mut rng = Rng::new(1);
    let mut classes = [0u32; 10];
    let mut confusion = [[0u32; 10]; 10];
    let mut f0 = Vec::new();
    for _ in 0..250 {
        let s = sample(&mut rng, &StreamParams::default());
        m.record(&s.inference()).unwrap();
        m.record_label(s.predicted, s.actual).unwrap();
        classes[s.predicted] += 1;
        confusion[s.actual][s.predicted] += 1;
        f0.push(f64::from(s.features[0]));
    }
    let hist0 = m.features()[0].hist;
    let mut out = [0u8; 512];
    let len = m
        .finish_window(61_000, None, device(), &KEY, &mut out)
        .unwrap();
    let d = open_summary(&out[..len]).unwrap();
    assert_eq!((d.boot, d.seq, d.profile), (7, 0, 3));
    assert_eq!((d.t_end_ms, d.span_ms, d.unix_s), (61_000, 60_000, None));
    assert_eq!(d.health.reset, wire::reset::WATCHDOG);
    assert_eq!(d.inferences(), 250);
    assert_eq!(d.classes, classes);
    assert_eq!(d.features[0].hist.bins, hist0.bins);
    let conf = d.confusion.unwrap();
    assert_eq!(conf.iter().flatten().sum::<u32>(), 250);
    for (row, want) in conf.iter().zip(confusion) {
        assert_eq!(row, &want);
    }
    // Moments are normalised by the profile range and rounded to f16.
    let range = f64::from(profile.features[0].hi() - profile.features[0].lo());
    let mean = f0.iter().sum::<f64>() / 250.0;
    let sd = (f0.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 250.0).sqrt();
    let lo = f64::from(profile.features[0].lo());
    assert!((f64::from(d.features[0].mean) - (mean - lo) / range).abs() < 1e-3);
    assert!((f64::from(d.features[0].sd) - sd / range).abs() < 1e-3);
}

#[test]
fn windows_advance_and_reset() {
    let profile = ReferenceProfile::default();
    let mut m = ReferenceMonitor::new(profile.config(1), 2, 0, 0);
    let x = [0.0f32; 8];
    let inf = Inference {
        features: &x,
        predicted: 1,
        confidence: 0.9,
        latency_us: 3000,
    };
    m.record(&inf).unwrap();
    let mut out = [0u8; 512];
    let len = m.finish_window(10, None, device(), &KEY, &mut out).unwrap();
    assert_eq!(open_summary(&out[..len]).unwrap().inferences(), 1);
    assert_eq!(m.next_seq(), 1);
    assert_eq!(m.inferences(), 0);
    let len = m.finish_window(20, None, device(), &KEY, &mut out).unwrap();
    let d = open_summary(&out[..len]).unwrap();
    assert_eq!((d.seq, d.span_ms, d.inferences()), (1, 10, 0));
    assert!(d.features[0].mean.is_nan(), "no data: NaN moments");
}

#[test]
fn bad_observations_are_refused_and_change_nothing() {
    let profile = ReferenceProfile::default();
    let mut m = ReferenceMonitor::new(profile.config(1), 2, 0, 0);
    let x = [0.0f32; 8];
    let mut inf = Inference {
        features: &x,
        predicted: 10,
        confidence: 0.9,
        latency_us: 3000,
    };
    assert_eq!(m.record(&inf), Err(RecordError::ClassOutOfRange));
    inf.predicted = 0;
    inf.confidence = f32::NAN;
    assert_eq!(m.record(&inf), Err(RecordError::ConfidenceNan));
    assert_eq!(m.record_label(0, 10), Err(RecordError::ClassOutOfRange));
    assert_eq!(m.inferences(), 0);
    assert_eq!(m.features()[0].hist.total(), 0);
}

#[test]
fn small_buffer_is_an_error_and_keeps_the_window() {
    let profile = ReferenceProfile::default();
    let mut m = ReferenceMonitor::new(profile.config(1), 2, 0, 0);
    let mut rng = Rng::new(9);
    for _ in 0..100 {
        m.record(&sample(&mut rng, &StreamParams::default()).inference())
            .unwrap();
    }
    for size in [0, 1, 10, 64, 128, 200] {
        let mut out = vec![0u8; size];
        assert_eq!(
            m.finish_window(5, None, device(), &KEY, &mut out),
            Err(WireError::BufferTooSmall),
            "buffer of {size}"
        );
        assert_eq!(m.inferences(), 100);
        assert_eq!(m.next_seq(), 0);
    }
    let mut out = [0u8; 512];
    assert!(m.finish_window(5, None, device(), &KEY, &mut out).is_ok());
}

#[test]
fn forged_and_misrouted_summaries_fail() {
    let profile = ReferenceProfile::default();
    let bytes = window(&profile, 3, 50, false);
    let other = DeviceId::new("dev-0002").unwrap();
    let wrong_topic = Topic::new(other, Kind::Summary);
    assert!(wire::open(wrong_topic.as_str(), &KEY, &bytes).is_err());
    let hello_topic = Topic::new(device(), Kind::Hello);
    assert!(wire::open(hello_topic.as_str(), &KEY, &bytes).is_err());
    let topic = Topic::new(device(), Kind::Summary);
    assert!(wire::open(topic.as_str(), &DeviceKey([1; 32]), &bytes).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn summary_with_any_byte_flipped_fails(seed in 0u64..1000, n in 0usize..300,
                                           pos in any::<proptest::sample::Index>(), bit in 0u8..8) {
        let profile = ReferenceProfile::default();
        let mut bytes = window(&profile, seed, n, seed % 2 == 0);
        prop_assert!(open_summary(&bytes).is_ok());
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(open_summary(&bytes).is_err());
    }

    #[test]
    fn encode_decode_roundtrips(seed in 0u64..10_000, n in 0usize..400, shift in -2.0f32..2.0,
                                labels in any::<bool>(), battery in proptest::option::of(any::<u16>())) {
        let profile = ReferenceProfile::default();
        let mut m = ReferenceMonitor::new(profile.config(5), 11, 0, 0);
        let mut rng = Rng::new(seed);
        let params = StreamParams { feature_shift: shift, accuracy: 0.8 };
        let mut samples = Vec::new();
        for _ in 0..n {
            let s = sample(&mut rng, &params);
            m.record(&s.inference()).unwrap();
            if labels { m.record_label(s.predicted, s.actual).unwrap(); }
            samples.push(s);
        }
        if let Some(mv) = battery { m.set_battery_mv(mv); }
        let expect: Vec<_> = m.features().iter().map(|f| f.hist).collect();
        let mut out = [0u8; 1024];
        let len = m.finish_window(1_000, None, device(), &KEY, &mut out).unwrap();
        let d = open_summary(&out[..len]).unwrap();
        prop_assert_eq!(d.inferences(), n as u64);
        prop_assert_eq!(d.health.battery_mv, battery);
        prop_assert_eq!(d.confusion.is_some(), labels && n > 0);
        for (got, want) in d.features.iter().zip(&expect) {
            prop_assert_eq!(&got.hist.bins[..], &want.bins[..]);
            prop_assert_eq!((got.hist.underflow, got.hist.overflow, got.hist.nan),
                            (want.underflow, want.overflow, want.nan));
        }
        for (c, row) in d.confidence.iter().enumerate() {
            let want = samples.iter().filter(|s| s.predicted == c).count() as u32;
            prop_assert_eq!(row.iter().sum::<u32>(), want);
        }
    }
}
