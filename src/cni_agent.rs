//! The CNI node agent (`meshnode cni-agent`): istio-cni's node agent role.
//!
//! Input: plugin events on `<run_dir>/pluginevent.sock` ([`plugin_server`]), the cluster view (namespaces
//! and this node's pods, from the Kubernetes API or a local file: [`cluster`], [`local`]), and node proxies
//! connecting to the ZDS socket. Output: for each pod selected for ambient ([`selector`]) the redirection
//! rules in its network namespace ([`crate::redirect`]) and the namespace handed to the newest proxy over
//! ZDS; everything undone when the pod goes away or stops being selected. State is persisted ([`pods`]) so
//! a restarted agent restores every pod, re-programs its rules and hands it to reconnecting proxies. With
//! `MESHNODE_HANDOVER_SOCKET` set, it also holds the open connections of a node proxy that restarts with
//! no new one beside it, until the new one is ready ([`crate::upgrade::hold`]).
//!
//! One task (the [`Agent`] loop) owns all state and handles one thing at a time: a plugin request, a
//! change of the cluster view, or a retry of pods waiting for a proxy. Failing closed: if no proxy takes a
//! pod, its rules stay (traffic goes nowhere) and the ADD fails so the runtime retries.

mod agent;
pub mod cluster;
pub mod config;
pub mod install;
pub mod kube;
pub mod local;
pub mod metrics;
pub mod plugin_server;
pub mod pods;
pub mod procfs;
pub mod selector;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::redirect;

pub use self::agent::{Agent, AgentHandles};
use self::cluster::{ClusterView, PodKey};
use self::config::{AgentConfig, ClusterSource};

/// Pod annotation overriding DNS capture (`"true"`/`"false"`).
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";
/// Pod annotation: capture outbound only.
pub const BYPASS_INBOUND_ANNOTATION: &str = "ambient.istio.io/bypass-inbound-capture";
/// Pod annotation: comma-separated virtual interfaces (KubeVirt, Docker in Docker) whose incoming TCP is
/// the pod's outbound traffic.
pub const REROUTE_VIRTUAL_INTERFACES_ANNOTATION: &str = "istio.io/reroute-virtual-interfaces";
/// istio-cni's health port: `GET /readyz` (ready), `GET /healthz` (alive).
const HEALTH_PORT: u16 = 8000;

/// Why a pod could not be enrolled; the plugin turns it into a CNI error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pod's network namespace cannot be opened.
    #[error("pod {pod}: network namespace {path}: {source}")]
    Netns {
        /// The pod.
        pod: PodKey,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The rules could not be programmed (nothing was left half-done).
    #[error("pod {pod}: programming redirection rules: {source}")]
    Rules {
        /// The pod.
        pod: PodKey,
        /// Why.
        source: redirect::Error,
    },
    /// No proxy took the pod; its rules stay, so its traffic is blocked until one does.
    #[error("pod {pod}: no node proxy accepted it (traffic is blocked until one does): {source}")]
    Proxy {
        /// The pod.
        pod: PodKey,
        /// Why.
        source: crate::zds::Error,
    },
    /// A netlink step in the pod did not finish in time (the loop moved on; nothing was recorded as done).
    #[error("pod {pod}: {what} did not finish within {after:?}")]
    Timeout {
        /// The pod.
        pod: PodKey,
        /// The step.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// Too many hand-overs to proxies are queued; the pod's rules stay and it is retried.
    #[error("pod {pod}: too many pods are waiting to be handed to the node proxy; retry")]
    Busy {
        /// The pod.
        pod: PodKey,
    },
    /// The agent could not start.
    #[error("{what}: {source}")]
    Start {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The enrollment source is unusable.
    #[error(transparent)]
    Source(#[from] local::Error),
}

/// How often the plugin installation is checked.
const INSTALL_CHECK: Duration = Duration::from_secs(5);

async fn keep_installed(cfg: install::InstallConfig, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INSTALL_CHECK);
    let mut verified = Some(install::Verified::default());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let c = cfg.clone();
        let mut v = verified.take().unwrap_or_default();
        let task = tokio::task::spawn_blocking(move || (install::ensure(&c, &mut v), v)).await;
        let result = task.map(|(result, v)| {
            verified = Some(v);
            result
        });
        match result {
            Ok(Ok(Some(file))) => {
                tracing::info!(config = %file.display(), "meshnode-cni installed in the CNI chain")
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "CNI plugin installation pending"),
            Err(e) => tracing::error!(error = %e, "CNI plugin installation task failed"),
        }
    }
}

/// Runs the agent role: binds its sockets, loads the enrollment source, serves until `shutdown`.
pub async fn run(cfg: Arc<AgentConfig>, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    std::fs::create_dir_all(&cfg.run_dir).map_err(|source| Error::Start {
        what: format!("creating run directory {}", cfg.run_dir.display()),
        source,
    })?;
    let (tx, view) = watch::channel(Arc::new(ClusterView::default()));
    let mut annotator = None;
    match &cfg.source {
        ClusterSource::File(path) => {
            let (bytes, v) = local::load(path)?;
            tracing::info!(path = %path.display(), namespaces = v.namespaces.len(), pods = v.pods.len(), "agent config loaded");
            tx.send_replace(Arc::new(v));
            tokio::spawn(local::watch(
                path.clone(),
                Duration::from_secs(1),
                bytes,
                tx,
            ));
        }
        ClusterSource::Kubernetes { node_name } => {
            let source = kube::KubeSource::new(node_name.clone())
                .await
                .map_err(|e| Error::Start {
                    what: "connecting to the Kubernetes API".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            tracing::info!(node = %node_name, "watching this node's pods and all namespaces");
            annotator = Some(source.clone());
            tokio::spawn(source.run(tx));
        }
    }
    let ready = crate::readiness::Readiness::new();
    let agent_ready = ready.register("agent state");
    let (mut agent, handles, jobs) = Agent::new(cfg.clone(), view);
    if let Some(a) = annotator {
        agent.annotate_with(a);
        agent.use_host_probes(ready.register("kubelet probe SNAT"));
    }
    let zds_listener = crate::zds::packet::bind(&cfg.zds_path).map_err(|source| Error::Start {
        what: format!("binding the ZDS socket {}", cfg.zds_path.display()),
        source,
    })?;
    let plugin_listener =
        plugin_server::bind(&cfg.plugin_socket()).map_err(|source| Error::Start {
            what: format!(
                "binding the plugin socket {}",
                cfg.plugin_socket().display()
            ),
            source,
        })?;
    match crate::socket::listen(
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, HEALTH_PORT)),
        crate::socket::SocketOpts::default(),
    ) {
        Ok(l) => {
            tokio::spawn(crate::readiness::serve(l, ready, shutdown.clone()));
        }
        Err(e) => {
            tracing::warn!(port = HEALTH_PORT, error = %e, "health port unavailable; serving without it")
        }
    }
    match crate::socket::listen(
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, cfg.monitoring_port)),
        crate::socket::SocketOpts::default(),
    ) {
        Ok(l) => {
            tokio::spawn(metrics::serve(l, handles.metrics.clone(), shutdown.clone()));
        }
        Err(e) => {
            tracing::warn!(port = cfg.monitoring_port, error = %e, "metrics port unavailable; serving without it")
        }
    }
    if let Some(handover) = cfg.handover_socket.clone() {
        let hold = crate::upgrade::hold::path_beside(&handover);
        let (keep, stop) = (cfg.hold_for, shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::upgrade::hold::serve(hold.clone(), handover, keep, stop).await {
                tracing::warn!(hold = %hold.display(), error = %e, "a restarting proxy's connections cannot be held: they drain");
            }
        });
    }
    let zds = handles.zds.clone();
    let zds_shutdown = shutdown.clone();
    tokio::spawn(async move { zds.serve(zds_listener, zds_shutdown).await });
    tokio::spawn(plugin_server::serve(
        plugin_listener,
        handles.jobs,
        shutdown.clone(),
    ));
    tracing::info!(plugin = %cfg.plugin_socket().display(), zds = %cfg.zds_path.display(), "CNI agent serving");
    if let Some(install) = cfg.install.clone() {
        // Only now that the agent answers does the plugin go into the chain (istio-cni's order), and it is
        // re-checked periodically because primary CNIs rewrite their config.
        tokio::spawn(keep_installed(install, shutdown.clone()));
    }
    agent.run(jobs, agent_ready, shutdown).await;
    Ok(())
}
