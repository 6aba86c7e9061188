//! Helpers for end-to-end tests: a `tinyfleet serve` process on ephemeral ports, simulated
//! devices speaking real MQTT with the device client's encoder, and waiting with timeouts.

#![allow(dead_code)]

pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, LastWill, MqttOptions, Packet, QoS};
use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
use tinyfleet_device::wire::{self, DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};

pub const TOKEN: &str = "operator-token-for-tests-0123456789";
pub const READ_TOKEN: &str = "read-only-token-for-tests-0123456789";

/// Waits until `f` returns `Some`, polling every 50 ms, up to `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `tinyfleet serve`.
pub struct Server {
    child: Child,
    pub mqtt: SocketAddr,
    pub api: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts a server on `data_dir` with ephemeral ports; `extra` is appended to the config.
    pub fn start(data_dir: &Path, extra: &str) -> Server {
        Self::start_with(data_dir, "", extra)
    }

    /// As [`Server::start`], with `ingest` lines added to the `[ingest]` section.
    pub fn start_with(data_dir: &Path, ingest: &str, extra: &str) -> Server {
        let config_path = data_dir.with_extension("toml");
        let config = format!(
            "data_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\n\
             [ingest]\nflush_ms = 20\n{ingest}\n\
             [api]\nlisten = \"127.0.0.1:0\"\n\
             [[api.tokens]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\nrole = \"operator\"\n\
             [[api.tokens]]\nname = \"viewer\"\ntoken = \"{READ_TOKEN}\"\nrole = \"read\"\n{extra}",
            data_dir.display()
        );
        std::fs::write(&config_path, config).expect("write config");
        Self::spawn(data_dir, config_path)
    }

    /// Starts a server with exactly `config` (TOML) written to `config_path`.
    pub fn start_config(data_dir: &Path, config_path: &Path, config: &str) -> Server {
        std::fs::write(config_path, config).expect("write config");
        Self::spawn(data_dir, config_path.to_owned())
    }

    /// The process id (for `kill -9`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(data_dir: &Path, config_path: PathBuf) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("TINYFLEET_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tinyfleet serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("tinyfleet serving:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tinyfleet serve did not report its addresses within 30 s");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .expect("address in the serving line")
                .to_owned()
        };
        Server {
            child,
            mqtt: field("mqtt=").parse().expect("mqtt address"),
            api: field("api="),
            data_dir: data_dir.to_owned(),
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = wait_for("server exit", Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        });
        assert!(status.success(), "serve exited with {status}");
    }

    /// `kill -9`: no shutdown, nothing flushed, the embedded broker gone with the process.
    pub fn kill9(mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Starts again on the same data directory and configuration.
    pub fn restart_after_stop(data_dir: &Path) -> Server {
        Self::spawn(data_dir, data_dir.with_extension("toml"))
    }

    /// Starts again on the same data directory, configuration and ports (so devices
    /// reconnect to the same broker address).
    pub fn restart_on_same_ports(data_dir: &Path, mqtt: SocketAddr, api: &str) -> Server {
        let config_path = data_dir.with_extension("toml");
        let config = std::fs::read_to_string(&config_path).expect("read config");
        let api_port = api.rsplit(':').next().expect("api port").to_owned();
        let config = config
            .replacen(
                "[broker]\nlisten = \"127.0.0.1:0\"",
                &format!("[broker]\nlisten = \"{mqtt}\""),
                1,
            )
            .replacen(
                "[api]\nlisten = \"127.0.0.1:0\"",
                &format!("[api]\nlisten = \"127.0.0.1:{api_port}\""),
                1,
            );
        std::fs::write(&config_path, config).expect("write config");
        Self::spawn(data_dir, config_path)
    }

    pub fn get(&self, path: &str) -> serde_json::Value {
        self.get_as(path, TOKEN).1
    }

    pub fn get_as(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::blocking::Client::new()
            .get(format!("{}{path}", self.api))
            .bearer_auth(token)
            .send()
            .expect("GET");
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(serde_json::Value::Null))
    }

    pub fn post(
        &self,
        path: &str,
        token: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let resp = reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.api))
            .bearer_auth(token)
            .json(&body)
            .send()
            .expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(serde_json::Value::Null))
    }

    /// Provisions a device through the API.
    pub fn provision(&self, id: &str) -> SimDevice {
        let (status, creds) = self.post(
            "/api/v1/devices",
            TOKEN,
            serde_json::json!({ "id": id, "tags": { "site": "lab" } }),
        );
        assert_eq!(status, 201, "provision {id}: {creds}");
        let key: [u8; 32] = hex::decode(creds["mac_key"].as_str().expect("mac_key"))
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        SimDevice {
            id: id.to_owned(),
            password: creds["mqtt_password"]
                .as_str()
                .expect("password")
                .to_owned(),
            key: DeviceKey(key),
            boot: 1,
            summaries_sent: 0,
            rng: Rng::new(id.len() as u64 * 7919),
        }
    }

    /// Ingest counters from the API.
    pub fn counter(&self, name: &str) -> i64 {
        self.get("/api/v1/ingest")[name].as_i64().unwrap_or(0)
    }

    pub fn device_summaries(&self, id: &str) -> i64 {
        self.get(&format!("/api/v1/devices/{id}"))["state"]["summaries"]
            .as_i64()
            .unwrap_or(0)
    }
}

impl Server {
    /// Whether the process is still running (it has not exited or crashed).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated device: the real device client's encoder over a real MQTT connection.
pub struct SimDevice {
    pub id: String,
    pub password: String,
    pub key: DeviceKey,
    pub boot: u32,
    pub summaries_sent: u32,
    rng: Rng,
}

/// A connected device session.
pub struct Session {
    client: Client,
    events: mpsc::Receiver<Result<Event, String>>,
}

impl SimDevice {
    fn device_id(&self) -> DeviceId<'_> {
        DeviceId::new(&self.id).expect("valid id")
    }

    /// The summary with sequence number `self.summaries_sent` (40 reference inferences), then
    /// counts it as sent.
    pub fn next_summary(&mut self) -> (String, Vec<u8>) {
        self.next_summary_with(&ReferenceProfile::default(), &StreamParams::default(), 40)
    }

    /// The next summary of `inferences` drawn with `params`, binned with `profile`'s edges.
    pub fn next_summary_with(
        &mut self,
        profile: &ReferenceProfile,
        params: &StreamParams,
        inferences: usize,
    ) -> (String, Vec<u8>) {
        let mut m = ReferenceMonitor::new(profile.config(3), self.boot, wire::reset::POWER_ON, 0);
        // Skip to the right sequence number by finishing empty windows (cheap, no allocation).
        let mut scratch = [0u8; 512];
        for _ in 0..self.summaries_sent {
            let _ = m.finish_window(0, None, self.device_id(), &self.key, &mut scratch);
        }
        for _ in 0..inferences {
            m.record(&sample(&mut self.rng, params).inference())
                .expect("record");
        }
        m.set_battery_mv(3600);
        let mut out = [0u8; 1024];
        let n = m
            .finish_window(60_000, None, self.device_id(), &self.key, &mut out)
            .expect("encode");
        self.summaries_sent += 1;
        (
            Topic::new(self.device_id(), Kind::Summary)
                .as_str()
                .to_owned(),
            out[..n].to_vec(),
        )
    }

    fn sealed<T: serde::Serialize>(&self, kind: Kind, msg: &T) -> (String, Vec<u8>) {
        let mut out = [0u8; 256];
        let n = wire::seal(self.device_id(), &self.key, kind, msg, &mut out).expect("seal");
        (
            Topic::new(self.device_id(), kind).as_str().to_owned(),
            out[..n].to_vec(),
        )
    }

    pub fn hello(&self, seq: u32) -> (String, Vec<u8>) {
        self.sealed(
            Kind::Hello,
            &wire::Hello {
                boot: self.boot,
                seq,
                fw: "1.0.0",
                model_id: "kws",
                model_version: "3",
                model_seq: 3,
                hw: "nrf52840",
                caps: 0,
                reset: wire::reset::POWER_ON,
                unix_s: None,
            },
        )
    }

    /// Connects with `password` (its own unless overridden); returns the session once the
    /// broker accepted the CONNECT, or the refusal.
    pub fn connect_with(&self, addr: SocketAddr, password: &str) -> Result<Session, String> {
        let mut opts = MqttOptions::new(&self.id, addr.ip().to_string(), addr.port());
        opts.set_credentials(&self.id, password);
        opts.set_keep_alive(Duration::from_secs(30));
        let (topic, will) = self.sealed(
            Kind::Will,
            &wire::Will {
                boot: self.boot,
                seq: 0,
            },
        );
        opts.set_last_will(LastWill::new(topic, will, QoS::AtLeastOnce, true));
        let (client, mut connection) = Client::new(opts, 100);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let failed = event.is_err();
                if tx.send(event.map_err(|e| e.to_string())).is_err() || failed {
                    break;
                }
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    return Ok(Session { client, events: rx });
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("no CONNACK within 10 s".into()),
            }
        }
    }

    pub fn connect(&self, addr: SocketAddr) -> Session {
        self.connect_with(addr, &self.password)
            .unwrap_or_else(|e| panic!("{} could not connect: {e}", self.id))
    }
}

impl Session {
    /// Publishes QoS 1 messages and waits until the broker acknowledged every one.
    pub fn publish_acked(&mut self, messages: &[(String, Vec<u8>)], retain: bool) {
        for (topic, payload) in messages {
            self.client
                .publish(topic.clone(), QoS::AtLeastOnce, retain, payload.clone())
                .expect("publish request");
        }
        let mut acked = 0;
        while acked < messages.len() {
            match self.events.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("connection failed while publishing: {e}"),
                Err(_) => panic!("only {acked} of {} publishes acknowledged", messages.len()),
            }
        }
    }

    pub fn disconnect(self) {
        let _ = self.client.disconnect();
    }
}

/// A device that publishes summaries one at a time and, when the connection fails, connects
/// again and sends the same summary (same bytes, same sequence number) until a PUBACK comes:
/// what a real device client does. Counts the summaries acknowledged.
pub fn publish_until_stopped(
    mut device: SimDevice,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> SimDevice {
    let mut pending = None;
    while !stop.load(Ordering::SeqCst) {
        let mut opts = MqttOptions::new(&device.id, addr.ip().to_string(), addr.port());
        opts.set_credentials(&device.id, &device.password);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(opts, 10);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let failed = event.is_err();
                if tx.send(event).is_err() || failed {
                    break;
                }
            }
        });
        // Until this connection fails: publish, wait for its PUBACK, next.
        'connection: while !stop.load(Ordering::SeqCst) {
            let (topic, payload) = pending.get_or_insert_with(|| device.next_summary()).clone();
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                break;
            }
            loop {
                match rx.recv_timeout(Duration::from_secs(3)) {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        pending = None;
                        acked.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Ok(Ok(_)) => {}
                    // Connection lost or no answer: connect again, send it again.
                    Ok(Err(_)) | Err(_) => break 'connection,
                }
            }
        }
        let _ = client.disconnect();
        if !stop.load(Ordering::SeqCst) {
            // The server is away: try again shortly (a real client backs off).
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    device
}

/// A VictoriaMetrics server (it speaks InfluxDB's `/api/v2/write`), killed on drop.
pub struct Victoria {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Victoria {
    pub fn start() -> Victoria {
        let bin = std::env::var("VICTORIA_METRICS_BIN")
            .unwrap_or_else(|_| "/usr/bin/victoria-metrics".into());
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: run scripts/ensure-victoria-metrics.sh (scripts/test.sh does)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new(bin)
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", dir.path().display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start victoria-metrics");
        let url = format!("http://127.0.0.1:{port}");
        wait_for("victoria-metrics health", Duration::from_secs(20), || {
            reqwest::blocking::get(format!("{url}/health"))
                .ok()
                .filter(|r| r.status().is_success())
        });
        Victoria {
            child,
            url,
            _dir: dir,
        }
    }

    /// The exported series lines of `metric`.
    pub fn export(&self, metric: &str) -> String {
        let client = reqwest::blocking::Client::new();
        let _ = client
            .post(format!("{}/internal/force_flush", self.url))
            .send();
        client
            .get(format!("{}/api/v1/export", self.url))
            .query(&[("match[]", format!("{{__name__=\"{metric}\"}}"))])
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default()
    }
}

impl Victoria {
    /// Stops the server with SIGTERM (so it flushes what it holds to its data directory) and
    /// waits for it to exit: the time-series store is down until [`Victoria::restart`].
    pub fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        wait_for("victoria-metrics exit", Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        });
        assert!(
            reqwest::blocking::get(format!("{}/health", self.url)).is_err(),
            "victoria-metrics still answers after stop"
        );
    }

    /// Starts the server again on the same port and data directory, once it answers.
    pub fn restart(&mut self) {
        let bin = std::env::var("VICTORIA_METRICS_BIN")
            .unwrap_or_else(|_| "/usr/bin/victoria-metrics".into());
        let port = self.url.rsplit(':').next().expect("port in url").to_owned();
        self.child = std::process::Command::new(bin)
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", self._dir.path().display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("restart victoria-metrics");
        let url = self.url.clone();
        wait_for("victoria-metrics health", Duration::from_secs(20), || {
            reqwest::blocking::get(format!("{url}/health"))
                .ok()
                .filter(|r| r.status().is_success())
        });
    }
}

impl Drop for Victoria {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service's signing key as a device trusts it: `(kid, public key)`.
pub fn trusted_key(server: &Server) -> (Vec<u8>, [u8; 32]) {
    let keys = server.get("/api/v1/ota/keys");
    let public: [u8; 32] = hex::decode(keys[0]["public_key"].as_str().expect("public_key"))
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let kid = hex::decode(keys[0]["kid"].as_str().expect("kid")).expect("hex");
    (kid, public)
}

/// Simulated devices (`tinyfleet-sim`: the real installer on a simulated flash) on their own
/// runtime, with the events they report.
pub struct SimFleet {
    pub rt: tokio::runtime::Runtime,
    events: tokio::sync::mpsc::UnboundedReceiver<tinyfleet_sim::SimEvent>,
    tx: tokio::sync::mpsc::UnboundedSender<tinyfleet_sim::SimEvent>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimFleet {
    pub fn new() -> SimFleet {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        SimFleet {
            rt: tokio::runtime::Runtime::new().expect("runtime"),
            events,
            tx,
            stop: tokio::sync::watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    /// Provisions `id` through the API and starts it on the server's broker, running
    /// `factory` (model `kws`, hardware `hw`).
    pub fn add(
        &mut self,
        server: &Server,
        id: &str,
        hw: &str,
        factory: tinyfleet_sim::Factory,
        behaviour: tinyfleet_sim::Behaviour,
    ) {
        let device = server.provision(id);
        let spec = tinyfleet_sim::DeviceSpec {
            id: device.id.clone(),
            password: device.password.clone(),
            mac_key: device.key.clone(),
            hw: hw.into(),
            fw: 10,
            arena: 64 * 1024,
            model_id: "kws".into(),
            factory,
            slot_size: 32 * 1024,
            trusted: vec![trusted_key(server)],
            broker_host: server.mqtt.ip().to_string(),
            broker_port: server.mqtt.port(),
            seed: self.tasks.len() as u64 + 1,
            behaviour,
        };
        let stop = self.stop.subscribe();
        let tx = self.tx.clone();
        self.tasks
            .push(self.rt.spawn(tinyfleet_sim::run(spec, Some(tx), stop)));
    }

    /// The next event that `pred` accepts, within `timeout`; panics on a device error.
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&tinyfleet_sim::SimEvent) -> bool,
    ) -> tinyfleet_sim::SimEvent {
        let events = &mut self.events;
        self.rt
            .block_on(async {
                tokio::time::timeout(timeout, async {
                    loop {
                        let e = events.recv().await.expect("fleet running");
                        if let tinyfleet_sim::SimEventKind::Error(err) = &e.kind {
                            panic!("device {} failed: {err}", e.device);
                        }
                        if pred(&e) {
                            return e;
                        }
                    }
                })
                .await
            })
            .unwrap_or_else(|_| panic!("no {what} within {timeout:?}"))
    }

    /// Stops every device (a clean disconnect each).
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let tasks = self.tasks;
        self.rt.block_on(async {
            for t in tasks {
                let _ = t.await;
            }
        });
    }
}
