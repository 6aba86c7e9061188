//! Deterministic, stable device selection.
//!
//! A device's *bucket* is the first 53 bits of `SHA-256("tinyfleet-rollout\0" || len(rollout
//! id) || rollout id || device id)`, a uniform integer in `[0, 2^53)` (read as a fraction of
//! [`BUCKETS`], a number in [0, 1) that an `f64` holds exactly). It depends on nothing but the
//! two ids, so it is the same in every evaluation, after every restart and on every replica,
//! and a device that joins the target later gets its bucket like everybody else. Because the
//! hash is uniform and unrelated to anything about the device, the devices of the first stage
//! are a *random sample* of the target: canary against control is a randomised comparison.
//!
//! Stage `k` covers the buckets below its *cut*: `share_k * 2^53`, raised when needed so that
//! stages `1..=k` hold at least `min_devices_k` devices taking part (the engine counts devices
//! online or reached by their offer; those with the smallest buckets are taken), and never
//! below the previous stage's cut. A device belongs to the first stage
//! whose cut is above its bucket. The cut of an open stage can only grow (when devices join and
//! the minimum needs more of them), and it is frozen when the next stage opens, so once a
//! device's stage has opened its stage never changes.

use sha2::{Digest, Sha256};

/// The bucket space: buckets are integers in `[0, BUCKETS)`.
pub const BUCKETS: u64 = 1 << 53;

/// The bucket of `device` in the rollout `rollout_id`.
pub fn bucket(rollout_id: &str, device: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"tinyfleet-rollout\0");
    h.update((rollout_id.len() as u64).to_le_bytes());
    h.update(rollout_id.as_bytes());
    h.update(device.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first) >> 11
}

/// A bucket as a fraction in [0, 1).
pub fn fraction(bucket: u64) -> f64 {
    bucket as f64 / BUCKETS as f64
}

/// The cut of a cumulative share: buckets below it are covered (`share` 1 covers all).
pub fn share_cut(share: f64) -> u64 {
    if share.is_nan() || share <= 0.0 {
        0
    } else if share >= 1.0 {
        BUCKETS
    } else {
        ((share * BUCKETS as f64).ceil() as u64).min(BUCKETS)
    }
}

/// The cut of a stage: its share's cut, raised so that at least `min_devices` of `sorted`
/// (the buckets of the target, ascending) are below it, and at least `floor` (the previous
/// stage's cut).
pub fn stage_cut(share: f64, min_devices: u32, sorted: &[u64], floor: u64) -> u64 {
    let mut cut = share_cut(share).max(floor);
    let need = (min_devices as usize).min(sorted.len());
    if need > 0 {
        let below = sorted.partition_point(|&b| b < cut);
        if below < need {
            cut = sorted[need - 1] + 1;
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_uniform() {
        assert_eq!(bucket("r1", "dev-1"), bucket("r1", "dev-1"));
        assert_ne!(bucket("r1", "dev-1"), bucket("r2", "dev-1"));
        // Length prefix: ("r1", "1dev") and ("r11", "dev") differ.
        assert_ne!(bucket("r1", "1dev"), bucket("r11", "dev"));
        let n = 20_000;
        let below = (0..n)
            .filter(|i| fraction(bucket("r1", &format!("dev-{i}"))) < 0.1)
            .count();
        // 10 % +- 5 sigma.
        assert!((1_790..=2_210).contains(&below), "{below}");
        assert!((0..n).all(|i| bucket("x", &format!("{i}")) < BUCKETS));
    }

    #[test]
    fn cuts_honour_share_minimum_and_floor() {
        let sorted: Vec<u64> = (0..100).map(|i| i * (BUCKETS / 100)).collect();
        // 1 % of 100 is one device; at least 10 means the 10 smallest.
        let c = stage_cut(0.01, 10, &sorted, 0);
        assert_eq!(sorted.partition_point(|&b| b < c), 10);
        // The share alone when it already covers enough.
        let c = stage_cut(0.5, 10, &sorted, 0);
        assert_eq!(c, share_cut(0.5));
        // Never below the floor; a minimum above the target takes everyone.
        assert_eq!(stage_cut(0.01, 0, &sorted, 77), 77.max(share_cut(0.01)));
        let c = stage_cut(0.01, 1_000, &sorted, 0);
        assert_eq!(sorted.partition_point(|&b| b < c), 100);
        assert_eq!(share_cut(1.0), BUCKETS);
        assert_eq!(share_cut(0.0), 0);
        assert_eq!(stage_cut(0.2, 5, &[], 0), share_cut(0.2));
    }
}
