//! A pair of meshnode proxies on this machine, carrying traffic over HBONE: the main job until
//! `meshnode sandbox` exists. No root, no Kubernetes, no istiod.
//!
//! Two workloads, `default/client` and `default/server`, each with its own proxy in dedicated mode and its
//! own certificate from meshnode's built-in CA (root kept in a temporary state directory). The server
//! workload runs a small echo application behind the service `echo.default.svc.cluster.local`
//! (VIP 127.77.0.100:80). Connections to the entry port stand for the client pod's captured outbound
//! traffic to that VIP: the client proxy load-balances to the server workload, opens an mTLS + HTTP/2
//! CONNECT tunnel to the server proxy on 127.77.0.3:15008, which checks the client's SPIFFE identity and
//! connects to the application.
//!
//! Run: `cargo run --release --example proxy_pair` — it sends a few requests, prints what happened, then
//! keeps running so you can try it yourself (`nc 127.77.0.2 10080`) until Ctrl-C. `--once` exits after
//! the self-check (non-zero if it failed).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode::config::Config;
use meshnode::identity::{BuiltinCa, CertManager, CertSource};
use meshnode::proxy::{Listeners, Proxy, ProxyInputs};
use meshnode::socket::{self, SocketOpts};
use meshnode::state::{LocalConfig, StateHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const CLIENT_IP: &str = "127.77.0.2";
const SERVER_IP: &str = "127.77.0.3";
const VIP: &str = "127.77.0.100:80";
const ENTRY_PORT: u16 = 10080;

const MESH: &str = r#"
workloads:
- uid: demo//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.77.0.2"]
  protocol: HBONE
- uid: demo//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.77.0.3"]
  protocol: HBONE
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.77.0.100"]
  ports: {80: 8080}
policies:
- name: only-client
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{principals: [!Exact "cluster.local/ns/default/sa/client"]}]]]
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let once = std::env::args().any(|a| a == "--once");
    let state_dir = tempfile::tempdir()?;
    let ca: Arc<dyn CertSource> = Arc::new(BuiltinCa::load_or_create(
        state_dir.path(),
        Duration::from_secs(24 * 3600),
    )?);
    let (_stop, shutdown) = watch::channel(false);

    let client = start(
        "default/client/client",
        CLIENT_IP,
        ca.clone(),
        shutdown.clone(),
    )?;
    let _server = start("default/server/server", SERVER_IP, ca, shutdown)?;
    let app = TcpListener::bind((SERVER_IP, 8080)).await?;
    tokio::spawn(echo(app));

    // The entry: connections here are handed to the client proxy as captured connections to the VIP.
    let entry = TcpListener::bind((CLIENT_IP, ENTRY_PORT)).await?;
    let vip: SocketAddr = VIP.parse()?;
    let p = client.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = entry.accept().await {
            tokio::spawn(p.clone().outbound_to(s, peer, vip));
        }
    });

    println!("meshnode proxy pair");
    println!("  client workload  default/client  proxy for {CLIENT_IP} (identity spiffe://cluster.local/ns/default/sa/client)");
    println!(
        "  server workload  default/server  HBONE on {SERVER_IP}:15008, app on {SERVER_IP}:8080"
    );
    println!("  service          echo.default.svc.cluster.local  VIP {VIP} -> 8080");
    println!("  policy           only principal cluster.local/ns/default/sa/client may reach the server\n");

    let mut ok = true;
    for i in 1..=3 {
        let start = Instant::now();
        let msg = format!("hello #{i}");
        match request(
            SocketAddr::new(CLIENT_IP.parse::<IpAddr>()?, ENTRY_PORT),
            &msg,
        )
        .await
        {
            Ok(reply) if reply.contains(&msg) => {
                println!(
                    "  request {i}: {:>6} µs  answered: {}",
                    start.elapsed().as_micros(),
                    reply.trim().replace('\n', " | ")
                )
            }
            other => {
                ok = false;
                println!("  request {i}: FAILED: {other:?}");
            }
        }
    }
    println!(
        "\n  HBONE connections open in the client proxy's pool: {} (requests share it)",
        client.pool().connections()
    );
    if once {
        std::process::exit(if ok { 0 } else { 1 });
    }
    println!("\nTry it: nc {CLIENT_IP} {ENTRY_PORT}   (Ctrl-C here to stop)");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn start(
    workload: &str,
    bind: &str,
    ca: Arc<dyn CertSource>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Arc<Proxy>> {
    let env: HashMap<&str, &str> = [
        ("PROXY_MODE", "dedicated"),
        ("PROXY_WORKLOAD_INFO", workload),
        ("XDS_ADDRESS", ""),
    ]
    .into_iter()
    .collect();
    let cfg = Arc::new(Config::from_source(&env)?);
    let (_, state) = StateHandle::new(LocalConfig::parse(MESH)?.into_state()?);
    let ip: IpAddr = bind.parse()?;
    let opts = SocketOpts::default();
    let listeners = Listeners {
        outbound: socket::listen(SocketAddr::new(ip, cfg.ports.outbound), opts)?,
        inbound: socket::listen(SocketAddr::new(ip, cfg.ports.inbound), opts)?,
        inbound_plaintext: socket::listen(SocketAddr::new(ip, cfg.ports.inbound_plaintext), opts)?,
    };
    let inputs = ProxyInputs {
        workload: cfg
            .workload_info
            .clone()
            .expect("dedicated mode has a workload"),
        cfg,
        state,
        certs: CertManager::new(ca),
        sock: opts,
        orig_src: false,
        netns: None,
        metrics: Default::default(),
        resolver: None,
        handover: None,
    };
    let proxy = Proxy::new(inputs, shutdown);
    let p = proxy.clone();
    tokio::spawn(async move { p.serve(listeners).await });
    Ok(proxy)
}

async fn echo(app: TcpListener) {
    while let Ok((mut s, peer)) = app.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let line = format!(
                    "server app (seen from {peer}) echoes: {}",
                    String::from_utf8_lossy(&buf[..n])
                );
                if s.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn request(entry: SocketAddr, msg: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(entry).await?;
    s.write_all(format!("{msg}\n").as_bytes()).await?;
    s.shutdown().await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    Ok(out)
}
