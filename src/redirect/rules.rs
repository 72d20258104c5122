//! The rule set of Istio's in-pod redirection (istio-cni.md §1.7/§1.9) as data, for [`super`].
//!
//! Input: [`RuleSettings`]. Output: a [`Plan`]: our three tables (family inet), each with its chains (base
//! chains with hook, type and priority) and rules as lists of [`Expr`], exactly the expressions `nft`
//! generates for the same rule text. Each address rule comes in an IPv4 form and, with IPv6, an IPv6 form.

use std::net::IpAddr;

use super::nft::{Expr, CMP_EQ, CMP_NEQ, REG1};
use super::RuleSettings;

/// Mask for the packet and connection marks (Istio's `0xfff`).
pub(super) const MARK_MASK: u32 = 0xfff;
/// Connection mark of connections ztunnel opened toward the app (`InpodTProxyMark`).
pub(super) const CONN_MARK: u32 = 0x111;

/// Table names, as Istio's nftables backend names them.
pub(super) const NAT: &str = "istio-ambient-nat";
/// See [`NAT`].
pub(super) const MANGLE: &str = "istio-ambient-mangle";
/// See [`NAT`].
pub(super) const RAW: &str = "istio-ambient-raw";
/// All our tables, in batch order.
pub(super) const TABLES: [&str; 3] = [NAT, MANGLE, RAW];

const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const ISTIO_PREROUTING: &str = "istio-prerouting";
const ISTIO_OUTPUT: &str = "istio-output";

// Building blocks for the rules, each the expressions `nft` itself generates for the same text.

pub(super) fn meta(key: i32) -> Expr {
    Expr::Meta {
        key: key as u32,
        dreg: REG1,
    }
}

pub(super) fn cmp(op: u32, data: &[u8]) -> Expr {
    Expr::Cmp {
        sreg: REG1,
        op,
        data: data.to_vec(),
    }
}

/// `meta nfproto ipv4|ipv6`.
pub(super) fn nfproto(v6: bool) -> [Expr; 2] {
    let proto = if v6 {
        libc::NFPROTO_IPV6
    } else {
        libc::NFPROTO_IPV4
    };
    [meta(libc::NFT_META_NFPROTO), cmp(CMP_EQ, &[proto as u8])]
}

/// `meta l4proto tcp|udp`.
pub(super) fn l4proto(proto: i32) -> [Expr; 2] {
    [meta(libc::NFT_META_L4PROTO), cmp(CMP_EQ, &[proto as u8])]
}

/// `ip saddr|daddr OP addr` or the `ip6` form, preceded by the `meta nfproto` it depends on.
pub(super) fn addr(source: bool, op: u32, addr: IpAddr) -> Vec<Expr> {
    let (v6, bytes, offset) = match addr {
        IpAddr::V4(a) => (false, a.octets().to_vec(), if source { 12 } else { 16 }),
        IpAddr::V6(a) => (true, a.octets().to_vec(), if source { 8 } else { 24 }),
    };
    let mut out = nfproto(v6).to_vec();
    out.push(Expr::Payload {
        dreg: REG1,
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset,
        len: bytes.len() as u32,
    });
    out.push(cmp(op, &bytes));
    out
}

/// `th sport|dport OP port` (port in network order).
pub(super) fn port(source: bool, op: u32, port: u16) -> [Expr; 2] {
    [
        Expr::Payload {
            dreg: REG1,
            base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
            offset: if source { 0 } else { 2 },
            len: 2,
        },
        cmp(op, &port.to_be_bytes()),
    ]
}

/// `x & mask` on register 1 (mark values are host-endian).
fn and(mask: u32) -> Expr {
    Expr::Bitwise {
        sreg: REG1,
        dreg: REG1,
        mask: mask.to_ne_bytes().to_vec(),
        xor: vec![0; 4],
    }
}

/// `meta mark & 0xfff OP value`.
fn mark(op: u32, value: u32) -> [Expr; 3] {
    [
        meta(libc::NFT_META_MARK),
        and(MARK_MASK),
        cmp(op, &value.to_ne_bytes()),
    ]
}

/// `oifname OP "lo"` (the name is compared as the full 16-byte, NUL-padded IFNAMSIZ buffer).
fn oif_lo(op: u32) -> [Expr; 2] {
    let mut name = [0u8; libc::IFNAMSIZ];
    name[..2].copy_from_slice(b"lo");
    [meta(libc::NFT_META_OIFNAME), cmp(op, &name)]
}

fn accept() -> Expr {
    Expr::Verdict {
        code: libc::NF_ACCEPT,
        chain: None,
    }
}

fn jump(chain: &str) -> Expr {
    Expr::Verdict {
        code: libc::NFT_JUMP,
        chain: Some(chain.to_owned()),
    }
}

/// `redirect to :port`: the port goes into register 1 in network order.
pub(super) fn redirect(port: u16) -> [Expr; 2] {
    [
        Expr::Immediate {
            dreg: REG1,
            data: port.to_be_bytes().to_vec(),
        },
        Expr::Redir { port_reg: REG1 },
    ]
}

/// `ct zone set 1`.
fn ct_zone_1() -> [Expr; 2] {
    [
        Expr::Immediate {
            dreg: REG1,
            data: 1u16.to_ne_bytes().to_vec(),
        },
        Expr::CtSet {
            key: libc::NFT_CT_ZONE as u32,
            sreg: REG1,
        },
    ]
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hook {
    /// `nat`, `filter` or `route`.
    pub(super) kind: &'static str,
    /// `NF_INET_*`.
    pub(super) hooknum: u32,
    pub(super) priority: i32,
}

/// One chain to create, with its rules in order.
#[derive(Debug, Clone)]
pub(super) struct ChainPlan {
    pub(super) name: &'static str,
    pub(super) hook: Option<Hook>,
    pub(super) rules: Vec<Vec<Expr>>,
}

/// One of our tables: either it should exist with these chains, or it should not exist.
#[derive(Debug, Clone)]
pub(super) struct TablePlan {
    pub(super) name: &'static str,
    pub(super) present: bool,
    pub(super) chains: Vec<ChainPlan>,
}

/// The whole nftables side of the rule set.
pub(super) type Plan = Vec<TablePlan>;

fn base(name: &'static str, kind: &'static str, hooknum: i32, priority: i32) -> ChainPlan {
    ChainPlan {
        name,
        hook: Some(Hook {
            kind,
            hooknum: hooknum as u32,
            priority,
        }),
        rules: Vec::new(),
    }
}

fn regular(name: &'static str) -> ChainPlan {
    ChainPlan {
        name,
        hook: None,
        rules: Vec::new(),
    }
}

/// Builds a rule out of pieces.
macro_rules! rule {
    ($($part:expr),+ $(,)?) => {{
        let mut r: Vec<Expr> = Vec::new();
        $(r.extend($part);)+
        r
    }};
}

/// The rule set of Istio's in-pod redirection (reference §1.7/§1.9) for `s`.
pub(super) fn plan(s: &RuleSettings) -> Plan {
    let tcp = libc::IPPROTO_TCP;
    let udp = libc::IPPROTO_UDP;
    let pmark = s.packet_mark;
    let p = &s.ports;
    // (loopback, probe SNAT address) per enabled family.
    let mut families: Vec<(IpAddr, IpAddr)> =
        vec![(IpAddr::from([127, 0, 0, 1]), IpAddr::V4(s.probe_snat_v4))];
    if s.ipv6 {
        families.push((
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            IpAddr::V6(s.probe_snat_v6),
        ));
    }

    let mut prerouting = base(PREROUTING, "nat", libc::NF_INET_PRE_ROUTING, -100);
    prerouting.rules.push(vec![jump(ISTIO_PREROUTING)]);
    let mut output = base(OUTPUT, "nat", libc::NF_INET_LOCAL_OUT, -100);
    output.rules.push(vec![jump(ISTIO_OUTPUT)]);

    let mut prert = regular(ISTIO_PREROUTING);
    if !s.bypass_inbound {
        for (_, probe) in &families {
            prert
                .rules
                .push(rule![l4proto(tcp), addr(true, CMP_EQ, *probe), [accept()]]);
        }
        for (lo, _) in &families {
            prert.rules.push(rule![
                addr(false, CMP_NEQ, *lo),
                l4proto(tcp),
                port(false, CMP_NEQ, p.inbound),
                mark(CMP_NEQ, pmark),
                redirect(p.inbound_plaintext),
            ]);
        }
    }

    let mut out = regular(ISTIO_OUTPUT);
    for (_, probe) in &families {
        out.rules
            .push(rule![l4proto(tcp), addr(false, CMP_EQ, *probe), [accept()]]);
    }
    if s.dns_capture {
        out.rules.push(rule![
            oif_lo(CMP_NEQ),
            l4proto(udp),
            mark(CMP_NEQ, pmark),
            port(false, CMP_EQ, 53),
            redirect(p.dns),
        ]);
        for (lo, _) in &families {
            out.rules.push(rule![
                addr(false, CMP_NEQ, *lo),
                l4proto(tcp),
                port(false, CMP_EQ, 53),
                mark(CMP_NEQ, pmark),
                redirect(p.dns),
            ]);
        }
    }
    out.rules
        .push(rule![l4proto(tcp), mark(CMP_EQ, CONN_MARK), [accept()]]);
    for (lo, _) in &families {
        out.rules
            .push(rule![oif_lo(CMP_EQ), addr(false, CMP_NEQ, *lo), [accept()]]);
    }
    for (lo, _) in &families {
        out.rules.push(rule![
            l4proto(tcp),
            addr(false, CMP_NEQ, *lo),
            mark(CMP_NEQ, pmark),
            redirect(p.outbound),
        ]);
    }

    let ct_mark = libc::NFT_CT_MARK as u32;
    let mut mangle_pre = base(PREROUTING, "filter", libc::NF_INET_PRE_ROUTING, -150);
    mangle_pre.rules.push(rule![
        mark(CMP_EQ, pmark),
        [
            Expr::Ct {
                key: ct_mark,
                dreg: REG1
            },
            Expr::Bitwise {
                sreg: REG1,
                dreg: REG1,
                mask: (!MARK_MASK).to_ne_bytes().to_vec(),
                xor: CONN_MARK.to_ne_bytes().to_vec(),
            },
            Expr::CtSet {
                key: ct_mark,
                sreg: REG1
            },
        ],
    ]);
    let mut mangle_out = base(OUTPUT, "route", libc::NF_INET_LOCAL_OUT, -150);
    mangle_out.rules.push(rule![[
        Expr::Ct {
            key: ct_mark,
            dreg: REG1
        },
        and(MARK_MASK),
        cmp(CMP_EQ, &CONN_MARK.to_ne_bytes()),
        Expr::Ct {
            key: ct_mark,
            dreg: REG1
        },
        Expr::MetaSet {
            key: libc::NFT_META_MARK as u32,
            sreg: REG1
        },
    ],]);

    let mut raw_pre = base(PREROUTING, "filter", libc::NF_INET_PRE_ROUTING, -300);
    raw_pre.rules.push(rule![
        l4proto(udp),
        port(true, CMP_EQ, 53),
        mark(CMP_NEQ, pmark),
        ct_zone_1(),
    ]);
    let mut raw_out = base(OUTPUT, "filter", libc::NF_INET_LOCAL_OUT, -300);
    raw_out.rules.push(rule![
        l4proto(udp),
        port(false, CMP_EQ, 53),
        mark(CMP_EQ, pmark),
        ct_zone_1(),
    ]);

    vec![
        TablePlan {
            name: NAT,
            present: true,
            chains: vec![prert, out, prerouting, output],
        },
        TablePlan {
            name: MANGLE,
            present: true,
            chains: vec![mangle_pre, mangle_out],
        },
        TablePlan {
            name: RAW,
            present: s.dns_capture,
            chains: if s.dns_capture {
                vec![raw_pre, raw_out]
            } else {
                Vec::new()
            },
        },
    ]
}
