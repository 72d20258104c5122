//! One HBONE CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), so that an HTTP server or client
//! (hyper) can run inside the tunnel.
//!
//! Input: the two halves of an HTTP/2 stream (the server's accepted CONNECT, or a pooled client stream with
//! its slot). Output: [`Tunnel`]. Flow control: received bytes are given back to the peer's window only as
//! the reader consumes them, so a slow HTTP parser slows the sender; writes take at most the capacity h2
//! grants (one copy of the caller's buffer into a `Bytes`, as the writer gives us a borrowed slice).
//! Shutdown sends END_STREAM; a peer reset with NO_ERROR or CANCEL reads as end of stream. Bytes are counted
//! both ways (access log, metrics). A resumable stream (`hbone::resume::piped`) is a tunnel too, read and
//! written through its copy task, so that its user never sees the HBONE connections under it change.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::h2_io;
use super::pool::Slot;
use super::resume::piped::Piped;

/// A CONNECT stream read and written as bytes.
pub struct Tunnel {
    io: Io,
    /// Bytes read by the caller.
    pub read: u64,
    /// Bytes written by the caller.
    pub written: u64,
}

enum Io {
    /// The stream's own halves, read and written directly.
    H2(H2),
    /// A resumable stream, through its copy task (`hbone::resume::piped`); boxed, so plain tunnels stay
    /// small.
    Piped(Box<Piped>, bool),
}

struct H2 {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    /// The stream's place on a pooled client connection ([`Slot::unpooled`] on the server side, or for a
    /// connection of its own).
    _slot: Slot,
    eof: bool,
    shut: bool,
}

impl Tunnel {
    /// The tunnel over `send`/`recv`; `slot` is kept until the tunnel is dropped.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Slot) -> Tunnel {
        Tunnel {
            io: Io::H2(H2 {
                send,
                recv,
                pending: Bytes::new(),
                _slot: slot,
                eof: false,
                shut: false,
            }),
            read: 0,
            written: 0,
        }
    }

    /// An open HBONE client stream as a tunnel.
    pub fn from_client(stream: crate::hbone::pool::Stream) -> Tunnel {
        Tunnel::new(stream.send, stream.recv, stream.slot)
    }

    /// A resumable stream as a tunnel.
    pub fn piped(piped: Piped) -> Tunnel {
        Tunnel {
            io: Io::Piped(Box::new(piped), false),
            read: 0,
            written: 0,
        }
    }

    /// Resets the stream (CANCEL; a resumable one for good): the peer sees the tunnel fail rather than end.
    pub fn reset(&mut self) {
        match &mut self.io {
            Io::H2(h2) => h2.send.send_reset(Reason::CANCEL),
            Io::Piped(p, _) => p.reset(),
        }
    }

    /// Whether this side has ended its half of the stream (END_STREAM sent).
    pub fn is_shut(&self) -> bool {
        match &self.io {
            Io::H2(h2) => h2.shut,
            Io::Piped(_, shut) => *shut,
        }
    }

    /// Reads and discards what the peer still sends until it ends its half, so that a tunnel finished with
    /// after a clean shutdown ends with END_STREAM both ways rather than a reset. (A resumable stream's
    /// copy task does that itself.)
    pub async fn drain(self) {
        let Io::H2(mut h2) = self.io else {
            return;
        };
        if h2.eof {
            return;
        }
        while let Some(Ok(chunk)) = h2.recv.data().await {
            let _ = h2.recv.flow_control().release_capacity(chunk.len());
        }
    }
}

fn clean_reset(e: &h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL))
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let me_h2 = match &mut me.io {
            Io::H2(h2) => h2,
            Io::Piped(p, _) => {
                let before = buf.filled().len();
                ready!(Pin::new(&mut **p).poll_read(cx, buf))?;
                me.read += (buf.filled().len() - before) as u64;
                return Poll::Ready(Ok(()));
            }
        };
        while me_h2.pending.is_empty() && !me_h2.eof {
            match ready!(me_h2.recv.poll_data(cx)) {
                Some(Ok(chunk)) => me_h2.pending = chunk,
                Some(Err(e)) if clean_reset(&e) => me_h2.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => me_h2.eof = true,
            }
        }
        let n = me_h2.pending.len().min(buf.remaining());
        if n > 0 {
            buf.put_slice(&me_h2.pending[..n]);
            me_h2.pending.advance(n);
            me.read += n as u64;
            // Window given back as the bytes are consumed, not when they arrive.
            let _ = me_h2.recv.flow_control().release_capacity(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let me = &mut *self;
        let h2 = match &mut me.io {
            Io::H2(h2) => h2,
            Io::Piped(p, _) => {
                let n = ready!(Pin::new(&mut **p).poll_write(cx, buf))?;
                me.written += n as u64;
                return Poll::Ready(Ok(n));
            }
        };
        if h2.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tunnel already shut down",
            )));
        }
        h2.send.reserve_capacity(buf.len());
        loop {
            let cap = h2.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                h2.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                me.written += n as u64;
                return Poll::Ready(Ok(n));
            }
            match ready!(h2.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel closed by the peer",
                    )))
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            // h2 sends what it was given as soon as the connection task runs.
            Io::H2(_) => Poll::Ready(Ok(())),
            Io::Piped(p, _) => Pin::new(&mut **p).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::H2(h2) => {
                if !h2.shut {
                    h2.shut = true;
                    h2.send.send_data(Bytes::new(), true).map_err(h2_io)?;
                }
                Poll::Ready(Ok(()))
            }
            Io::Piped(p, shut) => {
                ready!(Pin::new(&mut **p).poll_shutdown(cx))?;
                *shut = true;
                Poll::Ready(Ok(()))
            }
        }
    }
}
