//! The InfluxDB 2 sink of the ingest pipeline.
//!
//! Ingest hands decoded, aggregated measurements to [`InfluxSink::send`] as [`Point`]s; a writer
//! task batches them and writes them as line protocol to `POST {url}/api/v2/write` (InfluxDB 2,
//! or VictoriaMetrics, which accepts the same endpoint) through the `influxdb2` client.
//!
//! What this crate must never do:
//! - block or fail the caller of `send`: when the store is down points wait in a bounded queue,
//!   and when the queue is full the *oldest* are dropped and counted ([`SinkStats`]), so ingest
//!   keeps running and can report the backlog;
//! - lose a batch to a transient failure: it is retried with jittered exponential backoff;
//! - panic on configuration: [`InfluxConfig::validate`] refuses what `influxdb2::Client::new`
//!   would panic on, or would silently rewrite;
//! - print the token: `InfluxConfig`'s `Debug` redacts it and no log or error carries it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tinyfleet_sink_influx::SinkError> {
//! use std::time::Duration;
//! use tinyfleet_sink_influx::{InfluxConfig, InfluxSink, Point};
//!
//! let config = InfluxConfig { url: "http://127.0.0.1:8086".into(), ..InfluxConfig::default() };
//! let (sink, _writer) = InfluxSink::spawn(config)?;
//! sink.send(vec![Point::new("drift", 1_700_000_000_000_000_000).tag("device", "d1").field("psi", 0.12)]);
//! sink.flush(Duration::from_secs(5)).await;
//! println!("{:?}", sink.stats());
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod point;
mod sink;

pub use config::{ConfigError, InfluxConfig, MAX_BATCH_SIZE};
pub use point::{FieldValue, Point, PointError};
pub use sink::{InfluxSink, SinkError, SinkStats, StatsReader};
