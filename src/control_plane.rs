//! The embedded control plane (`meshnode control-plane --config FILE`): istiod's role for standalone use.
//!
//! Job: read one YAML file describing the mesh as a user sees it (namespaces with labels, pods, services,
//! policies, the Kubernetes objects users write for Istio and ambient L7, CA tokens), translate it into the
//! xDS resources istiod sends a ztunnel plus meshnode's own `meshnode.waypoint.Waypoint` for its waypoints,
//! and serve them over delta ADS with TLS; file changes are pushed as deltas. The CA service
//! (`identity::CaService`) is added to the same gRPC server by the caller (see [`server::router`]).
//!
//! Inputs: the file path (polled every [`POLL_INTERVAL`]), a bound listener, a TLS server config, a
//! shutdown future. Outputs: the current [`MeshConfig`] and [`ads::Snapshot`] through `watch` channels
//! ([`ControlPlane`]), the gRPC services.
//!
//! Layout, lower modules first (none depends on a later one): `objects` (the shapes of the Kubernetes
//! objects of the `istio:` list), `config` (the mesh file's format and its own fields), `topology` (each
//! pod's network and locality, each network's east-west gateway, the networks VIPs go on), `istio`
//! (Istio's AuthorizationPolicy and PeerAuthentication → policies and per-pod policy keys, as istiod;
//! targetRef policies in the waypoint's form), `waypoints` (waypoint Gateways, `istio.io/use-waypoint`,
//! HTTPRoute, VirtualService, DestinationRule → Address `waypoint` fields and Waypoint resources),
//! `service_entries` (ServiceEntry and WorkloadEntry → services and workloads), `validate` (the entry
//! points `MeshConfig::parse`/`load`/`validate`, running the above), `translate` (config →
//! `Address`/`Authorization`/`Waypoint`), `tokens` (who may use the CA and xDS, and what a stream may
//! see), `ads` (the delta ADS server), `server` (TLS + tonic serving, its bounds and drain), `run` (the mesh
//! CA, its serving certificate and the CA service wired onto the same server: the `meshnode control-plane`
//! command).
//!
//! Wiring, in short:
//! ```ignore
//! let cp = ControlPlane::start(path, POLL_INTERVAL)?;          // refuses a bad file
//! let router = server::router(cp.ads(AdsLimits::default()))
//!     .add_service(ca_service);                                  // the CA, from identity
//! server::serve(listener, tls_config, router, ServeLimits::default(), shutdown).await?;
//! ```

pub mod ads;
pub mod config;
pub mod istio;
pub mod objects;
pub mod run;
pub mod server;
pub mod service_entries;
#[cfg(test)]
mod tests;
pub mod tokens;
pub mod topology;
pub mod translate;
mod validate;
pub mod waypoints;

use std::path::Path;
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
        let shown = path.to_path_buf();
        let poll_file = crate::file_watch::poll(
            path.to_path_buf(),
            poll,
            bytes,
            cfg_tx,
            |bytes| MeshConfig::parse(&String::from_utf8_lossy(bytes)),
            move |cfg| log_loaded(&shown, cfg, "mesh config reloaded"),
        );
        // Snapshots are derived from the config: one new snapshot per good edit.
        let watcher = tokio::spawn({
            let cfg_rx = config.clone();
            async move {
                tokio::join!(poll_file, derive_snapshots(cfg_rx, snap_tx));
            }
        });
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
        objects = cfg.istio.len(),
        "{what}"
    );
}

/// Publishes a new snapshot (next generation) for every config the file poller publishes, until the
/// snapshots' receivers are gone.
async fn derive_snapshots(
    mut config: watch::Receiver<Arc<MeshConfig>>,
    snapshots: watch::Sender<Arc<Snapshot>>,
) {
    let mut generation = 1;
    loop {
        tokio::select! {
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = snapshots.closed() => return,
        }
        generation += 1;
        let cfg = config.borrow_and_update().clone();
        snapshots.send_replace(Arc::new(Snapshot::new(
            &translate::translate(&cfg),
            generation,
        )));
    }
}
