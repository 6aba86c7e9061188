//! tinyfleet's device client: what runs on a Cortex-M class device next to the model.
//!
//! It turns a stream of inferences into a compact, authenticated CBOR summary (a few hundred
//! bytes per window), so that raw sensor data never leaves the device, and it owns the wire
//! types of protocol v1 (`docs/protocol.md`), which the backend uses with the `std` feature.
//!
//! Invariants:
//! - `no_std`, and **never allocates**: every buffer is fixed-size in a type or given by the
//!   caller.
//! - **Never panics on input**: bad observations, small buffers and malformed bytes are errors.
//! - The layout of every message is defined here and nowhere else.
//!
//! Modules: [`sketch`] (mergeable fixed-capacity histograms and moments), [`monitor`] (the
//! windowing API), [`counts`] (the packed-histogram bitstream), [`cose`] (COSE_Mac0 envelopes),
//! [`wire`] (topics and messages), [`decoded`] (owned, expanded messages; `std` only),
//! [`testkit`] (deterministic inference streams for tests, benchmarks and the demo; `std` only).
#![cfg_attr(not(feature = "std"), no_std)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

/// Logs through `log` and/or `defmt` when those features are on; compiles to nothing otherwise.
/// Format strings must be valid for both (plain `{}` over primitives).
macro_rules! device_log {
    ($level:ident, $($arg:tt)*) => {{
        #[cfg(feature = "log")]
        log::$level!($($arg)*);
        #[cfg(feature = "defmt")]
        defmt::$level!($($arg)*);
    }};
}
pub(crate) use device_log;

pub mod cose;
pub mod counts;
#[cfg(feature = "std")]
pub mod decoded;
pub mod monitor;
pub mod ota;
pub mod sketch;
#[cfg(feature = "std")]
pub mod testkit;
pub mod wire;

pub use cose::DeviceKey;
pub use monitor::{Inference, Monitor, MonitorConfig, RecordError, ReferenceMonitor};
pub use sketch::Edges;
pub use wire::{DeviceId, Kind, WireError};

#[cfg(test)]
extern crate std;
