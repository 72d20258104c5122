//! The rule set of Istio's in-pod redirection (istio-cni.md §1.7/§1.9) as data, for [`super`].
//!
//! Input: [`RuleSettings`]. Output: a [`Plan`]: our three tables (family inet), each with its chains (base
//! chains with hook, type and priority) and rules as lists of [`Expr`], exactly the expressions `nft`
//! generates for the same rule text. Each address rule comes in an IPv4 form and, with IPv6, an IPv6 form.

use std::net::IpAddr;

use super::nft::{ChainPlan, Expr, Hook, Plan, TablePlan, CMP_EQ, CMP_NEQ, REG1};
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

/// `oifname OP "lo"`.
fn oif_lo(op: u32) -> [Expr; 2] {
    [meta(libc::NFT_META_OIFNAME), cmp(op, &ifname_bytes("lo"))]
}

/// `iifname "<name>"`: a virtual interface of the pod whose traffic counts as outbound.
fn iif(name: &str) -> [Expr; 2] {
    [
        meta(libc::NFT_META_IIFNAME),
        cmp(CMP_EQ, &ifname_bytes(name)),
    ]
}

/// An interface name as `nft` compares it: the full 16-byte, NUL-padded IFNAMSIZ buffer, or for a
/// wildcard `name*` only the bytes before the `*` (a prefix match). Names are checked by
/// [`valid_interface_name`] first, so they fit.
fn ifname_bytes(name: &str) -> Vec<u8> {
    match name.strip_suffix('*') {
        Some(prefix) => prefix.as_bytes().to_vec(),
        None => {
            let mut buf = vec![0u8; libc::IFNAMSIZ];
            buf[..name.len()].copy_from_slice(name.as_bytes());
            buf
        }
    }
}

/// Whether `name` can name a Linux interface (1 to 15 bytes, no `/`, `:`, whitespace or control
/// characters, not `.` or `..`), optionally with a trailing `*` wildcard as `nft` accepts it.
pub fn valid_interface_name(name: &str) -> bool {
    let base = name.strip_suffix('*').unwrap_or(name);
    !base.is_empty()
        && base.len() < libc::IFNAMSIZ
        && base != "."
        && base != ".."
        && !base.bytes().any(|b| {
            b == b'/' || b == b':' || b == b'*' || b.is_ascii_whitespace() || b.is_ascii_control()
        })
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

fn ret() -> Expr {
    Expr::Verdict {
        code: libc::NFT_RETURN,
        chain: None,
    }
}

/// `counter`: every rule but the jumps counts its hits, as istio-cni's do (`nft list ruleset` shows them).
pub(super) fn counter() -> [Expr; 1] {
    [Expr::Counter]
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

/// A base chain `name` of `kind` at `hooknum`/`priority` whose one rule jumps to the regular chain
/// `target`, as istio-cni lays out each of its tables.
fn entry(
    name: &'static str,
    kind: &'static str,
    hooknum: i32,
    priority: i32,
    target: &str,
) -> ChainPlan {
    let mut chain = base(name, kind, hooknum, priority);
    chain.rules.push(vec![jump(target)]);
    chain
}

/// The rule set of Istio's in-pod redirection (reference §1.7/§1.9) for `s`: per table, base chains
/// `prerouting` and `output` jumping to regular chains `istio-prerouting` and `istio-output`, which hold
/// the rules, each with a `counter`, in istio-cni's order and expression for expression as `nft` builds
/// them from istio-cni's rule text.
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

    let mut prert = regular(ISTIO_PREROUTING);
    // Virtual interfaces (KubeVirt, Docker-in-Docker): TCP arriving from them is the pod's outbound.
    for name in s
        .reroute_interfaces
        .iter()
        .filter(|n| valid_interface_name(n))
    {
        prert.rules.push(rule![
            iif(name),
            l4proto(tcp),
            counter(),
            redirect(p.outbound)
        ]);
        prert
            .rules
            .push(rule![iif(name), l4proto(tcp), counter(), [ret()]]);
    }
    if !s.bypass_inbound {
        for (_, probe) in &families {
            prert.rules.push(rule![
                l4proto(tcp),
                addr(true, CMP_EQ, *probe),
                counter(),
                [accept()]
            ]);
        }
        for (lo, _) in &families {
            prert.rules.push(rule![
                addr(false, CMP_NEQ, *lo),
                l4proto(tcp),
                port(false, CMP_NEQ, p.inbound),
                mark(CMP_NEQ, pmark),
                counter(),
                redirect(p.inbound_plaintext),
            ]);
        }
    }

    let mut out = regular(ISTIO_OUTPUT);
    for (_, probe) in &families {
        out.rules.push(rule![
            l4proto(tcp),
            addr(false, CMP_EQ, *probe),
            counter(),
            [accept()]
        ]);
    }
    if s.dns_capture {
        out.rules.push(rule![
            oif_lo(CMP_NEQ),
            mark(CMP_NEQ, pmark),
            l4proto(udp),
            port(false, CMP_EQ, 53),
            counter(),
            redirect(p.dns),
        ]);
        for (lo, _) in &families {
            out.rules.push(rule![
                addr(false, CMP_NEQ, *lo),
                l4proto(tcp),
                port(false, CMP_EQ, 53),
                mark(CMP_NEQ, pmark),
                counter(),
                redirect(p.dns),
            ]);
        }
    }
    out.rules.push(rule![
        l4proto(tcp),
        mark(CMP_EQ, CONN_MARK),
        counter(),
        [accept()]
    ]);
    for (lo, _) in &families {
        out.rules.push(rule![
            oif_lo(CMP_EQ),
            addr(false, CMP_NEQ, *lo),
            counter(),
            [accept()]
        ]);
    }
    for (lo, _) in &families {
        out.rules.push(rule![
            l4proto(tcp),
            addr(false, CMP_NEQ, *lo),
            mark(CMP_NEQ, pmark),
            counter(),
            redirect(p.outbound),
        ]);
    }

    let ct_mark = libc::NFT_CT_MARK as u32;
    let mut mangle_pre = regular(ISTIO_PREROUTING);
    mangle_pre.rules.push(rule![
        mark(CMP_EQ, pmark),
        counter(),
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
    let mut mangle_out = regular(ISTIO_OUTPUT);
    mangle_out.rules.push(rule![
        [
            Expr::Ct {
                key: ct_mark,
                dreg: REG1
            },
            and(MARK_MASK),
            cmp(CMP_EQ, &CONN_MARK.to_ne_bytes()),
        ],
        counter(),
        [
            Expr::Ct {
                key: ct_mark,
                dreg: REG1
            },
            Expr::MetaSet {
                key: libc::NFT_META_MARK as u32,
                sreg: REG1
            },
        ],
    ]);

    let mut raw_pre = regular(ISTIO_PREROUTING);
    raw_pre.rules.push(rule![
        l4proto(udp),
        port(true, CMP_EQ, 53),
        mark(CMP_NEQ, pmark),
        counter(),
        ct_zone_1(),
    ]);
    let mut raw_out = regular(ISTIO_OUTPUT);
    raw_out.rules.push(rule![
        l4proto(udp),
        port(false, CMP_EQ, 53),
        mark(CMP_EQ, pmark),
        counter(),
        ct_zone_1(),
    ]);

    let (pre, out_hook) = (libc::NF_INET_PRE_ROUTING, libc::NF_INET_LOCAL_OUT);
    vec![
        TablePlan {
            name: NAT,
            present: true,
            chains: vec![
                prert,
                out,
                entry(PREROUTING, "nat", pre, -100, ISTIO_PREROUTING),
                entry(OUTPUT, "nat", out_hook, -100, ISTIO_OUTPUT),
            ],
        },
        TablePlan {
            name: MANGLE,
            present: true,
            chains: vec![
                mangle_pre,
                mangle_out,
                entry(PREROUTING, "filter", pre, -150, ISTIO_PREROUTING),
                entry(OUTPUT, "route", out_hook, -150, ISTIO_OUTPUT),
            ],
        },
        TablePlan {
            name: RAW,
            present: s.dns_capture,
            chains: if s.dns_capture {
                vec![
                    raw_pre,
                    raw_out,
                    entry(PREROUTING, "filter", pre, -300, ISTIO_PREROUTING),
                    entry(OUTPUT, "filter", out_hook, -300, ISTIO_OUTPUT),
                ]
            } else {
                Vec::new()
            },
        },
    ]
}
