//! The integration suite: the real broker, real plugins and real clients.
//!
//! One test binary with a module per area rather than one binary per file:
//! each binary links the whole broker and wasmtime, so fifteen of them cost
//! fifteen links and over a gigabyte of disk for nothing. Run one area with
//! `cargo test -p wasmq-tests --test integration hot_swap::`.

mod access;
mod admin;
mod amqp;
mod builtins;
mod clients;
mod consumer_timeout;
mod dedup;
mod delayed;
mod delivery_limit;
mod deploy;
mod durability;
mod examples;
mod exchanges;
mod faults;
mod hostile;
mod hot_swap;
mod message_groups;
mod operators;
mod parity;
mod policies;
mod protocol;
mod queue_args;
mod redis;
mod single_node_quorum;
mod sns_filter;
mod streams;
mod tls;
mod ui;
