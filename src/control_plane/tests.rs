//! The mesh file, its translation into istiod's resources, and the delta ADS server end to end over TLS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use rustls_pki_types::pem::PemObject;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Streaming;

use super::ads::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use super::translate::{pod_uid, translate};
use super::*;
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use crate::proto::security as sec;
use crate::proto::workload as wl;

const MESH: &str = r#"
namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
  test: {}
  kube-system: {labels: {istio.io/dataplane-mode: ambient}}
workloads:
- {name: productpage-v1, namespace: default, serviceAccount: productpage, ips: [10.1.0.5], node: node-1, labels: {app: productpage, version: v1}}
- {name: opted-out, namespace: default, ips: [10.1.0.6], node: node-1, labels: {istio.io/dataplane-mode: none, app: productpage}}
- {name: sleep, namespace: test, serviceAccount: sleep, ips: [10.1.0.7], node: node-2, labels: {istio.io/dataplane-mode: ambient, service.istio.io/canonical-name: sleepy, app: sleep}}
- {name: plain, namespace: test, ips: [10.1.0.8]}
- {name: dns, namespace: kube-system, ips: [10.1.0.9]}
services:
- {name: productpage, namespace: default, vips: [10.96.0.10], ports: [{port: 9080, targetPort: 9081}, {port: 80}], selector: {app: productpage}}
- {name: external, namespace: default, vips: ["fd00::10", 10.96.0.11], ports: [{port: 443}]}
policies:
- name: allow-sleep
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact "cluster.local/ns/test/sa/sleep"]
        sourceIps: ["10.1.0.0/16"]
        notDestinationPorts: [9999]
        serviceAccounts: [{namespace: test, serviceAccount: sleep}]
        notPrincipals: [!Presence []]
tokens:
- {token: node-1-secret, nodeProxy: true, node: node-1}
- {token: sleep-secret, namespace: test, serviceAccount: sleep}
"#;

fn workload<'a>(res: &'a translate::Resources, name: &str) -> &'a wl::Workload {
    match res.addresses.get(name).and_then(|a| a.r#type.as_ref()) {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("{name}: not a workload: {other:?}"),
    }
}

fn service<'a>(res: &'a translate::Resources, name: &str) -> &'a wl::Service {
    match res.addresses.get(name).and_then(|a| a.r#type.as_ref()) {
        Some(wl::address::Type::Service(s)) => s,
        other => panic!("{name}: not a service: {other:?}"),
    }
}

fn uid(ns: &str, name: &str) -> String {
    pod_uid("Kubernetes", ns, name)
}

#[test]
fn pods_become_workloads_with_istiod_uids_and_fields() {
    let res = translate(&MeshConfig::parse(MESH).unwrap());
    assert_eq!(
        uid("default", "productpage-v1"),
        "Kubernetes//Pod/default/productpage-v1"
    );
    let w = workload(&res, &uid("default", "productpage-v1"));
    assert_eq!(w.name, "productpage-v1");
    assert_eq!(w.namespace, "default");
    assert_eq!(w.service_account, "productpage");
    assert_eq!(w.addresses, vec![vec![10, 1, 0, 5]]);
    assert_eq!(w.network, "");
    assert_eq!(w.node, "node-1");
    assert_eq!(w.trust_domain, "", "istiod leaves cluster.local out");
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.canonical_name, "productpage");
    assert_eq!(w.canonical_revision, "v1");
    assert_eq!(w.workload_type, wl::WorkloadType::Pod as i32);
    assert_eq!(w.workload_name, "productpage-v1");
    assert_eq!(w.status, wl::WorkloadStatus::Healthy as i32);

    let sleep = workload(&res, &uid("test", "sleep"));
    assert_eq!(sleep.canonical_name, "sleepy", "the canonical label wins");
    assert_eq!(sleep.canonical_revision, "latest");
    let plain = workload(&res, &uid("test", "plain"));
    assert_eq!(plain.service_account, "default");
    assert_eq!(plain.canonical_name, "plain");
}

#[test]
fn only_enrolled_pods_are_hbone() {
    let res = translate(&MeshConfig::parse(MESH).unwrap());
    let tunnel = |ns, name| workload(&res, &uid(ns, name)).tunnel_protocol;
    let hbone = wl::TunnelProtocol::Hbone as i32;
    let none = wl::TunnelProtocol::None as i32;
    assert_eq!(
        tunnel("default", "productpage-v1"),
        hbone,
        "namespace label"
    );
    assert_eq!(tunnel("default", "opted-out"), none, "pod says none");
    assert_eq!(tunnel("test", "sleep"), hbone, "pod label");
    assert_eq!(tunnel("test", "plain"), none, "neither");
    assert_eq!(tunnel("kube-system", "dns"), none, "kube-system never");
}

#[test]
fn services_select_pods_of_their_namespace_and_carry_ports() {
    let res = translate(&MeshConfig::parse(MESH).unwrap());
    let key = "default/productpage.default.svc.cluster.local";
    let svc = service(&res, key);
    assert_eq!(svc.name, "productpage");
    assert_eq!(svc.hostname, "productpage.default.svc.cluster.local");
    assert_eq!(svc.addresses.len(), 1);
    assert_eq!(svc.addresses[0].network, "");
    assert_eq!(svc.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(svc.ip_families, wl::IpFamilies::Ipv4Only as i32);
    assert!(svc.subject_alt_names.is_empty());
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(ports, vec![(9080, 9081), (80, 80)]);

    let pp = workload(&res, &uid("default", "productpage-v1"));
    assert_eq!(pp.services.len(), 1);
    assert_eq!(pp.services[key].ports.len(), 2);
    // The opted-out pod still backs the service (istiod lists it, unenrolled).
    assert!(workload(&res, &uid("default", "opted-out"))
        .services
        .contains_key(key));
    // Same labels in another namespace, or no selector: not selected.
    assert!(workload(&res, &uid("test", "sleep")).services.is_empty());
    let ext = service(&res, "default/external.default.svc.cluster.local");
    assert_eq!(ext.ip_families, wl::IpFamilies::Dual as i32);
    assert_eq!(ext.addresses[0].address.len(), 16);
}

#[test]
fn policies_become_authorization_resources_field_for_field() {
    let res = translate(&MeshConfig::parse(MESH).unwrap());
    let a = &res.authorizations["default/allow-sleep"];
    assert_eq!(a.name, "allow-sleep");
    assert_eq!(a.namespace, "default");
    assert_eq!(a.scope, sec::Scope::Namespace as i32);
    assert_eq!(a.action, sec::Action::Allow as i32);
    let m = &a.rules[0].clauses[0].matches[0];
    use sec::string_match::MatchType;
    assert_eq!(
        m.principals[0].match_type,
        Some(MatchType::Exact("cluster.local/ns/test/sa/sleep".into()))
    );
    assert_eq!(
        m.not_principals[0].match_type,
        Some(MatchType::Presence(()))
    );
    assert_eq!(
        m.source_ips,
        vec![sec::Address {
            address: vec![10, 1, 0, 0],
            length: 16
        }]
    );
    assert_eq!(m.not_destination_ports, vec![9999]);
    assert_eq!(m.service_accounts[0].service_account, "sleep");
}

#[test]
fn trust_domain_other_than_cluster_local_is_sent() {
    let yaml = "trustDomain: example.org\nnamespaces: {a: {}}\nworkloads: [{name: w, namespace: a, ips: [10.0.0.1]}]";
    let res = translate(&MeshConfig::parse(yaml).unwrap());
    assert_eq!(workload(&res, &uid("a", "w")).trust_domain, "example.org");
}

#[test]
fn bad_files_are_refused_naming_the_field() {
    let cases = [
        (
            "namespaces: {a: {}}\nworkloads: [{name: w, namespace: a, ips: [10.0.0.1], podIp: x}]",
            "workloads[0]",
        ),
        (
            "namespaces: {a: {}}\nworkloads: [{name: w, namespace: a, ips: [not-an-ip]}]",
            "workloads[0].ips[0]",
        ),
        (
            "namespaces: {a: {}}\nworkloads: [{name: w, namespace: b, ips: [10.0.0.1]}]",
            "workloads[0].namespace",
        ),
        (
            "namespaces: {a: {}}\nworkloads: [{name: w, namespace: a, ips: [10.0.0.1]}, {name: v, namespace: a, ips: [10.0.0.1]}]",
            "workloads[1].ips[0]",
        ),
        (
            "namespaces: {a: {}}\nworkloads: [{name: W_1, namespace: a, ips: [10.0.0.1]}]",
            "workloads[0].name",
        ),
        (
            "namespaces: {a: {}}\nservices: [{name: s, namespace: a, ports: [{port: 0}]}]",
            "services[0].ports[0].port",
        ),
        (
            "namespaces: {a: {}}\nservices: [{name: s, namespace: a, ports: [{port: 70000}]}]",
            "services[0].ports[0].port",
        ),
        ("tokens: [{token: t}]", "tokens[0].serviceAccount"),
        ("tokens: [{tokenSha256: abc, nodeProxy: true}]", "tokenSha256"),
        (
            "tokens: [{token: t, nodeProxy: true, expires: next week}]",
            "expires",
        ),
        ("tokens: [{nodeProxy: true, node: n}]", "token"),
        (
            "tokens: [{token: t, nodeProxy: true}, {tokenSha256: e3b98a4da31a127d4bde6e43033f66ba274cab0eb7eb1c70ec41402bf6273dd8, nodeProxy: true}]",
            "tokens[1].token",
        ),
        ("namespace: {}", "namespace"),
        (
            "namespaces: {a: {}}\nworkloads: [{name: w, namespace: a, ips: [10.0.0.1], authorizationPolicies: [a/nope]}]",
            "workloads[0].authorizationPolicies[0]",
        ),
    ];
    for (yaml, field) in cases {
        let err = MeshConfig::parse(yaml).expect_err(yaml).to_string();
        assert!(
            err.contains(field),
            "{yaml:?}: error {err:?} does not name {field}"
        );
    }
    let policy = "policies: [{name: p, namespace: a, scope: Global, action: Allow, rules: [[[{sourceIps: [bad]}]]]}]";
    let err = MeshConfig::parse(policy).unwrap_err().to_string();
    assert!(err.contains("policies") && err.contains("bad"), "{err}");
}

#[test]
fn versions_are_stable_across_rebuilds() {
    // Many services selecting one pod: prost encodes Workload.services in HashMap order.
    let mut yaml = String::from("namespaces: {a: {}}\nworkloads: [{name: w, namespace: a, ips: [10.0.0.1], labels: {app: x}}]\nservices:\n");
    for i in 0..20 {
        yaml.push_str(&format!(
            "- {{name: s{i}, namespace: a, ports: [{{port: 80}}], selector: {{app: x}}}}\n"
        ));
    }
    let cfg = MeshConfig::parse(&yaml).unwrap();
    let v = |s: &Snapshot| {
        s.resources(ADDRESS_TYPE)
            .map(|(n, e)| (n.to_string(), e.version.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let first = v(&Snapshot::new(&translate(&cfg), 1));
    for _ in 0..5 {
        assert_eq!(first, v(&Snapshot::new(&translate(&cfg), 2)));
    }
}

// ---- ADS over TLS ----

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    plane: ControlPlane,
    channel: Channel,
    addr: std::net::SocketAddr,
    root_pem: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn start(yaml: &str, limits: AdsLimits) -> Harness {
    start_with(yaml, limits, server::ServeLimits::default()).await
}

async fn start_with(yaml: &str, limits: AdsLimits, serve: server::ServeLimits) -> Harness {
    start_router(yaml, |plane| server::router(plane.ads(limits)), serve).await
}

/// A harness serving the router `make` builds over the plane.
async fn start_router(
    yaml: &str,
    make: impl FnOnce(&ControlPlane) -> tonic::transport::server::Router,
    serve: server::ServeLimits,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, yaml).unwrap();
    let plane = ControlPlane::start(&path, Duration::from_millis(50)).unwrap();
    let cert = server::ServerCert::throwaway(&SERVER_NAMES).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = make(&plane);
    let tls = cert.tls_config().unwrap();
    tokio::spawn(async move {
        server::serve(listener, tls, router, serve, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cert.root_pem))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect_lazy();
    Harness {
        _dir: dir,
        path,
        plane,
        channel,
        addr,
        root_pem: cert.root_pem.clone(),
        _shutdown: tx,
    }
}

/// Replaces the file atomically, as editors and ConfigMap mounts do.
fn write(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

async fn connect(channel: &Channel) -> Result<Client, tonic::Status> {
    let (tx, mut req_rx) = mpsc::channel(16);
    let requests = futures_util::stream::poll_fn(move |cx| req_rx.poll_recv(cx));
    let rx = AggregatedDiscoveryServiceClient::new(channel.clone())
        .delta_aggregated_resources(requests)
        .await?
        .into_inner();
    Ok(Client { tx, rx })
}

fn subscribe(type_url: &str, have: &BTreeMap<String, String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local".into(),
            ..Node::default()
        }),
        type_url: type_url.into(),
        initial_resource_versions: have.clone().into_iter().collect(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn ack(resp: &DeltaDiscoveryResponse, error: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: error.map(|m| Status {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..DeltaDiscoveryRequest::default()
    }
}

impl Client {
    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .expect("stream healthy")
            .expect("stream open")
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(msg) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("unexpected message: {msg:?}");
        }
    }
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<_> = resp.resources.iter().map(|r| r.name.clone()).collect();
    n.sort();
    n
}

fn versions(resp: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    resp.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

const SMALL: &str = r#"
namespaces: {default: {labels: {istio.io/dataplane-mode: ambient}}}
workloads:
- {name: a, namespace: default, ips: [10.0.0.1], labels: {app: a}}
- {name: b, namespace: default, ips: [10.0.0.2], labels: {app: b}}
services:
- {name: svc-a, namespace: default, vips: [10.96.0.1], ports: [{port: 80}], selector: {app: a}}
policies:
- {name: deny-all, namespace: default, scope: Namespace, action: Deny, rules: [[]]}
"#;

const SMALL_EDITED: &str = r#"
namespaces: {default: {labels: {istio.io/dataplane-mode: ambient}}}
workloads:
- {name: a, namespace: default, ips: [10.0.0.1], labels: {app: a}}
- {name: b, namespace: default, ips: [10.0.0.2], labels: {app: b, version: v2}}
- {name: c, namespace: default, ips: [10.0.0.3], labels: {app: c}}
policies:
- {name: deny-all, namespace: default, scope: Namespace, action: Deny, rules: [[]]}
"#;

#[tokio::test]
async fn a_new_client_gets_every_workload_service_and_policy() {
    let h = start(SMALL, AdsLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    let addrs = c.recv().await;
    assert_eq!(addrs.type_url, ADDRESS_TYPE);
    assert_eq!(
        names(&addrs),
        vec![
            uid("default", "a"),
            uid("default", "b"),
            "default/svc-a.default.svc.cluster.local".to_string()
        ]
    );
    assert!(addrs.removed_resources.is_empty());
    let any = addrs.resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, ADDRESS_TYPE);
    let decoded = wl::Address::decode(any.value.as_slice()).unwrap();
    assert!(matches!(
        decoded.r#type,
        Some(wl::address::Type::Workload(ref w)) if w.uid == uid("default", "a") && !w.services.is_empty()
    ));
    c.send(ack(&addrs, None)).await;

    c.send(subscribe(AUTHORIZATION_TYPE, &BTreeMap::new()))
        .await;
    let authz = c.recv().await;
    assert_eq!(authz.type_url, AUTHORIZATION_TYPE);
    assert_eq!(names(&authz), vec!["default/deny-all".to_string()]);
    let policy = sec::Authorization::decode(
        authz.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(policy.action, sec::Action::Deny as i32);
    c.send(ack(&authz, None)).await;
    c.nothing_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn an_empty_mesh_still_answers_so_the_client_counts_as_synced() {
    let h = start("", AdsLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(AUTHORIZATION_TYPE, &BTreeMap::new()))
        .await;
    let r = c.recv().await;
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
    assert!(!r.nonce.is_empty());
}

#[tokio::test]
async fn a_file_change_pushes_only_the_differences() {
    let h = start(SMALL, AdsLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    let first = c.recv().await;
    c.send(ack(&first, None)).await;
    c.send(subscribe(AUTHORIZATION_TYPE, &BTreeMap::new()))
        .await;
    let policies = c.recv().await;
    c.send(ack(&policies, None)).await;

    // b changed (label), c added, svc-a removed (and a changed: it no longer backs svc-a).
    write(&h.path, SMALL_EDITED);
    let push = c.recv().await;
    assert_eq!(push.type_url, ADDRESS_TYPE);
    assert_eq!(
        names(&push),
        vec![
            uid("default", "a"),
            uid("default", "b"),
            uid("default", "c")
        ]
    );
    assert_eq!(
        push.removed_resources,
        vec!["default/svc-a.default.svc.cluster.local".to_string()]
    );
    assert_ne!(
        versions(&push)[&uid("default", "b")],
        versions(&first)[&uid("default", "b")]
    );
    c.send(ack(&push, None)).await;
    // Policies did not change: nothing for them.
    c.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(h.plane.config().borrow().workloads.len(), 3);
}

#[tokio::test]
async fn a_reconnecting_client_gets_only_what_changed_while_it_was_away() {
    let h = start(SMALL, AdsLimits::default()).await;
    let have = {
        let mut c = connect(&h.channel).await.unwrap();
        c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
        versions(&c.recv().await)
    };
    write(&h.path, SMALL_EDITED);
    let mut snaps = h.plane.snapshots();
    tokio::time::timeout(Duration::from_secs(5), snaps.wait_for(|s| s.generation > 1))
        .await
        .unwrap()
        .unwrap();

    let mut have = have;
    have.insert(uid("default", "gone"), "0123".into());
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &have)).await;
    let r = c.recv().await;
    assert_eq!(
        names(&r),
        vec![
            uid("default", "a"),
            uid("default", "b"),
            uid("default", "c")
        ]
    );
    let mut removed = r.removed_resources.clone();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            uid("default", "gone"),
            "default/svc-a.default.svc.cluster.local".to_string()
        ]
    );

    // A client that is up to date gets an empty answer.
    let current = {
        let mut all = have.clone();
        all.remove(&uid("default", "gone"));
        all.remove("default/svc-a.default.svc.cluster.local");
        all.extend(versions(&r));
        all
    };
    let mut c2 = connect(&h.channel).await.unwrap();
    c2.send(subscribe(ADDRESS_TYPE, &current)).await;
    let r2 = c2.recv().await;
    assert!(r2.resources.is_empty() && r2.removed_resources.is_empty());
}

#[tokio::test]
async fn a_restarted_control_plane_recognises_the_versions_clients_hold() {
    let h = start(SMALL, AdsLimits::default()).await;
    let have = {
        let mut c = connect(&h.channel).await.unwrap();
        c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
        versions(&c.recv().await)
    };
    drop(h);
    let h2 = start(SMALL, AdsLimits::default()).await;
    let mut c = connect(&h2.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &have)).await;
    let r = c.recv().await;
    assert!(r.resources.is_empty(), "{:?}", names(&r));
    assert!(r.removed_resources.is_empty());
}

#[tokio::test]
async fn a_nack_is_logged_and_later_changes_are_still_pushed() {
    let h = start(SMALL, AdsLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    let first = c.recv().await;
    c.send(ack(
        &first,
        Some("Kubernetes//Pod/default/a: unsupported field"),
    ))
    .await;
    write(&h.path, SMALL_EDITED);
    let push = c.recv().await;
    assert!(names(&push).contains(&uid("default", "c")));
}

#[tokio::test]
async fn a_bad_edit_keeps_the_last_good_config_serving() {
    let h = start(SMALL, AdsLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    let first = c.recv().await;
    c.send(ack(&first, None)).await;

    write(
        &h.path,
        "workloads: [{name: a, namespace: nowhere, ips: [10.0.0.1]}]",
    );
    c.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(h.plane.config().borrow().workloads.len(), 2);
    assert_eq!(h.plane.snapshots().borrow().generation, 1);
    // A new client still gets the last good config.
    let mut c2 = connect(&h.channel).await.unwrap();
    c2.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    assert_eq!(names(&c2.recv().await), names(&first));

    write(&h.path, SMALL_EDITED);
    let push = c.recv().await;
    assert!(names(&push).contains(&uid("default", "c")));
}

#[tokio::test]
async fn unknown_types_are_ignored_and_the_stream_keeps_working() {
    let h = start(SMALL, AdsLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        &BTreeMap::new(),
    ))
    .await;
    c.send(DeltaDiscoveryRequest::default()).await;
    c.send(subscribe(AUTHORIZATION_TYPE, &BTreeMap::new()))
        .await;
    let r = c.recv().await;
    assert_eq!(r.type_url, AUTHORIZATION_TYPE);
}

#[tokio::test]
async fn oversized_requests_end_the_stream_with_an_error() {
    let limits = AdsLimits {
        max_request_bytes: 1024,
        ..AdsLimits::default()
    };
    let h = start(SMALL, limits).await;
    let mut c = connect(&h.channel).await.unwrap();
    let mut have = BTreeMap::new();
    for i in 0..100 {
        have.insert(format!("resource-{i}"), "v".repeat(20));
    }
    c.send(subscribe(ADDRESS_TYPE, &have)).await;
    let res = tokio::time::timeout(Duration::from_secs(5), c.rx.message())
        .await
        .unwrap();
    // The server refuses the message and ends the stream with the reason.
    let err = res.expect_err("an error, not a push");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused() {
    let limits = AdsLimits {
        max_streams: 1,
        ..AdsLimits::default()
    };
    let h = start(SMALL, limits).await;
    let mut c1 = connect(&h.channel).await.unwrap();
    c1.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    c1.recv().await;
    let err = match connect(&h.channel).await {
        Ok(mut c2) => c2.rx.message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    drop(c1);
    // The slot frees once the first stream is gone.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(mut c3) = connect(&h.channel).await {
            c3.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
            if tokio::time::timeout(Duration::from_millis(200), c3.rx.message())
                .await
                .is_ok_and(|r| matches!(r, Ok(Some(_))))
            {
                ok = true;
                break;
            }
        }
    }
    assert!(ok, "the stream slot was not released");
}

#[tokio::test]
async fn clients_that_do_not_trust_the_server_certificate_fail_to_connect() {
    let h = start(SMALL, AdsLimits::default()).await;
    let other = server::ServerCert::throwaway(&SERVER_NAMES).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", h.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&other.root_pem))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect_lazy();
    assert!(connect(&channel).await.is_err());
    // The server keeps serving trusting clients.
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    assert_eq!(c.recv().await.resources.len(), 3);
}

#[tokio::test]
async fn a_peer_authentication_added_to_the_file_is_pushed_as_an_authorization() {
    let h = start(SMALL, AdsLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    let first = c.recv().await;
    c.send(ack(&first, None)).await;
    c.send(subscribe(AUTHORIZATION_TYPE, &BTreeMap::new()))
        .await;
    let policies = c.recv().await;
    c.send(ack(&policies, None)).await;

    let strict = format!(
        "{SMALL}istio:\n- {{apiVersion: security.istio.io/v1beta1, kind: PeerAuthentication, \
         metadata: {{name: default, namespace: default}}, spec: {{mtls: {{mode: STRICT}}}}}}\n"
    );
    write(&h.path, &strict);
    let mut pushes = BTreeMap::new();
    for _ in 0..2 {
        let push = c.recv().await;
        c.send(ack(&push, None)).await;
        pushes.insert(push.type_url.clone(), push);
    }
    let authz = &pushes[AUTHORIZATION_TYPE];
    let key = "istio-system/istio_converted_static_strict";
    assert_eq!(names(authz), vec![key.to_string()]);
    let policy = sec::Authorization::decode(
        authz.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(policy.action, sec::Action::Deny as i32);
    assert_eq!(policy.scope, sec::Scope::WorkloadSelector as i32);
    use sec::string_match::MatchType;
    assert_eq!(
        policy.rules[0].clauses[0].matches[0].not_principals[0].match_type,
        Some(MatchType::Presence(()))
    );
    // Both pods of the namespace now list it.
    let addrs = &pushes[ADDRESS_TYPE];
    assert_eq!(names(addrs), vec![uid("default", "a"), uid("default", "b")]);
    for r in &addrs.resources {
        let a = wl::Address::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap();
        match a.r#type {
            Some(wl::address::Type::Workload(w)) => {
                assert_eq!(w.authorization_policies, vec![key.to_string()]);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_token_may_be_kept_as_its_sha256_with_an_expiry() {
    let yaml = "namespaces: {default: {}}\ntokens:\n- {tokenSha256: E3B98A4DA31A127D4BDE6E43033F66BA274CAB0EB7EB1C70EC41402BF6273DD8, nodeProxy: true, node: n1, expires: 2030-01-31T00:00:00Z}\n- {token: w, namespace: default, serviceAccount: web}\n";
    let cfg = MeshConfig::parse(yaml).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let t = tokens::find(&cfg, "t", now).expect("the hashed token is accepted");
    assert_eq!(t.node, "n1");
    assert!(
        tokens::find(&cfg, "w", now).is_ok(),
        "a clear token still is"
    );
    let later = time::OffsetDateTime::parse(
        "2030-02-01T00:00:00Z",
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let err = tokens::find(&cfg, "t", later).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{err}");
}

// ---- the bounds of :15012 ----

/// A TLS client that trusts the harness' server, for raw connections.
fn raw_tls_client(h: &Harness) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(h.root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind((std::net::Ipv4Addr::from(from), 0).into()).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the server closes `s` (EOF or reset) within `within`.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn idle_sockets_from_one_address_do_not_keep_other_proxies_out() {
    let h = start(SMALL, AdsLimits::default()).await;
    // More silent sockets than the server has handshake slots, all from one address.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tcp_from([127, 0, 0, 2], h.addr).await);
    }
    // A proxy elsewhere is served at once, long before the silent ones' handshake timeout (10 s).
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = connect(&h.channel).await.unwrap();
        c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
        c.recv().await
    })
    .await;
    assert!(
        served.is_ok(),
        "a proxy was kept waiting by idle sockets of another address"
    );
    // The sockets beyond the per-source limit were closed at once.
    let mut closed = 0;
    for s in idle.iter_mut().rev().take(50) {
        if closed_by_server(s, Duration::from_secs(2)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 50, "sockets over the per-address limit stay open");
}

#[tokio::test]
async fn a_connection_that_never_opens_a_stream_is_closed_when_idle_but_an_xds_stream_is_kept() {
    let serve = server::ServeLimits {
        idle_timeout: Duration::from_millis(500),
        ..server::ServeLimits::default()
    };
    let h = start_with(SMALL, AdsLimits::default(), serve).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    c.recv().await;

    let tcp = tcp_from([127, 0, 0, 3], h.addr).await;
    let name = rustls_pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
    let mut tls = raw_tls_client(&h).connect(name, tcp).await.unwrap();
    assert!(
        closed_by_server(&mut tls, Duration::from_secs(20)).await,
        "an idle connection stays open"
    );
    // The stream, idle as well, lived through it and still gets pushes.
    write(&h.path, SMALL_EDITED);
    let pushed = c.recv().await;
    assert!(!pushed.resources.is_empty() || !pushed.removed_resources.is_empty());
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_the_others_keep_being_served() {
    let serve = server::ServeLimits {
        max_connections: 1,
        ..server::ServeLimits::default()
    };
    let h = start_with(SMALL, AdsLimits::default(), serve).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    c.recv().await;
    let mut extra = tcp_from([127, 0, 0, 4], h.addr).await;
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(5)).await,
        "a connection over the cap was kept"
    );
    write(&h.path, SMALL_EDITED);
    c.recv().await;
}

#[tokio::test]
async fn a_stream_ends_when_its_token_goes_bad_even_without_a_mesh_change() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let good = std::sync::Arc::new(AtomicBool::new(true));
    let check_good = good.clone();
    let check: ads::TokenCheck = std::sync::Arc::new(move |_| {
        if check_good.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated("the bearer token expired"))
        }
    });
    let limits = AdsLimits {
        token_recheck: Duration::from_millis(50),
        ..AdsLimits::default()
    };
    let make = move |plane: &ControlPlane| {
        let owner = tokens::StreamOwner {
            token: crate::identity::ca_server::token::TokenDigest::of("t"),
            access: tokens::XdsAccess::Everything,
        };
        server::router_with_auth(
            plane.ads(limits).with_token_check(check),
            move |mut req: tonic::Request<()>| {
                req.extensions_mut().insert(owner.clone());
                Ok(req)
            },
        )
    };
    let h = start_router(SMALL, make, server::ServeLimits::default()).await;
    let mut c = connect(&h.channel).await.unwrap();
    c.send(subscribe(ADDRESS_TYPE, &BTreeMap::new())).await;
    c.recv().await;
    c.nothing_for(Duration::from_millis(200)).await;
    good.store(false, Ordering::SeqCst);
    let status = tokio::time::timeout(Duration::from_secs(10), c.rx.message())
        .await
        .expect("the stream outlived its token")
        .expect_err("an error status");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

#[test]
fn internal_traffic_policy_and_traffic_distribution_become_istiods_load_balancing() {
    let yaml = MESH.replace(
        "- {name: external,",
        "- {name: local, namespace: default, vips: [10.96.0.12], internalTrafficPolicy: Local, trafficDistribution: PreferClose}\n- {name: close, namespace: default, vips: [10.96.0.13], trafficDistribution: PreferSameZone}\n- {name: external,",
    );
    let res = translate(&MeshConfig::parse(&yaml).unwrap());
    let lb = |name: &str| {
        service(&res, &format!("default/{name}.default.svc.cluster.local"))
            .load_balancing
            .clone()
    };
    use wl::load_balancing::{Mode, Scope};
    let local = lb("local").unwrap();
    assert_eq!(local.routing_preference, vec![Scope::Node as i32]);
    assert_eq!(local.mode, Mode::Strict as i32);
    let close = lb("close").unwrap();
    assert_eq!(
        close.routing_preference,
        [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone].map(|s| s as i32)
    );
    assert_eq!(close.mode, Mode::Failover as i32);
    assert_eq!(lb("productpage"), None);
    let bad = MESH.replace(
        "- {name: external,",
        "- {name: x, namespace: default, internalTrafficPolicy: Nearby}\n- {name: external,",
    );
    let err = MeshConfig::parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("Nearby") || err.contains("internalTrafficPolicy"),
        "{err}"
    );
}

const ENTRIES: &str = r#"
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: api, namespace: default}
  spec:
    hosts: [api.example.org]
    addresses: [240.240.0.1]
    ports: [{number: 443, name: https, protocol: TLS}]
    resolution: DNS
    location: MESH_EXTERNAL
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: legacy-db, namespace: default}
  spec:
    hosts: [db.legacy.internal]
    addresses: [240.240.0.2]
    ports: [{number: 5432, name: tcp-pg}]
    resolution: STATIC
    exportTo: ["."]
    endpoints:
    - {address: 10.2.0.5, ports: {tcp-pg: 15432}, labels: {app: pg}, locality: r1/z1}
- apiVersion: networking.istio.io/v1
  kind: ServiceEntry
  metadata: {name: vms, namespace: default}
  spec:
    hosts: [vm.example.internal]
    addresses: [240.240.0.3]
    ports: [{number: 80, name: http, targetPort: 8080}]
    workloadSelector: {labels: {app: productpage}}
- apiVersion: networking.istio.io/v1
  kind: WorkloadEntry
  metadata: {name: vm-1, namespace: default}
  spec: {address: 10.3.0.1, labels: {app: productpage}, serviceAccount: vm}
"#;

fn with_entries(objects: &str) -> String {
    MESH.replace("tokens:\n", &format!("istio:{objects}tokens:\n"))
}

#[test]
fn service_entries_and_workload_entries_become_services_and_workloads_as_istiod_sends_them() {
    let cfg = MeshConfig::parse(&with_entries(ENTRIES)).unwrap();
    let res = translate(&cfg);
    // DNS, no endpoints: the host itself, resolved by the proxy.
    let api = service(&res, "default/api.example.org");
    assert_eq!(api.name, "api");
    assert_eq!(api.addresses[0].address, vec![240, 240, 0, 1]);
    assert_eq!(
        (api.ports[0].service_port, api.ports[0].target_port),
        (443, 443)
    );
    let dns = workload(
        &res,
        "Kubernetes/networking.istio.io/ServiceEntry/default/api/api.example.org",
    );
    assert_eq!(dns.hostname, "api.example.org");
    assert!(dns.addresses.is_empty());
    assert_eq!(dns.tunnel_protocol, wl::TunnelProtocol::None as i32);
    assert!(dns.services.contains_key("default/api.example.org"));
    // STATIC endpoints, with the endpoint's own port and locality; visible to its namespace only.
    let db = service(&res, "default/db.legacy.internal");
    assert_eq!(db.visibility, wl::service::Visibility::Namespace as i32);
    let pg = workload(
        &res,
        "Kubernetes/networking.istio.io/ServiceEntry/default/legacy-db/10.2.0.5",
    );
    assert_eq!(pg.addresses[0], vec![10, 2, 0, 5]);
    assert_eq!(
        pg.services["default/db.legacy.internal"].ports[0].target_port,
        15432
    );
    assert_eq!(pg.locality.as_ref().unwrap().zone, "z1");
    // A workloadSelector picks the pods and WorkloadEntries of its namespace.
    let pp = workload(&res, &uid("default", "productpage-v1"));
    assert_eq!(
        pp.services["default/vm.example.internal"].ports[0].target_port,
        8080
    );
    let vm = workload(
        &res,
        "Kubernetes/networking.istio.io/WorkloadEntry/default/vm-1",
    );
    assert_eq!(vm.addresses[0], vec![10, 3, 0, 1]);
    assert_eq!(vm.service_account, "vm");
    assert!(vm.services.contains_key("default/vm.example.internal"));

    // The proxy's state built from them routes the DNS host for resolution at connect.
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for (name, a) in &res.addresses {
        match crate::xds::convert::address(name, a.clone()).unwrap() {
            crate::xds::convert::Address::Workload(w) => workloads.push((*w).clone()),
            crate::xds::convert::Address::Service(s) => services.push((*s).clone()),
        }
    }
    let st = crate::state::State::new(workloads, services, Default::default()).unwrap();
    let svc = st
        .service_by_vip("", "240.240.0.1".parse().unwrap(), "default")
        .unwrap()
        .clone();
    let up = st
        .pick_endpoint(&svc, 443, "240.240.0.1".parse().unwrap(), None)
        .unwrap();
    assert!(up.needs_resolution(), "{up:?}");
    assert!(
        st.service_by_vip("", "240.240.0.2".parse().unwrap(), "test")
            .is_none(),
        "exportTo: . hides it from other namespaces"
    );
}

#[test]
fn a_cidr_service_entry_with_resolution_none_passes_connections_through_to_the_address_dialled() {
    let objects = "\n- apiVersion: networking.istio.io/v1\n  kind: ServiceEntry\n  metadata: {name: corp, namespace: default}\n  spec: {hosts: [corp.internal], addresses: [10.50.0.0/16], ports: [{number: 443, name: tls}], resolution: NONE}\n";
    let res = translate(&MeshConfig::parse(&with_entries(objects)).unwrap());
    let corp = service(&res, "default/corp.internal");
    assert_eq!(corp.addresses[0].length, Some(16));
    let lb = corp.load_balancing.clone().unwrap();
    assert_eq!(lb.mode, wl::load_balancing::Mode::Passthrough as i32);
    let (name, a) = res
        .addresses
        .iter()
        .find(|(n, _)| n.as_str() == "default/corp.internal")
        .unwrap();
    let crate::xds::convert::Address::Service(s) =
        crate::xds::convert::address(name, a.clone()).unwrap()
    else {
        panic!("a service")
    };
    let st = crate::state::State::new(Vec::new(), vec![(*s).clone()], Default::default()).unwrap();
    let found = st
        .service_by_vip("", "10.50.3.4".parse().unwrap(), "default")
        .expect("an address in the range reaches the service");
    assert_eq!(found.hostname.as_str(), "corp.internal");
    assert_eq!(found.lb_mode, crate::state::LbMode::Passthrough);
    assert!(st
        .service_by_vip("", "10.51.0.1".parse().unwrap(), "default")
        .is_none());
}

#[test]
fn service_entries_istio_would_refuse_or_meshnode_cannot_serve_are_refused_by_field() {
    let refused = |spec: &str| {
        let objects = format!(
            "\n- apiVersion: networking.istio.io/v1\n  kind: ServiceEntry\n  metadata: {{name: x, namespace: default}}\n  spec: {spec}\n"
        );
        MeshConfig::parse(&with_entries(&objects))
            .unwrap_err()
            .to_string()
    };
    let e = refused("{hosts: [a.example.org], addresses: [10.0.0.0/33]}");
    assert!(e.contains("addresses[0]"), "{e}");
    let e = refused("{hosts: [\"*.example.org\"], resolution: DNS}");
    assert!(e.contains("hosts[0]"), "{e}");
    let e = refused(
        "{hosts: [a.example.org], resolution: STATIC, endpoints: [{address: db.example.org}]}",
    );
    assert!(e.contains("endpoints[0].address"), "{e}");
    let e = refused("{hosts: [a.example.org], resolution: DNZ}");
    assert!(e.contains("resolution"), "{e}");
    let e = refused("{hosts: [a.example.org], exportTo: [other]}");
    assert!(e.contains("exportTo"), "{e}");
    let e = refused("{hosts: [a.example.org], endpoints: [{address: 10.0.0.1}], workloadSelector: {labels: {a: b}}}");
    assert!(e.contains("workloadSelector"), "{e}");
    let e = refused("{hosts: [productpage.default.svc.cluster.local]}");
    assert!(e.contains("also a Service"), "{e}");
}
