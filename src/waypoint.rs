//! `meshnode waypoint`: the L7 proxy of one namespace's waypoint Gateway, what Istio runs Envoy for.
//!
//! Input: a [`WaypointConfig`], the configuration as a `watch` of [`Snapshot`]s (built from this
//! waypoint's `meshnode.waypoint.Waypoint` resource and the `istio.workload.Address` workloads and services;
//! tests publish their own), a [`CertManager`] for the waypoint's own certificate, a bound HBONE listener
//! and a shutdown signal. Output: every client tunnel served until shutdown, request metrics and access
//! logs.
//!
//! ```text
//!  client's node proxy ──mTLS+h2 CONNECT :authority=VIP:port──> :15008 (hbone::server, our certificate)
//!     per stream: destination (bound service VIP/hostname, or bound workload IP) ─ none: CONNECT 503
//!       └─ protocol (port's declared, else sniffed) ── TCP ──> tcp: authz, cluster by weight, endpoint, copy
//!                                                    └─ HTTP ─> downstream (hyper h1/h2 server):
//!          per request: authz → route → action → forward (retries, timeouts) → upstream:
//!            endpoint HBONE-capable: hbone::pool ──mTLS (our cert, endpoint's identity) CONNECT pod_ip:port──>
//!                                    endpoint's node proxy :15008; otherwise plain TCP; hyper client pooled
//! ```
//!
//! Layout: [`snapshot`] (configuration, indexed), [`authz`] / [`routes`] / [`balance`] (the decision
//! engines), [`sniff`] (protocol detection), [`downstream`] (HTTP
//! from the client), [`forward`] (retries, timeouts, Envoy's failure answers), [`upstream`] (connections to
//! endpoints), [`tcp`] (TCP ports), [`body`], [`metrics`] (Istio's request metrics, access log).
//!
//! CONNECT streams are handled as the node proxy handles them (same handshake bounds, idle timeout, GOAWAY
//! at shutdown): not CONNECT → 400; an authority this waypoint serves nothing at → 503 (Envoy accepts the
//! tunnel and then finds no filter chain: the client's connection is closed either way).

pub mod authz;
pub mod balance;
pub mod body;
pub mod downstream;
pub mod forward;
pub mod metrics;
pub mod routes;
pub mod snapshot;
pub mod sniff;
pub mod tcp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::WaypointConfig;
use crate::hbone::pool::Pool;
use crate::hbone::resume::parking::{self, Parking};
use crate::hbone::resume::piped::{Piped, Recover};
use crate::hbone::server;
use crate::identity::{CertManager, Identity};
use crate::socket::SocketOpts;
use crate::tls::WorkloadTls;

pub use metrics::WaypointMetrics;
pub use snapshot::Snapshot;

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Its certificate could not be issued.
    #[error("certificate for {identity}: {source}")]
    Certificate {
        /// The waypoint's identity.
        identity: Identity,
        /// Why.
        source: crate::identity::Error,
    },
    /// Its certificate could not be turned into TLS configuration.
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
}

/// What a waypoint is built from.
pub struct WaypointInputs {
    /// The configuration.
    pub cfg: Arc<WaypointConfig>,
    /// The latest configuration snapshot.
    pub config: watch::Receiver<Arc<Snapshot>>,
    /// Certificates (the waypoint's own identity's).
    pub certs: Arc<CertManager>,
    /// Where request metrics go.
    pub metrics: Arc<WaypointMetrics>,
}

/// A running waypoint.
pub struct Waypoint {
    cfg: Arc<WaypointConfig>,
    identity: Identity,
    config: watch::Receiver<Arc<Snapshot>>,
    tls: Arc<WorkloadTls>,
    upstreams: upstream::Upstreams,
    metrics: Arc<WaypointMetrics>,
    shutdown: watch::Receiver<bool>,
    /// Resumable client streams whose tunnel broke, waiting for their client's re-dial.
    parking: Arc<Parking>,
}

impl Waypoint {
    /// A waypoint: fetches its certificate (waiting for the CA), sets up its connection pools.
    pub async fn new(
        inputs: WaypointInputs,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Waypoint>, Error> {
        let identity = inputs.cfg.identity();
        let cert = inputs
            .certs
            .get(&identity)
            .await
            .map_err(|source| Error::Certificate {
                identity: identity.clone(),
                source,
            })?;
        let tls = Arc::new(WorkloadTls::new(cert)?);
        let base = &inputs.cfg.base;
        // The waypoint's own sockets carry no mark: its pod is not captured (Istio's waypoints are not).
        let sock = SocketOpts::default();
        let hbone = Pool::new(
            base.pool,
            base.h2,
            sock,
            None,
            base.keepalive,
            base.connect_timeout,
        );
        let upstreams = upstream::Upstreams::new(upstream::UpstreamSettings {
            hbone,
            tls: tls.clone(),
            identity: identity.clone(),
            sock,
            keepalive: base.keepalive,
            connect_timeout: base.connect_timeout,
            h2: base.h2,
            idle_timeout: base.pool.unused_release_timeout,
            network: base.network.clone(),
            resume: base.resumable_streams.then_some(base.resume_wait),
        });
        Ok(Arc::new(Waypoint {
            cfg: inputs.cfg,
            identity,
            config: inputs.config,
            tls,
            upstreams,
            metrics: inputs.metrics,
            shutdown,
            parking: Arc::default(),
        }))
    }

    /// The waypoint's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The current configuration.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.borrow().clone()
    }

    /// HBONE connections open to endpoints' node proxies.
    pub fn hbone_connections(&self) -> usize {
        self.upstreams.hbone_connections()
    }

    /// HTTP connections (HBONE streams or TCP connections) opened to endpoints so far.
    pub fn upstream_http_connections(&self) -> u64 {
        self.upstreams.opened()
    }

    /// The request metrics.
    pub fn metrics(&self) -> &Arc<WaypointMetrics> {
        &self.metrics
    }

    /// Serves HBONE on `listener` until shutdown; then open tunnels get `termination_deadline` to finish.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        crate::hbone::listener::accept_loop(
            listener,
            &self.cfg.base,
            self.shutdown.clone(),
            move |stream, peer| me.clone().connection(stream, peer),
        )
        .await;
        tracing::info!("waypoint stopped");
    }

    /// One client HBONE connection: mTLS with the waypoint's certificate, then its CONNECT streams.
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let me = self.clone();
        crate::hbone::listener::terminate(
            stream,
            peer,
            &self.cfg.base,
            self.tls.current().server_config(),
            "waypoint",
            self.shutdown.clone(),
            move |incoming, peer_id| me.clone().stream(incoming, peer, peer_id),
        )
        .await;
    }

    /// One CONNECT stream: where it goes, what it speaks, and the matching handler.
    async fn stream(
        self: Arc<Self>,
        incoming: server::Incoming,
        peer: SocketAddr,
        peer_id: Identity,
    ) {
        if incoming.request.method() != Method::CONNECT {
            tracing::info!(target: "access", reporter = "waypoint", src.addr = %peer, src.identity = %peer_id, method = %incoming.request.method(), "stream refused: not CONNECT");
            incoming.refuse(StatusCode::BAD_REQUEST);
            return;
        }
        let authority = incoming
            .request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let protocol = {
            let snap = self.snapshot();
            match snap.destination(&authority) {
                Some(snapshot::Destination::Service { service, port, .. }) => {
                    service.port(port).map(|p| p.protocol)
                }
                Some(snapshot::Destination::Workload { .. }) => None,
                None => {
                    tracing::info!(
                        target: "access", reporter = "waypoint", src.addr = %peer, src.identity = %peer_id, dst.hbone_addr = %authority,
                        waypoint = snap.waypoint_name().unwrap_or("-"),
                        "stream refused: no service or workload bound to this waypoint there"
                    );
                    incoming.refuse(StatusCode::SERVICE_UNAVAILABLE);
                    return;
                }
            }
        };
        // A meshnode client's resumable stream (issue 17): its node proxy can be upgraded under it.
        let base = &self.cfg.base;
        let offered = match parking::requested(base.resumable_streams, incoming.request.headers()) {
            None => None,
            Some(Err(e)) => {
                tracing::info!(target: "access", reporter = "waypoint", src.addr = %peer, src.identity = %peer_id, error = %e, "stream refused (answered 400)");
                incoming.refuse(StatusCode::BAD_REQUEST);
                return;
            }
            // A re-dial of a stream whose tunnel broke: its own task carries on with this stream.
            Some(Ok(header)) if header.at.is_some() => {
                if let Err(refused) = self.parking.resume(incoming, header, &peer_id) {
                    let status = refused.status().as_u16();
                    tracing::info!(target: "access", reporter = "waypoint", src.addr = %peer, src.identity = %peer_id, error = %refused, "resume refused (answered {status})");
                }
                return;
            }
            Some(Ok(header)) => Some(header.token),
        };
        let answer = offered.map_or_else(http::HeaderMap::new, parking::echo);
        let (send, recv) = match incoming.accept(answer) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "HBONE stream gone before the answer");
                return;
            }
        };
        let slot = crate::hbone::pool::Slot::unpooled();
        let io = match offered {
            None => crate::hbone::tunnel::Tunnel::new(send, recv, slot),
            Some(token) => {
                let recover = Recover::Park {
                    parking: self.parking.clone(),
                    identity: peer_id.clone(),
                    max: base.max_connections,
                };
                let piped = Piped::spawn(send, recv, slot, token, base.resume_wait, recover);
                crate::hbone::tunnel::Tunnel::piped(piped)
            }
        };
        let timeout = self.cfg.header_read_timeout;
        let (detected, io) = match protocol {
            Some(snapshot::PortProtocol::Tcp) => (
                sniff::Detected::Tcp,
                sniff::Rewind::new(bytes::Bytes::new(), io),
            ),
            Some(snapshot::PortProtocol::Http1 | snapshot::PortProtocol::Http2) => {
                match sniff::detect(io, true, timeout).await {
                    Ok(d) => d,
                    Err(_) => return,
                }
            }
            Some(snapshot::PortProtocol::Unknown) | None => {
                match sniff::detect(io, false, timeout).await {
                    Ok(d) => d,
                    Err(_) => return,
                }
            }
        };
        match detected {
            sniff::Detected::Tcp => {
                let start = std::time::Instant::now();
                match tcp::proxy(self.clone(), io, peer, &peer_id, &authority).await {
                    Ok((recv, sent)) => tracing::info!(
                        target: "access", reporter = "waypoint", src.addr = %peer, src.identity = %peer_id,
                        dst.hbone_addr = %authority, protocol = "tcp", bytes_recv = recv, bytes_sent = sent,
                        duration = %format!("{}ms", start.elapsed().as_millis()), "connection complete"
                    ),
                    Err(e) => tracing::info!(
                        target: "access", reporter = "waypoint", src.addr = %peer, src.identity = %peer_id,
                        dst.hbone_addr = %authority, protocol = "tcp", error = %e, "connection refused"
                    ),
                }
            }
            d => {
                let info = downstream::StreamInfo {
                    peer,
                    peer_id,
                    authority,
                    h2: d == sniff::Detected::Http2,
                };
                downstream::serve(self, io, d, info).await;
            }
        }
    }
}
