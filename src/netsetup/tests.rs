//! Tests of [`super`]: name checks and error wording (no root), and, as root, two named namespaces joined
//! by a veth carrying TCP over IPv4 and IPv6, checked against `ip` (a test-only tool). Every namespace is
//! removed by a drop guard, also when an assertion fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// How long a connection attempt may keep failing (neighbour discovery, link coming up) before the test fails.
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);

use crate::needs_root;

/// A named namespace created for one test, deleted when dropped (also while unwinding).
struct NamedNetns {
    name: String,
    path: PathBuf,
}

impl NamedNetns {
    /// Creates `mn-<pid>-<tag>`.
    fn create(tag: &str) -> NamedNetns {
        let name = format!("mn-{}-{tag}", std::process::id());
        let path = create_named_netns(&name).unwrap_or_else(|e| panic!("creating {name}: {e}"));
        NamedNetns { name, path }
    }

    fn open(&self) -> Arc<Netns> {
        Arc::new(Netns::open(&self.path).expect("open named netns"))
    }

    /// Runs `f` on a thread inside this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.open().run_on_thread(f).expect("enter named netns")
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if let Err(e) = delete_named_netns(&self.name) {
            eprintln!("cleanup: deleting netns {}: {e}", self.name);
        }
    }
}

/// Runs `ip ARGS` and returns its stdout (tests only: the module itself never runs `ip`).
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names `ip netns list` shows (its lines are `NAME` or `NAME (id: N)`).
fn ip_netns_names() -> Vec<String> {
    ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn read_sysctl(path: &str) -> String {
    fs::read_to_string(path).unwrap().trim().to_owned()
}

/// Connects to `addr` from a socket created inside `ns`, retrying quick failures (e.g. no route yet)
/// until [`CONNECT_DEADLINE`].
fn connect_from(ns: &NamedNetns, addr: SocketAddr) -> TcpStream {
    ns.run(move || {
        let deadline = Instant::now() + CONNECT_DEADLINE;
        loop {
            // One attempt may take until the deadline: the kernel retransmits a lost SYN by itself.
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(100))) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("connect {addr}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect {addr}: {e}"),
            }
        }
    })
}

/// One round trip over an accepted connection: the client sends `ping`, the server answers `pong`.
fn round_trip(listener: &TcpListener, addr: SocketAddr, client_ns: &NamedNetns) {
    let mut client = connect_from(client_ns, addr);
    // The connection is already in the accept queue, so this does not block.
    let (mut server, peer) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_read_timeout(Some(CONNECT_DEADLINE)).unwrap();
    }
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    eprintln!("{addr}: round trip from {peer}");
}

#[test]
fn two_named_namespaces_joined_by_a_veth_carry_tcp_over_ipv4_and_ipv6() {
    needs_root!("two_named_namespaces_joined_by_a_veth_carry_tcp_over_ipv4_and_ipv6");
    let pid = std::process::id();
    let (va, vb) = (format!("mnva{pid}"), format!("mnvb{pid}"));
    let a = NamedNetns::create("a");
    let b = NamedNetns::create("b");

    // A: the veth, its addresses, routes to B's loopback prefixes (v4 onlink) through B's veth address.
    let peer_ns = b.open().try_clone().unwrap();
    let (va2, vb2) = (va.clone(), vb.clone());
    a.run(move || -> Result<(), Error> {
        create_veth(&va2, &vb2, &peer_ns)?;
        assert!(link_index(&va2)?.is_some(), "{va2} is here");
        assert_eq!(link_index(&vb2)?, None, "{vb2} went to the peer netns");
        disable_dad(&va2)?;
        add_address(&va2, net("10.254.0.1/24"))?;
        add_address(&va2, net("fd00:254::1/64"))?;
        // Adding it again is fine.
        add_address(&va2, net("10.254.0.1/24"))?;
        set_up(&va2)?;
        add_route(
            net("10.254.1.0/24"),
            Some("10.254.0.2".parse().unwrap()),
            &va2,
            true,
        )?;
        // Replace semantics: the same route again, host bits set, is not an error.
        add_route(
            net("10.254.1.7/24"),
            Some("10.254.0.2".parse().unwrap()),
            &va2,
            true,
        )?;
        add_route(
            net("fd00:254:1::/64"),
            Some("fd00:254::2".parse().unwrap()),
            &va2,
            false,
        )?;
        Ok(())
    })
    .unwrap();

    // B: the peer end, its addresses, service addresses on lo, forwarding toggled and read back.
    let vb2 = vb;
    b.run(move || -> Result<(), Error> {
        assert!(link_index(&vb2)?.is_some(), "{vb2} arrived");
        disable_dad(&vb2)?;
        add_address(&vb2, net("10.254.0.2/24"))?;
        add_address(&vb2, net("fd00:254::2/64"))?;
        add_address("lo", net("10.254.1.1/32"))?;
        add_address("lo", net("fd00:254:1::1/128"))?;
        set_up(&vb2)?;
        set_forwarding(true, true)?;
        assert_eq!(read_sysctl("/proc/sys/net/ipv4/ip_forward"), "1");
        assert_eq!(read_sysctl("/proc/sys/net/ipv6/conf/all/forwarding"), "1");
        set_forwarding(false, false)?;
        assert_eq!(read_sysctl("/proc/sys/net/ipv4/ip_forward"), "0");
        assert_eq!(
            read_sysctl(&format!("/proc/sys/net/ipv6/conf/{vb2}/accept_dad")),
            "0"
        );
        Ok(())
    })
    .unwrap();

    // `ip` agrees with what was created.
    let names = ip_netns_names();
    assert!(
        names.contains(&a.name) && names.contains(&b.name),
        "{names:?}"
    );
    let addrs_a = ip(&["-n", &a.name, "addr", "show", "dev", &va]);
    for want in ["10.254.0.1/24", "fd00:254::1/64", ",UP"] {
        assert!(addrs_a.contains(want), "{want} missing in:\n{addrs_a}");
    }
    assert!(!addrs_a.contains("tentative"), "DAD is off:\n{addrs_a}");
    let addrs_b = ip(&["-n", &b.name, "addr"]);
    for want in [
        "10.254.0.2/24",
        "fd00:254::2/64",
        "10.254.1.1/32",
        "fd00:254:1::1/128",
    ] {
        assert!(addrs_b.contains(want), "{want} missing in:\n{addrs_b}");
    }
    let routes_a = ip(&["-n", &a.name, "route", "show", "10.254.1.0/24"]);
    assert_eq!(
        routes_a.trim(),
        format!("10.254.1.0/24 via 10.254.0.2 dev {va} onlink")
    );
    let routes6_a = ip(&["-n", &a.name, "-6", "route", "show", "fd00:254:1::/64"]);
    assert!(
        routes6_a.contains(&format!("fd00:254:1::/64 via fd00:254::2 dev {va}")),
        "{routes6_a}"
    );

    // TCP from A to B's loopback addresses, through the routes, both families.
    let listeners: Vec<TcpListener> = b.run(|| {
        ["10.254.1.1:0", "[fd00:254:1::1]:0"]
            .iter()
            .map(|a| TcpListener::bind(a).expect("bind in B"))
            .collect()
    });
    for listener in &listeners {
        let addr = listener.local_addr().unwrap();
        round_trip(listener, addr, &a);
    }
    drop(listeners);

    let (name_a, path_a) = (a.name.clone(), a.path.clone());
    drop(a);
    drop(b);
    assert!(!path_a.exists(), "{} still there", path_a.display());
    assert!(!ip_netns_names().contains(&name_a));
}

#[test]
fn created_namespace_has_lo_up_refuses_a_twin_and_deleting_it_leaves_nothing() {
    needs_root!("created_namespace_has_lo_up_refuses_a_twin_and_deleting_it_leaves_nothing");
    let ns = NamedNetns::create("solo");
    let lo = ip(&["-n", &ns.name, "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "lo is up:\n{lo}");
    // `ip` sees only lo: a fresh namespace.
    assert_eq!(
        ip(&["-n", &ns.name, "-o", "link"]).lines().count(),
        1,
        "only lo"
    );

    let twin = create_named_netns(&ns.name).unwrap_err();
    assert!(
        matches!(&twin, Error::NetnsExists { name, .. } if name == &ns.name),
        "{twin}"
    );
    // The refused twin did not take the original down.
    assert!(ns.path.exists());
    assert!(ip_netns_names().contains(&ns.name));

    delete_named_netns(&ns.name).unwrap();
    assert!(!ns.path.exists(), "{} still there", ns.path.display());
    assert!(!ip_netns_names().contains(&ns.name));
    // Absent is fine (the guard deletes once more).
    delete_named_netns(&ns.name).unwrap();
}

#[test]
fn missing_interface_errors_name_the_interface() {
    // Lookups by name need no privilege, so this runs as any user (and creates nothing).
    let ifname = format!("mnnone{}", std::process::id());
    let errors = [
        set_up(&ifname).unwrap_err(),
        add_address(&ifname, net("192.0.2.1/24")).unwrap_err(),
        add_route(net("192.0.2.0/24"), None, &ifname, false).unwrap_err(),
        disable_dad(&ifname).unwrap_err(),
    ];
    for e in errors {
        assert!(
            matches!(&e, Error::NoSuchInterface { ifname: n, .. } if n == &ifname),
            "{e:?}"
        );
        assert!(e.to_string().contains(&ifname), "{e}");
    }
    assert_eq!(link_index(&ifname).unwrap(), None);
    delete_link(&ifname).expect("deleting an absent link is fine");
}

#[test]
fn bad_names_and_mixed_families_are_refused_before_the_kernel_sees_them() {
    for bad in ["", "sixteen-bytes-xx", "a/b", "a b"] {
        let e = set_up(bad).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidName {
                    what: "interface",
                    ..
                }
            ),
            "{bad:?}: {e}"
        );
    }
    for bad in ["", ".", "..", "a/b"] {
        let e = delete_named_netns(bad).unwrap_err();
        assert!(
            matches!(e, Error::InvalidName { what: "netns", .. }),
            "{bad:?}: {e}"
        );
    }
    let e = add_route(
        net("10.0.0.0/8"),
        Some("fd00::1".parse().unwrap()),
        "lo",
        false,
    )
    .unwrap_err();
    assert!(matches!(e, Error::MixedFamilies { .. }), "{e}");
}

#[test]
fn permission_errors_say_needs_root() {
    let e = Error::from_errno("creating veth", "va (peer vb)", Errno::EPERM);
    assert!(matches!(e, Error::NeedsRoot { .. }));
    let text = e.to_string();
    assert!(
        text.contains("needs root (CAP_NET_ADMIN / CAP_SYS_ADMIN)"),
        "{text}"
    );
    assert!(text.contains("creating veth va (peer vb)"), "{text}");
    let e = Error::from_errno("adding route", "10.0.0.0/8 dev x", Errno::ENETUNREACH);
    assert_eq!(e.errno(), Some(Errno::ENETUNREACH));
    assert!(matches!(e, Error::Failed { .. }));
}
