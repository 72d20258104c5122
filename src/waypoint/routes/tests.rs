//! Tests for HTTP routing: selection (every match kind), weighted backends, redirects and direct
//! responses, header operations in Envoy's order, rewrites, timeouts, retry defaults, refusals, and
//! path normalization.

use http::{Method, Request};

use super::*;
use crate::proto::waypoint::route::Action as PbAction;
use crate::proto::waypoint::string_match::Kind;

fn exact(v: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(Kind::Exact(v.into())),
    })
}

fn prefix(v: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(Kind::Prefix(v.into())),
    })
}

fn forward(backends: &[(&str, u32)]) -> Option<PbAction> {
    Some(PbAction::Forward(pb::Forward {
        backends: backends
            .iter()
            .map(|(c, w)| pb::WeightedCluster {
                cluster: (*c).into(),
                weight: *w,
            })
            .collect(),
    }))
}

fn route(name: &str, matches: Vec<pb::RouteMatch>, action: Option<PbAction>) -> pb::Route {
    pb::Route {
        name: name.into(),
        matches,
        action,
        ..Default::default()
    }
}

/// A route forwarding to cluster `name`.
fn to(name: &str, matches: Vec<pb::RouteMatch>) -> pb::Route {
    route(name, matches, forward(&[(name, 1)]))
}

fn path(m: Option<pb::StringMatch>) -> pb::RouteMatch {
    pb::RouteMatch {
        path: m,
        ..Default::default()
    }
}

fn header(name: &str, value: Option<pb::StringMatch>, invert: bool) -> pb::RouteMatch {
    pb::RouteMatch {
        headers: vec![pb::HeaderMatch {
            name: name.into(),
            value,
            invert,
        }],
        ..Default::default()
    }
}

fn table(routes: Vec<pb::Route>) -> RouteTable {
    RouteTable::new(&pb::Port {
        port: 9080,
        protocol: pb::Protocol::Http as i32,
        routes,
        tcp: vec![],
        default_cluster: "outbound|9080||reviews.default.svc.cluster.local".into(),
    })
    .unwrap_or_else(|e| panic!("table refused: {e}"))
}

fn refused(routes: Vec<pb::Route>) -> String {
    match RouteTable::new(&pb::Port {
        port: 9080,
        routes,
        default_cluster: "c".into(),
        ..Default::default()
    }) {
        Ok(_) => panic!("table accepted"),
        Err(e) => e.to_string(),
    }
}

/// Request parts for `method uri` with `headers`.
fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut b = Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn get(uri: &str) -> request::Parts {
    req("GET", uri, &[("host", "reviews:9080")])
}

/// The name of the route selected for `parts`, `None` for 404.
fn selected<'t>(t: &'t RouteTable, parts: &request::Parts) -> Option<&'t str> {
    t.select(parts).map(Route::name)
}

fn forwarded(r: &Route, roll: u32) -> &str {
    match r.action(&get("/"), roll) {
        Action::Forward(c) => c,
        other => panic!("not a forward: {other:?}"),
    }
}

fn only_route(routes: Vec<pb::Route>) -> RouteTable {
    table(routes)
}

fn location(a: Action<'_>) -> (StatusCode, String) {
    match a {
        Action::Redirect(r) => (
            r.status(),
            r.headers()[LOCATION].to_str().expect("location").to_owned(),
        ),
        other => panic!("not a redirect: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Selection.

#[test]
fn the_first_route_whose_match_fits_wins_and_no_fit_means_no_route() {
    let t = table(vec![
        to("api", vec![path(prefix("/api"))]),
        to("api-v2", vec![path(prefix("/api/v2"))]),
        to("health", vec![path(exact("/health"))]),
    ]);
    assert_eq!(
        selected(&t, &get("/api/v2/x")),
        Some("api"),
        "order, not specificity"
    );
    assert_eq!(selected(&t, &get("/health")), Some("health"));
    assert_eq!(selected(&t, &get("/other")), None);
}

#[test]
fn a_route_without_matches_catches_every_request() {
    let t = table(vec![
        to("login", vec![path(exact("/login"))]),
        to("rest", vec![]),
    ]);
    assert_eq!(
        selected(&t, &req("DELETE", "/anything?x=1", &[])),
        Some("rest")
    );
}

#[test]
fn a_port_without_routes_forwards_everything_to_its_default_cluster() {
    let t = table(vec![]);
    let r = t.select(&get("/x")).expect("catch-all");
    assert_eq!(r.name(), DEFAULT_ROUTE);
    assert_eq!(
        forwarded(r, 7),
        "outbound|9080||reviews.default.svc.cluster.local"
    );
    assert_eq!(r.retry(), &RetryPolicy::istio_default());
}

#[test]
fn a_port_without_routes_but_with_tcp_backends_splits_between_them() {
    let t = RouteTable::new(&pb::Port {
        port: 9080,
        tcp: vec![
            pb::WeightedCluster {
                cluster: "v1".into(),
                weight: 90,
            },
            pb::WeightedCluster {
                cluster: "v2".into(),
                weight: 10,
            },
        ],
        default_cluster: "all".into(),
        ..Default::default()
    })
    .expect("table");
    let r = t.select(&get("/")).expect("catch-all");
    assert_eq!(r.total_weight(), 100);
    assert_eq!(forwarded(r, 89), "v1");
    assert_eq!(forwarded(r, 90), "v2");
}

#[test]
fn a_port_with_nowhere_to_send_requests_is_refused() {
    let e = RouteTable::new(&pb::Port {
        port: 9080,
        ..Default::default()
    })
    .expect_err("no backend");
    assert_eq!(e, Error::NoBackend { port: 9080 });
}

#[test]
fn path_matches_ignore_the_query_and_prefix_is_a_plain_string_prefix() {
    let t = table(vec![
        to("exact", vec![path(exact("/reviews"))]),
        to("prefix", vec![path(prefix("/api"))]),
    ]);
    assert_eq!(selected(&t, &get("/reviews?id=1")), Some("exact"));
    assert_eq!(selected(&t, &get("/reviews/1")), None);
    assert_eq!(selected(&t, &get("/api")), Some("prefix"));
    assert_eq!(selected(&t, &get("/api/x")), Some("prefix"));
    assert_eq!(
        selected(&t, &get("/apix")),
        Some("prefix"),
        "Envoy prefix semantics"
    );
    assert_eq!(selected(&t, &get("/x?p=/api")), None);
    assert_eq!(selected(&t, &get("/API")), None, "case-sensitive");
}

#[test]
fn a_gateway_api_path_prefix_as_exact_or_slash_prefix_matches_whole_segments() {
    // How the control plane emits HTTPRoute `PathPrefix: /api`.
    let t = table(vec![to(
        "api",
        vec![path(exact("/api")), path(prefix("/api/"))],
    )]);
    assert_eq!(selected(&t, &get("/api")), Some("api"));
    assert_eq!(selected(&t, &get("/api/x")), Some("api"));
    assert_eq!(selected(&t, &get("/apix")), None);
}

#[test]
fn header_matches_take_exact_prefix_and_presence() {
    let t = table(vec![
        to("jason", vec![header("end-user", exact("jason"), false)]),
        to("canary", vec![header("x-canary", prefix("yes"), false)]),
        to("debug", vec![header("x-debug", None, false)]),
    ]);
    let with = |n, v| req("GET", "/", &[(n, v)]);
    assert_eq!(selected(&t, &with("end-user", "jason")), Some("jason"));
    assert_eq!(selected(&t, &with("end-user", "Jason")), None);
    assert_eq!(
        selected(&t, &with("x-canary", "yes-please")),
        Some("canary")
    );
    assert_eq!(selected(&t, &with("x-debug", "")), Some("debug"));
    assert_eq!(selected(&t, &get("/")), None);
}

#[test]
fn a_repeated_header_matches_as_its_values_joined_with_commas() {
    let t = table(vec![to("both", vec![header("x-tag", exact("a,b"), false)])]);
    let parts = req("GET", "/", &[("x-tag", "a"), ("x-tag", "b")]);
    assert_eq!(selected(&t, &parts), Some("both"));
    assert_eq!(selected(&t, &req("GET", "/", &[("x-tag", "a")])), None);
}

#[test]
fn an_inverted_header_match_fits_requests_without_the_header() {
    let t = table(vec![
        to("not-jason", vec![header("end-user", exact("jason"), true)]),
        to("rest", vec![]),
    ]);
    assert_eq!(
        selected(&t, &get("/")),
        Some("not-jason"),
        "absent compares as empty"
    );
    assert_eq!(
        selected(&t, &req("GET", "/", &[("end-user", "mike")])),
        Some("not-jason")
    );
    assert_eq!(
        selected(&t, &req("GET", "/", &[("end-user", "jason")])),
        Some("rest")
    );
    let absent = table(vec![
        to("no-debug", vec![header("x-debug", None, true)]),
        to("rest", vec![]),
    ]);
    assert_eq!(selected(&absent, &get("/")), Some("no-debug"));
    assert_eq!(
        selected(&absent, &req("GET", "/", &[("x-debug", "1")])),
        Some("rest")
    );
}

#[test]
fn pseudo_header_matches_read_the_request_line() {
    let t = table(vec![
        to(
            "authority",
            vec![header(":authority", prefix("ratings"), false)],
        ),
        to("scheme", vec![header(":scheme", exact("https"), false)]),
        to("method", vec![header(":method", exact("PUT"), false)]),
        to("path", vec![header(":path", exact("/p?q=1"), false)]),
    ]);
    // HTTP/1.1: the Host header; HTTP/2: the URI's authority.
    assert_eq!(
        selected(&t, &req("GET", "/", &[("host", "ratings:9080")])),
        Some("authority")
    );
    let h2 = Request::builder()
        .uri("http://ratings.default:9080/")
        .version(http::Version::HTTP_2)
        .body(())
        .expect("request")
        .into_parts()
        .0;
    assert_eq!(selected(&t, &h2), Some("authority"));
    assert_eq!(selected(&t, &req("GET", "https://x/", &[])), Some("scheme"));
    assert_eq!(selected(&t, &req("PUT", "/", &[])), Some("method"));
    assert_eq!(selected(&t, &req("GET", "/p?q=1", &[])), Some("path"));
    assert_eq!(selected(&t, &req("GET", "/p?q=2", &[])), None);
}

#[test]
fn method_matches_are_exact() {
    let t = table(vec![to(
        "posts",
        vec![pb::RouteMatch {
            method: "POST".into(),
            ..Default::default()
        }],
    )]);
    assert_eq!(selected(&t, &req("POST", "/", &[])), Some("posts"));
    assert_eq!(selected(&t, &req("GET", "/", &[])), None);
    assert_eq!(selected(&t, &req("post", "/", &[])), None);
}

#[test]
fn query_parameter_matches_use_the_first_decoded_value() {
    let q = |name: &str, value| pb::RouteMatch {
        query_params: vec![pb::QueryMatch {
            name: name.into(),
            value,
        }],
        ..Default::default()
    };
    let t = table(vec![
        to("v2", vec![q("version", exact("v 2"))]),
        to("beta", vec![q("channel", prefix("beta"))]),
        to("debug", vec![q("debug", None)]),
    ]);
    assert_eq!(selected(&t, &get("/?a=1&version=v%202")), Some("v2"));
    assert_eq!(
        selected(&t, &get("/?version=v1&version=v%202")),
        None,
        "first value"
    );
    assert_eq!(
        selected(&t, &get("/?ver%73ion=v%202")),
        Some("v2"),
        "decoded name"
    );
    assert_eq!(selected(&t, &get("/?channel=beta-3")), Some("beta"));
    assert_eq!(selected(&t, &get("/?debug")), Some("debug"));
    assert_eq!(selected(&t, &get("/?debugger=1")), None);
    assert_eq!(selected(&t, &get("/")), None);
}

#[test]
fn the_fields_of_a_match_are_anded_and_matches_ored() {
    let t = table(vec![to(
        "r",
        vec![
            pb::RouteMatch {
                path: prefix("/api"),
                method: "GET".into(),
                headers: vec![pb::HeaderMatch {
                    name: "x-user".into(),
                    value: None,
                    invert: false,
                }],
                query_params: vec![],
                ..Default::default()
            },
            path(exact("/login")),
        ],
    )]);
    assert_eq!(
        selected(&t, &req("GET", "/api/x", &[("x-user", "a")])),
        Some("r")
    );
    assert_eq!(selected(&t, &req("GET", "/api/x", &[])), None);
    assert_eq!(
        selected(&t, &req("PUT", "/api/x", &[("x-user", "a")])),
        None
    );
    assert_eq!(selected(&t, &req("PUT", "/login", &[])), Some("r"));
}

// ---------------------------------------------------------------------------------------------
// Actions.

#[test]
fn a_80_20_split_sends_80_percent_of_rolls_to_v1() {
    let t = only_route(vec![route(
        "reviews",
        vec![],
        forward(&[("reviews-v1", 80), ("reviews-v2", 20)]),
    )]);
    let r = t.select(&get("/")).expect("route");
    assert_eq!(r.total_weight(), 100);
    let v1 = (0..100)
        .filter(|roll| forwarded(r, *roll) == "reviews-v1")
        .count();
    assert_eq!(v1, 80);
    assert_eq!(forwarded(r, 79), "reviews-v1");
    assert_eq!(forwarded(r, 80), "reviews-v2");
    assert_eq!(forwarded(r, 99), "reviews-v2");
    // A roll past the total is taken modulo the total.
    assert_eq!(forwarded(r, 100), "reviews-v1");
    assert_eq!(forwarded(r, u32::MAX), forwarded(r, u32::MAX % 100));
}

#[test]
fn a_backend_with_weight_zero_never_gets_a_request() {
    let t = only_route(vec![route(
        "r",
        vec![],
        forward(&[("off", 0), ("on", 3), ("also-off", 0)]),
    )]);
    let r = t.select(&get("/")).expect("route");
    assert!((0..30).all(|roll| forwarded(r, roll) == "on"));
}

#[test]
fn all_zero_weights_or_no_backends_answer_500() {
    for backends in [&[("a", 0), ("b", 0)][..], &[][..]] {
        let t = only_route(vec![route("r", vec![], forward(backends))]);
        let r = t.select(&get("/")).expect("route");
        assert_eq!(r.total_weight(), 0);
        match r.action(&get("/"), 0) {
            Action::Direct { status, body } => {
                assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
                assert_eq!(body, "");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_direct_response_answers_its_status_and_body() {
    let t = only_route(vec![route(
        "maintenance",
        vec![],
        Some(PbAction::DirectResponse(pb::DirectResponse {
            status: 503,
            body: "down for maintenance".into(),
        })),
    )]);
    match t.select(&get("/")).expect("route").action(&get("/"), 0) {
        Action::Direct { status, body } => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body, "down for maintenance");
        }
        other => panic!("{other:?}"),
    }
}

fn redirect(r: pb::Redirect) -> RouteTable {
    only_route(vec![route("redirect", vec![], Some(PbAction::Redirect(r)))])
}

fn redirect_for(t: &RouteTable, parts: &request::Parts) -> (StatusCode, String) {
    location(t.select(parts).expect("route").action(parts, 0))
}

#[test]
fn a_redirect_without_changes_is_a_301_to_the_same_url() {
    let t = redirect(pb::Redirect::default());
    assert_eq!(
        redirect_for(&t, &get("/a?b=c")),
        (
            StatusCode::MOVED_PERMANENTLY,
            "http://reviews:9080/a?b=c".into()
        )
    );
}

#[test]
fn a_redirect_replaces_path_and_keeps_the_query_unless_the_path_has_one() {
    let t = redirect(pb::Redirect {
        path: "/v2/reviews".into(),
        status: 302,
        ..Default::default()
    });
    assert_eq!(
        redirect_for(&t, &get("/reviews?id=1")),
        (
            StatusCode::FOUND,
            "http://reviews:9080/v2/reviews?id=1".into()
        )
    );
    let with_query = redirect(pb::Redirect {
        path: "/v2?x=1".into(),
        ..Default::default()
    });
    assert_eq!(
        redirect_for(&with_query, &get("/old?id=1")).1,
        "http://reviews:9080/v2?x=1"
    );
}

#[test]
fn a_redirect_to_https_drops_the_old_port_and_a_well_known_one() {
    let https = redirect(pb::Redirect {
        scheme: "https".into(),
        ..Default::default()
    });
    assert_eq!(redirect_for(&https, &get("/x")).1, "https://reviews/x");
    let port = redirect(pb::Redirect {
        scheme: "https".into(),
        port: 8443,
        ..Default::default()
    });
    assert_eq!(redirect_for(&port, &get("/x")).1, "https://reviews:8443/x");
    let well_known = redirect(pb::Redirect {
        port: 80,
        ..Default::default()
    });
    assert_eq!(redirect_for(&well_known, &get("/x")).1, "http://reviews/x");
}

#[test]
fn a_redirect_to_another_host_keeps_the_request_port() {
    let t = redirect(pb::Redirect {
        host: "ratings.default.svc.cluster.local".into(),
        status: 308,
        ..Default::default()
    });
    assert_eq!(
        redirect_for(&t, &get("/r")),
        (
            StatusCode::PERMANENT_REDIRECT,
            "http://ratings.default.svc.cluster.local:9080/r".into()
        )
    );
    let v6 = req("GET", "/r", &[("host", "[fd00::1]:9080")]);
    assert_eq!(
        redirect_for(&redirect(pb::Redirect::default()), &v6).1,
        "http://[fd00::1]:9080/r"
    );
}

// ---------------------------------------------------------------------------------------------
// Transformations.

fn header_ops(
    set: &[(&str, &str)],
    add: &[(&str, &str)],
    remove: &[&str],
) -> Option<pb::HeaderOps> {
    let h = |l: &[(&str, &str)]| {
        l.iter()
            .map(|(n, v)| pb::Header {
                name: (*n).into(),
                value: (*v).into(),
            })
            .collect()
    };
    Some(pb::HeaderOps {
        set: h(set),
        add: h(add),
        remove: remove.iter().map(|s| s.to_string()).collect(),
    })
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

#[test]
fn request_header_operations_remove_then_set_then_add() {
    let mut r = to("r", vec![]);
    r.request_headers = header_ops(
        &[("x-set", "new"), ("x-both", "set")],
        &[
            ("x-add", "added"),
            ("x-both", "added"),
            ("x-removed", "again"),
        ],
        &["x-removed", "x-both"],
    );
    let t = only_route(vec![r]);
    let mut parts = req(
        "GET",
        "/",
        &[
            ("x-set", "old1"),
            ("x-set", "old2"),
            ("x-add", "kept"),
            ("x-removed", "gone"),
            ("x-both", "gone"),
        ],
    );
    t.select(&parts.clone())
        .expect("route")
        .apply_request(&mut parts);
    assert_eq!(
        values(&parts.headers, "x-set"),
        ["new"],
        "set overwrites every value"
    );
    assert_eq!(
        values(&parts.headers, "x-add"),
        ["kept", "added"],
        "add appends"
    );
    assert_eq!(
        values(&parts.headers, "x-removed"),
        ["again"],
        "remove runs before add"
    );
    assert_eq!(
        values(&parts.headers, "x-both"),
        ["set", "added"],
        "remove, set, add"
    );
}

#[test]
fn response_header_operations_remove_then_set_then_add() {
    let mut r = to("r", vec![]);
    r.response_headers = header_ops(
        &[("cache-control", "no-store")],
        &[("x-served-by", "waypoint")],
        &["server"],
    );
    let t = only_route(vec![r]);
    let mut resp = http::Response::builder()
        .header("server", "envoy")
        .header("cache-control", "max-age=60")
        .header("x-served-by", "app")
        .body(())
        .expect("response")
        .into_parts()
        .0;
    t.routes()[0].apply_response(&mut resp);
    assert!(resp.headers.get("server").is_none());
    assert_eq!(values(&resp.headers, "cache-control"), ["no-store"]);
    assert_eq!(values(&resp.headers, "x-served-by"), ["app", "waypoint"]);
}

#[test]
fn the_authority_rewrite_changes_host_for_http1_and_authority_for_http2() {
    let mut r = to("r", vec![]);
    r.rewrite = Some(pb::Rewrite {
        authority: "ratings.default:9080".into(),
        ..Default::default()
    });
    let t = only_route(vec![r]);
    let route = &t.routes()[0];
    let mut h1 = get("/x");
    route.apply_request(&mut h1);
    assert_eq!(values(&h1.headers, "host"), ["ratings.default:9080"]);
    assert_eq!(h1.uri, "/x");
    let mut h2 = req("GET", "http://reviews:9080/x", &[]);
    route.apply_request(&mut h2);
    assert_eq!(h2.uri, "http://ratings.default:9080/x");
    assert!(
        h2.headers.get("host").is_none(),
        "no Host added next to :authority"
    );
}

#[test]
fn setting_the_host_header_rewrites_the_authority_and_an_explicit_rewrite_wins() {
    let mut r = to("r", vec![]);
    r.request_headers = header_ops(&[("Host", "from-set")], &[], &["host"]);
    let t = only_route(vec![r.clone()]);
    let mut parts = get("/");
    t.routes()[0].apply_request(&mut parts);
    assert_eq!(
        values(&parts.headers, "host"),
        ["from-set"],
        "removing host is ignored"
    );

    r.rewrite = Some(pb::Rewrite {
        authority: "from-rewrite".into(),
        ..Default::default()
    });
    let t = only_route(vec![r]);
    let mut parts = get("/");
    t.routes()[0].apply_request(&mut parts);
    assert_eq!(values(&parts.headers, "host"), ["from-rewrite"]);
}

fn rewritten(r: pb::Route, uri: &str, headers: &[(&str, &str)]) -> String {
    let t = only_route(vec![r]);
    let mut parts = req("GET", uri, headers);
    let route = t.select(&parts).expect("route");
    route.apply_request(&mut parts);
    parts.uri.to_string()
}

fn with_rewrite(mut r: pb::Route, path_prefix: &str) -> pb::Route {
    r.rewrite = Some(pb::Rewrite {
        path_prefix: path_prefix.into(),
        ..Default::default()
    });
    r
}

#[test]
fn a_path_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
    let r = with_rewrite(to("r", vec![path(prefix("/api/v1"))]), "/v2");
    assert_eq!(
        rewritten(r.clone(), "/api/v1/books?id=3", &[]),
        "/v2/books?id=3"
    );
    assert_eq!(rewritten(r, "/api/v1", &[]), "/v2");
}

#[test]
fn a_path_rewrite_after_an_exact_match_replaces_the_whole_path() {
    let r = with_rewrite(to("r", vec![path(exact("/login"))]), "/auth/login");
    assert_eq!(rewritten(r, "/login?next=/", &[]), "/auth/login?next=/");
}

#[test]
fn a_path_rewrite_without_a_path_match_replaces_the_leading_slash() {
    // Istio gives such a route Envoy's `prefix: "/"`: "/books" with "/v2/" becomes "/v2/books".
    let r = with_rewrite(to("r", vec![header("x-v2", None, false)]), "/v2/");
    assert_eq!(rewritten(r, "/books", &[("x-v2", "1")]), "/v2/books");
}

#[test]
fn the_match_that_fitted_decides_the_rewritten_prefix_even_if_header_ops_change_it() {
    let mut r = to(
        "r",
        vec![
            pb::RouteMatch {
                path: prefix("/old/"),
                headers: vec![pb::HeaderMatch {
                    name: "x-legacy".into(),
                    value: None,
                    invert: false,
                }],
                ..Default::default()
            },
            path(prefix("/")),
        ],
    );
    r.request_headers = header_ops(&[], &[], &["x-legacy"]);
    let r = with_rewrite(r, "/new/");
    assert_eq!(
        rewritten(r.clone(), "/old/page", &[("x-legacy", "1")]),
        "/new/page"
    );
    assert_eq!(rewritten(r, "/old/page", &[]), "/new/old/page");
}

#[test]
fn a_gateway_api_prefix_rewrite_emitted_as_two_routes_keeps_segments() {
    // HTTPRoute PathPrefix /api + ReplacePrefixMatch /v2, as the control plane emits it.
    let routes = vec![
        with_rewrite(to("exact", vec![path(exact("/api"))]), "/v2"),
        with_rewrite(to("segments", vec![path(prefix("/api/"))]), "/v2/"),
    ];
    let t = only_route(routes);
    for (from, want) in [("/api", "/v2"), ("/api/x?y", "/v2/x?y"), ("/api/", "/v2/")] {
        let mut parts = get(from);
        t.select(&parts).expect("route").apply_request(&mut parts);
        assert_eq!(parts.uri, want, "{from}");
    }
    assert!(t.select(&get("/apix")).is_none());
}

fn segments(p: &str) -> pb::RouteMatch {
    pb::RouteMatch {
        path: prefix(p),
        path_segment_prefix: true,
        ..Default::default()
    }
}

#[test]
fn a_segment_prefix_matches_whole_path_segments_only() {
    let t = only_route(vec![to("api", vec![segments("/api")])]);
    for hit in ["/api", "/api/", "/api/v1", "/api?x=1"] {
        assert_eq!(selected(&t, &get(hit)), Some("api"), "{hit}");
    }
    for miss in ["/apiv1", "/ap", "/"] {
        assert_eq!(selected(&t, &get(miss)), None, "{miss}");
    }
    // A trailing slash in the prefix is the same segment prefix; `/` matches everything.
    let t = only_route(vec![to("api", vec![segments("/api/")])]);
    assert_eq!(selected(&t, &get("/api")), Some("api"));
    let t = only_route(vec![to("all", vec![segments("/")])]);
    assert_eq!(selected(&t, &get("/anything")), Some("all"));
}

#[test]
fn a_segment_prefix_rewrite_joins_the_rest_with_one_slash() {
    // Gateway API ReplacePrefixMatch: /api → /v2 and /api → /.
    let r = with_rewrite(to("r", vec![segments("/api")]), "/v2");
    for (from, want) in [
        ("/api", "/v2"),
        ("/api/x?y=1", "/v2/x?y=1"),
        ("/api/", "/v2/"),
    ] {
        assert_eq!(rewritten(r.clone(), from, &[]), want, "{from}");
    }
    let r = with_rewrite(to("r", vec![segments("/api")]), "/");
    for (from, want) in [("/api", "/"), ("/api/x", "/x"), ("/api/x/", "/x/")] {
        assert_eq!(rewritten(r.clone(), from, &[]), want, "{from}");
    }
}

#[test]
fn a_full_path_rewrite_replaces_the_whole_path_and_keeps_the_query() {
    let mut r = to("r", vec![segments("/api")]);
    r.rewrite = Some(pb::Rewrite {
        full_path: "/v2/index".into(),
        path_prefix: "/ignored".into(),
        ..Default::default()
    });
    assert_eq!(rewritten(r, "/api/x/y?q=1", &[]), "/v2/index?q=1");
}

#[test]
fn a_redirect_with_a_prefix_replaces_the_matched_segments() {
    let mut r = route(
        "r",
        vec![segments("/old")],
        Some(PbAction::Redirect(pb::Redirect {
            path_prefix: "/new".into(),
            status: 302,
            ..Default::default()
        })),
    );
    let t = only_route(vec![r.clone()]);
    assert_eq!(
        redirect_for(&t, &req("GET", "/old/page?x=1", &[("host", "shop")])),
        (StatusCode::FOUND, "http://shop/new/page?x=1".into())
    );
    // A whole-path redirect wins over the prefix.
    if let Some(PbAction::Redirect(rd)) = &mut r.action {
        rd.path = "/elsewhere".into();
    }
    let t = only_route(vec![r]);
    assert_eq!(
        redirect_for(&t, &req("GET", "/old/page", &[("host", "shop")])),
        (StatusCode::FOUND, "http://shop/elsewhere".into())
    );
}

#[test]
fn bad_full_path_and_redirect_prefixes_are_refused() {
    let mut r = to("r", vec![]);
    r.rewrite = Some(pb::Rewrite {
        full_path: "no-slash".into(),
        ..Default::default()
    });
    assert!(refused(vec![r]).contains("rewrite.full_path"));
    let r = route(
        "r",
        vec![],
        Some(PbAction::Redirect(pb::Redirect {
            path_prefix: "/a?b".into(),
            ..Default::default()
        })),
    );
    assert!(refused(vec![r]).contains("redirect.path_prefix"));
}

// ---------------------------------------------------------------------------------------------
// Timeouts and retries.

fn dur(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn with_retries(retries: Option<pb::RetryPolicy>) -> RetryPolicy {
    let mut r = to("r", vec![]);
    r.retries = retries;
    only_route(vec![r]).routes()[0].retry().clone()
}

#[test]
fn a_route_has_no_timeout_unless_one_is_set() {
    let mut r = to("r", vec![]);
    assert_eq!(only_route(vec![r.clone()]).routes()[0].timeout(), None);
    r.timeout = dur(0, 0);
    assert_eq!(
        only_route(vec![r.clone()]).routes()[0].timeout(),
        None,
        "zero: none"
    );
    r.timeout = dur(1, 500_000_000);
    assert_eq!(
        only_route(vec![r]).routes()[0].timeout(),
        Some(Duration::from_millis(1500))
    );
}

#[test]
fn without_a_retry_policy_istio_retries_twice_on_connect_failure_and_503() {
    let p = with_retries(None);
    assert_eq!(p.attempts, 2);
    assert_eq!(p.per_try_timeout, None);
    assert!(p.on_connect_failure && p.on_refused_stream && p.on_unavailable && p.on_cancelled);
    assert!(!p.on_reset && !p.on_5xx && !p.on_gateway_error);
    assert_eq!(p.retriable_status_codes, [503]);
    assert!(p.retries_status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!p.retries_status(StatusCode::BAD_GATEWAY));
    assert!(!p.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
    assert!(p.retries_connect_failure());
    assert!(p.retries_refused_stream());
    assert!(!p.retries_reset());
    assert!(p.retries_grpc_status(14) && p.retries_grpc_status(1));
    assert!(!p.retries_grpc_status(4));
}

#[test]
fn zero_attempts_turn_retries_off() {
    let p = with_retries(Some(pb::RetryPolicy {
        attempts: 0,
        retry_on: vec!["5xx".into()],
        ..Default::default()
    }));
    assert_eq!(p, RetryPolicy::none());
    assert!(!p.retries_status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!p.retries_connect_failure());
}

#[test]
fn attempts_without_conditions_keep_istios_default_conditions() {
    let p = with_retries(Some(pb::RetryPolicy {
        attempts: 5,
        per_try_timeout: dur(2, 0),
        ..Default::default()
    }));
    assert_eq!(
        p,
        RetryPolicy {
            attempts: 5,
            per_try_timeout: Some(Duration::from_secs(2)),
            ..RetryPolicy::istio_default()
        }
    );
}

#[test]
fn given_conditions_replace_the_defaults() {
    let p = with_retries(Some(pb::RetryPolicy {
        attempts: 3,
        retry_on: vec![
            "gateway-error,reset".into(),
            "429".into(),
            "retriable-4xx".into(),
        ],
        retriable_status_codes: vec![418],
        ..Default::default()
    }));
    assert_eq!(p.attempts, 3);
    assert!(p.on_gateway_error && p.on_reset);
    assert!(!p.on_connect_failure && !p.on_unavailable && !p.on_5xx);
    assert_eq!(p.retriable_status_codes, [409, 418, 429]);
    assert!(p.retries_status(StatusCode::GATEWAY_TIMEOUT));
    assert!(p.retries_status(StatusCode::TOO_MANY_REQUESTS));
    assert!(!p.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
    assert!(
        p.retries_connect_failure(),
        "gateway-error covers connect failures"
    );
    assert!(p.retries_reset());
    assert!(!p.retries_grpc_status(14));
}

#[test]
fn retry_on_5xx_covers_every_server_error_and_no_response() {
    let p = with_retries(Some(pb::RetryPolicy {
        attempts: 1,
        retry_on: vec!["5xx".into()],
        ..Default::default()
    }));
    assert!(p.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
    assert!(p.retries_status(StatusCode::from_u16(599).expect("status")));
    assert!(!p.retries_status(StatusCode::NOT_FOUND));
    assert!(p.retries_connect_failure() && p.retries_reset() && p.retries_refused_stream());
    assert!(p.retriable_status_codes.is_empty());
}

#[test]
fn status_codes_alone_retry_only_those_codes() {
    let p = with_retries(Some(pb::RetryPolicy {
        attempts: 2,
        retriable_status_codes: vec![502],
        ..Default::default()
    }));
    assert!(p.retries_status(StatusCode::BAD_GATEWAY));
    assert!(!p.retries_status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!p.retries_connect_failure());
}

#[test]
fn an_unsupported_retry_condition_is_refused() {
    let mut r = to("ns/vs.0", vec![]);
    r.retries = Some(pb::RetryPolicy {
        attempts: 2,
        retry_on: vec!["deadline-exceeded".into()],
        ..Default::default()
    });
    assert_eq!(
        refused(vec![r]),
        "route ns/vs.0: retries.retry_on: \"deadline-exceeded\" is not supported"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals.

#[test]
fn unusable_routes_are_refused_naming_the_route_and_field() {
    assert_eq!(
        refused(vec![route("", vec![], None)]),
        "route routes[0]: no action (forward, redirect or direct response)"
    );
    assert_eq!(
        refused(vec![
            to("ok", vec![]),
            route("r", vec![], forward(&[("", 1)]))
        ]),
        "route r: backends[0] names no cluster"
    );
    assert!(refused(vec![route(
        "r",
        vec![],
        forward(&[("a", u32::MAX), ("b", 1)])
    )])
    .contains("weights add up"));

    let mut bad_name = to("r", vec![]);
    bad_name.request_headers = header_ops(&[("bad name", "x")], &[], &[]);
    assert!(refused(vec![bad_name]).contains("request_headers.set: \"bad name\""));
    let mut pseudo = to("r", vec![]);
    pseudo.request_headers = header_ops(&[], &[(":path", "/x")], &[]);
    assert!(refused(vec![pseudo]).contains("request_headers.add: \":path\""));
    let mut bad_value = to("r", vec![]);
    bad_value.response_headers = header_ops(&[("x", "a\nb")], &[], &[]);
    assert!(refused(vec![bad_value]).contains("the value of \"x\""));
    let bad_match = to("r", vec![header("a b", None, false)]);
    assert!(refused(vec![bad_match]).contains("matches.headers"));

    let bad_redirect = route(
        "r",
        vec![],
        Some(PbAction::Redirect(pb::Redirect {
            status: 200,
            ..Default::default()
        })),
    );
    assert!(refused(vec![bad_redirect]).contains("redirect.status: status 200"));
    let bad_port = route(
        "r",
        vec![],
        Some(PbAction::Redirect(pb::Redirect {
            port: 70000,
            ..Default::default()
        })),
    );
    assert!(refused(vec![bad_port]).contains("redirect.port"));
    let bad_direct = route(
        "r",
        vec![],
        Some(PbAction::DirectResponse(pb::DirectResponse {
            status: 42,
            body: String::new(),
        })),
    );
    assert!(refused(vec![bad_direct]).contains("direct_response.status: status 42"));

    let mut negative = to("r", vec![]);
    negative.timeout = dur(-1, 0);
    assert_eq!(
        refused(vec![negative]),
        "route r: timeout: invalid duration"
    );
    let bad_rewrite = with_rewrite(to("r", vec![]), "/a?b");
    assert!(refused(vec![bad_rewrite]).contains("rewrite.path_prefix"));
}

// ---------------------------------------------------------------------------------------------
// Path normalization.

#[test]
fn normalize_path_resolves_dot_segments_like_envoy() {
    let n = |p| normalize_path(p).map(Cow::into_owned);
    assert_eq!(n("/a/b/c/./../../g"), Some("/a/g".into()));
    assert_eq!(n("/admin/../public"), Some("/public".into()));
    assert_eq!(
        n("/public/../admin?x=/../y"),
        Some("/admin?x=/../y".into()),
        "query untouched"
    );
    assert_eq!(n("/./admin"), Some("/admin".into()));
    assert_eq!(n("/%2e%2E/admin"), Some("/admin".into()));
    assert_eq!(n("/a/%2e/b"), Some("/a/b".into()));
    assert_eq!(n("/a/b/.."), Some("/a/".into()));
    assert_eq!(n("/.."), Some("/".into()));
    assert_eq!(n("/a//b"), Some("/a//b".into()), "slashes are not merged");
    assert_eq!(n("/a..b/.c"), Some("/a..b/.c".into()));
    assert_eq!(n("relative"), None);
    assert!(matches!(normalize_path("/plain?q"), Some(Cow::Borrowed(_))));
}

#[test]
fn method_of_a_request_is_compared_as_sent() {
    // Extension methods are matched like any other.
    let t = table(vec![to(
        "purge",
        vec![pb::RouteMatch {
            method: "PURGE".into(),
            ..Default::default()
        }],
    )]);
    let parts = req(
        Method::from_bytes(b"PURGE").expect("method").as_str(),
        "/",
        &[],
    );
    assert_eq!(selected(&t, &parts), Some("purge"));
}
