//! End to end over loopback, in one process: a client proxy and a server proxy, each acting for one
//! workload, carrying TCP through HBONE the way two ztunnels do; and the server side refusing bad input.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshnode::identity::{BuiltinCa, CertSource, Identity};
use support::*;

const TTL: Duration = Duration::from_secs(3600);

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// client (HBONE) at .2, server (HBONE) at .3 behind service VIP .100:80 → 8080, a plain-TCP workload at .4,
/// a service with only an unhealthy endpoint at .101.
fn mesh_yaml(net: [u8; 2], server_policies: &str) -> String {
    let ip = |h| ip(net, h);
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{c}"]
  protocol: HBONE
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["{s}"]
  protocol: HBONE
  services:
    "default/server.default.svc.cluster.local": {{80: 8080}}
- uid: cluster1//v1/Pod/default/legacy
  name: legacy
  namespace: default
  workloadIps: ["{t}"]
  protocol: TCP
- uid: cluster1//v1/Pod/default/sick
  name: sick
  namespace: default
  workloadIps: ["{u}"]
  protocol: HBONE
  status: Unhealthy
  services:
    "default/sick.default.svc.cluster.local": {{80: 8080}}
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/{vip}"]
  ports: {{80: 8080}}
- name: sick
  namespace: default
  hostname: sick.default.svc.cluster.local
  vips: ["/{vip2}"]
  ports: {{80: 8080}}
policies: {server_policies}
"#,
        c = ip(2),
        s = ip(3),
        t = ip(4),
        u = ip(5),
        vip = ip(100),
        vip2 = ip(101),
    )
}

struct Mesh {
    net: [u8; 2],
    ca: Arc<BuiltinCa>,
    client: TestProxy,
    server: TestProxy,
}

async fn mesh(extra: &[(&str, &str)]) -> Mesh {
    mesh_with(extra, "[]").await
}

async fn mesh_with(extra: &[(&str, &str)], policies: &str) -> Mesh {
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let yaml = mesh_yaml(net, policies);
    let (client, server) = pair(net, ca.clone(), &yaml, "default/server/server", extra).await;
    Mesh {
        net,
        ca,
        client,
        server,
    }
}

/// The client proxy at `.2` and a server proxy acting for `server_workload` at `.3` (with its echo app on
/// :8080), both on `yaml`, both with certificates from `ca`.
async fn pair(
    net: [u8; 2],
    ca: Arc<dyn CertSource>,
    yaml: &str,
    server_workload: &str,
    extra: &[(&str, &str)],
) -> (TestProxy, TestProxy) {
    let client = start_proxy(ca.clone(), yaml, "default/client/client", ip(net, 2), extra).await;
    let server = start_proxy(ca, yaml, server_workload, ip(net, 3), extra).await;
    echo_server(SocketAddr::new(ip(net, 3), 8080)).await;
    (client, server)
}

impl Mesh {
    fn vip(&self) -> SocketAddr {
        SocketAddr::new(ip(self.net, 100), 80)
    }

    async fn via_client(&self, dst: SocketAddr) -> SocketAddr {
        capture(&self.client.proxy, ip(self.net, 2), dst).await
    }
}

#[tokio::test]
async fn request_to_a_service_vip_crosses_both_proxies_over_hbone() {
    let m = mesh(&[]).await;
    let entry = m.via_client(m.vip()).await;
    let answer = roundtrip(entry, b"hello through the mesh").await.unwrap();
    // The application got the bytes and the half-close, through one pooled HBONE connection.
    assert!(answer.starts_with("peer="), "{answer}");
    assert!(answer.ends_with("hello through the mesh"), "{answer}");
    assert_eq!(m.client.proxy.pool().connections(), 1);
}

#[tokio::test]
async fn request_to_a_workload_address_uses_hbone() {
    let m = mesh(&[]).await;
    let entry = m.via_client(SocketAddr::new(ip(m.net, 3), 8080)).await;
    let answer = roundtrip(entry, b"direct").await.unwrap();
    assert!(answer.ends_with("direct"), "{answer}");
    assert_eq!(m.client.proxy.pool().connections(), 1);
}

#[tokio::test]
async fn large_transfer_arrives_intact_in_both_directions() {
    let m = mesh(&[]).await;
    let entry = m.via_client(m.vip()).await;
    let payload: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut s = tokio::net::TcpStream::connect(entry).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        tokio::io::AsyncWriteExt::write_all(&mut w, &payload)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut w).await.unwrap();
    };
    let mut got = Vec::new();
    let recv = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got);
    let (_, n) = tokio::join!(send, recv);
    n.unwrap();
    let header_end = got.iter().position(|b| *b == b'\n').unwrap() + 1;
    assert_eq!(got.len() - header_end, payload.len());
    assert!(got[header_end..] == payload[..], "payload corrupted");
}

#[tokio::test]
async fn concurrent_connections_share_pooled_connections_up_to_the_stream_limit() {
    let m = mesh(&[("POOL_MAX_STREAMS_PER_CONNECTION", "2")]).await;
    let entry = m.via_client(m.vip()).await;
    // Six connections held open at once need three HBONE connections of two streams each.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = tokio::net::TcpStream::connect(entry).await.unwrap();
        let mut line = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut line)
            .await
            .unwrap();
        assert_eq!(&line, b"peer=");
        held.push(s);
    }
    assert_eq!(m.client.proxy.pool().connections(), 3);
    drop(held);
    // Later connections reuse them instead of dialling.
    for _ in 0..5 {
        roundtrip(entry, b"x").await.unwrap();
    }
    assert_eq!(m.client.proxy.pool().connections(), 3);
}

#[tokio::test]
async fn idle_pooled_connections_are_released() {
    let m = mesh(&[("POOL_UNUSED_RELEASE_TIMEOUT", "300ms")]).await;
    let entry = m.via_client(m.vip()).await;
    roundtrip(entry, b"x").await.unwrap();
    assert_eq!(m.client.proxy.pool().connections(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(m.client.proxy.pool().connections(), 0);
    // And a new request simply dials again.
    assert!(roundtrip(entry, b"again").await.unwrap().ends_with("again"));
}

#[tokio::test]
async fn tcp_workloads_and_unknown_destinations_are_reached_without_hbone() {
    let m = mesh(&[]).await;
    let legacy = echo_server(SocketAddr::new(ip(m.net, 4), 9000)).await;
    let outside = echo_server(SocketAddr::new(ip(m.net, 50), 9000)).await;
    for dst in [legacy, outside] {
        let entry = m.via_client(dst).await;
        let answer = roundtrip(entry, b"plain").await.unwrap();
        assert!(answer.ends_with("plain"), "{answer}");
    }
    assert_eq!(
        m.client.proxy.pool().connections(),
        0,
        "plain TCP must not open HBONE connections"
    );
}

#[tokio::test]
async fn service_without_a_healthy_endpoint_is_refused() {
    let m = mesh(&[]).await;
    let entry = m.via_client(SocketAddr::new(ip(m.net, 101), 80)).await;
    let answer = roundtrip(entry, b"anyone?").await;
    assert!(matches!(answer.as_deref(), Ok("") | Err(_)), "{answer:?}");
}

#[tokio::test]
async fn server_presenting_an_unexpected_identity_is_refused_by_the_client() {
    // The server proxy runs as "impostor" but the client expects "server" at that address.
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let mut yaml = mesh_yaml(net, "[]");
    yaml = yaml.replace(
        "workloads:\n",
        &format!(
            "workloads:\n- uid: x/impostor\n  name: impostor\n  namespace: default\n  serviceAccount: impostor\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n",
            ip(net, 60)
        ),
    );
    let (client, _server) = pair(net, ca, &yaml, "default/impostor/impostor", &[]).await;
    let entry = capture(&client.proxy, ip(net, 2), SocketAddr::new(ip(net, 100), 80)).await;
    let answer = roundtrip(entry, b"secret").await;
    assert!(
        matches!(answer.as_deref(), Ok("") | Err(_)),
        "data reached an impostor: {answer:?}"
    );
}

// ---- the HBONE server facing bad input ----

fn now_plus(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::now() + Duration::from_secs(secs as u64)
    } else {
        SystemTime::now() - Duration::from_secs((-secs) as u64)
    }
}

impl Mesh {
    fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(ip(self.net, 3), 15008)
    }

    fn client_cert(&self) -> meshnode::identity::WorkloadCert {
        self.ca
            .issue(
                &id("spiffe://cluster.local/ns/default/sa/client"),
                now_plus(-60),
                now_plus(3600),
            )
            .unwrap()
    }

    /// A good request still works: the server keeps serving after whatever came before.
    async fn still_serves(&self) {
        let mut c = hbone_client(
            self.client_cert(),
            id("spiffe://cluster.local/ns/default/sa/server"),
            self.server_addr(),
        )
        .await
        .unwrap();
        let status = status_of(&mut c, connect(&format!("{}:8080", ip(self.net, 3))))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn connect_requests_get_ztunnel_status_codes() {
    let m = mesh(&[]).await;
    let server_id = id("spiffe://cluster.local/ns/default/sa/server");
    let mut c = hbone_client(m.client_cert(), server_id, m.server_addr())
        .await
        .unwrap();
    let s = ip(m.net, 3);
    let cases = [
        (connect(&format!("{s}:8080")), 200),
        // The authority names another workload than the one this connection reached.
        (connect(&format!("{}:8080", ip(m.net, 2))), 400),
        // The authority is one of the proxy's own ports.
        (connect(&format!("{s}:15008")), 503),
        (connect(&format!("{s}:15001")), 503),
        // Nothing listens there.
        (connect(&format!("{s}:8081")), 503),
        // A hostname authority of a service this workload backs is mapped to its target port.
        (connect("server.default.svc.cluster.local:80"), 200),
        (connect("unknown.example:80"), 400),
    ];
    for (req, want) in cases {
        let uri = req.uri().to_string();
        assert_eq!(status_of(&mut c, req).await.unwrap(), want, "CONNECT {uri}");
    }
    // Not CONNECT.
    let get = http::Request::builder()
        .method("GET")
        .uri(format!("https://{s}:8080/"))
        .version(http::Version::HTTP_2)
        .body(())
        .unwrap();
    assert_eq!(status_of(&mut c, get).await.unwrap(), 400);
    m.still_serves().await;
}

#[tokio::test]
async fn denied_by_policy_gets_401() {
    let policy = r#"
- name: only-ops
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{principals: [!Exact "cluster.local/ns/ops/sa/admin"]}]]]"#;
    let m = mesh_with(&[], policy).await;
    let mut c = hbone_client(
        m.client_cert(),
        id("spiffe://cluster.local/ns/default/sa/server"),
        m.server_addr(),
    )
    .await
    .unwrap();
    assert_eq!(
        status_of(&mut c, connect(&format!("{}:8080", ip(m.net, 3))))
            .await
            .unwrap(),
        401
    );
    // Through the proxies the connection is refused too.
    let entry = m.via_client(m.vip()).await;
    let answer = roundtrip(entry, b"let me in").await;
    assert!(matches!(answer.as_deref(), Ok("") | Err(_)), "{answer:?}");
    // Lifting the policy takes effect for new connections.
    m.server.set_config(&mesh_yaml(m.net, "[]"));
    assert!(roundtrip(entry, b"now?").await.unwrap().ends_with("now?"));
}

#[tokio::test]
async fn garbage_and_plain_http_on_15008_are_dropped_and_the_proxy_keeps_serving() {
    let m = mesh(&[]).await;
    for junk in [
        &b"\x00\x01\x02\x03 this is not TLS \xff\xfe"[..],
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(m.server_addr())
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, junk)
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(
            Duration::from_secs(12),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
        )
        .await;
        assert!(r.is_ok(), "server kept a junk connection open");
        // Whatever came back is at most a TLS alert, never application data.
        assert!(buf.is_empty() || buf[0] == 0x15, "unexpected reply {buf:?}");
    }
    m.still_serves().await;
}

/// Connects with a client certificate and returns the TLS error the server sent, if any.
async fn tls_refusal(
    m: &Mesh,
    cert: meshnode::identity::WorkloadCert,
) -> Option<rustls::AlertDescription> {
    match hbone_client(
        cert,
        id("spiffe://cluster.local/ns/default/sa/server"),
        m.server_addr(),
    )
    .await
    {
        Err(e) => alert_in(&e),
        Ok(mut c) => match status_of(&mut c, connect(&format!("{}:8080", ip(m.net, 3)))).await {
            Ok(s) => panic!("request accepted with status {s}"),
            Err(e) => alert_in(&e),
        },
    }
}

fn alert_in(e: &str) -> Option<rustls::AlertDescription> {
    eprintln!("TLS refusal seen by the client: {e}");
    use rustls::AlertDescription::*;
    [
        UnknownCA,
        AccessDenied,
        CertificateExpired,
        BadCertificate,
        DecryptError,
    ]
    .into_iter()
    .find(|a| e.contains(&format!("{a:?}")))
}

#[tokio::test]
async fn client_certificates_from_another_ca_trust_domain_or_expired_are_refused() {
    let m = mesh(&[]).await;
    let good = m.client_cert();

    // Another CA (we still trust the server's root so the refusal is the server's).
    let other = BuiltinCa::ephemeral(TTL).unwrap();
    let mut foreign = other
        .issue(
            &id("spiffe://cluster.local/ns/default/sa/client"),
            now_plus(-60),
            now_plus(3600),
        )
        .unwrap();
    foreign.roots = good.roots.clone();
    // Both roots carry the same name, so the chain is built to our root and its signature fails to verify:
    // the server answers decrypt_error (unknown_ca when the names differ). Either way: refused.
    let alert = tls_refusal(&m, foreign).await;
    assert!(
        matches!(
            alert,
            Some(rustls::AlertDescription::UnknownCA | rustls::AlertDescription::DecryptError)
        ),
        "{alert:?}"
    );

    // Same CA, another trust domain.
    let alien =
        m.ca.issue(
            &id("spiffe://evil.example/ns/default/sa/client"),
            now_plus(-60),
            now_plus(3600),
        )
        .unwrap();
    assert_eq!(
        tls_refusal(&m, alien).await,
        Some(rustls::AlertDescription::AccessDenied)
    );

    // Expired.
    let expired =
        m.ca.issue(
            &id("spiffe://cluster.local/ns/default/sa/client"),
            now_plus(-7200),
            now_plus(-3600),
        )
        .unwrap();
    assert_eq!(
        tls_refusal(&m, expired).await,
        Some(rustls::AlertDescription::CertificateExpired)
    );

    m.still_serves().await;
}

#[tokio::test]
async fn certificate_rotation_keeps_live_connections_working() {
    let net = loopback_net();
    // Certificates live 4 s, so they rotate after 2 s.
    let ca = Arc::new(BuiltinCa::ephemeral(Duration::from_secs(4)).unwrap());
    let yaml = mesh_yaml(net, "[]");
    let (client, _server) = pair(net, ca, &yaml, "default/server/server", &[]).await;
    let entry = capture(&client.proxy, ip(net, 2), SocketAddr::new(ip(net, 100), 80)).await;

    let mut live = tokio::net::TcpStream::connect(entry).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut live, &mut buf)
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"peer="));
    let client_id = id("spiffe://cluster.local/ns/default/sa/client");
    let first = client
        .proxy
        .tls_for(&client_id)
        .await
        .unwrap()
        .current()
        .cert
        .not_after;

    // Past the first certificate's expiry: rotated, and the old connection still carries bytes.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    echo_once(&mut live, b"still here").await;
    let now = client
        .proxy
        .tls_for(&client_id)
        .await
        .unwrap()
        .current()
        .cert
        .not_after;
    assert!(now > first, "certificate was not rotated");
    // And new connections keep working.
    assert!(roundtrip(entry, b"fresh").await.unwrap().ends_with("fresh"));
}

#[tokio::test]
async fn plugin_cas_from_istio_cacerts_directories_carry_traffic() {
    // An RSA root signing directly, and an ECDSA intermediate under an RSA root (with cert-chain.pem).
    for dir in ["rsa-root", "ecdsa-intermediate"] {
        let net = loopback_net();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/identity/testdata")
            .join(dir);
        let ca: Arc<dyn CertSource> =
            Arc::new(meshnode::identity::PluginCa::load(&path, TTL).unwrap());
        let yaml = mesh_yaml(net, "[]");
        let (client, _server) = pair(net, ca, &yaml, "default/server/server", &[]).await;
        let entry = capture(&client.proxy, ip(net, 2), SocketAddr::new(ip(net, 100), 80)).await;
        let answer = roundtrip(entry, b"signed by a plug-in CA").await.unwrap();
        assert!(
            answer.ends_with("signed by a plug-in CA"),
            "{dir}: {answer}"
        );
    }
}

#[tokio::test]
async fn shutdown_lets_open_connections_finish_until_the_deadline_then_closes_them() {
    let m = mesh(&[("CONNECTION_TERMINATION_DEADLINE", "1500ms")]).await;
    let entry = m.via_client(m.vip()).await;
    let mut held = tokio::net::TcpStream::connect(entry).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut held, &mut buf)
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"peer="));

    m.server.shutdown();
    m.client.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Draining: the open connection still carries bytes...
    echo_once(&mut held, b"during drain").await;
    // ...but the proxies accept nothing new.
    let refused = tokio::net::TcpStream::connect(m.server_addr()).await;
    assert!(
        refused.is_err(),
        "server proxy still accepting during drain"
    );

    // Past the deadline the held connection is closed.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut held, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection outlived the termination deadline"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while !m.client.task.is_finished() || !m.server.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("proxies finished draining");
}
