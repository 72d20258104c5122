//! Waypoints in the state: which waypoint a service names for one connection, resolving a waypoint to
//! the workload to dial, whether a workload is (an instance of) a waypoint, and whether a connection
//! comes from the waypoint itself — ztunnel's `sample_weighted_waypoint`, `fetch_waypoint`,
//! `check_gateway_address` and `check_from_waypoint`.
//!
//! Input: a [`State`] snapshot and a [`GatewayAddress`]. Output: an [`Upstream`] whose `addr` is the
//! waypoint's HBONE address (`ip:hbone_mtls_port`, after the waypoint service's port mapping when it is
//! referenced through one) and whose `expected_identities` are the chosen waypoint workload's identity
//! plus its service's subject alt names; or a [`WaypointError`] saying why there is nothing to dial.
//! Callers refuse the connection on an error: traffic that must pass a waypoint never goes direct.
//!
//! Resolution, as ztunnel's:
//! - `network/ip`: the service with that VIP (its endpoints load-balanced on the HBONE port; a workload
//!   with an application tunnel is accepted even if the service lacks the port), else the workload at
//!   that address;
//! - `namespace/hostname`: the service of exactly that namespace and hostname (load-balanced as above, the
//!   address family following the connection's), else a workload known by that hostname.

use std::net::{IpAddr, SocketAddr};

use rand::Rng;

use super::{GatewayAddress, GatewayDestination, LbMode, Service, State, Upstream, Workload};

/// Why a waypoint could not be resolved to something to dial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaypointError {
    /// No service or workload in the state answers to the waypoint's address or hostname.
    #[error("is not in the state")]
    NotFound,
    /// The waypoint's service has no endpoint able to take HBONE on the port (none healthy, or none
    /// mapping the port).
    #[error("has no healthy endpoint for its HBONE port")]
    NoEndpoint,
    /// The waypoint workload has no address to dial (no IP of a usable family, or port 0).
    #[error("has no usable address")]
    NoAddress,
    /// The chosen waypoint workload is on another network, which has no east-west gateway to reach it
    /// through (it is never dialled directly).
    #[error("is on network {network:?}, which has no network gateway to reach it through")]
    OtherNetwork {
        /// The waypoint workload's network.
        network: String,
    },
}

impl WaypointError {
    /// A short, fixed label value for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            WaypointError::NotFound => "not_found",
            WaypointError::NoEndpoint => "no_endpoint",
            WaypointError::NoAddress => "no_address",
            WaypointError::OtherNetwork { .. } => "other_network",
        }
    }
}

/// What the hop checking [`State::from_waypoint`] knows of where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAddr {
    /// The connection's source address, on this hop's network: a node proxy's client.
    Known(IpAddr),
    /// The connection came from another network, through double HBONE's outer tunnel (at the east-west
    /// gateway): its source address is a remote one (or the NAT's in front of it), not an address this
    /// network's state can name, so only the identity its certificate proves can be checked.
    OtherNetwork,
}

/// How a service's endpoints are filtered (ztunnel's `ServiceResolutionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolution {
    /// A connection addressed to the service: the port must be mapped.
    Standard,
    /// Reaching a waypoint through its service: a workload with an application tunnel and a tunnel
    /// port needs no mapping (the tunnel port is where its proxy delivers).
    Waypoint,
}

impl Service {
    /// The waypoint for one connection: a pick by weight among `weighted_waypoints` when there is one
    /// to pick (some weight above 0), else `waypoint`.
    pub fn pick_waypoint(&self) -> Option<&GatewayAddress> {
        let total: u64 = self
            .weighted_waypoints
            .iter()
            .map(|w| u64::from(w.weight))
            .sum();
        if total == 0 {
            return self.waypoint.as_deref();
        }
        let mut pick = rand::rng().random_range(0..total);
        for w in &self.weighted_waypoints {
            let weight = u64::from(w.weight);
            if pick < weight {
                return Some(&w.destination);
            }
            pick -= weight;
        }
        self.waypoint.as_deref()
    }
}

/// A service or a workload found by address or hostname (ztunnel's `Address`).
#[derive(Debug, Clone, Copy)]
pub enum Found<'a> {
    /// A workload.
    Workload(&'a std::sync::Arc<Workload>),
    /// A service.
    Service(&'a std::sync::Arc<Service>),
}

impl<'a> Found<'a> {
    /// Every waypoint the found object names: a workload's `waypoint`; a service's `waypoint` and its
    /// `weighted_waypoints` (any of which may carry a connection to it).
    pub fn waypoints(&self) -> impl Iterator<Item = &'a GatewayAddress> + 'a {
        let (primary, weighted) = match *self {
            Found::Workload(w) => (w.waypoint.as_deref(), &[][..]),
            Found::Service(s) => (s.waypoint.as_deref(), &s.weighted_waypoints[..]),
        };
        primary
            .into_iter()
            .chain(weighted.iter().map(|w| &w.destination))
    }
}

impl State {
    /// The service with exactly this namespace and hostname.
    pub fn service_by_namespaced_host(
        &self,
        namespace: &str,
        hostname: &str,
    ) -> Option<&std::sync::Arc<Service>> {
        self.by_host
            .get(hostname)?
            .iter()
            .map(|&i| &self.services[i])
            .find(|s| s.namespace == namespace)
    }

    /// A workload known by `hostname` in `namespace`.
    pub fn workload_by_hostname(
        &self,
        namespace: &str,
        hostname: &str,
    ) -> Option<&std::sync::Arc<Workload>> {
        self.by_workload_host
            .get(hostname)?
            .iter()
            .map(|&i| &self.workloads[i])
            .find(|w| w.namespace == namespace)
    }

    /// What is at `ip` on `network`: a workload first, then a service VIP (ztunnel's `find_address`,
    /// with no namespace preference among services sharing the VIP beyond canonical ones).
    pub fn address_at(&self, network: &str, ip: IpAddr) -> Option<Found<'_>> {
        self.workload_by_addr(network, ip)
            .map(Found::Workload)
            .or_else(|| self.service_by_vip(network, ip, "").map(Found::Service))
    }

    /// What a gateway address names, without load balancing: for `network/ip` as [`State::address_at`],
    /// for `namespace/hostname` the service of that name, else a workload of that hostname.
    pub fn gateway_target(&self, gw: &GatewayAddress) -> Option<Found<'_>> {
        match &gw.destination {
            GatewayDestination::Address { network, ip } => self.address_at(network, *ip),
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => self
                .service_by_namespaced_host(namespace, hostname)
                .map(Found::Service)
                .or_else(|| {
                    self.workload_by_hostname(namespace, hostname)
                        .map(Found::Workload)
                }),
        }
    }

    /// Whether some workload behind `gw` — the workload it names, or any endpoint of the service it
    /// names — satisfies `pred` (ztunnel's `check_gateway_address`).
    pub fn waypoint_has(&self, gw: &GatewayAddress, pred: impl Fn(&Workload) -> bool) -> bool {
        match self.gateway_target(gw) {
            Some(Found::Workload(w)) => pred(w),
            Some(Found::Service(s)) => s
                .endpoints
                .iter()
                .any(|ep| pred(&self.workloads[ep.workload])),
            None => false,
        }
    }

    /// ztunnel's `check_from_waypoint`: whether a connection from `identity` (at `source`) comes from
    /// one of `waypoints` itself — a workload behind one of them (see [`State::waypoint_has`]) with that
    /// identity and, when the source address is known, that address among its own. A node proxy checks
    /// both; the east-west gateway only the identity ([`SourceAddr::OtherNetwork`]).
    pub fn from_waypoint<'a>(
        &self,
        waypoints: impl IntoIterator<Item = &'a GatewayAddress>,
        identity: &crate::identity::Identity,
        source: SourceAddr,
    ) -> bool {
        let is_source = |w: &Workload| {
            w.identity == *identity
                && match source {
                    SourceAddr::Known(ip) => w.ips.contains(&ip),
                    SourceAddr::OtherNetwork => true,
                }
        };
        waypoints
            .into_iter()
            .any(|gw| self.waypoint_has(gw, is_source))
    }

    /// The waypoint workload `src` should dial for `gw`, for a connection the app addressed to
    /// `original_dst` (whose address family a hostname-referenced waypoint follows). A waypoint workload
    /// on another network is returned only when its network has a gateway (the caller then goes through
    /// it, double HBONE); its address is not for dialling.
    pub fn resolve_waypoint(
        &self,
        gw: &GatewayAddress,
        src: &Workload,
        original_dst: SocketAddr,
    ) -> Result<Upstream, WaypointError> {
        let up = self.resolve_gateway(gw, Some(src), original_dst, Resolution::Waypoint)?;
        if up.workload.network != src.network {
            if up.workload.network_gateway.is_none() {
                return Err(WaypointError::OtherNetwork {
                    network: up.workload.network.to_string(),
                });
            }
            return Ok(up);
        }
        usable(up)
    }

    /// The workload to dial for gateway address `gw`, for no client in particular: a network's
    /// east-west gateway (ztunnel's `fetch_network_gateway`), or a waypoint as that gateway sees it. By
    /// address, the workload (or a service's endpoint) there; by hostname, an endpoint of that service,
    /// the address family following `original_dst`'s. No network rule applies (a network gateway sits on
    /// the far network by definition); it must have an address.
    pub fn resolve_gateway_address(
        &self,
        gw: &GatewayAddress,
        original_dst: SocketAddr,
    ) -> Result<Upstream, WaypointError> {
        usable(self.resolve_gateway(gw, None, original_dst, Resolution::Standard)?)
    }

    /// What `gw` resolves to, load-balanced for `client` (ranking, and the network rule for endpoints)
    /// when given. No check of the result's address or network.
    fn resolve_gateway(
        &self,
        gw: &GatewayAddress,
        client: Option<&Workload>,
        original_dst: SocketAddr,
        mode: Resolution,
    ) -> Result<Upstream, WaypointError> {
        let port = gw.hbone_mtls_port;
        let namespace = client.map_or("", |c| c.namespace.as_str());
        Ok(match &gw.destination {
            GatewayDestination::Address { network, ip } => {
                if let Some(svc) = self.service_by_vip(network, *ip, namespace) {
                    // A passthrough service has no endpoint to pick: nothing names a waypoint workload.
                    if svc.lb_mode == LbMode::Passthrough {
                        return Err(WaypointError::NotFound);
                    }
                    self.pick_endpoint_in(svc, port, *ip, client, mode, &|_| true)
                        .ok_or(WaypointError::NoEndpoint)?
                } else if let Some(w) = self.workload_by_addr(network, *ip) {
                    // Referenced by its address: that address, whatever the connection's family.
                    self.upstream(w.clone(), SocketAddr::new(*ip, port), None)
                } else {
                    return Err(WaypointError::NotFound);
                }
            }
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => {
                if let Some(svc) = self.service_by_namespaced_host(namespace, hostname) {
                    self.pick_endpoint_in(svc, port, original_dst.ip(), client, mode, &|_| true)
                        .ok_or(WaypointError::NoEndpoint)?
                } else if let Some(w) = self.workload_by_hostname(namespace, hostname) {
                    // A workload known only by hostname would need DNS; ztunnel resolves it on demand,
                    // this proxy does not.
                    let ip = super::pick_ip(&w.ips, original_dst.ip())
                        .ok_or(WaypointError::NoAddress)?;
                    self.upstream(w.clone(), SocketAddr::new(ip, port), None)
                } else {
                    return Err(WaypointError::NotFound);
                }
            }
        })
    }
}

/// `up` when its address can be dialled.
fn usable(up: Upstream) -> Result<Upstream, WaypointError> {
    if up.addr.port() == 0 || up.addr.ip().is_unspecified() {
        return Err(WaypointError::NoAddress);
    }
    Ok(up)
}

#[cfg(test)]
mod tests;
