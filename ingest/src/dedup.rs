//! The dedup stage: drops duplicates and replays by `(boot, seq)` and finds gaps.
//!
//! Per device and message kind the backend keeps the newest `(boot, seq)` and a 64-bit bitmap of
//! the sequence numbers just below it (the anti-replay window of IPsec, RFC 4303 section 3.4.3).
//! Within a boot, a message up to 63 behind the newest is still accepted once (QoS 1 reorders
//! and redelivers); older ones and anything from an earlier boot are refused. A jump forward
//! leaves a gap that counts as lost messages until a late arrival fills it.
//!
//! Pure functions: the pipeline keeps the windows and the store makes them durable.

pub use tinyfleet_store::ReplayWindow;

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New: accept, store `window`. `lost` messages were skipped over (a gap opened);
    /// `filled` is true when this message fills a gap counted before.
    Accept {
        window: ReplayWindow,
        lost: u32,
        filled: bool,
    },
    /// Already accepted (a QoS 1 redelivery or a replay).
    Duplicate,
    /// Older than the 64-message window of the current boot.
    TooOld,
    /// From a boot before the newest one seen.
    StaleBoot,
}

/// Decides on `(boot, seq)` against the stored window (`None` for the first message ever).
pub fn check(window: Option<ReplayWindow>, boot: u32, seq: u32) -> Verdict {
    let w = match window {
        Some(w) if boot < w.boot => return Verdict::StaleBoot,
        Some(w) if boot == w.boot => w,
        // The first message ever, or the first of a newer boot: a fresh window. Sequence
        // numbers start at 0 in every boot, so `seq` messages before this one were lost.
        _ => {
            return Verdict::Accept {
                window: ReplayWindow {
                    boot,
                    max_seq: seq,
                    bitmap: 1,
                },
                lost: seq,
                filled: false,
            };
        }
    };
    if seq > w.max_seq {
        let ahead = seq - w.max_seq;
        let bitmap = if ahead >= 64 {
            1
        } else {
            (w.bitmap << ahead) | 1
        };
        return Verdict::Accept {
            window: ReplayWindow {
                boot,
                max_seq: seq,
                bitmap,
            },
            lost: ahead - 1,
            filled: false,
        };
    }
    let behind = w.max_seq - seq;
    if behind >= 64 {
        return Verdict::TooOld;
    }
    let bit = 1u64 << behind;
    if w.bitmap & bit != 0 {
        return Verdict::Duplicate;
    }
    Verdict::Accept {
        window: ReplayWindow {
            bitmap: w.bitmap | bit,
            ..w
        },
        lost: 0,
        filled: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(events: &[(u32, u32)]) -> (Vec<Verdict>, i64) {
        let mut w = None;
        let mut lost: i64 = 0;
        let mut out = Vec::new();
        for &(boot, seq) in events {
            let v = check(w, boot, seq);
            if let Verdict::Accept {
                window,
                lost: l,
                filled,
            } = v
            {
                w = Some(window);
                lost += i64::from(l) - i64::from(filled);
            }
            out.push(v);
        }
        (out, lost)
    }

    #[test]
    fn duplicates_gaps_and_boots() {
        let (v, lost) = run(&[
            (1, 0),
            (1, 1),
            (1, 1),
            (1, 4),
            (1, 2),
            (1, 2),
            (0, 9),
            (2, 0),
        ]);
        assert!(matches!(v[0], Verdict::Accept { lost: 0, .. }));
        assert_eq!(v[2], Verdict::Duplicate);
        assert!(matches!(v[3], Verdict::Accept { lost: 2, .. }));
        assert!(matches!(v[4], Verdict::Accept { filled: true, .. }));
        assert_eq!(v[5], Verdict::Duplicate);
        assert_eq!(v[6], Verdict::StaleBoot);
        assert!(matches!(v[7], Verdict::Accept { .. }));
        // seq 3 of boot 1 never arrived.
        assert_eq!(lost, 1);
    }

    #[test]
    fn window_edge() {
        let (v, _) = run(&[(1, 100), (1, 37), (1, 36)]);
        assert!(matches!(v[1], Verdict::Accept { filled: true, .. }));
        assert_eq!(v[2], Verdict::TooOld);
    }

    proptest! {
        /// Any delivery order with any duplication: every distinct (boot, seq) within reach is
        /// accepted exactly once, and with everything delivered no loss remains.
        #[test]
        fn each_message_accepted_once(n in 1u32..60, dups in proptest::collection::vec(0usize..60, 0..30),
                                      order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..60)) {
            let mut events: Vec<(u32, u32)> = (0..n).map(|s| (1, s)).collect();
            for d in dups { events.push((1, (d as u32) % n)); }
            // Shuffle a little: swap pairs, keeping everything within the 64 window.
            for (i, idx) in order.iter().enumerate() {
                let len = events.len();
                events.swap(i % len, idx.index(len));
            }
            let (verdicts, lost) = run(&events);
            let accepted = verdicts.iter().filter(|v| matches!(v, Verdict::Accept { .. })).count();
            prop_assert_eq!(accepted as u32, n);
            prop_assert_eq!(lost, 0);
        }
    }
}
