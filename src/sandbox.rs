//! `meshnode sandbox`: the whole mesh on one Linux machine, with no Kubernetes and no istiod. Two nodes made
//! of network namespaces, on each a CNI agent and a node proxy in shared mode; the embedded control plane;
//! bookinfo-like pods wired like `ptp` wires them and handed to `meshnode-cni` as a runtime does.
//!
//! Input: [`Options`] (name, state directory, binaries) and a command: [`up`], [`down`], [`status`],
//! [`exec`], [`apply`], or the tutorial ([`scenario::run`]). Output: the cluster (namespaces, processes,
//! files under [`Options::dir`]), progress and results on stdout, an [`Error`] that says what to do.
//!
//! Everything one sandbox creates is recorded before it is created: the model (which names every
//! namespace) is the first file written, and every process lives inside one of those namespaces. So
//! [`down`] finds all of it again from the model alone, also after `up` crashed half way.
//!
//! ```text
//!   node1 (netns)  172.18.0.2 ── eth0 ══ eth0 ── 172.18.0.3  node2 (netns)
//!    control plane :15012, cni-agent, proxy       cni-agent, proxy
//!    10.244.1.0/24: productpage, details,         10.244.2.0/24: reviews v1, v2, v3
//!                   ratings, test/sleep
//! ```
//!
//! With `--multi-network` ([`Layout::TwoNetworks`]) each node is a network of its own, joined only
//! through the networks' east-west gateways (`meshnode gateway`, one pod each in `istio-system`); calls
//! between the networks are double HBONE through the destination network's gateway:
//!
//! ```text
//!   network1                                           network2
//!   node1 (netns)  172.18.0.2 ── eth0 ══ eth0 ── 172.18.0.3  node2 (netns)
//!    control plane :15012, cni-agent, proxy       cni-agent, proxy
//!    10.244.1.0/24: productpage, details,         10.244.2.0/24: reviews v1, v2, v3,
//!                   ratings, test/sleep,                         istio-system/eastwest-network2-0
//!                   istio-system/eastwest-network1-0
//!    routes to node2: eastwest-network2-0/32      routes to node1: eastwest-network1-0/32
//!    (+ node2's pods, from eastwest-network1-0    (+ node1's pods, from eastwest-network2-0
//!       only: its answers)                           only: its answers)
//!
//!   productpage ══ HBONE to eastwest-network2-0 ( HBONE to reviews:9080 ) ══> reviews' proxy
//!   reviews     ══ HBONE to eastwest-network1-0 ( HBONE to ratings:9080 ) ══> ratings' proxy
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

pub use self::model::Layout;
use self::model::Model;
use crate::cni_exec::Runtime;
use crate::file_watch::{write_atomically, write_atomically_mode};

pub mod apply;
pub mod apps;
pub mod cli;
pub mod l7;
pub mod model;
pub mod net;
pub mod procs;
pub mod scenario;
pub mod upgrade;

/// Where sandboxes keep their state by default (`/run`: gone after a reboot, like the namespaces).
pub const DEFAULT_ROOT: &str = "/run/meshnode-sandbox";
/// The default sandbox name (prefix of its namespaces: `meshnode-node1`, `meshnode-default-productpage-v1`).
pub const DEFAULT_NAME: &str = "meshnode";
/// How long `up` waits for any one component.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of a component's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 15;

/// What a sandbox command needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The sandbox name.
    pub name: String,
    /// The directory holding every sandbox's state directory.
    pub root: PathBuf,
    /// The `meshnode` binary the components run as.
    pub meshnode: PathBuf,
    /// The `meshnode-cni` plugin binary.
    pub plugin: PathBuf,
}

/// Why a sandbox command failed; each says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not running as root.
    #[error("the sandbox needs root: it creates network namespaces and programs nftables (run it with sudo)")]
    NotRoot,
    /// The kernel cannot do what the capture rules need.
    #[error("this kernel cannot run the capture rules (nf_tables with nat, tproxy and socket matching): {0}\n  load the modules (modprobe nf_tables nft_nat nft_tproxy nft_socket) or use a kernel built with CONFIG_NF_TABLES")]
    NoNfTables(String),
    /// A binary is missing.
    #[error("{what} not found at {}: build it with `cargo build --release --workspace`", path.display())]
    MissingBinary {
        /// Which.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The name cannot be used.
    #[error("invalid sandbox name {0:?}: use 1-20 lowercase letters, digits and '-'")]
    BadName(String),
    /// A sandbox of this name exists (running or left behind).
    #[error("{0}")]
    Exists(String),
    /// No sandbox of this name.
    #[error("no sandbox {name:?} is up (start one with `meshnode sandbox up`)")]
    NotUp {
        /// The name.
        name: String,
    },
    /// Another sandbox command is running on the same sandbox.
    #[error(
        "another `meshnode sandbox` command is working on {name:?}; try again when it is done"
    )]
    Busy {
        /// The name.
        name: String,
    },
    /// A network step failed.
    #[error(transparent)]
    Net(#[from] net::Error),
    /// A component did not come up.
    #[error("{what} did not start within {}s; the last lines of {}:\n{tail}", START_TIMEOUT.as_secs(), log.display())]
    Start {
        /// The component.
        what: String,
        /// Its log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// A file in the state directory could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state directory holds a model this build cannot read.
    #[error("{}: {reason} (remove the sandbox with `meshnode sandbox down`)", path.display())]
    BadState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A user request that cannot be done (unknown pod, bad manifest).
    #[error("{0}")]
    Refused(String),
    /// SIGINT or SIGTERM arrived during the tutorial.
    #[error("interrupted")]
    Interrupted,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl Options {
    /// Options for `name` under `root`, with the binaries beside the running one.
    pub fn new(name: &str, root: &Path) -> Result<Options, Error> {
        let ok = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(Error::BadName(name.into()));
        }
        let meshnode = std::env::current_exe().map_err(io("finding", Path::new("meshnode")))?;
        let plugin = meshnode.with_file_name("meshnode-cni");
        Ok(Options {
            name: name.into(),
            root: root.into(),
            meshnode,
            plugin,
        })
    }

    /// This sandbox's state directory.
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir().join(rel)
    }

    fn log(&self, component: &str) -> PathBuf {
        self.path(&format!("logs/{component}.log"))
    }
}

/// Holds the sandbox's lock file for one command.
struct Locked {
    _lock: Flock<std::fs::File>,
}

fn lock(opts: &Options) -> Result<Locked, Error> {
    std::fs::create_dir_all(&opts.root).map_err(io("creating", &opts.root))?;
    let path = opts.root.join(format!("{}.lock", opts.name));
    let file = std::fs::File::create(&path).map_err(io("creating", &path))?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| Error::Busy {
        name: opts.name.clone(),
    })?;
    Ok(Locked { _lock: lock })
}

/// Reads the sandbox's model; `None` when no sandbox of this name exists.
pub fn load(opts: &Options) -> Result<Option<Model>, Error> {
    let path = opts.path("model.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::BadState {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", &path)(e)),
    }
}

/// Writes the model and the files the components read from it (each atomically: the agents and the
/// control plane poll them).
fn save(opts: &Options, model: &Model) -> Result<(), Error> {
    let json = serde_json::to_vec_pretty(model).expect("the model serializes");
    let files = [
        ("model.json".to_string(), json),
        ("mesh.yaml".to_string(), model.mesh_yaml().into_bytes()),
        ("hosts".to_string(), model.hosts_file().into_bytes()),
    ]
    .into_iter()
    .chain(model.nodes.iter().map(|n| {
        (
            format!("{}/agent.yaml", n.name),
            model.agent_yaml(&n.name).into_bytes(),
        )
    }));
    for (rel, bytes) in files {
        let path = opts.path(&rel);
        write_atomically(&path, &bytes).map_err(io("writing", &path))?;
    }
    Ok(())
}

/// Checks what a newcomer's machine may lack, before anything is created.
pub fn preflight(opts: &Options) -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    for (what, path) in [("meshnode", &opts.meshnode), ("meshnode-cni", &opts.plugin)] {
        if !path.is_file() {
            return Err(Error::MissingBinary {
                what,
                path: path.clone(),
            });
        }
    }
    net::probe_nf_tables().map_err(Error::NoNfTables)
}

/// The processes of a sandbox and how many are running, for messages.
fn describe_existing(opts: &Options, model: &Model) -> String {
    let running = procs::find(&net::all_netns(model), &opts.dir()).len();
    let since = std::fs::metadata(opts.path("model.json"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or(String::new(), |d| format!(", up for {}", human(d)));
    if running >= expected_processes(model) {
        format!(
            "sandbox {:?} is already up ({running} processes{since}): see `meshnode sandbox status`, or remove it with `meshnode sandbox down`",
            opts.name
        )
    } else {
        format!(
            "sandbox {:?} was left behind by a run that did not finish ({running} of {} processes running{since}): remove it with `meshnode sandbox down`",
            opts.name,
            expected_processes(model)
        )
    }
}

fn expected_processes(model: &Model) -> usize {
    let pod_processes = model
        .pods
        .iter()
        .filter(|p| p.app.is_some() || p.waypoint.is_some() || p.east_west.is_some())
        .count();
    1 + 2 * model.nodes.len() + pod_processes + usize::from(model.outside.is_some())
}

fn human(d: Duration) -> String {
    match d.as_secs() {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

/// `sandbox up`: builds the cluster in `layout` and leaves it running. Refused when a sandbox of this name
/// exists. On failure everything created so far is removed again.
pub fn up(opts: &Options, layout: Layout, progress: &mut dyn Write) -> Result<Model, Error> {
    preflight(opts)?;
    let _lock = lock(opts)?;
    if let Some(existing) = load(opts)? {
        return Err(Error::Exists(describe_existing(opts, &existing)));
    }
    let mut model = Model::bookinfo_in(&opts.name, BTreeMap::new(), layout);
    model.tokens = model
        .nodes
        .iter()
        .map(|n| (n.name.clone(), format!("{:032x}", rand::random::<u128>())))
        .collect();
    // Refuse to adopt namespaces someone else made under our names.
    for name in net::all_netns(&model) {
        if net::netns_path(&name).exists() {
            return Err(Error::Exists(format!(
                "network namespace {name} exists but no sandbox {:?} is recorded in {}: remove it (`ip netns del {name}`) or choose another --name",
                opts.name,
                opts.dir().display()
            )));
        }
    }
    for rel in ["logs", "node1/run", "node2/run", "cp-state"] {
        let p = opts.path(rel);
        std::fs::create_dir_all(&p).map_err(io("creating", &p))?;
    }
    // The mesh file holds the node proxies' CA tokens: root only.
    let dir = opts.dir();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io("restricting", &dir))?;
    // The model names every namespace: written first, so `down` can always find what this run made.
    save(opts, &model)?;
    match build(opts, &model, progress) {
        Ok(()) => Ok(model),
        Err(e) => {
            let _ = writeln!(progress, "  failed: removing what was created");
            let _ = teardown(opts, &model, &mut std::io::sink());
            Err(e)
        }
    }
}

fn step(progress: &mut dyn Write, what: &str) -> Instant {
    let _ = write!(progress, "  {what:<64} ");
    let _ = progress.flush();
    Instant::now()
}

fn done(progress: &mut dyn Write, started: Instant) {
    let _ = writeln!(progress, "ok ({:.1} s)", started.elapsed().as_secs_f64());
}

fn build(opts: &Options, model: &Model, progress: &mut dyn Write) -> Result<(), Error> {
    let nodes = if model.multi_network() {
        "nodes node1, node2 on network1, network2 (namespaces, link, gateway routes, VIPs)"
    } else {
        "nodes node1, node2 (namespaces, link, routes, service VIPs)"
    };
    let t = step(progress, nodes);
    net::create_nodes(model)?;
    net::install_services(model)?;
    done(progress, t);

    let cp = model.control_plane_addr();
    let node1 = net::netns_path(&net::node_netns(model, "node1"));
    let t = step(progress, &format!("control plane on node1 ({cp})"));
    let root_cert = opts.path("root-cert.pem");
    let args = [
        "control-plane".to_string(),
        "--config".into(),
        path_arg(&opts.path("mesh.yaml")),
        "--listen".into(),
        cp.to_string(),
        "--state-dir".into(),
        path_arg(&opts.path("cp-state")),
        "--root-cert-out".into(),
        path_arg(&root_cert),
    ];
    let pid = start(opts, &node1, &args, &[], "control-plane")?;
    wait(opts, "the control plane", "control-plane", || {
        root_cert.exists() && procs::listening(pid, cp.port())
    })?;
    done(progress, t);

    for node in &model.nodes {
        let ns = net::netns_path(&net::node_netns(model, &node.name));
        let dir = opts.path(&node.name);
        let t = step(
            progress,
            &format!("{}: cni-agent and proxy (shared mode)", node.name),
        );
        let token = dir.join("token");
        write_atomically_mode(&token, model.tokens[&node.name].as_bytes(), Some(0o600))
            .map_err(io("writing", &token))?;
        let agent_env = vec![
            ("CNI_AGENT_RUN_DIR", path_arg(&dir.join("run"))),
            ("ZTUNNEL_UDS_ADDRESS", path_arg(&dir.join("zds.sock"))),
            ("MESHNODE_AGENT_CONFIG", path_arg(&dir.join("agent.yaml"))),
            ("NODE_NAME", node.name.clone()),
            ("RUST_LOG", "info".into()),
            // Holds the node proxy's connections while it restarts (the proxy's `proxy_env` names the
            // same socket).
            (
                "MESHNODE_HANDOVER_SOCKET",
                path_arg(&dir.join("handover.sock")),
            ),
        ];
        let component = format!("{}-cni-agent", node.name);
        start(opts, &ns, &["cni-agent".into()], &agent_env, &component)?;
        let socket = dir.join("run/pluginevent.sock");
        wait(opts, "the CNI agent", &component, || socket.exists())?;
        let proxy_env = proxy_env(opts, model, node);
        let component = format!("{}-proxy", node.name);
        start(opts, &ns, &["proxy".into()], &proxy_env, &component)?;
        let node_ns = net::open(&net::node_netns(model, &node.name))?;
        wait(opts, "the node proxy", &component, || proxy_ready(&node_ns))?;
        done(progress, t);
    }

    if let (Some(outside), Some(name)) = (&model.outside, net::outside_netns(model)) {
        let t = step(
            progress,
            &format!(
                "outside world {} ({}:{}, off {})",
                model::OUTSIDE_HOST,
                outside.ip,
                model::OUTSIDE_PORT,
                outside.node
            ),
        );
        net::create_outside(model)?;
        let args = [
            "sandbox".to_string(),
            "app".into(),
            "external".into(),
            "--listen".into(),
            SocketAddr::new(outside.ip.into(), model::OUTSIDE_PORT).to_string(),
        ];
        let ns = net::netns_path(&name);
        let pid = start(opts, &ns, &args, &[("RUST_LOG", "info".into())], "outside")?;
        wait(opts, "the outside world's server", "outside", || {
            procs::listening(pid, model::OUTSIDE_PORT)
        })?;
        done(progress, t);
    }

    for pod in &model.pods {
        let what = match (&pod.app, &pod.waypoint, &pod.east_west) {
            (Some(app), _, _) => format!("pod {} on {} ({}, {app})", pod.key(), pod.node, pod.ip),
            (None, Some(gw), _) => format!(
                "pod {} on {} ({}, waypoint {gw})",
                pod.key(),
                pod.node,
                pod.ip
            ),
            (None, None, Some(_)) => format!(
                "pod {} on {} ({}, east-west gateway)",
                pod.key(),
                pod.node,
                pod.ip
            ),
            (None, None, None) => format!("pod {} on {} ({})", pod.key(), pod.node, pod.ip),
        };
        let t = step(progress, &what);
        start_pod(opts, model, pod)?;
        done(progress, t);
    }
    Ok(())
}

/// The node proxy's environment on `node`: shared mode on the node's agent, the control plane for xDS
/// and certificates, resumable streams and a hand-over socket (so `sandbox upgrade` keeps connections).
fn proxy_env(opts: &Options, model: &Model, node: &model::Node) -> Vec<(&'static str, String)> {
    let dir = opts.path(&node.name);
    let xds = format!("https://{}", model.control_plane_addr());
    let root_cert = path_arg(&opts.path("root-cert.pem"));
    let mut env = vec![
        ("PROXY_MODE", "shared".to_string()),
        ("INPOD_UDS", path_arg(&dir.join("zds.sock"))),
        ("XDS_ADDRESS", xds.clone()),
        ("CA_ADDRESS", xds),
        ("XDS_ROOT_CA", root_cert.clone()),
        ("CA_ROOT_CA", root_cert),
        ("AUTH_TOKEN", path_arg(&dir.join("token"))),
        ("NODE_NAME", node.name.clone()),
        ("MESHNODE_STATE_DIR", path_arg(&dir.join("proxy-state"))),
        ("MESHNODE_RESUMABLE_STREAMS", "true".into()),
        (
            "MESHNODE_HANDOVER_SOCKET",
            path_arg(&dir.join("handover.sock")),
        ),
        ("RUST_LOG", "info".into()),
    ];
    if let Some(network) = &node.network {
        env.push(("NETWORK", network.clone()));
    }
    env
}

/// Wires `pod` as a runtime would (its namespace and veth, then CNI ADD through `meshnode-cni`) and starts
/// what it runs: its bookinfo app, or `meshnode waypoint` for a waypoint's pod. Returns once that serves.
fn start_pod(opts: &Options, model: &Model, pod: &model::Pod) -> Result<(), Error> {
    let runtime = Runtime {
        cni_path: vec![opts.plugin.parent().unwrap_or(Path::new("/")).to_path_buf()],
    };
    let prev = net::wire_pod(model, pod)?;
    net::cni_add(
        model,
        pod,
        &runtime,
        &opts.path(&format!("{}/run", pod.node)),
        prev,
    )?;
    let ns = net::netns_path(&net::pod_netns(model, pod));
    let component = format!("{}-{}", pod.namespace, pod.name);
    if let Some(app) = &pod.app {
        let mut args = vec![
            "sandbox".to_string(),
            "app".into(),
            app.clone(),
            "--listen".into(),
            SocketAddr::new(pod.ip.into(), model::APP_PORT).to_string(),
        ];
        let needs: &[&str] = match app.parse::<apps::App>() {
            Ok(a) => a.upstreams(),
            Err(_) => &[],
        };
        for up in needs {
            if let Some(s) = model.find_service(up) {
                args.push("--upstream".into());
                args.push(format!("{up}={}:{}", s.vip, s.port));
            }
        }
        let pid = start(opts, &ns, &args, &[("RUST_LOG", "info".into())], &component)?;
        wait(opts, &format!("app {app}"), &component, || {
            procs::listening(pid, model::APP_PORT)
        })?;
    } else if let Some(gateway) = &pod.waypoint {
        start_waypoint(opts, model, pod, gateway, &ns, &component)?;
    } else if let Some(gateway) = &pod.east_west {
        start_gateway(opts, model, pod, gateway, &ns, &component)?;
    }
    Ok(())
}

/// Starts `meshnode gateway` in its pod as Istio runs an east-west gateway's proxy: its identity its
/// service account's, `NETWORK` its node's, its certificate and state from the control plane over the
/// node link with a token for that identity. Returns once it answers ready on :15021.
fn start_gateway(
    opts: &Options,
    model: &Model,
    pod: &model::Pod,
    gateway: &str,
    netns: &Path,
    component: &str,
) -> Result<(), Error> {
    let key = format!("{}/{gateway}", pod.namespace);
    let dir = opts.path(&format!("gateways/{}-{gateway}", pod.namespace));
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let token = dir.join("token");
    let secret = model.gateway_tokens.get(&key).cloned().unwrap_or_default();
    write_atomically_mode(&token, secret.as_bytes(), Some(0o600)).map_err(io("writing", &token))?;
    let cp = format!("https://{}", model.control_plane_addr());
    let root_cert = path_arg(&opts.path("root-cert.pem"));
    let env = vec![
        ("XDS_ADDRESS", cp.clone()),
        ("CA_ADDRESS", cp),
        ("XDS_ROOT_CA", root_cert.clone()),
        ("CA_ROOT_CA", root_cert),
        ("AUTH_TOKEN", path_arg(&token)),
        ("NETWORK", model.network_of(&pod.node).to_string()),
        ("POD_NAME", pod.name.clone()),
        ("POD_NAMESPACE", pod.namespace.clone()),
        ("SERVICE_ACCOUNT", pod.service_account.clone()),
        ("INSTANCE_IP", pod.ip.to_string()),
        ("NODE_NAME", pod.node.clone()),
        ("MESHNODE_STATE_DIR", path_arg(&dir.join("state"))),
        ("RUST_LOG", "info".into()),
    ];
    start(opts, netns, &["gateway".into()], &env, component)?;
    let ns = net::open(&net::pod_netns(model, pod))?;
    let ready = SocketAddr::new(pod.ip.into(), 15021);
    wait(opts, &format!("east-west gateway {key}"), component, || {
        let answer =
            ns.run_on_thread(move || apps::get(ready, "/healthz/ready", Duration::from_secs(2)));
        matches!(answer, Ok(apps::Outcome::Answered { status: 200, .. }))
    })
}

/// Starts `meshnode waypoint` in its pod as Istio's waypoint Deployment runs its proxy: its identity the
/// Gateway's service account, configured by the control plane over xDS with a token for that identity.
fn start_waypoint(
    opts: &Options,
    model: &Model,
    pod: &model::Pod,
    gateway: &str,
    netns: &Path,
    component: &str,
) -> Result<(), Error> {
    let key = format!("{}/{gateway}", pod.namespace);
    let dir = opts.path(&format!("waypoints/{}-{gateway}", pod.namespace));
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let token = dir.join("token");
    let secret = model.waypoint_tokens.get(&key).cloned().unwrap_or_default();
    write_atomically_mode(&token, secret.as_bytes(), Some(0o600)).map_err(io("writing", &token))?;
    let cp = format!("https://{}", model.control_plane_addr());
    let root_cert = path_arg(&opts.path("root-cert.pem"));
    let mut env = vec![
        ("XDS_ADDRESS", cp.clone()),
        ("CA_ADDRESS", cp),
        ("XDS_ROOT_CA", root_cert.clone()),
        ("CA_ROOT_CA", root_cert),
        ("AUTH_TOKEN", path_arg(&token)),
        ("WAYPOINT_NAME", gateway.to_string()),
        ("POD_NAME", pod.name.clone()),
        ("POD_NAMESPACE", pod.namespace.clone()),
        ("SERVICE_ACCOUNT", pod.service_account.clone()),
        ("INSTANCE_IP", pod.ip.to_string()),
        ("NODE_NAME", pod.node.clone()),
        ("MESHNODE_STATE_DIR", path_arg(&dir.join("state"))),
        ("RUST_LOG", "info".into()),
        // Connections through the waypoint outlive an upgrade of either node's proxy (`sandbox upgrade`).
        ("MESHNODE_RESUMABLE_STREAMS", "true".into()),
    ];
    // With two networks, the waypoint is on its node's: it crosses to the other through its gateway.
    if let Some(network) = model.node(&pod.node).and_then(|n| n.network.clone()) {
        env.push(("NETWORK", network));
    }
    start(opts, netns, &["waypoint".into()], &env, component)?;
    let ns = net::open(&net::pod_netns(model, pod))?;
    let ready = SocketAddr::new(pod.ip.into(), 15021);
    wait(opts, &format!("waypoint {key}"), component, || {
        let answer =
            ns.run_on_thread(move || apps::get(ready, "/healthz/ready", Duration::from_secs(2)));
        matches!(answer, Ok(apps::Outcome::Answered { status: 200, .. }))
    })
}

/// Stops what runs in `pod` and deletes its namespace (its veth and routes go with it).
fn remove_pod(opts: &Options, model: &Model, pod: &model::Pod) -> Result<(), Error> {
    let name = net::pod_netns(model, pod);
    procs::stop(
        procs::find(std::slice::from_ref(&name), &opts.dir())
            .into_iter()
            .filter(|f| f.netns == name)
            .collect(),
    );
    net::unwire_pod(model, pod)?;
    if let Some(gateway) = &pod.waypoint {
        let dir = opts.path(&format!("waypoints/{}-{gateway}", pod.namespace));
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Some(gateway) = &pod.east_west {
        let dir = opts.path(&format!("gateways/{}-{gateway}", pod.namespace));
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn start(
    opts: &Options,
    netns: &Path,
    args: &[String],
    env: &[(&str, String)],
    component: &str,
) -> Result<u32, Error> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let log = opts.log(component);
    procs::spawn(
        &opts.meshnode,
        netns,
        &opts.meshnode,
        args,
        &env,
        &opts.dir(),
        &log,
    )
    .map_err(io("starting", &opts.meshnode))
}

fn wait(
    opts: &Options,
    what: &str,
    component: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), Error> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready() {
        if Instant::now() > deadline {
            let log = opts.log(component);
            return Err(Error::Start {
                what: what.into(),
                tail: tail(&log),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
        .iter()
        .map(|l| format!("    {l}\n"))
        .collect()
}

/// Whether the node's proxy answers ready on :15021 (in the node's namespace: loopback only).
fn proxy_ready(node: &Arc<crate::netns::Netns>) -> bool {
    proxy_ready_on(node, 15021)
}

/// Whether a proxy answers ready on `port` in the node's namespace.
fn proxy_ready_on(node: &Arc<crate::netns::Netns>, port: u16) -> bool {
    let ready = node.run_on_thread(move || {
        apps::get(
            ([127, 0, 0, 1], port).into(),
            "/healthz/ready",
            Duration::from_secs(2),
        )
    });
    matches!(ready, Ok(apps::Outcome::Answered { status: 200, .. }))
}

/// What `down` removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Processes stopped.
    pub processes: usize,
    /// Network namespaces deleted.
    pub namespaces: usize,
}

/// `sandbox down`: stops every process in the sandbox's namespaces, deletes the namespaces (and with them
/// every interface, route and rule in them) and the state directory. Works on a half-built or crashed
/// sandbox; nothing to remove is not an error.
pub fn down(opts: &Options, progress: &mut dyn Write) -> Result<Option<Removed>, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let _lock = lock(opts)?;
    let model = match load(opts) {
        Ok(Some(m)) => m,
        Ok(None) => {
            remove_dir(opts)?;
            let _ = std::fs::remove_file(opts.root.join(format!("{}.lock", opts.name)));
            return Ok(None);
        }
        // An unreadable model still names the sandbox: rebuild the names from the layout (the two-network
        // one names every namespace the one-network one does, and the gateways'; absent ones are skipped).
        Err(Error::BadState { .. }) => {
            Model::bookinfo_in(&opts.name, BTreeMap::new(), Layout::TwoNetworks)
        }
        Err(e) => return Err(e),
    };
    teardown(opts, &model, progress).map(Some)
}

fn teardown(opts: &Options, model: &Model, progress: &mut dyn Write) -> Result<Removed, Error> {
    let names = net::all_netns(model);
    let t = step(progress, "stopping processes");
    let processes = procs::stop_all(&names, &opts.dir());
    done(progress, t);
    let t = step(progress, "deleting network namespaces");
    let mut namespaces = 0;
    // Pods first, then nodes: the reverse of creation.
    for name in names.iter().rev() {
        if net::netns_path(name).exists() {
            crate::netsetup::delete_named_netns(name).map_err(|source| {
                Error::Net(net::Error::Setup {
                    what: format!("deleting {name}"),
                    source,
                })
            })?;
            namespaces += 1;
        }
    }
    done(progress, t);
    remove_dir(opts)?;
    // Unlinking the lock file while holding it: a command waiting on it fails as Busy, then finds nothing.
    let _ = std::fs::remove_file(opts.root.join(format!("{}.lock", opts.name)));
    Ok(Removed {
        processes,
        namespaces,
    })
}

fn remove_dir(opts: &Options) -> Result<(), Error> {
    let dir = opts.dir();
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", &dir)(e)),
    }
}

/// The model of a sandbox that is up, or [`Error::NotUp`].
pub fn require(opts: &Options) -> Result<Model, Error> {
    load(opts)?.ok_or_else(|| Error::NotUp {
        name: opts.name.clone(),
    })
}

/// `sandbox exec POD -- CMD`: runs CMD inside the pod's network namespace, with `/etc/hosts` naming the
/// services. Returns only on failure (the process becomes CMD).
pub fn exec(opts: &Options, pod: &str, command: &[std::ffi::OsString]) -> Error {
    if !nix::unistd::geteuid().is_root() {
        return Error::NotRoot;
    }
    let model = match require(opts) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let pod = match model.find_pod(pod) {
        Ok(p) => p,
        Err(e) => return Error::Refused(e),
    };
    let ns = net::netns_path(&net::pod_netns(&model, pod));
    Error::Refused(procs::enter(&ns, Some(&opts.path("hosts")), command).to_string())
}

/// `sandbox status`: what runs, where, and whether it is healthy.
pub fn status(opts: &Options, out: &mut dyn Write) -> Result<bool, Error> {
    let model = require(opts)?;
    let found = procs::find(&net::all_netns(&model), &opts.dir());
    let running = |netns: &str, needle: &str| {
        found
            .iter()
            .find(|f| f.netns == netns && f.cmdline.contains(needle))
    };
    let healthy = std::cell::Cell::new(true);
    let mark = |ok: bool| {
        healthy.set(healthy.get() && ok);
        if ok {
            "running"
        } else {
            "NOT RUNNING"
        }
    };
    let _ = writeln!(
        out,
        "sandbox {:?} (state in {})",
        model.name,
        opts.dir().display()
    );
    let _ = writeln!(
        out,
        "\n{:<8} {:<14} {:<22} STATE",
        "NODE", "ADDRESS", "COMPONENT"
    );
    for n in &model.nodes {
        let ns = net::node_netns(&model, &n.name);
        let mut components = vec![("cni-agent", " cni-agent"), ("proxy", " proxy")];
        if n.name == model.nodes[0].name {
            components.insert(0, ("control-plane", " control-plane"));
        }
        for (what, needle) in components {
            let p = running(&ns, needle);
            let state = match p {
                Some(p) => format!("{} (pid {})", mark(true), p.pid),
                None => mark(false).to_string(),
            };
            let _ = writeln!(out, "{:<8} {:<14} {:<22} {state}", n.name, n.ip, what);
        }
    }
    // The outside world: not a node, listed with them as where its server runs.
    if let (Some(outside), Some(ns)) = (&model.outside, net::outside_netns(&model)) {
        let state = match running(&ns, " external") {
            Some(p) => format!("{} (pid {})", mark(true), p.pid),
            None => mark(false).to_string(),
        };
        let _ = writeln!(
            out,
            "{:<8} {:<14} {:<22} {state}",
            "outside",
            outside.ip,
            model::OUTSIDE_HOST
        );
    }
    // Wide enough for the longest pod (`istio-system/eastwest-network1-0`); 28 for bookinfo's.
    let w_pod = model
        .pods
        .iter()
        .map(|p| p.key().len() + 1)
        .max()
        .unwrap_or(0)
        .max(28);
    let _ = writeln!(
        out,
        "\n{:<w_pod$} {:<7} {:<12} {:<11} {:<16} STATE",
        "POD", "NODE", "IP", "MESH", "APP"
    );
    for p in &model.pods {
        let ns = net::pod_netns(&model, p);
        let captured = net::open(&ns)
            .ok()
            .and_then(|n| n.run_on_thread(crate::redirect::inspect).ok())
            .and_then(Result::ok)
            .is_some_and(|i| !i.is_empty());
        let mesh = match (model.captured(p), captured) {
            (true, true) => "captured",
            (false, false) => "-",
            (true, false) => "NOT CAPTURED",
            (false, true) => "STILL CAPTURED",
        };
        healthy.set(healthy.get() && model.captured(p) == captured);
        let (what, needle) = match (&p.app, &p.waypoint, &p.east_west) {
            (Some(app), _, _) => (app.clone(), Some(" app ")),
            (None, Some(_), _) => ("(waypoint)".to_string(), Some(" waypoint")),
            (None, None, Some(_)) => ("(east-west gw)".to_string(), Some(" gateway")),
            (None, None, None) => ("(client)".to_string(), None),
        };
        let state = match needle {
            Some(needle) => match running(&ns, needle) {
                Some(f) => format!("{} (pid {})", mark(true), f.pid),
                None => mark(false).to_string(),
            },
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<w_pod$} {:<7} {:<12} {:<11} {:<16} {state}",
            p.key(),
            p.node,
            p.ip,
            mesh,
            what
        );
    }
    if model.multi_network() && !write_networks(out, &model) {
        healthy.set(false);
    }
    let _ = writeln!(out, "\n{:<28} {:<12} PORT", "SERVICE", "VIP");
    for s in &model.services {
        let _ = writeln!(
            out,
            "{:<28} {:<12} {}",
            format!("{}/{}", s.namespace, s.name),
            s.vip,
            s.port
        );
    }
    let _ = writeln!(out, "\nNAMESPACE      LABELS");
    for (n, l) in &model.namespaces {
        let labels: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "{n:<14} {}", labels.join(","));
    }
    let _ = writeln!(out, "\nISTIO OBJECTS");
    if model.istio.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for o in &model.istio {
        let _ = writeln!(
            out,
            "{} {}/{}",
            o["kind"].as_str().unwrap_or("?"),
            o["metadata"]["namespace"].as_str().unwrap_or("?"),
            o["metadata"]["name"].as_str().unwrap_or("?")
        );
    }
    match l7::view(&model) {
        Ok(v) => write_l7(out, &v),
        Err(e) => {
            healthy.set(false);
            let _ = writeln!(
                out,
                "\nWAYPOINTS\nthe control plane refuses the sandbox's objects: {e}"
            );
        }
    }
    let _ = writeln!(out, "\nlogs: {}", opts.path("logs").display());
    Ok(healthy.get())
}

/// The networks: each one's nodes and east-west gateway as the control plane sees them (its own
/// topology of the mesh file), and its warnings. False when a network has no usable gateway.
fn write_networks(out: &mut dyn Write, model: &Model) -> bool {
    use crate::control_plane::topology::Topology;
    let topology = crate::control_plane::MeshConfig::parse(&model.mesh_yaml())
        .map_err(|e| e.to_string())
        .and_then(|cfg| Topology::convert(&cfg).map_err(|e| e.to_string()));
    let _ = writeln!(
        out,
        "\n{:<10} {:<7} {:<32} {:<18} INSTANCE",
        "NETWORK", "NODES", "EAST-WEST GATEWAY", "ADDRESS"
    );
    let topology = match topology {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(out, "the control plane refuses the sandbox's networks: {e}");
            return false;
        }
    };
    let mut networks: Vec<&str> = model
        .nodes
        .iter()
        .filter_map(|n| n.network.as_deref())
        .collect();
    networks.sort_unstable();
    networks.dedup();
    let mut ok = true;
    for network in networks {
        let nodes: Vec<&str> = model
            .nodes
            .iter()
            .filter(|n| n.network.as_deref() == Some(network))
            .map(|n| n.name.as_str())
            .collect();
        let (gateway, address, instance) = match topology.gateway(network) {
            Some(g) => {
                let instance = model
                    .pods
                    .iter()
                    .find(|p| {
                        p.namespace == g.namespace
                            && p.east_west.as_deref() == Some(g.name.as_str())
                    })
                    .map_or("-".to_string(), |p| p.key());
                (
                    format!("{}/{}", g.namespace, g.name),
                    format!("{}:{}", g.address, g.hbone_port),
                    instance,
                )
            }
            None => {
                ok = false;
                ("NONE".to_string(), "-".to_string(), "-".to_string())
            }
        };
        let _ = writeln!(
            out,
            "{network:<10} {:<7} {gateway:<32} {address:<18} {instance}",
            nodes.join(",")
        );
    }
    for w in &topology.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    ok
}

/// The waypoints, their routes and the control plane's warnings about them.
fn write_l7(out: &mut dyn Write, v: &l7::View) {
    let _ = writeln!(
        out,
        "\n{:<24} {:<9} {:<24} SERVICES",
        "WAYPOINT", "FOR", "POD"
    );
    if v.waypoints.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for w in &v.waypoints {
        let mut serves = w.services.join(", ");
        if w.workloads > 0 {
            serves += &format!(" (+{} pods)", w.workloads);
        }
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:<24} {}",
            w.gateway,
            w.traffic,
            w.pod.as_deref().unwrap_or("-"),
            if serves.is_empty() { "-" } else { &serves }
        );
        if !w.policies.is_empty() {
            let _ = writeln!(out, "{:<24} L7 policies: {}", "", w.policies.join(", "));
        }
    }
    if !v.routes.is_empty() {
        let _ = writeln!(out, "\n{:<24} {:<28} TO", "ROUTE AT WAYPOINT", "NAME");
        for r in &v.routes {
            let _ = writeln!(out, "{:<24} {:<28} {}", r.service, r.route, r.to);
        }
    }
    for w in &v.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
}

/// `sandbox apply FILE` / `sandbox delete FILE`: reads the manifest (`-`: stdin) and applies it with
/// [`apply_text`], printing one line per object.
pub fn apply(
    opts: &Options,
    file: &Path,
    verb: apply::Verb,
    out: &mut dyn Write,
) -> Result<(), Error> {
    // One byte over the limit is enough for `apply::change` to refuse it as too large.
    let limit = apply::MAX_BYTES as u64 + 1;
    let mut text = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_string(&mut text))
    };
    read.map_err(io("reading", file))?;
    let (_, lines) = apply_text(opts, &text, &file.display().to_string(), verb)?;
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    Ok(())
}

/// Changes the running sandbox with a manifest, all of it or (on any refusal) none: under the sandbox's
/// lock, the model is changed and the files the agents and the control plane re-read are rewritten.
/// Returns the new model and kubectl-style lines. What `sandbox apply` and the tutorial both use.
pub fn apply_text(
    opts: &Options,
    text: &str,
    source: &str,
    verb: apply::Verb,
) -> Result<(Model, Vec<String>), Error> {
    let _lock = lock(opts)?;
    let model = require(opts)?;
    let (next, mut lines) =
        apply::change(&model, text, source, verb).map_err(|e| Error::Refused(e.to_string()))?;
    // The model first: it names every namespace, so `down` finds whatever happens next.
    save(opts, &next)?;
    let has = |m: &Model, pod: &model::Pod| m.pods.iter().any(|p| p.key() == pod.key());
    for gone in model.pods.iter().filter(|p| !has(&next, p)) {
        remove_pod(opts, &model, gone)?;
    }
    for new in next.pods.iter().filter(|p| !has(&model, p)) {
        if let Err(e) = start_pod(opts, &next, new) {
            // All or nothing: back to the model before this manifest.
            let _ = remove_pod(opts, &next, new);
            save(opts, &model)?;
            return Err(e);
        }
        if let Some(gw) = &new.waypoint {
            lines.push(format!("waypoint {}/{gw} ready", new.namespace));
        }
    }
    Ok((next, lines))
}
