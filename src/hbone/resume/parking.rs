//! The server side of resumable streams, for any role that serves HBONE (the node proxy's inbound, the
//! waypoint): the offer echoed, and a broken stream's wait for its client's re-dial.
//!
//! Input: a CONNECT's `x-meshnode-resume` header ([`requested`]); for a stream whose tunnel broke, its
//! token, the client's identity and its [`Progress`] ([`park`]); for a re-dial, the incoming CONNECT
//! ([`Parking::resume`]). Output: the echo's headers ([`echo`]), the re-dialled stream's halves handed to
//! the waiting task ([`Resumed`]) with the counts exchanged, or a refusal with its status (404 for an
//! unknown token, 403 for another identity's).
//!
//! Bounds: at most `max` streams wait per [`Parking`], each for at most `wait`; the one waiting stays for
//! its owner when another identity asks for it.

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use super::copy::{paused, Progress};
use super::{ResumeError, ResumeHeader, Token, RESUME_HEADER};
use crate::hbone::server;
use crate::identity::Identity;

/// A re-dialled stream handed to the task whose tunnel broke.
pub struct Resumed {
    /// The new stream's sending half.
    pub send: SendStream<Bytes>,
    /// Its receiving half.
    pub recv: RecvStream,
    /// The client's count: what it has taken off the stream.
    pub peer_at: u64,
}

struct Parked {
    identity: Identity,
    /// The server's count, for the answer.
    at: u64,
    deliver: oneshot::Sender<Resumed>,
}

/// The streams waiting for their re-dial, one registry per server.
#[derive(Default)]
pub struct Parking {
    waiting: Mutex<HashMap<Token, Parked>>,
}

/// How a parked stream's wait ended.
pub enum Waited {
    /// The client re-dialled.
    Resumed(Resumed),
    /// It did not within the wait.
    TimedOut,
    /// Too many streams wait already.
    Full,
    /// The process is handing its connections over.
    Leaving,
}

/// Why a resume was refused (its status and the access line's words).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// No stream waits under the token.
    #[error("no stream waits under this resume token")]
    Unknown,
    /// The stream waiting under the token is another identity's.
    #[error("the stream waiting under this resume token belongs to another identity")]
    OtherIdentity,
}

impl Refused {
    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        match self {
            Refused::Unknown => StatusCode::NOT_FOUND,
            Refused::OtherIdentity => StatusCode::FORBIDDEN,
        }
    }
}

impl Parking {
    /// Waits up to `wait` for the client to re-dial the stream `token` of `identity`, or until `pause`
    /// (the process is handing its connections over); refused when `max` streams already wait.
    pub async fn wait(
        &self,
        token: Token,
        identity: Identity,
        at: u64,
        wait: Duration,
        max: usize,
        pause: &mut watch::Receiver<bool>,
    ) -> Waited {
        let (deliver, delivered) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock();
            if waiting.len() >= max {
                return Waited::Full;
            }
            waiting.insert(
                token,
                Parked {
                    identity,
                    at,
                    deliver,
                },
            );
        }
        let got = tokio::select! {
            got = tokio::time::timeout(wait, delivered) => got.ok().and_then(Result::ok),
            _ = paused(pause) => {
                self.waiting.lock().remove(&token);
                return Waited::Leaving;
            }
        };
        match got {
            Some(resumed) => Waited::Resumed(resumed),
            None => {
                self.waiting.lock().remove(&token);
                Waited::TimedOut
            }
        }
    }

    /// Answers a resuming CONNECT (`header` has the client's count) and hands its stream to the waiting
    /// task.
    pub fn resume(
        &self,
        incoming: server::Incoming,
        header: ResumeHeader,
        peer_id: &Identity,
    ) -> Result<(), Refused> {
        let peer_at = header.at.expect("a resume carries the client's count");
        let parked = {
            let mut waiting = self.waiting.lock();
            match waiting.remove(&header.token) {
                None => None,
                Some(p) if &p.identity != peer_id => {
                    waiting.insert(header.token, p);
                    drop(waiting);
                    incoming.refuse(StatusCode::FORBIDDEN);
                    return Err(Refused::OtherIdentity);
                }
                Some(p) => Some(p),
            }
        };
        let Some(parked) = parked else {
            incoming.refuse(StatusCode::NOT_FOUND);
            return Err(Refused::Unknown);
        };
        let answer = ResumeHeader {
            token: header.token,
            at: Some(parked.at),
        };
        let mut headers = HeaderMap::new();
        headers.insert(RESUME_HEADER, answer.to_value());
        match incoming.accept(headers) {
            Ok((send, recv)) => {
                if let Err(mut back) = parked.deliver.send(Resumed {
                    send,
                    recv,
                    peer_at,
                }) {
                    // The waiting task gave up at this very moment: the client sees the stream reset.
                    back.send.send_reset(h2::Reason::CANCEL);
                }
            }
            Err(e) => tracing::debug!(error = %e, "resuming stream gone before the answer"),
        }
        Ok(())
    }
}

/// The `x-meshnode-resume` header of a CONNECT, when resumable streams are on.
pub fn requested(enabled: bool, headers: &HeaderMap) -> Option<Result<ResumeHeader, ResumeError>> {
    if !enabled {
        return None;
    }
    headers
        .get(RESUME_HEADER)
        .map(|v| ResumeHeader::parse(v.as_bytes()))
}

/// The answer's headers for an accepted offer: the token echoed.
pub fn echo(token: Token) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(RESUME_HEADER, ResumeHeader { token, at: None }.to_value());
    headers
}

/// Parks the stream `token` of `identity`, whose tunnel broke, in `parking` until its client re-dials
/// (within `wait`; refused when `max` wait already), and resumes `progress` from the client's count.
/// `None` when `pause` came meanwhile (the process is handing its connections over).
pub async fn park(
    parking: &Parking,
    token: Token,
    identity: Identity,
    progress: &mut Progress,
    wait: Duration,
    max: usize,
    pause: &mut watch::Receiver<bool>,
) -> io::Result<Option<Resumed>> {
    let at = progress.received();
    let resumed = match parking.wait(token, identity, at, wait, max, pause).await {
        Waited::Resumed(r) => r,
        Waited::Leaving => return Ok(None),
        Waited::TimedOut => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("resumable stream: the client did not resume within {wait:?}"),
            ))
        }
        Waited::Full => {
            return Err(io::Error::other(format!(
                "resumable stream: {max} streams already wait for their client"
            )))
        }
    };
    progress
        .resume(resumed.peer_at)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    tracing::debug!(at, peer_at = resumed.peer_at, "resumable stream resumed");
    Ok(Some(resumed))
}
