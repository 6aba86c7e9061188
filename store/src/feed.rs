//! The change feed the rollouts follow: which devices' OTA progress, presence or hello changed,
//! in commit order, whichever process committed them.
//!
//! Every ingest commit ([`Store::commit`]) that carries progress reports ([`Batch::ota`]) or
//! presence and hello changes ([`Batch::changed`]) stamps one row per device and kind in
//! `device_changes` with a number of its own, taken from the one-row counter
//! `device_change_version` inside the commit's transaction. The counter's row stays locked until
//! the commit ends (SQLite: the write lock of the whole file), so the numbers become visible in
//! order: a reader that sees number `n` sees every number below it, and a cursor (the highest
//! number read) never skips a change committed concurrently by another replica. This is the
//! registry's pattern (`Registry::refresh`, migration 5).
//!
//! A row says "this device's current report (or state) is newer than number `n`", not what
//! changed: a later change moves the row to a new number, and a reader that had not read it yet
//! reads the current state once. So the feed is bounded by the fleet (two rows per device) and
//! needs no pruning; readers must take what they read as idempotent updates (the rollouts do:
//! reports are ordered by the device's `(boot, seq)`, devices are read again from the store).
//!
//! [`Batch::ota`]: crate::Batch::ota
//! [`Batch::changed`]: crate::Batch::changed

use std::collections::BTreeSet;

use serde::Serialize;

use crate::db::{Db, P, Ty, Upsert, args};
use crate::registry::lock;
use crate::state::{DeviceOta, Store};
use crate::{Result, StoreError};

/// A change of a device's newest OTA progress report (`device_ota`).
const KIND_PROGRESS: i64 = 1;
/// A change of a device's presence or hello (`device_state`).
const KIND_DEVICE: i64 = 2;

/// Rows read at most per call of [`Store::device_changes`].
pub const MAX_CHANGES_PAGE: u32 = 10_000;

const DEVICE_CHANGES: Upsert = Upsert {
    table: "device_changes",
    columns: &[("id", Ty::Text), ("kind", Ty::Int), ("changed", Ty::Int)],
    key: 2,
    only_if: None,
};

/// One page of the change feed ([`Store::device_changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceChanges {
    /// The newest progress report of each device whose report changed, in feed order.
    pub progress: Vec<DeviceOta>,
    /// The devices whose presence or hello changed, in feed order.
    pub devices: Vec<String>,
    /// The highest change number read (the `after` given when nothing was): pass it as `after`
    /// for the next page.
    pub cursor: i64,
    /// The page was full: more changes may follow at once.
    pub more: bool,
}

/// Stamps the devices of one commit in the feed (inside the commit's transaction): `progress`
/// devices got a progress report, `changed` devices a presence or hello change. Takes the
/// numbers last, so the counter's row is locked for as short a time as the transaction allows.
pub(crate) fn record<'a>(
    db: &mut Db,
    progress: impl IntoIterator<Item = &'a str>,
    changed: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let rows: BTreeSet<(i64, &str)> = progress
        .into_iter()
        .map(|id| (KIND_PROGRESS, id))
        .chain(changed.into_iter().map(|id| (KIND_DEVICE, id)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len() as i64;
    let top = db
        .query_one(
            "UPDATE device_change_version SET version = version + ?1 WHERE id = 1 \
             RETURNING version",
            args![n],
        )?
        .i64(0)?;
    let mut v: Vec<P<'_>> = Vec::with_capacity(rows.len() * 3);
    for (i, (kind, id)) in rows.into_iter().enumerate() {
        v.extend([P::from(id), P::Int(kind), P::Int(top - n + 1 + i as i64)]);
    }
    db.upsert(&DEVICE_CHANGES, &v)
}

impl Store {
    /// The changes committed after number `after` (0: from the start), oldest first, at most
    /// `limit` rows (clamped to 1..=[`MAX_CHANGES_PAGE`]): the devices' newest progress reports
    /// and the devices whose presence or hello changed. Pass the returned
    /// [`DeviceChanges::cursor`] as `after` next time; a change committed later, here or by
    /// another process, always gets a number above it.
    pub fn device_changes(&self, after: i64, limit: u32) -> Result<DeviceChanges> {
        let limit = limit.clamp(1, MAX_CHANGES_PAGE);
        let rows = lock(self.conn()).query(
            "SELECT c.changed, c.kind, c.id, o.boot, o.seq, o.manifest_seq, o.state, o.bytes, \
             o.error, o.received_ms FROM device_changes c \
             LEFT JOIN device_ota o ON c.kind = ?3 AND o.id = c.id \
             WHERE c.changed > ?1 ORDER BY c.changed LIMIT ?2",
            args![after, limit, KIND_PROGRESS],
        )?;
        let mut out = DeviceChanges {
            cursor: after,
            more: rows.len() >= limit as usize,
            ..DeviceChanges::default()
        };
        for mut r in rows {
            out.cursor = out.cursor.max(r.i64(0)?);
            let kind = r.i64(1)?;
            let id = r.text(2)?;
            match kind {
                KIND_PROGRESS => {
                    // A report older than the stored one is not written (`device_ota` keeps
                    // the newest), but the row is always there once a device reported.
                    let Some(boot) = r.opt_int::<u32>(3)? else {
                        continue;
                    };
                    out.progress.push(DeviceOta {
                        boot,
                        seq: r.int(4)?,
                        manifest_seq: r.int(5)?,
                        state: r.int(6)?,
                        bytes: r.int(7)?,
                        error: r.int(8)?,
                        received_ms: r.i64(9)?,
                        id,
                    });
                }
                KIND_DEVICE => out.devices.push(id),
                other => {
                    return Err(StoreError::Corrupt {
                        table: "device_changes",
                        detail: format!("{id}: unknown kind {other}"),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The newest change number committed so far (0 before the first). Only the tests need it:
    /// the rollouts keep their cursor and start from 0.
    #[cfg(test)]
    pub(crate) fn device_change_head(&self) -> Result<i64> {
        lock(self.conn())
            .query_one(
                "SELECT version FROM device_change_version WHERE id = 1",
                &[],
            )?
            .i64(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;
    use crate::{Batch, DeviceState};

    fn report(id: &str, seq: u32, state: u8) -> DeviceOta {
        DeviceOta {
            id: id.into(),
            boot: 1,
            seq,
            manifest_seq: 2,
            state,
            bytes: seq * 10,
            error: 0,
            received_ms: i64::from(seq),
        }
    }

    fn batch(ota: Vec<DeviceOta>, changed: &[&str]) -> Batch {
        Batch {
            // The device rows the feed's readers look up exist, as after a real ingest batch.
            states: changed
                .iter()
                .map(|id| DeviceState {
                    id: (*id).into(),
                    ..DeviceState::default()
                })
                .collect(),
            ota,
            changed: changed.iter().map(|id| (*id).to_owned()).collect(),
            ..Batch::default()
        }
    }

    fn provision(store: &Store, ids: &[&str]) {
        for id in ids {
            store.registry().provision(id, Default::default()).unwrap();
        }
    }

    /// Changes come back in commit order, paged, each device once per kind with its current
    /// report; a device changed again moves to the end; readers on another connection (a
    /// replica) see the same; the head is the newest number.
    #[test]
    fn changes_are_read_in_commit_order_and_paged() {
        for t in TestDb::all() {
            let store = t.open();
            provision(&store, &["d1", "d2", "d3"]);
            assert_eq!(store.device_change_head().unwrap(), 0);
            assert_eq!(
                store.device_changes(0, 10).unwrap(),
                DeviceChanges::default()
            );
            // A batch without progress or presence changes takes no number.
            store
                .commit(&Batch {
                    counters: vec![("accepted".into(), 1)],
                    ..Batch::default()
                })
                .unwrap();
            assert_eq!(store.device_change_head().unwrap(), 0);

            store
                .commit(&batch(vec![report("d1", 1, 1)], &["d2"]))
                .unwrap();
            store
                .commit(&batch(vec![report("d1", 2, 2)], &["d1"]))
                .unwrap();
            store.commit(&batch(vec![], &["d3"])).unwrap();
            // d1's first report was overtaken by its second: rows d2 (2), d1 progress (3),
            // d1 device (4), d3 (5).
            assert_eq!(store.device_change_head().unwrap(), 5, "{}", t.name());
            let page = store.device_changes(0, 2).unwrap();
            assert_eq!(
                page,
                DeviceChanges {
                    progress: vec![report("d1", 2, 2)],
                    devices: vec!["d2".into()],
                    cursor: 3,
                    more: true,
                },
                "{}",
                t.name()
            );
            let page = t.open().device_changes(page.cursor, 2).unwrap();
            assert_eq!(page.devices, ["d1", "d3"]);
            assert!(page.progress.is_empty());
            assert_eq!(page.cursor, 5);
            let last = store.device_changes(page.cursor, 2).unwrap();
            assert_eq!(
                last,
                DeviceChanges {
                    cursor: 5,
                    ..DeviceChanges::default()
                }
            );

            // A report older than the stored one is not stored, and the feed shows the stored
            // (newest) one: re-reading it is harmless.
            store.commit(&batch(vec![report("d1", 1, 6)], &[])).unwrap();
            let page = store.device_changes(5, 10).unwrap();
            assert_eq!(page.progress, vec![report("d1", 2, 2)]);
            assert_eq!(page.cursor, 6);
            // Limits are clamped.
            assert_eq!(store.device_changes(0, 0).unwrap().cursor, 2);
            assert_eq!(store.device_changes(0, u32::MAX).unwrap().cursor, 6);
        }
    }

    /// Replicas committing at once (no exclusive section) and a reader paging through the feed
    /// meanwhile: the reader never skips a change, because a number becomes visible only after
    /// every number below it.
    #[test]
    fn a_reader_misses_no_change_of_concurrent_committers() {
        const PER_WRITER: usize = 60;
        for t in TestDb::all() {
            let store = t.open();
            let ids: Vec<Vec<String>> = (0..2)
                .map(|w| (0..PER_WRITER).map(|i| format!("w{w}-{i:03}")).collect())
                .collect();
            for id in ids.iter().flatten() {
                store.registry().provision(id, Default::default()).unwrap();
            }
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writers: Vec<_> = ids
                .iter()
                .map(|ids| {
                    let (store, ids) = (t.open(), ids.clone());
                    std::thread::spawn(move || {
                        for (i, id) in ids.iter().enumerate() {
                            let b = if i % 2 == 0 {
                                batch(vec![report(id, 1, 1)], &[])
                            } else {
                                batch(vec![], &[id])
                            };
                            store.commit(&b).unwrap();
                        }
                    })
                })
                .collect();
            let reader = {
                let (store, done) = (t.open(), done.clone());
                std::thread::spawn(move || {
                    let mut seen = BTreeSet::new();
                    let mut cursor = 0;
                    loop {
                        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                        let page = store.device_changes(cursor, 7).unwrap();
                        assert!(page.cursor >= cursor);
                        cursor = page.cursor;
                        seen.extend(page.progress.into_iter().map(|o| o.id));
                        seen.extend(page.devices);
                        if finished && !page.more {
                            return seen;
                        }
                    }
                })
            };
            for w in writers {
                w.join().unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            let seen = reader.join().unwrap();
            let all: BTreeSet<String> = ids.into_iter().flatten().collect();
            assert_eq!(seen, all, "{}", t.name());
            assert_eq!(
                store.device_change_head().unwrap(),
                2 * PER_WRITER as i64,
                "{}",
                t.name()
            );
        }
    }
}
