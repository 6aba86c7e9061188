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
//!
//! # The stall watchdog
//!
//! A broker can keep a connection up, answer its pings and still deliver nothing, while devices
//! keep getting their PUBACKs and the messages pile up in ingest's session (eclipse/mosquitto#2362
//! reports Mosquitto 2.0.11 holding QoS 1 messages until restarted; the stall seen here at
//! 50,000 devices turned out to be ingest's own, fixed in `Acker`). Keep-alive cannot see that.
//! So each
//! connection subscribes to a probe topic of its own, `tf/probe/{client id}`, and when nothing
//! was delivered for a while it publishes a probe there (QoS 1, through the same session queue
//! as device messages). If the probe does not come back within `stall_timeout`, nothing else
//! arrived meanwhile, and ingest owes the broker no acknowledgement (so the broker's in-flight
//! window is open), the connection is stalled: the source counts it
//! (`tinyfleet_ingest_broker_stalls_total`), logs it and reconnects. The broker then resumes the
//! persistent session and re-sends what was not acknowledged; dedup absorbs repeats.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttc::{QoS, SubscribeFilter};
use tinyfleet_broker::client::{Acker, ClientConfig, ClientEvent, connect, shared};
use tinyfleet_device::Kind;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
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

/// The topic a connection's own stall probes travel on (never a device topic: devices may only
/// use `tf/v1/{their id}/...`).
pub fn probe_topic(client_id: &str) -> String {
    format!("tf/probe/{client_id}")
}

/// How ingest connects.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The broker and ingest's identity (client ids are `{client_id}-{i}` with several
    /// connections).
    pub client: ClientConfig,
    /// `$share/{group}/...` subscriptions, to split the load with other replicas.
    pub share_group: Option<String>,
    /// Connections (at least 1); several share one subscription group.
    pub connections: usize,
    /// See the module documentation; `None` turns the watchdog off.
    pub stall_timeout: Option<Duration>,
}

impl SourceConfig {
    /// One connection, no share group, the watchdog on with [`DEFAULT_STALL_TIMEOUT`].
    pub fn new(client: ClientConfig) -> Self {
        SourceConfig {
            client,
            share_group: None,
            connections: 1,
            stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
        }
    }
}

/// How long a probe may stay undelivered, with nothing else delivered and nothing owed, before
/// the connection counts as stalled.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the configured connections until `shutdown` turns true.
///
/// `subscribed` turns true once every connection holds all its subscriptions (the embedded
/// broker lets devices in only then: a message published before ingest subscribed would be
/// acknowledged to the device and dropped by the broker).
pub async fn run(
    config: SourceConfig,
    tx: mpsc::Sender<Incoming>,
    metrics: Arc<Metrics>,
    subscribed: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
) {
    let connections = config.connections.max(1);
    let group = match (config.share_group, connections) {
        (Some(g), _) => Some(g),
        (None, 1) => None,
        (None, _) => Some(DEFAULT_SHARE_GROUP.to_owned()),
    };
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let mut c = config.client.clone();
        if connections > 1 {
            c.client_id = format!("{}-{i}", config.client.client_id);
        }
        let on_subscribed = {
            let (ready, subscribed) = (ready.clone(), subscribed.clone());
            move || {
                if ready.fetch_add(1, Ordering::SeqCst) + 1 == connections {
                    subscribed.store(true, Ordering::SeqCst);
                }
            }
        };
        let link = Link {
            share_group: group.clone(),
            stall_timeout: config.stall_timeout,
            tx: tx.clone(),
            metrics: metrics.clone(),
        };
        tasks.push(tokio::spawn(run_one(
            c,
            link,
            on_subscribed,
            shutdown.clone(),
        )));
    }
    drop(tx);
    for t in tasks {
        let _ = t.await;
    }
}

/// What one connection shares with the rest of ingest.
struct Link {
    share_group: Option<String>,
    stall_timeout: Option<Duration>,
    tx: mpsc::Sender<Incoming>,
    metrics: Arc<Metrics>,
}

async fn run_one(
    mut client: ClientConfig,
    link: Link,
    on_subscribed: impl FnOnce(),
    mut shutdown: watch::Receiver<bool>,
) {
    let mut on_subscribed = Some(on_subscribed);
    // SUBACKs awaited on this connection, in order: `true` for the SUBSCRIBE of every filter.
    let mut awaited: VecDeque<bool> = VecDeque::new();
    // A SUBSCRIBE of every filter was sent and not acknowledged: a first connection can break
    // between CONNACK and SUBACK, leaving a session without subscriptions.
    let mut full_pending = false;
    client.clean_session = false;
    client.manual_acks = true;
    let (mqtt, mut conn) = connect(&client);
    let acker = conn.acker(&mqtt);
    let probe_topic = probe_topic(&client.client_id);
    let mut subscriptions: Vec<String> = filters()
        .iter()
        .map(|f| shared(link.share_group.as_deref(), f))
        .collect();
    let stalled = Arc::new(AtomicBool::new(false));
    let watchdog = link.stall_timeout.map(|timeout| {
        subscriptions.push(probe_topic.clone());
        let watchdog = Arc::new(Mutex::new(Watchdog::new(
            timeout,
            Instant::now(),
            rand::random(),
        )));
        tokio::spawn(watch_connection(
            watchdog.clone(),
            timeout,
            WatchedConnection {
                client_id: client.client_id.clone(),
                probe_topic: probe_topic.clone(),
                mqtt: mqtt.clone(),
                acker: acker.clone(),
                stalled: stalled.clone(),
                metrics: link.metrics.clone(),
            },
            shutdown.clone(),
        ));
        watchdog
    });
    let observe = |f: &dyn Fn(&mut Watchdog, Instant)| {
        if let Some(w) = &watchdog {
            f(
                &mut w.lock().unwrap_or_else(PoisonError::into_inner),
                Instant::now(),
            );
        }
    };
    loop {
        // `conn.next()` is never cancelled except to stop: rumqttc's poll is not documented as
        // cancel-safe. The watchdog runs in its own task and asks for the reconnect through
        // `stalled`, looked at after every event (its probe makes one at once).
        tokio::select! {
            event = conn.next() => match event {
                ClientEvent::Connected { session_present } => {
                    observe(&|w, now| w.on_connected(now));
                    awaited.clear();
                    if !session_present || full_pending {
                        full_pending = true;
                        let all = subscriptions
                            .iter()
                            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                        match mqtt.try_subscribe_many(all) {
                            Ok(()) => awaited.push_back(true),
                            Err(e) => tracing::error!(error = %e, "subscribe request failed"),
                        }
                    } else {
                        if let Some(f) = on_subscribed.take() {
                            f();
                        }
                        // The session keeps the device subscriptions (not subscribing again
                        // spares a flood of retained hellos); the probe's is renewed, for
                        // sessions made before it existed.
                        if watchdog.is_some() {
                            match mqtt.try_subscribe(probe_topic.clone(), QoS::AtLeastOnce) {
                                Ok(()) => awaited.push_back(false),
                                Err(e) => tracing::error!(error = %e, "subscribe request failed"),
                            }
                        }
                    }
                    tracing::info!(session_present, "ingest connected to the broker");
                }
                ClientEvent::Message(publish) => {
                    // Registered before the next poll, in receive order (see `Acker`).
                    let token = acker.token(&publish);
                    if publish.topic == probe_topic {
                        observe(&|w, now| w.on_probe(&publish.payload, now));
                        acker.ack(token);
                    } else {
                        observe(&|w, now| w.on_delivery(now));
                        let incoming = Incoming {
                            topic: publish.topic,
                            payload: publish.payload.to_vec(),
                            received_ms: tinyfleet_store::now_ms(),
                            ack: Some((acker.clone(), token)),
                        };
                        if link.tx.send(incoming).await.is_err() {
                            break;
                        }
                    }
                }
                ClientEvent::Other(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if awaited.pop_front() == Some(true) {
                        full_pending = false;
                        if let Some(f) = on_subscribed.take() {
                            f();
                        }
                    }
                }
                ClientEvent::Other(_) => {}
            },
            _ = shutdown.changed() => break,
        }
        // Acknowledgements the request channel had no room for (see `Acker`).
        acker.flush();
        if stalled.swap(false, Ordering::SeqCst) {
            conn.reconnect();
        }
    }
    let _ = mqtt.try_disconnect();
}

/// What the watchdog task of one connection works with.
struct WatchedConnection {
    client_id: String,
    probe_topic: String,
    mqtt: rumqttc::AsyncClient,
    acker: Acker,
    stalled: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

async fn watch_connection(
    watchdog: Arc<Mutex<Watchdog>>,
    timeout: Duration,
    c: WatchedConnection,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval((timeout / 10).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused_since: Option<Instant> = None;
    let mut reported = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let outstanding = c.acker.outstanding();
        let check = watchdog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(Instant::now(), outstanding);
        let (payload, is_probe) = match check {
            Check::Wait => continue,
            Check::Probe(payload) => (payload.to_vec(), true),
            Check::Stalled { silent } => {
                c.metrics.broker_stalls.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    client_id = %c.client_id,
                    silent_s = silent.as_secs(),
                    "the broker delivered nothing, not even ingest's own probe, although ingest \
                     owes it no acknowledgement; reconnecting to resume the session"
                );
                c.stalled.store(true, Ordering::SeqCst);
                // An empty message only wakes the event loop, which then sees `stalled`.
                (Vec::new(), false)
            }
        };
        // Skipped when the request channel is full; the next tick tries again.
        let sent = c
            .mqtt
            .try_publish(c.probe_topic.clone(), QoS::AtLeastOnce, false, payload)
            .is_ok();
        // A request channel full for a whole timeout means the connection's own task has not
        // polled for that long: nothing a reconnect could fix, but worth saying once.
        if sent {
            refused_since = None;
        } else {
            let since = *refused_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= timeout && !reported {
                tracing::error!(
                    client_id = %c.client_id,
                    stuck_s = since.elapsed().as_secs(),
                    "ingest's MQTT event loop has taken no request for this long; \
                     please report this with the log"
                );
                reported = true;
            }
        }
        if sent && is_probe {
            watchdog
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .probe_sent(Instant::now());
        }
    }
}

/// What the watchdog wants done (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Nothing to do.
    Wait,
    /// Publish this probe payload on the connection's probe topic, then call
    /// [`Watchdog::probe_sent`].
    Probe([u8; 16]),
    /// The broker delivered nothing for `silent` although a probe was waiting: reconnect.
    Stalled {
        /// Time since the last delivery.
        silent: Duration,
    },
}

/// The stall watchdog's decisions for one connection, without I/O (times are passed in).
#[derive(Debug)]
pub struct Watchdog {
    timeout: Duration,
    /// Last delivery of anything (device message or own probe), or the last (re)connect.
    last_delivery: Instant,
    /// When the outstanding probe was published, and its number.
    probe: Option<(Instant, u64)>,
    /// Random per connection, so that a probe of another connection (or a forged one on a
    /// broker without ACLs) is not taken for ours.
    nonce: u64,
    next_probe: u64,
}

impl Watchdog {
    /// A watchdog declaring a stall after `timeout` (probes go out after `timeout / 4` of
    /// silence).
    pub fn new(timeout: Duration, now: Instant, nonce: u64) -> Self {
        Watchdog {
            timeout,
            last_delivery: now,
            probe: None,
            nonce,
            next_probe: 0,
        }
    }

    /// A message arrived.
    pub fn on_delivery(&mut self, now: Instant) {
        self.last_delivery = now;
    }

    /// A (new) connection was acknowledged: a probe of the old one may be lost with it.
    pub fn on_connected(&mut self, now: Instant) {
        self.last_delivery = now;
        self.probe = None;
    }

    /// A message arrived on the probe topic.
    pub fn on_probe(&mut self, payload: &[u8], now: Instant) {
        self.last_delivery = now;
        if let Some((_, n)) = self.probe
            && payload == self.payload(n)
        {
            self.probe = None;
        }
    }

    /// The probe returned by the last [`Watchdog::check`] was handed to the client.
    pub fn probe_sent(&mut self, now: Instant) {
        self.probe = Some((now, self.next_probe));
        self.next_probe += 1;
    }

    /// Decides, given the messages ingest has received and not yet acknowledged.
    pub fn check(&mut self, now: Instant, outstanding: usize) -> Check {
        match self.probe {
            Some((sent, _)) if now.duration_since(sent) >= self.timeout => {
                if self.last_delivery > sent || outstanding > 0 {
                    // Deliveries continue (the probe waits behind a backlog), or ingest itself
                    // holds the broker's window: not a stall. Probe again later.
                    self.probe = None;
                    return Check::Wait;
                }
                self.probe = None;
                self.last_delivery = now;
                Check::Stalled {
                    silent: now.duration_since(sent),
                }
            }
            Some(_) => Check::Wait,
            None if now.duration_since(self.last_delivery) >= self.timeout / 4 => {
                Check::Probe(self.payload(self.next_probe))
            }
            None => Check::Wait,
        }
    }

    fn payload(&self, n: u64) -> [u8; 16] {
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&self.nonce.to_be_bytes());
        p[8..].copy_from_slice(&n.to_be_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(8);

    fn start() -> (Watchdog, Instant) {
        let now = Instant::now();
        (Watchdog::new(T, now, 42), now)
    }

    /// The probe the watchdog asks for, marked sent.
    fn probe(w: &mut Watchdog, now: Instant) -> [u8; 16] {
        match w.check(now, 0) {
            Check::Probe(p) => {
                w.probe_sent(now);
                p
            }
            other => panic!("expected a probe, got {other:?}"),
        }
    }

    #[test]
    fn probes_only_after_a_quarter_of_the_timeout_without_deliveries() {
        let (mut w, t0) = start();
        assert_eq!(w.check(t0 + T / 8, 0), Check::Wait);
        w.on_delivery(t0 + T / 8);
        assert_eq!(w.check(t0 + T / 4, 0), Check::Wait);
        probe(&mut w, t0 + T / 8 + T / 4);
        // One probe at a time.
        assert_eq!(w.check(t0 + T / 2, 0), Check::Wait);
    }

    #[test]
    fn a_returned_probe_is_no_stall_and_the_next_one_differs() {
        let (mut w, t0) = start();
        let first = probe(&mut w, t0 + T / 4);
        w.on_probe(&first, t0 + T / 2);
        assert_eq!(w.check(t0 + T * 2, 0), Check::Probe(w.payload(1)));
        assert_ne!(first, w.payload(1));
    }

    #[test]
    fn a_probe_lost_with_nothing_delivered_and_nothing_owed_is_a_stall() {
        let (mut w, t0) = start();
        let sent = t0 + T / 4;
        probe(&mut w, sent);
        assert_eq!(w.check(sent + T - Duration::from_millis(1), 0), Check::Wait);
        assert_eq!(w.check(sent + T, 0), Check::Stalled { silent: T });
        // Reported once; the reconnect starts a fresh round.
        assert_eq!(w.check(sent + T, 0), Check::Wait);
        w.on_connected(sent + T);
        assert_eq!(w.check(sent + T + T / 4, 0), Check::Probe(w.payload(1)));
    }

    #[test]
    fn deliveries_behind_which_the_probe_waits_are_no_stall() {
        let (mut w, t0) = start();
        let sent = t0 + T / 4;
        probe(&mut w, sent);
        w.on_delivery(sent + T / 2);
        assert_eq!(w.check(sent + T, 0), Check::Wait);
        // Probing starts over.
        assert!(matches!(w.check(sent + T, 0), Check::Probe(_)));
    }

    #[test]
    fn an_ingest_that_owes_acknowledgements_is_not_stalled_by_the_broker() {
        let (mut w, t0) = start();
        let sent = t0 + T / 4;
        probe(&mut w, sent);
        assert_eq!(w.check(sent + T * 3, 5), Check::Wait);
    }

    #[test]
    fn only_this_connections_own_probe_counts() {
        let (mut w, t0) = start();
        let sent = t0 + T / 4;
        let ours = probe(&mut w, sent);
        let mut other = Watchdog::new(T, t0, 43);
        let theirs = probe(&mut other, sent);
        assert_ne!(ours, theirs);
        w.on_probe(&theirs, sent + T / 8);
        // Ours is still awaited: no new probe is asked for, however long the silence after.
        assert_eq!(w.check(sent + T / 8 + T / 2, 0), Check::Wait);
        w.on_probe(&ours, sent + T);
        assert!(matches!(w.check(sent + T + T / 4, 0), Check::Probe(_)));
    }
}
