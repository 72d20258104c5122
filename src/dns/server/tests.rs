use std::str::FromStr;

use super::*;
use crate::config::WorkloadInfo;
use crate::dns::names::Names;
use crate::dns::upstream::Upstreams;
use crate::dns::Resolver;
use crate::metrics::Metrics;
use crate::state::local::LocalConfig;
use crate::state::StateHandle;

const MESH: &str = r#"
workloads:
- uid: c//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: sleep
  canonicalName: sleep
  workloadIps: ["10.0.0.1"]
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.96.0.10"]
- name: big
  namespace: default
  hostname: big.default.svc.cluster.local
"#;

/// A headless service with `n` endpoints, appended to MESH.
fn mesh_with_endpoints(n: usize) -> String {
    let mut y = MESH.replace("services:\n", "");
    let (workloads, services) = y.split_at(y.find("- name: reviews").unwrap());
    let mut w = workloads.to_string();
    for i in 0..n {
        w.push_str(&format!(
            "- uid: c//v1/Pod/default/big-{i}\n  name: big-{i}\n  namespace: default\n  workloadIps: [\"10.1.{}.{}\"]\n  services:\n    \"default/big.default.svc.cluster.local\": {{}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    y = format!("{w}services:\n{services}");
    y
}

fn pod_dns(yaml: &str, upstream: &str, workload: &str) -> (PodDns, Arc<Metrics>) {
    let state = LocalConfig::parse(yaml).unwrap().into_state().unwrap();
    let (_tx, handle) = StateHandle::new(state);
    let metrics = Arc::new(Metrics::new());
    let resolver = Arc::new(Resolver {
        names: Names::new("cluster.local", None, true),
        upstreams: Upstreams::parse(upstream),
        state: handle,
        metrics: metrics.clone(),
        mark: None,
        lookups: Default::default(),
    });
    (
        PodDns {
            resolver,
            workload: WorkloadInfo {
                namespace: "default".into(),
                name: workload.into(),
                service_account: "sleep".into(),
            },
            netns: None,
        },
        metrics,
    )
}

fn query(name: &str, ty: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x4242)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(name).unwrap(), ty));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).unwrap()
}

fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// A one-shot upstream on loopback: answers the first UDP query with `reply(query)`.
async fn fake_upstream(reply: impl Fn(&[u8]) -> Vec<u8> + Send + 'static) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        loop {
            let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
            let out = reply(&buf[..n]);
            sock.send_to(&out, peer).await.unwrap();
        }
    });
    addr
}

/// An upstream's answer to `q`: one A record 192.0.2.1 (and TC when `truncated`).
fn upstream_answer(q: &[u8], truncated: bool) -> Vec<u8> {
    let q = parse(q);
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_available(true)
        .set_truncated(truncated);
    for x in q.queries() {
        m.add_query(x.clone());
        m.add_answer(Record::from_rdata(
            x.name().clone(),
            7,
            RData::A(A("192.0.2.1".parse().unwrap())),
        ));
    }
    m.to_vec().unwrap()
}

#[tokio::test]
async fn a_service_name_is_answered_from_the_mesh_authoritatively() {
    let (pod, metrics) = pod_dns(MESH, "", "client");
    let a = parse(
        &pod.answer(&query("reviews.", RecordType::A, false), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(a.id(), 0x4242);
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert!(a.authoritative() && a.recursion_available());
    assert_eq!(addrs(&a), ["10.96.0.10"]);
    assert_eq!(a.answers()[0].ttl(), TTL_SECONDS);
    assert_eq!(a.answers()[0].name().to_string(), "reviews.");
    // No AAAA for a v4-only service: the name exists, so NOERROR with nothing.
    let aaaa = parse(
        &pod.answer(&query("reviews.", RecordType::AAAA, false), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(aaaa.response_code(), ResponseCode::NoError);
    assert!(aaaa.answers().is_empty());
    let text = metrics.encode();
    assert!(
        text.contains(r#"istio_dns_requests_total{request_query_type="a",request_protocol="udp",source_canonical_service="sleep",source_canonical_revision="unknown"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_search_domain_expansion_is_answered_with_a_cname_to_the_real_name() {
    let yaml = MESH.replace(
        "- name: big\n",
        "- name: api\n  namespace: default\n  hostname: api.example.com\n  vips: [\"/240.240.0.9\"]\n- name: big\n",
    );
    let (pod, _) = pod_dns(&yaml, "", "client");
    let q = query(
        "api.example.com.default.svc.cluster.local.",
        RecordType::A,
        true,
    );
    let a = parse(&pod.answer(&q, Transport::Udp).await.unwrap());
    let cname = &a.answers()[0];
    assert_eq!(
        cname.name().to_string(),
        "api.example.com.default.svc.cluster.local."
    );
    assert!(matches!(cname.data(), RData::CNAME(c) if c.0.to_string() == "api.example.com."));
    assert_eq!(a.answers()[1].name().to_string(), "api.example.com.");
    assert_eq!(addrs(&a), ["240.240.0.9"]);
    assert!(a.extensions().is_some(), "EDNS answered with EDNS");
}

#[tokio::test]
async fn names_outside_the_mesh_are_forwarded_and_the_upstream_answer_relayed() {
    let up = fake_upstream(|q| upstream_answer(q, false)).await;
    let (pod, metrics) = pod_dns(
        MESH,
        &format!("nameserver {up}\noptions timeout:2 attempts:1"),
        "client",
    );
    let a = parse(
        &pod.answer(&query("example.org.", RecordType::A, false), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(a.id(), 0x4242, "the client's id, not the one used upstream");
    assert_eq!(addrs(&a), ["192.0.2.1"]);
    assert_eq!(a.answers()[0].ttl(), 7, "the upstream's answer as it was");
    // Other types, even for mesh names, go upstream too.
    let mx = parse(
        &pod.answer(&query("reviews.", RecordType::MX, false), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(mx.queries()[0].query_type(), RecordType::MX);
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"istio_dns_upstream_requests_total{request_query_type="a",request_protocol="udp""#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"istio_dns_upstream_requests_total{request_query_type="mx""#),
        "{text}"
    );
    assert!(
        text.contains("istio_dns_upstream_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn a_truncated_upstream_answer_reaches_the_client_truncated() {
    let up = fake_upstream(|q| upstream_answer(q, true)).await;
    let (pod, _) = pod_dns(
        MESH,
        &format!("nameserver {up}\noptions timeout:2 attempts:1"),
        "client",
    );
    let a = parse(
        &pod.answer(
            &query("big.example.org.", RecordType::A, false),
            Transport::Udp,
        )
        .await
        .unwrap(),
    );
    assert!(a.truncated(), "the client must retry over TCP");
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_and_counts_a_failure() {
    // Bound but never read: queries vanish.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (pod, metrics) = pod_dns(
        MESH,
        &format!(
            "nameserver {}\noptions timeout:1 attempts:1",
            silent.local_addr().unwrap()
        ),
        "client",
    );
    let a = parse(
        &pod.answer(&query("example.org.", RecordType::A, false), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(a.response_code(), ResponseCode::ServFail);
    assert!(metrics
        .encode()
        .contains("istio_dns_upstream_failures_total{"));
    // No upstream at all: SERVFAIL at once.
    let (none, _) = pod_dns(MESH, "", "client");
    let a = parse(
        &none
            .answer(&query("example.org.", RecordType::A, false), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(a.response_code(), ResponseCode::ServFail);
}

#[tokio::test]
async fn bad_queries_get_formerr_notimp_or_nothing() {
    let (pod, _) = pod_dns(MESH, "", "client");
    assert_eq!(
        pod.answer(&[1, 2, 3], Transport::Udp).await,
        None,
        "shorter than a header"
    );
    let mut resp = query("reviews.", RecordType::A, false);
    resp[2] |= 0x80;
    assert_eq!(
        pod.answer(&resp, Transport::Udp).await,
        None,
        "a response is never answered"
    );
    let mut junk = query("reviews.", RecordType::A, false);
    junk.truncate(15);
    let a = pod.answer(&junk, Transport::Udp).await.unwrap();
    assert_eq!(a[..2], [0x42, 0x42]);
    assert_eq!(parse(&a).response_code(), ResponseCode::FormErr);
    let mut update = Message::new();
    update.set_id(7).set_op_code(OpCode::Update);
    let a = parse(
        &pod.answer(&update.to_vec().unwrap(), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(a.response_code(), ResponseCode::NotImp);
    let mut two = Message::new();
    two.set_id(8)
        .add_query(Query::query(Name::from_str("a.").unwrap(), RecordType::A))
        .add_query(Query::query(Name::from_str("b.").unwrap(), RecordType::A));
    let a = parse(
        &pod.answer(&two.to_vec().unwrap(), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(a.response_code(), ResponseCode::FormErr);
    assert_eq!(
        pod.answer(&vec![0; MAX_QUERY_BYTES + 1], Transport::Udp)
            .await,
        None
    );
}

#[tokio::test]
async fn a_pod_not_in_the_state_gets_servfail() {
    let (pod, _) = pod_dns(MESH, "", "stranger");
    let a = parse(
        &pod.answer(&query("reviews.", RecordType::A, false), Transport::Udp)
            .await
            .unwrap(),
    );
    assert_eq!(a.response_code(), ResponseCode::ServFail);
}

#[tokio::test]
async fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let (pod, _) = pod_dns(&mesh_with_endpoints(300), "", "client");
    let q = query("big.", RecordType::A, false);
    let udp = pod.answer(&q, Transport::Udp).await.unwrap();
    assert!(udp.len() <= 512);
    let udp = parse(&udp);
    assert!(udp.truncated() && udp.answers().is_empty());
    let tcp = parse(&pod.answer(&q, Transport::Tcp).await.unwrap());
    assert!(!tcp.truncated());
    assert_eq!(tcp.answers().len(), 300);
}

#[tokio::test]
async fn the_listeners_answer_over_udp_and_tcp_and_keep_answering_through_a_flood_of_junk() {
    let (pod, _) = pod_dns(MESH, "", "client");
    let sockets = Sockets::bind(
        DnsBind::Addr("127.0.0.1:0".parse().unwrap()),
        false,
        None,
        false,
    )
    .unwrap();
    let udp_addr = sockets.udp[0].local_addr().unwrap();
    let tcp_addr = sockets.tcp[0].local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(serve(pod, sockets, stopped));

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(udp_addr).await.unwrap();
    for i in 0..2000u32 {
        let junk = i.to_be_bytes().repeat(1 + (i as usize % 300));
        client.send(&junk).await.unwrap();
    }
    // A flood can overflow the socket's buffer, so the query may be dropped: ask again, as resolvers do.
    let mut buf = vec![0; 4096];
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let q = query("reviews.", RecordType::A, false);
            client.send(&q).await.unwrap();
            let waited = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    let n = client.recv(&mut buf).await.unwrap();
                    if let Ok(m) = Message::from_vec(&buf[..n]) {
                        if m.id() == 0x4242 {
                            return m;
                        }
                    }
                }
            })
            .await;
            if let Ok(m) = waited {
                return m;
            }
        }
    })
    .await
    .expect("answered despite the flood");
    assert_eq!(addrs(&answer), ["10.96.0.10"]);

    let mut tcp = TcpStream::connect(tcp_addr).await.unwrap();
    for _ in 0..2 {
        let q = query("reviews.default.svc.cluster.local.", RecordType::A, false);
        tcp.write_all(&(q.len() as u16).to_be_bytes())
            .await
            .unwrap();
        tcp.write_all(&q).await.unwrap();
        let n = tcp.read_u16().await.unwrap() as usize;
        let mut a = vec![0; n];
        tcp.read_exact(&mut a).await.unwrap();
        assert_eq!(addrs(&parse(&a)), ["10.96.0.10"]);
    }
    // An oversized TCP query closes that connection only.
    tcp.write_all(&60000u16.to_be_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    let mut again = TcpStream::connect(tcp_addr).await.unwrap();
    let q = query("reviews.", RecordType::A, false);
    again
        .write_all(&(q.len() as u16).to_be_bytes())
        .await
        .unwrap();
    again.write_all(&q).await.unwrap();
    assert!(again.read_u16().await.unwrap() > 12);

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}
