//! Shared bits of the example client programs (`publish`, `consume`).

#![forbid(unsafe_code)]

use lapin::ExchangeKind;

/// An exchange type by name: the four built-ins, or a plugin's name.
pub fn exchange_kind(name: &str) -> ExchangeKind {
    match name {
        "direct" => ExchangeKind::Direct,
        "topic" => ExchangeKind::Topic,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.into()),
    }
}
