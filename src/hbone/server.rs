//! The HBONE server's HTTP/2 mechanics: accept CONNECT streams on an established TLS connection, answer
//! them, and hand accepted ones to the caller.
//!
//! Input: a TLS stream whose handshake is done, its [`Timeouts`], and a handler called once per stream.
//! Output: nothing; the function returns when the connection ends, when the client's HTTP/2 preface does not
//! arrive by the handshake deadline, or after a GOAWAY (sent when `shutdown` fires or when the connection
//! has carried no stream for the idle timeout) has let the streams in flight finish. Each stream runs on
//! its own task, so one slow upstream never holds up the others; at most as many tasks run at once as the
//! connection may have streams (a stream the peer has reset keeps its place until its task ends, and
//! streams beyond that are refused with REFUSED_STREAM).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::H2Config;

/// A CONNECT stream waiting for its answer.
pub struct Incoming {
    /// The request (method, `:authority`, headers); its body carries the client's bytes.
    pub request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

impl Incoming {
    /// Answers with a headers-only error status and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let resp = Response::builder()
            .status(status)
            .body(())
            .expect("static response is valid");
        if let Err(e) = self.respond.send_response(resp, true) {
            tracing::debug!(error = %e, "could not send HBONE refusal");
        }
    }

    /// Answers 200 (with `headers`) and returns the two directions of the tunnel.
    pub fn accept(
        mut self,
        headers: http::HeaderMap,
    ) -> Result<(SendStream<Bytes>, RecvStream), h2::Error> {
        let mut resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("static response is valid");
        *resp.headers_mut() = headers;
        let send = self.respond.send_response(resp, false)?;
        Ok((send, self.request.into_body()))
    }
}

/// Time limits of one server connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// The client's HTTP/2 preface must have arrived by then, or the connection is dropped.
    pub handshake_deadline: Instant,
    /// With no stream open for this long, the connection is closed with a GOAWAY.
    pub idle: Duration,
}

/// Why [`serve`] ended early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client sent no HTTP/2 preface before the handshake deadline.
    #[error("no HTTP/2 preface before the handshake deadline")]
    HandshakeTimeout,
    /// The HTTP/2 layer failed.
    #[error(transparent)]
    H2(#[from] h2::Error),
}

/// Streams a connection is carrying, and when the last one ended (for the idle timeout).
struct Activity {
    open: usize,
    last_end: Instant,
}

/// Held by a stream's task; ending the task ends the stream's part in the connection's activity.
struct StreamGuard(Arc<Mutex<Activity>>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut a = self.0.lock();
        a.open -= 1;
        a.last_end = Instant::now();
    }
}

/// Serves HTTP/2 on `io`, calling `handle` for every stream. `handshake_slot` (whatever the caller holds
/// while the peer is unproven, e.g. its per-source handshake permit) is dropped once the preface is in.
pub async fn serve<IO, G, H, F>(
    io: IO,
    cfg: &H2Config,
    timeouts: Timeouts,
    handshake_slot: G,
    mut shutdown: watch::Receiver<bool>,
    handle: H,
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let handshake = super::server_builder(cfg).handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout_at(timeouts.handshake_deadline, handshake)
        .await
        .map_err(|_| Error::HandshakeTimeout)??;
    drop(handshake_slot);
    let pings = super::keepalive(conn.ping_pong());
    tokio::pin!(pings);
    let activity = Arc::new(Mutex::new(Activity {
        open: 0,
        last_end: Instant::now(),
    }));
    let idle = tokio::time::sleep(timeouts.idle);
    tokio::pin!(idle);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = &mut pings => return Ok(()),
            next = conn.accept() => match next {
                Some(Ok((request, mut respond))) => {
                    let mut a = activity.lock();
                    // h2 stops counting a stream the peer resets, but its handler may still be connecting
                    // upstream: without this bound, open-and-reset (HTTP/2 "rapid reset") would start
                    // handlers, tasks and upstream sockets without limit.
                    if a.open >= super::SERVER_MAX_CONCURRENT_STREAMS as usize {
                        drop(a);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    a.open += 1;
                    drop(a);
                    let guard = StreamGuard(activity.clone());
                    let stream = handle(Incoming { request, respond });
                    crate::task::spawn_guarded(stream, guard, None);
                }
                Some(Err(e)) => return if is_benign(&e) { Ok(()) } else { Err(e.into()) },
                None => return Ok(()),
            },
            () = &mut idle, if !draining => {
                let a = activity.lock();
                let idle_since = a.last_end;
                let open = a.open;
                drop(a);
                if open == 0 && idle_since + timeouts.idle <= Instant::now() {
                    tracing::debug!(idle = ?timeouts.idle, "HBONE connection idle; closing it");
                    draining = true;
                    conn.graceful_shutdown();
                } else {
                    // Streams open, or one ended since: look again one idle period after the last end
                    // (or from now, while streams are open).
                    let from = if open == 0 { idle_since } else { Instant::now() };
                    idle.as_mut().reset(from + timeouts.idle);
                }
            }
            changed = shutdown.changed(), if !draining => {
                if changed.is_err() || *shutdown.borrow() {
                    draining = true;
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

fn is_benign(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::NO_ERROR) || e.is_io()
}
