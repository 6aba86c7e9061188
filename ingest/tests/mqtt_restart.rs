//! Ingest crashes and restarts while devices keep publishing: every summary a device saw
//! acknowledged by the broker is counted exactly once.
//!
//! Real parts: the embedded broker (rumqttd), the SQLite store, ingest's MQTT source and shell,
//! and devices publishing with rumqttc. The crash aborts ingest's tasks, so whatever it had
//! received but not committed is lost from its memory, exactly as with `kill -9` of an ingest
//! process; its acknowledgements were never sent, so the broker redelivers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tinyfleet_broker::EmbeddedBroker;
use tinyfleet_broker::client::ClientConfig;
use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
use tinyfleet_device::wire::{DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};
use tinyfleet_ingest::auth::SERVICE_USER;
use tinyfleet_ingest::metrics::Metrics;
use tinyfleet_ingest::pipeline::{Pipeline, PipelineConfig};
use tinyfleet_ingest::shell::{self, ShellConfig};
use tinyfleet_ingest::source::SourceConfig;
use tinyfleet_store::Store;
use tokio::sync::{mpsc, watch};

mod support;

use support::SERVICE_PASSWORD;

struct Ingest {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _shutdown: watch::Sender<bool>,
}

fn start_ingest(
    store: &Store,
    broker: &EmbeddedBroker,
    journal: Option<&std::path::Path>,
) -> Ingest {
    let metrics = Arc::new(Metrics::default());
    let pipeline = Pipeline::new(PipelineConfig::default(), store.clone(), metrics.clone());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel(100);
    let client = ClientConfig {
        url_host: broker.local_addr().ip().to_string(),
        port: broker.local_addr().port(),
        client_id: "tinyfleet-ingest-test".into(),
        username: Some(SERVICE_USER.into()),
        password: Some(SERVICE_PASSWORD.into()),
        ..ClientConfig::default()
    };
    let source = tokio::spawn(tinyfleet_ingest::source::run(
        SourceConfig::new(client),
        tx,
        metrics.clone(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        shutdown_rx.clone(),
    ));
    let shell = tokio::spawn(shell::run(
        pipeline,
        rx,
        ShellConfig {
            // Small batches, so that a crash lands between commits with work in flight.
            max_batch: 7,
            flush_interval: Duration::from_millis(30),
            journal: journal.map(ToOwned::to_owned),
            checkpoint_interval: Duration::from_millis(40),
            ..ShellConfig::default()
        },
        Vec::new(),
        shutdown_rx,
    ));
    Ingest {
        tasks: vec![source, shell],
        _shutdown: shutdown,
    }
}

impl Ingest {
    fn crash(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Device {
    id: String,
    key: DeviceKey,
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<()>,
    monitor: ReferenceMonitor<'static>,
    rng: Rng,
}

impl Device {
    async fn connect(store: &Store, broker: &EmbeddedBroker, id: &str) -> Device {
        let creds = store.registry().provision(id, BTreeMap::new()).unwrap();
        let key = DeviceKey(hex::decode(&creds.mac_key).unwrap().try_into().unwrap());
        let addr = broker.local_addr();
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_credentials(id, creds.mqtt_password);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = ev {
                    let _ = tx.send(());
                }
            }
        });
        let profile: &'static ReferenceProfile = Box::leak(Box::default());
        Device {
            id: id.into(),
            key,
            client,
            acks,
            monitor: ReferenceMonitor::new(profile.config(1), 1, 0, 0),
            rng: Rng::new(id.len() as u64),
        }
    }

    /// Publishes `n` summaries and waits until the broker acknowledged each.
    async fn publish(&mut self, n: usize) {
        let id = DeviceId::new(&self.id).unwrap();
        let topic = Topic::new(id, Kind::Summary).as_str().to_owned();
        for _ in 0..n {
            for _ in 0..20 {
                self.monitor
                    .record(&sample(&mut self.rng, &StreamParams::default()).inference())
                    .unwrap();
            }
            let mut out = [0u8; 512];
            let len = self
                .monitor
                .finish_window(1000, None, id, &self.key, &mut out)
                .unwrap();
            self.client
                .publish(topic.clone(), QoS::AtLeastOnce, false, out[..len].to_vec())
                .await
                .unwrap();
        }
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(10), self.acks.recv())
                .await
                .expect("broker acknowledges")
                .expect("connection alive");
        }
    }
}

async fn wait_for_counts(store: &Store, ids: &[&str], want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<u64> = ids
            .iter()
            .map(|id| store.device_state(id).unwrap().map_or(0, |s| s.summaries))
            .collect();
        if counts.iter().all(|&c| c == want) {
            return;
        }
        assert!(
            counts.iter().all(|&c| c <= want),
            "a summary was counted twice: {counts:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: summaries per device {counts:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_crash_loses_no_acknowledged_summary() {
    crash_and_restart(false).await;
}

/// Journal mode: acknowledged after the journal's fsync, checkpointed to SQLite later; the crash
/// lands between checkpoints, so the restart must replay the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_crash_in_journal_mode_loses_no_acknowledged_summary() {
    crash_and_restart(true).await;
}

async fn crash_and_restart(journaling: bool) {
    let dir = tempfile::tempdir().unwrap();
    let journal_path = dir.path().join("ingest.journal");
    let journal = journaling.then_some(journal_path.as_path());
    let store = Store::open(dir.path()).unwrap();
    let broker = support::start_broker(&store).await;
    let ids = ["dev-1", "dev-2", "dev-3"];
    let mut devices = Vec::new();
    for id in ids {
        devices.push(Device::connect(&store, &broker, id).await);
    }

    let ingest = start_ingest(&store, &broker, journal);
    // Ingest's first subscription creates its persistent session; nothing published before it
    // exists can be delivered. Wait for it: publish until a summary arrives.
    let mut probe = Device::connect(&store, &broker, "probe").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.device_state("probe").unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingest never subscribed"
        );
        probe.publish(1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for d in &mut devices {
        d.publish(10).await;
    }
    wait_for_counts(&store, &ids, 10).await;

    // Crash while messages are arriving, then keep publishing while ingest is down.
    for d in &mut devices {
        d.publish(15).await;
    }
    ingest.crash();
    for d in &mut devices {
        d.publish(15).await;
    }

    // A new ingest with the same client id resumes the persistent session.
    let ingest = start_ingest(&store, &broker, journal);
    wait_for_counts(&store, &ids, 40).await;
    for id in ids {
        let s = store.device_state(id).unwrap().unwrap();
        assert_eq!(s.lost_summaries, 0, "{id}");
    }
    ingest.crash();
}
