//! The CNI agent in Kubernetes mode, end to end: a node namespace running `meshnode cni-agent` (pointed at a
//! fake API server inside the node namespace through `KUBECONFIG` and `NODE_NAME`) and `meshnode proxy`;
//! pods created through the real CNI chain (`ptp`, then `meshnode-cni`) as a container runtime does, their Pod
//! objects in the fake API as the API server would hold them. Covers enrollment from the API, the
//! `ambient.istio.io/redirection` status patch, live capture and release on namespace label changes, a pod
//! that started before the plugin was installed found through /proc, pod deletion through the watch, ADD
//! before the pod object exists, and an agent restarted while the API server is down.
//! Needs root, `ip`, `nft` and containernetworking-plugins (installed by .ci/run).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::cluster::{call, rules, serve_app, settle, workloads, Node, Pod};
use support::fake_kube::{pod_object, FakeKube, FakeKubelet};

/// The node the agent serves; only pods scheduled here are watched.
const NODE_NAME: &str = "kube-node-1";
const REDIRECTION: &str = "ambient.istio.io/redirection";
const AMBIENT: &[(&str, &str)] = &[("istio.io/dataplane-mode", "ambient")];

/// A node whose agent watches a fake API server. The API is dropped last: the agent goes first.
struct KubeNode {
    node: Node,
    api: FakeKube,
}

/// Starts the API with `namespaces` in it, then the agent (Kubernetes mode) and the proxy, and waits for
/// the agent to have synced (it writes the plugin's hint file after its first complete view).
fn start(namespaces: &[(&str, &[(&str, &str)])]) -> KubeNode {
    start_with(namespaces, |_| {})
}

/// [`start`], with `prepare` run on the node before the agent starts.
fn start_with(namespaces: &[(&str, &[(&str, &str)])], prepare: impl FnOnce(&Node)) -> KubeNode {
    let mut node = Node::bare("workloads: []\n");
    prepare(&node);
    let api = FakeKube::start(&node.ns);
    for (name, labels) in namespaces {
        api.put_namespace(name, labels);
    }
    let kubeconfig = node.path("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    node.agent_env = vec![
        ("KUBECONFIG".into(), kubeconfig.to_str().unwrap().into()),
        ("NODE_NAME".into(), NODE_NAME.into()),
    ];
    node.start_agent();
    node.wait_for(
        || hint_file(&node).exists() && api.watches() >= 2,
        "the agent's first sync with the API server",
    );
    node.start_proxy();
    KubeNode { node, api }
}

fn hint_file(node: &Node) -> PathBuf {
    node.path("run/meshnode-enrollment.json")
}

fn state_file(node: &Node) -> String {
    std::fs::read_to_string(node.path("run/meshnode-pods.json")).unwrap_or_default()
}

/// A pod sandbox with a Kubernetes-style UID (a UUID, as kubelet puts into the pod's cgroup path), passed
/// to the plugin in `K8S_POD_UID` as container runtimes do.
fn kube_pod(node: &Node, namespace: &str, name: &str) -> Pod {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let mut pod = node.pod(namespace, name);
    let uid = format!(
        "{:08x}-4b1d-4e57-8a11-{:012x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    for (k, v) in pod.attachment.args.iter_mut() {
        if k == "K8S_POD_UID" {
            *v = uid.clone();
        }
    }
    pod.uid = uid;
    pod
}

impl KubeNode {
    /// The scheduler put `pod` on this node: its object exists, with no IP yet.
    fn schedule(&self, pod: &Pod) {
        self.api.put_pod(pod_object(
            &pod.namespace,
            &pod.name,
            &pod.uid,
            NODE_NAME,
            &pod.name,
        ));
    }

    /// CNI ADD through the whole chain; on success the kubelet reports the pod's IP.
    fn add(&self, pod: &mut Pod) -> Result<(), meshnode::cni_exec::Error> {
        self.node.add(pod)?;
        self.report_ip(pod);
        Ok(())
    }

    fn report_ip(&self, pod: &Pod) {
        let ip = pod.ip.expect("the ADD result has an IP");
        self.api.set_pod_ips(&pod.namespace, &pod.name, &[ip]);
    }

    /// Waits until the API object of `pod` carries `value` as its redirection annotation.
    fn wait_for_annotation(&self, pod: &Pod, value: Option<&str>) {
        self.node.wait_for(
            || {
                self.api
                    .pod_annotation(&pod.namespace, &pod.name, REDIRECTION)
                    .as_deref()
                    == value
            },
            &format!("{REDIRECTION}={value:?} on {}", pod.name),
        );
    }

    fn wait_for_proxy_in(&self, pod: &Pod, listening: bool) {
        let hbone = SocketAddr::new(pod.ip.expect("pod IP"), 15008);
        self.node.wait_for(
            || {
                pod.netns
                    .run(move || std::net::TcpStream::connect(hbone).is_ok())
                    == listening
            },
            &format!(
                "the proxy to {} :15008 in {}",
                if listening {
                    "listen on"
                } else {
                    "stop listening on"
                },
                pod.name
            ),
        );
    }
}

fn captured(pod: &Pod) -> bool {
    rules(pod).matches(&support::cluster::agent_default_rules())
}

#[test]
fn pods_enrolled_from_the_kubernetes_api_are_annotated_and_captured() {
    if !support::root_or_skip("pods_enrolled_from_the_kubernetes_api_are_annotated_and_captured") {
        return;
    }
    let k = start(&[("default", AMBIENT)]);
    let mut client = kube_pod(&k.node, "default", "client");
    let mut server = kube_pod(&k.node, "default", "server");
    for p in [&mut client, &mut server] {
        k.schedule(p);
        k.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, k.node.logs()));
    }
    for p in [&client, &server] {
        assert!(captured(p), "{}: {:?}", p.name, rules(p));
        k.wait_for_annotation(p, Some("enabled"));
        k.wait_for_proxy_in(p, true);
    }
    // The annotation came as istio-cni writes it: a merge patch on the status subresource.
    let patches = k.api.patches();
    let to_client: Vec<_> = patches
        .iter()
        .filter(|p| p.path == "/api/v1/namespaces/default/pods/client/status")
        .collect();
    assert!(!to_client.is_empty(), "{patches:#?}");
    for p in to_client {
        assert_eq!(
            p.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(
            p.body,
            serde_json::json!({"metadata":{"annotations":{REDIRECTION:"enabled"}}})
        );
    }

    // client → (captured) → HBONE with client's identity → server's proxy → app: allowed by the policy.
    k.node.set_local_config(&workloads(&[&client, &server]));
    settle();
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);
    let reply =
        call(&client, dst).unwrap_or_else(|e| panic!("client call: {e}\n{}", k.node.logs()));
    assert!(
        reply.starts_with(&format!("app saw {}", client.ip.unwrap())),
        "{reply}"
    );
}

/// A process in a cgroup named as kubelet names a pod's (`.../kubepods/besteffort/pod<uid>/<container>`) on
/// the cgroup v2 hierarchy, running in the pod's netns. Killed and its cgroups removed on drop.
struct PodProcess {
    child: Child,
    /// Created directories, outermost first.
    dirs: Vec<PathBuf>,
}

impl PodProcess {
    /// `None` (with a note on stderr) when no writable cgroup v2 hierarchy is mounted.
    fn start(pod: &Pod) -> Option<PodProcess> {
        let mount = cgroup2_mount()?;
        let top = mount.join(format!(
            "meshnode-test-{}-{}",
            std::process::id(),
            pod.netns.name
        ));
        let dirs = vec![
            top.clone(),
            top.join("kubepods"),
            top.join("kubepods/besteffort"),
            top.join(format!("kubepods/besteffort/pod{}", pod.uid)),
            top.join(format!("kubepods/besteffort/pod{}/c0ffee", pod.uid)),
        ];
        let log = std::fs::File::create("/dev/null").unwrap();
        let child = pod.netns.spawn("sleep", &["120"], &[], log);
        let mut process = PodProcess {
            child,
            dirs: Vec::new(),
        };
        for d in &dirs {
            if let Err(e) = std::fs::create_dir(d) {
                eprintln!("NOTE: cannot create cgroup {}: {e}", d.display());
                return None;
            }
            process.dirs.push(d.clone());
        }
        // Only once `ip netns exec` has entered the pod's netns and become `sleep` does it join the cgroup,
        // so the agent never sees a process of this pod in another namespace.
        let pid = process.child.id();
        let want = std::fs::metadata(format!("/var/run/netns/{}", pod.netns.name))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok();
        for _ in 0..200 {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .ok();
            if comm.trim() == "sleep" && ns == want {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let procs = dirs.last().unwrap().join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, pid.to_string()) {
            eprintln!("NOTE: cannot move pid {pid} into {}: {e}", procs.display());
            return None;
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(cgroup.contains(&format!("pod{}", pod.uid)), "{cgroup}");
        Some(process)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for d in self.dirs.iter().rev() {
            // An emptied cgroup can stay busy for a moment.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified`).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let found = info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    });
    if found.is_none() {
        eprintln!("NOTE: no cgroup v2 hierarchy mounted");
    }
    found
}

#[test]
fn a_pod_running_before_its_namespace_joined_is_found_in_proc_and_captured() {
    if !support::root_or_skip(
        "a_pod_running_before_its_namespace_joined_is_found_in_proc_and_captured",
    ) {
        return;
    }
    let k = start(&[("default", AMBIENT), ("late", &[])]);
    // `known` went through the whole chain while its namespace was not ambient: the agent recorded it.
    let mut known = kube_pod(&k.node, "late", "known");
    k.schedule(&known);
    k.add(&mut known)
        .unwrap_or_else(|e| panic!("ADD known: {e}\n{}", k.node.logs()));
    assert!(rules(&known).is_empty(), "{:?}", rules(&known));
    // `early` started before meshnode-cni was in the chain (only ptp ran): the agent never heard of it. Its
    // process runs in a cgroup named after its UID, the way kubelet lays pods out.
    let mut early = kube_pod(&k.node, "late", "early");
    k.schedule(&early);
    let mut ptp_only = k.node.conflist.clone();
    ptp_only["plugins"].as_array_mut().unwrap().truncate(1);
    k.node
        .add_with(&mut early, &ptp_only)
        .unwrap_or_else(|e| panic!("ptp-only ADD: {e}"));
    let process = PodProcess::start(&early);
    // Under MESHNODE_TEST_STRICT (CI) a host without a writable cgroup v2 fails here instead.
    meshnode::test_gate::needs(
        "a_pod_running_before_its_namespace_joined_is_found_in_proc_and_captured (its /proc part)",
        process.is_some(),
        "needs a writable cgroup v2 hierarchy",
    );
    k.report_ip(&early);
    std::thread::sleep(Duration::from_millis(300));
    assert!(rules(&early).is_empty(), "{:?}", rules(&early));

    // The namespace joins the mesh: both are captured live.
    k.api.put_namespace("late", AMBIENT);
    let mut joined = vec![&known];
    if process.is_some() {
        joined.push(&early);
    }
    for p in &joined {
        k.node
            .wait_for(|| captured(p), &format!("live capture of {}", p.name));
        k.wait_for_annotation(p, Some("enabled"));
        k.wait_for_proxy_in(p, true);
    }
    if let Some(process) = &process {
        // The agent recorded the netns it found through /proc.
        let state: Value = serde_json::from_str(&state_file(&k.node)).unwrap();
        let text = state.to_string();
        assert!(
            text.contains(&format!("/proc/{}/ns/net", process.pid())),
            "{state:#}"
        );
    }

    // And out again when the label goes: rules gone, annotation removed.
    k.api.put_namespace("late", &[]);
    for p in &joined {
        k.node
            .wait_for(|| rules(p).is_empty(), &format!("release of {}", p.name));
        k.wait_for_annotation(p, None);
        k.wait_for_proxy_in(p, false);
    }
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("{}", k.node.logs());
    }
}

#[test]
fn a_deleted_pod_is_released_and_forgotten() {
    if !support::root_or_skip("a_deleted_pod_is_released_and_forgotten") {
        return;
    }
    let k = start(&[("default", AMBIENT)]);
    let mut client = kube_pod(&k.node, "default", "client");
    k.schedule(&client);
    k.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", k.node.logs()));
    assert!(captured(&client));
    k.wait_for_proxy_in(&client, true);
    assert!(state_file(&k.node).contains(&client.uid));

    // Deleted in the API, no CNI DEL (the runtime may be slow, or the node lost the event).
    k.api.delete_pod("default", "client");
    k.node.wait_for(
        || rules(&client).is_empty(),
        "the deleted pod's rules to go",
    );
    k.wait_for_proxy_in(&client, false);
    k.node.wait_for(
        || !state_file(&k.node).contains(&client.uid),
        "the agent to forget the deleted pod",
    );
}

#[test]
fn an_add_for_a_pod_the_api_has_not_shown_yet_fails_and_the_retry_succeeds() {
    if !support::root_or_skip(
        "an_add_for_a_pod_the_api_has_not_shown_yet_fails_and_the_retry_succeeds",
    ) {
        return;
    }
    let k = start(&[("default", AMBIENT)]);
    let mut client = kube_pod(&k.node, "default", "client");
    // The runtime is faster than the API watch: no Pod object yet. Fail closed, so the runtime retries.
    let err = k
        .node
        .add(&mut client)
        .expect_err("ADD of a pod unknown to the API must fail")
        .to_string();
    assert!(err.contains("not (yet) known"), "{err}\n{}", k.node.logs());
    assert!(rules(&client).is_empty());
    assert!(!state_file(&k.node).contains(&client.uid));
    // What a runtime does after a failed ADD.
    k.node
        .del(&client)
        .unwrap_or_else(|e| panic!("DEL after the failed ADD: {e}"));

    // The pod shows up; the retried ADD goes through and the pod is captured.
    k.schedule(&client);
    k.add(&mut client)
        .unwrap_or_else(|e| panic!("retried ADD: {e}\n{}", k.node.logs()));
    assert!(captured(&client), "{:?}", rules(&client));
    k.wait_for_annotation(&client, Some("enabled"));
    k.wait_for_proxy_in(&client, true);
}

#[test]
fn a_pods_capture_annotation_survives_an_agent_restart_and_edits_apply_live() {
    if !support::root_or_skip(
        "a_pods_capture_annotation_survives_an_agent_restart_and_edits_apply_live",
    ) {
        return;
    }
    let dns = |on: bool| meshnode::redirect::RuleSettings {
        dns_capture: on,
        ..Default::default()
    };
    let set_dns = |k: &KubeNode, value: &str| {
        let value = value.to_string();
        k.api.modify_pod("default", "client", move |pod| {
            pod["metadata"]["annotations"]["ambient.istio.io/dns-capture"] =
                serde_json::Value::String(value);
        });
    };
    let mut k = start(&[("default", AMBIENT)]);
    let mut client = kube_pod(&k.node, "default", "client");
    k.schedule(&client);
    // `T` is one of the forms Go's ParseBool (and so Istio) reads as true.
    set_dns(&k, "T");
    k.add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", k.node.logs()));
    assert!(rules(&client).matches(&dns(true)), "{:?}", rules(&client));
    k.wait_for_annotation(&client, Some("enabled"));

    // Restarted with the API down, the agent cannot read the annotation: it uses what it recorded.
    k.node.agent = None;
    k.api.stop();
    k.node.start_agent();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        rules(&client).matches(&dns(true)),
        "restart re-programmed the pod without its annotation: {:?}\n{}",
        rules(&client),
        k.node.logs()
    );

    // The API is back and the annotation is edited on the running pod: the rules follow.
    k.api.resume();
    set_dns(&k, "false");
    k.node.wait_for(
        || rules(&client).matches(&dns(false)),
        "the edited annotation to re-program the running pod",
    );
    assert!(state_file(&k.node).contains(&client.uid));
}

#[test]
fn the_agent_restarted_with_the_api_down_keeps_pods_captured() {
    if !support::root_or_skip("the_agent_restarted_with_the_api_down_keeps_pods_captured") {
        return;
    }
    let mut k = start(&[("default", AMBIENT)]);
    let mut client = kube_pod(&k.node, "default", "client");
    let mut server = kube_pod(&k.node, "default", "server");
    for p in [&mut client, &mut server] {
        k.schedule(p);
        k.add(p)
            .unwrap_or_else(|e| panic!("ADD {}: {e}\n{}", p.name, k.node.logs()));
    }
    k.wait_for_annotation(&server, Some("enabled"));
    k.node.set_local_config(&workloads(&[&client, &server]));
    settle();
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);
    assert!(call(&client, dst).unwrap().starts_with("app saw"));

    // The agent dies, the API server goes down, and meanwhile the server pod is deleted.
    k.node.agent = None;
    k.api.stop();
    k.api.delete_pod("default", "server");
    k.node.start_agent();
    // With no API to ask, the agent restores what it recorded: rules re-armed, pods handed to the proxy.
    std::thread::sleep(Duration::from_millis(500));
    for p in [&client, &server] {
        assert!(captured(p), "{}: {:?}\n{}", p.name, rules(p), k.node.logs());
    }
    let reply = call(&client, dst)
        .unwrap_or_else(|e| panic!("call with the API down: {e}\n{}", k.node.logs()));
    assert!(
        reply.starts_with(&format!("app saw {}", client.ip.unwrap())),
        "{reply}"
    );

    // The API is back: the agent syncs, learns the server pod is gone and releases it; the client stays.
    k.api.resume();
    k.node.wait_for(
        || rules(&server).is_empty(),
        "release of the pod deleted meanwhile",
    );
    k.node.wait_for(
        || !state_file(&k.node).contains(&server.uid),
        "the agent to forget the pod deleted meanwhile",
    );
    assert!(captured(&client), "{:?}", rules(&client));
    assert!(state_file(&k.node).contains(&client.uid));
    assert!(k.api.serving() && k.api.watches() >= 2);
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("{}", k.node.logs());
    }
}

#[test]
fn a_redirection_annotation_the_api_refused_is_written_once_it_accepts_patches() {
    if !support::root_or_skip(
        "a_redirection_annotation_the_api_refused_is_written_once_it_accepts_patches",
    ) {
        return;
    }
    let k = start(&[("default", AMBIENT)]);
    let mut client = kube_pod(&k.node, "default", "client");
    k.schedule(&client);
    // The API server refuses the status patch (overloaded, restarting): capture itself must not wait for it.
    k.api.refuse_patches(true);
    k.node
        .add(&mut client)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", k.node.logs()));
    assert!(captured(&client));
    k.node.wait_for(
        || k.api.patches().iter().any(|p| p.refused),
        "the refused annotation patch",
    );
    // The API recovers; the kubelet's status update (the pod's IP) is a change the agent sees. The pod is
    // captured, so its object should say so, as istio-cni's informer converges it (reference §1.12).
    k.api.refuse_patches(false);
    k.report_ip(&client);
    k.wait_for_annotation(&client, Some("enabled"));
}

#[test]
fn kubelet_probes_reach_an_enrolled_pod_past_its_policy_and_other_callers_do_not() {
    if !support::root_or_skip(
        "kubelet_probes_reach_an_enrolled_pod_past_its_policy_and_other_callers_do_not",
    ) {
        return;
    }
    let _kubelet = FakeKubelet::start();
    let k = start(&[("default", AMBIENT)]);
    let mut server = kube_pod(&k.node, "default", "server");
    let mut other = kube_pod(&k.node, "test", "other");
    k.schedule(&server);
    k.add(&mut server)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", k.node.logs()));
    k.schedule(&other);
    k.add(&mut other).unwrap();
    k.wait_for_annotation(&server, Some("enabled"));
    // The node's probe set holds the enrolled pod's IP (and only that).
    let host = k
        .node
        .ns
        .run(|| meshnode::redirect::inspect_host().expect("reading the node's probe rule"));
    assert_eq!(host.probe_ips(), vec![server.ip.unwrap()], "{host:?}");

    k.node.set_local_config(&workloads(&[&server]));
    settle();
    serve_app(&server, 8080);
    let dst = SocketAddr::new(server.ip.unwrap(), 8080);
    // The kubelet (a root socket in the node's netns) reaches the app directly, from the probe address,
    // although the server only admits the client's identity.
    let probe = k
        .node
        .ns
        .run(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"probe\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .unwrap_or_else(|e| panic!("probe: {e}\n{}", k.node.logs()));
    assert!(probe.starts_with("app saw 169.254.7.127:"), "{probe}");
    // Another pod's plain TCP is still captured on the server side and refused by the policy.
    let refused = call(&other, dst);
    assert!(
        refused.as_ref().map_or(true, |r| r.is_empty()),
        "a non-mesh caller got through: {refused:?}"
    );
    // When the pod leaves the mesh its IP leaves the probe set.
    k.api.delete_pod(&server.namespace, &server.name);
    k.node.wait_for(
        || {
            k.node
                .ns
                .run(|| meshnode::redirect::inspect_host().map(|h| h.probe_ips().is_empty()))
                .unwrap_or(false)
        },
        "the deleted pod's IP to leave the probe set",
    );
}

/// `ip rule` (IPv4) in the node's namespace.
fn node_ip_rules(node: &Node) -> String {
    String::from_utf8_lossy(&node.ns.ip(&["rule"]).stdout).into_owned()
}

#[test]
fn branch_eni_pods_get_istio_cnis_probe_rules_on_nodes_set_up_for_security_groups_for_pods() {
    if !support::root_or_skip(
        "branch_eni_pods_get_istio_cnis_probe_rules_on_nodes_set_up_for_security_groups_for_pods",
    ) {
        return;
    }
    let _kubelet = FakeKubelet::start();
    // AWS asks nodes running security groups for pods to turn TCP early demux off; that is the agent's cue.
    // (A per-namespace sysctl: written from a thread inside the node's namespace.)
    let mut k = start_with(&[("default", AMBIENT)], |node| {
        node.ns
            .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_early_demux", "0"))
            .expect("net.ipv4.tcp_early_demux=0 in the node's namespace");
    });
    let mut pod = kube_pod(&k.node, "default", "sgp");
    k.schedule(&pod);
    k.add(&mut pod)
        .unwrap_or_else(|e| panic!("ADD: {e}\n{}", k.node.logs()));
    k.wait_for_annotation(&pod, Some("enabled"));
    let ip = pod.ip.unwrap().to_string();
    // A plain veth pod: nothing added.
    assert!(!node_ip_rules(&k.node).contains(&format!("to {ip} lookup")));

    // aws-vpc-cni turns it into a branch-ENI pod: its host route in a table of its own, looked up for
    // traffic from its veth.
    let route = String::from_utf8_lossy(&k.node.ns.ip(&["route", "get", &ip]).stdout).into_owned();
    let veth = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| panic!("no device in {route:?}"))
        .to_owned();
    for args in [
        vec!["route", "add", &ip, "dev", &veth, "table", "101"],
        vec!["rule", "add", "iif", &veth, "lookup", "101", "pref", "10"],
    ] {
        let out = k.node.ns.ip(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    // The agent restarts (an upgrade) and re-syncs its probe entries: the pod gets the two rules.
    k.node.agent = None;
    k.node.start_agent();
    let forward = format!("512:\tfrom all to {ip} lookup 101");
    let back = format!("9:\tfrom all iif {veth} lookup local");
    k.node.wait_for(
        || {
            let rules = node_ip_rules(&k.node);
            rules.contains(&forward) && rules.contains(&back)
        },
        "the branch-ENI probe rules",
    );
    assert!(
        state_file(&k.node).contains("branchEni"),
        "{}",
        state_file(&k.node)
    );

    // The pod leaves: its rules go, aws-vpc-cni's stay.
    k.api.delete_pod(&pod.namespace, &pod.name);
    k.node.wait_for(
        || {
            let rules = node_ip_rules(&k.node);
            !rules.contains(&forward) && !rules.contains(&back)
        },
        "the deleted pod's branch-ENI probe rules to go",
    );
    assert!(node_ip_rules(&k.node).contains(&format!("10:\tfrom all iif {veth} lookup 101")));
}
