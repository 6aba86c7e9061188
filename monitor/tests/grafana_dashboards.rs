//! The Grafana dashboards under `dashboards/grafana/` query only what tinyfleet writes.
//!
//! The written schema is not a hand-kept list: the test runs the real writers and reads what
//! they put on the wire. Ingest's pipeline applies the `docs/protocol.md` test vectors (hello,
//! summary, will of device `vec-1`, byte-checked against the device encoder by ingest's
//! `protocol_vectors` test) and publishes its events through `InfluxEvents` into a real
//! `InfluxSink`; a `Monitor` with the same sink evaluates simulated fleet windows (a site's
//! feature shifted, one device broken, some windows labelled) and writes its `tf_drift` points.
//! The sink posts line protocol to a small axum server standing in for InfluxDB's
//! `/api/v2/write`; the test parses it into measurement -> tag keys and field names.
//!
//! Then every Flux query of every dashboard (panel targets, nested row panels, template
//! variables) is scanned for `_measurement == "..."`, `_field == "..."`,
//! `contains(value: r._field, set: [...])`, `r._field =~ /regex/`, tag filters `r.tag ==` /
//! `r.tag =~` and `schema.tagValues(tag: "...")`, and each one must name something written
//! (a field or tag of one of the measurements that query reads). The dashboards' structure is
//! checked too: valid JSON, unique panel ids, the datasource referenced by uid
//! `tinyfleet-influx`, the `cohort` and `device` variables, only defined variables used, and
//! the provisioning files present.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde_json::Value;

use tinyfleet_alerts::{AlertsConfig, Deliverer};
use tinyfleet_drift::engine::{DeviceWindow, DriftConfig};
use tinyfleet_drift::sim::{self, Condition, Fleet, SimFault};
use tinyfleet_ingest::decode::{Decoder, DeviceMessage};
use tinyfleet_ingest::influx::InfluxEvents;
use tinyfleet_ingest::metrics::Metrics;
use tinyfleet_ingest::pipeline::{Pipeline, PipelineConfig};
use tinyfleet_ingest::shell::EventSink;
use tinyfleet_monitor::{HealthRules, Monitor, MonitorConfig, MonitorSettings};
use tinyfleet_sink_influx::{InfluxConfig, InfluxSink};
use tinyfleet_store::{Batch, Store, WindowWrite, cohort_key};

const DATASOURCE_UID: &str = "tinyfleet-influx";
const WAIT: Duration = Duration::from_secs(20);
/// Monitor window length.
const W: i64 = 60_000;
/// Start of the first window (a whole minute, 2023-11-14).
const T0: i64 = 1_700_000_040_000;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn grafana_dir() -> PathBuf {
    repo_root().join("dashboards").join("grafana")
}

// ----- the written schema, from the real writers -----

/// Measurement -> tag keys and field names seen on the wire.
#[derive(Debug, Default)]
struct Schema {
    measurements: BTreeMap<String, Written>,
}

#[derive(Debug, Default)]
struct Written {
    tags: BTreeSet<String>,
    fields: BTreeSet<String>,
}

impl Schema {
    fn add_line_protocol(&mut self, body: &str) {
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let (measurement, tags, fields) = parse_line(line);
            let w = self.measurements.entry(measurement).or_default();
            w.tags.extend(tags);
            w.fields.extend(fields);
        }
    }

    fn get(&self, measurement: &str) -> Option<&Written> {
        self.measurements.get(measurement)
    }
}

/// Splits `s` at unescaped `sep` outside double quotes, keeping escapes in the pieces.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let (mut escaped, mut quoted) = (false, false);
    for c in s.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(String::new());
            continue;
        }
        out.last_mut().unwrap().push(c);
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One line of line protocol: measurement, tag keys, field keys.
fn parse_line(line: &str) -> (String, Vec<String>, Vec<String>) {
    let parts = split_unescaped(line, ' ');
    assert!(
        parts.len() == 2 || parts.len() == 3,
        "unexpected line protocol: {line}"
    );
    let series = split_unescaped(&parts[0], ',');
    let measurement = unescape(&series[0]);
    let tags = series[1..]
        .iter()
        .map(|t| unescape(&split_unescaped(t, '=')[0]))
        .collect();
    let fields = split_unescaped(&parts[1], ',')
        .iter()
        .map(|f| unescape(&split_unescaped(f, '=')[0]))
        .collect();
    (measurement, tags, fields)
}

/// A stand-in for InfluxDB's write endpoint: records every body, answers 204.
async fn capture(
    State(bodies): State<Arc<Mutex<Vec<String>>>>,
    uri: Uri,
    body: Bytes,
) -> StatusCode {
    if uri.path() != "/api/v2/write" {
        return StatusCode::NOT_FOUND;
    }
    bodies
        .lock()
        .unwrap()
        .push(String::from_utf8(body.to_vec()).unwrap());
    StatusCode::NO_CONTENT
}

/// The hex of the test vector `name` in `docs/protocol.md`.
fn protocol_vector(name: &str) -> Vec<u8> {
    let doc = std::fs::read_to_string(repo_root().join("docs/protocol.md")).unwrap();
    let open = format!("```vector {name}\n");
    let at = doc
        .find(&open)
        .unwrap_or_else(|| panic!("no vector {name}"));
    let rest = &doc[at + open.len()..];
    let hex: String = rest[..rest.find("```").unwrap()]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Ingest's points: the protocol vectors (hello, summary, will of `vec-1`) through the real
/// pipeline, published by `InfluxEvents` into `sink`. Returns the summary's cohort.
fn ingest_writes(sink: &InfluxSink) -> String {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    const DEVICE: &str = "vec-1";
    store.registry().provision(DEVICE, BTreeMap::new()).unwrap();
    // The vectors are sealed with the documented key 00 01 .. 1f, not the registry's.
    let mut key = store.registry().mac_key(DEVICE).unwrap();
    key.0 = std::array::from_fn(|i| i as u8);
    let keys = HashMap::from([(DEVICE.to_owned(), key)]);
    let decoder = Decoder::default();
    let metrics = Arc::new(Metrics::default());
    let mut pipeline = Pipeline::new(PipelineConfig::default(), store, Arc::clone(&metrics));
    let t = 1_800_000_000_000;
    for (i, (name, suffix)) in [("hello", "hello"), ("summary", "sum"), ("will", "will")]
        .into_iter()
        .enumerate()
    {
        let topic = format!("tf/v1/{DEVICE}/{suffix}");
        let verified = decoder.decode(&topic, &protocol_vector(name), &keys);
        if name == "summary" {
            let Ok((_, DeviceMessage::Summary(s))) = &verified else {
                panic!("the summary vector does not decode: {verified:?}");
            };
            // What the fields below are read from: every optional field is present.
            assert!(s.health.battery_mv.is_some() && s.health.rssi_dbm.is_some());
            assert!(s.health.min_free_heap.is_some() && s.confusion.is_some());
        }
        let outcome = pipeline.apply(verified, t + i as i64 * 1000);
        assert!(
            matches!(outcome, tinyfleet_ingest::pipeline::Outcome::Accepted(_)),
            "{name}: {outcome:?}"
        );
    }
    let (_batch, events) = pipeline.take_batch();
    assert_eq!(events.summaries.len(), 1, "{events:?}");
    assert_eq!(events.presence.len(), 2, "hello and will: {events:?}");
    InfluxEvents::new(sink.clone(), metrics).publish(&events);
    events.summaries[0].cohort.clone()
}

fn commit(store: &Store, start_ms: i64, windows: &[DeviceWindow]) {
    let device_windows = windows
        .iter()
        .map(|w| WindowWrite {
            key: w.device.clone(),
            start_ms,
            cohort: Some(cohort_key(&w.model_id, &w.model_version, &w.hw)),
            json: serde_json::to_string(&w.agg).unwrap(),
        })
        .collect();
    store
        .commit(&Batch {
            device_windows,
            ..Batch::default()
        })
        .unwrap();
}

/// The monitor's points: simulated windows of 40 devices over four sites, some labelled; from
/// window 2 site s1's feature 3 shifts, one device's feature 1 reads NaN half the time and
/// another's feature 2 moves far, so cohort, device
/// and accuracy tests all appear. Evaluated by a real `Monitor` writing to `sink`.
fn monitor_writes(sink: &InfluxSink) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (deliverer, _workers) = Deliverer::spawn(&AlertsConfig::default()).unwrap();
    let config = MonitorConfig {
        window_ms: W,
        min_grace_ms: 0,
        settings: MonitorSettings {
            grace_secs: 0,
            ..MonitorSettings::default()
        },
        health: HealthRules::default(),
        drift: DriftConfig {
            persistence: 1,
            ..DriftConfig::default()
        },
        alerts: AlertsConfig::default(),
    };
    let monitor =
        Monitor::open(store.clone(), config, deliverer, Some(sink.clone()), None).unwrap();
    monitor
        .put_profile("sim", "1", &sim::profile(40_000, 7), "test", T0)
        .unwrap();
    let mut fleet = Fleet::new(40, 4, 11);
    for d in &fleet.devices {
        store
            .registry()
            .provision(&d.id, [("site".to_owned(), d.site.clone())].into())
            .unwrap();
    }
    for k in 0..4 {
        if k == 2 {
            for d in fleet.devices.iter_mut().filter(|d| d.site == "s1") {
                d.condition = Condition::shifted(3, 1.0);
            }
            fleet.devices[0].condition = Condition::faulty(1, SimFault::NanBurst);
            fleet.devices[5].condition = Condition::shifted(2, 3.0);
        }
        let (windows, _) = fleet.windows(400, 0.3);
        let start = T0 + k * W;
        commit(&store, start, &windows);
        let report = monitor.step(start + W + 1_000).unwrap();
        assert_eq!(report.windows, 1, "window {k}");
    }
}

/// What tinyfleet writes, captured from the wire.
async fn written_schema() -> (Schema, String) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .fallback(capture)
        .with_state(Arc::clone(&bodies));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (sink, _writer) = InfluxSink::spawn(InfluxConfig {
        url: format!("http://{addr}"),
        token: "grafana-test".into(),
        ..InfluxConfig::default()
    })
    .unwrap();
    let cohort = ingest_writes(&sink);
    tokio::task::block_in_place(|| monitor_writes(&sink));
    assert!(sink.flush(WAIT).await, "the sink did not drain");
    let stats = sink.stats();
    assert_eq!(
        (stats.rejected, stats.dropped, stats.queued),
        (0, 0, 0),
        "{stats:?}"
    );
    assert!(stats.written > 0);

    let mut schema = Schema::default();
    for body in bodies.lock().unwrap().iter() {
        schema.add_line_protocol(body);
    }
    (schema, cohort)
}

// ----- the dashboards -----

struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards() -> Vec<Dashboard> {
    let dir = grafana_dir().join("dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()));
            out.push(Dashboard {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            });
        }
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    out
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A Flux query and where it came from.
struct Query<'a> {
    place: String,
    flux: &'a str,
}

fn queries<'a>(d: &'a Dashboard) -> Vec<Query<'a>> {
    let mut out = Vec::new();
    for p in panels(&d.json) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let flux = t["query"].as_str().unwrap_or_else(|| {
                panic!(
                    "{}: panel {} target {} has no Flux query",
                    d.file, p["title"], t["refId"]
                )
            });
            out.push(Query {
                place: format!("{}: panel {} target {}", d.file, p["title"], t["refId"]),
                flux,
            });
        }
    }
    for v in variables(&d.json) {
        if v["type"] == "query" {
            let q = &v["query"];
            let flux = q
                .as_str()
                .or_else(|| q["query"].as_str())
                .unwrap_or_else(|| {
                    panic!("{}: variable {} has no query", d.file, v["name"]);
                });
            out.push(Query {
                place: format!("{}: variable {}", d.file, v["name"]),
                flux,
            });
        }
    }
    out
}

fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// Every double-quoted string right after each occurrence of `prefix`.
fn quoted_after(flux: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = flux;
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        let after = rest.trim_start();
        if let Some(s) = after.strip_prefix('"') {
            out.push(s[..s.find('"').unwrap()].to_owned());
        }
    }
    out
}

/// Field names of `contains(value: r._field, set: [...])`.
fn contains_sets(flux: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = flux;
    while let Some(at) = rest.find("contains(value: r._field, set: [") {
        rest = &rest[at..];
        let open = rest.find('[').unwrap();
        let close = rest.find(']').unwrap();
        out.extend(
            rest[open + 1..close]
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_owned())
                .filter(|s| !s.is_empty()),
        );
        rest = &rest[close..];
    }
    out
}

/// The regexes of `r.<name> =~ /.../` (and `!~`).
fn regexes_on<'a>(flux: &'a str, name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for op in ["=~", "!~"] {
        let prefix = format!("r.{name} {op} /");
        let mut rest = flux;
        while let Some(at) = rest.find(&prefix) {
            rest = &rest[at + prefix.len()..];
            // The literal ends at the first unescaped `/`.
            let mut end = 0;
            let mut escaped = false;
            for (i, c) in rest.char_indices() {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '/' {
                    end = i;
                    break;
                }
            }
            out.push(&rest[..end]);
        }
    }
    out
}

/// Matches the small regex dialect the dashboards use on field names: `^`, `$`, literal
/// characters, `\d` / `[0-9]` with an optional `+`, and one `(a|b)` group.
fn field_regex_matches(re: &str, name: &str) -> bool {
    let re = re
        .strip_prefix('^')
        .expect("field regexes are anchored: ^...$");
    let re = re
        .strip_suffix('$')
        .expect("field regexes are anchored: ^...$");
    if let (Some(open), Some(close)) = (re.find('('), re.find(')')) {
        return re[open + 1..close].split('|').any(|alt| {
            field_regex_matches(&format!("^{}{alt}{}$", &re[..open], &re[close + 1..]), name)
        });
    }
    fn go(re: &[u8], s: &[u8]) -> bool {
        if re.is_empty() {
            return s.is_empty();
        }
        let (digit, len) = if re.starts_with(b"\\d") {
            (true, 2)
        } else if re.starts_with(b"[0-9]") {
            (true, 5)
        } else {
            (false, 1)
        };
        if digit {
            let plus = re.get(len) == Some(&b'+');
            let rest = &re[len + usize::from(plus)..];
            let max = if plus { s.len() } else { 1 };
            (1..=max)
                .any(|n| n <= s.len() && s[..n].iter().all(u8::is_ascii_digit) && go(rest, &s[n..]))
        } else {
            let c = if re[0] == b'\\' { re[1] } else { re[0] };
            let len = if re[0] == b'\\' { 2 } else { 1 };
            !s.is_empty() && s[0] == c && go(&re[len..], &s[1..])
        }
    }
    go(re.as_bytes(), name.as_bytes())
}

/// `r.<identifier>` references with a comparison (`==`, `!=`, `=~`, `!~`) on a tag.
fn tag_filters(flux: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = flux;
    while let Some(at) = rest.find("r.") {
        let before = rest[..at].chars().last();
        rest = &rest[at + 2..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after = rest[name.len()..].trim_start();
        let compared = ["==", "!=", "=~", "!~"]
            .iter()
            .any(|op| after.starts_with(op));
        if compared && !name.starts_with('_') {
            out.insert(name);
        }
    }
    out
}

/// `${name}` and `${name:format}` references.
fn variable_refs(flux: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = flux;
    while let Some(at) = rest.find("${") {
        rest = &rest[at + 2..];
        let end = rest.find('}').unwrap();
        out.insert(rest[..end].split(':').next().unwrap().to_owned());
    }
    out
}

/// Checks one query against the written schema; returns the problems.
fn check_query(q: &Query<'_>, schema: &Schema) -> Vec<String> {
    let mut problems = Vec::new();
    let measurements = quoted_after(q.flux, "r._measurement ==");
    if measurements.is_empty() {
        problems.push(format!(
            "{}: names no measurement (r._measurement == \"...\")",
            q.place
        ));
    }
    let mut read = Vec::new();
    for m in &measurements {
        match schema.get(m) {
            Some(w) => read.push(w),
            None => problems.push(format!("{}: measurement {m} is never written", q.place)),
        }
    }
    let has_field = |f: &str| read.iter().any(|w| w.fields.contains(f));
    let has_tag = |t: &str| read.iter().any(|w| w.tags.contains(t));
    let mut fields = quoted_after(q.flux, "r._field ==");
    fields.extend(quoted_after(q.flux, "r._field !="));
    fields.extend(contains_sets(q.flux));
    for f in &fields {
        if !has_field(f) {
            problems.push(format!(
                "{}: field {f} is not written in {measurements:?}",
                q.place
            ));
        }
    }
    for re in regexes_on(q.flux, "_field") {
        if !read
            .iter()
            .any(|w| w.fields.iter().any(|f| field_regex_matches(re, f)))
        {
            problems.push(format!(
                "{}: field regex /{re}/ matches no field written in {measurements:?}",
                q.place
            ));
        }
    }
    let mut tags = tag_filters(q.flux);
    tags.extend(quoted_after(q.flux, "tag:"));
    for t in &tags {
        // A field is a column too once a query has pivoted its fields.
        if !has_tag(t) && !has_field(t) {
            problems.push(format!(
                "{}: tag or field {t} is not written in {measurements:?}",
                q.place
            ));
        }
    }
    problems
}

// ----- tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_query_only_what_tinyfleet_writes() {
    let (schema, cohort) = written_schema().await;

    // The capture itself: the three measurements, with what the dashboards rely on.
    let summary = schema.get("tf_summary").expect("tf_summary written");
    for f in [
        "battery_mv",
        "rssi_dbm",
        "min_free_heap",
        "accuracy",
        "f0_mean",
        "f1_sd",
    ] {
        assert!(summary.fields.contains(f), "{f}: {summary:?}");
    }
    assert_eq!(
        summary.tags,
        BTreeSet::from(["cohort".into(), "device".into()])
    );
    assert_eq!(cohort, "kws@2026.11.1/nrf52840");
    let presence = schema.get("tf_presence").expect("tf_presence written");
    assert_eq!(presence.fields, BTreeSet::from(["online".into()]));
    let drift = schema.get("tf_drift").expect("tf_drift written");
    for f in ["psi", "js", "p_value", "significant", "observed_accuracy"] {
        assert!(drift.fields.contains(f), "{f}: {drift:?}");
    }
    eprintln!("written schema: {schema:#?}");

    let all = dashboards();
    let names: Vec<&str> = all.iter().map(|d| d.file.as_str()).collect();
    assert_eq!(names, ["device.json", "drift.json", "fleet-health.json"]);
    let mut problems = Vec::new();
    let mut measurements_queried = BTreeSet::new();
    let mut count = 0;
    for d in &all {
        for q in queries(d) {
            count += 1;
            measurements_queried.extend(quoted_after(q.flux, "r._measurement =="));
            problems.extend(check_query(&q, &schema));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(count >= 20, "only {count} queries found");
    assert_eq!(
        measurements_queried,
        BTreeSet::from(["tf_drift".into(), "tf_presence".into(), "tf_summary".into()]),
        "every measurement is shown somewhere"
    );
}

#[test]
fn dashboards_are_well_formed() {
    let all = dashboards();
    assert!(!all.is_empty());
    let mut uids = BTreeSet::new();
    for d in &all {
        let j = &d.json;
        let f = &d.file;
        assert!(j["uid"].is_string() && j["title"].is_string(), "{f}");
        assert!(
            uids.insert(j["uid"].as_str().unwrap().to_owned()),
            "{f}: uid reused"
        );
        assert!(
            j["schemaVersion"].as_u64().unwrap() >= 36,
            "{f}: schemaVersion"
        );
        assert!(
            j["id"].is_null(),
            "{f}: provisioned dashboards carry no database id"
        );

        let mut ids = BTreeSet::new();
        for p in panels(j) {
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{f}: panel without id"));
            assert!(ids.insert(id), "{f}: panel id {id} is used twice");
            assert!(p["gridPos"].is_object(), "{f}: panel {id} has no gridPos");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], DATASOURCE_UID, "{f}: panel {id}");
            assert_eq!(p["datasource"]["type"], "influxdb", "{f}: panel {id}");
            let targets = p["targets"].as_array();
            assert!(
                targets.is_some_and(|t| !t.is_empty()),
                "{f}: panel {id} has no targets"
            );
            let mut refs = BTreeSet::new();
            for t in targets.into_iter().flatten() {
                assert!(
                    refs.insert(t["refId"].to_string()),
                    "{f}: panel {id} refId reused"
                );
                if !t["datasource"].is_null() {
                    assert_eq!(t["datasource"]["uid"], DATASOURCE_UID, "{f}: panel {id}");
                }
            }
        }

        let vars = variables(j);
        let mut defined: BTreeSet<String> = BTreeSet::new();
        for v in &vars {
            defined.insert(v["name"].as_str().unwrap().to_owned());
            if v["type"] == "query" {
                assert_eq!(v["datasource"]["uid"], DATASOURCE_UID, "{f}: {}", v["name"]);
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap();
                assert!(q.contains("schema.tagValues("), "{f}: {}: {q}", v["name"]);
            }
        }
        for name in ["cohort", "device"] {
            assert!(
                vars.iter()
                    .any(|v| v["name"] == name && v["type"] == "query"),
                "{f}: no {name} variable"
            );
        }
        for q in queries(d) {
            for r in variable_refs(q.flux) {
                assert!(
                    defined.contains(&r) || r.starts_with("__"),
                    "{}: ${{{r}}} is not a variable of the dashboard",
                    q.place
                );
            }
            assert!(
                q.flux.contains("v.defaultBucket"),
                "{}: reads another bucket than the datasource's",
                q.place
            );
            if !q.place.contains("variable") {
                assert!(
                    q.flux
                        .contains("range(start: v.timeRangeStart, stop: v.timeRangeStop)"),
                    "{}: ignores the dashboard's time range",
                    q.place
                );
            }
        }
    }
}

#[test]
fn provisioning_files_point_at_the_dashboards_and_the_datasource() {
    let dir = grafana_dir().join("provisioning");
    let ds = std::fs::read_to_string(dir.join("datasources/tinyfleet-influxdb.yaml")).unwrap();
    for needle in [
        "apiVersion: 1",
        "type: influxdb",
        &format!("uid: {DATASOURCE_UID}"),
        "version: Flux",
        "${INFLUX_URL}",
        "${INFLUX_ORG}",
        "${INFLUX_BUCKET}",
        "${INFLUX_TOKEN}",
    ] {
        assert!(
            ds.contains(needle),
            "datasource provisioning lacks {needle}"
        );
    }
    let dash = std::fs::read_to_string(dir.join("dashboards/tinyfleet.yaml")).unwrap();
    for needle in [
        "apiVersion: 1",
        "type: file",
        "path: /var/lib/grafana/dashboards/tinyfleet",
    ] {
        assert!(
            dash.contains(needle),
            "dashboard provisioning lacks {needle}"
        );
    }
}

#[test]
fn the_query_scanner_sees_every_form() {
    let flux = r#"from(bucket: v.defaultBucket)
  |> filter(fn: (r) => r._measurement == "tf_summary" and r._field == "battery_mv")
  |> filter(fn: (r) => contains(value: r._field, set: ["psi", "js"]))
  |> filter(fn: (r) => r._field =~ /^f[0-9]+_(mean|sd)$/ and r.cohort =~ /^${cohort:regex}$/)
  |> filter(fn: (r) => r.device == "${device}")
  |> group(columns: ["cohort", "_field"])"#;
    assert_eq!(quoted_after(flux, "r._measurement =="), ["tf_summary"]);
    assert_eq!(quoted_after(flux, "r._field =="), ["battery_mv"]);
    assert_eq!(contains_sets(flux), ["psi", "js"]);
    assert_eq!(regexes_on(flux, "_field"), ["^f[0-9]+_(mean|sd)$"]);
    assert_eq!(
        tag_filters(flux),
        BTreeSet::from(["cohort".into(), "device".into()])
    );
    assert_eq!(
        variable_refs(flux),
        BTreeSet::from(["cohort".into(), "device".into()])
    );
    assert!(field_regex_matches("^f[0-9]+_(mean|sd)$", "f12_sd"));
    assert!(field_regex_matches("^f\\d+_mean$", "f0_mean"));
    assert!(!field_regex_matches("^f\\d+_mean$", "f_mean"));
    assert!(!field_regex_matches("^f[0-9]+_mean$", "f0_mean_x"));
    let (m, t, f) = parse_line(r#"tf\ x,device=a\,b,cohort=k@1/hw f0_mean=0.5,s="a b,c" 1"#);
    assert_eq!(
        (m.as_str(), t, f),
        (
            "tf x",
            vec!["device".into(), "cohort".into()],
            vec!["f0_mean".into(), "s".into()]
        )
    );
}
