//! Resumable streams in the proxy (`MESHNODE_RESUMABLE_STREAMS`; meshnode peers only, the framing and
//! copy are `hbone::resume`): an application connection outlives the HBONE connection under it.
//!
//! - **Client** ([`Client`]): offers a token at CONNECT; when the server echoes it, copies with
//!   [`resume::copy::run`], and when the tunnel breaks re-dials (through the pool, so a new connection if
//!   the old one is gone) with the token and its count, until [`Config::resume_wait`] has passed.
//! - **Server** ([`Parking`]): echoes an offer; when a tunnel breaks, the stream's task keeps the
//!   application connection (and its policy registration and metrics record) and waits for the re-dial;
//!   the CONNECT that carries the token, from the same identity, is answered with the server's count and
//!   its stream halves are handed to the waiting task.
//!
//! Bounds: a proxy keeps at most `MESHNODE_MAX_CONNECTIONS` streams waiting, each for at most
//! `MESHNODE_RESUME_WAIT`; a resume for an unknown token is refused (404), one from another identity too
//! (403), and the waiting stream stays for its owner.
//!
//! [`Config::resume_wait`]: crate::config::Config::resume_wait

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};

use super::Proxy;
use crate::hbone::pool::{self, PoolKey};
use crate::hbone::resume::copy::{self as resumable, Outcome, Progress};
use crate::hbone::resume::{ResumeHeader, Token, DEFAULT_WINDOW, RESUME_HEADER};
use crate::hbone::server;
use crate::identity::Identity;
use crate::state::{Service, Workload};

/// A re-dialled stream handed to the task whose tunnel broke.
pub(super) struct Resumed {
    pub send: SendStream<Bytes>,
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

/// The server side's streams waiting for their re-dial.
#[derive(Default)]
pub(super) struct Parking {
    waiting: Mutex<HashMap<Token, Parked>>,
}

/// How a parked stream's wait ended.
pub(super) enum Waited {
    /// The client re-dialled.
    Resumed(Resumed),
    /// It did not within the wait.
    TimedOut,
    /// Too many streams wait already.
    Full,
    /// The process is handing its connections over.
    Leaving,
}

/// How a resumable stream's copy ended.
pub(super) enum Ended {
    /// Both sides are done.
    Done(crate::hbone::copy::Transferred),
    /// Paused for the hand-over to a new process: the state is ready to export.
    Leaving,
}

/// Why a resume was refused (its status and the access line's words).
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    #[error("no stream waits under this resume token")]
    Unknown,
    #[error("the stream waiting under this resume token belongs to another identity")]
    OtherIdentity,
}

impl Refused {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Refused::Unknown => StatusCode::NOT_FOUND,
            Refused::OtherIdentity => StatusCode::FORBIDDEN,
        }
    }
}

impl Parking {
    /// Waits up to `wait` for the client to re-dial the stream `token` of `identity`, or until `pause`
    /// (the process is handing its connections over); refused when `max` streams already wait.
    pub(super) async fn wait(
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
            _ = resumable::paused(pause) => {
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
    pub(super) fn resume(
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
pub(super) fn requested(
    enabled: bool,
    headers: &HeaderMap,
) -> Option<Result<ResumeHeader, crate::hbone::resume::ResumeError>> {
    if !enabled {
        return None;
    }
    headers
        .get(RESUME_HEADER)
        .map(|v| ResumeHeader::parse(v.as_bytes()))
}

/// The answer's headers for an accepted offer: the token echoed.
pub(super) fn echo(token: Token) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(RESUME_HEADER, ResumeHeader { token, at: None }.to_value());
    headers
}

/// The server side of one resumable stream, after its 200. Holds its proxy (for the parking), which a
/// plain stream does not.
pub(super) struct Server {
    pub proxy: Arc<Proxy>,
    pub token: Token,
    pub identity: Identity,
    pub progress: Progress,
    /// Counted by the process's hand-over while it lives.
    pub _enlisted: Option<super::handover::Enlisted>,
}

impl Server {
    /// A new accepted stream's state.
    pub(super) fn new(proxy: Arc<Proxy>, token: Token, identity: Identity) -> Box<Server> {
        Server::with(proxy, token, identity, Progress::new(DEFAULT_WINDOW))
    }

    /// A stream's state, new or adopted from the process this one replaces.
    pub(super) fn with(
        proxy: Arc<Proxy>,
        token: Token,
        identity: Identity,
        progress: Progress,
    ) -> Box<Server> {
        let _enlisted = proxy.enlist();
        Box::new(Server {
            proxy,
            token,
            identity,
            progress,
            _enlisted,
        })
    }

    /// Copies until both sides are done; a broken tunnel waits for the re-dial (see the module header).
    pub(super) async fn carry<R, W>(
        &mut self,
        app_read: &mut R,
        app_write: &mut W,
        send: &mut SendStream<Bytes>,
        recv: &mut RecvStream,
    ) -> io::Result<Ended>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let pause = self.proxy.pause();
        loop {
            match resumable::run(app_read, app_write, send, recv, &mut self.progress, &pause)
                .await?
            {
                Outcome::Done(t) => return Ok(Ended::Done(t)),
                Outcome::Paused => return Ok(Ended::Leaving),
                Outcome::PeerLeft | Outcome::PeerMoving => {}
            }
            match self.parked().await? {
                Some(resumed) => {
                    *send = resumed.send;
                    *recv = resumed.recv;
                }
                None => return Ok(Ended::Leaving),
            }
        }
    }

    /// Waits for the client's re-dial and resumes from its count; `None` when the process is handing
    /// its connections over meanwhile.
    pub(super) async fn parked(&mut self) -> io::Result<Option<Resumed>> {
        let wait = self.proxy.cfg().resume_wait;
        let max = self.proxy.cfg().max_connections;
        let at = self.progress.received();
        let mut pause = self.proxy.pause();
        let resumed = match self
            .proxy
            .parking
            .wait(self.token, self.identity.clone(), at, wait, max, &mut pause)
            .await
        {
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
        self.progress
            .resume(resumed.peer_at)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        tracing::debug!(at, peer_at = resumed.peer_at, "resumable stream resumed");
        Ok(Some(resumed))
    }
}

/// The client side of one resumable stream: what a re-dial needs.
pub(super) struct Client {
    pub proxy: Arc<Proxy>,
    pub token: Token,
    pub progress: Progress,
    pub key: PoolKey,
    pub src: Arc<Workload>,
    pub peer: SocketAddr,
    pub authority: SocketAddr,
    pub service: Option<Arc<Service>>,
    /// The application's original destination.
    pub original_dst: SocketAddr,
    /// Builds the re-dial's CONNECT request (the outbound side's, passed in).
    pub request: ConnectRequest,
    /// Counted by the process's hand-over while it lives.
    pub _enlisted: Option<super::handover::Enlisted>,
}

/// How the client side builds a CONNECT request: from its workload, the application's address, the
/// `:authority` and the addressed service.
pub(super) type ConnectRequest = fn(
    &Workload,
    SocketAddr,
    SocketAddr,
    Option<&Service>,
) -> Result<http::Request<()>, super::Error>;

/// First pause between re-dials; doubled up to [`MAX_REDIAL_PAUSE`].
const FIRST_REDIAL_PAUSE: Duration = Duration::from_millis(20);
const MAX_REDIAL_PAUSE: Duration = Duration::from_secs(1);

impl Client {
    /// The offer to put on the first CONNECT.
    pub(super) fn offer(token: Token) -> http::HeaderValue {
        ResumeHeader { token, at: None }.to_value()
    }

    /// Whether the server's answer echoes the offer of `token`.
    pub(super) fn accepted(token: Token, answer: &HeaderMap) -> bool {
        answer
            .get(RESUME_HEADER)
            .and_then(|v| ResumeHeader::parse(v.as_bytes()).ok())
            == Some(ResumeHeader { token, at: None })
    }

    /// Copies until both sides are done, re-dialling when the tunnel breaks.
    pub(super) async fn carry<R, W>(
        &mut self,
        stream: &mut pool::Stream,
        app_read: &mut R,
        app_write: &mut W,
    ) -> io::Result<Ended>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let pause = self.proxy.pause();
        loop {
            let outcome = resumable::run(
                app_read,
                app_write,
                &mut stream.send,
                &mut stream.recv,
                &mut self.progress,
                &pause,
            )
            .await?;
            match outcome {
                Outcome::Done(t) => return Ok(Ended::Done(t)),
                Outcome::Paused => return Ok(Ended::Leaving),
                Outcome::PeerLeft | Outcome::PeerMoving => {}
            }
            // Boxed: a re-dial's state (a TLS handshake's) would otherwise size every resumable
            // connection's task for its whole life.
            match Box::pin(self.redial()).await? {
                Some(s) => *stream = s,
                None => return Ok(Ended::Leaving),
            }
        }
    }

    /// Leaves the paused connection (its application socket `app`) for the new process.
    pub(super) fn hand_over(&self, app: tokio::net::TcpStream, opened: std::time::Instant) {
        let resume = super::handover::Resume {
            token: self.token.to_bytes().to_vec(),
            authority: self.authority.to_string(),
            expected: self.key.dst_ids.iter().map(ToString::to_string).collect(),
            service: self.service.as_ref().map(|s| s.key()).unwrap_or_default(),
            opened_ms: super::handover::Resume::opened_at(opened),
            ..Default::default()
        };
        let peer_identity = self.key.dst_ids.first().cloned();
        let Some(peer_identity) = peer_identity else {
            return;
        };
        self.proxy.hand_over(super::handover::Paused {
            direction: crate::upgrade::handover::Direction::Outbound,
            app,
            original_dst: self.original_dst,
            peer: self.key.dst,
            peer_identity: &peer_identity,
            progress: &self.progress,
            resume,
        });
    }

    /// Re-dials until the server answers with its count, or the wait is over; `None` when the process
    /// is handing its connections over meanwhile. "No such stream" (404) is tried again within the wait
    /// too: the server's new process may not have adopted the stream yet, and a server paused part-way
    /// through a frame drops its stream without saying it is moving.
    pub(super) async fn redial(&mut self) -> io::Result<Option<pool::Stream>> {
        let wait = self.proxy.cfg().resume_wait;
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = FIRST_REDIAL_PAUSE;
        let mut last = String::new();
        let mut leaving = self.proxy.pause();
        while tokio::time::Instant::now() < deadline {
            let attempt = tokio::select! {
                a = self.try_redial() => a,
                _ = resumable::paused(&mut leaving) => return Ok(None),
            };
            match attempt {
                Ok(stream) => return Ok(Some(stream)),
                Err(Fatal(e)) => return Err(e),
                Err(Retry(e)) => last = e,
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)) => {}
                _ = resumable::paused(&mut leaving) => return Ok(None),
            }
            pause = (pause * 2).min(MAX_REDIAL_PAUSE);
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("resumable stream: no resume within {wait:?} (last: {last})"),
        ))
    }

    async fn try_redial(&mut self) -> Result<pool::Stream, RedialError> {
        let retry = |e: &dyn std::fmt::Display| Retry(e.to_string());
        let tls = self
            .proxy
            .tls_for(&self.src.identity)
            .await
            .map_err(|e| retry(&e))?
            .current();
        let mut req = (self.request)(
            &self.src,
            self.peer,
            self.authority,
            self.service.as_deref(),
        )
        .map_err(|e| Fatal(io::Error::other(e.to_string())))?;
        let ask = ResumeHeader {
            token: self.token,
            at: Some(self.progress.received()),
        };
        req.headers_mut().insert(RESUME_HEADER, ask.to_value());
        let stream = match self.proxy.pool().connect(&self.key, &tls, req).await {
            Ok(s) => s,
            Err(pool::Error::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                return Err(Retry(format!(
                    "the server does not have the stream yet ({status})"
                )))
            }
            // The server answered: it no longer has the stream (or never had it). Nothing to retry.
            Err(pool::Error::Status { status, .. }) => {
                return Err(Fatal(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("resumable stream: the server refused the resume ({status})"),
                )))
            }
            Err(e) => return Err(retry(&e)),
        };
        let answer = stream
            .headers
            .get(RESUME_HEADER)
            .and_then(|v| ResumeHeader::parse(v.as_bytes()).ok())
            .filter(|h| h.token == self.token);
        let Some(ResumeHeader {
            at: Some(server_at),
            ..
        }) = answer
        else {
            return Err(Fatal(io::Error::new(
                io::ErrorKind::InvalidData,
                "resumable stream: the server's answer has no count",
            )));
        };
        self.progress
            .resume(server_at)
            .map_err(|e| Fatal(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        tracing::debug!(server_at, "resumable stream resumed");
        Ok(stream)
    }
}

enum RedialError {
    /// Worth another try (no connection, TLS, a timeout).
    Retry(String),
    /// The stream is over.
    Fatal(io::Error),
}
use RedialError::{Fatal, Retry};
