//! Connections from the waypoint to endpoints, and HTTP requests over them.
//!
//! Input: a chosen [`Endpoint`] (workload and `pod_ip:target_port`), the HTTP version the port calls for, and
//! a request. Output: the endpoint's response headers, plus what to run once its body has been read (the
//! connection goes back to the pool). Transport: an HBONE-capable workload is reached by re-originating
//! HBONE — mTLS to `pod_ip:15008` presenting the waypoint's own certificate and accepting only the
//! workload's identity, `CONNECT` with `:authority` = `pod_ip:target_port` — over the shared
//! [`hbone::pool::Pool`](crate::hbone::pool::Pool) (connections pooled and multiplexed); any other workload
//! gets plain TCP.
//!
//! HTTP connections are pooled per (endpoint address, transport, expected identity): HTTP/1.1 connections
//! are kept idle once a response has been read to its end and reused one request at a time (a request that
//! a reused connection turns out to have lost before sending is sent again on a fresh one); one HTTP/2
//! connection per endpoint carries every request. Each request brings its cluster's [`ConnSettings`]
//! (DestinationRule `connectionPool`: connect timeout covering TCP, TLS and the HBONE CONNECT; idle timeout;
//! requests per connection) or the waypoint's defaults ([`Upstreams::defaults`]: the connect timeout, and
//! the pool's `unused_release_timeout` as idle timeout). At most [`MAX_IDLE_PER_ENDPOINT`] idle HTTP/1.1
//! connections are kept per endpoint.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::{OnEnd, UpBody};
use super::snapshot::{Crossing, Endpoint};
use crate::config::{H2Config, Keepalive};
use crate::hbone::pool::{Pool, PoolKey};
use crate::hbone::resume::piped::{Dial, Piped, Recover};
use crate::hbone::resume::redial::Attempt;
use crate::hbone::resume::{ResumeHeader, Token, RESUME_HEADER};
use crate::hbone::tunnel::Tunnel;
use crate::identity::Identity;
use crate::socket::{self, SocketOpts};
use crate::state::Protocol;
use crate::tls::WorkloadTls;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when their response ends.
pub const MAX_IDLE_PER_ENDPOINT: usize = 128;
/// The port an HBONE-capable workload receives tunnels on.
const HBONE_PORT: u16 = 15008;

/// Why a request got no response from the endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint could not be reached: TCP, TLS, HBONE CONNECT refused, or the HTTP handshake.
    #[error("connecting to {addr}: {reason}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The endpoint refused the HTTP/2 stream (REFUSED_STREAM): nothing was processed.
    #[error("{addr} refused the stream")]
    RefusedStream {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// The connection or stream ended before the response headers.
    #[error("{addr} reset before the response headers: {source}")]
    Reset {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's error.
        source: hyper::Error,
    },
}

/// Which HTTP version to speak to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamVersion {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

/// A connection to an endpoint: an HBONE tunnel or a plain TCP socket.
pub enum Transport {
    /// Through the endpoint's node proxy.
    Hbone(Box<Tunnel>),
    /// Straight to the workload.
    Tcp(TcpStream),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Hbone(t) => Pin::new(&mut **t).poll_read(cx, buf),
            Transport::Tcp(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Hbone(t) => Pin::new(&mut **t).poll_write(cx, buf),
            Transport::Tcp(t) => Pin::new(t).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Hbone(t) => Pin::new(&mut **t).poll_flush(cx),
            Transport::Tcp(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Hbone(t) => Pin::new(&mut **t).poll_shutdown(cx),
            Transport::Tcp(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    /// The identity expected of an HBONE peer; `None` for plain TCP.
    hbone: Option<Identity>,
}

struct Idle {
    send: http1::SendRequest<UpBody>,
    since: Instant,
    /// Requests it has carried.
    uses: u32,
    idle_timeout: Duration,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.send.is_closed() && now.duration_since(self.since) < self.idle_timeout
    }
}

struct Shared {
    send: http2::SendRequest<UpBody>,
    last_used: Instant,
    /// Requests it has carried.
    uses: u32,
    idle_timeout: Duration,
}

/// How connections to one cluster's endpoints are made and kept (DestinationRule `connectionPool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSettings {
    /// Connecting: TCP, and for HBONE endpoints TLS and the CONNECT too.
    pub connect_timeout: Duration,
    /// An HTTP connection unused this long is closed (and never reused).
    pub idle_timeout: Duration,
    /// Requests one HTTP connection carries before it is retired; `None`: no limit.
    pub max_requests_per_connection: Option<u32>,
}

impl ConnSettings {
    fn spent(&self, uses: u32) -> bool {
        self.max_requests_per_connection.is_some_and(|m| uses >= m)
    }
}

struct Inner {
    hbone: Pool,
    tls: Arc<WorkloadTls>,
    identity: Identity,
    sock: SocketOpts,
    keepalive: Keepalive,
    defaults: ConnSettings,
    h2: H2Config,
    /// `x-forwarded-network` naming the waypoint's network, built once.
    forwarded_network: Option<http::HeaderValue>,
    resume: Option<Duration>,
    h1_idle: Mutex<HashMap<Key, Vec<Idle>>>,
    h2_conns: Mutex<HashMap<Key, Shared>>,
    /// One HTTP/2 dial per endpoint at a time: concurrent first requests share the connection.
    h2_dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// HTTP connections opened to endpoints so far.
    opened: AtomicU64,
}

/// The CONNECT to an HBONE endpoint at `addr`.
fn connect_request(addr: SocketAddr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(addr.to_string())
        .version(Version::HTTP_2)
        .body(())
        .expect("a socket address is a valid authority")
}

/// Whether the endpoint's answer echoes our resumable-stream offer `token`.
fn echoes(token: Token, answer: &http::HeaderMap) -> bool {
    answer
        .get(RESUME_HEADER)
        .and_then(|v| ResumeHeader::parse(v.as_bytes()).ok())
        .is_some_and(|h| h.token == token && h.at.is_none())
}

/// How a resumable stream to the endpoint at `addr` re-dials: the same CONNECT through the pool, with
/// the waypoint's certificate as it is then.
fn redial(hbone: Pool, tls: Arc<WorkloadTls>, key: PoolKey, addr: SocketAddr) -> Dial {
    Box::new(move |ask| {
        let (hbone, tls, key) = (hbone.clone(), tls.current(), key.clone());
        Box::pin(async move {
            let mut req = connect_request(addr);
            req.headers_mut().insert(RESUME_HEADER, ask);
            hbone
                .connect(&key, &tls, req)
                .await
                .map_err(Attempt::from_pool)
        })
    })
}

/// The waypoint's connections to endpoints. Cheap to clone; the sweeper stops with the last clone.
#[derive(Clone)]
pub struct Upstreams(Arc<Inner>);

/// What an [`Upstreams`] needs.
pub struct UpstreamSettings {
    /// The HBONE pool.
    pub hbone: Pool,
    /// The waypoint's own certificate.
    pub tls: Arc<WorkloadTls>,
    /// The waypoint's identity (the pool key's source).
    pub identity: Identity,
    /// Options of plain TCP sockets.
    pub sock: SocketOpts,
    /// TCP keepalive.
    pub keepalive: Keepalive,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// HTTP/2 settings towards endpoints.
    pub h2: H2Config,
    /// Idle HTTP connections are closed after this long.
    pub idle_timeout: Duration,
    /// The waypoint's network (`x-forwarded-network` on double HBONE).
    pub network: String,
    /// Resumable streams to HBONE endpoints (`MESHNODE_RESUMABLE_STREAMS`), and how long a broken one is
    /// re-dialled (`MESHNODE_RESUME_WAIT`): the endpoint's node proxy can then be upgraded under them.
    pub resume: Option<Duration>,
}

impl Upstreams {
    /// The connections; spawns the idle sweeper on the current runtime.
    pub fn new(s: UpstreamSettings) -> Upstreams {
        let inner = Arc::new(Inner {
            hbone: s.hbone,
            tls: s.tls,
            identity: s.identity,
            sock: s.sock,
            keepalive: s.keepalive,
            defaults: ConnSettings {
                connect_timeout: s.connect_timeout,
                idle_timeout: s.idle_timeout,
                max_requests_per_connection: None,
            },
            h2: s.h2,
            forwarded_network: crate::hbone::double::network_header(&s.network),
            resume: s.resume,
            h1_idle: Mutex::default(),
            h2_conns: Mutex::default(),
            h2_dialing: Mutex::default(),
            opened: AtomicU64::new(0),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Upstreams(inner)
    }

    /// The settings of endpoints outside any cluster (workload addresses), and of clusters that set none.
    pub fn defaults(&self) -> ConnSettings {
        self.0.defaults
    }

    /// HTTP connections opened to endpoints since start (each is one HBONE stream or TCP connection).
    pub fn opened(&self) -> u64 {
        self.0.opened.load(Ordering::Relaxed)
    }

    /// HBONE connections open to endpoints' node proxies.
    pub fn hbone_connections(&self) -> usize {
        self.0.hbone.connections()
    }

    /// A raw connection to `ep` (for TCP proxying), within `timeout` (TCP, TLS and CONNECT together).
    pub async fn connect(&self, ep: &Endpoint, timeout: Duration) -> Result<Transport, Error> {
        match tokio::time::timeout(timeout, self.connect_now(ep, timeout)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Connect {
                addr: ep.addr,
                reason: format!("not connected within {timeout:?} (connect timeout)"),
            }),
        }
    }

    async fn connect_now(&self, ep: &Endpoint, timeout: Duration) -> Result<Transport, Error> {
        let addr = ep.addr;
        if let Some(crossing) = &ep.crossing {
            // Boxed, so the inner handshake's state does not size every connect (see proxy::outbound).
            return Box::pin(self.connect_through(crossing, timeout))
                .await
                .map(|t| Transport::Hbone(Box::new(t)))
                .map_err(|e| Error::Connect {
                    addr: crossing.gateway,
                    reason: format!("through the gateway to {}: {e}", crossing.authority),
                });
        }
        match ep.workload.protocol {
            Protocol::HBONE => {
                let key = PoolKey {
                    src: self.0.identity.clone(),
                    dst_ids: Arc::new([ep.workload.identity.clone()]),
                    dst: SocketAddr::new(addr.ip(), HBONE_PORT),
                };
                let mut req = connect_request(addr);
                let token = self.0.resume.map(|_| Token::random());
                if let Some(token) = token {
                    let offer = ResumeHeader { token, at: None };
                    req.headers_mut().insert(RESUME_HEADER, offer.to_value());
                }
                let tls = self.0.tls.current();
                let stream =
                    self.0
                        .hbone
                        .connect(&key, &tls, req)
                        .await
                        .map_err(|e| Error::Connect {
                            addr,
                            reason: e.to_string(),
                        })?;
                let echoed = token.filter(|t| echoes(*t, &stream.headers));
                let tunnel = match (echoed, self.0.resume) {
                    (Some(token), Some(wait)) => {
                        let dial = redial(self.0.hbone.clone(), self.0.tls.clone(), key, addr);
                        let (send, recv, slot) = (stream.send, stream.recv, stream.slot);
                        let piped =
                            Piped::spawn(send, recv, slot, token, wait, Recover::Redial(dial));
                        Tunnel::piped(piped)
                    }
                    // A ztunnel endpoint (or resumable streams off): a plain stream, as before.
                    _ => Tunnel::from_client(stream),
                };
                Ok(Transport::Hbone(Box::new(tunnel)))
            }
            Protocol::TCP => {
                socket::connect(None, addr, None, self.0.sock, &self.0.keepalive, timeout)
                    .await
                    .map(Transport::Tcp)
                    .map_err(|e| Error::Connect {
                        addr,
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Double HBONE through another network's gateway: the outer tunnel pooled, the inner one
    /// (the waypoint's own certificate again, the far endpoint's identity checked) per connection.
    async fn connect_through(
        &self,
        crossing: &Crossing,
        timeout: Duration,
    ) -> Result<Tunnel, crate::hbone::pool::Error> {
        let key = PoolKey {
            src: self.0.identity.clone(),
            dst_ids: crossing.gateway_ids.clone(),
            dst: crossing.gateway,
        };
        let request = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(crossing.authority.clone())
                .version(Version::HTTP_2)
                .body(())
                .expect("CONNECT to a valid authority is a valid request")
        };
        let tls = self.0.tls.current();
        let outer = self.0.hbone.connect(&key, &tls, request()).await?;
        let mut inner = request();
        crate::hbone::double::forward_network(&mut inner, self.0.forwarded_network.as_ref());
        let stream = crate::hbone::double::connect(
            outer,
            crossing.gateway,
            &tls,
            crossing.inner_ids.clone(),
            &self.0.h2,
            timeout,
            inner,
        )
        .await?;
        Ok(Tunnel::from_client(stream))
    }

    fn key(ep: &Endpoint) -> Key {
        Key {
            addr: ep.addr,
            hbone: (ep.workload.protocol == Protocol::HBONE).then(|| ep.workload.identity.clone()),
        }
    }

    /// Sends `req` to `ep`; the response, and what to run once its body has been read to its end.
    pub async fn request(
        &self,
        ep: &Endpoint,
        version: UpstreamVersion,
        req: Request<UpBody>,
        settings: ConnSettings,
    ) -> Result<(Response<Incoming>, Option<OnEnd>), Error> {
        match version {
            UpstreamVersion::Http1 => self.request_h1(ep, req, settings).await,
            UpstreamVersion::Http2 => self.request_h2(ep, req, settings).await.map(|r| (r, None)),
        }
    }

    async fn request_h1(
        &self,
        ep: &Endpoint,
        req: Request<UpBody>,
        settings: ConnSettings,
    ) -> Result<(Response<Incoming>, Option<OnEnd>), Error> {
        let key = Self::key(ep);
        let mut req = req;
        // An idle connection, if one is still good.
        while let Some((mut send, uses)) = self.checkout_h1(&key) {
            // Its exchange is over, so it is ready at once unless the endpoint has closed it.
            if send.ready().await.is_err() {
                continue;
            }
            match send.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(self.give_back(key, send, uses + 1, settings)))),
                Err(mut e) => match e.take_message() {
                    // Never sent: the connection was lost while idle. Try the next one.
                    Some(r) => req = r,
                    None => return Err(reset(ep.addr, e.into_error())),
                },
            }
        }
        let io = self.connect(ep, settings.connect_timeout).await?;
        let (mut send, conn) = http1::Builder::new()
            .handshake::<_, UpBody>(TokioIo::new(io))
            .await
            .map_err(|e| Error::Connect {
                addr: ep.addr,
                reason: e.to_string(),
            })?;
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "endpoint HTTP/1.1 connection ended");
            }
        });
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| reset(ep.addr, e))?;
        Ok((resp, Some(self.give_back(key, send, 1, settings))))
    }

    /// An idle connection of `key` still within its idle timeout, and how many requests it carried.
    fn checkout_h1(&self, key: &Key) -> Option<(http1::SendRequest<UpBody>, u32)> {
        let mut idle = self.0.h1_idle.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let found = loop {
            match list.pop() {
                Some(i) if !i.usable(now) => continue,
                other => break other,
            }
        };
        if list.is_empty() {
            idle.remove(key);
        }
        found.map(|i| (i.send, i.uses))
    }

    /// Puts `send`, which has carried `uses` requests, back among the idle connections of `key` (run
    /// once the response has been read) — unless it has carried all its cluster allows: then it closes.
    fn give_back(
        &self,
        key: Key,
        send: http1::SendRequest<UpBody>,
        uses: u32,
        settings: ConnSettings,
    ) -> OnEnd {
        let pool: Weak<Inner> = Arc::downgrade(&self.0);
        Box::new(move || {
            let Some(inner) = pool.upgrade() else { return };
            if send.is_closed() || settings.spent(uses) {
                return;
            }
            let mut idle = inner.h1_idle.lock();
            let list = idle.entry(key).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push(Idle {
                    send,
                    since: Instant::now(),
                    uses,
                    idle_timeout: settings.idle_timeout,
                });
            }
        })
    }

    /// The shared connection of `key`, unless it is closed, idle past its timeout or has carried all the
    /// requests its cluster allows (then it is retired: its streams finish, new ones go to a new one).
    fn checkout_h2(&self, key: &Key, settings: ConnSettings) -> Option<http2::SendRequest<UpBody>> {
        let mut conns = self.0.h2_conns.lock();
        let now = Instant::now();
        match conns.get_mut(key) {
            Some(c)
                if !c.send.is_closed()
                    && now.duration_since(c.last_used) < c.idle_timeout
                    && !settings.spent(c.uses) =>
            {
                c.last_used = now;
                c.uses += 1;
                c.idle_timeout = settings.idle_timeout;
                Some(c.send.clone())
            }
            Some(_) => {
                conns.remove(key);
                None
            }
            None => None,
        }
    }

    async fn request_h2(
        &self,
        ep: &Endpoint,
        req: Request<UpBody>,
        settings: ConnSettings,
    ) -> Result<Response<Incoming>, Error> {
        let key = Self::key(ep);
        let mut send = match self.checkout_h2(&key, settings) {
            Some(s) => s,
            None => {
                let gate = self
                    .0
                    .h2_dialing
                    .lock()
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let dialing = gate.lock().await;
                let send = match self.checkout_h2(&key, settings) {
                    Some(s) => Ok(s),
                    None => self.dial_h2(ep, &key, settings).await,
                };
                drop(dialing);
                let mut gates = self.0.h2_dialing.lock();
                // The last one through forgets the gate.
                if Arc::strong_count(&gate) == 2 {
                    gates.remove(&key);
                }
                drop(gates);
                send?
            }
        };
        send.ready().await.map_err(|e| reset(ep.addr, e))?;
        send.send_request(req).await.map_err(|e| {
            if refused_stream(&e) {
                Error::RefusedStream { addr: ep.addr }
            } else {
                reset(ep.addr, e)
            }
        })
    }

    async fn dial_h2(
        &self,
        ep: &Endpoint,
        key: &Key,
        settings: ConnSettings,
    ) -> Result<http2::SendRequest<UpBody>, Error> {
        let io = self.connect(ep, settings.connect_timeout).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(self.0.h2.stream_window)
            .initial_connection_window_size(self.0.h2.connection_window)
            .max_frame_size(self.0.h2.frame_size)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake::<_, UpBody>(TokioIo::new(io))
            .await
            .map_err(|e| Error::Connect {
                addr: ep.addr,
                reason: e.to_string(),
            })?;
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "endpoint HTTP/2 connection ended");
            }
        });
        self.0.h2_conns.lock().insert(
            key.clone(),
            Shared {
                send: send.clone(),
                last_used: Instant::now(),
                uses: 1,
                idle_timeout: settings.idle_timeout,
            },
        );
        Ok(send)
    }
}

fn reset(addr: SocketAddr, source: hyper::Error) -> Error {
    Error::Reset { addr, source }
}

/// Whether hyper's error is the endpoint refusing an HTTP/2 stream.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// How often idle connections past their timeout are closed (checkout never reuses one anyway).
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// Closes idle connections past their idle timeout, and forgets dead ones.
async fn sweep(pool: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_PERIOD);
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        let now = Instant::now();
        inner.h1_idle.lock().retain(|_, list| {
            list.retain(|i| i.usable(now));
            !list.is_empty()
        });
        inner
            .h2_conns
            .lock()
            .retain(|_, c| !c.send.is_closed() && now.duration_since(c.last_used) < c.idle_timeout);
    }
}
