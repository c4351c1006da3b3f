//! A replicated stream: a stream queue whose appends are the entries of a
//! Raft group, as a quorum queue's messages are.
//!
//! Why the same group as a quorum queue: the leader, its election, the
//! node's shared write-ahead log and its one sync for every group, the
//! forwarding of publishes to the leader and the fault checker's
//! guarantees are the same; a confirm means a majority of the stream's
//! replicas have the message in their write-ahead log on disk. What
//! differs is the state machine: each replica appends every committed
//! message to its own stream log ([`crate::store::stream`]) at the offset
//! the log's order gives it, so every replica holds the same records at
//! the same offsets with the same times, and any of them serves readers.
//!
//! The write-ahead log keeps a group's entries only until a snapshot
//! covers them. A stream's snapshot is small (the next offset and the
//! named consumers' offsets); building one first syncs the replica's
//! stream log, so what the write-ahead log drops is in the stream. A
//! replica that was away longer than the write-ahead log keeps (or lost
//! its files) is sent that snapshot and fills what it lacks from another
//! replica's stream log ([`fill`]), starting afresh at the first offset
//! the others still keep when retention removed the rest.
//!
//! A named consumer's offset (`x-stream-consumer-name`) is an entry of the
//! log too ([`Enqueue::consumer_offset`]), so a consumer resumes where it
//! acknowledged on whichever node it reconnects to, after any failover.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::op::{Enqueue, StoredMessage};
use crate::cluster::ClusterNode;
use crate::cluster::command::bytes_field;
use crate::cluster::link::{Answer, Call};
use crate::store::stream::{Placed, StreamLog};

/// Bytes of records one fill call asks for (well under a link frame).
pub const CHUNK_BYTES: usize = 4 << 20;

/// How long a fill call may take before another replica is asked.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A replicated stream's snapshot: where its log ends, and the named
/// consumers' offsets (the records are in every replica's stream log).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    /// The offset the next committed message gets.
    pub next: u64,
    /// Named consumers' last acknowledged offsets.
    pub offsets: Vec<(String, u64)>,
}

/// One record as a replica sends it to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamEntry {
    /// Its offset.
    pub offset: u64,
    /// Its time (ms since the epoch).
    pub timestamp_ms: u64,
    /// Its `x-stream-filter-value` (empty: none).
    #[serde(with = "bytes_field")]
    pub filter: Vec<u8>,
    /// The message.
    pub message: StoredMessage,
}

/// What a replica holds from an offset on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// The first offset it still keeps.
    pub first: u64,
    /// The offset its next record will have.
    pub next: u64,
    /// Records from the offset asked for (or `first`, if later).
    pub records: Vec<StreamEntry>,
}

impl StreamChunk {
    /// Up to `max_bytes` of `log`'s records from `from`.
    pub fn read(log: &Arc<StreamLog>, from: u64, max_bytes: usize) -> Result<StreamChunk, String> {
        let records = log
            .read_from(from, max_bytes)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| StreamEntry {
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                filter: r.filter.map(|f| f.to_vec()).unwrap_or_default(),
                message: StoredMessage::of(&r.message),
            })
            .collect();
        Ok(StreamChunk {
            first: log.first(),
            next: log.committed(),
            records,
        })
    }
}

/// Where a replica fetches the records it lacks.
pub trait Source: Send + Sync {
    /// Records from `from` held by one of `peers` (node names).
    fn read(
        &self,
        peers: Vec<String>,
        from: u64,
    ) -> Pin<Box<dyn Future<Output = Result<StreamChunk, String>> + Send>>;
}

/// The other replicas of a group, asked over the node's links.
pub struct PeerSource {
    /// This node.
    pub node: Weak<ClusterNode>,
    /// The group.
    pub group: String,
}

impl Source for PeerSource {
    fn read(
        &self,
        peers: Vec<String>,
        from: u64,
    ) -> Pin<Box<dyn Future<Output = Result<StreamChunk, String>> + Send>> {
        let (node, group) = (self.node.clone(), self.group.clone());
        Box::pin(async move {
            let node = node.upgrade().ok_or("the node is stopping")?;
            let mut why = format!("no other replica to read offset {from} from");
            // The replica that holds the most answers: one that is behind
            // too would send nothing, or less.
            let mut best: Option<StreamChunk> = None;
            for peer in peers.iter().filter(|p| **p != node.name()) {
                let Some(link) = node.peers().open_link(peer) else {
                    why = format!("no link to {peer}");
                    continue;
                };
                let call = Call::StreamRead {
                    group: group.clone(),
                    from,
                    max_bytes: CHUNK_BYTES as u64,
                };
                match link.call(call, CALL_TIMEOUT).await {
                    Ok(Answer::StreamChunk(Ok(chunk))) => {
                        if best.as_ref().is_none_or(|b| chunk.next > b.next) {
                            best = Some(chunk);
                        }
                    }
                    Ok(Answer::StreamChunk(Err(e))) => why = format!("{peer}: {e}"),
                    Ok(_) => why = format!("{peer}: an unexpected answer"),
                    Err(e) => why = e.to_string(),
                }
            }
            best.ok_or(why)
        })
    }
}

/// Fill `log` up to `target` (exclusive) from `peers` through `source`.
/// A log whose next offset is gone from the others starts again at the
/// first one they keep.
pub async fn fill(
    log: &Arc<StreamLog>,
    source: &dyn Source,
    peers: Vec<String>,
    target: u64,
) -> Result<(), String> {
    while log.next_offset() < target {
        let from = log.next_offset();
        let chunk = source.read(peers.clone(), from).await?;
        let Some(head) = chunk.records.first() else {
            if chunk.first > from {
                log.restart_at(chunk.first).map_err(|e| e.to_string())?;
                continue;
            }
            return Err(format!(
                "no other replica holds offsets {from} to {target} yet"
            ));
        };
        if head.offset > from {
            // Retention removed the offsets between on every other replica.
            log.restart_at(head.offset).map_err(|e| e.to_string())?;
        }
        for r in &chunk.records {
            let Some(m) = r.message.message() else {
                return Err(format!("record {} does not decode", r.offset));
            };
            let filter = (!r.filter.is_empty()).then_some(&r.filter[..]);
            if let Placed::Gap { next } = log
                .append_at(r.offset, r.timestamp_ms, &m, filter)
                .map_err(|e| e.to_string())?
            {
                return Err(format!("record {} sent where {next} was due", r.offset));
            }
        }
    }
    // On disk before the snapshot that needed them is: the write-ahead
    // log before it is about to go.
    crate::store::Flush::flush(&**log).map_err(|e| e.to_string())
}

impl Enqueue {
    /// The entry that stores a named stream consumer's offset: it travels
    /// in the log with the messages (so it is ordered with them and kept
    /// by a majority), and a stream's replicas do not append it. Its
    /// message has no properties, which no published message lacks.
    pub fn consumer_offset(name: &str, offset: u64, now_ms: u64) -> Enqueue {
        Enqueue {
            published_ms: now_ms,
            message: StoredMessage {
                exchange: OFFSET_MARK.to_owned(),
                routing_key: name.to_owned(),
                properties: Vec::new(),
                body: offset.to_le_bytes().to_vec(),
            },
        }
    }

    /// The consumer name and offset, if this entry stores one.
    pub fn as_consumer_offset(&self) -> Option<(&str, u64)> {
        let m = &self.message;
        if m.exchange != OFFSET_MARK || !m.properties.is_empty() {
            return None;
        }
        let offset = u64::from_le_bytes(m.body.as_slice().try_into().ok()?);
        Some((m.routing_key.as_str(), offset))
    }
}

/// The exchange name of a consumer-offset entry.
const OFFSET_MARK: &str = "\u{0}consumer-offset";

/// Record `offset` for consumer `name` in `log` unless it holds a later
/// one: offsets only move forward, whichever way (the log's order, or a
/// node's own consumer) they arrive first.
pub fn store_offset(log: &Arc<StreamLog>, name: &str, offset: u64) {
    if log.stored_offset(name).is_none_or(|o| o < offset) {
        log.store_offset(name, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Flush;

    fn open(dir: &std::path::Path) -> Arc<StreamLog> {
        Arc::new(
            StreamLog::open(dir.to_owned(), Arc::new(crate::store::Syncer::new()), 4096).unwrap(),
        )
    }

    fn msg(i: u64) -> crate::message::Message {
        crate::message::Message::new(
            "",
            "s",
            amq_protocol::protocol::BasicProperties::default(),
            format!("m{i}:{}", "x".repeat(200)),
        )
    }

    /// Another replica, read as a peer would be.
    struct Other(Arc<StreamLog>);

    impl Source for Other {
        fn read(
            &self,
            _peers: Vec<String>,
            from: u64,
        ) -> Pin<Box<dyn Future<Output = Result<StreamChunk, String>> + Send>> {
            // Small chunks: a fill takes several calls.
            let chunk = StreamChunk::read(&self.0, from, 2000);
            Box::pin(async move { chunk })
        }
    }

    fn bodies(log: &Arc<StreamLog>) -> Vec<(u64, String, u64)> {
        let mut r = log.reader_at(0).unwrap();
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            let body = String::from_utf8_lossy(&rec.message.body);
            out.push((
                rec.offset,
                body.split(':').next().unwrap().to_owned(),
                rec.timestamp_ms,
            ));
        }
        out
    }

    #[tokio::test]
    async fn a_replica_fills_what_it_lacks_from_another_and_starts_where_retention_left_the_others()
    {
        let tmp = tempfile::tempdir().unwrap();
        let leader = open(&tmp.path().join("leader"));
        for i in 0..200 {
            let filter = (i % 3 == 0).then_some(&b"third"[..]);
            assert!(matches!(
                leader.append_at(i, 1000 + i, &msg(i), filter).unwrap(),
                Placed::Appended(_)
            ));
        }
        leader.flush().unwrap();
        let source = Other(leader.clone());

        // Behind: it has the first 50, lacks the rest.
        let behind = open(&tmp.path().join("behind"));
        for i in 0..50 {
            behind.append_at(i, 1000 + i, &msg(i), None).unwrap();
        }
        fill(&behind, &source, vec![], 200).await.unwrap();
        assert_eq!(behind.committed(), 200, "synced and readable");
        assert_eq!(bodies(&behind), bodies(&leader));
        // Applied again after a restart: held already, nothing doubled.
        assert_eq!(
            behind.append_at(120, 1120, &msg(120), None).unwrap(),
            Placed::Held
        );
        assert_eq!(
            behind.append_at(201, 1201, &msg(201), None).unwrap(),
            Placed::Gap { next: 200 }
        );
        // The filter values came along.
        let mut r = behind.reader_at(51).unwrap();
        assert_eq!(
            r.peek_filter().unwrap().unwrap().1.as_deref(),
            Some(&b"third"[..])
        );

        // Retention removed the start everywhere else: a new replica
        // starts where the others' logs start, at the same offsets.
        let removed = leader.retain(Some(20_000), None, 0);
        assert!(removed > 0);
        let first = leader.first();
        assert!(first > 0);
        let fresh = open(&tmp.path().join("fresh"));
        fill(&fresh, &source, vec![], 200).await.unwrap();
        assert_eq!(fresh.first(), first);
        assert_eq!(bodies(&fresh), bodies(&leader));

        // Nothing to read past the others' end: an error, not a hang.
        let ahead = fill(&fresh, &source, vec![], 250).await;
        assert!(ahead.is_err(), "{ahead:?}");
    }

    #[test]
    fn a_consumer_offset_entry_is_told_from_a_message() {
        let e = Enqueue::consumer_offset("reader-1", 41, 5);
        assert_eq!(e.as_consumer_offset(), Some(("reader-1", 41)));
        let m = crate::message::Message::new(
            OFFSET_MARK,
            "reader-1",
            amq_protocol::protocol::BasicProperties::default(),
            bytes::Bytes::from_static(&[0; 8]),
        );
        let published = Enqueue {
            published_ms: 5,
            message: StoredMessage::of(&m),
        };
        assert_eq!(published.as_consumer_offset(), None);
    }
}
