//! Mutual exclusion between processes that share one store (several `serve` replicas).
//!
//! Ingest replicas that split one `$share/...` subscription apply their batches one at a time
//! under [`Store::exclusive`], reading each device's state fresh inside it, so a replay seen by
//! one replica is refused by the other and no window aggregate is overwritten by a stale copy.
//! - SQLite: the replicas share the data directory and the lock is an advisory file lock on
//!   `<data dir>/<name>.lock` (released when the guard drops, or when the process dies).
//! - PostgreSQL: a session advisory lock, `pg_advisory_lock(key)` with a 64-bit key derived
//!   from the name, on a connection of its own that the guard holds (the store's connection
//!   stays free for the reads and the commit made under the lock). Dropping the guard unlocks
//!   and keeps the connection as a spare for the next section, so taking the section per batch
//!   costs two round trips, not a connection; if the process dies or the connection breaks,
//!   the server releases the lock with the session.

use std::fs::{File, OpenOptions};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::db::{Db, Pg, PgTarget, args, off_runtime};
use crate::registry::lock;
use crate::{Result, Store, StoreError};

/// The 64-bit advisory lock key of a named section: the first 8 bytes of
/// `SHA-256("tinyfleet/lock/" || name)`. Advisory locks are per database, so stores on
/// different databases of one server never contend.
pub(crate) fn advisory_key(name: &str) -> i64 {
    let digest = Sha256::digest(format!("tinyfleet/lock/{name}").as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(key)
}

/// Spare connections kept for sections (one per section held at once is plenty).
const MAX_SPARE: usize = 4;

/// The connections sections are taken on (PostgreSQL only).
pub(crate) struct LockConnections {
    /// The store's own settings and TLS connector: sections connect as the store does.
    target: PgTarget,
    spare: Mutex<Vec<Pg>>,
}

impl LockConnections {
    pub(crate) fn new(target: PgTarget) -> Self {
        Self {
            target,
            spare: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Result<Box<Pg>> {
        match lock(&self.spare).pop() {
            Some(pg) => Ok(Box::new(pg)),
            None => Pg::connect(&self.target),
        }
    }

    fn give_back(&self, pg: Box<Pg>) {
        let mut spare = lock(&self.spare);
        if spare.len() < MAX_SPARE {
            spare.push(*pg);
        }
    }
}

impl std::fmt::Debug for LockConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockConnections")
            .field("spare", &lock(&self.spare).len())
            .finish_non_exhaustive()
    }
}

enum Held {
    File {
        _file: File,
    },
    Postgres {
        db: Option<Db>,
        key: i64,
        pool: Arc<LockConnections>,
    },
}

/// Held while a process has the named section to itself. Dropping it releases the section.
pub struct ExclusiveGuard {
    held: Held,
}

impl std::fmt::Debug for ExclusiveGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.held {
            Held::File { .. } => "file",
            Held::Postgres { .. } => "postgres",
        };
        f.debug_struct("ExclusiveGuard")
            .field("kind", &kind)
            .finish()
    }
}

impl Drop for ExclusiveGuard {
    fn drop(&mut self) {
        if let Held::Postgres { db, key, pool } = &mut self.held
            && let Some(mut db) = db.take()
        {
            // Unlocked: the connection is a clean spare. Otherwise (broken connection) it is
            // closed, which releases the lock on the server.
            let unlocked = db
                .query_one("SELECT pg_advisory_unlock(?1)", args![*key])
                .and_then(|r| r.bool(0))
                .unwrap_or(false);
            if unlocked && let Db::Postgres(pg) = db {
                pool.give_back(pg);
            }
        }
    }
}

impl Store {
    /// Waits until no other process holds the section `name`, then holds it (blocking: call it
    /// off the async runtime). `name` is a plain word such as `"ingest"`.
    pub fn exclusive(&self, name: &str) -> Result<ExclusiveGuard> {
        match self.lock_connections() {
            Some(pool) => self.exclusive_postgres(name, pool),
            None => self.exclusive_file(name),
        }
    }

    fn exclusive_file(&self, name: &str) -> Result<ExclusiveGuard> {
        let path = self.data_dir().join(format!("{name}.lock"));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        file.lock().map_err(io)?;
        Ok(ExclusiveGuard {
            held: Held::File { _file: file },
        })
    }

    fn exclusive_postgres(
        &self,
        name: &str,
        pool: &Arc<LockConnections>,
    ) -> Result<ExclusiveGuard> {
        let key = advisory_key(name);
        let mut last = None;
        // A spare may have been closed by the server meanwhile: one fresh connection after it.
        for _ in 0..2 {
            let mut db = Db::Postgres(pool.take()?);
            match db.execute("SELECT pg_advisory_lock(?1)", args![key]) {
                Ok(_) => {
                    return Ok(ExclusiveGuard {
                        held: Held::Postgres {
                            db: Some(db),
                            key,
                            pool: pool.clone(),
                        },
                    });
                }
                Err(e) => {
                    off_runtime(move || drop(db));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Postgres("cannot take the section".into())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use crate::testing::TestDb;

    #[test]
    fn a_section_is_held_by_one_holder_at_a_time() {
        for t in TestDb::all() {
            let a = t.open();
            let b = t.open();
            let held = a.exclusive("ingest").unwrap();
            // Another name is another section.
            drop(b.exclusive("other").unwrap());
            let (tx, rx) = mpsc::channel();
            let waiter = std::thread::spawn(move || {
                let _g = b.exclusive("ingest").unwrap();
                tx.send(()).unwrap();
                // Taken again at once after a release (the spare connection is reused).
                drop(_g);
                let _g = b.exclusive("ingest").unwrap();
            });
            // The second holder waits while the first holds the section...
            assert!(
                rx.recv_timeout(Duration::from_millis(300)).is_err(),
                "{}",
                t.name()
            );
            drop(held);
            // ...and gets it once it is released.
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
            waiter.join().unwrap();
        }
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(super::advisory_key("ingest"), super::advisory_key("ingest"));
        assert_ne!(
            super::advisory_key("ingest"),
            super::advisory_key("migrate")
        );
    }
}
