//! A refused policy never widens access: what the cache enforces when the control plane sends a policy
//! it cannot use (issue 11, item 5). Driven through [`Cache::apply`] and checked with the proxy's own
//! decision ([`PolicySet::check`]), the way inbound connections are.

use prost::Message;

use super::{any_resource, response};
use crate::authz::{Decision, DenyReason};
use crate::identity::Identity;
use crate::proto::security::string_match::MatchType;
use crate::proto::{security, workload as pb};
use crate::state::State;
use crate::xds::cache::Cache;
use crate::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";

/// Workload `server` (10.0.0.9, namespace default) naming `listed` in its `authorization_policies`.
fn server(listed: &[&str]) -> prost_types::Any {
    let w = pb::Workload {
        uid: "server".into(),
        name: "server".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 9]],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        authorization_policies: listed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let addr = pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    };
    prost_types::Any {
        type_url: ADDRESS_TYPE.into(),
        value: addr.encode_to_vec(),
    }
}

fn exact(v: &str) -> security::StringMatch {
    security::StringMatch {
        match_type: Some(MatchType::Exact(v.into())),
    }
}

/// A string match with no kind: a value this proxy cannot use.
fn no_kind() -> security::StringMatch {
    security::StringMatch { match_type: None }
}

fn authorization(
    name: &str,
    scope: security::Scope,
    action: security::Action,
    matches: Vec<security::Match>,
) -> security::Authorization {
    security::Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: scope as i32,
        action: action as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause { matches }],
        }],
        ..Default::default()
    }
}

fn resource(p: &security::Authorization, version: &str) -> crate::proto::discovery::Resource {
    any_resource(
        &format!("{}/{}", p.namespace, p.name),
        version,
        AUTHORIZATION_TYPE,
        p.encode_to_vec(),
    )
}

/// A cache holding workload `server` listing `listed`, then the policy resources `policies`.
/// Returns the cache, the state and the NACK entries of the policy response.
fn cache_with(
    listed: &[&str],
    policies: Vec<crate::proto::discovery::Resource>,
) -> (Cache, State, Vec<String>) {
    let mut cache = Cache::new(1000);
    let w = server(listed);
    let a = cache
        .apply(response(
            ADDRESS_TYPE,
            "a1",
            vec![any_resource("server", "1", ADDRESS_TYPE, w.value)],
            &[],
        ))
        .unwrap();
    assert!(a.rejected.is_empty(), "{:?}", a.rejected);
    let applied = cache
        .apply(response(AUTHORIZATION_TYPE, "p1", policies, &[]))
        .unwrap();
    let nacked = applied.rejected.iter().map(|r| r.name.clone()).collect();
    (cache, applied.state, nacked)
}

/// The decision for a connection from `id` (or plaintext) at 10.0.0.1 to the server's `port`.
fn decide(state: &State, id: Option<&str>, port: u16) -> Decision {
    let identity: Option<Identity> = id.map(|s| s.parse().unwrap());
    let w = state
        .workload_by_addr("", "10.0.0.9".parse().unwrap())
        .expect("server workload")
        .clone();
    let conn = crate::authz::Connection {
        src: "10.0.0.1:40000".parse().unwrap(),
        dst: std::net::SocketAddr::new("10.0.0.9".parse().unwrap(), port),
        src_identity: identity.as_ref(),
        dst_network: "",
    };
    state
        .policies()
        .check(&w.namespace, &w.authorization_policies, &conn)
}

#[test]
fn a_workload_whose_only_allow_policy_has_an_unusable_match_still_denies_other_sources() {
    // "from sleep, or from <something this proxy cannot read>".
    let p = authorization(
        "allow-sleep",
        security::Scope::WorkloadSelector,
        security::Action::Allow,
        vec![
            security::Match {
                principals: vec![exact("cluster.local/ns/default/sa/sleep")],
                ..Default::default()
            },
            security::Match {
                namespaces: vec![no_kind()],
                ..Default::default()
            },
        ],
    );
    let (_, state, nacked) = cache_with(&["default/allow-sleep"], vec![resource(&p, "1")]);
    assert_eq!(nacked, ["default/allow-sleep"]);
    assert_eq!(decide(&state, Some(SLEEP), 8080), Decision::Allow);
    assert_eq!(
        decide(&state, Some(PRODUCTPAGE), 8080),
        Decision::Deny(DenyReason::NoAllowMatch)
    );
    assert_eq!(
        decide(&state, None, 8080),
        Decision::Deny(DenyReason::NoAllowMatch)
    );
}

#[test]
fn an_allow_policy_whose_only_source_is_unusable_does_not_open_its_port_to_everyone() {
    // "port 80 from <unreadable principal>": dropping the principal (ztunnel) would allow anyone on 80.
    let p = authorization(
        "allow-80",
        security::Scope::WorkloadSelector,
        security::Action::Allow,
        vec![security::Match {
            destination_ports: vec![80],
            principals: vec![no_kind()],
            ..Default::default()
        }],
    );
    let (_, state, nacked) = cache_with(&["default/allow-80"], vec![resource(&p, "1")]);
    assert_eq!(nacked, ["default/allow-80"]);
    for (id, port) in [(Some(SLEEP), 80), (None, 80), (Some(SLEEP), 8080)] {
        assert_eq!(
            decide(&state, id, port),
            Decision::Deny(DenyReason::NoAllowMatch),
            "{id:?} to port {port}"
        );
    }
}

#[test]
fn an_allow_policy_with_an_unusable_exclusion_allows_nothing_through_that_match() {
    // "anyone but <unreadable>": without the exclusion it would allow everyone.
    let p = authorization(
        "allow-but",
        security::Scope::Namespace,
        security::Action::Allow,
        vec![security::Match {
            not_source_ips: vec![security::Address {
                address: vec![10, 0],
                length: 8,
            }],
            ..Default::default()
        }],
    );
    let (_, state, nacked) = cache_with(&[], vec![resource(&p, "1")]);
    assert_eq!(nacked, ["default/allow-but"]);
    assert_eq!(
        decide(&state, Some(SLEEP), 80),
        Decision::Deny(DenyReason::NoAllowMatch)
    );
}

#[test]
fn a_deny_policy_with_an_unusable_source_still_denies_its_port() {
    // "deny port 9999 from <unreadable principal>": read as from anyone, never as from no one.
    let p = authorization(
        "deny-9999",
        security::Scope::Namespace,
        security::Action::Deny,
        vec![security::Match {
            destination_ports: vec![9999],
            principals: vec![no_kind()],
            ..Default::default()
        }],
    );
    let (_, state, nacked) = cache_with(&[], vec![resource(&p, "1")]);
    assert_eq!(nacked, ["default/deny-9999"]);
    let denied = Decision::Deny(DenyReason::ExplicitDeny {
        policy: "default/deny-9999".into(),
    });
    assert_eq!(decide(&state, Some(SLEEP), 9999), denied);
    assert_eq!(decide(&state, None, 9999), denied);
    assert_eq!(decide(&state, Some(SLEEP), 8080), Decision::Allow);
}

#[test]
fn a_deny_policy_that_cannot_be_read_at_all_denies_its_namespace() {
    let garbage = any_resource(
        "default/deny-garbage",
        "1",
        AUTHORIZATION_TYPE,
        vec![0xff, 0xff, 0xff],
    );
    let (_, state, nacked) = cache_with(&[], vec![garbage]);
    assert_eq!(nacked, ["default/deny-garbage"]);
    assert_eq!(
        decide(&state, Some(SLEEP), 8080),
        Decision::Deny(DenyReason::ExplicitDeny {
            policy: "default/deny-garbage".into()
        })
    );
}

#[test]
fn a_policy_with_an_unknown_action_or_scope_is_enforced_at_least_as_strictly() {
    // An action this proxy does not know is enforced as a DENY of what the rules match.
    let mut audit = authorization(
        "audit-9999",
        security::Scope::WorkloadSelector,
        security::Action::Allow,
        vec![security::Match {
            destination_ports: vec![9999],
            ..Default::default()
        }],
    );
    audit.action = 7;
    let (_, state, _) = cache_with(&["default/audit-9999"], vec![resource(&audit, "1")]);
    assert!(!decide(&state, Some(SLEEP), 9999).is_allow());
    assert!(decide(&state, Some(SLEEP), 80).is_allow());
    // A scope it does not know applies to the whole namespace, not to nobody.
    let mut wide = authorization(
        "allow-sleep",
        security::Scope::WorkloadSelector,
        security::Action::Allow,
        vec![security::Match {
            principals: vec![exact("cluster.local/ns/default/sa/sleep")],
            ..Default::default()
        }],
    );
    wide.scope = 9;
    let (_, state, nacked) = cache_with(&[], vec![resource(&wide, "1")]);
    assert_eq!(nacked, ["default/allow-sleep"]);
    assert!(decide(&state, Some(SLEEP), 80).is_allow());
    assert_eq!(
        decide(&state, Some(PRODUCTPAGE), 80),
        Decision::Deny(DenyReason::NoAllowMatch)
    );
}

#[test]
fn a_refused_update_keeps_the_previous_version_of_the_policy() {
    let good = authorization(
        "allow-sleep",
        security::Scope::WorkloadSelector,
        security::Action::Allow,
        vec![security::Match {
            principals: vec![exact("cluster.local/ns/default/sa/sleep")],
            ..Default::default()
        }],
    );
    let (mut cache, _, _) = cache_with(&["default/allow-sleep"], vec![resource(&good, "1")]);
    let mut bad = good;
    bad.rules[0].clauses[0].matches[0].principals = vec![no_kind()];
    let applied = cache
        .apply(response(
            AUTHORIZATION_TYPE,
            "p2",
            vec![resource(&bad, "2")],
            &[],
        ))
        .unwrap();
    assert_eq!(applied.rejected.len(), 1);
    assert_eq!(applied.stand_ins, 0);
    // Version 1 keeps serving, and is what a reconnect reports.
    assert_eq!(decide(&applied.state, Some(SLEEP), 80), Decision::Allow);
    assert_eq!(
        decide(&applied.state, Some(PRODUCTPAGE), 80),
        Decision::Deny(DenyReason::NoAllowMatch)
    );
    assert_eq!(
        cache.versions(crate::xds::cache::Kind::Authorization),
        [("default/allow-sleep".to_string(), "1".to_string())].into()
    );
}

#[test]
fn a_stand_in_is_sent_again_on_reconnect_and_gives_way_to_a_good_version_or_a_removal() {
    let bad = authorization(
        "allow-sleep",
        security::Scope::WorkloadSelector,
        security::Action::Allow,
        vec![security::Match {
            principals: vec![no_kind()],
            ..Default::default()
        }],
    );
    let (mut cache, state, _) = cache_with(&["default/allow-sleep"], vec![resource(&bad, "1")]);
    assert!(!decide(&state, Some(SLEEP), 80).is_allow());
    // Not reported as held: the control plane sends it again after a reconnect.
    assert!(cache
        .versions(crate::xds::cache::Kind::Authorization)
        .is_empty());
    let mut good = bad.clone();
    good.rules[0].clauses[0].matches[0].principals =
        vec![exact("cluster.local/ns/default/sa/sleep")];
    let applied = cache
        .apply(response(
            AUTHORIZATION_TYPE,
            "p2",
            vec![resource(&good, "2")],
            &[],
        ))
        .unwrap();
    assert!(applied.rejected.is_empty());
    assert!(decide(&applied.state, Some(SLEEP), 80).is_allow());
    assert!(!decide(&applied.state, Some(PRODUCTPAGE), 80).is_allow());
    // Refused again: version 2 stays. Removed: gone, as the control plane says.
    let applied = cache
        .apply(response(
            AUTHORIZATION_TYPE,
            "p3",
            vec![resource(&bad, "3")],
            &[],
        ))
        .unwrap();
    assert!(decide(&applied.state, Some(SLEEP), 80).is_allow());
    let applied = cache
        .apply(response(
            AUTHORIZATION_TYPE,
            "p4",
            vec![],
            &["default/allow-sleep"],
        ))
        .unwrap();
    assert!(applied.state.policies().is_empty());
    assert!(decide(&applied.state, Some(PRODUCTPAGE), 80).is_allow());
}
