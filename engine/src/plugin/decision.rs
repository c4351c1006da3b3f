//! What a transform decided, as the ABI encodes it and the host reads it
//! back: decoded and checked in one place, for the publish path and for
//! the validation a new version goes through when it loads.

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use wasmq_sdk::abi;

use super::PluginFault;

/// What a transform decided, checked and decoded.
// One per message, matched at once: boxing the big variant would only add
// an allocation on the publish path.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum TransformDecision {
    /// Route unchanged.
    Keep,
    /// Route with these replacements.
    Rewrite {
        /// New routing key.
        routing_key: Option<String>,
        /// New properties.
        properties: Option<BasicProperties>,
        /// New body.
        body: Option<Bytes>,
    },
    /// Drop it.
    Drop,
    /// Dead-letter it with this reason.
    DeadLetter(String),
}

/// Decode a transform decision; anything off is a malformed reply.
pub(crate) fn parse_decision(bytes: &[u8]) -> Result<TransformDecision, PluginFault> {
    fn bad(what: &str) -> PluginFault {
        PluginFault::Malformed(format!("transform decision: {what}"))
    }
    struct Cursor<'a>(&'a [u8]);
    impl<'a> Cursor<'a> {
        fn byte(&mut self, what: &str) -> Result<u8, PluginFault> {
            let (&b, rest) = self.0.split_first().ok_or_else(|| bad(what))?;
            self.0 = rest;
            Ok(b)
        }
        fn bytes(&mut self, what: &str) -> Result<&'a [u8], PluginFault> {
            if self.0.len() < 4 {
                return Err(bad(what));
            }
            let n = u32::from_le_bytes(self.0[..4].try_into().unwrap()) as usize;
            let v = self.0.get(4..4 + n).ok_or_else(|| bad(what))?;
            self.0 = &self.0[4 + n..];
            Ok(v)
        }
    }
    let mut c = Cursor(bytes);
    let d = match c.byte("empty")? {
        abi::TRANSFORM_KEEP => TransformDecision::Keep,
        abi::TRANSFORM_DROP => TransformDecision::Drop,
        abi::TRANSFORM_DEAD_LETTER => TransformDecision::DeadLetter(
            String::from_utf8_lossy(c.bytes("dead-letter reason")?).into_owned(),
        ),
        abi::TRANSFORM_REWRITE => {
            let flags = c.byte("rewrite without flags")?;
            let routing_key = if flags & abi::REWRITE_KEY != 0 {
                let k = std::str::from_utf8(c.bytes("routing key")?)
                    .map_err(|_| bad("routing key is not UTF-8"))?;
                if k.len() > 255 {
                    return Err(bad("routing key longer than 255 bytes"));
                }
                Some(k.to_owned())
            } else {
                None
            };
            let properties = if flags & abi::REWRITE_PROPERTIES != 0 {
                let p = c.bytes("properties")?;
                Some(
                    crate::message::decode_properties(p)
                        .map_err(|e| bad(&format!("properties do not decode: {e}")))?,
                )
            } else {
                None
            };
            let body = if flags & abi::REWRITE_BODY != 0 {
                Some(Bytes::copy_from_slice(c.bytes("body")?))
            } else {
                None
            };
            TransformDecision::Rewrite {
                routing_key,
                properties,
                body,
            }
        }
        other => return Err(bad(&format!("unknown op {other}"))),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::{Outcome, Properties, Rewrite};

    fn encode(o: &Outcome) -> Vec<u8> {
        let mut v = Vec::new();
        wasmq_sdk::guest::encode_outcome(o, &mut v);
        v
    }

    #[test]
    fn guest_decisions_decode_on_the_host() {
        assert_eq!(
            parse_decision(&encode(&Outcome::Keep)).unwrap(),
            TransformDecision::Keep
        );
        assert_eq!(
            parse_decision(&encode(&Outcome::Drop)).unwrap(),
            TransformDecision::Drop
        );
        assert_eq!(
            parse_decision(&encode(&Outcome::DeadLetter("bad json".into()))).unwrap(),
            TransformDecision::DeadLetter("bad json".into())
        );
        let rw = Outcome::Rewrite(Rewrite {
            routing_key: Some("new.key".into()),
            properties: Some(Properties {
                content_type: Some("text/plain".into()),
                ..Default::default()
            }),
            body: Some(b"hi".to_vec()),
        });
        match parse_decision(&encode(&rw)).unwrap() {
            TransformDecision::Rewrite {
                routing_key,
                properties,
                body,
            } => {
                assert_eq!(routing_key.as_deref(), Some("new.key"));
                assert_eq!(
                    properties
                        .unwrap()
                        .content_type()
                        .as_ref()
                        .unwrap()
                        .as_str(),
                    "text/plain"
                );
                assert_eq!(body.unwrap(), Bytes::from_static(b"hi"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_or_unknown_decisions_are_malformed() {
        let rw = encode(&Outcome::Rewrite(Rewrite {
            body: Some(vec![1, 2, 3]),
            ..Default::default()
        }));
        for cut in 0..rw.len() {
            assert!(
                matches!(parse_decision(&rw[..cut]), Err(PluginFault::Malformed(_))),
                "cut {cut}"
            );
        }
        assert!(matches!(
            parse_decision(&[9]),
            Err(PluginFault::Malformed(_))
        ));
    }
}
