//! Ingest's own telemetry: counters as atomics, rendered in the Prometheus text format.
//!
//! Metric names are constants here; labels are closed sets (message kind, reject reason), never
//! a device id (cardinality).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::decode::Reject;

/// Why a verified message was still not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    /// `(boot, seq)` already accepted: a QoS 1 redelivery or a replay.
    Duplicate,
    /// More than 63 messages behind the newest of its boot.
    TooOld,
    /// From a boot older than the newest seen.
    StaleBoot,
}

impl Drop {
    pub const ALL: [Drop; 3] = [Drop::Duplicate, Drop::TooOld, Drop::StaleBoot];

    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Duplicate => "duplicate",
            Drop::TooOld => "too_old",
            Drop::StaleBoot => "stale_boot",
        }
    }
}

/// Every reason a message is not applied, as one label set.
pub fn reason_labels() -> impl Iterator<Item = &'static str> {
    Reject::ALL
        .iter()
        .map(|r| r.as_str())
        .chain(Drop::ALL.iter().map(|d| d.as_str()))
}

const KINDS: [&str; 5] = ["hello", "will", "summary", "progress", "block_request"];

/// Counters shared between the ingest task and the HTTP API.
#[derive(Debug, Default)]
pub struct Metrics {
    pub received: AtomicU64,
    accepted: [AtomicU64; 5],
    rejected: [AtomicU64; Reject::ALL.len() + Drop::ALL.len()],
    pub lost_summaries: AtomicI64,
    pub commits: AtomicU64,
    pub commit_errors: AtomicU64,
    pub commit_seconds_sum_us: AtomicU64,
    /// Messages received but not yet committed (and so not yet acknowledged to the broker).
    pub pending: AtomicU64,
    /// Points waiting for the time-series store (0 when none is configured).
    pub sink_backlog: AtomicU64,
    pub sink_dropped: AtomicU64,
    /// Times a broker connection delivered nothing, not even ingest's own probe, and was
    /// reconnected (see `source`).
    pub broker_stalls: AtomicU64,
    /// The time-series sink itself, read when rendering: the backlog drains while ingest is
    /// idle, so the values above (stored with the last batch) would go stale.
    sink: std::sync::OnceLock<tinyfleet_sink_influx::StatsReader>,
}

pub(crate) fn kind_index(kind: tinyfleet_device::Kind) -> Option<usize> {
    use tinyfleet_device::Kind;
    match kind {
        Kind::Hello => Some(0),
        Kind::Will => Some(1),
        Kind::Summary => Some(2),
        Kind::Progress => Some(3),
        Kind::BlockRequest => Some(4),
        Kind::Offer | Kind::Block => None,
    }
}

fn reason_index(label: &str) -> Option<usize> {
    reason_labels().position(|l| l == label)
}

impl Metrics {
    pub fn accept(&self, kind: tinyfleet_device::Kind) {
        if let Some(i) = kind_index(kind) {
            self.accepted[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn reject(&self, label: &str) {
        if let Some(i) = reason_index(label) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Accepted messages of a kind (`"summary"`, ...).
    pub fn accepted(&self, kind: &str) -> u64 {
        KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.accepted[i].load(Ordering::Relaxed))
    }

    /// Messages not applied for `reason` (a [`Reject`] or [`Drop`] label).
    pub fn rejected(&self, reason: &str) -> u64 {
        reason_index(reason).map_or(0, |i| self.rejected[i].load(Ordering::Relaxed))
    }

    /// Reports the backlog and drops of this sink, read live in [`Metrics::render`].
    pub fn watch_sink(&self, reader: tinyfleet_sink_influx::StatsReader) {
        let _ = self.sink.set(reader);
    }

    /// All counters as `(name, value)`, the form persisted in the store.
    pub fn snapshot(&self) -> Vec<(String, i64)> {
        let mut out = vec![(
            "received".to_owned(),
            self.received.load(Ordering::Relaxed) as i64,
        )];
        for (i, k) in KINDS.iter().enumerate() {
            out.push((
                format!("accepted.{k}"),
                self.accepted[i].load(Ordering::Relaxed) as i64,
            ));
        }
        for (i, r) in reason_labels().enumerate() {
            out.push((
                format!("rejected.{r}"),
                self.rejected[i].load(Ordering::Relaxed) as i64,
            ));
        }
        out.push((
            "lost_summaries".to_owned(),
            self.lost_summaries.load(Ordering::Relaxed),
        ));
        out.push((
            "broker_stalls".to_owned(),
            self.broker_stalls.load(Ordering::Relaxed) as i64,
        ));
        out
    }

    /// Continues counting from persisted values (after a restart).
    pub fn restore(&self, saved: &std::collections::BTreeMap<String, i64>) {
        let get = |name: &str| saved.get(name).copied().unwrap_or(0);
        self.received
            .store(get("received") as u64, Ordering::Relaxed);
        for (i, k) in KINDS.iter().enumerate() {
            self.accepted[i].store(get(&format!("accepted.{k}")) as u64, Ordering::Relaxed);
        }
        for (i, r) in reason_labels().enumerate() {
            self.rejected[i].store(get(&format!("rejected.{r}")) as u64, Ordering::Relaxed);
        }
        self.lost_summaries
            .store(get("lost_summaries"), Ordering::Relaxed);
        self.broker_stalls
            .store(get("broker_stalls") as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every ingest metric.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP tinyfleet_ingest_received_total Device messages received.\n\
             # TYPE tinyfleet_ingest_received_total counter\n\
             tinyfleet_ingest_received_total {}",
            load(&self.received)
        );
        s.push_str(
            "# HELP tinyfleet_ingest_accepted_total Messages verified, decoded and applied.\n\
             # TYPE tinyfleet_ingest_accepted_total counter\n",
        );
        for (i, k) in KINDS.iter().enumerate() {
            let _ = writeln!(
                s,
                "tinyfleet_ingest_accepted_total{{kind=\"{k}\"}} {}",
                load(&self.accepted[i])
            );
        }
        s.push_str(
            "# HELP tinyfleet_ingest_rejected_total Messages not applied, by reason.\n\
             # TYPE tinyfleet_ingest_rejected_total counter\n",
        );
        for (i, r) in reason_labels().enumerate() {
            let _ = writeln!(
                s,
                "tinyfleet_ingest_rejected_total{{reason=\"{r}\"}} {}",
                load(&self.rejected[i])
            );
        }
        let (sink_backlog, sink_dropped) = match self.sink.get().map(|r| r.stats()) {
            Some(s) => (s.queued as i64, s.dropped as i64),
            None => (
                load(&self.sink_backlog) as i64,
                load(&self.sink_dropped) as i64,
            ),
        };
        let gauges: [(&str, &str, &str, i64); 7] = [
            (
                "tinyfleet_ingest_lost_summaries_total",
                "counter",
                "Summaries devices sent that never arrived (sequence gaps).",
                self.lost_summaries.load(Ordering::Relaxed),
            ),
            (
                "tinyfleet_ingest_commits_total",
                "counter",
                "Store transactions committed.",
                load(&self.commits) as i64,
            ),
            (
                "tinyfleet_ingest_commit_errors_total",
                "counter",
                "Store transactions that failed (retried).",
                load(&self.commit_errors) as i64,
            ),
            (
                "tinyfleet_ingest_pending_messages",
                "gauge",
                "Messages received but not yet committed and acknowledged.",
                load(&self.pending) as i64,
            ),
            (
                "tinyfleet_sink_backlog_points",
                "gauge",
                "Points queued for the time-series store.",
                sink_backlog,
            ),
            (
                "tinyfleet_sink_dropped_points_total",
                "counter",
                "Points dropped because the time-series store queue was full.",
                sink_dropped,
            ),
            (
                "tinyfleet_ingest_broker_stalls_total",
                "counter",
                "Broker connections that delivered nothing, not even ingest's own probe, and were reconnected.",
                load(&self.broker_stalls) as i64,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP tinyfleet_ingest_commit_seconds_total Time spent committing to the store.\n\
             # TYPE tinyfleet_ingest_commit_seconds_total counter\n\
             tinyfleet_ingest_commit_seconds_total {:.6}",
            load(&self.commit_seconds_sum_us) as f64 / 1e6
        );
        s
    }
}
