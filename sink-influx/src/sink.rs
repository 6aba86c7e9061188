//! The sink: a bounded queue that callers fill without waiting, and one writer task that drains
//! it to the server in batches, retrying failures with jittered exponential backoff.
//!
//! This module is for getting points out of the ingest pipeline into InfluxDB (or anything that
//! speaks `/api/v2/write`) without ever making ingest wait for the store. It must never block or
//! fail the caller of [`InfluxSink::send`], never hold more than `queue_capacity` waiting points
//! plus one batch in flight (past that the oldest waiting points are dropped and counted), never
//! drop a batch because the server is unreachable (it retries it), and never log the token.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{ConfigError, InfluxConfig};
use crate::point::Point;

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built (TLS back-end initialisation).
    #[error("cannot build the InfluxDB HTTP client: {0}")]
    Client(String),
    /// [`InfluxSink::spawn`] was called outside a tokio runtime.
    #[error("InfluxSink::spawn must be called inside a tokio runtime")]
    NoRuntime,
}

/// A snapshot of the sink's counters. All counts are in points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Backlog: points waiting in the queue plus the batch being written or retried.
    pub queued: usize,
    /// Points the server acknowledged (HTTP 204).
    pub written: u64,
    /// Points dropped, oldest first, because the queue was full.
    pub dropped: u64,
    /// Points refused: unwritable at [`InfluxSink::send`] (empty measurement, no writable
    /// field), or in a batch the server refused as malformed or too large (HTTP 400, 413, 422;
    /// InfluxDB may still have written the valid lines of such a batch).
    pub rejected: u64,
    /// Write requests that failed and will be (or were) retried.
    pub failed_attempts: u64,
    /// The most recent failure, kept after recovery (compare with `last_success_unix_ms`).
    pub last_error: Option<String>,
    /// When the server last acknowledged a batch, in milliseconds since the Unix epoch.
    pub last_success_unix_ms: Option<u64>,
}

/// Handle to a running sink. Cheap to clone; every clone feeds the same queue. When the last
/// clone is dropped the writer writes what is left and its task ends (if the server is down it
/// keeps retrying: bound shutdown with [`InfluxSink::flush`] and by aborting the task).
#[derive(Debug, Clone)]
pub struct InfluxSink {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

/// Dropped with the last `InfluxSink` clone: tells the writer to finish.
#[derive(Debug)]
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake_writer.notify_one();
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// New points, a flush request, or close.
    wake_writer: Notify,
    /// Some points left the queue (written, rejected or dropped).
    progress: Notify,
    batch_size: usize,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if something ever did, the counters are
        // still consistent enough to keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> SinkStats {
        let st = self.lock();
        SinkStats {
            queued: st.waiting.len() + st.inflight,
            written: st.written,
            dropped: st.dropped,
            rejected: st.rejected,
            failed_attempts: st.failed_attempts,
            last_error: st.last_error.clone(),
            last_success_unix_ms: st.last_success_unix_ms,
        }
    }
}

/// A sink's counters, read at any time ([`InfluxSink::stats_reader`]). Unlike an
/// [`InfluxSink`] clone it does not keep the writer running.
#[derive(Debug, Clone)]
pub struct StatsReader(Arc<Shared>);

impl StatsReader {
    /// A snapshot of the counters, as [`InfluxSink::stats`].
    pub fn stats(&self) -> SinkStats {
        self.0.stats()
    }
}

#[derive(Debug, Default)]
struct State {
    /// Encoded lines, each ending in `\n`, oldest first.
    waiting: VecDeque<String>,
    /// Sequence number of `waiting[0]`; points are numbered in the order they were accepted.
    head_seq: u64,
    /// Points in the batch being written; they are older than every waiting point.
    inflight: usize,
    inflight_start: u64,
    /// When the queue last went from empty to non-empty.
    first_pending_at: Option<Instant>,
    /// A flush asked for every point numbered below this to be written now.
    flush_through: u64,
    closed: bool,
    /// Set while the queue overflows, to log the start of an overflow once.
    overflowing: bool,
    written: u64,
    dropped: u64,
    rejected: u64,
    failed_attempts: u64,
    last_error: Option<String>,
    last_success_unix_ms: Option<u64>,
}

impl State {
    fn next_seq(&self) -> u64 {
        self.head_seq + self.waiting.len() as u64
    }

    /// Every point numbered below this has left the queue.
    fn resolved_through(&self) -> u64 {
        if self.inflight > 0 {
            self.inflight_start
        } else {
            self.head_seq
        }
    }
}

impl InfluxSink {
    /// Validates `config`, builds the client and starts the writer task on the current tokio
    /// runtime. The returned handle ends after every `InfluxSink` clone is dropped and the
    /// queue is written.
    pub fn spawn(config: InfluxConfig) -> Result<(Self, JoinHandle<()>), SinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SinkError::NoRuntime)?;
        config.validate()?;
        // Safe after `validate`: the URL parses, so the builder does not panic.
        let client = influxdb2::ClientBuilder::new(
            config.url.as_str(),
            config.org.as_str(),
            config.token.as_str(),
        )
        .build()
        .map_err(|e| SinkError::Client(e.to_string()))?;

        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            progress: Notify::new(),
            batch_size: config.batch_size,
            capacity: config.queue_capacity,
        });
        tracing::info!(
            url = %config.url,
            org = %config.org,
            bucket = %config.bucket,
            batch_size = config.batch_size,
            queue_capacity = config.queue_capacity,
            "influx sink started"
        );
        let writer = Writer {
            shared: Arc::clone(&shared),
            client,
            org: config.org,
            bucket: config.bucket,
            flush_interval: Duration::from_millis(config.flush_interval_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            backoff_min_ms: config.backoff_min_ms,
            backoff_max_ms: config.backoff_max_ms,
        };
        let handle = runtime.spawn(writer.run());
        let alive = Arc::new(Alive(Arc::clone(&shared)));
        Ok((
            Self {
                shared,
                _alive: alive,
            },
            handle,
        ))
    }

    /// Queues `points` for writing. Never waits for the writer or the server and never fails:
    /// points that cannot be encoded are counted in `rejected`; when the queue is full the
    /// oldest waiting points are dropped and counted in `dropped`.
    pub fn send(&self, points: Vec<Point>) {
        if points.is_empty() {
            return;
        }
        // Encode outside the lock.
        let mut lines = Vec::with_capacity(points.len());
        let mut rejected = 0u64;
        for point in &points {
            let mut line = String::new();
            match point.write_line_protocol(&mut line) {
                Ok(()) => lines.push(line),
                Err(e) => {
                    rejected += 1;
                    tracing::debug!(measurement = %point.measurement, error = %e, "point refused");
                }
            }
        }
        drop(points);

        let mut dropped = 0u64;
        let mut st = self.shared.lock();
        st.rejected += rejected;
        if !lines.is_empty() {
            // Lines beyond the capacity would be dropped at once: skip them, oldest first.
            let skip = lines.len().saturating_sub(self.shared.capacity);
            let evict =
                (st.waiting.len() + lines.len() - skip).saturating_sub(self.shared.capacity);
            st.waiting.drain(..evict);
            st.head_seq += evict as u64;
            // Skipped lines get sequence numbers too and are resolved at once.
            st.head_seq += skip as u64;
            dropped = (evict + skip) as u64;
            st.waiting.extend(lines.into_iter().skip(skip));
            if st.first_pending_at.is_none() {
                st.first_pending_at = Some(Instant::now());
            }
        }
        if dropped > 0 {
            st.dropped += dropped;
            if !st.overflowing {
                st.overflowing = true;
                tracing::warn!(
                    capacity = self.shared.capacity,
                    dropped_total = st.dropped,
                    "influx sink queue full: dropping the oldest points"
                );
            }
        }
        drop(st);
        self.shared.wake_writer.notify_one();
        if dropped > 0 || rejected > 0 {
            self.shared.progress.notify_waiters();
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SinkStats {
        self.shared.stats()
    }

    /// Reads the counters later without keeping the sink alive (for metrics rendered when they
    /// are scraped: the backlog drains while nothing is sent).
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader(Arc::clone(&self.shared))
    }

    /// Asks the writer to write everything queued so far without waiting for the flush
    /// interval, and waits until all of it has left the queue (written, or dropped or rejected:
    /// see [`InfluxSink::stats`]) or `timeout` passes. Returns whether it all left in time.
    /// Points sent after the call are not waited for.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let target = {
            let mut st = self.shared.lock();
            let target = st.next_seq();
            st.flush_through = st.flush_through.max(target);
            target
        };
        self.shared.wake_writer.notify_one();
        let wait = async {
            loop {
                let notified = self.shared.progress.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.shared.lock().resolved_through() >= target {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

struct Writer {
    shared: Arc<Shared>,
    client: influxdb2::Client,
    org: String,
    bucket: String,
    flush_interval: Duration,
    request_timeout: Duration,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
}

enum WriteFailure {
    /// Worth retrying: the server is unreachable, slow, overloaded, or refuses our credentials.
    Retry(String),
    /// The batch itself is bad; retrying cannot help.
    Reject(String),
}

const MAX_ERROR_LEN: usize = 512;

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// `e` and its sources, joined: reqwest's own message names only the URL, the cause (such as
/// "Connection refused") is in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    msg
}

fn unix_ms_now() -> Option<u64> {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// Exponential backoff with "equal" jitter: a delay drawn uniformly from the upper half of
/// `min * 2^attempt`, capped at `max`, and at least 1 ms.
fn backoff_delay(attempt: u32, min_ms: u64, max_ms: u64) -> Duration {
    let ceiling = min_ms
        .saturating_mul(1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX))
        .min(max_ms);
    // Never zero: a failing server must not be hammered in a tight loop.
    let floor = (ceiling / 2).max(1);
    let ms = if floor < ceiling {
        rand::Rng::random_range(&mut rand::rng(), floor..=ceiling)
    } else {
        ceiling
    };
    Duration::from_millis(ms)
}

impl Writer {
    async fn run(self) {
        while let Some((body, count)) = self.next_batch().await {
            self.write_until_done(body, count).await;
        }
        tracing::info!("influx sink stopped: queue written and every handle dropped");
    }

    /// Waits until a batch is due and takes it; `None` once closed and empty.
    async fn next_batch(&self) -> Option<(String, usize)> {
        loop {
            let notified = self.shared.wake_writer.notified();
            let deadline = {
                let mut st = self.shared.lock();
                match st.first_pending_at {
                    _ if st.waiting.is_empty() => {
                        if st.closed {
                            return None;
                        }
                        st.first_pending_at = None;
                        None
                    }
                    Some(since)
                        if st.waiting.len() < self.shared.batch_size
                            && !st.closed
                            && st.flush_through <= st.head_seq
                            && since.elapsed() < self.flush_interval =>
                    {
                        Some(since + self.flush_interval)
                    }
                    _ => return Some(self.take_batch(&mut st)),
                }
            };
            match deadline {
                None => notified.await,
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at.into()) => {}
                    }
                }
            }
        }
    }

    fn take_batch(&self, st: &mut State) -> (String, usize) {
        let count = st.waiting.len().min(self.shared.batch_size);
        let mut body = String::with_capacity(
            st.waiting
                .iter()
                .take(count)
                .map(String::len)
                .sum::<usize>(),
        );
        for line in st.waiting.drain(..count) {
            body.push_str(&line);
        }
        st.inflight = count;
        st.inflight_start = st.head_seq;
        st.head_seq += count as u64;
        if st.waiting.is_empty() {
            st.first_pending_at = None;
        }
        // The remaining points keep the older `first_pending_at`: they are written a little
        // early rather than late.
        (body, count)
    }

    /// Writes one batch, retrying until the server takes it or refuses it as malformed.
    async fn write_until_done(&self, body: String, count: usize) {
        let mut attempt: u32 = 0;
        loop {
            match self.write_once(body.clone()).await {
                Ok(()) => {
                    let mut st = self.shared.lock();
                    st.written += count as u64;
                    st.inflight = 0;
                    st.last_success_unix_ms = unix_ms_now();
                    st.overflowing = false;
                    drop(st);
                    if attempt > 0 {
                        tracing::info!(attempts = attempt + 1, "influx write recovered");
                    }
                    break;
                }
                Err(WriteFailure::Reject(msg)) => {
                    tracing::error!(points = count, error = %msg, "influx refused a batch; dropping it");
                    let mut st = self.shared.lock();
                    st.rejected += count as u64;
                    st.inflight = 0;
                    st.last_error = Some(msg);
                    break;
                }
                Err(WriteFailure::Retry(msg)) => {
                    let delay = backoff_delay(attempt, self.backoff_min_ms, self.backoff_max_ms);
                    tracing::warn!(
                        points = count,
                        attempt = attempt + 1,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        error = %msg,
                        "influx write failed; will retry"
                    );
                    {
                        let mut st = self.shared.lock();
                        st.failed_attempts += 1;
                        st.last_error = Some(msg);
                    }
                    tokio::time::sleep(delay).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
        self.shared.progress.notify_waiters();
    }

    async fn write_once(&self, body: String) -> Result<(), WriteFailure> {
        let request = self
            .client
            .write_line_protocol(&self.org, &self.bucket, body);
        match tokio::time::timeout(self.request_timeout, request).await {
            Err(_) => Err(WriteFailure::Retry(format!(
                "write timed out after {} ms",
                self.request_timeout.as_millis()
            ))),
            Ok(Ok(())) => Ok(()),
            Ok(Err(influxdb2::RequestError::Http { status, text })) => {
                let msg = truncate(format!("HTTP {status}: {}", text.trim()));
                match status.as_u16() {
                    400 | 413 | 422 => Err(WriteFailure::Reject(msg)),
                    _ => Err(WriteFailure::Retry(msg)),
                }
            }
            // The token only travels in a header; reqwest's messages name the URL (org and
            // bucket in the query), never headers.
            Ok(Err(e)) => Err(WriteFailure::Retry(truncate(error_chain(&e)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        for _ in 0..100 {
            let d0 = backoff_delay(0, 100, 30_000).as_millis();
            assert!((50..=100).contains(&d0), "{d0}");
            let d3 = backoff_delay(3, 100, 30_000).as_millis();
            assert!((400..=800).contains(&d3), "{d3}");
            let big = backoff_delay(200, 100, 30_000).as_millis();
            assert!((15_000..=30_000).contains(&big), "{big}");
        }
        assert_eq!(backoff_delay(5, 1, 1), Duration::from_millis(1));
    }

    #[test]
    fn spawn_outside_a_runtime_is_an_error_not_a_panic() {
        assert!(matches!(
            InfluxSink::spawn(InfluxConfig::default()),
            Err(SinkError::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn spawn_refuses_a_bad_url_instead_of_panicking() {
        let config = InfluxConfig {
            url: "/3242/23".into(),
            ..InfluxConfig::default()
        };
        assert!(matches!(
            InfluxSink::spawn(config),
            Err(SinkError::Config(ConfigError { field: "url", .. }))
        ));
    }

    fn unreachable_config(batch_size: usize, queue_capacity: usize) -> InfluxConfig {
        InfluxConfig {
            // Port 9 (discard) on loopback: nothing listens in the test environment; even if
            // something did, these tests only look at what happens before a write completes.
            url: "http://127.0.0.1:9".into(),
            batch_size,
            queue_capacity,
            flush_interval_ms: 3_600_000,
            backoff_min_ms: 3_600_000,
            backoff_max_ms: 3_600_000,
            ..InfluxConfig::default()
        }
    }

    fn pt(i: i64) -> Point {
        Point::new("m", i).field("v", i)
    }

    #[tokio::test]
    async fn unwritable_points_are_counted_not_queued() {
        let (sink, _task) = InfluxSink::spawn(unreachable_config(100, 100)).unwrap();
        sink.send(vec![
            Point::new("", 1).field("v", 1i64),
            Point::new("m", 1).field("v", f64::NAN),
            pt(1),
        ]);
        let s = sink.stats();
        assert_eq!((s.queued, s.rejected, s.dropped), (1, 2, 0));
    }

    #[tokio::test]
    async fn overflow_in_one_send_keeps_the_newest() {
        // batch_size equals capacity: nothing is taken before the queue is full, so the
        // writer cannot race the checks below.
        let (sink, _task) = InfluxSink::spawn(unreachable_config(10, 10)).unwrap();
        sink.send((0..25).map(pt).collect());
        let s = sink.stats();
        assert_eq!((s.queued, s.dropped), (10, 15));
        let st = sink.shared.lock();
        let first = st
            .waiting
            .front()
            .cloned()
            .unwrap_or_else(|| format!("in flight from seq {}", st.inflight_start));
        // Either still waiting (first is point 15) or taken as one batch starting at seq 15.
        assert!(
            first.contains(" 15\n") || st.inflight_start == 15,
            "{first}"
        );
    }

    #[tokio::test]
    async fn flush_times_out_while_the_server_is_down() {
        let (sink, _task) = InfluxSink::spawn(unreachable_config(10, 10)).unwrap();
        sink.send(vec![pt(1)]);
        assert!(!sink.flush(Duration::from_millis(200)).await);
        assert_eq!(sink.stats().queued, 1);
        // Nothing queued after a flush: an empty flush succeeds at once.
        let (empty, _task) = InfluxSink::spawn(unreachable_config(10, 10)).unwrap();
        assert!(empty.flush(Duration::from_millis(200)).await);
    }

    #[tokio::test]
    async fn a_stats_reader_sees_the_backlog_and_does_not_keep_the_writer() {
        let (sink, task) = InfluxSink::spawn(unreachable_config(10, 10)).unwrap();
        let reader = sink.stats_reader();
        sink.send(vec![pt(1), pt(2)]);
        assert_eq!(reader.stats(), sink.stats());
        assert_eq!(reader.stats().queued, 2);
        drop(sink);
        // The queue is not empty and the server unreachable: the writer keeps retrying until
        // aborted, but no longer because of the reader.
        task.abort();
        let (sink, task) = InfluxSink::spawn(unreachable_config(10, 10)).unwrap();
        let reader = sink.stats_reader();
        drop(sink);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reader.stats().queued, 0);
    }

    #[tokio::test]
    async fn writer_ends_when_the_last_handle_is_dropped_and_the_queue_is_empty() {
        let (sink, task) = InfluxSink::spawn(unreachable_config(10, 10)).unwrap();
        let clone = sink.clone();
        drop(sink);
        drop(clone);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
