//! Building monitoring profiles from reference CSVs: quantile edges, identical binning on the
//! device, calibration, errors, serialization and validation.

use std::fmt::Write as _;

use proptest::prelude::*;
use tinyfleet_device::decoded::decode_summary;
use tinyfleet_device::sketch::Histogram;
use tinyfleet_device::testkit::{Rng, StreamParams, sample};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, Monitor, MonitorConfig};
use tinyfleet_drift::profile::{
    BuildOptions, MonitoringProfile, ProfileError, build_profile, device_edges,
};

const KEY: DeviceKey = DeviceKey([0x5a; 32]);

fn opts() -> BuildOptions {
    BuildOptions {
        model_id: "kws".to_string(),
        model_version: "1.2.0".to_string(),
        ..BuildOptions::default()
    }
}

fn build(csv: &str, opts: &BuildOptions) -> Result<MonitoringProfile, ProfileError> {
    build_profile(csv.as_bytes(), opts)
}

/// One row of the reference-configuration stream, as the device sees it.
struct Row {
    features: [f32; 8],
    predicted: usize,
    actual: Option<usize>,
    confidence: f32,
    latency_us: u32,
}

/// `n` rows from the device testkit's stream: feature 3 is missing in every 17th row, one row
/// has +inf and -inf in features 5 and 6, every 3rd row is unlabelled.
fn stream(seed: u64, n: usize) -> Vec<Row> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let s = sample(&mut rng, &StreamParams::default());
            let mut features = s.features;
            if i % 17 == 5 {
                features[3] = f32::NAN;
            }
            if i == 100 {
                features[5] = f32::INFINITY;
                features[6] = f32::NEG_INFINITY;
            }
            Row {
                features,
                predicted: s.predicted,
                actual: (i % 3 != 0).then_some(s.actual),
                confidence: s.confidence,
                latency_us: s.latency_us,
            }
        })
        .collect()
}

/// The CSV of `rows`; floats in their shortest round-trip form, so parsing gives the same bits.
fn stream_csv(rows: &[Row]) -> String {
    let mut csv = String::from("f0,f1,f2,f3,f4,f5,f6,f7,prediction,confidence,label,latency_us\n");
    for r in rows {
        for x in r.features {
            if x.is_nan() {
                csv.push(',');
            } else {
                write!(csv, "{x},").unwrap();
            }
        }
        let label = r.actual.map(|a| a.to_string()).unwrap_or_default();
        writeln!(
            csv,
            "{},{},{label},{}",
            r.predicted, r.confidence, r.latency_us
        )
        .unwrap();
    }
    csv
}

#[test]
fn device_and_profile_bin_identically() {
    let rows = stream(11, 3000);
    let profile = build(
        &stream_csv(&rows),
        &BuildOptions {
            classes: Some(10),
            ..opts()
        },
    )
    .unwrap();
    profile.validate().unwrap();
    assert_eq!(profile.n, 3000);

    // A reference-configuration monitor with the profile's edges, fed the same rows.
    let features = profile.feature_edges::<8, 16>().unwrap();
    let latency = profile.latency_edges::<8>().unwrap();
    let config = MonitorConfig {
        profile: 1,
        features: &features,
        latency_us: &latency,
    };
    let mut monitor: Monitor<'_, 8, 16, 10, 8, 8> =
        Monitor::new(config, 1, wire::reset::POWER_ON, 0);
    for r in &rows {
        let inference = tinyfleet_device::Inference {
            features: &r.features,
            predicted: r.predicted,
            confidence: r.confidence,
            latency_us: r.latency_us,
        };
        monitor.record(&inference).unwrap();
        if let Some(actual) = r.actual {
            monitor.record_label(r.predicted, actual).unwrap();
        }
    }
    let device = DeviceId::new("dev-profile").unwrap();
    let mut out = vec![0u8; 8192];
    let len = monitor
        .finish_window(60_000, None, device, &KEY, &mut out)
        .unwrap();
    let topic = Topic::new(device, Kind::Summary);
    let summary = decode_summary(wire::open(topic.as_str(), &KEY, &out[..len]).unwrap()).unwrap();

    let widen = |xs: &[u32]| xs.iter().map(|&x| u64::from(x)).collect::<Vec<u64>>();
    for (got, want) in summary.features.iter().zip(&profile.features) {
        assert_eq!(widen(&got.hist.bins), want.hist.counts, "{}", want.name);
        assert_eq!(u64::from(got.hist.underflow), want.hist.underflow);
        assert_eq!(u64::from(got.hist.overflow), want.hist.overflow);
        assert_eq!(u64::from(got.hist.nan), want.hist.nan);
    }
    // The stream's NaN and infinities reach the special cells on both sides.
    assert_eq!(profile.features[3].hist.nan, 3000 / 17 + 1);
    assert_eq!(profile.features[5].hist.overflow, 1);
    assert_eq!(profile.features[6].hist.underflow, 1);
    assert_eq!(widen(&summary.classes), profile.classes);
    let confidence: Vec<Vec<u64>> = summary.confidence.iter().map(|r| widen(r)).collect();
    assert_eq!(confidence, profile.confidence);
    let lat = profile.latency.as_ref().unwrap();
    assert_eq!(widen(&summary.latency.bins), lat.counts);
    assert_eq!(
        (
            u64::from(summary.latency.underflow),
            u64::from(summary.latency.overflow)
        ),
        (lat.underflow, lat.overflow)
    );
    // The confusion diagonal is the profile's correct count.
    let confusion = summary.confusion.unwrap();
    let correct: u64 = (0..10).map(|c| u64::from(confusion[c][c])).sum();
    let labelled: u64 = confusion.iter().flatten().map(|&x| u64::from(x)).sum();
    assert_eq!(labelled, profile.labelled);
    assert_eq!(
        Some(correct as f64 / labelled as f64),
        profile.accuracy,
        "accuracy"
    );
}

/// Rows of a model with one feature column per entry of `features` (each a function of the row
/// index and the RNG), a prediction, a confidence and (maybe) a label.
fn synthetic_csv(
    n: usize,
    names: &[&str],
    mut row: impl FnMut(usize, &mut Rng) -> (Vec<String>, usize, f32, Option<usize>),
) -> String {
    let mut rng = Rng::new(7);
    let mut csv = names.join(",");
    csv.push_str(",prediction,confidence,label\n");
    for i in 0..n {
        let (features, predicted, confidence, label) = row(i, &mut rng);
        let label = label.map(|l| l.to_string()).unwrap_or_default();
        writeln!(
            csv,
            "{},{predicted},{confidence},{label}",
            features.join(",")
        )
        .unwrap();
    }
    csv
}

#[test]
fn quantile_bins_hold_equal_counts() {
    let csv = synthetic_csv(4000, &["normal", "lognormal", "uniform"], |_, rng| {
        let z = rng.normal();
        let features = vec![
            format!("{}", z as f32),
            format!("{}", (2.0 * rng.normal()).exp() as f32),
            format!("{}", (100.0 * rng.uniform()) as f32),
        ];
        (features, 0, 0.9, None)
    });
    let profile = build(&csv, &opts()).unwrap();
    assert_eq!(profile.features.len(), 3);
    for f in &profile.features {
        let h = &f.hist;
        assert_eq!(h.counts.len(), 16);
        for (i, &c) in h.counts.iter().enumerate() {
            // 4000 / 16 = 250 per bin; a tie at a cut point could move one value.
            assert!((249..=251).contains(&c), "{} bin {i}: {c}", f.name);
        }
        assert_eq!((h.underflow, h.overflow, h.nan), (0, 0, 0));
    }
    // The lognormal's equal-count bins are very unequal in width.
    let u = &profile.features[1].hist.upper;
    assert!(u[15] - u[14] > 100.0 * (u[1] - u[0]), "{u:?}");
    // Without labels: no accuracy, calibration at the bin midpoints.
    assert_eq!(profile.accuracy, None);
    assert_eq!(profile.labelled, 0);
    assert_eq!(profile.calibration[0], 1.0 / 16.0);
    assert_eq!(profile.calibration[7], 15.0 / 16.0);
    assert_eq!(profile.classes, vec![4000]);
    assert_eq!(profile.confidence, vec![vec![0, 0, 0, 0, 0, 0, 0, 4000]]);
}

#[test]
fn tied_and_discrete_features_get_increasing_edges() {
    let csv = synthetic_csv(
        1000,
        &["binary", "constant", "small", "zero_inflated", "gappy"],
        |i, rng| {
            let zero_inflated = if rng.uniform() < 0.9 {
                0.0
            } else {
                0.1 + rng.normal().abs() as f32
            };
            let features = vec![
                u8::from(rng.uniform() < 0.3).to_string(),
                "5".to_string(),
                (i % 4).to_string(),
                zero_inflated.to_string(),
                // 90 % at 0, 1 % at 1, 9 % at 2: value 1 falls between cut points.
                match i % 100 {
                    0..90 => "0",
                    90 => "1",
                    _ => "2",
                }
                .to_string(),
            ];
            (features, i % 2, 0.75, None)
        },
    );
    let profile = build(&csv, &opts()).unwrap();
    profile.validate().unwrap();
    for f in &profile.features {
        let h = &f.hist;
        let edges = device_edges::<16>(h)
            .unwrap_or_else(|e| panic!("{}: {e}: {} {:?}", f.name, h.lo, h.upper));
        // The device bins every distinct value as the profile counted it.
        let mut device = Histogram::<16>::default();
        let mut distinct: Vec<f32> = Vec::new();
        for line in csv.lines().skip(1) {
            let col = profile
                .features
                .iter()
                .position(|g| g.name == f.name)
                .unwrap();
            let x: f32 = line.split(',').nth(col).unwrap().parse().unwrap();
            device.add(edges.cell(x));
            if !distinct.contains(&x) {
                distinct.push(x);
            }
        }
        let device_counts: Vec<u64> = device.bins.iter().map(|&c| u64::from(c)).collect();
        assert_eq!(device_counts, h.counts, "{}", f.name);
        assert_eq!(h.counts.iter().sum::<u64>(), 1000, "{}", f.name);
        if f.name != "zero_inflated" {
            // Each discrete value has a bin of its own.
            let nonzero = h.counts.iter().filter(|&&c| c > 0).count();
            assert_eq!(nonzero, distinct.len(), "{}: {:?}", f.name, h.counts);
        }
    }
    let by_name = |name: &str| {
        &profile
            .features
            .iter()
            .find(|f| f.name == name)
            .unwrap()
            .hist
    };
    let constant = by_name("constant");
    assert_eq!(constant.lo, 5.0);
    assert_eq!(constant.counts[0], 1000);
    let small = by_name("small");
    let nonzero: Vec<u64> = small.counts.iter().copied().filter(|&c| c > 0).collect();
    assert_eq!(nonzero, vec![250; 4]);
    // All the zeros of the zero-inflated feature share bin 0, and nothing else is there.
    let zi = by_name("zero_inflated");
    let zeros = csv
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(3) == Some("0"))
        .count() as u64;
    assert_eq!(zi.counts[0], zeros);
    assert_eq!(
        by_name("gappy").counts.iter().filter(|&&c| c == 10).count(),
        1
    );
}

/// A model whose confidence `c` is uniform on [0.1, 1) and correct with probability
/// `accuracy(c)`; every third row unlabelled.
fn model_csv(n: usize, accuracy: impl Fn(f32) -> f64) -> String {
    synthetic_csv(n, &["x"], |i, rng| {
        let confidence = (0.1 + 0.9 * rng.uniform()) as f32;
        let predicted = (rng.next_u64() % 3) as usize;
        let correct = rng.uniform() < accuracy(confidence);
        let label = if correct {
            predicted
        } else {
            (predicted + 1) % 3
        };
        let x = format!("{}", rng.normal() as f32);
        (
            vec![x],
            predicted,
            confidence,
            (i % 3 != 0).then_some(label),
        )
    })
}

#[test]
fn calibration_of_a_calibrated_model_is_its_confidence() {
    let profile = build(&model_csv(30_000, f64::from), &opts()).unwrap();
    assert_eq!(profile.conf_bins, 8);
    assert_eq!(profile.labelled, 20_000);
    assert_eq!(profile.calibration_n.iter().sum::<u64>(), 20_000);
    assert!(profile.calibration.windows(2).all(|w| w[0] <= w[1]));
    // Expected accuracy in a bin = mean confidence there; bin 0 only holds [0.1, 0.125).
    for (bin, &p) in profile.calibration.iter().enumerate() {
        let want = if bin == 0 {
            0.1125
        } else {
            (bin as f64 + 0.5) / 8.0
        };
        // Standard errors are below 0.014 (bin 0, ~740 rows) and 0.01 elsewhere.
        assert!((p - want).abs() < 0.05, "bin {bin}: {p} vs {want}");
    }
    let accuracy = profile.accuracy.unwrap();
    assert!((accuracy - 0.55).abs() < 0.015, "{accuracy}");
}

#[test]
fn calibration_pools_a_non_monotone_model() {
    // Right 90 % of the time below 0.5 confidence, 50 % above: the isotonic fit is flat.
    let profile = build(
        &model_csv(30_000, |c| if c < 0.5 { 0.9 } else { 0.5 }),
        &opts(),
    )
    .unwrap();
    let cal = &profile.calibration;
    assert!(cal.windows(2).all(|w| w[0] <= w[1]), "{cal:?}");
    let accuracy = profile.accuracy.unwrap();
    for &p in cal {
        assert!((p - accuracy).abs() < 1e-12, "{cal:?} vs {accuracy}");
    }
    // 4/9 of the rows at 0.9, 5/9 at 0.5.
    assert!(
        (accuracy - (4.0 * 0.9 + 5.0 * 0.5) / 9.0).abs() < 0.02,
        "{accuracy}"
    );
}

#[test]
fn json_round_trip_is_exact() {
    // Calibration and accuracy are arbitrary f64 ratios; serde_json's default parser would get
    // about one in ten of them wrong by an ulp (hence its `float_roundtrip` feature).
    for seed in 0..20 {
        let rows = stream(seed, 1000 + 37 * seed as usize);
        let profile = build(
            &stream_csv(&rows),
            &BuildOptions {
                conf_bins: 32,
                ..opts()
            },
        )
        .unwrap();
        let json = serde_json::to_string(&profile).unwrap();
        let back: MonitoringProfile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, profile, "seed {seed}");
        back.validate().unwrap();
    }
}

#[test]
fn validate_rejects_broken_profiles() {
    let good = build(&stream_csv(&stream(5, 1000)), &opts()).unwrap();
    good.validate().unwrap();
    type Break = fn(&mut MonitoringProfile);
    let cases: &[(&str, Break, &str)] = &[
        (
            "edges",
            |p| p.features[0].hist.upper[3] = p.features[0].hist.upper[2],
            "feature `f0`: upper edge 3",
        ),
        (
            "nan lo",
            |p| p.features[1].hist.lo = f32::NAN,
            "feature `f1`: lo NaN",
        ),
        (
            "inf edge",
            |p| p.features[1].hist.upper[15] = f32::INFINITY,
            "not finite",
        ),
        (
            "counts length",
            |p| {
                p.features[2].hist.counts.pop();
            },
            "15 counts for 16 bins",
        ),
        (
            "counts total",
            |p| p.features[2].hist.counts[0] += 1,
            "counts sum to 1001",
        ),
        (
            "no bins",
            |p| {
                p.features[2].hist.upper.clear();
                p.features[2].hist.counts.clear();
            },
            "0 bins",
        ),
        (
            "duplicate name",
            |p| p.features[1].name = "f0".to_string(),
            "`f0` appears more than once",
        ),
        (
            "latency",
            |p| p.latency.as_mut().unwrap().nan += 1,
            "latency: counts sum",
        ),
        (
            "classes total",
            |p| p.classes[0] += 1,
            "class counts do not sum",
        ),
        (
            "no classes",
            |p| {
                p.classes.clear();
                p.confidence.clear();
            },
            "0 classes",
        ),
        (
            "confidence rows",
            |p| {
                p.confidence.pop();
            },
            "confidence rows",
        ),
        (
            "confidence row sum",
            |p| p.confidence[0][7] += 1,
            "class 0: confidence counts",
        ),
        (
            "conf bins",
            |p| p.conf_bins = 9,
            "class 0: 8 confidence bins, expected 9",
        ),
        ("conf bins zero", |p| p.conf_bins = 0, "0 confidence bins"),
        (
            "calibration range",
            |p| p.calibration[7] = 1.5,
            "bin 7 (1.5) is outside [0, 1]",
        ),
        (
            "calibration nan",
            |p| p.calibration[2] = f64::NAN,
            "bin 2 (NaN)",
        ),
        (
            "calibration order",
            |p| p.calibration.swap(0, 7),
            "calibration decreases at bin 1",
        ),
        (
            "calibration length",
            |p| {
                p.calibration.pop();
            },
            "7 calibration values",
        ),
        (
            "support",
            |p| p.calibration_n[0] += 1,
            "support does not sum",
        ),
        ("accuracy missing", |p| p.accuracy = None, "no accuracy"),
        (
            "accuracy range",
            |p| p.accuracy = Some(1.01),
            "accuracy 1.01",
        ),
        (
            "labelled",
            |p| {
                p.labelled = 0;
                p.calibration_n = vec![0; 8];
            },
            "an accuracy without labelled rows",
        ),
        (
            "too many labels",
            |p| {
                p.labelled = 2000;
                p.calibration_n = vec![250; 8];
            },
            "2000 labelled rows out of 1000",
        ),
    ];
    for (name, break_it, want) in cases {
        let mut p = good.clone();
        break_it(&mut p);
        match p.validate() {
            Err(e @ ProfileError::Invalid(_)) => {
                let msg = e.to_string();
                assert!(msg.contains(want), "{name}: `{msg}` lacks `{want}`");
                assert!(msg.starts_with("invalid monitoring profile: "), "{msg}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn device_edges_need_the_firmware_bin_count() {
    let profile = build(&stream_csv(&stream(5, 1000)), &opts()).unwrap();
    let h = &profile.features[0].hist;
    let e = device_edges::<8>(h).unwrap_err();
    assert_eq!(
        e,
        ProfileError::BinCount {
            expected: 8,
            got: 16
        }
    );
    assert!(
        e.to_string()
            .contains("has 16 bins but the device build expects 8")
    );
    let e = device_edges::<16>(h).unwrap();
    assert_eq!((e.lo(), &e.upper()[..]), (h.lo, &h.upper[..]));
    let mut broken = h.clone();
    broken.upper[1] = broken.upper[0];
    assert!(matches!(
        device_edges::<16>(&broken),
        Err(ProfileError::Invalid(_))
    ));
    assert!(profile.feature_edges::<7, 16>().is_err());
    let mut no_latency = profile.clone();
    no_latency.latency = None;
    assert!(no_latency.latency_edges::<8>().is_err());
}

/// A valid CSV of 40 rows (lines 2 to 41) with 4 bins; `edit` changes it first.
fn small_csv(edit: impl FnOnce(&mut Vec<String>)) -> String {
    let mut lines = vec!["x,prediction,confidence,label,latency_us".to_string()];
    for i in 0..40 {
        lines.push(format!(
            "{},{},0.{},{},{}",
            i,
            i % 3,
            5 + i % 5,
            i % 3,
            1000 + i
        ));
    }
    edit(&mut lines);
    lines.join("\n") + "\n"
}

fn four_bins() -> BuildOptions {
    BuildOptions { bins: 4, ..opts() }
}

#[test]
fn errors_name_the_line_and_column() {
    type Edit = fn(&mut Vec<String>);
    type Change = fn(&mut BuildOptions);
    // (case, edit of the CSV lines, change of the options, expected message parts)
    let cases: &[(&str, Edit, Change, &[&str])] = &[
        (
            "no prediction",
            |l| l[0] = "x,pred,confidence,label,latency_us".into(),
            |_| {},
            &[
                "line 1 (header)",
                "no column `prediction`",
                "x, pred, confidence",
            ],
        ),
        (
            "no confidence",
            |l| l[0] = "x,prediction,conf,label,latency_us".into(),
            |_| {},
            &["line 1 (header)", "no column `confidence`"],
        ),
        (
            "missing feature",
            |_| {},
            |o| o.features = Some(vec!["x".into(), "y".into()]),
            &["line 1 (header)", "no column `y`"],
        ),
        (
            "feature twice",
            |_| {},
            |o| o.features = Some(vec!["x".into(), "x".into()]),
            &["column `x` appears more than once"],
        ),
        (
            "duplicate header",
            |l| l[0] = "x,prediction,confidence,x,latency_us".into(),
            |_| {},
            &["line 1 (header)", "column `x` appears more than once"],
        ),
        (
            "unnamed header",
            |l| l[0] = "x,prediction,confidence,,latency_us".into(),
            |_| {},
            &["line 1 (header)", "column 4 has no name"],
        ),
        (
            "bad feature",
            |l| l[6] = "abc,1,0.5,1,1000".into(),
            |_| {},
            &["line 7, column `x`", "`abc` is not a number"],
        ),
        (
            "fractional class",
            |l| l[9] = "1,1.5,0.5,1,1000".into(),
            |_| {},
            &["line 10, column `prediction`", "`1.5` is not a class index"],
        ),
        (
            "negative class",
            |l| l[9] = "1,-1,0.5,1,1000".into(),
            |_| {},
            &["line 10, column `prediction`", "`-1` is not a class index"],
        ),
        (
            "empty prediction",
            |l| l[3] = "1,,0.5,1,1000".into(),
            |_| {},
            &["line 4, column `prediction`", "the value is empty"],
        ),
        (
            "empty confidence",
            |l| l[3] = "1,1,,1,1000".into(),
            |_| {},
            &["line 4, column `confidence`", "the value is empty"],
        ),
        (
            "class above option",
            |l| l[12] = "1,3,0.5,1,1000".into(),
            |o| o.classes = Some(3),
            &[
                "line 13, column `prediction`",
                "class 3 is not below 3",
                "raise it",
            ],
        ),
        (
            "class above limit",
            |l| l[12] = "1,64,0.5,1,1000".into(),
            |_| {},
            &[
                "line 13, column `prediction`",
                "class 64 is not below 64",
                "protocol",
            ],
        ),
        (
            "huge class",
            |l| l[12] = "1,99999999999999999999,0.5,1,1000".into(),
            |_| {},
            &["line 13, column `prediction`", "is not a class index"],
        ),
        (
            "label above option",
            |l| l[40] = "1,1,0.5,7,1000".into(),
            |o| o.classes = Some(3),
            &["line 41, column `label`", "class 7 is not below 3"],
        ),
        (
            "bad label",
            |l| l[40] = "1,1,0.5,cat,1000".into(),
            |_| {},
            &["line 41, column `label`", "`cat` is not a class index"],
        ),
        (
            "confidence above 1",
            |l| l[2] = "1,1,1.5,1,1000".into(),
            |_| {},
            &["line 3, column `confidence`", "1.5 is outside [0, 1]"],
        ),
        (
            "negative confidence",
            |l| l[2] = "1,1,-0.1,1,1000".into(),
            |_| {},
            &["line 3, column `confidence`", "-0.1 is outside [0, 1]"],
        ),
        (
            "nan confidence",
            |l| l[2] = "1,1,NaN,1,1000".into(),
            |_| {},
            &["line 3, column `confidence`", "NaN is outside [0, 1]"],
        ),
        (
            "text confidence",
            |l| l[2] = "1,1,high,1,1000".into(),
            |_| {},
            &["line 3, column `confidence`", "`high` is not a probability"],
        ),
        (
            "negative latency",
            |l| l[5] = "1,1,0.5,1,-3".into(),
            |_| {},
            &["line 6, column `latency_us`", "not negative"],
        ),
        (
            "short row",
            |l| l[8] = "1,1,0.5,1".into(),
            |_| {},
            &[
                "reference CSV line 9",
                "the row has 4 fields but the header has 5",
            ],
        ),
        (
            "long row",
            |l| l[8] = "1,1,0.5,1,1000,9".into(),
            |_| {},
            &["reference CSV line 9", "6 fields"],
        ),
        (
            "too few rows",
            |l| l.truncate(20),
            |_| {},
            &["19 data rows", "4 bins per feature need at least 20"],
        ),
        ("no rows", |l| l.truncate(1), |_| {}, &["0 data rows"]),
        (
            "nan feature",
            |l| {
                for r in l.iter_mut().skip(1) {
                    *r = format!("NaN{}", &r[r.find(',').unwrap()..]);
                }
            },
            |_| {},
            &["feature `x` has no finite value"],
        ),
        (
            "huge feature",
            |l| l[2] = "3.4028235e38,1,0.5,1,1000".into(),
            |_| {},
            &["feature `x`", "largest finite f32"],
        ),
        (
            "bins 0",
            |_| {},
            |o| o.bins = 0,
            &["bins = 0 is out of range", "between 1 and 64"],
        ),
        (
            "bins 65",
            |_| {},
            |o| o.bins = 65,
            &["bins = 65 is out of range"],
        ),
        (
            "conf bins 33",
            |_| {},
            |o| o.conf_bins = 33,
            &["conf_bins = 33", "between 1 and 32"],
        ),
        (
            "classes 0",
            |_| {},
            |o| o.classes = Some(0),
            &["classes = 0"],
        ),
        (
            "classes 65",
            |_| {},
            |o| o.classes = Some(65),
            &["classes = 65"],
        ),
        (
            "latency edges",
            |_| {},
            |o| o.latency_edges_us = vec![0.0, 10.0, 5.0],
            &["latency edges [0.0, 10.0, 5.0]"],
        ),
        (
            "latency edges lo only",
            |_| {},
            |o| o.latency_edges_us = vec![0.0],
            &["latency edges [0.0]"],
        ),
        (
            "latency edges many",
            |_| {},
            |o| o.latency_edges_us = (0..34).map(|i| i as f32).collect(),
            &["1 to 32"],
        ),
    ];
    for (name, edit, change, want) in cases {
        let mut o = four_bins();
        change(&mut o);
        let msg = match build(&small_csv(edit), &o) {
            Ok(_) => panic!("{name}: built"),
            Err(e) => e.to_string(),
        };
        for w in *want {
            assert!(msg.contains(w), "{name}: `{msg}` lacks `{w}`");
        }
    }
    // The base CSV itself is fine.
    build(&small_csv(|_| {}), &four_bins()).unwrap();
}

#[test]
fn error_variants_carry_the_position() {
    let e = build(
        &small_csv(|l| l[6] = "abc,1,0.5,1,1000".into()),
        &four_bins(),
    )
    .unwrap_err();
    assert_eq!(
        e,
        ProfileError::BadNumber {
            line: 7,
            column: "x".into(),
            value: "abc".into(),
            expected: "a number (or empty for a missing value)",
        }
    );
    let e = build(&small_csv(|l| l[8] = "1,1,0.5,1".into()), &four_bins()).unwrap_err();
    assert!(
        matches!(e, ProfileError::Csv { line: Some(9), .. }),
        "{e:?}"
    );
    // Invalid UTF-8 in a row.
    let mut bytes = small_csv(|_| {}).into_bytes();
    let at = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    bytes[at] = 0xff;
    let e = build_profile(&bytes[..], &four_bins()).unwrap_err();
    assert!(
        matches!(e, ProfileError::Csv { line: Some(2), .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("not UTF-8"), "{e}");
    // Too many feature columns.
    let mut header: Vec<String> = (0..65).map(|i| format!("f{i}")).collect();
    header.extend(["prediction".into(), "confidence".into()]);
    let e = build(&(header.join(",") + "\n"), &four_bins()).unwrap_err();
    assert_eq!(
        e,
        ProfileError::OutOfRange {
            option: "features",
            value: 65,
            max: 64
        }
    );
}

#[test]
fn options_choose_features_classes_and_conf_bins() {
    let rows = stream(9, 800);
    let profile = build(
        &stream_csv(&rows),
        &BuildOptions {
            features: Some(vec!["f7".into(), "f2".into()]),
            classes: Some(12),
            conf_bins: 4,
            bins: 8,
            latency_edges_us: vec![500.0, 8_000.0, 9_000.0, 10_000.0],
            ..opts()
        },
    )
    .unwrap();
    let names: Vec<&str> = profile.features.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["f7", "f2"]);
    assert_eq!(profile.features[0].hist.upper.len(), 8);
    assert_eq!(profile.classes.len(), 12);
    assert_eq!(&profile.classes[10..], &[0, 0]);
    assert!(profile.confidence.iter().all(|r| r.len() == 4));
    assert_eq!(profile.calibration.len(), 4);
    let lat = profile.latency.unwrap();
    assert_eq!(
        (lat.lo, lat.upper.clone()),
        (500.0, vec![8_000.0, 9_000.0, 10_000.0])
    );
    let over = rows.iter().filter(|r| r.latency_us > 10_000).count() as u64;
    let under = rows.iter().filter(|r| r.latency_us < 500).count() as u64;
    assert_eq!((lat.overflow, lat.underflow), (over, under));
    assert_eq!(lat.total(), 800);
    // The model id and version are carried.
    assert_eq!(
        (profile.model_id.as_str(), profile.model_version.as_str()),
        ("kws", "1.2.0")
    );
}

#[test]
fn default_classes_is_the_largest_seen_plus_one() {
    // Predictions 0..3, a label 5.
    let profile = build(&small_csv(|l| l[4] = "1,1,0.5,5,1000".into()), &four_bins()).unwrap();
    assert_eq!(profile.classes.len(), 6);
    assert_eq!(profile.classes.iter().sum::<u64>(), 40);
    // No latency column: no latency histogram; whitespace around cells is fine.
    let csv = "x , prediction,confidence\n".to_string()
        + &(0..20)
            .map(|i| format!(" {i} , 0 , 0.5\n"))
            .collect::<String>();
    let profile = build(&csv, &four_bins()).unwrap();
    assert_eq!(profile.latency, None);
    assert_eq!(profile.features[0].name, "x");
}

// --- The shared fixture -------------------------------------------------------------------

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference.csv");

/// The fixture's content: 400 rows of the device testkit's reference stream (seed 2024), four
/// decimals, every fourth row unlabelled.
fn fixture_csv() -> String {
    let mut rng = Rng::new(2024);
    let mut csv = String::from("f0,f1,f2,f3,f4,f5,f6,f7,prediction,confidence,label,latency_us\n");
    for i in 0..400 {
        let s = sample(&mut rng, &StreamParams::default());
        for x in s.features {
            write!(csv, "{x:.4},").unwrap();
        }
        let label = if i % 4 == 3 {
            String::new()
        } else {
            s.actual.to_string()
        };
        writeln!(
            csv,
            "{},{:.4},{label},{}",
            s.predicted, s.confidence, s.latency_us
        )
        .unwrap();
    }
    csv
}

/// `tests/data/reference.csv` is what [`fixture_csv`] generates; regenerate it with
/// `TINYFLEET_BLESS=1 cargo test -p tinyfleet-drift --test profile_build fixture`.
#[test]
fn fixture_is_current_and_builds() {
    let want = fixture_csv();
    if std::env::var_os("TINYFLEET_BLESS").is_some() {
        std::fs::write(FIXTURE, &want).unwrap();
    }
    let have = std::fs::read_to_string(FIXTURE).unwrap();
    assert!(
        have == want,
        "{FIXTURE} is stale: regenerate it with TINYFLEET_BLESS=1"
    );
    assert!(have.len() < 100_000, "{} bytes", have.len());
    let profile = build(
        &have,
        &BuildOptions {
            classes: Some(10),
            ..opts()
        },
    )
    .unwrap();
    profile.validate().unwrap();
    assert_eq!((profile.n, profile.labelled), (400, 300));
    assert_eq!(profile.features.len(), 8);
    assert!(profile.accuracy.unwrap() > 0.8);
    profile.feature_edges::<8, 16>().unwrap();
    profile.latency_edges::<8>().unwrap();
}

// --- Never panics -------------------------------------------------------------------------

fn cell() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "",
        "0",
        "1",
        "2",
        "63",
        "64",
        "0.5",
        "1.0",
        "-1",
        "NaN",
        "inf",
        "-inf",
        "abc",
        "3.4028235e38",
        "1e-45",
        "\"q\"",
        " 7 ",
        "99999999999999999999",
    ])
}

proptest! {
    #[test]
    fn arbitrary_csv_never_panics(
        header in prop::collection::vec(
            prop::sample::select(
                vec!["x", "y", "prediction", "confidence", "label", "latency_us", ""]
            ),
            0..6),
        rows in prop::collection::vec(prop::collection::vec(cell(), 0..7), 0..60),
        bins in 0usize..6,
    ) {
        let mut csv = header.join(",");
        csv.push('\n');
        for r in &rows {
            csv.push_str(&r.join(","));
            csv.push('\n');
        }
        let o = BuildOptions { bins, ..opts() };
        if let Ok(p) = build(&csv, &o) {
            prop_assert!(p.validate().is_ok());
            let json = serde_json::to_string(&p).unwrap();
            let back: MonitoringProfile = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, p);
        }
    }
}

fn feature_cell() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (-100.0f32..100.0).prop_map(|x| x.to_string()),
        3 => (0u8..3).prop_map(|x| x.to_string()),
        1 => prop::sample::select(vec!["", "NaN", "inf", "-inf", "-0", "1e-40"])
            .prop_map(str::to_string),
    ]
}

proptest! {
    #[test]
    fn well_formed_csv_gives_a_valid_profile_binned_like_the_device(
        rows in prop::collection::vec(
            (feature_cell(), feature_cell(), 0usize..5, 0.0f32..=1.0,
             prop::option::of(0usize..5), prop::option::of(0u32..200_000)),
            20..150),
    ) {
        let mut csv = String::from("a,b,prediction,confidence,label,latency_us\n");
        for (a, b, p, c, l, t) in &rows {
            let l = l.map(|l| l.to_string()).unwrap_or_default();
            let t = t.map(|t| t.to_string()).unwrap_or_default();
            writeln!(csv, "{a},{b},{p},{c},{l},{t}").unwrap();
        }
        let profile = match build(&csv, &four_bins()) {
            Ok(p) => p,
            // A column without any finite value is the only way these rows can fail.
            Err(ProfileError::NoFiniteValues { .. }) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        prop_assert!(profile.validate().is_ok());
        prop_assert_eq!(profile.n, rows.len() as u64);
        for (i, f) in profile.features.iter().enumerate() {
            let edges = device_edges::<4>(&f.hist).unwrap();
            let mut device = Histogram::<4>::default();
            for row in &rows {
                let cell = if i == 0 { &row.0 } else { &row.1 };
                let x = if cell.is_empty() { f32::NAN } else { cell.parse().unwrap() };
                device.add(edges.cell(x));
            }
            let widen = |x: u32| u64::from(x);
            prop_assert_eq!(device.bins.map(widen).to_vec(), f.hist.counts.clone());
            prop_assert_eq!(
                [device.underflow, device.overflow, device.nan].map(widen),
                [f.hist.underflow, f.hist.overflow, f.hist.nan]
            );
        }
        let json = serde_json::to_string(&profile).unwrap();
        let back: MonitoringProfile = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, profile);
    }
}
