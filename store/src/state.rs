//! Fleet state: presence, latest health, replay windows, windowed aggregates and counters.
//!
//! Writes arrive as one [`Batch`] per ingest commit and land in one transaction. Aggregates are
//! opaque JSON to the store: ingest owns their shape, the API passes them through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use serde::Serialize;

use crate::db::{Db, Dialect, P, PgTarget, PostgresOptions, Ty, Upsert, args};
use crate::lock::LockConnections;
use crate::registry::{Registry, lock};
use crate::{Result, StoreError};

/// A device's replay window for one message kind: the newest `(boot, seq)` and a bitmap of the
/// 64 sequence numbers below it that were seen (bit 0 = `max_seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayWindow {
    pub boot: u32,
    pub max_seq: u32,
    pub bitmap: u64,
}

/// Online/offline as the last accepted presence event says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Presence {
    pub online: bool,
    /// `"will"` (the broker published the last will) or `"timeout"` (silent too long).
    pub offline_reason: Option<String>,
    /// `(boot, seq)` of the newest hello: a will only ends this connection.
    pub hello_boot: Option<u32>,
    pub hello_seq: Option<u32>,
}

/// A device's newest OTA progress report (`tf/v1/{device}/ota/prog`), by `(boot, seq)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceOta {
    pub id: String,
    pub boot: u32,
    pub seq: u32,
    /// The manifest reported on (its `seq`).
    pub manifest_seq: u32,
    /// A `progress.state` code (docs/protocol.md).
    pub state: u8,
    pub bytes: u32,
    pub error: u16,
    pub received_ms: i64,
}

/// Everything the backend keeps about one device besides its aggregates.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DeviceState {
    pub id: String,
    pub presence: Presence,
    pub fw: Option<String>,
    pub model_id: Option<String>,
    pub model_version: Option<String>,
    pub model_seq: Option<u32>,
    pub hw: Option<String>,
    pub caps: Option<u32>,
    /// Server receive time of the newest accepted message.
    pub last_seen_ms: Option<i64>,
    /// Health from the newest summary by `(boot, seq)` (not by arrival).
    pub health: Option<serde_json::Value>,
    pub health_boot: Option<u32>,
    pub health_seq: Option<u32>,
    /// Device uptime at that summary.
    pub health_uptime_ms: Option<u64>,
    pub summaries: u64,
    /// Summaries the device sent that never arrived (sequence gaps).
    pub lost_summaries: u64,
    pub updated_ms: i64,
}

/// One device's aggregate for one time window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceWindow {
    pub id: String,
    pub start_ms: i64,
    pub cohort: String,
    pub agg: serde_json::Value,
}

/// One cohort's aggregate for one time window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CohortWindow {
    pub cohort: String,
    pub start_ms: i64,
    pub agg: serde_json::Value,
}

/// A window aggregate to write, already serialised as JSON (ingest owns its shape).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowWrite {
    /// Device id for device windows, cohort key for cohort windows.
    pub key: String,
    pub start_ms: i64,
    /// The device's cohort (device windows only).
    pub cohort: Option<String>,
    pub json: String,
}

/// The writes of one ingest commit.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub replay: Vec<(String, u8, ReplayWindow)>,
    pub states: Vec<DeviceState>,
    pub device_windows: Vec<WindowWrite>,
    pub cohort_windows: Vec<WindowWrite>,
    /// Absolute counter values.
    pub counters: Vec<(String, i64)>,
    /// Newest OTA progress per device; an older `(boot, seq)` than the stored one is ignored.
    pub ota: Vec<DeviceOta>,
    /// Devices whose presence or hello changed. With every device of `ota`, they are stamped
    /// in the change feed the rollouts follow ([`Store::device_changes`]).
    pub changed: Vec<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.replay.is_empty()
            && self.states.is_empty()
            && self.device_windows.is_empty()
            && self.cohort_windows.is_empty()
            && self.counters.is_empty()
            && self.ota.is_empty()
            && self.changed.is_empty()
    }
}

/// Filters for listing devices.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// `model_id@model_version/hw`.
    pub cohort: Option<String>,
    /// `key=value` user tag.
    pub tag: Option<(String, String)>,
    /// `online`, `offline`, `revoked` or `unseen`.
    pub state: Option<String>,
    /// Return devices with ids after this one (cursor paging).
    pub after: Option<String>,
    pub limit: usize,
}

/// One page of devices.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePage {
    pub devices: Vec<DeviceListItem>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// A device in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceListItem {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub revoked: bool,
    pub online: bool,
    pub cohort: Option<String>,
    pub fw: Option<String>,
    pub last_seen_ms: Option<i64>,
    pub lost_summaries: u64,
}

/// The state database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Mutex<Db>>,
    path: PathBuf,
    data_dir: PathBuf,
    registry: Registry,
    /// PostgreSQL only: the connections [`Store::exclusive`] sections are held on.
    lock_connections: Option<Arc<LockConnections>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The cohort key of a device: `model_id@model_version/hw`.
pub fn cohort_key(model_id: &str, model_version: &str, hw: &str) -> String {
    format!("{model_id}@{model_version}/{hw}")
}

fn opt_u32(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn create_dir(data_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
        path: data_dir.to_owned(),
        source,
    })
}

const SELECT_STATE: &str = "SELECT id, online, offline_reason, hello_boot, hello_seq, fw, \
     model_id, model_version, model_seq, hw, caps, last_seen_ms, health, health_boot, health_seq, \
     health_uptime_ms, summaries, lost_summaries, updated_ms FROM device_state";

fn state_from_row(mut r: crate::db::Row) -> Result<DeviceState> {
    let health = r
        .opt_text(12)?
        .map(|h| serde_json::from_str(&h))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            table: "device_state",
            detail: e.to_string(),
        })?;
    Ok(DeviceState {
        id: r.text(0)?,
        presence: Presence {
            online: r.bool(1)?,
            offline_reason: r.opt_text(2)?,
            hello_boot: opt_u32(r.opt_i64(3)?),
            hello_seq: opt_u32(r.opt_i64(4)?),
        },
        fw: r.opt_text(5)?,
        model_id: r.opt_text(6)?,
        model_version: r.opt_text(7)?,
        model_seq: opt_u32(r.opt_i64(8)?),
        hw: r.opt_text(9)?,
        caps: opt_u32(r.opt_i64(10)?),
        last_seen_ms: r.opt_i64(11)?,
        health,
        health_boot: opt_u32(r.opt_i64(13)?),
        health_seq: opt_u32(r.opt_i64(14)?),
        health_uptime_ms: r.opt_i64(15)?.map(|v| v as u64),
        summaries: r.i64(16)? as u64,
        lost_summaries: r.i64(17)? as u64,
        updated_ms: r.i64(18)?,
    })
}

const REPLAY: Upsert = Upsert {
    table: "replay",
    columns: &[
        ("id", Ty::Text),
        ("kind", Ty::Int),
        ("boot", Ty::Int),
        ("max_seq", Ty::Int),
        ("bitmap", Ty::Int),
    ],
    key: 2,
    only_if: None,
};

const DEVICE_STATE: Upsert = Upsert {
    table: "device_state",
    columns: &[
        ("id", Ty::Text),
        ("online", Ty::Int),
        ("offline_reason", Ty::Text),
        ("hello_boot", Ty::Int),
        ("hello_seq", Ty::Int),
        ("fw", Ty::Text),
        ("model_id", Ty::Text),
        ("model_version", Ty::Text),
        ("model_seq", Ty::Int),
        ("hw", Ty::Text),
        ("caps", Ty::Int),
        ("last_seen_ms", Ty::Int),
        ("health", Ty::Text),
        ("health_boot", Ty::Int),
        ("health_seq", Ty::Int),
        ("health_uptime_ms", Ty::Int),
        ("summaries", Ty::Int),
        ("lost_summaries", Ty::Int),
        ("updated_ms", Ty::Int),
    ],
    key: 1,
    only_if: None,
};

const DEVICE_WINDOWS: Upsert = Upsert {
    table: "device_windows",
    columns: &[
        ("id", Ty::Text),
        ("start_ms", Ty::Int),
        ("cohort", Ty::Text),
        ("agg", Ty::Text),
    ],
    key: 2,
    only_if: None,
};

const COHORT_WINDOWS: Upsert = Upsert {
    table: "cohort_windows",
    columns: &[
        ("cohort", Ty::Text),
        ("start_ms", Ty::Int),
        ("agg", Ty::Text),
    ],
    key: 2,
    only_if: None,
};

const COUNTERS: Upsert = Upsert {
    table: "counters",
    columns: &[("name", Ty::Text), ("value", Ty::Int)],
    key: 1,
    only_if: None,
};

const DEVICE_OTA: Upsert = Upsert {
    table: "device_ota",
    columns: &[
        ("id", Ty::Text),
        ("boot", Ty::Int),
        ("seq", Ty::Int),
        ("manifest_seq", Ty::Int),
        ("state", Ty::Int),
        ("bytes", Ty::Int),
        ("error", Ty::Int),
        ("received_ms", Ty::Int),
    ],
    key: 1,
    only_if: Some("(excluded.boot, excluded.seq) > (device_ota.boot, device_ota.seq)"),
};

/// WAL with full sync (a commit that returned is on disk, and readers do not block the ingest
/// writer), foreign keys, and the schema migrated.
fn prepare_sqlite(conn: &mut Connection, path: &Path) -> Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    crate::schema::migrate_sqlite(conn, path)
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/tinyfleet.db` and the master key beside it: the
    /// embedded SQLite database, the default.
    pub fn open(data_dir: &Path) -> Result<Self> {
        create_dir(data_dir)?;
        let path = data_dir.join("tinyfleet.db");
        let mut conn = Connection::open(&path)?;
        // Set first: processes opening the file at once wait for each other's locks, and for
        // another process's migrations (which may take long on a big database).
        conn.busy_timeout(std::time::Duration::from_secs(120))?;
        // SQLite answers some lock conflicts of connections opening a new file at once with
        // SQLITE_BUSY without waiting (switching the journal mode, the first WAL recovery);
        // the steps are idempotent, so they are simply tried again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            match prepare_sqlite(&mut conn, &path) {
                Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::assemble(Db::Sqlite(conn), path, data_dir, None)
    }

    /// Opens the PostgreSQL database at `url` (`postgres://user:password@host:port/db`, or
    /// `key=value` settings), migrating it if needed, for several `serve` replicas sharing it.
    /// `data_dir` still holds the master key (the same file for every replica: copy it, or
    /// share the directory) and the OTA artifacts. Errors never show the password.
    ///
    /// With `sslmode=require` in the URL, connections use TLS and the server's certificate is
    /// verified against the Mozilla roots (see [`Store::open_postgres_with`] for a private
    /// CA); otherwise they are plain text.
    pub fn open_postgres(data_dir: &Path, url: &str) -> Result<Self> {
        Self::open_postgres_with(data_dir, url, &PostgresOptions::default())
    }

    /// [`Store::open_postgres`] with options: `ca_file`, a PEM file of CA certificates trusted
    /// besides the Mozilla roots to sign the server's certificate (needs `sslmode=require`).
    /// Every connection of the store (its own, and those [`Store::exclusive`] sections hold)
    /// is made the same way.
    pub fn open_postgres_with(
        data_dir: &Path,
        url: &str,
        options: &PostgresOptions,
    ) -> Result<Self> {
        create_dir(data_dir)?;
        let target = PgTarget::new(url, options)?;
        let path = PathBuf::from(crate::db::describe(&target.config));
        let mut db = Db::Postgres(crate::db::Pg::connect(&target)?);
        crate::schema::migrate_postgres(&mut db, &path)?;
        Self::assemble(
            db,
            path,
            data_dir,
            Some(Arc::new(LockConnections::new(target))),
        )
    }

    /// Checks PostgreSQL settings without connecting (for configuration checks): the URL
    /// parses, and a CA file goes with `sslmode=require` and holds at least one usable
    /// certificate. Errors never show the password.
    pub fn check_postgres(url: &str, options: &PostgresOptions) -> Result<()> {
        PgTarget::new(url, options).map(|_| ())
    }

    fn assemble(
        db: Db,
        path: PathBuf,
        data_dir: &Path,
        lock_connections: Option<Arc<LockConnections>>,
    ) -> Result<Self> {
        let db = Arc::new(Mutex::new(db));
        let registry = Registry::open(db.clone(), data_dir)?;
        Ok(Self {
            db,
            path,
            data_dir: data_dir.to_owned(),
            registry,
            lock_connections,
        })
    }

    /// The SQLite database file; for PostgreSQL, where the database is without credentials
    /// (`postgres://user@host:port/db`, for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data directory (master key, OTA artifacts, lock files).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this store is on PostgreSQL (shared by replicas) rather than SQLite.
    pub fn is_postgres(&self) -> bool {
        self.lock_connections.is_some()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The database connection (`lock` it; see [`Db`]).
    pub(crate) fn conn(&self) -> &Mutex<Db> {
        &self.db
    }

    pub(crate) fn lock_connections(&self) -> Option<&Arc<LockConnections>> {
        self.lock_connections.as_ref()
    }

    /// Whether the store's own connection is encrypted (PostgreSQL's `pg_stat_ssl`), for
    /// tests; `None` on SQLite.
    #[cfg(test)]
    pub(crate) fn postgres_ssl(&self) -> Result<Option<bool>> {
        let mut db = lock(&self.db);
        if db.dialect() != Dialect::Postgres {
            return Ok(None);
        }
        let row = db.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            args![],
        )?;
        row.bool(0).map(Some)
    }

    /// Writes a batch in one transaction.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let healths: Vec<Option<String>> = batch
            .states
            .iter()
            .map(|s| s.health.as_ref().map(|h| h.to_string()))
            .collect();
        // The newest report per device by (boot, seq); the first of equals, as applying them
        // one by one would keep.
        let mut ota: BTreeMap<&str, &DeviceOta> = BTreeMap::new();
        for o in &batch.ota {
            match ota.get(o.id.as_str()) {
                Some(kept) if (o.boot, o.seq) <= (kept.boot, kept.seq) => {}
                _ => {
                    ota.insert(&o.id, o);
                }
            }
        }
        let mut db = lock(&self.db);
        db.transaction(|db| {
            let mut v: Vec<P<'_>> = Vec::new();
            for (id, kind, w) in &batch.replay {
                v.extend([
                    P::from(id),
                    P::from(*kind),
                    P::from(w.boot),
                    P::from(w.max_seq),
                    P::Int(w.bitmap as i64),
                ]);
            }
            db.upsert(&REPLAY, &v)?;
            v.clear();
            for (s, health) in batch.states.iter().zip(&healths) {
                v.extend([
                    P::from(&s.id),
                    P::from(s.presence.online),
                    P::from(s.presence.offline_reason.as_deref()),
                    P::from(s.presence.hello_boot),
                    P::from(s.presence.hello_seq),
                    P::from(s.fw.as_deref()),
                    P::from(s.model_id.as_deref()),
                    P::from(s.model_version.as_deref()),
                    P::from(s.model_seq),
                    P::from(s.hw.as_deref()),
                    P::from(s.caps),
                    P::from(s.last_seen_ms),
                    P::from(health.as_deref()),
                    P::from(s.health_boot),
                    P::from(s.health_seq),
                    P::from(s.health_uptime_ms.map(|v| v as i64)),
                    P::Int(s.summaries as i64),
                    P::Int(s.lost_summaries as i64),
                    P::from(s.updated_ms),
                ]);
            }
            db.upsert(&DEVICE_STATE, &v)?;
            v.clear();
            for w in &batch.device_windows {
                v.extend([
                    P::from(&w.key),
                    P::from(w.start_ms),
                    P::from(w.cohort.as_deref().unwrap_or("")),
                    P::from(&w.json),
                ]);
            }
            db.upsert(&DEVICE_WINDOWS, &v)?;
            v.clear();
            for w in &batch.cohort_windows {
                v.extend([P::from(&w.key), P::from(w.start_ms), P::from(&w.json)]);
            }
            db.upsert(&COHORT_WINDOWS, &v)?;
            v.clear();
            for (name, value) in &batch.counters {
                v.extend([P::from(name), P::from(*value)]);
            }
            db.upsert(&COUNTERS, &v)?;
            v.clear();
            for o in ota.values() {
                v.extend([
                    P::from(&o.id),
                    P::from(o.boot),
                    P::from(o.seq),
                    P::from(o.manifest_seq),
                    P::from(o.state),
                    P::from(o.bytes),
                    P::from(o.error),
                    P::from(o.received_ms),
                ]);
            }
            db.upsert(&DEVICE_OTA, &v)?;
            // Last: the feed's counter row stays locked until the commit.
            crate::feed::record(
                db,
                ota.keys().copied(),
                batch.changed.iter().map(String::as_str),
            )
        })
    }

    /// A device's newest OTA progress report.
    pub fn device_ota(&self, id: &str) -> Result<Option<DeviceOta>> {
        lock(&self.db)
            .query_opt(
                "SELECT id, boot, seq, manifest_seq, state, bytes, error, received_ms \
                 FROM device_ota WHERE id = ?1",
                args![id],
            )?
            .map(|mut r| {
                Ok(DeviceOta {
                    id: r.text(0)?,
                    boot: r.int(1)?,
                    seq: r.int(2)?,
                    manifest_seq: r.int(3)?,
                    state: r.int(4)?,
                    bytes: r.int(5)?,
                    error: r.int(6)?,
                    received_ms: r.i64(7)?,
                })
            })
            .transpose()
    }

    pub fn replay_window(&self, id: &str, kind: u8) -> Result<Option<ReplayWindow>> {
        lock(&self.db)
            .query_opt(
                "SELECT boot, max_seq, bitmap FROM replay WHERE id = ?1 AND kind = ?2",
                args![id, kind],
            )?
            .map(|r| {
                Ok(ReplayWindow {
                    boot: r.int(0)?,
                    max_seq: r.int(1)?,
                    bitmap: r.i64(2)? as u64,
                })
            })
            .transpose()
    }

    pub fn device_state(&self, id: &str) -> Result<Option<DeviceState>> {
        lock(&self.db)
            .query_opt(&format!("{SELECT_STATE} WHERE id = ?1"), args![id])?
            .map(state_from_row)
            .transpose()
    }

    /// Rows of `select` for each of `ids` (`WHERE id = ...`, then `tail`; `rest` are the
    /// parameters from `?2` on): one round trip on PostgreSQL (`id = ANY(?1)`), one in-process
    /// lookup per id on SQLite.
    fn rows_for_ids(
        &self,
        select: &str,
        tail: &str,
        ids: &[&str],
        rest: &[P<'_>],
    ) -> Result<Vec<crate::db::Row>> {
        let mut db = lock(&self.db);
        match db.dialect() {
            Dialect::Postgres => {
                let mut args = vec![P::TextArray(ids)];
                args.extend_from_slice(rest);
                db.query(&format!("{select} WHERE id = ANY(?1){tail}"), &args)
            }
            Dialect::Sqlite => {
                let sql = format!("{select} WHERE id = ?1{tail}");
                let mut out = Vec::with_capacity(ids.len());
                let mut args = vec![P::Null];
                args.extend_from_slice(rest);
                for id in ids {
                    args[0] = P::Text(id);
                    out.extend(db.query(&sql, &args)?);
                }
                Ok(out)
            }
        }
    }

    /// The stored states of the devices among `ids` that have one (any order). For ingest
    /// replicas, which read every device of a batch fresh under [`Store::exclusive`]: on
    /// PostgreSQL one round trip instead of one per device.
    pub fn device_states(&self, ids: &[&str]) -> Result<Vec<DeviceState>> {
        self.rows_for_ids(SELECT_STATE, "", ids, &[])?
            .into_iter()
            .map(state_from_row)
            .collect()
    }

    /// Every stored replay window (all kinds) of the devices among `ids`, as
    /// `(device, kind, window)`, in one round trip like [`Store::device_states`].
    pub fn replay_windows(&self, ids: &[&str]) -> Result<Vec<(String, u8, ReplayWindow)>> {
        self.rows_for_ids(
            "SELECT id, kind, boot, max_seq, bitmap FROM replay",
            "",
            ids,
            &[],
        )?
        .into_iter()
        .map(|mut r| {
            Ok((
                r.text(0)?,
                r.int(1)?,
                ReplayWindow {
                    boot: r.int(2)?,
                    max_seq: r.int(3)?,
                    bitmap: r.i64(4)? as u64,
                },
            ))
        })
        .collect()
    }

    /// The stored windows starting at `start_ms` of the devices among `ids`, in one round trip
    /// like [`Store::device_states`].
    pub fn device_windows_at(&self, ids: &[&str], start_ms: i64) -> Result<Vec<DeviceWindow>> {
        self.rows_for_ids(
            "SELECT id, start_ms, cohort, agg FROM device_windows",
            " AND start_ms = ?2",
            ids,
            args![start_ms],
        )?
        .into_iter()
        .map(|mut r| {
            Ok(DeviceWindow {
                id: r.text(0)?,
                start_ms: r.i64(1)?,
                cohort: r.text(2)?,
                agg: Self::parse("device_windows", &r.text(3)?)?,
            })
        })
        .collect()
    }

    fn json_rows(
        &self,
        sql: &str,
        args: &[P<'_>],
        table: &'static str,
    ) -> Result<Vec<(String, i64, String, String)>> {
        let rows = lock(&self.db).query(sql, args)?;
        rows.into_iter()
            .map(|mut r| Ok((r.text(0)?, r.i64(1)?, r.text(2)?, r.text(3)?)))
            .collect::<Result<_>>()
            .map_err(|e| StoreError::Corrupt {
                table,
                detail: e.to_string(),
            })
    }

    fn parse(table: &'static str, json: &str) -> Result<serde_json::Value> {
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
            table,
            detail: e.to_string(),
        })
    }

    /// A device's windows from `since_ms` on, oldest first.
    pub fn device_windows(
        &self,
        id: &str,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<DeviceWindow>> {
        self.json_rows(
            "SELECT id, start_ms, cohort, agg FROM device_windows WHERE id = ?1 AND start_ms >= ?2 \
             ORDER BY start_ms LIMIT ?3",
            args![id, since_ms, limit.min(i64::MAX as usize) as i64],
            "device_windows",
        )?
        .into_iter()
        .map(|(id, start_ms, cohort, agg)| {
            Ok(DeviceWindow {
                id,
                start_ms,
                cohort,
                agg: Self::parse("device_windows", &agg)?,
            })
        })
        .collect()
    }

    /// One device window, if stored.
    pub fn device_window(&self, id: &str, start_ms: i64) -> Result<Option<DeviceWindow>> {
        Ok(self
            .device_windows(id, start_ms, 1)?
            .into_iter()
            .find(|w| w.start_ms == start_ms))
    }

    /// A cohort's windows from `since_ms` on, oldest first.
    pub fn cohort_windows(
        &self,
        cohort: &str,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<CohortWindow>> {
        self.json_rows(
            "SELECT cohort, start_ms, '', agg FROM cohort_windows WHERE cohort = ?1 AND start_ms >= ?2 \
             ORDER BY start_ms LIMIT ?3",
            args![cohort, since_ms, limit.min(i64::MAX as usize) as i64],
            "cohort_windows",
        )?
        .into_iter()
        .map(|(cohort, start_ms, _, agg)| {
            Ok(CohortWindow {
                cohort,
                start_ms,
                agg: Self::parse("cohort_windows", &agg)?,
            })
        })
        .collect()
    }

    /// One cohort window, if stored.
    pub fn cohort_window(&self, cohort: &str, start_ms: i64) -> Result<Option<CohortWindow>> {
        Ok(self
            .cohort_windows(cohort, start_ms, 1)?
            .into_iter()
            .find(|w| w.start_ms == start_ms))
    }

    /// Every cohort with its number of stored windows and newest window start.
    pub fn cohorts(&self) -> Result<Vec<(String, u64, i64)>> {
        lock(&self.db)
            .query(
                "SELECT cohort, COUNT(*), MAX(start_ms) FROM cohort_windows GROUP BY cohort \
                 ORDER BY cohort",
                &[],
            )?
            .into_iter()
            .map(|mut r| Ok((r.text(0)?, r.i64(1)? as u64, r.i64(2)?)))
            .collect()
    }

    /// Distinct devices that reported in a cohort window.
    pub fn cohort_window_devices(&self, cohort: &str, start_ms: i64) -> Result<u64> {
        Ok(lock(&self.db)
            .query_one(
                "SELECT COUNT(*) FROM device_windows WHERE cohort = ?1 AND start_ms = ?2",
                args![cohort, start_ms],
            )?
            .i64(0)? as u64)
    }

    pub fn counters(&self) -> Result<BTreeMap<String, i64>> {
        lock(&self.db)
            .query("SELECT name, value FROM counters", &[])?
            .into_iter()
            .map(|mut r| Ok((r.text(0)?, r.i64(1)?)))
            .collect()
    }

    /// Lists devices with filters and cursor paging, ordered by id.
    pub fn list_devices(&self, q: &DeviceQuery) -> Result<DevicePage> {
        let mut db = lock(&self.db);
        let dialect = db.dialect();
        let mut sql = String::from(
            "SELECT d.id, d.tags, d.revoked_ms, s.online, s.model_id, s.model_version, s.hw, s.fw, \
             s.last_seen_ms, s.lost_summaries FROM devices d LEFT JOIN device_state s ON s.id = d.id \
             WHERE d.id > ?1",
        );
        let after = q.after.clone().unwrap_or_default();
        let mut args: Vec<String> = Vec::new();
        if let Some(cohort) = &q.cohort {
            args.push(cohort.clone());
            sql.push_str(&format!(
                " AND s.model_id || '@' || s.model_version || '/' || s.hw = ?{}",
                args.len() + 1
            ));
        }
        if let Some((k, v)) = &q.tag {
            match dialect {
                Dialect::Sqlite => args.push(format!("$.\"{}\"", k.replace('"', ""))),
                Dialect::Postgres => args.push(k.clone()),
            }
            args.push(v.clone());
            let (path, value) = (args.len(), args.len() + 1);
            sql.push_str(&match dialect {
                Dialect::Sqlite => format!(" AND json_extract(d.tags, ?{path}) = ?{value}"),
                Dialect::Postgres => format!(" AND (d.tags::jsonb ->> ?{path}) = ?{value}"),
            });
        }
        match q.state.as_deref() {
            None => {}
            Some("online") => sql.push_str(" AND d.revoked_ms IS NULL AND s.online = 1"),
            Some("offline") => {
                sql.push_str(" AND d.revoked_ms IS NULL AND s.id IS NOT NULL AND s.online = 0")
            }
            Some("unseen") => sql.push_str(" AND d.revoked_ms IS NULL AND s.id IS NULL"),
            Some("revoked") => sql.push_str(" AND d.revoked_ms IS NOT NULL"),
            Some(other) => {
                return Err(StoreError::Corrupt {
                    table: "query",
                    detail: format!(
                        "unknown state {other:?}: use online, offline, unseen or revoked"
                    ),
                });
            }
        }
        let limit = q.limit.clamp(1, 1000);
        sql.push_str(&format!(" ORDER BY d.id LIMIT ?{}", args.len() + 2));
        let mut params: Vec<P<'_>> = vec![P::from(&after)];
        params.extend(args.iter().map(P::from));
        params.push(P::Int((limit + 1) as i64));
        let rows = db.query(&sql, &params)?;
        drop(db);
        let mut devices = rows
            .into_iter()
            .map(|mut r| {
                let model_id = r.opt_text(4)?;
                let model_version = r.opt_text(5)?;
                let hw = r.opt_text(6)?;
                let cohort = match (&model_id, &model_version, &hw) {
                    (Some(m), Some(v), Some(h)) => Some(cohort_key(m, v, h)),
                    _ => None,
                };
                Ok(DeviceListItem {
                    id: r.text(0)?,
                    tags: serde_json::from_str(&r.text(1)?).unwrap_or_default(),
                    revoked: r.opt_i64(2)?.is_some(),
                    online: r.opt_bool(3)?.unwrap_or(false),
                    cohort,
                    fw: r.opt_text(7)?,
                    last_seen_ms: r.opt_i64(8)?,
                    lost_summaries: r.opt_i64(9)?.unwrap_or(0) as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next = if devices.len() > limit {
            devices.truncate(limit);
            devices.last().map(|d| d.id.clone())
        } else {
            None
        };
        Ok(DevicePage { devices, next })
    }

    /// Deletes windows that started before `before_ms`; returns how many rows went.
    pub fn prune_windows(&self, before_ms: i64) -> Result<usize> {
        let mut db = lock(&self.db);
        let a = db.execute(
            "DELETE FROM device_windows WHERE start_ms < ?1",
            args![before_ms],
        )?;
        let b = db.execute(
            "DELETE FROM cohort_windows WHERE start_ms < ?1",
            args![before_ms],
        )?;
        Ok(a + b)
    }

    /// Ids of active devices whose state says online but that were last seen before
    /// `before_ms` (candidates for the inactivity timer).
    pub fn silent_online_devices(&self, before_ms: i64) -> Result<Vec<String>> {
        lock(&self.db)
            .query(
                "SELECT id FROM device_state WHERE online = 1 AND last_seen_ms < ?1",
                args![before_ms],
            )?
            .into_iter()
            .map(|mut r| r.text(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn ota_progress_keeps_the_newest_report_by_boot_and_seq() {
        for t in crate::testing::TestDb::all() {
            let store = t.open();
            let report = |boot, seq, state| DeviceOta {
                id: "d1".into(),
                boot,
                seq,
                manifest_seq: 7,
                state,
                bytes: seq * 100,
                error: 0,
                received_ms: 1,
            };
            for (boot, seq, state) in [(1, 5, 2), (1, 3, 1), (2, 1, 5), (1, 9, 6)] {
                let batch = Batch {
                    ota: vec![report(boot, seq, state)],
                    ..Batch::default()
                };
                store.commit(&batch).unwrap();
            }
            // (2, 1) is the newest; the late (1, 3) and (1, 9) change nothing.
            assert_eq!(store.device_ota("d1").unwrap(), Some(report(2, 1, 5)));
            assert_eq!(store.device_ota("d2").unwrap(), None);
        }
    }

    #[test]
    fn batches_commit_and_read_back_after_reopen() {
        for t in crate::testing::TestDb::all() {
            {
                let store = t.open();
                store
                    .registry()
                    .provision("d1", BTreeMap::from([("site".into(), "north".into())]))
                    .unwrap();
                store.registry().provision("d2", BTreeMap::new()).unwrap();
                let batch = Batch {
                    replay: vec![(
                        "d1".into(),
                        2,
                        ReplayWindow {
                            boot: 3,
                            max_seq: 9,
                            bitmap: u64::MAX,
                        },
                    )],
                    states: vec![DeviceState {
                        id: "d1".into(),
                        presence: Presence {
                            online: true,
                            ..Presence::default()
                        },
                        model_id: Some("kws".into()),
                        model_version: Some("1".into()),
                        hw: Some("nrf".into()),
                        health: Some(serde_json::json!({"battery_mv": 3300})),
                        summaries: 4,
                        last_seen_ms: Some(10),
                        ..DeviceState::default()
                    }],
                    device_windows: vec![WindowWrite {
                        key: "d1".into(),
                        start_ms: 0,
                        cohort: Some("kws@1/nrf".into()),
                        json: r#"{"inferences": 5}"#.into(),
                    }],
                    cohort_windows: vec![WindowWrite {
                        key: "kws@1/nrf".into(),
                        start_ms: 0,
                        cohort: None,
                        json: r#"{"inferences": 5}"#.into(),
                    }],
                    counters: vec![("accepted".into(), 4)],
                    ota: vec![],
                    changed: vec![],
                };
                store.commit(&batch).unwrap();
            }
            let store = t.open();
            assert_eq!(
                store.replay_window("d1", 2).unwrap(),
                Some(ReplayWindow {
                    boot: 3,
                    max_seq: 9,
                    bitmap: u64::MAX
                })
            );
            let s = store.device_state("d1").unwrap().unwrap();
            assert_eq!(s.summaries, 4);
            assert_eq!(s.health.unwrap()["battery_mv"], 3300);
            assert_eq!(store.counters().unwrap()["accepted"], 4);
            assert_eq!(store.cohort_window_devices("kws@1/nrf", 0).unwrap(), 1);
            assert_eq!(store.cohorts().unwrap(), vec![("kws@1/nrf".into(), 1, 0)]);
            let all = store
                .list_devices(&DeviceQuery {
                    limit: 1,
                    ..DeviceQuery::default()
                })
                .unwrap();
            assert_eq!(all.devices.len(), 1);
            assert_eq!(all.next.as_deref(), Some("d1"));
            let page2 = store
                .list_devices(&DeviceQuery {
                    limit: 1,
                    after: all.next.clone(),
                    ..DeviceQuery::default()
                })
                .unwrap();
            assert_eq!(page2.devices[0].id, "d2");
            assert!(page2.next.is_none());
            let online = |state: &str| {
                store
                    .list_devices(&DeviceQuery {
                        state: Some(state.into()),
                        limit: 10,
                        ..DeviceQuery::default()
                    })
                    .unwrap()
                    .devices
                    .into_iter()
                    .map(|d| d.id)
                    .collect::<Vec<_>>()
            };
            assert_eq!(online("online"), ["d1"]);
            assert_eq!(online("unseen"), ["d2"]);
            let tagged = store
                .list_devices(&DeviceQuery {
                    tag: Some(("site".into(), "north".into())),
                    limit: 10,
                    ..DeviceQuery::default()
                })
                .unwrap();
            assert_eq!(tagged.devices.len(), 1);
            let cohort = store
                .list_devices(&DeviceQuery {
                    cohort: Some("kws@1/nrf".into()),
                    limit: 10,
                    ..DeviceQuery::default()
                })
                .unwrap();
            assert_eq!(cohort.devices[0].cohort.as_deref(), Some("kws@1/nrf"));
            assert_eq!(store.prune_windows(1).unwrap(), 2);
            assert_eq!(store.silent_online_devices(11).unwrap(), ["d1"]);
        }
    }

    #[test]
    fn many_devices_are_read_in_one_go() {
        for t in crate::testing::TestDb::all() {
            let store = t.open();
            for id in ["d1", "d2", "d3"] {
                store.registry().provision(id, BTreeMap::new()).unwrap();
            }
            let w = |id: &str, kind| {
                (
                    id.to_owned(),
                    kind,
                    ReplayWindow {
                        boot: 1,
                        max_seq: u32::from(kind),
                        bitmap: u64::MAX,
                    },
                )
            };
            let state = |id: &str| DeviceState {
                id: id.into(),
                summaries: 3,
                health: Some(serde_json::json!({"battery_mv": 3000})),
                ..DeviceState::default()
            };
            let window = |id: &str, start_ms| WindowWrite {
                key: id.into(),
                start_ms,
                cohort: Some("c".into()),
                json: format!(r#"{{"id":"{id}"}}"#),
            };
            store
                .commit(&Batch {
                    replay: vec![w("d1", 1), w("d1", 2), w("d2", 2)],
                    states: vec![state("d1"), state("d2")],
                    device_windows: vec![window("d1", 0), window("d2", 0), window("d2", 60)],
                    ..Batch::default()
                })
                .unwrap();
            let ids = ["d1", "d2", "d3", "nope"];
            let mut states: Vec<String> = store
                .device_states(&ids)
                .unwrap()
                .into_iter()
                .map(|s| {
                    assert_eq!(s, store.device_state(&s.id).unwrap().unwrap());
                    s.id
                })
                .collect();
            states.sort();
            assert_eq!(states, ["d1", "d2"], "{}", t.name());
            let mut replay = store.replay_windows(&ids).unwrap();
            replay.sort_by_key(|r| (r.0.clone(), r.1));
            assert_eq!(replay, vec![w("d1", 1), w("d1", 2), w("d2", 2)]);
            let mut windows = store.device_windows_at(&ids, 0).unwrap();
            windows.sort_by_key(|w| w.id.clone());
            assert_eq!(windows.len(), 2);
            assert_eq!(windows[1], store.device_window("d2", 0).unwrap().unwrap());
            assert!(store.device_states(&[]).unwrap().is_empty());
        }
    }
}
