//! The OTA service's side of `tinyfleet serve`: answers devices' verified block requests (MQTT
//! block transfer), publishes the rollouts' retained offers, and feeds the rollouts with
//! ingest's progress reports and presence changes (this process's at once, every process's
//! through the store's change feed) and the monitor's evaluated windows.
//!
//! Ingest verifies and deduplicates `tf/v1/{device}/ota/breq` like every device message and
//! hands each request over at once ([`Pipeline::on_block_request`]); it does not wait for a
//! commit, since a block request changes no state and a device waits for the answer. The
//! hand-over is a bounded queue: when it is full, requests are dropped and counted (the device
//! asks again after its retry interval) instead of slowing ingest down.
//!
//! [`Pipeline::on_block_request`]: tinyfleet_ingest::pipeline::Pipeline::on_block_request

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tinyfleet_drift::engine::{DeviceWindow, feature_psi};
use tinyfleet_drift::profile::MonitoringProfile;
use tinyfleet_ingest::aggregate::WindowAgg;
use tinyfleet_ingest::pipeline::{BlockRequestEvent, BlockRequestHook, Events};
use tinyfleet_ingest::shell::EventSink;
use tinyfleet_ota_service::Ota;
use tinyfleet_ota_service::blocks::{self, BlockError};
use tinyfleet_ota_service::rollout::{ProgressReport, QualityObservation};
use tinyfleet_ota_service::service::{OfferSink, Rollouts};
use tinyfleet_store::Store;
use tokio::sync::{mpsc, watch};

/// Requests waiting for an answer at most.
const QUEUE: usize = 4096;
/// A request older than this (replayed from the journal after a restart, or stuck behind a
/// backlog) is not answered: the device has asked again by then.
const STALE_MS: i64 = 30_000;

/// Counters of the block server, for `/metrics`.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub sent: AtomicU64,
    pub unknown_object: AtomicU64,
    pub bad_range: AtomicU64,
    pub dropped: AtomicU64,
    pub stale: AtomicU64,
    pub failed: AtomicU64,
}

impl BlockCounters {
    pub fn render_prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP tinyfleet_ota_blocks_total MQTT block requests by outcome.\n\
             # TYPE tinyfleet_ota_blocks_total counter\n",
        );
        for (result, n) in [
            ("sent", &self.sent),
            ("unknown_object", &self.unknown_object),
            ("bad_range", &self.bad_range),
            ("dropped", &self.dropped),
            ("stale", &self.stale),
            ("failed", &self.failed),
        ] {
            out.push_str(&format!(
                "tinyfleet_ota_blocks_total{{result=\"{result}\"}} {}\n",
                n.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// The hook for ingest and the queue it fills.
pub fn block_queue(
    counters: Arc<BlockCounters>,
) -> (BlockRequestHook, mpsc::Receiver<BlockRequestEvent>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let hook: BlockRequestHook = Arc::new(move |req| {
        if tx.try_send(req).is_err() {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    });
    (hook, rx)
}

/// Answers queued block requests until `shutdown`: reads the block from the artifacts (on a
/// blocking thread) and publishes it on `tf/v1/{device}/ota/blk`.
pub async fn serve_blocks(
    ota: Arc<Ota>,
    mqtt: AsyncClient,
    mut rx: mpsc::Receiver<BlockRequestEvent>,
    counters: Arc<BlockCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let req = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        if tinyfleet_store::now_ms() - req.received_ms > STALE_MS {
            counters.stale.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let ota = ota.clone();
        let answer = tokio::task::spawn_blocking(move || {
            blocks::answer(
                ota.artifacts(),
                &req.device,
                &req.object,
                req.offset,
                req.len,
            )
            .map_err(|e| (req.device, e))
        })
        .await;
        match answer {
            Ok(Ok((topic, body))) => match mqtt.publish(topic, QoS::AtLeastOnce, false, body).await
            {
                Ok(()) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "block not published");
                }
            },
            Ok(Err((device, e))) => {
                let counter = match &e {
                    BlockError::UnknownObject(_) => &counters.unknown_object,
                    BlockError::Offset { .. } | BlockError::Length(_) => &counters.bad_range,
                    BlockError::Io(_) => &counters.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%device, error = %e, "block request refused");
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "block task failed");
            }
        }
    }
}

/// Offers as retained MQTT messages on `tf/v1/{device}/ota/offer` (an empty one withdraws).
/// Publishing goes through an unbounded queue to a task, so the rollout engine (synchronous,
/// on a blocking thread) never waits for the connection and never loses an offer to a full
/// client queue.
#[derive(Debug)]
pub struct MqttOffers {
    tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
}

impl MqttOffers {
    /// The sink and the task that publishes for it until `shutdown`.
    pub fn spawn(
        mqtt: AsyncClient,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let task = tokio::spawn(async move {
            loop {
                let (topic, body) = tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => m,
                        None => return,
                    },
                    _ = shutdown.changed() => return,
                };
                if let Err(e) = mqtt.publish(topic, QoS::AtLeastOnce, true, body).await {
                    tracing::warn!(error = %e, "offer not published");
                }
            }
        });
        (Self { tx }, task)
    }
}

impl OfferSink for MqttOffers {
    fn publish(&self, device: &str, offer: Option<Vec<u8>>) {
        let topic = format!("tf/v1/{device}/ota/offer");
        if self.tx.send((topic, offer.unwrap_or_default())).is_err() {
            tracing::warn!(%device, "offer not published: shutting down");
        }
    }
}

/// Ingest's committed events for the rollouts: progress reports, and the devices whose
/// presence or hello changed. Queued for [`feed_rollouts`] (sinks must not block); events
/// that arrive before the rollouts are open wait in the queue.
///
/// This is the fast path for what this process's own ingest commits; [`feed_rollouts`] also
/// reads the store's change feed, which holds what every process (ingest replicas included)
/// commits.
#[derive(Debug)]
pub struct RolloutFeed {
    tx: mpsc::UnboundedSender<FeedItem>,
}

type FeedItem = (Vec<ProgressReport>, Vec<String>);

/// The receiving end of a [`RolloutFeed`].
pub type RolloutFeedRx = mpsc::UnboundedReceiver<FeedItem>;

impl RolloutFeed {
    pub fn new() -> (Self, RolloutFeedRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }
}

/// How often [`feed_rollouts`] reads the store's change feed.
pub const FEED_POLL: Duration = Duration::from_secs(1);
/// Changes read at most per store call (a full page is followed by the next at once).
const FEED_PAGE: u32 = 1000;
/// Where the change feed's cursor is kept (a service-state entry), so a restarted `all`
/// process carries on after the last change the rollouts took.
pub const FEED_CURSOR: &str = "rollouts/feed_cursor";
/// Reads of one page that may fail to reach the rollouts (a store error, a rollout not saved)
/// before the feed moves past it (logged), so a lasting fault cannot stall it forever.
const FEED_RETRIES: u32 = 30;

/// Feeds the rollouts until `shutdown`, from two sources, one at a time:
///
/// - the in-process [`RolloutFeed`] of this process's own ingest, at once;
/// - every `poll` (and at once after a full page), the store's change feed
///   ([`Store::device_changes`]): the progress reports, presence changes and hellos committed
///   by any process, ingest replicas included, since the saved cursor ([`FEED_CURSOR`]).
///
/// Changes this process's ingest committed arrive twice; the rollouts skip a report they have
/// applied and a device showing nothing new ([`Rollouts::on_progress`],
/// [`Rollouts::on_devices_changed`]), so the second delivery changes and writes nothing. The
/// cursor is saved after the rollouts took a page (a page they could not save is read again),
/// so after a restart, or a crash between an ingest commit and the rollouts' save, nothing
/// committed meanwhile is missed.
pub async fn feed_rollouts(
    rollouts: Arc<Rollouts>,
    store: Store,
    mut rx: mpsc::UnboundedReceiver<FeedItem>,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut poll_tick = tokio::time::interval(poll);
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut feed = StoreFeed::default();
    let mut in_process = true;
    loop {
        tokio::select! {
            m = rx.recv(), if in_process => match m {
                Some((reports, devices)) => {
                    let rollouts = rollouts.clone();
                    let done = tokio::task::spawn_blocking(move || {
                        let now = tinyfleet_store::now_ms();
                        if !devices.is_empty() {
                            rollouts.on_devices_changed(&devices, now);
                        }
                        if !reports.is_empty() {
                            rollouts.on_progress(&reports, now);
                        }
                    })
                    .await;
                    if let Err(e) = done {
                        tracing::error!(error = %e, "rollout update failed");
                    }
                }
                // No ingest events any more (a replica's feed, or ingest stopped): the store
                // feed carries on.
                None => in_process = false,
            },
            _ = poll_tick.tick() => {
                loop {
                    let (rollouts, store, mut f) = (rollouts.clone(), store.clone(), feed);
                    match tokio::task::spawn_blocking(move || {
                        let more = f.step(&store, &rollouts);
                        (f, more)
                    })
                    .await
                    {
                        Ok((f, more)) => {
                            feed = f;
                            if !more || *shutdown.borrow() {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "rollout feed task failed");
                            break;
                        }
                    }
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Where the rollouts stand in the store's change feed.
#[derive(Debug, Clone, Copy, Default)]
struct StoreFeed {
    /// The last change number the rollouts took; `None` until read from the store.
    cursor: Option<i64>,
    /// Failed attempts at the page after `cursor`.
    failures: u32,
}

impl StoreFeed {
    /// Hands the next page of changes to the rollouts; returns whether more may follow at once.
    fn step(&mut self, store: &Store, rollouts: &Rollouts) -> bool {
        let cursor = match self.cursor {
            Some(c) => c,
            None => match load_cursor(store) {
                Ok(c) => *self.cursor.insert(c),
                Err(e) => {
                    tracing::warn!(error = %e, "rollout feed: cursor not read; retrying");
                    return false;
                }
            },
        };
        let page = match store.device_changes(cursor, FEED_PAGE) {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "rollout feed: changes not read; retrying");
                return false;
            }
        };
        if page.cursor == cursor {
            return false;
        }
        let now = tinyfleet_store::now_ms();
        let mut taken = true;
        if !page.devices.is_empty() {
            taken &= rollouts.on_devices_changed(&page.devices, now);
        }
        if !page.progress.is_empty() {
            let reports: Vec<ProgressReport> = page
                .progress
                .into_iter()
                .map(|o| ProgressReport {
                    device: o.id,
                    boot: o.boot,
                    seq: o.seq,
                    manifest_seq: o.manifest_seq,
                    state: o.state,
                    bytes: o.bytes,
                    error: o.error,
                })
                .collect();
            taken &= rollouts.on_progress(&reports, now);
        }
        if !taken {
            self.failures += 1;
            if self.failures < FEED_RETRIES {
                return false;
            }
            tracing::error!(
                from = cursor,
                to = page.cursor,
                "rollout feed: changes not taken after {FEED_RETRIES} attempts; moving on \
                 (the rollouts catch up at the devices' next reports)"
            );
        }
        self.failures = 0;
        self.cursor = Some(page.cursor);
        let value = page.cursor.to_string();
        if let Err(e) = store.put_service_state(&[(FEED_CURSOR, &value)], now) {
            // Kept in memory; the next page saves it (after a restart, changes since the last
            // saved cursor are taken again, which changes nothing).
            tracing::warn!(error = %e, "rollout feed: cursor not saved");
        }
        page.more
    }
}

/// The saved cursor, or 0 (the feed's start) when none was saved: the feed holds each device
/// at most once per kind, and what the rollouts took already changes nothing.
fn load_cursor(store: &Store) -> Result<i64, tinyfleet_store::StoreError> {
    Ok(match store.service_state(FEED_CURSOR)? {
        Some(v) => v.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(value = %v, "rollout feed: unreadable saved cursor; reading from the start");
            0
        }),
        None => 0,
    })
}

impl EventSink for RolloutFeed {
    fn publish(&self, events: &Events) {
        let reports: Vec<ProgressReport> = events
            .progress
            .iter()
            .map(|e| ProgressReport::from_progress(e.device.clone(), &e.progress))
            .collect();
        let mut devices: Vec<String> = events
            .presence
            .iter()
            .map(|p| p.device.clone())
            .chain(events.hellos.iter().cloned())
            .collect();
        devices.sort_unstable();
        devices.dedup();
        if !(reports.is_empty() && devices.is_empty()) {
            let _ = self.tx.send((reports, devices));
        }
    }
}

/// Runs [`Rollouts::tick`] every `every` until `shutdown`.
pub async fn tick_rollouts(
    rollouts: Arc<Rollouts>,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let r = rollouts.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || r.tick(tinyfleet_store::now_ms())).await
        {
            tracing::error!(error = %e, "rollout tick failed");
        }
    }
}

/// What each device window of an evaluated window says about its model, for the rollouts'
/// canary-vs-control gate: labelled accuracy, the CBPE estimate with the version's profile,
/// mean latency (bin midpoints of the profile's latency edges) and bad resets.
pub fn quality_observations(
    start: i64,
    windows: &[DeviceWindow],
    profiles: &HashMap<(String, String), MonitoringProfile>,
) -> Vec<QualityObservation> {
    windows
        .iter()
        .filter(|w| w.agg.summaries > 0)
        .map(|w| {
            let agg = &w.agg;
            let total: u64 = agg.confusion.iter().flatten().sum();
            let correct: u64 = agg
                .confusion
                .iter()
                .enumerate()
                .filter_map(|(i, row)| row.get(i))
                .sum();
            let profile = profiles.get(&(w.model_id.clone(), w.model_version.clone()));
            let estimated_accuracy = profile
                .and_then(|p| tinyfleet_drift::engine::cbpe(&agg.confidence, p))
                .map(|(accuracy, _)| accuracy);
            let mean_latency_us = profile
                .and_then(|p| p.latency.as_ref())
                .and_then(|edges| mean_of_bins(edges.lo, &edges.upper, &agg.latency.bins));
            let drift_score = profile.and_then(|p| mean_feature_psi(p, agg));
            QualityObservation {
                device: w.device.clone(),
                window_start_ms: start,
                on_version: w.model_version.clone(),
                labelled_correct: correct,
                labelled_total: total,
                estimated_accuracy,
                mean_latency_us,
                resets: agg.health.bad_resets,
                predicted_classes: agg.classes.clone(),
                drift_score,
            }
        })
        .collect()
}

/// The window's data drift against the version's profile: the mean over features of the PSI
/// the drift engine computes for each.
fn mean_feature_psi(profile: &MonitoringProfile, agg: &WindowAgg) -> Option<f64> {
    let scores: Vec<f64> = profile
        .features
        .iter()
        .zip(&agg.features)
        .filter_map(|(reference, current)| feature_psi(&reference.hist, &current.hist))
        .collect();
    (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64)
}

/// The mean of a histogram by bin midpoints (`None` when empty or when the edges do not fit).
fn mean_of_bins(lo: f32, upper: &[f32], bins: &[u64]) -> Option<f64> {
    if bins.len() != upper.len() {
        return None;
    }
    let (mut sum, mut n) = (0.0, 0u64);
    let mut lower = f64::from(lo);
    for (&count, &up) in bins.iter().zip(upper) {
        let up = f64::from(up);
        sum += count as f64 * (lower + up) / 2.0;
        n += count;
        lower = up;
    }
    (n > 0).then(|| sum / n as f64)
}
