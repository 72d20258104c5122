//! Fault tests: the node's processes killed with SIGKILL mid-traffic and under pod churn. Each ends with the
//! promise checked: no captured pod's traffic ever left it uncaptured (a counter in the pod's own netns,
//! a positive control proving it counts), no recorded pod lost, and the node serving pods afterwards.
//! Needs root, `ip`, `nft` and containernetworking-plugins (installed by .ci/run).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::cluster::{call, rules, serve_app, settle, workloads, Node, Pod};

const AGENT_YAML: &str = "namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
  test: {}
pods:
- {name: c0, namespace: default, serviceAccount: c0}
- {name: c1, namespace: default, serviceAccount: c1}
- {name: c2, namespace: default, serviceAccount: c2}
- {name: survivor, namespace: default, serviceAccount: survivor}
";

/// Adds a table of the test's own in `pod` that counts TCP packets to `port` leaving `eth0` without the
/// proxy's mark: traffic of the app that went around the capture rules.
fn count_uncaptured(pod: &Pod, port: u16) {
    let rule = format!("oifname eth0 tcp dport {port} meta mark and 0xfff != 1337 counter");
    for args in [
        vec!["add", "table", "inet", "mntest"],
        vec![
            "add",
            "chain",
            "inet",
            "mntest",
            "out",
            "{ type filter hook postrouting priority 500 ; }",
        ],
        vec!["add", "rule", "inet", "mntest", "out", rule.as_str()],
    ] {
        let out = pod.netns.exec("nft", &args);
        assert!(out.status.success(), "nft {args:?}: {out:?}");
    }
}

/// Packets the counter of [`count_uncaptured`] saw.
fn uncaptured(pod: &Pod) -> u64 {
    let out = pod.netns.exec("nft", &["list", "table", "inet", "mntest"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counter in: {text}"))
}

#[test]
fn killing_the_agent_and_the_proxy_mid_traffic_never_lets_a_captured_pod_out_uncaptured() {
    if !support::root_or_skip(
        "killing_the_agent_and_the_proxy_mid_traffic_never_lets_a_captured_pod_out_uncaptured",
    ) {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    // A server outside the mesh: captured pods reach it through their proxy (passthrough, marked 1337).
    let mut server = node.pod("test", "server");
    node.add(&mut server).expect("ADD server");
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);

    // Positive control: a pod outside the mesh is counted, so the counter does see direct egress.
    let mut outsider = node.pod("test", "outsider");
    node.add(&mut outsider).expect("ADD outsider");
    count_uncaptured(&outsider, 8080);
    assert!(call(&outsider, dst).unwrap().starts_with("app saw"));
    assert!(uncaptured(&outsider) > 0, "the counter sees nothing");

    let mut clients: Vec<Pod> = (0..3)
        .map(|i| node.pod("default", &format!("c{i}")))
        .collect();
    for c in &mut clients {
        node.add(c)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", c.name, node.logs()));
        count_uncaptured(c, 8080);
    }
    node.set_local_config(&workloads(&clients.iter().collect::<Vec<_>>()));
    settle();
    for c in &clients {
        let reply = call(c, dst).unwrap_or_else(|e| panic!("{}: {e}\n{}", c.name, node.logs()));
        assert!(reply.starts_with("app saw"), "{reply}");
    }

    let stop = AtomicBool::new(false);
    let (answered, refused) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut churned = 0;
    std::thread::scope(|scope| {
        for c in &clients {
            let (stop, answered, refused) = (&stop, &answered, &refused);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match call(c, dst) {
                        Ok(r) if r.starts_with("app saw") => {
                            answered.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => refused.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        let mut churn = |node: &Node, round: usize| {
            for i in 0..2 {
                let mut p = node.pod("default", &format!("churn{round}x{i}"));
                // While the agent or proxy is down the ADD fails (closed); either way DEL cleans up.
                let _ = node.add(&mut p);
                let _ = node.del(&p);
                churned += 1;
            }
        };
        for round in 0..3 {
            churn(&node, round * 10);
            node.agent = None; // SIGKILL
            churn(&node, round * 10 + 1);
            std::thread::sleep(Duration::from_millis(300));
            node.start_agent();
            churn(&node, round * 10 + 2);
            node.proxy = None; // SIGKILL
            churn(&node, round * 10 + 3);
            std::thread::sleep(Duration::from_millis(300));
            node.start_proxy();
            churn(&node, round * 10 + 4);
        }
        stop.store(true, Ordering::Relaxed);
    });

    for c in &clients {
        assert_eq!(
            uncaptured(c),
            0,
            "{} sent packets around the mesh\n{}",
            c.name,
            node.logs()
        );
        assert!(
            rules(c).matches(&support::cluster::agent_default_rules()),
            "{}: {:?}",
            c.name,
            rules(c)
        );
        let reply = call(c, dst)
            .unwrap_or_else(|e| panic!("{} after the faults: {e}\n{}", c.name, node.logs()));
        assert!(
            reply.starts_with(&format!("app saw {}", c.ip.unwrap())),
            "{reply}"
        );
    }
    let state = std::fs::read_to_string(node.path("run/meshnode-pods.json")).unwrap();
    for c in &clients {
        assert!(
            state.contains(&c.uid),
            "{} lost from the agent's state\n{state}",
            c.name
        );
    }
    assert!(
        !state.contains("churn"),
        "churned pods left behind:\n{state}"
    );
    assert!(answered.load(Ordering::Relaxed) > 0);
    println!(
        "calls answered {}, refused while a process was down {}, pods churned {churned}",
        answered.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
}

#[test]
fn a_pod_whose_netns_vanishes_mid_add_is_refused_and_the_node_serves_the_next() {
    if !support::root_or_skip(
        "a_pod_whose_netns_vanishes_mid_add_is_refused_and_the_node_serves_the_next",
    ) {
        return;
    }
    let node = Node::start(AGENT_YAML, "workloads: []\n");
    let mut server = node.pod("test", "server");
    node.add(&mut server).expect("ADD server");
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);
    for i in 0..5 {
        let mut doomed = node.pod("default", &format!("doomed{i}"));
        let name = doomed.netns.name.clone();
        // The sandbox goes away while its ADD is in flight (a runtime tearing it down).
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(i * 3));
                let _ = std::process::Command::new("ip")
                    .args(["netns", "delete", &name])
                    .status();
            });
            let _ = node.add(&mut doomed);
        });
        let _ = node.del(&doomed);
    }
    // Nothing of the vanished pods is kept, and the next pod is captured and served.
    let mut ok = node.pod("default", "survivor");
    node.add(&mut ok)
        .unwrap_or_else(|e| panic!("ADD after vanishing pods: {e}\n{}", node.logs()));
    count_uncaptured(&ok, 8080);
    node.set_local_config(&workloads(&[&ok]));
    settle();
    assert!(call(&ok, dst).unwrap().starts_with("app saw"));
    assert_eq!(uncaptured(&ok), 0);
    let state = std::fs::read_to_string(node.path("run/meshnode-pods.json")).unwrap();
    assert!(!state.contains("doomed"), "{state}");
    assert!(state.contains(&ok.uid));
}

#[test]
fn a_proxy_out_of_file_descriptors_backs_off_and_serves_again_once_they_free_up() {
    if !support::root_or_skip(
        "a_proxy_out_of_file_descriptors_backs_off_and_serves_again_once_they_free_up",
    ) {
        return;
    }
    // A dedicated proxy in a namespace of its own with a tiny hard open-files limit (so raising the soft
    // limit at start cannot help), flooded with connections to its HBONE port that never start TLS (each
    // held by the proxy until its handshake deadline).
    let ns = support::netns::Netns::new("nofd");
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let state = dir.path().join("state");
    let mut proxy = support::netns::KillOnDrop(ns.spawn(
        "prlimit",
        &["--nofile=96:96", env!("CARGO_BIN_EXE_meshnode"), "proxy"],
        &[
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", "default/server/server"),
            ("XDS_ADDRESS", ""),
            (
                "LOCAL_XDS",
                "workloads:\n- uid: u1\n  name: server\n  namespace: default\n  serviceAccount: server\n  \
                 workloadIps: [\"127.0.0.1\"]\n  protocol: HBONE\n",
            ),
            ("MESHNODE_STATE_DIR", state.to_str().unwrap()),
            ("RUST_LOG", "warn"),
        ],
        log,
    ));
    // Ready: the workload is known, its certificate issued and the listeners accepting.
    let ready = || ns.http_get(15021, "/healthz/ready").is_some();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "proxy never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    // 200 connections held open: far more than the proxy has descriptors for.
    let flood: Vec<std::net::TcpStream> = ns.run(|| {
        (0..200)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(
                    &"127.0.0.1:15008".parse().unwrap(),
                    Duration::from_secs(1),
                )
                .ok()
            })
            .collect()
    });
    assert!(flood.len() > 96, "only {} connections made", flood.len());
    let logged = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !logged().contains("accept failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "never ran out of fds:\n{}",
            logged()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        proxy.0.try_wait().unwrap().is_none(),
        "proxy died:\n{}",
        logged()
    );
    // The flood goes away: the proxy serves again.
    drop(flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "proxy did not recover:\n{}",
            logged()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        proxy.0.try_wait().unwrap().is_none(),
        "proxy died:\n{}",
        logged()
    );
}
