//! Durable definitions: exchanges, queues and bindings that survive a
//! restart, with their arguments and the plugin each exchange runs.
//!
//! This is the snapshot: one JSON file replaced atomically (write a
//! temporary file, sync it, rename it over the old one, sync the folder): a
//! crash leaves the old file or the new one, never a mix. Changes between
//! snapshots are appended to the definitions log (`changes`). Arguments are kept in AMQP's own table encoding (hex), so
//! every field type round-trips exactly as the client sent it.

use std::path::Path;

use amq_protocol::types::FieldTable;
use serde::{Deserialize, Serialize};

use super::{StoreError, sync_dir};

/// Current format of `definitions.json`.
pub const DEFINITIONS_VERSION: u32 = 1;

/// Everything durable, by vhost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Definitions {
    /// Format version.
    pub version: u32,
    /// Vhosts with durable definitions.
    pub vhosts: Vec<VHostDefinitions>,
}

/// One vhost's durable definitions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VHostDefinitions {
    /// Vhost name.
    pub name: String,
    /// Durable exchanges (not the predeclared ones).
    pub exchanges: Vec<ExchangeDefinition>,
    /// Durable, non-exclusive queues.
    pub queues: Vec<QueueDefinition>,
    /// Bindings between durable exchanges and durable destinations.
    pub bindings: Vec<BindingDefinition>,
}

/// A durable exchange.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDefinition {
    /// Name.
    pub name: String,
    /// Exchange type: the routing plugin's name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Internal.
    pub internal: bool,
    /// Declare arguments.
    #[serde(with = "table_hex")]
    pub arguments: FieldTable,
}

/// A durable queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueDefinition {
    /// Name.
    pub name: String,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Declare arguments.
    #[serde(with = "table_hex")]
    pub arguments: FieldTable,
}

/// A durable binding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BindingDefinition {
    /// Source exchange.
    pub source: String,
    /// Destination queue or exchange.
    pub destination: String,
    /// `"queue"` or `"exchange"`.
    pub destination_type: String,
    /// Binding key.
    pub routing_key: String,
    /// Binding arguments.
    #[serde(with = "table_hex")]
    pub arguments: FieldTable,
}

impl Definitions {
    /// Read `path`; a missing file is an empty broker.
    pub fn load(path: &Path) -> Result<Definitions, StoreError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Definitions {
                    version: DEFINITIONS_VERSION,
                    vhosts: Vec::new(),
                });
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let defs: Definitions = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            what: format!("line {} column {}: {e}", e.line(), e.column()),
        })?;
        if defs.version != DEFINITIONS_VERSION {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                offset: 0,
                what: format!(
                    "definitions version {}, this broker reads version {DEFINITIONS_VERSION}",
                    defs.version
                ),
            });
        }
        Ok(defs)
    }

    /// Replace `path` with these definitions, atomically and durably.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(self).expect("definitions serialize");
        replace_file(path, &text)
    }
}

/// Replace `path` with `bytes`, atomically and durably: a temporary file
/// written and synced, renamed over the old one, the folder synced. A
/// crash leaves the old file or the new one, never a mix.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

mod table_hex {
    use amq_protocol::types::FieldTable;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(t: &FieldTable, s: S) -> Result<S::Ok, S::Error> {
        let body = crate::message::encode_table_body(t);
        let mut hex = String::with_capacity(body.len() * 2);
        for b in body {
            hex.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FieldTable, D::Error> {
        let hex = String::deserialize(d)?;
        if hex.len() % 2 != 0 {
            return Err(D::Error::custom("odd-length hex table"));
        }
        let mut framed = Vec::with_capacity(4 + hex.len() / 2);
        framed.extend_from_slice(&((hex.len() / 2) as u32).to_be_bytes());
        for i in (0..hex.len()).step_by(2) {
            let byte = u8::from_str_radix(&hex[i..i + 2], 16)
                .map_err(|_| D::Error::custom("bad hex in table"))?;
            framed.push(byte);
        }
        match amq_protocol::types::parsing::parse_field_table(&framed[..]) {
            Ok(([], t)) => Ok(t),
            _ => Err(D::Error::custom("malformed AMQP table")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, ShortString};

    #[test]
    fn definitions_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("definitions.json");
        assert!(Definitions::load(&path).unwrap().vhosts.is_empty());
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(10));
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString("dlx".into()),
        );
        let defs = Definitions {
            version: DEFINITIONS_VERSION,
            vhosts: vec![VHostDefinitions {
                name: "/".into(),
                exchanges: vec![ExchangeDefinition {
                    name: "events".into(),
                    kind: "topic".into(),
                    arguments: args.clone(),
                    ..Default::default()
                }],
                queues: vec![QueueDefinition {
                    name: "q".into(),
                    auto_delete: false,
                    arguments: args,
                }],
                bindings: vec![BindingDefinition {
                    source: "events".into(),
                    destination: "q".into(),
                    destination_type: "queue".into(),
                    routing_key: "a.#".into(),
                    arguments: FieldTable::default(),
                }],
            }],
        };
        defs.save(&path).unwrap();
        assert_eq!(Definitions::load(&path).unwrap(), defs);
        std::fs::write(&path, "{\"version\": 1, \"vhosts\": [}").unwrap();
        let e = Definitions::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("definitions.json") && e.contains("line 1"),
            "{e}"
        );
    }
}

// RabbitMQ's shape of a definitions document (`/api/definitions`,
// `rabbitmqctl export_definitions`), as far as wasmq has the same things.
#[derive(serde::Deserialize)]
struct ImportDoc {
    #[serde(default)]
    vhosts: Vec<ImportVHost>,
    #[serde(default)]
    exchanges: Vec<ImportExchange>,
    #[serde(default)]
    queues: Vec<ImportQueue>,
    #[serde(default)]
    bindings: Vec<ImportBinding>,
}

#[derive(serde::Deserialize)]
struct ImportVHost {
    name: String,
}

fn default_vhost() -> String {
    "/".into()
}

#[derive(serde::Deserialize)]
struct ImportExchange {
    name: String,
    #[serde(default = "default_vhost")]
    vhost: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: serde_json::Value,
}

#[derive(serde::Deserialize)]
struct ImportQueue {
    name: String,
    #[serde(default = "default_vhost")]
    vhost: String,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    arguments: serde_json::Value,
}

#[derive(serde::Deserialize)]
struct ImportBinding {
    source: String,
    #[serde(default = "default_vhost")]
    vhost: String,
    destination: String,
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: serde_json::Value,
}

impl Definitions {
    /// Definitions from a document in RabbitMQ's shape (what `GET
    /// /api/definitions` and `wasmq definitions export` write); every item
    /// durable. The error names the item.
    pub fn from_rabbitmq(bytes: &[u8]) -> Result<Definitions, String> {
        let doc: ImportDoc =
            serde_json::from_slice(bytes).map_err(|e| format!("definitions: {e}"))?;
        let mut by_vhost: std::collections::BTreeMap<String, VHostDefinitions> = Default::default();
        fn slot<'a>(
            by_vhost: &'a mut std::collections::BTreeMap<String, VHostDefinitions>,
            name: &str,
        ) -> &'a mut VHostDefinitions {
            by_vhost
                .entry(name.to_owned())
                .or_insert_with(|| VHostDefinitions {
                    name: name.to_owned(),
                    ..Default::default()
                })
        }
        for v in &doc.vhosts {
            slot(&mut by_vhost, &v.name);
        }
        let args = |what: &str, v: &serde_json::Value| {
            crate::json::json_to_table(v).map_err(|e| format!("{what}: {e}"))
        };
        for x in doc.exchanges {
            let arguments = args(&format!("exchange '{}'", x.name), &x.arguments)?;
            slot(&mut by_vhost, &x.vhost)
                .exchanges
                .push(ExchangeDefinition {
                    name: x.name,
                    kind: x.kind,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                    arguments,
                });
        }
        for q in doc.queues {
            let arguments = args(&format!("queue '{}'", q.name), &q.arguments)?;
            slot(&mut by_vhost, &q.vhost).queues.push(QueueDefinition {
                name: q.name,
                auto_delete: q.auto_delete,
                arguments,
            });
        }
        for b in doc.bindings {
            if b.destination_type != "queue" && b.destination_type != "exchange" {
                return Err(format!(
                    "binding '{}' -> '{}': destination_type must be queue or exchange",
                    b.source, b.destination
                ));
            }
            let arguments = args(&format!("binding '{}'", b.source), &b.arguments)?;
            slot(&mut by_vhost, &b.vhost)
                .bindings
                .push(BindingDefinition {
                    source: b.source,
                    destination: b.destination,
                    destination_type: b.destination_type,
                    routing_key: b.routing_key,
                    arguments,
                });
        }
        Ok(Definitions {
            version: DEFINITIONS_VERSION,
            vhosts: by_vhost.into_values().collect(),
        })
    }
}
