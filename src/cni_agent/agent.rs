//! The agent loop: the single owner of pod state, turning plugin requests and cluster-view changes into
//! rules in pods and ZDS hand-overs.
//!
//! Input: [`PluginRequest`]s with a channel for their [`Answer`], the cluster view, a 1 s tick.
//! Output: pods enrolled (rules programmed through [`crate::redirect`] in their netns, handed to the
//! newest proxy over ZDS), released, persisted ([`super::pods`]), annotated (Kubernetes), and the plugin's
//! fail-closed hint file kept current.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::netns::Netns;
use crate::proto::workload::zds::WorkloadInfo as ZdsWorkloadInfo;
use crate::redirect::{self, RuleSettings};
use crate::zds::server::{SnapshotEntry, SnapshotSource, ZdsServer};

use super::cluster::{self, ClusterView, PodInfo, PodKey};
use super::config::{AgentConfig, ClusterSource};
use super::plugin_server::{self, Answer, PluginEvent, PluginRequest};
use super::pods::{Enrollment, PodRecord, Pods};
use super::selector::Decision;
use super::{kube, procfs, Error, BYPASS_INBOUND_ANNOTATION, DNS_CAPTURE_ANNOTATION};

/// How often pods waiting for a proxy are offered again.
const RETRY_PENDING: Duration = Duration::from_secs(1);
/// Plugin requests queued for the agent loop; more wait in the plugin server (which is bounded too).
const JOB_QUEUE: usize = 64;
/// Annotation patches waiting for the API server.
const ANNOTATION_QUEUE: usize = 1024;

/// The pods the ZDS server sends in its snapshot to each newly connected proxy: every captured pod.
#[derive(Default)]
struct Captured {
    pods: Mutex<std::collections::BTreeMap<String, (ZdsWorkloadInfo, PathBuf)>>,
}

impl SnapshotSource for Captured {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        let pods = self.pods.lock().clone();
        pods.into_iter()
            .filter_map(|(uid, (info, path))| match Netns::open(&path) {
                Ok(ns) => Some(SnapshotEntry {
                    uid,
                    info,
                    netns: Some(ns),
                }),
                Err(e) => {
                    // The pod's sandbox is gone; leaving it out lets the proxy drain it.
                    tracing::warn!(uid, error = %e, "pod netns gone; left out of the snapshot");
                    None
                }
            })
            .collect()
    }
}

/// The agent's state and loop.
pub struct Agent {
    cfg: Arc<AgentConfig>,
    zds: ZdsServer,
    captured: Arc<Captured>,
    pods: Pods,
    view: watch::Receiver<Arc<ClusterView>>,
    kubernetes: bool,
    last_hint: Option<Vec<String>>,
    annotations: Option<mpsc::Sender<(PodKey, Option<&'static str>)>>,
    /// Kubernetes mode: the node's netns, where kubelet probes to enrolled pods are SNATed.
    host: Option<HostProbes>,
}

/// The host-side probe rule: where it lives and whether it is installed.
struct HostProbes {
    netns: Arc<Netns>,
    settings: Option<redirect::HostProbeSettings>,
}

/// Handles given to the agent's servers.
pub struct AgentHandles {
    /// Where the plugin server sends requests.
    pub jobs: mpsc::Sender<plugin_server::Job>,
    /// The ZDS server (shared with the agent).
    pub zds: ZdsServer,
}

impl Agent {
    /// An agent over `view`, restoring the pods recorded in the run directory.
    pub fn new(
        cfg: Arc<AgentConfig>,
        view: watch::Receiver<Arc<ClusterView>>,
    ) -> (Agent, AgentHandles, mpsc::Receiver<plugin_server::Job>) {
        let captured = Arc::new(Captured::default());
        let zds = ZdsServer::new(captured.clone());
        let (pods, problem) = Pods::load(cfg.state_file());
        if let Some(p) = problem {
            tracing::error!(problem = %p, "starting with no recorded pods");
        }
        let (jobs, rx) = mpsc::channel(JOB_QUEUE);
        let kubernetes = matches!(cfg.source, ClusterSource::Kubernetes { .. });
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
        };
        agent.restore();
        (agent, AgentHandles { jobs, zds }, rx)
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
    pub fn use_host_probes(&mut self) {
        let path = if self.cfg.host_prefix.as_os_str().is_empty() {
            PathBuf::from("/proc/thread-self/ns/net")
        } else {
            self.netns_path("/proc/1/ns/net")
        };
        match Netns::open(&path) {
            Ok(ns) => {
                self.host = Some(HostProbes {
                    netns: Arc::new(ns),
                    settings: None,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "node netns unavailable; kubelet probes of enrolled pods will go through the proxy")
            }
        }
    }

    /// Installs the host probe rule with every captured pod's IPs (idempotent; re-run at start).
    async fn install_host_probes(&mut self) {
        let Some(host) = &mut self.host else { return };
        let proc_root = if self.cfg.host_prefix.as_os_str().is_empty() {
            PathBuf::from("/proc")
        } else {
            self.cfg.host_prefix.join("proc")
        };
        let Some(uid) = procfs::find_kubelet_uid(&proc_root) else {
            tracing::warn!(proc = %proc_root.display(), "no kubelet process found; kubelet probe SNAT not installed");
            return;
        };
        let settings = redirect::HostProbeSettings::for_pods(uid, &self.cfg.rules);
        let ips: Vec<std::net::IpAddr> = self
            .pods
            .iter()
            .filter(|r| r.state.captured())
            .flat_map(|r| r.ips.clone())
            .collect();
        let (ns, s) = (host.netns.clone(), settings.clone());
        let res = tokio::task::spawn_blocking(move || {
            ns.run_on_thread(move || redirect::install_host(&s, &ips))
        })
        .await;
        match res {
            Ok(Ok(Ok(()))) => {
                tracing::info!(
                    kubelet_uid = uid,
                    "kubelet probe SNAT installed in the node netns"
                );
                host.settings = Some(settings);
            }
            other => {
                tracing::error!(result = ?other.map(|r| r.map(|r| r.err())), "installing the kubelet probe SNAT failed")
            }
        }
    }

    /// Adds (or removes) pod IPs to the host's probe sets.
    async fn probe_ips(&self, ips: &[std::net::IpAddr], add: bool) {
        let Some(host) = &self.host else { return };
        if host.settings.is_none() || ips.is_empty() {
            return;
        }
        let (ns, ips) = (host.netns.clone(), ips.to_vec());
        let res = tokio::task::spawn_blocking(move || {
            ns.run_on_thread(move || {
                if add {
                    redirect::add_probe_ips(&ips)
                } else {
                    redirect::remove_probe_ips(&ips)
                }
            })
        })
        .await;
        if !matches!(res, Ok(Ok(Ok(())))) {
            tracing::warn!(add, result = ?res.map(|r| r.map(|r| r.err())), "updating the kubelet probe set failed");
        }
    }

    fn annotate(&self, pod: PodKey, value: Option<&'static str>) {
        if let Some(tx) = &self.annotations {
            if tx.try_send((pod, value)).is_err() {
                tracing::warn!("annotation queue full; an annotation update was dropped");
            }
        }
    }

    /// Re-arms the pods recorded by a previous run: those whose netns still exists keep their state and get
    /// their rules re-programmed (an atomic replace, so a pod never goes uncaptured in between); the others
    /// are forgotten.
    fn restore(&mut self) {
        for uid in self.pods.uids() {
            let Some(r) = self.pods.get(&uid).cloned() else {
                continue;
            };
            let path = self.netns_path(&r.netns);
            if !path.exists() {
                tracing::info!(uid, pod = %key(&r), "recorded pod's netns is gone; forgetting it");
                self.pods.remove(&uid);
                continue;
            }
            // A pod found through /proc is recorded by a pid's netns; after a restart that pid may belong to
            // something else. Keep it only if the namespace still holds one of the pod's IPs (istio-cni's check).
            if r.netns.starts_with("/proc/") && !r.ips.is_empty() {
                let holds = procfs::netns_addresses(&path)
                    .map(|addrs| addrs.iter().any(|a| r.ips.contains(a)))
                    .unwrap_or(false);
                if !holds {
                    tracing::warn!(uid, pod = %key(&r), netns = %path.display(), "recorded netns no longer holds the pod's IPs; forgetting it");
                    self.pods.remove(&uid);
                    continue;
                }
            }
            if r.state.captured() {
                self.captured
                    .pods
                    .lock()
                    .insert(uid.clone(), (zds_info(&r), path));
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
        let mut retry = tokio::time::interval(RETRY_PENDING);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut view_open = true;
        loop {
            tokio::select! {
                job = jobs.recv() => {
                    let Some((req, answer)) = job else { return };
                    let a = self.handle(req).await;
                    let _ = answer.send(a);
                }
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
                _ = retry.tick() => self.retry_pending().await,
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
            let settings = self.settings_for(&r);
            if let Err(e) = self.program(&r, settings).await {
                tracing::error!(error = %e, "re-programming a restored pod failed");
            }
        }
    }

    /// Answers one plugin request.
    pub async fn handle(&mut self, req: PluginRequest) -> Answer {
        match req {
            PluginRequest::Add(ev) => self.add(ev).await,
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
        }
    }

    async fn add(&mut self, ev: PluginEvent) -> Answer {
        if ev.pod_name.is_empty() || ev.pod_namespace.is_empty() {
            return Answer::enrolled(false, "not a Kubernetes pod");
        }
        if ev.netns.is_empty() {
            return Answer::error(400, "Netns is empty");
        }
        let pod_key = PodKey {
            namespace: ev.pod_namespace.clone(),
            name: ev.pod_name.clone(),
        };
        let info = match self.pod_info(&pod_key).await {
            Some(i) => i,
            None if self.kubernetes => {
                return Answer::error(
                    500,
                    format!(
                        "pod {pod_key} is not (yet) known to the agent's Kubernetes watch; retry"
                    ),
                )
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
        let record = PodRecord {
            uid: uid.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            service_account: info.service_account.clone(),
            netns: ev.netns.clone(),
            container_id: ev.container_id.clone(),
            ips: ev.ips(),
            state: self
                .pods
                .get(&uid)
                .map_or(Enrollment::NotEnrolled, |r| r.state),
        };
        let view = self.view.borrow().clone();
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
                Answer::enrolled(false, reason)
            }
            Decision::Enroll => {
                self.pods.put(record);
                match self.enroll(&uid, &info).await {
                    Ok(()) => Answer::enrolled(true, "enrolled"),
                    Err(e) => {
                        tracing::warn!(error = %e, "pod enrollment failed");
                        Answer::error(500, e.to_string())
                    }
                }
            }
        }
    }

    /// The pod as the cluster view knows it. In Kubernetes mode the watch may lag the runtime by a few
    /// milliseconds, so wait briefly (istio-cni: 10 × 10 ms).
    async fn pod_info(&mut self, key: &PodKey) -> Option<PodInfo> {
        for attempt in 0..10 {
            if let Some(p) = self.view.borrow().pod(key) {
                return Some(p.clone());
            }
            if !self.kubernetes || attempt == 9 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Captures pod `uid`: rules, then the proxy. On a proxy failure the rules stay (pending).
    async fn enroll(&mut self, uid: &str, info: &PodInfo) -> Result<(), Error> {
        let Some(r) = self.pods.get(uid).cloned() else {
            return Ok(());
        };
        let settings = self.settings_with(&info.annotations);
        let ns = match self.program(&r, settings).await {
            Ok(ns) => ns,
            Err(e) => {
                if !r.state.captured() {
                    // Nothing of ours is in the pod; an unusable netns means the sandbox is gone.
                    if matches!(e, Error::Netns { .. }) {
                        self.pods.remove(uid);
                    }
                }
                return Err(e);
            }
        };
        self.pods.set_state(uid, Enrollment::Pending);
        self.captured
            .pods
            .lock()
            .insert(uid.to_string(), (zds_info(&r), self.netns_path(&r.netns)));
        match self.zds.add(uid, &zds_info(&r), &ns).await {
            Ok(()) => {
                self.pods.set_state(uid, Enrollment::Enabled);
                self.probe_ips(&r.ips, true).await;
                self.annotate(key(&r), Some("enabled"));
                tracing::info!(pod = %key(&r), uid, "pod enrolled");
                Ok(())
            }
            Err(source) => {
                self.annotate(key(&r), Some("pending"));
                Err(Error::Proxy {
                    pod: key(&r),
                    source,
                })
            }
        }
    }

    /// Opens the pod's netns and (re)programs its rules there, atomically.
    async fn program(&self, r: &PodRecord, settings: RuleSettings) -> Result<Netns, Error> {
        let path = self.netns_path(&r.netns);
        let ns = Netns::open(&path).map_err(|source| Error::Netns {
            pod: key(r),
            path: path.clone(),
            source,
        })?;
        let shared = Arc::new(ns.try_clone().map_err(|source| Error::Netns {
            pod: key(r),
            path: path.clone(),
            source,
        })?);
        let result = tokio::task::spawn_blocking(move || {
            shared.run_on_thread(move || {
                let res = redirect::install(&settings);
                if res.is_err() {
                    // The nftables part is one transaction; the route part is undone here so nothing
                    // half-made stays behind.
                    let _ = redirect::remove();
                }
                res
            })
        })
        .await;
        match result {
            Ok(Ok(Ok(()))) => Ok(ns),
            Ok(Ok(Err(source))) => Err(Error::Rules {
                pod: key(r),
                source,
            }),
            Ok(Err(source)) => Err(Error::Netns {
                pod: key(r),
                path,
                source,
            }),
            Err(join) => Err(Error::Netns {
                pod: key(r),
                path,
                source: std::io::Error::other(join.to_string()),
            }),
        }
    }

    /// Releases pod `uid`: rules out of its netns (if it still exists), every proxy told to drain it.
    async fn unenroll(&mut self, uid: &str) {
        let Some(r) = self.pods.get(uid).cloned() else {
            return;
        };
        self.captured.pods.lock().remove(uid);
        self.probe_ips(&r.ips, false).await;
        let path = self.netns_path(&r.netns);
        if let Ok(ns) = Netns::open(&path) {
            let ns = Arc::new(ns);
            let res = tokio::task::spawn_blocking(move || ns.run_on_thread(redirect::remove)).await;
            match res {
                Ok(Ok(Ok(()))) => {}
                other => {
                    tracing::warn!(pod = %key(&r), result = ?other.map(|r| r.map(|r| r.err())), "removing rules failed")
                }
            }
        }
        if let Err(e) = self.zds.del(uid).await {
            tracing::warn!(pod = %key(&r), error = %e, "telling proxies to drop the pod failed");
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
            Enrollment::Enabled => {
                let settings = self.settings_for(&r);
                let path = self.netns_path(&r.netns);
                let inspected = match Netns::open(&path) {
                    Ok(ns) => {
                        let ns = Arc::new(ns);
                        tokio::task::spawn_blocking(move || ns.run_on_thread(redirect::inspect))
                            .await
                            .ok()
                            .and_then(|r| r.ok())
                            .and_then(|r| r.ok())
                    }
                    Err(_) => None,
                };
                match inspected {
                    Some(i) if i.matches(&settings) => Answer::enrolled(true, "rules in place"),
                    Some(_) => Answer::error(
                        500,
                        "the pod's redirection rules differ from what the agent installed",
                    ),
                    None => Answer::error(500, "cannot read the pod's redirection rules"),
                }
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
            match self
                .cfg
                .policy
                .decide(view.namespaces.get(&r.namespace), &info)
            {
                Decision::Enroll if r.state == Enrollment::NotEnrolled => {
                    tracing::info!(pod = %pod_key, "pod now selected for ambient; capturing it live");
                    if let Err(e) = self.enroll(&uid, &info).await {
                        tracing::warn!(error = %e, "live enrollment failed");
                    }
                }
                Decision::Skip(reason) if r.state.captured() => {
                    tracing::info!(pod = %pod_key, reason, "pod no longer selected");
                    self.unenroll(&uid).await;
                }
                _ => {
                    // The annotation reports actual state; if a patch was lost (API down), set it again.
                    if self.kubernetes {
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
            });
            if let Err(e) = self.enroll(&info.uid, info).await {
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
            let Some(r) = self.pods.get(&uid).cloned() else {
                continue;
            };
            if r.state != Enrollment::Pending {
                continue;
            }
            let Ok(ns) = Netns::open(&self.netns_path(&r.netns)) else {
                continue;
            };
            match self.zds.add(&uid, &zds_info(&r), &ns).await {
                Ok(()) => {
                    self.pods.set_state(&uid, Enrollment::Enabled);
                    self.probe_ips(&r.ips, true).await;
                    self.annotate(key(&r), Some("enabled"));
                    tracing::info!(pod = %key(&r), "pending pod taken by a proxy");
                }
                Err(e) => tracing::debug!(pod = %key(&r), error = %e, "pending pod still waiting"),
            }
        }
    }

    /// Writes the namespaces where a pod would be enrolled by namespace label, for the plugin to fail
    /// closed on when it cannot reach the agent.
    fn write_hint(&mut self, view: &ClusterView) {
        let ambient: Vec<String> = view
            .namespaces
            .iter()
            .filter(|(name, ns)| self.cfg.policy.namespace_enrolls(name, ns))
            .map(|(name, _)| name.clone())
            .collect();
        if self.last_hint.as_ref() == Some(&ambient) {
            return;
        }
        let body = serde_json::json!({ "ambientNamespaces": ambient }).to_string();
        match crate::file_watch::write_atomically(&self.cfg.hint_file(), body.as_bytes()) {
            Ok(()) => self.last_hint = Some(ambient),
            Err(e) => {
                tracing::error!(file = %self.cfg.hint_file().display(), error = %e, "cannot write the plugin's enrollment hint")
            }
        }
    }

    fn settings_for(&self, r: &PodRecord) -> RuleSettings {
        let view = self.view.borrow().clone();
        let empty = cluster::Labels::new();
        let annotations = view.pod(&key(r)).map_or(&empty, |p| &p.annotations);
        self.settings_with(annotations)
    }

    fn settings_with(&self, annotations: &cluster::Labels) -> RuleSettings {
        let mut s = self.cfg.rules.clone();
        match annotations.get(DNS_CAPTURE_ANNOTATION).map(String::as_str) {
            Some("true") => s.dns_capture = true,
            Some("false") => s.dns_capture = false,
            _ => {}
        }
        if annotations
            .get(BYPASS_INBOUND_ANNOTATION)
            .map(String::as_str)
            == Some("true")
        {
            s.bypass_inbound = true;
        }
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
