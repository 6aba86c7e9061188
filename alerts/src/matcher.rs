//! Label matchers, as in Alertmanager silences and inhibition rules, and label fingerprints.
//!
//! A [`Matcher`] is plain serialisable data; a [`CompiledMatcher`] holds its compiled regex.
//! Regexes are anchored at both ends (`^(?:re)$`), like Alertmanager's, and compiled with the
//! `regex` crate (linear-time matching) under a size limit, so an operator-supplied pattern can
//! neither panic nor make matching slow. A label that is absent matches as the empty string
//! (Alertmanager semantics): `kind != "drift"` matches an alert without a `kind` label.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The labels of an alert: sorted, names unique.
pub type Labels = BTreeMap<String, String>;

/// Upper bound on the compiled size of one matcher regex (bytes of program).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How a [`Matcher`] compares a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MatchOp {
    /// `=`: the value equals.
    #[serde(rename = "=")]
    Equal,
    /// `!=`: the value differs.
    #[serde(rename = "!=")]
    NotEqual,
    /// `=~`: the whole value matches the regex.
    #[serde(rename = "=~")]
    Regex,
    /// `!~`: the whole value does not match the regex.
    #[serde(rename = "!~")]
    NotRegex,
}

impl fmt::Display for MatchOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Equal => "=",
            Self::NotEqual => "!=",
            Self::Regex => "=~",
            Self::NotRegex => "!~",
        })
    }
}

/// One condition on one label: `name op value`. In TOML:
/// `{ name = "kind", op = "=~", value = "drift|quality" }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matcher {
    /// Label name.
    pub name: String,
    /// Value to compare with, or the regex for `=~` / `!~`.
    pub value: String,
    /// Comparison.
    pub op: MatchOp,
}

impl Matcher {
    /// `name = value`.
    pub fn equal(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            op: MatchOp::Equal,
        }
    }

    /// `name != value`.
    pub fn not_equal(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            op: MatchOp::NotEqual,
        }
    }

    /// `name =~ regex`.
    pub fn regex(name: impl Into<String>, regex: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: regex.into(),
            op: MatchOp::Regex,
        }
    }

    /// `name !~ regex`.
    pub fn not_regex(name: impl Into<String>, regex: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: regex.into(),
            op: MatchOp::NotRegex,
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{:?}", self.name, self.op, self.value)
    }
}

/// Why a [`Matcher`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatcherError {
    /// The label name is empty.
    #[error("matcher has an empty label name")]
    EmptyName,
    /// The regex does not compile (or is too large).
    #[error("matcher `{matcher}`: invalid regex: {reason}")]
    BadRegex {
        /// The matcher, as written.
        matcher: String,
        /// The regex crate's explanation.
        reason: String,
    },
}

/// A [`Matcher`] ready to match: its regex, if any, compiled and anchored.
#[derive(Debug, Clone)]
pub struct CompiledMatcher {
    matcher: Matcher,
    regex: Option<regex::Regex>,
}

impl CompiledMatcher {
    /// Checks and compiles `matcher`.
    pub fn new(matcher: Matcher) -> Result<Self, MatcherError> {
        if matcher.name.is_empty() {
            return Err(MatcherError::EmptyName);
        }
        let regex = match matcher.op {
            MatchOp::Equal | MatchOp::NotEqual => None,
            MatchOp::Regex | MatchOp::NotRegex => Some(
                regex::RegexBuilder::new(&format!("^(?:{})$", matcher.value))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| MatcherError::BadRegex {
                        matcher: matcher.to_string(),
                        reason: e.to_string(),
                    })?,
            ),
        };
        Ok(Self { matcher, regex })
    }

    /// The matcher this was compiled from.
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// Whether `value` (the empty string for an absent label) satisfies the matcher.
    pub fn matches_value(&self, value: &str) -> bool {
        match (self.matcher.op, &self.regex) {
            (MatchOp::Equal, _) => value == self.matcher.value,
            (MatchOp::NotEqual, _) => value != self.matcher.value,
            (MatchOp::Regex, Some(re)) => re.is_match(value),
            (MatchOp::NotRegex, Some(re)) => !re.is_match(value),
            // Unreachable by construction: regex ops always carry a regex. Match nothing
            // rather than panic.
            (MatchOp::Regex | MatchOp::NotRegex, None) => false,
        }
    }

    /// Whether the label set satisfies the matcher.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.matcher.name).map_or("", String::as_str);
        self.matches_value(value)
    }
}

/// Compiles every matcher; the first error is returned.
pub fn compile_all(matchers: &[Matcher]) -> Result<Vec<CompiledMatcher>, MatcherError> {
    matchers.iter().cloned().map(CompiledMatcher::new).collect()
}

/// Whether every matcher matches (an empty list matches everything).
pub fn matches_all(matchers: &[CompiledMatcher], labels: &Labels) -> bool {
    matchers.iter().all(|m| m.matches(labels))
}

const FNV_OFFSET: u64 = 14_695_981_039_346_656_037;
const FNV_PRIME: u64 = 1_099_511_628_211;
/// Separates names and values in the hash input, as Prometheus's `model.SeparatorByte`.
const SEPARATOR: u8 = 0xff;

fn fnv_add(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The fingerprint of a label set: 16 lowercase hex digits of FNV-1a 64 over the sorted names
/// and values, each followed by `0xff`. This is the algorithm of Prometheus's
/// `model.LabelSet.Fingerprint`, so fingerprints equal Alertmanager's for the same labels.
pub fn fingerprint(labels: &Labels) -> String {
    let mut hash = FNV_OFFSET;
    for (name, value) in labels {
        hash = fnv_add(hash, name.as_bytes());
        hash = fnv_add(hash, &[SEPARATOR]);
        hash = fnv_add(hash, value.as_bytes());
        hash = fnv_add(hash, &[SEPARATOR]);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn regex_is_anchored_like_alertmanager() {
        let m = CompiledMatcher::new(Matcher::regex("kind", "drift|quality")).unwrap();
        assert!(m.matches(&labels(&[("kind", "drift")])));
        assert!(m.matches(&labels(&[("kind", "quality")])));
        assert!(!m.matches(&labels(&[("kind", "datadrift")])));
        assert!(!m.matches(&labels(&[("kind", "drifted")])));
        let n = CompiledMatcher::new(Matcher::not_regex("kind", "dri.*")).unwrap();
        assert!(!n.matches(&labels(&[("kind", "drift")])));
        assert!(n.matches(&labels(&[("kind", "xdrift")])));
    }

    #[test]
    fn absent_label_matches_as_empty_string() {
        let ne = CompiledMatcher::new(Matcher::not_equal("kind", "drift")).unwrap();
        assert!(ne.matches(&labels(&[("alertname", "A")])));
        let eq_empty = CompiledMatcher::new(Matcher::equal("kind", "")).unwrap();
        assert!(eq_empty.matches(&labels(&[("alertname", "A")])));
        let eq = CompiledMatcher::new(Matcher::equal("kind", "drift")).unwrap();
        assert!(!eq.matches(&labels(&[("alertname", "A")])));
    }

    #[test]
    fn bad_regex_and_empty_name_are_errors_not_panics() {
        let err = CompiledMatcher::new(Matcher::regex("kind", "(unclosed")).unwrap_err();
        assert!(matches!(err, MatcherError::BadRegex { .. }), "{err}");
        assert!(err.to_string().contains("kind=~\"(unclosed\""), "{err}");
        assert_eq!(
            CompiledMatcher::new(Matcher::equal("", "x")).unwrap_err(),
            MatcherError::EmptyName
        );
        // A pattern whose compiled program exceeds the size limit is refused, not built.
        let huge = CompiledMatcher::new(Matcher::regex("x", "[a-z]{1000}{1000}"));
        assert!(huge.is_err());
    }

    #[test]
    fn op_serialises_as_operator_strings() {
        let m = Matcher::regex("device", "d-.*");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"name":"device","value":"d-.*","op":"=~"}"#);
        let back: Matcher = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn fingerprint_is_alertmanagers() {
        // Test vectors of `labelSetToFingerprint` (prometheus/common, model
        // `TestMetricToFingerprint`), what Alertmanager's fingerprints are.
        assert_eq!(
            fingerprint(&Labels::new()),
            format!("{:016x}", 14_695_981_039_346_656_037u64)
        );
        assert_eq!(
            fingerprint(&labels(&[
                ("name", "garland, briggs"),
                ("fear", "love is not enough")
            ])),
            format!("{:016x}", 5_799_056_148_416_392_346u64)
        );
        // FNV-1a over "a\xffb\xff", computed independently.
        let mut h = FNV_OFFSET;
        for b in b"a\xffb\xff" {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        assert_eq!(fingerprint(&labels(&[("a", "b")])), format!("{h:016x}"));
        // Separators make ("ab","c") and ("a","bc") differ; order of insertion does not matter.
        assert_ne!(
            fingerprint(&labels(&[("ab", "c")])),
            fingerprint(&labels(&[("a", "bc")]))
        );
        let fp = fingerprint(&labels(&[("alertname", "X"), ("device", "d1")]));
        assert_eq!(fp.len(), 16);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
