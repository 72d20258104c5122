//! xDS resources → the proxy's own types: `istio.workload.Address` (a Workload or a Service) into
//! [`state::Workload`] / [`state::Service`], and `istio.security.Authorization` into [`authz::Policy`].
//!
//! Input: one decoded resource and the name it was sent under. Output: the converted value, or a
//! [`ConvertError`] saying which field is wrong; the client turns that into one entry of a NACK.
//!
//! Defaults are ztunnel's (trust domain `""` → `cluster.local`, service account `""` → `default`,
//! cluster id `""` → `Kubernetes`, capacity unset → 1). Refusals mirror the local config's, which are
//! stricter than ztunnel where ztunnel would silently change meaning: unknown enum values, addresses
//! that are not 4 or 16 bytes, `LEGACY_ISTIO_MTLS`, gateway addresses without a destination, ports above
//! 65535 (ztunnel truncates), malformed CIDRs and empty string matches (ztunnel drops them, widening
//! access), and a resource name that is not the object's key (`uid` for workloads, `namespace/hostname`
//! for services, `namespace/name` for policies — what istiod sends, and what removals name).
//!
//! A refused policy is still NACKed, but [`fail_safe_policy`] gives what to enforce in its place when no
//! earlier good version is held: being stricter than ztunnel must not end in enforcing less than ztunnel.
//!
//! Waypoints (`Service.waypoint`, `Service.weighted_waypoints`, `Workload.waypoint`), network gateways
//! (`Workload.network_gateway`), locality, routing preferences, IP families, service visibility and
//! `Workload.application_tunnel` are carried into the state. Accepted but not acted on: host-network
//! mode, `ingress_use_waypoint` (for ingress gateways; ztunnel does not read it either). They are still
//! validated, so a bad value is refused rather than ignored.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::authz::{
    self, Action, Clause, Match, MatchField, MatchPosition, Policy, Rule, Scope,
    ServiceAccountMatch, Unusable,
};
use crate::identity::Identity;
use crate::proto::{security, workload as pb};
use crate::state::{
    AppTunnelProtocol, ApplicationTunnel, GatewayAddress, GatewayDestination, HealthPolicy,
    HealthStatus, Interner, IpFamilies, LbMode, Locality, Protocol, Scope as LocalityScope,
    Service, SharedStr, WeightedWaypoint, Workload,
};

/// Why a resource could not be converted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The `Address` has neither a workload nor a service.
    #[error("address resource holds neither a workload nor a service")]
    EmptyAddress,
    /// The resource name is not the key the object is known by.
    #[error("resource name {name:?} does not match the {what} key {key:?}")]
    NameMismatch {
        /// `workload uid`, `service namespace/hostname` or `policy namespace/name`.
        what: &'static str,
        /// The name the resource was sent under.
        name: String,
        /// The key derived from its content.
        key: String,
    },
    /// A required field is empty.
    #[error("{field} is empty")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// An IP address field does not hold 4 or 16 bytes.
    #[error("{field}: address of {len} bytes (want 4 or 16)")]
    AddressLength {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A prefix length is longer than the address.
    #[error("{field}: prefix length {length} is too long for {ip}")]
    PrefixLength {
        /// The field.
        field: &'static str,
        /// The address.
        ip: IpAddr,
        /// The prefix length.
        length: u32,
    },
    /// An enum field holds a value this proxy does not know.
    #[error("{field}: unknown value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The raw value.
        value: i32,
    },
    /// `LEGACY_ISTIO_MTLS` is refused, as ztunnel refuses it.
    #[error("tunnel protocol LEGACY_ISTIO_MTLS is not supported")]
    LegacyIstioMtls,
    /// A routing preference is `UNSPECIFIED_SCOPE`.
    #[error("loadBalancing.routingPreference: UNSPECIFIED_SCOPE is not a scope")]
    UnspecifiedScope,
    /// A gateway address (waypoint, network gateway) has no destination.
    #[error("{field}: gateway address without a destination")]
    GatewayWithoutDestination {
        /// The field.
        field: &'static str,
    },
    /// A port number does not fit in 16 bits.
    #[error("{field}: port {value} is above 65535")]
    Port {
        /// The field.
        field: &'static str,
        /// The value.
        value: u32,
    },
    /// A key of `Workload.services` is not `namespace/hostname`.
    #[error("services: key {key:?} is not namespace/hostname")]
    ServiceKey {
        /// The key.
        key: String,
    },
    /// The workload's identity cannot be formed, or a subject alt name is not a SPIFFE identity.
    #[error("{field}: {source}")]
    Identity {
        /// The field.
        field: &'static str,
        /// Why.
        source: crate::identity::spiffe::ParseError,
    },
    /// A string match has no kind (exact, prefix, suffix or presence).
    #[error(
        "policy {policy}: rules[{rule}][{clause}][{index}].{field}: string match with no value"
    )]
    EmptyMatchKind {
        /// Policy key.
        policy: String,
        /// Rule index.
        rule: usize,
        /// Clause index.
        clause: usize,
        /// Match index.
        index: usize,
        /// The list.
        field: &'static str,
    },
    /// A CIDR in a policy is malformed.
    #[error("policy {policy}: rules[{rule}][{clause}][{index}].{field}: {reason}")]
    PolicyCidr {
        /// Policy key.
        policy: String,
        /// Rule index.
        rule: usize,
        /// Clause index.
        clause: usize,
        /// Match index.
        index: usize,
        /// The list.
        field: &'static str,
        /// What is wrong with it.
        reason: Box<ConvertError>,
    },
    /// A destination port in a policy is above 65535.
    #[error(
        "policy {policy}: rules[{rule}][{clause}][{index}].{field}: port {value} is above 65535"
    )]
    PolicyPort {
        /// Policy key.
        policy: String,
        /// Rule index.
        rule: usize,
        /// Clause index.
        clause: usize,
        /// Match index.
        index: usize,
        /// The list.
        field: &'static str,
        /// The value.
        value: u32,
    },
    /// The policy fails the same validation as a local-config policy.
    #[error(transparent)]
    Policy(#[from] authz::Error),
}

/// A converted `istio.workload.Address`.
#[derive(Debug, Clone)]
pub enum Address {
    /// A workload (shared with the states built from it).
    Workload(Arc<Workload>),
    /// A service (endpoints come later, from the workloads that name it).
    Service(Arc<Service>),
}

/// Converts an `Address` sent under resource `name`.
pub fn address(name: &str, addr: pb::Address) -> Result<Address, ConvertError> {
    address_in(name, addr, &mut Interner::default())
}

/// [`address`], sharing what workloads have in common through `interner` (the client keeps one for
/// its life, so that every push shares the values of the ones before).
pub fn address_in(
    name: &str,
    addr: pb::Address,
    interner: &mut Interner,
) -> Result<Address, ConvertError> {
    match addr.r#type {
        Some(pb::address::Type::Workload(w)) => workload(name, w, interner)
            .map(Arc::new)
            .map(Address::Workload),
        Some(pb::address::Type::Service(s)) => service(name, s).map(Arc::new).map(Address::Service),
        None => Err(ConvertError::EmptyAddress),
    }
}

fn ip(field: &'static str, bytes: &[u8]) -> Result<IpAddr, ConvertError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(ConvertError::AddressLength {
        field,
        len: bytes.len(),
    })
}

fn port(field: &'static str, value: u32) -> Result<u16, ConvertError> {
    u16::try_from(value).map_err(|_| ConvertError::Port { field, value })
}

/// Reads an enum field, refusing values the generated enum does not know.
fn known<E: TryFrom<i32>>(field: &'static str, value: i32) -> Result<E, ConvertError> {
    E::try_from(value).map_err(|_| ConvertError::UnknownEnum { field, value })
}

fn or_default(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value
    }
}

fn gateway(
    field: &'static str,
    gw: Option<pb::GatewayAddress>,
) -> Result<Option<GatewayAddress>, ConvertError> {
    let Some(gw) = gw else { return Ok(None) };
    let destination = match gw.destination {
        None => return Err(ConvertError::GatewayWithoutDestination { field }),
        Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
            ip: ip(field, &a.address)?,
            network: a.network,
        },
        Some(pb::gateway_address::Destination::Hostname(h)) if h.hostname.is_empty() => {
            return Err(ConvertError::Missing { field })
        }
        Some(pb::gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace,
            hostname: h.hostname,
        },
    };
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port: port(field, gw.hbone_mtls_port)?,
    }))
}

fn ports(field: &'static str, list: &[pb::Port]) -> Result<HashMap<u16, u16>, ConvertError> {
    list.iter()
        .map(|p| Ok((port(field, p.service_port)?, port(field, p.target_port)?)))
        .collect()
}

fn workload(
    name: &str,
    w: pb::Workload,
    interner: &mut Interner,
) -> Result<Workload, ConvertError> {
    if w.uid.is_empty() {
        return Err(ConvertError::Missing { field: "uid" });
    }
    if w.uid != name {
        return Err(ConvertError::NameMismatch {
            what: "workload uid",
            name: name.to_string(),
            key: w.uid,
        });
    }
    if w.namespace.is_empty() {
        return Err(ConvertError::Missing { field: "namespace" });
    }
    let ips = w
        .addresses
        .iter()
        .map(|a| ip("addresses", a))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match known("tunnelProtocol", w.tunnel_protocol)? {
        pb::TunnelProtocol::None => Protocol::TCP,
        pb::TunnelProtocol::Hbone => Protocol::HBONE,
        pb::TunnelProtocol::LegacyIstioMtls => return Err(ConvertError::LegacyIstioMtls),
    };
    let status = match known("status", w.status)? {
        pb::WorkloadStatus::Healthy => HealthStatus::Healthy,
        pb::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
    };
    let workload_type = match known("workloadType", w.workload_type)? {
        pb::WorkloadType::Deployment => "deployment",
        pb::WorkloadType::Cronjob => "cronjob",
        pb::WorkloadType::Pod => "pod",
        pb::WorkloadType::Job => "job",
    };
    let _: pb::NetworkMode = known("networkMode", w.network_mode)?;
    let waypoint = gateway("waypoint", w.waypoint)?;
    let network_gateway = gateway("networkGateway", w.network_gateway)?;
    let application_tunnel = match &w.application_tunnel {
        None => None,
        Some(tunnel) => {
            let protocol = match known("applicationTunnel.protocol", tunnel.protocol)? {
                pb::application_tunnel::Protocol::None => AppTunnelProtocol::NONE,
                pb::application_tunnel::Protocol::Proxy => AppTunnelProtocol::PROXY,
            };
            // 0 is proto3's "unset": deliver to the requested port.
            let port = Some(port("applicationTunnel.port", tunnel.port)?).filter(|p| *p != 0);
            Some(ApplicationTunnel { protocol, port })
        }
    };
    let mut services = Vec::with_capacity(w.services.len());
    for (key, list) in w.services {
        if !key.contains('/') {
            return Err(ConvertError::ServiceKey { key });
        }
        let map = ports("services", &list.ports)?;
        services.push((interner.string(key), interner.ports(map)));
    }
    let trust_domain = or_default(w.trust_domain, "cluster.local");
    let service_account = or_default(w.service_account, "default");
    let identity = interner
        .identity(&trust_domain, &w.namespace, &service_account)
        .map_err(|source| ConvertError::Identity {
            field: "identity",
            source,
        })?;
    Ok(Workload {
        uid: w.uid.into(),
        name: w.name.into(),
        namespace: interner.string(w.namespace),
        service_account: interner.string(service_account),
        identity,
        ips,
        protocol,
        node: interner.string(w.node),
        network: interner.string(w.network),
        status,
        capacity: w.capacity.unwrap_or(1),
        authorization_policies: w.authorization_policies,
        services: interner.service_ports(services),
        canonical_name: interner.string(w.canonical_name),
        canonical_revision: interner.string(w.canonical_revision),
        workload_name: interner.string(w.workload_name),
        workload_type: interner.str(workload_type),
        cluster_id: interner.string(or_default(w.cluster_id, "Kubernetes")),
        hostname: interner.string(w.hostname),
        waypoint: waypoint.map(Box::new),
        network_gateway: network_gateway.map(Box::new),
        application_tunnel,
        locality: w
            .locality
            .and_then(|l| Locality::known(l.region, l.zone, l.subzone)),
    })
}

fn service(name: &str, s: pb::Service) -> Result<Service, ConvertError> {
    if s.hostname.is_empty() {
        return Err(ConvertError::Missing { field: "hostname" });
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    if key != name {
        return Err(ConvertError::NameMismatch {
            what: "service namespace/hostname",
            name: name.to_string(),
            key,
        });
    }
    // Single addresses are VIPs; shorter prefixes are CIDR VIPs (a ServiceEntry's `addresses` range),
    // as ztunnel splits them.
    let mut vips = Vec::new();
    let mut vip_cidrs = Vec::new();
    for a in &s.addresses {
        let addr = ip("addresses", &a.address)?;
        let host_len: u8 = if addr.is_ipv4() { 32 } else { 128 };
        match a.length {
            Some(len) if len != u32::from(host_len) => {
                let net = u8::try_from(len)
                    .ok()
                    .and_then(|l| IpNet::new(addr, l).ok())
                    .ok_or(ConvertError::PrefixLength {
                        field: "addresses",
                        ip: addr,
                        length: len,
                    })?;
                vip_cidrs.push((SharedStr::from(a.network.as_str()), net.trunc()));
            }
            _ => vips.push((SharedStr::from(a.network.as_str()), addr)),
        }
    }
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .map(|san| {
            san.parse::<Identity>()
                .map_err(|source| ConvertError::Identity {
                    field: "subjectAltNames",
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let waypoint = gateway("waypoint", s.waypoint)?;
    let weighted_waypoints = s
        .weighted_waypoints
        .into_iter()
        .map(|ww| {
            let field = "weightedWaypoints";
            Ok(WeightedWaypoint {
                destination: gateway(field, ww.destination)?
                    .ok_or(ConvertError::GatewayWithoutDestination { field })?,
                weight: ww.weight,
            })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    let ip_families = match known("ipFamilies", s.ip_families)? {
        pb::IpFamilies::Automatic => IpFamilies::Automatic,
        pb::IpFamilies::Ipv4Only => IpFamilies::V4,
        pb::IpFamilies::Ipv6Only => IpFamilies::V6,
        pb::IpFamilies::Dual => IpFamilies::Dual,
    };
    // ztunnel reads an unknown visibility as PUBLIC.
    let namespace_only = s.visibility == pb::service::Visibility::Namespace as i32;
    let mut routing_preference = Vec::new();
    let (health_policy, lb_mode) = match &s.load_balancing {
        None => (HealthPolicy::default(), LbMode::default()),
        Some(lb) => {
            use pb::load_balancing::Scope as S;
            for &scope in &lb.routing_preference {
                routing_preference.push(
                    match known::<S>("loadBalancing.routingPreference", scope)? {
                        S::UnspecifiedScope => return Err(ConvertError::UnspecifiedScope),
                        S::Region => LocalityScope::Region,
                        S::Zone => LocalityScope::Zone,
                        S::Subzone => LocalityScope::Subzone,
                        S::Node => LocalityScope::Node,
                        S::Cluster => LocalityScope::Cluster,
                        S::Network => LocalityScope::Network,
                    },
                );
            }
            let mode = match known("loadBalancing.mode", lb.mode)? {
                pb::load_balancing::Mode::UnspecifiedMode => LbMode::Standard,
                pb::load_balancing::Mode::Strict => LbMode::Strict,
                pb::load_balancing::Mode::Failover => LbMode::Failover,
                pb::load_balancing::Mode::Passthrough => LbMode::Passthrough,
            };
            let health = match known("loadBalancing.healthPolicy", lb.health_policy)? {
                pb::load_balancing::HealthPolicy::OnlyHealthy => HealthPolicy::OnlyHealthy,
                pb::load_balancing::HealthPolicy::AllowAll => HealthPolicy::AllowAll,
            };
            (health, mode)
        }
    };
    Ok(Service {
        ports: ports("ports", &s.ports)?.into(),
        name: s.name.into(),
        namespace: s.namespace.into(),
        hostname: s.hostname.into(),
        vips,
        vip_cidrs,
        subject_alt_names,
        canonical: s.canonical,
        health_policy,
        lb_mode,
        routing_preference: routing_preference.into(),
        ip_families,
        namespace_only,
        waypoint: waypoint.map(Box::new),
        weighted_waypoints,
        endpoints: Vec::new(),
    })
}

/// Converts an `Authorization` sent under resource `name`; validated as local-config policies are.
/// Any unusable value refuses the policy (see [`fail_safe_policy`] for what is enforced instead).
pub fn policy(name: &str, a: security::Authorization) -> Result<Policy, ConvertError> {
    if a.name.is_empty() {
        return Err(ConvertError::Missing { field: "name" });
    }
    let key = format!("{}/{}", a.namespace, a.name);
    if key != name {
        return Err(ConvertError::NameMismatch {
            what: "policy namespace/name",
            name: name.to_string(),
            key,
        });
    }
    let scope = scope(a.scope)?;
    let action = action(a.action)?;
    let mut problems = Vec::new();
    let rules = rules(&key, a.rules, &mut problems);
    if let Some(first) = problems.into_iter().next() {
        return Err(first.error);
    }
    let policy = Policy {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        dry_run: a.dry_run,
        rules,
    };
    policy.validate()?;
    Ok(policy)
}

/// What to enforce for the policy resource `name` after [`policy`] refused it and no earlier good
/// version of it is held: a stand-in that never allows more, nor denies less, than the policy as sent
/// could have. `a` is the decoded body, `None` when there is none or it does not decode.
///
/// The stand-in has the key `name` (what workloads list and removals name), split at its first `/`
/// into namespace and name (no `/`: namespace `""`, which applies like a global policy), whatever the
/// body says. Its rules are the body's in their fail-safe form ([`Policy::fail_safe`]: an unusable
/// match entry cannot let an ALLOW match through it, and widens a DENY). Stricter than ztunnel, which
/// drops such entries (widening an ALLOW match, narrowing a DENY) and skips a policy it refuses:
/// - an action this proxy does not know is read as DENY: the stand-in denies what the rules match;
/// - a scope it does not know is read as `Namespace`: the namespace of `name`, plus, as for every
///   policy, the workloads that list `name`. Istio selects workloads within the policy's namespace
///   except for root-namespace policies, which are sent as `Global`;
/// - with no readable body (no body, another type, not protobuf) nothing but the key is known: the
///   stand-in denies every connection to the namespace of `name` and to the workloads that list it.
///
/// A dry-run body gives a dry-run stand-in, which only logs, as the policy would have.
pub fn fail_safe_policy(name: &str, a: Option<security::Authorization>) -> Policy {
    let (namespace, short) = name.split_once('/').unwrap_or(("", name));
    let mut stand_in = Policy {
        name: short.to_string(),
        namespace: namespace.to_string(),
        scope: Scope::Namespace,
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match::every_connection()],
            }],
        }],
    };
    let Some(a) = a else {
        return stand_in;
    };
    let mut problems = Vec::new();
    stand_in.rules = rules(name, a.rules, &mut problems);
    stand_in.scope = scope(a.scope).unwrap_or(Scope::Namespace);
    stand_in.action = action(a.action).unwrap_or(Action::Deny);
    stand_in.dry_run = a.dry_run;
    let unusable: Vec<Unusable> = problems.iter().map(|p| p.at).collect();
    stand_in.fail_safe(&unusable)
}

fn scope(value: i32) -> Result<Scope, ConvertError> {
    Ok(match known("scope", value)? {
        security::Scope::Global => Scope::Global,
        security::Scope::Namespace => Scope::Namespace,
        security::Scope::WorkloadSelector => Scope::WorkloadSelector,
    })
}

fn action(value: i32) -> Result<Action, ConvertError> {
    Ok(match known("action", value)? {
        security::Action::Allow => Action::Allow,
        security::Action::Deny => Action::Deny,
    })
}

/// An unusable match entry: the list it was left out of, and why.
struct Problem {
    at: Unusable,
    error: ConvertError,
}

/// Converts the rules of policy `key`, leaving unusable match entries out of their lists and
/// reporting each in `problems`, in order.
fn rules(key: &str, rules: Vec<security::Rule>, problems: &mut Vec<Problem>) -> Vec<Rule> {
    let mut out = Vec::with_capacity(rules.len());
    for (r, rule) in rules.into_iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.into_iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (i, m) in clause.matches.into_iter().enumerate() {
                let mut at = At {
                    policy: key,
                    position: MatchPosition {
                        rule: r,
                        clause: c,
                        index: i,
                    },
                    problems: &mut *problems,
                };
                matches.push(at.convert(m));
            }
            clauses.push(Clause { matches });
        }
        out.push(Rule { clauses });
    }
    out
}

/// Where a match sits, for error messages, and where its problems go.
struct At<'a> {
    policy: &'a str,
    position: MatchPosition,
    problems: &'a mut Vec<Problem>,
}

impl At<'_> {
    fn convert(&mut self, m: security::Match) -> Match {
        use MatchField as F;
        Match {
            namespaces: self.strings(F::Namespaces, m.namespaces),
            not_namespaces: self.strings(F::NotNamespaces, m.not_namespaces),
            principals: self.strings(F::Principals, m.principals),
            not_principals: self.strings(F::NotPrincipals, m.not_principals),
            source_ips: self.cidrs(F::SourceIps, &m.source_ips),
            not_source_ips: self.cidrs(F::NotSourceIps, &m.not_source_ips),
            destination_ips: self.cidrs(F::DestinationIps, &m.destination_ips),
            not_destination_ips: self.cidrs(F::NotDestinationIps, &m.not_destination_ips),
            destination_ports: self.ports(F::DestinationPorts, &m.destination_ports),
            not_destination_ports: self.ports(F::NotDestinationPorts, &m.not_destination_ports),
            service_accounts: accounts(m.service_accounts),
            not_service_accounts: accounts(m.not_service_accounts),
        }
    }

    fn refuse(&mut self, field: MatchField, error: ConvertError) {
        self.problems.push(Problem {
            at: Unusable {
                position: self.position,
                field,
            },
            error,
        });
    }

    fn strings(
        &mut self,
        field: MatchField,
        list: Vec<security::StringMatch>,
    ) -> Vec<authz::StringMatch> {
        use security::string_match::MatchType;
        let mut out = Vec::with_capacity(list.len());
        for s in list {
            match s.match_type {
                Some(MatchType::Exact(v)) => out.push(authz::StringMatch::Exact(v)),
                Some(MatchType::Prefix(v)) => out.push(authz::StringMatch::Prefix(v)),
                Some(MatchType::Suffix(v)) => out.push(authz::StringMatch::Suffix(v)),
                Some(MatchType::Presence(())) => out.push(authz::StringMatch::Presence),
                None => self.refuse(
                    field,
                    ConvertError::EmptyMatchKind {
                        policy: self.policy.to_string(),
                        rule: self.position.rule,
                        clause: self.position.clause,
                        index: self.position.index,
                        field: field.name(),
                    },
                ),
            }
        }
        out
    }

    fn cidrs(&mut self, field: MatchField, list: &[security::Address]) -> Vec<IpNet> {
        let name = field.name();
        let mut out = Vec::with_capacity(list.len());
        for a in list {
            let net = ip(name, &a.address).and_then(|addr| {
                u8::try_from(a.length)
                    .ok()
                    .and_then(|len| IpNet::new(addr, len).ok())
                    .ok_or(ConvertError::PrefixLength {
                        field: name,
                        ip: addr,
                        length: a.length,
                    })
            });
            match net {
                Ok(net) => out.push(net),
                Err(reason) => self.refuse(
                    field,
                    ConvertError::PolicyCidr {
                        policy: self.policy.to_string(),
                        rule: self.position.rule,
                        clause: self.position.clause,
                        index: self.position.index,
                        field: name,
                        reason: Box::new(reason),
                    },
                ),
            }
        }
        out
    }

    fn ports(&mut self, field: MatchField, list: &[u32]) -> Vec<u16> {
        let mut out = Vec::with_capacity(list.len());
        for &value in list {
            match u16::try_from(value) {
                Ok(port) => out.push(port),
                Err(_) => self.refuse(
                    field,
                    ConvertError::PolicyPort {
                        policy: self.policy.to_string(),
                        rule: self.position.rule,
                        clause: self.position.clause,
                        index: self.position.index,
                        field: field.name(),
                        value,
                    },
                ),
            }
        }
        out
    }
}

fn accounts(list: Vec<security::ServiceAccountMatch>) -> Vec<ServiceAccountMatch> {
    list.into_iter()
        .map(|sa| ServiceAccountMatch {
            namespace: sa.namespace,
            service_account: sa.service_account,
        })
        .collect()
}

#[cfg(test)]
mod tests;
