//! Waypoints in the local config format and their resolution: what a node proxy dials for each form of
//! reference, and what it refuses.

use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::state::{AppTunnelProtocol, ApplicationTunnel, LocalConfig};

/// A namespace `default` with a waypoint Deployment (two pods, one unhealthy) behind the Service
/// `waypoint`; a client; services and pods bound to the waypoint each way ztunnel's YAML can say it.
const CONFIG: &str = r#"
workloads:
- uid: c//v1/Pod/default/waypoint-a
  name: waypoint-a
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["10.0.1.1"]
  protocol: HBONE
  services:
    "default/waypoint.default.svc.cluster.local": {15008: 15008}
- uid: c//v1/Pod/default/waypoint-b
  name: waypoint-b
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["10.0.1.2"]
  protocol: HBONE
  status: Unhealthy
  services:
    "default/waypoint.default.svc.cluster.local": {15008: 15008}
- uid: c//v1/Pod/default/tunnelled
  name: tunnelled
  namespace: other
  serviceAccount: tunnelled-wp
  workloadIps: ["10.0.1.3"]
  protocol: HBONE
  applicationTunnel: {protocol: PROXY, port: 15088}
  services:
    "other/tunnelled-wp.other.svc.cluster.local": {}
- uid: c//v1/Pod/default/vm-waypoint
  name: vm-waypoint
  namespace: default
  serviceAccount: vm
  hostname: vm-waypoint.example
  workloadIps: ["10.0.1.4", "fd00::4"]
  protocol: HBONE
- uid: c//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
- uid: c//v1/Pod/default/db
  name: db
  namespace: default
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  waypoint: {destination: "/10.0.1.1", hboneMtlsPort: 15008}
- uid: c//v1/Pod/far/remote-wp
  name: remote-wp
  namespace: far
  network: net2
  serviceAccount: waypoint
  workloadIps: ["10.9.0.1"]
  protocol: HBONE
  services:
    "far/waypoint.far.svc.cluster.local": {15008: 15008}
services:
- name: waypoint
  namespace: default
  hostname: waypoint.default.svc.cluster.local
  vips: ["/10.96.1.1"]
  ports: {15008: 15008}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/waypoint-svc"]
- name: tunnelled-wp
  namespace: other
  hostname: tunnelled-wp.other.svc.cluster.local
  vips: ["/10.96.1.3"]
- name: waypoint
  namespace: far
  hostname: waypoint.far.svc.cluster.local
  vips: ["/10.96.9.1"]
  ports: {15008: 15008}
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 9080}
  waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
- name: ratings
  namespace: default
  hostname: ratings.default.svc.cluster.local
  vips: ["/10.96.0.11"]
  ports: {80: 9080}
  waypoint: {destination: {namespace: default, hostname: vm-waypoint.example}, hboneMtlsPort: 15008}
- name: canary
  namespace: default
  hostname: canary.default.svc.cluster.local
  vips: ["/10.96.0.12"]
  ports: {80: 9080}
  waypoint: {destination: "/10.96.1.1", hboneMtlsPort: 15008}
  weightedWaypoints:
  - {destination: {destination: "/10.96.1.1", hboneMtlsPort: 15008}, weight: 0}
  - {destination: {destination: "other/tunnelled-wp.other.svc.cluster.local", hboneMtlsPort: 15008}, weight: 5}
"#;

fn state() -> State {
    LocalConfig::parse(CONFIG).unwrap().into_state().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn service<'a>(st: &'a State, vip: &str) -> &'a std::sync::Arc<Service> {
    st.service_by_vip("", ip(vip), "default").unwrap()
}

fn client(st: &State) -> std::sync::Arc<Workload> {
    st.workload_by_addr("", ip("10.0.0.1")).unwrap().clone()
}

fn gw(destination: GatewayDestination) -> GatewayAddress {
    GatewayAddress {
        destination,
        hbone_mtls_port: 15008,
    }
}

#[test]
fn ztunnels_waypoint_spellings_load_into_the_state() {
    let st = state();
    assert_eq!(
        service(&st, "10.96.0.10").waypoint.as_deref().cloned(),
        Some(gw(GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        }))
    );
    assert_eq!(
        service(&st, "10.96.0.11").waypoint.as_deref().cloned(),
        Some(gw(GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "vm-waypoint.example".into(),
        }))
    );
    let db = st.workload_by_addr("", ip("10.0.0.2")).unwrap();
    assert_eq!(
        db.waypoint.as_deref().cloned(),
        Some(gw(GatewayDestination::Address {
            network: "".into(),
            ip: ip("10.0.1.1"),
        }))
    );
    let tunnelled = st.workload_by_addr("", ip("10.0.1.3")).unwrap();
    assert_eq!(
        tunnelled.application_tunnel,
        Some(ApplicationTunnel {
            protocol: AppTunnelProtocol::PROXY,
            port: Some(15088),
        })
    );
    assert_eq!(service(&st, "10.96.0.12").weighted_waypoints.len(), 2);
}

#[test]
fn malformed_waypoints_are_refused_naming_the_object() {
    let cases = [
        // No `/`: neither network/IP nor namespace/hostname.
        (
            r#"services: [{name: s, namespace: a, hostname: h, waypoint: {destination: "nowhere", hboneMtlsPort: 15008}}]"#,
            "a/h",
        ),
        // ztunnel requires the port.
        (
            r#"services: [{name: s, namespace: a, hostname: h, waypoint: {destination: "a/wp"}}]"#,
            "hboneMtlsPort",
        ),
        (
            r#"workloads: [{uid: w, namespace: a, workloadIps: [], waypoint: {destination: "/1.2.3.4", hboneMtlsPort: 15008, colour: red}}]"#,
            "colour",
        ),
        (
            r#"workloads: [{uid: w, namespace: a, workloadIps: [], applicationTunnel: {protocol: HTTP}}]"#,
            "HTTP",
        ),
        (
            r#"workloads: [{uid: w, namespace: a, workloadIps: [], waypoint: {destination: "/", hboneMtlsPort: 15008}}]"#,
            "namespace and a hostname",
        ),
    ];
    for (yaml, needle) in cases {
        let err = match LocalConfig::parse(yaml).and_then(LocalConfig::into_state) {
            Ok(_) => panic!("accepted: {yaml}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{yaml}: {err}");
    }
}

#[test]
fn a_waypoint_service_hostname_resolves_to_a_healthy_waypoint_pod_on_its_hbone_port() {
    let st = state();
    let src = client(&st);
    let reviews = service(&st, "10.96.0.10");
    for _ in 0..50 {
        let up = st
            .resolve_waypoint(
                reviews.pick_waypoint().unwrap(),
                &src,
                addr("10.96.0.10:80"),
            )
            .unwrap();
        // Never the unhealthy instance; identity = the pod's, plus the waypoint service's SANs.
        assert_eq!(up.addr, addr("10.0.1.1:15008"));
        let ids: Vec<String> = up
            .expected_identities
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            ids,
            [
                "spiffe://cluster.local/ns/default/sa/waypoint",
                "spiffe://cluster.local/ns/default/sa/waypoint-svc"
            ]
        );
    }
}

#[test]
fn a_waypoint_by_address_is_the_workload_there_or_the_service_with_that_vip() {
    let st = state();
    let src = client(&st);
    let db = st.workload_by_addr("", ip("10.0.0.2")).unwrap();
    let up = st
        .resolve_waypoint(db.waypoint.as_ref().unwrap(), &src, addr("10.0.0.2:5432"))
        .unwrap();
    assert_eq!(up.addr, addr("10.0.1.1:15008"));
    assert_eq!(up.workload.name, "waypoint-a");
    // By the waypoint service's VIP: its endpoints, load-balanced.
    let by_vip = gw(GatewayDestination::Address {
        network: "".into(),
        ip: ip("10.96.1.1"),
    });
    let up = st
        .resolve_waypoint(&by_vip, &src, addr("10.96.0.10:80"))
        .unwrap();
    assert_eq!(up.addr, addr("10.0.1.1:15008"));
}

#[test]
fn a_waypoint_workload_known_by_hostname_is_dialled_in_the_connections_family() {
    let st = state();
    let src = client(&st);
    let ratings = service(&st, "10.96.0.11");
    let wp = ratings.waypoint.as_ref().unwrap();
    let v4 = st
        .resolve_waypoint(wp, &src, addr("10.96.0.11:80"))
        .unwrap();
    assert_eq!(v4.addr, addr("10.0.1.4:15008"));
    let v6 = st
        .resolve_waypoint(wp, &src, addr("[fd00::11]:80"))
        .unwrap();
    assert_eq!(v6.addr, addr("[fd00::4]:15008"));
}

#[test]
fn a_waypoint_instance_with_a_tunnel_port_needs_no_port_mapping() {
    let st = state();
    let src = client(&st);
    let wp = gw(GatewayDestination::Hostname {
        namespace: "other".into(),
        hostname: "tunnelled-wp.other.svc.cluster.local".into(),
    });
    let up = st
        .resolve_waypoint(&wp, &src, addr("10.96.0.12:80"))
        .unwrap();
    assert_eq!(up.addr, addr("10.0.1.3:15008"));
}

#[test]
fn unusable_waypoints_say_why() {
    let st = state();
    let src = client(&st);
    let dst = addr("10.96.0.10:80");
    let missing = gw(GatewayDestination::Hostname {
        namespace: "default".into(),
        hostname: "gone.default.svc.cluster.local".into(),
    });
    assert_eq!(
        st.resolve_waypoint(&missing, &src, dst).unwrap_err(),
        WaypointError::NotFound
    );
    let nothing_there = gw(GatewayDestination::Address {
        network: "".into(),
        ip: ip("10.0.7.7"),
    });
    assert_eq!(
        st.resolve_waypoint(&nothing_there, &src, dst).unwrap_err(),
        WaypointError::NotFound
    );
    // The service exists but does not serve the port asked for.
    let wrong_port = GatewayAddress {
        hbone_mtls_port: 15009,
        ..gw(GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        })
    };
    assert_eq!(
        st.resolve_waypoint(&wrong_port, &src, dst).unwrap_err(),
        WaypointError::NoEndpoint
    );
    let zero_port = GatewayAddress {
        hbone_mtls_port: 0,
        ..gw(GatewayDestination::Address {
            network: "".into(),
            ip: ip("10.0.1.1"),
        })
    };
    assert_eq!(
        st.resolve_waypoint(&zero_port, &src, dst).unwrap_err(),
        WaypointError::NoAddress
    );
    let far = gw(GatewayDestination::Hostname {
        namespace: "far".into(),
        hostname: "waypoint.far.svc.cluster.local".into(),
    });
    // Its only instance is on another network with no gateway: no candidate at all, never dialled.
    assert_eq!(
        st.resolve_waypoint(&far, &src, dst).unwrap_err(),
        WaypointError::NoEndpoint
    );
}

#[test]
fn weighted_waypoints_are_picked_by_weight_and_zero_weights_fall_back() {
    let st = state();
    let canary = service(&st, "10.96.0.12");
    // Weight 0 for the first: always the second.
    for _ in 0..50 {
        assert!(matches!(
            &canary.pick_waypoint().unwrap().destination,
            GatewayDestination::Hostname { namespace, .. } if namespace == "other"
        ));
    }
    let mut all_zero = (**canary).clone();
    for w in &mut all_zero.weighted_waypoints {
        w.weight = 0;
    }
    assert_eq!(all_zero.pick_waypoint(), all_zero.waypoint.as_deref());
    assert_eq!(
        service(&st, "10.96.0.11").pick_waypoint(),
        service(&st, "10.96.0.11").waypoint.as_deref()
    );
}

#[test]
fn waypoint_membership_covers_the_named_workload_and_every_endpoint_of_the_named_service() {
    let st = state();
    let reviews_wp = service(&st, "10.96.0.10").waypoint.clone().unwrap();
    // Both instances count, healthy or not (ztunnel's check_gateway_address looks at every endpoint).
    for pod in ["10.0.1.1", "10.0.1.2"] {
        assert!(st.waypoint_has(&reviews_wp, |w| w.ips.contains(&ip(pod))));
    }
    assert!(!st.waypoint_has(&reviews_wp, |w| w.ips.contains(&ip("10.0.0.1"))));
    let db_wp = st
        .workload_by_addr("", ip("10.0.0.2"))
        .unwrap()
        .waypoint
        .clone()
        .unwrap();
    assert!(st.waypoint_has(&db_wp, |w| w.name == "waypoint-a"));
    assert!(!st.waypoint_has(&db_wp, |w| w.name == "waypoint-b"));
    // What the waypoints of an address are.
    let found = st.address_at("", ip("10.96.0.12")).unwrap();
    assert_eq!(found.waypoints().count(), 3);
    assert!(matches!(
        st.address_at("", ip("10.0.0.2")),
        Some(Found::Workload(_))
    ));
}

#[test]
fn traffic_from_the_waypoint_itself_needs_its_identity_and_at_a_node_proxy_its_address() {
    let st = state();
    let reviews = service(&st, "10.96.0.10");
    let waypoints = || Found::Service(reviews).waypoints();
    let wp_id: crate::identity::Identity = "spiffe://cluster.local/ns/default/sa/waypoint"
        .parse()
        .unwrap();
    let client_id: crate::identity::Identity = "spiffe://cluster.local/ns/default/sa/client"
        .parse()
        .unwrap();
    // A node proxy sees the source address: identity and address must both be a waypoint instance's.
    let at = |a: &str| SourceAddr::Known(ip(a));
    assert!(st.from_waypoint(waypoints(), &wp_id, at("10.0.1.2")));
    assert!(!st.from_waypoint(waypoints(), &wp_id, at("10.0.0.1")));
    assert!(!st.from_waypoint(waypoints(), &client_id, at("10.0.1.1")));
    // The east-west gateway sees another network's address: the identity decides alone.
    assert!(st.from_waypoint(waypoints(), &wp_id, SourceAddr::OtherNetwork));
    assert!(!st.from_waypoint(waypoints(), &client_id, SourceAddr::OtherNetwork));
}
