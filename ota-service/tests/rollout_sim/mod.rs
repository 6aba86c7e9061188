//! An in-process simulated fleet and the shell around a [`Rollout`], for the rollout tests.
//!
//! Devices answer offers the way `device-client`'s installer does (accepted, downloading,
//! verified, switching, then after a reboot confirmed or reverted; failed during the download;
//! rejected when the seq is not above the installed one), after random delays, and their
//! reports reach the server after a random network delay, sometimes twice. Every window each
//! online device produces a quality observation from its running model's true accuracy, with
//! its predicted-class counts (each device its own class mix, its environment, shifted by the
//! running model's `class_skew`) and its drift score (each device its own level, plus the
//! running model's `drift`).
//! Everything is driven by a seeded RNG and explicit time: no sleeps, no threads.
//!
//! Simplifications: a device acts on an offer only the first time it sees that offer's seq (a
//! real one retries a failed install when the retained offer comes again); it finishes the
//! install under way before looking at a newer offer (a real one would restart the download
//! for a higher seq); devices that come online stay online.

#![allow(dead_code)]

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tinyfleet_device::wire::{from_cbor, ota_state, to_cbor};
use tinyfleet_ota_service::rollout::plan::{HOUR_MS, MINUTE_MS};
use tinyfleet_ota_service::rollout::{
    Action, AuditEvent, AuditRecord, DeviceInfo, Offer, Phase, ProgressReport, QualityObservation,
    Rollout, RolloutPlan, RolloutState, Stage, Step, VersionRef,
};

pub const MODEL: &str = "kws";
pub const HW: &str = "nrf52840";
pub const OTHER_HW: [&str; 2] = ["esp32s3", "rp2040"];

/// A model version's true behaviour on devices.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub seq: u32,
    pub accuracy: f64,
    /// Probability that an install fails (state 6) or the trial is reverted (state 7).
    pub fail: f64,
    pub revert: f64,
    /// Mean latency multiplier and bad resets per window.
    pub latency: f64,
    pub resets: f64,
    /// Extra share of the predictions going to class 0 (a model biased towards it).
    pub class_skew: f64,
    /// Added to the device's drift score (a model whose preprocessing no longer matches its
    /// monitoring profile).
    pub drift: f64,
}

impl Behaviour {
    pub fn good(seq: u32, accuracy: f64) -> Self {
        Self {
            seq,
            accuracy,
            fail: 0.0,
            revert: 0.0,
            latency: 1.0,
            resets: 0.0,
            class_skew: 0.0,
            drift: 0.0,
        }
    }
}

/// The fleet's make-up.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub devices: usize,
    pub seed: u64,
    /// Share of devices on the target hardware (the rest on other hardware).
    pub target_hw_share: f64,
    /// Share of target-hardware devices on an older version the rollout does not replace.
    pub legacy_share: f64,
    /// Share offline at the start (each returns at a random time within `return_within_ms`),
    /// and share never seen online.
    pub offline_share: f64,
    pub return_within_ms: i64,
    pub dead_share: f64,
    pub window_ms: i64,
    pub labels_per_window: u64,
    /// Predictions per device and window with their class counts (0: none reported).
    pub predictions_per_window: u64,
    /// Per-device variation of the class mix: each class's share times `exp(u)`, `u`
    /// uniform in `[-spread, spread]`.
    pub class_spread: f64,
    /// Whether devices report drift scores.
    pub drift_scores: bool,
    pub duplicate_prob: f64,
    /// Largest network delay of a report.
    pub max_net_delay_ms: i64,
    pub old: Behaviour,
    pub new: Behaviour,
}

impl FleetConfig {
    pub fn new(devices: usize, seed: u64, new: Behaviour) -> Self {
        Self {
            devices,
            seed,
            target_hw_share: 0.7,
            legacy_share: 0.05,
            offline_share: 0.05,
            return_within_ms: 6 * HOUR_MS,
            dead_share: 0.01,
            window_ms: 10 * MINUTE_MS,
            labels_per_window: 50,
            predictions_per_window: 200,
            class_spread: 0.5,
            drift_scores: true,
            duplicate_prob: 0.1,
            max_net_delay_ms: 2 * MINUTE_MS,
            old: Behaviour::good(1, 0.90),
            new,
        }
    }
}

/// The version names of the simulation.
pub const OLD: &str = "v1";
pub const NEW: &str = "v2";
pub const ROLLBACK: &str = "v1-rb";
pub const LEGACY: &str = "v0";

#[derive(Debug, Clone)]
pub struct SimDevice {
    pub id: String,
    pub hw: &'static str,
    pub running: (String, u32),
    pub online: bool,
    pub online_at: Option<i64>,
    pub boot: u32,
    pub prog_seq: u32,
    pub offset: f64,
    pub latency_base: f64,
    /// Offer seqs already acted on.
    pub seen_offers: Vec<u32>,
    /// The install under way: reports still to send, (due, state, error, bytes).
    pub script: Vec<(i64, u8, u16, u32)>,
    pub installing: Option<(String, u32)>,
    /// Last time the running version changed.
    pub switched_ms: i64,
    /// The class mix of the device's environment (shares summing to 1) and its drift level.
    pub class_mix: Vec<f64>,
    pub drift_level: f64,
}

/// The fleet's class prior (ten classes).
pub const CLASS_PRIOR: [f64; 10] = [0.2, 0.15, 0.12, 0.1, 0.1, 0.09, 0.08, 0.07, 0.05, 0.04];

impl SimDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.id.clone(),
            hw: Some(self.hw.to_owned()),
            tags: BTreeMap::new(),
            model_id: Some(MODEL.to_owned()),
            model_version: Some(self.running.0.clone()),
            online: self.online,
        }
    }
}

/// The simulated fleet with its broker (retained offers) and network.
#[derive(Debug)]
pub struct Fleet {
    pub config: FleetConfig,
    pub devices: Vec<SimDevice>,
    pub rng: SmallRng,
    /// Class counts and drift scores come from their own generator, so the rest of the
    /// simulation draws the same numbers with or without them.
    pub class_rng: SmallRng,
    /// The broker's retained offers per device.
    pub retained: BTreeMap<String, (String, u32)>,
    /// Reports in flight: (arrival, report).
    pub network: Vec<(i64, ProgressReport)>,
    /// Every report a device sent, in sending order, and every report delivered to the
    /// server with its arrival time.
    pub sent: Vec<ProgressReport>,
    pub delivered: Vec<(i64, ProgressReport)>,
    pub behaviours: BTreeMap<String, Behaviour>,
}

impl Fleet {
    pub fn new(config: FleetConfig) -> Self {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let mut class_rng = SmallRng::seed_from_u64(config.seed ^ 0x5eed_c1a5);
        let mut devices = Vec::with_capacity(config.devices);
        for i in 0..config.devices {
            let hw = if rng.random_bool(config.target_hw_share) {
                HW
            } else {
                OTHER_HW[rng.random_range(0..OTHER_HW.len())]
            };
            let running = if hw == HW && rng.random_bool(config.legacy_share) {
                (LEGACY.to_owned(), 0)
            } else {
                (OLD.to_owned(), config.old.seq)
            };
            let roll: f64 = rng.random();
            let (online, online_at) = if roll < config.dead_share {
                (false, None)
            } else if roll < config.dead_share + config.offline_share {
                (false, Some(rng.random_range(1..config.return_within_ms)))
            } else {
                (true, None)
            };
            devices.push(SimDevice {
                id: format!("dev-{i:05}"),
                hw,
                running,
                online,
                online_at,
                boot: 1,
                prog_seq: 0,
                offset: rng.random_range(-0.02..0.02),
                latency_base: match hw {
                    HW => 1_000.0,
                    _ => 700.0,
                } * rng.random_range(0.9..1.1),
                seen_offers: Vec::new(),
                script: Vec::new(),
                installing: None,
                switched_ms: i64::MIN,
                class_mix: class_mix(&mut class_rng, config.class_spread),
                drift_level: class_rng.random_range(0.02..0.06),
            });
        }
        let mut behaviours = BTreeMap::new();
        behaviours.insert(OLD.to_owned(), config.old.clone());
        behaviours.insert(LEGACY.to_owned(), Behaviour::good(0, 0.85));
        behaviours.insert(NEW.to_owned(), config.new.clone());
        let mut rb = config.old.clone();
        rb.seq = config.new.seq + 1;
        behaviours.insert(ROLLBACK.to_owned(), rb);
        Self {
            config,
            devices,
            rng,
            class_rng,
            retained: BTreeMap::new(),
            network: Vec::new(),
            sent: Vec::new(),
            delivered: Vec::new(),
            behaviours,
        }
    }

    pub fn infos(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(SimDevice::info).collect()
    }

    pub fn device(&self, id: &str) -> Option<&SimDevice> {
        self.devices.iter().find(|d| d.id == id)
    }

    fn send(&mut self, i: usize, now: i64, state: u8, error: u16, bytes: u32) {
        let d = &mut self.devices[i];
        let seq = d.installing.as_ref().map_or(0, |(_, s)| *s);
        let r = ProgressReport {
            device: d.id.clone(),
            boot: d.boot,
            seq: d.prog_seq,
            manifest_seq: seq,
            state,
            bytes,
            error,
        };
        d.prog_seq += 1;
        self.sent.push(r.clone());
        let delay = self.rng.random_range(0..=self.config.max_net_delay_ms);
        self.network.push((now + delay, r.clone()));
        if self.rng.random_bool(self.config.duplicate_prob) {
            let delay = self.rng.random_range(0..=self.config.max_net_delay_ms * 2);
            self.network.push((now + delay, r));
        }
    }

    /// A device sees an offer: schedules its install's reports.
    fn take_offer(&mut self, i: usize, now: i64, version: &str, seq: u32) {
        let b = self.behaviours.get(version).cloned();
        let d = &mut self.devices[i];
        d.seen_offers.push(seq);
        d.installing = Some((version.to_owned(), seq));
        let Some(b) = b else {
            d.script = vec![(now, ota_state::REJECTED, 1, 0)];
            return;
        };
        if (version, seq) == (d.running.0.as_str(), d.running.1) {
            d.script = vec![(now, ota_state::CONFIRMED, 0, 0)];
            return;
        }
        if seq <= d.running.1 {
            d.script = vec![(now, ota_state::REJECTED, 5, 0)];
            return;
        }
        let rng = &mut self.rng;
        let mut t = now + rng.random_range(10_000..3 * MINUTE_MS);
        let mut script = vec![(t, ota_state::ACCEPTED, 0, 0)];
        t += rng.random_range(MINUTE_MS..15 * MINUTE_MS);
        script.push((t, ota_state::DOWNLOADING, 0, 20_000));
        if rng.random_bool(b.fail) {
            t += rng.random_range(MINUTE_MS..5 * MINUTE_MS);
            script.push((t, ota_state::FAILED, 22, 40_000));
        } else {
            t += rng.random_range(MINUTE_MS..5 * MINUTE_MS);
            script.push((t, ota_state::VERIFIED, 0, 40_000));
            t += 30_000;
            script.push((t, ota_state::SWITCHING, 0, 40_000));
            t += rng.random_range(MINUTE_MS..3 * MINUTE_MS);
            let end = if rng.random_bool(b.revert) {
                ota_state::REVERTED
            } else {
                ota_state::CONFIRMED
            };
            script.push((
                t,
                end,
                if end == ota_state::REVERTED { 30 } else { 0 },
                40_000,
            ));
        }
        self.devices[i].script = script;
    }

    /// Moves the fleet to `now`: devices coming online (returned, for `observe_device`),
    /// install steps, new offers seen; returns the reports arriving at the server by `now`.
    pub fn advance(&mut self, now: i64) -> (Vec<DeviceInfo>, Vec<ProgressReport>) {
        let mut presence = Vec::new();
        for i in 0..self.devices.len() {
            let d = &mut self.devices[i];
            if !d.online && d.online_at.is_some_and(|t| t <= now) {
                d.online = true;
                d.online_at = None;
                presence.push(d.info());
            }
            if !self.devices[i].online {
                continue;
            }
            // Install steps due.
            loop {
                let d = &mut self.devices[i];
                let Some(&(due, state, error, bytes)) = d.script.first() else {
                    break;
                };
                if due > now {
                    break;
                }
                d.script.remove(0);
                if state == ota_state::CONFIRMED || state == ota_state::REVERTED {
                    // The trial boot.
                    d.boot += 1;
                    d.prog_seq = 0;
                }
                self.send(i, due, state, error, bytes);
                let d = &mut self.devices[i];
                if state == ota_state::CONFIRMED
                    && let Some(inst) = d.installing.clone()
                    && inst != d.running
                {
                    d.running = inst;
                    d.switched_ms = due;
                    presence.push(d.info());
                }
                if d.script.is_empty() {
                    d.installing = None;
                }
            }
            // A retained offer not acted on yet.
            let d = &self.devices[i];
            if d.installing.is_none()
                && let Some((v, s)) = self.retained.get(&d.id).cloned()
                && !d.seen_offers.contains(&s)
            {
                self.take_offer(i, now, &v, s);
            }
        }
        let (mut due, rest): (Vec<_>, Vec<_>) =
            self.network.drain(..).partition(|(t, _)| *t <= now);
        self.network = rest;
        due.sort_by_key(|(t, _)| *t);
        self.delivered.extend(due.iter().cloned());
        (presence, due.into_iter().map(|(_, r)| r).collect())
    }

    /// Quality observations of the window `[start, start + window_ms)`.
    pub fn observations(&mut self, start: i64) -> Vec<QualityObservation> {
        let end = start + self.config.window_ms;
        let mut out = Vec::new();
        for i in 0..self.devices.len() {
            let d = &self.devices[i];
            if !d.online || d.switched_ms >= start {
                continue;
            }
            let Some(b) = self.behaviours.get(&d.running.0) else {
                continue;
            };
            let acc = (b.accuracy + d.offset).clamp(0.0, 1.0);
            let (id, version, lat) = (
                d.id.clone(),
                d.running.0.clone(),
                d.latency_base * b.latency,
            );
            let resets_p = b.resets;
            let rng = &mut self.rng;
            let n = self.config.labels_per_window;
            let correct = (0..n).filter(|_| rng.random_bool(acc)).count() as u64;
            let estimate = (acc + rng.random_range(-0.02..0.02)).clamp(0.0, 1.0);
            let latency = lat * rng.random_range(0.95..1.05);
            let resets = u64::from(rng.random_bool(resets_p.clamp(0.0, 1.0)));
            let crng = &mut self.class_rng;
            let predicted_classes = if self.config.predictions_per_window > 0 {
                let skew = b.class_skew.clamp(0.0, 1.0);
                let mut p: Vec<f64> = d.class_mix.iter().map(|x| x * (1.0 - skew)).collect();
                p[0] += skew;
                multinomial(crng, self.config.predictions_per_window, &p)
            } else {
                Vec::new()
            };
            let drift_score = self
                .config
                .drift_scores
                .then(|| d.drift_level + b.drift + crng.random_range(0.0..0.02));
            out.push(QualityObservation {
                device: id,
                window_start_ms: start,
                on_version: version,
                labelled_correct: correct,
                labelled_total: n,
                estimated_accuracy: Some(estimate),
                mean_latency_us: Some(latency),
                resets,
                predicted_classes,
                drift_score,
            });
        }
        let _ = end;
        out
    }
}

/// A device's class mix: [`CLASS_PRIOR`] with each share times `exp(u)`, `u` uniform in
/// `[-spread, spread]`, normalised.
fn class_mix(rng: &mut SmallRng, spread: f64) -> Vec<f64> {
    let mut p: Vec<f64> = CLASS_PRIOR
        .iter()
        .map(|&p| {
            let u = if spread > 0.0 {
                rng.random_range(-spread..spread)
            } else {
                0.0
            };
            p * u.exp()
        })
        .collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    p
}

/// Multinomial counts of `n` draws over `p`, by conditional binomials in their normal
/// approximation (Box-Muller), rounded and clamped: ten normal draws instead of `n`
/// categorical ones.
fn multinomial(rng: &mut SmallRng, n: u64, p: &[f64]) -> Vec<u64> {
    let mut out = vec![0u64; p.len()];
    let (mut left, mut mass) = (n, p.iter().sum::<f64>());
    for (j, &pj) in p.iter().enumerate() {
        if left == 0 || mass <= 0.0 {
            break;
        }
        if j + 1 == p.len() {
            out[j] = left;
            break;
        }
        let q = (pj / mass).clamp(0.0, 1.0);
        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let nf = left as f64;
        let x = (nf * q + z * (nf * q * (1.0 - q)).sqrt())
            .round()
            .clamp(0.0, nf) as u64;
        out[j] = x;
        left -= x;
        mass -= pj;
    }
    out
}

/// One entry of the shell's log: what the engine asked for and recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Action(Action),
    Audit(Box<AuditRecord>),
}

/// The shell: feeds the engine from the fleet, carries out its actions, logs everything.
#[derive(Debug)]
pub struct Harness {
    pub fleet: Fleet,
    pub rollout: Rollout,
    pub now: i64,
    pub log: Vec<(i64, Entry)>,
    /// Restart (serialise the engine, lose the broker's retained offers, re-publish) at these
    /// times.
    pub restarts: Vec<i64>,
    pub restarted: u32,
    /// Answer `RollbackNeeded` by registering the rollback version.
    pub register_rollback: bool,
    /// Per step, probability of delivering an old report again (a replay, long after).
    pub replay_prob: f64,
}

pub const START_MS: i64 = 1_750_000_000_000 - 1_750_000_000_000 % (24 * HOUR_MS);

/// The plan the tests use: default shares and minimum, short soaks.
pub fn test_plan(id: &str) -> RolloutPlan {
    let mut plan = RolloutPlan::new(
        id,
        MODEL,
        VersionRef::new(NEW, 2),
        vec![VersionRef::new(OLD, 1)],
        HW,
    );
    for s in &mut plan.stages {
        s.soak_ms = HOUR_MS;
        s.deadline_ms = 6 * HOUR_MS;
    }
    plan.install.report_timeout_ms = 45 * MINUTE_MS;
    plan
}

pub fn stages(shares: &[(f64, u32)], soak_ms: i64, deadline_ms: i64) -> Vec<Stage> {
    shares
        .iter()
        .map(|&(share, min_devices)| Stage {
            share,
            min_devices,
            soak_ms,
            deadline_ms,
        })
        .collect()
}

impl Harness {
    pub fn start(config: FleetConfig, plan: RolloutPlan) -> Self {
        let fleet = Fleet::new(config);
        let (rollout, step) =
            Rollout::start(plan, &fleet.infos(), "alice", START_MS).expect("valid plan");
        let mut h = Self {
            fleet,
            rollout,
            now: START_MS,
            log: Vec::new(),
            restarts: Vec::new(),
            restarted: 0,
            register_rollback: true,
            replay_prob: 0.0,
        };
        h.apply(step);
        h
    }

    /// Carries out a step's actions and logs it.
    pub fn apply(&mut self, step: Step) {
        let now = self.now;
        for a in step.audit {
            self.log.push((now, Entry::Audit(Box::new(a))));
        }
        for a in step.actions {
            self.log.push((now, Entry::Action(a.clone())));
            match a {
                Action::Offer(o) => {
                    self.fleet.retained.insert(o.device, (o.version, o.seq));
                }
                Action::Withdraw { device } => {
                    self.fleet.retained.remove(&device);
                }
                Action::RollbackNeeded { old_version } => {
                    if self.register_rollback {
                        let seq = self.rollout.plan().target.seq + 1;
                        let step = self
                            .rollout
                            .rollback_version_ready(
                                &old_version,
                                VersionRef::new(ROLLBACK, seq),
                                now,
                            )
                            .expect("rollback version accepted");
                        self.apply(step);
                    }
                }
            }
        }
    }

    /// The service restarts: the engine is serialised and read back, the broker has lost its
    /// retained offers, and the shell re-publishes `offers_in_force`.
    pub fn restart(&mut self) {
        let mut buf = vec![0u8; 64 << 20];
        let n = to_cbor(&self.rollout, &mut buf).expect("serialise");
        let back: Rollout = from_cbor(&buf[..n]).expect("deserialise");
        assert_eq!(back, self.rollout, "serde round trip");
        // The service keeps it as JSON: that must read back exactly too.
        let json = serde_json::to_string(&self.rollout).expect("json");
        let from_json: Rollout = serde_json::from_str(&json).expect("json back");
        assert_eq!(from_json, self.rollout, "JSON round trip");
        self.rollout = back;
        let before = std::mem::take(&mut self.fleet.retained);
        for o in self.rollout.offers_in_force() {
            self.fleet.retained.insert(o.device, (o.version, o.seq));
        }
        assert_eq!(
            before, self.fleet.retained,
            "offers_in_force re-publishes exactly the retained offers"
        );
        self.restarted += 1;
    }

    /// One shell iteration at `now`.
    pub fn step_to(&mut self, now: i64) {
        self.now = now;
        if self.restarts.first().is_some_and(|&t| t <= now) {
            self.restarts.remove(0);
            self.restart();
        }
        let (presence, reports) = self.fleet.advance(now);
        for d in &presence {
            self.rollout.observe_device(d, now);
        }
        for r in &reports {
            self.rollout.report(r, now);
        }
        if self.replay_prob > 0.0
            && !self.fleet.sent.is_empty()
            && self.fleet.rng.random_bool(self.replay_prob)
        {
            let i = self.fleet.rng.random_range(0..self.fleet.sent.len());
            let r = self.fleet.sent[i].clone();
            self.rollout.report(&r, now);
        }
        let w = self.fleet.config.window_ms;
        if now % w == 0 && now > START_MS {
            let obs = self.fleet.observations(now - w);
            self.rollout.observe_quality(&obs, now);
        }
        let step = self.rollout.tick(now);
        self.apply(step);
    }

    /// Runs in `tick_ms` steps until `end` or until `stop` says so.
    pub fn run_until(&mut self, end: i64, tick_ms: i64, stop: impl Fn(&Self) -> bool) {
        while self.now < end && !stop(self) {
            let next = self.now + tick_ms;
            self.step_to(next);
        }
    }

    pub fn audit(&self) -> Vec<&AuditRecord> {
        self.log
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Audit(a) => Some(&**a),
                Entry::Action(_) => None,
            })
            .collect()
    }

    pub fn events(&self) -> Vec<(AuditEvent, Option<u32>)> {
        self.audit().iter().map(|a| (a.event, a.stage)).collect()
    }

    pub fn offers(&self, phase: Phase) -> Vec<&Offer> {
        self.log
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Action(Action::Offer(o)) if o.phase == phase => Some(o),
                _ => None,
            })
            .collect()
    }

    pub fn state(&self) -> RolloutState {
        self.rollout.state()
    }
}
