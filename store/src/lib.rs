//! The state database: one SQLite file under the data directory (the embedded default,
//! [`Store::open`]), or a PostgreSQL database shared by several `serve` replicas
//! ([`Store::open_postgres`]). Both have the same schema and migrations and the same API.
//!
//! It holds the device registry (credentials hashed, message keys derived, never stored), each
//! device's presence and latest health, the replay windows that make deduplication survive
//! restarts, windowed aggregates per device and per cohort, and the ingest counters.
//!
//! Invariants (both backends):
//! - Nothing else touches these tables; other crates go through [`Store`] and [`Registry`].
//! - One ingest batch is one transaction ([`Store::commit`]): replay windows, device state,
//!   aggregates and counters move together, so a crash never counts a summary twice or half.
//! - Processes sharing the database serialise read-modify-write work with
//!   [`Store::exclusive`]; the registry's in-memory map catches up with other processes by
//!   lookups of unknown ids and [`Registry::refresh`]; the rollouts of the `all` process learn
//!   of progress, presence and hellos committed by any process from the change feed
//!   ([`Store::device_changes`]), numbered in commit order.
//! - No secret is stored in plain text, logged, or printed by `Debug`; errors never show the
//!   PostgreSQL password.
//!
//! The store is synchronous (rusqlite, the sync `postgres` client); async callers use
//! `spawn_blocking`. (A PostgreSQL call made on an async worker anyway does not panic, see
//! `db.rs`, but blocks that worker as SQLite does.)

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backup;
mod db;
mod feed;
mod lock;
mod models;
mod monitoring;
mod registry;
mod rollouts;
mod schema;
mod state;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests_replicas;
#[cfg(test)]
mod tests_tls;
mod ui_queries;

pub use db::PostgresOptions;
pub use feed::{DeviceChanges, MAX_CHANGES_PAGE};
pub use lock::ExclusiveGuard;
pub use models::{ModelVersion, PatchRecord};
pub use monitoring::{DriftInput, OfflineDevice, ProfileInfo, parse_cohort_key};
pub use registry::{Credentials, DeviceRecord, LOOKUP_BURST, LOOKUP_RATE, MISS_TTL, Registry};
pub use rollouts::RolloutRow;
pub use state::{
    Batch, CohortWindow, DeviceListItem, DeviceOta, DevicePage, DeviceQuery, DeviceState,
    DeviceWindow, Presence, ReplayWindow, Store, WindowWrite, cohort_key,
};

/// Why a store operation failed. Messages name what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL error, as text (server message and SQLSTATE, or the connection's cause);
    /// never the connection's password.
    #[error("PostgreSQL error: {0}")]
    Postgres(String),
    #[error("cannot use data directory {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("device {0} already exists; revoke it or pick another id")]
    DeviceExists(String),
    #[error("no device {0}")]
    NoDevice(String),
    #[error("invalid device id {0:?}: use 1-64 of A-Z a-z 0-9 . _ -")]
    BadDeviceId(String),
    #[error(
        "device id {0:?} is reserved: ids starting with \"tinyfleet-\" are tinyfleet's own clients"
    )]
    ReservedDeviceId(String),
    #[error(
        "database {path} has schema version {found}, this build knows up to {known}; upgrade tinyfleet"
    )]
    SchemaTooNew {
        path: std::path::PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{0}")]
    ModelConflict(String),
    #[error("corrupt stored value in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
