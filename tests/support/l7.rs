//! Fixtures for waypoint tests: Address workloads and services built as the xDS client converts them, a
//! waypoint running in this process on a loopback address, an HBONE client that opens tunnels to it and
//! speaks HTTP inside them, and an HTTP backend that counts what it sees.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshnode::config::WaypointConfig;
use meshnode::hbone::pool::Slot;
use meshnode::hbone::tunnel::Tunnel;
use meshnode::identity::{CertManager, CertSource, Identity};
use meshnode::proto::waypoint as pb;
use meshnode::proto::workload as wl;
use meshnode::socket::{self, SocketOpts};
use meshnode::state::{Service, Workload};
use meshnode::waypoint::sniff::{self, Detected};
use meshnode::waypoint::{Snapshot, Waypoint, WaypointInputs, WaypointMetrics};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// An Address workload, converted as the xDS client converts it. `services`: `(ns/hostname, port, target)`.
pub fn workload(
    name: &str,
    sa: &str,
    ip: IpAddr,
    hbone: bool,
    services: &[(&str, u32, u32)],
) -> Arc<Workload> {
    match meshnode::xds::convert::address(
        &uid(name),
        workload_address(name, sa, ip, hbone, services),
    )
    .unwrap()
    {
        meshnode::xds::convert::Address::Workload(w) => w,
        _ => unreachable!(),
    }
}

/// The `istio.workload.Address` of [`workload`], as a control plane sends it (resource name: [`uid`]).
pub fn workload_address(
    name: &str,
    sa: &str,
    ip: IpAddr,
    hbone: bool,
    services: &[(&str, u32, u32)],
) -> wl::Address {
    let mut svc: HashMap<String, wl::PortList> = HashMap::new();
    for (key, port, target) in services {
        svc.entry(key.to_string())
            .or_default()
            .ports
            .push(wl::Port {
                service_port: *port,
                target_port: *target,
                ..Default::default()
            });
    }
    let w = wl::Workload {
        uid: uid(name),
        name: name.into(),
        namespace: "default".into(),
        service_account: sa.into(),
        addresses: vec![octets(ip)],
        tunnel_protocol: if hbone {
            wl::TunnelProtocol::Hbone as i32
        } else {
            wl::TunnelProtocol::None as i32
        },
        services: svc,
        canonical_name: name.into(),
        canonical_revision: "v1".into(),
        workload_name: name.into(),
        ..Default::default()
    };
    wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
}

/// The uid of test workload `name`.
pub fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// An Address service `name` in `default` with VIP `vip` and `(port, target)` pairs.
pub fn service(name: &str, vip: IpAddr, ports: &[(u32, u32)]) -> Arc<Service> {
    let key = format!("default/{}", hostname(name));
    match meshnode::xds::convert::address(&key, service_address(name, vip, ports)).unwrap() {
        meshnode::xds::convert::Address::Service(s) => s,
        _ => unreachable!(),
    }
}

/// The `istio.workload.Address` of [`service`] (resource name: `default/<hostname>`).
pub fn service_address(name: &str, vip: IpAddr, ports: &[(u32, u32)]) -> wl::Address {
    let s = wl::Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: hostname(name),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: octets(vip),
            ..Default::default()
        }],
        ports: ports
            .iter()
            .map(|(p, t)| wl::Port {
                service_port: *p,
                target_port: *t,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    wl::Address {
        r#type: Some(wl::address::Type::Service(s)),
    }
}

/// `name.default.svc.cluster.local`.
pub fn hostname(name: &str) -> String {
    format!("{name}.default.svc.cluster.local")
}

/// A waypoint Service port with one cluster `<name>-<port>` of `endpoints` (workload names).
pub fn port(
    protocol: pb::Protocol,
    svc: &str,
    port: u32,
    endpoints: &[&str],
) -> (pb::Port, pb::Cluster) {
    let cluster = format!("{svc}-{port}");
    (
        pb::Port {
            port,
            protocol: protocol as i32,
            default_cluster: cluster.clone(),
            ..Default::default()
        },
        pb::Cluster {
            name: cluster,
            service_hostname: hostname(svc),
            port,
            endpoints: endpoints.iter().map(|e| uid(e)).collect(),
            ..Default::default()
        },
    )
}

/// A waypoint Service `name` in `default` with these ports and clusters.
pub fn bound_service(name: &str, ports: Vec<(pb::Port, pb::Cluster)>) -> pb::Service {
    let (ports, clusters) = ports.into_iter().unzip();
    pb::Service {
        hostname: hostname(name),
        namespace: "default".into(),
        name: name.into(),
        ports,
        clusters,
        ..Default::default()
    }
}

/// The Waypoint resource `default/waypoint`.
pub fn waypoint_resource(services: Vec<pb::Service>, workloads: &[&str]) -> pb::Waypoint {
    pb::Waypoint {
        namespace: "default".into(),
        name: "waypoint".into(),
        traffic_type: pb::TrafficType::All as i32,
        services,
        workloads: workloads.iter().map(|w| uid(w)).collect(),
        policies: Vec::new(),
        xfcc_include_client_identity: false,
    }
}

/// A waypoint running in this process.
pub struct TestWaypoint {
    pub waypoint: Arc<Waypoint>,
    pub addr: SocketAddr,
    pub config: watch::Sender<Arc<Snapshot>>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestWaypoint {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

/// The waypoint `default/waypoint` (service account `waypoint`) with `extra` variables.
pub fn waypoint_config(extra: &[(&str, &str)]) -> WaypointConfig {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("POD_NAMESPACE".into(), "default".into());
    env.insert("SERVICE_ACCOUNT".into(), "waypoint".into());
    env.insert("XDS_ADDRESS".into(), String::new());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    WaypointConfig::from_source(&env).unwrap()
}

/// Starts a waypoint on `bind:15008` serving `snapshot`.
pub async fn start_waypoint(
    ca: Arc<dyn CertSource>,
    bind: IpAddr,
    snapshot: Snapshot,
    extra: &[(&str, &str)],
) -> TestWaypoint {
    let cfg = Arc::new(waypoint_config(extra));
    let (config, rx) = watch::channel(Arc::new(snapshot));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let waypoint = Waypoint::new(
        WaypointInputs {
            cfg: cfg.clone(),
            config: rx,
            certs: CertManager::new(ca),
            metrics: Arc::new(WaypointMetrics::new()),
        },
        shutdown_rx,
    )
    .await
    .unwrap();
    let listener = socket::listen(
        SocketAddr::new(bind, cfg.ports.hbone),
        SocketOpts::default(),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(waypoint.clone().serve(listener));
    TestWaypoint {
        waypoint,
        addr,
        config,
        shutdown,
        task,
    }
}

/// The identity of the test waypoint.
pub fn waypoint_id() -> Identity {
    "spiffe://cluster.local/ns/default/sa/waypoint"
        .parse()
        .unwrap()
}

/// Opens a CONNECT tunnel for `authority` on an HBONE client connection; the status when refused.
pub async fn tunnel(
    send: &h2::client::SendRequest<Bytes>,
    authority: &str,
) -> Result<Tunnel, http::StatusCode> {
    let mut s = send.clone().ready().await.expect("HBONE connection usable");
    let (resp, up) = s
        .send_request(super::connect(authority), false)
        .expect("CONNECT sent");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("CONNECT answered in time")
        .expect("CONNECT answered");
    if resp.status() != http::StatusCode::OK {
        return Err(resp.status());
    }
    Ok(Tunnel::new(up, resp.into_body(), Slot::unpooled()))
}

/// An HTTP/1.1 client inside `tunnel`.
pub async fn http1(tunnel: Tunnel) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// An HTTP/2 client inside `tunnel`.
pub async fn http2(tunnel: Tunnel) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tunnel))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A GET request for `uri` with `host`.
pub fn get(uri: &str, host: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(uri)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Status and body of a response.
pub async fn read(resp: http::Response<Incoming>) -> (http::StatusCode, String) {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub host: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

/// An HTTP backend (HTTP/1.1 or HTTP/2, by the client's preface): answers `200 hello from <name>` (or
/// `503` for the first `fail_first` requests) and counts connections and requests.
pub struct Backend {
    pub name: String,
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub fail_first: AtomicU32,
    /// Milliseconds to wait before answering.
    pub delay_ms: AtomicU64,
    /// While set, each request waits for a permit of `release` before it is answered.
    pub hold: std::sync::atomic::AtomicBool,
    pub release: tokio::sync::Semaphore,
    pub seen: Mutex<Vec<Seen>>,
    /// Woken at every request.
    pub notify: tokio::sync::Notify,
}

impl Backend {
    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Starts a backend on `addr`.
pub async fn backend(name: &str, addr: SocketAddr) -> Arc<Backend> {
    let l = TcpListener::bind(addr).await.unwrap();
    let b = Arc::new(Backend {
        name: name.to_string(),
        connections: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        fail_first: AtomicU32::new(0),
        delay_ms: AtomicU64::new(0),
        hold: std::sync::atomic::AtomicBool::new(false),
        release: tokio::sync::Semaphore::new(0),
        seen: Mutex::new(Vec::new()),
        notify: tokio::sync::Notify::new(),
    });
    let me = b.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            me.connections.fetch_add(1, Ordering::SeqCst);
            let me = me.clone();
            tokio::spawn(async move {
                let Ok((detected, io)) = sniff::detect(s, true, Duration::from_secs(10)).await
                else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let me = me.clone();
                    async move {
                        let host = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers()
                                    .get(http::header::HOST)
                                    .map(|h| h.to_str().unwrap_or("").to_string())
                            })
                            .unwrap_or_default();
                        me.seen.lock().push(Seen {
                            method: req.method().to_string(),
                            path: req.uri().path().to_string(),
                            host,
                            version: req.version(),
                            headers: req.headers().clone(),
                        });
                        let _ = req.into_body().collect().await;
                        me.requests.fetch_add(1, Ordering::SeqCst);
                        me.notify.notify_waiters();
                        if me.hold.load(Ordering::SeqCst) {
                            if let Ok(p) = me.release.acquire().await {
                                p.forget();
                            }
                        }
                        let delay = me.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let failing = me
                            .fail_first
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let (status, body) = if failing {
                            (503, "backend failing on purpose".to_string())
                        } else {
                            (200, format!("hello from {}", me.name))
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let io = TokioIo::new(io);
                let _ = match detected {
                    Detected::Http2 => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    }
                    _ => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    }
                };
            });
        }
    });
    b
}
