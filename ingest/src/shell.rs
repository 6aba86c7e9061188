//! The async shell around the pipeline: batch, commit, then acknowledge.
//!
//! Messages arrive on a bounded channel (backpressure reaches the MQTT connection, and through
//! it the broker, instead of growing memory). The shell applies each to the [`Pipeline`], and
//! every `max_batch` messages or `flush_interval` it commits the changes in one store
//! transaction and only then acknowledges the messages (QoS 1 PUBACK). A crash before the
//! commit leaves them unacknowledged; the broker redelivers them and dedup drops what was
//! already counted. A failed commit is retried with backoff from the store's state; nothing is
//! acknowledged until it succeeds.
//!
//! Sinks (the time-series store) get the batch's events after the commit; they must not block.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tinyfleet_broker::client::{AckToken, Acker};
use tokio::sync::{mpsc, watch};

use crate::pipeline::{Events, Pipeline};

/// One message from the broker, with the way to acknowledge it.
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Server receive time, ms since the epoch.
    pub received_ms: i64,
    /// The MQTT acknowledgement, sent only after the message's effects are committed.
    pub ack: Option<(Acker, AckToken)>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("topic", &self.topic)
            .field("len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Where committed events go (time-series store, drift engine). Must not block.
pub trait EventSink: Send + Sync {
    fn publish(&self, events: &Events);
}

/// Settings of the shell.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// Most messages in one commit (batches are otherwise what is waiting when the previous
    /// commit ends).
    pub max_batch: usize,
    /// Wake-up interval for housekeeping and shutdown when no message arrives.
    pub flush_interval: Duration,
    /// How often to run the inactivity sweep and window retention.
    pub housekeeping_interval: Duration,
    /// Windows older than this are deleted.
    pub retention: Duration,
}

impl Default for ShellConfig {
    fn default() -> Self {
        Self {
            max_batch: 2000,
            flush_interval: Duration::from_millis(100),
            housekeeping_interval: Duration::from_secs(30),
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Runs until `shutdown` turns true or the channel closes; commits what it has before returning.
pub async fn run(
    mut pipeline: Pipeline,
    mut rx: mpsc::Receiver<Incoming>,
    config: ShellConfig,
    sinks: Vec<Arc<dyn EventSink>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut acks: Vec<(Acker, AckToken)> = Vec::new();
    let mut tick = tokio::time::interval(config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_housekeeping = Instant::now();
    let metrics = pipeline.metrics().clone();
    loop {
        let mut closing = false;
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => {
                    apply(&mut pipeline, &mut acks, m);
                    // Greedy batching: take whatever else is already waiting, then commit. Under
                    // load a batch is what arrived during the previous commit; idle, a message
                    // is committed and acknowledged at once.
                    while acks.len() < config.max_batch {
                        match rx.try_recv() {
                            Ok(m) => apply(&mut pipeline, &mut acks, m),
                            Err(_) => break,
                        }
                    }
                    metrics.pending.store(acks.len() as u64, Ordering::Relaxed);
                }
                None => closing = true,
            },
            _ = tick.tick() => {}
            _ = shutdown.changed() => closing = true,
        }
        if last_housekeeping.elapsed() >= config.housekeeping_interval {
            last_housekeeping = Instant::now();
            let now = tinyfleet_store::now_ms();
            pipeline.sweep_inactive(now);
            let store = pipeline.store().clone();
            let before = now - config.retention.as_millis() as i64;
            match tokio::task::spawn_blocking(move || store.prune_windows(before)).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "pruning old windows failed"),
                Err(e) => tracing::warn!(error = %e, "pruning task failed"),
                Ok(Ok(_)) => {}
            }
        }
        commit(&mut pipeline, &mut acks, &sinks).await;
        if closing || *shutdown.borrow() {
            break;
        }
    }
}

fn apply(pipeline: &mut Pipeline, acks: &mut Vec<(Acker, AckToken)>, m: Incoming) {
    pipeline.handle(&m.topic, &m.payload, m.received_ms);
    if let Some(ack) = m.ack {
        acks.push(ack);
    }
}

/// Commits until it succeeds, then acknowledges and feeds the sinks.
async fn commit(
    pipeline: &mut Pipeline,
    acks: &mut Vec<(Acker, AckToken)>,
    sinks: &[Arc<dyn EventSink>],
) {
    if !pipeline.has_changes() && acks.is_empty() {
        return;
    }
    let metrics = pipeline.metrics().clone();
    let (batch, events) = pipeline.take_batch();
    let batch = Arc::new(batch);
    let mut delay = Duration::from_millis(50);
    loop {
        let store = pipeline.store().clone();
        let b = batch.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || store.commit(&b)).await;
        match result {
            Ok(Ok(())) => {
                metrics.commits.fetch_add(1, Ordering::Relaxed);
                metrics
                    .commit_seconds_sum_us
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                break;
            }
            Ok(Err(e)) => {
                metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "store commit failed; nothing acknowledged, retrying");
            }
            Err(e) => {
                metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "store commit task failed; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    // In receive order; the acker holds back any that would overtake an earlier message and
    // drops those of a connection that has since ended (the broker redelivers them).
    for (acker, token) in acks.drain(..) {
        if let Err(e) = acker.ack(token).await {
            tracing::warn!(error = %e, "acknowledgement not sent; the broker will redeliver");
        }
    }
    metrics.pending.store(0, Ordering::Relaxed);
    pipeline.evict_old_windows(tinyfleet_store::now_ms());
    for sink in sinks {
        sink.publish(&events);
    }
}
