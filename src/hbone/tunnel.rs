//! One HBONE CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), so that an HTTP server or client
//! (hyper) can run inside the tunnel.
//!
//! Input: the two halves of an HTTP/2 stream (the server's accepted CONNECT, or a pooled client stream with
//! its slot). Output: [`Tunnel`]. Flow control: received bytes are given back to the peer's window only as
//! the reader consumes them, so a slow HTTP parser slows the sender; writes take at most the capacity h2
//! grants (one copy of the caller's buffer into a `Bytes`, as the writer gives us a borrowed slice).
//! Shutdown sends END_STREAM; a peer reset with NO_ERROR or CANCEL reads as end of stream. Bytes are counted
//! both ways (access log, metrics).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::h2_io;
use super::pool::Slot;

/// A CONNECT stream read and written as bytes.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    /// The stream's place on a pooled client connection ([`Slot::unpooled`] on the server side, or for a
    /// connection of its own).
    _slot: Slot,
    eof: bool,
    shut: bool,
    /// Bytes read by the caller.
    pub read: u64,
    /// Bytes written by the caller.
    pub written: u64,
}

impl Tunnel {
    /// The tunnel over `send`/`recv`; `slot` is kept until the tunnel is dropped.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Slot) -> Tunnel {
        Tunnel {
            send,
            recv,
            pending: Bytes::new(),
            _slot: slot,
            eof: false,
            shut: false,
            read: 0,
            written: 0,
        }
    }

    /// An open HBONE client stream as a tunnel.
    pub fn from_client(stream: crate::hbone::pool::Stream) -> Tunnel {
        Tunnel::new(stream.send, stream.recv, stream.slot)
    }

    /// Resets the stream (CANCEL): the peer sees the tunnel fail rather than end.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }

    /// Whether this side has ended its half of the stream (END_STREAM sent).
    pub fn is_shut(&self) -> bool {
        self.shut
    }

    /// Reads and discards what the peer still sends until it ends its half, so that a tunnel finished with
    /// after a clean shutdown ends with END_STREAM both ways rather than a reset.
    pub async fn drain(mut self) {
        if self.eof {
            return;
        }
        while let Some(Ok(chunk)) = self.recv.data().await {
            let _ = self.recv.flow_control().release_capacity(chunk.len());
        }
    }

    /// The two h2 halves, for a byte copy that bypasses the `AsyncRead`/`AsyncWrite` layer. Bytes received
    /// but not yet read are returned first.
    pub fn into_parts(self) -> (Bytes, SendStream<Bytes>, RecvStream) {
        (self.pending, self.send, self.recv)
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
        while me.pending.is_empty() && !me.eof {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(chunk)) => me.pending = chunk,
                Some(Err(e)) if clean_reset(&e) => me.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => me.eof = true,
            }
        }
        let n = me.pending.len().min(buf.remaining());
        if n > 0 {
            buf.put_slice(&me.pending[..n]);
            me.pending.advance(n);
            me.read += n as u64;
            // Window given back as the bytes are consumed, not when they arrive.
            let _ = me.recv.flow_control().release_capacity(n);
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
        if me.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tunnel already shut down",
            )));
        }
        me.send.reserve_capacity(buf.len());
        loop {
            let cap = me.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                me.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                me.written += n as u64;
                return Poll::Ready(Ok(n));
            }
            match ready!(me.send.poll_capacity(cx)) {
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

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends what it was given as soon as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if !me.shut {
            me.shut = true;
            me.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
