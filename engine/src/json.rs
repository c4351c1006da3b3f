//! AMQP field tables as JSON, the way RabbitMQ's management API shows and
//! takes them: numbers as numbers, strings as strings, nested tables as
//! objects. JSON cannot say which integer width a client used, so imported
//! integers become 64-bit (`l`), as RabbitMQ's import does.

use crate::amqp::field_table::MAX_DEPTH;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

/// A field table as a JSON object.
pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.to_string(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &AMQPValue) -> Value {
    use AMQPValue as A;
    match v {
        A::Boolean(b) => Value::Bool(*b),
        A::ShortShortInt(n) => Value::from(*n),
        A::ShortShortUInt(n) => Value::from(*n),
        A::ShortInt(n) => Value::from(*n),
        A::ShortUInt(n) => Value::from(*n),
        A::LongInt(n) => Value::from(*n),
        A::LongUInt(n) => Value::from(*n),
        A::LongLongInt(n) => Value::from(*n),
        A::Timestamp(n) => Value::from(*n),
        A::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        A::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        A::DecimalValue(d) => {
            let v = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Number::from_f64(v).map_or(Value::Null, Value::Number)
        }
        A::ShortString(s) => Value::String(s.to_string()),
        A::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        A::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into_owned()),
        A::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        A::FieldTable(t) => table_to_json(t),
        A::Void => Value::Null,
    }
}

/// A JSON object as a field table; anything else is an error, and so is
/// what AMQP could not carry: a key over 255 bytes (a short string), or
/// nesting deeper than [`MAX_DEPTH`] (the bound every table that arrives
/// over AMQP meets, so a table from the admin API can be stored, read back
/// and delivered like one that came from a client).
pub fn json_to_table(v: &Value) -> Result<FieldTable, String> {
    match v {
        Value::Null => Ok(FieldTable::default()),
        Value::Object(m) => {
            check_json(v, 0)?;
            Ok(object_to_table(m))
        }
        other => Err(format!("arguments must be an object, not {other}")),
    }
}

/// Key lengths and nesting, checked before anything is converted. serde_json
/// already refuses documents nested over 128 levels, so this recursion is
/// bounded by its input.
fn check_json(v: &Value, depth: usize) -> Result<(), String> {
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| k.len() > 255) {
                return Err(format!(
                    "field name of {} bytes (at most 255): {}...",
                    k.len(),
                    crate::amqp::frame::short_text(k, 32)
                ));
            }
            Box::new(m.values())
        }
        Value::Array(a) => Box::new(a.iter()),
        _ => return Ok(()),
    };
    if depth + 1 > MAX_DEPTH {
        return Err(format!("field table nested deeper than {MAX_DEPTH} levels"));
    }
    children
        .into_iter()
        .try_for_each(|c| check_json(c, depth + 1))
}

fn object_to_table(m: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(ShortString::from(k.as_str()), json_to_value(v));
    }
    t
}

fn json_to_value(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for v in a {
                arr.push(json_to_value(v));
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(m) => AMQPValue::FieldTable(object_to_table(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_through_json() {
        let v = serde_json::json!({
            "x-max-length": 10,
            "x-dead-letter-exchange": "dlx",
            "ratio": 0.5,
            "flag": true,
            "nested": {"a": [1, "b"]},
        });
        let t = json_to_table(&v).unwrap();
        assert_eq!(
            t.inner().get("x-max-length"),
            Some(&AMQPValue::LongLongInt(10))
        );
        assert_eq!(table_to_json(&t), v);
        assert!(json_to_table(&serde_json::json!([1])).is_err());
        let long_key = serde_json::json!({ "k".repeat(256): 1 });
        assert!(json_to_table(&long_key).is_err());
        let mut deep = serde_json::json!("leaf");
        for _ in 0..MAX_DEPTH {
            deep = serde_json::json!([deep]);
        }
        // The outer object is one level, so this is one too many.
        assert!(json_to_table(&serde_json::json!({ "d": deep.clone() })).is_err());
        let ok = json_to_table(&serde_json::json!({ "d": deep[0].clone() })).unwrap();
        assert_eq!(
            crate::amqp::field_table::value_depth(&AMQPValue::FieldTable(ok)),
            MAX_DEPTH
        );
    }
}
