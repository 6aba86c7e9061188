//! Aggregates for the web UI's overview: one grouped scan instead of paging through every
//! device (the UI must work with 100k devices).

use crate::Result;
use crate::registry::lock;
use crate::state::{Store, cohort_key};

impl Store {
    /// Devices counted by presence state (`online`, `offline`, `unseen`, `revoked`, as the
    /// device listing's `state` filter defines them) and current cohort
    /// (`model_id@model_version/hw`, `None` while the device has not said what it runs).
    pub fn fleet_counts(&self) -> Result<Vec<(String, Option<String>, u64)>> {
        lock(self.conn())
            .query(
                "SELECT CASE WHEN d.revoked_ms IS NOT NULL THEN 'revoked' \
                             WHEN s.id IS NULL THEN 'unseen' \
                             WHEN s.online = 1 THEN 'online' ELSE 'offline' END AS st, \
                        s.model_id, s.model_version, s.hw, COUNT(*) \
                 FROM devices d LEFT JOIN device_state s ON s.id = d.id \
                 GROUP BY st, s.model_id, s.model_version, s.hw",
                &[],
            )?
            .into_iter()
            .map(|mut r| {
                let state = r.text(0)?;
                let model_id = r.opt_text(1)?;
                let model_version = r.opt_text(2)?;
                let hw = r.opt_text(3)?;
                let cohort = match (&model_id, &model_version, &hw) {
                    (Some(m), Some(v), Some(h)) => Some(cohort_key(m, v, h)),
                    _ => None,
                };
                Ok((state, cohort, r.i64(4)?.max(0) as u64))
            })
            .collect()
    }
}
