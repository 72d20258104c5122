//! The fail-safe form, rule by rule: what a policy that lost unusable entries still allows and denies.

use std::net::SocketAddr;

use super::super::{Connection, Decision, DenyReason, PolicySet, ServiceAccountMatch};
use super::*;
use crate::identity::Identity;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";

/// The only match of the policies below.
const AT: MatchPosition = MatchPosition {
    rule: 0,
    clause: 0,
    index: 0,
};

/// A policy `default/p` (Namespace scope) whose single match is `m`, a YAML flow map.
fn policy(action: &str, m: &str) -> Policy {
    let yaml = format!(
        "{{name: p, namespace: default, scope: Namespace, action: {action}, rules: [[[{m}]]]}}"
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

fn lost(field: MatchField) -> Vec<Unusable> {
    vec![Unusable {
        position: AT,
        field,
    }]
}

/// Whether a connection from `id` (or plaintext) to port `port` of a workload in `default` is allowed
/// with `p` as the only policy. The fail-safe form must also pass the policy set's validation.
fn allowed(p: &Policy, id: Option<&str>, port: u16) -> bool {
    let set = PolicySet::new(vec![p.clone()]).expect("fail-safe form validates");
    let identity: Option<Identity> = id.map(|s| s.parse().unwrap());
    let conn = Connection {
        src: "10.0.0.1:40000".parse::<SocketAddr>().unwrap(),
        dst: SocketAddr::new("10.0.1.1".parse().unwrap(), port),
        src_identity: identity.as_ref(),
        dst_network: "",
    };
    match set.check("default", &[], &conn) {
        Decision::Allow => true,
        Decision::Deny(DenyReason::NoAllowMatch | DenyReason::ExplicitDeny { .. }) => false,
    }
}

#[test]
fn allow_keeps_the_usable_entries_of_a_list_that_lost_one() {
    let p = policy(
        "Allow",
        r#"{principals: [!Exact "cluster.local/ns/default/sa/sleep"]}"#,
    )
    .fail_safe(&lost(MatchField::Principals));
    assert!(allowed(&p, Some(SLEEP), 8080));
    assert!(!allowed(&p, Some(PRODUCTPAGE), 8080));
}

#[test]
fn allow_whose_source_list_lost_every_entry_does_not_open_the_rest_of_the_match() {
    // "port 8080 from <unusable>": the emptied list must not pass everyone on 8080.
    let p = policy("Allow", "{destinationPorts: [8080]}").fail_safe(&lost(MatchField::Principals));
    assert!(!allowed(&p, Some(SLEEP), 8080));
    assert!(!allowed(&p, None, 8080));
}

#[test]
fn allow_whose_exclusion_is_unusable_matches_nothing() {
    let p =
        policy("Allow", "{destinationPorts: [8080]}").fail_safe(&lost(MatchField::NotSourceIps));
    assert!(!allowed(&p, Some(SLEEP), 8080));
}

#[test]
fn deny_reads_an_unusable_source_as_anyone_and_keeps_its_other_conditions() {
    let p = policy(
        "Deny",
        r#"{destinationPorts: [8080], principals: [!Exact "cluster.local/ns/default/sa/productpage"]}"#,
    )
    .fail_safe(&lost(MatchField::Principals));
    assert!(!allowed(&p, Some(SLEEP), 8080));
    assert!(!allowed(&p, None, 8080));
    assert!(allowed(&p, Some(SLEEP), 9090));
}

#[test]
fn deny_keeps_its_usable_exclusions_when_one_is_unusable() {
    let p = policy(
        "Deny",
        r#"{destinationPorts: [8080], notPrincipals: [!Exact "cluster.local/ns/default/sa/sleep"]}"#,
    )
    .fail_safe(&lost(MatchField::NotPrincipals));
    assert!(allowed(&p, Some(SLEEP), 8080));
    assert!(!allowed(&p, Some(PRODUCTPAGE), 8080));
}

#[test]
fn deny_match_left_with_no_condition_denies_every_connection() {
    let p =
        policy("Deny", "{destinationPorts: [8080]}").fail_safe(&lost(MatchField::DestinationPorts));
    assert_eq!(p.rules[0].clauses[0].matches[0], Match::every_connection());
    for (id, port) in [(Some(SLEEP), 8080), (None, 1), (Some(PRODUCTPAGE), 65535)] {
        assert!(!allowed(&p, id, port), "{id:?}:{port}");
    }
    // Also a DENY sent with an empty match (which `validate` refuses), and over IPv6.
    let mut p = policy("Deny", "{destinationPorts: [1]}");
    p.rules[0].clauses[0].matches[0] = Match::default();
    let p = p.fail_safe(&[]);
    let set = PolicySet::new(vec![p]).unwrap();
    let conn = Connection {
        src: "[fd00::1]:40000".parse().unwrap(),
        dst: "[fd00::2]:80".parse().unwrap(),
        src_identity: None,
        dst_network: "",
    };
    assert!(!set.check("default", &[], &conn).is_allow());
}

#[test]
fn values_that_validate_refuses_are_left_out_by_the_same_rules() {
    // ALLOW from "" or sleep: sleep only.
    let mut p = policy(
        "Allow",
        r#"{principals: [!Exact "cluster.local/ns/default/sa/sleep"]}"#,
    );
    p.rules[0].clauses[0].matches[0]
        .principals
        .insert(0, StringMatch::Exact(String::new()));
    assert!(p.validate().is_err());
    let p = p.fail_safe(&[]);
    assert!(allowed(&p, Some(SLEEP), 80));
    assert!(!allowed(&p, Some(PRODUCTPAGE), 80));
    // DENY port 8080 to service account "/x": to anyone.
    let mut p = policy("Deny", "{destinationPorts: [8080]}");
    p.rules[0].clauses[0].matches[0].service_accounts = vec![ServiceAccountMatch {
        namespace: String::new(),
        service_account: "x".into(),
    }];
    let p = p.fail_safe(&[]);
    assert!(!allowed(&p, Some(SLEEP), 8080));
    assert!(allowed(&p, Some(SLEEP), 80));
}

#[test]
fn an_unusable_entry_changes_only_its_own_match() {
    // ALLOW "from sleep" OR "port 9090 from <unusable>": the first alternative still allows sleep.
    let yaml = r#"{name: p, namespace: default, scope: Namespace, action: Allow, rules: [[[
        {principals: [!Exact "cluster.local/ns/default/sa/sleep"]}, {destinationPorts: [9090]}]]]}"#;
    let p: Policy = serde_yaml::from_str(yaml).unwrap();
    let p = p.fail_safe(&[Unusable {
        position: MatchPosition { index: 1, ..AT },
        field: MatchField::Principals,
    }]);
    assert!(allowed(&p, Some(SLEEP), 80));
    assert!(!allowed(&p, Some(PRODUCTPAGE), 9090));
}
