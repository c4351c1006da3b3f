//! `wasmq plugin test`: run a plugin version offline against captured
//! messages, and compare it with another version.
//!
//! No model of the broker: each version gets a broker of its own, in this
//! process, with no listener and no store. The version is installed under
//! its plugin name (beside the built-ins and any other plugins the
//! definitions need), the exchange definitions are imported as an
//! operator's import would, and each message is traced through its
//! exchange with [`Broker::trace`], the publish path itself, enqueueing
//! nothing. What a message *decided* is the queues it reached, what a
//! transform made of it, and any fault; two versions disagree on a message
//! when those differ.

use std::path::Path;
use std::sync::Arc;

use crate::author::capture::Captured;
use crate::author::trace::{Step, Trace};
use crate::broker::{Broker, BrokerError};
use crate::plugin::{Compiler, PluginHost};
use crate::store::definitions::Definitions;

/// Why a version could not be tested.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The plugin host could not start.
    #[error("plugin host: {0}")]
    Host(#[from] crate::plugin::HostError),
    /// The broker could not start.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    /// The version (or another plugin) did not load.
    #[error("plugin '{name}': {reason}")]
    Plugin {
        /// The plugin.
        name: String,
        /// Why.
        reason: String,
    },
    /// The definitions did not import.
    #[error("definitions: {0}")]
    Definitions(String),
}

/// A broker holding one version of a plugin and the exchanges to test it on.
pub struct Bench {
    broker: Arc<Broker>,
    /// The version's content hash.
    pub hash: String,
}

impl Bench {
    /// A broker with `bytes` serving as plugin `name`, the plugins in
    /// `plugin_dir` (if given) for the rest, and `defs` imported.
    pub fn new(
        name: &str,
        bytes: &[u8],
        defs: &Definitions,
        plugin_dir: Option<&Path>,
    ) -> Result<Bench, TestError> {
        let host = PluginHost::new(Default::default(), None, Compiler::Optimizing)?;
        let dir =
            plugin_dir.map_or_else(|| std::path::PathBuf::from("/nonexistent"), Path::to_owned);
        let broker = Broker::new(host, dir)?;
        if plugin_dir.is_some() {
            broker.load_plugin_dir();
        }
        let v = broker
            .install_plugin(name, bytes)
            .map_err(|reason| TestError::Plugin {
                name: name.to_owned(),
                reason,
            })?;
        broker
            .import_definitions(defs)
            .map_err(|e| TestError::Definitions(e.to_string()))?;
        Ok(Bench {
            broker,
            hash: v.hash.clone(),
        })
    }

    /// Trace `m` through its exchange (nothing is enqueued).
    pub fn decide(&self, m: &Captured) -> Result<Trace, String> {
        let name = if m.vhost.is_empty() { "/" } else { &m.vhost };
        let vhost = self
            .broker
            .vhost(name)
            .ok_or_else(|| format!("no vhost '{name}' in the definitions"))?;
        let x = vhost.exchange(&m.exchange).map_err(|e| e.to_string())?;
        Ok(self.broker.trace(&vhost, &x, m.message()?))
    }
}

/// What a trace decided, in one line: the queues reached, what each
/// transform made of the message, faults. Two versions agree on a message
/// when these are equal.
pub fn decision(t: &Trace) -> String {
    let mut queues: Vec<&str> = t
        .queues
        .iter()
        .chain(&t.forwarded)
        .map(String::as_str)
        .collect();
    queues.sort_unstable();
    let mut parts = vec![if queues.is_empty() {
        "no queue".to_owned()
    } else {
        format!("queues {}", queues.join(", "))
    }];
    for s in &t.steps {
        match s {
            Step::Transform {
                exchange, outcome, ..
            } if outcome != "keep" => parts.push(format!("transform at '{exchange}': {outcome}")),
            Step::Fault {
                exchange,
                plugin,
                fault,
            } => parts.push(format!("fault in {plugin} at '{exchange}': {fault}")),
            _ => {}
        }
    }
    parts.join("; ")
}

/// The steps of a trace that a version of `plugin` decided, in a line.
pub fn steps_of(t: &Trace, plugin: &str) -> String {
    let mut out = Vec::new();
    for s in &t.steps {
        match s {
            Step::Route {
                plugin: p,
                bindings,
                ..
            } if p == plugin => out.push(format!(
                "route: {}",
                bindings
                    .iter()
                    .map(|b| format!("{}:{}", b.destination_type, b.destination))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Step::Filter {
                plugin: p,
                destination,
                passed,
                ..
            } if p == plugin => out.push(format!(
                "filter to {destination}: {}",
                if *passed { "pass" } else { "drop" }
            )),
            Step::Transform {
                plugin: p, outcome, ..
            } if p == plugin => out.push(format!("transform: {outcome}")),
            _ => {}
        }
    }
    out.join("; ")
}

/// Read captured messages, one JSON object per line (blank lines and
/// lines starting with `#` skipped); the error names the line.
pub fn read_messages(text: &str) -> Result<Vec<Captured>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_versions_are_compared_message_by_message() {
        // The built-in topic and direct routers, as two "versions" of one
        // plugin: they agree on a literal key and disagree on a pattern.
        let defs = Definitions::from_rabbitmq(
            br#"{"exchanges": [{"name": "events", "vhost": "/", "type": "router"}],
                 "queues": [{"name": "all", "vhost": "/"}, {"name": "eu", "vhost": "/"}],
                 "bindings": [
                   {"source": "events", "vhost": "/", "destination": "all", "destination_type": "queue", "routing_key": "orders.#"},
                   {"source": "events", "vhost": "/", "destination": "eu", "destination_type": "queue", "routing_key": "orders.eu"}]}"#,
        )
        .unwrap();
        let bytes = |kind: &str| {
            crate::builtins::BUILTINS
                .iter()
                .find(|(n, _)| *n == kind)
                .unwrap()
                .1
        };
        let topic = Bench::new("router", bytes("topic"), &defs, None).unwrap();
        let direct = Bench::new("router", bytes("direct"), &defs, None).unwrap();
        let messages = read_messages(
            "# captured\n{\"exchange\": \"events\", \"routing_key\": \"orders.eu\"}\n\n{\"exchange\": \"events\", \"routing_key\": \"orders.us\"}\n",
        )
        .unwrap();
        let decided = |b: &Bench| -> Vec<String> {
            messages
                .iter()
                .map(|m| decision(&b.decide(m).unwrap()))
                .collect()
        };
        assert_eq!(decided(&topic), ["queues all, eu", "queues all"]);
        assert_eq!(decided(&direct), ["queues eu", "no queue"]);
        let t = topic.decide(&messages[0]).unwrap();
        assert_eq!(steps_of(&t, "router"), "route: queue:all, queue:eu");
        assert!(
            read_messages("{\"exchange\": 1}")
                .unwrap_err()
                .starts_with("line 1:")
        );
    }
}
