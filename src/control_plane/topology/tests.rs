//! Networks, east-west gateways and localities: what a two-network mesh file sends, one case per rule.

use super::*;
use crate::control_plane::translate::{pod_uid, translate, Resources};

/// Two networks, each with its east-west gateway (as Istio's docs write it) and one instance; `reviews`
/// has an endpoint on each network. Pods name their network by label, by field, or by namespace.
const MESH: &str = r#"
nodes:
  node-1: {labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1a}}
  node-2: {labels: {topology.kubernetes.io/region: us, topology.kubernetes.io/zone: us-1a, topology.istio.io/subzone: rack-3}}
namespaces:
  istio-system: {}
  default: {labels: {istio.io/dataplane-mode: ambient}}
  west: {labels: {istio.io/dataplane-mode: ambient, topology.istio.io/network: network2}}
workloads:
- {name: eastwest-1, namespace: istio-system, serviceAccount: istio-eastwestgateway, ips: [10.1.0.100], node: node-1, labels: {gateway.networking.k8s.io/gateway-name: eastwest-network1, istio.io/dataplane-mode: none}}
- {name: eastwest-2, namespace: istio-system, serviceAccount: istio-eastwestgateway, ips: [10.2.0.100], node: node-2, labels: {gateway.networking.k8s.io/gateway-name: eastwest-network2, istio.io/dataplane-mode: none}}
- {name: productpage, namespace: default, serviceAccount: productpage, ips: [10.1.0.5], node: node-1, labels: {app: productpage, topology.istio.io/network: network1}}
- {name: reviews-v1, namespace: default, serviceAccount: reviews, ips: [10.1.0.6], node: node-1, network: network1, labels: {app: reviews}}
- {name: reviews-v2, namespace: default, serviceAccount: reviews, ips: [10.2.0.6], node: node-2, network: network2, labels: {app: reviews}}
- {name: ratings, namespace: west, serviceAccount: ratings, ips: [10.2.0.7], node: node-2, labels: {app: ratings}}
services:
- {name: reviews, namespace: default, vips: [10.96.0.6], ports: [{port: 9080, name: http}], selector: {app: reviews}, trafficDistribution: PreferClose}
- {name: ratings, namespace: west, vips: [10.96.0.7, "fd00::7"], ports: [{port: 9080, name: http}], selector: {app: ratings}}
istio:
"#;

/// An east-west Gateway for `network`, named `eastwest-<network>` in istio-system, with `spec` lines
/// added (indented under `spec:`) and its HBONE listener replaced by `listeners` when given.
fn east_west(network: &str, spec: &str, listeners: Option<&str>) -> String {
    let listeners = listeners.unwrap_or(
        "[{name: mesh, port: 15008, protocol: HBONE, tls: {mode: Terminate, options: {gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL}}}]",
    );
    format!(
        "- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {{name: eastwest-{network}, namespace: istio-system, labels: {{topology.istio.io/network: {network}}}}}
  spec:
    gatewayClassName: istio-east-west
    listeners: {listeners}
{spec}"
    )
}

fn both_gateways() -> String {
    format!(
        "{}{}",
        east_west("network1", "", None),
        east_west("network2", "", None)
    )
}

fn try_mesh(base: &str, istio: &str) -> Result<MeshConfig, Error> {
    MeshConfig::parse(&format!("{base}{istio}"))
}

fn mesh(base: &str, istio: &str) -> MeshConfig {
    try_mesh(base, istio).unwrap_or_else(|e| panic!("{e}"))
}

fn refusal(base: &str, istio: &str) -> String {
    try_mesh(base, istio).expect_err("refused").to_string()
}

fn workload<'a>(res: &'a Resources, uid: &str) -> &'a wl::Workload {
    match res.addresses.get(uid).and_then(|a| a.r#type.as_ref()) {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("{uid}: not a workload: {other:?}"),
    }
}

fn pod<'a>(res: &'a Resources, ns: &str, name: &str) -> &'a wl::Workload {
    workload(res, &pod_uid("Kubernetes", ns, name))
}

fn service<'a>(res: &'a Resources, key: &str) -> &'a wl::Service {
    match res.addresses.get(key).and_then(|a| a.r#type.as_ref()) {
        Some(wl::address::Type::Service(s)) => s,
        other => panic!("{key}: not a service: {other:?}"),
    }
}

fn gateway_at(network: &str, ip: [u8; 4], port: u32) -> Option<wl::GatewayAddress> {
    Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Address(
            wl::NetworkAddress {
                network: network.into(),
                address: ip.to_vec(),
                length: None,
            },
        )),
        hbone_mtls_port: port,
    })
}

/// The VIPs of a service as `network/ip`.
fn vips(s: &wl::Service) -> Vec<String> {
    s.addresses
        .iter()
        .map(|a| {
            let ip = match a.address.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(a.address.as_slice()).unwrap()),
                _ => IpAddr::from(<[u8; 16]>::try_from(a.address.as_slice()).unwrap()),
            };
            format!("{}/{ip}", a.network)
        })
        .collect()
}

#[test]
fn each_workload_of_a_network_with_an_east_west_gateway_is_sent_that_gateway() {
    let res = translate(&mesh(MESH, &both_gateways()));
    let v2 = pod(&res, "default", "reviews-v2");
    assert_eq!(v2.network, "network2");
    assert_eq!(
        v2.network_gateway,
        gateway_at("network2", [10, 2, 0, 100], 15008)
    );
    let v1 = pod(&res, "default", "reviews-v1");
    assert_eq!(v1.network, "network1");
    assert_eq!(
        v1.network_gateway,
        gateway_at("network1", [10, 1, 0, 100], 15008)
    );
    assert_eq!(
        pod(&res, "west", "ratings").network_gateway,
        gateway_at("network2", [10, 2, 0, 100], 15008)
    );
    // The gateways' own pods are on their Gateway's network, and get none.
    for (name, network) in [("eastwest-1", "network1"), ("eastwest-2", "network2")] {
        let gw = pod(&res, "istio-system", name);
        assert_eq!(gw.network, network, "{name}");
        assert_eq!(gw.network_gateway, None, "{name}");
    }
    // Each gateway's address is an instance's IP: no NetworkGateway workload.
    assert!(
        !res.addresses
            .keys()
            .any(|k| k.starts_with("NetworkGateway/")),
        "{:?}",
        res.addresses.keys()
    );
}

#[test]
fn pod_networks_come_from_the_field_the_label_the_gateway_the_namespace_then_the_root_namespace() {
    let base = MESH
        .replace(
            "  istio-system: {}",
            "  istio-system: {labels: {topology.istio.io/network: network1}}",
        )
        .replace(
            "- {name: ratings, namespace: west, serviceAccount",
            "- {name: plain, namespace: default, ips: [10.1.0.9]}\n- {name: labelled-too, namespace: west, ips: [10.1.0.10], network: network3, labels: {topology.istio.io/network: network4}}\n- {name: ratings, namespace: west, serviceAccount",
        );
    let cfg = mesh(&base, &east_west("network2", "", None));
    let res = translate(&cfg);
    let network = |ns: &str, name: &str| pod(&res, ns, name).network.clone();
    assert_eq!(network("default", "reviews-v2"), "network2"); // its field
    assert_eq!(network("default", "productpage"), "network1"); // its label
    assert_eq!(network("west", "labelled-too"), "network3"); // the field wins over the label
    assert_eq!(network("istio-system", "eastwest-2"), "network2"); // its Gateway's, over its namespace's
    assert_eq!(network("west", "ratings"), "network2"); // its namespace's
    assert_eq!(network("default", "plain"), "network1"); // the root namespace's (the cluster's)
                                                         // Without any label, the default network.
    let res = translate(&mesh(&MESH.replace("network: network2, ", ""), ""));
    assert_eq!(pod(&res, "default", "reviews-v2").network, "");
    assert_eq!(pod(&res, "istio-system", "eastwest-2").network, "");
}

#[test]
fn service_vips_are_sent_on_every_network_in_use() {
    let res = translate(&mesh(MESH, &both_gateways()));
    let reviews = service(&res, "default/reviews.default.svc.cluster.local");
    assert_eq!(vips(reviews), ["network1/10.96.0.6", "network2/10.96.0.6"]);
    let ratings = service(&res, "west/ratings.west.svc.cluster.local");
    assert_eq!(
        vips(ratings),
        [
            "network1/10.96.0.7",
            "network1/fd00::7",
            "network2/10.96.0.7",
            "network2/fd00::7"
        ]
    );
    assert_eq!(ratings.ip_families, wl::IpFamilies::Dual as i32);
    // A pod on the default network adds it.
    let base = MESH.replace(
        "- {name: ratings, namespace: west, serviceAccount",
        "- {name: plain, namespace: default, ips: [10.3.0.1]}\n- {name: ratings, namespace: west, serviceAccount",
    );
    let res = translate(&mesh(&base, ""));
    let reviews = service(&res, "default/reviews.default.svc.cluster.local");
    assert_eq!(
        vips(reviews),
        ["/10.96.0.6", "network1/10.96.0.6", "network2/10.96.0.6"]
    );
}

#[test]
fn a_one_network_mesh_sends_each_vip_once_on_that_network() {
    let one = "namespaces: {default: {}}\nworkloads:\n- {name: a, namespace: default, ips: [10.0.0.1]}\nservices:\n- {name: a, namespace: default, vips: [10.96.0.1], selector: {x: y}}\n";
    let res = translate(&MeshConfig::parse(one).unwrap());
    assert_eq!(
        vips(service(&res, "default/a.default.svc.cluster.local")),
        ["/10.96.0.1"]
    );
    let labelled = one.replace(
        "default: {}",
        "default: {labels: {topology.istio.io/network: n1}}",
    );
    let res = translate(&MeshConfig::parse(&labelled).unwrap());
    assert_eq!(
        vips(service(&res, "default/a.default.svc.cluster.local")),
        ["n1/10.96.0.1"]
    );
    // No pods: the default network, as before.
    let empty = "namespaces: {default: {}}\nservices:\n- {name: a, namespace: default, vips: [10.96.0.1]}\n";
    let res = translate(&MeshConfig::parse(empty).unwrap());
    assert_eq!(
        vips(service(&res, "default/a.default.svc.cluster.local")),
        ["/10.96.0.1"]
    );
}

#[test]
fn a_gateway_without_addresses_is_at_its_first_instance_by_name() {
    let base = MESH.replace(
        "- {name: productpage,",
        "- {name: eastwest-0, namespace: istio-system, serviceAccount: istio-eastwestgateway, ips: [10.2.0.99, 10.2.0.98], labels: {gateway.networking.k8s.io/gateway-name: eastwest-network2}}\n- {name: productpage,",
    );
    let res = translate(&mesh(&base, &both_gateways()));
    assert_eq!(
        pod(&res, "default", "reviews-v2").network_gateway,
        gateway_at("network2", [10, 2, 0, 99], 15008)
    );
}

#[test]
fn a_gateway_address_given_in_the_spec_is_used_and_sent_as_istiods_network_gateway_workload() {
    let gw2 = east_west(
        "network2",
        "    addresses: [{type: IPAddress, value: 192.0.2.20}]\n",
        Some("[{name: other, port: 15443, protocol: TLS}, {name: mesh, port: 15009, protocol: HBONE, tls: {mode: Terminate}}]"),
    );
    let cfg = mesh(MESH, &format!("{}{gw2}", east_west("network1", "", None)));
    let res = translate(&cfg);
    assert_eq!(
        pod(&res, "default", "reviews-v2").network_gateway,
        gateway_at("network2", [192, 0, 2, 20], 15009)
    );
    let gw = workload(&res, "NetworkGateway/network2/192.0.2.20/15009");
    assert_eq!(gw.name, "NetworkGateway/network2/192.0.2.20/15009");
    assert_eq!(gw.namespace, "istio-system");
    assert_eq!(gw.service_account, "istio-eastwestgateway"); // its instance's identity
    assert_eq!(gw.network, "network2");
    assert_eq!(gw.addresses, vec![vec![192, 0, 2, 20]]);
    assert_eq!(gw.network_gateway, None);
    assert_eq!(gw.tunnel_protocol, wl::TunnelProtocol::None as i32);
    // Network1's is its instance's IP: no such workload.
    assert!(!res
        .addresses
        .contains_key("NetworkGateway/network1/10.1.0.100/15008"));

    // No instance: the service-account annotation, else the Gateway's name (istiod's GatewaySA).
    let base = MESH.replace("gateway-name: eastwest-network2", "gateway-name: gone");
    let bare = east_west(
        "network2",
        "    addresses: [{value: \"192.0.2.20\"}]\n",
        None,
    );
    let res = translate(&mesh(&base, &bare));
    assert_eq!(
        workload(&res, "NetworkGateway/network2/192.0.2.20/15008").service_account,
        "eastwest-network2"
    );
    let annotated = bare.replace(
        "labels: {topology.istio.io/network: network2}",
        "labels: {topology.istio.io/network: network2}, annotations: {gateway.istio.io/service-account: ew}",
    );
    let res = translate(&mesh(&base, &annotated));
    assert_eq!(
        workload(&res, "NetworkGateway/network2/192.0.2.20/15008").service_account,
        "ew"
    );
}

#[test]
fn of_two_gateways_for_one_network_the_first_by_namespace_and_name_is_used() {
    let base = MESH.replace("  istio-system: {}", "  istio-system: {}\n  aaa: {}");
    let other = east_west("network2", "    addresses: [{value: 192.0.2.1}]\n", None).replace(
        "name: eastwest-network2, namespace: istio-system",
        "name: zzz, namespace: aaa",
    );
    let cfg = mesh(
        &base,
        &format!("{}{other}", east_west("network2", "", None)),
    );
    let topology = Topology::convert(&cfg).unwrap();
    let used = topology.gateway("network2").unwrap();
    assert_eq!(
        (used.namespace.as_str(), used.name.as_str()),
        ("aaa", "zzz")
    );
    assert!(
        topology
            .warnings
            .iter()
            .any(|w| w.contains("istio-system/eastwest-network2") && w.contains("aaa/zzz is used")),
        "{:?}",
        topology.warnings
    );
    // The same whichever comes first in the file.
    let swapped = mesh(
        &base,
        &format!("{other}{}", east_west("network2", "", None)),
    );
    assert_eq!(
        Topology::convert(&swapped).unwrap().gateway("network2"),
        Some(used)
    );
}

#[test]
fn a_gateway_with_no_address_is_not_used_and_says_so() {
    let base = MESH.replace("gateway-name: eastwest-network2", "gateway-name: gone");
    let cfg = mesh(&base, &both_gateways());
    let topology = Topology::convert(&cfg).unwrap();
    assert_eq!(topology.gateway("network2"), None);
    let warnings = topology.warnings.join("\n");
    assert!(
        warnings.contains("eastwest-network2") && warnings.contains("no address"),
        "{warnings}"
    );
    assert!(
        warnings.contains("network \"network2\" has pods but no east-west gateway"),
        "{warnings}"
    );
    let res = translate(&cfg);
    assert_eq!(pod(&res, "default", "reviews-v2").network_gateway, None);
    assert!(pod(&res, "default", "reviews-v1").network_gateway.is_some());
}

#[test]
fn one_ip_may_be_used_once_per_network() {
    // The same IP on two networks (networks by label and namespace, not only by field).
    let base = MESH.replace("ips: [10.2.0.7]", "ips: [10.1.0.5]");
    mesh(&base, "");
    let base = MESH.replace("ips: [10.2.0.6]", "ips: [10.2.0.7]");
    let err = refusal(&base, "");
    assert!(
        err.contains("workloads[5].ips[0]") && err.contains("workloads[4]"),
        "{err}"
    );
}

#[test]
fn east_west_gateways_istiod_would_not_use_are_refused_naming_the_field() {
    let gw = |spec: &str, listeners: Option<&str>| east_west("network2", spec, listeners);
    let cases = [
        (
            gw("", None).replace("labels: {topology.istio.io/network: network2}", "labels: {}"),
            "istio[0].metadata.labels.topology.istio.io/network",
        ),
        (
            gw("", Some("[{name: tls, port: 15443, protocol: TLS}]")),
            "istio[0].spec.listeners:",
        ),
        (gw("", Some("[]")), "istio[0].spec.listeners:"),
        (
            gw("", Some("[{name: mesh, port: 15008, protocol: HBONE}]")),
            "istio[0].spec.listeners[0].tls",
        ),
        (
            gw("", Some("[{name: mesh, port: 15008, protocol: HBONE, tls: {mode: Passthrough}}]")),
            "istio[0].spec.listeners[0].tls.mode",
        ),
        (
            gw("", Some("[{name: mesh, port: 15008, protocol: HBONE, tls: {options: {gateway.istio.io/tls-terminate-mode: MUTUAL}}}]")),
            "istio[0].spec.listeners[0].tls.options.gateway.istio.io/tls-terminate-mode",
        ),
        (
            gw("", Some("[{name: mesh, port: 15008, protocol: HBONE, tls: {certificateRefs: [{name: cert}]}}]")),
            "istio[0].spec.listeners[0].tls.certificateRefs",
        ),
        (
            gw("    addresses: [{type: Hostname, value: gw.example.com}]\n", None),
            "istio[0].spec.addresses[0].type",
        ),
        (
            gw("    addresses: [{value: gw.example.com}]\n", None),
            "istio[0].spec.addresses[0].value",
        ),
        (
            gw("    addresses: [{value: 192.0.2.1}, {value: nope}]\n", None),
            "istio[0].spec.addresses[1].value",
        ),
        // An address of a pod of that network that is not the gateway's.
        (
            gw("    addresses: [{value: 10.2.0.6}]\n", None),
            "istio[0].spec.addresses[0].value",
        ),
        (
            gw("    infrastructure: {labels: {a: b}}\n", None),
            "istio[0].spec.infrastructure",
        ),
    ];
    for (istio, field) in cases {
        let err = refusal(MESH, &istio);
        assert!(
            err.contains(field),
            "{istio}\nerror {err:?} does not name {field}"
        );
    }
    // An instance whose own network is not its Gateway's.
    let base = MESH.replace(
        "labels: {gateway.networking.k8s.io/gateway-name: eastwest-network2,",
        "network: network1, labels: {gateway.networking.k8s.io/gateway-name: eastwest-network2,",
    );
    let err = refusal(&base, &both_gateways());
    assert!(err.contains("workloads[1].network"), "{err}");
    let base = MESH.replace(
        "labels: {gateway.networking.k8s.io/gateway-name: eastwest-network2,",
        "labels: {topology.istio.io/network: network3, gateway.networking.k8s.io/gateway-name: eastwest-network2,",
    );
    let err = refusal(&base, &both_gateways());
    assert!(
        err.contains("workloads[1].labels.topology.istio.io/network"),
        "{err}"
    );
}

#[test]
fn waypoint_gateways_and_unknown_classes_are_handled_as_before() {
    let waypoint = |listener: &str, spec: &str| {
        format!(
            "- apiVersion: gateway.networking.k8s.io/v1\n  kind: Gateway\n  metadata: {{name: waypoint, namespace: default}}\n  spec:\n    gatewayClassName: istio-waypoint\n    listeners: [{{name: mesh, port: 15008, protocol: HBONE{listener}}}]\n{spec}"
        )
    };
    let err = refusal(MESH, &waypoint(", tls: {mode: Terminate}", ""));
    assert!(
        err.contains("istio[0].spec.listeners[0].tls: not supported"),
        "{err}"
    );
    let err = refusal(MESH, &waypoint("", "    addresses: [{value: 10.9.9.9}]\n"));
    assert!(
        err.contains("istio[0].spec.addresses: not supported"),
        "{err}"
    );
    let err = refusal(
        MESH,
        &east_west("network2", "", None).replace("istio-east-west", "istio-remote"),
    );
    assert!(err.contains("istio[0].spec.gatewayClassName"), "{err}");
}

#[test]
fn east_west_gateway_instances_are_never_bound_to_a_waypoint() {
    let base = MESH
        .replace(
            "  istio-system: {}",
            "  istio-system: {labels: {istio.io/use-waypoint: waypoint}}",
        )
        .replace(
            "- {name: productpage,",
            "- {name: waypoint-0, namespace: istio-system, serviceAccount: waypoint, ips: [10.1.0.200], labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n- {name: productpage,",
        );
    let waypoint = "- apiVersion: gateway.networking.k8s.io/v1\n  kind: Gateway\n  metadata: {name: waypoint, namespace: istio-system, labels: {istio.io/waypoint-for: all}}\n  spec:\n    gatewayClassName: istio-waypoint\n    listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n";
    let res = translate(&mesh(&base, &format!("{waypoint}{}", both_gateways())));
    assert_eq!(pod(&res, "istio-system", "eastwest-2").waypoint, None);
}

#[test]
fn service_entry_and_workload_entry_workloads_get_their_networks_gateway() {
    let objects = "- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: db, namespace: default}
  spec:
    hosts: [db.example.internal]
    addresses: [240.240.0.9]
    ports: [{number: 5432, name: tcp-pg}]
    resolution: STATIC
    endpoints:
    - {address: 10.2.0.50, network: network2}
    - {address: 10.9.0.50}
- apiVersion: networking.istio.io/v1
  kind: WorkloadEntry
  metadata: {name: vm-1, namespace: west}
  spec: {address: 10.2.0.51}
";
    let res = translate(&mesh(MESH, &format!("{}{objects}", both_gateways())));
    let ep = workload(
        &res,
        "Kubernetes/networking.istio.io/ServiceEntry/default/db/10.2.0.50",
    );
    assert_eq!(ep.network, "network2");
    assert_eq!(
        ep.network_gateway,
        gateway_at("network2", [10, 2, 0, 100], 15008)
    );
    let plain = workload(
        &res,
        "Kubernetes/networking.istio.io/ServiceEntry/default/db/10.9.0.50",
    );
    assert_eq!(
        (plain.network.as_str(), &plain.network_gateway),
        ("", &None)
    );
    // A WorkloadEntry of a namespace on network2.
    let vm = workload(
        &res,
        "Kubernetes/networking.istio.io/WorkloadEntry/west/vm-1",
    );
    assert_eq!(vm.network, "network2");
    assert_eq!(
        vm.network_gateway,
        gateway_at("network2", [10, 2, 0, 100], 15008)
    );
    // ServiceEntry VIPs are on every network in use too.
    let db = service(&res, "default/db.example.internal");
    assert_eq!(vips(db), ["network1/240.240.0.9", "network2/240.240.0.9"]);
}

#[test]
fn pods_get_their_nodes_locality_which_prefer_close_ranks_endpoints_by() {
    let base = MESH.replace(
        "- {name: ratings, namespace: west, serviceAccount",
        "- {name: nowhere, namespace: default, ips: [10.1.0.11], node: node-9}\n- {name: bare, namespace: default, ips: [10.1.0.12], node: node-3}\n- {name: ratings, namespace: west, serviceAccount",
    )
    .replace("nodes:\n", "nodes:\n  node-3: {labels: {kubernetes.io/hostname: node-3}}\n  node-4: {labels: {topology.kubernetes.io/zone: z}}\n");
    let res = translate(&mesh(&base, ""));
    let locality = |name: &str| pod(&res, "default", name).locality.clone();
    assert_eq!(
        locality("reviews-v1"),
        Some(wl::Locality {
            region: "eu".into(),
            zone: "eu-1a".into(),
            subzone: String::new()
        })
    );
    assert_eq!(
        locality("reviews-v2"),
        Some(wl::Locality {
            region: "us".into(),
            zone: "us-1a".into(),
            subzone: "rack-3".into()
        })
    );
    assert_eq!(locality("nowhere"), None); // node not listed
    assert_eq!(locality("bare"), None); // no locality labels
    let cfg = mesh(&base, "");
    assert_eq!(
        super::locality(&cfg, "node-4"),
        Some(wl::Locality {
            region: String::new(),
            zone: "z".into(),
            subzone: String::new()
        })
    );
    // PreferClose compares the client's network, region, zone and subzone with these.
    use wl::load_balancing::Scope;
    let lb = service(&res, "default/reviews.default.svc.cluster.local")
        .load_balancing
        .clone()
        .unwrap();
    assert_eq!(
        lb.routing_preference,
        [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone].map(|s| s as i32)
    );
}

#[test]
fn nodes_are_checked_like_the_rest_of_the_file() {
    let err = refusal(
        &MESH.replace("node-1: {labels:", "node-1: {zone: a, labels:"),
        "",
    );
    assert!(err.contains("nodes") && err.contains("zone"), "{err}");
    let err = refusal(&MESH.replace("  node-1: {", "  Node_1: {"), "");
    assert!(err.contains("nodes.Node_1"), "{err}");
}

#[test]
fn the_example_in_the_module_header_is_a_mesh_file_that_works() {
    let source = include_str!("../topology.rs");
    let yaml: String = source
        .lines()
        .skip_while(|l| *l != "//! ```yaml")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
        .collect();
    let res = translate(&mesh(&yaml, ""));
    let reviews = pod(&res, "default", "reviews-v2");
    assert_eq!(reviews.network, "network2");
    assert_eq!(
        reviews.network_gateway,
        gateway_at("network2", [192, 0, 2, 20], 15008)
    );
    assert_eq!(pod(&res, "istio-system", "eastwest-0").network, "network2");
    assert_eq!(
        workload(&res, "NetworkGateway/network2/192.0.2.20/15008").service_account,
        "istio-eastwestgateway"
    );
}
