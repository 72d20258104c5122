//! The load version of `takeover.rs`'s hand-over test: a node proxy holding ten thousand open connections
//! is upgraded, and every one of them carries on through the new proxy.
//!
//! **Job.** A one-node "cluster" in network namespaces (`support/cluster.rs`: the CNI agent and node proxy
//! A in shared mode, a client and a server pod captured through the real CNI chain). An echo application
//! in the server pod (a tokio runtime, no thread per connection, in a process of its own: this test
//! binary again, running `echo_app_process`) takes `N` connections opened from the client pod through
//! proxy A (`MESHNODE_LOAD_CONNECTIONS`, default 10 000, 500 at a time), each checked with a message of
//! its own. Proxy B starts beside A (its own namespace, the same ZDS socket, `MESHNODE_RESUMABLE_STREAMS`
//! and `MESHNODE_HANDOVER_SOCKET` as A), A is SIGTERMed and hands every connection to B; then every
//! connection is used again with a second message of its own, and finally closed from the client side.
//!
//! **What it checks.** Every connection answers again after A has gone (failures counted, the first ones
//! listed with their error); none was duplicated (the application accepted exactly `N` connections, saw
//! each index's first message once and only that connection's messages on it, and no byte came back
//! twice) and none was reset (the application saw no connection end before the client closed it, and each
//! close is a clean EOF both ways); B adopted both ends of every connection.
//!
//! **What it measures** (one `upgrade load:` line on stderr): the time to open the `N` connections; the
//! time from SIGTERM to A's exit (the hand-over); A's RSS before SIGTERM and its peak while handing over;
//! B's RSS before, at A's exit, after, its peak, and 2 s later (`/proc/<pid>/status` `VmRSS`, sampled
//! every 10 ms from before the SIGTERM until every connection has answered again); B's `connections
//! handed over` line (`adopted=`, `packets=`) and A's `resumable connections handed over` line (`taken=`,
//! `closed=`); and the time from A's exit (and from SIGTERM) until all `N` connections had answered again.
//!
//! **How to run** (needs root, `ip`, `nft` and containernetworking-plugins, as `takeover.rs`; build the
//! workspace first, so `meshnode-cni` is beside `meshnode`):
//!
//! ```text
//! cargo build --release --workspace
//! cargo test --release --test upgrade_load -- --ignored --nocapture
//! MESHNODE_LOAD_CONNECTIONS=1000 cargo test --release --test upgrade_load -- --ignored --nocapture
//! ```
//!
//! (`echo_app_process`, also `#[ignore]`d, does nothing unless this test starts it.)
//!
//! **Open files.** Both pods are on one proxy, so each proxy holds two sockets per connection (the client's
//! outbound app socket and the server's inbound upstream) plus both ends of its HBONE connections (one
//! per 100 streams): about 2N + 300. This process holds the N client sockets, the echo application's
//! process the N server ones. The test raises its soft `RLIMIT_NOFILE` to the hard limit, and the hard
//! limit too when it is below 3N + 1024 and the process may (`CAP_SYS_RESOURCE`); the proxies inherit
//! the hard limit and raise their soft limit to it. Where the hard limit stays below 2N + 300 (20 000
//! without `CAP_SYS_RESOURCE` on some machines: N = 10 000 cannot fit, about 9 500 is the most), the test
//! says so and proxy A runs out of descriptors while the connections are opened (`Too many open files`
//! in its access lines, the last connections reset). When a run fails, the node's logs are kept in
//! `$TMPDIR/upgrade_load-<pid>/`.

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use support::cluster::{Node, Pod};
use support::netns::{KillOnDrop, Netns};
use support::upgrade;

/// The echo application's port in the server pod.
const ECHO_PORT: u16 = 8081;

/// Connections opened at once while the load is built up.
const OPEN_BATCH: usize = 500;

/// The longest wait for one connect, write or answer.
const IO_WAIT: Duration = Duration::from_secs(30);

/// How many connections: `MESHNODE_LOAD_CONNECTIONS`, default 10 000.
fn connections() -> usize {
    match std::env::var("MESHNODE_LOAD_CONNECTIONS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("MESHNODE_LOAD_CONNECTIONS={v:?}: {e}")),
        Err(_) => 10_000,
    }
}

/// Raises this process's open-files soft limit to the hard limit, and both to `need` when the hard limit
/// is lower (root may). Children started afterwards (the proxies) inherit the hard limit. Returns the
/// (soft, hard) limits before and after.
fn raise_fd_limit(need: u64) -> ((u64, u64), (u64, u64)) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let (_, hard) = before;
    if hard < need && setrlimit(Resource::RLIMIT_NOFILE, need, need).is_ok() {
        return (before, (need, need));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    (before, getrlimit(Resource::RLIMIT_NOFILE).unwrap())
}

/// A multi-threaded tokio runtime whose threads all live in `ns`: sockets it creates are that
/// namespace's.
fn runtime_in(ns: &Netns, name: &str) -> tokio::runtime::Runtime {
    let path = format!("/var/run/netns/{}", ns.name);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .on_thread_start(move || {
            let fd = File::open(&path).expect("opening the namespace");
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        })
        .build()
        .unwrap()
}

/// What the echo application saw.
struct App {
    accepted: AtomicUsize,
    /// Connections that ended with EOF from the client.
    ended: AtomicUsize,
    /// Connections that ended with an error (a reset), with it.
    broken: Mutex<Vec<String>>,
    /// Lines that were not the next one expected on their connection.
    unexpected: Mutex<Vec<String>>,
    /// How many connections opened with each index's first message.
    seen: Mutex<Vec<u32>>,
}

/// [`App`] as the echo application's process reports it to the test (a JSON file it rewrites every
/// 50 ms).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct AppStatus {
    accepted: usize,
    ended: usize,
    broken: usize,
    broken_first: Vec<String>,
    unexpected: usize,
    unexpected_first: Vec<String>,
    /// Indices whose first message opened more than one connection (the first few), and how many.
    seen_twice: Vec<usize>,
    seen_twice_count: usize,
    /// Indices no connection opened with.
    never_seen: usize,
}

impl App {
    fn status(&self) -> AppStatus {
        let broken = self.broken.lock().unwrap();
        let unexpected = self.unexpected.lock().unwrap();
        let seen = self.seen.lock().unwrap();
        AppStatus {
            accepted: self.accepted.load(Ordering::SeqCst),
            ended: self.ended.load(Ordering::SeqCst),
            broken: broken.len(),
            broken_first: broken.iter().take(8).cloned().collect(),
            unexpected: unexpected.len(),
            unexpected_first: unexpected.iter().take(8).cloned().collect(),
            seen_twice: (0..seen.len()).filter(|&i| seen[i] > 1).take(8).collect(),
            seen_twice_count: seen.iter().filter(|&&c| c > 1).count(),
            never_seen: seen.iter().filter(|&&c| c == 0).count(),
        }
    }
}

/// The first message on connection `i`, and the second.
fn first(i: usize) -> String {
    format!("a{i}\n")
}
fn second(i: usize) -> String {
    format!("b{i}\n")
}

/// The echo application: a process of its own (this test binary again, running [`echo_app_process`]) in
/// the server pod's namespace, so its `N` sockets count against its own open-files limit and not this
/// process's.
struct EchoApp {
    _process: KillOnDrop,
    status: PathBuf,
}

impl EchoApp {
    /// Starts it in `pod` on `port` for `n` connections and waits until it listens.
    fn start(node: &Node, pod: &Pod, port: u16, n: usize) -> EchoApp {
        let addr = SocketAddr::new(pod.ip.expect("pod has an IP"), port).to_string();
        let status = node.path("echo-status.json");
        let exe = std::env::current_exe().unwrap();
        let process = KillOnDrop(pod.netns.spawn(
            exe.to_str().unwrap(),
            &[
                "--ignored",
                "--exact",
                "echo_app_process",
                "--nocapture",
                "--test-threads=1",
            ],
            &[
                ("MESHNODE_LOAD_ECHO", addr.as_str()),
                ("MESHNODE_LOAD_ECHO_STATUS", status.to_str().unwrap()),
                ("MESHNODE_LOAD_CONNECTIONS", n.to_string().as_str()),
            ],
            File::create(node.path("echo-app.log")).unwrap(),
        ));
        let app = EchoApp {
            _process: process,
            status,
        };
        node.wait_for(|| app.status().is_some(), "the echo application listening");
        app
    }

    /// Its last report; `None` before it listens.
    fn status(&self) -> Option<AppStatus> {
        serde_json::from_slice(&std::fs::read(&self.status).ok()?).ok()
    }

    /// Its report once it is at most 50 ms old: the one written after this call.
    fn fresh_status(&self) -> AppStatus {
        std::thread::sleep(Duration::from_millis(150));
        self.status().expect("the echo application's report")
    }
}

/// The echo application's process, when started by [`EchoApp::start`] (`MESHNODE_LOAD_ECHO` set: the
/// address to listen on, in the namespace it was started in); otherwise nothing. Each line read is
/// written back; each connection's lines are checked: `a<i>` first (each index once), then only `b<i>`
/// of the same index. Its report goes to `MESHNODE_LOAD_ECHO_STATUS` every 50 ms.
#[test]
#[ignore = "not a test: the echo application's process of the test above, which starts it"]
fn echo_app_process() {
    let Ok(addr) = std::env::var("MESHNODE_LOAD_ECHO") else {
        return;
    };
    let addr: SocketAddr = addr.parse().expect("MESHNODE_LOAD_ECHO");
    let status = PathBuf::from(std::env::var("MESHNODE_LOAD_ECHO_STATUS").unwrap());
    let n = connections();
    // Gone with the test, even if it is killed.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).unwrap();
    let (before, after) = raise_fd_limit(0);
    eprintln!("echo application on {addr} for {n} connections; open files {before:?} -> {after:?}");
    let listener = {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SockAddr::from(addr)).unwrap();
        s.listen(8192).unwrap();
        s.set_nonblocking(true).unwrap();
        std::net::TcpListener::from(s)
    };
    let app = Arc::new(App {
        accepted: AtomicUsize::new(0),
        ended: AtomicUsize::new(0),
        broken: Mutex::new(Vec::new()),
        unexpected: Mutex::new(Vec::new()),
        seen: Mutex::new(vec![0; n]),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let state = app.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => {
                        state.accepted.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(echo(s, peer, state.clone()));
                    }
                    Err(e) => {
                        state.broken.lock().unwrap().push(format!("accept: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        let tmp = status.with_extension("tmp");
        loop {
            let report = serde_json::to_vec(&app.status()).unwrap();
            std::fs::write(&tmp, report).unwrap();
            std::fs::rename(&tmp, &status).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

async fn echo(s: TcpStream, peer: SocketAddr, app: Arc<App>) {
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::with_capacity(256, r).lines();
    let mut index: Option<usize> = None;
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => {
                app.ended.fetch_add(1, Ordering::SeqCst);
                break;
            }
            Err(e) => {
                let at = index.map_or("before its first line".into(), |i| format!("index {i}"));
                app.broken
                    .lock()
                    .unwrap()
                    .push(format!("{peer} ({at}): {e}"));
                break;
            }
        };
        let expected = match index {
            None => {
                let i = line.strip_prefix('a').and_then(|i| i.parse::<usize>().ok());
                let mut seen = app.seen.lock().unwrap();
                match i.filter(|&i| i < seen.len()) {
                    Some(i) => {
                        seen[i] += 1;
                        index = Some(i);
                        true
                    }
                    None => false,
                }
            }
            Some(i) => line == format!("b{i}"),
        };
        if !expected {
            app.unexpected
                .lock()
                .unwrap()
                .push(format!("{peer} (index {index:?}): {line:?}"));
        }
        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// Writes `msg` on `s` and reads back exactly its length, which must be `msg`.
async fn exchange(s: &mut TcpStream, msg: &str) -> Result<(), String> {
    tokio::time::timeout(IO_WAIT, s.write_all(msg.as_bytes()))
        .await
        .map_err(|_| format!("write not done within {IO_WAIT:?}"))?
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(IO_WAIT, s.read_exact(&mut buf))
        .await
        .map_err(|_| format!("no answer within {IO_WAIT:?}"))?
        .map_err(|e| format!("read: {e}"))?;
    if buf == msg.as_bytes() {
        Ok(())
    } else {
        Err(format!("answer {:?}", String::from_utf8_lossy(&buf)))
    }
}

/// Closes the client's side of `s` and reads until the application's EOF: nothing more may come back.
async fn close(mut s: TcpStream) -> Result<(), String> {
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    tokio::time::timeout(IO_WAIT, s.read_to_end(&mut rest))
        .await
        .map_err(|_| format!("no EOF within {IO_WAIT:?}"))?
        .map_err(|e| format!("read to EOF: {e}"))?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} bytes more before EOF: {:?}",
            rest.len(),
            String::from_utf8_lossy(&rest[..rest.len().min(64)])
        ))
    }
}

/// A field of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`); `None` once the process has gone.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peaks of two processes' RSS, sampled every 10 ms on a thread until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    peak_a: Arc<AtomicU64>,
    peak_b: Arc<AtomicU64>,
    /// A's `VmHWM` as last read before it exited.
    hwm_a: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
}

impl RssSampler {
    fn start(a: u32, b: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (peak_a, peak_b, hwm_a, samples) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let thread = {
            let (stop, peak_a, peak_b, hwm_a, samples) = (
                stop.clone(),
                peak_a.clone(),
                peak_b.clone(),
                hwm_a.clone(),
                samples.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(kb) = status_kb(a, "VmRSS") {
                        peak_a.fetch_max(kb, Ordering::SeqCst);
                    }
                    if let Some(kb) = status_kb(a, "VmHWM") {
                        hwm_a.fetch_max(kb, Ordering::SeqCst);
                    }
                    if let Some(kb) = status_kb(b, "VmRSS") {
                        peak_b.fetch_max(kb, Ordering::SeqCst);
                    }
                    samples.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssSampler {
            stop,
            thread: Some(thread),
            peak_a,
            peak_b,
            hwm_a,
            samples,
        }
    }

    /// Stops sampling: A's peak, A's `VmHWM`, B's peak (kB), and the number of samples.
    fn finish(mut self) -> (u64, u64, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.peak_a.load(Ordering::SeqCst),
            self.hwm_a.load(Ordering::SeqCst),
            self.peak_b.load(Ordering::SeqCst),
            self.samples.load(Ordering::SeqCst),
        )
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The sum of `key=<number>` over the lines of `log` that contain `needle` and `key=`.
fn sum_field(log: &str, needle: &str, key: &str) -> Option<u64> {
    let pat = format!("{key}=");
    let values: Vec<u64> = log
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let at = l.find(&pat)? + pat.len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A's log: the node's `proxy<n>.log` (B's is `proxy-b.log`).
fn a_log(node: &Node) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(node.dir.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("proxy") && name.ends_with(".log") && name != "proxy-b.log" {
            out += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    out
}

/// Copies the node's logs to `$TMPDIR/upgrade_load-<pid>/` (the node's directory goes with the test)
/// and returns a digest: each log's size, its `warn`/`error` lines counted by what they say (message and
/// `error=`, addresses and numbers blanked; the 8 most frequent), and the first 5 of them (shortened).
fn keep_logs(node: &Node) -> String {
    let keep = std::env::temp_dir().join(format!("upgrade_load-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&keep);
    let mut digest = format!("logs kept in {}\n", keep.display());
    let mut paths: Vec<PathBuf> = std::fs::read_dir(node.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let _ = std::fs::copy(&p, keep.join(p.file_name().unwrap()));
        let noted: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\twarn\t") || l.contains("\terror\t"))
            .collect();
        digest += &format!(
            "--- {} ({} lines, {} warn/error)\n",
            Path::new(p.file_name().unwrap()).display(),
            text.lines().count(),
            noted.len()
        );
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for l in &noted {
            *kinds.entry(kind_of(l)).or_default() += 1;
        }
        let mut kinds: Vec<(usize, String)> = kinds.into_iter().map(|(k, c)| (c, k)).collect();
        kinds.sort_by(|a, b| b.cmp(a));
        for (count, kind) in kinds.iter().take(8) {
            digest += &format!("  {count} x {kind}\n");
        }
        for l in noted.iter().take(5) {
            digest += &format!("  {}\n", shorten(l));
        }
    }
    digest
}

/// What a log line says, without its time, fields and numbers: the message, and its `error=` if any.
fn kind_of(line: &str) -> String {
    let mut parts = line.split('\t').skip(1);
    let level = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let message = parts.next().unwrap_or("");
    let rest = parts.collect::<Vec<_>>().join(" ");
    let error = rest.find("error=").map_or("", |at| &rest[at..]);
    let blanked: String = format!("{level} {target}: {message} {error}")
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    shorten(&blanked)
}

/// `line`, its middle cut out when it is longer than 400 characters.
fn shorten(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= 400 {
        return line.to_string();
    }
    let head: String = chars[..150].iter().collect();
    let tail: String = chars[chars.len() - 240..].iter().collect();
    format!("{head} … {tail}")
}

/// Failures as "N failed, the first: …".
fn describe(failures: &[(usize, String)], of: usize) -> String {
    let first: Vec<String> = failures
        .iter()
        .take(8)
        .map(|(i, e)| format!("#{i}: {e}"))
        .collect();
    format!("{} of {of} failed, the first: {first:?}", failures.len())
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

#[test]
#[ignore = "load: 10 000 connections through two proxies; run with --ignored --nocapture as root"]
fn ten_thousand_open_connections_survive_a_proxy_upgrade() {
    if !support::root_or_skip("ten_thousand_open_connections_survive_a_proxy_upgrade") {
        return;
    }
    let n = connections();
    assert!(n > 0, "MESHNODE_LOAD_CONNECTIONS must be at least 1");
    // This process holds the n client sockets (the echo application has its own process). Each proxy
    // holds two app-side sockets per connection (both pods are on it) and its HBONE connections (each end
    // of each, both ends being its own), and inherits this process's hard limit.
    let proxy_need = 2 * n as u64 + 1024;
    let (before, after) = raise_fd_limit(proxy_need + n as u64);
    eprintln!(
        "open files (soft, hard): {before:?} -> {after:?}; a proxy needs about 2N + 300 = {}",
        2 * n + 300
    );
    assert!(
        after.0 >= n as u64 + 1024,
        "open-files limit {after:?} too low for {n} client sockets"
    );
    if after.1 < 2 * n as u64 + 300 {
        eprintln!(
            "warning: the proxies' open-files limit ({}) is below what {n} connections need (about {}): \
             expect them to run out of descriptors",
            after.1,
            2 * n + 300
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let env = upgrade::handover_env(&dir.path().join("handover.sock"));
    let (mut node, client, server) = upgrade::node_with_pods("true", &env);
    let mut a = node.proxy.take().expect("proxy A");
    let a_pid = a.0.id();

    let app = EchoApp::start(&node, &server, ECHO_PORT, n);
    let client_rt = runtime_in(&client.netns, "client");
    let echo_dst = SocketAddr::new(server.ip.unwrap(), ECHO_PORT);

    // N connections from the client pod through proxy A, OPEN_BATCH at a time, each checked.
    let opening = Instant::now();
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut failures: Vec<(usize, String)> = Vec::new();
    client_rt.block_on(async {
        for start in (0..n).step_by(OPEN_BATCH) {
            let mut batch = JoinSet::new();
            for i in start..(start + OPEN_BATCH).min(n) {
                batch.spawn(async move {
                    let r = async {
                        let mut s = tokio::time::timeout(IO_WAIT, TcpStream::connect(echo_dst))
                            .await
                            .map_err(|_| format!("connect not done within {IO_WAIT:?}"))?
                            .map_err(|e| format!("connect: {e}"))?;
                        exchange(&mut s, &first(i)).await?;
                        Ok::<_, String>(s)
                    }
                    .await;
                    (i, r)
                });
            }
            while let Some(done) = batch.join_next().await {
                match done.unwrap() {
                    (i, Ok(s)) => conns[i] = Some(s),
                    (i, Err(e)) => failures.push((i, e)),
                }
            }
        }
    });
    let opened_in = opening.elapsed();
    if !failures.is_empty() {
        failures.sort();
        panic!(
            "opening {n} connections through proxy A: {}\n{}",
            describe(&failures, n),
            keep_logs(&node)
        );
    }
    eprintln!("{n} connections opened and checked through A in {opened_in:?}");

    // Proxy B starts beside A, serves the pods and listens on the hand-over socket.
    let node_b = Netns::new("nodeb");
    let mut b = upgrade::start_second_proxy(&node, &node_b, "true", &env);
    let b_pid = b.0.id();
    let b_log = node.path("proxy-b.log");
    node.wait_for(
        || {
            std::fs::read_to_string(&b_log)
                .is_ok_and(|l| l.contains("taking connections handed over"))
        },
        "proxy B listening on the hand-over socket",
    );

    // A is told to stop; its RSS and B's are sampled from before, until every connection answered again.
    let rss_a_before = status_kb(a_pid, "VmRSS").unwrap_or(0);
    let rss_b_before = status_kb(b_pid, "VmRSS").unwrap_or(0);
    let sampler = RssSampler::start(a_pid, b_pid);
    std::thread::sleep(Duration::from_millis(30));
    let told = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = told + Duration::from_secs(90);
    let exit = loop {
        if let Some(status) = a.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            panic!("A still running 90 s after SIGTERM\n{}", keep_logs(&node));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let handed_in = told.elapsed();
    let a_gone = Instant::now();
    let rss_b_at_a_exit = status_kb(b_pid, "VmRSS").unwrap_or(0);
    assert!(
        exit.success(),
        "A exited with {exit:?}\n{}",
        keep_logs(&node)
    );

    // Every connection again, all at once, each with its second message.
    let mut round: JoinSet<(usize, TcpStream, Result<Instant, String>)> = JoinSet::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let mut s = s.take().unwrap();
        round.spawn_on(
            async move {
                let r = exchange(&mut s, &second(i)).await.map(|_| Instant::now());
                (i, s, r)
            },
            client_rt.handle(),
        );
    }
    let mut last_answer = a_gone;
    client_rt.block_on(async {
        while let Some(done) = round.join_next().await {
            let (i, s, r) = done.unwrap();
            match r {
                Ok(at) => last_answer = last_answer.max(at),
                Err(e) => failures.push((i, e)),
            }
            conns[i] = Some(s);
        }
    });
    let answered_after_exit = last_answer - a_gone;
    let answered_after_sigterm = last_answer - told;
    let rss_b_after = status_kb(b_pid, "VmRSS").unwrap_or(0);
    let (peak_a, hwm_a, peak_b, samples) = sampler.finish();
    let peak_b = peak_b.max(rss_b_at_a_exit).max(rss_b_after);
    // What B keeps once it is quiet again (the connections still open).
    std::thread::sleep(Duration::from_secs(2));
    let rss_b_settled = status_kb(b_pid, "VmRSS").unwrap_or(0);

    // B's and A's account of the hand-over.
    let mut b_said = String::new();
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(20) {
        b_said = std::fs::read_to_string(&b_log).unwrap_or_default();
        if b_said
            .lines()
            .any(|l| l.contains("connections handed over") && l.contains("adopted="))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let adopted = sum_field(&b_said, "connections handed over", "adopted");
    let orphans = sum_field(&b_said, "connections handed over", "orphans");
    let packets = sum_field(&b_said, "connections handed over", "packets");
    let ended_early = b_said
        .lines()
        .filter(|l| l.contains("hand-over ended early"))
        .count();
    let closed_by_b = b_said
        .lines()
        .filter(|l| l.contains("handed-over connection closed"))
        .count();
    let a_said = a_log(&node);
    let taken = sum_field(&a_said, "resumable connections handed over", "taken");
    let closed_by_a = sum_field(&a_said, "resumable connections handed over", "closed");

    let failed_after = failures.len();
    failures.sort();
    let after_failures = describe(&failures, n);

    // Nothing extra came back, and each connection closes cleanly both ways (no reset).
    let before_close = app.fresh_status();
    let accepted_before_close = before_close.accepted;
    let ended_before_close = before_close.ended;
    let broken_before_close = before_close.broken_first;
    let mut close_failures: Vec<(usize, String)> = Vec::new();
    let mut closing = JoinSet::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let s = s.take().unwrap();
        closing.spawn_on(async move { (i, close(s).await) }, client_rt.handle());
    }
    client_rt.block_on(async {
        while let Some(done) = closing.join_next().await {
            if let (i, Err(e)) = done.unwrap() {
                close_failures.push((i, e));
            }
        }
    });
    close_failures.sort();
    let settle = Instant::now();
    let mut last = app.fresh_status();
    while last.ended + last.broken < n && settle.elapsed() < Duration::from_secs(10) {
        last = app.fresh_status();
    }
    let ended = last.ended;

    eprintln!(
        "upgrade load: N={n}; opened in {opened_in:?}; hand-over (SIGTERM to A's exit) \
         {handed_in:?}; A RSS {} before SIGTERM, peak {} (VmHWM {}); B RSS {} before, {} at A's \
         exit, {} after, peak {}, {} 2 s later ({samples} samples); B adopted={} orphans={} \
         packets={} ended-early={ended_early} closed={closed_by_b}; A taken={} closed={}; all {} \
         answered again {:?} after A's exit ({:?} after SIGTERM), {failed_after} failed; clean \
         closes {}/{n}; app accepted {accepted_before_close}, ended {ended} \
         ({ended_before_close} before the client closed), reset {}",
        mib(rss_a_before),
        mib(peak_a),
        mib(hwm_a),
        mib(rss_b_before),
        mib(rss_b_at_a_exit),
        mib(rss_b_after),
        mib(peak_b),
        mib(rss_b_settled),
        adopted.map_or("?".into(), |v| v.to_string()),
        orphans.map_or("?".into(), |v| v.to_string()),
        packets.map_or("?".into(), |v| v.to_string()),
        taken.map_or("?".into(), |v| v.to_string()),
        closed_by_a.map_or("?".into(), |v| v.to_string()),
        n - failed_after,
        answered_after_exit,
        answered_after_sigterm,
        n - close_failures.len(),
        last.broken,
    );

    let mut problems = Vec::new();
    if failed_after > 0 {
        problems.push(format!("after the upgrade: {after_failures}"));
    }
    if accepted_before_close != n {
        problems.push(format!(
            "the application accepted {accepted_before_close} connections, not {n}: a connection was \
             re-made (duplicated) or lost"
        ));
    }
    if last.seen_twice_count > 0 || last.never_seen > 0 {
        problems.push(format!(
            "first messages seen twice for {} indices ({:?}…), never for {}",
            last.seen_twice_count, last.seen_twice, last.never_seen
        ));
    }
    if last.unexpected > 0 {
        problems.push(format!(
            "{} unexpected lines at the application, the first: {:?}",
            last.unexpected, last.unexpected_first
        ));
    }
    if ended_before_close > 0 || before_close.broken > 0 {
        problems.push(format!(
            "before the client closed anything, the application saw {ended_before_close} connections end \
             and {} break, the first: {broken_before_close:?}",
            before_close.broken,
        ));
    }
    if !close_failures.is_empty() {
        problems.push(format!("closing: {}", describe(&close_failures, n)));
    }
    if last.broken > 0 || ended != n {
        problems.push(format!(
            "the application saw {ended} of {n} connections end with EOF and {} with an error, \
             the first: {:?}",
            last.broken, last.broken_first
        ));
    }
    if adopted != Some(2 * n as u64) {
        problems.push(format!(
            "B adopted {adopted:?} connections, not both ends of {n} ({})",
            2 * n
        ));
    }
    if handed_in >= Duration::from_secs(20) {
        problems.push(format!(
            "A took {handed_in:?} to leave (its drain deadline is 60 s)"
        ));
    }
    if b.0.try_wait().unwrap().is_some() {
        problems.push("B exited".into());
    }
    if !problems.is_empty() {
        panic!("{}\n{}", problems.join("\n"), keep_logs(&node));
    }
}
