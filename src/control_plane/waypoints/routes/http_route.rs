//! `HTTPRoute` with Service `parentRefs` (GAMMA) → a [`RouteSet`]: one route per rule match (so that
//! precedence can order them), filters, weighted Service backends, timeouts and retry, as istiod's
//! `convertHTTPRoute`.

use super::super::{duration, invalid, non_empty};
use super::{
    find_service, header, key, redirect_status, removed_headers, string_match, timeout, Backend,
    PendingRoute, RouteSet, HTTP_ROUTE_RETRY_ON,
};
use crate::control_plane::config::{Error, MeshConfig};
use crate::control_plane::objects::gateway::{
    FilterType, HeaderModifier, HttpHeader, HttpRouteMatch, HttpRouteRule, HttpRouteSpec,
    PathMatchType, PathModifier, PathModifierType, ValueMatchType,
};
use crate::control_plane::objects::{IstioObject, ObjectKind};
use crate::proto::waypoint as wp;

pub(super) fn route_set(
    cfg: &MeshConfig,
    obj: &IstioObject,
    spec: &HttpRouteSpec,
    at: &str,
) -> Result<RouteSet, Error> {
    let ns = &obj.metadata.namespace;
    if !spec.hostnames.is_empty() {
        return Err(invalid(
            format!("{at}.hostnames"),
            "not supported with Service parents (the Service names the host)",
        ));
    }
    if spec.parent_refs.is_empty() {
        return Err(invalid(
            format!("{at}.parentRefs"),
            "a route needs a Service parentRef",
        ));
    }
    let mut parents = Vec::new();
    for (k, p) in spec.parent_refs.iter().enumerate() {
        let pat = format!("{at}.parentRefs[{k}]");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        if kind != "Service" || !matches!(group, "" | "core") {
            return Err(invalid(
                pat,
                format!(
                    "{kind} (group {group:?}) parents are not supported; give a Service (kind: Service, \
                     group: \"\"): meshnode's waypoints are its only gateways"
                ),
            ));
        }
        if p.section_name.is_some() {
            return Err(invalid(
                format!("{pat}.sectionName"),
                "not supported; use port",
            ));
        }
        let pns = p.namespace.as_deref().unwrap_or(ns);
        if pns != ns {
            return Err(invalid(
                format!("{pat}.namespace"),
                "routes for a Service of another namespace (consumer routes) are not supported",
            ));
        }
        let svc = find_service(cfg, ns, &p.name).ok_or_else(|| {
            invalid(
                format!("{pat}.name"),
                format!("{ns}/{} is not a service of the mesh file", p.name),
            )
        })?;
        if let Some(port) = p.port {
            if !svc.ports.iter().any(|sp| sp.port == port) {
                return Err(invalid(
                    format!("{pat}.port"),
                    format!("service {ns}/{} has no port {port}", p.name),
                ));
            }
        }
        parents.push((key(svc), p.port));
    }
    let mut routes = Vec::new();
    for (r, rule) in spec.rules.iter().enumerate() {
        let rat = format!("{at}.rules[{r}]");
        let name = format!("{ns}/{}.{r}", obj.metadata.name);
        let base = http_rule(cfg, ns, rule, name, &rat)?;
        // As istiod: one route per match, so that precedence can order them.
        if rule.matches.is_empty() {
            routes.push(base);
        } else {
            for (m, mat) in rule.matches.iter().enumerate() {
                let mut one = base.clone();
                one.route.matches = http_match(mat, &format!("{rat}.matches[{m}]"))?;
                one.match_ports = vec![None; one.route.matches.len()];
                routes.push(one);
            }
        }
    }
    Ok(RouteSet {
        kind: ObjectKind::HttpRoute,
        namespace: ns.clone(),
        parents,
        routes,
        tcp: Vec::new(),
    })
}

/// One HTTPRoute rule without its matches.
fn http_rule(
    cfg: &MeshConfig,
    ns: &str,
    rule: &HttpRouteRule,
    name: String,
    at: &str,
) -> Result<PendingRoute, Error> {
    if rule.session_persistence.is_some() {
        return Err(invalid(format!("{at}.sessionPersistence"), "not supported"));
    }
    let mut route = wp::Route {
        name,
        ..wp::Route::default()
    };
    let mut seen = Vec::new();
    for (f, filter) in rule.filters.iter().enumerate() {
        let fat = format!("{at}.filters[{f}]");
        if seen.contains(&filter.r#type) {
            return Err(invalid(
                format!("{fat}.type"),
                format!("{:?} is given twice", filter.r#type),
            ));
        }
        seen.push(filter.r#type);
        let missing = |field: &str| invalid(format!("{fat}.{field}"), "required by its type");
        match filter.r#type {
            FilterType::RequestHeaderModifier => {
                let m = filter
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                route.request_headers =
                    Some(header_modifier(m, &format!("{fat}.requestHeaderModifier"))?);
            }
            FilterType::ResponseHeaderModifier => {
                let m = filter
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                route.response_headers = Some(header_modifier(
                    m,
                    &format!("{fat}.responseHeaderModifier"),
                )?);
            }
            FilterType::RequestRedirect => {
                let r = filter
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| missing("requestRedirect"))?;
                let rat = format!("{fat}.requestRedirect");
                let mut redirect = wp::Redirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    host: r.hostname.clone().unwrap_or_default(),
                    port: r.port.map_or(0, u32::from),
                    // Gateway API's default status.
                    status: redirect_status(r.status_code, 302, &format!("{rat}.statusCode"))?,
                    ..wp::Redirect::default()
                };
                if !matches!(redirect.scheme.as_str(), "" | "http" | "https") {
                    return Err(invalid(
                        format!("{rat}.scheme"),
                        format!("{:?} is not http or https", redirect.scheme),
                    ));
                }
                // Gateway API: a new scheme without a port goes to that scheme's well-known port.
                if redirect.port == 0 {
                    redirect.port = match redirect.scheme.as_str() {
                        "https" => 443,
                        "http" => 80,
                        _ => 0,
                    };
                }
                if let Some(p) = &r.path {
                    match path_modifier(p, &format!("{rat}.path"))? {
                        PathChange::Full(path) => redirect.path = path,
                        PathChange::Prefix(prefix) => redirect.path_prefix = prefix,
                    }
                }
                route.action = Some(wp::route::Action::Redirect(redirect));
            }
            FilterType::UrlRewrite => {
                let r = filter
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| missing("urlRewrite"))?;
                let mut rewrite = wp::Rewrite {
                    authority: r.hostname.clone().unwrap_or_default(),
                    ..wp::Rewrite::default()
                };
                if let Some(p) = &r.path {
                    match path_modifier(p, &format!("{fat}.urlRewrite.path"))? {
                        PathChange::Full(path) => rewrite.full_path = path,
                        // As istiod: a trailing '/' is dropped, and "/" alone removes the prefix.
                        PathChange::Prefix(prefix) => {
                            let trimmed = prefix.trim_end_matches('/');
                            rewrite.path_prefix = if trimmed.is_empty() {
                                "/".into()
                            } else {
                                trimmed.into()
                            };
                        }
                    }
                }
                route.rewrite = Some(rewrite);
            }
            other @ (FilterType::RequestMirror | FilterType::Cors | FilterType::ExtensionRef) => {
                return Err(invalid(
                    format!("{fat}.type"),
                    format!("{other:?} is not supported"),
                ))
            }
        }
    }
    if route
        .rewrite
        .as_ref()
        .is_some_and(|_| matches!(route.action, Some(wp::route::Action::Redirect(_))))
    {
        return Err(invalid(
            format!("{at}.filters"),
            "RequestRedirect and URLRewrite exclude each other",
        ));
    }
    let mut backends = Vec::new();
    let mut total = 0u64;
    for (b, backend) in rule.backend_refs.iter().enumerate() {
        let bat = format!("{at}.backendRefs[{b}]");
        let kind = backend.kind.as_deref().unwrap_or("Service");
        let group = backend.group.as_deref().unwrap_or("");
        if kind != "Service" || !matches!(group, "" | "core") {
            return Err(invalid(
                bat,
                format!("{kind} (group {group:?}) backends are not supported; give a Service"),
            ));
        }
        if backend.filters.is_some() {
            return Err(invalid(
                format!("{bat}.filters"),
                "not supported; put filters on the rule",
            ));
        }
        if backend.namespace.as_deref().is_some_and(|n| n != ns) {
            return Err(invalid(
                format!("{bat}.namespace"),
                "backends of another namespace (ReferenceGrant) are not supported",
            ));
        }
        let svc = find_service(cfg, ns, &backend.name).ok_or_else(|| {
            invalid(
                format!("{bat}.name"),
                format!("{ns}/{} is not a service of the mesh file", backend.name),
            )
        })?;
        let port = backend
            .port
            .ok_or_else(|| invalid(format!("{bat}.port"), "required for a Service backend"))?;
        if !svc.ports.iter().any(|p| p.port == port) {
            return Err(invalid(
                format!("{bat}.port"),
                format!("service {ns}/{} has no port {port}", backend.name),
            ));
        }
        let weight = backend.weight.unwrap_or(1);
        total += u64::from(weight);
        if weight > 0 {
            backends.push(Backend {
                service: key(svc),
                port: Some(port),
                subset: String::new(),
                weight,
                field: bat,
            });
        }
    }
    let redirect = matches!(route.action, Some(wp::route::Action::Redirect(_)));
    let backends = if redirect {
        None
    } else if total == 0 {
        // Gateway API: no backend with a weight above 0 answers 500.
        route.action = Some(wp::route::Action::DirectResponse(wp::DirectResponse {
            status: 500,
            body: String::new(),
        }));
        None
    } else {
        Some(backends)
    };
    if let Some(r) = &rule.retry {
        let attempts = r.attempts.unwrap_or(2);
        let mut policy = wp::RetryPolicy {
            attempts,
            ..wp::RetryPolicy::default()
        };
        if let Some(b) = &r.backoff {
            duration(b, &format!("{at}.retry.backoff"))?;
        }
        if attempts > 0 {
            policy.retry_on = HTTP_ROUTE_RETRY_ON.iter().map(|s| s.to_string()).collect();
            for (c, code) in r.codes.iter().enumerate() {
                if !(400..=599).contains(code) {
                    return Err(invalid(
                        format!("{at}.retry.codes[{c}]"),
                        format!("{code} is not a 4xx or 5xx status"),
                    ));
                }
                policy.retriable_status_codes.push(u32::from(*code));
            }
            if !r.codes.is_empty() {
                policy.retry_on.push("retriable-status-codes".into());
            }
        }
        route.retries = Some(policy);
    }
    if let Some(t) = &rule.timeouts {
        if let Some(request) = &t.request {
            route.timeout = timeout(request, &format!("{at}.timeouts.request"))?;
        }
        if let Some(backend) = &t.backend_request {
            let per_try = timeout(backend, &format!("{at}.timeouts.backendRequest"))?;
            // As istiod: the per-try timeout when retrying, else the route's.
            if per_try.is_some() {
                match &mut route.retries {
                    Some(r) => r.per_try_timeout = per_try,
                    None => route.timeout = per_try,
                }
            }
        }
    }
    Ok(PendingRoute {
        route,
        match_ports: Vec::new(),
        backends,
    })
}

enum PathChange {
    Full(String),
    Prefix(String),
}

fn path_modifier(p: &PathModifier, at: &str) -> Result<PathChange, Error> {
    match p.r#type {
        PathModifierType::ReplaceFullPath => p
            .replace_full_path
            .clone()
            .map(PathChange::Full)
            .ok_or_else(|| invalid(format!("{at}.replaceFullPath"), "required by its type")),
        PathModifierType::ReplacePrefixMatch => p
            .replace_prefix_match
            .clone()
            .map(PathChange::Prefix)
            .ok_or_else(|| invalid(format!("{at}.replacePrefixMatch"), "required by its type")),
    }
}

fn header_modifier(m: &HeaderModifier, at: &str) -> Result<wp::HeaderOps, Error> {
    let list = |v: &[HttpHeader], what: &str| {
        v.iter()
            .enumerate()
            .map(|(k, h)| header(&h.name, &h.value, &format!("{at}.{what}[{k}]")))
            .collect::<Result<Vec<_>, Error>>()
    };
    let remove = removed_headers(&m.remove, &format!("{at}.remove"))?;
    Ok(wp::HeaderOps {
        set: list(&m.set, "set")?,
        add: list(&m.add, "add")?,
        remove,
    })
}

/// One HTTPRoute match (a PathPrefix becomes a segment-wise prefix, as Gateway API defines it).
fn http_match(m: &HttpRouteMatch, at: &str) -> Result<Vec<wp::RouteMatch>, Error> {
    use wp::string_match::Kind;
    let mut out = wp::RouteMatch::default();
    let path_type = m
        .path
        .as_ref()
        .and_then(|p| p.r#type)
        .unwrap_or(PathMatchType::PathPrefix);
    let value = m
        .path
        .as_ref()
        .and_then(|p| p.value.clone())
        .unwrap_or_else(|| "/".into());
    if !value.starts_with('/') {
        return Err(invalid(
            format!("{at}.path.value"),
            format!("{value:?} does not start with '/'"),
        ));
    }
    match path_type {
        PathMatchType::Exact => out.path = string_match(Kind::Exact(value)),
        PathMatchType::PathPrefix => {
            // "When specified, a trailing `/` is ignored"; "/" alone is every path (a plain prefix).
            let trimmed = value.trim_end_matches('/');
            if trimmed.is_empty() {
                out.path = string_match(Kind::Prefix("/".into()));
            } else {
                out.path = string_match(Kind::Prefix(trimmed.to_string()));
                out.path_segment_prefix = true;
            }
        }
        PathMatchType::RegularExpression => {
            return Err(invalid(
                format!("{at}.path.type"),
                "regex matches are not supported",
            ))
        }
    }
    for (k, h) in m.headers.iter().enumerate() {
        let hat = format!("{at}.headers[{k}]");
        if h.r#type == Some(ValueMatchType::RegularExpression) {
            return Err(invalid(
                format!("{hat}.type"),
                "regex matches are not supported",
            ));
        }
        non_empty(&h.name, &format!("{hat}.name"))?;
        out.headers.push(wp::HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            value: string_match(Kind::Exact(h.value.clone())),
            invert: false,
        });
    }
    for (k, q) in m.query_params.iter().enumerate() {
        let qat = format!("{at}.queryParams[{k}]");
        if q.r#type == Some(ValueMatchType::RegularExpression) {
            return Err(invalid(
                format!("{qat}.type"),
                "regex matches are not supported",
            ));
        }
        non_empty(&q.name, &format!("{qat}.name"))?;
        out.query_params.push(wp::QueryMatch {
            name: q.name.clone(),
            value: string_match(Kind::Exact(q.value.clone())),
        });
    }
    if let Some(method) = &m.method {
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        if !METHODS.contains(&method.as_str()) {
            return Err(invalid(
                format!("{at}.method"),
                format!("{method:?} is not one of {METHODS:?}"),
            ));
        }
        out.method = method.clone();
    }
    Ok(vec![out])
}
