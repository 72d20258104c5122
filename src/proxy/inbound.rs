//! Inbound HBONE (:15008): mTLS with the local workload's certificate, then one CONNECT per tunnelled TCP
//! connection, checked, authorized and joined to the application.
//!
//! Input: an accepted TCP connection. Output: each CONNECT stream answered with ztunnel's statuses —
//! 400 when the method is not CONNECT, the authority does not parse or fails the destination check
//! below; 503 when the local workload is unknown, the port is one of the proxy's own, or the application
//! cannot be reached; 401 when authorization denies; 200 and bytes both ways otherwise. The application
//! is always reached on the local workload's address, at the authority's port (hostname authorities: the
//! service's target port). Accepted streams stay registered with the proxy's
//! [`connections`](super::connections) registry and are reset if a later policy change denies them. Each
//! stream is counted in [`metrics`](crate::metrics) (reporter `destination`, `response_flags` `DENY` when
//! authorization refused or closed it). TLS failures (garbage, plain HTTP, untrusted or foreign
//! certificates) end that connection only. Before a peer is authenticated it holds one of its address's
//! `max_handshakes_per_source` slots (a connection beyond them is reset at once); TLS and the HTTP/2
//! preface must both be done within `handshake_timeout`, and a connection that carries no stream for
//! `hbone_idle_timeout` is closed with a GOAWAY.
//!
//! A CONNECT with an `x-forwarded-network` header naming another network came through that network's
//! east-west gateway (the inner tunnel of double HBONE): its source workload is not looked up by address
//! (the address is the gateway's); the peer's identity is still the client's, from the inner TLS.
//!
//! Destination check (ztunnel's `validate_destination`): an `ip:port` authority is accepted when the IP
//! is the one the connection arrived on, or when the local workload has an application tunnel (a waypoint
//! taking the target from the PROXY header), or when the IP is a service or workload whose waypoint is
//! this workload — the "sandwich": a waypoint's own node proxy receiving traffic for what the waypoint
//! serves. ztunnel looks at a service's primary `waypoint` only; the weighted ones count here too, since
//! the outbound side sends connections to them. Hostname authorities pass (the service lookup decides).
//!
//! Application tunnel (waypoint instances): the connection goes to the tunnel's port when set; with
//! protocol PROXY it goes to the loopback address from the loopback address (so the tunnel port need not
//! be reachable from outside the pod: ztunnel's `LOCALHOST_APP_TUNNEL` default, not configurable here)
//! and, after the 200, starts with a PROXY v2 header ([`proxy_protocol`](super::proxy_protocol)):
//! source = the HBONE peer's address, destination = the authority (a hostname authority: one of its
//! service's VIPs, same network and IPv4 first), and the peer's SPIFFE identity as TLV `0xD0`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::access::{self, Access};
use super::connections::{Counted, Registration, Side, Tracked};
use super::handover::{Adopted, Paused, Resume};
use super::resumable::{Ended, Server};
use super::{Error, Proxy};
use crate::authz::{Connection, Decision, DenyReason};
use crate::hbone::{copy, server};
use crate::identity::Identity;
use crate::metrics::{ConnectionRecord, Reporter, ResponseFlags, TrafficLabels};
use crate::socket;
use crate::state::{AppTunnelProtocol, State, Workload};
use crate::upgrade::handover::Direction;

/// Why a CONNECT stream was refused, and with which status.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
    /// The deciding policy when authorization refused.
    denied: Option<DenyReason>,
    /// The connection's metrics and its two ends, once it was counted as opened.
    record: Option<(ConnectionRecord, Ends)>,
}

impl Refusal {
    /// Logs the refusal: the access line when the stream was counted, else a failure line.
    // `&String`: see `Ends::access`.
    #[allow(clippy::ptr_arg)]
    fn log(
        self,
        peer: SocketAddr,
        local: SocketAddr,
        authority: &String,
        start: Instant,
        error: &dyn std::fmt::Display,
    ) {
        let flags = match &self.denied {
            Some(_) => ResponseFlags::Deny,
            None => ResponseFlags::Connect,
        };
        match self.record {
            Some((record, ends)) => {
                ends.access(peer, local, authority, start)
                    .close(record, flags, 0, 0, Some(error))
            }
            None => access::failed(Reporter::destination, peer, Some(local), error),
        }
    }
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
        denied: None,
        record: None,
    }
}

/// The workloads at a stream's two ends, as its metrics labels were built from them (the access line
/// names them).
#[derive(Debug, Clone)]
struct Ends {
    src: Option<Arc<Workload>>,
    dst: Arc<Workload>,
}

impl Ends {
    // `&String`, not `&str`: it becomes the line's `&dyn Display`, which an unsized `str` cannot.
    #[allow(clippy::ptr_arg)]
    fn access<'a>(
        &'a self,
        peer: SocketAddr,
        local: SocketAddr,
        authority: &'a String,
        start: Instant,
    ) -> Access<'a> {
        Access {
            reporter: Reporter::destination,
            src: peer,
            src_workload: self.src.as_deref(),
            dst: local,
            hbone_addr: Some(authority),
            dst_workload: Some(&self.dst),
            start,
            resumable: None,
        }
    }
}

/// An authorized stream, its upstream connected.
struct Admitted {
    upstream: TcpStream,
    target: SocketAddr,
    registration: Registration,
    record: ConnectionRecord,
    ends: Ends,
    /// A PROXY v2 header to write to the application before any byte (application tunnel PROXY).
    proxy_header: Option<Vec<u8>>,
}

/// A stream answered 200, its upstream connected: what the copy phase needs, and nothing more.
struct OpenStream {
    upstream: TcpStream,
    registration: Registration,
    record: ConnectionRecord,
    ends: Ends,
    authority: String,
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
    /// A resumable stream's state (the client offered, we echoed); boxed, so plain streams stay small.
    resumable: Option<Box<super::resumable::Server>>,
    /// Resumable streams are on here (the access line then says whether this one is).
    resumable_on: bool,
    /// Paused for the hand-over to a new process: handed over, not closed.
    leaving: bool,
}

/// How a stream's copy ended: the bytes each way, and the copy's result or the policy change that closed it.
struct Carried {
    received: u64,
    sent: u64,
    outcome: Result<std::io::Result<copy::Transferred>, DenyReason>,
}

impl OpenStream {
    /// Copies both ways until both ends finish, or a policy change denies the stream. Borrows the stream
    /// (held once, by the caller) rather than taking it: an `async fn`'s arguments stay in its future, and a
    /// moved-in stream would be held twice.
    async fn carry(&mut self) -> Carried {
        let (r, w) = self.upstream.split();
        let live = self.record.live_bytes();
        let (mut r, mut w) = (
            Counted::facing(r, Side::Server, live.as_ref()),
            Counted::facing(w, Side::Server, live.as_ref()),
        );
        let copy = async {
            match &mut self.resumable {
                None => copy::bidirectional(&mut r, &mut w, &mut self.send, &mut self.recv).await,
                // Boxed: its state would otherwise size every stream's task, resumable or not.
                Some(resumable) => {
                    match Box::pin(resumable.carry(&mut r, &mut w, &mut self.send, &mut self.recv))
                        .await
                    {
                        Ok(Ended::Done(t)) => Ok(t),
                        Ok(Ended::Leaving) => {
                            self.leaving = true;
                            Ok(copy::Transferred::default())
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        let outcome = tokio::select! {
            res = copy => Ok(res),
            reason = self.registration.closed() => Err(reason),
        };
        if outcome.is_err() {
            // Closed by a policy change mid-copy: the peer sees the stream reset (CANCEL).
            self.send.send_reset(h2::Reason::CANCEL);
        }
        Carried {
            received: w.written,
            sent: r.read,
            outcome,
        }
    }

    /// Logs the access line and records the close; or, paused for a hand-over, leaves the stream for the
    /// new process (its record closed here, opened again there).
    fn close(self, carried: Carried, peer: SocketAddr, local: SocketAddr, start: Instant) {
        if self.leaving {
            if let Some(server) = &self.resumable {
                let resume = Resume {
                    token: server.token.to_bytes().to_vec(),
                    authority: self.authority.clone(),
                    local: local.to_string(),
                    opened_ms: Resume::opened_at(start),
                    ..Resume::default()
                };
                server.proxy.hand_over(Paused {
                    direction: Direction::Inbound,
                    app: self.upstream,
                    original_dst: local,
                    peer,
                    peer_identity: &server.identity,
                    progress: &server.progress,
                    resume,
                });
            }
            self.record
                .close(ResponseFlags::None, carried.received, carried.sent);
            return;
        }
        let mut access = self.ends.access(peer, local, &self.authority, start);
        access.resumable = self.resumable_on.then_some(self.resumable.is_some());
        let Carried {
            received,
            sent,
            outcome,
        } = carried;
        match outcome {
            Ok(res) => access.copied(self.record, received, sent, res),
            Err(reason) => {
                let error = format_args!("connection closed due to policy change: {reason}");
                access.close(
                    self.record,
                    ResponseFlags::Deny,
                    received,
                    sent,
                    Some(&error),
                );
            }
        }
    }
}

impl Proxy {
    /// Handles one connection accepted on :15008.
    pub(super) async fn inbound(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let local = match stream.local_addr() {
            Ok(a) => socket::canonical(a),
            Err(_) => return,
        };
        // Held until the peer is authenticated and has spoken HTTP/2: one address cannot fill the process
        // with handshakes it never finishes.
        let Some(handshake) = self.cfg().admission.handshake(peer.ip()) else {
            let limit = self.cfg().max_handshakes_per_source;
            access::failed(
                Reporter::destination,
                peer,
                Some(local),
                &format_args!("too many handshakes in progress from this address (limit {limit})"),
            );
            socket::reset_on_close(&stream);
            return;
        };
        let tls = match self.local_workload().await {
            Ok(w) => match self.tls_for(&w.identity).await {
                Ok(t) => t.current(),
                Err(e) => {
                    tracing::warn!(src.addr = %peer, error = %e, "inbound connection refused");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(src.addr = %peer, error = %e, "inbound connection refused");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        // One deadline for TLS and the HTTP/2 preface after it.
        let handshake_deadline = tokio::time::Instant::now() + self.cfg().handshake_timeout;
        let tls_stream =
            match tokio::time::timeout_at(handshake_deadline, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    access::failed(
                        Reporter::destination,
                        peer,
                        Some(local),
                        &format_args!("TLS handshake failed: {e}"),
                    );
                    return;
                }
                Err(_) => {
                    access::failed(
                        Reporter::destination,
                        peer,
                        Some(local),
                        &"TLS handshake timed out",
                    );
                    return;
                }
            };
        let Some(peer_id) = crate::tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
        else {
            // The verifier only admits certificates with a SPIFFE SAN; this is defence in depth.
            tracing::warn!(src.addr = %peer, "peer certificate has no SPIFFE identity");
            return;
        };
        let me = self.clone();
        let shutdown = self.shutdown.clone();
        let timeouts = server::Timeouts {
            handshake_deadline,
            idle: self.cfg().hbone_idle_timeout,
        };
        let h2 = &self.cfg().h2;
        let res = server::serve(
            tls_stream,
            h2,
            timeouts,
            handshake,
            shutdown,
            // The stream's future itself, not an async block awaiting it (which would hold it twice).
            move |incoming| {
                me.clone()
                    .inbound_stream(incoming, peer, local, peer_id.clone())
            },
        )
        .await;
        match res {
            Ok(()) => {}
            Err(server::Error::HandshakeTimeout) => access::failed(
                Reporter::destination,
                peer,
                Some(local),
                &"HTTP/2 handshake timed out",
            ),
            Err(e) => {
                tracing::debug!(src.addr = %peer, error = %e, "HBONE connection ended with an error")
            }
        }
    }

    /// One CONNECT stream: its set-up (checks, upstream connect, the 200) as a boxed future that lives on the
    /// heap only while it runs, then the copy. Not an `async fn`: its arguments would stay in the stream's
    /// task for as long as it copies.
    fn inbound_stream(
        self: Arc<Self>,
        incoming: server::Incoming,
        peer: SocketAddr,
        local: SocketAddr,
        peer_id: Identity,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let start = Instant::now();
        let opening = Box::pin(self.open_stream(incoming, peer, local, peer_id, start));
        async move {
            let Some(mut open) = opening.await else {
                return;
            };
            let carried = open.carry().await;
            open.close(carried, peer, local, start);
        }
    }

    /// Checks a CONNECT stream, connects its upstream and answers 200; `None` when it was refused or ended
    /// (and logged).
    async fn open_stream(
        self: Arc<Self>,
        incoming: server::Incoming,
        peer: SocketAddr,
        local: SocketAddr,
        peer_id: Identity,
        start: Instant,
    ) -> Option<OpenStream> {
        let authority = incoming
            .request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let resumable = self.cfg().resumable_streams;
        let offered = match super::resumable::requested(resumable, incoming.request.headers()) {
            None => None,
            Some(Err(e)) => {
                access::failed(
                    Reporter::destination,
                    peer,
                    Some(local),
                    &format_args!("{e} (answered 400)"),
                );
                incoming.refuse(StatusCode::BAD_REQUEST);
                return None;
            }
            // A re-dial of a stream whose tunnel broke: its own task carries on with this stream.
            Some(Ok(header)) if header.at.is_some() => {
                if let Err(refused) = self.parking.resume(incoming, header, &peer_id) {
                    let status = refused.status().as_u16();
                    access::failed(
                        Reporter::destination,
                        peer,
                        Some(local),
                        &format_args!("{refused} (answered {status})"),
                    );
                }
                return None;
            }
            Some(Ok(header)) => Some(header.token),
        };
        let admitted = match self
            .check_connect(&incoming.request, peer, local, &peer_id, None)
            .await
        {
            Ok(a) => a,
            Err(mut r) => {
                let (status, reason) = (r.status, std::mem::take(&mut r.reason));
                let error = format_args!("{reason} (answered {})", status.as_u16());
                r.log(peer, local, &authority, start, &error);
                incoming.refuse(status);
                return None;
            }
        };
        let Admitted {
            mut upstream,
            target: _,
            registration,
            record,
            ends,
            proxy_header,
        } = admitted;
        let access = ends.access(peer, local, &authority, start);
        let answer = match offered {
            Some(token) => super::resumable::echo(token),
            None => http::HeaderMap::new(),
        };
        let (send, recv) = match incoming.accept(answer) {
            Ok(s) => s,
            Err(e) => {
                let error = format_args!("HBONE stream gone before the answer: {e}");
                access.close(record, ResponseFlags::None, 0, 0, Some(&error));
                return None;
            }
        };
        // After the 200, before any byte of the stream, as ztunnel sends it.
        if let Some(header) = proxy_header {
            if let Err(e) = upstream.write_all(&header).await {
                let error = format_args!("writing the PROXY protocol header failed: {e}");
                access.close(record, ResponseFlags::Connect, 0, 0, Some(&error));
                return None;
            }
        }
        Some(OpenStream {
            upstream,
            registration,
            record,
            ends,
            authority,
            send,
            recv,
            resumable: offered.map(|token| Server::new(self.clone(), token, peer_id)),
            resumable_on: resumable,
            leaving: false,
        })
    }
    /// The checks of ztunnel's inbound path, in its order, on a CONNECT request's head; the upstream
    /// connection on success.
    async fn check_connect<B>(
        &self,
        req: &http::Request<B>,
        peer: SocketAddr,
        local: SocketAddr,
        peer_id: &Identity,
        adopted: Option<TcpStream>,
    ) -> Result<Admitted, Refusal> {
        if req.method() != Method::CONNECT {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("method {} is not CONNECT", req.method()),
            ));
        }
        let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let workload = self
            .local_workload()
            .await
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let state = self.inputs.state.load();
        let network = &self.cfg().network;
        let mut service = None;
        // The PROXY header's destination: the authority, or a VIP of the service it names.
        let tunnel_target: Option<SocketAddr>;
        let target: SocketAddr = match authority.parse::<SocketAddr>() {
            Ok(addr) => {
                let addr = socket::canonical(addr);
                if !destination_is_valid(&state, network, &workload, local.ip(), addr.ip()) {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        format!("ip mismatch: {} != {}", addr.ip(), local.ip()),
                    ));
                }
                tunnel_target = Some(addr);
                SocketAddr::new(local.ip(), addr.port())
            }
            Err(_) => {
                // `hostname:port`: a service this workload backs, its port mapped to the workload's port.
                let (host, port) = crate::hbone::host_port(authority).ok_or_else(|| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        format!("authority {authority:?} is not ip:port or host:port"),
                    )
                })?;
                let svc = state
                    .service_by_host(host, &workload.namespace)
                    .ok_or_else(|| {
                        refuse(StatusCode::BAD_REQUEST, format!("unknown service {host}"))
                    })?;
                let target_port = workload
                    .services
                    .get(&svc.key())
                    .and_then(|m| m.get(&port))
                    .or_else(|| svc.ports.get(&port))
                    .copied()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        refuse(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("service {host} has no port {port} on this workload"),
                        )
                    })?;
                // Same network first, then IPv4 first, as ztunnel picks it.
                tunnel_target = svc
                    .vips
                    .iter()
                    .max_by_key(|(net, ip)| (net == network, ip.is_ipv4()))
                    .map(|(_, ip)| SocketAddr::new(*ip, port));
                service = Some(svc.clone());
                SocketAddr::new(local.ip(), target_port)
            }
        };
        if self.cfg().ports.illegal().contains(&target.port()) {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                Error::SelfCall(target).to_string(),
            ));
        }
        // An application tunnel may move the port, and with PROXY asks for the header (after the checks
        // on the requested port, as ztunnel orders them).
        let (target, proxy_to) = match workload.application_tunnel {
            None => (target, None),
            Some(tunnel) => {
                let target = SocketAddr::new(local.ip(), tunnel.port.unwrap_or(target.port()));
                match tunnel.protocol {
                    AppTunnelProtocol::NONE => (target, None),
                    AppTunnelProtocol::PROXY => {
                        let dst = tunnel_target.ok_or_else(|| {
                            refuse(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("service of {authority} has no VIP for the PROXY header"),
                            )
                        })?;
                        (target, Some(dst))
                    }
                }
            }
        };
        // Counted from here on, as ztunnel counts a connection once it knows both ends.
        let src_ip = forwarded_for(req.headers()).unwrap_or(peer.ip());
        // The source workload only when its identity is the peer's: a header cannot borrow another's name.
        // Through an east-west gateway from another network (double HBONE): the address is the gateway's,
        // and the client's own address means nothing here, so no source workload (ztunnel).
        let from_gateway = req
            .headers()
            .get(crate::hbone::X_FORWARDED_NETWORK)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|n| !n.eq_ignore_ascii_case(network));
        let src_workload = state
            .workload_by_addr(network, src_ip)
            .filter(|w| !from_gateway && w.identity == *peer_id);
        let service = service.or_else(|| super::service_for(&state, &workload, target.port()));
        let labels = TrafficLabels::new(
            Reporter::destination,
            src_workload.map(|w| &**w),
            Some(peer_id),
            Some(&workload),
            service.as_deref(),
        );
        let record = self.metrics().open(labels);
        let ends = Ends {
            src: src_workload.cloned(),
            dst: workload.clone(),
        };
        // Registered before the check, so a policy change between the two is never missed.
        let registration = match self.conns.register(Tracked {
            src: peer,
            dst: target,
            src_identity: Some(peer_id.clone()),
            workload: workload.clone(),
        }) {
            Ok(r) => r,
            Err(full) => {
                let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, full.to_string());
                r.record = Some((record, ends));
                return Err(r);
            }
        };
        let state = self.inputs.state.load();
        let conn = Connection {
            src: peer,
            dst: target,
            src_identity: Some(peer_id),
            dst_network: network,
        };
        if let Decision::Deny(reason) =
            state
                .policies()
                .check(&workload.namespace, &workload.authorization_policies, &conn)
        {
            return Err(Refusal {
                status: StatusCode::UNAUTHORIZED,
                reason: Error::Denied(reason.clone()).to_string(),
                denied: Some(reason),
                record: Some((record, ends)),
            });
        }
        // Handed over by the process this one replaces: the application connection is already open (and
        // any PROXY header already written).
        if let Some(upstream) = adopted {
            return Ok(Admitted {
                upstream,
                target,
                registration,
                record,
                ends,
                proxy_header: None,
            });
        }
        // A PROXY tunnel is reached on loopback, from loopback (the header carries the client); anything
        // else on the workload's address, keeping the client's address when configured.
        let (connect_to, src_ip, opts) = match proxy_to {
            Some(_) => {
                let lo = if target.is_ipv4() {
                    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                };
                (
                    SocketAddr::new(lo, target.port()),
                    Some(lo),
                    self.inputs.sock,
                )
            }
            None => (
                target,
                self.inputs.orig_src.then_some(peer.ip()),
                self.upstream_opts(),
            ),
        };
        match socket::connect(
            self.inputs.netns.as_deref(),
            connect_to,
            src_ip,
            opts,
            &self.cfg().keepalive,
            self.cfg().connect_timeout,
        )
        .await
        {
            Ok(upstream) => Ok(Admitted {
                upstream,
                target,
                registration,
                record,
                ends,
                proxy_header: proxy_to
                    .map(|dst| super::proxy_protocol::encode(peer, dst, Some(peer_id))),
            }),
            Err(e) => {
                let mut r = refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Error::Connect {
                        dst: connect_to,
                        source: e,
                    }
                    .to_string(),
                );
                r.record = Some((record, ends));
                Err(r)
            }
        }
    }

    /// The fuzz target's way into [`Proxy::check_connect`] (`crate::fuzzing::check_connect`; not an API):
    /// the status a stream with this request head would be answered with, and where an admitted one
    /// would go. An admitted stream's upstream connection is reset at once (no TIME_WAIT left behind by
    /// a long run) and its metrics record closed, as for a refusal.
    #[doc(hidden)]
    pub(crate) async fn connect_decision<B>(
        &self,
        req: &http::Request<B>,
        peer: SocketAddr,
        local: SocketAddr,
        peer_id: &Identity,
    ) -> Result<SocketAddr, StatusCode> {
        match self.check_connect(req, peer, local, peer_id, None).await {
            Ok(admitted) => {
                let _ = socket2::SockRef::from(&admitted.upstream)
                    .set_linger(Some(std::time::Duration::ZERO));
                admitted.record.close(ResponseFlags::None, 0, 0);
                Ok(admitted.target)
            }
            Err(r) => {
                if let Some((record, _)) = r.record {
                    let flags = match r.denied {
                        Some(_) => ResponseFlags::Deny,
                        None => ResponseFlags::Connect,
                    };
                    record.close(flags, 0, 0);
                }
                Err(r.status)
            }
        }
    }

    /// Takes over a resumable stream the process this one replaces handed over: checked again as a
    /// CONNECT (policy, a new metrics record and registration), then parked for the client's re-dial,
    /// then carried on from the exported counts.
    pub(super) fn adopt_inbound(
        self: Arc<Self>,
        a: Adopted,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        // The set-up (the checks, the wait for the client) lives on the heap only while it runs, as a
        // stream's set-up does: the copy holds only what it needs.
        let opening = Box::pin(self.open_adopted_inbound(a));
        async move {
            let Some((mut open, peer, local, start)) = opening.await? else {
                return Ok(());
            };
            let carried = open.carry().await;
            open.close(carried, peer, local, start);
            Ok(())
        }
    }

    /// [`Proxy::adopt_inbound`]'s set-up: the stream, its ends and its opening time; `None` when it
    /// ended there (logged).
    async fn open_adopted_inbound(
        self: Arc<Self>,
        a: Adopted,
    ) -> Result<Option<(OpenStream, SocketAddr, SocketAddr, Instant)>, String> {
        let start = a.resume.opened();
        let local: SocketAddr = a
            .resume
            .local
            .parse()
            .map_err(|e| format!("local address {:?}: {e}", a.resume.local))?;
        let (peer, authority) = (a.peer, a.resume.authority);
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri(authority.as_str())
            .version(http::Version::HTTP_2)
            .body(())
            .map_err(|e| format!("authority {authority:?}: {e}"))?;
        let admitted = match self
            .check_connect(&req, peer, local, &a.peer_identity, Some(a.app))
            .await
        {
            Ok(a) => a,
            Err(mut r) => {
                let reason = std::mem::take(&mut r.reason);
                let error = format_args!("handed over, then refused here: {reason}");
                r.log(peer, local, &authority, start, &error);
                return Ok(None);
            }
        };
        drop(req);
        let Admitted {
            upstream,
            registration,
            record,
            ends,
            ..
        } = admitted;
        let mut server = Server::with(self.clone(), a.token, a.peer_identity, a.progress);
        let resumed = match server.parked().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Told to leave before the client came back: on to the next process.
                let resume = Resume {
                    token: server.token.to_bytes().to_vec(),
                    authority,
                    local: local.to_string(),
                    opened_ms: Resume::opened_at(start),
                    ..Resume::default()
                };
                self.hand_over(Paused {
                    direction: Direction::Inbound,
                    app: upstream,
                    original_dst: local,
                    peer,
                    peer_identity: &server.identity,
                    progress: &server.progress,
                    resume,
                });
                record.close(ResponseFlags::None, 0, 0);
                return Ok(None);
            }
            Err(e) => {
                let mut access = ends.access(peer, local, &authority, start);
                access.resumable = Some(true);
                access.close(record, ResponseFlags::Connect, 0, 0, Some(&e));
                return Ok(None);
            }
        };
        let open = OpenStream {
            upstream,
            registration,
            record,
            ends,
            authority,
            send: resumed.send,
            recv: resumed.recv,
            resumable: Some(server),
            resumable_on: true,
            leaving: false,
        };
        Ok(Some((open, peer, local, start)))
    }

    /// Socket options towards the application: the mark, and transparency when keeping the source address.
    pub(super) fn upstream_opts(&self) -> socket::SocketOpts {
        socket::SocketOpts {
            transparent: self.inputs.orig_src,
            ..self.inputs.sock
        }
    }
}

/// ztunnel's `validate_destination` for an `ip:port` authority arriving on `local_ip`: the same address,
/// or a local workload with an application tunnel (it gets the target in the PROXY header and decides), or
/// the authority is a service or workload whose waypoint is this workload (a sandwiched waypoint).
fn destination_is_valid(
    state: &State,
    network: &str,
    local: &Workload,
    local_ip: IpAddr,
    authority_ip: IpAddr,
) -> bool {
    if authority_ip == local_ip || local.application_tunnel.is_some() {
        return true;
    }
    let Some(found) = state.address_at(network, authority_ip) else {
        return false;
    };
    let is_me = |w: &Workload| w.uid == local.uid || w.ips.contains(&local_ip);
    found.waypoints().any(|gw| state.waypoint_has(gw, is_me))
}

/// The client address in a `forwarded: for="ip:port"` header, as meshnode and ztunnel clients send it.
pub(crate) fn forwarded_for(headers: &http::HeaderMap) -> Option<IpAddr> {
    let value = headers.get(http::header::FORWARDED)?.to_str().ok()?;
    let part = value
        .split([';', ','])
        .map(str::trim)
        .find_map(|p| p.strip_prefix("for=").or_else(|| p.strip_prefix("For=")))?;
    let part = part.trim_matches('"');
    part.parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| part.trim_matches(['[', ']']).parse::<IpAddr>())
        .ok()
        .map(|ip| ip.to_canonical())
}
