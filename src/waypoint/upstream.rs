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
//! connection per endpoint carries every request. Idle connections are closed after the pool's
//! `unused_release_timeout` (and at most [`MAX_IDLE_PER_ENDPOINT`] are kept per endpoint).

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
use super::snapshot::Endpoint;
use super::tunnel::Tunnel;
use crate::config::{H2Config, Keepalive};
use crate::hbone::pool::{Pool, PoolKey};
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
}

struct Shared {
    send: http2::SendRequest<UpBody>,
    last_used: Instant,
}

struct Inner {
    hbone: Pool,
    tls: Arc<WorkloadTls>,
    identity: Identity,
    sock: SocketOpts,
    keepalive: Keepalive,
    connect_timeout: Duration,
    h2: H2Config,
    h1_idle: Mutex<HashMap<Key, Vec<Idle>>>,
    h2_conns: Mutex<HashMap<Key, Shared>>,
    /// One HTTP/2 dial per endpoint at a time: concurrent first requests share the connection.
    h2_dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// HTTP connections opened to endpoints so far.
    opened: AtomicU64,
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
            connect_timeout: s.connect_timeout,
            h2: s.h2,
            h1_idle: Mutex::default(),
            h2_conns: Mutex::default(),
            h2_dialing: Mutex::default(),
            opened: AtomicU64::new(0),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner), s.idle_timeout));
        Upstreams(inner)
    }

    /// HTTP connections opened to endpoints since start (each is one HBONE stream or TCP connection).
    pub fn opened(&self) -> u64 {
        self.0.opened.load(Ordering::Relaxed)
    }

    /// HBONE connections open to endpoints' node proxies.
    pub fn hbone_connections(&self) -> usize {
        self.0.hbone.connections()
    }

    /// A raw connection to `ep` (for TCP proxying).
    pub async fn connect(&self, ep: &Endpoint) -> Result<Transport, Error> {
        let addr = ep.addr;
        match ep.workload.protocol {
            Protocol::HBONE => {
                let key = PoolKey {
                    src: self.0.identity.clone(),
                    dst_ids: vec![ep.workload.identity.clone()],
                    dst: SocketAddr::new(addr.ip(), HBONE_PORT),
                };
                let req = Request::builder()
                    .method(Method::CONNECT)
                    .uri(addr.to_string())
                    .version(Version::HTTP_2)
                    .body(())
                    .expect("a socket address is a valid authority");
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
                Ok(Transport::Hbone(Box::new(Tunnel::from_client(stream))))
            }
            Protocol::TCP => socket::connect(
                None,
                addr,
                None,
                self.0.sock,
                &self.0.keepalive,
                self.0.connect_timeout,
            )
            .await
            .map(Transport::Tcp)
            .map_err(|e| Error::Connect {
                addr,
                reason: e.to_string(),
            }),
        }
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
    ) -> Result<(Response<Incoming>, Option<OnEnd>), Error> {
        match version {
            UpstreamVersion::Http1 => self.request_h1(ep, req).await,
            UpstreamVersion::Http2 => self.request_h2(ep, req).await.map(|r| (r, None)),
        }
    }

    async fn request_h1(
        &self,
        ep: &Endpoint,
        req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Option<OnEnd>), Error> {
        let key = Self::key(ep);
        let mut req = req;
        // An idle connection, if one is still good.
        while let Some(mut send) = self.checkout_h1(&key) {
            // Its exchange is over, so it is ready at once unless the endpoint has closed it.
            if send.ready().await.is_err() {
                continue;
            }
            match send.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(self.give_back(key, send)))),
                Err(mut e) => match e.take_message() {
                    // Never sent: the connection was lost while idle. Try the next one.
                    Some(r) => req = r,
                    None => return Err(reset(ep.addr, e.into_error())),
                },
            }
        }
        let io = self.connect(ep).await?;
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
        Ok((resp, Some(self.give_back(key, send))))
    }

    fn checkout_h1(&self, key: &Key) -> Option<http1::SendRequest<UpBody>> {
        let mut idle = self.0.h1_idle.lock();
        let list = idle.get_mut(key)?;
        let found = loop {
            match list.pop() {
                Some(i) if i.send.is_closed() => continue,
                other => break other,
            }
        };
        if list.is_empty() {
            idle.remove(key);
        }
        found.map(|i| i.send)
    }

    /// Puts `send` back among the idle connections of `key` (run once the response has been read).
    fn give_back(&self, key: Key, send: http1::SendRequest<UpBody>) -> OnEnd {
        let pool: Weak<Inner> = Arc::downgrade(&self.0);
        Box::new(move || {
            let Some(inner) = pool.upgrade() else { return };
            if send.is_closed() {
                return;
            }
            let mut idle = inner.h1_idle.lock();
            let list = idle.entry(key).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push(Idle {
                    send,
                    since: Instant::now(),
                });
            }
        })
    }

    fn checkout_h2(&self, key: &Key) -> Option<http2::SendRequest<UpBody>> {
        let mut conns = self.0.h2_conns.lock();
        match conns.get_mut(key) {
            Some(c) if !c.send.is_closed() => {
                c.last_used = Instant::now();
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
    ) -> Result<Response<Incoming>, Error> {
        let key = Self::key(ep);
        let mut send = match self.checkout_h2(&key) {
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
                let send = match self.checkout_h2(&key) {
                    Some(s) => Ok(s),
                    None => self.dial_h2(ep, &key).await,
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

    async fn dial_h2(&self, ep: &Endpoint, key: &Key) -> Result<http2::SendRequest<UpBody>, Error> {
        let io = self.connect(ep).await?;
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

/// Closes idle connections older than `idle`, and forgets dead ones.
async fn sweep(pool: Weak<Inner>, idle: Duration) {
    let period = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        let now = Instant::now();
        inner.h1_idle.lock().retain(|_, list| {
            list.retain(|i| !i.send.is_closed() && now.duration_since(i.since) < idle);
            !list.is_empty()
        });
        inner
            .h2_conns
            .lock()
            .retain(|_, c| !c.send.is_closed() && now.duration_since(c.last_used) < idle);
    }
}
