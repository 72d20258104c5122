//! Tests for L7 authorization: one behaviour per test, every field and `not_` form, Istio's empty-rule
//! semantics, dry run, the fail-safe handling of unknown keys, and refusals.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::proto::waypoint::{Action as PbAction, AuthorizationPolicy, Condition as PbCondition};

const SLEEP: &str = "spiffe://cluster.local/ns/test/sa/sleep";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn policy(name: &str, action: PbAction, rules: Vec<pb::Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: name.into(),
        namespace: "default".into(),
        action: action as i32,
        rules,
        dry_run: false,
    }
}

fn allow(name: &str, rules: Vec<pb::Rule>) -> AuthorizationPolicy {
    policy(name, PbAction::Allow, rules)
}

fn deny(name: &str, rules: Vec<pb::Rule>) -> AuthorizationPolicy {
    policy(name, PbAction::Deny, rules)
}

fn dry_run(mut p: AuthorizationPolicy) -> AuthorizationPolicy {
    p.dry_run = true;
    p
}

fn rule_to(op: pb::Operation) -> pb::Rule {
    pb::Rule {
        to: vec![op],
        ..Default::default()
    }
}

fn rule_from(src: pb::Source) -> pb::Rule {
    pb::Rule {
        from: vec![src],
        ..Default::default()
    }
}

fn rule_when(conditions: Vec<PbCondition>) -> pb::Rule {
    pb::Rule {
        when: conditions,
        ..Default::default()
    }
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> PbCondition {
    PbCondition {
        key: key.into(),
        values: strings(values),
        not_values: strings(not_values),
    }
}

fn authorizer(policies: &[AuthorizationPolicy]) -> Authorizer {
    Authorizer::new(policies).unwrap_or_else(|e| panic!("policies refused: {e}"))
}

/// A request in test-friendly form; `Req::get("/")` is a GET from test/sleep to 10.96.0.10:9080.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
    principal: Option<&'static str>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl Req {
    fn new(method: &'static str, path: &'static str) -> Req {
        Req {
            method,
            path,
            host: "reviews:9080",
            headers: HeaderMap::new(),
            principal: Some(SLEEP),
            source_ip: "10.0.0.5".parse().expect("ip"),
            destination_ip: "10.96.0.10".parse().expect("ip"),
            destination_port: 9080,
        }
    }

    fn get(path: &'static str) -> Req {
        Req::new("GET", path)
    }

    fn from(mut self, principal: Option<&'static str>) -> Req {
        self.principal = principal;
        self
    }

    fn host(mut self, host: &'static str) -> Req {
        self.host = host;
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }

    fn source(mut self, ip: &str) -> Req {
        self.source_ip = ip.parse().expect("ip");
        self
    }

    fn destination(mut self, ip: &str, port: u16) -> Req {
        self.destination_ip = ip.parse().expect("ip");
        self.destination_port = port;
        self
    }

    fn check(&self, a: &Authorizer) -> Decision {
        a.check(&Request {
            method: self.method,
            path: self.path,
            host: self.host,
            headers: &self.headers,
            source_principal: self.principal,
            source_ip: self.source_ip,
            destination_ip: self.destination_ip,
            destination_port: self.destination_port,
        })
    }

    fn allowed(&self, a: &Authorizer) -> bool {
        self.check(a).is_allow()
    }
}

fn denied_by(policy: &str) -> Decision {
    Decision::Deny {
        policy: policy.into(),
    }
}

fn no_allow_match() -> Decision {
    denied_by("")
}

/// An ALLOW policy with one operation built by `f`.
fn allow_op(f: impl FnOnce(&mut pb::Operation)) -> Authorizer {
    let mut op = pb::Operation::default();
    f(&mut op);
    authorizer(&[allow("op", vec![rule_to(op)])])
}

/// An ALLOW policy with one source built by `f`.
fn allow_src(f: impl FnOnce(&mut pb::Source)) -> Authorizer {
    let mut src = pb::Source::default();
    f(&mut src);
    authorizer(&[allow("src", vec![rule_from(src)])])
}

/// An ALLOW policy with one condition.
fn allow_when(key: &str, values: &[&str], not_values: &[&str]) -> Authorizer {
    authorizer(&[allow(
        "when",
        vec![rule_when(vec![when(key, values, not_values)])],
    )])
}

// ---------------------------------------------------------------------------------------------
// Evaluation order and Istio's empty-rule semantics.

#[test]
fn without_policies_every_request_is_allowed() {
    let a = authorizer(&[]);
    assert!(a.is_empty());
    assert_eq!(
        Req::new("DELETE", "/admin").from(None).check(&a),
        Decision::Allow
    );
}

#[test]
fn get_is_allowed_and_post_gets_denied_by_a_methods_policy() {
    // The tutorial's policy: GET and HEAD from test/sleep only.
    let a = authorizer(&[allow(
        "reviews-viewer",
        vec![pb::Rule {
            from: vec![pb::Source {
                principals: strings(&["cluster.local/ns/test/sa/sleep"]),
                ..Default::default()
            }],
            to: vec![pb::Operation {
                methods: strings(&["GET", "HEAD"]),
                ..Default::default()
            }],
            when: vec![],
        }],
    )]);
    assert_eq!(Req::get("/reviews/1").check(&a), Decision::Allow);
    assert_eq!(Req::new("HEAD", "/reviews/1").check(&a), Decision::Allow);
    assert_eq!(Req::new("POST", "/reviews/1").check(&a), no_allow_match());
    assert_eq!(
        Req::get("/reviews/1").from(Some(PRODUCTPAGE)).check(&a),
        no_allow_match()
    );
}

#[test]
fn a_matching_deny_policy_wins_over_a_matching_allow_policy_and_is_named() {
    let a = authorizer(&[
        allow("all", vec![pb::Rule::default()]),
        deny(
            "no-admin",
            vec![rule_to(pb::Operation {
                paths: strings(&["/admin*"]),
                ..Default::default()
            })],
        ),
        deny(
            "no-delete",
            vec![rule_to(pb::Operation {
                methods: strings(&["DELETE"]),
                ..Default::default()
            })],
        ),
    ]);
    assert_eq!(
        Req::get("/admin/x").check(&a),
        denied_by("default/no-admin")
    );
    assert_eq!(
        Req::new("DELETE", "/admin").check(&a),
        denied_by("default/no-admin")
    );
    assert_eq!(
        Req::new("DELETE", "/x").check(&a),
        denied_by("default/no-delete")
    );
    assert_eq!(Req::get("/x").check(&a), Decision::Allow);
}

#[test]
fn an_allow_policy_without_rules_allows_nothing() {
    let a = authorizer(&[allow("allow-nothing", vec![])]);
    assert!(!a.is_empty());
    assert_eq!(Req::get("/").check(&a), no_allow_match());
}

#[test]
fn a_deny_policy_without_rules_denies_nothing() {
    let a = authorizer(&[deny("deny-nothing", vec![])]);
    assert_eq!(Req::get("/").check(&a), Decision::Allow);
}

#[test]
fn a_rule_without_fields_matches_every_request() {
    let allow_all = authorizer(&[allow("allow-all", vec![pb::Rule::default()])]);
    assert_eq!(
        Req::new("PUT", "/x").from(None).check(&allow_all),
        Decision::Allow
    );
    let deny_all = authorizer(&[deny("deny-all", vec![pb::Rule::default()])]);
    assert_eq!(
        Req::get("/").check(&deny_all),
        denied_by("default/deny-all")
    );
}

#[test]
fn any_allow_policy_that_matches_allows() {
    let a = authorizer(&[
        allow("gets", vec![rule_to(op_methods(&["GET"]))]),
        allow("puts", vec![rule_to(op_methods(&["PUT"]))]),
    ]);
    assert!(Req::get("/").allowed(&a));
    assert!(Req::new("PUT", "/").allowed(&a));
    assert!(!Req::new("POST", "/").allowed(&a));
}

fn op_methods(methods: &[&str]) -> pb::Operation {
    pb::Operation {
        methods: strings(methods),
        ..Default::default()
    }
}

#[test]
fn dry_run_policies_are_evaluated_but_never_enforced() {
    // A dry-run DENY that matches does not deny.
    let a = authorizer(&[dry_run(deny("shadow-deny", vec![pb::Rule::default()]))]);
    assert_eq!(Req::get("/").check(&a), Decision::Allow);
    // A dry-run ALLOW does not turn on default-deny for what it does not match.
    let a = authorizer(&[dry_run(allow(
        "shadow-allow",
        vec![rule_to(op_methods(&["GET"]))],
    ))]);
    assert!(!a.is_empty());
    assert_eq!(Req::new("POST", "/").check(&a), Decision::Allow);
    // Next to an enforced ALLOW, only the enforced one counts.
    let a = authorizer(&[
        dry_run(allow("shadow-allow", vec![pb::Rule::default()])),
        allow("gets", vec![rule_to(op_methods(&["GET"]))]),
    ]);
    assert_eq!(Req::new("POST", "/").check(&a), no_allow_match());
}

#[test]
fn waypoint_wide_and_service_policies_both_apply() {
    // The caller passes the waypoint's policies followed by the service's.
    let waypoint_wide = deny("no-delete-anywhere", vec![rule_to(op_methods(&["DELETE"]))]);
    let service = allow("reviews-gets", vec![rule_to(op_methods(&["GET"]))]);
    let a = authorizer(&[waypoint_wide, service]);
    assert_eq!(
        Req::new("DELETE", "/").check(&a),
        denied_by("default/no-delete-anywhere")
    );
    assert_eq!(Req::new("POST", "/").check(&a), no_allow_match());
    assert_eq!(Req::get("/").check(&a), Decision::Allow);
}

#[test]
fn a_refusing_authorizer_denies_every_request() {
    let a = Authorizer::refusing("default/broken");
    assert!(!a.is_empty());
    assert_eq!(Req::get("/").check(&a), denied_by("default/broken"));
}

// ---------------------------------------------------------------------------------------------
// How the parts of a rule combine.

#[test]
fn sources_and_operations_are_ored_and_the_parts_of_a_rule_anded() {
    let a = authorizer(&[allow(
        "p",
        vec![pb::Rule {
            from: vec![
                pb::Source {
                    principals: strings(&["cluster.local/ns/test/sa/sleep"]),
                    ..Default::default()
                },
                pb::Source {
                    namespaces: strings(&["default"]),
                    ..Default::default()
                },
            ],
            to: vec![op_methods(&["GET"]), op_methods(&["PUT"])],
            when: vec![
                when("request.headers[x-a]", &["1"], &[]),
                when("request.headers[x-b]", &["2"], &[]),
            ],
        }],
    )]);
    let ok = Req::get("/").header("x-a", "1").header("x-b", "2");
    assert!(ok.allowed(&a));
    assert!(
        ok.clone().from(Some(PRODUCTPAGE)).allowed(&a),
        "second source"
    );
    let mut put = ok.clone();
    put.method = "PUT";
    assert!(put.allowed(&a), "second operation");
    assert!(!ok.from(None).allowed(&a), "no source matches");
    assert!(
        !Req::get("/").header("x-a", "1").allowed(&a),
        "second condition fails"
    );
}

#[test]
fn within_an_operation_every_field_must_pass() {
    let a = allow_op(|o| {
        o.methods = strings(&["GET"]);
        o.paths = strings(&["/api*"]);
    });
    assert!(Req::get("/api/x").allowed(&a));
    assert!(!Req::get("/other").allowed(&a));
    assert!(!Req::new("POST", "/api/x").allowed(&a));
}

// ---------------------------------------------------------------------------------------------
// Operation fields.

#[test]
fn methods_take_istio_string_forms_and_are_case_sensitive() {
    let a = allow_op(|o| o.methods = strings(&["GET", "PO*", "*ETE"]));
    assert!(Req::get("/").allowed(&a));
    assert!(Req::new("POST", "/").allowed(&a));
    assert!(Req::new("DELETE", "/").allowed(&a));
    assert!(!Req::new("get", "/").allowed(&a));
    assert!(!Req::new("PUT", "/").allowed(&a));
    let any = allow_op(|o| o.methods = strings(&["*"]));
    assert!(Req::new("PATCH", "/").allowed(&any));
}

#[test]
fn not_methods_deny_the_listed_methods_only() {
    let a = allow_op(|o| o.not_methods = strings(&["POST", "DEL*"]));
    assert!(Req::get("/").allowed(&a));
    assert!(!Req::new("POST", "/").allowed(&a));
    assert!(!Req::new("DELETE", "/").allowed(&a));
}

#[test]
fn paths_with_a_trailing_star_match_by_prefix_and_ignore_the_query() {
    // The tutorial's `paths: ["/api/data*"]`.
    let a = allow_op(|o| o.paths = strings(&["/api/data*"]));
    assert!(Req::get("/api/data").allowed(&a));
    assert!(Req::get("/api/data/1?x=/other").allowed(&a));
    assert!(Req::get("/api/database").allowed(&a));
    assert!(!Req::get("/api/other?p=/api/data").allowed(&a));
}

#[test]
fn exact_and_suffix_paths_compare_the_path_without_query_or_fragment() {
    let a = allow_op(|o| o.paths = strings(&["/health", "*.css"]));
    assert!(Req::get("/health").allowed(&a));
    assert!(Req::get("/health?verbose=1").allowed(&a));
    assert!(Req::get("/health#top").allowed(&a));
    assert!(!Req::get("/healthz").allowed(&a));
    assert!(Req::get("/static/site.css?v=2").allowed(&a));
    assert!(!Req::get("/static/site.css.map").allowed(&a));
    let any = allow_op(|o| o.paths = strings(&["*"]));
    assert!(Req::get("/whatever").allowed(&any));
}

#[test]
fn not_paths_exclude_the_listed_paths() {
    let a = allow_op(|o| o.not_paths = strings(&["/admin*", "/secret"]));
    assert!(Req::get("/public").allowed(&a));
    assert!(!Req::get("/admin/users").allowed(&a));
    assert!(!Req::get("/secret?x").allowed(&a));
    assert!(Req::get("/secrets").allowed(&a));
}

#[test]
fn path_templates_match_one_segment_or_the_rest() {
    let a = allow_op(|o| o.paths = strings(&["/users/{*}/profile", "/files/{**}", "/api{**}"]));
    assert!(Req::get("/users/alice/profile").allowed(&a));
    assert!(Req::get("/users/alice/profile?x=1").allowed(&a));
    assert!(
        !Req::get("/users//profile").allowed(&a),
        "{{*}} needs a non-empty segment"
    );
    assert!(
        !Req::get("/users/a/b/profile").allowed(&a),
        "{{*}} is one segment"
    );
    assert!(!Req::get("/users/alice/profile/x").allowed(&a));
    assert!(Req::get("/files/").allowed(&a));
    assert!(Req::get("/files/a/b/c.txt").allowed(&a));
    assert!(!Req::get("/files").allowed(&a));
    assert!(Req::get("/api").allowed(&a));
    assert!(Req::get("/api/v1/x").allowed(&a));
    assert!(!Req::get("/ap").allowed(&a));
    assert!(
        !Req::get("/users/a\"b/profile").allowed(&a),
        "{{*}} matches path characters only"
    );
}

#[test]
fn hosts_match_case_insensitively_and_the_port_is_part_of_the_host() {
    let a = allow_op(|o| {
        o.hosts = strings(&[
            "Reviews.default.svc.cluster.local",
            "*.example.com",
            "ratings*",
        ])
    });
    assert!(Req::get("/")
        .host("reviews.DEFAULT.svc.cluster.local")
        .allowed(&a));
    // As in Istio (HostMatcher: no port stripping), a port must be listed too ("host:*").
    assert!(!Req::get("/")
        .host("reviews.default.svc.cluster.local:9080")
        .allowed(&a));
    assert!(Req::get("/").host("api.EXAMPLE.com").allowed(&a));
    assert!(!Req::get("/").host("api.example.com:443").allowed(&a));
    assert!(Req::get("/").host("RATINGS:9080").allowed(&a));
    let with_port = allow_op(|o| o.hosts = strings(&["reviews:*"]));
    assert!(Req::get("/").host("reviews:9080").allowed(&with_port));
    let present = allow_op(|o| o.hosts = strings(&["*"]));
    assert!(Req::get("/").host("anything").allowed(&present));
    assert!(!Req::get("/").host("").allowed(&present), "no Host at all");
}

#[test]
fn not_hosts_exclude_the_listed_hosts() {
    let a = allow_op(|o| o.not_hosts = strings(&["internal.*"]));
    assert!(Req::get("/").host("reviews:9080").allowed(&a));
    assert!(!Req::get("/").host("INTERNAL.corp").allowed(&a));
}

#[test]
fn ports_compare_the_destination_port() {
    let a = allow_op(|o| o.ports = strings(&["9080"]));
    assert!(Req::get("/").allowed(&a));
    assert!(!Req::get("/").destination("10.96.0.10", 8080).allowed(&a));
    let not = allow_op(|o| o.not_ports = strings(&["8080"]));
    assert!(Req::get("/").allowed(&not));
    assert!(!Req::get("/").destination("10.96.0.10", 8080).allowed(&not));
}

// ---------------------------------------------------------------------------------------------
// Source fields.

#[test]
fn principals_compare_the_identity_without_spiffe_prefix() {
    let a = allow_src(|s| s.principals = strings(&["cluster.local/ns/test/sa/sleep"]));
    assert!(Req::get("/").allowed(&a));
    assert!(!Req::get("/").from(Some(PRODUCTPAGE)).allowed(&a));
    assert!(!Req::get("/").from(None).allowed(&a));
    // Not a SPIFFE URI: no identity.
    assert!(!Req::get("/")
        .from(Some("cluster.local/ns/test/sa/sleep"))
        .allowed(&a));
}

#[test]
fn principal_prefix_suffix_and_star_forms() {
    let a = allow_src(|s| {
        s.principals = strings(&["cluster.local/ns/test/*", "*/sa/bookinfo-productpage"])
    });
    assert!(Req::get("/").allowed(&a));
    assert!(Req::get("/").from(Some(PRODUCTPAGE)).allowed(&a));
    assert!(!Req::get("/")
        .from(Some("spiffe://cluster.local/ns/other/sa/x"))
        .allowed(&a));
    let any = allow_src(|s| s.principals = strings(&["*"]));
    assert!(Req::get("/")
        .from(Some("spiffe://td/ns/a/sa/b"))
        .allowed(&any));
    assert!(
        !Req::get("/").from(None).allowed(&any),
        "`*` requires an identity"
    );
}

#[test]
fn not_principals_pass_requests_without_identity() {
    let a = allow_src(|s| s.not_principals = strings(&["cluster.local/ns/test/sa/sleep"]));
    assert!(!Req::get("/").allowed(&a));
    assert!(Req::get("/").from(Some(PRODUCTPAGE)).allowed(&a));
    assert!(Req::get("/").from(None).allowed(&a));
    // The idiom "deny requests without an identity".
    let d = authorizer(&[deny(
        "require-mtls",
        vec![rule_from(pb::Source {
            not_principals: strings(&["*"]),
            ..Default::default()
        })],
    )]);
    assert_eq!(
        Req::get("/").from(None).check(&d),
        denied_by("default/require-mtls")
    );
    assert_eq!(Req::get("/").check(&d), Decision::Allow);
}

#[test]
fn namespaces_come_from_the_identity() {
    let a = allow_src(|s| s.namespaces = strings(&["test"]));
    assert!(Req::get("/").allowed(&a));
    assert!(!Req::get("/").from(Some(PRODUCTPAGE)).allowed(&a));
    assert!(!Req::get("/").from(None).allowed(&a));
    assert!(!Req::get("/")
        .from(Some("spiffe://cluster.local/ns/testing/sa/x"))
        .allowed(&a));
    let forms = allow_src(|s| s.namespaces = strings(&["te*", "*ult"]));
    assert!(Req::get("/")
        .from(Some("spiffe://td/ns/testing/sa/x"))
        .allowed(&forms));
    assert!(Req::get("/").from(Some(PRODUCTPAGE)).allowed(&forms));
    assert!(!Req::get("/")
        .from(Some("spiffe://td/ns/prod/sa/x"))
        .allowed(&forms));
    let any = allow_src(|s| s.namespaces = strings(&["*"]));
    assert!(Req::get("/").allowed(&any));
    assert!(!Req::get("/").from(None).allowed(&any));
}

#[test]
fn not_namespaces_exclude_the_listed_namespaces() {
    let a = allow_src(|s| s.not_namespaces = strings(&["test"]));
    assert!(!Req::get("/").allowed(&a));
    assert!(Req::get("/").from(Some(PRODUCTPAGE)).allowed(&a));
    assert!(Req::get("/").from(None).allowed(&a));
}

#[test]
fn ip_blocks_take_addresses_and_cidrs_of_the_connection_source() {
    let a = allow_src(|s| s.ip_blocks = strings(&["10.0.0.5", "192.168.0.0/16", "fd00::/8"]));
    assert!(Req::get("/").allowed(&a));
    assert!(Req::get("/").source("192.168.3.4").allowed(&a));
    assert!(Req::get("/").source("fd00::1").allowed(&a));
    assert!(
        Req::get("/").source("::ffff:10.0.0.5").allowed(&a),
        "IPv4-mapped"
    );
    assert!(!Req::get("/").source("10.0.0.6").allowed(&a));
    // The forwarded-for address plays no part.
    assert!(!Req::get("/")
        .source("10.0.0.6")
        .header("x-forwarded-for", "10.0.0.5")
        .allowed(&a));
}

#[test]
fn not_ip_blocks_exclude_the_listed_sources() {
    let a = allow_src(|s| s.not_ip_blocks = strings(&["10.0.0.0/24"]));
    assert!(!Req::get("/").allowed(&a));
    assert!(Req::get("/").source("10.0.1.5").allowed(&a));
}

#[test]
fn remote_ip_blocks_use_the_last_forwarded_for_address() {
    let a = allow_src(|s| s.remote_ip_blocks = strings(&["203.0.113.0/24"]));
    assert!(
        !Req::get("/").allowed(&a),
        "no X-Forwarded-For: the source address"
    );
    assert!(Req::get("/").source("203.0.113.9").allowed(&a));
    assert!(Req::get("/")
        .header("x-forwarded-for", "1.2.3.4, 203.0.113.7")
        .allowed(&a));
    assert!(!Req::get("/")
        .header("x-forwarded-for", "203.0.113.7, 1.2.3.4")
        .allowed(&a));
    assert!(
        Req::get("/")
            .source("203.0.113.9")
            .header("x-forwarded-for", "garbage")
            .allowed(&a),
        "unparsable: the source address"
    );
    let not = allow_src(|s| s.not_remote_ip_blocks = strings(&["203.0.113.0/24"]));
    assert!(Req::get("/").allowed(&not));
    assert!(!Req::get("/")
        .header("x-forwarded-for", "203.0.113.7")
        .allowed(&not));
}

// ---------------------------------------------------------------------------------------------
// `when` conditions.

#[test]
fn header_conditions_take_istio_string_forms() {
    let a = allow_when("request.headers[X-Token]", &["secret", "pre*", "*suf"], &[]);
    assert!(Req::get("/").header("x-token", "secret").allowed(&a));
    assert!(Req::get("/").header("x-token", "prefix").allowed(&a));
    assert!(Req::get("/").header("x-token", "a-suf").allowed(&a));
    assert!(!Req::get("/").header("x-token", "Secret").allowed(&a));
    assert!(!Req::get("/").allowed(&a));
}

#[test]
fn a_star_header_condition_means_present_even_if_empty() {
    let a = allow_when("request.headers[x-user]", &["*"], &[]);
    assert!(Req::get("/").header("x-user", "").allowed(&a));
    assert!(!Req::get("/").allowed(&a));
}

#[test]
fn header_not_values_pass_when_the_header_is_absent() {
    let a = allow_when("request.headers[x-env]", &[], &["prod"]);
    assert!(Req::get("/").allowed(&a));
    assert!(Req::get("/").header("x-env", "dev").allowed(&a));
    assert!(!Req::get("/").header("x-env", "prod").allowed(&a));
}

#[test]
fn a_repeated_header_is_matched_as_its_values_joined_with_commas() {
    let a = allow_when("request.headers[x-group]", &["admins,users"], &[]);
    assert!(Req::get("/")
        .header("x-group", "admins")
        .header("x-group", "users")
        .allowed(&a));
    assert!(!Req::get("/").header("x-group", "admins").allowed(&a));
}

#[test]
fn header_conditions_on_authority_and_method_read_the_request_line() {
    let a = authorizer(&[allow(
        "p",
        vec![rule_when(vec![
            when("request.headers[:authority]", &["reviews:*"], &[]),
            when("request.headers[host]", &["*:9080"], &[]),
            when("request.headers[:method]", &["GET"], &[]),
            when("request.headers[:path]", &["/x?*"], &[]),
        ])],
    )]);
    assert!(Req::get("/x?y").allowed(&a));
    assert!(!Req::get("/x").allowed(&a));
    assert!(!Req::new("PUT", "/x?y").allowed(&a));
}

#[test]
fn source_ip_remote_ip_and_destination_conditions() {
    let src = allow_when("source.ip", &["10.0.0.0/24"], &["10.0.0.9"]);
    assert!(Req::get("/").allowed(&src));
    assert!(!Req::get("/").source("10.0.0.9").allowed(&src));
    assert!(!Req::get("/").source("10.0.1.1").allowed(&src));

    let remote = allow_when("remote.ip", &["198.51.100.1"], &[]);
    assert!(Req::get("/")
        .header("x-forwarded-for", "198.51.100.1")
        .allowed(&remote));
    assert!(!Req::get("/").allowed(&remote));

    let dst = allow_when("destination.ip", &["10.96.0.0/16"], &[]);
    assert!(Req::get("/").allowed(&dst));
    assert!(!Req::get("/").destination("10.97.0.1", 9080).allowed(&dst));

    let port = allow_when("destination.port", &["9080"], &["9081"]);
    assert!(Req::get("/").allowed(&port));
    assert!(!Req::get("/").destination("10.96.0.10", 9081).allowed(&port));
}

#[test]
fn source_identity_conditions() {
    let ns = allow_when("source.namespace", &["test"], &[]);
    assert!(Req::get("/").allowed(&ns));
    assert!(!Req::get("/").from(Some(PRODUCTPAGE)).allowed(&ns));

    let not_ns = allow_when("source.namespace", &[], &["test"]);
    assert!(!Req::get("/").allowed(&not_ns));
    assert!(Req::get("/").from(None).allowed(&not_ns));

    let principal = allow_when("source.principal", &["cluster.local/ns/test/*"], &[]);
    assert!(Req::get("/").allowed(&principal));
    assert!(!Req::get("/").from(Some(PRODUCTPAGE)).allowed(&principal));

    // `ns/sa`, or `sa` in the policy's namespace ("default").
    let sa = allow_when(
        "source.serviceAccount",
        &["test/sleep", "bookinfo-productpage"],
        &[],
    );
    assert!(Req::get("/").allowed(&sa));
    assert!(Req::get("/").from(Some(PRODUCTPAGE)).allowed(&sa));
    assert!(!Req::get("/")
        .from(Some("spiffe://cluster.local/ns/test/sa/sleep2"))
        .allowed(&sa));
    assert!(!Req::get("/").from(None).allowed(&sa));
}

#[test]
fn request_auth_values_never_match_and_not_values_always_pass() {
    let values = allow_when("request.auth.principal", &["*"], &[]);
    assert!(!Req::get("/").allowed(&values));
    let claims = allow_when("request.auth.claims[iss]", &["issuer"], &[]);
    assert!(!Req::get("/").allowed(&claims));
    // "Deny requests without a JWT" denies every request here, as Envoy does without a JWT.
    let require_jwt = authorizer(&[deny(
        "require-jwt",
        vec![rule_when(vec![when("request.auth.principal", &[], &["*"])])],
    )]);
    assert_eq!(
        Req::get("/").check(&require_jwt),
        denied_by("default/require-jwt")
    );
}

#[test]
fn an_unknown_condition_key_fails_safe() {
    let sni = when("connection.sni", &["reviews.example.com"], &[]);
    let a = authorizer(&[allow("p", vec![rule_when(vec![sni.clone()])])]);
    assert_eq!(
        Req::get("/").check(&a),
        no_allow_match(),
        "ALLOW: does not match"
    );
    let d = authorizer(&[deny("p", vec![rule_when(vec![sni])])]);
    assert_eq!(
        Req::get("/").check(&d),
        denied_by("default/p"),
        "DENY: matches"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals.

fn refused(p: AuthorizationPolicy) -> String {
    match Authorizer::new(&[p]) {
        Ok(_) => panic!("policy accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_bad_cidr_is_refused_naming_the_policy_and_field() {
    let e = refused(allow(
        "bad",
        vec![
            pb::Rule::default(),
            rule_from(pb::Source {
                not_ip_blocks: strings(&["10.0.0.0/33"]),
                ..Default::default()
            }),
        ],
    ));
    assert_eq!(e, "policy default/bad: rules[1].from[0].notIpBlocks: \"10.0.0.0/33\" is not an IP address or CIDR");
    let e = refused(allow(
        "bad",
        vec![rule_when(vec![when("source.ip", &["nope"], &[])])],
    ));
    assert!(e.contains("rules[0].when[0].values"), "{e}");
}

#[test]
fn bad_ports_header_keys_and_templates_are_refused() {
    let port = refused(deny(
        "p",
        vec![rule_to(pb::Operation {
            ports: strings(&["http"]),
            ..Default::default()
        })],
    ));
    assert!(
        port.contains("rules[0].to[0].ports: \"http\" is not a port number"),
        "{port}"
    );
    let header = refused(allow(
        "h",
        vec![rule_when(vec![when("request.headers[]", &["x"], &[])])],
    ));
    assert!(header.contains("does not name a valid header"), "{header}");
    let header = refused(allow(
        "h",
        vec![rule_when(vec![when("request.headers[a b]", &["x"], &[])])],
    ));
    assert!(header.contains("does not name a valid header"), "{header}");
    let template = refused(allow(
        "t",
        vec![rule_to(pb::Operation {
            paths: strings(&["/{**}/x"]),
            ..Default::default()
        })],
    ));
    assert!(template.contains("not a valid path template"), "{template}");
    let template = refused(allow(
        "t",
        vec![rule_to(pb::Operation {
            paths: strings(&["/a{*}b"]),
            ..Default::default()
        })],
    ));
    assert!(template.contains("not a valid path template"), "{template}");
    let ns = refused(allow(
        "n",
        vec![rule_from(pb::Source {
            namespaces: strings(&["a*b"]),
            ..Default::default()
        })],
    ));
    assert!(ns.contains("may only start or end"), "{ns}");
}

#[test]
fn empty_values_sources_operations_and_conditions_are_refused() {
    let e = refused(allow(
        "p",
        vec![rule_to(pb::Operation {
            methods: strings(&["GET", ""]),
            ..Default::default()
        })],
    ));
    assert_eq!(e, "policy default/p: rules[0].to[0].methods: empty value");
    let e = refused(allow("p", vec![rule_from(pb::Source::default())]));
    assert_eq!(e, "policy default/p: rules[0].from[0]: empty source");
    let e = refused(deny("p", vec![rule_to(pb::Operation::default())]));
    assert_eq!(e, "policy default/p: rules[0].to[0]: empty operation");
    let e = refused(deny(
        "p",
        vec![rule_when(vec![when("source.ip", &[], &[])])],
    ));
    assert!(e.contains("has neither values nor notValues"), "{e}");
}

#[test]
fn an_unknown_action_is_refused() {
    let mut p = allow("p", vec![]);
    p.action = 7;
    assert_eq!(refused(p), "policy default/p: unknown action 7");
}
