//! Traffic capture end to end: pods created through the real CNI chain (`ptp`, then `meshnode-cni`) as a
//! container runtime does, the CNI agent programming their rules and handing them to the node proxy over
//! ZDS, and traffic between them carried through HBONE. Needs root, `ip`, `nft` and
//! containernetworking-plugins (installed by .ci/run).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::cluster::{
    agent_default_rules, call, ip_rules, nft_ruleset, rules, serve_app, settle, workloads, Node,
};

const AGENT_YAML: &str = "namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
  test: {}
pods:
- {name: client, namespace: default, serviceAccount: client}
- {name: server, namespace: default, serviceAccount: server}
- {name: legacy, namespace: default, serviceAccount: legacy, labels: {istio.io/dataplane-mode: none}}
- {name: outsider, namespace: test, serviceAccount: outsider}
";

/// `client` and `server` added through the chain and known to the proxy (only the client may call the
/// server), with an app on the server's :8080, the returned address.
fn client_and_server(node: &Node) -> (support::cluster::Pod, support::cluster::Pod, SocketAddr) {
    let mut client = node.pod("default", "client");
    let mut server = node.pod("default", "server");
    for p in [&mut client, &mut server] {
        node.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, node.logs()));
    }
    node.set_local_config(&workloads(&[&client, &server]));
    settle();
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);
    (client, server, dst)
}

#[test]
fn enrolled_pods_talk_through_hbone_listed_on_the_admin_port_and_a_pod_labelled_none_stays_out() {
    if !support::root_or_skip(
        "enrolled_pods_talk_through_hbone_listed_on_the_admin_port_and_a_pod_labelled_none_stays_out",
    )
    {
        return;
    }
    let node = Node::start(AGENT_YAML, "workloads: []\n");
    let mut client = node.pod("default", "client");
    let mut server = node.pod("default", "server");
    let mut legacy = node.pod("default", "legacy");
    for p in [&mut client, &mut server, &mut legacy] {
        node.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, node.logs()));
    }
    // The chained plugin passed ptp's result through.
    let result = client.result.as_ref().unwrap();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert!(
        result["interfaces"]
            .as_array()
            .is_some_and(|i| !i.is_empty()),
        "{result}"
    );

    // Rules are in the enrolled pods, read back through netlink and seen by nft; none in the opted-out pod.
    let settings = agent_default_rules();
    for p in [&client, &server] {
        let got = rules(p);
        assert!(got.matches(&settings), "{}: {got:?}", p.name);
        let nft = nft_ruleset(p);
        assert!(nft.contains("table inet istio-ambient-nat"), "{nft}");
        assert!(nft.contains("redirect to :15001"), "{nft}");
        assert!(nft.contains("redirect to :15006"), "{nft}");
        assert!(ip_rules(p).contains("fwmark 0x111/0xfff lookup 100"));
    }
    assert!(rules(&legacy).is_empty(), "{:?}", rules(&legacy));
    assert!(!ip_rules(&legacy).contains("lookup 100"));

    node.set_local_config(&workloads(&[&client, &server, &legacy]));
    settle();
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);

    // client → (captured) → HBONE with client's identity → server's proxy → app: allowed by the policy.
    let reply = call(&client, dst).unwrap_or_else(|e| panic!("client call: {e}\n{}", node.logs()));
    assert!(
        reply.starts_with(&format!("app saw {}", client.ip.unwrap())),
        "{reply}"
    );
    // A connection held open is listed on the admin port for both pods, as `istioctl ztunnel-config
    // connections` reads it: the client's outbound (dialled address → the server's HBONE port), the
    // server's inbound (from the client, to the app).
    let held = client
        .netns
        .run(move || std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("held connection: {e}\n{}", node.logs()));
    let server_hbone = SocketAddr::new(server.ip.unwrap(), 15008).to_string();
    let listed = |dump: &serde_json::Value| {
        let conns = |uid: &str, dir: &str| dump["workloadState"][uid]["connections"][dir].clone();
        let out = conns(&client.uid, "outbound");
        let inb = conns(&server.uid, "inbound");
        let out_ok = out.as_array().is_some_and(|l| {
            l.iter().any(|c| {
                c["originalDst"] == dst.to_string()
                    && c["actualDst"] == server_hbone
                    && c["protocol"] == "HBONE"
            })
        });
        let in_ok = inb.as_array().is_some_and(|l| {
            l.iter().any(|c| {
                c["src"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{}:", client.ip.unwrap())))
                    && c["actualDst"] == dst.to_string()
                    && c["protocol"] == "HBONE"
            })
        });
        out_ok && in_ok
    };
    let dump = || -> serde_json::Value {
        let text = node.http_get(15000, "/config_dump").unwrap_or_default();
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_default()
    };
    node.wait_for(
        || listed(&dump()),
        "both ends of the held connection on /config_dump",
    );
    drop(held);
    node.wait_for(
        || !listed(&dump()),
        "the closed connection gone from /config_dump",
    );
    // legacy is not captured: its plain TCP is captured on the server side (:15006) and refused there,
    // because it carries no identity.
    let refused = call(&legacy, dst);
    assert!(
        refused.as_ref().map_or(true, |r| r.is_empty()),
        "legacy got through: {refused:?}"
    );
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("{}", node.logs());
    }
}

#[test]
fn check_reports_tampered_rules_and_del_leaves_nothing_behind() {
    if !support::root_or_skip("check_reports_tampered_rules_and_del_leaves_nothing_behind") {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    // The agent's own drift repair would put the rules back before CHECK looks: off for this test.
    node.agent_env
        .push(("MESHNODE_RULE_CHECK_INTERVAL".into(), "0".into()));
    node.start_agent();
    let mut client = node.pod("default", "client");
    node.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", node.logs()));
    assert!(!rules(&client).is_empty());
    let ip = client.ip.unwrap();
    // The proxy listens in the pod.
    let hbone = SocketAddr::new(ip, 15008);
    node.wait_for(
        || {
            client
                .netns
                .run(move || std::net::TcpStream::connect(hbone).is_ok())
        },
        "the proxy's :15008 in the pod",
    );
    // CHECK passes while the rules are as installed, and fails once someone removes them.
    node.check(&client)
        .unwrap_or_else(|e| panic!("CHECK: {e}\n{}", node.logs()));
    let flushed = client
        .netns
        .exec("nft", &["delete", "table", "inet", "istio-ambient-nat"]);
    assert!(flushed.status.success());
    let err = node.check(&client).unwrap_err().to_string();
    assert!(err.contains("rules differ"), "{err}");

    node.del(&client)
        .unwrap_or_else(|e| panic!("DEL: {e}\n{}", node.logs()));
    let left = rules(&client);
    assert!(left.is_empty(), "rules left after DEL: {left:?}");
    assert!(nft_ruleset(&client).trim().is_empty());
    assert!(!ip_rules(&client).contains("lookup 100"));
    node.wait_for(
        || {
            client
                .netns
                .run(move || std::net::TcpStream::connect(hbone).is_err())
        },
        "the proxy to stop listening in the deleted pod",
    );
    let state = std::fs::read_to_string(node.path("run/meshnode-pods.json")).unwrap();
    assert!(!state.contains(&client.uid), "{state}");
    // A second DEL (runtimes repeat them) is fine.
    node.del(&client).unwrap();
}

const REPAIRED: &str = "meshnode_cni_pod_rules_repaired_total";
const REPAIR_FAILED: &str = "meshnode_cni_pod_rules_repair_failures_total";

#[test]
fn rules_removed_from_a_captured_pod_behind_the_agents_back_are_put_back() {
    if !support::root_or_skip(
        "rules_removed_from_a_captured_pod_behind_the_agents_back_are_put_back",
    ) {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    node.agent_env
        .push(("MESHNODE_RULE_CHECK_INTERVAL".into(), "1s".into()));
    node.start_agent();
    let mut client = node.pod("default", "client");
    node.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", node.logs()));
    assert!(rules(&client).matches(&agent_default_rules()));
    assert_eq!(node.agent_counter(REPAIRED), 0);

    // Someone (a pod with NET_ADMIN, an operator) deletes the capture tables and the ip rule.
    for args in [
        &["delete", "table", "inet", "istio-ambient-nat"][..],
        &["delete", "table", "inet", "istio-ambient-mangle"][..],
    ] {
        assert!(client.netns.exec("nft", args).status.success());
    }
    assert!(!rules(&client).matches(&agent_default_rules()));
    node.wait_for(
        || rules(&client).matches(&agent_default_rules()),
        "the agent to put the pod's rules back",
    );
    node.wait_for(
        || node.agent_counter(REPAIRED) >= 1,
        "the repair to be counted on :15014",
    );
    assert_eq!(node.agent_counter(REPAIR_FAILED), 0);
}

#[test]
fn a_reinstall_that_fails_part_way_leaves_a_captured_pod_with_its_rules() {
    if !support::root_or_skip(
        "a_reinstall_that_fails_part_way_leaves_a_captured_pod_with_its_rules",
    ) {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    let (client, _server, dst) = client_and_server(&node);
    assert!(call(&client, dst).unwrap().starts_with("app saw"));

    // The pod's loopback is renamed: the nftables part of a re-install still works, the route part (a
    // local route via `lo`) now fails, so every re-install fails part way. (Taking lo down also drops
    // the local route of table 100, so the rules read back as drifted too.)
    let lo = |from: &str, to: &str| {
        for args in [
            &["link", "set", from, "down"][..],
            &["link", "set", from, "name", to],
            &["link", "set", to, "up"],
        ] {
            let out = client.netns.exec("ip", args);
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
    };
    lo("lo", "lo9");
    // A restarted agent re-installs every captured pod's rules: it fails, and the pod must keep its old
    // rules (its traffic still goes through the proxy) while the agent retries.
    node.start_agent();
    node.wait_for(
        || node.agent_counter(REPAIR_FAILED) >= 1,
        "a failed repair attempt to be counted",
    );
    assert!(
        nft_ruleset(&client).contains("istio-ambient-nat"),
        "a failed re-install removed the pod's capture rules\n{}",
        node.logs()
    );
    // Once the fault is gone the retry succeeds.
    lo("lo9", "lo");
    node.wait_for(
        || node.agent_counter(REPAIRED) >= 1,
        "the retried install to succeed",
    );
    assert!(rules(&client).matches(&agent_default_rules()));
}

#[test]
fn a_pod_netns_path_that_now_names_another_namespace_is_never_used() {
    if !support::root_or_skip("a_pod_netns_path_that_now_names_another_namespace_is_never_used") {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    let mut client = node.pod("default", "client");
    node.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", node.logs()));
    let name = client.netns.name.clone();
    let hbone_in = |pod: &support::cluster::Pod| {
        pod.netns
            .run(|| std::net::TcpStream::connect(("127.0.0.1", 15008)).is_ok())
    };
    node.wait_for(|| hbone_in(&client), "the proxy's :15008 in the pod");
    // The path the runtime gave now names another namespace (as /proc/<pid>/ns/net does when the pid is
    // reused): the pod's own lives on, held by the agent and the proxy.
    let swap = || {
        for args in [
            &["netns", "delete", name.as_str()][..],
            &["netns", "add", name.as_str()],
            &["-n", name.as_str(), "link", "set", "lo", "up"],
        ] {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
    };

    // A proxy that reconnects gets the pod's namespace from the agent's open handle, not by path.
    node.proxy = None;
    swap();
    node.start_proxy();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !hbone_in(&client),
        "the proxy was handed the namespace now at the pod's path\n{}",
        node.logs()
    );

    // A restarted agent finds the recorded namespace identity differs: it forgets the pod instead of
    // programming rules into (and handing over) the namespace now at that path.
    node.agent = None;
    swap();
    node.start_agent();
    node.wait_for(
        || {
            !std::fs::read_to_string(node.path("run/meshnode-pods.json"))
                .unwrap_or_default()
                .contains(&client.uid)
        },
        "the agent to forget the pod whose namespace is gone",
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(rules(&client).is_empty(), "{:?}", rules(&client));
    assert!(!hbone_in(&client), "{}", node.logs());
    assert!(node.logs().contains("another namespace"), "{}", node.logs());
}

#[test]
fn a_stalled_proxy_holds_up_only_the_pods_waiting_for_it() {
    if !support::root_or_skip("a_stalled_proxy_holds_up_only_the_pods_waiting_for_it") {
        return;
    }
    let node = Node::start(AGENT_YAML, "workloads: []\n");
    let mut client = node.pod("default", "client");
    node.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", node.logs()));
    // The proxy stops answering (SIGSTOP: connected, never acknowledging).
    let proxy = nix::unistd::Pid::from_raw(node.proxy.as_ref().unwrap().0.id() as i32);
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            let mut server = node.pod("default", "server");
            node.add(&mut server)
        });
        std::thread::sleep(Duration::from_millis(300));
        // While that pod waits for the proxy, the agent still answers everything else at once: a DEL
        // removes the other pod's rules before the plugin returns, a pod outside the mesh starts.
        node.del(&client)
            .unwrap_or_else(|e| panic!("DEL: {e}\n{}", node.logs()));
        assert!(
            rules(&client).is_empty(),
            "DEL returned before the agent removed the rules: {:?}\n{}",
            rules(&client),
            node.logs()
        );
        let mut outsider = node.pod("test", "outsider");
        node.add(&mut outsider).unwrap_or_else(|e| {
            panic!("outsider held up by a stalled proxy: {e}\n{}", node.logs())
        });
        assert!(rules(&outsider).is_empty());
        let waited = waiting.join().unwrap();
        assert!(waited.is_err(), "a pod no proxy took was reported enrolled");
    });
    nix::sys::signal::kill(proxy, nix::sys::signal::Signal::SIGCONT).unwrap();
}

#[test]
fn the_agent_answers_its_health_port_and_keeps_its_plugin_in_a_rewritten_chain() {
    if !support::root_or_skip(
        "the_agent_answers_its_health_port_and_keeps_its_plugin_in_a_rewritten_chain",
    ) {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    // istio-cni's health port, as the DaemonSet's probes call it.
    node.wait_for(|| node.http_ok(8000, "/healthz"), "GET :8000/healthz");
    node.wait_for(|| node.http_ok(8000, "/readyz"), "GET :8000/readyz");

    // The node's CNI config directory, as mounted into the agent's container, with a primary plugin's list.
    let (net_d, bin) = (node.path("net.d"), node.path("bin"));
    std::fs::create_dir_all(&net_d).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let primary = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp"}]}"#;
    let conflist = net_d.join("10-ptp.conflist");
    std::fs::write(&conflist, primary).unwrap();
    let plugin = support::cluster::plugin_binary();
    for (k, v) in [
        ("MOUNTED_CNI_NET_DIR", net_d.to_str().unwrap()),
        ("MESHNODE_CNI_BIN_DIR", bin.to_str().unwrap()),
        ("MESHNODE_CNI_PLUGIN", plugin.to_str().unwrap()),
    ] {
        node.agent_env.push((k.into(), v.into()));
    }
    node.start_agent();
    let installed = || {
        std::fs::read_to_string(&conflist).is_ok_and(|t| t.contains("meshnode-cni"))
            && bin.join("meshnode-cni").exists()
    };
    node.wait_for(installed, "the plugin appended to the chain and copied");
    // The primary CNI rewrites its config (as Calico or Cilium do on restart): the periodic check puts
    // the plugin back, so pods created afterwards are still captured.
    std::fs::write(&conflist, primary).unwrap();
    assert!(!installed());
    node.wait_for(installed, "the plugin appended again after the rewrite");
}

#[test]
fn a_pod_whose_proxy_listeners_cannot_be_bound_waits_and_is_served_once_they_can() {
    if !support::root_or_skip(
        "a_pod_whose_proxy_listeners_cannot_be_bound_waits_and_is_served_once_they_can",
    ) {
        return;
    }
    let node = Node::start(AGENT_YAML, "workloads: []\n");
    let mut client = node.pod("default", "client");
    // Something in the pod already holds the proxy's HBONE port (no SO_REUSEPORT): the proxy cannot bind
    // its listeners there, so it refuses the pod (NACK) and the pod stays captured but unserved.
    let squatter = client
        .netns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 15008)).expect("bind :15008 in the pod"));
    let err = node.add(&mut client).unwrap_err().to_string();
    assert!(err.contains("no node proxy"), "{err}\n{}", node.logs());
    assert!(
        rules(&client).matches(&agent_default_rules()),
        "fail closed while it waits"
    );
    // The port is freed: the proxy's retry binds it and the agent's retry hands the pod over.
    drop(squatter);
    node.wait_for(
        || {
            client
                .netns
                .run(|| std::net::TcpStream::connect(("127.0.0.1", 15008)).is_ok())
        },
        "the proxy to listen in the pod once the port is free",
    );
    // The agent records the proxy's acknowledgement: the pod is served, no longer pending.
    node.wait_for(
        || {
            let state =
                std::fs::read_to_string(node.path("run/meshnode-pods.json")).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&state).unwrap_or_default();
            v["pods"].as_array().is_some_and(|pods| {
                pods.iter()
                    .any(|p| p["uid"] == client.uid.as_str() && p["state"] == "enabled")
            })
        },
        "the agent to record the pod as served",
    );
}

#[test]
fn restarting_the_agent_and_the_proxy_keeps_pods_captured() {
    if !support::root_or_skip("restarting_the_agent_and_the_proxy_keeps_pods_captured") {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    let (client, _server, dst) = client_and_server(&node);
    assert!(call(&client, dst).unwrap().starts_with("app saw"));

    // The agent crashes and comes back: pods stay served meanwhile, and afterwards.
    node.agent = None;
    assert!(
        call(&client, dst).unwrap().starts_with("app saw"),
        "{}",
        node.logs()
    );
    node.start_agent();
    assert!(rules(&client).matches(&agent_default_rules()));
    assert!(
        call(&client, dst).unwrap().starts_with("app saw"),
        "{}",
        node.logs()
    );

    // The proxy crashes: traffic of enrolled pods goes nowhere (fail closed), not around the mesh.
    node.proxy = None;
    let while_down = call(&client, dst);
    assert!(
        while_down.as_ref().map_or(true, |r| r.is_empty()),
        "traffic bypassed the mesh while the proxy was down: {while_down:?}"
    );
    // A new proxy gets every pod from the agent's snapshot.
    node.start_proxy();
    let reply =
        call(&client, dst).unwrap_or_else(|e| panic!("after proxy restart: {e}\n{}", node.logs()));
    assert!(
        reply.starts_with(&format!("app saw {}", client.ip.unwrap())),
        "{reply}"
    );
}

#[test]
fn a_namespace_joining_the_mesh_captures_its_running_pods_live() {
    if !support::root_or_skip("a_namespace_joining_the_mesh_captures_its_running_pods_live") {
        return;
    }
    let node = Node::start(AGENT_YAML, "workloads: []\n");
    let mut outsider = node.pod("test", "outsider");
    node.add(&mut outsider).unwrap();
    assert!(rules(&outsider).is_empty());
    node.set_agent_config(&AGENT_YAML.replace(
        "test: {}",
        "test: {labels: {istio.io/dataplane-mode: ambient}}",
    ));
    node.wait_for(
        || !rules(&outsider).is_empty(),
        "live capture of the running pod",
    );
    let hbone = SocketAddr::new(outsider.ip.unwrap(), 15008);
    node.wait_for(
        || {
            outsider
                .netns
                .run(move || std::net::TcpStream::connect(hbone).is_ok())
        },
        "the proxy listening in the newly enrolled pod",
    );
    // And out again when the label goes.
    node.set_agent_config(AGENT_YAML);
    node.wait_for(|| rules(&outsider).is_empty(), "release of the pod");
}

#[test]
fn bad_input_is_refused_and_the_agent_keeps_serving() {
    if !support::root_or_skip("bad_input_is_refused_and_the_agent_keeps_serving") {
        return;
    }
    let node = Node::start(AGENT_YAML, "workloads: []\n");

    // Garbage on the plugin socket: an HTTP 400, nothing else happens.
    let sock = node.path("run/pluginevent.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Garbage on the ZDS socket instead of a hello: that connection is dropped, the real proxy stays.
    let zds = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let addr = nix::sys::socket::UnixAddr::new(&node.path("zds.sock")).unwrap();
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&zds), &addr).unwrap();
    nix::sys::socket::send(
        std::os::fd::AsRawFd::as_raw_fd(&zds),
        b"\xff\xff\xff not protobuf",
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    drop(zds);

    // A pod whose netns does not exist: a CNI error, no rules anywhere, no record kept.
    let mut ghost = node.pod("default", "client");
    ghost.attachment.netns = "/var/run/netns/mn-does-not-exist".into();
    let err = node.add(&mut ghost).unwrap_err().to_string();
    assert!(
        err.contains("mn-does-not-exist") || err.contains("CNI_NETNS"),
        "{err}"
    );

    // Everyone else is still served: an enrolled pod comes up and is captured.
    let mut client = node.pod("default", "client");
    node.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD after bad input: {e}\n{}", node.logs()));
    assert!(rules(&client).matches(&agent_default_rules()));
    assert!(node.ready());
}

#[test]
fn without_a_proxy_an_enrolled_pod_fails_closed_and_an_outsider_is_not_blocked() {
    if !support::root_or_skip(
        "without_a_proxy_an_enrolled_pod_fails_closed_and_an_outsider_is_not_blocked",
    ) {
        return;
    }
    let mut node = Node::start(AGENT_YAML, "workloads: []\n");
    node.proxy = None;
    std::thread::sleep(Duration::from_millis(300));
    let mut client = node.pod("default", "client");
    let err = node.add(&mut client).unwrap_err().to_string();
    assert!(err.contains("no node proxy"), "{err}\n{}", node.logs());
    // Its rules are in place (so nothing leaves the pod unmeshed) while it waits.
    assert!(!rules(&client).is_empty());
    let mut outsider = node.pod("test", "outsider");
    node.add(&mut outsider)
        .unwrap_or_else(|e| panic!("outsider blocked: {e}\n{}", node.logs()));
    assert!(rules(&outsider).is_empty());

    // Agent down too: the plugin cannot see pod labels, and the default selectors enroll a pod labelled
    // ambient in any namespace, so it fails closed everywhere but the excluded namespaces.
    node.agent = None;
    let mut another = node.pod("default", "server");
    let err = node.add(&mut another).unwrap_err().to_string();
    assert!(
        err.contains("unreachable") || err.contains("agent"),
        "{err}"
    );
    let mut plain = node.pod("test", "plain");
    let err = node.add(&mut plain).unwrap_err().to_string();
    assert!(err.contains("may be enrolled"), "{err}");
    let mut system = node.pod("kube-system", "coredns");
    node.add(&mut system)
        .unwrap_or_else(|e| panic!("excluded pod blocked while the agent is down: {e}"));

    // With namespace-only selectors, a namespace no selector reaches is safe: its pods start.
    node.agent_env.push((
        "AMBIENT_ENABLEMENT_SELECTOR".into(),
        "- namespaceSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}".into(),
    ));
    node.start_agent();
    node.wait_for(
        || {
            std::fs::read_to_string(node.path("run/meshnode-enrollment.json"))
                .is_ok_and(|h| h.contains("passThroughNamespaces\":[\"test\"]"))
        },
        "the agent's hint to list namespace test as one no selector reaches",
    );
    node.agent = None;
    let mut plain = node.pod("test", "plain2");
    node.add(&mut plain)
        .unwrap_or_else(|e| panic!("pod of an unreachable namespace blocked: {e}"));
    let mut another = node.pod("default", "server2");
    assert!(node.add(&mut another).is_err());
}

#[test]
fn a_vm_behind_a_listed_virtual_interface_reaches_the_mesh_as_its_pod() {
    if !support::root_or_skip("a_vm_behind_a_listed_virtual_interface_reaches_the_mesh_as_its_pod")
    {
        return;
    }
    let node = Node::start(AGENT_YAML, "workloads: []\n");
    let (client, _server, dst) = client_and_server(&node);

    // A VM inside the client pod (KubeVirt's layout: its NIC bridged to an interface of the pod's netns),
    // sending through the pod.
    let vm = support::netns::Netns::new("vm");
    let (vm_if, _) = support::netns::veth(&client.netns, "10.253.0.1/24", &vm, "10.253.0.2/24");
    let out = vm.ip(&["route", "add", "default", "via", "10.253.0.1"]);
    assert!(out.status.success(), "{out:?}");

    // The pod's annotation names the VM's interface; the agent re-programs the running pod.
    let annotated = AGENT_YAML.replace(
        "- {name: client, namespace: default, serviceAccount: client}",
        &format!(
            "- {{name: client, namespace: default, serviceAccount: client, annotations: \
             {{istio.io/reroute-virtual-interfaces: \"{vm_if}\"}}}}"
        ),
    );
    node.set_agent_config(&annotated);
    node.wait_for(
        || nft_ruleset(&client).contains(&format!("iifname \"{vm_if}\"")),
        "the virtual interface's rules in the client pod",
    );

    // The VM's call is the pod's outbound: through HBONE with the pod's identity, which the server's
    // policy (only the client's identity) admits.
    let reply = support::cluster::call_from(&vm, dst)
        .unwrap_or_else(|e| panic!("VM call: {e}\n{}", node.logs()));
    assert!(reply.starts_with("app saw "), "{reply}\n{}", node.logs());
    let metrics = node.http_get(15020, "/metrics").unwrap_or_default();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"source\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\"")),
        "{metrics}"
    );
}
