//! Starting the proxy role the way `meshnode proxy` does (config → state → CA → listeners → readiness), and
//! refusing clearly what it cannot start with.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode::app;
use meshnode::proxy::Listeners;
use meshnode::socket::{self, SocketOpts};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

async fn readiness(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn listeners(bind: std::net::IpAddr) -> Option<Listeners> {
    let l = || socket::listen(SocketAddr::new(bind, 0), SocketOpts::default()).unwrap();
    Some(Listeners {
        outbound: l(),
        inbound: l(),
        inbound_plaintext: l(),
    })
}

#[tokio::test]
async fn readiness_waits_for_the_workload_and_its_certificate() {
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("local.yaml");
    std::fs::write(&file, "workloads: []\n").unwrap();
    let cfg = Arc::new(config(
        "default/web/web",
        &[
            ("LOCAL_XDS_PATH", file.to_str().unwrap()),
            (
                "MESHNODE_STATE_DIR",
                dir.path().join("state").to_str().unwrap(),
            ),
        ],
    ));
    let ready_listener =
        socket::listen(SocketAddr::new(ip(net, 1), 0), SocketOpts::default()).unwrap();
    let ready_addr = ready_listener.local_addr().unwrap();
    let (stop, shutdown) = watch::channel(false);
    let proxy = tokio::spawn(app::run_proxy(
        cfg,
        listeners(ip(net, 1)),
        Some(ready_listener),
        shutdown,
    ));

    let answer = readiness(ready_addr).await;
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    assert!(answer.contains("not ready, pending: proxy"), "{answer}");

    std::fs::write(
        &file,
        format!("workloads:\n- name: web\n  namespace: default\n  serviceAccount: web\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n", ip(net, 1)),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = readiness(ready_addr).await;
        if answer.starts_with("HTTP/1.1 200") {
            assert!(answer.ends_with("ready\n"), "{answer}");
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The built-in CA kept its root in the state directory, for the next start and other processes.
    assert!(dir.path().join("state/ca/root-cert.pem").exists());

    // Other paths and garbage get clean HTTP errors.
    let mut s = tokio::net::TcpStream::connect(ready_addr).await.unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_local_config_and_an_xds_server_at_once_are_refused() {
    let net = loopback_net();
    let cfg = Arc::new(config(
        "default/web/web",
        &[
            ("LOCAL_XDS_PATH", "/etc/local.yaml"),
            ("XDS_ADDRESS", "https://istiod.example:15012"),
        ],
    ));
    let (_stop, shutdown) = watch::channel(false);
    let err = app::run_proxy(cfg, listeners(ip(net, 1)), None, shutdown)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LOCAL_XDS_PATH") && err.contains("XDS_ADDRESS"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_local_config_stops_start_up_naming_the_problem() {
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("local.yaml");
    std::fs::write(
        &file,
        "workloads:\n- name: web\n  namespace: default\n  workloadIps: [\"999.1.1.1\"]\n",
    )
    .unwrap();
    let cfg = Arc::new(config(
        "default/web/web",
        &[
            ("LOCAL_XDS_PATH", file.to_str().unwrap()),
            (
                "MESHNODE_STATE_DIR",
                dir.path().join("state").to_str().unwrap(),
            ),
        ],
    ));
    let (_stop, shutdown) = watch::channel(false);
    let err = app::run_proxy(cfg, listeners(ip(net, 1)), None, shutdown)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid"), "{err}");

    let missing = Arc::new(config(
        "default/web/web",
        &[("LOCAL_XDS_PATH", "/nonexistent/meshnode.yaml")],
    ));
    let (_stop, shutdown) = watch::channel(false);
    let err = app::run_proxy(missing, listeners(ip(net, 1)), None, shutdown)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/meshnode.yaml"), "{err}");
}

#[tokio::test]
async fn an_unusable_plugin_ca_stops_start_up_naming_the_file() {
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca-cert.pem"), "not a certificate").unwrap();
    let cfg = Arc::new(config(
        "default/web/web",
        &[("CA_CERTS_DIR", dir.path().to_str().unwrap())],
    ));
    let (_stop, shutdown) = watch::channel(false);
    let err = app::run_proxy(cfg, listeners(ip(net, 1)), None, shutdown)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ca-"), "{err}");
}

#[test]
fn the_binary_refuses_bad_environment_naming_the_variable() {
    let bin = env!("CARGO_BIN_EXE_meshnode");
    for (env, var) in [
        (vec![("PROXY_MODE", "dedicated")], "PROXY_WORKLOAD_INFO"),
        (
            vec![("PROXY_MODE", "dedicated"), ("PROXY_WORKLOAD_INFO", "a/b")],
            "PROXY_WORKLOAD_INFO",
        ),
        (vec![("PROXY_MODE", "sidecar")], "PROXY_MODE"),
        (
            vec![
                ("PROXY_MODE", "dedicated"),
                ("PROXY_WORKLOAD_INFO", "a/b/c"),
                ("PACKET_MARK", "lots"),
            ],
            "PACKET_MARK",
        ),
    ] {
        // `proxy ztunnel` is how Istio's ztunnel chart starts it; what follows the role is ignored.
        for args in [&["proxy"][..], &["proxy", "ztunnel"][..]] {
            let out = std::process::Command::new(bin)
                .args(args)
                .env_clear()
                .envs(env.iter().copied())
                .output()
                .unwrap();
            assert!(!out.status.success());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(var),
                "stderr for {args:?} {env:?}: {stderr}"
            );
        }
    }
}

#[test]
fn a_cni_agent_that_drops_every_connection_is_retried_with_backoff_not_in_a_loop() {
    if !root_or_skip(
        "a_cni_agent_that_drops_every_connection_is_retried_with_backoff_not_in_a_loop",
    ) {
        return;
    }
    // The proxy in shared mode, in a namespace of its own (its admin ports), against an "agent" whose ZDS
    // socket accepts and at once closes every connection (a crash-looping or refusing agent).
    let ns = support::netns::Netns::new("zdsloop");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ztunnel.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(async { meshnode::zds::packet::bind(&sock) })
        .unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    rt.spawn(async move {
        while let Ok(conn) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
    let state = dir.path().join("state");
    let _proxy = support::netns::KillOnDrop(ns.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &["proxy"],
        &[
            ("PROXY_MODE", "shared"),
            ("INPOD_UDS", sock.to_str().unwrap()),
            ("LOCAL_XDS", "workloads: []\n"),
            ("XDS_ADDRESS", ""),
            ("MESHNODE_STATE_DIR", state.to_str().unwrap()),
        ],
        log,
    ));
    std::thread::sleep(Duration::from_millis(2500));
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // 10 ms doubling: about 8 connections in 2.5 s; without backoff after a session ends, thousands.
    assert!(
        (2..=16).contains(&n),
        "{n} connections in 2.5 s\n{}",
        std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default()
    );
}

#[test]
fn version_names_the_release_and_the_revision_built() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshnode"))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!(
            "meshnode {} (revision ",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    // A checkout's 12 hex digits, or `unknown` outside one.
    let revision = text
        .split("revision ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_default();
    assert!(
        revision == "unknown"
            || (revision.len() == 12 && revision.bytes().all(|b| b.is_ascii_hexdigit())),
        "{text}"
    );
}

#[test]
fn each_roles_help_lists_every_variable_it_reads() {
    use meshnode::logging::LOGGING_VARS;
    let roles: [(&str, Vec<&[meshnode::config::vars::Var]>); 3] = [
        ("proxy", vec![meshnode::config::PROXY_VARS, LOGGING_VARS]),
        (
            "waypoint",
            vec![
                meshnode::config::PROXY_VARS,
                meshnode::config::waypoint::WAYPOINT_VARS,
                LOGGING_VARS,
            ],
        ),
        (
            "cni-agent",
            vec![meshnode::cni_agent::config::CNI_AGENT_VARS, LOGGING_VARS],
        ),
    ];
    for (role, tables) in roles {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshnode"))
            .args([role, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{role}");
        let text = String::from_utf8_lossy(&out.stdout);
        for var in tables.iter().flat_map(|t| t.iter()) {
            assert!(
                text.contains(&format!("\n  {}", var.name)),
                "`meshnode {role} --help` does not list {}:\n{text}",
                var.name
            );
        }
    }
}
