//! Tests of the runtime side: shell-script fake plugins record what they were given; one root test runs
//! Debian's real `ptp` + `host-local` plugins between two namespaces it creates.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use super::*;
use crate::netns::Netns;

/// A directory of fake plugins that log their stdin, environment and call order into the same directory.
struct Fakes {
    dir: tempfile::TempDir,
}

impl Fakes {
    fn new() -> Fakes {
        Fakes {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn runtime(&self) -> Runtime {
        Runtime {
            cni_path: vec![
                PathBuf::from("/nonexistent-cni-dir"),
                self.path().to_path_buf(),
            ],
        }
    }

    /// A plugin `name` that records its input and then runs `body` (shell).
    fn plugin(&self, name: &str, body: &str) {
        let log = self.path().display();
        let script = format!(
            "#!/bin/sh\nconf=$(cat)\nprintf '%s' \"$conf\" > '{log}/{name}.'$CNI_COMMAND'.stdin'\n\
             env | grep '^CNI_' | sort > '{log}/{name}.'$CNI_COMMAND'.env'\n\
             echo {name} $CNI_COMMAND >> '{log}/order'\n{body}\n"
        );
        let path = self.path().join(name);
        std::fs::write(&path, script).expect("write plugin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// A plugin that prints `result`, or its prevResult when `result` is None (a pass-through chained one).
    fn ok_plugin(&self, name: &str, result: Option<Value>) {
        let body = match result {
            Some(r) => format!("printf '%s' '{r}'"),
            None => {
                "printf '%s' \"$conf\" | sed -n 's/.*\"prevResult\":\\({.*}\\)}$/\\1/p'".to_string()
            }
        };
        self.plugin(name, &body);
    }

    fn stdin(&self, name: &str, command: &str) -> Value {
        let text = std::fs::read_to_string(self.path().join(format!("{name}.{command}.stdin")))
            .unwrap_or_else(|e| panic!("{name} was not run for {command}: {e}"));
        serde_json::from_str(&text).expect("stdin is JSON")
    }

    fn env(&self, name: &str, command: &str) -> Vec<String> {
        std::fs::read_to_string(self.path().join(format!("{name}.{command}.env")))
            .expect("env log")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn order(&self) -> Vec<String> {
        std::fs::read_to_string(self.path().join("order"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn attachment() -> Attachment {
    Attachment {
        container_id: "ctr-1".into(),
        netns: PathBuf::from("/var/run/netns/pod-1"),
        ifname: "eth0".into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), "web-0".into()),
        ],
    }
}

fn result(ip: &str) -> Value {
    json!({"cniVersion": "1.0.0", "ips": [{"address": ip}], "dns": {}})
}

#[test]
fn add_runs_plugins_in_order_and_threads_each_result_into_the_next() {
    let fakes = Fakes::new();
    fakes.ok_plugin("first", Some(result("10.9.0.5/24")));
    fakes.ok_plugin("second", Some(result("10.9.0.6/24")));
    let conflist = json!({
        "cniVersion": "1.0.0", "name": "testnet",
        "plugins": [
            {"type": "first", "capabilities": {"portMappings": true}, "custom": {"k": 1}},
            {"type": "second"}
        ]
    });
    let out = fakes.runtime().add(&conflist, &attachment()).expect("add");
    assert_eq!(out, result("10.9.0.6/24"));
    assert_eq!(fakes.order(), ["first ADD", "second ADD"]);

    let first = fakes.stdin("first", "ADD");
    assert_eq!(
        first,
        json!({"type": "first", "custom": {"k": 1}, "cniVersion": "1.0.0", "name": "testnet"})
    );
    let second = fakes.stdin("second", "ADD");
    assert_eq!(second["prevResult"], result("10.9.0.5/24"));
    assert_eq!(second["name"], "testnet");

    let env = fakes.env("second", "ADD");
    let cni_path = format!("CNI_PATH=/nonexistent-cni-dir:{}", fakes.path().display());
    assert_eq!(
        env,
        [
            "CNI_ARGS=K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            "CNI_COMMAND=ADD",
            "CNI_CONTAINERID=ctr-1",
            "CNI_IFNAME=eth0",
            "CNI_NETNS=/var/run/netns/pod-1",
            cni_path.as_str(),
        ]
    );
}

#[test]
fn a_failing_plugin_stops_add_and_its_cni_error_comes_back() {
    let fakes = Fakes::new();
    fakes.plugin(
        "busy",
        "printf '%s' '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"agent busy\",\"details\":\"later\"}'; exit 1",
    );
    fakes.ok_plugin("never", Some(result("10.9.0.5/24")));
    let conflist = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "busy"}, {"type": "never"}]});
    match fakes.runtime().add(&conflist, &attachment()) {
        Err(Error::Plugin {
            plugin,
            code,
            msg,
            details,
        }) => {
            assert_eq!(
                (plugin.as_str(), code, msg.as_str(), details.as_str()),
                ("busy", 11, "agent busy", "later")
            );
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
    assert_eq!(fakes.order(), ["busy ADD"]);
}

#[test]
fn a_plugin_failing_without_an_error_object_reports_its_stderr() {
    let fakes = Fakes::new();
    fakes.plugin("crashy", "echo 'panic: nil map' >&2; exit 2");
    let conflist = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "crashy"}]});
    let err = fakes
        .runtime()
        .add(&conflist, &attachment())
        .expect_err("fails");
    assert!(
        matches!(&err, Error::Failed { output, .. } if output == "panic: nil map"),
        "{err:?}"
    );
}

#[test]
fn an_add_result_that_is_not_json_is_bad_output() {
    let fakes = Fakes::new();
    fakes.plugin("chatty", "echo 'hello, log line on stdout'");
    let conflist = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "chatty"}]});
    let err = fakes
        .runtime()
        .add(&conflist, &attachment())
        .expect_err("bad");
    assert!(matches!(err, Error::BadOutput { .. }), "{err:?}");
}

#[test]
fn del_runs_in_reverse_past_failures_and_returns_the_first_error() {
    let fakes = Fakes::new();
    fakes.ok_plugin("a", Some(json!({})));
    fakes.plugin(
        "b",
        "printf '%s' '{\"code\":5,\"msg\":\"b failed\"}'; exit 1",
    );
    fakes.plugin(
        "c",
        "printf '%s' '{\"code\":7,\"msg\":\"c failed\"}'; exit 1",
    );
    let conflist = json!({"cniVersion": "0.4.0", "name": "n",
                          "plugins": [{"type": "a"}, {"type": "b"}, {"type": "c"}]});
    let prev = result("10.9.0.5/24");
    let err = fakes
        .runtime()
        .del(&conflist, &attachment(), Some(&prev))
        .expect_err("two plugins fail");
    assert!(
        matches!(&err, Error::Plugin { plugin, code: 7, .. } if plugin == "c"),
        "{err:?}"
    );
    assert_eq!(fakes.order(), ["c DEL", "b DEL", "a DEL"]);
    for name in ["a", "b", "c"] {
        assert_eq!(fakes.stdin(name, "DEL")["prevResult"], prev);
    }
}

#[test]
fn check_gets_the_add_result_and_respects_disable_check_and_version() {
    let fakes = Fakes::new();
    fakes.ok_plugin("a", None);
    let prev = result("10.9.0.5/24");
    let rt = fakes.runtime();
    let conflist = json!({"cniVersion": "0.4.0", "name": "n", "plugins": [{"type": "a"}]});
    rt.check(&conflist, &attachment(), &prev).expect("check");
    assert_eq!(fakes.stdin("a", "CHECK")["prevResult"], prev);

    let disabled = json!({"cniVersion": "1.0.0", "name": "n", "disableCheck": true, "plugins": [{"type": "missing"}]});
    rt.check(&disabled, &attachment(), &prev).expect("skipped");
    let old = json!({"cniVersion": "0.3.1", "name": "n", "plugins": [{"type": "a"}]});
    assert!(matches!(
        rt.check(&old, &attachment(), &prev),
        Err(Error::Unsupported {
            command: "CHECK",
            ..
        })
    ));
}

#[test]
fn gc_hands_every_plugin_the_valid_attachments() {
    let fakes = Fakes::new();
    fakes.plugin("a", "exit 0");
    fakes.plugin("b", "exit 0");
    let rt = fakes.runtime();
    let conflist =
        json!({"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "a"}, {"type": "b"}]});
    rt.gc(&conflist, &[("ctr-1".into(), "eth0".into())])
        .expect("gc");
    for name in ["a", "b"] {
        assert_eq!(
            fakes.stdin(name, "GC")["cni.dev/valid-attachments"],
            json!([{"containerID": "ctr-1", "ifname": "eth0"}])
        );
    }
    assert!(fakes
        .env("a", "GC")
        .contains(&"CNI_CONTAINERID=".to_string()));
    // Before 1.1.0 GC does not exist: nothing runs.
    let old = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a"}]});
    rt.gc(&old, &[]).expect("no-op");
    assert_eq!(fakes.order(), ["a GC", "b GC"]);
}

#[test]
fn status_reports_the_first_plugin_that_is_not_ready() {
    let fakes = Fakes::new();
    fakes.plugin("ready", "exit 0");
    fakes.plugin(
        "down",
        "printf '%s' '{\"code\":50,\"msg\":\"no agent\"}'; exit 1",
    );
    let rt = fakes.runtime();
    let ok = json!({"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "ready"}]});
    rt.status(&ok).expect("ready");
    let bad = json!({"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "ready"}, {"type": "down"}]});
    assert!(matches!(
        rt.status(&bad),
        Err(Error::Plugin { code: 50, .. })
    ));
}

#[test]
fn missing_plugins_and_bad_conflists_are_refused_before_running_anything() {
    let fakes = Fakes::new();
    let rt = fakes.runtime();
    let att = attachment();
    let missing = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "nope"}]});
    assert!(
        matches!(rt.add(&missing, &att), Err(Error::PluginNotFound { plugin, .. }) if plugin == "nope")
    );
    for bad in [
        json!({"name": "n", "plugins": [{"type": "a"}]}),
        json!({"cniVersion": "1.0.0", "plugins": [{"type": "a"}]}),
        json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}),
        json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../bin/sh"}]}),
    ] {
        assert!(
            matches!(rt.add(&bad, &att), Err(Error::BadConfig { .. })),
            "{bad}"
        );
    }
    let mut bad_id = attachment();
    bad_id.container_id = "-x".into();
    assert!(matches!(
        rt.add(&missing, &bad_id),
        Err(Error::BadAttachment {
            field: "container_id",
            ..
        })
    ));
}

#[test]
fn the_highest_of_cni_version_and_cni_versions_is_used() {
    let fakes = Fakes::new();
    fakes.ok_plugin("a", Some(json!({"cniVersion": "1.1.0"})));
    let conflist = json!({"cniVersion": "0.4.0", "cniVersions": ["1.1.0", "1.0.0"], "name": "n",
                          "plugins": [{"type": "a"}]});
    fakes.runtime().add(&conflist, &attachment()).expect("add");
    assert_eq!(fakes.stdin("a", "ADD")["cniVersion"], "1.1.0");
}

/// A namespace made with `ip netns add`, deleted on drop (also when the test panics).
struct NamedNetns(String);

impl NamedNetns {
    fn add(name: String) -> NamedNetns {
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        NamedNetns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }

    fn has_link(&self, ifname: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.0, "link", "show", ifname])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn ptp_with_host_local_attaches_and_detaches_a_pod_from_a_node_namespace() {
    let test = "ptp_with_host_local_attaches_and_detaches_a_pod_from_a_node_namespace";
    if !crate::test_gate::needs_root(test)
        || !crate::test_gate::needs(
            test,
            Path::new("/usr/lib/cni/ptp").exists() && Path::new("/usr/lib/cni/host-local").exists(),
            "needs /usr/lib/cni/ptp and host-local (Debian's containernetworking-plugins)",
        )
    {
        return;
    }
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let node = NamedNetns::add(format!("mn-exec-node-{pid}-{n}"));
    let pod = NamedNetns::add(format!("mn-exec-pod-{pid}-{n}"));
    let data = tempfile::tempdir().expect("temp dir");
    let subnet = format!("10.{}.{}.0/24", 200 + pid % 50, (pid / 50 + n) % 256);
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": format!("mn-exec-{pid}-{n}"),
        "plugins": [{
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1400,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": data.path()}
        }]
    });
    let att = Attachment {
        container_id: format!("ctr{pid}x{n}"),
        netns: pod.path(),
        ifname: "eth0".into(),
        // As containerd does: without IgnoreUnknown, Go plugins refuse the K8S_* keys they do not know.
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAME".into(), "web-0".into()),
        ],
    };
    let rt = Runtime {
        cni_path: vec![PathBuf::from("/usr/lib/cni")],
    };
    let node_ns = Arc::new(Netns::open(&node.path()).expect("open node netns"));

    let (rt2, conflist2, att2) = (rt.clone(), conflist.clone(), att.clone());
    let result = node_ns
        .run_on_thread(move || rt2.add(&conflist2, &att2))
        .expect("thread in node netns")
        .expect("ptp ADD");
    let address = result["ips"][0]["address"]
        .as_str()
        .expect("an IP")
        .to_string();
    let prefix = subnet.trim_end_matches("0/24");
    assert!(address.starts_with(prefix), "{address} in {subnet}");
    assert!(pod.has_link("eth0"), "eth0 exists in the pod netns");
    // The host side of the veth landed in the node namespace, not in the test's own.
    let node_links = Command::new("ip")
        .args(["-n", &node.0, "-o", "link", "show", "type", "veth"])
        .output()
        .expect("ip link");
    assert!(!node_links.stdout.is_empty(), "a veth in the node netns");

    let (rt2, conflist2, att2, prev) = (rt.clone(), conflist.clone(), att.clone(), result.clone());
    node_ns
        .run_on_thread(move || rt2.del(&conflist2, &att2, Some(&prev)))
        .expect("thread in node netns")
        .expect("ptp DEL");
    assert!(!pod.has_link("eth0"), "eth0 is gone after DEL");
    // DEL is idempotent.
    node_ns
        .run_on_thread(move || rt.del(&conflist, &att, Some(&result)))
        .expect("thread in node netns")
        .expect("second DEL");
}
