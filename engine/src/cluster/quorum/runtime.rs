//! The async runtime quorum groups run on: tokio's, without the ticker.
//!
//! openraft starts a ticker task per Raft instance whether or not ticks
//! are enabled; disabled, it still wakes every 1.5 heartbeat intervals to
//! find nothing to do. Quorum groups take no ticks (their elections and
//! heartbeats come from the node's watch, [`super::leadership`]), so with
//! a thousand groups on a node these wakes were most of what idle queues
//! cost: a timer, a task poll and a thread woken a thousand times a
//! second. The ticker is the only caller of the runtime's `sleep_until`
//! in openraft (0.9, pinned to an exact version in the workspace: an
//! upgrade must check this again with `grep -rn sleep_until`); here that
//! sleep never ends, so the ticker task waits, costing nothing, until the
//! group shuts down and cancels it. Everything else is tokio's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};

/// Whether groups run without the ticker ([`set_tickless`]).
static TICKLESS: AtomicBool = AtomicBool::new(false);

/// Make openraft's ticker sleep for good in every quorum group started
/// from now on (the node runs quiescent groups, `[cluster]
/// quiescent_quorum`); otherwise it ticks as openraft's own runtime does.
pub fn set_tickless(on: bool) {
    TICKLESS.store(on, Ordering::Relaxed);
}

/// tokio's runtime, whose `sleep_until` (openraft's ticker) never ends
/// when the node's groups are tickless.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QuorumRuntime;

/// A sleep: tokio's, or one that never ends.
pub enum QuorumSleep {
    /// A real sleep.
    Tokio(Pin<Box<tokio::time::Sleep>>),
    /// The ticker's.
    Never,
}

impl Future for QuorumSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            QuorumSleep::Tokio(s) => s.as_mut().poll(cx),
            QuorumSleep::Never => Poll::Pending,
        }
    }
}

type Tokio = TokioRuntime;

impl AsyncRuntime for QuorumRuntime {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = QuorumSleep;
    type Instant = <Tokio as AsyncRuntime>::Instant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = <Tokio as AsyncRuntime>::ThreadLocalRng;
    type OneshotSender<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <Tokio as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        QuorumSleep::Tokio(Box::pin(tokio::time::sleep(duration)))
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        if TICKLESS.load(Ordering::Relaxed) {
            QuorumSleep::Never
        } else {
            QuorumSleep::Tokio(Box::pin(tokio::time::sleep_until(deadline)))
        }
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        Tokio::thread_rng()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        Tokio::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sleeps_end_but_the_tickers_does_not_when_tickless() {
        QuorumRuntime::sleep(Duration::from_millis(5)).await;
        QuorumRuntime::sleep_until(tokio::time::Instant::now() + Duration::from_millis(5)).await;
        set_tickless(true);
        let never =
            QuorumRuntime::sleep_until(tokio::time::Instant::now() + Duration::from_millis(5));
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), never)
                .await
                .is_err()
        );
        set_tickless(false);
    }
}
