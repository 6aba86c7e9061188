//! Configuration of the embedded broker, its validation, and the crate's error type.
//!
//! Everything here is plain data plus checks: nothing in this module opens a socket, starts a
//! thread or logs. [`BrokerConfig::validate`] must reject every value that would make rumqttd 0.20
//! panic or misbehave silently (rumqttd panics on a segment smaller than 1 KiB or on zero
//! segments, and a segment that cannot hold one message makes slow subscribers skip data), so
//! that an operator gets a sentence naming the setting instead of a crash.
//!
//! # Memory bound
//!
//! rumqttd keeps published messages in one in-memory log *per subscription filter* (a shared
//! subscription `$share/g/f` uses the log of `f`). Each log holds at most `segment_count`
//! segments of about `segment_bytes` each (a segment may overshoot by one message), so with the
//! defaults (1 MiB x 16) one filter retains at most about 16 MiB, and the broker's message memory
//! is bounded by `filters x segment_count x (segment_bytes + max_packet)`. A log only fills with
//! messages published on topics it matches: the five backend filters (`tf/v1/+/sum`, ...) fill
//! up to their cap, while a device's own filters (`tf/v1/{device}/ota/...`) only hold what was
//! sent to that device. Once a log is full its oldest segment is dropped: a subscriber that falls
//! more than `segment_count x segment_bytes` behind silently skips messages, whatever their QoS.
//! rumqttd never frees a filter's log (nor the saved state of a persistent session whose client
//! never returns), so the number of filters is the number ever subscribed since start-up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Bytes allowed on top of `max_payload` for the rest of a PUBLISH packet: the 2-byte topic
/// length, the topic and the 2-byte packet id. rumqttd limits the whole packet after the fixed
/// header, so the limit handed to it is `max_payload + PUBLISH_HEADER_ALLOWANCE`. Protocol topics
/// are at most 79 bytes (`tf/v1/` + 64-byte device id + `/ota/prog`), well inside this allowance;
/// a client using a shorter topic can therefore get a payload up to the allowance minus its topic
/// through, never more.
pub const PUBLISH_HEADER_ALLOWANCE: usize = 256;

/// The largest remaining length an MQTT packet can declare (MQTT 3.1.1 section 2.2.3), i.e.
/// 256 MiB - 1.
pub const MQTT_MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The largest accepted `max_payload`: the MQTT limit minus [`PUBLISH_HEADER_ALLOWANCE`].
pub const MAX_PAYLOAD_LIMIT: usize = MQTT_MAX_REMAINING_LENGTH - PUBLISH_HEADER_ALLOWANCE;

/// rumqttd 0.20 panics when a segment is smaller than this.
pub const MIN_SEGMENT_BYTES: usize = 1024;

/// Errors of this crate. Messages are written for operators: what failed, with which value, and
/// what to change. None of them contains a password.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A configuration value is out of range.
    #[error("invalid configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The setting, as named in the configuration file (e.g. `broker.max_payload`).
        field: &'static str,
        /// The offending value, printed.
        value: String,
        /// Why it is refused and what to set instead.
        reason: String,
    },
    /// A TLS certificate or key file cannot be read or does not look like PEM.
    #[error(
        "TLS {what} file {path}: {reason}; check `broker.tls.{what}_path` and the file's permissions"
    )]
    TlsFile {
        /// `cert` or `key`.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS is configured but this build of the broker has no TLS support.
    #[error(
        "`broker.tls` is set but tinyfleet-broker was built without its `tls` feature; rebuild \
         with `--features tinyfleet-broker/tls`, or remove `broker.tls` and terminate TLS in a proxy"
    )]
    TlsUnsupported,
    /// The listen address cannot be bound (already in use, not a local address, no permission).
    #[error(
        "cannot listen on {addr}: {source}; is another broker running there? choose another \
         `broker.listen` (port 0 picks a free port)"
    )]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The broker's thread could not be created.
    #[error("cannot start the broker thread: {0}")]
    Spawn(std::io::Error),
    /// The broker's thread ended during start-up (a listener failed or rumqttd panicked; its log
    /// lines say which).
    #[error(
        "the MQTT broker stopped while starting on {addr}; see the rumqttd log lines above for \
         the cause"
    )]
    BrokerDied {
        /// The address it was to listen on.
        addr: SocketAddr,
    },
    /// The listener did not accept TCP connections in time.
    #[error(
        "the MQTT broker did not accept connections on {addr} within {waited:?}; is the address \
         reachable from this host, or is a firewall in the way?"
    )]
    NotListening {
        /// The address probed.
        addr: SocketAddr,
        /// How long start-up waited.
        waited: Duration,
    },
    /// An in-process link (`EmbeddedBroker::start_with_links`) could not be opened.
    #[error("the MQTT broker refused an in-process link: {0}")]
    Link(String),
}

impl BrokerError {
    pub(crate) fn invalid(
        field: &'static str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        BrokerError::InvalidConfig {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Settings of the embedded MQTT broker (rumqttd 0.20). Deserialises from the `[broker]`
/// section of the service configuration; unknown keys are errors, missing keys take the
/// defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Plain MQTT 3.1.1 listener. Port 0 picks a free port at start-up (see
    /// [`crate::EmbeddedBroker::local_addr`]).
    pub listen: SocketAddr,
    /// Optional MQTT 3.1.1-over-TLS listener (needs the crate's `tls` feature).
    pub tls: Option<TlsConfig>,
    /// Largest PUBLISH payload, in bytes. Enforced by the broker on the whole packet as
    /// `max_payload + PUBLISH_HEADER_ALLOWANCE`; a client sending more is disconnected and the
    /// message is dropped. Also bounds the CONNECT packet.
    pub max_payload: usize,
    /// Maximum simultaneous connections. rumqttd pre-allocates its connection tables for this
    /// many entries at start-up; a CONNECT beyond it is dropped without a CONNACK.
    pub max_connections: usize,
    /// rumqttd 0.20 uses this as the maximum number of packets read from one connection in one
    /// batch. The broker -> subscriber in-flight window is fixed at 100 by rumqttd.
    pub max_inflight: u16,
    /// Size of one segment of a filter's in-memory log, in bytes (see the module doc for the
    /// memory bound). At least 1 KiB and at least one maximal packet.
    pub segment_bytes: usize,
    /// Number of segments kept per filter log; older segments are dropped.
    pub segment_count: usize,
    /// How long a new TCP connection may take to send its CONNECT, in milliseconds.
    pub connection_timeout_ms: u16,
}

/// The TLS listener: PEM certificate chain and private key (PKCS#8, PKCS#1 or SEC1).
///
/// **Not for untrusted networks.** rumqttd 0.20 performs the TLS handshake inside its accept
/// loop with no timeout, so a single client that opens a TCP connection and never completes the
/// handshake stops the TLS listener from accepting anyone else (verified by a test). rumqttd
/// also re-reads both files on every TLS connection. Facing devices on the internet, terminate
/// TLS in a proxy (HAProxy, nginx `stream`, stunnel) in front of the plain listener instead.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener; port 0 picks a free port.
    pub listen: SocketAddr,
    /// PEM file with the server certificate chain.
    pub cert_path: PathBuf,
    /// PEM file with the server private key.
    pub key_path: PathBuf,
}

/// Default payload limit: 16 KiB, room for the largest reference summary with margin.
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * 1024;

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1883),
            tls: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_connections: 100_000,
            max_inflight: 100,
            // 1 MiB x 16 = at most ~16 MiB of messages per subscription filter.
            segment_bytes: 1024 * 1024,
            segment_count: 16,
            connection_timeout_ms: 5_000,
        }
    }
}

impl BrokerConfig {
    /// The packet limit handed to rumqttd (remaining length of one packet, in bytes):
    /// `max_payload + PUBLISH_HEADER_ALLOWANCE`. Clients talking to this broker should use at
    /// least this as their `max_packet`.
    pub fn max_packet(&self) -> usize {
        self.max_payload.saturating_add(PUBLISH_HEADER_ALLOWANCE)
    }

    /// Upper bound, in bytes, of the messages retained by one filter's log.
    pub fn per_filter_log_bytes(&self) -> usize {
        self.segment_count
            .saturating_mul(self.segment_bytes.saturating_add(self.max_packet()))
    }

    /// Checks every value; the first problem found is returned.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.max_payload == 0 {
            return Err(BrokerError::invalid(
                "broker.max_payload",
                self.max_payload,
                format!("must be at least 1 byte; the default is {DEFAULT_MAX_PAYLOAD} (16 KiB)"),
            ));
        }
        if self.max_payload > MAX_PAYLOAD_LIMIT {
            return Err(BrokerError::invalid(
                "broker.max_payload",
                self.max_payload,
                format!(
                    "MQTT cannot carry more than {MAX_PAYLOAD_LIMIT} bytes of payload (256 MiB \
                     minus {PUBLISH_HEADER_ALLOWANCE} bytes for topic and packet id)"
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(BrokerError::invalid(
                "broker.max_connections",
                self.max_connections,
                "must be at least 1 (every client would be refused)",
            ));
        }
        if self.max_inflight == 0 {
            return Err(BrokerError::invalid(
                "broker.max_inflight",
                self.max_inflight,
                "must be at least 1",
            ));
        }
        if self.segment_count == 0 {
            return Err(BrokerError::invalid(
                "broker.segment_count",
                self.segment_count,
                "must be at least 1 (rumqttd keeps messages in at least one segment)",
            ));
        }
        let min_segment = self.max_packet().max(MIN_SEGMENT_BYTES);
        if self.segment_bytes < min_segment {
            return Err(BrokerError::invalid(
                "broker.segment_bytes",
                self.segment_bytes,
                format!(
                    "must be at least {min_segment} bytes: 1 KiB and one whole packet of \
                     broker.max_payload ({}) + {PUBLISH_HEADER_ALLOWANCE}; raise it or lower \
                     broker.max_payload",
                    self.max_payload
                ),
            ));
        }
        if self.connection_timeout_ms == 0 {
            return Err(BrokerError::invalid(
                "broker.connection_timeout_ms",
                self.connection_timeout_ms,
                "must be at least 1 ms (every connection would time out before its CONNECT); \
                 the default is 5000",
            ));
        }
        if let Some(tls) = &self.tls {
            if tls.listen == self.listen && self.listen.port() != 0 {
                return Err(BrokerError::invalid(
                    "broker.tls.listen",
                    tls.listen,
                    "is the same address as broker.listen; give TLS its own port (8883 is usual)",
                ));
            }
            if !cfg!(feature = "tls") {
                return Err(BrokerError::TlsUnsupported);
            }
            check_pem_file("cert", &tls.cert_path, "CERTIFICATE-----")?;
            check_pem_file("key", &tls.key_path, "PRIVATE KEY-----")?;
        }
        Ok(())
    }
}

/// Reads `path` and checks that it contains a PEM block whose label ends with `label_end`.
/// The file's content is never included in the error (a key file is secret).
fn check_pem_file(what: &'static str, path: &Path, label_end: &str) -> Result<(), BrokerError> {
    let text = std::fs::read(path).map_err(|e| BrokerError::TlsFile {
        what,
        path: path.to_path_buf(),
        reason: format!("cannot be read: {e}"),
    })?;
    let text = String::from_utf8_lossy(&text);
    let found = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.trim_end().ends_with(label_end));
    if found {
        Ok(())
    } else {
        Err(BrokerError::TlsFile {
            what,
            path: path.to_path_buf(),
            reason: format!("has no PEM block `-----BEGIN ...{label_end}`"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: BrokerError) -> &'static str {
        match err {
            BrokerError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other}"),
        }
    }

    #[test]
    fn default_is_valid_and_bounded() {
        let config = BrokerConfig::default();
        config.validate().unwrap();
        assert_eq!(config.max_payload, 16 * 1024);
        assert_eq!(config.listen, "127.0.0.1:1883".parse().unwrap());
        // ~16 MiB per filter log, plus one packet of overshoot per segment.
        assert!(config.per_filter_log_bytes() <= 17 * 1024 * 1024);
    }

    #[test]
    fn payload_bounds() {
        let mut config = BrokerConfig {
            max_payload: 0,
            ..BrokerConfig::default()
        };
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "broker.max_payload"
        );
        config.max_payload = MAX_PAYLOAD_LIMIT + 1;
        config.segment_bytes = usize::MAX / 2;
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "broker.max_payload"
        );
        config.max_payload = MAX_PAYLOAD_LIMIT;
        config.validate().unwrap();
    }

    #[test]
    fn segment_must_hold_one_packet_and_a_kilobyte() {
        let mut config = BrokerConfig {
            max_payload: 4096,
            segment_bytes: 4096,
            ..BrokerConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("4352"), "{err}");
        assert_eq!(field_of(err), "broker.segment_bytes");
        config.segment_bytes = 4096 + PUBLISH_HEADER_ALLOWANCE;
        config.validate().unwrap();

        config.max_payload = 10;
        config.segment_bytes = 1023;
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "broker.segment_bytes"
        );
        config.segment_bytes = 1024;
        config.validate().unwrap();

        config.segment_count = 0;
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "broker.segment_count"
        );
    }

    #[test]
    fn zero_limits_are_refused() {
        let config = BrokerConfig {
            max_connections: 0,
            ..BrokerConfig::default()
        };
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "broker.max_connections"
        );
        let config = BrokerConfig {
            max_inflight: 0,
            ..BrokerConfig::default()
        };
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "broker.max_inflight"
        );
        let config = BrokerConfig {
            connection_timeout_ms: 0,
            ..BrokerConfig::default()
        };
        assert_eq!(
            field_of(config.validate().unwrap_err()),
            "broker.connection_timeout_ms"
        );
    }

    #[test]
    fn pem_check_never_prints_the_file() {
        let dir = std::env::temp_dir().join(format!("tf-broker-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, "secret-material-not-pem").unwrap();
        let err = check_pem_file("key", &key, "PRIVATE KEY-----").unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("secret-material"), "{text}");
        assert!(text.contains("key.pem"), "{text}");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        check_pem_file("key", &key, "PRIVATE KEY-----").unwrap();
        std::fs::write(&key, "-----BEGIN EC PRIVATE KEY-----\r\nAAAA\r\n").unwrap();
        check_pem_file("key", &key, "PRIVATE KEY-----").unwrap();
        let missing = dir.join("missing.pem");
        let err = check_pem_file("cert", &missing, "CERTIFICATE-----").unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
