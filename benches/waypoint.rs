//! Waypoint benchmark: what the L7 hop costs compared with the same request over L4 only, measured in one
//! run (issue 12, "Performance").
//!
//! Job: set up over loopback the chain the end-to-end test
//! `the_control_planes_waypoint_serves_the_namespaces_http_with_its_policy` (`tests/waypoint.rs`) builds —
//! `meshnode::control_plane::run` from a mesh file, a client and a server node proxy in dedicated mode
//! (`app::run_proxy`, configured over xDS, certificates from the control plane's CA) and
//! `app::run_waypoint` — plus an application beside the server workload that answers every request with a
//! 1 KiB body: HTTP/1.1 on :8080, HTTP/2 with prior knowledge (h2c) on :8081. The mesh file gives that one
//! workload four services: `wp-h1` and `wp-h2` bound to the waypoint by their namespace's
//! `istio.io/use-waypoint`, `l4-h1` and `l4-h2` opting out with the service label
//! `istio.io/use-waypoint: none`; the `-h1` ports declare `appProtocol: http` (the waypoint speaks
//! HTTP/1.1 upstream), the `-h2` ports `appProtocol: http2` (HTTP/2 upstream; an `http` port would be
//! re-originated as HTTP/1.1 even for an HTTP/2 client). So the two mesh paths differ only by the waypoint:
//!
//! | path | route of a request |
//! |---|---|
//! | no mesh | client → app |
//! | L4 | client → client proxy → HBONE (mTLS + HTTP/2 CONNECT) → server proxy → app |
//! | waypoint | client → client proxy → HBONE → waypoint (HTTP served, authorized, routed, re-originated on its own pooled HTTP connections over HBONE) → server proxy → app |
//!
//! The client reaches the client proxy as captured traffic would: its outbound listener is bound to
//! `0.0.0.0` on a port the kernel picks, and every service port is that port, so a connection to any VIP
//! lands on that listener with the VIP as its local address (what `SO_ORIGINAL_DST` gives after capture).
//! The end-to-end test binds the listener on its one VIP; here four VIPs share it. A kernel-picked port
//! cannot collide with anything else on the machine.
//!
//! | measurement | what the client does (every response checked: status 200 and a 1 KiB body) |
//! |---|---|
//! | HTTP/1.1 latency | one keep-alive connection, `BENCH_RR_ITERATIONS` sequential GETs after a 10 % warm-up; p50 and p99 |
//! | HTTP/1.1 requests/s | `BENCH_CONCURRENCY` keep-alive connections, each sending GETs back to back for `BENCH_SECONDS` |
//! | HTTP/2 latency | one connection, sequential GETs, as above |
//! | HTTP/2 requests/s | one connection, `BENCH_CONCURRENCY` streams at a time |
//! | waypoint memory | `BENCH_WAYPOINT_CONNECTIONS` keep-alive HTTP/1.1 connections through the client proxy to `wp-h1`, each proven by one GET, held; the waypoint's VmRSS before and after; then all of them send one GET at once and the answers are counted |
//!
//! The memory measurement runs the waypoint as `meshnode waypoint` (the binary, `CARGO_BIN_EXE_meshnode`)
//! so that its RSS is its own. That binary binds the wildcard address on 15008/15020/15021, which would
//! collide with the node proxies' `<ip>:15008` listeners (and, on a shared machine, with every test's), so
//! this measurement runs in two network namespaces of its own joined by a veth: this benchmark re-executed
//! (as a child, `WAYPOINT_BENCH_MEMORY_CHILD`) runs the control plane, both node proxies, the app and the
//! client in one (`10.200.0.1` client and control plane, `10.200.0.3` server, VIPs on its loopback); the
//! waypoint process runs alone in the other (`10.200.0.9`). It needs root; without it the memory row is
//! left out (skipped, or a failure under `MESHNODE_TEST_STRICT`).
//!
//! Inputs (environment variables; defaults in brackets):
//! * `BENCH_SECONDS` [3]: duration of each requests/s run, per path (in total over the rounds).
//! * `BENCH_RR_ITERATIONS` [5000]: sequential requests measured per path and protocol (plus 10 % warm-up
//!   in each round).
//! * `BENCH_CONCURRENCY` [16]: connections (HTTP/1.1) or streams (HTTP/2) of the requests/s runs.
//! * `BENCH_WAYPOINT_CONNECTIONS` [1000]: client connections held for the memory measurement.
//! * `BENCH_PROXY_THREADS` [2]: worker threads of the runtime both node proxies share (the proxy's default).
//! * `BENCH_WAYPOINT_THREADS` [2]: worker threads of the waypoint's runtime (`ZTUNNEL_WORKER_THREADS` of the
//!   waypoint process).
//! * `BENCH_LOAD_THREADS` [2]: worker threads of the runtime running the client, the app and the control plane.
//! * `BENCH_ROUNDS` [3]: the runs are split into this many rounds, the paths alternating (order reversed
//!   each round); totals and percentiles cover all rounds.
//!
//! A CI smoke run: `BENCH_SECONDS=0.3 BENCH_RR_ITERATIONS=300 BENCH_WAYPOINT_CONNECTIONS=100 cargo bench --bench waypoint`.
//!
//! Output (stdout): one line naming the machine and the settings, a Markdown table (measure, no mesh, L4,
//! waypoint, waypoint / L4, waypoint − L4) ready for the README's performance section, then notes.
//! Progress goes to stderr.
//!
//! Reading it: the absolute figures depend on the machine and whatever else runs on it, the ratios much
//! less, as all paths run back to back in one process. The client, the app, both node proxies and the
//! waypoint share the machine's cores, so on a small machine the waypoint path also pays for the
//! waypoint's CPU time in the requests/s runs. No tracing subscriber is installed in this process, so
//! access logs cost (almost) nothing; the waypoint process logs at `warn`.

#[path = "../tests/support/mod.rs"]
mod support;

use support::bench::{env_or, machine, percentile, raise_fd_limit, rss_kib, runtime};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshnode::proxy::Listeners;
use meshnode::socket::SocketOpts;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// Size of every response body.
const BODY_LEN: usize = 1024;
static BODY: [u8; BODY_LEN] = [b'w'; BODY_LEN];
/// The app's HTTP/1.1 port.
const APP_H1_PORT: u16 = 8080;
/// The app's HTTP/2 (prior knowledge) port.
const APP_H2_PORT: u16 = 8081;
/// Set (to the waypoint's network namespace) in the child process that measures the waypoint's memory.
const CHILD_VAR: &str = "WAYPOINT_BENCH_MEMORY_CHILD";
/// How long set-up may take (certificates, xDS, first requests) before the run is declared broken.
const SET_UP_WITHIN: Duration = Duration::from_secs(60);
/// The memory measurement's addresses, inside its own network namespaces.
const NS_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const NS_WAYPOINT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 9);

struct Settings {
    seconds: f64,
    rr_iterations: usize,
    concurrency: usize,
    waypoint_connections: usize,
    proxy_threads: usize,
    waypoint_threads: usize,
    load_threads: usize,
    rounds: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            seconds: env_or("BENCH_SECONDS", 3.0),
            rr_iterations: env_or("BENCH_RR_ITERATIONS", 5_000usize).max(1),
            concurrency: env_or("BENCH_CONCURRENCY", 16usize).max(1),
            waypoint_connections: env_or("BENCH_WAYPOINT_CONNECTIONS", 1_000usize).max(1),
            proxy_threads: env_or("BENCH_PROXY_THREADS", 2usize).max(1),
            waypoint_threads: env_or("BENCH_WAYPOINT_THREADS", 2usize).max(1),
            load_threads: env_or("BENCH_LOAD_THREADS", 2usize).max(1),
            rounds: env_or("BENCH_ROUNDS", 3usize).max(1),
        }
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.max(0.01))
    }
}

/// The three ways a request goes (index into the result arrays).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    NoMesh = 0,
    L4 = 1,
    Waypoint = 2,
}

const VIAS: [Via; 3] = [Via::NoMesh, Via::L4, Via::Waypoint];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1 = 0,
    H2 = 1,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

/// Where each piece of the mesh sits.
struct Addrs {
    client: IpAddr,
    server: IpAddr,
    waypoint: IpAddr,
    control_plane: IpAddr,
    /// VIPs of `wp-h1`, `wp-h2`, `l4-h1`, `l4-h2`.
    vips: [IpAddr; 4],
}

impl Addrs {
    /// This process's own loopback /24, as the tests use.
    fn loopback() -> Addrs {
        let net = support::loopback_net();
        let ip = |h| support::ip(net, h);
        Addrs {
            client: ip(1),
            server: ip(3),
            waypoint: ip(9),
            control_plane: ip(10),
            vips: [ip(20), ip(21), ip(22), ip(23)],
        }
    }

    /// Inside the memory measurement's network namespaces.
    fn namespaces() -> Addrs {
        let vip = |h| IpAddr::V4(Ipv4Addr::new(127, 0, 0, h));
        Addrs {
            client: NS_CLIENT.into(),
            server: NS_SERVER.into(),
            waypoint: NS_WAYPOINT.into(),
            control_plane: NS_CLIENT.into(),
            vips: [vip(20), vip(21), vip(22), vip(23)],
        }
    }
}

/// The mesh file: one namespace using the waypoint, the client, the server and the waypoint's instance,
/// four services of the server (two opting out of the waypoint), the waypoint Gateway and the tokens.
fn mesh_yaml(a: &Addrs, port: u16) -> String {
    let service = |name: &str, vip: IpAddr, target: u16, proto: &str, opt_out: bool| {
        let labels = if opt_out {
            ", labels: {istio.io/use-waypoint: none}"
        } else {
            ""
        };
        format!(
            "- {{name: {name}, namespace: default, vips: [{vip}], ports: [{{port: {port}, targetPort: {target}, \
             appProtocol: {proto}}}], selector: {{app: server}}{labels}}}\n"
        )
    };
    format!(
        r#"namespaces:
  default: {{labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}
workloads:
- {{name: client, namespace: default, serviceAccount: client, ips: [{c}], node: node-1}}
- {{name: server, namespace: default, serviceAccount: server, ips: [{s}], node: node-1, labels: {{app: server}}}}
- {{name: waypoint-0, namespace: default, serviceAccount: waypoint, ips: [{w}], node: node-1, labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}}}
services:
{s1}{s2}{s3}{s4}istio:
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {{name: waypoint, namespace: default}}
  spec:
    gatewayClassName: istio-waypoint
    listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
tokens:
- {{token: bench-client-token, nodeProxy: true, node: node-1, namespace: default, serviceAccount: client}}
- {{token: bench-server-token, nodeProxy: true, node: node-1, namespace: default, serviceAccount: server}}
- {{token: bench-waypoint-token, namespace: default, serviceAccount: waypoint}}
"#,
        c = a.client,
        s = a.server,
        w = a.waypoint,
        s1 = service("wp-h1", a.vips[0], APP_H1_PORT, "http", false),
        s2 = service("wp-h2", a.vips[1], APP_H2_PORT, "http2", false),
        s3 = service("l4-h1", a.vips[2], APP_H1_PORT, "http", true),
        s4 = service("l4-h2", a.vips[3], APP_H2_PORT, "http2", true),
    )
}

/// What a client dials for one path and protocol, and the request it sends.
struct Target {
    addr: SocketAddr,
    /// `Host` (HTTP/1.1) and `:authority` (HTTP/2).
    host: String,
    proto: Proto,
    /// Requests answered correctly so far (warm-up included): what the waypoint's own count is checked
    /// against.
    answered: AtomicU64,
    /// Responses with another status (only tolerated during the warm-up, which retries).
    refused: AtomicU64,
}

impl Target {
    fn request(&self) -> http::Request<Empty<Bytes>> {
        let b = match self.proto {
            Proto::H1 => http::Request::get("/bench").header(http::header::HOST, &self.host),
            Proto::H2 => http::Request::get(format!("http://{}/bench", self.host)),
        };
        b.body(Empty::new()).expect("a valid request")
    }
}

/// One client connection.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    async fn open(t: &Target) -> Result<Client, String> {
        let s = TcpStream::connect(t.addr)
            .await
            .map_err(|e| format!("connecting to {}: {e}", t.addr))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let io = TokioIo::new(s);
        Ok(match t.proto {
            Proto::H1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
                tokio::spawn(conn);
                Client::H1(send)
            }
            Proto::H2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                tokio::spawn(conn);
                Client::H2(send)
            }
        })
    }

    /// Another handle on the same connection (HTTP/2 only: one more stream at a time).
    fn stream(&self) -> Client {
        match self {
            Client::H2(s) => Client::H2(s.clone()),
            Client::H1(_) => unreachable!("an HTTP/1.1 connection carries one request at a time"),
        }
    }

    /// One GET; `Ok` only for status 200 with the whole 1 KiB body.
    async fn get(&mut self, t: &Target) -> Result<(), String> {
        let req = t.request();
        let resp = match self {
            Client::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
            Client::H2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
        }
        .map_err(|e| format!("request to {}: {e}", t.host))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body from {}: {e}", t.host))?
            .to_bytes();
        if status != http::StatusCode::OK {
            t.refused.fetch_add(1, Ordering::Relaxed);
        }
        if status != http::StatusCode::OK || body.len() != BODY_LEN {
            return Err(format!(
                "{} answered {status} with {} body bytes: {:?}",
                t.host,
                body.len(),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        t.answered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The app: every request gets `200` and [`BODY`].
async fn app(addr: SocketAddr, proto: Proto) {
    let l = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("binding the app on {addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let s = match l.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // A transient error (EMFILE, ECONNABORTED) must not end the app.
                    eprintln!("app: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(&BODY),
                    )))
                });
                let io = TokioIo::new(s);
                let _ = match proto {
                    Proto::H1 => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    }
                    Proto::H2 => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    }
                };
            });
        }
    });
}

fn listen(addr: SocketAddr) -> TcpListener {
    meshnode::socket::listen(addr, SocketOpts::default())
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"))
}

/// The environment a mesh member gets to reach the control plane (as the end-to-end test passes it).
fn mesh_env(address: &str, root: &Path, token: &str) -> Vec<(String, String)> {
    let root = root.to_str().expect("a UTF-8 temporary path").to_string();
    vec![
        ("XDS_ADDRESS".into(), address.into()),
        ("CA_ADDRESS".into(), address.into()),
        ("XDS_ROOT_CA".into(), root.clone()),
        ("CA_ROOT_CA".into(), root),
        ("AUTH_TOKEN".into(), token.into()),
    ]
}

/// The waypoint's own variables besides [`mesh_env`].
fn waypoint_env(ip: IpAddr) -> Vec<(String, String)> {
    vec![
        ("POD_NAMESPACE".into(), "default".into()),
        ("POD_NAME".into(), "waypoint-0".into()),
        ("SERVICE_ACCOUNT".into(), "waypoint".into()),
        ("INSTANCE_IP".into(), ip.to_string()),
        ("TRUST_DOMAIN".into(), "cluster.local".into()),
    ]
}

/// Waits until `GET /healthz/ready` on `addr` answers 200.
async fn until_ready(addr: SocketAddr, what: &str, log: Option<&Path>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + SET_UP_WITHIN;
    loop {
        let mut answer = String::new();
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s
                .write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let _ =
                tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut answer)).await;
        }
        if answer.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready at {addr} after {SET_UP_WITHIN:?}: {answer:?}{}",
            log.map(|p| format!(
                "\nits log:\n{}",
                std::fs::read_to_string(p).unwrap_or_default()
            ))
            .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How the waypoint runs.
enum WaypointRun {
    /// `app::run_waypoint` on a runtime of this process.
    InProcess,
    /// `meshnode waypoint`, a process of its own in this network namespace.
    Process { netns: String },
}

/// The running mesh, the app, and the targets of every path.
struct Bench {
    load_rt: Runtime,
    /// Runs both node proxies (kept for as long as they serve).
    _proxy_rt: Runtime,
    waypoint_rt: Option<Runtime>,
    shutdown: watch::Sender<bool>,
    /// `[via][proto]`.
    targets: Vec<[Arc<Target>; 2]>,
    waypoint_process: Option<support::netns::KillOnDrop>,
    /// The in-process waypoint's metrics listener.
    waypoint_metrics: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new(s: &Settings, a: Addrs, waypoint: WaypointRun) -> Bench {
        let load_rt = runtime("load", s.load_threads);
        let proxy_rt = runtime("proxy", s.proxy_threads);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (stop, shutdown) = watch::channel(false);

        // The client proxy's outbound listener first: its port is every service's port.
        let outbound = {
            let _rt = proxy_rt.enter();
            listen(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0))
        };
        let port = outbound.local_addr().expect("outbound address").port();
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(&mesh, mesh_yaml(&a, port)).expect("writing the mesh file");

        // The control plane.
        let root = dir.path().join("root-cert.pem");
        let cp_listener = {
            let _rt = load_rt.enter();
            listen(SocketAddr::new(a.control_plane, 0))
        };
        let cp = cp_listener.local_addr().expect("control plane address");
        let opts = meshnode::control_plane::RunOptions {
            config: mesh,
            listen: cp,
            ca: meshnode::control_plane::CaChoice::Builtin(dir.path().join("cp-state")),
            tls_files: None,
            root_cert_out: Some(root.clone()),
            drain_deadline: Duration::from_secs(1),
        };
        let mut cp_stop = shutdown.clone();
        load_rt.spawn(async move {
            let stopped = async move {
                let _ = cp_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = meshnode::control_plane::run(opts, cp_listener, stopped).await {
                eprintln!("control plane: {e}");
            }
        });
        let deadline = Instant::now() + SET_UP_WITHIN;
        while !root.exists() {
            assert!(Instant::now() < deadline, "the control plane did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let address = format!("https://{cp}");

        // The app beside the server workload.
        load_rt.block_on(async {
            app(SocketAddr::new(a.server, APP_H1_PORT), Proto::H1).await;
            app(SocketAddr::new(a.server, APP_H2_PORT), Proto::H2).await;
        });

        // The two node proxies (dedicated mode), configured over xDS.
        let mut ready = Vec::new();
        {
            let _rt = proxy_rt.enter();
            let mut outbound = Some(outbound);
            for (workload, token, ip) in [
                ("default/client/client", "bench-client-token", a.client),
                ("default/server/server", "bench-server-token", a.server),
            ] {
                let vars = mesh_env(&address, &root, token);
                let vars: Vec<(&str, &str)> =
                    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let cfg = Arc::new(support::config(workload, &vars));
                let listeners = Listeners {
                    outbound: outbound
                        .take()
                        .unwrap_or_else(|| listen(SocketAddr::new(ip, 0))),
                    inbound: listen(SocketAddr::new(ip, 15008)),
                    inbound_plaintext: listen(SocketAddr::new(ip, 0)),
                };
                let r = listen(SocketAddr::new(ip, 0));
                ready.push((workload.to_string(), r.local_addr().unwrap(), None));
                let shutdown = shutdown.clone();
                proxy_rt.spawn(async move {
                    if let Err(e) =
                        meshnode::app::run_proxy(cfg, Some(listeners), Some(r), shutdown).await
                    {
                        eprintln!("{workload} proxy: {e}");
                    }
                });
            }
        }

        // The waypoint.
        let mut waypoint_rt = None;
        let mut waypoint_process = None;
        let mut waypoint_metrics = None;
        match waypoint {
            WaypointRun::InProcess => {
                let rt = runtime("waypoint", s.waypoint_threads);
                let mut vars = mesh_env(&address, &root, "bench-waypoint-token");
                vars.extend(waypoint_env(a.waypoint));
                let map: std::collections::HashMap<String, String> = vars.into_iter().collect();
                let cfg = Arc::new(
                    meshnode::config::WaypointConfig::from_source(&map)
                        .expect("the waypoint's configuration"),
                );
                let _rt = rt.enter();
                let hbone = listen(SocketAddr::new(a.waypoint, 15008));
                let r = listen(SocketAddr::new(a.waypoint, 0));
                ready.push(("the waypoint".into(), r.local_addr().unwrap(), None));
                let m = listen(SocketAddr::new(a.waypoint, 0));
                waypoint_metrics = Some(m.local_addr().unwrap());
                rt.spawn(async move {
                    if let Err(e) =
                        meshnode::app::run_waypoint(cfg, hbone, Some(r), Some(m), shutdown).await
                    {
                        eprintln!("waypoint: {e}");
                    }
                });
                waypoint_rt = Some(rt);
            }
            WaypointRun::Process { netns } => {
                let log_path = dir.path().join("waypoint.log");
                let log = std::fs::File::create(&log_path).expect("creating the waypoint's log");
                let mut vars = mesh_env(&address, &root, "bench-waypoint-token");
                vars.extend(waypoint_env(a.waypoint));
                vars.push((
                    "ZTUNNEL_WORKER_THREADS".into(),
                    s.waypoint_threads.to_string(),
                ));
                vars.push(("RUST_LOG".into(), "warn".into()));
                let child = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &netns,
                        env!("CARGO_BIN_EXE_meshnode"),
                        "waypoint",
                    ])
                    .env_remove(CHILD_VAR)
                    .envs(vars)
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone().expect("the log file"))
                    .stderr(log)
                    .spawn()
                    .expect("starting meshnode waypoint");
                ready.push((
                    "the waypoint process".into(),
                    SocketAddr::new(a.waypoint, 15021),
                    Some(log_path),
                ));
                waypoint_process = Some(support::netns::KillOnDrop(child));
            }
        }

        let vip = |i: usize| SocketAddr::new(a.vips[i], port);
        let svc = |name: &str| format!("{name}.default.svc.cluster.local");
        let t = |addr, host: String, proto| {
            Arc::new(Target {
                addr,
                host,
                proto,
                answered: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            })
        };
        let targets = vec![
            [
                t(
                    SocketAddr::new(a.server, APP_H1_PORT),
                    "server".into(),
                    Proto::H1,
                ),
                t(
                    SocketAddr::new(a.server, APP_H2_PORT),
                    "server".into(),
                    Proto::H2,
                ),
            ],
            [
                t(vip(2), svc("l4-h1"), Proto::H1),
                t(vip(3), svc("l4-h2"), Proto::H2),
            ],
            [
                t(vip(0), svc("wp-h1"), Proto::H1),
                t(vip(1), svc("wp-h2"), Proto::H2),
            ],
        ];
        let b = Bench {
            load_rt,
            _proxy_rt: proxy_rt,
            waypoint_rt,
            shutdown: stop,
            targets,
            waypoint_process,
            waypoint_metrics,
            _dir: dir,
        };

        // Ready (certificates issued, first xDS configuration), then every path answers: warm-up.
        b.run(async move {
            for (what, addr, log) in ready {
                until_ready(addr, &what, log.as_deref()).await;
            }
        });
        for via in VIAS {
            for proto in [Proto::H1, Proto::H2] {
                let t = b.target(via, proto);
                b.run(async move {
                    let deadline = Instant::now() + SET_UP_WITHIN;
                    loop {
                        let r = async {
                            let mut c = Client::open(&t).await?;
                            for _ in 0..10 {
                                c.get(&t).await?;
                            }
                            Ok::<_, String>(())
                        }
                        .await;
                        match r {
                            Ok(()) => break,
                            Err(e) if Instant::now() > deadline => {
                                panic!("warm-up: {} never answered: {e}", t.host)
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                });
            }
        }
        b
    }

    /// Checks by the waypoint's own `istio_requests_total` that it answered exactly the requests of the
    /// waypoint path, with the statuses the client saw, and none of the L4 path. Returns the count of 200s.
    fn check_waypoint_count(&self) -> u64 {
        let addr = self
            .waypoint_metrics
            .expect("the in-process waypoint's metrics");
        let seen = |count: fn(&Target) -> &AtomicU64| {
            [Proto::H1, Proto::H2]
                .map(|p| count(&self.target(Via::Waypoint, p)).load(Ordering::Relaxed))
                .iter()
                .sum::<u64>()
        };
        let expected = (seen(|t| &t.answered), seen(|t| &t.refused), 0);
        // A response's metric is recorded as its body ends, possibly just after the client read it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.run(fetch(addr, "/metrics"));
            let count = |service: &str, ok: bool| -> u64 {
                text.lines()
                    .filter(|l| l.starts_with("istio_requests_total{"))
                    .filter(|l| {
                        l.contains(&format!(
                            "destination_service=\"{service}.default.svc.cluster.local\""
                        ))
                    })
                    .filter(|l| l.contains("response_code=\"200\"") == ok)
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum()
            };
            let served = count("wp-h1", true) + count("wp-h2", true);
            let other = count("wp-h1", false) + count("wp-h2", false);
            let l4 = count("l4-h1", true)
                + count("l4-h1", false)
                + count("l4-h2", true)
                + count("l4-h2", false);
            if (served, other, l4) == expected || Instant::now() > deadline {
                assert_eq!(
                    (served, other, l4),
                    expected,
                    "the waypoint's count of 200s, other answers and L4-path requests differs from what \
                     the client saw"
                );
                return served;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn target(&self, via: Via, proto: Proto) -> Arc<Target> {
        self.targets[via as usize][proto as usize].clone()
    }

    /// Runs `f` as a task on the load runtime and waits for it.
    fn run<F, T>(&self, f: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.load_rt
            .block_on(self.load_rt.spawn(f))
            .expect("benchmark task panicked")
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.waypoint_process = None;
        // Tasks still running (held connections, drains) are dropped with their runtimes.
        if let Some(rt) = self.waypoint_rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The body of `GET path` on `addr` (HTTP/1.1, one request).
async fn fetch(addr: SocketAddr, path: &str) -> String {
    let t = Target {
        addr,
        host: "metrics".into(),
        proto: Proto::H1,
        answered: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    };
    let Client::H1(mut send) = Client::open(&t).await.unwrap_or_else(|e| panic!("{e}")) else {
        unreachable!("an HTTP/1.1 target")
    };
    let req = http::Request::get(path)
        .header(http::header::HOST, "metrics")
        .body(Empty::new())
        .expect("a valid request");
    let resp = send
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Latencies of `iterations` sequential requests on one connection, after a 10 % warm-up.
async fn latency(t: Arc<Target>, iterations: usize) -> Vec<Duration> {
    let mut c = Client::open(&t).await.unwrap_or_else(|e| panic!("{e}"));
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let start = Instant::now();
        c.get(&t).await.unwrap_or_else(|e| panic!("{e}"));
        if i >= iterations / 10 {
            samples.push(start.elapsed());
        }
    }
    samples
}

/// Requests answered in about `dur` by `concurrency` connections (HTTP/1.1) or streams on one connection
/// (HTTP/2), each sending back to back; and the seconds it took.
async fn rate(t: Arc<Target>, concurrency: usize, dur: Duration) -> (f64, f64) {
    let mut clients = Vec::with_capacity(concurrency);
    match t.proto {
        Proto::H1 => {
            for _ in 0..concurrency {
                clients.push(Client::open(&t).await.unwrap_or_else(|e| panic!("{e}")));
            }
        }
        Proto::H2 => {
            let c = Client::open(&t).await.unwrap_or_else(|e| panic!("{e}"));
            for _ in 1..concurrency {
                clients.push(c.stream());
            }
            clients.push(c);
        }
    }
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in clients {
        let t = t.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.get(&t).await.unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
            n
        });
    }
    let mut total = 0u64;
    while let Some(n) = tasks.join_next().await {
        total += n.expect("a requests/s task panicked");
    }
    (total as f64, start.elapsed().as_secs_f64())
}

/// Established TCP connections in `pid`'s network namespace: (local port 15008, remote port 15008), i.e.
/// HBONE connections into the waypoint and out of it to node proxies.
fn hbone_connections(pid: u32) -> (usize, usize) {
    let (mut inbound, mut outbound) = (0, 0);
    for file in ["tcp", "tcp6"] {
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "01" {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port(f[1]) == Some(15008) {
                inbound += 1;
            }
            if port(f[2]) == Some(15008) {
                outbound += 1;
            }
        }
    }
    (inbound, outbound)
}

/// In the child process (inside the client-side network namespace): the mesh with the waypoint as a
/// process in `waypoint_netns`; opens and holds the connections, prints what the waypoint's RSS did.
fn memory_child(waypoint_netns: &str, s: &Settings) {
    let b = Bench::new(
        s,
        Addrs::namespaces(),
        WaypointRun::Process {
            netns: waypoint_netns.to_string(),
        },
    );
    let pid = b
        .waypoint_process
        .as_ref()
        .expect("the waypoint process")
        .0
        .id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "meshnode", "pid {pid} is not the waypoint");
    let t = b.target(Via::Waypoint, Proto::H1);
    let n = s.waypoint_connections;
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(&pid.to_string());
    let (before_in, _) = hbone_connections(pid);
    let held = b.run(async move {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = Client::open(&t).await.unwrap_or_else(|e| panic!("{e}"));
            c.get(&t).await.unwrap_or_else(|e| panic!("{e}"));
            held.push(c);
        }
        held
    });
    // Let every task the connections started reach its idle state.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(&pid.to_string());
    let (hbone_in, hbone_up) = hbone_connections(pid);
    // Then every held connection sends one request at once; each answer is checked and counted.
    let t = b.target(Via::Waypoint, Proto::H1);
    let (held, answered) = b.run(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for mut c in held {
            let t = t.clone();
            tasks.spawn(async move {
                let ok = tokio::time::timeout(Duration::from_secs(30), c.get(&t)).await;
                (c, matches!(ok, Ok(Ok(()))))
            });
        }
        let (mut held, mut answered) = (Vec::new(), 0usize);
        while let Some(Ok((c, ok))) = tasks.join_next().await {
            answered += usize::from(ok);
            held.push(c);
        }
        (held, answered)
    });
    let peak = rss_kib(&pid.to_string());
    let (_, burst_up) = hbone_connections(pid);
    println!(
        "before_kib={before} after_kib={after} burst_kib={peak} connections={n} answered_at_once={answered} \
         hbone_in_before={before_in} hbone_in={hbone_in} hbone_up={hbone_up} hbone_up_burst={burst_up}"
    );
    drop(held);
}

struct Memory {
    connections: f64,
    before_mib: f64,
    after_mib: f64,
    burst_mib: f64,
    kib_per_conn: f64,
    answered_at_once: usize,
    hbone_in: usize,
    hbone_up: usize,
    hbone_up_burst: usize,
}

/// Runs [`memory_child`] in network namespaces of its own (it reads the same settings from the environment
/// it inherits); `None` without root (skipped).
fn memory() -> Option<Memory> {
    if !meshnode::test_gate::needs_root("waypoint bench, waypoint memory") {
        return None;
    }
    let client_ns = support::netns::Netns::new("wbc");
    let waypoint_ns = support::netns::Netns::new("wbw");
    let (client_if, _) = support::netns::veth(
        &client_ns,
        &format!("{NS_CLIENT}/24"),
        &waypoint_ns,
        &format!("{NS_WAYPOINT}/24"),
    );
    client_ns.ip(&["addr", "add", &format!("{NS_SERVER}/24"), "dev", &client_if]);
    let exe = std::env::current_exe().expect("locating this benchmark's binary");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &client_ns.name])
        .arg(exe)
        .env(CHILD_VAR, &waypoint_ns.name)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running the memory child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "memory child failed: {}; output {stdout:?}",
        out.status
    );
    let field = |name: &str| -> f64 {
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in memory child output {stdout:?}"))
    };
    let connections = field("connections");
    Some(Memory {
        connections,
        before_mib: field("before_kib") / 1024.0,
        after_mib: field("after_kib") / 1024.0,
        burst_mib: field("burst_kib") / 1024.0,
        kib_per_conn: (field("after_kib") - field("before_kib")) / connections,
        answered_at_once: field("answered_at_once") as usize,
        hbone_in: field("hbone_in") as usize,
        hbone_up: field("hbone_up") as usize,
        hbone_up_burst: field("hbone_up_burst") as usize,
    })
}

fn main() {
    raise_fd_limit();
    let s = Settings::from_env();
    if let Ok(netns) = std::env::var(CHILD_VAR) {
        memory_child(&netns, &s);
        return;
    }
    let started = Instant::now();
    eprintln!("setting up: control plane, two node proxies, the waypoint, the app...");
    let b = Bench::new(&s, Addrs::loopback(), WaypointRun::InProcess);

    // The paths alternate in short rounds (the order reversed each round), so a burst of noise from the
    // machine's other tenants hits all of them alike instead of only one.
    let rounds = s.rounds;
    let slice = s.duration() / rounds as u32;
    let rr_per_round = s.rr_iterations.div_ceil(rounds);
    // [proto][via]: latency samples; requests and seconds.
    let mut rr: [[Vec<Duration>; 3]; 2] = Default::default();
    let mut rps = [[(0.0, 0.0); 3]; 2];
    for round in 0..rounds {
        eprintln!(
            "round {}/{rounds}: {rr_per_round} sequential requests and {:.2} s of requests/s per path and protocol...",
            round + 1,
            slice.as_secs_f64()
        );
        let mut order = VIAS;
        if round % 2 == 1 {
            order.reverse();
        }
        for proto in [Proto::H1, Proto::H2] {
            for &via in &order {
                let samples = b.run(latency(b.target(via, proto), rr_per_round));
                rr[proto as usize][via as usize].extend(samples);
            }
            for &via in &order {
                let (n, secs) = b.run(rate(b.target(via, proto), s.concurrency, slice));
                let acc = &mut rps[proto as usize][via as usize];
                acc.0 += n;
                acc.1 += secs;
            }
        }
    }
    let waypoint_served = b.check_waypoint_count();
    drop(b);

    eprintln!(
        "waypoint memory: {} held connections, the waypoint as its own process...",
        s.waypoint_connections
    );
    let mem = memory();

    println!(
        "machine: {}; node proxies share a {}-worker tokio runtime, the waypoint has a {}-worker one, client, app \
         and control plane a {}-worker one; loopback, one process; {} s of requests/s and {} sequential requests \
         per path and protocol, in {} rounds; {} connections or streams for requests/s",
        machine(),
        s.proxy_threads,
        s.waypoint_threads,
        s.load_threads,
        s.seconds,
        s.rr_iterations,
        s.rounds,
        s.concurrency,
    );
    println!();
    println!(
        "| measure | no mesh | L4 (client proxy → server proxy) | waypoint (client proxy → waypoint → server proxy) \
         | waypoint / L4 | waypoint − L4 |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for proto in [Proto::H1, Proto::H2] {
        let p = proto as usize;
        let row = |name: String, v: [f64; 3], digits: usize| {
            println!(
                "| {name} | {:.digits$} | {:.digits$} | {:.digits$} | {:.2} | {:+.digits$} |",
                v[0],
                v[1],
                v[2],
                v[2] / v[1],
                v[2] - v[1]
            );
        };
        let one = match proto {
            Proto::H1 => "one keep-alive connection",
            Proto::H2 => "one connection",
        };
        for pct in [50, 99] {
            let v = [0, 1, 2].map(|i| percentile(&mut rr[p][i], pct));
            row(
                format!("{}, {one}, sequential: p{pct} µs", proto.name()),
                v,
                1,
            );
        }
        let many = match proto {
            Proto::H1 => format!("{} keep-alive connections", s.concurrency),
            Proto::H2 => format!("{} concurrent streams on one connection", s.concurrency),
        };
        let v = [0, 1, 2].map(|i| rps[p][i].0 / rps[p][i].1);
        row(format!("{}, {many}: requests/s", proto.name()), v, 0);
    }
    match &mem {
        Some(m) => println!(
            "| waypoint RSS per 1 000 open HTTP/1.1 client connections, MiB ({:.0} held: {:.1} KiB each) | – | – | \
             {:.2} | – | – |",
            m.connections,
            m.kib_per_conn,
            m.kib_per_conn * 1000.0 / 1024.0
        ),
        None => println!(
            "| waypoint RSS per 1 000 open client connections | – | – | not measured (needs root) | – | – |"
        ),
    }
    println!();
    if let Some(m) = &mem {
        println!(
            "Notes: the waypoint process (`meshnode waypoint`, in a network namespace of its own) went from {:.1} MiB \
             RSS after the warm-up to {:.1} MiB holding {:.0} client connections; the client proxy pools HBONE, as \
             ztunnel does, so those connections arrived as CONNECT streams on {} HBONE connection(s) into the \
             waypoint, which held {} HBONE connection(s) to the server proxy for its pooled upstream HTTP \
             connections. When all {:.0} sent one request at once, {} got their 200 with the whole body, the \
             waypoint then held {} upstream HBONE connection(s) and {:.1} MiB RSS.",
            m.before_mib,
            m.after_mib,
            m.connections,
            m.hbone_in,
            m.hbone_up,
            m.connections,
            m.answered_at_once,
            m.hbone_up_burst,
            m.burst_mib
        );
    }
    println!(
        "Every response was checked (status 200, {BODY_LEN}-byte body; the app's HTTP/2 port speaks nothing \
         else, so the waypoint re-originated HTTP/2 there), and the waypoint's own istio_requests_total agrees: \
         {waypoint_served} requests with 200 on the waypoint path (warm-ups included), none of the L4 path's. \
         Total run time {:.1} s.",
        started.elapsed().as_secs_f64()
    );
}
