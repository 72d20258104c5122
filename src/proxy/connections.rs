//! Live re-evaluation of inbound connections (ztunnel's connection manager and policy watcher).
//!
//! Input: every established inbound connection — an HBONE stream on :15008 or a plaintext connection on
//! :15006 — registered with what authorization needs ([`Tracked`]: addresses, peer identity, workload);
//! and the proxy's [`StateHandle`]. Output: when a new state snapshot is published, every registered
//! connection is checked again against its policies; each one now denied is told through its
//! [`Registration`] (which resolves [`Registration::closed`] with the [`DenyReason`]), and its handler closes
//! it (plaintext: RST; HBONE: stream reset) and logs "connection closed due to policy change".
//!
//! Costs and bounds: the registry's lock is taken only when a connection opens or closes and once per
//! snapshot, never on the byte-copy path. A re-check is O(registered connections) and allocates only for
//! the connections it closes. The registry holds at most its capacity (set from `max_connections`); a
//! connection that does not fit is refused rather than carried unchecked.

use prometheus_client::metrics::counter::Counter;

use crate::metrics::LiveBytes;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::Proxy;
use crate::authz::{Connection, Decision, DenyReason};
use crate::identity::Identity;
use crate::state::{State, Workload};

/// How long the watcher waits on the state before looking again; only bounds how long a closed state
/// channel goes unnoticed.
const WATCH_PERIOD: Duration = Duration::from_secs(60);

/// What authorization needs to decide on a connection again.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The peer's address.
    pub src: SocketAddr,
    /// The workload address and resolved port the connection goes to.
    pub dst: SocketAddr,
    /// The peer's identity (mTLS); `None` for plaintext.
    pub src_identity: Option<Identity>,
    /// The destination workload as it was when the connection opened (used if it leaves the state).
    pub workload: Arc<Workload>,
}

/// The registry is full: the connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many tracked inbound connections (limit {limit})")]
pub struct Full {
    /// The registry's capacity.
    pub limit: usize,
}

struct Entry {
    /// Shared so a recheck can copy the list out and decide without holding the registry's lock.
    conn: Arc<Tracked>,
    close: oneshot::Sender<DenyReason>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    conns: HashMap<u64, Entry>,
}

/// The registry of one proxy's open inbound connections.
pub struct ConnectionManager {
    capacity: usize,
    inner: Mutex<Inner>,
    /// Re-checks completed: what a caller waits on to know a policy change has been applied.
    rechecks: std::sync::atomic::AtomicU64,
}

/// What one re-check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recheck {
    /// Connections checked.
    pub checked: usize,
    /// Connections told to close.
    pub closed: usize,
}

impl ConnectionManager {
    /// An empty registry for at most `capacity` connections.
    pub fn new(capacity: usize) -> Arc<ConnectionManager> {
        Arc::new(ConnectionManager {
            capacity,
            inner: Mutex::default(),
            rechecks: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Number of connections registered.
    pub fn len(&self) -> usize {
        self.inner.lock().conns.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many re-checks have completed (each one after a state change that touched policies).
    pub fn rechecks(&self) -> u64 {
        self.rechecks.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Registers an open connection; it stays registered until the [`Registration`] is dropped or a
    /// re-check closes it.
    pub fn register(self: &Arc<Self>, conn: Tracked) -> Result<Registration, Full> {
        // Built before taking the lock (the oneshot allocates too), so the lock covers only the map.
        let (close, closed) = oneshot::channel();
        let conn = Arc::new(conn);
        let mut inner = self.inner.lock();
        if inner.conns.len() >= self.capacity {
            return Err(Full {
                limit: self.capacity,
            });
        }
        let id = inner.next;
        inner.next += 1;
        inner.conns.insert(id, Entry { conn, close });
        Ok(Registration {
            manager: self.clone(),
            id,
            closed,
        })
    }

    /// Checks every registered connection against `state`'s policies and tells the denied ones to close.
    /// `workload` is the proxy's workload in `state` (its namespace and policy keys decide which policies
    /// apply); when it is `None` each connection's workload from registration time is used.
    pub fn recheck(&self, state: &State, workload: Option<&Workload>, network: &str) -> Recheck {
        let policies = state.policies();
        // The lock is held only to copy the list out and to remove the denied: connections keep opening
        // and closing while the (possibly long) evaluation runs. One opened meanwhile was authorized
        // against a state at least as new as the one it would be checked against here.
        let conns: Vec<(u64, Arc<Tracked>)> = self
            .inner
            .lock()
            .conns
            .iter()
            .map(|(id, e)| (*id, e.conn.clone()))
            .collect();
        let mut denied: Vec<(u64, DenyReason)> = Vec::new();
        for (id, t) in &conns {
            let w = workload.unwrap_or(&t.workload);
            let conn = Connection {
                src: t.src,
                dst: t.dst,
                src_identity: t.src_identity.as_ref(),
                dst_network: network,
            };
            if let Decision::Deny(reason) =
                policies.check(&w.namespace, &w.authorization_policies, &conn)
            {
                denied.push((*id, reason));
            }
        }
        let mut closed = 0;
        let mut inner = self.inner.lock();
        for (id, reason) in denied {
            // A connection that ended meanwhile is gone: nothing to close.
            if let Some(e) = inner.conns.remove(&id) {
                closed += 1;
                let _ = e.close.send(reason);
            }
        }
        self.rechecks
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Recheck {
            checked: conns.len(),
            closed,
        }
    }
}

/// One open connection as the admin port lists it (`istioctl ztunnel-config connections`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Who opened it.
    pub src: SocketAddr,
    /// The address the application dialled (outbound); `None` inbound.
    pub original_dst: Option<SocketAddr>,
    /// Where it goes from here: the peer's HBONE port, a waypoint, the workload (outbound), or the
    /// application (inbound).
    pub actual_dst: SocketAddr,
    /// `HBONE` or `TCP`.
    pub protocol: &'static str,
}

impl ConnectionManager {
    /// The registered inbound connections (a copy, taken under the lock).
    pub fn list(&self) -> Vec<Listed> {
        self.inner
            .lock()
            .conns
            .values()
            .map(|e| Listed {
                src: e.conn.src,
                original_dst: None,
                actual_dst: e.conn.dst,
                protocol: if e.conn.src_identity.is_some() {
                    "HBONE"
                } else {
                    "TCP"
                },
            })
            .collect()
    }
}

/// The proxy's open outbound connections, for listing only: touched when one opens and when it closes,
/// never while it copies. Bounded by the proxy's connection admission (each entry is an open connection).
#[derive(Default)]
pub struct OutboundList {
    inner: Mutex<(u64, HashMap<u64, Listed>)>,
}

/// An outbound connection's place in the [`OutboundList`]; dropping it removes the entry.
pub struct Listing {
    list: Arc<OutboundList>,
    id: u64,
}

impl OutboundList {
    /// Lists `conn` until the returned [`Listing`] is dropped.
    pub fn add(self: &Arc<Self>, conn: Listed) -> Listing {
        let mut inner = self.inner.lock();
        let id = inner.0;
        inner.0 += 1;
        inner.1.insert(id, conn);
        Listing {
            list: self.clone(),
            id,
        }
    }

    /// The open outbound connections (a copy).
    pub fn list(&self) -> Vec<Listed> {
        self.inner.lock().1.values().cloned().collect()
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        self.list.inner.lock().1.remove(&self.id);
    }
}

/// A registered connection. Dropping it deregisters the connection.
pub struct Registration {
    manager: Arc<ConnectionManager>,
    id: u64,
    closed: oneshot::Receiver<DenyReason>,
}

impl Registration {
    /// Resolves when a policy change denies the connection, with the reason; pending otherwise.
    pub async fn closed(&mut self) -> DenyReason {
        match (&mut self.closed).await {
            Ok(reason) => reason,
            // The registry dropped the entry without a reason: it never does, but never close for it.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.manager.inner.lock().conns.remove(&self.id);
    }
}

impl Proxy {
    /// Re-checks the proxy's inbound connections each time a new state snapshot is published, until the
    /// state's sender is gone. Runs for the proxy's lifetime (the caller ends it with the proxy).
    pub(super) async fn watch_policies(self: Arc<Self>) {
        let handle = &self.inputs.state;
        let network = self.cfg().network.clone();
        let mut last = handle.load();
        loop {
            let started = tokio::time::Instant::now();
            let changed = handle
                .wait_for(WATCH_PERIOD, |s| {
                    (!std::ptr::eq(s, Arc::as_ptr(&last))).then_some(())
                })
                .await;
            if changed.is_none() {
                if started.elapsed() < WATCH_PERIOD / 2 {
                    // `wait_for` returned early with nothing: the sender is gone, no state will change.
                    return;
                }
                continue;
            }
            let state = handle.load();
            let workload = state.workload_by_info(&self.inputs.workload).cloned();
            // Decisions depend only on the policy set and this workload's namespace and policy keys: a push
            // that changed neither (other workloads, services) cannot change any decision.
            let before = last.workload_by_info(&self.inputs.workload);
            let same_workload = match (before, workload.as_deref()) {
                (Some(a), Some(b)) => {
                    a.namespace == b.namespace
                        && a.authorization_policies == b.authorization_policies
                }
                (None, None) => true,
                _ => false,
            };
            if state.same_policies(&last) && same_workload {
                last = state;
                continue;
            }
            let t = std::time::Instant::now();
            let r = self.conns.recheck(&state, workload.as_deref(), &network);
            tracing::debug!(
                target: "authz",
                checked = r.checked, closed = r.closed, took_us = t.elapsed().as_micros() as u64,
                "re-evaluated inbound connections after a state change"
            );
            last = state;
        }
    }
}

/// The deciding policy's key for logs, `-` when no single policy decided (no ALLOW policy matched).
pub fn deciding_policy(reason: &DenyReason) -> &str {
    match reason {
        DenyReason::ExplicitDeny { policy } => policy,
        DenyReason::NoAllowMatch => "-",
    }
}

/// Which end of a connection a [`Counted`] socket faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The application that opened the connection.
    Initiator,
    /// The application it was opened to.
    Server,
}

/// An I/O object that counts the bytes read from and written to it, so the totals survive a copy that is
/// cancelled (a connection closed by a policy change). Plain integers: it is owned by one task. Given the
/// connection's metric counters, it also adds to them as it goes (one atomic add per read or write).
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    /// Bytes read from `inner`.
    pub read: u64,
    /// Bytes written to `inner`.
    pub written: u64,
    on_read: Option<Counter>,
    on_write: Option<Counter>,
}

impl<T> Counted<T> {
    /// Wraps `inner` with zero counts.
    pub fn new(inner: T) -> Counted<T> {
        Counted {
            inner,
            read: 0,
            written: 0,
            on_read: None,
            on_write: None,
        }
    }

    /// Wraps `inner`, a socket (or half of one) facing `side` of the connection, also adding its bytes to the
    /// connection's live metrics: what is read from the initiator was received and what is written to it
    /// was sent; towards the server, the other way round.
    pub fn facing(inner: T, side: Side, live: Option<&LiveBytes>) -> Counted<T> {
        let (on_read, on_write) = match (live, side) {
            (None, _) => (None, None),
            (Some(l), Side::Initiator) => (Some(l.received.clone()), Some(l.sent.clone())),
            (Some(l), Side::Server) => (Some(l.sent.clone()), Some(l.received.clone())),
        };
        Counted {
            on_read,
            on_write,
            ..Counted::new(inner)
        }
    }
}

impl<T> Counted<T> {
    /// The wrapped I/O object (the counts are left behind).
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read += n;
            if let Some(c) = &self.on_read {
                c.inc_by(n);
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.written += n as u64;
            if let Some(c) = &self.on_write {
                c.inc_by(n as u64);
            }
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
