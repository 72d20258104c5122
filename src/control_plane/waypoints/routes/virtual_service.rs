//! `VirtualService` → a [`RouteSet`]: hosts, `http[]` routes in order with their matches, destinations
//! (weights, subsets, ports), redirect, direct response, rewrite, headers, timeout and retries.

use super::super::clusters::DestinationRules;
use super::super::{duration, invalid, non_empty};
use super::{
    header, key, redirect_status, removed_headers, resolve_host, retry_on, timeout, Backend,
    PendingRoute, PendingTcp, RouteSet, ServiceKey, DEFAULT_RETRY_ON,
};
use crate::control_plane::config::{Error, MeshConfig, ServiceSpec};
use crate::control_plane::objects::networking::{
    VirtualServiceSpec, VsHeaderOps, VsHttpRoute, VsMatch, VsRouteDestination, VsStringMatch,
};
use crate::control_plane::objects::{IstioObject, ObjectKind};
use crate::proto::waypoint as wp;

pub(super) fn route_set(
    cfg: &MeshConfig,
    rules: &DestinationRules,
    obj: &IstioObject,
    spec: &VirtualServiceSpec,
    at: &str,
) -> Result<RouteSet, Error> {
    let ns = &obj.metadata.namespace;
    if let Some(f) = spec.unsupported() {
        return Err(invalid(
            format!("{at}.{f}"),
            "not supported (meshnode's waypoint routes HTTP only)",
        ));
    }
    for (k, g) in spec.gateways.iter().enumerate() {
        if g != "mesh" {
            return Err(invalid(
                format!("{at}.gateways[{k}]"),
                format!(
                    "{g:?}: only the mesh (waypoints) is served; meshnode has no ingress gateway"
                ),
            ));
        }
    }
    if spec.hosts.is_empty() {
        return Err(invalid(
            format!("{at}.hosts"),
            "at least one host is needed",
        ));
    }
    let mut parents = Vec::new();
    for (k, h) in spec.hosts.iter().enumerate() {
        let s = resolve_host(cfg, h, ns, &format!("{at}.hosts[{k}]"))?;
        parents.push((key(s), None));
    }
    let mut routes = Vec::new();
    for (r, http) in spec.http.iter().enumerate() {
        let at = format!("{at}.http[{r}]");
        let name = format!("{ns}/{}.{r}", obj.metadata.name);
        routes.push(vs_route(cfg, rules, ns, &parents, http, name, &at)?);
    }
    let mut tcp = Vec::new();
    for (r, route) in spec.tcp.iter().enumerate() {
        let at = format!("{at}.tcp[{r}]");
        let mut ports = Vec::new();
        for (m, mat) in route.matches.iter().enumerate() {
            let mat_at = format!("{at}.match[{m}]");
            if let Some(f) = mat.unsupported() {
                return Err(invalid(format!("{mat_at}.{f}"), "not supported"));
            }
            match mat.port {
                Some(p) => ports.push(p),
                // A match without a port matches every port.
                None => {
                    ports.clear();
                    break;
                }
            }
        }
        if route.route.is_empty() {
            return Err(invalid(
                format!("{at}.route"),
                "a TCP route needs at least one destination",
            ));
        }
        let backends = destinations(cfg, rules, ns, &parents, &route.route, &at)?;
        tcp.push(PendingTcp { ports, backends });
    }
    Ok(RouteSet {
        kind: ObjectKind::VirtualService,
        namespace: ns.clone(),
        parents,
        routes,
        tcp,
    })
}

fn vs_route(
    cfg: &MeshConfig,
    rules: &DestinationRules,
    ns: &str,
    hosts: &[(ServiceKey, Option<u16>)],
    http: &VsHttpRoute,
    name: String,
    at: &str,
) -> Result<PendingRoute, Error> {
    if let Some(f) = http.unsupported() {
        return Err(invalid(format!("{at}.{f}"), "not supported"));
    }
    let mut route = wp::Route {
        name,
        ..wp::Route::default()
    };
    let mut match_ports = Vec::new();
    for (m, mat) in http.matches.iter().enumerate() {
        route
            .matches
            .push(vs_match(mat, &format!("{at}.match[{m}]"))?);
        match_ports.push(mat.port);
    }
    let actions = [
        ("route", !http.route.is_empty()),
        ("redirect", http.redirect.is_some()),
        ("directResponse", http.direct_response.is_some()),
    ];
    match actions.iter().filter(|(_, set)| *set).count() {
        0 => {
            return Err(invalid(
                at,
                "a route needs one of route, redirect, directResponse",
            ))
        }
        1 => {}
        _ => {
            return Err(invalid(
                at,
                "route, redirect and directResponse exclude each other",
            ))
        }
    }
    let mut backends = None;
    if !http.route.is_empty() {
        backends = Some(destinations(cfg, rules, ns, hosts, &http.route, at)?);
    }
    if let Some(r) = &http.redirect {
        if r.derive_port.is_some() {
            return Err(invalid(
                format!("{at}.redirect.derivePort"),
                "not supported",
            ));
        }
        route.action = Some(wp::route::Action::Redirect(wp::Redirect {
            scheme: r.scheme.clone().unwrap_or_default(),
            host: r.authority.clone().unwrap_or_default(),
            port: r.port.map_or(0, u32::from),
            path: r.uri.clone().unwrap_or_default(),
            status: redirect_status(r.redirect_code, 301, &format!("{at}.redirect.redirectCode"))?,
            ..wp::Redirect::default()
        }));
    }
    if let Some(d) = &http.direct_response {
        if !(200..=599).contains(&d.status) {
            return Err(invalid(
                format!("{at}.directResponse.status"),
                format!("{} is not an HTTP status (200-599)", d.status),
            ));
        }
        if d.body.as_ref().is_some_and(|b| b.bytes.is_some()) {
            return Err(invalid(
                format!("{at}.directResponse.body.bytes"),
                "not supported; use body.string",
            ));
        }
        route.action = Some(wp::route::Action::DirectResponse(wp::DirectResponse {
            status: u32::from(d.status),
            body: d
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .unwrap_or_default(),
        }));
    }
    if let Some(rw) = &http.rewrite {
        if rw.uri_regex_rewrite.is_some() {
            return Err(invalid(
                format!("{at}.rewrite.uriRegexRewrite"),
                "regex rewrites are not supported",
            ));
        }
        route.rewrite = Some(wp::Rewrite {
            path_prefix: rw.uri.clone().unwrap_or_default(),
            authority: rw.authority.clone().unwrap_or_default(),
            ..wp::Rewrite::default()
        });
    }
    if let Some(t) = &http.timeout {
        route.timeout = timeout(t, &format!("{at}.timeout"))?;
    }
    if let Some(r) = &http.retries {
        let rat = format!("{at}.retries");
        let attempts = r.attempts.unwrap_or(0);
        let attempts = u32::try_from(attempts)
            .map_err(|_| invalid(format!("{rat}.attempts"), format!("{attempts} is negative")))?;
        if let Some(b) = &r.backoff {
            duration(b, &format!("{rat}.backoff"))?;
        }
        if let Some(f) = [
            ("retryRemoteLocalities", r.retry_remote_localities.is_some()),
            (
                "retryIgnorePreviousHosts",
                r.retry_ignore_previous_hosts.is_some(),
            ),
        ]
        .iter()
        .find(|(_, p)| *p)
        {
            return Err(invalid(format!("{rat}.{}", f.0), "not supported"));
        }
        let mut policy = wp::RetryPolicy {
            attempts,
            ..wp::RetryPolicy::default()
        };
        // As istiod: zero attempts disable retries, whatever else is set.
        if attempts > 0 {
            match r.retry_on.as_deref() {
                None | Some("") => {
                    policy.retry_on = DEFAULT_RETRY_ON.iter().map(|s| s.to_string()).collect()
                }
                Some(list) => {
                    (policy.retry_on, policy.retriable_status_codes) =
                        retry_on(list, &format!("{rat}.retryOn"))?
                }
            }
            if let Some(t) = &r.per_try_timeout {
                policy.per_try_timeout = timeout(t, &format!("{rat}.perTryTimeout"))?;
            }
        }
        route.retries = Some(policy);
    }
    if let Some(h) = &http.headers {
        if let Some(ops) = &h.request {
            route.request_headers = Some(vs_header_ops(ops, &format!("{at}.headers.request"))?);
        }
        if let Some(ops) = &h.response {
            route.response_headers = Some(vs_header_ops(ops, &format!("{at}.headers.response"))?);
        }
    }
    Ok(PendingRoute {
        route,
        match_ports,
        backends,
    })
}

/// A destination `port` that the service has; or none, when it can be chosen per request: the backend is
/// one of the routed services (the request's port), or it has a single port.
fn check_backend_port(
    svc: &ServiceSpec,
    port: Option<u16>,
    hosts: &[(ServiceKey, Option<u16>)],
    field: &str,
) -> Result<(), Error> {
    match port {
        Some(p) if !svc.ports.iter().any(|sp| sp.port == p) => Err(invalid(
            field,
            format!("service {}/{} has no port {p}", svc.namespace, svc.name),
        )),
        None if svc.ports.len() > 1 && !hosts.iter().any(|(k, _)| *k == key(svc)) => Err(invalid(
            field,
            format!(
                "service {}/{} has several ports: say which one",
                svc.namespace, svc.name
            ),
        )),
        None if svc.ports.is_empty() => Err(invalid(
            field,
            format!("service {}/{} has no ports", svc.namespace, svc.name),
        )),
        _ => Ok(()),
    }
}

fn vs_match(m: &VsMatch, at: &str) -> Result<wp::RouteMatch, Error> {
    if let Some(f) = m.unsupported() {
        return Err(invalid(format!("{at}.{f}"), "not supported"));
    }
    let mut out = wp::RouteMatch::default();
    if let Some(uri) = &m.uri {
        out.path = Some(vs_string(uri, &format!("{at}.uri"))?);
    }
    if let Some(method) = &m.method {
        let field = format!("{at}.method");
        match vs_string(method, &field)?.kind {
            Some(wp::string_match::Kind::Exact(v)) => out.method = v,
            _ => return Err(invalid(field, "only exact method matches are supported")),
        }
    }
    for (headers, invert, what) in [
        (&m.headers, false, "headers"),
        (&m.without_headers, true, "withoutHeaders"),
    ] {
        for (name, sm) in headers {
            let field = format!("{at}.{what}.{name}");
            non_empty(name, &field)?;
            let value = if *sm == VsStringMatch::default() {
                None // present
            } else {
                Some(vs_string(sm, &field)?)
            };
            out.headers.push(wp::HeaderMatch {
                name: name.to_ascii_lowercase(),
                value,
                invert,
            });
        }
    }
    for (name, sm) in &m.query_params {
        let field = format!("{at}.queryParams.{name}");
        non_empty(name, &field)?;
        out.query_params.push(wp::QueryMatch {
            name: name.clone(),
            value: Some(vs_string(sm, &field)?),
        });
    }
    Ok(out)
}

/// Istio's StringMatch: exactly one of exact / prefix (regex refused).
fn vs_string(m: &VsStringMatch, at: &str) -> Result<wp::StringMatch, Error> {
    if m.regex.is_some() {
        return Err(invalid(
            format!("{at}.regex"),
            "regex matches are not supported",
        ));
    }
    use wp::string_match::Kind;
    let kind = match (&m.exact, &m.prefix) {
        (Some(e), None) => Kind::Exact(e.clone()),
        (None, Some(p)) => Kind::Prefix(p.clone()),
        (None, None) => return Err(invalid(at, "give exact or prefix")),
        (Some(_), Some(_)) => return Err(invalid(at, "give exact or prefix, not both")),
    };
    Ok(wp::StringMatch { kind: Some(kind) })
}

fn vs_header_ops(ops: &VsHeaderOps, at: &str) -> Result<wp::HeaderOps, Error> {
    let headers = |map: &std::collections::BTreeMap<String, String>, what: &str| {
        map.iter()
            .map(|(name, value)| header(name, value, &format!("{at}.{what}.{name}")))
            .collect::<Result<Vec<_>, Error>>()
    };
    let remove = removed_headers(&ops.remove, &format!("{at}.remove"))?;
    Ok(wp::HeaderOps {
        set: headers(&ops.set, "set")?,
        add: headers(&ops.add, "add")?,
        remove,
    })
}

/// A route's weighted destinations (`route[]`) as backends, weight-0 ones dropped (none left: refused).
fn destinations(
    cfg: &MeshConfig,
    rules: &DestinationRules,
    ns: &str,
    hosts: &[(ServiceKey, Option<u16>)],
    route: &[VsRouteDestination],
    at: &str,
) -> Result<Vec<Backend>, Error> {
    let several = route.len() > 1;
    let mut list = Vec::new();
    for (d, dest) in route.iter().enumerate() {
        let dat = format!("{at}.route[{d}]");
        if dest.headers.is_some() {
            return Err(invalid(
                format!("{dat}.headers"),
                "not supported; set headers on the route",
            ));
        }
        let weight = match dest.weight {
            None if several => {
                return Err(invalid(
                    format!("{dat}.weight"),
                    "required when a route has several destinations",
                ))
            }
            None => 1,
            Some(w) => u32::try_from(w).map_err(|_| {
                invalid(
                    format!("{dat}.weight"),
                    format!("{w} is not 0-{}", u32::MAX),
                )
            })?,
        };
        let field = format!("{dat}.destination");
        let svc = resolve_host(cfg, &dest.destination.host, ns, &format!("{field}.host"))?;
        let port = dest.destination.port.map(|p| p.number);
        check_backend_port(svc, port, hosts, &format!("{field}.port"))?;
        let subset = dest.destination.subset.clone().unwrap_or_default();
        if !subset.is_empty() && !rules.any_subset(svc, &subset) {
            return Err(invalid(
                format!("{field}.subset"),
                format!(
                    "no DestinationRule for {} defines subset {subset:?}",
                    cfg.service_hostname(&svc.namespace, &svc.name)
                ),
            ));
        }
        if weight > 0 {
            list.push(Backend {
                service: key(svc),
                port,
                subset,
                weight,
                field,
            });
        }
    }
    if list.is_empty() {
        return Err(invalid(
            format!("{at}.route"),
            "every destination has weight 0",
        ));
    }
    Ok(list)
}
