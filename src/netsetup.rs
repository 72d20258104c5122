//! Network plumbing for `meshnode sandbox`: named network namespaces, veth pairs, addresses, routes and
//! a few sysctls, through rtnetlink and plain syscalls (no `ip`, `iptables` or `nft` binaries).
//!
//! Input: names (namespaces, interfaces), prefixes and gateways. Output: kernel state in the network
//! namespace of the *calling thread* (wrap calls in [`Netns::run`] / [`Netns::run_on_thread`] to work in
//! another one); [`create_veth`] is the one call that touches a second namespace, given as a [`Netns`].
//! Every call is synchronous and opens its own netlink socket, so it belongs to the caller's thread and
//! namespace. Failures are an [`Error`] naming the operation, the object and the errno; `EPERM`/`EACCES`
//! become [`Error::NeedsRoot`]. Owned by the sandbox; nothing on a proxy's data path uses it.
//!
//! Named namespaces follow iproute2's layout, so `ip netns list` / `ip -n NAME ...` see them: a file in
//! [`NETNS_RUN_DIR`] with the namespace bind-mounted on it, the directory itself a shared mount.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::netns::Netns;

#[cfg(test)]
mod tests;

/// Where named namespaces live, as in iproute2 (`NETNS_RUN_DIR`), so `ip netns` sees ours and we see its.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Longest interface name the kernel takes (`IFNAMSIZ` minus the terminating NUL).
const MAX_IFNAME_LEN: usize = 15;

/// Receive buffer for one acknowledgement. An ack echoes at most our request (a few hundred bytes) plus
/// extended-ack attributes; one page-sized multiple is plenty.
const NETLINK_RECV_BUFFER: usize = 32 * 1024;

/// Upper bound on netlink messages read while waiting for one ack, so a socket that keeps delivering
/// unrelated messages cannot loop us forever (a fresh unicast socket gets none).
const MAX_MESSAGES_PER_ACK: usize = 64;

/// The main routing table (`RT_TABLE_MAIN`), where `ip route add` puts routes.
const RT_TABLE_MAIN: u8 = RouteHeader::RT_TABLE_MAIN;

/// Serializes turning [`NETNS_RUN_DIR`] into a shared mount within this process, so two threads creating
/// namespaces at once do not stack two bind mounts. Guards a kernel object (the mount table), not data.
static NETNS_DIR_SETUP: parking_lot::Mutex<()> = parking_lot::const_mutex(());

/// Why a network setup step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused for lack of privilege (`EPERM`/`EACCES`).
    #[error("{op} {object}: needs root (CAP_NET_ADMIN / CAP_SYS_ADMIN): {errno}")]
    NeedsRoot {
        /// What was being done.
        op: &'static str,
        /// What it was done to (interface, namespace path, file).
        object: String,
        /// The errno, `EPERM` or `EACCES`.
        errno: Errno,
    },
    /// The named interface does not exist in the calling thread's namespace.
    #[error("{op}: no interface named {ifname:?} in this network namespace")]
    NoSuchInterface {
        /// What was being done.
        op: &'static str,
        /// The missing interface.
        ifname: String,
    },
    /// A named namespace of that name already exists (`ip netns add` refuses too).
    #[error("creating netns {name:?}: {path} already exists")]
    NetnsExists {
        /// The namespace name.
        name: String,
        /// Its file.
        path: PathBuf,
    },
    /// A name the kernel or iproute2 would not accept (empty, too long, containing `/`).
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// `"interface"` or `"netns"`.
        what: &'static str,
        /// The name.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A route whose gateway is of another address family than its destination.
    #[error("route to {dst} via {via}: address families differ")]
    MixedFamilies {
        /// The destination.
        dst: IpNet,
        /// The gateway.
        via: IpAddr,
    },
    /// A syscall or netlink request failed with an errno.
    #[error("{op} {object}: {errno}")]
    Failed {
        /// What was being done.
        op: &'static str,
        /// What it was done to.
        object: String,
        /// The errno.
        errno: Errno,
    },
    /// The kernel's answer did not parse, or a helper thread died.
    #[error("{op} {object}: {reason}")]
    Protocol {
        /// What was being done.
        op: &'static str,
        /// What it was done to.
        object: String,
        /// What was wrong.
        reason: String,
    },
}

impl Error {
    /// Classifies an errno: privilege problems become [`Error::NeedsRoot`].
    pub fn from_errno(op: &'static str, object: impl Into<String>, errno: Errno) -> Error {
        let object = object.into();
        match errno {
            Errno::EPERM | Errno::EACCES => Error::NeedsRoot { op, object, errno },
            errno => Error::Failed { op, object, errno },
        }
    }

    fn from_io(op: &'static str, object: impl Into<String>, e: &io::Error) -> Error {
        match e.raw_os_error() {
            Some(raw) => Error::from_errno(op, object, Errno::from_raw(raw)),
            None => Error::Protocol {
                op,
                object: object.into(),
                reason: e.to_string(),
            },
        }
    }

    /// The errno behind a failed syscall or request, if that is what this error is.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::NeedsRoot { errno, .. } | Error::Failed { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Creates the named namespace `name`, like `ip netns add`: [`NETNS_RUN_DIR`] is created and made a shared
/// mount (once), an empty file is created there, and a fresh thread unshares its network namespace and
/// bind-mounts it onto that file; `lo` is brought up inside. Returns the file's path. On failure nothing
/// is left behind.
pub fn create_named_netns(name: &str) -> Result<PathBuf, Error> {
    let path = netns_path(name)?;
    prepare_run_dir()?;
    let created = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        // No permission bits, as iproute2 makes it: the file is only a mount point.
        .mode(0o000)
        .open(&path);
    match created {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::NetnsExists {
                name: name.into(),
                path,
            })
        }
        Err(e) => return Err(Error::from_io("creating netns file", path_str(&path), &e)),
    }
    let target = path.clone();
    let result = std::thread::Builder::new()
        .name("meshnode-netns-add".into())
        .spawn(move || -> Result<(), Error> {
            // The thread ends right after, so leaving it in the new namespace is fine.
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::from_errno("unsharing netns for", path_str(&target), e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| Error::from_errno("bind-mounting netns on", path_str(&target), e))?;
            set_up("lo")
        })
        .map_err(|e| Error::from_io("spawning a thread for netns", path_str(&path), &e))
        .and_then(|thread| {
            thread.join().unwrap_or_else(|_| {
                Err(Error::Protocol {
                    op: "creating netns",
                    object: path_str(&path),
                    reason: "thread panicked".into(),
                })
            })
        });
    if let Err(e) = result {
        let _ = delete_named_netns(name);
        return Err(e);
    }
    Ok(path)
}

/// Deletes the named namespace `name`, like `ip netns del`: detaches the bind mount and removes the file.
/// The namespace itself goes away once nothing else (a process, an open fd) holds it. Absent is fine.
pub fn delete_named_netns(name: &str) -> Result<(), Error> {
    let path = netns_path(name)?;
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: the file exists but nothing is mounted on it (a half-made namespace).
        Ok(()) | Err(Errno::ENOENT | Errno::EINVAL) => {}
        Err(e) => return Err(Error::from_errno("unmounting netns", path_str(&path), e)),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::from_io("removing netns file", path_str(&path), &e)),
    }
}

/// Creates the veth pair `name` (here) / `peer` (moved into `peer_netns` as it is created).
pub fn create_veth(name: &str, peer: &str, peer_netns: &Netns) -> Result<(), Error> {
    check_ifname(name)?;
    check_ifname(peer)?;
    let mut peer_msg = LinkMessage::default();
    peer_msg.attributes = vec![
        LinkAttribute::IfName(peer.into()),
        LinkAttribute::NetNsFd(peer_netns.as_fd().as_raw_fd()),
    ];
    let mut msg = LinkMessage::default();
    msg.attributes = vec![
        LinkAttribute::IfName(name.into()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]),
    ];
    // The fd inside the message must stay open until the kernel has the request: `peer_netns` is borrowed
    // for the whole call.
    request(
        "creating veth",
        &format!("{name} (peer {peer} in {})", peer_netns.id()),
        RouteNetlinkMessage::NewLink(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Brings `ifname` up (`ip link set IFNAME up`).
pub fn set_up(ifname: &str) -> Result<(), Error> {
    const OP: &str = "setting link up";
    let index = require_index(OP, ifname)?;
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    request(OP, ifname, RouteNetlinkMessage::NewLink(msg), 0)
}

/// Adds `cidr` (address and prefix length) to `ifname`; an address already there is fine.
pub fn add_address(ifname: &str, cidr: IpNet) -> Result<(), Error> {
    const OP: &str = "adding address";
    let index = require_index(OP, ifname)?;
    let mut msg = AddressMessage::default();
    msg.header.family = family(cidr.addr());
    msg.header.prefix_len = cidr.prefix_len();
    msg.header.index = index;
    // IFA_LOCAL is the address itself; IFA_ADDRESS the same again (it would be the peer on a
    // point-to-point link), exactly as `ip addr add` sends it.
    msg.attributes = vec![
        AddressAttribute::Local(cidr.addr()),
        AddressAttribute::Address(cidr.addr()),
    ];
    let object = format!("{cidr} on {ifname}");
    match request(
        OP,
        &object,
        RouteNetlinkMessage::NewAddress(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(e) if e.errno() == Some(Errno::EEXIST) => Ok(()),
        other => other,
    }
}

/// Adds or replaces the route to `dst` (host bits are dropped) out of `dev`, through `via` if given, in the
/// main table (`ip route replace DST [via VIA] dev DEV [onlink]`).
pub fn add_route(dst: IpNet, via: Option<IpAddr>, dev: &str, onlink: bool) -> Result<(), Error> {
    const OP: &str = "adding route";
    let dst = dst.trunc();
    if let Some(via) = via {
        if via.is_ipv4() != dst.addr().is_ipv4() {
            return Err(Error::MixedFamilies { dst, via });
        }
    }
    let index = require_index(OP, dev)?;
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(dst.addr());
    msg.header.destination_prefix_length = dst.prefix_len();
    msg.header.table = RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    // Without a gateway the destination is directly on the link; with one, the route is global.
    msg.header.scope = if via.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    msg.header.kind = RouteType::Unicast;
    if onlink {
        msg.header.flags = RouteFlags::Onlink;
    }
    if dst.prefix_len() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
    }
    if let Some(via) = via {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(via)));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    let object = match via {
        Some(via) => format!("{dst} via {via} dev {dev}"),
        None => format!("{dst} dev {dev}"),
    };
    request(
        OP,
        &object,
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}

/// Turns IPv4 and IPv6 forwarding on or off in the calling thread's namespace (`/proc/sys/net` follows the
/// namespace of the thread that opens it). A kernel without IPv6 is fine when `v6` is false.
pub fn set_forwarding(v4: bool, v6: bool) -> Result<(), Error> {
    write_sysctl(Path::new("/proc/sys/net/ipv4/ip_forward"), v4)?;
    match write_sysctl(Path::new("/proc/sys/net/ipv6/conf/all/forwarding"), v6) {
        Err(e) if !v6 && e.errno() == Some(Errno::ENOENT) => Ok(()),
        other => other,
    }
}

/// Deletes `ifname` (for a veth, both ends go); an absent interface is fine.
pub fn delete_link(ifname: &str) -> Result<(), Error> {
    let Some(index) = link_index(ifname)? else {
        return Ok(());
    };
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    match request(
        "deleting link",
        ifname,
        RouteNetlinkMessage::DelLink(msg),
        0,
    ) {
        // Gone between the lookup and the delete.
        Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(()),
        other => other,
    }
}

/// The index of `ifname` in the calling thread's namespace, `None` if there is no such interface.
pub fn link_index(ifname: &str) -> Result<Option<u32>, Error> {
    check_ifname(ifname)?;
    match nix::net::if_::if_nametoindex(ifname) {
        Ok(index) => Ok(Some(index)),
        Err(Errno::ENODEV) => Ok(None),
        Err(e) => Err(Error::from_errno("looking up interface", ifname, e)),
    }
}

/// Turns off IPv6 duplicate address detection on `ifname`, so addresses added afterwards are usable at
/// once (a fresh veth otherwise keeps them tentative for about 2 s). Without IPv6 there is nothing to do.
pub fn disable_dad(ifname: &str) -> Result<(), Error> {
    require_index("disabling DAD", ifname)?;
    let path = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"));
    match write_sysctl(&path, false) {
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(()),
        other => other,
    }
}

/// Makes [`NETNS_RUN_DIR`] exist and be a shared mount, so namespace mounts made here propagate to other
/// mount namespaces (iproute2's `netns_add` does the same: make it shared; if it is not a mount point
/// yet, bind-mount it onto itself first, then retry).
fn prepare_run_dir() -> Result<(), Error> {
    let _serialized = NETNS_DIR_SETUP.lock();
    let dir = Path::new(NETNS_RUN_DIR);
    fs::create_dir_all(dir).map_err(|e| Error::from_io("creating", NETNS_RUN_DIR, &e))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, dir, Some("none"), shared, None::<&str>) {
        Ok(()) => return Ok(()),
        // EINVAL: not a mount point yet.
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(Error::from_errno("making shared mount", NETNS_RUN_DIR, e)),
    }
    mount(
        Some(dir),
        dir,
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::from_errno("bind-mounting onto itself", NETNS_RUN_DIR, e))?;
    mount(None::<&str>, dir, Some("none"), shared, None::<&str>)
        .map_err(|e| Error::from_errno("making shared mount", NETNS_RUN_DIR, e))
}

/// The file of named namespace `name`, refusing names `ip netns` would refuse.
fn netns_path(name: &str) -> Result<PathBuf, Error> {
    let invalid = |reason| Error::InvalidName {
        what: "netns",
        name: name.into(),
        reason,
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(invalid("empty, `.` or `..`"));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(invalid("contains `/` or NUL"));
    }
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

fn check_ifname(name: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidName {
        what: "interface",
        name: name.into(),
        reason,
    };
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err(invalid("must be 1 to 15 bytes"));
    }
    if name.contains(['/', '\0'])
        || name.contains(char::is_whitespace)
        || name == "."
        || name == ".."
    {
        return Err(invalid("contains `/`, NUL or whitespace, or is `.`/`..`"));
    }
    Ok(())
}

/// The index of `ifname`, or [`Error::NoSuchInterface`] naming it.
fn require_index(op: &'static str, ifname: &str) -> Result<u32, Error> {
    link_index(ifname)?.ok_or_else(|| Error::NoSuchInterface {
        op,
        ifname: ifname.into(),
    })
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

fn write_sysctl(path: &Path, on: bool) -> Result<(), Error> {
    fs::write(path, if on { "1\n" } else { "0\n" })
        .map_err(|e| Error::from_io("writing sysctl", path_str(path), &e))
}

/// Sends one request with `NLM_F_REQUEST | NLM_F_ACK | flags` on a fresh rtnetlink socket (in the calling
/// thread's namespace) and waits for the kernel's ack; a negative ack becomes an error with its errno.
fn request(
    op: &'static str,
    object: &str,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), Error> {
    let io_err = |what: &'static str| move |e: io::Error| Error::from_io(what, object, &e);
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(io_err("opening rtnetlink for"))?;
    socket
        .bind_auto()
        .map_err(io_err("binding rtnetlink for"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(io_err("connecting rtnetlink for"))?;

    const SEQ: u32 = 1;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = SEQ;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0).map_err(io_err("sending rtnetlink"))?;

    let protocol = |reason: String| Error::Protocol {
        op,
        object: object.into(),
        reason,
    };
    let mut buf = vec![0u8; NETLINK_RECV_BUFFER];
    let mut seen = 0usize;
    loop {
        let size = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(io_err("receiving rtnetlink"))?;
        if size == 0 {
            return Err(protocol("rtnetlink socket closed before the ack".into()));
        }
        let mut offset = 0;
        while offset < size {
            seen += 1;
            if seen > MAX_MESSAGES_PER_ACK {
                return Err(protocol(format!(
                    "no ack within {MAX_MESSAGES_PER_ACK} messages"
                )));
            }
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..size])
                .map_err(|e| protocol(format!("undecodable reply: {e}")))?;
            let len = reply.header.length as usize;
            if reply.header.sequence_number == SEQ {
                if let NetlinkPayload::Error(e) = reply.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => {
                            Err(Error::from_errno(op, object, Errno::from_raw(-code.get())))
                        }
                    };
                }
            }
            if len == 0 {
                return Err(protocol("zero-length netlink message".into()));
            }
            // Messages in one datagram start on 4-byte boundaries (NLMSG_ALIGN).
            offset += (len + 3) & !3;
        }
    }
}
