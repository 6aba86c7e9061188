//! Model versions for OTA (metadata; the artifacts themselves are content-addressed files the
//! OTA service keeps) and the cache of built patches.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

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

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModelVersion> {
    Ok(ModelVersion {
        model_id: r.get(0)?,
        model_version: r.get(1)?,
        seq: r.get(2)?,
        hw: r.get(3)?,
        min_fw: r.get(4)?,
        arena: r.get(5)?,
        sha256: r.get(6)?,
        size: r.get::<_, i64>(7)? as u64,
        created_ms: r.get(8)?,
        created_by: r.get(9)?,
    })
}

impl Store {
    /// Registers a model version. Refused (`ModelConflict`) when the version exists or its
    /// `seq` is not above every registered version of the model (anti-rollback).
    pub fn add_model_version(&self, m: &ModelVersion) -> Result<()> {
        let mut conn = lock(self.conn());
        let tx = conn.transaction()?;
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM model_versions WHERE model_id = ?1 AND model_version = ?2",
                params![m.model_id, m.model_version],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if exists {
            return Err(StoreError::ModelConflict(format!(
                "{}@{} is already registered",
                m.model_id, m.model_version
            )));
        }
        let max: Option<u32> = tx.query_row(
            "SELECT MAX(seq) FROM model_versions WHERE model_id = ?1",
            [&m.model_id],
            |r| r.get(0),
        )?;
        if let Some(max) = max.filter(|max| m.seq <= *max) {
            return Err(StoreError::ModelConflict(format!(
                "seq {} of {}@{} must be above {max}, the highest registered seq of {}",
                m.seq, m.model_id, m.model_version, m.model_id
            )));
        }
        tx.execute(
            &format!("INSERT INTO model_versions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
            params![
                m.model_id,
                m.model_version,
                m.seq,
                m.hw,
                m.min_fw,
                m.arena,
                m.sha256,
                m.size as i64,
                m.created_ms,
                m.created_by
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// One model version.
    pub fn model_version(&self, model_id: &str, version: &str) -> Result<Option<ModelVersion>> {
        Ok(lock(self.conn())
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM model_versions WHERE model_id = ?1 AND model_version = ?2"
                ),
                params![model_id, version],
                row,
            )
            .optional()?)
    }

    /// The versions of a model, highest seq first.
    pub fn model_versions(&self, model_id: &str) -> Result<Vec<ModelVersion>> {
        let conn = lock(self.conn());
        let mut st = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM model_versions WHERE model_id = ?1 ORDER BY seq DESC"
        ))?;
        let rows = st.query_map([model_id], row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A registered version whose artifact has this digest (a device's installed image).
    pub fn model_version_by_sha(&self, sha256: &str) -> Result<Option<ModelVersion>> {
        Ok(lock(self.conn())
            .query_row(
                &format!("SELECT {COLUMNS} FROM model_versions WHERE sha256 = ?1 LIMIT 1"),
                [sha256],
                row,
            )
            .optional()?)
    }

    /// Records a built patch.
    pub fn put_patch(&self, p: &PatchRecord, now_ms: i64) -> Result<()> {
        lock(self.conn()).execute(
            "INSERT OR REPLACE INTO patches (base_sha256, target_sha256, block_size, \
             patch_sha256, size, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                p.base_sha256,
                p.target_sha256,
                p.block_size,
                p.patch_sha256,
                p.size as i64,
                now_ms
            ],
        )?;
        Ok(())
    }

    /// A built patch, if cached.
    pub fn patch(&self, base: &str, target: &str, block_size: u16) -> Result<Option<PatchRecord>> {
        Ok(lock(self.conn())
            .query_row(
                "SELECT base_sha256, target_sha256, block_size, patch_sha256, size FROM patches \
                 WHERE base_sha256 = ?1 AND target_sha256 = ?2 AND block_size = ?3",
                params![base, target, block_size],
                |r| {
                    Ok(PatchRecord {
                        base_sha256: r.get(0)?,
                        target_sha256: r.get(1)?,
                        block_size: r.get(2)?,
                        patch_sha256: r.get(3)?,
                        size: r.get::<_, i64>(4)? as u64,
                    })
                },
            )
            .optional()?)
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
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
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
