//! `GET /config_dump`: the proxy's state as JSON, in the shape ztunnel dumps and `istioctl ztunnel-config`
//! reads.
//!
//! Input: a [`State`] snapshot, the certificates a [`CertManager`] holds, the pods of in-pod mode
//! ([`PodState`]s), the [`Config`]. Output: one JSON object with `workloads`, `services`, `policies`
//! (lists, sorted by key), `certificates` (sorted by identity: `state`, `certChain` and `rootCerts`, each
//! certificate with `pem` — the PEM text, base64-encoded as ztunnel does —, a decimal `serialNumber`,
//! `validFrom` and `expirationTime` in RFC 3339), `workloadState` (pods by uid: `state` `Up` or `Pending`,
//! `info`, and a serving pod's open `connections`, `inbound` and `outbound`, each `src`, `originalDst`,
//! `actualDst`, `protocol`: what `istioctl ztunnel-config connections` reads), `config` (the settings an operator looks for, never a token) and `version`.
//!
//! Field names and JSON types follow ztunnel's serialisation: addresses are `network/ip` strings, a
//! waypoint is `{destination: "network/ip" | "namespace/hostname", hboneMtlsPort}`, port maps are objects
//! keyed by the port as a string.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::authz::Policy;
use crate::config::{Config, ProxyMode};
use crate::identity::{Identity, WorkloadCert};
use crate::inpod::PodState;
use crate::state::{
    GatewayAddress, GatewayDestination, HealthPolicy, HealthStatus, IpFamilies, LbMode, Protocol,
    Service, State, Workload,
};

/// Everything one dump is made of, read once per request.
pub struct Sources<'a> {
    /// The state snapshot.
    pub state: &'a State,
    /// Certificates held, by identity (`None`: first fetch under way).
    pub certificates: Vec<(Identity, Option<Arc<WorkloadCert>>)>,
    /// In-pod mode's pods, by uid (empty in dedicated mode).
    pub pods: BTreeMap<String, PodState>,
    /// The configuration.
    pub cfg: &'a Config,
}

/// The whole dump.
pub fn render(src: &Sources<'_>) -> Value {
    let mut workloads: Vec<&Arc<Workload>> = src.state.workloads().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Arc<Service>> = src.state.services().collect();
    services.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
    let mut policies: Vec<&Policy> = src.state.policies().iter().collect();
    policies.sort_by_key(|p| p.key());
    json!({
        "workloads": workloads.iter().map(|w| workload(w)).collect::<Vec<_>>(),
        "services": services.iter().map(|s| service(src.state, s)).collect::<Vec<_>>(),
        "policies": policies.iter().map(|p| policy(p)).collect::<Vec<_>>(),
        "certificates": src.certificates.iter().map(|(id, c)| certificates(id, c.as_deref())).collect::<Vec<_>>(),
        "workloadState": workload_state(src),
        "config": config(src.cfg),
        "version": version(),
    })
}

fn network_address(network: &str, ip: IpAddr) -> String {
    format!("{network}/{ip}")
}

fn gateway(g: &GatewayAddress) -> Value {
    let destination = match &g.destination {
        GatewayDestination::Address { network, ip } => network_address(network, *ip),
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
    };
    json!({ "destination": destination, "hboneMtlsPort": g.hbone_mtls_port })
}

/// A port map as JSON wants it: keys are strings, sorted.
fn ports<'a>(map: impl IntoIterator<Item = (&'a u16, &'a u16)>) -> Value {
    let sorted: BTreeMap<u16, u16> = map.into_iter().map(|(k, v)| (*k, *v)).collect();
    Value::Object(
        sorted
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

fn workload(w: &Workload) -> Value {
    let mut services: Vec<&str> = w.services.keys().map(|k| k.as_str()).collect();
    services.sort();
    let mut out = json!({
        "uid": w.uid,
        "workloadIps": w.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
        "protocol": match w.protocol { Protocol::TCP => "TCP", Protocol::HBONE => "HBONE" },
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "trustDomain": w.identity.trust_domain(),
        "workloadName": w.workload_name,
        "workloadType": w.workload_type,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
        "locality": {},
        "node": w.node,
        "network": w.network,
        "status": match w.status { HealthStatus::Healthy => "Healthy", HealthStatus::Unhealthy => "Unhealthy" },
        "hostname": w.hostname,
        "capacity": w.capacity,
        "authorizationPolicies": w.authorization_policies,
        "services": services,
    });
    let obj = out.as_object_mut().expect("an object");
    if let Some(g) = &w.waypoint {
        obj.insert("waypoint".into(), gateway(g));
    }
    if let Some(t) = &w.application_tunnel {
        let protocol = match t.protocol {
            crate::state::AppTunnelProtocol::NONE => "NONE",
            crate::state::AppTunnelProtocol::PROXY => "PROXY",
        };
        let mut tunnel = json!({ "protocol": protocol });
        if let Some(port) = t.port {
            tunnel["port"] = json!(port);
        }
        obj.insert("applicationTunnel".into(), tunnel);
    }
    out
}

fn service(state: &State, s: &Service) -> Value {
    let key = s.key();
    let mut endpoints: Vec<(&str, Value)> = state
        .endpoints(s)
        .map(|(w, port)| {
            let ep = json!({ "workloadUid": w.uid, "service": key, "port": ports(port.iter()) });
            (w.uid.as_str(), ep)
        })
        .collect();
    endpoints.sort_by(|a, b| a.0.cmp(b.0));
    let endpoints: Map<String, Value> = endpoints
        .into_iter()
        .map(|(uid, ep)| (uid.to_string(), ep))
        .collect();
    let mut out = json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": s.vips.iter().map(|(n, ip)| network_address(n, *ip)).collect::<Vec<_>>(),
        "ports": ports(s.ports.iter()),
        "endpoints": endpoints,
        "subjectAltNames": s.subject_alt_names.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        "loadBalancer": {
            "mode": match s.lb_mode {
                LbMode::Standard => "Standard",
                LbMode::Strict => "Strict",
                LbMode::Failover => "Failover",
                LbMode::Passthrough => "Passthrough",
            },
            "routingPreferences": s.routing_preference.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
            "healthPolicy": match s.health_policy {
                HealthPolicy::OnlyHealthy => "OnlyHealthy",
                HealthPolicy::AllowAll => "AllowAll",
            },
        },
        "canonical": s.canonical,
        "visibility": if s.namespace_only { "Namespace" } else { "Public" },
    });
    let obj = out.as_object_mut().expect("an object");
    let (v4, v6) = (
        s.vips.iter().any(|(_, ip)| ip.is_ipv4()),
        s.vips.iter().any(|(_, ip)| ip.is_ipv6()),
    );
    let families = match (s.ip_families, v4, v6) {
        (IpFamilies::Dual, ..) | (IpFamilies::Automatic, true, true) => Some("Dual"),
        (IpFamilies::V4, ..) | (IpFamilies::Automatic, true, false) => Some("IPv4"),
        (IpFamilies::V6, ..) | (IpFamilies::Automatic, false, true) => Some("IPv6"),
        (IpFamilies::Automatic, false, false) => None,
    };
    if let Some(f) = families {
        obj.insert("ipFamilies".into(), json!(f));
    }
    if let Some(g) = &s.waypoint {
        obj.insert("waypoint".into(), gateway(g));
    }
    if !s.weighted_waypoints.is_empty() {
        let weighted: Vec<Value> = s
            .weighted_waypoints
            .iter()
            .map(|w| json!({ "destination": gateway(&w.destination), "weight": w.weight }))
            .collect();
        obj.insert("weightedWaypoints".into(), json!(weighted));
    }
    out
}

fn policy(p: &Policy) -> Value {
    // The policy's own serialisation is ztunnel's (scope and action as names, rules as lists of lists of
    // matches, string matches as `{"Exact": …}`).
    serde_json::to_value(p).unwrap_or_else(
        |e| json!({ "name": p.name, "namespace": p.namespace, "error": e.to_string() }),
    )
}

fn certificates(id: &Identity, cert: Option<&WorkloadCert>) -> Value {
    let Some(cert) = cert else {
        return json!({ "identity": id.to_string(), "state": "Initializing", "certChain": [], "rootCerts": [] });
    };
    // A chain that carries its root too lists it under rootCerts only.
    let chain: Vec<Value> = cert
        .chain
        .iter()
        .filter(|c| !cert.roots.contains(c))
        .map(|c| one_certificate(c))
        .collect();
    let roots: Vec<Value> = cert.roots.iter().map(|c| one_certificate(c)).collect();
    json!({ "identity": id.to_string(), "state": "Available", "certChain": chain, "rootCerts": roots })
}

fn one_certificate(der: &[u8]) -> Value {
    let pem = pem(der);
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, x)) => json!({
            "pem": base64(pem.as_bytes()),
            "serialNumber": x.tbs_certificate.serial.to_string(),
            "validFrom": rfc3339(x.validity().not_before.to_datetime()),
            "expirationTime": rfc3339(x.validity().not_after.to_datetime()),
        }),
        Err(_) => json!({
            "pem": base64(pem.as_bytes()),
            "serialNumber": "",
            "validFrom": "",
            "expirationTime": "",
        }),
    }
}

/// `2033-03-22T13:04:57Z`: UTC, whole seconds, as ztunnel prints validity.
fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn workload_state(src: &Sources<'_>) -> Value {
    let pods: Map<String, Value> = src
        .pods
        .iter()
        .map(|(uid, p)| {
            let trust_domain = src
                .state
                .workload_by_info(&p.info)
                .map(|w| w.identity.trust_domain().to_string())
                .unwrap_or_default();
            let mut v = json!({
                "state": if p.up() { "Up" } else { "Pending" },
                "info": {
                    "name": p.info.name,
                    "namespace": p.info.namespace,
                    "serviceAccount": p.info.service_account,
                    "trustDomain": trust_domain,
                },
            });
            if let Some(c) = &p.connections {
                v["connections"] = json!({
                    "inbound": connections(&c.inbound),
                    "outbound": connections(&c.outbound),
                });
            }
            (uid.clone(), v)
        })
        .collect();
    Value::Object(pods)
}

/// ztunnel's connection entries (`src`, `originalDst`, `actualDst`, `protocol`), sorted for determinism.
fn connections(list: &[crate::proxy::connections::Listed]) -> Vec<Value> {
    let mut list: Vec<&crate::proxy::connections::Listed> = list.iter().collect();
    list.sort_by_key(|c| (c.src, c.actual_dst));
    list.iter()
        .map(|c| {
            json!({
                "src": c.src.to_string(),
                "originalDst": c.original_dst.map(|a| a.to_string()).unwrap_or_default(),
                "actualDst": c.actual_dst.to_string(),
                "protocol": c.protocol,
            })
        })
        .collect()
}

fn config(cfg: &Config) -> Value {
    json!({
        "proxyMode": match cfg.proxy_mode { ProxyMode::Shared => "Shared", ProxyMode::Dedicated => "Dedicated" },
        "nodeName": cfg.node_name,
        "network": cfg.network,
        "clusterId": cfg.cluster_id,
        "xdsAddress": cfg.xds.as_ref().map(|t| t.address.clone()),
        "ipv6Enabled": cfg.ipv6_enabled,
        "workerThreads": cfg.worker_threads,
        "terminationDeadline": format!("{:?}", cfg.termination_deadline),
        "secretTtl": format!("{:?}", cfg.secret_ttl),
        "ports": {
            "admin": cfg.ports.admin,
            "outbound": cfg.ports.outbound,
            "inboundPlaintext": cfg.ports.inbound_plaintext,
            "inbound": cfg.ports.inbound,
            "readiness": cfg.ports.readiness,
            "stats": cfg.ports.metrics,
        },
        "maxConnections": cfg.max_connections,
        "maxConnectionsTotal": cfg.max_connections_total,
    })
}

fn version() -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gitRevision": env!("MESHNODE_GIT_REVISION"),
        "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

#[cfg(test)]
mod tests;

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}
