//! A raw AMQP 0-9-1 client connection for the probes: as little client
//! as possible (one task, the broker's own frame codec), so that what a
//! probe measures is the broker.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::FieldTable;
use anyhow::{Context, bail};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmq::amqp::frame::{Frame, PROTOCOL_HEADER, decode, encode_method};

/// The largest frame the probes accept.
pub const FRAME_MAX: u32 = 131_072;

/// Plain TCP, or TLS over it (`--tls-ca`).
pub type Stream = tokio_util::either::Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS client trusting the CA certificates in `ca_file` only.
fn tls_connector(ca_file: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?
    {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One AMQP connection with channel 1 open.
pub struct Conn {
    /// The socket.
    pub stream: Stream,
    /// Bytes read and not yet decoded.
    pub buf: BytesMut,
    /// Bytes to write.
    pub out: Vec<u8>,
    /// The queue it consumes from, if any.
    pub queue: String,
}

impl Conn {
    /// Connect to `addr`, log in with PLAIN and open channel 1 (over TLS
    /// trusting `tls_ca` when given).
    pub async fn open(
        addr: &str,
        user: &str,
        password: &str,
        vhost: &str,
        tls_ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let stream = match tls_ca {
            None => Stream::Left(stream),
            Some(ca) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
                Stream::Right(tls_connector(ca)?.connect(name, stream).await?)
            }
        };
        let mut c = Conn {
            stream,
            buf: BytesMut::with_capacity(64 << 10),
            out: Vec::new(),
            queue: String::new(),
        };
        c.stream.write_all(PROTOCOL_HEADER).await?;
        c.expect(|m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::Start(_))))
            .await?;
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{user}\0{password}").into(),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let tune = match c.method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            other => bail!("expected connection.tune, got {other:?}"),
        };
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 1,
                frame_max: if tune.frame_max == 0 {
                    FRAME_MAX
                } else {
                    tune.frame_max.min(FRAME_MAX)
                },
                heartbeat: 0,
            })),
        )
        .await?;
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost.into(),
            })),
        )
        .await?;
        c.expect(|m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))))
            .await?;
        c.send(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        c.expect(|m| matches!(m, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
            .await?;
        Ok(c)
    }

    /// Send one method on channel `ch`.
    pub async fn send(&mut self, ch: u16, m: AMQPClass) -> anyhow::Result<()> {
        self.out.clear();
        encode_method(&mut self.out, ch, m);
        self.stream.write_all(&self.out).await?;
        // TLS may hold the last record until flushed (a no-op on TCP).
        self.stream.flush().await?;
        Ok(())
    }

    /// The next frame, decoded.
    pub async fn frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = decode(&mut self.buf, FRAME_MAX).map_err(|e| anyhow::anyhow!("{e}"))? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    /// The next frame's type and payload, unparsed: the consumer only
    /// needs to find bodies, and parsing each `basic.deliver` would make
    /// the probe, not the broker, the limit of an unpaced run.
    pub async fn raw_frame(&mut self) -> anyhow::Result<(u8, bytes::Bytes)> {
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes(self.buf[3..7].try_into()?) as usize;
                if size + 8 > FRAME_MAX as usize {
                    bail!("frame of {size} bytes over frame_max");
                }
                if self.buf.len() >= size + 8 {
                    let kind = self.buf[0];
                    let mut frame = self.buf.split_to(size + 8);
                    let payload = frame.split_off(7).freeze().slice(..size);
                    return Ok((kind, payload));
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    /// The next method (a close is an error).
    pub async fn method(&mut self) -> anyhow::Result<AMQPClass> {
        loop {
            match self.frame().await? {
                Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    bail!("connection closed: {} {}", c.reply_code, c.reply_text)
                }
                Frame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                    bail!("channel closed: {} {}", c.reply_code, c.reply_text)
                }
                Frame::Method(_, m) => return Ok(m),
                Frame::Heartbeat(_) => continue,
                other => bail!("expected a method, got {other:?}"),
            }
        }
    }

    /// The next method, which must be what `want` accepts.
    pub async fn expect(&mut self, want: impl Fn(&AMQPClass) -> bool) -> anyhow::Result<AMQPClass> {
        let m = self.method().await?;
        if !want(&m) {
            bail!("unexpected reply {m:?}");
        }
        Ok(m)
    }
}
