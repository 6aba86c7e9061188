//! Drift detection from histograms alone: the statistics, the detectors and the monitoring
//! profiles they compare against. Plain synchronous code; the service shell feeds it windows.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod engine;
pub mod evaluate;
pub mod profile;
pub mod sim;
pub mod stats;
