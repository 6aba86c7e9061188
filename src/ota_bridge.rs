//! The OTA service's side of `tinyfleet serve`: answers devices' verified block requests (MQTT
//! block transfer), publishes the rollouts' retained offers, and feeds the rollouts with
//! ingest's progress reports and presence changes and the monitor's evaluated windows.
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

/// Applies the feed's items to the rollouts until `shutdown`.
pub async fn feed_rollouts(
    rollouts: Arc<Rollouts>,
    mut rx: mpsc::UnboundedReceiver<FeedItem>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (reports, devices) = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
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
