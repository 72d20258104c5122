//! The sandbox's processes: starting each component inside its namespace, finding them again from any
//! later command (or after a crash), and stopping them.
//!
//! Input: namespace paths, the `meshnode` binary, per-process arguments, environment and log files.
//! Output: detached processes (own process group, stdin closed, output to a log) that outlive the command
//! that started them. A process is found again by the network namespace it lives in: whatever runs inside a
//! sandbox namespace belongs to the sandbox, so `down` needs no PID file that a crash could leave stale.
//! Entering a namespace is done by the child itself (`meshnode sandbox enter NETNS -- CMD`, our own
//! `ip netns exec`): setns, then exec.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long stopped processes get between SIGTERM and SIGKILL (the proxy drains for 5 s at most).
const STOP_GRACE: Duration = Duration::from_secs(6);

/// A process in the sandbox, as found through /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its pid.
    pub pid: i32,
    /// Its command line, spaces between arguments.
    pub cmdline: String,
    /// The sandbox namespace it is in.
    pub netns: String,
}

/// Set in every process the sandbox starts, to its state directory: finds them again even if their
/// namespace is gone.
pub const MEMBER_ENV: &str = "MESHNODE_SANDBOX_MEMBER";

/// Starts `program args` inside the namespace at `netns`, detached, with `env` added, [`MEMBER_ENV`] set to
/// `member`, and output appended to `log`. Returns the pid.
pub fn spawn(
    meshnode: &Path,
    netns: &Path,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    member: &Path,
    log: &Path,
) -> std::io::Result<u32> {
    let out = File::options().create(true).append(true).open(log)?;
    let child = Command::new(meshnode)
        .arg("sandbox")
        .arg("enter")
        .arg(netns)
        .arg("--")
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(MEMBER_ENV, member)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group: a Ctrl-C meant for the command that started it does not reach it.
        .process_group(0)
        .spawn()?;
    Ok(child.id())
}

/// `meshnode sandbox enter`: moves this (still single-threaded) process into the namespace at `netns`
/// and replaces it with `command`. With `hosts`, the command also gets a private mount namespace in which
/// that file is bind-mounted over `/etc/hosts`, so service names resolve as they would in a pod.
/// Returns only on failure.
pub fn enter(netns: &Path, hosts: Option<&Path>, command: &[std::ffi::OsString]) -> anyhow::Error {
    let run = || -> anyhow::Result<std::convert::Infallible> {
        let Some(program) = command.first() else {
            anyhow::bail!("no command given (usage: ... -- COMMAND [ARGS])");
        };
        let ns = File::open(netns)
            .map_err(|e| anyhow::anyhow!("opening network namespace {}: {e}", netns.display()))?;
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow::anyhow!("entering {}: {e}", netns.display()))?;
        if let Some(hosts) = hosts {
            private_hosts(hosts)?;
        }
        let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(anyhow::Error::from);
        let argv: Vec<CString> = command.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
        let err = nix::unistd::execvp(&cstr(program)?, &argv).unwrap_err();
        anyhow::bail!("running {}: {err}", program.to_string_lossy())
    };
    match run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// A private mount namespace with `hosts` over `/etc/hosts`.
fn private_hosts(hosts: &Path) -> anyhow::Result<()> {
    use nix::mount::{mount, MsFlags};
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| anyhow::anyhow!("unsharing mounts: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("making mounts private: {e}"))?;
    mount(
        Some(hosts),
        "/etc/hosts",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("bind-mounting {} on /etc/hosts: {e}", hosts.display()))
}

/// The namespace inode of each named namespace that still exists, with its name.
fn netns_inodes(names: &[String]) -> Vec<(u64, String)> {
    // An unmounted leftover file lives on the directory's file system; a mounted one is on nsfs.
    let dir_dev = std::fs::metadata(crate::netsetup::NETNS_RUN_DIR).map_or(0, |m| m.dev());
    names
        .iter()
        .filter_map(|n| {
            let meta = std::fs::metadata(super::net::netns_path(n)).ok()?;
            (meta.dev() != dir_dev).then_some((meta.ino(), n.clone()))
        })
        .collect()
}

fn netns_inode_of(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_string_lossy();
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Whether process `pid` runs (a zombie does not).
pub fn alive(pid: i32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn is_member(pid: i32, marker: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker))
}

/// Every live process inside one of the namespaces `names`, or started by the sandbox whose state
/// directory is `member` (see [`MEMBER_ENV`]).
pub fn find(names: &[String], member: &Path) -> Vec<Found> {
    let inodes = netns_inodes(names);
    let mut marker = format!("{MEMBER_ENV}=").into_bytes();
    marker.extend_from_slice(member.as_os_str().as_bytes());
    let wanted: HashSet<u64> = inodes.iter().map(|(i, _)| *i).collect();
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let ino = netns_inode_of(pid).unwrap_or(0);
        if wanted.contains(&ino) || is_member(pid, &marker) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    b.split(|c| *c == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let netns = inodes
                .iter()
                .find(|(i, _)| *i == ino)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            out.push(Found {
                pid,
                cmdline,
                netns,
            });
        }
    }
    out.sort_by_key(|f| f.pid);
    out
}

/// Stops every process [`find`] finds: SIGTERM, then SIGKILL after [`STOP_GRACE`]. Returns how many
/// there were.
pub fn stop_all(names: &[String], member: &Path) -> usize {
    stop(find(names, member))
}

/// Stops the processes `found`: SIGTERM, then SIGKILL after [`STOP_GRACE`]. Returns how many there were.
pub fn stop(found: Vec<Found>) -> usize {
    for f in &found {
        let _ = kill(Pid::from_raw(f.pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while found.iter().any(|f| alive(f.pid)) && Instant::now() < deadline {
        reap();
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in found.iter().filter(|f| alive(f.pid)) {
        let _ = kill(Pid::from_raw(f.pid), Signal::SIGKILL);
    }
    while found.iter().any(|f| alive(f.pid)) && Instant::now() < deadline + STOP_GRACE {
        reap();
        std::thread::sleep(Duration::from_millis(20));
    }
    found.len()
}

/// Collects exited children of this process (when it started them itself), so they do not linger.
fn reap() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Whether something in the namespace of process `pid` listens on TCP `port`, IPv4 or IPv6 (read from
/// `/proc/<pid>/net/tcp` and `tcp6`, which show that namespace's sockets; no traffic is sent).
pub fn listening(pid: u32, port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|table| {
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            return false;
        };
        table.lines().skip(1).any(|l| {
            let mut cols = l.split_whitespace();
            let local = cols.nth(1).unwrap_or("");
            let state = cols.nth(1).unwrap_or("");
            local.ends_with(&suffix) && state == "0A"
        })
    })
}
