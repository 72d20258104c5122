//! Network namespaces for tests: uniquely named, joined by veths, removed on drop (also when the test
//! panics). Tests use `ip` from iproute2 to build them; the product itself never shells out.

use std::fs::File;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop.
pub struct Netns {
    pub name: String,
}

fn ip_cmd(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Netns {
    /// Creates `mn<pid>x<n><tag>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mn{}x{}{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            tag
        );
        ip_cmd(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip_cmd(&all)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Starts a long-running command inside the namespace.
    pub fn spawn(&self, program: &str, args: &[&str], env: &[(&str, &str)], log: File) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning a process in the namespace")
    }

    /// The whole answer (head and body) to `GET path` on 127.0.0.1:`port` inside the namespace, if it is 200.
    pub fn http_get(&self, port: u16, path: &str) -> Option<String> {
        self.http_answer(port, path)
            .filter(|out| out.starts_with("HTTP/1.1 200"))
    }

    /// The whole answer (head and body) to `GET path` on 127.0.0.1:`port` in this namespace, whatever
    /// its status; `None` when nothing answers.
    pub fn http_answer(&self, port: u16, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        self.run(move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let _ = s.write_all(request.as_bytes());
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            Some(out)
        })
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).expect("opening the namespace");
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Joins `a` and `b` with a veth pair, addressing them `a_cidr` and `b_cidr` (e.g. `10.1.2.1/24`).
/// Returns the two interface names.
pub fn veth(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str) -> (String, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (va, vb) = (
        format!("mna{}x{n}", std::process::id() % 100000),
        format!("mnb{}x{n}", std::process::id() % 100000),
    );
    ip_cmd(&[
        "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_cidr, "dev", &va]);
    b.ip(&["addr", "add", b_cidr, "dev", &vb]);
    a.ip(&["link", "set", &va, "up"]);
    b.ip(&["link", "set", &vb, "up"]);
    (va, vb)
}

/// Kills a child process on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
