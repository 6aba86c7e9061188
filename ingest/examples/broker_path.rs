//! The whole path through the embedded broker, side by side in one run:
//!
//! 1. **forwarding**: publishers -> embedded broker -> a subscriber that only counts (QoS 1);
//!    then the same subscriber acknowledging each message itself (as ingest does), over TCP
//!    with rumqttc and over rumqttd's in-process link (no TCP, no MQTT codec, no rumqttc);
//! 2. **ingest**: the same publishers and messages (new boot, so nothing is a duplicate) ->
//!    embedded broker -> ingest (verify, decode, dedup, aggregate, SQLite commit, then PUBACK);
//! 3. **ingest over the in-process link, an upper bound**: the same shell and pipeline fed by
//!    rumqttd's in-process link instead of rumqttc over TCP. The link acknowledges each message
//!    on receipt (the shell's acknowledgements are tied to rumqttc), so this is what such a
//!    source could reach, not a durable path: it measures whether one is worth building.
//!
//! Reports messages per second for each and their ratio (docs/benchmarks.md).
//!
//! cargo run --release -p tinyfleet-ingest --example broker_path -- [devices] [summaries per device] [publishers] [ingest connections] [journal 1|0]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tinyfleet_broker::client::ClientConfig;
use tinyfleet_broker::embedded::LocalLink;
use tinyfleet_broker::{BrokerConfig, EmbeddedBroker};
use tinyfleet_device::testkit::{ReferenceProfile, Rng, StreamParams, sample};
use tinyfleet_device::wire::{DeviceId, Kind, Topic};
use tinyfleet_device::{DeviceKey, ReferenceMonitor};
use tinyfleet_ingest::auth::{FleetAuth, SERVICE_USER};
use tinyfleet_ingest::metrics::Metrics;
use tinyfleet_ingest::pipeline::{Pipeline, PipelineConfig};
use tinyfleet_ingest::shell::{self, Incoming, ShellConfig};
use tinyfleet_ingest::source::SourceConfig;
use tinyfleet_store::Store;
use tokio::sync::{mpsc, watch};

const SERVICE_PASSWORD: &str = "bench-service-password";

/// CPU time of this whole process so far (broker, publishers, subscribers and ingest), from
/// `/proc/self/stat` (Linux; zero elsewhere).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split(' ')
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

struct Fleet {
    ids: Vec<String>,
    keys: Vec<DeviceKey>,
    passwords: Vec<String>,
}

/// `per_device` summaries (10 inferences each) of boot `boot` for every device, interleaved.
fn messages(fleet: &Fleet, boot: u32, per_device: usize) -> Vec<(String, Vec<u8>)> {
    let profile = ReferenceProfile::default();
    let mut out = Vec::with_capacity(fleet.ids.len() * per_device);
    let mut monitors: Vec<_> = fleet
        .ids
        .iter()
        .map(|_| ReferenceMonitor::new(profile.config(1), boot, 0, 0))
        .collect();
    let mut rng = Rng::new(u64::from(boot));
    for w in 0..per_device {
        for (i, id) in fleet.ids.iter().enumerate() {
            let m = &mut monitors[i];
            for _ in 0..10 {
                let s = sample(&mut rng, &StreamParams::default());
                let _ = m.record(&s.inference());
            }
            let did = DeviceId::new(id).unwrap_or_else(|_| unreachable!());
            let mut buf = [0u8; 512];
            if let Ok(n) = m.finish_window(w as u64 * 1000, None, did, &fleet.keys[i], &mut buf) {
                out.push((
                    Topic::new(did, Kind::Summary).as_str().to_owned(),
                    buf[..n].to_vec(),
                ));
            }
        }
    }
    out
}

/// Publishes everything over `publishers` connections (QoS 1); returns when all are acked.
async fn publish_all(
    broker: &EmbeddedBroker,
    fleet: &Fleet,
    msgs: Arc<Vec<(String, Vec<u8>)>>,
    publishers: usize,
) {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let addr = broker.local_addr();
        let id = fleet.ids[p].clone();
        let password = fleet.passwords[p].clone();
        let msgs = msgs.clone();
        tasks.push(tokio::spawn(async move {
            let mut opts = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
            opts.set_credentials(&id, password);
            opts.set_inflight(200);
            opts.set_max_packet_size(20_000, 20_000);
            let (client, mut eventloop) = AsyncClient::new(opts, 1000);
            let mine: Vec<_> = msgs.iter().skip(p).step_by(publishers).cloned().collect();
            let total = mine.len();
            let sender = tokio::spawn(async move {
                for (topic, payload) in mine {
                    if client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                client
            });
            let mut acked = 0;
            while acked < total {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => panic!("publisher {p}: {e}"),
                }
            }
            let _client = sender.await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Publishes `msgs` to a subscriber that only counts them, acknowledging each itself when
/// `manual_acks` (rumqttc sends each such PUBACK on its own, as for ingest) or letting rumqttc do
/// it. Returns the time until all arrived and the process CPU time meanwhile.
async fn forward(
    broker: &EmbeddedBroker,
    fleet: &Fleet,
    msgs: &Arc<Vec<(String, Vec<u8>)>>,
    publishers: usize,
    manual_acks: bool,
) -> (Duration, Duration) {
    let n = msgs.len() as u64;
    let addr = broker.local_addr();
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let mut opts = MqttOptions::new("tinyfleet-counter", addr.ip().to_string(), addr.port());
    opts.set_credentials(SERVICE_USER, SERVICE_PASSWORD);
    opts.set_max_packet_size(20_000, 20_000);
    opts.set_manual_acks(manual_acks);
    let (sub, mut sub_loop) = AsyncClient::new(opts, 1000);
    let acker = sub.clone();
    let (subscribed_tx, mut subscribed) = mpsc::channel(1);
    let sub_task = tokio::spawn(async move {
        while let Ok(ev) = sub_loop.poll().await {
            match ev {
                Event::Incoming(Packet::Publish(p)) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                    if manual_acks {
                        let _ = acker.try_ack(&p);
                    }
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = subscribed_tx.try_send(());
                }
                _ => {}
            }
        }
    });
    let _ = sub.subscribe("tf/v1/+/sum", QoS::AtLeastOnce).await;
    let _ = subscribed.recv().await;
    let (t0, cpu0) = (Instant::now(), process_cpu());
    publish_all(broker, fleet, msgs.clone(), publishers).await;
    while received.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = t0.elapsed();
    let cpu = process_cpu().saturating_sub(cpu0);
    let _ = sub.disconnect().await;
    sub_task.abort();
    (elapsed, cpu)
}

/// The forwarding of [`forward`] with manual acks, to a subscriber on rumqttd's in-process link
/// instead of a TCP client: it subscribes at QoS 1, counts each message and acknowledges it on
/// its own (in order, as rumqttd requires), on a thread of its own (the link's calls block).
/// Returns the time until all arrived and the process CPU time meanwhile.
async fn forward_local(
    broker: &EmbeddedBroker,
    fleet: &Fleet,
    msgs: &Arc<Vec<(String, Vec<u8>)>>,
    publishers: usize,
    link: LocalLink,
) -> (Duration, Duration) {
    let n = msgs.len() as u64;
    through_link(broker, fleet, msgs.clone(), publishers, link, None, |got| {
        got >= n
    })
    .await
}

/// Runs [`local_subscriber`] over `link` on a thread of its own (handing each message to
/// `deliver` when given), publishes `msgs` once it is subscribed, and waits until `done` holds
/// for the number of messages the link took. Returns the time from the first publish until
/// then and the process CPU time meanwhile.
async fn through_link(
    broker: &EmbeddedBroker,
    fleet: &Fleet,
    msgs: Arc<Vec<(String, Vec<u8>)>>,
    publishers: usize,
    link: LocalLink,
    deliver: Option<mpsc::Sender<Incoming>>,
    done: impl Fn(u64) -> bool,
) -> (Duration, Duration) {
    let n = msgs.len() as u64;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let subscriber =
        std::thread::spawn(move || local_subscriber(link, n, &counter, &subscribed_tx, deliver));
    subscribed
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("in-process subscriber not subscribed: {e}"));
    let (t0, cpu0) = (Instant::now(), process_cpu());
    publish_all(broker, fleet, msgs, publishers).await;
    while !done(received.load(Ordering::Relaxed)) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "stalled with {} of {n} messages through the in-process link",
            received.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = t0.elapsed();
    let cpu = process_cpu().saturating_sub(cpu0);
    let _ = tokio::task::spawn_blocking(move || subscriber.join()).await;
    (elapsed, cpu)
}

/// The in-process subscriber of [`forward_local`]: takes `n` messages, then unsubscribes. With
/// `deliver`, each message also goes to an ingest shell (acknowledged on receipt all the same).
fn local_subscriber(
    link: LocalLink,
    n: u64,
    counter: &AtomicU64,
    subscribed: &std::sync::mpsc::Sender<()>,
    deliver: Option<mpsc::Sender<Incoming>>,
) {
    use rumqttd::Notification;
    use rumqttd::protocol::{
        Filter, Packet, PubAck, PubAckReason, QoS, RetainForwardRule, Subscribe, Unsubscribe,
    };
    let LocalLink { mut tx, mut rx } = link;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let filter = Filter {
        path: "tf/v1/+/sum".into(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::Never,
    };
    let subscribe = Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![filter],
        },
        None,
    );
    runtime
        .block_on(tx.send(subscribe))
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let mut got = 0u64;
    while got < n {
        match rx.recv() {
            Ok(Some(Notification::Forward(forward))) => {
                if let Some(deliver) = &deliver {
                    let incoming = Incoming {
                        topic: String::from_utf8_lossy(&forward.publish.topic).into_owned(),
                        payload: forward.publish.payload.to_vec(),
                        received_ms: tinyfleet_store::now_ms(),
                        ack: None,
                    };
                    if deliver.blocking_send(incoming).is_err() {
                        return;
                    }
                }
                // rumqttd numbers a connection's QoS 1 deliveries 1, 2, ..., 100, 1, ... (its
                // in-flight window; `Publish::pkid` is not public) and wants them acknowledged
                // in that order: a wrong id disconnects the link and stalls this phase.
                let pkid = (got % 100) as u16 + 1;
                got += 1;
                counter.fetch_add(1, Ordering::Relaxed);
                let ack = Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                );
                if runtime.block_on(tx.send(ack)).is_err() {
                    return;
                }
            }
            Ok(Some(Notification::DeviceAck(_))) => {
                let _ = subscribed.send(());
            }
            // The router paused this link (its buffer was full) until it is ready again.
            Ok(Some(Notification::Unschedule)) => {
                let _ = rx.ready();
            }
            Ok(_) => {}
            Err(e) => panic!("in-process subscriber: {e}"),
        }
    }
    // Unsubscribe rather than disconnect: the router would log an error for each of the acks'
    // wake-up events still queued behind a disconnect.
    let unsubscribe = Packet::Unsubscribe(
        Unsubscribe {
            pkid: 2,
            filters: vec!["tf/v1/+/sum".into()],
        },
        None,
    );
    let _ = runtime.block_on(tx.send(unsubscribe));
}

/// The shell and pipeline of ingest over `store`, running; returns its metrics, where messages
/// go in, and the shutdown signal the shell's source also watches.
fn start_shell(
    store: &Store,
    journal: Option<std::path::PathBuf>,
) -> (
    Arc<Metrics>,
    mpsc::Sender<Incoming>,
    watch::Sender<bool>,
    watch::Receiver<bool>,
) {
    let metrics = Arc::new(Metrics::default());
    let pipeline = Pipeline::new(
        PipelineConfig {
            collect_events: false,
            ..PipelineConfig::default()
        },
        store.clone(),
        metrics.clone(),
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel(4000);
    tokio::spawn(shell::run(
        pipeline,
        rx,
        ShellConfig {
            journal,
            ..ShellConfig::default()
        },
        Vec::new(),
        shutdown_rx.clone(),
    ));
    (metrics, tx, shutdown, shutdown_rx)
}

/// Phase 3: the shell and pipeline of phase 2 fed by an in-process link that acknowledges on
/// receipt (see the module documentation). Returns the time until every message was accepted
/// and the process CPU time meanwhile.
async fn ingest_local(
    broker: &EmbeddedBroker,
    fleet: &Fleet,
    store: &Store,
    journal: Option<std::path::PathBuf>,
    msgs: Arc<Vec<(String, Vec<u8>)>>,
    publishers: usize,
    link: LocalLink,
) -> (Duration, Duration) {
    let n = msgs.len() as u64;
    let (metrics, tx, _shutdown, _) = start_shell(store, journal);
    let ingested =
        |_| metrics.accepted("summary") >= n && metrics.pending.load(Ordering::Relaxed) == 0;
    through_link(broker, fleet, msgs, publishers, link, Some(tx), ingested).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TINYFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let devices = args.first().copied().unwrap_or(2000);
    let per_device = args.get(1).copied().unwrap_or(25);
    let publishers = args.get(2).copied().unwrap_or(8).min(devices);
    let connections = args.get(3).copied().unwrap_or(1);
    // 5th argument: 1 = journal mode (ack after the journal's fsync), 0 = commit every batch.
    let journal = args.get(4).copied().unwrap_or(1) == 1;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("store: {e}"));
    let mut fleet = Fleet {
        ids: Vec::new(),
        keys: Vec::new(),
        passwords: Vec::new(),
    };
    for d in 0..devices {
        let id = format!("dev-{d:06}");
        let tags = BTreeMap::from([("site".to_owned(), format!("s{}", d % 4))]);
        let creds = store
            .registry()
            .provision(&id, tags)
            .unwrap_or_else(|e| panic!("provision: {e}"));
        let key: [u8; 32] = hex::decode(&creds.mac_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .unwrap_or_else(|| unreachable!());
        fleet.ids.push(id);
        fleet.keys.push(DeviceKey(key));
        fleet.passwords.push(creds.mqtt_password);
    }
    let broker_config = BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        ..BrokerConfig::default()
    };
    let auth = Arc::new(FleetAuth {
        registry: store.registry().clone(),
        service_password: SERVICE_PASSWORD.into(),
        devices_allowed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    });
    let (broker, mut links) = tokio::task::spawn_blocking(move || {
        EmbeddedBroker::start_with_links(
            &broker_config,
            auth,
            &["tinyfleet-local-counter", "tinyfleet-local-ingest"],
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("broker: {e}"));
    let (Some(ingest_link), Some(local_link)) = (links.pop(), links.pop()) else {
        unreachable!()
    };
    let addr = broker.local_addr();

    let forwarding_msgs = Arc::new(messages(&fleet, 1, per_device));
    let ingest_msgs = Arc::new(messages(&fleet, 2, per_device));
    let local_ingest_msgs = Arc::new(messages(&fleet, 3, per_device));
    let n = forwarding_msgs.len() as u64;
    let size = forwarding_msgs.iter().map(|m| m.1.len()).sum::<usize>() / n.max(1) as usize;
    println!(
        "{devices} devices x {per_device} summaries = {n} messages of ~{size} bytes, {publishers} publisher connections, {connections} ingest connections, journal {journal}"
    );

    // 1. Plain forwarding to a subscriber that does nothing but count; then the same with the
    //    subscriber acknowledging each message itself (manual acks, as ingest does).
    let (forwarding, forwarding_cpu) =
        forward(&broker, &fleet, &forwarding_msgs, publishers, false).await;
    let (acking, acking_cpu) = forward(&broker, &fleet, &forwarding_msgs, publishers, true).await;
    let (local, local_cpu) =
        forward_local(&broker, &fleet, &forwarding_msgs, publishers, local_link).await;

    // 2. The ingest path.
    let (metrics, tx, _shutdown, shutdown_rx) =
        start_shell(&store, journal.then(|| dir.path().join("ingest.journal")));
    let client = ClientConfig {
        url_host: addr.ip().to_string(),
        port: addr.port(),
        client_id: "tinyfleet-ingest-bench".into(),
        username: Some(SERVICE_USER.into()),
        password: Some(SERVICE_PASSWORD.into()),
        ..ClientConfig::default()
    };
    tokio::spawn(tinyfleet_ingest::source::run(
        SourceConfig {
            connections,
            ..SourceConfig::new(client)
        },
        tx,
        metrics.clone(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        shutdown_rx,
    ));
    // Wait until ingest is subscribed: a probe summary must come through.
    // Boot 0: older than the measured messages' boot 2, so it makes none of them stale.
    let probe = Arc::new(
        messages(&fleet, 0, 1)
            .into_iter()
            .take(1)
            .collect::<Vec<_>>(),
    );
    while metrics.accepted("summary") == 0 {
        publish_all(&broker, &fleet, probe.clone(), 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = metrics.accepted("summary");
    let (t0, cpu0) = (Instant::now(), process_cpu());
    publish_all(&broker, &fleet, ingest_msgs, publishers).await;
    while metrics.accepted("summary") < base + n || metrics.pending.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ingest = t0.elapsed();
    let ingest_cpu = process_cpu().saturating_sub(cpu0);
    let commits = metrics.commits.load(Ordering::Relaxed);
    let commit_ms = metrics.commit_seconds_sum_us.load(Ordering::Relaxed) as f64
        / 1000.0
        / commits.max(1) as f64;
    // 3. The same shell and pipeline over the in-process link (boot 3: nothing is a duplicate).
    let (local_ingest, local_ingest_cpu) = ingest_local(
        &broker,
        &fleet,
        &store,
        journal.then(|| dir.path().join("ingest-local.journal")),
        local_ingest_msgs,
        publishers,
        ingest_link,
    )
    .await;

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    // CPU per message: everything in this process (broker, publishers, subscriber or ingest).
    let cpu_us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!("| path | messages | seconds | messages/s | process CPU per message |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| forwarding (broker -> counting subscriber) | {n} | {:.2} | {:.0} | {:.1} us |",
        forwarding.as_secs_f64(),
        rate(forwarding),
        cpu_us(forwarding_cpu)
    );
    println!(
        "| forwarding, acknowledged one by one by the subscriber (as ingest does) | {n} | {:.2} | {:.0} | {:.1} us |",
        acking.as_secs_f64(),
        rate(acking),
        cpu_us(acking_cpu)
    );
    println!(
        "| forwarding to an in-process link (rumqttd's local link), acknowledged one by one | {n} | {:.2} | {:.0} | {:.1} us |",
        local.as_secs_f64(),
        rate(local),
        cpu_us(local_cpu)
    );
    let mode = if journal {
        "verify, decode, dedup, aggregate, journal fsync, ack; checkpoint each second"
    } else {
        "verify, decode, dedup, aggregate, commit, ack"
    };
    println!(
        "| ingest (broker -> {mode}) | {n} | {:.2} | {:.0} | {:.1} us |",
        ingest.as_secs_f64(),
        rate(ingest),
        cpu_us(ingest_cpu)
    );
    println!(
        "| ingest over the in-process link, acknowledged on receipt (an upper bound, not durable) | {n} | {:.2} | {:.0} | {:.1} us |",
        local_ingest.as_secs_f64(),
        rate(local_ingest),
        cpu_us(local_ingest_cpu)
    );
    println!(
        "ingest / forwarding = {:.0}%; {commits} store commits of {:.0} messages, {commit_ms:.2} ms each; rejected: {}",
        100.0 * rate(ingest) / rate(forwarding),
        n as f64 / commits.max(1) as f64,
        metrics.rejected("forged") + metrics.rejected("bad_body") + metrics.rejected("duplicate")
    );
}
