//! Points and their InfluxDB line-protocol encoding.
//!
//! This module turns a [`Point`] into exactly one line of line protocol, escaping every element
//! the way InfluxDB 2 documents it. It is pure (no I/O, no allocation beyond the output line) and
//! must never emit more than one line per point or a line that the server would parse into other
//! series or fields than the caller meant: anything line protocol cannot represent is either made
//! representable (newlines become spaces) or left out and reported.
//!
//! Why not `influxdb2::models::DataPoint`: in 0.5 it has no unsigned integers, does not escape
//! backslashes (a tag value ending in `\` swallows the next delimiter) and passes newlines
//! through (one point becomes two broken lines).

use std::fmt::Write as _;

/// One measurement at one instant: the unit the sink queues and writes.
///
/// Tags with an empty key or value are left out (line protocol cannot carry them). Fields with an
/// empty key or a non-finite float are left out. A point with an empty measurement, or with no
/// field left, is refused by [`InfluxSink::send`](crate::InfluxSink::send) and counted in
/// [`SinkStats::rejected`](crate::SinkStats::rejected).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Measurement name (VictoriaMetrics stores each field as the series `measurement_field`).
    pub measurement: String,
    /// Tag key/value pairs; written sorted by key, as InfluxDB recommends.
    pub tags: Vec<(String, String)>,
    /// Field key/value pairs; at least one must be representable.
    pub fields: Vec<(String, FieldValue)>,
    /// Timestamp in nanoseconds since the Unix epoch.
    pub time_ns: i64,
}

/// A field value, one variant per line-protocol field type.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// Float; NaN and infinities cannot be written and are left out.
    F64(f64),
    /// Signed integer (`123i`).
    I64(i64),
    /// Unsigned integer (`123u`).
    U64(u64),
    /// Boolean (`true` / `false`).
    Bool(bool),
    /// String. VictoriaMetrics accepts but stores it as 0; InfluxDB keeps it.
    Str(String),
}

impl From<f64> for FieldValue {
    fn from(v: f64) -> Self {
        Self::F64(v)
    }
}
impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        Self::I64(v)
    }
}
impl From<u64> for FieldValue {
    fn from(v: u64) -> Self {
        Self::U64(v)
    }
}
impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}
impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}

impl Point {
    /// A point with no tags and no fields yet.
    pub fn new(measurement: impl Into<String>, time_ns: i64) -> Self {
        Self {
            measurement: measurement.into(),
            tags: Vec::new(),
            fields: Vec::new(),
            time_ns,
        }
    }

    /// Adds a tag (builder style).
    #[must_use]
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.push((key.into(), value.into()));
        self
    }

    /// Adds a field (builder style).
    #[must_use]
    pub fn field(mut self, key: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.fields.push((key.into(), value.into()));
        self
    }

    /// Appends this point as one line of line protocol (with a trailing `\n`) to `out`.
    ///
    /// Returns why the point cannot be written, and leaves `out` unchanged, when it has no
    /// measurement or no representable field.
    pub fn write_line_protocol(&self, out: &mut String) -> Result<(), PointError> {
        if self.measurement.is_empty() {
            return Err(PointError::EmptyMeasurement);
        }
        let start = out.len();
        escape_into(out, &self.measurement, Element::Measurement);

        let mut tags: Vec<&(String, String)> = self
            .tags
            .iter()
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .collect();
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, v) in tags {
            out.push(',');
            escape_into(out, k, Element::Key);
            out.push('=');
            escape_into(out, v, Element::Key);
        }

        let mut sep = ' ';
        for (k, v) in &self.fields {
            if k.is_empty() || matches!(v, FieldValue::F64(f) if !f.is_finite()) {
                continue;
            }
            out.push(sep);
            sep = ',';
            escape_into(out, k, Element::Key);
            out.push('=');
            // Writing into a String cannot fail.
            let _ = match v {
                // `{:?}` is the shortest representation that round-trips, with an exponent for
                // very large or small magnitudes; line-protocol parsers accept both forms.
                FieldValue::F64(f) => write!(out, "{f:?}"),
                FieldValue::I64(i) => write!(out, "{i}i"),
                FieldValue::U64(u) => write!(out, "{u}u"),
                FieldValue::Bool(b) => write!(out, "{b}"),
                FieldValue::Str(s) => {
                    out.push('"');
                    escape_into(out, s, Element::StringField);
                    out.push('"');
                    Ok(())
                }
            };
        }
        if sep == ' ' {
            out.truncate(start);
            return Err(PointError::NoFields);
        }
        let _ = writeln!(out, " {}", self.time_ns);
        Ok(())
    }

    /// This point as one line of line protocol, without the trailing newline.
    pub fn to_line_protocol(&self) -> Result<String, PointError> {
        let mut out = String::new();
        self.write_line_protocol(&mut out)?;
        out.pop();
        Ok(out)
    }
}

/// Why a point cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    /// The measurement name is empty.
    #[error("point has an empty measurement name")]
    EmptyMeasurement,
    /// No field has a non-empty key and a representable value.
    #[error("point has no writable field (empty keys and non-finite floats are left out)")]
    NoFields,
}

#[derive(Clone, Copy)]
enum Element {
    /// Measurement: escape `,`, space and `\`.
    Measurement,
    /// Tag key, tag value, field key: escape `,`, `=`, space and `\`.
    Key,
    /// Inside a double-quoted string field: escape `"` and `\`.
    StringField,
}

/// Escapes `s` for its place in a line. Newlines and carriage returns end a line in every parser
/// and have no escape, so they become spaces (which are then escaped where spaces must be).
fn escape_into(out: &mut String, s: &str, element: Element) {
    out.reserve(s.len());
    for c in s.chars() {
        let c = if c == '\n' || c == '\r' { ' ' } else { c };
        let escape = match element {
            Element::Measurement => matches!(c, ',' | ' ' | '\\'),
            Element::Key => matches!(c, ',' | '=' | ' ' | '\\'),
            Element::StringField => matches!(c, '"' | '\\'),
        };
        if escape {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(p: &Point) -> String {
        p.to_line_protocol().unwrap()
    }

    #[test]
    fn every_field_type() {
        let p = Point::new("m", 42)
            .field("f", 1.5)
            .field("i", -3i64)
            .field("u", u64::MAX)
            .field("b", true)
            .field("nb", false)
            .field("s", "text");
        assert_eq!(
            lp(&p),
            r#"m f=1.5,i=-3i,u=18446744073709551615u,b=true,nb=false,s="text" 42"#
        );
    }

    #[test]
    fn floats_round_trip_and_integral_floats_stay_floats() {
        let p = Point::new("m", 0)
            .field("a", 2.0)
            .field("b", 1e300)
            .field("c", 1e-7)
            .field("d", -0.0);
        assert_eq!(lp(&p), "m a=2.0,b=1e300,c=1e-7,d=-0.0 0");
    }

    #[test]
    fn tags_are_sorted_and_empty_ones_left_out() {
        let p = Point::new("m", -5)
            .tag("z", "1")
            .tag("a", "2")
            .tag("", "x")
            .tag("e", "")
            .field("v", 1i64);
        assert_eq!(lp(&p), "m,a=2,z=1 v=1i -5");
    }

    #[test]
    fn measurement_escapes_comma_space_backslash_not_equals() {
        let p = Point::new(r"a,b c=d\e", 1).field("v", 1i64);
        assert_eq!(lp(&p), r"a\,b\ c=d\\e v=1i 1");
    }

    #[test]
    fn tag_keys_values_and_field_keys_escape_comma_equals_space_backslash() {
        let p = Point::new("m", 1)
            .tag("k ey,=", r#"v a,l=u"e\"#)
            .field(r"f k,=\", 1i64);
        assert_eq!(lp(&p), r#"m,k\ ey\,\==v\ a\,l\=u"e\\ f\ k\,\=\\=1i 1"#);
    }

    #[test]
    fn string_fields_escape_quotes_and_backslashes_only() {
        let p = Point::new("m", 1).field("s", r#"say "hi", a=b \ end\"#);
        assert_eq!(lp(&p), r#"m s="say \"hi\", a=b \\ end\\" 1"#);
    }

    #[test]
    fn newlines_never_split_a_point() {
        let p = Point::new("m\nx", 1)
            .tag("k\r\n", "v\nw")
            .field("f\n", "line1\nline2\r");
        let line = lp(&p);
        assert!(!line.contains('\n') && !line.contains('\r'));
        assert_eq!(line, r#"m\ x,k\ \ =v\ w f\ ="line1 line2 " 1"#);
    }

    #[test]
    fn unwritable_fields_are_left_out() {
        let p = Point::new("m", 1)
            .field("nan", f64::NAN)
            .field("inf", f64::INFINITY)
            .field("", 1i64)
            .field("ok", 1u64);
        assert_eq!(lp(&p), "m ok=1u 1");
    }

    #[test]
    fn points_that_cannot_be_written_are_refused_without_output() {
        let mut out = String::from("keep\n");
        assert_eq!(
            Point::new("", 1)
                .field("v", 1i64)
                .write_line_protocol(&mut out),
            Err(PointError::EmptyMeasurement)
        );
        assert_eq!(
            Point::new("m", 1)
                .tag("t", "x")
                .field("v", f64::NAN)
                .write_line_protocol(&mut out),
            Err(PointError::NoFields)
        );
        assert_eq!(out, "keep\n");
    }

    #[test]
    fn write_appends_one_terminated_line() {
        let mut out = String::new();
        Point::new("a", 1)
            .field("v", 1i64)
            .write_line_protocol(&mut out)
            .unwrap();
        Point::new("b", 2)
            .field("v", 2i64)
            .write_line_protocol(&mut out)
            .unwrap();
        assert_eq!(out, "a v=1i 1\nb v=2i 2\n");
    }
}
