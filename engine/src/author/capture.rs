//! Capturing what is published to an exchange, to test a plugin version
//! offline against real traffic (`wasmq capture`, `wasmq plugin test`).
//!
//! A capture is off unless an administrator asks for one, and bounded:
//! by a count of messages, by bytes, and by a sample (one message in K).
//! It records messages as their publishers sent them, before any
//! transform: routing key, properties in their wire encoding, body, each
//! copied out of the buffers it arrived in. What a capture holds is what
//! it counts against its `max_bytes` (those bytes plus
//! [`HELD_OVERHEAD`] per message): decoded headers can be many times
//! their wire size, so they are decoded, and made readable as a
//! [`Captured`], only when the capture is taken, a few messages at a time
//! ([`Capture::json_chunks`]). While no capture runs, the publish path
//! pays one relaxed load of `Exchange::capturing`.
//!
//! The same [`Captured`] form is what `wasmq plugin test` reads back
//! (JSON lines), and a hand-written line with only a routing key, headers
//! and a body is a valid one too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::ShortString;
use base64::Engine as _;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;

use crate::json::{json_to_table, table_to_json};
use crate::message::Message;

/// Most bytes one capture may hold, whatever was asked.
pub const MAX_CAPTURE_BYTES: usize = 64 << 20;
/// What a held message costs beyond its bytes (its record and the
/// allocations' headers), counted against the capture's bytes so that
/// many empty messages are bounded too.
pub const HELD_OVERHEAD: usize = 160;

/// A message as a capture holds it: its bytes as they came, copied.
#[derive(Debug)]
struct Held {
    exchange: String,
    routing_key: String,
    properties: Bytes,
    body: Bytes,
    published_ms: u64,
}

impl Held {
    fn of(m: &Message) -> Held {
        Held {
            exchange: m.exchange.clone(),
            routing_key: m.routing_key.clone(),
            properties: Bytes::copy_from_slice(m.encoded_properties()),
            body: Bytes::copy_from_slice(&m.body),
            published_ms: crate::message::now_ms(),
        }
    }

    /// What it costs the capture.
    fn size(m: &Message) -> usize {
        m.body.len()
            + m.encoded_properties().len()
            + m.routing_key.len()
            + m.exchange.len()
            + HELD_OVERHEAD
    }

    fn captured(&self, vhost: &str) -> Captured {
        let properties = crate::message::decode_properties(&self.properties).unwrap_or_default();
        let m = Message::new(
            self.exchange.as_str(),
            self.routing_key.as_str(),
            properties,
            self.body.clone(),
        )
        .with_encoded_properties(self.properties.clone());
        let mut c = Captured::of(vhost, &m);
        c.published_ms = self.published_ms;
        c
    }
}

/// A message as captured (one JSON line).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Captured {
    /// The virtual host.
    pub vhost: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties, readable (used when `properties_raw` is absent).
    pub properties: CapturedProperties,
    /// Its properties exactly as encoded (base64), as plugins read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties_raw: Option<String>,
    /// The body: text, or base64 when `body_encoding` says so.
    pub body: String,
    /// `base64` for a body that is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_encoding: Option<String>,
    /// When it was published (ms since the epoch).
    pub published_ms: u64,
}

/// The readable properties of a captured message.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CapturedProperties {
    /// Content type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Headers (an object).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub headers: Value,
    /// 2: persistent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    /// Priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Message id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Correlation id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl Captured {
    /// Capture `m`, published to `exchange` in `vhost`.
    pub fn of(vhost: &str, m: &Message) -> Captured {
        let p = &m.properties;
        let b64 = base64::engine::general_purpose::STANDARD;
        let (body, body_encoding) = match std::str::from_utf8(&m.body) {
            Ok(s) => (s.to_owned(), None),
            Err(_) => (b64.encode(&m.body), Some("base64".to_owned())),
        };
        Captured {
            vhost: vhost.to_owned(),
            exchange: m.exchange.to_string(),
            routing_key: m.routing_key.to_string(),
            properties: CapturedProperties {
                content_type: p.content_type().as_ref().map(|s| s.to_string()),
                headers: p.headers().as_ref().map_or(Value::Null, table_to_json),
                delivery_mode: *p.delivery_mode(),
                priority: *p.priority(),
                message_id: p.message_id().as_ref().map(|s| s.to_string()),
                correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
            },
            properties_raw: Some(b64.encode(m.encoded_properties())),
            body,
            body_encoding,
            published_ms: crate::message::now_ms(),
        }
    }

    /// The message again, as its publisher sent it.
    pub fn message(&self) -> Result<Message, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let properties = match &self.properties_raw {
            Some(raw) => {
                let bytes = b64
                    .decode(raw)
                    .map_err(|e| format!("properties_raw: {e}"))?;
                crate::message::decode_properties(&bytes)
                    .map_err(|e| format!("properties_raw: {e}"))?
            }
            None => {
                let p = &self.properties;
                let mut props = BasicProperties::default();
                if let Some(c) = &p.content_type {
                    props = props.with_content_type(ShortString::from(c.as_str()));
                }
                if !p.headers.is_null() {
                    props = props.with_headers(json_to_table(&p.headers)?);
                }
                if let Some(d) = p.delivery_mode {
                    props = props.with_delivery_mode(d);
                }
                if let Some(x) = p.priority {
                    props = props.with_priority(x);
                }
                if let Some(id) = &p.message_id {
                    props = props.with_message_id(ShortString::from(id.as_str()));
                }
                if let Some(id) = &p.correlation_id {
                    props = props.with_correlation_id(ShortString::from(id.as_str()));
                }
                props
            }
        };
        let body = match self.body_encoding.as_deref() {
            None | Some("utf8") => self.body.clone().into_bytes(),
            Some("base64") => b64.decode(&self.body).map_err(|e| format!("body: {e}"))?,
            Some(other) => return Err(format!("body_encoding '{other}': use base64 or none")),
        };
        Ok(Message::new(
            self.exchange.as_str(),
            self.routing_key.as_str(),
            properties,
            body,
        ))
    }
}

/// What to capture.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureSpec {
    /// Messages to keep.
    pub count: usize,
    /// Keep one message in this many (1: every one).
    pub sample: u64,
    /// Bytes to keep at most (bodies and properties).
    pub max_bytes: usize,
}

impl Default for CaptureSpec {
    fn default() -> Self {
        CaptureSpec {
            count: 100,
            sample: 1,
            max_bytes: 16 << 20,
        }
    }
}

/// One running or finished capture.
#[derive(Debug)]
pub struct Capture {
    /// What was asked.
    pub spec: CaptureSpec,
    /// The exchange's vhost.
    vhost: String,
    /// Messages published to the exchange since it started.
    pub seen: AtomicU64,
    bytes: AtomicUsize,
    done: AtomicBool,
    kept: Mutex<Vec<Held>>,
}

impl Capture {
    /// A capture of `spec` in `vhost`, bounded by [`MAX_CAPTURE_BYTES`].
    pub fn new(vhost: &str, mut spec: CaptureSpec) -> Arc<Capture> {
        spec.max_bytes = spec.max_bytes.min(MAX_CAPTURE_BYTES);
        spec.sample = spec.sample.max(1);
        Arc::new(Capture {
            spec,
            vhost: vhost.to_owned(),
            seen: AtomicU64::new(0),
            bytes: AtomicUsize::new(0),
            done: AtomicBool::new(false),
            kept: Mutex::new(Vec::new()),
        })
    }

    /// Whether it has all it asked for (or hit its byte bound).
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// Messages kept so far.
    pub fn len(&self) -> usize {
        self.kept.lock().len()
    }

    /// Whether nothing was kept yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, as counted against `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The messages kept, in order, readable.
    pub fn messages(&self) -> Vec<Captured> {
        self.kept
            .lock()
            .iter()
            .map(|h| h.captured(&self.vhost))
            .collect()
    }

    /// Take the kept messages as one JSON array, in pieces of about
    /// `chunk` bytes: each message is made readable only when its piece is
    /// made, and let go once it is written.
    pub fn json_chunks(&self, chunk: usize) -> impl Iterator<Item = Bytes> + use<> {
        let kept = std::mem::take(&mut *self.kept.lock());
        let vhost = self.vhost.clone();
        let mut messages = kept.into_iter();
        let mut started = false;
        let mut ended = false;
        std::iter::from_fn(move || {
            if ended {
                return None;
            }
            let mut out = Vec::with_capacity(chunk.min(1 << 20));
            if !started {
                out.push(b'[');
            }
            for held in messages.by_ref() {
                if started {
                    out.push(b',');
                }
                started = true;
                serde_json::to_writer(&mut out, &held.captured(&vhost))
                    .expect("a captured message serializes");
                if out.len() >= chunk {
                    return Some(Bytes::from(out));
                }
            }
            if !started {
                started = true;
            }
            out.push(b']');
            ended = true;
            Some(Bytes::from(out))
        })
    }

    /// Offer a published message; returns whether the capture is done.
    pub(crate) fn offer(&self, m: &Message) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if !n.is_multiple_of(self.spec.sample) {
            return false;
        }
        let size = Held::size(m);
        let mut kept = self.kept.lock();
        if self.done() {
            return true;
        }
        if self.bytes.load(Ordering::Relaxed) + size > self.spec.max_bytes {
            self.done.store(true, Ordering::Relaxed);
            return true;
        }
        self.bytes.fetch_add(size, Ordering::Relaxed);
        kept.push(Held::of(m));
        let done = kept.len() >= self.spec.count;
        if done {
            self.done.store(true, Ordering::Relaxed);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(key: &str, body: &[u8]) -> Message {
        let mut headers = amq_protocol::types::FieldTable::default();
        headers.insert(
            "tenant".into(),
            amq_protocol::types::AMQPValue::LongString("acme".into()),
        );
        Message::new(
            "x",
            key,
            BasicProperties::default()
                .with_headers(headers)
                .with_content_type("application/json".into()),
            body.to_vec(),
        )
    }

    #[test]
    fn a_captured_message_comes_back_as_published() {
        for body in [&b"{\"a\": 1}"[..], &[0xff, 0xfe, 0x00][..]] {
            let m = message("orders.eu", body);
            let c = Captured::of("/", &m);
            let line = serde_json::to_string(&c).unwrap();
            let back: Captured = serde_json::from_str(&line).unwrap();
            let again = back.message().unwrap();
            assert_eq!(again.routing_key, m.routing_key);
            assert_eq!(again.body, m.body);
            assert_eq!(again.properties, m.properties);
            // Without the exact encoding, the readable properties serve.
            let readable = Captured {
                properties_raw: None,
                ..back
            };
            assert_eq!(readable.message().unwrap().properties, m.properties);
        }
        let by_hand: Captured = serde_json::from_str(
            r#"{"routing_key": "k", "properties": {"headers": {"h": "v"}}, "body": "hi"}"#,
        )
        .unwrap();
        assert_eq!(&by_hand.message().unwrap().body[..], b"hi");
    }

    #[test]
    fn a_capture_keeps_a_sample_up_to_its_count_and_bytes() {
        let c = Capture::new(
            "/",
            CaptureSpec {
                count: 3,
                sample: 2,
                max_bytes: 1 << 20,
            },
        );
        let m = message("k", b"body");
        let done: Vec<bool> = (0..6).map(|_| c.offer(&m)).collect();
        assert_eq!(done, [false, false, false, false, true, false]);
        assert_eq!((c.len(), c.seen.load(Ordering::Relaxed)), (3, 6));
        let one = Held::size(&message("k", &[b'x'; 60]));
        let small = Capture::new(
            "/",
            CaptureSpec {
                count: 100,
                sample: 1,
                max_bytes: one + one / 2,
            },
        );
        let big = message("k", &[b'x'; 60]);
        assert!(!small.offer(&big));
        assert!(small.offer(&big), "over its bytes: done");
        assert_eq!(small.len(), 1);
    }

    #[test]
    fn empty_messages_are_bounded_by_their_overhead() {
        let c = Capture::new(
            "/",
            CaptureSpec {
                count: usize::MAX,
                sample: 1,
                max_bytes: 1 << 20,
            },
        );
        let m = message("", b"");
        let mut offered = 0;
        while !c.offer(&m) {
            offered += 1;
            assert!(offered < 1 << 20, "never done");
        }
        assert!(c.len() <= (1 << 20) / HELD_OVERHEAD, "{}", c.len());
        assert!(c.bytes() <= 1 << 20);
    }

    #[test]
    fn a_capture_is_taken_as_one_json_array_in_pieces() {
        let c = Capture::new(
            "v",
            CaptureSpec {
                count: 50,
                sample: 1,
                max_bytes: 1 << 20,
            },
        );
        for i in 0..50 {
            c.offer(&message(&format!("k{i}"), &[b'y'; 100]));
        }
        let readable = c.messages();
        let pieces: Vec<Bytes> = c.json_chunks(1024).collect();
        assert!(pieces.len() > 3, "{} pieces", pieces.len());
        assert!(pieces.iter().all(|p| p.len() < 1024 + 512));
        let whole: Vec<u8> = pieces.concat();
        let back: Vec<Captured> = serde_json::from_slice(&whole).unwrap();
        assert_eq!(back, readable);
        assert_eq!(back[7].routing_key, "k7");
        assert_eq!(back[7].vhost, "v");
        assert!(c.is_empty(), "taking lets the messages go");
        let none = Capture::new("v", CaptureSpec::default());
        assert_eq!(none.json_chunks(10).collect::<Vec<_>>().concat(), b"[]");
    }
}
