//! Policies laid over the queues and exchanges of the running broker: at
//! declare (and when a quorum queue's new leader builds its live queue),
//! and over every existing one of a vhost when its policies change.

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::{Broker, Exchange, QueueLimits};
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
        tracing::info!(vhost = %crate::untrusted::text(vhost), changed, "policies applied");
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
        let declared = x
            .arguments
            .inner()
            .get(super::ARG_ALTERNATE_EXCHANGE)
            .and_then(|v| match v {
                amq_protocol::types::AMQPValue::LongString(s) => Some(s.to_string()),
                amq_protocol::types::AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            });
        x.alternate_exchange.store(
            applied
                .alternate_exchange(declared.as_deref())
                .map(Arc::new),
        );
        x.policy.store(Arc::new(applied));
        true
    }
}

impl Exchange {
    /// The name of the policy that applies to it.
    pub fn policy_name(&self) -> Option<String> {
        self.policy.load().policy.clone()
    }
}
