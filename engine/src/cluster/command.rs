//! What the cluster's replicated log carries: definition changes as the
//! client asked for them, and what applying one did.
//!
//! An entry is the *request* (declare this queue with these arguments),
//! not its result: every node applies it to the same definitions in the
//! same order, so every node reaches the same verdict (a 406 for an
//! inequivalent redeclaration is a 406 everywhere) without a second round.
//! Applying must therefore depend on nothing but the definitions and the
//! entry: no clocks, no node-local state.

use serde::{Deserialize, Serialize};

use crate::store::definitions::{BindingDefinition, ExchangeDefinition, QueueDefinition};

/// One replicated definition change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// `exchange.declare`.
    DeclareExchange {
        /// Its vhost.
        vhost: String,
        /// The exchange.
        exchange: ExchangeDefinition,
        /// Survives a restart of the whole cluster.
        durable: bool,
    },
    /// `exchange.delete`.
    DeleteExchange {
        /// Its vhost.
        vhost: String,
        /// Its name.
        name: String,
        /// Only if it has no bindings.
        if_unused: bool,
    },
    /// `queue.declare` of a shared (not exclusive) queue.
    DeclareQueue {
        /// Its vhost.
        vhost: String,
        /// The queue.
        queue: QueueDefinition,
        /// Survives a restart.
        durable: bool,
        /// The node it lives on (where its messages are kept); for a
        /// quorum queue, the member that leads it first.
        node: String,
        /// A quorum queue's members: the nodes that hold a replica.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<String>,
    },
    /// A quorum queue's group elected a new leader, which serves the queue
    /// from now on: every node sends its publishes and consumers there.
    QueueLeader {
        /// Its vhost.
        vhost: String,
        /// The queue.
        name: String,
        /// The leader's node.
        node: String,
        /// The group's Raft term the leader was elected in. An
        /// announcement committed late (its proposer retried while it
        /// still led) must not undo a later leader's: one of an older term
        /// than the record's is ignored.
        #[serde(default)]
        term: u64,
    },
    /// A quorum queue's members changed (an operator grew or shrank it):
    /// a node added opens its replica, a node removed deletes its own.
    QueueMembers {
        /// Its vhost.
        vhost: String,
        /// The queue.
        name: String,
        /// The members now.
        members: Vec<String>,
    },
    /// `queue.delete`.
    DeleteQueue {
        /// Its vhost.
        vhost: String,
        /// Its name.
        name: String,
        /// Only without consumers (checked on its node).
        if_unused: bool,
        /// Only when empty (checked on its node).
        if_empty: bool,
    },
    /// `queue.bind` / `exchange.bind`.
    Bind {
        /// Its vhost.
        vhost: String,
        /// The binding.
        binding: BindingDefinition,
    },
    /// `queue.unbind` / `exchange.unbind`.
    Unbind {
        /// Its vhost.
        vhost: String,
        /// The binding.
        binding: BindingDefinition,
    },
    /// A plugin file appeared on a node: every node compiles and validates
    /// this version and reports its verdict.
    StagePlugin {
        /// Plugin name (the exchange type, transform or filter name).
        name: String,
        /// Content hash of the bytes.
        hash: String,
        /// The module.
        #[serde(with = "base64_bytes")]
        bytes: Vec<u8>,
        /// The node whose folder it appeared in.
        from: String,
    },
    /// One node's verdict on a staged version.
    PluginVerdict {
        /// Plugin name.
        name: String,
        /// Version.
        hash: String,
        /// The node.
        node: String,
        /// Why it refused the version (none: ready).
        refused: Option<String>,
    },
    /// Serve a kept version on every node (an operator's rollback).
    ActivatePlugin {
        /// Plugin name.
        name: String,
        /// Version.
        hash: String,
    },
    /// Stage a candidate version of a serving plugin on every node, as a
    /// shadow or a canary (`author/candidate/`), in place of the one staged
    /// before, if any.
    StageCandidate {
        /// Plugin name.
        name: String,
        /// Content hash of the candidate.
        hash: String,
        /// The module.
        #[serde(with = "base64_bytes")]
        bytes: Vec<u8>,
        /// How it takes part.
        mode: crate::author::candidate::Mode,
        /// When it is promoted or rolled back on its own.
        policy: crate::author::candidate::Policy,
        /// The node that asked.
        from: String,
    },
    /// End the staged candidate `hash` on every node: promoted (it serves
    /// everywhere from this entry on), rolled back by a node's judge, or
    /// aborted by an operator or by a node that could not stage it.
    EndCandidate {
        /// Plugin name.
        name: String,
        /// The candidate's hash (a late end of an older one does nothing).
        hash: String,
        /// Promoted, rolled back or aborted.
        event: crate::author::candidate::Event,
        /// Why (a bound passed, who asked).
        reason: Option<String>,
        /// The node that proposed it.
        node: String,
    },
    /// Users, vhosts or permissions changed.
    Access {
        /// The change.
        change: crate::access::AccessChange,
    },
}

/// Plugin bytes as base64 in the log's JSON.
pub(crate) mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// Bytes as base64 in JSON (the definitions log, snapshots, the admin
/// API) and as raw bytes in a binary encoding (quorum queues' entries and
/// RPCs).
pub(crate) mod bytes_field {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            s.serialize_bytes(bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(serde::de::Error::custom)
        } else {
            struct Raw;
            impl<'de> serde::de::Visitor<'de> for Raw {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(v)
                }
            }
            d.deserialize_byte_buf(Raw)
        }
    }
}

impl Command {
    /// The vhost it changes (plugins belong to no vhost: "").
    pub fn vhost(&self) -> &str {
        match self {
            Command::DeclareExchange { vhost, .. }
            | Command::DeleteExchange { vhost, .. }
            | Command::DeclareQueue { vhost, .. }
            | Command::QueueLeader { vhost, .. }
            | Command::QueueMembers { vhost, .. }
            | Command::DeleteQueue { vhost, .. }
            | Command::Bind { vhost, .. }
            | Command::Unbind { vhost, .. } => vhost,
            Command::StagePlugin { .. }
            | Command::PluginVerdict { .. }
            | Command::ActivatePlugin { .. }
            | Command::StageCandidate { .. }
            | Command::EndCandidate { .. }
            | Command::Access { .. } => "",
        }
    }

    /// Whether it is about plugin versions rather than definitions.
    pub fn is_plugin(&self) -> bool {
        matches!(
            self,
            Command::StagePlugin { .. }
                | Command::PluginVerdict { .. }
                | Command::ActivatePlugin { .. }
                | Command::StageCandidate { .. }
                | Command::EndCandidate { .. }
        )
    }
}

/// What applying a [`Command`] did, the same on every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Done (also: nothing to do, as for a redeclaration).
    #[default]
    Done,
    /// Done; the number of messages it removed (`queue.delete-ok`).
    Removed(u32),
    /// Refused, with the AMQP reply code and text the client gets.
    Refused {
        /// AMQP reply code (404, 406, 403, ...).
        code: u16,
        /// Reply text.
        text: String,
    },
}
