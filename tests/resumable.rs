//! Resumable streams end to end (`MESHNODE_RESUMABLE_STREAMS`), in one process over loopback: a client
//! proxy and a server proxy whose HBONE connections pass through a relay the test can cut, as a
//! middlebox reset, a dead path or a peer's connection drop would. With both proxies resumable, an
//! application connection carries on across cuts with every byte once, in order; with a server that does
//! not take the offer (as ztunnel would not), a cut ends the connection as it does today.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshnode::identity::{BuiltinCa, Identity};
use parking_lot::Mutex;
use support::access_lines::AccessLines;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const TTL: Duration = Duration::from_secs(3600);
/// The HBONE port the client proxy dials: the relay's, in front of the server proxy's 15008.
const RELAY_PORT: u16 = 25008;

fn mesh_yaml(net: [u8; 2]) -> String {
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
"#,
        c = ip(net, 2),
        s = ip(net, 3),
    )
}

/// A TCP relay whose connections can all be cut at once.
struct Relay {
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    listening: AbortHandle,
}

impl Relay {
    async fn start(listen: SocketAddr, to: SocketAddr) -> Relay {
        let l = TcpListener::bind(listen).await.unwrap();
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, a) = (conns.clone(), accepted.clone());
        let listening = tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().push(task.abort_handle());
            }
        })
        .abort_handle();
        Relay {
            conns,
            accepted,
            listening,
        }
    }

    /// Cuts every relayed connection and stops listening: the path is gone for good.
    fn close(&self) {
        self.listening.abort();
        self.cut();
    }

    /// Drops every relayed connection (both proxies see their HBONE connection end).
    fn cut(&self) {
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

struct Mesh {
    net: [u8; 2],
    ca: Arc<BuiltinCa>,
    client: TestProxy,
    _server: TestProxy,
    relay: Relay,
}

async fn mesh(server_resumable: bool) -> Mesh {
    mesh_waiting(server_resumable, "10s").await
}

/// [`mesh`] with `MESHNODE_RESUME_WAIT` = `wait` on both proxies.
async fn mesh_waiting(server_resumable: bool, wait: &str) -> Mesh {
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let yaml = mesh_yaml(net);
    let on = [
        ("MESHNODE_RESUMABLE_STREAMS", "true"),
        ("MESHNODE_RESUME_WAIT", wait),
    ];
    let mut cfg = config("default/client/client", &on);
    cfg.ports.inbound = RELAY_PORT;
    let workload = cfg.workload_info.clone().unwrap();
    let client = start_proxy_with(Arc::new(cfg), ca.clone(), &yaml, workload, ip(net, 2)).await;
    let server_env: &[(&str, &str)] = if server_resumable { &on } else { &[] };
    let server = start_proxy(
        ca.clone(),
        &yaml,
        "default/server/server",
        ip(net, 3),
        server_env,
    )
    .await;
    echo_server(SocketAddr::new(ip(net, 3), 8080)).await;
    let relay = Relay::start(
        SocketAddr::new(ip(net, 3), RELAY_PORT),
        SocketAddr::new(ip(net, 3), 15008),
    )
    .await;
    Mesh {
        net,
        ca,
        client,
        _server: server,
        relay,
    }
}

impl Mesh {
    /// An application connection to the server's echo app through the client proxy, its greeting read.
    async fn echo_connection(&self) -> TcpStream {
        let entry = capture(
            &self.client.proxy,
            ip(self.net, 2),
            SocketAddr::new(ip(self.net, 3), 8080),
        )
        .await;
        let mut s = TcpStream::connect(entry).await.unwrap();
        // The echo app's first line names the peer.
        let mut b = [0u8; 1];
        loop {
            s.read_exact(&mut b).await.unwrap();
            if b[0] == b'\n' {
                break;
            }
        }
        s
    }
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn an_application_connection_outlives_cuts_of_the_hbone_connection_under_it() {
    let (lines, _guard) = AccessLines::capture();
    let m = mesh(true).await;
    let s = m.echo_connection().await;
    let (mut r, mut w) = s.into_split();
    let data = pattern(6 * 1024 * 1024);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(64 * 1024) {
            w.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        w.shutdown().await.unwrap();
    });
    // Read it back, cutting the HBONE connection three times on the way.
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 * 1024];
    let mut cuts = 0;
    let read = async {
        loop {
            let n = r
                .read(&mut buf)
                .await
                .expect("the application connection stays up");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if cuts < 3 && got.len() > (cuts + 1) * data.len() / 4 {
                m.relay.cut();
                cuts += 1;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the transfer finishes");
    writer.await.unwrap();
    assert_eq!(cuts, 3);
    assert_eq!(got.len(), data.len(), "bytes lost or duplicated");
    assert!(got == data, "bytes arrived changed or out of order");
    // Each cut made the client dial again.
    assert!(
        m.relay.accepted() >= 4,
        "{} connections",
        m.relay.accepted()
    );
    // One access line per side for the whole connection, saying it was resumable.
    let bytes = format!("{}", data.len());
    lines
        .line_with(&["direction=\"outbound\"", "resumable=true", &bytes])
        .await;
    lines
        .line_with(&["direction=\"inbound\"", "resumable=true", &bytes])
        .await;
}

#[tokio::test]
async fn without_the_servers_agreement_a_cut_ends_the_connection_as_before() {
    let (lines, _guard) = AccessLines::capture();
    let m = mesh(false).await;
    let mut s = m.echo_connection().await;
    echo_once(&mut s, b"before the cut").await;
    m.relay.cut();
    s.write_all(b"after the cut").await.ok();
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the connection ends");
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "a plain stream cannot survive its tunnel: {end:?}"
    );
    // The client's access line says the connection was not resumable.
    lines
        .line_with(&["direction=\"outbound\"", "resumable=false"])
        .await;
}

#[tokio::test]
async fn a_tunnel_that_cannot_be_dialled_again_ends_the_connection_after_the_wait() {
    let (lines, _guard) = AccessLines::capture();
    let m = mesh_waiting(true, "500ms").await;
    let mut s = m.echo_connection().await;
    echo_once(&mut s, b"before the path goes").await;
    let gone = std::time::Instant::now();
    m.relay.close();
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the connection ends within the wait and a little");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(
        gone.elapsed() >= Duration::from_millis(400),
        "ended before the wait: {:?}",
        gone.elapsed()
    );
    // Each side says why, on its access line.
    lines
        .line_with(&["direction=\"outbound\"", "no resume within 500ms"])
        .await;
    lines
        .line_with(&["direction=\"inbound\"", "did not resume within 500ms"])
        .await;
}

fn now_plus(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::now() + Duration::from_secs(secs as u64)
    } else {
        SystemTime::now() - Duration::from_secs((-secs) as u64)
    }
}

#[tokio::test]
async fn a_resume_for_an_unknown_stream_or_a_bad_token_is_refused() {
    let m = mesh(true).await;
    let id = |s: &str| -> Identity { s.parse().unwrap() };
    let cert =
        m.ca.issue(
            &id("spiffe://cluster.local/ns/default/sa/client"),
            now_plus(-60),
            now_plus(3600),
        )
        .unwrap();
    let server = SocketAddr::new(ip(m.net, 3), 15008);
    let mut c = hbone_client(
        cert,
        id("spiffe://cluster.local/ns/default/sa/server"),
        server,
    )
    .await
    .unwrap();
    let authority = format!("{}:8080", ip(m.net, 3));
    let with = |value: &str| {
        let mut req = connect(&authority);
        req.headers_mut()
            .insert("x-meshnode-resume", value.parse().unwrap());
        req
    };
    let token = "00112233445566778899aabbccddeeff";
    assert_eq!(
        status_of(&mut c, with(&format!("{token};at=0")))
            .await
            .unwrap(),
        http::StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(&mut c, with("not-a-token")).await.unwrap(),
        http::StatusCode::BAD_REQUEST
    );
    // An offer is accepted like any CONNECT, and the server keeps serving.
    assert_eq!(
        status_of(&mut c, with(token)).await.unwrap(),
        http::StatusCode::OK
    );
}
