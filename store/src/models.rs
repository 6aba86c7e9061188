//! Model versions for OTA (metadata; the artifacts themselves are content-addressed files the
//! OTA service keeps) and the cache of built patches.

use serde::Serialize;

use crate::db::{Dialect, Row, args};

use crate::registry::lock;
use crate::state::Store;
use crate::{Result, StoreError};

/// One registered model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelVersion {
    pub model_id: String,
    pub model_version: String,
    /// Anti-rollback sequence number: strictly increasing per model.
    pub seq: u32,
    /// Target hardware.
    pub hw: String,
    /// Lowest firmware build that runs it (0: any).
    pub min_fw: u32,
    /// Tensor arena it needs, bytes (0: not stated).
    pub arena: u32,
    /// SHA-256 of the artifact (hex).
    pub sha256: String,
    pub size: u64,
    pub created_ms: i64,
    pub created_by: String,
}

/// A built patch between two images (`patch_sha256` is `None` when the patch was not smaller
/// than the image, so the image itself is sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatchRecord {
    pub base_sha256: String,
    pub target_sha256: String,
    pub block_size: u16,
    pub patch_sha256: Option<String>,
    pub size: u64,
}

const COLUMNS: &str =
    "model_id, model_version, seq, hw, min_fw, arena, sha256, size, created_ms, created_by";

fn row(mut r: Row) -> Result<ModelVersion> {
    Ok(ModelVersion {
        model_id: r.text(0)?,
        model_version: r.text(1)?,
        seq: r.int(2)?,
        hw: r.text(3)?,
        min_fw: r.int(4)?,
        arena: r.int(5)?,
        sha256: r.text(6)?,
        size: r.i64(7)? as u64,
        created_ms: r.i64(8)?,
        created_by: r.text(9)?,
    })
}

impl Store {
    /// Registers a model version. Refused (`ModelConflict`) when the version exists or its
    /// `seq` is not above every registered version of the model (anti-rollback). Replicas
    /// registering at once are serialised (SQLite's write lock; PostgreSQL: an advisory lock
    /// for the transaction), so the check and the insert see the same versions.
    pub fn add_model_version(&self, m: &ModelVersion) -> Result<()> {
        lock(self.conn()).transaction(|db| {
            if db.dialect() == Dialect::Postgres {
                db.execute(
                    "SELECT pg_advisory_xact_lock(?1)",
                    args![crate::lock::advisory_key("model_versions")],
                )?;
            }
            let exists = db
                .query_opt(
                    "SELECT 1 FROM model_versions WHERE model_id = ?1 AND model_version = ?2",
                    args![&m.model_id, &m.model_version],
                )?
                .is_some();
            if exists {
                return Err(StoreError::ModelConflict(format!(
                    "{}@{} is already registered",
                    m.model_id, m.model_version
                )));
            }
            let max: Option<u32> = db
                .query_one(
                    "SELECT MAX(seq) FROM model_versions WHERE model_id = ?1",
                    args![&m.model_id],
                )?
                .opt_int(0)?;
            if let Some(max) = max.filter(|max| m.seq <= *max) {
                return Err(StoreError::ModelConflict(format!(
                    "seq {} of {}@{} must be above {max}, the highest registered seq of {}",
                    m.seq, m.model_id, m.model_version, m.model_id
                )));
            }
            db.execute(
                &format!(
                    "INSERT INTO model_versions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                     ?8, ?9, ?10)"
                ),
                args![
                    &m.model_id,
                    &m.model_version,
                    m.seq,
                    &m.hw,
                    m.min_fw,
                    m.arena,
                    &m.sha256,
                    m.size as i64,
                    m.created_ms,
                    &m.created_by
                ],
            )?;
            Ok(())
        })
    }

    /// One model version.
    pub fn model_version(&self, model_id: &str, version: &str) -> Result<Option<ModelVersion>> {
        lock(self.conn())
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM model_versions WHERE model_id = ?1 AND model_version = ?2"
                ),
                args![model_id, version],
            )?
            .map(row)
            .transpose()
    }

    /// The versions of a model, highest seq first.
    pub fn model_versions(&self, model_id: &str) -> Result<Vec<ModelVersion>> {
        lock(self.conn())
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM model_versions WHERE model_id = ?1 ORDER BY seq DESC"
                ),
                args![model_id],
            )?
            .into_iter()
            .map(row)
            .collect()
    }

    /// A registered version whose artifact has this digest (a device's installed image).
    pub fn model_version_by_sha(&self, sha256: &str) -> Result<Option<ModelVersion>> {
        lock(self.conn())
            .query_opt(
                &format!("SELECT {COLUMNS} FROM model_versions WHERE sha256 = ?1 LIMIT 1"),
                args![sha256],
            )?
            .map(row)
            .transpose()
    }

    /// Records a built patch.
    pub fn put_patch(&self, p: &PatchRecord, now_ms: i64) -> Result<()> {
        lock(self.conn()).execute(
            "INSERT INTO patches (base_sha256, target_sha256, block_size, patch_sha256, size, \
             created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (base_sha256, target_sha256, block_size) DO UPDATE SET \
             patch_sha256 = excluded.patch_sha256, size = excluded.size, \
             created_ms = excluded.created_ms",
            args![
                &p.base_sha256,
                &p.target_sha256,
                p.block_size,
                p.patch_sha256.as_deref(),
                p.size as i64,
                now_ms
            ],
        )?;
        Ok(())
    }

    /// A built patch, if cached.
    pub fn patch(&self, base: &str, target: &str, block_size: u16) -> Result<Option<PatchRecord>> {
        lock(self.conn())
            .query_opt(
                "SELECT base_sha256, target_sha256, block_size, patch_sha256, size FROM patches \
                 WHERE base_sha256 = ?1 AND target_sha256 = ?2 AND block_size = ?3",
                args![base, target, block_size],
            )?
            .map(|mut r| {
                Ok(PatchRecord {
                    base_sha256: r.text(0)?,
                    target_sha256: r.text(1)?,
                    block_size: r.int(2)?,
                    patch_sha256: r.opt_text(3)?,
                    size: r.i64(4)? as u64,
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: &str, seq: u32) -> ModelVersion {
        ModelVersion {
            model_id: "kws".into(),
            model_version: v.into(),
            seq,
            hw: "nrf52840".into(),
            min_fw: 0,
            arena: 40_000,
            sha256: format!("{seq:064x}"),
            size: 1000,
            created_ms: 1,
            created_by: "ops".into(),
        }
    }

    #[test]
    fn versions_are_monotonic_and_patches_cached() {
        for t in crate::testing::TestDb::all() {
            let store = t.open();
            store.add_model_version(&version("1.0", 1)).unwrap();
            store.add_model_version(&version("1.1", 5)).unwrap();
            let dup = store.add_model_version(&version("1.1", 6)).unwrap_err();
            assert!(dup.to_string().contains("already registered"), "{dup}");
            let lower = store.add_model_version(&version("0.9", 5)).unwrap_err();
            assert!(lower.to_string().contains("must be above 5"), "{lower}");
            let all = store.model_versions("kws").unwrap();
            assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), [5, 1]);
            assert_eq!(
                store
                    .model_version_by_sha(&format!("{:064x}", 1))
                    .unwrap()
                    .unwrap()
                    .model_version,
                "1.0"
            );
            assert_eq!(store.model_version("kws", "2").unwrap(), None);
            let p = PatchRecord {
                base_sha256: "a".into(),
                target_sha256: "b".into(),
                block_size: 1024,
                patch_sha256: Some("c".into()),
                size: 10,
            };
            store.put_patch(&p, 1).unwrap();
            assert_eq!(store.patch("a", "b", 1024).unwrap(), Some(p));
            assert_eq!(store.patch("a", "b", 512).unwrap(), None);
        }
    }
}
