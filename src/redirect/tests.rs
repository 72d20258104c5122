//! Tests of [`super`]: encoder bytes (no root), and, as root, the rule set in fresh network namespaces —
//! read back through our own dumps and through `nft`/`ip` (test-only tools), atomicity, and real traffic.

use std::process::Command;

use super::netlink::{attrs, Writer};
use super::nft::{self, Expr};
use super::rules;
use super::*;

use crate::needs_root;

/// Runs `f` on a thread inside a brand-new anonymous network namespace with `lo` up. The namespace
/// disappears with the thread, also when `f` panics (the panic is re-raised here).
pub(super) fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            run("ip", &["link", "set", "lo", "up"]);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs a test tool in the calling thread's namespace and returns its stdout.
pub(super) fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nft list ruleset`, with every `counter packets N bytes M` shown as `counter` (counts vary).
pub(super) fn nft_ruleset() -> String {
    let text = run("nft", &["list", "ruleset"]);
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("counter packets ") {
        out.push_str(&rest[..at + "counter".len()]);
        rest = &rest[at..];
        // Skip `counter packets N bytes M`.
        let after_bytes = rest
            .find(" bytes ")
            .map(|b| b + " bytes ".len())
            .unwrap_or(rest.len());
        let end = rest[after_bytes..]
            .find(|c: char| !c.is_ascii_digit())
            .map(|e| after_bytes + e)
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Hands `script` to `nft -f -` in the calling thread's namespace (test-only tool); a refusal fails the
/// test with nft's complaint and the script.
pub(super) fn nft_load(script: &str) {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write the script");
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft -f: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// istio-cni's in-pod rules for `s`, in the rule language its nftables backend hands to `nft`
/// (istio-cni.md §1.9; written here from that description), so `nft` itself builds the expressions.
fn istio_cni_script(s: &RuleSettings) -> String {
    let p = &s.ports;
    let mark = format!("0x{:x}", s.packet_mark);
    let (v4, v6) = (s.probe_snat_v4, s.probe_snat_v6);
    let mut l: Vec<String> = Vec::new();
    let table = |l: &mut Vec<String>, t: &str, kind_pre: &str, kind_out: &str, prio: i32| {
        l.push(format!("add table inet {t}"));
        l.push(format!("flush table inet {t}"));
        l.push(format!(
            "add chain inet {t} prerouting {{ type {kind_pre} hook prerouting priority {prio} ; }}"
        ));
        l.push(format!(
            "add chain inet {t} output {{ type {kind_out} hook output priority {prio} ; }}"
        ));
        l.push(format!("add chain inet {t} istio-prerouting"));
        l.push(format!("add chain inet {t} istio-output"));
        l.push(format!("add rule inet {t} output jump istio-output"));
        l.push(format!(
            "add rule inet {t} prerouting jump istio-prerouting"
        ));
    };
    let nat = "add rule inet istio-ambient-nat";
    table(&mut l, rules::NAT, "nat", "nat", -100);
    for i in &s.reroute_interfaces {
        l.push(format!(
            "{nat} istio-prerouting iifname {i} meta l4proto tcp counter redirect to :{}",
            p.outbound
        ));
        l.push(format!(
            "{nat} istio-prerouting iifname {i} meta l4proto tcp counter return"
        ));
    }
    if !s.bypass_inbound {
        l.push(format!(
            "{nat} istio-prerouting meta l4proto tcp ip saddr {v4} counter accept"
        ));
        if s.ipv6 {
            l.push(format!(
                "{nat} istio-prerouting meta l4proto tcp ip6 saddr {v6} counter accept"
            ));
        }
    }
    l.push(format!(
        "{nat} istio-output meta l4proto tcp ip daddr {v4} counter accept"
    ));
    if s.ipv6 {
        l.push(format!(
            "{nat} istio-output meta l4proto tcp ip6 daddr {v6} counter accept"
        ));
    }
    if !s.bypass_inbound {
        l.push(format!("{nat} istio-prerouting ip daddr != 127.0.0.1/32 tcp dport != {} mark and 0xfff != {mark} counter redirect to :{}", p.inbound, p.inbound_plaintext));
        if s.ipv6 {
            l.push(format!("{nat} istio-prerouting ip6 daddr != ::1/128 tcp dport != {} mark and 0xfff != {mark} counter redirect to :{}", p.inbound, p.inbound_plaintext));
        }
    }
    if s.dns_capture {
        l.push(format!("{nat} istio-output oifname != lo mark and 0xfff != {mark} udp dport 53 counter redirect to :{}", p.dns));
        l.push(format!("{nat} istio-output ip daddr != 127.0.0.1/32 tcp dport 53 mark and 0xfff != {mark} counter redirect to :{}", p.dns));
        if s.ipv6 {
            l.push(format!("{nat} istio-output ip6 daddr != ::1/128 tcp dport 53 mark and 0xfff != {mark} counter redirect to :{}", p.dns));
        }
    }
    l.push(format!(
        "{nat} istio-output meta l4proto tcp mark and 0xfff == 0x111 counter accept"
    ));
    l.push(format!(
        "{nat} istio-output oifname lo ip daddr != 127.0.0.1/32 counter accept"
    ));
    if s.ipv6 {
        l.push(format!(
            "{nat} istio-output oifname lo ip6 daddr != ::1/128 counter accept"
        ));
    }
    l.push(format!("{nat} istio-output meta l4proto tcp ip daddr != 127.0.0.1/32 mark and 0xfff != {mark} counter redirect to :{}", p.outbound));
    if s.ipv6 {
        l.push(format!("{nat} istio-output meta l4proto tcp ip6 daddr != ::1/128 mark and 0xfff != {mark} counter redirect to :{}", p.outbound));
    }
    let mangle = "add rule inet istio-ambient-mangle";
    table(&mut l, rules::MANGLE, "filter", "route", -150);
    l.push(format!("{mangle} istio-prerouting meta mark & 0xfff == {mark} counter ct mark set ct mark & 0xfffff000 | 0x111"));
    l.push(format!(
        "{mangle} istio-output ct mark and 0xfff == 0x111 counter meta mark set ct mark"
    ));
    if s.dns_capture {
        let raw = "add rule inet istio-ambient-raw";
        table(&mut l, rules::RAW, "filter", "filter", -300);
        l.push(format!(
            "{raw} istio-output udp dport 53 meta mark and 0xfff == {mark} counter ct zone set 1"
        ));
        l.push(format!("{raw} istio-prerouting udp sport 53 meta mark and 0xfff != {mark} counter ct zone set 1"));
    }
    l.push(String::new());
    l.join("\n")
}

#[test]
fn rules_are_expression_for_expression_what_nft_builds_from_istio_cnis_rule_text() {
    needs_root!("rules_are_expression_for_expression_what_nft_builds_from_istio_cnis_rule_text");
    let d = RuleSettings::default();
    let variants = [
        ("default", d.clone()),
        (
            "ipv4 only",
            RuleSettings {
                ipv6: false,
                ..d.clone()
            },
        ),
        (
            "dns capture",
            RuleSettings {
                dns_capture: true,
                ..d.clone()
            },
        ),
        (
            "dns capture, ipv4 only",
            RuleSettings {
                dns_capture: true,
                ipv6: false,
                ..d.clone()
            },
        ),
        (
            "ingress",
            RuleSettings {
                bypass_inbound: true,
                ..d.clone()
            },
        ),
        (
            "virtual interfaces",
            RuleSettings {
                reroute_interfaces: vec!["fake1s0f0".into(), "fake1s0f1".into()],
                ..d.clone()
            },
        ),
        (
            "ingress and virtual interfaces",
            RuleSettings {
                reroute_interfaces: vec!["k6t-eth0".into(), "tap*".into()],
                bypass_inbound: true,
                ..d.clone()
            },
        ),
        (
            "other ports and mark",
            RuleSettings {
                packet_mark: 0x123,
                ports: RedirectPorts {
                    outbound: 25001,
                    inbound_plaintext: 25006,
                    inbound: 25008,
                    dns: 25053,
                },
                dns_capture: true,
                ..d
            },
        ),
    ];
    for (name, s) in variants {
        in_new_netns(|| {
            nft_load(&istio_cni_script(&s));
            let got = inspect().expect("inspect");
            assert!(
                tables_match(&got.tables, &rules::plan(&s)),
                "{name}: istio-cni's rules, as nft builds them, differ from ours:\n{got:#?}\nwant {:#?}",
                rules::plan(&s)
            );
            // And the other way: ours, listed by nft, read as istio-cni's (counters included).
            install(&s).expect("install");
            assert!(inspect().expect("inspect").matches(&s), "{name}");
            assert!(nft_ruleset().contains("counter"), "{name}");
        });
    }
}

#[test]
fn redirect_to_15001_loads_the_port_big_endian_into_register_1() {
    let [imm, redir] = rules::redirect(15001);
    let mut w = Writer::default();
    imm.encode(&mut w);
    // NFTA_LIST_ELEM{ NAME "immediate", DATA{ DREG be32 1, DATA{ VALUE 3a 99 } } }
    #[rustfmt::skip]
    let want: Vec<u8> = [
        &[44, 0, 0x01, 0x80][..],                          // list elem, nested, len 44
        &[14, 0, 1, 0], b"immediate\0", &[0, 0],           // name, padded to 16
        &[24, 0, 0x02, 0x80],                              // expr data, nested
        &[8, 0, 1, 0, 0, 0, 0, 1],                         // dreg = NFT_REG_1 (big-endian)
        &[12, 0, 0x02, 0x80],                              // immediate data, nested
        &[6, 0, 1, 0, 0x3a, 0x99, 0, 0],                   // value 15001 big-endian, padded
    ]
    .concat();
    assert_eq!(w.buf, want);

    let mut w = Writer::default();
    redir.encode(&mut w);
    let (ty, elem) = attrs(&w.buf).next().expect("one element");
    assert_eq!(ty, 1);
    assert_eq!(Expr::decode(elem), redir);
}

#[test]
fn mark_comparison_is_host_endian_under_mask_0xfff() {
    let plan = rules::plan(&RuleSettings::default());
    let out = &plan[0].chains[1]; // istio-output
    let last = out.rules.last().expect("redirect rule");
    assert!(last.contains(&Expr::Bitwise {
        sreg: 1,
        dreg: 1,
        mask: 0xfffu32.to_ne_bytes().to_vec(),
        xor: vec![0; 4],
    }));
    assert!(last.contains(&Expr::Cmp {
        sreg: 1,
        op: nft::CMP_NEQ,
        data: 1337u32.to_ne_bytes().to_vec(),
    }));
}

#[test]
fn attributes_are_padded_to_four_bytes_and_nests_carry_the_nested_flag() {
    let mut w = Writer::default();
    let n = w.nest_begin(7);
    w.attr_str(1, "lo");
    w.attr_be32(2, 0x0102_0304);
    w.nest_end(n);
    #[rustfmt::skip]
    let want: Vec<u8> = [
        &[20, 0, 7, 0x80][..],
        &[7, 0, 1, 0, b'l', b'o', 0, 0],
        &[8, 0, 2, 0, 1, 2, 3, 4],
    ]
    .concat();
    assert_eq!(w.buf, want);
    let inner: Vec<(u16, Vec<u8>)> = attrs(&w.buf[4..]).map(|(t, p)| (t, p.to_vec())).collect();
    assert_eq!(inner, vec![(1, b"lo\0".to_vec()), (2, vec![1, 2, 3, 4])]);
}

#[test]
fn a_packet_mark_wider_than_the_mask_is_refused_before_touching_the_kernel() {
    let s = RuleSettings {
        packet_mark: 0x1539,
        ..RuleSettings::default()
    };
    assert!(matches!(
        install(&s),
        Err(Error::InvalidMark { mark: 0x1539 })
    ));
}

#[test]
fn kernel_errors_are_classified_with_their_target() {
    let rule = Target::Rule {
        table: rules::NAT,
        chain: "istio-output",
        index: 3,
    };
    assert!(matches!(
        Error::from_errno(Target::Batch, Errno::EPERM),
        Error::NotPermitted { .. }
    ));
    assert!(matches!(
        Error::from_errno(Target::Batch, Errno::EOPNOTSUPP),
        Error::NfTablesUnavailable { .. }
    ));
    assert!(matches!(
        Error::from_errno(rule, Errno::ENOENT),
        Error::NfTablesUnavailable { .. }
    ));
    let e = Error::from_errno(rule, Errno::EINVAL);
    assert!(matches!(e, Error::Rejected { .. }));
    assert_eq!(
        e.to_string(),
        "kernel rejected rule #3 of chain inet istio-ambient-nat istio-output: EINVAL: Invalid argument"
    );
}

/// Lines of `ip [-6] rule` that are our fwmark rule.
fn fwmark_rules(v6: bool) -> usize {
    let args: &[&str] = if v6 { &["-6", "rule"] } else { &["rule"] };
    run("ip", args)
        .lines()
        .filter(|l| l.contains("fwmark 0x111/0xfff") && l.contains("lookup 100"))
        .count()
}

/// `(table, chain, hook)` of every chain in `nft -j list ruleset`.
fn nft_json_chains() -> Vec<(String, String, Option<String>)> {
    let json: serde_json::Value =
        serde_json::from_str(&run("nft", &["-j", "list", "ruleset"])).expect("nft json");
    let items = json["nftables"].as_array().cloned().unwrap_or_default();
    let mut out: Vec<_> = items
        .iter()
        .filter_map(|i| i.get("chain"))
        .map(|c| {
            assert_eq!(c["family"], "inet");
            (
                c["table"].as_str().unwrap_or_default().to_owned(),
                c["name"].as_str().unwrap_or_default().to_owned(),
                c.get("hook").and_then(|h| h.as_str()).map(str::to_owned),
            )
        })
        .collect();
    out.sort();
    out
}

fn chain(t: &str, c: &str, hook: Option<&str>) -> (String, String, Option<String>) {
    (t.to_owned(), c.to_owned(), hook.map(str::to_owned))
}

#[test]
fn install_programs_istios_tables_and_inspect_matches() {
    needs_root!("install_programs_istios_tables_and_inspect_matches");
    in_new_netns(|| {
        let s = RuleSettings::default();
        install(&s).expect("install");
        let got = inspect().expect("inspect");
        assert!(got.matches(&s), "{got:#?}");
        assert!(!got.is_empty());

        let mut want = vec![
            chain(rules::MANGLE, "istio-output", None),
            chain(rules::MANGLE, "istio-prerouting", None),
            chain(rules::MANGLE, "output", Some("output")),
            chain(rules::MANGLE, "prerouting", Some("prerouting")),
            chain(rules::NAT, "istio-output", None),
            chain(rules::NAT, "istio-prerouting", None),
            chain(rules::NAT, "output", Some("output")),
            chain(rules::NAT, "prerouting", Some("prerouting")),
        ];
        want.sort();
        assert_eq!(nft_json_chains(), want);

        let text = nft_ruleset();
        for line in [
            "type nat hook prerouting priority dstnat; policy accept;",
            "type nat hook output priority -100; policy accept;",
            "type filter hook prerouting priority mangle; policy accept;",
            "type route hook output priority mangle; policy accept;",
            "jump istio-prerouting",
            "jump istio-output",
            "meta l4proto tcp ip saddr 169.254.7.127 counter accept",
            "meta l4proto tcp ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff counter accept",
            "ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0x00000fff != 0x00000539 counter redirect to :15006",
            "ip6 daddr != ::1 tcp dport != 15008 meta mark & 0x00000fff != 0x00000539 counter redirect to :15006",
            "meta l4proto tcp ip daddr 169.254.7.127 counter accept",
            "meta l4proto tcp meta mark & 0x00000fff == 0x00000111 counter accept",
            "oifname \"lo\" ip daddr != 127.0.0.1 counter accept",
            "oifname \"lo\" ip6 daddr != ::1 counter accept",
            "meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0x00000fff != 0x00000539 counter redirect to :15001",
            "meta l4proto tcp ip6 daddr != ::1 meta mark & 0x00000fff != 0x00000539 counter redirect to :15001",
            // nft prints `(ct mark & 0xfffff000) | 0x111` in its own equivalent form.
            "meta mark & 0x00000fff == 0x00000539 counter ct mark set ct mark & 0xfffff111 | 0x00000111",
            "ct mark & 0x00000fff == 0x00000111 counter meta mark set ct mark",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
        assert!(!text.contains("istio-ambient-raw"), "{text}");
        assert!(!text.contains("15053"), "{text}");

        assert_eq!(fwmark_rules(false), 1);
        assert_eq!(fwmark_rules(true), 1);
        assert!(run("ip", &["rule"]).contains("32764:"));
        let routes = run("ip", &["route", "show", "table", "100"]);
        assert!(routes.contains("local default dev lo"), "{routes}");
        let routes6 = run("ip", &["-6", "route", "show", "table", "100"]);
        assert!(routes6.contains("local default dev lo"), "{routes6}");
    });
}

#[test]
fn installing_twice_gives_the_same_rules_without_duplicates() {
    needs_root!("installing_twice_gives_the_same_rules_without_duplicates");
    in_new_netns(|| {
        let s = RuleSettings::default();
        install(&s).expect("first install");
        let first = nft_ruleset();
        install(&s).expect("second install");
        assert_eq!(nft_ruleset(), first);
        let got = inspect().expect("inspect");
        assert!(got.matches(&s), "{got:#?}");
        assert_eq!(got.ip_rules.len(), 2);
        assert_eq!(got.local_routes.len(), 2);
        assert_eq!(fwmark_rules(false), 1);
        assert_eq!(fwmark_rules(true), 1);
    });
}

#[test]
fn remove_leaves_nothing_and_can_run_twice() {
    needs_root!("remove_leaves_nothing_and_can_run_twice");
    in_new_netns(|| {
        remove().expect("remove with nothing installed");
        let s = RuleSettings {
            dns_capture: true,
            ..RuleSettings::default()
        };
        install(&s).expect("install");
        remove().expect("remove");
        let got = inspect().expect("inspect");
        assert!(got.is_empty(), "{got:#?}");
        assert!(!got.matches(&s));
        assert_eq!(nft_ruleset().trim(), "");
        assert_eq!(fwmark_rules(false), 0);
        assert_eq!(fwmark_rules(true), 0);
        assert_eq!(run("ip", &["route", "show", "table", "100"]).trim(), "");
        remove().expect("second remove");
    });
}

#[test]
fn ipv6_off_programs_only_the_ipv4_forms_and_drops_earlier_ipv6_pieces() {
    needs_root!("ipv6_off_programs_only_the_ipv4_forms_and_drops_earlier_ipv6_pieces");
    in_new_netns(|| {
        let v6 = RuleSettings::default();
        let v4 = RuleSettings {
            ipv6: false,
            ..RuleSettings::default()
        };
        install(&v6).expect("install with IPv6");
        install(&v4).expect("install without IPv6");
        let got = inspect().expect("inspect");
        assert!(got.matches(&v4), "{got:#?}");
        assert!(!got.matches(&v6));
        let text = nft_ruleset();
        assert!(!text.contains("ip6"), "{text}");
        assert!(
            text.contains("ip daddr != 127.0.0.1 tcp dport != 15008"),
            "{text}"
        );
        assert_eq!(fwmark_rules(false), 1);
        assert_eq!(fwmark_rules(true), 0);
        assert_eq!(
            run("ip", &["-6", "route", "show", "table", "100"]).trim(),
            ""
        );

        install(&v6).expect("back to IPv6");
        assert!(inspect().expect("inspect").matches(&v6));
        assert_eq!(fwmark_rules(true), 1);
    });
}

#[test]
fn dns_capture_adds_the_dns_redirects_and_the_conntrack_zone_table() {
    needs_root!("dns_capture_adds_the_dns_redirects_and_the_conntrack_zone_table");
    in_new_netns(|| {
        let dns = RuleSettings {
            dns_capture: true,
            ..RuleSettings::default()
        };
        install(&dns).expect("install with DNS");
        assert!(inspect().expect("inspect").matches(&dns));
        let chains = nft_json_chains();
        assert!(chains.contains(&chain(rules::RAW, "prerouting", Some("prerouting"))));
        assert!(chains.contains(&chain(rules::RAW, "output", Some("output"))));
        let text = nft_ruleset();
        for line in [
            "type filter hook prerouting priority raw; policy accept;",
            "type filter hook output priority raw; policy accept;",
            "oifname != \"lo\" meta mark & 0x00000fff != 0x00000539 udp dport 53 counter redirect to :15053",
            "ip daddr != 127.0.0.1 tcp dport 53 meta mark & 0x00000fff != 0x00000539 counter redirect to :15053",
            "ip6 daddr != ::1 tcp dport 53 meta mark & 0x00000fff != 0x00000539 counter redirect to :15053",
            "udp dport 53 meta mark & 0x00000fff == 0x00000539 counter ct zone set 1",
            "udp sport 53 meta mark & 0x00000fff != 0x00000539 counter ct zone set 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }

        // Turning DNS capture off takes the raw table and the DNS rules away again.
        let plain = RuleSettings::default();
        install(&plain).expect("install without DNS");
        assert!(inspect().expect("inspect").matches(&plain));
        let text = nft_ruleset();
        assert!(!text.contains("istio-ambient-raw"), "{text}");
        assert!(!text.contains("15053"), "{text}");
    });
}

#[test]
fn bypass_inbound_leaves_out_inbound_capture_but_keeps_the_connmark_rules() {
    needs_root!("bypass_inbound_leaves_out_inbound_capture_but_keeps_the_connmark_rules");
    in_new_netns(|| {
        let s = RuleSettings {
            bypass_inbound: true,
            ..RuleSettings::default()
        };
        install(&s).expect("install");
        let got = inspect().expect("inspect");
        assert!(got.matches(&s), "{got:#?}");
        assert!(!got.matches(&RuleSettings::default()));
        let nat = got
            .tables
            .iter()
            .find(|t| t.name == rules::NAT)
            .expect("nat");
        let prert = nat.chains.iter().find(|c| c.name == "istio-prerouting");
        assert_eq!(prert.map(|c| c.rules), Some(0));
        let text = nft_ruleset();
        assert!(!text.contains(":15006"), "{text}");
        assert!(!text.contains("ip saddr 169.254.7.127"), "{text}");
        assert!(text.contains("redirect to :15001"), "{text}");
        assert!(text.contains("ct mark set"), "{text}");
    });
}

#[test]
fn a_failing_batch_leaves_the_previous_rules_untouched() {
    needs_root!("a_failing_batch_leaves_the_previous_rules_untouched");
    in_new_netns(|| {
        let before = RuleSettings {
            dns_capture: true,
            ..RuleSettings::default()
        };
        install(&before).expect("install");
        let text_before = nft_ruleset();

        // The plan for other settings (no DNS: the raw table would be deleted), with its very last rule
        // made invalid: the kernel has to undo every earlier message of the batch.
        let after = RuleSettings {
            ipv6: false,
            ..RuleSettings::default()
        };
        let mut plan = rules::plan(&after);
        let mangle = plan
            .iter_mut()
            .find(|t| t.name == rules::MANGLE)
            .expect("mangle");
        let out = mangle.chains.last_mut().expect("output chain");
        out.rules.push(vec![Expr::Cmp {
            sreg: nft::REG1,
            op: 99,
            data: vec![0; 4],
        }]);
        match apply_nft(&plan) {
            Err(Error::Rejected {
                target:
                    Target::Rule {
                        table: rules::MANGLE,
                        chain: "output",
                        index: 1,
                    },
                errno: Errno::EINVAL,
            }) => {}
            other => panic!("expected the bad rule to be rejected, got {other:?}"),
        }
        assert_eq!(nft_ruleset(), text_before);
        assert!(inspect().expect("inspect").matches(&before));
    });
}

/// A named network namespace for tests that need two namespaces joined by a veth; deleted on drop.
pub(super) struct NamedNetns {
    pub(super) name: String,
}

impl NamedNetns {
    pub(super) fn new(tag: &str) -> NamedNetns {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mnredir{}x{}{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = NamedNetns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub(super) fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay there.
    pub(super) fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(move || {
                let fd = std::fs::File::open(&path).expect("opening the namespace");
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Non-blocking listener on all addresses of the calling thread's namespace.
fn listen(port: u16) -> std::net::TcpListener {
    let l = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// Which of `listeners` (by index) gets the next connection within two seconds, and the original
/// destination the kernel recorded for it (`SO_ORIGINAL_DST`; the local address when not redirected).
fn landed(listeners: &[&std::net::TcpListener]) -> (usize, std::net::SocketAddr) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        for (i, l) in listeners.iter().enumerate() {
            if let Ok((stream, _)) = l.accept() {
                let sock = socket2::SockRef::from(&stream);
                let dst = sock
                    .original_dst_v4()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .or_else(|| stream.local_addr().ok())
                    .expect("an address");
                return (i, dst);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("no listener got the connection");
}

/// Connects from the calling thread's namespace, optionally with `SO_MARK`.
fn dial(to: std::net::SocketAddr, mark: Option<u32>) -> std::net::TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    if let Some(mark) = mark {
        sock.set_mark(mark).expect("SO_MARK");
    }
    sock.connect_timeout(&to.into(), std::time::Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    sock.into()
}

/// A pod and a client namespace (tags `pod_tag`, `client_tag`) joined by a veth (`vpod` in the pod, `vcli`
/// in the client), the pod at `<prefix>.2/24` and the client at `<prefix>.1/24`.
fn pod_and_client(pod_tag: &str, client_tag: &str, prefix: &str) -> (NamedNetns, NamedNetns) {
    let pod = NamedNetns::new(pod_tag);
    let client = NamedNetns::new(client_tag);
    pod.ip(&[
        "link",
        "add",
        "vpod",
        "type",
        "veth",
        "peer",
        "name",
        "vcli",
        "netns",
        &client.name,
    ]);
    pod.ip(&["addr", "add", &format!("{prefix}.2/24"), "dev", "vpod"]);
    pod.ip(&["link", "set", "vpod", "up"]);
    client.ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", "vcli"]);
    client.ip(&["link", "set", "vcli", "up"]);
    (pod, client)
}

#[test]
fn captured_traffic_lands_on_the_proxy_ports_with_its_original_destination() {
    needs_root!("captured_traffic_lands_on_the_proxy_ports_with_its_original_destination");
    let (pod, client) = pod_and_client("pod", "cli", "10.250.0");

    let s = RuleSettings::default();
    let (outbound, plaintext, hbone) = pod.run(|| {
        install(&s).expect("install");
        (listen(15001), listen(15006), listen(15008))
    });
    let app_elsewhere = client.run(|| listen(80));
    let remote: std::net::SocketAddr = "10.250.0.1:80".parse().expect("addr");

    // Outbound from the pod: captured to :15001, which learns where the app meant to go.
    let _c = pod.run(|| dial(remote, None));
    assert_eq!(landed(&[&outbound, &app_elsewhere]), (0, remote));

    // The proxy's own connections (SO_MARK 1337) go out untouched.
    let _c = pod.run(|| dial(remote, Some(s.packet_mark)));
    assert_eq!(landed(&[&outbound, &app_elsewhere]), (1, remote));

    // Inbound plaintext to any port: captured to :15006 with the original destination.
    let app_port: std::net::SocketAddr = "10.250.0.2:8080".parse().expect("addr");
    let _c = client.run(|| dial(app_port, None));
    assert_eq!(landed(&[&plaintext, &hbone]), (0, app_port));

    // Inbound HBONE to :15008 is not redirected.
    let hbone_addr: std::net::SocketAddr = "10.250.0.2:15008".parse().expect("addr");
    let _c = client.run(|| dial(hbone_addr, None));
    assert_eq!(landed(&[&plaintext, &hbone]), (1, hbone_addr));

    // Each rule counts its hits, as istio-cni's do: one captured outbound connection (its SYN) and one
    // inbound, read with `nft list`. A re-install with the same settings (an agent restart) keeps them.
    let hits = || {
        pod.run(|| run("nft", &["list", "table", "inet", rules::NAT]))
            .lines()
            .filter(|l| l.contains("ip daddr != 127.0.0.1") && l.contains("redirect to :150"))
            .map(|l| l.trim().to_owned())
            .collect::<Vec<_>>()
    };
    let before = hits();
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(
        before
            .iter()
            .all(|l| l.contains("counter packets 1 bytes ")),
        "{before:?}"
    );
    pod.run(|| install(&s).expect("re-install"));
    assert_eq!(hits(), before);
}

#[test]
fn tcp_from_a_listed_virtual_interface_is_captured_as_the_pods_outbound() {
    needs_root!("tcp_from_a_listed_virtual_interface_is_captured_as_the_pods_outbound");
    // A pod with its own network (vpod, from the client's side) and a VM inside it (KubeVirt's tap,
    // here a veth `vm0` to a "vm" namespace) whose traffic leaves through the pod.
    let (pod, client) = pod_and_client("vpod", "vcli", "10.252.0");
    let vm = NamedNetns::new("vvm");
    pod.ip(&[
        "link", "add", "vm0", "type", "veth", "peer", "name", "vmnic", "netns", &vm.name,
    ]);
    pod.ip(&["addr", "add", "10.253.0.1/24", "dev", "vm0"]);
    pod.ip(&["link", "set", "vm0", "up"]);
    vm.ip(&["addr", "add", "10.253.0.2/24", "dev", "vmnic"]);
    vm.ip(&["link", "set", "vmnic", "up"]);
    vm.ip(&["route", "add", "default", "via", "10.253.0.1"]);

    let (outbound, plaintext) = pod.run(|| (listen(15001), listen(15006)));
    let remote: std::net::SocketAddr = "10.252.0.1:80".parse().expect("addr");
    let app_port: std::net::SocketAddr = "10.252.0.2:8080".parse().expect("addr");

    // Without the annotation the VM's call is, to the pod's rules, inbound plaintext.
    pod.run(|| install(&RuleSettings::default()).expect("install"));
    let _c = vm.run(|| dial(remote, None));
    assert_eq!(landed(&[&outbound, &plaintext]), (1, remote));

    // Listed (by name, and by a wildcard as nft reads one): the pod's outbound, to where the VM meant.
    for listed in ["vm0", "vm*"] {
        let s = RuleSettings {
            reroute_interfaces: vec!["tap9".into(), listed.into()],
            ..RuleSettings::default()
        };
        pod.run(|| {
            install(&s).expect("install");
            assert!(inspect().expect("inspect").matches(&s));
        });
        let _c = vm.run(|| dial(remote, None));
        assert_eq!(landed(&[&outbound, &plaintext]), (0, remote), "{listed}");
        // Traffic from other interfaces is unchanged: inbound to the pod is still inbound.
        let _c = client.run(|| dial(app_port, None));
        assert_eq!(landed(&[&outbound, &plaintext]), (1, app_port), "{listed}");
    }
}

/// Installs over and over (new pods, the same settings again, alternating settings) and reads back after
/// each change. Its timings are printed for information only: the pod-start cost is measured by
/// `benches/cni_add.rs`, not asserted here.
#[test]
fn repeated_installs_with_alternating_settings_always_read_back_as_installed() {
    needs_root!("repeated_installs_with_alternating_settings_always_read_back_as_installed");
    use std::time::{Duration, Instant};
    const FRESH: u32 = 40;
    const ROUNDS: u32 = 200;
    let s = RuleSettings::default();

    // A new pod: nothing of ours in the namespace yet.
    let mut fresh = Duration::ZERO;
    for _ in 0..FRESH {
        fresh += in_new_netns(|| {
            let start = Instant::now();
            install(&s).expect("install");
            start.elapsed()
        });
    }
    let fresh = fresh / FRESH;

    let (again, changed, looked) = in_new_netns(|| {
        install(&s).expect("first install");
        // Re-installing the same settings (agent restart, reconcile).
        let start = Instant::now();
        for _ in 0..ROUNDS {
            install(&s).expect("install");
        }
        let again = start.elapsed() / ROUNDS;
        // Settings that differ each time: the replace batch.
        let dns = RuleSettings {
            dns_capture: true,
            ..s.clone()
        };
        let start = Instant::now();
        for i in 0..ROUNDS / 10 {
            let want = if i % 2 == 0 { &dns } else { &s };
            install(want).expect("install");
            assert!(inspect().expect("inspect").matches(want), "round {i}");
        }
        let changed = start.elapsed() / (ROUNDS / 10);
        let start = Instant::now();
        for _ in 0..ROUNDS {
            assert!(!inspect().expect("inspect").is_empty());
        }
        (again, changed, start.elapsed() / ROUNDS)
    });
    println!(
        "install: new pod {fresh:?} (mean of {FRESH}), same settings again {again:?} (mean of {ROUNDS}), \
         changed settings {changed:?} (mean of {}); inspect {looked:?}",
        ROUNDS / 10
    );
}

#[test]
fn a_failing_first_install_leaves_nothing_behind() {
    needs_root!("a_failing_first_install_leaves_nothing_behind");
    in_new_netns(|| {
        let mut plan = rules::plan(&RuleSettings::default());
        plan[0].chains[0].rules.push(vec![Expr::Cmp {
            sreg: nft::REG1,
            op: 99,
            data: vec![0; 4],
        }]);
        let mut sock =
            NlSocket::open(netlink_sys::protocols::NETLINK_NETFILTER, "netfilter").expect("socket");
        let batch = nft::create_batch(&plan, sock.seq());
        let err = send_batch(&mut sock, batch).expect_err("bad rule");
        assert!(
            matches!(
                err,
                Error::Rejected {
                    errno: Errno::EINVAL,
                    ..
                }
            ),
            "{err}"
        );
        assert!(inspect().expect("inspect").tables.is_empty());
        assert_eq!(nft_ruleset().trim(), "");
    });
}

#[test]
fn install_takes_over_tables_someone_else_programmed_or_changed() {
    needs_root!("install_takes_over_tables_someone_else_programmed_or_changed");
    in_new_netns(|| {
        // A leftover of another version of the rules, under Istio's table name.
        run("nft", &["add", "table", "inet", rules::NAT]);
        run("nft", &["add", "chain", "inet", rules::NAT, "stale"]);
        run(
            "nft",
            &["add", "rule", "inet", rules::NAT, "stale", "accept"],
        );
        let s = RuleSettings::default();
        install(&s).expect("install over a stale table");
        assert!(inspect().expect("inspect").matches(&s));
        assert!(!nft_ruleset().contains("stale"));

        // A rule added behind our back is noticed and replaced away.
        run(
            "nft",
            &[
                "add",
                "rule",
                "inet",
                rules::NAT,
                "istio-output",
                "tcp",
                "dport",
                "9",
                "accept",
            ],
        );
        assert!(!inspect().expect("inspect").matches(&s));
        install(&s).expect("reinstall");
        assert!(inspect().expect("inspect").matches(&s));
        assert!(!nft_ruleset().contains("dport 9 "));

        // So is a changed chain policy.
        run(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                rules::MANGLE,
                "output",
                "{ policy drop; }",
            ],
        );
        assert!(!inspect().expect("inspect").matches(&s));
        install(&s).expect("reinstall");
        assert!(inspect().expect("inspect").matches(&s));
    });
}

#[test]
fn without_cap_net_admin_install_says_not_permitted() {
    if nix::unistd::geteuid().is_root() {
        // Root runs this very test again in a child process as `nobody` (no capabilities at all).
        use std::os::unix::process::CommandExt;
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "redirect::tests::without_cap_net_admin_install_says_not_permitted",
                "--nocapture",
            ])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("re-running the test as nobody");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "as nobody: {out:?}"
        );
        return;
    }
    match install(&RuleSettings::default()) {
        Err(Error::NotPermitted { .. }) => {}
        other => panic!("expected NotPermitted, got {other:?}"),
    }
}

#[test]
fn service_dnat_and_numgen_expressions_decode_to_what_was_built() {
    for e in [
        Expr::Dnat {
            addr_reg: nft::REG1,
            port_reg: libc::NFT_REG_2 as u32,
        },
        Expr::NumgenRandom {
            dreg: nft::REG1,
            modulus: 3,
        },
    ] {
        let mut w = Writer::default();
        e.encode(&mut w);
        let (_, elem) = attrs(&w.buf).next().expect("one element");
        assert_eq!(Expr::decode(elem), e);
    }
}

#[test]
fn service_vips_become_dnat_rules_spread_evenly_and_a_second_install_is_refused() {
    needs_root!("service_vips_become_dnat_rules_spread_evenly_and_a_second_install_is_refused");
    use services::{install_services, ServiceVip};
    let vips = [
        ServiceVip {
            vip: "10.96.0.20".parse().unwrap(),
            port: 9080,
            endpoints: vec!["10.244.1.10:9080".parse().unwrap()],
        },
        ServiceVip {
            vip: "10.96.0.22".parse().unwrap(),
            port: 9080,
            endpoints: ["10.244.2.10:9080", "10.244.2.11:9080", "10.244.2.12:9081"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
        },
    ];
    in_new_netns(|| {
        install_services(&vips).expect("install");
        let ruleset = nft_ruleset();
        for want in [
            "type nat hook prerouting priority dstnat; policy accept;",
            "ip daddr 10.96.0.20 tcp dport 9080 dnat ip to 10.244.1.10:9080",
            "ip daddr 10.96.0.22 tcp dport 9080 numgen random mod 3 0 dnat ip to 10.244.2.10:9080",
            "ip daddr 10.96.0.22 tcp dport 9080 numgen random mod 2 0 dnat ip to 10.244.2.11:9080",
            "ip daddr 10.96.0.22 tcp dport 9080 dnat ip to 10.244.2.12:9081",
        ] {
            assert!(ruleset.contains(want), "missing {want:?} in\n{ruleset}");
        }
        let again = install_services(&vips).unwrap_err();
        assert!(again.to_string().contains("meshnode-services"), "{again}");
    });
}
