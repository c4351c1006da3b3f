//! Policies laid over the queues and exchanges of the running broker: at
//! declare (and when a quorum queue's new leader builds its live queue),
//! and over every existing one of a vhost when its policies change.

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::{Broker, Exchange, QueueLimits, TransformPlugin};
use crate::policy::{Applied, Target};

impl Broker {
    /// What the policies of `vhost` make of a queue declared `name` with
    /// `arguments` (already parsed as `declared`): what applies, and the
    /// limits it acts on. A policy the queue's own arguments refuse (a
    /// quorum queue's `reject-publish-dlx`) leaves it as declared.
    pub(crate) fn with_policies(
        &self,
        vhost: &str,
        name: &str,
        arguments: &FieldTable,
        declared: QueueLimits,
    ) -> (Applied, QueueLimits) {
        let target = if declared.quorum {
            Target::QuorumQueue
        } else if declared.stream {
            Target::Stream
        } else {
            Target::ClassicQueue
        };
        let applied = self.accounts().policies_for(vhost, name, target);
        if applied.is_empty() {
            return (applied, declared);
        }
        match QueueLimits::parse(&applied.queue_arguments(arguments)) {
            Ok(limits) => (applied, limits),
            Err(e) => {
                tracing::warn!(vhost = %crate::untrusted::text(vhost), queue = %crate::untrusted::text(name), policy = ?applied.policy, "policy not applied: {e}");
                (Applied::default(), declared)
            }
        }
    }

    /// Lay the policies of `vhost` over every queue and exchange in it
    /// (its policies changed). Only those whose policy changed are touched.
    pub(crate) fn apply_policies(&self, vhost: &str) {
        let Some(v) = self.vhost(vhost) else {
            return;
        };
        let mut changed = 0usize;
        for q in v.queues() {
            let Ok(declared) = QueueLimits::parse(&q.arguments) else {
                continue;
            };
            let (applied, limits) = self.with_policies(vhost, &q.name, &q.arguments, declared);
            if *q.policy() != applied {
                q.set_policy(applied, limits);
                changed += 1;
            }
        }
        for x in v.exchanges() {
            if self.apply_exchange_policy(vhost, &x) {
                changed += 1;
            }
        }
        if changed > 0 {
            tracing::info!(vhost = %crate::untrusted::text(vhost), changed, "policies applied");
        }
    }

    /// Lay the policies of `vhost` over exchange `x`; whether that changed
    /// what applies to it.
    pub(crate) fn apply_exchange_policy(&self, vhost: &str, x: &Arc<Exchange>) -> bool {
        let applied = self
            .accounts()
            .policies_for(vhost, &x.name, Target::Exchange);
        if **x.policy.load() == applied {
            return false;
        }
        let declared = super::arg_str(&x.arguments, super::ARG_ALTERNATE_EXCHANGE)
            .ok()
            .flatten();
        x.alternate_exchange.store(
            applied
                .alternate_exchange(declared.as_deref())
                .map(Arc::new),
        );
        let transform = applied.transform(
            super::arg_str(&x.arguments, super::ARG_TRANSFORM)
                .ok()
                .flatten()
                .as_deref(),
        );
        if transform != x.transform_name() {
            self.set_transform(vhost, x, transform);
        }
        self.set_binding_filters(x, applied.filter(None));
        x.policy.store(Arc::new(applied));
        true
    }

    /// A policy's filter `name` for a binding of exchange `source` with
    /// `key` and (encoded) arguments: `None`, logged, if it cannot be built.
    pub(crate) fn policy_filter(
        &self,
        name: &str,
        source: &str,
        key: &str,
        encoded: &[u8],
    ) -> Option<(String, Arc<super::FilterPlugin>)> {
        let built = self
            .registry
            .get(name)
            .ok_or_else(|| "no such plugin is loaded".to_owned())
            .and_then(|v| {
                super::FilterPlugin::new(&self.host, &v, source, key, encoded)
                    .map_err(|e| e.to_string())
            });
        match built {
            Ok(f) => Some((name.to_owned(), Arc::new(f))),
            Err(e) => {
                tracing::warn!(exchange = %crate::untrusted::text(source), plugin = %crate::untrusted::text(name), "a policy's filter not applied to a binding: {e}");
                None
            }
        }
    }

    /// Give every binding of `x` that named no filter itself the policy's
    /// filter `name` (none: no filter), from the next message on.
    fn set_binding_filters(&self, x: &Arc<Exchange>, name: Option<String>) {
        let _swap = self.swap.read();
        let _control = x.control.lock();
        let table = x.bindings.load_full();
        let mut next = (*table).clone();
        let mut changed = false;
        for b in table.iter() {
            if super::arg_str(&b.arguments, super::ARG_FILTER)
                .ok()
                .flatten()
                .is_some()
                || b.filter_name == name
            {
                continue;
            }
            let mut nb = (**b).clone();
            match name
                .as_deref()
                .and_then(|n| self.policy_filter(n, &x.name, &b.key, &b.encoded_arguments))
            {
                Some((n, f)) => {
                    nb.filter_name = Some(n);
                    nb.filter = Some(f);
                }
                None => {
                    nb.filter_name = None;
                    nb.filter = None;
                }
            }
            nb.filter_candidate = None;
            next = next.replaced(nb);
            changed = true;
        }
        if changed {
            x.bindings.store(Arc::new(next));
            x.reset_memo();
        }
    }

    /// Run transform plugin `name` on `x` from the next message on (none:
    /// no transform). A plugin that is not loaded, or refuses the
    /// exchange's arguments, leaves the exchange as it was.
    fn set_transform(&self, vhost: &str, x: &Arc<Exchange>, name: Option<String>) {
        // No hot swap or binding change in between.
        let _swap = self.swap.read();
        let _control = x.control.lock();
        let Some(name) = name else {
            x.transform.store(None);
            x.transform_name.store(None);
            return;
        };
        let built = self
            .registry
            .get(&name)
            .ok_or_else(|| "no such plugin is loaded".to_owned())
            .and_then(|v| {
                TransformPlugin::new(&self.host, &v, &x.name, &x.encoded_arguments)
                    .map_err(|e| e.to_string())
            });
        match built {
            Ok(t) => {
                x.transform.store(Some(Arc::new(t)));
                x.transform_name.store(Some(Arc::new(name)));
            }
            Err(e) => {
                tracing::warn!(vhost = %crate::untrusted::text(vhost), exchange = %crate::untrusted::text(&x.name), plugin = %crate::untrusted::text(&name), "a policy's transform not applied: {e}")
            }
        }
    }
}

impl Exchange {
    /// The name of the policy that applies to it.
    pub fn policy_name(&self) -> Option<String> {
        self.policy.load().policy.clone()
    }
}
