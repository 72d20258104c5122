//! Waypoint routing with the real capture path: one node built from network namespaces (CNI agent, node
//! proxy in shared mode, `meshnode control-plane`), pods made by the real CNI chain, and `meshnode waypoint`
//! running in a pod of its own (`istio.io/dataplane-mode: none`, as Istio's waypoint pods), configured over
//! xDS with a token for its identity. The client's traffic is captured in its pod as an app's would be.
//!
//! - a service bound to the namespace's waypoint is reached through it: the waypoint counts the client's
//!   identity, the server's proxy counts the waypoint's;
//! - the waypoint takes workload traffic too (`istio.io/waypoint-for: all`): a call to the server's pod IP
//!   goes through it as well;
//! - a service that opts out (`istio.io/use-waypoint: none`) is reached directly with the client's identity;
//! - with the waypoint gone, its service is refused (fail closed), never reached directly, while the
//!   opted-out service keeps working.
//!
//! On the way it checks the node proxy's workload manager families (two captured pods served; the waypoint's
//! pod is not).
//!
//! With resumable streams on, a connection through the waypoint outlives a restart of the node proxy:
//! both of its hops (client pod → waypoint, waypoint → server pod) are resumed.
//!
//! Needs root, `ip`, `nft`, containernetworking-plugins.

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::cluster::{call, serve_app, Node, Pod};
use support::netns::KillOnDrop;

const NODE_TOKEN: &str = "node-proxy-token";
const WAYPOINT_TOKEN: &str = "waypoint-token";
/// The waypoint-bound service and the opted-out one, both backed by the server pod's :9080.
const VIA_WAYPOINT: &str = "10.96.0.50";
const DIRECT: &str = "10.96.0.51";

fn agent_yaml() -> String {
    "namespaces:\n  default: {labels: {istio.io/dataplane-mode: ambient}}\npods:\n\
     - {name: client, namespace: default, serviceAccount: client}\n\
     - {name: server, namespace: default, serviceAccount: server, labels: {app: server}}\n\
     - {name: waypoint-0, namespace: default, serviceAccount: waypoint, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}\n"
        .to_string()
}

/// The mesh: the namespace uses waypoint `waypoint`; `via` is bound to it, `direct` opts out.
fn mesh_yaml(pods: &[&Pod]) -> String {
    let mut y = String::from(
        "namespaces:\n  default: {labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\nworkloads:\n",
    );
    if pods.is_empty() {
        y = y.replace("workloads:\n", "workloads: []\n");
    }
    for p in pods {
        let labels = match p.name.as_str() {
            "waypoint-0" => {
                "{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}"
            }
            "server" => "{app: server}",
            _ => "{}",
        };
        let sa = if p.name == "waypoint-0" {
            "waypoint"
        } else {
            &p.name
        };
        y += &format!(
            "- {{name: {n}, namespace: default, serviceAccount: {sa}, ips: [{ip}], labels: {labels}, node: node1}}\n",
            n = p.name,
            ip = p.ip.unwrap()
        );
    }
    y += &format!(
        "services:\n\
         - {{name: via, namespace: default, vips: [{VIA_WAYPOINT}], ports: [{{port: 80, targetPort: 9080}}], selector: {{app: server}}}}\n\
         - {{name: direct, namespace: default, vips: [{DIRECT}], ports: [{{port: 80, targetPort: 9080}}], selector: {{app: server}}, labels: {{istio.io/use-waypoint: none}}}}\n\
         tokens:\n\
         - {{token: {NODE_TOKEN}, nodeProxy: true, node: node1}}\n\
         - {{token: {WAYPOINT_TOKEN}, namespace: default, serviceAccount: waypoint}}\n\
         istio:\n\
         - apiVersion: gateway.networking.k8s.io/v1\n  kind: Gateway\n  metadata: {{name: waypoint, namespace: default, labels: {{istio.io/waypoint-for: all}}}}\n  spec:\n    gatewayClassName: istio-waypoint\n    listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
    );
    y
}

/// Relays 127.0.0.1:15012 in `pod`'s namespace to the control plane on the node's loopback, so that the
/// waypoint reaches it under a name its serving certificate carries.
fn relay_control_plane(node: &Node, pod: &Pod) {
    let listener = pod
        .netns
        .run(|| TcpListener::bind("127.0.0.1:15012").expect("relay listener"));
    let node_ns = format!("/var/run/netns/{}", node.ns.name);
    std::thread::spawn(move || {
        // This thread (and the copy threads it starts) connect from the node's namespace.
        let fd = std::fs::File::open(&node_ns).expect("opening the node namespace");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        for down in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect("127.0.0.1:15012") else {
                continue;
            };
            for (mut from, mut to) in [
                (down.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, down),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

/// Starts `meshnode waypoint` in `pod` (configured by the control plane) and waits until it is ready.
fn start_waypoint(node: &Node, pod: &Pod) -> KillOnDrop {
    start_waypoint_with(node, pod, &[])
}

/// [`start_waypoint`], its environment extended with `extra`.
fn start_waypoint_with(node: &Node, pod: &Pod, extra: &[(&str, &str)]) -> KillOnDrop {
    let root = node.path("root-cert.pem");
    let root = root.to_str().unwrap();
    let state = node.path("waypoint-state");
    let ip = pod.ip.unwrap().to_string();
    let log = std::fs::File::create(node.path("waypoint.log")).unwrap();
    let child = pod.netns.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &["waypoint"],
        &[
            ("XDS_ADDRESS", "https://127.0.0.1:15012"),
            ("CA_ADDRESS", "https://127.0.0.1:15012"),
            ("XDS_ROOT_CA", root),
            ("CA_ROOT_CA", root),
            ("AUTH_TOKEN", WAYPOINT_TOKEN),
            ("POD_NAMESPACE", "default"),
            ("POD_NAME", "waypoint-0"),
            ("SERVICE_ACCOUNT", "waypoint"),
            ("INSTANCE_IP", &ip),
            ("MESHNODE_STATE_DIR", state.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
        log,
    );
    let waypoint = KillOnDrop(child);
    eventually(node, "the waypoint ready", || {
        pod.netns.http_get(15021, "/healthz/ready").is_some()
    });
    waypoint
}

fn eventually(node: &Node, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out: {what}\n{}", with_waypoint(node));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn answered(pod: &Pod, dst: SocketAddr) -> bool {
    call(pod, dst).is_ok_and(|r| r.starts_with("app saw"))
}

/// The sum of a counter family's samples carrying every one of `labels`, from `/metrics` on :15020 of
/// the namespace `get` reads from.
fn counter(metrics: Option<String>, family: &str, labels: &[&str]) -> u64 {
    metrics
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn captured_traffic_to_a_waypoint_bound_service_goes_through_the_waypoint_and_fails_closed_without_it(
) {
    if !support::root_or_skip(
        "captured_traffic_to_a_waypoint_bound_service_goes_through_the_waypoint_and_fails_closed_without_it",
    ) {
        return;
    }
    let mut node = Node::bare("workloads: []\n");
    std::fs::write(node.path("agent.yaml"), agent_yaml()).unwrap();
    let agent_config = node.path("agent.yaml").to_str().unwrap().to_string();
    node.agent_env = vec![("MESHNODE_AGENT_CONFIG".into(), agent_config)];
    node.start_control_plane(&mesh_yaml(&[]), NODE_TOKEN);
    node.start_agent();
    node.start_proxy();

    let mut client = node.pod("default", "client");
    let mut server = node.pod("default", "server");
    let mut waypoint_pod = node.pod("default", "waypoint-0");
    for p in [&mut client, &mut server, &mut waypoint_pod] {
        node.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, node.logs()));
    }
    assert!(
        support::cluster::rules(&waypoint_pod).is_empty(),
        "a waypoint's pod is not captured"
    );
    // The node proxy's workload manager serves the two captured pods (ztunnel's families).
    eventually(&node, "two pod proxies counted as active", || {
        let m = node.http_get(15020, "/metrics").unwrap_or_default();
        let has = |line: &str| m.lines().any(|l| l == line);
        has("workload_manager_active_proxy_count 2")
            && has("workload_manager_pending_proxy_count 0")
            && has("workload_manager_proxies_started_total 2")
    });
    node.set_mesh(&mesh_yaml(&[&client, &server, &waypoint_pod]));
    serve_app(&server, 9080);
    relay_control_plane(&node, &waypoint_pod);
    let waypoint = start_waypoint(&node, &waypoint_pod);

    let via: SocketAddr = format!("{VIA_WAYPOINT}:80").parse().unwrap();
    let direct: SocketAddr = format!("{DIRECT}:80").parse().unwrap();
    let client_id = r#"source_principal="spiffe://cluster.local/ns/default/sa/client""#;
    let waypoint_id = r#"source_principal="spiffe://cluster.local/ns/default/sa/waypoint""#;
    let at_waypoint = || {
        counter(
            waypoint_pod.netns.http_get(15020, "/metrics"),
            "istio_tcp_connections_opened_total",
            &[r#"reporter="waypoint""#, client_id],
        )
    };
    let at_server = |who: &str| {
        counter(
            node.http_get(15020, "/metrics"),
            "istio_tcp_connections_opened_total",
            &[r#"reporter="destination""#, who],
        )
    };

    // Through the waypoint: it sees the client; the server's proxy sees the waypoint.
    let (before_wp, before_srv) = (at_waypoint(), at_server(waypoint_id));
    eventually(
        &node,
        "client → via answered through the waypoint",
        || {
            answered(&client, via)
                && at_waypoint() > before_wp
                && at_server(waypoint_id) > before_srv
        },
    );

    // The server's pod IP: its workload waypoint (the same one, which takes all traffic).
    let pod_ip = SocketAddr::new(server.ip.unwrap(), 9080);
    let (before_wp, before_srv) = (at_waypoint(), at_server(waypoint_id));
    eventually(
        &node,
        "client → server pod IP through the waypoint",
        || {
            answered(&client, pod_ip)
                && at_waypoint() > before_wp
                && at_server(waypoint_id) > before_srv
        },
    );

    // Opted out: straight to the server with the client's identity; the waypoint sees nothing of it.
    let (before_wp, before_srv) = (at_waypoint(), at_server(client_id));
    eventually(
        &node,
        "client → direct answered without the waypoint",
        || answered(&client, direct) && at_server(client_id) > before_srv,
    );
    assert_eq!(
        at_waypoint(),
        before_wp,
        "the opted-out service went through the waypoint"
    );

    // The waypoint gone: its service is refused, and never reached directly instead.
    drop(waypoint);
    let before_srv = at_server(client_id);
    for _ in 0..5 {
        assert!(
            !answered(&client, via),
            "the waypoint is down, yet the call was answered"
        );
    }
    assert_eq!(
        at_server(client_id),
        before_srv,
        "with its waypoint down, the service was reached directly (fail open)"
    );
    assert!(
        answered(&client, direct),
        "the opted-out service keeps working"
    );
}

/// An echo application in `pod` on `port`: every byte read is written back.
fn serve_echo(pod: &Pod, port: u16) {
    let ip = pod.ip.expect("pod has an IP");
    let app = pod
        .netns
        .run(move || TcpListener::bind(SocketAddr::new(ip, port)).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            let mut w = s.try_clone().unwrap();
            let mut r = s;
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// Line `n` of a flow: numbered, padded to 100 bytes.
fn flow_line(n: u32) -> String {
    format!("{n:08}-{}\n", "x".repeat(90))
}

/// The node's logs and the waypoint's.
fn with_waypoint(node: &Node) -> String {
    let wp = std::fs::read_to_string(node.path("waypoint.log")).unwrap_or_default();
    format!("{}\nwaypoint:\n{wp}", node.logs())
}

/// Whether the waypoint offers and accepts resumable streams (the test's mutation switch).
const WAYPOINT_RESUMABLE: &str = "true";

#[test]
fn a_connection_through_the_waypoint_outlives_a_restart_of_the_node_proxy_on_both_hops() {
    if !support::root_or_skip(
        "a_connection_through_the_waypoint_outlives_a_restart_of_the_node_proxy_on_both_hops",
    ) {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let handover = dir.path().join("handover.sock");
    let handover = handover.to_str().unwrap().to_string();
    let mut node = Node::bare("workloads: []\n");
    std::fs::write(node.path("agent.yaml"), agent_yaml()).unwrap();
    let agent_config = node.path("agent.yaml").to_str().unwrap().to_string();
    node.agent_env = vec![
        ("MESHNODE_AGENT_CONFIG".into(), agent_config),
        ("MESHNODE_HANDOVER_SOCKET".into(), handover.clone()),
    ];
    node.start_control_plane(&mesh_yaml(&[]), NODE_TOKEN);
    node.proxy_env.extend([
        ("MESHNODE_RESUMABLE_STREAMS".into(), "true".into()),
        ("MESHNODE_HANDOVER_SOCKET".into(), handover),
        ("CONNECTION_TERMINATION_DEADLINE".into(), "60s".into()),
    ]);
    node.start_agent();
    node.start_proxy();
    let mut client = node.pod("default", "client");
    let mut server = node.pod("default", "server");
    let mut waypoint_pod = node.pod("default", "waypoint-0");
    for p in [&mut client, &mut server, &mut waypoint_pod] {
        node.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, node.logs()));
    }
    node.set_mesh(&mesh_yaml(&[&client, &server, &waypoint_pod]));
    serve_echo(&server, 9080);
    relay_control_plane(&node, &waypoint_pod);
    let resumable = [("MESHNODE_RESUMABLE_STREAMS", WAYPOINT_RESUMABLE)];
    let _waypoint = start_waypoint_with(&node, &waypoint_pod, &resumable);
    let via: SocketAddr = format!("{VIA_WAYPOINT}:80").parse().unwrap();

    // A connection through the waypoint (its first bytes are not HTTP: the waypoint carries it as TCP).
    let mut attempt = 0;
    let stream = loop {
        attempt += 1;
        let s = client
            .netns
            .run(move || TcpStream::connect_timeout(&via, Duration::from_secs(5)));
        let ok = s.as_ref().is_ok_and(|s| {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            (&*s).write_all(b"hello\n").is_ok()
                && lines.read_line(&mut line).is_ok()
                && line == "hello\n"
        });
        if ok {
            break s.unwrap();
        }
        assert!(
            attempt < 50,
            "no answer through the waypoint\n{}",
            with_waypoint(&node)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Lines flow both ways until after the node proxy is back; every one comes back once, in order.
    let mut writer = stream.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let write = std::thread::spawn(move || -> std::io::Result<u32> {
        let mut n = 0;
        while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
            writer.write_all(flow_line(n).as_bytes())?;
            n += 1;
            if n % 20 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(n)
    });
    let read = std::thread::spawn(move || -> Result<u32, String> {
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        for n in 0.. {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => return Ok(n),
                Ok(_) if line == flow_line(n) => {}
                Ok(_) => return Err(format!("line {n}: {line:?}")),
                Err(e) => return Err(format!("line {n}: {e}")),
            }
        }
        unreachable!()
    });
    std::thread::sleep(Duration::from_millis(500));

    // The node proxy restarts (no new one beside it): the agent holds both hops' app-side sockets.
    let mut a = node.proxy.take().expect("the node proxy");
    let left = support::upgrade::stop(&node, &mut a, "the node proxy to leave");
    assert!(
        left < Duration::from_secs(5),
        "the proxy drained instead of handing its connections over ({left:?})\n{}",
        with_waypoint(&node)
    );
    std::thread::sleep(Duration::from_millis(1000));
    node.start_proxy();

    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = write.join().unwrap().expect("writing through the restart");
    let got = read
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", with_waypoint(&node)));
    assert_eq!(got, sent, "lines sent and echoed");
    let logs = with_waypoint(&node);
    // Both hops of the connection: the client's outbound to the waypoint, the server's inbound from it.
    assert!(
        logs.contains("handed to the CNI agent") && logs.contains("adopted=2"),
        "the restarted proxy did not adopt both hops\n{logs}"
    );
}
