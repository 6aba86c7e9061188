//! Schema and migrations. Each migration runs once, in order, inside a transaction; the version
//! lives in `PRAGMA user_version`.

use rusqlite::Connection;

use crate::{Result, StoreError};

const MIGRATIONS: &[&str] = &[
    // 1: registry, presence, replay windows, aggregates, counters.
    r#"
    CREATE TABLE devices (
        id            TEXT PRIMARY KEY,
        salt          BLOB NOT NULL,
        password_hash BLOB NOT NULL,
        key_epoch     INTEGER NOT NULL DEFAULT 0,
        tags          TEXT NOT NULL DEFAULT '{}',
        created_ms    INTEGER NOT NULL,
        revoked_ms    INTEGER
    );
    CREATE TABLE device_state (
        id              TEXT PRIMARY KEY REFERENCES devices(id),
        online          INTEGER NOT NULL DEFAULT 0,
        offline_reason  TEXT,
        hello_boot      INTEGER,
        hello_seq       INTEGER,
        fw              TEXT,
        model_id        TEXT,
        model_version   TEXT,
        model_seq       INTEGER,
        hw              TEXT,
        caps            INTEGER,
        last_seen_ms    INTEGER,
        health          TEXT,
        health_boot     INTEGER,
        health_seq      INTEGER,
        health_uptime_ms INTEGER,
        summaries       INTEGER NOT NULL DEFAULT 0,
        lost_summaries  INTEGER NOT NULL DEFAULT 0,
        updated_ms      INTEGER NOT NULL
    );
    CREATE INDEX device_state_cohort ON device_state(model_id, model_version, hw);
    CREATE TABLE replay (
        id      TEXT NOT NULL,
        kind    INTEGER NOT NULL,
        boot    INTEGER NOT NULL,
        max_seq INTEGER NOT NULL,
        bitmap  INTEGER NOT NULL,
        PRIMARY KEY (id, kind)
    );
    CREATE TABLE device_windows (
        id        TEXT NOT NULL,
        start_ms  INTEGER NOT NULL,
        cohort    TEXT NOT NULL,
        agg       TEXT NOT NULL,
        PRIMARY KEY (id, start_ms)
    );
    CREATE INDEX device_windows_cohort ON device_windows(cohort, start_ms);
    CREATE TABLE cohort_windows (
        cohort    TEXT NOT NULL,
        start_ms  INTEGER NOT NULL,
        agg       TEXT NOT NULL,
        PRIMARY KEY (cohort, start_ms)
    );
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    "#,
    // 2: monitoring: profiles per model version, drift evaluations, service state snapshots.
    r#"
    CREATE TABLE profiles (
        model_id      TEXT NOT NULL,
        model_version TEXT NOT NULL,
        profile       TEXT NOT NULL,
        updated_ms    INTEGER NOT NULL,
        updated_by    TEXT NOT NULL,
        PRIMARY KEY (model_id, model_version)
    );
    CREATE TABLE drift_evaluations (
        window_start_ms INTEGER PRIMARY KEY,
        evaluated_ms    INTEGER NOT NULL,
        evaluation      TEXT NOT NULL
    );
    CREATE TABLE service_state (
        name       TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    "#,
    // 3: OTA: model versions (artifacts are content-addressed files) and cached patches.
    r#"
    CREATE TABLE model_versions (
        model_id      TEXT NOT NULL,
        model_version TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        hw            TEXT NOT NULL,
        min_fw        INTEGER NOT NULL,
        arena         INTEGER NOT NULL,
        sha256        TEXT NOT NULL,
        size          INTEGER NOT NULL,
        created_ms    INTEGER NOT NULL,
        created_by    TEXT NOT NULL,
        PRIMARY KEY (model_id, model_version),
        UNIQUE (model_id, seq)
    );
    CREATE INDEX model_versions_sha ON model_versions(sha256);
    CREATE TABLE patches (
        base_sha256   TEXT NOT NULL,
        target_sha256 TEXT NOT NULL,
        block_size    INTEGER NOT NULL,
        patch_sha256  TEXT,
        size          INTEGER NOT NULL,
        created_ms    INTEGER NOT NULL,
        PRIMARY KEY (base_sha256, target_sha256, block_size)
    );
    "#,
    // 4: rollouts (the engine's state as JSON, one row per rollout, and its audit log) and
    // each device's newest OTA progress report.
    r#"
    CREATE TABLE rollouts (
        id         TEXT PRIMARY KEY,
        model_id   TEXT NOT NULL,
        state      TEXT NOT NULL,
        body       TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE rollout_audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        rollout TEXT NOT NULL,
        at_ms   INTEGER NOT NULL,
        body    TEXT NOT NULL
    );
    CREATE INDEX rollout_audit_rollout ON rollout_audit(rollout, id);
    CREATE TABLE device_ota (
        id           TEXT PRIMARY KEY,
        boot         INTEGER NOT NULL,
        seq          INTEGER NOT NULL,
        manifest_seq INTEGER NOT NULL,
        state        INTEGER NOT NULL,
        bytes        INTEGER NOT NULL,
        error        INTEGER NOT NULL,
        received_ms  INTEGER NOT NULL
    );
    "#,
];

/// Brings the database to the newest schema.
pub fn migrate(conn: &mut Connection, path: &std::path::Path) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
