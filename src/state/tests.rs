use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::*;

const CONFIG: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/server-a
  name: server-a
  namespace: default
  serviceAccount: server
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  node: node-1
  services:
    "default/server.default.svc.cluster.local": {80: 8080}
- uid: cluster1//v1/Pod/default/server-b
  name: server-b
  namespace: default
  serviceAccount: server
  workloadIps: ["10.0.0.3"]
  protocol: HBONE
  capacity: 3
  services:
    "default/server.default.svc.cluster.local": {80: 9090}
- uid: cluster1//v1/Pod/default/sick
  name: sick
  namespace: default
  workloadIps: ["10.0.0.4"]
  status: Unhealthy
  services:
    "default/server.default.svc.cluster.local": {}
- uid: cluster1//v1/Pod/other/plain
  name: plain
  namespace: other
  trustDomain: example.org
  workloadIps: ["10.0.0.5"]
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8000}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/extra"]
policies:
- name: allow-nothing-special
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{destinationPorts: [9999]}]]]
"#;

fn state() -> State {
    LocalConfig::parse(CONFIG).unwrap().into_state().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn ztunnel_local_config_loads_with_defaults() {
    let st = state();
    assert_eq!(st.workload_count(), 4);
    assert_eq!(st.service_count(), 1);
    assert_eq!(st.policies().len(), 1);
    let plain = st.workload_by_addr("", ip("10.0.0.5")).unwrap();
    assert_eq!(plain.protocol, Protocol::TCP);
    assert_eq!(
        plain.identity.to_string(),
        "spiffe://example.org/ns/other/sa/default"
    );
    assert_eq!(plain.capacity, 1);
    let info = crate::config::WorkloadInfo {
        namespace: "default".into(),
        name: "server-a".into(),
        service_account: "server".into(),
    };
    assert_eq!(
        st.workload_by_info(&info).unwrap().uid,
        "cluster1//v1/Pod/default/server-a"
    );
}

#[test]
fn service_vip_balances_over_healthy_endpoints_by_capacity() {
    let st = state();
    let svc = st
        .service_by_vip("", ip("10.96.0.10"), "default")
        .unwrap()
        .clone();
    let mut hits: HashMap<SocketAddr, u32> = HashMap::new();
    for _ in 0..4000 {
        let up = st.pick_endpoint(&svc, 80, ip("10.96.0.10"), None).unwrap();
        *hits.entry(up.addr).or_default() += 1;
        assert!(up
            .expected_identities
            .iter()
            .any(|i| i.to_string() == "spiffe://cluster.local/ns/default/sa/extra"));
    }
    // The unhealthy endpoint never gets traffic; the endpoint with capacity 3 gets about three times as much.
    assert_eq!(hits.len(), 2, "{hits:?}");
    let a = hits[&"10.0.0.2:8080".parse().unwrap()] as f64;
    let b = hits[&"10.0.0.3:9090".parse().unwrap()] as f64;
    assert!((2.4..3.8).contains(&(b / a)), "ratio {}", b / a);
}

#[test]
fn service_port_that_no_endpoint_serves_has_no_upstream() {
    let st = state();
    let svc = st
        .service_by_vip("", ip("10.96.0.10"), "default")
        .unwrap()
        .clone();
    assert!(st
        .pick_endpoint(&svc, 443, ip("10.96.0.10"), None)
        .is_none());
}

#[test]
fn bad_local_configs_are_refused_with_the_reason() {
    let cases = [
        ("workloads: [{namespace: a, workloadIps: [\"not-an-ip\"]}]", "invalid"),
        ("workloads: [{namespace: a, workloadIps: []}]\nbogus: 1", "bogus"),
        ("workloads: [{namespace: a, workloadIps: [], colour: red}]", "colour"),
        ("services: [{name: s, namespace: a, hostname: h, vips: [\"10.0.0.1\"], ports: {}}]", "network/IP"),
        ("services: [{name: s, namespace: a, hostname: h, vips: [], ports: {}, subjectAltNames: [\"bob\"]}]", "subjectAltNames"),
        (
            "workloads: [{uid: x, namespace: a, workloadIps: []}, {uid: x, namespace: a, workloadIps: []}]",
            "duplicate",
        ),
        ("workloads: [{namespace: a, workloadIps: [], services: {nohost: {80: 80}}}]", "namespace/hostname"),
        ("policies: [{name: p, namespace: a, scope: Namespace, action: Allow, rules: [[[{sourceIps: [\"300.0.0.1/8\"]}]]]}]", "p"),
        ("- just a list", "invalid"),
    ];
    for (yaml, needle) in cases {
        let err = match LocalConfig::parse(yaml).and_then(LocalConfig::into_state) {
            Ok(_) => panic!("accepted: {yaml}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(needle),
            "error for {yaml:?} was {err:?}, expected it to mention {needle:?}"
        );
    }
}

#[test]
fn a_local_config_workload_naming_a_policy_the_file_lacks_is_refused() {
    // A misspelt key would otherwise be skipped, and the workload allow everything.
    let yaml = r#"
workloads:
- {uid: server, namespace: default, workloadIps: ["10.0.0.9"], authorizationPolicies: [default/allow-slep]}
policies:
- {name: allow-sleep, namespace: default, scope: WorkloadSelector, action: Allow,
   rules: [[[{principals: [!Exact "cluster.local/ns/default/sa/sleep"]}]]]}
"#;
    let err = LocalConfig::parse(yaml)
        .and_then(LocalConfig::into_state)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("server") && err.contains("default/allow-slep"),
        "{err}"
    );
    let fixed = yaml.replace("allow-slep", "allow-sleep");
    let st = LocalConfig::parse(&fixed).unwrap().into_state().unwrap();
    assert_eq!(st.policies().len(), 1);
}

#[test]
fn a_local_config_whose_only_allow_policy_is_refused_never_serves_without_it() {
    // Refused as a whole at start-up (the proxy does not start), and on reload the last good state
    // (with its ALLOW policy) keeps serving: never a state without the policy.
    let yaml = r#"
workloads:
- {uid: server, namespace: default, workloadIps: ["10.0.0.9"], authorizationPolicies: [default/allow-sleep]}
policies:
- {name: allow-sleep, namespace: default, scope: WorkloadSelector, action: Allow,
   rules: [[[{principals: [!Exact "cluster.local/ns/default/sa/sleep"]}, {sourceIps: ["10.0.0.0/33"]}]]]}
"#;
    let err = LocalConfig::parse(yaml)
        .and_then(LocalConfig::into_state)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("default/allow-sleep"), "{err}");
}

#[test]
fn empty_file_is_an_empty_state() {
    let st = LocalConfig::parse("  \n").unwrap().into_state().unwrap();
    assert_eq!(st.workload_count(), 0);
}

#[tokio::test]
async fn file_watcher_publishes_valid_changes_and_keeps_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.yaml");
    std::fs::write(&path, CONFIG).unwrap();
    let (bytes, st) = local::load_file(&path).unwrap();
    let (tx, handle) = StateHandle::new(st);
    tokio::spawn(local::watch_file(
        path.clone(),
        std::time::Duration::from_millis(20),
        bytes,
        tx,
    ));

    std::fs::write(
        &path,
        "workloads: [{namespace: a, workloadIps: [\"10.1.1.1\"]}]",
    )
    .unwrap();
    let seen = handle
        .wait_for(std::time::Duration::from_secs(5), |s| {
            (s.workload_count() == 1).then_some(())
        })
        .await;
    assert!(seen.is_some(), "change not picked up");

    std::fs::write(
        &path,
        "workloads: [{namespace: a, workloadIps: [\"nope\"]}]",
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        handle.load().workload_count(),
        1,
        "a bad edit replaced the good state"
    );
    assert!(handle.load().workload_by_addr("", ip("10.1.1.1")).is_some());
}

#[test]
fn a_workload_listing_its_address_twice_is_indexed_once_not_a_crash() {
    // Found by the xds_address fuzz target: the second copy looked up the workload before it was stored.
    let st = LocalConfig::parse(
        "workloads:\n- uid: u1\n  name: a\n  namespace: default\n  workloadIps: [\"10.0.0.9\", \"10.0.0.9\"]\n",
    )
    .unwrap()
    .into_state()
    .unwrap();
    assert_eq!(st.workload_count(), 1);
    let w = st.workload_by_addr("", ip("10.0.0.9")).expect("indexed");
    assert_eq!(w.name, "a");
}

#[test]
fn workloads_of_one_namespace_and_service_account_share_their_common_values() {
    let st = state();
    let a = &st.workloads[0];
    let b = &st.workloads[1];
    assert_eq!((&*a.name, &*b.name), ("server-a", "server-b"));
    // One copy of each common string, not one per workload.
    assert!(std::ptr::eq(a.namespace.as_ptr(), b.namespace.as_ptr()));
    assert!(std::ptr::eq(
        a.service_account.as_ptr(),
        b.service_account.as_ptr()
    ));
    assert!(std::ptr::eq(a.cluster_id.as_ptr(), b.cluster_id.as_ptr()));
    // One identity value for both (held by the two workloads only).
    assert_eq!(a.identity, b.identity);
    assert_eq!(Identity::strong_count(&a.identity), 2);
    // The service key both back is one string, shared with the endpoints' port maps' owners.
    let (ka, _) = a.services.iter().next().unwrap();
    let (kb, _) = b.services.iter().next().unwrap();
    assert!(std::ptr::eq(ka.as_ptr(), kb.as_ptr()));
    // The index keys are the workloads' own strings, not copies.
    let (key, _) = st
        .by_uid
        .get_key_value("cluster1//v1/Pod/default/server-a")
        .unwrap();
    assert!(std::ptr::eq(key.as_ptr(), a.uid.as_ptr()));
}

#[test]
fn a_dedicated_proxy_finds_its_workload_among_others_of_the_same_name() {
    let yaml = r#"
workloads:
- {uid: u1, name: app, namespace: a, serviceAccount: x, workloadIps: ["10.0.1.1"]}
- {uid: u2, name: app, namespace: b, serviceAccount: x, workloadIps: ["10.0.1.2"]}
- {uid: u3, name: app, namespace: a, serviceAccount: y, workloadIps: ["10.0.1.3"]}
- {uid: u4, name: other, namespace: a, serviceAccount: x, workloadIps: ["10.0.1.4"]}
"#;
    let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    let find = |ns: &str, name: &str, sa: &str| {
        st.workload_by_info(&WorkloadInfo {
            namespace: ns.into(),
            name: name.into(),
            service_account: sa.into(),
        })
        .map(|w| w.uid.to_string())
    };
    assert_eq!(find("a", "app", "x").as_deref(), Some("u1"));
    assert_eq!(find("b", "app", "x").as_deref(), Some("u2"));
    assert_eq!(find("a", "app", "y").as_deref(), Some("u3"));
    assert_eq!(find("a", "other", "x").as_deref(), Some("u4"));
    assert_eq!(find("b", "app", "y"), None);
    assert_eq!(find("c", "app", "x"), None);
    assert_eq!(find("a", "none", "x"), None);
}

/// A client on node-1 in r1/z1, and endpoints ever farther: `a` on its node, `b` in its zone, `c` in its
/// region, `d` in another region; `e` on another network. `unhealthy` lists the ones marked Unhealthy.
fn locality_mesh(lb: &str, unhealthy: &[&str]) -> State {
    let status = |n: &str| {
        if unhealthy.contains(&n) {
            "Unhealthy"
        } else {
            "Healthy"
        }
    };
    let mut y = String::from(
        "workloads:\n- {uid: the-client, name: client, namespace: default, node: node-1, workloadIps: [10.0.0.1], locality: {region: r1, zone: z1}}\n",
    );
    for (name, node, region, zone, ip, network) in [
        ("a", "node-1", "r1", "z1", "10.0.1.1", ""),
        ("b", "node-2", "r1", "z1", "10.0.1.2", ""),
        ("c", "node-3", "r1", "z2", "10.0.1.3", ""),
        ("d", "node-4", "r2", "z9", "10.0.1.4", ""),
        ("e", "node-5", "r1", "z1", "10.0.1.5", "net2"),
    ] {
        // Another network's endpoint is a candidate only behind its network's gateway.
        let gateway = if network.is_empty() {
            String::new()
        } else {
            format!(
                ", networkGateway: {{destination: \"{network}/192.0.2.1\", hboneMtlsPort: 15008}}"
            )
        };
        y += &format!(
            "- {{uid: {name}, name: {name}, namespace: default, node: {node}, network: \"{network}\", workloadIps: [{ip}], status: {}, locality: {{region: {region}, zone: {zone}}}, services: {{\"default/svc.default.svc.cluster.local\": {{80: 8080}}}}{gateway}}}\n",
            status(name)
        );
    }
    y += &format!("services:\n- {{name: svc, namespace: default, hostname: svc.default.svc.cluster.local, vips: [/10.96.0.1], {lb}}}\n");
    LocalConfig::parse(&y).unwrap().into_state().unwrap()
}

/// The endpoints picked for the client over many connections.
fn picked(st: &State) -> std::collections::BTreeSet<String> {
    let client = st.workload_by_addr("", ip("10.0.0.1")).unwrap().clone();
    let svc = st
        .service_by_vip("", ip("10.96.0.1"), "default")
        .unwrap()
        .clone();
    (0..300)
        .filter_map(|_| st.pick_endpoint(&svc, 80, ip("10.96.0.1"), Some(&client)))
        .map(|u| u.workload.name.to_string())
        .collect()
}

fn names(list: &[&str]) -> std::collections::BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn internal_traffic_policy_local_keeps_connections_on_the_clients_node_or_refuses_them() {
    // What istiod sends for `internalTrafficPolicy: Local`.
    let lb = "loadBalancer: {routingPreferences: [Node], mode: Strict}";
    assert_eq!(picked(&locality_mesh(lb, &[])), names(&["a"]));
    assert!(
        picked(&locality_mesh(lb, &["a"])).is_empty(),
        "never another node"
    );
}

#[test]
fn prefer_close_uses_the_nearest_healthy_endpoints_and_fails_over_outward() {
    // What istiod sends for `trafficDistribution: PreferClose`.
    let lb = "loadBalancer: {routingPreferences: [Network, Region, Zone, Subzone], mode: Failover}";
    assert_eq!(picked(&locality_mesh(lb, &[])), names(&["a", "b"]));
    assert_eq!(picked(&locality_mesh(lb, &["a", "b"])), names(&["c"]));
    assert_eq!(picked(&locality_mesh(lb, &["a", "b", "c"])), names(&["d"]));
    // Another network comes last, even in the client's zone.
    assert_eq!(
        picked(&locality_mesh(lb, &["a", "b", "c", "d"])),
        names(&["e"])
    );
    // Standard mode ignores the preference.
    let standard = "loadBalancer: {routingPreferences: [Node], mode: Standard}";
    assert_eq!(
        picked(&locality_mesh(standard, &[])),
        names(&["a", "b", "c", "d", "e"])
    );
}

#[test]
fn a_namespace_only_service_is_invisible_to_other_namespaces() {
    let yaml = r#"
services:
- {name: db, namespace: team, hostname: db.team.svc.cluster.local, vips: [/10.96.7.7], namespaceOnly: true}
"#;
    let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    assert!(st.service_by_vip("", ip("10.96.7.7"), "team").is_some());
    assert!(st
        .service_by_host("db.team.svc.cluster.local", "team")
        .is_some());
    assert!(st.service_by_vip("", ip("10.96.7.7"), "default").is_none());
    assert!(st
        .service_by_host("db.team.svc.cluster.local", "default")
        .is_none());
}

#[test]
fn an_endpoint_known_only_by_hostname_is_picked_for_resolution_at_connect() {
    let yaml = r#"
workloads:
- {uid: c, name: client, namespace: default, workloadIps: [10.0.0.1]}
- {uid: se, name: ext, namespace: default, hostname: api.example.org, workloadIps: [], protocol: TCP, services: {"default/api.example.org": {443: 8443}}}
services:
- {name: ext, namespace: default, hostname: api.example.org, vips: [/240.240.0.1]}
"#;
    let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    let svc = st
        .service_by_vip("", ip("240.240.0.1"), "default")
        .unwrap()
        .clone();
    let up = st
        .pick_endpoint(&svc, 443, ip("240.240.0.1"), None)
        .unwrap();
    assert!(up.needs_resolution());
    assert_eq!(up.addr, "0.0.0.0:8443".parse::<SocketAddr>().unwrap());
    let v6 = st.pick_endpoint(&svc, 443, ip("fd00::1"), None).unwrap();
    assert_eq!(v6.addr, "[::]:8443".parse::<SocketAddr>().unwrap());
}

#[test]
fn another_networks_endpoints_are_reached_only_through_their_gateway_never_dialled() {
    let yaml = r#"
workloads:
- {uid: c, name: client, namespace: default, network: net1, workloadIps: [10.0.0.1]}
- {uid: gw, name: ew-gateway, namespace: istio-system, serviceAccount: istio-eastwestgateway, network: net2, workloadIps: [192.0.2.1]}
- {uid: far, name: far, namespace: default, serviceAccount: far, network: net2, workloadIps: [10.2.0.1],
   networkGateway: {destination: "net2/192.0.2.1", hboneMtlsPort: 15008},
   services: {"default/svc.default.svc.cluster.local": {80: 8080}}}
- {uid: nowhere, name: nowhere, namespace: default, network: net3, workloadIps: [10.3.0.1],
   services: {"default/svc.default.svc.cluster.local": {80: 8080}, "default/lost.default.svc.cluster.local": {80: 8080}}}
- {uid: ghost, name: ghost, namespace: default, serviceAccount: ghost, network: net2, workloadIps: [],
   networkGateway: {destination: "net2/192.0.2.1", hboneMtlsPort: 15008},
   services: {"default/lost.default.svc.cluster.local": {80: 8080}}}
services:
- {name: svc, namespace: default, hostname: svc.default.svc.cluster.local, vips: [net1/10.96.0.1], ports: {80: 8080}}
- {name: lost, namespace: default, hostname: lost.default.svc.cluster.local, vips: [net1/10.96.0.2], ports: {80: 8080}}
"#;
    let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    let client = st.workload_by_addr("net1", ip("10.0.0.1")).unwrap().clone();
    let svc = st
        .service_by_vip("net1", ip("10.96.0.1"), "default")
        .unwrap()
        .clone();
    // `nowhere` (net3, no gateway) is never a candidate for a client on net1.
    let picks: std::collections::BTreeSet<String> = (0..100)
        .filter_map(|_| st.pick_endpoint(&svc, 80, ip("10.96.0.1"), Some(&client)))
        .map(|u| u.workload.name.to_string())
        .collect();
    assert_eq!(picks, names(&["far"]));
    // Without a client (no network to compare), every endpoint is one, as before.
    assert!((0..100)
        .filter_map(|_| st.pick_endpoint(&svc, 80, ip("10.96.0.1"), None))
        .any(|u| u.workload.name.as_str() == "nowhere"));
    // A remote endpoint without an address is still one (the gateway finds it); its address is not
    // for dialling.
    let lost = st
        .service_by_vip("net1", ip("10.96.0.2"), "default")
        .unwrap()
        .clone();
    let up = st
        .pick_endpoint(&lost, 80, ip("10.96.0.2"), Some(&client))
        .unwrap();
    assert_eq!(up.workload.name.as_str(), "ghost");
    assert!(up.addr.ip().is_unspecified() && !up.needs_resolution());
    // The gateway resolves to its workload, whose identity the outer tunnel expects.
    let gw = st
        .resolve_gateway_address(
            up.workload.network_gateway.as_deref().unwrap(),
            "10.96.0.2:80".parse().unwrap(),
        )
        .unwrap();
    assert_eq!(gw.addr, "192.0.2.1:15008".parse::<SocketAddr>().unwrap());
    assert_eq!(
        gw.expected_identities[0].to_string(),
        "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"
    );
    // Inside, any endpoint of the service on that network may answer (no SANs on the service).
    let ids: Vec<String> = st
        .far_identities(&svc, "net2")
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/default/sa/far"]);
}
