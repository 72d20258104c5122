//! HBONE data-path benchmark: what the mesh costs compared with no mesh, measured in one run.
//!
//! Job: set up, in this one process over loopback, a client proxy and a server proxy (as
//! `tests/hbone.rs` does: built-in ephemeral CA, dedicated mode, the server proxy's HBONE listener on
//! `127.x.y.3:15008`) and two applications beside the server workload (a sink and an echo). Then run each
//! measurement twice, alternating: the **baseline** (client → app directly over loopback, no mesh) and the
//! **mesh** (client → client proxy → HBONE, i.e. mTLS + HTTP/2 CONNECT → server proxy → app).
//!
//! | measurement | what the client does |
//! |---|---|
//! | single-stream throughput | one connection, writes 256 KiB chunks for `BENCH_SECONDS`, half-closes; the app counts and acknowledges at EOF; Gbit/s until the ack arrives |
//! | request/response latency | one connection held open; 1 KiB written, 1 KiB echoed back, `BENCH_RR_ITERATIONS` times after a warm-up; p50 and p99 |
//! | new-connection rate | connect, send 1 byte, read 1 byte, close, sequentially for `BENCH_SECONDS`; connections/s. On the mesh path every connection is a new HTTP/2 stream on the *pooled* HBONE connection (no new TLS handshake), as in ztunnel's "connections" bench |
//! | memory per idle connection | opens `BENCH_IDLE_CONNECTIONS` connections (each proven end to end by a 1-byte echo) and holds them; (VmRSS after − VmRSS before) / connections. Then all of them send one byte at once and every echo is counted (the load check: `BENCH_IDLE_CONNECTIONS=10000` is 10 000 concurrent connections through the proxy pair, nothing may be dropped) and the peak RSS reported. Each path runs in a fresh child process (this binary re-executed) so one path's freed heap does not hide the other's growth |
//!
//! Inputs (environment variables; defaults in brackets):
//! * `BENCH_SECONDS` [3]: duration of the throughput and connection-rate runs, each, per path (in total
//!   over the rounds).
//! * `BENCH_RR_ITERATIONS` [20000]: request/response round trips measured per path (plus 10% warm-up in
//!   each round).
//! * `BENCH_IDLE_CONNECTIONS` [2000]: connections held for the memory measurement.
//! * `BENCH_PROXY_THREADS` [2]: worker threads of the runtime both proxies share (the proxy's default).
//! * `BENCH_LOAD_THREADS` [2]: worker threads of the runtime running the client and the applications.
//! * `BENCH_ROUNDS` [3]: the throughput, latency and connection-rate runs are split into this many rounds,
//!   baseline and mesh alternating (order flipped each round); totals and percentiles cover all rounds.
//!
//! A CI smoke run: `BENCH_SECONDS=0.3 BENCH_RR_ITERATIONS=500 BENCH_IDLE_CONNECTIONS=100 cargo bench --bench hbone`.
//!
//! Output (stdout): one line naming the machine and threads, then a Markdown table (benchmark, baseline,
//! mesh, mesh/baseline) ready to paste into the README's performance table, then notes. Progress goes to
//! stderr.
//!
//! Reading the ratios: the absolute figures depend on the machine and on whatever else it runs, the ratio
//! much less, because both paths run back to back in the same process. For throughput and connection rate
//! a ratio below 1 is the mesh's cost (0.25 = a quarter of the no-mesh rate); for latency and memory a
//! ratio above 1 is (3.0 = three times the no-mesh figure). Both proxies, the client and the apps share
//! the machine's cores, so on a small machine the mesh path also pays for the proxies' CPU time. Memory
//! in the baseline is the client's and app's own (sockets' kernel buffers are not in RSS); the mesh figure
//! adds both proxies' state, so mesh − baseline is what the two proxies hold per connection. No tracing
//! subscriber is installed, so the proxies' access logs cost (almost) nothing here.

#[path = "../tests/support/mod.rs"]
mod support;

use support::bench::{
    capture, connect, connection_rate, echo_app, env_or, latency, machine, percentile, ping,
    raise_fd_limit, rss_kib, runtime, sink_app, throughput, MESSAGE,
};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode::identity::{BuiltinCa, CertSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Port of the sink app: reads to EOF, then answers with the byte count (8 bytes, little endian).
const SINK_PORT: u16 = 9000;
/// Port of the echo app: writes back whatever it reads, until EOF.
const ECHO_PORT: u16 = 9001;
/// Set (to `baseline` or `mesh`) in the child processes that measure memory.
const CHILD_VAR: &str = "HBONE_BENCH_MEMORY_CHILD";

struct Settings {
    seconds: f64,
    rr_iterations: usize,
    idle_connections: usize,
    proxy_threads: usize,
    load_threads: usize,
    rounds: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            seconds: env_or("BENCH_SECONDS", 3.0),
            rr_iterations: env_or("BENCH_RR_ITERATIONS", 20_000usize).max(1),
            idle_connections: env_or("BENCH_IDLE_CONNECTIONS", 2_000usize).max(1),
            proxy_threads: env_or("BENCH_PROXY_THREADS", 2usize).max(1),
            load_threads: env_or("BENCH_LOAD_THREADS", 2usize).max(1),
            rounds: env_or("BENCH_ROUNDS", 3usize).max(1),
        }
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.max(0.01))
    }
}

/// Everything both paths need: the runtimes, the apps, and the two proxies.
struct Bench {
    proxy_rt: Runtime,
    load_rt: Runtime,
    /// Where the apps listen (the server workload's address): the baseline's targets.
    sink: SocketAddr,
    echo: SocketAddr,
    /// Where the client proxy takes connections to the apps: the mesh's targets.
    mesh_sink: SocketAddr,
    mesh_echo: SocketAddr,
    proxies: Vec<support::TestProxy>,
}

/// Two HBONE workloads: the client at `.2`, the server (where the apps run) at `.3`.
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
services: []
policies: []
"#,
        c = support::ip(net, 2),
        s = support::ip(net, 3),
    )
}

impl Bench {
    fn new(s: &Settings) -> Bench {
        let proxy_rt = runtime("proxy", s.proxy_threads);
        let load_rt = runtime("load", s.load_threads);
        let net = support::loopback_net();
        let server_ip = support::ip(net, 3);
        let (sink, echo) = load_rt.block_on(async {
            (
                sink_app(SocketAddr::new(server_ip, SINK_PORT)).await,
                echo_app(SocketAddr::new(server_ip, ECHO_PORT)).await,
            )
        });
        let (proxies, mesh_sink, mesh_echo) = proxy_rt.block_on(async {
            let ca: Arc<dyn CertSource> = Arc::new(
                BuiltinCa::ephemeral(Duration::from_secs(24 * 3600)).expect("ephemeral CA"),
            );
            let yaml = mesh_yaml(net);
            let client_ip = support::ip(net, 2);
            let client =
                support::start_proxy(ca.clone(), &yaml, "default/client/client", client_ip, &[])
                    .await;
            let server =
                support::start_proxy(ca, &yaml, "default/server/server", server_ip, &[]).await;
            let mesh_sink = capture(&client.proxy, client_ip, sink).await;
            let mesh_echo = capture(&client.proxy, client_ip, echo).await;
            (vec![client, server], mesh_sink, mesh_echo)
        });
        let b = Bench {
            proxy_rt,
            load_rt,
            sink,
            echo,
            mesh_sink,
            mesh_echo,
            proxies,
        };
        // Warm up both paths: certificates fetched, the HBONE connection dialled, code paths paged in.
        for target in [b.echo, b.mesh_echo] {
            b.load_rt
                .block_on(b.load_rt.spawn(async move {
                    let mut s = connect(target).await;
                    ping(&mut s, &[0u8; MESSAGE]).await;
                }))
                .expect("warm-up failed: is the mesh set up right?");
        }
        b
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
        // Abort the proxies inside their runtime's context, before the runtimes go.
        let _guard = self.proxy_rt.enter();
        self.proxies.clear();
    }
}

/// In a child process: sets up, opens and holds the idle connections on one path, prints the result.
fn memory_child(path: &str, s: &Settings) {
    let b = Bench::new(s);
    let target = match path {
        "baseline" => b.echo,
        "mesh" => b.mesh_echo,
        other => panic!("{CHILD_VAR}={other}: expected baseline or mesh"),
    };
    let n = s.idle_connections;
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib("self");
    let held = b.run(async move {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = connect(target).await;
            ping(&mut c, b"x").await;
            held.push(c);
        }
        held
    });
    // Let every task the connections started reach its idle state.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib("self");
    let pooled = b.proxies[0].proxy.pool().connections();
    // Then every held connection sends at once: all must be echoed (nothing dropped under the load).
    let (held, echoed) = b.run(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for mut c in held {
            tasks.spawn(async move {
                let ok = tokio::time::timeout(Duration::from_secs(30), async {
                    c.write_all(b"y").await?;
                    let mut back = [0u8; 1];
                    c.read_exact(&mut back).await.map(|_| back == *b"y")
                })
                .await;
                (c, matches!(ok, Ok(Ok(true))))
            });
        }
        let (mut held, mut echoed) = (Vec::new(), 0usize);
        while let Some(Ok((c, ok))) = tasks.join_next().await {
            echoed += usize::from(ok);
            held.push(c);
        }
        (held, echoed)
    });
    let peak = rss_kib("self");
    println!(
        "before_kib={before} after_kib={after} peak_kib={peak} connections={n} echoed_at_once={echoed} \
         hbone_connections={pooled}"
    );
    drop(held);
}

struct Memory {
    kib_per_conn: f64,
    hbone_connections: usize,
    /// Held connections that echoed when all sent at once.
    echoed_at_once: usize,
    /// RSS after that burst, MiB.
    peak_mib: f64,
}

/// Runs `memory_child` for `path` in a fresh copy of this process.
fn memory(path: &str) -> Memory {
    let exe = std::env::current_exe().expect("locating this benchmark's binary");
    let out = std::process::Command::new(exe)
        .env(CHILD_VAR, path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running the memory child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "memory child ({path}) failed: {}",
        out.status
    );
    let field = |name: &str| -> f64 {
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in memory child output {stdout:?}"))
    };
    Memory {
        kib_per_conn: (field("after_kib") - field("before_kib")) / field("connections"),
        hbone_connections: field("hbone_connections") as usize,
        echoed_at_once: field("echoed_at_once") as usize,
        peak_mib: field("peak_kib") / 1024.0,
    }
}

fn main() {
    raise_fd_limit();
    let s = Settings::from_env();
    if let Ok(path) = std::env::var(CHILD_VAR) {
        memory_child(&path, &s);
        return;
    }
    let started = Instant::now();
    let dur = s.duration();
    let b = Bench::new(&s);

    // Baseline and mesh alternate in short rounds (the order flipping each round), so a burst of noise from
    // the machine's other tenants hits both paths alike instead of only one.
    let rounds = s.rounds;
    let slice = dur / rounds as u32;
    let rr_per_round = s.rr_iterations.div_ceil(rounds);
    // Per path (0 = baseline, 1 = mesh): bytes and seconds; latency samples; connections and seconds.
    let mut tp = [(0.0, 0.0); 2];
    let mut rr: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut cps = [(0.0, 0.0); 2];
    let add = |acc: &mut (f64, f64), (n, secs): (f64, f64)| {
        acc.0 += n;
        acc.1 += secs;
    };
    for round in 0..rounds {
        eprintln!(
            "round {}/{rounds}: throughput {:.2} s, {rr_per_round} round trips, connections {:.2} s, per path...",
            round + 1,
            slice.as_secs_f64(),
            slice.as_secs_f64()
        );
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for &p in &order {
            add(
                &mut tp[p],
                b.run(throughput([b.sink, b.mesh_sink][p], slice)),
            );
        }
        for &p in &order {
            rr[p].extend(b.run(latency([b.echo, b.mesh_echo][p], rr_per_round)));
        }
        for &p in &order {
            add(
                &mut cps[p],
                b.run(connection_rate([b.echo, b.mesh_echo][p], slice)),
            );
        }
    }
    let gbps = |(bytes, secs): (f64, f64)| bytes * 8.0 / secs / 1e9;
    let (tp_base, tp_mesh) = (gbps(tp[0]), gbps(tp[1]));
    let (p50_base, p50_mesh) = (percentile(&mut rr[0], 50), percentile(&mut rr[1], 50));
    let (p99_base, p99_mesh) = (percentile(&mut rr[0], 99), percentile(&mut rr[1], 99));
    let (cps_base, cps_mesh) = (cps[0].0 / cps[0].1, cps[1].0 / cps[1].1);
    let pooled_after_rate = b.proxies[0].proxy.pool().connections();
    drop(b);

    eprintln!(
        "memory ({} idle connections per path, fresh processes)...",
        s.idle_connections
    );
    let mem_base = memory("baseline");
    let mem_mesh = memory("mesh");

    println!(
        "machine: {}; proxies share a {}-worker tokio runtime, client and apps a {}-worker one; loopback, one \
         process; {} s / {} round trips / {} idle connections per path, in {} rounds",
        machine(),
        s.proxy_threads,
        s.load_threads,
        s.seconds,
        s.rr_iterations,
        s.idle_connections,
        s.rounds
    );
    println!();
    println!("| benchmark | baseline (no mesh) | mesh (HBONE) | mesh / baseline |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, base: f64, mesh: f64, digits: usize| {
        println!(
            "| {name} | {base:.digits$} | {mesh:.digits$} | {:.2} |",
            mesh / base
        );
    };
    row("single-stream throughput, Gbit/s", tp_base, tp_mesh, 2);
    row("request/response 1 KiB, p50 µs", p50_base, p50_mesh, 1);
    row("request/response 1 KiB, p99 µs", p99_base, p99_mesh, 1);
    row(
        "new connections/s, sequential (mesh: streams on the pooled HBONE connection)",
        cps_base,
        cps_mesh,
        0,
    );
    row(
        &format!(
            "memory per idle connection, KiB RSS ({} held)",
            s.idle_connections
        ),
        mem_base.kib_per_conn,
        mem_mesh.kib_per_conn,
        1,
    );
    println!();
    println!(
        "Notes: both proxies' own memory per idle connection (mesh − baseline): {:.1} KiB, with {} pooled HBONE \
         connection(s) carrying the {} streams; when all {} sent at once, {} (baseline {}) were echoed and the \
         mesh process peaked at {:.0} MiB RSS (baseline {:.0}). The connection-rate run ended with {} pooled \
         HBONE connection(s): new TCP connections to the client proxy, no new TLS handshakes. Total run time \
         {:.1} s.",
        mem_mesh.kib_per_conn - mem_base.kib_per_conn,
        mem_mesh.hbone_connections,
        s.idle_connections,
        s.idle_connections,
        mem_mesh.echoed_at_once,
        mem_base.echoed_at_once,
        mem_mesh.peak_mib,
        mem_base.peak_mib,
        pooled_after_rate,
        started.elapsed().as_secs_f64()
    );
}
