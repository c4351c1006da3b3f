//! The bytes on disk: segment and ack-file headers, message records and ack
//! entries, each checksummed with CRC-32 (IEEE; `crc32fast` computes it
//! with the CPU's carry-less multiply, several GB/s, so recovery can check
//! every record of a large backlog).
//!
//! A message record is `len: u32 LE | crc: u32 LE | payload[len]`, the CRC
//! over the payload. The payload starts with a fixed part so that recovery
//! can rebuild a queue's index (size, expiry) without decoding properties:
//!
//! ```text
//! kind u8 = 1 | published_ms u64 | ttl_ms u64 (u64::MAX: none) | body_len u32
//! | exchange_len u8 | exchange | key_len u8 | key
//! | props_len u32 | properties (AMQP wire encoding) | body
//! ```
//!
//! A message with a priority (for `x-max-priority` queues) is written as
//! kind 2, whose fixed part has the priority byte right after the kind:
//! `kind u8 = 2 | priority u8 | published_ms ...`. Messages without one
//! keep the kind-1 layout, so files written before priorities existed read
//! the same.
//!
//! An ack entry is `offset: u32 LE | crc: u32 LE` (the CRC of the offset's
//! four bytes): the record at that offset of the segment is settled.

use bytes::Bytes;

use crate::message::{Message, decode_properties};

/// First bytes of a segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"wasmqseg";
/// First bytes of an ack file.
pub const ACK_MAGIC: &[u8; 8] = b"wasmqack";
/// Format version, after the magic.
pub const FORMAT_VERSION: u32 = 1;
/// Header size of both file kinds: magic, version, reserved.
pub const HEADER_LEN: u64 = 16;
/// Record header: length and CRC.
pub const RECORD_HEADER_LEN: usize = 8;
/// Size of one ack entry.
pub const ACK_LEN: usize = 8;
/// Records larger than this are taken as corrupt lengths (AMQP bodies
/// are bounded by memory long before).
pub const MAX_RECORD: u32 = 512 << 20;

const KIND_MESSAGE: u8 = 1;
const KIND_PRIORITY_MESSAGE: u8 = 2;
const FIXED: usize = 1 + 8 + 8 + 4;

/// Where the fixed part's fields start (after the kind, and the priority
/// byte of kind 2), or `None` for an unknown kind.
fn fields_at(payload: &[u8]) -> Option<usize> {
    match payload.first() {
        Some(&KIND_MESSAGE) => Some(1),
        Some(&KIND_PRIORITY_MESSAGE) => Some(2),
        _ => None,
    }
}

/// The header of a new file of either kind.
pub fn file_header(magic: &[u8; 8]) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// Check a file header; the error says what is wrong.
pub fn check_header(h: &[u8], magic: &[u8; 8]) -> Result<(), String> {
    if h.len() < HEADER_LEN as usize || &h[..8] != magic {
        return Err("not a wasmq store file (bad magic)".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!(
            "store format version {version}, this broker reads version {FORMAT_VERSION}"
        ));
    }
    Ok(())
}

/// What recovery needs of a record without decoding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// When it was published (Unix milliseconds).
    pub published_ms: u64,
    /// The message's own TTL (`expiration`), if any.
    pub ttl_ms: Option<u64>,
    /// Body length.
    pub body_len: u32,
    /// The message's priority (0 when it has none).
    pub priority: u8,
}

/// The length of `m`'s record, header included ([`encode_message`] writes
/// exactly this many bytes).
pub fn encoded_len(m: &Message, meta: RecordMeta) -> usize {
    RECORD_HEADER_LEN
        + FIXED
        + usize::from(meta.priority != 0)
        + 1
        + m.exchange.len().min(255)
        + 1
        + m.routing_key.len().min(255)
        + 4
        + m.encoded_properties().len()
        + m.body.len()
}

/// Append the record of `m` (header included) to `out`.
pub fn encode_message(out: &mut Vec<u8>, m: &Message, meta: RecordMeta) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    if meta.priority == 0 {
        out.push(KIND_MESSAGE);
    } else {
        out.push(KIND_PRIORITY_MESSAGE);
        out.push(meta.priority);
    }
    out.extend_from_slice(&meta.published_ms.to_le_bytes());
    out.extend_from_slice(&meta.ttl_ms.unwrap_or(u64::MAX).to_le_bytes());
    out.extend_from_slice(&meta.body_len.to_le_bytes());
    // Exchange names and routing keys are AMQP short strings (≤ 255 bytes).
    let short = |out: &mut Vec<u8>, s: &str| {
        let b = &s.as_bytes()[..s.len().min(255)];
        out.push(b.len() as u8);
        out.extend_from_slice(b);
    };
    short(out, &m.exchange);
    short(out, &m.routing_key);
    let props = m.encoded_properties();
    out.extend_from_slice(&(props.len() as u32).to_le_bytes());
    out.extend_from_slice(props);
    out.extend_from_slice(&m.body);
    let payload = &out[start + RECORD_HEADER_LEN..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Read a record header: payload length and CRC.
pub fn record_header(h: &[u8; RECORD_HEADER_LEN]) -> (u32, u32) {
    (
        u32::from_le_bytes(h[..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(h[4..].try_into().expect("4 bytes")),
    )
}

/// Whether `payload` matches its CRC.
pub fn crc_ok(payload: &[u8], crc: u32) -> bool {
    crc32fast::hash(payload) == crc
}

/// The fixed part of a checked payload.
pub fn decode_meta(payload: &[u8]) -> Result<RecordMeta, String> {
    let Some(f) = fields_at(payload).filter(|f| payload.len() >= FIXED - 1 + f) else {
        return Err("unknown record kind".into());
    };
    let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
    let ttl = u64_at(f + 8);
    Ok(RecordMeta {
        published_ms: u64_at(f),
        ttl_ms: (ttl != u64::MAX).then_some(ttl),
        body_len: u32::from_le_bytes(payload[f + 16..f + 20].try_into().expect("4 bytes")),
        priority: if f == 2 { payload[1] } else { 0 },
    })
}

/// The message in a checked payload. The body shares `payload`'s buffer.
pub fn decode_message(payload: Bytes) -> Result<Message, String> {
    decode_meta(&payload)?;
    let bad = || "truncated message record".to_string();
    let mut at = FIXED - 1 + fields_at(&payload).expect("checked by decode_meta");
    let short = |at: &mut usize| -> Result<String, String> {
        let n = *payload.get(*at).ok_or_else(bad)? as usize;
        let s = payload.get(*at + 1..*at + 1 + n).ok_or_else(bad)?;
        *at += 1 + n;
        Ok(String::from_utf8_lossy(s).into_owned())
    };
    let exchange = short(&mut at)?;
    let key = short(&mut at)?;
    let n = u32::from_le_bytes(
        payload
            .get(at..at + 4)
            .ok_or_else(bad)?
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    at += 4;
    let raw = payload.get(at..at + n).ok_or_else(bad)?;
    let properties = decode_properties(raw).map_err(|e| format!("stored properties: {e}"))?;
    let raw = payload.slice(at..at + n);
    let body = payload.slice(at + n..);
    Ok(Message::new(exchange, key, properties, body).with_encoded_properties(raw))
}

/// The top bit of an ack entry's offset: the entry records a return, not
/// an ack (see `log`).
pub const RETURNED: u32 = 1 << 31;

/// An ack entry: `offset` (with [`RETURNED`] for a return) and its CRC.
pub fn encode_ack(out: &mut Vec<u8>, offset: u32) {
    let b = offset.to_le_bytes();
    out.extend_from_slice(&b);
    out.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
}

/// The offset in an ack entry, `None` if its CRC does not match.
pub fn decode_ack(e: &[u8]) -> Option<u32> {
    let offset: [u8; 4] = e[..4].try_into().ok()?;
    let crc = u32::from_le_bytes(e[4..8].try_into().ok()?);
    (crc32fast::hash(&offset) == crc).then(|| u32::from_le_bytes(offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;

    #[test]
    fn a_message_round_trips() {
        let m = Message::new(
            "ex",
            "a.b",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id("m-1".into()),
            &b"hello"[..],
        );
        let meta = RecordMeta {
            published_ms: 42,
            ttl_ms: Some(5),
            body_len: 5,
            priority: 0,
        };
        let mut out = Vec::new();
        encode_message(&mut out, &m, meta);
        let (len, crc) = record_header(out[..8].try_into().unwrap());
        assert_eq!(len as usize, out.len() - 8);
        assert!(crc_ok(&out[8..], crc));
        assert_eq!(decode_meta(&out[8..]).unwrap(), meta);
        let back = decode_message(Bytes::copy_from_slice(&out[8..])).unwrap();
        assert_eq!(
            (back.exchange.as_str(), back.routing_key.as_str()),
            ("ex", "a.b")
        );
        assert_eq!(back.properties, m.properties);
        assert_eq!(&back.body[..], b"hello");
        out[20] ^= 1;
        assert!(!crc_ok(&out[8..], crc));
    }

    #[test]
    fn a_priority_survives_in_a_kind_2_record() {
        let m = Message::new(
            "",
            "q",
            BasicProperties::default().with_priority(7),
            &b"urgent"[..],
        );
        let meta = RecordMeta {
            published_ms: 9,
            ttl_ms: None,
            body_len: 6,
            priority: 7,
        };
        let mut out = Vec::new();
        encode_message(&mut out, &m, meta);
        assert_eq!(out[8], KIND_PRIORITY_MESSAGE);
        assert_eq!(decode_meta(&out[8..]).unwrap(), meta);
        let back = decode_message(Bytes::copy_from_slice(&out[8..])).unwrap();
        assert_eq!(
            (back.routing_key.as_str(), &back.body[..]),
            ("q", &b"urgent"[..])
        );
        assert_eq!(back.properties.priority(), &Some(7));
        assert!(
            decode_meta(&[3u8; 40]).is_err(),
            "unknown kinds are refused"
        );
    }

    #[test]
    fn ack_entries_carry_their_own_checksum() {
        let mut out = Vec::new();
        encode_ack(&mut out, 1234);
        assert_eq!(decode_ack(&out), Some(1234));
        out[0] ^= 1;
        assert_eq!(decode_ack(&out), None);
    }
}
