//! `VirtualService` (`routes/virtual_service.rs`) and `HTTPRoute` with a Service `parentRef`
//! (`routes/http_route.rs`) → the waypoint's [`wp::Route`]s, before their backends are named as clusters
//! (that needs the waypoint: `waypoints.rs`); what both share: the pending routes, host lookup, header,
//! retry and redirect checks, Gateway API precedence, port restriction. Every object is checked, bound to a
//! waypoint or not, and refused naming the field (see `waypoints.rs` for the rules).

use std::time::Duration;

use super::clusters::DestinationRules;
use super::{duration, invalid, non_empty};
use crate::control_plane::config::{Error, MeshConfig, ServiceSpec};
use crate::control_plane::objects::{ObjectKind, Spec};
use crate::proto::waypoint as wp;

mod http_route;
mod virtual_service;

/// Istio's `retryOn` conditions meshnode's waypoint implements.
const RETRY_ON: [&str; 9] = [
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "retriable-4xx",
];
/// What a VirtualService retry without `retryOn` retries on (Istio's default policy).
pub(super) const DEFAULT_RETRY_ON: [&str; 5] = [
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
];
/// What an HTTPRoute `retry` retries on besides its `codes` (Istio's conversion).
pub(super) const HTTP_ROUTE_RETRY_ON: [&str; 4] = [
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
];

/// A service by namespace and name.
pub(super) type ServiceKey = (String, String);

/// A route's destination before its cluster is named.
#[derive(Debug, Clone)]
pub(super) struct Backend {
    pub service: ServiceKey,
    /// None: the port the request came to (when the backend is the routed service or has that port),
    /// else the backend's only port.
    pub port: Option<u16>,
    pub subset: String,
    pub weight: u32,
    /// The field that names it, for errors found once the waypoint is known.
    pub field: String,
}

/// A route before its backends are named.
#[derive(Debug, Clone)]
pub(super) struct PendingRoute {
    /// The route; a forwarding route has `action: None` until its backends are resolved.
    pub route: wp::Route,
    /// Per match: the service port it is restricted to (VirtualService `match.port`).
    pub match_ports: Vec<Option<u16>>,
    /// Forwarding routes: the weighted backends (weight-0 ones already dropped).
    pub backends: Option<Vec<Backend>>,
}

/// A VirtualService `tcp[]` route before its backends are named.
#[derive(Debug, Clone)]
pub(super) struct PendingTcp {
    /// The service ports it applies to; empty: every port.
    pub ports: Vec<u16>,
    /// The weighted backends (weight-0 ones already dropped).
    pub backends: Vec<Backend>,
}

impl PendingTcp {
    /// Whether it applies to connections to service port `port`.
    pub(super) fn applies_to(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

/// The routes of one object and the services they apply to.
#[derive(Debug, Clone)]
pub(super) struct RouteSet {
    pub kind: ObjectKind,
    /// The object's namespace (a VirtualService applies at the waypoints of its own and its service's
    /// namespace).
    pub namespace: String,
    /// The services (and, for an HTTPRoute parentRef with `port`, that port only).
    pub parents: Vec<(ServiceKey, Option<u16>)>,
    pub routes: Vec<PendingRoute>,
    /// VirtualService `tcp[]`, in order.
    pub tcp: Vec<PendingTcp>,
}

/// Every VirtualService and HTTPRoute of the file, checked.
pub(super) fn route_sets(
    cfg: &MeshConfig,
    rules: &DestinationRules,
) -> Result<Vec<RouteSet>, Error> {
    let mut out = Vec::new();
    for (i, obj) in cfg.istio.iter().enumerate() {
        let at = format!("istio[{i}].spec");
        match &obj.spec {
            Spec::VirtualService(spec) => {
                out.push(virtual_service::route_set(cfg, rules, obj, spec, &at)?)
            }
            Spec::HttpRoute(spec) => out.push(http_route::route_set(cfg, obj, spec, &at)?),
            _ => {}
        }
    }
    Ok(out)
}

/// The service a host names: a short name in `ns`, or a service's FQDN.
pub(super) fn host_service<'a>(
    cfg: &'a MeshConfig,
    host: &str,
    ns: &str,
) -> Option<&'a ServiceSpec> {
    if host.contains('.') {
        cfg.services
            .iter()
            .find(|s| cfg.service_hostname(&s.namespace, &s.name) == host)
    } else {
        find_service(cfg, ns, host)
    }
}

pub(super) fn find_service<'a>(
    cfg: &'a MeshConfig,
    ns: &str,
    name: &str,
) -> Option<&'a ServiceSpec> {
    cfg.services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
}

/// A host that must be a service of the file.
pub(super) fn resolve_host<'a>(
    cfg: &'a MeshConfig,
    host: &str,
    ns: &str,
    field: &str,
) -> Result<&'a ServiceSpec, Error> {
    if host.contains('*') {
        return Err(invalid(
            field,
            format!("{host:?}: wildcard hosts are not supported"),
        ));
    }
    host_service(cfg, host, ns).ok_or_else(|| {
        let fqdn = if host.contains('.') {
            host.to_string()
        } else {
            cfg.service_hostname(ns, host)
        };
        invalid(
            field,
            format!("{host:?} ({fqdn}) is not a service of the mesh file"),
        )
    })
}

pub(super) fn key(s: &ServiceSpec) -> ServiceKey {
    (s.namespace.clone(), s.name.clone())
}

fn millis(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A duration field, as a proto duration; zero is `None` (no timeout).
pub(super) fn timeout(text: &str, field: &str) -> Result<Option<prost_types::Duration>, Error> {
    let d = duration(text, field)?;
    Ok((!d.is_zero()).then(|| millis(d)))
}

pub(super) fn proto_duration(d: Duration) -> prost_types::Duration {
    millis(d)
}

pub(super) fn string_match(kind: wp::string_match::Kind) -> Option<wp::StringMatch> {
    Some(wp::StringMatch { kind: Some(kind) })
}

/// Header names to remove (`<at>[k]` in errors), lower-cased.
pub(super) fn removed_headers(names: &[String], at: &str) -> Result<Vec<String>, Error> {
    names
        .iter()
        .enumerate()
        .map(|(k, n)| {
            non_empty(n, &format!("{at}[{k}]"))?;
            Ok(n.to_ascii_lowercase())
        })
        .collect()
}

pub(super) fn header(name: &str, value: &str, at: &str) -> Result<wp::Header, Error> {
    non_empty(name, at)?;
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(invalid(at, format!("{name:?} is not a header name")));
    }
    // As istiod's Gateway API conversion: HTAB and visible characters only.
    if !value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
    {
        return Err(invalid(
            at,
            "the value holds characters a header may not carry",
        ));
    }
    Ok(wp::Header {
        name: name.to_ascii_lowercase(),
        value: value.to_string(),
    })
}

/// A `retryOn` list: Envoy's condition names, and status codes (which add `retriable-status-codes`).
pub(super) fn retry_on(list: &str, at: &str) -> Result<(Vec<String>, Vec<u32>), Error> {
    let mut on = Vec::new();
    let mut codes = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(code) = item.parse::<u32>() {
            if !(100..=599).contains(&code) {
                return Err(invalid(at, format!("{code} is not an HTTP status")));
            }
            codes.push(code);
        } else if RETRY_ON.contains(&item) {
            if !on.iter().any(|o| o == item) {
                on.push(item.to_string());
            }
        } else {
            return Err(invalid(
                at,
                format!("{item:?} is not supported (supported: {RETRY_ON:?} and status codes)"),
            ));
        }
    }
    if !codes.is_empty() && !on.iter().any(|o| o == "retriable-status-codes") {
        on.push("retriable-status-codes".into());
    }
    Ok((on, codes))
}

pub(super) fn redirect_status(code: Option<u16>, default: u32, at: &str) -> Result<u32, Error> {
    match code {
        None => Ok(default),
        Some(c @ (301 | 302 | 303 | 307 | 308)) => Ok(u32::from(c)),
        Some(c) => Err(invalid(
            at,
            format!("{c} is not a redirect status (301, 302, 303, 307, 308)"),
        )),
    }
}

/// Gateway API's precedence among the HTTPRoute routes of one service port (istiod's `sortHTTPRoutes`,
/// stable): routes with a match before those without; then exact paths, then longer prefixes; then a
/// method match; then more header matches; then more query matches.
pub(super) fn sort_http_routes(routes: &mut [PendingRoute]) {
    use std::cmp::Reverse;
    use wp::string_match::Kind;
    routes.sort_by_key(|r| {
        let Some(m) = r.route.matches.first() else {
            return (1, Reverse((0, 0)), Reverse(false), Reverse(0), Reverse(0));
        };
        let (rank, len) = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
            Some(Kind::Exact(p)) => (3, p.len()),
            Some(Kind::Prefix(p)) => (2, p.len()),
            None => (0, 0),
        };
        (
            0,
            Reverse((rank, len)),
            Reverse(!m.method.is_empty()),
            Reverse(m.headers.len()),
            Reverse(m.query_params.len()),
        )
    });
}

/// The routes of one object for `port` of a service: VirtualService routes whose matches all name other
/// ports are left out, and matches naming other ports are dropped.
pub(super) fn for_port(route: &PendingRoute, port: u16) -> Option<PendingRoute> {
    if route.route.matches.is_empty() {
        return Some(route.clone());
    }
    let mut out = route.clone();
    out.route.matches.clear();
    out.match_ports.clear();
    for (m, p) in route.route.matches.iter().zip(&route.match_ports) {
        if p.is_none_or(|p| p == port) {
            out.route.matches.push(m.clone());
            out.match_ports.push(*p);
        }
    }
    (!out.route.matches.is_empty()).then_some(out)
}
