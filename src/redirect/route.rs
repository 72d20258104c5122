//! The routing side of [`super`]: `ip rule fwmark 0x111/0xfff pref 32764 lookup 100` and
//! `local 0.0.0.0/0 (::/0) dev lo table 100`, over rtnetlink.
//!
//! Input: which families to program. Output: rules and routes added (idempotently), removed, or read back
//! as [`IpRuleState`]s and local routes of table 100.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nix::errno::Errno;

use super::netlink::{attrs, ne32, NlSocket, Writer};
use super::rules::{CONN_MARK, MARK_MASK};
use super::{Error, IpRuleState, Target};

/// Routing table for replies to ztunnel's connections (Istio's `RouteTableInpod`).
pub(super) const TABLE: u32 = 100;
/// Preference of the fwmark rule.
pub(super) const PRIORITY: u32 = 32764;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_DST: u16 = libc::RTA_DST;
const RTA_OIF: u16 = libc::RTA_OIF;
const RTA_TABLE: u16 = libc::RTA_TABLE;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_BOOT: u8 = 3;

const REQ: u16 = libc::NLM_F_REQUEST as u16;
const ACK: u16 = libc::NLM_F_ACK as u16;

fn family(v6: bool) -> u8 {
    if v6 {
        libc::AF_INET6 as u8
    } else {
        libc::AF_INET as u8
    }
}

/// Index of `lo` in the calling thread's namespace.
pub(super) fn lo_index() -> Result<u32, Error> {
    nix::net::if_::if_nametoindex("lo").map_err(|errno| Error::Rejected {
        target: Target::RouteDump {
            what: "the index of lo",
        },
        errno,
    })
}

/// Whether `lo` has IPv6 turned on in the calling thread's namespace (`/proc/sys/net` follows the
/// namespace of the thread that opens it). Without it the kernel refuses a v6 route via `lo`.
pub(super) fn lo_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .map(|v| v.trim() == "0")
        .unwrap_or(false)
}

/// Appends an ip rule message (add or delete) for one family.
fn rule_msg(w: &mut Writer, ty: u16, flags: u16, seq: u32, v6: bool) {
    let m = w.msg_begin(ty, REQ | ACK | flags, seq);
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags (u32).
    w.raw(&[
        family(v6),
        0,
        0,
        0,
        TABLE as u8,
        0,
        0,
        FR_ACT_TO_TBL,
        0,
        0,
        0,
        0,
    ]);
    w.attr_ne32(FRA_PRIORITY, PRIORITY);
    w.attr_ne32(FRA_FWMARK, CONN_MARK);
    w.attr_ne32(FRA_FWMASK, MARK_MASK);
    w.attr_ne32(FRA_TABLE, TABLE);
    w.msg_end(m);
}

/// Appends a local-route message (add/replace or delete) for one family.
fn route_msg(w: &mut Writer, ty: u16, flags: u16, seq: u32, v6: bool, lo: u32) {
    let m = w.msg_begin(ty, REQ | ACK | flags, seq);
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    w.raw(&[
        family(v6),
        0,
        0,
        0,
        TABLE as u8,
        RTPROT_BOOT,
        RT_SCOPE_HOST,
        libc::RTN_LOCAL,
        0,
        0,
        0,
        0,
    ]);
    w.attr_ne32(RTA_TABLE, TABLE);
    w.attr_ne32(RTA_OIF, lo);
    w.msg_end(m);
}

/// Adds the fwmark rules and local routes: rules with `NLM_F_EXCL` (an existing one is left alone, never
/// duplicated), routes with `NLM_F_REPLACE`, all in one send. Then deletes IPv6 pieces that are not wanted.
pub(super) fn install(sock: &mut NlSocket, v6_rule: bool, v6_route: bool) -> Result<(), Error> {
    let lo = lo_index()?;
    let mut w = Writer::default();
    let mut acked = Vec::new();
    let create = libc::NLM_F_CREATE as u16;
    for v6 in [false, true] {
        if v6 && !v6_rule {
            continue;
        }
        let seq = sock.seq();
        rule_msg(
            &mut w,
            RTM_NEWRULE,
            create | libc::NLM_F_EXCL as u16,
            seq,
            v6,
        );
        acked.push((seq, Target::IpRule { ipv6: v6 }));
    }
    for v6 in [false, true] {
        if v6 && !v6_route {
            continue;
        }
        let seq = sock.seq();
        let flags = create | libc::NLM_F_REPLACE as u16;
        route_msg(&mut w, RTM_NEWROUTE, flags, seq, v6, lo);
        acked.push((seq, Target::LocalRoute { ipv6: v6 }));
    }
    let errors = run(sock, &w, &acked)?;
    if let Some((_, target, errno)) = errors
        .into_iter()
        .find(|(_, _, errno)| *errno != Errno::EEXIST)
    {
        return Err(Error::from_errno(target, errno));
    }
    // Replace, not just add: IPv6 pieces of an earlier install with IPv6 go away.
    if !v6_rule {
        delete_rules(sock, true)?;
    }
    if !v6_route {
        delete_route(sock, true, lo)?;
    }
    Ok(())
}

/// Removes every copy of our fwmark rules and our local routes; absent ones are fine.
pub(super) fn remove(sock: &mut NlSocket) -> Result<(), Error> {
    let lo = lo_index()?;
    for v6 in [false, true] {
        delete_rules(sock, v6)?;
        delete_route(sock, v6, lo)?;
    }
    Ok(())
}

/// Deletes the fwmark rule of one family until the kernel says there is none left (an older tool may have
/// added duplicates); bounded so a kernel that keeps saying "deleted" cannot loop us forever.
fn delete_rules(sock: &mut NlSocket, v6: bool) -> Result<(), Error> {
    for _ in 0..16 {
        let mut w = Writer::default();
        let seq = sock.seq();
        rule_msg(&mut w, RTM_DELRULE, 0, seq, v6);
        match run(sock, &w, &[(seq, Target::IpRule { ipv6: v6 })])?.pop() {
            None => continue,
            Some((_, _, Errno::ENOENT | Errno::EAFNOSUPPORT)) => break,
            Some((_, target, errno)) => return Err(Error::from_errno(target, errno)),
        }
    }
    Ok(())
}

/// Deletes the local route of one family; an absent one is fine.
fn delete_route(sock: &mut NlSocket, v6: bool, lo: u32) -> Result<(), Error> {
    let mut w = Writer::default();
    let seq = sock.seq();
    route_msg(&mut w, RTM_DELROUTE, 0, seq, v6, lo);
    match run(sock, &w, &[(seq, Target::LocalRoute { ipv6: v6 })])?.pop() {
        None | Some((_, _, Errno::ENOENT | Errno::ESRCH | Errno::EAFNOSUPPORT | Errno::ENODEV)) => {
            Ok(())
        }
        Some((_, target, errno)) => Err(Error::from_errno(target, errno)),
    }
}

/// Sends the messages in `w` and returns the errors with their targets.
fn run(
    sock: &mut NlSocket,
    w: &Writer,
    acked: &[(u32, Target)],
) -> Result<Vec<(u32, Target, Errno)>, Error> {
    let seqs: Vec<u32> = acked.iter().map(|(s, _)| *s).collect();
    let (first, last) = match (seqs.first(), seqs.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Ok(Vec::new()),
    };
    let errors = sock.transact(&w.buf, &seqs, first..=last)?;
    Ok(errors
        .into_iter()
        .map(|(seq, errno)| {
            let target = acked
                .iter()
                .find(|(s, _)| *s == seq)
                .map_or(Target::Batch, |(_, t)| *t);
            (seq, target, errno)
        })
        .collect())
}

/// Reads back the ip rules that look up our table, both families.
pub(super) fn dump_rules(sock: &mut NlSocket) -> Result<Vec<IpRuleState>, Error> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let seq = sock.seq();
        let mut w = Writer::default();
        let m = w.msg_begin(RTM_GETRULE, REQ | libc::NLM_F_DUMP as u16, seq);
        w.raw(&[family(v6), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        w.msg_end(m);
        let result = sock.dump(
            &w.buf,
            seq,
            Target::RouteDump { what: "ip rules" },
            |reply| {
                let Some(hdr) = reply.payload.get(..12) else {
                    return;
                };
                let mut rule = IpRuleState {
                    ipv6: hdr[0] == libc::AF_INET6 as u8,
                    priority: 0,
                    fwmark: 0,
                    fwmask: 0,
                    table: u32::from(hdr[4]),
                };
                for (ty, p) in attrs(&reply.payload[12..]) {
                    let v = ne32(p).unwrap_or(0);
                    match ty {
                        FRA_PRIORITY => rule.priority = v,
                        FRA_FWMARK => rule.fwmark = v,
                        FRA_FWMASK => rule.fwmask = v,
                        FRA_TABLE => rule.table = v,
                        _ => {}
                    }
                }
                if rule.table == TABLE {
                    out.push(rule);
                }
            },
        );
        match result {
            // A kernel without IPv6 has no v6 rules to show.
            Err(Error::Rejected {
                errno: Errno::EAFNOSUPPORT,
                ..
            }) if v6 => {}
            other => other?,
        }
    }
    Ok(out)
}

/// Reads back the local routes of our table, both families.
pub(super) fn dump_local_routes(sock: &mut NlSocket) -> Result<Vec<IpNet>, Error> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let seq = sock.seq();
        let mut w = Writer::default();
        let m = w.msg_begin(RTM_GETROUTE, REQ | libc::NLM_F_DUMP as u16, seq);
        w.raw(&[family(v6), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        w.msg_end(m);
        let result = sock.dump(&w.buf, seq, Target::RouteDump { what: "routes" }, |reply| {
            let Some(hdr) = reply.payload.get(..12) else {
                return;
            };
            let (fam, dst_len, mut table, kind) = (hdr[0], hdr[1], u32::from(hdr[4]), hdr[7]);
            let mut dst: IpAddr = if fam == libc::AF_INET6 as u8 {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            for (ty, p) in attrs(&reply.payload[12..]) {
                match ty {
                    RTA_TABLE => table = ne32(p).unwrap_or(table),
                    RTA_DST => {
                        if let Ok(b) = <[u8; 4]>::try_from(p) {
                            dst = b.into();
                        } else if let Ok(b) = <[u8; 16]>::try_from(p) {
                            dst = b.into();
                        }
                    }
                    _ => {}
                }
            }
            if table == TABLE && kind == libc::RTN_LOCAL {
                if let Ok(net) = IpNet::new(dst, dst_len) {
                    out.push(net);
                }
            }
        });
        match result {
            Err(Error::Rejected {
                errno: Errno::EAFNOSUPPORT,
                ..
            }) if v6 => {}
            other => other?,
        }
    }
    Ok(out)
}
