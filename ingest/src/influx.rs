//! Ingest's events as InfluxDB 2 points (schema: `docs/influxdb.md`).
//!
//! Never blocks: [`InfluxSink::send`] only queues; when the time-series store is down the
//! backlog grows up to its bound and is reported in `/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tinyfleet_sink_influx::{InfluxSink, Point};

use crate::metrics::Metrics;
use crate::pipeline::Events;
use crate::shell::EventSink;

/// Measurement of one accepted summary.
pub const SUMMARY: &str = "tf_summary";
/// Measurement of one presence change.
pub const PRESENCE: &str = "tf_presence";

/// Field names of [`SUMMARY`] that every summary carries (the per-feature and optional ones are
/// listed in `docs/influxdb.md`). Dashboards are checked against this list.
pub const SUMMARY_FIELDS: &[&str] = &[
    "inferences",
    "span_ms",
    "lost",
    "dropped",
    "reset",
    "nan",
    "out_of_range",
    "latency_overflow",
];
/// Optional fields of [`SUMMARY`].
pub const SUMMARY_OPTIONAL_FIELDS: &[&str] =
    &["battery_mv", "rssi_dbm", "min_free_heap", "accuracy"];

/// Feeds an [`InfluxSink`].
#[derive(Debug, Clone)]
pub struct InfluxEvents {
    sink: InfluxSink,
    metrics: Arc<Metrics>,
}

impl InfluxEvents {
    pub fn new(sink: InfluxSink, metrics: Arc<Metrics>) -> Self {
        metrics.watch_sink(sink.stats_reader());
        Self { sink, metrics }
    }
}

/// The points of one batch of events.
pub fn points(events: &Events) -> Vec<Point> {
    let mut out = Vec::with_capacity(events.summaries.len() + events.presence.len());
    for e in &events.summaries {
        let s = &e.summary;
        let mut p = Point::new(SUMMARY, e.event_ms.saturating_mul(1_000_000))
            .tag("device", e.device.clone())
            .tag("cohort", e.cohort.clone())
            .field("inferences", s.inferences())
            .field("span_ms", u64::from(s.span_ms))
            .field("lost", u64::from(e.lost))
            .field("dropped", u64::from(s.health.dropped))
            .field("reset", u64::from(s.health.reset))
            .field(
                "nan",
                s.features
                    .iter()
                    .map(|f| u64::from(f.hist.nan))
                    .sum::<u64>(),
            )
            .field(
                "out_of_range",
                s.features
                    .iter()
                    .map(|f| u64::from(f.hist.underflow) + u64::from(f.hist.overflow))
                    .sum::<u64>(),
            )
            .field("latency_overflow", u64::from(s.latency.overflow));
        if let Some(mv) = s.health.battery_mv {
            p = p.field("battery_mv", u64::from(mv));
        }
        if let Some(rssi) = s.health.rssi_dbm {
            p = p.field("rssi_dbm", i64::from(rssi));
        }
        if let Some(heap) = s.health.min_free_heap {
            p = p.field("min_free_heap", u64::from(heap));
        }
        if let Some(c) = &s.confusion {
            let total: u64 = c.iter().flatten().map(|&v| u64::from(v)).sum();
            let right: u64 = c
                .iter()
                .enumerate()
                .filter_map(|(i, row)| row.get(i))
                .map(|&v| u64::from(v))
                .sum();
            if total > 0 {
                p = p.field("accuracy", right as f64 / total as f64);
            }
        }
        for (i, f) in s.features.iter().enumerate() {
            // NaN moments (no finite value in the window) are left out by the sink.
            p = p
                .field(format!("f{i}_mean"), f64::from(f.mean))
                .field(format!("f{i}_sd"), f64::from(f.sd));
        }
        out.push(p);
    }
    for e in &events.presence {
        out.push(
            Point::new(PRESENCE, e.at_ms.saturating_mul(1_000_000))
                .tag("device", e.device.clone())
                .tag("reason", e.reason)
                .field("online", e.online),
        );
    }
    out
}

impl EventSink for InfluxEvents {
    fn publish(&self, events: &Events) {
        let points = points(events);
        if !points.is_empty() {
            self.sink.send(points);
        }
        let stats = self.sink.stats();
        self.metrics
            .sink_backlog
            .store(stats.queued as u64, Ordering::Relaxed);
        self.metrics
            .sink_dropped
            .store(stats.dropped, Ordering::Relaxed);
    }
}
