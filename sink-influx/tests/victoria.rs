//! The sink against a real server speaking `/api/v2/write`: VictoriaMetrics, started per test as
//! a child process on a free loopback port. Read-back goes through `/api/v1/export`, where each
//! line-protocol field is the series `measurement_field` with the point's tags as labels.
//!
//! One more test uses a tiny fake HTTP server to check how error statuses are handled.
//!
//! These tests fail (never skip) when the server is not installed:
//! run `scripts/ensure-victoria-metrics.sh`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tinyfleet_sink_influx::{InfluxConfig, InfluxSink, Point, SinkStats};

const TOKEN: &str = "test-token-must-not-leak";

fn vm_binary() -> PathBuf {
    let candidates = std::env::var_os("VICTORIA_METRICS_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/bin/victoria-metrics")])
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("victoria-metrics"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "victoria-metrics is not installed; these tests need a real server: \
         run scripts/ensure-victoria-metrics.sh (or set VICTORIA_METRICS_BIN)"
    );
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A running VictoriaMetrics; killed (and reaped) on drop.
struct Vm {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Vm {
    async fn start(port: u16) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("vm.log")).unwrap();
        let child = Command::new(vm_binary())
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!(
                "-storageDataPath={}",
                dir.path().join("data").display()
            ))
            .arg("-memory.allowedPercent=10")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn victoria-metrics");
        let mut vm = Vm { child, port, dir };
        vm.wait_healthy(Duration::from_secs(15)).await;
        vm
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vm.log")).unwrap_or_default()
    }

    async fn wait_healthy(&mut self, timeout: Duration) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("victoria-metrics exited with {status}:\n{}", self.log());
            }
            let health = http
                .get(format!("{}/health", self.url()))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if matches!(&health, Ok(r) if r.status().is_success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "victoria-metrics not healthy on port {} after {timeout:?}:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// All samples of the series whose name matches `name_regex`, after asking the server to
    /// make pending data searchable. One entry per series: (labels without `__name__`, name,
    /// values, timestamps in ms).
    async fn export(&self, name_regex: &str) -> Vec<Series> {
        let http = reqwest::Client::new();
        let flushed = http
            .post(format!("{}/internal/force_flush", self.url()))
            .send()
            .await
            .unwrap();
        assert!(
            flushed.status().is_success(),
            "force_flush: {}",
            flushed.status()
        );
        let body = http
            .get(format!("{}/api/v1/export", self.url()))
            .query(&[("match[]", format!("{{__name__=~\"{name_regex}\"}}"))])
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut out: Vec<Series> = body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let mut labels: BTreeMap<String, String> = v["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect();
                let name = labels.remove("__name__").unwrap();
                let values = v["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                let timestamps = v["timestamps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect();
                Series {
                    name,
                    labels,
                    values,
                    timestamps,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
        out
    }

    /// Polls `export` until it holds `samples` samples in total (the server makes fresh data
    /// searchable asynchronously, even after a forced flush).
    async fn export_until(
        &self,
        name_regex: &str,
        samples: usize,
        timeout: Duration,
    ) -> Vec<Series> {
        let deadline = Instant::now() + timeout;
        loop {
            let series = self.export(name_regex).await;
            let got: usize = series.iter().map(|s| s.values.len()).sum();
            if got >= samples {
                return series;
            }
            assert!(
                Instant::now() < deadline,
                "only {got} of {samples} samples of {name_regex} readable after {timeout:?}: {series:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
    values: Vec<f64>,
    timestamps: Vec<i64>,
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn config(url: String) -> InfluxConfig {
    InfluxConfig {
        url,
        org: "tinyfleet".into(),
        bucket: "test".into(),
        token: TOKEN.into(),
        batch_size: 100,
        flush_interval_ms: 50,
        queue_capacity: 1000,
        backoff_min_ms: 20,
        backoff_max_ms: 300,
        request_timeout_ms: 2000,
    }
}

/// Polls `stats` until `done` holds, or fails showing the last stats.
async fn wait_for(
    sink: &InfluxSink,
    what: &str,
    timeout: Duration,
    done: impl Fn(&SinkStats) -> bool,
) -> SinkStats {
    let deadline = Instant::now() + timeout;
    loop {
        let s = sink.stats();
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `send` must return at once whatever the server does; generous for a loaded CI machine.
fn timed_send(sink: &InfluxSink, points: Vec<Point>) {
    let start = Instant::now();
    sink.send(points);
    let took = start.elapsed();
    assert!(took < Duration::from_millis(250), "send took {took:?}");
}

fn counter_points(
    measurement: &str,
    base_ms: i64,
    values: impl IntoIterator<Item = i64>,
) -> Vec<Point> {
    values
        .into_iter()
        .map(|i| {
            Point::new(measurement, (base_ms + i) * 1_000_000)
                .tag("seq", "all")
                .field("n", i)
        })
        .collect()
}

fn assert_no_token(s: &SinkStats) {
    if let Some(e) = &s.last_error {
        assert!(!e.contains(TOKEN), "token leaked into last_error: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_type_and_escaped_tags_are_readable() {
    let vm = Vm::start(free_port()).await;
    let (sink, task) = InfluxSink::spawn(config(vm.url())).unwrap();

    let t0 = now_ms() - 10_000;
    let ns = |ms: i64| ms * 1_000_000;
    // Tags with every character line protocol escapes; newlines become spaces.
    let tricky_device = r"dev 1,x=y\z";
    let points = vec![
        Point::new("sinka", ns(t0))
            .tag("device", tricky_device)
            .tag("model version", "v2\nrc")
            .field("f", 0.25)
            .field("i", -42i64)
            .field("u", 1u64 << 40)
            .field("b", true)
            .field("s", "a \"quoted\" string, with = and \\"),
        Point::new("sinka", ns(t0 + 1))
            .tag("device", "plain")
            .field("f", -1.5e-7)
            .field("i", i64::from(i32::MAX))
            .field("u", 0u64)
            .field("b", false),
    ];
    timed_send(&sink, points);
    // More than one batch of a second measurement.
    timed_send(&sink, counter_points("sinkb", t0, 0..250));

    assert!(
        sink.flush(Duration::from_secs(10)).await,
        "{:#?}",
        sink.stats()
    );
    let s = sink.stats();
    assert_eq!(
        (
            s.queued,
            s.written,
            s.dropped,
            s.rejected,
            s.failed_attempts
        ),
        (0, 252, 0, 0, 0),
        "{s:#?}"
    );
    assert!(s.last_success_unix_ms.unwrap() as i64 >= t0);

    let series = vm
        .export_until("sinka_.*", 9, Duration::from_secs(10))
        .await;
    let got: Vec<(String, String, Vec<f64>, Vec<i64>)> = series
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.labels.get("device").cloned().unwrap_or_default(),
                s.values.clone(),
                s.timestamps.clone(),
            )
        })
        .collect();
    let want =
        |name: &str, dev: &str, v: f64, t: i64| (name.to_owned(), dev.to_owned(), vec![v], vec![t]);
    assert_eq!(
        got,
        vec![
            want("sinka_b", tricky_device, 1.0, t0),
            want("sinka_b", "plain", 0.0, t0 + 1),
            want("sinka_f", tricky_device, 0.25, t0),
            want("sinka_f", "plain", -1.5e-7, t0 + 1),
            want("sinka_i", tricky_device, -42.0, t0),
            want("sinka_i", "plain", f64::from(i32::MAX), t0 + 1),
            // VictoriaMetrics stores string fields as 0.
            want("sinka_s", tricky_device, 0.0, t0),
            want("sinka_u", tricky_device, (1u64 << 40) as f64, t0),
            want("sinka_u", "plain", 0.0, t0 + 1),
        ]
    );
    for s in &series {
        let expected: BTreeMap<String, String> = if s.labels["device"] == tricky_device {
            [("device", tricky_device), ("model version", "v2 rc")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        } else {
            [("device".to_owned(), "plain".to_owned())].into()
        };
        assert_eq!(s.labels, expected, "{}", s.name);
    }

    let counters = vm
        .export_until("sinkb_n", 250, Duration::from_secs(10))
        .await;
    assert_eq!(counters.len(), 1);
    assert_eq!(
        counters[0].values,
        (0..250).map(|i| i as f64).collect::<Vec<_>>()
    );
    assert_eq!(
        counters[0].timestamps,
        (0..250).map(|i| t0 + i).collect::<Vec<_>>()
    );

    drop(sink);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_once_the_store_comes_up() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (sink, _task) = InfluxSink::spawn(config(url)).unwrap();

    let t0 = now_ms() - 10_000;
    timed_send(&sink, counter_points("sinkdown", t0, 0..150));
    let s = wait_for(
        &sink,
        "failed attempts while the store is down",
        Duration::from_secs(10),
        |s| s.failed_attempts >= 3,
    )
    .await;
    assert_eq!((s.queued, s.written, s.dropped), (150, 0, 0), "{s:#?}");
    eprintln!("last_error while down: {:?}", s.last_error);
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("Connection refused"))
            && s.last_success_unix_ms.is_none(),
        "{s:#?}"
    );
    assert_no_token(&s);
    // Still accepting while failing.
    timed_send(&sink, counter_points("sinkdown", t0, 150..200));
    assert_eq!(sink.stats().queued, 200);

    let vm = Vm::start(port).await;
    let s = wait_for(
        &sink,
        "the backlog to drain",
        Duration::from_secs(10),
        |s| s.queued == 0 && s.written == 200,
    )
    .await;
    assert_eq!(s.dropped, 0);
    assert!(s.last_success_unix_ms.is_some());
    assert_no_token(&s);

    let series = vm
        .export_until("sinkdown_n", 200, Duration::from_secs(10))
        .await;
    assert_eq!(series.len(), 1);
    assert_eq!(
        series[0].values,
        (0..200).map(|i| i as f64).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_drops_the_oldest_and_counts_them() {
    let port = free_port();
    let config = InfluxConfig {
        batch_size: 4,
        queue_capacity: 10,
        // Only full batches (or flush) start a write: the test controls when batches are taken.
        flush_interval_ms: 60_000,
        ..config(format!("http://127.0.0.1:{port}"))
    };
    let (sink, _task) = InfluxSink::spawn(config).unwrap();
    let t0 = now_ms() - 10_000;

    // 25 points into a queue of 10: the 15 oldest go at once.
    timed_send(&sink, counter_points("sinkfull", t0, 0..25));
    // The writer takes 15..=18 as a batch and keeps retrying it.
    let s = wait_for(
        &sink,
        "a failing batch in flight",
        Duration::from_secs(10),
        |s| s.failed_attempts >= 1,
    )
    .await;
    assert_eq!((s.queued, s.dropped, s.written), (10, 15, 0), "{s:#?}");

    // 10 more: waiting 19..=24 are older than them and go; the batch in flight stays.
    timed_send(&sink, counter_points("sinkfull", t0, 25..35));
    let s = sink.stats();
    assert_eq!((s.queued, s.dropped, s.written), (14, 21, 0), "{s:#?}");

    // What survived is exactly the batch in flight and the newest points.
    let vm = Vm::start(port).await;
    assert!(
        sink.flush(Duration::from_secs(10)).await,
        "{:#?}",
        sink.stats()
    );
    let s = sink.stats();
    assert_eq!((s.queued, s.dropped, s.written), (0, 21, 14), "{s:#?}");
    let series = vm
        .export_until("sinkfull_n", 14, Duration::from_secs(10))
        .await;
    let expected: Vec<f64> = (15..19).chain(25..35).map(|i| i as f64).collect();
    assert_eq!(series[0].values, expected);
}

/// A one-status HTTP server: answers every request with `status` and counts requests.
async fn fake_server(
    status: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                // Read the whole request (headers, then Content-Length bytes) before answering.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let body = r#"{"code":"x","message":"fake"}"#;
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (url, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batches_are_rejected_but_auth_and_server_errors_are_retried() {
    use std::sync::atomic::Ordering;

    // 400: the batch itself is bad; retrying cannot help, so it is counted and let go.
    let (url, hits) = fake_server("400 Bad Request").await;
    let (sink, _task) = InfluxSink::spawn(config(url)).unwrap();
    timed_send(&sink, counter_points("sinkbad", now_ms(), 0..5));
    assert!(
        sink.flush(Duration::from_secs(10)).await,
        "{:#?}",
        sink.stats()
    );
    let s = sink.stats();
    assert_eq!(
        (s.queued, s.rejected, s.written, s.failed_attempts),
        (0, 5, 0, 0),
        "{s:#?}"
    );
    assert!(s.last_error.as_deref().unwrap().contains("400"), "{s:#?}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // 401 and 503: kept and retried (a fixed token or a recovered server lets them through).
    for status in ["401 Unauthorized", "503 Service Unavailable"] {
        let (url, hits) = fake_server(status).await;
        let (sink, _task) = InfluxSink::spawn(config(url)).unwrap();
        timed_send(&sink, counter_points("sinkretry", now_ms(), 0..5));
        let s = wait_for(&sink, "retries", Duration::from_secs(10), |s| {
            s.failed_attempts >= 3
        })
        .await;
        assert_eq!(
            (s.queued, s.rejected, s.written),
            (5, 0, 0),
            "{status}: {s:#?}"
        );
        assert!(
            s.last_error.as_deref().unwrap().contains(&status[..3]),
            "{s:#?}"
        );
        assert_no_token(&s);
        assert!(hits.load(Ordering::SeqCst) >= 3);
    }
}
