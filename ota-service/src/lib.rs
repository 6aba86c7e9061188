//! The OTA service: model versions and their artifacts, delta patches between them, signed
//! update offers, and the transports devices fetch them over.
//!
//! - [`delta`]: the `TFP1` patch builder (the device's `ota::patch` applies it).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod delta;
