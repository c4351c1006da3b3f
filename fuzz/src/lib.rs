//! Fuzzing wasmq's AMQP input on the stable toolchain.
//!
//! cargo-fuzz needs nightly, so the targets ([`targets`]) are plain
//! functions of one input, driven here by a seeded, structure-aware
//! generator ([`input`]) instead of libFuzzer's coverage feedback: every
//! case is a function of `(seed, index)`, so any failure is replayed from
//! two numbers. The test suite runs a short pass of every target
//! (`fuzz/tests/fuzz.rs`); `wasmq-fuzz run` runs a long one, supervising
//! its cases in child processes so that even an abort (a stack overflow)
//! is caught, narrowed down to the one input, and saved.
//!
//! Run a long campaign (see `docs/fuzzing.md` for what one found):
//!
//! ```text
//! cargo run --release -p wasmq-fuzz -- run --target all --seconds 3600
//! ```

#![forbid(unsafe_code)]

pub mod input;
pub mod targets;

use std::fmt;

/// What a target is fed, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The frame decoder, over generated and mutated frame streams.
    Frames,
    /// Field tables, properties and method payloads.
    Codecs,
    /// The message traffic between cluster nodes (forwarded publishes,
    /// deliveries, acks), as a node's link hands its frames over.
    Traffic,
    /// A connection to the real broker, before login.
    Handshake,
    /// A connection to the real broker, after a valid login.
    Connection,
    /// The cluster port of a real node, by a peer that holds no secret.
    ClusterHello,
    /// The admin port of the real broker, before any login.
    Admin,
    /// The RESP request parser, fed a stream whole and in two parts.
    RespParser,
    /// The Redis front end of the real broker, logged in or not.
    Resp,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 9] = [
        Target::Frames,
        Target::Codecs,
        Target::Traffic,
        Target::Handshake,
        Target::Connection,
        Target::ClusterHello,
        Target::Admin,
        Target::RespParser,
        Target::Resp,
    ];

    /// The target of this name.
    pub fn from_name(name: &str) -> Option<Target> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Frames => "frames",
            Target::Codecs => "codecs",
            Target::Traffic => "traffic",
            Target::Handshake => "handshake",
            Target::Connection => "connection",
            Target::ClusterHello => "cluster-hello",
            Target::Admin => "admin",
            Target::RespParser => "resp-parser",
            Target::Resp => "resp",
        }
    }

    /// Whether its cases need a running broker.
    pub fn needs_broker(self) -> bool {
        matches!(
            self,
            Target::Handshake
                | Target::Connection
                | Target::ClusterHello
                | Target::Admin
                | Target::Resp
        )
    }

    /// The input of case `index` of a run seeded `seed`.
    pub fn input(self, seed: u64, index: u64) -> Vec<u8> {
        let mut g = input::Gen::new(input::case_seed(seed, index));
        let mut input = match self {
            Target::Frames | Target::Connection => g.frames(),
            Target::Handshake => g.handshake(),
            Target::ClusterHello => g.cluster_hello(),
            Target::Admin => g.http_request(),
            Target::Traffic => g.traffic(),
            Target::RespParser | Target::Resp => g.resp(),
            Target::Codecs => match g.rng().below(3) {
                0 => g.table(4),
                1 => g.properties(),
                _ => {
                    let f = g.frames();
                    // The payload of the first frame.
                    let len = f
                        .get(3..7)
                        .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()) as usize);
                    f.get(7..7 + len).unwrap_or_default().to_vec()
                }
            },
        };
        // Half the cases are mutated; the rest stay well-formed enough to
        // reach deep into the broker.
        if g.rng().one_in(2) {
            g.mutate(&mut input);
        }
        input
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs cases of one target, holding the broker the connection targets
/// share.
#[derive(Debug)]
pub struct Runner {
    target: Target,
    broker: Option<targets::Broker>,
    /// How the broker ended the connection cases: reply code (0: the socket
    /// closed without a connection.close) and how many.
    outcomes: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

/// A case whose outcome was not one the broker may give.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The target.
    pub target: Target,
    /// The run's seed.
    pub seed: u64,
    /// The case's index.
    pub index: u64,
    /// What went wrong.
    pub what: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} seed {} case {}: {} (replay: wasmq-fuzz replay --target {} --seed {} --case {})",
            self.target, self.seed, self.index, self.what, self.target, self.seed, self.index
        )
    }
}

impl Runner {
    /// A runner for `target` (starting a broker if it needs one).
    pub fn new(target: Target) -> anyhow::Result<Self> {
        let ports = match target {
            Target::ClusterHello => targets::Ports::Cluster,
            Target::Admin => targets::Ports::Admin,
            Target::Resp => targets::Ports::Redis,
            _ => targets::Ports::Amqp,
        };
        let broker = if target.needs_broker() {
            Some(targets::Broker::start_with(ports)?)
        } else {
            None
        };
        Ok(Runner {
            target,
            broker,
            outcomes: Default::default(),
        })
    }

    /// Run case `index` of `seed`. A panic in a codec target is caught and
    /// reported as a failure; so is any misbehaviour of the broker.
    pub fn case(&self, seed: u64, index: u64) -> Result<(), Failure> {
        let input = self.target.input(seed, index);
        let fail = |what: String| Failure {
            target: self.target,
            seed,
            index,
            what,
        };
        let outcome = match (self.target, &self.broker) {
            (Target::Frames, _) => caught(|| targets::frames(&input)),
            (Target::Codecs, _) => caught(|| targets::codecs(&input)),
            (Target::Traffic, _) => caught(|| targets::traffic(&input)),
            (Target::RespParser, _) => caught(|| targets::resp_parser(&input)),
            (Target::Resp, Some(b)) => b.resp(&input),
            (Target::Handshake | Target::Connection, Some(b)) => b
                .connection(&input, self.target == Target::Connection)
                .map(|code| {
                    *self
                        .outcomes
                        .lock()
                        .unwrap()
                        .entry(code.unwrap_or(0))
                        .or_default() += 1;
                }),
            (Target::ClusterHello, Some(b)) => b.cluster_peer(&input),
            (Target::Admin, Some(b)) => b.admin_request(&input).map(|codes| {
                let mut o = self.outcomes.lock().unwrap();
                for c in codes {
                    *o.entry(c).or_default() += 1;
                }
            }),
            _ => unreachable!("a broker target has its broker"),
        };
        outcome.map_err(fail)?;
        if let Some(b) = &self.broker
            && self.target == Target::Admin
            && index % 100 == 99
        {
            b.check_admin().map_err(fail)?;
        }
        // Every so often: the broker still serves, and the cases' queues
        // and messages go, so that a long run measures the broker, not
        // what the cases piled up.
        if let Some(b) = &self.broker
            && index % 100 == 99
        {
            b.check_serving().map_err(fail)?;
            b.reset();
        }
        Ok(())
    }
}

impl Runner {
    /// How the connection cases ended so far, as `code: count` pairs
    /// (code 0: the socket closed without a connection.close).
    pub fn outcomes(&self) -> String {
        let o = self.outcomes.lock().unwrap();
        o.iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn caught(f: impl FnOnce()) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}
