//! The proxy's bounds as a peer or an operator sees them, on loopback in one process: the process-wide
//! connection cap shared by several proxies, the per-source cap on unfinished handshakes on :15008, the
//! HTTP/2 handshake and idle timeouts of HBONE connections, TCP keepalive on the proxy's sockets, and (as
//! the `meshnode proxy` binary) the open-files limit and huge configuration values.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use meshnode::config::WorkloadInfo;
use meshnode::identity::{BuiltinCa, Identity, WorkloadCert};
use meshnode::tls::{dummy_server_name, TlsMaterial};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const TTL: Duration = Duration::from_secs(3600);
/// Long enough that "still not served" means "waiting", never a slow machine's hiccup in the other
/// direction: every check that something does happen waits up to [`PATIENCE`] instead.
const STILL_WAITING: Duration = Duration::from_millis(500);
const PATIENCE: Duration = Duration::from_secs(10);

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn server_id() -> Identity {
    id("spiffe://cluster.local/ns/default/sa/server")
}

/// client at .2; two workloads of service account `server` at .3 and .5, each with an echo app on :8080.
fn yaml(net: [u8; 2]) -> String {
    let w = |name: &str, sa: &str, host: u8| {
        format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n",
            ip(net, host)
        )
    };
    format!(
        "workloads:\n{}{}{}services: []\npolicies: []\n",
        w("client", "client", 2),
        w("server", "server", 3),
        w("server2", "server", 5)
    )
}

struct Servers {
    net: [u8; 2],
    ca: Arc<BuiltinCa>,
    proxies: Vec<TestProxy>,
}

impl Servers {
    /// Server proxies for `server` (.3) and, with `two`, `server2` (.5), all built from ONE config: they
    /// share the process-wide limits as the pods of a shared-mode proxy do.
    async fn start(extra: &[(&str, &str)], two: bool) -> Servers {
        let net = loopback_net();
        let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
        let cfg = Arc::new(config("default/server/server", extra));
        let mut proxies = Vec::new();
        for (name, host) in [("server", 3), ("server2", 5)]
            .into_iter()
            .take(1 + two as usize)
        {
            let workload: WorkloadInfo = format!("default/{name}/server").parse().unwrap();
            let yaml = yaml(net);
            let p = start_proxy_with(cfg.clone(), ca.clone(), &yaml, workload, ip(net, host)).await;
            proxies.push(p);
            echo_server(SocketAddr::new(ip(net, host), 8080)).await;
        }
        Servers { net, ca, proxies }
    }

    fn addr(&self, host: u8) -> SocketAddr {
        SocketAddr::new(ip(self.net, host), 15008)
    }

    fn client_cert(&self) -> WorkloadCert {
        let now = SystemTime::now();
        self.ca
            .issue(
                &id("spiffe://cluster.local/ns/default/sa/client"),
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            )
            .unwrap()
    }

    fn admission(&self) -> &meshnode::proxy::limits::Admission {
        &self.proxies[0].proxy.cfg().admission
    }
}

/// A TCP connection to `dst` from the source address `src`.
async fn tcp_from(src: IpAddr, dst: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(src, 0)).unwrap();
    s.connect(dst).await.unwrap()
}

/// TLS as an HBONE client on `tcp`.
async fn tls_on(
    cert: WorkloadCert,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls = TlsMaterial::new(Arc::new(cert)).unwrap();
    tokio_rustls::TlsConnector::from(tls.client_config(vec![server_id()]))
        .connect(dummy_server_name(), tcp)
        .await
}

/// An HBONE client connection whose driver the test keeps: it finishes when the server closes.
async fn hbone(
    cert: WorkloadCert,
    tcp: TcpStream,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = tls_on(cert, tcp).await.unwrap();
    let (send, driver) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(driver))
}

/// Opens a CONNECT to the echo app at `host`:8080 and returns its two halves once answered 200.
async fn open_stream(
    send: &h2::client::SendRequest<Bytes>,
    net: [u8; 2],
    host: u8,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let mut s = send.clone().ready().await.unwrap();
    let (resp, body) = s
        .send_request(connect(&format!("{}:8080", ip(net, host))), false)
        .unwrap();
    let resp = tokio::time::timeout(PATIENCE, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    (body, resp.into_body())
}

/// Sends `msg` on a CONNECT stream to an echo app and reads it back (after the app's `peer=` line).
async fn echo_over(
    send: &mut h2::SendStream<Bytes>,
    recv: &mut h2::RecvStream,
    msg: &'static [u8],
) {
    send.send_data(Bytes::from_static(msg), false).unwrap();
    let mut got = Vec::new();
    while !got.ends_with(msg) {
        let chunk = tokio::time::timeout(PATIENCE, recv.data())
            .await
            .expect("echo in time")
            .expect("stream open")
            .unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
}

/// Waits until `cond` holds, up to [`PATIENCE`].
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let r = tokio::time::timeout(PATIENCE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "never happened: {what}");
}

#[tokio::test]
async fn connections_beyond_the_process_cap_wait_until_one_closes_while_admitted_ones_are_served() {
    // Two proxies, one process-wide budget of two connections.
    let s = Servers::start(&[("MESHNODE_MAX_CONNECTIONS_TOTAL", "2")], true).await;
    let local = ip(s.net, 9);
    let (send_a, _da) = hbone(s.client_cert(), tcp_from(local, s.addr(3)).await).await;
    let (send_b, _db) = hbone(s.client_cert(), tcp_from(local, s.addr(5)).await).await;
    let (mut tx, mut rx) = open_stream(&send_a, s.net, 3).await;
    assert_eq!(s.admission().open(), 2);

    // A third connection, to either proxy, is not taken up: its TLS handshake gets no answer...
    let third = tokio::spawn({
        let cert = s.client_cert();
        let dst = s.addr(3);
        async move { tls_on(cert, tcp_from(local, dst).await).await.is_ok() }
    });
    tokio::time::sleep(STILL_WAITING).await;
    assert!(
        !third.is_finished(),
        "a connection beyond the process cap was served"
    );
    // ...while the admitted ones keep working.
    echo_over(&mut tx, &mut rx, b"still served").await;

    // Once one closes, the waiting one is served.
    drop(send_b);
    let admitted = tokio::time::timeout(PATIENCE, third).await;
    assert!(matches!(admitted, Ok(Ok(true))), "{admitted:?}");
}

#[tokio::test]
async fn an_address_with_too_many_unfinished_handshakes_is_refused_while_others_are_served() {
    let s = Servers::start(&[("MESHNODE_MAX_HANDSHAKES_PER_SOURCE", "2")], false).await;
    let greedy = ip(s.net, 66);
    // Two connections that never start TLS take the address's share.
    let silent1 = tcp_from(greedy, s.addr(3)).await;
    let _silent2 = tcp_from(greedy, s.addr(3)).await;
    eventually("two handshakes counted", || {
        s.admission().handshakes_from(greedy) == 2
    })
    .await;

    // A third from the same address is reset before TLS.
    let third = tls_on(s.client_cert(), tcp_from(greedy, s.addr(3)).await).await;
    assert!(third.is_err(), "a third unfinished handshake was let in");

    // Another address is served as usual.
    let (send, _d) = hbone(s.client_cert(), tcp_from(ip(s.net, 67), s.addr(3)).await).await;
    let (mut tx, mut rx) = open_stream(&send, s.net, 3).await;
    echo_over(&mut tx, &mut rx, b"other sources are fine").await;

    // When one of the silent connections goes away, the address gets its slot back.
    drop(silent1);
    eventually("the closed handshake is released", || {
        s.admission().handshakes_from(greedy) == 1
    })
    .await;
    let (send, _d) = hbone(s.client_cert(), tcp_from(greedy, s.addr(3)).await).await;
    let _stream = open_stream(&send, s.net, 3).await;
    // A finished handshake no longer counts against the address.
    assert_eq!(s.admission().handshakes_from(greedy), 1);
}

#[tokio::test]
async fn a_client_that_completes_tls_but_never_sends_the_http2_preface_is_closed() {
    let s = Servers::start(&[("MESHNODE_HANDSHAKE_TIMEOUT", "300ms")], false).await;
    let mut tls = tls_on(s.client_cert(), tcp_from(ip(s.net, 9), s.addr(3)).await)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a connection without HTTP/2 was kept open");
    assert_eq!(s.admission().handshakes_from(ip(s.net, 9)), 0);
    eventually("its connection slot is free", || s.admission().open() == 0).await;

    // A client that does speak HTTP/2 in time is served.
    let (send, _d) = hbone(s.client_cert(), tcp_from(ip(s.net, 9), s.addr(3)).await).await;
    let _stream = open_stream(&send, s.net, 3).await;
}

#[tokio::test]
async fn an_idle_hbone_connection_is_closed_but_one_carrying_a_stream_is_kept() {
    let s = Servers::start(&[("MESHNODE_HBONE_IDLE_TIMEOUT", "300ms")], false).await;
    let src = ip(s.net, 9);

    // One stream, then nothing: the server closes the connection.
    let (idle, idle_driver) = hbone(s.client_cert(), tcp_from(src, s.addr(3)).await).await;
    let (mut tx, mut rx) = open_stream(&idle, s.net, 3).await;
    echo_over(&mut tx, &mut rx, b"once").await;
    drop((tx, rx));

    // Another connection keeps a stream open, quietly, for several idle periods.
    let (busy, _busy_driver) = hbone(s.client_cert(), tcp_from(src, s.addr(3)).await).await;
    let (mut tx, mut rx) = open_stream(&busy, s.net, 3).await;

    let ended = tokio::time::timeout(PATIENCE, idle_driver).await;
    assert!(ended.is_ok(), "an idle HBONE connection was kept open");
    echo_over(&mut tx, &mut rx, b"a quiet stream is not idle").await;
    // The busy connection still takes new streams.
    let _stream = open_stream(&busy, s.net, 3).await;
}

#[tokio::test]
async fn released_pooled_connections_are_closed_on_the_wire() {
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let yaml = yaml(net);
    let extra = [("POOL_UNUSED_RELEASE_TIMEOUT", "300ms")];
    let client = start_proxy(
        ca.clone(),
        &yaml,
        "default/client/client",
        ip(net, 2),
        &extra,
    )
    .await;
    let server = start_proxy(ca, &yaml, "default/server/server", ip(net, 3), &extra).await;
    echo_server(SocketAddr::new(ip(net, 3), 8080)).await;
    let entry = capture(&client.proxy, ip(net, 2), SocketAddr::new(ip(net, 3), 8080)).await;
    assert!(roundtrip(entry, b"x").await.unwrap().ends_with('x'));
    assert_eq!(server.proxy.cfg().admission.open(), 1);
    // The server sees the client's pooled connection go, not only the pool forgetting it.
    eventually("the server saw the pooled connection close", || {
        server.proxy.cfg().admission.open() == 0
    })
    .await;
    assert_eq!(client.proxy.pool().connections(), 0);
}

/// `ss -tnoH` lines for established sockets between `a` and `b` (either direction).
fn ss_between(a: SocketAddr, b: IpAddr) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("running ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("{a} ")) && l.contains(&format!("{b}:")))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_proxy_sockets_towards_peers_and_applications_carry_tcp_keepalive() {
    let s = Servers::start(
        &[("KEEPALIVE_TIME", "77s"), ("KEEPALIVE_INTERVAL", "5s")],
        false,
    )
    .await;
    let src = ip(s.net, 9);
    let (send, _d) = hbone(s.client_cert(), tcp_from(src, s.addr(3)).await).await;
    let (mut tx, mut rx) = open_stream(&send, s.net, 3).await;
    echo_over(&mut tx, &mut rx, b"hello").await;
    // The accepted HBONE socket (server side of peer → :15008) and the proxy's connection to the app. A
    // socket with unacknowledged data shows its retransmit timer instead, so look until both show theirs.
    let app = SocketAddr::new(ip(s.net, 3), 8080);
    let sockets = || -> Vec<String> {
        ss_between(s.addr(3), src)
            .into_iter()
            .filter(|l| l.split_whitespace().nth(2) == Some(&s.addr(3).to_string()))
            .chain(
                ss_between(app, ip(s.net, 3))
                    .into_iter()
                    .filter(|l| l.split_whitespace().nth(3) == Some(&app.to_string())),
            )
            .collect()
    };
    // `timer:(keepalive,1min16sec,0)`: the 77 s idle timer (the default would show 2 or 3 minutes).
    let armed = |l: &String| l.contains("timer:(keepalive,1min");
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            let lines = sockets();
            if lines.len() == 2 && lines.iter().all(armed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "no keepalive timer on {:?}", sockets());
}

/// `meshnode proxy` in a namespace of its own (its ports are fixed), with `env` and a low open-files
/// soft limit; returns the process and its log file.
fn spawn_proxy(
    ns: &support::netns::Netns,
    env: &[(&str, &str)],
    soft: u64,
) -> (support::netns::KillOnDrop, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let state = dir.path().to_str().unwrap().to_string();
    let mut all: Vec<(&str, &str)> = vec![
        ("PROXY_MODE", "dedicated"),
        ("PROXY_WORKLOAD_INFO", "default/server/server"),
        ("XDS_ADDRESS", ""),
        ("LOCAL_XDS", "workloads: []\n"),
        ("MESHNODE_STATE_DIR", &state),
    ];
    all.extend_from_slice(env);
    let nofile = format!("--nofile={soft}:");
    let child = ns.spawn(
        "prlimit",
        &[&nofile, env!("CARGO_BIN_EXE_meshnode"), "proxy"],
        &all,
        log,
    );
    (support::netns::KillOnDrop(child), dir)
}

/// The soft and hard "Max open files" of `pid`.
fn nofile(pid: u32) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut n = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    Some((n.next()?, n.next()?))
}

/// The `meshnode` process that is `pid` or one of its descendants.
fn meshnode_under(pid: u32) -> Option<u32> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() == "meshnode" {
        return Some(pid);
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find_map(meshnode_under)
}

#[tokio::test]
async fn the_proxy_raises_its_open_files_soft_limit_to_the_hard_limit() {
    if !root_or_skip("the_proxy_raises_its_open_files_soft_limit_to_the_hard_limit") {
        return;
    }
    let hard = nofile(std::process::id()).unwrap().1;
    if !meshnode::test_gate::needs(
        "the_proxy_raises_its_open_files_soft_limit_to_the_hard_limit",
        hard > 256,
        "the hard open-files limit leaves nothing to raise",
    ) {
        return;
    }
    let ns = support::netns::Netns::new("nofile");
    let (mut proxy, dir) = spawn_proxy(&ns, &[], 256);
    let mut seen = None;
    for _ in 0..200 {
        // `ip netns exec` may run the command as its child: look for the proxy itself.
        seen = meshnode_under(proxy.0.id()).and_then(nofile);
        if seen.is_some_and(|(soft, hard)| soft == hard) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(proxy.0.try_wait().unwrap().is_none(), "proxy exited: {log}");
    assert_eq!(seen, Some((hard, hard)), "{log}");
}

#[test]
fn huge_durations_and_sizes_stop_start_up_naming_the_variable_without_a_panic() {
    for (var, value) in [
        ("SECRET_TTL", "100000000000000000000s"),
        ("POOL_UNUSED_RELEASE_TIMEOUT", "18446744073709551615s1s"),
        ("HTTP2_STREAM_WINDOW_SIZE", "18446744073709551615Gi"),
        ("HTTP2_STREAM_WINDOW_SIZE", "0"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshnode"))
            .arg("proxy")
            .env_clear()
            .envs([
                ("PROXY_MODE", "dedicated"),
                ("PROXY_WORKLOAD_INFO", "a/b/c"),
                (var, value),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // A value taken as valid would start the proxy: it must not get that far.
        let mut status = None;
        for _ in 0..200 {
            status = child.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = std::process::Output {
            status: status.unwrap_or_else(|| child.wait().unwrap()),
            stdout: Vec::new(),
            stderr: std::fs::read(dir.path().join("stderr")).unwrap(),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}={value}: {stderr}");
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{var}={value}: {stderr}");
    }
}

/// An I/O stream whose reads stop for good once `stop` is set (writes go on): a peer that stops reading.
struct StopsReading<IO> {
    io: IO,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StopsReading<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StopsReading<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_peer_that_stops_reading_stalls_the_app_instead_of_growing_the_proxy_buffers() {
    // The peer grants the largest windows HTTP/2 allows and then stops reading its socket. What the server
    // proxy may hold for it is then bounded by its own per-stream send buffer, not by the peer's window:
    // the app's writes stall after kernel buffers and that budget are full.
    let s = Servers::start(&[], false).await;
    let firehose = tokio::net::TcpListener::bind(SocketAddr::new(ip(s.net, 3), 8081))
        .await
        .unwrap();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        let (mut app, _) = firehose.accept().await.unwrap();
        let block = vec![7u8; 64 * 1024];
        while app.write_all(&block).await.is_ok() {
            counter.fetch_add(block.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let tls = tls_on(s.client_cert(), tcp_from(ip(s.net, 9), s.addr(3)).await)
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = StopsReading {
        io: tls,
        stop: stop.clone(),
    };
    let (send, driver) = h2::client::Builder::new()
        .initial_window_size((1 << 31) - 1)
        .initial_connection_window_size((1 << 31) - 1)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    tokio::spawn(driver);
    let mut send = send.ready().await.unwrap();
    let (resp, _body) = send
        .send_request(connect(&format!("{}:8081", ip(s.net, 3))), false)
        .unwrap();
    let _resp = tokio::time::timeout(PATIENCE, resp).await.unwrap().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Wait until the app's writes stop advancing.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(STILL_WAITING).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            now < 256 << 20,
            "the app wrote {now} bytes into a stream nobody reads"
        );
        if now == last {
            break;
        }
        last = now;
    }
    eprintln!("the app's writes stalled after {last} bytes");
    assert!(
        last < 64 << 20,
        "{last} bytes buffered for a peer that stopped reading"
    );
}

#[tokio::test]
async fn streams_opened_and_reset_at_once_cannot_pile_up_handlers_beyond_the_stream_limit() {
    // HTTP/2 "rapid reset": h2 forgets a stream as soon as the peer resets it, but the proxy's handler for
    // it may still be connecting upstream. Here every upstream connect hangs (a listener whose accept
    // queue is full drops SYNs) and each stream is reset once its handler has started.
    let s = Servers::start(&[], false).await;
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(&SocketAddr::new(ip(s.net, 3), 8082).into())
        .unwrap();
    hole.listen(0).unwrap();
    let _queued = TcpStream::connect(SocketAddr::new(ip(s.net, 3), 8082))
        .await
        .unwrap();
    let registry = s.proxies[0].proxy.connections();
    let (send, _d) = hbone(s.client_cert(), tcp_from(ip(s.net, 9), s.addr(3)).await).await;
    let mut refused = 0;
    for _ in 0..260 {
        let before = registry.len();
        let mut req = send.clone().ready().await.unwrap();
        let (resp, mut body) = req
            .send_request(connect(&format!("{}:8082", ip(s.net, 3))), false)
            .unwrap();
        let started = async {
            while registry.len() == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            r = resp => {
                assert!(r.is_err(), "a stream to a black hole was answered: {r:?}");
                refused += 1;
            }
            _ = tokio::time::timeout(PATIENCE, started) => body.send_reset(h2::Reason::CANCEL),
        }
    }
    assert!(
        registry.len() <= 200,
        "{} handlers in flight on one connection",
        registry.len()
    );
    assert!(refused >= 60, "only {refused} streams refused");
}
