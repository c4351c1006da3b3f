//! Who is connected: the registry the admin API lists connections and
//! channels from, and closes connections through.
//!
//! A connection's task owns its state; what it shares here is only what an
//! operator looks at (peer, user, vhost, channels and their modes), updated
//! when it changes (open, close, confirm.select, tx.select), never per
//! message. Counters that change per message are read from the objects
//! that already keep them (the channel's shared prefetch credit).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cluster::presence::Presence;

use super::queue::ChannelCredit;

/// One open AMQP connection.
#[derive(Debug)]
pub struct ConnectionInfo {
    /// Connection id (also the owner id of its exclusive queues).
    pub id: u64,
    /// Client address.
    pub peer: SocketAddr,
    /// Authenticated user.
    pub user: String,
    /// Virtual host.
    pub vhost: String,
    /// When it opened.
    pub connected_at: SystemTime,
    /// Negotiated heartbeat, seconds.
    pub heartbeat: u16,
    /// Negotiated frame_max.
    pub frame_max: u32,
    /// Client-reported properties worth showing (product, version).
    pub client: String,
    /// Over TLS: the protocol and the client certificate's CN.
    pub tls: Option<TlsInfo>,
    channels: Mutex<BTreeMap<u16, Arc<ChannelInfo>>>,
    close: CancellationToken,
    /// Why an operator closed it (told to the client).
    close_reason: Mutex<Option<String>>,
    /// Told when a channel opens or closes (the registry's, once
    /// registered).
    changed: OnceLock<Arc<Notify>>,
    /// The registry's count of confirms made on channels since closed,
    /// which a closing channel adds its own to (once registered).
    confirmed_gone: OnceLock<Arc<AtomicU64>>,
}

/// The TLS side of a connection, as the admin API shows it.
#[derive(Clone, Debug)]
pub struct TlsInfo {
    /// "TLSv1.3" or "TLSv1.2".
    pub protocol: &'static str,
    /// The verified client certificate's subject CN, if one was presented.
    pub peer_cert_cn: Option<String>,
}

/// One open channel.
#[derive(Debug)]
pub struct ChannelInfo {
    /// Channel number.
    pub id: u16,
    /// Its prefetch limit and unacked count, shared with its consumers.
    pub credit: Arc<ChannelCredit>,
    /// In confirm mode.
    pub confirm: AtomicBool,
    /// In tx mode.
    pub transactional: AtomicBool,
    /// Publishes confirmed on it (acked or nacked): its last confirmed
    /// tag, since confirms go out in tag order. A plain store by the
    /// channel's own task, read by the admin API for the confirm rate.
    pub confirmed: AtomicU64,
}

impl ConnectionInfo {
    /// A connection that just finished its handshake.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        peer: SocketAddr,
        user: String,
        vhost: String,
        heartbeat: u16,
        frame_max: u32,
        client: String,
    ) -> Self {
        ConnectionInfo {
            id,
            peer,
            user,
            vhost,
            connected_at: SystemTime::now(),
            heartbeat,
            frame_max,
            client,
            tls: None,
            channels: Mutex::new(BTreeMap::new()),
            close: CancellationToken::new(),
            close_reason: Mutex::new(None),
            changed: OnceLock::new(),
            confirmed_gone: OnceLock::new(),
        }
    }

    /// The same, over TLS.
    pub fn with_tls(mut self, tls: Option<TlsInfo>) -> Self {
        self.tls = tls;
        self
    }

    /// A channel opened.
    pub fn channel_opened(&self, id: u16, credit: Arc<ChannelCredit>) -> Arc<ChannelInfo> {
        let info = Arc::new(ChannelInfo {
            id,
            credit,
            confirm: AtomicBool::new(false),
            transactional: AtomicBool::new(false),
            confirmed: AtomicU64::new(0),
        });
        self.channels.lock().insert(id, info.clone());
        self.tell_changed();
        info
    }

    /// A channel closed.
    pub fn channel_closed(&self, id: u16) {
        let gone = self.channels.lock().remove(&id);
        if let Some(info) = gone {
            self.keep_confirms(&info);
            self.tell_changed();
        }
    }

    /// Add a closing channel's confirms to the registry's total, so the
    /// broker's confirm count never goes back.
    fn keep_confirms(&self, info: &ChannelInfo) {
        if let Some(gone) = self.confirmed_gone.get() {
            gone.fetch_add(info.confirmed.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// The number of its open channels.
    pub fn channel_count(&self) -> usize {
        self.channels.lock().len()
    }

    fn tell_changed(&self) {
        if let Some(changed) = self.changed.get() {
            changed.notify_one();
        }
    }

    /// Its open channels.
    pub fn channels(&self) -> Vec<Arc<ChannelInfo>> {
        self.channels.lock().values().cloned().collect()
    }

    /// Ask the connection to close (connection.close 320 to the client).
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Ask the connection to close, telling the client `reason`.
    pub fn close_because(&self, reason: String) {
        *self.close_reason.lock() = Some(reason);
        self.close.cancel();
    }

    /// Why an operator closed it, if they said.
    pub fn close_reason(&self) -> Option<String> {
        self.close_reason.lock().clone()
    }

    /// Cancelled when an operator closes the connection.
    pub fn closed(&self) -> &CancellationToken {
        &self.close
    }
}

impl ChannelInfo {
    /// Whether the channel is in confirm mode.
    pub fn is_confirm(&self) -> bool {
        self.confirm.load(Ordering::Relaxed)
    }

    /// Whether the channel is transactional.
    pub fn is_transactional(&self) -> bool {
        self.transactional.load(Ordering::Relaxed)
    }
}

/// A new connection id, unique in this process whatever the protocol (it
/// owns exclusive queues and tells consumers apart).
pub fn next_id() -> u64 {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Every open connection of the broker.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<BTreeMap<u64, Arc<ConnectionInfo>>>,
    /// Told when a connection or a channel opens or closes (what a
    /// cluster node reports to its peers changed).
    changed: Arc<Notify>,
    /// Confirms made on channels that have closed.
    confirmed_gone: Arc<AtomicU64>,
}

impl Connections {
    /// Register a connection; it is removed when the guard drops.
    pub fn register(self: &Arc<Self>, info: Arc<ConnectionInfo>) -> Registered {
        let _ = info.changed.set(self.changed.clone());
        let _ = info.confirmed_gone.set(self.confirmed_gone.clone());
        self.open.lock().insert(info.id, info.clone());
        self.changed.notify_one();
        Registered {
            registry: self.clone(),
            info,
        }
    }

    /// Register a connection unless `refuse`, shown every open one under
    /// the registry's lock, gives a reason not to.
    pub fn register_unless(
        self: &Arc<Self>,
        info: Arc<ConnectionInfo>,
        refuse: impl FnOnce(&mut dyn Iterator<Item = &ConnectionInfo>) -> Option<String>,
    ) -> Result<Registered, String> {
        let mut open = self.open.lock();
        if let Some(why) = refuse(&mut open.values().map(|c| &**c)) {
            return Err(why);
        }
        let _ = info.changed.set(self.changed.clone());
        let _ = info.confirmed_gone.set(self.confirmed_gone.clone());
        open.insert(info.id, info.clone());
        self.changed.notify_one();
        Ok(Registered {
            registry: self.clone(),
            info,
        })
    }

    /// Open connections, oldest first.
    pub fn list(&self) -> Vec<Arc<ConnectionInfo>> {
        self.open.lock().values().cloned().collect()
    }

    /// One connection.
    pub fn get(&self, id: u64) -> Option<Arc<ConnectionInfo>> {
        self.open.lock().get(&id).cloned()
    }

    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.open.lock().len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Publishes confirmed to publishers since the broker started, on
    /// every channel open or closed (RabbitMQ's `message_stats.confirm`).
    pub fn confirmed(&self) -> u64 {
        let live: u64 = self
            .open
            .lock()
            .values()
            .map(|c| {
                let channels = c.channels.lock();
                channels
                    .values()
                    .map(|ch| ch.confirmed.load(Ordering::Relaxed))
                    .sum::<u64>()
            })
            .sum();
        self.confirmed_gone.load(Ordering::Relaxed) + live
    }

    /// Resolves when a connection or a channel opened or closed since the
    /// last time it resolved.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// This node's connections and channels counted by vhost and by user,
    /// as node `node` reports them to its peers.
    pub fn presence(&self, node: &str) -> Presence {
        let mut p = Presence {
            node: node.to_owned(),
            ..Presence::default()
        };
        for c in self.open.lock().values() {
            *p.connections_by_vhost.entry(c.vhost.clone()).or_default() += 1;
            *p.connections_by_user.entry(c.user.clone()).or_default() += 1;
            let channels = c.channel_count() as u32;
            if channels > 0 {
                *p.channels_by_user.entry(c.user.clone()).or_default() += channels;
            }
        }
        p
    }
}

/// Keeps a connection listed while it lives.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Connections>,
    /// The listed connection.
    pub info: Arc<ConnectionInfo>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let channels = std::mem::take(&mut *self.info.channels.lock());
        for ch in channels.values() {
            self.info.keep_confirms(ch);
        }
        self.registry.open.lock().remove(&self.info.id);
        self.registry.changed.notify_one();
    }
}
