//! Tests of [`super`]: the new expressions' bytes against what `nft` 1.0.6 sends for
//! `meta skuid 0 ip daddr @s snat ip to 1.2.3.4` (captured with `nft --debug=mnl` in a scratch netns), and,
//! as root, the host table in fresh network namespaces: real probe traffic from a "node" namespace to a
//! "pod" namespace over a veth, element bookkeeping, idempotence and removal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::super::netlink::{attrs, Writer};
use super::super::tests::{in_new_netns, nft_load, nft_ruleset, run, NamedNetns};
use super::*;

use crate::needs_root;

fn encoded(e: &Expr) -> Vec<u8> {
    let mut w = Writer::default();
    e.encode(&mut w);
    w.buf
}

fn decoded(bytes: &[u8]) -> Expr {
    let (ty, elem) = attrs(bytes).next().expect("one element");
    assert_eq!(ty, 1);
    Expr::decode(elem)
}

#[test]
fn the_probe_rule_is_the_expression_list_nft_builds() {
    // `nft --debug=netlink`: meta load l4proto; cmp eq 6; meta load skuid; cmp eq 0; meta load nfproto;
    // cmp eq 2; payload load 4b @ network header + 16; lookup reg 1 set s; counter; immediate 0x04030201;
    // nat snat ip addr_min reg 1.
    let rule = probe_rule(0, IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)));
    let names: Vec<String> = rule
        .iter()
        .map(|e| match e {
            Expr::Meta { key, .. } => format!("meta {key}"),
            Expr::Cmp { data, .. } => format!("cmp {data:?}"),
            Expr::Payload { offset, len, .. } => format!("payload {len}b +{offset}"),
            Expr::Lookup { set, .. } => format!("lookup {set}"),
            Expr::Immediate { data, .. } => format!("immediate {data:?}"),
            Expr::Snat { family, .. } => format!("snat {family}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "meta 16",
            "cmp [6]",
            "meta 10",
            "cmp [0, 0, 0, 0]",
            "meta 15",
            "cmp [2]",
            "payload 4b +16",
            "lookup istio-inpod-probes-v4",
            "Counter",
            "immediate [1, 2, 3, 4]",
            "snat 2",
        ]
    );
    // The v6 twin: `ip6 daddr` is 16 bytes at +24, the address 16 bytes, family ipv6.
    let v6 = probe_rule(4242, IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert!(v6.contains(&Expr::Cmp {
        sreg: REG1,
        op: nft::CMP_EQ,
        data: 4242u32.to_ne_bytes().to_vec(),
    }));
    assert!(v6.contains(&Expr::Payload {
        dreg: REG1,
        base: 1,
        offset: 24,
        len: 16
    }));
    assert_eq!(
        v6.last(),
        Some(&Expr::Snat {
            family: 10,
            addr_reg: REG1
        })
    );
}

#[test]
fn skuid_match_encodes_like_nft() {
    let [meta_skuid, uid_0] = [
        rules::meta(libc::NFT_META_SKUID),
        rules::cmp(nft::CMP_EQ, &0u32.to_ne_bytes()),
    ];
    #[rustfmt::skip]
    let want_meta: Vec<u8> = [
        &[36, 0, 1, 0x80][..],
        &[9, 0, 1, 0], b"meta\0", &[0, 0, 0],
        &[20, 0, 2, 0x80],
        &[8, 0, 2, 0, 0, 0, 0, 10],                         // key = NFT_META_SKUID
        &[8, 0, 1, 0, 0, 0, 0, 1],                          // dreg = 1
    ]
    .concat();
    #[rustfmt::skip]
    let want_cmp: Vec<u8> = [
        &[44, 0, 1, 0x80][..],
        &[8, 0, 1, 0], b"cmp\0",
        &[32, 0, 2, 0x80],
        &[8, 0, 1, 0, 0, 0, 0, 1],                          // sreg 1
        &[8, 0, 2, 0, 0, 0, 0, 0],                          // eq
        &[12, 0, 3, 0x80], &[8, 0, 1, 0, 0, 0, 0, 0],       // uid 0, 4 bytes
    ]
    .concat();
    assert_eq!(encoded(&meta_skuid), want_meta);
    assert_eq!(encoded(&uid_0), want_cmp);
    assert_eq!(decoded(&want_meta), meta_skuid);
}

#[test]
fn set_lookup_encodes_like_nft_without_the_set_id() {
    let lookup = Expr::Lookup {
        sreg: REG1,
        set: "s".into(),
    };
    // nft sends SREG, SET, SET_ID; the id only matters when the name is not found, so it is left out.
    #[rustfmt::skip]
    let want: Vec<u8> = [
        &[36, 0, 1, 0x80][..],
        &[11, 0, 1, 0], b"lookup\0", &[0],
        &[20, 0, 2, 0x80],
        &[8, 0, 2, 0, 0, 0, 0, 1],                          // sreg 1
        &[6, 0, 1, 0, b's', 0, 0, 0],                       // set "s"
    ]
    .concat();
    assert_eq!(encoded(&lookup), want);
    assert_eq!(decoded(&want), lookup);

    // As nft sends it (with SET_ID) and as the kernel dumps it (FLAGS 0) it decodes the same.
    #[rustfmt::skip]
    let with_id_and_flags: Vec<u8> = [
        &[52, 0, 1, 0x80][..],
        &[11, 0, 1, 0], b"lookup\0", &[0],
        &[36, 0, 2, 0x80],
        &[8, 0, 2, 0, 0, 0, 0, 1],
        &[6, 0, 1, 0, b's', 0, 0, 0],
        &[8, 0, 4, 0, 0, 0, 0, 1],
        &[8, 0, 5, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(decoded(&with_id_and_flags), lookup);
}

#[test]
fn an_inverted_set_lookup_is_not_mistaken_for_ours() {
    #[rustfmt::skip]
    let inverted: Vec<u8> = [
        &[44, 0, 1, 0x80][..],
        &[11, 0, 1, 0], b"lookup\0", &[0],
        &[28, 0, 2, 0x80],
        &[8, 0, 2, 0, 0, 0, 0, 1],
        &[6, 0, 1, 0, b's', 0, 0, 0],
        &[8, 0, 5, 0, 0, 0, 0, 1],                          // NFT_LOOKUP_F_INV
    ]
    .concat();
    assert_eq!(decoded(&inverted), Expr::Other("lookup".into()));
}

#[test]
fn snat_to_an_address_in_a_register_encodes_like_nft() {
    let imm = Expr::Immediate {
        dreg: REG1,
        data: vec![1, 2, 3, 4],
    };
    let snat = Expr::Snat {
        family: libc::NFPROTO_IPV4 as u32,
        addr_reg: REG1,
    };
    #[rustfmt::skip]
    let want_imm: Vec<u8> = [
        &[44, 0, 1, 0x80][..],
        &[14, 0, 1, 0], b"immediate\0", &[0, 0],
        &[24, 0, 2, 0x80],
        &[8, 0, 1, 0, 0, 0, 0, 1],
        &[12, 0, 2, 0x80], &[8, 0, 1, 0, 1, 2, 3, 4],       // 1.2.3.4, network order
    ]
    .concat();
    #[rustfmt::skip]
    let want_snat: Vec<u8> = [
        &[40, 0, 1, 0x80][..],
        &[8, 0, 1, 0], b"nat\0",
        &[28, 0, 2, 0x80],
        &[8, 0, 1, 0, 0, 0, 0, 0],                          // NFT_NAT_SNAT
        &[8, 0, 2, 0, 0, 0, 0, 2],                          // NFPROTO_IPV4
        &[8, 0, 3, 0, 0, 0, 0, 1],                          // addr_min reg 1
    ]
    .concat();
    assert_eq!(encoded(&imm), want_imm);
    assert_eq!(encoded(&snat), want_snat);

    // The kernel dumps addr_max (= reg 1) and flags NF_NAT_RANGE_MAP_IPS as well: still the same rule.
    #[rustfmt::skip]
    let dumped: Vec<u8> = [
        &[56, 0, 1, 0x80][..],
        &[8, 0, 1, 0], b"nat\0",
        &[44, 0, 2, 0x80],
        &[8, 0, 1, 0, 0, 0, 0, 0],
        &[8, 0, 2, 0, 0, 0, 0, 2],
        &[8, 0, 3, 0, 0, 0, 0, 1],
        &[8, 0, 4, 0, 0, 0, 0, 1],
        &[8, 0, 7, 0, 0, 0, 0, 1],
    ]
    .concat();
    assert_eq!(decoded(&dumped), snat);
}

#[test]
fn set_elements_are_sent_like_nft_in_bounded_messages() {
    let mut b = Batch::default();
    b.set_elems(
        true,
        "t",
        "s",
        &[nft::Elem {
            key: vec![10, 1, 2, 3],
            comment: None,
        }],
    );
    // After nlmsghdr + nfgenmsg: TABLE "t", SET "s", then ELEMENTS{ ELEM{ KEY{ VALUE 10.1.2.3 } } } —
    // nft's NEWSETELEM for `add element inet t s { 10.1.2.3 }`, less its SET_ID.
    #[rustfmt::skip]
    let want_attrs: Vec<u8> = [
        &[6, 0, 1, 0, b't', 0, 0, 0][..],
        &[6, 0, 2, 0, b's', 0, 0, 0],
        &[20, 0, 3, 0x80], &[16, 0, 1, 0x80], &[12, 0, 1, 0x80], &[8, 0, 1, 0, 10, 1, 2, 3],
    ]
    .concat();
    assert_eq!(&b.w.buf[16..20], &[1, 0, 0, 0]); // family inet
    assert_eq!(&b.w.buf[20..], &want_attrs[..]);
    assert_eq!(
        u16::from_ne_bytes([b.w.buf[4], b.w.buf[5]]),
        (10 << 8) | libc::NFT_MSG_NEWSETELEM as u16
    );

    // 2500 IPv6 elements with the longest comments: five messages, none near the 64 KiB attribute limit.
    let elems: Vec<nft::Elem> = (0..2500u32)
        .map(|i| nft::Elem {
            key: Ipv6Addr::from(u128::from(i)).octets().to_vec(),
            comment: Some("x".repeat(300)),
        })
        .collect();
    let mut b = Batch::default();
    b.set_elems(true, "t", "s", &elems);
    assert_eq!(b.acked.len(), 5);
    let mut at = 0;
    while at < b.w.buf.len() {
        let len = u32::from_ne_bytes(b.w.buf[at..at + 4].try_into().unwrap()) as usize;
        assert!(len < 65535, "a message of {len} bytes");
        at += len;
    }
}

// ---- root tests -------------------------------------------------------------------------------------

/// A "node" and a "pod" namespace joined by a veth, with IPv4 and IPv6 addresses and the pod's default
/// routes via the node (so replies to the probe SNAT address go back through the node's conntrack).
struct NodeAndPod {
    node: NamedNetns,
    pod: NamedNetns,
    node_ip: IpAddr,
    pod_ip: IpAddr,
    node_ip6: IpAddr,
    pod_ip6: IpAddr,
}

impl NodeAndPod {
    fn new() -> NodeAndPod {
        use std::sync::atomic::{AtomicU8, Ordering};
        static NEXT: AtomicU8 = AtomicU8::new(0);
        // 10.8x.y.0/24, x from the pid, y per pair: clear of the 10.150–10.249 ranges other tests use.
        let x = 80 + std::process::id() % 10;
        let y = NEXT.fetch_add(1, Ordering::Relaxed);
        let node = NamedNetns::new("node");
        let pod = NamedNetns::new("pod");
        let ip = |h: u8| -> IpAddr { format!("10.{x}.{y}.{h}").parse().expect("ip") };
        let ip6 = |h: u8| -> IpAddr { format!("fd00:{x}:{y}::{h}").parse().expect("ip6") };
        let p = NodeAndPod {
            node_ip: ip(1),
            pod_ip: ip(2),
            node_ip6: ip6(1),
            pod_ip6: ip6(2),
            node,
            pod,
        };
        // Fixed link addresses, so each side's IPv6 neighbour can be written in (below).
        let (node_mac, pod_mac) = ("02:00:00:00:00:01", "02:00:00:00:00:02");
        p.node.ip(&[
            "link",
            "add",
            "vnode",
            "address",
            node_mac,
            "type",
            "veth",
            "peer",
            "name",
            "vpod",
            "address",
            pod_mac,
            "netns",
            &p.pod.name,
        ]);
        for (ns, dev, v4, v6, peer_v6, peer_mac) in [
            (&p.node, "vnode", p.node_ip, p.node_ip6, p.pod_ip6, pod_mac),
            (&p.pod, "vpod", p.pod_ip, p.pod_ip6, p.node_ip6, node_mac),
        ] {
            // No DAD on the link-local address either: until it is done the kernel sends no neighbour
            // solicitation for a packet whose (SNATed) source is not local, and the v6 probe stalls.
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns.name,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{dev}.accept_dad=0"),
                ],
            );
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
            // Neighbour discovery between two fresh veth ends now and then gets no answer (about one run in
            // fifteen: the node's entry for the pod stays INCOMPLETE, the pod saw no solicitation), and the
            // first v6 dial times out. This test is about SNAT, not discovery: each side knows the other.
            let (peer_v6, dev) = (peer_v6.to_string(), dev.to_owned());
            ns.ip(&[
                "-6",
                "neigh",
                "replace",
                &peer_v6,
                "lladdr",
                peer_mac,
                "dev",
                &dev,
                "nud",
                "permanent",
            ]);
        }
        p.pod
            .ip(&["route", "add", "default", "via", &p.node_ip.to_string()]);
        p.pod.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &p.node_ip6.to_string(),
        ]);
        p
    }
}

/// Listener on `ip`'s family, all addresses, in the calling thread's namespace.
fn listen(v6: bool) -> TcpListener {
    let any: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .expect("addr");
    let l = TcpListener::bind(any).expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// The peer address of the next connection `l` accepts within two seconds.
fn accepted_peer(l: &TcpListener) -> IpAddr {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok((_, peer)) = l.accept() {
            return peer.ip();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no connection arrived");
}

fn dial(to: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {to}: {e}"))
}

/// Connects to `to` from the calling thread after switching THIS THREAD ONLY to `uid` (the raw syscall,
/// unlike libc's `setresuid`, does not change the other threads). Call on a thread of its own.
#[allow(unsafe_code)]
fn dial_as(uid: u32, to: SocketAddr) -> TcpStream {
    // SAFETY: a plain syscall with integer arguments; it changes only the calling thread's credentials,
    // and callers run it on a short-lived thread that ends right after.
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
    dial(to)
}

/// Probe-like connection from the node to `pod_ip` on a listener of the pod: the peer the pod sees.
fn probe_peer(p: &NodeAndPod, pod_ip: IpAddr, as_uid: Option<u32>) -> IpAddr {
    let l = p.pod.run(|| listen(pod_ip.is_ipv6()));
    let to = SocketAddr::new(pod_ip, l.local_addr().expect("addr").port());
    let _c = p.node.run(|| match as_uid {
        None => dial(to),
        Some(uid) => dial_as(uid, to),
    });
    accepted_peer(&l)
}

fn settings(kubelet_uid: u32) -> HostProbeSettings {
    HostProbeSettings::for_pods(kubelet_uid, &RuleSettings::default())
}

#[test]
fn kubelet_probes_to_an_enrolled_pod_arrive_from_the_probe_snat_address() {
    needs_root!("kubelet_probes_to_an_enrolled_pod_arrive_from_the_probe_snat_address");
    let p = NodeAndPod::new();
    let s = settings(0); // the test runs as root, so its sockets are "kubelet's"
    let snat_v4 = IpAddr::V4(s.probe_snat_v4);
    let snat_v6 = IpAddr::V6(s.probe_snat_v6);
    p.node
        .run(|| install_host(&s, &owned(&[])).expect("install_host"));

    // Not enrolled yet: the pod sees the node's address.
    assert_eq!(probe_peer(&p, p.pod_ip, None), p.node_ip);

    p.node
        .run(|| add_probe_ips(UID, &[p.pod_ip, p.pod_ip6]).expect("add"));
    assert_eq!(probe_peer(&p, p.pod_ip, None), snat_v4);
    assert_eq!(probe_peer(&p, p.pod_ip6, None), snat_v6);

    // The pod's IPs go to a new pod before the old pod's removal arrives: the late removal leaves the
    // new pod's entries, and its probes, alone.
    let new_pod = "0f9e8d7c-6b5a-4938-8271-605f4e3d2c1b";
    p.node
        .run(|| add_probe_ips(new_pod, &[p.pod_ip, p.pod_ip6]).expect("add for the new pod"));
    let kept = p
        .node
        .run(|| remove_probe_ips(UID, &[p.pod_ip, p.pod_ip6]).expect("late remove"));
    assert_eq!(
        kept,
        vec![
            (p.pod_ip, new_pod.to_owned()),
            (p.pod_ip6, new_pod.to_owned())
        ]
    );
    assert_eq!(probe_peer(&p, p.pod_ip, None), snat_v4);
    assert_eq!(probe_peer(&p, p.pod_ip6, None), snat_v6);

    let kept = p
        .node
        .run(|| remove_probe_ips(new_pod, &[p.pod_ip, p.pod_ip6]).expect("remove"));
    assert!(kept.is_empty());
    assert_eq!(probe_peer(&p, p.pod_ip, None), p.node_ip);
    assert_eq!(probe_peer(&p, p.pod_ip6, None), p.node_ip6);
}

#[test]
fn only_connections_of_the_kubelet_uid_are_snated() {
    needs_root!("only_connections_of_the_kubelet_uid_are_snated");
    let p = NodeAndPod::new();
    let s = settings(4242);
    p.node
        .run(|| install_host(&s, &owned(&[p.pod_ip, p.pod_ip6])).expect("install_host"));
    // Root's connections are not kubelet's: no SNAT.
    assert_eq!(probe_peer(&p, p.pod_ip, None), p.node_ip);
    assert_eq!(probe_peer(&p, p.pod_ip6, None), p.node_ip6);
    // A socket opened as uid 4242 is.
    assert_eq!(
        probe_peer(&p, p.pod_ip, Some(4242)),
        IpAddr::V4(s.probe_snat_v4)
    );
    assert_eq!(
        probe_peer(&p, p.pod_ip6, Some(4242)),
        IpAddr::V6(s.probe_snat_v6)
    );
    // And another uid is not.
    assert_eq!(probe_peer(&p, p.pod_ip, Some(4343)), p.node_ip);
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// The pod UID most tests give their probe-set entries.
const UID: &str = "8d3c4e2a-0b1f-4c5d-9e6f-7a8b9c0d1e2f";

fn owned(ips: &[IpAddr]) -> Vec<(IpAddr, &'static str)> {
    ips.iter().map(|ip| (*ip, UID)).collect()
}

/// `nft -a list table inet istio-ambient-nat`: with object handles, which change if the table is
/// recreated.
fn host_table_with_handles() -> String {
    run("nft", &["-a", "list", "table", "inet", HOST_TABLE])
}

#[test]
fn install_host_programs_istios_host_table_and_inspect_lists_the_pod_ips() {
    needs_root!("install_host_programs_istios_host_table_and_inspect_lists_the_pod_ips");
    in_new_netns(|| {
        let s = settings(0);
        let ips = [
            ip("10.80.0.9"),
            ip("fd00:80::9"),
            ip("10.80.0.5"),
            ip("10.80.0.9"),
        ];
        install_host(&s, &owned(&ips)).expect("install_host");
        let got = inspect_host().expect("inspect_host");
        assert!(got.matches(&s), "{got:#?}");
        assert!(!got.matches(&settings(1)));
        assert_eq!(
            got.probe_ips(),
            vec![ip("10.80.0.5"), ip("10.80.0.9"), ip("fd00:80::9")]
        );
        let text = nft_ruleset();
        for line in [
            "table inet istio-ambient-nat {",
            "set istio-inpod-probes-v4 {",
            "type ipv4_addr",
            "type ipv6_addr",
            "comment \"UUID of the pods that are part of ambient mesh\"",
            "elements = { 10.80.0.5 comment \"8d3c4e2a-0b1f-4c5d-9e6f-7a8b9c0d1e2f\",",
            "10.80.0.9 comment \"8d3c4e2a-0b1f-4c5d-9e6f-7a8b9c0d1e2f\" }",
            "elements = { fd00:80::9 comment \"8d3c4e2a-0b1f-4c5d-9e6f-7a8b9c0d1e2f\" }",
            "type nat hook postrouting priority srcnat; policy accept;",
            "meta l4proto tcp meta skuid 0 ip daddr @istio-inpod-probes-v4 counter snat ip to 169.254.7.127",
            "meta l4proto tcp meta skuid 0 ip6 daddr @istio-inpod-probes-v6 counter snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    });
}

#[test]
fn reinstalling_keeps_the_table_and_only_syncs_elements() {
    needs_root!("reinstalling_keeps_the_table_and_only_syncs_elements");
    in_new_netns(|| {
        let s = settings(0);
        let (a, b, c) = (ip("10.81.0.1"), ip("10.81.0.2"), ip("fd00:81::3"));
        install_host(&s, &owned(&[a, b])).expect("install_host");
        add_probe_ips(UID, &[c, a]).expect("add, one already there");
        let before = host_table_with_handles();

        // Agent restart with the same pods: nothing changes, not even a handle.
        install_host(&s, &owned(&[a, b, c])).expect("reinstall");
        assert_eq!(host_table_with_handles(), before);

        // Agent restart with a different pod list: elements synced, table and rule kept (same handles).
        install_host(&s, &owned(&[b, c, ip("10.81.0.4")])).expect("reinstall, other pods");
        let got = inspect_host().expect("inspect");
        assert_eq!(got.probe_ips(), vec![b, ip("10.81.0.4"), c]);
        let strip_elems = |t: &str| -> String {
            t.lines()
                .filter(|l| !l.contains("elements"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip_elems(&host_table_with_handles()),
            strip_elems(&before)
        );

        // Another kubelet uid: the table is replaced atomically and the given pods re-added.
        let other = settings(4242);
        install_host(&other, &owned(&[a])).expect("install, new uid");
        let got = inspect_host().expect("inspect");
        assert!(got.matches(&other));
        assert_eq!(got.probe_ips(), vec![a]);

        // Removing absent elements (and present ones) is fine.
        remove_probe_ips(UID, &[a, b, c]).expect("remove");
        assert!(inspect_host().expect("inspect").probe_ips().is_empty());
    });
}

#[test]
fn a_foreign_chain_in_the_host_table_is_replaced() {
    needs_root!("a_foreign_chain_in_the_host_table_is_replaced");
    in_new_netns(|| {
        let s = settings(0);
        install_host(&s, &owned(&[ip("10.82.0.1")])).expect("install_host");
        run("nft", &["add", "chain", "inet", HOST_TABLE, "stray"]);
        assert!(!inspect_host().expect("inspect").matches(&s));
        install_host(&s, &owned(&[ip("10.82.0.1")])).expect("reinstall");
        let got = inspect_host().expect("inspect");
        assert!(got.matches(&s), "{got:#?}");
        assert_eq!(got.probe_ips(), vec![ip("10.82.0.1")]);
    });
}

#[test]
fn ipv6_off_leaves_out_the_v6_rule_but_keeps_both_sets() {
    needs_root!("ipv6_off_leaves_out_the_v6_rule_but_keeps_both_sets");
    in_new_netns(|| {
        let s = HostProbeSettings {
            ipv6: false,
            ..settings(0)
        };
        install_host(&s, &owned(&[])).expect("install_host");
        let got = inspect_host().expect("inspect");
        assert!(got.matches(&s));
        assert_eq!(got.table.as_ref().map(|t| t.chains[0].rules), Some(1));
        assert_eq!(got.sets.len(), 2);
        // A v6 pod IP is still accepted (it just is never matched).
        add_probe_ips(UID, &[ip("fd00:82::1")]).expect("add v6");
    });
}

#[test]
fn remove_host_leaves_an_empty_ruleset_and_can_run_twice() {
    needs_root!("remove_host_leaves_an_empty_ruleset_and_can_run_twice");
    in_new_netns(|| {
        install_host(&settings(0), &owned(&[ip("10.83.0.1")])).expect("install_host");
        remove_host().expect("remove");
        assert_eq!(nft_ruleset().trim(), "");
        assert!(inspect_host().expect("inspect").is_empty());
        remove_host().expect("remove again");
        // With no table, removing pod IPs is a no-op; adding them says why it cannot.
        remove_probe_ips(UID, &[ip("10.83.0.1")]).expect("remove ips without table");
        assert!(matches!(
            add_probe_ips(UID, &[ip("10.83.0.1")]),
            Err(Error::Rejected {
                target: Target::SetElements { .. },
                errno: Errno::ENOENT,
            })
        ));
    });
}

#[test]
fn probe_set_entries_belong_to_their_pod_and_only_it_removes_them() {
    needs_root!("probe_set_entries_belong_to_their_pod_and_only_it_removes_them");
    in_new_netns(|| {
        let s = settings(0);
        let (a, legacy) = (ip("10.84.0.7"), ip("10.84.0.8"));
        install_host(&s, &[]).expect("install_host");
        let owners = || inspect_host().expect("inspect").probe_owners;

        add_probe_ips("old-pod", &[a]).expect("add");
        assert_eq!(owners(), vec![(a, Some("old-pod".to_owned()))]);
        // The IP is reused by a new pod: the entry changes owner (the element is replaced).
        add_probe_ips("new-pod", &[a]).expect("add for the new owner");
        assert_eq!(owners(), vec![(a, Some("new-pod".to_owned()))]);
        assert!(nft_ruleset().contains("10.84.0.7 comment \"new-pod\""));
        // The old pod's late removal leaves it and says whose it is.
        let kept = remove_probe_ips("old-pod", &[a]).expect("late remove");
        assert_eq!(kept, vec![(a, "new-pod".to_owned())]);
        assert_eq!(owners(), vec![(a, Some("new-pod".to_owned()))]);

        // An entry written without an owner (an earlier version) goes with whichever pod removes it.
        run(
            "nft",
            &[
                "add",
                "element",
                "inet",
                HOST_TABLE,
                PROBE_SET_V4,
                "{ 10.84.0.8 }",
            ],
        );
        assert_eq!(
            owners(),
            vec![(a, Some("new-pod".to_owned())), (legacy, None)]
        );
        assert!(remove_probe_ips("any-pod", &[legacy])
            .expect("remove")
            .is_empty());

        // An agent restart moves entries to the pods that own them now, leaving the table in place.
        add_probe_ips("old-pod", &[a]).expect("add");
        let before = host_table_with_handles();
        install_host(&s, &[(a, "new-pod")]).expect("reinstall");
        assert_eq!(owners(), vec![(a, Some("new-pod".to_owned()))]);
        let chain_handles = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.contains("chain") || l.contains("snat"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            chain_handles(&host_table_with_handles()),
            chain_handles(&before)
        );

        // An owner longer than a comment can hold is kept cut, and still removes its own entries.
        let long = "p".repeat(100);
        add_probe_ips(&long, &[legacy]).expect("add, long owner");
        assert!(remove_probe_ips(&long, &[legacy])
            .expect("remove")
            .is_empty());
        assert_eq!(owners(), vec![(a, Some("new-pod".to_owned()))]);

        // The pod's own removal takes it out.
        assert!(remove_probe_ips("new-pod", &[a])
            .expect("remove")
            .is_empty());
        assert!(owners().is_empty());
    });
}

#[test]
fn element_comments_are_read_back_as_nft_writes_them() {
    needs_root!("element_comments_are_read_back_as_nft_writes_them");
    in_new_netns(|| {
        install_host(&settings(0), &[]).expect("install_host");
        run(
            "nft",
            &[
                "add",
                "element",
                "inet",
                HOST_TABLE,
                PROBE_SET_V6,
                "{ fd00:84::1 comment \"pod-from-nft\" }",
            ],
        );
        assert_eq!(
            inspect_host().expect("inspect").probe_owners,
            vec![(ip("fd00:84::1"), Some("pod-from-nft".to_owned()))]
        );
    });
}

#[test]
fn the_host_rule_is_what_nft_builds_from_istio_cnis_rule_text() {
    needs_root!("the_host_rule_is_what_nft_builds_from_istio_cnis_rule_text");
    in_new_netns(|| {
        // istio-cni's host table (istio-cni.md §1.9 "Host rule"), handed to `nft` itself.
        let s = settings(1000);
        let t = format!("inet {HOST_TABLE}");
        let script = [
            format!("add table {t}"),
            format!("add set {t} {PROBE_SET_V4} {{ type ipv4_addr ; comment \"{SET_COMMENT}\" ; }}"),
            format!("add set {t} {PROBE_SET_V6} {{ type ipv6_addr ; comment \"{SET_COMMENT}\" ; }}"),
            format!("add chain {t} postrouting {{ type nat hook postrouting priority 100 ; }}"),
            format!("add rule {t} postrouting meta l4proto tcp skuid 1000 ip daddr @{PROBE_SET_V4} counter snat to {}", s.probe_snat_v4),
            format!("add rule {t} postrouting meta l4proto tcp skuid 1000 ip6 daddr @{PROBE_SET_V6} counter snat to {}", s.probe_snat_v6),
            String::new(),
        ]
        .join("\n");
        nft_load(&script);
        let got = inspect_host().expect("inspect");
        assert!(
            got.matches(&s),
            "istio-cni's host table reads back differently from ours: {got:#?}"
        );
    });
}
