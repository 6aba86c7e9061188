//! Mosquitto as the external broker (Debian's package, a real process): device authentication
//! from the password file `serve` keeps, per-device ACLs by `pattern`, and two `serve`
//! processes (an `all` one and an `ingest` replica) splitting one `$share/...` subscription
//! over one shared store without losing or double counting a summary, and running a staged
//! rollout whose progress reports either of them handles. Faults: `kill -9` of the server and
//! a broker restart lose nothing a device saw acknowledged.

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use support::{READ_TOKEN, Server, SimDevice, TOKEN, publish_until_stopped, wait_for};

const SERVICE_USER: &str = "tinyfleet-ingest";
const SERVICE_PASSWORD: &str = "service-password-for-tests";

/// A Mosquitto broker process, killed on drop.
struct Mosquitto {
    child: Child,
    bin: &'static str,
    dir: std::path::PathBuf,
    devices: SocketAddr,
    services: SocketAddr,
}

impl Mosquitto {
    /// Starts Mosquitto with the configuration `tinyfleet broker` prints, or `None` when the
    /// binary is missing (an error with `TF_REQUIRE_MOSQUITTO=1`, as in `scripts/test.sh`).
    fn start(dir: &Path) -> Option<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var("TF_REQUIRE_MOSQUITTO").is_err(),
                "mosquitto is not installed (apt-get install -y mosquitto)"
            );
            eprintln!("SKIPPED: mosquitto is not installed");
            return None;
        };
        let devices = free_port();
        let services = free_port();
        let acl = tinyfleet(&["broker", "mosquitto-acl", "--service-user", SERVICE_USER]);
        std::fs::write(dir.join("acl"), acl).expect("write acl");
        // Empty until `serve` writes it; Mosquitto reads it again on SIGHUP.
        std::fs::write(dir.join("passwd"), "").expect("write passwd");
        let conf = tinyfleet(&[
            "broker",
            "mosquitto-conf",
            "--password-file",
            &dir.join("passwd").display().to_string(),
            "--acl-file",
            &dir.join("acl").display().to_string(),
            "--device-listener",
            &devices.to_string(),
            "--service-listener",
            &services.to_string(),
        ]);
        // As root, stay root: the files live in a private temporary directory. Sessions and
        // queued messages are saved there when Mosquitto stops.
        let conf = format!("user root\n{conf}persistence_location {}/\n", dir.display());
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("write conf");
        let mut mosquitto = Mosquitto {
            child: Self::spawn(bin, dir),
            bin,
            dir: dir.to_owned(),
            devices,
            services,
        };
        mosquitto.wait_listening();
        Some(mosquitto)
    }

    fn spawn(bin: &str, dir: &Path) -> Child {
        Command::new(bin)
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto")
    }

    fn wait_listening(&mut self) {
        let services = self.services;
        wait_for("mosquitto listening", Duration::from_secs(10), || {
            TcpStream::connect(services).ok()
        });
    }

    /// A clean restart on the same ports: SIGTERM (Mosquitto saves its sessions and queued
    /// messages), then start again from the saved state.
    fn restart(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.child = Self::spawn(self.bin, &self.dir);
        self.wait_listening();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

fn tinyfleet(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tinyfleet"))
        .args(args)
        .output()
        .expect("run tinyfleet");
    assert!(out.status.success(), "tinyfleet {args:?} failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `serve` against the broker's service listener, as one of the replicas sharing `data`.
fn replica_config(
    data: &Path,
    mosquitto: &Mosquitto,
    role: &str,
    client_id: &str,
    extra_mqtt: &str,
    store: &str,
) -> String {
    format!(
        "data_dir = {data:?}\n\
         role = \"{role}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n\
         username = \"{SERVICE_USER}\"\npassword = \"{SERVICE_PASSWORD}\"\n\
         client_id = \"{client_id}\"\nshare_group = \"ingest\"\n{extra_mqtt}\n\
         [ingest]\nflush_ms = 20\njournal = false\nshared_store = true\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\
         [[api.tokens]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\nrole = \"operator\"\n\
         [[api.tokens]]\nname = \"viewer\"\ntoken = \"{READ_TOKEN}\"\nrole = \"read\"\n{store}",
        port = mosquitto.services.port()
    )
}

/// One `serve` (role `all`) against the broker, keeping its password file; `ingest` is added to
/// the `[ingest]` section.
fn single_server_config(data: &Path, mosquitto: &Mosquitto, ingest: &str) -> String {
    format!(
        "data_dir = {data:?}\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n\
         username = \"{SERVICE_USER}\"\npassword = \"{SERVICE_PASSWORD}\"\n\
         password_file = {passwd:?}\nreload_command = [\"kill\", \"-HUP\", \"{pid}\"]\n\
         [ingest]\nflush_ms = 20\n{ingest}\n\
         [api]\nlisten = \"127.0.0.1:0\"\n\
         [[api.tokens]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\nrole = \"operator\"\n",
        port = mosquitto.services.port(),
        passwd = mosquitto.dir.join("passwd"),
        pid = mosquitto.child.id(),
    )
}

/// Where two replicas keep their state: one SQLite data directory, or PostgreSQL with a data
/// directory each ([`Replicas::second_data_dir`]); `store` is the
/// `[store]` section, `reload` the `[mqtt]` lines that keep Mosquitto's password file.
struct Replicas {
    data: std::path::PathBuf,
    data_b: std::path::PathBuf,
    store: String,
    reload: String,
}

impl Replicas {
    fn new(dir: &Path, mosquitto: &Mosquitto, postgres: &Option<String>) -> Replicas {
        let data = dir.join("data");
        std::fs::create_dir(&data).expect("data dir");
        let (store, data_b) = match postgres {
            Some(url) => (
                format!("[store]\npostgres_url = \"{url}\"\n"),
                dir.join("data-b"),
            ),
            None => (String::new(), data.clone()),
        };
        let reload = format!(
            "password_file = {:?}\nreload_command = [\"kill\", \"-HUP\", \"{}\"]",
            dir.join("passwd"),
            mosquitto.child.id()
        );
        Replicas {
            data,
            data_b,
            store,
            reload,
        }
    }

    /// Makes the second replica's data directory, with a copy of the first's `master.key`,
    /// when the replicas do not share one (PostgreSQL); returns whether it did.
    fn second_data_dir(&self) -> bool {
        if self.data_b == self.data {
            return false;
        }
        std::fs::create_dir(&self.data_b).expect("data dir b");
        std::fs::copy(self.data.join("master.key"), self.data_b.join("master.key"))
            .expect("master.key");
        true
    }
}

/// A Prometheus sample of the replica's `/metrics`.
fn metric(api: &str, sample: &str) -> i64 {
    let text = reqwest::blocking::get(format!("{api}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Connects a plain client and subscribes to `filters`; returns it with its event stream.
fn subscriber(
    addr: SocketAddr,
    id: &str,
    user: &str,
    password: &str,
    filters: &[String],
) -> (Client, std::sync::mpsc::Receiver<Event>) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_credentials(user, password);
    let (client, mut connection) = Client::new(opts, 10);
    for f in filters {
        client.subscribe(f, QoS::AtLeastOnce).expect("subscribe");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(e) => {
                    if tx.send(e).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

/// Device `d`, connected to `device_listener`, subscribes to its own offer topic and to
/// `other`'s; the service publishes both offers (retained, like real ones) on `broker`'s
/// service listener, `other`'s first: only `d`'s may arrive (the ACL).
fn offers_reach_only_their_device(
    broker: &Mosquitto,
    device_listener: SocketAddr,
    d: &SimDevice,
    other: &str,
) {
    let mine = format!("tf/v1/{}/ota/offer", d.id);
    let theirs = format!("tf/v1/{other}/ota/offer");
    let (_sub, events) = subscriber(
        device_listener,
        &d.id,
        &d.id,
        &d.password,
        &[theirs.clone(), mine.clone()],
    );
    wait_for(
        "both subscriptions acknowledged",
        Duration::from_secs(10),
        || {
            let mut acks = 0;
            while let Ok(e) = events.recv_timeout(Duration::from_millis(100)) {
                if matches!(e, Event::Incoming(Packet::SubAck(_))) {
                    acks += 1;
                }
                if acks == 2 {
                    return Some(());
                }
            }
            None
        },
    );
    let (publisher, _pub_events) = subscriber(
        broker.services,
        "acl-publisher",
        SERVICE_USER,
        SERVICE_PASSWORD,
        &[],
    );
    for (topic, body) in [(&theirs, b"theirs".to_vec()), (&mine, b"mine".to_vec())] {
        publisher
            .publish(topic.as_str(), QoS::AtLeastOnce, true, body)
            .expect("publish");
    }
    let got = wait_for(
        "an offer delivered",
        Duration::from_secs(20),
        || match events.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Incoming(Packet::Publish(p))) => Some((p.topic, p.payload.to_vec())),
            _ => None,
        },
    );
    assert_eq!(got, (mine, b"mine".to_vec()));
}

/// A fresh database on the PostgreSQL server of `TF_POSTGRES_URL` (`scripts/ensure-postgres.sh`),
/// or `None` (skipped) without one, unless `TF_REQUIRE_POSTGRES` is set.
fn postgres_database() -> Option<String> {
    let Ok(url) = std::env::var("TF_POSTGRES_URL") else {
        assert!(
            std::env::var("TF_REQUIRE_POSTGRES").is_err(),
            "TF_POSTGRES_URL is not set: run scripts/ensure-postgres.sh"
        );
        eprintln!("SKIPPED: no PostgreSQL (TF_POSTGRES_URL)");
        return None;
    };
    let name = format!(
        "t_mq_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let status = Command::new("psql")
        .arg(&url)
        .args(["-q", "-c", &format!("CREATE DATABASE {name}")])
        .status()
        .expect("run psql");
    assert!(status.success(), "CREATE DATABASE {name}");
    let (server, _) = url.rsplit_once('/').expect("database in the URL");
    Some(format!("{server}/{name}"))
}

#[test]
fn two_ingest_replicas_split_mosquitto_shared_subscription_on_one_sqlite_store() {
    replicas_share_one_store(None);
}

#[test]
fn two_ingest_replicas_split_mosquitto_shared_subscription_on_postgres() {
    if let Some(url) = postgres_database() {
        replicas_share_one_store(Some(url));
    }
}

/// Two `serve` processes (an `all` one and an `ingest` replica) in one share group over one
/// store: the same SQLite data directory, or PostgreSQL with a data directory each (sharing
/// only `master.key`). Neither loses nor double counts a summary, replays are refused whichever
/// replica receives them, and a device provisioned after the replica started is accepted by it.
fn replicas_share_one_store(postgres: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mosquitto) = Mosquitto::start(dir.path()) else {
        return;
    };
    let replicas = Replicas::new(dir.path(), &mosquitto, &postgres);
    let Replicas {
        data,
        data_b,
        store,
        reload,
    } = &replicas;
    let a = Server::start_config(
        data,
        &dir.path().join("a.toml"),
        &replica_config(data, &mosquitto, "all", "ingest-a", reload, store),
    );

    // Devices provisioned through the API appear in Mosquitto's password file.
    let mut devices: Vec<_> = (0..6).map(|i| a.provision(&format!("mq-{i}"))).collect();
    for d in &devices {
        wait_for(
            &format!("{} accepted by Mosquitto", d.id),
            Duration::from_secs(20),
            || d.connect_with(mosquitto.devices, &d.password).ok(),
        )
        .disconnect();
    }
    assert!(
        devices[0]
            .connect_with(mosquitto.devices, "wrong-password")
            .is_err(),
        "a wrong password is refused"
    );

    // Replicas on PostgreSQL share the database and the master key, nothing else.
    replicas.second_data_dir();
    let b = Server::start_config(
        data_b,
        &dir.path().join("b.toml"),
        &replica_config(data_b, &mosquitto, "ingest", "ingest-b", "", store),
    );
    // Provisioned after the replica started: it learns the device from the store.
    let late = a.provision("mq-6");
    wait_for(
        "mq-6 accepted by Mosquitto",
        Duration::from_secs(20),
        || late.connect_with(mosquitto.devices, &late.password).ok(),
    )
    .disconnect();
    devices.push(late);
    assert_eq!(
        reqwest::blocking::get(format!("{}/healthz", b.api))
            .map(|r| r.status().as_u16())
            .ok(),
        Some(200)
    );

    // Every device: a hello, 10 summaries, then 3 of them again (replays), all acknowledged.
    let mut published = 0;
    for d in &mut devices {
        let mut s = d.connect(mosquitto.devices);
        let mut messages = vec![d.hello(0)];
        messages.extend((0..10).map(|_| d.next_summary()));
        let replays: Vec<_> = messages[1..4].to_vec();
        s.publish_acked(&messages, false);
        s.publish_acked(&replays, false);
        published += messages.len() + replays.len();
        // A summary on another device's topic is refused by the broker's ACL.
        let mut forged = messages[5].clone();
        forged.0 = forged.0.replace(&d.id, "mq-0");
        if d.id != "mq-0" {
            s.publish_acked(&[forged], false);
        }
        s.disconnect();
    }

    // Both replicas took part, and between them received exactly what devices published.
    let received = || a.counter("received") + metric(&b.api, "tinyfleet_ingest_received_total ");
    wait_for(
        "all messages received by the two replicas",
        Duration::from_secs(30),
        || (received() >= published as i64).then_some(()),
    );
    assert_eq!(received(), published as i64, "forged messages never arrive");
    let a_received = a.counter("received");
    assert!(
        a_received > 0 && a_received < published as i64,
        "the share group split the messages ({a_received} of {published} at a)"
    );
    let accepted = |name: &str| {
        a.counter(&format!("accepted.{name}"))
            + metric(
                &b.api,
                &format!("tinyfleet_ingest_accepted_total{{kind=\"{name}\"}} "),
            )
    };
    let duplicates = a.counter("rejected.duplicate")
        + metric(
            &b.api,
            "tinyfleet_ingest_rejected_total{reason=\"duplicate\"} ",
        );
    wait_for("every summary committed", Duration::from_secs(20), || {
        devices
            .iter()
            .all(|d| a.device_summaries(&d.id) == 10)
            .then_some(())
    });
    assert_eq!(accepted("summary"), 70, "each summary counted once");
    assert_eq!(
        duplicates, 21,
        "each replay refused, whichever replica got it"
    );
    // The tag cohort every device shares was written by both replicas: nothing overwritten.
    let windows = a.get("/api/v1/cohorts/windows?cohort=tag:site%3Dlab");
    let cohort_summaries: i64 = windows
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| w["window"]["agg"]["summaries"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(cohort_summaries, 70, "cohort windows: {windows}");

    // ACLs: a device reads its own offers only.
    offers_reach_only_their_device(&mosquitto, mosquitto.devices, &devices[0], "mq-1");

    // A revoked device is gone from the password file: Mosquitto refuses it.
    let (status, body) = a.post("/api/v1/devices/mq-5/revoke", TOKEN, serde_json::json!({}));
    assert!(status < 300, "revoke: {status} {body}");
    wait_for("revoked device refused", Duration::from_secs(20), || {
        devices[5]
            .connect_with(mosquitto.devices, &devices[5].password)
            .is_err()
            .then_some(())
    });
    b.stop();
    a.stop();
}

#[test]
fn a_staged_rollout_takes_the_progress_an_ingest_replica_handles_on_sqlite() {
    rollout_across_replicas(None);
}

#[test]
fn a_staged_rollout_takes_the_progress_an_ingest_replica_handles_on_postgres() {
    if let Some(url) = postgres_database() {
        rollout_across_replicas(Some(url));
    }
}

/// A model image (deterministic bytes).
fn image(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Registers `kws@{version}` (`nrf52840`) through the API.
fn push_version(server: &Server, bytes: &[u8], version: &str, seq: u32) {
    let resp = reqwest::blocking::Client::new()
        .post(format!(
            "{}/api/v1/models/kws/versions/{version}?seq={seq}&hw=nrf52840",
            server.api
        ))
        .bearer_auth(TOKEN)
        .body(bytes.to_vec())
        .send()
        .expect("upload");
    let status = resp.status().as_u16();
    assert_eq!(status, 201, "{}", resp.text().unwrap_or_default());
}

/// A staged rollout with an `all` process and an `ingest` replica splitting the devices'
/// messages through Mosquitto's share group: simulated devices (the real installer) take the
/// offers, fetch blocks from either process, install and confirm, and about half of their
/// progress reports, presence changes and hellos are committed by the replica. The rollouts
/// in the `all` process read those from the store's change feed, so every stage completes with
/// every device confirmed; without the feed, a canary whose confirmation went to the replica
/// would hold the canary stage (the install timeout is an hour).
fn rollout_across_replicas(postgres: Option<String>) {
    const DEVICES: usize = 12;
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mosquitto) = Mosquitto::start(dir.path()) else {
        return;
    };
    let replicas = Replicas::new(dir.path(), &mosquitto, &postgres);
    let Replicas {
        data,
        data_b,
        store,
        reload,
    } = &replicas;
    let tail = format!("{store}[ota]\nrollout_tick_ms = 200\n");
    let a = Server::start_config(
        data,
        &dir.path().join("a.toml"),
        &replica_config(data, &mosquitto, "all", "ingest-a", reload, &tail),
    );
    if replicas.second_data_dir() {
        // PostgreSQL: the replica also shares the artifacts (it answers block requests too).
        std::os::unix::fs::symlink(data.join("artifacts"), data_b.join("artifacts"))
            .expect("artifacts");
    }
    let b = Server::start_config(
        data_b,
        &dir.path().join("b.toml"),
        &replica_config(data_b, &mosquitto, "ingest", "ingest-b", "", &tail),
    );

    let v1 = image(1, 20_000);
    let mut v2 = v1.clone();
    for (i, byte) in v2.iter_mut().enumerate().skip(2_000).take(3_000) {
        *byte = (i as u8).wrapping_mul(31) ^ 7;
    }
    push_version(&a, &v1, "1.0", 1);
    push_version(&a, &v2, "2.0", 2);

    // The fleet on 1.0, each device accepted by Mosquitto before it starts (a simulated
    // device takes a refusal as final). The probe has no last will, which could otherwise end
    // the device's first connection.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (stop, _) = tokio::sync::watch::channel(false);
    let trusted = support::trusted_key(&a);
    let factory = tinyfleet_sim::Factory {
        model_version: "1.0".into(),
        model_seq: 1,
        image: Arc::new(v1.clone()),
    };
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let d = a.provision(&format!("ro-{i:02}"));
        wait_for(
            &format!("{} accepted by Mosquitto", d.id),
            Duration::from_secs(20),
            || {
                let (client, events) =
                    subscriber(mosquitto.devices, &d.id, &d.id, &d.password, &[]);
                let accepted = matches!(
                    events.recv_timeout(Duration::from_secs(5)),
                    Ok(Event::Incoming(Packet::ConnAck(ack)))
                        if ack.code == rumqttc::ConnectReturnCode::Success
                );
                let _ = client.disconnect();
                accepted.then_some(())
            },
        );
        let spec = tinyfleet_sim::DeviceSpec {
            id: d.id.clone(),
            password: d.password.clone(),
            mac_key: d.key.clone(),
            hw: "nrf52840".into(),
            fw: 10,
            arena: 64 * 1024,
            model_id: "kws".into(),
            factory: factory.clone(),
            slot_size: 32 * 1024,
            trusted: vec![trusted.clone()],
            broker_host: mosquitto.devices.ip().to_string(),
            broker_port: mosquitto.devices.port(),
            seed: i as u64 + 1,
            behaviour: tinyfleet_sim::Behaviour {
                summary_interval: Duration::from_secs(3600),
                ..tinyfleet_sim::Behaviour::default()
            },
        };
        tasks.push(rt.spawn(tinyfleet_sim::run(
            spec,
            Some(events_tx.clone()),
            stop.subscribe(),
        )));
    }
    let cohorts = || -> Vec<String> {
        a.get("/api/v1/devices?limit=100")["devices"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .filter(|d| d["online"] == true)
                    .map(|d| d["cohort"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let c = cohorts();
        if c.len() == DEVICES && c.iter().all(|c| c == "kws@1.0/nrf52840") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fleet not online on 1.0 within 60 s: {}",
            a.get("/api/v1/devices?limit=100")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (status, created) = a.post(
        "/api/v1/rollouts",
        TOKEN,
        serde_json::json!({
            "model_id": "kws", "version": "2.0", "id": "kws-2",
            "stages": [
                { "share": 0.25, "min_devices": 5, "soak_ms": 500, "deadline_ms": 600_000 },
                { "share": 1.0, "min_devices": 0, "soak_ms": 500, "deadline_ms": 600_000 }
            ],
            "install": { "min_done": 5 },
            "quality": { "required": false },
        }),
    );
    assert_eq!(status, 201, "{created}");
    let done = wait_for("the rollout completed", Duration::from_secs(180), || {
        let r = a.get("/api/v1/rollouts/kws-2");
        while let Ok(e) = events.try_recv() {
            if let tinyfleet_sim::SimEventKind::Error(err) = &e.kind {
                panic!("device {} failed: {err}", e.device);
            }
        }
        // The last stage completes once its gates pass, with some devices still installing;
        // their confirmations keep arriving after.
        let finished = r["state"] == "aborted"
            || (r["state"] == "completed" && r["totals"]["confirmed"] == DEVICES as u64);
        finished.then_some(r)
    });
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["totals"]["confirmed"], DEVICES as u64, "{done}");
    assert_eq!(done["totals"]["timed_out"], 0, "{done}");
    wait_for("every device on 2.0", Duration::from_secs(30), || {
        let c = cohorts();
        (c.len() == DEVICES && c.iter().all(|c| c == "kws@2.0/nrf52840")).then_some(())
    });
    // Both processes handled progress reports: the replica's reached the rollouts only
    // through the store.
    let at_b = metric(
        &b.api,
        "tinyfleet_ingest_accepted_total{kind=\"progress\"} ",
    );
    let at_a = a.counter("accepted.progress");
    assert!(
        at_b > 0 && at_a > 0,
        "progress reports at the all process: {at_a}, at the replica: {at_b}"
    );
    eprintln!("progress reports: {at_a} at the all process, {at_b} at the replica");

    let _ = stop.send(true);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    b.stop();
    a.stop();
}

/// With Mosquitto keeping ingest's persistent session, a `kill -9` of the server loses nothing:
/// what devices published meanwhile waits in the broker. A clean broker restart (sessions and
/// queued messages saved) loses nothing either: devices and ingest reconnect by themselves.
/// Every summary a device saw acknowledged is counted exactly once, with no gap.
#[test]
fn kill_9_of_the_server_and_a_broker_restart_lose_no_acknowledged_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mut mosquitto) = Mosquitto::start(dir.path()) else {
        return;
    };
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let config = single_server_config(&data, &mosquitto, "");
    let config_path = dir.path().join("serve.toml");
    let server = Server::start_config(&data, &config_path, &config);
    let devices: Vec<SimDevice> = (0..4)
        .map(|i| server.provision(&format!("f-{i}")))
        .collect();
    for d in &devices {
        wait_for(
            "device accepted by Mosquitto",
            Duration::from_secs(20),
            || d.connect_with(mosquitto.devices, &d.password).ok(),
        )
        .disconnect();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicU64>> = devices.iter().map(|_| Arc::default()).collect();
    let total = || counts.iter().map(|c| c.load(Ordering::SeqCst)).sum::<u64>();
    let threads: Vec<_> = devices
        .into_iter()
        .zip(&counts)
        .map(|(d, c)| {
            let (stop, c, addr) = (stop.clone(), c.clone(), mosquitto.devices);
            std::thread::spawn(move || publish_until_stopped(d, addr, stop, c))
        })
        .collect();
    let more = |n: u64, what: &str| {
        let from = total();
        wait_for(what, Duration::from_secs(60), || {
            (total() >= from + n).then_some(())
        });
    };

    more(100, "summaries flowing");
    server.kill9();
    // The server is gone; devices keep publishing and Mosquitto keeps acknowledging.
    more(
        50,
        "summaries acknowledged by Mosquitto while the server is down",
    );
    let server = Server::start_config(&data, &config_path, &config);
    more(100, "summaries flowing after the server came back");
    mosquitto.restart();
    more(100, "summaries flowing after the broker restart");
    stop.store(true, Ordering::SeqCst);
    let devices: Vec<SimDevice> = threads
        .into_iter()
        .map(|t| t.join().expect("device thread"))
        .collect();
    for (d, c) in devices.iter().zip(&counts) {
        let acked = c.load(Ordering::SeqCst) as i64;
        wait_for(
            &format!("{} counted", d.id),
            Duration::from_secs(30),
            || (server.device_summaries(&d.id) >= acked).then_some(()),
        );
        let state = &server.get(&format!("/api/v1/devices/{}", d.id))["state"];
        assert_eq!(
            state["summaries"].as_i64(),
            Some(acked),
            "{}: {state}",
            d.id
        );
        assert_eq!(
            state["lost_summaries"].as_i64(),
            Some(0),
            "{}: {state}",
            d.id
        );
    }
    eprintln!("{} summaries acknowledged, all counted once", total());
    server.stop();
}

/// Ingest's stall watchdog through Mosquitto: its probes on `tf/probe/{client id}` pass the
/// generated ACL and come back, so an idle, healthy connection is never taken for a stalled one.
/// A new probe goes out only once the previous one returned (or was declared lost, which counts
/// a stall): three probes seen and no stall counted means they made the round trip.
#[test]
fn ingest_stall_probes_make_the_round_trip_through_mosquitto() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mosquitto) = Mosquitto::start(dir.path()) else {
        return;
    };
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let config = single_server_config(&data, &mosquitto, "stall_timeout_secs = 4");
    let server = Server::start_config(&data, &dir.path().join("serve.toml"), &config);
    let (_watcher, events) = subscriber(
        mosquitto.services,
        "probe-watcher",
        SERVICE_USER,
        SERVICE_PASSWORD,
        &["tf/probe/#".to_owned()],
    );
    let mut probes = std::collections::BTreeSet::new();
    wait_for("three probes", Duration::from_secs(30), || {
        while let Ok(event) = events.try_recv() {
            if let Event::Incoming(Packet::Publish(p)) = event {
                assert!(p.topic.starts_with("tf/probe/"), "{}", p.topic);
                if !p.payload.is_empty() {
                    probes.insert(p.payload.to_vec());
                }
            }
        }
        (probes.len() >= 3).then_some(())
    });
    assert_eq!(
        metric(&server.api, "tinyfleet_ingest_broker_stalls_total"),
        0
    );
    server.stop();
}

/// Edge brokers: a fleet larger than one broker process can hold (its open-file limit) is
/// spread over edge Mosquittos, each bridged to the core with the section
/// `tinyfleet broker mosquitto-bridge` prints; tinyfleet connects to the core only. Devices on
/// the edge authenticate from the password file `serve` keeps (one reload command for every
/// broker), their summaries reach ingest through the core, and an offer published on the core
/// comes down to the device, while the edge's ACL still confines each device.
#[test]
fn devices_on_a_bridged_edge_broker_reach_ingest_through_the_core() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(core) = Mosquitto::start(dir.path()) else {
        return;
    };
    // The edge: a device listener like the core's, the same password and ACL files, and the
    // bridge (logging in to the core's service listener as a service user).
    let edge_dir = dir.path().join("edge");
    std::fs::create_dir(&edge_dir).expect("edge dir");
    std::fs::write(edge_dir.join("bridge.password"), SERVICE_PASSWORD).expect("password");
    let bridge = tinyfleet(&[
        "broker",
        "mosquitto-bridge",
        "--name",
        "edge-0",
        "--core",
        &core.services.to_string(),
        "--username",
        SERVICE_USER,
        "--password-file",
        &edge_dir.join("bridge.password").display().to_string(),
    ]);
    let edge_addr = free_port();
    std::fs::write(
        edge_dir.join("mosquitto.conf"),
        format!(
            "user root\nper_listener_settings true\npersistence false\n\
             listener {} {}\nuse_username_as_clientid true\nallow_anonymous false\n\
             password_file {}\nacl_file {}\n{bridge}",
            edge_addr.port(),
            edge_addr.ip(),
            dir.path().join("passwd").display(),
            dir.path().join("acl").display(),
        ),
    )
    .expect("edge conf");
    let mut edge = Mosquitto {
        child: Mosquitto::spawn(core.bin, &edge_dir),
        bin: core.bin,
        dir: edge_dir,
        devices: edge_addr,
        services: edge_addr,
    };
    edge.wait_listening();

    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let reload = format!(
        "password_file = {:?}\nreload_command = [\"kill\", \"-HUP\", \"{}\", \"{}\"]",
        dir.path().join("passwd"),
        core.child.id(),
        edge.child.id()
    );
    let server = Server::start_config(
        &data,
        &dir.path().join("serve.toml"),
        &replica_config(&data, &core, "all", "ingest-core", &reload, ""),
    );
    let mut devices: Vec<_> = (0..2)
        .map(|i| server.provision(&format!("edge-dev-{i}")))
        .collect();
    for d in &devices {
        wait_for(
            &format!("{} accepted by the edge", d.id),
            Duration::from_secs(20),
            || d.connect_with(edge.devices, &d.password).ok(),
        )
        .disconnect();
    }
    assert!(
        devices[0].connect_with(edge.devices, "wrong").is_err(),
        "the edge refuses a wrong password"
    );

    // Up: a hello and 5 summaries per device, published on the edge, all counted by ingest.
    let before = server.counter("accepted.summary");
    for d in &mut devices {
        let mut s = d.connect(edge.devices);
        let mut messages = vec![d.hello(0)];
        messages.extend((0..5).map(|_| d.next_summary()));
        s.publish_acked(&messages, false);
        s.disconnect();
    }
    wait_for(
        "10 summaries through the bridge",
        Duration::from_secs(30),
        || (server.counter("accepted.summary") - before == 10).then_some(()),
    );
    assert_eq!(server.device_summaries("edge-dev-1"), 5);

    // Down: an offer published on the core reaches its device on the edge, another device's
    // does not (the edge's ACL).
    offers_reach_only_their_device(&core, edge.devices, &devices[0], "edge-dev-1");
    server.stop();
}
