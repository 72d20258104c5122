//! The HBONE server's HTTP/2 mechanics: accept CONNECT streams on an established TLS connection, answer
//! them, and hand accepted ones to the caller.
//!
//! Input: a TLS stream whose handshake is done, and a handler called once per stream. Output: nothing; the
//! function returns when the connection ends or `shutdown` fires (then a GOAWAY lets streams in flight
//! finish). Each stream runs on its own task, so one slow upstream never holds up the others.

use std::future::Future;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

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

/// Serves HTTP/2 on `io`, calling `handle` for every stream.
pub async fn serve<IO, H, F>(
    io: IO,
    cfg: &H2Config,
    mut shutdown: watch::Receiver<bool>,
    handle: H,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut conn = super::server_builder(cfg).handshake::<_, Bytes>(io).await?;
    let pings = super::keepalive(conn.ping_pong());
    tokio::pin!(pings);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = &mut pings => return Ok(()),
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(handle(Incoming { request, respond }));
                }
                Some(Err(e)) => return if is_benign(&e) { Ok(()) } else { Err(e) },
                None => return Ok(()),
            },
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
