//! ztunnel's local config format (`LOCAL_XDS_PATH` / `LOCAL_XDS`): parsing, validation, and the file
//! watcher that republishes [`State`] when the file changes.
//!
//! Input: YAML with top-level `workloads`, `services` and `policies` (camelCase keys, unknown keys refused,
//! as ztunnel refuses them). Output: a validated [`State`]. A bad file at start-up is a start-up error; a bad
//! edit later is logged and the last good state keeps serving.
//!
//! A refused policy never widens access: one unusable value refuses the whole file (never just that
//! policy or match), and a workload whose `authorizationPolicies` names a policy the file does not define
//! is refused too (ztunnel skips the unknown key, leaving the workload without that policy).
//!
//! Waypoints are written as ztunnel writes them: `waypoint: {destination: "network/IP" or
//! "namespace/hostname", hboneMtlsPort: 15008}` (a `{namespace, hostname}` map is accepted for the
//! hostname too), `weightedWaypoints: [{destination: <waypoint>, weight: N}]` on services, and
//! `applicationTunnel: {protocol: NONE|PROXY, port: N}` on workloads. A workload's `networkGateway` (its
//! network's east-west gateway) is written as a waypoint is.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

mod chunks;

use super::{
    AppTunnelProtocol, ApplicationTunnel, GatewayAddress, GatewayDestination, HealthPolicy,
    HealthStatus, Interner, IpFamilies, LbMode, Protocol, Scope, Service, State, WeightedWaypoint,
    Workload,
};
use crate::authz::{Policy, PolicySet};
use crate::identity::Identity;

/// Why a local config could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("reading local config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the format.
    #[error("local config is invalid: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A field holds a value that cannot be used.
    #[error("local config: {what} {key:?}: {reason}")]
    Invalid {
        /// What kind of object.
        what: &'static str,
        /// Which one.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Two objects share a key.
    #[error("local config: duplicate {kind} {key:?}")]
    Duplicate {
        /// What kind of key.
        kind: &'static str,
        /// The key.
        key: String,
    },
    /// The policies are invalid.
    #[error("local config policies: {0}")]
    Policy(#[from] crate::authz::Error),
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    /// Workloads.
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    /// Authorization policies.
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Services.
    #[serde(default)]
    pub services: Vec<LocalService>,
}

/// A workload entry, field for field as ztunnel's.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    workload_ips: Vec<IpAddr>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    #[serde(default)]
    network_gateway: Option<LocalGateway>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    network_mode: Option<String>,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    name: String,
    namespace: String,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    native_tunnel: bool,
    #[serde(default)]
    application_tunnel: Option<LocalApplicationTunnel>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    status: HealthStatus,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    locality: Option<LocalLocality>,
    #[serde(default)]
    services: BTreeMap<String, BTreeMap<u16, u16>>,
    #[serde(default = "one")]
    capacity: u32,
}

/// ztunnel's `locality: {region, zone, subzone}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
}

fn one() -> u32 {
    1
}

/// A service entry, field for field as ztunnel's.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    endpoints: Option<serde_yaml::Value>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    #[serde(default)]
    weighted_waypoints: Vec<LocalWeightedWaypoint>,
    #[serde(default)]
    load_balancer: Option<LocalLoadBalancer>,
    #[serde(default)]
    ip_families: Option<String>,
    #[serde(default)]
    canonical: bool,
    /// meshnode's own: visible only to its namespace (istiod's `visibility: NAMESPACE`, from `exportTo: .`).
    #[serde(default)]
    namespace_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalLoadBalancer {
    #[serde(default)]
    routing_preferences: Vec<Scope>,
    #[serde(default)]
    mode: LbMode,
    #[serde(default)]
    health_policy: HealthPolicy,
}

/// ztunnel's `GatewayAddress` in YAML.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalGateway {
    destination: LocalGatewayDestination,
    hbone_mtls_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LocalGatewayDestination {
    /// ztunnel's spelling: `network/IP`, else `namespace/hostname`.
    Text(String),
    /// `{namespace, hostname}`.
    Hostname(LocalNamespacedHostname),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalNamespacedHostname {
    namespace: String,
    hostname: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalWeightedWaypoint {
    destination: LocalGateway,
    weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalApplicationTunnel {
    protocol: AppTunnelProtocol,
    #[serde(default)]
    port: Option<u16>,
}

impl LocalGateway {
    /// The gateway address, or why not (the reason goes into the owning object's error). `field` names
    /// the key it was written under.
    fn convert(self, field: &str) -> Result<GatewayAddress, String> {
        let destination = match self.destination {
            LocalGatewayDestination::Text(text) => {
                // As ztunnel reads it: an address when what follows the first `/` is an IP.
                let (first, rest) = text.split_once('/').ok_or_else(|| {
                    format!("{field}.destination {text:?} is not network/IP or namespace/hostname")
                })?;
                match rest.parse::<IpAddr>() {
                    Ok(ip) => GatewayDestination::Address {
                        network: first.to_string(),
                        ip,
                    },
                    Err(_) => GatewayDestination::Hostname {
                        namespace: first.to_string(),
                        hostname: rest.to_string(),
                    },
                }
            }
            LocalGatewayDestination::Hostname(h) => GatewayDestination::Hostname {
                namespace: h.namespace,
                hostname: h.hostname,
            },
        };
        if let GatewayDestination::Hostname {
            namespace,
            hostname,
        } = &destination
        {
            if namespace.is_empty() || hostname.is_empty() {
                return Err(format!(
                    "{field}.destination needs both a namespace and a hostname"
                ));
            }
        }
        Ok(GatewayAddress {
            destination,
            hbone_mtls_port: self.hbone_mtls_port,
        })
    }
}

impl LocalConfig {
    /// Parses YAML text, whole (see [`state_from_text`] for large files).
    pub fn parse(yaml: &str) -> Result<LocalConfig, Error> {
        if yaml.trim().is_empty() {
            return Ok(LocalConfig::default());
        }
        Ok(serde_yaml::from_str(yaml)?)
    }

    /// Validates and indexes into a [`State`].
    pub fn into_state(self) -> Result<State, Error> {
        // One interner per load: what workloads have in common is held once.
        self.convert(&mut Interner::default())?.into_state()
    }

    /// Converts workloads, then services (errors come in that order).
    fn convert(self, interner: &mut Interner) -> Result<Converted, Error> {
        Ok(Converted {
            workloads: self
                .workloads
                .into_iter()
                .map(|w| workload(w, interner))
                .collect::<Result<_, _>>()?,
            services: self
                .services
                .into_iter()
                .map(|s| service(s, interner))
                .collect::<Result<_, _>>()?,
            policies: self.policies,
        })
    }
}

/// Validates and indexes a file's text into a [`State`]. A large file is parsed and converted in pieces
/// on this machine's cores ([`chunks`]; most of a proxy's time to ready is this parse); any other file,
/// and any file with a piece that does not parse or convert on its own, whole (so the result, and the
/// first error with its line, are those of the whole file).
pub fn state_from_text(yaml: &str) -> Result<State, Error> {
    state_with(yaml, chunks::Limits::here())
}

/// [`state_from_text`] with every list cut into pieces of two items on three threads, whatever the file's
/// size: for the fuzz target, which compares it with the whole load.
pub(crate) fn state_in_small_pieces(yaml: &str) -> Result<State, Error> {
    state_with(yaml, chunks::Limits::tiny())
}

fn state_with(yaml: &str, limits: chunks::Limits) -> Result<State, Error> {
    let in_pieces = chunks::pieces(yaml, limits).and_then(|pieces| {
        // One interner per thread: a value common to the pieces is held once per thread, not once.
        chunks::run_all(
            &pieces,
            limits.threads,
            Interner::default,
            |interner, piece| convert_piece(*piece, interner).ok(),
        )
    });
    match in_pieces {
        Some(parts) => Converted::concat(parts).into_state(),
        None => LocalConfig::parse(yaml)?.into_state(),
    }
}

fn convert_piece(piece: chunks::Piece<'_>, interner: &mut Interner) -> Result<Converted, Error> {
    let mut out = Converted::default();
    match piece.kind {
        chunks::Kind::Workloads => {
            out.workloads = serde_yaml::from_str::<Vec<LocalWorkload>>(piece.text)?
                .into_iter()
                .map(|w| workload(w, interner))
                .collect::<Result<_, _>>()?;
        }
        chunks::Kind::Services => {
            out.services = serde_yaml::from_str::<Vec<LocalService>>(piece.text)?
                .into_iter()
                .map(|s| service(s, interner))
                .collect::<Result<_, _>>()?;
        }
        chunks::Kind::Policies => out.policies = serde_yaml::from_str(piece.text)?,
        chunks::Kind::Whole => out = LocalConfig::parse(piece.text)?.convert(interner)?,
    }
    Ok(out)
}

/// Converted objects, not yet checked against each other nor indexed.
#[derive(Default)]
struct Converted {
    workloads: Vec<Workload>,
    services: Vec<Service>,
    policies: Vec<Policy>,
}

impl Converted {
    /// The parts one after the other.
    fn concat(parts: Vec<Converted>) -> Converted {
        let mut all = Converted {
            workloads: Vec::with_capacity(parts.iter().map(|p| p.workloads.len()).sum()),
            services: Vec::with_capacity(parts.iter().map(|p| p.services.len()).sum()),
            policies: Vec::with_capacity(parts.iter().map(|p| p.policies.len()).sum()),
        };
        for p in parts {
            all.workloads.extend(p.workloads);
            all.services.extend(p.services);
            all.policies.extend(p.policies);
        }
        all
    }

    /// Checks the policy references and indexes.
    fn into_state(self) -> Result<State, Error> {
        let Converted {
            workloads,
            services,
            policies,
        } = self;
        let policies = PolicySet::new(policies)?;
        // Over xDS a listed policy may arrive after the workload naming it, so an unknown key is skipped
        // (as ztunnel skips it). A file arrives whole: an unknown key here is a mistake, and skipping it
        // would leave the workload without a policy meant for it, i.e. with more access.
        for w in &workloads {
            if let Some(key) = w
                .authorization_policies
                .iter()
                .find(|k| policies.get(k).is_none())
            {
                return Err(Error::Invalid {
                    what: "workload",
                    key: w.uid.to_string(),
                    reason: format!(
                        "authorizationPolicies names {key:?}, which no policy in the file has"
                    ),
                });
            }
        }
        State::new(workloads, services, policies)
    }
}

fn workload(w: LocalWorkload, interner: &mut Interner) -> Result<Workload, Error> {
    let key = if w.uid.is_empty() {
        format!("{}/{}", w.namespace, w.name)
    } else {
        w.uid.clone()
    };
    let invalid = |reason: String| Error::Invalid {
        what: "workload",
        key: key.clone(),
        reason,
    };
    let network_gateway = w
        .network_gateway
        .map(|g| g.convert("networkGateway"))
        .transpose()
        .map_err(&invalid)?;
    let waypoint = w
        .waypoint
        .map(|g| g.convert("waypoint"))
        .transpose()
        .map_err(&invalid)?;
    // Port 0 is "unset", as in the xDS message.
    let application_tunnel = w.application_tunnel.map(|t| ApplicationTunnel {
        protocol: t.protocol,
        port: t.port.filter(|p| *p != 0),
    });
    if w.network_mode.as_deref().is_some_and(|m| m != "Standard") {
        tracing::warn!(workload = %key, "networkMode other than Standard is not supported yet; ignored");
    }
    let _ = w.native_tunnel;
    for svc in w.services.keys() {
        if !svc.contains('/') {
            return Err(invalid(format!(
                "service key {svc:?} is not namespace/hostname"
            )));
        }
    }
    // Empty trust domain and service account default as istiod's do.
    let trust_domain = if w.trust_domain.is_empty() {
        "cluster.local"
    } else {
        &w.trust_domain
    };
    let service_account = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    let identity = interner
        .identity(trust_domain, &w.namespace, service_account)
        .map_err(|e| invalid(format!("no valid identity: {e}")))?;
    let services: Vec<_> = w
        .services
        .into_iter()
        .map(|(k, ports)| (interner.string(k), interner.ports(ports)))
        .collect();
    let services = interner.service_ports(services);
    Ok(Workload {
        uid: key.into(),
        name: w.name.into(),
        namespace: interner.str(&w.namespace),
        service_account: interner.str(service_account),
        identity,
        ips: w.workload_ips,
        protocol: w.protocol,
        node: interner.str(&w.node),
        network: interner.str(&w.network),
        status: w.status,
        capacity: w.capacity,
        authorization_policies: w.authorization_policies,
        services,
        canonical_name: interner.str(&w.canonical_name),
        canonical_revision: interner.str(&w.canonical_revision),
        workload_name: interner.str(&w.workload_name),
        workload_type: interner.str(&w.workload_type),
        cluster_id: interner.str(if w.cluster_id.is_empty() {
            "Kubernetes"
        } else {
            &w.cluster_id
        }),
        hostname: interner.str(&w.hostname),
        waypoint: waypoint.map(Box::new),
        network_gateway: network_gateway.map(Box::new),
        application_tunnel,
        locality: w
            .locality
            .and_then(|l| super::Locality::known(l.region, l.zone, l.subzone)),
    })
}

fn service(s: LocalService, interner: &mut Interner) -> Result<Service, Error> {
    let key = format!("{}/{}", s.namespace, s.hostname);
    let invalid = |reason: String| Error::Invalid {
        what: "service",
        key: key.clone(),
        reason,
    };
    let vips = s
        .vips
        .iter()
        .map(|v| {
            let (net, ip) = v
                .split_once('/')
                .ok_or_else(|| invalid(format!("VIP {v:?} is not network/IP")))?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| invalid(format!("VIP {v:?} has no valid IP")))?;
            Ok((interner.str(net), ip))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .map(|san| {
            san.parse::<Identity>()
                .map_err(|e| invalid(format!("subjectAltNames: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if s.endpoints.is_some() {
        tracing::warn!(service = %key, "inline endpoints are not supported yet; ignored");
    }
    let waypoint = s
        .waypoint
        .map(|g| g.convert("waypoint"))
        .transpose()
        .map_err(&invalid)?;
    let weighted_waypoints = s
        .weighted_waypoints
        .into_iter()
        .map(|ww| {
            Ok(WeightedWaypoint {
                destination: ww.destination.convert("weightedWaypoints")?,
                weight: ww.weight,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(&invalid)?;
    let ip_families = match s.ip_families.as_deref() {
        None | Some("Automatic" | "AUTOMATIC") => IpFamilies::Automatic,
        Some("IPv4" | "IPV4_ONLY") => IpFamilies::V4,
        Some("IPv6" | "IPV6_ONLY") => IpFamilies::V6,
        Some("Dual" | "DUAL") => IpFamilies::Dual,
        Some(other) => {
            return Err(invalid(format!(
                "ipFamilies {other:?}: expected IPv4, IPv6, Dual or Automatic"
            )))
        }
    };
    let (health_policy, lb_mode, routing_preference) = match s.load_balancer {
        Some(lb) => (lb.health_policy, lb.mode, lb.routing_preferences),
        None => (HealthPolicy::default(), LbMode::default(), Vec::new()),
    };
    Ok(Service {
        name: s.name.into(),
        namespace: interner.str(&s.namespace),
        hostname: s.hostname.into(),
        vips,
        vip_cidrs: Vec::new(),
        ports: interner.ports(s.ports),
        subject_alt_names,
        canonical: s.canonical,
        health_policy,
        lb_mode,
        routing_preference: routing_preference.into(),
        ip_families,
        namespace_only: s.namespace_only,
        waypoint: waypoint.map(Box::new),
        weighted_waypoints,
        endpoints: Vec::new(),
    })
}

/// Logs what a (re)load produced.
pub fn log_loaded(path: &Path, state: &State, what: &str) {
    tracing::info!(
        path = %path.display(),
        workloads = state.workload_count(),
        services = state.service_count(),
        policies = state.policies().len(),
        "{what}"
    );
}

/// Reads and validates a local config file.
pub fn load_file(path: &Path) -> Result<(crate::file_watch::Seen, State), Error> {
    let (bytes, seen) =
        crate::file_watch::read_bounded_sync(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let state = state_from_text(&String::from_utf8_lossy(&bytes))?;
    drop(bytes);
    crate::allocator::release_freed();
    Ok((seen, state))
}

/// Re-reads `path` every `interval` and publishes a new [`State`] when its content changed and is valid.
/// Invalid content is logged and ignored: the last good state keeps serving. Returns when every receiver is
/// gone.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    last: crate::file_watch::Seen,
    tx: watch::Sender<Arc<State>>,
) {
    let shown = path.clone();
    crate::file_watch::poll(
        path,
        interval,
        last,
        tx,
        |bytes| state_from_text(&String::from_utf8_lossy(bytes)),
        |state| {
            crate::allocator::release_freed();
            log_loaded(&shown, state, "local config reloaded")
        },
    )
    .await
}
