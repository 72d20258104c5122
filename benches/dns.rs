//! DNS answer latency through a pod's DNS proxy, against asking the resolver directly.
//!
//! Job: a resolver stand-in on loopback (a thread answering every UDP query at once with one A record:
//! the best case for "the pod's resolver", so the ratios show the proxy's own cost), and one pod's DNS
//! proxy (`meshnode::dns`, the code the proxy runs, on real loopback sockets; its resolv.conf names the
//! stand-in). One client asks, one query at a time, over UDP:
//!
//! | row | path |
//! |---|---|
//! | resolver directly | client → stand-in (the baseline) |
//! | mesh name | client → proxy, answered from the state (`reviews` → its VIP) |
//! | forwarded name | client → proxy → stand-in → proxy → client |
//!
//! The rows are interleaved in rounds so that frequency changes hit all alike. Output (stdout): a Markdown
//! table of p50 and p99 in µs and each row's p50 as a ratio of the baseline's, measured in the same run.
//! Input: `BENCH_DNS_QUERIES` [20000] per row, in 10 rounds. Run: `cargo bench --bench dns`.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshnode::config::{Config, DnsBind, WorkloadInfo};
use meshnode::dns::{PodDns, Resolver, Sockets};
use meshnode::metrics::Metrics;
use meshnode::state::{LocalConfig, StateHandle};

const MESH: &str = r#"
workloads:
- uid: c//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["10.0.0.1"]
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.96.0.10"]
"#;

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// The resolver stand-in: answers each query with one A record.
fn stand_in() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut m = Message::new();
            m.set_id(q.id()).set_message_type(MessageType::Response);
            for x in q.queries() {
                m.add_query(x.clone());
                m.add_answer(Record::from_rdata(
                    x.name().clone(),
                    30,
                    RData::A(A("192.0.2.1".parse().unwrap())),
                ));
            }
            let _ = sock.send_to(&m.to_vec().unwrap(), peer);
        }
    });
    addr
}

/// Asks `to` `n` times, one at a time; returns each round trip.
fn ask(client: &UdpSocket, to: SocketAddr, name: &str, n: usize, out: &mut Vec<Duration>) {
    let mut buf = [0u8; 4096];
    for i in 0..n {
        let q = query(name, i as u16);
        let t = Instant::now();
        client.send_to(&q, to).unwrap();
        loop {
            let (len, _) = client.recv_from(&mut buf).expect("an answer within 5 s");
            if len >= 2 && buf[..2] == q[..2] {
                break;
            }
        }
        out.push(t.elapsed());
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn main() {
    let total: usize = std::env::var("BENCH_DNS_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rounds = 10;
    let per_round = (total / rounds).max(1);

    let upstream = stand_in();
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {upstream}\n")).unwrap();
    let env: HashMap<&str, &str> = [
        ("PROXY_MODE", "dedicated"),
        ("PROXY_WORKLOAD_INFO", "default/client/client"),
        ("XDS_ADDRESS", ""),
        ("CA_CERTS_DIR", "/nonexistent"),
        // No mark: setting one needs CAP_NET_ADMIN, and this bench runs as any user.
        ("PACKET_MARK", ""),
        ("MESHNODE_DNS_RESOLV_CONF", resolv.to_str().unwrap()),
    ]
    .into();
    let cfg = Config::from_source(&env).expect("config");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (proxy_addr, _stop) = rt.block_on(async {
        let state = LocalConfig::parse(MESH).unwrap().into_state().unwrap();
        let (tx, handle) = StateHandle::new(state);
        std::mem::forget(tx);
        let resolver = Resolver::new(&cfg, handle, Arc::new(Metrics::new()));
        let sockets = Sockets::bind(
            DnsBind::Addr("127.0.0.1:0".parse().unwrap()),
            false,
            None,
            false,
        )
        .unwrap();
        let addr = sockets.addrs()[0];
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let pod = PodDns {
            resolver,
            workload: WorkloadInfo {
                namespace: "default".into(),
                name: "client".into(),
                service_account: "client".into(),
            },
            netns: None,
        };
        tokio::spawn(meshnode::dns::serve(pod, sockets, stopped));
        (addr, stop)
    });

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Warm up every path.
    let mut sink = Vec::new();
    ask(&client, upstream, "example.org.", 200, &mut sink);
    ask(&client, proxy_addr, "reviews.", 200, &mut sink);
    ask(&client, proxy_addr, "example.org.", 200, &mut sink);

    let (mut direct, mut mesh, mut fwd) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        ask(&client, upstream, "example.org.", per_round, &mut direct);
        ask(&client, proxy_addr, "reviews.", per_round, &mut mesh);
        ask(&client, proxy_addr, "example.org.", per_round, &mut fwd);
    }
    let base = pct(&mut direct, 0.5);
    println!("| path | p50 (µs) | p99 (µs) | p50 / resolver directly |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("resolver directly", &mut direct),
        ("mesh name (answered by the proxy)", &mut mesh),
        ("forwarded name (proxy → resolver)", &mut fwd),
    ] {
        let p50 = pct(v, 0.5);
        let p99 = pct(v, 0.99);
        println!("| {name} | {p50:.1} | {p99:.1} | {:.2} |", p50 / base);
    }
}
