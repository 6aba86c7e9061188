//! One device's install of one offered version, from its progress reports.
//!
//! Reports are ordered by the device's `(boot, seq)` (protocol.md, "Ordering"), never by
//! arrival: a report at or below the newest applied one is a duplicate or arrived late and is
//! ignored, so applying any permutation of a device's reports, with any duplicates, ends in
//! the state of its newest report. A newer report always wins, even one that goes "back" (a
//! failed install retried after the retained offer was delivered again starts over at
//! *accepted*).
//!
//! ```text
//!  offered --> accepted --> downloading --> verified --> switching --> confirmed
//!     |            \______________\______________\___________\-------> failed (6)
//!     |                                                       \------> reverted (7)
//!     \--> rejected (8)         any unfinished state, online, silent for
//!                               report_timeout_ms --> timed out (until it reports again)
//! ```
//!
//! A refusal with error 12 (*busy*: the device is switching to or trying another image) is not
//! final: the retained offer is delivered again after the device's next reboot, so such a
//! device counts as still pending.

use serde::{Deserialize, Serialize};
use tinyfleet_device::ota::installer::error as device_error;
use tinyfleet_device::wire::{Progress, ota_state};

/// Where a device's install stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallState {
    /// Offered; no report yet.
    Offered,
    Accepted,
    Downloading,
    /// The image is complete in the inactive slot and verified.
    Verified,
    /// Rebooting into the new image on trial.
    Switching,
    Confirmed,
    Failed,
    Reverted,
    Rejected,
}

impl InstallState {
    /// The state of a `progress.state` code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            ota_state::ACCEPTED => Self::Accepted,
            ota_state::DOWNLOADING => Self::Downloading,
            ota_state::VERIFIED => Self::Verified,
            ota_state::SWITCHING => Self::Switching,
            ota_state::CONFIRMED => Self::Confirmed,
            ota_state::FAILED => Self::Failed,
            ota_state::REVERTED => Self::Reverted,
            ota_state::REJECTED => Self::Rejected,
            _ => return None,
        })
    }
}

/// One progress report, as the shell takes it from a verified `tf/v1/{device}/ota/prog`
/// message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub device: String,
    pub boot: u32,
    pub seq: u32,
    /// The manifest reported on (0 when the device could not read it: a malformed offer or
    /// an untrusted signature).
    pub manifest_seq: u32,
    /// A `progress.state` code (1-8).
    pub state: u8,
    pub bytes: u32,
    pub error: u16,
}

impl ProgressReport {
    pub fn from_progress(device: impl Into<String>, p: &Progress) -> Self {
        Self {
            device: device.into(),
            boot: p.boot,
            seq: p.seq,
            manifest_seq: p.manifest_seq,
            state: p.state,
            bytes: p.bytes,
            error: p.error,
        }
    }
}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportOutcome {
    Applied,
    /// At or below the newest applied `(boot, seq)`: a duplicate or a late arrival.
    Stale,
    /// The device is not in this rollout.
    UnknownDevice,
    /// About a manifest this rollout did not offer the device.
    OtherManifest,
    /// A state code outside 1-8.
    BadState,
}

/// A device's install of one offered version (named by its `seq`; the engine knows which
/// version that is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    pub seq: u32,
    pub offered_ms: i64,
    pub state: InstallState,
    /// The newest report's error code.
    pub error: u16,
    pub bytes: u32,
    /// `(boot, seq)` of the newest applied report.
    pub last: Option<(u32, u32)>,
    /// The offer or the newest report (server time): the timeout counts from here, or from
    /// the device's return online when later.
    pub activity_ms: i64,
    pub timed_out: bool,
    /// The device has been online since the offer, or has reported on it: it may have received
    /// it (the broker hands a retained offer over when the device connects).
    pub reached: bool,
}

impl Track {
    pub fn offered(seq: u32, now_ms: i64, online: bool) -> Self {
        Self {
            seq,
            offered_ms: now_ms,
            state: InstallState::Offered,
            error: 0,
            bytes: 0,
            last: None,
            activity_ms: now_ms,
            timed_out: false,
            reached: online,
        }
    }

    /// Applies a report about this track's manifest.
    pub fn apply(&mut self, r: &ProgressReport, now_ms: i64) -> ReportOutcome {
        let Some(state) = InstallState::from_code(r.state) else {
            return ReportOutcome::BadState;
        };
        if self.last.is_some_and(|last| (r.boot, r.seq) <= last) {
            return ReportOutcome::Stale;
        }
        self.last = Some((r.boot, r.seq));
        self.state = state;
        self.error = r.error;
        self.bytes = r.bytes;
        self.activity_ms = self.activity_ms.max(now_ms);
        self.timed_out = false;
        self.reached = true;
        ReportOutcome::Applied
    }

    /// Refused because the device was busy with another image: it will get the retained
    /// offer again after its next reboot.
    pub fn busy(&self) -> bool {
        self.state == InstallState::Rejected && self.error == device_error::BUSY
    }

    /// Finished, one way or the other (a timed-out device is not: it may still report).
    pub fn terminal(&self) -> bool {
        match self.state {
            InstallState::Confirmed | InstallState::Failed | InstallState::Reverted => true,
            InstallState::Rejected => !self.busy(),
            _ => false,
        }
    }

    /// Counts as done for the install gate: terminal or timed out.
    pub fn done(&self) -> bool {
        self.terminal() || self.timed_out
    }

    /// Whether the device may be running, or be about to run, this track's image: it may have
    /// received the offer, and its install did not end in a failure, a refusal or a reverted
    /// trial (the old image kept running).
    pub fn may_have_installed(&self) -> bool {
        self.reached
            && !(matches!(self.state, InstallState::Failed | InstallState::Reverted)
                || (self.state == InstallState::Rejected && !self.busy()))
    }

    /// Times the track out when the device is online, the install unfinished and nothing was
    /// heard for `timeout_ms` since the later of the last activity and `online_since_ms`.
    /// Returns whether it changed.
    pub fn check_timeout(
        &mut self,
        online_since_ms: Option<i64>,
        now_ms: i64,
        timeout_ms: i64,
    ) -> bool {
        let Some(since) = online_since_ms else {
            return false;
        };
        if self.terminal() || self.timed_out {
            return false;
        }
        if now_ms.saturating_sub(self.activity_ms.max(since)) >= timeout_ms {
            self.timed_out = true;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(boot: u32, seq: u32, state: u8, error: u16) -> ProgressReport {
        ProgressReport {
            device: "d".into(),
            boot,
            seq,
            manifest_seq: 2,
            state,
            bytes: 0,
            error,
        }
    }

    #[test]
    fn newest_report_wins_whatever_the_arrival_order() {
        let reports = [
            rep(1, 0, ota_state::ACCEPTED, 0),
            rep(1, 1, ota_state::DOWNLOADING, 0),
            rep(1, 2, ota_state::VERIFIED, 0),
            rep(1, 3, ota_state::SWITCHING, 0),
            rep(2, 0, ota_state::CONFIRMED, 0),
        ];
        let mut orders = vec![
            vec![0, 1, 2, 3, 4],
            vec![4, 3, 2, 1, 0],
            vec![2, 4, 0, 4, 1, 3, 3],
        ];
        orders.push(vec![1, 0, 4, 2]);
        for order in orders {
            let mut t = Track::offered(2, 0, true);
            for i in order {
                t.apply(&reports[i], 10);
            }
            assert_eq!(t.state, InstallState::Confirmed);
            assert_eq!(t.last, Some((2, 0)));
            assert!(t.done() && t.terminal() && t.may_have_installed());
        }
        let mut t = Track::offered(2, 0, true);
        assert_eq!(t.apply(&reports[1], 1), ReportOutcome::Applied);
        assert_eq!(t.apply(&reports[1], 2), ReportOutcome::Stale);
        assert_eq!(t.apply(&reports[0], 3), ReportOutcome::Stale);
        assert_eq!(t.apply(&rep(1, 9, 9, 0), 3), ReportOutcome::BadState);
        assert_eq!(t.state, InstallState::Downloading);
    }

    #[test]
    fn busy_refusals_wait_and_failures_are_clean() {
        let mut t = Track::offered(2, 0, false);
        assert!(!t.may_have_installed(), "never online since the offer");
        t.apply(&rep(1, 0, ota_state::REJECTED, device_error::BUSY), 1);
        assert!(t.busy() && !t.terminal() && t.may_have_installed());
        t.apply(&rep(2, 0, ota_state::REJECTED, device_error::HARDWARE), 2);
        assert!(t.terminal() && !t.may_have_installed());
        // A retry after a failure starts over.
        t.apply(&rep(2, 1, ota_state::FAILED, 22), 3);
        assert!(!t.may_have_installed());
        t.apply(&rep(3, 0, ota_state::ACCEPTED, 0), 4);
        assert!(!t.terminal() && t.may_have_installed());
    }

    #[test]
    fn timeouts_count_online_time_only() {
        let mut t = Track::offered(2, 0, true);
        assert!(!t.check_timeout(None, 10_000_000, 1_000));
        assert!(!t.check_timeout(Some(5_000), 5_999, 1_000));
        assert!(t.check_timeout(Some(5_000), 6_000, 1_000));
        assert!(t.done() && !t.terminal());
        assert!(!t.check_timeout(Some(5_000), 9_000, 1_000));
        t.apply(&rep(1, 0, ota_state::DOWNLOADING, 0), 9_500);
        assert!(!t.timed_out && !t.done());
        t.apply(&rep(1, 1, ota_state::CONFIRMED, 0), 9_600);
        assert!(!t.check_timeout(Some(0), 100_000, 1_000));
    }
}
