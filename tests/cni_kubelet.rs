//! The CNI agent in Kubernetes mode on a node where kubelet cannot be found: without kubelet's uid there is
//! no probe SNAT rule, kubelet's probes of enrolled pods would reach the proxy and (under STRICT mTLS) be
//! refused, and pods would never become ready with nothing to say why. The agent retries, stays NOT
//! READY on istio-cni's health port (:8000 `/readyz`) naming the reason, and becomes ready once kubelet
//! runs. Its own test binary: the other Kubernetes tests start a stand-in kubelet, which this test's agent
//! must not see. Needs root, `ip` and `nft`.

mod support;

use support::cluster::Node;
use support::fake_kube::{FakeKube, FakeKubelet};

const AMBIENT: &[(&str, &str)] = &[("istio.io/dataplane-mode", "ambient")];

#[test]
fn an_agent_that_cannot_find_kubelet_stays_not_ready_saying_why_until_kubelet_runs() {
    if !support::root_or_skip(
        "an_agent_that_cannot_find_kubelet_stays_not_ready_saying_why_until_kubelet_runs",
    ) {
        return;
    }
    let mut node = Node::bare("workloads: []\n");
    let api = FakeKube::start(&node.ns);
    api.put_namespace("default", AMBIENT);
    let kubeconfig = node.path("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    node.agent_env = vec![
        ("KUBECONFIG".into(), kubeconfig.to_str().unwrap().into()),
        ("NODE_NAME".into(), "kube-node-1".into()),
    ];
    node.start_agent();

    let answer = |node: &Node| node.ns.http_answer(8000, "/readyz").unwrap_or_default();
    // It keeps trying (every 2 s at first) and says what it waits for.
    node.wait_for(
        || answer(&node).contains("after 2 attempts"),
        "the agent's readiness to name the missing kubelet after two tries",
    );
    let not_ready = answer(&node);
    assert!(not_ready.starts_with("HTTP/1.1 500"), "{not_ready}");
    assert!(
        not_ready.contains(
            "kubelet probe SNAT (kubelet probe SNAT not installed after 2 attempts: no kubelet process \
             (kubelet, kubelite, k3s) found under /proc)"
        ),
        "{not_ready}"
    );
    assert!(
        node.ns.run(|| meshnode::redirect::inspect_host()
            .expect("inspect")
            .is_empty()),
        "a probe rule without kubelet's uid"
    );
    // Liveness is unaffected: the agent runs and serves.
    assert!(node.http_ok(8000, "/healthz"));

    // kubelet comes up (a late start on boot): the next try installs the rule and the agent is ready.
    let _kubelet = FakeKubelet::start();
    node.wait_for(
        || node.http_ok(8000, "/readyz"),
        "the agent to become ready once kubelet runs",
    );
    let host = node
        .ns
        .run(|| meshnode::redirect::inspect_host().expect("inspect"));
    assert!(host.table.is_some(), "{host:?}");
    assert!(
        node.logs()
            .contains("kubelet probe SNAT installed in the node netns"),
        "{}",
        node.logs()
    );
}
