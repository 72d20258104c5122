//! Multi-network: a client on network `net1` reaches a service whose endpoint is on `net2` only through
//! `net2`'s east-west gateway, with double HBONE, as Istio ambient does across networks. Real processes in
//! network namespaces: the client pod's node proxy (dedicated mode, its outbound captured by iptables),
//! `meshnode gateway` in a namespace of its own, and the server pod's node proxy. The client's namespace
//! has no route to the server's: only the gateway joins the two.
//!
//! - the call arrives, and each hop saw the identity it should: the gateway terminated the outer tunnel
//!   (the client's identity in its access line, forwarded to the server's proxy), the server's proxy
//!   terminated the inner one (the client's identity again, from the inner TLS, the source marked as
//!   from another network);
//! - a service whose names (subject alt names) the server cannot present is refused inside the gateway's
//!   tunnel: the inner identity check is the client's own;
//! - a gateway that presents another identity than the state gives it is refused at the outer tunnel;
//! - a workload on another network without a gateway is never dialled: refused;
//! - with resumable streams on, a long-lived double-HBONE connection survives a restart of the client's
//!   node proxy and then of the server's (each holding its connections with a `meshnode cni-agent` of
//!   its own meanwhile): every byte arrives once and in order, both ways.
//!
//! Needs root, `ip`, `iptables`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::dedicated::{call, capture_outbound, serve_app, subnet, wait_ready, System};
use support::mesh_yaml::{self, behind_gateway, serves};
use support::netns::{veth, KillOnDrop, Netns};

const VIP: &str = "10.96.0.10";
const WRONG_SAN_VIP: &str = "10.96.0.11";
const IMPOSTOR_VIP: &str = "10.96.0.12";
const NO_GATEWAY_VIP: &str = "10.96.0.13";

/// A workload of the mesh, on a node of its own.
fn workload(name: &str, ns: &str, sa: &str, ip: &str, network: &str, extra: &str) -> String {
    mesh_yaml::workload(
        name,
        ns,
        sa,
        ip,
        network,
        &format!("  node: node-{name}\n{extra}"),
    )
}

/// The hostname of service `name` in `default`.
fn host(name: &str) -> String {
    format!("{name}.default.svc.cluster.local")
}

/// Service `name` of `default`, its VIP `vip` on every network of the mesh.
fn service(name: &str, vip: &str, extra: &str) -> String {
    mesh_yaml::service(
        name,
        &host(name),
        vip,
        &["net1", "net2", "net3", "net4"],
        extra,
    )
}

/// The mesh: client on net1; server on net2 behind the gateway at `gw_ip`; `ghost` on net3 behind an
/// "impostor" gateway (same address, another identity); `lost` on net4 with no gateway at all.
fn mesh(client_ip: &str, gw_ip: &str, server_ip: &str, n: u8) -> String {
    let gw = |net: &str| behind_gateway(net, gw_ip);
    let mut y = String::from("workloads:\n");
    y += &workload("client", "default", "sleep", client_ip, "net1", "");
    y += &workload(
        "ew-gateway",
        "istio-system",
        "istio-eastwestgateway",
        gw_ip,
        "net2",
        "",
    );
    y += &workload(
        "server",
        "default",
        "httpbin",
        server_ip,
        "net2",
        &(gw("net2") + &serves(&[&host("echo"), &host("wrong-san")])),
    );
    y += &workload("impostor", "istio-system", "impostor", gw_ip, "net3", "");
    y += &workload(
        "ghost",
        "default",
        "httpbin",
        &format!("10.{n}.3.1"),
        "net3",
        &(gw("net3") + &serves(&[&host("ghost")])),
    );
    y += &workload(
        "lost",
        "default",
        "httpbin",
        &format!("10.{n}.4.1"),
        "net4",
        &serves(&[&host("lost")]),
    );
    y += "services:\n";
    y += &service("echo", VIP, "");
    y += &service(
        "wrong-san",
        WRONG_SAN_VIP,
        "  subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/not-httpbin\"]\n",
    );
    y += &service("ghost", IMPOSTOR_VIP, "");
    y += &service("lost", NO_GATEWAY_VIP, "");
    y
}

fn start_gateway(ns: &Netns, config: &Path, dir: &Path) -> KillOnDrop {
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    let state_dir = dir.join("state");
    let env = [
        ("NETWORK", "net2"),
        ("POD_NAMESPACE", "istio-system"),
        ("LOCAL_XDS_PATH", config.to_str().unwrap()),
        ("XDS_ADDRESS", ""),
        ("MESHNODE_STATE_DIR", state_dir.to_str().unwrap()),
        ("RUST_LOG", "info"),
    ];
    KillOnDrop(ns.spawn(env!("CARGO_BIN_EXE_meshnode"), &["gateway"], &env, log))
}

fn with_network(network: &str) -> Vec<(&'static str, String)> {
    vec![("NETWORK", network.to_string())]
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Waits up to 5 s for `needle` in log `name`.
fn wait_log(dir: &Path, name: &str, needle: &str) -> String {
    for _ in 0..50 {
        let l = log(dir, name);
        if l.contains(needle) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} never said {needle:?}; it says:\n{}", log(dir, name));
}

#[test]
fn a_service_on_another_network_is_reached_through_its_gateway_with_each_hop_checking_identity() {
    if !support::root_or_skip(
        "a_service_on_another_network_is_reached_through_its_gateway_with_each_hop_checking_identity",
    ) {
        return;
    }
    let n = subnet();
    let (client_ip, gw_ip_a) = (format!("10.{n}.1.1"), format!("10.{n}.1.2"));
    let (gw_ip_b, server_ip) = (format!("10.{n}.2.2"), format!("10.{n}.2.1"));
    let client = Netns::new("mnc");
    let gateway = Netns::new("mng");
    let server = Netns::new("mns");
    let (client_dev, _) = veth(
        &client,
        &format!("{client_ip}/24"),
        &gateway,
        &format!("{gw_ip_a}/24"),
    );
    // Service VIPs route out of the pod (to be captured); the server's subnet does not.
    client.ip(&["route", "add", "10.96.0.0/16", "dev", &client_dev]);
    veth(
        &gateway,
        &format!("{gw_ip_b}/24"),
        &server,
        &format!("{server_ip}/24"),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local.yaml");
    std::fs::write(&config, mesh(&client_ip, &gw_ip_a, &server_ip, n)).unwrap();
    serve_app(&server, "0.0.0.0:8080".parse().unwrap());
    let system = System::Meshnode {
        state_dir: dir.path().join("state"),
        ca_dir: None,
    };
    let _client_proxy = support::dedicated::start_proxy_with(
        &system,
        &client,
        "default/client/sleep",
        &config,
        dir.path(),
        "client.log",
        &with_network("net1"),
    );
    let _server_proxy = support::dedicated::start_proxy_with(
        &system,
        &server,
        "default/server/httpbin",
        &config,
        dir.path(),
        "server.log",
        &with_network("net2"),
    );
    let _gateway = start_gateway(&gateway, &config, dir.path());
    wait_ready(&client, dir.path(), "client.log");
    wait_ready(&server, dir.path(), "server.log");
    wait_ready(&gateway, dir.path(), "gateway.log");
    capture_outbound(&client);

    // The client's namespace has no route to the server's: only the gateway can get there.
    let direct = call(&client, format!("{server_ip}:8080").parse().unwrap());
    assert!(
        direct.is_err(),
        "the server must not be reachable directly: {direct:?}"
    );

    // 1. Through the gateway: the answer comes back, and every hop saw whom it should.
    let reply = call(&client, format!("{VIP}:80").parse().unwrap()).unwrap_or_else(|e| {
        panic!(
            "call through the gateway failed: {e}\nclient:\n{}\ngateway:\n{}\nserver:\n{}",
            log(dir.path(), "client.log"),
            log(dir.path(), "gateway.log"),
            log(dir.path(), "server.log")
        )
    });
    assert!(reply.starts_with("app saw "), "{reply}");
    assert!(reply.ends_with("say hello\n"), "{reply}");
    let client_id = "spiffe://cluster.local/ns/default/sa/sleep";
    let gw = wait_log(dir.path(), "gateway.log", "connection complete");
    let line = gw
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    assert!(line.contains(client_id), "gateway saw the client: {line}");
    assert!(
        line.contains("echo.default.svc.cluster.local:80"),
        "gateway routed by service: {line}"
    );
    assert!(line.contains("dst.workload=server"), "{line}");
    let srv = wait_log(dir.path(), "server.log", "connection complete");
    let line = srv
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    assert!(
        line.contains(client_id),
        "server's proxy saw the client: {line}"
    );
    let cli = wait_log(dir.path(), "client.log", "connection complete");
    let line = cli
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    assert!(
        line.contains(&format!("{gw_ip_a}:15008")),
        "client's proxy dialled the gateway: {line}"
    );
    assert!(line.contains("ew-gateway"), "{line}");

    // 2. The inner tunnel's identity check is the client's own: a service whose names the server cannot
    //    present is refused inside the gateway's tunnel.
    let wrong = call(&client, format!("{WRONG_SAN_VIP}:80").parse().unwrap());
    assert!(
        wrong.as_ref().map_or(true, |r| r.is_empty()),
        "inner identity mismatch must fail: {wrong:?}"
    );
    wait_log(dir.path(), "client.log", "inner tunnel through the gateway");

    // 3. A gateway that is not who the state says is refused at the outer tunnel.
    let ghost = call(&client, format!("{IMPOSTOR_VIP}:80").parse().unwrap());
    assert!(
        ghost.as_ref().map_or(true, |r| r.is_empty()),
        "an impostor gateway must be refused: {ghost:?}"
    );
    // The access line is written by the log thread: wait for it rather than read at once.
    let outer_refused = |l: &str| l.contains("TLS handshake") && !l.contains("inner tunnel");
    let mut cli = log(dir.path(), "client.log");
    for _ in 0..50 {
        if cli.lines().any(outer_refused) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        cli = log(dir.path(), "client.log");
    }
    assert!(cli.lines().any(outer_refused), "{cli}");

    // 4. No gateway on the endpoint's network: refused, never dialled.
    let lost = call(&client, format!("{NO_GATEWAY_VIP}:80").parse().unwrap());
    assert!(
        lost.as_ref().map_or(true, |r| r.is_empty()),
        "no gateway, no connection: {lost:?}"
    );
    wait_log(dir.path(), "client.log", "no healthy upstream");

    // And the good path still works after the refusals.
    let again = call(&client, format!("{VIP}:80").parse().unwrap()).unwrap();
    assert!(again.starts_with("app saw "), "{again}");
}

/// The application for the long-lived connection: echoes every connection's bytes back.
fn serve_echo(ns: &Netns, addr: SocketAddr) {
    let app = ns.run(move || TcpListener::bind(addr).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &s, &mut &s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// `meshnode cni-agent` in a namespace of its own, enrolling no pod: it only holds the connections of
/// the proxy whose hand-over socket is `handover` while that proxy restarts.
fn start_holder(dir: &Path, handover: &Path, log_name: &str) -> (Netns, KillOnDrop) {
    let ns = Netns::new("mnh");
    let base = handover.parent().unwrap();
    let agent_yaml = base.join("agent.yaml");
    std::fs::write(&agent_yaml, "namespaces: {}\npods: []\n").unwrap();
    let run = base.join("run");
    let zds = base.join("zds.sock");
    let env = [
        ("MESHNODE_AGENT_CONFIG", agent_yaml.to_str().unwrap()),
        ("CNI_AGENT_RUN_DIR", run.to_str().unwrap()),
        ("ZTUNNEL_UDS_ADDRESS", zds.to_str().unwrap()),
        ("MESHNODE_HANDOVER_SOCKET", handover.to_str().unwrap()),
        ("RUST_LOG", "info"),
    ];
    let log_file = std::fs::File::create(dir.join(log_name)).unwrap();
    let agent = KillOnDrop(ns.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &["cni-agent"],
        &env,
        log_file,
    ));
    let hold = base.join("meshnode-hold.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hold.exists() {
        assert!(
            Instant::now() < deadline,
            "the holder never listened on {}; its log:\n{}",
            hold.display(),
            log(dir, log_name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (ns, agent)
}

/// A connection that carries numbered lines one way and their echo the other, checked as they come.
struct Flow {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<Result<u64, String>>,
    reader: std::thread::JoinHandle<Result<u64, String>>,
}

fn flow_line(n: u64) -> String {
    format!("line {n:08} {}\n", "x".repeat((n % 97) as usize))
}

impl Flow {
    fn start(ns: &Netns, dst: SocketAddr) -> Flow {
        let s = ns
            .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .expect("connecting through the client's proxy");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let mut w = s.try_clone().unwrap();
        let stop_w = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut n = 0;
            while !stop_w.load(Ordering::Relaxed) {
                w.write_all(flow_line(n).as_bytes())
                    .map_err(|e| format!("writing line {n}: {e}"))?;
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            w.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutting down: {e}"))?;
            Ok(n)
        });
        let echoed_r = echoed.clone();
        let reader = std::thread::spawn(move || {
            let mut lines = BufReader::new(s);
            let mut n = 0;
            loop {
                let mut line = String::new();
                match lines.read_line(&mut line) {
                    Ok(0) => return Ok(n),
                    Ok(_) if line == flow_line(n) => {
                        n += 1;
                        echoed_r.store(n, Ordering::Relaxed);
                    }
                    Ok(_) => return Err(format!("line {n}: got {line:?}")),
                    Err(e) => return Err(format!("reading line {n}: {e}")),
                }
            }
        });
        Flow {
            stop,
            echoed,
            writer,
            reader,
        }
    }

    /// Waits (up to 20 s) for more lines echoed than `than`.
    fn progressed(&self, than: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.echoed.load(Ordering::Relaxed) > than + 10 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops writing; the lines written and echoed, which must be the same.
    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let written = self.writer.join().unwrap()?;
        let echoed = self.reader.join().unwrap()?;
        if written != echoed {
            return Err(format!("wrote {written} lines, {echoed} came back"));
        }
        Ok(written)
    }
}

/// SIGTERMs `proxy` and waits for it to exit: it hands its connections to its holder and goes, at once.
fn stop_promptly(proxy: &mut KillOnDrop, what: &str, dir: &Path, log_name: &str) {
    let pid = nix::unistd::Pid::from_raw(proxy.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            assert!(status.success(), "{what} exited with {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what} did not exit within 5 s of SIGTERM (draining?); its log:\n{}",
            log(dir, log_name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let said = log(dir, log_name);
    assert!(
        said.contains("resumable connections handed to the CNI agent"),
        "{what} did not hand its connections to its holder; its log:\n{said}"
    );
}

#[test]
fn a_double_hbone_connection_survives_a_restart_of_either_node_proxy() {
    if !support::root_or_skip("a_double_hbone_connection_survives_a_restart_of_either_node_proxy") {
        return;
    }
    let n = subnet();
    let (client_ip, gw_ip_a) = (format!("10.{n}.1.1"), format!("10.{n}.1.2"));
    let (gw_ip_b, server_ip) = (format!("10.{n}.2.2"), format!("10.{n}.2.1"));
    let client = Netns::new("mnc");
    let gateway = Netns::new("mng");
    let server = Netns::new("mns");
    let (client_dev, _) = veth(
        &client,
        &format!("{client_ip}/24"),
        &gateway,
        &format!("{gw_ip_a}/24"),
    );
    client.ip(&["route", "add", "10.96.0.0/16", "dev", &client_dev]);
    veth(
        &gateway,
        &format!("{gw_ip_b}/24"),
        &server,
        &format!("{server_ip}/24"),
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("local.yaml");
    std::fs::write(&config, mesh(&client_ip, &gw_ip_a, &server_ip, n)).unwrap();
    serve_echo(&server, "0.0.0.0:8080".parse().unwrap());
    let system = System::Meshnode {
        state_dir: d.join("state"),
        ca_dir: None,
    };
    // Each proxy with its own hand-over socket, in a directory of its own (its holder's hold socket is
    // beside it).
    let handover = |side: &str| -> PathBuf {
        let base = d.join(side);
        std::fs::create_dir_all(&base).unwrap();
        base.join(format!("handover-{side}.sock"))
    };
    let (client_handover, server_handover) = (handover("client"), handover("server"));
    let (_client_holder_ns, _client_holder) =
        start_holder(d, &client_handover, "holder-client.log");
    let (_server_holder_ns, _server_holder) =
        start_holder(d, &server_handover, "holder-server.log");
    let env = |network: &str, socket: &Path| -> Vec<(&'static str, String)> {
        vec![
            ("NETWORK", network.to_string()),
            ("MESHNODE_RESUMABLE_STREAMS", "true".to_string()),
            (
                "MESHNODE_HANDOVER_SOCKET",
                socket.to_str().unwrap().to_string(),
            ),
        ]
    };
    let client_env = env("net1", &client_handover);
    let server_env = env("net2", &server_handover);
    let start = |ns: &Netns, workload: &str, log_name: &str, env: &[(&'static str, String)]| {
        let p =
            support::dedicated::start_proxy_with(&system, ns, workload, &config, d, log_name, env);
        wait_ready(ns, d, log_name);
        p
    };
    let _gateway = start_gateway(&gateway, &config, d);
    let mut client_proxy = start(&client, "default/client/sleep", "client.log", &client_env);
    let mut server_proxy = start(&server, "default/server/httpbin", "server.log", &server_env);
    wait_ready(&gateway, d, "gateway.log");
    capture_outbound(&client);
    let logs = || {
        [
            "client.log",
            "client2.log",
            "server.log",
            "server2.log",
            "gateway.log",
            "holder-client.log",
            "holder-server.log",
        ]
        .iter()
        .map(|name| format!("--- {name}:\n{}", log(d, name)))
        .collect::<Vec<_>>()
        .join("\n")
    };

    let flow = Flow::start(&client, format!("{VIP}:80").parse().unwrap());
    assert!(
        flow.progressed(0),
        "no echo through the gateway\n{}",
        logs()
    );

    // (a) The client's node proxy restarts: the connection waits with its holder, the new process
    //     re-dials through the gateway (a new outer stream) and resumes the inner one.
    stop_promptly(&mut client_proxy, "the client's proxy", d, "client.log");
    let before = flow.echoed.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));
    let _client_proxy = start(&client, "default/client/sleep", "client2.log", &client_env);
    assert!(
        flow.progressed(before),
        "the flow did not carry on after the client's proxy restarted\n{}",
        logs()
    );

    // (b) The server's node proxy restarts: the gateway's stream to it breaks, the client re-dials
    //     (the gateway answering 503 while nobody listens) until the new process has the stream.
    stop_promptly(&mut server_proxy, "the server's proxy", d, "server.log");
    let before = flow.echoed.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));
    let _server_proxy = start(
        &server,
        "default/server/httpbin",
        "server2.log",
        &server_env,
    );
    assert!(
        flow.progressed(before),
        "the flow did not carry on after the server's proxy restarted\n{}",
        logs()
    );

    let lines = flow
        .finish()
        .unwrap_or_else(|e| panic!("the double-HBONE flow: {e}\n{}", logs()));
    let client2 = wait_log(d, "client2.log", "connection complete");
    let line = client2
        .lines()
        .find(|l| l.contains("connection complete"))
        .unwrap();
    assert!(line.contains("resumable=true"), "{line}");
    assert!(line.contains("ew-gateway"), "{line}");
    eprintln!("double HBONE: {lines} lines each way checked across a restart of either node proxy");
}
