//! Scenario evaluation: detection delay, missed detections and false alarms of the engine on
//! generated fleets with known ground truth (`tinyfleet drift-eval`, recorded in
//! docs/benchmarks.md).

use crate::engine::{DriftConfig, Engine, Finding, FindingKind, ScopeKind};
use crate::sim::{self, Condition, Fleet, SimFault};

/// Settings of an evaluation run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub devices: usize,
    pub sites: usize,
    /// Inferences per device window.
    pub per_window: usize,
    /// Windows before the change.
    pub before: usize,
    /// Windows after the change; a change not found by then is missed.
    pub after: usize,
    /// Independent runs per scenario (different seeds).
    pub runs: usize,
    /// Windows of the no-drift fleet.
    pub null_windows: usize,
    pub config: DriftConfig,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            devices: 1000,
            sites: 10,
            per_window: 100,
            before: 4,
            after: 10,
            runs: 5,
            null_windows: 96,
            config: DriftConfig::default(),
        }
    }
}

/// One scenario's results over its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioResult {
    pub name: String,
    pub runs: usize,
    pub detected: usize,
    pub missed: usize,
    /// Windows from the change to the first correct finding, over detected runs.
    pub mean_delay: Option<f64>,
    pub max_delay: Option<usize>,
    /// Findings that are not the expected one (wrong scope, kind or feature), over all windows.
    pub false_alarms: usize,
    /// Windows evaluated in all runs.
    pub windows: usize,
    /// A few of the false alarms, for the report.
    pub examples: Vec<String>,
}

type Expect = fn(&Finding) -> bool;

struct Scenario {
    name: &'static str,
    apply: fn(&mut Fleet),
    expect: Expect,
    labelled: f64,
}

fn site(fleet: &mut Fleet, name: &str, c: &Condition) {
    for d in fleet.devices.iter_mut().filter(|d| d.site == name) {
        d.condition = c.clone();
    }
}

fn scenarios() -> Vec<Scenario> {
    fn feature_at(f: &Finding, feature: &str, scope: &str) -> bool {
        f.kind
            == FindingKind::FeatureDrift {
                feature: feature.into(),
            }
            && f.scope.kind == ScopeKind::Tag
            && f.scope.key == scope
    }
    fn fault(f: &Finding) -> bool {
        matches!(&f.kind, FindingKind::SensorFault { feature, .. } if feature == "f2")
            && f.scope.key == "dev-000013"
    }
    vec![
        Scenario {
            name: "covariate shift 0.25 sd, feature f4, 10% cohort",
            apply: |f| site(f, "s3", &Condition::shifted(4, 0.25)),
            expect: |f| feature_at(f, "f4", "site=s3"),
            labelled: 0.0,
        },
        Scenario {
            name: "covariate shift 0.5 sd, feature f4, 10% cohort",
            apply: |f| site(f, "s3", &Condition::shifted(4, 0.5)),
            expect: |f| feature_at(f, "f4", "site=s3"),
            labelled: 0.0,
        },
        Scenario {
            name: "covariate shift 1 sd, feature f4, 10% cohort",
            apply: |f| site(f, "s3", &Condition::shifted(4, 1.0)),
            expect: |f| feature_at(f, "f4", "site=s3"),
            labelled: 0.0,
        },
        Scenario {
            name: "prior shift (feature f1 +0.5 sd moves predicted classes), 10% cohort",
            apply: |f| site(f, "s3", &Condition::shifted(1, 0.5)),
            expect: |f| {
                feature_at(f, "f1", "site=s3")
                    || (f.kind == FindingKind::LabelShift && f.scope.key == "site=s3")
            },
            labelled: 0.0,
        },
        Scenario {
            name: "inference latency x2, 10% cohort",
            apply: |f| {
                let mut c = Condition::none();
                c.latency_factor = 2.0;
                site(f, "s3", &c)
            },
            expect: |f| f.kind == FindingKind::LatencyShift && f.scope.key == "site=s3",
            labelled: 0.0,
        },
        Scenario {
            name: "one constant sensor (f2) on one device",
            apply: |f| f.devices[13].condition = Condition::faulty(2, SimFault::Constant),
            expect: fault,
            labelled: 0.0,
        },
        Scenario {
            name: "one NaN-bursting sensor (f2) on one device",
            apply: |f| f.devices[13].condition = Condition::faulty(2, SimFault::NanBurst),
            expect: fault,
            labelled: 0.0,
        },
        Scenario {
            name: "one saturated sensor (f2) on one device",
            apply: |f| f.devices[13].condition = Condition::faulty(2, SimFault::Saturated),
            expect: fault,
            labelled: 0.0,
        },
        Scenario {
            name: "concept drift (30% of right answers flip), 10% cohort, 5% labelled",
            apply: |f| site(f, "s3", &Condition::concept(0.3)),
            expect: |f| {
                matches!(f.kind, FindingKind::AccuracyDrop { .. }) && f.scope.key == "site=s3"
            },
            labelled: 0.05,
        },
        Scenario {
            name: "harder inputs (f0 spread x0.3), 10% cohort, no labels: CBPE",
            apply: |f| site(f, "s3", &Condition::scaled(0, 0.3)),
            expect: |f| {
                (matches!(f.kind, FindingKind::EstimatedAccuracyDrop { .. })
                    || feature_at(f, "f0", "site=s3"))
                    && f.scope.key == "site=s3"
            },
            labelled: 0.0,
        },
    ]
}

/// Runs every scenario and the no-drift fleet.
pub fn run(opts: &EvalOptions) -> Vec<ScenarioResult> {
    let profiles = sim::profiles();
    let mut results = Vec::new();
    // The no-drift fleet: every finding is a false alarm.
    let mut false_alarms = 0;
    let mut examples = Vec::new();
    for run in 0..opts.runs {
        let mut engine = Engine::new(opts.config.clone());
        let mut fleet = Fleet::new(opts.devices, opts.sites, 1000 + run as u64);
        for w in 0..opts.null_windows {
            let (input, _) = fleet.windows(opts.per_window, 0.05);
            for f in engine.evaluate(w as i64, &input, &profiles).findings {
                false_alarms += 1;
                if examples.len() < 3 {
                    examples.push(f.summary);
                }
            }
        }
    }
    results.push(ScenarioResult {
        name: format!("no drift, {} devices", opts.devices),
        runs: opts.runs,
        detected: 0,
        missed: 0,
        mean_delay: None,
        max_delay: None,
        false_alarms,
        windows: opts.runs * opts.null_windows,
        examples,
    });
    for s in scenarios() {
        let mut delays = Vec::new();
        let mut false_alarms = 0;
        let mut examples = Vec::new();
        for run in 0..opts.runs {
            let mut engine = Engine::new(opts.config.clone());
            let mut fleet = Fleet::new(opts.devices, opts.sites, 2000 + run as u64);
            let mut delay = None;
            for w in 0..opts.before + opts.after {
                if w == opts.before {
                    (s.apply)(&mut fleet);
                }
                let (input, _) = fleet.windows(opts.per_window, s.labelled);
                let eval = engine.evaluate(w as i64, &input, &profiles);
                for f in &eval.findings {
                    if w >= opts.before && (s.expect)(f) {
                        delay.get_or_insert(w - opts.before);
                    } else if !(w >= opts.before && side_effect(f)) {
                        false_alarms += 1;
                        if examples.len() < 3 {
                            examples.push(f.summary.clone());
                        }
                    }
                }
            }
            delays.extend(delay);
        }
        results.push(ScenarioResult {
            name: s.name.into(),
            runs: opts.runs,
            detected: delays.len(),
            missed: opts.runs - delays.len(),
            mean_delay: (!delays.is_empty())
                .then(|| delays.iter().sum::<usize>() as f64 / delays.len() as f64),
            max_delay: delays.iter().copied().max(),
            false_alarms,
            windows: opts.runs * (opts.before + opts.after),
            examples,
        });
    }
    results
}

/// Findings that are true consequences of the injected change besides the expected one (a
/// shifted input that drives predictions also moves the predicted classes and the confidence).
fn side_effect(f: &Finding) -> bool {
    f.scope.kind == ScopeKind::Tag
        && f.scope.key == "site=s3"
        && matches!(
            f.kind,
            FindingKind::LabelShift
                | FindingKind::FeatureDrift { .. }
                | FindingKind::EstimatedAccuracyDrop { .. }
                | FindingKind::AccuracyDrop { .. }
        )
}

/// The results as a Markdown table.
pub fn markdown(opts: &EvalOptions, results: &[ScenarioResult]) -> String {
    let mut out = format!(
        "{} devices over {} sites, {} inferences per device window; change after window {}, \
         missed if not found within {} windows; {} runs per scenario\n\n",
        opts.devices, opts.sites, opts.per_window, opts.before, opts.after, opts.runs
    );
    out.push_str(
        "| scenario | runs | detected | missed | mean delay (windows) | max delay | false alarms | windows |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.runs,
            r.detected,
            r.missed,
            fmt(r.mean_delay),
            r.max_delay.map_or("-".to_owned(), |d| d.to_string()),
            r.false_alarms,
            r.windows
        ));
    }
    let examples: Vec<_> = results.iter().filter(|r| !r.examples.is_empty()).collect();
    if !examples.is_empty() {
        out.push_str("\nExamples of false alarms:\n\n");
        for r in examples {
            for e in &r.examples {
                out.push_str(&format!("- {}: {e}\n", r.name));
            }
        }
    }
    out
}
