//! The waypoint end to end over loopback, in one process: a client HBONE connection (with the client
//! workload's certificate) to the waypoint, HTTP/1.1, HTTP/2 and TCP inside CONNECT tunnels addressed to a
//! service VIP, the waypoint re-originating HBONE to the backend's node proxy (which admits only the
//! waypoint's identity), and what the waypoint answers to bad input and failures.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use meshnode::identity::{BuiltinCa, Identity, WorkloadCert};
use meshnode::proto::waypoint as pb;
use meshnode::state::{GatewayAddress, GatewayDestination};
use meshnode::waypoint::forward::{CONNECT_FAILURE, NO_HEALTHY_UPSTREAM};
use meshnode::waypoint::snapshot::Unreachable;
use meshnode::waypoint::Snapshot;
use support::l7::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TTL: Duration = Duration::from_secs(3600);
/// The waypoint's network in most of these tests: the one the workloads are on (none named).
const NETWORK: &str = "";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn now_plus(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::now() + Duration::from_secs(secs as u64)
    } else {
        SystemTime::now() - Duration::from_secs((-secs) as u64)
    }
}

/// The backend's node proxy state: the backend at .3 (HBONE), admitting only the waypoint's identity.
fn node_yaml(net: [u8; 2]) -> String {
    format!(
        r#"
workloads:
- uid: {uid}
  name: backend
  namespace: default
  serviceAccount: backend
  workloadIps: ["{b}"]
  protocol: HBONE
policies:
- name: only-the-waypoint
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{{principals: [!Exact "cluster.local/ns/default/sa/waypoint"]}}]]]
"#,
        uid = uid("backend"),
        b = ip(net, 3),
    )
}

/// Addresses: client .2, waypoint .10, backend .3 (HBONE, behind a node proxy: HTTP on 8080, HTTP/2 on
/// 8081, echo on 9090), legacy .4 (plain TCP, HTTP on 8080), gone .5 (HBONE, nothing there).
/// Services: backend at VIP .100 (80 HTTP, 81 HTTP2, 90 TCP, 91 undeclared), legacy .101:80, down .102:80.
fn config(net: [u8; 2]) -> Snapshot {
    let bk = hostname("backend");
    let key = format!("default/{bk}");
    let workloads = vec![
        workload("client", "client", ip(net, 2), true, &[]),
        workload("waypoint", "waypoint", ip(net, 10), true, &[]),
        workload(
            "backend",
            "backend",
            ip(net, 3),
            true,
            &[
                (&key, 80, 8080),
                (&key, 81, 8081),
                (&key, 90, 9090),
                (&key, 91, 8080),
            ],
        ),
        workload(
            "legacy",
            "legacy",
            ip(net, 4),
            false,
            &[(&format!("default/{}", hostname("legacy")), 80, 8080)],
        ),
        workload(
            "gone",
            "gone",
            ip(net, 5),
            true,
            &[(&format!("default/{}", hostname("down")), 80, 8080)],
        ),
    ];
    let services = vec![
        service(
            "backend",
            ip(net, 100),
            &[(80, 8080), (81, 8081), (90, 9090), (91, 8080)],
        ),
        service("legacy", ip(net, 101), &[(80, 8080)]),
        service("down", ip(net, 102), &[(80, 8080)]),
    ];
    let wp = waypoint_resource(
        vec![
            bound_service(
                "backend",
                vec![
                    port(pb::Protocol::Http, "backend", 80, &["backend"]),
                    port(pb::Protocol::Http2, "backend", 81, &["backend"]),
                    port(pb::Protocol::Tcp, "backend", 90, &["backend"]),
                    port(pb::Protocol::Unspecified, "backend", 91, &["backend"]),
                ],
            ),
            bound_service(
                "legacy",
                vec![port(pb::Protocol::Http, "legacy", 80, &["legacy"])],
            ),
            bound_service(
                "down",
                vec![port(pb::Protocol::Http, "down", 80, &["gone"])],
            ),
        ],
        &["backend"],
    );
    Snapshot::build(&workloads, &services, Some(&wp), NETWORK, None).unwrap()
}

struct Mesh {
    net: [u8; 2],
    ca: Arc<BuiltinCa>,
    node: TestProxy,
    wp: TestWaypoint,
    http: Arc<Backend>,
    http2: Arc<Backend>,
    legacy: Arc<Backend>,
}

async fn mesh(extra: &[(&str, &str)]) -> Mesh {
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let node = start_proxy(
        ca.clone(),
        &node_yaml(net),
        "default/backend/backend",
        ip(net, 3),
        &[],
    )
    .await;
    let http = backend("backend", SocketAddr::new(ip(net, 3), 8080)).await;
    let http2 = backend("backend-h2", SocketAddr::new(ip(net, 3), 8081)).await;
    let legacy = backend("legacy", SocketAddr::new(ip(net, 4), 8080)).await;
    echo_server(SocketAddr::new(ip(net, 3), 9090)).await;
    let wp = start_waypoint(ca.clone(), ip(net, 10), config(net), extra).await;
    Mesh {
        net,
        ca,
        node,
        wp,
        http,
        http2,
        legacy,
    }
}

impl Mesh {
    fn cert(&self, sa: &str) -> WorkloadCert {
        self.ca
            .issue(
                &id(&format!("spiffe://cluster.local/ns/default/sa/{sa}")),
                now_plus(-60),
                now_plus(3600),
            )
            .unwrap()
    }

    /// An HBONE connection to the waypoint from the client workload's address, with its certificate.
    async fn client(&self) -> h2::client::SendRequest<Bytes> {
        hbone_client_at(
            self.cert("client"),
            waypoint_id(),
            Some(ip(self.net, 2)),
            self.wp.addr,
        )
        .await
        .unwrap()
        .0
    }

    fn vip(&self, host: u8, port: u16) -> String {
        SocketAddr::new(ip(self.net, host), port).to_string()
    }
}

async fn get_ok(
    h: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    path: &str,
) -> (http::StatusCode, String) {
    let resp = h
        .send_request(get(path, &hostname("backend")))
        .await
        .unwrap();
    read(resp).await
}

#[tokio::test]
async fn http1_requests_reach_the_backend_through_its_node_proxy_as_the_waypoint() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    // Keep-alive: three requests on one client tunnel, all answered by the backend.
    for i in 0..3 {
        let (status, body) = get_ok(&mut h, &format!("/r/{i}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "hello from backend");
    }
    let seen = m.http.seen.lock().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].path, "/r/2");
    assert_eq!(seen[0].host, hostname("backend"), "the Host header is kept");
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    // One upstream HTTP connection, over one HBONE connection to the node proxy.
    assert_eq!(m.http.connections(), 1);
    assert_eq!(m.wp.waypoint.upstream_http_connections(), 1);
    assert_eq!(m.wp.waypoint.hbone_connections(), 1);
    // The node proxy admits only the waypoint's identity: the client's own is refused there, so the
    // requests above arrived with the waypoint's certificate.
    let mut direct = hbone_client(
        m.cert("client"),
        id("spiffe://cluster.local/ns/default/sa/backend"),
        SocketAddr::new(ip(m.net, 3), 15008),
    )
    .await
    .unwrap();
    let refused = status_of(
        &mut direct,
        connect(&SocketAddr::new(ip(m.net, 3), 8080).to_string()),
    )
    .await
    .unwrap();
    assert_eq!(refused, 401);
    let metrics = m.node.proxy.metrics().encode();
    assert!(
        metrics.contains(r#"source_principal="spiffe://cluster.local/ns/default/sa/waypoint""#),
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_client_tunnels_share_one_upstream_hbone_connection() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await);
    }
    let answers = futures_util::future::join_all(clients.iter_mut().map(|h| get_ok(h, "/"))).await;
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
    }
    // Each concurrent request had an HTTP/1.1 connection of its own, all multiplexed on one HBONE
    // connection; sequential requests afterwards reuse them instead of opening more.
    let opened = m.wp.waypoint.upstream_http_connections();
    assert!((1..=4).contains(&opened), "{opened}");
    for h in clients.iter_mut() {
        assert_eq!(get_ok(h, "/again").await.0, 200);
    }
    assert_eq!(m.wp.waypoint.upstream_http_connections(), opened);
    assert_eq!(m.wp.waypoint.hbone_connections(), 1);
}

#[tokio::test]
async fn http2_requests_are_proxied_as_http2_on_one_upstream_connection() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut h = http2(tunnel(&c, &m.vip(100, 81)).await.unwrap()).await;
    let req = |i: u32| {
        http::Request::builder()
            .uri(format!("http://{}/h2/{i}", hostname("backend")))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let first = read(h.send_request(req(0)).await.unwrap()).await;
    assert_eq!(
        first,
        (http::StatusCode::OK, "hello from backend-h2".to_string())
    );
    let many = futures_util::future::join_all((1..6).map(|i| {
        let mut h = h.clone();
        async move { read(h.send_request(req(i)).await.unwrap()).await }
    }))
    .await;
    for (status, body) in many {
        assert_eq!(status, 200, "{body}");
    }
    let seen = m.http2.seen.lock().clone();
    assert_eq!(seen.len(), 6);
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "{seen:?}"
    );
    assert_eq!(seen[0].host, hostname("backend"));
    assert_eq!(m.http2.connections(), 1);
    assert_eq!(m.wp.waypoint.upstream_http_connections(), 1);
}

#[tokio::test]
async fn an_undeclared_port_is_sniffed_as_http1_or_http2() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut h1 = http1(tunnel(&c, &m.vip(100, 91)).await.unwrap()).await;
    assert_eq!(
        get_ok(&mut h1, "/sniffed").await,
        (http::StatusCode::OK, "hello from backend".into())
    );
    let mut h2c = http2(tunnel(&c, &m.vip(100, 91)).await.unwrap()).await;
    let resp = h2c
        .send_request(
            http::Request::builder()
                .uri(format!("http://{}/sniffed-h2", hostname("backend")))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(read(resp).await.0, 200);
    // Sniffed HTTP goes upstream in the client's version.
    let seen = m.http.seen.lock().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[1].version, http::Version::HTTP_2);
}

#[tokio::test]
async fn a_tcp_port_is_copied_both_ways() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut t = tunnel(&c, &m.vip(100, 90)).await.unwrap();
    t.write_all(b"bytes through the waypoint").await.unwrap();
    t.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("peer="), "{out}");
    assert!(out.ends_with("bytes through the waypoint"), "{out}");
    // Counted as the waypoint's TCP traffic once the tunnel has closed.
    drop(t);
    let counted = |text: &str| {
        text.lines().any(|l| {
            l.starts_with(r#"istio_tcp_received_bytes_total{reporter="waypoint""#)
                && l.contains(r#"destination_workload="backend""#)
                && l.contains(r#"request_protocol="tcp""#)
                && l.ends_with(" 26")
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !counted(&m.wp.waypoint.metrics().encode()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            m.wp.waypoint.metrics().encode()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_workload_without_hbone_is_reached_over_plain_tcp() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(101, 80)).await.unwrap()).await;
    let resp = h.send_request(get("/", &hostname("legacy"))).await.unwrap();
    assert_eq!(
        read(resp).await,
        (http::StatusCode::OK, "hello from legacy".into())
    );
    assert_eq!(m.legacy.requests(), 1);
    assert_eq!(m.wp.waypoint.hbone_connections(), 0);
}

#[tokio::test]
async fn traffic_to_a_bound_workloads_address_goes_to_that_workload() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let pod = SocketAddr::new(ip(m.net, 3), 8080).to_string();
    let mut h = http1(tunnel(&c, &pod).await.unwrap()).await;
    let resp = h.send_request(get("/direct", &pod)).await.unwrap();
    assert_eq!(
        read(resp).await,
        (http::StatusCode::OK, "hello from backend".into())
    );
    assert_eq!(m.http.seen.lock()[0].path, "/direct");
}

#[tokio::test]
async fn destinations_the_waypoint_does_not_serve_get_envoys_answers() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    // An address with no bound service or workload: the tunnel itself is refused.
    assert_eq!(
        tunnel(&c, &m.vip(150, 80)).await.err(),
        Some(http::StatusCode::SERVICE_UNAVAILABLE)
    );
    // A port the bound service does not declare: no route, 404.
    let mut h = http1(tunnel(&c, &m.vip(100, 99)).await.unwrap()).await;
    let (status, _) = get_ok(&mut h, "/").await;
    assert_eq!(status, 404);
    // Not CONNECT: 400.
    let mut raw = c.clone().ready().await.unwrap();
    let (resp, _) = raw
        .send_request(
            http::Request::builder()
                .method("GET")
                .uri(format!("http://{}/", m.vip(100, 80)))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 400);
    assert_eq!(m.http.requests(), 0);
}

/// Writes `raw` in a fresh tunnel to VIP:80 and returns everything the waypoint answers until it closes.
async fn raw_exchange(c: &h2::client::SendRequest<Bytes>, authority: &str, raw: &[u8]) -> String {
    let mut t = tunnel(c, authority).await.unwrap();
    t.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), t.read_to_end(&mut out))
        .await
        .expect("the waypoint answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_next_client_is_served() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let vip = m.vip(100, 80);
    let answer = raw_exchange(
        &c,
        &vip,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw_exchange(&c, &vip, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The waypoint answered: nothing reached the backend.
    assert_eq!(m.http.connections(), 0);
    // Same HBONE connection, next tunnel: served.
    let mut h = http1(tunnel(&c, &vip).await.unwrap()).await;
    assert_eq!(get_ok(&mut h, "/").await.0, 200);
}

#[tokio::test]
async fn request_headers_over_64_kib_get_431() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 70 * 1024));
    raw.extend_from_slice(b"\r\n\r\n");
    let answer = raw_exchange(&c, &m.vip(100, 80), &raw).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(m.http.connections(), 0);
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    assert_eq!(get_ok(&mut h, "/").await.0, 200);
}

#[tokio::test]
async fn a_client_too_slow_with_its_headers_gets_408_and_others_are_served() {
    let m = mesh(&[("MESHNODE_WAYPOINT_HEADER_TIMEOUT", "300ms")]).await;
    let c = m.client().await;
    let vip = m.vip(100, 80);
    let slow = raw_exchange(&c, &vip, b"GET / HTTP/1.1\r\nHost: x\r\n");
    let served = async {
        let mut h = http1(tunnel(&c, &vip).await.unwrap()).await;
        get_ok(&mut h, "/").await.0
    };
    let (answer, status) = tokio::join!(slow, served);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.ends_with("request timeout"), "{answer}");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_client_outlives_the_header_timeout() {
    let m = mesh(&[("MESHNODE_WAYPOINT_HEADER_TIMEOUT", "200ms")]).await;
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    assert_eq!(get_ok(&mut h, "/first").await.0, 200);
    // Idle for several header timeouts: the header timeout is about heads in progress, not idle clients.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !h.is_closed(),
        "the waypoint closed an idle keep-alive tunnel"
    );
    assert_eq!(get_ok(&mut h, "/second").await.0, 200);
}

#[tokio::test]
async fn an_unreachable_endpoint_gets_envoys_503() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(102, 80)).await.unwrap()).await;
    let resp = h.send_request(get("/", &hostname("down"))).await.unwrap();
    let (status, body) = read(resp).await;
    assert_eq!(status, 503);
    assert_eq!(body, CONNECT_FAILURE);
    // A cluster with no endpoint at all.
    let empty = Snapshot::build(
        &[],
        &[service("backend", ip(m.net, 100), &[(80, 8080)])],
        Some(&waypoint_resource(
            vec![bound_service(
                "backend",
                vec![port(pb::Protocol::Http, "backend", 80, &[])],
            )],
            &[],
        )),
        NETWORK,
        None,
    )
    .unwrap();
    m.wp.config.send_replace(Arc::new(empty));
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let (status, body) = get_ok(&mut h, "/").await;
    assert_eq!((status.as_u16(), body.as_str()), (503, NO_HEALTHY_UPSTREAM));
}

#[tokio::test]
async fn a_request_failing_with_503_is_retried_and_the_upstream_sees_both_tries() {
    let m = mesh(&[]).await;
    // The route retries on 503 (Istio's default policy does too).
    let mut wp = backend_waypoint();
    wp.services[0].ports[0].routes.push(pb::Route {
        name: "default/backend-retries".into(),
        action: forward_to("backend-80"),
        retries: Some(pb::RetryPolicy {
            attempts: 2,
            retry_on: vec!["retriable-status-codes".into()],
            retriable_status_codes: vec![503],
            ..Default::default()
        }),
        ..Default::default()
    });
    m.wp.config.send_replace(Arc::new(serving_backend(&m, &wp)));
    m.http
        .fail_first
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let (status, body) = get_ok(&mut h, "/flaky").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(m.http.requests(), 2, "the first try got 503, the retry 200");
}

#[tokio::test]
async fn request_metrics_are_reported_as_the_waypoint_with_istios_labels() {
    let m = mesh(&[]).await;
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    assert_eq!(get_ok(&mut h, "/").await.0, 200);
    let mut h = http1(tunnel(&c, &m.vip(100, 99)).await.unwrap()).await;
    assert_eq!(get_ok(&mut h, "/").await.0, 404);
    let text = m.wp.waypoint.metrics().encode();
    let ok = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains(r#"response_code="200""#))
        .unwrap_or_else(|| panic!("no 200 counted:\n{text}"));
    for label in [
        r#"reporter="waypoint""#,
        r#"source_workload="client""#,
        r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#,
        r#"destination_workload="backend""#,
        r#"destination_service="backend.default.svc.cluster.local""#,
        r#"destination_principal="spiffe://cluster.local/ns/default/sa/backend""#,
        r#"request_protocol="http""#,
        r#"response_flags="-""#,
        r#"connection_security_policy="mutual_tls""#,
    ] {
        assert!(ok.contains(label), "{label} missing in {ok}");
    }
    assert!(ok.ends_with(" 1"), "{ok}");
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains(r#"response_code="404""#)
            && l.contains(r#"response_flags="NR""#)),
        "{text}"
    );
    assert!(
        text.contains("istio_request_duration_milliseconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("istio_request_bytes_count{"), "{text}");
    assert!(text.contains("istio_response_bytes_sum{"), "{text}");
}

#[test]
fn the_waypoint_binary_starts_from_its_environment_and_serves_hbone_with_its_certificate() {
    if !root_or_skip(
        "the_waypoint_binary_starts_from_its_environment_and_serves_hbone_with_its_certificate",
    ) {
        return;
    }
    let ns = support::netns::Netns::new("wp");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log_path = dir.path().join("waypoint.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _child = support::netns::KillOnDrop(ns.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &["waypoint"],
        &[
            ("XDS_ADDRESS", ""),
            ("CA_ADDRESS", ""),
            ("MESHNODE_STATE_DIR", state.to_str().unwrap()),
            ("POD_NAMESPACE", "bookinfo"),
            ("POD_NAME", "waypoint-7c9f-abcde"),
            ("INSTANCE_IP", "127.0.0.1"),
            ("TRUST_DOMAIN", "cluster.local"),
            ("RUST_LOG", "info"),
        ],
        log,
    ));
    // Ready once its certificate is issued (no xDS to wait for here); the deadline only ends a hung run.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(answer) = ns.http_get(15021, "/healthz/ready") {
            assert!(answer.ends_with("ready\n"), "{answer}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The metrics port answers (no request yet, so no sample).
    let metrics = ns.http_get(15020, "/metrics").expect("metrics answered");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    // HBONE on :15008 with the identity `SERVICE_ACCOUNT` defaults to (the waypoint's name), issued by the
    // local CA; with no configuration every tunnel is refused.
    let ca = BuiltinCa::load_or_create(&state, TTL).unwrap();
    let cert = ca
        .issue(
            &id("spiffe://cluster.local/ns/bookinfo/sa/productpage"),
            now_plus(-60),
            now_plus(3600),
        )
        .unwrap();
    let status = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut c = hbone_client(
                cert,
                id("spiffe://cluster.local/ns/bookinfo/sa/waypoint"),
                "127.0.0.1:15008".parse().unwrap(),
            )
            .await
            .unwrap();
            status_of(&mut c, connect("10.96.0.1:80")).await.unwrap()
        })
    });
    assert_eq!(status, 503);
}

/// The raw answer to `GET path` on `addr`.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn the_waypoint_configured_over_xds_serves_what_the_control_plane_sends() {
    use meshnode::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, WAYPOINT_TYPE};
    use support::ads::{resource, start_ads, StaticAds};
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // One local CA for everyone: the waypoint loads it from MESHNODE_STATE_DIR.
    let ca = Arc::new(BuiltinCa::load_or_create(&state, TTL).unwrap());
    let _node = start_proxy(
        ca.clone(),
        &node_yaml(net),
        "default/backend/backend",
        ip(net, 3),
        &[],
    )
    .await;
    let http = backend("backend", SocketAddr::new(ip(net, 3), 8080)).await;
    let key = format!("default/{}", hostname("backend"));
    let mut ads = StaticAds::default();
    ads.resources.insert(
        ADDRESS_TYPE.into(),
        vec![
            resource(
                &uid("client"),
                ADDRESS_TYPE,
                &workload_address("client", "client", ip(net, 2), true, &[]),
            ),
            resource(
                &uid("backend"),
                ADDRESS_TYPE,
                &workload_address("backend", "backend", ip(net, 3), true, &[(&key, 80, 8080)]),
            ),
            resource(
                &key,
                ADDRESS_TYPE,
                &service_address("backend", ip(net, 100), &[(80, 8080)]),
            ),
        ],
    );
    ads.resources.insert(AUTHORIZATION_TYPE.into(), vec![]);
    let wp = waypoint_resource(
        vec![bound_service(
            "backend",
            vec![port(pb::Protocol::Http, "backend", 80, &["backend"])],
        )],
        &[],
    );
    let mut other = wp.clone();
    other.namespace = "elsewhere".into();
    ads.resources.insert(
        WAYPOINT_TYPE.into(),
        vec![
            resource("default/waypoint", WAYPOINT_TYPE, &wp),
            resource("elsewhere/waypoint", WAYPOINT_TYPE, &other),
        ],
    );
    let ads = Arc::new(ads);
    let ads_addr = start_ads(ads.clone(), SocketAddr::new(ip(net, 1), 0)).await;

    let xds = format!("http://{ads_addr}");
    let cfg = Arc::new(waypoint_config(&[
        ("XDS_ADDRESS", &xds),
        ("CA_ADDRESS", ""),
        ("MESHNODE_STATE_DIR", state.to_str().unwrap()),
    ]));
    let listen = |port| {
        meshnode::socket::listen(SocketAddr::new(ip(net, 10), port), Default::default()).unwrap()
    };
    let (hbone, ready, metrics) = (listen(15008), listen(0), listen(0));
    let (ready_addr, metrics_addr) = (ready.local_addr().unwrap(), metrics.local_addr().unwrap());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(meshnode::app::run_waypoint(
        cfg,
        hbone,
        Some(ready),
        Some(metrics),
        shutdown,
    ));
    // Ready once the three types have arrived and the certificate is issued.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http_get(ready_addr, "/healthz/ready").await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = ads.requests.lock().clone();
    let sub = requests
        .iter()
        .find(|r| r.type_url == WAYPOINT_TYPE && r.response_nonce.is_empty())
        .expect("a waypoint subscription");
    assert_eq!(sub.resource_names_subscribe, vec!["default/waypoint"]);
    assert!(
        requests.iter().all(|r| r.error_detail.is_none()),
        "{requests:?}"
    );

    let (c, _) = hbone_client_at(
        ca.issue(
            &id("spiffe://cluster.local/ns/default/sa/client"),
            now_plus(-60),
            now_plus(3600),
        )
        .unwrap(),
        waypoint_id(),
        Some(ip(net, 2)),
        SocketAddr::new(ip(net, 10), 15008),
    )
    .await
    .unwrap();
    let mut h = http1(
        tunnel(&c, &SocketAddr::new(ip(net, 100), 80).to_string())
            .await
            .unwrap(),
    )
    .await;
    let resp = h
        .send_request(get("/over-xds", &hostname("backend")))
        .await
        .unwrap();
    assert_eq!(
        read(resp).await,
        (http::StatusCode::OK, "hello from backend".into())
    );
    assert_eq!(http.seen.lock()[0].path, "/over-xds");
    let scraped = http_get(metrics_addr, "/metrics").await;
    assert!(
        scraped.lines().any(
            |l| l.starts_with(r#"istio_requests_total{reporter="waypoint""#)
                && l.contains(r#"response_code="200""#)
        ),
        "{scraped}"
    );
}

/// `m`'s configuration with the backend's port 80 given `route` and the waypoint-wide `policies`.
fn with_route(
    m: &Mesh,
    route: Option<pb::Route>,
    policies: Vec<pb::AuthorizationPolicy>,
) -> Snapshot {
    let mut wp = backend_waypoint();
    wp.services[0].ports[0].routes.extend(route);
    wp.policies = policies;
    serving_backend(m, &wp)
}

/// A route action sending every request to `cluster`.
fn forward_to(cluster: &str) -> Option<pb::route::Action> {
    Some(pb::route::Action::Forward(pb::Forward {
        backends: vec![pb::WeightedCluster {
            cluster: cluster.into(),
            weight: 1,
        }],
    }))
}

/// A waypoint-wide DENY for POST requests.
fn deny_post() -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        name: "no-post".into(),
        namespace: "default".into(),
        action: pb::Action::Deny as i32,
        rules: vec![pb::Rule {
            to: vec![pb::Operation {
                methods: vec!["POST".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A route named `name` forwarding everything to `backend-80` with a whole-request `timeout`.
fn backend_route(name: &str, timeout: Duration) -> pb::Route {
    pb::Route {
        name: name.into(),
        action: forward_to("backend-80"),
        timeout: prost_types::Duration::try_from(timeout).ok(),
        ..Default::default()
    }
}

/// A waypoint serving only the backend's HTTP port 80 (cluster `backend-80`).
fn backend_waypoint() -> pb::Waypoint {
    waypoint_resource(
        vec![bound_service(
            "backend",
            vec![port(pb::Protocol::Http, "backend", 80, &["backend"])],
        )],
        &[],
    )
}

/// `m`'s configuration with waypoint resource `wp`: the client, the backend and its service.
fn serving_backend(m: &Mesh, wp: &pb::Waypoint) -> Snapshot {
    let key = format!("default/{}", hostname("backend"));
    Snapshot::build(
        &[
            workload("client", "client", ip(m.net, 2), true, &[]),
            workload(
                "backend",
                "backend",
                ip(m.net, 3),
                true,
                &[(&key, 80, 8080)],
            ),
        ],
        &[service("backend", ip(m.net, 100), &[(80, 8080)])],
        Some(wp),
        NETWORK,
        None,
    )
    .unwrap()
}

#[tokio::test]
async fn a_request_l7_policy_denies_gets_403_rbac_access_denied() {
    let m = mesh(&[]).await;
    m.wp.config
        .send_replace(Arc::new(with_route(&m, None, vec![deny_post()])));
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let post = http::Request::post("/")
        .header(http::header::HOST, hostname("backend"))
        .body(http_body_util::Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let (status, body) = read(h.send_request(post).await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (403, "RBAC: access denied")
    );
    assert_eq!(get_ok(&mut h, "/").await.0, 200);
    assert_eq!(m.http.requests(), 1);
}

#[tokio::test]
async fn a_route_timeout_gets_504_upstream_request_timeout() {
    let m = mesh(&[]).await;
    let route = pb::Route {
        retries: Some(pb::RetryPolicy::default()),
        ..backend_route("default/backend-timeout", Duration::from_millis(200))
    };
    m.wp.config
        .send_replace(Arc::new(with_route(&m, Some(route), vec![])));
    m.http
        .delay_ms
        .store(5_000, std::sync::atomic::Ordering::SeqCst);
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let (status, body) = get_ok(&mut h, "/slow").await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (504, "upstream request timeout")
    );
}

/// Resolves once `b` has seen `n` requests.
async fn backend_saw(b: &Backend, n: u64) {
    loop {
        let woken = b.notify.notified();
        if b.requests() >= n {
            return;
        }
        woken.await;
    }
}

#[tokio::test]
async fn a_cluster_at_its_request_limit_answers_503_overflow_until_a_request_ends() {
    let m = mesh(&[]).await;
    let mut wp = backend_waypoint();
    wp.services[0].clusters[0].connection_pool = Some(pb::ConnectionPool {
        http2_max_requests: 1,
        ..Default::default()
    });
    m.wp.config.send_replace(Arc::new(serving_backend(&m, &wp)));
    m.http.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let c = m.client().await;
    let mut first = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let pending = tokio::spawn(async move { get_ok(&mut first, "/held").await });
    backend_saw(&m.http, 1).await;
    // The one request the cluster allows is in flight: the next overflows.
    let mut second = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let (status, body) = tokio::select! {
        r = get_ok(&mut second, "/over") => r,
        () = backend_saw(&m.http, 2) => panic!("a request over the cluster's limit reached the backend"),
    };
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (503, meshnode::waypoint::forward::OVERFLOW)
    );
    m.http.release.add_permits(1);
    assert_eq!(pending.await.unwrap().0, 200);
    // Its body read to the end, the slot is free again.
    m.http
        .hold
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get_ok(&mut second, "/after").await.0, 200);
}

/// The whole chain on loopback, configured only by `meshnode control-plane`'s mesh file: the namespace uses
/// the waypoint; the client's node proxy sends VIP traffic to it; the waypoint applies an
/// AuthorizationPolicy bound to its Gateway and re-originates HBONE to the server's node proxy.
fn e2e_mesh(net: [u8; 2]) -> String {
    format!(
        r#"namespaces:
  default: {{labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}
workloads:
- {{name: client, namespace: default, serviceAccount: client, ips: [{c}], node: node-1}}
- {{name: server, namespace: default, serviceAccount: server, ips: [{s}], node: node-1, labels: {{app: server}}}}
- {{name: waypoint-0, namespace: default, serviceAccount: waypoint, ips: [{w}], node: node-1, labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}}}
services:
- {{name: web, namespace: default, vips: [{vip}], ports: [{{port: 80, targetPort: 8080, name: http}}], selector: {{app: server}}}}
istio:
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {{name: waypoint, namespace: default}}
  spec:
    gatewayClassName: istio-waypoint
    listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {{name: no-post, namespace: default}}
  spec:
    targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
    action: DENY
    rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}]
tokens:
- {{token: client-token, nodeProxy: true, node: node-1, namespace: default, serviceAccount: client}}
- {{token: server-token, nodeProxy: true, node: node-1, namespace: default, serviceAccount: server}}
- {{token: waypoint-token, namespace: default, serviceAccount: waypoint}}
"#,
        c = ip(net, 1),
        s = ip(net, 3),
        w = ip(net, 9),
        vip = ip(net, 20),
    )
}

/// `GET`s (or `POST`s) `path` on a fresh TCP connection to `addr` and returns the raw answer.
async fn http_request(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

async fn until_ready(addr: SocketAddr, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => http_get(addr, "/healthz/ready").await,
            Err(_) => String::new(),
        };
        if answer.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never ready: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_control_planes_waypoint_serves_the_namespaces_http_with_its_policy() {
    use meshnode::control_plane::{self, CaChoice, RunOptions};
    use meshnode::proxy::Listeners;
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), e2e_mesh(net)).unwrap();
    let cp_listener = tokio::net::TcpListener::bind(SocketAddr::new(ip(net, 10), 0))
        .await
        .unwrap();
    let cp = cp_listener.local_addr().unwrap();
    let root = dir.path().join("root-cert.pem");
    let opts = RunOptions {
        config: dir.path().join("mesh.yaml"),
        listen: cp,
        ca: CaChoice::Builtin(dir.path().join("cp-state")),
        tls_files: None,
        root_cert_out: Some(root.clone()),
        drain_deadline: Duration::from_secs(1),
    };
    let (_stop_cp, cp_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = control_plane::run(opts, cp_listener, async {
            let _ = cp_stopped.await;
        })
        .await;
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !root.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "control plane did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let address = format!("https://{cp}");
    let env = |token: &'static str| -> Vec<(String, String)> {
        vec![
            ("XDS_ADDRESS".into(), address.clone()),
            ("CA_ADDRESS".into(), address.clone()),
            ("XDS_ROOT_CA".into(), root.to_str().unwrap().into()),
            ("CA_ROOT_CA".into(), root.to_str().unwrap().into()),
            ("AUTH_TOKEN".into(), token.into()),
        ]
    };
    let listen = |a: SocketAddr| meshnode::socket::listen(a, Default::default()).unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    // The two node proxies (dedicated mode), configured over xDS.
    let mut ready = Vec::new();
    for (workload, token, host, outbound) in [
        (
            "default/client/client",
            "client-token",
            1,
            SocketAddr::new(ip(net, 20), 80),
        ),
        (
            "default/server/server",
            "server-token",
            3,
            SocketAddr::new(ip(net, 3), 0),
        ),
    ] {
        let vars = env(token);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cfg = Arc::new(support::config(workload, &vars));
        let bind = ip(net, host);
        let listeners = Listeners {
            outbound: listen(outbound),
            inbound: listen(SocketAddr::new(bind, 15008)),
            inbound_plaintext: listen(SocketAddr::new(bind, 0)),
        };
        let r = listen(SocketAddr::new(bind, 0));
        ready.push((workload, r.local_addr().unwrap()));
        tokio::spawn(meshnode::app::run_proxy(
            cfg,
            Some(listeners),
            Some(r),
            shutdown.clone(),
        ));
    }
    let http = backend("server", SocketAddr::new(ip(net, 3), 8080)).await;
    // The waypoint, as `meshnode waypoint` starts it.
    let mut vars = env("waypoint-token");
    vars.push(("POD_NAME".into(), "waypoint-0".into()));
    vars.push(("INSTANCE_IP".into(), ip(net, 9).to_string()));
    let mut map: std::collections::HashMap<String, String> = vars.into_iter().collect();
    map.insert("POD_NAMESPACE".into(), "default".into());
    map.insert("SERVICE_ACCOUNT".into(), "waypoint".into());
    let cfg = Arc::new(meshnode::config::WaypointConfig::from_source(&map).unwrap());
    let wp_ready = listen(SocketAddr::new(ip(net, 9), 0));
    let wp_ready_addr = wp_ready.local_addr().unwrap();
    tokio::spawn(meshnode::app::run_waypoint(
        cfg,
        listen(SocketAddr::new(ip(net, 9), 15008)),
        Some(wp_ready),
        None,
        shutdown.clone(),
    ));
    for (what, addr) in &ready {
        until_ready(*addr, what).await;
    }
    until_ready(wp_ready_addr, "the waypoint").await;

    // GET through client proxy → waypoint → server proxy → app.
    let vip = SocketAddr::new(ip(net, 20), 80);
    let answer = http_request(vip, "GET", "/through-the-waypoint").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from server"), "{answer}");
    assert_eq!(http.seen.lock()[0].path, "/through-the-waypoint");
    // The AuthorizationPolicy bound to the waypoint's Gateway denies POST, at the waypoint.
    let answer = http_request(vip, "POST", "/denied").await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.ends_with("RBAC: access denied"), "{answer}");
    assert_eq!(http.requests(), 1);
}

/// DestinationRule `outlierDetection` at work: of the backend service's two endpoints, one answers 503 to
/// everything. After `consecutive5xxErrors` of them it is ejected, and from then on every request goes to
/// the healthy endpoint and is answered 200; the ejected one sees no more requests.
#[tokio::test]
async fn an_endpoint_answering_5xx_is_ejected_and_requests_go_to_the_healthy_one() {
    let m = mesh(&[]).await;
    let key = format!("default/{}", hostname("backend"));
    let mut wp = backend_waypoint();
    let cluster = &mut wp.services[0].clusters[0];
    cluster.endpoints.push(uid("legacy"));
    cluster.outlier_detection = Some(pb::OutlierDetection {
        consecutive_5xx_errors: 2,
        base_ejection_time: Some(prost_types::Duration {
            seconds: 300,
            nanos: 0,
        }),
        max_ejection_percent: 50,
        ..Default::default()
    });
    let snapshot = Snapshot::build(
        &[
            workload("client", "client", ip(m.net, 2), true, &[]),
            workload(
                "backend",
                "backend",
                ip(m.net, 3),
                true,
                &[(&key, 80, 8080)],
            ),
            // The second endpoint: plain TCP, the `legacy` app on .4:8080.
            workload("legacy", "legacy", ip(m.net, 4), false, &[(&key, 80, 8080)]),
        ],
        &[service("backend", ip(m.net, 100), &[(80, 8080)])],
        Some(&wp),
        NETWORK,
        None,
    )
    .unwrap();
    m.wp.config.send_replace(Arc::new(snapshot));
    m.legacy
        .fail_first
        .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    // Until the failing endpoint has answered 503 twice (round robin alternates, so a few requests).
    let mut sent = 0;
    while m.legacy.requests() < 2 {
        sent += 1;
        assert!(sent <= 20, "the failing endpoint was never picked");
        let (status, _) = get_ok(&mut h, "/").await;
        assert!(status == 200 || status == 503, "{status}");
    }
    for i in 0..20 {
        let (status, body) = get_ok(&mut h, &format!("/after-{i}")).await;
        assert_eq!(status, 200, "request {i} after the ejection: {body}");
    }
    assert_eq!(
        m.legacy.requests(),
        2,
        "the ejected endpoint got requests after its ejection"
    );
}

/// HTTP/2 from the client, several streams at once on one connection, each routed and authorized on its
/// own: a GET forwarded (200, as HTTP/2 upstream), a POST the L7 policy denies (403 `RBAC: access denied`),
/// a GET the route redirects (301 with `location`, never upstream). The connection outlives the refusals.
#[tokio::test]
async fn http2_streams_on_one_connection_are_routed_and_authorized_each_on_its_own() {
    let m = mesh(&[]).await;
    let mut wp = waypoint_resource(
        vec![bound_service(
            "backend",
            vec![port(pb::Protocol::Http2, "backend", 81, &["backend"])],
        )],
        &[],
    );
    wp.services[0].ports[0].routes = vec![
        pb::Route {
            name: "default/moved".into(),
            matches: vec![pb::RouteMatch {
                path: Some(pb::StringMatch {
                    kind: Some(pb::string_match::Kind::Prefix("/old".into())),
                }),
                ..Default::default()
            }],
            action: Some(pb::route::Action::Redirect(pb::Redirect {
                path: "/new".into(),
                ..Default::default()
            })),
            ..Default::default()
        },
        pb::Route {
            name: "default/rest".into(),
            action: forward_to("backend-81"),
            ..Default::default()
        },
    ];
    wp.policies = vec![deny_post()];
    let key = format!("default/{}", hostname("backend"));
    let snapshot = Snapshot::build(
        &[
            workload("client", "client", ip(m.net, 2), true, &[]),
            workload(
                "backend",
                "backend",
                ip(m.net, 3),
                true,
                &[(&key, 81, 8081)],
            ),
        ],
        &[service("backend", ip(m.net, 100), &[(81, 8081)])],
        Some(&wp),
        NETWORK,
        None,
    )
    .unwrap();
    m.wp.config.send_replace(Arc::new(snapshot));
    let c = m.client().await;
    let h = http2(tunnel(&c, &m.vip(100, 81)).await.unwrap()).await;
    let request = |method: &str, path: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", hostname("backend")))
            .body(http_body_util::Full::new(Bytes::from_static(b"payload")))
            .unwrap()
    };
    let send = |req: http::Request<http_body_util::Full<Bytes>>| {
        let mut h = h.clone();
        async move {
            let resp = h.send_request(req).await.unwrap();
            let location = resp
                .headers()
                .get(http::header::LOCATION)
                .map(|v| v.to_str().unwrap().to_string());
            let (status, body) = read(resp).await;
            (status.as_u16(), body, location)
        }
    };
    let (get, post, moved) = tokio::join!(
        send(request("GET", "/ok")),
        send(request("POST", "/ok")),
        send(request("GET", "/old/page")),
    );
    assert_eq!((get.0, get.1.as_str()), (200, "hello from backend-h2"));
    assert_eq!((post.0, post.1.as_str()), (403, "RBAC: access denied"));
    assert_eq!(moved.0, 301);
    assert!(
        moved.2.as_deref().is_some_and(|l| l.ends_with("/new")),
        "{moved:?}"
    );
    let again = send(request("GET", "/again")).await;
    assert_eq!(again.0, 200, "the connection survives the refusals");
    let seen = m.http2.seen.lock().clone();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(
        paths.contains(&"/ok") && paths.contains(&"/again"),
        "{paths:?}"
    );
    assert!(seen
        .iter()
        .all(|s| s.method == "GET" && s.version == http::Version::HTTP_2));
}

/// `m`'s backend on HTTP port 80 with DestinationRule `connectionPool` settings `pool` on its cluster,
/// `endpoints` (workload name, address) serving it, and `route` if given.
fn backend_with_pool(
    m: &Mesh,
    pool: pb::ConnectionPool,
    endpoints: &[(&str, u8)],
    route: Option<pb::Route>,
) -> Snapshot {
    let key = format!("default/{}", hostname("backend"));
    let mut wp = backend_waypoint();
    wp.services[0].ports[0].routes.extend(route);
    let cluster = &mut wp.services[0].clusters[0];
    cluster.endpoints = endpoints.iter().map(|(name, _)| uid(name)).collect();
    cluster.connection_pool = Some(pool);
    let mut workloads = vec![workload("client", "client", ip(m.net, 2), true, &[])];
    for (name, host) in endpoints {
        workloads.push(workload(
            name,
            name,
            ip(m.net, *host),
            true,
            &[(&key, 80, 8080)],
        ));
    }
    Snapshot::build(
        &workloads,
        &[service("backend", ip(m.net, 100), &[(80, 8080)])],
        Some(&wp),
        NETWORK,
        None,
    )
    .unwrap()
}

/// `http.maxRequestsPerConnection: 1`: every request to the endpoint gets a connection of its own (by
/// default one keep-alive connection carries them all).
#[tokio::test]
async fn max_requests_per_connection_retires_upstream_connections() {
    let m = mesh(&[]).await;
    let pool = pb::ConnectionPool {
        max_requests_per_connection: 1,
        ..Default::default()
    };
    m.wp.config.send_replace(Arc::new(backend_with_pool(
        &m,
        pool,
        &[("backend", 3)],
        None,
    )));
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    for i in 0..3 {
        assert_eq!(get_ok(&mut h, &format!("/{i}")).await.0, 200);
    }
    assert_eq!(m.http.requests(), 3);
    assert_eq!(m.wp.waypoint.upstream_http_connections(), 3);
}

/// `http.idleTimeout`: an upstream connection idle longer than that is not reused.
#[tokio::test]
async fn an_upstream_connection_idle_past_the_clusters_idle_timeout_is_not_reused() {
    let m = mesh(&[]).await;
    let pool = pb::ConnectionPool {
        idle_timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 100_000_000,
        }),
        ..Default::default()
    };
    m.wp.config.send_replace(Arc::new(backend_with_pool(
        &m,
        pool,
        &[("backend", 3)],
        None,
    )));
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    assert_eq!(get_ok(&mut h, "/first").await.0, 200);
    assert_eq!(get_ok(&mut h, "/soon-after").await.0, 200);
    assert_eq!(
        m.wp.waypoint.upstream_http_connections(),
        1,
        "reused while fresh"
    );
    // Longer than the idle timeout (the waypoint checks the age when it would reuse a connection).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_ok(&mut h, "/later").await.0, 200);
    assert_eq!(m.wp.waypoint.upstream_http_connections(), 2);
}

/// `tcp.connectTimeout` covers the whole connect to an HBONE endpoint: a node proxy that accepts TCP but
/// never answers the TLS handshake fails the try after the connect timeout (503, connection failure), well
/// inside the route's 30 s timeout (which would answer 504).
#[tokio::test]
async fn the_clusters_connect_timeout_covers_an_hbone_endpoint_that_never_handshakes() {
    let m = mesh(&[]).await;
    // .6 accepts on 15008 and then says nothing.
    let silent = tokio::net::TcpListener::bind(SocketAddr::new(ip(m.net, 6), 15008))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let pool = pb::ConnectionPool {
        connect_timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        ..Default::default()
    };
    // A route with a long timeout, so that only the connect timeout can end the request early.
    let route = backend_route("default/backend-slow", Duration::from_secs(30));
    let snapshot = backend_with_pool(&m, pool, &[("silent", 6)], Some(route));
    m.wp.config.send_replace(Arc::new(snapshot));
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let (status, body) = get_ok(&mut h, "/").await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (503, CONNECT_FAILURE),
        "the connect timeout, not the route's"
    );
}

/// The headers the app sees: `x-forwarded-proto: http` and an `x-request-id` added; a client's own
/// `x-forwarded-client-cert` never gets through (it could claim any identity); with the Gateway's
/// `ambient.istio.io/xfcc-include-client-identity`, the waypoint writes who called.
#[tokio::test]
async fn the_app_sees_forwarding_headers_and_only_the_waypoints_own_xfcc() {
    let m = mesh(&[]).await;
    let forged = "By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
    let c = m.client().await;
    let mut sent = 0;
    for opt_in in [false, true] {
        let mut wp = backend_waypoint();
        wp.xfcc_include_client_identity = opt_in;
        m.wp.config.send_replace(Arc::new(serving_backend(&m, &wp)));
        let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
        let req = http::Request::get("/")
            .header(http::header::HOST, hostname("backend"))
            .header("x-forwarded-client-cert", forged)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(read(h.send_request(req).await.unwrap()).await.0, 200);
        sent += 1;
        let seen = m.http.seen.lock()[sent - 1].headers.clone();
        assert_eq!(seen["x-forwarded-proto"], "http");
        assert!(seen.contains_key("x-request-id"));
        let xfcc: Vec<_> = seen.get_all("x-forwarded-client-cert").iter().collect();
        if opt_in {
            assert_eq!(
                xfcc,
                ["By=spiffe://cluster.local/ns/default/sa/waypoint;URI=spiffe://cluster.local/ns/default/sa/client"]
            );
        } else {
            assert!(
                xfcc.is_empty(),
                "a client's own XFCC reached the app: {xfcc:?}"
            );
        }
    }
}

/// A route's timeout covers the whole response, as Envoy's does: an endpoint that sends its headers and
/// then stalls in the middle of its body has the client's stream cut when the timeout passes (the
/// status has already gone out, so the body ends in an error instead of 504), and the waypoint keeps
/// serving.
#[tokio::test]
async fn a_route_timeout_cuts_a_response_body_that_stalls() {
    let m = mesh(&[]).await;
    // .7:8080 (plain TCP): promises 100 bytes, sends 3, then nothing.
    let stall = tokio::net::TcpListener::bind(SocketAddr::new(ip(m.net, 7), 8080))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = stall.accept().await {
            let mut head = [0u8; 4096];
            let _ = s.read(&mut head).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                .await;
            held.push(s);
        }
    });
    let key = format!("default/{}", hostname("backend"));
    let mut wp = backend_waypoint();
    wp.services[0].clusters[0].endpoints = vec![uid("stall")];
    wp.services[0].ports[0].routes.push(backend_route(
        "default/backend-timeout",
        Duration::from_millis(300),
    ));
    let snapshot = Snapshot::build(
        &[
            workload("client", "client", ip(m.net, 2), true, &[]),
            workload("stall", "stall", ip(m.net, 7), false, &[(&key, 80, 8080)]),
        ],
        &[service("backend", ip(m.net, 100), &[(80, 8080)])],
        Some(&wp),
        NETWORK,
        None,
    )
    .unwrap();
    m.wp.config.send_replace(Arc::new(snapshot));
    let c = m.client().await;
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    let resp = h
        .send_request(get("/stalls", &hostname("backend")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the headers arrive before the timeout");
    let body = tokio::time::timeout(
        Duration::from_secs(30),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("the stalled body was never cut");
    assert!(body.is_err(), "a body cut short must not look complete");
    // The waypoint still serves: a new tunnel, the healthy backend.
    m.wp.config
        .send_replace(Arc::new(serving_backend(&m, &backend_waypoint())));
    let mut h = http1(tunnel(&c, &m.vip(100, 80)).await.unwrap()).await;
    assert_eq!(get_ok(&mut h, "/after").await.0, 200);
}

/// A workload on `network` (behind the gateway at `gateway` on it, if any), as a control plane sends it.
fn on_network(
    name: &str,
    sa: &str,
    addr: IpAddr,
    network: &str,
    gateway: Option<IpAddr>,
    services: &[(&str, u32, u32)],
) -> Arc<meshnode::state::Workload> {
    use meshnode::proto::workload as wl;
    let mut a = workload_address(name, sa, addr, true, services);
    if let Some(wl::address::Type::Workload(w)) = &mut a.r#type {
        w.network = network.into();
        w.network_gateway = gateway.map(|g| wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Address(
                wl::NetworkAddress {
                    network: network.into(),
                    address: match g {
                        IpAddr::V4(v) => v.octets().to_vec(),
                        IpAddr::V6(v) => v.octets().to_vec(),
                    },
                    ..Default::default()
                },
            )),
            hbone_mtls_port: 15008,
        });
    }
    match meshnode::xds::convert::address(&uid(name), a).unwrap() {
        meshnode::xds::convert::Address::Workload(w) => w,
        _ => unreachable!(),
    }
}

/// A waypoint on `net1` serving `backend` (VIP .100, HTTP on 80) from `endpoints` among `workloads`: its
/// snapshot (built after `previous`), and the port's cluster.
fn backend_on_net1(
    net: [u8; 2],
    workloads: &[Arc<meshnode::state::Workload>],
    endpoints: &[&str],
    previous: Option<&Snapshot>,
) -> (Snapshot, Arc<meshnode::waypoint::snapshot::Cluster>) {
    let services = vec![service("backend", ip(net, 100), &[(80, 8080)])];
    let wp = waypoint_resource(
        vec![bound_service(
            "backend",
            vec![port(pb::Protocol::Http, "backend", 80, endpoints)],
        )],
        &[],
    );
    let snap = Snapshot::build(workloads, &services, Some(&wp), "net1", previous).unwrap();
    let cluster = snap.cluster("backend-80").unwrap().clone();
    (snap, cluster)
}

#[test]
fn the_waypoint_reaches_an_endpoint_on_another_network_only_through_its_gateway() {
    let net = [10, 77];
    let key = format!("default/{}", hostname("backend"));
    let serves = [(key.as_str(), 80, 8080)];
    let workloads = vec![
        on_network("near", "backend", ip(net, 3), "net1", None, &serves),
        on_network(
            "far",
            "far",
            ip(net, 20),
            "net2",
            Some(ip(net, 30)),
            &serves,
        ),
        on_network(
            "ew-gateway",
            "istio-eastwestgateway",
            ip(net, 30),
            "net2",
            None,
            &[],
        ),
        on_network("lost", "backend", ip(net, 40), "net3", None, &serves),
        // Behind a gateway address that no workload holds.
        on_network(
            "stray",
            "backend",
            ip(net, 50),
            "net4",
            Some(ip(net, 60)),
            &serves,
        ),
    ];
    let (snap, cluster) = backend_on_net1(net, &workloads, &["near", "far", "lost", "stray"], None);
    let like = ip(net, 100);
    let near = snap.endpoint(&cluster, &uid("near"), like).unwrap();
    assert!(near.crossing.is_none(), "same network: dialled directly");
    let far = snap.endpoint(&cluster, &uid("far"), like).unwrap();
    let crossing = far
        .crossing
        .as_ref()
        .expect("another network: through its gateway");
    assert_eq!(crossing.gateway, SocketAddr::new(ip(net, 30), 15008));
    // Worked out once per snapshot: every pick of the endpoint shares that one crossing.
    let again = snap.endpoint(&cluster, &uid("far"), like).unwrap();
    assert!(Arc::ptr_eq(crossing, again.crossing.as_ref().unwrap()));
    assert_eq!(
        *crossing.gateway_ids,
        [id(
            "spiffe://cluster.local/ns/default/sa/istio-eastwestgateway"
        )]
    );
    assert_eq!(
        crossing.authority.to_string(),
        "backend.default.svc.cluster.local:80"
    );
    // The gateway picks among the service's endpoints on its network: only `far` is there.
    assert_eq!(
        crossing.inner_ids,
        [id("spiffe://cluster.local/ns/default/sa/far")]
    );
    let why = |name: &str| {
        cluster
            .crossing(snap.workload(&uid(name)).unwrap())
            .expect("worked out for an endpoint on another network")
            .unwrap_err()
    };
    // No gateway on its network: no endpoint at all, never dialled.
    assert!(snap.endpoint(&cluster, &uid("lost"), like).is_none());
    assert_eq!(
        *why("lost"),
        Unreachable::NoGateway {
            network: "net3".into()
        }
    );
    // A gateway at an address no workload holds: no identity to expect of it, so no endpoint either.
    assert!(snap.endpoint(&cluster, &uid("stray"), like).is_none());
    assert_eq!(
        *why("stray"),
        Unreachable::UnknownGateway {
            gateway: GatewayAddress {
                destination: GatewayDestination::Address {
                    network: "net4".into(),
                    ip: ip(net, 60),
                },
                hbone_mtls_port: 15008,
            }
        }
    );
}

#[test]
fn an_endpoint_whose_network_gateway_is_named_by_hostname_is_refused_by_name() {
    let net = [10, 78];
    let key = format!("default/{}", hostname("backend"));
    let serves = [(key.as_str(), 80, 8080)];
    let by_hostname = GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: "istio-system".into(),
            hostname: "eastwest.istio-system.svc.cluster.local".into(),
        },
        hbone_mtls_port: 15008,
    };
    let mut far = (*on_network("far", "far", ip(net, 20), "net2", None, &serves)).clone();
    far.network_gateway = Some(Box::new(by_hostname.clone()));
    let workloads = vec![
        on_network("near", "backend", ip(net, 3), "net1", None, &serves),
        Arc::new(far),
    ];
    let (snap, cluster) = backend_on_net1(net, &workloads, &["near", "far"], None);
    let like = ip(net, 100);
    // The waypoint does not resolve a gateway hostname: the far endpoint is no endpoint, and why is named.
    assert!(snap.endpoint(&cluster, &uid("far"), like).is_none());
    let why = cluster
        .crossing(snap.workload(&uid("far")).unwrap())
        .expect("worked out for the far endpoint")
        .unwrap_err();
    assert_eq!(
        *why,
        Unreachable::GatewayHostname {
            gateway: by_hostname
        }
    );
    assert!(why.to_string().contains("named by hostname"), "{why}");
    // The endpoint on the waypoint's own network is untouched.
    let near = snap.endpoint(&cluster, &uid("near"), like).unwrap();
    assert!(near.crossing.is_none());
}

/// Log text written on this thread while `f` runs, `DEBUG` and up.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn unreachable_endpoints_on_another_network_are_warned_about_when_new_not_on_every_push() {
    let net = [10, 79];
    let key = format!("default/{}", hostname("backend"));
    let serves = [(key.as_str(), 80, 8080)];
    let mut workloads = vec![
        on_network("near", "backend", ip(net, 3), "net1", None, &serves),
        on_network("lost", "backend", ip(net, 40), "net3", None, &serves),
    ];
    let endpoints = ["near", "lost", "stray"];
    let warnings = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("unreachable"))
            .map(str::to_string)
            .collect()
    };
    let ((first, _), log) = logged(|| backend_on_net1(net, &workloads, &endpoints, None));
    let warned = warnings(&log);
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("network=net3"), "{log}");

    // The next push, nothing changed: said again at debug only.
    let ((second, _), log) = logged(|| backend_on_net1(net, &workloads, &endpoints, Some(&first)));
    assert!(warnings(&log).is_empty(), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("still unreachable")),
        "{log}"
    );

    // Another network becomes unreachable: that one is new, and warned about alone.
    workloads.push(on_network(
        "stray",
        "backend",
        ip(net, 50),
        "net4",
        Some(ip(net, 60)),
        &serves,
    ));
    let (_, log) = logged(|| backend_on_net1(net, &workloads, &endpoints, Some(&second)));
    let warned = warnings(&log);
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("network=net4"), "{log}");
}
