//! The `[cluster]` section of the config file.
//!
//! ```toml
//! [cluster]
//! name = "rabbit-1"                  # unique, stable: the node's identity
//! listen = "127.0.0.1:25672"         # where the other nodes connect
//! advertise = "10.0.0.5:25672"       # how they reach it, if not `listen`
//! peers = ["127.0.0.1:25673"]        # nodes to join through
//! peer_dns = "wasmq-headless.ns.svc" # or: a DNS name whose records are the peers
//! secret_file = "/etc/wasmq/cookie"  # or `secret`: every node presents it
//! ```
//!
//! A node whose data folder holds no cluster state asks its peers to let
//! it join. If none answers and it has no peers (or its name is the first
//! of the `bootstrap` list), it starts a cluster of its own.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default port of the node-to-node listener (RabbitMQ's distribution
/// port).
pub const DEFAULT_CLUSTER_PORT: u16 = 25672;

/// The shortest shared secret accepted.
const MIN_SECRET: usize = 16;

/// The `[cluster]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// This node's name: unique in the cluster and stable across restarts
    /// (its Raft id is derived from it).
    pub name: String,
    /// Where the node-to-node listener binds.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The address other nodes dial (default: `listen`). Needed when
    /// `listen` is a wildcard.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Addresses of nodes to join through.
    #[serde(default)]
    pub peers: Vec<String>,
    /// A DNS name whose A/AAAA records are the peers (a Kubernetes
    /// headless Service), each at `peer_port`.
    #[serde(default)]
    pub peer_dns: Option<String>,
    /// Port of the peers found through `peer_dns`.
    #[serde(default = "default_port")]
    pub peer_port: u16,
    /// The shared secret every node must prove it holds.
    #[serde(default)]
    pub secret: Option<String>,
    /// Or: a file holding it (a Kubernetes Secret mounted as a file).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// With no cluster state, start a new cluster when no peer answers.
    /// Default: only a node with no peers configured does; a node with
    /// peers waits for one of them (so a restarted or slow node never
    /// splits off a cluster of its own).
    #[serde(default)]
    pub bootstrap: Option<bool>,
    /// Or: the name of the one node that starts the cluster when no peer
    /// answers (`wasmq-0` of a StatefulSet, which Kubernetes starts first).
    #[serde(default)]
    pub bootstrap_node: Option<String>,
    /// Raft heartbeat interval, ms.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Quorum queue groups without heartbeats or timers of their own,
    /// elected from the node's view of its links (`docs/cluster.md`,
    /// "What a quorum queue costs"): idle queues then cost next to
    /// nothing. On by default; `false` gives every group openraft's own
    /// heartbeats and election timers.
    #[serde(default = "default_quiescent")]
    pub quiescent_quorum: bool,
    /// Raft election timeout, ms: drawn between this and a quarter more
    /// ([`ClusterSettings::election_range`]); a leader gone silent is
    /// replaced after 2.25 to 2.5 times this.
    #[serde(default = "default_election")]
    pub election_timeout_ms: u64,
    /// How long a definition change waits to be committed before the
    /// client gets an error.
    #[serde(default = "default_commit_timeout")]
    pub commit_timeout_ms: u64,
    /// Links between nodes over TLS with the `[tls]` certificate: each node
    /// presents it and verifies its peer's against `[tls] ca_file` (which
    /// is then required), on top of the secret's proof.
    #[serde(default)]
    pub tls: bool,
}

fn default_listen() -> String {
    format!("127.0.0.1:{DEFAULT_CLUSTER_PORT}")
}
fn default_port() -> u16 {
    DEFAULT_CLUSTER_PORT
}
fn default_quiescent() -> bool {
    true
}
fn default_heartbeat() -> u64 {
    200
}
fn default_election() -> u64 {
    600
}
fn default_commit_timeout() -> u64 {
    5000
}

impl ClusterSettings {
    /// The address other nodes dial.
    pub fn advertised(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    /// The shared secret, read from `secret_file` if given.
    pub fn load_secret(&self) -> Result<Vec<u8>, String> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => {
                return Err("[cluster]: give `secret` or `secret_file`, not both".into());
            }
            (Some(s), None) => s.trim().as_bytes().to_vec(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(|s| s.trim().as_bytes().to_vec())
                .map_err(|e| format!("[cluster] secret_file {}: {e}", f.display()))?,
            (None, None) => {
                return Err(
                    "[cluster] needs `secret` or `secret_file`: nodes prove they belong with it"
                        .into(),
                );
            }
        };
        if secret.len() < MIN_SECRET {
            return Err(format!(
                "[cluster] secret: at least {MIN_SECRET} characters"
            ));
        }
        Ok(secret)
    }

    /// Check what can be checked without the network or the secret file
    /// (which may exist only where the node runs).
    pub fn check(&self) -> Result<(), String> {
        if !super::link::valid_node_name(&self.name) {
            return Err(
                "[cluster] name: 1 to 255 of letters, digits, '-', '_', '.', ':' and '@'".into(),
            );
        }
        match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => {
                return Err("[cluster]: give `secret` or `secret_file`, not both".into());
            }
            (None, None) => {
                return Err(
                    "[cluster] needs `secret` or `secret_file`: nodes prove they belong with it"
                        .into(),
                );
            }
            (Some(s), None) if s.trim().len() < MIN_SECRET => {
                return Err(format!(
                    "[cluster] secret: at least {MIN_SECRET} characters"
                ));
            }
            _ => {}
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms < 3 * self.heartbeat_ms {
            return Err(
                "[cluster] election_timeout_ms must be at least three heartbeats (heartbeat_ms)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether to start a new cluster when no peer answers.
    pub fn may_bootstrap(&self) -> bool {
        self.bootstrap.unwrap_or(match &self.bootstrap_node {
            Some(node) => *node == self.name,
            None => self.peers.is_empty() && self.peer_dns.is_none(),
        })
    }

    /// The election timeout's range, ms: `election_timeout_ms` to a
    /// quarter more. openraft's follower, having heard from a leader,
    /// waits out the leader's lease (the range's top) and then a draw from
    /// the range before it asks for votes, and checks on a tick of 1.5
    /// heartbeats: a silent leader is replaced after 2.25 to 2.5 election
    /// timeouts plus up to a tick (1.35 to 1.8 s at the defaults). With
    /// twice the timeout as the top, as before, that was 3 to 4.4 s. The
    /// range stays wide enough to part two candidates: a vote takes a
    /// round trip of a millisecond or less, the range is 150 ms.
    pub fn election_range(&self) -> (u64, u64) {
        let min = self.election_timeout_ms;
        (min, min + min / 4)
    }

    /// Raft's timing.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// How long a change may wait to commit.
    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> ClusterSettings {
        toml::from_str(&format!("name = 'wasmq-1'\n{extra}")).unwrap()
    }

    #[test]
    fn the_secret_is_required_long_and_read_only_at_start() {
        assert!(parse("").check().unwrap_err().contains("secret"));
        assert!(
            parse("secret = 'short'")
                .check()
                .unwrap_err()
                .contains("16")
        );
        // A secret file is checked where the node runs, not where the
        // config is parsed (a Kubernetes manifest's test, say).
        let s = parse("secret_file = '/nonexistent/cookie'");
        assert!(s.check().is_ok());
        assert!(s.load_secret().unwrap_err().contains("/nonexistent/cookie"));
        assert!(
            parse("secret = 'long enough secret!'\nsecret_file = 'x'")
                .check()
                .is_err()
        );
    }

    #[test]
    fn only_the_named_or_peerless_node_bootstraps() {
        let secret = "secret = 'long enough secret!'\n";
        assert!(
            parse(secret).may_bootstrap(),
            "no peers: a cluster of its own"
        );
        assert!(!parse(&format!("{secret}peers = ['10.0.0.1:25672']")).may_bootstrap());
        assert!(
            !parse(&format!(
                "{secret}peer_dns = 'svc'\nbootstrap_node = 'wasmq-0'"
            ))
            .may_bootstrap()
        );
        assert!(
            parse(&format!(
                "{secret}peer_dns = 'svc'\nbootstrap_node = 'wasmq-1'"
            ))
            .may_bootstrap()
        );
        assert!(parse(&format!("{secret}peers = ['x:1']\nbootstrap = true")).may_bootstrap());
    }
}
