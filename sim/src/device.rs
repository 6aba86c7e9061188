//! One simulated device: monitor, MQTT session and OTA installer, across reboots.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use embedded_storage::nor_flash::{ErrorType, NorFlash, ReadNorFlash};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use sha2::{Digest as _, Sha256};
use tinyfleet_device::ota::boot::{self, ImageInfo};
use tinyfleet_device::ota::flash::FlashError;
use tinyfleet_device::ota::flash::{Layout, Region};
use tinyfleet_device::ota::installer::{Config, GoldenDigest, Installer, Next, Report, SelfTest};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey, verify_offer};
use tinyfleet_device::ota::patch::Patcher;
use tinyfleet_device::ota::sim::{Cut, SimError, SimFlash};
use tinyfleet_device::testkit::{ReferenceProfile, Rng, Sample, StreamParams, sample};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic, ota_state};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};
use tokio::sync::{mpsc, watch};

use crate::load::{Held, Load, Published};

/// Flash sector of the simulated part (nRF52-like: 4 KB sectors, 4-byte writes).
const SECTOR: u32 = 4096;
/// Largest patch block the simulated devices apply (the service's default block size, as on the
/// reference device of `scripts/size-probe.sh`).
const PATCH_BLOCK: usize = 512;
/// A block request without an answer is sent again after this long.
const BLOCK_RETRY: Duration = Duration::from_secs(3);

type Flash = SimFlash<4, 4096>;
/// MQTT publishes a device may have in flight (it sends one summary per interval, one block
/// request at a time and a few progress reports; rumqttc keeps a slot per possible one).
const MAX_INFLIGHT: u16 = 16;

/// A device's flash, copy-on-write: until its first program or erase it reads the factory
/// state shared by every device with the same factory image and layout, so a fleet that is
/// never offered an update holds no flash of its own (a copy is ~150 KB per device).
struct CowFlash {
    factory: Arc<Flash>,
    own: Option<Box<Flash>>,
}

impl CowFlash {
    /// The flash of a device leaving the factory: the image in slot 0, provisioned.
    fn factory(layout: &Layout, factory: &Factory) -> Result<Self, String> {
        type Key = ([u8; 32], u32, u32, u32);
        static SHARED: OnceLock<Mutex<HashMap<Key, Arc<Flash>>>> = OnceLock::new();
        let image = &factory.image;
        let sha256: [u8; 32] = Sha256::digest(image.as_slice()).into();
        let key = (
            sha256,
            image.len() as u32,
            factory.model_seq,
            layout.slots[0].len,
        );
        let shared = SHARED.get_or_init(Default::default);
        let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = shared.get(&key) {
            return Ok(Self {
                factory: f.clone(),
                own: None,
            });
        }
        let mut flash = Flash::new((layout.progress.start + layout.progress.len) as usize);
        flash.load(0, image);
        let info = ImageInfo {
            seq: factory.model_seq,
            size: image.len() as u32,
            sha256,
        };
        boot::provision(&mut flash, layout, 0, info).map_err(|e| format!("provision: {e:?}"))?;
        let flash = Arc::new(flash);
        shared.insert(key, flash.clone());
        Ok(Self {
            factory: flash,
            own: None,
        })
    }

    fn own(&mut self) -> &mut Flash {
        let factory = &self.factory;
        self.own
            .get_or_insert_with(|| Box::new(Flash::clone(factory)))
    }

    fn ops(&self) -> usize {
        self.own.as_ref().map_or(self.factory.ops(), |f| f.ops())
    }

    fn power_on(&mut self) {
        if let Some(f) = &mut self.own {
            f.power_on();
        }
    }

    fn cut_power_at(&mut self, op: usize, how: Cut) {
        self.own().cut_power_at(op, how);
    }
}

impl ErrorType for CowFlash {
    type Error = SimError;
}

impl ReadNorFlash for CowFlash {
    const READ_SIZE: usize = <Flash as ReadNorFlash>::READ_SIZE;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        match &mut self.own {
            Some(f) => f.read(offset, bytes),
            None => {
                let start = offset as usize;
                let src = start
                    .checked_add(bytes.len())
                    .and_then(|end| self.factory.bytes().get(start..end))
                    .ok_or(SimError::OutOfBounds)?;
                bytes.copy_from_slice(src);
                Ok(())
            }
        }
    }
    fn capacity(&self) -> usize {
        self.factory.capacity()
    }
}

impl NorFlash for CowFlash {
    const WRITE_SIZE: usize = <Flash as NorFlash>::WRITE_SIZE;
    const ERASE_SIZE: usize = <Flash as NorFlash>::ERASE_SIZE;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        self.own().erase(from, to)
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        self.own().write(offset, bytes)
    }
}

/// The device's flash with a power switch: armed with `n > 0`, the power goes during the
/// `n`-th program or erase from then on (0: disarmed).
struct Switched<'f> {
    flash: &'f mut CowFlash,
    armed: Arc<AtomicU32>,
}

impl ErrorType for Switched<'_> {
    type Error = SimError;
}

impl ReadNorFlash for Switched<'_> {
    const READ_SIZE: usize = <CowFlash as ReadNorFlash>::READ_SIZE;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        self.flash.read(offset, bytes)
    }
    fn capacity(&self) -> usize {
        self.flash.capacity()
    }
}

impl Switched<'_> {
    fn tick(&mut self) {
        match self.armed.load(Ordering::Relaxed) {
            0 => {}
            1 => {
                self.armed.store(0, Ordering::Relaxed);
                let at = self.flash.ops();
                self.flash.cut_power_at(at, Cut::Midway);
            }
            n => self.armed.store(n - 1, Ordering::Relaxed),
        }
    }
}

impl NorFlash for Switched<'_> {
    const WRITE_SIZE: usize = <CowFlash as NorFlash>::WRITE_SIZE;
    const ERASE_SIZE: usize = <CowFlash as NorFlash>::ERASE_SIZE;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        self.tick();
        self.flash.erase(from, to)
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        self.tick();
        self.flash.write(offset, bytes)
    }
}

type DevError = tinyfleet_device::ota::installer::Error<SimError>;

/// Whether an installer error is the simulated power cut (the device reboots) rather than a
/// fault (the device stops).
fn power_lost(e: &DevError) -> bool {
    matches!(
        e,
        tinyfleet_device::ota::installer::Error::Flash(FlashError::Flash(SimError::PowerLost))
            | tinyfleet_device::ota::installer::Error::Stale
    )
}

/// The image a device leaves the factory with.
#[derive(Debug, Clone)]
pub struct Factory {
    pub model_version: String,
    pub model_seq: u32,
    pub image: Arc<Vec<u8>>,
}

/// What the scenario's stream function is told.
#[derive(Debug, Clone, Copy)]
pub struct StreamContext<'a> {
    pub device: &'a str,
    pub hw: &'a str,
    pub model_version: &'a str,
    /// Summaries this device has sent so far (all boots).
    pub window: u64,
}

/// The data of a window.
pub type StreamFn = Arc<dyn Fn(&StreamContext<'_>) -> WindowData + Send + Sync>;

/// What a device's inferences look like in a window: each feature is N(shift, 1), and the model
/// is right with probability `accuracy` (confident when right, less when wrong).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowData {
    /// Covariate shift: added to each feature.
    pub shift: [f32; 8],
    pub accuracy: f64,
    /// Prior shift: with probability `.1` an inference's true class is `.0` (the model is as
    /// good as ever on it; the class mix is what changes).
    pub prior: Option<(usize, f64)>,
    /// Concept drift: with this probability a correct prediction's label turns out to be
    /// another class, while the prediction and its confidence stay as they were (inputs and
    /// confidences look the same; only labels tell).
    pub concept_flip: f64,
    /// A broken sensor: this feature reads this value (NaN for a dead one).
    pub stuck: Option<(usize, f32)>,
}

impl Default for WindowData {
    fn default() -> Self {
        Self {
            shift: [0.0; 8],
            accuracy: StreamParams::default().accuracy,
            prior: None,
            concept_flip: 0.0,
            stuck: None,
        }
    }
}

/// Another class than `c` (of 10), uniformly.
fn other_class(rng: &mut Rng, c: usize) -> usize {
    (c + 1 + (rng.next_u64() % 9) as usize) % 10
}

/// One inference drawn from `data`.
pub fn draw(rng: &mut Rng, data: &WindowData) -> Sample {
    let params = StreamParams {
        feature_shift: 0.0,
        accuracy: data.accuracy,
    };
    let mut s = sample(rng, &params);
    if let Some((class, p)) = data.prior
        && rng.uniform() < p
    {
        let correct = s.predicted == s.actual;
        s.actual = class % 10;
        s.predicted = if correct {
            s.actual
        } else {
            other_class(rng, s.actual)
        };
    }
    if data.concept_flip > 0.0 && s.predicted == s.actual && rng.uniform() < data.concept_flip {
        s.actual = other_class(rng, s.actual);
    }
    for (f, shift) in s.features.iter_mut().zip(data.shift) {
        *f += shift;
    }
    if let Some((feature, value)) = data.stuck
        && let Some(f) = s.features.get_mut(feature)
    {
        *f = value;
    }
    s
}

/// A reference data set drawn from `data` as the CSV `tinyfleet profile build` reads
/// (features `f0`..`f7`, `prediction`, `confidence`, `label`, `latency_us`).
pub fn reference_csv(data: &WindowData, rows: usize, seed: u64) -> String {
    use std::fmt::Write as _;
    let mut rng = Rng::new(seed);
    let mut out = String::from("f0,f1,f2,f3,f4,f5,f6,f7,prediction,confidence,label,latency_us\n");
    for _ in 0..rows {
        let s = draw(&mut rng, data);
        for f in s.features {
            let _ = write!(out, "{f},");
        }
        let _ = writeln!(
            out,
            "{},{},{},{}",
            s.predicted, s.confidence, s.actual, s.latency_us
        );
    }
    out
}

/// Whether the self-test passes: `(hardware, model version) -> pass`.
pub type SelfTestFn = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;
/// The bin edges a model version's monitor uses (they ship with the model).
pub type ProfileFn = Arc<dyn Fn(&str) -> Arc<ReferenceProfile> + Send + Sync>;

/// How a device behaves: its data and its models' quality.
#[derive(Clone)]
pub struct Behaviour {
    pub summary_interval: Duration,
    pub inferences: usize,
    /// Labelled inferences per window (ground truth arriving on the device).
    pub labelled: usize,
    pub stream: StreamFn,
    /// Whether the self-test of a model version passes on this device (a failing one is
    /// reverted).
    pub self_test: SelfTestFn,
    /// Bin edges per model version.
    pub profile: ProfileFn,
    /// Loses power once during its first install, part-way through the download: the
    /// installer resumes from its last checkpoint after the reboot.
    pub power_loss_in_install: bool,
    /// Drops off the network (no DISCONNECT: the broker publishes its will) from `.0` after
    /// start until `.1`, then reconnects.
    pub offline: Option<(Duration, Duration)>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("summary_interval", &self.summary_interval)
            .field("inferences", &self.inferences)
            .field("labelled", &self.labelled)
            .finish_non_exhaustive()
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            summary_interval: Duration::from_secs(10),
            inferences: 100,
            labelled: 0,
            stream: Arc::new(|_| WindowData::default()),
            self_test: Arc::new(|_, _| true),
            profile: {
                let reference = Arc::new(ReferenceProfile::default());
                Arc::new(move |_| reference.clone())
            },
            power_loss_in_install: false,
            offline: None,
        }
    }
}

/// One device: identity, credentials, hardware and what it trusts.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub id: String,
    pub password: String,
    pub mac_key: DeviceKey,
    pub hw: String,
    /// Firmware build number (offers may require a minimum).
    pub fw: u32,
    pub arena: u32,
    pub model_id: String,
    pub factory: Factory,
    /// Size of each of the two flash slots; rounded up to whole sectors.
    pub slot_size: u32,
    /// Keys that may sign offers: `(kid, Ed25519 public key)`.
    pub trusted: Vec<(Vec<u8>, [u8; 32])>,
    pub broker_host: String,
    pub broker_port: u16,
    pub seed: u64,
    pub behaviour: Behaviour,
}

/// Something a simulated device did, for tests and the demo's narrative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimEvent {
    pub device: String,
    pub kind: SimEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEventKind {
    /// Connected and said hello, running this model version.
    Online { boot: u32, model_version: String },
    /// A summary was acknowledged by the broker.
    Summary { seq: u32 },
    /// An offer arrived (`None`: it did not verify).
    Offer {
        seq: u32,
        model_version: Option<String>,
    },
    /// A progress report was sent.
    Progress(Report),
    /// The power went (during an install); the device reboots.
    PowerLost,
    /// The device dropped off the network.
    Offline,
    /// Something failed (connection refused, flash error).
    Error(String),
}

/// A device's counters for its sequence-number spaces in one boot.
#[derive(Default)]
struct Seqs {
    hello: u32,
    progress: u32,
    breq: u32,
}

fn layout(slot_size: u32) -> Layout {
    let slot = slot_size.div_ceil(SECTOR).max(1) * SECTOR;
    Layout {
        slots: [Region::new(0, slot), Region::new(slot, slot)],
        boot: Region::new(2 * slot, 2 * SECTOR),
        progress: Region::new(2 * slot + 2 * SECTOR, 2 * SECTOR),
    }
}

struct PassFail(bool);

impl SelfTest for PassFail {
    fn check(&mut self) -> bool {
        self.0
    }
    fn run(&mut self, _index: u16, _seen: &mut GoldenDigest) -> bool {
        self.0
    }
}

/// The device's MQTT side for one connection.
struct Link {
    client: AsyncClient,
    events: EventLoop,
    id: String,
    key: DeviceKey,
    boot: u32,
    /// Counts the connection as held while it lives (load runs).
    held: Held,
    /// Load runs: per QoS 1 publish handed to the client, in order, the summary's
    /// `(seq, sent at)` (`None` for other messages); matched to packet ids as the client
    /// writes them, then to PUBACKs.
    queued: VecDeque<Option<(u32, Instant)>>,
    in_flight: Vec<(u16, u32, Instant)>,
    load: Option<Load>,
}

impl Link {
    fn device(&self) -> Result<DeviceId<'_>, String> {
        DeviceId::new(&self.id).map_err(|e| format!("device id {:?}: {e:?}", self.id))
    }

    fn seal<T: serde::Serialize>(&self, kind: Kind, msg: &T) -> Result<(String, Vec<u8>), String> {
        seal(&self.id, &self.key, kind, msg)
    }

    fn send(&mut self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        self.publish(topic, payload, false)
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|e| format!("publish: {e}"))?;
        if self.load.is_some() {
            self.queued.push_back(None);
        }
        Ok(())
    }

    /// Sends summary `seq` of this boot (counted and, on a sampled device, timed).
    fn send_summary(&mut self, topic: String, payload: Vec<u8>, seq: u32) -> Result<(), String> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| format!("publish: {e}"))?;
        if let Some(load) = &self.load {
            let now = Instant::now();
            load.stats.summaries_sent.fetch_add(1, Ordering::Relaxed);
            if let Some(probe) = &load.probe {
                let _ = probe.send(Published {
                    device: Arc::from(self.id.as_str()),
                    boot: self.boot,
                    seq,
                    at: now,
                });
            }
            self.queued.push_back(Some((seq, now)));
        }
        Ok(())
    }

    /// Follows the client's events for the acknowledgement latency of summaries.
    fn track(&mut self, event: &Event) {
        let Some(load) = &self.load else { return };
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0 => {
                if let Some(Some((seq, at))) = self.queued.pop_front() {
                    self.in_flight.push((*pkid, seq, at));
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(i) = self.in_flight.iter().position(|(p, ..)| *p == ack.pkid) {
                    let (_, _, at) = self.in_flight.swap_remove(i);
                    load.stats.summaries_acked.fetch_add(1, Ordering::Relaxed);
                    load.stats.ack_latency.record(at.elapsed());
                }
            }
            _ => {}
        }
    }
}

/// A device->cloud message of `kind`, authenticated with the device's key: `(topic, payload)`.
fn seal<T: serde::Serialize>(
    id: &str,
    key: &DeviceKey,
    kind: Kind,
    msg: &T,
) -> Result<(String, Vec<u8>), String> {
    let device = DeviceId::new(id).map_err(|e| format!("device id {id:?}: {e:?}"))?;
    let mut out = [0u8; 512];
    let n = wire::seal(device, key, kind, msg, &mut out)
        .map_err(|e| format!("cannot seal a {kind:?}: {e:?}"))?;
    Ok((
        Topic::new(device, kind).as_str().to_owned(),
        out[..n].to_vec(),
    ))
}

/// Runs one device until `stop` turns true. Errors (a refused connection, a broken flash)
/// are reported as [`SimEventKind::Error`] and end the device.
pub async fn run(
    spec: DeviceSpec,
    events: Option<mpsc::UnboundedSender<SimEvent>>,
    stop: watch::Receiver<bool>,
) {
    run_with(spec, events, stop, None).await
}

/// [`run`], counting connections and summaries into `load` (a load test).
pub async fn run_with(
    spec: DeviceSpec,
    events: Option<mpsc::UnboundedSender<SimEvent>>,
    stop: watch::Receiver<bool>,
    load: Option<Load>,
) {
    let emit = |kind: SimEventKind| {
        if let Some(tx) = &events {
            let _ = tx.send(SimEvent {
                device: spec.id.clone(),
                kind,
            });
        }
    };
    if let Err(e) = life(&spec, &emit, stop, load.as_ref()).await {
        tracing::warn!(device = %spec.id, error = %e, "simulated device stopped");
        emit(SimEventKind::Error(e));
    }
}

async fn life(
    spec: &DeviceSpec,
    emit: &(dyn Fn(SimEventKind) + Sync),
    mut stop: watch::Receiver<bool>,
    load: Option<&Load>,
) -> Result<(), String> {
    let layout = layout(spec.slot_size);
    let image = &spec.factory.image;
    if image.len() as u32 > layout.slots[0].len {
        return Err(format!(
            "factory image of {} bytes does not fit a {}-byte slot",
            image.len(),
            layout.slots[0].len
        ));
    }
    let mut flash = CowFlash::factory(&layout, &spec.factory)?;
    let keys: Vec<TrustedKey<'_>> = spec
        .trusted
        .iter()
        .map(|(kid, public)| TrustedKey {
            kid,
            public: *public,
        })
        .collect();
    let config = Config {
        hw: &spec.hw,
        fw: spec.fw,
        arena: spec.arena,
        keys: &keys,
    };
    // Version names by seq, learned from verified offers (the device's own record of what it
    // installed).
    let mut versions: HashMap<u32, String> =
        HashMap::from([(spec.factory.model_seq, spec.factory.model_version.clone())]);
    let mut rng = Rng::new(spec.seed);
    let mut windows_sent = 0u64;
    let mut patcher = Patcher::<PATCH_BLOCK>::new();
    let mut boot_no = 0u32;
    let born = Instant::now();
    let mut power_cut_done = !spec.behaviour.power_loss_in_install;
    loop {
        boot_no += 1;
        flash.power_on();
        let booted = boot::boot(&mut flash, &layout).map_err(|e| format!("boot: {e:?}"))?;
        let started = Instant::now();
        let armed = Arc::new(AtomicU32::new(0));
        let switched = Switched {
            flash: &mut flash,
            armed: armed.clone(),
        };
        let mut inst = Installer::<_, PATCH_BLOCK>::open(switched, layout, config, &mut patcher)
            .map_err(|e| format!("installer: {e:?}"))?;
        let running = inst.boot_state().images[usize::from(booted.slot)].seq;
        let version = versions
            .get(&running)
            .cloned()
            .unwrap_or_else(|| format!("seq-{running}"));

        let mut seqs = Seqs::default();
        let mut link = open_link(spec, boot_no, &mut seqs, &version, running, load).await?;
        emit(SimEventKind::Online {
            boot: boot_no,
            model_version: version.clone(),
        });
        let offer_topic = format!("tf/v1/{}/ota/offer", spec.id);
        let blk_topic = format!("tf/v1/{}/ota/blk", spec.id);
        let report = |link: &mut Link, seqs: &mut Seqs, r: Report| -> Result<(), String> {
            let (t, p) = link.seal(Kind::Progress, &r.progress(link.boot, seqs.progress))?;
            seqs.progress += 1;
            emit(SimEventKind::Progress(r));
            link.send(t, p)
        };
        if let Some(r) = inst.take_report() {
            report(&mut link, &mut seqs, r)?;
        }
        if inst.next() == Next::SelfTest {
            let passes = (spec.behaviour.self_test)(&spec.hw, &version);
            let r = inst
                .self_test(&mut PassFail(passes))
                .map_err(|e| format!("self-test: {e:?}"))?;
            // (A power cut is only ever armed during a download.)
            if let Some(r) = r {
                report(&mut link, &mut seqs, r)?;
            }
        }

        let profile = (spec.behaviour.profile)(&version);
        let mut monitor =
            ReferenceMonitor::new(profile.config(running), boot_no, wire::reset::SOFTWARE, 0);
        let mut summary_tick = tokio::time::interval(spec.behaviour.summary_interval);
        summary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        summary_tick.tick().await;
        // The block request in flight: (object offset, sent at).
        let mut in_flight: Option<(u32, Instant)> = None;
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        // How this boot ends: a reboot asked by the installer (clean) or a power cut.
        let mut power_cut = false;
        let mut offline_at = spec
            .behaviour
            .offline
            .filter(|(from, _)| born.elapsed() < *from)
            .map(|(from, until)| (tokio::time::Instant::from_std(born + from), born + until));
        'boot: loop {
            // Do what the installer asks before waiting for anything.
            match inst.next() {
                Next::Fetch {
                    object,
                    offset,
                    block_size,
                    ..
                } => {
                    let due =
                        in_flight.is_none_or(|(o, at)| o != offset || at.elapsed() >= BLOCK_RETRY);
                    if due {
                        let req = wire::BlockRequest {
                            boot: link.boot,
                            seq: seqs.breq,
                            object: &object,
                            offset,
                            len: block_size,
                        };
                        seqs.breq += 1;
                        let (t, p) = link.seal(Kind::BlockRequest, &req)?;
                        link.send(t, p)?;
                        in_flight = Some((offset, Instant::now()));
                    }
                }
                Next::Switch => {
                    match inst.switch() {
                        Ok(Some(r)) => report(&mut link, &mut seqs, r)?,
                        Ok(None) => {}
                        Err(e) if power_lost(&e) => {
                            power_cut = true;
                            break 'boot;
                        }
                        Err(e) => return Err(format!("switch: {e:?}")),
                    }
                    continue;
                }
                Next::Reboot => break 'boot,
                Next::Idle | Next::SelfTest => {}
            }
            tokio::select! {
                ev = link.events.poll() => {
                if let Ok(ev) = &ev {
                    link.track(ev);
                }
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == offer_topic => {
                        if p.payload.is_empty() {
                            continue; // withdrawn
                        }
                        let mut scratch = vec![0u8; MAX_OFFER];
                        let seen = verify_offer(&p.payload, &keys, &mut scratch).ok();
                        let seq = seen.as_ref().map_or(0, |m| m.seq);
                        if let Some(m) = &seen {
                            versions.insert(m.seq, m.model_version.to_owned());
                        }
                        emit(SimEventKind::Offer {
                            seq,
                            model_version: seen.map(|m| m.model_version.to_owned()),
                        });
                        let r = match inst.offer(&p.payload, &mut scratch) {
                            Ok(r) => r,
                            Err(e) if power_lost(&e) => {
                                power_cut = true;
                                break 'boot;
                            }
                            Err(e) => return Err(format!("offer: {e:?}")),
                        };
                        in_flight = None;
                        if r.state == ota_state::ACCEPTED && !power_cut_done {
                            // Somewhere in the next few sectors of the download.
                            power_cut_done = true;
                            armed.store(3 + (rng.next_u64() % 40) as u32, Ordering::Relaxed);
                        }
                        report(&mut link, &mut seqs, r)?;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == blk_topic => {
                        let Ok(block) = wire::from_cbor::<wire::Block<'_>>(&p.payload) else {
                            continue;
                        };
                        if let Next::Fetch { object, offset, .. } = inst.next()
                            && block.object == object
                            && block.offset == offset
                        {
                            in_flight = None;
                            match inst.write(block.offset, block.data) {
                                Ok(Some(r)) => report(&mut link, &mut seqs, r)?,
                                Ok(None) => {}
                                Err(e) if power_lost(&e) => {
                                    power_cut = true;
                                    break 'boot;
                                }
                                Err(e) => return Err(format!("write: {e:?}")),
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) | Ok(_) => {}
                    Err(e) => {
                        // Same boot, new connection (a new hello and will).
                        tracing::debug!(device = %spec.id, error = %e, "connection lost; reconnecting");
                        link.held.lost();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        link = open_link(spec, boot_no, &mut seqs, &version, running, load).await?;
                        in_flight = None;
                    }
                }},
                _ = summary_tick.tick() => {
                    let ctx = StreamContext {
                        device: &spec.id,
                        hw: &spec.hw,
                        model_version: &version,
                        window: windows_sent,
                    };
                    let data = (spec.behaviour.stream)(&ctx);
                    for i in 0..spec.behaviour.inferences {
                        let s = draw(&mut rng, &data);
                        monitor
                            .record(&s.inference())
                            .map_err(|e| format!("record: {e:?}"))?;
                        if i < spec.behaviour.labelled {
                            monitor
                                .record_label(s.predicted, s.actual)
                                .map_err(|e| format!("label: {e:?}"))?;
                        }
                    }
                    monitor.set_battery_mv(3300 + (rng.next_u64() % 500) as u16);
                    monitor.set_rssi_dbm(-60 - (rng.next_u64() % 30) as i8);
                    let seq = monitor.next_seq();
                    let mut out = [0u8; 1024];
                    let uptime = started.elapsed().as_millis() as u64;
                    let device = link.device()?;
                    let n = monitor
                        .finish_window(uptime, None, device, &link.key, &mut out)
                        .map_err(|e| format!("summary: {e:?}"))?;
                    let topic = Topic::new(device, Kind::Summary).as_str().to_owned();
                    link.send_summary(topic, out[..n].to_vec(), seq)?;
                    windows_sent += 1;
                    emit(SimEventKind::Summary { seq });
                }
                _ = retry.tick() => {}
                _ = async {
                    match offline_at {
                        Some((at, _)) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // The radio goes: no DISCONNECT, the broker publishes the will.
                    let until = offline_at.take().map(|(_, until)| until);
                    drop(std::mem::replace(&mut link.events, dead_events(spec)));
                    link.held.lost();
                    emit(SimEventKind::Offline);
                    if let Some(until) = until {
                        tokio::select! {
                            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => {}
                            _ = stop.changed() => return Ok(()),
                        }
                    }
                    link = open_link(spec, boot_no, &mut seqs, &version, running, load).await?;
                    in_flight = None;
                }
                _ = stop.changed() => {
                    close(&mut link).await;
                    return Ok(());
                }
            }
        }
        drop(inst);
        if power_cut {
            // The connection dies with the power (the broker publishes the will).
            emit(SimEventKind::PowerLost);
            drop(link);
        } else {
            // A clean restart: the session ends without a will.
            close(&mut link).await;
        }
        if *stop.borrow() {
            return Ok(());
        }
    }
}

/// An event loop that never connected, to drop a live one in its place (the TCP connection
/// closes without DISCONNECT).
fn dead_events(spec: &DeviceSpec) -> EventLoop {
    let opts = MqttOptions::new(&spec.id, &spec.broker_host, spec.broker_port);
    AsyncClient::new(opts, 1).1
}

/// Disconnects cleanly (no will): sends DISCONNECT and drives the connection until the broker
/// has closed it, so the next connection (same client id) never overlaps this one: rumqttd
/// keeps one will per client id, and an overlap can fire the new connection's will.
async fn close(link: &mut Link) {
    if link.client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while link.events.poll().await.is_ok() {}
    })
    .await;
}

/// Connects (the will carrying the hello's `(boot, seq)`), says hello and subscribes to the
/// device's offer and block topics.
async fn open_link(
    spec: &DeviceSpec,
    boot: u32,
    seqs: &mut Seqs,
    version: &str,
    model_seq: u32,
    load: Option<&Load>,
) -> Result<Link, String> {
    let seq = seqs.hello;
    seqs.hello += 1;
    let mut link = connect(spec, boot, seq, load).await?;
    let hello = wire::Hello {
        boot,
        seq,
        fw: &spec.fw.to_string(),
        model_id: &spec.model_id,
        model_version: version,
        model_seq,
        hw: &spec.hw,
        caps: 0,
        reset: wire::reset::SOFTWARE,
        unix_s: None,
    };
    // Retained, like the will (docs/protocol.md, "Presence").
    let (t, p) = link.seal(Kind::Hello, &hello)?;
    link.publish(t, p, true)?;
    for kind in ["offer", "blk"] {
        link.client
            .try_subscribe(format!("tf/v1/{}/ota/{kind}", spec.id), QoS::AtLeastOnce)
            .map_err(|e| format!("subscribe: {e}"))?;
    }
    Ok(link)
}

/// Connects for connection `(boot, seq)` and waits for the broker's CONNACK (retrying with
/// backoff while the broker is unreachable; a refusal is an error).
async fn connect(
    spec: &DeviceSpec,
    boot: u32,
    seq: u32,
    load: Option<&Load>,
) -> Result<Link, String> {
    let mut delay = Duration::from_millis(200);
    let stats = load.map(|l| &l.stats);
    // rumqttc's default is 5 s (TCP connect to CONNACK).
    let timeout = load.map_or(Duration::from_secs(5), |l| l.connect_timeout);
    loop {
        let permit = match load.and_then(|l| l.connecting.clone()) {
            Some(gate) => gate.acquire_owned().await.ok(),
            None => None,
        };
        let attempt = Instant::now();
        let (topic, will) = seal(
            &spec.id,
            &spec.mac_key,
            Kind::Will,
            &wire::Will { boot, seq },
        )?;
        let mut opts = MqttOptions::new(&spec.id, &spec.broker_host, spec.broker_port);
        opts.set_credentials(&spec.id, &spec.password);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_max_packet_size(16 * 1024, 16 * 1024);
        opts.set_inflight(MAX_INFLIGHT);
        opts.set_last_will(LastWill::new(topic, will, QoS::AtLeastOnce, true));
        let (client, mut events) = AsyncClient::new(opts, 64);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(timeout.as_secs().max(1));
        events.set_network_options(network);
        let mut link = Link {
            client,
            events,
            id: spec.id.clone(),
            key: spec.mac_key.clone(),
            boot,
            held: Held::default(),
            queued: VecDeque::new(),
            in_flight: Vec::new(),
            load: load.cloned(),
        };
        loop {
            match tokio::time::timeout(timeout + Duration::from_secs(5), link.events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    if ack.code == rumqttc::ConnectReturnCode::Success {
                        link.held = Held::new(stats);
                        if let Some(s) = stats {
                            s.connect_latency.record(attempt.elapsed());
                        }
                        return Ok(link);
                    }
                    return Err(format!("connection refused: {:?}", ack.code));
                }
                Ok(Ok(_)) => continue,
                Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => {
                    return Err(format!("connection refused: {code:?}"));
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        drop(permit);
        if let Some(s) = stats {
            s.connect_failures.fetch_add(1, Ordering::Relaxed);
        }
        // Jittered (0.5-1.5x), so that devices refused together do not retry together.
        let jitter = 0.5 + Rng::new(spec.seed ^ attempt.elapsed().as_nanos() as u64).uniform();
        tokio::time::sleep(delay.mul_f64(jitter)).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
