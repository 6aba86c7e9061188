//! Backups of the state database: a consistent snapshot taken while `serve` keeps writing, and
//! the checks a restore makes before it trusts one.
//!
//! A snapshot is `VACUUM INTO`: it reads the database inside one read transaction (in WAL mode
//! the writer carries on meanwhile) and writes a compact copy holding every transaction
//! committed before it started and nothing of any later one. The copy is a plain SQLite file
//! (rollback journal; `serve` switches it back to WAL when it opens it), created with mode 0600
//! because it holds password hashes, and fsync'd before this returns.
//!
//! The files around the database (master key, signing key, artifacts, journal) are the
//! binary's business (`src/backup.rs`); only this crate speaks SQL.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::registry::lock;
use crate::{Result, Store, StoreError};

/// What a check of a database file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseInfo {
    /// `PRAGMA user_version`: the last schema migration applied.
    pub schema_version: i64,
    /// Registered devices, revoked ones included.
    pub devices: u64,
    /// SHA-256 digests (hex) of the artifacts the database refers to: model version images
    /// and cached patches. Each must be a file `artifacts/<digest>` next to the database.
    pub artifacts: Vec<String>,
}

impl Store {
    /// Writes a consistent snapshot of this store's database to `path`, a new file (an
    /// existing empty file is used as is): every transaction committed before the call, none
    /// after. It runs on the store's own connection, so this process's other store calls wait
    /// until it is done; another process backing up a running server uses [`snapshot`], which
    /// does not stop the server's writes.
    pub fn backup_into(&self, path: &Path) -> Result<()> {
        let mut db = lock(self.conn());
        let Some(conn) = db.as_sqlite() else {
            return Err(StoreError::Postgres(
                "a store on PostgreSQL is backed up with the server's tools (pg_dump)".into(),
            ));
        };
        let out = prepare_output(path)?;
        vacuum_into(conn, &out)
    }
}

/// [`Store::backup_into`] for the database file `db` of a data directory, from its own
/// connection: the server using it (if any) keeps writing while the snapshot is read.
///
/// The database is opened read-only while a server may be using it (its `-wal` file exists),
/// so the backup never writes the live database; otherwise it is opened normally so that no
/// `-wal`/`-shm` files are left behind, owned by whoever ran the backup.
pub fn snapshot(db: &Path, out: &Path) -> Result<()> {
    let out = prepare_output(out)?;
    let conn = open_existing(db)?;
    vacuum_into(&conn, &out)
}

/// Checks a database file (a backup's): `PRAGMA integrity_check`, its schema version, the
/// devices it registers and the artifacts it refers to. Opens it read-only.
pub fn check(db: &Path) -> Result<DatabaseInfo> {
    let conn = open_read_only(db)?;
    let problems: Vec<String> = conn
        .prepare("PRAGMA integrity_check")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if problems != ["ok"] {
        return Err(StoreError::Corrupt {
            table: "integrity_check",
            detail: format!(
                "{} fails PRAGMA integrity_check: {}",
                db.display(),
                problems.into_iter().take(5).collect::<Vec<_>>().join("; ")
            ),
        });
    }
    let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let has_table = |name: &str| -> Result<bool> {
        Ok(conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )? > 0)
    };
    if !has_table("devices")? {
        return Err(StoreError::Corrupt {
            table: "devices",
            detail: format!(
                "{} is not a tinyfleet database (no devices table)",
                db.display()
            ),
        });
    }
    let devices: i64 = conn.query_row("SELECT count(*) FROM devices", [], |r| r.get(0))?;
    let mut artifacts = Vec::new();
    if has_table("model_versions")? {
        let mut st = conn.prepare("SELECT DISTINCT sha256 FROM model_versions")?;
        for sha in st.query_map([], |r| r.get::<_, String>(0))? {
            artifacts.push(sha?);
        }
    }
    if has_table("patches")? {
        let mut st = conn
            .prepare("SELECT DISTINCT patch_sha256 FROM patches WHERE patch_sha256 IS NOT NULL")?;
        for sha in st.query_map([], |r| r.get::<_, String>(0))? {
            artifacts.push(sha?);
        }
    }
    artifacts.sort();
    artifacts.dedup();
    Ok(DatabaseInfo {
        schema_version,
        devices: u64::try_from(devices).unwrap_or(0),
        artifacts,
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `path` empty with mode 0600 (or takes an existing empty file) and returns it as an
/// absolute path, which `VACUUM INTO` cannot mistake for a URI.
fn prepare_output(path: &Path) -> Result<PathBuf> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    if len != 0 {
        return Err(StoreError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the backup file exists and is not empty",
            ),
        });
    }
    std::path::absolute(path).map_err(io_error(path))
}

/// `VACUUM INTO out`, then fsync of the copy.
fn vacuum_into(conn: &Connection, out: &Path) -> Result<()> {
    let name = out.to_str().ok_or_else(|| StoreError::Io {
        path: out.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the backup path must be valid UTF-8",
        ),
    })?;
    conn.execute("VACUUM INTO ?1", [name])?;
    std::fs::File::open(out)
        .and_then(|f| f.sync_all())
        .map_err(io_error(out))
}

fn missing(db: &Path) -> StoreError {
    StoreError::Io {
        path: db.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no database here (is this a tinyfleet data directory?)",
        ),
    }
}

/// Opens an existing database for a snapshot (never creating one): read-only while its `-wal`
/// file exists (a server is using it, or stopped uncleanly), read-write otherwise so that
/// closing removes the `-wal`/`-shm` files SQLite creates.
fn open_existing(db: &Path) -> Result<Connection> {
    if !db.is_file() {
        return Err(missing(db));
    }
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    if Path::new(&wal).exists() {
        return open_read_only(db);
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    match Connection::open_with_flags(db, flags) {
        Ok(conn) => {
            conn.busy_timeout(std::time::Duration::from_secs(30))?;
            Ok(conn)
        }
        // A read-only file or mount: read-only it is.
        Err(_) => open_read_only(db),
    }
}

fn open_read_only(db: &Path) -> Result<Connection> {
    if !db.is_file() {
        return Err(missing(db));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn snapshots_hold_what_was_committed_and_check_clean() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = Store::open(&data).unwrap();
        store
            .registry()
            .provision("dev-1", Default::default())
            .unwrap();
        // In-process, through the store's connection.
        let a = dir.path().join("a.db");
        store.backup_into(&a).unwrap();
        // From another connection while the store stays open (the server case).
        let b = dir.path().join("b.db");
        snapshot(&data.join("tinyfleet.db"), &b).unwrap();
        for copy in [&a, &b] {
            let info = check(copy).unwrap();
            assert_eq!(info.devices, 1);
            assert!(info.schema_version >= 4, "{info:?}");
            assert!(info.artifacts.is_empty());
            #[cfg(unix)]
            assert_eq!(mode(copy), 0o600);
        }
        // A backup never overwrites.
        let err = store.backup_into(&a).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        // The copy opens as a store, with the device.
        drop(store);
        let restored = dir.path().join("restored");
        std::fs::create_dir(&restored).unwrap();
        std::fs::copy(&b, restored.join("tinyfleet.db")).unwrap();
        std::fs::copy(data.join("master.key"), restored.join("master.key")).unwrap();
        let store = Store::open(&restored).unwrap();
        assert!(store.registry().get("dev-1").is_some());
    }

    #[test]
    fn a_stopped_store_leaves_no_wal_files_behind() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        drop(Store::open(&data).unwrap());
        let db = data.join("tinyfleet.db");
        snapshot(&db, &dir.path().join("copy.db")).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["master.key", "tinyfleet.db"]);
    }

    #[test]
    fn missing_and_corrupt_databases_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = snapshot(&dir.path().join("none.db"), &dir.path().join("out.db"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no database here"), "{err}");
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"this is not a database, just some bytes").unwrap();
        assert!(check(&junk).is_err());
    }
}
