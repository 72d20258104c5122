//! The host-side kubelet probe rule (istio-cni.md §1.6 step 4, §1.8, §1.9 "Host rule"), as nftables over
//! netlink. Owned by the cni-agent role; it runs in the NODE's network namespace.
//!
//! Why: kubelet probes and kube-proxy-forwarded traffic reach a pod from the same node address. The pod's
//! capture rules ([`super::install`]) let TCP from the probe SNAT address (169.254.7.127, v6
//! fd16:9254:7127:1337:ffff:ffff:ffff:ffff) bypass the proxy, so the node must SNAT kubelet's own
//! connections to enrolled pods to that address; else, with STRICT peer authentication, every probe is
//! refused on :15006 and pods never become ready.
//!
//! Input: [`HostProbeSettings`] (kubelet's uid, the SNAT addresses) and enrolled pod IPs.
//! Output, in the calling thread's network namespace, Istio's nftables shape:
//! ```text
//! table inet istio-ambient-nat {
//!     set istio-inpod-probes-v4 { type ipv4_addr }
//!     set istio-inpod-probes-v6 { type ipv6_addr }
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         meta l4proto tcp meta skuid <kubelet uid> ip daddr @istio-inpod-probes-v4 counter snat ip to 169.254.7.127
//!         meta l4proto tcp meta skuid <kubelet uid> ip6 daddr @istio-inpod-probes-v6 counter snat ip6 to <v6 addr>
//!     }
//! }
//! ```
//! nftables has no `--socket-exists`, so (as Istio) the rule matches the socket owner's uid. Both sets
//! always exist (so adding a v6 pod IP never fails); the v6 rule only with [`HostProbeSettings::ipv6`].
//! [`install_host`] leaves a table that is already right alone and only syncs the set elements, so an
//! agent restart does not open a window in which probes are not SNATed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nix::errno::Errno;

use super::netlink::NlSocket;
use super::nft::{self, Batch, ChainPlan, Expr, Hook, TablePlan, REG1};
use super::rules;
use super::{Error, RuleSettings, TableState, Target};

/// The host table: the same name as the in-pod nat table, in another namespace (as Istio names it).
pub const HOST_TABLE: &str = rules::NAT;
/// The base chain of the host table.
pub const HOST_CHAIN: &str = "postrouting";
/// The set of enrolled pods' IPv4 addresses (Istio's ipset name).
pub const PROBE_SET_V4: &str = "istio-inpod-probes-v4";
/// The set of enrolled pods' IPv6 addresses.
pub const PROBE_SET_V6: &str = "istio-inpod-probes-v6";
/// nft data types of the set keys (`TYPE_IPADDR`, `TYPE_IP6ADDR` in nftables' datatype.h).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
/// `priority srcnat`.
const SRCNAT: i32 = 100;
/// The probe sets' comment (istio-cni's); each element's comment is the UID of the pod it belongs to.
const SET_COMMENT: &str = "UUID of the pods that are part of ambient mesh";

/// What the host rule matches and rewrites to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbeSettings {
    /// Uid owning kubelet's sockets ([`crate::cni_agent::procfs::find_kubelet_uid`]; usually 0).
    pub kubelet_uid: u32,
    /// SNAT address for IPv4 probes; must equal the pods' [`RuleSettings::probe_snat_v4`].
    pub probe_snat_v4: Ipv4Addr,
    /// SNAT address for IPv6 probes; must equal the pods' [`RuleSettings::probe_snat_v6`].
    pub probe_snat_v6: Ipv6Addr,
    /// Also SNAT IPv6 probes.
    pub ipv6: bool,
}

impl HostProbeSettings {
    /// The host side matching the in-pod `rules` (same SNAT addresses and IPv6 switch).
    pub fn for_pods(kubelet_uid: u32, rules: &RuleSettings) -> HostProbeSettings {
        HostProbeSettings {
            kubelet_uid,
            probe_snat_v4: rules.probe_snat_v4,
            probe_snat_v6: rules.probe_snat_v6,
            ipv6: rules.ipv6,
        }
    }
}

/// A named set, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    /// Set name.
    pub name: String,
    /// nft key data type (7 = ipv4_addr, 8 = ipv6_addr).
    pub key_type: u32,
    /// Key length in bytes.
    pub key_len: u32,
    /// `NFT_SET_*` flags (ours: 0).
    pub flags: u32,
}

/// The host table as read back from the kernel.
#[derive(Debug, Clone, Default)]
pub struct HostInstalled {
    /// The table with its chains and rules, if present.
    pub table: Option<TableState>,
    /// The table's sets.
    pub sets: Vec<SetState>,
    /// Elements of both probe sets, sorted (v4 first), with the UID of the pod each belongs to (the
    /// element's comment), if any.
    pub probe_owners: Vec<(IpAddr, Option<String>)>,
}

impl HostInstalled {
    /// The probe sets' addresses, sorted (v4 first).
    pub fn probe_ips(&self) -> Vec<IpAddr> {
        self.probe_owners.iter().map(|(ip, _)| *ip).collect()
    }

    /// No host table.
    pub fn is_empty(&self) -> bool {
        self.table.is_none()
    }

    /// Table, chain, rule and sets are exactly as [`install_host`] programs them for `s` (elements are
    /// not compared; see [`HostInstalled::probe_owners`]).
    pub fn matches(&self, s: &HostProbeSettings) -> bool {
        let tables: Vec<TableState> = self.table.iter().cloned().collect();
        super::tables_match(&tables, &vec![plan(s)]) && sets_match(&self.sets)
    }
}

/// The two sets: (name, key type, key length).
const SETS: [(&str, u32, u32); 2] = [
    (PROBE_SET_V4, TYPE_IPADDR, 4),
    (PROBE_SET_V6, TYPE_IP6ADDR, 16),
];

/// `meta l4proto tcp meta skuid <uid> ip[6] daddr @<set> counter snat ip[6] to <addr>`, as `nft` builds it.
fn probe_rule(uid: u32, snat: IpAddr) -> Vec<Expr> {
    let (v6, set, offset, octets, family) = match snat {
        IpAddr::V4(a) => (
            false,
            PROBE_SET_V4,
            16,
            a.octets().to_vec(),
            libc::NFPROTO_IPV4,
        ),
        IpAddr::V6(a) => (
            true,
            PROBE_SET_V6,
            24,
            a.octets().to_vec(),
            libc::NFPROTO_IPV6,
        ),
    };
    let mut r = rules::l4proto(libc::IPPROTO_TCP).to_vec();
    r.push(rules::meta(libc::NFT_META_SKUID));
    r.push(rules::cmp(nft::CMP_EQ, &uid.to_ne_bytes()));
    r.extend(rules::nfproto(v6));
    r.push(Expr::Payload {
        dreg: REG1,
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset,
        len: octets.len() as u32,
    });
    r.push(Expr::Lookup {
        sreg: REG1,
        set: set.to_owned(),
    });
    r.extend(rules::counter());
    r.push(Expr::Immediate {
        dreg: REG1,
        data: octets,
    });
    r.push(Expr::Snat {
        family: family as u32,
        addr_reg: REG1,
    });
    r
}

/// The host table's chain and rules for `s`.
fn plan(s: &HostProbeSettings) -> TablePlan {
    let mut rules = vec![probe_rule(s.kubelet_uid, IpAddr::V4(s.probe_snat_v4))];
    if s.ipv6 {
        rules.push(probe_rule(s.kubelet_uid, IpAddr::V6(s.probe_snat_v6)));
    }
    TablePlan {
        name: HOST_TABLE,
        present: true,
        chains: vec![ChainPlan {
            name: HOST_CHAIN,
            hook: Some(Hook {
                kind: "nat",
                hooknum: libc::NF_INET_POST_ROUTING as u32,
                priority: SRCNAT,
            }),
            rules,
        }],
    }
}

fn sets_match(sets: &[SetState]) -> bool {
    sets.len() == SETS.len()
        && SETS.iter().all(|(name, key_type, key_len)| {
            sets.iter().any(|s| {
                s.name == *name && s.key_type == *key_type && s.key_len == *key_len && s.flags == 0
            })
        })
}

/// Probe-set entries: pod IPs (sorted, de-duplicated) and the UID of the pod each belongs to, kept as
/// the element's comment, as istio-cni keeps it. `None`: an entry without an owner (written by an
/// earlier version), which any pod may remove.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Elements(BTreeMap<IpAddr, Option<String>>);

/// An owner as the sets keep it: element comments are cut to [`nft::MAX_ELEM_COMMENT`] bytes, so owners are
/// compared in that form (else a longer UID would never match its own entries).
fn owner_tag(owner: &str) -> String {
    nft::truncated(owner, nft::MAX_ELEM_COMMENT).to_owned()
}

impl Elements {
    fn of<'a>(entries: impl IntoIterator<Item = (IpAddr, &'a str)>) -> Elements {
        Elements(
            entries
                .into_iter()
                .map(|(ip, owner)| (ip, Some(owner_tag(owner))))
                .collect(),
        )
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries of `self` that `other` lacks or gives another owner.
    fn minus(&self, other: &Elements) -> Elements {
        Elements(
            self.0
                .iter()
                .filter(|(ip, owner)| other.0.get(ip) != Some(owner))
                .map(|(ip, owner)| (*ip, owner.clone()))
                .collect(),
        )
    }

    /// Entries of `self` whose IP `other` lacks.
    fn ips_not_in(&self, other: &Elements) -> Elements {
        Elements(
            self.0
                .iter()
                .filter(|(ip, _)| !other.0.contains_key(ip))
                .map(|(ip, owner)| (*ip, owner.clone()))
                .collect(),
        )
    }

    /// The elements per set.
    fn per_set(&self) -> [(&'static str, Vec<nft::Elem>); 2] {
        let elem = |ip: &IpAddr, owner: &Option<String>| nft::Elem {
            key: match ip {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
            comment: owner.clone(),
        };
        let (v4, v6): (Vec<_>, Vec<_>) = self.0.iter().partition(|(ip, _)| ip.is_ipv4());
        [
            (
                PROBE_SET_V4,
                v4.into_iter().map(|(i, o)| elem(i, o)).collect(),
            ),
            (
                PROBE_SET_V6,
                v6.into_iter().map(|(i, o)| elem(i, o)).collect(),
            ),
        ]
    }

    /// NEWSETELEM for these entries, for IPs not yet in the sets.
    fn add_to(&self, b: &mut Batch) {
        for (set, elems) in self.per_set().iter().filter(|(_, e)| !e.is_empty()) {
            b.set_elems(true, HOST_TABLE, set, elems);
        }
    }

    /// NEWSETELEM then DELSETELEM for these IPs: adding first makes deleting an absent element succeed
    /// (the same trick as NEWTABLE before DELTABLE), with no kernel-version dependence.
    fn remove_from(&self, b: &mut Batch) {
        self.add_to(b);
        for (set, elems) in self.per_set().iter().filter(|(_, e)| !e.is_empty()) {
            b.set_elems(false, HOST_TABLE, set, elems);
        }
    }

    /// These entries, replacing whatever the sets hold for their IPs: a NEWSETELEM does not change an
    /// element already there, so remove, then add, within the one batch (no packet sees the set
    /// without the IP).
    fn upsert_into(&self, b: &mut Batch) {
        self.remove_from(b);
        self.add_to(b);
    }
}

/// Appends the whole table (sets, chain, rules, then `elements`) to `b`.
fn create_table(b: &mut Batch, plan: &TablePlan, elements: &Elements, exclusive: bool) {
    b.new_table(HOST_TABLE, exclusive);
    for (id, (name, key_type, key_len)) in SETS.iter().enumerate() {
        b.new_set(
            HOST_TABLE,
            name,
            *key_type,
            *key_len,
            id as u32 + 1,
            Some(SET_COMMENT),
        );
    }
    for chain in &plan.chains {
        b.new_chain(HOST_TABLE, chain);
    }
    for chain in &plan.chains {
        for (index, rule) in chain.rules.iter().enumerate() {
            b.new_rule(HOST_TABLE, chain.name, index, rule);
        }
    }
    elements.add_to(b);
}

fn netfilter_socket() -> Result<NlSocket, Error> {
    NlSocket::open(netlink_sys::protocols::NETLINK_NETFILTER, "netfilter")
}

/// Programs the host probe rule for `settings` in the calling thread's network namespace and makes the
/// probe sets hold exactly `entries` (pod IP, UID of its pod). Idempotent; every change is one atomic
/// batch:
/// - no host table: creations only (table with `NLM_F_EXCL`, sets, chain, rule, elements);
/// - the table exactly as wanted (agent restart): only the element differences (nothing if none; an
///   entry whose owner changed is replaced), so the elements are never flushed;
/// - anything else (other uid, other addresses, foreign chains or sets): NEWTABLE + DELTABLE + the whole
///   table with `entries` re-added, in one batch.
pub fn install_host(settings: &HostProbeSettings, entries: &[(IpAddr, &str)]) -> Result<(), Error> {
    let plan = plan(settings);
    let want = Elements::of(entries.iter().copied());
    let mut sock = netfilter_socket()?;
    if read_table(&mut sock, false)?.is_none() {
        let mut b = Batch::begin(sock.seq());
        create_table(&mut b, &plan, &want, true);
        match super::send_batch(&mut sock, b.end()) {
            // Someone created it meanwhile: nothing changed, replace instead.
            Err(Error::Rejected {
                target: Target::Table { .. },
                errno: Errno::EEXIST,
            }) => {}
            other => return other,
        }
    } else {
        let table: Vec<TableState> = read_table(&mut sock, true)?.into_iter().collect();
        if super::tables_match(&table, &vec![plan.clone()]) && sets_match(&read_sets(&mut sock)?) {
            let have = read_elements(&mut sock)?;
            let (put, stale) = (want.minus(&have), have.ips_not_in(&want));
            if put.is_empty() && stale.is_empty() {
                return Ok(());
            }
            let mut b = Batch::begin(sock.seq());
            stale.remove_from(&mut b);
            put.upsert_into(&mut b);
            return super::send_batch(&mut sock, b.end());
        }
    }
    let mut b = Batch::begin(sock.seq());
    b.new_table(HOST_TABLE, false);
    b.del_table(HOST_TABLE);
    create_table(&mut b, &plan, &want, false);
    super::send_batch(&mut sock, b.end())
}

/// Puts `ips` in the probe sets as belonging to the pod `owner` (its UID), in one batch: an IP already
/// there changes owner (the newest pod with an IP owns it, as in istio-cni). Needs [`install_host`]
/// first (else the kernel answers ENOENT: [`Error::Rejected`] for [`Target::SetElements`]).
pub fn add_probe_ips(owner: &str, ips: &[IpAddr]) -> Result<(), Error> {
    let elements = Elements::of(ips.iter().map(|ip| (*ip, owner)));
    if elements.is_empty() {
        return Ok(());
    }
    let mut sock = netfilter_socket()?;
    let mut b = Batch::begin(sock.seq());
    elements.upsert_into(&mut b);
    super::send_batch(&mut sock, b.end())
}

/// Removes those of `ips` that belong to the pod `owner` (or to no pod) from the probe sets, in one
/// batch. An IP that another pod now owns stays: a pod deleted after its IP went to a new pod must not
/// take the new pod's probes with it. Returns the IPs left for other owners, with those owners. IPs
/// not there, and a missing table, are fine.
pub fn remove_probe_ips(owner: &str, ips: &[IpAddr]) -> Result<Vec<(IpAddr, String)>, Error> {
    if ips.is_empty() {
        return Ok(Vec::new());
    }
    let owner = owner_tag(owner);
    let mut sock = netfilter_socket()?;
    let have = read_elements(&mut sock)?;
    let mut gone = Elements::default();
    let mut kept = Vec::new();
    for ip in ips {
        match have.0.get(ip) {
            None => {}
            Some(Some(other)) if *other != owner => kept.push((*ip, other.clone())),
            Some(current) => {
                gone.0.insert(*ip, current.clone());
            }
        }
    }
    if gone.is_empty() {
        return Ok(kept);
    }
    let mut b = Batch::begin(sock.seq());
    gone.remove_from(&mut b);
    match super::send_batch(&mut sock, b.end()) {
        // Adding first makes absent elements fine, so ENOENT means no table or set: nothing to remove.
        Err(Error::Rejected {
            target: Target::SetElements { .. },
            errno: Errno::ENOENT,
        }) => Ok(kept),
        other => other.map(|()| kept),
    }
}

/// Deletes the host table (rule, sets and elements). Absent is fine.
pub fn remove_host() -> Result<(), Error> {
    let mut sock = netfilter_socket()?;
    let mut b = Batch::begin(sock.seq());
    b.new_table(HOST_TABLE, false);
    b.del_table(HOST_TABLE);
    super::send_batch(&mut sock, b.end())
}

/// Reads the host table back: chains and rules, sets, and the probe sets' elements.
pub fn inspect_host() -> Result<HostInstalled, Error> {
    let mut sock = netfilter_socket()?;
    let Some(table) = read_table(&mut sock, true)? else {
        return Ok(HostInstalled::default());
    };
    let sets = read_sets(&mut sock)?;
    let elements = read_elements(&mut sock)?;
    Ok(HostInstalled {
        table: Some(table),
        sets,
        probe_owners: elements.0.into_iter().collect(),
    })
}

/// The host table (with chains and rules when `deep`), if present.
fn read_table(sock: &mut NlSocket, deep: bool) -> Result<Option<TableState>, Error> {
    Ok(super::read_tables(sock, deep)?
        .into_iter()
        .find(|t| t.name == HOST_TABLE))
}

/// The sets of the host table.
fn read_sets(sock: &mut NlSocket) -> Result<Vec<SetState>, Error> {
    let mut sets = Vec::new();
    let seq = sock.seq();
    let req = nft::dump_request(libc::NFT_MSG_GETSET, seq);
    sock.dump(&req, seq, Target::NftDump { what: "sets" }, |r| {
        let d = nft::parse_set(&r);
        if d.table == HOST_TABLE {
            sets.push(SetState {
                name: d.name,
                key_type: d.key_type,
                key_len: d.key_len,
                flags: d.flags,
            });
        }
    })?;
    Ok(sets)
}

/// The elements of both probe sets (a missing set reads as empty).
fn read_elements(sock: &mut NlSocket) -> Result<Elements, Error> {
    let mut e = Elements::default();
    for (set, _, _) in SETS {
        let seq = sock.seq();
        let req = nft::set_elem_dump_request(HOST_TABLE, set, seq);
        let target = Target::NftDump {
            what: "set elements",
        };
        let mut elems = Vec::new();
        match sock.dump(&req, seq, target, |r| {
            elems.extend(nft::parse_set_elems(&r))
        }) {
            Err(Error::Rejected {
                errno: Errno::ENOENT,
                ..
            }) => continue,
            other => other?,
        }
        for nft::Elem { key, comment } in elems {
            let ip = if let Ok(a) = <[u8; 4]>::try_from(key.as_slice()) {
                IpAddr::from(a)
            } else if let Ok(a) = <[u8; 16]>::try_from(key.as_slice()) {
                IpAddr::from(a)
            } else {
                continue;
            };
            e.0.insert(ip, comment);
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests;
