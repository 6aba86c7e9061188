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

use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::pipeline::{Events, Pipeline, Verified};

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
    /// Journal mode: acknowledge after an fsync'd append to this file and checkpoint to the
    /// store every `checkpoint_interval` ([`crate::journal`]). `None`: commit every batch to
    /// the store before acknowledging it.
    pub journal: Option<std::path::PathBuf>,
    pub checkpoint_interval: Duration,
    /// Other ingest replicas (processes splitting one `$share/...` subscription) write the same
    /// store: each batch is applied and committed under [`Store::exclusive`] with device state
    /// read fresh ([`run_shared`]). Excludes the journal.
    pub shared_store: bool,
}

impl Default for ShellConfig {
    fn default() -> Self {
        Self {
            max_batch: 2000,
            flush_interval: Duration::from_millis(100),
            housekeeping_interval: Duration::from_secs(30),
            retention: Duration::from_secs(30 * 24 * 3600),
            journal: None,
            checkpoint_interval: Duration::from_secs(1),
            shared_store: false,
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
    if config.shared_store {
        return run_shared(pipeline, rx, config, sinks, shutdown).await;
    }
    let mut acks: Vec<(Acker, AckToken)> = Vec::new();
    let mut tick = tokio::time::interval(config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_housekeeping = Instant::now();
    let mut last_checkpoint = Instant::now();
    let metrics = pipeline.metrics().clone();
    let journal = match &config.journal {
        Some(path) => match open_and_replay(path, &mut pipeline).await {
            Ok(j) => {
                checkpoint(&mut pipeline, &j, &sinks).await;
                Some(j)
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e,
                    "cannot use the ingest journal; committing every batch instead");
                None
            }
        },
        None => None,
    };
    let mut encoded: Vec<u8> = Vec::new();
    // Journal mode keeps one append in flight while the next batch is received and applied, so
    // the broker's in-flight window (100 messages in rumqttd) holds two batches instead of one.
    let mut flushing: Option<Flush> = None;
    loop {
        let mut closing = false;
        let journaling = journal.is_some();
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => {
                    apply(&mut pipeline, &mut acks, journaling.then_some(&mut encoded), m);
                    // Greedy batching: take whatever else is already waiting, then make it
                    // durable. Under load a batch is what arrived meanwhile; idle, a message is
                    // made durable and acknowledged at once.
                    while acks.len() < config.max_batch {
                        match rx.try_recv() {
                            Ok(m) => apply(&mut pipeline, &mut acks, journaling.then_some(&mut encoded), m),
                            Err(_) => break,
                        }
                    }
                    metrics.pending.store(acks.len() as u64, Ordering::Relaxed);
                }
                None => closing = true,
            },
            done = async {
                match flushing.as_mut() {
                    Some(f) => (&mut f.task).await,
                    None => std::future::pending().await,
                }
            }, if flushing.is_some() => {
                if let (Some(f), Some(j)) = (flushing.take(), &journal) {
                    flushing = f.finished(done, j, &metrics).await;
                }
            }
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
        match &journal {
            Some(j) => {
                let checkpoint_due =
                    closing || last_checkpoint.elapsed() >= config.checkpoint_interval;
                if checkpoint_due {
                    // Everything applied must be durable and acknowledged before the
                    // checkpoint empties the journal.
                    if let Some(f) = flushing.take() {
                        f.complete(j, &metrics).await;
                    }
                    if !encoded.is_empty() {
                        let encoded = Arc::new(std::mem::take(&mut encoded));
                        let acks = std::mem::take(&mut acks);
                        Flush::start(j, encoded, acks).complete(j, &metrics).await;
                    }
                    send_acks(&mut acks, &metrics);
                    last_checkpoint = Instant::now();
                    checkpoint(&mut pipeline, j, &sinks).await;
                } else if flushing.is_none() && !encoded.is_empty() {
                    flushing = Some(Flush::start(
                        j,
                        Arc::new(std::mem::take(&mut encoded)),
                        std::mem::take(&mut acks),
                    ));
                }
            }
            None => commit(&mut pipeline, &mut acks, &sinks).await,
        }
        if closing || *shutdown.borrow() {
            break;
        }
    }
}

/// The shell of one of several ingest replicas sharing a store. Messages are verified and
/// decoded as they arrive (the costly, parallel part); each batch is then applied and committed
/// on a blocking thread under the store's exclusive `ingest` section, with every device state,
/// replay window and window aggregate read fresh from the store inside it. So a replay that
/// reaches another replica is refused there, and no replica overwrites an aggregate with a
/// stale copy. Acknowledgements follow the commit, as in [`run`].
async fn run_shared(
    mut pipeline: Pipeline,
    mut rx: mpsc::Receiver<Incoming>,
    config: ShellConfig,
    sinks: Vec<Arc<dyn EventSink>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pending: Vec<(Verified, i64)> = Vec::new();
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
                    let mut next = Some(m);
                    while let Some(m) = next.take() {
                        pending.push((pipeline.verifier().verify(&m.topic, &m.payload), m.received_ms));
                        acks.extend(m.ack);
                        if pending.len() < config.max_batch {
                            next = rx.try_recv().ok();
                        }
                    }
                    metrics.pending.store(pending.len() as u64, Ordering::Relaxed);
                }
                None => closing = true,
            },
            _ = tick.tick() => {}
            _ = shutdown.changed() => closing = true,
        }
        let housekeeping = last_housekeeping.elapsed() >= config.housekeeping_interval;
        if housekeeping {
            last_housekeeping = Instant::now();
        }
        if !pending.is_empty() || housekeeping {
            let batch = std::mem::take(&mut pending);
            let retention = config.retention;
            let step = tokio::task::spawn_blocking(move || {
                let events = locked_step(&mut pipeline, batch, housekeeping);
                if housekeeping {
                    let before = tinyfleet_store::now_ms() - retention.as_millis() as i64;
                    if let Err(e) = pipeline.store().prune_windows(before) {
                        tracing::warn!(error = %e, "pruning old windows failed");
                    }
                }
                (pipeline, events)
            });
            let events;
            (pipeline, events) = match step.await {
                Ok(done) => done,
                Err(e) => {
                    // Nothing of this batch was acknowledged; the broker redelivers it.
                    tracing::error!(error = %e, "ingest step failed; stopping ingest");
                    return;
                }
            };
            send_acks(&mut acks, &metrics);
            for sink in &sinks {
                sink.publish(&events);
            }
        }
        if closing || *shutdown.borrow() {
            break;
        }
    }
}

/// One batch of a replica sharing the store: hold the `ingest` section, read fresh, apply,
/// commit (retrying with backoff while holding the section: the batch was applied to what the
/// store holds now, and no other replica can change that meanwhile), release.
fn locked_step(pipeline: &mut Pipeline, batch: Vec<(Verified, i64)>, sweep: bool) -> Events {
    let metrics = pipeline.metrics().clone();
    let mut delay = Duration::from_millis(50);
    let _section = loop {
        match pipeline.store().exclusive("ingest") {
            Ok(guard) => break guard,
            Err(e) => {
                metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "cannot take the store's ingest section; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    // A failed read means some state was taken as absent: applying on it would overwrite
    // what the store holds. Then the batch is undone (changes and counters) and applied again
    // from fresh reads, still inside the section, after a backoff.
    let counters: std::collections::BTreeMap<String, i64> =
        metrics.snapshot().into_iter().collect();
    let mut delay = Duration::from_millis(50);
    loop {
        pipeline.forget_cached();
        let mut ids: Vec<&str> = batch
            .iter()
            .filter_map(|(v, _)| v.as_ref().ok().map(|(id, _)| id.as_str()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        pipeline.prefetch(&ids, tinyfleet_store::now_ms());
        for (verified, received_ms) in &batch {
            pipeline.apply(verified.clone(), *received_ms);
        }
        if sweep {
            pipeline.sweep_inactive(tinyfleet_store::now_ms());
        }
        if !pipeline.take_read_failed() {
            break;
        }
        let _ = pipeline.take_batch();
        metrics.restore(&counters);
        metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            retry_in_ms = delay.as_millis() as u64,
            "a store read failed; batch undone, nothing acknowledged, retrying"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    let any = !batch.is_empty();
    if !any && !pipeline.has_changes() {
        return Events::default();
    }
    let (batch, events) = pipeline.take_batch();
    let mut delay = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        match pipeline.store().commit(&batch) {
            Ok(()) => {
                metrics.commits.fetch_add(1, Ordering::Relaxed);
                metrics
                    .commit_seconds_sum_us
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                return events;
            }
            Err(e) => {
                metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "store commit failed; nothing acknowledged, retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A journal append running on a blocking thread, with the acknowledgements it releases.
struct Flush {
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    encoded: Arc<Vec<u8>>,
    acks: Vec<(Acker, AckToken)>,
    retry_delay: Duration,
}

impl Flush {
    fn start(journal: &SharedJournal, encoded: Arc<Vec<u8>>, acks: Vec<(Acker, AckToken)>) -> Self {
        let (j, e) = (journal.clone(), encoded.clone());
        Self {
            task: tokio::task::spawn_blocking(move || lock(&j).append(&e)),
            encoded,
            acks,
            retry_delay: Duration::from_millis(50),
        }
    }

    /// Handles the append's result: acknowledges on success, otherwise starts a retry (after a
    /// backoff) and returns it. A failed append may have written part of the batch; the retry
    /// writes it whole again, and replay drops the repeats as duplicates.
    async fn finished(
        mut self,
        result: Result<std::io::Result<()>, tokio::task::JoinError>,
        journal: &SharedJournal,
        metrics: &Metrics,
    ) -> Option<Self> {
        match result {
            Ok(Ok(())) => {
                send_acks(&mut self.acks, metrics);
                return None;
            }
            Ok(Err(err)) => {
                tracing::error!(error = %err, "journal append failed; nothing acknowledged, retrying")
            }
            Err(err) => tracing::error!(error = %err, "journal task failed; retrying"),
        }
        metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.retry_delay).await;
        let delay = (self.retry_delay * 2).min(Duration::from_secs(10));
        let mut next = Self::start(journal, self.encoded, self.acks);
        next.retry_delay = delay;
        Some(next)
    }

    /// Waits until the append (and any retries) succeeded and its messages are acknowledged.
    async fn complete(self, journal: &SharedJournal, metrics: &Metrics) {
        let mut flush = self;
        loop {
            let result = (&mut flush.task).await;
            match flush.finished(result, journal, metrics).await {
                Some(next) => flush = next,
                None => return,
            }
        }
    }
}

type SharedJournal = Arc<std::sync::Mutex<Journal>>;

fn lock(j: &SharedJournal) -> std::sync::MutexGuard<'_, Journal> {
    j.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens the journal and applies what it holds (messages since the last checkpoint).
async fn open_and_replay(
    path: &std::path::Path,
    pipeline: &mut Pipeline,
) -> std::io::Result<SharedJournal> {
    let path = path.to_owned();
    let (journal, records) = tokio::task::spawn_blocking(move || {
        let mut j = Journal::open(&path)?;
        let records = j.read_all()?;
        Ok::<_, std::io::Error>((j, records))
    })
    .await
    .map_err(std::io::Error::other)??;
    if !records.is_empty() {
        tracing::info!(records = records.len(), "replaying the ingest journal");
    }
    for r in records {
        pipeline.handle(&r.topic, &r.payload, r.received_ms);
    }
    Ok(Arc::new(std::sync::Mutex::new(journal)))
}

/// Commits the pipeline's state, then empties the journal it covers.
async fn checkpoint(
    pipeline: &mut Pipeline,
    journal: &SharedJournal,
    sinks: &[Arc<dyn EventSink>],
) {
    commit(pipeline, &mut Vec::new(), sinks).await;
    let j = journal.clone();
    match tokio::task::spawn_blocking(move || lock(&j).truncate()).await {
        Ok(Ok(())) => {}
        // Harmless: the next replay re-applies checkpointed messages as duplicates.
        Ok(Err(e)) => tracing::warn!(error = %e, "journal truncate failed"),
        Err(e) => tracing::warn!(error = %e, "journal truncate task failed"),
    }
}

/// Sends acknowledgements in receive order (see `Acker`). Never waits: a shell that waited here
/// for the MQTT connection's request channel, while the connection's task waited for room in
/// the shell's channel, would stop both for good (seen at 50,000 devices under disk load).
fn send_acks(acks: &mut Vec<(Acker, AckToken)>, metrics: &Metrics) {
    for (acker, token) in acks.drain(..) {
        acker.ack(token);
    }
    metrics.pending.store(0, Ordering::Relaxed);
}

fn apply(
    pipeline: &mut Pipeline,
    acks: &mut Vec<(Acker, AckToken)>,
    journal: Option<&mut Vec<u8>>,
    m: Incoming,
) {
    if let Some(buf) = journal {
        crate::journal::encode(buf, m.received_ms, &m.topic, &m.payload);
    }
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
    if pipeline.take_read_failed() {
        // One ingest per store: its cache is the truth and reads happen only on a device's
        // first message or after eviction. Say so loudly; the shared-store path retries.
        tracing::error!(
            "a store read failed in this batch: devices read then may have started from \
             empty state"
        );
    }
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
    send_acks(acks, &metrics);
    pipeline.evict_old_windows(tinyfleet_store::now_ms());
    for sink in sinks {
        sink.publish(&events);
    }
}
