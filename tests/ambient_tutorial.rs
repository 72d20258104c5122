//! The Istio ambient tutorial this project started from, on one node built from network namespaces: the CNI
//! agent, a node proxy in shared mode and `meshnode control-plane` (istiod's role) in the node namespace;
//! pods created through the real CNI chain. Policies are written as users write them for istiod
//! (PeerAuthentication, AuthorizationPolicy) in the control plane's mesh file.
//!
//! 1. a pod in `test` (outside the mesh) calls productpage in `default` (ambient): answered;
//! 2. PeerAuthentication STRICT in `default`: the same call is reset;
//! 3. `test` joins the mesh (namespace label): the caller is captured live and the call works again, now mTLS;
//! 4. an AuthorizationPolicy on reviews allowing only `cluster.local/ns/default/sa/productpage`: productpage
//!    gets in, the other caller is shut out, including a connection it already had open.
//!
//! Needs root, `ip`, `nft`, containernetworking-plugins.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::cluster::{call, serve_app, Node, Pod};

const NODE_TOKEN: &str = "node-proxy-token";

fn agent_yaml(test_in_mesh: bool) -> String {
    format!(
        "namespaces:\n  default: {{labels: {{istio.io/dataplane-mode: ambient}}}}\n  test: {}\npods:\n- {{name: productpage, namespace: default, serviceAccount: productpage}}\n- {{name: reviews, namespace: default, serviceAccount: reviews}}\n- {{name: sleep, namespace: test, serviceAccount: sleep}}\n",
        if test_in_mesh {
            "{labels: {istio.io/dataplane-mode: ambient}}"
        } else {
            "{}"
        }
    )
}

/// The control plane's mesh file: the three pods (once they have IPs), the namespaces, and Istio resources.
fn mesh_yaml(pods: &[&Pod], test_in_mesh: bool, istio: &str) -> String {
    let mut y = format!(
        "namespaces:\n  default: {{labels: {{istio.io/dataplane-mode: ambient}}}}\n  test: {}\n  istio-system: {{}}\nworkloads:\n",
        if test_in_mesh {
            "{labels: {istio.io/dataplane-mode: ambient}}"
        } else {
            "{}"
        }
    );
    for p in pods {
        y += &format!(
            "- {{name: {n}, namespace: {ns}, serviceAccount: {n}, ips: [{ip}], labels: {{app: {n}}}, node: node1}}\n",
            n = p.name,
            ns = p.namespace,
            ip = p.ip.unwrap()
        );
    }
    if pods.is_empty() {
        y = y.replace("workloads:\n", "workloads: []\n");
    }
    // A node proxy's token is bound to its node: it gets certificates only for pods there.
    y += &format!("tokens:\n- {{token: {NODE_TOKEN}, nodeProxy: true, node: node1}}\n");
    if !istio.is_empty() {
        y += "istio:\n";
        y += istio;
    }
    y
}

const STRICT: &str = "- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: default}
  spec:
    mtls: {mode: STRICT}
";

const REVIEWS_ONLY_PRODUCTPAGE: &str = "- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: reviews-viewer, namespace: default}
  spec:
    selector: {matchLabels: {app: reviews}}
    action: ALLOW
    rules:
    - from:
      - source: {principals: [cluster.local/ns/default/sa/productpage]}
";

fn answered(pod: &Pod, dst: SocketAddr) -> bool {
    call(pod, dst).is_ok_and(|r| r.starts_with("app saw"))
}

fn eventually(node: &Node, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out: {what}\n{}", node.logs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_ambient_tutorial_strict_mtls_joining_the_mesh_and_a_principal_policy() {
    if !support::root_or_skip(
        "the_ambient_tutorial_strict_mtls_joining_the_mesh_and_a_principal_policy",
    ) {
        return;
    }
    let mut node = Node::bare("workloads: []\n");
    std::fs::write(node.path("agent.yaml"), agent_yaml(false)).unwrap();
    let agent_config = node.path("agent.yaml").to_str().unwrap().to_string();
    node.agent_env = vec![("MESHNODE_AGENT_CONFIG".into(), agent_config)];
    node.start_control_plane(&mesh_yaml(&[], false, ""), NODE_TOKEN);
    node.start_agent();
    node.start_proxy();

    let mut productpage = node.pod("default", "productpage");
    let mut reviews = node.pod("default", "reviews");
    let mut sleep = node.pod("test", "sleep");
    for p in [&mut productpage, &mut reviews, &mut sleep] {
        node.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, node.logs()));
    }
    let pods = [&productpage, &reviews, &sleep];
    node.set_mesh(&mesh_yaml(&pods, false, ""));
    serve_app(&productpage, 9080);
    serve_app(&reviews, 9080);
    let to_productpage = SocketAddr::new(productpage.ip.unwrap(), 9080);
    let to_reviews = SocketAddr::new(reviews.ip.unwrap(), 9080);

    // 1. Outside the mesh, calling into it: answered (plaintext, captured on productpage's side).
    eventually(&node, "sleep → productpage answered", || {
        answered(&sleep, to_productpage)
    });

    // 2. STRICT in default: the plaintext call is reset.
    node.set_mesh(&mesh_yaml(&pods, false, STRICT));
    eventually(&node, "sleep → productpage reset under STRICT", || {
        !answered(&sleep, to_productpage)
    });
    let err = call(&sleep, to_productpage);
    assert!(
        err.as_ref().map_or_else(
            |e| e.kind() == std::io::ErrorKind::ConnectionReset,
            |r| r.is_empty()
        ),
        "{err:?}"
    );

    // 3. test joins the mesh: sleep is captured live and its call goes over mTLS.
    std::fs::write(node.path("agent.yaml"), agent_yaml(true)).unwrap();
    node.set_mesh(&mesh_yaml(&pods, true, STRICT));
    eventually(&node, "sleep captured and answered over mTLS", || {
        answered(&sleep, to_productpage)
    });

    // 4. Only productpage's principal may reach reviews.
    assert!(answered(&sleep, to_reviews));
    let open = sleep
        .netns
        .run(move || {
            let s = TcpStream::connect_timeout(&to_reviews, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap();
    node.set_mesh(&mesh_yaml(
        &pods,
        true,
        &format!("{STRICT}{REVIEWS_ONLY_PRODUCTPAGE}"),
    ));
    eventually(&node, "sleep shut out of reviews", || {
        !answered(&sleep, to_reviews)
    });
    assert!(answered(&productpage, to_reviews), "{}", node.logs());
    assert!(answered(&sleep, to_productpage));
    // The connection sleep opened before the policy is closed too.
    let mut open = open;
    let _ = open.write_all(b"hello\n");
    let mut buf = [0u8; 64];
    let got = open.read(&mut buf);
    assert!(
        got.as_ref().map_or(true, |n| *n == 0),
        "the already-open connection still got an answer: {:?}",
        got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    // The denials are counted, with Istio's metric names, on the proxy's stats port.
    let metrics = node.ns.run(|| {
        let mut s = TcpStream::connect("127.0.0.1:15020").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    let denied = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_failed_total{")
                && l.contains("response_flags=\"DENY\"")
                && l.contains("destination_workload=\"reviews\"")
        })
        .unwrap_or_else(|| panic!("no DENY count for reviews in:\n{metrics}"));
    assert!(!denied.ends_with(" 0"), "{denied}");
}
