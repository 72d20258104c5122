//! Stopping `meshnode control-plane` (the real binary) while a proxy holds an xDS stream, as istiod stops:
//! SIGTERM closes the listener, the stream is ended at the drain deadline (the proxy reconnects to another
//! instance) and the process exits; a second signal exits at once.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use meshnode::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshnode::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Streaming;

const TOKEN: &str = "node-1-token";

struct ControlPlane {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlPlane {
    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// The exit status, if the process ends within `within`.
    async fn exits_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cp.log")).unwrap_or_default()
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Starts the binary; `drain` is passed by flag or, with `by_env`, through CONTROL_PLANE_DRAIN_DEADLINE.
fn start(drain: &str, by_env: bool) -> ControlPlane {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!("namespaces: {{default: {{}}}}\nworkloads:\n- {{name: a, namespace: default, ips: [10.0.0.1], node: node-1}}\ntokens:\n- {{token: {TOKEN}, nodeProxy: true, node: node-1}}\n"),
    )
    .unwrap();
    let addr = free_port();
    let log = std::fs::File::create(dir.path().join("cp.log")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshnode"));
    cmd.arg("control-plane")
        .arg("--config")
        .arg(dir.path().join("mesh.yaml"))
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--root-cert-out")
        .arg(dir.path().join("root-cert.pem"))
        .env("RUST_LOG", "info")
        .env_remove("CA_CERTS_DIR")
        .stdout(Stdio::null())
        .stderr(log);
    if by_env {
        cmd.env("CONTROL_PLANE_DRAIN_DEADLINE", drain);
    } else {
        cmd.env_remove("CONTROL_PLANE_DRAIN_DEADLINE")
            .arg("--drain-deadline")
            .arg(drain);
    }
    ControlPlane {
        child: cmd.spawn().unwrap(),
        addr,
        dir,
    }
}

/// A proxy's xDS stream to `cp`, past its first response.
async fn connected_proxy(
    cp: &ControlPlane,
) -> (
    tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
) {
    let root = cp.dir.path().join("root-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_error = String::new();
    while Instant::now() < deadline {
        if root.exists() {
            match try_stream(cp.addr, &root).await {
                Ok(s) => return s,
                Err(e) => last_error = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no xDS stream: {last_error}\n{}", cp.log());
}

async fn try_stream(
    addr: SocketAddr,
    root: &Path,
) -> Result<
    (
        tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
        Streaming<DeltaDiscoveryResponse>,
    ),
    Box<dyn std::error::Error>,
> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(root)?))
                .domain_name("istiod.istio-system.svc"),
        )?
        .connect()
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.9~ztunnel.istio-system~istio-system.svc.cluster.local".into(),
            ..Node::default()
        }),
        type_url: "type.googleapis.com/istio.workload.Address".into(),
        ..DeltaDiscoveryRequest::default()
    })
    .await?;
    let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut req = tonic::Request::new(requests);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(req)
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .ok_or("no first response")?;
    Ok((tx, stream))
}

#[tokio::test]
async fn sigterm_with_a_connected_proxy_ends_its_stream_at_the_drain_deadline_and_exits() {
    let mut cp = start("2s", false);
    let (_requests, mut stream) = connected_proxy(&cp).await;
    cp.signal(Signal::SIGTERM);

    // The stream is ended (the proxy would now reconnect elsewhere), well within a generous bound.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the xDS stream outlived the drain deadline\n{}",
        cp.log()
    );
    let status = cp.exits_within(Duration::from_secs(20)).await;
    let log = cp.log();
    let status = status.unwrap_or_else(|| panic!("still running after SIGTERM\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
    // The listener closed: nothing answers on the port any more.
    assert!(std::net::TcpStream::connect(cp.addr).is_err());
}

#[tokio::test]
async fn a_second_signal_exits_at_once_during_a_long_drain() {
    // A drain that would outlast the test: only the second signal can end it in time.
    let mut cp = start("10m", true);
    let (_requests, _stream) = connected_proxy(&cp).await;
    cp.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        cp.child.try_wait().unwrap().is_none(),
        "exited before the drain deadline, with a proxy still connected\n{}",
        cp.log()
    );
    cp.signal(Signal::SIGINT);
    let status = cp.exits_within(Duration::from_secs(20)).await;
    assert!(
        status.is_some(),
        "a second signal did not stop it\n{}",
        cp.log()
    );
}
