//! Why a broker operation failed, as the reply code a RabbitMQ client
//! expects.

use crate::plugin::PluginError;

/// Why a broker operation failed. Each variant maps to the AMQP reply code a
/// RabbitMQ client expects.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No such exchange or queue (404).
    #[error("NOT_FOUND - no {kind} '{name}' in vhost '{vhost}'")]
    NotFound {
        /// "exchange" or "queue".
        kind: &'static str,
        /// Virtual host.
        vhost: String,
        /// Name.
        name: String,
    },
    /// Redeclared with other properties, bad arguments, in use, ... (406).
    #[error("PRECONDITION_FAILED - {0}")]
    PreconditionFailed(String),
    /// A reserved name or a permission missing (403).
    #[error("ACCESS_REFUSED - {0}")]
    AccessRefused(String),
    /// An exclusive queue of another connection (405).
    #[error("RESOURCE_LOCKED - {0}")]
    ResourceLocked(String),
    /// An exchange type no plugin provides (503, as RabbitMQ does).
    #[error(
        "COMMAND_INVALID - unknown exchange type '{kind}': no plugin of that name is serving (built-ins: direct, topic, fanout, headers; custom types are loaded from {plugin_dir})"
    )]
    UnknownExchangeType {
        /// The type asked for.
        kind: String,
        /// The plugin folder, so the user knows where to put it.
        plugin_dir: String,
    },
    /// A plugin refused or faulted while setting up (406).
    #[error("PRECONDITION_FAILED - {0}")]
    Plugin(#[from] PluginError),
    /// A name or key longer than the AMQP short string (255 bytes) that
    /// carries it to clients (406; the admin API answers 400). Only the
    /// admin API and definitions files can send one: AMQP's decoder cannot.
    #[error("PRECONDITION_FAILED - {what} of {len} bytes: AMQP allows at most 255")]
    TooLong {
        /// What it names: "exchange name", "routing key", ...
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A built-in plugin did not load (only when the broker starts).
    #[error("INTERNAL_ERROR - built-in plugin: {0}")]
    BuiltinPlugin(#[from] crate::plugin::LoadError),
    /// A queue that lives on another node of the cluster, for an operation
    /// that must run where the queue is (405).
    #[error("RESOURCE_LOCKED - queue '{name}' in vhost '{vhost}' lives on node '{node}'")]
    OnOtherNode {
        /// Virtual host.
        vhost: String,
        /// Queue name.
        name: String,
        /// The node it lives on.
        node: String,
    },
    /// The cluster could not commit a definition change (541, a connection
    /// error: the client reconnects, perhaps to a node of the majority).
    #[error("INTERNAL_ERROR - {0}")]
    Cluster(String),
    /// The message store failed (541, a connection error).
    #[error("INTERNAL_ERROR - message store: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl BrokerError {
    /// The AMQP 0-9-1 reply code.
    pub fn reply_code(&self) -> u16 {
        match self {
            BrokerError::NotFound { .. } => 404,
            BrokerError::PreconditionFailed(_)
            | BrokerError::Plugin(_)
            | BrokerError::TooLong { .. } => 406,
            BrokerError::AccessRefused(_) => 403,
            BrokerError::ResourceLocked(_) | BrokerError::OnOtherNode { .. } => 405,
            BrokerError::UnknownExchangeType { .. } => 503,
            BrokerError::Store(_) | BrokerError::BuiltinPlugin(_) | BrokerError::Cluster(_) => 541,
        }
    }
}

/// Refuse `s` if an AMQP short string cannot carry it: every name a client
/// is sent (in a delivery, a return, a declare-ok) must fit one.
pub fn check_short(what: &'static str, s: &str) -> Result<(), BrokerError> {
    match s.len() {
        0..=255 => Ok(()),
        len => Err(BrokerError::TooLong { what, len }),
    }
}
