//! A lock-free latency histogram with fixed buckets, shared by the plugin
//! host (call times) and the store (sync times), read by the admin API
//! (percentiles) and `/metrics` (Prometheus histograms).
//!
//! Fixed buckets instead of an HDR histogram: recording is one relaxed
//! atomic add on a bucket picked by a short scan, readers never block
//! writers, and the buckets are exactly what Prometheus exposes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (the last bucket is +Inf).
pub const BOUNDS_US: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000,
];

/// Counts of durations per bucket, plus their sum.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_nanos: AtomicU64,
}

/// A copy of a histogram at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Non-cumulative count per bucket; the last is above every bound.
    pub buckets: Vec<u64>,
    /// Sum of all recorded durations, nanoseconds.
    pub sum_nanos: u64,
}

impl Latency {
    /// Record one duration.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_nanos: self.sum_nanos.load(Ordering::Relaxed),
        }
    }
}

impl LatencySnapshot {
    /// Number of recorded durations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The upper bound (µs) of the bucket holding quantile `q` (0..=1):
    /// an upper estimate, as precise as the buckets. `None` when empty or
    /// when the quantile falls above the last bound.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return BOUNDS_US.get(i).copied();
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let h = Latency::default();
        for _ in 0..90 {
            h.record(Duration::from_micros(3));
        }
        for _ in 0..10 {
            h.record(Duration::from_micros(700));
        }
        h.record(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count(), 101);
        assert_eq!(s.buckets[2], 90, "3 µs is in the ≤5 µs bucket");
        assert_eq!(s.buckets[9], 10, "700 µs is in the ≤1 ms bucket");
        assert_eq!(*s.buckets.last().unwrap(), 1, "1 s is above every bound");
        assert_eq!(s.quantile_us(0.5), Some(5));
        assert_eq!(s.quantile_us(0.95), Some(1_000));
        assert_eq!(s.quantile_us(1.0), None);
        assert_eq!(LatencySnapshot::default().quantile_us(0.5), None);
    }
}
