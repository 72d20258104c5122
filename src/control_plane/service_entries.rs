//! Istio's `ServiceEntry` and `WorkloadEntry` in the mesh file (`istio:`), translated as istiod translates
//! them for ztunnel: each host of a ServiceEntry becomes a service (its `addresses` the VIPs, its ports
//! mapped to `targetPort` or the same number); its `endpoints` (and WorkloadEntries) become workloads
//! backing every host of the entry; with `resolution: DNS`, an endpoint written as a hostname, or each host
//! when there are no endpoints, becomes a workload known only by hostname, which the node proxy resolves
//! when a connection is routed to it. `workloadSelector` makes the pods and WorkloadEntries of the
//! entry's namespace whose labels match back its hosts. `exportTo: ["."]` makes the hosts visible to the
//! entry's namespace only. `addresses` may be single addresses or CIDR ranges; `resolution: NONE` sends
//! connections to the address dialled (istiod's PASSTHROUGH load balancing).
//!
//! Input: the mesh file (its pods and `istio:` objects). Output: [`Entries`] (services, workloads, and
//! [`Entries::services_for`] for the pods the selectors pick), or [`Error::Invalid`] naming the field.
//! Refused, with the field named: a wildcard host with DNS resolution, an endpoint that is
//! not an IP under STATIC or NONE, endpoints together with a `workloadSelector`, an `exportTo` other than
//! `.`, `*` or the entry's own namespace, unknown `location` or `resolution` values.
//!
//! Networks: an endpoint's or WorkloadEntry's `network`, else its label `topology.istio.io/network`, else
//! its namespace's (`topology.rs`); `translate.rs` adds the network's east-west gateway
//! (`network_gateway`) and sends the VIPs on every network in use, as for Kubernetes Services.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::config::{Error, MeshConfig};
use super::objects::networking::{SePort, ServiceEntrySpec, WorkloadEntrySpec};
use super::objects::{IstioObject, Labels, Spec};
use super::topology::endpoint_network;
use crate::proto::workload as wl;

/// What the ServiceEntries and WorkloadEntries of a mesh file make.
#[derive(Debug, Default)]
pub struct Entries {
    /// One per ServiceEntry host.
    pub services: Vec<wl::Service>,
    /// Endpoints, WorkloadEntries and DNS hosts.
    pub workloads: Vec<wl::Workload>,
    /// One per ServiceEntry with a `workloadSelector`.
    selectors: Vec<Selecting>,
}

/// A ServiceEntry's `workloadSelector`: its namespace, the labels, and the services (key and ports) a
/// matching pod backs.
type Selecting = (String, Labels, Vec<(String, wl::PortList)>);

impl Entries {
    /// The ServiceEntry hosts (`namespace/host` and ports) a pod of `namespace` with `labels` backs.
    pub fn services_for(&self, namespace: &str, labels: &Labels) -> Vec<(String, wl::PortList)> {
        self.selectors
            .iter()
            .filter(|(ns, sel, _)| {
                ns == namespace
                    && !sel.is_empty()
                    && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .flat_map(|(_, _, svcs)| svcs.iter().cloned())
            .collect()
    }
}

fn invalid(field: String, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Translates every ServiceEntry and WorkloadEntry of `cfg.istio`.
pub fn convert(cfg: &MeshConfig) -> Result<Entries, Error> {
    let mut out = Entries::default();
    let mut entries: Vec<(usize, &IstioObject, &WorkloadEntrySpec)> = Vec::new();
    for (i, obj) in cfg.istio.iter().enumerate() {
        match &obj.spec {
            Spec::ServiceEntry(spec) => service_entry(cfg, obj, spec, i, &mut out)?,
            Spec::WorkloadEntry(spec) => entries.push((i, obj, spec)),
            _ => {}
        }
    }
    // WorkloadEntries last: they back the hosts of the selecting ServiceEntries.
    for (i, obj, spec) in entries {
        let at = format!("istio[{i}].spec");
        let ip: IpAddr = spec.address.parse().map_err(|_| {
            invalid(
                format!("{at}.address"),
                format!("{:?} is not an IP address", spec.address),
            )
        })?;
        let ns = &obj.metadata.namespace;
        let mut w = endpoint_workload(
            cfg,
            &format!(
                "{}/networking.istio.io/WorkloadEntry/{ns}/{}",
                cfg.cluster_id, obj.metadata.name
            ),
            &obj.metadata.name,
            ns,
            spec,
        );
        w.addresses = vec![ip_bytes(&ip)];
        w.workload_type = wl::WorkloadType::Pod as i32;
        for (key, ports) in out.services_for(ns, &spec.labels) {
            w.services.insert(key, ports);
        }
        out.workloads.push(w);
    }
    Ok(out)
}

fn service_entry(
    cfg: &MeshConfig,
    obj: &IstioObject,
    spec: &ServiceEntrySpec,
    i: usize,
    out: &mut Entries,
) -> Result<(), Error> {
    let at = format!("istio[{i}].spec");
    let ns = &obj.metadata.namespace;
    let name = &obj.metadata.name;
    if spec.hosts.is_empty() {
        return Err(invalid(
            format!("{at}.hosts"),
            "at least one host is needed",
        ));
    }
    let resolution = spec.resolution.as_deref().unwrap_or("NONE");
    let dns = match resolution {
        "NONE" | "STATIC" => false,
        "DNS" | "DNS_ROUND_ROBIN" => true,
        other => {
            return Err(invalid(
                format!("{at}.resolution"),
                format!("{other:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            ))
        }
    };
    match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL" | "MESH_INTERNAL") => {}
        Some(other) => {
            return Err(invalid(
                format!("{at}.location"),
                format!("{other:?} is not MESH_EXTERNAL or MESH_INTERNAL"),
            ))
        }
    }
    for (h, host) in spec.hosts.iter().enumerate() {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        let valid = !bare.is_empty()
            && bare.len() <= 253
            && bare.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(invalid(
                format!("{at}.hosts[{h}]"),
                format!("{host:?} is not a DNS name (or *. and one)"),
            ));
        }
        if dns && host.starts_with("*.") && spec.endpoints.is_empty() {
            return Err(invalid(
                format!("{at}.hosts[{h}]"),
                "a wildcard host cannot be resolved (resolution DNS without endpoints)",
            ));
        }
    }
    // Single addresses and CIDR ranges (sent with their prefix length, as istiod sends them).
    let mut vips: Vec<(IpAddr, Option<u32>)> = Vec::new();
    for (a, addr) in spec.addresses.iter().enumerate() {
        let bad = || {
            invalid(
                format!("{at}.addresses[{a}]"),
                format!("{addr:?} is not an IP address or a CIDR range"),
            )
        };
        match addr.split_once('/') {
            Some(_) => {
                let net: ipnet::IpNet = addr.parse().map_err(|_| bad())?;
                vips.push((net.network(), Some(net.prefix_len().into())));
            }
            None => vips.push((addr.parse().map_err(|_| bad())?, None)),
        }
    }
    let namespace_only = match spec.export_to.as_slice() {
        [] => false,
        [one] if one == "*" => false,
        [one] if one == "." || one == ns => true,
        _ => {
            return Err(invalid(
                format!("{at}.exportTo"),
                "only [\".\"] (this namespace) or [\"*\"] are supported",
            ))
        }
    };
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        return Err(invalid(
            format!("{at}.workloadSelector"),
            "a ServiceEntry has endpoints or a workloadSelector, not both",
        ));
    }
    let service_ports = |ports_of: &BTreeMap<String, u16>| wl::PortList {
        ports: spec
            .ports
            .iter()
            .map(|p: &SePort| wl::Port {
                service_port: p.number.into(),
                target_port: ports_of
                    .get(&p.name)
                    .copied()
                    .or(p.target_port)
                    .unwrap_or(p.number)
                    .into(),
                ..Default::default()
            })
            .collect(),
    };
    for (p, port) in spec.ports.iter().enumerate() {
        if port.number == 0 {
            return Err(invalid(
                format!("{at}.ports[{p}].number"),
                "0 is not a port",
            ));
        }
    }
    let keys: Vec<String> = spec.hosts.iter().map(|h| format!("{ns}/{h}")).collect();
    for host in &spec.hosts {
        out.services.push(wl::Service {
            name: name.clone(),
            namespace: ns.clone(),
            hostname: host.clone(),
            addresses: vips
                .iter()
                .map(|(ip, length)| wl::NetworkAddress {
                    network: String::new(),
                    address: ip_bytes(ip),
                    length: *length,
                })
                .collect(),
            ports: service_ports(&BTreeMap::new()).ports,
            subject_alt_names: spec.subject_alt_names.clone(),
            ip_families: ip_families(&vips.iter().map(|(ip, _)| *ip).collect::<Vec<_>>()) as i32,
            // Resolution NONE: connections go to the address dialled (istiod's PASSTHROUGH).
            load_balancing: (!dns && resolution == "NONE").then(|| wl::LoadBalancing {
                mode: wl::load_balancing::Mode::Passthrough as i32,
                health_policy: wl::load_balancing::HealthPolicy::AllowAll as i32,
                ..Default::default()
            }),
            visibility: if namespace_only {
                wl::service::Visibility::Namespace
            } else {
                wl::service::Visibility::Public
            } as i32,
            ..Default::default()
        });
    }
    if let Some(sel) = &spec.workload_selector {
        let svcs = keys
            .iter()
            .map(|k| (k.clone(), service_ports(&BTreeMap::new())))
            .collect();
        out.selectors.push((ns.clone(), sel.labels.clone(), svcs));
        return Ok(());
    }
    let backs = |w: &mut wl::Workload, ports_of: &BTreeMap<String, u16>| {
        for k in &keys {
            w.services.insert(k.clone(), service_ports(ports_of));
        }
    };
    for (e, ep) in spec.endpoints.iter().enumerate() {
        let uid = format!(
            "{}/networking.istio.io/ServiceEntry/{ns}/{name}/{}",
            cfg.cluster_id, ep.address
        );
        let mut w = endpoint_workload(cfg, &uid, name, ns, ep);
        match ep.address.parse::<IpAddr>() {
            Ok(ip) => w.addresses = vec![ip_bytes(&ip)],
            Err(_) if dns && !ep.address.is_empty() => w.hostname = ep.address.clone(),
            Err(_) => {
                return Err(invalid(
                    format!("{at}.endpoints[{e}].address"),
                    format!(
                        "{:?} is not an IP address (a hostname needs resolution DNS)",
                        ep.address
                    ),
                ))
            }
        }
        backs(&mut w, &ep.ports);
        out.workloads.push(w);
    }
    if dns && spec.endpoints.is_empty() {
        for host in &spec.hosts {
            let ep = WorkloadEntrySpec::default();
            let uid = format!(
                "{}/networking.istio.io/ServiceEntry/{ns}/{name}/{host}",
                cfg.cluster_id
            );
            let mut w = endpoint_workload(cfg, &uid, name, ns, &ep);
            w.hostname = host.clone();
            backs(&mut w, &BTreeMap::new());
            out.workloads.push(w);
        }
    }
    Ok(())
}

/// A workload for an endpoint outside Kubernetes: plain TCP (no HBONE), healthy.
fn endpoint_workload(
    cfg: &MeshConfig,
    uid: &str,
    name: &str,
    ns: &str,
    ep: &WorkloadEntrySpec,
) -> wl::Workload {
    let label = |k: &str| ep.labels.get(k).cloned();
    let mut parts = ep.locality.splitn(3, '/').map(str::to_string);
    let locality = (!ep.locality.is_empty()).then(|| wl::Locality {
        region: parts.next().unwrap_or_default(),
        zone: parts.next().unwrap_or_default(),
        subzone: parts.next().unwrap_or_default(),
    });
    wl::Workload {
        uid: uid.to_string(),
        name: name.to_string(),
        namespace: ns.to_string(),
        network: endpoint_network(cfg, ns, &ep.network, &ep.labels).to_string(),
        tunnel_protocol: wl::TunnelProtocol::None as i32,
        trust_domain: if cfg.trust_domain == "cluster.local" {
            String::new()
        } else {
            cfg.trust_domain.clone()
        },
        service_account: if ep.service_account.is_empty() {
            "default".into()
        } else {
            ep.service_account.clone()
        },
        canonical_name: label("service.istio.io/canonical-name")
            .or_else(|| label("app"))
            .unwrap_or_else(|| name.to_string()),
        canonical_revision: label("service.istio.io/canonical-revision")
            .or_else(|| label("version"))
            .unwrap_or_else(|| "latest".into()),
        workload_name: name.to_string(),
        status: wl::WorkloadStatus::Healthy as i32,
        cluster_id: cfg.cluster_id.clone(),
        capacity: ep.weight,
        locality,
        ..Default::default()
    }
}

/// The IP families of a service with these VIPs, as istiod infers them.
pub(super) fn ip_families(vips: &[IpAddr]) -> wl::IpFamilies {
    let v4 = vips.iter().any(IpAddr::is_ipv4);
    let v6 = vips.iter().any(IpAddr::is_ipv6);
    match (v4, v6) {
        (true, true) => wl::IpFamilies::Dual,
        (true, false) => wl::IpFamilies::Ipv4Only,
        (false, true) => wl::IpFamilies::Ipv6Only,
        (false, false) => wl::IpFamilies::Automatic,
    }
}

/// An address as the workload API carries it.
pub(super) fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
