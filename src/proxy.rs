//! The proxy for one workload: its listeners' accept loops and the state every connection handler shares.
//!
//! Input: [`ProxyInputs`] (config, state, certificates, the workload it acts for, socket options) and three
//! bound listeners. Output: connections carried — outbound ones ([`outbound`], :15001) into HBONE or plain
//! TCP, or to the waypoint the destination names; HBONE ones ([`inbound`], :15008) and plaintext ones
//! ([`passthrough`], :15006) to the application, with a PROXY protocol header ([`proxy_protocol`]) when
//! the local workload's application tunnel asks for one.
//! Each listener admits at most `max_connections` at once, and the whole process at most
//! `max_connections_total` ([`limits`], shared by every proxy built from one config); at shutdown a listener
//! stops accepting and waits for its connections up to the termination deadline. Accepted and outgoing
//! sockets carry TCP keepalive as configured. Inbound connections are registered with
//! [`connections`], which re-checks them when policies change; [`metrics`](crate::metrics) counts them,
//! and `access` writes one access line for each, in ztunnel's shape. With `MESHNODE_RESUMABLE_STREAMS`,
//! `resumable` offers, accepts and resumes HBONE streams that outlive their HBONE connection, and with
//! `MESHNODE_HANDOVER_SOCKET` [`handover`] hands them, and plain TCP connections (copied by `plain`, a
//! copy that can pause), to the process that replaces this one on an upgrade (and adopts them there).

mod access;
pub mod connections;
pub mod handover;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod passthrough;
mod plain;
pub mod proxy_protocol;
mod resumable;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::config::{Config, WorkloadInfo};
use crate::hbone::pool::Pool;
use crate::identity::{CertManager, Identity};
use crate::metrics::{Metrics, WaypointBinding};
use crate::netns::InpodNetns;
use crate::socket::{self, SocketOpts};
use crate::state::{GatewayAddress, Service, State, StateHandle, WaypointError, Workload};
use crate::tls::WorkloadTls;

/// How long a connection waits for its workload to appear in the state (ztunnel: 5 s).
const WORKLOAD_WAIT: Duration = Duration::from_secs(5);

/// Why a connection was not carried. Expected refusals, logged at the edge; never a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The workload this proxy acts for is not (yet) in the state.
    #[error("workload {0:?} not found in state")]
    UnknownWorkload(WorkloadInfo),
    /// No certificate for an identity.
    #[error("no certificate for {identity}: {reason}")]
    Certificate {
        /// The identity.
        identity: Identity,
        /// Why.
        reason: String,
    },
    /// The destination would loop back into the proxy.
    #[error("destination {0} is one of the proxy's own ports")]
    SelfCall(SocketAddr),
    /// A service had no endpoint able to take the connection.
    #[error("no healthy upstream for service {service} port {port}")]
    NoHealthyUpstream {
        /// `namespace/hostname`.
        service: String,
        /// The service port.
        port: u16,
    },
    /// Traffic that must pass a waypoint could not be sent to it: refused, never sent direct. Boxed:
    /// a rare refusal, kept from growing every `Result` of the data path.
    #[error(transparent)]
    Waypoint(Box<WaypointRefusal>),
    /// The destination is on another network that has no east-west gateway: it is never dialled
    /// directly.
    #[error(
        "{workload} is on network {network:?}, which has no network gateway to reach it through"
    )]
    NoNetworkGateway {
        /// The destination workload (uid).
        workload: String,
        /// Its network.
        network: String,
    },
    /// The east-west gateway of the destination's network could not be resolved to something to dial.
    #[error("network gateway {gateway} of network {network:?} {reason}")]
    NetworkGateway {
        /// The destination's network.
        network: String,
        /// The gateway as the state names it.
        gateway: GatewayAddress,
        /// Why.
        reason: WaypointError,
    },
    /// A CONNECT authority HTTP cannot carry (a service hostname that is no valid URI authority).
    #[error("{0:?} cannot be a CONNECT authority")]
    BadAuthority(String),
    /// The upstream could not be reached.
    #[error("connecting to {dst}: {source}")]
    Connect {
        /// Where.
        dst: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HBONE tunnel could not be opened.
    #[error(transparent)]
    Hbone(#[from] crate::hbone::pool::Error),
    /// A workload known only by hostname could not be resolved.
    #[error("resolving {host}: {reason}")]
    Resolve {
        /// The hostname.
        host: String,
        /// Why.
        reason: String,
    },
    /// The original destination could not be read.
    #[error("reading original destination: {0}")]
    OriginalDst(std::io::Error),
    /// Authorization denied the connection.
    #[error("connection denied: {0}")]
    Denied(crate::authz::DenyReason),
    /// Copying failed mid-stream.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// How an outbound failure to open the connection is flagged in the metrics, as ztunnel flags it.
    pub fn response_flags(&self) -> crate::metrics::ResponseFlags {
        use crate::hbone::pool::Error as P;
        use crate::metrics::ResponseFlags as F;
        let hbone = match self {
            Error::Hbone(e) => e,
            Error::Waypoint(w) => match &w.problem {
                WaypointProblem::Unreachable { source, .. } => source,
                _ => return F::Connect,
            },
            Error::Certificate { .. } => return F::IdentityError,
            Error::Denied(_) => return F::Deny,
            _ => return F::Connect,
        };
        let mut hbone = hbone;
        while let P::Inner(inner) = hbone {
            hbone = inner;
        }
        match hbone {
            P::Connect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
                F::NetworkPolicy
            }
            P::Connect { .. } => F::Connect,
            P::Tls { .. } => F::TlsFailure,
            P::H2 { .. } | P::Timeout { .. } => F::H2HandshakeFailure,
            P::Status { .. } | P::Inner(_) => F::Connect,
        }
    }
}

/// Why a connection that must pass a waypoint was refused.
#[derive(Debug, thiserror::Error)]
#[error("{binding:?} {target} must pass waypoint {waypoint}, which {problem}; connection refused")]
pub struct WaypointRefusal {
    /// Whether the service or the workload addressed named the waypoint.
    pub binding: WaypointBinding,
    /// The service (`namespace/hostname`) or workload (uid) addressed.
    pub target: String,
    /// The waypoint as the state names it.
    pub waypoint: GatewayAddress,
    /// What went wrong.
    pub problem: WaypointProblem,
}

/// [`WaypointRefusal::problem`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaypointProblem {
    /// It could not be resolved to a workload to dial.
    #[error("{0}")]
    Unresolved(WaypointError),
    /// The HBONE tunnel to it could not be opened.
    #[error("is unreachable at {addr}: {source}")]
    Unreachable {
        /// The waypoint workload's HBONE address that was dialled.
        addr: SocketAddr,
        /// Why the tunnel failed.
        source: crate::hbone::pool::Error,
    },
}

impl WaypointRefusal {
    /// The `meshnode_waypoint_unavailable_total` labels of this refusal.
    pub fn labels(&self) -> crate::metrics::WaypointLabels {
        let reason = match &self.problem {
            WaypointProblem::Unresolved(e) => e.into(),
            WaypointProblem::Unreachable { .. } => crate::metrics::WaypointFailure::unreachable,
        };
        crate::metrics::WaypointLabels::new(&self.waypoint, self.binding, reason)
    }
}

/// Everything a workload's proxy needs, built once and shared by its connections.
pub struct ProxyInputs {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Mesh state.
    pub state: StateHandle,
    /// Certificates.
    pub certs: Arc<CertManager>,
    /// The workload this proxy acts for.
    pub workload: WorkloadInfo,
    /// Options for sockets towards peers (mark).
    pub sock: SocketOpts,
    /// Keep the client's address towards the application (IP_TRANSPARENT + freebind).
    pub orig_src: bool,
    /// In-pod mode: the pod's network namespace, where every socket towards peers and the application is
    /// created. `None`: the proxy's own namespace (dedicated mode).
    pub netns: Option<Arc<InpodNetns>>,
    /// The process's metrics, shared by every proxy (one registry per process).
    pub metrics: Arc<Metrics>,
    /// Resolves the hostnames of workloads that have no address when a connection is routed to one;
    /// `None`: such workloads cannot be reached.
    pub resolver: Option<Arc<crate::dns::Resolver>>,
    /// The process's hand-over to the process that replaces it (`MESHNODE_HANDOVER_SOCKET` with resumable
    /// streams), and this proxy's pod in it; `None`: connections drain at shutdown.
    pub handover: Option<handover::Slot>,
}

/// One workload's proxy.
pub struct Proxy {
    inputs: ProxyInputs,
    pool: Pool,
    tls: Mutex<HashMap<Identity, Arc<WorkloadTls>>>,
    conns: Arc<connections::ConnectionManager>,
    outbound_conns: Arc<connections::OutboundList>,
    shutdown: watch::Receiver<bool>,
    /// `x-forwarded-network` for the inner CONNECT of a connection through an east-west gateway: this
    /// proxy's network, built once (`None`: no network configured, the header is not sent).
    forwarded_network: Option<http::HeaderValue>,
    /// Resumable streams whose tunnel broke, waiting for the client's re-dial.
    parking: resumable::Parking,
}

/// The three listeners of a proxy.
pub struct Listeners {
    /// :15001.
    pub outbound: TcpListener,
    /// :15008.
    pub inbound: TcpListener,
    /// :15006.
    pub inbound_plaintext: TcpListener,
}

impl Listeners {
    /// Binds the proxy ports on the wildcard address of the current network namespace.
    pub fn bind(cfg: &Config, opts: SocketOpts) -> std::io::Result<Listeners> {
        let bind = |port| {
            socket::listen(cfg.wildcard(port), opts).map_err(|e| {
                std::io::Error::new(e.kind(), format!("binding {}: {e}", cfg.wildcard(port)))
            })
        };
        Ok(Listeners {
            outbound: bind(cfg.ports.outbound)?,
            inbound: bind(cfg.ports.inbound)?,
            inbound_plaintext: bind(cfg.ports.inbound_plaintext)?,
        })
    }
}

impl Proxy {
    /// A proxy for `inputs.workload`; `shutdown` turning true starts the drain.
    pub fn new(inputs: ProxyInputs, shutdown: watch::Receiver<bool>) -> Arc<Proxy> {
        let cfg = &inputs.cfg;
        let pool = Pool::new(
            cfg.pool,
            cfg.h2,
            inputs.sock,
            inputs.netns.clone(),
            cfg.keepalive,
            cfg.connect_timeout,
        );
        // Plaintext connections are bounded by one listener's `max_connections`; HBONE streams (many per
        // connection) share the rest.
        let conns = connections::ConnectionManager::new(cfg.max_connections.saturating_mul(2));
        let forwarded_network = crate::hbone::double::network_header(&cfg.network);
        Arc::new(Proxy {
            inputs,
            pool,
            tls: Mutex::default(),
            conns,
            outbound_conns: Arc::default(),
            shutdown,
            forwarded_network,
            parking: resumable::Parking::default(),
        })
    }

    /// The configuration.
    pub fn cfg(&self) -> &Config {
        &self.inputs.cfg
    }

    /// The connection pool (tests look at it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The registry of open inbound connections (tests look at it).
    pub fn connections(&self) -> &connections::ConnectionManager {
        &self.conns
    }

    /// The open connections, inbound and outbound, as the admin port lists them.
    pub fn listed_connections(&self) -> (Vec<connections::Listed>, Vec<connections::Listed>) {
        (self.conns.list(), self.outbound_conns.list())
    }

    /// The metrics this proxy records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inputs.metrics
    }

    /// The workload this proxy acts for, waiting briefly for it to appear in the state.
    pub async fn local_workload(&self) -> Result<Arc<Workload>, Error> {
        let info = &self.inputs.workload;
        self.inputs
            .state
            .wait_for(WORKLOAD_WAIT, |s| s.workload_by_info(info).cloned())
            .await
            .ok_or_else(|| Error::UnknownWorkload(info.clone()))
    }

    /// TLS material for `id`, fetching its certificate on first use.
    pub async fn tls_for(&self, id: &Identity) -> Result<Arc<WorkloadTls>, Error> {
        if let Some(t) = self.tls.lock().get(id) {
            return Ok(t.clone());
        }
        let cert_error = |reason: String| Error::Certificate {
            identity: id.clone(),
            reason,
        };
        let rx = self
            .inputs
            .certs
            .get(id)
            .await
            .map_err(|e| cert_error(e.to_string()))?;
        let tls = Arc::new(WorkloadTls::new(rx).map_err(|e| cert_error(e.to_string()))?);
        Ok(self.tls.lock().entry(id.clone()).or_insert(tls).clone())
    }

    /// Runs the three accept loops until shutdown, then drains. Returns once every connection has ended or
    /// the termination deadline has passed.
    pub async fn serve(self: &Arc<Self>, listeners: Listeners) {
        let out = {
            let p = self.clone();
            self.accept_loop(listeners.outbound, "outbound", move |s, peer| {
                p.clone().outbound(s, peer)
            })
        };
        let inb = {
            let p = self.clone();
            self.accept_loop(listeners.inbound, "inbound", move |s, peer| {
                p.clone().inbound(s, peer)
            })
        };
        let plain = {
            let p = self.clone();
            self.accept_loop(
                listeners.inbound_plaintext,
                "inbound_plaintext",
                move |s, peer| p.clone().inbound_plaintext(s, peer),
            )
        };
        // The watcher lives as long as the listeners and their drain.
        let accept = async { tokio::join!(out, inb, plain) };
        tokio::pin!(accept);
        tokio::select! {
            _ = &mut accept => {}
            _ = self.clone().watch_policies() => {
                tracing::debug!("state channel closed; inbound connections are no longer re-checked");
                accept.await;
            }
        }
    }

    async fn accept_loop<H, F>(&self, listener: TcpListener, name: &'static str, handle: H)
    where
        H: Fn(TcpStream, SocketAddr) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let max = self.cfg().max_connections;
        let limit = Arc::new(Semaphore::new(max));
        let mut shutdown = self.shutdown.clone();
        // Set when the termination deadline passes: connections still open are dropped (closed) then.
        let force_close = crate::task::CancellationToken::new();
        let admission = self.cfg().admission.clone();
        let keepalive = self.cfg().keepalive;
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Room in the process, taken only once a connection is here (an idle listener must not
                    // hold a share). While it waits, this listener accepts nothing more: further
                    // connections wait in the kernel backlog.
                    // Biased: a connection already accepted when the shutdown comes is served (the
                    // drain waits for it), not dropped (a reset), when room is there.
                    let permits = tokio::select! {
                        biased;
                        p = admission.connection() => (permit, p),
                        _ = shutdown.wait_for(|s| *s) => break,
                    };
                    let _ = socket::accepted(&stream);
                    if let Err(e) = socket::keepalive(&stream, &keepalive) {
                        tracing::debug!(listener = name, error = %e, "setting TCP keepalive failed");
                    }
                    let fut = handle(stream, socket::canonical(peer));
                    crate::task::spawn_guarded(fut, permits, Some(&force_close));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        let deadline = self.cfg().termination_deadline;
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        if tokio::time::timeout(deadline, limit.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                listener = name,
                "connections still open at the termination deadline; closing them"
            );
            force_close.cancel();
        }
    }
}

/// The service of `workload` whose port maps to `target_port` on it (for metrics labels), if any.
fn service_for(state: &State, workload: &Workload, target_port: u16) -> Option<Arc<Service>> {
    workload.services.iter().find_map(|(key, ports)| {
        let (ns, host) = key.split_once('/')?;
        let svc = state.service_by_host(host, ns)?;
        let maps = ports.iter().any(|(_, p)| *p == target_port)
            || svc.ports.iter().any(|(_, p)| *p == target_port);
        (svc.namespace == ns && maps).then(|| svc.clone())
    })
}

impl Proxy {
    /// Takes over a connection the process this one replaces handed over (see [`handover`]): decoded
    /// here (before the future, which holds only what the connection's side needs), carried on by its
    /// side of the proxy: a resumable HBONE one (its app socket alone) by [`inbound`] or [`outbound`], a
    /// plain TCP one (both its sockets) by [`passthrough`] or [`outbound`].
    pub fn adopt(
        self: Arc<Self>,
        handed: crate::upgrade::handover::Handed,
        fds: crate::upgrade::handover::Fds,
    ) -> impl Future<Output = ()> + Send + 'static {
        use crate::upgrade::handover::Direction;
        let (direction, peer) = (handed.direction, handed.peer);
        /// A handed-over connection of either kind.
        enum Decoded {
            Resumable(handover::Adopted),
            Plain(handover::AdoptedPlain),
        }
        let adopted = match fds.peer {
            None => handover::Adopted::decode(handed, fds.app).map(Decoded::Resumable),
            Some(peer_socket) => {
                handover::AdoptedPlain::decode(handed, fds.app, peer_socket).map(Decoded::Plain)
            }
        };
        async move {
            let inbound = direction == Direction::Inbound;
            let carried = match adopted {
                Ok(Decoded::Resumable(a)) if inbound => self.adopt_inbound(a).await,
                Ok(Decoded::Resumable(a)) => self.adopt_outbound(a).await,
                Ok(Decoded::Plain(a)) if inbound => self.adopt_plain_inbound(a).await,
                Ok(Decoded::Plain(a)) => self.adopt_plain_outbound(a).await,
                Err(e) => Err(e),
            };
            if let Err(e) = carried {
                tracing::warn!(?direction, %peer, error = %e, "handed-over connection closed");
            }
        }
    }
}
