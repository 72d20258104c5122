//! Tests for the authz module: decision semantics (one table row per rule), the YAML format of
//! ztunnel's local config, refusals, and indexing.

use std::net::SocketAddr;

use super::*;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const SLEEP_OTHER_NS: &str = "spiffe://cluster.local/ns/other/sa/sleep";

fn parse(yaml: &str) -> Result<Vec<Policy>, serde_yaml::Error> {
    serde_yaml::from_str(yaml)
}

fn set(yaml: &str) -> PolicySet {
    let policies = parse(yaml).unwrap_or_else(|e| panic!("parse {yaml}: {e}"));
    PolicySet::new(policies).expect("valid policy set")
}

/// A connection to check, in test-friendly form.
#[derive(Debug, Clone, Copy)]
struct Conn {
    src: &'static str,
    dst: &'static str,
    id: Option<&'static str>,
}

/// Default connection: productpage (10.0.0.1) to 10.0.1.1:8080.
const DEFAULT_CONN: Conn = Conn {
    src: "10.0.0.1:40000",
    dst: "10.0.1.1:8080",
    id: Some(PRODUCTPAGE),
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Allow,
    ExplicitDeny(&'static str),
    NoAllowMatch,
}

fn decide(set: &PolicySet, ns: &str, keys: &[&str], c: &Conn) -> Decision {
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    let identity: Option<Identity> = c.id.map(|s| s.parse().expect("identity"));
    let conn = Connection {
        src: c.src.parse::<SocketAddr>().expect("src"),
        dst: c.dst.parse::<SocketAddr>().expect("dst"),
        src_identity: identity.as_ref(),
        dst_network: "",
    };
    set.check(ns, &keys, &conn)
}

impl Want {
    fn is(self, d: &Decision) -> bool {
        match (self, d) {
            (Want::Allow, Decision::Allow) => true,
            (Want::ExplicitDeny(k), Decision::Deny(DenyReason::ExplicitDeny { policy })) => {
                k == policy
            }
            (Want::NoAllowMatch, Decision::Deny(DenyReason::NoAllowMatch)) => true,
            _ => false,
        }
    }
}

/// One row: policies (YAML), destination workload namespace and listed keys, connection, outcome.
struct Case {
    name: &'static str,
    policies: &'static str,
    ns: &'static str,
    keys: &'static [&'static str],
    conn: Conn,
    want: Want,
}

fn run(cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let set = set(c.policies);
        let got = decide(&set, c.ns, c.keys, &c.conn);
        if !c.want.is(&got) {
            failures.push(format!("{}: want {:?}, got {:?}", c.name, c.want, got));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A DENY policy `name` in `ns` with `scope` whose single match is `m` (a YAML flow map).
macro_rules! deny {
    ($ns:literal, $name:literal, $scope:literal, $m:literal) => {
        concat!(
            "- {name: ",
            $name,
            ", namespace: ",
            $ns,
            ", scope: ",
            $scope,
            ", action: Deny, rules: [[[",
            $m,
            "]]]}\n"
        )
    };
}

/// An ALLOW policy, as [`deny!`].
macro_rules! allow {
    ($ns:literal, $name:literal, $scope:literal, $m:literal) => {
        concat!(
            "- {name: ",
            $name,
            ", namespace: ",
            $ns,
            ", scope: ",
            $scope,
            ", action: Allow, rules: [[[",
            $m,
            "]]]}\n"
        )
    };
}

#[test]
fn applicability_follows_scope_and_listed_keys() {
    run(&[
        Case {
            name: "global policy applies to a workload in any namespace",
            policies: deny!("istio-system", "g", "Global", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("istio-system/g"),
        },
        Case {
            name: "global policy outside the root namespace still applies everywhere (ztunnel indexes it under \"\")",
            policies: deny!("team-a", "g", "Global", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("team-a/g"),
        },
        Case {
            name: "namespace policy applies in its namespace",
            policies: deny!("default", "n", "Namespace", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/n"),
        },
        Case {
            name: "namespace policy does not apply in another namespace",
            policies: deny!("other", "n", "Namespace", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "namespace policy with namespace \"\" applies everywhere, as in ztunnel",
            policies: deny!("\"\"", "n", "Namespace", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("/n"),
        },
        Case {
            name: "workload-selector policy applies when the workload lists its key",
            policies: deny!("default", "w", "WorkloadSelector", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &["default/w"],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/w"),
        },
        Case {
            name: "workload-selector policy does not apply when not listed",
            policies: deny!("default", "w", "WorkloadSelector", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "a listed key applies whatever the policy's scope (ztunnel looks keys up by key)",
            policies: deny!("other", "n", "Namespace", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &["other/n"],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("other/n"),
        },
        Case {
            name: "an unknown listed key is skipped",
            policies: "[]",
            ns: "default",
            keys: &["default/missing"],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
    ]);
}

#[test]
fn decision_order_matches_istio() {
    run(&[
        Case {
            name: "no policies allows",
            policies: "[]",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "matching dry-run deny is only logged",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[[{destinationPorts: [8080]}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "matching deny denies, naming the policy",
            policies: deny!("default", "d", "Namespace", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            name: "deny wins over a matching allow",
            policies: concat!(
                allow!("default", "a", "Namespace", "{destinationPorts: [8080]}"),
                deny!("default", "d", "Namespace", "{destinationPorts: [8080]}"),
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            name: "non-matching deny and no allow policies allows",
            policies: deny!("default", "d", "Namespace", "{destinationPorts: [9999]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "a non-matching dry-run allow does not count as an allow policy",
            policies: "- {name: a, namespace: default, scope: Namespace, action: Allow, dryRun: true, rules: [[[{destinationPorts: [9999]}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "a matching dry-run allow does not rescue a connection no real allow matches",
            policies: concat!(
                "- {name: dry, namespace: default, scope: Namespace, action: Allow, dryRun: true, rules: [[[{destinationPorts: [8080]}]]]}\n",
                allow!("default", "a", "Namespace", "{destinationPorts: [9999]}"),
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
        Case {
            name: "matching allow allows",
            policies: allow!("default", "a", "Namespace", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "allow policies that all miss deny",
            policies: concat!(
                allow!("default", "a", "Namespace", "{destinationPorts: [9999]}"),
                allow!("istio-system", "g", "Global", "{destinationPorts: [9998]}"),
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
        Case {
            name: "any one of several applicable allows is enough",
            policies: concat!(
                allow!("default", "a", "Namespace", "{destinationPorts: [9999]}"),
                allow!("default", "w", "WorkloadSelector", "{destinationPorts: [8080]}"),
            ),
            ns: "default",
            keys: &["default/w"],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "an allow in another namespace does not make this workload deny-by-default",
            policies: allow!("other", "a", "Namespace", "{destinationPorts: [9999]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
    ]);
}

#[test]
fn policy_structure_any_rule_all_clauses_any_match() {
    run(&[
        Case {
            name: "allow with zero rules never matches, so it denies",
            policies: "- {name: a, namespace: default, scope: Namespace, action: Allow, rules: []}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
        Case {
            name: "deny with zero rules never matches",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: []}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "a rule with zero clauses matches everything",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: [[]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            name: "a clause with zero matches matches",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            // (In a DENY policy an empty match is refused at load: see
            // `an_empty_match_in_a_deny_policy_is_refused`.)
            name: "an all-empty match never matches",
            policies: "- {name: a, namespace: default, scope: Namespace, action: Allow, rules: [[[{}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
        Case {
            name: "an all-empty match next to a matching one: the clause matches",
            policies: "- {name: a, namespace: default, scope: Namespace, action: Allow, rules: [[[{}, {destinationPorts: [8080]}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "policy matches if any rule matches",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [1]}]], [[{destinationPorts: [8080]}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            name: "rule fails if one clause fails",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [8080]}], [{sourceIps: [192.168.0.0/16]}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "rule matches if all clauses match",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [8080]}], [{sourceIps: [10.0.0.0/8]}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            name: "clause matches if any match matches",
            policies: "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [1]}, {destinationPorts: [8080]}]]]}",
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            name: "within a match every populated kind must pass",
            policies: deny!("default", "d", "Namespace", "{destinationPorts: [8080], sourceIps: [192.168.0.0/16]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "within a kind any positive entry is enough",
            policies: deny!("default", "d", "Namespace", "{destinationPorts: [1, 8080]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
        Case {
            name: "within a kind a matching negative entry fails it, even if a positive matches",
            policies: deny!("default", "d", "Namespace", "{sourceIps: [10.0.0.0/8], notSourceIps: [10.0.0.1/32]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "a kind with only negatives passes when none match",
            policies: deny!("default", "d", "Namespace", "{notDestinationPorts: [9999]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/d"),
        },
    ]);
}

#[test]
fn match_fields_compare_the_right_connection_attribute() {
    let d = |m: &'static str, conn: Conn, want: Want| (m, conn, want);
    let plain = Conn {
        id: None,
        ..DEFAULT_CONN
    };
    let other = Conn {
        id: Some(SLEEP_OTHER_NS),
        ..DEFAULT_CONN
    };
    let v6 = Conn {
        src: "[fd00::1]:40000",
        dst: "[fd00:1::5]:8080",
        id: Some(PRODUCTPAGE),
    };
    let hit = Want::ExplicitDeny("default/d");
    let rows = [
        // (match, connection, outcome of a DENY policy with that match)
        d("{destinationIps: [10.0.1.0/24]}", DEFAULT_CONN, hit),
        d("{destinationIps: [10.0.2.0/24]}", DEFAULT_CONN, Want::Allow),
        d(
            "{notDestinationIps: [10.0.1.1/32]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d("{notDestinationIps: [10.0.2.0/24]}", DEFAULT_CONN, hit),
        d("{sourceIps: [10.0.0.1/32]}", DEFAULT_CONN, hit),
        d("{sourceIps: [10.0.1.1/32]}", DEFAULT_CONN, Want::Allow),
        d("{notSourceIps: [10.0.0.0/8]}", DEFAULT_CONN, Want::Allow),
        d("{destinationPorts: [8080]}", DEFAULT_CONN, hit),
        d("{destinationPorts: [40000]}", DEFAULT_CONN, Want::Allow),
        d("{notDestinationPorts: [8080]}", DEFAULT_CONN, Want::Allow),
        d(
            "{sourceIps: [\"fd00::/64\"], destinationIps: [\"fd00:1::/64\"]}",
            v6,
            hit,
        ),
        d("{sourceIps: [10.0.0.0/8]}", v6, Want::Allow),
        // Principals: identity without spiffe://.
        d(
            "{principals: [!Exact cluster.local/ns/default/sa/productpage]}",
            DEFAULT_CONN,
            hit,
        ),
        d(
            "{principals: [!Exact \"spiffe://cluster.local/ns/default/sa/productpage\"]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d(
            "{principals: [!Exact cluster.local/ns/default/sa/product]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d(
            "{principals: [!Prefix cluster.local/ns/default/]}",
            DEFAULT_CONN,
            hit,
        ),
        d(
            "{principals: [!Prefix cluster.local/ns/defaults]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d("{principals: [!Suffix /sa/productpage]}", DEFAULT_CONN, hit),
        d(
            "{principals: [!Suffix local/ns/default/sa/productpage]}",
            DEFAULT_CONN,
            hit,
        ),
        d(
            "{principals: [!Suffix x.cluster.local/ns/default/sa/productpage]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d("{principals: [!Presence []]}", DEFAULT_CONN, hit),
        d(
            "{notPrincipals: [!Exact cluster.local/ns/default/sa/productpage]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d(
            "{notPrincipals: [!Exact cluster.local/ns/default/sa/productpage]}",
            other,
            hit,
        ),
        // Namespaces: the identity's namespace.
        d("{namespaces: [!Exact default]}", DEFAULT_CONN, hit),
        d("{namespaces: [!Exact other]}", DEFAULT_CONN, Want::Allow),
        d("{namespaces: [!Prefix def]}", DEFAULT_CONN, hit),
        d("{namespaces: [!Suffix ault]}", DEFAULT_CONN, hit),
        d("{notNamespaces: [!Exact default]}", other, hit),
        d("{notNamespaces: [!Exact other]}", other, Want::Allow),
        // Service accounts: namespace and account both equal.
        d(
            "{serviceAccounts: [{namespace: default, serviceAccount: productpage}]}",
            DEFAULT_CONN,
            hit,
        ),
        d(
            "{serviceAccounts: [{namespace: other, serviceAccount: productpage}]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d(
            "{serviceAccounts: [{namespace: default, serviceAccount: sleep}]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d(
            "{notServiceAccounts: [{namespace: default, serviceAccount: productpage}]}",
            DEFAULT_CONN,
            Want::Allow,
        ),
        d(
            "{notServiceAccounts: [{namespace: default, serviceAccount: productpage}]}",
            other,
            hit,
        ),
        // No identity: positive identity matches fail, negative ones pass (ztunnel).
        d("{principals: [!Presence []]}", plain, Want::Allow),
        d("{principals: [!Prefix cluster.local/]}", plain, Want::Allow),
        d("{notPrincipals: [!Presence []]}", plain, hit),
        d("{notPrincipals: [!Presence []]}", DEFAULT_CONN, Want::Allow),
        d("{namespaces: [!Presence []]}", plain, Want::Allow),
        d("{notNamespaces: [!Exact default]}", plain, hit),
        d(
            "{serviceAccounts: [{namespace: default, serviceAccount: productpage}]}",
            plain,
            Want::Allow,
        ),
        d(
            "{notServiceAccounts: [{namespace: default, serviceAccount: productpage}]}",
            plain,
            hit,
        ),
    ];
    let mut failures = Vec::new();
    for (m, conn, want) in rows {
        let yaml = format!(
            "- {{name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[{m}]]]}}"
        );
        let set = set(&yaml);
        let got = decide(&set, "default", &[], &conn);
        if !want.is(&got) {
            failures.push(format!(
                "{m} with {:?}: want {want:?}, got {got:?}",
                conn.id
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn strict_mtls_as_deny_not_principals_presence_blocks_plaintext_only() {
    let set = set(deny!(
        "istio-system",
        "strict",
        "Global",
        "{notPrincipals: [!Presence []]}"
    ));
    let plain = Conn {
        id: None,
        ..DEFAULT_CONN
    };
    assert_eq!(
        decide(&set, "default", &[], &plain),
        Decision::Deny(DenyReason::ExplicitDeny {
            policy: "istio-system/strict".into()
        })
    );
    assert_eq!(decide(&set, "default", &[], &DEFAULT_CONN), Decision::Allow);
}

#[test]
fn principal_matching_without_allocation_agrees_with_the_formatted_principal() {
    let id: Identity = PRODUCTPAGE.parse().expect("identity");
    let principal = id.principal();
    let mut patterns = Vec::new();
    for i in 0..=principal.len() {
        patterns.push(principal[..i].to_string());
        patterns.push(principal[i..].to_string());
    }
    patterns.push(format!("{principal}x"));
    patterns.push(format!("x{principal}"));
    patterns.push("cluster.local/ns/default/sa/productpagf".into());
    for p in patterns {
        for m in [
            StringMatch::Exact(p.clone()),
            StringMatch::Prefix(p.clone()),
            StringMatch::Suffix(p.clone()),
        ] {
            assert_eq!(
                m.matches_principal(&id),
                m.matches(&principal),
                "{m:?} against {principal}"
            );
        }
    }
    assert!(StringMatch::Presence.matches_principal(&id));
}

#[test]
fn deny_reasons_display_like_ztunnel() {
    assert_eq!(
        DenyReason::ExplicitDeny {
            policy: "default/deny-9999".into()
        }
        .to_string(),
        "explicitly denied by: default/deny-9999"
    );
    assert_eq!(
        DenyReason::NoAllowMatch.to_string(),
        "allow policies exist, but none allowed"
    );
}

#[test]
fn ten_thousand_unrelated_policies_do_not_change_decisions_or_applicable_set() {
    let relevant = concat!(
        allow!(
            "default",
            "a",
            "Namespace",
            "{principals: [!Exact cluster.local/ns/default/sa/productpage]}"
        ),
        deny!(
            "default",
            "w",
            "WorkloadSelector",
            "{destinationPorts: [9999]}"
        ),
    );
    let small = set(relevant);
    let mut policies = parse(relevant).expect("parse");
    for i in 0..10_000 {
        let (scope, ns) = match i % 3 {
            0 => (Scope::Namespace, format!("ns-{i}")),
            1 => (Scope::WorkloadSelector, "default".to_string()),
            _ => (Scope::WorkloadSelector, format!("ns-{i}")),
        };
        policies.push(Policy {
            name: format!("p-{i}"),
            namespace: ns,
            scope,
            action: if i % 2 == 0 {
                Action::Deny
            } else {
                Action::Allow
            },
            dry_run: false,
            rules: vec![Rule {
                clauses: Vec::new(),
            }],
        });
    }
    let big = PolicySet::new(policies).expect("valid");
    assert_eq!(big.len(), 10_002);

    let keys = ["default/w".to_string()];
    assert_eq!(big.applicable("default", &keys).count(), 2);
    assert_eq!(small.applicable("default", &keys).count(), 2);

    let conns = [
        DEFAULT_CONN,
        Conn {
            id: Some(SLEEP_OTHER_NS),
            ..DEFAULT_CONN
        },
        Conn {
            dst: "10.0.1.1:9999",
            ..DEFAULT_CONN
        },
        Conn {
            id: None,
            ..DEFAULT_CONN
        },
    ];
    for c in &conns {
        assert_eq!(
            decide(&big, "default", &["default/w"], c),
            decide(&small, "default", &["default/w"], c),
            "connection {:?}",
            c.id
        );
    }
}

#[test]
fn a_policy_listed_and_applicable_by_scope_is_evaluated_once() {
    let set = set(concat!(
        allow!("default", "a", "Namespace", "{destinationPorts: [8080]}"),
        allow!("istio-system", "g", "Global", "{destinationPorts: [8080]}"),
    ));
    let keys = ["default/a".to_string(), "istio-system/g".to_string()];
    assert_eq!(set.applicable("default", &keys).count(), 2);
}

// ---- YAML format ----

#[test]
fn parses_ztunnel_local_config_policy_with_every_field() {
    let yaml = r#"
- name: deny-9999
  namespace: default
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [!Exact default]
        notNamespaces: [!Prefix kube-]
        principals: [!Exact "cluster.local/ns/default/sa/productpage"]
        notPrincipals: [!Presence []]
        sourceIps: ["10.0.0.0/8"]
        notSourceIps: ["10.1.0.0/16"]
        destinationIps: ["fd00::/8"]
        notDestinationIps: ["192.168.1.1/32"]
        destinationPorts: [80, 8080]
        notDestinationPorts: [9999]
        serviceAccounts: [{namespace: default, serviceAccount: sleep}]
        notServiceAccounts: [{namespace: default, serviceAccount: curl}]
    - []
  - []
"#;
    let policies = parse(yaml).expect("parse");
    let net = |s: &str| s.parse::<IpNet>().expect("net");
    let sa = |ns: &str, name: &str| ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    };
    let want = Policy {
        name: "deny-9999".into(),
        namespace: "default".into(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        dry_run: true,
        rules: vec![
            Rule {
                clauses: vec![
                    Clause {
                        matches: vec![Match {
                            namespaces: vec![StringMatch::Exact("default".into())],
                            not_namespaces: vec![StringMatch::Prefix("kube-".into())],
                            principals: vec![StringMatch::Exact(
                                "cluster.local/ns/default/sa/productpage".into(),
                            )],
                            not_principals: vec![StringMatch::Presence],
                            source_ips: vec![net("10.0.0.0/8")],
                            not_source_ips: vec![net("10.1.0.0/16")],
                            destination_ips: vec![net("fd00::/8")],
                            not_destination_ips: vec![net("192.168.1.1/32")],
                            destination_ports: vec![80, 8080],
                            not_destination_ports: vec![9999],
                            service_accounts: vec![sa("default", "sleep")],
                            not_service_accounts: vec![sa("default", "curl")],
                        }],
                    },
                    Clause::default(),
                ],
            },
            Rule::default(),
        ],
    };
    assert_eq!(policies, vec![want]);
    assert_eq!(policies[0].key(), "default/deny-9999");
}

#[test]
fn parses_the_reference_example_with_flow_rules_and_optional_dry_run() {
    let yaml = r#"
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{notDestinationPorts: [9999]}]]]
- name: suffix
  namespace: default
  scope: Global
  action: Deny
  dryRun: false
  rules: [[[{principals: [!Suffix /sa/sleep]}]]]
"#;
    let policies = parse(yaml).expect("parse");
    assert_eq!(policies.len(), 2);
    assert!(!policies[0].dry_run);
    assert_eq!(policies[0].scope, Scope::Namespace);
    assert_eq!(
        policies[0].rules[0].clauses[0].matches[0].not_destination_ports,
        vec![9999]
    );
    assert_eq!(
        policies[1].rules[0].clauses[0].matches[0].principals,
        vec![StringMatch::Suffix("/sa/sleep".into())]
    );
}

#[test]
fn embeds_in_a_camel_case_deny_unknown_fields_local_config() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct LocalConfig {
        #[serde(default)]
        policies: Vec<Policy>,
    }
    let cfg: LocalConfig = serde_yaml::from_str(
        "policies:\n- {name: p, namespace: default, scope: Namespace, action: Allow, rules: [[[{destinationPorts: [80]}]]]}\n",
    )
    .expect("parse");
    assert_eq!(cfg.policies.len(), 1);

    let err = serde_yaml::from_str::<LocalConfig>(
        "policies:\n- {name: p, namespace: default, scope: Namespace, action: Allow, rules: [[[{sourceIps: [not-a-cidr]}]]]}\n",
    )
    .expect_err("bad cidr");
    assert!(err.to_string().contains("default/p"), "{err}");
}

#[test]
fn serializes_back_to_the_same_yaml_shape() {
    let yaml = r#"
- name: p
  namespace: default
  scope: Global
  action: Deny
  dryRun: true
  rules: [[[{principals: [!Exact a/ns/b/sa/c, !Presence []], notSourceIps: ["10.0.0.0/8"], serviceAccounts: [{namespace: x, serviceAccount: y}]}], []]]
"#;
    let policies = parse(yaml).expect("parse");
    let out = serde_yaml::to_string(&policies).expect("serialize");
    assert!(out.contains("!Presence []"), "{out}");
    assert!(out.contains("dryRun: true"), "{out}");
    assert!(out.contains("notSourceIps"), "{out}");
    assert_eq!(parse(&out).expect("reparse"), policies);
}

/// Parsing `yaml` fails, and the message contains every one of `needles`.
fn assert_refused(yaml: &str, needles: &[&str]) {
    let err = match parse(yaml) {
        Ok(p) => panic!("accepted {yaml}: {p:?}"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(err.contains(n), "error for {yaml:?} lacks {n:?}: {err}");
    }
}

const HEAD: &str = "- {name: p, namespace: default, scope: Namespace, action: Deny, ";

#[test]
fn refuses_invalid_cidrs_naming_policy_and_field() {
    for (m, field) in [
        ("{sourceIps: [10.0.0.0/33]}", "sourceIps"),
        ("{notSourceIps: [not-an-ip]}", "notSourceIps"),
        ("{destinationIps: [10.0.0.1]}", "destinationIps"),
        ("{notDestinationIps: [\"\"]}", "notDestinationIps"),
    ] {
        assert_refused(
            &format!("{HEAD}rules: [[[{m}]]]}}"),
            &["default/p", field, "rules[0][0][0]"],
        );
    }
}

#[test]
fn refuses_empty_string_matches_naming_policy_and_field() {
    for (m, field, kind) in [
        ("{principals: [!Exact \"\"]}", "principals", "Exact"),
        ("{notPrincipals: [!Prefix \"\"]}", "notPrincipals", "Prefix"),
        ("{namespaces: [!Suffix \"\"]}", "namespaces", "Suffix"),
        ("{notNamespaces: [!Exact \"\"]}", "notNamespaces", "Exact"),
    ] {
        assert_refused(
            &format!("{HEAD}rules: [[[{{destinationPorts: [1]}}, {m}]]]}}"),
            &["default/p", field, kind, "rules[0][0][1]"],
        );
    }
}

#[test]
fn refuses_service_account_matches_with_an_empty_part() {
    assert_refused(
        &format!(
            "{HEAD}rules: [[[{{serviceAccounts: [{{namespace: \"\", serviceAccount: a}}]}}]]]}}"
        ),
        &["default/p", "serviceAccounts"],
    );
    assert_refused(
        &format!(
            "{HEAD}rules: [[[{{notServiceAccounts: [{{namespace: a, serviceAccount: \"\"}}]}}]]]}}"
        ),
        &["default/p", "notServiceAccounts"],
    );
}

#[test]
fn refuses_unknown_fields_scopes_actions_and_map_form_string_matches() {
    for (yaml, needle) in [
        (format!("{HEAD}rules: [], extra: 1}}"), "extra"),
        (format!("{HEAD}rules: [[[{{notDestinationPort: [1]}}]]]}}"), "notDestinationPort"),
        (format!("{HEAD}rules: [[[{{sourceIPs: [10.0.0.0/8]}}]]]}}"), "sourceIPs"),
        (format!("{HEAD}rules: [[[{{serviceAccounts: [{{namespace: a, serviceAccount: b, x: c}}]}}]]]}}"), "x"),
        (format!("{HEAD}rules: [[[{{principals: [{{Exact: a}}]}}]]]}}"), "principals"),
        ("- {name: p, namespace: default, scope: Cluster, action: Deny, rules: []}".to_string(), "Cluster"),
        ("- {name: p, namespace: default, scope: Namespace, action: Audit, rules: []}".to_string(), "Audit"),
        ("- {name: p, namespace: default, scope: Namespace, action: Deny}".to_string(), "rules"),
        ("- {name: p, scope: Namespace, action: Deny, rules: []}".to_string(), "namespace"),
        (format!("{HEAD}rules: [[[{{destinationPorts: [70000]}}]]]}}"), "70000"),
    ] {
        assert_refused(&yaml, &[needle]);
    }
}

#[test]
fn policy_set_refuses_duplicate_keys() {
    let policies = parse(concat!(
        allow!("default", "p", "Namespace", "{destinationPorts: [1]}"),
        deny!(
            "default",
            "p",
            "WorkloadSelector",
            "{destinationPorts: [2]}"
        ),
    ))
    .expect("parse");
    assert_eq!(
        PolicySet::new(policies).expect_err("duplicate"),
        Error::DuplicateKey {
            policy: "default/p".into()
        }
    );
}

#[test]
fn policy_set_refuses_programmatic_policies_with_empty_match_values() {
    let policy = Policy {
        name: "p".into(),
        namespace: "default".into(),
        scope: Scope::Global,
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    not_principals: vec![StringMatch::Prefix(String::new())],
                    ..Match::default()
                }],
            }],
        }],
    };
    let err = PolicySet::new(vec![policy]).expect_err("empty prefix");
    assert_eq!(
        err,
        Error::EmptyStringMatch {
            policy: "default/p".into(),
            position: MatchPosition {
                rule: 0,
                clause: 0,
                index: 0
            },
            field: MatchField::NotPrincipals,
            kind: "Prefix",
        }
    );
    assert_eq!(
        err.to_string(),
        "policy default/p: rules[0][0][0].notPrincipals: empty Prefix value (use !Presence [] to match any value)"
    );
}

#[test]
fn policy_set_lookups_and_counts() {
    let set = set(concat!(
        allow!("default", "a", "Namespace", "{destinationPorts: [1]}"),
        deny!(
            "default",
            "w",
            "WorkloadSelector",
            "{destinationPorts: [2]}"
        ),
    ));
    assert_eq!(set.len(), 2);
    assert!(!set.is_empty());
    assert!(PolicySet::default().is_empty());
    assert_eq!(set.get("default/w").map(|p| p.action), Some(Action::Deny));
    assert!(set.get("default/x").is_none());
    assert_eq!(set.iter().count(), 2);
}

// ---- Rules of reference §1.10 not covered by the tables above, one named case each ----

const PLAIN_CONN: Conn = Conn {
    id: None,
    ..DEFAULT_CONN
};

/// productpage's identity in another trust domain.
const OTHER_TRUST_DOMAIN: Conn = Conn {
    id: Some("spiffe://example.org/ns/default/sa/productpage"),
    ..DEFAULT_CONN
};

/// An IPv6 connection from productpage.
const V6_CONN: Conn = Conn {
    src: "[fd00::1]:40000",
    dst: "[fd00:1::5]:8080",
    id: Some(PRODUCTPAGE),
};

#[test]
fn decision_order_with_dry_run_and_several_matching_policies() {
    run(&[
        Case {
            name: "a matching dry-run deny does not turn an allow-policy miss into an allow",
            policies: concat!(
                "- {name: dry, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[[{destinationPorts: [8080]}]]]}\n",
                allow!("default", "a", "Namespace", "{destinationPorts: [9999]}"),
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
        Case {
            name: "a matching dry-run deny does not stop a matching allow",
            policies: concat!(
                "- {name: dry, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[[{destinationPorts: [8080]}]]]}\n",
                allow!("default", "a", "Namespace", "{destinationPorts: [8080]}"),
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "only dry-run policies (deny and allow, both matching or not) allow everything",
            policies: concat!(
                "- {name: dd, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}\n",
                "- {name: da, namespace: default, scope: Namespace, action: Allow, dryRun: true, rules: []}\n",
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "a listed dry-run workload-selector deny is only logged",
            policies: "- {name: w, namespace: default, scope: WorkloadSelector, action: Deny, dryRun: true, rules: [[]]}",
            ns: "default",
            keys: &["default/w"],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "deny is checked before allow whatever the input order (deny listed last)",
            policies: concat!(
                allow!("default", "a", "Namespace", "{destinationPorts: [8080]}"),
                allow!("istio-system", "g", "Global", "{destinationPorts: [8080]}"),
                deny!("default", "w", "WorkloadSelector", "{destinationPorts: [8080]}"),
            ),
            ns: "default",
            keys: &["default/w"],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/w"),
        },
        Case {
            name: "two matching denies: the namespace one is named before the global one (ztunnel's order)",
            policies: concat!(
                deny!("istio-system", "g", "Global", "{destinationPorts: [8080]}"),
                deny!("default", "n", "Namespace", "{destinationPorts: [8080]}"),
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/n"),
        },
        Case {
            name: "two matching denies: the global one is named before a listed one",
            policies: concat!(
                deny!("default", "w", "WorkloadSelector", "{destinationPorts: [8080]}"),
                deny!("istio-system", "g", "Global", "{destinationPorts: [8080]}"),
            ),
            ns: "default",
            keys: &["default/w"],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("istio-system/g"),
        },
        Case {
            name: "a non-matching deny does not stop the allow phase from denying",
            policies: concat!(
                deny!("default", "d", "Namespace", "{destinationPorts: [9999]}"),
                allow!("default", "a", "Namespace", "{destinationPorts: [9998]}"),
            ),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
    ]);
}

#[test]
fn scope_edge_cases() {
    run(&[
        Case {
            name: "a global allow makes every workload deny what it does not match",
            policies: allow!("istio-system", "g", "Global", "{destinationPorts: [9999]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
        Case {
            name: "a workload-selector allow that is not listed does not make the workload deny-by-default",
            policies: allow!("default", "w", "WorkloadSelector", "{destinationPorts: [9999]}"),
            ns: "default",
            keys: &[],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
        Case {
            name: "a listed workload-selector allow that misses denies",
            policies: allow!("default", "w", "WorkloadSelector", "{destinationPorts: [9999]}"),
            ns: "default",
            keys: &["default/w"],
            conn: DEFAULT_CONN,
            want: Want::NoAllowMatch,
        },
        Case {
            name: "a workload-selector policy listed by a workload in another namespace applies to it",
            policies: deny!("default", "w", "WorkloadSelector", "{destinationPorts: [8080]}"),
            ns: "other",
            keys: &["default/w"],
            conn: DEFAULT_CONN,
            want: Want::ExplicitDeny("default/w"),
        },
        Case {
            name: "a policy is found by namespace/name, not by name alone",
            policies: deny!("default", "w", "WorkloadSelector", "{destinationPorts: [8080]}"),
            ns: "default",
            keys: &["w", "other/w"],
            conn: DEFAULT_CONN,
            want: Want::Allow,
        },
    ]);
}

#[test]
fn match_field_edge_cases() {
    // (case, match, connection, whether the match matches): each row is checked in a DENY
    // policy (match → denied) and in an ALLOW policy (match → allowed, else no allow matched).
    let rows: &[(&str, &str, Conn, bool)] = &[
        // Source and destination IPs, IPv4 and IPv6.
        ("notSourceIps passes when the source is outside every listed network", "{notSourceIps: [192.168.0.0/16]}", DEFAULT_CONN, true),
        ("a /32 source CIDR matches exactly that address", "{sourceIps: [10.0.0.1/32]}", DEFAULT_CONN, true),
        ("a /0 destination CIDR matches every IPv4 destination", "{destinationIps: [0.0.0.0/0]}", DEFAULT_CONN, true),
        ("an IPv4 /0 does not match an IPv6 destination", "{destinationIps: [0.0.0.0/0]}", V6_CONN, false),
        ("an IPv6 /0 does not match an IPv4 destination", "{destinationIps: [\"::/0\"]}", DEFAULT_CONN, false),
        ("an IPv6 /128 destination matches exactly that address", "{destinationIps: [\"fd00:1::5/128\"]}", V6_CONN, true),
        ("an IPv6 destination outside the network does not match", "{destinationIps: [\"fd00:2::/64\"]}", V6_CONN, false),
        ("notDestinationIps with the IPv6 destination fails the match", "{notDestinationIps: [\"fd00:1::/64\"]}", V6_CONN, false),
        ("notSourceIps of another family passes", "{notSourceIps: [10.0.0.0/8]}", V6_CONN, true),
        ("a CIDR with host bits set still matches its network", "{sourceIps: [10.0.0.77/8]}", DEFAULT_CONN, true),
        ("destination IP is compared, not source IP", "{destinationIps: [10.0.0.1/32]}", DEFAULT_CONN, false),
        // Ports: the destination port, never the source port.
        ("notDestinationPorts passes for another port", "{notDestinationPorts: [9999, 1]}", DEFAULT_CONN, true),
        ("notDestinationPorts fails if any entry is the port", "{notDestinationPorts: [1, 8080]}", DEFAULT_CONN, false),
        ("destination port is compared, not the source port", "{notDestinationPorts: [40000]}", DEFAULT_CONN, true),
        // String matches on namespaces.
        ("namespaces presence matches a peer with an identity", "{namespaces: [!Presence []]}", DEFAULT_CONN, true),
        ("namespaces exact is case-sensitive", "{namespaces: [!Exact Default]}", DEFAULT_CONN, false),
        ("namespaces prefix that is longer than the namespace does not match", "{namespaces: [!Prefix defaults]}", DEFAULT_CONN, false),
        ("namespaces suffix that does not end the namespace does not match", "{namespaces: [!Suffix defaul]}", DEFAULT_CONN, false),
        ("notNamespaces presence fails for a peer with an identity", "{notNamespaces: [!Presence []]}", DEFAULT_CONN, false),
        ("notNamespaces presence passes without identity (namespace is \"\")", "{notNamespaces: [!Presence []]}", PLAIN_CONN, true),
        ("namespaces exact never matches without identity", "{namespaces: [!Exact default]}", PLAIN_CONN, false),
        ("namespaces are the peer identity's, not the destination workload's", "{namespaces: [!Exact default]}", Conn { id: Some(SLEEP_OTHER_NS), ..DEFAULT_CONN }, false),
        // String matches on principals.
        ("principals exact includes the trust domain", "{principals: [!Exact cluster.local/ns/default/sa/productpage]}", OTHER_TRUST_DOMAIN, false),
        ("principals suffix ignores the trust domain", "{principals: [!Suffix /ns/default/sa/productpage]}", OTHER_TRUST_DOMAIN, true),
        ("principals prefix on the trust domain", "{principals: [!Prefix example.org/]}", OTHER_TRUST_DOMAIN, true),
        ("principals exact is case-sensitive", "{principals: [!Exact cluster.local/ns/default/sa/ProductPage]}", DEFAULT_CONN, false),
        ("notPrincipals prefix fails the match for a peer it covers", "{notPrincipals: [!Prefix cluster.local/ns/default/]}", DEFAULT_CONN, false),
        ("notPrincipals suffix passes for a peer it does not cover", "{notPrincipals: [!Suffix /sa/sleep]}", DEFAULT_CONN, true),
        ("notPrincipals exact passes without identity", "{notPrincipals: [!Exact cluster.local/ns/default/sa/productpage]}", PLAIN_CONN, true),
        ("principals suffix never matches without identity", "{principals: [!Suffix /sa/productpage]}", PLAIN_CONN, false),
        // Service accounts.
        ("service accounts match the identity in any trust domain", "{serviceAccounts: [{namespace: default, serviceAccount: productpage}]}", OTHER_TRUST_DOMAIN, true),
        ("service accounts: any listed account is enough", "{serviceAccounts: [{namespace: default, serviceAccount: sleep}, {namespace: default, serviceAccount: productpage}]}", DEFAULT_CONN, true),
        ("notServiceAccounts of another account passes", "{notServiceAccounts: [{namespace: default, serviceAccount: sleep}]}", DEFAULT_CONN, true),
        // Kinds combine with AND inside one match.
        ("identity and network kinds in one match: all must pass", "{principals: [!Presence []], sourceIps: [10.0.0.0/8], destinationPorts: [8080], namespaces: [!Exact default]}", DEFAULT_CONN, true),
        ("identity and network kinds in one match: one failing kind fails the match", "{principals: [!Presence []], sourceIps: [10.0.0.0/8], destinationPorts: [8080], namespaces: [!Exact other]}", DEFAULT_CONN, false),
    ];
    let mut failures = Vec::new();
    for &(name, m, conn, hit) in rows {
        let yaml = format!(
            "- {{name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[{m}]]]}}"
        );
        let got = decide(&set(&yaml), "default", &[], &conn);
        let want = if hit {
            Want::ExplicitDeny("default/d")
        } else {
            Want::Allow
        };
        if !want.is(&got) {
            failures.push(format!("{name}: {m}: want {want:?}, got {got:?}"));
        }
        // The same match in an ALLOW policy gives the mirror decision.
        let yaml = format!(
            "- {{name: a, namespace: default, scope: Namespace, action: Allow, rules: [[[{m}]]]}}"
        );
        let got = decide(&set(&yaml), "default", &[], &conn);
        let want = if hit { Want::Allow } else { Want::NoAllowMatch };
        if !want.is(&got) {
            failures.push(format!(
                "{name} (as allow): {m}: want {want:?}, got {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_empty_match_in_a_deny_policy_is_refused() {
    let err = parse(
        "- {name: d, namespace: default, scope: Namespace, action: Deny, rules: [[[{}, {destinationPorts: [8080]}]]]}",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("default/d") && err.contains("empty match"),
        "{err}"
    );
}
