//! The message as the broker holds it: routing key, AMQP properties, body.
//!
//! A published message is wrapped in an `Arc` once and shared by every queue
//! it is routed to; the body is a `Bytes`, so fan-out never copies it.

use std::sync::OnceLock;

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;

/// One published message.
#[derive(Debug)]
pub struct Message {
    /// The exchange it was published to (for deliveries and dead-lettering).
    pub exchange: String,
    /// The routing key (AMQP short string: at most 255 bytes of UTF-8).
    pub routing_key: String,
    /// The AMQP basic properties.
    pub properties: BasicProperties,
    /// The body.
    pub body: Bytes,
    /// The properties in AMQP wire encoding, made at most once: by the AMQP
    /// front end when it has the raw content header, or on the first plugin
    /// that asks for them.
    encoded: OnceLock<Bytes>,
}

impl Message {
    /// A message with no cached property encoding.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        properties: BasicProperties,
        body: impl Into<Bytes>,
    ) -> Self {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties,
            body: body.into(),
            encoded: OnceLock::new(),
        }
    }

    /// A message whose property encoding is already known (from the wire).
    pub fn with_encoded_properties(mut self, encoded: Bytes) -> Self {
        self.encoded = OnceLock::from(encoded);
        self
    }

    /// The properties in AMQP wire encoding (flags then fields).
    pub fn encoded_properties(&self) -> &Bytes {
        self.encoded
            .get_or_init(|| Bytes::from(encode_properties(&self.properties)))
    }

    /// The encoded properties' length, if already encoded.
    pub fn encoded_properties_len(&self) -> Option<usize> {
        self.encoded.get().map(Bytes::len)
    }

    /// A copy with the header `name` set to `value` (the body shared, the
    /// properties encoded again when next needed).
    pub fn with_header(&self, name: &str, value: amq_protocol::types::AMQPValue) -> Message {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(amq_protocol::types::ShortString::from(name), value);
        let props = self.properties.clone().with_headers(headers);
        Message::new(
            self.exchange.clone(),
            self.routing_key.clone(),
            props,
            self.body.clone(),
        )
    }

    /// Whether the publisher asked for the message to be persisted.
    pub fn is_persistent(&self) -> bool {
        *self.properties.delivery_mode() == Some(2)
    }
}

/// Milliseconds since the Unix epoch: when a message was published, a
/// plugin logged, a trace ran. Wall-clock time, because it is stored or
/// shown and must mean the same after a restart and on another node.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Encode AMQP basic properties (flags then fields).
pub fn encode_properties(p: &BasicProperties) -> Vec<u8> {
    let generator = amq_protocol::protocol::basic::gen_properties(p);
    cookie_factory::gen_simple(generator, Vec::with_capacity(64))
        .expect("writing properties to a Vec cannot fail")
}

/// Encoded basic properties that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PropertiesError {
    /// Their headers nest deeper than the broker decodes.
    #[error("{0}")]
    TooDeep(#[from] crate::amqp::field_table::TooDeep),
    /// Truncated, trailing bytes, or a field that does not decode.
    #[error("content header properties do not decode")]
    Malformed,
}

/// Decode AMQP basic properties (flags then fields). Every caller goes
/// through here: the content header of a publish, a stored message read
/// back at recovery, a transform plugin's output; so all of them get the
/// nesting bound of [`crate::amqp::field_table`].
pub fn decode_properties(bytes: &[u8]) -> Result<BasicProperties, PropertiesError> {
    // No properties at all (flags 0, as most benchmark and many real
    // publishers send): nothing to parse.
    if bytes.is_empty() || bytes == [0, 0] {
        return Ok(BasicProperties::default());
    }
    crate::amqp::field_table::check_properties(bytes)?;
    match amq_protocol::protocol::basic::parse_properties(bytes) {
        Ok(([], p)) => Ok(p),
        _ => Err(PropertiesError::Malformed),
    }
}

/// Encode a field table's body (without its 32-bit length prefix), the form
/// the plugin ABI passes arguments in.
pub fn encode_table_body(t: &amq_protocol::types::FieldTable) -> Vec<u8> {
    let generator = amq_protocol::types::generation::gen_field_table(t);
    let mut v =
        cookie_factory::gen_simple(generator, Vec::new()).expect("writing to a Vec cannot fail");
    v.drain(..4);
    v
}

/// Decode a field table's body (without its length prefix), as
/// [`encode_table_body`] wrote it; `None` if it does not decode, or nests
/// deeper than a client's tables may.
pub fn decode_table_body(body: &[u8]) -> Option<amq_protocol::types::FieldTable> {
    crate::amqp::field_table::check_table_body(body).ok()?;
    let mut framed = Vec::with_capacity(body.len() + 4);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(body);
    match amq_protocol::types::parsing::parse_field_table(&framed[..]) {
        Ok(([], t)) => Some(t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

    #[test]
    fn properties_round_trip_through_the_plugin_encoding() {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("tenant"),
            AMQPValue::LongString("acme".into()),
        );
        let p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_message_id("m1".into());
        let bytes = encode_properties(&p);
        assert_eq!(decode_properties(&bytes).unwrap(), p);
        // The guest SDK reads the same bytes.
        let guest = wasmq_sdk::Properties::decode(&bytes).unwrap();
        assert_eq!(guest.content_type.as_deref(), Some("application/json"));
        assert_eq!(guest.headers().get_str("tenant"), Some("acme"));
        assert_eq!(guest.delivery_mode, Some(2));
    }
}
