//! What a load test needs from simulated devices: connection and publish counters shared by
//! every device of a process, the broker's acknowledgement latency, and the publish times of a
//! sample of summaries (so a poller can time them until the backend shows them).
//!
//! A device gets a [`Load`] through [`crate::device::run_with`]; without one nothing is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};

/// A latency histogram with fixed-width buckets and an overflow bucket, lock-free.
#[derive(Debug)]
pub struct Histogram {
    resolution_us: u64,
    buckets: Box<[AtomicU64]>,
    overflow: AtomicU64,
    max_us: AtomicU64,
}

impl Histogram {
    /// `buckets` buckets of `resolution` each (values beyond go to the overflow bucket, and
    /// count as the largest value seen).
    pub fn new(resolution: Duration, buckets: usize) -> Self {
        Self {
            resolution_us: (resolution.as_micros() as u64).max(1),
            buckets: (0..buckets.max(1)).map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.max_us.fetch_max(us, Ordering::Relaxed);
        match self.buckets.get((us / self.resolution_us) as usize) {
            Some(b) => b.fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A copy of the counts, to compute quantiles or differences between two moments.
    pub fn snapshot(&self) -> HistSnapshot {
        HistSnapshot {
            resolution_us: self.resolution_us,
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            overflow: self.overflow.load(Ordering::Relaxed),
            max_us: self.max_us.load(Ordering::Relaxed),
        }
    }
}

/// Counts of a [`Histogram`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistSnapshot {
    pub resolution_us: u64,
    pub counts: Vec<u64>,
    pub overflow: u64,
    pub max_us: u64,
}

impl HistSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.overflow
    }

    /// The values recorded since `earlier` (the maximum stays the overall one).
    pub fn since(&self, earlier: &HistSnapshot) -> HistSnapshot {
        HistSnapshot {
            resolution_us: self.resolution_us,
            counts: self
                .counts
                .iter()
                .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            overflow: self.overflow.saturating_sub(earlier.overflow),
            max_us: self.max_us,
        }
    }

    /// The `q` quantile (0..=1) in milliseconds: the upper edge of the bucket that holds it;
    /// `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(((i as u64 + 1) * self.resolution_us) as f64 / 1000.0);
            }
        }
        Some(self.max_us as f64 / 1000.0)
    }
}

/// One sampled summary, published at `at`.
#[derive(Debug, Clone)]
pub struct Published {
    pub device: Arc<str>,
    pub boot: u32,
    pub seq: u32,
    pub at: Instant,
}

/// Counters shared by all devices of a load run.
#[derive(Debug)]
pub struct LoadStats {
    /// MQTT connections open now (CONNACK received, not yet lost or closed).
    pub connected: AtomicI64,
    /// Connections established (CONNACKs), reconnections included.
    pub connects: AtomicU64,
    /// Connection attempts that failed (timeout, refused, closed before CONNACK).
    pub connect_failures: AtomicU64,
    /// Established connections that were lost (not closed by the device).
    pub connections_lost: AtomicU64,
    /// Summaries handed to the MQTT client.
    pub summaries_sent: AtomicU64,
    /// Summaries the broker acknowledged (PUBACK).
    pub summaries_acked: AtomicU64,
    /// Publish of a summary -> its PUBACK, per summary.
    pub ack_latency: Histogram,
    /// Start of a connection attempt -> CONNACK, for attempts that succeeded.
    pub connect_latency: Histogram,
}

impl Default for LoadStats {
    fn default() -> Self {
        Self {
            connected: AtomicI64::new(0),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            connections_lost: AtomicU64::new(0),
            summaries_sent: AtomicU64::new(0),
            summaries_acked: AtomicU64::new(0),
            // 100 us buckets up to 30 s.
            ack_latency: Histogram::new(Duration::from_micros(100), 300_000),
            // 1 ms buckets up to 60 s.
            connect_latency: Histogram::new(Duration::from_millis(1), 60_000),
        }
    }
}

/// What one device of a load run reports to, and how it connects.
#[derive(Debug, Clone)]
pub struct Load {
    pub stats: Arc<LoadStats>,
    /// Set for the sampled devices: each summary's publish time goes here.
    pub probe: Option<mpsc::UnboundedSender<Published>>,
    /// Connection attempts in progress at a time across the fleet (a permit is held from the
    /// TCP connect to the CONNACK), so that a broker that accepts slowly is not buried under
    /// retries of attempts it has not answered yet.
    pub connecting: Option<Arc<Semaphore>>,
    /// How long an attempt waits for its CONNACK before it is abandoned and retried.
    pub connect_timeout: Duration,
}

impl Load {
    pub fn new(stats: Arc<LoadStats>) -> Self {
        Self {
            stats,
            probe: None,
            connecting: None,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// Decrements [`LoadStats::connected`] once, when the connection ends (or the guard is
/// dropped with it).
#[derive(Debug, Default)]
pub(crate) struct Held(Option<Arc<LoadStats>>);

impl Held {
    pub(crate) fn new(stats: Option<&Arc<LoadStats>>) -> Self {
        if let Some(s) = stats {
            s.connected.fetch_add(1, Ordering::Relaxed);
            s.connects.fetch_add(1, Ordering::Relaxed);
        }
        Held(stats.cloned())
    }

    /// The connection died under the device (counted as lost).
    pub(crate) fn lost(&mut self) {
        if let Some(s) = self.0.take() {
            s.connected.fetch_sub(1, Ordering::Relaxed);
            s.connections_lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_edges() {
        let h = Histogram::new(Duration::from_millis(1), 100);
        for ms in 0..100u64 {
            h.record(Duration::from_micros(ms * 1000 + 500));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile_ms(0.5), Some(50.0));
        assert_eq!(s.quantile_ms(0.99), Some(99.0));
        h.record(Duration::from_secs(5));
        let later = h.snapshot();
        assert_eq!(later.quantile_ms(1.0), Some(5000.0));
        let delta = later.since(&s);
        assert_eq!(delta.count(), 1);
        assert_eq!(delta.quantile_ms(0.5), Some(5000.0));
        assert_eq!(
            Histogram::new(Duration::from_millis(1), 1)
                .snapshot()
                .quantile_ms(0.5),
            None
        );
    }
}
