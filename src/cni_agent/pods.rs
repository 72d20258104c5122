//! The agent's record of the pods it has seen, persisted so a restarted agent restores every pod.
//!
//! Input: pods from CNI ADD events (name, uid, netns path, IPs) and the enrollment outcome. Output: the
//! records, and the file `<run_dir>/meshnode-pods.json` rewritten atomically and durably after every change
//! ([`crate::file_watch::write_atomically`]: temp file, fsync, rename, fsync of the directory; no fsync when the run directory is on
//! tmpfs/ramfs, where it makes nothing durable). The run
//! directory is normally on tmpfs (`/var/run`), so the file lives exactly as long as the netns paths it
//! names: across agent restarts, not across node reboots; on a disk-backed run dir it survives power loss.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a pod stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Enrollment {
    /// Seen, not captured.
    NotEnrolled,
    /// Rules are in the pod but no proxy has acknowledged it: its traffic is blocked (fail closed).
    Pending,
    /// Rules in place and a proxy serves it.
    Enabled,
}

impl Enrollment {
    /// Whether the pod's netns carries our rules.
    pub fn captured(self) -> bool {
        self != Enrollment::NotEnrolled
    }
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// Pod uid (the ZDS uid).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account the proxy acts as.
    pub service_account: String,
    /// Netns path as the runtime gave it (`CNI_NETNS`), or `/proc/<pid>/ns/net` for pods found running.
    pub netns: String,
    /// `CNI_CONTAINERID` of the sandbox.
    #[serde(default)]
    pub container_id: String,
    /// Pod IPs.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Enrollment state.
    pub state: Enrollment,
    /// The network namespace's identity when the agent first opened it (nsfs device and inode): every
    /// later open by path must find the same namespace, or the path now names another one (a reused pid).
    #[serde(default)]
    pub netns_id: Option<NetnsKey>,
    /// The pod's own rule settings (from its annotations), so a restart re-programs it as it was.
    #[serde(default)]
    pub settings: PodSettings,
    /// The AWS branch-ENI probe rules added in the node's netns for this pod's IPs, kept so they can be
    /// taken out after the pod's veth and aws-vpc-cni's rules are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branch_eni: Vec<(IpAddr, crate::redirect::branch_eni::BranchEni)>,
}

/// A network namespace's identity as recorded (see [`crate::netns::NetnsId`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsKey {
    /// nsfs device.
    pub dev: u64,
    /// nsfs inode.
    pub ino: u64,
}

impl From<crate::netns::NetnsId> for NetnsKey {
    fn from(id: crate::netns::NetnsId) -> Self {
        NetnsKey {
            dev: id.dev,
            ino: id.ino,
        }
    }
}

/// Per-pod adjustments of the agent's rule settings, from the pod's annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// `ambient.istio.io/dns-capture`: overrides the agent's DNS capture switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_capture: Option<bool>,
    /// `ambient.istio.io/bypass-inbound-capture`.
    #[serde(default)]
    pub bypass_inbound: bool,
    /// `istio.io/reroute-virtual-interfaces`: interfaces whose incoming TCP is the pod's outbound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reroute_interfaces: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    pods: Vec<PodRecord>,
}

/// The records, by uid.
#[derive(Debug, Default)]
pub struct Pods {
    records: BTreeMap<String, PodRecord>,
    file: Option<PathBuf>,
}

impl Pods {
    /// Loads `file` (missing: empty). An unreadable file is reported, not fatal: the agent starts empty
    /// and the caller logs it.
    pub fn load(file: PathBuf) -> (Pods, Option<String>) {
        let mut pods = Pods {
            records: BTreeMap::new(),
            file: Some(file.clone()),
        };
        match std::fs::read(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (pods, None),
            Err(e) => (pods, Some(format!("reading {}: {e}", file.display()))),
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(state) => {
                    for r in state.pods {
                        pods.records.insert(r.uid.clone(), r);
                    }
                    (pods, None)
                }
                Err(e) => (pods, Some(format!("{} is not valid: {e}", file.display()))),
            },
        }
    }

    /// An in-memory set (tests).
    pub fn in_memory() -> Pods {
        Pods::default()
    }

    /// All records.
    pub fn iter(&self) -> impl Iterator<Item = &PodRecord> {
        self.records.values()
    }

    /// The uids.
    pub fn uids(&self) -> Vec<String> {
        self.records.keys().cloned().collect()
    }

    /// The record for `uid`.
    pub fn get(&self, uid: &str) -> Option<&PodRecord> {
        self.records.get(uid)
    }

    /// The record of pod `namespace/name`, if any.
    pub fn find(&self, namespace: &str, name: &str) -> Option<&PodRecord> {
        self.records
            .values()
            .find(|r| r.namespace == namespace && r.name == name)
    }

    /// Adds or replaces a record and saves.
    pub fn put(&mut self, r: PodRecord) {
        self.records.insert(r.uid.clone(), r);
        self.save();
    }

    /// Changes a record's state and saves.
    pub fn set_state(&mut self, uid: &str, state: Enrollment) {
        if let Some(r) = self.records.get_mut(uid) {
            if r.state != state {
                r.state = state;
                self.save();
            }
        }
    }

    /// Forgets a record and saves.
    pub fn remove(&mut self, uid: &str) -> Option<PodRecord> {
        let r = self.records.remove(uid);
        if r.is_some() {
            self.save();
        }
        r
    }

    fn save(&self) {
        let Some(file) = &self.file else { return };
        let state = StateFile {
            version: 1,
            pods: self.records.values().cloned().collect(),
        };
        let bytes = match serde_json::to_vec_pretty(&state) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Never replace the last good file with an empty one.
                tracing::error!(error = %e, "cannot encode the agent's pod state; the file keeps the previous state");
                return;
            }
        };
        if let Err(e) = crate::file_watch::write_atomically(file, &bytes) {
            tracing::error!(file = %file.display(), error = %e, "cannot save the agent's pod state; a restart would lose pods");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(uid: &str, state: Enrollment) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            namespace: "default".into(),
            name: format!("pod-{uid}"),
            service_account: "default".into(),
            netns: "/var/run/netns/x".into(),
            container_id: "c1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            state,
            netns_id: Some(NetnsKey {
                dev: 4,
                ino: 4026532000,
            }),
            settings: PodSettings {
                dns_capture: Some(true),
                bypass_inbound: false,
                reroute_interfaces: vec!["k6t-eth0".into()],
            },
            branch_eni: vec![(
                "10.0.0.1".parse().unwrap(),
                crate::redirect::branch_eni::BranchEni {
                    table: 101,
                    veth: "vlan7a1b2c3d4e5".into(),
                    iif_priority: 10,
                },
            )],
        }
    }

    #[test]
    fn records_survive_a_restart_and_a_corrupt_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pods.json");
        let (mut pods, err) = Pods::load(file.clone());
        assert!(err.is_none());
        pods.put(rec("a", Enrollment::Pending));
        pods.put(rec("b", Enrollment::NotEnrolled));
        pods.set_state("a", Enrollment::Enabled);
        pods.remove("b");
        let (again, err) = Pods::load(file.clone());
        assert!(err.is_none());
        assert_eq!(again.uids(), vec!["a"]);
        assert_eq!(again.get("a").unwrap().state, Enrollment::Enabled);
        assert!(again.find("default", "pod-a").is_some());
        assert_eq!(
            again.get("a"),
            pods.get("a"),
            "netns identity and settings survive too"
        );

        std::fs::write(&file, b"{not json").unwrap();
        let (empty, err) = Pods::load(file);
        assert!(empty.uids().is_empty());
        assert!(err.unwrap().contains("not valid"));
    }
}
