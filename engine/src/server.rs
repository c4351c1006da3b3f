//! A running broker: plugin host, broker core, plugin folder watcher, the
//! AMQP listener and (with `[tls]`) the AMQPS one, started from a [`Config`] and stopped by signal,
//! drain, wait. The `wasmq` binary and the integration tests start it the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alarm::{self, DISK_CHECK, MEMORY_CHECK, Resource};
use crate::amqp::{self, AmqpConfig};
use crate::plugin::{PluginHost, PluginWatcher};
use crate::store::Store;
use crate::tls::{Tls, TlsWatcher};
use crate::{Broker, Config};

/// How often queues are swept for expired messages.
const EXPIRY_SWEEP: Duration = Duration::from_millis(100);

/// Shortest time between two releases of free memory: a release
/// (`mi_collect`, and `malloc_trim` for what still comes from glibc) walks
/// the allocator's free lists, and threads that allocate meanwhile can
/// wait on it.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Whether resident memory is over `watermark`, as an alarm reason. Before
/// raising (and while raised) freed memory is handed back to the system
/// first (at most every [`TRIM_EVERY`], off the runtime's workers), so
/// that what the allocator keeps cached neither raises the alarm nor holds
/// it after queues drain.
async fn memory_over(
    watermark: u64,
    raised: bool,
    last_trim: &mut Option<std::time::Instant>,
) -> std::io::Result<Option<String>> {
    let mut used = alarm::memory_used()?;
    if (used > watermark || raised) && last_trim.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
        *last_trim = Some(std::time::Instant::now());
        let _ = tokio::task::spawn_blocking(alarm::release_free_memory).await;
        used = alarm::memory_used()?;
    }
    Ok((used > watermark).then(|| {
        format!(
            "memory use {} MiB above the watermark of {} MiB",
            used >> 20,
            watermark >> 20
        )
    }))
}

/// Expire messages on a timer: a queue nobody touches still expires.
fn spawn_expiry_sweep(tracker: &TaskTracker, broker: Arc<Broker>, shutdown: CancellationToken) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_SWEEP);
        loop {
            tokio::select! {
                _ = tick.tick() => broker.expire_queues(),
                () = shutdown.cancelled() => return,
            }
        }
    });
}

/// Judge staged canaries on a timer: promote or roll back on the policy.
/// Judging takes the plugin swap lock and may build instances, so it runs
/// on a blocking thread.
fn spawn_candidate_judge(tracker: &TaskTracker, broker: Arc<Broker>, shutdown: CancellationToken) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if broker.candidates().all().is_empty() {
                        continue;
                    }
                    let b = broker.clone();
                    let _ = tokio::task::spawn_blocking(move || b.judge_candidates()).await;
                }
                () = shutdown.cancelled() => return,
            }
        }
    });
}

/// The disk alarm: below `limit` free bytes in `dir`, publishers are
/// blocked before the disk fills (writes would fail and publishes be
/// nacked).
fn spawn_disk_alarm(
    tracker: &TaskTracker,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    dir: std::path::PathBuf,
    limit: u64,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(DISK_CHECK);
        loop {
            tokio::select! {
                _ = tick.tick() => match alarm::disk_free(&dir) {
                    Ok(free) => broker.set_alarm(Resource::Disk, (free < limit).then(|| format!(
                        "disk free {} MiB below the limit of {} MiB",
                        free >> 20, limit >> 20
                    ))),
                    Err(e) => tracing::warn!(dir = %dir.display(), "checking free disk space: {e}"),
                },
                () = shutdown.cancelled() => return,
            }
        }
    });
}

/// The memory alarm: above `watermark` resident bytes, publishers are
/// blocked while consumers drain the queues.
fn spawn_memory_alarm(
    tracker: &TaskTracker,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    watermark: u64,
) {
    tracing::info!(watermark_mib = watermark >> 20, "memory alarm armed");
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(MEMORY_CHECK);
        let mut last_trim = None;
        loop {
            tokio::select! {
                _ = tick.tick() => match memory_over(watermark, broker.alarm_raised(Resource::Memory), &mut last_trim).await {
                    Ok(over) => broker.set_alarm(Resource::Memory, over),
                    Err(e) => {
                        tracing::warn!("reading memory use: {e}; memory alarm off");
                        return;
                    }
                },
                () = shutdown.cancelled() => return,
            }
        }
    });
}

/// A started broker.
pub struct Server {
    /// The broker core.
    pub broker: Arc<Broker>,
    /// Where the AMQP listener is bound (useful with port 0).
    pub amqp_addr: SocketAddr,
    /// Where the AMQPS listener is bound, if TLS is configured.
    pub amqps_addr: Option<SocketAddr>,
    /// Where the admin API listens, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Where the RESP (Redis protocol) front end listens, if it does.
    pub redis_addr: Option<SocketAddr>,
    /// Where RESP over TLS listens, if it does.
    pub redis_tls_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    store: Option<Arc<Store>>,
    _watcher: Option<PluginWatcher>,
    _tls_watcher: Option<TlsWatcher>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("amqp_addr", &self.amqp_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Load plugins, start watching the plugin folder, bind the listener.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        // Certificates first: a bad file stops the start before recovery.
        let tls = match &config.tls {
            Some(settings) => Some(Tls::load(settings.clone()).context("loading the [tls] files")?),
            None => None,
        };
        let cache = config
            .plugins
            .compile_cache
            .then(|| config.data_dir.join("plugin-cache"));
        let host = PluginHost::new(config.plugins.limits(), cache, config.plugins.compiler)?;
        std::fs::create_dir_all(&config.plugin_dir)
            .with_context(|| format!("creating plugin folder {}", config.plugin_dir.display()))?;
        let broker = Broker::new(host, config.plugin_dir.clone())?;
        broker.set_queue_flow_bytes(config.amqp.queue_flow_bytes);
        broker.set_override_builtins(config.plugins.override_builtins);
        if config.cluster.is_none() {
            let loaded = broker.load_plugin_dir();
            tracing::info!(dir = %config.plugin_dir.display(), loaded, "plugin folder loaded");
        } else {
            // In a cluster the versions that serve are the cluster's: the
            // folder's files are offered to it once this node has joined.
            tracing::info!(dir = %config.plugin_dir.display(), "plugin folder will be offered to the cluster");
        }
        // Users, vhosts and permissions: kept by this node alone (seeded
        // from the config file), or the cluster's (this node's config
        // users serve until the cluster's directory arrives).
        let enforce = config.access.config_users == crate::config::ConfigUsers::Enforce;
        let config_users = crate::access::Directory::from_config(&config.users, enforce);
        if config.cluster.is_some() {
            broker.accounts().replace(config_users.clone());
            for v in config_users.vhosts.keys() {
                broker.add_vhost(v)?;
            }
        } else {
            if config.store.enabled {
                std::fs::create_dir_all(&config.data_dir).with_context(|| {
                    format!("creating data folder {}", config.data_dir.display())
                })?;
                broker
                    .accounts()
                    .open(config.data_dir.join("access.json"))
                    .map_err(|e| anyhow::anyhow!("reading the users: {e}"))?;
            } else {
                broker.accounts().replace(Default::default());
            }
            broker
                .seed_access(config_users.clone(), enforce)
                .context("laying down the config file's users")?;
        }
        // Durable state comes back after the plugins (exchanges need their
        // routing plugins) and before the listener opens.
        let store = match &config.cluster {
            Some(_) => Self::open_store_for_cluster(&config, &broker)?,
            None if config.store.enabled => Some(Self::recover(&config, &broker)?),
            None => None,
        };
        // What was declared before policies existed (the predeclared
        // exchanges) takes them too.
        for v in broker.vhosts() {
            broker.apply_policies(&v.name);
        }
        if let Some(settings) = &config.cluster {
            // Looked for before the node makes its folder.
            let standalone = store
                .as_ref()
                .and_then(|s| crate::nodes::definitions::Standalone::find(&config.data_dir, s));
            let applier = Arc::new(crate::broker::BrokerApplier::new(&broker, &settings.name));
            let node = crate::cluster::ClusterNode::start(
                settings.clone(),
                &config.data_dir.join("cluster"),
                applier,
                tls.clone(),
            )
            .await
            .context("starting the cluster node")?;
            // Messages for queues on other nodes, and consumers here of
            // them, travel over the same links as the cluster's calls.
            let remote = crate::nodes::remote::Remote::new(&broker, node.clone());
            node.set_traffic(remote.clone());
            broker.set_remote(remote);
            broker.set_cluster(node);
            tokio::spawn(broker.clone().offer_plugin_dir());
            let seeded = broker.clone().seed_cluster_access(config_users, enforce);
            match standalone {
                // The config users first: what the node had alone is laid
                // over them.
                Some(found) => {
                    let b = broker.clone();
                    tokio::spawn(async move {
                        seeded.await;
                        b.adopt_standalone(found).await;
                    });
                }
                None => {
                    tokio::spawn(seeded);
                }
            }
        }
        let watcher = if config.plugins.watch {
            Some(broker.watch_plugins()?)
        } else {
            None
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding AMQP listener {}", config.listen))?;
        let amqp_addr = listener.local_addr()?;
        tracing::info!(%amqp_addr, "AMQP listening");
        let tls_watcher = match &tls {
            Some(tls) if tls.settings().watch => Some(tls.watch()?),
            _ => None,
        };
        let amqps = match config.amqps_listen() {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding AMQPS listener {addr}"))?;
                tracing::info!(addr = %listener.local_addr()?, client_certificates = tls.as_ref().is_some_and(|t| t.verifies_clients()), "AMQPS listening");
                Some(listener)
            }
            None => None,
        };
        let amqps_addr = amqps.as_ref().map(TcpListener::local_addr).transpose()?;
        let amqp_config = Arc::new(AmqpConfig {
            heartbeat: config.amqp.heartbeat_secs,
            frame_max: config.amqp.frame_max,
            channel_max: config.amqp.channel_max,
            max_message_size: config.amqp.max_message_size,
            consumer_timeout: (config.amqp.consumer_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(config.amqp.consumer_timeout_ms)),
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        spawn_expiry_sweep(&tracker, broker.clone(), shutdown.clone());
        spawn_candidate_judge(&tracker, broker.clone(), shutdown.clone());
        if broker.cluster().is_some() {
            tracker.spawn(broker.clone().report_presence(shutdown.clone()));
            tracker.spawn(broker.clone().report_private(shutdown.clone()));
        }
        let admin_addr = if config.admin.enabled {
            let listener = TcpListener::bind(config.admin.listen)
                .await
                .with_context(|| format!("binding admin listener {}", config.admin.listen))?;
            let addr = listener.local_addr()?;
            tracing::info!(%addr, https = config.admin.tls, "admin API listening");
            tracker.spawn(crate::admin::serve(
                broker.clone(),
                config.admin.clone(),
                amqp_addr,
                listener,
                tls.clone().filter(|_| config.admin.tls),
                shutdown.clone(),
            ));
            Some(addr)
        } else {
            None
        };
        if config.store.enabled && config.store.disk_free_limit_mib > 0 {
            let limit = config.store.disk_free_limit_mib << 20;
            spawn_disk_alarm(
                &tracker,
                broker.clone(),
                shutdown.clone(),
                config.data_dir.clone(),
                limit,
            );
        }
        if let Some(watermark) = config.memory.watermark_bytes() {
            spawn_memory_alarm(&tracker, broker.clone(), shutdown.clone(), watermark);
        }
        let front = Arc::new(crate::resp::Front::new(
            config.redis.clone(),
            config.amqp.max_message_size as usize,
        ));
        let mut redis_addrs = [None, None];
        for (i, (addr, tls)) in [
            (config.redis.listen, None),
            (config.redis.listen_tls, tls.clone()),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(addr) = addr else { continue };
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the RESP (Redis protocol) listener {addr}"))?;
            let addr = listener.local_addr()?;
            tracing::info!(%addr, tls = tls.is_some(), vhost = %config.redis.vhost, "RESP (Redis protocol) listening");
            tracker.spawn(crate::resp::serve(
                broker.clone(),
                listener,
                front.clone(),
                tls,
                shutdown.clone(),
                tracker.clone(),
            ));
            redis_addrs[i] = Some(addr);
        }
        let [redis_addr, redis_tls_addr] = redis_addrs;
        if let Some(listener) = amqps {
            tracker.spawn(amqp::serve(
                broker.clone(),
                listener,
                tls.clone(),
                amqp_config.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        tracker.spawn(amqp::serve(
            broker.clone(),
            listener,
            None,
            amqp_config,
            shutdown.clone(),
            tracker.clone(),
        ));
        Ok(Server {
            broker,
            amqp_addr,
            amqps_addr,
            admin_addr,
            redis_addr,
            redis_tls_addr,
            shutdown,
            tracker,
            store,
            _watcher: watcher,
            _tls_watcher: tls_watcher,
        })
    }

    /// Open the message store and recover its definitions and messages.
    fn recover(config: &Config, broker: &Arc<Broker>) -> anyhow::Result<Arc<Store>> {
        let started = std::time::Instant::now();
        let store = Store::open(&config.data_dir, config.store.options()).with_context(|| {
            format!("opening the message store in {}", config.data_dir.display())
        })?;
        let r = broker.recover(store.clone())?;
        tracing::info!(
            dir = %config.data_dir.display(),
            exchanges = r.exchanges,
            queues = r.queues,
            bindings = r.bindings,
            messages = r.messages,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "message store recovered"
        );
        Ok(store)
    }

    /// In a cluster the definitions come from the Raft log: the store is
    /// attached without recovering them, and each durable queue recovers
    /// its messages when the cluster declares it again.
    fn open_store_for_cluster(
        config: &Config,
        broker: &Arc<Broker>,
    ) -> anyhow::Result<Option<Arc<Store>>> {
        if !config.store.enabled {
            broker.replicate_definitions();
            return Ok(None);
        }
        let store = Store::open(&config.data_dir, config.store.options()).with_context(|| {
            format!("opening the message store in {}", config.data_dir.display())
        })?;
        broker.attach_store(store.clone())?;
        Ok(Some(store))
    }

    /// Stop accepting, close every connection (connection.close 320), and
    /// wait for them up to `grace`.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after {grace:?}; exiting anyway");
        }
        if let Some(node) = self.broker.cluster() {
            node.shutdown().await;
        }
        if let Some(store) = &self.store {
            store.flush().await;
            store.close();
        }
    }
}
