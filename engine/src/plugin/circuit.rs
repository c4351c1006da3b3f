//! A circuit breaker per plugin use (an exchange's router or transform, a
//! binding's filter): after `threshold` faults in a row, calls are refused
//! for `cooldown` instead of rebuilding and faulting on every message. After
//! the cooldown one call is let through; a success closes the circuit.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::PluginFault;

pub(crate) struct Circuit {
    consecutive: AtomicU32,
    /// Milliseconds on [`now_ms`]'s clock; 0 when closed.
    open_until: AtomicU64,
    threshold: u32,
    cooldown: Duration,
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Circuit {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Circuit {
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Refuse the call while the circuit is open. The closed case is one
    /// relaxed load: this runs on every message.
    #[inline]
    pub(crate) fn check(&self) -> Result<(), PluginFault> {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return Ok(());
        }
        let now = now_ms();
        if now < until {
            return Err(PluginFault::CircuitOpen(Duration::from_millis(until - now)));
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn success(&self) {
        // Only write when there is something to reset, so the hot path stays
        // read-only and the cache line is not bounced between cores.
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
            self.open_until.store(0, Ordering::Relaxed);
        }
    }

    /// Record a fault; returns true when this fault opened the circuit.
    pub(crate) fn fault(&self) -> bool {
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold {
            let until = now_ms() + self.cooldown.as_millis() as u64;
            self.open_until.store(until, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub(crate) fn is_open(&self) -> bool {
        self.check().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_closes_on_success() {
        let c = Circuit::new(3, Duration::from_millis(30));
        assert!(!c.fault());
        assert!(!c.fault());
        c.success();
        assert!(!c.fault());
        assert!(!c.fault());
        assert!(c.fault());
        assert!(matches!(c.check(), Err(PluginFault::CircuitOpen(_))));
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.check().is_ok(), "half-open after the cooldown");
        c.success();
        assert!(c.check().is_ok());
        assert!(!c.is_open());
    }
}
