//! Two pods in their own network namespaces, joined by a veth, each with a meshnode proxy in dedicated mode
//! started exactly as ztunnel would be (environment variables only). The client pod's outbound TCP is
//! redirected to :15001; a request crosses both proxies over HBONE and is answered. Needs root.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::netns::{veth, KillOnDrop, Netns};

fn wait_ready(ns: &Netns, addr: &'static str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = ns.run(move || {
            let Ok(mut s) = TcpStream::connect(addr) else {
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
        assert!(
            Instant::now() < deadline,
            "proxy in {} never became ready",
            ns.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn request_between_two_pods_crosses_both_proxies_over_hbone() {
    if !support::root_or_skip("request_between_two_pods_crosses_both_proxies_over_hbone") {
        return;
    }
    let subnet = 100 + (std::process::id() % 100) as u8;
    let (client_ip, server_ip) = (format!("10.{subnet}.0.1"), format!("10.{subnet}.0.2"));
    let client = Netns::new("cli");
    let server = Netns::new("srv");
    veth(
        &client,
        &format!("{client_ip}/24"),
        &server,
        &format!("{server_ip}/24"),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local.yaml");
    std::fs::write(
        &config,
        format!(
            r#"workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{client_ip}"]
  protocol: HBONE
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: httpbin
  workloadIps: ["{server_ip}"]
  protocol: HBONE
"#
        ),
    )
    .unwrap();

    // The application in the server pod: tells who connected, echoes a line.
    let server_addr: SocketAddr = format!("{server_ip}:8080").parse().unwrap();
    let app = server.run(move || TcpListener::bind(server_addr).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = s.peer_addr().unwrap();
                let mut line = String::new();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let _ = r.read_line(&mut line);
                let _ = (&s).write_all(format!("app saw {peer} say {line}").as_bytes());
            });
        }
    });

    let bin = env!("CARGO_BIN_EXE_meshnode");
    let state_dir = dir.path().join("state");
    let start = |ns: &Netns, workload: &str, log: &str| {
        let log_file = std::fs::File::create(dir.path().join(log)).unwrap();
        KillOnDrop(ns.spawn(
            bin,
            &["proxy"],
            &[
                ("PROXY_MODE", "dedicated"),
                ("PROXY_WORKLOAD_INFO", workload),
                ("LOCAL_XDS_PATH", config.to_str().unwrap()),
                ("XDS_ADDRESS", ""),
                ("MESHNODE_STATE_DIR", state_dir.to_str().unwrap()),
                ("RUST_LOG", "info"),
            ],
            log_file,
        ))
    };
    let _client_proxy = start(&client, "default/client/sleep", "client.log");
    let _server_proxy = start(&server, "default/server/httpbin", "server.log");
    wait_ready(&client, "127.0.0.1:15021");
    wait_ready(&server, "127.0.0.1:15021");

    // Capture the client pod's outbound TCP, except the proxy's own (marked) traffic.
    let out = client.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-d",
            "127.0.0.0/8",
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
    );
    assert!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let reply = client.run(move || {
        let mut s = TcpStream::connect(server_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hello\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    });
    // The app was reached by the server pod's proxy (its own address), not by the client directly.
    assert!(
        reply.starts_with(&format!("app saw {server_ip}:")),
        "reply: {reply:?}"
    );
    assert!(reply.ends_with("say hello\n"), "reply: {reply:?}");

    // And the server proxy saw it arrive over HBONE from the client's identity.
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("spiffe://cluster.local/ns/default/sa/sleep")
            && log.contains("connection complete"),
        "server proxy log:\n{log}"
    );
}
