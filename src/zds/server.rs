//! ZDS server: the CNI agent's side (istio-cni's `ztunnelserver`), handing pod netns fds to node proxies.
//!
//! Input: a bound [`SeqpacketListener`], a [`SnapshotSource`] (the agent's enrolled pods), and `add`/`del`
//! calls from the agent's tasks. Output: `WorkloadRequest`s on every connected proxy, and the proxies' acks
//! as `Result`s to the callers.
//!
//! Bounds: [`MAX_CONNECTIONS`] connections, 5 accepts a second, [`HELLO_TIMEOUT`] to send `ZdsHello`. A
//! connection that has not said hello is idle: when every slot is taken, a newcomer evicts the oldest idle
//! one ([`crate::conn_slots`]), so sockets that never say hello cannot keep a proxy out; once every slot
//! holds a proxy, newcomers wait in the socket backlog.
//!
//! One task owns each connection. It reads `ZdsHello`, registers the connection as the newest *before*
//! taking the snapshot (an add racing with the snapshot then reaches this proxy twice at worst, which the
//! proxy acks idempotently), sends the snapshot and `SnapshotSent` (one ack each), then serves requests
//! that arrive through a bounded queue, each with a oneshot for its result. While idle it watches the socket:
//! EOF or an error unregisters the connection, and data nobody asked for is a protocol error that closes it.
//! A NACK (or a request too large to send) keeps the connection; anything else that goes wrong mid-exchange
//! (timeout, garbage ack, I/O error) closes it, since request and ack would no longer pair up.
//! `add` goes to the newest proxy only, `del` to all of them (rolling update: old and new proxy coexist).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::packet::{SeqpacketConn, SeqpacketListener};
use super::{encode, with_deadline, Error, IO_TIMEOUT, MAX_MESSAGE};
use crate::conn_slots::{Slot, Slots, WhenAllBusy};
use crate::netns::Netns;
use crate::proto::workload::zds::{
    workload_request, workload_response, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent,
    Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};

/// Minimum gap between two accepted connections: istio-cni accepts at most 5 per second.
const ACCEPT_INTERVAL: Duration = Duration::from_millis(200);

/// Pause after a failed `accept` (e.g. out of fds) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connections open at once, including ones that have not said hello yet. Normally one proxy, two during a
/// rolling update; the rest of the headroom absorbs reconnect storms and stray clients. A newcomer evicts
/// the oldest connection that has not said hello when all are taken.
pub(super) const MAX_CONNECTIONS: usize = 8;

/// Time a new connection has to send `ZdsHello` (istio-cni's read deadline; ztunnel sends it at once).
const HELLO_TIMEOUT: Duration = IO_TIMEOUT;

/// Requests waiting for one connection's task. A full queue makes callers wait (up to their deadline).
const REQUEST_QUEUE: usize = 32;

/// How long `add`/`del` wait in total: queueing behind earlier requests, the write and the ack read (each
/// bounded by `IO_TIMEOUT` inside the connection task). A caller that gives up has its request skipped.
const CALL_TIMEOUT: Duration = Duration::from_secs(3 * IO_TIMEOUT.as_secs());

/// Bytes read while a connection is idle: any data at all is a protocol error, so a tiny buffer will do.
const IDLE_READ_BUF: usize = 16;

/// One pod of the agent's snapshot, sent to each newly connected proxy.
#[derive(Debug)]
pub struct SnapshotEntry {
    /// Pod UID.
    pub uid: String,
    /// Pod name, namespace and service account.
    pub info: WorkloadInfo,
    /// The pod's netns; `None` sends `KeepWorkload` (the proxy keeps what it has for this uid).
    pub netns: Option<Netns>,
}

/// Where the server gets the pods to announce to a newly connected proxy.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The pods currently enrolled on this node. Called once per connection, after it is registered, on an
    /// async worker: it must return quickly (read a cache, do not scan /proc here).
    fn snapshot(&self) -> Vec<SnapshotEntry>;
}

/// The agent's ZDS server. Cheap to clone; all clones share the connected proxies.
#[derive(Clone)]
pub struct ZdsServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer")
            .field("connected", &self.connected())
            .finish()
    }
}

struct Inner {
    snapshot: Arc<dyn SnapshotSource>,
    /// Registered (hello received) connections, oldest first.
    conns: parking_lot::Mutex<Vec<ConnHandle>>,
    /// Number of registered connections, for waiters.
    count: watch::Sender<usize>,
    next_id: AtomicU64,
}

#[derive(Clone)]
struct ConnHandle {
    id: u64,
    requests: mpsc::Sender<Command>,
}

/// A request for one connection's task, and where to put the proxy's answer.
struct Command {
    uid: String,
    request: WorkloadRequest,
    netns: Option<Netns>,
    reply: oneshot::Sender<Result<(), Error>>,
}

impl ZdsServer {
    /// A server announcing `snapshot` to every proxy that connects.
    pub fn new(snapshot: Arc<dyn SnapshotSource>) -> ZdsServer {
        ZdsServer {
            inner: Arc::new(Inner {
                snapshot,
                conns: parking_lot::Mutex::new(Vec::new()),
                count: watch::Sender::new(0),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Accepts proxies until `shutdown` turns true (if its sender is dropped, until this future is dropped),
    /// then closes every connection. At most 5 new connections per second.
    pub async fn serve(&self, listener: SeqpacketListener, shutdown: watch::Receiver<bool>) {
        self.serve_with(listener, shutdown, HELLO_TIMEOUT).await
    }

    /// [`ZdsServer::serve`], connections having `hello_timeout` to say hello (tests lengthen it, so that only
    /// an eviction can free a slot).
    pub(super) async fn serve_with(
        &self,
        listener: SeqpacketListener,
        mut shutdown: watch::Receiver<bool>,
        hello_timeout: Duration,
    ) {
        let slots = Slots::new(MAX_CONNECTIONS, WhenAllBusy::Wait);
        let mut tasks = JoinSet::new();
        let mut next_accept = Instant::now();
        info!(path = %listener.path().display(), "ZDS server listening");
        loop {
            while tasks.try_join_next().is_some() {}
            let accepted = tokio::select! {
                biased;
                _ = shutdown_requested(&mut shutdown) => break,
                accepted = async {
                    tokio::time::sleep_until(next_accept).await;
                    match listener.accept().await {
                        // Waits only while every slot holds a proxy that said hello.
                        Ok(conn) => Ok((conn, slots.admit().await)),
                        Err(e) => Err(e),
                    }
                } => accepted,
            };
            match accepted {
                Ok((conn, (slot, evicted))) => {
                    next_accept = Instant::now() + ACCEPT_INTERVAL;
                    let inner = self.inner.clone();
                    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                    tasks.spawn(async move {
                        tokio::select! {
                            served = serve_conn(&inner, &conn, id, &slot, hello_timeout) => match served {
                                Ok(()) => info!(conn = id, "ZDS proxy disconnected"),
                                Err(e) => warn!(conn = id, error = %e, "closing ZDS connection"),
                            },
                            _ = evicted => {
                                warn!(conn = id, "closing a ZDS connection that sent no ZdsHello: every slot was taken")
                            }
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "ZDS accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
        info!("ZDS server shutting down");
        tasks.shutdown().await;
    }

    /// Sends `AddWorkload` (with the netns fd) to the most recently connected proxy and waits for its ack.
    pub async fn add(&self, uid: &str, info: &WorkloadInfo, netns: &Netns) -> Result<(), Error> {
        let request = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.to_owned(),
                workload_info: Some(info.clone()),
            })),
        };
        encode(&request)?;
        let mut netns = Some(
            netns
                .try_clone()
                .map_err(Error::io("duplicating the netns fd"))?,
        );
        let call = async {
            loop {
                let newest = self.inner.conns.lock().last().cloned();
                let Some(conn) = newest else {
                    return Err(Error::NoProxy);
                };
                let (reply, answer) = oneshot::channel();
                let command = Command {
                    uid: uid.to_owned(),
                    request: request.clone(),
                    netns: netns.take(),
                    reply,
                };
                match conn.requests.send(command).await {
                    Ok(()) => return answer.await.unwrap_or(Err(CLOSED_BEFORE_ACK)),
                    Err(mpsc::error::SendError(command)) => {
                        // Its task ended between the lookup and the send: try the next newest.
                        netns = command.netns;
                        self.inner.unregister(conn.id);
                    }
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or(Err(Error::Timeout {
                during: "waiting for the proxy to ack AddWorkload",
            }))
    }

    /// Sends `DelWorkload` to every connected proxy and waits for all acks. No proxy, or a proxy that
    /// disconnects meanwhile, is fine (it holds nothing for the pod any more); the first NACK or failure of a
    /// connected proxy is returned.
    pub async fn del(&self, uid: &str) -> Result<(), Error> {
        let request = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: uid.to_owned(),
            })),
        };
        encode(&request)?;
        let conns: Vec<ConnHandle> = self.inner.conns.lock().clone();
        let call = async {
            let mut answers = Vec::with_capacity(conns.len());
            for conn in &conns {
                let (reply, answer) = oneshot::channel();
                let command = Command {
                    uid: uid.to_owned(),
                    request: request.clone(),
                    netns: None,
                    reply,
                };
                if conn.requests.send(command).await.is_ok() {
                    answers.push(answer);
                }
            }
            let mut first_error = None;
            for answer in answers {
                match answer.await.unwrap_or(Err(CLOSED_BEFORE_ACK)) {
                    Ok(()) | Err(Error::Closed { .. }) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            first_error.map_or(Ok(()), Err)
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or(Err(Error::Timeout {
                during: "waiting for the proxies to ack DelWorkload",
            }))
    }

    /// Number of proxies connected (hello received, not yet disconnected).
    pub fn connected(&self) -> usize {
        self.inner.conns.lock().len()
    }

    /// Waits until at least one proxy is connected; `false` if none did within `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut count = self.inner.count.subscribe();
        let connected = tokio::time::timeout(timeout, count.wait_for(|n| *n > 0)).await;
        matches!(connected, Ok(Ok(_)))
    }
}

const CLOSED_BEFORE_ACK: Error = Error::Closed {
    during: "before the proxy acked the request",
};

/// Resolves when shutdown is requested; never if the sender is gone.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Inner {
    fn register(self: &Arc<Self>, id: u64, requests: mpsc::Sender<Command>) -> Registration {
        let mut conns = self.conns.lock();
        conns.push(ConnHandle { id, requests });
        self.count.send_replace(conns.len());
        Registration {
            inner: self.clone(),
            id,
        }
    }

    fn unregister(&self, id: u64) {
        let mut conns = self.conns.lock();
        conns.retain(|c| c.id != id);
        self.count.send_replace(conns.len());
    }
}

/// Keeps a connection in the registry; dropping it (task end or abort) removes it.
struct Registration {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.unregister(self.id);
    }
}

/// One connection's whole life. `Ok` when the proxy closed it while idle.
async fn serve_conn(
    inner: &Arc<Inner>,
    conn: &SeqpacketConn,
    id: u64,
    slot: &Slot,
    hello_timeout: Duration,
) -> Result<(), Error> {
    let mut buf = [0u8; MAX_MESSAGE];
    let (len, fds) = tokio::time::timeout(hello_timeout, conn.recv(&mut buf))
        .await
        .map_err(|_| Error::Timeout {
            during: "waiting for ZdsHello",
        })?
        .map_err(|source| Error::Io {
            during: "waiting for ZdsHello",
            source,
        })?;
    if len == 0 && fds.is_empty() {
        return Err(Error::Closed {
            during: "waiting for ZdsHello",
        });
    }
    if !fds.is_empty() {
        return Err(Error::Protocol(format!(
            "ZdsHello carried {} fds",
            fds.len()
        )));
    }
    let hello = ZdsHello::decode(&buf[..len])
        .map_err(|e| Error::Protocol(format!("undecodable ZdsHello: {e}")))?;
    if hello.version != Version::V1 as i32 {
        return Err(Error::Protocol(format!(
            "unsupported ZDS version {}",
            hello.version
        )));
    }

    // A proxy now: never evicted for a newcomer.
    slot.set_busy();
    let (requests, mut queue) = mpsc::channel(REQUEST_QUEUE);
    let _registration = inner.register(id, requests);
    info!(conn = id, "ZDS proxy connected, sending snapshot");

    let entries = inner.snapshot.snapshot();
    let pods = entries.len();
    for entry in entries {
        let (request, netns) = match entry.netns {
            Some(netns) => (
                workload_request::Payload::Add(AddWorkload {
                    uid: entry.uid.clone(),
                    workload_info: Some(entry.info),
                }),
                Some(netns),
            ),
            None => (
                workload_request::Payload::Keep(KeepWorkload {
                    uid: entry.uid.clone(),
                }),
                None,
            ),
        };
        let request = WorkloadRequest {
            payload: Some(request),
        };
        let fd = netns.as_ref().map(|n| n.as_fd());
        match exchange(conn, &mut buf, &entry.uid, &request, fd).await {
            Ok(()) => {}
            // The proxy keeps the pod pending and retries on its own; the rest of the snapshot still counts.
            Err(e) if keeps_connection(&e) => {
                warn!(conn = id, error = %e, "snapshot entry rejected")
            }
            Err(e) => return Err(e),
        }
    }
    let done = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    };
    match exchange(conn, &mut buf, "", &done, None).await {
        Ok(()) => info!(conn = id, pods, "ZDS snapshot acked"),
        Err(e) if keeps_connection(&e) => warn!(conn = id, error = %e, "SnapshotSent rejected"),
        Err(e) => return Err(e),
    }

    let mut idle_buf = [0u8; IDLE_READ_BUF];
    loop {
        tokio::select! {
            command = queue.recv() => {
                // The registry holds a sender until `_registration` drops, so the queue never ends here.
                let Some(command) = command else { return Ok(()) };
                if command.reply.is_closed() {
                    debug!(conn = id, uid = %command.uid, "caller gave up; request skipped");
                    continue;
                }
                let fd = command.netns.as_ref().map(|n| n.as_fd());
                let result = exchange(conn, &mut buf, &command.uid, &command.request, fd).await;
                match result {
                    Err(e) if !keeps_connection(&e) => {
                        // Request and ack may no longer pair up: the caller learns why, then the connection goes.
                        let _ = command.reply.send(Err(copy_error(&e)));
                        return Err(e);
                    }
                    result => {
                        let _ = command.reply.send(result);
                    }
                }
            }
            received = conn.recv(&mut idle_buf) => {
                return match received {
                    Ok((0, fds)) if fds.is_empty() => Ok(()),
                    Ok(_) => Err(Error::Protocol("proxy sent data without a request".into())),
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        Err(Error::Protocol("proxy sent data without a request".into()))
                    }
                    Err(source) => Err(Error::Io { during: "watching an idle connection", source }),
                };
            }
        }
    }
}

/// The same error again, for the caller while the original is logged (`io::Error` is not `Clone`).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::NoProxy => Error::NoProxy,
        Error::Nack { uid, error } => Error::Nack {
            uid: uid.clone(),
            error: error.clone(),
        },
        Error::Timeout { during } => Error::Timeout { during },
        Error::Io { during, source } => Error::Io {
            during,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::Protocol(reason) => Error::Protocol(reason.clone()),
        Error::Closed { during } => Error::Closed { during },
        Error::TooLarge { len, max } => Error::TooLarge {
            len: *len,
            max: *max,
        },
    }
}

/// Whether the connection stays usable after `e`: the proxy answered (NACK), or nothing was sent.
fn keeps_connection(e: &Error) -> bool {
    matches!(e, Error::Nack { .. } | Error::TooLarge { .. })
}

/// Sends one request (with `fd` as SCM_RIGHTS when given) and reads its ack.
async fn exchange(
    conn: &SeqpacketConn,
    buf: &mut [u8; MAX_MESSAGE],
    uid: &str,
    request: &WorkloadRequest,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), Error> {
    let bytes = encode(request)?;
    with_deadline("sending a WorkloadRequest", conn.send(&bytes, fd)).await?;
    let (len, fds) = with_deadline("waiting for an ack", conn.recv(buf)).await?;
    if len == 0 && fds.is_empty() {
        return Err(Error::Closed {
            during: "waiting for an ack",
        });
    }
    if !fds.is_empty() {
        return Err(Error::Protocol(format!("ack carried {} fds", fds.len())));
    }
    let response = WorkloadResponse::decode(&buf[..len])
        .map_err(|e| Error::Protocol(format!("undecodable WorkloadResponse: {e}")))?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(ack)) => Err(Error::Nack {
            uid: uid.to_owned(),
            error: ack.error,
        }),
        None => Err(Error::Protocol("WorkloadResponse without an ack".into())),
    }
}
