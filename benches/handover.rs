//! Handing idle connections from an old proxy process to a new one, against creating them.
//!
//! Job: for each N, per round: a second process of this binary (the apps) opens N loopback TCP
//! connections to this one, which accepts them (timed: the baseline); then this process hands the N
//! proxy ends over with `meshnode::upgrade::handover::send`:
//!
//! | row | what is timed |
//! |---|---|
//! | creating the connections (baseline) | from telling the apps process to connect until this one accepted all N |
//! | hand-over to another process | `send` to a third process of this binary running `Receiver::accept_all`: hello, every batch and its ack, end (the receiver has taken all N when `send` returns) |
//! | hand-over between two tasks | `send` and `accept_all` as two tasks of this process, over the same kind of unix socket |
//!
//! Each connection carries the metadata an idle proxied connection would (pod uid, addresses, a SPIFFE
//! identity) and no buffered bytes. Three processes, so that no process holds more than about N + 253
//! descriptors: the fd limit (raised to the hard one) must allow N + 1000, or that N is skipped.
//!
//! Inputs: `BENCH_HANDOVER_SIZES` [1000,10000], `BENCH_HANDOVER_ROUNDS` [3]. Output (stdout): a Markdown
//! table, the median round of each row: total time, time per connection, packets, and the ratio to the
//! baseline of the same N. Run: `cargo bench --bench handover`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use meshnode::upgrade::handover::{self, Direction, Handed, Receiver};

/// Which process this is: unset for the bench itself, else `apps` or `receiver`.
const ROLE: &str = "MESHNODE_HANDOVER_BENCH_ROLE";
/// The apps process's target address, and its connection count.
const ADDR: &str = "MESHNODE_HANDOVER_BENCH_ADDR";
const COUNT: &str = "MESHNODE_HANDOVER_BENCH_N";
/// The receiver process's socket path.
const SOCKET: &str = "MESHNODE_HANDOVER_BENCH_SOCKET";

fn main() {
    let fd_limit = meshnode::app::raise_fd_limit();
    match std::env::var(ROLE).as_deref() {
        Ok("apps") => return apps(),
        Ok("receiver") => return receiver(),
        _ => {}
    }
    let sizes: Vec<usize> = std::env::var("BENCH_HANDOVER_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let rounds: usize = std::env::var("BENCH_HANDOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let (_, hard) = fd_limit.expect("raise the fd limit");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handover.sock");

    println!("handover: {rounds} rounds per N (median shown); apps, sender and receiver processes");
    println!();
    println!("| N | path | total (ms) | per connection (µs) | packets | / creating |");
    println!("|---:|---|---:|---:|---:|---:|");
    for n in sizes {
        if !meshnode::test_gate::needs(
            "handover bench",
            hard >= (n + 1000) as u64,
            &format!(
                "N = {n} needs an fd limit of {}; the hard limit is {hard}",
                n + 1000
            ),
        ) {
            continue;
        }
        let (mut create, mut remote, mut local) = (Vec::new(), Vec::new(), Vec::new());
        let (mut remote_packets, mut local_packets) = (0, 0);
        for _ in 0..rounds {
            let (apps, conns, took) = connect(n);
            create.push(took);
            let (took, packets) = to_process(&rt, &path, conns);
            remote.push(took);
            remote_packets = packets;
            drop(apps);

            let (apps, conns, _) = connect(n);
            let (took, packets) = to_task(&rt, &path, conns);
            local.push(took);
            local_packets = packets;
            drop(apps);
        }
        let base = median(&mut create);
        let row = |name: &str, took: Duration, packets: String| {
            println!(
                "| {n} | {name} | {:.1} | {:.2} | {packets} | {:.2} |",
                took.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e6 / n as f64,
                took.as_secs_f64() / base.as_secs_f64()
            );
        };
        row("creating the connections (baseline)", base, "–".into());
        row(
            "hand-over to another process",
            median(&mut remote),
            remote_packets.to_string(),
        );
        row(
            "hand-over between two tasks",
            median(&mut local),
            local_packets.to_string(),
        );
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The apps process, killed when dropped.
struct Apps(Child);

impl Drop for Apps {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an apps process, tells it to open `n` connections, and accepts them: the proxy ends, as the
/// sender hands them over, and how long creating them took.
fn connect(n: usize) -> (Apps, Vec<(Handed, handover::Fds)>, Duration) {
    let listener = listen(n);
    let mut apps = Apps(
        Command::new(std::env::current_exe().unwrap())
            .env(ROLE, "apps")
            .env(ADDR, listener.local_addr().unwrap().to_string())
            .env(COUNT, n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the apps process"),
    );
    let mut out = BufReader::new(apps.0.stdout.take().unwrap());
    expect_line(&mut out, "ready");
    let started = Instant::now();
    writeln!(apps.0.stdin.as_mut().unwrap(), "go").unwrap();
    let conns = (0..n as u64)
        .map(|id| {
            let (proxy, app) = listener.accept().expect("accept");
            (handed(id, app), OwnedFd::from(proxy).into())
        })
        .collect();
    let took = started.elapsed();
    expect_line(&mut out, "connected");
    (apps, conns, took)
}

/// A loopback listener whose accept queue holds all `n` connections (up to `somaxconn`): with std's 128,
/// the apps process gets ahead of the accept loop, the kernel drops SYNs, and the baseline measures 1 s
/// SYN retransmissions.
fn listen(n: usize) -> TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(n.try_into().unwrap_or(i32::MAX)).unwrap();
    socket.into()
}

fn handed(id: u64, app: SocketAddr) -> Handed {
    Handed {
        id,
        pod: format!("Kubernetes//Pod/default/productpage-v1-6f8b4f5d9c-{id:05}"),
        direction: Direction::Outbound,
        original_dst: "10.96.14.20:9080".parse().unwrap(),
        peer: SocketAddr::new("10.244.1.17".parse().unwrap(), 15008 + (app.port() % 2)),
        peer_identity: "spiffe://cluster.local/ns/default/sa/bookinfo-reviews".into(),
        to_app: Vec::new(),
        to_peer: Vec::new(),
        resume: Vec::new(),
    }
}

fn expect_line(out: &mut BufReader<ChildStdout>, want: &str) -> String {
    let mut line = String::new();
    out.read_line(&mut line).expect("read a child's line");
    assert!(line.starts_with(want), "expected {want:?}, got {line:?}");
    line
}

/// Hands `conns` to a receiver process; how long `send` took and its packets.
fn to_process(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    conns: Vec<(Handed, handover::Fds)>,
) -> (Duration, usize) {
    let n = conns.len();
    let mut receiver = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "receiver")
        .env(SOCKET, path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the receiver process");
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    expect_line(&mut out, "ready");
    let started = Instant::now();
    let report = rt.block_on(handover::send(path, conns));
    let took = started.elapsed();
    assert!(report.error.is_none(), "send: {:?}", report.error);
    assert_eq!(report.taken.len(), n);
    let line = expect_line(&mut out, "received");
    assert_eq!(line.trim(), format!("received {n}"), "receiver");
    receiver.wait().unwrap();
    (took, report.packets)
}

/// Hands `conns` to a receiver task of this process; how long the hand-over took and its packets.
fn to_task(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    conns: Vec<(Handed, handover::Fds)>,
) -> (Duration, usize) {
    let n = conns.len();
    rt.block_on(async {
        let receiver = Receiver::bind(path).unwrap();
        let started = Instant::now();
        let (report, received) = tokio::join!(handover::send(path, conns), receiver.accept_all());
        let took = started.elapsed();
        assert!(report.error.is_none(), "send: {:?}", report.error);
        assert!(received.error.is_none(), "receive: {:?}", received.error);
        assert_eq!(received.conns.len(), n);
        (took, report.packets)
    })
}

/// The apps process: connects N times when told to, then holds the connections until stdin closes.
fn apps() {
    let addr = std::env::var(ADDR).unwrap();
    let n: usize = std::env::var(COUNT).unwrap().parse().unwrap();
    println!("ready");
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    let held: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    println!("connected");
    line.clear();
    let _ = stdin.read_line(&mut line);
    drop(held);
}

/// The receiver process: takes one hand-over and says how many connections it took.
fn receiver() {
    let path = std::env::var(SOCKET).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let received = rt.block_on(async {
        let receiver = Receiver::bind(Path::new(&path)).unwrap();
        println!("ready");
        receiver.accept_all().await
    });
    if let Some(e) = &received.error {
        eprintln!("receiver: {e}");
    }
    println!("received {}", received.conns.len());
}
