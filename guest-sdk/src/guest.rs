//! The guest half of the ABI: what the [`plugin!`](crate::plugin) macro's
//! exports call. Not part of the public API; its shape may change with the
//! ABI version.

use std::cell::RefCell;
use std::thread::LocalKey;

use crate::abi::*;
use crate::codec::{Reader, Writer};
use crate::{
    Binding, BindingId, Destinations, Error, Exchange, FieldTable, Filter, Message, Outcome,
    Router, Subscription, Target, Transform,
};

/// Where the macro keeps a role's instance. Wasm guests are single-threaded,
/// so a thread-local is the whole instance's state.
pub type State<T> = &'static LocalKey<RefCell<Option<T>>>;

thread_local! {
    /// Call inputs, written by the host through `wasmq_buffer`.
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Call outputs; valid until the next call.
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `wasmq_buffer`: grow the input buffer to `len` and return where it is.
/// The host caches the pointer; the guest never moves the buffer otherwise.
pub fn buffer(len: i32) -> i32 {
    INPUT.with(|b| {
        let mut b = b.borrow_mut();
        let len = len.max(0) as usize;
        if b.len() < len {
            b.resize(len, 0);
        }
        b.as_mut_ptr() as usize as i32
    })
}

fn pack(out: &[u8]) -> i64 {
    (((out.as_ptr() as usize as u64) << 32) | out.len() as u64) as i64
}

fn reply(fill: impl FnOnce(&mut Vec<u8>)) -> i64 {
    OUTPUT.with(|o| {
        let mut o = o.borrow_mut();
        o.clear();
        fill(&mut o);
        pack(&o)
    })
}

fn reply_result(r: Result<(), Error>) -> i64 {
    reply(|o| match r {
        Ok(()) => o.push(STATUS_OK),
        Err(e) => {
            o.push(STATUS_ERROR);
            o.extend_from_slice(e.message().as_bytes());
        }
    })
}

fn with_input<R>(len: i32, f: impl FnOnce(&[u8]) -> R) -> R {
    INPUT.with(|b| {
        let b = b.borrow();
        let len = (len.max(0) as usize).min(b.len());
        f(&b[..len])
    })
}

struct InitInput<'a> {
    name: &'a str,
    key: &'a str,
    arguments: FieldTable,
}

fn parse_init(bytes: &[u8]) -> Result<InitInput<'_>, Error> {
    let mut r = Reader::new(bytes);
    let name = r.abi_str()?;
    let key = r.abi_str()?;
    let arguments = FieldTable::decode_body(r.rest())?;
    Ok(InitInput {
        name,
        key,
        arguments,
    })
}

fn not_initialised() -> Error {
    Error::new("plugin instance used before wasmq_init")
}

/// `wasmq_init` for a role the plugin does not implement.
pub fn unknown_role(role: i32) -> i64 {
    reply_result(Err(Error::new(format!(
        "this plugin does not implement role {role}"
    ))))
}

/// `wasmq_init` for a router.
pub fn init_router<T: Router>(state: State<T>, len: i32) -> i64 {
    let r = with_input(len, |bytes| {
        let input = parse_init(bytes)?;
        let router = T::new(&Exchange {
            name: input.name,
            arguments: &input.arguments,
        })?;
        state.with(|s| *s.borrow_mut() = Some(router));
        Ok(())
    });
    reply_result(r)
}

fn with_binding<R>(
    id: i32,
    len: i32,
    f: impl FnOnce(&Binding<'_>) -> Result<R, Error>,
) -> Result<R, Error> {
    with_input(len, |bytes| {
        let mut r = Reader::new(bytes);
        let key = r.abi_str()?;
        let kind = r.u8()?;
        let name = r.abi_str()?;
        let target = match kind {
            0 => Target::Queue(name),
            _ => Target::Exchange(name),
        };
        let arguments = FieldTable::decode_body(r.rest())?;
        f(&Binding {
            id: BindingId(id as u32),
            key,
            target,
            arguments: &arguments,
        })
    })
}

/// `wasmq_bind`.
pub fn bind<T: Router>(state: State<T>, id: i32, len: i32) -> i64 {
    let r = with_binding(id, len, |b| {
        state.with(|s| match s.borrow_mut().as_mut() {
            Some(router) => router.bind(b),
            None => Err(not_initialised()),
        })
    });
    reply_result(r)
}

/// `wasmq_unbind`.
pub fn unbind<T: Router>(state: State<T>, id: i32, len: i32) -> i64 {
    let r = with_binding(id, len, |b| {
        state.with(|s| match s.borrow_mut().as_mut() {
            Some(router) => {
                router.unbind(b);
                Ok(())
            }
            None => Err(not_initialised()),
        })
    });
    reply_result(r)
}

fn with_message<R>(
    key_len: i32,
    props_len: i32,
    body_len: i32,
    f: impl FnOnce(&Message<'_>) -> R,
) -> Result<R, Error> {
    with_input(key_len, |bytes| {
        let key = utf8(bytes).ok_or_else(|| Error::new("routing key is not UTF-8"))?;
        let message = Message::from_host(key, props_len, body_len);
        Ok(f(&message))
    })
}

/// `bytes` as text. Routing keys are nearly always ASCII, which is checked
/// eight bytes at a time; only other keys go through `from_utf8`, whose
/// byte loop costs more than the rest of a small route on Wasm (every loop
/// iteration also checks the call's deadline).
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let n = bytes.len();
    let mut any = 0u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        any |= u64::from_le_bytes(c.try_into().unwrap());
    }
    // The tail in overlapping whole loads too.
    if !chunks.remainder().is_empty() {
        if n >= 8 {
            any |= u64::from_le_bytes(bytes[n - 8..].try_into().unwrap());
        } else if n >= 4 {
            any |= u64::from(u32::from_le_bytes(bytes[..4].try_into().unwrap()));
            any |= u64::from(u32::from_le_bytes(bytes[n - 4..].try_into().unwrap()));
        } else {
            any |= u64::from(bytes[0]) | u64::from(bytes[n / 2]) | u64::from(bytes[n - 1]);
        }
    }
    if any & HIGH == 0 {
        // Every byte is ASCII, hence UTF-8; say so without a second pass.
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// `wasmq_route`: the decision is written straight into the reply buffer.
pub fn route<T: Router>(state: State<T>, key_len: i32, props_len: i32, body_len: i32) -> i64 {
    OUTPUT.with(|o| {
        let mut o = o.borrow_mut();
        let mut bytes = std::mem::take(&mut *o);
        bytes.clear();
        bytes.push(STATUS_OK);
        let mut out = Destinations::over(bytes);
        let r = state.with(|s| match s.borrow_mut().as_mut() {
            Some(router) => {
                with_message(key_len, props_len, body_len, |m| router.route(m, &mut out))
            }
            None => Err(not_initialised()),
        });
        *o = out.into_bytes();
        if let Err(e) = r {
            o.clear();
            o.push(STATUS_ERROR);
            o.extend_from_slice(e.message().as_bytes());
        }
        pack(&o)
    })
}

/// `wasmq_init` for a filter.
pub fn init_filter<T: Filter>(state: State<T>, len: i32) -> i64 {
    let r = with_input(len, |bytes| {
        let input = parse_init(bytes)?;
        let filter = T::new(&Subscription {
            exchange: input.name,
            key: input.key,
            arguments: &input.arguments,
        })?;
        state.with(|s| *s.borrow_mut() = Some(filter));
        Ok(())
    });
    reply_result(r)
}

/// `wasmq_filter`: [`FILTER_PASS`], [`FILTER_DROP`], or -1 when the instance
/// is unusable (the host counts that as a fault).
pub fn filter<T: Filter>(state: State<T>, key_len: i32, props_len: i32, body_len: i32) -> i32 {
    state.with(|s| match s.borrow_mut().as_mut() {
        Some(f) => match with_message(key_len, props_len, body_len, |m| f.filter(m)) {
            Ok(true) => FILTER_PASS,
            Ok(false) => FILTER_DROP,
            Err(_) => -1,
        },
        None => -1,
    })
}

/// `wasmq_init` for a transform.
pub fn init_transform<T: Transform>(state: State<T>, len: i32) -> i64 {
    let r = with_input(len, |bytes| {
        let input = parse_init(bytes)?;
        let t = T::new(&Exchange {
            name: input.name,
            arguments: &input.arguments,
        })?;
        state.with(|s| *s.borrow_mut() = Some(t));
        Ok(())
    });
    reply_result(r)
}

/// `wasmq_transform`.
pub fn transform<T: Transform>(
    state: State<T>,
    key_len: i32,
    props_len: i32,
    body_len: i32,
) -> i64 {
    let outcome = state.with(|s| match s.borrow_mut().as_mut() {
        Some(t) => with_message(key_len, props_len, body_len, |m| t.transform(m)),
        None => Err(not_initialised()),
    });
    match outcome {
        Err(e) => reply_result(Err(e)),
        Ok(outcome) => reply(|o| {
            o.push(STATUS_OK);
            encode_outcome(&outcome, o);
        }),
    }
}

/// Encode a transform decision (shared with host-side tests of the ABI).
pub fn encode_outcome(outcome: &Outcome, o: &mut Vec<u8>) {
    let mut w = Writer::new(o);
    match outcome {
        Outcome::Keep => w.u8(TRANSFORM_KEEP),
        Outcome::Drop => w.u8(TRANSFORM_DROP),
        Outcome::DeadLetter(reason) => {
            w.u8(TRANSFORM_DEAD_LETTER);
            w.abi_bytes(reason.as_bytes());
        }
        Outcome::Rewrite(rw) => {
            w.u8(TRANSFORM_REWRITE);
            let flags = (rw.routing_key.is_some() as u8 * REWRITE_KEY)
                | (rw.properties.is_some() as u8 * REWRITE_PROPERTIES)
                | (rw.body.is_some() as u8 * REWRITE_BODY);
            w.u8(flags);
            if let Some(k) = &rw.routing_key {
                w.abi_bytes(k.as_bytes());
            }
            if let Some(p) = &rw.properties {
                w.abi_bytes(&p.encode());
            }
            if let Some(b) = &rw.body {
                w.abi_bytes(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::utf8;

    #[test]
    fn utf8_agrees_with_from_utf8_at_every_length_and_position() {
        for len in 0..40 {
            let ascii: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(utf8(&ascii), std::str::from_utf8(&ascii).ok());
            for at in 0..len {
                // A stray continuation byte (invalid), then a whole 'é'
                // (valid), at each position: the ASCII check must not
                // miss either.
                let mut bad = ascii.clone();
                bad[at] = 0xa9;
                assert_eq!(utf8(&bad), None, "{bad:?}");
                let mut good = ascii.clone();
                good.splice(at..at + 1, "é".bytes());
                assert_eq!(utf8(&good), Some(std::str::from_utf8(&good).unwrap()));
            }
        }
    }
}
