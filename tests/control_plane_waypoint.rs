//! A waypoint's xDS stream from `meshnode control-plane` (:15012): a token whose identity is a waypoint's
//! (the service account of a waypoint Gateway's instance) subscribes by name to its own
//! `meshnode.waypoint.Waypoint`, receives it and its updates when the mesh file changes, gets the Address
//! resources it needs, and may not see another namespace's waypoint; the stream ends when its identity
//! stops running a waypoint. Driven through `control_plane::run` on a loopback listener with plain tonic
//! clients over TLS (no root needed).

mod support;

use std::time::Duration;

use meshnode::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshnode::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use meshnode::proto::waypoint as wp;
use prost::Message;
use support::control_plane::Plane;
use tokio::sync::mpsc;
use tonic::Code;

const WAYPOINT_TYPE: &str = "type.googleapis.com/meshnode.waypoint.Waypoint";
const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";

/// The mesh file: bookinfo's `reviews` behind the namespace's waypoint (instance `waypoint-0`, service
/// account `waypoint`, as `istioctl waypoint apply` names it), split between v1 and v2 by an HTTPRoute
/// (`v1_weight` to v1, the rest to v2); a second waypoint Gateway in bookinfo (`east`, no instance); another
/// namespace with a waypoint of its own. `with_instance`:
/// whether the bookinfo waypoint's pod is in the file.
fn mesh(v1_weight: u32, with_instance: bool) -> String {
    let instance = if with_instance {
        "- {name: waypoint-0, namespace: bookinfo, serviceAccount: waypoint, ips: [10.1.0.100], labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}\n"
    } else {
        ""
    };
    format!(
        r#"namespaces:
  bookinfo: {{labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}
  other: {{labels: {{istio.io/dataplane-mode: ambient}}}}
workloads:
{instance}- {{name: reviews-v1, namespace: bookinfo, serviceAccount: reviews, ips: [10.1.0.1], labels: {{app: reviews, version: v1}}}}
- {{name: reviews-v2, namespace: bookinfo, serviceAccount: reviews, ips: [10.1.0.2], labels: {{app: reviews, version: v2}}}}
- {{name: other-wp-0, namespace: other, serviceAccount: other-wp, ips: [10.1.0.200], labels: {{gateway.networking.k8s.io/gateway-name: other-wp}}}}
services:
- {{name: reviews, namespace: bookinfo, vips: [10.96.0.1], ports: [{{port: 9080, name: http}}], selector: {{app: reviews}}}}
- {{name: reviews-v1, namespace: bookinfo, vips: [10.96.0.2], ports: [{{port: 9080, name: http}}], selector: {{app: reviews, version: v1}}}}
- {{name: reviews-v2, namespace: bookinfo, vips: [10.96.0.3], ports: [{{port: 9080, name: http}}], selector: {{app: reviews, version: v2}}}}
istio:
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {{name: waypoint, namespace: bookinfo}}
  spec:
    gatewayClassName: istio-waypoint
    listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {{name: east, namespace: bookinfo}}
  spec:
    gatewayClassName: istio-waypoint
    listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {{name: other-wp, namespace: other}}
  spec:
    gatewayClassName: istio-waypoint
    listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {{name: reviews, namespace: bookinfo}}
  spec:
    parentRefs: [{{group: "", kind: Service, name: reviews, port: 9080}}]
    rules:
    - backendRefs: [{{name: reviews-v1, port: 9080, weight: {v1_weight}}}, {{name: reviews-v2, port: 9080, weight: {v2_weight}}}]
tokens:
- {{token: waypoint-token, namespace: bookinfo, serviceAccount: waypoint}}
- {{token: reviews-token, namespace: bookinfo, serviceAccount: reviews}}
- {{token: node-token, nodeProxy: true}}
"#,
        v2_weight = 100 - v1_weight,
    )
}

/// An open xDS stream.
struct Stream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Stream {
    async fn open(p: &Plane, token: &str) -> Result<Stream, tonic::Status> {
        let (tx, mut req_rx) = mpsc::channel(8);
        let requests = futures_util::stream::poll_fn(move |cx| req_rx.poll_recv(cx));
        let mut req = tonic::Request::new(requests);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let rx = AggregatedDiscoveryServiceClient::new(p.channel.clone())
            .delta_aggregated_resources(req)
            .await?
            .into_inner();
        Ok(Stream { tx, rx })
    }

    /// Subscribes to `type_url`: `names` (none: wildcard).
    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.tx
            .send(DeltaDiscoveryRequest {
                node: Some(Node {
                    id: "waypoint~10.1.0.100~waypoint-0.bookinfo~bookinfo.svc.cluster.local".into(),
                    ..Node::default()
                }),
                type_url: type_url.into(),
                resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
                ..DeltaDiscoveryRequest::default()
            })
            .await
            .unwrap();
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..DeltaDiscoveryRequest::default()
            })
            .await
            .unwrap();
    }

    /// The next message: a response, or the status the stream ended with. The deadline only stops a hang.
    async fn next(&mut self) -> Result<DeltaDiscoveryResponse, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("the control plane answers within 20 s")
            .map(|m| m.expect("the stream stays open"))
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        self.next().await.expect("a response")
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<_> = r.resources.iter().map(|r| r.name.clone()).collect();
    n.sort();
    n
}

fn waypoint(r: &DeltaDiscoveryResponse, name: &str) -> wp::Waypoint {
    let res = r
        .resources
        .iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("{name} not in {:?}", names(r)));
    wp::Waypoint::decode(res.resource.as_ref().unwrap().value.as_slice()).unwrap()
}

/// The weights of the reviews route, by cluster.
fn reviews_weights(w: &wp::Waypoint) -> Vec<(String, u32)> {
    let svc = w
        .services
        .iter()
        .find(|s| s.hostname == "reviews.bookinfo.svc.cluster.local")
        .expect("reviews is bound to the waypoint");
    match &svc.ports[0].routes[0].action {
        Some(wp::route::Action::Forward(f)) => f
            .backends
            .iter()
            .map(|b| (b.cluster.clone(), b.weight))
            .collect(),
        other => panic!("not a forward: {other:?}"),
    }
}

fn split(v1: u32) -> Vec<(String, u32)> {
    vec![
        (
            "outbound|9080||reviews-v1.bookinfo.svc.cluster.local".into(),
            v1,
        ),
        (
            "outbound|9080||reviews-v2.bookinfo.svc.cluster.local".into(),
            100 - v1,
        ),
    ]
}

#[tokio::test]
async fn a_waypoint_identity_gets_its_waypoint_by_name_and_its_updates() {
    let p = Plane::start(&mesh(80, true)).await;
    let mut s = Stream::open(&p, "waypoint-token").await.unwrap();
    // It needs the Address resources to reach endpoints.
    s.subscribe(ADDRESS_TYPE, &[]).await;
    let addresses = s.recv().await;
    assert_eq!(addresses.type_url, ADDRESS_TYPE);
    assert!(names(&addresses).contains(&"Kubernetes//Pod/bookinfo/reviews-v1".to_string()));
    s.ack(&addresses).await;

    s.subscribe(WAYPOINT_TYPE, &["bookinfo/waypoint"]).await;
    let first = s.recv().await;
    assert_eq!(first.type_url, WAYPOINT_TYPE);
    assert_eq!(
        names(&first),
        ["bookinfo/waypoint"],
        "only what it asked for"
    );
    let w = waypoint(&first, "bookinfo/waypoint");
    assert_eq!(
        (w.namespace.as_str(), w.name.as_str()),
        ("bookinfo", "waypoint")
    );
    assert_eq!(reviews_weights(&w), split(80));
    s.ack(&first).await;

    // The route changes in the file: the new resource is pushed.
    p.write(&mesh(50, true));
    let update = loop {
        let r = s.recv().await;
        s.ack(&r).await;
        if r.type_url == WAYPOINT_TYPE {
            break r;
        }
    };
    assert_eq!(names(&update), ["bookinfo/waypoint"]);
    assert_eq!(
        reviews_weights(&waypoint(&update, "bookinfo/waypoint")),
        split(50)
    );

    // A name of its namespace that does not exist is answered as removed (it does not exist yet).
    s.subscribe(WAYPOINT_TYPE, &["bookinfo/not-yet"]).await;
    let answer = s.recv().await;
    assert!(answer.resources.is_empty());
    assert_eq!(answer.removed_resources, ["bookinfo/not-yet"]);
}

#[tokio::test]
async fn a_waypoint_identity_cannot_subscribe_to_another_namespaces_waypoint() {
    let p = Plane::start(&mesh(80, true)).await;
    let mut s = Stream::open(&p, "waypoint-token").await.unwrap();
    s.subscribe(WAYPOINT_TYPE, &["other/other-wp"]).await;
    let err = s.next().await.expect_err("the subscription is refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("other/other-wp"), "{err:?}");

    // A wildcard subscription sees its own namespace's waypoints only; a node proxy's sees them all.
    let mut s = Stream::open(&p, "waypoint-token").await.unwrap();
    s.subscribe(WAYPOINT_TYPE, &[]).await;
    assert_eq!(
        names(&s.recv().await),
        ["bookinfo/east", "bookinfo/waypoint"]
    );
    let mut node = Stream::open(&p, "node-token").await.unwrap();
    node.subscribe(WAYPOINT_TYPE, &[]).await;
    assert_eq!(
        names(&node.recv().await),
        ["bookinfo/east", "bookinfo/waypoint", "other/other-wp"]
    );

    // A workload whose identity runs no waypoint gets no stream at all.
    let err = match Stream::open(&p, "reviews-token").await {
        Ok(mut s) => {
            s.subscribe(ADDRESS_TYPE, &[]).await;
            s.next().await.unwrap_err()
        }
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn a_waypoint_stream_ends_when_its_identity_no_longer_runs_a_waypoint() {
    let p = Plane::start(&mesh(80, true)).await;
    let mut s = Stream::open(&p, "waypoint-token").await.unwrap();
    s.subscribe(WAYPOINT_TYPE, &["bookinfo/waypoint"]).await;
    let first = s.recv().await;
    s.ack(&first).await;
    // The waypoint's pod leaves the file: its service account is no longer a waypoint's.
    p.write(&mesh(80, false));
    let err = loop {
        match s.next().await {
            Ok(r) => s.ack(&r).await,
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}
