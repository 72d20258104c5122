//! The `meshnode-cni` binary run exactly as a container runtime runs it: `CNI_*` environment, the
//! configuration on stdin, the result or CNI error read from stdout. A fake agent (an HTTP server on a unix
//! socket, on a thread, in a private run dir) records what the plugin sends and answers as told.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const PLUGIN: &str = env!("CARGO_BIN_EXE_meshnode-cni");

/// A private directory, removed on drop (also when a test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "meshnode-cni-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One request the fake agent received.
#[derive(Debug, Clone)]
struct Request {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Reply = Arc<dyn Fn(&Request) -> Option<(u16, String)> + Send + Sync>;

/// The fake agent: serves `<run dir>/pluginevent.sock` until dropped.
struct FakeAgent {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    /// Answers every request with `status` and `body`.
    fn start(run_dir: &Path, status: u16, body: &str) -> FakeAgent {
        let body = body.to_string();
        FakeAgent::start_with(run_dir, Arc::new(move |_| Some((status, body.clone()))))
    }

    /// Answers with `reply`; `None` means: read the request and never answer.
    fn start_with(run_dir: &Path, reply: Reply) -> FakeAgent {
        let socket = run_dir.join("pluginevent.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake agent");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, stopped) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let Some(req) = read_request(&mut conn) else {
                    continue;
                };
                reqs.lock().expect("lock").push(req.clone());
                match reply(&req) {
                    Some((status, body)) => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                             Connection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    None => held.push(conn),
                }
            }
        });
        FakeAgent {
            socket,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn read_request(conn: &mut UnixStream) -> Option<Request> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    assert_eq!(parts.next(), Some("POST"), "request line {line:?}");
    let path = parts.next()?.to_string();
    assert_eq!(parts.next(), Some("HTTP/1.1"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        path,
        headers,
        body: serde_json::from_slice(&body).expect("the plugin sends JSON"),
    })
}

/// A test's world: a run dir (for the agent socket and hint file) and a stand-in netns path.
struct World {
    dir: TempDir,
}

impl World {
    fn new() -> World {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("netns"), b"").expect("netns stand-in");
        World { dir }
    }

    fn run_dir(&self) -> &Path {
        &self.dir.0
    }

    fn netns(&self) -> String {
        self.dir.0.join("netns").display().to_string()
    }

    /// Writes the agent's hint as it does: the namespaces no selector reaches, valid for a minute.
    fn hint(&self, pass_through: &[&str]) {
        self.hint_valid_for(pass_through, 60);
    }

    fn hint_valid_for(&self, pass_through: &[&str], seconds: i64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let text = json!({
            "version": 2,
            "validUntil": now + seconds,
            "excludedNamespaces": ["kube-system"],
            "passThroughNamespaces": pass_through,
            "ambientNamespaces": [],
        })
        .to_string();
        std::fs::write(self.dir.0.join("meshnode-enrollment.json"), text).expect("hint file");
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "meshnode-cni",
            "cni_agent_run_dir": self.run_dir(),
            "exclude_namespaces": ["kube-system"],
            "pod_namespace": "istio-system",
            "ambient_enabled": true,
            "plugin_log_level": "debug",
            "enablement_selectors": [{"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}}],
            "dns": {}, "ipam": {},
        })
    }

    fn with_prev(&self, version: &str, prev: Value) -> Value {
        let mut conf = self.conf(version);
        conf["prevResult"] = prev;
        conf
    }

    /// The environment of an ADD/DEL/CHECK for pod `ns/name`.
    fn env(&self, command: &str, ns: &str, name: &str) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), "a1b2c3d4e5".into()),
            ("CNI_NETNS".into(), self.netns()),
            ("CNI_IFNAME".into(), "eth0".into()),
            (
                "CNI_ARGS".into(),
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};\
                     K8S_POD_INFRA_CONTAINER_ID=a1b2c3d4e5;K8S_POD_UID=uid-1234"
                ),
            ),
            ("CNI_PATH".into(), "/opt/cni/bin".into()),
        ]
    }
}

/// What the plugin did.
#[derive(Debug)]
struct Ran {
    code: i32,
    /// stdout as JSON (None when empty); the test fails if stdout holds anything but one JSON document.
    out: Option<Value>,
    stderr: String,
    took: Duration,
}

fn run(env: &[(String, String)], stdin: &str) -> Ran {
    let start = Instant::now();
    let mut child = Command::new(PLUGIN)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("plugin output");
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let out = if stdout.trim().is_empty() {
        assert!(
            stdout.is_empty(),
            "stdout holds only whitespace: {stdout:?}"
        );
        None
    } else {
        Some(
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {stdout:?}")),
        )
    };
    Ran {
        code: output.status.code().unwrap_or(-1),
        out,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: start.elapsed(),
    }
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: Option<&str>) {
    env.retain(|(k, _)| k != key);
    if let Some(v) = value {
        env.push((key.into(), v.into()));
    }
}

#[track_caller]
fn assert_error(ran: &Ran, code: u64) -> Value {
    assert_eq!(ran.code, 1, "exit status; stderr: {}", ran.stderr);
    let err = ran.out.clone().expect("a CNI error on stdout");
    assert_eq!(err["code"], code, "error {err}");
    for key in ["cniVersion", "msg", "details"] {
        assert!(err[key].is_string(), "error lacks {key}: {err}");
    }
    err
}

#[track_caller]
fn assert_success(ran: &Ran) -> Option<Value> {
    assert_eq!(ran.code, 0, "stdout {:?}, stderr: {}", ran.out, ran.stderr);
    ran.out.clone()
}

fn prev_1_0_0() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1234", "mac": "0a:58:0a:f4:00:01"},
            {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "mtu": 1450, "sandbox": "/var/run/netns/cni-1"}
        ],
        "ips": [
            {"interface": 1, "address": "10.244.0.5/24", "gateway": "10.244.0.1"},
            {"interface": 1, "address": "fd00:10:244::5/64"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}, {"dst": "10.96.0.0/12", "mtu": 1400}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]}
    })
}

fn with_ip_versions(mut result: Value, version: &str) -> Value {
    result["cniVersion"] = version.into();
    if let Some(ips) = result["ips"].as_array_mut() {
        for ip in ips {
            let family = if ip["address"].as_str().is_some_and(|a| a.contains(':')) {
                "6"
            } else {
                "4"
            };
            ip["version"] = family.into();
        }
    }
    result
}

#[test]
fn version_lists_every_supported_version() {
    let ran = run(
        &[("CNI_COMMAND".into(), "VERSION".into())],
        r#"{"cniVersion":"0.4.0"}"#,
    );
    let out = assert_success(&ran).expect("version object");
    assert_eq!(
        out,
        json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    let ran = run(&[("CNI_COMMAND".into(), "VERSION".into())], "");
    assert_eq!(
        assert_success(&ran).expect("version")["cniVersion"],
        "1.1.0"
    );
}

#[test]
fn add_passes_prev_result_through_in_every_version() {
    let world = World::new();
    let agent = FakeAgent::start(world.run_dir(), 200, "");
    for version in ["0.3.0", "0.3.1", "0.4.0"] {
        let prev = with_ip_versions(prev_1_0_0(), version);
        let ran = run(
            &world.env("ADD", "default", "web-0"),
            &world.with_prev(version, prev.clone()).to_string(),
        );
        assert_eq!(assert_success(&ran), Some(prev), "version {version}");
    }
    for version in ["1.0.0", "1.1.0"] {
        let mut prev = prev_1_0_0();
        prev["cniVersion"] = version.into();
        let ran = run(
            &world.env("ADD", "default", "web-0"),
            &world.with_prev(version, prev.clone()).to_string(),
        );
        assert_eq!(assert_success(&ran), Some(prev), "version {version}");
    }
    assert_eq!(agent.requests().len(), 5);
}

#[test]
fn add_converts_prev_result_to_the_requested_version_and_back() {
    let world = World::new();
    let _agent = FakeAgent::start(world.run_dir(), 200, "");
    let ran = run(
        &world.env("ADD", "default", "web-0"),
        &world.with_prev("0.4.0", prev_1_0_0()).to_string(),
    );
    let as_0_4_0 = assert_success(&ran).expect("result");
    assert_eq!(as_0_4_0, with_ip_versions(prev_1_0_0(), "0.4.0"));
    let ran = run(
        &world.env("ADD", "default", "web-0"),
        &world.with_prev("1.0.0", as_0_4_0).to_string(),
    );
    assert_eq!(assert_success(&ran), Some(prev_1_0_0()));
}

#[test]
fn add_without_prev_result_prints_an_empty_result() {
    let world = World::new();
    let _agent = FakeAgent::start(world.run_dir(), 200, "");
    let ran = run(
        &world.env("ADD", "default", "web-0"),
        &world.conf("0.3.1").to_string(),
    );
    assert_eq!(
        assert_success(&ran),
        Some(json!({"cniVersion": "0.3.1", "dns": {}}))
    );
}

#[test]
fn agent_receives_the_pod_event_with_go_style_keys() {
    let world = World::new();
    let agent = FakeAgent::start(
        world.run_dir(),
        200,
        r#"{"enrolled":true,"reason":"ns label"}"#,
    );
    let ran = run(
        &world.env("ADD", "default", "web-0"),
        &world.with_prev("1.0.0", prev_1_0_0()).to_string(),
    );
    assert_success(&ran);
    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.path, "/cmdadd");
    assert_eq!(req.header("host"), Some("unix"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("connection"), Some("close"));
    assert_eq!(
        req.body,
        json!({
            "Netns": world.netns(),
            "PodName": "web-0",
            "PodNamespace": "default",
            "PodUID": "uid-1234",
            "ContainerID": "a1b2c3d4e5",
            "IfName": "eth0",
            "IPs": [
                {"Interface": 1, "Address": {"IP": "10.244.0.5", "Mask": "////AA=="}, "Gateway": "10.244.0.1"},
                {"Interface": 1, "Address": {"IP": "fd00:10:244::5", "Mask": "//////////8AAAAAAAAAAA=="}, "Gateway": ""}
            ]
        })
    );
    assert!(ran.stderr.contains("enrolled"), "debug log: {}", ran.stderr);
}

#[test]
fn ip_without_interface_index_is_sent_as_null() {
    let world = World::new();
    let agent = FakeAgent::start(world.run_dir(), 200, "");
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.9/16"}]});
    let ran = run(
        &world.env("ADD", "default", "web-0"),
        &world.with_prev("1.0.0", prev).to_string(),
    );
    assert_success(&ran);
    assert_eq!(
        agent.requests()[0].body["IPs"],
        json!([{"Interface": null, "Address": {"IP": "10.1.0.9", "Mask": "//8AAA=="}, "Gateway": ""}])
    );
}

#[test]
fn pod_the_agent_does_not_enroll_still_starts() {
    let world = World::new();
    let agent = FakeAgent::start(
        world.run_dir(),
        200,
        r#"{"enrolled":false,"reason":"namespace not ambient"}"#,
    );
    let ran = run(
        &world.env("ADD", "plain", "web-0"),
        &world.with_prev("1.0.0", prev_1_0_0()).to_string(),
    );
    assert_eq!(assert_success(&ran), Some(prev_1_0_0()));
    assert_eq!(agent.requests().len(), 1);
    assert!(ran.stderr.contains("not enrolled"), "{}", ran.stderr);
}

#[test]
fn agent_failure_asks_the_runtime_to_try_again_with_the_agents_message() {
    let world = World::new();
    let _agent = FakeAgent::start(world.run_dir(), 500, "pod default/web-0 not found in cache");
    let ran = run(
        &world.env("ADD", "default", "web-0"),
        &world.with_prev("1.0.0", prev_1_0_0()).to_string(),
    );
    let err = assert_error(&ran, 11);
    assert_eq!(err["msg"], "meshnode CNI agent could not enroll the pod");
    assert_eq!(err["details"], "pod default/web-0 not found in cache");
    assert_eq!(err["cniVersion"], "1.0.0");
}

#[test]
fn agent_down_lets_pods_start_only_where_the_hint_file_says_no_pod_can_be_enrolled() {
    let world = World::new();
    world.hint(&["plain"]);
    let conf = world.with_prev("1.0.0", prev_1_0_0()).to_string();

    let ran = run(&world.env("ADD", "mesh", "web-0"), &conf);
    let err = assert_error(&ran, 11);
    let details = err["details"].as_str().expect("details");
    assert!(details.contains("pluginevent.sock"), "{details}");
    assert!(details.contains("mesh/web-0"), "{details}");
    assert!(details.contains("may need the mesh"), "{details}");

    let ran = run(&world.env("ADD", "plain", "web-0"), &conf);
    assert_eq!(assert_success(&ran), Some(prev_1_0_0()));

    // A namespace the agent did not list (created while it was down, or reachable by a pod-label
    // selector): a pod there may have to be captured, so it does not start uncaptured.
    let ran = run(&world.env("ADD", "newns", "web-0"), &conf);
    let err = assert_error(&ran, 11);
    assert!(
        err["details"]
            .as_str()
            .is_some_and(|d| d.contains("may be enrolled")),
        "{err}"
    );
    // Excluded namespaces pass whatever the hint's age.
    world.hint_valid_for(&["plain"], -3600);
    assert_success(&run(&world.env("ADD", "kube-system", "dns-0"), &conf));
}

#[test]
fn agent_down_with_a_stale_or_old_format_hint_fails_closed() {
    let world = World::new();
    let conf = world.with_prev("1.0.0", prev_1_0_0()).to_string();
    // The agent stopped renewing it: namespace labels may have changed since.
    world.hint_valid_for(&["plain"], -5);
    let err = assert_error(&run(&world.env("ADD", "plain", "web-0"), &conf), 11);
    assert!(
        err["details"].as_str().is_some_and(|d| d.contains("stale")),
        "{err}"
    );
    // The first format listed only namespaces enrolled by namespace label: it cannot rule out pod labels.
    std::fs::write(
        world.run_dir().join("meshnode-enrollment.json"),
        json!({ "ambientNamespaces": ["mesh"] }).to_string(),
    )
    .expect("write");
    assert_error(&run(&world.env("ADD", "plain", "web-0"), &conf), 11);
}

#[test]
fn agent_down_without_a_usable_hint_file_fails_closed() {
    let world = World::new();
    let conf = world.with_prev("1.0.0", prev_1_0_0()).to_string();
    let ran = run(&world.env("ADD", "plain", "web-0"), &conf);
    let err = assert_error(&ran, 11);
    assert!(
        err["details"]
            .as_str()
            .is_some_and(|d| d.contains("meshnode-enrollment.json")),
        "{err}"
    );
    std::fs::write(world.run_dir().join("meshnode-enrollment.json"), "{oops").expect("write");
    assert_error(&run(&world.env("ADD", "plain", "web-0"), &conf), 11);
}

#[test]
fn agent_that_never_answers_times_out_after_five_seconds() {
    let world = World::new();
    world.hint(&["plain"]);
    let _agent = FakeAgent::start_with(world.run_dir(), Arc::new(|_| None));
    let ran = run(
        &world.env("ADD", "plain", "web-0"),
        &world.conf("1.0.0").to_string(),
    );
    assert_success(&ran);
    assert!(
        ran.took >= Duration::from_secs(5) && ran.took < Duration::from_secs(8),
        "took {:?}",
        ran.took
    );
    assert!(ran.stderr.contains("no answer within"), "{}", ran.stderr);
}

#[test]
fn excluded_non_kubernetes_and_agent_pods_never_reach_the_agent() {
    let world = World::new();
    let agent = FakeAgent::start(world.run_dir(), 500, "must not be asked");
    let conf = world.with_prev("1.0.0", prev_1_0_0()).to_string();
    for (ns, name) in [
        ("kube-system", "coredns-1"),
        ("istio-system", "istio-cni-node-abcde"),
        ("istio-system", "meshnode-cni-node-abcde"),
    ] {
        let ran = run(&world.env("ADD", ns, name), &conf);
        assert_eq!(assert_success(&ran), Some(prev_1_0_0()), "{ns}/{name}");
    }
    let mut env = world.env("ADD", "x", "y");
    set(&mut env, "CNI_ARGS", Some("IgnoreUnknown=1"));
    assert_eq!(assert_success(&run(&env, &conf)), Some(prev_1_0_0()));
    set(&mut env, "CNI_ARGS", None);
    assert_eq!(assert_success(&run(&env, &conf)), Some(prev_1_0_0()));
    assert!(agent.requests().is_empty(), "{:?}", agent.requests());
    // Another pod in the agent's namespace is not exempt.
    assert_error(
        &run(&world.env("ADD", "istio-system", "istiod-1"), &conf),
        11,
    );
}

#[test]
fn bad_input_gets_the_spec_error_codes() {
    let world = World::new();
    let _agent = FakeAgent::start(world.run_dir(), 200, "");
    let good = world.with_prev("1.0.0", prev_1_0_0()).to_string();
    let env = world.env("ADD", "default", "web-0");

    assert_error(&run(&env, "{\"cniVersion\": \"1.0.0\", "), 6);
    assert_error(&run(&env, &world.conf("0.2.0").to_string()), 1);
    let mut no_name = world.conf("1.0.0");
    no_name.as_object_mut().expect("object").remove("name");
    assert_error(&run(&env, &no_name.to_string()), 7);
    let bad_prev = world.with_prev(
        "1.0.0",
        json!({"cniVersion": "1.0.0", "ips": [{"address": "nope"}]}),
    );
    assert_error(&run(&env, &bad_prev.to_string()), 6);

    for (var, value) in [
        ("CNI_NETNS", None),
        ("CNI_IFNAME", None),
        ("CNI_CONTAINERID", Some("-bad/id")),
        ("CNI_COMMAND", Some("FROB")),
        ("CNI_ARGS", Some("K8S_POD_NAME")),
    ] {
        let mut env = env.clone();
        set(&mut env, var, value);
        let err = assert_error(&run(&env, &good), 4);
        assert!(
            err["msg"].as_str().is_some_and(|m| m.contains(var)),
            "{err}"
        );
    }

    let mut env = env;
    set(
        &mut env,
        "CNI_NETNS",
        Some("/var/run/netns/does-not-exist-meshnode"),
    );
    let ran = run(&env, &good);
    assert_eq!(ran.code, 1);
    let err = ran.out.expect("error");
    assert!(
        err["msg"].as_str().is_some_and(|m| m.contains("CNI_NETNS")),
        "{err}"
    );
}

#[test]
fn del_succeeds_whatever_the_agent_does() {
    let world = World::new();
    let conf = world.with_prev("1.0.0", prev_1_0_0()).to_string();
    let mut env = world.env("DEL", "mesh", "web-0");
    set(&mut env, "CNI_NETNS", None);

    // Agent down.
    let ran = run(&env, &conf);
    assert_eq!(assert_success(&ran), None);

    // Agent refusing.
    {
        let agent = FakeAgent::start(world.run_dir(), 500, "boom");
        assert_eq!(assert_success(&run(&env, &conf)), None);
        let reqs = agent.requests();
        assert_eq!(reqs[0].path, "/cmddel");
        assert_eq!(reqs[0].body["Netns"], "");
        assert_eq!(reqs[0].body["PodName"], "web-0");
        assert_eq!(reqs[0].body["IPs"][0]["Address"]["IP"], "10.244.0.5");
    }

    // Agent fine, no prevResult.
    let agent = FakeAgent::start(world.run_dir(), 200, "");
    assert_eq!(
        assert_success(&run(&env, &world.conf("1.0.0").to_string())),
        None
    );
    assert_eq!(agent.requests()[0].body["IPs"], json!([]));
}

#[test]
fn check_asks_the_agent() {
    let world = World::new();
    let conf = world.with_prev("1.0.0", prev_1_0_0()).to_string();
    let env = world.env("CHECK", "mesh", "web-0");
    {
        let agent = FakeAgent::start_with(
            world.run_dir(),
            Arc::new(|r| {
                Some(if r.body["PodName"] == "web-0" {
                    (200, String::new())
                } else {
                    (500, "gone".into())
                })
            }),
        );
        assert_eq!(assert_success(&run(&env, &conf)), None);
        let err = assert_error(&run(&world.env("CHECK", "mesh", "web-1"), &conf), 11);
        assert_eq!(err["details"], "gone");
        assert!(agent.requests().iter().all(|r| r.path == "/cmdcheck"));
        assert_eq!(
            agent.requests()[0].body["IPs"][0]["Address"]["Mask"],
            "////AA=="
        );
    }
    // Agent down: the hint file decides, as for ADD.
    world.hint(&["mesh"]);
    assert_eq!(assert_success(&run(&env, &conf)), None);
    world.hint(&["other"]);
    assert_error(&run(&env, &conf), 11);
    // CHECK did not exist before 0.4.0.
    assert_error(&run(&env, &world.conf("0.3.1").to_string()), 1);
}

#[test]
fn gc_forwards_the_valid_attachments_and_never_fails() {
    let world = World::new();
    let mut conf = world.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([
        {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c2", "ifname": "eth0"}
    ]);
    let env = vec![
        ("CNI_COMMAND".to_string(), "GC".to_string()),
        ("CNI_PATH".to_string(), "/opt/cni/bin".to_string()),
    ];
    assert_eq!(assert_success(&run(&env, &conf.to_string())), None);
    let agent = FakeAgent::start(world.run_dir(), 500, "nope");
    assert_eq!(assert_success(&run(&env, &conf.to_string())), None);
    let reqs = agent.requests();
    assert_eq!(reqs[0].path, "/cmdgc");
    assert_eq!(
        reqs[0].body,
        json!({"ValidAttachments": [
            {"containerID": "c1", "ifname": "eth0"},
            {"containerID": "c2", "ifname": "eth0"}
        ]})
    );
}

#[test]
fn status_is_ready_while_the_agent_is_down() {
    let world = World::new();
    let env = vec![("CNI_COMMAND".to_string(), "STATUS".to_string())];
    assert_eq!(
        assert_success(&run(&env, &world.conf("1.1.0").to_string())),
        None
    );
    assert_error(&run(&env, "not json"), 6);
}

#[test]
fn logs_stay_on_stderr() {
    let world = World::new();
    let ran = run(
        &world.env("ADD", "plain", "web-0"),
        &world.conf("1.0.0").to_string(),
    );
    // Fails closed (no agent, no hint file): stdout has exactly the error object, stderr the log line.
    assert_error(&ran, 11);
    assert!(ran.stderr.contains("meshnode-cni error"), "{}", ran.stderr);
}
