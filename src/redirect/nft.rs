//! nf_tables over nfnetlink for [`super`]: expressions, their encoding into one batch, and the decoding of
//! table/chain/rule dumps back into the same data.
//!
//! Input: a [`Plan`] (tables → chains → rules of [`Expr`]; the types are here, the rule sets that fill them
//! in `rules`, `host` and `services`, which depend on this module and not the other way round). Output: the
//! batch bytes that create or replace our tables atomically, and tables/chains/rules decoded from the
//! kernel's dumps. Only the handful of expressions Istio's in-pod rules and the host probe rule need are
//! supported (meta, cmp, payload, bitwise, immediate, redir, ct, lookup, nat, numgen, counter), plus named
//! sets and their elements (with comments).

use super::netlink::{attrs, be32, string, Reply, Writer};
use super::Target;

// nf_tables attribute numbers (linux/netfilter/nf_tables.h); libc has the message types but not these.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_SREG: u16 = 4;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_FLAGS: u16 = 7;
const NFTA_NG_DREG: u16 = 1;
const NFTA_NG_MODULUS: u16 = 2;
const NFTA_NG_TYPE: u16 = 3;
/// `NFT_NG_RANDOM`: a random number below the modulus per packet.
const NFT_NG_RANDOM: u32 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
/// The set's user data as `nft` writes it: TLV `NFTNL_UDATA_SET_KEYBYTEORDER` (0), length 4, value
/// `BYTEORDER_BIG_ENDIAN` (2, host-endian u32), so `nft list` prints addresses the right way round.
const SET_USERDATA_BIG_ENDIAN_KEY: [u8; 6] = [0, 4, 2, 0, 0, 0];
/// `NFTNL_UDATA_SET_COMMENT`, a set's comment in its user data.
const UDATA_SET_COMMENT: u8 = 7;
/// `NFTNL_UDATA_SET_ELEM_COMMENT`, an element's comment in its user data.
const UDATA_SET_ELEM_COMMENT: u8 = 0;
/// Longest element comment written, in bytes (pod UIDs take 36): keeps [`ELEMS_PER_MSG`] elements in
/// one message.
pub(super) const MAX_ELEM_COMMENT: usize = 64;
/// Most elements in one NEWSETELEM/DELSETELEM message: the element list is one attribute, whose length
/// field is a u16 (64 KiB), and an IPv6 element with the longest comment takes about 110 bytes.
pub(super) const ELEMS_PER_MSG: usize = 512;

/// An element to add or delete: its key and, when adding, its comment (at most [`MAX_ELEM_COMMENT`]
/// bytes are written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Elem {
    pub(super) key: Vec<u8>,
    pub(super) comment: Option<String>,
}

/// `value` cut to at most `max` bytes, at a character boundary.
pub(super) fn truncated(value: &str, max: usize) -> &str {
    let mut end = value.len().min(max);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// A `\0`-terminated string TLV in libnftnl's user-data format (type, length, value); a value longer
/// than the one-byte length allows is cut.
fn udata_str(out: &mut Vec<u8>, ty: u8, value: &str) {
    let value = truncated(value, u8::MAX as usize - 1);
    out.push(ty);
    out.push(value.len() as u8 + 1);
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// The string of TLV `ty` in user data `data`, if present and well formed.
fn udata_find_str(data: &[u8], ty: u8) -> Option<String> {
    let mut rest = data;
    while let [t, len, tail @ ..] = rest {
        let len = *len as usize;
        let value = tail.get(..len)?;
        if *t == ty {
            let value = value.strip_suffix(&[0]).unwrap_or(value);
            return std::str::from_utf8(value).ok().map(str::to_owned);
        }
        rest = &tail[len..];
    }
    None
}
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect carries a port.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;

/// The 128-bit register 1, where every rule here loads its values.
pub(super) const REG1: u32 = libc::NFT_REG_1 as u32;
const REG_VERDICT: u32 = libc::NFT_REG_VERDICT as u32;
pub(super) const CMP_EQ: u32 = libc::NFT_CMP_EQ as u32;
pub(super) const CMP_NEQ: u32 = libc::NFT_CMP_NEQ as u32;

/// One nf_tables expression, with just the attributes these rules use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Expr {
    /// Load meta `key` into `dreg`.
    Meta { key: u32, dreg: u32 },
    /// Set meta `key` from `sreg`.
    MetaSet { key: u32, sreg: u32 },
    /// Compare `sreg` with `data`.
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// Load `len` bytes at `offset` of header `base` into `dreg`.
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    /// `dreg = (sreg & mask) ^ xor`.
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Load a constant into `dreg`.
    Immediate { dreg: u32, data: Vec<u8> },
    /// A verdict (accept, jump to `chain`).
    Verdict { code: i32, chain: Option<String> },
    /// Redirect to the local port held in register `port_reg`.
    Redir { port_reg: u32 },
    /// Load conntrack `key` into `dreg`.
    Ct { key: u32, dreg: u32 },
    /// Set conntrack `key` from `sreg`.
    CtSet { key: u32, sreg: u32 },
    /// Look the value in `sreg` up in the named set of the same table (a match: no hit, no further).
    Lookup { sreg: u32, set: String },
    /// Source NAT of `family` (`NFPROTO_IPV4`/`IPV6`) to the address held in register `addr_reg`.
    Snat { family: u32, addr_reg: u32 },
    /// Destination NAT (IPv4) to the address in `addr_reg` and the port in `port_reg`.
    Dnat { addr_reg: u32, port_reg: u32 },
    /// A random number in `0..modulus` into `dreg` (`numgen random mod N`).
    NumgenRandom { dreg: u32, modulus: u32 },
    /// `counter`: packets and bytes the rule matched. Built at zero; the kernel's counts are not kept on
    /// decode, so a rule that has counted reads back equal to the one built.
    Counter,
    /// An expression this module does not know (only ever decoded, never built).
    Other(String),
}

impl Expr {
    fn name(&self) -> &str {
        match self {
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Cmp { .. } => "cmp",
            Expr::Payload { .. } => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Immediate { .. } | Expr::Verdict { .. } => "immediate",
            Expr::Redir { .. } => "redir",
            Expr::Ct { .. } | Expr::CtSet { .. } => "ct",
            Expr::Lookup { .. } => "lookup",
            Expr::Snat { .. } | Expr::Dnat { .. } => "nat",
            Expr::NumgenRandom { .. } => "numgen",
            Expr::Counter => "counter",
            Expr::Other(name) => name,
        }
    }

    /// Appends this expression as one `NFTA_LIST_ELEM`.
    pub(super) fn encode(&self, w: &mut Writer) {
        let elem = w.nest_begin(NFTA_LIST_ELEM);
        w.attr_str(NFTA_EXPR_NAME, self.name());
        let data = w.nest_begin(NFTA_EXPR_DATA);
        match self {
            Expr::Meta { key, dreg } => {
                w.attr_be32(NFTA_META_KEY, *key);
                w.attr_be32(NFTA_META_DREG, *dreg);
            }
            Expr::MetaSet { key, sreg } => {
                w.attr_be32(NFTA_META_KEY, *key);
                w.attr_be32(NFTA_META_SREG, *sreg);
            }
            Expr::Cmp { sreg, op, data } => {
                w.attr_be32(NFTA_CMP_SREG, *sreg);
                w.attr_be32(NFTA_CMP_OP, *op);
                value(w, NFTA_CMP_DATA, data);
            }
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => {
                w.attr_be32(NFTA_PAYLOAD_DREG, *dreg);
                w.attr_be32(NFTA_PAYLOAD_BASE, *base);
                w.attr_be32(NFTA_PAYLOAD_OFFSET, *offset);
                w.attr_be32(NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                w.attr_be32(NFTA_BITWISE_SREG, *sreg);
                w.attr_be32(NFTA_BITWISE_DREG, *dreg);
                w.attr_be32(NFTA_BITWISE_LEN, mask.len() as u32);
                value(w, NFTA_BITWISE_MASK, mask);
                value(w, NFTA_BITWISE_XOR, xor);
            }
            Expr::Immediate { dreg, data } => {
                w.attr_be32(NFTA_IMMEDIATE_DREG, *dreg);
                value(w, NFTA_IMMEDIATE_DATA, data);
            }
            Expr::Verdict { code, chain } => {
                w.attr_be32(NFTA_IMMEDIATE_DREG, REG_VERDICT);
                let outer = w.nest_begin(NFTA_IMMEDIATE_DATA);
                let verdict = w.nest_begin(NFTA_DATA_VERDICT);
                w.attr_be32(NFTA_VERDICT_CODE, *code as u32);
                if let Some(chain) = chain {
                    w.attr_str(NFTA_VERDICT_CHAIN, chain);
                }
                w.nest_end(verdict);
                w.nest_end(outer);
            }
            Expr::Redir { port_reg } => {
                w.attr_be32(NFTA_REDIR_REG_PROTO_MIN, *port_reg);
                w.attr_be32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            }
            Expr::Ct { key, dreg } => {
                w.attr_be32(NFTA_CT_KEY, *key);
                w.attr_be32(NFTA_CT_DREG, *dreg);
            }
            Expr::CtSet { key, sreg } => {
                w.attr_be32(NFTA_CT_KEY, *key);
                w.attr_be32(NFTA_CT_SREG, *sreg);
            }
            Expr::Lookup { sreg, set } => {
                // `nft`'s order; it also sends NFTA_LOOKUP_SET_ID, which the kernel only needs when the
                // name is not found (the set is always found by name here, also within one batch).
                w.attr_be32(NFTA_LOOKUP_SREG, *sreg);
                w.attr_str(NFTA_LOOKUP_SET, set);
            }
            Expr::Snat { family, addr_reg } => {
                w.attr_be32(NFTA_NAT_TYPE, libc::NFT_NAT_SNAT as u32);
                w.attr_be32(NFTA_NAT_FAMILY, *family);
                w.attr_be32(NFTA_NAT_REG_ADDR_MIN, *addr_reg);
            }
            Expr::Dnat { addr_reg, port_reg } => {
                w.attr_be32(NFTA_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
                w.attr_be32(NFTA_NAT_FAMILY, libc::NFPROTO_IPV4 as u32);
                w.attr_be32(NFTA_NAT_REG_ADDR_MIN, *addr_reg);
                w.attr_be32(NFTA_NAT_REG_PROTO_MIN, *port_reg);
                w.attr_be32(NFTA_NAT_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            }
            Expr::NumgenRandom { dreg, modulus } => {
                w.attr_be32(NFTA_NG_DREG, *dreg);
                w.attr_be32(NFTA_NG_MODULUS, *modulus);
                w.attr_be32(NFTA_NG_TYPE, NFT_NG_RANDOM);
            }
            // As `nft` sends it: no attributes, so the kernel starts the counts at zero.
            Expr::Counter | Expr::Other(_) => {}
        }
        w.nest_end(data);
        w.nest_end(elem);
    }

    /// Decodes one `NFTA_LIST_ELEM` payload. Attributes the kernel adds on dump (e.g. the bitwise op, the
    /// redirect's max port register and flags) are ignored, so a dump decodes to what was built.
    pub(super) fn decode(elem: &[u8]) -> Expr {
        let mut name = String::new();
        let mut data: &[u8] = &[];
        for (ty, payload) in attrs(elem) {
            match ty {
                NFTA_EXPR_NAME => name = string(payload),
                NFTA_EXPR_DATA => data = payload,
                _ => {}
            }
        }
        let get = |want: u16| attrs(data).find(|(ty, _)| *ty == want).map(|(_, p)| p);
        let u = |want: u16| get(want).and_then(be32);
        let val = |want: u16| {
            get(want)
                .and_then(|p| attrs(p).find(|(ty, _)| *ty == NFTA_DATA_VALUE))
                .map(|(_, v)| v.to_vec())
        };
        let decoded = match name.as_str() {
            "meta" => match (u(NFTA_META_KEY), u(NFTA_META_DREG), u(NFTA_META_SREG)) {
                (Some(key), Some(dreg), None) => Some(Expr::Meta { key, dreg }),
                (Some(key), None, Some(sreg)) => Some(Expr::MetaSet { key, sreg }),
                _ => None,
            },
            "ct" => match (u(NFTA_CT_KEY), u(NFTA_CT_DREG), u(NFTA_CT_SREG)) {
                (Some(key), Some(dreg), None) => Some(Expr::Ct { key, dreg }),
                (Some(key), None, Some(sreg)) => Some(Expr::CtSet { key, sreg }),
                _ => None,
            },
            "cmp" => (|| {
                Some(Expr::Cmp {
                    sreg: u(NFTA_CMP_SREG)?,
                    op: u(NFTA_CMP_OP)?,
                    data: val(NFTA_CMP_DATA)?,
                })
            })(),
            "payload" => (|| {
                Some(Expr::Payload {
                    dreg: u(NFTA_PAYLOAD_DREG)?,
                    base: u(NFTA_PAYLOAD_BASE)?,
                    offset: u(NFTA_PAYLOAD_OFFSET)?,
                    len: u(NFTA_PAYLOAD_LEN)?,
                })
            })(),
            "bitwise" => (|| {
                Some(Expr::Bitwise {
                    sreg: u(NFTA_BITWISE_SREG)?,
                    dreg: u(NFTA_BITWISE_DREG)?,
                    mask: val(NFTA_BITWISE_MASK)?,
                    xor: val(NFTA_BITWISE_XOR)?,
                })
            })(),
            "immediate" => (|| {
                let dreg = u(NFTA_IMMEDIATE_DREG)?;
                if dreg != REG_VERDICT {
                    return Some(Expr::Immediate {
                        dreg,
                        data: val(NFTA_IMMEDIATE_DATA)?,
                    });
                }
                let (_, verdict) =
                    attrs(get(NFTA_IMMEDIATE_DATA)?).find(|(ty, _)| *ty == NFTA_DATA_VERDICT)?;
                let mut code = None;
                let mut chain = None;
                for (ty, p) in attrs(verdict) {
                    match ty {
                        NFTA_VERDICT_CODE => code = be32(p).map(|c| c as i32),
                        NFTA_VERDICT_CHAIN => chain = Some(string(p)),
                        _ => {}
                    }
                }
                Some(Expr::Verdict { code: code?, chain })
            })(),
            "redir" => u(NFTA_REDIR_REG_PROTO_MIN).map(|port_reg| Expr::Redir { port_reg }),
            // An inverted lookup (`!= @set`) or a map lookup is another expression: left as Other.
            "lookup"
                if u(NFTA_LOOKUP_FLAGS).unwrap_or(0) == 0 && get(NFTA_LOOKUP_DREG).is_none() =>
            {
                (|| {
                    Some(Expr::Lookup {
                        sreg: u(NFTA_LOOKUP_SREG)?,
                        set: string(get(NFTA_LOOKUP_SET)?),
                    })
                })()
            }
            // The kernel adds `addr_max` (= addr_min) and NF_NAT_RANGE_MAP_IPS on dump: ignored.
            "nat" if u(NFTA_NAT_TYPE) == Some(libc::NFT_NAT_SNAT as u32) => (|| {
                Some(Expr::Snat {
                    family: u(NFTA_NAT_FAMILY)?,
                    addr_reg: u(NFTA_NAT_REG_ADDR_MIN)?,
                })
            })(),
            "nat" if u(NFTA_NAT_TYPE) == Some(libc::NFT_NAT_DNAT as u32) => (|| {
                Some(Expr::Dnat {
                    addr_reg: u(NFTA_NAT_REG_ADDR_MIN)?,
                    port_reg: u(NFTA_NAT_REG_PROTO_MIN)?,
                })
            })(),
            "numgen" if u(NFTA_NG_TYPE) == Some(NFT_NG_RANDOM) => (|| {
                Some(Expr::NumgenRandom {
                    dreg: u(NFTA_NG_DREG)?,
                    modulus: u(NFTA_NG_MODULUS)?,
                })
            })(),
            "counter" => Some(Expr::Counter),
            _ => None,
        };
        decoded.unwrap_or(Expr::Other(name))
    }
}

/// A `NFTA_DATA_VALUE` nested in attribute `ty`.
fn value(w: &mut Writer, ty: u16, data: &[u8]) {
    let nest = w.nest_begin(ty);
    w.attr(NFTA_DATA_VALUE, data);
    w.nest_end(nest);
}

/// nfnetlink message type for an nf_tables message.
fn nft_type(msg: i32) -> u16 {
    ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | msg as u16
}

/// `struct nfgenmsg` for family inet (or the batch header's unspec + subsystem).
fn nfgenmsg(w: &mut Writer, family: u8, res_id: u16) {
    let res = res_id.to_be_bytes();
    w.raw(&[family, libc::NFNETLINK_V0 as u8, res[0], res[1]]);
}

/// An nfnetlink batch under construction: the bytes, the sequence number and target of each message.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) w: Writer,
    /// `(seq, what the message changes)` for every message that asks for an ACK.
    pub(super) acked: Vec<(u32, Target)>,
    pub(super) first_seq: u32,
    pub(super) last_seq: u32,
}

const REQ: u16 = libc::NLM_F_REQUEST as u16;
const ACK: u16 = libc::NLM_F_ACK as u16;
const CREATE: u16 = libc::NLM_F_CREATE as u16;
const APPEND: u16 = libc::NLM_F_APPEND as u16;
const INET: u8 = libc::NFPROTO_INET as u8;

impl Batch {
    /// Starts a batch whose first sequence number is `seq`.
    pub(super) fn begin(seq: u32) -> Batch {
        let mut b = Batch {
            first_seq: seq,
            last_seq: seq,
            ..Batch::default()
        };
        let m = b.w.msg_begin(libc::NFNL_MSG_BATCH_BEGIN as u16, REQ, seq);
        nfgenmsg(&mut b.w, 0, libc::NFNL_SUBSYS_NFTABLES as u16);
        b.w.msg_end(m);
        b
    }

    fn msg(&mut self, msg: i32, flags: u16, target: Target) -> usize {
        self.last_seq += 1;
        let seq = self.last_seq;
        self.acked.push((seq, target));
        let m = self.w.msg_begin(nft_type(msg), REQ | ACK | flags, seq);
        nfgenmsg(&mut self.w, INET, 0);
        m
    }

    /// NEWTABLE: create if missing; if present, no error unless `exclusive` (then EEXIST fails the batch).
    pub(super) fn new_table(&mut self, table: &'static str, exclusive: bool) {
        let flags = if exclusive {
            CREATE | libc::NLM_F_EXCL as u16
        } else {
            CREATE
        };
        let m = self.msg(libc::NFT_MSG_NEWTABLE, flags, Target::Table { table });
        self.w.attr_str(NFTA_TABLE_NAME, table);
        self.w.attr_be32(NFTA_TABLE_FLAGS, 0);
        self.w.msg_end(m);
    }

    /// DELTABLE (with all its chains and rules).
    pub(super) fn del_table(&mut self, table: &'static str) {
        let m = self.msg(libc::NFT_MSG_DELTABLE, 0, Target::Table { table });
        self.w.attr_str(NFTA_TABLE_NAME, table);
        self.w.msg_end(m);
    }

    /// NEWCHAIN, a base chain when `hook` is set.
    pub(super) fn new_chain(&mut self, table: &'static str, chain: &ChainPlan) {
        let target = Target::Chain {
            table,
            chain: chain.name,
        };
        let m = self.msg(libc::NFT_MSG_NEWCHAIN, CREATE, target);
        self.w.attr_str(NFTA_CHAIN_TABLE, table);
        self.w.attr_str(NFTA_CHAIN_NAME, chain.name);
        if let Some(hook) = chain.hook {
            let nest = self.w.nest_begin(NFTA_CHAIN_HOOK);
            self.w.attr_be32(NFTA_HOOK_HOOKNUM, hook.hooknum);
            self.w.attr_be32(NFTA_HOOK_PRIORITY, hook.priority as u32);
            self.w.nest_end(nest);
            self.w.attr_be32(NFTA_CHAIN_POLICY, libc::NF_ACCEPT as u32);
            self.w.attr_str(NFTA_CHAIN_TYPE, hook.kind);
        }
        self.w.msg_end(m);
    }

    /// NEWRULE appended to `chain`.
    pub(super) fn new_rule(
        &mut self,
        table: &'static str,
        chain: &'static str,
        index: usize,
        exprs: &[Expr],
    ) {
        let target = Target::Rule {
            table,
            chain,
            index,
        };
        let m = self.msg(libc::NFT_MSG_NEWRULE, CREATE | APPEND, target);
        self.w.attr_str(NFTA_RULE_TABLE, table);
        self.w.attr_str(NFTA_RULE_CHAIN, chain);
        let list = self.w.nest_begin(NFTA_RULE_EXPRESSIONS);
        for e in exprs {
            e.encode(&mut self.w);
        }
        self.w.nest_end(list);
        self.w.msg_end(m);
    }

    /// NEWSET: a plain (hash) set of `key_len`-byte keys of nft data type `key_type`, named `set`, with
    /// an optional `comment` (under 250 bytes). `id` is the batch-local set id (any value unique within
    /// the batch).
    pub(super) fn new_set(
        &mut self,
        table: &'static str,
        set: &'static str,
        key_type: u32,
        key_len: u32,
        id: u32,
        comment: Option<&str>,
    ) {
        let m = self.msg(libc::NFT_MSG_NEWSET, CREATE, Target::Set { table, set });
        self.w.attr_str(NFTA_SET_TABLE, table);
        self.w.attr_str(NFTA_SET_NAME, set);
        self.w.attr_be32(NFTA_SET_FLAGS, 0);
        self.w.attr_be32(NFTA_SET_KEY_TYPE, key_type);
        self.w.attr_be32(NFTA_SET_KEY_LEN, key_len);
        self.w.attr_be32(NFTA_SET_ID, id);
        let mut udata = SET_USERDATA_BIG_ENDIAN_KEY.to_vec();
        if let Some(comment) = comment {
            udata_str(&mut udata, UDATA_SET_COMMENT, comment);
        }
        self.w.attr(NFTA_SET_USERDATA, &udata);
        self.w.msg_end(m);
    }

    /// NEWSETELEM (`add`, without `NLM_F_EXCL`: elements already there are fine) or DELSETELEM (an
    /// absent element fails the batch with ENOENT) for `keys`, in messages of at most [`ELEMS_PER_MSG`].
    pub(super) fn set_elems(
        &mut self,
        add: bool,
        table: &'static str,
        set: &'static str,
        elems: &[Elem],
    ) {
        let (msg, flags) = if add {
            (libc::NFT_MSG_NEWSETELEM, CREATE)
        } else {
            (libc::NFT_MSG_DELSETELEM, 0)
        };
        for chunk in elems.chunks(ELEMS_PER_MSG) {
            let m = self.msg(msg, flags, Target::SetElements { table, set });
            self.w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
            self.w.attr_str(NFTA_SET_ELEM_LIST_SET, set);
            let list = self.w.nest_begin(NFTA_SET_ELEM_LIST_ELEMENTS);
            for e in chunk {
                let elem = self.w.nest_begin(NFTA_LIST_ELEM);
                value(&mut self.w, NFTA_SET_ELEM_KEY, &e.key);
                if let Some(comment) = e.comment.as_deref().filter(|_| add) {
                    let mut udata = Vec::new();
                    let comment = truncated(comment, MAX_ELEM_COMMENT);
                    udata_str(&mut udata, UDATA_SET_ELEM_COMMENT, comment);
                    self.w.attr(NFTA_SET_ELEM_USERDATA, &udata);
                }
                self.w.nest_end(elem);
            }
            self.w.nest_end(list);
            self.w.msg_end(m);
        }
    }

    /// Closes the batch.
    pub(super) fn end(mut self) -> Batch {
        self.last_seq += 1;
        let m = self
            .w
            .msg_begin(libc::NFNL_MSG_BATCH_END as u16, REQ, self.last_seq);
        nfgenmsg(&mut self.w, 0, libc::NFNL_SUBSYS_NFTABLES as u16);
        self.w.msg_end(m);
        self
    }
}

// What to create: tables, chains and rules as data (the rule sets in `rules`, `host` and `services` are
// built of these).

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

/// Appends NEWTABLE + chains + rules of `table`.
fn create_table(b: &mut Batch, table: &TablePlan, exclusive: bool) {
    b.new_table(table.name, exclusive);
    for chain in &table.chains {
        b.new_chain(table.name, chain);
    }
    for chain in &table.chains {
        for (index, rule) in chain.rules.iter().enumerate() {
            b.new_rule(table.name, chain.name, index, rule);
        }
    }
}

/// The batch that makes the kernel's state equal to `plan` whatever was there: per table NEWTABLE +
/// DELTABLE (so an old one, or none, disappears), then, if the table should exist, NEWTABLE + chains +
/// rules. Any deletion makes the kernel's commit wait for an RCU grace period (milliseconds).
pub(super) fn replace_batch(plan: &Plan, seq: u32) -> Batch {
    let mut b = Batch::begin(seq);
    for table in plan {
        b.new_table(table.name, false);
        b.del_table(table.name);
        if table.present {
            create_table(&mut b, table, false);
        }
    }
    b.end()
}

/// The batch for a namespace with none of our tables: creations only (no grace-period wait). Tables are
/// created with `NLM_F_EXCL`, so if one appeared meanwhile the whole batch fails with EEXIST and nothing
/// changes.
pub(super) fn create_batch(plan: &Plan, seq: u32) -> Batch {
    let mut b = Batch::begin(seq);
    for table in plan.iter().filter(|t| t.present) {
        create_table(&mut b, table, true);
    }
    b.end()
}

/// The batch that removes `tables` (absent ones included: NEWTABLE first makes DELTABLE safe).
pub(super) fn remove_batch(tables: &[&'static str], seq: u32) -> Batch {
    let mut b = Batch::begin(seq);
    for &table in tables {
        b.new_table(table, false);
        b.del_table(table);
    }
    b.end()
}

/// A dump request (`GETTABLE`/`GETCHAIN`/`GETRULE`) for family inet.
pub(super) fn dump_request(msg: i32, seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let m = w.msg_begin(nft_type(msg), REQ | libc::NLM_F_DUMP as u16, seq);
    nfgenmsg(&mut w, INET, 0);
    w.msg_end(m);
    w.buf
}

/// A chain as read back from the kernel.
#[derive(Debug, Clone, Default)]
pub(super) struct Dumped {
    pub(super) table: String,
    pub(super) name: String,
    pub(super) hook: Option<(u32, i32)>,
    pub(super) kind: Option<String>,
    pub(super) policy: Option<u32>,
}

/// Skips `struct nfgenmsg`.
fn nft_attrs<'a>(reply: &Reply<'a>) -> super::netlink::AttrIter<'a> {
    attrs(reply.payload.get(4..).unwrap_or(&[]))
}

/// Table name and flags from a NEWTABLE dump message.
pub(super) fn parse_table(reply: &Reply<'_>) -> Option<(String, u32)> {
    let mut name = None;
    let mut flags = 0;
    for (ty, p) in nft_attrs(reply) {
        match ty {
            NFTA_TABLE_NAME => name = Some(string(p)),
            NFTA_TABLE_FLAGS => flags = be32(p).unwrap_or(0),
            _ => {}
        }
    }
    name.map(|n| (n, flags))
}

/// A NEWCHAIN dump message.
pub(super) fn parse_chain(reply: &Reply<'_>) -> Dumped {
    let mut d = Dumped::default();
    for (ty, p) in nft_attrs(reply) {
        match ty {
            NFTA_CHAIN_TABLE => d.table = string(p),
            NFTA_CHAIN_NAME => d.name = string(p),
            NFTA_CHAIN_TYPE => d.kind = Some(string(p)),
            NFTA_CHAIN_POLICY => d.policy = be32(p),
            NFTA_CHAIN_HOOK => {
                let mut num = None;
                let mut prio = None;
                for (ty, p) in attrs(p) {
                    match ty {
                        NFTA_HOOK_HOOKNUM => num = be32(p),
                        NFTA_HOOK_PRIORITY => prio = be32(p).map(|v| v as i32),
                        _ => {}
                    }
                }
                d.hook = num.zip(prio);
            }
            _ => {}
        }
    }
    d
}

/// A NEWRULE dump message: `(table, chain, expressions)`.
pub(super) fn parse_rule(reply: &Reply<'_>) -> (String, String, Vec<Expr>) {
    let mut table = String::new();
    let mut chain = String::new();
    let mut exprs = Vec::new();
    for (ty, p) in nft_attrs(reply) {
        match ty {
            NFTA_RULE_TABLE => table = string(p),
            NFTA_RULE_CHAIN => chain = string(p),
            NFTA_RULE_EXPRESSIONS => {
                exprs = attrs(p)
                    .filter(|(ty, _)| *ty == NFTA_LIST_ELEM)
                    .map(|(_, e)| Expr::decode(e))
                    .collect();
            }
            _ => {}
        }
    }
    (table, chain, exprs)
}

/// A dump request for the elements of `set` in `table` (family inet).
pub(super) fn set_elem_dump_request(table: &str, set: &str, seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let m = w.msg_begin(
        nft_type(libc::NFT_MSG_GETSETELEM),
        REQ | libc::NLM_F_DUMP as u16,
        seq,
    );
    nfgenmsg(&mut w, INET, 0);
    w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
    w.attr_str(NFTA_SET_ELEM_LIST_SET, set);
    w.msg_end(m);
    w.buf
}

/// A set as read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct DumpedSet {
    pub(super) table: String,
    pub(super) name: String,
    pub(super) flags: u32,
    pub(super) key_type: u32,
    pub(super) key_len: u32,
}

/// A NEWSET dump message.
pub(super) fn parse_set(reply: &Reply<'_>) -> DumpedSet {
    let mut d = DumpedSet::default();
    for (ty, p) in nft_attrs(reply) {
        match ty {
            NFTA_SET_TABLE => d.table = string(p),
            NFTA_SET_NAME => d.name = string(p),
            NFTA_SET_FLAGS => d.flags = be32(p).unwrap_or(0),
            NFTA_SET_KEY_TYPE => d.key_type = be32(p).unwrap_or(0),
            NFTA_SET_KEY_LEN => d.key_len = be32(p).unwrap_or(0),
            _ => {}
        }
    }
    d
}

/// The elements (keys and comments) in a NEWSETELEM dump message; elements without a key value are
/// skipped.
pub(super) fn parse_set_elems(reply: &Reply<'_>) -> Vec<Elem> {
    nft_attrs(reply)
        .filter(|(ty, _)| *ty == NFTA_SET_ELEM_LIST_ELEMENTS)
        .flat_map(|(_, list)| attrs(list))
        .filter(|(ty, _)| *ty == NFTA_LIST_ELEM)
        .filter_map(|(_, elem)| {
            let (_, key) = attrs(elem).find(|(ty, _)| *ty == NFTA_SET_ELEM_KEY)?;
            let (_, v) = attrs(key).find(|(ty, _)| *ty == NFTA_DATA_VALUE)?;
            let comment = attrs(elem)
                .find(|(ty, _)| *ty == NFTA_SET_ELEM_USERDATA)
                .and_then(|(_, u)| udata_find_str(u, UDATA_SET_ELEM_COMMENT));
            Some(Elem {
                key: v.to_vec(),
                comment,
            })
        })
        .collect()
}

/// The `nft` name of a hook number.
pub(super) fn hook_name(hooknum: u32) -> String {
    match hooknum as i32 {
        libc::NF_INET_PRE_ROUTING => "prerouting".into(),
        libc::NF_INET_LOCAL_IN => "input".into(),
        libc::NF_INET_FORWARD => "forward".into(),
        libc::NF_INET_LOCAL_OUT => "output".into(),
        libc::NF_INET_POST_ROUTING => "postrouting".into(),
        other => format!("hook{other}"),
    }
}

/// The `nft` name of a chain policy.
pub(super) fn verdict_name(verdict: u32) -> String {
    match verdict as i32 {
        libc::NF_ACCEPT => "accept".into(),
        libc::NF_DROP => "drop".into(),
        other => format!("verdict{other}"),
    }
}
