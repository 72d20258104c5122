//! Shared fixtures for the integration tests: proxies on loopback addresses, test applications, raw HBONE
//! clients, and network namespaces that clean themselves up.
#![allow(dead_code, unreachable_pub)]

pub mod access_lines;
pub mod ads;
pub mod bench;
pub mod cluster;
pub mod control_plane;
pub mod dedicated;
pub mod fake_kube;
pub mod l7;
pub mod labelled;
pub mod mesh_yaml;
pub mod netns;
pub mod upgrade;
pub mod waypoint;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshnode::config::Config;
use meshnode::identity::{CertManager, CertSource, Identity, WorkloadCert};
use meshnode::proxy::{Listeners, Proxy, ProxyInputs};
use meshnode::socket::{self, SocketOpts};
use meshnode::state::{LocalConfig, State, StateHandle};
use meshnode::tls::{dummy_server_name, TlsMaterial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A /24 of loopback addresses of this test's own: `127.<a>.<b>.0/24`, unique per test in this process.
pub fn loopback_net() -> [u8; 2] {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let a = 20 + (std::process::id() % 200) as u8;
    [a, NEXT.fetch_add(1, Ordering::Relaxed)]
}

/// Address `host` in `net`.
pub fn ip(net: [u8; 2], host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net[0], net[1], host))
}

/// A proxy running in this process.
pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub state: watch::Sender<Arc<State>>,
    shutdown: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    /// Replaces the proxy's state with `yaml`.
    pub fn set_config(&self, yaml: &str) {
        let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
        self.state.send_replace(Arc::new(st));
    }

    /// Starts the drain.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

/// The config of a dedicated proxy for `workload` (`ns/name/sa`), with `extra` variables.
pub fn config(workload: &str, extra: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("PROXY_MODE".into(), "dedicated".into());
    env.insert("PROXY_WORKLOAD_INFO".into(), workload.into());
    env.insert("XDS_ADDRESS".into(), String::new());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Config::from_source(&env).unwrap()
}

/// Starts a dedicated proxy for `workload` with HBONE inbound on `ip:15008` and the other listeners on
/// ephemeral ports of `ip`.
pub async fn start_proxy(
    ca: Arc<dyn CertSource>,
    yaml: &str,
    workload: &str,
    bind: IpAddr,
    extra: &[(&str, &str)],
) -> TestProxy {
    let cfg = Arc::new(config(workload, extra));
    let workload = cfg.workload_info.clone().unwrap();
    start_proxy_with(cfg, ca, yaml, workload, bind).await
}

/// [`start_proxy`] with a config of the caller's: proxies started from one `Arc<Config>` share the
/// process-wide limits, as every pod's proxy does in shared mode.
pub async fn start_proxy_with(
    cfg: Arc<Config>,
    ca: Arc<dyn CertSource>,
    yaml: &str,
    workload: meshnode::config::WorkloadInfo,
    bind: IpAddr,
) -> TestProxy {
    let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    let (state_tx, state) = StateHandle::new(st);
    let opts = SocketOpts {
        mark: None,
        transparent: false,
        reuse_port: false,
    };
    let listeners = Listeners {
        outbound: socket::listen(SocketAddr::new(bind, 0), opts).unwrap(),
        inbound: socket::listen(SocketAddr::new(bind, cfg.ports.inbound), opts).unwrap(),
        inbound_plaintext: socket::listen(SocketAddr::new(bind, 0), opts).unwrap(),
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    // Hostname lookups go to the config's resolv.conf (`MESHNODE_DNS_RESOLV_CONF`), only when a test routes
    // to a workload known by hostname.
    let resolver = meshnode::dns::Resolver::new(&cfg, state.clone(), Default::default());
    let inputs = ProxyInputs {
        cfg,
        state,
        certs: CertManager::new(ca),
        workload,
        sock: SocketOpts::default(),
        orig_src: false,
        netns: None,
        metrics: Default::default(),
        resolver: Some(resolver),
        handover: None,
    };
    let proxy = Proxy::new(inputs, shutdown);
    let p = proxy.clone();
    let task = tokio::spawn(async move { p.serve(listeners).await });
    TestProxy {
        proxy,
        state: state_tx,
        shutdown: shutdown_tx,
        task,
    }
}

/// A listener whose connections `proxy` carries to `dst`, as if the capture rules had redirected them.
pub async fn capture(proxy: &Arc<Proxy>, bind: IpAddr, dst: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::new(bind, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let proxy = proxy.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            tokio::spawn(proxy.clone().outbound_to(s, peer, dst));
        }
    });
    addr
}

/// A test application: answers each connection with `peer=<client address>\n`, then echoes what it reads
/// until EOF, then closes its side.
pub async fn echo_server(addr: SocketAddr) -> SocketAddr {
    serve_echo(addr, Arc::new(AtomicUsize::new(0))).await
}

/// [`echo_server`], also counting the connections it accepted.
pub async fn counting_echo(addr: SocketAddr) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    serve_echo(addr, count.clone()).await;
    count
}

async fn serve_echo(addr: SocketAddr, accepted: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(format!("peer={peer}\n").as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `msg`, half-closes, and returns everything read until EOF.
pub async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Writes `msg` on an open echo connection and asserts it comes back.
pub async fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

/// A raw HBONE client presenting `cert` and expecting the server to be `expected`.
pub async fn hbone_client(
    cert: WorkloadCert,
    expected: Identity,
    dst: SocketAddr,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    hbone_client_at(cert, expected, None, dst)
        .await
        .map(|(send, _)| send)
}

/// [`hbone_client`] from source address `from` (any when `None`); also the address it connected from.
pub async fn hbone_client_at(
    cert: WorkloadCert,
    expected: Identity,
    from: Option<IpAddr>,
    dst: SocketAddr,
) -> Result<(h2::client::SendRequest<Bytes>, SocketAddr), String> {
    let tls = TlsMaterial::new(Arc::new(cert)).map_err(|e| e.to_string())?;
    let sock = if dst.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(from) = from {
        sock.bind(SocketAddr::new(from, 0))
            .map_err(|e| e.to_string())?;
    }
    let tcp = sock.connect(dst).await.map_err(|e| e.to_string())?;
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let conn = tokio_rustls::TlsConnector::from(tls.client_config(vec![expected]));
    let stream = conn
        .connect(dummy_server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, driver) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(driver);
    Ok((send, local))
}

/// Sends `req` on `send` and returns the response status.
pub async fn status_of(
    send: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
) -> Result<http::StatusCode, String> {
    let mut s = send.clone().ready().await.map_err(|e| e.to_string())?;
    let (resp, _body) = s.send_request(req, false).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status())
}

/// A CONNECT request for `authority`.
pub fn connect(authority: &str) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .version(http::Version::HTTP_2)
        .body(())
        .unwrap()
}

/// True when running as root (network-namespace tests need it); otherwise the test is skipped, or fails
/// under `MESHNODE_TEST_STRICT` (CI).
pub fn root_or_skip(test: &str) -> bool {
    meshnode::test_gate::needs_root(test)
}
