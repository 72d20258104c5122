//! The proxy fed by a control plane, end to end: `meshnode control-plane` (its mesh CA, xDS and CA services
//! on one TLS listener) and two dedicated proxies started the way `meshnode proxy` starts them
//! (`app::run_proxy` with ztunnel's variables: XDS_ADDRESS, CA_ADDRESS, XDS_ROOT_CA, CA_ROOT_CA,
//! AUTH_TOKEN), on loopback addresses of the test's own. The client's "captured" traffic is a connection
//! to a listener bound on the service VIP itself (its local address is the original destination), so no
//! capture rules (and no root) are needed.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode::app;
use meshnode::control_plane::{self, CaChoice, RunOptions};
use meshnode::proxy::Listeners;
use meshnode::socket::{self, SocketOpts};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const CLIENT_TOKEN: &str = "client-token";
const SERVER_TOKEN: &str = "server-token";

/// The mesh file: client and server pods in the ambient `default` namespace on one node, the server behind a
/// service VIP. Each dedicated proxy holds a node proxy token (xDS is for node proxies) naming its workload's
/// identity as its own (what it gets from the CA without impersonation).
fn mesh(net: [u8; 2], with_server: bool) -> String {
    let server = if with_server {
        format!(
            "- {{name: server, namespace: default, serviceAccount: server, ips: [{}], node: node-1, labels: {{app: server}}, authorizationPolicies: [default/only-client]}}\n",
            ip(net, 3)
        )
    } else {
        String::new()
    };
    format!(
        "namespaces:\n  default: {{labels: {{istio.io/dataplane-mode: ambient}}}}\nworkloads:\n- {{name: client, namespace: default, serviceAccount: client, ips: [{client}], node: node-1}}\n{server}services:\n- {{name: web, namespace: default, vips: [{vip}], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: server}}}}\npolicies:\n- {{name: only-client, namespace: default, scope: WorkloadSelector, action: Allow, rules: [[[{{principals: [!Exact \"cluster.local/ns/default/sa/client\"]}}]]]}}\ntokens:\n- {{token: {CLIENT_TOKEN}, nodeProxy: true, node: node-1, namespace: default, serviceAccount: client}}\n- {{token: {SERVER_TOKEN}, nodeProxy: true, node: node-1, namespace: default, serviceAccount: server}}\n",
        client = ip(net, 1),
        vip = ip(net, 20),
    )
}

struct ControlPlane {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

async fn start_control_plane(dir: &Path, addr: SocketAddr) -> ControlPlane {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = RunOptions {
        config: dir.join("mesh.yaml"),
        listen: addr,
        ca: CaChoice::Builtin(dir.join("cp-state")),
        tls_files: None,
        root_cert_out: Some(dir.join("root-cert.pem")),
        drain_deadline: control_plane::server::DEFAULT_DRAIN_DEADLINE,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        control_plane::run(opts, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    // The root is written before serving starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("root-cert.pem").exists() {
        assert!(Instant::now() < deadline, "control plane did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ControlPlane {
        addr,
        stop: Some(stop),
        task,
    }
}

struct Proxy {
    ready: SocketAddr,
    _stop: watch::Sender<bool>,
}

/// Starts a dedicated proxy for `workload` configured only by ztunnel's variables pointing at `cp`.
async fn start_proxy(
    dir: &Path,
    cp: SocketAddr,
    workload: &str,
    token: &str,
    listeners: Listeners,
    bind: IpAddr,
    extra: &[(&str, &str)],
) -> Proxy {
    let root = dir.join("root-cert.pem");
    let address = format!("https://{cp}");
    let mut env: Vec<(&str, &str)> = vec![
        ("XDS_ADDRESS", &address),
        ("CA_ADDRESS", &address),
        ("XDS_ROOT_CA", root.to_str().unwrap()),
        ("CA_ROOT_CA", root.to_str().unwrap()),
        ("AUTH_TOKEN", token),
    ];
    env.extend_from_slice(extra);
    let cfg = Arc::new(config(workload, &env));
    let ready_listener = socket::listen(SocketAddr::new(bind, 0), SocketOpts::default()).unwrap();
    let ready = ready_listener.local_addr().unwrap();
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = app::run_proxy(cfg, Some(listeners), Some(ready_listener), shutdown).await {
            panic!("proxy failed: {e}");
        }
    });
    Proxy { ready, _stop: stop }
}

async fn readiness(addr: SocketAddr) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

async fn wait_ready(p: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = readiness(p.ready).await;
        if answer.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(Instant::now() < deadline, "proxy never ready: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn listeners(outbound: SocketAddr, bind: IpAddr) -> Listeners {
    let l = |a| socket::listen(a, SocketOpts::default()).unwrap();
    Listeners {
        outbound: l(outbound),
        inbound: l(SocketAddr::new(bind, 15008)),
        inbound_plaintext: l(SocketAddr::new(bind, 0)),
    }
}

/// A mesh of a control plane, a client proxy whose outbound listener sits on the service VIP, a server
/// proxy and the server's echo app.
struct Mesh {
    net: [u8; 2],
    dir: tempfile::TempDir,
    cp: ControlPlane,
    /// Kept for its lifetime: dropping a proxy handle stops it.
    _client: Proxy,
    /// Likewise.
    _server: Proxy,
    vip: SocketAddr,
}

async fn mesh_up(extra: &[(&str, &str)]) -> Mesh {
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), mesh(net, true)).unwrap();
    let cp = start_control_plane(dir.path(), SocketAddr::new(ip(net, 10), 0)).await;
    echo_server(SocketAddr::new(ip(net, 3), 8080)).await;
    let vip = SocketAddr::new(ip(net, 20), 80);
    let client = start_proxy(
        dir.path(),
        cp.addr,
        "default/client/client",
        CLIENT_TOKEN,
        listeners(vip, ip(net, 1)),
        ip(net, 1),
        extra,
    )
    .await;
    let server = start_proxy(
        dir.path(),
        cp.addr,
        "default/server/server",
        SERVER_TOKEN,
        listeners(SocketAddr::new(ip(net, 3), 0), ip(net, 3)),
        ip(net, 3),
        extra,
    )
    .await;
    wait_ready(&client).await;
    wait_ready(&server).await;
    Mesh {
        net,
        dir,
        cp,
        _client: client,
        _server: server,
        vip,
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn workloads_from_the_control_plane_carry_traffic_until_they_are_removed() {
    let m = mesh_up(&[]).await;
    // client → VIP (the mesh file's service) → server endpoint over HBONE with CA-issued certificates.
    let answer = roundtrip(m.vip, b"through the mesh").await.unwrap();
    // The server admits only the client's SPIFFE identity: an answer proves HBONE with the CA's certificate.
    assert!(answer.ends_with("through the mesh"), "{answer}");

    // The server pod leaves the mesh file: the push removes the service's only endpoint, calls are refused.
    std::fs::write(m.dir.path().join("mesh.yaml"), mesh(m.net, false)).unwrap();
    eventually("the removal to reach the client proxy", async || {
        !roundtrip(m.vip, b"x").await.is_ok_and(|a| a.ends_with('x'))
    })
    .await;
    // And back.
    std::fs::write(m.dir.path().join("mesh.yaml"), mesh(m.net, true)).unwrap();
    eventually("the workload to come back", async || {
        roundtrip(m.vip, b"again")
            .await
            .is_ok_and(|a| a.ends_with("again"))
    })
    .await;
}

#[tokio::test]
async fn certificates_from_the_remote_ca_rotate_under_live_traffic() {
    // Certificates live 4 s, so they rotate after 2 s.
    let m = mesh_up(&[("SECRET_TTL", "4s")]).await;
    let mut live = tokio::net::TcpStream::connect(m.vip).await.unwrap();
    let mut buf = [0u8; 256];
    let n = live.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"peer="));
    tokio::time::sleep(Duration::from_millis(5000)).await;
    // Past the first certificates' expiry: the open connection still carries bytes, new ones work.
    echo_once(&mut live, b"still here").await;
    let answer = roundtrip(m.vip, b"fresh").await.unwrap();
    assert!(answer.ends_with("fresh"), "{answer}");
}

#[tokio::test]
async fn proxies_keep_serving_through_a_control_plane_restart_and_resync() {
    let mut m = mesh_up(&[]).await;
    let addr = m.cp.addr;
    drop(std::mem::replace(
        &mut m.cp,
        ControlPlane {
            addr,
            stop: None,
            task: tokio::spawn(async {}),
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Last good state keeps serving while the control plane is gone.
    let answer = roundtrip(m.vip, b"while down").await.unwrap();
    assert!(answer.ends_with("while down"), "{answer}");
    // Back on the same address with the server removed: the proxies reconnect and apply the change.
    std::fs::write(m.dir.path().join("mesh.yaml"), mesh(m.net, false)).unwrap();
    m.cp = start_control_plane(m.dir.path(), addr).await;
    eventually("the resync after the restart", async || {
        !roundtrip(m.vip, b"x").await.is_ok_and(|a| a.ends_with('x'))
    })
    .await;
}

#[tokio::test]
async fn a_proxy_with_a_wrong_token_gets_neither_state_nor_certificates() {
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), mesh(net, true)).unwrap();
    let cp = start_control_plane(dir.path(), SocketAddr::new(ip(net, 10), 0)).await;
    let p = start_proxy(
        dir.path(),
        cp.addr,
        "default/client/client",
        "not-a-token",
        listeners(SocketAddr::new(ip(net, 20), 80), ip(net, 1)),
        ip(net, 1),
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answer = readiness(p.ready).await;
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    assert!(answer.contains("xds"), "{answer}");
    // A workload token may not get another workload's identity.
    let p2 = start_proxy(
        dir.path(),
        cp.addr,
        "default/client/client",
        SERVER_TOKEN,
        listeners(SocketAddr::new(ip(net, 21), 80), ip(net, 2)),
        ip(net, 2),
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answer = readiness(p2.ready).await;
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    assert!(answer.contains("proxy"), "{answer}");
}
