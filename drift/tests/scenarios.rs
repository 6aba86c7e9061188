//! Synthetic fleets with known ground truth through the drift engine.

use tinyfleet_drift::engine::{
    DriftConfig, Engine, Fault, Finding, FindingKind, ScopeKind, Subject,
};
use tinyfleet_drift::sim::{self, Condition, Fleet, SimFault};

const WINDOW_MS: i64 = 300_000;

/// Runs `windows` windows of `per_window` inferences; `change(w, fleet)` alters the fleet
/// before window `w`. Returns the findings of every window.
fn run(
    fleet: &mut Fleet,
    windows: usize,
    per_window: usize,
    labelled: f64,
    mut change: impl FnMut(usize, &mut Fleet),
) -> Vec<Vec<Finding>> {
    let profiles = sim::profiles();
    let mut engine = Engine::new(DriftConfig::default());
    (0..windows)
        .map(|w| {
            change(w, fleet);
            let (input, _) = fleet.windows(per_window, labelled);
            engine
                .evaluate(w as i64 * WINDOW_MS, &input, &profiles)
                .findings
        })
        .collect()
}

fn describe(f: &[Finding]) -> Vec<String> {
    f.iter()
        .map(|f| format!("{} {} {:?}", f.kind.alertname(), f.scope.id(), f.kind))
        .collect()
}

#[test]
fn a_fleet_without_drift_raises_nothing() {
    let mut fleet = Fleet::new(1000, 10, 1);
    let findings = run(&mut fleet, 24, 100, 0.05, |_, _| {});
    let all: Vec<_> = findings.iter().flatten().cloned().collect();
    assert!(all.is_empty(), "false alarms: {:?}", describe(&all));
}

#[test]
fn a_shifted_feature_on_a_tenth_of_the_fleet_is_found_and_localised() {
    let mut fleet = Fleet::new(1000, 10, 2);
    let start = 4;
    let findings = run(&mut fleet, 10, 100, 0.0, |w, fleet| {
        if w == start {
            for d in fleet.devices.iter_mut().filter(|d| d.site == "s3") {
                d.condition = Condition::shifted(4, 0.5);
            }
        }
    });
    assert!(findings[..start].iter().all(Vec::is_empty));
    let first = findings
        .iter()
        .position(|f| !f.is_empty())
        .expect("the shift is detected");
    assert!(
        first - start <= 2,
        "detected {} windows after the change",
        first - start
    );
    for f in findings[first..].iter().flatten() {
        assert_eq!(
            f.kind,
            FindingKind::FeatureDrift {
                feature: "f4".into()
            },
            "{:?}",
            describe(&findings[first])
        );
        assert_eq!(f.scope.kind, ScopeKind::Tag);
        assert_eq!(f.scope.key, "site=s3");
    }
}

#[test]
fn a_broken_sensor_is_a_device_fault_not_cohort_drift() {
    for (fault, want) in [
        (SimFault::Constant, Fault::ZeroVariance),
        (SimFault::StuckNoisy, Fault::Stuck),
        (SimFault::NanBurst, Fault::NanBurst),
        (SimFault::Saturated, Fault::OutOfRange),
    ] {
        // Small cohorts (20 devices per site) so one device weighs 5% of its site.
        let mut fleet = Fleet::new(200, 10, 3);
        let findings = run(&mut fleet, 6, 100, 0.0, |w, fleet| {
            if w == 1 {
                fleet.devices[13].condition = Condition::faulty(2, fault);
            }
        });
        let all: Vec<_> = findings.iter().flatten().collect();
        assert!(!all.is_empty(), "{fault:?} not reported");
        for f in &all {
            assert_eq!(
                f.scope.kind,
                ScopeKind::Device,
                "{:?}",
                describe(&findings[5])
            );
            assert_eq!(f.scope.key, "dev-000013");
            assert_eq!(
                f.kind,
                FindingKind::SensorFault {
                    feature: "f2".into(),
                    fault: want
                }
            );
        }
    }
}

#[test]
fn one_device_moved_elsewhere_is_device_drift_not_cohort_drift() {
    let mut fleet = Fleet::new(200, 10, 4);
    let findings = run(&mut fleet, 10, 100, 0.0, |w, fleet| {
        if w == 0 {
            fleet.devices[7].condition = Condition::shifted(5, 2.0);
        }
    });
    let all: Vec<_> = findings.iter().flatten().collect();
    assert!(!all.is_empty());
    for f in all {
        assert_eq!(
            f.kind,
            FindingKind::DeviceDrift {
                feature: "f5".into()
            },
            "{}",
            f.summary
        );
        assert_eq!(f.scope.key, "dev-000007");
    }
}

#[test]
fn cbpe_tracks_true_accuracy_under_covariate_shift_within_its_band() {
    let profiles = sim::profiles();
    let mut engine = Engine::new(DriftConfig::default());
    let mut fleet = Fleet::new(300, 3, 5);
    // Site s1's feature 0 (which drives confidence) narrows: its inputs get harder and the
    // model's true accuracy falls.
    for d in fleet.devices.iter_mut().filter(|d| d.site == "s1") {
        d.condition = Condition::scaled(0, 0.3);
    }
    let mut dropped = false;
    for w in 0..8 {
        let (input, truth) = fleet.windows(100, 0.0);
        let eval = engine.evaluate(w * WINDOW_MS, &input, &profiles);
        for s in eval
            .scores
            .iter()
            .filter(|s| s.subject == Subject::EstimatedAccuracy && s.scope.kind == ScopeKind::Tag)
        {
            let site = s.scope.key.trim_start_matches("site=");
            let (est, band) = (s.accuracy.unwrap_or(0.0), s.band.unwrap_or(0.0));
            let t = truth[site];
            assert!(
                (est - t).abs() <= band,
                "{site}: estimate {est:.3} +/- {band:.3}, true {t:.3}"
            );
        }
        dropped |= eval.findings.iter().any(|f| {
            matches!(f.kind, FindingKind::EstimatedAccuracyDrop { .. }) && f.scope.key == "site=s1"
        });
    }
    assert!(dropped, "the accuracy drop of site s1 is reported");
}

#[test]
fn concept_drift_shows_in_labelled_accuracy_while_cbpe_stays_blind() {
    let mut fleet = Fleet::new(300, 3, 6);
    let findings = run(&mut fleet, 8, 100, 0.2, |w, fleet| {
        if w == 2 {
            for d in fleet.devices.iter_mut().filter(|d| d.site == "s2") {
                d.condition = Condition::concept(0.3);
            }
        }
    });
    let all: Vec<_> = findings.iter().flatten().collect();
    assert!(
        all.iter().any(|f| matches!(f.kind, FindingKind::AccuracyDrop { .. })
            && f.scope.key == "site=s2"),
        "{:?}",
        all.iter().map(|f| &f.summary).collect::<Vec<_>>()
    );
    for f in &all {
        assert!(
            matches!(f.kind, FindingKind::AccuracyDrop { .. }),
            "only the labelled accuracy moves: {}",
            f.summary
        );
    }
}

#[test]
fn engine_state_survives_a_round_trip() {
    let profiles = sim::profiles();
    let mut engine = Engine::new(DriftConfig::default());
    let mut fleet = Fleet::new(50, 2, 8);
    let (input, _) = fleet.windows(100, 0.1);
    engine.evaluate(0, &input, &profiles);
    let json = serde_json::to_string(&engine).expect("serialise");
    let back: Engine = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back.scopes(), engine.scopes());
}

#[test]
fn the_evaluation_reports_every_scenario() {
    let opts = tinyfleet_drift::evaluate::EvalOptions {
        devices: 300,
        runs: 1,
        null_windows: 6,
        after: 6,
        ..Default::default()
    };
    let results = tinyfleet_drift::evaluate::run(&opts);
    assert!(results.len() >= 10);
    assert_eq!(results[0].false_alarms, 0, "{:?}", results[0].examples);
    let strong = results
        .iter()
        .find(|r| r.name.starts_with("covariate shift 1 sd"))
        .expect("scenario");
    assert_eq!((strong.detected, strong.missed), (1, 0));
    let table = tinyfleet_drift::evaluate::markdown(&opts, &results);
    assert!(table.contains("| scenario | runs | detected | missed |"));
}
