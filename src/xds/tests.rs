//! The xDS client against a scripted delta ADS server on 127.0.0.1 (plain HTTP/2, and once over TLS):
//! the server hands each incoming stream to the test, which reads the client's requests and writes
//! responses step by step.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::{Message, Name};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::config::{AuthToken, GrpcTarget, RootCa};
use crate::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use crate::proto::{security, workload as pb};
use crate::state::State;

const WAIT: Duration = Duration::from_secs(5);

// ---- the scripted server ----

/// One client stream, as the server sees it.
struct Session {
    metadata: MetadataMap,
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Session {
    async fn recv(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.message())
            .await
            .expect("no request from the client")
            .expect("request stream failed")
            .expect("request stream ended")
    }

    /// The two initial requests, by type URL.
    async fn initial(&mut self) -> HashMap<String, DeltaDiscoveryRequest> {
        let mut out = HashMap::new();
        for _ in 0..2 {
            let r = self.recv().await;
            out.insert(r.type_url.clone(), r);
        }
        out
    }

    async fn send(&self, resp: DeltaDiscoveryResponse) {
        self.responses.send(Ok(resp)).await.unwrap();
    }

    /// Sends `resp` and returns the client's answer to it.
    async fn exchange(&mut self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let nonce = resp.nonce.clone();
        self.send(resp).await;
        let ack = self.recv().await;
        assert_eq!(ack.response_nonce, nonce);
        ack
    }

    fn header(&self, name: &str) -> String {
        self.metadata
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

struct FakeAds {
    sessions: mpsc::Sender<Session>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let session = Session {
            metadata: request.metadata().clone(),
            requests: request.into_inner(),
            responses: tx,
        };
        self.sessions
            .send(session)
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct FakeServer {
    addr: SocketAddr,
    sessions: mpsc::Receiver<Session>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl FakeServer {
    async fn start(listener: TcpListener, tls: Option<ServerTlsConfig>) -> FakeServer {
        let addr = listener.local_addr().unwrap();
        let (tx, sessions) = mpsc::channel(4);
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = futures_util::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        let router = builder.add_service(AggregatedDiscoveryServiceServer::new(FakeAds {
            sessions: tx,
        }));
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        FakeServer {
            addr,
            sessions,
            stop: Some(stop),
            task,
        }
    }

    async fn plain() -> FakeServer {
        FakeServer::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), None).await
    }

    async fn session(&mut self) -> Session {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("the client did not connect")
            .unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.sessions.close();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

// ---- the client under test ----

struct Proxy {
    states: watch::Receiver<Arc<State>>,
    synced: Arc<AtomicUsize>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    fn start(target: GrpcTarget, token: AuthToken, limits: Limits) -> Proxy {
        let (publish, states) = watch::channel(Arc::new(State::default()));
        let creds = crate::grpc::Credentials::new(token, "east".into(), target.headers.clone());
        let meta = crate::config::ProxyMeta {
            pod_name: "ztunnel-abc".into(),
            pod_namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            instance_ip: Some("10.1.2.3".parse().unwrap()),
            metadata: BTreeMap::from([(
                "CLUSTER_ID".to_string(),
                serde_json::Value::String("east".into()),
            )]),
        };
        let node = NodeInfo::new(&meta, Some("node-1"));
        let client = XdsClient::new(target, creds, node, publish).with_limits(limits);
        let synced = Arc::new(AtomicUsize::new(0));
        let count = synced.clone();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(client.run(
            move || {
                count.fetch_add(1, Ordering::SeqCst);
            },
            rx,
        ));
        Proxy {
            states,
            synced,
            shutdown,
            task,
        }
    }

    fn plain(addr: SocketAddr) -> Proxy {
        Proxy::start(
            plain_target(addr),
            AuthToken::Literal("token-1".into()),
            Limits::default(),
        )
    }

    fn state(&self) -> Arc<State> {
        self.states.borrow().clone()
    }

    /// Waits until the published state satisfies `f`.
    async fn until(&mut self, f: impl Fn(&State) -> bool) {
        tokio::time::timeout(WAIT, self.states.wait_for(|s| f(s)))
            .await
            .expect("state never reached the expected shape")
            .unwrap();
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("client did not stop")
            .unwrap();
    }
}

fn plain_target(addr: SocketAddr) -> GrpcTarget {
    GrpcTarget {
        address: format!("http://{addr}"),
        root: RootCa::System,
        alt_hostname: None,
        headers: vec![("x-extra".into(), "1".into())],
    }
}

// ---- resources ----

fn any_resource(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        ..Default::default()
    }
}

fn workload(name: &str, ip: [u8; 4], version: &str) -> Resource {
    let w = pb::Workload {
        uid: name.into(),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        services: HashMap::from([(
            "default/reviews.default.svc.cluster.local".to_string(),
            pb::PortList { ports: vec![] },
        )]),
        ..Default::default()
    };
    let addr = pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    };
    any_resource(name, version, ADDRESS_TYPE, addr.encode_to_vec())
}

fn service(version: &str) -> Resource {
    let s = pb::Service {
        name: "reviews".into(),
        namespace: "default".into(),
        hostname: "reviews.default.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: "".into(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 9080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let addr = pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    };
    any_resource(
        "default/reviews.default.svc.cluster.local",
        version,
        ADDRESS_TYPE,
        addr.encode_to_vec(),
    )
}

fn policy(name: &str, version: &str) -> Resource {
    let p = security::Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    destination_ports: vec![9999],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    any_resource(
        &format!("default/{name}"),
        version,
        AUTHORIZATION_TYPE,
        p.encode_to_vec(),
    )
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// Runs the initial exchange: two workloads and a service, one policy. Both answers are ACKs.
async fn sync(session: &mut Session) {
    let ack = session
        .exchange(response(
            ADDRESS_TYPE,
            "a1",
            vec![
                workload("w1", [10, 0, 0, 1], "1"),
                workload("w2", [10, 0, 0, 2], "1"),
                service("1"),
            ],
            &[],
        ))
        .await;
    assert_eq!(ack.error_detail, None);
    let ack = session
        .exchange(response(
            AUTHORIZATION_TYPE,
            "p1",
            vec![policy("deny-9999", "7")],
            &[],
        ))
        .await;
    assert_eq!(ack.error_detail, None);
}

fn nack(ack: &DeltaDiscoveryRequest) -> &str {
    &ack.error_detail.as_ref().expect("expected a NACK").message
}

// ---- tests ----

#[test]
fn node_id_and_metadata_are_ztunnels() {
    let meta = crate::config::ProxyMeta {
        pod_name: "ztunnel-abc".into(),
        pod_namespace: "istio-system".into(),
        metadata: BTreeMap::from([
            ("NAME".to_string(), serde_json::json!("overridden")),
            (
                "LABELS".to_string(),
                serde_json::json!({"app": "ztunnel", "n": 2}),
            ),
        ]),
        ..Default::default()
    };
    let node = NodeInfo::new(&meta, None);
    assert_eq!(
        node.id,
        "ztunnel~1.1.1.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    );
    let proto = node.to_proto();
    let fields = proto.metadata.unwrap().fields;
    use prost_types::value::Kind;
    assert_eq!(
        fields["INSTANCE_IPS"].kind,
        Some(Kind::StringValue("1.1.1.1".into()))
    );
    assert_eq!(
        fields["NAMESPACE"].kind,
        Some(Kind::StringValue("istio-system".into()))
    );
    assert_eq!(fields["NODE_NAME"].kind, Some(Kind::StringValue("".into())));
    // Proxy metadata wins over the fixed keys, as in ztunnel.
    assert_eq!(
        fields["NAME"].kind,
        Some(Kind::StringValue("overridden".into()))
    );
    let Some(Kind::StructValue(labels)) = &fields["LABELS"].kind else {
        panic!("ISTIO_METAJSON value is not a struct");
    };
    assert_eq!(labels.fields["n"].kind, Some(Kind::NumberValue(2.0)));
    assert_eq!(pb::Address::type_url(), ADDRESS_TYPE);
    assert_eq!(security::Authorization::type_url(), AUTHORIZATION_TYPE);
}

#[tokio::test]
async fn the_server_sees_node_credentials_and_two_wildcard_subscriptions() {
    let mut server = FakeServer::plain().await;
    let proxy = Proxy::plain(server.addr);
    let mut s = server.session().await;
    assert_eq!(s.header("authorization"), "Bearer token-1");
    assert_eq!(s.header("clusterid"), "east");
    assert_eq!(s.header("x-extra"), "1");
    let initial = s.initial().await;
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let r = &initial[type_url];
        let node = r.node.as_ref().unwrap();
        assert_eq!(
            node.id,
            "ztunnel~10.1.2.3~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
        let md = &node.metadata.as_ref().unwrap().fields;
        for (k, v) in [
            ("NAME", "ztunnel-abc"),
            ("NAMESPACE", "istio-system"),
            ("INSTANCE_IPS", "10.1.2.3"),
            ("NODE_NAME", "node-1"),
            ("CLUSTER_ID", "east"),
        ] {
            assert_eq!(
                md[k].kind,
                Some(prost_types::value::Kind::StringValue(v.into())),
                "{k}"
            );
        }
        assert!(r.resource_names_subscribe.is_empty());
        assert!(r.initial_resource_versions.is_empty());
    }
    proxy.stop().await;
}

#[tokio::test]
async fn initial_sync_publishes_everything_at_once_and_fires_synced_once() {
    let mut server = FakeServer::plain().await;
    let mut proxy = Proxy::plain(server.addr);
    let mut s = server.session().await;
    s.initial().await;
    s.exchange(response(
        ADDRESS_TYPE,
        "a1",
        vec![workload("w1", [10, 0, 0, 1], "1"), service("1")],
        &[],
    ))
    .await;
    // Workloads without their policies are never published.
    assert_eq!(proxy.state().workload_count(), 0);
    assert_eq!(proxy.synced.load(Ordering::SeqCst), 0);
    s.exchange(response(
        AUTHORIZATION_TYPE,
        "p1",
        vec![policy("deny-9999", "1")],
        &[],
    ))
    .await;
    proxy.until(|st| st.workload_count() == 1).await;
    let st = proxy.state();
    assert_eq!(st.service_count(), 1);
    assert_eq!(st.policies().len(), 1);
    let svc = st
        .service_by_vip("", ip("10.96.0.10"), "default")
        .unwrap()
        .clone();
    let up = st.pick_endpoint(&svc, 80, ip("10.0.0.1"), None).unwrap();
    assert_eq!(up.addr, "10.0.0.1:9080".parse().unwrap());
    assert_eq!(proxy.synced.load(Ordering::SeqCst), 1);
    // Later pushes publish but do not fire synced again.
    s.exchange(response(
        ADDRESS_TYPE,
        "a2",
        vec![workload("w2", [10, 0, 0, 2], "1")],
        &[],
    ))
    .await;
    proxy.until(|st| st.workload_count() == 2).await;
    assert_eq!(proxy.synced.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn updates_and_removals_change_the_state() {
    let mut server = FakeServer::plain().await;
    let mut proxy = Proxy::plain(server.addr);
    let mut s = server.session().await;
    s.initial().await;
    sync(&mut s).await;
    proxy.until(|st| st.workload_count() == 2).await;
    // w1 moves, w2 goes away.
    let ack = s
        .exchange(response(
            ADDRESS_TYPE,
            "a2",
            vec![workload("w1", [10, 0, 0, 9], "2")],
            &["w2"],
        ))
        .await;
    assert_eq!(ack.error_detail, None);
    proxy.until(|st| st.workload_count() == 1).await;
    let st = proxy.state();
    assert!(st.workload_by_addr("", ip("10.0.0.9")).is_some());
    assert!(st.workload_by_addr("", ip("10.0.0.1")).is_none());
    assert!(st.workload_by_addr("", ip("10.0.0.2")).is_none());
    // The policy goes away; removing an unknown name is harmless.
    let ack = s
        .exchange(response(
            AUTHORIZATION_TYPE,
            "p2",
            vec![],
            &["default/deny-9999", "default/nope"],
        ))
        .await;
    assert_eq!(ack.error_detail, None);
    proxy.until(|st| st.policies().is_empty()).await;
    proxy.stop().await;
}

#[tokio::test]
async fn one_bad_resource_is_nacked_by_name_and_the_rest_applied() {
    let mut server = FakeServer::plain().await;
    let mut proxy = Proxy::plain(server.addr);
    let mut s = server.session().await;
    s.initial().await;
    let legacy = pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: "legacy".into(),
            namespace: "default".into(),
            tunnel_protocol: pb::TunnelProtocol::LegacyIstioMtls as i32,
            ..Default::default()
        })),
    };
    let ack = s
        .exchange(response(
            ADDRESS_TYPE,
            "a1",
            vec![
                workload("w1", [10, 0, 0, 1], "1"),
                any_resource("legacy", "1", ADDRESS_TYPE, legacy.encode_to_vec()),
                any_resource("garbage", "1", ADDRESS_TYPE, vec![0xff, 0xff, 0xff]),
                any_resource("misfiled", "1", AUTHORIZATION_TYPE, vec![]),
                Resource {
                    name: "empty".into(),
                    ..Default::default()
                },
            ],
            &[],
        ))
        .await;
    let msg = nack(&ack);
    assert!(
        msg.contains("legacy: tunnel protocol LEGACY_ISTIO_MTLS is not supported"),
        "{msg}"
    );
    assert!(msg.contains("garbage: cannot decode"), "{msg}");
    assert!(msg.contains("misfiled: resource body is"), "{msg}");
    assert!(msg.contains("empty: resource has no body"), "{msg}");
    assert!(!msg.contains("w1"), "{msg}");
    // The good workload is served, and a partly rejected push still counts for readiness.
    s.exchange(response(AUTHORIZATION_TYPE, "p1", vec![], &[]))
        .await;
    proxy.until(|st| st.workload_count() == 1).await;
    assert_eq!(proxy.synced.load(Ordering::SeqCst), 1);
    // A policy that would widen access is refused; the old version keeps serving.
    s.exchange(response(
        AUTHORIZATION_TYPE,
        "p2",
        vec![policy("deny-9999", "1")],
        &[],
    ))
    .await;
    let mut bad = security::Authorization::decode(
        policy("deny-9999", "2").resource.unwrap().value.as_slice(),
    )
    .unwrap();
    bad.rules[0].clauses[0].matches[0].principals = vec![security::StringMatch {
        match_type: Some(security::string_match::MatchType::Prefix(String::new())),
    }];
    let ack = s
        .exchange(response(
            AUTHORIZATION_TYPE,
            "p3",
            vec![any_resource(
                "default/deny-9999",
                "2",
                AUTHORIZATION_TYPE,
                bad.encode_to_vec(),
            )],
            &[],
        ))
        .await;
    assert!(
        nack(&ack).starts_with("default/deny-9999: policy default/deny-9999"),
        "{}",
        nack(&ack)
    );
    assert_eq!(proxy.state().policies().len(), 1);
    // Rejected resources are not in the version map sent on reconnect; the kept policy has its old version.
    drop(s);
    let mut s = server.session().await;
    let initial = s.initial().await;
    assert_eq!(
        initial[ADDRESS_TYPE].initial_resource_versions,
        HashMap::from([("w1".to_string(), "1".to_string())])
    );
    assert_eq!(
        initial[AUTHORIZATION_TYPE].initial_resource_versions,
        HashMap::from([("default/deny-9999".to_string(), "1".to_string())])
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_unknown_type_url_is_nacked_and_changes_nothing() {
    let mut server = FakeServer::plain().await;
    let mut proxy = Proxy::plain(server.addr);
    let mut s = server.session().await;
    s.initial().await;
    sync(&mut s).await;
    proxy.until(|st| st.workload_count() == 2).await;
    let ack = s
        .exchange(response(
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "c1",
            vec![workload("w3", [10, 0, 0, 3], "1")],
            &["w1"],
        ))
        .await;
    assert!(nack(&ack).contains("unknown type URL"), "{}", nack(&ack));
    assert_eq!(
        ack.type_url,
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert_eq!(proxy.state().workload_count(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn reconnect_resumes_with_versions_and_the_rotated_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "first\n").unwrap();
    let mut server = FakeServer::plain().await;
    let mut proxy = Proxy::start(
        plain_target(server.addr),
        AuthToken::File(token.clone()),
        Limits::default(),
    );
    let mut s = server.session().await;
    assert_eq!(s.header("authorization"), "Bearer first");
    s.initial().await;
    sync(&mut s).await;
    proxy.until(|st| st.workload_count() == 2).await;
    // The token rotates; the server ends the stream cleanly (max connection age).
    std::fs::write(&token, "second\n").unwrap();
    drop(s);
    let mut s = server.session().await;
    assert_eq!(s.header("authorization"), "Bearer second");
    let initial = s.initial().await;
    assert_eq!(
        initial[ADDRESS_TYPE].initial_resource_versions,
        HashMap::from([
            ("w1".to_string(), "1".to_string()),
            ("w2".to_string(), "1".to_string()),
            (
                "default/reviews.default.svc.cluster.local".to_string(),
                "1".to_string()
            ),
        ])
    );
    assert_eq!(
        initial[AUTHORIZATION_TYPE].initial_resource_versions,
        HashMap::from([("default/deny-9999".to_string(), "7".to_string())])
    );
    // The server sends only what changed.
    s.exchange(response(ADDRESS_TYPE, "a9", vec![], &["w2"]))
        .await;
    proxy.until(|st| st.workload_count() == 1).await;
    assert_eq!(proxy.state().policies().len(), 1);
    assert_eq!(proxy.synced.load(Ordering::SeqCst), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn control_plane_restart_keeps_the_last_good_state_meanwhile() {
    let mut server = FakeServer::plain().await;
    let addr = server.addr;
    let mut proxy = Proxy::plain(addr);
    let mut s = server.session().await;
    s.initial().await;
    sync(&mut s).await;
    proxy.until(|st| st.workload_count() == 2).await;
    // istiod goes away: stop accepting, then end the stream.
    let stopping = tokio::spawn(server.stop());
    s.responses
        .send(Err(Status::unavailable("shutting down")))
        .await
        .unwrap();
    drop(s);
    stopping.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = proxy.state();
    assert_eq!(
        (st.workload_count(), st.service_count(), st.policies().len()),
        (2, 1, 1)
    );
    // It comes back on the same address; the client finds it and resumes.
    let mut server = FakeServer::start(TcpListener::bind(addr).await.unwrap(), None).await;
    let mut s = server.session().await;
    let initial = s.initial().await;
    assert_eq!(initial[ADDRESS_TYPE].initial_resource_versions.len(), 3);
    s.exchange(response(
        ADDRESS_TYPE,
        "b1",
        vec![workload("w3", [10, 0, 0, 3], "1")],
        &[],
    ))
    .await;
    proxy.until(|st| st.workload_count() == 3).await;
    proxy.stop().await;
}

#[tokio::test]
async fn an_oversized_message_ends_the_stream_but_not_the_state() {
    let mut server = FakeServer::plain().await;
    let limits = Limits {
        max_message_size: 4096,
        ..Limits::default()
    };
    let mut proxy = Proxy::start(plain_target(server.addr), AuthToken::None, limits);
    let mut s = server.session().await;
    s.initial().await;
    sync(&mut s).await;
    proxy.until(|st| st.workload_count() == 2).await;
    let mut big = workload("big", [10, 0, 0, 7], "1");
    big.aliases = vec!["x".repeat(8192)];
    s.send(response(ADDRESS_TYPE, "a2", vec![big], &[])).await;
    // The client drops that stream and comes back with what it had.
    let mut s2 = server.session().await;
    let initial = s2.initial().await;
    assert_eq!(initial[ADDRESS_TYPE].initial_resource_versions.len(), 3);
    assert_eq!(proxy.state().workload_count(), 2);
    drop(s);
    proxy.stop().await;
}

#[tokio::test]
async fn the_default_limit_takes_a_response_just_under_64_mib_and_drops_one_over() {
    let mut server = FakeServer::plain().await;
    let mut proxy = Proxy::start(
        plain_target(server.addr),
        AuthToken::None,
        Limits::default(),
    );
    let mut s = server.session().await;
    s.initial().await;
    sync(&mut s).await;
    proxy.until(|st| st.workload_count() == 2).await;
    let big = |name: &str, bytes: usize| {
        let mut w = workload(name, [10, 0, 0, 9], "1");
        w.aliases = vec!["x".repeat(bytes)];
        response(ADDRESS_TYPE, "big", vec![w], &[])
    };
    // 63 MiB: within the documented 64 MiB, answered on the same stream (ACK or NACK, not a reconnect).
    let under = big("under", 63 * 1024 * 1024);
    assert!(under.encoded_len() < 64 * 1024 * 1024);
    let reply = tokio::time::timeout(Duration::from_secs(30), s.exchange(under))
        .await
        .expect("an answer on the same stream");
    assert_eq!(reply.type_url, ADDRESS_TYPE);
    // 65 MiB: the stream ends and the client comes back with the state it had.
    let over = big("over", 65 * 1024 * 1024);
    s.send(over).await;
    let mut s2 = server.session().await;
    let initial = s2.initial().await;
    assert!(initial[ADDRESS_TYPE]
        .initial_resource_versions
        .contains_key("w1"));
    assert!(!initial[ADDRESS_TYPE]
        .initial_resource_versions
        .contains_key("over"));
    assert!(proxy.state().workload_count() >= 2);
    drop(s);
    proxy.stop().await;
}

#[tokio::test]
async fn a_control_plane_that_keeps_failing_is_retried_with_backoff_not_in_a_loop() {
    // A server that accepts and at once closes every connection: each attempt fails.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let server = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    let proxy = Proxy::start(plain_target(addr), AuthToken::None, Limits::default());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let n = attempts.load(Ordering::SeqCst);
    // 10 ms doubling: about 8 attempts in 2.5 s (to 2.56 s of waits); a client without backoff makes
    // hundreds. The bounds are wide for a loaded machine.
    assert!((3..=16).contains(&n), "{n} attempts in 2.5 s");
    proxy.stop().await;
    server.abort();
}

#[tokio::test]
async fn resources_past_the_limit_are_nacked() {
    let mut server = FakeServer::plain().await;
    let limits = Limits {
        max_resources: 2,
        ..Limits::default()
    };
    let mut proxy = Proxy::start(plain_target(server.addr), AuthToken::None, limits);
    let mut s = server.session().await;
    s.initial().await;
    let ack = s
        .exchange(response(
            ADDRESS_TYPE,
            "a1",
            vec![
                workload("w1", [10, 0, 0, 1], "1"),
                workload("w2", [10, 0, 0, 2], "1"),
                workload("w3", [10, 0, 0, 3], "1"),
            ],
            &[],
        ))
        .await;
    assert_eq!(nack(&ack), "w3: resource limit reached (2 resources held)");
    // Updating a held name is still fine.
    let ack = s
        .exchange(response(
            ADDRESS_TYPE,
            "a2",
            vec![workload("w2", [10, 0, 0, 9], "2")],
            &[],
        ))
        .await;
    assert_eq!(ack.error_detail, None);
    s.exchange(response(AUTHORIZATION_TYPE, "p1", vec![], &[]))
        .await;
    proxy
        .until(|st| st.workload_by_addr("", ip("10.0.0.9")).is_some())
        .await;
    assert_eq!(proxy.state().workload_count(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn tls_control_plane_is_verified_with_the_configured_root_and_alt_hostname() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["istiod.istio-system.svc".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        cert.pem(),
        key.serialize_pem(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut server = FakeServer::start(listener, Some(tls)).await;
    let target = GrpcTarget {
        address: format!("https://{}", server.addr),
        root: RootCa::Pem(ca_cert.pem()),
        alt_hostname: Some("istiod.istio-system.svc".into()),
        headers: vec![],
    };
    let mut proxy = Proxy::start(target, AuthToken::Literal("t".into()), Limits::default());
    let mut s = server.session().await;
    assert_eq!(s.header("authorization"), "Bearer t");
    s.initial().await;
    sync(&mut s).await;
    proxy.until(|st| st.workload_count() == 2).await;
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_stops_a_client_that_never_connected() {
    // Nothing listens on this port: the client backs off until told to stop.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = Proxy::plain(addr);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(proxy.synced.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.state().workload_count(), 0);
    proxy.stop().await;
}

#[test]
fn a_workload_push_keeps_the_policy_set_and_a_policy_push_replaces_it() {
    use super::cache::Cache;
    let mut cache = Cache::new(1000);
    let first = cache
        .apply(response(
            AUTHORIZATION_TYPE,
            "1",
            vec![policy("default/allow", "v1")],
            &[],
        ))
        .unwrap()
        .state;
    let after_workloads = cache
        .apply(response(
            ADDRESS_TYPE,
            "2",
            vec![workload("a", [10, 0, 0, 1], "v1")],
            &[],
        ))
        .unwrap()
        .state;
    // Open connections need no re-evaluation after this push: not one policy changed.
    assert!(after_workloads.same_policies(&first));
    assert_eq!(after_workloads.workload_count(), 1);
    let after_policies = cache
        .apply(response(
            AUTHORIZATION_TYPE,
            "3",
            vec![policy("default/allow", "v2")],
            &[],
        ))
        .unwrap()
        .state;
    assert!(!after_policies.same_policies(&after_workloads));
}

mod refused_policies;
mod waypoint;

#[tokio::test]
async fn responses_and_stream_ends_are_counted_as_ztunnels_xds_metrics() {
    let mut server = FakeServer::plain().await;
    let metrics = crate::metrics::Metrics::new();
    let target = plain_target(server.addr);
    let (publish, _states) = watch::channel(Arc::new(State::default()));
    let creds = crate::grpc::Credentials::new(
        AuthToken::Literal("token-1".into()),
        "east".into(),
        target.headers.clone(),
    );
    let meta = crate::config::ProxyMeta {
        pod_name: "ztunnel-abc".into(),
        pod_namespace: "istio-system".into(),
        service_account: "ztunnel".into(),
        instance_ip: Some("10.1.2.3".parse().unwrap()),
        metadata: BTreeMap::new(),
    };
    let client = XdsClient::new(target, creds, NodeInfo::new(&meta, Some("node-1")), publish)
        .with_metrics(metrics.xds());
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(client.run(|| {}, rx));
    let mut s = server.session().await;
    s.initial().await;
    let resp = response(
        ADDRESS_TYPE,
        "a1",
        vec![workload("w1", [10, 0, 0, 1], "1")],
        &[],
    );
    let bytes = prost::Message::encoded_len(&resp);
    s.exchange(resp).await;
    // The server ends the stream; the client counts the end and comes back.
    drop(s);
    let mut again = server.session().await;
    again.initial().await;
    let text = metrics.encode();
    let url = r#"{url="type.googleapis.com/istio.workload.Address"}"#;
    assert!(
        text.contains(&format!("istio_xds_message_total{url} 1\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("istio_xds_message_bytes_total{url} {bytes}\n")),
        "{text}"
    );
    let ends: u64 = text
        .lines()
        .filter(|l| l.starts_with("istio_xds_connection_terminations_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(ends, 1, "{text}");
    shutdown.send_replace(true);
    drop(again);
    let _ = tokio::time::timeout(WAIT, task).await;
}
