//! The broker's configuration: one TOML file, every field optional, flags
//! override it. A bad file is refused with the line and column at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::access::User;
use crate::amqp::AmqpConfig;
use crate::plugin::{Compiler, PluginLimits};

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// AMQP listen address. Loopback by default: exposing the broker is a
    /// deliberate act.
    pub listen: SocketAddr,
    /// AMQPS (AMQP over TLS) listen address; needs `[tls]`. With `[tls]`
    /// and no address here, 127.0.0.1:5671.
    pub listen_tls: Option<SocketAddr>,
    /// Where durable state and the plugin compile cache live.
    pub data_dir: PathBuf,
    /// The watched plugin folder.
    pub plugin_dir: PathBuf,
    /// Plugin sandbox settings.
    pub plugins: PluginConfig,
    /// AMQP protocol settings.
    pub amqp: AmqpSection,
    /// Message store settings.
    pub store: StoreSection,
    /// The memory alarm.
    pub memory: MemorySection,
    /// Admin HTTP API and metrics.
    pub admin: crate::admin::AdminConfig,
    /// Users allowed to connect (default: guest/guest from loopback only):
    /// the initial state of the users the admin API changes at run time.
    pub users: Vec<User>,
    /// How the config file's users relate to those changed at run time.
    pub access: AccessSection,
    /// Certificates for AMQPS and the admin API's HTTPS.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Membership of a cluster (absent: this node runs alone).
    pub cluster: Option<crate::cluster::ClusterSettings>,
    /// The Redis-protocol (RESP) listener: off unless `listen` is set.
    pub redis: crate::resp::RedisSection,
}

/// `[amqp]`: protocol settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSection {
    /// Heartbeat proposed to clients, seconds (0 disables).
    pub heartbeat_secs: u16,
    /// Largest frame, bytes (at least 4096).
    pub frame_max: u32,
    /// Channels per connection.
    pub channel_max: u16,
    /// Largest message body accepted, bytes (RabbitMQ's `max_message_size`;
    /// at most 512 MiB, as there). A content header announcing more closes
    /// its channel with 406 before any of the body is buffered.
    #[serde(deserialize_with = "max_message_size")]
    pub max_message_size: u64,
    /// Per-queue flow watermark: when a queue holds more than this many
    /// bytes of ready messages, connections publishing into it stop being
    /// read until it drains to half.
    pub queue_flow_bytes: usize,
    /// RabbitMQ's `consumer_timeout`: a delivery not acknowledged within
    /// this many milliseconds closes its channel with 406 and is requeued
    /// (0: never). A queue's `x-consumer-timeout` or a policy's
    /// `consumer-timeout` sets its own.
    pub consumer_timeout_ms: u64,
}

impl Default for AmqpSection {
    fn default() -> Self {
        let d = AmqpConfig::default();
        AmqpSection {
            heartbeat_secs: d.heartbeat,
            frame_max: d.frame_max,
            channel_max: d.channel_max,
            max_message_size: d.max_message_size,
            queue_flow_bytes: crate::broker::DEFAULT_QUEUE_FLOW_BYTES,
            consumer_timeout_ms: d.consumer_timeout.map_or(0, |t| t.as_millis() as u64),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:5672".parse().unwrap(),
            data_dir: PathBuf::from("./data"),
            plugin_dir: PathBuf::from("./plugins"),
            plugins: PluginConfig::default(),
            amqp: AmqpSection::default(),
            store: StoreSection::default(),
            memory: MemorySection::default(),
            admin: crate::admin::AdminConfig::default(),
            users: vec![User::guest()],
            access: AccessSection::default(),
            listen_tls: None,
            tls: None,
            cluster: None,
            redis: Default::default(),
        }
    }
}

/// `[access]`: users at run time.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    /// `seed` (default): the `[[users]]` are the initial state, laid down
    /// at the first start; users, vhosts and permissions are then the
    /// operator's (admin API, `wasmq users`), kept across restarts, as
    /// RabbitMQ's. `enforce`: the `[[users]]` are laid over the kept state
    /// at every start and cannot be changed at run time (a deployment
    /// whose config file is its source of truth); other users still can.
    pub config_users: ConfigUsers,
}

/// `[access] config_users`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigUsers {
    /// The initial state only.
    #[default]
    Seed,
    /// Authoritative at every start.
    Enforce,
}

/// `[store]`: the message store under `data_dir`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Persist durable definitions and persistent messages. Off, every
    /// queue lives in memory only (and confirms do not wait for disk).
    pub enabled: bool,
    /// Size of a queue log's segment files, MiB (1 to 1024). A segment is
    /// deleted once all its messages are acked. The log addresses a record
    /// by a 32-bit offset in its segment: a segment of at most 1 GiB plus
    /// a last message of at most 512 MiB stays within it.
    #[serde(deserialize_with = "segment_mib")]
    pub segment_mib: u64,
    /// Free space on the data folder's filesystem below which publishing
    /// connections are blocked (connection.blocked), MiB; 0 disables.
    pub disk_free_limit_mib: u64,
    /// Shortest time between the starts of two group-commit rounds, µs:
    /// fewer, fuller rounds cost the machine less CPU; a confirm waits at
    /// most this much longer. 0: a round starts as soon as there is work.
    pub group_commit_interval_us: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            enabled: true,
            segment_mib: crate::store::DEFAULT_SEGMENT_BYTES >> 20,
            disk_free_limit_mib: 50,
            group_commit_interval_us: crate::store::DEFAULT_COMMIT_INTERVAL.as_micros() as u64,
        }
    }
}

impl StoreSection {
    /// The store's options.
    pub fn options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            segment_bytes: self.segment_mib.clamp(1, 1024) << 20,
            commit_interval: Duration::from_micros(self.group_commit_interval_us),
        }
    }
}

/// `[memory]`: the memory alarm (RabbitMQ's `vm_memory_high_watermark`).
/// Above the watermark, publishing connections are blocked
/// (connection.blocked) until the broker's resident memory falls below it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySection {
    /// The watermark as a fraction of the memory available (the cgroup's
    /// limit in a container, else the machine's); 0 disables the alarm.
    #[serde(deserialize_with = "fraction")]
    pub high_watermark: f64,
    /// The watermark in MiB; when set (non-zero) it replaces the fraction.
    pub high_watermark_mib: u64,
}

impl Default for MemorySection {
    fn default() -> Self {
        MemorySection {
            high_watermark: 0.4,
            high_watermark_mib: 0,
        }
    }
}

/// Largest `amqp.max_message_size`, RabbitMQ's ceiling too.
pub const MAX_MESSAGE_SIZE_CEILING: u64 = 512 << 20;

/// A number in `range` (the error points at the line).
fn bounded<'de, D: serde::Deserializer<'de>>(
    d: D,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, D::Error> {
    let x = u64::deserialize(d)?;
    if range.contains(&x) {
        Ok(x)
    } else {
        Err(serde::de::Error::custom(format!(
            "{x} is out of range: {} to {}",
            range.start(),
            range.end()
        )))
    }
}

fn max_message_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    bounded(d, 1..=MAX_MESSAGE_SIZE_CEILING)
}

fn segment_mib<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    bounded(d, 1..=1024)
}

/// A number from 0 to 1 (the error points at the line).
fn fraction<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let x = f64::deserialize(d)?;
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(serde::de::Error::custom(format!(
            "{x} is not a fraction between 0 and 1"
        )))
    }
}

impl MemorySection {
    /// The watermark in bytes, `None` when the alarm is off or the
    /// available memory cannot be read.
    pub fn watermark_bytes(&self) -> Option<u64> {
        if self.high_watermark_mib > 0 {
            return Some(self.high_watermark_mib << 20);
        }
        if self.high_watermark <= 0.0 {
            return None;
        }
        crate::alarm::memory_total().map(|total| (total as f64 * self.high_watermark) as u64)
    }
}

/// `[plugins]`: bounds on every plugin instance and call.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Deadline of one call into a plugin for a message, in milliseconds.
    pub call_deadline_ms: u64,
    /// Deadline of the set-up calls (instantiate, init, bind, unbind), ms.
    pub setup_deadline_ms: u64,
    /// Memory cap of one plugin instance, in MiB.
    pub memory_limit_mib: u64,
    /// Instances per exchange at most (built when publishers contend);
    /// default: the number of cores, at most 8.
    pub instances_per_exchange: Option<usize>,
    /// Consecutive faults that open an exchange's circuit.
    pub circuit_threshold: u32,
    /// How long an open circuit refuses calls, in milliseconds.
    pub circuit_cooldown_ms: u64,
    /// Watch the plugin folder and hot-swap changed files.
    pub watch: bool,
    /// Cache compiled plugins under `data_dir/plugin-cache`.
    pub compile_cache: bool,
    /// Let a plugin file named like a built-in (`direct`, `topic`,
    /// `fanout`, `headers`) replace that exchange type for user-declared
    /// exchanges. Off, such a file is rejected; an admin upload can still
    /// ask for one replacement with `?override_builtin=true`. The
    /// predeclared `amq.*` exchanges keep the built-in either way.
    pub override_builtins: bool,
    /// `"tiered"`: a new version serves on Winch's baseline code while
    /// Cranelift optimizes it in the background; `"optimizing"`: it serves
    /// once Cranelift is done.
    pub compiler: Compiler,
}

impl Default for PluginConfig {
    fn default() -> Self {
        let d = PluginLimits::default();
        PluginConfig {
            call_deadline_ms: d.deadline.as_millis() as u64,
            setup_deadline_ms: d.setup_deadline.as_millis() as u64,
            memory_limit_mib: (d.memory >> 20) as u64,
            instances_per_exchange: None,
            circuit_threshold: d.circuit_threshold,
            circuit_cooldown_ms: d.circuit_cooldown.as_millis() as u64,
            watch: true,
            compile_cache: true,
            override_builtins: false,
            compiler: Compiler::default(),
        }
    }
}

impl PluginConfig {
    /// The limits the plugin host enforces.
    pub fn limits(&self) -> PluginLimits {
        let d = PluginLimits::default();
        PluginLimits {
            deadline: Duration::from_millis(self.call_deadline_ms.max(1)),
            setup_deadline: Duration::from_millis(self.setup_deadline_ms.max(1)),
            memory: (self.memory_limit_mib.max(1) as usize) << 20,
            instances: self.instances_per_exchange.unwrap_or(d.instances).max(1),
            circuit_threshold: self.circuit_threshold.max(1),
            circuit_cooldown: Duration::from_millis(self.circuit_cooldown_ms),
            module: d.module,
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a wrong key or value.
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Settings that are valid one by one but not together.
    #[error("config file {path}: {message}")]
    Conflict {
        /// The file.
        path: String,
        /// What does not fit.
        message: String,
    },
}

impl Config {
    /// Read and parse a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = Self::parse_toml(text, origin)?;
        config.check_in(origin)?;
        Ok(config)
    }

    /// Where AMQPS listens, if it does.
    pub fn amqps_listen(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|_| {
            self.listen_tls
                .unwrap_or_else(|| "127.0.0.1:5671".parse().expect("address"))
        })
    }

    /// Check settings that need one another (after flags changed some).
    pub fn check(&self) -> Result<(), ConfigError> {
        self.check_in("(with command-line flags)")
    }

    fn check_in(&self, origin: &str) -> Result<(), ConfigError> {
        self.dependencies()
            .map_err(|message| ConfigError::Conflict {
                path: origin.to_owned(),
                message,
            })
    }

    fn dependencies(&self) -> Result<(), String> {
        if let Some(c) = &self.cluster {
            c.check()?;
        }
        if self.tls.is_none() {
            if self.listen_tls.is_some() {
                return Err("`listen_tls` needs a [tls] section (cert_file, key_file)".into());
            }
            if self.admin.tls {
                return Err("`admin.tls` needs a [tls] section (cert_file, key_file)".into());
            }
            if self.redis.listen_tls.is_some() {
                return Err(
                    "`redis.listen_tls` needs a [tls] section (cert_file, key_file)".into(),
                );
            }
        }
        Ok(())
    }

    fn parse_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            // The line itself, so that the key at fault is in the message
            // even when toml's message names only the expected type.
            let source = text.lines().nth(line - 1).unwrap_or("").trim();
            ConfigError::Invalid {
                path: origin.to_owned(),
                line,
                column,
                message: format!("{} (`{source}`)", e.message().trim()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_bounded() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5672");
        assert_eq!(c.plugins.limits().memory, 16 << 20);
        assert_eq!(c.plugins.limits().deadline, Duration::from_millis(5));
    }

    #[test]
    fn sizes_out_of_range_name_their_line() {
        for (text, line) in [
            ("[store]\nsegment_mib = 4096\n", 2),
            ("[store]\nsegment_mib = 0\n", 2),
            ("\n[amqp]\nmax_message_size = 1073741824\n", 3),
        ] {
            let e = Config::parse(text, "t").unwrap_err().to_string();
            assert!(
                e.contains(&format!("line {line}")) && e.contains("out of range"),
                "{e}"
            );
        }
        let c = Config::parse("[amqp]\nmax_message_size = 1024\n", "t").unwrap();
        assert_eq!(c.amqp.max_message_size, 1024);
        assert_eq!(
            Config::parse("", "t").unwrap().amqp.max_message_size,
            128 << 20
        );
    }

    #[test]
    fn fields_parse() {
        let c = Config::parse(
            "listen = \"127.0.0.1:5999\"\nplugin_dir = \"p\"\n[plugins]\ncall_deadline_ms = 20\nmemory_limit_mib = 8\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 5999);
        assert_eq!(c.plugin_dir, PathBuf::from("p"));
        assert_eq!(c.plugins.limits().deadline, Duration::from_millis(20));
        assert_eq!(c.plugins.limits().memory, 8 << 20);
    }

    #[test]
    fn the_memory_watermark_is_a_fraction_or_mib() {
        let c = Config::parse("[memory]\nhigh_watermark_mib = 512\n", "t").unwrap();
        assert_eq!(c.memory.watermark_bytes(), Some(512 << 20));
        let c = Config::parse("[memory]\nhigh_watermark = 0\n", "t").unwrap();
        assert_eq!(c.memory.watermark_bytes(), None);
        let total = crate::alarm::memory_total().unwrap();
        let default = Config::default().memory.watermark_bytes().unwrap();
        assert!(default < total && default > total / 3);
        let err = Config::parse("[memory]\n\nhigh_watermark = 40\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("between 0 and 1"),
            "{err}"
        );
    }

    #[test]
    fn users_and_amqp_settings() {
        let c = Config::parse(
            "[amqp]\nheartbeat_secs = 10\n[[users]]\nname = \"app\"\npassword = \"s3cret\"\nvhosts = [\"/\", \"prod\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.amqp.heartbeat_secs, 10);
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].vhosts, vec!["/".to_string(), "prod".to_string()]);
        assert!(!c.users[0].loopback_only);
        assert!(
            Config::default().users[0].loopback_only,
            "guest is loopback-only by default"
        );
    }

    #[test]
    fn tls_settings_and_their_dependencies() {
        let c = Config::parse(
            "[tls]\ncert_file = \"s.pem\"\nkey_file = \"s.key\"\nca_file = \"ca.pem\"\nfail_if_no_peer_cert = true\n",
            "t",
        )
        .unwrap();
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("s.pem"));
        assert!(tls.fail_if_no_peer_cert && tls.watch);
        assert_eq!(c.amqps_listen().unwrap().to_string(), "127.0.0.1:5671");
        assert_eq!(Config::parse("", "t").unwrap().amqps_listen(), None);
        for text in ["listen_tls = \"127.0.0.1:5671\"\n", "[admin]\ntls = true\n"] {
            let e = Config::parse(text, "t").unwrap_err().to_string();
            assert!(e.contains("needs a [tls] section"), "{e}");
        }
        let e = Config::parse("[tls]\ncert_file = \"s.pem\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_file") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn a_type_error_shows_the_key() {
        let e = Config::parse("[plugins]\ncall_deadline_ms = \"fast\"\n", "wasmq.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("call_deadline_ms"), "{e}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = Config::parse(
            "listen = \"127.0.0.1:1\"\n\n[plugins]\nmemory_limit = 3\n",
            "wasmq.toml",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("wasmq.toml, line 4"), "{text}");
        assert!(text.contains("memory_limit"), "{text}");
        let e = Config::parse("listen = \"not an address\"\n", "w")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
