//! Access lines on a real proxy's stdout after real traffic: a client pod and a server pod in their own
//! network namespaces, each with a `meshnode proxy` process in dedicated mode (the client's outbound
//! captured by iptables), a call through the server's service VIP, and the lines both proxies print —
//! in ztunnel's text shape and, in a second pair of processes, with `LOG_FORMAT=json`. Also: a stdout that
//! nobody reads does not stall the data path. Needs root.

mod support;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::dedicated::{call, capture_outbound, serve_app, subnet, wait_ready};
use support::netns::{veth, KillOnDrop, Netns};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const SERVICE: &str = "server.default.svc.cluster.local";

/// Two pods joined by a veth, the server's app on :8080 behind the service VIP `.100:80`.
struct Pods {
    client: Netns,
    server: Netns,
    client_ip: String,
    server_ip: String,
    vip: SocketAddr,
    dir: tempfile::TempDir,
}

fn pods(third_octet: u8) -> Pods {
    let n = subnet();
    let client_ip = format!("10.{n}.{third_octet}.1");
    let server_ip = format!("10.{n}.{third_octet}.2");
    let vip: SocketAddr = format!("10.{n}.{third_octet}.100:80").parse().unwrap();
    let client = Netns::new("alc");
    let server = Netns::new("als");
    veth(
        &client,
        &format!("{client_ip}/24"),
        &server,
        &format!("{server_ip}/24"),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("local.yaml"),
        format!(
            r#"workloads:
- uid: cluster1//v1/Pod/default/client
  name: client-7d4f
  namespace: default
  serviceAccount: client
  workloadName: client
  canonicalName: client
  clusterId: cluster1
  trustDomain: cluster.local
  workloadIps: ["{client_ip}"]
  protocol: HBONE
- uid: cluster1//v1/Pod/default/server
  name: server-5c9b
  namespace: default
  serviceAccount: server
  workloadName: server
  canonicalName: server
  clusterId: cluster1
  trustDomain: cluster.local
  workloadIps: ["{server_ip}"]
  protocol: HBONE
  services:
    "default/{SERVICE}": {{80: 8080}}
services:
- name: server
  namespace: default
  hostname: {SERVICE}
  vips: ["/{vip_ip}"]
  ports: {{80: 8080}}
"#,
            vip_ip = vip.ip(),
        ),
    )
    .unwrap();
    serve_app(&server, "0.0.0.0:8080".parse().unwrap());
    Pods {
        client,
        server,
        client_ip,
        server_ip,
        vip,
        dir,
    }
}

impl Pods {
    /// Starts `meshnode proxy` for `workload` in `ns` with its stdout on `stdout`, its stderr in
    /// `<dir>/<name>.err`, and `env` on top of the dedicated-mode settings.
    fn proxy(
        &self,
        ns: &Netns,
        name: &str,
        workload: &str,
        stdout: Stdio,
        env: &[(&str, &str)],
    ) -> KillOnDrop {
        let dir = self.dir.path();
        let stderr = File::create(dir.join(format!("{name}.err"))).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_meshnode"),
                "proxy",
            ])
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", workload)
            .env("PACKET_MARK", "1337")
            .env("ENABLE_ORIG_SRC", "false")
            .env("RUST_LOG", "info")
            .env("LOCAL_XDS_PATH", dir.join("local.yaml"))
            .env("XDS_ADDRESS", "")
            .env("MESHNODE_STATE_DIR", dir.join("state"))
            .env_remove("CA_CERTS_DIR")
            .env_remove("LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawning meshnode proxy");
        let proxy = KillOnDrop(child);
        wait_ready(ns, dir, &format!("{name}.err"));
        proxy
    }

    /// Both proxies, stdout to `<dir>/client.out` and `<dir>/server.out`, the client's outbound captured.
    fn proxies(&self, env: &[(&str, &str)]) -> [KillOnDrop; 2] {
        let out = |name: &str| Stdio::from(File::create(self.dir.path().join(name)).unwrap());
        let c = self.proxy(
            &self.client,
            "client",
            "default/client-7d4f/client",
            out("client.out"),
            env,
        );
        let s = self.proxy(
            &self.server,
            "server",
            "default/server-5c9b/server",
            out("server.out"),
            env,
        );
        capture_outbound(&self.client);
        [c, s]
    }

    /// The first line of `<dir>/<file>` containing `needle`, once the proxy has written it.
    fn line(&self, file: &str, needle: &str) -> String {
        let path = self.dir.path().join(file);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in {file}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Calls the service VIP from the client pod; the reply.
    fn call_service(&self) -> String {
        let reply = call(&self.client, self.vip).expect("call through both proxies");
        assert!(reply.ends_with("say hello\n"), "{reply:?}");
        reply
    }
}

/// A field's value, and whether the text shape quoted it (strings) or not (numbers, addresses).
#[derive(Debug, Clone, PartialEq)]
struct Field {
    key: String,
    value: String,
    quoted: bool,
}

/// A text line: time, level, scope and message, then its `key=value` fields in order.
fn parse_text(line: &str) -> ([String; 4], Vec<Field>) {
    let cols: Vec<&str> = line.splitn(5, '\t').collect();
    assert_eq!(
        cols.len(),
        5,
        "not time/level/scope/message/fields: {line:?}"
    );
    let mut fields = Vec::new();
    let mut rest = cols[4];
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').expect("key=value");
        let (value, quoted, tail) = match after.strip_prefix('"') {
            Some(q) => {
                let mut value = String::new();
                let mut chars = q.char_indices();
                let end = loop {
                    match chars.next().expect("closing quote") {
                        (_, '\\') => value.push(chars.next().unwrap().1),
                        (i, '"') => break i + 1,
                        (_, c) => value.push(c),
                    }
                };
                (value, true, &q[end..])
            }
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_string(), false, &after[end..])
            }
        };
        fields.push(Field {
            key: key.to_string(),
            value,
            quoted,
        });
        rest = tail.strip_prefix(' ').unwrap_or(tail);
    }
    let head = [cols[0], cols[1], cols[2], cols[3]].map(str::to_string);
    (head, fields)
}

/// The access line every field of which is known, in ztunnel's order: `(key, value, quoted)`.
fn expected(
    p: &Pods,
    direction: &str,
    sent: usize,
    recv: usize,
) -> Vec<(&'static str, String, bool)> {
    vec![
        ("src.addr", p.client_ip.clone(), false),
        ("src.workload", "client-7d4f".into(), true),
        ("src.namespace", "default".into(), true),
        ("src.identity", CLIENT_ID.into(), true),
        ("src.cluster", "cluster1".into(), true),
        ("dst.addr", format!("{}:15008", p.server_ip), false),
        ("dst.hbone_addr", format!("{}:8080", p.server_ip), false),
        ("dst.service", SERVICE.into(), true),
        ("dst.workload", "server-5c9b".into(), true),
        ("dst.namespace", "default".into(), true),
        ("dst.identity", SERVER_ID.into(), true),
        ("dst.cluster", "cluster1".into(), true),
        ("direction", direction.into(), true),
        ("bytes_sent", sent.to_string(), false),
        ("bytes_recv", recv.to_string(), false),
    ]
}

/// Checks a parsed line against [`expected`] (`src.addr` up to its port; `duration` last, in ms).
fn check(fields: &[(String, String, bool)], want: &[(&str, String, bool)], line: &str) {
    assert_eq!(fields.len(), want.len() + 1, "{line}");
    for ((k, v, q), (wk, wv, wq)) in fields.iter().zip(want) {
        assert_eq!(k, wk, "{line}");
        if *wk == "src.addr" {
            assert!(v.starts_with(&format!("{wv}:")), "{k}={v}: {line}");
        } else {
            assert_eq!(v, wv, "{k}: {line}");
        }
        assert_eq!(q, wq, "{k} quoted: {line}");
    }
    let (k, v, q) = fields.last().unwrap();
    assert_eq!(k, "duration", "{line}");
    assert!(v.ends_with("ms") && *q, "{line}");
}

fn is_time(t: &str) -> bool {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok()
        && t.ends_with('Z')
}

#[test]
fn access_lines_name_both_ends_and_count_the_bytes_in_ztunnels_text_shape() {
    if !support::root_or_skip(
        "access_lines_name_both_ends_and_count_the_bytes_in_ztunnels_text_shape",
    ) {
        return;
    }
    let p = pods(10);
    let _proxies = p.proxies(&[]);
    let reply = p.call_service();
    let sent = b"hello\n".len();

    for (file, direction, bytes_sent, bytes_recv) in [
        ("client.out", "outbound", sent, reply.len()),
        ("server.out", "inbound", reply.len(), sent),
    ] {
        let line = p.line(file, "connection complete");
        let ([time, level, scope, message], fields) = parse_text(&line);
        assert!(is_time(&time), "{line}");
        assert_eq!(
            [level.as_str(), &scope, &message],
            ["info", "access", "connection complete"],
            "{line}"
        );
        let fields: Vec<_> = fields
            .into_iter()
            .map(|f| (f.key, f.value, f.quoted))
            .collect();
        check(
            &fields,
            &expected(&p, direction, bytes_sent, bytes_recv),
            &line,
        );
    }
}

#[test]
fn access_lines_are_flat_json_objects_with_the_same_fields_under_log_format_json() {
    if !support::root_or_skip(
        "access_lines_are_flat_json_objects_with_the_same_fields_under_log_format_json",
    ) {
        return;
    }
    let p = pods(11);
    let _proxies = p.proxies(&[("LOG_FORMAT", "json")]);
    let reply = p.call_service();
    let sent = b"hello\n".len();

    for (file, direction, bytes_sent, bytes_recv) in [
        ("client.out", "outbound", sent, reply.len()),
        ("server.out", "inbound", reply.len(), sent),
    ] {
        let line = p.line(file, "connection complete");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let obj = v.as_object().expect("an object");
        assert_eq!(obj["level"], "info", "{line}");
        assert_eq!(obj["scope"], "access", "{line}");
        assert_eq!(obj["message"], "connection complete", "{line}");
        assert!(is_time(obj["time"].as_str().unwrap()), "{line}");
        // Flat: every value a string, except the byte counts, which are numbers.
        let want: Vec<_> = expected(&p, direction, bytes_sent, bytes_recv)
            .into_iter()
            .map(|(k, v, _)| (k, v, !k.starts_with("bytes_")))
            .collect();
        let mut fields = Vec::new();
        for (k, _, _) in &want {
            let got = obj.get(*k).unwrap_or_else(|| panic!("no {k}: {line}"));
            let value = match got {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                other => panic!("{k} is {other}: {line}"),
            };
            fields.push((k.to_string(), value, got.is_string()));
        }
        let duration = obj["duration"].as_str().expect("duration").to_string();
        fields.push(("duration".into(), duration, true));
        check(&fields, &want, &line);
        // Nothing else but the four head keys.
        assert_eq!(obj.len(), 4 + fields.len(), "{line}");
    }
}

/// A pipe whose read end the test holds and does not read, shrunk to one page, for a proxy's stdout.
fn stalled_pipe() -> (OwnedFd, Stdio) {
    let (read, write) = nix::unistd::pipe().unwrap();
    nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    (read, Stdio::from(write))
}

#[test]
fn a_stdout_nobody_reads_does_not_stall_traffic_and_the_dropped_lines_are_reported() {
    if !support::root_or_skip(
        "a_stdout_nobody_reads_does_not_stall_traffic_and_the_dropped_lines_are_reported",
    ) {
        return;
    }
    let p = pods(12);
    // Four lines of buffer and a one-page pipe on each proxy: a few calls' access lines fill both.
    let env = [("MESHNODE_LOG_BUFFER_LINES", "4")];
    let (client_out, client_w) = stalled_pipe();
    let (server_out, server_w) = stalled_pipe();
    let _c = p.proxy(
        &p.client,
        "client",
        "default/client-7d4f/client",
        client_w,
        &env,
    );
    let _s = p.proxy(
        &p.server,
        "server",
        "default/server-5c9b/server",
        server_w,
        &env,
    );
    capture_outbound(&p.client);

    // Far more lines than pipe and buffer hold (each line is a few hundred bytes): every call still
    // goes through both proxies. A proxy that waited for stdout would stop answering after the first few.
    for _ in 0..200 {
        p.call_service();
    }

    // Now read: the writer finishes the batch it was stuck on and reports what it had to drop.
    for (name, out) in [("client", client_out), ("server", server_out)] {
        let reader = BufReader::new(File::from(out));
        let report = reader
            .lines()
            .map(|l| l.unwrap())
            .find(|l| l.contains("log lines dropped"))
            .unwrap_or_else(|| panic!("{name}: stdout ended without a report"));
        let (_, fields) = parse_text(&report);
        let dropped: u64 = fields
            .iter()
            .find(|f| f.key == "dropped")
            .map(|f| f.value.parse().unwrap())
            .unwrap_or_else(|| panic!("{report}"));
        assert!(dropped > 0, "{name}: {report}");
        let level = report.split('\t').nth(1);
        assert_eq!(level, Some("warn"), "{report}");
    }
}
