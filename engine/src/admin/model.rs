//! The admin API's response bodies, as types both sides share: the API
//! serializes them and the CLI (through [`super::client::AdminClient`])
//! reads them back, so a renamed field is a compile error instead of a
//! column of `null`s. Field names follow RabbitMQ's management API where
//! it has the same thing (`messages_ready`, `message_stats.publish_in`),
//! so its dashboards and scripts read these too.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One exchange (`GET /api/exchanges/...`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExchangeView {
    /// Name (empty: the default exchange).
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// Exchange type: the router plugin's name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted with its last binding.
    pub auto_delete: bool,
    /// Not published to by clients.
    pub internal: bool,
    /// Declare arguments, as JSON.
    pub arguments: Value,
    /// The plugins deciding for it.
    pub plugin: ExchangePlugins,
    /// The policy that applies (RabbitMQ's field).
    #[serde(default)]
    pub policy: Option<String>,
    /// A delayed exchange's (`x-delayed-message`) messages waiting for
    /// their `x-delay` on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_delayed: Option<usize>,
    /// Counters since it was declared.
    pub message_stats: ExchangeMessageStats,
}

/// The plugins of an exchange.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExchangePlugins {
    /// Router plugin name.
    pub router: String,
    /// Content hash of the serving router version.
    pub router_hash: String,
    /// Transform plugin name, if any.
    pub transform: Option<String>,
}

/// An exchange's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExchangeMessageStats {
    /// Messages published to it.
    pub publish_in: u64,
    /// Of those, routed to at least one queue.
    pub routed: u64,
    /// Routed nowhere.
    pub unroutable: u64,
    /// Dropped by a filter or transform.
    pub dropped: u64,
    /// Sent to its dead-letter exchange after a plugin fault.
    pub dead_lettered: u64,
    /// Plugin faults while deciding for it.
    pub plugin_faults: u64,
}

/// One queue (`GET /api/queues/...`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueView {
    /// Name.
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// Survives a restart.
    pub durable: bool,
    /// Owned by one connection.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declare arguments, as JSON.
    pub arguments: Value,
    /// Ready plus unacknowledged.
    pub messages: u64,
    /// Waiting for a consumer.
    pub messages_ready: u64,
    /// Delivered, not yet acknowledged.
    pub messages_unacknowledged: u64,
    /// Estimated bytes of ready messages.
    pub message_bytes_ready: usize,
    /// Consumers.
    pub consumers: usize,
    /// Segment files of its log (durable queues with a store).
    pub segments: Option<usize>,
    /// In a cluster: the node it lives on (its counts are that node's;
    /// a queue of another node is listed with zeros).
    #[serde(default)]
    pub node: Option<String>,
    /// A quorum queue's replication, as this node's replica sees it: the
    /// leader, the members and their log positions (none: a classic
    /// queue, or no replica on this node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<crate::cluster::quorum::ReplicaStatus>,
    /// The policy that applies (RabbitMQ's field).
    #[serde(default)]
    pub policy: Option<String>,
    /// The operator policy that applies.
    #[serde(default)]
    pub operator_policy: Option<String>,
    /// What the two set together (the lower limit of each).
    #[serde(default)]
    pub effective_policy_definition: Value,
    /// A deduplicating classic queue's ids in its window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplication_ids: Option<usize>,
    /// Messages not yet due (`x-delivery-delay`, or a delayed exchange's
    /// scheduled messages): not counted in `messages`.
    #[serde(default)]
    pub messages_delayed: usize,
    /// Counters since it was declared.
    pub message_stats: QueueMessageStats,
    /// `classic`, `quorum` or `stream` (RabbitMQ's field).
    #[serde(rename = "type", default)]
    pub queue_type: String,
    /// A stream's offsets, segments and readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamView>,
}

/// One page of a queue listing (`GET /api/queues?page=N`), in RabbitMQ's
/// shape.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueuePage {
    /// Queues that match the filter.
    pub filtered_count: usize,
    /// Queues on this page.
    pub item_count: usize,
    /// This page's queues.
    pub items: Vec<QueueView>,
    /// This page's number (from 1).
    pub page: usize,
    /// Pages of matching queues.
    pub page_count: usize,
    /// Queues per page.
    pub page_size: usize,
    /// Queues visible, matching or not.
    pub total_count: usize,
}

/// A stream queue's log and its consumers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamView {
    /// The oldest offset kept.
    pub first_offset: u64,
    /// The newest offset readable (none: the stream is empty).
    pub last_offset: Option<u64>,
    /// Segment files.
    pub segments: usize,
    /// Bytes on disk.
    pub bytes: u64,
    /// Consumers reading it, with where each is.
    pub consumers: Vec<StreamConsumerView>,
    /// Named consumers' stored offsets (whether reading now or not), with
    /// their lag: messages after the stored offset.
    pub named: Vec<NamedOffsetView>,
}

/// One consumer of a stream.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamConsumerView {
    /// Consumer tag.
    pub consumer_tag: String,
    /// Its channel.
    pub channel: u16,
    /// The offset it reads next.
    pub offset: u64,
    /// Its `x-stream-consumer-name`.
    pub name: Option<String>,
    /// Reading (false: waiting behind another consumer of its name).
    pub active: bool,
}

/// A named consumer's stored offset.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NamedOffsetView {
    /// The name.
    pub name: String,
    /// The last offset it settled.
    pub offset: u64,
    /// Messages after it.
    pub lag: u64,
}

/// A queue's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueueMessageStats {
    /// Messages enqueued.
    pub publish: u64,
    /// Deliveries to consumers and `basic.get`.
    pub deliver_get: u64,
    /// Of those, marked redelivered.
    pub redeliver: u64,
    /// Acknowledged.
    pub ack: u64,
    /// Dead-lettered (expired, rejected, overflowed).
    pub dead_lettered: u64,
}

/// One plugin (`GET /api/plugins`): its state and serving version.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PluginView {
    /// Plugin name.
    pub name: String,
    /// `serving`, `rejected` or `orphaned`.
    pub state: String,
    /// Roles of the serving version.
    pub roles: Option<String>,
    /// Content hash of the serving version.
    pub hash: Option<String>,
    /// ABI version of the serving version.
    pub abi_version: Option<u32>,
    /// A built-in exchange type.
    pub builtin: bool,
    /// `baseline` or `optimized` code.
    pub code: Option<String>,
    /// When the serving version was loaded (seconds since the epoch).
    pub loaded_at: Option<u64>,
    /// Faults of the serving version.
    pub faults: u64,
    /// Message calls of the serving version.
    pub calls: u64,
    /// Call time percentiles, µs.
    pub latency_us: Option<LatencyView>,
    /// Times a new version replaced a serving one.
    pub swaps: u64,
    /// Why the latest file was rejected.
    pub rejection: Option<String>,
    /// The serving version's exports.
    #[serde(default)]
    pub exports: Vec<String>,
    /// The serving version's size in bytes.
    #[serde(default)]
    pub size: usize,
    /// Self-test vectors the serving version passed at load.
    #[serde(default)]
    pub self_tests: usize,
    /// The serving version's circuit: `closed` (called), or `open` after
    /// repeated faults (skipped until it cools down).
    #[serde(default)]
    pub circuit: Option<String>,
    /// In a cluster: the versions the cluster keeps, and each node's
    /// verdict on them.
    #[serde(default)]
    pub cluster: Vec<ClusterPluginVersion>,
    /// A candidate version staged beside the serving one.
    #[serde(default)]
    pub candidate: Option<CandidateView>,
    /// The latest transitions of its versions (shadow, canary, promoted,
    /// rolled back, ...), oldest first.
    #[serde(default)]
    pub transitions: Vec<crate::author::candidate::Transition>,
}

/// A candidate version on trial (`GET /api/plugins/{name}/candidate`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CandidateView {
    /// The plugin.
    pub plugin: String,
    /// The candidate's content hash.
    pub hash: String,
    /// The version serving when it was staged.
    pub serving_hash: String,
    /// `shadow` or `canary`, with its sample or percentage.
    pub mode: crate::author::candidate::Mode,
    /// Its bounds.
    pub policy: crate::author::candidate::Policy,
    /// Messages it decided (canary) or was compared on (shadow).
    pub calls: u64,
    /// Its faults.
    pub faults: u64,
    /// Shadow comparisons that agreed.
    pub agreements: u64,
    /// Shadow comparisons that did not.
    pub disagreements: u64,
    /// Shadow samples skipped (the shadow thread was behind).
    pub skipped: u64,
    /// Its call time percentiles, µs.
    pub latency_us: Option<LatencyView>,
    /// Seconds it has run.
    pub running_secs: u64,
    /// Why it is being rolled back, if it passed a bound.
    pub failure: Option<String>,
    /// The latest disagreements.
    pub disagreement_samples: Vec<crate::author::candidate::Disagreement>,
}

/// A kept version of a plugin (`GET /api/plugins/{name}/versions`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptVersionView {
    /// Content hash.
    pub hash: String,
    /// Whether it serves now.
    pub serving: bool,
    /// When it last started serving (seconds since the epoch).
    pub served_at: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A capture on an exchange (`GET /api/exchanges/{vhost}/{name}/capture`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaptureView {
    /// What was asked.
    pub spec: crate::author::capture::CaptureSpec,
    /// It has what it asked for (or hit its byte bound).
    pub done: bool,
    /// Messages kept.
    pub kept: usize,
    /// Messages published to the exchange since it started.
    pub seen: u64,
}

/// Staged rollouts and their history (`GET /api/rollouts`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutsView {
    /// Candidates on trial.
    pub candidates: Vec<CandidateView>,
    /// The latest transitions, oldest first.
    pub transitions: Vec<crate::author::candidate::Transition>,
}

/// One version of a plugin as the cluster keeps it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterPluginVersion {
    /// Content hash.
    pub hash: String,
    /// Every node serves it.
    pub active: bool,
    /// The node whose folder it came from.
    pub from: String,
    /// Nodes that compiled and validated it.
    pub ready: Vec<String>,
    /// Nodes that refused it, and why.
    pub refused: std::collections::BTreeMap<String, String>,
}

/// Call time percentiles, µs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencyView {
    /// Median.
    pub p50: Option<u64>,
    /// 90th.
    pub p90: Option<u64>,
    /// 99th.
    pub p99: Option<u64>,
}

/// What `POST /api/exchanges/{vhost}/{name}/publish` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishResult {
    /// Reached at least one queue.
    pub routed: bool,
    /// Queues reached.
    pub queues: usize,
    /// Plugin faults met on the way, as text.
    pub faults: Vec<String>,
}

/// One message taken by `POST /api/queues/{vhost}/{name}/get`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GotMessage {
    /// Exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Delivered before.
    pub redelivered: bool,
    /// The body as text (invalid UTF-8 replaced).
    pub payload: String,
    /// Body length in bytes.
    pub payload_bytes: usize,
    /// Some of its properties.
    pub properties: GotProperties,
    /// Ready messages left in the queue after it.
    pub message_count: usize,
}

/// The properties shown with a message taken by the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GotProperties {
    /// 2: persistent.
    pub delivery_mode: Option<u8>,
    /// Content type.
    pub content_type: Option<String>,
    /// Message id.
    pub message_id: Option<String>,
    /// Headers, as JSON (null: none).
    pub headers: Value,
}
