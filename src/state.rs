//! The proxy's view of the mesh: workloads, services and policies, as one immutable snapshot.
//!
//! Input: a [`LocalConfig`](local::LocalConfig) (ztunnel's `LOCAL_XDS_PATH` format; later also xDS).
//! Output: [`State`], indexed for the lookups the data path makes per connection — workload by address,
//! service by VIP or hostname, endpoint selection — published through a `watch` channel so readers never
//! take a lock shared with writers (see [`StateHandle`]). Waypoints: services and workloads carry the
//! waypoint istiod (or the local file) names for them, and [`waypoint`] resolves one to the workload to dial.
//! Every node proxy holds the whole mesh, so a workload is kept small: what workloads have in common
//! (strings, identities, port maps) is shared through [`intern`], and the indexes point at the workloads'
//! own strings instead of copying them (`benches/state_scale.rs` measures bytes per workload).

pub mod intern;
pub mod local;
pub mod waypoint;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;
use tokio::sync::watch;

use crate::authz::PolicySet;
use crate::config::WorkloadInfo;
use crate::identity::Identity;

pub use intern::{Interner, PortMap, ServicePorts, SharedStr};
pub use local::{Error, LocalConfig};
pub use waypoint::WaypointError;

/// How a workload receives mesh traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum Protocol {
    /// Plain TCP: the workload is not captured; send to it directly.
    #[default]
    TCP,
    /// HBONE on port 15008 of the workload's address.
    HBONE,
}

/// Whether a workload may receive load-balanced traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum HealthStatus {
    /// Ready.
    #[default]
    Healthy,
    /// Not ready: excluded from load balancing unless the service allows all.
    Unhealthy,
}

/// A workload (pod or VM) as the proxy needs it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Primary key (`cluster//v1/Pod/ns/name`).
    pub uid: SharedStr,
    /// Pod name.
    pub name: SharedStr,
    /// Namespace.
    pub namespace: SharedStr,
    /// Service account.
    pub service_account: SharedStr,
    /// Its SPIFFE identity, derived from trust domain, namespace and service account.
    pub identity: Identity,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// How to reach it.
    pub protocol: Protocol,
    /// Node it runs on.
    pub node: SharedStr,
    /// Network it is on.
    pub network: SharedStr,
    /// Health.
    pub status: HealthStatus,
    /// Load-balancing weight (default 1).
    pub capacity: u32,
    /// Keys (`ns/name`) of WorkloadSelector policies that select it.
    pub authorization_policies: Vec<String>,
    /// Services it backs: `ns/hostname` → service port → target port.
    pub services: ServicePorts,
    /// Canonical service name (telemetry, baggage).
    pub canonical_name: SharedStr,
    /// Canonical revision.
    pub canonical_revision: SharedStr,
    /// Owning workload name (e.g. the Deployment).
    pub workload_name: SharedStr,
    /// Owning workload kind, lower case.
    pub workload_type: SharedStr,
    /// Cluster id.
    pub cluster_id: SharedStr,
    /// Hostname, for workloads known by name rather than address (a waypoint may be referenced by it).
    pub hostname: SharedStr,
    /// The waypoint traffic addressed to this workload's IP must pass (istiod's workload binding); boxed,
    /// as most workloads have none and the record is held once per workload of the cluster.
    pub waypoint: Option<Box<GatewayAddress>>,
    /// The east-west gateway of its network: how a client on another network reaches it (double
    /// HBONE). A workload on another network without one is never dialled.
    pub network_gateway: Option<Box<GatewayAddress>>,
    /// Set on waypoint instances that want the tunnel's metadata: inbound connections go to
    /// `port` (if set), with a PROXY protocol v2 header when the protocol says so.
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Where it runs (region/zone/subzone), when the control plane says; shared between the workloads of
    /// one zone by whoever builds them.
    pub locality: Option<Arc<Locality>>,
}

/// A workload's locality, as Kubernetes topology labels give it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    pub region: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// Istio's `topology.istio.io/subzone`.
    pub subzone: String,
}

impl Locality {
    /// `None` when all three parts are empty (no locality known).
    pub fn known(region: String, zone: String, subzone: String) -> Option<Arc<Locality>> {
        if region.is_empty() && zone.is_empty() && subzone.is_empty() {
            None
        } else {
            Some(Arc::new(Locality {
                region,
                zone,
                subzone,
            }))
        }
    }
}

/// Where a gateway (a waypoint) is: istio's `GatewayAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayAddress {
    /// An address, or a hostname to look up.
    pub destination: GatewayDestination,
    /// The port its HBONE (mTLS) listener is on; istiod sends 15008.
    pub hbone_mtls_port: u16,
}

/// The two forms of [`GatewayAddress::destination`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    /// An IP on a network: a workload's address, or the VIP of the waypoint's service.
    Address {
        /// Network of the address.
        network: String,
        /// The address.
        ip: IpAddr,
    },
    /// A service (or, failing that, a workload) by namespace and hostname; what istiod prefers.
    Hostname {
        /// Namespace.
        namespace: String,
        /// Hostname (`waypoint.default.svc.cluster.local`).
        hostname: String,
    },
}

impl std::fmt::Display for GatewayAddress {
    /// ztunnel's local-config spelling: `network/ip` or `namespace/hostname`, then the HBONE port.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.destination {
            GatewayDestination::Address { network, ip } => write!(f, "{network}/{ip}")?,
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => write!(f, "{namespace}/{hostname}")?,
        }
        write!(f, " (HBONE port {})", self.hbone_mtls_port)
    }
}

/// A candidate waypoint of a service and its share of connections (a canary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedWaypoint {
    /// The waypoint.
    pub destination: GatewayAddress,
    /// Relative weight; connections are spread proportionally.
    pub weight: u32,
}

/// How inbound tunnel metadata reaches a workload that asked for it (istio's `ApplicationTunnel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplicationTunnel {
    /// Bytes as they are, or preceded by a PROXY v2 header.
    pub protocol: AppTunnelProtocol,
    /// Deliver to this port instead of the requested one.
    pub port: Option<u16>,
}

/// [`ApplicationTunnel::protocol`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum AppTunnelProtocol {
    /// Bytes are passed on unchanged (only the port may change).
    NONE,
    /// A PROXY protocol v2 header (source, target, source identity TLV) precedes the bytes.
    PROXY,
}

/// How a service picks endpoints when some are unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum HealthPolicy {
    /// Only healthy endpoints.
    #[default]
    OnlyHealthy,
    /// Every endpoint.
    AllowAll,
}

/// A locality scope a service prefers its endpoints to share with the client (`routingPreference`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Scope {
    /// Same region.
    Region,
    /// Same zone.
    Zone,
    /// Same subzone.
    Subzone,
    /// Same node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

impl Scope {
    /// Whether endpoint `ep` shares this scope with client `src`, compared as ztunnel compares them (an
    /// unknown locality part is empty, and two empty parts match).
    fn shared(self, src: &Workload, ep: &Workload) -> bool {
        fn of(w: &Workload, f: fn(&Locality) -> &str) -> &str {
            w.locality.as_deref().map_or("", f)
        }
        let part = |f: fn(&Locality) -> &str| of(src, f) == of(ep, f);
        match self {
            Scope::Region => part(|l| &l.region),
            Scope::Zone => part(|l| &l.zone),
            Scope::Subzone => part(|l| &l.subzone),
            Scope::Node => src.node == ep.node,
            Scope::Cluster => src.cluster_id == ep.cluster_id,
            Scope::Network => src.network == ep.network,
        }
    }
}

/// Which address families a service has (`ipFamilies`); DNS answers only those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpFamilies {
    /// As its addresses say.
    #[default]
    Automatic,
    /// IPv4 only.
    V4,
    /// IPv6 only.
    V6,
    /// Both.
    Dual,
}

/// Load-balancing mode of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum LbMode {
    /// Pick any endpoint.
    #[default]
    Standard,
    /// Only endpoints sharing every scope of the routing preference with the client.
    Strict,
    /// The endpoints sharing the longest prefix of the routing preference with the client (so the
    /// nearest healthy ones; farther ones when no nearer one can take the connection).
    Failover,
    /// No endpoint selection: go to the original destination.
    Passthrough,
}

/// A service endpoint: a workload and its port map for this service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Index into [`State`]'s workload list.
    workload: usize,
    /// Service port → target port overrides for this workload (shared with the workload).
    ports: PortMap,
}

/// A service: VIPs, ports and endpoints.
#[derive(Debug, Clone)]
pub struct Service {
    /// Name.
    pub name: SharedStr,
    /// Namespace.
    pub namespace: SharedStr,
    /// Hostname (`reviews.default.svc.cluster.local`).
    pub hostname: SharedStr,
    /// VIPs with their network.
    pub vips: Vec<(SharedStr, IpAddr)>,
    /// CIDR VIPs with their network (a ServiceEntry's address ranges): an address in one reaches the
    /// service when no single VIP is that address.
    pub vip_cidrs: Vec<(SharedStr, ipnet::IpNet)>,
    /// Service port → target port (0: the endpoint must say).
    pub ports: PortMap,
    /// Extra identities accepted for this service's endpoints.
    pub subject_alt_names: Vec<Identity>,
    /// Preferred among services sharing a hostname.
    pub canonical: bool,
    /// Endpoint health policy.
    pub health_policy: HealthPolicy,
    /// Load-balancing mode.
    pub lb_mode: LbMode,
    /// Scopes, in order, an endpoint should share with the client (`Strict`: must share all;
    /// `Failover`: the endpoints sharing the longest prefix of them are used).
    pub routing_preference: Box<[Scope]>,
    /// Address families (DNS answers only these).
    pub ip_families: IpFamilies,
    /// Visible only to its own namespace (`exportTo: .`).
    pub namespace_only: bool,
    /// The waypoint traffic to this service's VIPs must pass (istiod's service binding); boxed, as
    /// most services have none.
    pub waypoint: Option<Box<GatewayAddress>>,
    /// When not empty (and some weight is not 0): waypoints to spread connections over, by weight,
    /// in place of `waypoint`.
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    /// Filled by [`State::new`] from the workloads' `services` maps; converters leave it empty.
    pub(crate) endpoints: Vec<Endpoint>,
}

impl Service {
    /// Whether a client in `namespace` may see this service (VIP, hostname and DNS lookups).
    pub fn visible_to(&self, namespace: &str) -> bool {
        !self.namespace_only || self.namespace == namespace
    }

    /// `namespace/hostname`, the key workloads use to name the services they back.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// Who may end the inner tunnel of double HBONE to this service on `network`, given its `endpoints`
    /// as the caller knows them (a node proxy: the state's; a waypoint: its cluster's). The gateway there
    /// picks the endpoint, so any of them may answer. The service's subject alt names when it has some
    /// (ztunnel checks only these, and so refuses every inner tunnel to a service without them); else
    /// the identities of the endpoints on that network, each once.
    pub fn far_identities<'a>(
        &self,
        network: &str,
        endpoints: impl IntoIterator<Item = &'a Workload>,
    ) -> Vec<Identity> {
        if !self.subject_alt_names.is_empty() {
            return self.subject_alt_names.to_vec();
        }
        let mut ids: Vec<Identity> = Vec::new();
        for w in endpoints {
            if w.network == network && !ids.contains(&w.identity) {
                ids.push(w.identity.clone());
            }
        }
        ids
    }
}

/// Where a connection to a service or workload goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The chosen workload.
    pub workload: Arc<Workload>,
    /// Address and port to reach the application at.
    pub addr: SocketAddr,
    /// Identities the peer may present (workload identity + service SANs).
    pub expected_identities: Vec<Identity>,
    /// The service the traffic was addressed to, if any.
    pub service: Option<Arc<Service>>,
}

impl Upstream {
    /// Whether the address is still to be resolved from the workload's hostname (it has no address of
    /// its own).
    pub fn needs_resolution(&self) -> bool {
        self.addr.ip().is_unspecified()
            && self.workload.ips.is_empty()
            && !self.workload.hostname.is_empty()
    }
}

/// An immutable, indexed snapshot of mesh state.
#[derive(Debug, Default)]
pub struct State {
    workloads: Vec<Arc<Workload>>,
    /// Keys are the workloads' own (shared) strings, not copies.
    by_uid: HashMap<SharedStr, usize>,
    /// network → address → workload.
    by_addr: HashMap<SharedStr, HashMap<IpAddr, usize>>,
    /// name → the first workload of that name; the others follow through `same_name` (a name can repeat
    /// across namespaces and service accounts).
    by_name: HashMap<SharedStr, usize>,
    /// Per workload: the next workload with the same name, or `usize::MAX`.
    same_name: Vec<usize>,
    /// hostname → workloads known by that hostname (few: waypoints may be referenced this way).
    by_workload_host: HashMap<SharedStr, Vec<usize>>,
    services: Vec<Arc<Service>>,
    /// network → VIP → services.
    by_vip: HashMap<SharedStr, HashMap<IpAddr, Vec<usize>>>,
    /// Services with CIDR VIPs (few), scanned when no single VIP matches.
    with_cidrs: Vec<usize>,
    /// Keys are the services' own (shared) hostnames.
    by_host: HashMap<SharedStr, Vec<usize>>,
    policies: Arc<PolicySet>,
}

impl State {
    /// Indexes workloads, services and policies. Endpoints come from the workloads' `services` maps.
    pub fn new(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: PolicySet,
    ) -> Result<State, Error> {
        State::with_policies(workloads, services, Arc::new(policies))
    }

    /// [`State::new`] with an already indexed policy set, shared with the previous snapshot when only
    /// workloads or services changed (so a workload push neither re-indexes every policy nor makes open
    /// connections look due for re-evaluation: see [`State::same_policies`]).
    pub fn with_policies(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Arc<PolicySet>,
    ) -> Result<State, Error> {
        State::with_shared(
            workloads.into_iter().map(Arc::new).collect(),
            services,
            policies,
        )
    }

    /// [`State::with_policies`] with workloads the caller keeps too (the xDS client's held resources), so
    /// a push shares them with the snapshot instead of copying each.
    pub fn with_shared(
        workloads: Vec<Arc<Workload>>,
        services: Vec<Service>,
        policies: Arc<PolicySet>,
    ) -> Result<State, Error> {
        let mut st = State {
            policies,
            ..Default::default()
        };
        st.workloads.reserve_exact(workloads.len());
        st.by_uid.reserve(workloads.len());
        for w in workloads {
            if st.by_uid.contains_key(w.uid.as_str()) {
                return Err(Error::Duplicate {
                    kind: "workload uid",
                    key: w.uid.to_string(),
                });
            }
            let idx = st.workloads.len();
            st.by_uid.insert(w.uid.clone(), idx);
            let addrs = st.by_addr.entry(w.network.clone()).or_default();
            for ip in &w.ips {
                // Several workloads on one IP: prefer HBONE ones, as ztunnel does.
                match addrs.get(ip) {
                    // The same workload lists the address twice (not yet in `workloads`).
                    Some(&old) if old == idx => {}
                    Some(&old) if st.workloads[old].protocol == Protocol::HBONE => {}
                    _ => {
                        addrs.insert(*ip, idx);
                    }
                }
            }
            if !w.hostname.is_empty() {
                st.by_workload_host
                    .entry(w.hostname.clone())
                    .or_default()
                    .push(idx);
            }
            st.workloads.push(w);
        }
        // Names, walked backwards so that each chain lists its workloads in their order.
        st.same_name = vec![usize::MAX; st.workloads.len()];
        for (idx, w) in st.workloads.iter().enumerate().rev() {
            if let Some(first) = st.by_name.insert(w.name.clone(), idx) {
                st.same_name[idx] = first;
            }
        }
        // Endpoints, bucketed by service key in one pass over the workloads.
        let mut endpoints: HashMap<SharedStr, Vec<Endpoint>> = HashMap::new();
        for (idx, w) in st.workloads.iter().enumerate() {
            for (key, ports) in &w.services {
                endpoints.entry(key.clone()).or_default().push(Endpoint {
                    workload: idx,
                    ports: ports.clone(),
                });
            }
        }
        for mut svc in services {
            let key = svc.key();
            if st
                .by_host
                .get(svc.hostname.as_str())
                .is_some_and(|v| v.iter().any(|&i| st.services[i].namespace == svc.namespace))
            {
                return Err(Error::Duplicate {
                    kind: "service",
                    key,
                });
            }
            svc.endpoints = endpoints.remove(key.as_str()).unwrap_or_default();
            let idx = st.services.len();
            for (network, vip) in &svc.vips {
                st.by_vip
                    .entry(network.clone())
                    .or_default()
                    .entry(*vip)
                    .or_default()
                    .push(idx);
            }
            if !svc.vip_cidrs.is_empty() {
                st.with_cidrs.push(idx);
            }
            st.by_host
                .entry(svc.hostname.clone())
                .or_default()
                .push(idx);
            st.services.push(Arc::new(svc));
        }
        // Once per snapshot (not per connection): workloads listing policies the state does not hold. Until
        // the policy arrives, those keys are skipped, as ztunnel skips them.
        let mut unknown = st.workloads.iter().flat_map(|w| {
            w.authorization_policies
                .iter()
                .filter(|k| st.policies.get(k).is_none())
                .map(move |k| (w, k))
        });
        if let Some((w, key)) = unknown.next() {
            tracing::warn!(
                workload = %w.uid,
                policy = %key,
                more = unknown.count(),
                "workloads list authorization policies this proxy has not received (skipped until they arrive)"
            );
        }
        Ok(st)
    }

    /// The authorization policies.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// The authorization policies, shareable with a next snapshot.
    pub fn policies_shared(&self) -> Arc<PolicySet> {
        self.policies.clone()
    }

    /// Whether `other` holds the very same policy set (not merely equal policies): no policy changed
    /// between the two snapshots.
    pub fn same_policies(&self, other: &State) -> bool {
        Arc::ptr_eq(&self.policies, &other.policies)
    }

    /// Number of workloads.
    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    /// Number of services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Every workload, in the order given (read by the admin port's `/config_dump`).
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter()
    }

    /// Every service, in the order given (read by the admin port's `/config_dump`).
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.iter()
    }

    /// The endpoints of `svc`, a service of this snapshot: each workload with its own port overrides.
    pub fn endpoints<'a>(
        &'a self,
        svc: &'a Service,
    ) -> impl Iterator<Item = (&'a Arc<Workload>, &'a PortMap)> + 'a {
        svc.endpoints
            .iter()
            .filter_map(|ep| Some((self.workloads.get(ep.workload)?, &ep.ports)))
    }

    /// The workload a dedicated proxy (or a pod handed over by ZDS) acts for.
    pub fn workload_by_info(&self, info: &WorkloadInfo) -> Option<&Arc<Workload>> {
        let mut idx = *self.by_name.get(info.name.as_str())?;
        while idx != usize::MAX {
            let w = &self.workloads[idx];
            if w.namespace == info.namespace && w.service_account == info.service_account {
                return Some(w);
            }
            idx = self.same_name[idx];
        }
        None
    }

    /// The workload owning `ip` on `network`.
    pub fn workload_by_addr(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_addr
            .get(network)?
            .get(&ip)
            .map(|&i| &self.workloads[i])
    }

    /// The service with VIP `ip` on `network`, preferring the client's namespace, then canonical ones;
    /// failing a single VIP, the service with a CIDR VIP holding `ip`, ranked as ztunnel ranks them: the
    /// client's namespace, then the longest prefix, then canonical.
    pub fn service_by_vip(
        &self,
        network: &str,
        ip: IpAddr,
        client_ns: &str,
    ) -> Option<&Arc<Service>> {
        let exact = self
            .by_vip
            .get(network)
            .and_then(|m| m.get(&ip))
            .and_then(|candidates| self.best(candidates, client_ns));
        if exact.is_some() || self.with_cidrs.is_empty() {
            return exact;
        }
        // (in the client's namespace, prefix length, canonical): higher is better.
        type Rank = (bool, u8, bool);
        let mut best: Option<(Rank, &Arc<Service>)> = None;
        for svc in self.with_cidrs.iter().map(|&i| &self.services[i]) {
            if !svc.visible_to(client_ns) {
                continue;
            }
            for (net, cidr) in &svc.vip_cidrs {
                if net.as_str() != network || !cidr.contains(&ip) {
                    continue;
                }
                let rank = (svc.namespace == client_ns, cidr.prefix_len(), svc.canonical);
                if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                    best = Some((rank, svc));
                }
            }
        }
        best.map(|(_, svc)| svc)
    }

    /// The service named `hostname`, preferring the client's namespace, then canonical ones.
    pub fn service_by_host(&self, hostname: &str, client_ns: &str) -> Option<&Arc<Service>> {
        let candidates = self.by_host.get(hostname)?;
        self.best(candidates, client_ns)
    }

    /// Every service named `hostname` (several namespaces may define the same host).
    pub fn services_by_host<'a>(
        &'a self,
        hostname: &str,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.by_host
            .get(hostname)
            .into_iter()
            .flatten()
            .map(|&i| &self.services[i])
    }

    fn best(&self, candidates: &[usize], ns: &str) -> Option<&Arc<Service>> {
        let svcs = || {
            candidates
                .iter()
                .map(|&i| &self.services[i])
                .filter(|s| s.visible_to(ns))
        };
        svcs()
            .find(|s| s.namespace == ns)
            .or_else(|| svcs().find(|s| s.canonical))
            .or_else(|| svcs().next())
    }

    /// Picks an endpoint of `svc` for service port `port`: healthy ones only (unless the service allows all),
    /// weighted by capacity. `None` when no endpoint can take the traffic.
    pub fn pick_endpoint(
        &self,
        svc: &Arc<Service>,
        port: u16,
        family_of: IpAddr,
        src: Option<&Workload>,
    ) -> Option<Upstream> {
        self.pick_endpoint_in(
            svc,
            port,
            family_of,
            src,
            waypoint::Resolution::Standard,
            &|_| true,
        )
    }

    /// [`State::pick_endpoint`] for no client in particular, among the endpoints `accept` admits (an
    /// east-west gateway: those on its own network that take HBONE).
    pub fn pick_endpoint_where(
        &self,
        svc: &Arc<Service>,
        port: u16,
        family_of: IpAddr,
        accept: &dyn Fn(&Workload) -> bool,
    ) -> Option<Upstream> {
        self.pick_endpoint_in(
            svc,
            port,
            family_of,
            None,
            waypoint::Resolution::Standard,
            accept,
        )
    }

    /// [`State::pick_endpoint`], with waypoint resolution's rule for endpoints the port does not map.
    fn pick_endpoint_in(
        &self,
        svc: &Arc<Service>,
        port: u16,
        family_of: IpAddr,
        src: Option<&Workload>,
        mode: waypoint::Resolution,
        accept: &dyn Fn(&Workload) -> bool,
    ) -> Option<Upstream> {
        // ztunnel's ranking: how many of the routing preference's scopes, in order, an endpoint shares with
        // the client; only the endpoints of the highest rank present are used, and in Strict mode only
        // those sharing every scope. When the preference starts with Network, an endpoint on the client's
        // network outranks every other, and the others are still ranked by the remaining scopes. Standard
        // mode (or no client) ranks every endpoint alike.
        let prefs = &svc.routing_preference;
        let ranked = matches!(svc.lb_mode, LbMode::Strict | LbMode::Failover);
        let network_first = prefs.first() == Some(&Scope::Network);
        let rank = |w: &Workload| -> Option<usize> {
            let Some(src) = src.filter(|_| ranked) else {
                return Some(0);
            };
            let (mut r, mut adjust) = (0, 0);
            for scope in prefs.iter() {
                let shared = scope.shared(src, w);
                if *scope == Scope::Network && network_first {
                    if !shared {
                        continue;
                    }
                    adjust = prefs.len() - 1;
                }
                if !shared {
                    break;
                }
                r += 1;
            }
            if svc.lb_mode == LbMode::Strict && r != prefs.len() {
                return None;
            }
            Some(r + adjust)
        };
        // Passes over the endpoints (best rank, sum the weights, then pick), so nothing is allocated per
        // connection.
        let usable = |ep: &Endpoint| -> Option<(u16, IpAddr, usize)> {
            let w = &self.workloads[ep.workload];
            let healthy =
                w.status == HealthStatus::Healthy || svc.health_policy == HealthPolicy::AllowAll;
            if !healthy || w.capacity == 0 || !accept(w) {
                return None;
            }
            // The endpoint's own port map wins, then the service's; 0 means "not mapped". Reaching a
            // waypoint, an instance with a tunnel port needs no mapping: its proxy delivers to that port.
            let tunnelled = mode == waypoint::Resolution::Waypoint
                && w.application_tunnel.is_some_and(|t| t.port.is_some());
            let target = [ep.ports.get(&port), svc.ports.get(&port)]
                .into_iter()
                .flatten()
                .copied()
                .find(|p| *p != 0)
                .or(tunnelled.then_some(port))?;
            let r = rank(w)?;
            // Another network's endpoint is reached only through its network's gateway, never dialled:
            // without a gateway it is no candidate; with one, its address (if any) is not used.
            let remote = src.is_some_and(|s| s.network != w.network);
            if remote && w.network_gateway.is_none() {
                return None;
            }
            let ip = if remote {
                pick_ip(&w.ips, family_of).unwrap_or(unspecified_like(family_of))
            } else if w.ips.is_empty() && !w.hostname.is_empty() {
                // Known only by hostname (a DNS ServiceEntry's endpoint): resolved when connecting; the
                // unspecified address of the client's family marks it (`Upstream::needs_resolution`).
                unspecified_like(family_of)
            } else {
                pick_ip(&w.ips, family_of)?
            };
            Some((target, ip, r))
        };
        let best = svc
            .endpoints
            .iter()
            .filter_map(|ep| usable(ep).map(|(_, _, r)| r))
            .max()?;
        let eligible = |ep: &Endpoint| -> Option<(u16, IpAddr)> {
            let (port, ip, r) = usable(ep)?;
            (r == best).then_some((port, ip))
        };
        let total: u64 = svc
            .endpoints
            .iter()
            .filter(|ep| eligible(ep).is_some())
            .map(|ep| self.workloads[ep.workload].capacity as u64)
            .sum();
        if total == 0 {
            return None;
        }
        let mut pick = rand::rng().random_range(0..total);
        for ep in &svc.endpoints {
            let Some((target, ip)) = eligible(ep) else {
                continue;
            };
            let w = &self.workloads[ep.workload];
            let cap = w.capacity as u64;
            if pick < cap {
                return Some(self.upstream(
                    w.clone(),
                    SocketAddr::new(ip, target),
                    Some(svc.clone()),
                ));
            }
            pick -= cap;
        }
        None
    }

    /// The upstream for traffic addressed to a workload directly.
    pub fn upstream(
        &self,
        workload: Arc<Workload>,
        addr: SocketAddr,
        service: Option<Arc<Service>>,
    ) -> Upstream {
        let mut expected_identities = vec![workload.identity.clone()];
        if let Some(svc) = &service {
            for san in &svc.subject_alt_names {
                if !expected_identities.contains(san) {
                    expected_identities.push(san.clone());
                }
            }
        }
        Upstream {
            workload,
            addr,
            expected_identities,
            service,
        }
    }

    /// [`Service::far_identities`] of `svc` on `network`, among its endpoints in this state.
    pub fn far_identities(&self, svc: &Service, network: &str) -> Vec<Identity> {
        svc.far_identities(
            network,
            svc.endpoints.iter().map(|ep| &*self.workloads[ep.workload]),
        )
    }
}

/// The unspecified address of `like`'s family.
fn unspecified_like(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// `like` itself when the workload has it; else an address of the same family; else any.
fn pick_ip(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    if ips.contains(&like) {
        return Some(like);
    }
    ips.iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or_else(|| ips.first())
        .copied()
}

/// A cheap handle to the latest [`State`]; readers clone the `Arc` out and never block the writer.
#[derive(Clone)]
pub struct StateHandle(watch::Receiver<Arc<State>>);

impl StateHandle {
    /// A handle and the sender that publishes new snapshots.
    pub fn new(initial: State) -> (watch::Sender<Arc<State>>, StateHandle) {
        let (tx, rx) = watch::channel(Arc::new(initial));
        (tx, StateHandle(rx))
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<State> {
        self.0.borrow().clone()
    }

    /// Waits (up to `timeout`) until `f` finds something in the state; ztunnel waits like this for a
    /// workload's own entry, which may arrive just after its first connection.
    pub async fn wait_for<T>(
        &self,
        timeout: std::time::Duration,
        mut f: impl FnMut(&State) -> Option<T>,
    ) -> Option<T> {
        let mut rx = self.0.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(t) = f(&rx.borrow_and_update()) {
                return Some(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests;
