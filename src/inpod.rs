//! In-pod (shared) mode: one node proxy serving every enrolled pod, inside each pod's network namespace.
//!
//! Input: ZDS requests from the CNI agent on `INPOD_UDS` (pod uid, workload identity, netns fd), plus the
//! shared state, certificates and config. Output: for each pod, a [`Proxy`] whose three listeners
//! (15001/15006/15008) are bound inside the pod's namespace with `SO_REUSEPORT` (so a new proxy can take
//! over while this one drains) and whose sockets towards peers and the application are created there too.
//!
//! The ZDS connection is a supervisor, not a dependency: when the agent goes away, pods keep being served
//! and the proxy reconnects (backoff 10 ms doubling to 15 s, as ztunnel). On each connection the agent's
//! snapshot is reconciled: pods not named in it are drained once `SnapshotSent` arrives. A pod whose proxy
//! cannot start (a port taken) is NACKed and retried every 5 s. Readiness waits for the first snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, WorkloadInfo};
use crate::identity::CertManager;
use crate::netns::{InpodNetns, Netns, NetnsId};
use crate::proxy::{Listeners, Proxy, ProxyInputs};
use crate::readiness::Readiness;
use crate::socket::{self, SocketOpts};
use crate::state::StateHandle;
use crate::zds::client::{Request, ZdsClient};

/// First reconnect delay after the agent's socket goes away.
const RECONNECT_MIN: Duration = Duration::from_millis(10);
/// Longest reconnect delay (ztunnel: 15 s).
const RECONNECT_MAX: Duration = Duration::from_secs(15);
/// A session with the agent that lasted this long resets the reconnect backoff.
const SESSION_HEALTHY: Duration = Duration::from_secs(5);
/// How often pods whose proxy failed to start are retried (ztunnel: 5 s).
const RETRY_PENDING: Duration = Duration::from_secs(5);

/// Why a pod's proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be bound in the pod.
    #[error("pod {uid}: binding :{port} in {netns}: {source}")]
    Bind {
        /// Pod uid.
        uid: String,
        /// The port.
        port: u16,
        /// The namespace.
        netns: NetnsId,
        /// Why.
        source: std::io::Error,
    },
    /// The workload info from the agent is incomplete.
    #[error("pod {uid}: workload info needs a namespace, a name and a service account")]
    IncompleteInfo {
        /// Pod uid.
        uid: String,
    },
}

/// Everything the per-pod proxies share.
pub struct InpodInputs {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Mesh state.
    pub state: StateHandle,
    /// Certificates (one manager for every pod: identities are fetched once per service account).
    pub certs: Arc<CertManager>,
    /// Keep client addresses towards applications.
    pub orig_src: bool,
    /// The process's metrics registry, shared by every pod's proxy.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Its in-pod workload manager families (pods served, pending, started, stopped).
    pub workload_manager: crate::metrics::WorkloadManagerMetrics,
    /// Where the pods handed over are published for the admin port (`/config_dump`'s `workloadState`).
    pub pods: PodStates,
    /// The process's resolver: the DNS proxy every pod gets on its loopback (:15053) when `dns_serve`, and
    /// hostname lookups for routing.
    pub dns: Arc<crate::dns::Resolver>,
    /// Serve DNS in every pod (`ISTIO_META_DNS_CAPTURE`).
    pub dns_serve: bool,
    /// The process's hand-over to the process replacing it, if configured.
    pub handover: Option<Arc<crate::proxy::handover::Handover>>,
}

/// The pods handed over by the CNI agent, by pod uid, as the admin port shows them. Cheap to clone; written
/// only when a pod is added, started or removed; a snapshot reads each serving pod's open connections.
#[derive(Clone, Default)]
pub struct PodStates(Arc<parking_lot::Mutex<BTreeMap<String, PodEntry>>>);

/// A pod's workload, and its proxy once serving.
type PodEntry = (WorkloadInfo, Option<Arc<Proxy>>);

/// One pod handed over: its workload and whether its proxy runs (`Up`) or waits to start (`Pending`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    /// The pod's workload.
    pub info: WorkloadInfo,
    /// A serving pod's open connections, at the time of the snapshot; `None` while it is pending (its
    /// listeners could not be bound yet).
    pub connections: Option<PodConnections>,
}

impl PodState {
    /// Its proxy is serving.
    pub fn up(&self) -> bool {
        self.connections.is_some()
    }
}

/// A pod's open connections (`istioctl ztunnel-config connections`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodConnections {
    /// Accepted for the pod (HBONE on :15008, plaintext on :15006).
    pub inbound: Vec<crate::proxy::connections::Listed>,
    /// Opened by the pod (captured on :15001).
    pub outbound: Vec<crate::proxy::connections::Listed>,
}

impl PodStates {
    /// The proxy serving the pod `uid`, if it serves.
    pub fn proxy(&self, uid: &str) -> Option<Arc<Proxy>> {
        self.0.lock().get(uid).and_then(|(_, p)| p.clone())
    }

    /// The pods now, sorted by uid, each serving one with its open connections.
    pub fn snapshot(&self) -> BTreeMap<String, PodState> {
        let pods = self.0.lock().clone();
        pods.into_iter()
            .map(|(uid, (info, proxy))| {
                let connections = proxy.as_ref().map(|p| {
                    let (inbound, outbound) = p.listed_connections();
                    PodConnections { inbound, outbound }
                });
                let state = PodState { info, connections };
                (uid, state)
            })
            .collect()
    }
}

/// A running pod proxy.
struct PodProxy {
    netns: NetnsId,
    info: WorkloadInfo,
    proxy: Arc<Proxy>,
    drain: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A pod the agent handed over whose proxy has not started yet.
struct Pending {
    info: WorkloadInfo,
    netns: Netns,
}

/// The set of pods this proxy serves.
struct Pods {
    inputs: InpodInputs,
    home: Arc<Netns>,
    running: HashMap<String, PodProxy>,
    pending: HashMap<String, Pending>,
}

/// Runs in-pod mode until `shutdown` turns true, then drains every pod's proxy.
pub async fn run(inputs: InpodInputs, ready: Arc<Readiness>, mut shutdown: watch::Receiver<bool>) {
    let home = match Netns::current() {
        Ok(ns) => Arc::new(ns),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the proxy's own network namespace; in-pod mode cannot run");
            return;
        }
    };
    let uds = inputs.cfg.inpod_uds.clone();
    let mut pods = Pods {
        inputs,
        home,
        running: HashMap::new(),
        pending: HashMap::new(),
    };
    let mut snapshot_task = Some(ready.register("inpod snapshot"));
    let mut delay = RECONNECT_MIN;
    loop {
        let connected = tokio::select! {
            c = ZdsClient::connect(&uds) => c,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let client = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(path = %uds.display(), error = %e, "CNI agent not reachable yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        tracing::info!(path = %uds.display(), "connected to the CNI agent");
        let started = tokio::time::Instant::now();
        let ended = tokio::select! {
            e = pods.session(client, &mut snapshot_task) => e,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        // A session that lasted resets the backoff; one the agent ends at once (crash-looping, refusing
        // us) backs off like a refused connect, so the proxy never spins on the socket.
        if started.elapsed() >= SESSION_HEALTHY {
            delay = RECONNECT_MIN;
        }
        tracing::warn!(reason = %ended, retry_in = ?delay, "CNI agent connection ended; pods keep being served, reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
    pods.drain_all().await;
}

impl Pods {
    /// One connection to the agent: hello was sent by `connect`; handle requests until it fails. Returns
    /// why it ended.
    async fn session(
        &mut self,
        mut client: ZdsClient,
        snapshot_task: &mut Option<crate::readiness::Task>,
    ) -> String {
        let mut seen: Option<HashSet<String>> = Some(HashSet::new());
        let mut retry = tokio::time::interval(RETRY_PENDING);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let req = tokio::select! {
                r = client.recv() => r,
                _ = retry.tick() => {
                    self.retry_pending();
                    continue;
                }
            };
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    let reason = e.to_string();
                    // Tell the agent why before going (it logs the NACK); the socket may already be gone.
                    let _ = client.ack(Some(&reason)).await;
                    return reason;
                }
            };
            let answer: Result<(), String> = match req {
                Request::Add { uid, info, netns } => {
                    if let Some(s) = seen.as_mut() {
                        s.insert(uid.clone());
                    }
                    let info = WorkloadInfo {
                        namespace: info.namespace,
                        name: info.name,
                        service_account: info.service_account,
                    };
                    self.add(uid, info, netns).map_err(|e| e.to_string())
                }
                Request::Keep { uid } => {
                    if let Some(s) = seen.as_mut() {
                        s.insert(uid);
                    }
                    Ok(())
                }
                Request::Del { uid } => {
                    if let Some(s) = seen.as_mut() {
                        s.remove(&uid);
                    }
                    self.del(&uid);
                    Ok(())
                }
                Request::SnapshotSent => {
                    let keep = seen.take().unwrap_or_default();
                    self.reconcile(&keep);
                    if let Some(t) = snapshot_task.take() {
                        tracing::info!(
                            pods = self.running.len(),
                            "snapshot from the CNI agent processed; ready"
                        );
                        t.done();
                    }
                    Ok(())
                }
            };
            if let Err(e) = &answer {
                tracing::warn!(error = %e, "NACK to the CNI agent");
            }
            if let Err(e) = client.ack(answer.err().as_deref()).await {
                return format!("sending ack: {e}");
            }
        }
    }

    /// Starts (or keeps) the proxy for pod `uid`. The same uid with the same namespace is a no-op; with a
    /// different namespace (the pod sandbox was recreated) the old proxy drains and a new one starts.
    fn add(&mut self, uid: String, info: WorkloadInfo, netns: Netns) -> Result<(), Error> {
        if info.namespace.is_empty() || info.name.is_empty() || info.service_account.is_empty() {
            return Err(Error::IncompleteInfo { uid });
        }
        if let Some(p) = self.running.get(&uid) {
            if p.netns == netns.id() && p.info == info {
                return Ok(());
            }
            tracing::info!(uid, old = %p.netns, new = %netns.id(), "pod namespace changed; replacing its proxy");
            self.del(&uid);
        }
        self.pending.remove(&uid);
        match self.start(&uid, &info, &netns) {
            Ok(p) => {
                tracing::info!(uid, workload = ?info, netns = %netns.id(), "pod enrolled: proxy listening in its namespace");
                self.running.insert(uid, p);
                self.inputs.workload_manager.started.inc();
                self.count();
                Ok(())
            }
            Err(e) => {
                self.pending.insert(uid, Pending { info, netns });
                self.count();
                Err(e)
            }
        }
    }

    /// Publishes how many pods are served and pending, and which (for the admin port).
    fn count(&self) {
        let w = &self.inputs.workload_manager;
        w.active.set(self.running.len() as i64);
        w.pending.set(self.pending.len() as i64);
        let running = self
            .running
            .iter()
            .map(|(uid, p)| (uid, &p.info, Some(p.proxy.clone())));
        let pending = self.pending.iter().map(|(uid, p)| (uid, &p.info, None));
        *self.inputs.pods.0.lock() = running
            .chain(pending)
            .map(|(uid, info, proxy)| (uid.clone(), (info.clone(), proxy)))
            .collect();
    }

    fn start(&self, uid: &str, info: &WorkloadInfo, netns: &Netns) -> Result<PodProxy, Error> {
        let cfg = &self.inputs.cfg;
        let inpod = Arc::new(InpodNetns::new(
            netns.try_clone().map_err(|source| Error::Bind {
                uid: uid.to_string(),
                port: 0,
                netns: netns.id(),
                source,
            })?,
            self.home.clone(),
        ));
        let opts = SocketOpts {
            mark: cfg.packet_mark,
            transparent: false,
            reuse_port: cfg.inpod_port_reuse,
        };
        let bind = |port: u16| {
            socket::listen_in(Some(&inpod), cfg.wildcard(port), opts).map_err(|source| {
                Error::Bind {
                    uid: uid.to_string(),
                    port,
                    netns: netns.id(),
                    source,
                }
            })
        };
        let listeners = Listeners {
            outbound: bind(cfg.ports.outbound)?,
            inbound: bind(cfg.ports.inbound)?,
            inbound_plaintext: bind(cfg.ports.inbound_plaintext)?,
        };
        // Bound before anything starts, like the listeners: a pod whose capture may send DNS here is
        // served whole or not at all (then retried).
        let dns = match self.inputs.dns_serve.then_some(&self.inputs.dns) {
            Some(resolver) => {
                let sockets = crate::dns::Sockets::bind(
                    cfg.dns.bind,
                    cfg.ipv6_enabled,
                    Some(&inpod),
                    cfg.inpod_port_reuse,
                )
                .map_err(|source| Error::Bind {
                    uid: uid.to_string(),
                    port: match cfg.dns.bind {
                        crate::config::DnsBind::Localhost(p) => p,
                        crate::config::DnsBind::Addr(a) => a.port(),
                    },
                    netns: netns.id(),
                    source,
                })?;
                let pod = crate::dns::PodDns {
                    resolver: resolver.clone(),
                    workload: info.clone(),
                    netns: Some(inpod.clone()),
                };
                Some((pod, sockets))
            }
            None => None,
        };
        let (drain, drained) = watch::channel(false);
        if let Some((pod, sockets)) = dns {
            tokio::spawn(crate::dns::serve(pod, sockets, drained.clone()));
        }
        let proxy = Proxy::new(
            ProxyInputs {
                cfg: cfg.clone(),
                state: self.inputs.state.clone(),
                certs: self.inputs.certs.clone(),
                workload: info.clone(),
                sock: SocketOpts {
                    mark: cfg.packet_mark,
                    transparent: false,
                    reuse_port: false,
                },
                orig_src: self.inputs.orig_src,
                netns: Some(inpod),
                // Per-pod proxies must share the process registry (InpodInputs gets it; issue 5 wiring).
                metrics: self.inputs.metrics.clone(),
                resolver: Some(self.inputs.dns.clone()),
                handover: self.inputs.handover.clone().map(|handover| {
                    crate::proxy::handover::Slot {
                        handover,
                        pod: uid.to_string(),
                    }
                }),
            },
            drained,
        );
        // Fetch the pod's certificate ahead, so its first connection does not wait for the CA.
        let warm = proxy.clone();
        tokio::spawn(async move {
            if let Ok(w) = warm.local_workload().await {
                if let Err(e) = warm.tls_for(&w.identity).await {
                    tracing::warn!(error = %e, "prefetching the pod's certificate failed; retried on first use");
                }
            }
        });
        let serving = proxy.clone();
        let task = tokio::spawn(async move { serving.serve(listeners).await });
        Ok(PodProxy {
            netns: netns.id(),
            info: info.clone(),
            proxy,
            drain,
            task,
        })
    }

    /// Drains pod `uid`'s proxy (its listeners close at once; open connections get the termination
    /// deadline). Unknown uids are fine: a delete is idempotent.
    fn del(&mut self, uid: &str) {
        self.pending.remove(uid);
        if let Some(p) = self.running.remove(uid) {
            tracing::info!(uid, workload = ?p.info, "pod removed: draining its proxy");
            let _ = p.drain.send(true);
            self.inputs.workload_manager.stopped.inc();
        }
        self.count();
    }

    /// After a snapshot: drain every pod the agent did not name.
    fn reconcile(&mut self, keep: &HashSet<String>) {
        let stale: Vec<String> = self
            .running
            .keys()
            .chain(self.pending.keys())
            .filter(|uid| !keep.contains(*uid))
            .cloned()
            .collect();
        for uid in stale {
            tracing::info!(uid, "pod not in the CNI agent's snapshot");
            self.del(&uid);
        }
    }

    fn retry_pending(&mut self) {
        let uids: Vec<String> = self.pending.keys().cloned().collect();
        for uid in uids {
            if let Some(p) = self.pending.remove(&uid) {
                if let Err(e) = self.add(uid, p.info, p.netns) {
                    tracing::warn!(error = %e, "retrying pod proxy start failed");
                }
            }
        }
    }

    async fn drain_all(&mut self) {
        let running: Vec<PodProxy> = self.running.drain().map(|(_, p)| p).collect();
        for p in &running {
            let _ = p.drain.send(true);
        }
        for p in running {
            let _ = p.task.await;
        }
    }
}
