//! meshnode against Istio's own ztunnel, both ways: a client pod whose node proxy is one system talks to a
//! server pod whose node proxy is the other, over HBONE, each trusting the other's certificates (ztunnel's
//! test CA; meshnode is given it as a plug-in CA), each configured only by ztunnel's environment variables
//! and local config format (`support::dedicated`).
//!
//! Needs root and a ztunnel binary given by the run: `ZTUNNEL_BIN` (built with `--features testing`, so
//! `FAKE_CA=true` works) and `ZTUNNEL_SRC` (its source tree, for `src/tls/{root-cert,ca-key}.pem`). How to
//! build one: `../shared/bench/README.md`. Without them the tests say SKIPPED (also under
//! `MESHNODE_TEST_STRICT`: the binary is not something CI can install).
//!
//! The last two put `meshnode control-plane` in istiod's place for both proxies: ztunnel takes its workloads,
//! policies and certificate from meshnode's delta ADS and CA.
//!
//! What passing proves: HBONE (mTLS 1.3, HTTP/2 CONNECT, `:authority`) is understood both ways, each side's
//! certificate carries the SPIFFE identity the other side authorizes (an ALLOW and a DENY naming the
//! client's principal are both enforced by the server side), and the server's app is reached through its
//! own proxy.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::dedicated::{
    call, capture_outbound, iptables, serve_app, start_proxy, start_proxy_from, subnet, wait_ready,
    workload_yaml, Source, System,
};
use support::netns::{veth, Netns};

/// The ztunnel binary and its test CA directory, when the run was given them.
fn ztunnel(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !support::root_or_skip(test) {
        return None;
    }
    let bin = std::env::var_os("ZTUNNEL_BIN").map(PathBuf::from);
    let tls = std::env::var_os("ZTUNNEL_SRC").map(|s| PathBuf::from(s).join("src/tls"));
    let given =
        matches!((&bin, &tls), (Some(b), Some(t)) if b.is_file() && t.join("ca-key.pem").is_file());
    if !meshnode::test_gate::optional(
        test,
        given,
        "no ztunnel given (set ZTUNNEL_BIN to a ztunnel built with --features testing and ZTUNNEL_SRC to its source tree)",
    ) {
        return None;
    }
    Some((bin.unwrap(), tls.unwrap()))
}

/// meshnode signing with ztunnel's test CA, so the two trust each other.
fn meshnode_with(ca_src: &Path, dir: &Path) -> System {
    let ca = dir.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    let root = ca_src.join("root-cert.pem");
    for name in ["root-cert.pem", "ca-cert.pem", "cert-chain.pem"] {
        std::fs::copy(&root, ca.join(name)).unwrap();
    }
    std::fs::copy(ca_src.join("ca-key.pem"), ca.join("ca-key.pem")).unwrap();
    System::Meshnode {
        state_dir: dir.join("state"),
        ca_dir: Some(ca),
    }
}

/// ztunnel's local config requires `dryRun` on every policy (meshnode defaults it to false).
///
/// The server side allows the client's principal and denies it on port 9090: 8080 answers only if the
/// identity the server saw is exactly `cluster.local/ns/default/sa/sleep`, and 9090 is refused only then.
const POLICIES: &str = r#"policies:
- name: allow-sleep
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules: [[[{principals: [!Exact "cluster.local/ns/default/sa/sleep"]}]]]
- name: deny-sleep-on-9090
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: false
  rules: [[[{principals: [!Exact "cluster.local/ns/default/sa/sleep"], destinationPorts: [9090]}]]]
"#;

fn client_and_server_talk(client_sys: System, server_sys: System, dir: &Path, n: u8) {
    let (client_ip, server_ip) = (format!("10.{n}.3.1"), format!("10.{n}.3.2"));
    let client = Netns::new("zic");
    let server = Netns::new("zis");
    veth(
        &client,
        &format!("{client_ip}/24"),
        &server,
        &format!("{server_ip}/24"),
    );
    let config = dir.join("local.yaml");
    let yaml = format!(
        "workloads:\n{}{}{POLICIES}",
        workload_yaml("client", "sleep", &[&client_ip]),
        workload_yaml("server", "httpbin", &[&server_ip])
    );
    std::fs::write(&config, yaml).unwrap();
    serve_app(&server, format!("{server_ip}:8080").parse().unwrap());
    serve_app(&server, format!("{server_ip}:9090").parse().unwrap());

    let _c = start_proxy(
        &client_sys,
        &client,
        "default/client/sleep",
        &config,
        dir,
        "client.log",
    );
    let _s = start_proxy(
        &server_sys,
        &server,
        "default/server/httpbin",
        &config,
        dir,
        "server.log",
    );
    wait_ready(&client, dir, "client.log");
    wait_ready(&server, dir, "server.log");
    capture_outbound(&client);

    allowed_then_denied(&client, &server_ip, dir, &["client.log", "server.log"]);
}

/// The server side's policy, seen from the client pod: 8080 answered by the app through the server's own
/// proxy (the app sees the server pod's address, never the client's), 9090 refused. The first call may race
/// the proxies' first certificate, so it is retried for a while; `logs` are quoted on failure.
fn allowed_then_denied(client: &Netns, server_ip: &str, dir: &Path, logs: &[&str]) {
    let logs = || {
        logs.iter()
            .map(|f| {
                format!(
                    "{f}:\n{}",
                    std::fs::read_to_string(dir.join(f)).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let allowed: SocketAddr = format!("{server_ip}:8080").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        match call(client, allowed) {
            Ok(r) if !r.is_empty() => break r,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "8080 never answered: {other:?}\n{}",
                    logs()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(
        reply.starts_with(&format!("app saw {server_ip}:")),
        "{reply:?}\n{}",
        logs()
    );
    assert!(reply.ends_with("say hello\n"), "{reply:?}");
    let denied: SocketAddr = format!("{server_ip}:9090").parse().unwrap();
    if let Ok(r) = call(client, denied) {
        assert!(
            r.is_empty(),
            "9090 was served despite the DENY: {r:?}\n{}",
            logs()
        );
    }
}

#[test]
fn a_ztunnel_client_reaches_a_meshnode_server_under_a_principal_policy() {
    let test = "a_ztunnel_client_reaches_a_meshnode_server_under_a_principal_policy";
    let Some((bin, ca)) = ztunnel(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mn = meshnode_with(&ca, dir.path());
    client_and_server_talk(System::Ztunnel { bin }, mn, dir.path(), subnet());
}

#[test]
fn a_meshnode_client_reaches_a_ztunnel_server_under_a_principal_policy() {
    let test = "a_meshnode_client_reaches_a_ztunnel_server_under_a_principal_policy";
    let Some((bin, ca)) = ztunnel(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mn = meshnode_with(&ca, dir.path());
    client_and_server_talk(mn, System::Ztunnel { bin }, dir.path(), subnet() + 1);
}

/// Both proxies configured from `meshnode control-plane` (in the server pod, on :15012): ztunnel's xDS and
/// CA client against meshnode's delta ADS and CA; the same principal policy, from the mesh file.
fn both_from_the_control_plane(client_sys: System, server_sys: System, dir: &Path, n: u8) {
    let (client_ip, server_ip) = (format!("10.{n}.4.1"), format!("10.{n}.4.2"));
    let client = Netns::new("zxc");
    let server = Netns::new("zxs");
    veth(
        &client,
        &format!("{client_ip}/24"),
        &server,
        &format!("{server_ip}/24"),
    );
    let mesh = dir.join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            r#"namespaces:
  default: {{labels: {{istio.io/dataplane-mode: ambient}}}}
workloads:
- {{name: client, namespace: default, serviceAccount: sleep, ips: [{client_ip}], node: node-client}}
- {{name: server, namespace: default, serviceAccount: httpbin, ips: [{server_ip}], node: node-server}}
{POLICIES}tokens:
- {{token: client-token, nodeProxy: true, node: node-client, namespace: default, serviceAccount: sleep}}
- {{token: server-token, nodeProxy: true, node: node-server, namespace: default, serviceAccount: httpbin}}
"#
        ),
    )
    .unwrap();
    let root = dir.join("root-cert.pem");
    let cp_log = std::fs::File::create(dir.join("cp.log")).unwrap();
    let listen = format!("{server_ip}:15012");
    let _cp = support::netns::KillOnDrop(server.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &[
            "control-plane",
            "--config",
            mesh.to_str().unwrap(),
            "--listen",
            &listen,
            "--root-cert-out",
            root.to_str().unwrap(),
        ],
        &[
            ("MESHNODE_STATE_DIR", dir.join("cp").to_str().unwrap()),
            ("RUST_LOG", "info"),
        ],
        cp_log,
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root.exists() {
        assert!(
            Instant::now() < deadline,
            "control plane never wrote its root"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    serve_app(&server, format!("{server_ip}:8080").parse().unwrap());
    serve_app(&server, format!("{server_ip}:9090").parse().unwrap());

    let address = format!("https://{listen}");
    let from = |token, node| Source::ControlPlane {
        address: &address,
        root: &root,
        token,
        node,
    };
    let _c = start_proxy_from(
        &client_sys,
        &client,
        "default/client/sleep",
        from("client-token", "node-client"),
        dir,
        "client.log",
    );
    let _s = start_proxy_from(
        &server_sys,
        &server,
        "default/server/httpbin",
        from("server-token", "node-server"),
        dir,
        "server.log",
    );
    wait_ready(&client, dir, "client.log");
    wait_ready(&server, dir, "server.log");
    capture_outbound(&client);
    // The client proxy's own xDS and CA connections leave uncaptured.
    iptables(
        &client,
        "iptables",
        &[
            "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "--dport", "15012", "-j", "RETURN",
        ],
    );

    allowed_then_denied(
        &client,
        &server_ip,
        dir,
        &["client.log", "server.log", "cp.log"],
    );
}

#[test]
fn a_ztunnel_configured_by_meshnode_control_plane_reaches_a_meshnode_server() {
    let test = "a_ztunnel_configured_by_meshnode_control_plane_reaches_a_meshnode_server";
    let Some((bin, _)) = ztunnel(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mn = System::Meshnode {
        state_dir: dir.path().join("state"),
        ca_dir: None,
    };
    both_from_the_control_plane(System::Ztunnel { bin }, mn, dir.path(), subnet() + 2);
}

#[test]
fn a_meshnode_client_reaches_a_ztunnel_server_both_configured_by_meshnode_control_plane() {
    let test =
        "a_meshnode_client_reaches_a_ztunnel_server_both_configured_by_meshnode_control_plane";
    let Some((bin, _)) = ztunnel(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mn = System::Meshnode {
        state_dir: dir.path().join("state"),
        ca_dir: None,
    };
    both_from_the_control_plane(mn, System::Ztunnel { bin }, dir.path(), subnet() + 3);
}
