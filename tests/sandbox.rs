//! `meshnode sandbox` as a newcomer uses it, through the real binary: the whole tutorial in one command;
//! `up` / `status` / `exec` / `apply` / `down` on a sandbox left running; refusals (a second `up`, a bad
//! manifest, not root); `down` after a crash leaving nothing behind; and `up --multi-network`, whose
//! calls between the networks cross only through the east-west gateways — checked from outside (network
//! namespaces, processes, files, the gateways' access logs), not from the sandbox's own bookkeeping.
//!
//! Needs root (skipped otherwise, except the not-root refusal) and `meshnode-cni` built beside `meshnode`
//! (`cargo test --workspace`). Each test uses its own sandbox name and state directory, and removes its
//! sandbox on drop, also when it fails.

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A sandbox name and state directory of this test's own; `down` on drop.
struct Sandbox {
    name: String,
    dir: tempfile::TempDir,
    /// The test's own files (manifests), apart from the sandbox's directory.
    files: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mnt{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _ = support::cluster::plugin_binary();
        Sandbox {
            name,
            dir: tempfile::tempdir().unwrap(),
            files: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshnode"));
        c.arg("sandbox")
            .args(["--name", &self.name, "--dir"])
            .arg(self.dir.path())
            .args(args)
            .env("RUST_LOG", "warn");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running meshnode sandbox")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// Network namespaces named like this sandbox's.
    fn namespaces(&self) -> Vec<String> {
        let prefix = format!("{}-", self.name);
        std::fs::read_dir("/var/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Processes the sandbox started (they carry its state directory in MESHNODE_SANDBOX_MEMBER).
    fn processes(&self) -> Vec<String> {
        let marker = format!("MESHNODE_SANDBOX_MEMBER={}", self.state().display());
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            });
            let member = std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|e| e.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()));
            if !zombie && member {
                out.push(format!("{pid}: {cmdline}"));
            }
        }
        out
    }

    fn assert_gone(&self) {
        assert_eq!(
            self.namespaces(),
            Vec::<String>::new(),
            "namespaces left behind"
        );
        assert_eq!(
            self.processes(),
            Vec::<String>::new(),
            "processes left behind"
        );
        assert!(!self.state().exists(), "state directory left behind");
        let left: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "files left behind: {left:?}");
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(d) = std::fs::read_dir(self.state().join("logs")) {
            for e in d.flatten() {
                out += &format!(
                    "--- {}\n{}\n",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        out
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write(dir: &Path, name: &str, yaml: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn the_sandbox_command_runs_the_ambient_tutorial_and_removes_everything_it_made() {
    if !support::root_or_skip(
        "the_sandbox_command_runs_the_ambient_tutorial_and_removes_everything_it_made",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.run(&[]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}\n{}", sb.logs());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "apply PeerAuthentication default/default: STRICT",
        "label namespace test istio.io/dataplane-mode=ambient",
        "mutual_tls from spiffe://cluster.local/ns/test/sa/sleep",
        "reviews-v",
        "waypoint default/waypoint ready",
        "mutual_tls from spiffe://cluster.local/ns/default/sa/waypoint",
        "HTTP 403 \"RBAC: access denied\"",
        "httproute.gateway.networking.k8s.io/reviews created",
        "pod default/waypoint-0 removed",
        "serviceentry.networking.istio.io/api-example created",
        "HTTP 200 \"hello from api.example.test\"",
        "17 of 17 checks as expected",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{report}"
        );
    }
    assert!(!stdout.contains("MISMATCH"), "{report}");
    sb.assert_gone();
}

#[test]
fn a_sandbox_left_up_is_used_live_refuses_bad_input_and_down_after_a_crash_leaves_nothing() {
    if !support::root_or_skip(
        "a_sandbox_left_up_is_used_live_refuses_bad_input_and_down_after_a_crash_leaves_nothing",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let up = sb.run(&["up"]);
    assert_eq!(up.status.code(), Some(0), "{}\n{}", text(&up), sb.logs());

    // A second `up` is refused, saying what is there and what to do; the first keeps running.
    let again = sb.run(&["up"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already up") && err.contains("sandbox down"),
        "{err}"
    );
    let status = sb.run(&["status"]);
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}\n{}",
        text(&status),
        sb.logs()
    );
    let s = String::from_utf8_lossy(&status.stdout);
    assert!(
        s.contains("default/reviews-v2") && s.contains("captured"),
        "{s}"
    );

    // exec: a command inside a pod, with service names resolving as in a cluster.
    let hosts = sb.run(&["exec", "sleep", "--", "cat", "/etc/hosts"]);
    assert_eq!(hosts.status.code(), Some(0), "{}", text(&hosts));
    assert!(
        String::from_utf8_lossy(&hosts.stdout).contains("productpage.default.svc.cluster.local")
    );
    let missing = sb.run(&["exec", "nosuchpod", "--", "true"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no pod"));

    // apply: a malformed or unsupported resource is refused, naming the field, and nothing changes.
    let mesh = sb.state().join("mesh.yaml");
    let before = std::fs::read(&mesh).unwrap();
    let bad_principal = write(
        sb.files.path(),
        "bad.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: default}\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"\"]}\n",
    );
    let unknown_field = write(
        sb.files.path(),
        "typo.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtlz: {mode: STRICT}}\n",
    );
    let unsupported = write(
        sb.files.path(),
        "se.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: r, namespace: default}\nspec: {}\n",
    );
    let no_such_backend = write(
        sb.files.path(),
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: default}\nspec: {parentRefs: [{group: '', kind: Service, name: reviews}], rules: [{backendRefs: [{name: reviews-v9, port: 9080}]}]}\n",
    );
    for (file, names) in [
        (&bad_principal, "principals[0]"),
        (&unknown_field, "mtlz"),
        (&unsupported, "ServiceEntry"),
        (&no_such_backend, "reviews-v9"),
    ] {
        let o = sb.run(&["apply", file]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(names), "{file}: {err}");
        assert_eq!(
            std::fs::read(&mesh).unwrap(),
            before,
            "{file} changed the mesh"
        );
    }
    // A good one is applied live.
    let strict = write(
        sb.files.path(),
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let o = sb.run(&["apply", &strict]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&std::fs::read(&mesh).unwrap()).contains("STRICT"));
    let s = String::from_utf8_lossy(&sb.run(&["status"]).stdout).into_owned();
    assert!(s.contains("PeerAuthentication default/default"), "{s}");

    // From stdin, as `kubectl apply -f -`: a namespace label.
    let mut child = sb
        .cmd(&["apply", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"apiVersion: v1\nkind: Namespace\nmetadata: {name: test, labels: {istio.io/dataplane-mode: ambient}}\n",
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("namespace/test configured"));
    // As with `kubectl label`, the capture follows asynchronously (the node's agent re-reads its file):
    // the pod already running in the namespace is captured within a few poll intervals.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = sb.run(&["status"]);
        let s = String::from_utf8_lossy(&status.stdout).into_owned();
        let sleep = s
            .lines()
            .find(|l| l.starts_with("test/sleep"))
            .unwrap_or("");
        if sleep.contains(" captured ") && status.status.code() == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "test/sleep not captured 30 s after its namespace was labelled:\n{s}\n{}",
            sb.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // Refused before anything changes: a manifest over 1 MiB, and a second command while one holds the lock.
    let applied = std::fs::read(&mesh).unwrap();
    let huge = write(sb.files.path(), "huge.yaml", &"#".repeat(1024 * 1024 + 10));
    let o = sb.run(&["apply", &huge]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("larger than"),
        "{}",
        text(&o)
    );
    let lock = std::fs::File::open(sb.dir.path().join(format!("{}.lock", sb.name))).unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let o = sb.run(&["apply", &strict]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("another `meshnode sandbox` command"),
        "{}",
        text(&o)
    );
    drop(held);
    assert_eq!(std::fs::read(&mesh).unwrap(), applied);

    // A waypoint, as `istioctl waypoint apply --enroll-namespace` makes it: the sandbox starts its pod,
    // status shows it serving the namespace's services; deleting the Gateway removes the pod again.
    let waypoint = write(
        sb.files.path(),
        "waypoint.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: default}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n",
    );
    let o = sb.run(&["apply", &waypoint]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), sb.logs());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("waypoint default/waypoint ready"),
        "{}",
        text(&o)
    );
    let status = sb.run(&["status"]);
    let s = String::from_utf8_lossy(&status.stdout).into_owned();
    assert_eq!(status.status.code(), Some(0), "{s}\n{}", sb.logs());
    let pod_line = s
        .lines()
        .find(|l| l.starts_with("default/waypoint-0"))
        .unwrap_or_else(|| panic!("no waypoint pod in\n{s}"));
    assert!(
        pod_line.contains("(waypoint)")
            && pod_line.contains("running")
            && !pod_line.contains("captured"),
        "{pod_line}"
    );
    let waypoint_line = s
        .lines()
        .find(|l| l.starts_with("default/waypoint "))
        .unwrap_or_else(|| panic!("no waypoint row in\n{s}"));
    assert!(waypoint_line.contains("productpage"), "{waypoint_line}");
    assert!(sb
        .namespaces()
        .iter()
        .any(|n| n.ends_with("-default-waypoint-0")));
    let gateway_only = write(
        sb.files.path(),
        "gateway.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: default}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
    );
    let o = sb.run(&["delete", &gateway_only]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!sb
        .namespaces()
        .iter()
        .any(|n| n.ends_with("-default-waypoint-0")));
    assert!(!sb.processes().iter().any(|p| p.contains(" waypoint")));
    // And again, so that the crash below finds a waypoint among the processes to clean up.
    let o = sb.run(&["apply", &waypoint]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // A crash: every component killed at once. `up` now reports a leftover; `down` removes all of it.
    assert!(!sb.processes().is_empty());
    for p in sb.processes() {
        let pid: i32 = p.split(':').next().unwrap().parse().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let leftover = sb.run(&["up"]);
    assert_eq!(leftover.status.code(), Some(2), "{}", text(&leftover));
    assert!(
        String::from_utf8_lossy(&leftover.stderr).contains("left behind"),
        "{}",
        text(&leftover)
    );
    let down = sb.run(&["down"]);
    assert_eq!(down.status.code(), Some(0), "{}", text(&down));
    sb.assert_gone();
    let again = sb.run(&["down"]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "a second down is fine: {}",
        text(&again)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"));
    sb.assert_gone();
}

/// Runs `f` on a thread inside the sandbox's pod `namespace/name`.
fn in_pod<T: Send + 'static>(sb: &Sandbox, pod: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = Path::new("/var/run/netns").join(format!("{}-{}", sb.name, pod.replace('/', "-")));
    let ns = std::sync::Arc::new(meshnode::netns::Netns::open(&path).unwrap());
    ns.run_on_thread(f).unwrap()
}

/// The lines of a component's log (`logs/<component>.log`) that contain every one of `needles`.
fn log_lines(sb: &Sandbox, component: &str, needles: &[&str]) -> Vec<String> {
    let log = sb.state().join(format!("logs/{component}.log"));
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_multi_network_sandbox_crosses_between_its_networks_only_through_the_east_west_gateways() {
    if !support::root_or_skip(
        "a_multi_network_sandbox_crosses_between_its_networks_only_through_the_east_west_gateways",
    ) {
        return;
    }
    use meshnode::sandbox::apps::{call_blocking, Outcome};
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};
    let sb = Sandbox::new();
    let up = sb.run(&["up", "--multi-network"]);
    assert_eq!(up.status.code(), Some(0), "{}\n{}", text(&up), sb.logs());
    // The choice is made at `up`: the other commands work on the sandbox as it was built.
    let refused = sb.run(&["--multi-network", "status"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));

    let status = sb.run(&["status"]);
    let s = String::from_utf8_lossy(&status.stdout).into_owned();
    assert_eq!(status.status.code(), Some(0), "{s}\n{}", sb.logs());
    for (network, node, gateway) in [
        ("network1", "node1", "istio-system/eastwest-network1"),
        ("network2", "node2", "istio-system/eastwest-network2"),
    ] {
        let row = s
            .lines()
            .find(|l| l.starts_with(network))
            .unwrap_or_else(|| panic!("no row for {network} in\n{s}"));
        assert!(
            row.contains(node) && row.contains(gateway) && row.contains(":15008"),
            "{row}"
        );
        let pod = s
            .lines()
            .find(|l| l.starts_with(&format!("{gateway}-0 ")))
            .unwrap_or_else(|| panic!("no pod {gateway}-0 in\n{s}"));
        assert!(
            pod.contains("(east-west gw)") && pod.contains("running") && !pod.contains("captured"),
            "{pod}"
        );
    }

    // productpage (node1, network1) → reviews (node2, network2), until a version that calls ratings
    // (node1) answers: both directions cross, each through the destination network's gateway.
    let reviews: SocketAddr = "10.96.0.22:9080".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let outcome = in_pod(&sb, "default/productpage-v1", move || {
            call_blocking(reviews, "GET", "/reviews/0", Duration::from_secs(5))
        });
        if let Outcome::Answered {
            status: 200,
            app: Some(app),
            body,
        } = &outcome
        {
            if app != "reviews-v1" && body.contains("\"stars\"") {
                break;
            }
        }
        seen.push(outcome.to_string());
        assert!(
            Instant::now() < deadline,
            "no answer with ratings from reviews v2/v3 within 20 s: {seen:?}\n{}",
            sb.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The gateways' access lines say who crossed, to which service (logged when the stream ends).
    let productpage = "src.identity=spiffe://cluster.local/ns/default/sa/productpage";
    let reviews_sa = "src.identity=spiffe://cluster.local/ns/default/sa/reviews";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let to_reviews = log_lines(
            &sb,
            "istio-system-eastwest-network2-0",
            &[
                "reporter=\"gateway\"",
                productpage,
                "dst.hbone_addr=reviews.default.svc.cluster.local:9080",
                "connection complete",
            ],
        );
        let to_ratings = log_lines(
            &sb,
            "istio-system-eastwest-network1-0",
            &[
                "reporter=\"gateway\"",
                reviews_sa,
                "dst.hbone_addr=ratings.default.svc.cluster.local:9080",
                "connection complete",
            ],
        );
        if !to_reviews.is_empty() && !to_ratings.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access line of the gateways for productpage → reviews ({}) or reviews → ratings ({})\n{}",
            to_reviews.len(),
            to_ratings.len(),
            sb.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The networks are separate: from a pod outside the mesh on network1, a reviews pod cannot be
    // reached at all, and network2's gateway only on its HBONE port.
    let outcome = in_pod(&sb, "test/sleep", || {
        call_blocking(
            "10.244.2.10:9080".parse().unwrap(),
            "GET",
            "/reviews/0",
            Duration::from_secs(3),
        )
    });
    assert!(
        !matches!(outcome, Outcome::Answered { .. }),
        "reviews' pod answered across networks: {outcome}"
    );
    let connect = |port: u16| {
        in_pod(&sb, "test/sleep", move || {
            let to = SocketAddr::from(([10, 244, 2, 13], port));
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).map(drop)
        })
    };
    connect(15008).expect("network2's gateway is reachable on its HBONE port");
    assert!(
        connect(15021).is_err(),
        "network2's gateway answered on another port than HBONE"
    );

    let down = sb.run(&["down"]);
    assert_eq!(down.status.code(), Some(0), "{}", text(&down));
    sb.assert_gone();
}

#[test]
fn a_sandbox_name_that_cannot_prefix_namespaces_is_refused() {
    let sb = Sandbox::new();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshnode"));
    cmd.args(["sandbox", "--name", "Not_OK", "--dir"])
        .arg(sb.dir.path())
        .arg("status");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid sandbox name \"Not_OK\""),
        "{}",
        text(&out)
    );
}

#[test]
fn the_sandbox_says_it_needs_root() {
    let sb = Sandbox::new();
    let mut cmd = sb.cmd(&["up"]);
    if nix::unistd::geteuid().is_root() {
        // Run it as nobody.
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs root"),
        "{}",
        text(&out)
    );
    assert!(!sb.state().exists());
}

#[test]
fn sandbox_upgrade_swaps_each_node_proxy_while_traffic_runs_and_no_connection_is_reset() {
    if !support::root_or_skip(
        "sandbox_upgrade_swaps_each_node_proxy_while_traffic_runs_and_no_connection_is_reset",
    ) {
        return;
    }
    use meshnode::sandbox::apps::{KeptAlive, Outcome};
    use std::net::SocketAddr;
    use std::time::Duration;
    let sb = Sandbox::new();
    let up = sb.run(&["up"]);
    assert_eq!(up.status.code(), Some(0), "{}\n{}", text(&up), sb.logs());
    let status = String::from_utf8_lossy(&sb.run(&["status"]).stdout).into_owned();
    let reviews_ip: std::net::IpAddr = status
        .lines()
        .find(|l| l.starts_with("default/reviews-v1 "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("no address for reviews-v1 in\n{status}"));

    // A connection of the test's own, kept alive from productpage (node1) to reviews-v1 (node2): both
    // its ends are on the proxies the upgrade replaces.
    let dst = SocketAddr::new(reviews_ip, 9080);
    let mut conn = in_pod(&sb, "default/productpage-v1", move || {
        KeptAlive::open(dst, Duration::from_secs(5))
    })
    .unwrap();
    let answered = |o: Outcome| matches!(o, Outcome::Answered { status: 200, .. });
    assert!(answered(conn.get("/reviews/1")), "before the upgrade");

    let o = sb.run(&["upgrade"]);
    let said = text(&o);
    assert_eq!(o.status.code(), Some(0), "{said}\n{}", sb.logs());
    assert!(said.contains("nothing was reset"), "{said}");
    for node in ["node1", "node2"] {
        let line = said
            .lines()
            .find(|l| l.starts_with(&format!("{node}: new proxy")))
            .unwrap_or_else(|| panic!("no swap of {node} in\n{said}"));
        assert!(
            line.contains("handed ") && !line.contains("handed 0") && !line.contains("nothing"),
            "{line}"
        );
        assert!(line.contains("(0 closed;"), "{line}");
    }
    assert!(
        answered(conn.get("/reviews/2")),
        "the connection opened before the upgrade\n{}",
        sb.logs()
    );

    // Again, one node: the new proxy goes back to the first set of ports.
    let o = sb.run(&["upgrade", "--node", "node1"]);
    let said = text(&o);
    assert_eq!(o.status.code(), Some(0), "{said}\n{}", sb.logs());
    assert!(said.contains("ready on :15021"), "{said}");
    assert!(answered(conn.get("/reviews/3")), "after the second upgrade");

    // A restart (no overlap): node2's proxy stops first, the agent holds its connections, the new one
    // takes them once it is ready.
    let o = sb.run(&["upgrade", "--restart", "--node", "node2"]);
    let said = text(&o);
    assert_eq!(o.status.code(), Some(0), "{said}\n{}", sb.logs());
    assert!(said.contains("nothing open was reset"), "{said}");
    let line = said
        .lines()
        .find(|l| l.starts_with("node2: the old proxy"))
        .unwrap_or_else(|| panic!("no restart of node2 in\n{said}"));
    assert!(
        line.contains("handed ") && !line.contains("handed 0") && !line.contains("nothing"),
        "{line}"
    );
    assert!(
        answered(conn.get("/reviews/4")),
        "the connection opened before the restart\n{}",
        sb.logs()
    );
    let unknown = sb.run(&["upgrade", "--node", "node9"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));

    // One proxy per node, and everything healthy.
    let status = sb.run(&["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let proxies = sb
        .processes()
        .iter()
        .filter(|p| p.ends_with(" proxy "))
        .count();
    assert_eq!(proxies, 2, "{:?}", sb.processes());
}
