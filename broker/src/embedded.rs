//! The embedded MQTT 3.1.1 broker: rumqttd 0.20 configured in code, with device authentication
//! delegated to a [`ConnectAuth`].
//!
//! [`EmbeddedBroker::start`] validates the [`BrokerConfig`], builds rumqttd's `Config` struct
//! field by field (never from rumqttd's TOML, where unknown keys are silently ignored), starts
//! rumqttd on its own OS thread named `tinyfleet-broker`, and returns only once every listener
//! accepts TCP connections.
//!
//! This module must never log or keep a password: credentials go from rumqttd straight to
//! [`ConnectAuth::authenticate`] and are dropped.
//!
//! # What rumqttd 0.20 does (verified by `tests/broker.rs` and its source)
//!
//! - **Lifetime**: rumqttd has no shutdown API. Once started, the broker (its router thread and
//!   one thread per listener) lives until the process exits; dropping [`EmbeddedBroker`] does not
//!   stop it.
//! - **Authentication** runs once, at CONNECT. A CONNECT without username and password is
//!   refused without calling [`ConnectAuth`]. A refused client gets **no CONNACK**: rumqttd closes
//!   the TCP connection, so a rumqttc client sees `MqttState(ConnectionAborted)` (other clients:
//!   "connection closed"), never a "bad user name or password" return code.
//!   There is no per-topic ACL: an authenticated client may publish and subscribe anywhere.
//! - **Persistent sessions**: a client that connects with `clean_session = false`, subscribes
//!   with QoS 1 and disconnects keeps its subscriptions and its position in the message log; the
//!   QoS 1 messages published while it was away are delivered when it reconnects with the same
//!   client id (CONNACK `session_present = true`). Sessions live in memory only: a process
//!   restart loses them, and messages published while *no* subscriber had ever subscribed to a
//!   matching filter are dropped. The backlog of a disconnected session is bounded by the filter
//!   log (`segment_count x segment_bytes`); beyond that the oldest messages are skipped.
//! - **Unacknowledged messages survive a subscriber crash**: with `clean_session = false` and
//!   manual acks, QoS 1 messages the subscriber received but had not acknowledged when its
//!   connection died are delivered again after it reconnects (the acknowledged ones are not).
//!   Together with the previous point: an ingest replica that acknowledges a summary only once
//!   it is stored loses none across its own restart, as long as the broker process keeps
//!   running.
//! - **Payload limit**: a PUBLISH whose packet exceeds `max_payload + PUBLISH_HEADER_ALLOWANCE`
//!   is not delivered; rumqttd closes the publisher's connection (no error reaches the client
//!   other than the disconnect). The broker keeps serving everyone else.
//! - **Shared subscriptions** `$share/{group}/{filter}` deliver each message to exactly one
//!   member of the group, round robin.
//! - **TLS listener** (feature `tls`): works, but the handshake runs inside rumqttd's accept loop
//!   without a timeout, so one idle TCP connection stalls every later TLS client (see
//!   [`crate::TlsConfig`]); terminate TLS in a proxy for untrusted networks.
//! - **Duplicate client ids**: a CONNECT with the client id of a connected client disconnects the
//!   older connection.
//! - **Connection limit**: a CONNECT beyond `max_connections` is closed without CONNACK.
//! - **Fleet size**: connecting costs the router work proportional to the fleet (one thread
//!   compares each new subscription with every topic and retained message, and each new topic
//!   with every filter), so a fleet's whole (re)connection costs O(n^2). Measured: 38-51
//!   connections/s at 5,000 connected, 15-25/s near 10,000 (`docs/benchmarks.md`, "Load"). The
//!   embedded broker suits fleets of a few thousand devices; beyond, use an external broker.
//! - **Lost wake-up**: the router can fall asleep with work in its ready queue; with every
//!   connection's task blocked behind it, the broker then stops for good (seen at ~10,450
//!   devices). [`EmbeddedBroker::start`] wakes it every [`ROUTER_WAKE_INTERVAL`].
//! - **Start-up probe**: readiness is checked by opening and closing TCP connections, which
//!   rumqttd logs as an error ("Error while handling MQTT connect packet"); this is expected.
//! - **Port 0**: rumqttd cannot report the port it bound, so a zero port is replaced by a free
//!   port found by binding and closing a socket first. Another process could take that port in
//!   the microseconds between: start-up then fails with [`BrokerError::BrokerDied`], or, if that
//!   process listens, mistakes it for the broker. Port 0 is for tests; give production a port.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{BrokerConfig, BrokerError};

/// How long [`EmbeddedBroker::start`] waits for the listeners to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Decides whether a CONNECT may proceed. Called once per connection attempt that carries a
/// username and password, on a blocking thread (it may query a database); it must not log the
/// password. `client_id` is the one the client sent and may be empty (rumqttd then assigns one
/// for a clean session).
pub trait ConnectAuth: Send + Sync + 'static {
    /// `true` lets the client in.
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool;
}

/// A running rumqttd broker. It cannot be stopped: it lives until the process exits.
#[derive(Debug)]
pub struct EmbeddedBroker {
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    _thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Validates `config`, starts the broker on a thread named `tinyfleet-broker`, and waits up
    /// to [`START_TIMEOUT`] for its listeners to accept TCP connections.
    ///
    /// This blocks the calling thread (for a few milliseconds normally); from async code call it
    /// through `tokio::task::spawn_blocking` or before the runtime starts.
    pub fn start(
        config: &BrokerConfig,
        auth: Arc<dyn ConnectAuth>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        Ok(Self::start_with_links(config, auth, &[])?.0)
    }

    /// [`EmbeddedBroker::start`], plus one in-process connection (rumqttd's local link, clean
    /// session, counted against `max_connections`) per client id, opened before the listeners
    /// start. Not used by the service: the embedded-broker benchmark
    /// (`ingest/examples/broker_path.rs`) measures with it what a subscriber costs without
    /// TCP and rumqttc.
    #[doc(hidden)]
    pub fn start_with_links(
        config: &BrokerConfig,
        auth: Arc<dyn ConnectAuth>,
        client_ids: &[&str],
    ) -> Result<(EmbeddedBroker, Vec<LocalLink>), BrokerError> {
        config.validate()?;
        let local_addr = resolve_listen(config.listen)?;
        let tls_addr = match &config.tls {
            Some(tls) => Some(resolve_listen(tls.listen)?),
            None => None,
        };

        let rumqttd_config = rumqttd_config(config, local_addr, tls_addr, auth, client_ids.len())?;
        if let Some(tls) = &config.tls {
            tracing::warn!(
                listen = %tls.listen,
                "the embedded TLS listener stalls while any client holds an unfinished TLS \
                 handshake (rumqttd 0.20); do not expose it to untrusted networks"
            );
        }
        let ids: Vec<String> = client_ids.iter().map(|&id| id.to_owned()).collect();
        let (links_tx, links_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tinyfleet-broker".to_owned())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(rumqttd_config);
                keep_router_awake(&broker);
                let links: Result<Vec<LocalLink>, String> = ids
                    .iter()
                    .map(|id| {
                        broker
                            .link(id)
                            .map(|(tx, rx)| LocalLink { tx, rx })
                            .map_err(|e| format!("in-process link {id}: {e}"))
                    })
                    .collect();
                let _ = links_tx.send(links);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "the MQTT broker stopped");
                }
            })
            .map_err(BrokerError::Spawn)?;

        let links = links_rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| BrokerError::BrokerDied { addr: local_addr })?
            .map_err(BrokerError::Link)?;
        for addr in std::iter::once(local_addr).chain(tls_addr) {
            wait_until_listening(addr, &thread)?;
        }
        tracing::info!(%local_addr, tls = ?tls_addr, "MQTT broker listening");
        let broker = EmbeddedBroker {
            local_addr,
            tls_addr,
            _thread: thread,
        };
        Ok((broker, links))
    }

    /// The address of the plain MQTT listener, with the real port when `listen` had port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the TLS listener, when one is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }
}

/// An in-process connection to the embedded broker ([`EmbeddedBroker::start_with_links`]).
#[doc(hidden)]
pub struct LocalLink {
    pub tx: rumqttd::local::LinkTx,
    pub rx: rumqttd::local::LinkRx,
}

impl std::fmt::Debug for LocalLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLink")
            .field("connection", &self.rx.id())
            .finish()
    }
}

/// How often [`keep_router_awake`] wakes rumqttd's router.
pub const ROUTER_WAKE_INTERVAL: Duration = Duration::from_millis(100);

/// The client id of the in-process link that wakes the router (the `tinyfleet-` prefix is
/// reserved for services: no device can take it over).
const WAKE_CLIENT_ID: &str = "tinyfleet-router-wake";

/// Works around a lost wake-up in rumqttd 0.20's router, which froze the embedded broker for
/// good at ~10,450 connected devices in the load test (`docs/benchmarks.md`, "Load"): the
/// router sleeps in `router_rx.recv()` whenever the head of its ready queue is a connection
/// that is gone, even though connections behind it are ready (among them a new connection's
/// CONNACK), while the listener thread, which runs every connection's task, blocks in
/// `LinkBuilder::build` waiting for that CONNACK; nothing is left to send the router an event.
/// An in-process link sends a PINGREQ every [`ROUTER_WAKE_INTERVAL`]: O(1) work for the router
/// (it answers with a PINGRESP, which this thread reads and drops), after which it serves its
/// ready queue. (rumqttd's own `LinkRx::ready` would be cheaper but trips a debug assertion of
/// its scheduler.)
fn keep_router_awake(broker: &rumqttd::Broker) {
    let (mut tx, mut rx) = match broker.link(WAKE_CLIENT_ID) {
        Ok(link) => link,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the broker's wake-up link; the router may stall under load");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("tinyfleet-broker-wake".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the broker's wake-up thread");
                    return;
                }
            };
            loop {
                let ping = rumqttd::protocol::Packet::PingReq(rumqttd::protocol::PingReq);
                if let Err(e) = runtime.block_on(tx.send(ping)) {
                    tracing::error!(error = %e, "the broker's router is gone");
                    return;
                }
                // Drop the answers (they would pile up in the link's buffer) until the next
                // ping is due.
                let deadline = Instant::now() + ROUTER_WAKE_INTERVAL;
                while let Ok(Some(_)) = rx.recv_deadline(deadline) {}
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the broker's wake-up thread; the router may stall under load");
    }
}

/// Checks that `addr` can be bound (so that a port already taken by another broker is reported
/// instead of probed successfully), and replaces port 0 with a free port.
fn resolve_listen(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })?;
    drop(listener);
    Ok(SocketAddr::new(addr.ip(), bound.port()))
}

fn rumqttd_config(
    config: &BrokerConfig,
    listen: SocketAddr,
    tls_listen: Option<SocketAddr>,
    auth: Arc<dyn ConnectAuth>,
    links: usize,
) -> Result<rumqttd::Config, BrokerError> {
    let router = rumqttd::RouterConfig {
        // One more for the link that keeps the router awake, and the in-process links.
        max_connections: config
            .max_connections
            .saturating_add(1)
            .saturating_add(links),
        // QoS 0 messages read from a log per scheduling round; QoS 1 reads are bounded by the
        // in-flight window instead.
        max_outgoing_packet_count: 200,
        max_segment_size: config.segment_bytes,
        max_segment_count: config.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: rumqttd::Strategy::RoundRobin,
    };

    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: config.connection_timeout_ms,
        max_payload_size: config.max_packet(),
        max_inflight_count: usize::from(config.max_inflight),
        auth: None,
        external_auth: None,
        // Unused by rumqttd 0.20's router for remote clients (a publish with no matching filter
        // is dropped either way); off so it cannot start creating per-topic logs in a later
        // version.
        dynamic_filters: false,
    };
    connections.set_auth_handler(move |client_id: String, username: String, password: String| {
        let auth = Arc::clone(&auth);
        async move {
            let verdict = tokio::task::spawn_blocking(move || {
                auth.authenticate(&client_id, &username, &password)
            })
            .await;
            match verdict {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::error!(error = %e, "the ConnectAuth implementation panicked; refusing the connection");
                    false
                }
            }
        }
    });

    let server =
        |name: &str, listen: SocketAddr, tls: Option<rumqttd::TlsConfig>| rumqttd::ServerSettings {
            name: name.to_owned(),
            listen,
            tls,
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        };

    let mut v4 = HashMap::new();
    v4.insert("tcp".to_owned(), server("tinyfleet-mqtt", listen, None));
    if let (Some(tls), Some(tls_listen)) = (&config.tls, tls_listen) {
        let path = |field: &'static str, p: &std::path::Path| {
            p.to_str().map(str::to_owned).ok_or_else(|| {
                BrokerError::invalid(field, p.display(), "the path must be valid UTF-8")
            })
        };
        let certpath = path("broker.tls.cert_path", &tls.cert_path)?;
        let keypath = path("broker.tls.key_path", &tls.key_path)?;
        let tls = rumqttd::TlsConfig::Rustls {
            capath: None,
            certpath,
            keypath,
        };
        v4.insert(
            "tls".to_owned(),
            server("tinyfleet-mqtts", tls_listen, Some(tls)),
        );
    }

    Ok(rumqttd::Config {
        id: 0,
        router,
        v4: Some(v4),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    })
}

/// Polls `addr` with TCP connects until one succeeds, the broker thread ends, or
/// [`START_TIMEOUT`] passes.
fn wait_until_listening(addr: SocketAddr, thread: &JoinHandle<()>) -> Result<(), BrokerError> {
    let target = probe_target(addr);
    let started = Instant::now();
    loop {
        if thread.is_finished() {
            return Err(BrokerError::BrokerDied { addr });
        }
        if TcpStream::connect_timeout(&target, PROBE_CONNECT_TIMEOUT).is_ok() {
            return Ok(());
        }
        if started.elapsed() >= START_TIMEOUT {
            return Err(BrokerError::NotListening {
                addr,
                waited: START_TIMEOUT,
            });
        }
        std::thread::sleep(PROBE_INTERVAL);
    }
}

/// A wildcard listen address is probed on the loopback address of its family.
fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_becomes_a_free_port() {
        let addr = resolve_listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_ne!(addr.port(), 0);
    }

    #[test]
    fn a_taken_port_is_reported() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = resolve_listen(addr).unwrap_err();
        assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn wildcard_is_probed_on_loopback() {
        assert_eq!(
            probe_target("0.0.0.0:1883".parse().unwrap()),
            "127.0.0.1:1883".parse().unwrap()
        );
        assert_eq!(
            probe_target("[::]:1883".parse().unwrap()),
            "[::1]:1883".parse().unwrap()
        );
        assert_eq!(
            probe_target("10.0.0.1:1883".parse().unwrap()),
            "10.0.0.1:1883".parse().unwrap()
        );
    }
}
