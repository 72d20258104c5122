//! Outbound metrics over loopback, in one process: the client's proxy counts each connection it carries
//! (HBONE, plain TCP, passthrough) with `reporter="source"` and ztunnel's labels, and flags the ones whose
//! upstream could not be reached with `CONNECT`. No root needed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode::proxy::Proxy;
use support::labelled::{labelled_mesh, sample};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for a connection to end or for the metrics to settle.
const WAIT: Duration = Duration::from_secs(5);

struct Mesh {
    net: [u8; 2],
    client: TestProxy,
    _server: TestProxy,
}

/// The labelled mesh (`support::labelled`): client .2, server .3 behind VIP .100:80, plain-TCP legacy .4
/// with nothing listening; anything else (.50) is outside the mesh.
async fn mesh() -> Mesh {
    let m = labelled_mesh("[]").await;
    Mesh {
        net: m.net,
        client: m.client,
        _server: m.server,
    }
}

impl Mesh {
    fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(ip(self.net, host), port)
    }

    /// A connection from the client workload (.2) that its proxy carries to `dst`.
    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        let entry = capture(&self.client.proxy, ip(self.net, 2), dst).await;
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(ip(self.net, 2), 0)).unwrap();
        sock.connect(entry).await.unwrap()
    }

    /// Sends `msg` to the echo app behind `dst`, half-closes, and returns how many bytes came back
    /// (greeting + echo).
    async fn echo_call(&self, dst: SocketAddr, msg: &[u8]) -> u64 {
        let mut s = self.connect(dst).await;
        s.write_all(msg).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&back);
        assert!(text.starts_with("peer=") && back.ends_with(msg), "{text:?}");
        back.len() as u64
    }

    /// A connection to `dst` whose upstream cannot be established: the client sees it closed with no data.
    async fn refused_call(&self, dst: SocketAddr) {
        let mut s = self.connect(dst).await;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}

/// The client proxy's metrics once `ready` holds for them (connections are closed by their own tasks).
async fn settled(proxy: &Arc<Proxy>, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = proxy.metrics().encode();
        if ready(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "metrics never settled:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const CLIENT_SOURCE: [&str; 8] = [
    r#"reporter="source""#,
    r#"source_workload="client""#,
    r#"source_canonical_service="client""#,
    r#"source_canonical_revision="v1""#,
    r#"source_workload_namespace="default""#,
    r#"source_app="client""#,
    r#"source_version="v1""#,
    r#"source_cluster="cluster1""#,
];

fn with(base: &[&'static str], more: &[&'static str]) -> Vec<&'static str> {
    base.iter().chain(more).copied().collect()
}

#[tokio::test]
async fn a_good_hbone_call_is_counted_by_the_source_with_mtls_labels_and_bytes() {
    let m = mesh().await;
    let back = m.echo_call(m.addr(100, 80), b"hello").await;

    let closed = |t: &str| sample(t, "istio_tcp_connections_closed_total", &[]).is_some();
    let text = settled(&m.client.proxy, closed).await;
    let labels = with(
        &CLIENT_SOURCE,
        &[
            r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#,
            r#"destination_service="server.default.svc.cluster.local""#,
            r#"destination_service_namespace="default""#,
            r#"destination_service_name="server""#,
            r#"destination_workload="server""#,
            r#"destination_canonical_service="server""#,
            r#"destination_workload_namespace="default""#,
            r#"destination_principal="spiffe://cluster.local/ns/default/sa/server""#,
            r#"destination_version="v2""#,
            r#"request_protocol="tcp""#,
            r#"response_flags="-""#,
            r#"connection_security_policy="mutual_tls""#,
        ],
    );
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
    ] {
        assert_eq!(sample(&text, name, &labels), Some(1), "{name}\n{text}");
    }
    assert_eq!(
        sample(&text, "istio_tcp_connections_failed_total", &[]),
        None,
        "{text}"
    );
    // Received: from the initiator (the 5 bytes sent); sent: towards it (greeting + echo).
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &labels),
        Some(5),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &labels),
        Some(back),
        "{text}"
    );
    // Only the client's proxy reports `source`; nothing is left open.
    assert!(!text.contains(r#"reporter="destination""#), "{text}");
    assert_eq!(
        sample(&text, "istio_tcp_sockets_open", &[r#"reporter="source""#]),
        Some(0),
        "{text}"
    );
}

#[tokio::test]
async fn an_upstream_that_cannot_be_reached_counts_as_failed_with_connect() {
    let m = mesh().await;
    // Plain TCP to a mesh workload with nothing listening: the connect is refused.
    m.refused_call(m.addr(4, 7070)).await;
    // HBONE to the server on a port with no app: the peer answers 503, the tunnel is not established.
    m.refused_call(m.addr(3, 7070)).await;

    let failed = |t: &str| {
        sample(
            t,
            "istio_tcp_connections_failed_total",
            &[r#"connection_security_policy="unknown""#],
        )
        .is_some()
            && sample(
                t,
                "istio_tcp_connections_failed_total",
                &[r#"connection_security_policy="mutual_tls""#],
            )
            .is_some()
    };
    let text = settled(&m.client.proxy, failed).await;
    let plain = with(
        &CLIENT_SOURCE,
        &[
            r#"source_principal="unknown""#,
            r#"destination_service="unknown""#,
            r#"destination_workload="legacy""#,
            r#"destination_workload_namespace="legacy""#,
            r#"response_flags="CONNECT""#,
            r#"connection_security_policy="unknown""#,
        ],
    );
    let hbone = with(
        &CLIENT_SOURCE,
        &[
            r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#,
            r#"destination_workload="server""#,
            r#"response_flags="CONNECT""#,
            r#"connection_security_policy="mutual_tls""#,
        ],
    );
    for labels in [&plain, &hbone] {
        for name in [
            "istio_tcp_connections_closed_total",
            "istio_tcp_connections_failed_total",
        ] {
            assert_eq!(sample(&text, name, labels), Some(1), "{name}\n{text}");
        }
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total", labels),
            None,
            "{text}"
        );
    }
    // Opened with flag `-`: the flag is only known at close.
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_opened_total",
            &[r#"response_flags="-""#, r#"destination_workload="legacy""#]
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sockets_open", &[r#"reporter="source""#]),
        Some(0),
        "{text}"
    );
}

#[tokio::test]
async fn passthrough_is_counted_with_an_unknown_destination_and_no_mtls() {
    let m = mesh().await;
    let outside = echo_server(m.addr(50, 0)).await;
    let back = m.echo_call(outside, b"out").await;
    // Passthrough that cannot connect: CONNECT, same labels otherwise.
    m.refused_call(m.addr(51, 7070)).await;

    let done = |t: &str| {
        sample(
            t,
            "istio_tcp_connections_closed_total",
            &[r#"response_flags="-""#],
        )
        .is_some()
            && sample(t, "istio_tcp_connections_failed_total", &[]).is_some()
    };
    let text = settled(&m.client.proxy, done).await;
    let unknown_dst = with(
        &CLIENT_SOURCE,
        &[
            r#"source_principal="unknown""#,
            r#"destination_service="unknown""#,
            r#"destination_service_namespace="unknown""#,
            r#"destination_service_name="unknown""#,
            r#"destination_workload="unknown""#,
            r#"destination_canonical_service="unknown""#,
            r#"destination_workload_namespace="unknown""#,
            r#"destination_principal="unknown""#,
            r#"destination_app="unknown""#,
            r#"destination_cluster="unknown""#,
            r#"connection_security_policy="unknown""#,
        ],
    );
    let ok = with(&unknown_dst, &[r#"response_flags="-""#]);
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &unknown_dst),
        Some(2),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &ok),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &ok),
        Some(3),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &ok),
        Some(back),
        "{text}"
    );
    let failed = with(&unknown_dst, &[r#"response_flags="CONNECT""#]);
    assert_eq!(
        sample(&text, "istio_tcp_connections_failed_total", &failed),
        Some(1),
        "{text}"
    );
}

/// Bytes are counted as they move, as ztunnel counts them: a connection still open shows what it carried
/// on both proxies (a dashboard sees a long-lived connection's traffic before it ends), and its close adds
/// nothing twice.
#[tokio::test]
async fn bytes_of_an_open_connection_are_counted_before_it_closes_on_both_proxies() {
    let m = labelled_mesh("[]").await;
    let entry = capture(
        &m.client.proxy,
        ip(m.net, 2),
        SocketAddr::new(ip(m.net, 100), 80),
    )
    .await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(ip(m.net, 2), 0)).unwrap();
    let mut s = sock.connect(entry).await.unwrap();
    let msg = vec![7u8; 100_000];
    s.write_all(&msg).await.unwrap();
    // The echo app greets, then echoes: read until all of it is back, keeping the connection open.
    let mut back = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !back.ends_with(&msg[..]) {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the echo ended early");
        back.extend_from_slice(&buf[..n]);
    }
    let back = back.len() as u64;
    let received = |p: &Arc<Proxy>, reporter: &'static str| {
        sample(
            &p.metrics().encode(),
            "istio_tcp_received_bytes_total",
            &[reporter],
        )
    };
    let sent = |p: &Arc<Proxy>, reporter: &'static str| {
        sample(
            &p.metrics().encode(),
            "istio_tcp_sent_bytes_total",
            &[reporter],
        )
    };
    let src = r#"reporter="source""#;
    let dst = r#"reporter="destination""#;
    settled(&m.client.proxy, |t| {
        sample(t, "istio_tcp_sent_bytes_total", &[src]) == Some(back)
    })
    .await;
    settled(&m.server.proxy, |t| {
        sample(t, "istio_tcp_sent_bytes_total", &[dst]) == Some(back)
    })
    .await;
    assert_eq!(received(&m.client.proxy, src), Some(100_000));
    assert_eq!(received(&m.server.proxy, dst), Some(100_000));
    assert!(
        sample(
            &m.client.proxy.metrics().encode(),
            "istio_tcp_connections_closed_total",
            &[]
        )
        .is_none(),
        "the connection is still open"
    );
    // Closed: the totals stay what was counted.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    drop(s);
    settled(&m.client.proxy, |t| {
        sample(t, "istio_tcp_connections_closed_total", &[]).is_some()
    })
    .await;
    settled(&m.server.proxy, |t| {
        sample(t, "istio_tcp_connections_closed_total", &[]).is_some()
    })
    .await;
    assert_eq!(received(&m.client.proxy, src), Some(100_000));
    assert_eq!(sent(&m.client.proxy, src), Some(back));
    assert_eq!(received(&m.server.proxy, dst), Some(100_000));
    assert_eq!(sent(&m.server.proxy, dst), Some(back));
}

/// A peer proxy that accepts TCP on 15008 and hangs up instead of completing the TLS handshake: the
/// connection fails with ztunnel's `TLS_FAILURE` flag, not a generic `CONNECT`.
#[tokio::test]
async fn a_peer_that_breaks_the_tls_handshake_is_counted_as_tls_failure() {
    use meshnode::identity::BuiltinCa;
    use support::labelled::labelled_mesh_yaml;
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap());
    // .6 is an HBONE workload whose "proxy" closes every connection at once.
    let yaml = labelled_mesh_yaml(net, "[]").replace(
        "\nservices:\n",
        &format!(
            "\n- uid: cluster1//v1/Pod/default/broken\n  name: broken\n  namespace: default\n  serviceAccount: broken\n  workloadIps: [\"{}\"]\n  protocol: HBONE\nservices:\n",
            ip(net, 6)
        ),
    );
    let broken = tokio::net::TcpListener::bind(SocketAddr::new(ip(net, 6), 15008))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = broken.accept().await {
            drop(s);
        }
    });
    let client = start_proxy(ca, &yaml, "default/client-7d4f/client", ip(net, 2), &[]).await;
    let entry = capture(&client.proxy, ip(net, 2), SocketAddr::new(ip(net, 6), 8080)).await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(ip(net, 2), 0)).unwrap();
    let mut s = sock.connect(entry).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let failed = |t: &str| {
        sample(
            t,
            "istio_tcp_connections_failed_total",
            &[r#"reporter="source""#],
        )
        .is_some()
    };
    let text = settled(&client.proxy, failed).await;
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_failed_total",
            &[r#"response_flags="TLS_FAILURE""#]
        ),
        Some(1),
        "{text}"
    );
}
