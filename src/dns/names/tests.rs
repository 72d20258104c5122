use super::*;
use crate::state::local::LocalConfig;

const MESH: &str = r#"
workloads:
- uid: c//v1/Pod/default/client
  name: client
  namespace: default
  workloadIps: ["10.0.0.1"]
- uid: c//v1/Pod/other/client
  name: far-client
  namespace: other
  network: net2
  workloadIps: ["10.9.0.1"]
- uid: c//v1/Pod/default/db-0
  name: db-0
  namespace: default
  workloadIps: ["10.0.0.5", "fd00::5"]
  services:
    "default/db.default.svc.cluster.local": {}
- uid: c//v1/Pod/default/db-1
  name: db-1
  namespace: default
  workloadIps: ["10.0.0.6"]
  services:
    "default/db.default.svc.cluster.local": {}
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.96.0.10", "/fd00:96::10", "net2/10.200.0.10"]
- name: reviews
  namespace: other
  hostname: reviews.other.svc.cluster.local
  vips: ["/10.96.1.10"]
- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
- name: example
  namespace: default
  hostname: "*.example.com"
  vips: ["/240.240.0.1"]
- name: exact
  namespace: default
  hostname: api.example.com
  vips: ["/240.240.0.2"]
- name: no-vip-outside
  namespace: default
  hostname: external.example.org
- name: shared-a
  namespace: a
  hostname: shared.example.net
  vips: ["/240.240.1.1"]
- name: shared-b
  namespace: pref
  hostname: shared.example.net
  vips: ["/240.240.1.2"]
"#;

fn state() -> State {
    LocalConfig::parse(MESH).unwrap().into_state().unwrap()
}

fn client<'a>(st: &'a State, ip: &str) -> &'a Arc<Workload> {
    st.workload_by_addr(
        if ip.starts_with("10.9.") { "net2" } else { "" },
        ip.parse().unwrap(),
    )
    .unwrap()
}

fn names() -> Names {
    Names::new("cluster.local", None, true)
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn answer(
    n: &Names,
    st: &State,
    from: &str,
    name: &str,
    f: Family,
) -> Option<(String, Option<String>, Vec<IpAddr>)> {
    n.lookup(st, client(st, from), name, f).map(|mut f| {
        f.addrs.sort();
        (f.host, f.alias_to, f.addrs)
    })
}

#[test]
fn a_short_service_name_resolves_in_the_clients_own_namespace() {
    let st = state();
    let n = names();
    let got = answer(&n, &st, "10.0.0.1", "reviews", Family::V4).unwrap();
    assert_eq!(got.0, "reviews.default.svc.cluster.local");
    assert_eq!(got.2, ips(&["10.96.0.10"]));
    let got = answer(&n, &st, "10.0.0.1", "reviews.other", Family::V4).unwrap();
    assert_eq!(got.0, "reviews.other.svc.cluster.local");
    let got = answer(&n, &st, "10.0.0.1", "reviews.other.svc", Family::V4).unwrap();
    assert_eq!(got.0, "reviews.other.svc.cluster.local");
    let got = answer(
        &n,
        &st,
        "10.0.0.1",
        "reviews.default.svc.cluster.local",
        Family::V6,
    )
    .unwrap();
    assert_eq!(got.2, ips(&["fd00:96::10"]));
}

#[test]
fn a_name_the_resolver_expanded_with_a_search_domain_is_aliased_to_the_stripped_name() {
    let st = state();
    let n = names();
    // The pod asked for api.example.com; its resolver tried the first search domain.
    let got = answer(
        &n,
        &st,
        "10.0.0.1",
        "api.example.com.default.svc.cluster.local",
        Family::V4,
    )
    .unwrap();
    assert_eq!(got.0, "api.example.com");
    assert_eq!(got.1.as_deref(), Some("api.example.com"));
    assert_eq!(got.2, ips(&["240.240.0.2"]));
    // A full service name is itself, never an alias.
    let got = answer(
        &n,
        &st,
        "10.0.0.1",
        "reviews.default.svc.cluster.local",
        Family::V4,
    )
    .unwrap();
    assert_eq!(got.1, None);
}

#[test]
fn wildcard_hosts_match_any_name_below_them_without_an_alias() {
    let st = state();
    let n = names();
    let got = answer(&n, &st, "10.0.0.1", "www.example.com", Family::V4).unwrap();
    assert_eq!(
        (got.0.as_str(), got.2.clone()),
        ("*.example.com", ips(&["240.240.0.1"]))
    );
    let got = answer(
        &n,
        &st,
        "10.0.0.1",
        "a.b.example.com.svc.cluster.local",
        Family::V4,
    )
    .unwrap();
    assert_eq!(got.0, "*.example.com");
    assert_eq!(
        got.1, None,
        "a wildcard match is answered under the asked name"
    );
    // The exact host wins over the wildcard.
    assert_eq!(
        answer(&n, &st, "10.0.0.1", "api.example.com", Family::V4)
            .unwrap()
            .0,
        "api.example.com"
    );
}

#[test]
fn headless_services_answer_with_their_endpoints_and_vipless_outside_hosts_are_forwarded() {
    let st = state();
    let n = names();
    let got = answer(&n, &st, "10.0.0.1", "db", Family::V4).unwrap();
    assert_eq!(got.2, ips(&["10.0.0.5", "10.0.0.6"]));
    let got = answer(&n, &st, "10.0.0.1", "db", Family::V6).unwrap();
    assert_eq!(got.2, ips(&["fd00::5"]));
    assert_eq!(
        answer(&n, &st, "10.0.0.1", "external.example.org", Family::V4),
        None
    );
    assert_eq!(
        answer(&n, &st, "10.0.0.1", "nothing.example.org", Family::V4),
        None
    );
    assert_eq!(
        answer(&n, &st, "10.0.0.1", "reviews.nope", Family::V4),
        None
    );
}

#[test]
fn vips_are_those_of_the_clients_network_and_aaaa_is_empty_when_ipv6_is_off() {
    let st = state();
    let n = names();
    let got = answer(&n, &st, "10.9.0.1", "reviews.default", Family::V4).unwrap();
    assert_eq!(got.2, ips(&["10.200.0.10"]));
    let off = Names::new("cluster.local", None, false);
    let got = answer(&off, &st, "10.0.0.1", "reviews", Family::V6).unwrap();
    assert!(got.2.is_empty(), "the name exists: NOERROR with no records");
}

#[test]
fn a_host_defined_in_several_namespaces_prefers_the_clients_then_the_preferred_one() {
    let st = state();
    let any = answer(&names(), &st, "10.0.0.1", "shared.example.net", Family::V4).unwrap();
    assert_eq!(any.0, "shared.example.net");
    let pref = Names::new("cluster.local", Some("pref".into()), true);
    let got = answer(&pref, &st, "10.0.0.1", "shared.example.net", Family::V4).unwrap();
    assert_eq!(got.2, ips(&["240.240.1.2"]));
}

#[test]
fn expansions_follow_kubernetes_name_forms() {
    let n = names();
    assert_eq!(n.kube_fqdns("ns", "a"), ["a.ns.svc.cluster.local"]);
    assert_eq!(
        n.kube_fqdns("ns", "a.b"),
        ["a.b.svc.cluster.local", "a.b.ns.svc.cluster.local"]
    );
    assert_eq!(
        n.kube_fqdns("ns", "a.b.svc"),
        ["a.b.svc.cluster.local", "a.b.svc.svc.cluster.local"]
    );
    assert_eq!(n.kube_fqdns("ns", "a.b.c"), ["a.b.c.svc.cluster.local"]);
    assert_eq!(n.kube_fqdns("ns", "a.b.c.svc"), ["a.b.c.svc.cluster.local"]);
    assert!(n.kube_fqdns("ns", "a.b.c.d").is_empty());
    assert_eq!(wildcards("a.b.c"), ["a.b.c", "*.b.c", "*.c"]);
    assert_eq!(wildcards("c"), ["c"]);
}

#[test]
fn a_services_ip_families_limit_the_answers_and_a_namespace_only_service_is_not_a_mesh_name_elsewhere(
) {
    let yaml = r#"
workloads:
- {uid: c, name: client, namespace: default, workloadIps: [10.0.0.1]}
- {uid: p, name: pod, namespace: default, workloadIps: [10.0.2.1, "fd00::2:1"], services: {"default/hl.default.svc.cluster.local": {}}}
services:
- {name: hl, namespace: default, hostname: hl.default.svc.cluster.local, ipFamilies: IPv4}
- {name: db, namespace: team, hostname: db.team.svc.cluster.local, vips: [/10.96.7.7], namespaceOnly: true}
"#;
    let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    let n = names();
    // Headless, single-stack IPv4, over dual-stack pods: no AAAA (the name exists: empty).
    assert_eq!(
        answer(&n, &st, "10.0.0.1", "hl", Family::V4).unwrap().2,
        ips(&["10.0.2.1"])
    );
    assert!(answer(&n, &st, "10.0.0.1", "hl", Family::V6)
        .unwrap()
        .2
        .is_empty());
    // Not visible from `default`: forwarded, as if outside the mesh.
    assert_eq!(answer(&n, &st, "10.0.0.1", "db.team", Family::V4), None);
}
