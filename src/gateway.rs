//! `meshnode gateway`: a network's east-west gateway, the hop where double HBONE crosses into that
//! network (Istio's `istio-east-west` Gateway class, which Istio runs Envoy for).
//!
//! Input: a [`GatewayConfig`] (its identity, the network it serves), the mesh state (the same workloads
//! and services a node proxy gets, from xDS or ztunnel's local config), a [`CertManager`] for its own
//! certificate, a bound HBONE listener and a shutdown signal. Output: every tunnel served until shutdown,
//! and an access line per stream (target `access`, `reporter="gateway"`).
//!
//! ```text
//!  client's node proxy (network A) ──mTLS (the gateway's certificate) + h2 CONNECT svc-host:port──> :15008
//!     per stream: the service by hostname (as the client's namespace sees it)
//!       ├─ service has a waypoint (and the client is not it) ── its instance on this network ──┐
//!       └─ else an endpoint on this network that takes HBONE ─────────────────────────────────┴─ TCP to
//!                                                                     <ip>:15008, 200, bytes copied
//!  inside the stream: the client's own mTLS + h2 CONNECT (x-forwarded-network: A), ended by the
//!  destination's node proxy (or waypoint) with the destination's certificate: never opened here.
//! ```
//!
//! The outer tunnel is terminated with the gateway's own identity, and only peers with a certificate of
//! the mesh get one; the inner bytes are forwarded unopened, so the gateway can neither read nor change
//! them, and the destination checks the client's identity itself. Refusals: not CONNECT, or an authority
//! that is not `hostname:port` → 400 (a gateway routes by service, never to an address a client names);
//! a service unknown to the client's namespace, without an endpoint on this network, or unreachable → 503.
//! Bounds: as the node proxy's HBONE listener (handshake slots per source, handshake and idle timeouts,
//! connection limit, GOAWAY at shutdown, then `CONNECTION_TERMINATION_DEADLINE` for open tunnels).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::hbone::{copy, listener, server};
use crate::identity::{CertManager, Identity};
use crate::socket::{self, SocketOpts};
use crate::state::waypoint::{Found, SourceAddr};
use crate::state::{Protocol, StateHandle, Upstream};
use crate::tls::WorkloadTls;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Its certificate could not be issued.
    #[error("certificate for {identity}: {source}")]
    Certificate {
        /// The gateway's identity.
        identity: Identity,
        /// Why.
        source: crate::identity::Error,
    },
    /// Its certificate could not be turned into TLS configuration.
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
}

/// Why one stream was refused, and with which status.
struct Refusal {
    status: StatusCode,
    reason: String,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// A running east-west gateway.
pub struct Gateway {
    cfg: Arc<GatewayConfig>,
    identity: Identity,
    state: StateHandle,
    tls: Arc<WorkloadTls>,
    shutdown: watch::Receiver<bool>,
}

impl Gateway {
    /// A gateway: fetches its certificate (waiting for the CA).
    pub async fn new(
        cfg: Arc<GatewayConfig>,
        state: StateHandle,
        certs: &CertManager,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Gateway>, Error> {
        let identity = cfg.identity();
        let cert = certs
            .get(&identity)
            .await
            .map_err(|source| Error::Certificate {
                identity: identity.clone(),
                source,
            })?;
        let tls = Arc::new(WorkloadTls::new(cert)?);
        Ok(Arc::new(Gateway {
            cfg,
            identity,
            state,
            tls,
            shutdown,
        }))
    }

    /// The gateway's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Serves HBONE on `listener` until shutdown; then open tunnels get the termination deadline.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        listener::accept_loop(
            listener,
            &self.cfg.base,
            self.shutdown.clone(),
            move |stream, peer| me.clone().connection(stream, peer),
        )
        .await;
        tracing::info!("gateway stopped");
    }

    /// One client connection: mTLS with the gateway's certificate, then its CONNECT streams.
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let local = match stream.local_addr() {
            Ok(a) => socket::canonical(a),
            Err(_) => return,
        };
        let me = self.clone();
        listener::terminate(
            stream,
            peer,
            &self.cfg.base,
            self.tls.current().server_config(),
            "gateway",
            self.shutdown.clone(),
            move |incoming, peer_id| me.clone().stream(incoming, peer, local, peer_id),
        )
        .await;
    }

    /// One CONNECT stream: the next hop on this network, connected, then the bytes both ways.
    async fn stream(
        self: Arc<Self>,
        incoming: server::Incoming,
        peer: SocketAddr,
        local: SocketAddr,
        peer_id: Identity,
    ) {
        let start = Instant::now();
        let authority = incoming
            .request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let opened = match self.next_hop(&incoming.request, local, &peer_id) {
            Ok(hop) => self.connect(hop).await,
            Err(r) => Err(r),
        };
        let (upstream, hop) = match opened {
            Ok(o) => o,
            Err(r) => {
                tracing::info!(
                    target: "access", reporter = "gateway", src.addr = %peer, src.identity = %peer_id,
                    dst.hbone_addr = %authority, error = %r.reason,
                    "stream refused (answered {})", r.status.as_u16()
                );
                incoming.refuse(r.status);
                return;
            }
        };
        let (mut send, mut recv) = match incoming.accept(http::HeaderMap::new()) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "HBONE stream gone before the answer");
                return;
            }
        };
        let mut upstream = upstream;
        let (mut r, mut w) = upstream.split();
        let res = copy::bidirectional(&mut r, &mut w, &mut send, &mut recv).await;
        let (sent, received) = match &res {
            Ok(t) => (t.tcp_to_hbone, t.hbone_to_tcp),
            Err(_) => (0, 0),
        };
        let duration = format!("{}ms", start.elapsed().as_millis());
        match res {
            Ok(_) => tracing::info!(
                target: "access", reporter = "gateway", src.addr = %peer, src.identity = %peer_id,
                dst.hbone_addr = %authority, dst.addr = %hop.addr, dst.workload = %hop.workload.name,
                bytes_recv = received, bytes_sent = sent, duration = %duration, "connection complete"
            ),
            Err(e) => tracing::info!(
                target: "access", reporter = "gateway", src.addr = %peer, src.identity = %peer_id,
                dst.hbone_addr = %authority, dst.addr = %hop.addr, dst.workload = %hop.workload.name,
                duration = %duration, error = %e, "connection complete"
            ),
        }
    }

    /// Where a CONNECT goes: the service's waypoint when it has one, else one of its endpoints, on this
    /// gateway's network, reached on its HBONE port.
    fn next_hop<B>(
        &self,
        req: &http::Request<B>,
        local: SocketAddr,
        peer_id: &Identity,
    ) -> Result<Upstream, Refusal> {
        if req.method() != Method::CONNECT {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("method {} is not CONNECT", req.method()),
            ));
        }
        let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
        if authority.parse::<SocketAddr>().is_ok() {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "a gateway routes by service hostname, not to an address",
            ));
        }
        let (host, port) = crate::hbone::host_port(authority).ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("authority {authority:?} is not hostname:port"),
            )
        })?;
        let state = self.state.load();
        let network = self.cfg.base.network.as_str();
        let svc = state
            .service_by_host(host, peer_id.namespace())
            .ok_or_else(|| {
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no service {host} visible to namespace {}",
                        peer_id.namespace()
                    ),
                )
            })?;
        let hbone_port = self.cfg.base.ports.inbound;
        // From the service's waypoint itself: on to an endpoint, as a node proxy does. Its identity only:
        // it comes from another network, whose addresses mean nothing here.
        let from_waypoint = state.from_waypoint(
            Found::Service(svc).waypoints(),
            peer_id,
            SourceAddr::OtherNetwork,
        );
        if let Some(wp) = svc.pick_waypoint().filter(|_| !from_waypoint) {
            // As the client decided: traffic for a service with a waypoint goes to the waypoint.
            let up = state
                .resolve_gateway_address(wp, SocketAddr::new(local.ip(), port))
                .map_err(|e| {
                    refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("waypoint {wp} of {} {e}", svc.key()),
                    )
                })?;
            if up.workload.network != network {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "waypoint {wp} of {} is on network {:?}, not this gateway's",
                        svc.key(),
                        up.workload.network
                    ),
                ));
            }
            return Ok(up);
        }
        let up = state
            .pick_endpoint_where(svc, port, local.ip(), &|w| {
                w.network == network && w.protocol == Protocol::HBONE && !w.ips.is_empty()
            })
            .ok_or_else(|| {
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "service {} has no healthy HBONE endpoint for port {port} on network {network:?}",
                        svc.key()
                    ),
                )
            })?;
        Ok(Upstream {
            addr: SocketAddr::new(up.addr.ip(), hbone_port),
            ..up
        })
    }

    /// A TCP connection to the next hop's HBONE port.
    async fn connect(&self, hop: Upstream) -> Result<(TcpStream, Upstream), Refusal> {
        let base = &self.cfg.base;
        match socket::connect(
            None,
            hop.addr,
            None,
            SocketOpts::default(),
            &base.keepalive,
            base.connect_timeout,
        )
        .await
        {
            Ok(s) => Ok((s, hop)),
            Err(e) => Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("connecting to {}: {e}", hop.addr),
            )),
        }
    }
}
