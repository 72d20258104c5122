//! The sandbox's network: node namespaces joined by a link with routes to each other's pod ranges (as a
//! cluster network plugin sets up real nodes), and pods wired the way the `ptp` plugin wires them, then
//! handed to `meshnode-cni` exactly as a container runtime would.
//!
//! Input: the [`Model`] and the names of namespaces to create. Output: kernel state through rtnetlink and
//! syscalls ([`crate::netsetup`]) — no `ip`, `iptables` or `nft` binary — and, per pod, the CNI result
//! `meshnode-cni` returned. Failures name the object and the step.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use serde_json::{json, Value};

use super::model::{Model, Node, Pod};
use crate::cni_exec::{Attachment, Runtime};
use crate::netns::Netns;
use crate::netsetup::{self, NETNS_RUN_DIR};
use crate::redirect::services::ServiceVip;

/// The node side of the link between nodes (every node names its end the same).
const NODE_IFNAME: &str = "eth0";
/// The pod side of its veth, as Kubernetes names it.
const POD_IFNAME: &str = "eth0";

/// Why a network step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A netlink or syscall step failed.
    #[error("{what}: {source}")]
    Setup {
        /// The step (`node1: route to 10.244.2.0/24`).
        what: String,
        /// The cause.
        source: netsetup::Error,
    },
    /// Opening or entering a namespace failed.
    #[error("{what}: {source}")]
    Netns {
        /// The namespace and step.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Programming a node's service rules failed.
    #[error("{what}: {source}")]
    Rules {
        /// The node and step.
        what: String,
        /// The cause.
        source: crate::redirect::Error,
    },
    /// The CNI plugin refused or failed.
    #[error("CNI ADD of pod {pod} through meshnode-cni: {source}")]
    Cni {
        /// `namespace/name`.
        pod: String,
        /// The plugin's error.
        source: crate::cni_exec::Error,
    },
}

/// The name of a node's network namespace.
pub fn node_netns(model: &Model, node: &str) -> String {
    format!("{}-{node}", model.name)
}

/// The name of a pod's network namespace (the "pause container" of a real runtime).
pub fn pod_netns(model: &Model, pod: &Pod) -> String {
    format!("{}-{}-{}", model.name, pod.namespace, pod.name)
}

/// Every namespace the sandbox creates, nodes first.
pub fn all_netns(model: &Model) -> Vec<String> {
    let nodes = model.nodes.iter().map(|n| node_netns(model, &n.name));
    nodes
        .chain(model.pods.iter().map(|p| pod_netns(model, p)))
        .collect()
}

/// The path of a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Opens a named namespace (shared, for [`Netns::run_on_thread`]).
pub fn open(name: &str) -> Result<Arc<Netns>, Error> {
    Netns::open(&netns_path(name))
        .map(Arc::new)
        .map_err(|source| Error::Netns {
            what: format!("opening network namespace {name}"),
            source,
        })
}

/// Runs netlink work `f` on a thread inside `ns`.
fn inside<T: Send + 'static>(
    ns: &Arc<Netns>,
    what: &str,
    f: impl FnOnce() -> Result<T, netsetup::Error> + Send + 'static,
) -> Result<T, Error> {
    ns.run_on_thread(f)
        .map_err(|source| Error::Netns {
            what: format!("{what}: entering namespace"),
            source,
        })?
        .map_err(|source| Error::Setup {
            what: what.into(),
            source,
        })
}

fn setup(what: impl Into<String>) -> impl FnOnce(netsetup::Error) -> Error {
    let what = what.into();
    move |source| Error::Setup { what, source }
}

/// Creates the node namespaces (already named in the sandbox state) and joins them: a veth between the two
/// (the "wire"), addresses from 172.18.0.0/24, forwarding on, and on each node a route to the other's pod
/// range through it.
pub fn create_nodes(model: &Model) -> Result<(), Error> {
    for n in &model.nodes {
        let name = node_netns(model, &n.name);
        netsetup::create_named_netns(&name).map_err(setup(format!("creating {name}")))?;
    }
    let [a, b] = model.nodes.as_slice() else {
        unreachable!("the sandbox has two nodes");
    };
    let (na, nb) = (
        open(&node_netns(model, &a.name))?,
        open(&node_netns(model, &b.name))?,
    );
    let peer = nb.try_clone().map_err(|source| Error::Netns {
        what: format!("opening {}", b.name),
        source,
    })?;
    inside(&na, &format!("{}: link to {}", a.name, b.name), move || {
        netsetup::create_veth(NODE_IFNAME, NODE_IFNAME, &peer)
    })?;
    for (this, other, ns) in [(a, b, &na), (b, a, &nb)] {
        let (this, other) = (this.clone(), other.clone());
        inside(
            ns,
            &format!("{}: addresses and routes", this.name),
            move || configure_node(&this, &other),
        )?;
    }
    Ok(())
}

fn configure_node(this: &Node, other: &Node) -> Result<(), netsetup::Error> {
    netsetup::set_forwarding(true, false)?;
    netsetup::disable_dad(NODE_IFNAME)?;
    netsetup::add_address(
        NODE_IFNAME,
        IpNet::V4(Ipv4Net::new(this.ip, 24).expect("24")),
    )?;
    netsetup::set_up(NODE_IFNAME)?;
    netsetup::add_route(
        IpNet::V4(other.pod_cidr),
        Some(IpAddr::V4(other.ip)),
        NODE_IFNAME,
        false,
    )
}

/// Programs each node's service VIPs for pods outside the mesh (kube-proxy's part of a real cluster).
pub fn install_services(model: &Model) -> Result<(), Error> {
    let vips: Vec<ServiceVip> = model
        .services
        .iter()
        .map(|s| ServiceVip {
            vip: s.vip,
            port: s.port,
            endpoints: model
                .endpoints(s)
                .map(|p| SocketAddrV4::new(p.ip, s.port))
                .collect(),
        })
        .filter(|v| !v.endpoints.is_empty())
        .collect();
    for n in &model.nodes {
        let ns = open(&node_netns(model, &n.name))?;
        let v = vips.clone();
        let what = format!("{}: service VIPs", n.name);
        ns.run_on_thread(move || install_services_here(&v))
            .map_err(|source| Error::Netns {
                what: what.clone(),
                source,
            })?
            .map_err(|source| Error::Rules { what, source })?;
    }
    Ok(())
}

fn install_services_here(v: &[ServiceVip]) -> Result<(), crate::redirect::Error> {
    crate::redirect::services::install_services(v)
}

/// The node-side name of a pod's veth (unique per node: the pod address's last two bytes).
fn host_ifname(pod: &Pod) -> String {
    let o = pod.ip.octets();
    format!("veth{}x{}", o[2], o[3])
}

/// Creates the pod's namespace and wires it as `ptp` does: a veth with `eth0` inside holding the pod's
/// address as a /32, a link route to the gateway and a default route through it; on the node, the gateway
/// address on the host end and a /32 route to the pod. Returns the CNI result such a plugin returns, for
/// the next plugin's `prevResult`.
pub fn wire_pod(model: &Model, pod: &Pod) -> Result<Value, Error> {
    let node = model.node(&pod.node).expect("pods are on known nodes");
    let name = pod_netns(model, pod);
    netsetup::create_named_netns(&name).map_err(setup(format!("creating {name}")))?;
    let pod_ns = open(&name)?;
    let node_ns = open(&node_netns(model, &node.name))?;
    let (host_if, gw, ip) = (host_ifname(pod), node.gateway(), pod.ip);
    let peer = pod_ns.try_clone().map_err(|source| Error::Netns {
        what: format!("opening {name}"),
        source,
    })?;
    let h = host_if.clone();
    inside(
        &node_ns,
        &format!("{}: veth for pod {}", node.name, pod.key()),
        move || {
            netsetup::create_veth(&h, POD_IFNAME, &peer)?;
            netsetup::disable_dad(&h)?;
            netsetup::add_address(&h, host_net(gw))?;
            netsetup::set_up(&h)?;
            netsetup::add_route(host_net(ip), None, &h, false)
        },
    )?;
    inside(&pod_ns, &format!("pod {}: eth0", pod.key()), move || {
        netsetup::disable_dad(POD_IFNAME)?;
        netsetup::add_address(POD_IFNAME, host_net(ip))?;
        netsetup::set_up(POD_IFNAME)?;
        netsetup::add_route(host_net(gw), None, POD_IFNAME, false)?;
        netsetup::add_route(
            "0.0.0.0/0".parse().expect("valid"),
            Some(gw.into()),
            POD_IFNAME,
            false,
        )
    })?;
    Ok(json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": host_if},
            {"name": POD_IFNAME, "sandbox": netns_path(&name)},
        ],
        "ips": [{"address": format!("{ip}/32"), "gateway": gw.to_string(), "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": gw.to_string()}],
        "dns": {},
    }))
}

/// Undoes [`wire_pod`]: deletes the pod's veth from the node side (which removes both ends and the node's
/// route to the pod at once: a deleted namespace's interfaces are cleaned up by the kernel later, and the
/// next pod given the same address needs the name now), then the pod's namespace.
pub fn unwire_pod(model: &Model, pod: &Pod) -> Result<(), Error> {
    let node_ns = open(&node_netns(model, &pod.node))?;
    let host_if = host_ifname(pod);
    inside(
        &node_ns,
        &format!("{}: veth of pod {}", pod.node, pod.key()),
        move || netsetup::delete_link(&host_if),
    )?;
    let name = pod_netns(model, pod);
    if netns_path(&name).exists() {
        netsetup::delete_named_netns(&name).map_err(setup(format!("deleting {name}")))?;
    }
    Ok(())
}

fn host_net(ip: Ipv4Addr) -> IpNet {
    IpNet::V4(Ipv4Net::new(ip, 32).expect("32 is a valid prefix"))
}

/// The conflist a node's runtime uses after wiring a pod: meshnode-cni alone, talking to that node's agent.
pub fn conflist(agent_run_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "meshnode-sandbox",
        "plugins": [{
            "type": "meshnode-cni",
            "cni_agent_run_dir": agent_run_dir,
            "exclude_namespaces": ["istio-system", "kube-system"],
        }],
    })
}

/// What the runtime passes for a pod (`CNI_ARGS` as containerd sets them).
pub fn attachment(model: &Model, pod: &Pod) -> Attachment {
    let id = format!("{}-{}", pod.namespace, pod.name);
    Attachment {
        container_id: id.clone(),
        netns: netns_path(&pod_netns(model, pod)),
        ifname: POD_IFNAME.into(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), pod.namespace.clone()),
            ("K8S_POD_NAME".into(), pod.name.clone()),
            ("K8S_POD_INFRA_CONTAINER_ID".into(), id),
            ("K8S_POD_UID".into(), pod.uid(&model.name)),
        ],
    }
}

/// CNI ADD through `meshnode-cni`, run from the node's namespace as the node's runtime would, with the
/// wiring's result as `prevResult`.
pub fn cni_add(
    model: &Model,
    pod: &Pod,
    runtime: &Runtime,
    agent_run_dir: &Path,
    prev: Value,
) -> Result<Value, Error> {
    let node_ns = open(&node_netns(model, &pod.node))?;
    let (rt, conf, att) = (
        runtime.clone(),
        conflist(agent_run_dir),
        attachment(model, pod),
    );
    node_ns
        .run_on_thread(move || rt.add_after(&conf, &att, prev))
        .map_err(|source| Error::Netns {
            what: format!("CNI ADD of {}: entering the node", pod.key()),
            source,
        })?
        .map_err(|source| Error::Cni {
            pod: pod.key(),
            source,
        })
}

/// Whether nf_tables works here: installs and removes the in-pod rule set in a throwaway namespace.
pub fn probe_nf_tables() -> Result<(), String> {
    std::thread::Builder::new()
        .name("meshnode-probe".into())
        .spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unsharing a network namespace: {e}"))?;
            let settings = crate::redirect::RuleSettings {
                ipv6: false,
                ..Default::default()
            };
            crate::redirect::install(&settings).map_err(|e| e.to_string())?;
            crate::redirect::remove().map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the probe thread panicked".to_string())?
}
