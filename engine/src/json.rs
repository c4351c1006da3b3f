//! AMQP field tables as JSON, the way RabbitMQ's management API shows and
//! takes them: numbers as numbers, strings as strings, nested tables as
//! objects. JSON cannot say which integer width a client used, so imported
//! integers become 64-bit (`l`), as RabbitMQ's import does.

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

/// A JSON object as a field table; anything else is an error.
pub fn json_to_table(v: &Value) -> Result<FieldTable, String> {
    match v {
        Value::Null => Ok(FieldTable::default()),
        Value::Object(m) => Ok(object_to_table(m)),
        other => Err(format!("arguments must be an object, not {other}")),
    }
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
    }
}
