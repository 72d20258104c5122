//! Pods in their own network namespaces with one node proxy each in dedicated mode, started exactly as
//! ztunnel is (environment variables and its local config format only), so that either meshnode or a
//! ztunnel binary can sit on either side. Outbound capture is an iptables REDIRECT in the client pod (the
//! tests' stand-in for the CNI's rules).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::netns::{KillOnDrop, Netns};

/// Which node proxy implementation runs a pod's proxy.
#[derive(Debug, Clone)]
pub enum System {
    /// `meshnode proxy`, signing with the built-in CA in `state_dir`, or with the plug-in CA in `ca_dir`.
    Meshnode {
        state_dir: PathBuf,
        ca_dir: Option<PathBuf>,
    },
    /// A ztunnel binary built with `--features testing` (`FAKE_CA=true` signs with its test CA).
    Ztunnel { bin: PathBuf },
}

/// Where a proxy gets its workloads, policies and certificate.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// ztunnel's local config file (`LOCAL_XDS_PATH`), certificates from the system's own CA.
    Local(&'a Path),
    /// xDS and the CA at `address` (`https://ip:port`), trusting `root`, authenticating with `token`;
    /// `node` is the proxy's `NODE_NAME`.
    ControlPlane {
        address: &'a str,
        root: &'a Path,
        token: &'a str,
        node: &'a str,
    },
}

/// Starts the node proxy of `workload` (`namespace/name/serviceAccount`) in `ns`, logging to `<dir>/<log>`.
pub fn start_proxy(
    system: &System,
    ns: &Netns,
    workload: &str,
    config: &Path,
    dir: &Path,
    log: &str,
) -> KillOnDrop {
    start_proxy_from(system, ns, workload, Source::Local(config), dir, log)
}

/// [`start_proxy`] with more environment (`NETWORK`, say).
pub fn start_proxy_with(
    system: &System,
    ns: &Netns,
    workload: &str,
    config: &Path,
    dir: &Path,
    log: &str,
    extra: &[(&str, String)],
) -> KillOnDrop {
    spawn_proxy(system, ns, workload, Source::Local(config), dir, log, extra)
}

/// [`start_proxy`] with its state from `source`.
pub fn start_proxy_from(
    system: &System,
    ns: &Netns,
    workload: &str,
    source: Source<'_>,
    dir: &Path,
    log: &str,
) -> KillOnDrop {
    spawn_proxy(system, ns, workload, source, dir, log, &[])
}

fn spawn_proxy(
    system: &System,
    ns: &Netns,
    workload: &str,
    source: Source<'_>,
    dir: &Path,
    log: &str,
    extra: &[(&str, String)],
) -> KillOnDrop {
    let log_file = std::fs::File::create(dir.join(log)).unwrap();
    let mut env: Vec<(&str, &str)> = vec![
        ("PROXY_MODE", "dedicated"),
        ("PROXY_WORKLOAD_INFO", workload),
        ("PACKET_MARK", "1337"),
        ("ENABLE_ORIG_SRC", "false"),
        ("RUST_LOG", "info"),
    ];
    let local_ca = match source {
        Source::Local(config) => {
            env.extend([
                ("LOCAL_XDS_PATH", config.to_str().unwrap()),
                ("XDS_ADDRESS", ""),
            ]);
            true
        }
        Source::ControlPlane {
            address,
            root,
            token,
            node,
        } => {
            let root = root.to_str().unwrap();
            env.extend([
                ("XDS_ADDRESS", address),
                ("CA_ADDRESS", address),
                ("XDS_ROOT_CA", root),
                ("CA_ROOT_CA", root),
                ("AUTH_TOKEN", token),
                ("NODE_NAME", node),
            ]);
            false
        }
    };
    let (program, args): (&Path, &[&str]) = match system {
        System::Meshnode { state_dir, ca_dir } => {
            env.push(("MESHNODE_STATE_DIR", state_dir.to_str().unwrap()));
            if let (Some(ca), true) = (ca_dir, local_ca) {
                env.push(("CA_CERTS_DIR", ca.to_str().unwrap()));
            }
            (Path::new(env!("CARGO_BIN_EXE_meshnode")), &["proxy"])
        }
        System::Ztunnel { bin } => {
            if local_ca {
                env.push(("FAKE_CA", "true"));
            }
            (bin.as_path(), &[])
        }
    };
    env.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
    KillOnDrop(ns.spawn(program.to_str().unwrap(), args, &env, log_file))
}

/// Waits until the proxy in `ns` answers ready on :15021; panics with its log after 20 s.
pub fn wait_ready(ns: &Netns, dir: &Path, log: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = ns.run(move || {
            let Ok(mut s) = TcpStream::connect("127.0.0.1:15021") else {
                return false;
            };
            let _ =
                s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.1 200")
        });
        if ok {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
            panic!("proxy in {} never became ready; its log:\n{log}", ns.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The application: on every connection, answers `app saw <peer> say <first line>` and closes.
pub fn serve_app(ns: &Netns, addr: SocketAddr) {
    let app = ns.run(move || TcpListener::bind(addr).unwrap());
    std::thread::spawn(move || {
        for s in app.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = s.peer_addr().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
                let _ = (&s).write_all(format!("app saw {peer} say {line}").as_bytes());
            });
        }
    });
}

/// Connects from inside `ns`, says `hello`, returns the answer (or the error).
pub fn call(ns: &Netns, dst: SocketAddr) -> std::io::Result<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"hello\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })
}

/// Runs an iptables-family command in `ns`, panicking with its stderr on failure.
pub fn iptables(ns: &Netns, cmd: &str, rule: &[&str]) {
    let out = ns.exec(cmd, rule);
    assert!(
        out.status.success(),
        "{cmd} {rule:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Redirects `ns`'s outbound TCP (IPv4 and IPv6, not loopback, not marked 1337 by the proxy) to :15001.
pub fn capture_outbound(ns: &Netns) {
    for (cmd, lo) in [("iptables", "127.0.0.0/8"), ("ip6tables", "::1/128")] {
        iptables(
            ns,
            cmd,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "!",
                "-d",
                lo,
                "-m",
                "mark",
                "!",
                "--mark",
                "1337",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        );
    }
}

/// One workload in ztunnel's local config format (namespace `default`, HBONE).
pub fn workload_yaml(name: &str, sa: &str, ips: &[&str]) -> String {
    let ips = ips
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  trustDomain: cluster.local\n  workloadIps: [{ips}]\n  protocol: HBONE\n  node: node-{name}\n  services: {{}}\n"
    )
}

/// A per-process second octet for the tests' 10.x addresses, so parallel test binaries do not collide.
pub fn subnet() -> u8 {
    100 + (std::process::id() % 100) as u8
}
