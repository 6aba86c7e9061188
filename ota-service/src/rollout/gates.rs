//! Gate verdicts: install health from device counts, and the combination of install and
//! quality into one verdict per evaluation ([`GateReport`]).

use serde::{Deserialize, Serialize};

use super::plan::InstallGate;
use super::quality::QualityReport;
use super::stats::{self, Interval};
use super::track::{InstallState, Track};

/// The verdict of a check, a gate or an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Shown within the limit.
    Pass,
    /// Shown beyond the limit: abort and roll back.
    Fail,
    /// Enough sample, but the interval straddles the limit: hold.
    Inconclusive,
    /// Below the minimum sample: decides nothing (holds).
    Insufficient,
    /// Nothing to measure (no labels at all, say).
    NoData,
}

/// Judges a harm interval (larger is worse) against a limit: fail when even its low end is
/// above, pass when its high end is within, inconclusive otherwise.
pub fn judge(harm: &Interval, limit: f64) -> Verdict {
    if harm.low > limit {
        Verdict::Fail
    } else if harm.high <= limit {
        Verdict::Pass
    } else {
        Verdict::Inconclusive
    }
}

/// Device counts of a set of offered devices (a stage, the rollout, the rollback). Every
/// offered device is in exactly one of the columns after `offered`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallCounts {
    /// In the target (for a stage: whose bucket falls in it).
    pub targeted: u64,
    pub offered: u64,
    /// Offered, no report yet (or refused as busy, waiting for the offer again).
    pub pending: u64,
    /// Accepted or downloading.
    pub downloading: u64,
    /// Verified in the inactive slot, or switching to it.
    pub installed: u64,
    pub confirmed: u64,
    pub failed: u64,
    pub rejected: u64,
    pub reverted: u64,
    pub timed_out: u64,
    /// Of the pending: not online once since the offer (they get it when they return).
    pub unreached: u64,
}

impl InstallCounts {
    /// Counts one offered device.
    pub fn add(&mut self, t: &Track) {
        self.offered += 1;
        if !t.reached {
            self.unreached += 1;
        }
        let col = if t.timed_out {
            &mut self.timed_out
        } else if t.busy() {
            &mut self.pending
        } else {
            match t.state {
                InstallState::Offered => &mut self.pending,
                InstallState::Accepted | InstallState::Downloading => &mut self.downloading,
                InstallState::Verified | InstallState::Switching => &mut self.installed,
                InstallState::Confirmed => &mut self.confirmed,
                InstallState::Failed => &mut self.failed,
                InstallState::Rejected => &mut self.rejected,
                InstallState::Reverted => &mut self.reverted,
            }
        };
        *col += 1;
    }

    /// Devices done: confirmed, failed, rejected, reverted or timed out.
    pub fn done(&self) -> u64 {
        self.confirmed + self.failed + self.rejected + self.reverted + self.timed_out
    }
}

/// One install rate against its limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateCheck {
    pub bad: u64,
    pub done: u64,
    /// Observed rate with its Wilson bounds.
    pub rate: Option<Interval>,
    pub limit: f64,
    pub verdict: Verdict,
}

impl RateCheck {
    fn new(bad: u64, done: u64, limit: f64, gate: &InstallGate) -> Self {
        let rate = stats::wilson(bad, done, stats::normal_quantile(gate.confidence));
        let verdict = match &rate {
            _ if done < u64::from(gate.min_done) => Verdict::Insufficient,
            None => Verdict::Insufficient,
            Some(r) if r.low > limit => Verdict::Fail,
            Some(r) if r.estimate <= limit => Verdict::Pass,
            Some(_) => Verdict::Inconclusive,
        };
        Self {
            bad,
            done,
            rate,
            limit,
            verdict,
        }
    }
}

/// Install health of one set of devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstallEval {
    pub counts: InstallCounts,
    /// Failed plus rejected.
    pub failure: RateCheck,
    pub revert: RateCheck,
    pub timeout: RateCheck,
    pub verdict: Verdict,
}

impl InstallEval {
    pub fn new(counts: InstallCounts, gate: &InstallGate) -> Self {
        let done = counts.done();
        let failure = RateCheck::new(
            counts.failed + counts.rejected,
            done,
            gate.max_failure_rate,
            gate,
        );
        let revert = RateCheck::new(counts.reverted, done, gate.max_revert_rate, gate);
        let timeout = RateCheck::new(counts.timed_out, done, gate.max_timeout_rate, gate);
        let verdicts = [failure.verdict, revert.verdict, timeout.verdict];
        let verdict = [Verdict::Fail, Verdict::Inconclusive, Verdict::Insufficient]
            .into_iter()
            .find(|v| verdicts.contains(v))
            .unwrap_or(Verdict::Pass);
        Self {
            counts,
            failure,
            revert,
            timeout,
            verdict,
        }
    }

    fn failing(&self) -> Vec<&'static str> {
        [
            ("failure", &self.failure),
            ("revert", &self.revert),
            ("timeout", &self.timeout),
        ]
        .into_iter()
        .filter(|(_, c)| c.verdict == Verdict::Fail)
        .map(|(n, _)| n)
        .collect()
    }
}

/// The install-health gate at one evaluation.
///
/// `cumulative` covers every device offered in stages opened so far, `stage` the current
/// stage's devices alone (so a problem of the newest wave is not diluted by the earlier
/// ones). The gate fails when either fails, and passes when `cumulative` passes, `stage` is
/// not inconclusive and at least `min_stage_done_share` of the stage's offered devices are
/// done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstallReport {
    pub cumulative: InstallEval,
    pub stage: InstallEval,
    /// Done over offered in the current stage (1 when it has no device).
    pub stage_done_share: f64,
    pub verdict: Verdict,
    pub reason: String,
}

impl InstallReport {
    pub fn new(cumulative: InstallCounts, stage: InstallCounts, gate: &InstallGate) -> Self {
        let cumulative = InstallEval::new(cumulative, gate);
        let stage = InstallEval::new(stage, gate);
        let share = if stage.counts.offered == 0 {
            1.0
        } else {
            stage.counts.done() as f64 / stage.counts.offered as f64
        };
        let (verdict, reason) = if cumulative.verdict == Verdict::Fail {
            let rates = cumulative.failing().join(", ");
            (
                Verdict::Fail,
                format!("{rates} rate above its limit over the rollout"),
            )
        } else if stage.verdict == Verdict::Fail {
            let rates = stage.failing().join(", ");
            (
                Verdict::Fail,
                format!("{rates} rate above its limit in this stage"),
            )
        } else if cumulative.verdict == Verdict::Insufficient {
            (
                Verdict::Insufficient,
                format!(
                    "{} of at least {} devices done",
                    cumulative.counts.done(),
                    gate.min_done
                ),
            )
        } else if cumulative.verdict == Verdict::Inconclusive
            || stage.verdict == Verdict::Inconclusive
        {
            (
                Verdict::Inconclusive,
                "an observed rate is above its limit, not yet beyond doubt".to_owned(),
            )
        } else if share < gate.min_stage_done_share {
            (
                Verdict::Insufficient,
                format!(
                    "{} of {} devices of this stage done (need {:.0} %)",
                    stage.counts.done(),
                    stage.counts.offered,
                    gate.min_stage_done_share * 100.0
                ),
            )
        } else {
            (Verdict::Pass, String::new())
        };
        Self {
            cumulative,
            stage,
            stage_done_share: share,
            verdict,
            reason,
        }
    }
}

/// Which gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    Install,
    Quality,
}

/// Both gates at one evaluation; attached to every automatic transition in the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub at_ms: i64,
    /// The stage evaluated (0-based).
    pub stage: u32,
    pub install: InstallReport,
    pub quality: QualityReport,
    /// Fail when either gate fails, pass when both pass, otherwise the hold's reason.
    pub verdict: Verdict,
    /// The failing gate, when failing.
    pub failed_gate: Option<Gate>,
    pub reason: String,
}

impl GateReport {
    pub fn new(at_ms: i64, stage: u32, install: InstallReport, quality: QualityReport) -> Self {
        let (verdict, failed_gate, reason) = match (install.verdict, quality.verdict) {
            (Verdict::Fail, _) => (
                Verdict::Fail,
                Some(Gate::Install),
                format!("install: {}", install.reason),
            ),
            (_, Verdict::Fail) => (
                Verdict::Fail,
                Some(Gate::Quality),
                format!("quality: {}", quality.reason),
            ),
            (Verdict::Pass, Verdict::Pass) => (Verdict::Pass, None, String::new()),
            (i, q) => {
                let mut parts = Vec::new();
                if i != Verdict::Pass {
                    parts.push(format!("install: {}", install.reason));
                }
                if q != Verdict::Pass {
                    parts.push(format!("quality: {}", quality.reason));
                }
                let v = if i == Verdict::Inconclusive || q == Verdict::Inconclusive {
                    Verdict::Inconclusive
                } else {
                    Verdict::Insufficient
                };
                (v, None, parts.join("; "))
            }
        };
        Self {
            at_ms,
            stage,
            install,
            quality,
            verdict,
            failed_gate,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(confirmed: u64, failed: u64, reverted: u64, timed_out: u64) -> InstallCounts {
        InstallCounts {
            targeted: confirmed + failed + reverted + timed_out,
            offered: confirmed + failed + reverted + timed_out,
            confirmed,
            failed,
            reverted,
            timed_out,
            ..InstallCounts::default()
        }
    }

    #[test]
    fn three_done_decide_nothing_ten_do() {
        let g = InstallGate::default();
        // 1 failure of 3 (33 %) is not a decision.
        let e = InstallEval::new(counts(2, 1, 0, 0), &g);
        assert_eq!(e.verdict, Verdict::Insufficient);
        // 3 of 10 (30 %): the lower bound is above 5 %.
        let e = InstallEval::new(counts(7, 3, 0, 0), &g);
        assert_eq!(e.verdict, Verdict::Fail);
        assert!(e.failure.rate.is_some_and(|r| r.low > 0.05));
        // 1 of 10: above the limit, not beyond doubt.
        let e = InstallEval::new(counts(9, 1, 0, 0), &g);
        assert_eq!(e.verdict, Verdict::Inconclusive);
        // 0 of 10 passes; so does 1 of 20 (5 %, at the limit).
        assert_eq!(
            InstallEval::new(counts(10, 0, 0, 0), &g).verdict,
            Verdict::Pass
        );
        assert_eq!(
            InstallEval::new(counts(19, 1, 0, 0), &g).verdict,
            Verdict::Pass
        );
        // Timeouts and reverts have their own limits.
        assert_eq!(
            InstallEval::new(counts(6, 0, 0, 4), &g).verdict,
            Verdict::Fail
        );
        assert_eq!(
            InstallEval::new(counts(15, 0, 5, 0), &g).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn stage_share_and_stage_failures_count() {
        let g = InstallGate::default();
        let mut stage = counts(3, 0, 0, 0);
        stage.offered = 10;
        stage.pending = 7;
        let r = InstallReport::new(counts(30, 0, 0, 0), stage.clone(), &g);
        assert_eq!(r.verdict, Verdict::Insufficient, "{}", r.reason);
        stage.pending = 4;
        stage.confirmed = 6;
        let r = InstallReport::new(counts(30, 0, 0, 0), stage, &g);
        assert_eq!(r.verdict, Verdict::Pass);
        // A failing newest stage fails even when diluted over the rollout.
        let r = InstallReport::new(counts(90, 4, 0, 0), counts(6, 4, 0, 0), &g);
        assert_eq!(
            InstallEval::new(counts(90, 4, 0, 0), &g).verdict,
            Verdict::Pass
        );
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r.reason.contains("in this stage"), "{}", r.reason);
    }

    #[test]
    fn judging_an_interval() {
        let i = |low, high| Interval {
            estimate: (low + high) / 2.0,
            low,
            high,
        };
        assert_eq!(judge(&i(0.03, 0.2), 0.02), Verdict::Fail);
        assert_eq!(judge(&i(-0.03, 0.02), 0.02), Verdict::Pass);
        assert_eq!(judge(&i(-0.03, 0.021), 0.02), Verdict::Inconclusive);
    }
}
