//! A broker connection that stays up but delivers nothing (seen with Mosquitto 2.0.11 under disk
//! load): ingest's stall watchdog notices that its own probe never comes back, reconnects, and
//! the broker re-sends what it held back.
//!
//! Real parts: the embedded broker (rumqttd), ingest's MQTT source, a device publishing with
//! rumqttc. Between ingest and the broker sits a TCP relay that, once frozen, swallows every
//! PUBLISH the broker sends on the connection open at that moment while passing everything else
//! (CONNACK, SUBACK, PINGRESP), so keep-alive sees a healthy link: exactly the failure seen.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tinyfleet_broker::client::ClientConfig;
use tinyfleet_ingest::auth::SERVICE_USER;
use tinyfleet_ingest::metrics::Metrics;
use tinyfleet_ingest::shell::Incoming;
use tinyfleet_ingest::source::SourceConfig;
use tinyfleet_store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

mod support;

use support::SERVICE_PASSWORD;

/// A TCP relay in front of the broker; [`Relay::freeze`] makes the connection open now drop
/// every PUBLISH coming from the broker.
struct Relay {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    /// The number (from 1) of the connection to freeze; 0 = none.
    frozen: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let frozen = Arc::new(AtomicUsize::new(0));
        let (count, freeze) = (connections.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(broker) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let freeze = freeze.clone();
                tokio::spawn(relay(client, broker, number, freeze));
            }
        });
        Relay {
            addr,
            connections,
            frozen,
        }
    }

    fn freeze(&self) {
        self.frozen
            .store(self.connections.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn relay(client: TcpStream, broker: TcpStream, number: usize, frozen: Arc<AtomicUsize>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = broker.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_rx, &mut broker_tx).await;
    };
    let down = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match broker_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while let Some(len) = packet_len(&buf) {
                let packet: Vec<u8> = buf.drain(..len).collect();
                let is_publish = packet[0] >> 4 == 3;
                if is_publish && frozen.load(Ordering::SeqCst) == number {
                    continue;
                }
                if client_tx.write_all(&packet).await.is_err() {
                    return;
                }
            }
        }
    };
    // Either side closing ends both.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// The length of the first whole MQTT packet in `buf` (fixed header included), if complete.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 2 + i + remaining;
            return (buf.len() >= total).then_some(total);
        }
    }
    panic!("malformed remaining length from the broker")
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_delivers_nothing_is_reconnected_and_loses_nothing() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let broker = support::start_broker(&store).await;
    let relay = Relay::start(broker.local_addr()).await;

    // Ingest's source through the relay, with a short stall timeout; a consumer that
    // acknowledges every message at once and hands its payload to the test.
    let metrics = Arc::new(Metrics::default());
    let subscribed = Arc::new(AtomicBool::new(false));
    let (_shutdown, shutdown_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::channel::<Incoming>(100);
    let client = ClientConfig {
        url_host: relay.addr.ip().to_string(),
        port: relay.addr.port(),
        client_id: "tinyfleet-ingest-stall".into(),
        username: Some(SERVICE_USER.into()),
        password: Some(SERVICE_PASSWORD.into()),
        ..ClientConfig::default()
    };
    tokio::spawn(tinyfleet_ingest::source::run(
        SourceConfig {
            stall_timeout: Some(Duration::from_secs(2)),
            ..SourceConfig::new(client)
        },
        tx,
        metrics.clone(),
        subscribed.clone(),
        shutdown_rx,
    ));
    let (got_tx, mut got) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if let Some((acker, token)) = m.ack {
                acker.ack(token);
            }
            let _ = got_tx.send((m.topic, m.payload));
        }
    });
    wait_for("ingest subscribed", || subscribed.load(Ordering::SeqCst)).await;

    // A device, straight to the broker.
    let creds = store
        .registry()
        .provision("dev-1", BTreeMap::new())
        .unwrap();
    let mut opts = MqttOptions::new("dev-1", broker.local_addr().ip().to_string(), {
        broker.local_addr().port()
    });
    opts.set_credentials("dev-1", creds.mqtt_password);
    let (device, mut eventloop) = AsyncClient::new(opts, 10);
    let (puback_tx, mut pubacks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                let _ = puback_tx.send(());
            }
        }
    });
    let topic = "tf/v1/dev-1/sum";
    let mut publish = async |payload: &[u8]| {
        device
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), pubacks.recv())
            .await
            .expect("the broker acknowledges the device")
            .unwrap();
    };
    let next = async |got: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>| {
        tokio::time::timeout(Duration::from_secs(20), got.recv())
            .await
            .expect("ingest receives the message")
            .unwrap()
    };

    publish(b"before").await;
    assert_eq!(next(&mut got).await, (topic.to_owned(), b"before".to_vec()));
    assert_eq!(relay.connections.load(Ordering::SeqCst), 1);

    // The connection goes quiet: pings still answered, publishes swallowed.
    relay.freeze();
    publish(b"held back").await;
    assert_eq!(
        next(&mut got).await,
        (topic.to_owned(), b"held back".to_vec()),
        "delivered again after the watchdog's reconnect"
    );
    assert_eq!(relay.connections.load(Ordering::SeqCst), 2);
    assert_eq!(metrics.broker_stalls.load(Ordering::Relaxed), 1);
    assert!(
        metrics
            .render()
            .contains("tinyfleet_ingest_broker_stalls_total 1"),
        "{}",
        metrics.render()
    );

    // Later messages flow on the new connection; the probes never reach the pipeline.
    publish(b"after").await;
    assert_eq!(next(&mut got).await, (topic.to_owned(), b"after".to_vec()));
    assert!(got.try_recv().is_err(), "nothing else, and no probe");
}
