//! Plaintext inbound (:15006): connections that reach the workload without HBONE (from outside the mesh).
//!
//! Input: an accepted TCP connection redirected by the capture rules. Output: the connection joined to its
//! original destination, if authorization allows a connection with no identity — so a STRICT peer
//! authentication (a DENY of identity-less sources) refuses it. Refusals reset the connection. Carried
//! connections stay registered with the proxy's [`connections`](super::connections) registry and are reset
//! if a later policy change denies them. Each connection is counted in [`metrics`](crate::metrics)
//! (reporter `destination`, `connection_security_policy` `unknown`).
//!
//! With a hand-over (`MESHNODE_HANDOVER_SOCKET`) the copy is `plain`'s pausable one: paused, the
//! connection (the client's socket and the app's, and the bytes read and not yet written) goes to the new
//! process, its record closed here without an access line. There, [`Proxy::adopt_plain_inbound`] checks it
//! again as a new connection is checked (registered, then the current policy; a connection it denies is
//! closed as a policy change closes one), opens a new record, and carries on with the copy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::Either;
use tokio::net::TcpStream;

use super::access::{self, Access};
use super::connections::{Counted, Registration, Side, Tracked};
use super::handover::{AdoptedPlain, PausedPlain};
use super::plain::{Outcome, Pausable};
use super::{Error, Proxy};
use crate::authz::{Connection, Decision};
use crate::metrics::{ConnectionRecord, Reporter, ResponseFlags, TrafficLabels};
use crate::socket;
use crate::state::Workload;
use crate::upgrade::handover::Direction;

/// How a carried connection ended.
enum Ended {
    /// The copy finished, cleanly or not.
    Copied(std::io::Result<()>),
    /// A policy change denied it.
    Closed(crate::authz::DenyReason),
    /// Paused for the hand-over to a new process.
    Paused,
}

/// Who and where a plaintext connection is between, for its access line.
struct Ends {
    peer: SocketAddr,
    dst: SocketAddr,
    start: Instant,
    src_workload: Option<Arc<Workload>>,
    workload: Arc<Workload>,
}

impl Ends {
    fn access(&self) -> Access<'_> {
        Access {
            reporter: Reporter::destination,
            src: self.peer,
            src_workload: self.src_workload.as_deref(),
            dst: self.dst,
            hbone_addr: None,
            dst_workload: Some(&self.workload),
            start: self.start,
            resumable: None,
        }
    }
}

/// A plaintext connection past its checks, for the copy.
struct Carried {
    /// The client's socket.
    stream: TcpStream,
    /// The socket to the pod's app.
    up: TcpStream,
    ends: Ends,
    record: ConnectionRecord,
    registration: Registration,
}

impl Proxy {
    /// The pod's policies for a plaintext connection from `peer` to `dst` (no identity), as they are now.
    fn plaintext_decision(
        &self,
        peer: SocketAddr,
        dst: SocketAddr,
        workload: &Workload,
    ) -> Decision {
        let conn = Connection {
            src: peer,
            dst,
            src_identity: None,
            dst_network: &self.cfg().network,
        };
        self.inputs.state.load().policies().check(
            &workload.namespace,
            &workload.authorization_policies,
            &conn,
        )
    }

    /// A plaintext connection's metrics record (labelled from the client's workload, when the address is
    /// one's, and the service of `dst`'s port) and its ends, for the access line.
    fn open_record(
        &self,
        peer: SocketAddr,
        dst: SocketAddr,
        start: Instant,
        workload: Arc<Workload>,
    ) -> (ConnectionRecord, Ends) {
        let state = self.inputs.state.load();
        let src_workload = state
            .workload_by_addr(&self.cfg().network, peer.ip())
            .cloned();
        let labels = TrafficLabels::new(
            Reporter::destination,
            src_workload.as_deref(),
            None,
            Some(&workload),
            super::service_for(&state, &workload, dst.port()).as_deref(),
        );
        let record = self.metrics().open(labels);
        let ends = Ends {
            peer,
            dst,
            start,
            src_workload,
            workload,
        };
        (record, ends)
    }

    /// Handles one connection accepted on :15006.
    pub(super) async fn inbound_plaintext(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        match socket::original_dst(&stream) {
            Ok(dst) => self.inbound_plaintext_to(stream, peer, dst).await,
            Err(e) => {
                socket::reset_on_close(&stream);
                access::failed(Reporter::destination, peer, None, &Error::OriginalDst(e));
            }
        }
    }

    /// Carries plaintext `stream` from `peer` to `dst` (its original destination) if authorization allows.
    /// Public so that embedders and tests can hand over connections they captured some other way.
    ///
    /// The set-up (checks, the connection to the app) is a boxed future that lives on the heap only while
    /// it runs; the copy holds only what it needs (as outbound's `carry`).
    pub fn inbound_plaintext_to(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let opening = Box::pin(self.clone().open_plaintext(stream, peer, dst));
        async move {
            // Built in a statement of its own, so the set-up's result is not held while copying.
            let copying = match opening.await {
                Some(c) if self.inputs.handover.is_some() => {
                    Either::Left(self.carry_pausable(c, Pausable::new()))
                }
                Some(c) => Either::Right(self.carry_plaintext(c)),
                None => return,
            };
            copying.await;
        }
    }

    /// [`Proxy::inbound_plaintext_to`]'s set-up: the checks and the connection to the app; `None` when it
    /// was refused (reset, logged).
    async fn open_plaintext(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Option<Carried> {
        let start = Instant::now();
        // A reset, not a clean close: the client learns at once that it was refused.
        let early = |stream: &TcpStream, e: &Error| {
            socket::reset_on_close(stream);
            access::failed(Reporter::destination, peer, Some(dst), e);
        };
        if self.cfg().ports.illegal().contains(&dst.port()) {
            early(&stream, &Error::SelfCall(dst));
            return None;
        }
        let workload = match self.local_workload().await {
            Ok(w) => w,
            Err(e) => {
                early(&stream, &e);
                return None;
            }
        };
        let (record, ends) = self.open_record(peer, dst, start, workload);
        let workload = &ends.workload;
        let access = ends.access();
        let refused = |stream: &TcpStream, record, flags, e: &Error| {
            socket::reset_on_close(stream);
            access.close(record, flags, 0, 0, Some(e));
        };
        // Registered before the check, so a policy change between the two is never missed.
        let registration = match self.conns.register(Tracked {
            src: peer,
            dst,
            src_identity: None,
            workload: workload.clone(),
        }) {
            Ok(r) => r,
            Err(full) => {
                let e = Error::Io(std::io::Error::other(full));
                refused(&stream, record, ResponseFlags::Connect, &e);
                return None;
            }
        };
        if let Decision::Deny(reason) = self.plaintext_decision(peer, dst, workload) {
            refused(&stream, record, ResponseFlags::Deny, &Error::Denied(reason));
            return None;
        }
        let src_ip: Option<IpAddr> = self.inputs.orig_src.then_some(peer.ip());
        let up = match socket::connect(
            self.inputs.netns.as_deref(),
            dst,
            src_ip,
            self.upstream_opts(),
            &self.cfg().keepalive,
            self.cfg().connect_timeout,
        )
        .await
        {
            Ok(up) => up,
            Err(source) => {
                let e = Error::Connect { dst, source };
                refused(&stream, record, ResponseFlags::Connect, &e);
                return None;
            }
        };
        Some(Carried {
            stream,
            up,
            ends,
            record,
            registration,
        })
    }

    /// Copies `c` with `copy_bidirectional` until it ends or a policy change closes it (no hand-over).
    /// Taken apart before the future, so the future holds each part once.
    fn carry_plaintext(&self, c: Carried) -> impl std::future::Future<Output = ()> + Send + '_ {
        let Carried {
            mut stream,
            up,
            ends,
            mut record,
            mut registration,
        } = c;
        async move {
            let live = record.live_bytes();
            let mut up = Counted::facing(up, Side::Server, live.as_ref());
            let ended = tokio::select! {
                res = tokio::io::copy_bidirectional(&mut stream, &mut up) => Ended::Copied(res.map(|_| ())),
                reason = registration.closed() => Ended::Closed(reason),
            };
            let (received, sent) = (up.written, up.read);
            ended_as(ended, &ends.access(), record, &stream, received, sent);
        }
    }

    /// Copies `c` with the pausable copy `copy` until it ends, a policy change closes it, or the process
    /// hands it over (enlisted meanwhile, so the hand-over waits for it to pause). Taken apart before the
    /// future, as [`Proxy::carry_plaintext`].
    fn carry_pausable(
        &self,
        c: Carried,
        mut copy: Pausable,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        let Carried {
            mut stream,
            up,
            ends,
            mut record,
            mut registration,
        } = c;
        let enlisted = self.enlist();
        let mut pause = self.pause();
        async move {
            let live = record.live_bytes();
            let mut up = Counted::facing(up, Side::Server, live.as_ref());
            let copied = async {
                loop {
                    match copy.run(&mut stream, &mut up, &mut pause).await {
                        Outcome::Done(res) => return Ended::Copied(res),
                        // Too late to move (the hand-over was sent): carry on here, drain as before.
                        Outcome::Paused if !self.collecting() => pause = Proxy::never_paused(),
                        Outcome::Paused => return Ended::Paused,
                    }
                }
            };
            let ended = tokio::select! {
                ended = copied => ended,
                reason = registration.closed() => Ended::Closed(reason),
            };
            let (received, sent) = (up.written, up.read);
            if let Ended::Paused = ended {
                drop(registration);
                self.hand_over_plain(PausedPlain {
                    direction: Direction::Inbound,
                    app: up.into_inner(),
                    peer_socket: stream,
                    original_dst: ends.dst,
                    peer: ends.peer,
                    state: copy.export(),
                    service: String::new(),
                    opened: ends.start,
                });
                record.close(ResponseFlags::None, received, sent);
            } else {
                ended_as(ended, &ends.access(), record, &stream, received, sent);
            }
            // Counted until handed over or closed.
            drop(enlisted);
        }
    }

    /// Takes over a plaintext connection the process this one replaces handed over (both its sockets):
    /// checked as a new one is (registered, then the current policy: one it denies is closed, as a policy
    /// change closes it), counted in a new record, then carried on by the pausable copy from the state the
    /// old one exported. Its access line covers its whole life (`opened_ms`).
    pub(super) fn adopt_plain_inbound(
        self: Arc<Self>,
        a: AdoptedPlain,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        // The checks live on the heap only while they run: the copy holds only what it needs.
        let checking = Box::pin(self.clone().admit_adopted_plaintext(a));
        async move {
            // Built in a statement of its own, so the checks' result is not held while copying.
            let copying = match checking.await? {
                Some((carried, copy)) => self.carry_pausable(carried, copy),
                None => return Ok(()),
            };
            copying.await;
            Ok(())
        }
    }

    /// [`Proxy::adopt_plain_inbound`]'s checks: the connection and its copy, or `None` when it was refused
    /// (logged).
    async fn admit_adopted_plaintext(
        self: Arc<Self>,
        a: AdoptedPlain,
    ) -> Result<Option<(Carried, Pausable)>, String> {
        let copy = a.copy;
        let start = a.resume.opened();
        let (peer, dst, stream) = (a.peer, a.original_dst, a.peer_socket);
        let workload = self.local_workload().await.map_err(|e| e.to_string())?;
        let (record, ends) = self.open_record(peer, dst, start, workload);
        let workload = &ends.workload;
        let access = ends.access();
        let registration = match self.conns.register(Tracked {
            src: peer,
            dst,
            src_identity: None,
            workload: workload.clone(),
        }) {
            Ok(r) => r,
            Err(full) => {
                socket::reset_on_close(&stream);
                let e = format_args!("handed over, then refused here: {full}");
                access.close(record, ResponseFlags::Connect, 0, 0, Some(&e));
                return Ok(None);
            }
        };
        if let Decision::Deny(reason) = self.plaintext_decision(peer, dst, workload) {
            socket::reset_on_close(&stream);
            let e = format_args!("connection closed due to policy change: {reason}");
            access.close(record, ResponseFlags::Deny, 0, 0, Some(&e));
            return Ok(None);
        }
        let carried = Carried {
            stream,
            up: a.app,
            ends,
            record,
            registration,
        };
        Ok(Some((carried, copy)))
    }
}

/// Logs how a carried connection ended (not paused) and closes its record: the copy's result, or a reset
/// for a policy change.
fn ended_as(
    ended: Ended,
    access: &Access<'_>,
    record: ConnectionRecord,
    stream: &TcpStream,
    received: u64,
    sent: u64,
) {
    match ended {
        Ended::Copied(res) => access.copied(record, received, sent, res),
        Ended::Closed(reason) => {
            socket::reset_on_close(stream);
            let error = format_args!("connection closed due to policy change: {reason}");
            access.close(record, ResponseFlags::Deny, received, sent, Some(&error));
        }
        Ended::Paused => record.close(ResponseFlags::None, received, sent),
    }
}
