//! Agent loop tests that drive [`Agent`] in-process: plugin jobs in, a scripted proxy on the ZDS socket,
//! pods in network namespaces the test creates (root needed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::*;
use crate::cni_agent::cluster::NamespaceInfo;
use crate::cni_agent::config::{
    CNI_AGENT_RUN_DIR, MESHNODE_AGENT_CONFIG, MESHNODE_RULE_CHECK_INTERVAL, ZTUNNEL_UDS_ADDRESS,
};
use crate::zds::{Request, ZdsClient};

/// A failure guard for waits that normally end in milliseconds, never a bound on how long things take.
const GUARD: Duration = Duration::from_secs(30);

async fn guarded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {GUARD:?}"))
}

/// A named network namespace for one pod, deleted on drop (also when the test fails).
struct PodNetns {
    name: String,
    path: PathBuf,
}

impl PodNetns {
    fn new(tag: &str) -> PodNetns {
        let name = format!("mnbusy{}{tag}", std::process::id());
        let path = crate::netsetup::create_named_netns(&name).expect("creating a pod netns");
        PodNetns { name, path }
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = crate::netsetup::delete_named_netns(&self.name);
    }
}

/// An agent's configuration with its run directory and ZDS socket under `dir`, its enrollment file `file`,
/// and no periodic rule check.
fn agent_config(dir: &Path, file: &Path) -> Arc<AgentConfig> {
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let zds_path = dir.join("zds.sock");
    let env: HashMap<&str, &str> = [
        (CNI_AGENT_RUN_DIR, run_dir.to_str().unwrap()),
        (ZTUNNEL_UDS_ADDRESS, zds_path.to_str().unwrap()),
        (MESHNODE_AGENT_CONFIG, file.to_str().unwrap()),
        (MESHNODE_RULE_CHECK_INTERVAL, "0"),
    ]
    .into();
    Arc::new(AgentConfig::from_source(&env).unwrap())
}

/// A cluster view with only the `default` namespace, in ambient mode.
fn ambient_default() -> ClusterView {
    ClusterView {
        namespaces: [(
            "default".to_string(),
            NamespaceInfo {
                labels: [("istio.io/dataplane-mode".to_string(), "ambient".to_string())].into(),
            },
        )]
        .into(),
        synced: true,
        ..ClusterView::default()
    }
}

fn add_event(pod: &str, netns: &PodNetns) -> PluginRequest {
    PluginRequest::Add(PluginEvent {
        netns: netns.path.to_string_lossy().into_owned(),
        pod_name: pod.into(),
        pod_namespace: "default".into(),
        pod_uid: format!("uid-{pod}"),
        container_id: format!("sandbox-{pod}"),
        ifname: "eth0".into(),
        ips: Vec::new(),
    })
}

fn check_event(pod: &str) -> PluginRequest {
    PluginRequest::Check(PluginEvent {
        pod_name: pod.into(),
        pod_namespace: "default".into(),
        ..PluginEvent::default()
    })
}

/// Sends one plugin request to the agent loop; the answer arrives on the returned channel.
async fn ask(
    jobs: &mpsc::Sender<plugin_server::Job>,
    req: PluginRequest,
) -> oneshot::Receiver<Answer> {
    let (tx, rx) = oneshot::channel();
    jobs.send((req, tx)).await.expect("the agent loop runs");
    rx
}

/// The next request the proxy gets, which it does not ack yet.
async fn next_add(proxy: &mut ZdsClient) -> String {
    match guarded("a hand-over to the proxy", proxy.recv()).await {
        Ok(Request::Add { uid, .. }) => uid,
        other => panic!("expected AddWorkload, got {other:?}"),
    }
}

/// Issue 11: the hand-over queue to the ZDS worker was full (a slow proxy, a burst of ADDs): the ADD is
/// refused with `Busy`, but the pod keeps its rules, is marked and annotated pending, and once the proxy
/// catches up the tick hands it over and it ends up enabled, with no pod lost or handed over twice.
#[tokio::test]
async fn a_full_hand_over_queue_leaves_the_pod_pending_and_it_is_enabled_once_the_proxy_catches_up()
{
    crate::needs_root!(
        "a_full_hand_over_queue_leaves_the_pod_pending_and_it_is_enabled_once_the_proxy_catches_up"
    );
    let dir = tempfile::tempdir().unwrap();
    // The view is given directly below; the file is never read.
    let cfg = agent_config(dir.path(), Path::new("/nonexistent/agent.yaml"));
    let zds_path = dir.path().join("zds.sock");
    let (_view_tx, view_rx) = watch::channel(Arc::new(ambient_default()));
    // One hand-over may wait for the worker: the second one queued while it is busy fills the queue.
    let (mut agent, handles, jobs_rx) = Agent::with_zds_queue(cfg.clone(), view_rx, 1);
    let (annotations_tx, mut annotations) = mpsc::channel(64);
    agent.annotations = Some(annotations_tx);
    let (_stop, stopped) = watch::channel(false);
    let listener = crate::zds::bind(&zds_path).unwrap();
    tokio::spawn({
        let zds = handles.zds.clone();
        let stopped = stopped.clone();
        async move { zds.serve(listener, stopped).await }
    });
    let ready = crate::readiness::Readiness::new();
    // The loop is not `Send` (it runs on the agent's single-threaded runtime): run it beside the scenario.
    let agent_loop = agent.run(jobs_rx, ready.register("agent state"), stopped);
    let scenario = async {
        // The proxy connects and takes the (empty) snapshot; from then on it acks only when the test says.
        let mut proxy = guarded("connecting", ZdsClient::connect(&zds_path))
            .await
            .unwrap();
        assert!(matches!(
            guarded("the snapshot", proxy.recv()).await,
            Ok(Request::SnapshotSent)
        ));
        proxy.ack(None).await.unwrap();
        assert!(handles.zds.wait_connected(GUARD).await);

        let (a, b, c) = (PodNetns::new("a"), PodNetns::new("b"), PodNetns::new("c"));
        let jobs = handles.jobs.clone();
        // a: the worker takes it and waits for the proxy's ack, so its queue is empty again.
        let a_answer = ask(&jobs, add_event("a", &a)).await;
        assert_eq!(next_add(&mut proxy).await, "uid-a");
        // b fills the queue; c finds it full.
        let b_answer = ask(&jobs, add_event("b", &b)).await;
        let c_answer = ask(&jobs, add_event("c", &c)).await;
        let refused = guarded("c's answer", c_answer).await.unwrap();
        assert_eq!(refused.status, 500, "{}", refused.body);
        assert!(
            refused.body.contains("too many pods are waiting"),
            "{}",
            refused.body
        );
        // Refused, not forgotten: c is pending with its rules in place, and annotated so.
        let pending = guarded("c's pending check", ask(&jobs, check_event("c")).await)
            .await
            .unwrap();
        assert!(
            pending.status == 500 && pending.body.contains("waiting for a node proxy"),
            "{pending:?}"
        );
        let c_netns = Arc::new(Netns::open(&c.path).unwrap());
        let installed = c_netns
            .run_on_thread(redirect::inspect)
            .unwrap()
            .expect("c's rules read back");
        assert!(
            installed.matches(&cfg.rules),
            "a refused pod must keep its rules (fail closed)"
        );
        let mut seen = Vec::new();
        while !seen.contains(&(String::from("c"), Some("pending"))) {
            let (pod, value) = guarded("c's annotation", annotations.recv()).await.unwrap();
            seen.push((pod.name, value));
        }

        // The proxy catches up: a, then b from the queue, then c when the tick offers it again.
        proxy.ack(None).await.unwrap();
        assert_eq!(next_add(&mut proxy).await, "uid-b");
        proxy.ack(None).await.unwrap();
        assert_eq!(next_add(&mut proxy).await, "uid-c");
        proxy.ack(None).await.unwrap();
        for (pod, answer) in [("a", a_answer), ("b", b_answer)] {
            let answer = guarded("a waiting ADD's answer", answer).await.unwrap();
            assert_eq!(
                (answer.status, answer.body.contains(r#""enrolled":true"#)),
                (200, true),
                "{pod}: {answer:?}"
            );
        }
        while !seen.contains(&(String::from("c"), Some("enabled"))) {
            let (pod, value) = guarded("c's annotation", annotations.recv()).await.unwrap();
            seen.push((pod.name, value));
        }
        // Every pod enabled, recorded so, its rules read back as installed.
        for pod in ["a", "b", "c"] {
            let answer = guarded("a check", ask(&jobs, check_event(pod)).await)
                .await
                .unwrap();
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (200, r#"{"enrolled":true,"reason":"rules in place"}"#),
                "{pod}"
            );
        }
        let (pods, problem) = Pods::load(cfg.state_file());
        assert!(problem.is_none(), "{problem:?}");
        for pod in ["a", "b", "c"] {
            let state = pods.find("default", pod).map(|r| r.state);
            assert_eq!(state, Some(Enrollment::Enabled), "{pod}");
        }
        // Each pod was handed over exactly once: nothing more is waiting for the proxy.
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), proxy.recv())
                .await
                .is_err(),
            "a pod was handed over twice"
        );
    };
    tokio::select! {
        _ = agent_loop => panic!("the agent loop ended"),
        _ = scenario => {}
    }
}

/// A pod written into the agent's file a moment before its CNI ADD, before the poll has read it (what
/// `sandbox apply` does when it starts a waypoint's pod), is decided with the labels the file gives it:
/// a waypoint's pod (`istio.io/dataplane-mode: none`) in an ambient namespace is not captured. Decided on
/// the stale view, it would be captured as an unknown pod of that namespace.
#[tokio::test]
async fn a_pod_written_to_the_file_just_before_its_add_is_decided_with_its_labels() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(
        &file,
        "namespaces:\n  default: {labels: {istio.io/dataplane-mode: ambient}}\npods:\n- {name: waypoint-0, namespace: default, serviceAccount: waypoint, labels: {istio.io/dataplane-mode: none}}\n",
    )
    .unwrap();
    let cfg = agent_config(dir.path(), &file);
    // The view as the last poll read the file: the namespace, not the new pod yet.
    let (_view_tx, view_rx) = watch::channel(Arc::new(ambient_default()));
    let (agent, handles, jobs_rx) = Agent::new(cfg, view_rx);
    let (_stop, stopped) = watch::channel(false);
    let ready = crate::readiness::Readiness::new();
    let agent_loop = agent.run(jobs_rx, ready.register("agent state"), stopped);
    let scenario = async {
        // A netns path that does not exist: were the pod captured, programming it would fail (never touch
        // a namespace of this machine).
        let add = PluginRequest::Add(PluginEvent {
            netns: "/nonexistent/netns/waypoint-0".into(),
            pod_name: "waypoint-0".into(),
            pod_namespace: "default".into(),
            pod_uid: "uid-waypoint-0".into(),
            container_id: "sandbox-waypoint-0".into(),
            ifname: "eth0".into(),
            ips: Vec::new(),
        });
        let answer = guarded("the ADD's answer", ask(&handles.jobs, add).await)
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(
            answer.body.contains(r#""enrolled":false"#),
            "{}",
            answer.body
        );
    };
    tokio::select! {
        _ = agent_loop => panic!("the agent loop ended"),
        _ = scenario => {}
    }
}

#[test]
fn pod_annotations_are_read_as_istio_cni_reads_them() {
    let settings = |pairs: &[(&str, &str)]| {
        let labels: cluster::Labels = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PodSettings::from_annotations(&labels)
    };
    // Go's strconv.ParseBool forms, each way.
    for yes in ["1", "t", "T", "TRUE", "true", "True"] {
        let s = settings(&[
            (DNS_CAPTURE_ANNOTATION, yes),
            (BYPASS_INBOUND_ANNOTATION, yes),
        ]);
        assert_eq!(
            (s.dns_capture, s.bypass_inbound),
            (Some(true), true),
            "{yes}"
        );
    }
    for no in ["0", "f", "F", "FALSE", "false", "False"] {
        let s = settings(&[
            (DNS_CAPTURE_ANNOTATION, no),
            (BYPASS_INBOUND_ANNOTATION, no),
        ]);
        assert_eq!(
            (s.dns_capture, s.bypass_inbound),
            (Some(false), false),
            "{no}"
        );
    }
    // Anything else is ignored, as if the annotation were absent (istio-cni warns and ignores it).
    for other in ["yes", "on", "tRuE", " true", "", "2"] {
        let s = settings(&[
            (DNS_CAPTURE_ANNOTATION, other),
            (BYPASS_INBOUND_ANNOTATION, other),
        ]);
        assert_eq!(
            (s.dns_capture, s.bypass_inbound),
            (None, false),
            "{other:?}"
        );
    }
    // The virtual interfaces: split on commas, blanks trimmed and dropped, impossible names left out.
    let s = settings(&[(
        REROUTE_VIRTUAL_INTERFACES_ANNOTATION,
        " k6t-eth0, ,tap0,,a-name-far-too-long-for-linux,bad/name,veth* ",
    )]);
    assert_eq!(s.reroute_interfaces, ["k6t-eth0", "tap0", "veth*"]);
    assert!(settings(&[]).reroute_interfaces.is_empty());
}
