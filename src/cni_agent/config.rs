//! Typed configuration of the CNI agent, built once from istio-cni's environment variables.
//!
//! Input: the environment through [`crate::config::Source`] (a map in tests). Output: [`AgentConfig`].
//! Names and defaults are istio-cni's where it has them, so the agent can take its place in an Istio
//! install; deliberate differences are commented.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use crate::config::{Error, Source};
use crate::redirect::{RedirectPorts, RuleSettings};

use super::install::InstallConfig;
use super::selector::{default_selectors, parse_selectors, Policy};

crate::config::vars::declare! { CNI_AGENT_VARS:
/// Directory of the plugin socket, the state file and the plugin's fallback hint.
CNI_AGENT_RUN_DIR = "/var/run/istio-cni";
/// Where the ZDS server listens for node proxies.
ZTUNNEL_UDS_ADDRESS = "/var/run/ztunnel/ztunnel.sock";
/// Comma-separated namespaces never enrolled.
EXCLUDE_NAMESPACES = "kube-system";
/// YAML list of `{podSelector, namespaceSelector}`.
AMBIENT_ENABLEMENT_SELECTOR = "namespace label istio.io/dataplane-mode=ambient";
/// Redirect DNS (UDP/TCP 53) to the proxy's DNS proxy (:15053 in each pod); a pod's
/// `ambient.istio.io/dns-capture` annotation overrides it.
AMBIENT_DNS_CAPTURE = "true";
/// Program IPv6 rules too.
AMBIENT_IPV6 = "true";
/// Kubelet probe SNAT address (IPv4).
HOST_PROBE_SNAT_IP = "169.254.7.127";
/// Kubelet probe SNAT address (IPv6).
HOST_PROBE_SNAT_IPV6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
/// The proxy's packet mark (must equal the proxy's `PACKET_MARK`).
PACKET_MARK = "1337";
/// This node's name (Kubernetes mode: only this node's pods are watched).
NODE_NAME = "";
/// meshnode's own: a standalone enrollment file (namespaces, pods); set, the Kubernetes API is not used.
MESHNODE_AGENT_CONFIG = "";
/// meshnode's own: prefix for netns paths from the plugin (`/host` when the agent runs in a container
/// that mounts the host's `/var/run/netns` under `/host`, as istio-cni's DaemonSet does).
MESHNODE_HOST_PREFIX = "";

/// The host's CNI conf directory as mounted in the agent's container; set, the agent installs the plugin.
MOUNTED_CNI_NET_DIR = "";
/// meshnode's own: the host's CNI bin directory as mounted (default `/host/opt/cni/bin`).
MESHNODE_CNI_BIN_DIR = "/host/opt/cni/bin";
/// meshnode's own: the plugin binary to install (default: `meshnode-cni` beside the `meshnode` binary).
MESHNODE_CNI_PLUGIN = "meshnode-cni beside meshnode";
/// The agent's own namespace.
POD_NAMESPACE = "istio-system";
/// meshnode's own: how often each captured pod's rules are read back and repaired if they drifted
/// (a Go-style duration; default 30s; `0` turns the check off).
MESHNODE_RULE_CHECK_INTERVAL = "30s";
/// istio-cni's metrics port (`GET /metrics`), default 15014.
MONITORING_PORT = "15014";
/// meshnode's own: the node proxy's hand-over socket (the same value as the proxy's). Set, the agent
/// holds the connections of a proxy that restarts with no new one beside it (`meshnode-hold.sock` in the
/// same directory) and hands them to the new one once it listens there.
MESHNODE_HANDOVER_SOCKET = "";
/// meshnode's own, as the proxy reads it: how long a moving stream's peer waits for it (Go-style
/// duration, default 10s); the agent holds a restarting proxy's connections as long.
MESHNODE_RESUME_WAIT = "10s";
/// On nodes set up for AWS security groups for pods (`net.ipv4.tcp_early_demux=0`), route kubelet
/// probes of branch-ENI pods through their veth (two host ip rules per pod IP), as istio-cni does.
AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE = "true";
}

/// Where enrollment data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSource {
    /// A local YAML file, re-read when it changes.
    File(PathBuf),
    /// The Kubernetes API (in-cluster config or KUBECONFIG), this node's pods.
    Kubernetes {
        /// The node.
        node_name: String,
    },
}

/// Everything the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Run directory: `pluginevent.sock`, `meshnode-pods.json`, `meshnode-enrollment.json`.
    pub run_dir: PathBuf,
    /// ZDS socket path.
    pub zds_path: PathBuf,
    /// Who is enrolled.
    pub policy: Policy,
    /// Rule settings for every pod (per-pod annotations adjust DNS and inbound capture).
    pub rules: RuleSettings,
    /// Enrollment data source.
    pub source: ClusterSource,
    /// Prefix for netns paths.
    pub host_prefix: PathBuf,
    /// Plugin installation on the node (when `MOUNTED_CNI_NET_DIR` is set).
    pub install: Option<InstallConfig>,
    /// Port of `GET /metrics`.
    pub monitoring_port: u16,
    /// How often each captured pod's rules are read back (zero: never).
    pub rule_check_interval: std::time::Duration,
    /// Add the AWS branch-ENI probe rules for pods that need them ([`crate::redirect::branch_eni`]).
    pub aws_branch_eni: bool,
    /// The node proxy's hand-over socket: set, a restarting proxy's connections are held
    /// ([`crate::upgrade::hold`]).
    pub handover_socket: Option<PathBuf>,
    /// How long they are held.
    pub hold_for: std::time::Duration,
}

impl AgentConfig {
    /// Reads the configuration.
    pub fn from_source(src: &dyn Source) -> Result<AgentConfig, Error> {
        let get = |k: &str| src.get(k).filter(|v| !v.trim().is_empty());
        let selectors = match get(AMBIENT_ENABLEMENT_SELECTOR) {
            Some(text) => parse_selectors(&text).map_err(|reason| Error::Invalid {
                name: AMBIENT_ENABLEMENT_SELECTOR,
                value: text.clone(),
                reason,
            })?,
            None => default_selectors(),
        };
        let exclude_namespaces = match src.get(EXCLUDE_NAMESPACES) {
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            None => vec!["kube-system".to_string()],
        };
        let bool_var = |name: &'static str, default: bool| -> Result<bool, Error> {
            match get(name).as_deref().map(str::trim) {
                None => Ok(default),
                Some(v) => parse_bool(v).ok_or_else(|| Error::Invalid {
                    name,
                    value: v.to_string(),
                    reason: "expected a boolean (true, false, 1, 0, t, f, ...)".into(),
                }),
            }
        };
        let parsed = |name: &'static str, v: &str, reason: &str| Error::Invalid {
            name,
            value: v.to_string(),
            reason: reason.to_string(),
        };
        let defaults = RuleSettings::default();
        let probe_snat_v4: Ipv4Addr = match get(HOST_PROBE_SNAT_IP) {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| parsed(HOST_PROBE_SNAT_IP, &v, "expected an IPv4 address"))?,
            None => defaults.probe_snat_v4,
        };
        let probe_snat_v6: Ipv6Addr = match get(HOST_PROBE_SNAT_IPV6) {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| parsed(HOST_PROBE_SNAT_IPV6, &v, "expected an IPv6 address"))?,
            None => defaults.probe_snat_v6,
        };
        let packet_mark: u32 = match get(PACKET_MARK) {
            Some(v) => v
                .trim()
                .parse()
                .ok()
                .filter(|m| *m != 0 && *m <= 0xfff)
                .ok_or_else(|| {
                    parsed(
                        PACKET_MARK,
                        &v,
                        "expected a number from 1 to 4095 (the capture rules match it under mask 0xfff)",
                    )
                })?,
            None => defaults.packet_mark,
        };
        let monitoring_port: u16 = match get(MONITORING_PORT) {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| parsed(MONITORING_PORT, &v, "expected a port number"))?,
            None => super::metrics::MONITORING_PORT,
        };
        let rule_check_interval = match get(MESHNODE_RULE_CHECK_INTERVAL) {
            Some(v) if v.trim() == "0" => std::time::Duration::ZERO,
            Some(v) => crate::config::duration(&v)
                .map_err(|reason| parsed(MESHNODE_RULE_CHECK_INTERVAL, &v, &reason))?,
            None => std::time::Duration::from_secs(30),
        };
        let hold_for = match get(MESHNODE_RESUME_WAIT) {
            Some(v) => crate::config::duration(&v)
                .map_err(|reason| parsed(MESHNODE_RESUME_WAIT, &v, &reason))?,
            None => std::time::Duration::from_secs(10),
        };
        let source = match get(MESHNODE_AGENT_CONFIG) {
            Some(path) => ClusterSource::File(path.into()),
            None => ClusterSource::Kubernetes {
                node_name: get(NODE_NAME).ok_or(Error::Missing {
                    name: NODE_NAME,
                    reason: "the agent watches this node's pods (or set MESHNODE_AGENT_CONFIG for standalone use)",
                })?,
            },
        };
        let run_dir: PathBuf = get(CNI_AGENT_RUN_DIR)
            .unwrap_or_else(|| "/var/run/istio-cni".into())
            .into();
        let install = get(MOUNTED_CNI_NET_DIR).map(|conf_dir| InstallConfig {
            plugin_binary: get(MESHNODE_CNI_PLUGIN)
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::current_exe()
                        .map(|p| p.with_file_name("meshnode-cni"))
                        .unwrap_or_else(|_| "/usr/local/bin/meshnode-cni".into())
                }),
            bin_dir: get(MESHNODE_CNI_BIN_DIR)
                .unwrap_or_else(|| "/host/opt/cni/bin".into())
                .into(),
            conf_dir: conf_dir.into(),
            run_dir: run_dir.clone(),
            exclude_namespaces: exclude_namespaces.clone(),
            pod_namespace: get(POD_NAMESPACE).unwrap_or_else(|| "istio-system".into()),
        });
        Ok(AgentConfig {
            run_dir,
            zds_path: get(ZTUNNEL_UDS_ADDRESS)
                .unwrap_or_else(|| crate::config::DEFAULT_INPOD_UDS.into())
                .into(),
            policy: Policy {
                selectors,
                exclude_namespaces,
            },
            rules: RuleSettings {
                packet_mark,
                ipv6: bool_var(AMBIENT_IPV6, true)?,
                // On by default, as istio-cni: the node proxy answers on :15053 in every pod.
                dns_capture: bool_var(AMBIENT_DNS_CAPTURE, true)?,
                bypass_inbound: false,
                reroute_interfaces: Vec::new(),
                probe_snat_v4,
                probe_snat_v6,
                ports: RedirectPorts::default(),
            },
            source,
            host_prefix: get(MESHNODE_HOST_PREFIX).unwrap_or_default().into(),
            install,
            monitoring_port,
            rule_check_interval,
            aws_branch_eni: bool_var(AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE, true)?,
            handover_socket: get(MESHNODE_HANDOVER_SOCKET).map(PathBuf::from),
            hold_for,
        })
    }

    /// The plugin event socket.
    pub fn plugin_socket(&self) -> PathBuf {
        self.run_dir.join("pluginevent.sock")
    }

    /// The agent's persisted pod state.
    pub fn state_file(&self) -> PathBuf {
        self.run_dir.join("meshnode-pods.json")
    }

    /// The hint the plugin reads when the agent is unreachable.
    pub fn hint_file(&self) -> PathBuf {
        self.run_dir.join("meshnode-enrollment.json")
    }
}

/// Go's `strconv.ParseBool`, as istio-cni reads its boolean variables and pod annotations:
/// `1 t T TRUE true True` and `0 f F FALSE false False`; anything else is no value.
pub(super) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn agent_help_names_every_variable_the_agent_reads_with_its_real_default() {
        crate::config::vars::testing::check(
            &[CNI_AGENT_VARS],
            CNI_AGENT_VARS,
            &[
                &[(NODE_NAME, "node-1")],
                &[
                    (MESHNODE_AGENT_CONFIG, "/etc/meshnode/agent.yaml"),
                    (MOUNTED_CNI_NET_DIR, "/host/etc/cni/net.d"),
                ],
            ],
            |src| format!("{:?}", AgentConfig::from_source(src)),
        );
    }

    #[test]
    fn defaults_follow_istio_cni() {
        let env: HashMap<&str, &str> = [(NODE_NAME, "node-1")].into();
        let c = AgentConfig::from_source(&env).unwrap();
        assert_eq!(c.run_dir, PathBuf::from("/var/run/istio-cni"));
        assert_eq!(c.zds_path, PathBuf::from("/var/run/ztunnel/ztunnel.sock"));
        assert_eq!(c.policy.exclude_namespaces, vec!["kube-system"]);
        assert_eq!(c.policy.selectors.len(), 2);
        assert!(c.rules.ipv6);
        assert!(c.rules.dns_capture);
        assert_eq!(c.rules.packet_mark, 1337);
        assert_eq!(
            c.source,
            ClusterSource::Kubernetes {
                node_name: "node-1".into()
            }
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            (AMBIENT_ENABLEMENT_SELECTOR, "- podSelector: 7"),
            (AMBIENT_IPV6, "perhaps"),
            (HOST_PROBE_SNAT_IP, "::1"),
            (PACKET_MARK, "x"),
            (PACKET_MARK, "4096"),
            (PACKET_MARK, "0"),
            (MONITORING_PORT, "70000"),
            (MESHNODE_RULE_CHECK_INTERVAL, "often"),
            (MESHNODE_RESUME_WAIT, "a while"),
        ] {
            let env: HashMap<&str, &str> = [(NODE_NAME, "n"), (k, v)].into();
            let err = AgentConfig::from_source(&env).unwrap_err().to_string();
            assert!(err.contains(k), "{err}");
        }
        let env: HashMap<&str, &str> = HashMap::new();
        let err = AgentConfig::from_source(&env).unwrap_err().to_string();
        assert!(err.contains(NODE_NAME), "{err}");
    }
}
