//! The encoding of message traffic between nodes: what a link's traffic
//! frames say (forwarded publishes, deliveries, settlements, answers). It
//! knows no queue and no link: the queue's connection inbox carries it,
//! `remote` sends and reads it.
//!
//! Binary rather than the JSON of the cluster's calls: a message's body and
//! its properties (already in AMQP's wire encoding) are copied once into the
//! frame and sliced out of it at the other end, with no escaping. Strings
//! and byte strings carry a length prefix; integers are little-endian.
//! Both ends are the same wasmq version (the link's protocol string says
//! so), so there is no versioning inside a frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A client channel on the node that sent a frame: where the answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Its connection's id on that node.
    pub conn: u64,
    /// The channel.
    pub channel: u16,
}

/// How a delivery was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Acked: done.
    Ack,
    /// Nacked or rejected with requeue.
    Requeue,
    /// Nacked or rejected without requeue: dead-lettered or dropped.
    Reject,
}

/// One frame of message traffic.
#[derive(Clone, Debug, PartialEq)]
pub enum Traffic {
    /// A message routed on the sending node to queues that live on the
    /// receiving one. `seq` 0: the publisher wants no confirm.
    Forward {
        /// The publishing channel.
        origin: Origin,
        /// Its confirm tag.
        seq: u64,
        /// Virtual host.
        vhost: String,
        /// The queues, all on the receiving node.
        queues: Vec<String>,
        /// The exchange it was published to.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// Properties in AMQP encoding.
        properties: Bytes,
        /// Body.
        body: Bytes,
    },
    /// The queue's node took (and synced, if persistent) a forwarded
    /// message, or refused it.
    Forwarded {
        /// The publishing channel.
        origin: Origin,
        /// Its confirm tag.
        seq: u64,
        /// Every queue took it.
        ok: bool,
    },
    /// Start a consumer on a queue of the receiving node.
    Consume {
        /// The consuming channel.
        origin: Origin,
        /// Consumer tag.
        tag: String,
        /// Virtual host.
        vhost: String,
        /// Queue.
        queue: String,
        /// Its prefetch (0: none).
        prefetch: u32,
        /// Acks not expected.
        no_ack: bool,
        /// Exclusive consumer.
        exclusive: bool,
        /// Its `basic.consume` arguments, a field table's body in AMQP's
        /// encoding (a stream consumer's offset, filters and name).
        arguments: Bytes,
    },
    /// The consumer could not start (or was stopped): the channel closes
    /// with this error, or the client is told its consumer was cancelled.
    Refused {
        /// The consuming channel.
        origin: Origin,
        /// Consumer tag.
        tag: String,
        /// AMQP reply code (0: cancelled, not an error).
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The client cancelled its consumer.
    Cancel {
        /// The consuming channel.
        origin: Origin,
        /// Consumer tag.
        tag: String,
    },
    /// A delivery to a consumer.
    Deliver {
        /// The consuming channel.
        origin: Origin,
        /// Consumer tag.
        tag: String,
        /// The queue node's id for it (what a settle names).
        id: u64,
        /// Delivered before.
        redelivered: bool,
        /// The exchange it was published to.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// Properties in AMQP encoding.
        properties: Bytes,
        /// Body.
        body: Bytes,
    },
    /// Deliveries settled by the client.
    Settle {
        /// How.
        how: Settlement,
        /// The queue node's ids.
        ids: Vec<u64>,
    },
    /// `basic.get` of a queue on the receiving node.
    Get {
        /// The asking channel.
        origin: Origin,
        /// Virtual host.
        vhost: String,
        /// Queue.
        queue: String,
        /// Acks not expected.
        no_ack: bool,
    },
    /// `queue.purge` of a queue on the receiving node.
    Purge {
        /// The asking channel.
        origin: Origin,
        /// Virtual host.
        vhost: String,
        /// Queue.
        queue: String,
    },
    /// A look at a queue of the receiving node without taking anything:
    /// its length and the ready messages from `start` to `stop` as Redis's
    /// `LRANGE` counts them (an empty range: the length alone). Sent only
    /// to a node that announced `traffic-peek` in its hello.
    Peek {
        /// The asking connection.
        origin: Origin,
        /// Virtual host.
        vhost: String,
        /// Queue.
        queue: String,
        /// First index (negative: from the end).
        start: i64,
        /// Last index (negative: from the end).
        stop: i64,
    },
    /// The answer to a `Get`, a `Purge` or a `Peek`.
    Answer {
        /// The asking channel.
        origin: Origin,
        /// What the queue's node answered.
        outcome: QueueAnswer,
    },
}

/// What the queue's node answered to a `Get` or a `Purge`.
#[derive(Clone, Debug, PartialEq)]
pub enum QueueAnswer {
    /// What a `Peek` saw.
    Peeked {
        /// Ready messages.
        length: u32,
        /// The bodies in the range asked for.
        bodies: Vec<Bytes>,
    },
    /// Purged: this many messages were removed.
    Purged {
        /// Messages removed.
        message_count: u32,
    },
    /// The queue was empty.
    Empty,
    /// It could not be read (AMQP reply code and text).
    Error {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// A message.
    Message {
        /// The queue node's id for it (what a settle names).
        id: u64,
        /// Delivered before.
        redelivered: bool,
        /// The exchange it was published to.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// Messages left in the queue.
        message_count: u32,
        /// Properties in AMQP encoding.
        properties: Bytes,
        /// Body.
        body: Bytes,
    },
}

const FORWARD: u8 = 1;
const FORWARDED: u8 = 2;
const CONSUME: u8 = 3;
const REFUSED: u8 = 4;
const CANCEL: u8 = 5;
const DELIVER: u8 = 6;
const SETTLE: u8 = 7;
const GET: u8 = 8;
const ANSWER: u8 = 9;
const PURGE: u8 = 10;
const PEEK: u8 = 11;

/// A frame that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("malformed traffic frame: {0}")]
pub struct Malformed(&'static str);

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u32_le(s.len() as u32);
    b.put_slice(s.as_bytes());
}

fn put_bytes(b: &mut BytesMut, s: &[u8]) {
    b.put_u32_le(s.len() as u32);
    b.put_slice(s);
}

fn put_origin(b: &mut BytesMut, o: Origin) {
    b.put_u64_le(o.conn);
    b.put_u16_le(o.channel);
}

impl Traffic {
    /// The frame's bytes.
    pub fn encode(&self) -> Bytes {
        let hint = match self {
            Traffic::Forward {
                properties, body, ..
            }
            | Traffic::Deliver {
                properties, body, ..
            } => 128 + properties.len() + body.len(),
            Traffic::Answer {
                outcome:
                    QueueAnswer::Message {
                        properties, body, ..
                    },
                ..
            } => 128 + properties.len() + body.len(),
            _ => 64,
        };
        let mut b = BytesMut::with_capacity(hint);
        match self {
            Traffic::Forward {
                origin,
                seq,
                vhost,
                queues,
                exchange,
                routing_key,
                properties,
                body,
            } => {
                b.put_u8(FORWARD);
                put_origin(&mut b, *origin);
                b.put_u64_le(*seq);
                put_str(&mut b, vhost);
                b.put_u32_le(queues.len() as u32);
                for q in queues {
                    put_str(&mut b, q);
                }
                put_str(&mut b, exchange);
                put_str(&mut b, routing_key);
                put_bytes(&mut b, properties);
                put_bytes(&mut b, body);
            }
            Traffic::Forwarded { origin, seq, ok } => {
                b.put_u8(FORWARDED);
                put_origin(&mut b, *origin);
                b.put_u64_le(*seq);
                b.put_u8(u8::from(*ok));
            }
            Traffic::Consume {
                origin,
                tag,
                vhost,
                queue,
                prefetch,
                no_ack,
                exclusive,
                arguments,
            } => {
                b.put_u8(CONSUME);
                put_origin(&mut b, *origin);
                put_str(&mut b, tag);
                put_str(&mut b, vhost);
                put_str(&mut b, queue);
                b.put_u32_le(*prefetch);
                b.put_u8(u8::from(*no_ack));
                b.put_u8(u8::from(*exclusive));
                put_bytes(&mut b, arguments);
            }
            Traffic::Refused {
                origin,
                tag,
                code,
                text,
            } => {
                b.put_u8(REFUSED);
                put_origin(&mut b, *origin);
                put_str(&mut b, tag);
                b.put_u16_le(*code);
                put_str(&mut b, text);
            }
            Traffic::Cancel { origin, tag } => {
                b.put_u8(CANCEL);
                put_origin(&mut b, *origin);
                put_str(&mut b, tag);
            }
            Traffic::Deliver {
                origin,
                tag,
                id,
                redelivered,
                exchange,
                routing_key,
                properties,
                body,
            } => {
                b.put_u8(DELIVER);
                put_origin(&mut b, *origin);
                put_str(&mut b, tag);
                b.put_u64_le(*id);
                b.put_u8(u8::from(*redelivered));
                put_str(&mut b, exchange);
                put_str(&mut b, routing_key);
                put_bytes(&mut b, properties);
                put_bytes(&mut b, body);
            }
            Traffic::Settle { how, ids } => {
                b.put_u8(SETTLE);
                b.put_u8(match how {
                    Settlement::Ack => 0,
                    Settlement::Requeue => 1,
                    Settlement::Reject => 2,
                });
                b.put_u32_le(ids.len() as u32);
                for id in ids {
                    b.put_u64_le(*id);
                }
            }
            Traffic::Get {
                origin,
                vhost,
                queue,
                no_ack,
            } => {
                b.put_u8(GET);
                put_origin(&mut b, *origin);
                put_str(&mut b, vhost);
                put_str(&mut b, queue);
                b.put_u8(u8::from(*no_ack));
            }
            Traffic::Purge {
                origin,
                vhost,
                queue,
            } => {
                b.put_u8(PURGE);
                put_origin(&mut b, *origin);
                put_str(&mut b, vhost);
                put_str(&mut b, queue);
            }
            Traffic::Peek {
                origin,
                vhost,
                queue,
                start,
                stop,
            } => {
                b.put_u8(PEEK);
                put_origin(&mut b, *origin);
                put_str(&mut b, vhost);
                put_str(&mut b, queue);
                b.put_i64_le(*start);
                b.put_i64_le(*stop);
            }
            Traffic::Answer { origin, outcome } => {
                b.put_u8(ANSWER);
                put_origin(&mut b, *origin);
                match outcome {
                    QueueAnswer::Peeked { length, bodies } => {
                        b.put_u8(4);
                        b.put_u32_le(*length);
                        b.put_u32_le(bodies.len() as u32);
                        for body in bodies {
                            put_bytes(&mut b, body);
                        }
                    }
                    QueueAnswer::Purged { message_count } => {
                        b.put_u8(3);
                        b.put_u32_le(*message_count);
                    }
                    QueueAnswer::Empty => b.put_u8(0),
                    QueueAnswer::Error { code, text } => {
                        b.put_u8(1);
                        b.put_u16_le(*code);
                        put_str(&mut b, text);
                    }
                    QueueAnswer::Message {
                        id,
                        redelivered,
                        exchange,
                        routing_key,
                        message_count,
                        properties,
                        body,
                    } => {
                        b.put_u8(2);
                        b.put_u64_le(*id);
                        b.put_u8(u8::from(*redelivered));
                        put_str(&mut b, exchange);
                        put_str(&mut b, routing_key);
                        b.put_u32_le(*message_count);
                        put_bytes(&mut b, properties);
                        put_bytes(&mut b, body);
                    }
                }
            }
        }
        b.freeze()
    }

    /// Read a frame (the byte strings share `frame`'s memory).
    pub fn decode(mut frame: Bytes) -> Result<Traffic, Malformed> {
        let f = &mut frame;
        let t = match u8_(f)? {
            FORWARD => Traffic::Forward {
                origin: origin(f)?,
                seq: u64_(f)?,
                vhost: string(f)?,
                queues: {
                    let n = u32_(f)? as usize;
                    if n > f.len() / 4 {
                        return Err(Malformed("queue count"));
                    }
                    (0..n).map(|_| string(f)).collect::<Result<_, _>>()?
                },
                exchange: string(f)?,
                routing_key: string(f)?,
                properties: bytes(f)?,
                body: bytes(f)?,
            },
            FORWARDED => Traffic::Forwarded {
                origin: origin(f)?,
                seq: u64_(f)?,
                ok: bool_(f)?,
            },
            CONSUME => Traffic::Consume {
                origin: origin(f)?,
                tag: string(f)?,
                vhost: string(f)?,
                queue: string(f)?,
                prefetch: u32_(f)?,
                no_ack: bool_(f)?,
                exclusive: bool_(f)?,
                arguments: bytes(f)?,
            },
            REFUSED => Traffic::Refused {
                origin: origin(f)?,
                tag: string(f)?,
                code: u16_(f)?,
                text: string(f)?,
            },
            CANCEL => Traffic::Cancel {
                origin: origin(f)?,
                tag: string(f)?,
            },
            DELIVER => Traffic::Deliver {
                origin: origin(f)?,
                tag: string(f)?,
                id: u64_(f)?,
                redelivered: bool_(f)?,
                exchange: string(f)?,
                routing_key: string(f)?,
                properties: bytes(f)?,
                body: bytes(f)?,
            },
            SETTLE => Traffic::Settle {
                how: match u8_(f)? {
                    0 => Settlement::Ack,
                    1 => Settlement::Requeue,
                    2 => Settlement::Reject,
                    _ => return Err(Malformed("settlement")),
                },
                ids: {
                    let n = u32_(f)? as usize;
                    if n > f.len() / 8 {
                        return Err(Malformed("id count"));
                    }
                    (0..n).map(|_| f.get_u64_le()).collect()
                },
            },
            GET => Traffic::Get {
                origin: origin(f)?,
                vhost: string(f)?,
                queue: string(f)?,
                no_ack: bool_(f)?,
            },
            ANSWER => Traffic::Answer {
                origin: origin(f)?,
                outcome: match u8_(f)? {
                    0 => QueueAnswer::Empty,
                    1 => QueueAnswer::Error {
                        code: u16_(f)?,
                        text: string(f)?,
                    },
                    2 => QueueAnswer::Message {
                        id: u64_(f)?,
                        redelivered: bool_(f)?,
                        exchange: string(f)?,
                        routing_key: string(f)?,
                        message_count: u32_(f)?,
                        properties: bytes(f)?,
                        body: bytes(f)?,
                    },
                    3 => QueueAnswer::Purged {
                        message_count: u32_(f)?,
                    },
                    4 => QueueAnswer::Peeked {
                        length: u32_(f)?,
                        bodies: {
                            let n = u32_(f)? as usize;
                            if n > f.len() / 4 {
                                return Err(Malformed("body count"));
                            }
                            (0..n).map(|_| bytes(f)).collect::<Result<_, _>>()?
                        },
                    },
                    _ => return Err(Malformed("queue answer")),
                },
            },
            PURGE => Traffic::Purge {
                origin: origin(f)?,
                vhost: string(f)?,
                queue: string(f)?,
            },
            PEEK => Traffic::Peek {
                origin: origin(f)?,
                vhost: string(f)?,
                queue: string(f)?,
                start: u64_(f)? as i64,
                stop: u64_(f)? as i64,
            },
            _ => return Err(Malformed("kind")),
        };
        if !frame.is_empty() {
            return Err(Malformed("trailing bytes"));
        }
        Ok(t)
    }
}

fn need(f: &Bytes, n: usize) -> Result<(), Malformed> {
    if f.len() < n {
        Err(Malformed("truncated"))
    } else {
        Ok(())
    }
}

fn u8_(f: &mut Bytes) -> Result<u8, Malformed> {
    need(f, 1)?;
    Ok(f.get_u8())
}

fn bool_(f: &mut Bytes) -> Result<bool, Malformed> {
    match u8_(f)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Malformed("boolean")),
    }
}

fn u16_(f: &mut Bytes) -> Result<u16, Malformed> {
    need(f, 2)?;
    Ok(f.get_u16_le())
}

fn u32_(f: &mut Bytes) -> Result<u32, Malformed> {
    need(f, 4)?;
    Ok(f.get_u32_le())
}

fn u64_(f: &mut Bytes) -> Result<u64, Malformed> {
    need(f, 8)?;
    Ok(f.get_u64_le())
}

fn origin(f: &mut Bytes) -> Result<Origin, Malformed> {
    Ok(Origin {
        conn: u64_(f)?,
        channel: u16_(f)?,
    })
}

fn bytes(f: &mut Bytes) -> Result<Bytes, Malformed> {
    let n = u32_(f)? as usize;
    need(f, n)?;
    Ok(f.split_to(n))
}

fn string(f: &mut Bytes) -> Result<String, Malformed> {
    let b = bytes(f)?;
    String::from_utf8(b.to_vec()).map_err(|_| Malformed("string is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_reads_back_as_written() {
        let origin = Origin {
            conn: 7,
            channel: 3,
        };
        let frames = [
            Traffic::Forward {
                origin,
                seq: 9,
                vhost: "/".into(),
                queues: vec!["a".into(), "b".into()],
                exchange: "amq.topic".into(),
                routing_key: "k.1".into(),
                properties: Bytes::from_static(&[0x10, 0, 2]),
                body: Bytes::from_static(b"hello"),
            },
            Traffic::Forwarded {
                origin,
                seq: 9,
                ok: false,
            },
            Traffic::Consume {
                origin,
                tag: "ctag".into(),
                vhost: "/".into(),
                queue: "q".into(),
                prefetch: 10,
                no_ack: false,
                exclusive: true,
                arguments: Bytes::from_static(b"\x0fx-stream-offsetS\x00\x00\x00\x05first"),
            },
            Traffic::Refused {
                origin,
                tag: "ctag".into(),
                code: 403,
                text: "ACCESS_REFUSED".into(),
            },
            Traffic::Cancel {
                origin,
                tag: "ctag".into(),
            },
            Traffic::Deliver {
                origin,
                tag: "ctag".into(),
                id: 42,
                redelivered: true,
                exchange: String::new(),
                routing_key: "q".into(),
                properties: Bytes::new(),
                body: Bytes::from_static(b"x"),
            },
            Traffic::Settle {
                how: Settlement::Requeue,
                ids: vec![1, 2, 40],
            },
            Traffic::Get {
                origin,
                vhost: "/".into(),
                queue: "q".into(),
                no_ack: true,
            },
            Traffic::Answer {
                origin,
                outcome: QueueAnswer::Empty,
            },
            Traffic::Purge {
                origin,
                vhost: "/".into(),
                queue: "q".into(),
            },
            Traffic::Answer {
                origin,
                outcome: QueueAnswer::Purged { message_count: 12 },
            },
            Traffic::Peek {
                origin,
                vhost: "/".into(),
                queue: "q".into(),
                start: -3,
                stop: -1,
            },
            Traffic::Answer {
                origin,
                outcome: QueueAnswer::Peeked {
                    length: 5,
                    bodies: vec![Bytes::from_static(b"a"), Bytes::new()],
                },
            },
            Traffic::Answer {
                origin,
                outcome: QueueAnswer::Error {
                    code: 404,
                    text: "NOT_FOUND".into(),
                },
            },
            Traffic::Answer {
                origin,
                outcome: QueueAnswer::Message {
                    id: 3,
                    redelivered: false,
                    exchange: "x".into(),
                    routing_key: "k".into(),
                    message_count: 7,
                    properties: Bytes::from_static(&[0, 0]),
                    body: Bytes::from_static(b"got"),
                },
            },
        ];
        for t in frames {
            assert_eq!(Traffic::decode(t.encode()).unwrap(), t);
        }
    }

    #[test]
    fn truncated_or_padded_frames_are_refused_not_misread() {
        let t = Traffic::Settle {
            how: Settlement::Ack,
            ids: vec![1, 2],
        }
        .encode();
        for cut in 0..t.len() {
            assert!(Traffic::decode(t.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut padded = BytesMut::from(&t[..]);
        padded.put_u8(0);
        assert!(Traffic::decode(padded.freeze()).is_err());
        // A count larger than the frame could hold is refused before any
        // allocation.
        let mut huge = BytesMut::new();
        huge.put_u8(SETTLE);
        huge.put_u8(0);
        huge.put_u32_le(u32::MAX);
        assert!(Traffic::decode(huge.freeze()).is_err());
    }
}
