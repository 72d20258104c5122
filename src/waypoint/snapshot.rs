//! The waypoint's view of its configuration: one immutable, indexed snapshot built from the `Waypoint`
//! resource and the `istio.workload.Address` workloads and services.
//!
//! Input: the Address workloads and services (as the xDS client converted them) and this waypoint's
//! [`pb::Waypoint`], if received. Output: a [`Snapshot`] answering what the data path asks per stream and
//! per request — which bound service or workload a CONNECT's `:authority` names, the routes and policies of
//! a service port, a cluster's endpoints, an endpoint's address and identity, the client's workload — with
//! the decision engines ([`Authorizer`], [`RouteTable`], [`Endpoints`]) compiled once per snapshot.
//!
//! An endpoint on another network than the waypoint's (the `network` the snapshot is built for) is reached
//! only through its network's east-west gateway ([`Crossing`]: double HBONE, as the node proxy does it),
//! worked out once per cluster and network when the snapshot is built; one whose network has no gateway,
//! or one the snapshot cannot resolve (named by hostname, unknown: [`Unreachable`]), is no endpoint at
//! all. That is logged as a warning when it is new since the previous snapshot, not on every push.
//!
//! A cluster whose definition did not change keeps its [`Endpoints`] (and so its load-balancing position,
//! request budget and outlier state) from the previous snapshot. Building fails, naming the part, when an
//! engine refuses its input; [`check`] is the same validation for one resource, for the xDS client's NACK.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::authz::Authorizer;
use super::balance::Endpoints;
use super::routes::RouteTable;
use crate::identity::Identity;
use crate::proto::waypoint as pb;
use crate::state::{GatewayAddress, GatewayDestination, PortMap, Service, SharedStr, Workload};

/// Why a snapshot could not be built from a `Waypoint` resource.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy set did not compile.
    #[error("policies of {scope}: {source}")]
    Policies {
        /// `waypoint` or the service hostname.
        scope: String,
        /// The engine's reason.
        source: super::authz::Error,
    },
    /// A port's routes did not compile.
    #[error("routes of {hostname}:{port}: {source}")]
    Routes {
        /// The service.
        hostname: String,
        /// The port.
        port: u32,
        /// The engine's reason.
        source: super::routes::Error,
    },
    /// A port number is not a TCP port.
    #[error("{hostname}: port {port} is out of range")]
    Port {
        /// The service.
        hostname: String,
        /// The value.
        port: u32,
    },
    /// A port's protocol is not one this build knows.
    #[error("{hostname}:{port}: unknown protocol {value}")]
    Protocol {
        /// The service.
        hostname: String,
        /// The port.
        port: u32,
        /// The value.
        value: i32,
    },
}

/// How the bytes of a service port are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// Sniffed per stream.
    Unknown,
    /// HTTP/1.1 towards the endpoints (the client may speak either version).
    Http1,
    /// HTTP/2 towards the endpoints (HTTP2, GRPC).
    Http2,
    /// Bytes copied.
    Tcp,
}

/// One port of a bound service.
pub struct BoundPort {
    /// The port's protocol.
    pub protocol: PortProtocol,
    /// Its HTTP routes.
    pub routes: RouteTable,
    /// Its TCP clusters with their weights.
    pub tcp: Vec<(String, u32)>,
    /// The port's own cluster.
    pub default_cluster: String,
}

/// A service bound to the waypoint.
pub struct BoundService {
    /// FQDN.
    pub hostname: String,
    /// The Address service of that hostname (VIPs, ports), when known.
    pub address: Option<Arc<Service>>,
    /// Policies targeting the service.
    pub authz: Authorizer,
    ports: HashMap<u16, BoundPort>,
}

impl BoundService {
    /// The bound port `port`, if the service declares it.
    pub fn port(&self, port: u16) -> Option<&BoundPort> {
        self.ports.get(&port)
    }
}

/// A cluster: endpoints of one service port (or subset) and their policy.
pub struct Cluster {
    /// Its name.
    pub name: String,
    /// The service port it is a cluster of.
    pub port: u16,
    /// The Address service of its hostname, when known (metrics labels, port maps).
    pub service: Option<Arc<Service>>,
    /// The endpoint engine.
    pub endpoints: Arc<Endpoints>,
    /// `namespace/hostname` of `service`: the key workloads' port maps use.
    service_key: Option<String>,
    /// How its endpoints on other networks are reached, one entry per (network, gateway) they name;
    /// worked out once per snapshot ([`Snapshot::build`]), so a request only clones an `Arc`.
    remote: Vec<Remote>,
    proto: pb::Cluster,
}

impl Cluster {
    /// How this cluster reaches `workload`, one of its endpoints on another network: through its
    /// network's gateway, or why not. `None` when the snapshot has worked out nothing for it (it is on
    /// the waypoint's network, or not an endpoint of this cluster).
    pub fn crossing(&self, workload: &Workload) -> Option<Result<&Arc<Crossing>, &Unreachable>> {
        let via = workload.network_gateway.as_deref();
        self.remote
            .iter()
            .find(|r| r.network == workload.network && r.via.as_ref() == via)
            .map(|r| r.crossing.as_ref())
    }
}

/// A cluster's way to its endpoints on one other network, as they name their gateway.
struct Remote {
    network: SharedStr,
    via: Option<GatewayAddress>,
    crossing: Result<Arc<Crossing>, Unreachable>,
}

/// Why a cluster's endpoints on another network cannot be reached: they are then no endpoints at all.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unreachable {
    /// Their network has no east-west gateway: never dialled directly.
    #[error("network {network:?} has no network gateway")]
    NoGateway {
        /// The endpoints' network.
        network: String,
    },
    /// Their gateway is named by hostname. Node proxies resolve one
    /// ([`State::resolve_gateway_address`](crate::state::State::resolve_gateway_address), load-balanced
    /// per connection); the waypoint works out each crossing once per snapshot from the gateway's
    /// address, and has no such resolution.
    #[error("network gateway {gateway} is named by hostname, which the waypoint does not resolve")]
    GatewayHostname {
        /// The gateway as the endpoints name it.
        gateway: GatewayAddress,
    },
    /// No workload of the gateway's network is at the gateway's address (whose identity the outer
    /// tunnel would expect).
    #[error("network gateway {gateway} is no workload the waypoint knows")]
    UnknownGateway {
        /// The gateway as the endpoints name it.
        gateway: GatewayAddress,
    },
    /// The cluster's service is not known, so there is no hostname for the tunnels' authority.
    #[error("the cluster's service is unknown: no hostname to cross networks with")]
    NoService,
    /// The service's hostname and port make no valid CONNECT authority.
    #[error("{authority:?} cannot be a CONNECT authority")]
    BadAuthority {
        /// What it would have been.
        authority: String,
    },
}

/// What a CONNECT's `:authority` names.
pub enum Destination<'s> {
    /// A service bound to the waypoint, by VIP (or hostname) and port.
    Service {
        /// The service.
        service: &'s BoundService,
        /// The port dialled.
        port: u16,
        /// The address dialled (for authorization's `destination.ip`); a hostname authority gives the
        /// service's first VIP, or the unspecified address.
        addr: SocketAddr,
    },
    /// A workload bound to the waypoint, by pod IP and port.
    Workload {
        /// The workload.
        workload: Arc<Workload>,
        /// The address dialled.
        addr: SocketAddr,
    },
}

/// A chosen endpoint: the workload and the address of the application on it.
#[derive(Clone)]
pub struct Endpoint {
    /// The workload.
    pub workload: Arc<Workload>,
    /// `pod_ip:target_port`.
    pub addr: SocketAddr,
    /// On another network: how to get there (its address is then not dialled).
    pub crossing: Option<Arc<Crossing>>,
}

/// Double HBONE to an endpoint on another network, through that network's east-west gateway.
#[derive(Debug)]
pub struct Crossing {
    /// The gateway's HBONE address.
    pub gateway: SocketAddr,
    /// The identities the gateway may present (the outer tunnel's check); shared, as the pool key of
    /// every connect through the gateway holds them.
    pub gateway_ids: Arc<[Identity]>,
    /// Both tunnels' `:authority`: the service hostname and port.
    pub authority: http::Uri,
    /// Who may end the inner tunnel: the service's alt names, else its endpoints' identities on that
    /// network (the gateway picks among them).
    pub inner_ids: Vec<Identity>,
}

/// One immutable version of the waypoint's configuration.
#[derive(Default)]
pub struct Snapshot {
    /// `namespace/name` of the Waypoint resource held; `None` before it has arrived.
    name: Option<String>,
    authz: Option<Authorizer>,
    services: Vec<BoundService>,
    by_vip: HashMap<IpAddr, usize>,
    by_host: HashMap<String, usize>,
    clusters: HashMap<String, Arc<Cluster>>,
    workloads: HashMap<SharedStr, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    bound_workloads: HashSet<String>,
    xfcc_include_client_identity: bool,
    /// The waypoint's own network.
    network: String,
}

/// East-west gateway workloads, by the address workloads name them with (their network compared on
/// lookup): an index of the build only.
type Gateways<'w> = HashMap<IpAddr, Vec<&'w Workload>>;

/// The [`Gateways`] among `workloads`: those at an address some workload names as its gateway.
fn gateways(workloads: &[Arc<Workload>]) -> Gateways<'_> {
    let named: HashSet<IpAddr> = workloads
        .iter()
        .filter_map(
            |w| match w.network_gateway.as_deref().map(|g| &g.destination) {
                Some(GatewayDestination::Address { ip, .. }) => Some(*ip),
                _ => None,
            },
        )
        .collect();
    let mut gateways = Gateways::new();
    for w in workloads {
        for ip in w.ips.iter().filter(|ip| named.contains(ip)) {
            gateways.entry(*ip).or_default().push(&**w);
        }
    }
    gateways
}

/// Validates one `Waypoint` resource: every engine accepts its part.
pub fn check(waypoint: &pb::Waypoint) -> Result<(), Error> {
    Authorizer::new(&waypoint.policies).map_err(|source| Error::Policies {
        scope: "waypoint".into(),
        source,
    })?;
    for svc in &waypoint.services {
        compile_service(svc)?;
    }
    Ok(())
}

fn compile_service(svc: &pb::Service) -> Result<(Authorizer, HashMap<u16, BoundPort>), Error> {
    let authz = Authorizer::new(&svc.policies).map_err(|source| Error::Policies {
        scope: svc.hostname.clone(),
        source,
    })?;
    let mut ports = HashMap::new();
    for p in &svc.ports {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::Port {
                hostname: svc.hostname.clone(),
                port: p.port,
            })?;
        let protocol = match pb::Protocol::try_from(p.protocol) {
            Ok(pb::Protocol::Unspecified) => PortProtocol::Unknown,
            Ok(pb::Protocol::Http) => PortProtocol::Http1,
            Ok(pb::Protocol::Http2 | pb::Protocol::Grpc) => PortProtocol::Http2,
            Ok(pb::Protocol::Tcp) => PortProtocol::Tcp,
            Err(_) => {
                return Err(Error::Protocol {
                    hostname: svc.hostname.clone(),
                    port: p.port,
                    value: p.protocol,
                })
            }
        };
        let routes = RouteTable::new(p).map_err(|source| Error::Routes {
            hostname: svc.hostname.clone(),
            port: p.port,
            source,
        })?;
        ports.insert(
            port,
            BoundPort {
                protocol,
                routes,
                tcp: p
                    .tcp
                    .iter()
                    .map(|w| (w.cluster.clone(), w.weight))
                    .collect(),
                default_cluster: p.default_cluster.clone(),
            },
        );
    }
    Ok((authz, ports))
}

impl Snapshot {
    /// Builds a snapshot as seen from `network` (the waypoint's `NETWORK`): endpoints elsewhere are
    /// reached through their network's gateway. `previous` lends the runtime state of clusters that did
    /// not change, and tells which unreachable endpoints were already reported.
    pub fn build(
        workloads: &[Arc<Workload>],
        services: &[Arc<Service>],
        waypoint: Option<&pb::Waypoint>,
        network: &str,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, Error> {
        let mut snap = Snapshot {
            network: network.to_string(),
            ..Snapshot::default()
        };
        for w in workloads {
            snap.workloads.insert(w.uid.clone(), w.clone());
            for ip in &w.ips {
                // Several workloads on one address: prefer an HBONE one, as the node proxy does.
                let keep = snap
                    .by_ip
                    .get(ip)
                    .is_some_and(|old| old.protocol == crate::state::Protocol::HBONE);
                if !keep {
                    snap.by_ip.insert(*ip, w.clone());
                }
            }
        }
        let by_key: HashMap<String, &Arc<Service>> =
            services.iter().map(|s| (s.key(), s)).collect();
        let Some(wp) = waypoint else {
            return Ok(snap);
        };
        snap.name = Some(format!("{}/{}", wp.namespace, wp.name));
        snap.authz = Some(
            Authorizer::new(&wp.policies).map_err(|source| Error::Policies {
                scope: "waypoint".into(),
                source,
            })?,
        );
        snap.bound_workloads = wp.workloads.iter().cloned().collect();
        snap.xfcc_include_client_identity = wp.xfcc_include_client_identity;
        let gateways = gateways(workloads);
        for svc in &wp.services {
            let (authz, ports) = compile_service(svc)?;
            let address = by_key
                .get(&format!("{}/{}", svc.namespace, svc.hostname))
                .map(|s| (*s).clone());
            let idx = snap.services.len();
            if let Some(a) = &address {
                for (_, vip) in &a.vips {
                    snap.by_vip.insert(*vip, idx);
                }
            }
            snap.by_host.insert(svc.hostname.clone(), idx);
            for c in &svc.clusters {
                let service = by_key
                    .get(&format!("{}/{}", svc.namespace, c.service_hostname))
                    .or_else(|| by_key.values().find(|s| s.hostname == c.service_hostname))
                    .map(|s| (*s).clone());
                let old = previous.and_then(|p| p.clusters.get(&c.name));
                let endpoints = old
                    .filter(|old| old.proto == *c)
                    .map(|old| old.endpoints.clone())
                    .unwrap_or_else(|| Arc::new(Endpoints::new(c)));
                let mut cluster = Cluster {
                    name: c.name.clone(),
                    port: u16::try_from(c.port).unwrap_or(0),
                    service_key: service.as_ref().map(|s| s.key()),
                    service,
                    endpoints,
                    remote: Vec::new(),
                    proto: c.clone(),
                };
                cluster.remote = snap.remote(&cluster, &gateways, old.map(|o| &**o));
                snap.clusters.insert(c.name.clone(), Arc::new(cluster));
            }
            snap.services.push(BoundService {
                hostname: svc.hostname.clone(),
                address,
                authz,
                ports,
            });
        }
        Ok(snap)
    }

    /// Whether the Gateway asked for `x-forwarded-client-cert` with the client's identity.
    pub fn xfcc_include_client_identity(&self) -> bool {
        self.xfcc_include_client_identity
    }

    /// `namespace/name` of the Waypoint resource, once received.
    pub fn waypoint_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The waypoint-wide policies (`None` before the Waypoint resource has arrived).
    pub fn authz(&self) -> Option<&Authorizer> {
        self.authz.as_ref()
    }

    /// What `authority` (`ip:port` or `hostname:port`) names, if this waypoint serves it.
    pub fn destination(&self, authority: &str) -> Option<Destination<'_>> {
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            let addr = crate::socket::canonical(addr);
            if let Some(&i) = self.by_vip.get(&addr.ip()) {
                return Some(Destination::Service {
                    service: &self.services[i],
                    port: addr.port(),
                    addr,
                });
            }
            let w = self.by_ip.get(&addr.ip())?;
            return self
                .bound_workloads
                .contains(w.uid.as_str())
                .then(|| Destination::Workload {
                    workload: w.clone(),
                    addr,
                });
        }
        let (host, port) = authority.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let &i = self.by_host.get(host)?;
        let service = &self.services[i];
        let ip = service
            .address
            .as_ref()
            .and_then(|a| a.vips.first().map(|(_, ip)| *ip))
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        Some(Destination::Service {
            service,
            port,
            addr: SocketAddr::new(ip, port),
        })
    }

    /// How `cluster` reaches its endpoints on other networks: one [`Remote`] per (network, gateway)
    /// they name. Those that cannot be reached are logged here, not per request: a warning when they
    /// were not so in `previous` (the cluster of that name in the previous snapshot), else at debug.
    fn remote(
        &self,
        cluster: &Cluster,
        gateways: &Gateways<'_>,
        previous: Option<&Cluster>,
    ) -> Vec<Remote> {
        let mut remote: Vec<Remote> = Vec::new();
        for w in cluster
            .endpoints
            .keys()
            .filter_map(|uid| self.workloads.get(uid))
        {
            let via = w.network_gateway.as_deref();
            if w.network == self.network.as_str()
                || remote
                    .iter()
                    .any(|r| r.network == w.network && r.via.as_ref() == via)
            {
                continue;
            }
            let crossing = self.crossing(cluster, w, gateways).map(Arc::new);
            if let Err(e) = &crossing {
                let reported = previous
                    .and_then(|p| p.crossing(w))
                    .is_some_and(|before| before.err() == Some(e));
                if reported {
                    tracing::debug!(
                        cluster = %cluster.name, network = %w.network, error = %e,
                        "endpoints on another network are still unreachable; not load-balanced to"
                    );
                } else {
                    tracing::warn!(
                        cluster = %cluster.name, network = %w.network, error = %e,
                        "endpoints on another network are unreachable; not load-balanced to"
                    );
                }
            }
            remote.push(Remote {
                network: w.network.clone(),
                via: via.cloned(),
                crossing,
            });
        }
        remote
    }

    /// The cluster `name`.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// The workload with uid `uid`.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The client's workload: the one at `ip` whose identity is the peer's (an address alone could be
    /// claimed by anyone on the path).
    pub fn client(
        &self,
        ip: IpAddr,
        identity: &crate::identity::Identity,
    ) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip).filter(|w| w.identity == *identity)
    }

    /// Where endpoint `uid` of `cluster` receives: its address of the family of `like`, and the target
    /// port from its own port map for the service, else the service's, else the service port itself.
    pub fn endpoint(&self, cluster: &Cluster, uid: &str, like: IpAddr) -> Option<Endpoint> {
        let workload = self.workloads.get(uid)?;
        let mapped = |m: &PortMap| m.get(&cluster.port).copied().filter(|p| *p != 0);
        let own = cluster
            .service_key
            .as_ref()
            .and_then(|k| workload.services.get(k))
            .and_then(mapped);
        let target = match (own, &cluster.service) {
            (Some(p), _) => p,
            (None, Some(svc)) => match svc.ports.get(&cluster.port) {
                // Declared with "the endpoint says", and this one does not.
                Some(0) => return None,
                Some(p) => *p,
                None => cluster.port,
            },
            (None, None) => cluster.port,
        };
        let ip = workload
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
            .or_else(|| workload.ips.first());
        let crossing = if workload.network != self.network.as_str() {
            Some(cluster.crossing(workload)?.ok()?.clone())
        } else {
            None
        };
        let ip = match (ip, &crossing) {
            (Some(ip), _) => *ip,
            // Known on its network only by the gateway: nothing of its own to dial, nor needed.
            (None, Some(_)) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            (None, None) => return None,
        };
        Some(Endpoint {
            workload: workload.clone(),
            addr: SocketAddr::new(ip, target),
            crossing,
        })
    }

    /// How to reach `workload`, on another network, as an endpoint of `cluster`, or why it cannot be.
    fn crossing(
        &self,
        cluster: &Cluster,
        workload: &Workload,
        gateways: &Gateways<'_>,
    ) -> Result<Crossing, Unreachable> {
        let gw = workload
            .network_gateway
            .as_deref()
            .ok_or_else(|| Unreachable::NoGateway {
                network: workload.network.to_string(),
            })?;
        let GatewayDestination::Address { network, ip } = &gw.destination else {
            return Err(Unreachable::GatewayHostname {
                gateway: gw.clone(),
            });
        };
        let gateway = gateways
            .get(ip)
            .and_then(|gws| gws.iter().find(|g| g.network == network.as_str()))
            .ok_or_else(|| Unreachable::UnknownGateway {
                gateway: gw.clone(),
            })?;
        let svc = cluster.service.as_ref().ok_or(Unreachable::NoService)?;
        let authority = format!("{}:{}", svc.hostname, cluster.port);
        let inner_ids = svc.far_identities(
            &workload.network,
            cluster
                .endpoints
                .keys()
                .filter_map(|uid| self.workloads.get(uid))
                .map(|w| &**w),
        );
        Ok(Crossing {
            gateway: SocketAddr::new(*ip, gw.hbone_mtls_port),
            gateway_ids: Arc::new([gateway.identity.clone()]),
            authority: http::Uri::try_from(authority.as_str())
                .map_err(|_| Unreachable::BadAuthority { authority })?,
            inner_ids,
        })
    }
}

/// Picks one of `weighted` by weight with `roll` uniform in `[0, total)`; `None` when every weight is 0.
pub fn pick_weighted(weighted: &[(String, u32)], roll: impl FnOnce(u32) -> u32) -> Option<&str> {
    let total: u32 = weighted
        .iter()
        .map(|(_, w)| *w)
        .fold(0, u32::saturating_add);
    if total == 0 {
        return None;
    }
    let mut r = roll(total);
    for (name, w) in weighted {
        if r < *w {
            return Some(name);
        }
        r -= w;
    }
    None
}
