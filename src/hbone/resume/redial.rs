//! The client side of resumable streams, for any role that dials HBONE (the node proxy's outbound, the
//! waypoint's upstreams): a broken stream re-dialled with its token and count until the server has it.
//!
//! Input: the stream's token and [`Progress`], how long to try, the pause signal, and how to dial (the
//! role's pool, certificate and CONNECT request, given the `x-meshnode-resume` value to send). Output: the
//! new stream with the progress resumed from the server's count, `None` when paused, or why it failed.
//!
//! A 404 ("no such stream") is tried again within the wait: the server's new process may not have adopted
//! the stream yet, and a server paused part-way through a frame drops its stream without saying it is
//! moving. Any other answer ends the stream; a failed connection or handshake is tried again. Double
//! HBONE's inner tunnel is classified the same way; its outer stream's 503 (the gateway cannot reach the
//! far node proxy, which may be restarting) is tried again too.

use std::future::Future;
use std::io;
use std::time::Duration;

use http::StatusCode;
use tokio::sync::watch;

use super::copy::{paused, Progress};
use super::{ResumeHeader, Token, RESUME_HEADER};
use crate::hbone::pool;

/// First pause between re-dials; doubled up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause between re-dials.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);

/// How one re-dial failed.
pub enum Attempt {
    /// Worth another try (no connection, TLS, a timeout, the server not having the stream yet).
    Retry(String),
    /// The stream is over.
    Fatal(io::Error),
}

impl Attempt {
    /// A failed CONNECT, classified: a 404 and failures short of an answer are tried again; any other
    /// answer ends the stream.
    pub fn from_pool(e: pool::Error) -> Attempt {
        match e {
            pool::Error::Status { status, .. } if status == StatusCode::NOT_FOUND => {
                Attempt::Retry(format!(
                    "the server does not have the stream yet ({status})"
                ))
            }
            pool::Error::Status { status, .. } => Attempt::Fatal(io::Error::new(
                io::ErrorKind::NotFound,
                format!("resumable stream: the server refused the resume ({status})"),
            )),
            // Double HBONE's inner tunnel: its own answer decides.
            pool::Error::Inner(inner) => match Attempt::from_pool(*inner) {
                Attempt::Retry(why) => Attempt::Retry(format!("inner tunnel: {why}")),
                fatal => fatal,
            },
            e => Attempt::Retry(e.to_string()),
        }
    }

    /// A failed outer CONNECT of double HBONE (to the east-west gateway), classified: the gateway's 503
    /// (it could not reach the far node proxy: restarting, say) is tried again, the rest as
    /// [`Attempt::from_pool`].
    pub fn through_gateway(e: pool::Error) -> Attempt {
        match e {
            pool::Error::Status { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE => {
                Attempt::Retry(format!(
                    "the gateway cannot reach the server yet ({status})"
                ))
            }
            e => Attempt::from_pool(e),
        }
    }
}

/// Re-dials with `dial` (given the header value to send) until the server answers with its count, or
/// `wait` has passed; `None` when `pause` came meanwhile.
pub async fn redial<F, Fut>(
    token: Token,
    progress: &mut Progress,
    wait: Duration,
    pause: &mut watch::Receiver<bool>,
    mut dial: F,
) -> io::Result<Option<pool::Stream>>
where
    F: FnMut(http::HeaderValue) -> Fut,
    Fut: Future<Output = Result<pool::Stream, Attempt>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut gap = FIRST_PAUSE;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let ask = ResumeHeader {
            token,
            at: Some(progress.received()),
        };
        let attempt = tokio::select! {
            a = dial(ask.to_value()) => a,
            _ = paused(pause) => return Ok(None),
        };
        match attempt {
            Ok(stream) => return answered(token, progress, stream).map(Some),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(e)) => last = e,
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + gap)) => {}
            _ = paused(pause) => return Ok(None),
        }
        gap = (gap * 2).min(MAX_PAUSE);
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("resumable stream: no resume within {wait:?} (last: {last})"),
    ))
}

/// The server's answer to a re-dial: its count, from which `progress` resumes.
fn answered(
    token: Token,
    progress: &mut Progress,
    stream: pool::Stream,
) -> io::Result<pool::Stream> {
    let answer = stream
        .headers
        .get(RESUME_HEADER)
        .and_then(|v| ResumeHeader::parse(v.as_bytes()).ok())
        .filter(|h| h.token == token);
    let Some(ResumeHeader {
        at: Some(server_at),
        ..
    }) = answer
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "resumable stream: the server's answer has no count",
        ));
    };
    progress
        .resume(server_at)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    tracing::debug!(server_at, "resumable stream resumed");
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> pool::Error {
        pool::Error::Status {
            dst: "10.0.0.1:15008".parse().unwrap(),
            status: StatusCode::from_u16(code).unwrap(),
        }
    }

    fn inner(e: pool::Error) -> pool::Error {
        pool::Error::Inner(Box::new(e))
    }

    fn retried(a: Attempt) -> bool {
        matches!(a, Attempt::Retry(_))
    }

    #[test]
    fn an_inner_tunnels_answer_is_classified_by_the_inner_status() {
        assert!(retried(Attempt::from_pool(inner(status(404)))));
        assert!(!retried(Attempt::from_pool(inner(status(403)))));
        assert!(!retried(Attempt::from_pool(inner(status(503)))));
        let timeout = pool::Error::Timeout {
            dst: "10.0.0.1:15008".parse().unwrap(),
        };
        assert!(retried(Attempt::from_pool(inner(timeout))));
        // Single HBONE as before.
        assert!(retried(Attempt::from_pool(status(404))));
        assert!(!retried(Attempt::from_pool(status(403))));
    }

    #[test]
    fn the_gateways_503_on_the_outer_stream_is_tried_again_other_answers_end_it() {
        assert!(retried(Attempt::through_gateway(status(503))));
        assert!(retried(Attempt::through_gateway(status(404))));
        assert!(!retried(Attempt::through_gateway(status(401))));
        assert!(!retried(Attempt::through_gateway(inner(status(400)))));
        assert!(retried(Attempt::through_gateway(inner(status(404)))));
    }
}
