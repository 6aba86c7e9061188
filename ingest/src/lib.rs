//! Ingest: turns MQTT messages from devices into verified, decoded fleet events.
//!
//! The pipeline is `source -> verify -> decode -> dedup -> aggregate -> sinks`, each stage a
//! plain component with direct tests ([`decode`], [`dedup`], [`aggregate`], tied together by
//! [`pipeline`]); the async [`shell`] and [`source`] only drive them.
//!
//! Invariants:
//! - A message is trusted only after its COSE_Mac0 tag verifies under the key of the device
//!   named in its topic. Nothing from an unverified message reaches fleet state.
//! - Every rejected message has exactly one [`decode::Reject`] reason, which is counted.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod aggregate;
pub mod auth;
pub mod decode;
pub mod dedup;
pub mod influx;
pub mod journal;
pub mod metrics;
pub mod pipeline;
pub mod shell;
pub mod source;
