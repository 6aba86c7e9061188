//! Monitoring profiles: what a model's reference data looked like, in the shape devices report.
//!
//! A profile is built once per model version from a reference CSV ([`build_profile`]), stored and
//! served as JSON, checked on upload ([`MonitoringProfile::validate`]) and compiled into firmware
//! as bin edges ([`device_edges`]). Its feature and latency histograms are counted with exactly
//! the device's binning rule ([`Edges::cell`]) and its confidence histogram with exactly the
//! device's confidence bins, so a device fed the reference rows reports the profile's counts.
//!
//! Nothing here panics on input: a bad CSV, bad options or an inconsistent uploaded profile is a
//! [`ProfileError`] naming the CSV line and column, or the field.

use std::collections::HashSet;
use std::io::Read;

use serde::{Deserialize, Serialize};
use tinyfleet_device::sketch::{Cell, ConfigError, Edges};
use tinyfleet_device::wire::limits;

/// Column of the predicted (top-1) class index.
pub const PREDICTION: &str = "prediction";
/// Column of the probability the model gave its predicted class.
pub const CONFIDENCE: &str = "confidence";
/// Optional column of the true class index; an empty cell is an unlabelled row.
pub const LABEL: &str = "label";
/// Optional column of the inference time in microseconds.
pub const LATENCY_US: &str = "latency_us";
/// Columns that are never features by default.
pub const RESERVED_COLUMNS: [&str; 4] = [PREDICTION, CONFIDENCE, LABEL, LATENCY_US];
/// Reference rows needed per feature bin: fewer make quantile edges, and so the drift
/// statistics measured against them, noise.
pub const MIN_ROWS_PER_BIN: u64 = 5;

/// A model version's monitoring profile: reference histograms in the device's binning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitoringProfile {
    /// The model this profile belongs to.
    pub model_id: String,
    /// The model version this profile belongs to.
    pub model_version: String,
    /// Rows of the reference data set.
    pub n: u64,
    /// One histogram per monitored input feature, in the device's feature order.
    pub features: Vec<FeatureProfile>,
    /// Reference predicted-class counts (index = class id).
    pub classes: Vec<u64>,
    /// Reference top-1 confidence counts per predicted class: `confidence[class][bin]`,
    /// `conf_bins` uniform bins over [0, 1] like the device.
    pub confidence: Vec<Vec<u64>>,
    /// Number of confidence bins.
    pub conf_bins: usize,
    /// Per confidence bin: observed accuracy on the labelled reference rows, an isotonic
    /// (non-decreasing) fit, in [0, 1].
    pub calibration: Vec<f64>,
    /// Labelled reference rows per confidence bin (the calibration's support).
    pub calibration_n: Vec<u64>,
    /// Accuracy on the labelled reference rows (None without labels).
    pub accuracy: Option<f64>,
    /// Labelled reference rows.
    pub labelled: u64,
    /// Reference inference latency histogram, when the data set has a `latency_us` column.
    pub latency: Option<HistProfile>,
}

/// One monitored input feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureProfile {
    /// The feature's column name in the reference data.
    pub name: String,
    /// Its edges and reference counts.
    pub hist: HistProfile,
}

/// Edges and counts of one histogram, with the device's layout: bin `i` holds
/// `upper[i-1] <= x < upper[i]` (`upper[-1] = lo`), the last bin also holds `x == upper[B-1]`;
/// below `lo` is underflow, above the last edge overflow, NaN apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistProfile {
    /// Lower edge of the first bin.
    pub lo: f32,
    /// Upper edge of each bin, strictly increasing.
    pub upper: Vec<f32>,
    /// Count per bin (`counts.len() == upper.len()`).
    pub counts: Vec<u64>,
    /// Values below `lo`.
    pub underflow: u64,
    /// Values above the last edge.
    pub overflow: u64,
    /// NaN (and, in the reference CSV, empty) values.
    pub nan: u64,
}

/// How to build a profile from a reference CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOptions {
    /// The model the profile belongs to.
    pub model_id: String,
    /// The model version the profile belongs to.
    pub model_version: String,
    /// Quantile bins per feature (1 to [`limits::MAX_BINS`]; default 16).
    pub bins: usize,
    /// Uniform confidence bins over [0, 1] (1 to [`limits::MAX_CONF_BINS`]; default 8).
    pub conf_bins: usize,
    /// Number of classes; `None` takes the largest class index seen (prediction or label) + 1.
    pub classes: Option<usize>,
    /// Feature columns in device order; `None` takes every column except
    /// [`RESERVED_COLUMNS`], in header order.
    pub features: Option<Vec<String>>,
    /// Latency edges in microseconds: `lo` followed by the upper edge of each bin, so `L + 1`
    /// values for `L` bins. Default: the device's reference edges, 0 then 1 ms doubling to
    /// 128 ms ([`tinyfleet_device::testkit::LATENCY_US`]).
    pub latency_edges_us: Vec<f32>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        let mut latency_edges_us = vec![0.0];
        latency_edges_us.extend_from_slice(&tinyfleet_device::testkit::LATENCY_US);
        Self {
            model_id: String::new(),
            model_version: String::new(),
            bins: 16,
            conf_bins: 8,
            classes: None,
            features: None,
            latency_edges_us,
        }
    }
}

/// Why a profile could not be built, converted or accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The CSV itself is malformed or could not be read.
    #[error("reference CSV{}: {message}", at_line(*line))]
    Csv {
        /// Line of the offending record, when known.
        line: Option<u64>,
        /// What went wrong.
        message: String,
    },
    /// A required or requested column is not in the header.
    #[error("reference CSV line 1 (header): no column `{column}`; the header has: {found}")]
    MissingColumn {
        /// The column looked for.
        column: String,
        /// The header's columns, comma-separated.
        found: String,
    },
    /// Two header columns (or two requested features) have the same name.
    #[error("reference CSV line 1 (header): column `{column}` appears more than once")]
    DuplicateColumn {
        /// The repeated name.
        column: String,
    },
    /// A header column has an empty name.
    #[error("reference CSV line 1 (header): column {index} has no name; name it or remove it")]
    UnnamedColumn {
        /// 1-based position of the column.
        index: usize,
    },
    /// A required cell is empty.
    #[error(
        "reference CSV line {line}, column `{column}`: the value is empty; `{PREDICTION}` and \
         `{CONFIDENCE}` are required in every row"
    )]
    MissingValue {
        /// CSV line of the row.
        line: u64,
        /// The column.
        column: String,
    },
    /// A cell is not the number its column needs.
    #[error("reference CSV line {line}, column `{column}`: `{value}` is not {expected}")]
    BadNumber {
        /// CSV line of the row.
        line: u64,
        /// The column.
        column: String,
        /// The cell as written.
        value: String,
        /// What the column needs.
        expected: &'static str,
    },
    /// A class index (prediction or label) is too large.
    #[error(
        "reference CSV line {line}, column `{column}`: class {class} is not below {classes}, \
         {limit}"
    )]
    ClassOutOfRange {
        /// CSV line of the row.
        line: u64,
        /// The column.
        column: String,
        /// The class index found.
        class: u64,
        /// The number of classes it must stay below.
        classes: usize,
        /// Where that number comes from, and what to do.
        limit: &'static str,
    },
    /// A confidence is not a probability.
    #[error(
        "reference CSV line {line}, column `{CONFIDENCE}`: {value} is outside [0, 1]; it must be \
         the probability of the predicted class"
    )]
    ConfidenceOutOfRange {
        /// CSV line of the row.
        line: u64,
        /// The cell as written.
        value: String,
    },
    /// Too little reference data for the requested bins.
    #[error(
        "the reference CSV has {rows} data rows; {bins} bins per feature need at least {min} \
         ({MIN_ROWS_PER_BIN} per bin): add rows or lower the number of bins"
    )]
    TooFewRows {
        /// Data rows read.
        rows: u64,
        /// Rows needed.
        min: u64,
        /// Bins per feature asked for.
        bins: usize,
    },
    /// A dimension is zero or beyond the protocol's limit ([`limits`]).
    #[error(
        "{option} = {value} is out of range: it must be between 1 and {max} (the protocol's limit)"
    )]
    OutOfRange {
        /// The option or field.
        option: &'static str,
        /// Its value.
        value: usize,
        /// The largest accepted value.
        max: usize,
    },
    /// The latency edges option is not `lo` followed by increasing upper edges.
    #[error(
        "latency edges {edges:?}: expected lo followed by 1 to {} strictly increasing, finite \
         upper edges (microseconds)",
        limits::MAX_LATENCY_BINS
    )]
    BadLatencyEdges {
        /// The edges given.
        edges: Vec<f32>,
    },
    /// A feature column has no finite value to take quantiles of.
    #[error(
        "feature `{feature}` has no finite value in the reference CSV; fix the data or leave the \
         column out of the features"
    )]
    NoFiniteValues {
        /// The feature.
        feature: String,
    },
    /// A feature's values reach the largest f32, so no finite edge lies above its maximum.
    #[error(
        "feature `{feature}`: values reach the largest finite f32, so no finite upper edge lies \
         above them; rescale the feature"
    )]
    RangeTooWide {
        /// The feature.
        feature: String,
    },
    /// A profile histogram's bin count differs from the firmware's.
    #[error(
        "the profile histogram has {got} bins but the device build expects {expected}; rebuild \
         the profile with {expected} bins or the firmware with {got}"
    )]
    BinCount {
        /// Bins in the firmware's type.
        expected: usize,
        /// Bins in the profile.
        got: usize,
    },
    /// A profile is internally inconsistent.
    #[error("invalid monitoring profile: {0}")]
    Invalid(String),
}

fn at_line(line: Option<u64>) -> String {
    line.map(|l| format!(" line {l}")).unwrap_or_default()
}

impl HistProfile {
    /// An empty histogram over validated edges (see [`Edges::new`]).
    pub fn new(lo: f32, upper: Vec<f32>) -> Result<Self, ProfileError> {
        check_edges(lo, &upper).map_err(|why| ProfileError::Invalid(format!("edges: {why}")))?;
        let counts = vec![0; upper.len()];
        Ok(Self {
            lo,
            upper,
            counts,
            underflow: 0,
            overflow: 0,
            nan: 0,
        })
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.upper.len()
    }

    /// The cell `x` falls in: exactly the device's rule ([`Edges::cell`]).
    pub fn cell(&self, x: f32) -> Cell {
        let Some(&hi) = self.upper.last() else {
            return Cell::Overflow;
        };
        if x.is_nan() {
            Cell::Nan
        } else if x < self.lo {
            Cell::Underflow
        } else if x > hi {
            Cell::Overflow
        } else {
            Cell::Bin(
                self.upper
                    .partition_point(|&u| u <= x)
                    .min(self.upper.len() - 1),
            )
        }
    }

    /// Counts one value.
    pub fn add(&mut self, x: f32) {
        let slot = match self.cell(x) {
            Cell::Underflow => &mut self.underflow,
            Cell::Overflow => &mut self.overflow,
            Cell::Nan => &mut self.nan,
            Cell::Bin(i) => match self.counts.get_mut(i) {
                Some(slot) => slot,
                None => &mut self.overflow,
            },
        };
        *slot = slot.saturating_add(1);
    }

    /// All values counted, NaN included (saturating).
    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .chain([&self.underflow, &self.overflow, &self.nan])
            .fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// Edges valid, one count per bin, at most [`limits::MAX_BINS`] bins and `total` values.
    fn check(&self, max_bins: usize, total: u64) -> Result<(), String> {
        if self.upper.is_empty() || self.upper.len() > max_bins {
            return Err(format!(
                "{} bins, expected 1 to {max_bins}",
                self.upper.len()
            ));
        }
        check_edges(self.lo, &self.upper)?;
        if self.counts.len() != self.upper.len() {
            return Err(format!(
                "{} counts for {} bins",
                self.counts.len(),
                self.upper.len()
            ));
        }
        // A checked sum: `total()` saturates, and counts that overflow u64 but saturate to `n`
        // would pass, then overflow in the drift engine's own sums.
        let cells = [self.underflow, self.overflow, self.nan];
        if sum(&self.counts).and_then(|c| sum(&[c, sum(&cells)?])) != Some(total) {
            return Err(format!(
                "counts sum to {}, but the reference has {total} rows",
                self.total()
            ));
        }
        Ok(())
    }
}

/// `lo < upper[0] < ... < upper[B-1]`, all finite: what [`Edges::new`] accepts.
fn check_edges(lo: f32, upper: &[f32]) -> Result<(), String> {
    if !lo.is_finite() {
        return Err(format!("lo {lo} is not finite"));
    }
    let mut prev = lo;
    for (i, &e) in upper.iter().enumerate() {
        if !e.is_finite() {
            return Err(format!("upper edge {i} ({e}) is not finite"));
        }
        if e <= prev {
            return Err(format!(
                "upper edge {i} ({e}) is not above the previous edge ({prev})"
            ));
        }
        prev = e;
    }
    Ok(())
}

/// The device's edges for a profile histogram, for firmware builds and tests; fails when the
/// bin count is not `B` or the edges are not strictly increasing and finite.
pub fn device_edges<const B: usize>(h: &HistProfile) -> Result<Edges<B>, ProfileError> {
    let upper: [f32; B] = h
        .upper
        .as_slice()
        .try_into()
        .map_err(|_| ProfileError::BinCount {
            expected: B,
            got: h.upper.len(),
        })?;
    Edges::new(h.lo, upper).map_err(|e| {
        ProfileError::Invalid(match e {
            ConfigError::EdgesNotIncreasing => {
                format!(
                    "edges lo {} upper {:?} are not finite and strictly increasing",
                    h.lo, h.upper
                )
            }
            ConfigError::NoBins => "a histogram needs at least one bin".to_string(),
        })
    })
}

/// The confidence bin of a top-1 probability with `conf_bins` uniform bins over [0, 1]: exactly
/// the device's rule ([`tinyfleet_device::sketch::confidence_bin`]) with a run-time bin count.
/// `None` for NaN or zero bins.
pub fn confidence_bin(confidence: f32, conf_bins: usize) -> Option<usize> {
    if confidence.is_nan() || conf_bins == 0 {
        return None;
    }
    // Same f32 arithmetic as the device, so the two agree on every input.
    let scaled = confidence.clamp(0.0, 1.0) * conf_bins as f32;
    Some((scaled as usize).min(conf_bins - 1))
}

impl MonitoringProfile {
    /// Checks internal consistency: dimensions within the protocol's limits, every histogram's
    /// edges finite and strictly increasing with one count per bin and `n` values in all,
    /// class and confidence counts that agree, calibration non-decreasing in [0, 1] with
    /// support summing to `labelled`, and `accuracy` present exactly when there are labels.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |what: String| Err(ProfileError::Invalid(what));
        if self.features.len() > limits::MAX_FEATURES {
            return bad(format!(
                "{} features, at most {} are allowed",
                self.features.len(),
                limits::MAX_FEATURES
            ));
        }
        let mut names = HashSet::new();
        for f in &self.features {
            if !names.insert(f.name.as_str()) {
                return bad(format!("feature `{}` appears more than once", f.name));
            }
            f.hist
                .check(limits::MAX_BINS, self.n)
                .or_else(|why| bad(format!("feature `{}`: {why}", f.name)))?;
        }
        if let Some(l) = &self.latency {
            l.check(limits::MAX_LATENCY_BINS, self.n)
                .or_else(|why| bad(format!("latency: {why}")))?;
        }
        let c = self.classes.len();
        if !(1..=limits::MAX_CLASSES).contains(&c) {
            return bad(format!(
                "{c} classes, expected 1 to {}",
                limits::MAX_CLASSES
            ));
        }
        let k = self.conf_bins;
        if !(1..=limits::MAX_CONF_BINS).contains(&k) {
            return bad(format!(
                "{k} confidence bins, expected 1 to {}",
                limits::MAX_CONF_BINS
            ));
        }
        if sum(&self.classes) != Some(self.n) {
            return bad(format!(
                "class counts do not sum to the {} reference rows",
                self.n
            ));
        }
        if self.confidence.len() != c {
            return bad(format!(
                "{} confidence rows for {c} classes",
                self.confidence.len()
            ));
        }
        for (class, (row, &count)) in self.confidence.iter().zip(&self.classes).enumerate() {
            if row.len() != k {
                return bad(format!(
                    "class {class}: {} confidence bins, expected {k}",
                    row.len()
                ));
            }
            if sum(row) != Some(count) {
                return bad(format!(
                    "class {class}: confidence counts do not sum to its {count} predictions"
                ));
            }
        }
        if self.calibration.len() != k || self.calibration_n.len() != k {
            return bad(format!(
                "{} calibration values and {} supports for {k} confidence bins",
                self.calibration.len(),
                self.calibration_n.len()
            ));
        }
        let mut prev = 0.0;
        for (bin, &p) in self.calibration.iter().enumerate() {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("calibration of bin {bin} ({p}) is outside [0, 1]"));
            }
            if p < prev {
                return bad(format!(
                    "calibration decreases at bin {bin} ({p} after {prev}); it must be an \
                     isotonic fit"
                ));
            }
            prev = p;
        }
        if sum(&self.calibration_n) != Some(self.labelled) {
            return bad(format!(
                "calibration support does not sum to the {} labelled rows",
                self.labelled
            ));
        }
        if self.labelled > self.n {
            return bad(format!("{} labelled rows out of {}", self.labelled, self.n));
        }
        match self.accuracy {
            None if self.labelled > 0 => bad("labelled rows but no accuracy".to_string()),
            Some(_) if self.labelled == 0 => bad("an accuracy without labelled rows".to_string()),
            Some(a) if !(0.0..=1.0).contains(&a) => bad(format!("accuracy {a} is outside [0, 1]")),
            _ => Ok(()),
        }
    }

    /// The device's edges of every feature, in order, for a firmware with `F` features of `B`
    /// bins (see [`device_edges`]).
    pub fn feature_edges<const F: usize, const B: usize>(
        &self,
    ) -> Result<[Edges<B>; F], ProfileError> {
        if self.features.len() != F {
            return Err(ProfileError::Invalid(format!(
                "the profile has {} features but the device build expects {F}",
                self.features.len()
            )));
        }
        let edges = self
            .features
            .iter()
            .map(|f| device_edges::<B>(&f.hist))
            .collect::<Result<Vec<_>, _>>()?;
        edges
            .try_into()
            .map_err(|_| ProfileError::Invalid(format!("the device build expects {F} features")))
    }

    /// The device's latency edges (see [`device_edges`]); an error when the profile has none.
    pub fn latency_edges<const L: usize>(&self) -> Result<Edges<L>, ProfileError> {
        match &self.latency {
            Some(h) => device_edges::<L>(h),
            None => Err(ProfileError::Invalid(
                "the profile has no latency histogram (no latency_us column)".to_string(),
            )),
        }
    }
}

fn sum(xs: &[u64]) -> Option<u64> {
    xs.iter().try_fold(0u64, |a, &b| a.checked_add(b))
}

/// Builds a profile from a reference CSV (see the module docs and [`BuildOptions`]).
///
/// The CSV has a header; `prediction` and `confidence` are required, `label` and `latency_us`
/// optional, every other column is a feature unless `opts.features` says which. Empty or `NaN`
/// feature cells count as NaN, an empty label is an unlabelled row, an empty latency counts as
/// NaN. Feature edges are quantiles: `lo` is the smallest finite value, `upper[i]` the
/// `(i+1)/bins` quantile and the last edge the next f32 above the largest value; tied values
/// (discrete features) are kept strictly increasing by nudging an edge one f32 step above the
/// previous one. The calibration is a weighted pool-adjacent-violators fit of per-bin accuracy.
pub fn build_profile<R: Read>(
    csv: R,
    opts: &BuildOptions,
) -> Result<MonitoringProfile, ProfileError> {
    check_dimension("bins", opts.bins, limits::MAX_BINS)?;
    check_dimension("conf_bins", opts.conf_bins, limits::MAX_CONF_BINS)?;
    if let Some(c) = opts.classes {
        check_dimension("classes", c, limits::MAX_CLASSES)?;
    }
    let latency_template = latency_template(&opts.latency_edges_us)?;

    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(csv);
    let header = reader.headers().map_err(csv_error)?.clone();
    let columns = Columns::find(&header, opts)?;

    let k = opts.conf_bins;
    let mut values: Vec<Vec<f32>> = vec![Vec::new(); columns.features.len()];
    let mut confidence = vec![vec![0u64; k]; limits::MAX_CLASSES];
    let mut correct = vec![0u64; k];
    let mut calibration_n = vec![0u64; k];
    let mut latency = columns.latency.map(|_| latency_template);
    let mut max_class = 0;
    let mut n = 0u64;
    let (class_limit, limit) = match opts.classes {
        Some(c) => (
            c,
            "the number of classes asked for; raise it or fix the row",
        ),
        None => (
            limits::MAX_CLASSES,
            "the protocol's limit on classes; fix the row",
        ),
    };

    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(e)),
        }
        let line = record.position().map_or(0, |p| p.line());
        let cell = |idx: usize| record.get(idx).unwrap_or("");
        let class = |column: &str, value: &str| -> Result<usize, ProfileError> {
            let class = value.parse::<u64>().map_err(|_| ProfileError::BadNumber {
                line,
                column: column.to_string(),
                value: value.to_string(),
                expected: "a class index (an integer from 0)",
            })?;
            match usize::try_from(class) {
                Ok(c) if c < class_limit => Ok(c),
                _ => Err(ProfileError::ClassOutOfRange {
                    line,
                    column: column.to_string(),
                    class,
                    classes: class_limit,
                    limit,
                }),
            }
        };

        let predicted = match cell(columns.prediction) {
            "" => {
                return Err(ProfileError::MissingValue {
                    line,
                    column: PREDICTION.to_string(),
                });
            }
            v => class(PREDICTION, v)?,
        };
        let conf_text = cell(columns.confidence);
        if conf_text.is_empty() {
            return Err(ProfileError::MissingValue {
                line,
                column: CONFIDENCE.to_string(),
            });
        }
        let conf = parse_f32(conf_text, line, CONFIDENCE, "a probability")?;
        let conf_bin = match confidence_bin(conf, k) {
            Some(bin) if (0.0..=1.0).contains(&conf) => bin,
            _ => {
                return Err(ProfileError::ConfidenceOutOfRange {
                    line,
                    value: conf_text.to_string(),
                });
            }
        };
        let label = match columns.label.map(cell) {
            None | Some("") => None,
            Some(v) => Some(class(LABEL, v)?),
        };
        if let (Some(idx), Some(hist)) = (columns.latency, latency.as_mut()) {
            let x = match cell(idx) {
                "" => f32::NAN,
                v => {
                    let x = parse_f32(v, line, LATENCY_US, "a latency in microseconds")?;
                    if x < 0.0 {
                        return Err(ProfileError::BadNumber {
                            line,
                            column: LATENCY_US.to_string(),
                            value: v.to_string(),
                            expected: "a latency in microseconds (not negative)",
                        });
                    }
                    x
                }
            };
            hist.add(x);
        }
        for (column, (idx, name)) in values.iter_mut().zip(&columns.features) {
            let x = match cell(*idx) {
                "" => f32::NAN,
                v => parse_f32(v, line, name, "a number (or empty for a missing value)")?,
            };
            column.push(x);
        }

        max_class = max_class.max(predicted).max(label.unwrap_or(0));
        if let Some(slot) = confidence
            .get_mut(predicted)
            .and_then(|r| r.get_mut(conf_bin))
        {
            *slot += 1;
        }
        if let (Some(label), Some(support), Some(hits)) = (
            label,
            calibration_n.get_mut(conf_bin),
            correct.get_mut(conf_bin),
        ) {
            *support += 1;
            *hits += u64::from(label == predicted);
        }
        n += 1;
    }

    let min = MIN_ROWS_PER_BIN.saturating_mul(opts.bins as u64);
    if n < min {
        return Err(ProfileError::TooFewRows {
            rows: n,
            min,
            bins: opts.bins,
        });
    }

    let n_classes = opts.classes.unwrap_or(max_class + 1);
    confidence.truncate(n_classes);
    let classes = confidence.iter().map(|row| row.iter().sum()).collect();
    let features = columns
        .features
        .iter()
        .zip(values)
        .map(|((_, name), values)| {
            Ok(FeatureProfile {
                name: name.clone(),
                hist: feature_hist(name, &values, opts.bins)?,
            })
        })
        .collect::<Result<Vec<_>, ProfileError>>()?;
    let labelled: u64 = calibration_n.iter().sum();
    let n_correct: u64 = correct.iter().sum();
    let profile = MonitoringProfile {
        model_id: opts.model_id.clone(),
        model_version: opts.model_version.clone(),
        n,
        features,
        classes,
        confidence,
        conf_bins: k,
        calibration: isotonic_calibration(&correct, &calibration_n),
        calibration_n,
        accuracy: (labelled > 0).then(|| n_correct as f64 / labelled as f64),
        labelled,
        latency,
    };
    // Everything above is built to be consistent; this guards the builder itself.
    profile.validate()?;
    Ok(profile)
}

fn check_dimension(option: &'static str, value: usize, max: usize) -> Result<(), ProfileError> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(ProfileError::OutOfRange { option, value, max })
    }
}

/// The empty latency histogram of the option's `lo, upper...` edges.
fn latency_template(edges: &[f32]) -> Result<HistProfile, ProfileError> {
    let bad = || ProfileError::BadLatencyEdges {
        edges: edges.to_vec(),
    };
    let (&lo, upper) = edges.split_first().ok_or_else(bad)?;
    if upper.is_empty() || upper.len() > limits::MAX_LATENCY_BINS {
        return Err(bad());
    }
    HistProfile::new(lo, upper.to_vec()).map_err(|_| bad())
}

fn csv_error(e: csv::Error) -> ProfileError {
    let line = e.position().map(|p| p.line());
    let message = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("the row has {len} fields but the header has {expected_len}"),
        csv::ErrorKind::Utf8 { err, .. } => format!("field {} is not UTF-8", err.field() + 1),
        _ => e.to_string(),
    };
    ProfileError::Csv { line, message }
}

fn parse_f32(
    value: &str,
    line: u64,
    column: &str,
    expected: &'static str,
) -> Result<f32, ProfileError> {
    // Parsed straight to f32 (correctly rounded), as the device holds its values.
    value.parse::<f32>().map_err(|_| ProfileError::BadNumber {
        line,
        column: column.to_string(),
        value: value.to_string(),
        expected,
    })
}

/// Column indexes of one CSV.
struct Columns {
    prediction: usize,
    confidence: usize,
    label: Option<usize>,
    latency: Option<usize>,
    /// Index and name of each feature, in profile order.
    features: Vec<(usize, String)>,
}

impl Columns {
    fn find(header: &csv::StringRecord, opts: &BuildOptions) -> Result<Self, ProfileError> {
        let mut seen = HashSet::new();
        for (i, name) in header.iter().enumerate() {
            if name.is_empty() {
                return Err(ProfileError::UnnamedColumn { index: i + 1 });
            }
            if !seen.insert(name) {
                return Err(ProfileError::DuplicateColumn {
                    column: name.to_string(),
                });
            }
        }
        let position = |column: &str| header.iter().position(|h| h == column);
        let require = |column: &str| {
            position(column).ok_or_else(|| ProfileError::MissingColumn {
                column: column.to_string(),
                found: header.iter().collect::<Vec<_>>().join(", "),
            })
        };
        let features = match &opts.features {
            Some(names) => {
                let mut requested = HashSet::new();
                names
                    .iter()
                    .map(|name| {
                        if !requested.insert(name.as_str()) {
                            return Err(ProfileError::DuplicateColumn {
                                column: name.clone(),
                            });
                        }
                        Ok((require(name)?, name.clone()))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => header
                .iter()
                .enumerate()
                .filter(|(_, h)| !RESERVED_COLUMNS.contains(h))
                .map(|(i, h)| (i, h.to_string()))
                .collect(),
        };
        if features.len() > limits::MAX_FEATURES {
            return Err(ProfileError::OutOfRange {
                option: "features",
                value: features.len(),
                max: limits::MAX_FEATURES,
            });
        }
        Ok(Self {
            prediction: require(PREDICTION)?,
            confidence: require(CONFIDENCE)?,
            label: position(LABEL),
            latency: position(LATENCY_US),
            features,
        })
    }
}

/// A feature's quantile edges and its counts in them.
fn feature_hist(name: &str, values: &[f32], bins: usize) -> Result<HistProfile, ProfileError> {
    let (lo, upper) = quantile_edges(values, bins).ok_or_else(|| ProfileError::NoFiniteValues {
        feature: name.to_string(),
    })?;
    let mut hist = HistProfile::new(lo, upper).map_err(|_| ProfileError::RangeTooWide {
        feature: name.to_string(),
    })?;
    values.iter().for_each(|&x| hist.add(x));
    Ok(hist)
}

/// `lo` = the smallest finite value; `upper[i]` = the value at rank `floor((i+1) n / bins)` of
/// the sorted finite values (so with distinct values bin `i` holds exactly the ranks between two
/// such cut points), the last edge the next f32 above the largest value. Every edge not above
/// its predecessor (ties) is moved one f32 step above it, which keeps the edges strictly
/// increasing and gives each tied value its own bin. No edge is subnormal (see [`normal_up`]).
/// `None` without finite values; the edges may be infinite when values reach `f32::MAX`.
fn quantile_edges(values: &[f32], bins: usize) -> Option<(f32, Vec<f32>)> {
    let mut sorted: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let (&min, &max) = (sorted.first()?, sorted.last()?);
    let n = sorted.len();
    let mut upper: Vec<f32> = (1..bins)
        .map(|i| {
            let rank = (i as u128 * n as u128 / bins as u128) as usize;
            normal_up(sorted.get(rank).copied().unwrap_or(max))
        })
        .collect();
    upper.push(step_up(max));
    let lo = normal_down(min);
    let mut prev = lo;
    for e in &mut upper {
        if *e <= prev {
            *e = step_up(prev);
        }
        prev = *e;
    }
    Some((lo, upper))
}

/// The smallest f32 at or above `x` that is not subnormal. Firmware running its FPU in
/// flush-to-zero mode (an FPSCR option on Cortex-M, and what fast-math builds select) compares
/// a subnormal edge as zero, which would put exact zeros, a frequent tie, in another bin than
/// the profile counted them in; with normal edges both sides agree on every normal value and
/// zero. The map is non-decreasing, so it keeps the edges' order.
fn normal_up(x: f32) -> f32 {
    match x {
        x if !x.is_subnormal() => x,
        x if x > 0.0 => f32::MIN_POSITIVE,
        _ => 0.0,
    }
}

/// The largest f32 at or below `x` that is not subnormal (for `lo`, see [`normal_up`]).
fn normal_down(x: f32) -> f32 {
    -normal_up(-x)
}

/// The smallest non-subnormal f32 above `x`.
fn step_up(x: f32) -> f32 {
    normal_up(x.next_up())
}

/// Per-bin accuracy (`correct / support`), made non-decreasing by a weighted
/// pool-adjacent-violators fit; bins without support take the fitted value of the nearest
/// supported bin below (above for leading bins), and without any labels each bin its midpoint.
pub(crate) fn isotonic_calibration(correct: &[u64], support: &[u64]) -> Vec<f64> {
    let k = support.len();
    // Pooled blocks of supported bins: (correct, support, first bin, last bin).
    let mut blocks: Vec<(u64, u64, usize, usize)> = Vec::new();
    for (bin, (&c, &w)) in correct.iter().zip(support).enumerate() {
        if w == 0 {
            continue;
        }
        let mut block = (c, w, bin, bin);
        // Pool while the previous block's rate exceeds this one's (exact rational comparison).
        while let Some(&(pc, pw, first, _)) = blocks.last() {
            if u128::from(pc) * u128::from(block.1) <= u128::from(block.0) * u128::from(pw) {
                break;
            }
            blocks.pop();
            block = (pc + block.0, pw + block.1, first, bin);
        }
        blocks.push(block);
    }
    let mut fitted: Vec<Option<f64>> = vec![None; k];
    for &(c, w, first, last) in &blocks {
        let rate = c as f64 / w as f64;
        let bins = fitted.iter_mut().zip(support).take(last + 1).skip(first);
        for (fit, _) in bins.filter(|(_, w)| **w > 0) {
            *fit = Some(rate);
        }
    }
    let Some(first_fit) = fitted.iter().flatten().next().copied() else {
        return (0..k).map(|bin| (bin as f64 + 0.5) / k as f64).collect();
    };
    let mut current = first_fit;
    fitted
        .into_iter()
        .map(|f| {
            current = f.unwrap_or(current);
            current
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found by the `profile_upload` fuzz target (fuzz/seeds/profile_upload/saturating-counts):
    /// counts whose sum overflows u64 saturated to `n` and passed, then the drift engine's sums
    /// overflowed (a panic in debug builds, wrapped reference proportions in release builds).
    #[test]
    fn counts_that_overflow_are_refused() {
        let m = u64::MAX;
        let hist = |counts: Vec<u64>, underflow: u64| HistProfile {
            lo: 0.0,
            upper: (1..=counts.len()).map(|i| i as f32).collect(),
            counts,
            underflow,
            overflow: 0,
            nan: 0,
        };
        let mut p = MonitoringProfile {
            model_id: "kws".into(),
            model_version: "3".into(),
            n: m,
            features: vec![FeatureProfile {
                name: "f0".into(),
                hist: hist(vec![m, 5], 0),
            }],
            classes: vec![m],
            confidence: vec![vec![m]],
            conf_bins: 1,
            calibration: vec![0.5],
            calibration_n: vec![0],
            accuracy: None,
            labelled: 0,
            latency: None,
        };
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("feature `f0`: counts sum to"), "{err}");
        p.features[0].hist = hist(vec![m - 5, 5], 0);
        p.latency = Some(hist(vec![m], 3));
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("latency: counts sum to"), "{err}");
        p.latency = Some(hist(vec![m - 3], 3));
        p.validate().unwrap();
    }

    #[test]
    fn pav_pools_violators() {
        // 0.8 then 0.6 with equal support pool to 0.7.
        assert_eq!(isotonic_calibration(&[8, 6], &[10, 10]), vec![0.7, 0.7]);
        // Weighted: (8/10, 1/2) pool to 9/12.
        assert_eq!(isotonic_calibration(&[8, 1], &[10, 2]), vec![0.75, 0.75]);
        // Already monotone stays.
        assert_eq!(
            isotonic_calibration(&[1, 2, 3], &[4, 4, 4]),
            vec![0.25, 0.5, 0.75]
        );
        // A late violation pools back over several blocks.
        let pooled = 11.0 / 30.0;
        assert_eq!(
            isotonic_calibration(&[2, 5, 6, 0], &[10, 10, 10, 10]),
            vec![0.2, pooled, pooled, pooled]
        );
    }

    #[test]
    fn empty_bins_take_their_neighbour() {
        // Leading empty takes the first fitted value, inner and trailing the one below.
        assert_eq!(
            isotonic_calibration(&[0, 1, 0, 3, 0], &[0, 2, 0, 4, 0]),
            vec![0.5, 0.5, 0.5, 0.75, 0.75]
        );
        assert_eq!(
            isotonic_calibration(&[0, 0, 0, 0], &[0, 0, 0, 0]),
            vec![0.125, 0.375, 0.625, 0.875]
        );
    }

    #[test]
    fn confidence_bins_match_the_device() {
        let mut x = -0.01f32;
        while x <= 1.01 {
            for probe in [x, x.next_up(), x.next_down()] {
                assert_eq!(
                    confidence_bin(probe, 8),
                    tinyfleet_device::sketch::confidence_bin::<8>(probe)
                );
                assert_eq!(
                    confidence_bin(probe, 10),
                    tinyfleet_device::sketch::confidence_bin::<10>(probe)
                );
                assert_eq!(
                    confidence_bin(probe, 32),
                    tinyfleet_device::sketch::confidence_bin::<32>(probe)
                );
            }
            x += 1.0 / 4096.0;
        }
        assert_eq!(confidence_bin(f32::NAN, 8), None);
        assert_eq!(confidence_bin(0.5, 0), None);
    }

    #[test]
    fn quantile_edges_of_distinct_values_cut_equal_ranks() {
        let values: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let (lo, upper) = quantile_edges(&values, 4).unwrap();
        assert_eq!(lo, 0.0);
        assert_eq!(upper, vec![25.0, 50.0, 75.0, 99f32.next_up()]);
    }

    #[test]
    fn quantile_edges_of_a_constant_are_increasing() {
        let (lo, upper) = quantile_edges(&[3.0; 50], 4).unwrap();
        assert_eq!(lo, 3.0);
        assert!(check_edges(lo, &upper).is_ok(), "{upper:?}");
        // Ties at zero step over the subnormals (flush-to-zero firmware reads them as 0).
        let (lo, upper) = quantile_edges(&[0.0; 50], 3).unwrap();
        assert_eq!(lo, 0.0);
        assert_eq!(
            upper,
            [
                f32::MIN_POSITIVE,
                f32::MIN_POSITIVE.next_up(),
                f32::MIN_POSITIVE.next_up().next_up()
            ]
        );
        assert_eq!(step_up(-f32::MIN_POSITIVE), 0.0);
        assert_eq!(step_up(-0.0), f32::MIN_POSITIVE);
        assert_eq!(normal_down(1e-40), 0.0);
        assert_eq!(normal_down(-1e-40), -f32::MIN_POSITIVE);
        assert_eq!(normal_down(-0.0), -0.0);
        assert_eq!(quantile_edges(&[f32::NAN, f32::INFINITY], 4), None);
        let (lo, upper) = quantile_edges(&[f32::MAX], 2).unwrap();
        assert!(
            check_edges(lo, &upper).is_err(),
            "no finite edge above f32::MAX"
        );
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => -1e3f32..1e3,
            3 => (0u8..4).prop_map(f32::from),
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(-0.0f32),
            1 => -1e-40f32..1e-40,
        ]
    }

    /// Reference isotonic fit by brute force: the least-squares non-decreasing fit is the
    /// max-min formula over block averages.
    fn minmax_fit(correct: &[u64], support: &[u64]) -> Vec<Option<f64>> {
        let k = support.len();
        (0..k)
            .map(|i| {
                if support[i] == 0 {
                    return None;
                }
                let mut best = f64::NEG_INFINITY;
                for a in 0..=i {
                    let mut worst = f64::INFINITY;
                    for b in i..k {
                        let (c, w): (u64, u64) =
                            (correct[a..=b].iter().sum(), support[a..=b].iter().sum());
                        if w > 0 {
                            worst = worst.min(c as f64 / w as f64);
                        }
                    }
                    best = best.max(worst);
                }
                Some(best)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn edges_are_valid_and_binning_is_total(
            values in proptest::collection::vec(value(), 1..300),
            bins in 1usize..=64,
        ) {
            match quantile_edges(&values, bins) {
                None => prop_assert!(values.iter().all(|x| !x.is_finite())),
                Some((lo, upper)) => {
                    prop_assert_eq!(upper.len(), bins);
                    prop_assert!(check_edges(lo, &upper).is_ok(), "{:?} {:?}", lo, upper);
                    // No edge is subnormal, whatever the data.
                    prop_assert!(!lo.is_subnormal(), "{:?}", lo);
                    prop_assert!(upper.iter().all(|e| !e.is_subnormal()), "{:?}", upper);
                    let mut h = HistProfile::new(lo, upper).unwrap();
                    values.iter().for_each(|&x| h.add(x));
                    prop_assert_eq!(h.total(), values.len() as u64);
                    // Every finite value is inside the edges.
                    let finite = values.iter().filter(|x| x.is_finite()).count() as u64;
                    prop_assert_eq!(h.counts.iter().sum::<u64>(), finite);
                    let minus_inf = values.iter().filter(|&&x| x == f32::NEG_INFINITY).count();
                    prop_assert_eq!(h.underflow, minus_inf as u64);
                }
            }
        }

        #[test]
        fn pav_is_the_isotonic_fit(
            bins in proptest::collection::vec((0u64..20, 0u64..20), 1..12),
        ) {
            let support: Vec<u64> = bins.iter().map(|&(a, b)| a.max(b)).collect();
            let correct: Vec<u64> = bins.iter().map(|&(a, b)| a.min(b)).collect();
            let fit = isotonic_calibration(&correct, &support);
            prop_assert_eq!(fit.len(), support.len());
            prop_assert!(fit.windows(2).all(|w| w[0] <= w[1]), "{:?}", fit);
            prop_assert!(fit.iter().all(|p| (0.0..=1.0).contains(p)));
            for (got, want) in fit.iter().zip(minmax_fit(&correct, &support)) {
                if let Some(want) = want {
                    prop_assert!((got - want).abs() < 1e-12, "{:?} vs {:?}", fit, want);
                }
            }
        }
    }
}
