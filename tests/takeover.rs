//! A new node proxy taking over a node's pods from the old one, as in a DaemonSet rolling update: in
//! shared mode each pod's listeners (15001/15006/15008) are bound inside the pod's namespace with
//! SO_REUSEPORT (`INPOD_PORT_REUSE`, on by default), so the new proxy binds them while the old one still
//! holds them; the agent hands the new proxy every pod in its ZDS snapshot; the old proxy, stopped,
//! closes its listeners at once and drains its open connections (`CONNECTION_TERMINATION_DEADLINE`).
//!
//! The second proxy runs in a namespace of its own, beside the node's: the readiness (:15021) and metrics
//! (:15020) ports are fixed in `config.rs` (no variable moves them), so two proxies in one namespace
//! collide there and the second one exits on the readiness bind. In Kubernetes each ztunnel pod has its
//! own namespace too; what the two share is the agent's ZDS socket (a path) and the pods' namespaces,
//! which is what a takeover is about. Needs root, `ip`, `nft`, `ss` and containernetworking-plugins.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::cluster::{Node, Pod};
use support::netns::{KillOnDrop, Netns};
use support::upgrade;

/// The ports a proxy binds in each pod it serves.
const POD_PORTS: [u16; 3] = [15001, 15006, 15008];

/// A node whose proxy (A) is started with `INPOD_PORT_REUSE=<reuse>` and a long drain, with a client
/// and a server pod captured and served by it, the server's app answering on :8080 (one line per
/// connection) and echoing on :8081.
fn node_with_pods(reuse: &str) -> (Node, Pod, Pod) {
    node_with_pods_and(reuse, &[])
}

/// [`node_with_pods`], proxy A's environment extended with `extra`.
fn node_with_pods_and(reuse: &str, extra: &[(String, String)]) -> (Node, Pod, Pod) {
    let (node, client, server) = upgrade::node_with_pods(reuse, extra);
    serve_echo(&server, 8081);
    (node, client, server)
}

/// An echo application in `pod` on `port`: every line read is written back.
fn serve_echo(pod: &Pod, port: u16) {
    let ip = pod.ip.expect("pod has an IP");
    let app = pod
        .netns
        .run(move || TcpListener::bind(SocketAddr::new(ip, port)).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Proxy B beside A (see `support::upgrade`).
fn start_second_proxy(node: &Node, ns: &Netns, reuse: &str) -> KillOnDrop {
    upgrade::start_second_proxy(node, ns, reuse, &[])
}

/// Whether the kernel hands connections still queued on a closing listener to another listener of its
/// SO_REUSEPORT group in `pod` (`net.ipv4.tcp_migrate_req`, per namespace, Linux 5.14+, off by default).
///
/// The agent sets it in every pod it captures: without it, a connection that completes its handshake on the
/// old proxy's listener between the proxy's last accept and its close is reset (4 of 65 runs of this test
/// reset one call, each as A stopped; none of 40 with it).
fn migrates_queued_connections(pod: &Pod) -> bool {
    pod.netns
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req"))
        .unwrap_or_else(|e| panic!("net.ipv4.tcp_migrate_req in {}: {e}", pod.name))
        .trim()
        == "1"
}

/// Sockets listening on `port` in `pod`'s namespace (one per proxy serving it).
fn listeners(pod: &Pod, port: u16) -> usize {
    let filter = format!("sport = :{port}");
    let out = pod.netns.exec("ss", &["-H", "-l", "-t", "-n", &filter]);
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// A connection to an echo application, one line at a time.
struct Held {
    stream: TcpStream,
    lines: BufReader<TcpStream>,
}

impl Held {
    fn open(pod: &Pod, dst: SocketAddr) -> std::io::Result<Held> {
        let stream = pod
            .netns
            .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let lines = BufReader::new(stream.try_clone()?);
        Ok(Held { stream, lines })
    }

    /// Writes `msg` as a line and returns the line read back.
    fn echo(&mut self, msg: &str) -> String {
        self.stream
            .write_all(format!("{msg}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        line
    }

    /// Closes the connection (both directions; every handle to it).
    fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Sets its flag when dropped: the calling thread stops also when the test fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Phases of the takeover, as the calls see them.
const BOTH_SERVE: u8 = 0;
const A_STOPPING: u8 = 1;
const A_GONE: u8 = 2;
const PHASES: [&str; 3] = ["A and B serve", "A stopped, draining", "A gone"];

/// What the calls made from the client pod while the proxies changed saw.
#[derive(Default)]
struct Calls {
    ok: usize,
    /// Successful calls made after proxy A had exited (so B served them).
    ok_after_a: usize,
    /// Failed calls: the phase they started in, and why.
    failures: Vec<(&'static str, String)>,
}

/// One call from inside the current namespace: connect, say hello, read the answer to EOF.
fn call_here(dst: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&dst, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"hello\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    if reply.starts_with("app saw") {
        Ok(reply)
    } else {
        Err(format!("answer {reply:?}"))
    }
}

/// Calls `dst` from inside `pod`'s namespace one after the other, each on a new connection, until `stop`.
fn call_in_a_loop(
    pod: &Pod,
    dst: SocketAddr,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Calls>>,
) -> std::thread::JoinHandle<()> {
    let path = format!("/var/run/netns/{}", pod.netns.name);
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("opening the pod's namespace");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        while !stop.load(Ordering::SeqCst) {
            let started_in = phase.load(Ordering::SeqCst);
            let result = call_here(dst);
            let mut c = calls.lock().unwrap();
            match result {
                Ok(_) => {
                    c.ok += 1;
                    if started_in == A_GONE {
                        c.ok_after_a += 1;
                    }
                }
                Err(e) => c.failures.push((PHASES[usize::from(started_in)], e)),
            }
        }
    })
}

#[test]
fn a_second_proxy_takes_over_a_pod_while_the_first_drains_and_no_connection_is_refused() {
    if !support::root_or_skip(
        "a_second_proxy_takes_over_a_pod_while_the_first_drains_and_no_connection_is_refused",
    ) {
        return;
    }
    let (mut node, client, server) = node_with_pods("true");
    let mut a = node.proxy.take().expect("proxy A");
    for p in [&client, &server] {
        for port in POD_PORTS {
            assert_eq!(listeners(p, port), 1, "{} :{port} before B", p.name);
        }
    }

    // A connection opened while only proxy A serves the pods: it lives on A.
    let echo = SocketAddr::new(server.ip.unwrap(), 8081);
    let mut held = Held::open(&client, echo)
        .unwrap_or_else(|e| panic!("connecting through A: {e}\n{}", node.logs()));
    assert_eq!(held.echo("before"), "before\n");

    // The agent turned on the migration of queued connections when it captured the pods.
    assert!(
        migrates_queued_connections(&client),
        "tcp_migrate_req in the client pod"
    );
    assert!(
        migrates_queued_connections(&server),
        "tcp_migrate_req in the server pod"
    );

    // Proxy B connects to the agent, gets both pods in its snapshot and binds beside A in each pod.
    let node_b = Netns::new("nodeb");
    let mut b = start_second_proxy(&node, &node_b, "true");
    for p in [&client, &server] {
        for port in POD_PORTS {
            node.wait_for(
                || listeners(p, port) == 2,
                &format!("{} :{port} held by A and B", p.name),
            );
        }
    }

    // New connections from the client, one after the other, from before A stops to after it is gone.
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);
    let (phase, stop) = (
        Arc::new(AtomicU8::new(BOTH_SERVE)),
        Arc::new(AtomicBool::new(false)),
    );
    let calls = Arc::new(Mutex::new(Calls::default()));
    let _stop_calls = StopOnDrop(stop.clone());
    let caller = call_in_a_loop(&client, dst, phase.clone(), stop.clone(), calls.clone());
    let made = |calls: &Mutex<Calls>| {
        let c = calls.lock().unwrap();
        c.ok + c.failures.len()
    };
    node.wait_for(|| made(&calls) >= 20, "calls while A and B both serve");

    // A is stopped: its listeners close at once, its open connection drains.
    let a_pid = nix::unistd::Pid::from_raw(a.0.id() as i32);
    phase.store(A_STOPPING, Ordering::SeqCst);
    nix::sys::signal::kill(a_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    for p in [&client, &server] {
        for port in POD_PORTS {
            node.wait_for(
                || listeners(p, port) == 1,
                &format!("A's listener on {} :{port} closed", p.name),
            );
        }
    }
    let before = made(&calls);
    node.wait_for(
        || made(&calls) >= before + 20,
        "calls while A drains and B serves",
    );
    assert!(
        a.0.try_wait().unwrap().is_none(),
        "A exited with a connection still open, before its termination deadline\n{}",
        node.logs()
    );
    assert_eq!(
        held.echo("while A drains"),
        "while A drains\n",
        "the connection on A was cut when A stopped accepting"
    );
    // The connection ends; with nothing left to drain, A exits.
    held.close();
    let mut exit = None;
    node.wait_for(
        || {
            exit = a.0.try_wait().unwrap();
            exit.is_some()
        },
        "A to exit once its last connection closed",
    );
    assert!(exit.unwrap().success(), "A exited with {exit:?}");
    phase.store(A_GONE, Ordering::SeqCst);
    node.wait_for(
        || calls.lock().unwrap().ok_after_a >= 20,
        "calls served by B alone",
    );
    stop.store(true, Ordering::SeqCst);
    caller.join().unwrap();

    let calls = calls.lock().unwrap();
    eprintln!(
        "takeover: {} calls, {} of them after A exited, {} failed",
        calls.ok + calls.failures.len(),
        calls.ok_after_a,
        calls.failures.len()
    );
    assert!(
        calls.failures.is_empty(),
        "{} of {} calls failed during the takeover, the first: {:?}\n{}",
        calls.failures.len(),
        calls.ok + calls.failures.len(),
        &calls.failures[..calls.failures.len().min(5)],
        node.logs()
    );
    // B still serves the pods on its own.
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "B exited\n{}",
        node.logs()
    );
    for p in [&client, &server] {
        for port in POD_PORTS {
            assert_eq!(listeners(p, port), 1, "{} :{port} after A", p.name);
        }
    }
}

#[test]
fn without_port_reuse_a_second_proxy_cannot_bind_a_served_pod_and_nacks_it() {
    if !support::root_or_skip(
        "without_port_reuse_a_second_proxy_cannot_bind_a_served_pod_and_nacks_it",
    ) {
        return;
    }
    let (node, client, server) = node_with_pods("false");
    let node_b = Netns::new("nodeb");
    let _b = start_second_proxy(&node, &node_b, "false");
    // B was handed both pods and could bind neither (A holds the ports, without SO_REUSEPORT): it NACKed
    // them, and the agent received the NACKs.
    let b_log = || std::fs::read_to_string(node.path("proxy-b.log")).unwrap_or_default();
    for p in [&client, &server] {
        node.wait_for(
            || {
                let log = b_log();
                log.lines().any(|l| {
                    l.contains("NACK to the CNI agent")
                        && l.contains(&p.uid)
                        && l.contains("binding :15001")
                })
            },
            &format!("B's NACK of {} (port taken)", p.name),
        );
        node.wait_for(
            || {
                node.logs().lines().any(|l| {
                    l.contains("snapshot entry rejected")
                        && l.contains(&format!("node proxy rejected workload {}", p.uid))
                })
            },
            &format!("the agent receiving B's NACK of {}", p.name),
        );
        for port in POD_PORTS {
            assert_eq!(listeners(p, port), 1, "{} :{port}: B bound it", p.name);
        }
    }
}

/// One line of a [`Flow`]'s stream: numbered, about 200 bytes, different for each flow and line.
fn flow_line(flow: u8, n: u64, out: &mut Vec<u8>) {
    let pad = char::from(b'a' + (n % 26) as u8).to_string().repeat(180);
    out.extend_from_slice(format!("{flow:02}-{n:010}-{pad}\n").as_bytes());
}

/// A long-lived bulk flow through the echo application: a writer sends numbered lines (about 2 MB/s)
/// until told to stop, then closes its side; a reader checks every byte that comes back, in order.
struct Flow {
    stop: Arc<AtomicBool>,
    writer: std::thread::JoinHandle<std::io::Result<u64>>,
    reader: std::thread::JoinHandle<Result<u64, String>>,
}

impl Flow {
    fn start(pod: &Pod, dst: SocketAddr, flow: u8) -> Flow {
        let stream = pod
            .netns
            .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .expect("connecting the flow");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = stream;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let writer = std::thread::spawn(move || {
            let (mut n, mut sent, mut chunk) = (0u64, 0u64, Vec::new());
            while !stopping.load(Ordering::SeqCst) {
                chunk.clear();
                for _ in 0..20 {
                    flow_line(flow, n, &mut chunk);
                    n += 1;
                }
                w.write_all(&chunk)?;
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(2));
            }
            w.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        });
        let reader = std::thread::spawn(move || {
            let (mut n, mut at, mut expected, mut buf) = (0u64, 0u64, Vec::new(), vec![0u8; 65536]);
            let mut offset = 0usize;
            loop {
                let got = match r.read(&mut buf) {
                    Ok(0) => return Ok(at),
                    Ok(k) => k,
                    Err(e) => {
                        return Err(format!("flow {flow}: read failed after {at} bytes: {e}"))
                    }
                };
                for &b in &buf[..got] {
                    if offset == expected.len() {
                        expected.clear();
                        offset = 0;
                        flow_line(flow, n, &mut expected);
                        n += 1;
                    }
                    if b != expected[offset] {
                        return Err(format!("flow {flow}: byte {at} differs (line {})", n - 1));
                    }
                    offset += 1;
                    at += 1;
                }
            }
        });
        Flow {
            stop,
            writer,
            reader,
        }
    }

    /// Stops writing and waits for the echo of everything written: the bytes sent, each way.
    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self
            .writer
            .join()
            .unwrap()
            .map_err(|e| format!("writing failed: {e}"))?;
        let read = self.reader.join().unwrap()?;
        if read != sent {
            return Err(format!("{sent} bytes sent, {read} echoed back"));
        }
        Ok(sent)
    }
}

/// An HTTP/2 (cleartext, prior knowledge) echo in `pod` on `port`, as a gRPC bidirectional-streaming
/// service behaves: each request stream's body comes back as its response body, chunk by chunk.
fn serve_h2_echo(pod: &Pod, port: u16) {
    let ip = pod.ip.expect("pod has an IP");
    let listener = pod
        .netns
        .run(move || TcpListener::bind(SocketAddr::new(ip, port)).unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let Ok(mut send) =
                                respond.send_response(http::Response::new(()), false)
                            else {
                                return;
                            };
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                if send.send_data(chunk, false).is_err() {
                                    return;
                                }
                            }
                            let _ = send.send_data(bytes::Bytes::new(), true);
                        });
                    }
                });
            }
        });
    });
}

/// A gRPC-like bidirectional stream: one HTTP/2 request whose body the client streams (numbered lines,
/// as a [`Flow`]'s) while it reads the echoed response body and checks every byte.
struct H2Flow {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64, String>>,
}

impl H2Flow {
    fn start(pod: &Pod, dst: SocketAddr) -> H2Flow {
        const FLOW: u8 = 9;
        let tcp = pod
            .netns
            .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .expect("connecting the HTTP/2 flow");
        tcp.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
                let (client, conn) = h2::client::handshake(tcp)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                tokio::spawn(conn);
                let mut client = client.ready().await.map_err(|e| e.to_string())?;
                let req = http::Request::post(format!("http://{dst}/echo.Echo/Stream"))
                    .body(())
                    .unwrap();
                let (answer, mut send) = client
                    .send_request(req, false)
                    .map_err(|e| format!("request: {e}"))?;
                let writer = tokio::spawn(async move {
                    let (mut n, mut sent) = (0u64, 0u64);
                    while !stopping.load(Ordering::SeqCst) {
                        let mut chunk = Vec::new();
                        for _ in 0..10 {
                            flow_line(FLOW, n, &mut chunk);
                            n += 1;
                        }
                        sent += chunk.len() as u64;
                        send.send_data(chunk.into(), false)
                            .map_err(|e| format!("sending after {sent} bytes: {e}"))?;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    send.send_data(bytes::Bytes::new(), true)
                        .map_err(|e| format!("ending the stream: {e}"))?;
                    Ok::<u64, String>(sent)
                });
                let mut body = answer
                    .await
                    .map_err(|e| format!("response: {e}"))?
                    .into_body();
                let (mut n, mut at, mut expected, mut offset) = (0u64, 0u64, Vec::new(), 0usize);
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.map_err(|e| format!("reading after {at} bytes: {e}"))?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    for &b in chunk.iter() {
                        if offset == expected.len() {
                            expected.clear();
                            offset = 0;
                            flow_line(FLOW, n, &mut expected);
                            n += 1;
                        }
                        if b != expected[offset] {
                            return Err(format!("byte {at} differs (line {})", n - 1));
                        }
                        offset += 1;
                        at += 1;
                    }
                }
                let sent = writer.await.map_err(|e| e.to_string())??;
                if sent != at {
                    return Err(format!("{sent} bytes sent, {at} echoed back"));
                }
                Ok(sent)
            })
        });
        H2Flow { stop, thread }
    }

    /// Ends the request body and waits for the whole echo: the bytes sent, each way.
    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[test]
fn an_upgraded_proxy_hands_its_open_connections_to_the_new_one_and_none_is_reset() {
    if !support::root_or_skip(
        "an_upgraded_proxy_hands_its_open_connections_to_the_new_one_and_none_is_reset",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = upgrade::handover_env(&dir.path().join("handover.sock"));
    let (mut node, client, server) = node_with_pods_and("true", &env);
    let mut a = node.proxy.take().expect("proxy A");

    // Connections opened while only proxy A serves the pods: both their ends (the client pod's outbound
    // and the server pod's inbound) live on A.
    let echo = SocketAddr::new(server.ip.unwrap(), 8081);
    let mut held = Held::open(&client, echo)
        .unwrap_or_else(|e| panic!("connecting through A: {e}\n{}", node.logs()));
    assert_eq!(held.echo("before"), "before\n");
    let flows: Vec<Flow> = (0..3).map(|i| Flow::start(&client, echo, i)).collect();
    serve_h2_echo(&server, 8082);
    let h2_flow = H2Flow::start(&client, SocketAddr::new(server.ip.unwrap(), 8082));
    std::thread::sleep(Duration::from_millis(500));

    // The CNI agent restarts meanwhile: it is not on the data path, so nothing open notices.
    node.agent = None;
    std::thread::sleep(Duration::from_millis(200));
    node.start_agent();
    assert_eq!(held.echo("agent back"), "agent back\n");

    // Proxy B starts beside A, serves the pods and listens on the hand-over socket.
    let node_b = Netns::new("nodeb");
    let (mut b, b_log) = upgrade::start_second_proxy_taking_handovers(&node, &node_b, &env);

    // A is told to stop: it hands every connection to B and exits without waiting for them to end.
    let handed_in = upgrade::stop(
        &node,
        &mut a,
        "A to exit after handing its connections over",
    );
    // Its termination deadline is 60 s: exiting well before means nothing was left to drain.
    assert!(
        handed_in < Duration::from_secs(20),
        "A took {handed_in:?} to leave\n{}",
        node.logs()
    );

    // Every connection carries on through B: the held one answers, the flows keep flowing.
    assert_eq!(
        held.echo("after A"),
        "after A\n",
        "the held connection after the hand-over\n{}",
        node.logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut total = 0;
    for (i, flow) in flows.into_iter().enumerate() {
        match flow.finish() {
            Ok(sent) => total += sent,
            Err(e) => panic!("flow {i}: {e}\n{}", node.logs()),
        }
    }
    let h2_bytes = h2_flow
        .finish()
        .unwrap_or_else(|e| panic!("HTTP/2 stream: {e}\n{}", node.logs()));
    assert_eq!(held.echo("last"), "last\n");
    held.close();
    let b_said = std::fs::read_to_string(&b_log).unwrap();
    assert!(
        b_said.contains("adopted=10"),
        "B did not adopt both ends of the 5 connections\n{}",
        node.logs()
    );
    // B's access lines for the echo connections (both sides of the 3 flows and the held one, written
    // as each side finishes) count their whole life, from when they opened on A.
    let durations = || -> Vec<u64> {
        std::fs::read_to_string(&b_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("connection complete") && l.contains(":8081"))
            .filter_map(|l| {
                let ms = l.split("duration=\"").nth(1)?.split("ms\"").next()?;
                ms.parse().ok()
            })
            .collect()
    };
    node.wait_for(
        || durations().len() >= 8,
        "B's access lines for both sides of the echo connections",
    );
    let lived = durations();
    assert!(
        lived.iter().all(|ms| *ms >= 1000),
        "durations of the echo connections' access lines on B: {lived:?}\n{b_said}"
    );
    eprintln!(
        "hand-over: A left {handed_in:?} after SIGTERM; {total} bytes each way on 3 TCP flows and {h2_bytes} on an HTTP/2 stream checked across it"
    );
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "B exited\n{}",
        node.logs()
    );
}

#[test]
fn a_restarted_proxy_leaves_its_open_connections_with_the_cni_agent_until_it_is_back_and_none_is_reset(
) {
    if !support::root_or_skip(
        "a_restarted_proxy_leaves_its_open_connections_with_the_cni_agent_until_it_is_back_and_none_is_reset",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = upgrade::handover_env(&dir.path().join("handover.sock"));
    let (mut node, client, server) = node_with_pods_and("true", &env);
    let mut a = node.proxy.take().expect("proxy A");
    let echo = SocketAddr::new(server.ip.unwrap(), 8081);
    let mut held = Held::open(&client, echo)
        .unwrap_or_else(|e| panic!("connecting through A: {e}\n{}", node.logs()));
    assert_eq!(held.echo("before"), "before\n");
    let flows: Vec<Flow> = (0..2).map(|i| Flow::start(&client, echo, i)).collect();
    serve_h2_echo(&server, 8082);
    let h2_flow = H2Flow::start(&client, SocketAddr::new(server.ip.unwrap(), 8082));
    std::thread::sleep(Duration::from_millis(500));

    // A restart, not a rolling update: A is told to stop with no new proxy beside it. It hands its
    // connections to the CNI agent and exits.
    upgrade::stop(
        &node,
        &mut a,
        "A to exit after handing its connections to the agent",
    );
    let logs = node.logs();
    assert!(
        logs.contains("handed to the CNI agent"),
        "A did not hand its connections to the agent\n{logs}"
    );
    // Nobody serves the pods for a while (a container restart's gap); the apps keep writing meanwhile,
    // into their sockets, which the agent holds.
    std::thread::sleep(Duration::from_millis(1500));
    held.stream.write_all(b"during the gap\n").unwrap();

    // The proxy comes back (the same configuration: the same container restarted) and takes them.
    node.start_proxy();
    let mut line = String::new();
    held.lines.read_line(&mut line).unwrap();
    assert_eq!(line, "during the gap\n", "{}", node.logs());
    assert_eq!(held.echo("after the restart"), "after the restart\n");
    std::thread::sleep(Duration::from_millis(500));
    let mut total = 0;
    for (i, flow) in flows.into_iter().enumerate() {
        match flow.finish() {
            Ok(sent) => total += sent,
            Err(e) => panic!("flow {i}: {e}\n{}", node.logs()),
        }
    }
    let h2_bytes = h2_flow
        .finish()
        .unwrap_or_else(|e| panic!("HTTP/2 stream: {e}\n{}", node.logs()));
    held.close();
    let logs = node.logs();
    assert!(
        logs.contains("held connections handed on to the new proxy") && logs.contains("adopted=8"),
        "the agent did not hand both ends of the 4 connections to the restarted proxy\n{logs}"
    );
    eprintln!(
        "restart: {total} bytes each way on 2 TCP flows and {h2_bytes} on an HTTP/2 stream checked across a 1.5 s gap"
    );
}

#[test]
fn a_proxy_killed_with_sigkill_takes_its_open_connections_with_it_and_the_new_one_serves_new_ones()
{
    if !support::root_or_skip(
        "a_proxy_killed_with_sigkill_takes_its_open_connections_with_it_and_the_new_one_serves_new_ones",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = upgrade::handover_env(&dir.path().join("handover.sock"));
    let (mut node, client, server) = node_with_pods_and("true", &env);
    let mut a = node.proxy.take().expect("proxy A");
    let echo = SocketAddr::new(server.ip.unwrap(), 8081);
    let mut held = Held::open(&client, echo)
        .unwrap_or_else(|e| panic!("connecting through A: {e}\n{}", node.logs()));
    assert_eq!(held.echo("before"), "before\n");
    let node_b = Netns::new("nodeb");
    let _b = upgrade::start_second_proxy(&node, &node_b, "true", &env);

    // SIGKILL: A cannot hand anything over. The application sockets it held (the client's connection
    // to its proxy, and the proxy's connection to the server) are closed by the kernel with it, so the
    // application sees its connection end: this is what a kill loses.
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    held.stream
        .write_all(b"after the kill\n")
        .unwrap_or_default();
    let mut line = String::new();
    let read = held.lines.read_line(&mut line);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection outlived the process that held its socket: {read:?} {line:?}"
    );
    // New connections go to B.
    let mut again = Held::open(&client, echo)
        .unwrap_or_else(|e| panic!("connecting through B: {e}\n{}", node.logs()));
    assert_eq!(again.echo("through B"), "through B\n");
}

/// The node's workloads with the server pod speaking plain TCP (`protocol: TCP`, no policy): the client's
/// proxy sends to it without HBONE (outbound `Up::Plain`), and the server pod's proxy takes the
/// connection on :15006 (plaintext inbound) — both ends of every connection plain.
fn workloads_with_a_plain_server(client: &Pod, server: &Pod) -> String {
    let mut y = String::from("workloads:\n");
    for (p, protocol) in [(client, "HBONE"), (server, "TCP")] {
        y += &format!(
            "- uid: cluster1//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {name}\n  workloadIps: [\"{ip}\"]\n  protocol: {protocol}\n",
            ns = p.namespace,
            name = p.name,
            ip = p.ip.unwrap()
        );
    }
    y
}

/// An application in `pod` on `port` that reads each connection to its EOF, then writes `lines` numbered
/// lines, one every 50 ms, and closes: its connections live on half-closed.
fn serve_after_eof(pod: &Pod, port: u16, lines: u64) {
    let ip = pod.ip.expect("pod has an IP");
    let app = pod
        .netns
        .run(move || TcpListener::bind(SocketAddr::new(ip, port)).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let mut asked = Vec::new();
                if (&s).read_to_end(&mut asked).is_err() {
                    return;
                }
                for n in 0..lines {
                    if (&s)
                        .write_all(format!("{n} after {} bytes\n", asked.len()).as_bytes())
                        .is_err()
                    {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
}

#[test]
fn an_upgraded_proxy_hands_its_plain_tcp_connections_over_too_and_none_loses_a_byte() {
    if !support::root_or_skip(
        "an_upgraded_proxy_hands_its_plain_tcp_connections_over_too_and_none_loses_a_byte",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = upgrade::handover_env(&dir.path().join("handover.sock"));
    let (mut node, client, server) = node_with_pods_and("true", &env);
    let mut a = node.proxy.take().expect("proxy A");
    node.set_local_config(&workloads_with_a_plain_server(&client, &server));
    support::cluster::settle();
    const LINES: u64 = 100;
    serve_after_eof(&server, 8083, LINES);

    // Opened through A, plain both ways: echo flows, a held connection, and one the client has
    // half-closed (the server answers after its EOF, across the upgrade).
    let server_ip = server.ip.unwrap();
    let echo = SocketAddr::new(server_ip, 8081);
    let mut held = Held::open(&client, echo)
        .unwrap_or_else(|e| panic!("connecting through A: {e}\n{}", node.logs()));
    assert_eq!(held.echo("before"), "before\n");
    let flows: Vec<Flow> = (0..3).map(|i| Flow::start(&client, echo, i)).collect();
    let half = {
        let dst = SocketAddr::new(server_ip, 8083);
        let mut s = client
            .netns
            .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"go\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::spawn(move || {
            let mut got = String::new();
            s.read_to_string(&mut got).map(|_| got)
        })
    };
    std::thread::sleep(Duration::from_millis(1000));

    // B starts beside A; A is told to stop and hands everything over.
    let node_b = Netns::new("nodeb");
    let (mut b, b_log) = upgrade::start_second_proxy_taking_handovers(&node, &node_b, &env);
    let handed_in = upgrade::stop(
        &node,
        &mut a,
        "A to exit after handing its connections over",
    );
    assert!(
        handed_in < Duration::from_secs(20),
        "A took {handed_in:?} to leave (its drain is 60 s)\n{}",
        node.logs()
    );

    // Every connection carries on through B, every byte once and in order.
    assert_eq!(
        held.echo("after A"),
        "after A\n",
        "the held connection after the hand-over\n{}",
        node.logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut total = 0;
    for (i, flow) in flows.into_iter().enumerate() {
        match flow.finish() {
            Ok(sent) => total += sent,
            Err(e) => panic!("flow {i}: {e}\n{}", node.logs()),
        }
    }
    let answer = half
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the half-closed connection: {e}\n{}", node.logs()));
    let want: String = (0..LINES).map(|n| format!("{n} after 3 bytes\n")).collect();
    assert_eq!(
        answer,
        want,
        "the half-closed connection's answer\n{}",
        node.logs()
    );
    assert_eq!(held.echo("last"), "last\n");
    held.close();

    // B adopted both ends (the client pod's outbound, the server pod's plaintext inbound) of the 5, and
    // its access lines for them (plain: `dst.addr` the app's port, no HBONE) cover their whole life.
    let b_said = std::fs::read_to_string(&b_log).unwrap();
    assert!(
        b_said.contains("adopted=10"),
        "B did not adopt both ends of the 5 plain connections\n{}",
        node.logs()
    );
    let plain_lines = || -> Vec<(String, u64)> {
        std::fs::read_to_string(&b_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("connection complete"))
            .filter(|l| {
                l.contains(&format!("{server_ip}:8081")) || l.contains(&format!("{server_ip}:8083"))
            })
            .filter_map(|l| {
                let direction = l.split("direction=\"").nth(1)?.split('"').next()?;
                let ms = l.split("duration=\"").nth(1)?.split("ms\"").next()?;
                Some((direction.to_string(), ms.parse().ok()?))
            })
            .collect()
    };
    node.wait_for(
        || plain_lines().len() >= 10,
        "B's access lines for both ends of the plain connections",
    );
    let lines = plain_lines();
    assert!(
        lines.iter().all(|(_, ms)| *ms >= 1000),
        "durations of the plain connections' access lines on B: {lines:?}\n{b_said}"
    );
    for direction in ["outbound", "inbound"] {
        assert_eq!(
            lines.iter().filter(|(d, _)| d == direction).count(),
            5,
            "{direction} access lines on B: {lines:?}\n{b_said}"
        );
    }
    assert!(
        !b_said
            .lines()
            .any(|l| l.contains("hbone_addr") && l.contains(&format!("{server_ip}:808"))),
        "a connection to the plain server went over HBONE\n{b_said}"
    );
    let a_said = std::fs::read_to_string(node.path("proxy0.log")).unwrap_or_default();
    eprintln!(
        "plain hand-over: A left {handed_in:?} after SIGTERM; {total} bytes each way on 3 plain TCP flows checked across it"
    );
    assert!(
        !a_said.contains("connection closed: paused after"),
        "A closed a connection it paused late\n{a_said}"
    );
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "B exited\n{}",
        node.logs()
    );
}
