//! The MQTT client the services (ingest, OTA) use, against the embedded broker or an external
//! one (Mosquitto, EMQX): rumqttc 0.25 plus what it lacks, namely jittered exponential backoff
//! between reconnects, a clear "(re)connected" event, and a redacted `Debug`.
//!
//! This module must never log or print a password, and [`connect`] must never panic whatever the
//! configuration (rumqttc panics on some values; they are corrected with a warning, and
//! [`ClientConfig::validate`] reports them so that a service can refuse them at start-up).
//!
//! # Reconnects and lost messages (rumqttc 0.25 behaviour)
//!
//! [`Connection::next`] never returns an error: on a connection error it logs, sleeps a
//! full-jitter exponential backoff and tries again. After each successful CONNACK it returns
//! [`ClientEvent::Connected`]; when `session_present` is `false` the broker has forgotten the
//! subscriptions, and the caller must subscribe again. In that case rumqttc also *drops* the
//! QoS 1 publishes that were not yet acknowledged and the requests queued during the outage;
//! a publisher that needs at-least-once delivery must re-publish what it has not seen a PUBACK
//! for. With `session_present = true` rumqttc re-sends them itself.
//!
//! A `manual_acks` consumer must acknowledge through an [`Acker`]: rumqttd 0.20 disconnects a
//! client whose PUBACKs come out of order and then treats the oldest unacknowledged message as
//! acknowledged (lost), and a PUBACK that reaches a new connection for a message of the previous
//! one acknowledges whichever message now has that packet id.
//!
//! Do not publish from the task that calls [`Connection::next`]: `AsyncClient::publish` waits
//! when the request channel is full, and only `next` drains it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS};

use crate::config::{BrokerError, DEFAULT_MAX_PAYLOAD, PUBLISH_HEADER_ALLOWANCE};

/// Settings of one MQTT client connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Host name or IP address of the broker.
    pub url_host: String,
    /// TCP port of the broker.
    pub port: u16,
    /// MQTT client id. Must be non-empty when `clean_session` is `false`, and unique per
    /// connection: rumqttd disconnects the older of two clients with the same id.
    pub client_id: String,
    /// Username; `None` connects without credentials.
    pub username: Option<String>,
    /// Password (ignored without a username). Never printed.
    pub password: Option<String>,
    /// `false` asks the broker to keep subscriptions and queued QoS 1 messages while away.
    pub clean_session: bool,
    /// Keep-alive interval in seconds; at least 1 (rumqttd refuses 0).
    pub keep_alive_s: u16,
    /// Largest MQTT packet sent or accepted, in bytes; at least the broker's
    /// `BrokerConfig::max_packet()`.
    pub max_packet: usize,
    /// Maximum unacknowledged outgoing QoS 1 publishes; at least 1.
    pub inflight: u16,
    /// `true`: incoming QoS 1 messages are acknowledged only when the caller calls
    /// `AsyncClient::ack`, so a message is not acknowledged before it is processed.
    pub manual_acks: bool,
    /// Smallest backoff ceiling between reconnect attempts, in milliseconds.
    pub backoff_min_ms: u64,
    /// Largest backoff ceiling between reconnect attempts, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            url_host: "127.0.0.1".to_owned(),
            port: 1883,
            client_id: String::new(),
            username: None,
            password: None,
            clean_session: true,
            keep_alive_s: 30,
            max_packet: DEFAULT_MAX_PAYLOAD + PUBLISH_HEADER_ALLOWANCE,
            inflight: 100,
            manual_acks: false,
            backoff_min_ms: 100,
            backoff_max_ms: 30_000,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url_host", &self.url_host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("clean_session", &self.clean_session)
            .field("keep_alive_s", &self.keep_alive_s)
            .field("max_packet", &self.max_packet)
            .field("inflight", &self.inflight)
            .field("manual_acks", &self.manual_acks)
            .field("backoff_min_ms", &self.backoff_min_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .finish()
    }
}

impl ClientConfig {
    /// Checks the values that [`connect`] would otherwise have to correct.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.url_host.is_empty() {
            return Err(BrokerError::invalid(
                "mqtt.url_host",
                "\"\"",
                "set the broker's host name or IP address",
            ));
        }
        if self.port == 0 {
            return Err(BrokerError::invalid(
                "mqtt.port",
                self.port,
                "set the broker's port (1883 for MQTT, 8883 for MQTT over TLS)",
            ));
        }
        if self.client_id.is_empty() && !self.clean_session {
            return Err(BrokerError::invalid(
                "mqtt.client_id",
                "\"\"",
                "a persistent session (clean_session = false) needs a client id",
            ));
        }
        if self.keep_alive_s == 0 {
            return Err(BrokerError::invalid(
                "mqtt.keep_alive_s",
                self.keep_alive_s,
                "must be at least 1 second (rumqttd refuses clients without keep-alive)",
            ));
        }
        if self.max_packet < 64 {
            return Err(BrokerError::invalid(
                "mqtt.max_packet",
                self.max_packet,
                "is too small for any MQTT message; use at least the broker's max_payload + 256",
            ));
        }
        if self.inflight == 0 {
            return Err(BrokerError::invalid(
                "mqtt.inflight",
                self.inflight,
                "must be at least 1",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(BrokerError::invalid(
                "mqtt.username",
                "none",
                "a password without a username cannot be sent in MQTT 3.1.1; set the username",
            ));
        }
        if self.backoff_max_ms < self.backoff_min_ms {
            return Err(BrokerError::invalid(
                "mqtt.backoff_max_ms",
                self.backoff_max_ms,
                format!(
                    "must not be less than mqtt.backoff_min_ms ({})",
                    self.backoff_min_ms
                ),
            ));
        }
        Ok(())
    }

    fn endpoint(&self) -> String {
        if self.url_host.contains(':') {
            format!("[{}]:{}", self.url_host, self.port)
        } else {
            format!("{}:{}", self.url_host, self.port)
        }
    }
}

/// What [`Connection::next`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A CONNACK accepted the connection (the first one or a reconnect). When `session_present`
    /// is `false`, subscribe again.
    Connected {
        /// Whether the broker resumed a persistent session (subscriptions kept).
        session_present: bool,
    },
    /// An incoming PUBLISH. With `manual_acks`, acknowledge it with `AsyncClient::ack` once
    /// processed.
    Message(rumqttc::Publish),
    /// Any other protocol event (PUBACK, SUBACK, pings, outgoing packets).
    Other(Event),
}

/// The receiving half of a client: drives rumqttc's event loop and reconnects with backoff.
///
/// Polling it is what keeps the connection alive; it reconnects for as long as it is polled,
/// even after `AsyncClient::disconnect`. To stop, drop it (after the
/// `ClientEvent::Other(Event::Outgoing(Outgoing::Disconnect))` event for a clean DISCONNECT).
pub struct Connection {
    eventloop: EventLoop,
    client_id: String,
    endpoint: String,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
    attempt: u32,
    retry_at: Option<tokio::time::Instant>,
    rng: StdRng,
    /// Incremented whenever the network connection ends or a new one is acknowledged; lets an
    /// [`Acker`] refuse to acknowledge, on a new connection, a message of an old one.
    epoch: Arc<AtomicU64>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("client_id", &self.client_id)
            .field("endpoint", &self.endpoint)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Builds a client for `config`. Nothing happens on the network until [`Connection::next`] is
/// polled. Never panics: values rumqttc would panic on are corrected and logged (see
/// [`ClientConfig::validate`]).
pub fn connect(config: &ClientConfig) -> (AsyncClient, Connection) {
    if let Err(e) = config.validate() {
        tracing::warn!(client_id = %config.client_id, error = %e, "MQTT client configuration corrected");
    }
    let mut options = MqttOptions::new(
        config.client_id.clone(),
        config.url_host.clone(),
        config.port,
    );
    options.set_keep_alive(Duration::from_secs(u64::from(config.keep_alive_s.max(1))));
    options.set_clean_session(config.clean_session || config.client_id.is_empty());
    if let Some(username) = &config.username {
        options.set_credentials(
            username.clone(),
            config.password.clone().unwrap_or_default(),
        );
    }
    let max_packet = config.max_packet.max(64);
    options.set_max_packet_size(max_packet, max_packet);
    let inflight = config.inflight.max(1);
    options.set_inflight(inflight);
    options.set_manual_acks(config.manual_acks);

    let capacity = usize::from(inflight).max(10);
    let (client, eventloop) = AsyncClient::new(options, capacity);
    let connection = Connection {
        eventloop,
        client_id: config.client_id.clone(),
        endpoint: config.endpoint(),
        backoff_min_ms: config.backoff_min_ms,
        backoff_max_ms: config.backoff_max_ms.max(config.backoff_min_ms),
        attempt: 0,
        retry_at: None,
        rng: StdRng::from_rng(&mut rand::rng()),
        epoch: Arc::new(AtomicU64::new(0)),
    };
    (client, connection)
}

impl Connection {
    /// The next event. On a connection error this logs, waits a jittered backoff
    /// ([`backoff_delay`]) and reconnects, so it only returns events. A call dropped while
    /// waiting out a backoff resumes the same wait on the next call; dropping it in the middle
    /// of rumqttc's poll is meant only for stopping (rumqttc does not document `poll` as
    /// cancel-safe).
    pub async fn next(&mut self) -> ClientEvent {
        loop {
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
                self.retry_at = None;
            }
            let connecting = self.eventloop.network.is_none();
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    if self.attempt > 0 {
                        tracing::info!(
                            client_id = %self.client_id,
                            broker = %self.endpoint,
                            session_present = ack.session_present,
                            "MQTT reconnected"
                        );
                    }
                    self.attempt = 0;
                    return ClientEvent::Connected {
                        session_present: ack.session_present,
                    };
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    return ClientEvent::Message(publish);
                }
                Ok(event) => return ClientEvent::Other(event),
                Err(error) => {
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    let delay = backoff_delay(
                        self.attempt,
                        self.backoff_min_ms,
                        self.backoff_max_ms,
                        &mut self.rng,
                    );
                    self.attempt = self.attempt.saturating_add(1);
                    self.log_failure(connecting, &error, delay);
                    self.retry_at = Some(tokio::time::Instant::now() + delay);
                }
            }
        }
    }

    /// Drops the network connection now; the next [`Connection::next`] connects again (at once,
    /// without backoff) and, with a persistent session, the broker re-sends what this client
    /// has not acknowledged. For a connection that is up but gets nothing delivered (see
    /// `tinyfleet_ingest::source`'s watchdog). Acknowledgements of messages received so far
    /// become [`AckOutcome::Stale`]; the broker delivers those messages again.
    pub fn reconnect(&mut self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.eventloop.clean();
        self.retry_at = None;
    }

    /// Connection attempts that failed since the last CONNACK.
    pub fn consecutive_failures(&self) -> u32 {
        self.attempt
    }

    /// An [`Acker`] for the messages this connection receives, sending through `client` (the
    /// client returned with this connection by [`connect`]).
    pub fn acker(&self, client: &AsyncClient) -> Acker {
        Acker {
            client: client.clone(),
            manual: self.eventloop.mqtt_options.manual_acks(),
            epoch: Arc::clone(&self.epoch),
            queue: Arc::new(Mutex::new(AckQueue::default())),
        }
    }

    /// The rumqttc event loop, e.g. to read its options or in-flight state.
    pub fn eventloop(&self) -> &EventLoop {
        &self.eventloop
    }

    fn log_failure(&self, connecting: bool, error: &ConnectionError, delay: Duration) {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if connecting {
            let hint = match error {
                ConnectionError::ConnectionRefused(_) => {
                    "the broker refused the CONNECT: check mqtt.username and mqtt.password"
                }
                ConnectionError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    "nothing listens there: check mqtt.url_host and mqtt.port, and that the broker runs"
                }
                ConnectionError::Io(_)
                | ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted) => {
                    "the connection closed before CONNACK: wrong credentials (rumqttd then closes without a CONNACK), a TLS/plain mismatch, or mqtt.max_packet below the broker's"
                }
                _ => "check mqtt.url_host, mqtt.port and the broker's log",
            };
            tracing::warn!(
                client_id = %self.client_id,
                broker = %self.endpoint,
                attempt = self.attempt,
                retry_in_ms = delay_ms,
                %error,
                hint,
                "MQTT connect failed; retrying"
            );
        } else {
            tracing::warn!(
                client_id = %self.client_id,
                broker = %self.endpoint,
                retry_in_ms = delay_ms,
                %error,
                "MQTT connection lost; reconnecting"
            );
        }
    }
}

/// Acknowledges incoming QoS 1 messages of a `manual_acks` client safely, whatever order the
/// caller finishes them in.
///
/// rumqttd 0.20 requires PUBACKs in the order it sent the messages: an out-of-order PUBACK
/// disconnects the client *and* counts the oldest unacknowledged message as acknowledged, so it
/// is never redelivered. And an acknowledgement that reaches a new connection for a message of
/// the previous one acknowledges whatever message now holds that packet id. `Acker` prevents
/// both: it holds an acknowledgement back until every earlier message of the same connection is
/// acknowledged, and drops acknowledgements of messages received before the latest reconnect
/// (the broker delivers those again when the session resumes).
///
/// Call [`Acker::token`] for every message, in the order [`Connection::next`] returned them and
/// before polling `next` again; call [`Acker::ack`] when the message is safely processed. With
/// `manual_acks` off, rumqttc acknowledges on receipt and `Acker` does nothing.
///
/// [`Acker::ack`] never waits. rumqttc's request channel is bounded and only the task polling
/// [`Connection::next`] drains it; if that task is itself waiting for the consumer (a full
/// channel to the pipeline) while the consumer waited for room to acknowledge, neither would
/// move again, and the broker would close the silent connection. PUBACKs that find the channel
/// full wait in an outbox instead, in order; the polling task calls [`Acker::flush`] after every
/// event to hand them over as room appears.
///
/// A PUBACK handed to rumqttc in the microseconds between a connection failing and
/// [`Connection::next`] returning can still be sent on the next connection; rumqttd then sees it
/// out of order and closes that connection once more.
#[derive(Clone)]
pub struct Acker {
    client: AsyncClient,
    manual: bool,
    epoch: Arc<AtomicU64>,
    queue: Arc<Mutex<AckQueue>>,
}

impl fmt::Debug for Acker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acker")
            .field("manual", &self.manual)
            .field("epoch", &self.epoch.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct AckQueue {
    epoch: u64,
    next_seq: u64,
    /// Messages of the current connection awaiting their PUBACK, in receive order.
    waiting: VecDeque<Waiting>,
    /// Released PUBACKs (packet id, QoS) the client's request channel had no room for yet, in
    /// order.
    outbox: VecDeque<(u16, QoS)>,
}

struct Waiting {
    seq: u64,
    pkid: u16,
    qos: QoS,
    done: bool,
}

impl AckQueue {
    /// Forgets everything of an older connection.
    fn sync(&mut self, epoch: u64) {
        if self.epoch != epoch {
            self.epoch = epoch;
            self.waiting.clear();
            self.outbox.clear();
        }
    }
}

/// One received message's claim to an acknowledgement; see [`Acker`].
#[derive(Debug)]
#[must_use = "a message whose token is never acknowledged is redelivered after the next reconnect and blocks later acknowledgements"]
pub struct AckToken {
    /// `None` when nothing is to be sent (QoS 0, or automatic acks).
    slot: Option<(u64, u64)>,
}

/// What [`Acker::ack`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The PUBACK was released, with those of earlier messages it waited for: handed to the
    /// client, or queued behind PUBACKs the client has no room for yet ([`Acker::flush`]).
    Sent,
    /// Recorded; the PUBACK goes out once every earlier message is acknowledged.
    Deferred,
    /// The message came on a connection that has since ended; nothing was sent (the broker
    /// redelivers it if the session resumes).
    Stale,
    /// Nothing to acknowledge (QoS 0, or `manual_acks` off).
    NotNeeded,
}

impl Acker {
    /// Registers a message just returned by [`Connection::next`]; see [`Acker`] for the rules.
    pub fn token(&self, publish: &Publish) -> AckToken {
        if !self.manual || publish.qos == QoS::AtMostOnce {
            return AckToken { slot: None };
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.sync(epoch);
        let seq = queue.next_seq;
        queue.next_seq += 1;
        queue.waiting.push_back(Waiting {
            seq,
            pkid: publish.pkid,
            qos: publish.qos,
            done: false,
        });
        AckToken {
            slot: Some((epoch, seq)),
        }
    }

    /// Messages of the current connection registered with [`Acker::token`] whose PUBACK has not
    /// been handed to the client yet (the broker counts them against its in-flight window).
    pub fn outstanding(&self) -> usize {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.sync(self.epoch.load(Ordering::SeqCst));
        queue.waiting.len() + queue.outbox.len()
    }

    /// Acknowledges the message of `token`, now or once the earlier ones are. Never waits (see
    /// [`Acker`]).
    pub fn ack(&self, token: AckToken) -> AckOutcome {
        let Some((epoch, seq)) = token.slot else {
            return AckOutcome::NotNeeded;
        };
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.sync(self.epoch.load(Ordering::SeqCst));
        if epoch != queue.epoch {
            return AckOutcome::Stale;
        }
        match queue.waiting.iter_mut().find(|w| w.seq == seq) {
            Some(waiting) => waiting.done = true,
            None => return AckOutcome::Stale,
        }
        let mut released = false;
        while queue.waiting.front().is_some_and(|w| w.done) {
            if let Some(w) = queue.waiting.pop_front() {
                queue.outbox.push_back((w.pkid, w.qos));
                released = true;
            }
        }
        if !released {
            return AckOutcome::Deferred;
        }
        self.drain(&mut queue);
        AckOutcome::Sent
    }

    /// Hands queued PUBACKs to the client while its request channel has room. The task polling
    /// [`Connection::next`] calls it after every event.
    pub fn flush(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.sync(self.epoch.load(Ordering::SeqCst));
        self.drain(&mut queue);
    }

    fn drain(&self, queue: &mut AckQueue) {
        while let Some(&(pkid, qos)) = queue.outbox.front() {
            let mut publish = Publish::new(String::new(), qos, Vec::new());
            publish.pkid = pkid;
            // Full (or the event loop is gone): the rest waits for the next flush.
            if self.client.try_ack(&publish).is_err() {
                break;
            }
            queue.outbox.pop_front();
        }
    }
}

/// Full-jitter exponential backoff: a duration drawn uniformly from
/// `[0, min(max_ms, min_ms * 2^attempt)]` milliseconds (`attempt` counts from 0).
pub fn backoff_delay(attempt: u32, min_ms: u64, max_ms: u64, rng: &mut impl rand::Rng) -> Duration {
    let growth = 1u64.checked_shl(attempt).unwrap_or(u64::MAX);
    let ceiling = min_ms.saturating_mul(growth).min(max_ms);
    Duration::from_millis(rng.random_range(0..=ceiling))
}

/// The subscription filter for `filter`, shared by `group` when one is given:
/// `shared(Some("ingest"), "tf/v1/+/sum") == "$share/ingest/tf/v1/+/sum"`. With `None` (or an
/// empty group) the plain filter. The group must be a valid share name (see
/// [`is_valid_share_group`]); validate configured names at start-up.
pub fn shared(group: Option<&str>, filter: &str) -> String {
    match group {
        Some(group) if !group.is_empty() => format!("$share/{group}/{filter}"),
        _ => filter.to_owned(),
    }
}

/// Whether `group` can name a shared subscription: non-empty, without `/`, `+` or `#`
/// (MQTT 5 section 4.8.2).
pub fn is_valid_share_group(group: &str) -> bool {
    !group.is_empty() && !group.contains(['/', '+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;

    #[test]
    fn backoff_stays_within_its_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..70 {
            let ceiling =
                (100u64.saturating_mul(1u64.checked_shl(attempt).unwrap_or(u64::MAX))).min(30_000);
            for _ in 0..200 {
                let d = backoff_delay(attempt, 100, 30_000, &mut rng);
                assert!(d <= Duration::from_millis(ceiling), "{attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn backoff_grows_then_caps() {
        let mut rng = StdRng::seed_from_u64(1);
        let max_of = |attempt: u32, rng: &mut StdRng| {
            (0..2_000)
                .map(|_| backoff_delay(attempt, 100, 5_000, rng))
                .max()
                .unwrap()
        };
        let first = max_of(0, &mut rng);
        let third = max_of(2, &mut rng);
        let late = max_of(20, &mut rng);
        let huge = max_of(u32::MAX, &mut rng);
        assert!(first <= Duration::from_millis(100));
        assert!(first > Duration::from_millis(90), "{first:?}");
        assert!(third <= Duration::from_millis(400));
        assert!(third > Duration::from_millis(360), "{third:?}");
        assert!(late <= Duration::from_millis(5_000));
        assert!(late > Duration::from_millis(4_500), "{late:?}");
        assert!(huge <= Duration::from_millis(5_000));
    }

    #[test]
    fn backoff_is_jittered_down_to_zero() {
        let mut rng = StdRng::seed_from_u64(3);
        let draws: Vec<_> = (0..2_000)
            .map(|_| backoff_delay(3, 100, 30_000, &mut rng))
            .collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(80)));
        assert!(backoff_delay(5, 0, 30_000, &mut rng).is_zero());
        assert!(backoff_delay(5, 100, 0, &mut rng).is_zero());
    }

    #[test]
    fn shared_filters() {
        assert_eq!(
            shared(Some("ingest"), "tf/v1/+/sum"),
            "$share/ingest/tf/v1/+/sum"
        );
        assert_eq!(shared(None, "tf/v1/+/sum"), "tf/v1/+/sum");
        assert_eq!(shared(Some(""), "tf/v1/+/hello"), "tf/v1/+/hello");
        assert!(is_valid_share_group("ingest-1"));
        assert!(!is_valid_share_group(""));
        assert!(!is_valid_share_group("a/b"));
        assert!(!is_valid_share_group("a+"));
        assert!(!is_valid_share_group("#"));
    }

    #[test]
    fn debug_redacts_the_password() {
        let config = ClientConfig {
            username: Some("ingest".to_owned()),
            password: Some("hunter2-secret".to_owned()),
            ..ClientConfig::default()
        };
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(text.contains("ingest"), "{text}");
    }

    #[test]
    fn validate_names_the_setting() {
        let bad = [
            ClientConfig {
                keep_alive_s: 0,
                ..ClientConfig::default()
            },
            ClientConfig {
                clean_session: false,
                ..ClientConfig::default()
            },
            ClientConfig {
                inflight: 0,
                ..ClientConfig::default()
            },
            ClientConfig {
                password: Some("x".to_owned()),
                ..ClientConfig::default()
            },
            ClientConfig {
                backoff_min_ms: 10,
                backoff_max_ms: 5,
                ..ClientConfig::default()
            },
            ClientConfig {
                port: 0,
                ..ClientConfig::default()
            },
        ];
        for config in bad {
            let err = config.validate().unwrap_err();
            assert!(err.to_string().contains("mqtt."), "{err}");
        }
        ClientConfig::default().validate().unwrap();
    }

    #[tokio::test]
    async fn acker_has_nothing_to_do_for_qos0_or_automatic_acks() {
        let publish = |qos| {
            let mut p = Publish::new("tf/v1/d/sum", qos, vec![1]);
            p.pkid = 1;
            p
        };
        let (client, connection) = connect(&ClientConfig::default());
        let automatic = connection.acker(&client);
        let token = automatic.token(&publish(QoS::AtLeastOnce));
        assert_eq!(automatic.ack(token), AckOutcome::NotNeeded);

        let manual = ClientConfig {
            manual_acks: true,
            ..ClientConfig::default()
        };
        let (client, connection) = connect(&manual);
        let acker = connection.acker(&client);
        let token = acker.token(&publish(QoS::AtMostOnce));
        assert_eq!(acker.ack(token), AckOutcome::NotNeeded);
        // Out of order within one connection: held back until the first is acknowledged.
        let first = acker.token(&publish(QoS::AtLeastOnce));
        let second = acker.token(&publish(QoS::AtLeastOnce));
        assert_eq!(acker.ack(second), AckOutcome::Deferred);
        assert_eq!(acker.ack(first), AckOutcome::Sent);
    }

    /// More acknowledgements than rumqttc's request channel holds, while nothing polls the event
    /// loop (its task is busy handing a message to a full consumer): `ack` must not wait, or
    /// the two would wait for each other for good (the order they go out in is tested against
    /// rumqttd in `tests/broker.rs`).
    #[tokio::test]
    async fn acks_never_wait_for_the_event_loop() {
        let config = ClientConfig {
            manual_acks: true,
            ..ClientConfig::default()
        };
        let (client, mut connection) = connect(&config);
        let acker = connection.acker(&client);
        let n = 3 * usize::from(config.inflight);
        let tokens: Vec<AckToken> = (1..=n as u16)
            .map(|pkid| {
                let mut p = Publish::new("tf/v1/d/sum", QoS::AtLeastOnce, vec![1]);
                p.pkid = pkid;
                acker.token(&p)
            })
            .collect();
        for token in tokens {
            assert_eq!(acker.ack(token), AckOutcome::Sent);
        }
        // The channel took 100; the rest waits in the outbox, still owed to the broker.
        assert_eq!(acker.outstanding(), n - usize::from(config.inflight));
        acker.flush();
        assert_eq!(acker.outstanding(), n - usize::from(config.inflight));
        // A new connection: the broker re-sends those messages, their PUBACKs are dropped.
        connection.reconnect();
        assert_eq!(acker.outstanding(), 0);
    }

    #[tokio::test]
    async fn connect_never_panics_on_bad_values() {
        let config = ClientConfig {
            client_id: String::new(),
            clean_session: false,
            keep_alive_s: 0,
            inflight: 0,
            max_packet: 0,
            ..ClientConfig::default()
        };
        let (_client, connection) = connect(&config);
        assert!(connection.eventloop().mqtt_options.clean_session());
        assert_eq!(connection.eventloop().mqtt_options.inflight(), 1);
    }
}
