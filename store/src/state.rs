//! Fleet state: presence, latest health, replay windows, windowed aggregates and counters.
//!
//! Writes arrive as one [`Batch`] per ingest commit and land in one transaction. Aggregates are
//! opaque JSON to the store: ingest owns their shape, the API passes them through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

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
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.replay.is_empty()
            && self.states.is_empty()
            && self.device_windows.is_empty()
            && self.cohort_windows.is_empty()
            && self.counters.is_empty()
            && self.ota.is_empty()
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
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    registry: Registry,
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

impl Store {
    /// Opens (creating if needed) `<data_dir>/tinyfleet.db` and the master key beside it.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join("tinyfleet.db");
        let mut conn = Connection::open(&path)?;
        // WAL with full sync: a commit that returned is on disk, and readers do not block the
        // ingest writer.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        crate::schema::migrate(&mut conn, &path)?;
        let conn = Arc::new(Mutex::new(conn));
        let registry = Registry::open(conn.clone(), data_dir)?;
        Ok(Self {
            conn,
            path,
            registry,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn conn(&self) -> &Mutex<Connection> {
        &self.conn
    }

    /// Writes a batch in one transaction.
    pub fn commit(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO replay (id, kind, boot, max_seq, bitmap) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (id, kind) DO UPDATE SET boot = ?3, max_seq = ?4, bitmap = ?5",
            )?;
            for (id, kind, w) in &batch.replay {
                st.execute(params![id, kind, w.boot, w.max_seq, w.bitmap as i64])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO device_state (id, online, offline_reason, hello_boot, \
                 hello_seq, fw, model_id, model_version, model_seq, hw, caps, last_seen_ms, \
                 health, health_boot, health_seq, health_uptime_ms, summaries, lost_summaries, \
                 updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, \
                 ?14, ?15, ?16, ?17, ?18, ?19)",
            )?;
            for s in &batch.states {
                st.execute(params![
                    s.id,
                    s.presence.online,
                    s.presence.offline_reason,
                    s.presence.hello_boot,
                    s.presence.hello_seq,
                    s.fw,
                    s.model_id,
                    s.model_version,
                    s.model_seq,
                    s.hw,
                    s.caps,
                    s.last_seen_ms,
                    s.health.as_ref().map(|h| h.to_string()),
                    s.health_boot,
                    s.health_seq,
                    s.health_uptime_ms.map(|v| v as i64),
                    s.summaries as i64,
                    s.lost_summaries as i64,
                    s.updated_ms,
                ])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO device_windows (id, start_ms, cohort, agg) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for w in &batch.device_windows {
                st.execute(params![
                    w.key,
                    w.start_ms,
                    w.cohort.as_deref().unwrap_or(""),
                    w.json
                ])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO cohort_windows (cohort, start_ms, agg) VALUES (?1, ?2, ?3)",
            )?;
            for w in &batch.cohort_windows {
                st.execute(params![w.key, w.start_ms, w.json])?;
            }
            let mut st =
                tx.prepare_cached("INSERT OR REPLACE INTO counters (name, value) VALUES (?1, ?2)")?;
            for (name, value) in &batch.counters {
                st.execute(params![name, value])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT INTO device_ota (id, boot, seq, manifest_seq, state, bytes, error, \
                 received_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO UPDATE \
                 SET boot = ?2, seq = ?3, manifest_seq = ?4, state = ?5, bytes = ?6, error = ?7, \
                 received_ms = ?8 WHERE (?2, ?3) > (device_ota.boot, device_ota.seq)",
            )?;
            for o in &batch.ota {
                st.execute(params![
                    o.id,
                    o.boot,
                    o.seq,
                    o.manifest_seq,
                    o.state,
                    o.bytes,
                    o.error,
                    o.received_ms
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A device's newest OTA progress report.
    pub fn device_ota(&self, id: &str) -> Result<Option<DeviceOta>> {
        Ok(lock(&self.conn)
            .query_row(
                "SELECT id, boot, seq, manifest_seq, state, bytes, error, received_ms \
                 FROM device_ota WHERE id = ?1",
                params![id],
                |r| {
                    Ok(DeviceOta {
                        id: r.get(0)?,
                        boot: r.get(1)?,
                        seq: r.get(2)?,
                        manifest_seq: r.get(3)?,
                        state: r.get(4)?,
                        bytes: r.get(5)?,
                        error: r.get(6)?,
                        received_ms: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn replay_window(&self, id: &str, kind: u8) -> Result<Option<ReplayWindow>> {
        Ok(lock(&self.conn)
            .query_row(
                "SELECT boot, max_seq, bitmap FROM replay WHERE id = ?1 AND kind = ?2",
                params![id, kind],
                |r| {
                    Ok(ReplayWindow {
                        boot: r.get(0)?,
                        max_seq: r.get(1)?,
                        bitmap: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()?)
    }

    pub fn device_state(&self, id: &str) -> Result<Option<DeviceState>> {
        let conn = lock(&self.conn);
        let row = conn
            .query_row(
                "SELECT id, online, offline_reason, hello_boot, hello_seq, fw, model_id, \
                 model_version, model_seq, hw, caps, last_seen_ms, health, health_boot, \
                 health_seq, health_uptime_ms, summaries, lost_summaries, updated_ms \
                 FROM device_state WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        DeviceState {
                            id: r.get(0)?,
                            presence: Presence {
                                online: r.get(1)?,
                                offline_reason: r.get(2)?,
                                hello_boot: opt_u32(r.get(3)?),
                                hello_seq: opt_u32(r.get(4)?),
                            },
                            fw: r.get(5)?,
                            model_id: r.get(6)?,
                            model_version: r.get(7)?,
                            model_seq: opt_u32(r.get(8)?),
                            hw: r.get(9)?,
                            caps: opt_u32(r.get(10)?),
                            last_seen_ms: r.get(11)?,
                            health: None,
                            health_boot: opt_u32(r.get(13)?),
                            health_seq: opt_u32(r.get(14)?),
                            health_uptime_ms: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
                            summaries: r.get::<_, i64>(16)? as u64,
                            lost_summaries: r.get::<_, i64>(17)? as u64,
                            updated_ms: r.get(18)?,
                        },
                        r.get::<_, Option<String>>(12)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(mut s, health)| {
            s.health = health
                .map(|h| serde_json::from_str(&h))
                .transpose()
                .map_err(|e| StoreError::Corrupt {
                    table: "device_state",
                    detail: e.to_string(),
                })?;
            Ok(s)
        })
        .transpose()
    }

    fn json_rows(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        table: &'static str,
    ) -> Result<Vec<(String, i64, String, String)>> {
        let conn = lock(&self.conn);
        let mut st = conn.prepare_cached(sql)?;
        let rows = st.query_map(params, |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?))
        })?;
        let out: rusqlite::Result<Vec<_>> = rows.collect();
        out.map_err(|e| StoreError::Corrupt {
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
            params![id, since_ms, limit as i64],
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
            params![cohort, since_ms, limit as i64],
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
        let conn = lock(&self.conn);
        let mut st = conn.prepare_cached(
            "SELECT cohort, COUNT(*), MAX(start_ms) FROM cohort_windows GROUP BY cohort ORDER BY cohort",
        )?;
        let rows = st.query_map([], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Distinct devices that reported in a cohort window.
    pub fn cohort_window_devices(&self, cohort: &str, start_ms: i64) -> Result<u64> {
        Ok(lock(&self.conn).query_row(
            "SELECT COUNT(*) FROM device_windows WHERE cohort = ?1 AND start_ms = ?2",
            params![cohort, start_ms],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    pub fn counters(&self) -> Result<BTreeMap<String, i64>> {
        let conn = lock(&self.conn);
        let mut st = conn.prepare_cached("SELECT name, value FROM counters")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Lists devices with filters and cursor paging, ordered by id.
    pub fn list_devices(&self, q: &DeviceQuery) -> Result<DevicePage> {
        let mut sql = String::from(
            "SELECT d.id, d.tags, d.revoked_ms, s.online, s.model_id, s.model_version, s.hw, s.fw, \
             s.last_seen_ms, s.lost_summaries FROM devices d LEFT JOIN device_state s ON s.id = d.id \
             WHERE d.id > ?1",
        );
        let mut args: Vec<rusqlite::types::Value> =
            vec![q.after.clone().unwrap_or_default().into()];
        if let Some(cohort) = &q.cohort {
            args.push(cohort.clone().into());
            sql.push_str(&format!(
                " AND s.model_id || '@' || s.model_version || '/' || s.hw = ?{}",
                args.len()
            ));
        }
        if let Some((k, v)) = &q.tag {
            args.push(format!("$.\"{}\"", k.replace('"', "")).into());
            args.push(v.clone().into());
            sql.push_str(&format!(
                " AND json_extract(d.tags, ?{}) = ?{}",
                args.len() - 1,
                args.len()
            ));
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
        args.push(((limit + 1) as i64).into());
        sql.push_str(&format!(" ORDER BY d.id LIMIT ?{}", args.len()));
        let conn = lock(&self.conn);
        let mut st = conn.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            let model_id: Option<String> = r.get(4)?;
            let model_version: Option<String> = r.get(5)?;
            let hw: Option<String> = r.get(6)?;
            let cohort = match (&model_id, &model_version, &hw) {
                (Some(m), Some(v), Some(h)) => Some(cohort_key(m, v, h)),
                _ => None,
            };
            Ok(DeviceListItem {
                id: r.get(0)?,
                tags: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                revoked: r.get::<_, Option<i64>>(2)?.is_some(),
                online: r.get::<_, Option<bool>>(3)?.unwrap_or(false),
                cohort,
                fw: r.get(7)?,
                last_seen_ms: r.get(8)?,
                lost_summaries: r.get::<_, Option<i64>>(9)?.unwrap_or(0) as u64,
            })
        })?;
        let mut devices: Vec<DeviceListItem> = rows.collect::<rusqlite::Result<_>>()?;
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
        let conn = lock(&self.conn);
        let a = conn.execute(
            "DELETE FROM device_windows WHERE start_ms < ?1",
            [before_ms],
        )?;
        let b = conn.execute(
            "DELETE FROM cohort_windows WHERE start_ms < ?1",
            [before_ms],
        )?;
        Ok(a + b)
    }

    /// Ids of active devices whose state says online but that were last seen before
    /// `before_ms` (candidates for the inactivity timer).
    pub fn silent_online_devices(&self, before_ms: i64) -> Result<Vec<String>> {
        let conn = lock(&self.conn);
        let mut st = conn
            .prepare_cached("SELECT id FROM device_state WHERE online = 1 AND last_seen_ms < ?1")?;
        let rows = st.query_map([before_ms], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn ota_progress_keeps_the_newest_report_by_boot_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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

    #[test]
    fn batches_commit_and_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
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
            };
            store.commit(&batch).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
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
