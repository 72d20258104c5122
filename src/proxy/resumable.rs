//! Resumable streams in the proxy (`MESHNODE_RESUMABLE_STREAMS`; meshnode peers only, the framing and
//! copy are `hbone::resume`): an application connection outlives the HBONE connection under it.
//!
//! - **Client** ([`Client`]): offers a token at CONNECT; when the server echoes it, copies with
//!   [`resume::copy::run`], and when the tunnel breaks re-dials (through the pool, so a new connection if
//!   the old one is gone; `hbone::resume::redial`) with the token and its count, until
//!   [`Config::resume_wait`] has passed. A double-HBONE connection ([`DoubleDial`]) offers on the inner
//!   CONNECT and re-dials the double way: a new outer stream to the gateway (the pool key's), then a new
//!   inner tunnel inside it whose CONNECT carries the token (`hbone::double`).
//! - **Server** ([`Server`], parked with `hbone::resume::parking`): echoes an offer; when a tunnel
//!   breaks, the stream's task keeps the application connection (and its policy registration and metrics
//!   record) and waits for the re-dial; the CONNECT that carries the token, from the same identity, is
//!   answered with the server's count and its stream halves are handed to the waiting task.
//!
//! Bounds: a proxy keeps at most `MESHNODE_MAX_CONNECTIONS` streams waiting, each for at most
//! `MESHNODE_RESUME_WAIT`; a resume for an unknown token is refused (404), one from another identity too
//! (403), and the waiting stream stays for its owner.
//!
//! [`Config::resume_wait`]: crate::config::Config::resume_wait

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Proxy;
use crate::hbone::double;
use crate::hbone::pool::{self, PoolKey};
use crate::hbone::resume::copy::{self as resumable, Outcome, Progress};
pub(super) use crate::hbone::resume::parking::{self, echo, requested, Parking, Resumed};
use crate::hbone::resume::redial::{self, Attempt};
use crate::hbone::resume::{ResumeHeader, Token, DEFAULT_WINDOW, RESUME_HEADER};
use crate::identity::Identity;
use crate::state::{Service, Workload};

/// How a resumable stream's copy ended.
pub(super) enum Ended {
    /// Both sides are done.
    Done(crate::hbone::copy::Transferred),
    /// Paused for the hand-over to a new process: the state is ready to export.
    Leaving,
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
        let mut pause = self.proxy.pause();
        parking::park(
            &self.proxy.parking,
            self.token,
            self.identity.clone(),
            &mut self.progress,
            self.proxy.cfg().resume_wait,
            self.proxy.cfg().max_connections,
            &mut pause,
        )
        .await
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
    /// The CONNECT's `:authority` (double HBONE: unused, the host form is in `double`).
    pub authority: SocketAddr,
    pub service: Option<Arc<Service>>,
    /// The application's original destination.
    pub original_dst: SocketAddr,
    /// Builds the re-dial's CONNECT request (the outbound side's, passed in).
    pub request: ConnectRequest,
    /// Double HBONE: `key` is the outer tunnel's (to the gateway) and this the inner one's; `None`
    /// for single HBONE (no allocation there).
    pub double: Option<Box<DoubleDial>>,
    /// Counted by the process's hand-over while it lives.
    pub _enlisted: Option<super::handover::Enlisted>,
}

/// The inner hop of a double-HBONE connection (through the east-west gateway of the destination's
/// network): what its re-dial and its hand-over need besides the outer pool key.
pub(super) struct DoubleDial {
    /// Both tunnels' `:authority`, in host form (`hostname:port`, the addressed service's).
    pub authority: String,
    /// Who may end the inner tunnel (the far node proxy's identities).
    pub inner_expected: Vec<Identity>,
    /// The gateway workload's network (to find it again after a hand-over).
    pub gateway_network: String,
}

/// How the client side builds a CONNECT request: from its workload, the application's address, the
/// `:authority` (`ip:port`, or `hostname:port` for double HBONE) and the addressed service.
pub(super) type ConnectRequest = fn(
    &Workload,
    SocketAddr,
    &(dyn std::fmt::Display + Sync),
    Option<&Service>,
) -> Result<http::Request<()>, super::Error>;

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

    /// Leaves the paused connection (its application socket `app`) for the new process. A double hop's record names the far end (the inner identities, the host-form authority) and the
    /// gateway (`peer`, its identities and network in `double`).
    pub(super) fn hand_over(&self, app: tokio::net::TcpStream, opened: std::time::Instant) {
        let ids = |ids: &[Identity]| ids.iter().map(ToString::to_string).collect();
        let mut resume = super::handover::Resume {
            token: self.token.to_bytes().to_vec(),
            service: self.service.as_ref().map(|s| s.key()).unwrap_or_default(),
            opened_ms: super::handover::Resume::opened_at(opened),
            ..Default::default()
        };
        let peer_identity = match &self.double {
            None => {
                resume.authority = self.authority.to_string();
                resume.expected = ids(&self.key.dst_ids);
                self.key.dst_ids.first().cloned()
            }
            Some(double) => {
                resume.authority = double.authority.clone();
                resume.expected = ids(&double.inner_expected);
                resume.double = Some(super::handover::DoubleState {
                    gateway_expected: ids(&self.key.dst_ids),
                    gateway_network: double.gateway_network.clone(),
                });
                double.inner_expected.first().cloned()
            }
        };
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

    /// Re-dials (see `hbone::resume::redial`) through the proxy's pool, with its certificate and the
    /// outbound side's CONNECT (double HBONE: a new outer stream to the gateway, the token on the inner
    /// CONNECT); `None` when the process is handing its connections over meanwhile.
    pub(super) async fn redial(&mut self) -> io::Result<Option<pool::Stream>> {
        let mut leaving = self.proxy.pause();
        let (proxy, request, key) = (&self.proxy, self.request, &self.key);
        let (src, peer, authority, service, double) = (
            &self.src,
            self.peer,
            self.authority,
            self.service.as_deref(),
            self.double.as_deref(),
        );
        let dial = |ask: http::HeaderValue| async move {
            let tls = proxy
                .tls_for(&src.identity)
                .await
                .map_err(|e| Attempt::Retry(e.to_string()))?
                .current();
            let fatal = |e: super::Error| Attempt::Fatal(io::Error::other(e.to_string()));
            let Some(double) = double else {
                let mut req = request(src, peer, &authority, service).map_err(fatal)?;
                req.headers_mut().insert(RESUME_HEADER, ask);
                return proxy
                    .pool()
                    .connect(key, &tls, req)
                    .await
                    .map_err(Attempt::from_pool);
            };
            let outer_req = request(src, peer, &double.authority, service).map_err(fatal)?;
            let outer = proxy
                .pool()
                .connect(key, &tls, outer_req)
                .await
                .map_err(Attempt::through_gateway)?;
            let mut req = request(src, peer, &double.authority, service).map_err(fatal)?;
            double::forward_network(&mut req, proxy.forwarded_network.as_ref());
            req.headers_mut().insert(RESUME_HEADER, ask);
            let cfg = proxy.cfg();
            double::connect(
                outer,
                key.dst,
                &tls,
                double.inner_expected.clone(),
                &cfg.h2,
                cfg.connect_timeout,
                req,
            )
            .await
            .map_err(Attempt::from_pool)
        };
        redial::redial(
            self.token,
            &mut self.progress,
            self.proxy.cfg().resume_wait,
            &mut leaving,
            dial,
        )
        .await
    }
}
