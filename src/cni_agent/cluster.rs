//! What the agent knows of the cluster: namespaces with their labels and this node's pods.
//!
//! Input: a source (the Kubernetes API in a cluster, the local config file when standalone) publishes a
//! whole [`ClusterView`] whenever something changes. Output: the view the enrollment decision reads. A
//! node sees all namespaces and only its own pods (about a hundred), so whole-view snapshots are cheap and
//! keep the agent's reconcile loop simple: compare the desired enrollment with the actual one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Labels or annotations.
pub type Labels = BTreeMap<String, String>;

/// A namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Its labels (`istio.io/dataplane-mode` among them).
    pub labels: Labels,
}

/// A pod on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.uid`: the ZDS workload uid.
    pub uid: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `metadata.annotations`.
    pub annotations: Labels,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `status.phase` is Succeeded or Failed, or the pod is being deleted with no containers left.
    pub terminal: bool,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
}

/// Namespace and name: how CNI events name a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the agent knows of the cluster at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// This node's pods.
    pub pods: BTreeMap<PodKey, PodInfo>,
    /// Whether the source has synced at least once (a Kubernetes list completed, the file was read).
    pub synced: bool,
}

impl ClusterView {
    /// The pod named `key`.
    pub fn pod(&self, key: &PodKey) -> Option<&PodInfo> {
        self.pods.get(key)
    }

    /// The pod with `uid`.
    pub fn pod_by_uid(&self, uid: &str) -> Option<&PodInfo> {
        self.pods.values().find(|p| p.uid == uid)
    }
}

/// A shared, immutable view.
pub type SharedView = Arc<ClusterView>;
