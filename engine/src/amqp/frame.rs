//! AMQP 0-9-1 frames, without sockets: decode from a byte buffer, encode
//! into one.
//!
//! Methods are encoded and decoded by `amq-protocol`. Framing is ours,
//! because the server side needs three things its frame parser does not
//! give: the negotiated `frame_max` enforced from the 7-byte header *before*
//! the payload is buffered; body frames as zero-copy `Bytes` slices of the
//! read buffer; and the content header's raw property bytes, which plugins
//! read as they are instead of re-encoding them.

use amq_protocol::frame::{AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The AMQP 0-9-1 protocol header a client must open with.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame-end octet.
const FRAME_END: u8 = 0xCE;
/// Frame header: type, channel, size.
const HEADER_LEN: usize = 7;

/// A decoded frame.
#[derive(Debug)]
// Frames are handled where they are decoded, never queued: a large
// variant costs stack, while boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub enum Frame {
    /// A method.
    Method(u16, AMQPClass),
    /// A content header.
    Header {
        /// Channel.
        channel: u16,
        /// Class (60 for basic).
        class_id: u16,
        /// Body size announced.
        body_size: u64,
        /// Decoded properties (not boxed: a frame is handled where it is
        /// decoded, so its size costs nothing, and a box would be one more
        /// allocation per message).
        properties: BasicProperties,
        /// The property bytes as received (flags and fields).
        raw_properties: Bytes,
    },
    /// A body chunk.
    Body(u16, Bytes),
    /// A heartbeat (channel must be 0).
    Heartbeat(u16),
}

/// A frame that cannot be decoded: always a connection error.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Bigger than the negotiated frame_max (501).
    #[error("FRAME_ERROR - frame of {size} bytes exceeds frame_max {max}")]
    TooLarge {
        /// Its size, header and end included.
        size: u64,
        /// The limit.
        max: u32,
    },
    /// Missing frame-end octet, unknown type, or bad payload (501/502).
    #[error("FRAME_ERROR - {0}")]
    Malformed(String),
    /// A method or header whose fields do not decode (502).
    #[error("SYNTAX_ERROR - {0}")]
    Syntax(String),
}

impl FrameError {
    /// The AMQP reply code.
    pub fn reply_code(&self) -> u16 {
        match self {
            FrameError::TooLarge { .. } | FrameError::Malformed(_) => 501,
            FrameError::Syntax(_) => 502,
        }
    }
}

/// Decode one frame from the front of `buf`. `Ok(None)`: not enough bytes
/// yet (the normal state of a stream decoder, not an error).
pub fn decode(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    let total = HEADER_LEN + size + 1;
    if total as u64 > u64::from(frame_max) {
        return Err(FrameError::TooLarge {
            size: total as u64,
            max: frame_max,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(FrameError::Malformed(format!(
            "frame-end octet missing (found {:#04x})",
            buf[total - 1]
        )));
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(HEADER_LEN);
    let payload = frame.slice(..size);
    Ok(Some(match kind {
        1 => match decode_publish(&payload) {
            Some(publish) => Frame::Method(channel, publish),
            None => match super::field_table::check_method(&payload)
                .map_err(|e| FrameError::Syntax(e.to_string()))
                .map(|()| amq_protocol::protocol::parse_class(&payload[..]))?
            {
                Ok(([], class)) => Frame::Method(channel, class),
                Ok(_) => {
                    return Err(FrameError::Syntax(
                        "trailing bytes after method arguments".into(),
                    ));
                }
                Err(e) => return Err(FrameError::Syntax(format!("cannot decode method: {e}"))),
            },
        },
        2 => {
            if payload.len() < 14 {
                return Err(FrameError::Syntax("content header too short".into()));
            }
            let class_id = u16::from_be_bytes([payload[0], payload[1]]);
            let body_size = u64::from_be_bytes(payload[4..12].try_into().unwrap());
            let raw_properties = payload.slice(12..);
            let properties = crate::message::decode_properties(&raw_properties)
                .map_err(|e| FrameError::Syntax(e.to_string()))?;
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
                raw_properties,
            }
        }
        3 => Frame::Body(channel, payload),
        8 => Frame::Heartbeat(channel),
        other => return Err(FrameError::Malformed(format!("unknown frame type {other}"))),
    }))
}

/// Append a method frame.
pub fn encode_method(out: &mut Vec<u8>, channel: u16, method: AMQPClass) {
    let frame = AMQPFrame::Method(channel, method);
    let taken = std::mem::take(out);
    *out = cookie_factory::gen_simple(gen_frame(&frame), taken)
        .expect("writing a frame to a Vec cannot fail");
}

/// `basic.publish`, the method of every published message, read field by
/// field (class 60, method 40: reserved short, exchange and routing key as
/// short strings, then the mandatory and immediate bits). amq-protocol's
/// combinator parser took ~5% of the broker's CPU in an unpaced publish
/// run. Anything else, or anything unusual about this one (a string that
/// is not UTF-8, trailing bytes), is left to amq-protocol, so errors read
/// the same.
fn decode_publish(p: &[u8]) -> Option<AMQPClass> {
    let rest = p.strip_prefix(&[0, 60, 0, 40])?.get(2..)?;
    let (exchange, rest) = short_str(rest)?;
    let (routing_key, rest) = short_str(rest)?;
    let [bits] = rest else { return None };
    if bits & !3 != 0 {
        return None;
    }
    Some(AMQPClass::Basic(basic::AMQPMethod::Publish(
        basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        },
    )))
}

/// A short string (length octet, then UTF-8) and what follows it.
fn short_str(p: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = p.split_first()?;
    let (s, rest) = rest.split_at_checked(usize::from(len))?;
    Some((std::str::from_utf8(s).ok()?, rest))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary. Every text the broker cuts to fit goes through here:
/// `String::truncate` at a byte count panics inside a multi-byte character,
/// and a reply text is often built from client input (a consumer tag, a
/// vhost name) or a plugin's fault message.
pub fn short_text(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` as an AMQP short string, cut to its 255 bytes on a character
/// boundary. amq-protocol's encoder panics on a longer one, so every short
/// string the broker builds from text of its own (reply texts, reasons) is
/// made here.
pub fn short_string(s: &str) -> amq_protocol::types::ShortString {
    short_text(s, 255).into()
}

/// Append a short string (length octet, then bytes). Every caller passes a
/// string that came in as one (≤ 255 bytes); a longer one is cut rather
/// than let it corrupt the frame.
fn put_short(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= 255, "short string over 255 bytes");
    let b = short_text(s, 255).as_bytes();
    out.put_u8(b.len() as u8);
    out.extend_from_slice(b);
}

/// Start a method frame of class/method; returns where its size goes.
fn method_start(out: &mut Vec<u8>, channel: u16, class: u16, method: u16) -> usize {
    out.put_u8(1);
    out.put_u16(channel);
    let at = out.len();
    out.put_u32(0);
    out.put_u16(class);
    out.put_u16(method);
    at
}

/// Finish a method frame: its size, then frame-end.
fn method_end(out: &mut Vec<u8>, at: usize) {
    let size = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

/// Append `basic.deliver`. This and the confirms below are the frames a
/// busy broker sends most, so they are written field by field rather than
/// built as an `AMQPClass` (which copies the consumer tag, exchange and
/// routing key into new strings) and run through the generic encoder.
/// Tests decode them with amq-protocol.
pub fn encode_deliver(
    out: &mut Vec<u8>,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    let at = method_start(out, channel, 60, 60);
    put_short(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short(out, exchange);
    put_short(out, routing_key);
    method_end(out, at);
}

/// Append a publisher confirm: `basic.ack`, or `basic.nack` (never with
/// requeue: that bit only means something from a client).
pub fn encode_confirm(
    out: &mut Vec<u8>,
    channel: u16,
    delivery_tag: u64,
    multiple: bool,
    ack: bool,
) {
    let at = method_start(out, channel, 60, if ack { 80 } else { 120 });
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(multiple));
    method_end(out, at);
}

/// Append a heartbeat frame.
pub fn encode_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Append a content header and the body, split into frames of at most
/// `frame_max` bytes (payload `frame_max - 8`).
pub fn encode_content(
    out: &mut Vec<u8>,
    channel: u16,
    raw_properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    let mut put = |kind: u8, payload_len: usize| {
        out.put_u8(kind);
        out.put_u16(channel);
        out.put_u32(payload_len as u32);
    };
    put(2, 12 + raw_properties.len());
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    out.extend_from_slice(raw_properties);
    out.put_u8(FRAME_END);
    let chunk = (frame_max as usize).saturating_sub(8).max(1);
    for part in body.chunks(chunk) {
        out.put_u8(3);
        out.put_u16(channel);
        out.put_u32(part.len() as u32);
        out.extend_from_slice(part);
        out.put_u8(FRAME_END);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{basic, channel, exchange, queue};
    use amq_protocol::types::FieldTable;

    #[test]
    fn hand_read_publish_agrees_with_amq_protocol() {
        let long = "k".repeat(255);
        for (exchange, key, mandatory, immediate) in [
            ("", "q", false, false),
            ("amq.topic", "a.b.c", true, false),
            ("x", "", false, true),
            ("ünïcode", "ключ.é", true, true),
            (long.as_str(), long.as_str(), true, false),
        ] {
            let mut out = Vec::new();
            encode_method(
                &mut out,
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: exchange.into(),
                    routing_key: key.into(),
                    mandatory,
                    immediate,
                })),
            );
            let payload = &out[7..out.len() - 1];
            let ours = decode_publish(payload).expect("a plain publish is read by hand");
            let theirs = amq_protocol::protocol::parse_class(payload).unwrap().1;
            assert_eq!(ours, theirs);
            // Every truncation, and a trailing byte, go to amq-protocol.
            for cut in 0..payload.len() {
                assert!(decode_publish(&payload[..cut]).is_none(), "cut at {cut}");
            }
            let mut longer = payload.to_vec();
            longer.push(0);
            assert!(decode_publish(&longer).is_none());
        }
        // A routing key that is not UTF-8 is left to amq-protocol.
        let bad = [0, 60, 0, 40, 0, 0, 0, 2, 0xff, 0xfe, 0];
        assert!(decode_publish(&bad).is_none());
    }

    #[test]
    fn empty_properties_decode_as_parsed() {
        let parsed = amq_protocol::protocol::basic::parse_properties(&[0u8, 0][..])
            .unwrap()
            .1;
        assert_eq!(crate::message::decode_properties(&[0, 0]), Ok(parsed));
    }

    /// amq-protocol's decoding of what the hand-written encoders wrote.
    fn decoded(out: &[u8]) -> Frame {
        let mut buf = BytesMut::from(out);
        let f = decode(&mut buf, 131_072).unwrap().unwrap();
        assert!(buf.is_empty(), "one whole frame");
        f
    }

    #[test]
    fn hand_written_deliver_decodes_as_amq_protocol_reads_it() {
        for (tag, redelivered, exchange, key) in [
            ("amq.ctag-1", false, "", "q"),
            ("c", true, "amq.topic", "a.b.c"),
            ("", false, "x", ""),
        ] {
            let mut out = vec![9];
            encode_deliver(&mut out, 3, tag, 42, redelivered, exchange, key);
            let Frame::Method(3, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) =
                decoded(&out[1..])
            else {
                panic!("not a deliver");
            };
            assert_eq!(
                d,
                basic::Deliver {
                    consumer_tag: tag.into(),
                    delivery_tag: 42,
                    redelivered,
                    exchange: exchange.into(),
                    routing_key: key.into(),
                }
            );
        }
        let long = "k".repeat(255);
        let mut out = Vec::new();
        encode_deliver(&mut out, 1, "t", u64::MAX, false, &long, &long);
        assert!(matches!(
            decoded(&out),
            Frame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d)))
                if d.routing_key.as_str() == long && d.delivery_tag == u64::MAX
        ));
    }

    #[test]
    fn hand_written_confirms_decode_as_amq_protocol_reads_them() {
        for multiple in [false, true] {
            let mut out = Vec::new();
            encode_confirm(&mut out, 2, 7, multiple, true);
            encode_confirm(&mut out, 2, 8, multiple, false);
            let mut buf = BytesMut::from(&out[..]);
            let ack = decode(&mut buf, 4096).unwrap().unwrap();
            let nack = decode(&mut buf, 4096).unwrap().unwrap();
            assert!(matches!(
                ack,
                Frame::Method(2, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))
                    if a == basic::Ack { delivery_tag: 7, multiple }
            ));
            assert!(matches!(
                nack,
                Frame::Method(2, AMQPClass::Basic(basic::AMQPMethod::Nack(n)))
                    if n == basic::Nack { delivery_tag: 8, multiple, requeue: false }
            ));
        }
    }

    /// Round-trip one client method through amq-protocol's encoder and our
    /// decoder: the same helper for every method.
    fn round_trip(method: AMQPClass) {
        let mut out = Vec::new();
        encode_method(&mut out, 7, method.clone());
        let mut buf = BytesMut::from(&out[..]);
        match decode(&mut buf, 131_072).unwrap().unwrap() {
            Frame::Method(7, decoded) => assert_eq!(decoded, method),
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn client_methods_round_trip() {
        let mut args = FieldTable::default();
        args.insert(
            "x-match".into(),
            amq_protocol::types::AMQPValue::LongString("any".into()),
        );
        let methods = vec![
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: "x".into(),
                kind: "topic".into(),
                passive: false,
                durable: true,
                auto_delete: true,
                internal: false,
                nowait: true,
                arguments: args.clone(),
            })),
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "q".into(),
                passive: true,
                durable: false,
                exclusive: true,
                auto_delete: false,
                nowait: true,
                arguments: args.clone(),
            })),
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "a.*".into(),
                nowait: false,
                arguments: args,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "x".into(),
                routing_key: "k".into(),
                mandatory: true,
                immediate: false,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "q".into(),
                consumer_tag: "c".into(),
                no_local: false,
                no_ack: true,
                exclusive: true,
                nowait: false,
                arguments: FieldTable::default(),
            })),
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 42,
                multiple: true,
                requeue: false,
            })),
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 10,
                global: true,
            })),
        ];
        for m in methods {
            round_trip(m);
        }
    }

    #[test]
    fn short_texts_are_cut_on_character_boundaries() {
        let tag = format!("a{}", "é".repeat(127));
        assert_eq!(tag.len(), 255);
        let text = format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'");
        let cut = short_string(&text);
        assert!(cut.as_str().len() <= 255 && text.starts_with(cut.as_str()));
        assert_eq!(short_text("héllo", 2), "h");
        assert_eq!(short_text("héllo", 3), "hé");
        assert_eq!(short_text("abc", 255), "abc");
        // Every cut of a multi-byte text is a prefix on a boundary.
        let s = "ключ€𝄞".repeat(40);
        for max in 0..s.len() {
            let t = short_text(&s, max);
            assert!(t.len() <= max && s.starts_with(t) && t.len() + 4 > max);
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut out = Vec::new();
        encode_heartbeat(&mut out);
        for cut in 0..out.len() {
            let mut buf = BytesMut::from(&out[..cut]);
            assert!(decode(&mut buf, 4096).unwrap().is_none());
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        // Only the 7-byte header is present; the declared size alone decides.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0x10, 0, 0, 0][..]);
        match decode(&mut buf, 131_072) {
            Err(e @ FrameError::TooLarge { .. }) => assert_eq!(e.reply_code(), 501),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn content_is_split_by_frame_max_and_reassembles() {
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let props =
            crate::message::encode_properties(&BasicProperties::default().with_delivery_mode(2));
        let mut out = Vec::new();
        encode_content(&mut out, 3, &props, &body, 4096);
        let mut buf = BytesMut::from(&out[..]);
        let Some(Frame::Header {
            body_size,
            properties,
            ..
        }) = decode(&mut buf, 4096).unwrap()
        else {
            panic!()
        };
        assert_eq!(body_size, 10_000);
        assert_eq!(*properties.delivery_mode(), Some(2));
        let mut got = Vec::new();
        while let Some(f) = decode(&mut buf, 4096).unwrap() {
            let Frame::Body(3, chunk) = f else { panic!() };
            assert!(chunk.len() <= 4096 - 8);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, body);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 2, 0xff, 0xff, 0xCE][..]);
        assert!(decode(&mut buf, 4096).is_err());
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
        assert!(decode(&mut buf, 4096).is_err());
        let mut buf = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0x00][..]);
        assert!(decode(&mut buf, 4096).is_err());
    }
}
