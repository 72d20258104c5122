//! In-pod traffic redirection: Istio ambient's capture rules as nftables over netlink, plus the ip rule and
//! local route of table 100 over rtnetlink. Owned by the cni-agent role (it programs each enrolled pod).
//!
//! Input: [`RuleSettings`] (marks, ports, probe SNAT addresses, IPv6 / DNS capture / bypass-inbound switches).
//! Output: the pod's network namespace programmed as istio-cni's nftables backend does it (reference
//! istio-cni.md §1.7/§1.9, same table names so a pod programmed by istio-cni is taken over cleanly):
//! - [`install`] replaces our three tables in ONE nfnetlink batch (all or nothing), then adds the fwmark
//!   rule and local route (idempotently), and sets `net.ipv4.tcp_migrate_req` (best effort, see
//!   [`migrate_queued_connections`]);
//! - [`remove`] deletes all of it, absent pieces being fine;
//! - [`inspect`] reads everything back through netlink dumps, and [`Installed::matches`] compares it, rule
//!   by rule, with what [`install`] would program.
//!
//! Everything is synchronous and acts on the network namespace of the CALLING THREAD: wrap calls in
//! [`crate::netns::Netns::run_on_thread`]. No binaries (`nft`, `ip`) are used.
//!
//! The node side of the same scheme, the kubelet probe SNAT rule and its per-pod address sets in the HOST
//! network namespace, is [`host`].
//!
//! Layout: `rules` (the rule set as data), `nft` (expressions and the plan types, batch encoding, dump
//! decoding), `netlink` (TLV encoder, socket, ACKs and dumps), `route` (ip rule / route), [`host`] (host
//! probe rule), [`branch_eni`] (AWS branch-ENI probe ip rules), [`services`] (kube-proxy-style VIP DNAT
//! for the sandbox).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nix::errno::Errno;

pub mod branch_eni;
pub mod host;
mod netlink;
mod nft;
mod route;
mod rules;
pub mod services;

#[cfg(test)]
mod tests;

use netlink::NlSocket;

pub use host::{
    add_probe_ips, inspect_host, install_host, remove_host, remove_probe_ips, HostInstalled,
    HostProbeSettings, SetState,
};
pub use rules::valid_interface_name;

/// The ports of the in-pod proxy listeners the rules redirect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectPorts {
    /// Outbound capture (Istio 15001).
    pub outbound: u16,
    /// Plaintext inbound capture (Istio 15006).
    pub inbound_plaintext: u16,
    /// HBONE inbound, never redirected (Istio 15008).
    pub inbound: u16,
    /// DNS proxy (Istio 15053).
    pub dns: u16,
}

impl Default for RedirectPorts {
    fn default() -> Self {
        RedirectPorts {
            outbound: 15001,
            inbound_plaintext: 15006,
            inbound: 15008,
            dns: 15053,
        }
    }
}

/// What to program in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSettings {
    /// The proxy's `SO_MARK` (matched under mask `0xfff`, so it must fit in 12 bits). Istio: 1337.
    pub packet_mark: u32,
    /// Also capture IPv6 (v6 forms of the address rules, v6 ip rule and local route).
    pub ipv6: bool,
    /// Redirect DNS (UDP and TCP port 53) to the DNS proxy and add the conntrack-zone table.
    pub dns_capture: bool,
    /// Annotation `ambient.istio.io/bypass-inbound-capture`: no inbound probe accept and no 15006 redirect.
    pub bypass_inbound: bool,
    /// Annotation `istio.io/reroute-virtual-interfaces`: the pod's virtual interfaces (KubeVirt, Docker in
    /// Docker) whose incoming TCP is the pod's outbound traffic (to the outbound port, not inbound). Names
    /// that cannot be interface names ([`valid_interface_name`]) are left out.
    pub reroute_interfaces: Vec<String>,
    /// Source address the node agent SNATs kubelet probes to (Istio 169.254.7.127).
    pub probe_snat_v4: Ipv4Addr,
    /// IPv6 probe SNAT address (Istio fd16:9254:7127:1337:ffff:ffff:ffff:ffff).
    pub probe_snat_v6: Ipv6Addr,
    /// Proxy ports.
    pub ports: RedirectPorts,
}

impl Default for RuleSettings {
    /// Istio's defaults, with IPv6 on and DNS capture off.
    fn default() -> Self {
        RuleSettings {
            packet_mark: 1337,
            ipv6: true,
            dns_capture: false,
            bypass_inbound: false,
            reroute_interfaces: Vec::new(),
            probe_snat_v4: Ipv4Addr::new(169, 254, 7, 127),
            probe_snat_v6: Ipv6Addr::new(
                0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
            ),
            ports: RedirectPorts::default(),
        }
    }
}

/// Which object a netlink message was about, for error context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The nfnetlink batch as a whole (or the socket).
    Batch,
    /// An nftables table (family inet).
    Table {
        /// Table name.
        table: &'static str,
    },
    /// An nftables chain.
    Chain {
        /// Table name.
        table: &'static str,
        /// Chain name.
        chain: &'static str,
    },
    /// An nftables rule: the `index`-th (from 0) of its chain.
    Rule {
        /// Table name.
        table: &'static str,
        /// Chain name.
        chain: &'static str,
        /// Position in the chain.
        index: usize,
    },
    /// An nftables named set.
    Set {
        /// Table name.
        table: &'static str,
        /// Set name.
        set: &'static str,
    },
    /// Elements of an nftables named set (added or deleted).
    SetElements {
        /// Table name.
        table: &'static str,
        /// Set name.
        set: &'static str,
    },
    /// The fwmark ip rule.
    IpRule {
        /// IPv6 (else IPv4).
        ipv6: bool,
    },
    /// The local route of table 100.
    LocalRoute {
        /// IPv6 (else IPv4).
        ipv6: bool,
    },
    /// An ip rule of the AWS branch-ENI probe path in the node's netns ([`branch_eni`]).
    BranchEniRule {
        /// IPv6 (else IPv4).
        ipv6: bool,
        /// The forward rule (`to <pod IP> lookup <table> pref 512`), else the return rule
        /// (`iif <veth> lookup local`).
        forward: bool,
    },
    /// Reading nftables state back.
    NftDump {
        /// What was being read (tables, chains, rules).
        what: &'static str,
    },
    /// Reading routing state back.
    RouteDump {
        /// What was being read (ip rules, routes, the index of lo).
        what: &'static str,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fam = |v6: bool| if v6 { "IPv6" } else { "IPv4" };
        match self {
            Target::Batch => write!(f, "the nftables batch"),
            Target::Table { table } => write!(f, "table inet {table}"),
            Target::Chain { table, chain } => write!(f, "chain inet {table} {chain}"),
            Target::Rule {
                table,
                chain,
                index,
            } => write!(f, "rule #{index} of chain inet {table} {chain}"),
            Target::Set { table, set } => write!(f, "set inet {table} {set}"),
            Target::SetElements { table, set } => {
                write!(f, "elements of set inet {table} {set}")
            }
            Target::IpRule { ipv6 } => write!(
                f,
                "{} ip rule fwmark {:#x}/{:#x} pref {} lookup {}",
                fam(*ipv6),
                rules::CONN_MARK,
                rules::MARK_MASK,
                route::PRIORITY,
                route::TABLE
            ),
            Target::LocalRoute { ipv6 } => {
                write!(
                    f,
                    "{} local default route of table {}",
                    fam(*ipv6),
                    route::TABLE
                )
            }
            Target::BranchEniRule {
                ipv6,
                forward: true,
            } => write!(
                f,
                "{} branch-ENI ip rule to <pod IP> pref 512 lookup <its table>",
                fam(*ipv6)
            ),
            Target::BranchEniRule {
                ipv6,
                forward: false,
            } => write!(
                f,
                "{} branch-ENI ip rule iif <veth> lookup local",
                fam(*ipv6)
            ),
            Target::NftDump { what } | Target::RouteDump { what } => {
                write!(f, "reading back {what}")
            }
        }
    }
}

/// Errors of this module.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no nf_tables, or lacks a piece the rules need (chain type nat/route, an expression
    /// module): EAFNOSUPPORT/EPROTONOSUPPORT/EOPNOTSUPP, or ENOENT for a chain or rule.
    #[error("nf_tables not available in this kernel ({target}: {errno})")]
    NfTablesUnavailable {
        /// What was being created.
        target: Target,
        /// The kernel's answer.
        errno: Errno,
    },
    /// EPERM: the caller lacks CAP_NET_ADMIN in the pod's network namespace.
    #[error("not permitted to change {target} (needs CAP_NET_ADMIN in the network namespace)")]
    NotPermitted {
        /// What was being changed.
        target: Target,
    },
    /// The kernel refused a message for another reason.
    #[error("kernel rejected {target}: {errno}")]
    Rejected {
        /// What the message was about.
        target: Target,
        /// The kernel's answer.
        errno: Errno,
    },
    /// Opening or binding a netlink socket failed.
    #[error("opening a {protocol} netlink socket: {source}")]
    Socket {
        /// `netfilter` or `route`.
        protocol: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sending or receiving failed (including the receive timeout).
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel's answer could not be parsed.
    #[error("malformed netlink answer: {what}")]
    Malformed {
        /// What was wrong.
        what: &'static str,
    },
    /// The packet mark does not fit the 12-bit mask the rules match it under.
    #[error("packet mark {mark:#x} does not fit the mark mask 0xfff")]
    InvalidMark {
        /// The configured mark.
        mark: u32,
    },
}

impl Error {
    /// Classifies a kernel errno for `target`.
    fn from_errno(target: Target, errno: Errno) -> Error {
        let nft_object = matches!(target, Target::Chain { .. } | Target::Rule { .. });
        match errno {
            Errno::EPERM => Error::NotPermitted { target },
            Errno::EAFNOSUPPORT | Errno::EPROTONOSUPPORT | Errno::EOPNOTSUPP
                if !matches!(
                    target,
                    Target::IpRule { .. }
                        | Target::LocalRoute { .. }
                        | Target::RouteDump { .. }
                        | Target::BranchEniRule { .. }
                ) =>
            {
                Error::NfTablesUnavailable { target, errno }
            }
            Errno::ENOENT if nft_object => Error::NfTablesUnavailable { target, errno },
            _ => Error::Rejected { target, errno },
        }
    }
}

/// Programs the rule set for `settings` in the calling thread's network namespace, replacing whatever of
/// ours is there, then the ip rules and local routes. Idempotent.
///
/// The nftables part is always one atomic batch, picked by what is there:
/// - none of our tables (a new pod): a batch of creations only (about 0.3 ms);
/// - our tables, already exactly as wanted (a re-install, agent restart): nothing to send;
/// - anything else: the replace batch (NEWTABLE + DELTABLE + NEWTABLE + chains + rules per table). The
///   kernel makes any batch that deletes something wait for an RCU grace period, several milliseconds.
pub fn install(settings: &RuleSettings) -> Result<(), Error> {
    if settings.packet_mark & !rules::MARK_MASK != 0 {
        return Err(Error::InvalidMark {
            mark: settings.packet_mark,
        });
    }
    let plan = rules::plan(settings);
    let mut sock = NlSocket::open(netlink_sys::protocols::NETLINK_NETFILTER, "netfilter")?;
    let tables = read_tables(&mut sock, false)?;
    if tables.is_empty() {
        let batch = nft::create_batch(&plan, sock.seq());
        match send_batch(&mut sock, batch) {
            // Someone created one of our tables meanwhile: nothing changed, replace instead.
            Err(Error::Rejected {
                target: Target::Table { .. },
                errno: Errno::EEXIST,
            }) => replace(&mut sock, &plan)?,
            other => other?,
        }
    } else if !tables_match(&read_tables(&mut sock, true)?, &plan) {
        replace(&mut sock, &plan)?;
    }
    let mut rt = NlSocket::open(netlink_sys::protocols::NETLINK_ROUTE, "route")?;
    route::install(
        &mut rt,
        settings.ipv6,
        settings.ipv6 && route::lo_has_ipv6(),
    )?;
    migrate_queued_connections();
    Ok(())
}

/// The per-namespace switch that makes the kernel move connections still queued on a closing listener to
/// another listener of its SO_REUSEPORT group.
const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets `net.ipv4.tcp_migrate_req = 1` in the calling thread's network namespace, so that when a node proxy
/// hands a pod to a newer one (both bind the pod's ports with SO_REUSEPORT) the connections that completed
/// their handshake on the old proxy's listener after its last accept move to the new one instead of being
/// reset (the takeover test saw one reset call in about 16 hand-overs without it; ztunnel and istio-cni do
/// not set it). Best effort: on kernels before 5.14 the file does not exist, and a failure only costs that
/// window, so it is logged, never a reason to refuse the pod's capture.
fn migrate_queued_connections() {
    match std::fs::write(TCP_MIGRATE_REQ, "1") {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not set {TCP_MIGRATE_REQ} in the pod's namespace; a proxy hand-over may reset queued connections")
        }
    }
}

/// Sends the batch that makes our tables equal to `plan` whatever is there; on any error nothing changes.
fn replace(sock: &mut NlSocket, plan: &nft::Plan) -> Result<(), Error> {
    let batch = nft::replace_batch(plan, sock.seq());
    send_batch(sock, batch)
}

/// [`replace`] on a socket of its own.
#[cfg(test)]
fn apply_nft(plan: &nft::Plan) -> Result<(), Error> {
    let mut sock = NlSocket::open(netlink_sys::protocols::NETLINK_NETFILTER, "netfilter")?;
    replace(&mut sock, plan)
}

fn send_batch(sock: &mut NlSocket, batch: nft::Batch) -> Result<(), Error> {
    sock.skip_past(batch.last_seq);
    let seqs: Vec<u32> = batch.acked.iter().map(|(s, _)| *s).collect();
    let errors = sock.transact(&batch.w.buf, &seqs, batch.first_seq..=batch.last_seq)?;
    match errors.first() {
        None => Ok(()),
        Some((seq, errno)) => {
            let target = batch
                .acked
                .iter()
                .find(|(s, _)| s == seq)
                .map_or(Target::Batch, |(_, t)| *t);
            Err(Error::from_errno(target, *errno))
        }
    }
}

/// Removes our tables, ip rules and local routes from the calling thread's network namespace. Pieces that
/// are already gone are fine.
pub fn remove() -> Result<(), Error> {
    let mut sock = NlSocket::open(netlink_sys::protocols::NETLINK_NETFILTER, "netfilter")?;
    let batch = nft::remove_batch(&rules::TABLES, sock.seq());
    send_batch(&mut sock, batch)?;
    let mut rt = NlSocket::open(netlink_sys::protocols::NETLINK_ROUTE, "route")?;
    route::remove(&mut rt)
}

/// What of ours is programmed in a namespace, as read back from the kernel.
#[derive(Debug, Clone, Default)]
pub struct Installed {
    /// Our tables (family inet), in kernel order.
    pub tables: Vec<TableState>,
    /// ip rules that look up table 100.
    pub ip_rules: Vec<IpRuleState>,
    /// Local routes in table 100.
    pub local_routes: Vec<IpNet>,
    /// Whether `lo` had IPv6 turned on (without it no v6 local route can exist).
    pub lo_ipv6: bool,
}

/// One nftables table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    /// Table name.
    pub name: String,
    /// Table flags (`NFT_TABLE_F_*`; 1 = dormant). Ours are 0.
    pub flags: u32,
    /// Its chains.
    pub chains: Vec<ChainState>,
}

/// One nftables chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainState {
    /// Chain name.
    pub name: String,
    /// For base chains, the hook (`prerouting`, `output`, ...).
    pub hook: Option<String>,
    /// For base chains, the type (`nat`, `filter`, `route`).
    pub chain_type: Option<String>,
    /// For base chains, the priority.
    pub priority: Option<i32>,
    /// For base chains, the policy (`accept`, `drop`).
    pub policy: Option<String>,
    /// Number of rules.
    pub rules: usize,
    /// The rules, decoded, for [`Installed::matches`].
    exprs: Vec<Vec<nft::Expr>>,
}

/// One ip rule that looks up table 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpRuleState {
    /// IPv6 (else IPv4).
    pub ipv6: bool,
    /// Preference.
    pub priority: u32,
    /// fwmark value.
    pub fwmark: u32,
    /// fwmark mask.
    pub fwmask: u32,
    /// Table looked up.
    pub table: u32,
}

/// Reads back our tables (with chains and rules), ip rules and local routes from the calling thread's
/// network namespace.
pub fn inspect() -> Result<Installed, Error> {
    let mut sock = NlSocket::open(netlink_sys::protocols::NETLINK_NETFILTER, "netfilter")?;
    let tables = read_tables(&mut sock, true)?;
    let mut rt = NlSocket::open(netlink_sys::protocols::NETLINK_ROUTE, "route")?;
    Ok(Installed {
        tables,
        ip_rules: route::dump_rules(&mut rt)?,
        local_routes: route::dump_local_routes(&mut rt)?,
        lo_ipv6: route::lo_has_ipv6(),
    })
}

/// Dumps our tables; with `deep`, also their chains and rules.
fn read_tables(sock: &mut NlSocket, deep: bool) -> Result<Vec<TableState>, Error> {
    let ours = |name: &str| rules::TABLES.contains(&name);
    let mut tables: Vec<TableState> = Vec::new();
    let seq = sock.seq();
    let req = nft::dump_request(libc::NFT_MSG_GETTABLE, seq);
    sock.dump(&req, seq, Target::NftDump { what: "tables" }, |r| {
        if let Some((name, flags)) = nft::parse_table(&r).filter(|(n, _)| ours(n)) {
            tables.push(TableState {
                name,
                flags,
                chains: Vec::new(),
            });
        }
    })?;
    if !deep || tables.is_empty() {
        return Ok(tables);
    }

    let seq = sock.seq();
    let req = nft::dump_request(libc::NFT_MSG_GETCHAIN, seq);
    sock.dump(&req, seq, Target::NftDump { what: "chains" }, |r| {
        let d = nft::parse_chain(&r);
        if let Some(t) = tables.iter_mut().find(|t| t.name == d.table) {
            t.chains.push(ChainState {
                name: d.name,
                hook: d.hook.map(|(n, _)| nft::hook_name(n)),
                chain_type: d.kind,
                priority: d.hook.map(|(_, p)| p),
                policy: d.policy.map(nft::verdict_name),
                rules: 0,
                exprs: Vec::new(),
            });
        }
    })?;

    let seq = sock.seq();
    let req = nft::dump_request(libc::NFT_MSG_GETRULE, seq);
    sock.dump(&req, seq, Target::NftDump { what: "rules" }, |r| {
        let (table, chain, exprs) = nft::parse_rule(&r);
        if let Some(c) = tables
            .iter_mut()
            .filter(|t| t.name == table)
            .flat_map(|t| t.chains.iter_mut())
            .find(|c| c.name == chain)
        {
            c.rules += 1;
            c.exprs.push(exprs);
        }
    })?;
    Ok(tables)
}

/// Our tables are exactly the plan's: same tables (active, no flags), chains (hook, type, priority,
/// policy accept) and rules, expression by expression.
fn tables_match(tables: &[TableState], plan: &nft::Plan) -> bool {
    let wanted: Vec<&nft::TablePlan> = plan.iter().filter(|t| t.present).collect();
    if tables.len() != wanted.len() {
        return false;
    }
    wanted.iter().all(|want| {
        let Some(have) = tables.iter().find(|t| t.name == want.name) else {
            return false;
        };
        have.flags == 0
            && have.chains.len() == want.chains.len()
            && want.chains.iter().all(|wc| {
                let Some(hc) = have.chains.iter().find(|c| c.name == wc.name) else {
                    return false;
                };
                let hook_ok = match wc.hook {
                    None => hc.hook.is_none() && hc.chain_type.is_none(),
                    Some(h) => {
                        hc.hook.as_deref() == Some(nft::hook_name(h.hooknum).as_str())
                            && hc.chain_type.as_deref() == Some(h.kind)
                            && hc.priority == Some(h.priority)
                            && hc.policy.as_deref() == Some("accept")
                    }
                };
                hook_ok && hc.rules == wc.rules.len() && hc.exprs == wc.rules
            })
    })
}

impl Installed {
    /// Nothing of ours is left: no table, no ip rule to table 100, no local route in it.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.ip_rules.is_empty() && self.local_routes.is_empty()
    }

    /// Everything is exactly as [`install`] makes it for `s`: the same tables, chains (hooks, types,
    /// priorities), rules expression by expression, ip rules (no duplicates) and local routes.
    pub fn matches(&self, s: &RuleSettings) -> bool {
        if !tables_match(&self.tables, &rules::plan(s)) {
            return false;
        }
        let mut want_rules = vec![false];
        let mut want_routes = vec![default_net(Ipv4Addr::UNSPECIFIED.into())];
        if s.ipv6 {
            want_rules.push(true);
            if self.lo_ipv6 {
                want_routes.push(default_net(Ipv6Addr::UNSPECIFIED.into()));
            }
        }
        let mut want_rules: Vec<IpRuleState> = want_rules
            .into_iter()
            .map(|ipv6| IpRuleState {
                ipv6,
                priority: route::PRIORITY,
                fwmark: rules::CONN_MARK,
                fwmask: rules::MARK_MASK,
                table: route::TABLE,
            })
            .collect();
        let mut have_rules = self.ip_rules.clone();
        have_rules.sort();
        want_rules.sort();
        let mut have_routes: Vec<IpNet> = self.local_routes.iter().map(IpNet::trunc).collect();
        have_routes.sort();
        want_routes.sort();
        have_rules == want_rules && have_routes == want_routes
    }
}

/// `0.0.0.0/0` or `::/0`.
fn default_net(addr: std::net::IpAddr) -> IpNet {
    // A zero prefix length is valid for both families.
    IpNet::new(addr, 0).unwrap_or_else(|_| IpNet::from(addr))
}
