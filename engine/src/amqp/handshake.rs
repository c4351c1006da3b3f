//! The AMQP handshake, from the protocol header to connection.open-ok:
//! protocol negotiation, the login (PLAIN, AMQPLAIN, or EXTERNAL with a
//! verified client certificate), tuning, and the vhost check. What it
//! settles is a [`Session`], which the connection loop runs with.
//!
//! Every refusal is answered as RabbitMQ answers it (a protocol header for a
//! wrong header, 403 for a refused login, 530 for a vhost), so that clients
//! report the same errors they would there.

use std::net::SocketAddr;
use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::AmqpConfig;
use super::frame::{Frame, FrameError, PROTOCOL_HEADER, decode, encode_method, short_string};
use super::grant::Grant;
use super::socket::Socket;
use crate::Broker;
use crate::broker::VHost;

/// Smallest frame_max a client may ask for (spec: frame-min-size).
const FRAME_MIN: u32 = 4096;

pub(super) struct Session {
    pub(super) user: String,
    pub(super) vhost: Arc<VHost>,
    pub(super) grant: Grant,
    pub(super) frame_max: u32,
    pub(super) channel_max: u16,
    pub(super) heartbeat: u16,
    pub(super) cancel_notify: bool,
    pub(super) client: String,
    pub(super) blocked_capability: bool,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("client closed the connection")]
    Closed,
    #[error("unexpected frame during handshake")]
    Unexpected,
}

async fn next_frame(
    reader: &mut Socket,
    buf: &mut BytesMut,
    frame_max: u32,
) -> Result<Frame, HandshakeError> {
    loop {
        if let Some(f) = decode(buf, frame_max)? {
            return Ok(f);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

async fn next_method(reader: &mut Socket, buf: &mut BytesMut) -> Result<AMQPClass, HandshakeError> {
    loop {
        match next_frame(reader, buf, 131_072).await? {
            Frame::Method(0, m) => return Ok(m),
            Frame::Heartbeat(0) => continue,
            _ => return Err(HandshakeError::Unexpected),
        }
    }
}

/// Write `bytes` and push them out (TLS may hold them otherwise).
async fn send(socket: &mut Socket, bytes: &[u8]) -> std::io::Result<()> {
    socket.write_all(bytes).await?;
    socket.flush().await
}

pub(super) async fn close_with(
    writer: &mut Socket,
    code: u16,
    text: &str,
    class_id: u16,
    method_id: u16,
) {
    let mut out = Vec::new();
    encode_close(&mut out, code, text, class_id, method_id);
    let _ = writer.write_all(&out).await;
    // Shutting down pushes out what TLS holds, then its close_notify.
    let _ = writer.shutdown().await;
}

/// Append connection.close; its text cut to a short string's 255 bytes (it
/// often quotes client input: a vhost, a mechanism, a consumer tag).
pub(super) fn encode_close(
    out: &mut Vec<u8>,
    code: u16,
    text: &str,
    class_id: u16,
    method_id: u16,
) {
    encode_method(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: code,
            reply_text: short_string(text),
            class_id,
            method_id,
        })),
    );
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "exchange_exchange_bindings",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        caps.insert(ShortString::from(cap), AMQPValue::Boolean(true));
    }
    let mut p = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    p.insert("product".into(), s("wasmq"));
    p.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    p.insert("platform".into(), s("Rust"));
    p.insert(
        "information".into(),
        s("AMQP 0-9-1 broker with Wasm exchange plugins"),
    );
    p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    p
}

/// PLAIN: `authzid \0 user \0 password`; AMQPLAIN: a field table body.
fn credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
            let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
            Some((user, pass))
        }
        "AMQPLAIN" => {
            super::field_table::check_table_body(response).ok()?;
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let (_, t) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
            let get = |k: &str| match t.inner().get(k)? {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            };
            Some((get("LOGIN")?, get("PASSWORD")?))
        }
        _ => None,
    }
}

/// "product version" from the client properties, for the admin API.
fn client_product(props: &FieldTable) -> String {
    let s = |k: &str| match props.inner().get(k) {
        Some(AMQPValue::LongString(v)) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(v)) => v.to_string(),
        _ => String::new(),
    };
    format!("{} {}", s("product"), s("version"))
        .trim()
        .to_owned()
}

fn client_cancel_notify(props: &FieldTable) -> bool {
    client_capability(props, "consumer_cancel_notify")
}

fn client_capability(props: &FieldTable, name: &str) -> bool {
    match props.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => {
            matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

pub(super) async fn handshake(
    broker: &Broker,
    config: &AmqpConfig,
    peer: SocketAddr,
    socket: &mut Socket,
    buf: &mut BytesMut,
) -> Result<Option<Session>, HandshakeError> {
    while buf.len() < 8 {
        if socket.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
    if &buf[..8] != PROTOCOL_HEADER {
        // The spec: answer with the header we speak, then close.
        send(socket, PROTOCOL_HEADER).await?;
        let _ = socket.shutdown().await;
        if let Some(quiet) = super::REFUSALS.admit(peer.ip()) {
            tracing::info!(%peer, also_refused = quiet, "refused a client with protocol header {:?}", String::from_utf8_lossy(&buf[..8]));
        }
        return Ok(None);
    }
    let _ = buf.split_to(8);
    // A client that presented a verified certificate may log in as the
    // user its CN names (EXTERNAL), as with RabbitMQ's SSL auth mechanism.
    let cert_user = socket.tls().and_then(crate::tls::peer_common_name);
    let mechanisms = if cert_user.is_some() {
        "PLAIN AMQPLAIN EXTERNAL"
    } else {
        "PLAIN AMQPLAIN"
    };
    let mut out = Vec::new();
    encode_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: mechanisms.into(),
            locales: "en_US".into(),
        })),
    );
    send(socket, &out).await?;

    let AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)) =
        next_method(socket, buf).await?
    else {
        return Err(HandshakeError::Unexpected);
    };
    let (who, user) = if start_ok.mechanism.as_str() == "EXTERNAL" {
        let user = cert_user
            .as_deref()
            .and_then(|name| broker.accounts().certificate_user(name, peer.ip()));
        (cert_user.unwrap_or_default(), user)
    } else {
        let creds = credentials(start_ok.mechanism.as_str(), start_ok.response.as_bytes());
        let user = creds
            .as_ref()
            .and_then(|(name, pass)| broker.accounts().authenticate(name, pass, peer.ip()));
        (creds.map(|c| c.0).unwrap_or_default(), user)
    };
    let Some(user) = user else {
        if let Some(quiet) = super::REFUSALS.admit(peer.ip()) {
            tracing::warn!(%peer, user = %crate::untrusted::text(&who), also_refused = quiet, "authentication failed");
        }
        let text = format!(
            "ACCESS_REFUSED - Login was refused using authentication mechanism {}",
            start_ok.mechanism
        );
        close_with(socket, 403, &text, 10, 11).await;
        return Ok(None);
    };
    let mut out = Vec::new();
    encode_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: config.channel_max,
            frame_max: config.frame_max,
            heartbeat: config.heartbeat,
        })),
    );
    send(socket, &out).await?;
    let AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune)) =
        next_method(socket, buf).await?
    else {
        return Err(HandshakeError::Unexpected);
    };
    let frame_max = if tune.frame_max == 0 {
        config.frame_max
    } else {
        tune.frame_max.min(config.frame_max)
    };
    if frame_max < FRAME_MIN {
        close_with(
            socket,
            503,
            "COMMAND_INVALID - frame_max below 4096",
            10,
            31,
        )
        .await;
        return Ok(None);
    }
    let channel_max = if tune.channel_max == 0 {
        config.channel_max
    } else {
        tune.channel_max.min(config.channel_max)
    };
    let AMQPClass::Connection(connection::AMQPMethod::Open(open)) =
        next_method(socket, buf).await?
    else {
        return Err(HandshakeError::Unexpected);
    };
    let vhost_name = open.virtual_host.to_string();
    let access = broker
        .vhost(&vhost_name)
        .zip(broker.accounts().permissions_in(&user.name, &vhost_name));
    let Some((vhost, permissions)) = access else {
        let text = format!(
            "NOT_ALLOWED - access to vhost '{vhost_name}' refused for user '{}'",
            user.name
        );
        close_with(socket, 530, &text, 10, 40).await;
        return Ok(None);
    };
    // connection.open-ok is sent by the caller once the connection is
    // registered within its limits (`over_connection_limit`).
    Ok(Some(Session {
        user: user.name.clone(),
        grant: Grant {
            impersonator: user.has_tag("impersonator"),
            tracer: user.has_tag("administrator") || user.has_tag("monitoring"),
            user: user.name.clone(),
            vhost: vhost_name,
            permissions,
        },
        vhost,
        frame_max,
        channel_max,
        heartbeat: tune.heartbeat,
        cancel_notify: client_cancel_notify(&start_ok.client_properties),
        client: client_product(&start_ok.client_properties),
        blocked_capability: client_capability(&start_ok.client_properties, "connection.blocked"),
    }))
}

/// RabbitMQ's refusal (in its words) when the vhost's or the user's
/// `max-connections` is reached by the connections `open` on this node
/// (counted under the registry's lock, so two logins at once cannot both
/// take the last place) and those the other nodes of a cluster last
/// reported (see [`crate::cluster::presence`]).
pub(crate) fn over_connection_limit(
    broker: &Broker,
    user: &str,
    vhost: &str,
    open: &mut dyn Iterator<Item = &crate::broker::ConnectionInfo>,
) -> Option<String> {
    let accounts = broker.accounts();
    let (by_vhost, by_user) = (
        accounts.vhost_limit(vhost, "max-connections"),
        accounts.user_limit(user, "max-connections"),
    );
    if by_vhost.is_none() && by_user.is_none() {
        return None;
    }
    use crate::cluster::presence::Count;
    let (mut in_vhost, mut of_user) = (
        broker.counted_elsewhere(Count::ConnectionsIn(vhost)),
        broker.counted_elsewhere(Count::ConnectionsOf(user)),
    );
    for c in open {
        in_vhost += u64::from(c.vhost == vhost);
        of_user += u64::from(c.user == user);
    }
    if let Some(n) = by_vhost
        && in_vhost >= n
    {
        return Some(format!(
            "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}': connection limit ({n}) is reached"
        ));
    }
    if let Some(n) = by_user
        && of_user >= n
    {
        return Some(format!(
            "NOT_ALLOWED - connection refused for user '{user}': user connection limit ({n}) is reached"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amqplain(pairs: &[(&str, AMQPValue)]) -> Vec<u8> {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        crate::message::encode_table_body(&t)
    }

    #[test]
    fn plain_credentials_are_authzid_user_password() {
        assert_eq!(
            credentials("PLAIN", b"\0guest\0secret"),
            Some(("guest".into(), "secret".into()))
        );
        // An authorization identity is allowed and ignored.
        assert_eq!(
            credentials("PLAIN", b"admin\0app\0pw"),
            Some(("app".into(), "pw".into()))
        );
        assert_eq!(credentials("PLAIN", b"\0guest"), None);
        assert_eq!(credentials("PLAIN", b"\0\xff\xfe\0pw"), None, "not UTF-8");
        assert_eq!(credentials("CRAM-MD5", b"\0guest\0guest"), None);
    }

    #[test]
    fn amqplain_credentials_are_a_table_body() {
        let body = amqplain(&[
            ("LOGIN", AMQPValue::LongString("app".into())),
            ("PASSWORD", AMQPValue::LongString("pw".into())),
        ]);
        assert_eq!(
            credentials("AMQPLAIN", &body),
            Some(("app".into(), "pw".into()))
        );
        let no_password = amqplain(&[("LOGIN", AMQPValue::LongString("app".into()))]);
        assert_eq!(credentials("AMQPLAIN", &no_password), None);
        let wrong_type = amqplain(&[
            ("LOGIN", AMQPValue::LongInt(7)),
            ("PASSWORD", AMQPValue::LongString("pw".into())),
        ]);
        assert_eq!(credentials("AMQPLAIN", &wrong_type), None);
        assert_eq!(credentials("AMQPLAIN", b"\x05LOGIN"), None, "truncated");
    }
}
