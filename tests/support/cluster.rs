//! A one-node "cluster" in network namespaces for the capture tests: a node namespace running
//! `meshnode cni-agent` and `meshnode proxy` (shared mode) as the DaemonSets would, and pods created by
//! calling the real CNI chain (`ptp` + host-local IPAM, then `meshnode-cni`) exactly as a container runtime
//! does. Everything is removed on drop, also when the test fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use meshnode::cni_exec::{Attachment, Runtime};
use serde_json::{json, Value};

use super::netns::{KillOnDrop, Netns};

/// Where Debian's containernetworking-plugins put `ptp` and `host-local`.
pub const CNI_PLUGINS_DIR: &str = "/usr/lib/cni";

/// The `meshnode-cni` binary, built beside `meshnode` by `cargo test --workspace`.
pub fn plugin_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_meshnode")).with_file_name("meshnode-cni");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so the plugin is built",
        p.display()
    );
    p
}

/// A pod: its namespace, its CNI attachment and result.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub netns: Netns,
    pub attachment: Attachment,
    pub result: Option<Value>,
    pub ip: Option<IpAddr>,
}

/// The node: namespace, agent, proxy, CNI config.
pub struct Node {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    pub agent: Option<KillOnDrop>,
    pub proxy: Option<KillOnDrop>,
    /// `meshnode control-plane`, when started.
    pub control_plane: Option<KillOnDrop>,
    /// Overrides of the proxy's environment (e.g. xDS and CA addresses instead of a local config).
    pub proxy_env: Vec<(String, String)>,
    pub conflist: Value,
    pub runtime: Runtime,
    pub subnet: String,
    /// What tells the agent about the cluster: `MESHNODE_AGENT_CONFIG` for [`Node::start`]; whatever the
    /// test sets (e.g. `KUBECONFIG` and `NODE_NAME`) for [`Node::bare`].
    pub agent_env: Vec<(String, String)>,
    restarts: AtomicU32,
}

/// A unique /24 per node in this process: `10.<pid-derived>.<n>.0/24`.
fn next_subnet() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let a = 150 + (std::process::id() % 100);
    format!("10.{a}.{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Node {
    /// A node with its agent (standalone config `agent_yaml`) and proxy (workload state `local_yaml`)
    /// started and ready.
    pub fn start(agent_yaml: &str, local_yaml: &str) -> Node {
        let mut node = Node::bare(local_yaml);
        std::fs::write(node.path("agent.yaml"), agent_yaml).unwrap();
        let config = node.path("agent.yaml").to_str().unwrap().to_string();
        node.agent_env = vec![("MESHNODE_AGENT_CONFIG".into(), config)];
        node.start_agent();
        node.start_proxy();
        node
    }

    /// A node namespace with its CNI config and the proxy's workload state `local_yaml`, but no agent or
    /// proxy running yet: set [`Node::agent_env`], then [`Node::start_agent`] and [`Node::start_proxy`].
    pub fn bare(local_yaml: &str) -> Node {
        assert!(
            Path::new(CNI_PLUGINS_DIR).join("ptp").exists(),
            "{CNI_PLUGINS_DIR}/ptp is missing: install Debian's containernetworking-plugins (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ns = Netns::new("node");
        let subnet = next_subnet();
        let plugin = plugin_binary();
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": format!("mn{}{}", std::process::id(), subnet.replace('.', "x")),
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "subnet": format!("{subnet}.0/24"),
                        "dataDir": dir.path().join("ipam").to_str().unwrap(),
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                {
                    "type": "meshnode-cni",
                    "cni_agent_run_dir": dir.path().join("run").to_str().unwrap(),
                    "exclude_namespaces": ["kube-system"]
                }
            ]
        });
        let runtime = Runtime {
            cni_path: vec![
                PathBuf::from(CNI_PLUGINS_DIR),
                plugin.parent().unwrap().to_path_buf(),
            ],
        };
        std::fs::write(dir.path().join("local.yaml"), local_yaml).unwrap();
        Node {
            ns,
            dir,
            agent: None,
            proxy: None,
            control_plane: None,
            proxy_env: Vec::new(),
            conflist,
            runtime,
            subnet,
            agent_env: Vec::new(),
            restarts: AtomicU32::new(0),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts (or restarts) the agent and waits for its sockets.
    pub fn start_agent(&mut self) {
        self.agent = None;
        let n = self.restarts.fetch_add(1, Ordering::Relaxed);
        let log = std::fs::File::create(self.path(&format!("agent{n}.log"))).unwrap();
        let run = self.path("run");
        let _ = std::fs::remove_file(run.join("pluginevent.sock"));
        let zds = self.path("zds.sock");
        let mut env = vec![
            ("CNI_AGENT_RUN_DIR", run.to_str().unwrap()),
            ("ZTUNNEL_UDS_ADDRESS", zds.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ];
        env.extend(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.agent = Some(KillOnDrop(self.ns.spawn(
            env!("CARGO_BIN_EXE_meshnode"),
            &["cni-agent"],
            &env,
            log,
        )));
        self.wait_for(
            || run.join("pluginevent.sock").exists(),
            "the agent's plugin socket",
        );
    }

    /// Starts (or restarts) the proxy and waits for its readiness (after the agent's snapshot).
    pub fn start_proxy(&mut self) {
        self.proxy = None;
        let n = self.restarts.fetch_add(1, Ordering::Relaxed);
        let log = std::fs::File::create(self.path(&format!("proxy{n}.log"))).unwrap();
        self.proxy = Some(KillOnDrop(
            self.ns.spawn(
                env!("CARGO_BIN_EXE_meshnode"),
                &["proxy"],
                &[
                    ("PROXY_MODE", "shared"),
                    ("INPOD_UDS", self.path("zds.sock").to_str().unwrap()),
                    ("LOCAL_XDS_PATH", self.path("local.yaml").to_str().unwrap()),
                    ("XDS_ADDRESS", ""),
                    ("MESHNODE_STATE_DIR", self.path("state").to_str().unwrap()),
                    ("RUST_LOG", "info"),
                ]
                .into_iter()
                .filter(|(k, _)| !self.proxy_env.iter().any(|(o, _)| o == k))
                .chain(self.proxy_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .collect::<Vec<_>>(),
                log,
            ),
        ));
        self.wait_for(|| self.ready(), "the proxy's readiness");
    }

    /// Starts `meshnode control-plane` in the node namespace on 127.0.0.1:15012 with `<dir>/mesh.yaml`
    /// (written from `mesh_yaml`), its root written to `<dir>/root-cert.pem`, and points the proxy at it
    /// (with `token`) for its next start.
    pub fn start_control_plane(&mut self, mesh_yaml: &str, token: &str) {
        std::fs::write(self.path("mesh.yaml"), mesh_yaml).unwrap();
        let log = std::fs::File::create(self.path("control-plane.log")).unwrap();
        let root = self.path("root-cert.pem");
        self.control_plane = Some(KillOnDrop(self.ns.spawn(
            env!("CARGO_BIN_EXE_meshnode"),
            &[
                "control-plane",
                "--config",
                self.path("mesh.yaml").to_str().unwrap(),
                "--listen",
                "127.0.0.1:15012",
                "--state-dir",
                self.path("cp-state").to_str().unwrap(),
                "--root-cert-out",
                root.to_str().unwrap(),
            ],
            &[("RUST_LOG", "info")],
            log,
        )));
        self.wait_for(
            || {
                root.exists()
                    && self
                        .ns
                        .run(|| TcpStream::connect("127.0.0.1:15012").is_ok())
            },
            "the control plane",
        );
        let root = root.to_str().unwrap().to_string();
        self.proxy_env = vec![
            ("XDS_ADDRESS".into(), "https://127.0.0.1:15012".into()),
            ("CA_ADDRESS".into(), "https://127.0.0.1:15012".into()),
            ("XDS_ROOT_CA".into(), root.clone()),
            ("CA_ROOT_CA".into(), root),
            ("AUTH_TOKEN".into(), token.into()),
            ("LOCAL_XDS_PATH".into(), String::new()),
        ];
    }

    /// Replaces the control plane's mesh file; it pushes the change within a second.
    pub fn set_mesh(&self, yaml: &str) {
        std::fs::write(self.path("mesh.yaml"), yaml).unwrap();
    }

    /// Whether the proxy answers ready on :15021 in the node namespace.
    pub fn ready(&self) -> bool {
        self.http_ok(15021, "/healthz/ready")
    }

    /// Whether `GET path` on 127.0.0.1:`port` in the node namespace answers 200.
    pub fn http_ok(&self, port: u16, path: &str) -> bool {
        self.http_get(port, path).is_some()
    }

    /// The whole answer (head and body) to `GET path` on 127.0.0.1:`port` in the node namespace, if 200.
    pub fn http_get(&self, port: u16, path: &str) -> Option<String> {
        self.ns.http_get(port, path)
    }

    /// An unlabelled counter from the agent's metrics port (:15014); 0 when it cannot be read.
    pub fn agent_counter(&self, name: &str) -> u64 {
        let text = self.http_get(15014, "/metrics").unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits up to 20 s for `cond`, failing with the node's logs.
    pub fn wait_for(&self, mut cond: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// All logs of the node's processes, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        entries.sort();
        for p in entries {
            out += &format!(
                "--- {}\n{}\n",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
        out
    }

    /// Replaces the agent's enrollment file (namespaces, pods); the agent re-reads it within a second.
    pub fn set_agent_config(&self, yaml: &str) {
        std::fs::write(self.path("agent.yaml"), yaml).unwrap();
    }

    /// Replaces the proxy's workload state; it re-reads it within a second.
    pub fn set_local_config(&self, yaml: &str) {
        std::fs::write(self.path("local.yaml"), yaml).unwrap();
    }

    /// A new pod sandbox (netns), not yet networked.
    pub fn pod(&self, namespace: &str, name: &str) -> Pod {
        let netns = Netns::new("pod");
        let uid = format!("uid-{namespace}-{name}-{}", netns.name);
        let attachment = Attachment {
            container_id: format!("c{}", netns.name),
            netns: PathBuf::from(format!("/var/run/netns/{}", netns.name)),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), namespace.into()),
                ("K8S_POD_NAME".into(), name.into()),
                (
                    "K8S_POD_INFRA_CONTAINER_ID".into(),
                    format!("c{}", netns.name),
                ),
                ("K8S_POD_UID".into(), uid.clone()),
            ],
        };
        Pod {
            name: name.into(),
            namespace: namespace.into(),
            uid,
            netns,
            attachment,
            result: None,
            ip: None,
        }
    }

    /// CNI ADD for `pod` through the whole chain, run from the node namespace as a runtime does.
    pub fn add(&self, pod: &mut Pod) -> Result<(), meshnode::cni_exec::Error> {
        self.add_with(pod, &self.conflist.clone())
    }

    /// CNI ADD for `pod` through the chain `conflist` (e.g. without `meshnode-cni`, as on a node where
    /// the plugin is not installed yet).
    pub fn add_with(
        &self,
        pod: &mut Pod,
        conflist: &Value,
    ) -> Result<(), meshnode::cni_exec::Error> {
        let rt = self.runtime.clone();
        let conf = conflist.clone();
        let att = pod.attachment.clone();
        let result = self.ns.run(move || rt.add(&conf, &att))?;
        pod.ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok());
        pod.result = Some(result);
        Ok(())
    }

    /// CNI CHECK for `pod` (after its ADD).
    pub fn check(&self, pod: &Pod) -> Result<(), meshnode::cni_exec::Error> {
        let rt = self.runtime.clone();
        let conf = self.conflist.clone();
        let att = pod.attachment.clone();
        let prev = pod.result.clone().expect("CHECK follows ADD");
        self.ns.run(move || rt.check(&conf, &att, &prev))
    }

    /// CNI DEL for `pod`.
    pub fn del(&self, pod: &Pod) -> Result<(), meshnode::cni_exec::Error> {
        let rt = self.runtime.clone();
        let conf = self.conflist.clone();
        let att = pod.attachment.clone();
        let prev = pod.result.clone();
        self.ns.run(move || rt.del(&conf, &att, prev.as_ref()))
    }
}

/// An application in `pod`: answers `app saw <peer> say <first line>` on every connection to `port`.
pub fn serve_app(pod: &Pod, port: u16) {
    let ip = pod.ip.expect("pod has an IP");
    let app = pod
        .netns
        .run(move || TcpListener::bind(SocketAddr::new(ip, port)).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = s.peer_addr().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
                let _ = (&s).write_all(format!("app saw {peer} say {line}").as_bytes());
            });
        }
    });
}

/// Connects from inside `pod` to `dst`, says hello, returns the answer (or the error).
pub fn call(pod: &Pod, dst: SocketAddr) -> std::io::Result<String> {
    call_from(&pod.netns, dst)
}

/// [`call`] from any namespace (e.g. a VM's behind a pod).
pub fn call_from(ns: &Netns, dst: SocketAddr) -> std::io::Result<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"hello\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })
}

/// The rules the agent installs by default: Istio's, DNS capture included.
pub fn agent_default_rules() -> meshnode::redirect::RuleSettings {
    meshnode::redirect::RuleSettings {
        dns_capture: true,
        ..Default::default()
    }
}

/// The redirection rules in `pod`'s namespace, read back through netlink.
pub fn rules(pod: &Pod) -> meshnode::redirect::Installed {
    pod.netns
        .run(|| meshnode::redirect::inspect().expect("reading rules through netlink"))
}

/// `nft list ruleset` in `pod`'s namespace (a second, independent reading of the rules).
pub fn nft_ruleset(pod: &Pod) -> String {
    let out = pod.netns.exec("nft", &["list", "ruleset"]);
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip rule` lines in `pod`'s namespace.
pub fn ip_rules(pod: &Pod) -> String {
    String::from_utf8_lossy(&pod.netns.ip(&["rule"]).stdout).into_owned()
}

/// The proxy's view: each pod as an HBONE workload, and a policy on the server that only lets the client's
/// identity in — so an answer proves the call came through the mesh with the client's certificate.
pub fn workloads(pods: &[&Pod]) -> String {
    let mut y = String::from("workloads:\n");
    for p in pods {
        y += &format!(
            "- uid: cluster1//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {name}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n",
            ns = p.namespace,
            name = p.name,
            ip = p.ip.unwrap()
        );
        if p.name == "server" {
            y += "  authorizationPolicies: [default/only-client]\n";
        }
    }
    y += "policies:\n- name: only-client\n  namespace: default\n  scope: WorkloadSelector\n  action: Allow\n  rules: [[[{principals: [!Exact \"cluster.local/ns/default/sa/client\"]}]]]\n";
    y
}

pub fn settle() {
    // The proxy re-reads its local config every second.
    std::thread::sleep(Duration::from_millis(2500));
}
