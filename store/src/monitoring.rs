//! What the monitoring side keeps: monitoring profiles per model version, one record per drift
//! evaluation, and named service-state snapshots (the drift engine's pools and streaks, the
//! alert manager's alerts and silences, the evaluation cursor).
//!
//! Like window aggregates, profiles, evaluations and snapshots are opaque JSON here: the drift
//! and alerts crates own their shapes, the store only keeps them durably.

use serde::Serialize;

use crate::db::{P, Ty, Upsert, args};

use crate::registry::lock;
use crate::state::Store;
use crate::{Result, StoreError};

/// A stored monitoring profile's key and bookkeeping (the profile itself is fetched apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfileInfo {
    pub model_id: String,
    pub model_version: String,
    pub updated_ms: i64,
    pub updated_by: String,
}

/// One device's window as the drift detector reads it: the device's cohort at the time
/// (`model_id@model_version/hw`), its user tags and the aggregate (JSON owned by ingest).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftInput {
    pub id: String,
    pub cohort: String,
    pub tags: std::collections::BTreeMap<String, String>,
    pub agg_json: String,
}

/// A device the presence state says is offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OfflineDevice {
    pub id: String,
    /// `"will"` or `"timeout"`.
    pub reason: Option<String>,
    pub last_seen_ms: i64,
}

/// Splits a cohort key made by [`crate::cohort_key`] into model id, model version and hardware.
/// Unambiguous as long as model ids hold no `@` and hardware names no `/`.
pub fn parse_cohort_key(key: &str) -> Option<(&str, &str, &str)> {
    let (model, rest) = key.split_once('@')?;
    let (version, hw) = rest.rsplit_once('/')?;
    (!model.is_empty() && !version.is_empty() && !hw.is_empty()).then_some((model, version, hw))
}

impl Store {
    /// Stores (or replaces) the profile of a model version.
    pub fn put_profile(
        &self,
        model_id: &str,
        model_version: &str,
        profile_json: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<()> {
        lock(self.conn()).execute(
            "INSERT INTO profiles (model_id, model_version, profile, updated_ms, updated_by) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (model_id, model_version) DO UPDATE SET \
             profile = excluded.profile, updated_ms = excluded.updated_ms, \
             updated_by = excluded.updated_by",
            args![model_id, model_version, profile_json, now_ms, by],
        )?;
        Ok(())
    }

    /// The profile of a model version (JSON), if stored.
    pub fn profile(&self, model_id: &str, model_version: &str) -> Result<Option<String>> {
        lock(self.conn())
            .query_opt(
                "SELECT profile FROM profiles WHERE model_id = ?1 AND model_version = ?2",
                args![model_id, model_version],
            )?
            .map(|mut r| r.text(0))
            .transpose()
    }

    /// Every stored profile's key, ordered by model and version.
    pub fn profile_list(&self) -> Result<Vec<ProfileInfo>> {
        lock(self.conn())
            .query(
                "SELECT model_id, model_version, updated_ms, updated_by FROM profiles \
                 ORDER BY model_id, model_version",
                &[],
            )?
            .into_iter()
            .map(|mut r| {
                Ok(ProfileInfo {
                    model_id: r.text(0)?,
                    model_version: r.text(1)?,
                    updated_ms: r.i64(2)?,
                    updated_by: r.text(3)?,
                })
            })
            .collect()
    }

    /// Every stored profile as `(model_id, model_version, JSON)`.
    pub fn profiles(&self) -> Result<Vec<(String, String, String)>> {
        lock(self.conn())
            .query("SELECT model_id, model_version, profile FROM profiles", &[])?
            .into_iter()
            .map(|mut r| Ok((r.text(0)?, r.text(1)?, r.text(2)?)))
            .collect()
    }

    /// Every device window starting at `start_ms` of a device that is not revoked.
    pub fn drift_inputs(&self, start_ms: i64) -> Result<Vec<DriftInput>> {
        let rows = lock(self.conn()).query(
            "SELECT id, cohort, agg FROM device_windows WHERE start_ms = ?1 ORDER BY id",
            args![start_ms],
        )?;
        let registry = self.registry();
        let mut out = Vec::with_capacity(rows.len());
        for mut r in rows {
            let id = r.text(0)?;
            let Some(record) = registry.get(&id) else {
                continue;
            };
            if record.revoked_ms.is_none() {
                out.push(DriftInput {
                    id,
                    cohort: r.text(1)?,
                    tags: record.tags,
                    agg_json: r.text(2)?,
                });
            }
        }
        Ok(out)
    }

    /// The oldest device window start at or after `since_ms`, if any.
    pub fn first_window_since(&self, since_ms: i64) -> Result<Option<i64>> {
        lock(self.conn())
            .query_one(
                "SELECT MIN(start_ms) FROM device_windows WHERE start_ms >= ?1",
                args![since_ms],
            )?
            .opt_i64(0)
    }

    /// Devices (not revoked) that were seen and are now offline.
    pub fn offline_devices(&self) -> Result<Vec<OfflineDevice>> {
        let rows = lock(self.conn()).query(
            "SELECT id, offline_reason, last_seen_ms FROM device_state \
             WHERE online = 0 AND last_seen_ms IS NOT NULL ORDER BY id",
            &[],
        )?;
        let registry = self.registry();
        let mut out = Vec::with_capacity(rows.len());
        for mut r in rows {
            let d = OfflineDevice {
                id: r.text(0)?,
                reason: r.opt_text(1)?,
                last_seen_ms: r.i64(2)?,
            };
            if registry.get(&d.id).is_some_and(|r| r.revoked_ms.is_none()) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Records one drift evaluation (replacing an earlier one of the same window).
    pub fn put_drift_evaluation(
        &self,
        window_start_ms: i64,
        evaluation_json: &str,
        now_ms: i64,
    ) -> Result<()> {
        lock(self.conn()).execute(
            "INSERT INTO drift_evaluations (window_start_ms, evaluated_ms, evaluation) \
             VALUES (?1, ?2, ?3) ON CONFLICT (window_start_ms) DO UPDATE SET \
             evaluated_ms = excluded.evaluated_ms, evaluation = excluded.evaluation",
            args![window_start_ms, now_ms, evaluation_json],
        )?;
        Ok(())
    }

    /// Drift evaluations of windows starting at or after `since_ms`, newest first.
    pub fn drift_evaluations(&self, since_ms: i64, limit: usize) -> Result<Vec<(i64, String)>> {
        lock(self.conn())
            .query(
                "SELECT window_start_ms, evaluation FROM drift_evaluations \
                 WHERE window_start_ms >= ?1 ORDER BY window_start_ms DESC LIMIT ?2",
                args![since_ms, limit.min(i64::MAX as usize) as i64],
            )?
            .into_iter()
            .map(|mut r| Ok((r.i64(0)?, r.text(1)?)))
            .collect::<Result<_>>()
            .map_err(|e| StoreError::Corrupt {
                table: "drift_evaluations",
                detail: e.to_string(),
            })
    }

    /// Deletes drift evaluations of windows that started before `before_ms`.
    pub fn prune_drift_evaluations(&self, before_ms: i64) -> Result<usize> {
        lock(self.conn()).execute(
            "DELETE FROM drift_evaluations WHERE window_start_ms < ?1",
            args![before_ms],
        )
    }

    /// Stores named service state; several names in one transaction, so snapshots that belong
    /// together (the engine and the cursor past the window it evaluated) move together.
    pub fn put_service_state(&self, entries: &[(&str, &str)], now_ms: i64) -> Result<()> {
        const SERVICE_STATE: Upsert = Upsert {
            table: "service_state",
            columns: &[
                ("name", Ty::Text),
                ("value", Ty::Text),
                ("updated_ms", Ty::Int),
            ],
            key: 1,
            only_if: None,
        };
        let mut v = Vec::with_capacity(entries.len() * 3);
        for (name, value) in entries {
            v.extend([P::from(*name), P::from(*value), P::from(now_ms)]);
        }
        lock(self.conn()).transaction(|db| db.upsert(&SERVICE_STATE, &v))
    }

    /// Named service state, if stored.
    pub fn service_state(&self, name: &str) -> Result<Option<String>> {
        lock(self.conn())
            .query_opt(
                "SELECT value FROM service_state WHERE name = ?1",
                args![name],
            )?
            .map(|mut r| r.text(0))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Batch, DeviceState, Presence, WindowWrite};
    use std::collections::BTreeMap;

    #[test]
    fn cohort_keys_split_back() {
        assert_eq!(
            parse_cohort_key(&crate::cohort_key("kws", "1.2", "nrf52")),
            Some(("kws", "1.2", "nrf52"))
        );
        assert_eq!(parse_cohort_key("unknown"), None);
        assert_eq!(parse_cohort_key("@1/x"), None);
    }

    #[test]
    fn monitoring_records_survive_reopen() {
        for t in crate::testing::TestDb::all() {
            {
                let store = t.open();
                store
                    .put_profile("kws", "1", r#"{"a":1}"#, "ops", 5)
                    .unwrap();
                store
                    .put_profile("kws", "1", r#"{"a":2}"#, "ops", 6)
                    .unwrap();
                store
                    .put_service_state(&[("engine", "{}"), ("cursor", "60000")], 7)
                    .unwrap();
                store.put_drift_evaluation(0, "{}", 8).unwrap();
                store.put_drift_evaluation(60_000, r#"{"w":1}"#, 9).unwrap();
                let reg = store.registry();
                reg.provision("d1", BTreeMap::from([("site".into(), "a".into())]))
                    .unwrap();
                reg.provision("d2", BTreeMap::new()).unwrap();
                reg.provision("d3", BTreeMap::new()).unwrap();
                let window = |id: &str| WindowWrite {
                    key: id.into(),
                    start_ms: 60_000,
                    cohort: Some("kws@1/nrf".into()),
                    json: "{}".into(),
                };
                let offline = |id: &str, online: bool| DeviceState {
                    id: id.into(),
                    presence: Presence {
                        online,
                        offline_reason: (!online).then(|| "will".to_owned()),
                        ..Presence::default()
                    },
                    last_seen_ms: Some(50),
                    ..DeviceState::default()
                };
                store
                    .commit(&Batch {
                        device_windows: vec![window("d1"), window("d2"), window("d3")],
                        states: vec![
                            offline("d1", false),
                            offline("d2", true),
                            offline("d3", false),
                        ],
                        ..Batch::default()
                    })
                    .unwrap();
                reg.revoke("d3").unwrap();
            }
            let store = t.open();
            assert_eq!(
                store.profile("kws", "1").unwrap().as_deref(),
                Some(r#"{"a":2}"#)
            );
            assert_eq!(store.profile("kws", "2").unwrap(), None);
            assert_eq!(store.profile_list().unwrap()[0].updated_ms, 6);
            assert_eq!(store.profiles().unwrap().len(), 1);
            assert_eq!(
                store.service_state("cursor").unwrap().as_deref(),
                Some("60000")
            );
            assert_eq!(store.service_state("nope").unwrap(), None);
            let evals = store.drift_evaluations(0, 10).unwrap();
            assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [60_000, 0]);
            assert_eq!(store.prune_drift_evaluations(60_000).unwrap(), 1);
            let inputs = store.drift_inputs(60_000).unwrap();
            assert_eq!(
                inputs.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
                ["d1", "d2"],
                "revoked devices are not evaluated"
            );
            assert_eq!(inputs[0].tags["site"], "a");
            assert_eq!(store.first_window_since(0).unwrap(), Some(60_000));
            assert_eq!(store.first_window_since(60_001).unwrap(), None);
            let off = store.offline_devices().unwrap();
            assert_eq!(off.len(), 1);
            assert_eq!(off[0].id, "d1");
            assert_eq!(off[0].reason.as_deref(), Some("will"));
        }
    }
}
