//! Standalone enrollment data: a YAML file of namespaces and pods, for use without Kubernetes.
//!
//! Input: the file at `MESHNODE_AGENT_CONFIG`, polled for changes. Output: a [`ClusterView`] published on
//! every good change; a bad edit is logged and the last good view keeps serving. Pods the file does not
//! name are still known to the agent through their CNI ADD (with no labels, service account `default`).
//!
//! ```yaml
//! namespaces:
//!   default: {labels: {istio.io/dataplane-mode: ambient}}
//!   test: {}
//! pods:
//! - {name: productpage, namespace: default, serviceAccount: productpage, labels: {app: productpage}}
//! - {name: legacy, namespace: default, labels: {istio.io/dataplane-mode: none}}
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::cluster::{ClusterView, Labels, NamespaceInfo, PodInfo, PodKey};

/// Why the file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// It could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default)]
    namespaces: BTreeMap<String, Namespace>,
    #[serde(default)]
    pods: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Namespace {
    #[serde(default)]
    labels: Labels,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Pod {
    name: String,
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    annotations: Labels,
    #[serde(default)]
    host_network: bool,
}

/// Parses the file's text.
pub fn parse(path: &Path, text: &str) -> Result<ClusterView, Error> {
    let invalid = |reason: String| Error::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let file: File = if text.trim().is_empty() {
        File::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?
    };
    let mut view = ClusterView {
        synced: true,
        ..ClusterView::default()
    };
    for (name, ns) in file.namespaces {
        view.namespaces
            .insert(name, NamespaceInfo { labels: ns.labels });
    }
    for p in file.pods {
        if p.name.is_empty() || p.namespace.is_empty() {
            return Err(invalid(
                "pods[].name and pods[].namespace must not be empty".into(),
            ));
        }
        let key = PodKey {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        };
        if view.pods.contains_key(&key) {
            return Err(invalid(format!("pod {key} is listed twice")));
        }
        view.pods.insert(
            key,
            PodInfo {
                uid: p.uid,
                name: p.name,
                namespace: p.namespace,
                service_account: if p.service_account.is_empty() {
                    "default".into()
                } else {
                    p.service_account
                },
                labels: p.labels,
                annotations: p.annotations,
                host_network: p.host_network,
                terminal: false,
                ips: vec![],
            },
        );
    }
    Ok(view)
}

/// Reads and parses the file once.
pub fn load(path: &Path) -> Result<(crate::file_watch::Seen, ClusterView), Error> {
    let (bytes, seen) =
        crate::file_watch::read_bounded_sync(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let view = parse(path, &String::from_utf8_lossy(&bytes))?;
    Ok((seen, view))
}

/// Polls the file every `interval` and publishes each good change until every receiver is gone.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    last: crate::file_watch::Seen,
    tx: watch::Sender<Arc<ClusterView>>,
) {
    let shown = path.clone();
    crate::file_watch::poll(
        path.clone(),
        interval,
        last,
        tx,
        move |bytes| parse(&path, &String::from_utf8_lossy(bytes)),
        |view| {
            tracing::info!(path = %shown.display(), namespaces = view.namespaces.len(), pods = view.pods.len(), "agent config reloaded")
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_and_pods_are_read_with_defaults() {
        let v = parse(
            Path::new("a.yaml"),
            "namespaces:\n  default: {labels: {istio.io/dataplane-mode: ambient}}\n  test: {}\npods:\n- {name: web, namespace: default}\n",
        )
        .unwrap();
        assert_eq!(v.namespaces.len(), 2);
        assert_eq!(
            v.namespaces["default"].labels["istio.io/dataplane-mode"],
            "ambient"
        );
        let web = v
            .pod(&PodKey {
                namespace: "default".into(),
                name: "web".into(),
            })
            .unwrap();
        assert_eq!(web.service_account, "default");
        assert!(v.synced);
        assert!(parse(Path::new("a.yaml"), "").unwrap().pods.is_empty());
    }

    #[test]
    fn mistakes_are_refused_naming_the_field() {
        for (text, needle) in [
            ("namespace: {}", "namespace"),
            ("pods:\n- {name: a}\n", "namespace"),
            ("pods:\n- {name: a, namespace: b, sa: x}\n", "sa"),
            (
                "pods:\n- {name: a, namespace: b}\n- {name: a, namespace: b}\n",
                "twice",
            ),
        ] {
            let err = parse(Path::new("a.yaml"), text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
