//! Waypoint Gateways, `istio.io/use-waypoint`, HTTPRoute / VirtualService / DestinationRule and L7
//! AuthorizationPolicy → Address `waypoint` fields and Waypoint resources, one case per translation rule.

use super::*;
use crate::control_plane::istio::convert as convert_istio;
use crate::control_plane::translate::{pod_uid, translate, Resources};
use wp::string_match::Kind as Sm;

const BASE: &str = r#"
namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
  bookinfo: {labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
  shared: {labels: {team: infra}}
  other: {labels: {team: a}}
workloads:
- {name: waypoint-0, namespace: bookinfo, serviceAccount: waypoint, ips: [10.1.0.100], labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
- {name: reviews-v1, namespace: bookinfo, serviceAccount: reviews, ips: [10.1.0.1], labels: {app: reviews, version: v1}}
- {name: reviews-v2, namespace: bookinfo, serviceAccount: reviews, ips: [10.1.0.2], labels: {app: reviews, version: v2}}
- {name: ratings, namespace: bookinfo, ips: [10.1.0.3], labels: {app: ratings}}
- {name: sleep, namespace: default, ips: [10.1.0.7], labels: {app: sleep}}
- {name: shared-wp-0, namespace: shared, serviceAccount: shared-wp, ips: [10.1.0.101], labels: {gateway.networking.k8s.io/gateway-name: shared-wp}}
- {name: app, namespace: other, ips: [10.1.0.8], labels: {app: app}}
services:
- {name: reviews, namespace: bookinfo, vips: [10.96.0.1], ports: [{port: 9080, name: http}], selector: {app: reviews}}
- {name: reviews-v1, namespace: bookinfo, vips: [10.96.0.11], ports: [{port: 9080, name: http}], selector: {app: reviews, version: v1}}
- {name: reviews-v2, namespace: bookinfo, vips: [10.96.0.12], ports: [{port: 9080, name: http}], selector: {app: reviews, version: v2}}
- {name: ratings, namespace: bookinfo, vips: [10.96.0.3], ports: [{port: 9080, name: http-api}, {port: 3306, name: tcp-db}], selector: {app: ratings}}
- {name: sleep, namespace: default, vips: [10.96.0.7], ports: [{port: 80}], selector: {app: sleep}}
- {name: app, namespace: other, vips: [10.96.0.8], ports: [{port: 80, appProtocol: http}], selector: {app: app}}
"#;

/// A waypoint Gateway as `istioctl waypoint apply` writes it, with extra labels and listener fields.
fn gateway(ns: &str, name: &str, labels: &str, listener: &str) -> String {
    format!(
        "- apiVersion: gateway.networking.k8s.io/v1\n  kind: Gateway\n  metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n  spec:\n    gatewayClassName: istio-waypoint\n    listeners: [{{name: mesh, port: 15008, protocol: HBONE{listener}}}]\n"
    )
}

fn object(api: &str, kind: &str, ns: &str, name: &str, spec: &str) -> String {
    format!(
        "- {{apiVersion: {api}, kind: {kind}, metadata: {{name: {name}, namespace: {ns}}}, spec: {spec}}}\n"
    )
}

fn http_route(ns: &str, name: &str, spec: &str) -> String {
    object("gateway.networking.k8s.io/v1", "HTTPRoute", ns, name, spec)
}

fn virtual_service(ns: &str, name: &str, spec: &str) -> String {
    object("networking.istio.io/v1", "VirtualService", ns, name, spec)
}

fn destination_rule(ns: &str, name: &str, spec: &str) -> String {
    object("networking.istio.io/v1", "DestinationRule", ns, name, spec)
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    object(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        ns,
        name,
        spec,
    )
}

/// The bookinfo waypoint (service traffic, the default).
fn bookinfo_waypoint() -> String {
    gateway("bookinfo", "waypoint", "", "")
}

fn try_mesh_with(base: &str, istio: &str) -> Result<MeshConfig, Error> {
    MeshConfig::parse(&format!("{base}istio:\n{istio}"))
}

fn mesh(istio: &str) -> MeshConfig {
    try_mesh_with(BASE, istio).unwrap_or_else(|e| panic!("{e}"))
}

fn waypoints_of(cfg: &MeshConfig) -> Waypoints {
    convert(cfg, &convert_istio(cfg).unwrap()).unwrap()
}

fn wl_service<'a>(res: &'a Resources, ns: &str, name: &str) -> &'a wl::Service {
    let key = format!("{ns}/{name}.{ns}.svc.cluster.local");
    match res.addresses.get(&key).and_then(|a| a.r#type.as_ref()) {
        Some(wl::address::Type::Service(s)) => s,
        other => panic!("{key}: not a service: {other:?}"),
    }
}

fn wl_workload<'a>(res: &'a Resources, ns: &str, name: &str) -> &'a wl::Workload {
    let key = pod_uid("Kubernetes", ns, name);
    match res.addresses.get(&key).and_then(|a| a.r#type.as_ref()) {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("{key}: not a workload: {other:?}"),
    }
}

/// The waypoint address istiod gives `ns/name`.
fn address(ns: &str, name: &str) -> Option<wl::GatewayAddress> {
    Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Hostname(
            wl::NamespacedHostname {
                namespace: ns.into(),
                hostname: format!("{name}.{ns}.svc.cluster.local"),
            },
        )),
        hbone_mtls_port: 15008,
    })
}

fn resource<'a>(res: &'a Resources, key: &str) -> &'a wp::Waypoint {
    res.waypoints
        .get(key)
        .unwrap_or_else(|| panic!("no waypoint {key}: {:?}", res.waypoints.keys()))
}

fn bound<'a>(w: &'a wp::Waypoint, ns: &str, name: &str) -> &'a wp::Service {
    let host = format!("{name}.{ns}.svc.cluster.local");
    w.services
        .iter()
        .find(|s| s.hostname == host)
        .unwrap_or_else(|| panic!("{host} not bound to {}/{}", w.namespace, w.name))
}

fn port(s: &wp::Service, port: u32) -> &wp::Port {
    s.ports.iter().find(|p| p.port == port).unwrap()
}

fn routes_of(res: &Resources, ns: &str, name: &str, p: u32) -> Vec<wp::Route> {
    port(bound(resource(res, "bookinfo/waypoint"), ns, name), p)
        .routes
        .clone()
}

fn cluster<'a>(s: &'a wp::Service, name: &str) -> &'a wp::Cluster {
    s.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no cluster {name}: {:?}",
                s.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
            )
        })
}

fn forward(r: &wp::Route) -> Vec<(String, u32)> {
    match &r.action {
        Some(wp::route::Action::Forward(f)) => f
            .backends
            .iter()
            .map(|b| (b.cluster.clone(), b.weight))
            .collect(),
        other => panic!("{}: not a forward: {other:?}", r.name),
    }
}

fn exact(s: &str) -> Option<wp::StringMatch> {
    Some(wp::StringMatch {
        kind: Some(Sm::Exact(s.into())),
    })
}

fn prefix(s: &str) -> Option<wp::StringMatch> {
    Some(wp::StringMatch {
        kind: Some(Sm::Prefix(s.into())),
    })
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

const REVIEWS_V1: &str = "outbound|9080||reviews-v1.bookinfo.svc.cluster.local";
const REVIEWS_V2: &str = "outbound|9080||reviews-v2.bookinfo.svc.cluster.local";

// ---- binding ----

#[test]
fn a_namespace_label_binds_its_services_to_a_ready_waypoint_by_istiods_address() {
    let res = translate(&mesh(&bookinfo_waypoint()));
    for svc in ["reviews", "ratings"] {
        assert_eq!(
            wl_service(&res, "bookinfo", svc).waypoint,
            address("bookinfo", "waypoint"),
            "{svc}"
        );
    }
    // A service-only waypoint (the default): pods keep going direct.
    assert_eq!(wl_workload(&res, "bookinfo", "reviews-v1").waypoint, None);
    // Other namespaces are untouched.
    assert_eq!(wl_service(&res, "default", "sleep").waypoint, None);
    // The waypoint's Service is made as Istio's gateway controller makes it, and its instance backs it.
    let wps = wl_service(&res, "bookinfo", "waypoint");
    assert_eq!(wps.waypoint, None, "a waypoint's Service never gets one");
    assert!(wps.addresses.is_empty());
    assert_eq!(
        wps.ports
            .iter()
            .map(|p| (p.service_port, p.target_port))
            .collect::<Vec<_>>(),
        [(15008, 15008)]
    );
    let instance = wl_workload(&res, "bookinfo", "waypoint-0");
    assert!(instance
        .services
        .contains_key("bookinfo/waypoint.bookinfo.svc.cluster.local"));
    assert_eq!(instance.waypoint, None);
    // The Waypoint resource lists them.
    let w = resource(&res, "bookinfo/waypoint");
    assert_eq!(
        (w.namespace.as_str(), w.name.as_str()),
        ("bookinfo", "waypoint")
    );
    assert_eq!(w.traffic_type, wp::TrafficType::Service as i32);
    let hosts: Vec<_> = w.services.iter().map(|s| s.hostname.as_str()).collect();
    assert_eq!(
        hosts,
        [
            "ratings.bookinfo.svc.cluster.local",
            "reviews-v1.bookinfo.svc.cluster.local",
            "reviews-v2.bookinfo.svc.cluster.local",
            "reviews.bookinfo.svc.cluster.local",
        ]
    );
    assert!(w.workloads.is_empty());
}

#[test]
fn use_waypoint_on_the_object_beats_the_namespace_and_none_opts_out() {
    let base = BASE
        .replace(
            "{name: reviews-v1, namespace: bookinfo, vips: [10.96.0.11]",
            "{name: reviews-v1, namespace: bookinfo, labels: {istio.io/use-waypoint: none}, vips: [10.96.0.11]",
        )
        .replace(
            "{name: reviews-v2, namespace: bookinfo, vips: [10.96.0.12]",
            "{name: reviews-v2, namespace: bookinfo, labels: {istio.io/use-waypoint: shared-wp, istio.io/use-waypoint-namespace: shared}, vips: [10.96.0.12]",
        )
        .replace(
            "labels: {app: sleep}}\n",
            "labels: {app: sleep, istio.io/use-waypoint: wl-wp}}\n- {name: wl-wp-0, namespace: default, ips: [10.1.0.102], labels: {gateway.networking.k8s.io/gateway-name: wl-wp}}\n",
        )
        .replace(
            "default: {labels: {istio.io/dataplane-mode: ambient}}",
            "default: {labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: none}}",
        );
    let istio = [
        bookinfo_waypoint(),
        gateway(
            "shared",
            "shared-wp",
            "",
            ", allowedRoutes: {namespaces: {from: All}}",
        ),
        gateway("default", "wl-wp", "istio.io/waypoint-for: all", ""),
    ]
    .concat();
    let cfg = try_mesh_with(&base, &istio).unwrap();
    let res = translate(&cfg);
    // Table: (what, got, want)
    let rows = [
        (
            "namespace label",
            wl_service(&res, "bookinfo", "reviews").waypoint.clone(),
            address("bookinfo", "waypoint"),
        ),
        (
            "service says none",
            wl_service(&res, "bookinfo", "reviews-v1").waypoint.clone(),
            None,
        ),
        (
            "service names another waypoint and namespace",
            wl_service(&res, "bookinfo", "reviews-v2").waypoint.clone(),
            address("shared", "shared-wp"),
        ),
        (
            "namespace says none",
            wl_service(&res, "default", "sleep").waypoint.clone(),
            None,
        ),
        (
            "pod label beats the namespace's none",
            wl_workload(&res, "default", "sleep").waypoint.clone(),
            address("default", "wl-wp"),
        ),
    ];
    for (what, got, want) in rows {
        assert_eq!(got, want, "{what}");
    }
    let w = resource(&res, "default/wl-wp");
    assert_eq!(w.workloads, [pod_uid("Kubernetes", "default", "sleep")]);
}

#[test]
fn a_named_waypoint_that_is_missing_or_not_ready_gives_no_waypoint_and_no_fallback() {
    let base = BASE.replace(
        "{name: reviews-v1, namespace: bookinfo, vips: [10.96.0.11]",
        "{name: reviews-v1, namespace: bookinfo, labels: {istio.io/use-waypoint: nowhere}, vips: [10.96.0.11]",
    ).replace(
        "{name: reviews-v2, namespace: bookinfo, vips: [10.96.0.12]",
        "{name: reviews-v2, namespace: bookinfo, labels: {istio.io/use-waypoint: idle}, vips: [10.96.0.12]",
    );
    // `idle` exists but no workload is its instance.
    let istio = [bookinfo_waypoint(), gateway("bookinfo", "idle", "", "")].concat();
    let cfg = try_mesh_with(&base, &istio).unwrap();
    let res = translate(&cfg);
    assert_eq!(
        wl_service(&res, "bookinfo", "reviews").waypoint,
        address("bookinfo", "waypoint")
    );
    assert_eq!(
        wl_service(&res, "bookinfo", "reviews-v1").waypoint,
        None,
        "missing: no fallback"
    );
    assert_eq!(
        wl_service(&res, "bookinfo", "reviews-v2").waypoint,
        None,
        "not ready"
    );
    let warnings = waypoints_of(&cfg).warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("reviews-v1") && w.contains("not a waypoint Gateway")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("reviews-v2") && w.contains("not ready")),
        "{warnings:?}"
    );
    // A waypoint that is not ready still gets its resource, with nothing bound.
    let idle = resource(&res, "bookinfo/idle");
    assert!(idle.services.is_empty() && idle.workloads.is_empty());
    // Nor does a waypoint that loses its last instance keep anything.
    let gone: String = base
        .lines()
        .filter(|l| !l.contains("name: waypoint-0"))
        .map(|l| format!("{l}\n"))
        .collect();
    let res = translate(&try_mesh_with(&gone, &istio).unwrap());
    assert_eq!(wl_service(&res, "bookinfo", "reviews").waypoint, None);
}

#[test]
fn the_traffic_type_decides_what_may_bind() {
    // (waypoint-for, service bound?, pod bound?)
    let table = [
        ("", true, false),
        ("istio.io/waypoint-for: service", true, false),
        ("istio.io/waypoint-for: workload", false, true),
        ("istio.io/waypoint-for: all", true, true),
        ("istio.io/waypoint-for: none", false, false),
    ];
    for (label, service, pod) in table {
        let cfg = mesh(&gateway("bookinfo", "waypoint", label, ""));
        let res = translate(&cfg);
        assert_eq!(
            wl_service(&res, "bookinfo", "reviews").waypoint.is_some(),
            service,
            "{label:?}: service"
        );
        assert_eq!(
            wl_workload(&res, "bookinfo", "reviews-v1")
                .waypoint
                .is_some(),
            pod,
            "{label:?}: pod"
        );
        let w = resource(&res, "bookinfo/waypoint");
        assert_eq!(w.services.is_empty(), !service, "{label:?}");
        assert_eq!(w.workloads.is_empty(), !pod, "{label:?}");
    }
    // A pod that only inherits a service waypoint is silently direct; one that names it is warned about.
    let cfg = mesh(&bookinfo_waypoint());
    assert!(!waypoints_of(&cfg)
        .warnings
        .iter()
        .any(|w| w.contains("reviews-v1")));
    let named = BASE.replace(
        "labels: {app: reviews, version: v1}}",
        "labels: {app: reviews, version: v1, istio.io/use-waypoint: waypoint}}",
    );
    let cfg = try_mesh_with(&named, &bookinfo_waypoint()).unwrap();
    let warnings = waypoints_of(&cfg).warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("pod bookinfo/reviews-v1") && w.contains("not workload")),
        "{warnings:?}"
    );
}

#[test]
fn allowed_routes_default_to_the_gateways_own_namespace() {
    let bound = |listener: &str| {
        let base = BASE.replace(
            "other: {labels: {team: a}}",
            "other: {labels: {team: a, istio.io/use-waypoint: shared-wp, istio.io/use-waypoint-namespace: shared}}",
        );
        let cfg = try_mesh_with(&base, &gateway("shared", "shared-wp", "", listener)).unwrap();
        wl_service(&translate(&cfg), "other", "app")
            .waypoint
            .is_some()
    };
    assert!(!bound(""), "Same by default");
    assert!(bound(", allowedRoutes: {namespaces: {from: All}}"));
    assert!(bound(
        ", allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: a}}}}"
    ));
    assert!(!bound(
        ", allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: b}}}}"
    ));
}

#[test]
fn a_waypoints_own_instances_and_service_never_get_a_waypoint() {
    let res = translate(&mesh(&gateway(
        "bookinfo",
        "waypoint",
        "istio.io/waypoint-for: all",
        "",
    )));
    assert_eq!(wl_workload(&res, "bookinfo", "waypoint-0").waypoint, None);
    assert_eq!(wl_service(&res, "bookinfo", "waypoint").waypoint, None);
    assert_eq!(
        wl_workload(&res, "bookinfo", "ratings").waypoint,
        address("bookinfo", "waypoint")
    );
    let w = resource(&res, "bookinfo/waypoint");
    assert!(!w
        .workloads
        .contains(&pod_uid("Kubernetes", "bookinfo", "waypoint-0")));
    assert!(w
        .services
        .iter()
        .all(|s| s.hostname != "waypoint.bookinfo.svc.cluster.local"));
}

#[test]
fn tokens_of_a_waypoints_service_account_are_waypoint_identities() {
    let cfg = mesh(&bookinfo_waypoint());
    assert!(is_waypoint_identity(&cfg, "bookinfo", "waypoint"));
    assert!(!is_waypoint_identity(&cfg, "bookinfo", "reviews"));
    assert!(!is_waypoint_identity(&cfg, "default", "waypoint"));
    // The shared-wp pod is labelled, but there is no such Gateway.
    assert!(!is_waypoint_identity(&cfg, "shared", "shared-wp"));
}

// ---- ports ----

#[test]
fn port_protocols_come_from_app_protocol_or_the_port_name() {
    let res = translate(&mesh(&bookinfo_waypoint()));
    let ratings = bound(resource(&res, "bookinfo/waypoint"), "bookinfo", "ratings");
    assert_eq!(port(ratings, 9080).protocol, wp::Protocol::Http as i32);
    assert_eq!(port(ratings, 3306).protocol, wp::Protocol::Tcp as i32);
    let p = port(ratings, 9080);
    assert_eq!(
        p.default_cluster,
        "outbound|9080||ratings.bookinfo.svc.cluster.local"
    );
    assert_eq!(
        p.tcp,
        [wp::WeightedCluster {
            cluster: p.default_cluster.clone(),
            weight: 1
        }]
    );
    let c = cluster(ratings, &p.default_cluster);
    assert_eq!(c.endpoints, [pod_uid("Kubernetes", "bookinfo", "ratings")]);
    // The Address carries istiod's app_protocol too.
    let ports: Vec<_> = wl_service(&res, "bookinfo", "ratings")
        .ports
        .iter()
        .map(|p| p.app_protocol)
        .collect();
    assert_eq!(
        ports,
        [wl::AppProtocol::Http11 as i32, wl::AppProtocol::Tcp as i32]
    );
    assert_eq!(
        wl_service(&res, "other", "app").ports[0].app_protocol,
        wl::AppProtocol::Http11 as i32
    );
    assert_eq!(
        wl_service(&res, "default", "sleep").ports[0].app_protocol,
        wl::AppProtocol::Unknown as i32
    );
}

// ---- HTTPRoute ----

#[test]
fn http_route_weights_matches_and_filters_become_routes() {
    let route = http_route(
        "bookinfo",
        "reviews",
        r#"{parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}], rules: [
          {matches: [{path: {type: PathPrefix, value: /api/}, headers: [{name: X-User, value: jason}], queryParams: [{name: debug, value: "1"}], method: GET}],
           filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Route, value: a}], add: [{name: X-Add, value: b}], remove: [X-Gone]}},
                     {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Resp, value: c}]}},
                     {type: URLRewrite, urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2/}}}],
           backendRefs: [{name: reviews-v1, port: 9080, weight: 80}, {name: reviews-v2, port: 9080, weight: 20}, {name: reviews, port: 9080, weight: 0}],
           timeouts: {request: 10s},
           retry: {attempts: 3, codes: [503], backoff: 100ms}},
          {matches: [{path: {type: Exact, value: /old}}],
           filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.com, path: {type: ReplaceFullPath, replaceFullPath: /new}}}]},
          {backendRefs: [{name: reviews-v1, port: 9080}]}]}"#,
    );
    let res = translate(&mesh(&[bookinfo_waypoint(), route].concat()));
    let routes = routes_of(&res, "bookinfo", "reviews", 9080);
    assert_eq!(routes.len(), 3);
    // Precedence puts the exact path first.
    let redirect = &routes[0];
    assert_eq!(redirect.name, "bookinfo/reviews.1");
    assert_eq!(redirect.matches[0].path, exact("/old"));
    assert_eq!(
        redirect.action,
        Some(wp::route::Action::Redirect(wp::Redirect {
            scheme: "https".into(),
            host: "example.com".into(),
            port: 443,
            path: "/new".into(),
            status: 302,
            path_prefix: String::new(),
        }))
    );
    let r = &routes[1];
    assert_eq!(r.name, "bookinfo/reviews.0");
    let m = &r.matches[0];
    assert_eq!(m.path, prefix("/api"), "a trailing '/' is ignored");
    assert!(m.path_segment_prefix, "PathPrefix matches whole segments");
    assert_eq!(m.headers[0].name, "x-user");
    assert_eq!(m.headers[0].value, exact("jason"));
    assert_eq!(m.query_params[0].name, "debug");
    assert_eq!(m.method, "GET");
    assert_eq!(
        forward(r),
        [(REVIEWS_V1.to_string(), 80), (REVIEWS_V2.to_string(), 20)],
        "weight-0 backends are dropped"
    );
    let req = r.request_headers.as_ref().unwrap();
    assert_eq!(req.set[0].name, "x-route");
    assert_eq!(req.add[0].value, "b");
    assert_eq!(req.remove, ["x-gone"]);
    assert_eq!(r.response_headers.as_ref().unwrap().set[0].value, "c");
    assert_eq!(
        r.rewrite,
        Some(wp::Rewrite {
            path_prefix: "/v2".into(),
            authority: "reviews.internal".into(),
            full_path: String::new(),
        })
    );
    assert_eq!(r.timeout, secs(10));
    let retries = r.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 3);
    assert_eq!(
        retries.retry_on,
        [
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes"
        ]
    );
    assert_eq!(retries.retriable_status_codes, [503]);
    // The rule without matches comes last and matches everything.
    assert!(routes[2].matches.is_empty());
    assert_eq!(forward(&routes[2]), [(REVIEWS_V1.to_string(), 1)]);
    // The clusters the routes name are in the service's list, with their endpoints.
    let s = bound(resource(&res, "bookinfo/waypoint"), "bookinfo", "reviews");
    assert_eq!(
        cluster(s, REVIEWS_V2).endpoints,
        [pod_uid("Kubernetes", "bookinfo", "reviews-v2")]
    );
}

#[test]
fn an_http_route_with_only_zero_weights_answers_500() {
    let route = http_route(
        "bookinfo",
        "reviews",
        "{parentRefs: [{kind: Service, group: '', name: reviews}], rules: [{backendRefs: [{name: reviews-v1, port: 9080, weight: 0}]}, {}]}",
    );
    let res = translate(&mesh(&[bookinfo_waypoint(), route].concat()));
    let routes = routes_of(&res, "bookinfo", "reviews", 9080);
    let direct = Some(wp::route::Action::DirectResponse(wp::DirectResponse {
        status: 500,
        body: String::new(),
    }));
    assert_eq!(routes[0].action, direct);
    assert_eq!(routes[1].action, direct, "no backendRefs at all");
}

#[test]
fn http_route_rules_split_per_match_and_follow_gateway_api_precedence() {
    let route = http_route(
        "bookinfo",
        "reviews",
        "{parentRefs: [{kind: Service, group: '', name: reviews}], rules: [
           {matches: [{path: {value: /a}}, {path: {type: Exact, value: /a/b}}], backendRefs: [{name: reviews-v1, port: 9080}]},
           {matches: [{path: {value: /a/longer}}], backendRefs: [{name: reviews-v2, port: 9080}]},
           {matches: [{path: {value: /a}, headers: [{name: x, value: y}]}], backendRefs: [{name: reviews-v2, port: 9080}]},
           {matches: [{path: {value: /a}, method: POST}], backendRefs: [{name: reviews-v2, port: 9080}]}]}",
    );
    let res = translate(&mesh(&[bookinfo_waypoint(), route].concat()));
    let got: Vec<(String, Option<wp::StringMatch>, String, usize)> =
        routes_of(&res, "bookinfo", "reviews", 9080)
            .iter()
            .map(|r| {
                let m = &r.matches[0];
                (
                    r.name.clone(),
                    m.path.clone(),
                    m.method.clone(),
                    m.headers.len(),
                )
            })
            .collect();
    let row =
        |n: &str, p, method: &str, h| (format!("bookinfo/reviews.{n}"), p, method.to_string(), h);
    assert_eq!(
        got,
        [
            row("0", exact("/a/b"), "", 0),
            row("1", prefix("/a/longer"), "", 0),
            row("3", prefix("/a"), "POST", 0),
            row("2", prefix("/a"), "", 1),
            row("0", prefix("/a"), "", 0),
        ]
    );
}

#[test]
fn a_parent_ref_port_limits_the_routes_to_that_port() {
    let route = http_route(
        "bookinfo",
        "ratings",
        "{parentRefs: [{kind: Service, group: '', name: ratings, port: 9080}], rules: [{backendRefs: [{name: ratings, port: 9080}]}]}",
    );
    let all_ports = http_route(
        "bookinfo",
        "ratings-any",
        "{parentRefs: [{kind: Service, group: '', name: ratings}], rules: [{matches: [{method: PUT}], backendRefs: [{name: ratings, port: 9080}]}]}",
    );
    let res = translate(&mesh(&[bookinfo_waypoint(), route, all_ports].concat()));
    let routes = routes_of(&res, "bookinfo", "ratings", 9080);
    assert_eq!(routes.len(), 2);
    // A match without a path is PathPrefix "/": every path.
    assert_eq!(routes[0].matches[0].method, "PUT");
    assert_eq!(routes[0].matches[0].path, prefix("/"));
    assert!(!routes[0].matches[0].path_segment_prefix);
    assert!(
        routes_of(&res, "bookinfo", "ratings", 3306).is_empty(),
        "a TCP port gets no HTTP routes"
    );
}

// ---- VirtualService and DestinationRule ----

const REVIEWS_DR: &str = "{host: reviews, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}, connectionPool: {tcp: {maxConnections: 100, connectTimeout: 2s}, http: {http1MaxPendingRequests: 10, http2MaxRequests: 50, maxRequestsPerConnection: 5, maxRetries: 3, idleTimeout: 30s}}, outlierDetection: {consecutive5xxErrors: 2, consecutiveGatewayErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}},
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}, outlierDetection: {consecutiveGatewayErrors: 1}}}]}";

#[test]
fn virtual_service_routes_subsets_rewrites_headers_retries_and_timeouts() {
    let vs = virtual_service(
        "bookinfo",
        "reviews",
        r#"{hosts: [reviews], http: [
          {match: [{headers: {end-user: {exact: jason}}, uri: {prefix: /api}, queryParams: {v: {exact: "2"}}, method: {exact: GET}}, {withoutHeaders: {x-skip: {}}, port: 9080}],
           route: [{destination: {host: reviews, subset: v2}}],
           rewrite: {uri: /v2/api, authority: reviews-v2},
           headers: {request: {set: {X-Version: v2}, remove: [cookie]}, response: {add: {x-served: waypoint}}},
           timeout: 1.5s,
           retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,reset,retriable-4xx,503"}},
          {match: [{uri: {exact: /old}}], redirect: {uri: /new, authority: example.com, redirectCode: 308}},
          {match: [{uri: {exact: /teapot}}], directResponse: {status: 418, body: {string: "short and stout"}}},
          {match: [{port: 1234}], route: [{destination: {host: reviews-v1}}]},
          {route: [{destination: {host: reviews, subset: v1}, weight: 80}, {destination: {host: reviews.bookinfo.svc.cluster.local, subset: v2}, weight: 20}],
           retries: {attempts: 2}},
          {route: [{destination: {host: reviews}}], retries: {attempts: 0, perTryTimeout: 1s}}]}"#,
    );
    let dr = destination_rule("bookinfo", "reviews", REVIEWS_DR);
    let res = translate(&mesh(&[bookinfo_waypoint(), vs, dr].concat()));
    let routes = routes_of(&res, "bookinfo", "reviews", 9080);
    assert_eq!(routes.len(), 5, "the route for port 1234 only is left out");
    let r = &routes[0];
    assert_eq!(r.name, "bookinfo/reviews.0");
    let m = &r.matches[0];
    assert_eq!(m.path, prefix("/api"));
    assert!(
        !m.path_segment_prefix,
        "a VirtualService prefix is a plain prefix"
    );
    assert_eq!(
        m.headers,
        [wp::HeaderMatch {
            name: "end-user".into(),
            value: exact("jason"),
            invert: false
        }]
    );
    assert_eq!(m.query_params[0].value, exact("2"));
    assert_eq!(m.method, "GET");
    assert_eq!(
        r.matches[1].headers,
        [wp::HeaderMatch {
            name: "x-skip".into(),
            value: None,
            invert: true
        }],
        "withoutHeaders with an empty match: the header must be absent"
    );
    let v2 = "outbound|9080|v2|reviews.bookinfo.svc.cluster.local";
    let v1 = "outbound|9080|v1|reviews.bookinfo.svc.cluster.local";
    assert_eq!(forward(r), [(v2.to_string(), 1)]);
    assert_eq!(r.rewrite.as_ref().unwrap().path_prefix, "/v2/api");
    assert_eq!(r.rewrite.as_ref().unwrap().authority, "reviews-v2");
    assert_eq!(r.request_headers.as_ref().unwrap().set[0].name, "x-version");
    assert_eq!(r.request_headers.as_ref().unwrap().remove, ["cookie"]);
    assert_eq!(
        r.response_headers.as_ref().unwrap().add[0].value,
        "waypoint"
    );
    assert_eq!(
        r.timeout,
        Some(prost_types::Duration {
            seconds: 1,
            nanos: 500_000_000
        })
    );
    let retries = r.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 4);
    assert_eq!(
        retries.retry_on,
        ["5xx", "reset", "retriable-4xx", "retriable-status-codes"]
    );
    assert_eq!(retries.retriable_status_codes, [503]);
    assert_eq!(
        retries.per_try_timeout,
        Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000
        })
    );
    assert_eq!(
        routes[1].action,
        Some(wp::route::Action::Redirect(wp::Redirect {
            host: "example.com".into(),
            path: "/new".into(),
            status: 308,
            ..wp::Redirect::default()
        }))
    );
    assert_eq!(
        routes[2].action,
        Some(wp::route::Action::DirectResponse(wp::DirectResponse {
            status: 418,
            body: "short and stout".into()
        }))
    );
    assert_eq!(
        forward(&routes[3]),
        [(v1.to_string(), 80), (v2.to_string(), 20)]
    );
    assert_eq!(
        routes[3].retries.as_ref().unwrap().retry_on,
        [
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes"
        ],
        "istiod's default conditions"
    );
    assert_eq!(
        routes[4].retries,
        Some(wp::RetryPolicy {
            attempts: 0,
            ..wp::RetryPolicy::default()
        }),
        "zero attempts: no retries, whatever else is set"
    );
    assert!(
        routes[4].matches.is_empty(),
        "a route without match applies to every port"
    );
}

#[test]
fn destination_rule_policies_apply_per_cluster_and_subsets_override_by_section() {
    let vs = virtual_service(
        "bookinfo",
        "reviews",
        "{hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}, weight: 50}, {destination: {host: reviews, subset: v2}, weight: 50}]}]}",
    );
    let dr = destination_rule("bookinfo", "reviews", REVIEWS_DR);
    let res = translate(&mesh(&[bookinfo_waypoint(), vs, dr].concat()));
    let s = bound(resource(&res, "bookinfo/waypoint"), "bookinfo", "reviews");
    let all = cluster(s, "outbound|9080||reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        all.endpoints,
        [
            pod_uid("Kubernetes", "bookinfo", "reviews-v1"),
            pod_uid("Kubernetes", "bookinfo", "reviews-v2")
        ]
    );
    assert_eq!(
        all.load_balancer,
        Some(wp::LoadBalancer {
            simple: wp::load_balancer::Simple::LeastRequest as i32
        })
    );
    assert_eq!(
        all.connection_pool,
        Some(wp::ConnectionPool {
            max_connections: 100,
            connect_timeout: secs(2),
            http1_max_pending_requests: 10,
            http2_max_requests: 50,
            max_requests_per_connection: 5,
            max_retries: 3,
            idle_timeout: secs(30),
        })
    );
    assert_eq!(
        all.outlier_detection,
        Some(wp::OutlierDetection {
            consecutive_5xx_errors: 2,
            consecutive_gateway_errors: 3,
            interval: secs(5),
            base_ejection_time: secs(60),
            max_ejection_percent: 50,
        })
    );
    let v1 = cluster(s, "outbound|9080|v1|reviews.bookinfo.svc.cluster.local");
    assert_eq!(v1.subset, "v1");
    assert_eq!(
        v1.endpoints,
        [pod_uid("Kubernetes", "bookinfo", "reviews-v1")]
    );
    assert_eq!(
        v1.load_balancer, all.load_balancer,
        "inherits the top-level policy"
    );
    let v2 = cluster(s, "outbound|9080|v2|reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        v2.endpoints,
        [pod_uid("Kubernetes", "bookinfo", "reviews-v2")]
    );
    assert_eq!(
        v2.load_balancer.unwrap().simple,
        wp::load_balancer::Simple::Random as i32
    );
    assert_eq!(
        v2.connection_pool, all.connection_pool,
        "a section it does not set is kept"
    );
    assert_eq!(
        v2.outlier_detection,
        Some(wp::OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 1,
            interval: secs(10),
            base_ejection_time: secs(30),
            max_ejection_percent: 10,
        }),
        "its own outlier detection replaces the top-level one, with Envoy's defaults filled in"
    );
}

#[test]
fn the_destination_rule_of_the_waypoints_namespace_wins_over_the_services() {
    let base = BASE.replace(
        "{name: sleep, namespace: default, vips: [10.96.0.7]",
        "{name: sleep, namespace: default, labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: bookinfo}, vips: [10.96.0.7]",
    );
    let istio = [
        gateway("bookinfo", "waypoint", "", ", allowedRoutes: {namespaces: {from: All}}"),
        destination_rule("default", "sleep", "{host: sleep, trafficPolicy: {loadBalancer: {simple: RANDOM}}}"),
        destination_rule("bookinfo", "sleep-here", "{host: sleep.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}"),
        destination_rule("istio-system", "root", "{host: ratings.bookinfo.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}"),
    ]
    .concat();
    let base = base.replace("namespaces:\n", "namespaces:\n  istio-system: {}\n");
    let res = translate(&try_mesh_with(&base, &istio).unwrap());
    let w = resource(&res, "bookinfo/waypoint");
    let sleep = bound(w, "default", "sleep");
    assert_eq!(
        cluster(sleep, &port(sleep, 80).default_cluster)
            .load_balancer
            .unwrap()
            .simple,
        wp::load_balancer::Simple::Passthrough as i32
    );
    let ratings = bound(w, "bookinfo", "ratings");
    assert_eq!(
        cluster(ratings, &port(ratings, 9080).default_cluster)
            .load_balancer
            .unwrap()
            .simple,
        wp::load_balancer::Simple::Random as i32,
        "the root namespace's rule when no other applies"
    );
}

#[test]
fn a_virtual_service_of_another_namespace_does_not_apply() {
    let vs = virtual_service(
        "default",
        "reviews",
        "{hosts: [reviews.bookinfo.svc.cluster.local], http: [{route: [{destination: {host: reviews.bookinfo.svc.cluster.local}}]}]}",
    );
    let res = translate(&mesh(&[bookinfo_waypoint(), vs].concat()));
    assert!(routes_of(&res, "bookinfo", "reviews", 9080).is_empty());
}

// ---- L7 authorization ----

#[test]
fn l7_policies_attach_to_their_gateway_their_service_or_every_waypoint() {
    let base = BASE.replace("namespaces:\n", "namespaces:\n  istio-system: {}\n");
    let istio = [
        bookinfo_waypoint(),
        policy("bookinfo", "on-gateway", "{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}, rules: [{to: [{operation: {methods: [GET]}}]}]}"),
        policy("bookinfo", "on-reviews", "{targetRefs: [{kind: Service, group: '', name: reviews}], action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}"),
        policy("default", "on-sleep", "{targetRefs: [{kind: Service, group: '', name: sleep}]}"),
        policy("istio-system", "everywhere", "{targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}], action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}"),
        policy("bookinfo", "selector", "{selector: {matchLabels: {app: reviews}}, rules: [{}]}"),
    ]
    .concat();
    let cfg = try_mesh_with(&base, &istio).unwrap();
    let res = translate(&cfg);
    let w = resource(&res, "bookinfo/waypoint");
    let names =
        |v: &[wp::AuthorizationPolicy]| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&w.policies), ["on-gateway", "everywhere"]);
    assert_eq!(
        names(&bound(w, "bookinfo", "reviews").policies),
        ["on-reviews"]
    );
    assert!(bound(w, "bookinfo", "ratings").policies.is_empty());
    let p = &bound(w, "bookinfo", "reviews").policies[0];
    assert_eq!(p.action, wp::Action::Deny as i32);
    assert_eq!(p.rules[0].to[0].methods, ["POST"]);
    // Selector policies are node-proxy policies only; targeted ones never reach node proxies.
    assert!(res.authorizations.contains_key("bookinfo/selector"));
    assert!(!res.authorizations.contains_key("bookinfo/on-reviews"));
    // A Service bound to no waypoint: not enforced, with a warning.
    let warnings = waypoints_of(&cfg).warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("default/on-sleep") && w.contains("not bound to a waypoint")),
        "{warnings:?}"
    );
}

// ---- refusals ----

#[test]
fn unsupported_l7_objects_are_refused_naming_the_field() {
    let wp0 = bookinfo_waypoint();
    let vs = |spec: &str| format!("{wp0}{}", virtual_service("bookinfo", "v", spec));
    let hr = |spec: &str| format!("{wp0}{}", http_route("bookinfo", "r", spec));
    let dr = |spec: &str| format!("{wp0}{}", destination_rule("bookinfo", "d", spec));
    let parent = "parentRefs: [{kind: Service, group: '', name: reviews}]";
    let cases: Vec<(String, &str)> = vec![
        (vs("{hosts: [reviews], http: [{match: [{uri: {regex: '/a.*'}}], route: [{destination: {host: reviews}}]}]}"),
         "istio[1].spec.http[0].match[0].uri.regex: regex matches are not supported"),
        (vs("{hosts: [reviews], http: [{match: [{headers: {a: {regex: x}}}], route: [{destination: {host: reviews}}]}]}"),
         "istio[1].spec.http[0].match[0].headers.a.regex"),
        (vs("{hosts: [reviews], http: [{match: [{method: {prefix: G}}], route: [{destination: {host: reviews}}]}]}"),
         "istio[1].spec.http[0].match[0].method"),
        (vs("{hosts: [reviews], http: [{match: [{sourceLabels: {a: b}}], route: [{destination: {host: reviews}}]}]}"),
         "istio[1].spec.http[0].match[0].sourceLabels: not supported"),
        (vs("{hosts: [reviews], http: [{fault: {abort: {httpStatus: 500}}, route: [{destination: {host: reviews}}]}]}"),
         "istio[1].spec.http[0].fault: not supported"),
        (vs("{hosts: [reviews], http: [{mirror: {host: reviews}, route: [{destination: {host: reviews}}]}]}"),
         "istio[1].spec.http[0].mirror"),
        (vs("{hosts: [reviews], tls: [{route: [{destination: {host: reviews}}]}]}"), "istio[1].spec.tls"),
        (vs("{hosts: [reviews], gateways: [my-gateway], http: [{route: [{destination: {host: reviews}}]}]}"),
         "istio[1].spec.gateways[0]"),
        (vs("{hosts: ['*.bookinfo.svc.cluster.local'], http: []}"), "istio[1].spec.hosts[0]"),
        (vs("{hosts: [reviwes], http: []}"), "istio[1].spec.hosts[0]: \"reviwes\" (reviwes.bookinfo.svc.cluster.local) is not a service"),
        (vs("{hosts: [reviews], http: [{route: [{destination: {host: nope}}]}]}"), "istio[1].spec.http[0].route[0].destination.host"),
        (vs("{hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v9}}]}]}"), "istio[1].spec.http[0].route[0].destination.subset"),
        (vs("{hosts: [reviews], http: [{route: [{destination: {host: reviews, port: {number: 81}}}]}]}"), "istio[1].spec.http[0].route[0].destination.port"),
        (vs("{hosts: [ratings], http: [{route: [{destination: {host: reviews}}, {destination: {host: ratings}, weight: 50}]}]}"), "istio[1].spec.http[0].route[0].weight"),
        (vs("{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], redirect: {uri: /x}}]}"), "istio[1].spec.http[0]: route, redirect and directResponse exclude each other"),
        (vs("{hosts: [reviews], http: [{}]}"), "istio[1].spec.http[0]: a route needs one of"),
        (vs("{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], retries: {attempts: 2, retryOn: retriable-headers}}]}"), "istio[1].spec.http[0].retries.retryOn"),
        (vs("{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], timeout: soon}]}"), "istio[1].spec.http[0].timeout"),
        (vs("{hosts: [reviews], http: [{route: [{destination: {host: reviews}}], rewrite: {uriRegexRewrite: {match: a, rewrite: b}}}]}"), "istio[1].spec.http[0].rewrite.uriRegexRewrite"),
        (vs("{hosts: [reviews], http: [{directResponse: {status: 200, body: {bytes: aGk=}}}]}"), "istio[1].spec.http[0].directResponse.body.bytes"),
        (hr(&format!("{{{parent}, rules: [{{matches: [{{path: {{type: RegularExpression, value: /a.*}}}}]}}]}}")), "istio[1].spec.rules[0].matches[0].path.type: regex matches are not supported"),
        (hr(&format!("{{{parent}, rules: [{{matches: [{{headers: [{{type: RegularExpression, name: a, value: b}}]}}]}}]}}")), "istio[1].spec.rules[0].matches[0].headers[0].type"),
        (hr(&format!("{{{parent}, rules: [{{filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: reviews, port: 9080}}}}}}]}}]}}")), "istio[1].spec.rules[0].filters[0].type"),
        (hr(&format!("{{{parent}, rules: [{{filters: [{{type: RequestHeaderModifier}}]}}]}}")), "istio[1].spec.rules[0].filters[0].requestHeaderModifier"),
        (hr(&format!("{{{parent}, rules: [{{backendRefs: [{{name: reviews-v1}}]}}]}}")), "istio[1].spec.rules[0].backendRefs[0].port"),
        (hr(&format!("{{{parent}, rules: [{{backendRefs: [{{name: sleep, namespace: default, port: 80}}]}}]}}")), "istio[1].spec.rules[0].backendRefs[0].namespace"),
        (hr(&format!("{{{parent}, rules: [{{backendRefs: [{{name: nope, port: 80}}]}}]}}")), "istio[1].spec.rules[0].backendRefs[0].name"),
        (hr(&format!("{{{parent}, rules: [{{timeouts: {{request: 5}}}}]}}")), "istio[1].spec.rules[0].timeouts.request"),
        (hr("{parentRefs: [{name: my-gateway}]}"), "istio[1].spec.parentRefs[0]"),
        (hr("{parentRefs: [{kind: Service, group: '', name: sleep, namespace: default}]}"), "istio[1].spec.parentRefs[0].namespace"),
        (hr("{parentRefs: [{kind: Service, group: '', name: reviews, port: 81}]}"), "istio[1].spec.parentRefs[0].port"),
        (hr(&format!("{{{parent}, hostnames: [reviews]}}")), "istio[1].spec.hostnames"),
        (dr("{host: reviews, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}"), "istio[1].spec.trafficPolicy.tls: not supported"),
        (dr("{host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x}}}}"), "istio[1].spec.trafficPolicy.loadBalancer.consistentHash"),
        (dr("{host: reviews, trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}}"), "istio[1].spec.trafficPolicy.outlierDetection.maxEjectionPercent"),
        (dr("{host: reviews, subsets: [{name: v1, trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 1s}}}}}]}"), "istio[1].spec.subsets[0].trafficPolicy.connectionPool.tcp.tcpKeepalive"),
        (dr("{host: reviews, subsets: [{name: v1}, {name: v1}]}"), "istio[1].spec.subsets[1].name"),
        (dr("{host: nope}"), "istio[1].spec.host"),
        (format!("{wp0}{}{}", destination_rule("bookinfo", "a", "{host: reviews}"), destination_rule("bookinfo", "b", "{host: reviews.bookinfo.svc.cluster.local}")), "istio[2].spec.host"),
        (gateway("bookinfo", "none", "", ""), "istio[0].metadata.name"),
        (gateway("bookinfo", "waypoint", "istio.io/waypoint-for: everything", ""), "istio[0].metadata.labels.istio.io/waypoint-for"),
        (gateway("bookinfo", "waypoint", "", ", hostname: a.example.com"), "istio[0].spec.listeners[0].hostname"),
        (gateway("bookinfo", "waypoint", "", ", allowedRoutes: {namespaces: {from: Selector}}"), "istio[0].spec.listeners[0].allowedRoutes.namespaces.selector"),
        (wp0.replace("istio-waypoint", "istio"), "istio[0].spec.gatewayClassName"),
        (wp0.replace("port: 15008", "port: 80"), "istio[0].spec.listeners[0]"),
        (wp0.replace("[{name: mesh, port: 15008, protocol: HBONE}]", "[]"), "istio[0].spec.listeners"),
        (wp0.replace("gateway.networking.k8s.io/v1", "networking.istio.io/v1"), "istio[0].apiVersion"),
        (format!("{wp0}{wp0}"), "istio[1].metadata.name"),
    ];
    for (istio, field) in cases {
        let err = try_mesh_with(BASE, &istio).expect_err(&istio).to_string();
        assert!(
            err.contains(field),
            "{istio}\nerror {err:?} does not name {field}"
        );
    }
    // The control plane makes the waypoint's Service: the file may not list one.
    let base =
        format!("{BASE}- {{name: waypoint, namespace: bookinfo, ports: [{{port: 15008}}]}}\n");
    let err = try_mesh_with(&base, &wp0).unwrap_err().to_string();
    assert!(err.contains("services[6].name"), "{err}");
}

#[test]
fn objects_can_be_written_as_kubectl_writes_them() {
    // Block style, with the usual key order and optional fields left out.
    let yaml = format!(
        "{BASE}istio:
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata:
    name: waypoint
    namespace: bookinfo
    labels:
      istio.io/waypoint-for: service
  spec:
    gatewayClassName: istio-waypoint
    listeners:
    - name: mesh
      port: 15008
      protocol: HBONE
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata:
    name: reviews
    namespace: bookinfo
  spec:
    parentRefs:
    - group: \"\"
      kind: Service
      name: reviews
      port: 9080
    rules:
    - backendRefs:
      - name: reviews-v1
        port: 9080
        weight: 80
      - name: reviews-v2
        port: 9080
        weight: 20
"
    );
    let res = translate(&MeshConfig::parse(&yaml).unwrap());
    let routes = routes_of(&res, "bookinfo", "reviews", 9080);
    assert_eq!(
        forward(&routes[0]),
        [(REVIEWS_V1.to_string(), 80), (REVIEWS_V2.to_string(), 20)]
    );
}

#[test]
fn node_proxies_accept_every_address_a_mesh_with_waypoints_makes() {
    let istio = [
        gateway("bookinfo", "waypoint", "istio.io/waypoint-for: all", ""),
        http_route(
            "bookinfo",
            "reviews",
            "{parentRefs: [{kind: Service, group: '', name: reviews}], rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]}",
        ),
    ]
    .concat();
    let cfg = mesh(&istio);
    // What the fuzz target checks: the control plane never sends what its own proxy refuses.
    for (name, addr) in translate(&cfg).addresses {
        if let Err(e) = crate::xds::convert::address(&name, addr.clone()) {
            panic!("{name}: {e}\n{addr:?}");
        }
    }
}

#[test]
fn the_xfcc_annotation_on_a_waypoint_gateway_reaches_its_resource_and_bad_values_are_refused() {
    let annotated = |v: &str| {
        bookinfo_waypoint().replace(
            "labels: {}}",
            &format!("labels: {{}}, annotations: {{ambient.istio.io/xfcc-include-client-identity: {v:?}}}}}"),
        )
    };
    for (value, want) in [
        ("true", true),
        ("True", true),
        ("1", true),
        ("false", false),
    ] {
        let w = waypoints_of(&mesh(&annotated(value)));
        assert_eq!(
            w.resources["bookinfo/waypoint"].xfcc_include_client_identity, want,
            "{value}"
        );
    }
    assert!(
        !waypoints_of(&mesh(&bookinfo_waypoint())).resources["bookinfo/waypoint"]
            .xfcc_include_client_identity
    );
    let err = try_mesh_with(BASE, &annotated("yes"))
        .map(|cfg| convert_istio(&cfg).and_then(|c| convert(&cfg, &c)))
        .map_or_else(
            |e| e.to_string(),
            |r| r.map_or_else(|e| e.to_string(), |_| String::new()),
        );
    assert!(
        err.contains("istio[0].metadata.annotations.ambient.istio.io/xfcc-include-client-identity"),
        "{err}"
    );
}

#[test]
fn auto_allow_waypoint_policy_lets_the_waypoint_through_the_l4_policies_of_the_pods_it_serves() {
    let istio = bookinfo_waypoint();
    let off = translate(&mesh(&istio));
    assert!(wl_workload(&off, "bookinfo", "reviews-v1")
        .authorization_policies
        .is_empty());
    let on = translate(
        &try_mesh_with(&format!("autoAllowWaypointPolicy: true\n{BASE}"), &istio)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let key = "bookinfo/istio_allow_waypoint_bookinfo_waypoint";
    // reviews-v1 backs reviews, which uses the namespace's waypoint.
    assert_eq!(
        wl_workload(&on, "bookinfo", "reviews-v1").authorization_policies,
        [key]
    );
    // sleep's namespace has no waypoint; the waypoint's own pod lists nothing.
    assert!(wl_workload(&on, "default", "sleep")
        .authorization_policies
        .is_empty());
    assert!(wl_workload(&on, "bookinfo", "waypoint-0")
        .authorization_policies
        .is_empty());
    let policy = &on.authorizations[key];
    assert_eq!(policy.action, crate::proto::security::Action::Allow as i32);
    assert_eq!(
        policy.scope,
        crate::proto::security::Scope::WorkloadSelector as i32
    );
    let text = format!("{policy:?}");
    assert!(
        text.contains("cluster.local/ns/bookinfo/sa/waypoint"),
        "{text}"
    );
}

#[test]
fn virtual_service_tcp_routes_split_a_tcp_port_by_weight_and_leave_http_ports_alone() {
    let vs = virtual_service(
        "bookinfo",
        "ratings-tcp",
        "{hosts: [ratings], tcp: [{match: [{port: 3306}], route: [{destination: {host: ratings, subset: a}, weight: 80}, {destination: {host: ratings, subset: b}, weight: 20}]}]}",
    );
    let dr = destination_rule(
        "bookinfo",
        "ratings",
        "{host: ratings, subsets: [{name: a, labels: {app: ratings}}, {name: b, labels: {app: ratings}}]}",
    );
    let res = translate(&mesh(&[bookinfo_waypoint(), vs, dr].concat()));
    let ratings = bound(resource(&res, "bookinfo/waypoint"), "bookinfo", "ratings");
    let tcp: Vec<(String, u32)> = port(ratings, 3306)
        .tcp
        .iter()
        .map(|w| (w.cluster.clone(), w.weight))
        .collect();
    assert_eq!(tcp.len(), 2, "{tcp:?}");
    assert_eq!(cluster(ratings, &tcp[0].0).subset, "a");
    assert_eq!(cluster(ratings, &tcp[1].0).subset, "b");
    assert_eq!((tcp[0].1, tcp[1].1), (80, 20));
    // The HTTP port keeps its own cluster for TCP-level fallbacks and has no route from it.
    let http = port(ratings, 9080);
    assert_eq!(http.tcp.len(), 1);
    assert_eq!(http.tcp[0].cluster, http.default_cluster);
    // What is not supported, or missing, is refused naming the field.
    for (spec, field) in [
        ("{hosts: [ratings], tcp: [{match: [{destinationSubnets: [10.0.0.0/8]}], route: [{destination: {host: ratings}}]}]}", "istio[1].spec.tcp[0].match[0].destinationSubnets"),
        ("{hosts: [ratings], tcp: [{match: [{port: 3306}]}]}", "istio[1].spec.tcp[0].route"),
        ("{hosts: [ratings], tcp: [{route: [{destination: {host: nowhere}}]}]}", "istio[1].spec.tcp[0].route[0].destination.host"),
        ("{hosts: [ratings], tls: [{route: [{destination: {host: ratings}}]}]}", "istio[1].spec.tls"),
    ] {
        let err = try_mesh_with(
            BASE,
            &[bookinfo_waypoint(), virtual_service("bookinfo", "bad", spec)].concat(),
        )
        .map(|cfg| convert_istio(&cfg).and_then(|c| convert(&cfg, &c)).map(|_| ()))
        .map_or_else(|e| e.to_string(), |r| r.map_or_else(|e| e.to_string(), |()| String::new()));
        assert!(err.contains(field), "{spec}: {err}");
    }
}
