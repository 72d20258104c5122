//! Installing the plugin on the node: the `meshnode-cni` binary into the CNI bin directory and our entry
//! appended to the primary CNI network config, as istio-cni's installer does.
//!
//! Input: [`InstallConfig`] (where the binary comes from, the host's CNI bin and conf directories as
//! mounted in the agent's container, the values our entry carries). Output: the binary copied (atomically,
//! through a temporary file) and the primary config rewritten (atomically) with exactly one `meshnode-cni`
//! entry at the end of its `plugins`; a single `.conf` is wrapped into a `.conflist` as istio-cni does.
//! [`ensure`] is idempotent and is re-run periodically, because primary CNIs rewrite their config.
//! The plugin is never removed on agent shutdown: pods keep failing closed (and being retried by the
//! kubelet) until the next agent runs, which is what makes agent upgrades safe.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::file_watch::write_atomically_mode;

/// Our entry's `type` (the binary name).
pub const PLUGIN_TYPE: &str = "meshnode-cni";
/// istio-cni's type; an entry of it is replaced by ours (one capture plugin per chain).
const ISTIO_TYPE: &str = "istio-cni";

/// Why installation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No primary CNI config to chain onto yet (the primary CNI is not installed).
    #[error("no CNI network config (*.conf, *.conflist) in {0} yet")]
    NoPrimary(PathBuf),
    /// The primary config is not valid JSON of the expected shape.
    #[error("primary CNI config {path} is not usable: {reason}")]
    BadPrimary {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What to install where.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The plugin binary to copy (in the agent's image).
    pub plugin_binary: PathBuf,
    /// The host's CNI bin directory as mounted (`/host/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The host's CNI conf directory as mounted (`/host/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The run directory as the plugin sees it on the host (`/var/run/istio-cni`).
    pub run_dir: PathBuf,
    /// Namespaces the plugin passes through without asking the agent.
    pub exclude_namespaces: Vec<String>,
    /// The agent's own namespace (its pods are passed through).
    pub pod_namespace: String,
}

/// Size, modification time and inode of a file: what changes when anyone rewrites or replaces it.
type Stamp = (u64, std::time::SystemTime, u64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.len(), m.modified()?, m.ino()))
}

/// The plugin binary and its installed copy as they were when last found identical, so a periodic check
/// compares two `stat`s instead of reading both files (about 2 MB) every time.
#[derive(Debug, Default)]
pub struct Verified(Option<(Stamp, Stamp)>);

/// Copies the binary if it differs and makes sure the primary config ends with our entry. Returns the
/// config file it (re)wrote, or `None` when everything was already in place.
pub fn ensure(cfg: &InstallConfig, verified: &mut Verified) -> Result<Option<PathBuf>, Error> {
    copy_binary(cfg, verified)?;
    let primary = primary_config(&cfg.conf_dir)?;
    let text = std::fs::read_to_string(&primary).map_err(|source| Error::Io {
        what: "reading",
        path: primary.clone(),
        source,
    })?;
    let bad = |reason: String| Error::BadPrimary {
        path: primary.clone(),
        reason,
    };
    let doc: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let (mut list, target) = if primary.extension().is_some_and(|e| e == "conflist") {
        (doc, primary.clone())
    } else {
        // A single-plugin .conf becomes a list (istio-cni names it k8s-pod-network, version 0.3.1).
        let mut plugin = doc;
        let version = plugin
            .get("cniVersion")
            .cloned()
            .unwrap_or_else(|| json!("0.3.1"));
        if let Some(o) = plugin.as_object_mut() {
            o.remove("cniVersion");
        }
        (
            json!({"name": "k8s-pod-network", "cniVersion": version, "plugins": [plugin]}),
            primary.with_extension("conflist"),
        )
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("no \"plugins\" list".into()))?;
    let ours = entry(cfg);
    let already = plugins.last() == Some(&ours)
        && plugins.iter().filter(|p| is_capture_entry(p)).count() == 1;
    if already && target == primary {
        return Ok(None);
    }
    plugins.retain(|p| !is_capture_entry(p));
    plugins.push(ours);
    let out = serde_json::to_string_pretty(&list).map_err(|e| bad(e.to_string()))?;
    write_preserving_mode(&primary, &target, out.as_bytes())?;
    if target != primary {
        let _ = std::fs::remove_file(&primary);
    }
    Ok(Some(target))
}

fn is_capture_entry(p: &Value) -> bool {
    matches!(
        p.get("type").and_then(Value::as_str),
        Some(PLUGIN_TYPE) | Some(ISTIO_TYPE)
    )
}

/// Our conflist entry (no `cniVersion`: the list's applies).
pub fn entry(cfg: &InstallConfig) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(PLUGIN_TYPE));
    m.insert("type".into(), json!(PLUGIN_TYPE));
    m.insert(
        "cni_agent_run_dir".into(),
        json!(cfg.run_dir.to_string_lossy()),
    );
    m.insert("exclude_namespaces".into(), json!(cfg.exclude_namespaces));
    m.insert("pod_namespace".into(), json!(cfg.pod_namespace));
    m.insert("ambient_enabled".into(), json!(true));
    Value::Object(m)
}

/// The first `.conf`/`.conflist` in lexical order, as the kubelet picks it.
fn primary_config(dir: &Path) -> Result<PathBuf, Error> {
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        what: "listing",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoPrimary(dir.to_path_buf()))
}

fn copy_binary(cfg: &InstallConfig, verified: &mut Verified) -> Result<(), Error> {
    let dst = cfg.bin_dir.join(PLUGIN_TYPE);
    let src = &cfg.plugin_binary;
    let now = || Some((stamp(src).ok()?, stamp(&dst).ok()?));
    if verified.0.is_some() && now() == verified.0 {
        return Ok(());
    }
    let new = std::fs::read(src).map_err(|source| Error::Io {
        what: "reading plugin binary",
        path: src.clone(),
        source,
    })?;
    if std::fs::read(&dst).ok().as_deref() != Some(&new[..]) {
        // A rename replaces the file even while a runtime is executing the old one.
        write_atomically_mode(&dst, &new, Some(0o755)).map_err(|source| Error::Io {
            what: "installing",
            path: dst.clone(),
            source,
        })?;
    }
    verified.0 = now();
    Ok(())
}

fn write_preserving_mode(old: &Path, new: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(old)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o644);
    write_atomically_mode(new, bytes, Some(mode)).map_err(|source| Error::Io {
        what: "replacing",
        path: new.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(primary: (&str, &str)) -> (tempfile::TempDir, InstallConfig) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["bin", "net.d"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("net.d").join(primary.0), primary.1).unwrap();
        std::fs::write(dir.path().join("plugin"), b"#!/bin/sh\n").unwrap();
        let cfg = InstallConfig {
            plugin_binary: dir.path().join("plugin"),
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            run_dir: "/var/run/istio-cni".into(),
            exclude_namespaces: vec!["kube-system".into()],
            pod_namespace: "istio-system".into(),
        };
        (dir, cfg)
    }

    #[test]
    fn a_tampered_installed_binary_or_an_upgraded_plugin_is_copied_again() {
        let (dir, cfg) = setup((
            "10-ptp.conflist",
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[]}"#,
        ));
        let installed = cfg.bin_dir.join(PLUGIN_TYPE);
        let mut v = Verified::default();
        ensure(&cfg, &mut v).unwrap();
        assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/sh\n");
        assert!(v.0.is_some(), "an identical pair is remembered");
        std::fs::write(&installed, b"someone else's").unwrap();
        ensure(&cfg, &mut v).unwrap();
        assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/sh\n");
        std::fs::write(dir.path().join("plugin"), b"#!/bin/sh\n# v2\n").unwrap();
        ensure(&cfg, &mut v).unwrap();
        assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/sh\n# v2\n");
    }

    #[test]
    fn our_entry_is_appended_once_and_replaces_istio_cni() {
        let (dir, cfg) = setup((
            "10-calico.conflist",
            r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico"},{"type":"istio-cni"},{"type":"portmap"}]}"#,
        ));
        std::fs::write(dir.path().join("net.d/99-other.conf"), "{}").unwrap();
        let written = ensure(&cfg, &mut Verified::default()).unwrap().unwrap();
        assert_eq!(written, dir.path().join("net.d/10-calico.conflist"));
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
        let types: Vec<&str> = doc["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["calico", "portmap", "meshnode-cni"]);
        assert_eq!(doc["plugins"][2]["cni_agent_run_dir"], "/var/run/istio-cni");
        assert!(dir.path().join("bin/meshnode-cni").exists());
        // Idempotent.
        assert_eq!(ensure(&cfg, &mut Verified::default()).unwrap(), None);
    }

    #[test]
    fn a_single_conf_is_wrapped_into_a_list() {
        let (dir, cfg) = setup((
            "10-bridge.conf",
            r#"{"cniVersion":"1.0.0","name":"bridge","type":"bridge"}"#,
        ));
        let written = ensure(&cfg, &mut Verified::default()).unwrap().unwrap();
        assert_eq!(written, dir.path().join("net.d/10-bridge.conflist"));
        assert!(!dir.path().join("net.d/10-bridge.conf").exists());
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!(doc["cniVersion"], "1.0.0");
        assert_eq!(doc["plugins"][0]["type"], "bridge");
        assert!(doc["plugins"][0].get("cniVersion").is_none());
        assert_eq!(doc["plugins"][1]["type"], "meshnode-cni");
    }

    #[test]
    fn missing_or_broken_primary_configs_are_reported() {
        let (dir, cfg) = setup(("10-x.conflist", "{not json"));
        assert!(matches!(
            ensure(&cfg, &mut Verified::default()),
            Err(Error::BadPrimary { .. })
        ));
        std::fs::remove_file(dir.path().join("net.d/10-x.conflist")).unwrap();
        assert!(matches!(
            ensure(&cfg, &mut Verified::default()),
            Err(Error::NoPrimary(_))
        ));
    }
}
