//! The sandbox's network: node namespaces joined by a link with routes to each other's pod ranges (as a
//! cluster network plugin sets up real nodes), and pods wired the way the `ptp` plugin wires them, then
//! handed to `meshnode-cni` exactly as a container runtime would.
//!
//! With two networks ([`super::model::Layout::TwoNetworks`]) the nodes do not route to each other's pod
//! ranges: each routes only the other network's east-west gateway pod (a /32), and its own gateway's
//! answers from its HBONE port (`ip rule from <gateway> ipproto tcp sport 15008 lookup 200`, table 200
//! holding the other pod range), so that the gateway can answer the other network's clients but open
//! nothing there. A pod reaches the other network only through a gateway; the control plane on node1
//! stays reachable over the link (node addresses are on it).
//!
//! Input: the [`Model`] and the names of namespaces to create. Output: kernel state through rtnetlink and
//! syscalls ([`crate::netsetup`]) — no `ip`, `iptables` or `nft` binary — and, per pod, the CNI result
//! `meshnode-cni` returned. Failures name the object and the step.

use std::io;
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
/// The node side of the link to the outside world.
const OUTSIDE_LINK_IFNAME: &str = "outside0";
/// The outside world's side of that link.
const OUTSIDE_IFNAME: &str = "eth0";
/// The pod side of its veth, as Kubernetes names it.
const POD_IFNAME: &str = "eth0";
/// Two networks: the routing table of the local east-west gateway's own packets to the other network.
const GATEWAY_TABLE: u8 = 200;
/// Two networks: the preference of the rule sending them there (before `main`, 32766).
const GATEWAY_RULE_PRIORITY: u32 = 1000;

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

/// The name of the outside world's network namespace, if the sandbox has one.
pub fn outside_netns(model: &Model) -> Option<String> {
    model
        .outside
        .as_ref()
        .map(|_| format!("{}-outside", model.name))
}

/// Every namespace the sandbox creates, nodes first, then the outside world, then pods.
pub fn all_netns(model: &Model) -> Vec<String> {
    let nodes = model.nodes.iter().map(|n| node_netns(model, &n.name));
    nodes
        .chain(outside_netns(model))
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

/// What a node routes to the other node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The other node's whole pod range (one network).
    PodRange,
    /// Two networks: the other network's gateway pod only, and the other pod range for the answers of
    /// this network's gateway pod alone (from its HBONE port; either may be missing).
    Gateways {
        remote: Option<Ipv4Addr>,
        local: Option<Ipv4Addr>,
    },
}

fn reach(model: &Model, this: &Node, other: &Node) -> Reach {
    if !model.multi_network() {
        return Reach::PodRange;
    }
    Reach::Gateways {
        remote: model.east_west_gateway_of(&other.name).map(|p| p.ip),
        local: model.east_west_gateway_of(&this.name).map(|p| p.ip),
    }
}

/// Creates the node namespaces (already named in the sandbox state) and joins them: a veth between the two
/// (the "wire"), addresses from 172.18.0.0/24, forwarding on, and on each node a route to the other's pod
/// range through it (with two networks: to the other network's gateway only, see the module header).
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
        let reach = reach(model, this, other);
        let (this, other) = (this.clone(), other.clone());
        inside(
            ns,
            &format!("{}: addresses and routes", this.name),
            move || configure_node(&this, &other, reach),
        )?;
    }
    Ok(())
}

/// Creates the outside world's namespace (already named in the sandbox state) and links it to its node as
/// the nodes are linked: a veth, the node's address on it, and in the outside world its server's address
/// and a default route back through the node. Every other node routes the outside range through that
/// node (over the node link). Nothing of the mesh runs there: it is reached as any host off the cluster.
pub fn create_outside(model: &Model) -> Result<(), Error> {
    let (Some(outside), Some(name)) = (model.outside.clone(), outside_netns(model)) else {
        return Ok(());
    };
    let via = model
        .node(&outside.node)
        .map(|n| n.ip)
        .expect("the outside world hangs off a known node");
    netsetup::create_named_netns(&name).map_err(setup(format!("creating {name}")))?;
    let out_ns = open(&name)?;
    let node_ns = open(&node_netns(model, &outside.node))?;
    let peer = out_ns.try_clone().map_err(|source| Error::Netns {
        what: format!("opening {name}"),
        source,
    })?;
    let prefix = outside.net.prefix_len();
    let (node_ip, ip) = (outside.node_ip, outside.ip);
    inside(
        &node_ns,
        &format!("{}: link to the outside world", outside.node),
        move || {
            netsetup::create_veth(OUTSIDE_LINK_IFNAME, OUTSIDE_IFNAME, &peer)?;
            netsetup::disable_dad(OUTSIDE_LINK_IFNAME)?;
            netsetup::add_address(
                OUTSIDE_LINK_IFNAME,
                IpNet::V4(Ipv4Net::new(node_ip, prefix).expect("valid prefix")),
            )?;
            netsetup::set_up(OUTSIDE_LINK_IFNAME)
        },
    )?;
    inside(&out_ns, "outside world: address and route", move || {
        netsetup::disable_dad(OUTSIDE_IFNAME)?;
        netsetup::add_address(
            OUTSIDE_IFNAME,
            IpNet::V4(Ipv4Net::new(ip, prefix).expect("valid prefix")),
        )?;
        netsetup::set_up(OUTSIDE_IFNAME)?;
        netsetup::add_route(
            "0.0.0.0/0".parse().expect("valid"),
            Some(node_ip.into()),
            OUTSIDE_IFNAME,
            false,
        )
    })?;
    for n in model.nodes.iter().filter(|n| n.name != outside.node) {
        let ns = open(&node_netns(model, &n.name))?;
        let net = outside.net;
        inside(
            &ns,
            &format!("{}: route to the outside world {net}", n.name),
            move || netsetup::add_route(IpNet::V4(net), Some(via.into()), NODE_IFNAME, false),
        )?;
    }
    Ok(())
}

fn configure_node(this: &Node, other: &Node, reach: Reach) -> Result<(), netsetup::Error> {
    netsetup::set_forwarding(true, false)?;
    netsetup::disable_dad(NODE_IFNAME)?;
    netsetup::add_address(
        NODE_IFNAME,
        IpNet::V4(Ipv4Net::new(this.ip, 24).expect("24")),
    )?;
    netsetup::set_up(NODE_IFNAME)?;
    let via = Some(IpAddr::V4(other.ip));
    match reach {
        Reach::PodRange => netsetup::add_route(IpNet::V4(other.pod_cidr), via, NODE_IFNAME, false),
        Reach::Gateways { remote, local } => {
            if let Some(remote) = remote {
                netsetup::add_route(host_net(remote), via, NODE_IFNAME, false)?;
            }
            if let Some(local) = local {
                add_table_route(other.pod_cidr, other.ip, NODE_IFNAME, GATEWAY_TABLE)?;
                add_source_rule(
                    local,
                    super::model::GATEWAY_HBONE_PORT,
                    GATEWAY_TABLE,
                    GATEWAY_RULE_PRIORITY,
                )?;
            }
            Ok(())
        }
    }
}

/// `ip rule add from SRC/32 ipproto tcp sport SPORT lookup TABLE pref PRIORITY`, in the calling thread's
/// namespace.
fn add_source_rule(
    src: Ipv4Addr,
    sport: u16,
    table: u8,
    priority: u32,
) -> Result<(), netsetup::Error> {
    use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
    let mut msg = RuleMessage::default();
    msg.header.family = netlink_packet_route::AddressFamily::Inet;
    msg.header.src_len = 32;
    msg.header.table = table;
    msg.header.action = RuleAction::ToTable;
    msg.attributes.extend([
        RuleAttribute::Source(IpAddr::V4(src)),
        RuleAttribute::IpProtocol(netlink_packet_route::IpProtocol::Tcp),
        RuleAttribute::SourcePortRange(RulePortRange {
            start: sport,
            end: sport,
        }),
        RuleAttribute::Priority(priority),
        RuleAttribute::Table(u32::from(table)),
    ]);
    rtnetlink(
        "adding rule",
        &format!("from {src} ipproto tcp sport {sport} lookup {table}"),
        netlink_packet_route::RouteNetlinkMessage::NewRule(msg),
    )
}

/// `ip route replace DST via VIA dev DEV table TABLE`, in the calling thread's namespace.
fn add_table_route(
    dst: Ipv4Net,
    via: Ipv4Addr,
    dev: &str,
    table: u8,
) -> Result<(), netsetup::Error> {
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
    };
    const OP: &str = "adding route";
    let object = format!("{dst} via {via} dev {dev} table {table}");
    let index = nix::net::if_::if_nametoindex(dev)
        .map_err(|e| netsetup::Error::from_errno(OP, object.clone(), e))?;
    let mut msg = RouteMessage::default();
    msg.header.address_family = netlink_packet_route::AddressFamily::Inet;
    msg.header.destination_prefix_length = dst.prefix_len();
    msg.header.table = table;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    msg.attributes.extend([
        RouteAttribute::Destination(RouteAddress::Inet(dst.network())),
        RouteAttribute::Gateway(RouteAddress::Inet(via)),
        RouteAttribute::Oif(index),
        RouteAttribute::Table(u32::from(table)),
    ]);
    rtnetlink(
        OP,
        &object,
        netlink_packet_route::RouteNetlinkMessage::NewRoute(msg),
    )
}

/// Sends one rtnetlink request (create or replace) and waits for its acknowledgement.
fn rtnetlink(
    op: &'static str,
    object: &str,
    msg: netlink_packet_route::RouteNetlinkMessage,
) -> Result<(), netsetup::Error> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
        NLM_F_REQUEST,
    };
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    const SEQ: u32 = 1;
    let failed = |e: io::Error| match e.raw_os_error() {
        Some(raw) => netsetup::Error::from_errno(op, object, nix::errno::Errno::from_raw(raw)),
        None => netsetup::Error::Protocol {
            op,
            object: object.into(),
            reason: e.to_string(),
        },
    };
    let protocol = |reason: String| netsetup::Error::Protocol {
        op,
        object: object.into(),
        reason,
    };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(failed)?;
    socket.bind_auto().map_err(failed)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(failed)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    header.sequence_number = SEQ;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0).map_err(failed)?;
    let mut buf = vec![0u8; 32 * 1024];
    // A fresh unicast socket gets only the answer; bounded all the same.
    for _ in 0..64 {
        let size = socket.recv(&mut &mut buf[..], 0).map_err(failed)?;
        if size == 0 {
            return Err(protocol("rtnetlink socket closed before the ack".into()));
        }
        let mut offset = 0;
        while offset < size {
            let reply = NetlinkMessage::<netlink_packet_route::RouteNetlinkMessage>::deserialize(
                &buf[offset..size],
            )
            .map_err(|e| protocol(format!("undecodable reply: {e}")))?;
            let len = reply.header.length as usize;
            if reply.header.sequence_number == SEQ {
                if let NetlinkPayload::Error(e) = reply.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(netsetup::Error::from_errno(
                            op,
                            object,
                            nix::errno::Errno::from_raw(-code.get()),
                        )),
                    };
                }
            }
            if len == 0 {
                return Err(protocol("zero-length netlink message".into()));
            }
            offset += (len + 3) & !3;
        }
    }
    Err(protocol("no acknowledgement".into()))
}

/// Programs each node's service VIPs for pods outside the mesh (kube-proxy's part of a real cluster). With
/// two networks, a node's VIPs lead to the endpoints of its own network only (its kube-proxy knows no
/// other: a pod outside the mesh cannot cross networks).
pub fn install_services(model: &Model) -> Result<(), Error> {
    for n in &model.nodes {
        let network = model.network_of(&n.name);
        let vips: Vec<ServiceVip> = model
            .services
            .iter()
            .map(|s| ServiceVip {
                vip: s.vip,
                port: s.port,
                endpoints: model
                    .endpoints(s)
                    .filter(|p| model.network_of(&p.node) == network)
                    .map(|p| SocketAddrV4::new(p.ip, s.port))
                    .collect(),
            })
            .filter(|v| !v.endpoints.is_empty())
            .collect();
        let ns = open(&node_netns(model, &n.name))?;
        let what = format!("{}: service VIPs", n.name);
        ns.run_on_thread(move || install_services_here(&vips))
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
