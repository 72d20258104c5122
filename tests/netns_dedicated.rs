//! Pods in their own network namespaces, joined by veths, each meshed pod with a `meshnode proxy` process in
//! dedicated mode started exactly as ztunnel would be (environment variables only). Traffic is redirected
//! by iptables rules in the pods (the tests' stand-in for the CNI's rules). Needs root.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::netns::{veth, KillOnDrop, Netns};

/// Starts `meshnode proxy` in `ns` for `workload`, logging to `<dir>/<log>`.
fn start_proxy(ns: &Netns, workload: &str, config: &Path, dir: &Path, log: &str) -> KillOnDrop {
    let log_file = std::fs::File::create(dir.join(log)).unwrap();
    let state_dir = dir.join("state");
    KillOnDrop(ns.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &["proxy"],
        &[
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", workload),
            ("LOCAL_XDS_PATH", config.to_str().unwrap()),
            ("XDS_ADDRESS", ""),
            // Both proxies share this machine's built-in CA, as two processes on one node would.
            ("MESHNODE_STATE_DIR", state_dir.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ],
        log_file,
    ))
}

fn wait_ready(ns: &Netns, dir: &Path, log: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = ns.run(move || {
            let Ok(mut s) = TcpStream::connect("127.0.0.1:15021") else {
                return false;
            };
            let _ = s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.1 200")
        });
        if ok {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
            panic!("proxy in {} never became ready; its log:\n{log}", ns.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The application: on every connection, answers `app saw <peer> say <first line>` and closes.
fn serve_app(ns: &Netns, addr: SocketAddr) {
    let app = ns.run(move || TcpListener::bind(addr).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = s.peer_addr().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
                let _ = (&s).write_all(format!("app saw {peer} say {line}").as_bytes());
            });
        }
    });
}

/// Connects from inside `ns`, says `hello`, returns the answer (or the error).
fn call(ns: &Netns, dst: SocketAddr) -> std::io::Result<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"hello\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })
}

fn iptables(ns: &Netns, cmd: &str, rule: &[&str]) {
    let out = ns.exec(cmd, rule);
    assert!(
        out.status.success(),
        "{cmd} {rule:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn workload_yaml(name: &str, sa: &str, ips: &[&str]) -> String {
    let ips = ips
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [{ips}]\n  protocol: HBONE\n"
    )
}

fn subnet() -> u8 {
    100 + (std::process::id() % 100) as u8
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
        &client,
        "default/client/sleep",
        &config,
        dir.path(),
        "client.log",
    );
    let _server_proxy = start_proxy(
        &server,
        "default/server/httpbin",
        &config,
        dir.path(),
        "server.log",
    );
    wait_ready(&client, dir.path(), "client.log");
    wait_ready(&server, dir.path(), "server.log");

    // Capture the client pod's outbound TCP, except the proxy's own (marked) traffic.
    let capture = |cmd, lo| {
        iptables(
            &client,
            cmd,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "!",
                "-d",
                lo,
                "-m",
                "mark",
                "!",
                "--mark",
                "1337",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        )
    };
    capture("iptables", "127.0.0.0/8");
    capture("ip6tables", "::1/128");

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
