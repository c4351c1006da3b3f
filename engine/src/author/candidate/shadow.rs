//! The shadow's side thread: sampled messages are compared here, after
//! the serving version decided them, so a slow or faulting candidate costs
//! the publish path one queue push. A comparison that differs is kept as a
//! [`Disagreement`] (the latest few) and counted.
//!
//! Two choices keep the serving path's latency where it was (measured in
//! `docs/performance.md`): the publish path never wakes the thread (it
//! drains the queue every [`POLL`] instead; a wake-up per sample cost the
//! sampled messages tens of microseconds on two cores), and on Linux the
//! thread runs under `SCHED_IDLE`, so it only gets a core nothing else
//! wants and never preempts a connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Disagreement, Mode, SHADOW_QUEUE, Trial};
use crate::message::Message;
use crate::plugin::{FilterPlugin, RouterPlugin, TransformDecision, TransformPlugin};

/// What a router's comparison needs of its exchange: its bindings, as the
/// router sees them, and words for the ones chosen. The exchange
/// implements it, so the shadow names no exchange type (and the exchange,
/// which holds its candidates, is not imported back).
pub(crate) trait Compared: crate::plugin::BindingSource + Send + Sync {
    /// The exchange's name.
    fn exchange_name(&self) -> &str;
    /// Bindings `ids` as `queue:orders, exchange:audit`, in id order.
    fn describe(&self, ids: &[u32]) -> String;
}

/// A comparison for the shadow thread.
// Queued and taken at once, a sample at a time: boxing the big variant
// would only add an allocation per sample.
#[allow(clippy::large_enum_variant)]
pub(super) enum Job {
    Route {
        exchange: Arc<dyn Compared>,
        candidate: Arc<RouterPlugin>,
        message: Arc<Message>,
        serving: Vec<u32>,
    },
    Filter {
        exchange: String,
        candidate: Arc<FilterPlugin>,
        message: Arc<Message>,
        serving: bool,
    },
    Transform {
        exchange: String,
        candidate: Arc<TransformPlugin>,
        message: Arc<Message>,
        serving: TransformDecision,
    },
}

impl Trial {
    pub(super) fn send(&self, job: Job) {
        let mut shadow = self.shadow.lock();
        let Some(queue) = shadow.as_mut() else { return };
        if queue.len() >= SHADOW_QUEUE {
            drop(shadow);
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push_back(job);
    }

    /// Start the shadow thread (shadow mode only).
    pub(super) fn start_shadow(self: &Arc<Self>) -> std::io::Result<()> {
        if !matches!(self.mode, Mode::Shadow { .. }) {
            return Ok(());
        }
        *self.shadow.lock() = Some(VecDeque::new());
        let trial = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("wasmq-shadow".into())
            .spawn(move || {
                idle_priority();
                loop {
                    std::thread::sleep(POLL);
                    // Ends when the trial stops taking samples (or is gone).
                    let Some(t) = trial.upgrade() else { return };
                    let jobs = match t.shadow.lock().as_mut() {
                        None => return,
                        Some(q) => std::mem::take(q),
                    };
                    for job in jobs {
                        t.run(job);
                    }
                }
            })?;
        Ok(())
    }

    pub(super) fn stop_shadow(&self) {
        self.shadow.lock().take();
    }

    fn run(&self, job: Job) {
        let started = Instant::now();
        match job {
            Job::Route {
                exchange,
                candidate,
                message,
                mut serving,
            } => {
                let mut ids = Vec::new();
                let r = candidate.route(&message, &*exchange, &mut ids);
                self.record(started.elapsed(), r.as_ref().err());
                let decided = match r {
                    Ok(()) => {
                        ids.sort_unstable();
                        ids.dedup();
                        serving.sort_unstable();
                        serving.dedup();
                        if ids == serving {
                            return self.compared(None);
                        }
                        exchange.describe(&ids)
                    }
                    Err(f) => format!("fault: {f}"),
                };
                self.compared(Some(Disagreement {
                    exchange: exchange.exchange_name().to_owned(),
                    routing_key: message.routing_key.to_string(),
                    role: "router".into(),
                    serving: exchange.describe(&serving),
                    candidate: decided,
                }));
            }
            Job::Filter {
                exchange,
                candidate,
                message,
                serving,
            } => {
                let r = candidate.filter(&message);
                self.record(started.elapsed(), r.as_ref().err());
                let word = |pass: bool| if pass { "pass" } else { "drop" }.to_owned();
                let decided = match r {
                    Ok(pass) if pass == serving => return self.compared(None),
                    Ok(pass) => word(pass),
                    Err(f) => format!("fault: {f}"),
                };
                self.compared(Some(Disagreement {
                    exchange,
                    routing_key: message.routing_key.to_string(),
                    role: "filter".into(),
                    serving: word(serving),
                    candidate: decided,
                }));
            }
            Job::Transform {
                exchange,
                candidate,
                message,
                serving,
            } => {
                let r = candidate.transform(&message);
                self.record(started.elapsed(), r.as_ref().err());
                let decided = match r {
                    Ok(d) if d == serving => return self.compared(None),
                    Ok(d) => describe_transform(&d),
                    Err(f) => format!("fault: {f}"),
                };
                self.compared(Some(Disagreement {
                    exchange,
                    routing_key: message.routing_key.to_string(),
                    role: "transform".into(),
                    serving: describe_transform(&serving),
                    candidate: decided,
                }));
            }
        }
    }
}

/// How often the shadow thread takes the samples queued since.
const POLL: Duration = Duration::from_millis(5);

/// Run the calling thread only when a core would otherwise be idle
/// (Linux's `SCHED_IDLE`); elsewhere, or if refused, it runs as it is.
fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param` that outlives the call;
        // pid 0 names the calling thread, and the call only changes its
        // scheduling policy.
        let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if r != 0 {
            tracing::debug!(
                "the shadow thread keeps its scheduling policy: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A transform decision in a word or two.
pub(crate) fn describe_transform(d: &TransformDecision) -> String {
    match d {
        TransformDecision::Keep => "keep".into(),
        TransformDecision::Drop => "drop".into(),
        TransformDecision::DeadLetter(reason) => format!("dead_letter ({reason})"),
        TransformDecision::Rewrite {
            routing_key,
            properties,
            body,
        } => {
            let mut parts = Vec::new();
            if let Some(k) = routing_key {
                parts.push(format!("routing_key={k}"));
            }
            if properties.is_some() {
                parts.push("properties".into());
            }
            if let Some(b) = body {
                parts.push(format!("body ({} bytes)", b.len()));
            }
            format!("rewrite ({})", parts.join(", "))
        }
    }
}
