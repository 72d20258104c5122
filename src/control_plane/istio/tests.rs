//! Istio AuthorizationPolicy / PeerAuthentication → policies and per-pod keys, one case per translation rule.

use std::net::SocketAddr;

use super::peer::deny_no_identity;
use super::*;
use crate::authz::{Connection, Decision, DenyReason, PolicySet};
use crate::control_plane::config::WorkloadSpec;
use crate::control_plane::translate::{pod_uid, translate};
use crate::identity::Identity;
use crate::proto::workload as wl;

const BASE: &str = r#"
namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
  bookinfo: {labels: {istio.io/dataplane-mode: ambient}}
  legacy: {}
workloads:
- {name: productpage, namespace: bookinfo, serviceAccount: productpage, ips: [10.1.0.5], labels: {app: productpage}}
- {name: reviews, namespace: bookinfo, serviceAccount: reviews, ips: [10.1.0.6], labels: {app: reviews}}
- {name: sleep, namespace: default, serviceAccount: sleep, ips: [10.1.0.7], labels: {app: sleep}}
- {name: curl, namespace: legacy, ips: [10.1.0.8], labels: {app: curl}}
"#;

/// The base mesh plus `istio` (a YAML list, indented as a top-level key's value).
fn mesh(istio: &str) -> MeshConfig {
    try_mesh(istio).unwrap_or_else(|e| panic!("{e}"))
}

fn try_mesh(istio: &str) -> Result<MeshConfig, Error> {
    MeshConfig::parse(&format!("{BASE}istio:\n{istio}"))
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "- {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: {name}, namespace: {ns}}}, spec: {spec}}}\n"
    )
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "- {{apiVersion: security.istio.io/v1beta1, kind: PeerAuthentication, metadata: {{name: {name}, namespace: {ns}}}, spec: {spec}}}\n"
    )
}

fn policy<'a>(c: &'a Converted, key: &str) -> &'a Policy {
    c.policies
        .iter()
        .find(|p| p.key() == key)
        .unwrap_or_else(|| {
            panic!(
                "no policy {key}: {:?}",
                c.policies.iter().map(Policy::key).collect::<Vec<_>>()
            )
        })
}

fn workload<'a>(cfg: &'a MeshConfig, name: &str) -> &'a WorkloadSpec {
    cfg.workloads.iter().find(|w| w.name == name).unwrap()
}

fn keys(istio: &str, pod: &str) -> Vec<String> {
    let cfg = mesh(istio);
    convert(&cfg).unwrap().keys_for(workload(&cfg, pod))
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

const STATIC: &str = "istio-system/istio_converted_static_strict";
/// A targetRef to the waypoint Gateway `waypoint`.
const GW: &str = "targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}";

// ---- AuthorizationPolicy ----

#[test]
fn authorization_policy_scope_follows_selector_and_root_namespace() {
    let cases = [
        ("bookinfo", "{}", Scope::Namespace),
        ("istio-system", "{}", Scope::Global),
        (
            "bookinfo",
            "{selector: {matchLabels: {app: reviews}}}",
            Scope::WorkloadSelector,
        ),
        (
            "istio-system",
            "{selector: {matchLabels: {app: reviews}}}",
            Scope::WorkloadSelector,
        ),
    ];
    for (ns, spec, scope) in cases {
        let c = convert(&mesh(&ap(ns, "p", spec))).unwrap();
        let p = policy(&c, &format!("{ns}/p"));
        assert_eq!(p.scope, scope, "{ns} {spec}");
        assert_eq!((p.name.as_str(), p.action), ("p", Action::Allow));
    }
    // The root namespace is configurable.
    let cfg = MeshConfig::parse(&format!(
        "{BASE}rootNamespace: mesh-root\nistio:\n{}{}",
        ap("mesh-root", "p", "{}"),
        ap("istio-system", "q", "{}")
    ))
    .unwrap();
    let c = convert(&cfg).unwrap();
    assert_eq!(policy(&c, "mesh-root/p").scope, Scope::Global);
    assert_eq!(policy(&c, "istio-system/q").scope, Scope::Namespace);
}

#[test]
fn selector_policies_are_listed_by_matching_pods_of_their_namespace_and_the_root_namespace() {
    let istio = [
        ap(
            "bookinfo",
            "z-reviews",
            "{selector: {matchLabels: {app: reviews}}}",
        ),
        ap(
            "bookinfo",
            "a-reviews",
            "{selector: {matchLabels: {app: reviews}}}",
        ),
        ap(
            "istio-system",
            "mesh-reviews",
            "{selector: {matchLabels: {app: reviews}}}",
        ),
        ap(
            "default",
            "other-ns",
            "{selector: {matchLabels: {app: reviews}}}",
        ),
        ap("bookinfo", "ns-wide", "{}"),
    ]
    .concat();
    assert_eq!(
        keys(&istio, "reviews"),
        vec![
            "bookinfo/a-reviews",
            "bookinfo/z-reviews",
            "istio-system/mesh-reviews"
        ]
    );
    assert!(keys(&istio, "productpage").is_empty());
    // And they reach the Workload resource.
    let res = translate(&mesh(&istio));
    let w = match res.addresses[&pod_uid("Kubernetes", "bookinfo", "reviews")]
        .r#type
        .as_ref()
    {
        Some(wl::address::Type::Workload(w)) => w.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(w.authorization_policies.len(), 3);
    assert!(res.authorizations.contains_key("bookinfo/ns-wide"));
}

#[test]
fn rule_clauses_are_to_then_from_then_each_when_field_for_field() {
    let spec = r#"{action: DENY, rules: [{
        to: [{operation: {ports: ["9080", 8080], notPorts: ["22"]}}, {operation: {ports: ["443"]}}],
        from: [{source: {principals: [cluster.local/ns/default/sa/sleep], notPrincipals: ["*"],
                         namespaces: [default], notNamespaces: [kube-system],
                         serviceAccounts: [sleep, other/bot], notServiceAccounts: [default/x],
                         ipBlocks: [10.0.0.0/8, 10.1.2.3], notIpBlocks: ["fd00::/8"]}}],
        when: [{key: source.ip, values: [192.168.0.0/16]}, {key: destination.port, notValues: ["15000"]},
               {key: destination.ip, values: [10.96.0.10]}, {key: source.namespace, values: [default]},
               {key: source.principal, notValues: ["*/sa/bad"]}]}]}"#;
    let c = convert(&mesh(&ap("bookinfo", "p", spec))).unwrap();
    let p = policy(&c, "bookinfo/p");
    assert_eq!(p.action, Action::Deny);
    assert_eq!(p.rules.len(), 1);
    let clauses = &p.rules[0].clauses;
    assert_eq!(clauses.len(), 7, "to, from, five when");
    let to = &clauses[0].matches;
    assert_eq!(to.len(), 2);
    assert_eq!(to[0].destination_ports, vec![9080, 8080]);
    assert_eq!(to[0].not_destination_ports, vec![22]);
    assert_eq!(to[1].destination_ports, vec![443]);
    let from = &clauses[1].matches[0];
    assert_eq!(
        from.principals,
        vec![exact("cluster.local/ns/default/sa/sleep")]
    );
    assert_eq!(from.not_principals, vec![StringMatch::Presence]);
    assert_eq!(from.namespaces, vec![exact("default")]);
    assert_eq!(from.not_namespaces, vec![exact("kube-system")]);
    let sa = |ns: &str, sa: &str| ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    };
    assert_eq!(
        from.service_accounts,
        vec![sa("bookinfo", "sleep"), sa("other", "bot")]
    );
    assert_eq!(from.not_service_accounts, vec![sa("default", "x")]);
    let nets: Vec<String> = from.source_ips.iter().map(ToString::to_string).collect();
    assert_eq!(nets, vec!["10.0.0.0/8", "10.1.2.3/32"]);
    assert_eq!(from.not_source_ips[0].to_string(), "fd00::/8");
    let when: Vec<&Match> = clauses[2..].iter().map(|c| &c.matches[0]).collect();
    assert_eq!(when[0].source_ips[0].to_string(), "192.168.0.0/16");
    assert_eq!(when[1].not_destination_ports, vec![15000]);
    assert_eq!(when[2].destination_ips[0].to_string(), "10.96.0.10/32");
    assert_eq!(when[3].namespaces, vec![exact("default")]);
    assert_eq!(
        when[4].not_principals,
        vec![StringMatch::Suffix("/sa/bad".into())]
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn istio_string_forms_become_exact_prefix_suffix_and_presence() {
    let spec = r#"{rules: [{from: [{source: {namespaces: [exact, "pre*", "*suf", "*"]}}]}]}"#;
    let c = convert(&mesh(&ap("bookinfo", "p", spec))).unwrap();
    let m = &policy(&c, "bookinfo/p").rules[0].clauses[0].matches[0];
    assert_eq!(
        m.namespaces,
        vec![
            exact("exact"),
            StringMatch::Prefix("pre".into()),
            StringMatch::Suffix("suf".into()),
            StringMatch::Presence
        ]
    );
}

#[test]
fn empty_rules_mean_allow_nothing_and_an_empty_rule_matches_everything() {
    let c = convert(&mesh(
        &[
            ap("bookinfo", "none", "{}"),
            ap("bookinfo", "all", "{rules: [{}]}"),
        ]
        .concat(),
    ))
    .unwrap();
    assert!(policy(&c, "bookinfo/none").rules.is_empty());
    assert_eq!(policy(&c, "bookinfo/all").rules, vec![Rule::default()]);
}

#[test]
fn an_allow_rule_with_http_attributes_is_dropped_and_logged() {
    let l7 = [
        ("{to: [{operation: {methods: [GET]}}]}", "methods"),
        ("{to: [{operation: {ports: ['80'], paths: [/x]}}]}", "paths"),
        ("{to: [{operation: {notHosts: [a.com]}}]}", "notHosts"),
        (
            "{from: [{source: {requestPrincipals: ['*']}}]}",
            "requestPrincipals",
        ),
        (
            "{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}",
            "remoteIpBlocks",
        ),
        (
            "{when: [{key: 'request.headers[x-user]', values: [a]}]}",
            "request.headers[x-user]",
        ),
        (
            "{when: [{key: connection.sni, values: [a.com]}]}",
            "connection.sni",
        ),
        (
            "{when: [{key: 'request.auth.claims[iss]', values: [a]}]}",
            "request.auth.claims[iss]",
        ),
    ];
    for (rule, attr) in l7 {
        let spec =
            format!("{{rules: [{rule}, {{from: [{{source: {{namespaces: [default]}}}}]}}]}}");
        let c = convert(&mesh(&ap("bookinfo", "p", &spec))).unwrap();
        let p = policy(&c, "bookinfo/p");
        assert_eq!(p.rules.len(), 1, "{rule}: only the L4 rule stays");
        assert_eq!(
            p.rules[0].clauses[0].matches[0].namespaces,
            vec![exact("default")]
        );
        assert_eq!(c.warnings.len(), 1, "{rule}");
        assert!(
            c.warnings[0].contains(attr) && c.warnings[0].contains("dropped"),
            "{}",
            c.warnings[0]
        );
    }
}

#[test]
fn a_deny_rule_with_http_attributes_is_widened_and_logged() {
    // Mixed entry: the L4 part stays.
    let spec = "{action: DENY, rules: [{to: [{operation: {ports: ['80'], methods: [GET]}}], from: [{source: {namespaces: [legacy], requestPrincipals: ['*']}}]}]}";
    let c = convert(&mesh(&ap("bookinfo", "p", spec))).unwrap();
    let clauses = &policy(&c, "bookinfo/p").rules[0].clauses;
    assert_eq!(clauses.len(), 2);
    assert_eq!(clauses[0].matches[0].destination_ports, vec![80]);
    assert!(clauses[0].matches[0].not_destination_ports.is_empty());
    assert_eq!(clauses[1].matches[0].namespaces, vec![exact("legacy")]);
    assert!(
        c.warnings[0].contains("methods, requestPrincipals")
            && c.warnings[0].contains("denies more")
    );

    // Entries or conditions made only of L7 attributes drop their clause: the rule matches more.
    let spec = "{action: DENY, rules: [{to: [{operation: {ports: ['80']}}, {operation: {methods: [GET]}}], from: [{source: {namespaces: [legacy]}}], when: [{key: 'request.headers[a]', values: [b]}]}]}";
    let c = convert(&mesh(&ap("bookinfo", "p", spec))).unwrap();
    let p = policy(&c, "bookinfo/p");
    assert_eq!(p.rules[0].clauses.len(), 1, "{:?}", p.rules);
    assert_eq!(
        p.rules[0].clauses[0].matches[0].namespaces,
        vec![exact("legacy")]
    );
    // It now denies legacy on every port.
    let set = PolicySet::new(vec![p.clone()]).unwrap();
    let id = Identity::new("cluster.local", "legacy", "default").unwrap();
    let conn = conn(Some(&id), 9080);
    assert!(!set.check("bookinfo", &[], &conn).is_allow());
}

#[test]
fn audit_custom_and_waypoint_bound_policies_are_not_sent_to_node_proxies() {
    let istio = [
        ap("bookinfo", "audit", "{action: AUDIT}"),
        ap(
            "bookinfo",
            "custom",
            "{action: CUSTOM, provider: {name: ext}}",
        ),
        ap(
            "bookinfo",
            "wp",
            "{targetRefs: [{kind: Service, group: '', name: reviews}]}",
        ),
        ap(
            "bookinfo",
            "wp1",
            "{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}",
        ),
    ]
    .concat();
    let c = convert(&mesh(&istio)).unwrap();
    assert!(c.policies.is_empty());
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("Audit"));
    // The targeted ones are kept for waypoints (waypoints.rs attaches them), in the waypoint's form.
    let targeted: Vec<_> = c.targeted.iter().map(|t| t.policy.name.as_str()).collect();
    assert_eq!(targeted, ["wp", "wp1"]);
    assert_eq!(
        c.targeted[0].targets,
        [(
            "istio[2].spec.targetRefs[0]".to_string(),
            PolicyTarget::Service("reviews".into())
        )]
    );
    assert_eq!(
        c.targeted[1].targets[0].1,
        PolicyTarget::Gateway("waypoint".into())
    );
    // And never reach a node proxy's resources.
    let res = translate(&mesh(&istio));
    assert!(res.authorizations.is_empty());
}

#[test]
fn waypoint_bound_policies_keep_their_http_fields_in_istio_forms() {
    let c = convert(&mesh(&ap(
        "bookinfo",
        "get-only",
        "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], action: DENY, rules: [{
          from: [{source: {principals: [cluster.local/ns/default/sa/sleep], serviceAccounts: [curl], notNamespaces: [legacy], remoteIpBlocks: [10.0.0.0/8]}}],
          to: [{operation: {methods: [POST], notPaths: [\"/api/data*\"], hosts: [\"*.example.com\"], ports: [9080]}}],
          when: [{key: \"request.headers[x-user]\", values: [jason]}, {key: source.ip, notValues: [10.1.0.0/16]}]}]}",
    )))
    .unwrap();
    use crate::proto::waypoint as wp;
    let p = &c.targeted[0].policy;
    assert_eq!(p.action, wp::Action::Deny as i32);
    let r = &p.rules[0];
    assert_eq!(
        r.from[0].principals,
        [
            "cluster.local/ns/default/sa/sleep",
            "cluster.local/ns/bookinfo/sa/curl"
        ]
    );
    assert_eq!(r.from[0].not_namespaces, ["legacy"]);
    assert_eq!(r.from[0].remote_ip_blocks, ["10.0.0.0/8"]);
    assert_eq!(r.to[0].methods, ["POST"]);
    assert_eq!(r.to[0].not_paths, ["/api/data*"]);
    assert_eq!(r.to[0].hosts, ["*.example.com"]);
    assert_eq!(r.to[0].ports, ["9080"]);
    assert_eq!(r.when[0].key, "request.headers[x-user]");
    assert_eq!(r.when[0].values, ["jason"]);
    assert_eq!(r.when[1].not_values, ["10.1.0.0/16"]);
}

#[test]
fn the_dry_run_annotation_makes_the_policy_dry_run() {
    for (value, dry) in [("\"true\"", true), ("\"false\"", false)] {
        let yaml = format!(
            "- {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: p, namespace: bookinfo, annotations: {{istio.io/dry-run: {value}}}}}, spec: {{action: DENY}}}}\n"
        );
        let c = convert(&mesh(&yaml)).unwrap();
        assert_eq!(policy(&c, "bookinfo/p").dry_run, dry);
    }
}

fn conn(id: Option<&Identity>, port: u16) -> Connection<'_> {
    Connection {
        src: "10.1.0.8:40000".parse::<SocketAddr>().unwrap(),
        dst: SocketAddr::from(([10, 1, 0, 5], port)),
        src_identity: id,
        dst_network: "",
    }
}

/// Decides a connection to `pod` with the translated policies, as the proxy would.
fn decide(cfg: &MeshConfig, pod: &str, id: Option<&Identity>, port: u16) -> Decision {
    let c = convert(cfg).unwrap();
    let set = PolicySet::new(c.policies.clone()).unwrap();
    let w = workload(cfg, pod);
    set.check(&w.namespace, &c.keys_for(w), &conn(id, port))
}

#[test]
fn allow_only_productpage_lets_productpage_in_and_shuts_everyone_else_out() {
    let cfg = mesh(&ap(
        "bookinfo",
        "reviews-viewer",
        "{selector: {matchLabels: {app: reviews}}, rules: [{from: [{source: {principals: [cluster.local/ns/bookinfo/sa/productpage]}}]}]}",
    ));
    let pp = Identity::new("cluster.local", "bookinfo", "productpage").unwrap();
    let sleep = Identity::new("cluster.local", "default", "sleep").unwrap();
    assert!(decide(&cfg, "reviews", Some(&pp), 9080).is_allow());
    assert_eq!(
        decide(&cfg, "reviews", Some(&sleep), 9080),
        Decision::Deny(DenyReason::NoAllowMatch)
    );
    assert!(!decide(&cfg, "reviews", None, 9080).is_allow());
    assert!(
        decide(&cfg, "productpage", None, 9080).is_allow(),
        "other pods unaffected"
    );
}

// ---- PeerAuthentication ----

#[test]
fn strict_takes_effect_at_each_scope_with_workload_over_namespace_over_mesh() {
    let sel = |app: &str, mode: &str| {
        format!("{{selector: {{matchLabels: {{app: {app}}}}}, mtls: {{mode: {mode}}}}}")
    };
    // (objects, pod, lists the static STRICT policy)
    let cases: Vec<(String, &str, bool)> = vec![
        (String::new(), "productpage", false),
        (
            pa("bookinfo", "default", "{mtls: {mode: STRICT}}"),
            "productpage",
            true,
        ),
        (
            pa("bookinfo", "default", "{mtls: {mode: STRICT}}"),
            "sleep",
            false,
        ),
        (
            pa("istio-system", "default", "{mtls: {mode: STRICT}}"),
            "sleep",
            true,
        ),
        (
            pa("istio-system", "default", "{mtls: {mode: STRICT}}"),
            "curl",
            true,
        ),
        (
            [
                pa("istio-system", "m", "{mtls: {mode: STRICT}}"),
                pa("bookinfo", "n", "{mtls: {mode: PERMISSIVE}}"),
            ]
            .concat(),
            "productpage",
            false,
        ),
        (
            [
                pa("istio-system", "m", "{mtls: {mode: STRICT}}"),
                pa("bookinfo", "n", "{mtls: {}}"),
            ]
            .concat(),
            "productpage",
            true,
        ),
        (
            [
                pa("istio-system", "m", "{mtls: {mode: STRICT}}"),
                pa("bookinfo", "n", "{mtls: {mode: DISABLE}}"),
            ]
            .concat(),
            "productpage",
            false,
        ),
        (
            [
                pa("bookinfo", "n", "{mtls: {mode: PERMISSIVE}}"),
                pa("bookinfo", "w", &sel("reviews", "STRICT")),
            ]
            .concat(),
            "reviews",
            true,
        ),
        (
            [
                pa("bookinfo", "n", "{mtls: {mode: PERMISSIVE}}"),
                pa("bookinfo", "w", &sel("reviews", "STRICT")),
            ]
            .concat(),
            "productpage",
            false,
        ),
        (
            [
                pa("bookinfo", "n", "{mtls: {mode: STRICT}}"),
                pa("bookinfo", "w", &sel("reviews", "PERMISSIVE")),
            ]
            .concat(),
            "reviews",
            false,
        ),
        (
            [
                pa("bookinfo", "n", "{mtls: {mode: STRICT}}"),
                pa("bookinfo", "w", &sel("reviews", "UNSET")),
            ]
            .concat(),
            "reviews",
            true,
        ),
        // First namespace-wide policy in the file wins (istiod: the oldest).
        (
            [
                pa("bookinfo", "a", "{mtls: {mode: STRICT}}"),
                pa("bookinfo", "b", "{mtls: {mode: PERMISSIVE}}"),
            ]
            .concat(),
            "productpage",
            true,
        ),
    ];
    for (istio, pod, strict) in cases {
        let istio = if istio.is_empty() {
            " []".to_string()
        } else {
            istio
        };
        let cfg = mesh(&istio);
        let c = convert(&cfg).unwrap();
        let k = c.keys_for(workload(&cfg, pod));
        assert_eq!(
            k.contains(&STATIC.to_string()),
            strict,
            "{pod} under {istio}: {k:?}"
        );
        let sent = c.policies.iter().any(|p| p.key() == STATIC);
        assert_eq!(
            sent,
            istio.contains("PeerAuthentication"),
            "static policy sent iff any PeerAuthentication"
        );
    }
}

#[test]
fn the_static_strict_policy_is_istiods() {
    let c = convert(&mesh(&pa("bookinfo", "default", "{mtls: {mode: STRICT}}"))).unwrap();
    let p = policy(&c, STATIC);
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (Scope::WorkloadSelector, Action::Deny, false)
    );
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].clauses[0].matches, vec![deny_no_identity()]);
}

#[test]
fn strict_namespace_resets_plaintext_and_lets_mtls_in() {
    let cfg = mesh(&pa("bookinfo", "default", "{mtls: {mode: STRICT}}"));
    let sleep = Identity::new("cluster.local", "default", "sleep").unwrap();
    assert!(decide(&cfg, "productpage", Some(&sleep), 9080).is_allow());
    assert_eq!(
        decide(&cfg, "productpage", None, 9080),
        Decision::Deny(DenyReason::ExplicitDeny {
            policy: STATIC.into()
        })
    );
    assert!(
        decide(&cfg, "sleep", None, 80).is_allow(),
        "another namespace"
    );
}

#[test]
fn port_level_exceptions_under_strict_become_a_converted_policy() {
    let key = "bookinfo/converted_peer_authentication_pp";
    // (objects, whether other pods of the namespace are STRICT)
    let cases = [
        // Workload STRICT with a PERMISSIVE port.
        (pa("bookinfo", "pp", "{selector: {matchLabels: {app: productpage}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"), false),
        // Workload UNSET under a STRICT namespace, DISABLE port.
        ([pa("bookinfo", "ns", "{mtls: {mode: STRICT}}"), pa("bookinfo", "pp", "{selector: {matchLabels: {app: productpage}}, portLevelMtls: {8080: {mode: DISABLE}}}")].concat(), true),
        // Workload UNSET under a STRICT mesh.
        ([pa("istio-system", "m", "{mtls: {mode: STRICT}}"), pa("bookinfo", "pp", "{selector: {matchLabels: {app: productpage}}, portLevelMtls: {8080: {mode: PERMISSIVE}, 9080: {mode: STRICT}}}")].concat(), true),
    ];
    for (istio, others_strict) in cases {
        let cfg = mesh(&istio);
        let c = convert(&cfg).unwrap();
        let p = policy(&c, key);
        assert_eq!(
            (p.scope, p.action, p.name.as_str()),
            (
                Scope::WorkloadSelector,
                Action::Deny,
                "converted_peer_authentication_pp"
            )
        );
        let clauses = &p.rules[0].clauses;
        assert_eq!(clauses[0].matches, vec![deny_no_identity()], "{istio}");
        assert_eq!(clauses[1].matches[0].not_destination_ports, vec![8080]);
        assert_eq!(clauses.len(), 2);
        assert_eq!(
            c.keys_for(workload(&cfg, "productpage")),
            vec![key.to_string()],
            "{istio}"
        );
        assert!(
            decide(&cfg, "productpage", None, 8080).is_allow(),
            "{istio}"
        );
        assert!(
            !decide(&cfg, "productpage", None, 9080).is_allow(),
            "{istio}"
        );
        assert_eq!(
            c.keys_for(workload(&cfg, "reviews"))
                .contains(&STATIC.to_string()),
            others_strict
        );
    }
}

#[test]
fn strict_ports_under_a_permissive_mode_become_one_rule_per_port() {
    let cfg = mesh(&pa(
        "bookinfo",
        "pp",
        "{selector: {matchLabels: {app: productpage}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {9443: {mode: STRICT}, 9080: {mode: STRICT}, 8080: {mode: PERMISSIVE}}}",
    ));
    let c = convert(&cfg).unwrap();
    let p = policy(&c, "bookinfo/converted_peer_authentication_pp");
    let ports: Vec<_> = p
        .rules
        .iter()
        .map(|r| r.clauses[0].matches[0].destination_ports.clone())
        .collect();
    assert_eq!(ports, vec![vec![9080], vec![9443]]);
    assert!(p
        .rules
        .iter()
        .all(|r| r.clauses[0].matches[0].not_principals == vec![StringMatch::Presence]));
    assert_eq!(
        c.keys_for(workload(&cfg, "productpage")),
        vec!["bookinfo/converted_peer_authentication_pp"]
    );
    assert!(!decide(&cfg, "productpage", None, 9443).is_allow());
    assert!(decide(&cfg, "productpage", None, 8080).is_allow());
    assert!(decide(&cfg, "productpage", None, 7000).is_allow());
}

#[test]
fn port_level_settings_that_change_nothing_send_no_converted_policy() {
    let cases = [
        // Every port STRICT under STRICT: the static policy covers it.
        (pa("bookinfo", "pp", "{selector: {matchLabels: {app: productpage}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: STRICT}}}"), true),
        // PERMISSIVE ports under PERMISSIVE.
        (pa("bookinfo", "pp", "{selector: {matchLabels: {app: productpage}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"), false),
    ];
    for (istio, strict) in cases {
        let cfg = mesh(&istio);
        let c = convert(&cfg).unwrap();
        assert_eq!(
            c.policies.iter().map(Policy::key).collect::<Vec<_>>(),
            vec![STATIC.to_string()]
        );
        assert_eq!(
            c.keys_for(workload(&cfg, "productpage"))
                .contains(&STATIC.to_string()),
            strict
        );
    }
}

#[test]
fn a_selector_peer_authentication_in_the_root_namespace_is_ignored_with_a_warning() {
    let cfg = mesh(&pa(
        "istio-system",
        "x",
        "{selector: {matchLabels: {app: productpage}}, mtls: {mode: STRICT}}",
    ));
    let c = convert(&cfg).unwrap();
    assert!(c.keys_for(workload(&cfg, "productpage")).is_empty());
    assert!(c.warnings[0].contains("ignored"));
}

// ---- bad input ----

#[test]
fn bad_istio_objects_are_refused_naming_the_field() {
    let cases: Vec<(String, &str)> = vec![
        (ap("bookinfo", "p", "{rules: [{from: [{source: {principalz: [a]}}]}]}"), "istio[0].spec.rules[0].from[0].source: unknown field `principalz`"),
        (ap("bookinfo", "p", "{action: BLOCK}"), "istio[0].spec.action"),
        (ap("bookinfo", "p", "{bogus: 1}"), "istio[0].spec"),
        ("- {apiVersion: security.istio.io/v1, kind: Sidecar, metadata: {name: a, namespace: b}, spec: {}}\n".into(), "istio[0].kind"),
        ("- {apiVersion: networking.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: a, namespace: b}, spec: {}}\n".into(), "istio[0].apiVersion"),
        ("- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: a}, spec: {}}\n".into(), "istio[0].metadata"),
        (ap("bookinfo", "Bad_Name", "{}"), "istio[0].metadata.name"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}"), "istio[0].spec.rules[0].from[0].source.ipBlocks[0]"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {notIpBlocks: [10.0.0.1, nope]}}]}]}"), "source.notIpBlocks[1]"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {remoteIpBlocks: [x]}}]}]}"), "source.remoteIpBlocks[0]"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {principals: ['']}}]}]}"), "source.principals[0]"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {namespaces: ['a*b']}}]}]}"), "source.namespaces[0]"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]}]}"), "source.principals[0]"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {serviceAccounts: ['a/b/c']}}]}]}"), "source.serviceAccounts[0]"),
        (ap("bookinfo", "p", "{rules: [{from: [{source: {}}]}]}"), "istio[0].spec.rules[0].from[0].source"),
        (ap("bookinfo", "p", "{rules: [{from: [{}]}]}"), "istio[0].spec.rules[0].from[0].source"),
        (ap("bookinfo", "p", "{rules: [{to: [{operation: {}}]}]}"), "istio[0].spec.rules[0].to[0].operation"),
        (ap("bookinfo", "p", "{rules: [{to: [{operation: {ports: ['http']}}]}]}"), "operation.ports[0]"),
        (ap("bookinfo", "p", "{rules: [{to: [{operation: {notPorts: [0]}}]}]}"), "operation.notPorts[0]"),
        (ap("bookinfo", "p", "{rules: [{to: [{operation: {ports: [70000]}}]}]}"), "operation.ports[0]"),
        (ap("bookinfo", "p", "{rules: [{to: [{operation: {methods: ['']}}]}]}"), "operation.methods[0]"),
        (ap("bookinfo", "p", "{rules: [{when: [{key: source.ip}]}]}"), "istio[0].spec.rules[0].when[0]"),
        (ap("bookinfo", "p", "{rules: [{when: [{key: source.ipz, values: [a]}]}]}"), "when[0].key"),
        (ap("bookinfo", "p", "{rules: [{when: [{key: destination.port, values: [x]}]}]}"), "when[0].values[0]"),
        (ap("bookinfo", "p", "{rules: [{when: [{key: source.ip, notValues: [1.2.3]}]}]}"), "when[0].notValues[0]"),
        (ap("bookinfo", "p", "{selector: {matchLabels: {}}}"), "spec.selector.matchLabels"),
        (ap("bookinfo", "p", "{action: CUSTOM}"), "spec.provider"),
        (ap("bookinfo", "p", "{provider: {name: x}}"), "spec.provider"),
        (ap("bookinfo", "p", "{mtls: {mode: STRICT}}"), "istio[0].spec: unknown field `mtls`"),
        (pa("bookinfo", "p", "{action: DENY}"), "istio[0].spec: unknown field `action`"),
        // Bound to a waypoint: what a waypoint cannot enforce is refused, not dropped.
        (ap("bookinfo", "p", &format!("{{action: CUSTOM, provider: {{name: x}}, {GW}}}")), "istio[0].spec.action"),
        (ap("bookinfo", "p", &format!("{{action: AUDIT, {GW}}}")), "istio[0].spec.action"),
        (ap("bookinfo", "p", &format!("{{{GW}, rules: [{{from: [{{source: {{requestPrincipals: ['*']}}}}]}}]}}")), "istio[0].spec.rules[0].from[0].source.requestPrincipals"),
        (ap("bookinfo", "p", &format!("{{{GW}, rules: [{{when: [{{key: 'request.auth.claims[iss]', values: [a]}}]}}]}}")), "istio[0].spec.rules[0].when[0].key"),
        (ap("bookinfo", "p", &format!("{{{GW}, rules: [{{when: [{{key: 'request.headers[]', values: [a]}}]}}]}}")), "istio[0].spec.rules[0].when[0].key"),
        (ap("bookinfo", "p", &format!("{{{GW}, rules: [{{to: [{{operation: {{paths: ['/a*b']}}}}]}}]}}")), "istio[0].spec.rules[0].to[0].operation.paths[0]"),
        (ap("bookinfo", "p", &format!("{{{GW}, rules: [{{to: [{{operation: {{}}}}]}}]}}")), "istio[0].spec.rules[0].to[0].operation"),
        (ap("bookinfo", "p", "{targetRefs: [{kind: Pod, group: '', name: x}]}"), "istio[0].spec.targetRefs[0]"),
        (ap("bookinfo", "p", "{targetRef: {kind: Service, group: '', name: x, namespace: default}}"), "istio[0].spec.targetRef.namespace"),
        (ap("bookinfo", "p", "{targetRef: {kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}}"), "istio[0].spec.targetRef"),
        (ap("bookinfo", "p", "{targetRef: {kind: Service, group: '', name: x}, targetRefs: []}"), "istio[0].spec.targetRefs"),
        (pa("bookinfo", "p", "{mtls: {mode: STRICTEST}}"), "istio[0].spec.mtls.mode"),
        (pa("bookinfo", "p", "{portLevelMtls: {8080: {mode: PERMISSIVE}}}"), "istio[0].spec.portLevelMtls"),
        (pa("bookinfo", "p", "{selector: {matchLabels: {a: b}}, portLevelMtls: {0: {mode: STRICT}}}"), "istio[0].spec.portLevelMtls.0"),
        ([ap("bookinfo", "p", "{}"), ap("bookinfo", "p", "{}")].concat(), "istio[1].metadata.name"),
    ];
    for (istio, field) in cases {
        let err = try_mesh(&istio).expect_err(&istio).to_string();
        assert!(
            err.contains(field),
            "{istio}: error {err:?} does not name {field}"
        );
    }
    // The same key from `policies` and `istio` is refused too.
    let yaml = format!(
        "{BASE}policies: [{{name: p, namespace: bookinfo, scope: Namespace, action: Deny, rules: []}}]\nistio:\n{}",
        ap("bookinfo", "p", "{}")
    );
    let err = MeshConfig::parse(&yaml).unwrap_err().to_string();
    assert!(err.contains("bookinfo/p"), "{err}");
}

#[test]
fn workloads_may_name_policies_made_from_istio_objects() {
    let yaml = BASE.replace(
        "labels: {app: curl}}",
        "labels: {app: curl}, authorizationPolicies: [legacy/p]}",
    ) + "istio:\n"
        + &ap("legacy", "p", "{selector: {matchLabels: {x: y}}}");
    let cfg = MeshConfig::parse(&yaml).unwrap();
    assert_eq!(
        workload(&cfg, "curl").authorization_policies,
        vec!["legacy/p"]
    );
}
