//! Where the mesh file's workloads are, as istiod tells ztunnel for ambient multi-network: each pod's
//! network, each network's east-west gateway (a Gateway API `Gateway` of class `istio-east-west`), the
//! networks Service VIPs are sent on, and each pod's locality from its node's labels. `translate.rs` turns
//! them into `Workload.network`, `Workload.network_gateway`, `Workload.locality` and `Service.addresses`.
//!
//! Input: a [`MeshConfig`] whose own fields are checked. Output: [`Topology`] (with warnings to log), or a
//! [`config::Error`](Error) naming the field. In the mesh file, as Istio's multi-network docs have users
//! write it:
//!
//! ```yaml
//! nodes:                                 # optional: Kubernetes nodes and their labels
//!   node-1: {labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1a}}
//!   node-2: {labels: {topology.kubernetes.io/region: us, topology.kubernetes.io/zone: us-1a,
//!                     topology.istio.io/subzone: rack-3}}
//! namespaces:
//!   istio-system: {labels: {topology.istio.io/network: network1}}   # the cluster's network (istiod's)
//!   default: {labels: {istio.io/dataplane-mode: ambient}}
//! workloads:
//! - {name: eastwest-0, namespace: istio-system, serviceAccount: istio-eastwestgateway, ips: [10.2.0.100],
//!    node: node-2, labels: {gateway.networking.k8s.io/gateway-name: istio-eastwestgateway,
//!    istio.io/dataplane-mode: none}}     # the gateway's instance: network2, from its Gateway
//! - {name: reviews-v2, namespace: default, ips: [10.2.0.5], node: node-2,
//!    labels: {app: reviews, topology.istio.io/network: network2}}
//! istio:
//! - apiVersion: gateway.networking.k8s.io/v1
//!   kind: Gateway
//!   metadata: {name: istio-eastwestgateway, namespace: istio-system, labels: {topology.istio.io/network: network2}}
//!   spec:
//!     gatewayClassName: istio-east-west
//!     addresses: [{type: IPAddress, value: 192.0.2.20}]        # optional: else its first instance's IP
//!     listeners: [{name: mesh, port: 15008, protocol: HBONE,
//!                  tls: {mode: Terminate, options: {gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL}}}]
//! ```
//!
//! Mirrored from istiod (`pilot/pkg/serviceregistry/ambient/networks.go`, `workloads.go`, `nodes.go`;
//! `pilot/pkg/serviceregistry/kube/controller/controller.go` `Network`):
//! - A pod's network is its `network` field (the mesh file's own), else its label
//!   `topology.istio.io/network`, else — for an east-west gateway's instance — its Gateway's
//!   `topology.istio.io/network` label (Istio's gateway controller puts the Gateway's labels on the pods it
//!   deploys), else its namespace's label `topology.istio.io/network`, else the label on the
//!   `rootNamespace` (istiod's system namespace, whose label names the cluster's network), else `""`.
//!   istiod's `Network` reads the pod label, then the system namespace (its ambient index now takes the
//!   cluster's network alone, one network per cluster); the pod's own namespace is the mesh file's
//!   addition, so that one file can hold several networks namespace by namespace. ServiceEntry endpoints
//!   and WorkloadEntries: their `network`, else their labels', else the same namespace rules.
//! - An east-west gateway is a Gateway of class `istio-east-west` labelled `topology.istio.io/network: N`
//!   with an HBONE listener terminating TLS (istiod's `remoteK8sGatewayToNetworkGateways`). Its address is
//!   `spec.addresses[0]` (an IP; istiod reads the Gateway's status, which the mesh file does not have), else
//!   the first IP of its first instance (workloads of its namespace labelled
//!   `gateway.networking.k8s.io/gateway-name: <name>`, sorted by name); its HBONE port the listener's port.
//! - Every workload on a non-empty network N with a gateway, except east-west gateways' own instances, gets
//!   `network_gateway = {address: {network: N, address: <gateway IP>}, hbone_mtls_port: <port>}`
//!   (istiod's `getNetworkGatewayAddress`).
//! - When the gateway's address is not the IP of one of its instances on N (an address given in
//!   `spec.addresses`), istiod's workload for the gateway is sent too (`convertGateway`): uid and name
//!   `NetworkGateway/<N>/<address>/<port>`, the gateway's namespace and service account (its first
//!   instance's, else the annotation `gateway.istio.io/service-account`, else the Gateway's name), so the
//!   node proxy knows whom it tunnels to.
//! - A pod's locality is its node's labels `topology.kubernetes.io/region`, `topology.kubernetes.io/zone`
//!   and `topology.istio.io/subzone` (istiod's `nodeLocality`); none of them, or a node not listed under
//!   `nodes`, gives no locality. `trafficDistribution: PreferClose` (translate.rs) ranks endpoints by
//!   network, region, zone and subzone against these.
//!
//! The mesh file's own choices:
//! - Service VIPs are sent once per network in use (each distinct network of the pods; `""` alone for a
//!   file without pods), since a node proxy looks a VIP up on its own network. One network: as before.
//! - Two east-west gateways for one network: the first by namespace/name that has an address is used, the
//!   others are ignored with a warning (istiod takes the first valid one in its index, an order it does
//!   not define).
//! - A gateway with no address (none given, no instance) is not ready: its network gets no gateway, with a
//!   warning, as does a network of a multi-network file that has pods but no east-west gateway.
//! - Pod IPs must be unique per network (checked here, since the Gateways may decide a pod's network).
//!
//! Refused, naming the field: an east-west Gateway without the network label, without an HBONE listener,
//! with an HBONE listener without TLS, with TLS mode Passthrough, another `tls-terminate-mode` than
//! `ISTIO_MUTUAL` or `certificateRefs`; an address that is not an IP (or of another type than `IPAddress`);
//! an address that is the IP of a workload of that network that is not its instance; an instance whose own
//! network (field or pod label) is not its Gateway's.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use super::config::{Error, Labels, MeshConfig};
use super::objects::gateway::{GatewaySpec, TlsMode, GATEWAY_NAME};
use super::objects::{IstioObject, Spec};
use crate::proto::workload as wl;

#[cfg(test)]
mod tests;

/// The GatewayClass of east-west gateways (istiod's `EastWestGatewayClassName`).
pub const EAST_WEST_CLASS: &str = "istio-east-west";
/// The label naming a network: on pods, namespaces, WorkloadEntries and east-west Gateways.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Node label: region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Node label: zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node label: subzone (Istio's).
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// The listener TLS option saying how an Istio gateway terminates TLS.
pub const TLS_TERMINATE_MODE: &str = "gateway.istio.io/tls-terminate-mode";
/// The Gateway annotation naming its service account.
pub const GATEWAY_SERVICE_ACCOUNT: &str = "gateway.istio.io/service-account";

/// The networks Service VIPs go on when there is no pod.
const DEFAULT_NETWORKS: &[String] = &[String::new()];

/// A network's east-west gateway, as the file makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EastWestGateway {
    /// The Gateway's namespace.
    pub namespace: String,
    /// The Gateway's name.
    pub name: String,
    /// The network it serves.
    pub network: String,
    /// Its address on that network.
    pub address: IpAddr,
    /// Its HBONE listener's port.
    pub hbone_port: u16,
    /// The identity's service account (in `namespace`).
    pub service_account: String,
    /// Whether one of its instances has `address` on `network` (then that pod is the gateway's workload).
    pub address_is_instance: bool,
}

/// Where the file's workloads are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Gateways not used, networks without a gateway, ... to log.
    pub warnings: Vec<String>,
    /// Each pod's network, in the order of `workloads`.
    networks: Vec<String>,
    /// Whether each pod (in the order of `workloads`) is an east-west gateway's instance.
    instances: Vec<bool>,
    /// The distinct networks of the pods, sorted.
    in_use: Vec<String>,
    /// Network → its gateway.
    gateways: BTreeMap<String, EastWestGateway>,
}

impl Topology {
    /// The network of `cfg.workloads[i]`.
    pub fn network(&self, i: usize) -> &str {
        self.networks.get(i).map_or("", String::as_str)
    }

    /// Whether `cfg.workloads[i]` is an instance of an east-west gateway.
    pub fn is_gateway_instance(&self, i: usize) -> bool {
        self.instances.get(i).copied().unwrap_or(false)
    }

    /// The networks Service VIPs are sent on: each distinct network of the pods, sorted (`""` first);
    /// `[""]` when there is no pod.
    pub fn networks_in_use(&self) -> &[String] {
        if self.in_use.is_empty() {
            DEFAULT_NETWORKS
        } else {
            &self.in_use
        }
    }

    /// The east-west gateway of `network` (never of `""`).
    pub fn gateway(&self, network: &str) -> Option<&EastWestGateway> {
        self.gateways.get(network)
    }

    /// Every network's gateway, by network.
    pub fn gateways(&self) -> impl Iterator<Item = &EastWestGateway> {
        self.gateways.values()
    }

    /// Computes the topology of `cfg`, checking its east-west Gateways and pod IPs.
    pub fn convert(cfg: &MeshConfig) -> Result<Topology, Error> {
        let mut out = Topology::default();
        let mut candidates = Vec::new();
        for (i, obj) in cfg.istio.iter().enumerate() {
            if let Spec::Gateway(spec) = &obj.spec {
                if spec.gateway_class_name == EAST_WEST_CLASS {
                    candidates.push(east_west(format!("istio[{i}]"), obj, spec)?);
                }
            }
        }
        let by_key: HashMap<(&str, &str), usize> = candidates
            .iter()
            .enumerate()
            .map(|(k, c)| ((c.namespace(), c.name()), k))
            .collect();
        // Pod networks, and which pods are gateway instances.
        let mut instances_of: Vec<Vec<usize>> = vec![Vec::new(); candidates.len()];
        for (i, w) in cfg.workloads.iter().enumerate() {
            let gateway = w
                .labels
                .get(GATEWAY_NAME)
                .and_then(|g| by_key.get(&(w.namespace.as_str(), g.as_str())))
                .copied();
            let own = own_network(&w.network, &w.labels);
            let network = match (own, gateway) {
                (Some((field, n)), Some(k)) if n != candidates[k].network => {
                    let c = &candidates[k];
                    return Err(invalid(
                        format!("workloads[{i}].{field}"),
                        format!(
                            "{n:?}: the pod is an instance of the east-west gateway {}/{} ({}), which \
                             is for network {:?}",
                            c.namespace(),
                            c.name(),
                            c.at,
                            c.network
                        ),
                    ));
                }
                (Some((_, n)), _) => n,
                (None, Some(k)) => candidates[k].network,
                (None, None) => namespace_network(cfg, &w.namespace),
            };
            if let Some(k) = gateway {
                instances_of[k].push(i);
            }
            out.networks.push(network.to_string());
            out.instances.push(gateway.is_some());
        }
        // Pod IPs, unique per network.
        let mut holders: HashMap<(&str, IpAddr), usize> = HashMap::new();
        for (i, w) in cfg.workloads.iter().enumerate() {
            for (k, ip) in w.ips.iter().enumerate() {
                if let Some(j) = holders.insert((&out.networks[i], *ip), i) {
                    return Err(invalid(
                        format!("workloads[{i}].ips[{k}]"),
                        format!("{ip} is also an IP of workloads[{j}]"),
                    ));
                }
            }
        }
        out.in_use = out
            .networks
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Each network's gateway: the first by namespace/name that has an address.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by_key(|&k| (candidates[k].namespace(), candidates[k].name()));
        for k in order {
            let c = &candidates[k];
            let mut instances = instances_of[k].clone();
            instances.sort_by_key(|&i| &cfg.workloads[i].name);
            let first = instances.first().map(|&i| &cfg.workloads[i]);
            let (address, address_is_instance) = match c.address {
                Some(ip) => match holders.get(&(c.network, ip)) {
                    None => (ip, false),
                    Some(j) if instances.contains(j) => (ip, true),
                    Some(&j) => {
                        let w = &cfg.workloads[j];
                        return Err(invalid(
                            format!("{}.spec.addresses[0].value", c.at),
                            format!(
                                "{ip} is the IP of workloads[{j}] ({}/{}) on network {:?}, which is not \
                                 an instance of this gateway (label {GATEWAY_NAME}: {})",
                                w.namespace,
                                w.name,
                                c.network,
                                c.name()
                            ),
                        ));
                    }
                },
                None => match first {
                    Some(w) => (w.ips[0], true),
                    None => {
                        out.warnings.push(format!(
                            "east-west gateway {}/{} ({}) has no address (no spec.addresses, and no \
                             workload of {} is its instance: label {GATEWAY_NAME}: {}); not used for \
                             network {:?}",
                            c.namespace(),
                            c.name(),
                            c.at,
                            c.namespace(),
                            c.name(),
                            c.network
                        ));
                        continue;
                    }
                },
            };
            if let Some(used) = out.gateways.get(c.network) {
                out.warnings.push(format!(
                    "east-west gateway {}/{} ({}) is also for network {:?}; {}/{} is used (the first by \
                     namespace/name)",
                    c.namespace(),
                    c.name(),
                    c.at,
                    c.network,
                    used.namespace,
                    used.name
                ));
                continue;
            }
            let service_account = first
                .map(|w| w.service_account.clone())
                .or_else(|| {
                    c.obj
                        .metadata
                        .annotations
                        .get(GATEWAY_SERVICE_ACCOUNT)
                        .cloned()
                })
                .unwrap_or_else(|| c.name().to_string());
            out.gateways.insert(
                c.network.to_string(),
                EastWestGateway {
                    namespace: c.namespace().to_string(),
                    name: c.name().to_string(),
                    network: c.network.to_string(),
                    address,
                    hbone_port: c.hbone_port,
                    service_account,
                    address_is_instance,
                },
            );
        }
        if out.in_use.len() > 1 {
            for n in &out.in_use {
                if !n.is_empty() && !out.gateways.contains_key(n) {
                    out.warnings.push(format!(
                        "network {n:?} has pods but no east-west gateway (a Gateway of class \
                         {EAST_WEST_CLASS} labelled {NETWORK_LABEL}: {n}); other networks cannot reach \
                         them"
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// The network of an object of `namespace` that names none itself: its namespace's label, else the
/// label on the root namespace (istiod's system namespace: the cluster's network), else `""`.
pub fn namespace_network<'a>(cfg: &'a MeshConfig, namespace: &str) -> &'a str {
    let label = |ns: &str| {
        cfg.namespaces
            .get(ns)
            .and_then(|n| n.labels.get(NETWORK_LABEL))
            .filter(|n| !n.is_empty())
    };
    label(namespace)
        .or_else(|| label(&cfg.root_namespace))
        .map_or("", String::as_str)
}

/// The network of a ServiceEntry endpoint or WorkloadEntry of `namespace`: its `network`, else its label,
/// else [`namespace_network`].
pub fn endpoint_network<'a>(
    cfg: &'a MeshConfig,
    namespace: &str,
    network: &'a str,
    labels: &'a Labels,
) -> &'a str {
    own_network(network, labels).map_or_else(|| namespace_network(cfg, namespace), |(_, n)| n)
}

/// The network an object names itself (`network`, else its label), with the field that says it.
fn own_network<'a>(network: &'a str, labels: &'a Labels) -> Option<(String, &'a str)> {
    if !network.is_empty() {
        return Some(("network".into(), network));
    }
    labels
        .get(NETWORK_LABEL)
        .filter(|n| !n.is_empty())
        .map(|n| (format!("labels.{NETWORK_LABEL}"), n.as_str()))
}

/// The locality of pods on `node`, from its labels in `nodes` (istiod's `nodeLocality`).
pub fn locality(cfg: &MeshConfig, node: &str) -> Option<wl::Locality> {
    let labels = &cfg.nodes.get(node)?.labels;
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let locality = wl::Locality {
        region: get(REGION_LABEL),
        zone: get(ZONE_LABEL),
        subzone: get(SUBZONE_LABEL),
    };
    (!(locality.region.is_empty() && locality.zone.is_empty() && locality.subzone.is_empty()))
        .then_some(locality)
}

/// The (namespace, name) of every east-west Gateway of the file: their instances are never bound to a
/// waypoint (istiod: east-west gateways cannot have one).
pub fn east_west_gateways(cfg: &MeshConfig) -> HashSet<(&str, &str)> {
    cfg.istio
        .iter()
        .filter(|o| matches!(&o.spec, Spec::Gateway(g) if g.gateway_class_name == EAST_WEST_CLASS))
        .map(|o| (o.metadata.namespace.as_str(), o.metadata.name.as_str()))
        .collect()
}

/// An east-west Gateway of the file, checked.
struct Candidate<'a> {
    /// Where it is in the file (`istio[3]`).
    at: String,
    obj: &'a IstioObject,
    network: &'a str,
    /// `spec.addresses[0]`.
    address: Option<IpAddr>,
    hbone_port: u16,
}

impl Candidate<'_> {
    fn namespace(&self) -> &str {
        &self.obj.metadata.namespace
    }

    fn name(&self) -> &str {
        &self.obj.metadata.name
    }
}

fn invalid(field: String, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The HBONE listener as Istio's docs write it.
const HBONE_LISTENER: &str = "{name: mesh, port: 15008, protocol: HBONE, tls: {mode: Terminate, \
                              options: {gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL}}}";

fn east_west<'a>(
    at: String,
    obj: &'a IstioObject,
    spec: &GatewaySpec,
) -> Result<Candidate<'a>, Error> {
    let network = obj
        .metadata
        .labels
        .get(NETWORK_LABEL)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            invalid(
                format!("{at}.metadata.labels.{NETWORK_LABEL}"),
                "an east-west gateway is labelled with the network it serves",
            )
        })?;
    if let Some(f) = spec.unsupported() {
        return Err(invalid(format!("{at}.spec.{f}"), "not supported"));
    }
    let mut address = None;
    for (k, a) in spec.addresses.iter().flatten().enumerate() {
        let aat = format!("{at}.spec.addresses[{k}]");
        if let Some(t) = a.r#type.as_deref().filter(|t| *t != "IPAddress") {
            return Err(invalid(
                format!("{aat}.type"),
                format!("{t:?}: an east-west gateway's address is an IP (type IPAddress)"),
            ));
        }
        let ip: IpAddr = a.value.parse().map_err(|_| {
            invalid(
                format!("{aat}.value"),
                format!("{:?} is not an IP address", a.value),
            )
        })?;
        address.get_or_insert(ip);
    }
    let Some((k, listener)) = spec
        .listeners
        .iter()
        .enumerate()
        .find(|(_, l)| l.protocol == "HBONE")
    else {
        return Err(invalid(
            format!("{at}.spec.listeners"),
            format!("an east-west gateway needs an HBONE listener: {HBONE_LISTENER}"),
        ));
    };
    let lat = format!("{at}.spec.listeners[{k}]");
    if listener.port == 0 {
        return Err(invalid(format!("{lat}.port"), "must not be 0"));
    }
    let Some(tls) = &listener.tls else {
        return Err(invalid(
            format!("{lat}.tls"),
            format!("an east-west gateway's HBONE listener terminates the mesh's mTLS: {HBONE_LISTENER}"),
        ));
    };
    if tls.mode == Some(TlsMode::Passthrough) {
        return Err(invalid(
            format!("{lat}.tls.mode"),
            "Passthrough: an east-west gateway terminates the mesh's mTLS (mode Terminate)",
        ));
    }
    if tls.certificate_refs.is_some() {
        return Err(invalid(
            format!("{lat}.tls.certificateRefs"),
            "not supported: an east-west gateway terminates with its mesh certificate",
        ));
    }
    if tls.frontend_validation.is_some() {
        return Err(invalid(
            format!("{lat}.tls.frontendValidation"),
            "not supported",
        ));
    }
    if let Some(mode) = tls
        .options
        .get(TLS_TERMINATE_MODE)
        .filter(|m| *m != "ISTIO_MUTUAL")
    {
        return Err(invalid(
            format!("{lat}.tls.options.{TLS_TERMINATE_MODE}"),
            format!("{mode:?}: an east-west gateway terminates the mesh's mTLS (ISTIO_MUTUAL)"),
        ));
    }
    Ok(Candidate {
        at,
        obj,
        network,
        address,
        hbone_port: listener.port,
    })
}
