//! What the load generator (`wasmq-perf`) and the latency probe
//! (`wasmq-ping`) share.

pub mod raw;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The probe's pacing: a `timerfd` armed with the period and read through
/// the runtime's own epoll, so the one thread that sends and receives also
/// keeps time. A [`Pacer`] costs a thread and a cross-thread wake-up per
/// message, and on two shared cores that extra thread competes with the
/// broker and the probe for a core. Timer slack does not apply to timerfd.
/// Periods missed while the publisher was busy are owed and paid at once.
#[cfg(target_os = "linux")]
pub struct Ticker {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    owed: u64,
}

#[cfg(target_os = "linux")]
impl Ticker {
    /// A ticker that fires every `period`, the first time one period from
    /// now. Needs a Tokio runtime with IO enabled.
    pub fn start(period: Duration) -> std::io::Result<Ticker> {
        use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
        let fd = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        let every = Timespec::try_from(period).map_err(std::io::Error::other)?;
        rustix::time::timerfd_settime(
            &fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: every,
                it_value: every,
            },
        )?;
        // SAFETY: the `OwnedFd` owns the timerfd, and the ticker neither
        // replaces nor closes it while registered.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd)? };
        Ok(Ticker { fd, owed: 0 })
    }

    /// Wait for the next period (at once if one is owed).
    pub async fn tick(&mut self) -> std::io::Result<()> {
        while self.owed == 0 {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations)?)) {
                Ok(Ok(8)) => self.owed = u64::from_ne_bytes(expirations),
                Ok(Ok(n)) => return Err(std::io::Error::other(format!("timerfd read {n} bytes"))),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        self.owed -= 1;
        Ok(())
    }
}

/// Evenly spaced publishing at a fixed rate. Tokio's timer counts in whole
/// milliseconds, so pacing 10k msg/s with `tokio::time::sleep` sent bursts
/// of ten every millisecond, and each message's latency then included
/// waiting behind its burst. A thread with a fine timer slack hands out one
/// permit per period instead; a publisher that falls behind catches up
/// (permits accumulate), as PerfTest's rate limiter does.
pub struct Pacer {
    permits: Arc<tokio::sync::Semaphore>,
}

impl Pacer {
    /// Start handing out one send time per `period` until `stop`.
    pub fn start(period: Duration, stop: Arc<AtomicBool>) -> Pacer {
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let p = permits.clone();
        std::thread::spawn(move || {
            // Linux lets a sleep overshoot by the thread's timer slack
            // (50 µs by default), half a period at 10k msg/s; ask for 1 µs.
            #[cfg(target_os = "linux")]
            // SAFETY: PR_SET_TIMERSLACK takes an integer and touches only
            // this thread's scheduling attributes.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
            }
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                p.add_permits(1);
            }
            // Release a publisher waiting for its next permit.
            p.close();
        });
        Pacer { permits }
    }

    /// Wait for the next send time (at once once stopped).
    pub async fn tick(&self) {
        if let Ok(permit) = self.permits.acquire().await {
            permit.forget();
        }
    }
}

/// The binding key of binding `b` of queue `q`: topic and direct keys
/// `k.{q}.{b}` (topic binds `k.{q}.{b}.*`), fanout none.
pub fn binding_key(kind: &str, q: usize, b: usize) -> String {
    match kind {
        "topic" => format!("k.{q}.{b}.*"),
        "fanout" => String::new(),
        _ => format!("k.{q}.{b}"),
    }
}

/// The routing key of the `n`th message: round-robin over the queues, then
/// over each queue's bindings, so every message matches exactly one binding
/// (fanout: every queue).
pub fn routing_key(kind: &str, n: u64, queues: usize, bindings_per_queue: usize) -> String {
    let q = (n as usize) % queues;
    let b = (n as usize / queues) % bindings_per_queue;
    match kind {
        "topic" => format!("k.{q}.{b}.x"),
        _ => format!("k.{q}.{b}"),
    }
}
