//! The epoch clock that plugin call deadlines are measured on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::Engine;

/// The epoch ticker's period: deadlines are measured in these.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// The clock behind call deadlines, which sleeps while no plugin runs.
///
/// Deadlines are wasmtime epochs, advanced by a ticker thread every
/// [`TICK`]. Ticking at 1 kHz forever cost an idle broker 1.5% of a core
/// and a thousand wake-ups a second (measured), and most messages never
/// call a plugin (memoized routes). So the ticker parks once no call has
/// started for longer than the longest deadline (every call that started
/// before has met its deadline by then, or been interrupted), and the next
/// call wakes it.
///
/// The hot path pays one relaxed load when a call already started since
/// the last tick, and at most one store per tick otherwise. The store of
/// `recent` and the ticker's store of `idle` are each followed by a load
/// of the other flag (both `SeqCst`), so either the ticker sees the call
/// and stays awake, or the call sees the ticker asleep and unparks it.
#[derive(Debug, Default)]
pub(crate) struct EpochClock {
    /// A call started since the ticker last looked.
    recent: AtomicBool,
    /// The ticker is parked (or about to be).
    pub(super) idle: AtomicBool,
    stop: AtomicBool,
    pub(super) ticker: std::sync::OnceLock<std::thread::Thread>,
}

impl EpochClock {
    /// A call is about to run under an epoch deadline: make sure the clock
    /// ticks.
    #[inline]
    pub(crate) fn running(&self) {
        if !self.recent.load(Ordering::Relaxed) {
            self.recent.store(true, Ordering::SeqCst);
            if self.idle.load(Ordering::SeqCst)
                && let Some(t) = self.ticker.get()
            {
                t.unpark();
            }
        }
    }

    /// The ticker: advance the engines' epochs every [`TICK`]; park after
    /// `idle_after` ticks without a call.
    pub(super) fn run(&self, engines: &[Engine], idle_after: u64) {
        let mut quiet = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            for engine in engines {
                engine.increment_epoch();
            }
            if self.recent.swap(false, Ordering::SeqCst) {
                quiet = 0;
                continue;
            }
            quiet += 1;
            if quiet < idle_after {
                continue;
            }
            self.idle.store(true, Ordering::SeqCst);
            while !self.recent.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                std::thread::park();
            }
            self.idle.store(false, Ordering::SeqCst);
            quiet = 0;
        }
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.get() {
            t.unpark();
        }
    }
}
