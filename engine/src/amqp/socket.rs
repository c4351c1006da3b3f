//! A client's byte stream: plain TCP, or TLS over it.
//!
//! The connection loop waits on reading and writing at once, so both go
//! through one call ([`Socket::io`]) that borrows the socket once; a TLS
//! stream cannot be split into halves without a lock, and an enum keeps
//! the plain path free of boxing or dynamic calls.
//!
//! TLS adds one duty: rustls may hold encrypted bytes after a write
//! returned (its plaintext was taken, the socket was full), and may have a
//! reply to send after a read (a key update). [`Socket::io`] flushes those
//! whenever it is polled, so the loop needs no TLS-specific branch.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub(crate) enum Socket {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// What one wake-up of [`Socket::io`] did.
pub(crate) enum Io {
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
}

impl Socket {
    /// The TCP socket underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Socket::Tcp(s) => s,
            Socket::Tls(s) => s.get_ref().0,
        }
    }

    /// The TLS session, if any.
    pub(crate) fn tls(&self) -> Option<&rustls::ServerConnection> {
        match self {
            Socket::Tcp(_) => None,
            Socket::Tls(s) => Some(s.get_ref().1),
        }
    }

    /// Encrypted bytes waiting to be written.
    pub(crate) fn tls_pending(&self) -> bool {
        matches!(self, Socket::Tls(s) if s.get_ref().1.wants_write())
    }

    /// Write what the socket takes now, without waiting.
    pub(crate) fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.try_write(data),
            Socket::Tls(_) => {
                let mut cx = Context::from_waker(Waker::noop());
                match Pin::new(self).poll_write(&mut cx, data) {
                    Poll::Ready(r) => r,
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Wait until `out` (when not empty) was partly written, or (when
    /// `read`) something was read into `rbuf`; meanwhile push out what TLS
    /// holds.
    pub(crate) async fn io(&mut self, rbuf: &mut BytesMut, out: &[u8], read: bool) -> Io {
        std::future::poll_fn(|cx| {
            if !out.is_empty() {
                if let Poll::Ready(r) = Pin::new(&mut *self).poll_write(cx, out) {
                    return Poll::Ready(Io::Wrote(r));
                }
            } else if self.tls_pending()
                && let Poll::Ready(Err(e)) = Pin::new(&mut *self).poll_flush(cx)
            {
                return Poll::Ready(Io::Wrote(Err(e)));
            }
            if read
                && let Poll::Ready(r) =
                    tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, rbuf)
            {
                return Poll::Ready(Io::Read(r));
            }
            Poll::Pending
        })
        .await
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
