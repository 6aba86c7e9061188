//! MQTT for tinyfleet: the embedded broker (rumqttd 0.20) with device authentication, and the
//! MQTT client (rumqttc 0.25) that services use against it or against an external broker.
//!
//! - [`config`]: [`BrokerConfig`] and its validation, [`BrokerError`].
//! - [`embedded`]: [`EmbeddedBroker`], started in-process, authenticating CONNECTs through a
//!   [`ConnectAuth`]. Its module doc lists the rumqttd behaviours the rest of the system relies
//!   on (persistent sessions, payload limit, shared subscriptions, what an auth refusal looks
//!   like).
//! - [`client`]: [`connect`], [`Connection`] (reconnects with jittered exponential backoff and
//!   reports every (re)connect), [`Acker`] (manual acknowledgements in the order rumqttd
//!   requires, never across a reconnect), [`shared`] for `$share/{group}/{filter}`
//!   subscriptions.
//! - [`mosquitto`]: Mosquitto as the external broker: the password file (its `$7$` PBKDF2
//!   hashes) and the ACL file confining each device to its own topics.
//!
//! This crate knows nothing about the tinyfleet protocol's messages: it moves bytes on topics.
//! It never logs a password, and its library code never panics on configuration or network
//! input.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod config;
pub mod embedded;
pub mod mosquitto;

pub use client::{
    AckOutcome, AckToken, Acker, ClientConfig, ClientEvent, Connection, backoff_delay, connect,
    is_valid_share_group, shared,
};
pub use config::{
    BrokerConfig, BrokerError, DEFAULT_MAX_PAYLOAD, PUBLISH_HEADER_ALLOWANCE, TlsConfig,
};
pub use embedded::{ConnectAuth, EmbeddedBroker};

/// The rumqttc crate this client is built on, re-exported so callers use the same version.
pub use rumqttc;
