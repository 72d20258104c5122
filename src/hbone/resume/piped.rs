//! A resumable stream as a byte stream, for a user in this process that speaks through the stream rather
//! than copying it to a socket: the waypoint's HTTP server and client and its TCP copy.
//!
//! Input: an agreed resumable stream's halves (the server's accepted CONNECT, or a client's pooled
//! stream), its token, how long a resume may take, and how to recover a broken stream: park it for the
//! client's re-dial ([`Recover::Park`], the server side) or re-dial ([`Recover::Redial`], the client side).
//! Output: [`Piped`], an `AsyncRead + AsyncWrite` whose bytes outlive the HBONE connections under it.
//!
//! How: a task runs the resumable copy ([`super::copy::run`]) between one end of an in-memory pipe
//! ([`PIPE_BUFFER`] each way) and the stream; the user holds the other end. When the stream breaks (the
//! peer's process is upgraded, its connection lost) the task parks or re-dials and carries on from the
//! exchanged counts; the user sees a pause, never a reset. The cost is one more copy per byte, for these
//! streams only (plain ones stay [`crate::hbone::tunnel::Tunnel`]'s direct reads and writes).
//!
//! Ends: both sides done, the task ends and the user reads EOF. A failure (the copy's, or no resume in
//! time) ends the task too: the user's reads end and writes fail. [`Piped::reset`] refuses the stream
//! for good ([`super::copy::FAILED`]), so the peer does not wait for a resume.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{oneshot, watch};

use super::copy::{self, Outcome, Progress, FAILED};
use super::parking::{self, Parking};
use super::redial::{self, Attempt};
use super::{Token, DEFAULT_WINDOW};
use crate::hbone::pool::{self, Slot};
use crate::identity::Identity;

/// Bytes the pipe between the user and the copy holds each way.
pub const PIPE_BUFFER: usize = 64 * 1024;

/// A client's re-dial: given the `x-meshnode-resume` value to send, a new stream (or why not).
pub type Dial = Box<
    dyn FnMut(
            http::HeaderValue,
        ) -> Pin<Box<dyn Future<Output = Result<pool::Stream, Attempt>> + Send>>
        + Send,
>;

/// How a broken stream is recovered.
pub enum Recover {
    /// The server side: wait in `parking` for the client (`identity`) to re-dial; at most `max` wait.
    Park {
        /// The server's registry of waiting streams.
        parking: Arc<Parking>,
        /// The client's identity: only it may resume the stream.
        identity: Identity,
        /// Most streams waiting at once.
        max: usize,
    },
    /// The client side: re-dial.
    Redial(Dial),
}

/// The user's end of a resumable stream.
pub struct Piped {
    io: DuplexStream,
    refuse: Option<oneshot::Sender<()>>,
}

impl Piped {
    /// Runs the stream `send`/`recv` (its pool `slot` kept while it lives) as a resumable stream under
    /// `token`, recovering a break with `recover` within `wait`.
    pub fn spawn(
        send: SendStream<Bytes>,
        recv: RecvStream,
        slot: Slot,
        token: Token,
        wait: Duration,
        recover: Recover,
    ) -> Piped {
        let (io, theirs) = tokio::io::duplex(PIPE_BUFFER);
        let (refuse, refused) = oneshot::channel();
        let carrier = Carrier {
            send,
            recv,
            _slot: slot,
            token,
            wait,
            recover,
            progress: Progress::new(DEFAULT_WINDOW),
        };
        tokio::spawn(carrier.run(theirs, refused));
        Piped {
            io,
            refuse: Some(refuse),
        }
    }

    /// Ends the stream for good (the peer does not wait for a resume), as a plain stream's reset does.
    pub fn reset(&mut self) {
        if let Some(refuse) = self.refuse.take() {
            let _ = refuse.send(());
        }
    }
}

struct Carrier {
    send: SendStream<Bytes>,
    recv: RecvStream,
    _slot: Slot,
    token: Token,
    wait: Duration,
    recover: Recover,
    progress: Progress,
}

impl Carrier {
    async fn run(mut self, app: DuplexStream, refused: oneshot::Receiver<()>) {
        let (mut r, mut w) = tokio::io::split(app);
        // No process-wide pause here: the users of piped streams (the waypoint) hand nothing over.
        let (_never, pause) = watch::channel(false);
        let mut refused = std::pin::pin!(refused);
        loop {
            let outcome = tokio::select! {
                o = copy::run(&mut r, &mut w, &mut self.send, &mut self.recv, &mut self.progress, &pause) => o,
                Ok(()) = &mut refused => {
                    self.send.send_reset(FAILED);
                    return;
                }
            };
            match outcome {
                Ok(Outcome::Done(_) | Outcome::Paused) => return,
                Ok(Outcome::PeerLeft | Outcome::PeerMoving) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "resumable stream ended");
                    return;
                }
            }
            match self.recover().await {
                Ok(Some(())) => {}
                Ok(None) => return,
                Err(e) => {
                    tracing::info!(error = %e, "resumable stream not resumed");
                    return;
                }
            }
        }
    }

    /// A new stream in place of the broken one; `None` when there will be none.
    async fn recover(&mut self) -> io::Result<Option<()>> {
        let mut pause = watch::channel(false).1;
        match &mut self.recover {
            Recover::Park {
                parking,
                identity,
                max,
            } => {
                let resumed = parking::park(
                    parking,
                    self.token,
                    identity.clone(),
                    &mut self.progress,
                    self.wait,
                    *max,
                    &mut pause,
                )
                .await?;
                Ok(resumed.map(|r| {
                    self.send = r.send;
                    self.recv = r.recv;
                }))
            }
            Recover::Redial(dial) => {
                let stream =
                    redial::redial(self.token, &mut self.progress, self.wait, &mut pause, dial)
                        .await?;
                Ok(stream.map(|s| {
                    self.send = s.send;
                    self.recv = s.recv;
                    self._slot = s.slot;
                }))
            }
        }
    }
}

impl AsyncRead for Piped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Piped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
