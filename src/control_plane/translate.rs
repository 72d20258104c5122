//! From the mesh file to the xDS resources istiod would send a ztunnel: `istio.workload.Address` (one per
//! pod, one per service) and `istio.security.Authorization` (one per policy, including those made from the
//! `istio:` objects by `istio.rs`, whose per-pod keys are appended to `authorization_policies`); and
//! meshnode's own `meshnode.waypoint.Waypoint` (one per waypoint Gateway, from `waypoints.rs`).
//!
//! Input: a validated [`MeshConfig`]. Output: [`Resources`], each resource under its xDS name (workload uid
//! `<cluster>//Pod/<namespace>/<name>` as istiod's `generatePodUID`; service `<namespace>/<hostname>`;
//! policy `<namespace>/<name>`; waypoint `<namespace>/<name>`). istiod's choices mirrored here:
//! - a pod is `HBONE` when enrolled by istio-cni's default rule (pod label `istio.io/dataplane-mode=ambient`,
//!   or the namespace label unless the pod says `none`; never in `kube-system`), else `NONE`;
//! - `trust_domain` is left empty for `cluster.local` (istiod's `pickTrustDomain`), `cluster_id` is set,
//!   `workload_type` `POD` with the pod name as `workload_name`;
//! - `network` is the pod's as `topology.rs` resolves it (its field, its label, its east-west Gateway's,
//!   its namespace's, the root namespace's, else `""`); `network_gateway` is that network's east-west
//!   gateway `{address: {network, gateway IP}, hbone_mtls_port}` for every workload on a non-empty network
//!   that has one (ServiceEntry and WorkloadEntry workloads too), except the gateways' own instances; a
//!   gateway whose address is no instance's IP is also sent as istiod's workload
//!   `NetworkGateway/<network>/<ip>/<port>`; `locality` comes from the pod's node's labels (`nodes:`);
//! - canonical name/revision from `service.istio.io/canonical-name|revision`, else
//!   `app.kubernetes.io/name|version`, else `app`|`version`, else the pod name|`latest`;
//! - `services` maps each selecting service (same namespace, selector ⊆ pod labels) to its ports;
//! - services get hostname `<name>.<ns>.svc.<clusterDomain>`, `ip_families` from the VIPs, no
//!   `subject_alt_names` (pods keep their own identities), each port's `app_protocol` from its
//!   `appProtocol` or name (istiod's `toAppProtocolFromKube`), and their VIPs once on each network in use
//!   (each distinct network of the pods, `""` without pods), since a node proxy looks a VIP up on its own
//!   network; ServiceEntry VIPs alike. A one-network file sends each VIP once, on that network;
//! - `trafficDistribution: PreferClose` ranks endpoints by network, region, zone and subzone, compared
//!   with the workloads' `network` and `locality`;
//! - a Service's or pod's `waypoint` is its waypoint's address when `istio.io/use-waypoint` binds it
//!   (`waypoints.rs`), and the Services the control plane makes for waypoints are served with the others.

use std::collections::BTreeMap;

use ipnet::IpNet;

pub use super::config::pod_uid;
use super::config::{MeshConfig, PortProtocol, ServiceSpec, WorkloadSpec};
use super::service_entries::{ip_bytes, ip_families};
use super::topology::{self, Topology};
use super::{istio, waypoints};
use crate::authz::{self, Policy, StringMatch};
use crate::cni_agent::cluster::{NamespaceInfo, PodInfo};
use crate::cni_agent::selector::{self, Decision};
use crate::proto::security as sec;
use crate::proto::waypoint as wp;
use crate::proto::workload as wl;

/// Everything the control plane serves, by xDS resource name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// `istio.workload.Address` resources: workloads by uid, services by `namespace/hostname`.
    pub addresses: BTreeMap<String, wl::Address>,
    /// `istio.security.Authorization` resources by `namespace/name`.
    pub authorizations: BTreeMap<String, sec::Authorization>,
    /// `meshnode.waypoint.Waypoint` resources by `namespace/name` of their Gateway.
    pub waypoints: BTreeMap<String, wp::Waypoint>,
}

/// A service's fully qualified hostname.
pub fn service_hostname(cfg: &MeshConfig, svc: &ServiceSpec) -> String {
    cfg.service_hostname(&svc.namespace, &svc.name)
}

/// The xDS resource name of an Address: the workload uid, or `namespace/hostname` of a service.
pub fn address_name(addr: &wl::Address) -> Option<String> {
    match addr.r#type.as_ref()? {
        wl::address::Type::Workload(w) => Some(w.uid.clone()),
        wl::address::Type::Service(s) => Some(format!("{}/{}", s.namespace, s.hostname)),
    }
}

/// Translates the whole mesh.
pub fn translate(cfg: &MeshConfig) -> Resources {
    let mut out = Resources::default();
    // The config was validated, so conversion succeeds; were it to fail, no Istio policy is sent and the
    // error is logged (the last good snapshot is what a bad file keeps serving anyway).
    let istio = istio::convert(cfg).unwrap_or_else(|e| {
        tracing::error!(error = %e, "istio objects could not be translated");
        istio::Converted::default()
    });
    for warning in &istio.warnings {
        tracing::warn!("{warning}");
    }
    let waypoints = waypoints::convert(cfg, &istio).unwrap_or_else(|e| {
        tracing::error!(error = %e, "waypoint objects could not be translated");
        waypoints::Waypoints::default()
    });
    for warning in &waypoints.warnings {
        tracing::warn!("{warning}");
    }
    let entries = super::service_entries::convert(cfg).unwrap_or_else(|e| {
        tracing::error!(error = %e, "ServiceEntry objects could not be translated");
        super::service_entries::Entries::default()
    });
    let topology = Topology::convert(cfg).unwrap_or_else(|e| {
        tracing::error!(error = %e, "networks and east-west gateways could not be translated");
        Topology::default()
    });
    for warning in &topology.warnings {
        tracing::warn!("{warning}");
    }
    let services: Vec<&ServiceSpec> = cfg.services.iter().chain(&waypoints.services).collect();
    let enrollment = selector::Policy {
        selectors: selector::default_selectors(),
        exclude_namespaces: vec!["kube-system".into()],
    };
    for (i, w) in cfg.workloads.iter().enumerate() {
        let mut workload = workload(cfg, &enrollment, &services, w);
        workload.network = topology.network(i).to_string();
        if !topology.is_gateway_instance(i) {
            workload.network_gateway = network_gateway(&topology, &workload.network);
        }
        workload.locality = topology::locality(cfg, &w.node);
        workload.waypoint = waypoints.for_workload(&w.namespace, &w.name);
        for (key, ports) in entries.services_for(&w.namespace, &w.labels) {
            workload.services.insert(key, ports);
        }
        let backs = services
            .iter()
            .filter(|s| selects(s, w))
            .map(|s| (s.namespace.as_str(), s.name.as_str()));
        let implicit = waypoints.allow_keys(&w.namespace, &w.name, backs);
        for key in istio.keys_for(w).into_iter().chain(implicit) {
            if !workload.authorization_policies.contains(&key) {
                workload.authorization_policies.push(key);
            }
        }
        out.addresses.insert(
            workload.uid.clone(),
            wl::Address {
                r#type: Some(wl::address::Type::Workload(workload)),
            },
        );
    }
    for s in &services {
        let mut service = service(cfg, s, topology.networks_in_use());
        service.waypoint = waypoints.for_service(&s.namespace, &s.name);
        out.addresses.insert(
            format!("{}/{}", service.namespace, service.hostname),
            wl::Address {
                r#type: Some(wl::address::Type::Service(service)),
            },
        );
    }
    for mut w in entries.workloads {
        w.network_gateway = network_gateway(&topology, &w.network);
        out.addresses.insert(
            w.uid.clone(),
            wl::Address {
                r#type: Some(wl::address::Type::Workload(w)),
            },
        );
    }
    for mut s in entries.services {
        s.addresses = on_networks(&s.addresses, topology.networks_in_use());
        out.addresses.insert(
            format!("{}/{}", s.namespace, s.hostname),
            wl::Address {
                r#type: Some(wl::address::Type::Service(s)),
            },
        );
    }
    for gw in topology.gateways().filter(|g| !g.address_is_instance) {
        let w = gateway_workload(cfg, gw);
        out.addresses.insert(
            w.uid.clone(),
            wl::Address {
                r#type: Some(wl::address::Type::Workload(w)),
            },
        );
    }
    for p in cfg
        .policies
        .iter()
        .chain(&istio.policies)
        .chain(waypoints.allow_policies())
    {
        out.authorizations.insert(p.key(), authorization(p));
    }
    out.waypoints = waypoints.resources;
    out
}

/// Whether the pod is captured (HBONE) under istio-cni's default rule.
fn enrolled(cfg: &MeshConfig, enrollment: &selector::Policy, w: &WorkloadSpec) -> bool {
    let ns = cfg.namespaces.get(&w.namespace).map(|n| NamespaceInfo {
        labels: n.labels.clone(),
    });
    let pod = PodInfo {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        labels: w.labels.clone(),
        ips: w.ips.clone(),
        ..PodInfo::default()
    };
    enrollment.decide(ns.as_ref(), &pod) == Decision::Enroll
}

/// Whether Service `s` selects pod `w` (same namespace, selector ⊆ labels).
fn selects(s: &ServiceSpec, w: &WorkloadSpec) -> bool {
    s.namespace == w.namespace
        && !s.selector.is_empty()
        && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
}

fn first_label<'a>(w: &'a WorkloadSpec, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| w.labels.get(*k))
        .map(String::as_str)
}

fn workload(
    cfg: &MeshConfig,
    enrollment: &selector::Policy,
    all_services: &[&ServiceSpec],
    w: &WorkloadSpec,
) -> wl::Workload {
    let tunnel = if enrolled(cfg, enrollment, w) {
        wl::TunnelProtocol::Hbone
    } else {
        wl::TunnelProtocol::None
    };
    let canonical_name = first_label(
        w,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(&w.name)
    .to_string();
    let canonical_revision = first_label(
        w,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest")
    .to_string();
    let mut services = std::collections::HashMap::new();
    for s in all_services {
        if selects(s, w) {
            services.insert(
                format!("{}/{}", s.namespace, service_hostname(cfg, s)),
                wl::PortList { ports: ports(s) },
            );
        }
    }
    wl::Workload {
        uid: pod_uid(&cfg.cluster_id, &w.namespace, &w.name),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.ips.iter().map(ip_bytes).collect(),
        tunnel_protocol: tunnel as i32,
        trust_domain: sent_trust_domain(cfg),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        canonical_name,
        canonical_revision,
        workload_type: wl::WorkloadType::Pod as i32,
        workload_name: w.name.clone(),
        authorization_policies: w.authorization_policies.clone(),
        status: wl::WorkloadStatus::Healthy as i32,
        cluster_id: cfg.cluster_id.clone(),
        services,
        ..wl::Workload::default()
    }
}

fn ports(s: &ServiceSpec) -> Vec<wl::Port> {
    s.ports
        .iter()
        .map(|p| wl::Port {
            service_port: u32::from(p.port),
            target_port: u32::from(p.target()),
            app_protocol: app_protocol(p.protocol()) as i32,
        })
        .collect()
}

/// istiod's `toAppProtocolFromProtocol`.
fn app_protocol(p: PortProtocol) -> wl::AppProtocol {
    match p {
        PortProtocol::Unknown => wl::AppProtocol::Unknown,
        PortProtocol::Http => wl::AppProtocol::Http11,
        PortProtocol::Http2 => wl::AppProtocol::Http2,
        PortProtocol::Grpc => wl::AppProtocol::Grpc,
        PortProtocol::Tls => wl::AppProtocol::Tls,
        PortProtocol::Tcp => wl::AppProtocol::Tcp,
    }
}

/// istiod's `pickTrustDomain`: empty for `cluster.local`.
fn sent_trust_domain(cfg: &MeshConfig) -> String {
    if cfg.trust_domain == "cluster.local" {
        String::new()
    } else {
        cfg.trust_domain.clone()
    }
}

/// The `network_gateway` of a workload on `network`: its east-west gateway's address (none on `""`).
fn network_gateway(topology: &Topology, network: &str) -> Option<wl::GatewayAddress> {
    if network.is_empty() {
        return None;
    }
    let gw = topology.gateway(network)?;
    Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Address(
            wl::NetworkAddress {
                network: gw.network.clone(),
                address: ip_bytes(&gw.address),
                length: None,
            },
        )),
        hbone_mtls_port: u32::from(gw.hbone_port),
    })
}

/// istiod's workload for a network gateway whose address is no pod's (`convertGateway`): what the node
/// proxy dials and whose identity it expects.
fn gateway_workload(cfg: &MeshConfig, gw: &topology::EastWestGateway) -> wl::Workload {
    let uid = format!(
        "NetworkGateway/{}/{}/{}",
        gw.network, gw.address, gw.hbone_port
    );
    wl::Workload {
        name: uid.clone(),
        uid,
        namespace: gw.namespace.clone(),
        service_account: gw.service_account.clone(),
        network: gw.network.clone(),
        addresses: vec![ip_bytes(&gw.address)],
        trust_domain: sent_trust_domain(cfg),
        ..wl::Workload::default()
    }
}

/// `addresses` (on network `""`) once on each of `networks`, network by network.
fn on_networks(addresses: &[wl::NetworkAddress], networks: &[String]) -> Vec<wl::NetworkAddress> {
    networks
        .iter()
        .flat_map(|n| {
            addresses.iter().map(move |a| wl::NetworkAddress {
                network: n.clone(),
                ..a.clone()
            })
        })
        .collect()
}

fn service(cfg: &MeshConfig, s: &ServiceSpec, networks: &[String]) -> wl::Service {
    let ip_families = ip_families(&s.vips);
    let vips: Vec<wl::NetworkAddress> = s
        .vips
        .iter()
        .map(|ip| wl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(ip),
            length: None,
        })
        .collect();
    wl::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: service_hostname(cfg, s),
        addresses: on_networks(&vips, networks),
        ports: ports(s),
        ip_families: ip_families as i32,
        load_balancing: load_balancing(s),
        ..wl::Service::default()
    }
}

/// istiod's load balancing for a Service: `internalTrafficPolicy: Local` keeps connections on the client's
/// node (Strict), and wins over `trafficDistribution: PreferClose`, which prefers the nearest endpoints by
/// network, region, zone and subzone and fails over outward.
fn load_balancing(s: &ServiceSpec) -> Option<wl::LoadBalancing> {
    use super::config::{InternalTrafficPolicy, TrafficDistribution};
    use wl::load_balancing::{Mode, Scope};
    if s.internal_traffic_policy == Some(InternalTrafficPolicy::Local) {
        return Some(wl::LoadBalancing {
            routing_preference: vec![Scope::Node as i32],
            mode: Mode::Strict as i32,
            ..Default::default()
        });
    }
    match s.traffic_distribution {
        Some(TrafficDistribution::PreferClose | TrafficDistribution::PreferSameZone) => {
            Some(wl::LoadBalancing {
                routing_preference: [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone]
                    .map(|s| s as i32)
                    .to_vec(),
                mode: Mode::Failover as i32,
                ..Default::default()
            })
        }
        None => None,
    }
}

/// A policy as the `istio.security.Authorization` resource istiod would send.
pub fn authorization(p: &Policy) -> sec::Authorization {
    sec::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            authz::Scope::Global => sec::Scope::Global,
            authz::Scope::Namespace => sec::Scope::Namespace,
            authz::Scope::WorkloadSelector => sec::Scope::WorkloadSelector,
        } as i32,
        action: match p.action {
            authz::Action::Allow => sec::Action::Allow,
            authz::Action::Deny => sec::Action::Deny,
        } as i32,
        rules: p
            .rules
            .iter()
            .map(|r| sec::Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| sec::Clause {
                        matches: c.matches.iter().map(match_proto).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: p.dry_run,
        extensions: Vec::new(),
    }
}

fn match_proto(m: &authz::Match) -> sec::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match).collect();
    let nets = |v: &[IpNet]| {
        v.iter()
            .map(|n| sec::Address {
                address: ip_bytes(&n.addr()),
                length: u32::from(n.prefix_len()),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let accounts = |v: &[authz::ServiceAccountMatch]| {
        v.iter()
            .map(|sa| sec::ServiceAccountMatch {
                namespace: sa.namespace.clone(),
                service_account: sa.service_account.clone(),
            })
            .collect()
    };
    sec::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        extensions: Vec::new(),
    }
}

fn string_match(s: &StringMatch) -> sec::StringMatch {
    use sec::string_match::MatchType;
    sec::StringMatch {
        match_type: Some(match s {
            StringMatch::Exact(v) => MatchType::Exact(v.clone()),
            StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
            StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
            StringMatch::Presence => MatchType::Presence(()),
        }),
    }
}
