//! Plain TCP through the waypoint: a client tunnel whose port is TCP (declared, or sniffed as not HTTP) is
//! joined to one endpoint, bytes copied both ways, as Envoy's `tcp_proxy` does on a waypoint's TCP chain.
//!
//! Input: the accepted client tunnel (sniffed bytes in front), the destination and the client. Output: the
//! bytes copied, then both sides closed (half-close carried across). Authorization runs with the L4 facts
//! only (no method, path or headers); a denial, an unknown port, a cluster with no endpoint or an endpoint
//! that cannot be reached resets the client's stream, as Envoy closes the connection. The endpoint is picked
//! from the port's TCP clusters by weight (else its default cluster), and reached like any other
//! ([`Upstreams::connect`](super::upstream::Upstreams::connect)). Counted in the `istio_tcp_*` families
//! (reporter `waypoint`) from the moment an endpoint is chosen; `response_flags` `UF` when it could not be
//! reached.

use std::sync::Arc;

use rand::Rng;

use super::authz::{self, Decision};
use super::balance::Outcome;
use super::metrics::{labels, TcpLabels};
use super::snapshot::{pick_weighted, Destination, Endpoint};
use super::sniff::Rewind;
use super::Waypoint;
use crate::hbone::tunnel::Tunnel;
use crate::identity::Identity;

/// Why a TCP stream was not joined to an endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// Authorization denied it.
    #[error("denied by {0}")]
    Denied(String),
    /// The configuration no longer serves the destination, or not this port.
    #[error("no service port or workload for {0}")]
    NoRoute(String),
    /// No endpoint is available.
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// The endpoint could not be reached.
    #[error(transparent)]
    Connect(#[from] super::upstream::Error),
}

/// Joins the client tunnel to an endpoint of `authority`'s service (or to the bound workload).
pub async fn proxy(
    wp: Arc<Waypoint>,
    mut io: Rewind<Tunnel>,
    peer: std::net::SocketAddr,
    peer_id: &Identity,
    authority: &str,
) -> Result<(u64, u64), Refused> {
    let snap = wp.snapshot();
    let refuse = |io: &mut Rewind<Tunnel>, r: Refused| {
        io.get_mut().reset();
        Err(r)
    };
    let Some(dest) = snap.destination(authority) else {
        return refuse(&mut io, Refused::NoRoute(authority.to_string()));
    };
    let (addr, service) = match &dest {
        Destination::Service { service, addr, .. } => (*addr, Some(*service)),
        Destination::Workload { addr, .. } => (*addr, None),
    };
    let service_address = service.and_then(|s| s.address.clone());
    let principal = peer_id.to_string();
    let headers = http::HeaderMap::new();
    let areq = authz::Request {
        method: "",
        path: "",
        host: "",
        headers: &headers,
        source_principal: Some(&principal),
        source_ip: peer.ip(),
        destination_ip: addr.ip(),
        destination_port: addr.port(),
    };
    let wide = snap.authz().map_or(Decision::Allow, |a| a.check(&areq));
    let decision = match (wide, service) {
        (Decision::Allow, Some(s)) => s.authz.check(&areq),
        (d, _) => d,
    };
    if let Decision::Deny { policy } = decision {
        return refuse(&mut io, Refused::Denied(policy));
    }
    let (ep, cluster) = match dest {
        Destination::Workload { workload, addr } => (
            Endpoint {
                workload,
                addr,
                crossing: None,
            },
            None,
        ),
        Destination::Service { service, port, .. } => {
            let Some(bound) = service.port(port) else {
                return refuse(&mut io, Refused::NoRoute(authority.to_string()));
            };
            let name = pick_weighted(&bound.tcp, |total| rand::rng().random_range(0..total))
                .unwrap_or(&bound.default_cluster);
            let Some(cluster) = snap.cluster(name) else {
                return refuse(&mut io, Refused::NoHealthyUpstream);
            };
            let picked = cluster
                .endpoints
                .pick(std::time::Instant::now(), None)
                .and_then(|uid| Some((snap.endpoint(cluster, uid, addr.ip())?, uid.to_string())));
            let Some((ep, uid)) = picked else {
                return refuse(&mut io, Refused::NoHealthyUpstream);
            };
            (ep, Some((cluster.clone(), uid)))
        }
    };
    // Held for the connection's life: the cluster's connection budget.
    let _permit = match &cluster {
        Some((c, _)) => match c.endpoints.admit() {
            Some(p) => Some(p),
            None => return refuse(&mut io, Refused::NoHealthyUpstream),
        },
        None => None,
    };
    let tcp_labels = |flags| -> TcpLabels {
        labels(
            peer_id,
            snap.client(peer.ip(), peer_id).map(|w| &**w),
            service_address.as_deref(),
            Some(&ep.workload),
            flags,
        )
        .into()
    };
    wp.metrics.tcp_opened(&tcp_labels("-"));
    let connect_timeout = cluster
        .as_ref()
        .map_or(wp.upstreams.defaults().connect_timeout, |(c, _)| {
            c.endpoints.limits().connect_timeout
        });
    let upstream = wp.upstreams.connect(&ep, connect_timeout).await;
    if let Some((c, uid)) = &cluster {
        let outcome = if upstream.is_ok() {
            Outcome::Success
        } else {
            Outcome::ConnectFailure
        };
        c.endpoints.record(uid, outcome, std::time::Instant::now());
    }
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            wp.metrics.tcp_closed(&tcp_labels("UF"), 0, 0);
            return refuse(&mut io, e.into());
        }
    };
    tracing::debug!(src.addr = %peer, dst.addr = %ep.addr, "TCP stream joined to endpoint");
    let copied = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
    let (received, sent) = copied.unwrap_or((io.get_ref().read, io.get_ref().written));
    wp.metrics.tcp_closed(&tcp_labels("-"), received, sent);
    Ok((received, sent))
}
