//! A waypoint's xDS client: its third subscription (its own `Waypoint`, by name), publishing only once
//! every type has arrived, NACKs from the waypoint's own check, and other waypoints' resources ignored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{
    any_resource, nack, plain_target, policy, response, service, workload, FakeServer, WAIT,
};
use crate::config::AuthToken;
use crate::proto::waypoint as wp;
use crate::xds::{
    NodeInfo, WaypointResources, WaypointSubscription, XdsClient, ADDRESS_TYPE, AUTHORIZATION_TYPE,
    WAYPOINT_TYPE,
};

struct TestWaypoint {
    published: Arc<Mutex<Vec<WaypointResources>>>,
    changed: watch::Receiver<usize>,
    synced: Arc<AtomicUsize>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TestWaypoint {
    fn start(addr: std::net::SocketAddr) -> TestWaypoint {
        let target = plain_target(addr);
        let creds = crate::grpc::Credentials::new(
            AuthToken::Literal("token-1".into()),
            "east".into(),
            target.headers.clone(),
        );
        let meta = crate::config::ProxyMeta {
            pod_name: "waypoint-abc".into(),
            pod_namespace: "default".into(),
            service_account: "waypoint".into(),
            instance_ip: Some("10.1.2.9".parse().unwrap()),
            metadata: BTreeMap::new(),
        };
        let published = Arc::new(Mutex::new(Vec::new()));
        let (count, changed) = watch::channel(0usize);
        let sink = published.clone();
        let sub = WaypointSubscription {
            name: "default/waypoint".into(),
            // The waypoint's own validation, standing in: a service named "bad" is refused.
            check: Box::new(|w: &wp::Waypoint| {
                if w.services.iter().any(|s| s.name == "bad") {
                    Err("service bad: refused".into())
                } else {
                    Ok(())
                }
            }),
            publish: Box::new(move |r| {
                sink.lock().push(r);
                count.send_modify(|n| *n += 1);
            }),
        };
        let client = XdsClient::for_waypoint(target, creds, NodeInfo::waypoint(&meta, None), sub);
        let synced = Arc::new(AtomicUsize::new(0));
        let s = synced.clone();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(client.run(
            move || {
                s.fetch_add(1, Ordering::SeqCst);
            },
            rx,
        ));
        TestWaypoint {
            published,
            changed,
            synced,
            shutdown,
            task,
        }
    }

    /// Waits for the `n`th publication and returns it.
    async fn nth(&mut self, n: usize) -> WaypointResources {
        tokio::time::timeout(WAIT, self.changed.wait_for(|c| *c >= n))
            .await
            .expect("never published")
            .unwrap();
        self.published.lock()[n - 1].clone()
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn waypoint(name: &str, version: &str, service: &str) -> crate::proto::discovery::Resource {
    let (ns, n) = name.split_once('/').unwrap();
    let w = wp::Waypoint {
        namespace: ns.into(),
        name: n.into(),
        services: vec![wp::Service {
            name: service.into(),
            hostname: format!("{service}.default.svc.cluster.local"),
            namespace: "default".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    any_resource(name, version, WAYPOINT_TYPE, w.encode_to_vec())
}

#[tokio::test]
async fn a_waypoint_subscribes_to_its_own_resource_and_publishes_once_every_type_arrived() {
    let mut server = FakeServer::plain().await;
    let mut c = TestWaypoint::start(server.addr);
    let mut s = server.session().await;
    let mut initial = std::collections::HashMap::new();
    for _ in 0..3 {
        let r = s.recv().await;
        initial.insert(r.type_url.clone(), r);
    }
    assert!(initial[ADDRESS_TYPE].resource_names_subscribe.is_empty());
    assert!(initial[AUTHORIZATION_TYPE]
        .resource_names_subscribe
        .is_empty());
    let mine = &initial[WAYPOINT_TYPE];
    assert_eq!(mine.resource_names_subscribe, vec!["default/waypoint"]);
    assert_eq!(
        mine.node.as_ref().unwrap().id,
        "router~10.1.2.9~waypoint-abc.default~default.svc.cluster.local"
    );
    let ack = s
        .exchange(response(
            ADDRESS_TYPE,
            "a1",
            vec![workload("w1", [10, 0, 0, 1], "1"), service("1")],
            &[],
        ))
        .await;
    assert_eq!(ack.error_detail, None);
    s.exchange(response(
        AUTHORIZATION_TYPE,
        "p1",
        vec![policy("deny-9999", "1")],
        &[],
    ))
    .await;
    // Workloads without the waypoint's own configuration are not published yet.
    assert_eq!(*c.changed.borrow(), 0);
    assert_eq!(c.synced.load(Ordering::SeqCst), 0);
    // A server that ignores the names sends another waypoint's too: ACKed, not held.
    let ack = s
        .exchange(response(
            WAYPOINT_TYPE,
            "w1",
            vec![
                waypoint("default/waypoint", "1", "reviews"),
                waypoint("other/waypoint", "1", "ratings"),
            ],
            &[],
        ))
        .await;
    assert_eq!(ack.error_detail, None);
    let first = c.nth(1).await;
    assert_eq!(first.workloads.len(), 1);
    assert_eq!(first.services.len(), 1);
    let w = first.waypoint.expect("our waypoint");
    assert_eq!(w.services[0].name, "reviews");
    assert_eq!(c.synced.load(Ordering::SeqCst), 1);
    // Removed: published without a waypoint.
    s.exchange(response(WAYPOINT_TYPE, "w2", vec![], &["default/waypoint"]))
        .await;
    assert!(c.nth(2).await.waypoint.is_none());
    c.stop().await;
}

#[tokio::test]
async fn a_waypoint_its_check_refuses_is_nacked_and_the_previous_one_kept() {
    let mut server = FakeServer::plain().await;
    let mut c = TestWaypoint::start(server.addr);
    let mut s = server.session().await;
    for _ in 0..3 {
        s.recv().await;
    }
    s.exchange(response(ADDRESS_TYPE, "a1", vec![], &[])).await;
    s.exchange(response(AUTHORIZATION_TYPE, "p1", vec![], &[]))
        .await;
    s.exchange(response(
        WAYPOINT_TYPE,
        "w1",
        vec![waypoint("default/waypoint", "1", "reviews")],
        &[],
    ))
    .await;
    assert!(c.nth(1).await.waypoint.is_some());
    let ack = s
        .exchange(response(
            WAYPOINT_TYPE,
            "w2",
            vec![waypoint("default/waypoint", "2", "bad")],
            &[],
        ))
        .await;
    let why = nack(&ack);
    assert!(why.contains("default/waypoint"), "{why}");
    assert!(why.contains("service bad: refused"), "{why}");
    let kept = c.nth(2).await.waypoint.unwrap();
    assert_eq!(kept.services[0].name, "reviews");
    // A resource whose content names another waypoint than its name.
    let mut wrong = waypoint("other/waypoint", "3", "reviews");
    wrong.name = "default/waypoint".into();
    let ack = s
        .exchange(response(WAYPOINT_TYPE, "w3", vec![wrong], &[]))
        .await;
    assert!(nack(&ack).contains("does not match"), "{}", nack(&ack));
    c.stop().await;
}

#[tokio::test]
async fn the_node_proxy_does_not_take_waypoint_resources() {
    let mut server = FakeServer::plain().await;
    let proxy = super::Proxy::plain(server.addr);
    let mut s = server.session().await;
    s.initial().await;
    let ack = s
        .exchange(response(
            WAYPOINT_TYPE,
            "w1",
            vec![waypoint("default/waypoint", "1", "reviews")],
            &[],
        ))
        .await;
    assert!(nack(&ack).contains("unknown type URL"), "{}", nack(&ack));
    proxy.stop().await;
}
