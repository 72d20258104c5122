//! The HBONE client: a pool of mTLS + HTTP/2 connections, and CONNECT streams opened on them.
//!
//! Input: a [`PoolKey`] (source identity, identities the destination may have, destination address — the
//! key ztunnel uses), the source identity's [`TlsMaterial`] and a CONNECT request. Output: an open stream
//! whose `200` response has arrived. Connections are shared by up to `max_streams_per_connection` streams,
//! one connection is dialled per key at a time (concurrent callers wait for it instead of each dialling),
//! and connections unused for `unused_release_timeout` are closed by a sweeper task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::{H2Config, Keepalive, PoolConfig};
use crate::identity::Identity;
use crate::netns::InpodNetns;
use crate::socket::{self, SocketOpts};
use crate::tls::{dummy_server_name, TlsMaterial};

/// Why a CONNECT stream could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// TCP connect to the peer failed.
    #[error("connecting to {dst}: {source}")]
    Connect {
        /// The peer.
        dst: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong identity, untrusted chain, peer alert...).
    #[error("TLS handshake with {dst}: {source}")]
    Tls {
        /// The peer.
        dst: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP/2 layer failed.
    #[error("HTTP/2 with {dst}: {source}")]
    H2 {
        /// The peer.
        dst: SocketAddr,
        /// The error.
        source: h2::Error,
    },
    /// The peer answered the CONNECT with a status other than 200.
    #[error("HBONE peer {dst} refused the CONNECT: http status {status}")]
    Status {
        /// The peer.
        dst: SocketAddr,
        /// Its answer.
        status: http::StatusCode,
    },
    /// The peer did not answer in time.
    #[error("HBONE peer {dst} did not answer the CONNECT in time")]
    Timeout {
        /// The peer.
        dst: SocketAddr,
    },
    /// The inner tunnel of double HBONE (carried through the gateway at `dst`) failed.
    #[error("inner tunnel through the gateway: {0}")]
    Inner(Box<Error>),
}

/// What a pooled connection is for: ztunnel's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity we present.
    pub src: Identity,
    /// Identities the peer may present (shared: a key is built per connect, and kept per connection).
    pub dst_ids: Arc<[Identity]>,
    /// The peer's address (e.g. `10.0.0.2:15008`).
    pub dst: SocketAddr,
}

/// An open CONNECT stream. Dropping it releases its slot on the connection.
pub struct Stream {
    /// Request body: bytes to the peer.
    pub send: SendStream<Bytes>,
    /// Response body: bytes from the peer.
    pub recv: RecvStream,
    /// Response headers (e.g. `baggage`).
    pub headers: http::HeaderMap,
    /// This stream's place on its connection; keep it until the stream is done.
    pub slot: Slot,
}

/// A stream's place on a pooled connection, given back when dropped.
pub struct Slot(Option<Arc<ConnState>>);

impl Slot {
    /// The slot of a stream outside any pool: on a connection of its own (double HBONE's inner one), or
    /// accepted by a server.
    pub fn unpooled() -> Slot {
        Slot(None)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(conn) = &self.0 {
            conn.streams.fetch_sub(1, Ordering::AcqRel);
            *conn.last_used.lock() = Instant::now();
        }
    }
}

struct ConnState {
    streams: AtomicU32,
    closed: AtomicBool,
    last_used: Mutex<Instant>,
}

#[derive(Clone)]
struct Conn {
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Conn>,
    dialing: Arc<tokio::sync::Mutex<()>>,
}

struct Inner {
    entries: Mutex<HashMap<PoolKey, Entry>>,
    pool: PoolConfig,
    h2: H2Config,
    sock: SocketOpts,
    netns: Option<Arc<InpodNetns>>,
    keepalive: Keepalive,
    connect_timeout: Duration,
}

/// The pool. Cheap to clone; the sweeper stops when the last clone is dropped, and dropping the pool closes
/// its idle connections (streams in flight finish first).
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

impl Pool {
    /// A new pool; spawns its sweeper on the current runtime. With `netns`, connections are opened from
    /// that pod's network namespace (in-pod mode).
    pub fn new(
        pool: PoolConfig,
        h2: H2Config,
        sock: SocketOpts,
        netns: Option<Arc<InpodNetns>>,
        keepalive: Keepalive,
        connect_timeout: Duration,
    ) -> Pool {
        let inner = Arc::new(Inner {
            entries: Mutex::default(),
            pool,
            h2,
            sock,
            netns,
            keepalive,
            connect_timeout,
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(sweep(weak, pool.unused_release_timeout));
        Pool(inner)
    }

    /// Number of open pooled connections (all keys).
    pub fn connections(&self) -> usize {
        self.0.entries.lock().values().map(|e| e.conns.len()).sum()
    }

    /// Opens a CONNECT stream to `key.dst` for `req`, reusing a pooled connection when one has room.
    pub async fn connect(
        &self,
        key: &PoolKey,
        tls: &TlsMaterial,
        req: http::Request<()>,
    ) -> Result<Stream, Error> {
        // A pooled connection may have died since it was last used: one retry on a fresh connection.
        let mut req = Some(req);
        for attempt in 0..2 {
            let conn = match self.checkout(key) {
                Some(c) => c,
                None => self.dial_or_wait(key, tls).await?,
            };
            let r = req.take().expect("request present for each attempt");
            let keep = clone_request(&r);
            let state = conn.state.clone();
            match self.open(key.dst, conn, r).await {
                Err(Error::H2 { source, .. })
                    if attempt == 0 && state.closed.load(Ordering::Acquire) =>
                {
                    tracing::debug!(dst = %key.dst, error = %source, "pooled HBONE connection unusable; redialling");
                    req = Some(keep);
                }
                other => return other,
            }
        }
        unreachable!("the second attempt always returns")
    }

    /// A live pooled connection with room for one more stream, its slot already taken.
    fn checkout(&self, key: &PoolKey) -> Option<Conn> {
        let mut entries = self.0.entries.lock();
        let entry = entries.get_mut(key)?;
        entry
            .conns
            .retain(|c| !c.state.closed.load(Ordering::Acquire));
        let configured = self.0.pool.max_streams_per_connection;
        entry.conns.iter().find_map(|c| {
            // ztunnel's limit: our setting or the peer's SETTINGS_MAX_CONCURRENT_STREAMS, whichever is lower.
            let peer = u32::try_from(c.send.current_max_send_streams()).unwrap_or(u32::MAX);
            let max = configured.min(peer.max(1));
            c.state
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()
                .map(|_| c.clone())
        })
    }

    async fn dial_or_wait(&self, key: &PoolKey, tls: &TlsMaterial) -> Result<Conn, Error> {
        let gate = self
            .0
            .entries
            .lock()
            .entry(key.clone())
            .or_default()
            .dialing
            .clone();
        let _dialing = gate.lock().await;
        // Someone may have dialled while we waited.
        if let Some(c) = self.checkout(key) {
            return Ok(c);
        }
        let conn = self.dial(key, tls).await?;
        conn.state.streams.fetch_add(1, Ordering::AcqRel);
        self.0
            .entries
            .lock()
            .entry(key.clone())
            .or_default()
            .conns
            .push(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, key: &PoolKey, tls: &TlsMaterial) -> Result<Conn, Error> {
        let dst = key.dst;
        let tcp = socket::connect(
            self.0.netns.as_deref(),
            dst,
            None,
            self.0.sock,
            &self.0.keepalive,
            self.0.connect_timeout,
        )
        .await
        .map_err(|source| Error::Connect { dst, source })?;
        let connector = tokio_rustls::TlsConnector::from(tls.client_config(key.dst_ids.to_vec()));
        let tls_stream = tokio::time::timeout(
            self.0.connect_timeout,
            connector.connect(dummy_server_name(), tcp),
        )
        .await
        .map_err(|_| Error::Timeout { dst })?
        .map_err(|source| Error::Tls { dst, source })?;
        let (send, connection) =
            super::client_builder(&self.0.h2, self.0.pool.max_streams_per_connection)
                .handshake::<_, Bytes>(tls_stream)
                .await
                .map_err(|source| Error::H2 { dst, source })?;
        let state = Arc::new(ConnState {
            streams: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        });
        let driver_state = state.clone();
        let mut connection = connection;
        let pings = super::keepalive(connection.ping_pong());
        tokio::spawn(async move {
            tokio::select! {
                r = &mut connection => if let Err(e) = r {
                    tracing::debug!(%dst, error = %e, "HBONE connection ended");
                },
                _ = pings => {}
            }
            driver_state.closed.store(true, Ordering::Release);
        });
        tracing::debug!(%dst, src = %key.src, "HBONE connection established");
        Ok(Conn { send, state })
    }

    /// Sends the CONNECT on `conn` (whose slot is already taken) and waits for a 200.
    async fn open(
        &self,
        dst: SocketAddr,
        conn: Conn,
        req: http::Request<()>,
    ) -> Result<Stream, Error> {
        let slot = Slot(Some(conn.state.clone()));
        let mut sender = conn.send.clone();
        let res = async {
            sender = sender.ready().await?;
            sender.send_request(req, false)
        }
        .await;
        let (response, send) = match res {
            Ok(r) => r,
            Err(source) => {
                conn.state.closed.store(true, Ordering::Release);
                return Err(Error::H2 { dst, source });
            }
        };
        let (headers, recv) = answered(dst, response).await?;
        Ok(Stream {
            send,
            recv,
            headers,
            slot,
        })
    }
}

/// The answer to a CONNECT sent to `dst`: its headers and body when it is a 200, in time.
pub(super) async fn answered(
    dst: SocketAddr,
    response: h2::client::ResponseFuture,
) -> Result<(http::HeaderMap, RecvStream), Error> {
    let response = tokio::time::timeout(super::RESPONSE_TIMEOUT, response)
        .await
        .map_err(|_| Error::Timeout { dst })?
        .map_err(|source| Error::H2 { dst, source })?;
    let (parts, recv) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(Error::Status {
            dst,
            status: parts.status,
        });
    }
    Ok((parts.headers, recv))
}

fn clone_request(r: &http::Request<()>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method(r.method().clone())
        .uri(r.uri().clone())
        .version(r.version());
    if let Some(h) = b.headers_mut() {
        *h = r.headers().clone();
    }
    b.body(()).expect("a copy of a valid request is valid")
}

/// Closes connections that have carried no stream for `idle`, and forgets dead ones.
async fn sweep(pool: Weak<Inner>, idle: Duration) {
    let period = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        let now = Instant::now();
        let mut entries = inner.entries.lock();
        entries.retain(|_, e| {
            e.conns.retain(|c| {
                !c.state.closed.load(Ordering::Acquire)
                    && (c.state.streams.load(Ordering::Acquire) > 0
                        || now.duration_since(*c.state.last_used.lock()) < idle)
            });
            !e.conns.is_empty() || Arc::strong_count(&e.dialing) > 1
        });
    }
}
