//! The proxy's admin port (ztunnel's localhost:15000) as `istioctl ztunnel-config` and an operator use it:
//! the config dump after the local config is loaded, the log level changed live, refusals that change
//! nothing, and `/quitquitquit` stopping the proxy.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode::app::{self, AdminPort};
use meshnode::logging::LogControl;
use meshnode::proxy::Listeners;
use meshnode::socket::{self, SocketOpts};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// One request; the status and the body.
async fn http(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    parse(&out)
}

fn parse(answer: &str) -> (u16, String) {
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn mesh(net: [u8; 2]) -> String {
    format!(
        r#"
workloads:
- uid: Kubernetes//Pod/default/web-1
  name: web
  namespace: default
  serviceAccount: web
  workloadIps: ["{web}"]
  protocol: HBONE
  services:
    default/web.default.svc.cluster.local: {{80: 8080}}
services:
- name: web
  namespace: default
  hostname: web.default.svc.cluster.local
  vips: ["/{vip}"]
  ports: {{80: 8080}}
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{{destinationPorts: [9999]}}]]]
"#,
        web = ip(net, 1),
        vip = ip(net, 100),
    )
}

#[tokio::test]
async fn config_dump_shows_the_mesh_and_certificate_and_quitquitquit_stops_the_proxy() {
    let net = loopback_net();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("local.yaml");
    std::fs::write(&file, mesh(net)).unwrap();
    let cfg = Arc::new(config(
        "default/web/web",
        &[
            ("LOCAL_XDS_PATH", file.to_str().unwrap()),
            (
                "MESHNODE_STATE_DIR",
                dir.path().join("state").to_str().unwrap(),
            ),
            ("CONNECTION_TERMINATION_DEADLINE", "2s"),
        ],
    ));
    let l = || socket::listen(SocketAddr::new(ip(net, 1), 0), SocketOpts::default()).unwrap();
    let listeners = Listeners {
        outbound: l(),
        inbound: l(),
        inbound_plaintext: l(),
    };
    let (ready, admin) = (l(), l());
    let (ready_addr, admin_addr) = (ready.local_addr().unwrap(), admin.local_addr().unwrap());
    let logs = LogControl::detached("info").unwrap();
    // The caller's own shutdown signal is never sent: only /quitquitquit can stop this proxy.
    let (_signal, shutdown) = watch::channel(false);
    let proxy = tokio::spawn(app::run_proxy_with_admin(
        cfg,
        Some(listeners),
        Some(ready),
        None,
        AdminPort {
            listeners: vec![admin],
            logs: logs.clone(),
        },
        shutdown,
    ));

    // Ready once the workload's certificate is issued.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(ready_addr, "GET", "/healthz/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (status, body) = http(admin_addr, "GET", "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let workloads = dump["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 1, "{dump:#}");
    assert_eq!(workloads[0]["uid"], "Kubernetes//Pod/default/web-1");
    assert_eq!(workloads[0]["workloadIps"][0], ip(net, 1).to_string());
    let services = dump["services"].as_array().unwrap();
    assert_eq!(services[0]["hostname"], "web.default.svc.cluster.local");
    assert_eq!(services[0]["vips"][0], format!("/{}", ip(net, 100)));
    assert_eq!(
        services[0]["endpoints"]["Kubernetes//Pod/default/web-1"]["port"]["80"],
        8080
    );
    assert_eq!(dump["policies"][0]["name"], "deny-9999");
    let cert = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/web")
        .unwrap_or_else(|| panic!("no certificate for the workload: {dump:#}"));
    assert_eq!(cert["state"], "Available");
    let leaf = &cert["certChain"][0];
    assert!(
        leaf["expirationTime"].as_str().unwrap().ends_with('Z')
            && !leaf["serialNumber"].as_str().unwrap().is_empty()
            && !leaf["pem"].as_str().unwrap().is_empty(),
        "{cert:#}"
    );
    assert!(
        !cert["rootCerts"].as_array().unwrap().is_empty(),
        "{cert:#}"
    );

    // The level changes, and a later read shows it.
    let (status, body) = http(admin_addr, "POST", "/logging?level=debug").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(admin_addr, "GET", "/logging").await;
    assert_eq!(status, 200);
    assert!(body.contains("debug"), "{body}");
    let before = logs.current();

    // Refusals: 4xx, the filter unchanged, the proxy still running.
    for (method, target, want) in [
        ("POST", "/logging?level=loud", 400),
        ("GET", "/logging?level=trace", 405),
        ("GET", "/quitquitquit", 405),
        ("GET", "/stats", 404),
        ("DELETE", "/config_dump", 405),
    ] {
        let (status, body) = http(admin_addr, method, target).await;
        assert_eq!(status, want, "{method} {target}: {body}");
        assert_eq!(logs.current(), before, "{method} {target}");
    }
    assert_eq!(http(ready_addr, "GET", "/healthz/ready").await.0, 200);
    assert!(!proxy.is_finished());

    // /quitquitquit drains the proxy, answers, and the run returns.
    let (status, body) = http(admin_addr, "POST", "/quitquitquit").await;
    assert_eq!(status, 200, "{body}");
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .expect("the proxy stops after /quitquitquit")
        .unwrap()
        .unwrap();
}

/// The real binary: a debug line appears only after `POST /logging?level=debug`, and `/quitquitquit` makes
/// the process exit.
#[test]
fn the_binary_logs_debug_only_after_the_level_is_raised_profiles_and_exits_on_quitquitquit() {
    if !root_or_skip(
        "the_binary_logs_debug_only_after_the_level_is_raised_profiles_and_exits_on_quitquitquit",
    ) {
        return;
    }
    let ns = support::netns::Netns::new("adm");
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "lo"]);
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let local = "workloads:\n- uid: Kubernetes//Pod/default/web-1\n  name: web\n  namespace: default\n  serviceAccount: web\n  workloadIps: [\"10.77.0.1\"]\n  protocol: HBONE\n";
    let state = dir.path().join("state");
    let mut proxy = support::netns::KillOnDrop(ns.spawn(
        env!("CARGO_BIN_EXE_meshnode"),
        &["proxy"],
        &[
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", "default/web/web"),
            ("LOCAL_XDS", local),
            ("XDS_ADDRESS", ""),
            ("MESHNODE_STATE_DIR", state.to_str().unwrap()),
            ("RUST_LOG", "info"),
            ("IPV6_ENABLED", "false"),
            // jemalloc reads this after the binary's own options: sample every allocation, so the few
            // made below are certainly in the heap profile.
            ("MALLOC_CONF", "lg_prof_sample:0"),
        ],
        log,
    ));
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ns.http_get(15021, "/healthz/ready").is_none() {
        assert!(Instant::now() < deadline, "never ready:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let admin = |method: &'static str, target: &'static str| -> (u16, String) {
        ns.run(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 15000)).unwrap();
            write!(s, "{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            parse(&out)
        })
    };
    // Each admin request is logged at debug before it is answered: at info, nothing.
    let (status, body) = admin("GET", "/logging");
    assert_eq!(
        (status, body.as_str()),
        (200, "current log level is info\n")
    );
    assert!(!read_log().contains("admin request"), "{}", read_log());
    let (status, body) = admin("POST", "/logging?level=loud");
    assert_eq!(status, 400, "{body}");
    assert!(!read_log().contains("admin request"), "{}", read_log());

    let (status, body) = admin("POST", "/logging?level=debug");
    assert_eq!(status, 200, "{body}");
    let (status, _) = admin("GET", "/config_dump");
    assert_eq!(status, 200);
    let log = read_log();
    assert!(
        log.contains("admin request") && log.contains("/config_dump"),
        "{log}"
    );

    // Profiles, as `go tool pprof http://localhost:15000/debug/pprof/{profile,heap}` reads them.
    let admin_bytes = |target: &'static str| -> (u16, Vec<u8>) {
        ns.run(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 15000)).unwrap();
            write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let status = String::from_utf8_lossy(&out[9..12]).parse().unwrap();
            (status, out[at + 4..].to_vec())
        })
    };
    let decode = |body: &[u8]| {
        use prost::Message;
        let p = meshnode::proto::profile::Profile::decode(body).unwrap();
        let name = |i: i64| p.string_table[i as usize].clone();
        let types: Vec<String> = p.sample_type.iter().map(|t| name(t.r#type)).collect();
        let functions: Vec<String> = p.function.iter().map(|f| name(f.name)).collect();
        (types, p.sample.len(), functions)
    };
    let (status, body) = admin("GET", "/debug/pprof/heap");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("activate=true"), "{body}");
    let (status, body) = admin("POST", "/debug/pprof/heap/profiling?activate=true");
    assert_eq!(
        (status, body.as_str()),
        (200, "heap profiling active: true\n")
    );
    // Allocations that stay live: the new log filter.
    let (status, body) = admin("POST", "/logging?level=meshnode=debug,access=info");
    assert_eq!(status, 200, "{body}");
    let (status, heap) = admin_bytes("/debug/pprof/heap");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&heap));
    let (types, samples, functions) = decode(&heap);
    assert_eq!(types, ["inuse_objects", "inuse_space"]);
    assert!(samples > 0, "no live sampled allocation");
    assert!(
        functions.iter().any(|f| f.contains("meshnode")),
        "not symbolized: {functions:?}"
    );
    let (status, cpu) = admin_bytes("/debug/pprof/profile?seconds=1");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&cpu));
    assert_eq!(decode(&cpu).0, ["samples", "cpu"]);

    let (status, body) = admin("POST", "/quitquitquit");
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = proxy.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}\n{}", read_log());
}
