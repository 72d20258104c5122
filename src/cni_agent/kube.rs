//! The Kubernetes source of the agent's [`ClusterView`], and the pod annotation writer.
//!
//! Input: the Kubernetes API (in-cluster service account or `KUBECONFIG`, as kube's `Config::infer` finds
//! them): a watch on all Namespaces and one on this node's Pods (`fieldSelector=spec.nodeName=<node>`), as
//! istio-cni's informers do (reference/istio-cni.md §1.11 step 1).
//! Output: a whole [`ClusterView`] on a `watch` channel after each change, bursts coalesced over
//! [`COALESCE`]; the first view is published once both initial lists are in (`synced = true`). And
//! [`KubeSource::set_redirection`], the JSON merge patch of `ambient.istio.io/redirection` on the
//! `pods/status` subresource (§1.6 step 5, §1.12).
//!
//! Watch errors are retried by kube's watcher with exponential backoff (0.8 s to 30 s, jittered); a watch that
//! ends is resumed from its resourceVersion, one that is too old (410 Gone) is relisted, and a relist replaces
//! the mirrored objects atomically once it completes, so a pod deleted while the watch was down disappears.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

use super::cluster::{ClusterView, NamespaceInfo, PodInfo, PodKey};

/// The annotation that records a pod's capture state: `enabled`, `pending`, or absent.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// How long changes are gathered before a view is published: a namespace relabel or a relist touches many
/// objects at once, and the agent should reconcile once, not once per object. Short enough to be invisible
/// next to pod start-up times.
pub const COALESCE: Duration = Duration::from_millis(50);

/// What went wrong talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Neither an in-cluster service account nor a kubeconfig could be loaded.
    #[error("no Kubernetes client configuration: {0}")]
    Config(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration (TLS, proxy, auth settings).
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Patching a pod's status failed (API error, RBAC, pod gone, connection).
    #[error("patching pods/status of {namespace}/{name}: {source}")]
    Patch {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

/// Watches the cluster for one node and writes the redirection annotation.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    node_name: String,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source for `node_name`, configured from the environment as kube's `Config::infer` does.
    pub async fn new(node_name: String) -> Result<KubeSource, Error> {
        let config = kube::Config::infer().await.map_err(Error::Config)?;
        let client = Client::try_from(config).map_err(Error::Client)?;
        Ok(KubeSource::with_client(client, node_name))
    }

    /// A source for `node_name` over an existing client (tests point one at a fake API server).
    pub fn with_client(client: Client, node_name: String) -> KubeSource {
        KubeSource { client, node_name }
    }

    /// The node whose pods are watched.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Watches all Namespaces and this node's Pods and publishes a whole [`ClusterView`] on `tx` after each
    /// change (coalesced over [`COALESCE`]); the first one once both initial lists are in. Reconnects and
    /// relists on errors with backoff. Returns only when every receiver of `tx` is gone.
    pub async fn run(self, tx: watch::Sender<Arc<ClusterView>>) {
        let namespaces = watcher(
            Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let pods = watcher(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name)),
        )
        .default_backoff();
        let mut namespaces = std::pin::pin!(namespaces);
        let mut pods = std::pin::pin!(pods);

        let mut ns_mirror: Mirror<String, NamespaceInfo> = Mirror::default();
        let mut pod_mirror: Mirror<PodKey, PodInfo> = Mirror::default();
        let mut publish_at: Option<Instant> = None;
        loop {
            let changed = tokio::select! {
                () = tx.closed() => return,
                event = namespaces.next() => match event {
                    Some(Ok(event)) => ns_mirror.apply(event, namespace_info),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "namespace watch failed; retrying with backoff");
                        false
                    }
                    // The watcher never ends; if it did, only a restart would bring it back.
                    None => return,
                },
                event = pods.next() => match event {
                    Some(Ok(event)) => pod_mirror.apply(event, pod_info),
                    Some(Err(e)) => {
                        tracing::warn!(node = %self.node_name, error = %e, "pod watch failed; retrying with backoff");
                        false
                    }
                    None => return,
                },
                () = sleep_until_or_forever(publish_at) => {
                    publish_at = None;
                    publish(&tx, &ns_mirror, &pod_mirror);
                    false
                }
            };
            // The first change of a burst sets the deadline; later ones ride along, so latency stays bounded.
            if changed && publish_at.is_none() && ns_mirror.synced && pod_mirror.synced {
                publish_at = Some(Instant::now() + COALESCE);
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) the `ambient.istio.io/redirection` annotation of a pod with a JSON
    /// merge patch on its `pods/status` subresource, as istio-cni does (less privilege than patching pods).
    pub async fn set_redirection(
        &self,
        namespace: &str,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), Error> {
        let patch = serde_json::json!({
            "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } }
        });
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|source| Error::Patch {
                namespace: namespace.to_string(),
                name: name.to_string(),
                source,
            })
    }
}

async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Publishes the view if it differs from the last one, so receivers wake only for real changes.
fn publish(
    tx: &watch::Sender<Arc<ClusterView>>,
    namespaces: &Mirror<String, NamespaceInfo>,
    pods: &Mirror<PodKey, PodInfo>,
) {
    let view = ClusterView {
        namespaces: namespaces.live.clone(),
        pods: pods.live.clone(),
        synced: namespaces.synced && pods.synced,
    };
    tx.send_if_modified(|current| {
        if **current == view {
            false
        } else {
            *current = Arc::new(view);
            true
        }
    });
}

/// The objects of one kind as the watcher last reported them, converted to what the view holds.
struct Mirror<K, V> {
    live: BTreeMap<K, V>,
    /// Objects of a list in progress; they replace `live` when it completes.
    relist: Option<BTreeMap<K, V>>,
    /// A list has completed at least once.
    synced: bool,
}

impl<K, V> Default for Mirror<K, V> {
    fn default() -> Self {
        Mirror {
            live: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// Something the view holds that can tell whether a deleted object is the one stored under its key.
trait Identity {
    /// Whether `self` (stored) and `deleted` are the same object, not a re-creation under the same name.
    fn same_object(&self, deleted: &Self) -> bool;
}

impl Identity for NamespaceInfo {
    fn same_object(&self, _deleted: &Self) -> bool {
        true
    }
}

impl Identity for PodInfo {
    fn same_object(&self, deleted: &Self) -> bool {
        self.uid == deleted.uid
    }
}

impl<K: Ord, V: PartialEq + Identity> Mirror<K, V> {
    /// Applies a watcher event; returns whether the live objects changed.
    fn apply<T>(&mut self, event: watcher::Event<T>, convert: fn(&T) -> Option<(K, V)>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                if let Some((key, value)) = convert(&obj) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, value);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let changed = !self.synced || listed != self.live;
                self.live = listed;
                self.synced = true;
                changed
            }
            watcher::Event::Apply(obj) => match convert(&obj) {
                Some((key, value)) => {
                    if self.live.get(&key) == Some(&value) {
                        false
                    } else {
                        self.live.insert(key, value);
                        true
                    }
                }
                None => false,
            },
            watcher::Event::Delete(obj) => match convert(&obj) {
                Some((key, deleted)) => match self.live.get(&key) {
                    Some(stored) if stored.same_object(&deleted) => {
                        self.live.remove(&key);
                        true
                    }
                    _ => false,
                },
                None => false,
            },
        }
    }
}

/// A Namespace as the view holds it; `None` without a name.
fn namespace_info(ns: &Namespace) -> Option<(String, NamespaceInfo)> {
    let name = ns.metadata.name.clone()?;
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    Some((name, NamespaceInfo { labels }))
}

/// A Pod as the view holds it; `None` without a name or namespace.
fn pod_info(pod: &Pod) -> Option<(PodKey, PodInfo)> {
    let meta = &pod.metadata;
    let key = PodKey {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
    };
    let spec = pod.spec.as_ref();
    let info = PodInfo {
        uid: meta.uid.clone().unwrap_or_default(),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminal: is_terminal(pod),
        ips: pod_ips(pod, &key),
    };
    Some((key, info))
}

/// Succeeded or Failed, or being deleted with every container terminated (or none ever started).
fn is_terminal(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return true;
    }
    pod.metadata.deletion_timestamp.is_some()
        && status
            .and_then(|s| s.container_statuses.as_ref())
            .is_none_or(|cs| {
                cs.iter()
                    .all(|c| c.state.as_ref().is_some_and(|st| st.terminated.is_some()))
            })
}

/// `status.podIPs`, or `status.podIP` from API servers that only fill that; unparsable entries are skipped.
fn pod_ips(pod: &Pod, key: &PodKey) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    listed
        .into_iter()
        .filter_map(|ip| match ip.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::debug!(pod = %key, ip, "ignoring unparsable pod IP");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
