//! How deep a field table may nest, checked before it is decoded.
//!
//! amq-protocol decodes a field table recursively, one parser frame per
//! level of nested table or array. An 8 KB `connection.start-ok` holding
//! an array nested ~1,600 deep overflowed a tokio worker's stack, which
//! aborts the whole process: one unauthenticated frame stopped the broker.
//! So every field table the broker decodes, in a method, a content header,
//! an AMQPLAIN response, or a stored message read back at recovery, is
//! first walked here *without* recursion, and one nested deeper than
//! [`MAX_DEPTH`] is refused as a syntax error (502), as RabbitMQ refuses
//! absurd input.
//!
//! The walk only answers "too deep?". A table that is malformed in any
//! other way passes it and is refused by amq-protocol's parser, which stops
//! at the malformed byte: the walk has already seen every level before it,
//! so that parser never recurses more than [`MAX_DEPTH`] levels either. The
//! type octets and value sizes below are amq-protocol's (RabbitMQ's), so
//! both read the same structure.

/// Levels of field tables and arrays, the outermost table counting as one.
/// RabbitMQ's own nested headers (`x-death`: table, array, table, array)
/// use four; 64 leaves room for any real use while keeping every recursive
/// decoder, encoder and JSON conversion of a value far from a stack limit.
pub const MAX_DEPTH: usize = 64;

/// A field table nested deeper than [`MAX_DEPTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("field table nested deeper than {MAX_DEPTH} levels")]
pub struct TooDeep;

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?) as usize)
}

/// Walk the field table at the start of `b` (its 32-bit length first).
/// `Ok(Some(len))`: it is well-formed and takes `len` bytes; `Ok(None)`:
/// it is malformed, left for the real parser to refuse.
pub fn check_table(b: &[u8]) -> Result<Option<usize>, TooDeep> {
    let Some(len) = u32_at(b, 0) else {
        return Ok(None);
    };
    let Some(end) = 4usize.checked_add(len).filter(|e| *e <= b.len()) else {
        return Ok(None);
    };
    // The containers open, innermost last: (where it ends, whether it is
    // a table, whose entries have keys). On the stack: this runs for every
    // published message that carries headers.
    let mut open = [(0usize, false); MAX_DEPTH];
    open[0] = (end, true);
    let mut depth = 1;
    let mut p = 4;
    while depth > 0 {
        let (end, table) = open[depth - 1];
        if p == end {
            depth -= 1;
            continue;
        }
        if table {
            let key = usize::from(b[p]);
            p += 1 + key;
        }
        let Some(&kind) = b.get(p).filter(|_| p < end) else {
            return Ok(None);
        };
        p += 1;
        let size = match kind {
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'L' | b'l' | b'd' | b'T' => 8,
            b'V' => 0,
            b'S' | b'x' => match u32_at(b, p) {
                Some(n) => n.saturating_add(4),
                None => return Ok(None),
            },
            b'F' | b'A' => {
                let Some(n) = u32_at(b, p) else {
                    return Ok(None);
                };
                let inner_end = (p + 4).saturating_add(n);
                if inner_end > end {
                    return Ok(None);
                }
                // The new container is one deeper than those open.
                if depth == MAX_DEPTH {
                    return Err(TooDeep);
                }
                open[depth] = (inner_end, kind == b'F');
                depth += 1;
                p += 4;
                continue;
            }
            _ => return Ok(None),
        };
        p = p.saturating_add(size);
        if p > end {
            return Ok(None);
        }
    }
    Ok(Some(end))
}

/// Walk a field table's body without its length (AMQPLAIN's response).
pub fn check_table_body(body: &[u8]) -> Result<(), TooDeep> {
    let mut framed = Vec::with_capacity(body.len() + 4);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(body);
    check_table(&framed).map(|_| ())
}

/// Walk the field table a method frame's payload carries, if its method has
/// one (the `arguments` of declares, binds and consume, the properties of
/// connection.start and start-ok).
pub fn check_method(payload: &[u8]) -> Result<(), TooDeep> {
    // What comes before the table: 'o' an octet (bits too), 'u' a short,
    // 's' a short string.
    let before: &[u8] = match payload.get(..4) {
        Some([0, 10, 0, 10]) => b"oo",
        Some([0, 10, 0, 11]) => b"",
        Some([0, 40, 0, 10]) => b"usso",
        Some([0, 40, 0, 30 | 40]) | Some([0, 50, 0, 20]) => b"ussso",
        Some([0, 50, 0, 10]) => b"uso",
        Some([0, 50, 0, 50]) => b"usss",
        Some([0, 60, 0, 20]) => b"usso",
        _ => return Ok(()),
    };
    let mut p = 4;
    for field in before {
        p += match field {
            b'o' => 1,
            b'u' => 2,
            _ => match payload.get(p) {
                Some(&n) => 1 + usize::from(n),
                None => return Ok(()),
            },
        };
    }
    match payload.get(p..) {
        Some(rest) => check_table(rest).map(|_| ()),
        None => Ok(()),
    }
}

/// Walk the `headers` table of encoded basic properties (flags, then
/// content-type and content-encoding before it), if they carry one.
pub fn check_properties(raw: &[u8]) -> Result<(), TooDeep> {
    let Some(&[hi, lo]) = raw.get(..2) else {
        return Ok(());
    };
    let flags = u16::from_be_bytes([hi, lo]);
    if flags & (1 << 13) == 0 {
        return Ok(());
    }
    let mut p = 2;
    for bit in [15, 14] {
        if flags & (1 << bit) != 0 {
            match raw.get(p) {
                Some(&n) => p += 1 + usize::from(n),
                None => return Ok(()),
            }
        }
    }
    match raw.get(p..) {
        Some(rest) => check_table(rest).map(|_| ()),
        None => Ok(()),
    }
}

/// Levels of nesting in a decoded value (a table or array counts one, a
/// scalar none), for tables that enter as JSON (the admin API, definitions
/// files) and must obey the same bound as those that enter as AMQP. Stops
/// counting past [`MAX_DEPTH`] + 1.
pub fn value_depth(v: &amq_protocol::types::AMQPValue) -> usize {
    use amq_protocol::types::AMQPValue;
    let mut deepest = 0;
    let mut todo: Vec<(&AMQPValue, usize)> = vec![(v, 1)];
    while let Some((v, d)) = todo.pop() {
        let children: Box<dyn Iterator<Item = &AMQPValue>> = match v {
            AMQPValue::FieldTable(t) => Box::new(t.inner().values()),
            AMQPValue::FieldArray(a) => Box::new(a.as_slice().iter()),
            _ => continue,
        };
        deepest = deepest.max(d);
        if d > MAX_DEPTH {
            break;
        }
        todo.extend(children.map(|c| (c, d + 1)));
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};

    /// A table whose one entry nests `levels` more containers, alternating
    /// arrays and tables, innermost a long string.
    pub(crate) fn nested(levels: usize) -> FieldTable {
        let mut v = AMQPValue::LongString(LongString::from("leaf"));
        for i in 0..levels {
            v = if i % 2 == 0 {
                AMQPValue::FieldArray(FieldArray::from(vec![v, AMQPValue::Boolean(true)]))
            } else {
                let mut t = FieldTable::default();
                t.insert("k".into(), v);
                t.insert("n".into(), AMQPValue::LongLongInt(7));
                AMQPValue::FieldTable(t)
            };
        }
        let mut t = FieldTable::default();
        t.insert("x".into(), v);
        t
    }

    fn encoded(t: &FieldTable) -> Vec<u8> {
        let g = amq_protocol::types::generation::gen_field_table(t);
        cookie_factory::gen_simple(g, Vec::new()).unwrap()
    }

    #[test]
    fn depth_is_counted_as_amq_protocol_reads_it() {
        for levels in [0, 1, 2, 5, MAX_DEPTH - 2, MAX_DEPTH - 1] {
            let t = nested(levels);
            let b = encoded(&t);
            assert_eq!(check_table(&b), Ok(Some(b.len())), "{levels}");
            let (rest, parsed) = amq_protocol::types::parsing::parse_field_table(&b[..]).unwrap();
            assert!(rest.is_empty());
            assert_eq!(parsed, t);
            assert_eq!(value_depth(&AMQPValue::FieldTable(t)), levels + 1);
        }
        for levels in [MAX_DEPTH, MAX_DEPTH + 1] {
            let t = nested(levels);
            assert_eq!(check_table(&encoded(&t)), Err(TooDeep), "{levels}");
            assert!(value_depth(&AMQPValue::FieldTable(t)) > MAX_DEPTH);
        }
        // Far deeper, built by hand: amq-protocol's encoder (and the
        // value's drop) would recurse past this thread's stack.
        let mut v = b"A\0\0\0\0".to_vec();
        for _ in 0..10_000 {
            let mut outer = b"A".to_vec();
            outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
            outer.extend_from_slice(&v);
            v = outer;
        }
        let mut t = ((v.len() + 2) as u32).to_be_bytes().to_vec();
        t.extend_from_slice(&[1, b'x']);
        t.extend_from_slice(&v);
        assert_eq!(check_table(&t), Err(TooDeep));
    }

    #[test]
    fn every_value_type_is_sized_as_amq_protocol_sizes_it() {
        let mut t = FieldTable::default();
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortShortUInt(1),
            AMQPValue::ShortInt(-2),
            AMQPValue::ShortUInt(2),
            AMQPValue::LongInt(-3),
            AMQPValue::LongUInt(3),
            AMQPValue::LongLongInt(-4),
            AMQPValue::Float(1.5),
            AMQPValue::Double(2.5),
            AMQPValue::DecimalValue(amq_protocol::types::DecimalValue { scale: 2, value: 7 }),
            AMQPValue::LongString("s".into()),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
            AMQPValue::Timestamp(9),
            AMQPValue::FieldTable(FieldTable::default()),
            AMQPValue::ByteArray(vec![1, 2, 3].into()),
            AMQPValue::Void,
        ];
        for (i, v) in values.into_iter().enumerate() {
            t.insert(format!("k{i}").into(), v);
        }
        let b = encoded(&t);
        assert_eq!(check_table(&b), Ok(Some(b.len())));
        // Every cut is malformed (left to the parser), never "too deep".
        for cut in 0..b.len() {
            assert_eq!(check_table(&b[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn methods_and_properties_are_checked_where_their_table_is() {
        use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, connection, queue};
        let deep = nested(MAX_DEPTH + 3);
        let shallow = nested(3);
        let payload = |m: AMQPClass| {
            let mut out = Vec::new();
            super::super::frame::encode_method(&mut out, 1, m);
            out[7..out.len() - 1].to_vec()
        };
        let start_ok = |t: &FieldTable| {
            payload(AMQPClass::Connection(connection::AMQPMethod::StartOk(
                connection::StartOk {
                    client_properties: t.clone(),
                    mechanism: "PLAIN".into(),
                    response: "\0guest\0guest".into(),
                    locale: "en_US".into(),
                },
            )))
        };
        let bind = |t: &FieldTable| {
            payload(AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "k".into(),
                nowait: false,
                arguments: t.clone(),
            })))
        };
        let unbind = |t: &FieldTable| {
            payload(AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "k".into(),
                arguments: t.clone(),
            })))
        };
        let consume = |t: &FieldTable| {
            payload(AMQPClass::Basic(basic::AMQPMethod::Consume(
                basic::Consume {
                    queue: "q".into(),
                    consumer_tag: "c".into(),
                    no_local: false,
                    no_ack: false,
                    exclusive: false,
                    nowait: false,
                    arguments: t.clone(),
                },
            )))
        };
        type Make<'a> = &'a dyn Fn(&FieldTable) -> Vec<u8>;
        let makers: [Make<'_>; 4] = [&start_ok, &bind, &unbind, &consume];
        for make in makers {
            assert_eq!(check_method(&make(&shallow)), Ok(()));
            assert_eq!(check_method(&make(&deep)), Err(TooDeep));
        }
        let props = |t: &FieldTable| {
            crate::message::encode_properties(
                &BasicProperties::default()
                    .with_content_type("text/plain".into())
                    .with_headers(t.clone())
                    .with_delivery_mode(2),
            )
        };
        assert_eq!(check_properties(&props(&shallow)), Ok(()));
        assert_eq!(check_properties(&props(&deep)), Err(TooDeep));
    }
}
