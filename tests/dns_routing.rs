//! Routing to workloads known only by hostname (what istiod sends for a ServiceEntry with
//! `resolution: DNS`): the proxy resolves the host when a connection is routed there, through the name
//! servers of its resolv.conf (`MESHNODE_DNS_RESOLV_CONF`; here a resolver on loopback), caches the answer
//! for its TTL, and connects to an address of the family the client dialled. On loopback, in one process.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use meshnode::identity::BuiltinCa;
use support::*;

/// A resolver at `addr` answering `api.external.test` with `answer` (TTL 60); NXDOMAIN otherwise. Counts
/// the queries it gets.
async fn resolver(addr: SocketAddr, answer: std::net::Ipv4Addr) -> Arc<AtomicUsize> {
    let sock = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            seen.fetch_add(1, Ordering::Relaxed);
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut m = Message::new();
            m.set_id(q.id()).set_message_type(MessageType::Response);
            let question = q.queries()[0].clone();
            if question.name().to_ascii() == "api.external.test." {
                m.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A(answer)),
                ));
            } else {
                m.set_response_code(ResponseCode::NXDomain);
            }
            m.add_query(question);
            let _ = sock.send_to(&m.to_vec().unwrap(), peer).await;
        }
    });
    count
}

#[tokio::test]
async fn a_service_whose_endpoint_is_a_hostname_is_reached_through_dns_and_the_answer_is_cached() {
    let net = loopback_net();
    let std::net::IpAddr::V4(backend_ip) = ip(net, 70) else {
        unreachable!()
    };
    let backend = echo_server(SocketAddr::new(ip(net, 70), 9443)).await;
    let asked = resolver(SocketAddr::new(ip(net, 53), 5353), backend_ip).await;
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "nameserver {}:5353\noptions timeout:2 attempts:1\n",
            ip(net, 53)
        ),
    )
    .unwrap();
    let yaml = format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{c}"]
  protocol: HBONE
- uid: cluster1/networking.istio.io/ServiceEntry/default/external/api.external.test
  name: external
  namespace: default
  hostname: api.external.test
  workloadIps: []
  protocol: TCP
  services:
    "default/api.external.test": {{443: 9443}}
- uid: cluster1/networking.istio.io/ServiceEntry/default/gone/gone.external.test
  name: gone
  namespace: default
  hostname: gone.external.test
  workloadIps: []
  protocol: TCP
  services:
    "default/gone.external.test": {{443: 9443}}
services:
- name: external
  namespace: default
  hostname: api.external.test
  vips: ["/{vip}"]
  ports: {{443: 9443}}
- name: gone
  namespace: default
  hostname: gone.external.test
  vips: ["/{gone}"]
  ports: {{443: 9443}}
"#,
        c = ip(net, 2),
        vip = ip(net, 100),
        gone = ip(net, 101),
    );
    let ca = Arc::new(BuiltinCa::ephemeral(Duration::from_secs(3600)).unwrap());
    let client = start_proxy(
        ca,
        &yaml,
        "default/client/client",
        ip(net, 2),
        &[
            ("MESHNODE_DNS_RESOLV_CONF", resolv.to_str().unwrap()),
            ("PACKET_MARK", ""),
        ],
    )
    .await;
    for i in 0..3 {
        let entry = capture(
            &client.proxy,
            ip(net, 2),
            SocketAddr::new(ip(net, 100), 443),
        )
        .await;
        let answer = roundtrip(entry, format!("hello {i}").as_bytes())
            .await
            .unwrap();
        assert!(answer.ends_with(&format!("hello {i}")), "{answer}");
    }
    assert_eq!(
        asked.load(Ordering::Relaxed),
        1,
        "one query, then the cache (TTL 60 s)"
    );
    assert_eq!(client.proxy.pool().connections(), 0, "plain TCP, no HBONE");
    let _ = backend;

    // A host the resolver does not know: the connection is refused, nothing else is tried.
    let entry = capture(
        &client.proxy,
        ip(net, 2),
        SocketAddr::new(ip(net, 101), 443),
    )
    .await;
    let refused = roundtrip(entry, b"anyone?").await;
    assert!(matches!(refused.as_deref(), Ok("") | Err(_)), "{refused:?}");
}
