//! Wiring of the proxy, waypoint and east-west gateway roles: from a [`Config`] (a [`WaypointConfig`], a
//! [`GatewayConfig`]) to running listeners, and back down at shutdown.
//!
//! Input: the config, the bound listeners and a shutdown signal (all passed in, so tests can run a proxy
//! on loopback addresses of their choosing). Output: a running proxy; [`run_proxy`] returns once it has
//! drained ([`run_waypoint`] likewise for a waypoint). Start-up refuses clearly what it cannot do: a bad
//! local config, an unusable CA, a mode not built yet.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{
    CaSource, Config, GatewayConfig, LocalConfigSource, ProxyMode, WaypointConfig,
};
use crate::grpc::Credentials;
use crate::identity::{BuiltinCa, CaClient, CertManager, CertSource, PluginCa};
use crate::proxy::{Listeners, Proxy, ProxyInputs};
use crate::readiness::Readiness;
use crate::socket::{self, SocketOpts};
use crate::state::{local, State, StateHandle};
use crate::waypoint::{Snapshot, Waypoint, WaypointInputs, WaypointMetrics};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The local config is unusable.
    #[error(transparent)]
    LocalConfig(#[from] local::Error),
    /// The certificate authority is unusable.
    #[error("certificate authority: {0}")]
    Ca(#[from] crate::identity::Error),
    /// A listener could not be bound.
    #[error("{0}")]
    Bind(std::io::Error),
    /// A thread or runtime could not be started.
    #[error("starting {what}: {source}")]
    Spawn {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A configuration this build cannot serve.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// The state handle for `cfg`, and the task keeping it current (a file watcher), if any.
pub fn load_state(
    cfg: &Config,
) -> Result<(StateHandle, Option<impl std::future::Future<Output = ()>>), Error> {
    match &cfg.local_config {
        LocalConfigSource::File(path) => {
            let (bytes, state) = local::load_file(path)?;
            local::log_loaded(path, &state, "local config loaded");
            let (tx, handle) = StateHandle::new(state);
            Ok((
                handle,
                Some(local::watch_file(
                    path.clone(),
                    cfg.local_config_poll,
                    bytes,
                    tx,
                )),
            ))
        }
        LocalConfigSource::Inline(yaml) => {
            let state = local::state_from_text(yaml)?;
            // Inline config never changes: the sender goes, readers keep the last (only) value.
            let (_, handle) = StateHandle::new(state);
            Ok((handle, None))
        }
        LocalConfigSource::None => {
            let (_, handle) = StateHandle::new(State::default());
            Ok((handle, None))
        }
    }
}

/// Runs `client` on a current-thread runtime of its own, on a thread named `meshnode-xds`, until `shutdown`;
/// the readiness task `xds` is done at its first complete sync.
fn spawn_xds_thread(
    client: crate::xds::XdsClient,
    ready: &Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let task = ready.register("xds");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Spawn {
            what: "the xDS runtime",
            source,
        })?;
    std::thread::Builder::new()
        .name("meshnode-xds".into())
        .spawn(move || rt.block_on(client.run(move || task.done(), shutdown)))
        .map_err(|source| Error::Spawn {
            what: "the xDS thread",
            source,
        })?;
    Ok(())
}

/// Starts the xDS client on a runtime of its own (a single thread named `meshnode-xds`), so control-plane
/// pushes never compete with the data plane's workers (ztunnel's split). Readiness waits for its first sync.
fn start_xds(
    cfg: &Config,
    target: crate::config::GrpcTarget,
    xds_metrics: crate::metrics::XdsMetrics,
    ready: &Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> Result<StateHandle, Error> {
    let (tx, handle) = StateHandle::new(State::default());
    let creds = Credentials::new(
        cfg.auth_token.clone(),
        cfg.cluster_id.clone(),
        target.headers.clone(),
    );
    let node = crate::xds::NodeInfo::new(&cfg.proxy_meta, cfg.node_name.as_deref());
    let client =
        crate::xds::XdsClient::new(target.clone(), creds, node, tx).with_metrics(xds_metrics);
    spawn_xds_thread(client, ready, shutdown)?;
    tracing::info!(address = %target.address, "xDS client started");
    Ok(handle)
}

/// The state for `cfg`: from xDS (readiness waiting for its first sync), or from the local config (its
/// watcher spawned); refused when both are set.
fn start_state(
    cfg: &Config,
    xds_metrics: crate::metrics::XdsMetrics,
    ready: &Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> Result<StateHandle, Error> {
    match &cfg.xds {
        Some(target) => {
            if cfg.local_config != LocalConfigSource::None {
                return Err(Error::Unsupported(
                    "LOCAL_XDS_PATH/LOCAL_XDS and XDS_ADDRESS both set: each replaces the whole state; set XDS_ADDRESS= (empty) to use the local config",
                ));
            }
            start_xds(cfg, target.clone(), xds_metrics, ready, shutdown)
        }
        None => {
            let (state, watcher) = load_state(cfg)?;
            if let Some(w) = watcher {
                tokio::spawn(w);
            }
            Ok(state)
        }
    }
}

/// The certificate source `cfg` asks for.
pub fn cert_source(cfg: &Config) -> Result<Arc<dyn CertSource>, Error> {
    // In shared mode the node proxy asks for its pods' identities with its own token.
    cert_source_for(cfg, cfg.proxy_mode == ProxyMode::Shared)
}

/// The certificate source `cfg` asks for; with `impersonate`, a remote CA is asked for other identities
/// than the caller's own (`ImpersonatedIdentity`).
fn cert_source_for(cfg: &Config, impersonate: bool) -> Result<Arc<dyn CertSource>, Error> {
    Ok(match &cfg.ca {
        CaSource::PluginDir(dir) => Arc::new(PluginCa::load(dir, cfg.secret_ttl)?),
        CaSource::Builtin(state_dir) => {
            Arc::new(BuiltinCa::load_or_create(state_dir, cfg.secret_ttl)?)
        }
        CaSource::Remote(target) => Arc::new(CaClient::new(
            target,
            Credentials::new(
                cfg.auth_token.clone(),
                cfg.cluster_id.clone(),
                target.headers.clone(),
            ),
            cfg.secret_ttl,
            impersonate,
        )?),
    })
}

/// Whether connections to applications keep the client's address: `ENABLE_ORIG_SRC` if set, else on in
/// shared mode (where the capture rules route the replies back) and off in dedicated mode (where nothing
/// would route them back to the proxy).
pub fn orig_src(cfg: &Config) -> Result<bool, Error> {
    match cfg.enable_orig_src {
        Some(true) if !socket::can_be_transparent() => Err(Error::Unsupported(
            "ENABLE_ORIG_SRC=true needs CAP_NET_ADMIN (IP_TRANSPARENT); grant it or unset the variable",
        )),
        Some(b) => Ok(b),
        None => Ok(cfg.proxy_mode == ProxyMode::Shared && socket::can_be_transparent()),
    }
}

/// Runs the proxy role until `shutdown` turns true and the connections have drained: in dedicated mode on
/// the given listeners, in shared mode for every pod the CNI agent hands over (the listeners, bound in
/// the proxy's own namespace, are then not used for traffic).
pub async fn run_proxy(
    cfg: Arc<Config>,
    listeners: Option<Listeners>,
    readiness_listener: Option<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    run_proxy_with_metrics(cfg, listeners, readiness_listener, None, shutdown).await
}

/// [`run_proxy`], also serving `GET /metrics` on `metrics_listener` (ztunnel's :15020). One registry per
/// process: every pod's proxy in shared mode records into it.
pub async fn run_proxy_with_metrics(
    cfg: Arc<Config>,
    listeners: Option<Listeners>,
    readiness_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    run_proxy_inner(
        cfg,
        listeners,
        readiness_listener,
        metrics_listener,
        None,
        shutdown,
    )
    .await
}

/// The admin port's listeners (see [`crate::admin::bind`]) and the log filter it changes.
pub struct AdminPort {
    /// Bound on localhost.
    pub listeners: Vec<TcpListener>,
    /// The process's log filter.
    pub logs: crate::logging::LogControl,
}

/// [`run_proxy_with_metrics`], also serving the admin API (ztunnel's localhost:15000) on `admin`. Its
/// `/quitquitquit` starts the same shutdown as `shutdown` turning true, and is answered once the proxy has
/// drained (or at the termination deadline), before this returns.
pub async fn run_proxy_with_admin(
    cfg: Arc<Config>,
    listeners: Option<Listeners>,
    readiness_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    admin: AdminPort,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    // One shutdown for the proxy, turned on by the caller's signal or by /quitquitquit.
    let (request, stop) = watch::channel(false);
    let request = Arc::new(request);
    let forward = request.clone();
    tokio::spawn(async move {
        if shutdown.wait_for(|s| *s).await.is_ok() {
            forward.send_replace(true);
        }
    });
    let (stopped_tx, stopped) = watch::channel(false);
    // The drain itself takes up to the termination deadline; the answer waits a little longer.
    let answer_by = cfg.termination_deadline + std::time::Duration::from_secs(1);
    let trigger = crate::admin::ShutdownTrigger::new(request, stopped, answer_by);
    let (server_tx, server_rx) = tokio::sync::oneshot::channel();
    let result = run_proxy_inner(
        cfg,
        listeners,
        readiness_listener,
        metrics_listener,
        Some((admin, trigger, server_tx)),
        stop,
    )
    .await;
    stopped_tx.send_replace(true);
    if let Ok(server) = server_rx.await {
        // The /quitquitquit answer (if one is waiting) goes out before the process exits.
        crate::admin::AdminServer::finished(server, std::time::Duration::from_secs(2)).await;
    }
    result
}

/// What starting the admin server needs once the state and certificates exist, and where to hand the
/// running server back.
type AdminStart = (
    AdminPort,
    crate::admin::ShutdownTrigger,
    tokio::sync::oneshot::Sender<crate::admin::AdminServer>,
);

async fn run_proxy_inner(
    cfg: Arc<Config>,
    listeners: Option<Listeners>,
    readiness_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    admin: Option<AdminStart>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    // Shared mode also exposes ztunnel's workload manager families; elsewhere the handles count nothing.
    let (metrics, workload_manager) = match cfg.proxy_mode {
        ProxyMode::Shared => crate::metrics::Metrics::with_workload_manager(),
        _ => (crate::metrics::Metrics::new(), Default::default()),
    };
    let metrics = Arc::new(metrics);
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::metrics::serve(l, metrics.clone(), shutdown.clone()));
    }
    let ready = Readiness::new();
    let state = start_state(&cfg, metrics.xds(), &ready, shutdown.clone())?;
    let certs = CertManager::new(cert_source(&cfg)?);
    let orig_src = orig_src(&cfg)?;
    if let Some(l) = readiness_listener {
        tokio::spawn(crate::readiness::serve(l, ready.clone(), shutdown.clone()));
    }
    let pods = crate::inpod::PodStates::default();
    let handover = cfg
        .handover_socket
        .clone()
        .map(crate::proxy::handover::Handover::new);
    if let Some((port, trigger, hand_back)) = admin {
        let inputs = crate::admin::AdminInputs {
            cfg: cfg.clone(),
            state: state.clone(),
            certs: certs.clone(),
            pods: (cfg.proxy_mode == ProxyMode::Shared).then(|| pods.clone()),
            logs: port.logs,
            shutdown: trigger,
        };
        let _ = hand_back.send(crate::admin::spawn(
            port.listeners,
            inputs,
            shutdown.clone(),
        ));
    }
    let workload = match (cfg.proxy_mode, &cfg.workload_info) {
        (ProxyMode::Dedicated, Some(w)) => w.clone(),
        (ProxyMode::Dedicated, None) => {
            return Err(Error::Unsupported(
                "dedicated mode needs PROXY_WORKLOAD_INFO",
            ))
        }
        (ProxyMode::Shared, _) => {
            let inputs = crate::inpod::InpodInputs {
                dns: crate::dns::Resolver::new(&cfg, state.clone(), metrics.clone()),
                dns_serve: cfg.dns.enabled,
                cfg: cfg.clone(),
                state,
                certs,
                orig_src,
                metrics,
                workload_manager,
                pods: pods.clone(),
                handover: handover.clone(),
            };
            let (shutdown, departure) = match handover {
                Some(h) => {
                    let listed = pods.clone();
                    let find = move |uid: &str| pods.proxy(uid);
                    let open = move || {
                        listed
                            .snapshot()
                            .values()
                            .filter_map(|p| p.connections.as_ref())
                            .map(|c| c.inbound.len() + c.outbound.len())
                            .sum()
                    };
                    let (inner, task) =
                        hand_over_at_shutdown(h, shutdown, ready.clone(), find, open);
                    (inner, Some(task))
                }
                None => (shutdown, None),
            };
            crate::inpod::run(inputs, ready, shutdown).await;
            if let Some(task) = departure {
                let _ = task.await;
            }
            return Ok(());
        }
    };
    let Some(listeners) = listeners else {
        return Err(Error::Unsupported("dedicated mode needs its listeners"));
    };
    let sock = SocketOpts {
        mark: cfg.packet_mark,
        transparent: false,
        reuse_port: false,
    };
    // Dedicated mode: DNS in the proxy's own namespace. A port already taken there (several dedicated
    // proxies sharing one namespace) costs only DNS, which this mode's capture does not redirect anyway.
    let resolver = crate::dns::Resolver::new(&cfg, state.clone(), metrics.clone());
    if cfg.dns.enabled {
        match crate::dns::Sockets::bind(cfg.dns.bind, cfg.ipv6_enabled, None, false) {
            Ok(sockets) => {
                let pod = crate::dns::PodDns {
                    resolver: resolver.clone(),
                    workload: workload.clone(),
                    netns: None,
                };
                tokio::spawn(crate::dns::serve(pod, sockets, shutdown.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "DNS proxy not started"),
        }
    }
    // The proxy, once built, for the connections handed over to this process.
    let built: Arc<std::sync::OnceLock<Arc<Proxy>>> = Arc::default();
    let (shutdown, departure) = match handover.clone() {
        Some(h) => {
            let (built, listed) = (built.clone(), built.clone());
            let find = move |_: &str| built.get().cloned();
            let open = move || {
                listed.get().map_or(0, |p| {
                    let (inbound, outbound) = p.listed_connections();
                    inbound.len() + outbound.len()
                })
            };
            let (inner, task) = hand_over_at_shutdown(h, shutdown, ready.clone(), find, open);
            (inner, Some(task))
        }
        None => (shutdown, None),
    };
    let proxy = Proxy::new(
        ProxyInputs {
            cfg: cfg.clone(),
            state,
            certs,
            workload,
            sock,
            orig_src,
            netns: None,
            // Not served yet: app.rs creates the process registry and serves it on :15020 (issue 5 wiring).
            metrics,
            resolver: Some(resolver),
            handover: handover
                .clone()
                .map(|handover| crate::proxy::handover::Slot {
                    handover,
                    pod: String::new(),
                }),
        },
        shutdown,
    );
    let _ = built.set(proxy.clone());
    // Ready once our workload is known and its certificate issued, so the first connection does not wait.
    let task = ready.register("proxy");
    let warm = proxy.clone();
    tokio::spawn(async move {
        loop {
            match warm.local_workload().await {
                Ok(w) => match warm.tls_for(&w.identity).await {
                    Ok(_) => break,
                    Err(e) => tracing::warn!(error = %e, "waiting for the workload certificate"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for the workload to appear in the local config")
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        tracing::info!("proxy ready");
        task.done();
    });
    proxy.serve(listeners).await;
    if let Some(task) = departure {
        let _ = task.await;
    }
    Ok(())
}

/// Upgrades without cutting connections (`MESHNODE_HANDOVER_SOCKET`): once `ready`, takes the
/// connections a leaving process hands over (each to the proxy `find` names for its pod); when
/// `shutdown` turns true, stops taking them, turns the returned shutdown (the proxies') true, and hands
/// this process's resumable connections to the process that replaces it, saying how many others (`open`
/// counts them) are left to drain. The task ends when that is done; await it before exiting.
fn hand_over_at_shutdown<F, O>(
    handover: Arc<crate::proxy::handover::Handover>,
    shutdown: watch::Receiver<bool>,
    ready: Arc<Readiness>,
    find: F,
    open: O,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>)
where
    F: Fn(&str) -> Option<Arc<Proxy>> + Send + Sync + 'static,
    O: Fn() -> usize + Send + 'static,
{
    let (inner_tx, inner) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut outer = shutdown.clone();
        let arrivals = async {
            // Only once this process serves its pods: a leaving one hands its connections to us then.
            while !ready.pending().is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            if let Err(e) =
                crate::proxy::handover::arrive(handover.path(), &find, shutdown.clone()).await
            {
                tracing::warn!(error = %e, "connections cannot be handed over to this process");
            }
        };
        tokio::select! {
            _ = arrivals => {}
            _ = outer.wait_for(|s| *s) => {}
        }
        let _ = outer.wait_for(|s| *s).await;
        inner_tx.send_replace(true);
        match handover.leave().await {
            Ok(left) if left.to == crate::proxy::handover::To::Holder => tracing::info!(
                taken = left.taken,
                closed = left.kept + left.late,
                draining = open(),
                error = left.error.map(|e| e.to_string()),
                "no new process yet: resumable connections handed to the CNI agent, which holds them until it is ready (plain TCP ones too); the others (a ztunnel peer) drain"
            ),
            Ok(left) => tracing::info!(
                taken = left.taken,
                closed = left.kept + left.late,
                draining = open(),
                error = left.error.map(|e| e.to_string()),
                "resumable connections handed over to the new process, and plain TCP ones; the others (a ztunnel peer) drain"
            ),
            Err(e) => tracing::info!(error = %e, "no hand-over: open connections drain"),
        }
    });
    (inner, task)
}

/// Raises the soft limit on open files to the hard limit, as ztunnel does at start. Every proxied
/// connection takes two descriptors (in shared mode, for every pod of the node), and the usual soft default
/// (1024) would stop the proxy far below its configured connection bounds. Returns the soft limit before
/// and after.
pub fn raise_fd_limit() -> Result<(u64, u64), nix::Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// The admin port (:15000) on localhost in the current network namespace (the proxy's own, in shared mode).
pub fn bind_admin(cfg: &Config) -> Result<Vec<TcpListener>, Error> {
    crate::admin::bind(cfg).map_err(Error::Bind)
}

/// The stats port (`GET /metrics`, :15020) in the current network namespace.
pub fn bind_metrics(cfg: &Config) -> Result<TcpListener, Error> {
    socket::listen(cfg.wildcard(cfg.ports.metrics), SocketOpts::default()).map_err(Error::Bind)
}

/// Binds the proxy's listeners (dedicated mode only: in shared mode they live in each pod's namespace) and
/// the readiness port, in the current network namespace.
pub fn bind(cfg: &Config) -> Result<(Option<Listeners>, TcpListener), Error> {
    let readiness = socket::listen(cfg.wildcard(cfg.ports.readiness), SocketOpts::default())
        .map_err(Error::Bind)?;
    if cfg.proxy_mode == ProxyMode::Shared {
        return Ok((None, readiness));
    }
    let transparent = orig_src(cfg)?;
    let opts = SocketOpts {
        mark: cfg.packet_mark,
        transparent,
        reuse_port: false,
    };
    let listeners = Listeners::bind(cfg, opts).map_err(Error::Bind)?;
    Ok((Some(listeners), readiness))
}

/// The waypoint's listeners: HBONE (:15008), readiness (:15021) and metrics (:15020, optional: serving
/// goes on without it), in the current network namespace.
pub fn bind_waypoint(
    cfg: &WaypointConfig,
) -> Result<(TcpListener, TcpListener, Option<TcpListener>), Error> {
    bind_role(
        &cfg.base,
        cfg.ports.hbone,
        cfg.ports.readiness,
        cfg.ports.metrics,
    )
}

/// A role's HBONE, readiness and (optional: serving goes on without it) metrics listeners.
fn bind_role(
    base: &Config,
    hbone: u16,
    readiness: u16,
    metrics: u16,
) -> Result<(TcpListener, TcpListener, Option<TcpListener>), Error> {
    let hbone = socket::listen(base.wildcard(hbone), SocketOpts::default()).map_err(Error::Bind)?;
    let readiness =
        socket::listen(base.wildcard(readiness), SocketOpts::default()).map_err(Error::Bind)?;
    let metrics = match socket::listen(base.wildcard(metrics), SocketOpts::default()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "metrics port unavailable; serving without /metrics");
            None
        }
    };
    Ok((hbone, readiness, metrics))
}

/// Starts the waypoint's xDS client on a runtime of its own (as the proxy's): Address and Authorization,
/// plus this waypoint's `Waypoint` resource. Each new set of resources is built into a [`Snapshot`] on
/// the xDS thread (so the data path only ever swaps an `Arc`); clusters that did not change keep their
/// endpoint state. Readiness waits for the first complete set.
fn start_waypoint_xds(
    cfg: &WaypointConfig,
    target: crate::config::GrpcTarget,
    ready: &Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> Result<watch::Receiver<Arc<Snapshot>>, Error> {
    let base = &cfg.base;
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let creds = Credentials::new(
        base.auth_token.clone(),
        base.cluster_id.clone(),
        target.headers.clone(),
    );
    let node = crate::xds::NodeInfo::waypoint(&base.proxy_meta, base.node_name.as_deref());
    let name = cfg.resource_name();
    let publish_name = name.clone();
    let network = base.network.clone();
    let sub = crate::xds::WaypointSubscription {
        name,
        check: Box::new(|w| crate::waypoint::snapshot::check(w).map_err(|e| e.to_string())),
        publish: Box::new(move |res: crate::xds::WaypointResources| {
            let previous = tx.borrow().clone();
            match Snapshot::build(
                &res.workloads,
                &res.services,
                res.waypoint.as_deref(),
                &network,
                Some(&previous),
            ) {
                Ok(snap) => {
                    tracing::info!(
                        waypoint = %publish_name,
                        configured = res.waypoint.is_some(),
                        services = res.waypoint.as_ref().map_or(0, |w| w.services.len()),
                        workloads = res.workloads.len(),
                        "waypoint configuration applied"
                    );
                    tx.send_replace(Arc::new(snap));
                }
                Err(e) => tracing::warn!(
                    waypoint = %publish_name, error = %e,
                    "waypoint configuration unusable; keeping the previous one"
                ),
            }
        }),
    };
    let client = crate::xds::XdsClient::for_waypoint(target.clone(), creds, node, sub);
    spawn_xds_thread(client, ready, shutdown)?;
    tracing::info!(address = %target.address, waypoint = %cfg.resource_name(), "xDS client started");
    Ok(rx)
}

/// Runs the waypoint role until `shutdown` turns true and its tunnels have drained: HBONE on `hbone`,
/// readiness (the first xDS set and the waypoint's certificate) and `GET /metrics` on the other listeners.
/// Without `XDS_ADDRESS` the waypoint serves nothing (every tunnel is refused) but still starts.
pub async fn run_waypoint(
    cfg: Arc<WaypointConfig>,
    hbone: TcpListener,
    readiness_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let metrics = Arc::new(WaypointMetrics::new());
    if let Some(l) = metrics_listener {
        let m = metrics.clone();
        tokio::spawn(crate::metrics::serve_encoded(
            l,
            move || m.encode(),
            shutdown.clone(),
        ));
    }
    let ready = Readiness::new();
    let config = match &cfg.base.xds {
        Some(target) => start_waypoint_xds(&cfg, target.clone(), &ready, shutdown.clone())?,
        None => {
            tracing::warn!(
                "XDS_ADDRESS is empty: the waypoint has no configuration and refuses every tunnel"
            );
            watch::channel(Arc::new(Snapshot::default())).1
        }
    };
    // The waypoint asks the CA for its own identity: no impersonation.
    let certs = CertManager::new(cert_source_for(&cfg.base, false)?);
    if let Some(l) = readiness_listener {
        tokio::spawn(crate::readiness::serve(l, ready.clone(), shutdown.clone()));
    }
    let task = ready.register("certificate");
    let mut stop = shutdown.clone();
    let waypoint = loop {
        let inputs = WaypointInputs {
            cfg: cfg.clone(),
            config: config.clone(),
            certs: certs.clone(),
            metrics: metrics.clone(),
        };
        match Waypoint::new(inputs, shutdown.clone()).await {
            Ok(w) => break w,
            Err(e) => tracing::warn!(error = %e, "waiting for the waypoint's certificate"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.wait_for(|v| *v) => return Ok(()),
        }
    };
    task.done();
    tracing::info!(
        identity = %waypoint.identity(),
        waypoint = %cfg.resource_name(),
        "waypoint ready"
    );
    waypoint.serve(hbone).await;
    Ok(())
}

/// The gateway's listeners: HBONE (`MESHNODE_GATEWAY_PORT`, 15008), readiness (:15021) and metrics
/// (:15020, optional), in the current network namespace.
pub fn bind_gateway(
    cfg: &GatewayConfig,
) -> Result<(TcpListener, TcpListener, Option<TcpListener>), Error> {
    bind_role(
        &cfg.base,
        cfg.ports.hbone,
        cfg.ports.readiness,
        cfg.ports.metrics,
    )
}

/// Runs the east-west gateway until `shutdown` turns true and its tunnels have drained: HBONE on
/// `hbone`, readiness (the state's first sync and the gateway's certificate) and `GET /metrics` (the
/// xDS client's families) on the other listeners. State from xDS, or from the local config file.
pub async fn run_gateway(
    cfg: Arc<GatewayConfig>,
    hbone: TcpListener,
    readiness_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let base = &cfg.base;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::metrics::serve(l, metrics.clone(), shutdown.clone()));
    }
    let ready = Readiness::new();
    let state = start_state(base, metrics.xds(), &ready, shutdown.clone())?;
    // The gateway asks the CA for its own identity: no impersonation.
    let certs = CertManager::new(cert_source_for(base, false)?);
    if let Some(l) = readiness_listener {
        tokio::spawn(crate::readiness::serve(l, ready.clone(), shutdown.clone()));
    }
    let task = ready.register("certificate");
    let mut stop = shutdown.clone();
    let gateway = loop {
        match crate::gateway::Gateway::new(cfg.clone(), state.clone(), &certs, shutdown.clone())
            .await
        {
            Ok(g) => break g,
            Err(e) => tracing::warn!(error = %e, "waiting for the gateway's certificate"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.wait_for(|v| *v) => return Ok(()),
        }
    };
    task.done();
    tracing::info!(
        identity = %gateway.identity(),
        network = %base.network,
        "east-west gateway ready"
    );
    gateway.serve(hbone).await;
    Ok(())
}
