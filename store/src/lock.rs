//! Mutual exclusion between processes that share one store (several `serve` replicas).
//!
//! Ingest replicas that split one `$share/...` subscription apply their batches one at a time
//! under [`Store::exclusive`], reading each device's state fresh inside it, so a replay seen by
//! one replica is refused by the other and no window aggregate is overwritten by a stale copy.
//! With SQLite the replicas share the data directory and the lock is an advisory file lock on
//! `<data dir>/<name>.lock` (released when the guard drops, or when the process dies).

use std::fs::{File, OpenOptions};

use crate::{Result, Store, StoreError};

/// Held while a process has the named section to itself. Dropping it releases the section.
#[derive(Debug)]
pub struct ExclusiveGuard {
    _file: File,
}

impl Store {
    /// Waits until no other process holds the section `name`, then holds it (blocking: call it
    /// off the async runtime). `name` is a plain word such as `"ingest"`.
    pub fn exclusive(&self, name: &str) -> Result<ExclusiveGuard> {
        let dir = self
            .path()
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."));
        let path = dir.join(format!("{name}.lock"));
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
        Ok(ExclusiveGuard { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_section_is_held_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let a = crate::Store::open(dir.path()).unwrap();
        let b = crate::Store::open(dir.path()).unwrap();
        let held = a.exclusive("ingest").unwrap();
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _g = b.exclusive("ingest").unwrap();
            tx.send(()).unwrap();
        });
        // The second holder waits while the first holds the section...
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(held);
        // ...and gets it once it is released.
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
    }
}
