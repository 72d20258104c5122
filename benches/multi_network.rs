//! What crossing networks costs: double HBONE through an east-west gateway against plain HBONE on one
//! network, and both against no mesh, measured in one run.
//!
//! Job: in this one process over loopback, with one ephemeral CA: the server workload's proxy (network
//! `net2`, `.3`) with an echo and a sink app beside it; a client proxy on the same network (`.2`: HBONE
//! straight to the server's proxy); a client proxy on `net1` (`.5`: outer HBONE to the gateway, inner HBONE
//! inside it to the server's proxy); and `meshnode gateway` for `net2` (`.4:15008`), the code the
//! `gateway` command runs. Connections are handed to the client proxies as the :15001 accept loop does
//! (`Proxy::outbound_to`), addressed to the apps' service VIP.
//!
//! | row | what the client does |
//! |---|---|
//! | single-stream throughput | one connection writes 256 KiB chunks for `BENCH_SECONDS`, half-closes, the sink acknowledges; Gbit/s |
//! | request/response 1 KiB | one connection, 1 KiB written and echoed back `BENCH_RR_ITERATIONS` times; p50, p99 |
//! | new connections/s | connect, 1 byte each way, close, sequentially for `BENCH_SECONDS`. HBONE: a stream on the pooled connection; double HBONE: a stream on the pooled connection to the gateway *plus a new inner TLS session and HTTP/2 connection* (never pooled, as ztunnel) |
//!
//! The three paths alternate in `BENCH_ROUNDS` rounds (order rotating), so noise from the machine's other
//! tenants hits all alike. Output (stdout): a Markdown table with each path's figure and double HBONE's as
//! a ratio of plain HBONE's. Inputs: `BENCH_SECONDS` [3], `BENCH_RR_ITERATIONS` [20000], `BENCH_ROUNDS` [3],
//! `BENCH_PROXY_THREADS` [2], `BENCH_LOAD_THREADS` [2]. CI smoke run:
//! `BENCH_SECONDS=0.3 BENCH_RR_ITERATIONS=300 cargo bench --bench multi_network`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode::config::GatewayConfig;
use meshnode::gateway::Gateway;
use meshnode::identity::{BuiltinCa, CertManager, CertSource};
use meshnode::state::{LocalConfig, StateHandle};
use support::bench::{
    capture, connect, connection_rate, echo_app, env_or, latency, machine, percentile, ping,
    raise_fd_limit, runtime, sink_app, throughput, MESSAGE,
};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;

const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;
const ECHO_VIP: &str = "240.0.0.1";
const SINK_VIP: &str = "240.0.0.2";
const PATHS: [&str; 3] = [
    "no mesh",
    "HBONE (one network)",
    "double HBONE (via gateway)",
];

fn mesh_yaml(net: [u8; 2]) -> String {
    let ip = |h| support::ip(net, h);
    format!(
        r#"
workloads:
- {{uid: near, name: near, namespace: default, serviceAccount: near, workloadIps: ["{near}"], protocol: HBONE, network: net2}}
- {{uid: far, name: far, namespace: default, serviceAccount: far, workloadIps: ["{far}"], protocol: HBONE, network: net1}}
- {{uid: gw, name: ew-gateway, namespace: istio-system, serviceAccount: istio-eastwestgateway, workloadIps: ["{gw}"], network: net2}}
- {{uid: server, name: server, namespace: default, serviceAccount: server, workloadIps: ["{server}"], protocol: HBONE, network: net2,
   networkGateway: {{destination: "net2/{gw}", hboneMtlsPort: 15008}},
   services: {{"default/echo.default.svc.cluster.local": {{{ECHO_PORT}: {ECHO_PORT}}}, "default/sink.default.svc.cluster.local": {{{SINK_PORT}: {SINK_PORT}}}}}}}
services:
- {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["net1/{ECHO_VIP}", "net2/{ECHO_VIP}"], ports: {{{ECHO_PORT}: {ECHO_PORT}}}}}
- {{name: sink, namespace: default, hostname: sink.default.svc.cluster.local, vips: ["net1/{SINK_VIP}", "net2/{SINK_VIP}"], ports: {{{SINK_PORT}: {SINK_PORT}}}}}
"#,
        near = ip(2),
        server = ip(3),
        gw = ip(4),
        far = ip(5),
    )
}

struct Bench {
    proxy_rt: Runtime,
    load_rt: Runtime,
    /// Per path: the echo and sink targets.
    echo: [SocketAddr; 3],
    sink: [SocketAddr; 3],
    proxies: Vec<support::TestProxy>,
    _gateway: (
        watch::Sender<bool>,
        watch::Sender<Arc<meshnode::state::State>>,
    ),
}

impl Bench {
    fn new(proxy_threads: usize, load_threads: usize) -> Bench {
        let proxy_rt = runtime("proxy", proxy_threads);
        let load_rt = runtime("load", load_threads);
        let net = support::loopback_net();
        let server_ip = support::ip(net, 3);
        let (echo_at, sink_at) = load_rt.block_on(async {
            (
                echo_app(SocketAddr::new(server_ip, ECHO_PORT)).await,
                sink_app(SocketAddr::new(server_ip, SINK_PORT)).await,
            )
        });
        let yaml = mesh_yaml(net);
        let vip = |v: &str, port| SocketAddr::new(v.parse().unwrap(), port);
        let (proxies, gateway, echo, sink) = proxy_rt.block_on(async {
            let ca: Arc<dyn CertSource> = Arc::new(
                BuiltinCa::ephemeral(Duration::from_secs(24 * 3600)).expect("ephemeral CA"),
            );
            let net2 = [("NETWORK", "net2")];
            let server =
                support::start_proxy(ca.clone(), &yaml, "default/server/server", server_ip, &net2)
                    .await;
            let near_ip = support::ip(net, 2);
            let near =
                support::start_proxy(ca.clone(), &yaml, "default/near/near", near_ip, &net2).await;
            let far_ip = support::ip(net, 5);
            let far = support::start_proxy(
                ca.clone(),
                &yaml,
                "default/far/far",
                far_ip,
                &[("NETWORK", "net1")],
            )
            .await;
            let gateway = start_gateway(ca, &yaml, support::ip(net, 4)).await;
            let mut echo = [echo_at; 3];
            let mut sink = [sink_at; 3];
            for (i, (p, ip)) in [(&near, near_ip), (&far, far_ip)].into_iter().enumerate() {
                echo[i + 1] = capture(&p.proxy, ip, vip(ECHO_VIP, ECHO_PORT)).await;
                sink[i + 1] = capture(&p.proxy, ip, vip(SINK_VIP, SINK_PORT)).await;
            }
            (vec![server, near, far], gateway, echo, sink)
        });
        let b = Bench {
            proxy_rt,
            load_rt,
            echo,
            sink,
            proxies,
            _gateway: gateway,
        };
        // Warm up every path: certificates, the pooled connections, code paged in.
        for target in b.echo {
            b.run(async move {
                let mut s = connect(target).await;
                ping(&mut s, &[0u8; MESSAGE]).await;
            });
        }
        b
    }

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
        let _guard = self.proxy_rt.enter();
        self.proxies.clear();
    }
}

/// `meshnode gateway` for `net2` on `ip:15008`; the returned senders keep it (and its state) alive.
async fn start_gateway(
    ca: Arc<dyn CertSource>,
    yaml: &str,
    ip: IpAddr,
) -> (
    watch::Sender<bool>,
    watch::Sender<Arc<meshnode::state::State>>,
) {
    let env: HashMap<&str, &str> = [("NETWORK", "net2"), ("POD_NAMESPACE", "istio-system")]
        .into_iter()
        .collect();
    let cfg = Arc::new(GatewayConfig::from_source(&env).expect("gateway config"));
    let st = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    let (state_tx, state) = StateHandle::new(st);
    let (stop_tx, stop) = watch::channel(false);
    let gw = Gateway::new(cfg, state, &CertManager::new(ca), stop)
        .await
        .expect("gateway certificate");
    let l = TcpListener::bind(SocketAddr::new(ip, 15008))
        .await
        .expect("binding the gateway");
    tokio::spawn(gw.serve(l));
    (stop_tx, state_tx)
}

fn main() {
    raise_fd_limit();
    let seconds: f64 = env_or("BENCH_SECONDS", 3.0);
    let rr_iterations: usize = env_or("BENCH_RR_ITERATIONS", 20_000);
    let rounds: usize = env_or::<usize>("BENCH_ROUNDS", 3).max(1);
    let proxy_threads: usize = env_or("BENCH_PROXY_THREADS", 2);
    let load_threads: usize = env_or("BENCH_LOAD_THREADS", 2);
    let started = Instant::now();
    let b = Bench::new(proxy_threads, load_threads);
    let slice = Duration::from_secs_f64(seconds / rounds as f64);
    let rr_per_round = rr_iterations.div_ceil(rounds);
    let mut tp = [(0.0, 0.0); 3];
    let mut rr: [Vec<Duration>; 3] = Default::default();
    let mut cps = [(0.0, 0.0); 3];
    let add = |acc: &mut (f64, f64), (n, secs): (f64, f64)| {
        acc.0 += n;
        acc.1 += secs;
    };
    for round in 0..rounds {
        eprintln!("round {}/{rounds}...", round + 1);
        let order: Vec<usize> = (0..3).map(|i| (i + round) % 3).collect();
        for &p in &order {
            add(&mut tp[p], b.run(throughput(b.sink[p], slice)));
        }
        for &p in &order {
            rr[p].extend(b.run(latency(b.echo[p], rr_per_round)));
        }
        for &p in &order {
            add(&mut cps[p], b.run(connection_rate(b.echo[p], slice)));
        }
    }
    drop(b);
    let gbps: Vec<f64> = tp.iter().map(|(bytes, s)| bytes * 8.0 / s / 1e9).collect();
    let p50: Vec<f64> = rr.iter_mut().map(|r| percentile(r, 50)).collect();
    let p99: Vec<f64> = rr.iter_mut().map(|r| percentile(r, 99)).collect();
    let rate: Vec<f64> = cps.iter().map(|(n, s)| n / s).collect();
    println!(
        "machine: {}; proxies and gateway share a {proxy_threads}-worker runtime, client and apps a \
         {load_threads}-worker one; loopback, one process; {seconds} s / {rr_iterations} round trips per \
         path, in {rounds} rounds",
        machine()
    );
    println!();
    println!(
        "| benchmark | {} | {} | {} | double / HBONE |",
        PATHS[0], PATHS[1], PATHS[2]
    );
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, v: &[f64], digits: usize| {
        println!(
            "| {name} | {:.digits$} | {:.digits$} | {:.digits$} | {:.2} |",
            v[0],
            v[1],
            v[2],
            v[2] / v[1]
        );
    };
    row("single-stream throughput, Gbit/s", &gbps, 2);
    row("request/response 1 KiB, p50 µs", &p50, 1);
    row("request/response 1 KiB, p99 µs", &p99, 1);
    row("new connections/s, sequential", &rate, 0);
    println!();
    println!(
        "Notes: double HBONE crosses three proxies (client's, gateway, server's) and two TLS sessions per \
         byte; each new connection through the gateway opens its own inner TLS session and HTTP/2 connection \
         (never pooled, as ztunnel), which the new-connection row shows. Total run time {:.1} s.",
        started.elapsed().as_secs_f64()
    );
}
