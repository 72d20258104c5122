//! A one-node cluster for upgrade tests (`takeover.rs`, `upgrade_load.rs`): the CNI agent and node proxy A
//! (shared mode) serving a client and a server pod, and proxy B started beside A in a namespace of its own
//! on the same agent socket, as a DaemonSet's rolling update starts the new pod.

use std::net::SocketAddr;
use std::path::Path;

use super::cluster::{serve_app, workloads, Node, Pod};
use super::netns::{KillOnDrop, Netns};

/// The agent's enrollment: a client and a server pod in an ambient namespace.
pub const AGENT_YAML: &str = "namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
pods:
- {name: client, namespace: default, serviceAccount: client}
- {name: server, namespace: default, serviceAccount: server}
";

/// The environment that makes a proxy hand its connections over on upgrade, through `socket`.
pub fn handover_env(socket: &Path) -> Vec<(String, String)> {
    vec![
        ("MESHNODE_RESUMABLE_STREAMS".into(), "true".into()),
        (
            "MESHNODE_HANDOVER_SOCKET".into(),
            socket.to_str().expect("a UTF-8 path").into(),
        ),
    ]
}

/// A node whose proxy (A) is started with `INPOD_PORT_REUSE=<reuse>`, a 60 s drain and `extra`, with a
/// client and a server pod captured and served by it, the server's app answering on :8080 (one line per
/// connection); returns once the client reaches it through the mesh.
pub fn node_with_pods(reuse: &str, extra: &[(String, String)]) -> (Node, Pod, Pod) {
    let mut node = Node::bare("workloads: []\n");
    std::fs::write(node.path("agent.yaml"), AGENT_YAML).unwrap();
    let config = node.path("agent.yaml").to_str().unwrap().to_string();
    node.agent_env = vec![("MESHNODE_AGENT_CONFIG".into(), config)];
    // The agent shares the proxy's hand-over socket setting, as in the DaemonSets: it holds the
    // connections of a proxy that restarts with no new one beside it.
    node.agent_env.extend(
        extra
            .iter()
            .filter(|(k, _)| k == "MESHNODE_HANDOVER_SOCKET")
            .cloned(),
    );
    node.start_agent();
    node.proxy_env = vec![
        ("INPOD_PORT_REUSE".into(), reuse.into()),
        ("CONNECTION_TERMINATION_DEADLINE".into(), "60s".into()),
    ];
    node.proxy_env.extend(extra.iter().cloned());
    node.start_proxy();
    let mut client = node.pod("default", "client");
    let mut server = node.pod("default", "server");
    for p in [&mut client, &mut server] {
        node.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, node.logs()));
    }
    node.set_local_config(&workloads(&[&client, &server]));
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);
    node.wait_for(
        || super::cluster::call(&client, dst).is_ok_and(|r| r.starts_with("app saw")),
        "the client reaching the server through the mesh",
    );
    (node, client, server)
}

/// Proxy B: `meshnode proxy` in shared mode in namespace `ns`, on the node's agent socket, workload state
/// and CA directory, with `INPOD_PORT_REUSE=<reuse>` and `extra`, logging to `proxy-b.log`. Returns once it
/// is ready (its snapshot from the agent processed).
///
/// B runs in a namespace of its own: the readiness (:15021) and metrics (:15020) ports are fixed unless
/// moved, so two proxies in one namespace collide there. In Kubernetes each ztunnel pod has its own
/// namespace too; what the two share is the agent's ZDS socket (a path), the pods' namespaces and the
/// hand-over socket's directory.
pub fn start_second_proxy(
    node: &Node,
    ns: &Netns,
    reuse: &str,
    extra: &[(String, String)],
) -> KillOnDrop {
    let log = std::fs::File::create(node.path("proxy-b.log")).unwrap();
    let zds = node.path("zds.sock");
    let local = node.path("local.yaml");
    let state = node.path("state");
    let child = ns.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &["proxy"],
        &[
            ("PROXY_MODE", "shared"),
            ("INPOD_UDS", zds.to_str().unwrap()),
            ("INPOD_PORT_REUSE", reuse),
            ("LOCAL_XDS_PATH", local.to_str().unwrap()),
            ("XDS_ADDRESS", ""),
            ("MESHNODE_STATE_DIR", state.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ]
        .into_iter()
        .chain(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect::<Vec<_>>(),
        log,
    );
    let b = KillOnDrop(child);
    node.wait_for(
        || ns.http_get(15021, "/healthz/ready").is_some(),
        "proxy B's readiness",
    );
    b
}

/// Proxy B ([`start_second_proxy`], with `extra`) once it takes hand-overs: it listens on the hand-over
/// socket. Returns B and its log file.
pub fn start_second_proxy_taking_handovers(
    node: &Node,
    ns: &Netns,
    extra: &[(String, String)],
) -> (KillOnDrop, std::path::PathBuf) {
    let b = start_second_proxy(node, ns, "true", extra);
    let log = node.path("proxy-b.log");
    node.wait_for(
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("taking connections handed over"))
        },
        "proxy B listening on the hand-over socket",
    );
    (b, log)
}

/// Tells `proxy` to stop (SIGTERM) and waits until it has exited, successfully (`what` names the wait);
/// returns how long it took to leave.
pub fn stop(node: &Node, proxy: &mut KillOnDrop, what: &str) -> std::time::Duration {
    let pid = nix::unistd::Pid::from_raw(proxy.0.id() as i32);
    let told = std::time::Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut exit = None;
    node.wait_for(
        || {
            exit = proxy.0.try_wait().unwrap();
            exit.is_some()
        },
        what,
    );
    let took = told.elapsed();
    assert!(exit.unwrap().success(), "{what}: exited with {exit:?}");
    took
}
