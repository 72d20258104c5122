//! Ambient L7: the objects users write for waypoints, translated as istiod translates them — the
//! `waypoint` fields of `istio.workload.Address` Services and Workloads — plus meshnode's own resource for
//! its waypoint, `meshnode.waypoint.Waypoint` (proto/waypoint.proto), one per waypoint Gateway, named
//! `<namespace>/<name>`.
//!
//! Input: a [`MeshConfig`] whose fields are checked, and the security objects' translation
//! ([`istio::Converted`], for the AuthorizationPolicies bound by `targetRef(s)`). Output: [`Waypoints`]
//! (the bindings `translate.rs` puts into Addresses, the Services the control plane makes, the Waypoint
//! resources, warnings to log), or a [`config::Error`](Error) naming the field
//! (`istio[4].spec.http[0].match[0].uri.regex: regex matches are not supported`).
//!
//! In the mesh file's `istio:` list, as users write them for kubectl:
//!
//! ```yaml
//! namespaces:
//!   default: {labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
//! workloads:
//! - {name: waypoint-7d9f, namespace: default, serviceAccount: waypoint, ips: [10.1.0.9],
//!    labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
//! istio:
//! - apiVersion: gateway.networking.k8s.io/v1          # what `istioctl waypoint apply` creates
//!   kind: Gateway
//!   metadata: {name: waypoint, namespace: default, labels: {istio.io/waypoint-for: service}}
//!   spec:
//!     gatewayClassName: istio-waypoint
//!     listeners: [{name: mesh, port: 15008, protocol: HBONE}]
//! - apiVersion: gateway.networking.k8s.io/v1
//!   kind: HTTPRoute
//!   metadata: {name: reviews, namespace: default}
//!   spec:
//!     parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
//!     rules:
//!     - backendRefs: [{name: reviews-v1, port: 9080, weight: 80}, {name: reviews-v2, port: 9080, weight: 20}]
//! - apiVersion: networking.istio.io/v1
//!   kind: VirtualService
//!   metadata: {name: ratings, namespace: default}
//!   spec:
//!     hosts: [ratings]
//!     http:
//!     - match: [{uri: {prefix: /v2}, headers: {end-user: {exact: jason}}}]
//!       route: [{destination: {host: ratings, subset: v2}}]
//!       timeout: 2s
//!     - route: [{destination: {host: ratings, subset: v1}}]
//!       retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,connect-failure"}
//! - apiVersion: networking.istio.io/v1
//!   kind: DestinationRule
//!   metadata: {name: ratings, namespace: default}
//!   spec:
//!     host: ratings
//!     trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 10}}, outlierDetection: {consecutive5xxErrors: 3}}
//!     subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
//! - apiVersion: security.istio.io/v1
//!   kind: AuthorizationPolicy
//!   metadata: {name: reviews-get, namespace: default}
//!   spec:
//!     targetRefs: [{kind: Service, group: "", name: reviews}]
//!     rules: [{to: [{operation: {methods: [GET, HEAD], paths: ["/api/data*"]}}]}]
//! ```
//!
//! Mirrored from istiod (`pilot/pkg/serviceregistry/ambient/waypoints.go`, `workloads.go`, `services.go`;
//! `pilot/pkg/config/kube/gateway/conversion.go`; `pilot/pkg/networking/core/route/retry/retry.go`):
//! - A waypoint is a Gateway of class `istio-waypoint` with one HBONE listener on 15008. Traffic type from
//!   its label `istio.io/waypoint-for` (`service` default, `workload`, `all`, `none`); namespaces allowed
//!   from its listener's `allowedRoutes.namespaces` (`Same` default, `All`, `Selector` by labels).
//! - `istio.io/use-waypoint: <name>` (+ `istio.io/use-waypoint-namespace`) on a Service or pod wins over the
//!   same labels on its namespace; `none` opts out. A named waypoint that is missing, not ready, does not
//!   allow the namespace or does not take that traffic type gives no waypoint (no fallback to the
//!   namespace's), with a warning — except a pod inheriting a service-only waypoint, which istiod accepts
//!   silently. A waypoint's own instances and its Service (or any labelled `gateway.istio.io/managed`), and
//!   the instances of east-west gateways (`topology.rs`), never get one.
//! - The Address field is `GatewayAddress {hostname: {namespace, <name>.<ns>.svc.<clusterDomain>},
//!   hbone_mtls_port: 15008}`, istiod's form for a Gateway whose status has a Hostname address.
//! - Routes for a service port: the VirtualServices for its host that live in its namespace or the
//!   waypoint's (file order, `http[]` in order, a `match.port` limiting a match to that port), then the
//!   HTTPRoutes with the Service as parentRef (a parentRef `port` limits them to that port), one route per
//!   match, ordered by Gateway API precedence (exact path, longer prefix, method, more headers, more query
//!   parameters; ties in file order). Ports known to be TCP or TLS get no routes. HTTPRoute: a missing path
//!   is PathPrefix `/`; PathPrefix matches whole segments; weights default to 1, weight-0 backends are
//!   dropped and none left answers 500; `retry` defaults to 2 attempts on connect-failure, refused-stream,
//!   unavailable, cancelled plus its codes; `timeouts.backendRequest` is the per-try timeout when retrying,
//!   else the route's; a redirect's status defaults to 302 (Gateway API) and a new scheme without a port to
//!   its well-known port. VirtualService: `retries` without `retryOn` retry on istiod's default conditions;
//!   zero attempts disable retries; a redirect's status defaults to 301.
//! - VirtualService `tcp[]` routes (match by `port` only): the first that fits a TCP (or undeclared) port
//!   splits its connections over weighted destinations; without one a TCP port goes to its own service.
//! - Clusters `outbound|<port>|<subset>|<hostname>`: endpoints are the workload uids the Service selects
//!   (and the subset's labels); DestinationRule per `clusters.rs`, Envoy's outlier defaults filled in.
//! - AuthorizationPolicies with `targetRef(s)` (converted in `istio/l7.rs`): a Gateway target goes to that
//!   waypoint's `policies`, a Service target to that Service's `policies` on its waypoint, the
//!   `istio-waypoint` GatewayClass (root namespace) to every waypoint. A target that is not a waypoint, or
//!   a Service bound to none, is not enforced, with a warning (istiod: TargetNotFound / AncestorNotBound).
//!   Selector policies are never used by waypoints.
//!
//! The mesh file's own choices (it has no Gateway status and no gateway controller):
//! - a waypoint Gateway is ready when a workload of its namespace is its instance (label
//!   `gateway.networking.k8s.io/gateway-name: <name>`); give such pods `istio.io/dataplane-mode: none`, as
//!   Istio's waypoint template does, so they are not captured;
//! - the control plane makes each waypoint's Service, as Istio's gateway controller does: `<name>` in the
//!   Gateway's namespace, no VIP, port 15008, selecting that label, labelled `gateway.istio.io/managed`. A
//!   Service of that name in `services` is refused;
//! - one Waypoint resource per waypoint Gateway, ready or not (a waypoint that is not ready has no bound
//!   services or workloads, but its policies).
//!
//! Refused, naming the field: regex matches and rewrites, wildcard hosts, hosts or backends that are not
//! services of the file, subsets no DestinationRule defines, consumer (cross-namespace) routes, and the
//! fields meshnode's waypoint does not implement (fault injection, mirroring, CORS, TLS routes,
//! consistent hashing, DestinationRule TLS, port-level settings, ...).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use self::binding::{is_gateway_service, Resolver, Target, MANAGED};
pub use self::binding::{
    GATEWAY_NAME, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE, WAYPOINT_FOR, XFCC_INCLUDE_CLIENT_IDENTITY,
};
use self::clusters::DestinationRules;
use self::routes::{find_service, PendingRoute, RouteSet};
use super::config::{
    pod_uid, Error, Labels, MeshConfig, PortProtocol, PortSpec, ServiceSpec, WorkloadSpec,
};
use super::istio::{self, PolicyTarget, WAYPOINT_CLASS};
use super::objects::{parse_duration, ObjectKind, Spec};
use crate::authz::Policy;
use crate::proto::waypoint as wp;
use crate::proto::workload as wl;

mod binding;
mod clusters;
mod routes;
#[cfg(test)]
mod tests;

/// The port waypoints take HBONE on (istiod's `hbone_mtls_port`, always 15008).
pub const WAYPOINT_PORT: u16 = 15008;

/// What the waypoint objects of a mesh file make.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Waypoints {
    /// Bindings refused, policies not enforced, ... to log.
    pub warnings: Vec<String>,
    /// The waypoints' Services, which the control plane makes (one per waypoint Gateway).
    pub services: Vec<ServiceSpec>,
    /// One Waypoint resource per waypoint Gateway, by `<namespace>/<name>`.
    pub resources: BTreeMap<String, wp::Waypoint>,
    /// Service (namespace, name) → its waypoint's key.
    service_waypoints: HashMap<(String, String), String>,
    /// Pod (namespace, name) → its waypoint's key.
    workload_waypoints: HashMap<(String, String), String>,
    /// Waypoint key → its address.
    addresses: HashMap<String, wl::GatewayAddress>,
    /// Waypoint key → the ALLOW for its identities (`autoAllowWaypointPolicy`).
    allow: BTreeMap<String, Policy>,
}

impl Waypoints {
    /// The waypoint of Service `namespace/name`, as the Address Service's `waypoint`.
    pub fn for_service(&self, namespace: &str, name: &str) -> Option<wl::GatewayAddress> {
        let key = self
            .service_waypoints
            .get(&(namespace.to_string(), name.to_string()))?;
        self.addresses.get(key).cloned()
    }

    /// The synthetic ALLOW policies of `autoAllowWaypointPolicy`, one per ready waypoint.
    pub fn allow_policies(&self) -> impl Iterator<Item = &Policy> {
        self.allow.values()
    }

    /// The keys of the synthetic ALLOW policies pod `namespace/name` lists: its own waypoint's and those
    /// of the Services (`namespace`, `name`) it backs (istiod's `implicitWaypointPolicies`).
    pub fn allow_keys<'a>(
        &self,
        namespace: &str,
        name: &str,
        backs: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Vec<String> {
        let own = self
            .workload_waypoints
            .get(&(namespace.to_string(), name.to_string()));
        let mut keys: Vec<String> =
            own.into_iter()
                .chain(backs.filter_map(|(ns, n)| {
                    self.service_waypoints.get(&(ns.to_string(), n.to_string()))
                }))
                .filter_map(|wp| self.allow.get(wp).map(Policy::key))
                .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// The waypoint of pod `namespace/name`, as the Address Workload's `waypoint`.
    pub fn for_workload(&self, namespace: &str, name: &str) -> Option<wl::GatewayAddress> {
        let key = self
            .workload_waypoints
            .get(&(namespace.to_string(), name.to_string()))?;
        self.addresses.get(key).cloned()
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn non_empty(value: &str, field: &str) -> Result<(), Error> {
    if value.is_empty() {
        Err(invalid(field, "must not be empty"))
    } else {
        Ok(())
    }
}

fn duration(text: &str, field: &str) -> Result<Duration, Error> {
    parse_duration(text).map_err(|r| invalid(field, r))
}

/// Whether `sa` in `namespace` is the service account of a waypoint's instance (a workload labelled with
/// the name of a waypoint Gateway of its namespace): the identity a waypoint runs with.
pub fn is_waypoint_identity(cfg: &MeshConfig, namespace: &str, sa: &str) -> bool {
    cfg.workloads.iter().any(|w| {
        w.namespace == namespace
            && w.service_account == sa
            && w.labels.get(GATEWAY_NAME).is_some_and(|gw| {
                cfg.istio.iter().any(|o| {
                    o.metadata.namespace == namespace
                        && o.metadata.name == *gw
                        && matches!(&o.spec, Spec::Gateway(g) if g.gateway_class_name == WAYPOINT_CLASS)
                })
            })
    })
}

/// Translates and checks the waypoint objects of `cfg`.
pub fn convert(cfg: &MeshConfig, istio: &istio::Converted) -> Result<Waypoints, Error> {
    let gateways = binding::gateways(cfg)?;
    let rules = DestinationRules::new(cfg)?;
    let sets = routes::route_sets(cfg, &rules)?;
    let resolver = Resolver::new(cfg, &gateways);
    let mut out = Waypoints::default();
    let mut services: Vec<Vec<&ServiceSpec>> = vec![Vec::new(); gateways.len()];
    for s in &cfg.services {
        if is_gateway_service(&s.labels) {
            continue;
        }
        let what = format!("Service {}/{}", s.namespace, s.name);
        if let Some(i) = resolver.resolve(
            &what,
            &s.namespace,
            &s.labels,
            Target::Service,
            &mut out.warnings,
        ) {
            out.service_waypoints
                .insert((s.namespace.clone(), s.name.clone()), gateways[i].key());
            services[i].push(s);
        }
    }
    let east_west = super::topology::east_west_gateways(cfg);
    let mut workloads: Vec<Vec<&WorkloadSpec>> = vec![Vec::new(); gateways.len()];
    for w in &cfg.workloads {
        let instance = w.labels.get(GATEWAY_NAME).is_some_and(|gw| {
            let key = (w.namespace.as_str(), gw.as_str());
            resolver.index.contains_key(&key) || east_west.contains(&key)
        });
        if instance {
            continue;
        }
        let what = format!("pod {}/{}", w.namespace, w.name);
        if let Some(i) = resolver.resolve(
            &what,
            &w.namespace,
            &w.labels,
            Target::Workload,
            &mut out.warnings,
        ) {
            out.workload_waypoints
                .insert((w.namespace.clone(), w.name.clone()), gateways[i].key());
            workloads[i].push(w);
        }
    }
    for (i, g) in gateways.iter().enumerate() {
        let key = g.key();
        let mut bound = services[i].clone();
        bound.sort_by_key(|s| cfg.service_hostname(&s.namespace, &s.name));
        let mut resource = wp::Waypoint {
            namespace: g.namespace.to_string(),
            name: g.name.to_string(),
            traffic_type: g.traffic as i32,
            xfcc_include_client_identity: g.xfcc,
            ..wp::Waypoint::default()
        };
        for s in bound {
            resource
                .services
                .push(service_entry(cfg, &rules, &sets, g.namespace, s)?);
        }
        let mut uids: Vec<String> = workloads[i]
            .iter()
            .map(|w| pod_uid(&cfg.cluster_id, &w.namespace, &w.name))
            .collect();
        uids.sort();
        resource.workloads = uids;
        if cfg.auto_allow_waypoint_policy && !g.instances.is_empty() {
            out.allow.insert(key.clone(), allow_waypoint(cfg, g));
        }
        out.resources.insert(key.clone(), resource);
        out.services.push(waypoint_service(g.namespace, g.name));
        out.addresses.insert(
            key,
            wl::GatewayAddress {
                destination: Some(wl::gateway_address::Destination::Hostname(
                    wl::NamespacedHostname {
                        namespace: g.namespace.to_string(),
                        hostname: cfg.service_hostname(g.namespace, g.name),
                    },
                )),
                hbone_mtls_port: u32::from(WAYPOINT_PORT),
            },
        );
    }
    attach_policies(cfg, istio, &mut out);
    Ok(out)
}

/// istiod's synthetic `<waypoint ns>/istio_allow_waypoint_<ns>_<name>`: ALLOW from every service account
/// of the waypoint's instances.
fn allow_waypoint(cfg: &MeshConfig, g: &binding::Gateway<'_>) -> Policy {
    use crate::authz::{Action, Clause, Match, Rule, Scope, StringMatch};
    let mut principals: Vec<String> = g
        .instances
        .iter()
        .map(|w| {
            format!(
                "{}/ns/{}/sa/{}",
                cfg.trust_domain, w.namespace, w.service_account
            )
        })
        .collect();
    principals.sort();
    principals.dedup();
    Policy {
        name: format!("istio_allow_waypoint_{}_{}", g.namespace, g.name),
        namespace: g.namespace.to_string(),
        scope: Scope::WorkloadSelector,
        action: Action::Allow,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: principals.into_iter().map(StringMatch::Exact).collect(),
                    ..Match::default()
                }],
            }],
        }],
    }
}

/// The Service Istio's gateway controller makes for a waypoint.
fn waypoint_service(namespace: &str, name: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.to_string(),
        namespace: namespace.to_string(),
        vips: Vec::new(),
        ports: vec![PortSpec {
            port: WAYPOINT_PORT,
            target_port: None,
            name: "mesh".into(),
            app_protocol: None,
        }],
        selector: Labels::from([(GATEWAY_NAME.to_string(), name.to_string())]),
        labels: Labels::from([(MANAGED.0.to_string(), MANAGED.1.to_string())]),
        internal_traffic_policy: None,
        // istiod routes to a waypoint's instances by locality, as for PreferClose.
        traffic_distribution: Some(super::config::TrafficDistribution::PreferClose),
    }
}

fn protocol(p: PortProtocol) -> wp::Protocol {
    match p {
        PortProtocol::Unknown => wp::Protocol::Unspecified,
        PortProtocol::Http => wp::Protocol::Http,
        PortProtocol::Http2 => wp::Protocol::Http2,
        PortProtocol::Grpc => wp::Protocol::Grpc,
        PortProtocol::Tls | PortProtocol::Tcp => wp::Protocol::Tcp,
    }
}

/// A bound service as its waypoint (of namespace `wns`) sees it.
fn service_entry(
    cfg: &MeshConfig,
    rules: &DestinationRules,
    sets: &[RouteSet],
    wns: &str,
    s: &ServiceSpec,
) -> Result<wp::Service, Error> {
    let key = (s.namespace.clone(), s.name.clone());
    let mut clusters = BTreeMap::new();
    let mut ports = Vec::new();
    for p in &s.ports {
        let proto = protocol(p.protocol());
        let default = rules.cluster(cfg, wns, s, p.port, "", "")?;
        let default_name = default.name.clone();
        clusters.insert(default_name.clone(), default);
        let mut pending: Vec<PendingRoute> = Vec::new();
        // The VirtualServices for this service that this waypoint applies.
        let virtual_services = || {
            sets.iter().filter(|set| {
                set.kind == ObjectKind::VirtualService
                    && set.parents.iter().any(|(k, _)| *k == key)
                    && (set.namespace == s.namespace || set.namespace == wns)
            })
        };
        // TCP (and not-yet-known) ports: the first `tcp[]` route for the port, else the service itself.
        let mut tcp = vec![wp::WeightedCluster {
            cluster: default_name.clone(),
            weight: 1,
        }];
        if matches!(proto, wp::Protocol::Tcp | wp::Protocol::Unspecified) {
            let first = virtual_services()
                .flat_map(|set| set.tcp.iter())
                .find(|r| r.applies_to(p.port));
            if let Some(r) = first {
                tcp = r
                    .backends
                    .iter()
                    .map(|b| backend_cluster(cfg, rules, wns, s, p.port, b, &mut clusters))
                    .collect::<Result<_, _>>()?;
            }
        }
        if proto != wp::Protocol::Tcp {
            for set in virtual_services() {
                pending.extend(
                    set.routes
                        .iter()
                        .filter_map(|r| routes::for_port(r, p.port)),
                );
            }
            let mut http: Vec<PendingRoute> = sets
                .iter()
                .filter(|set| {
                    set.kind == ObjectKind::HttpRoute
                        && set
                            .parents
                            .iter()
                            .any(|(k, port)| *k == key && port.is_none_or(|x| x == p.port))
                })
                .flat_map(|set| set.routes.iter().cloned())
                .collect();
            routes::sort_http_routes(&mut http);
            pending.extend(http);
        }
        let mut port_routes = Vec::new();
        for r in pending {
            port_routes.push(resolve_backends(
                cfg,
                rules,
                wns,
                s,
                p.port,
                r,
                &mut clusters,
            )?);
        }
        ports.push(wp::Port {
            port: u32::from(p.port),
            protocol: proto as i32,
            routes: port_routes,
            tcp,
            default_cluster: default_name,
        });
    }
    Ok(wp::Service {
        hostname: cfg.service_hostname(&s.namespace, &s.name),
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        ports,
        policies: Vec::new(),
        clusters: clusters.into_values().collect(),
    })
}

/// Names a forwarding route's backends as clusters (adding them to `clusters`).
fn resolve_backends(
    cfg: &MeshConfig,
    rules: &DestinationRules,
    wns: &str,
    routed: &ServiceSpec,
    port: u16,
    pending: PendingRoute,
    clusters: &mut BTreeMap<String, wp::Cluster>,
) -> Result<wp::Route, Error> {
    let mut route = pending.route;
    let Some(backends) = pending.backends else {
        return Ok(route);
    };
    let backends = backends
        .iter()
        .map(|b| backend_cluster(cfg, rules, wns, routed, port, b, clusters))
        .collect::<Result<_, _>>()?;
    route.action = Some(wp::route::Action::Forward(wp::Forward { backends }));
    Ok(route)
}

/// Names one backend of a route to `routed`'s `port` as a cluster (added to `clusters`).
fn backend_cluster(
    cfg: &MeshConfig,
    rules: &DestinationRules,
    wns: &str,
    routed: &ServiceSpec,
    port: u16,
    b: &routes::Backend,
    clusters: &mut BTreeMap<String, wp::Cluster>,
) -> Result<wp::WeightedCluster, Error> {
    let svc = find_service(cfg, &b.service.0, &b.service.1).ok_or_else(|| {
        invalid(&b.field, "not a service of the mesh file") // checked when the route was read
    })?;
    let same = svc.namespace == routed.namespace && svc.name == routed.name;
    let chosen = b.port.or_else(|| {
        if same || svc.ports.iter().any(|p| p.port == port) {
            Some(port)
        } else if svc.ports.len() == 1 {
            Some(svc.ports[0].port)
        } else {
            None
        }
    });
    let Some(chosen) = chosen else {
        return Err(invalid(
            format!("{}.port", b.field),
            format!(
                "service {}/{} has several ports and none is {port}: say which one",
                svc.namespace, svc.name
            ),
        ));
    };
    let cluster = rules.cluster(cfg, wns, svc, chosen, &b.subset, &b.field)?;
    let weighted = wp::WeightedCluster {
        cluster: cluster.name.clone(),
        weight: b.weight,
    };
    clusters.insert(cluster.name.clone(), cluster);
    Ok(weighted)
}

/// Puts each targeted AuthorizationPolicy where its targets say.
fn attach_policies(cfg: &MeshConfig, istio: &istio::Converted, out: &mut Waypoints) {
    fn push(list: &mut Vec<wp::AuthorizationPolicy>, p: &wp::AuthorizationPolicy) {
        if !list
            .iter()
            .any(|q| q.namespace == p.namespace && q.name == p.name)
        {
            list.push(p.clone());
        }
    }
    for t in &istio.targeted {
        let p = &t.policy;
        let ns = p.namespace.as_str();
        let what = format!("AuthorizationPolicy {ns}/{}", p.name);
        for (field, target) in &t.targets {
            match target {
                PolicyTarget::Gateway(name) => match out.resources.get_mut(&format!("{ns}/{name}")) {
                    Some(w) => push(&mut w.policies, p),
                    None => out.warnings.push(format!(
                        "{what}: {field} names Gateway {ns}/{name}, which is not a waypoint of the mesh \
                         file; not enforced there"
                    )),
                },
                PolicyTarget::Service(name) => {
                    let hostname = cfg.service_hostname(ns, name);
                    let entry = out
                        .service_waypoints
                        .get(&(ns.to_string(), name.clone()))
                        .and_then(|k| out.resources.get_mut(k))
                        .and_then(|w| w.services.iter_mut().find(|s| s.hostname == hostname));
                    match entry {
                        Some(s) => push(&mut s.policies, p),
                        None => {
                            let why = if find_service(cfg, ns, name).is_some() {
                                "is not bound to a waypoint"
                            } else {
                                "is not a service of the mesh file"
                            };
                            out.warnings.push(format!(
                                "{what}: {field} names Service {ns}/{name}, which {why}; not enforced there"
                            ));
                        }
                    }
                }
                PolicyTarget::EveryWaypoint => {
                    for w in out.resources.values_mut() {
                        push(&mut w.policies, p);
                    }
                }
            }
        }
    }
}
