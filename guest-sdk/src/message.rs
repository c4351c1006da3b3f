//! The message a plugin sees: routing key always, properties and body on
//! demand.
//!
//! Inside the broker, the properties and the body are fetched from the host
//! the first time a plugin asks for them, so a router that only looks at the
//! routing key never pays for copying a 1 MiB body into its memory. In a
//! native unit test, [`Message::new`] and its builders make an owned message
//! that behaves the same way.

use std::cell::OnceCell;

use crate::{FieldTable, Properties};

/// A read-only view of one published message.
pub struct Message<'a> {
    routing_key: &'a str,
    properties: OnceCell<Properties>,
    body: OnceCell<Vec<u8>>,
    /// Sizes of what the host holds (-1: ask the host), when the message
    /// comes from the host.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    lazy: Option<(i32, i32)>,
}

impl<'a> Message<'a> {
    /// An owned message for tests: no properties and an empty body until set.
    pub fn new(routing_key: &'a str) -> Self {
        Message {
            routing_key,
            properties: OnceCell::from(Properties::default()),
            body: OnceCell::from(Vec::new()),
            lazy: None,
        }
    }

    /// Set the properties (tests).
    pub fn with_properties(mut self, properties: Properties) -> Self {
        self.properties = OnceCell::from(properties);
        self
    }

    /// Set the headers table (tests).
    pub fn with_headers(mut self, headers: FieldTable) -> Self {
        let mut p = self.properties.take().unwrap_or_default();
        p.headers = Some(headers);
        self.properties = OnceCell::from(p);
        self
    }

    /// Set the body (tests).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = OnceCell::from(body.into());
        self
    }

    /// A message whose properties and body stay in the host until asked for.
    #[doc(hidden)]
    pub fn from_host(routing_key: &'a str, properties_len: i32, body_len: i32) -> Self {
        Message {
            routing_key,
            properties: OnceCell::new(),
            body: OnceCell::new(),
            lazy: Some((properties_len, body_len)),
        }
    }

    /// The routing key the message was published (or rewritten) with.
    pub fn routing_key(&self) -> &str {
        self.routing_key
    }

    /// The AMQP properties. Fetched from the host on first use.
    pub fn properties(&self) -> &Properties {
        self.properties.get_or_init(|| {
            let raw = self.fetch(crate::abi::READ_PROPERTIES, 0);
            // The host encodes properties itself; a decode failure would be a
            // host bug, and an empty set is the safest reading of it.
            Properties::decode(&raw).unwrap_or_default()
        })
    }

    /// The application headers (empty when the message has none).
    pub fn headers(&self) -> &FieldTable {
        self.properties().headers()
    }

    /// The body. Fetched from the host on first use.
    pub fn body(&self) -> &[u8] {
        self.body
            .get_or_init(|| self.fetch(crate::abi::READ_BODY, 1))
    }

    #[cfg(target_arch = "wasm32")]
    fn fetch(&self, what: i32, which: usize) -> Vec<u8> {
        let Some(sizes) = self.lazy else {
            return Vec::new();
        };
        let hint = if which == 0 { sizes.0 } else { sizes.1 };
        let len = if hint >= 0 {
            hint
        } else {
            // SAFETY: a zero-length read copies nothing and returns the size.
            unsafe { crate::abi::host_read(what, std::ptr::null_mut(), 0, 0) }
        }
        .max(0) as usize;
        let mut buf = Vec::with_capacity(len);
        // SAFETY: the host writes at most `len` bytes into the spare capacity
        // and returns how many it wrote; only those are exposed.
        unsafe {
            let n = crate::abi::host_read(what, buf.as_mut_ptr(), 0, len as i32);
            buf.set_len(n.clamp(0, len as i32) as usize);
        }
        buf
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn fetch(&self, _what: i32, _which: usize) -> Vec<u8> {
        Vec::new()
    }
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}
