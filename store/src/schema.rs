//! Schema and migrations, for both backends. Each migration runs once, in order, inside its own
//! transaction, and has the same number in both; the DDL is written per dialect (SQLite
//! `INTEGER`/`BLOB` are PostgreSQL `BIGINT`/`BYTEA`; PostgreSQL text keys compare bytewise,
//! `COLLATE "C"`, as SQLite's do, so listings and cursors order alike).
//!
//! - SQLite keeps the version in `PRAGMA user_version`; each migration takes the write lock
//!   first (`BEGIN IMMEDIATE`) and reads the version inside it, so processes opening one file
//!   at once apply each migration once.
//! - PostgreSQL keeps it in the one-row table `schema_version`; each migration's transaction
//!   starts with `pg_advisory_xact_lock`, so replicas starting at once wait for each other and
//!   the later ones find the work done.
//!
//! A database newer than this build is refused ([`StoreError::SchemaTooNew`]) by both.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::db::{Db, args};
use crate::{Result, StoreError};

/// One migration in each dialect.
struct Migration {
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    // 1: registry, presence, replay windows, aggregates, counters.
    Migration {
        sqlite: r#"
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
        postgres: r#"
    CREATE TABLE devices (
        id            TEXT COLLATE "C" PRIMARY KEY,
        salt          BYTEA NOT NULL,
        password_hash BYTEA NOT NULL,
        key_epoch     BIGINT NOT NULL DEFAULT 0,
        tags          TEXT NOT NULL DEFAULT '{}',
        created_ms    BIGINT NOT NULL,
        revoked_ms    BIGINT
    );
    CREATE TABLE device_state (
        id              TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(id),
        online          BIGINT NOT NULL DEFAULT 0,
        offline_reason  TEXT,
        hello_boot      BIGINT,
        hello_seq       BIGINT,
        fw              TEXT,
        model_id        TEXT COLLATE "C",
        model_version   TEXT COLLATE "C",
        model_seq       BIGINT,
        hw              TEXT COLLATE "C",
        caps            BIGINT,
        last_seen_ms    BIGINT,
        health          TEXT,
        health_boot     BIGINT,
        health_seq      BIGINT,
        health_uptime_ms BIGINT,
        summaries       BIGINT NOT NULL DEFAULT 0,
        lost_summaries  BIGINT NOT NULL DEFAULT 0,
        updated_ms      BIGINT NOT NULL
    ) WITH (fillfactor = 70);
    CREATE INDEX device_state_cohort ON device_state(model_id, model_version, hw);
    CREATE TABLE replay (
        id      TEXT COLLATE "C" NOT NULL,
        kind    BIGINT NOT NULL,
        boot    BIGINT NOT NULL,
        max_seq BIGINT NOT NULL,
        bitmap  BIGINT NOT NULL,
        PRIMARY KEY (id, kind)
    ) WITH (fillfactor = 70);
    CREATE TABLE device_windows (
        id        TEXT COLLATE "C" NOT NULL,
        start_ms  BIGINT NOT NULL,
        cohort    TEXT COLLATE "C" NOT NULL,
        agg       TEXT NOT NULL,
        PRIMARY KEY (id, start_ms)
    );
    CREATE INDEX device_windows_cohort ON device_windows(cohort, start_ms);
    CREATE TABLE cohort_windows (
        cohort    TEXT COLLATE "C" NOT NULL,
        start_ms  BIGINT NOT NULL,
        agg       TEXT NOT NULL,
        PRIMARY KEY (cohort, start_ms)
    ) WITH (fillfactor = 70);
    CREATE TABLE counters (
        name  TEXT COLLATE "C" PRIMARY KEY,
        value BIGINT NOT NULL
    ) WITH (fillfactor = 70);
    "#,
    },
    // 2: monitoring: profiles per model version, drift evaluations, service state snapshots.
    Migration {
        sqlite: r#"
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
        postgres: r#"
    CREATE TABLE profiles (
        model_id      TEXT COLLATE "C" NOT NULL,
        model_version TEXT COLLATE "C" NOT NULL,
        profile       TEXT NOT NULL,
        updated_ms    BIGINT NOT NULL,
        updated_by    TEXT NOT NULL,
        PRIMARY KEY (model_id, model_version)
    );
    CREATE TABLE drift_evaluations (
        window_start_ms BIGINT PRIMARY KEY,
        evaluated_ms    BIGINT NOT NULL,
        evaluation      TEXT NOT NULL
    );
    CREATE TABLE service_state (
        name       TEXT COLLATE "C" PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    "#,
    },
    // 3: OTA: model versions (artifacts are content-addressed files) and cached patches.
    Migration {
        sqlite: r#"
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
        postgres: r#"
    CREATE TABLE model_versions (
        model_id      TEXT COLLATE "C" NOT NULL,
        model_version TEXT COLLATE "C" NOT NULL,
        seq           BIGINT NOT NULL,
        hw            TEXT NOT NULL,
        min_fw        BIGINT NOT NULL,
        arena         BIGINT NOT NULL,
        sha256        TEXT COLLATE "C" NOT NULL,
        size          BIGINT NOT NULL,
        created_ms    BIGINT NOT NULL,
        created_by    TEXT NOT NULL,
        PRIMARY KEY (model_id, model_version),
        UNIQUE (model_id, seq)
    );
    CREATE INDEX model_versions_sha ON model_versions(sha256);
    CREATE TABLE patches (
        base_sha256   TEXT COLLATE "C" NOT NULL,
        target_sha256 TEXT COLLATE "C" NOT NULL,
        block_size    BIGINT NOT NULL,
        patch_sha256  TEXT,
        size          BIGINT NOT NULL,
        created_ms    BIGINT NOT NULL,
        PRIMARY KEY (base_sha256, target_sha256, block_size)
    );
    "#,
    },
    // 4: rollouts (the engine's state as JSON, one row per rollout, and its audit log) and
    // each device's newest OTA progress report. (PostgreSQL: `rowid` keeps the insertion
    // order SQLite's implicit rowid gives.)
    Migration {
        sqlite: r#"
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
        postgres: r#"
    CREATE TABLE rollouts (
        id         TEXT COLLATE "C" PRIMARY KEY,
        model_id   TEXT COLLATE "C" NOT NULL,
        state      TEXT NOT NULL,
        body       TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        rowid      BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE TABLE rollout_audit (
        id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        rollout TEXT COLLATE "C" NOT NULL,
        at_ms   BIGINT NOT NULL,
        body    TEXT NOT NULL
    );
    CREATE INDEX rollout_audit_rollout ON rollout_audit(rollout, id);
    CREATE TABLE device_ota (
        id           TEXT COLLATE "C" PRIMARY KEY,
        boot         BIGINT NOT NULL,
        seq          BIGINT NOT NULL,
        manifest_seq BIGINT NOT NULL,
        state        BIGINT NOT NULL,
        bytes        BIGINT NOT NULL,
        error        BIGINT NOT NULL,
        received_ms  BIGINT NOT NULL
    ) WITH (fillfactor = 70);
    "#,
    },
    // 5: the registry's change counter: every provisioning or revocation takes the next
    // `registry_version` (a row lock, held to the commit, so numbers become visible in order)
    // and stamps the device row with it; replicas re-read rows above the number they have seen
    // (`Registry::refresh`).
    Migration {
        sqlite: r#"
    ALTER TABLE devices ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX devices_changed ON devices(changed);
    CREATE TABLE registry_version (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO registry_version (id, version) VALUES (1, 0);
    "#,
        postgres: r#"
    ALTER TABLE devices ADD COLUMN changed BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX devices_changed ON devices(changed);
    CREATE TABLE registry_version (
        id      BIGINT PRIMARY KEY CHECK (id = 1),
        version BIGINT NOT NULL
    );
    INSERT INTO registry_version (id, version) VALUES (1, 0);
    "#,
    },
    // 6: the change feed the rollouts follow (`Store::device_changes`): one row per device and
    // kind (1: its OTA progress report, 2: its presence or hello), stamped by each ingest
    // commit that changes it with a number of its own from `device_change_version` (a row
    // lock, held to the commit, so numbers become visible in order, as in migration 5).
    Migration {
        sqlite: r#"
    CREATE TABLE device_changes (
        id      TEXT NOT NULL,
        kind    INTEGER NOT NULL,
        changed INTEGER NOT NULL,
        PRIMARY KEY (id, kind)
    );
    CREATE INDEX device_changes_changed ON device_changes(changed);
    CREATE TABLE device_change_version (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO device_change_version (id, version) VALUES (1, 0);
    "#,
        postgres: r#"
    CREATE TABLE device_changes (
        id      TEXT COLLATE "C" NOT NULL,
        kind    BIGINT NOT NULL,
        changed BIGINT NOT NULL,
        PRIMARY KEY (id, kind)
    ) WITH (fillfactor = 70);
    CREATE INDEX device_changes_changed ON device_changes(changed);
    CREATE TABLE device_change_version (
        id      BIGINT PRIMARY KEY CHECK (id = 1),
        version BIGINT NOT NULL
    );
    INSERT INTO device_change_version (id, version) VALUES (1, 0);
    "#,
    },
];

/// The newest schema version this build knows.
#[cfg(test)]
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

fn negative(version: i64) -> StoreError {
    StoreError::Corrupt {
        table: "schema version",
        detail: format!("{version} is not a version"),
    }
}

/// Brings an SQLite database to the newest schema.
pub(crate) fn migrate_sqlite(conn: &mut Connection, path: &Path) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > known {
            return Err(StoreError::SchemaTooNew {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        let Some(m) = usize::try_from(version).ok().map(|v| MIGRATIONS.get(v)) else {
            return Err(negative(version));
        };
        let Some(m) = m else {
            return Ok(());
        };
        tx.execute_batch(m.sqlite)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

/// Brings a PostgreSQL database to the newest schema (see the module's documentation).
pub(crate) fn migrate_postgres(db: &mut Db, path: &Path) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let key = crate::lock::advisory_key("migrate");
    loop {
        let done = db.transaction(|db| {
            db.execute("SELECT pg_advisory_xact_lock(?1)", args![key])?;
            let exists = db
                .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
                .bool(0)?;
            if !exists {
                db.batch_execute(
                    "CREATE TABLE schema_version (id BIGINT PRIMARY KEY CHECK (id = 1), \
                     version BIGINT NOT NULL); \
                     INSERT INTO schema_version (id, version) VALUES (1, 0);",
                )?;
            }
            let version = db
                .query_one("SELECT version FROM schema_version WHERE id = 1", &[])?
                .i64(0)?;
            if version > known {
                return Err(StoreError::SchemaTooNew {
                    path: path.to_owned(),
                    found: version,
                    known,
                });
            }
            let Some(m) = usize::try_from(version).ok().map(|v| MIGRATIONS.get(v)) else {
                return Err(negative(version));
            };
            let Some(m) = m else {
                return Ok(true);
            };
            db.batch_execute(m.postgres)?;
            db.execute(
                "UPDATE schema_version SET version = ?1 WHERE id = 1",
                args![version + 1],
            )?;
            Ok(false)
        })?;
        if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;

    /// A database made by the build before the registry's change counter (schema 4), with a
    /// device in it, is upgraded in place and keeps working: the device, refreshes, new ones.
    #[test]
    fn a_schema_4_database_is_upgraded_in_place() {
        for t in TestDb::all() {
            let device = "INSERT INTO devices (id, salt, password_hash, key_epoch, tags, \
                          created_ms) VALUES ('old', ?1, ?2, 0, '{\"site\":\"a\"}', 5)";
            match t.raw_postgres() {
                Some(mut pg) => {
                    pg.batch_execute(
                        "CREATE TABLE schema_version (id BIGINT PRIMARY KEY CHECK (id = 1), \
                         version BIGINT NOT NULL); \
                         INSERT INTO schema_version VALUES (1, 4);",
                    )
                    .unwrap();
                    for m in &MIGRATIONS[..4] {
                        pg.batch_execute(m.postgres).unwrap();
                    }
                    pg.execute(
                        &device.replace("?1", "$1").replace("?2", "$2"),
                        &[&vec![0u8; 16], &vec![0u8; 32]],
                    )
                    .unwrap();
                }
                None => {
                    let conn = Connection::open(t.dir().join("tinyfleet.db")).unwrap();
                    for m in &MIGRATIONS[..4] {
                        conn.execute_batch(m.sqlite).unwrap();
                    }
                    conn.pragma_update(None, "user_version", 4).unwrap();
                    conn.execute(device, rusqlite::params![[0u8; 16], [0u8; 32]])
                        .unwrap();
                }
            }
            let store = t.open();
            let reg = store.registry();
            assert_eq!(reg.get("old").unwrap().tags["site"], "a", "{}", t.name());
            assert_eq!(reg.refresh().unwrap(), 0);
            reg.provision("new", Default::default()).unwrap();
            let other = t.open();
            reg.revoke("old").unwrap();
            assert_eq!(other.registry().refresh().unwrap(), 1);
            assert!(other.registry().get("old").unwrap().revoked_ms.is_some());
        }
    }
}
