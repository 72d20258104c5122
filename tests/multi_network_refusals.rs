//! Multi-network refusals, in one process on loopback addresses (no root, no namespaces): what the
//! east-west gateway answers a CONNECT it cannot serve, and what a client's node proxy does with a
//! service whose hostname cannot be a CONNECT authority. Each case checks what the client sees (the
//! status, the closed connection) and the access line the refusing side writes.
//!
//! - the gateway (`meshnode::gateway::Gateway` over a listener on `127.x.y.1`, network `net2`), reached
//!   with a raw HBONE client (mTLS with a mesh certificate, then HTTP/2): 400 for anything but
//!   `CONNECT hostname:port`; 503 for a service the client's namespace cannot see, one with no endpoint on
//!   the gateway's network, and one whose endpoint does not answer; 200 and the bytes copied for a
//!   reachable endpoint (the control);
//! - a node proxy routing to a service on another network whose hostname is no valid authority closes the
//!   connection without dialling the gateway, and says why.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshnode::config::GatewayConfig;
use meshnode::gateway::Gateway;
use meshnode::identity::{BuiltinCa, CertManager, CertSource, Identity};
use meshnode::state::{LocalConfig, StateHandle};
use support::access_lines::AccessLines;
use support::mesh_yaml::{behind_gateway, serves, service, workload};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TTL: Duration = Duration::from_secs(3600);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";
const ECHO: &str = "echo.default.svc.cluster.local";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// The gateway's view (network `net2`): `echo` served at .3 (an HBONE port that answers), `down` at .5
/// (nothing listening), `elsewhere` only on `net3`.
fn gateway_mesh(net: [u8; 2]) -> String {
    let mut y = String::from("workloads:\n");
    y += &workload(
        "server",
        "default",
        "httpbin",
        ip(net, 3),
        "net2",
        &serves(&[ECHO]),
    );
    y += &workload(
        "gone",
        "default",
        "httpbin",
        ip(net, 5),
        "net2",
        &serves(&["down.default.svc.cluster.local"]),
    );
    y += &workload(
        "far",
        "default",
        "httpbin",
        ip(net, 6),
        "net3",
        &serves(&["elsewhere.default.svc.cluster.local"]),
    );
    y += "services:\n";
    y += &service("echo", ECHO, ip(net, 100), &["net2"], "");
    y += &service(
        "down",
        "down.default.svc.cluster.local",
        ip(net, 101),
        &["net2"],
        "",
    );
    y += &service(
        "elsewhere",
        "elsewhere.default.svc.cluster.local",
        ip(net, 102),
        &["net3"],
        "",
    );
    y
}

/// A gateway running in this process, stopped when dropped.
struct TestGateway {
    net: [u8; 2],
    addr: SocketAddr,
    ca: Arc<BuiltinCa>,
    _shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestGateway {
    /// An HBONE connection to the gateway with the client's certificate, the gateway's identity checked.
    async fn client(&self) -> h2::client::SendRequest<Bytes> {
        let cert = self.ca.fetch(&id(CLIENT_ID)).await.unwrap();
        hbone_client(cert, id(GATEWAY_ID), self.addr).await.unwrap()
    }
}

/// A gateway on a loopback net of its own, and an HBONE client connected to it.
async fn gateway_and_client() -> (TestGateway, h2::client::SendRequest<Bytes>) {
    let gw = start_gateway(loopback_net()).await;
    let c = gw.client().await;
    (gw, c)
}

async fn start_gateway(net: [u8; 2]) -> TestGateway {
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let env: HashMap<&str, &str> = [
        ("POD_NAMESPACE", "istio-system"),
        ("NETWORK", "net2"),
        ("XDS_ADDRESS", ""),
    ]
    .into_iter()
    .collect();
    let cfg = Arc::new(GatewayConfig::from_source(&env).unwrap());
    let st = LocalConfig::parse(&gateway_mesh(net))
        .unwrap()
        .into_state()
        .unwrap();
    let (_, state) = StateHandle::new(st);
    let certs = CertManager::new(ca.clone());
    let (shutdown_tx, shutdown) = watch::channel(false);
    let gateway = Gateway::new(cfg, state, &certs, shutdown).await.unwrap();
    let listener = TcpListener::bind(SocketAddr::new(ip(net, 1), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(gateway.serve(listener));
    TestGateway {
        net,
        addr,
        ca,
        _shutdown: shutdown_tx,
        task,
    }
}

#[tokio::test]
async fn the_gateway_answers_400_to_anything_but_connect_to_a_service_hostname_and_port() {
    let (log, _guard) = AccessLines::capture();
    let (gw, mut c) = gateway_and_client().await;
    let net = gw.net;

    // Not CONNECT.
    let get = http::Request::builder()
        .method("GET")
        .uri(format!("http://{ECHO}:80/"))
        .body(())
        .unwrap();
    assert_eq!(status_of(&mut c, get).await.unwrap(), 400);
    log.line_with(&["stream refused (answered 400)", "method GET is not CONNECT"])
        .await;

    // An address, not a service: a gateway never dials what a client names.
    let vip = SocketAddr::new(ip(net, 100), 80).to_string();
    assert_eq!(status_of(&mut c, connect(&vip)).await.unwrap(), 400);
    log.line_with(&[
        "stream refused (answered 400)",
        &vip,
        "routes by service hostname, not to an address",
    ])
    .await;

    // A hostname without a port.
    assert_eq!(status_of(&mut c, connect(ECHO)).await.unwrap(), 400);
    log.line_with(&["stream refused (answered 400)", "is not hostname:port"])
        .await;
    assert_eq!(
        status_of(&mut c, connect(&format!("{ECHO}:http")))
            .await
            .unwrap(),
        400
    );
}

#[tokio::test]
async fn the_gateway_answers_503_for_a_service_it_cannot_reach_on_its_network() {
    let (log, _guard) = AccessLines::capture();
    let (gw, mut c) = gateway_and_client().await;
    let net = gw.net;

    // Unknown to the client's namespace.
    let unknown = "nosuch.default.svc.cluster.local:80";
    assert_eq!(status_of(&mut c, connect(unknown)).await.unwrap(), 503);
    let line = log
        .line_with(&["stream refused (answered 503)", unknown])
        .await;
    assert!(
        line.contains("no service nosuch.default.svc.cluster.local visible to namespace default"),
        "{line}"
    );
    assert!(line.contains(CLIENT_ID), "the client is named: {line}");

    // Its only endpoint is on another network than the gateway's.
    let elsewhere = "elsewhere.default.svc.cluster.local:80";
    assert_eq!(status_of(&mut c, connect(elsewhere)).await.unwrap(), 503);
    log.line_with(&[
        "stream refused (answered 503)",
        elsewhere,
        "has no healthy HBONE endpoint for port 80 on network",
    ])
    .await;

    // Its endpoint on this network does not answer.
    let down = "down.default.svc.cluster.local:80";
    assert_eq!(status_of(&mut c, connect(down)).await.unwrap(), 503);
    let unreachable = SocketAddr::new(ip(net, 5), 15008).to_string();
    log.line_with(&[
        "stream refused (answered 503)",
        down,
        &format!("connecting to {unreachable}"),
    ])
    .await;

    // The control: a reachable endpoint is connected, and the bytes cross.
    echo_server(SocketAddr::new(ip(net, 3), 15008)).await;
    let mut t = support::l7::tunnel(&c, &format!("{ECHO}:80"))
        .await
        .expect("a reachable endpoint is answered 200");
    t.write_all(b"hello").await.unwrap();
    t.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("peer="), "{out}");
    assert!(out.ends_with("hello"), "{out}");
    log.line_with(&["connection complete", "dst.workload=server"])
        .await;
}

#[tokio::test]
async fn a_service_on_another_network_whose_hostname_is_no_authority_is_refused_before_the_gateway()
{
    let (log, _guard) = AccessLines::capture();
    let net = loopback_net();
    let ca = Arc::new(BuiltinCa::ephemeral(TTL).unwrap());
    let bad = "bad host.default.svc.cluster.local";
    let gw_ip = ip(net, 30);
    let mut y = String::from("workloads:\n");
    y += &workload("client", "default", "sleep", ip(net, 2), "net1", "");
    y += &workload(
        "far",
        "default",
        "httpbin",
        ip(net, 20),
        "net2",
        &(behind_gateway("net2", gw_ip) + &serves(&[bad])),
    );
    y += &workload(
        "ew-gateway",
        "default",
        "istio-eastwestgateway",
        gw_ip,
        "net2",
        "",
    );
    y += "services:\n";
    y += &service("bad", bad, ip(net, 100), &["net1"], "");
    // A listener at the gateway's address that would show a dial: a connection the proxy made is in its
    // accept queue as soon as the proxy's connect returns, whether or not anyone accepted it yet.
    let gateway = TcpListener::bind(SocketAddr::new(gw_ip, 15008))
        .await
        .unwrap();
    let proxy = start_proxy(
        ca,
        &y,
        "default/client/sleep",
        ip(net, 2),
        &[("NETWORK", "net1")],
    )
    .await;
    let vip = SocketAddr::new(ip(net, 100), 80);
    let entry = capture(&proxy.proxy, ip(net, 2), vip).await;

    let mut app = TcpStream::connect(entry).await.unwrap();
    let _ = app.write_all(b"hello").await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection");
    assert!(
        read.is_err() || out.is_empty(),
        "nothing comes back: {out:?}"
    );
    let line = log
        .line_with(&[
            "cannot be a CONNECT authority",
            "bad host.default.svc.cluster.local:80",
        ])
        .await;
    assert!(
        line.contains(&format!("src.identity=\"{CLIENT_ID}\"")),
        "{line}"
    );
    assert!(line.contains("dst.workload=\"ew-gateway\""), "{line}");
    // Nothing queued at the gateway's address, nor arriving a little later.
    let dial = tokio::time::timeout(Duration::from_millis(300), gateway.accept()).await;
    assert!(
        dial.is_err(),
        "the gateway is never dialled: {:?}",
        dial.map(|a| a.map(|(_, peer)| peer))
    );
}
