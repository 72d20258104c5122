//! The control plane's mesh file: namespaces, workloads (pods), services, policies, Kubernetes objects and CA
//! tokens, written the way a user thinks of them (labels and selectors, not xDS resources).
//!
//! Input: YAML text (camelCase keys, unknown keys refused). Output: a [`MeshConfig`] whose own fields are
//! checked ([`MeshConfig::check_fields`]), or an [`Error`] naming the field (`workloads[2].ips[0]`,
//! `services[0].ports[1].port`, ...). This module is the format only: `validate.rs` holds the entry points
//! (`MeshConfig::parse`, `load`, `validate`), which also run the translation of the `istio:` objects
//! (`istio.rs`, `topology.rs`, `waypoints.rs`, `service_entries.rs`) so that a bad object refuses the
//! file; `translate.rs` turns it into the resources istiod would send.
//!
//! ```yaml
//! trustDomain: cluster.local          # optional (default cluster.local)
//! clusterId: Kubernetes               # optional (default Kubernetes, as istiod's)
//! clusterDomain: cluster.local        # optional: service hostnames are <name>.<ns>.svc.<clusterDomain>
//! nodes:                              # optional: node labels give the locality of their pods (topology.rs)
//!   node-1: {labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z1,
//!                     topology.istio.io/subzone: s1}}
//! namespaces:
//!   default: {labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
//!   test: {labels: {topology.istio.io/network: network2}}   # optional: its pods' network (topology.rs)
//!   istio-system: {}
//! workloads:
//! - {name: productpage-v1, namespace: default, serviceAccount: productpage, ips: [10.1.0.5], node: node-1,
//!    labels: {app: productpage, version: v1}}
//! - {name: waypoint-0, namespace: default, serviceAccount: waypoint, ips: [10.1.0.9], node: node-1,
//!    labels: {gateway.networking.k8s.io/gateway-name: waypoint}}    # the waypoint Gateway's instance
//! - {name: ratings-v1, namespace: default, ips: [10.2.0.5], node: node-2, network: network2}  # or the
//!                                     # label topology.istio.io/network; default: its namespace's, else ""
//! - {name: eastwest-0, namespace: istio-system, serviceAccount: istio-eastwestgateway, ips: [10.2.0.100],
//!    node: node-2, labels: {gateway.networking.k8s.io/gateway-name: istio-eastwestgateway,
//!    istio.io/dataplane-mode: none}}  # the east-west Gateway's instance (on its Gateway's network)
//! services:
//! - {name: productpage, namespace: default, vips: [10.96.0.10], selector: {app: productpage},
//!    labels: {istio.io/use-waypoint: none},                          # optional: Service labels
//!    ports: [{port: 9080, targetPort: 9080, name: http, appProtocol: http}]}   # name, appProtocol optional
//! policies: []                        # ztunnel's local-config policy format
//! rootNamespace: istio-system         # optional: istiod's root namespace (mesh-wide Istio policies; its
//!                                     # topology.istio.io/network label is the default network)
//! istio:                              # Kubernetes objects: Istio security (istio.rs), ambient L7
//! - apiVersion: gateway.networking.k8s.io/v1   # (waypoints.rs), ServiceEntry (service_entries.rs), and
//!   kind: Gateway                              # each network's east-west gateway (topology.rs)
//!   metadata: {name: istio-eastwestgateway, namespace: istio-system, labels: {topology.istio.io/network: network2}}
//!   spec:
//!     gatewayClassName: istio-east-west
//!     listeners: [{name: mesh, port: 15008, protocol: HBONE,
//!                  tls: {mode: Terminate, options: {gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL}}}]
//! tokens:                             # who may use the CA and xDS (tokens.rs)
//! - {token: node-1-secret, nodeProxy: true, node: node-1}
//! - {tokenSha256: 5e88…(64 hex digits), namespace: default, serviceAccount: sleep, expires: 2027-01-31T00:00:00Z}
//! - {token: waypoint-secret, namespace: default, serviceAccount: waypoint}   # a waypoint's: xDS too
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::objects::IstioObject;
pub use super::objects::Labels;
use crate::authz::Policy;
use crate::identity::ca_server::token::TokenDigest;
use crate::identity::Identity;

/// istiod's default root namespace (mesh config `rootNamespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Largest mesh file accepted (a few thousand workloads fit in well under this).
pub use crate::file_watch::MAX_FILE_BYTES;

/// Why a mesh file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("reading mesh config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("mesh config {} is larger than the {max} bytes accepted", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// The YAML does not match the format (the message names the field path and line).
    #[error("mesh config is invalid: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A field holds a value that cannot be used.
    #[error("mesh config: {field}: {reason}")]
    Invalid {
        /// Path of the field, e.g. `workloads[2].ips[0]`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The policies are invalid.
    #[error("mesh config: policies: {0}")]
    Policy(#[from] crate::authz::Error),
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    /// SPIFFE trust domain of every workload.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Cluster id: the first part of workload uids and `Workload.cluster_id`.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// DNS domain of service hostnames (`<name>.<namespace>.svc.<clusterDomain>`).
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Namespaces by name. Workloads and services must be in a listed namespace.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceSpec>,
    /// Kubernetes nodes by name: their labels give the locality of the pods on them.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeSpec>,
    /// Pods.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Kubernetes-style services (selector-based).
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// L4 authorization policies, in ztunnel's local-config format.
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Bearer tokens accepted by the CA and xDS.
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    /// istiod's root namespace: its AuthorizationPolicies without selector are global, its
    /// PeerAuthentication without selector is mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Kubernetes objects as users write them: Istio's `AuthorizationPolicy`, `PeerAuthentication`,
    /// `VirtualService`, `DestinationRule`, Gateway API's `Gateway` (waypoints) and `HTTPRoute`.
    #[serde(default)]
    pub istio: Vec<IstioObject>,
    /// istiod's `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`: each pod bound to a waypoint (its own, or that of a
    /// Service it backs) also lists a synthetic ALLOW for the waypoint's identities, so that L4 ALLOW
    /// policies at the pod do not shut the waypoint out. Off by default, as in Istio.
    #[serde(default)]
    pub auto_allow_waypoint_policy: bool,
}

fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.into()
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_cluster_domain() -> String {
    // Kubernetes' default, and ztunnel's `CLUSTER_DOMAIN` default.
    "cluster.local".into()
}

fn default_cluster_id() -> String {
    // istiod's default cluster id, and ztunnel's default `CLUSTER_ID`.
    "Kubernetes".into()
}

/// A namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Its labels (`istio.io/dataplane-mode: ambient` enrolls its pods).
    #[serde(default)]
    pub labels: Labels,
}

/// A Kubernetes node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// Its labels: `topology.kubernetes.io/region`, `topology.kubernetes.io/zone` and
    /// `topology.istio.io/subzone` are the locality of its pods.
    #[serde(default)]
    pub labels: Labels,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Service account (default `default`).
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// The node the pod runs on (its labels in `nodes` give the pod's locality).
    #[serde(default)]
    pub node: String,
    /// Network. Empty: the pod label `topology.istio.io/network`, else (an east-west gateway's instance)
    /// its Gateway's, else its namespace's label, else the root namespace's, else `""` (`topology.rs`).
    #[serde(default)]
    pub network: String,
    /// Pod labels: enrollment, service selection, canonical name and revision.
    #[serde(default)]
    pub labels: Labels,
    /// Keys (`namespace/name`) of `WorkloadSelector` policies that apply to this pod.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
}

fn default_service_account() -> String {
    "default".into()
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// Cluster IPs (none: headless).
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Pods of the same namespace whose labels contain all of these back the service. Empty: no pods (a
    /// Kubernetes service without selector).
    #[serde(default)]
    pub selector: Labels,
    /// The Service's own labels (`istio.io/use-waypoint`, `istio.io/use-waypoint-namespace`).
    #[serde(default)]
    pub labels: Labels,
    /// Kubernetes `internalTrafficPolicy`: `Local` keeps traffic on the client's node.
    #[serde(default)]
    pub internal_traffic_policy: Option<InternalTrafficPolicy>,
    /// Kubernetes `trafficDistribution`: `PreferClose` (or its newer name `PreferSameZone`) prefers
    /// endpoints near the client, failing over outward.
    #[serde(default)]
    pub traffic_distribution: Option<TrafficDistribution>,
}

/// [`ServiceSpec::internal_traffic_policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InternalTrafficPolicy {
    /// Any endpoint (Kubernetes' default).
    Cluster,
    /// Only endpoints on the client's node.
    Local,
}

/// [`ServiceSpec::traffic_distribution`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TrafficDistribution {
    /// The nearest endpoints by network, region, zone and subzone.
    PreferClose,
    /// Kubernetes 1.34's name for `PreferClose`.
    PreferSameZone,
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    /// The service port.
    pub port: u16,
    /// The pod port (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// Port name: its prefix (`http-web`) names the protocol when `appProtocol` does not.
    #[serde(default)]
    pub name: String,
    /// Kubernetes `appProtocol` (`http`, `http2`, `grpc`, `tcp`, `kubernetes.io/h2c`, ...).
    #[serde(default)]
    pub app_protocol: Option<String>,
}

impl PortSpec {
    /// The pod port.
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }

    /// The protocol as Istio infers it (`ConvertProtocol`): `appProtocol` if given, else the port name's
    /// prefix before the first `-`; unknown names leave it unknown (sniffed), except the well-known TCP
    /// ports (SMTP, DNS, MySQL, MongoDB).
    pub fn protocol(&self) -> PortProtocol {
        let name = self.app_protocol.as_deref().unwrap_or(&self.name);
        match name {
            "kubernetes.io/h2c" => return PortProtocol::Http2,
            "kubernetes.io/ws" => return PortProtocol::Http,
            "kubernetes.io/wss" => return PortProtocol::Tls,
            _ => {}
        }
        if name.len() >= 8 && name[..8].eq_ignore_ascii_case("grpc-web") {
            return PortProtocol::Http;
        }
        let prefix = name.split('-').next().unwrap_or("").to_ascii_lowercase();
        match prefix.as_str() {
            "http" => PortProtocol::Http,
            "http2" => PortProtocol::Http2,
            "grpc" => PortProtocol::Grpc,
            "https" | "tls" => PortProtocol::Tls,
            "tcp" | "mongo" | "redis" | "mysql" => PortProtocol::Tcp,
            _ if [25, 53, 3306, 27017].contains(&self.port) => PortProtocol::Tcp,
            _ => PortProtocol::Unknown,
        }
    }
}

/// A service port's protocol, as far as the control plane knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// Not declared: sniffed.
    Unknown,
    /// HTTP/1.1 (or WebSocket, gRPC-Web).
    Http,
    /// HTTP/2 without TLS.
    Http2,
    /// gRPC.
    Grpc,
    /// TLS the mesh does not terminate (opaque bytes).
    Tls,
    /// Opaque TCP.
    Tcp,
}

/// A bearer token the control plane accepts (for the CA and, for node proxies, xDS), and what it may ask for.
/// Only the token's SHA-256 is kept: the file may hold the clear `token` or its `tokenSha256`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "TokenEntry")]
pub struct TokenSpec {
    /// SHA-256 of the token sent in `authorization: Bearer <token>`.
    pub digest: TokenDigest,
    /// A node proxy's token: may hold xDS streams and ask for the identities of pods on its `node`
    /// (`ImpersonatedIdentity`).
    pub node_proxy: bool,
    /// For a node proxy: the node whose pods it may ask for. Empty: none (xDS only).
    pub node: String,
    /// The token holder's own identity's namespace (required for a workload token; optional for a
    /// node proxy, e.g. `istio-system`).
    pub namespace: String,
    /// The token holder's own identity's service account (with `namespace`).
    pub service_account: String,
    /// When the token stops being accepted (RFC 3339, e.g. `2027-01-31T00:00:00Z`). None: never.
    pub expires: Option<time::OffsetDateTime>,
}

impl TokenSpec {
    /// The identity the holder gets without `ImpersonatedIdentity` metadata, if it has one.
    pub fn own_identity(&self, trust_domain: &str) -> Option<Identity> {
        if self.namespace.is_empty() || self.service_account.is_empty() {
            return None;
        }
        Identity::new(trust_domain, &self.namespace, &self.service_account).ok()
    }
}

/// A token entry as written in the file.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenEntry {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    node_proxy: bool,
    #[serde(default)]
    node: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    expires: Option<String>,
}

impl TryFrom<TokenEntry> for TokenSpec {
    type Error = String;

    fn try_from(e: TokenEntry) -> Result<TokenSpec, String> {
        let digest = match (&e.token, &e.token_sha256) {
            (Some(_), Some(_)) => return Err("give token or tokenSha256, not both".into()),
            (None, None) => return Err("needs token (or tokenSha256)".into()),
            (Some(t), None) if t.is_empty() => return Err("token must not be empty".into()),
            (Some(t), None) => TokenDigest::of(t),
            (None, Some(h)) => TokenDigest::from_hex(h).map_err(|r| format!("tokenSha256 {r}"))?,
        };
        let expires = e
            .expires
            .as_deref()
            .map(|s| {
                time::OffsetDateTime::parse(
                    s.trim(),
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|err| {
                    format!(
                        "expires {s:?} is not an RFC 3339 time like 2027-01-31T00:00:00Z: {err}"
                    )
                })
            })
            .transpose()?;
        Ok(TokenSpec {
            digest,
            node_proxy: e.node_proxy,
            node: e.node,
            namespace: e.namespace,
            service_account: e.service_account,
            expires,
        })
    }
}

impl MeshConfig {
    /// Reads YAML text into a config, checking only what serde checks (the format). An empty text is an
    /// empty mesh. [`MeshConfig::parse`] is this plus [`MeshConfig::validate`].
    pub fn from_yaml(yaml: &str) -> Result<MeshConfig, Error> {
        if yaml.trim().is_empty() {
            return Ok(MeshConfig {
                trust_domain: default_trust_domain(),
                cluster_id: default_cluster_id(),
                cluster_domain: default_cluster_domain(),
                root_namespace: default_root_namespace(),
                ..MeshConfig::default()
            });
        }
        Ok(serde_yaml::from_str(yaml)?)
    }

    /// Checks this module's own fields: names, references to namespaces, duplicates, identities, tokens.
    /// The `istio:` objects, the policy keys pods name and pod IPs (unique per network, which the
    /// `istio:` objects may decide: `topology.rs`) are checked by [`MeshConfig::validate`].
    pub fn check_fields(&self) -> Result<(), Error> {
        let invalid = |field: String, reason: String| Error::Invalid { field, reason };
        if self.trust_domain.is_empty() {
            return Err(invalid("trustDomain".into(), "must not be empty".into()));
        }
        if self.cluster_id.is_empty() || self.cluster_id.contains('/') {
            return Err(invalid(
                "clusterId".into(),
                "must be non-empty and contain no '/'".into(),
            ));
        }
        if self.cluster_domain.is_empty() {
            return Err(invalid("clusterDomain".into(), "must not be empty".into()));
        }
        check_name(&self.root_namespace).map_err(|r| invalid("rootNamespace".into(), r))?;
        for name in self.namespaces.keys() {
            check_name(name).map_err(|r| invalid(format!("namespaces.{name}"), r))?;
        }
        for name in self.nodes.keys() {
            check_name(name).map_err(|r| invalid(format!("nodes.{name}"), r))?;
        }
        let mut pods = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |f: &str| format!("workloads[{i}].{f}");
            check_name(&w.name).map_err(|r| invalid(at("name"), r))?;
            self.check_namespace(&w.namespace, &at("namespace"))?;
            Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| invalid(at("serviceAccount"), e.to_string()))?;
            if w.ips.is_empty() {
                return Err(invalid(at("ips"), "a pod needs at least one IP".into()));
            }
            if let Some(j) = pods.insert((&w.namespace, &w.name), i) {
                return Err(invalid(
                    at("name"),
                    format!("pod {}/{} is also workloads[{j}]", w.namespace, w.name),
                ));
            }
        }
        let mut services = HashMap::new();
        let mut vips: HashMap<IpAddr, usize> = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = |f: &str| format!("services[{i}].{f}");
            check_name(&s.name).map_err(|r| invalid(at("name"), r))?;
            self.check_namespace(&s.namespace, &at("namespace"))?;
            if let Some(j) = services.insert((&s.namespace, &s.name), i) {
                return Err(invalid(
                    at("name"),
                    format!("service {}/{} is also services[{j}]", s.namespace, s.name),
                ));
            }
            for (k, vip) in s.vips.iter().enumerate() {
                if let Some(j) = vips.insert(*vip, i) {
                    return Err(invalid(
                        at(&format!("vips[{k}]")),
                        format!("{vip} is also a VIP of services[{j}]"),
                    ));
                }
            }
            let mut seen = HashMap::new();
            for (k, p) in s.ports.iter().enumerate() {
                if p.port == 0 {
                    return Err(invalid(
                        at(&format!("ports[{k}].port")),
                        "must not be 0".into(),
                    ));
                }
                if p.target_port == Some(0) {
                    return Err(invalid(
                        at(&format!("ports[{k}].targetPort")),
                        "must not be 0".into(),
                    ));
                }
                if let Some(j) = seen.insert(p.port, k) {
                    return Err(invalid(
                        at(&format!("ports[{k}].port")),
                        format!("port {} is also ports[{j}]", p.port),
                    ));
                }
            }
        }
        let mut tokens: Vec<&TokenDigest> = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let at = |f: &str| format!("tokens[{i}].{f}");
            if let Some(j) = tokens.iter().position(|d| d.matches(&t.digest)) {
                return Err(invalid(at("token"), format!("same token as tokens[{j}]")));
            }
            tokens.push(&t.digest);
            if t.namespace.is_empty() != t.service_account.is_empty() {
                return Err(invalid(
                    at("serviceAccount"),
                    "namespace and serviceAccount go together".into(),
                ));
            }
            if !t.node_proxy {
                if !t.node.is_empty() {
                    return Err(invalid(at("node"), "only for nodeProxy tokens".into()));
                }
                if t.namespace.is_empty() {
                    return Err(invalid(
                        at("serviceAccount"),
                        "a workload token needs namespace and serviceAccount".into(),
                    ));
                }
            }
            if !t.namespace.is_empty() {
                Identity::new(&self.trust_domain, &t.namespace, &t.service_account)
                    .map_err(|e| invalid(at("serviceAccount"), e.to_string()))?;
            }
        }
        Ok(())
    }

    fn check_namespace(&self, ns: &str, field: &str) -> Result<(), Error> {
        if self.namespaces.contains_key(ns) {
            Ok(())
        } else {
            Err(Error::Invalid {
                field: field.to_string(),
                reason: format!("namespace {ns:?} is not listed under namespaces"),
            })
        }
    }
}

/// istiod's workload uid of a pod (`generatePodUID`), its xDS resource name.
pub fn pod_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{name}")
}

impl MeshConfig {
    /// A service's fully qualified hostname, `<name>.<namespace>.svc.<clusterDomain>`.
    pub fn service_hostname(&self, namespace: &str, name: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.cluster_domain)
    }
}

/// Kubernetes object names: DNS-1123 labels/subdomains, lower case.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (lower-case letters, digits, '-', '.')"
        ))
    }
}

/// Reads `path`, refusing files over [`MAX_FILE_BYTES`].
pub fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            max: MAX_FILE_BYTES,
        });
    }
    Ok(bytes)
}
