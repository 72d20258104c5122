//! What the sandbox cluster is made of: nodes, namespaces, pods, services and the Istio objects applied,
//! and how that becomes the files the real components read.
//!
//! Input: the built-in bookinfo layout ([`Model::bookinfo`]), changed later by `sandbox apply`. Output: the
//! control plane's mesh file ([`Model::mesh_yaml`]), each CNI agent's enrollment file ([`Model::agent_yaml`]),
//! the hosts file `sandbox exec` shows pods ([`Model::hosts_file`]). The model is saved as JSON in the
//! sandbox directory, so every `sandbox` command works from the same description.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control_plane::topology::NETWORK_LABEL;

/// Labels of a namespace or pod.
pub type Labels = BTreeMap<String, String>;

/// The label that enrolls a namespace's pods.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The port every bookinfo app listens on (bookinfo's).
pub const APP_PORT: u16 = 9080;

/// The control plane's port (istiod's).
pub const CONTROL_PLANE_PORT: u16 = 15012;

/// The namespace of the east-west gateways (Istio's `istio-system`).
pub const EAST_WEST_NAMESPACE: &str = "istio-system";

/// The east-west gateways' HBONE port (their Gateway's listener, `meshnode gateway`'s default).
pub const GATEWAY_HBONE_PORT: u16 = 15008;

/// The host the outside world's server stands in for (an external API).
pub const OUTSIDE_HOST: &str = "api.example.test";

/// The outside world's server port (plain HTTP).
pub const OUTSIDE_PORT: u16 = 80;

/// The outside world: a network namespace of its own (not a node, not a pod, not in the mesh) linked to
/// one node as the nodes are linked to each other, with an HTTP server standing in for an external API.
/// Its addresses are TEST-NET-1 (192.0.2.0/24), outside the pod and service ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outside {
    /// The node its link goes to (the others route to it through that node).
    pub node: String,
    /// The link's range.
    pub net: Ipv4Net,
    /// The node's address on the link: the outside world's default gateway.
    pub node_ip: Ipv4Addr,
    /// The server's address.
    pub ip: Ipv4Addr,
}

/// How the cluster's networks are laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Layout {
    /// Both nodes on one network (no `NETWORK`): pods reach each other directly.
    #[default]
    OneNetwork,
    /// node1's pods on `network1`, node2's on `network2`, each network with its east-west gateway pod;
    /// the nodes route to each other's gateway only.
    TwoNetworks,
}

/// A node: a network namespace with the CNI agent and the node proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node name (`node1`).
    pub name: String,
    /// Its address on the link between nodes.
    pub ip: Ipv4Addr,
    /// Pod addresses come from here; the first host address is the pods' gateway.
    pub pod_cidr: Ipv4Net,
    /// The network of its pods and its proxy (`NETWORK`); none in a one-network sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

impl Node {
    /// The pods' gateway: the node side of every pod's veth (as the `ptp` plugin does it).
    pub fn gateway(&self) -> Ipv4Addr {
        nth_host(self.pod_cidr, 1)
    }
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Labels (`app`, `version`).
    pub labels: Labels,
    /// The node it runs on.
    pub node: String,
    /// Its address, from the node's pod CIDR.
    pub ip: Ipv4Addr,
    /// The bookinfo app it runs (`productpage`, `reviews-v2`, ...), none for a client or waypoint pod.
    pub app: Option<String>,
    /// The waypoint Gateway (in its namespace) this pod is the instance of: it runs `meshnode waypoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
    /// The east-west Gateway (in its namespace) this pod is the instance of: it runs `meshnode gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub east_west: Option<String>,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its Kubernetes-style uid (stable across commands).
    pub fn uid(&self, sandbox: &str) -> String {
        format!("{sandbox}-{}-{}", self.namespace, self.name)
    }
}

/// A service with a VIP, selecting pods by label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Cluster IP.
    pub vip: Ipv4Addr,
    /// Port (the pods' port too).
    pub port: u16,
    /// Pods of the namespace carrying all these labels back it.
    pub selector: Labels,
}

/// The whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// The sandbox name: prefix of its network namespaces.
    pub name: String,
    /// Nodes, joined by one link.
    pub nodes: Vec<Node>,
    /// Namespaces and their labels.
    pub namespaces: BTreeMap<String, Labels>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Services.
    pub services: Vec<Service>,
    /// Istio objects applied (AuthorizationPolicy, PeerAuthentication) as written, in apply order.
    pub istio: Vec<Value>,
    /// Each node proxy's CA/xDS token, by node.
    pub tokens: BTreeMap<String, String>,
    /// Each waypoint's CA/xDS token (for its own identity), by its Gateway's `namespace/name`.
    #[serde(default)]
    pub waypoint_tokens: BTreeMap<String, String>,
    /// Each east-west gateway's CA/xDS token (for its own identity), by its Gateway's `namespace/name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gateway_tokens: BTreeMap<String, String>,
    /// The outside world, if this sandbox has one (a model saved before it existed has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outside: Option<Outside>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn nth_host(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

impl Model {
    /// The bookinfo layout on two nodes: productpage, details, ratings and the `test/sleep` client on node1;
    /// reviews v1, v2, v3 on node2, so calls cross nodes both ways. `default` is in the mesh, `test` is not.
    /// The outside world ([`Outside`]) hangs off node1 at 192.0.2.10.
    pub fn bookinfo(name: &str, tokens: BTreeMap<String, String>) -> Model {
        let node = |n: u8| Node {
            name: format!("node{n}"),
            ip: Ipv4Addr::new(172, 18, 0, 1 + n),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).expect("prefix 24 is valid"),
            network: None,
        };
        let nodes = vec![node(1), node(2)];
        let mut next_host: BTreeMap<String, u32> = BTreeMap::new();
        let mut pod = |name: &str,
                       ns: &str,
                       sa: &str,
                       app: Option<&str>,
                       version: Option<&str>,
                       on: &Node| {
            // .1 is the gateway; pods from .10 up.
            let n = next_host.entry(on.name.clone()).or_insert(10);
            let ip = nth_host(on.pod_cidr, *n);
            *n += 1;
            let mut l = labels(&[("app", app.map_or(sa, |a| a.split("-v").next().unwrap_or(a)))]);
            if let Some(v) = version {
                l.insert("version".into(), v.into());
            }
            Pod {
                name: name.into(),
                namespace: ns.into(),
                service_account: sa.into(),
                labels: l,
                node: on.name.clone(),
                ip,
                app: app.map(str::to_string),
                waypoint: None,
                east_west: None,
            }
        };
        let pods = vec![
            pod(
                "productpage-v1",
                "default",
                "productpage",
                Some("productpage"),
                Some("v1"),
                &nodes[0],
            ),
            pod(
                "details-v1",
                "default",
                "details",
                Some("details"),
                Some("v1"),
                &nodes[0],
            ),
            pod(
                "ratings-v1",
                "default",
                "ratings",
                Some("ratings"),
                Some("v1"),
                &nodes[0],
            ),
            pod("sleep", "test", "sleep", None, None, &nodes[0]),
            pod(
                "reviews-v1",
                "default",
                "reviews",
                Some("reviews-v1"),
                Some("v1"),
                &nodes[1],
            ),
            pod(
                "reviews-v2",
                "default",
                "reviews",
                Some("reviews-v2"),
                Some("v2"),
                &nodes[1],
            ),
            pod(
                "reviews-v3",
                "default",
                "reviews",
                Some("reviews-v3"),
                Some("v3"),
                &nodes[1],
            ),
        ];
        let service = |name: &str, last: u8, selector: &[(&str, &str)]| Service {
            name: name.into(),
            namespace: "default".into(),
            vip: Ipv4Addr::new(10, 96, 0, last),
            port: APP_PORT,
            selector: labels(selector),
        };
        let services = vec![
            service("productpage", 20, &[("app", "productpage")]),
            service("details", 21, &[("app", "details")]),
            service("reviews", 22, &[("app", "reviews")]),
            service("ratings", 23, &[("app", "ratings")]),
            // One Service per reviews version, as Istio's bookinfo-versions.yaml adds them: what
            // HTTPRoute backendRefs name to split traffic between versions.
            service("reviews-v1", 24, &[("app", "reviews"), ("version", "v1")]),
            service("reviews-v2", 25, &[("app", "reviews"), ("version", "v2")]),
            service("reviews-v3", 26, &[("app", "reviews"), ("version", "v3")]),
        ];
        let namespaces = [
            ("default", labels(&[(DATAPLANE_MODE, "ambient")])),
            ("test", Labels::new()),
            ("istio-system", Labels::new()),
        ]
        .into_iter()
        .map(|(n, l)| (n.to_string(), l))
        .collect();
        Model {
            name: name.into(),
            nodes,
            namespaces,
            pods,
            services,
            istio: Vec::new(),
            tokens,
            waypoint_tokens: BTreeMap::new(),
            gateway_tokens: BTreeMap::new(),
            outside: Some(Outside {
                node: "node1".into(),
                net: Ipv4Net::new(Ipv4Addr::new(192, 0, 2, 0), 24).expect("prefix 24 is valid"),
                node_ip: Ipv4Addr::new(192, 0, 2, 1),
                ip: Ipv4Addr::new(192, 0, 2, 10),
            }),
        }
    }

    /// The bookinfo layout of [`Model::bookinfo`] in `layout`. With [`Layout::TwoNetworks`], node1's pods
    /// are on `network1` and node2's on `network2` (the pod label `topology.istio.io/network`, as istiod
    /// reads it), and each network gets an east-west gateway as Istio's multi-network docs deploy one: a
    /// Gateway `istio-system/eastwest-<network>` of class `istio-east-west` labelled with its network, and
    /// its instance pod on that network's node (service account `istio-eastwestgateway`, labelled
    /// `gateway.networking.k8s.io/gateway-name` and `istio.io/dataplane-mode: none`) with a token for that
    /// identity. The bookinfo pods keep their addresses; the gateways take the next ones.
    pub fn bookinfo_in(name: &str, tokens: BTreeMap<String, String>, layout: Layout) -> Model {
        let mut m = Model::bookinfo(name, tokens);
        if layout == Layout::OneNetwork {
            return m;
        }
        use crate::control_plane::waypoints::GATEWAY_NAME;
        for (i, n) in m.nodes.iter_mut().enumerate() {
            n.network = Some(format!("network{}", i + 1));
        }
        let networks: BTreeMap<String, String> = m
            .nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), n.network.clone()?)))
            .collect();
        for p in &mut m.pods {
            if let Some(net) = networks.get(&p.node) {
                p.labels.insert(NETWORK_LABEL.into(), net.clone());
            }
        }
        for node in m.nodes.clone() {
            let Some(network) = node.network.clone() else {
                continue;
            };
            let gateway = format!("eastwest-{network}");
            let ip = m.free_ip(&node);
            m.pods.push(Pod {
                name: format!("{gateway}-0"),
                namespace: EAST_WEST_NAMESPACE.into(),
                service_account: crate::config::gateway::DEFAULT_GATEWAY_SERVICE_ACCOUNT.into(),
                labels: labels(&[
                    (GATEWAY_NAME, &gateway),
                    (DATAPLANE_MODE, "none"),
                    (NETWORK_LABEL, &network),
                ]),
                node: node.name.clone(),
                ip,
                app: None,
                waypoint: None,
                east_west: Some(gateway.clone()),
            });
            // As Istio's ambient multi-network docs write it (there one `istio-eastwestgateway` per
            // cluster; here both networks share one control plane, so each is named after its network).
            m.istio.push(json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {
                    "name": gateway,
                    "namespace": EAST_WEST_NAMESPACE,
                    "labels": {NETWORK_LABEL: network},
                },
                "spec": {
                    "gatewayClassName": crate::control_plane::topology::EAST_WEST_CLASS,
                    "listeners": [{
                        "name": "mesh", "port": GATEWAY_HBONE_PORT, "protocol": "HBONE",
                        "tls": {"mode": "Terminate", "options": {
                            crate::control_plane::topology::TLS_TERMINATE_MODE: "ISTIO_MUTUAL"}},
                    }],
                },
            }));
            m.gateway_tokens.insert(
                format!("{EAST_WEST_NAMESPACE}/{gateway}"),
                format!("{:032x}", rand::random::<u128>()),
            );
        }
        m
    }

    /// Whether the nodes are on networks of their own ([`Layout::TwoNetworks`]).
    pub fn multi_network(&self) -> bool {
        self.nodes.iter().any(|n| n.network.is_some())
    }

    /// The network of `node` (`""` in a one-network sandbox), as its proxy's `NETWORK` says it.
    pub fn network_of(&self, node: &str) -> &str {
        self.node(node)
            .and_then(|n| n.network.as_deref())
            .unwrap_or("")
    }

    /// The east-west gateway pod on `node`'s network, if it has one.
    pub fn east_west_gateway_of(&self, node: &str) -> Option<&Pod> {
        let network = self.node(node)?.network.as_deref()?;
        self.pods
            .iter()
            .find(|p| p.east_west.is_some() && self.network_of(&p.node) == network)
    }

    /// Where the control plane listens: the first node's address (it runs there, host-networked).
    pub fn control_plane_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(IpAddr::V4(self.nodes[0].ip), CONTROL_PLANE_PORT)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod a user means by `name`: `namespace/name`, or a pod name, or a prefix of one that is
    /// unambiguous (`productpage` for `productpage-v1`).
    pub fn find_pod(&self, name: &str) -> Result<&Pod, String> {
        let (ns, n) = match name.split_once('/') {
            Some((ns, n)) => (Some(ns), n),
            None => (None, name),
        };
        let in_ns = |p: &&Pod| ns.is_none_or(|ns| p.namespace == ns);
        if let Some(p) = self.pods.iter().filter(in_ns).find(|p| p.name == n) {
            return Ok(p);
        }
        let candidates: Vec<&Pod> = self
            .pods
            .iter()
            .filter(in_ns)
            .filter(|p| p.name.starts_with(n))
            .collect();
        match candidates.as_slice() {
            [one] => Ok(one),
            [] => Err(format!(
                "no pod {name:?}; pods: {}",
                self.pods
                    .iter()
                    .map(Pod::key)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            many => Err(format!(
                "{name:?} could be {}",
                many.iter()
                    .map(|p| p.key())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )),
        }
    }

    /// The service `name` (in any namespace; `name.namespace` to choose).
    pub fn find_service(&self, name: &str) -> Option<&Service> {
        let (n, ns) = name.split_once('.').unwrap_or((name, ""));
        self.services
            .iter()
            .find(|s| s.name == n && (ns.is_empty() || s.namespace == ns))
    }

    /// The pods backing `service`: same namespace, carrying every selector label (Kubernetes' rule).
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| {
            p.namespace == service.namespace
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| p.labels.get(k) == Some(v))
        })
    }

    /// Namespaces with their labels, as both the mesh file and the agents' files write them.
    fn namespaces_value(&self) -> serde_json::Map<String, Value> {
        self.namespaces
            .iter()
            .map(|(n, l)| (n.clone(), json!({ "labels": l })))
            .collect()
    }

    /// Whether `namespace` is labelled into the mesh.
    pub fn in_mesh(&self, namespace: &str) -> bool {
        self.namespaces
            .get(namespace)
            .and_then(|l| l.get(DATAPLANE_MODE))
            .is_some_and(|m| m == "ambient")
    }

    /// Whether `pod` is captured: its namespace is in the mesh and the pod did not opt out
    /// (`istio.io/dataplane-mode: none`, as waypoint pods do).
    pub fn captured(&self, pod: &Pod) -> bool {
        self.in_mesh(&pod.namespace)
            && pod.labels.get(DATAPLANE_MODE).map(String::as_str) != Some("none")
    }

    /// The waypoint Gateways among the applied objects (class `istio-waypoint`), as `(namespace, name)`.
    pub fn waypoint_gateways(&self) -> Vec<(String, String)> {
        self.istio
            .iter()
            .filter(|o| {
                o["kind"] == "Gateway"
                    && o["spec"]["gatewayClassName"] == crate::control_plane::istio::WAYPOINT_CLASS
            })
            .filter_map(|o| {
                let meta = &o["metadata"];
                Some((
                    meta["namespace"].as_str()?.to_string(),
                    meta["name"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// Plays Istio's gateway controller for waypoints: each waypoint Gateway gets one pod (on the first
    /// node; service account named after the Gateway; labelled `gateway.networking.k8s.io/gateway-name`
    /// and `istio.io/dataplane-mode: none`, as Istio's waypoint template labels it) and a token for that
    /// identity; the pods and tokens of Gateways that are gone are removed. Returns one line per change.
    pub fn sync_waypoints(&mut self) -> Vec<String> {
        use crate::control_plane::waypoints::GATEWAY_NAME;
        let wanted = self.waypoint_gateways();
        let mut lines = Vec::new();
        self.pods.retain(|p| {
            let keep = p
                .waypoint
                .as_ref()
                .is_none_or(|gw| wanted.contains(&(p.namespace.clone(), gw.clone())));
            if !keep {
                lines.push(format!(
                    "pod {} removed (its waypoint Gateway is gone)",
                    p.key()
                ));
            }
            keep
        });
        self.waypoint_tokens
            .retain(|key, _| wanted.iter().any(|(ns, n)| *key == format!("{ns}/{n}")));
        for (ns, gw) in wanted {
            let has_pod = self
                .pods
                .iter()
                .any(|p| p.namespace == ns && p.waypoint.as_ref() == Some(&gw));
            if !has_pod {
                let node = self.nodes[0].clone();
                let ip = self.free_ip(&node);
                let mut name = format!("{gw}-0");
                let mut n = 0;
                while self
                    .pods
                    .iter()
                    .any(|p| p.namespace == ns && p.name == name)
                {
                    n += 1;
                    name = format!("{gw}-{n}");
                }
                let mut pod_labels = labels(&[(GATEWAY_NAME, &gw), (DATAPLANE_MODE, "none")]);
                if let Some(net) = &node.network {
                    pod_labels.insert(NETWORK_LABEL.into(), net.clone());
                }
                let pod = Pod {
                    name,
                    namespace: ns.clone(),
                    service_account: gw.clone(),
                    labels: pod_labels,
                    node: node.name.clone(),
                    ip,
                    app: None,
                    waypoint: Some(gw.clone()),
                    east_west: None,
                };
                lines.push(format!(
                    "pod {} created on {} ({ip}): the waypoint of Gateway {ns}/{gw}",
                    pod.key(),
                    node.name
                ));
                self.pods.push(pod);
            }
            self.waypoint_tokens
                .entry(format!("{ns}/{gw}"))
                .or_insert_with(|| format!("{:032x}", rand::random::<u128>()));
        }
        lines
    }

    /// The next pod address on `node` after every one in use (.1 is the gateway).
    fn free_ip(&self, node: &Node) -> Ipv4Addr {
        let base = u32::from(node.pod_cidr.network());
        let last = self
            .pods
            .iter()
            .filter(|p| p.node == node.name)
            .map(|p| u32::from(p.ip) - base)
            .max()
            .unwrap_or(9);
        nth_host(node.pod_cidr, last + 1)
    }

    /// The control plane's mesh file.
    pub fn mesh_yaml(&self) -> String {
        let workloads: Vec<Value> = self
            .pods
            .iter()
            .map(|p| {
                json!({
                    "name": p.name, "namespace": p.namespace, "serviceAccount": p.service_account,
                    "ips": [p.ip], "node": p.node, "labels": p.labels,
                })
            })
            .collect();
        let services: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                json!({
                    "name": s.name, "namespace": s.namespace, "vips": [s.vip],
                    "ports": [{"port": s.port}], "selector": s.selector,
                })
            })
            .collect();
        let tokens: Vec<Value> = self
            .tokens
            .iter()
            // Only the token's hash goes into the mesh file; the clear token is in each node's token file.
            .map(|(node, token)| {
                let sha256 = crate::identity::ca_server::token::TokenDigest::of(token).to_hex();
                json!({"tokenSha256": sha256, "nodeProxy": true, "node": node})
            })
            .chain(self.waypoint_tokens.iter().map(|(gateway, token)| {
                let sha256 = crate::identity::ca_server::token::TokenDigest::of(token).to_hex();
                // The waypoint's identity: its Gateway's namespace, a service account named after it.
                let (ns, name) = gateway.split_once('/').unwrap_or(("", gateway));
                json!({"tokenSha256": sha256, "namespace": ns, "serviceAccount": name})
            }))
            .chain(self.gateway_tokens.iter().map(|(gateway, token)| {
                let sha256 = crate::identity::ca_server::token::TokenDigest::of(token).to_hex();
                // The east-west gateway's identity: its instance's service account.
                let (ns, name) = gateway.split_once('/').unwrap_or(("", gateway));
                let sa = self
                    .pods
                    .iter()
                    .find(|p| p.namespace == ns && p.east_west.as_deref() == Some(name))
                    .map_or(
                        crate::config::gateway::DEFAULT_GATEWAY_SERVICE_ACCOUNT,
                        |p| &p.service_account,
                    );
                json!({"tokenSha256": sha256, "namespace": ns, "serviceAccount": sa})
            }))
            .collect();
        to_yaml(&json!({
            "namespaces": self.namespaces_value(),
            "workloads": workloads,
            "services": services,
            "tokens": tokens,
            "istio": self.istio,
        }))
    }

    /// The CNI agent's enrollment file for `node`: every namespace, and the node's pods.
    pub fn agent_yaml(&self, node: &str) -> String {
        let pods: Vec<Value> = self
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| {
                json!({
                    "name": p.name, "namespace": p.namespace, "uid": p.uid(&self.name),
                    "serviceAccount": p.service_account, "labels": p.labels,
                })
            })
            .collect();
        to_yaml(&json!({ "namespaces": self.namespaces_value(), "pods": pods }))
    }

    /// `/etc/hosts` as `sandbox exec` shows it: localhost, every service by its short, namespaced and full
    /// names, every pod by name.
    pub fn hosts_file(&self) -> String {
        let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
        for s in &self.services {
            out += &format!(
                "{}\t{n} {n}.{ns} {n}.{ns}.svc {n}.{ns}.svc.cluster.local\n",
                s.vip,
                n = s.name,
                ns = s.namespace
            );
        }
        for p in &self.pods {
            out += &format!("{}\t{}.{}\n", p.ip, p.name, p.namespace);
        }
        out
    }
}

fn to_yaml(v: &Value) -> String {
    // Serializing a JSON value cannot fail (string keys only).
    serde_yaml::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::MeshConfig;

    fn model() -> Model {
        let tokens = [("node1", "t1"), ("node2", "t2")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Model::bookinfo("mn", tokens)
    }

    #[test]
    fn the_bookinfo_mesh_file_is_one_the_control_plane_accepts() {
        let m = model();
        let cfg = MeshConfig::parse(&m.mesh_yaml()).unwrap();
        assert_eq!(cfg.workloads.len(), 7);
        assert_eq!(
            cfg.services.len(),
            7,
            "four services and one per reviews version"
        );
        assert_eq!(cfg.tokens.len(), 2);
        let reviews: Vec<_> = cfg
            .workloads
            .iter()
            .filter(|w| w.labels.get("app").is_some_and(|a| a == "reviews"))
            .collect();
        assert_eq!(
            reviews.len(),
            3,
            "all three versions back the reviews service"
        );
        assert!(reviews.iter().all(|w| w.node == "node2"));
    }

    #[test]
    fn pods_get_distinct_addresses_from_their_node_range() {
        let m = model();
        for p in &m.pods {
            let node = m.node(&p.node).unwrap();
            assert!(node.pod_cidr.contains(&p.ip), "{} {}", p.name, p.ip);
            assert_ne!(p.ip, node.gateway());
        }
        let mut ips: Vec<_> = m.pods.iter().map(|p| p.ip).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), m.pods.len());
    }

    #[test]
    fn a_pod_is_found_by_name_prefix_or_namespace() {
        let m = model();
        assert_eq!(m.find_pod("productpage").unwrap().name, "productpage-v1");
        assert_eq!(m.find_pod("test/sleep").unwrap().name, "sleep");
        assert!(m.find_pod("reviews").unwrap_err().contains("could be"));
        assert!(m.find_pod("nope").unwrap_err().contains("pods:"));
        assert!(m.find_pod("default/sleep").is_err());
    }

    #[test]
    fn two_networks_put_each_nodes_pods_on_its_network_with_a_gateway_the_control_plane_takes() {
        use crate::control_plane::topology::Topology;
        let one = model();
        let m = Model::bookinfo_in("mn", one.tokens.clone(), Layout::TwoNetworks);
        assert!(m.multi_network() && !one.multi_network());
        // The bookinfo pods keep their addresses; each node gets a gateway pod on its network.
        for p in &one.pods {
            let q = m.find_pod(&p.key()).unwrap();
            assert_eq!((q.ip, &q.node), (p.ip, &p.node));
            assert_eq!(
                q.labels.get(NETWORK_LABEL).map(String::as_str),
                Some(m.network_of(&p.node))
            );
        }
        let cfg = MeshConfig::parse(&m.mesh_yaml()).unwrap();
        let topology = Topology::convert(&cfg).unwrap();
        assert!(topology.warnings.is_empty(), "{:?}", topology.warnings);
        for (node, network) in [("node1", "network1"), ("node2", "network2")] {
            assert_eq!(m.network_of(node), network);
            let pod = m.east_west_gateway_of(node).unwrap();
            assert_eq!(pod.node, node);
            assert_eq!(pod.namespace, EAST_WEST_NAMESPACE);
            assert!(!m.captured(pod));
            let g = topology.gateway(network).unwrap();
            assert_eq!(
                (g.address, g.hbone_port, g.address_is_instance),
                (IpAddr::V4(pod.ip), 15008, true)
            );
            assert_eq!(g.service_account, "istio-eastwestgateway");
        }
        // Each gateway's token is for its identity, which may hold an xDS stream.
        assert_eq!(m.gateway_tokens.len(), 2);
        for token in m.gateway_tokens.values() {
            let access = crate::control_plane::tokens::xds_caller(
                &cfg,
                Some(token),
                time::OffsetDateTime::now_utc(),
            )
            .unwrap()
            .unwrap()
            .access;
            assert_eq!(
                access,
                crate::control_plane::tokens::XdsAccess::EastWestGateway
            );
        }
        // The model round-trips (what `down`, `status`, `apply` and `exec` read).
        let back: Model = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        // One network: nothing of this, and the model file as before.
        assert!(one.gateway_tokens.is_empty() && one.pods.iter().all(|p| p.east_west.is_none()));
        let json = serde_json::to_string(&one).unwrap();
        assert!(
            !json.contains("network") && !json.contains("east_west"),
            "{json}"
        );
    }

    #[test]
    fn each_agent_sees_every_namespace_and_only_its_own_pods() {
        let m = model();
        let y: Value = serde_yaml::from_str(&m.agent_yaml("node2")).unwrap();
        assert_eq!(y["pods"].as_array().unwrap().len(), 3);
        assert_eq!(
            y["namespaces"]["default"]["labels"][DATAPLANE_MODE],
            "ambient"
        );
        assert!(!m.in_mesh("test"));
    }
}
