//! The synchronous core of ingest: verify -> decode -> dedup -> presence -> aggregate.
//!
//! [`Pipeline::handle`] applies one message to in-memory state (loaded from the store on first
//! use) and marks what changed; [`Pipeline::take_batch`] hands the changes to the store as one
//! transaction. The async shell acknowledges messages to the broker only after that commit, so a
//! crash between the two redelivers them and dedup drops what was already counted.
//!
//! Never blocks on anything but the store's own reads on a cache miss; never panics on input.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tinyfleet_device::decoded::DecodedSummary;
use tinyfleet_device::{DeviceKey, Kind};
use tinyfleet_store::{Batch, DeviceState, Registry, Store, WindowWrite};

use crate::aggregate::{WindowAgg, window_start};
use crate::decode::{Decoder, DeviceMessage, KeyStore};
use crate::dedup::{self, ReplayWindow, Verdict};
use crate::metrics::{Drop, Metrics};

impl KeyStore for Registry {
    fn key(&self, device_id: &str) -> Option<DeviceKey> {
        self.mac_key(device_id)
    }
}

/// Settings of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Length of aggregation windows.
    pub window_ms: i64,
    /// A device silent this long is marked offline (reason `timeout`).
    pub offline_after_ms: i64,
    /// Largest accepted payload.
    pub max_payload: usize,
    /// Keep [`Events`] for sinks (off when nothing consumes them).
    pub collect_events: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            window_ms: 5 * 60_000,
            offline_after_ms: 15 * 60_000,
            max_payload: crate::decode::DEFAULT_MAX_PAYLOAD,
            collect_events: true,
        }
    }
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted(Kind),
    /// Verified but not applied (duplicate, replay, stale).
    Dropped(Drop),
    /// Refused by verification or decoding.
    Rejected(crate::decode::Reject),
}

/// An accepted summary, for sinks (time-series store, drift).
#[derive(Debug, Clone)]
pub struct SummaryEvent {
    pub device: String,
    pub cohort: String,
    pub event_ms: i64,
    pub received_ms: i64,
    pub summary: Arc<DecodedSummary>,
    /// Summaries skipped by this one's sequence number.
    pub lost: u32,
}

/// A presence change, for sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub device: String,
    pub online: bool,
    pub reason: &'static str,
    pub at_ms: i64,
}

/// Events for sinks, produced alongside the store batch.
#[derive(Debug, Clone, Default)]
pub struct Events {
    pub summaries: Vec<SummaryEvent>,
    pub presence: Vec<PresenceEvent>,
}

/// The cohort a device without a hello yet belongs to.
pub const UNKNOWN_COHORT: &str = "unknown";

/// A device clock more than this far from ours is not trusted for event time.
const MAX_CLOCK_SKEW_MS: i64 = 24 * 3600 * 1000;

/// The pipeline's state and stages.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    decoder: Decoder,
    store: Store,
    metrics: Arc<Metrics>,
    replay: HashMap<(String, u8), ReplayWindow>,
    states: HashMap<String, DeviceState>,
    device_windows: HashMap<(String, i64), (String, WindowAgg)>,
    cohort_windows: HashMap<(String, i64), WindowAgg>,
    dirty_replay: HashSet<(String, u8)>,
    dirty_states: HashSet<String>,
    dirty_device_windows: HashSet<(String, i64)>,
    dirty_cohort_windows: HashSet<(String, i64)>,
    events: Events,
}

fn kind_code(kind: Kind) -> u8 {
    crate::metrics::kind_index(kind).map_or(255, |i| i as u8)
}

impl Pipeline {
    /// A pipeline over `store`, continuing the counters the store saved.
    pub fn new(config: PipelineConfig, store: Store, metrics: Arc<Metrics>) -> Self {
        if let Ok(saved) = store.counters() {
            metrics.restore(&saved);
        }
        Self {
            decoder: Decoder::new(config.max_payload),
            config,
            store,
            metrics,
            replay: HashMap::new(),
            states: HashMap::new(),
            device_windows: HashMap::new(),
            cohort_windows: HashMap::new(),
            dirty_replay: HashSet::new(),
            dirty_states: HashSet::new(),
            dirty_device_windows: HashSet::new(),
            dirty_cohort_windows: HashSet::new(),
            events: Events::default(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Applies one message received at `received_ms` (server clock).
    pub fn handle(&mut self, topic: &str, payload: &[u8], received_ms: i64) -> Outcome {
        self.metrics
            .received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (device, msg) = match self.decoder.decode(topic, payload, self.store.registry()) {
            Ok(ok) => ok,
            Err(r) => {
                self.metrics.reject(r.as_str());
                return Outcome::Rejected(r);
            }
        };
        let kind = msg.kind();
        let (boot, seq) = msg.boot_seq();
        let key = (device.clone(), kind_code(kind));
        let window = match self.replay.get(&key) {
            Some(w) => Some(*w),
            None => self.store.replay_window(&device, key.1).ok().flatten(),
        };
        let (new_window, lost, filled) = match dedup::check(window, boot, seq) {
            Verdict::Accept {
                window,
                lost,
                filled,
            } => (window, lost, filled),
            Verdict::Duplicate => return self.drop(Drop::Duplicate),
            Verdict::TooOld => return self.drop(Drop::TooOld),
            Verdict::StaleBoot => return self.drop(Drop::StaleBoot),
        };
        self.replay.insert(key.clone(), new_window);
        self.dirty_replay.insert(key);
        self.metrics.accept(kind);
        let mut state = self.state(&device);
        state.last_seen_ms = Some(
            state
                .last_seen_ms
                .map_or(received_ms, |t| t.max(received_ms)),
        );
        state.updated_ms = received_ms;
        match msg {
            DeviceMessage::Hello(h) => {
                let newer = (Some(h.boot), Some(h.seq))
                    > (state.presence.hello_boot, state.presence.hello_seq);
                if newer {
                    state.presence.hello_boot = Some(h.boot);
                    state.presence.hello_seq = Some(h.seq);
                    state.fw = Some(h.fw);
                    state.model_id = Some(h.model_id);
                    state.model_version = Some(h.model_version);
                    state.model_seq = Some(h.model_seq);
                    state.hw = Some(h.hw);
                    state.caps = Some(h.caps);
                    self.set_online(&mut state, true, "hello", received_ms);
                }
            }
            DeviceMessage::Will(w) => {
                // A will ends the connection its hello opened; one for a newer connection than
                // the newest hello (the hello is still on its way) ends that one in advance.
                let at_least_current = (Some(w.boot), Some(w.seq))
                    >= (state.presence.hello_boot, state.presence.hello_seq);
                if at_least_current {
                    state.presence.hello_boot = Some(w.boot);
                    state.presence.hello_seq = Some(w.seq);
                    self.set_online(&mut state, false, "will", received_ms);
                }
            }
            DeviceMessage::Summary(s) => {
                let lost_net = i64::from(lost) - i64::from(filled);
                self.metrics
                    .lost_summaries
                    .fetch_add(lost_net, std::sync::atomic::Ordering::Relaxed);
                state.summaries += 1;
                state.lost_summaries = (state.lost_summaries as i64 + lost_net).max(0) as u64;
                let new_boot = state.health_boot.is_some_and(|b| s.boot > b);
                if (Some(s.boot), Some(s.seq)) > (state.health_boot, state.health_seq) {
                    state.health = serde_json::to_value(s.health).ok();
                    state.health_boot = Some(s.boot);
                    state.health_seq = Some(s.seq);
                    state.health_uptime_ms = Some(s.t_end_ms);
                }
                if !state.presence.online
                    && state.presence.offline_reason.as_deref() != Some("will")
                {
                    self.set_online(&mut state, true, "summary", received_ms);
                }
                let event_ms = match s.unix_s {
                    Some(u)
                        if (i64::try_from(u).unwrap_or(i64::MAX).saturating_mul(1000)
                            - received_ms)
                            .abs()
                            < MAX_CLOCK_SKEW_MS =>
                    {
                        u as i64 * 1000
                    }
                    _ => received_ms,
                };
                let cohort = match (&state.model_id, &state.model_version, &state.hw) {
                    (Some(m), Some(v), Some(h)) => tinyfleet_store::cohort_key(m, v, h),
                    _ => UNKNOWN_COHORT.to_owned(),
                };
                let start = window_start(event_ms, self.config.window_ms);
                let tags = self.store.registry().tags(&device);
                self.aggregate(&device, &cohort, &tags, start, &s, new_boot, lost_net);
                if self.config.collect_events {
                    self.events.summaries.push(SummaryEvent {
                        device: device.clone(),
                        cohort,
                        event_ms,
                        received_ms,
                        summary: Arc::from(s),
                        lost,
                    });
                }
            }
            // Handed to the OTA service when it lands; counted and deduplicated here.
            DeviceMessage::Progress(_) | DeviceMessage::BlockRequest(_) => {}
        }
        self.dirty_states.insert(device.clone());
        self.states.insert(device, state);
        Outcome::Accepted(kind)
    }

    fn drop(&self, d: Drop) -> Outcome {
        self.metrics.reject(d.as_str());
        Outcome::Dropped(d)
    }

    /// Takes a device's state out of the cache (or the store); put it back when done.
    fn state(&mut self, device: &str) -> DeviceState {
        if let Some(s) = self.states.remove(device) {
            return s;
        }
        self.store
            .device_state(device)
            .ok()
            .flatten()
            .unwrap_or_else(|| DeviceState {
                id: device.to_owned(),
                ..DeviceState::default()
            })
    }

    fn set_online(&mut self, state: &mut DeviceState, online: bool, reason: &'static str, at: i64) {
        let changed = state.presence.online != online;
        state.presence.online = online;
        state.presence.offline_reason = (!online).then(|| reason.to_owned());
        if changed && self.config.collect_events {
            self.events.presence.push(PresenceEvent {
                device: state.id.clone(),
                online,
                reason,
                at_ms: at,
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn aggregate(
        &mut self,
        device: &str,
        cohort: &str,
        tags: &std::collections::BTreeMap<String, String>,
        start: i64,
        s: &DecodedSummary,
        new_boot: bool,
        lost: i64,
    ) {
        let mut one = WindowAgg::default();
        one.add(s, new_boot);
        one.lost_summaries = lost;
        let dkey = (device.to_owned(), start);
        if !self.device_windows.contains_key(&dkey) {
            let stored = self
                .store
                .device_window(device, start)
                .ok()
                .flatten()
                .and_then(|w| Some((w.cohort, serde_json::from_value(w.agg).ok()?)));
            self.device_windows.insert(
                dkey.clone(),
                stored.unwrap_or_else(|| (cohort.to_owned(), WindowAgg::default())),
            );
        }
        if let Some((_, agg)) = self.device_windows.get_mut(&dkey) {
            agg.merge(&one);
        }
        self.dirty_device_windows.insert(dkey);
        let cohorts = std::iter::once(cohort.to_owned())
            .chain(tags.iter().map(|(k, v)| format!("tag:{k}={v}")));
        for c in cohorts {
            let ckey = (c, start);
            if !self.cohort_windows.contains_key(&ckey) {
                let stored = self
                    .store
                    .cohort_window(&ckey.0, start)
                    .ok()
                    .flatten()
                    .and_then(|w| serde_json::from_value(w.agg).ok());
                self.cohort_windows
                    .insert(ckey.clone(), stored.unwrap_or_default());
            }
            if let Some(agg) = self.cohort_windows.get_mut(&ckey) {
                agg.merge(&one);
            }
            self.dirty_cohort_windows.insert(ckey);
        }
    }

    /// Marks devices silent for longer than `offline_after_ms` as offline (reason `timeout`).
    /// Returns how many changed.
    pub fn sweep_inactive(&mut self, now_ms: i64) -> usize {
        let before = now_ms - self.config.offline_after_ms;
        let mut ids: HashSet<String> = self
            .states
            .values()
            .filter(|s| s.presence.online && s.last_seen_ms.is_some_and(|t| t < before))
            .map(|s| s.id.clone())
            .collect();
        if let Ok(stored) = self.store.silent_online_devices(before) {
            // Stored rows are stale for devices the cache holds; the cache decides for those.
            ids.extend(
                stored
                    .into_iter()
                    .filter(|id| !self.states.contains_key(id)),
            );
        }
        let mut changed = 0;
        for id in ids {
            let mut state = self.state(&id);
            if state.presence.online {
                self.set_online(&mut state, false, "timeout", now_ms);
                state.updated_ms = now_ms;
                self.dirty_states.insert(id.clone());
                changed += 1;
            }
            self.states.insert(id, state);
        }
        changed
    }

    /// Whether anything awaits a commit.
    pub fn has_changes(&self) -> bool {
        !(self.dirty_replay.is_empty()
            && self.dirty_states.is_empty()
            && self.dirty_device_windows.is_empty()
            && self.dirty_cohort_windows.is_empty())
    }

    /// The changes since the last batch, as one store transaction, and the sink events.
    pub fn take_batch(&mut self) -> (Batch, Events) {
        let mut batch = Batch::default();
        for key in self.dirty_replay.drain() {
            if let Some(w) = self.replay.get(&key) {
                batch.replay.push((key.0, key.1, *w));
            }
        }
        for id in self.dirty_states.drain() {
            if let Some(s) = self.states.get(&id) {
                batch.states.push(s.clone());
            }
        }
        for key in self.dirty_device_windows.drain() {
            if let Some((cohort, agg)) = self.device_windows.get(&key)
                && let Ok(json) = serde_json::to_string(agg)
            {
                batch.device_windows.push(WindowWrite {
                    key: key.0,
                    start_ms: key.1,
                    cohort: Some(cohort.clone()),
                    json,
                });
            }
        }
        for key in self.dirty_cohort_windows.drain() {
            if let Some(agg) = self.cohort_windows.get(&key)
                && let Ok(json) = serde_json::to_string(agg)
            {
                batch.cohort_windows.push(WindowWrite {
                    key: key.0,
                    start_ms: key.1,
                    cohort: None,
                    json,
                });
            }
        }
        batch.counters = self.metrics.snapshot();
        (batch, std::mem::take(&mut self.events))
    }

    /// Forgets cached windows that ended before the one holding `now_ms` minus one window
    /// (late summaries for them are read back from the store). Call after a commit.
    pub fn evict_old_windows(&mut self, now_ms: i64) {
        let keep_from = window_start(now_ms, self.config.window_ms) - self.config.window_ms;
        self.device_windows
            .retain(|k, _| k.1 >= keep_from || self.dirty_device_windows.contains(k));
        self.cohort_windows
            .retain(|k, _| k.1 >= keep_from || self.dirty_cohort_windows.contains(k));
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}
