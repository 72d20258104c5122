//! Host ip rules that let kubelet probes reach AWS branch-ENI pods (istio-cni.md §1.6 step 4, the
//! `AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE` part). Owned by the cni-agent role; it runs in the NODE's network
//! namespace, next to the probe SNAT of [`super::host`].
//!
//! Why: on EKS with "security groups for pods", aws-vpc-cni gives a pod a branch ENI and routes it with
//! per-pod ip rules `iif <veth> lookup <table N>`, where table N holds `<pod IP>/32 dev <veth>`. Host
//! traffic to the pod follows the main table out into the VPC, and the pod's replies follow the iif rule
//! back out there too. A kubelet probe SNATed to 169.254.7.127 is dropped by the VPC fabric (link-local
//! source), so without these rules every probe of a branch-ENI pod fails once it is in the mesh.
//!
//! Input: the gate [`early_demux_disabled`] (AWS requires `net.ipv4.tcp_early_demux = 0` for security
//! groups for pods, the kernel default is 1, so anywhere else this module stays inert) and a pod IP.
//! Output, for a pod that [`detect`] finds to be a branch-ENI pod ([`BranchEni`]), two rules of the pod IP's
//! family, added by [`add`] and deleted by [`remove`]:
//! ```text
//! 512:               from all to <pod IP> lookup <table N>        # forward path: via the veth, not the VPC
//! <iif pref - 1>:    from all iif <veth> lookup local             # return path: replies are delivered here
//! ```
//! Adding an existing rule and deleting an absent one are both fine. Detection reads rules and routes only;
//! it never hard-codes aws-vpc-cni's table numbers or preferences.
//!
//! Everything is synchronous, over rtnetlink (no `ip` binary), and acts on the network namespace of the
//! CALLING THREAD: wrap calls in [`crate::netns::Netns::run_on_thread`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use super::netlink::{attrs, ne32, string, NlSocket, Writer};
use super::{Error, Target};

/// What [`detect`] found out about a branch-ENI pod; [`add`] and [`remove`] need it (keep it with the pod's
/// record: after the pod is gone its veth and routes can no longer be looked up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchEni {
    /// aws-vpc-cni's routing table for the pod (neither main nor local).
    pub table: u32,
    /// The host-side interface the pod's host route leaves by, named by aws-vpc-cni's iif rule.
    pub veth: String,
    /// Preference of aws-vpc-cni's `iif <veth> lookup <table>` rule.
    pub iif_priority: u32,
}

impl BranchEni {
    /// Preference of our return-path rule: just before aws-vpc-cni's iif rule, so it is looked at first.
    /// An iif rule at 0 leaves no room before it; ours then shares 0 (as istio-cni does).
    fn return_priority(&self) -> u32 {
        self.iif_priority.saturating_sub(1)
    }
}

/// Preference of the forward-path rule: the one aws-vpc-cni gives its `to <pod IP> lookup main` rules of
/// regular pods, so ours sits among them.
const FORWARD_PRIORITY: u32 = 512;

/// Tables an aws-vpc-cni branch-ENI table is not: unspecified, main and local.
const RT_TABLE_UNSPEC: u32 = 0;
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const FRA_DST: u16 = 1;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_DST: u16 = libc::RTA_DST;
const RTA_OIF: u16 = libc::RTA_OIF;
const RTA_TABLE: u16 = libc::RTA_TABLE;
/// Size of `struct fib_rule_hdr` and of `struct rtmsg`.
const FAMILY_HDR_LEN: usize = 12;

const REQ: u16 = libc::NLM_F_REQUEST as u16;
const ACK: u16 = libc::NLM_F_ACK as u16;
const DUMP: u16 = libc::NLM_F_DUMP as u16;
const CREATE: u16 = libc::NLM_F_CREATE as u16;
const EXCL: u16 = libc::NLM_F_EXCL as u16;

/// Whether the sysctl file at `sysctl_path` (the agent passes `<host prefix>/proc/sys/net/ipv4/tcp_early_demux`)
/// says `0`, the operator's sign that the node runs security groups for pods. An unreadable file counts as
/// the kernel default (1): not gated on.
pub fn early_demux_disabled(sysctl_path: &Path) -> bool {
    std::fs::read_to_string(sysctl_path).is_ok_and(|v| v.trim() == "0")
}

/// Finds out whether `pod_ip` is a branch-ENI pod in the calling thread's namespace: among the ip rules of
/// its family that name an input interface and look up a table other than main/local, one whose table has a
/// host route (/32, /128) to `pod_ip` leaving by that same interface. `None` for a regular pod (its route is
/// in main, and it has no iif rule) or when the kernel has no rules of that family.
///
/// Does not look at the gate: callers check [`early_demux_disabled`] first.
pub fn detect(pod_ip: IpAddr) -> Result<Option<BranchEni>, Error> {
    let mut sock = route_socket()?;
    let Some(iif_rules) = iif_rules(&mut sock, pod_ip.is_ipv6())? else {
        return Ok(None);
    };
    if iif_rules.is_empty() {
        return Ok(None);
    }
    let routes = host_routes(&mut sock, pod_ip)?;
    let mut names: HashMap<u32, Option<String>> = HashMap::new();
    // Rules in kernel order (lowest preference first): the first match wins, the same one every time.
    for rule in &iif_rules {
        for route in routes.iter().filter(|r| r.table == rule.table) {
            let name = names.entry(route.oif).or_insert_with(|| {
                nix::net::if_::if_indextoname(route.oif)
                    .ok()
                    .map(|n| n.to_string_lossy().into_owned())
            });
            if name.as_deref() == Some(rule.iif.as_str()) {
                let eni = BranchEni {
                    table: rule.table,
                    veth: rule.iif.clone(),
                    iif_priority: rule.priority,
                };
                tracing::debug!(%pod_ip, ?eni, "AWS branch-ENI pod detected");
                return Ok(Some(eni));
            }
        }
    }
    Ok(None)
}

/// Adds the forward-path and return-path rules for `pod_ip` (see the module docs). Rules already there are
/// fine. If the return rule is refused, the forward rule is taken back out when this call added it.
pub fn add(pod_ip: IpAddr, eni: &BranchEni) -> Result<(), Error> {
    let mut sock = route_socket()?;
    let forward = RuleSpec::forward(pod_ip, eni);
    // NLM_F_EXCL: an identical rule is answered with EEXIST instead of being added a second time.
    let added_forward = match send_rule(&mut sock, RTM_NEWRULE, CREATE | EXCL, &forward)? {
        None => true,
        Some(Errno::EEXIST) => false,
        Some(errno) => return Err(Error::from_errno(forward.target(), errno)),
    };
    let back = RuleSpec::return_path(pod_ip, eni);
    let outcome = match send_rule(&mut sock, RTM_NEWRULE, CREATE | EXCL, &back) {
        Ok(None | Some(Errno::EEXIST)) => Ok(()),
        Ok(Some(errno)) => Err(Error::from_errno(back.target(), errno)),
        Err(e) => Err(e),
    };
    if outcome.is_err() && added_forward {
        if let Err(e) = delete_rule(&mut sock, &forward) {
            tracing::warn!(%pod_ip, table = eni.table, error = %e, "could not take back the branch-ENI forward ip rule");
        }
    }
    outcome
}

/// Deletes both rules of [`add`]; absent ones are fine. Tries both even when the first fails, and returns
/// the first error (best effort: callers log it).
pub fn remove(pod_ip: IpAddr, eni: &BranchEni) -> Result<(), Error> {
    let mut sock = route_socket()?;
    let forward = delete_rule(&mut sock, &RuleSpec::forward(pod_ip, eni));
    let back = delete_rule(&mut sock, &RuleSpec::return_path(pod_ip, eni));
    forward.and(back)
}

fn route_socket() -> Result<NlSocket, Error> {
    NlSocket::open(netlink_sys::protocols::NETLINK_ROUTE, "route")
}

fn family(v6: bool) -> u8 {
    if v6 {
        libc::AF_INET6 as u8
    } else {
        libc::AF_INET as u8
    }
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn host_prefix_len(ip: IpAddr) -> u8 {
    if ip.is_ipv6() {
        128
    } else {
        32
    }
}

/// One of our two rules.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleSpec<'a> {
    v6: bool,
    /// `to <addr>/32` (or /128).
    dst: Option<IpAddr>,
    /// `iif <name>`.
    iif: Option<&'a str>,
    priority: u32,
    table: u32,
}

impl<'a> RuleSpec<'a> {
    /// `to <pod IP> lookup <table> pref 512`.
    fn forward(pod_ip: IpAddr, eni: &BranchEni) -> RuleSpec<'a> {
        RuleSpec {
            v6: pod_ip.is_ipv6(),
            dst: Some(pod_ip),
            iif: None,
            priority: FORWARD_PRIORITY,
            table: eni.table,
        }
    }

    /// `iif <veth> lookup local pref <iif pref - 1>`.
    fn return_path(pod_ip: IpAddr, eni: &'a BranchEni) -> RuleSpec<'a> {
        RuleSpec {
            v6: pod_ip.is_ipv6(),
            dst: None,
            iif: Some(&eni.veth),
            priority: eni.return_priority(),
            table: RT_TABLE_LOCAL,
        }
    }

    /// Error context.
    fn target(&self) -> Target {
        Target::BranchEniRule {
            ipv6: self.v6,
            forward: self.dst.is_some(),
        }
    }

    /// Appends an add or delete message for this rule.
    fn encode(&self, w: &mut Writer, ty: u16, flags: u16, seq: u32) {
        let m = w.msg_begin(ty, REQ | ACK | flags, seq);
        let dst_len = self.dst.map_or(0, host_prefix_len);
        // The header's table is one byte; a larger one travels in FRA_TABLE only (as iproute2 sends it).
        let hdr_table = u8::try_from(self.table).unwrap_or(RT_TABLE_UNSPEC as u8);
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags (u32).
        w.raw(&[
            family(self.v6),
            dst_len,
            0,
            0,
            hdr_table,
            0,
            0,
            FR_ACT_TO_TBL,
            0,
            0,
            0,
            0,
        ]);
        if let Some(dst) = self.dst {
            w.attr(FRA_DST, &addr_bytes(dst));
        }
        if let Some(iif) = self.iif {
            w.attr_str(FRA_IIFNAME, iif);
        }
        w.attr_ne32(FRA_PRIORITY, self.priority);
        w.attr_ne32(FRA_TABLE, self.table);
        w.msg_end(m);
    }
}

/// Sends one rule message and returns the kernel's error, if any.
fn send_rule(
    sock: &mut NlSocket,
    ty: u16,
    flags: u16,
    rule: &RuleSpec<'_>,
) -> Result<Option<Errno>, Error> {
    let mut w = Writer::default();
    let seq = sock.seq();
    rule.encode(&mut w, ty, flags, seq);
    Ok(sock
        .transact(&w.buf, &[seq], seq..=seq)?
        .pop()
        .map(|(_, errno)| errno))
}

/// Deletes one rule; an absent one (or a family the kernel does not have) is fine.
fn delete_rule(sock: &mut NlSocket, rule: &RuleSpec<'_>) -> Result<(), Error> {
    match send_rule(sock, RTM_DELRULE, 0, rule)? {
        None | Some(Errno::ENOENT | Errno::EAFNOSUPPORT) => Ok(()),
        Some(errno) => Err(Error::from_errno(rule.target(), errno)),
    }
}

/// An ip rule `iif <name> lookup <table>` with a table that could be aws-vpc-cni's.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IifRule {
    iif: String,
    table: u32,
    priority: u32,
}

/// The iif rules of one family, in kernel order; `None` when the kernel has no rules of that family.
fn iif_rules(sock: &mut NlSocket, v6: bool) -> Result<Option<Vec<IifRule>>, Error> {
    let seq = sock.seq();
    let mut w = Writer::default();
    let m = w.msg_begin(RTM_GETRULE, REQ | DUMP, seq);
    w.raw(&[family(v6), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    w.msg_end(m);
    let mut out = Vec::new();
    let target = Target::RouteDump { what: "ip rules" };
    let result = sock.dump(&w.buf, seq, target, |reply| {
        if let Some(rule) = parse_iif_rule(reply.payload) {
            out.push(rule);
        }
    });
    match result {
        Ok(()) => Ok(Some(out)),
        Err(Error::Rejected {
            errno: Errno::EAFNOSUPPORT,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Decodes one `RTM_NEWRULE` payload; keeps it only if it names an input interface and looks up a table that
/// is not unspecified, main or local.
fn parse_iif_rule(payload: &[u8]) -> Option<IifRule> {
    let hdr = payload.get(..FAMILY_HDR_LEN)?;
    let mut rule = IifRule {
        iif: String::new(),
        table: u32::from(hdr[4]),
        priority: 0,
    };
    for (ty, p) in attrs(&payload[FAMILY_HDR_LEN..]) {
        match ty {
            FRA_IIFNAME => rule.iif = string(p),
            FRA_PRIORITY => rule.priority = ne32(p).unwrap_or(0),
            FRA_TABLE => rule.table = ne32(p).unwrap_or(rule.table),
            _ => {}
        }
    }
    let lookup = ![RT_TABLE_UNSPEC, RT_TABLE_MAIN, RT_TABLE_LOCAL].contains(&rule.table);
    (!rule.iif.is_empty() && lookup).then_some(rule)
}

/// A host route to the pod IP: its table and output interface index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostRoute {
    table: u32,
    oif: u32,
}

/// The host routes (/32 or /128) to `pod_ip` in any table that leave by one interface (multipath routes
/// have no single one and are skipped). One dump of the family's routes: without strict checking the
/// kernel ignores a table filter in the request, so the filtering is done here.
fn host_routes(sock: &mut NlSocket, pod_ip: IpAddr) -> Result<Vec<HostRoute>, Error> {
    let seq = sock.seq();
    let mut w = Writer::default();
    let m = w.msg_begin(RTM_GETROUTE, REQ | DUMP, seq);
    w.raw(&[family(pod_ip.is_ipv6()), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    w.msg_end(m);
    let mut out = Vec::new();
    let target = Target::RouteDump { what: "routes" };
    sock.dump(&w.buf, seq, target, |reply| {
        if let Some(route) = parse_host_route(reply.payload, pod_ip) {
            out.push(route);
        }
    })?;
    Ok(out)
}

/// Decodes one `RTM_NEWROUTE` payload; keeps it only if it is a host route to `pod_ip` with an output interface.
fn parse_host_route(payload: &[u8], pod_ip: IpAddr) -> Option<HostRoute> {
    let hdr = payload.get(..FAMILY_HDR_LEN)?;
    if hdr[1] != host_prefix_len(pod_ip) {
        return None;
    }
    let want = addr_bytes(pod_ip);
    let mut table = u32::from(hdr[4]);
    let mut to_pod = false;
    let mut oif = None;
    for (ty, p) in attrs(&payload[FAMILY_HDR_LEN..]) {
        match ty {
            RTA_DST => to_pod = p == want.as_slice(),
            RTA_TABLE => table = ne32(p).unwrap_or(table),
            RTA_OIF => oif = ne32(p),
            _ => {}
        }
    }
    Some(HostRoute {
        table,
        oif: oif.filter(|_| to_pod)?,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::tests::{in_new_netns, run};
    use super::*;

    use crate::needs_root;

    fn gate_file(contents: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), contents).expect("write temp file");
        f
    }

    #[test]
    fn early_demux_zero_turns_branch_eni_handling_on() {
        assert!(early_demux_disabled(gate_file("0\n").path()));
    }

    #[test]
    fn kernel_default_early_demux_leaves_branch_eni_handling_off() {
        assert!(!early_demux_disabled(gate_file("1\n").path()));
        assert!(!early_demux_disabled(gate_file("").path()));
    }

    #[test]
    fn unreadable_early_demux_sysctl_leaves_branch_eni_handling_off() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(!early_demux_disabled(&dir.path().join("tcp_early_demux")));
    }

    fn eni(iif_priority: u32) -> BranchEni {
        BranchEni {
            table: 101,
            veth: "vlan.eth.1".into(),
            iif_priority,
        }
    }

    #[test]
    fn return_rule_goes_just_before_the_iif_rule_and_never_below_zero() {
        assert_eq!(eni(10).return_priority(), 9);
        assert_eq!(eni(1).return_priority(), 0);
        assert_eq!(eni(0).return_priority(), 0);
    }

    #[test]
    fn a_table_above_255_is_sent_in_fra_table_with_the_header_table_unset() {
        let e = BranchEni {
            table: 4100,
            ..eni(10)
        };
        let mut w = Writer::default();
        RuleSpec::forward(Ipv4Addr::new(10, 1, 2, 3).into(), &e).encode(&mut w, RTM_NEWRULE, 0, 1);
        let payload = &w.buf[super::super::netlink::NLMSG_HDRLEN..];
        assert_eq!(
            &payload[..FAMILY_HDR_LEN],
            &[2, 32, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        let got: Vec<(u16, Vec<u8>)> = attrs(&payload[FAMILY_HDR_LEN..])
            .map(|(t, p)| (t, p.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (FRA_DST, vec![10, 1, 2, 3]),
                (FRA_PRIORITY, 512u32.to_ne_bytes().to_vec()),
                (FRA_TABLE, 4100u32.to_ne_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn branch_eni_record_persists_with_stable_field_names() {
        let json = serde_json::to_string(&eni(10)).expect("serialize");
        assert_eq!(
            json,
            r#"{"table":101,"veth":"vlan.eth.1","iif_priority":10}"#
        );
        assert_eq!(
            serde_json::from_str::<BranchEni>(&json).expect("deserialize"),
            eni(10)
        );
    }

    const VETH: &str = "vlan.eth.1";

    /// aws-vpc-cni's scene for a branch-ENI pod: a veth (peer down: no traffic), `<ip> dev <veth> table N`
    /// and `iif <veth> lookup N pref P`.
    fn branch_eni_scene(veth: &str, ip: IpAddr, table: u32, pref: u32) {
        add_veth(veth);
        let fam = fam(ip);
        let (table, pref) = (table.to_string(), pref.to_string());
        let dst = ip.to_string();
        run(
            "ip",
            &[fam, "route", "add", &dst, "dev", veth, "table", &table],
        );
        run(
            "ip",
            &[
                fam, "rule", "add", "iif", veth, "lookup", &table, "pref", &pref,
            ],
        );
    }

    fn add_veth(veth: &str) {
        let peer = format!("{veth}p");
        run(
            "ip",
            &["link", "add", veth, "type", "veth", "peer", "name", &peer],
        );
        run("ip", &["link", "set", veth, "up"]);
    }

    fn fam(ip: IpAddr) -> &'static str {
        if ip.is_ipv6() {
            "-6"
        } else {
            "-4"
        }
    }

    /// `ip rule` of the family, one rule a line, `[detached]` markers dropped.
    fn ip_rules(ip: IpAddr) -> Vec<String> {
        run("ip", &[fam(ip), "rule", "show"])
            .lines()
            .map(|l| l.replace(" [detached]", "").replace('\t', " "))
            .collect()
    }

    /// A branch-ENI pod is detected, gets exactly the two rules (once, however often it is added), keeps
    /// being detected the same way with them in place, and loses exactly them on remove (also twice).
    fn branch_eni_pod_round_trip(ip: IpAddr, table: u32) {
        branch_eni_scene(VETH, ip, table, 10);
        let want = BranchEni {
            table,
            veth: VETH.into(),
            iif_priority: 10,
        };
        assert_eq!(detect(ip).expect("detect"), Some(want.clone()));

        let before = ip_rules(ip);
        add(ip, &want).expect("add");
        let forward = format!("512: from all to {ip} lookup {table}");
        let back = format!("9: from all iif {VETH} lookup local");
        let mut expected = before.clone();
        expected.push(forward);
        expected.push(back);
        let mut after = ip_rules(ip);
        expected.sort();
        after.sort();
        assert_eq!(after, expected, "exactly the two rules were added");

        add(ip, &want).expect("adding again is fine");
        let mut again = ip_rules(ip);
        again.sort();
        assert_eq!(again, expected, "adding again duplicates nothing");
        assert_eq!(
            detect(ip).expect("detect with our rules"),
            Some(want.clone()),
            "our rules do not change what is detected (agent restart)"
        );

        remove(ip, &want).expect("remove");
        assert_eq!(
            ip_rules(ip),
            before,
            "remove leaves aws-vpc-cni's rules only"
        );
        remove(ip, &want).expect("removing again is fine");
        assert_eq!(ip_rules(ip), before);
    }

    #[test]
    fn ipv4_branch_eni_pod_gets_forward_and_return_rules_and_loses_them_on_remove() {
        needs_root!("ipv4_branch_eni_pod_gets_forward_and_return_rules_and_loses_them_on_remove");
        in_new_netns(|| branch_eni_pod_round_trip(Ipv4Addr::new(10, 1, 2, 3).into(), 101));
    }

    #[test]
    fn ipv6_branch_eni_pod_gets_forward_and_return_rules_and_loses_them_on_remove() {
        needs_root!("ipv6_branch_eni_pod_gets_forward_and_return_rules_and_loses_them_on_remove");
        in_new_netns(|| {
            let ipv6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/disable_ipv6")
                .is_ok_and(|v| v.trim() == "0");
            if !crate::test_gate::needs(
                "ipv6_branch_eni_pod_gets_forward_and_return_rules_and_loses_them_on_remove",
                ipv6,
                "needs IPv6 in network namespaces",
            ) {
                return;
            }
            // A table above 255 only fits in FRA_TABLE (aws-vpc-cni numbers branch-ENI tables from 100 up).
            branch_eni_pod_round_trip(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(), 1100);
        });
    }

    #[test]
    fn regular_pod_routed_by_main_is_not_a_branch_eni_pod() {
        needs_root!("regular_pod_routed_by_main_is_not_a_branch_eni_pod");
        in_new_netns(|| {
            add_veth("eni0a1b2c3d");
            run("ip", &["route", "add", "10.1.2.4/32", "dev", "eni0a1b2c3d"]);
            run(
                "ip",
                &[
                    "rule", "add", "to", "10.1.2.4", "lookup", "main", "pref", "512",
                ],
            );
            assert_eq!(
                detect(Ipv4Addr::new(10, 1, 2, 4).into()).expect("detect"),
                None
            );
        });
    }

    #[test]
    fn pod_ip_without_a_route_in_the_iif_rules_table_is_not_a_branch_eni_pod() {
        needs_root!("pod_ip_without_a_route_in_the_iif_rules_table_is_not_a_branch_eni_pod");
        in_new_netns(|| {
            branch_eni_scene(VETH, Ipv4Addr::new(10, 1, 2, 3).into(), 101, 10);
            assert_eq!(
                detect(Ipv4Addr::new(10, 1, 2, 5).into()).expect("detect"),
                None
            );
        });
    }

    #[test]
    fn route_leaving_by_another_interface_than_the_iif_rule_names_is_not_a_branch_eni_pod() {
        needs_root!(
            "route_leaving_by_another_interface_than_the_iif_rule_names_is_not_a_branch_eni_pod"
        );
        in_new_netns(|| {
            add_veth("vlan.other");
            run(
                "ip",
                &[
                    "route",
                    "add",
                    "10.1.2.3/32",
                    "dev",
                    "vlan.other",
                    "table",
                    "101",
                ],
            );
            run(
                "ip",
                &["rule", "add", "iif", VETH, "lookup", "101", "pref", "10"],
            );
            assert_eq!(
                detect(Ipv4Addr::new(10, 1, 2, 3).into()).expect("detect"),
                None
            );
        });
    }

    /// An interface name the kernel refuses (longer than IFNAMSIZ - 1) makes the return rule fail after
    /// the forward rule went in.
    fn unacceptable_veth() -> BranchEni {
        BranchEni {
            veth: "vlan.name.too.long.for.linux".into(),
            ..eni(10)
        }
    }

    #[test]
    fn a_refused_return_rule_takes_the_forward_rule_back_out() {
        needs_root!("a_refused_return_rule_takes_the_forward_rule_back_out");
        in_new_netns(|| {
            let ip: IpAddr = Ipv4Addr::new(10, 1, 2, 3).into();
            let before = ip_rules(ip);
            let err = add(ip, &unacceptable_veth()).expect_err("the kernel refuses the name");
            assert!(err.to_string().contains("iif <veth> lookup local"), "{err}");
            assert_eq!(ip_rules(ip), before, "no forward rule left behind");
        });
    }

    #[test]
    fn a_forward_rule_that_was_already_there_stays_when_the_return_rule_is_refused() {
        needs_root!("a_forward_rule_that_was_already_there_stays_when_the_return_rule_is_refused");
        in_new_netns(|| {
            let ip: IpAddr = Ipv4Addr::new(10, 1, 2, 3).into();
            run(
                "ip",
                &[
                    "rule", "add", "to", "10.1.2.3", "lookup", "101", "pref", "512",
                ],
            );
            let before = ip_rules(ip);
            let err = add(ip, &unacceptable_veth()).expect_err("the kernel refuses the name");
            assert!(err.to_string().contains("iif <veth> lookup local"), "{err}");
            assert_eq!(
                ip_rules(ip),
                before,
                "the existing forward rule is not ours to remove"
            );
        });
    }
}
