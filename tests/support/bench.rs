//! What the benches share: settings from the environment, the runtimes they run the paths on, and the
//! applications and clients of the data-path benches (a sink, an echo; throughput, latency, connection
//! rate).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Write size of the throughput client.
pub const CHUNK: usize = 256 * 1024;
/// Request and response size of the latency test.
pub const MESSAGE: usize = 1024;

/// `name` from the environment parsed as `T`, else `default`; a value that does not parse stops the
/// bench naming it.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// A multi-threaded runtime of `workers` threads named `name`.
pub fn runtime(name: &str, workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

/// One line naming the machine the figures come from.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{cpu}, {cores} cores available, Linux {kernel}")
}

/// Raises the open-file limit: to the kernel's `nr_open` when allowed (root), else the soft one to the hard
/// one (the memory measurements hold several ends of every connection in one process).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = nr_open {
        if setrlimit(Resource::RLIMIT_NOFILE, n, n).is_ok() {
            return;
        }
    }
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The `p`th percentile of `samples`, in microseconds (sorts them).
pub fn percentile(samples: &mut [std::time::Duration], p: usize) -> f64 {
    samples.sort_unstable();
    samples[(samples.len() - 1) * p / 100].as_secs_f64() * 1e6
}

/// VmRSS of process `pid` (`"self"` for this one), KiB.
pub fn rss_kib(pid: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"))
}

pub async fn sink_app(addr: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(addr).await.expect("binding the sink app");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&total.to_le_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

pub async fn echo_app(addr: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(addr).await.expect("binding the echo app");
    tokio::spawn(async move {
        loop {
            let s = match l.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // A transient error (EMFILE, ECONNABORTED) must not end the app: later connections
                    // would be reset with the listener.
                    eprintln!("echo app: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_nodelay(true).unwrap();
    s
}

/// Writes `msg` and reads as many bytes back.
pub async fn ping(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("writing a request");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.expect("reading the echo");
}

/// Bytes one connection writes in about `dur`, and the seconds until the app acknowledged the last one.
pub async fn throughput(target: SocketAddr, dur: Duration) -> (f64, f64) {
    let mut s = connect(target).await;
    let chunk = vec![0xa5u8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        s.write_all(&chunk).await.expect("writing bulk data");
        sent += CHUNK as u64;
    }
    s.shutdown().await.expect("half-closing");
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)
        .await
        .expect("reading the sink's ack");
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(ack);
    assert_eq!(got, sent, "the sink received a different byte count");
    (sent as f64, secs)
}

/// Round-trip times of `iterations` 1 KiB requests and responses on one connection, after a warm-up.
pub async fn latency(target: SocketAddr, iterations: usize) -> Vec<Duration> {
    let mut s = connect(target).await;
    let msg = vec![0x5au8; MESSAGE];
    let mut back = vec![0u8; MESSAGE];
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let t = Instant::now();
        s.write_all(&msg).await.expect("writing a request");
        s.read_exact(&mut back).await.expect("reading the echo");
        if i >= iterations / 10 {
            samples.push(t.elapsed());
        }
    }
    samples
}

/// Sequential connect / 1 byte each way / close for `dur`: connections made, and the seconds it took.
pub async fn connection_rate(target: SocketAddr, dur: Duration) -> (f64, f64) {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        let mut s = connect(target).await;
        ping(&mut s, b"x").await;
        drop(s);
        n += 1;
    }
    (n as f64, start.elapsed().as_secs_f64())
}

/// Hands connections accepted on a listener of `bind` to `proxy`, carried to `dst`, the way the proxy's
/// own :15001 accept loop does (including its per-socket set-up), minus `SO_ORIGINAL_DST`.
pub async fn capture(
    proxy: &std::sync::Arc<meshnode::proxy::Proxy>,
    bind: std::net::IpAddr,
    dst: SocketAddr,
) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::new(bind, 0))
        .await
        .expect("binding the capture listener");
    let addr = l.local_addr().unwrap();
    let proxy = proxy.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            let _ = meshnode::socket::accepted(&s);
            tokio::spawn(proxy.clone().outbound_to(s, peer, dst));
        }
    });
    addr
}
