//! Staged rollouts: one row per rollout holding the engine's state as opaque JSON (the OTA
//! service owns its shape), and the rollout's append-only audit log.
//!
//! The state and the audit records of one engine step are written in one transaction
//! ([`Store::save_rollout`]), so after a crash the log never shows a step the state does not
//! reflect, or the other way round.

use serde::Serialize;

use crate::Result;
use crate::db::{Row, args};
use crate::registry::lock;
use crate::state::Store;

/// One stored rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRow {
    pub id: String,
    pub model_id: String,
    /// The rollout's state name (`running`, `paused`, ...), for queries without the body.
    pub state: String,
    /// The engine's whole state, JSON.
    pub body: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

fn row(mut r: Row) -> Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.text(0)?,
        model_id: r.text(1)?,
        state: r.text(2)?,
        body: r.text(3)?,
        created_ms: r.i64(4)?,
        updated_ms: r.i64(5)?,
    })
}

const COLUMNS: &str = "id, model_id, state, body, created_ms, updated_ms";

impl Store {
    /// Inserts or updates a rollout and appends its audit records (`(at_ms, json)`, in order),
    /// in one transaction. An update keeps the row's `created_ms` and its place in
    /// [`Store::rollouts`]'s order.
    pub fn save_rollout(&self, r: &RolloutRow, audit: &[(i64, String)]) -> Result<()> {
        lock(self.conn()).transaction(|db| {
            db.execute(
                &format!(
                    "INSERT INTO rollouts ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (id) DO UPDATE SET model_id = excluded.model_id, \
                     state = excluded.state, body = excluded.body, \
                     updated_ms = excluded.updated_ms"
                ),
                args![
                    &r.id,
                    &r.model_id,
                    &r.state,
                    &r.body,
                    r.created_ms,
                    r.updated_ms
                ],
            )?;
            for (at_ms, body) in audit {
                db.execute(
                    "INSERT INTO rollout_audit (rollout, at_ms, body) VALUES (?1, ?2, ?3)",
                    args![&r.id, *at_ms, body],
                )?;
            }
            Ok(())
        })
    }

    /// Every rollout, newest first (by creation).
    pub fn rollouts(&self) -> Result<Vec<RolloutRow>> {
        lock(self.conn())
            .query(
                &format!("SELECT {COLUMNS} FROM rollouts ORDER BY created_ms DESC, rowid DESC"),
                &[],
            )?
            .into_iter()
            .map(row)
            .collect()
    }

    /// One rollout.
    pub fn rollout(&self, id: &str) -> Result<Option<RolloutRow>> {
        lock(self.conn())
            .query_opt(
                &format!("SELECT {COLUMNS} FROM rollouts WHERE id = ?1"),
                args![id],
            )?
            .map(row)
            .transpose()
    }

    /// A rollout's audit records with an id above `after`, oldest first, at most `limit`
    /// (clamped to 1..=1000): `(audit id, json)`. Pass the last id as `after` for the next page.
    pub fn rollout_audit(&self, id: &str, after: i64, limit: u32) -> Result<Vec<(i64, String)>> {
        lock(self.conn())
            .query(
                "SELECT id, body FROM rollout_audit WHERE rollout = ?1 AND id > ?2 ORDER BY id \
                 LIMIT ?3",
                args![id, after, limit.clamp(1, 1000)],
            )?
            .into_iter()
            .map(|mut r| Ok((r.i64(0)?, r.text(1)?)))
            .collect()
    }

    /// Deletes a named service-state entry (see [`Store::put_service_state`]); returns whether
    /// it existed.
    pub fn delete_service_state(&self, name: &str) -> Result<bool> {
        Ok(
            lock(self.conn()).execute("DELETE FROM service_state WHERE name = ?1", args![name])?
                > 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, state: &str, created_ms: i64, updated_ms: i64) -> RolloutRow {
        RolloutRow {
            id: id.into(),
            model_id: "kws".into(),
            state: state.into(),
            body: format!(r#"{{"id":"{id}","state":"{state}"}}"#),
            created_ms,
            updated_ms,
        }
    }

    #[test]
    fn rollouts_and_their_audit_survive_reopen() {
        for t in crate::testing::TestDb::all() {
            {
                let store = t.open();
                store
                    .save_rollout(
                        &r("a", "running", 10, 10),
                        &[(10, "created".into()), (10, "stage".into())],
                    )
                    .unwrap();
                store.save_rollout(&r("b", "running", 20, 20), &[]).unwrap();
                // Same creation time as b, created after it: still newer.
                store
                    .save_rollout(&r("c", "running", 20, 20), &[(20, "c1".into())])
                    .unwrap();
                // An update keeps created_ms and the order, and appends.
                let mut a = r("a", "paused", 99, 30);
                a.body = "{}".into();
                store.save_rollout(&a, &[(30, "paused".into())]).unwrap();
            }
            let store = t.open();
            let all = store.rollouts().unwrap();
            assert_eq!(
                all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                ["c", "b", "a"]
            );
            let a = store.rollout("a").unwrap().unwrap();
            assert_eq!(
                (
                    a.state.as_str(),
                    a.body.as_str(),
                    a.created_ms,
                    a.updated_ms
                ),
                ("paused", "{}", 10, 30)
            );
            assert_eq!(store.rollout("zz").unwrap(), None);
            let log = store.rollout_audit("a", 0, 100).unwrap();
            assert_eq!(
                log.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(),
                ["created", "stage", "paused"]
            );
            // Paging by id, per rollout.
            let page = store.rollout_audit("a", log[0].0, 1).unwrap();
            assert_eq!(page, vec![log[1].clone()]);
            assert!(store.rollout_audit("a", log[2].0, 10).unwrap().is_empty());
            assert_eq!(store.rollout_audit("c", 0, 10).unwrap().len(), 1);
            assert!(store.rollout_audit("b", 0, 10).unwrap().is_empty());
        }
    }

    #[test]
    fn a_failed_save_writes_neither_state_nor_audit() {
        for t in crate::testing::TestDb::all() {
            let store = t.open();
            store
                .save_rollout(&r("a", "running", 1, 1), &[(1, "x".into())])
                .unwrap();
            // Make the audit insert fail after the row's upsert ran, inside the transaction.
            let trigger = if t.is_postgres() {
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'refused'; END $$; \
                 CREATE TRIGGER no_audit BEFORE INSERT ON rollout_audit \
                 FOR EACH ROW EXECUTE FUNCTION refuse();"
            } else {
                "CREATE TRIGGER no_audit BEFORE INSERT ON rollout_audit \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;"
            };
            lock(store.conn()).batch_execute(trigger).unwrap();
            let err = store.save_rollout(&r("a", "paused", 1, 2), &[(2, "y".into())]);
            assert!(err.is_err());
            assert_eq!(store.rollout("a").unwrap().unwrap().state, "running");
            assert_eq!(store.rollout_audit("a", 0, 10).unwrap().len(), 1);
        }
    }

    #[test]
    fn service_state_entries_can_be_deleted() {
        for t in crate::testing::TestDb::all() {
            let store = t.open();
            store.put_service_state(&[("policy/kws", "{}")], 1).unwrap();
            assert!(store.delete_service_state("policy/kws").unwrap());
            assert!(!store.delete_service_state("policy/kws").unwrap());
            assert_eq!(store.service_state("policy/kws").unwrap(), None);
        }
    }
}
