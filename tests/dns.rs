//! The DNS proxy as a pod sees it: a node (agent + shared-mode proxy) whose agent captures DNS by default,
//! a pod created through the real CNI chain, and queries sent from inside the pod to an arbitrary resolver
//! address on port 53. Mesh names come back from the proxy; other names reach the node's resolver (a small
//! server this test runs in the node namespace, on port 53 — so a forwarded query that lost the proxy's
//! mark would be captured again and never arrive) and its answers come back unchanged, over TCP when they
//! are too large for UDP. Needs root, `ip`, `nft` and containernetworking-plugins.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use support::cluster::{nft_ruleset, Node};

const AGENT_YAML: &str = "namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
pods:
- {name: client, namespace: default, serviceAccount: client}
";

/// Any address will do: capture sends every port-53 packet to the pod's DNS proxy.
const RESOLVER: &str = "10.96.0.10:53";

/// The node's resolver: `outside.example` → 192.0.2.7; `big.example` → 100 addresses (truncated over
/// UDP); anything else NXDOMAIN.
fn upstream_answer(query: &[u8], tcp: bool) -> Vec<u8> {
    let q = Message::from_vec(query).unwrap();
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_available(true);
    let question = q.queries()[0].clone();
    let name = question.name().to_string();
    m.add_query(question.clone());
    match name.as_str() {
        "outside.example." => {
            m.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A("192.0.2.7".parse().unwrap())),
            ));
        }
        "big.example." if !tcp => {
            m.set_truncated(true);
        }
        "big.example." => {
            for i in 0..100u8 {
                m.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A(std::net::Ipv4Addr::new(198, 51, 100, i))),
                ));
            }
        }
        _ => {
            m.set_response_code(ResponseCode::NXDomain);
        }
    }
    m.to_vec().unwrap()
}

/// Runs the node's resolver on port 53 (UDP and TCP) in the node namespace.
fn start_upstream(node: &Node) {
    let (udp, tcp) = node.ns.run(|| {
        (
            UdpSocket::bind("0.0.0.0:53").unwrap(),
            TcpListener::bind("0.0.0.0:53").unwrap(),
        )
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&upstream_answer(&buf[..n], false), peer);
        }
    });
    std::thread::spawn(move || {
        for mut s in tcp.incoming().flatten() {
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let mut q = vec![0; u16::from_be_bytes(len) as usize];
            if s.read_exact(&mut q).is_err() {
                continue;
            }
            let a = upstream_answer(&q, true);
            let _ = s.write_all(&(a.len() as u16).to_be_bytes());
            let _ = s.write_all(&a);
        }
    });
}

fn query(name: &str, ty: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(rand_id())
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(name).unwrap(), ty));
    m.to_vec().unwrap()
}

fn rand_id() -> u16 {
    (std::process::id() as u16).wrapping_mul(31) ^ 0x5a5a
}

/// Asks over UDP from inside `pod`, as a resolver library would.
fn ask_udp(pod: &support::cluster::Pod, name: &str, ty: RecordType) -> std::io::Result<Message> {
    let q = query(name, ty);
    pod.netns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.send_to(&q, RESOLVER)?;
        let mut buf = [0u8; 4096];
        let (n, _) = s.recv_from(&mut buf)?;
        Message::from_vec(&buf[..n]).map_err(std::io::Error::other)
    })
}

/// Asks over TCP from inside `pod`.
fn ask_tcp(pod: &support::cluster::Pod, name: &str, ty: RecordType) -> std::io::Result<Message> {
    let q = query(name, ty);
    pod.netns.run(move || {
        let addr: SocketAddr = RESOLVER.parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(&(q.len() as u16).to_be_bytes())?;
        s.write_all(&q)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut a = vec![0; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut a)?;
        Message::from_vec(&a).map_err(std::io::Error::other)
    })
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_captured_pod_resolves_mesh_names_from_the_proxy_and_the_rest_through_the_nodes_resolver() {
    if !support::root_or_skip(
        "a_captured_pod_resolves_mesh_names_from_the_proxy_and_the_rest_through_the_nodes_resolver",
    ) {
        return;
    }
    let mut node = Node::bare("workloads: []\n");
    std::fs::write(node.path("agent.yaml"), AGENT_YAML).unwrap();
    node.agent_env = vec![(
        "MESHNODE_AGENT_CONFIG".into(),
        node.path("agent.yaml").to_str().unwrap().into(),
    )];
    node.start_agent();
    node.start_proxy();
    let mut client = node.pod("default", "client");
    node.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", node.logs()));
    // DNS capture is on by default, as in Istio.
    let nft = nft_ruleset(&client);
    assert!(nft.contains("redirect to :15053"), "{nft}");

    // The node's resolver, which the proxy reads from its resolv.conf: the pod's gateway (the node side of
    // its veth), port 53.
    start_upstream(&node);
    let gateway = client.result.as_ref().unwrap()["ips"][0]["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(
        node.path("resolv.conf"),
        format!("nameserver {gateway}\noptions timeout:2\n"),
    )
    .unwrap();
    node.proxy_env = vec![(
        "MESHNODE_DNS_RESOLV_CONF".into(),
        node.path("resolv.conf").to_str().unwrap().into(),
    )];
    node.set_local_config(&format!(
        "workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  canonicalName: client
  workloadIps: [\"{ip}\"]
  protocol: HBONE
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: [\"/10.96.5.5\"]
- name: egress
  namespace: default
  hostname: \"*.corp.example\"
  vips: [\"/240.240.0.3\"]
",
        ip = client.ip.unwrap()
    ));
    node.start_proxy();
    node.wait_for(
        || ask_udp(&client, "reviews.", RecordType::A).is_ok_and(|m| !m.answers().is_empty()),
        "the pod's DNS proxy answering",
    );

    // Mesh names: short, namespaced and full, over UDP and TCP, and a ServiceEntry-style wildcard.
    for name in [
        "reviews.",
        "reviews.default.",
        "reviews.default.svc.cluster.local.",
    ] {
        let a = ask_udp(&client, name, RecordType::A).unwrap();
        assert_eq!(
            addrs(&a),
            ["10.96.5.5".parse::<IpAddr>().unwrap()],
            "{name}"
        );
        assert!(a.authoritative(), "{name}");
    }
    let a = ask_tcp(&client, "reviews.default.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(addrs(&a), ["10.96.5.5".parse::<IpAddr>().unwrap()]);
    let a = ask_udp(&client, "git.corp.example.", RecordType::A).unwrap();
    assert_eq!(addrs(&a), ["240.240.0.3".parse::<IpAddr>().unwrap()]);
    // A v4-only service has no AAAA: the name exists, so NOERROR and nothing.
    let a = ask_udp(&client, "reviews.", RecordType::AAAA).unwrap();
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert!(a.answers().is_empty());

    // Other names go to the node's resolver from inside the pod (marked, so not captured again).
    let a = ask_udp(&client, "outside.example.", RecordType::A)
        .unwrap_or_else(|e| panic!("forwarded: {e}\n{}", node.logs()));
    assert_eq!(
        addrs(&a),
        ["192.0.2.7".parse::<IpAddr>().unwrap()],
        "{}",
        node.logs()
    );
    let a = ask_udp(&client, "missing.example.", RecordType::A).unwrap();
    assert_eq!(a.response_code(), ResponseCode::NXDomain);
    // Too large for UDP: truncated, then whole over TCP.
    let a = ask_udp(&client, "big.example.", RecordType::A).unwrap();
    assert!(a.truncated());
    let a = ask_tcp(&client, "big.example.", RecordType::A).unwrap();
    assert_eq!(a.answers().len(), 100);

    let metrics = node.http_get(15020, "/metrics").unwrap_or_default();
    assert!(
        metrics.contains(r#"istio_dns_requests_total{request_query_type="a",request_protocol="udp",source_canonical_service="client""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"istio_dns_upstream_requests_total{request_query_type="a",request_protocol="tcp""#
        ),
        "{metrics}"
    );
}
