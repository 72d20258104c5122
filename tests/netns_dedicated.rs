//! Pods in their own network namespaces, joined by veths, each meshed pod with a `meshnode proxy` process in
//! dedicated mode started exactly as ztunnel would be (environment variables only; `support::dedicated`).
//! Traffic is redirected by iptables rules in the pods (the tests' stand-in for the CNI's rules). Needs root.

mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::dedicated::{
    call, capture_outbound, iptables, serve_app, start_proxy, subnet, wait_ready, workload_yaml,
    System,
};
use support::netns::{veth, Netns};

/// meshnode on both sides, sharing one built-in CA in `<dir>/state` as two processes on one node would.
fn meshnode(dir: &Path) -> System {
    System::Meshnode {
        state_dir: dir.join("state"),
        ca_dir: None,
    }
}

#[test]
fn request_between_two_pods_crosses_both_proxies_over_hbone_on_ipv4_and_ipv6() {
    if !support::root_or_skip(
        "request_between_two_pods_crosses_both_proxies_over_hbone_on_ipv4_and_ipv6",
    ) {
        return;
    }
    let n = subnet();
    let (client_ip, server_ip) = (format!("10.{n}.0.1"), format!("10.{n}.0.2"));
    let (client_ip6, server_ip6) = (format!("fd00:{n}::1"), format!("fd00:{n}::2"));
    let client = Netns::new("cli");
    let server = Netns::new("srv");
    let (vc, vs) = veth(
        &client,
        &format!("{client_ip}/24"),
        &server,
        &format!("{server_ip}/24"),
    );
    client.ip(&[
        "addr",
        "add",
        &format!("{client_ip6}/64"),
        "dev",
        &vc,
        "nodad",
    ]);
    server.ip(&[
        "addr",
        "add",
        &format!("{server_ip6}/64"),
        "dev",
        &vs,
        "nodad",
    ]);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local.yaml");
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml("client", "sleep", &[&client_ip, &client_ip6]),
        workload_yaml("server", "httpbin", &[&server_ip, &server_ip6])
    );
    std::fs::write(&config, yaml).unwrap();
    serve_app(&server, "[::]:8080".parse().unwrap());

    let _client_proxy = start_proxy(
        &meshnode(dir.path()),
        &client,
        "default/client/sleep",
        &config,
        dir.path(),
        "client.log",
    );
    let _server_proxy = start_proxy(
        &meshnode(dir.path()),
        &server,
        "default/server/httpbin",
        &config,
        dir.path(),
        "server.log",
    );
    wait_ready(&client, dir.path(), "client.log");
    wait_ready(&server, dir.path(), "server.log");

    // Capture the client pod's outbound TCP, except the proxy's own (marked) traffic.
    capture_outbound(&client);

    for (dst, server_addr) in [
        (format!("{server_ip}:8080"), server_ip),
        (format!("[{server_ip6}]:8080"), server_ip6),
    ] {
        let reply = call(&client, dst.parse().unwrap()).unwrap();
        // The app was reached by the server pod's proxy (its own address), not by the client directly.
        assert!(
            reply.contains(&format!("{server_addr}]:"))
                || reply.contains(&format!("{server_addr}:")),
            "reply: {reply:?}"
        );
        assert!(
            !reply.contains(&client_ip),
            "the client reached the app directly: {reply:?}"
        );
        assert!(reply.ends_with("say hello\n"), "reply: {reply:?}");
    }

    // The server proxy saw both arrive over HBONE from the client's identity.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
        let complete = log
            .lines()
            .filter(|l| {
                l.contains("spiffe://cluster.local/ns/default/sa/sleep")
                    && l.contains("connection complete")
            })
            .count();
        if complete >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "server proxy log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn plaintext_caller_outside_the_mesh_is_served_until_a_policy_denies_it_then_reset() {
    if !support::root_or_skip(
        "plaintext_caller_outside_the_mesh_is_served_until_a_policy_denies_it_then_reset",
    ) {
        return;
    }
    let n = subnet();
    let (outside_ip, server_ip) = (format!("10.{n}.1.1"), format!("10.{n}.1.2"));
    let outside = Netns::new("out");
    let server = Netns::new("srv");
    veth(
        &outside,
        &format!("{outside_ip}/24"),
        &server,
        &format!("{server_ip}/24"),
    );

    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("local.yaml");
    let workloads = format!(
        "workloads:\n{}",
        workload_yaml("server", "httpbin", &[&server_ip])
    );
    std::fs::write(&config, &workloads).unwrap();
    serve_app(&server, format!("{server_ip}:8080").parse().unwrap());
    let _proxy = start_proxy(
        &meshnode(dir.path()),
        &server,
        "default/server/httpbin",
        &config,
        dir.path(),
        "server.log",
    );
    wait_ready(&server, dir.path(), "server.log");
    // Inbound capture in the server pod: everything but HBONE goes to the plaintext port.
    iptables(
        &server,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "!",
            "--dport",
            "15008",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ],
    );

    let dst: SocketAddr = format!("{server_ip}:8080").parse().unwrap();
    let reply = call(&outside, dst).unwrap();
    assert!(
        reply.starts_with(&format!("app saw {server_ip}:")),
        "not via the proxy: {reply:?}"
    );

    // PeerAuthentication STRICT, as istiod expresses it for ztunnel: deny sources without an identity.
    let strict = "policies:\n- name: strict\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules: [[[{notPrincipals: [!Presence []]}]]]\n";
    std::fs::write(&config, format!("{workloads}{strict}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call(&outside, dst) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "still served after STRICT: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("explicitly denied by: default/strict"),
        "server proxy log:\n{log}"
    );
}
