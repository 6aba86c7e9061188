//! The synchronous core of ingest: verify -> decode -> dedup -> presence -> aggregate.
//!
//! [`Pipeline::handle`] applies one message to in-memory state (loaded from the store on first
//! use) and marks what changed; [`Pipeline::take_batch`] hands the changes to the store as one
//! transaction. The async shell acknowledges messages to the broker only after that commit, so a
//! crash between the two redelivers them and dedup drops what was already counted.
//!
//! The verify and decode stages are a separate, stateless [`Verifier`] ([`Pipeline::handle`] =
//! [`Verifier::verify`] then [`Pipeline::apply`]), so each side can be run and measured alone
//! (or the verify stage run ahead on another thread).
//!
//! Per-summary work is kept to what the summary changes: one cache entry per device holds its
//! replay windows, state, open windows and cohort keys (derived from the hello and the
//! registry's tags once, not per summary); cohort keys are interned; health stays typed until a
//! batch is taken; window aggregates are serialised to JSON only when a batch is taken, once per
//! changed window.
//!
//! Never blocks on anything but the store's own reads on a cache miss; never panics on input.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tinyfleet_device::decoded::DecodedSummary;
use tinyfleet_device::wire::{self, Health};
use tinyfleet_device::{DeviceKey, Kind};
use tinyfleet_store::{Batch, DeviceOta, DeviceState, Registry, Store, WindowWrite};

use crate::aggregate::{WindowAgg, window_start};
use crate::decode::{Decoder, DeviceMessage, KeyStore, Reject};
use crate::dedup::{self, ReplayWindow, Verdict};
use crate::metrics::{Drop, Metrics, kind_index};

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
    /// Keep summary events for sinks (off when nothing consumes them). Presence, hello and
    /// OTA progress events are always kept: they are few, and the OTA service needs them.
    pub collect_events: bool,
    /// Set when several ingest replicas share the store: this replica's counters are saved
    /// under `{replica}/{name}`, so replicas continue their own counts instead of overwriting
    /// each other's. `None`: plain names (one ingest per store).
    pub replica: Option<String>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            window_ms: 5 * 60_000,
            offline_after_ms: 15 * 60_000,
            max_payload: crate::decode::DEFAULT_MAX_PAYLOAD,
            collect_events: true,
            replica: None,
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

/// A verified, deduplicated OTA progress report, for the rollout engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressEvent {
    pub device: String,
    pub progress: wire::Progress,
    pub received_ms: i64,
}

/// A verified, deduplicated request for one block of an OTA object. Handed over as soon as it
/// is applied (see [`Pipeline::on_block_request`]), not with the batch: it changes no stored
/// state, and a device waits for the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequestEvent {
    pub device: String,
    pub object: [u8; 32],
    pub offset: u32,
    pub len: u16,
    pub received_ms: i64,
}

/// Receives block requests; must not block (hand them to a task).
pub type BlockRequestHook = Arc<dyn Fn(BlockRequestEvent) + Send + Sync>;

/// Events for sinks, produced alongside the store batch.
#[derive(Debug, Clone, Default)]
pub struct Events {
    pub summaries: Vec<SummaryEvent>,
    pub presence: Vec<PresenceEvent>,
    /// Devices whose hello (model, firmware, hardware) was newer than the one stored.
    pub hellos: Vec<String>,
    pub progress: Vec<ProgressEvent>,
}

/// The cohort a device without a hello yet belongs to.
pub const UNKNOWN_COHORT: &str = "unknown";

/// A device clock more than this far from ours is not trusted for event time.
const MAX_CLOCK_SKEW_MS: i64 = 24 * 3600 * 1000;

/// A verified and decoded message with its device, or why it was refused.
pub type Verified = Result<(String, DeviceMessage), Reject>;

/// The verify and decode stages: topic, size, key lookup, tag, strict decoding
/// ([`Decoder::decode`] against the registry). No state of its own and cheap to clone, so it
/// can also run on another thread ahead of [`Pipeline::apply`]; it counts nothing (the
/// pipeline counts a message when it applies it, so counters persist with its effects).
#[derive(Debug, Clone)]
pub struct Verifier {
    decoder: Decoder,
    registry: Registry,
}

impl Verifier {
    pub fn new(max_payload: usize, registry: Registry) -> Self {
        Self {
            decoder: Decoder::new(max_payload),
            registry,
        }
    }

    pub fn verify(&self, topic: &str, payload: &[u8]) -> Verified {
        self.decoder.decode(topic, payload, &self.registry)
    }
}

/// Message kinds with a sequence-number space of their own (device->cloud).
const KINDS: usize = 5;

/// What the pipeline keeps about one device between batches.
#[derive(Debug)]
struct DeviceEntry {
    id: String,
    /// Replay window per kind (`kind_index`), once accepted or read from the store.
    replay: [Option<ReplayWindow>; KINDS],
    /// Kinds whose replay window changed since the last batch (bit per `kind_index`).
    dirty_replay: u8,
    /// Kinds whose replay window was read (prefetched) from the store, found or not, so a
    /// `None` in `replay` needs no further read.
    replay_read: u8,
    /// A window start at which the store was found to hold no window of this device.
    window_absent: Option<i64>,
    /// Loaded from the store on the first accepted message.
    state: Option<DeviceState>,
    state_dirty: bool,
    /// Health of the newest summary, kept typed until the next batch serialises it into
    /// `state.health`.
    health: Option<Health>,
    /// Interned model cohort (`model@version/hw` or `unknown`); recomputed after a newer hello.
    cohort: Option<u32>,
    /// Interned tag cohorts (`tag:k=v`), and the tag epoch they were read in.
    tag_cohorts: Option<(u64, Vec<u32>)>,
    /// Open device windows (few: the current one and late or early ones).
    windows: Vec<DeviceWindowAgg>,
    /// Listed in `Pipeline::dirty_devices`.
    listed: bool,
    /// The newest summary `(boot, seq)` seen when the device's last will was applied (this
    /// process only). A later summary proves the connection lives on: rumqttd keeps one will
    /// per client id, so when a device reconnects before the broker has noticed its old
    /// connection died, the old connection's end fires the *new* connection's will.
    will_mark: Option<(u32, u32)>,
}

#[derive(Debug)]
struct DeviceWindowAgg {
    start: i64,
    /// The cohort recorded with the window (stored, or the device's when it opened).
    cohort: u32,
    agg: WindowAgg,
    dirty: bool,
}

#[derive(Debug)]
struct CohortWindowAgg {
    agg: WindowAgg,
    dirty: bool,
}

/// Interned cohort keys and the cohort windows.
#[derive(Debug, Default)]
struct Cohorts {
    ids: HashMap<String, u32>,
    names: Vec<String>,
    windows: HashMap<(u32, i64), CohortWindowAgg>,
    dirty: Vec<(u32, i64)>,
}

impl Cohorts {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or(UNKNOWN_COHORT, |n| n)
    }

    /// Adds a summary into the window of cohort `id` starting at `start` (read from the store
    /// on a cache miss).
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &mut self,
        store: &Store,
        read_failed: &mut bool,
        id: u32,
        start: i64,
        s: &DecodedSummary,
        new_boot: bool,
        lost: i64,
    ) {
        let name = self.names.get(id as usize).map_or(UNKNOWN_COHORT, |n| n);
        let w = self.windows.entry((id, start)).or_insert_with(|| {
            let agg = store
                .cohort_window(name, start)
                .unwrap_or_else(|e| {
                    *read_failed = true;
                    tracing::error!(error = %e, cohort = name, "cohort window not read");
                    None
                })
                .and_then(|w| serde_json::from_value(w.agg).ok())
                .unwrap_or_default();
            CohortWindowAgg { agg, dirty: false }
        });
        w.agg.merge_summary(s, new_boot, lost);
        if !w.dirty {
            w.dirty = true;
            self.dirty.push((id, start));
        }
    }
}

/// The pipeline's state and stages.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    verifier: Verifier,
    store: Store,
    metrics: Arc<Metrics>,
    slots: HashMap<String, usize>,
    devices: Vec<DeviceEntry>,
    cohorts: Cohorts,
    /// Devices with changes since the last batch.
    dirty_devices: Vec<usize>,
    /// Bumped by every batch: tag cohorts are read from the registry again after it.
    tags_epoch: u64,
    events: Events,
    /// Newest progress report per device since the last batch.
    ota: HashMap<String, DeviceOta>,
    block_requests: Option<Hook>,
    /// A store read failed since the last [`Pipeline::take_read_failed`]: some state was
    /// taken as absent that may exist, so the changes must not be committed.
    read_failed: bool,
}

/// The block-request hook, opaque to `Debug`.
struct Hook(BlockRequestHook);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockRequestHook")
    }
}

impl Pipeline {
    /// A pipeline over `store`, continuing the counters the store saved.
    pub fn new(config: PipelineConfig, store: Store, metrics: Arc<Metrics>) -> Self {
        if let Ok(saved) = store.counters() {
            match &config.replica {
                None => metrics.restore(&saved),
                Some(r) => {
                    let prefix = format!("{r}/");
                    let own = saved
                        .into_iter()
                        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_owned(), v)))
                        .collect();
                    metrics.restore(&own);
                }
            }
        }
        Self {
            verifier: Verifier::new(config.max_payload, store.registry().clone()),
            config,
            store,
            metrics,
            slots: HashMap::new(),
            devices: Vec::new(),
            cohorts: Cohorts::default(),
            dirty_devices: Vec::new(),
            tags_epoch: 0,
            events: Events::default(),
            ota: HashMap::new(),
            block_requests: None,
            read_failed: false,
        }
    }

    /// Where verified block requests go (the OTA service). Without a hook they are counted and
    /// dropped.
    pub fn on_block_request(&mut self, hook: BlockRequestHook) {
        self.block_requests = Some(Hook(hook));
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The verify and decode stages, to run ahead of [`Pipeline::apply`].
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Applies one message received at `received_ms` (server clock): [`Verifier::verify`],
    /// then [`Pipeline::apply`].
    pub fn handle(&mut self, topic: &str, payload: &[u8], received_ms: i64) -> Outcome {
        let verified = self.verifier.verify(topic, payload);
        self.apply(verified, received_ms)
    }

    /// Applies one verified message (or counts its refusal): dedup, presence, aggregation.
    pub fn apply(&mut self, verified: Verified, received_ms: i64) -> Outcome {
        self.metrics
            .received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (device, msg) = match verified {
            Ok(ok) => ok,
            Err(r) => {
                self.metrics.reject(r.as_str());
                return Outcome::Rejected(r);
            }
        };
        let kind = msg.kind();
        let Some(k) = kind_index(kind) else {
            // Cloud->device kinds; the decoder refuses them already.
            self.metrics.reject(Reject::WrongDirection.as_str());
            return Outcome::Rejected(Reject::WrongDirection);
        };
        let (boot, seq) = msg.boot_seq();
        let slot = self.slot(device);
        let Self {
            config,
            store,
            metrics,
            devices,
            cohorts,
            dirty_devices,
            tags_epoch,
            events,
            ota,
            block_requests,
            read_failed,
            ..
        } = self;
        // Slots index `devices`, which only grows.
        let entry = &mut devices[slot];
        let window = match entry.replay[k] {
            Some(w) => Some(w),
            None if entry.replay_read & (1 << k) != 0 => None,
            None => store
                .replay_window(&entry.id, k as u8)
                .unwrap_or_else(|e| read_error(read_failed, &entry.id, &e)),
        };
        let (new_window, lost, filled) = match dedup::check(window, boot, seq) {
            Verdict::Accept {
                window,
                lost,
                filled,
            } => (window, lost, filled),
            Verdict::Duplicate => return dropped(metrics, Drop::Duplicate),
            Verdict::TooOld => return dropped(metrics, Drop::TooOld),
            Verdict::StaleBoot => return dropped(metrics, Drop::StaleBoot),
        };
        entry.replay[k] = Some(new_window);
        entry.dirty_replay |= 1 << k;
        entry.state_dirty = true;
        if !entry.listed {
            entry.listed = true;
            dirty_devices.push(slot);
        }
        metrics.accept(kind);
        let collect = config.collect_events;
        let state = entry
            .state
            .get_or_insert_with(|| load_state(store, &entry.id, read_failed));
        state.last_seen_ms = Some(
            state
                .last_seen_ms
                .map_or(received_ms, |t| t.max(received_ms)),
        );
        state.updated_ms = received_ms;
        match msg {
            DeviceMessage::Hello(h) => {
                let at = (Some(h.boot), Some(h.seq));
                let current = (state.presence.hello_boot, state.presence.hello_seq);
                // Equal: the will of this very connection arrived first (dedup applies each
                // hello once). The hello still says what the device runs, but the connection
                // it opened has already ended.
                if at >= current {
                    if at > current {
                        state.presence.hello_boot = Some(h.boot);
                        state.presence.hello_seq = Some(h.seq);
                        set_online(events, state, true, "hello", received_ms);
                    }
                    state.fw = Some(h.fw);
                    state.model_id = Some(h.model_id);
                    state.model_version = Some(h.model_version);
                    state.model_seq = Some(h.model_seq);
                    state.hw = Some(h.hw);
                    state.caps = Some(h.caps);
                    events.hellos.push(entry.id.clone());
                    entry.cohort = None;
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
                    set_online(events, state, false, "will", received_ms);
                    let summaries = kind_index(Kind::Summary)
                        .and_then(|k| entry.replay[k])
                        .map_or((0, 0), |r| (r.boot, r.max_seq));
                    entry.will_mark = Some(summaries);
                }
            }
            DeviceMessage::Summary(s) => {
                let lost_net = i64::from(lost) - i64::from(filled);
                metrics
                    .lost_summaries
                    .fetch_add(lost_net, std::sync::atomic::Ordering::Relaxed);
                state.summaries += 1;
                state.lost_summaries = (state.lost_summaries as i64 + lost_net).max(0) as u64;
                let new_boot = state.health_boot.is_some_and(|b| s.boot > b);
                if (Some(s.boot), Some(s.seq)) > (state.health_boot, state.health_seq) {
                    entry.health = Some(s.health);
                    state.health_boot = Some(s.boot);
                    state.health_seq = Some(s.seq);
                    state.health_uptime_ms = Some(s.t_end_ms);
                }
                // Back online after a timeout; after a will only on proof that the connection
                // the will claimed ended is alive (a summary newer than any seen before it).
                let after_will = state.presence.offline_reason.as_deref() == Some("will");
                let alive = entry.will_mark.is_some_and(|m| (s.boot, s.seq) > m);
                if !state.presence.online && (!after_will || alive) {
                    set_online(events, state, true, "summary", received_ms);
                    entry.will_mark = None;
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
                let cohort = *entry.cohort.get_or_insert_with(|| {
                    match (&state.model_id, &state.model_version, &state.hw) {
                        (Some(m), Some(v), Some(h)) => {
                            cohorts.intern(&tinyfleet_store::cohort_key(m, v, h))
                        }
                        _ => cohorts.intern(UNKNOWN_COHORT),
                    }
                });
                if entry.tag_cohorts.as_ref().map(|t| t.0) != Some(*tags_epoch) {
                    let ids = store
                        .registry()
                        .tags(&entry.id)
                        .iter()
                        .map(|(k, v)| cohorts.intern(&format!("tag:{k}={v}")))
                        .collect();
                    entry.tag_cohorts = Some((*tags_epoch, ids));
                }
                let start = window_start(event_ms, config.window_ms);
                // The device window.
                let w = match entry.windows.iter().rposition(|w| w.start == start) {
                    Some(i) => &mut entry.windows[i],
                    None => {
                        let stored = (entry.window_absent != Some(start))
                            .then(|| {
                                store
                                    .device_window(&entry.id, start)
                                    .unwrap_or_else(|e| read_error(read_failed, &entry.id, &e))
                            })
                            .flatten()
                            .and_then(|w| Some((w.cohort, serde_json::from_value(w.agg).ok()?)));
                        let (cohort, agg) = match stored {
                            Some((c, agg)) => (cohorts.intern(&c), agg),
                            None => (cohort, WindowAgg::default()),
                        };
                        entry.windows.push(DeviceWindowAgg {
                            start,
                            cohort,
                            agg,
                            dirty: false,
                        });
                        let last = entry.windows.len() - 1;
                        &mut entry.windows[last]
                    }
                };
                w.agg.merge_summary(&s, new_boot, lost_net);
                w.dirty = true;
                // The model cohort's window and each tag cohort's.
                cohorts.merge(store, read_failed, cohort, start, &s, new_boot, lost_net);
                if let Some((_, tags)) = &entry.tag_cohorts {
                    for &t in tags {
                        cohorts.merge(store, read_failed, t, start, &s, new_boot, lost_net);
                    }
                }
                if collect {
                    events.summaries.push(SummaryEvent {
                        device: entry.id.clone(),
                        cohort: cohorts.name(cohort).to_owned(),
                        event_ms,
                        received_ms,
                        summary: Arc::from(s),
                        lost,
                    });
                }
            }
            DeviceMessage::Progress(p) => {
                let newer = ota
                    .get(&entry.id)
                    .is_none_or(|o| (p.boot, p.seq) > (o.boot, o.seq));
                if newer {
                    ota.insert(
                        entry.id.clone(),
                        DeviceOta {
                            id: entry.id.clone(),
                            boot: p.boot,
                            seq: p.seq,
                            manifest_seq: p.manifest_seq,
                            state: p.state,
                            bytes: p.bytes,
                            error: p.error,
                            received_ms,
                        },
                    );
                }
                events.progress.push(ProgressEvent {
                    device: entry.id.clone(),
                    progress: p,
                    received_ms,
                });
            }
            DeviceMessage::BlockRequest(r) => {
                if let Some(Hook(hook)) = block_requests {
                    hook(BlockRequestEvent {
                        device: entry.id.clone(),
                        object: r.object,
                        offset: r.offset,
                        len: r.len,
                        received_ms,
                    });
                }
            }
        }
        Outcome::Accepted(kind)
    }

    /// The cache slot of `device`, created empty on first sight.
    fn slot(&mut self, device: String) -> usize {
        if let Some(&slot) = self.slots.get(&device) {
            return slot;
        }
        let slot = self.devices.len();
        self.devices.push(DeviceEntry {
            id: device.clone(),
            replay: [None; KINDS],
            dirty_replay: 0,
            replay_read: 0,
            window_absent: None,
            state: None,
            state_dirty: false,
            health: None,
            cohort: None,
            tag_cohorts: None,
            windows: Vec::new(),
            listed: false,
            will_mark: None,
        });
        self.slots.insert(device, slot);
        slot
    }

    /// Marks devices silent for longer than `offline_after_ms` as offline (reason `timeout`).
    /// Returns how many changed.
    pub fn sweep_inactive(&mut self, now_ms: i64) -> usize {
        let before = now_ms - self.config.offline_after_ms;
        let mut slots: Vec<usize> = self
            .devices
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.state.as_ref().is_some_and(|s| {
                    s.presence.online && s.last_seen_ms.is_some_and(|t| t < before)
                })
            })
            .map(|(i, _)| i)
            .collect();
        if let Ok(stored) = self.store.silent_online_devices(before) {
            // Stored rows are stale for devices the cache holds; the cache decides for those.
            let stored: HashSet<String> = stored.into_iter().collect();
            for id in stored {
                let cached = self
                    .slots
                    .get(&id)
                    .and_then(|&i| self.devices.get(i))
                    .is_some_and(|e| e.state.is_some());
                if !cached {
                    slots.push(self.slot(id));
                }
            }
        }
        let mut changed = 0;
        for slot in slots {
            let Some(entry) = self.devices.get_mut(slot) else {
                continue;
            };
            let state = entry
                .state
                .get_or_insert_with(|| load_state(&self.store, &entry.id, &mut self.read_failed));
            if state.presence.online {
                set_online(&mut self.events, state, false, "timeout", now_ms);
                state.updated_ms = now_ms;
                entry.state_dirty = true;
                if !entry.listed {
                    entry.listed = true;
                    self.dirty_devices.push(slot);
                }
                changed += 1;
            }
        }
        changed
    }

    /// Whether a store read failed since the last call (see [`Pipeline::forget_cached`]).
    pub fn take_read_failed(&mut self) -> bool {
        std::mem::take(&mut self.read_failed)
    }

    /// Whether anything awaits a commit.
    pub fn has_changes(&self) -> bool {
        !(self.dirty_devices.is_empty() && self.cohorts.dirty.is_empty() && self.ota.is_empty())
    }

    /// The changes since the last batch, as one store transaction, and the sink events. Health
    /// and window aggregates are serialised here, once per changed device or window.
    pub fn take_batch(&mut self) -> (Batch, Events) {
        let mut batch = Batch::default();
        let mut buf = Vec::new();
        for slot in std::mem::take(&mut self.dirty_devices) {
            let Some(e) = self.devices.get_mut(slot) else {
                continue;
            };
            e.listed = false;
            for (k, w) in e.replay.iter().enumerate() {
                if e.dirty_replay & (1 << k) != 0
                    && let Some(w) = w
                {
                    batch.replay.push((e.id.clone(), k as u8, *w));
                }
            }
            e.dirty_replay = 0;
            if std::mem::take(&mut e.state_dirty)
                && let Some(state) = &mut e.state
            {
                if let Some(h) = e.health.take() {
                    state.health = serde_json::to_value(h).ok();
                }
                batch.states.push(state.clone());
            }
            for w in e.windows.iter_mut().filter(|w| w.dirty) {
                w.dirty = false;
                if let Some(json) = to_json(&mut buf, &w.agg) {
                    batch.device_windows.push(WindowWrite {
                        key: e.id.clone(),
                        start_ms: w.start,
                        cohort: Some(self.cohorts.name(w.cohort).to_owned()),
                        json,
                    });
                }
            }
        }
        for key in std::mem::take(&mut self.cohorts.dirty) {
            if let Some(w) = self.cohorts.windows.get_mut(&key) {
                w.dirty = false;
                if let Some(json) = to_json(&mut buf, &w.agg) {
                    batch.cohort_windows.push(WindowWrite {
                        key: self.cohorts.name(key.0).to_owned(),
                        start_ms: key.1,
                        cohort: None,
                        json,
                    });
                }
            }
        }
        batch.ota = self.ota.drain().map(|(_, o)| o).collect();
        // The rollouts' change feed: every device whose presence or hello changed (progress
        // reports are in `ota`), whichever replica commits it.
        batch.changed = self
            .events
            .presence
            .iter()
            .map(|p| p.device.clone())
            .chain(self.events.hellos.iter().cloned())
            .collect();
        batch.changed.sort_unstable();
        batch.changed.dedup();
        batch.counters = self.metrics.snapshot();
        if let Some(r) = &self.config.replica {
            for (name, _) in &mut batch.counters {
                *name = format!("{r}/{name}");
            }
        }
        self.tags_epoch += 1;
        (batch, std::mem::take(&mut self.events))
    }

    /// Forgets cached windows that ended before the one holding `now_ms` minus one window
    /// (late summaries for them are read back from the store). Call after a commit.
    pub fn evict_old_windows(&mut self, now_ms: i64) {
        let keep_from = window_start(now_ms, self.config.window_ms) - self.config.window_ms;
        for e in &mut self.devices {
            e.windows.retain(|w| w.start >= keep_from || w.dirty);
        }
        self.cohorts
            .windows
            .retain(|k, w| k.1 >= keep_from || w.dirty);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Forgets everything read from the store (replay windows, device states, open device and
    /// cohort windows), so the next messages read it fresh. For ingest replicas that share a
    /// store: call at the start of each batch, under [`Store::exclusive`], when nothing awaits
    /// a commit. What only this process can know (a will's mark) is kept.
    pub fn forget_cached(&mut self) {
        debug_assert!(
            !self.has_changes(),
            "forget_cached with uncommitted changes"
        );
        for e in &mut self.devices {
            e.replay = [None; KINDS];
            e.dirty_replay = 0;
            e.replay_read = 0;
            e.window_absent = None;
            e.state = None;
            e.state_dirty = false;
            e.health = None;
            e.cohort = None;
            e.tag_cohorts = None;
            e.windows.clear();
        }
        self.cohorts.windows.clear();
    }

    /// Reads the state, replay windows and the device window at `window_at_ms` of `ids` in
    /// three bulk reads (a network round trip each on PostgreSQL) instead of a few reads per
    /// device as messages arrive. For replicas sharing a store, after [`Pipeline::forget_cached`].
    /// A failed read leaves the devices to the per-message reads.
    pub fn prefetch(&mut self, ids: &[&str], window_at_ms: i64) {
        if ids.is_empty() {
            return;
        }
        let start = window_start(window_at_ms, self.config.window_ms);
        let (Ok(states), Ok(replays), Ok(windows)) = (
            self.store.device_states(ids),
            self.store.replay_windows(ids),
            self.store.device_windows_at(ids, start),
        ) else {
            return;
        };
        for id in ids {
            let slot = self.slot((*id).to_owned());
            let e = &mut self.devices[slot];
            if e.state.is_none() {
                e.state = Some(DeviceState {
                    id: (*id).to_owned(),
                    ..DeviceState::default()
                });
            }
            e.replay_read = u8::MAX;
            e.window_absent = Some(start);
        }
        for state in states {
            let slot = self.slot(state.id.clone());
            self.devices[slot].state = Some(state);
        }
        for (id, kind, window) in replays {
            let slot = self.slot(id);
            if let Some(r) = self.devices[slot].replay.get_mut(kind as usize) {
                *r = Some(window);
            }
        }
        for w in windows {
            let Ok(agg) = serde_json::from_value(w.agg) else {
                continue;
            };
            let cohort = self.cohorts.intern(&w.cohort);
            let slot = self.slot(w.id.clone());
            let e = &mut self.devices[slot];
            e.window_absent = None;
            e.windows.push(DeviceWindowAgg {
                start: w.start_ms,
                cohort,
                agg,
                dirty: false,
            });
        }
    }
}

fn dropped(metrics: &Metrics, d: Drop) -> Outcome {
    metrics.reject(d.as_str());
    Outcome::Dropped(d)
}

/// A device's stored state, or a fresh one (also when the read failed: `read_failed` is set,
/// and the batch must not be committed).
fn load_state(store: &Store, device: &str, read_failed: &mut bool) -> DeviceState {
    store
        .device_state(device)
        .unwrap_or_else(|e| read_error(read_failed, device, &e))
        .unwrap_or_else(|| DeviceState {
            id: device.to_owned(),
            ..DeviceState::default()
        })
}

/// Notes a failed store read: what was read is unknown, not absent.
fn read_error<T>(
    read_failed: &mut bool,
    device: &str,
    e: &tinyfleet_store::StoreError,
) -> Option<T> {
    *read_failed = true;
    tracing::error!(device, error = %e, "device data not read from the store");
    None
}

fn set_online(
    events: &mut Events,
    state: &mut DeviceState,
    online: bool,
    reason: &'static str,
    at: i64,
) {
    let changed = state.presence.online != online;
    state.presence.online = online;
    state.presence.offline_reason = (!online).then(|| reason.to_owned());
    if changed {
        events.presence.push(PresenceEvent {
            device: state.id.clone(),
            online,
            reason,
            at_ms: at,
        });
    }
}

/// The JSON of a window aggregate, through a reused buffer (one allocation of the right size).
fn to_json(buf: &mut Vec<u8>, agg: &WindowAgg) -> Option<String> {
    buf.clear();
    serde_json::to_writer(&mut *buf, agg).ok()?;
    String::from_utf8(buf.clone()).ok()
}
