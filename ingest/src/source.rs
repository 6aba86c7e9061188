//! The MQTT source: subscribes to every device->cloud topic and feeds the shell.
//!
//! It connects with a persistent session (clean session off) and manual acknowledgements, so a
//! message is acknowledged to the broker only after the shell committed its effects, and
//! messages published while ingest is away wait in the broker. With a share group, subscriptions
//! are `$share/{group}/...` and several ingest replicas split the load.
//!
//! Throughput is bounded by the broker's in-flight window per connection (rumqttd: 100
//! unacknowledged QoS 1 messages) divided by the time to commit. So the source opens several
//! connections in one share group, and the shell commits as soon as most of the windows are
//! used (`docs/benchmarks.md`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tinyfleet_broker::client::{ClientConfig, ClientEvent, connect, shared};
use tinyfleet_device::Kind;
use tokio::sync::{mpsc, watch};

use crate::shell::Incoming;

/// The topic filters ingest subscribes to (device->cloud kinds).
pub fn filters() -> Vec<String> {
    Kind::ALL
        .into_iter()
        .filter(|k| k.from_device())
        .map(|k| format!("{}+/{}", tinyfleet_device::wire::TOPIC_PREFIX, k.suffix()))
        .collect()
}

/// The share group the connections of one ingest use when none is configured.
pub const DEFAULT_SHARE_GROUP: &str = "tinyfleet-ingest";

/// Runs `connections` connections (client ids `{client_id}-{i}`, or `client_id` alone for one)
/// until `shutdown` turns true. Several connections share one subscription group.
///
/// `subscribed` turns true once every connection holds all its subscriptions (the embedded
/// broker lets devices in only then: a message published before ingest subscribed would be
/// acknowledged to the device and dropped by the broker).
pub async fn run(
    client: ClientConfig,
    share_group: Option<String>,
    connections: usize,
    tx: mpsc::Sender<Incoming>,
    subscribed: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
) {
    let connections = connections.max(1);
    let group = match (share_group, connections) {
        (Some(g), _) => Some(g),
        (None, 1) => None,
        (None, _) => Some(DEFAULT_SHARE_GROUP.to_owned()),
    };
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let mut c = client.clone();
        if connections > 1 {
            c.client_id = format!("{}-{i}", client.client_id);
        }
        let on_subscribed = {
            let (ready, subscribed) = (ready.clone(), subscribed.clone());
            move || {
                if ready.fetch_add(1, Ordering::SeqCst) + 1 == connections {
                    subscribed.store(true, Ordering::SeqCst);
                }
            }
        };
        tasks.push(tokio::spawn(run_one(
            c,
            group.clone(),
            tx.clone(),
            on_subscribed,
            shutdown.clone(),
        )));
    }
    drop(tx);
    for t in tasks {
        let _ = t.await;
    }
}

async fn run_one(
    mut client: ClientConfig,
    share_group: Option<String>,
    tx: mpsc::Sender<Incoming>,
    on_subscribed: impl FnOnce(),
    mut shutdown: watch::Receiver<bool>,
) {
    let mut on_subscribed = Some(on_subscribed);
    let mut subacks = 0usize;
    client.clean_session = false;
    client.manual_acks = true;
    let (mqtt, mut conn) = connect(&client);
    let acker = conn.acker(&mqtt);
    let subscriptions: Vec<String> = filters()
        .iter()
        .map(|f| shared(share_group.as_deref(), f))
        .collect();
    loop {
        tokio::select! {
            event = conn.next() => match event {
                ClientEvent::Connected { session_present } => {
                    if session_present {
                        if let Some(f) = on_subscribed.take() {
                            f();
                        }
                    } else {
                        for filter in &subscriptions {
                            if let Err(e) = mqtt.try_subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce) {
                                tracing::error!(%filter, error = %e, "subscribe request failed");
                            }
                        }
                    }
                    tracing::info!(session_present, "ingest connected to the broker");
                }
                ClientEvent::Message(publish) => {
                    // Registered before the next poll, in receive order (see `Acker`).
                    let token = acker.token(&publish);
                    let incoming = Incoming {
                        topic: publish.topic,
                        payload: publish.payload.to_vec(),
                        received_ms: tinyfleet_store::now_ms(),
                        ack: Some((acker.clone(), token)),
                    };
                    if tx.send(incoming).await.is_err() {
                        break;
                    }
                }
                ClientEvent::Other(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    subacks += 1;
                    if subacks >= subscriptions.len()
                        && let Some(f) = on_subscribed.take()
                    {
                        f();
                    }
                }
                ClientEvent::Other(_) => {}
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = mqtt.try_disconnect();
}
