//! Waypoint routing on loopback, in one process, as ztunnel does it: where each connection went and with
//! which identity. The node proxy sends service traffic to the service's waypoint and pod traffic to the
//! pod's waypoint over HBONE (`:authority` = what the application dialled, the waypoint's identity
//! expected), lets the waypoint's own traffic through directly, refuses (and counts) connections whose
//! waypoint is missing or down, accepts a sandwiched waypoint's CONNECT for what it serves only, and
//! starts connections to an application-tunnel waypoint with a PROXY v2 header carrying the client's
//! identity. No root needed.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshnode::identity::{BuiltinCa, CertSource, Identity};
use support::waypoint::*;
use support::*;

const TTL: Duration = Duration::from_secs(3600);
const WAYPOINT_HOST: &str = "waypoint.default.svc.cluster.local";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn sa(name: &str) -> Identity {
    id(&format!("spiffe://cluster.local/ns/default/sa/{name}"))
}

/// How the waypoints are named in one test's mesh.
struct Bindings<'a> {
    /// The `waypoint:` value of the service `server` (VIP .100:8000).
    server: &'a str,
    /// The `waypoint:` value of the pod `db` (.5).
    db: &'a str,
    /// Extra lines for the waypoint workload (e.g. its application tunnel).
    waypoint_extra: &'a str,
}

/// The service `server`'s waypoint: the Service `waypoint`, by hostname (what istiod sends).
const BY_HOSTNAME: &str =
    "{destination: \"default/waypoint.default.svc.cluster.local\", hboneMtlsPort: 15008}";

impl Default for Bindings<'_> {
    fn default() -> Self {
        Bindings {
            server: BY_HOSTNAME,
            db: "null",
            waypoint_extra: "",
        }
    }
}

/// client .2; server .3 (app :8080) behind `server` (VIP .100:8000, the bound service) and `plain` (VIP
/// .103:8000, no waypoint); the waypoint pod (service account `waypoint`) at .4 and .14 behind the
/// Service `waypoint` (VIP .101, port 15008); db .5 (app :8080) behind `db` (VIP .102:5432, no
/// waypoint of its own).
fn mesh_yaml(net: [u8; 2], b: &Bindings) -> String {
    let ip = |h| ip(net, h);
    format!(
        r#"
workloads:
- uid: c//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{c}"]
  protocol: HBONE
- uid: c//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["{s}"]
  protocol: HBONE
  services:
    "default/server.default.svc.cluster.local": {{8000: 8080}}
    "default/plain.default.svc.cluster.local": {{8000: 8080}}
- uid: c//v1/Pod/default/waypoint
  name: waypoint
  namespace: default
  serviceAccount: waypoint
  workloadName: waypoint
  workloadIps: ["{w}", "{w2}"]
  protocol: HBONE
  services:
    "default/{WAYPOINT_HOST}": {{15008: 15008}}
  {extra}
- uid: c//v1/Pod/default/db
  name: db
  namespace: default
  serviceAccount: db
  workloadIps: ["{d}"]
  protocol: HBONE
  waypoint: {db_wp}
  services:
    "default/db.default.svc.cluster.local": {{5432: 8080}}
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/{vip}"]
  ports: {{8000: 8080}}
  waypoint: {server_wp}
- name: plain
  namespace: default
  hostname: plain.default.svc.cluster.local
  vips: ["/{plain}"]
  ports: {{8000: 8080}}
- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
  vips: ["/{db_vip}"]
  ports: {{5432: 8080}}
- name: waypoint
  namespace: default
  hostname: {WAYPOINT_HOST}
  vips: ["/{wp_vip}"]
  ports: {{15008: 15008}}
"#,
        c = ip(2),
        s = ip(3),
        w = ip(4),
        w2 = ip(14),
        d = ip(5),
        vip = ip(100),
        wp_vip = ip(101),
        db_vip = ip(102),
        plain = ip(103),
        extra = b.waypoint_extra,
        db_wp = b.db,
        server_wp = b.server,
    )
}

struct Mesh {
    net: [u8; 2],
    ca: Arc<BuiltinCa>,
    yaml: String,
    client: TestProxy,
    _server: TestProxy,
    _db: TestProxy,
    /// Connections the server's and db's applications accepted.
    server_app: Arc<AtomicUsize>,
    db_app: Arc<AtomicUsize>,
}

/// The client's, server's and db's proxies in `net` with their applications; no waypoint is started.
async fn mesh(net: [u8; 2], b: &Bindings<'_>) -> Mesh {
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let yaml = mesh_yaml(net, b);
    let client = start_proxy(ca.clone(), &yaml, "default/client/client", ip(net, 2), &[]).await;
    let server = start_proxy(ca.clone(), &yaml, "default/server/server", ip(net, 3), &[]).await;
    let db = start_proxy(ca.clone(), &yaml, "default/db/db", ip(net, 5), &[]).await;
    let server_app = counting_echo(SocketAddr::new(ip(net, 3), 8080)).await;
    let db_app = counting_echo(SocketAddr::new(ip(net, 5), 8080)).await;
    Mesh {
        net,
        ca,
        yaml,
        client,
        _server: server,
        _db: db,
        server_app,
        db_app,
    }
}

/// `db`'s binding to the waypoint by the waypoint pod's address (.4).
fn db_by_address(net: [u8; 2]) -> String {
    format!("{{destination: \"/{}\", hboneMtlsPort: 15008}}", ip(net, 4))
}

impl Mesh {
    fn at(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(ip(self.net, host), port)
    }

    /// A fake waypoint on .4:15008 presenting `who`'s identity.
    async fn fake_waypoint_as(&self, who: &str) -> FakeWaypoint {
        fake_waypoint(&*self.ca, &sa(who), self.at(4, 15008)).await
    }

    /// A meshnode proxy acting for the waypoint workload, listening on `host` (.4 or .14).
    async fn waypoint_proxy(&self, host: u8) -> TestProxy {
        let ca: Arc<dyn CertSource> = self.ca.clone();
        start_proxy(
            ca,
            &self.yaml,
            "default/waypoint/waypoint",
            ip(self.net, host),
            &[],
        )
        .await
    }

    /// A connection from the client (.2) to `dst`, through the client's proxy.
    async fn call(&self, dst: SocketAddr, msg: &[u8]) -> std::io::Result<String> {
        let entry = capture(&self.client.proxy, ip(self.net, 2), dst).await;
        roundtrip_from(ip(self.net, 2), entry, msg).await
    }

    fn client_metrics(&self) -> String {
        self.client.proxy.metrics().encode()
    }

    fn cert(&self, who: &str) -> meshnode::identity::WorkloadCert {
        self.ca
            .issue(
                &sa(who),
                SystemTime::now() - Duration::from_secs(60),
                SystemTime::now() + TTL,
            )
            .unwrap()
    }
}

/// The client saw the connection closed without a byte.
fn refused(answer: &std::io::Result<String>) -> bool {
    matches!(answer.as_deref(), Ok("") | Err(_))
}

/// The value of `meshnode_waypoint_unavailable_total` for `labels` (as encoded), 0 when absent.
/// `meshnode_waypoint_unavailable_total` counted exactly one refusal for `waypoint` named by `binding`,
/// for `reason`.
fn assert_refused_once(metrics: &str, waypoint: &str, binding: &str, reason: &str) {
    let prefix = format!(
        "meshnode_waypoint_unavailable_total{{waypoint=\"{waypoint}\",binding=\"{binding}\",reason=\"{reason}\"}} "
    );
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse::<u64>().unwrap());
    assert_eq!(count, 1, "{waypoint} {binding} {reason}:\n{metrics}");
}

#[tokio::test]
async fn service_traffic_goes_to_the_services_waypoint_with_the_vip_as_authority() {
    let m = mesh(loopback_net(), &Bindings::default()).await;
    let wp = m.fake_waypoint_as("waypoint").await;
    let vip = m.at(100, 8000);

    let answer = m.call(vip, b"hello").await.unwrap();
    assert_eq!(answer, format!("waypoint={vip}\nhello"));
    let seen = wp.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    // The VIP and port the application dialled, untranslated; the client's own identity.
    assert_eq!(seen[0].authority, vip.to_string());
    assert_eq!(seen[0].peer, sa("client"));
    let forwarded = seen[0].forwarded.clone().unwrap_or_default();
    assert!(
        forwarded.starts_with(&format!("for=\"{}:", ip(m.net, 2)))
            && forwarded.ends_with(";host=server.default.svc.cluster.local"),
        "{forwarded}"
    );
    assert_eq!(m.server_app.load(Ordering::SeqCst), 0, "went direct too");
    // Metrics: the intended service, the waypoint as the destination workload.
    let metrics = m.client_metrics();
    let opened = metrics
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap_or_else(|| panic!("{metrics}"));
    for label in [
        "destination_service=\"server.default.svc.cluster.local\"",
        "destination_workload=\"waypoint\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/waypoint\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
    ] {
        assert!(opened.contains(label), "{label} not in {opened}");
    }

    // A service without a waypoint goes direct.
    let answer = m.call(m.at(103, 8000), b"plain").await.unwrap();
    assert!(
        answer.starts_with("peer=") && answer.ends_with("plain"),
        "{answer}"
    );
    assert_eq!(m.server_app.load(Ordering::SeqCst), 1);
    assert_eq!(
        wp.seen().len(),
        1,
        "a service without a waypoint reached it"
    );
}

#[tokio::test]
async fn pod_traffic_to_a_workload_with_a_waypoint_goes_to_it_with_the_pod_as_authority() {
    let net = loopback_net();
    let db = db_by_address(net);
    let m = mesh(
        net,
        &Bindings {
            server: "null",
            db: &db,
            ..Default::default()
        },
    )
    .await;
    let wp = m.fake_waypoint_as("waypoint").await;
    let pod = m.at(5, 8080);

    let answer = m.call(pod, b"to the pod").await.unwrap();
    assert_eq!(answer, format!("waypoint={pod}\nto the pod"));
    let seen = wp.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, pod.to_string());
    assert_eq!(seen[0].peer, sa("client"));
    assert_eq!(m.db_app.load(Ordering::SeqCst), 0, "went direct too");

    // Through db's VIP (its service has no waypoint): direct; workload waypoints are not consulted for
    // service-addressed traffic.
    let answer = m.call(m.at(102, 5432), b"via vip").await.unwrap();
    assert!(
        answer.starts_with("peer=") && answer.ends_with("via vip"),
        "{answer}"
    );
    assert_eq!(m.db_app.load(Ordering::SeqCst), 1);
    assert_eq!(wp.seen().len(), 1);
}

#[tokio::test]
async fn the_waypoints_own_traffic_to_its_pod_goes_direct_without_a_loop() {
    let net = loopback_net();
    let db = db_by_address(net);
    let m = mesh(
        net,
        &Bindings {
            db: &db,
            ..Default::default()
        },
    )
    .await;
    let wp = m.fake_waypoint_as("waypoint").await;
    // The waypoint's node proxy, acting for the waypoint workload (identity `waypoint`, addresses .4 and
    // .14), here listening on .14.
    let waypoint_node = m.waypoint_proxy(14).await;
    let pod = m.at(5, 8080);
    let entry = capture(&waypoint_node.proxy, ip(net, 14), pod).await;

    // From one of the waypoint's own addresses: straight to the pod.
    let answer = roundtrip_from(ip(net, 14), entry, b"from the waypoint")
        .await
        .unwrap();
    assert!(
        answer.starts_with("peer=") && answer.ends_with("from the waypoint"),
        "{answer}"
    );
    assert_eq!(m.db_app.load(Ordering::SeqCst), 1);
    assert!(wp.seen().is_empty(), "looped back into the waypoint");

    // The same identity from an address that is not the waypoint's is sent to the waypoint.
    let answer = roundtrip_from(ip(net, 2), entry, b"not from it")
        .await
        .unwrap();
    assert_eq!(answer, format!("waypoint={pod}\nnot from it"));
    assert_eq!(wp.seen().len(), 1);
    assert_eq!(wp.seen()[0].peer, sa("waypoint"));
    // And anyone else's traffic to the pod goes to the waypoint as usual.
    let answer = m.call(pod, b"client").await.unwrap();
    assert_eq!(answer, format!("waypoint={pod}\nclient"));
    assert_eq!(m.db_app.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_waypoint_missing_from_the_state_refuses_the_connection_and_counts_it() {
    let net = loopback_net();
    let db = format!(
        "{{destination: \"/{}\", hboneMtlsPort: 15008}}",
        ip(net, 77)
    );
    let m = mesh(
        net,
        &Bindings {
            server:
                "{destination: \"default/gone.default.svc.cluster.local\", hboneMtlsPort: 15008}",
            db: &db,
            ..Default::default()
        },
    )
    .await;
    // A waypoint is running, but neither binding names it.
    let wp = m.fake_waypoint_as("waypoint").await;

    assert!(refused(&m.call(m.at(100, 8000), b"svc").await));
    assert!(refused(&m.call(m.at(5, 8080), b"pod").await));
    assert_eq!(m.server_app.load(Ordering::SeqCst), 0, "sent direct");
    assert_eq!(m.db_app.load(Ordering::SeqCst), 0, "sent direct");
    assert!(wp.seen().is_empty());
    let metrics = m.client_metrics();
    assert_refused_once(
        &metrics,
        "default/gone.default.svc.cluster.local",
        "service",
        "not_found",
    );
    assert_refused_once(
        &metrics,
        &format!("/{}", ip(net, 77)),
        "workload",
        "not_found",
    );
    // Traffic that needs no waypoint is unaffected.
    let answer = m.call(m.at(103, 8000), b"plain").await.unwrap();
    assert!(answer.ends_with("plain"), "{answer}");
}

#[tokio::test]
async fn a_waypoint_that_is_down_refuses_the_connection() {
    // The waypoint is in the state but nothing listens on its HBONE port.
    let m = mesh(loopback_net(), &Bindings::default()).await;
    assert!(refused(&m.call(m.at(100, 8000), b"anyone?").await));
    assert_eq!(m.server_app.load(Ordering::SeqCst), 0, "sent direct");
    let metrics = m.client_metrics();
    assert_refused_once(
        &metrics,
        &format!("default/{WAYPOINT_HOST}"),
        "service",
        "unreachable",
    );
}

#[tokio::test]
async fn a_waypoint_presenting_another_identity_is_refused() {
    let m = mesh(loopback_net(), &Bindings::default()).await;
    let impostor = m.fake_waypoint_as("impostor").await;
    assert!(refused(&m.call(m.at(100, 8000), b"secret").await));
    assert!(impostor.seen().is_empty(), "data reached an impostor");
    assert_eq!(m.server_app.load(Ordering::SeqCst), 0, "sent direct");
    let metrics = m.client_metrics();
    assert_refused_once(
        &metrics,
        &format!("default/{WAYPOINT_HOST}"),
        "service",
        "unreachable",
    );
}

#[tokio::test]
async fn a_sandwiched_waypoint_accepts_connects_only_for_what_it_serves() {
    let net = loopback_net();
    let db = db_by_address(net);
    let m = mesh(
        net,
        &Bindings {
            db: &db,
            ..Default::default()
        },
    )
    .await;
    // The waypoint pod's own node proxy on .14, with the waypoint's listeners behind it at .14.
    let _node = m.waypoint_proxy(14).await;
    echo_server(m.at(14, 8000)).await;
    echo_server(m.at(14, 8080)).await;
    let (mut c, _) = hbone_client_from(
        m.cert("client"),
        sa("waypoint"),
        ip(net, 2),
        m.at(14, 15008),
    )
    .await;

    // The service bound to this waypoint, by its VIP: delivered to the waypoint at the VIP's port.
    let answer = connect_roundtrip(&c, &m.at(100, 8000).to_string(), b"svc").await;
    assert!(
        answer.starts_with("peer=") && answer.ends_with("svc"),
        "{answer}"
    );
    // The pod bound to this waypoint (by the waypoint's other address).
    let answer = connect_roundtrip(&c, &m.at(5, 8080).to_string(), b"pod").await;
    assert!(answer.ends_with("pod"), "{answer}");
    // Its own address, as always.
    assert_eq!(
        status_of(&mut c, connect(&m.at(14, 8000).to_string()))
            .await
            .unwrap(),
        200
    );
    // Another service, another pod, an unknown address: not served via this waypoint.
    for other in [m.at(103, 8000), m.at(3, 8080), m.at(99, 8000)] {
        assert_eq!(
            status_of(&mut c, connect(&other.to_string()))
                .await
                .unwrap(),
            400,
            "CONNECT {other}"
        );
    }
}

#[tokio::test]
async fn an_application_tunnel_waypoint_gets_a_proxy_v2_header_with_the_client_identity() {
    let net = loopback_net();
    // The waypoint's PROXY listener, on loopback as Istio's waypoints bind it.
    let (app, seen) = proxy_v2_app(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 0)).await;
    let tunnel = format!(
        "applicationTunnel: {{protocol: PROXY, port: {}}}",
        app.port()
    );
    let m = mesh(
        net,
        &Bindings {
            waypoint_extra: &tunnel,
            ..Default::default()
        },
    )
    .await;
    let _node = m.waypoint_proxy(4).await;
    let vip = m.at(100, 8000);

    // End to end: client → its proxy → HBONE to the waypoint's proxy → PROXY header → the waypoint.
    let answer = m.call(vip, b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(answer, "proxied\n");
    let got = seen.lock().clone();
    assert_eq!(got.len(), 1);
    let header = got[0].header.clone().unwrap();
    assert_eq!(header.dst, vip);
    assert_eq!(
        header.tlvs,
        [(
            0xD0,
            b"spiffe://cluster.local/ns/default/sa/client".to_vec()
        )]
    );
    assert_eq!(got[0].payload, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(m.server_app.load(Ordering::SeqCst), 0);

    // The header's source is the HBONE peer's address.
    let (c, from) =
        hbone_client_from(m.cert("client"), sa("waypoint"), ip(net, 2), m.at(4, 15008)).await;
    let answer = connect_roundtrip(&c, &vip.to_string(), b"payload").await;
    assert_eq!(answer, "proxied\n");
    let got = seen.lock().clone();
    assert_eq!(got.len(), 2);
    let header = got[1].header.clone().unwrap();
    assert_eq!(header.src, from);
    assert_eq!(header.dst, vip);
    assert_eq!(got[1].payload, b"payload");
}
