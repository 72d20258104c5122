//! Outbound: connections the workload makes, captured on :15001, carried to their destination.
//!
//! Input: an accepted TCP connection and its original destination (`SO_ORIGINAL_DST`). Output: the
//! connection joined to its upstream — through a pooled HBONE tunnel when the destination workload speaks
//! HBONE, plain TCP when it does not, and plain TCP to the original address when the destination is not in
//! the mesh (passthrough). Routing follows ztunnel's order:
//! 1. a service VIP whose service names a waypoint (a weighted pick among `weighted_waypoints`, else
//!    `waypoint`) goes over HBONE to that waypoint, CONNECT `:authority` = the VIP and port the
//!    application dialled, the waypoint workload's identity expected; workload waypoints are not
//!    consulted for service-addressed traffic;
//! 2. any other service VIP is load-balanced to an endpoint (none healthy: refused; passthrough services
//!    go to the original destination);
//! 3. a workload address whose workload names a waypoint goes to that waypoint (`:authority` = the pod
//!    address and port), unless the connection comes from that very waypoint (its identity, from one of
//!    its addresses): then, like any other workload address, directly to the workload.
//!
//! Fail closed: a waypoint that is missing from the state, unresolvable, without a usable address, or
//! that cannot be reached over HBONE refuses the connection (closed, a warning naming the service or
//! workload and the waypoint, `meshnode_waypoint_unavailable_total`); it is never sent direct.
//!
//! Each routed connection is counted in [`metrics`](crate::metrics) with `reporter="source"`: the source is
//! this proxy's workload (its identity as `source_principal`, and `mutual_tls`, only for HBONE, as
//! ztunnel does), the destination the resolved workload and service (`unknown` for passthrough; for a
//! waypoint hop the waypoint workload with the service the application addressed). The
//! connection counts as opened once routed; `response_flags` is `CONNECT` when the upstream connection or
//! the tunnel (certificate, TLS, CONNECT answer) could not be established, `-` otherwise. Bytes are counted
//! into plain integers by the copy and added at close. With a hand-over (`MESHNODE_HANDOVER_SOCKET`),
//! a plain TCP connection is copied by `plain`'s pausable copy and, paused, handed to the new process with
//! both its sockets (its record closed here, no access line; [`Proxy::adopt_plain_outbound`] opens a new
//! one there). Connections refused before routing (self-calls, the
//! local workload unknown, no healthy endpoint, an unusable waypoint) are logged but not counted there, as
//! in ztunnel.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Uri, Version};
use rand::seq::IndexedRandom;
use rand::Rng;
use tokio::net::TcpStream;

use super::access::{self, Access};
use super::connections::{Counted, Listing, Side};
use super::handover::{Adopted, AdoptedPlain, Enlisted, PausedPlain};
use super::plain::{Outcome, Pausable};
use super::resumable::Ended;
use super::{Error, Proxy, WaypointProblem, WaypointRefusal};
use crate::hbone::copy;
use crate::hbone::pool::{self, PoolKey};
use crate::hbone::resume::copy::Progress;
use crate::hbone::resume::{Token, DEFAULT_WINDOW, RESUME_HEADER};
use crate::identity::Identity;
use crate::metrics::{ConnectionRecord, Reporter, ResponseFlags, TrafficLabels, WaypointBinding};
use crate::socket;
use crate::state::waypoint::SourceAddr;
use crate::state::{
    GatewayAddress, LbMode, Protocol, Service, State, Upstream, WaypointError, Workload,
};

/// Where an outbound connection goes.
#[derive(Debug)]
enum Route {
    /// HBONE to the upstream's proxy.
    Hbone(Upstream),
    /// Double HBONE through the east-west gateway of the destination's network.
    Double(DoubleHop),
    /// Plain TCP to a mesh workload that does not speak HBONE.
    Tcp(Upstream),
    /// Plain TCP to an address outside the mesh.
    Passthrough(SocketAddr),
    /// HBONE to the waypoint the destination names.
    Waypoint(WaypointHop),
}

/// A connection sent to a waypoint.
#[derive(Debug)]
struct WaypointHop {
    /// The waypoint workload; `addr` is its HBONE address.
    via: Upstream,
    /// The CONNECT `:authority`: the address the application dialled, untranslated.
    authority: SocketAddr,
    /// The service the application addressed, if any (metrics, `forwarded` host).
    service: Option<Arc<Service>>,
    /// What named the waypoint, for the refusal if the tunnel fails.
    binding: WaypointBinding,
    target: String,
    waypoint: GatewayAddress,
}

/// A connection to a service on another network, through that network's east-west gateway (ztunnel's
/// `build_request_through_gateway`).
#[derive(Debug)]
struct DoubleHop {
    /// The gateway workload; `addr` is its HBONE address, `expected_identities` its identity and its
    /// service's alt names (the outer tunnel's check).
    gateway: Upstream,
    /// What the application addressed: the service hostname and port, both tunnels' `:authority`.
    authority: Authority,
    /// Who may end the inner tunnel (its own check, made through the gateway).
    inner_expected: Vec<Identity>,
}

/// A CONNECT `:authority`: an address, or (double HBONE) a service hostname and port.
#[derive(Debug, Clone)]
enum Authority {
    Addr(SocketAddr),
    Host(Arc<Service>, u16),
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authority::Addr(a) => a.fmt(f),
            Authority::Host(svc, port) => write!(f, "{}:{port}", svc.hostname),
        }
    }
}

impl Authority {
    fn service(&self) -> Option<&Service> {
        match self {
            Authority::Addr(_) => None,
            Authority::Host(svc, _) => Some(svc),
        }
    }

    fn service_arc(&self) -> Option<Arc<Service>> {
        match self {
            Authority::Addr(_) => None,
            Authority::Host(svc, _) => Some(svc.clone()),
        }
    }
}

/// One HBONE tunnel to open: where to dial, whom to expect there, what to ask for.
struct Tunnel<'a> {
    dst: SocketAddr,
    expected: &'a [Identity],
    authority: &'a (dyn std::fmt::Display + Sync),
    service: Option<&'a Service>,
}

/// Who and where an outbound connection is between, for its access line.
struct Ends {
    peer: SocketAddr,
    src: Arc<Workload>,
    dst_workload: Option<Arc<Workload>>,
    sent_to: SocketAddr,
    /// The tunnel's `:authority` (HBONE only).
    authority: Option<Authority>,
    start: Instant,
    /// Resumable streams on and this is HBONE: whether the server took the offer.
    resumable: Option<bool>,
}

impl Ends {
    fn access(&self) -> Access<'_> {
        Access {
            reporter: Reporter::source,
            src: self.peer,
            src_workload: Some(&*self.src),
            dst: self.sent_to,
            hbone_addr: self
                .authority
                .as_ref()
                .map(|a| a as &(dyn std::fmt::Display + Sync)),
            dst_workload: self.dst_workload.as_deref(),
            start: self.start,
            resumable: self.resumable,
        }
    }
}

/// An outbound connection whose upstream is open: what the copy and the access line need, held once.
struct OpenOutbound {
    stream: TcpStream,
    ends: Ends,
    record: ConnectionRecord,
    /// Listed in the admin dump while it lives.
    _listing: Listing,
    up: Up,
}

/// The upstream side of an [`OpenOutbound`].
enum Up {
    /// Plain TCP (TCP workloads, passthrough).
    Plain(TcpStream),
    /// An HBONE stream.
    Hbone(pool::Stream),
    /// A resumable HBONE stream (the server echoed our offer); boxed, so other connections stay small.
    Resumable(pool::Stream, Box<super::resumable::Client>),
    /// Plain TCP whose copy pauses for a hand-over (the process has one); boxed, as `Resumable`.
    Movable(TcpStream, Box<Movable>),
}

/// What a plain TCP connection needs to be handed over: its copy's state (the buffers), and what the new
/// process needs besides the sockets.
struct Movable {
    copy: Pausable,
    proxy: Arc<Proxy>,
    original_dst: SocketAddr,
    /// The addressed service, `namespace/hostname` ("" for none).
    service: String,
    _enlisted: Option<Enlisted>,
}

/// How a connection's copy ended.
struct Carried {
    /// From the application (initiator).
    received: u64,
    /// To the application.
    sent: u64,
    result: Result<(), Error>,
    /// Paused for the hand-over to a new process: handed over, not closed.
    leaving: bool,
}

impl OpenOutbound {
    /// Copies both ways until both ends finish. Borrows the connection (held once, by the caller).
    async fn carry(&mut self) -> Carried {
        let live = self.record.live_bytes();
        match &mut self.up {
            Up::Plain(up) => {
                let mut up = Counted::facing(up, Side::Server, live.as_ref());
                let res = tokio::io::copy_bidirectional(&mut self.stream, &mut up).await;
                Carried {
                    received: up.written,
                    sent: up.read,
                    result: res.map(|_| ()).map_err(Error::Io),
                    leaving: false,
                }
            }
            Up::Hbone(tunnel) => {
                let (r, w) = self.stream.split();
                let (mut r, mut w) = (
                    Counted::facing(r, Side::Initiator, live.as_ref()),
                    Counted::facing(w, Side::Initiator, live.as_ref()),
                );
                let res =
                    copy::bidirectional(&mut r, &mut w, &mut tunnel.send, &mut tunnel.recv).await;
                Carried {
                    received: r.read,
                    sent: w.written,
                    result: res.map(|_| ()).map_err(Error::from),
                    leaving: false,
                }
            }
            Up::Movable(up, movable) => {
                let mut up = Counted::facing(up, Side::Server, live.as_ref());
                let mut pause = movable.proxy.pause();
                let outcome = loop {
                    match movable
                        .copy
                        .run(&mut self.stream, &mut up, &mut pause)
                        .await
                    {
                        // Too late to move (the hand-over was sent): carry on here, drain as before.
                        Outcome::Paused if !movable.proxy.collecting() => {
                            pause = Proxy::never_paused();
                        }
                        outcome => break outcome,
                    }
                };
                let (received, sent) = (up.written, up.read);
                match outcome {
                    Outcome::Done(res) => Carried {
                        received,
                        sent,
                        result: res.map_err(Error::Io),
                        leaving: false,
                    },
                    Outcome::Paused => Carried {
                        received,
                        sent,
                        result: Ok(()),
                        leaving: true,
                    },
                }
            }
            Up::Resumable(tunnel, client) => {
                let (r, w) = self.stream.split();
                let (mut r, mut w) = (
                    Counted::facing(r, Side::Initiator, live.as_ref()),
                    Counted::facing(w, Side::Initiator, live.as_ref()),
                );
                let res = Box::pin(client.carry(tunnel, &mut r, &mut w)).await;
                Carried {
                    received: r.read,
                    sent: w.written,
                    leaving: matches!(res, Ok(Ended::Leaving)),
                    result: res.map(|_| ()).map_err(Error::from),
                }
            }
        }
    }

    /// Logs the access line and records the close (the upstream and its pool slot go with `self`); or,
    /// paused for a hand-over, leaves the connection for the new process (its record closed here, opened
    /// again there).
    fn close(self, carried: Carried) {
        if carried.leaving {
            let OpenOutbound {
                stream,
                ends,
                record,
                up,
                ..
            } = self;
            match up {
                Up::Resumable(_, client) => client.hand_over(stream, ends.start),
                Up::Movable(up, movable) => movable.proxy.hand_over_plain(PausedPlain {
                    direction: crate::upgrade::handover::Direction::Outbound,
                    app: stream,
                    peer_socket: up,
                    original_dst: movable.original_dst,
                    peer: ends.sent_to,
                    state: movable.copy.export(),
                    service: movable.service.clone(),
                    opened: ends.start,
                }),
                Up::Plain(_) | Up::Hbone(_) => {}
            }
            record.close(ResponseFlags::None, carried.received, carried.sent);
            return;
        }
        self.ends
            .access()
            .copied(self.record, carried.received, carried.sent, carried.result);
    }
}

impl Proxy {
    /// Handles one connection accepted on :15001.
    pub(super) fn outbound(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        let dst = socket::original_dst(&stream).map_err(Error::OriginalDst);
        self.carry(stream, peer, dst)
    }

    /// Carries `stream` from `peer` to its original destination `dst`. Public so that embedders and tests
    /// can hand over connections they captured some other way.
    pub fn outbound_to(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.carry(stream, peer, Ok(dst))
    }

    /// The set-up (routing, the upstream or tunnel) as a boxed future that lives on the heap only while it
    /// runs, then the copy, which holds only what it needs. Not an `async fn` (nor are the two above): an
    /// `async fn`'s arguments stay in its future, so each layer would hold the socket and addresses again
    /// for as long as the connection copies.
    fn carry(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: Result<SocketAddr, Error>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let start = Instant::now();
        let opening = Box::pin(async move {
            let dst = dst.map_err(|e| (e, None))?;
            self.open_outbound(stream, peer, dst, start)
                .await
                .map_err(|e| (e, Some(dst)))
        });
        async move {
            // Bound in a statement of its own, so the set-up's result is not held while copying.
            let open = match opening.await {
                Ok(Some(open)) => open,
                Ok(None) => return,
                Err((e, dst)) => return access::failed(Reporter::source, peer, dst, &e),
            };
            let mut open = open;
            let carried = open.carry().await;
            open.close(carried);
        }
    }

    /// Routes the connection and opens its upstream (plain TCP or an HBONE tunnel). `Ok(None)`: it failed
    /// after it was counted (its access line logged); an error is a refusal before that (the caller logs it as
    /// ztunnel's early deny).
    async fn open_outbound(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        start: Instant,
    ) -> Result<Option<OpenOutbound>, Error> {
        if dst.ip().is_loopback() && self.cfg().ports.illegal().contains(&dst.port()) {
            return Err(Error::SelfCall(dst));
        }
        let src = self.local_workload().await?;
        let route = match self.route(&src, peer.ip(), dst) {
            Ok(r) => r,
            Err(e) => {
                if let Error::Waypoint(refusal) = &e {
                    self.metrics().waypoint_unavailable(&refusal.labels());
                }
                return Err(e);
            }
        };
        let route = self.resolved(route, dst).await?;
        let record = self.metrics().open(source_labels(&src, &route));
        // Where this proxy sends it, the tunnel's authority, and the workload there, for the access line.
        let (sent_to, authority, dst_workload) = match &route {
            Route::Passthrough(addr) => (*addr, None, None),
            Route::Tcp(up) => (up.addr, None, Some(up.workload.clone())),
            Route::Hbone(up) => (
                SocketAddr::new(up.addr.ip(), self.cfg().ports.inbound),
                Some(Authority::Addr(up.addr)),
                Some(up.workload.clone()),
            ),
            Route::Waypoint(hop) => (
                hop.via.addr,
                Some(Authority::Addr(hop.authority)),
                Some(hop.via.workload.clone()),
            ),
            // ztunnel names the gateway as the destination workload.
            Route::Double(hop) => (
                hop.gateway.addr,
                Some(hop.authority.clone()),
                Some(hop.gateway.workload.clone()),
            ),
        };
        let listing = self.outbound_conns.add(super::connections::Listed {
            src: peer,
            original_dst: Some(dst),
            actual_dst: sent_to,
            protocol: match &route {
                Route::Double(_) => "DOUBLEHBONE",
                _ if authority.is_some() => "HBONE",
                _ => "TCP",
            },
        });
        let resumable = (self.cfg().resumable_streams && authority.is_some()).then_some(false);
        let mut ends = Ends {
            peer,
            src,
            dst_workload,
            sent_to,
            authority,
            start,
            resumable,
        };
        // The upstream, or why it could not be opened (the access line's flags and error).
        let up = match &route {
            Route::Passthrough(addr) | Route::Tcp(Upstream { addr, .. }) => self
                .connect_plain(*addr)
                .await
                .map(|up| self.plain_up(up, dst, &route))
                .map_err(|e| (ResponseFlags::Connect, e)),
            Route::Hbone(up) => {
                let tunnel = Tunnel {
                    dst: sent_to,
                    expected: &up.expected_identities,
                    authority: &up.addr,
                    service: up.service.as_deref(),
                };
                self.open_offering(&ends.src, peer, tunnel, (up.addr, &up.service), dst)
                    .await
                    .map_err(|e| (e.response_flags(), e))
            }
            // Resumable too when the waypoint is meshnode's: the application's connection then outlives
            // an upgrade of this proxy (the waypoint keeps its side of the stream for the re-dial).
            Route::Waypoint(hop) => {
                let tunnel = Tunnel {
                    dst: hop.via.addr,
                    expected: &hop.via.expected_identities,
                    authority: &hop.authority,
                    service: hop.service.as_deref(),
                };
                self.open_offering(&ends.src, peer, tunnel, (hop.authority, &hop.service), dst)
                    .await
                    .map_err(|e| {
                        let flags = e.response_flags();
                        let Error::Hbone(source) = e else {
                            return (flags, e);
                        };
                        let refusal = WaypointRefusal {
                            binding: hop.binding,
                            target: hop.target.clone(),
                            waypoint: hop.waypoint.clone(),
                            problem: WaypointProblem::Unreachable {
                                addr: hop.via.addr,
                                source,
                            },
                        };
                        self.metrics().waypoint_unavailable(&refusal.labels());
                        (flags, Error::Waypoint(Box::new(refusal)))
                    })
            }
            // Boxed: the inner handshake's state is large, and unboxed it would size every connection's
            // task, double HBONE or not, for the connection's whole life.
            Route::Double(hop) => Box::pin(self.open_double(&ends.src, peer, hop, dst))
                .await
                .map_err(|e| (e.response_flags(), e)),
        };
        if let Ok(Up::Resumable(..)) = &up {
            ends.resumable = Some(true);
        }
        match up {
            Ok(up) => Ok(Some(OpenOutbound {
                stream,
                ends,
                record,
                _listing: listing,
                up,
            })),
            Err((flags, e)) => {
                // TLS_FAILURE, H2_HANDSHAKE_FAILURE, NETWORK_POLICY, IDENTITY_ERROR or CONNECT.
                ends.access().close(record, flags, 0, 0, Some(&e));
                Ok(None)
            }
        }
    }

    /// Opens `tunnel` (whose `:authority` and addressed service are `for_`, as a re-dial needs them),
    /// offering a resumable stream when they are on; resumable when the server agreed.
    async fn open_offering(
        self: &Arc<Self>,
        src: &Arc<Workload>,
        peer: SocketAddr,
        tunnel: Tunnel<'_>,
        (authority, service): (SocketAddr, &Option<Arc<Service>>),
        original_dst: SocketAddr,
    ) -> Result<Up, Error> {
        let token = self.cfg().resumable_streams.then(Token::random);
        let offer = token.map(super::resumable::Client::offer);
        // Only a resumable stream keeps its key (for the re-dial).
        let key = token.map(|_| self.pool_key(src, tunnel.dst, tunnel.expected));
        let stream = self.open_tunnel(src, peer, tunnel, offer).await?;
        Ok(match token.zip(key) {
            Some((token, key)) if super::resumable::Client::accepted(token, &stream.headers) => {
                let client = super::resumable::Client {
                    proxy: self.clone(),
                    token,
                    progress: Progress::new(DEFAULT_WINDOW),
                    key,
                    src: src.clone(),
                    peer,
                    authority,
                    service: service.clone(),
                    original_dst,
                    request: |src, client, authority, service| {
                        connect_request(src, client, authority, service)
                    },
                    double: None,
                    _enlisted: self.enlist(),
                };
                Up::Resumable(stream, Box::new(client))
            }
            _ => Up::Hbone(stream),
        })
    }

    /// Takes over a resumable connection the process this one replaces handed over: counted again (a
    /// new metrics record, labelled as the old one was), then re-dialled to the same server with its
    /// token, then carried on from the exported counts.
    pub(super) fn adopt_outbound(
        self: Arc<Self>,
        a: Adopted,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        // The set-up (routing again, the re-dial) lives on the heap only while it runs, as a new
        // connection's does: the copy holds only what it needs.
        let opening = Box::pin(self.open_adopted_outbound(a));
        async move {
            let Some(mut open) = opening.await? else {
                return Ok(());
            };
            let carried = open.carry().await;
            open.close(carried);
            Ok(())
        }
    }

    /// [`Proxy::adopt_outbound`]'s set-up; `None` when the connection ended there (logged). A double-HBONE
    /// connection (its record names the gateway) is labelled as a new one would be: the gateway
    /// workload, the addressed service.
    async fn open_adopted_outbound(
        self: Arc<Self>,
        a: Adopted,
    ) -> Result<Option<OpenOutbound>, String> {
        let start = a.resume.opened();
        let peer = a
            .app
            .peer_addr()
            .map(socket::canonical)
            .map_err(|e| format!("app socket: {e}"))?;
        let identities = |ids: &[String]| {
            ids.iter()
                .map(|id| id.parse::<Identity>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("expected identity: {e}"))
        };
        let expected = identities(&a.resume.expected)?;
        let src = self.local_workload().await.map_err(|e| e.to_string())?;
        let state = self.inputs.state.load();
        let service = recorded_service(&state, &a.resume.service);
        let sent_to = a.peer;
        let route = match &a.resume.double {
            None => {
                let authority: SocketAddr = a
                    .resume
                    .authority
                    .parse()
                    .map_err(|e| format!("authority {:?}: {e}", a.resume.authority))?;
                // The workload the stream goes to: the destination's own (its address is the
                // authority's), or the waypoint's on a waypoint hop; either way the labels are the ones
                // the route gave.
                let workload = state
                    .workload_by_addr(&self.cfg().network, a.peer.ip())
                    .cloned()
                    .ok_or_else(|| format!("no workload at {} any more", a.peer))?;
                Route::Hbone(Upstream {
                    workload,
                    addr: authority,
                    expected_identities: expected,
                    service,
                })
            }
            Some(double) => {
                let port = a
                    .resume
                    .authority
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .ok_or_else(|| format!("authority {:?}: no port", a.resume.authority))?;
                let service =
                    service.ok_or_else(|| format!("no service {:?} any more", a.resume.service))?;
                let authority = Authority::Host(service, port);
                if authority.to_string() != a.resume.authority {
                    return Err(format!(
                        "authority {:?} is not service {:?}'s",
                        a.resume.authority, a.resume.service
                    ));
                }
                let gateway = match state.workload_by_addr(&double.gateway_network, a.peer.ip()) {
                    Some(w) => w.clone(),
                    None => {
                        // Not found where it was: the route the destination takes now, if it still
                        // goes through the same gateway.
                        drop(state);
                        match self.route(&src, peer.ip(), a.original_dst) {
                            Ok(Route::Double(hop)) if hop.gateway.addr == a.peer => {
                                hop.gateway.workload
                            }
                            _ => return Err(format!("no gateway workload at {} any more", a.peer)),
                        }
                    }
                };
                Route::Double(DoubleHop {
                    gateway: Upstream {
                        workload: gateway,
                        addr: a.peer,
                        expected_identities: identities(&double.gateway_expected)?,
                        service: None,
                    },
                    authority,
                    inner_expected: expected,
                })
            }
        };
        let record = self.metrics().open(source_labels(&src, &route));
        let (ends, key, authority, service, double) = match route {
            Route::Hbone(up) => (
                Ends {
                    peer,
                    src: src.clone(),
                    dst_workload: Some(up.workload.clone()),
                    sent_to,
                    authority: Some(Authority::Addr(up.addr)),
                    start,
                    resumable: Some(true),
                },
                self.pool_key(&src, sent_to, &up.expected_identities),
                up.addr,
                up.service,
                None,
            ),
            Route::Double(hop) => {
                let double = super::resumable::DoubleDial {
                    authority: hop.authority.to_string(),
                    inner_expected: hop.inner_expected,
                    gateway_network: hop.gateway.workload.network.to_string(),
                };
                (
                    Ends {
                        peer,
                        src: src.clone(),
                        dst_workload: Some(hop.gateway.workload.clone()),
                        sent_to,
                        authority: Some(hop.authority.clone()),
                        start,
                        resumable: Some(true),
                    },
                    self.pool_key(&src, sent_to, &hop.gateway.expected_identities),
                    a.original_dst,
                    hop.authority.service_arc(),
                    Some(Box::new(double)),
                )
            }
            _ => unreachable!("built as HBONE or double HBONE"),
        };
        let listing = self.outbound_conns.add(super::connections::Listed {
            src: peer,
            original_dst: Some(a.original_dst),
            actual_dst: sent_to,
            protocol: if double.is_some() {
                "DOUBLEHBONE"
            } else {
                "HBONE"
            },
        });
        let mut client = Box::new(super::resumable::Client {
            proxy: self.clone(),
            token: a.token,
            progress: a.progress,
            key,
            src,
            peer,
            authority,
            service,
            original_dst: a.original_dst,
            request: |src, client, authority, service| {
                connect_request(src, client, authority, service)
            },
            double,
            _enlisted: self.enlist(),
        });
        // The server may be moving too (both ends on this node): a 404 is tried again within the wait.
        let stream = match Box::pin(client.redial()).await {
            Ok(Some(stream)) => stream,
            Ok(None) => {
                client.hand_over(a.app, start);
                record.close(ResponseFlags::None, 0, 0);
                return Ok(None);
            }
            Err(e) => {
                let e = Error::from(e);
                ends.access()
                    .close(record, e.response_flags(), 0, 0, Some(&e));
                return Ok(None);
            }
        };
        Ok(Some(OpenOutbound {
            stream: a.app,
            ends,
            record,
            _listing: listing,
            up: Up::Resumable(stream, client),
        }))
    }

    /// A plain upstream's side of the connection: copied with `copy_bidirectional` without a hand-over, with
    /// the pausable copy (enlisted, so the hand-over waits for it) with one.
    fn plain_up(self: &Arc<Self>, up: TcpStream, original_dst: SocketAddr, route: &Route) -> Up {
        if self.inputs.handover.is_none() {
            return Up::Plain(up);
        }
        let service = match route {
            Route::Tcp(u) => u.service.as_ref().map(|s| s.key()).unwrap_or_default(),
            _ => String::new(),
        };
        Up::Movable(
            up,
            Box::new(Movable {
                copy: Pausable::new(),
                proxy: self.clone(),
                original_dst,
                service,
                _enlisted: self.enlist(),
            }),
        )
    }

    /// Takes over a plain TCP connection the process this one replaces handed over (both its sockets):
    /// counted again (a new metrics record, labelled from the upstream's workload, if it is one, and the
    /// recorded service), then the bytes its old copy had read and not written are written, the EOFs it
    /// had read passed on, and the copy carries on (pausable: it may move again).
    pub(super) fn adopt_plain_outbound(
        self: Arc<Self>,
        a: AdoptedPlain,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let opening = Box::pin(self.open_adopted_plain_outbound(a));
        async move {
            let mut open = opening.await?;
            let carried = open.carry().await;
            open.close(carried);
            Ok(())
        }
    }

    /// [`Proxy::adopt_plain_outbound`]'s set-up.
    async fn open_adopted_plain_outbound(
        self: Arc<Self>,
        a: AdoptedPlain,
    ) -> Result<OpenOutbound, String> {
        let start = a.resume.opened();
        let peer = a
            .app
            .peer_addr()
            .map(socket::canonical)
            .map_err(|e| format!("app socket: {e}"))?;
        let src = self.local_workload().await.map_err(|e| e.to_string())?;
        let state = self.inputs.state.load();
        let service = recorded_service(&state, &a.resume.service);
        let route = match state.workload_by_addr(&self.cfg().network, a.peer.ip()) {
            Some(w) => Route::Tcp(Upstream {
                workload: w.clone(),
                addr: a.peer,
                expected_identities: Vec::new(),
                service,
            }),
            None => Route::Passthrough(a.peer),
        };
        drop(state);
        let record = self.metrics().open(source_labels(&src, &route));
        let dst_workload = match &route {
            Route::Tcp(up) => Some(up.workload.clone()),
            _ => None,
        };
        let listing = self.outbound_conns.add(super::connections::Listed {
            src: peer,
            original_dst: Some(a.original_dst),
            actual_dst: a.peer,
            protocol: "TCP",
        });
        let ends = Ends {
            peer,
            src,
            dst_workload,
            sent_to: a.peer,
            authority: None,
            start,
            resumable: None,
        };
        let movable = Movable {
            copy: a.copy,
            proxy: self.clone(),
            original_dst: a.original_dst,
            service: a.resume.service,
            _enlisted: self.enlist(),
        };
        Ok(OpenOutbound {
            stream: a.app,
            ends,
            record,
            _listing: listing,
            up: Up::Movable(a.peer_socket, Box::new(movable)),
        })
    }

    /// `route` with the address of a workload known only by hostname resolved (one of the host's
    /// addresses of the family the client dialled, picked at random, as ztunnel's on-demand DNS does).
    async fn resolved(&self, mut route: Route, dst: SocketAddr) -> Result<Route, Error> {
        let up = match &mut route {
            Route::Tcp(up) | Route::Hbone(up) if up.needs_resolution() => up,
            _ => return Ok(route),
        };
        let host = up.workload.hostname.to_string();
        let resolve_error = |reason: String| Error::Resolve {
            host: host.clone(),
            reason,
        };
        let Some(resolver) = &self.inputs.resolver else {
            return Err(resolve_error("this proxy has no resolver".into()));
        };
        let addrs = resolver
            .resolve_host(&host, dst.ip())
            .await
            .map_err(|e| resolve_error(e.to_string()))?;
        let ip = *addrs
            .choose(&mut rand::rng())
            .ok_or_else(|| resolve_error("no address".into()))?;
        up.addr = SocketAddr::new(ip, up.addr.port());
        Ok(route)
    }

    /// Opens double HBONE from `src` (at `peer`): the outer tunnel to the gateway through the pool, then
    /// the inner one inside it, with `x-forwarded-network` naming this proxy's network, as ztunnel sends.
    /// With resumable streams on, the inner CONNECT offers a token (the far node proxy keeps the stream,
    /// the gateway only relays it); resumable when the far end echoed it.
    async fn open_double(
        self: &Arc<Self>,
        src: &Arc<Workload>,
        peer: SocketAddr,
        hop: &DoubleHop,
        original_dst: SocketAddr,
    ) -> Result<Up, Error> {
        let outer = Tunnel {
            dst: hop.gateway.addr,
            expected: &hop.gateway.expected_identities,
            authority: &hop.authority,
            service: hop.authority.service(),
        };
        let outer = self.open_tunnel(src, peer, outer, None).await?;
        let tls = self.tls_for(&src.identity).await?.current();
        let mut req = connect_request(src, peer, &hop.authority, hop.authority.service())?;
        crate::hbone::double::forward_network(&mut req, self.forwarded_network.as_ref());
        let token = self.cfg().resumable_streams.then(Token::random);
        if let Some(token) = token {
            req.headers_mut()
                .insert(RESUME_HEADER, super::resumable::Client::offer(token));
        }
        let cfg = self.cfg();
        let stream = crate::hbone::double::connect(
            outer,
            hop.gateway.addr,
            &tls,
            hop.inner_expected.clone(),
            &cfg.h2,
            cfg.connect_timeout,
            req,
        )
        .await?;
        Ok(match token {
            Some(token) if super::resumable::Client::accepted(token, &stream.headers) => {
                let client = super::resumable::Client {
                    proxy: self.clone(),
                    token,
                    progress: Progress::new(DEFAULT_WINDOW),
                    key: self.pool_key(src, hop.gateway.addr, &hop.gateway.expected_identities),
                    src: src.clone(),
                    peer,
                    authority: original_dst,
                    service: hop.authority.service_arc(),
                    original_dst,
                    request: |src, client, authority, service| {
                        connect_request(src, client, authority, service)
                    },
                    double: Some(Box::new(super::resumable::DoubleDial {
                        authority: hop.authority.to_string(),
                        inner_expected: hop.inner_expected.clone(),
                        gateway_network: hop.gateway.workload.network.to_string(),
                    })),
                    _enlisted: self.enlist(),
                };
                Up::Resumable(stream, Box::new(client))
            }
            _ => Up::Hbone(stream),
        })
    }

    /// Opens an HBONE stream from `src` (at `peer`) through the pool.
    async fn open_tunnel(
        &self,
        src: &Workload,
        peer: SocketAddr,
        tunnel: Tunnel<'_>,
        resume_offer: Option<HeaderValue>,
    ) -> Result<pool::Stream, Error> {
        let tls = self.tls_for(&src.identity).await?.current();
        let key = self.pool_key(src, tunnel.dst, tunnel.expected);
        let mut req = connect_request(src, peer, tunnel.authority, tunnel.service)?;
        if let Some(offer) = resume_offer {
            req.headers_mut().insert(RESUME_HEADER, offer);
        }
        Ok(self.pool().connect(&key, &tls, req).await?)
    }

    /// The pool's key for tunnels from `src` to `dst`, expecting one of `expected` there.
    fn pool_key(&self, src: &Workload, dst: SocketAddr, expected: &[Identity]) -> PoolKey {
        PoolKey {
            src: src.identity.clone(),
            dst_ids: Arc::from(expected),
            dst,
        }
    }

    /// ztunnel's routing decision for a connection from `src` (at `downstream`) to `dst`.
    fn route(&self, src: &Workload, downstream: IpAddr, dst: SocketAddr) -> Result<Route, Error> {
        let state = self.inputs.state.load();
        let network = &self.cfg().network;
        if let Some(svc) = state.service_by_vip(network, dst.ip(), &src.namespace) {
            // A service waypoint comes first, even before passthrough.
            if let Some(gw) = svc.pick_waypoint() {
                let route = waypoint_hop(
                    &state,
                    src,
                    gw,
                    dst,
                    Some(svc.clone()),
                    WaypointBinding::service,
                    svc.key(),
                )?;
                // A waypoint on another network: through its network's gateway, the waypoint's own
                // service's names expected inside (ztunnel), the service still the authority.
                return match route {
                    Route::Waypoint(hop) if hop.via.workload.network != src.network => {
                        let inner = match &hop.via.service {
                            Some(wp) => state.far_identities(wp, &hop.via.workload.network),
                            None => vec![hop.via.workload.identity.clone()],
                        };
                        through_gateway(&state, &hop.via, svc, dst, inner)
                    }
                    route => Ok(route),
                };
            }
            if svc.lb_mode == LbMode::Passthrough {
                return Ok(match state.workload_by_addr(network, dst.ip()) {
                    Some(w) => by_protocol(state.upstream(w.clone(), dst, Some(svc.clone()))),
                    None => Route::Passthrough(dst),
                });
            }
            let up = state
                .pick_endpoint(svc, dst.port(), dst.ip(), Some(src))
                .ok_or_else(|| Error::NoHealthyUpstream {
                    service: svc.key(),
                    port: dst.port(),
                })?;
            if up.workload.network != src.network {
                let inner = state.far_identities(svc, &up.workload.network);
                return through_gateway(&state, &up, svc, dst, inner);
            }
            return Ok(by_protocol(up));
        }
        let Some(w) = state.workload_by_addr(network, dst.ip()) else {
            return Ok(Route::Passthrough(dst));
        };
        if let Some(gw) = &w.waypoint {
            if !state.from_waypoint([&**gw], &src.identity, SourceAddr::Known(downstream)) {
                let route = waypoint_hop(
                    &state,
                    src,
                    gw,
                    dst,
                    None,
                    WaypointBinding::workload,
                    w.uid.to_string(),
                )?;
                // Crossing networks takes a service for the authority; a workload's waypoint has none.
                if let Route::Waypoint(hop) = &route {
                    if hop.via.workload.network != src.network {
                        return Err(Error::Waypoint(Box::new(WaypointRefusal {
                            binding: WaypointBinding::workload,
                            target: w.uid.to_string(),
                            waypoint: (**gw).clone(),
                            problem: WaypointProblem::Unresolved(WaypointError::OtherNetwork {
                                network: hop.via.workload.network.to_string(),
                            }),
                        })));
                    }
                }
                return Ok(route);
            }
        }
        Ok(by_protocol(state.upstream(w.clone(), dst, None)))
    }

    /// A plain TCP connection to `dst` (a workload without HBONE, or outside the mesh).
    async fn connect_plain(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        socket::connect(
            self.inputs.netns.as_deref(),
            dst,
            None,
            self.inputs.sock,
            &self.cfg().keepalive,
            self.cfg().connect_timeout,
        )
        .await
        .map_err(|source| Error::Connect { dst, source })
    }
}

/// The route to waypoint `gw` for a connection the application addressed to `dst`, or the refusal.
fn waypoint_hop(
    state: &State,
    src: &Workload,
    gw: &GatewayAddress,
    dst: SocketAddr,
    service: Option<Arc<Service>>,
    binding: WaypointBinding,
    target: String,
) -> Result<Route, Error> {
    match state.resolve_waypoint(gw, src, dst) {
        Ok(via) => Ok(Route::Waypoint(WaypointHop {
            via,
            authority: dst,
            service,
            binding,
            target,
            waypoint: gw.clone(),
        })),
        Err(reason) => Err(Error::Waypoint(Box::new(WaypointRefusal {
            binding,
            target,
            waypoint: gw.clone(),
            problem: WaypointProblem::Unresolved(reason),
        }))),
    }
}

/// The route to `target` (a workload on another network, reached as `svc`) through the east-west
/// gateway of its network; refused when that network has none or it cannot be resolved. Never direct.
fn through_gateway(
    state: &State,
    target: &Upstream,
    svc: &Arc<Service>,
    dst: SocketAddr,
    inner_expected: Vec<Identity>,
) -> Result<Route, Error> {
    let Some(gw) = target.workload.network_gateway.as_deref() else {
        return Err(Error::NoNetworkGateway {
            workload: target.workload.uid.to_string(),
            network: target.workload.network.to_string(),
        });
    };
    let gateway =
        state
            .resolve_gateway_address(gw, dst)
            .map_err(|reason| Error::NetworkGateway {
                network: target.workload.network.to_string(),
                gateway: gw.clone(),
                reason,
            })?;
    Ok(Route::Double(DoubleHop {
        gateway,
        authority: Authority::Host(svc.clone(), dst.port()),
        inner_expected,
    }))
}

/// The `reporter="source"` labels of a connection from `src` taking `route`: the source principal (and
/// `mutual_tls`) only when the connection is carried over HBONE, with this workload's certificate. A
/// waypoint hop is labelled with the waypoint workload and the service the application addressed.
fn source_labels(src: &Workload, route: &Route) -> TrafficLabels {
    let (identity, dst, service) = match route {
        Route::Hbone(up) => (Some(&src.identity), Some(up), up.service.as_deref()),
        Route::Tcp(up) => (None, Some(up), up.service.as_deref()),
        Route::Passthrough(_) => (None, None, None),
        Route::Waypoint(hop) => (Some(&src.identity), Some(&hop.via), hop.service.as_deref()),
        Route::Double(hop) => (
            Some(&src.identity),
            Some(&hop.gateway),
            hop.authority.service(),
        ),
    };
    TrafficLabels::new(
        Reporter::source,
        Some(src),
        identity,
        dst.map(|u| &*u.workload),
        service,
    )
}

/// The service a handed-over connection recorded (`namespace/hostname`), if this process knows it.
fn recorded_service(state: &State, key: &str) -> Option<Arc<Service>> {
    let (ns, host) = key.split_once('/')?;
    state.service_by_namespaced_host(ns, host).cloned()
}

fn by_protocol(up: Upstream) -> Route {
    match up.workload.protocol {
        Protocol::HBONE => Route::Hbone(up),
        Protocol::TCP => Route::Tcp(up),
    }
}

/// The CONNECT request ztunnel sends: `:authority` = `authority` (`ip:port`, or `hostname:port` for
/// double HBONE), and `forwarded` (with `host=` the addressed service when known), `baggage`,
/// `traceparent` headers. Refused when the authority is not one (a hostname HTTP cannot carry).
pub fn connect_request(
    src: &Workload,
    client: SocketAddr,
    authority: impl std::fmt::Display,
    service: Option<&Service>,
) -> Result<Request<()>, Error> {
    let authority = authority.to_string();
    let uri =
        Uri::try_from(authority.as_str()).map_err(|_| Error::BadAuthority(authority.clone()))?;
    let mut forwarded = format!("for=\"{client}\"");
    if let Some(svc) = service {
        forwarded.push_str(";host=");
        forwarded.push_str(&svc.hostname);
    }
    let mut rng = rand::rng();
    let traceparent = format!(
        "00-{:032x}-{:016x}-00",
        rng.random::<u128>(),
        rng.random::<u64>()
    );
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .version(Version::HTTP_2)
        .body(())
        .expect("CONNECT request is valid");
    let h = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        h.insert("forwarded", v);
    }
    if let Ok(v) = HeaderValue::from_str(&baggage(src)) {
        h.insert("baggage", v);
    }
    if let Ok(v) = HeaderValue::from_str(&traceparent) {
        h.insert("traceparent", v);
    }
    Ok(req)
}

/// ztunnel's baggage header for a workload (empty fields omitted).
pub fn baggage(w: &Workload) -> String {
    let kind = if w.workload_type.is_empty() {
        "pod"
    } else {
        w.workload_type.as_str()
    };
    let workload_name = if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    };
    let fields = [
        ("k8s.cluster.name", w.cluster_id.as_str()),
        ("k8s.namespace.name", w.namespace.as_str()),
        (&*format!("k8s.{kind}.name"), workload_name.as_str()),
        ("service.name", w.canonical_name.as_str()),
        ("service.version", w.canonical_revision.as_str()),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}={v}"))
    .collect::<Vec<_>>();
    fields.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LocalConfig;

    #[test]
    fn connect_request_is_what_ztunnel_sends() {
        let st = LocalConfig::parse(
            r#"
workloads:
- {uid: c, name: sleep-7d9f, namespace: default, serviceAccount: sleep, workloadIps: ["10.0.0.1"],
   workloadName: sleep, workloadType: deployment, canonicalName: sleep, canonicalRevision: v1, clusterId: c1}
- {uid: s, name: web, namespace: default, workloadIps: ["10.0.0.2", "fd00::2"], protocol: HBONE,
   services: {"default/web.default.svc.cluster.local": {80: 8080}}}
services:
- {name: web, namespace: default, hostname: web.default.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
"#,
        )
        .unwrap()
        .into_state()
        .unwrap();
        let src = st
            .workload_by_addr("", "10.0.0.1".parse().unwrap())
            .unwrap()
            .clone();
        let svc = st
            .service_by_vip("", "10.96.0.1".parse().unwrap(), "default")
            .unwrap()
            .clone();
        let up = st
            .pick_endpoint(&svc, 80, "10.96.0.1".parse().unwrap(), None)
            .unwrap();
        let req = connect_request(
            &src,
            "10.0.0.1:40000".parse().unwrap(),
            up.addr,
            up.service.as_deref(),
        )
        .unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.0.0.2:8080");
        assert!(req.uri().scheme().is_none() && req.uri().path_and_query().is_none());
        let h = req.headers();
        assert_eq!(
            h["forwarded"],
            "for=\"10.0.0.1:40000\";host=web.default.svc.cluster.local"
        );
        assert_eq!(
            h["baggage"],
            "k8s.cluster.name=c1,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
        );
        let tp = h["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");

        // IPv6 authorities are bracketed.
        let w = st
            .workload_by_addr("", "fd00::2".parse().unwrap())
            .unwrap()
            .clone();
        let up6 = st.upstream(w, "[fd00::2]:8080".parse().unwrap(), None);
        let req6 = connect_request(&src, "[fd00::1]:1".parse().unwrap(), up6.addr, None).unwrap();
        assert_eq!(req6.uri().to_string(), "[fd00::2]:8080");
        assert_eq!(req6.headers()["forwarded"], "for=\"[fd00::1]:1\"");
    }

    #[test]
    fn waypoint_refusals_name_the_destination_and_the_waypoint() {
        use crate::state::{GatewayDestination, WaypointError};
        let refusal = WaypointRefusal {
            binding: WaypointBinding::service,
            target: "default/reviews.default.svc.cluster.local".into(),
            waypoint: GatewayAddress {
                destination: GatewayDestination::Hostname {
                    namespace: "default".into(),
                    hostname: "waypoint.default.svc.cluster.local".into(),
                },
                hbone_mtls_port: 15008,
            },
            problem: WaypointProblem::Unresolved(WaypointError::NotFound),
        };
        assert_eq!(
            Error::Waypoint(Box::new(refusal)).to_string(),
            "service default/reviews.default.svc.cluster.local must pass waypoint \
             default/waypoint.default.svc.cluster.local (HBONE port 15008), which is not in the state; \
             connection refused"
        );
    }
}
