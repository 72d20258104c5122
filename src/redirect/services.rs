//! Service VIPs for clients outside the mesh, as kube-proxy's nftables mode provides them: in a node's
//! network namespace, connections to `VIP:port` arriving from its pods are DNATed to one of the service's
//! endpoints, picked at random. Only `meshnode sandbox` uses it (it plays Kubernetes there); on a real node
//! kube-proxy owns this. Traffic of pods in the mesh never gets here: their own capture rules send it to
//! the proxy before it leaves the pod.
//!
//! Input: the services ([`ServiceVip`]). Output, in the calling thread's network namespace:
//! ```text
//! table inet meshnode-services {
//!     chain prerouting {
//!         type nat hook prerouting priority dstnat; policy accept;
//!         ip daddr VIP tcp dport PORT numgen random mod 3 0 dnat ip to EP0
//!         ip daddr VIP tcp dport PORT numgen random mod 2 0 dnat ip to EP1
//!         ip daddr VIP tcp dport PORT dnat ip to EP2
//!     }
//! }
//! ```
//! (rule i takes 1/(n-i) of what reaches it: each endpoint gets 1/n). Created once, in one batch.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use super::netlink::NlSocket;
use super::nft::{Batch, ChainPlan, Expr, Hook, CMP_EQ, REG1};
use super::rules;
use super::Error;

/// The table's name.
pub const SERVICES_TABLE: &str = "meshnode-services";
const CHAIN: &str = "prerouting";
/// `priority dstnat`.
const DSTNAT: i32 = -100;
/// The second 128-bit register (the DNAT port).
const REG2: u32 = libc::NFT_REG_2 as u32;

/// A service address and the pod addresses behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceVip {
    /// Cluster IP.
    pub vip: Ipv4Addr,
    /// Service port.
    pub port: u16,
    /// Endpoints (pod IP and target port).
    pub endpoints: Vec<SocketAddrV4>,
}

fn rule(svc: &ServiceVip, ep: SocketAddrV4, share: u32) -> Vec<Expr> {
    let mut r = rules::l4proto(libc::IPPROTO_TCP).to_vec();
    r.extend(rules::addr(false, CMP_EQ, IpAddr::V4(svc.vip)));
    r.extend(rules::port(false, CMP_EQ, svc.port));
    if share > 1 {
        r.push(Expr::NumgenRandom {
            dreg: REG1,
            modulus: share,
        });
        r.push(rules::cmp(CMP_EQ, &0u32.to_ne_bytes()));
    }
    r.push(Expr::Immediate {
        dreg: REG1,
        data: ep.ip().octets().to_vec(),
    });
    r.push(Expr::Immediate {
        dreg: REG2,
        data: ep.port().to_be_bytes().to_vec(),
    });
    r.push(Expr::Dnat {
        addr_reg: REG1,
        port_reg: REG2,
    });
    r
}

/// Creates the services table in the calling thread's namespace. Fails (EEXIST) if it is already there.
pub fn install_services(services: &[ServiceVip]) -> Result<(), Error> {
    let chain = ChainPlan {
        name: CHAIN,
        hook: Some(Hook {
            kind: "nat",
            hooknum: libc::NF_INET_PRE_ROUTING as u32,
            priority: DSTNAT,
        }),
        rules: services
            .iter()
            .flat_map(|s| {
                let n = s.endpoints.len() as u32;
                s.endpoints
                    .iter()
                    .enumerate()
                    .map(move |(i, ep)| rule(s, *ep, n - i as u32))
            })
            .collect(),
    };
    let mut sock = NlSocket::open(netlink_sys::protocols::NETLINK_NETFILTER, "netfilter")?;
    let mut b = Batch::begin(sock.seq());
    b.new_table(SERVICES_TABLE, true);
    b.new_chain(SERVICES_TABLE, &chain);
    for (i, r) in chain.rules.iter().enumerate() {
        b.new_rule(SERVICES_TABLE, CHAIN, i, r);
    }
    super::send_batch(&mut sock, b.end())
}
