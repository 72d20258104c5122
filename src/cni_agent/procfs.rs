//! Finding a running pod's network namespace by scanning procfs, as istio-cni does after a restart or when
//! it captures a pod that started before the agent (reference/istio-cni.md §1.6 step 1, §1.11 step 3).
//!
//! Input: the host's `/proc` (mounted at `/host/proc` in the DaemonSet), a pod UID and the pod's IPs.
//! Output: the path of a process's netns file (`<proc_root>/<pid>/ns/net`) that belongs to the pod.
//! A process belongs to a pod when its cgroup path names the pod UID, in either kubelet layout:
//! cgroupfs (`.../kubepods/burstable/pod<uid>/<container>`) or systemd
//! (`.../kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`). Processes in the
//! host netns are skipped (host-network pods have no netns of their own), candidate namespaces are
//! de-duplicated by inode, the one whose oldest process started first wins, and a candidate is accepted only
//! if it actually holds one of the pod's IPs (listed over rtnetlink from a thread inside the namespace).
//!
//! Also [`find_kubelet_uid`]: the uid owning kubelet's process, for the host probe SNAT rule.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::netns::Netns;

/// At most this many distinct namespaces are checked for one pod. A pod has one; more means processes in
/// odd places (e.g. `nsenter` sessions), and the oldest ones are the likely answer.
const MAX_CANDIDATES: usize = 16;

/// Receive buffer for the address dump: a page-sized multiple that holds many address messages per read.
const NETLINK_RECV_BUFFER: usize = 32 * 1024;

/// Upper bound on netlink messages read for one dump, so a misbehaving socket cannot loop forever.
/// A pod netns has a handful of addresses.
const MAX_DUMP_MESSAGES: usize = 4096;

/// Why the addresses of a namespace could not be listed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The namespace file could not be opened or entered.
    #[error("netns {path}: {source}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A netlink socket operation failed.
    #[error("rtnetlink {op}: {source}")]
    Netlink {
        /// What was being done (`socket`, `send`, `recv`).
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel answered with something that does not parse, or with an error.
    #[error("rtnetlink address dump: {reason}")]
    Dump {
        /// What was wrong.
        reason: String,
    },
}

/// The netns of the pod with `pod_uid` among the processes under `proc_root`, or `None` when no process of
/// the pod runs in a namespace holding one of `pod_ips`.
pub fn find_pod_netns(proc_root: &Path, pod_uid: &str, pod_ips: &[IpAddr]) -> Option<PathBuf> {
    find_pod_netns_with(proc_root, pod_uid, |netns| match netns_addresses(netns) {
        Ok(addrs) => addrs.iter().any(|a| pod_ips.contains(a)),
        Err(e) => {
            tracing::debug!(netns = %netns.display(), error = %e, "cannot list netns addresses");
            false
        }
    })
}

/// [`find_pod_netns`] with the "does this netns hold one of the pod's IPs" check given as `holds_pod_ip`.
pub fn find_pod_netns_with(
    proc_root: &Path,
    pod_uid: &str,
    mut holds_pod_ip: impl FnMut(&Path) -> bool,
) -> Option<PathBuf> {
    let want = normalize_uid(pod_uid);
    let host_netns = fs::metadata(proc_root.join("1/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let entries = match fs::read_dir(proc_root) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(proc_root = %proc_root.display(), error = %e, "cannot read procfs");
            return None;
        }
    };
    // Namespace (dev, inode) → the oldest process seen in it: (starttime, pid).
    let mut oldest: HashMap<(u64, u64), (u64, u32)> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        // Processes come and go during the scan: any read failure just skips the process.
        let Ok(cgroup) = fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        if pod_uid_from_cgroup(&cgroup).as_deref() != Some(want.as_str()) {
            continue;
        }
        let Ok(meta) = fs::metadata(dir.join("ns/net")) else {
            continue;
        };
        let ns = (meta.dev(), meta.ino());
        if Some(ns) == host_netns {
            continue;
        }
        let Some(start) = fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| starttime_from_stat(&s))
        else {
            continue;
        };
        let slot = oldest.entry(ns).or_insert((start, pid));
        if (start, pid) < *slot {
            *slot = (start, pid);
        }
    }
    let mut candidates: Vec<(u64, u32)> = oldest.into_values().collect();
    candidates.sort_unstable();
    candidates
        .into_iter()
        .take(MAX_CANDIDATES)
        .map(|(_, pid)| proc_root.join(pid.to_string()).join("ns/net"))
        .find(|path| holds_pod_ip(path))
}

/// The pod UID named in a `/proc/<pid>/cgroup` file (lowercase, dashed), if any line has one.
pub fn pod_uid_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        // `hierarchy-id:controllers:path`; the path may itself contain ':' (never in kubepods paths).
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/').find_map(pod_uid_from_segment)
    })
}

/// One cgroup path segment: `pod<uid>` (cgroupfs) or `...-pod<uid_underscored>.slice` (systemd).
fn pod_uid_from_segment(segment: &str) -> Option<String> {
    let candidate = if let Some(slice) = segment.strip_suffix(".slice") {
        let at = slice.rfind("-pod")?;
        &slice[at + "-pod".len()..]
    } else {
        segment.strip_prefix("pod")?
    };
    let uid = normalize_uid(candidate);
    looks_like_uid(&uid).then_some(uid)
}

/// Lowercase, with systemd's underscores turned back into dashes.
fn normalize_uid(uid: &str) -> String {
    uid.trim().to_ascii_lowercase().replace('_', "-")
}

/// A Kubernetes pod UID: a UUID (36 chars, dashed) or a static pod's config hash (32 hex chars).
fn looks_like_uid(s: &str) -> bool {
    let dashed = s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    let hash = s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit());
    dashed || hash
}

/// Field 22 (`starttime`, clock ticks since boot) of `/proc/<pid>/stat`. The command name (field 2) is in
/// parentheses and may contain spaces or ')', so counting starts after the last ')'.
fn starttime_from_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' comes field 3 (state); field 22 is the 20th from there.
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// Process names that run kubelet: `kubelet`, MicroK8s' `kubelite`, and k3s (`k3s`, or `k3s-server` /
/// `k3s-agent` once it has renamed itself).
fn is_kubelet_name(comm: &str) -> bool {
    matches!(comm, "kubelet" | "kubelite" | "k3s") || comm.starts_with("k3s-")
}

/// The real uid of the kubelet process under `proc_root` (the host's `/proc`), for the host probe rule
/// ([`crate::redirect::host`]), which matches kubelet's sockets by owner since nftables has no
/// `--socket-exists`. A process is kubelet when its name (`<pid>/comm`, else the name in `<pid>/stat`) is
/// one of those [`is_kubelet_name`] accepts; its uid is the first field of the `Uid:` line of
/// `<pid>/status`. With several, the lowest pid wins. `None` when no such process is readable.
pub fn find_kubelet_uid(proc_root: &Path) -> Option<u32> {
    let entries = match fs::read_dir(proc_root) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(proc_root = %proc_root.display(), error = %e, "cannot read procfs");
            return None;
        }
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    pids.sort_unstable();
    pids.into_iter().find_map(|pid| {
        let dir = proc_root.join(pid.to_string());
        // Processes come and go during the scan: any read failure just skips the process.
        let name = fs::read_to_string(dir.join("comm"))
            .ok()
            .map(|c| c.trim_end_matches('\n').to_owned())
            .or_else(|| {
                let stat = fs::read_to_string(dir.join("stat")).ok()?;
                let (open, close) = (stat.find('(')?, stat.rfind(')')?);
                Some(stat.get(open + 1..close)?.to_owned())
            })?;
        if !is_kubelet_name(&name) {
            return None;
        }
        let status = fs::read_to_string(dir.join("status")).ok()?;
        real_uid_from_status(&status)
    })
}

/// The real uid (first field of the `Uid:` line) of a `/proc/<pid>/status` file.
fn real_uid_from_status(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The addresses configured in the namespace at `netns`, listed over rtnetlink from a thread inside it.
pub fn netns_addresses(netns: &Path) -> Result<Vec<IpAddr>, Error> {
    let ns_err = |source| Error::Netns {
        path: netns.to_path_buf(),
        source,
    };
    let ns = Arc::new(Netns::open(netns).map_err(ns_err)?);
    ns.run_on_thread(dump_addresses).map_err(ns_err)?
}

/// An `RTM_GETADDR` dump in the calling thread's namespace.
fn dump_addresses() -> Result<Vec<IpAddr>, Error> {
    let nl = |op| move |source| Error::Netlink { op, source };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(nl("socket"))?;
    socket.bind_auto().map_err(nl("bind"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(nl("connect"))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0).map_err(nl("send"))?;

    let mut addrs = Vec::new();
    let mut buf = vec![0u8; NETLINK_RECV_BUFFER];
    let mut seen = 0usize;
    loop {
        let size = socket.recv(&mut &mut buf[..], 0).map_err(nl("recv"))?;
        let mut offset = 0;
        while offset < size {
            seen += 1;
            if seen > MAX_DUMP_MESSAGES {
                return Err(Error::Dump {
                    reason: format!("more than {MAX_DUMP_MESSAGES} messages"),
                });
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..size])
                .map_err(|e| Error::Dump {
                    reason: e.to_string(),
                })?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(addrs),
                NetlinkPayload::Error(e) => {
                    return Err(Error::Dump {
                        reason: format!("kernel error {e:?}"),
                    })
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => {
                    // IFA_LOCAL is the local address on point-to-point links; IFA_ADDRESS otherwise.
                    let local = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let address = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    addrs.extend(local.into_iter().chain(address));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

#[cfg(test)]
mod tests;
