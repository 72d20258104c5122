//! A plain TCP connection's copy that can stop for a hand-over: `tokio::io::copy_bidirectional` with a
//! pause (issue 17).
//!
//! **Job.** Copies both ways between the connection's initiator (the side that opened it: the pod's app
//! outbound, the client inbound) and its server (the upstream outbound, the pod's app inbound), as
//! `copy_bidirectional` does: an EOF read from one side is passed on as `shutdown(Write)` on the other once
//! everything read before it is written, and the other direction carries on; the first error ends both.
//! When the process's pause signal turns true it stops, between two reads or writes, so it knows exactly
//! which bytes it has read and not yet written in each direction, and returns that state ([`Pausable`],
//! exported by [`Pausable::export`]) for the new process, which carries on from it ([`Pausable::resume`]).
//!
//! **Inputs.** The two sockets (borrowed for the copy: the caller keeps them, to hand them over or drop
//! them), wrapped as the caller counts them (`Counted`: metrics and the access line see the same bytes as
//! with `copy_bidirectional`), and the pause signal (`Proxy::pause`). **Outputs.** [`Outcome`]: done
//! (with the copy's error, if any) or paused; then, paused, [`State`]: per direction the bytes read and not
//! yet written, whether the source said EOF, and whether the EOF was passed on.
//!
//! **Cost.** One buffer per direction of [`BUFFER`] bytes (tokio's copy buffer size), allocated once with
//! the copy, as `copy_bidirectional` does; nothing per read. The copy's state lives in [`Pausable`] (two
//! boxed buffers and their cursors), not in the future, so stopping it at a pause loses nothing: whatever a
//! read returned is in a buffer, whatever a write took is gone from it (a `TcpStream` write either takes
//! bytes or returns pending having taken none).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// Bytes of buffer per direction: tokio's copy buffer (`copy_bidirectional` uses the same).
pub(super) const BUFFER: usize = 8 * 1024;

/// How a copy ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Both directions finished (EOF passed on each way), or one failed.
    Done(io::Result<()>),
    /// The pause signal turned true: the state is ready to export.
    Paused,
}

/// Why a copy's imported state was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    /// More bytes waiting than a buffer holds.
    #[error("{len} bytes waiting to be written {direction}, more than the {BUFFER}-byte buffer")]
    TooLarge {
        /// Which direction.
        direction: &'static str,
        /// How many.
        len: usize,
    },
    /// An EOF passed on before the source said it, or with bytes still waiting before it.
    #[error(
        "half-close state {direction} is impossible: eof {eof}, shut {shut}, {len} bytes waiting"
    )]
    HalfClose {
        /// Which direction.
        direction: &'static str,
        /// The source said EOF.
        eof: bool,
        /// It was passed on.
        shut: bool,
        /// Bytes waiting.
        len: usize,
    },
}

/// One direction's state, exported or to import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Half {
    /// Bytes read from the source and not yet written to the destination, in order.
    pub pending: Vec<u8>,
    /// The source said EOF (nothing more will be read from it).
    pub eof: bool,
    /// The EOF was passed on: the destination's write side is shut down.
    pub shut: bool,
}

/// A paused copy's state, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct State {
    /// From the initiator to the server.
    pub to_server: Half,
    /// From the server to the initiator.
    pub to_initiator: Half,
}

/// One direction of the copy: a fixed buffer, the bytes in it still to write, and the half-close state.
struct Direction {
    buf: Box<[u8]>,
    /// `buf[pos..cap]` is read and not yet written.
    pos: usize,
    cap: usize,
    eof: bool,
    shut: bool,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            buf: vec![0; BUFFER].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            shut: false,
        }
    }

    fn import(half: &Half, name: &'static str) -> Result<Direction, Error> {
        let len = half.pending.len();
        if len > BUFFER {
            return Err(Error::TooLarge {
                direction: name,
                len,
            });
        }
        if half.shut && (!half.eof || len > 0) {
            return Err(Error::HalfClose {
                direction: name,
                eof: half.eof,
                shut: half.shut,
                len,
            });
        }
        let mut d = Direction::new();
        d.buf[..len].copy_from_slice(&half.pending);
        d.cap = len;
        d.eof = half.eof;
        d.shut = half.shut;
        Ok(d)
    }

    fn export(&self) -> Half {
        Half {
            pending: self.buf[self.pos..self.cap].to_vec(),
            eof: self.eof,
            shut: self.shut,
        }
    }

    /// Copies from `src` to `dst` until the EOF is passed on (ready) or a socket is not ready (pending).
    /// Every step leaves `self` consistent, so the copy may stop at any pending.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
            }
            self.pos = 0;
            self.cap = 0;
            if self.eof {
                if !self.shut {
                    ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut self.buf);
            ready!(Pin::new(&mut *src).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n == 0 {
                self.eof = true;
            } else {
                self.cap = n;
            }
        }
    }
}

/// A pausable bidirectional copy's state (see the module header). Owned by the connection, borrowed by
/// [`Pausable::run`].
pub(super) struct Pausable {
    to_server: Direction,
    to_initiator: Direction,
}

impl Pausable {
    /// A copy from the start (nothing read yet either way).
    pub(super) fn new() -> Pausable {
        Pausable {
            to_server: Direction::new(),
            to_initiator: Direction::new(),
        }
    }

    /// A copy carrying on from a paused one's `state`; refused when it is not one this copy could have
    /// exported.
    pub(super) fn resume(state: &State) -> Result<Pausable, Error> {
        Ok(Pausable {
            to_server: Direction::import(&state.to_server, "to the server")?,
            to_initiator: Direction::import(&state.to_initiator, "to the initiator")?,
        })
    }

    /// Where the copy is: the bytes read and not yet written, and the half-close state, each way.
    pub(super) fn export(&self) -> State {
        State {
            to_server: self.to_server.export(),
            to_initiator: self.to_initiator.export(),
        }
    }

    /// Copies between `initiator` and `server` until both directions are done, one fails, or `pause`
    /// reads true (checked before anything is copied, and whenever it changes). Cancel-safe: dropped
    /// mid-way, the state stays consistent.
    pub(super) async fn run<I, S>(
        &mut self,
        initiator: &mut I,
        server: &mut S,
        pause: &mut watch::Receiver<bool>,
    ) -> Outcome
    where
        I: AsyncRead + AsyncWrite + Unpin + ?Sized,
        S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        if *pause.borrow_and_update() {
            return Outcome::Paused;
        }
        let copy = poll_fn(|cx| self.poll_both(cx, initiator, server));
        tokio::select! {
            biased;
            _ = crate::hbone::resume::copy::paused(pause) => Outcome::Paused,
            done = copy => Outcome::Done(done),
        }
    }

    fn poll_both<I, S>(
        &mut self,
        cx: &mut Context<'_>,
        initiator: &mut I,
        server: &mut S,
    ) -> Poll<io::Result<()>>
    where
        I: AsyncRead + AsyncWrite + Unpin + ?Sized,
        S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let up = self.to_server.poll_copy(cx, initiator, server)?;
        let down = self.to_initiator.poll_copy(cx, server, initiator)?;
        match (up, down) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests;
