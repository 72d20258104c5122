//! `sandbox upgrade`: each node's proxy swapped for a new process while traffic runs, as a DaemonSet's
//! rolling update swaps a node's ztunnel — and nothing open is reset.
//!
//! Input: a sandbox that is up, and optionally the one node to upgrade. Output: a report per node (the
//! new proxy's start, how many connections the old one handed over and how soon it left) and for the
//! traffic that ran throughout: connections kept alive across the swap (productpage → reviews, node1 →
//! node2, and reviews → ratings, node2 → node1; one request every 20 ms each) and new connections opened
//! one after another (productpage → reviews). `true` when no request failed.
//!
//! A swap: the new proxy starts in the node's namespace beside the old one (readiness, metrics and admin
//! on the other of two port sets, since they share the namespace; the pods' ports are shared through
//! SO_REUSEPORT), gets the node's pods from the CNI agent, and listens on the node's hand-over socket;
//! then the old one gets SIGTERM, hands its resumable connections over and exits.
//!
//! `--restart`: the old proxy gets SIGTERM first and exits, handing its connections to the node's CNI
//! agent (nobody else listens yet); the new one starts after it, and the agent hands them on once it
//! listens. Kept-alive connections are answered throughout; new connections find no proxy for the gap
//! (refused, as with ztunnel), which the report counts apart.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::apps::{self, KeptAlive, Outcome};
use super::model::Model;
use super::{net, procs, Error, Options};

/// The two port sets a node's proxy alternates between: readiness, metrics, admin.
const PORTS: [[u16; 3]; 2] = [[15021, 15020, 15000], [15121, 15120, 15100]];
/// How long the old proxy may take to leave (its drain deadline is ztunnel's 5 s).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The name suffix of the traffic thread that opens a new connection per request.
const NEW_CONNECTIONS: &str = "(new connections)";
/// Pause between the requests of each traffic thread.
const PACE: Duration = Duration::from_millis(20);
/// Timeout of one request.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What one traffic thread saw.
#[derive(Default)]
struct Seen {
    ok: u64,
    failures: Vec<String>,
}

/// Traffic running while the proxies are swapped.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, std::thread::JoinHandle<()>)>,
    seen: Vec<Arc<Mutex<Seen>>>,
}

impl Traffic {
    /// Kept-alive connections `from` → `service` (opened now, inside `from`'s namespace), and a thread of
    /// new connections from productpage.
    fn start(model: &Model) -> Result<Traffic, Error> {
        let mut t = Traffic {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            seen: Vec::new(),
        };
        for (from, service, path) in [
            ("productpage", "reviews", "/reviews/0"),
            ("reviews-v1", "ratings", "/ratings/0"),
        ] {
            let (pod, dst) = endpoint(model, from, service)?;
            let ns = net::open(&net::pod_netns(model, &pod))?;
            let conn = ns
                .run_on_thread(move || KeptAlive::open(dst, CALL_TIMEOUT))
                .map_err(|e| Error::Refused(format!("entering {}: {e}", pod.key())))?
                .map_err(|e| Error::Refused(format!("{} → {service}: {e}", pod.key())))?;
            let name = format!("{} → {service} (kept alive)", pod.key());
            t.spawn(name, conn, path);
        }
        let (pod, dst) = endpoint(model, "productpage", "reviews")?;
        let ns = net::open(&net::pod_netns(model, &pod))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, record) = (t.stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let _ = ns.run_on_thread(move || {
                while !stop.load(Ordering::Relaxed) {
                    let outcome = apps::get(dst, "/reviews/0", CALL_TIMEOUT);
                    note(&record, outcome);
                    std::thread::sleep(PACE);
                }
            });
        });
        t.threads
            .push((format!("{} → reviews (new connections)", pod.key()), thread));
        t.seen.push(seen);
        Ok(t)
    }

    fn spawn(&mut self, name: String, mut conn: KeptAlive, path: &'static str) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, record) = (self.stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let answered = note(&record, conn.get(path));
                if !answered {
                    // The connection is gone: nothing more to send on it.
                    return;
                }
                std::thread::sleep(PACE);
            }
        });
        self.threads.push((name, thread));
        self.seen.push(seen);
    }

    /// Stops the threads; each one's name, requests answered and failures.
    fn finish(self) -> Vec<(String, u64, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .zip(self.seen)
            .map(|((name, thread), seen)| {
                let _ = thread.join();
                let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
                (name, seen.ok, seen.failures)
            })
            .collect()
    }
}

/// Records an outcome; whether it was a 200.
fn note(seen: &Mutex<Seen>, outcome: Outcome) -> bool {
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Outcome::Answered { status: 200, .. } => {
            seen.ok += 1;
            true
        }
        other => {
            seen.failures.push(other.to_string());
            false
        }
    }
}

/// The pod `from` and the address of `service` (its VIP and port).
fn endpoint(
    model: &Model,
    from: &str,
    service: &str,
) -> Result<(super::model::Pod, SocketAddr), Error> {
    let pod = model.find_pod(from).map_err(Error::Refused)?.clone();
    let svc = model
        .find_service(service)
        .ok_or_else(|| Error::Refused(format!("no service {service}")))?;
    Ok((pod, SocketAddr::new(svc.vip.into(), svc.port)))
}

/// One node's swap, as reported.
struct Swap {
    node: String,
    new_pid: u32,
    readiness: u16,
    started_in: Duration,
    left_in: Duration,
    /// The old proxy's words about its hand-over.
    handed: String,
}

/// `sandbox upgrade [--node NODE]`; see the module header.
pub fn upgrade(
    opts: &Options,
    only: Option<&str>,
    restart: bool,
    out: &mut dyn Write,
) -> Result<bool, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let _lock = super::lock(opts)?;
    let model = super::require(opts)?;
    let nodes: Vec<_> = match only {
        None => model.nodes.iter().collect(),
        Some(name) => vec![model
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::Refused(format!("no node {name:?} in the sandbox")))?],
    };
    let _ = writeln!(
        out,
        "traffic: productpage → reviews and reviews-v1 → ratings on kept-alive connections, and new connections productpage → reviews, every {} ms",
        PACE.as_millis()
    );
    let traffic = Traffic::start(&model)?;
    // Some traffic before the first swap.
    std::thread::sleep(Duration::from_millis(500));
    let mut swaps = Vec::new();
    for node in nodes {
        let what = if restart {
            "stopping the proxy, then starting a new one"
        } else {
            "starting a new proxy beside the old one"
        };
        let _ = writeln!(out, "{}: {what}", node.name);
        match swap(opts, &model, node, restart) {
            Ok(s) if restart => {
                let _ = writeln!(
                    out,
                    "{}: the old proxy {} and left {} ms after SIGTERM; the new one (pid {}) was ready {:.1} s later and the agent handed them on",
                    s.node,
                    s.handed,
                    s.left_in.as_millis(),
                    s.new_pid,
                    s.started_in.as_secs_f64(),
                );
                swaps.push(s);
            }
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "{}: new proxy (pid {}) ready on :{} in {:.1} s; the old one {} and left {} ms after SIGTERM",
                    s.node,
                    s.new_pid,
                    s.readiness,
                    s.started_in.as_secs_f64(),
                    s.handed,
                    s.left_in.as_millis()
                );
                swaps.push(s);
            }
            Err(e) => {
                let _ = traffic.finish();
                return Err(e);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (mut failed, mut refused_new) = (0, 0);
    for (name, ok, failures) in traffic.finish() {
        // A restart has a gap: new connections find no proxy then. Open ones must not notice.
        if restart && name.ends_with(NEW_CONNECTIONS) {
            refused_new += failures.len();
        } else {
            failed += failures.len();
        }
        let _ = writeln!(
            out,
            "  {name}: {ok} answered, {} failed{}",
            failures.len(),
            failures
                .first()
                .map(|f| format!(" (first: {f})"))
                .unwrap_or_default()
        );
    }
    if failed == 0 && restart {
        let _ = writeln!(
            out,
            "nothing open was reset: every request on a kept-alive connection was answered ({refused_new} new connections found no proxy during the restart's gap; a rolling update has none)"
        );
    } else if failed == 0 {
        let _ = writeln!(
            out,
            "nothing was reset: every request during the upgrade was answered"
        );
    } else {
        let _ = writeln!(out, "{failed} requests failed during the upgrade");
    }
    Ok(failed == 0)
}

/// Starts a new proxy on `node`, waits until it serves and takes hand-overs, stops the old one and waits
/// for it to leave; with `restart`, stops the old one first.
fn swap(
    opts: &Options,
    model: &Model,
    node: &super::model::Node,
    restart: bool,
) -> Result<Swap, Error> {
    let ns_name = net::node_netns(model, &node.name);
    let proxies: Vec<_> = procs::find(std::slice::from_ref(&ns_name), &opts.dir())
        .into_iter()
        .filter(|f| f.netns == ns_name && f.cmdline.ends_with(" proxy"))
        .collect();
    let [old] = &proxies[..] else {
        return Err(Error::Refused(format!(
            "{}: expected one running proxy, found {}",
            node.name,
            proxies.len()
        )));
    };
    let old_pid = old.pid;
    // The set the old one does not use.
    let [readiness, metrics, admin] = if procs::listening(old_pid as u32, PORTS[0][0]) {
        PORTS[1]
    } else {
        PORTS[0]
    };
    let mut env = super::proxy_env(opts, model, node);
    env.push(("MESHNODE_READINESS_PORT", readiness.to_string()));
    env.push(("MESHNODE_METRICS_PORT", metrics.to_string()));
    env.push(("PROXY_CONFIG", format!("proxyAdminPort: {admin}")));
    let component = format!("{}-proxy", node.name);
    let log = opts.log(&component);
    let ns = net::netns_path(&ns_name);
    let node_ns = net::open(&ns_name)?;
    let start_new = || -> Result<(u32, Duration), Error> {
        let from = log_len(&log);
        let started = Instant::now();
        let new_pid = super::start(opts, &ns, &["proxy".into()], &env, &component)?;
        super::wait(opts, "the new node proxy", &component, || {
            super::proxy_ready_on(&node_ns, readiness)
                && log_since(&log, from).contains("taking connections handed over")
        })?;
        Ok((new_pid, started.elapsed()))
    };
    let mut started = None;
    if !restart {
        started = Some(start_new()?);
    }
    let from = log_len(&log);
    let told = Instant::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    while procs::alive(old_pid) {
        if told.elapsed() > LEAVE_TIMEOUT {
            return Err(Error::Refused(format!(
                "{}: the old proxy (pid {old_pid}) did not leave within {}s",
                node.name,
                LEAVE_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let left_in = told.elapsed();
    let said = log_since(&log, from);
    let (new_pid, started_in) = match started {
        Some(s) => s,
        None => start_new()?,
    };
    let handed = said
        .lines()
        .find(|l| {
            l.contains("resumable connections handed over")
                || l.contains("resumable connections handed to the CNI agent")
        })
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or("?")
                    .to_string()
            };
            let to = if l.contains("CNI agent") {
                "to the CNI agent"
            } else {
                "over"
            };
            format!(
                "handed {} connections {to} ({} closed; {} not resumable left to drain)",
                field("taken="),
                field("closed="),
                field("draining=")
            )
        })
        .unwrap_or_else(|| "handed nothing over".into());
    Ok(Swap {
        node: node.name.clone(),
        new_pid,
        readiness,
        started_in,
        left_in,
        handed,
    })
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What `path` says after its first `from` bytes.
fn log_since(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}
