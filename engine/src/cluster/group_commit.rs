//! Group commit for the Raft logs: an append is written at once and
//! acknowledged once a sync covers it. Syncs run off the async runtime
//! (on tokio's blocking threads), round after round while anything waits:
//! one `fdatasync` covers every append written before its round started,
//! so appends that arrive while a round syncs share the next one. The
//! definitions log and the quorum queues' shared log both sync this way.

use std::fs::File;
use std::sync::Arc;

use parking_lot::Mutex;

/// What waits for a log's next sync, and whether a round runs.
pub(crate) struct GroupCommit<W> {
    pending: Mutex<(Vec<W>, bool)>,
}

impl<W> Default for GroupCommit<W> {
    fn default() -> Self {
        GroupCommit {
            pending: Mutex::new((Vec::new(), false)),
        }
    }
}

impl<W: Send + 'static> GroupCommit<W> {
    /// Answer `waiter` (with `answer`) once a sync of the log's file, as
    /// `file` gives it then, has covered what was written before this call,
    /// starting rounds if none runs.
    pub(crate) fn join<F>(self: &Arc<Self>, waiter: W, file: F, answer: fn(W, std::io::Result<()>))
    where
        F: Fn() -> Arc<File> + Send + 'static,
    {
        let start = {
            let mut p = self.pending.lock();
            p.0.push(waiter);
            !std::mem::replace(&mut p.1, true)
        };
        if start {
            let this = self.clone();
            let rounds = move || this.rounds(&file, answer);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(rounds);
                }
                Err(_) => rounds(),
            }
        }
    }

    /// Sync and answer what waits, round after round, until nothing does.
    /// Every waiter in a round was written before it joined, so one sync of
    /// the file as it is now covers all of them (a log that moved to
    /// another file synced the one before).
    fn rounds(&self, file: &impl Fn() -> Arc<File>, answer: fn(W, std::io::Result<()>)) {
        loop {
            let batch = {
                let mut p = self.pending.lock();
                if p.0.is_empty() {
                    p.1 = false;
                    return;
                }
                std::mem::take(&mut p.0)
            };
            let synced = file().sync_data();
            for waiter in batch {
                answer(
                    waiter,
                    match &synced {
                        Ok(()) => Ok(()),
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    },
                );
            }
        }
    }
}
