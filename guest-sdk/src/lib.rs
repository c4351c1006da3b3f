//! # wasmq-sdk: write wasmq plugins in plain Rust
//!
//! A wasmq plugin is a WebAssembly module that makes one of three decisions
//! for the broker:
//!
//! * a [`Router`] is an exchange type: it is told about the exchange and its
//!   bindings and picks the bindings each message goes to;
//! * a [`Filter`] guards one binding and says whether a message passes;
//! * a [`Transform`] rewrites, drops or dead-letters a message before routing.
//!
//! You implement the trait on a plain struct and name it in [`plugin!`]; the
//! macro generates the Wasm exports of the [ABI](abi). The same code is
//! unit-tested natively with `cargo test`, no Wasm runtime needed.
//!
//! ```
//! use wasmq_sdk::{Binding, BindingId, Destinations, Error, Exchange, Message, Router, Target};
//!
//! /// Routes a message to every binding whose key is a prefix of its routing key.
//! #[derive(Default)]
//! pub struct Prefix {
//!     bindings: Vec<(BindingId, String)>,
//! }
//!
//! impl Router for Prefix {
//!     const DETERMINISTIC: bool = true;
//!
//!     fn new(_exchange: &Exchange<'_>) -> Result<Self, Error> {
//!         Ok(Prefix::default())
//!     }
//!     fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
//!         self.bindings.push((b.id, b.key.to_owned()));
//!         Ok(())
//!     }
//!     fn unbind(&mut self, b: &Binding<'_>) {
//!         self.bindings.retain(|(id, _)| *id != b.id);
//!     }
//!     fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
//!         for (id, key) in &self.bindings {
//!             if m.routing_key().starts_with(key.as_str()) {
//!                 out.push(*id);
//!             }
//!         }
//!     }
//! }
//!
//! wasmq_sdk::plugin!(router = Prefix);
//!
//! // A native unit test of the same code:
//! let args = wasmq_sdk::FieldTable::new();
//! let mut r = Prefix::new(&Exchange { name: "x", arguments: &args }).unwrap();
//! let target = Target::Queue("orders");
//! r.bind(&Binding { id: BindingId(7), key: "orders.", target, arguments: &args }).unwrap();
//! let mut out = Destinations::new();
//! r.route(&Message::new("orders.created"), &mut out);
//! assert_eq!(out.ids(), vec![BindingId(7)]);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-unknown-unknown` (the
//! crate type must include `cdylib`) and copy the `.wasm` into the broker's
//! plugin folder; see the README for loading and hot-swapping.
#![deny(missing_docs)]

pub mod abi;
mod codec;
#[doc(hidden)]
pub mod guest;
pub mod log;
mod message;
mod properties;
mod roles;
mod table;
pub mod testing;

pub use message::Message;
pub use properties::Properties;
pub use roles::{
    Binding, BindingId, DELAY_HEADER, Destinations, Exchange, Filter, Outcome, Rewrite, Router,
    Subscription, Target, Transform,
};
pub use table::{FieldTable, FieldValue, bytes_eq};

/// An error a plugin reports to the broker; its message reaches the user
/// (for example as the reply text of a refused exchange declaration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error(message.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error::new(s)
    }
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error(s)
    }
}

/// Export a plugin: name the type that implements each role.
///
/// ```text
/// wasmq_sdk::plugin!(router = Topic);
/// wasmq_sdk::plugin!(filter = JsonFieldFilter);
/// wasmq_sdk::plugin!(transform = Redact);
/// wasmq_sdk::plugin!(router = Mine, filter = MineToo);
/// ```
///
/// On `wasm32` this generates the ABI exports; on the host it only checks
/// that each type implements its role, so native tests build unchanged.
#[macro_export]
macro_rules! plugin {
    ($($role:ident = $ty:ty),+ $(,)?) => {
        $(
            const _: () = {
                $crate::__wasmq_check_role!($role, $ty);
            };
        )+
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[unsafe(no_mangle)]
            pub extern "C" fn wasmq_abi_version() -> i32 {
                $crate::abi::ABI_VERSION as i32
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn wasmq_roles() -> i32 {
                0 $( | $crate::__wasmq_role_bits!($role, $ty) )+
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn wasmq_buffer(len: i32) -> i32 {
                $crate::guest::buffer(len)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn wasmq_init(role: i32, len: i32) -> i64 {
                $(
                    if role == $crate::__wasmq_role_bits!($role) {
                        return $crate::__wasmq_role_init!($role, len);
                    }
                )+
                $crate::guest::unknown_role(role)
            }
            $( $crate::__wasmq_role_exports!($role, $ty); )+
        };
    };
}

/// Ship self-test vectors with the plugin: a JSON document, stored in the
/// module's [`wasmq-self-test`](abi::SELF_TEST_SECTION) custom section,
/// that the broker runs through the compiled plugin (the real ABI, the
/// real compiler) before a version may serve. A version that fails a vector
/// is rejected and the previous one keeps serving; `wasmq plugin check`
/// runs them offline. Use it once per plugin.
///
/// Each role has a list of cases. A case sets an instance up (exchange
/// arguments; for a router its bindings, numbered from 0 in order, each
/// with a `key`, `arguments` and the `queue` it binds; for a filter its
/// binding's key and arguments) and lists messages with what must happen
/// to them. Message fields: `routing_key`, `headers` (an
/// object), `content_type`, `body` (a string); all optional.
///
/// ```
/// wasmq_sdk::self_test!(r#"{
///   "router": [{
///     "bindings": [{"key": "orders"}, {"key": "audit", "arguments": {"x-all": true}}],
///     "messages": [
///       {"routing_key": "orders", "expect": [0]},
///       {"routing_key": "other", "expect": []}
///     ]
///   }],
///   "filter": [{
///     "arguments": {"field": "kind", "equals": "order"},
///     "messages": [{"body": "{\"kind\": \"order\"}", "expect": "pass"}]
///   }],
///   "transform": [{
///     "messages": [
///       {"routing_key": "a", "expect": {"outcome": "route", "routing_key": "a", "headers": {"seen": true}}},
///       {"body": "spam", "expect": {"outcome": "drop"}},
///       {"body": "bad", "expect": {"outcome": "dead_letter", "reason": "bad body"}}
///     ]
///   }]
/// }"#);
/// ```
///
/// A router's `expect` is the set of binding numbers the message goes to; a
/// filter's is `"pass"` or `"drop"`; a transform's `outcome` is `route`
/// (with the fields given compared to the message as rewritten), `drop` or
/// `dead_letter` (with an optional `reason`). The host checks the JSON when
/// it loads the plugin, not the Rust compiler: a malformed document rejects
/// the version with the parser's error.
#[macro_export]
macro_rules! self_test {
    ($json:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            const JSON: &str = $json;
            #[unsafe(link_section = "wasmq-self-test")]
            #[used]
            static SELF_TEST: [u8; JSON.len()] = {
                let bytes = JSON.as_bytes();
                let mut out = [0u8; JSON.len()];
                let mut i = 0;
                while i < bytes.len() {
                    out[i] = bytes[i];
                    i += 1;
                }
                out
            };
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __wasmq_check_role {
    (router, $ty:ty) => {
        const fn check<T: $crate::Router>() {}
        check::<$ty>();
    };
    (filter, $ty:ty) => {
        const fn check<T: $crate::Filter>() {}
        check::<$ty>();
    };
    (transform, $ty:ty) => {
        const fn check<T: $crate::Transform>() {}
        check::<$ty>();
    };
    ($other:ident, $ty:ty) => {
        compile_error!(concat!(
            "unknown plugin role `",
            stringify!($other),
            "`: use router, filter or transform"
        ));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __wasmq_role_bits {
    (router) => {
        $crate::abi::ROLE_ROUTER
    };
    (filter) => {
        $crate::abi::ROLE_FILTER
    };
    (transform) => {
        $crate::abi::ROLE_TRANSFORM
    };
    (router, $ty:ty) => {
        $crate::abi::ROLE_ROUTER
            | if <$ty as $crate::Router>::DETERMINISTIC {
                $crate::abi::FLAG_DETERMINISTIC
            } else {
                0
            }
    };
    ($role:ident, $ty:ty) => {
        $crate::__wasmq_role_bits!($role)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __wasmq_role_init {
    (router, $len:ident) => {
        $crate::guest::init_router(&WASMQ_ROUTER, $len)
    };
    (filter, $len:ident) => {
        $crate::guest::init_filter(&WASMQ_FILTER, $len)
    };
    (transform, $len:ident) => {
        $crate::guest::init_transform(&WASMQ_TRANSFORM, $len)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __wasmq_role_exports {
    (router, $ty:ty) => {
        ::std::thread_local! {
            static WASMQ_ROUTER: ::std::cell::RefCell<Option<$ty>> =
                const { ::std::cell::RefCell::new(None) };
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn wasmq_bind(id: i32, len: i32) -> i64 {
            $crate::guest::bind(&WASMQ_ROUTER, id, len)
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn wasmq_unbind(id: i32, len: i32) -> i64 {
            $crate::guest::unbind(&WASMQ_ROUTER, id, len)
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn wasmq_route(key_len: i32, props_len: i32, body_len: i32) -> i64 {
            $crate::guest::route(&WASMQ_ROUTER, key_len, props_len, body_len)
        }
    };
    (filter, $ty:ty) => {
        ::std::thread_local! {
            static WASMQ_FILTER: ::std::cell::RefCell<Option<$ty>> =
                const { ::std::cell::RefCell::new(None) };
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn wasmq_filter(key_len: i32, props_len: i32, body_len: i32) -> i32 {
            $crate::guest::filter(&WASMQ_FILTER, key_len, props_len, body_len)
        }
    };
    (transform, $ty:ty) => {
        ::std::thread_local! {
            static WASMQ_TRANSFORM: ::std::cell::RefCell<Option<$ty>> =
                const { ::std::cell::RefCell::new(None) };
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn wasmq_transform(key_len: i32, props_len: i32, body_len: i32) -> i64 {
            $crate::guest::transform(&WASMQ_TRANSFORM, key_len, props_len, body_len)
        }
    };
}

/// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_every_value_type() {
        let mut nested = FieldTable::new();
        nested.insert("n", 1i32);
        let mut t = FieldTable::new();
        t.insert("bool", true);
        t.insert("i8", FieldValue::I8(-3));
        t.insert("u8", FieldValue::U8(3));
        t.insert("i16", FieldValue::I16(-300));
        t.insert("u16", FieldValue::U16(300));
        t.insert("i32", -70000i32);
        t.insert("u32", FieldValue::U32(70000));
        t.insert("i64", -1i64 << 40);
        t.insert("f32", FieldValue::F32(1.5));
        t.insert("f64", FieldValue::F64(2.25));
        t.insert(
            "dec",
            FieldValue::Decimal {
                scale: 2,
                value: 1234,
            },
        );
        t.insert("str", "hello");
        t.insert("arr", FieldValue::Array(vec!["a".into(), FieldValue::Void]));
        t.insert("ts", FieldValue::Timestamp(1_700_000_000));
        t.insert("table", FieldValue::Table(nested));
        t.insert("bytes", FieldValue::Bytes(vec![0, 1, 2]));
        t.insert("void", FieldValue::Void);
        let bytes = t.encode_body_to_vec();
        assert_eq!(FieldTable::decode_body(&bytes).unwrap(), t);
    }

    #[test]
    fn properties_round_trip() {
        let mut headers = FieldTable::new();
        headers.insert("x-tenant", "acme");
        let p = Properties {
            content_type: Some("application/json".into()),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(5),
            message_id: Some("m-1".into()),
            timestamp: Some(42),
            kind: Some("order.created".into()),
            app_id: Some("shop".into()),
            ..Properties::default()
        };
        assert_eq!(Properties::decode(&p.encode()).unwrap(), p);
        assert_eq!(Properties::decode(&[]).unwrap(), Properties::default());
    }

    #[test]
    fn truncated_table_is_an_error_not_a_panic() {
        let mut t = FieldTable::new();
        t.insert("k", "value");
        let bytes = t.encode_body_to_vec();
        for cut in 1..bytes.len() {
            assert!(
                FieldTable::decode_body(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn destinations_collects_ids() {
        let mut d = Destinations::new();
        d.push(BindingId(3));
        d.push(BindingId(1));
        d.push(BindingId(3));
        assert_eq!(d.ids(), vec![BindingId(3), BindingId(1), BindingId(3)]);
        assert_eq!(d.sorted(), vec![BindingId(1), BindingId(3)]);
    }
}
