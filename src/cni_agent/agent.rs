//! The agent loop: the single owner of pod state, turning plugin requests and cluster-view changes into
//! rules in pods and ZDS hand-overs.
//!
//! Input: [`PluginRequest`]s with a channel for their [`Answer`], the cluster view, a 1 s tick.
//! Output: pods enrolled (rules programmed through [`crate::redirect`] in their netns, handed to the
//! newest proxy over ZDS), released, persisted ([`super::pods`]), annotated (Kubernetes), and the plugin's
//! fail-closed hint file kept current.
//!
//! Never failing open:
//! - A pod that was captured keeps its rules when a re-install fails (the install is one atomic
//!   nftables batch, so the old rules are still whole); it is retried with backoff.
//! - Every tick a few captured pods have their rules read back and compared with what they should be;
//!   drift is repaired and counted ([`super::metrics`]).
//! - Each pod's settings (its annotations) are kept in its record, so a restart re-programs it as it was
//!   before the cluster view has synced, and annotation edits on running pods are applied.
//! - A pod's netns is held open while it is captured, and every open by path is checked against the
//!   namespace identity recorded at the first open: a reused `/proc/<pid>` never hands out another
//!   pod's or the host's namespace.
//!
//! Bounded steps: netlink work runs on a thread in the pod's netns under [`NETLINK_TIMEOUT`]; ZDS hand-overs
//! run in order on a worker task ([`zds_worker`]) so a slow proxy never stalls the loop, and the ADD that
//! waits for one is answered when the proxy acknowledges.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::netns::Netns;
use crate::proto::workload::zds::WorkloadInfo as ZdsWorkloadInfo;
use crate::redirect::{self, branch_eni, RuleSettings};
use crate::zds::server::{SnapshotEntry, SnapshotSource, ZdsServer};

use super::cluster::{self, ClusterView, PodInfo, PodKey};
use super::config::parse_bool;
use super::config::{AgentConfig, ClusterSource};
use super::metrics::AgentMetrics;
use super::plugin_server::{self, Answer, PluginEvent, PluginRequest};
use super::pods::{Enrollment, NetnsKey, PodRecord, PodSettings, Pods};
use super::selector::Decision;
use super::{
    kube, procfs, Error, BYPASS_INBOUND_ANNOTATION, DNS_CAPTURE_ANNOTATION,
    REROUTE_VIRTUAL_INTERFACES_ANNOTATION,
};

#[cfg(test)]
mod tests;

/// How often pods waiting for a proxy are offered again, and captured pods' rules are checked.
const TICK: Duration = Duration::from_secs(1);
/// Most captured pods whose rules are read back per tick (those checked longest ago first), so a node
/// full of pods spreads the checks out instead of holding up plugin requests.
const RULE_CHECKS_PER_TICK: usize = 4;
/// Longest wait for one netlink step in a pod (install, remove, inspect); the loop moves on after it.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest delay between attempts to re-install a captured pod's rules.
const REPAIR_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// How long the plugin may trust the hint file after the agent last wrote it, and how often it is renewed.
const HINT_VALIDITY: Duration = Duration::from_secs(60);
const HINT_RENEW: Duration = Duration::from_secs(20);
/// Plugin requests queued for the agent loop; more wait in the plugin server (which is bounded too).
const JOB_QUEUE: usize = 64;
/// ZDS hand-overs queued for the worker.
const ZDS_QUEUE: usize = 1024;
/// Annotation patches waiting for the API server.
const ANNOTATION_QUEUE: usize = 1024;

/// The pods the ZDS server sends in its snapshot to each newly connected proxy: every captured pod, with
/// the netns handle the agent holds (never re-opened by path).
#[derive(Default)]
struct Captured {
    pods: Mutex<std::collections::BTreeMap<String, (ZdsWorkloadInfo, Arc<Netns>)>>,
}

impl SnapshotSource for Captured {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        let pods = self.pods.lock();
        pods.iter()
            .filter_map(|(uid, (info, ns))| match ns.try_clone() {
                Ok(ns) => Some(SnapshotEntry {
                    uid: uid.clone(),
                    info: info.clone(),
                    netns: Some(ns),
                }),
                Err(e) => {
                    tracing::error!(uid, error = %e, "duplicating a pod's netns handle failed; left out of this snapshot");
                    None
                }
            })
            .collect()
    }
}

/// One hand-over for the ZDS worker, in the order the loop decided them.
enum ZdsOp {
    Add {
        uid: String,
        gen: u64,
        info: ZdsWorkloadInfo,
        netns: Netns,
    },
    Del {
        uid: String,
    },
}

/// A finished `Add`, reported back to the loop.
struct ZdsDone {
    uid: String,
    gen: u64,
    result: Result<(), crate::zds::Error>,
}

/// Hands pods to proxies one at a time, in order (an add followed by a del of the same pod reaches the
/// proxies in that order), reporting each add's outcome to the loop.
async fn zds_worker(zds: ZdsServer, mut ops: mpsc::Receiver<ZdsOp>, done: mpsc::Sender<ZdsDone>) {
    while let Some(op) = ops.recv().await {
        match op {
            ZdsOp::Add {
                uid,
                gen,
                info,
                netns,
            } => {
                let result = zds.add(&uid, &info, &netns).await;
                if done.send(ZdsDone { uid, gen, result }).await.is_err() {
                    return;
                }
            }
            ZdsOp::Del { uid } => {
                if let Err(e) = zds.del(&uid).await {
                    tracing::warn!(uid, error = %e, "telling proxies to drop the pod failed");
                }
            }
        }
    }
}

/// A hand-over in flight: its generation and the ADDs waiting for its outcome.
struct InFlight {
    gen: u64,
    waiters: Vec<oneshot::Sender<Answer>>,
}

/// Re-install attempts of a captured pod whose rules could not be programmed.
struct Repair {
    next: Instant,
    delay: Duration,
}

/// The agent's state and loop.
pub struct Agent {
    cfg: Arc<AgentConfig>,
    zds: ZdsServer,
    captured: Arc<Captured>,
    pods: Pods,
    view: watch::Receiver<Arc<ClusterView>>,
    kubernetes: bool,
    last_hint: Option<(Vec<String>, Instant)>,
    annotations: Option<mpsc::Sender<(PodKey, Option<&'static str>)>>,
    /// Kubernetes mode: the node's netns, where kubelet probes to enrolled pods are SNATed.
    host: Option<HostProbes>,
    metrics: Arc<AgentMetrics>,
    zds_ops: mpsc::Sender<ZdsOp>,
    zds_done: Option<mpsc::Receiver<ZdsDone>>,
    zds_worker: Option<(mpsc::Receiver<ZdsOp>, mpsc::Sender<ZdsDone>)>,
    in_flight: HashMap<String, InFlight>,
    next_gen: u64,
    repairs: HashMap<String, Repair>,
    /// When each captured pod's rules were last read back.
    checked: HashMap<String, Instant>,
}

/// The host-side probe rule: where it lives, whether it is installed, and, until it is, the readiness
/// task it holds back and when it is tried again.
struct HostProbes {
    /// The node's netns; `None` when it could not be opened (the agent then never becomes ready).
    netns: Option<Arc<Netns>>,
    settings: Option<redirect::HostProbeSettings>,
    /// Held (the agent is not ready) until the rule is installed.
    pending: Option<crate::readiness::Task>,
    /// Failed attempts so far.
    attempts: u32,
    next_try: Instant,
    /// Add AWS branch-ENI probe rules (configured on, and the node is set up for security groups for
    /// pods: `net.ipv4.tcp_early_demux=0`).
    branch_eni: bool,
}

/// Attempts at installing the kubelet probe SNAT, [`HOST_PROBE_RETRY`] apart, before the agent says
/// loudly that it will not become ready (istio-cni: 10 tries 2 s apart, then it exits); after them it
/// keeps trying every [`HOST_PROBE_SLOW_RETRY`], so a kubelet that starts late still gets its probes.
const HOST_PROBE_TRIES: u32 = 10;
const HOST_PROBE_RETRY: Duration = Duration::from_secs(2);
const HOST_PROBE_SLOW_RETRY: Duration = Duration::from_secs(30);

/// Handles given to the agent's servers.
pub struct AgentHandles {
    /// Where the plugin server sends requests.
    pub jobs: mpsc::Sender<plugin_server::Job>,
    /// The ZDS server (shared with the agent).
    pub zds: ZdsServer,
    /// The agent's counters, for its metrics port.
    pub metrics: Arc<AgentMetrics>,
}

impl Agent {
    /// An agent over `view`, restoring the pods recorded in the run directory.
    pub fn new(
        cfg: Arc<AgentConfig>,
        view: watch::Receiver<Arc<ClusterView>>,
    ) -> (Agent, AgentHandles, mpsc::Receiver<plugin_server::Job>) {
        Agent::with_zds_queue(cfg, view, ZDS_QUEUE)
    }

    /// [`Agent::new`] with `zds_queue` hand-overs queued for the ZDS worker (tests fill a short one).
    fn with_zds_queue(
        cfg: Arc<AgentConfig>,
        view: watch::Receiver<Arc<ClusterView>>,
        zds_queue: usize,
    ) -> (Agent, AgentHandles, mpsc::Receiver<plugin_server::Job>) {
        let captured = Arc::new(Captured::default());
        let zds = ZdsServer::new(captured.clone());
        let (pods, problem) = Pods::load(cfg.state_file());
        if let Some(p) = problem {
            tracing::error!(problem = %p, "starting with no recorded pods");
        }
        let (jobs, rx) = mpsc::channel(JOB_QUEUE);
        let (ops_tx, ops_rx) = mpsc::channel(zds_queue);
        let (done_tx, done_rx) = mpsc::channel(ZDS_QUEUE);
        let kubernetes = matches!(cfg.source, ClusterSource::Kubernetes { .. });
        let metrics = Arc::new(AgentMetrics::default());
        let mut agent = Agent {
            cfg,
            zds: zds.clone(),
            captured,
            pods,
            view,
            kubernetes,
            last_hint: None,
            annotations: None,
            host: None,
            metrics: metrics.clone(),
            zds_ops: ops_tx,
            zds_done: Some(done_rx),
            zds_worker: Some((ops_rx, done_tx)),
            in_flight: HashMap::new(),
            next_gen: 0,
            repairs: HashMap::new(),
            checked: HashMap::new(),
        };
        agent.restore();
        (agent, AgentHandles { jobs, zds, metrics }, rx)
    }

    /// Keeps pods' `ambient.istio.io/redirection` annotation current through `source` (Kubernetes mode).
    /// Patches go through a bounded queue to one worker, in order, off the enrollment path.
    pub fn annotate_with(&mut self, source: kube::KubeSource) {
        let (tx, mut rx) = mpsc::channel::<(PodKey, Option<&'static str>)>(ANNOTATION_QUEUE);
        tokio::spawn(async move {
            while let Some((pod, value)) = rx.recv().await {
                // A few quick retries; beyond that the reconcile loop notices the annotation still differs
                // from the pod's state and queues it again.
                let mut delay = Duration::from_millis(100);
                for attempt in 1..=3 {
                    match source
                        .set_redirection(&pod.namespace, &pod.name, value)
                        .await
                    {
                        Ok(()) => break,
                        Err(e) if attempt == 3 => {
                            tracing::warn!(pod = %pod, error = %e, "updating the redirection annotation failed")
                        }
                        Err(_) => {
                            tokio::time::sleep(delay).await;
                            delay *= 4;
                        }
                    }
                }
            }
        });
        self.annotations = Some(tx);
    }

    /// Kubernetes mode: SNATs kubelet's probes to enrolled pods to the probe address in the node's netns,
    /// so the pods' rules let them past the proxy (else STRICT mTLS would refuse every probe). The node's
    /// netns is `<host prefix>/proc/1/ns/net`, or the agent's own when it runs in the host network.
    /// `pending` keeps the agent not ready until the rule is installed: without it, every enrolled pod's
    /// kubelet probes would fail, and the agent says so instead of running half-working.
    pub fn use_host_probes(&mut self, pending: crate::readiness::Task) {
        let path = if self.cfg.host_prefix.as_os_str().is_empty() {
            PathBuf::from("/proc/thread-self/ns/net")
        } else {
            self.netns_path("/proc/1/ns/net")
        };
        let netns = match Netns::open(&path) {
            Ok(ns) => Some(Arc::new(ns)),
            Err(e) => {
                let why = format!("node netns {} unavailable: {e}", path.display());
                tracing::error!(
                    error = %why,
                    "kubelet probes of enrolled pods cannot be SNATed; the agent will not become ready"
                );
                pending.waiting_for(why);
                None
            }
        };
        let demux = self
            .netns_path("/proc")
            .join("sys/net/ipv4/tcp_early_demux");
        let branch_eni = self.cfg.aws_branch_eni && branch_eni::early_demux_disabled(&demux);
        if branch_eni {
            tracing::info!("net.ipv4.tcp_early_demux=0: adding AWS branch-ENI probe rules for pods that need them");
        }
        self.host = Some(HostProbes {
            netns,
            settings: None,
            pending: Some(pending),
            attempts: 0,
            next_try: Instant::now(),
            branch_eni,
        });
    }

    /// Installs the host probe rule with every captured pod's IPs (idempotent; re-run at start), when
    /// it is not installed yet and its next try is due. Each failure is counted; after
    /// [`HOST_PROBE_TRIES`] the readiness answer and an error log say why the agent is not ready.
    async fn install_host_probes(&mut self) {
        let Some(host) = &self.host else { return };
        let Some(netns) = host.netns.clone() else {
            return;
        };
        if host.settings.is_some() || host.next_try > Instant::now() {
            return;
        }
        let eni_on = host.branch_eni;
        let proc_root = self.netns_path("/proc");
        let result = match procfs::find_kubelet_uid(&proc_root) {
            None => Err(format!(
                "no kubelet process (kubelet, kubelite, k3s) found under {}",
                proc_root.display()
            )),
            Some(uid) => {
                let settings = redirect::HostProbeSettings::for_pods(uid, &self.cfg.rules);
                let entries: Vec<(std::net::IpAddr, String)> = self
                    .pods
                    .iter()
                    .filter(|r| r.state.captured())
                    .flat_map(|r| r.ips.iter().map(|ip| (*ip, r.uid.clone())))
                    .collect();
                let s = settings.clone();
                let res = tokio::task::spawn_blocking(move || {
                    netns.run_on_thread(move || {
                        let pairs: Vec<(std::net::IpAddr, &str)> = entries
                            .iter()
                            .map(|(ip, uid)| (*ip, uid.as_str()))
                            .collect();
                        redirect::install_host(&s, &pairs)?;
                        let mut enis: HashMap<String, Vec<BranchEniRule>> = HashMap::new();
                        if eni_on {
                            for (ip, uid) in &entries {
                                enis.entry(uid.clone())
                                    .or_default()
                                    .extend(add_branch_eni(&[*ip]));
                            }
                        }
                        Ok::<_, redirect::Error>(enis)
                    })
                })
                .await;
                match res {
                    Ok(Ok(Ok(enis))) => {
                        for (uid, rules) in enis {
                            self.record_branch_eni(&uid, rules);
                        }
                        Ok((uid, settings))
                    }
                    Ok(Ok(Err(e))) => Err(format!("programming the node's SNAT rule: {e}")),
                    Ok(Err(e)) => Err(format!("entering the node netns: {e}")),
                    Err(e) => Err(format!("installing the node's SNAT rule: {e}")),
                }
            }
        };
        let Some(host) = &mut self.host else { return };
        match result {
            Ok((uid, settings)) => {
                tracing::info!(
                    kubelet_uid = uid,
                    "kubelet probe SNAT installed in the node netns"
                );
                host.settings = Some(settings);
                host.pending.take();
            }
            Err(why) => {
                host.attempts += 1;
                let retry = if host.attempts < HOST_PROBE_TRIES {
                    tracing::warn!(attempt = host.attempts, error = %why, "kubelet probe SNAT not installed yet; retrying");
                    HOST_PROBE_RETRY
                } else {
                    if host.attempts == HOST_PROBE_TRIES {
                        tracing::error!(
                            attempts = host.attempts,
                            error = %why,
                            "kubelet probe SNAT could not be installed; the agent stays NOT READY, since \
                             kubelet probes of enrolled pods would reach the proxy and be refused under STRICT \
                             mTLS; still retrying every 30 s"
                        );
                    }
                    HOST_PROBE_SLOW_RETRY
                };
                if let Some(task) = &host.pending {
                    task.waiting_for(format!(
                        "kubelet probe SNAT not installed after {} attempts: {why}",
                        host.attempts
                    ));
                }
                host.next_try = Instant::now() + retry;
            }
        }
    }

    /// Puts a pod's IPs in the host's probe sets as belonging to it (`add`), or takes out those it still
    /// owns; with them, the pod's AWS branch-ENI probe rules (added where [`branch_eni::detect`] finds
    /// them needed and recorded with the pod; removed from the record).
    async fn probe_ips(&mut self, r: &PodRecord, add: bool) {
        let Some(HostProbes {
            netns: Some(ns),
            settings: Some(_),
            branch_eni: eni_on,
            ..
        }) = &self.host
        else {
            return;
        };
        if r.ips.is_empty() {
            return;
        }
        let (ns, ips, uid, eni_on) = (ns.clone(), r.ips.clone(), r.uid.clone(), *eni_on);
        let recorded = r.branch_eni.clone();
        let res = tokio::task::spawn_blocking(move || {
            ns.run_on_thread(move || {
                if add {
                    redirect::add_probe_ips(&uid, &ips)?;
                    let enis = if eni_on {
                        add_branch_eni(&ips)
                    } else {
                        Vec::new()
                    };
                    Ok((Vec::new(), enis))
                } else {
                    let kept = redirect::remove_probe_ips(&uid, &ips)?;
                    for (ip, eni) in &recorded {
                        // An IP another pod owns now keeps its rules (that pod needs the same ones).
                        if kept.iter().any(|(k, _)| k == ip) {
                            continue;
                        }
                        if let Err(e) = branch_eni::remove(*ip, eni) {
                            tracing::warn!(%ip, error = %e, "removing AWS branch-ENI probe rules failed");
                        }
                    }
                    Ok::<_, redirect::Error>((kept, Vec::new()))
                }
            })
        })
        .await;
        match res {
            Ok(Ok(Ok((kept, enis)))) => {
                for (ip, owner) in kept {
                    tracing::info!(pod = %key(r), uid = r.uid, %ip, owner, "probe set entry now belongs to another pod; left in place");
                }
                if add || !r.branch_eni.is_empty() {
                    self.record_branch_eni(&r.uid, enis);
                }
            }
            other => {
                tracing::warn!(add, pod = %key(r), result = ?other.map(|r| r.map(|r| r.err())), "updating the kubelet probe set failed")
            }
        }
    }

    /// Keeps `rules` as the pod's branch-ENI probe rules in its record (if it still has one).
    fn record_branch_eni(&mut self, uid: &str, rules: Vec<BranchEniRule>) {
        if let Some(r) = self.pods.get(uid) {
            if r.branch_eni != rules {
                let r = PodRecord {
                    branch_eni: rules,
                    ..r.clone()
                };
                self.pods.put(r);
            }
        }
    }

    fn annotate(&self, pod: PodKey, value: Option<&'static str>) {
        if let Some(tx) = &self.annotations {
            if tx.try_send((pod, value)).is_err() {
                tracing::warn!("annotation queue full; an annotation update was dropped");
            }
        }
    }

    /// Re-arms the pods recorded by a previous run: those whose netns is still the one recorded keep their
    /// state and get their rules re-programmed with their recorded settings (an atomic replace, so a pod
    /// never goes uncaptured in between); the others are forgotten.
    fn restore(&mut self) {
        for uid in self.pods.uids() {
            let Some(mut r) = self.pods.get(&uid).cloned() else {
                continue;
            };
            let path = self.netns_path(&r.netns);
            let ns = match self.open_netns(&r) {
                Ok(ns) => ns,
                Err(e) => {
                    tracing::info!(uid, pod = %key(&r), error = %e, "recorded pod's netns is gone; forgetting it");
                    self.pods.remove(&uid);
                    continue;
                }
            };
            // Recorded before netns identities were kept: a pod found through /proc is recorded by a pid's
            // netns, and after a restart that pid may belong to something else. Keep it only if the
            // namespace still holds one of the pod's IPs (istio-cni's check).
            if r.netns_id.is_none() && r.netns.starts_with("/proc/") && !r.ips.is_empty() {
                let holds = procfs::netns_addresses(&path)
                    .map(|addrs| addrs.iter().any(|a| r.ips.contains(a)))
                    .unwrap_or(false);
                if !holds {
                    tracing::warn!(uid, pod = %key(&r), netns = %path.display(), "recorded netns no longer holds the pod's IPs; forgetting it");
                    self.pods.remove(&uid);
                    continue;
                }
            }
            if r.netns_id.is_none() {
                r.netns_id = Some(ns.id().into());
                self.pods.put(r.clone());
            }
            if r.state.captured() {
                self.captured
                    .pods
                    .lock()
                    .insert(uid.clone(), (zds_info(&r), Arc::new(ns)));
            }
        }
        tracing::info!(pods = self.pods.uids().len(), "pod state restored");
    }

    /// Runs until `shutdown` turns true. Rules stay in place on exit: enrolled pods remain captured (and
    /// blocked, if no proxy runs) until an agent runs again.
    pub async fn run(
        mut self,
        mut jobs: mpsc::Receiver<plugin_server::Job>,
        ready: crate::readiness::Task,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (ops, done) = self.zds_worker.take().expect("run is called once");
        tokio::spawn(zds_worker(self.zds.clone(), ops, done));
        let mut zds_done = self.zds_done.take().expect("run is called once");
        // Re-program restored pods before answering anything.
        self.reprogram_restored().await;
        self.install_host_probes().await;
        self.reconcile().await;
        // Ready (for the DaemonSet's probe) once restored pods are re-armed and a synced view has been
        // reconciled; plugin requests are answered before that too (they fail closed if the view lags).
        let mut ready = Some(ready);
        if self.view.borrow().synced {
            ready.take();
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut view_open = true;
        loop {
            tokio::select! {
                job = jobs.recv() => {
                    let Some((req, answer)) = job else { return };
                    self.handle(req, answer).await;
                }
                Some(done) = zds_done.recv() => self.zds_finished(done).await,
                changed = self.view.changed(), if view_open => {
                    if changed.is_err() {
                        // Never spin on a closed channel; keep serving with the last view.
                        tracing::error!("enrollment source stopped; keeping the last view");
                        view_open = false;
                        continue;
                    }
                    self.reconcile().await;
                    if self.view.borrow().synced {
                        ready.take();
                    }
                }
                _ = tick.tick() => {
                    self.install_host_probes().await;
                    self.retry_pending().await;
                    self.repair_due().await;
                    self.check_some_rules().await;
                    self.renew_hint();
                }
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    async fn reprogram_restored(&mut self) {
        for uid in self.pods.uids() {
            let Some(r) = self.pods.get(&uid).cloned() else {
                continue;
            };
            if !r.state.captured() {
                continue;
            }
            let settings = self.settings_of(&r);
            if let Err(e) = self.program(&r, settings).await {
                tracing::error!(error = %e, "re-programming a restored pod failed; its previous rules stay and it is retried");
                self.schedule_repair(&uid);
            }
        }
    }

    /// Answers one plugin request (an ADD that hands the pod to a proxy is answered when the proxy has).
    async fn handle(&mut self, req: PluginRequest, answer: oneshot::Sender<Answer>) {
        let a = match req {
            PluginRequest::Add(ev) => match self.add(ev).await {
                Ok(a) => a,
                Err(uid) => {
                    match self.in_flight.get_mut(&uid) {
                        Some(f) => f.waiters.push(answer),
                        None => {
                            let _ = answer.send(Answer::error(500, "pod enrollment lost track"));
                        }
                    }
                    return;
                }
            },
            PluginRequest::Del(ev) => {
                self.del(&ev).await;
                Answer::enrolled(false, "removed")
            }
            PluginRequest::Check(ev) => self.check(&ev).await,
            PluginRequest::Gc(gc) => {
                let valid: BTreeSet<&str> =
                    gc.valid.iter().map(|a| a.container_id.as_str()).collect();
                for uid in self.pods.uids() {
                    let stale = self.pods.get(&uid).is_some_and(|r| {
                        !r.container_id.is_empty() && !valid.contains(r.container_id.as_str())
                    });
                    if stale {
                        tracing::info!(
                            uid,
                            "garbage-collecting pod not in the runtime's attachments"
                        );
                        self.forget(&uid).await;
                    }
                }
                Answer::enrolled(false, "gc done")
            }
        };
        let _ = answer.send(a);
    }

    /// An ADD: the answer now, or `Err(uid)` when it waits for the proxy's acknowledgement of that pod.
    async fn add(&mut self, ev: PluginEvent) -> Result<Answer, String> {
        if ev.pod_name.is_empty() || ev.pod_namespace.is_empty() {
            return Ok(Answer::enrolled(false, "not a Kubernetes pod"));
        }
        if ev.netns.is_empty() {
            return Ok(Answer::error(400, "Netns is empty"));
        }
        let pod_key = PodKey {
            namespace: ev.pod_namespace.clone(),
            name: ev.pod_name.clone(),
        };
        let (info, view) = self.pod_info(&pod_key).await;
        let info = match info {
            Some(i) => i,
            None if self.kubernetes => {
                return Ok(Answer::error(
                    500,
                    format!(
                        "pod {pod_key} is not (yet) known to the agent's Kubernetes watch; retry"
                    ),
                ))
            }
            None => PodInfo {
                name: ev.pod_name.clone(),
                namespace: ev.pod_namespace.clone(),
                service_account: "default".into(),
                ..PodInfo::default()
            },
        };
        let uid = [&ev.pod_uid, &info.uid, &ev.container_id]
            .into_iter()
            .find(|s| !s.is_empty())
            .cloned()
            .unwrap_or_else(|| pod_key.to_string());
        // The same pod with a new sandbox (or a new uid under the same name): the old one goes first.
        if let Some(old) = self.pods.find(&pod_key.namespace, &pod_key.name).cloned() {
            if old.uid != uid || old.netns != ev.netns {
                self.forget(&old.uid).await;
            }
        }
        let previous = self.pods.get(&uid).cloned();
        let record = PodRecord {
            uid: uid.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            service_account: info.service_account.clone(),
            netns: ev.netns.clone(),
            container_id: ev.container_id.clone(),
            ips: ev.ips(),
            state: previous
                .as_ref()
                .map_or(Enrollment::NotEnrolled, |r| r.state),
            netns_id: previous.as_ref().and_then(|r| r.netns_id),
            settings: PodSettings::from_annotations(&info.annotations),
            branch_eni: previous.map(|r| r.branch_eni).unwrap_or_default(),
        };
        let decision = self
            .cfg
            .policy
            .decide(view.namespaces.get(&info.namespace), &info);
        match decision {
            Decision::Skip(reason) => {
                if record.state.captured() {
                    self.unenroll(&uid).await;
                }
                self.pods.put(PodRecord {
                    state: Enrollment::NotEnrolled,
                    ..record
                });
                tracing::info!(pod = %pod_key, reason, "pod not enrolled");
                Ok(Answer::enrolled(false, reason))
            }
            Decision::Enroll => {
                self.pods.put(record);
                match self.enroll(&uid).await {
                    Ok(()) => Err(uid),
                    Err(e) => {
                        tracing::warn!(error = %e, "pod enrollment failed");
                        Ok(Answer::error(500, e.to_string()))
                    }
                }
            }
        }
    }

    /// The pod as the cluster view knows it, and that view. In Kubernetes mode the watch may lag the
    /// runtime by a few milliseconds, so wait briefly (istio-cni: 10 × 10 ms). In file mode the poll may not
    /// have read a pod added a moment ago, so on a miss the file is read again now (as istio-cni's plugin
    /// asks the API server itself): a pod is never decided on without the labels its file gives it.
    async fn pod_info(&mut self, key: &PodKey) -> (Option<PodInfo>, Arc<ClusterView>) {
        for attempt in 0..10 {
            let view = self.view.borrow().clone();
            if let Some(p) = view.pod(key) {
                return (Some(p.clone()), view);
            }
            if !self.kubernetes || attempt == 9 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let ClusterSource::File(path) = &self.cfg.source {
            match super::local::load(path) {
                Ok((_, fresh)) => {
                    let fresh = Arc::new(fresh);
                    return (fresh.pod(key).cloned(), fresh);
                }
                Err(e) => tracing::warn!(error = %e, pod = %key, "re-reading the agent config"),
            }
        }
        (None, self.view.borrow().clone())
    }

    /// Captures pod `uid` with its recorded settings: rules, then the hand-over to the proxy (queued; its
    /// outcome arrives in [`Agent::zds_finished`]). If the rules cannot be programmed, a pod captured before
    /// keeps its old rules and is retried; a new one is left alone and the error returned.
    async fn enroll(&mut self, uid: &str) -> Result<(), Error> {
        let Some(r) = self.pods.get(uid).cloned() else {
            return Ok(());
        };
        let settings = self.settings_of(&r);
        let ns = match self.program(&r, settings).await {
            Ok(ns) => ns,
            Err(e) => {
                if r.state.captured() {
                    self.schedule_repair(uid);
                } else if matches!(e, Error::Netns { .. }) {
                    // Nothing of ours is in the pod; an unusable netns means the sandbox is gone.
                    self.pods.remove(uid);
                }
                return Err(e);
            }
        };
        self.repairs.remove(uid);
        // One durable write for both: the namespace's identity (first open) and the new state.
        self.pods.put(PodRecord {
            netns_id: r.netns_id.or(Some(ns.id().into())),
            state: Enrollment::Pending,
            ..r.clone()
        });
        self.captured
            .pods
            .lock()
            .insert(uid.to_string(), (zds_info(&r), ns));
        self.hand_over(uid)
    }

    /// Queues pod `uid`'s hand-over to the newest proxy (once per pod at a time).
    fn hand_over(&mut self, uid: &str) -> Result<(), Error> {
        if self.in_flight.contains_key(uid) {
            return Ok(());
        }
        let Some(r) = self.pods.get(uid) else {
            return Ok(());
        };
        let pod = key(r);
        let info = zds_info(r);
        let netns = {
            let captured = self.captured.pods.lock();
            let Some((_, ns)) = captured.get(uid) else {
                return Ok(());
            };
            ns.try_clone().map_err(|source| Error::Netns {
                pod: pod.clone(),
                path: PathBuf::from(&r.netns),
                source,
            })?
        };
        self.next_gen += 1;
        let gen = self.next_gen;
        let op = ZdsOp::Add {
            uid: uid.to_string(),
            gen,
            info,
            netns,
        };
        if self.zds_ops.try_send(op).is_err() {
            self.annotate(pod.clone(), Some("pending"));
            return Err(Error::Busy { pod });
        }
        self.in_flight.insert(
            uid.to_string(),
            InFlight {
                gen,
                waiters: Vec::new(),
            },
        );
        Ok(())
    }

    /// A proxy answered (or did not) a hand-over: the pod becomes enabled, or stays pending.
    async fn zds_finished(&mut self, done: ZdsDone) {
        let Some(f) = self.in_flight.get(&done.uid) else {
            return;
        };
        if f.gen != done.gen {
            return;
        }
        let waiters = self
            .in_flight
            .remove(&done.uid)
            .map(|f| f.waiters)
            .unwrap_or_default();
        let Some(r) = self
            .pods
            .get(&done.uid)
            .cloned()
            .filter(|r| r.state.captured())
        else {
            for w in waiters {
                let _ = w.send(Answer::error(
                    500,
                    "pod released while it was being enrolled",
                ));
            }
            return;
        };
        let answer = match done.result {
            Ok(()) => {
                if r.state != Enrollment::Enabled {
                    self.pods.set_state(&done.uid, Enrollment::Enabled);
                    self.probe_ips(&r, true).await;
                    self.annotate(key(&r), Some("enabled"));
                    tracing::info!(pod = %key(&r), uid = done.uid, "pod enrolled");
                }
                Answer::enrolled(true, "enrolled")
            }
            Err(source) => {
                self.pods.set_state(&done.uid, Enrollment::Pending);
                self.annotate(key(&r), Some("pending"));
                let e = Error::Proxy {
                    pod: key(&r),
                    source,
                };
                if !waiters.is_empty() {
                    tracing::warn!(error = %e, "pod enrollment failed");
                }
                Answer::error(500, e.to_string())
            }
        };
        for w in waiters {
            let _ = w.send(answer.clone());
        }
    }

    /// Opens the netns recorded for `r`, refusing a path that now names another namespace.
    fn open_netns(&self, r: &PodRecord) -> Result<Netns, Error> {
        let path = self.netns_path(&r.netns);
        let ns = Netns::open(&path).map_err(|source| Error::Netns {
            pod: key(r),
            path: path.clone(),
            source,
        })?;
        match r.netns_id {
            Some(want) if NetnsKey::from(ns.id()) != want => Err(Error::Netns {
                pod: key(r),
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "now names another namespace ({}, the pod's was net:[{}]): the pod's is gone",
                        ns.id(),
                        want.ino
                    ),
                ),
            }),
            _ => Ok(ns),
        }
    }

    /// The pod's netns: the handle held while it is captured, else opened (and checked) by path.
    fn pod_netns(&self, r: &PodRecord) -> Result<Arc<Netns>, Error> {
        if let Some((_, ns)) = self.captured.pods.lock().get(&r.uid) {
            return Ok(ns.clone());
        }
        self.open_netns(r).map(Arc::new)
    }

    /// Runs a netlink step in the pod's netns, on a thread of its own, for at most [`NETLINK_TIMEOUT`].
    async fn in_pod<T: Send + 'static>(
        r: &PodRecord,
        ns: Arc<Netns>,
        what: &'static str,
        f: impl FnOnce() -> Result<T, redirect::Error> + Send + 'static,
    ) -> Result<T, Error> {
        let id = ns.id();
        let task = tokio::task::spawn_blocking(move || ns.run_on_thread(f));
        match tokio::time::timeout(NETLINK_TIMEOUT, task).await {
            Ok(Ok(Ok(Ok(v)))) => Ok(v),
            Ok(Ok(Ok(Err(source)))) => Err(Error::Rules {
                pod: key(r),
                source,
            }),
            Ok(Ok(Err(source))) => Err(Error::Netns {
                pod: key(r),
                path: PathBuf::from(&r.netns),
                source,
            }),
            Ok(Err(join)) => Err(Error::Netns {
                pod: key(r),
                path: PathBuf::from(&r.netns),
                source: std::io::Error::other(join.to_string()),
            }),
            Err(_) => {
                tracing::error!(pod = %key(r), netns = %id, what, after = ?NETLINK_TIMEOUT, "netlink step timed out; moving on");
                Err(Error::Timeout {
                    pod: key(r),
                    what,
                    after: NETLINK_TIMEOUT,
                })
            }
        }
    }

    /// (Re)programs the pod's rules, atomically. A pod that was not captured has whatever part was made
    /// undone on failure; a captured one keeps what it had (the nftables part is one transaction, so its
    /// old rules are whole), because removing them would let its traffic out uncaptured.
    async fn program(&self, r: &PodRecord, settings: RuleSettings) -> Result<Arc<Netns>, Error> {
        let ns = self.pod_netns(r)?;
        let captured = r.state.captured();
        Self::in_pod(r, ns.clone(), "installing rules", move || {
            let res = redirect::install(&settings);
            if res.is_err() && !captured {
                let _ = redirect::remove();
            }
            res
        })
        .await?;
        Ok(ns)
    }

    /// Releases pod `uid`: rules out of its netns (if it still exists), every proxy told to drain it.
    async fn unenroll(&mut self, uid: &str) {
        let Some(r) = self.pods.get(uid).cloned() else {
            return;
        };
        self.repairs.remove(uid);
        if let Some(f) = self.in_flight.remove(uid) {
            for w in f.waiters {
                let _ = w.send(Answer::error(
                    500,
                    "pod released while it was being enrolled",
                ));
            }
        }
        let ns = self.pod_netns(&r);
        self.captured.pods.lock().remove(uid);
        self.probe_ips(&r, false).await;
        if let Ok(ns) = ns {
            if let Err(e) = Self::in_pod(&r, ns, "removing rules", redirect::remove).await {
                tracing::warn!(pod = %key(&r), error = %e, "removing rules failed");
            }
        }
        if self
            .zds_ops
            .send(ZdsOp::Del {
                uid: uid.to_string(),
            })
            .await
            .is_err()
        {
            tracing::error!(pod = %key(&r), "ZDS worker gone; proxies not told to drop the pod");
        }
        self.pods.set_state(uid, Enrollment::NotEnrolled);
        self.annotate(key(&r), None);
        tracing::info!(pod = %key(&r), uid, "pod released from the mesh");
    }

    /// Unenrolls and forgets pod `uid`.
    async fn forget(&mut self, uid: &str) {
        if self.pods.get(uid).is_some_and(|r| r.state.captured()) {
            self.unenroll(uid).await;
        }
        self.pods.remove(uid);
    }

    async fn del(&mut self, ev: &PluginEvent) {
        let uid = if !ev.pod_uid.is_empty() && self.pods.get(&ev.pod_uid).is_some() {
            Some(ev.pod_uid.clone())
        } else {
            self.pods
                .find(&ev.pod_namespace, &ev.pod_name)
                .filter(|r| ev.container_id.is_empty() || r.container_id == ev.container_id)
                .map(|r| r.uid.clone())
        };
        if let Some(uid) = uid {
            self.forget(&uid).await;
        }
    }

    async fn check(&mut self, ev: &PluginEvent) -> Answer {
        let Some(r) = self.pods.find(&ev.pod_namespace, &ev.pod_name).cloned() else {
            return Answer::enrolled(false, "pod unknown to the agent");
        };
        match r.state {
            Enrollment::NotEnrolled => Answer::enrolled(false, "not enrolled"),
            Enrollment::Pending => Answer::error(500, "pod is waiting for a node proxy"),
            Enrollment::Enabled => match self.rules_in_place(&r).await {
                Ok(true) => Answer::enrolled(true, "rules in place"),
                Ok(false) => Answer::error(
                    500,
                    "the pod's redirection rules differ from what the agent installed",
                ),
                Err(e) => {
                    Answer::error(500, format!("cannot read the pod's redirection rules: {e}"))
                }
            },
        }
    }

    /// Whether the pod's rules read back as what its settings program.
    async fn rules_in_place(&self, r: &PodRecord) -> Result<bool, Error> {
        let settings = self.settings_of(r);
        let ns = self.pod_netns(r)?;
        let installed = Self::in_pod(r, ns, "reading rules back", redirect::inspect).await?;
        Ok(installed.matches(&settings))
    }

    fn schedule_repair(&mut self, uid: &str) {
        let now = Instant::now();
        let r = self.repairs.entry(uid.to_string()).or_insert(Repair {
            next: now,
            delay: REPAIR_BACKOFF.0 / 2,
        });
        r.delay = (r.delay * 2).min(REPAIR_BACKOFF.1);
        r.next = now + r.delay;
    }

    /// Re-installs the rules of captured pods whose earlier attempt failed, when their backoff is over.
    async fn repair_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .repairs
            .iter()
            .filter(|(_, r)| r.next <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in due {
            self.repair(&uid, "an earlier install failed").await;
        }
    }

    /// Reads back the rules of the captured pods due for a check (a few per tick) and repairs any that
    /// drifted: deleted or changed by someone else, or half gone.
    async fn check_some_rules(&mut self) {
        let interval = self.cfg.rule_check_interval;
        if interval.is_zero() {
            return;
        }
        let now = Instant::now();
        self.checked
            .retain(|uid, _| self.pods.get(uid).is_some_and(|r| r.state.captured()));
        let mut due: Vec<(Option<Instant>, String)> = self
            .pods
            .iter()
            .filter(|r| r.state.captured() && !self.repairs.contains_key(&r.uid))
            .map(|r| (self.checked.get(&r.uid).copied(), r.uid.clone()))
            .filter(|(at, _)| at.is_none_or(|at| now.duration_since(at) >= interval))
            .collect();
        due.sort();
        for (_, uid) in due.into_iter().take(RULE_CHECKS_PER_TICK) {
            self.checked.insert(uid.clone(), now);
            let Some(r) = self.pods.get(&uid).cloned() else {
                continue;
            };
            match self.rules_in_place(&r).await {
                Ok(true) => {}
                Ok(false) => {
                    self.repair(&uid, "rules drifted from what was installed")
                        .await
                }
                Err(Error::Netns { .. }) => {
                    // The namespace itself is unusable; DEL or the cluster view will retire the pod.
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading a captured pod's rules back failed");
                    self.repair(&uid, "its rules cannot be read back").await;
                }
            }
        }
    }

    /// Re-installs a captured pod's rules, counting the outcome.
    async fn repair(&mut self, uid: &str, why: &'static str) {
        let Some(r) = self.pods.get(uid).cloned().filter(|r| r.state.captured()) else {
            self.repairs.remove(uid);
            return;
        };
        let settings = self.settings_of(&r);
        match self.program(&r, settings).await {
            Ok(_) => {
                self.repairs.remove(uid);
                self.metrics.rules_repaired.inc();
                tracing::warn!(pod = %key(&r), uid, why, "captured pod's rules repaired");
            }
            Err(e) => {
                self.metrics.rules_repair_failed.inc();
                tracing::error!(pod = %key(&r), uid, why, error = %e, "repairing a captured pod's rules failed; its previous rules stay, retrying");
                self.schedule_repair(uid);
            }
        }
    }

    /// Brings every known pod in line with the current view, and refreshes the plugin's hint file.
    async fn reconcile(&mut self) {
        let view = self.view.borrow().clone();
        if !view.synced {
            return;
        }
        self.write_hint(&view);
        if self.kubernetes {
            self.adopt_running(&view).await;
        }
        for uid in self.pods.uids() {
            let Some(r) = self.pods.get(&uid).cloned() else {
                continue;
            };
            let pod_key = key(&r);
            let info = match view.pod(&pod_key) {
                Some(p) if self.kubernetes && !p.uid.is_empty() && p.uid != r.uid => {
                    // A new pod under the same name: the recorded one is gone.
                    self.forget(&uid).await;
                    continue;
                }
                Some(p) => p.clone(),
                None if self.kubernetes => {
                    tracing::info!(pod = %pod_key, "pod deleted");
                    self.forget(&uid).await;
                    continue;
                }
                None => PodInfo {
                    uid: r.uid.clone(),
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                    service_account: r.service_account.clone(),
                    ..PodInfo::default()
                },
            };
            // The pod's settings follow its annotations (the file source has none: keep the recorded ones).
            if view.pod(&pod_key).is_some() {
                let settings = PodSettings::from_annotations(&info.annotations);
                if settings != r.settings {
                    let r = PodRecord {
                        settings,
                        ..r.clone()
                    };
                    self.pods.put(r.clone());
                    if r.state.captured() {
                        tracing::info!(pod = %pod_key, settings = ?r.settings, "pod annotations changed its capture settings; re-programming");
                        if let Err(e) = self.program(&r, self.settings_of(&r)).await {
                            tracing::error!(error = %e, "re-programming with the new settings failed; the previous rules stay, retrying");
                            self.schedule_repair(&uid);
                        }
                    }
                }
            }
            match self
                .cfg
                .policy
                .decide(view.namespaces.get(&r.namespace), &info)
            {
                Decision::Enroll if r.state == Enrollment::NotEnrolled => {
                    tracing::info!(pod = %pod_key, "pod now selected for ambient; capturing it live");
                    if let Err(e) = self.enroll(&uid).await {
                        tracing::warn!(error = %e, "live enrollment failed");
                    }
                }
                Decision::Skip(reason) if r.state.captured() => {
                    tracing::info!(pod = %pod_key, reason, "pod no longer selected");
                    self.unenroll(&uid).await;
                }
                _ => {
                    // The annotation reports actual state; if a patch was lost (API down), set it again
                    // (not while a hand-over is under way: its outcome sets it).
                    if self.kubernetes && !self.in_flight.contains_key(&uid) {
                        let want = match r.state {
                            Enrollment::Enabled => Some("enabled"),
                            Enrollment::Pending => Some("pending"),
                            Enrollment::NotEnrolled => None,
                        };
                        if info
                            .annotations
                            .get(kube::REDIRECTION_ANNOTATION)
                            .map(String::as_str)
                            != want
                        {
                            self.annotate(pod_key, want);
                        }
                    }
                }
            }
        }
    }

    /// Kubernetes mode: pods that should be captured but that no CNI ADD told the agent about (they started
    /// before the agent, or while the plugin was missing) are found through /proc and captured live.
    async fn adopt_running(&mut self, view: &ClusterView) {
        let proc_root = self.netns_path("/proc");
        for (pod_key, info) in &view.pods {
            if info.terminal
                || info.ips.is_empty()
                || self.pods.find(&pod_key.namespace, &pod_key.name).is_some()
                || self
                    .cfg
                    .policy
                    .decide(view.namespaces.get(&pod_key.namespace), info)
                    != Decision::Enroll
            {
                continue;
            }
            let (root, uid, ips) = (proc_root.clone(), info.uid.clone(), info.ips.clone());
            let found =
                tokio::task::spawn_blocking(move || procfs::find_pod_netns(&root, &uid, &ips))
                    .await
                    .ok()
                    .flatten();
            let Some(path) = found else {
                tracing::debug!(pod = %pod_key, "running pod's netns not found in /proc; waiting for its CNI ADD");
                continue;
            };
            let netns = match path.strip_prefix(&self.cfg.host_prefix) {
                Ok(rest) if !self.cfg.host_prefix.as_os_str().is_empty() => {
                    PathBuf::from("/").join(rest)
                }
                _ => path.clone(),
            };
            // The namespace is pinned by its identity right away: the pid behind the path may go.
            let netns_id = match Netns::open(&path) {
                Ok(ns) => Some(ns.id().into()),
                Err(e) => {
                    tracing::debug!(pod = %pod_key, error = %e, "running pod's netns vanished; waiting for its CNI ADD");
                    continue;
                }
            };
            tracing::info!(pod = %pod_key, netns = %netns.display(), "capturing a running pod found through /proc");
            self.pods.put(PodRecord {
                uid: info.uid.clone(),
                namespace: info.namespace.clone(),
                name: info.name.clone(),
                service_account: info.service_account.clone(),
                netns: netns.to_string_lossy().into_owned(),
                container_id: String::new(),
                ips: info.ips.clone(),
                state: Enrollment::NotEnrolled,
                netns_id,
                settings: PodSettings::from_annotations(&info.annotations),
                branch_eni: Vec::new(),
            });
            if let Err(e) = self.enroll(&info.uid).await {
                tracing::warn!(error = %e, "capturing a running pod failed");
            }
        }
    }

    /// Offers pods waiting for a proxy again, once one is connected.
    async fn retry_pending(&mut self) {
        if self.zds.connected() == 0 {
            return;
        }
        for uid in self.pods.uids() {
            if self
                .pods
                .get(&uid)
                .is_some_and(|r| r.state == Enrollment::Pending)
            {
                if let Err(e) = self.hand_over(&uid) {
                    tracing::debug!(uid, error = %e, "pending pod still waiting");
                }
            }
        }
    }

    /// Writes the plugin's fail-closed hint (see `meshnode-cni`'s `agent::read_hint`): the namespaces where
    /// no pod can be enrolled whatever its labels (the plugin lets pods there start while the agent is
    /// down, until the hint expires), the namespaces enrolled by label, and the excluded ones.
    fn write_hint(&mut self, view: &ClusterView) {
        let pass_through: Vec<String> = view
            .namespaces
            .iter()
            .filter(|(name, ns)| !self.cfg.policy.namespace_may_enroll(name, ns))
            .map(|(name, _)| name.clone())
            .collect();
        if self
            .last_hint
            .as_ref()
            .is_some_and(|(p, at)| *p == pass_through && at.elapsed() < HINT_RENEW)
        {
            return;
        }
        let ambient: Vec<String> = view
            .namespaces
            .iter()
            .filter(|(name, ns)| self.cfg.policy.namespace_enrolls(name, ns))
            .map(|(name, _)| name.clone())
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let body = serde_json::json!({
            "version": 2,
            "validUntil": (now + HINT_VALIDITY).as_secs(),
            "excludedNamespaces": self.cfg.policy.exclude_namespaces,
            "passThroughNamespaces": pass_through,
            "ambientNamespaces": ambient,
        })
        .to_string();
        match crate::file_watch::write_atomically(&self.cfg.hint_file(), body.as_bytes()) {
            Ok(()) => self.last_hint = Some((pass_through, Instant::now())),
            Err(e) => {
                tracing::error!(file = %self.cfg.hint_file().display(), error = %e, "cannot write the plugin's enrollment hint")
            }
        }
    }

    /// Keeps the hint's validity renewed while the agent runs.
    fn renew_hint(&mut self) {
        if self
            .last_hint
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= HINT_RENEW)
        {
            let view = self.view.borrow().clone();
            if view.synced {
                self.write_hint(&view);
            }
        }
    }

    /// The rules pod `r` gets: the agent's settings adjusted by the pod's recorded ones.
    fn settings_of(&self, r: &PodRecord) -> RuleSettings {
        let mut s = self.cfg.rules.clone();
        if let Some(dns) = r.settings.dns_capture {
            s.dns_capture = dns;
        }
        if r.settings.bypass_inbound {
            s.bypass_inbound = true;
        }
        s.reroute_interfaces
            .clone_from(&r.settings.reroute_interfaces);
        s
    }

    fn netns_path(&self, netns: &str) -> PathBuf {
        if self.cfg.host_prefix.as_os_str().is_empty() {
            PathBuf::from(netns)
        } else {
            self.cfg.host_prefix.join(netns.trim_start_matches('/'))
        }
    }
}

impl PodSettings {
    /// The settings a pod's annotations ask for, read as istio-cni reads them: booleans as Go's
    /// `strconv.ParseBool` (any other value is ignored with a warning), the interface list split on
    /// commas with blanks dropped (names that cannot be interface names are ignored with a warning).
    pub fn from_annotations(annotations: &cluster::Labels) -> PodSettings {
        let boolean = |name: &str| {
            let v = annotations.get(name)?;
            let parsed = parse_bool(v);
            if parsed.is_none() {
                tracing::warn!(
                    annotation = name,
                    value = %v,
                    "annotation ignored: only boolean values (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False) are supported"
                );
            }
            parsed
        };
        let reroute_interfaces = annotations
            .get(REROUTE_VIRTUAL_INTERFACES_ANNOTATION)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .filter(|n| {
                        let ok = redirect::valid_interface_name(n);
                        if !ok {
                            tracing::warn!(
                                annotation = REROUTE_VIRTUAL_INTERFACES_ANNOTATION,
                                interface = %n,
                                "not an interface name; ignored"
                            );
                        }
                        ok
                    })
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        PodSettings {
            dns_capture: boolean(DNS_CAPTURE_ANNOTATION),
            bypass_inbound: boolean(BYPASS_INBOUND_ANNOTATION).unwrap_or(false),
            reroute_interfaces,
        }
    }
}

/// A pod IP and the branch-ENI probe rules added for it.
type BranchEniRule = (std::net::IpAddr, branch_eni::BranchEni);

/// In the node's netns: adds the AWS branch-ENI probe rules for those of `ips` that are branch-ENI pod
/// IPs; returns the rules added (or already there). Failures are logged: the pod's probes then fail, as
/// they would without the rules, and nothing else is affected.
fn add_branch_eni(ips: &[std::net::IpAddr]) -> Vec<BranchEniRule> {
    let mut added = Vec::new();
    for ip in ips {
        match branch_eni::detect(*ip) {
            Ok(None) => {}
            Ok(Some(eni)) => match branch_eni::add(*ip, &eni) {
                Ok(()) => {
                    tracing::info!(%ip, table = eni.table, veth = %eni.veth, "AWS branch-ENI probe rules added");
                    added.push((*ip, eni));
                }
                Err(e) => {
                    tracing::error!(%ip, error = %e, "adding AWS branch-ENI probe rules failed; kubelet probes of this pod will fail")
                }
            },
            Err(e) => tracing::warn!(%ip, error = %e, "looking for an AWS branch ENI failed"),
        }
    }
    added
}

fn key(r: &PodRecord) -> PodKey {
    PodKey {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    }
}

fn zds_info(r: &PodRecord) -> ZdsWorkloadInfo {
    ZdsWorkloadInfo {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        service_account: r.service_account.clone(),
    }
}
