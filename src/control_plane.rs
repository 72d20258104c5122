//! The embedded control plane (`meshnode control-plane --config FILE`): istiod's role for standalone use.
//!
//! Job: read one YAML file describing the mesh as a user sees it (namespaces with labels, pods, services,
//! policies, CA tokens), translate it into the xDS resources istiod sends a ztunnel, and serve them over
//! delta ADS with TLS; file changes are pushed as deltas. The CA service (`identity::CaService`) is added to
//! the same gRPC server by the caller (see [`server::router`]).
//!
//! Inputs: the file path (polled every [`POLL_INTERVAL`]), a bound listener, a TLS server config, a
//! shutdown future. Outputs: the current [`MeshConfig`] and [`ads::Snapshot`] through `watch` channels
//! ([`ControlPlane`]), the gRPC services.
//!
//! Layout: `config` (the YAML format and its validation), `istio` (Istio's AuthorizationPolicy and
//! PeerAuthentication → policies and per-pod policy keys, as istiod), `translate` (config → `Address`/`Authorization`),
//! `ads` (the delta ADS server), `server` (TLS + tonic serving), `run` (the mesh CA, its serving
//! certificate and the CA service wired onto the same server: the `meshnode control-plane` command).
//!
//! Wiring, in short:
//! ```ignore
//! let cp = ControlPlane::start(path, POLL_INTERVAL)?;          // refuses a bad file
//! let router = server::router(cp.ads(AdsLimits::default()))
//!     .add_service(ca_service);                                  // the CA, from identity
//! server::serve(listener, tls_config, router, shutdown).await?;
//! ```

pub mod ads;
pub mod config;
pub mod istio;
pub mod run;
pub mod server;
#[cfg(test)]
mod tests;
pub mod translate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use self::ads::{AdsLimits, AdsServer, Snapshot};
pub use self::config::MeshConfig;
pub use self::run::{run, CaChoice, RunOptions};

/// How often the mesh file is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The listen address istiod uses for xDS and the CA (TLS).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15012";
/// Names the server certificate must carry: ztunnel dials `istiod.istio-system.svc` (or an IP with
/// `ALT_XDS_HOSTNAME`/`ALT_CA_HOSTNAME`).
pub const SERVER_NAMES: [&str; 4] = [
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "localhost",
    "127.0.0.1",
];

/// The loaded mesh and its published views. Dropping it stops the file watcher.
#[derive(Debug)]
pub struct ControlPlane {
    config: watch::Receiver<Arc<MeshConfig>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    /// Loads `path` (a bad file is an error naming the field) and starts watching it every `poll`.
    /// Must run inside a tokio runtime.
    pub fn start(path: &Path, poll: Duration) -> Result<ControlPlane, config::Error> {
        let (bytes, cfg) = MeshConfig::load(path)?;
        let snapshot = Snapshot::new(&translate::translate(&cfg), 1);
        log_loaded(path, &cfg, "mesh config loaded");
        let (cfg_tx, config) = watch::channel(Arc::new(cfg));
        let (snap_tx, snapshots) = watch::channel(Arc::new(snapshot));
        let watcher = tokio::spawn(watch_file(path.to_path_buf(), poll, bytes, cfg_tx, snap_tx));
        Ok(ControlPlane {
            config,
            snapshots,
            watcher,
        })
    }

    /// The current mesh config (tokens, pods and their nodes: what the CA needs to authorize requests).
    pub fn config(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.config.clone()
    }

    /// The current xDS snapshot.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// The ADS service over this control plane's snapshots.
    pub fn ads(&self, limits: AdsLimits) -> AdsServer {
        AdsServer::new(self.snapshots.clone(), limits)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn log_loaded(path: &Path, cfg: &MeshConfig, what: &str) {
    tracing::info!(
        path = %path.display(),
        namespaces = cfg.namespaces.len(),
        workloads = cfg.workloads.len(),
        services = cfg.services.len(),
        policies = cfg.policies.len(),
        "{what}"
    );
}

/// Re-reads `path` every `poll`; publishes a new config and snapshot when the content changed and is valid.
/// A bad edit is logged and the last good config keeps serving. Ends when both receivers are gone.
async fn watch_file(
    path: PathBuf,
    poll: Duration,
    mut last: Vec<u8>,
    cfg_tx: watch::Sender<Arc<MeshConfig>>,
    snap_tx: watch::Sender<Arc<Snapshot>>,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = 1;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { tokio::join!(cfg_tx.closed(), snap_tx.closed()) } => return,
        }
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || config::read_bounded(&path)).await
        };
        let bytes = match read {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the mesh config; keeping the last good one");
                continue;
            }
            Err(_) => continue,
        };
        if bytes == last {
            continue;
        }
        last = bytes;
        match MeshConfig::parse(&String::from_utf8_lossy(&last)) {
            Ok(cfg) => {
                generation += 1;
                let snapshot = Snapshot::new(&translate::translate(&cfg), generation);
                log_loaded(&path, &cfg, "mesh config reloaded");
                cfg_tx.send_replace(Arc::new(cfg));
                snap_tx.send_replace(Arc::new(snapshot));
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e,
                    "mesh config change refused; keeping the last good config");
            }
        }
    }
}
