//! The proxy's side of an upgrade that no connection notices: its resumable connections handed to the
//! process replacing it, and adopted there (issue 17).
//!
//! **Leaving** ([`Handover::leave`], when the process is told to stop): connect to the new process's
//! hand-over socket first, or, when no new process is there yet (a restart rather than a rolling update),
//! to the CNI agent's hold socket beside it (`upgrade::hold`: the agent hands the connections on once the
//! new process listens); neither there: nothing is paused, connections drain as before. Then pause every
//! resumable connection and every plain TCP one ([`Handover`]'s pause signal; a resumable one sends
//! `MOVING` to its peer at a frame boundary, a plain one's copy stops between two reads or writes, see
//! `proxy::plain`), wait until each has exported its state ([`Enlisted`] counts them, at most
//! [`COLLECT_WAIT`]), and hand them over with `upgrade::handover`: a resumable one with its app socket
//! ([`Proxy::hand_over`]), a plain one with both its sockets ([`Proxy::hand_over_plain`]). A connection
//! not taken (the new process refused it or failed) is closed; a resumable one that finishes pausing
//! after the collection too, while a plain one then carries on here and drains (it still has both its
//! sockets and its copy's state; a pause in the instant the collection ends may still close one). HBONE
//! connections that are not resumable (a ztunnel peer, double HBONE) are not paused and drain as before.
//!
//! **Arriving** ([`arrive`], in the new process once it is ready): listen on the hand-over socket; each
//! connection taken goes to the proxy of its pod, which adopts it: the server side re-checks it (policy,
//! a new metrics record and registration) and parks it for the client's re-dial; the client side opens a
//! new metrics record and re-dials the server with its token. Either side then carries on with its copy
//! from the exported counts, so no byte is lost or repeated. A plain connection ([`AdoptedPlain`], told
//! apart by its second socket) opens a new metrics record (outbound, labelled from the upstream's workload
//! and the recorded service; inbound, registered and checked against the current policy, as a new
//! plaintext connection is), then writes the bytes its old copy had read and not written, passes on the
//! EOFs it had read, and carries on with a pausable copy (so it can move again).
//!
//! What travels per connection ([`Handed`]): the app socket (and for plain TCP the peer's), the pod, the
//! peer and its identity ("" for plain TCP), the send log or the bytes read from the app and not yet
//! written (`to_peer`) and the bytes not yet written to the app (`to_app`), and [`Resume`] (token,
//! counts, the CONNECT's authority and local address, the identities expected of the server, the
//! service, the opening time; for plain TCP the half-close state, [`PlainState`], instead of a token).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::Proxy;
use crate::hbone::resume::copy::Progress;
use crate::hbone::resume::Token;
use crate::identity::Identity;
use crate::upgrade::handover::{self as transfer, Direction, Fds, Handed, Receiver, Sender};

/// How long after a hand-over arrived the memory its adoptions peaked at is given back.
const SETTLE: Duration = Duration::from_secs(1);

/// Longest wait for the paused connections to export their state.
pub const COLLECT_WAIT: Duration = Duration::from_secs(2);

/// Why a hand-over did not happen or was partial.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No new process listens on the hand-over socket, and no CNI agent on the hold socket beside it.
    #[error("no new process at {path}, nor a CNI agent to hold the connections: {source}")]
    NoSuccessor {
        /// The socket path.
        path: PathBuf,
        /// Why connecting failed.
        source: transfer::Error,
    },
    /// The hand-over socket could not be listened on.
    #[error("listening on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: transfer::Error,
    },
}

/// The process's hand-over: the pause every resumable connection watches, and what the paused ones
/// left for the new process. One per process, shared by every proxy.
pub struct Handover {
    path: PathBuf,
    pause: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
    /// `None` once collected: a connection paused later is closed.
    parcels: Mutex<Option<Vec<(Handed, Fds)>>>,
    next_id: AtomicU64,
}

/// Who took a leaving process's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// The new process, started beside this one (a rolling update).
    NewProcess,
    /// The CNI agent's hold ([`crate::upgrade::hold`]), until the new process is ready (a restart).
    Holder,
}

/// What [`Handover::leave`] did.
#[derive(Debug)]
pub struct Left {
    /// Who took the connections.
    pub to: To,
    /// Connections the new process took.
    pub taken: usize,
    /// Connections it did not take (closed).
    pub kept: usize,
    /// Connections still pausing when the collection ended (closed when they finish).
    pub late: usize,
    /// Why the hand-over stopped early, if it did.
    pub error: Option<transfer::Error>,
}

/// A resumable connection, counted by the hand-over while it lives (its copy, its re-dial or its wait).
pub struct Enlisted(Arc<Handover>);

impl Drop for Enlisted {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A pause that never comes: the signal of a process without a hand-over.
static NEVER: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::channel(false).0);

impl Handover {
    /// A hand-over through the socket at `path` (the new process listens there, the old one connects).
    pub fn new(path: PathBuf) -> Arc<Handover> {
        Arc::new(Handover {
            path,
            pause: watch::channel(false).0,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            parcels: Mutex::new(Some(Vec::new())),
            next_id: AtomicU64::new(0),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands this process's resumable connections to the new process listening on the socket. Returns
    /// once every one is handed over or closed. An error when no new process is there: then nothing was
    /// paused, and the connections drain as they would without a hand-over.
    pub async fn leave(&self) -> Result<Left, Error> {
        let (sender, to) = match Sender::connect(&self.path).await {
            Ok(s) => (s, To::NewProcess),
            // No new process yet (a restart, not a rolling update): the CNI agent holds them for it.
            Err(source) => {
                match Sender::connect(&crate::upgrade::hold::path_beside(&self.path)).await {
                    Ok(s) => (s, To::Holder),
                    Err(_) => {
                        return Err(Error::NoSuccessor {
                            path: self.path.clone(),
                            source,
                        })
                    }
                }
            }
        };
        self.pause.send_replace(true);
        let deadline = tokio::time::Instant::now() + COLLECT_WAIT;
        loop {
            let idle = self.idle.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        let late = self.active.load(Ordering::Acquire);
        let parcels = self.parcels.lock().take().unwrap_or_default();
        let report = sender.send(parcels).await;
        Ok(Left {
            to,
            taken: report.taken.len(),
            kept: report.kept.len(),
            late,
            error: report.error,
        })
    }

    fn enlist(self: &Arc<Self>) -> Enlisted {
        self.active.fetch_add(1, Ordering::AcqRel);
        Enlisted(self.clone())
    }

    /// Leaves a paused connection for the new process; `false` (and the socket closed) when the
    /// collection is over.
    fn deliver(&self, mut handed: Handed, fds: Fds) -> bool {
        handed.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match self.parcels.lock().as_mut() {
            Some(parcels) => {
                parcels.push((handed, fds));
                true
            }
            None => false,
        }
    }
}

/// A proxy's place in the process's hand-over: the hand-over, and the pod its connections are for.
#[derive(Clone)]
pub struct Slot {
    /// The process's hand-over.
    pub handover: Arc<Handover>,
    /// The pod's key (its uid in shared mode): the new process gives the connection to the proxy it
    /// names.
    pub pod: String,
}

/// The tunnel side of a handed connection: what its `resume` bytes hold. A prost message written by
/// hand (field tags are the format), so a later version may add fields this one skips.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Resume {
    /// The stream's token (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub token: Vec<u8>,
    /// `Progress::export`'s state.
    #[prost(bytes = "vec", tag = "2")]
    pub progress: Vec<u8>,
    /// The CONNECT's `:authority`.
    #[prost(string, tag = "3")]
    pub authority: String,
    /// Inbound: the HBONE connection's local address (the pod's :15008).
    #[prost(string, tag = "4")]
    pub local: String,
    /// Outbound: the identities the server may present.
    #[prost(string, repeated, tag = "5")]
    pub expected: Vec<String>,
    /// Outbound: the addressed service, `namespace/hostname` (metrics labels).
    #[prost(string, tag = "6")]
    pub service: String,
    /// When the connection opened, in milliseconds since the Unix epoch (its access line's duration).
    #[prost(uint64, tag = "7")]
    pub opened_ms: u64,
    /// Plain TCP (the record's second socket): its copy's half-close state. No token, no progress.
    #[prost(message, optional, tag = "8")]
    pub plain: Option<PlainState>,
    /// Outbound double HBONE: the gateway's side (`peer` is the gateway's address; `authority` is then
    /// `hostname:port`, which a receiver without this field cannot parse as an address, and `expected`
    /// the far node proxy's identities).
    #[prost(message, optional, tag = "9")]
    pub double: Option<DoubleState>,
}

/// The outer hop of a handed double-HBONE connection.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub(super) struct DoubleState {
    /// The identities the gateway may present (the outer tunnel's check).
    #[prost(string, repeated, tag = "1")]
    pub gateway_expected: Vec<String>,
    /// The gateway workload's network.
    #[prost(string, tag = "2")]
    pub gateway_network: String,
}

/// A plain TCP connection's half-close state, each way (`proxy::plain::State` less the bytes, which
/// travel as `to_app` and `to_peer`). The initiator is the app outbound and the client inbound.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub(super) struct PlainState {
    /// The initiator said EOF.
    #[prost(bool, tag = "1")]
    pub initiator_eof: bool,
    /// That EOF was passed on to the server (its write side shut down).
    #[prost(bool, tag = "2")]
    pub server_shut: bool,
    /// The server said EOF.
    #[prost(bool, tag = "3")]
    pub server_eof: bool,
    /// That EOF was passed on to the initiator.
    #[prost(bool, tag = "4")]
    pub initiator_shut: bool,
}

impl Resume {
    pub(super) fn token(&self) -> Option<Token> {
        Some(Token::from_bytes(self.token.as_slice().try_into().ok()?))
    }

    /// `opened_ms` for a connection that opened at `start`.
    pub(super) fn opened_at(start: Instant) -> u64 {
        let opened = SystemTime::now()
            .checked_sub(start.elapsed())
            .unwrap_or(UNIX_EPOCH);
        opened
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// When the connection opened, on this process's clock (now, when that is unknown or in the future).
    pub(super) fn opened(&self) -> Instant {
        let age = UNIX_EPOCH
            .checked_add(Duration::from_millis(self.opened_ms))
            .and_then(|opened| SystemTime::now().duration_since(opened).ok())
            .unwrap_or(Duration::ZERO);
        Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
    }
}

/// A paused connection's parts, as its side of the proxy gathered them.
pub(super) struct Paused<'a> {
    pub direction: Direction,
    pub app: TcpStream,
    pub original_dst: SocketAddr,
    pub peer: SocketAddr,
    pub peer_identity: &'a Identity,
    pub progress: &'a Progress,
    pub resume: Resume,
}

/// A paused plain TCP connection's parts: its two sockets and its copy's state.
pub(super) struct PausedPlain {
    /// Outbound: the app is the initiator and the peer the server; inbound, the other way round.
    pub direction: Direction,
    /// The socket to the pod's app.
    pub app: TcpStream,
    /// The socket to the peer (outbound, the upstream; inbound, the client).
    pub peer_socket: TcpStream,
    pub original_dst: SocketAddr,
    pub peer: SocketAddr,
    pub state: super::plain::State,
    /// Outbound: the addressed service, `namespace/hostname` (metrics labels).
    pub service: String,
    pub opened: Instant,
}

/// Which of a plain connection's sides is the app's: the initiator outbound, the server inbound.
fn app_is_initiator(direction: Direction) -> bool {
    direction == Direction::Outbound
}

impl Proxy {
    /// The pause signal resumable and plain connections watch (true: hand over).
    pub(super) fn pause(&self) -> watch::Receiver<bool> {
        match &self.inputs.handover {
            Some(slot) => slot.handover.pause.subscribe(),
            None => NEVER.subscribe(),
        }
    }

    /// Whether a paused connection may still be left for the new process: the hand-over has not been
    /// sent yet. A plain connection paused later (its set-up ended after the collection) carries on here
    /// and drains as it would without a hand-over, rather than being closed.
    pub(super) fn collecting(&self) -> bool {
        self.inputs
            .handover
            .as_ref()
            .is_some_and(|slot| slot.handover.parcels.lock().is_some())
    }

    /// A pause signal that never turns true: a plain copy's, once it is too late to move.
    pub(super) fn never_paused() -> watch::Receiver<bool> {
        NEVER.subscribe()
    }

    /// Counts a resumable or plain connection in the process's hand-over, if it has one.
    pub(super) fn enlist(&self) -> Option<Enlisted> {
        self.inputs.handover.as_ref().map(|s| s.handover.enlist())
    }

    /// Leaves a paused connection for the new process (or closes it when that is not possible), logging
    /// which.
    pub(super) fn hand_over(&self, paused: Paused<'_>) {
        let Some(slot) = &self.inputs.handover else {
            return;
        };
        let exported = paused.progress.export();
        let mut resume = paused.resume;
        resume.progress = exported.state.to_vec();
        let handed = Handed {
            id: 0,
            pod: slot.pod.clone(),
            direction: paused.direction,
            original_dst: paused.original_dst,
            peer: paused.peer,
            peer_identity: paused.peer_identity.to_string(),
            to_app: exported.unwritten.to_vec(),
            to_peer: exported.unacked,
            resume: resume.encode_to_vec(),
        };
        let (direction, peer) = (handed.direction, handed.peer);
        if let Err(e) = handed.check() {
            tracing::warn!(?direction, %peer, error = %e, "connection closed: it cannot be handed over");
            return;
        }
        let fd = match paused.app.into_std() {
            Ok(s) => OwnedFd::from(s),
            Err(e) => {
                tracing::warn!(?direction, %peer, error = %e, "connection closed: its socket could not be taken off the runtime");
                return;
            }
        };
        deliver(slot, handed, fd.into());
    }

    /// Leaves a paused plain TCP connection (both its sockets) for the new process, or closes it when that
    /// is not possible, logging which.
    pub(super) fn hand_over_plain(&self, paused: PausedPlain) {
        let Some(slot) = &self.inputs.handover else {
            return;
        };
        let super::plain::State {
            to_server,
            to_initiator,
        } = paused.state;
        let plain = PlainState {
            initiator_eof: to_server.eof,
            server_shut: to_server.shut,
            server_eof: to_initiator.eof,
            initiator_shut: to_initiator.shut,
        };
        let (to_app, to_peer) = if app_is_initiator(paused.direction) {
            (to_initiator.pending, to_server.pending)
        } else {
            (to_server.pending, to_initiator.pending)
        };
        let resume = Resume {
            service: paused.service,
            opened_ms: Resume::opened_at(paused.opened),
            plain: Some(plain),
            ..Resume::default()
        };
        let handed = Handed {
            id: 0,
            pod: slot.pod.clone(),
            direction: paused.direction,
            original_dst: paused.original_dst,
            peer: paused.peer,
            peer_identity: String::new(),
            to_app,
            to_peer,
            resume: resume.encode_to_vec(),
        };
        let (direction, peer) = (handed.direction, handed.peer);
        if let Err(e) = handed.check() {
            tracing::warn!(?direction, %peer, error = %e, "plain connection closed: it cannot be handed over");
            return;
        }
        let fds = match (paused.app.into_std(), paused.peer_socket.into_std()) {
            (Ok(app), Ok(peer)) => Fds {
                app: OwnedFd::from(app),
                peer: Some(OwnedFd::from(peer)),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(?direction, %peer, error = %e, "plain connection closed: its sockets could not be taken off the runtime");
                return;
            }
        };
        deliver(slot, handed, fds);
    }
}

/// Leaves `handed` for the new process, logging whether it is (or was closed instead).
fn deliver(slot: &Slot, handed: Handed, fds: Fds) {
    let (direction, peer, plain) = (handed.direction, handed.peer, fds.peer.is_some());
    if slot.handover.deliver(handed, fds) {
        tracing::debug!(?direction, %peer, plain, "connection paused for the hand-over");
    } else {
        tracing::warn!(?direction, %peer, plain, "connection closed: paused after the hand-over was sent");
    }
}

/// A handed-over connection, decoded.
pub(super) struct Adopted {
    pub app: TcpStream,
    pub original_dst: SocketAddr,
    pub peer: SocketAddr,
    pub peer_identity: Identity,
    pub token: Token,
    pub progress: Progress,
    pub resume: Resume,
}

impl Adopted {
    /// A handed-over connection's parts, checked: its state decodes and fits, its socket goes on the
    /// runtime.
    pub(super) fn decode(handed: Handed, fd: OwnedFd) -> Result<Adopted, String> {
        let resume =
            Resume::decode(handed.resume.as_slice()).map_err(|e| format!("resume state: {e}"))?;
        let token = resume
            .token()
            .ok_or("resume state: a token of another length")?;
        let progress = Progress::import(&handed.to_peer, &handed.to_app, &resume.progress)
            .map_err(|e| format!("resume state: {e}"))?;
        let peer_identity: Identity = handed
            .peer_identity
            .parse()
            .map_err(|e| format!("peer identity {:?}: {e}", handed.peer_identity))?;
        let app = on_runtime(fd).map_err(|e| format!("app socket: {e}"))?;
        Ok(Adopted {
            app,
            original_dst: handed.original_dst,
            peer: handed.peer,
            peer_identity,
            token,
            progress,
            resume,
        })
    }
}

/// A handed-over plain TCP connection, decoded.
pub(super) struct AdoptedPlain {
    /// The socket to the pod's app.
    pub app: TcpStream,
    /// The socket to the peer.
    pub peer_socket: TcpStream,
    pub original_dst: SocketAddr,
    pub peer: SocketAddr,
    /// The copy, carrying on from the old one's state (initiator and server as for [`PausedPlain`]).
    pub copy: super::plain::Pausable,
    pub resume: Resume,
}

impl AdoptedPlain {
    /// A handed-over plain connection's parts, checked: its state decodes and is one a copy could have
    /// exported; its sockets go on the runtime.
    pub(super) fn decode(
        handed: Handed,
        app: OwnedFd,
        peer_socket: OwnedFd,
    ) -> Result<AdoptedPlain, String> {
        let resume =
            Resume::decode(handed.resume.as_slice()).map_err(|e| format!("plain state: {e}"))?;
        let plain = resume
            .plain
            .ok_or("plain state: a second socket, but no half-close state")?;
        let (to_initiator, to_server) = if app_is_initiator(handed.direction) {
            (handed.to_app, handed.to_peer)
        } else {
            (handed.to_peer, handed.to_app)
        };
        let state = super::plain::State {
            to_server: super::plain::Half {
                pending: to_server,
                eof: plain.initiator_eof,
                shut: plain.server_shut,
            },
            to_initiator: super::plain::Half {
                pending: to_initiator,
                eof: plain.server_eof,
                shut: plain.initiator_shut,
            },
        };
        let copy =
            super::plain::Pausable::resume(&state).map_err(|e| format!("plain state: {e}"))?;
        Ok(AdoptedPlain {
            app: on_runtime(app).map_err(|e| format!("app socket: {e}"))?,
            peer_socket: on_runtime(peer_socket).map_err(|e| format!("peer socket: {e}"))?,
            original_dst: handed.original_dst,
            peer: handed.peer,
            copy,
            resume,
        })
    }
}

/// A handed-over socket, non-blocking and registered with the runtime.
fn on_runtime(fd: OwnedFd) -> std::io::Result<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

/// Listens on the hand-over socket at `path` and gives each connection handed over to the proxy
/// `find` names for its pod, until `shutdown`. Errors only when the socket cannot be listened on.
pub async fn arrive<F>(
    path: &Path,
    find: F,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error>
where
    F: Fn(&str) -> Option<Arc<Proxy>>,
{
    let receiver = Receiver::bind(path).map_err(|source| Error::Listen {
        path: path.to_path_buf(),
        source,
    })?;
    tracing::info!(path = %path.display(), "taking connections handed over on this socket");
    loop {
        let received = tokio::select! {
            r = receiver.accept_all() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (mut adopted, mut orphans) = (0usize, 0usize);
        for (handed, fds) in received.conns {
            match find(&handed.pod) {
                Some(proxy) => {
                    adopted += 1;
                    tokio::spawn(proxy.adopt(handed, fds));
                }
                None => {
                    orphans += 1;
                    tracing::warn!(pod = %handed.pod, peer = %handed.peer, "handed-over connection closed: this process does not serve its pod");
                }
            }
        }
        match received.error {
            None => tracing::info!(
                adopted,
                orphans,
                packets = received.packets,
                "connections handed over"
            ),
            Some(e) => tracing::warn!(adopted, orphans, error = %e, "hand-over ended early"),
        }
        // Thousands of adoptions at once peak well above what the connections keep (each re-dial's and
        // check's state, the records): give that back once they have settled, not at the allocator's
        // decay time.
        tokio::spawn(async {
            tokio::time::sleep(SETTLE).await;
            let _ = tokio::task::spawn_blocking(crate::allocator::release_freed).await;
        });
    }
    // Stop listening before leaving ourselves: our own hand-over must not come back to us.
    drop(receiver);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_state_survives_its_trip_with_the_connections_age() {
        let opened = Instant::now() - Duration::from_secs(90);
        let token = Token::random();
        let resume = Resume {
            token: token.to_bytes().to_vec(),
            progress: vec![1; 22],
            authority: "10.0.0.1:8080".into(),
            local: "10.0.0.1:15008".into(),
            expected: vec!["spiffe://cluster.local/ns/a/sa/b".into()],
            service: "default/reviews.default.svc.cluster.local".into(),
            opened_ms: Resume::opened_at(opened),
            plain: Some(PlainState {
                initiator_eof: true,
                server_shut: true,
                server_eof: false,
                initiator_shut: false,
            }),
            double: Some(DoubleState {
                gateway_expected: vec!["spiffe://cluster.local/ns/istio-system/sa/gw".into()],
                gateway_network: "net2".into(),
            }),
        };
        let back = Resume::decode(resume.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, resume);
        assert_eq!(back.token(), Some(token));
        let age = back.opened().elapsed();
        assert!(
            age >= Duration::from_secs(89) && age < Duration::from_secs(92),
            "{age:?}"
        );
    }

    #[test]
    fn a_resume_state_from_elsewhere_is_refused_or_read_safely() {
        // A token of another length is no token.
        let short = Resume {
            token: vec![1; 15],
            ..Resume::default()
        };
        assert_eq!(short.token(), None);
        // An opening time in the future (another clock) counts as now, not as a panic.
        let future = Resume {
            opened_ms: u64::MAX,
            ..Resume::default()
        };
        assert!(future.opened().elapsed() < Duration::from_secs(1));
        // Garbage does not decode.
        assert!(Resume::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }

    #[test]
    fn a_handed_over_connection_with_bad_state_is_refused_naming_what_is_wrong() {
        let good = Resume {
            token: Token::random().to_bytes().to_vec(),
            progress: Progress::new(1024).export().state.to_vec(),
            ..Resume::default()
        };
        let handed = |resume: &Resume, identity: &str| Handed {
            id: 0,
            pod: "uid".into(),
            direction: Direction::Inbound,
            original_dst: "10.0.0.1:8080".parse().unwrap(),
            peer: "10.0.0.2:40000".parse().unwrap(),
            peer_identity: identity.into(),
            to_app: Vec::new(),
            to_peer: Vec::new(),
            resume: resume.encode_to_vec(),
        };
        let fd = || OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let id = "spiffe://cluster.local/ns/a/sa/b";
        let short_token = Resume {
            token: vec![1; 15],
            ..good.clone()
        };
        let bad_counts = Resume {
            progress: vec![9; 3],
            ..good.clone()
        };
        for (h, want) in [
            (handed(&short_token, id), "a token of another length"),
            (handed(&bad_counts, id), "resume state"),
            (handed(&good, "not a spiffe id"), "peer identity"),
        ] {
            let Err(e) = Adopted::decode(h, fd()) else {
                panic!("accepted: {want}");
            };
            assert!(e.contains(want), "{e}");
        }
        let mut garbage = handed(&good, id);
        garbage.resume = vec![0xff; 3];
        let Err(e) = Adopted::decode(garbage, fd()) else {
            panic!("accepted garbage");
        };
        assert!(e.starts_with("resume state"), "{e}");
    }

    #[test]
    fn a_plain_state_maps_to_the_copy_by_direction_and_a_bad_one_is_refused() {
        let handed = |direction, plain: Option<PlainState>| Handed {
            id: 0,
            pod: "uid".into(),
            direction,
            original_dst: "10.0.0.1:8080".parse().unwrap(),
            peer: "10.0.0.2:40000".parse().unwrap(),
            peer_identity: String::new(),
            to_app: b"for the app".to_vec(),
            to_peer: b"for the peer".to_vec(),
            resume: Resume {
                plain,
                ..Resume::default()
            }
            .encode_to_vec(),
        };
        let fd = || OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let half_closed = PlainState {
            initiator_eof: true,
            server_shut: false,
            server_eof: false,
            initiator_shut: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = rt.enter();
        // Outbound the app is the initiator: its bytes are the server's (the peer's) to receive.
        for (direction, to_server, to_initiator) in [
            (
                Direction::Outbound,
                &b"for the peer"[..],
                &b"for the app"[..],
            ),
            (
                Direction::Inbound,
                &b"for the app"[..],
                &b"for the peer"[..],
            ),
        ] {
            let Ok(a) = AdoptedPlain::decode(handed(direction, Some(half_closed)), fd(), fd())
            else {
                panic!("{direction:?} refused");
            };
            let state = a.copy.export();
            assert_eq!(state.to_server.pending, to_server, "{direction:?}");
            assert_eq!(state.to_initiator.pending, to_initiator, "{direction:?}");
            assert!(
                state.to_server.eof && !state.to_server.shut,
                "{direction:?}"
            );
            assert!(!state.to_initiator.eof, "{direction:?}");
        }
        let Err(e) = AdoptedPlain::decode(handed(Direction::Outbound, None), fd(), fd()) else {
            panic!("accepted without a half-close state");
        };
        assert!(e.contains("no half-close state"), "{e}");
        // An EOF passed on with bytes still waiting before it: no copy exports that.
        let impossible = PlainState {
            server_shut: true,
            ..half_closed
        };
        let Err(e) =
            AdoptedPlain::decode(handed(Direction::Outbound, Some(impossible)), fd(), fd())
        else {
            panic!("accepted an impossible state");
        };
        assert!(e.contains("impossible"), "{e}");
    }
}
