//! AMQP 0-9-1 basic properties (the content header's property list).

use crate::codec::{Reader, Writer};
use crate::{Error, FieldTable};

/// A message's AMQP properties. Every field is optional, as on the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    /// MIME content type, e.g. `application/json`.
    pub content_type: Option<String>,
    /// MIME content encoding, e.g. `gzip`.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Option<FieldTable>,
    /// 1 transient, 2 persistent.
    pub delivery_mode: Option<u8>,
    /// Priority 0 to 9.
    pub priority: Option<u8>,
    /// Application correlation id.
    pub correlation_id: Option<String>,
    /// Queue to reply to.
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as text.
    pub expiration: Option<String>,
    /// Application message id.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Application message type name.
    pub kind: Option<String>,
    /// Publishing user (validated by the broker).
    pub user_id: Option<String>,
    /// Publishing application.
    pub app_id: Option<String>,
    /// Deprecated cluster id.
    pub cluster_id: Option<String>,
}

const CONTENT_TYPE: u16 = 1 << 15;
const CONTENT_ENCODING: u16 = 1 << 14;
const HEADERS: u16 = 1 << 13;
const DELIVERY_MODE: u16 = 1 << 12;
const PRIORITY: u16 = 1 << 11;
const CORRELATION_ID: u16 = 1 << 10;
const REPLY_TO: u16 = 1 << 9;
const EXPIRATION: u16 = 1 << 8;
const MESSAGE_ID: u16 = 1 << 7;
const TIMESTAMP: u16 = 1 << 6;
const KIND: u16 = 1 << 5;
const USER_ID: u16 = 1 << 4;
const APP_ID: u16 = 1 << 3;
const CLUSTER_ID: u16 = 1 << 2;

impl Properties {
    /// The headers table, or an empty one when the message has none.
    pub fn headers(&self) -> &FieldTable {
        static EMPTY: FieldTable = FieldTable::EMPTY;
        self.headers.as_ref().unwrap_or(&EMPTY)
    }

    /// Decode the AMQP property list (flags, then fields).
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        if r.is_empty() {
            return Ok(Properties::default());
        }
        let flags = r.u16()?;
        let mut p = Properties::default();
        let s = |r: &mut Reader<'_>, bit: u16| -> Result<Option<String>, Error> {
            if flags & bit != 0 {
                Ok(Some(r.short_str()?.to_owned()))
            } else {
                Ok(None)
            }
        };
        p.content_type = s(&mut r, CONTENT_TYPE)?;
        p.content_encoding = s(&mut r, CONTENT_ENCODING)?;
        if flags & HEADERS != 0 {
            p.headers = Some(FieldTable::decode_body(r.long_bytes()?)?);
        }
        if flags & DELIVERY_MODE != 0 {
            p.delivery_mode = Some(r.u8()?);
        }
        if flags & PRIORITY != 0 {
            p.priority = Some(r.u8()?);
        }
        p.correlation_id = s(&mut r, CORRELATION_ID)?;
        p.reply_to = s(&mut r, REPLY_TO)?;
        p.expiration = s(&mut r, EXPIRATION)?;
        p.message_id = s(&mut r, MESSAGE_ID)?;
        if flags & TIMESTAMP != 0 {
            p.timestamp = Some(r.u64()?);
        }
        p.kind = s(&mut r, KIND)?;
        p.user_id = s(&mut r, USER_ID)?;
        p.app_id = s(&mut r, APP_ID)?;
        p.cluster_id = s(&mut r, CLUSTER_ID)?;
        Ok(p)
    }

    /// Encode as the AMQP property list (flags, then fields).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let mut w = Writer::new(&mut out);
        let mut flags = 0u16;
        let strs: [(&Option<String>, u16); 2] = [
            (&self.content_type, CONTENT_TYPE),
            (&self.content_encoding, CONTENT_ENCODING),
        ];
        for (v, bit) in strs {
            if v.is_some() {
                flags |= bit;
            }
        }
        if self.headers.is_some() {
            flags |= HEADERS;
        }
        if self.delivery_mode.is_some() {
            flags |= DELIVERY_MODE;
        }
        if self.priority.is_some() {
            flags |= PRIORITY;
        }
        let tail: [(&Option<String>, u16); 4] = [
            (&self.correlation_id, CORRELATION_ID),
            (&self.reply_to, REPLY_TO),
            (&self.expiration, EXPIRATION),
            (&self.message_id, MESSAGE_ID),
        ];
        for (v, bit) in tail {
            if v.is_some() {
                flags |= bit;
            }
        }
        if self.timestamp.is_some() {
            flags |= TIMESTAMP;
        }
        let last: [(&Option<String>, u16); 4] = [
            (&self.kind, KIND),
            (&self.user_id, USER_ID),
            (&self.app_id, APP_ID),
            (&self.cluster_id, CLUSTER_ID),
        ];
        for (v, bit) in last {
            if v.is_some() {
                flags |= bit;
            }
        }
        w.u16(flags);
        for v in [&self.content_type, &self.content_encoding]
            .into_iter()
            .flatten()
        {
            w.short_str(v);
        }
        if let Some(h) = &self.headers {
            let at = w.begin_length();
            h.encode_body(&mut w);
            w.end_length(at);
        }
        if let Some(v) = self.delivery_mode {
            w.u8(v);
        }
        if let Some(v) = self.priority {
            w.u8(v);
        }
        for v in [
            &self.correlation_id,
            &self.reply_to,
            &self.expiration,
            &self.message_id,
        ]
        .into_iter()
        .flatten()
        {
            w.short_str(v);
        }
        if let Some(v) = self.timestamp {
            w.u64(v);
        }
        for v in [&self.kind, &self.user_id, &self.app_id, &self.cluster_id]
            .into_iter()
            .flatten()
        {
            w.short_str(v);
        }
        out
    }
}
