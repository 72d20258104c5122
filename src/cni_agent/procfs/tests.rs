use super::*;

use std::os::unix::fs::symlink;
use std::process::{Child, Command, Stdio};

const UID: &str = "3f1c2a9e-7b4d-4e8a-9c1f-0a2b3c4d5e6f";
const SYSTEMD_UID: &str = "3f1c2a9e_7b4d_4e8a_9c1f_0a2b3c4d5e6f";

/// A fake procfs: `<root>/<pid>/{cgroup,stat,ns/net}`, where `ns/net` links to a file standing for a
/// namespace (same target = same inode = same namespace), as the real magic links do.
struct FakeProc {
    dir: tempfile::TempDir,
}

impl FakeProc {
    fn new() -> FakeProc {
        let fake = FakeProc {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        fs::create_dir_all(fake.dir.path().join("namespaces")).expect("mkdir");
        fake.process(1, "0::/init.scope\n", 1, "host");
        fake
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    fn process(&self, pid: u32, cgroup: &str, starttime: u64, netns: &str) {
        let ns_file = self.dir.path().join("namespaces").join(netns);
        if !ns_file.exists() {
            fs::write(&ns_file, netns).expect("write ns file");
        }
        self.process_linking(pid, cgroup, starttime, &ns_file);
    }

    fn process_linking(&self, pid: u32, cgroup: &str, starttime: u64, ns_target: &Path) {
        let dir = self.root().join(pid.to_string());
        fs::create_dir_all(dir.join("ns")).expect("mkdir");
        fs::write(dir.join("cgroup"), cgroup).expect("write cgroup");
        fs::write(dir.join("stat"), stat_line(pid, starttime)).expect("write stat");
        symlink(ns_target, dir.join("ns/net")).expect("symlink");
    }

    fn path_of(&self, pid: u32) -> PathBuf {
        self.root().join(pid.to_string()).join("ns/net")
    }
}

/// A `/proc/<pid>/stat` line whose command name has spaces and a ')' to trip naive parsers.
fn stat_line(pid: u32, starttime: u64) -> String {
    let mut fields = vec!["S".to_string()];
    // Fields 4..=21, then starttime (22), then a few more.
    fields.extend((4..=21).map(|n| n.to_string()));
    fields.push(starttime.to_string());
    fields.extend(["123456", "789"].map(String::from));
    format!("{pid} (pause) x) {}\n", fields.join(" "))
}

fn cgroupfs(uid: &str, container: &str) -> String {
    format!("0::/kubepods/burstable/pod{uid}/{container}\n")
}

fn systemd(uid: &str, container: &str) -> String {
    format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{container}.scope\n"
    )
}

#[test]
fn cgroupfs_layout_names_the_pod() {
    assert_eq!(
        pod_uid_from_cgroup(&cgroupfs(UID, "abc123")).as_deref(),
        Some(UID)
    );
}

#[test]
fn systemd_layout_with_underscores_names_the_pod() {
    assert_eq!(
        pod_uid_from_cgroup(&systemd(SYSTEMD_UID, "abc123")).as_deref(),
        Some(UID)
    );
}

#[test]
fn cgroup_v1_file_with_many_hierarchies_names_the_pod() {
    let v1 = format!(
        "12:perf_event:/kubepods/besteffort/pod{UID}/c1\n11:memory:/kubepods/besteffort/pod{UID}/c1\n1:name=systemd:/kubepods/besteffort/pod{UID}/c1\n"
    );
    assert_eq!(pod_uid_from_cgroup(&v1).as_deref(), Some(UID));
}

#[test]
fn static_pod_hash_uid_is_recognised() {
    let hash = "6d4b0a9f2c3e4f5a6b7c8d9e0f1a2b3c";
    assert_eq!(
        pod_uid_from_cgroup(&cgroupfs(hash, "c")).as_deref(),
        Some(hash)
    );
}

#[test]
fn processes_outside_pods_have_no_pod_uid() {
    for cgroup in [
        "0::/init.scope\n",
        "0::/system.slice/containerd.service\n",
        "0::/kubepods.slice/kubepods-besteffort.slice\n",
        "0::/user.slice/user-1000.slice/session-2.scope\n",
        "0::/kubepods/podnotauid/c1\n",
        "garbage without colons\n",
        "",
    ] {
        assert_eq!(pod_uid_from_cgroup(cgroup), None, "{cgroup:?}");
    }
}

#[test]
fn starttime_is_field_22_even_with_parens_in_the_command() {
    assert_eq!(starttime_from_stat(&stat_line(42, 987_654)), Some(987_654));
    assert_eq!(starttime_from_stat("42 (short) S 1 2"), None);
    assert_eq!(starttime_from_stat("no parens at all"), None);
}

#[test]
fn oldest_process_of_the_pod_wins() {
    let fake = FakeProc::new();
    fake.process(200, &cgroupfs(UID, "app"), 500, "pod-a");
    fake.process(100, &cgroupfs(UID, "pause"), 300, "pod-a");
    // A later process of the same pod in another namespace (e.g. a debug container with its own netns).
    fake.process(300, &cgroupfs(UID, "debug"), 900, "pod-b");
    let mut checked = Vec::new();
    let found = find_pod_netns_with(&fake.root(), UID, |p| {
        checked.push(p.to_path_buf());
        true
    });
    assert_eq!(found, Some(fake.path_of(100)));
    assert_eq!(checked, vec![fake.path_of(100)], "one check per namespace");
}

#[test]
fn namespace_without_the_pod_ip_is_passed_over_for_the_next_oldest() {
    let fake = FakeProc::new();
    fake.process(10, &systemd(SYSTEMD_UID, "a"), 100, "stale");
    fake.process(11, &systemd(SYSTEMD_UID, "b"), 200, "real");
    fake.process(12, &systemd(SYSTEMD_UID, "c"), 300, "real");
    let real = fake.path_of(11);
    let mut checked = Vec::new();
    let found = find_pod_netns_with(&fake.root(), UID, |p| {
        checked.push(p.to_path_buf());
        p == real
    });
    assert_eq!(found, Some(real));
    assert_eq!(checked, vec![fake.path_of(10), fake.path_of(11)]);
}

#[test]
fn host_network_pods_are_never_matched() {
    let fake = FakeProc::new();
    fake.process(50, &cgroupfs(UID, "hostnet"), 100, "host");
    let found = find_pod_netns_with(&fake.root(), UID, |_| true);
    assert_eq!(found, None);
}

#[test]
fn other_pods_and_non_pid_entries_are_ignored() {
    let fake = FakeProc::new();
    let other = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    fake.process(7, &cgroupfs(other, "x"), 1, "other");
    fs::create_dir_all(fake.root().join("self")).expect("mkdir");
    fs::write(fake.root().join("uptime"), "1 1").expect("write");
    assert_eq!(find_pod_netns_with(&fake.root(), UID, |_| true), None);
    // The UID is matched whatever case or separator the caller uses.
    assert_eq!(
        find_pod_netns_with(&fake.root(), &other.to_uppercase(), |_| true),
        Some(fake.path_of(7))
    );
}

#[test]
fn no_ip_match_means_no_netns() {
    let fake = FakeProc::new();
    fake.process(20, &cgroupfs(UID, "a"), 100, "pod");
    assert_eq!(find_pod_netns_with(&fake.root(), UID, |_| false), None);
}

#[test]
fn missing_proc_root_finds_nothing() {
    assert_eq!(
        find_pod_netns_with(Path::new("/nonexistent/proc"), UID, |_| true),
        None
    );
}

/// A named netns made with `ip netns` (tests only), deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(tag: &str) -> TestNetns {
        let name = format!("mn-procfs-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        TestNetns { name }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process, killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

fn is_root(test: &str) -> bool {
    crate::test_gate::needs_root(test)
}

/// A netns holding 192.0.2.10 and 2001:db8::10 (documentation ranges) on its loopback, which reaches nothing.
fn netns_with_pod_ip(tag: &str) -> TestNetns {
    let ns = TestNetns::new(tag);
    ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
    ip(&["-n", &ns.name, "addr", "add", "192.0.2.10/32", "dev", "lo"]);
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        "2001:db8::10/128",
        "dev",
        "lo",
    ]);
    ns
}

#[test]
fn addresses_of_a_real_netns_are_listed() {
    if !is_root("addresses_of_a_real_netns_are_listed") {
        return;
    }
    let ns = netns_with_pod_ip("addrs");
    let addrs = netns_addresses(&Path::new("/var/run/netns").join(&ns.name)).expect("dump");
    assert!(
        addrs.contains(&"192.0.2.10".parse().expect("ip")),
        "{addrs:?}"
    );
    assert!(
        addrs.contains(&"2001:db8::10".parse().expect("ip")),
        "{addrs:?}"
    );
}

#[test]
fn netns_of_a_running_pod_process_is_found_by_uid_and_ip() {
    if !is_root("netns_of_a_running_pod_process_is_found_by_uid_and_ip") {
        return;
    }
    let ns = netns_with_pod_ip("scan");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sleep", "30"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep in netns");
    let child = ChildGuard(child);
    let child_netns = PathBuf::from(format!("/proc/{}/ns/net", child.0.id()));
    // `ip netns exec` enters the namespace before exec'ing sleep; wait until it has.
    let target = fs::metadata(Path::new("/var/run/netns").join(&ns.name))
        .expect("netns file")
        .ino();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while fs::metadata(&child_netns).map(|m| m.ino()).ok() != Some(target) {
        assert!(
            std::time::Instant::now() < deadline,
            "child never entered the netns"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // The cgroup of a real process cannot be faked without moving it in the host's cgroup tree, so the
    // scanned tree is fake except for the namespace links: the real host netns and the child's netns.
    let fake = FakeProc::new();
    fs::remove_file(fake.path_of(1)).expect("rm");
    symlink("/proc/1/ns/net", fake.path_of(1)).expect("symlink");
    fake.process_linking(4242, &systemd(SYSTEMD_UID, "pause"), 100, &child_netns);
    // An older process of the same pod that sits in the host netns must be skipped.
    fake.process_linking(
        4000,
        &cgroupfs(UID, "hostnet"),
        1,
        Path::new("/proc/1/ns/net"),
    );

    let pod_ip: IpAddr = "192.0.2.10".parse().expect("ip");
    assert_eq!(
        find_pod_netns(&fake.root(), UID, &[pod_ip]),
        Some(fake.path_of(4242))
    );
    let other_ip: IpAddr = "192.0.2.99".parse().expect("ip");
    assert_eq!(find_pod_netns(&fake.root(), UID, &[other_ip]), None);
}

/// A fake process for the kubelet scan: `comm` (when given), a `stat` naming `stat_name`, and a `status`
/// with `Uid: <real> <effective> <saved> <fs>`.
fn named_process(fake: &FakeProc, pid: u32, comm: Option<&str>, stat_name: &str, uids: [u32; 4]) {
    let dir = fake.root().join(pid.to_string());
    fs::create_dir_all(&dir).expect("mkdir");
    if let Some(comm) = comm {
        fs::write(dir.join("comm"), format!("{comm}\n")).expect("write comm");
    }
    fs::write(dir.join("stat"), format!("{pid} ({stat_name}) S 1 2 3\n")).expect("write stat");
    let [r, e, s, f] = uids;
    fs::write(
        dir.join("status"),
        format!("Name:\t{stat_name}\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t{r}\t{e}\t{s}\t{f}\nGid:\t0\t0\t0\t0\n"),
    )
    .expect("write status");
}

#[test]
fn kubelet_uid_is_the_real_uid_of_the_kubelet_process() {
    let fake = FakeProc::new();
    named_process(&fake, 300, Some("containerd"), "containerd", [0; 4]);
    named_process(&fake, 700, Some("kubelet"), "kubelet", [1500, 0, 0, 0]);
    assert_eq!(find_kubelet_uid(&fake.root()), Some(1500));
}

#[test]
fn kubelite_and_k3s_count_as_kubelet() {
    for name in ["kubelite", "k3s", "k3s-server", "k3s-agent"] {
        let fake = FakeProc::new();
        named_process(&fake, 50, Some(name), name, [7, 7, 7, 7]);
        assert_eq!(find_kubelet_uid(&fake.root()), Some(7), "{name}");
    }
}

#[test]
fn kubelet_is_recognised_from_stat_when_comm_is_unreadable() {
    let fake = FakeProc::new();
    named_process(&fake, 88, None, "kubelet", [0, 0, 0, 0]);
    assert_eq!(find_kubelet_uid(&fake.root()), Some(0));
}

#[test]
fn no_kubelet_process_means_no_uid() {
    let fake = FakeProc::new();
    named_process(&fake, 10, Some("kubelet-helper"), "kubelet-helper", [0; 4]);
    named_process(&fake, 11, Some("mykubelet"), "mykubelet", [0; 4]);
    assert_eq!(find_kubelet_uid(&fake.root()), None);
    assert_eq!(find_kubelet_uid(Path::new("/nonexistent/proc")), None);
}

#[test]
fn with_several_kubelets_the_lowest_pid_wins_and_a_broken_status_is_skipped() {
    let fake = FakeProc::new();
    named_process(&fake, 20, Some("kubelet"), "kubelet", [0; 4]);
    fs::write(fake.root().join("20/status"), "Name:\tkubelet\n").expect("write");
    named_process(&fake, 900, Some("kubelet"), "kubelet", [33, 0, 0, 0]);
    named_process(&fake, 1000, Some("kubelet"), "kubelet", [44, 0, 0, 0]);
    assert_eq!(find_kubelet_uid(&fake.root()), Some(33));
}
