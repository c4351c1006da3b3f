//! AMQP 0-9-1 field tables: exchange and binding arguments, message headers.
//!
//! The codec follows RabbitMQ's reading of the spec (the one every client
//! library speaks), so a header set by pika or lapin arrives here unchanged.

use crate::Error;
use crate::codec::{Reader, Writer};

/// One value in a [`FieldTable`] or a field array.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum FieldValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    /// A decimal: `value / 10^scale`.
    Decimal {
        scale: u8,
        value: u32,
    },
    /// A long string. AMQP strings are bytes; [`FieldValue::as_str`] reads them as UTF-8.
    String(Vec<u8>),
    Array(Vec<FieldValue>),
    /// Seconds since the Unix epoch.
    Timestamp(u64),
    Table(FieldTable),
    Bytes(Vec<u8>),
    Void,
}

/// Byte-slice equality in whole loads: 8-byte words (the last one
/// overlapping), or under 8 bytes two overlapping halves or single bytes.
///
/// On `wasm32`, `==` on slices and strings is a call to compiler-builtins'
/// `memcmp`, which compares one byte per loop iteration (and every Wasm
/// loop iteration also checks the call's deadline): it was 40% of a
/// `headers` route with 100 bindings. Use this to compare header names and
/// values in a hot loop.
#[inline]
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap());
    let half = |s: &[u8], i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap());
    if n >= 8 {
        let mut i = 0;
        while i + 8 < n {
            if word(a, i) != word(b, i) {
                return false;
            }
            i += 8;
        }
        word(a, n - 8) == word(b, n - 8)
    } else if n >= 4 {
        half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4)
    } else {
        (0..n).all(|i| a[i] == b[i])
    }
}

impl FieldValue {
    /// The value as UTF-8 text, if it is a string that holds valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::String(s) => std::str::from_utf8(s).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            FieldValue::I8(v) => v.into(),
            FieldValue::U8(v) => v.into(),
            FieldValue::I16(v) => v.into(),
            FieldValue::U16(v) => v.into(),
            FieldValue::I32(v) => v.into(),
            FieldValue::U32(v) => v.into(),
            FieldValue::I64(v) => v,
            FieldValue::Timestamp(v) => i64::try_from(v).ok()?,
            _ => return None,
        })
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            FieldValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The nested table, if this is one.
    pub fn as_table(&self) -> Option<&FieldTable> {
        match self {
            FieldValue::Table(t) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let tag = r.u8()?;
        Ok(match tag {
            b't' => FieldValue::Bool(r.u8()? != 0),
            b'b' => FieldValue::I8(r.u8()? as i8),
            b'B' => FieldValue::U8(r.u8()?),
            b's' | b'U' => FieldValue::I16(r.u16()? as i16),
            b'u' => FieldValue::U16(r.u16()?),
            b'I' => FieldValue::I32(r.u32()? as i32),
            b'i' => FieldValue::U32(r.u32()?),
            b'l' | b'L' => FieldValue::I64(r.u64()? as i64),
            b'f' => FieldValue::F32(f32::from_bits(r.u32()?)),
            b'd' => FieldValue::F64(f64::from_bits(r.u64()?)),
            b'D' => FieldValue::Decimal {
                scale: r.u8()?,
                value: r.u32()?,
            },
            b'S' => FieldValue::String(r.long_bytes()?.to_vec()),
            b'A' => {
                let mut inner = Reader::new(r.long_bytes()?);
                let mut items = Vec::new();
                while !inner.is_empty() {
                    items.push(FieldValue::decode(&mut inner)?);
                }
                FieldValue::Array(items)
            }
            b'T' => FieldValue::Timestamp(r.u64()?),
            b'F' => FieldValue::Table(FieldTable::decode_body(r.long_bytes()?)?),
            b'x' => FieldValue::Bytes(r.long_bytes()?.to_vec()),
            b'V' => FieldValue::Void,
            other => {
                return Err(Error::new(format!(
                    "unknown field value type {:?}",
                    other as char
                )));
            }
        })
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        match self {
            FieldValue::Bool(v) => {
                w.u8(b't');
                w.u8(*v as u8);
            }
            FieldValue::I8(v) => {
                w.u8(b'b');
                w.u8(*v as u8);
            }
            FieldValue::U8(v) => {
                w.u8(b'B');
                w.u8(*v);
            }
            FieldValue::I16(v) => {
                w.u8(b's');
                w.u16(*v as u16);
            }
            FieldValue::U16(v) => {
                w.u8(b'u');
                w.u16(*v);
            }
            FieldValue::I32(v) => {
                w.u8(b'I');
                w.u32(*v as u32);
            }
            FieldValue::U32(v) => {
                w.u8(b'i');
                w.u32(*v);
            }
            FieldValue::I64(v) => {
                w.u8(b'l');
                w.u64(*v as u64);
            }
            FieldValue::F32(v) => {
                w.u8(b'f');
                w.u32(v.to_bits());
            }
            FieldValue::F64(v) => {
                w.u8(b'd');
                w.u64(v.to_bits());
            }
            FieldValue::Decimal { scale, value } => {
                w.u8(b'D');
                w.u8(*scale);
                w.u32(*value);
            }
            FieldValue::String(s) => {
                w.u8(b'S');
                w.long_bytes(s);
            }
            FieldValue::Array(items) => {
                w.u8(b'A');
                let at = w.begin_length();
                for item in items {
                    item.encode(w);
                }
                w.end_length(at);
            }
            FieldValue::Timestamp(v) => {
                w.u8(b'T');
                w.u64(*v);
            }
            FieldValue::Table(t) => {
                w.u8(b'F');
                let at = w.begin_length();
                t.encode_body(w);
                w.end_length(at);
            }
            FieldValue::Bytes(b) => {
                w.u8(b'x');
                w.long_bytes(b);
            }
            FieldValue::Void => w.u8(b'V'),
        }
    }
}

impl From<&str> for FieldValue {
    fn from(s: &str) -> Self {
        FieldValue::String(s.as_bytes().to_vec())
    }
}

impl From<String> for FieldValue {
    fn from(s: String) -> Self {
        FieldValue::String(s.into_bytes())
    }
}

impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        FieldValue::Bool(v)
    }
}

impl From<i32> for FieldValue {
    fn from(v: i32) -> Self {
        FieldValue::I32(v)
    }
}

impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        FieldValue::I64(v)
    }
}

/// An AMQP field table. Entries keep their wire order; look-ups are linear,
/// which beats hashing for the handful of entries tables usually hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldTable {
    entries: Vec<(String, FieldValue)>,
}

impl FieldTable {
    pub(crate) const EMPTY: FieldTable = FieldTable {
        entries: Vec::new(),
    };

    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.entries
            .iter()
            .find(|(k, _)| bytes_eq(k.as_bytes(), key.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The value under `key` as UTF-8 text, if it is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(FieldValue::as_str)
    }

    /// Set `key` to `value`, replacing an earlier value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<FieldValue>) {
        let key = key.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((key, value)),
        }
    }

    /// Remove `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(at).1)
    }

    /// The entries in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Decode a table body (the bytes after the table's 32-bit length).
    pub fn decode_body(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        let mut entries = Vec::new();
        while !r.is_empty() {
            let key = r.short_str()?.to_owned();
            let value = FieldValue::decode(&mut r)?;
            entries.push((key, value));
        }
        Ok(FieldTable { entries })
    }

    /// Encode the table body (without the 32-bit length).
    pub fn encode_body_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_body(&mut Writer::new(&mut out));
        out
    }

    pub(crate) fn encode_body(&self, w: &mut Writer<'_>) {
        for (k, v) in &self.entries {
            w.short_str(k);
            v.encode(w);
        }
    }
}

impl<K: Into<String>, V: Into<FieldValue>> FromIterator<(K, V)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut t = FieldTable::new();
        for (k, v) in iter {
            t.insert(k, v);
        }
        t
    }
}

#[cfg(test)]
mod bytes_eq_tests {
    use super::bytes_eq;

    #[test]
    fn agrees_with_slice_equality_at_every_length_and_position() {
        for len in 0..40usize {
            let a: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            assert!(bytes_eq(&a, &a.clone()));
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!bytes_eq(&a, &b), "len {len}, differs at {at}");
            }
            if len > 0 {
                assert!(!bytes_eq(&a, &a[..len - 1]));
            }
        }
    }
}
