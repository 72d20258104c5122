//! A fake Kubernetes API server for the CNI agent's end-to-end tests.
//!
//! Job: stand in for kube-apiserver for one `meshnode cni-agent` running in a node network namespace.
//! Input: the agent's requests — plain HTTP/1.1 on `127.0.0.1:<port>` *inside* that namespace (the listener
//! is bound from a thread that entered it, so the agent's loopback is the server's):
//! `GET /api/v1/namespaces` and `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>` (lists, and with
//! `watch=true` chunked watch streams), and `PATCH /api/v1/namespaces/<ns>/pods/<name>/status` (JSON merge
//! patch). And the test's changes: [`FakeKube::put_namespace`], [`FakeKube::put_pod`],
//! [`FakeKube::delete_pod`], … each of which bumps the resourceVersion and emits a watch event.
//! Output: lists, watch events, patched pods; for assertions the stored objects and the patches received.
//!
//! Like the real API server (its watch cache), every event is kept in a bounded log, and a watch that starts
//! from resourceVersion R first gets the logged events after R: a client that lost its watch (or the server,
//! see [`FakeKube::stop`]) resumes without missing anything. A watch from before the oldest logged event gets
//! `410 Gone`, so the client relists. [`FakeKube::stop`] closes the listener and every connection (the agent
//! sees "connection refused"); [`FakeKube::resume`] listens again on the same port with the same state.
//! Served from plain threads (one per connection, at most [`MAX_CONNECTIONS`]).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::netns::Netns;

/// Events kept for watches that resume from an older resourceVersion (the API server's watch cache).
const EVENT_LOG: usize = 1024;
/// Events queued per watch before the watch is dropped as too slow (the client re-watches from the log).
const WATCH_QUEUE: usize = 256;
/// Open connections at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// Longest request line or header line accepted.
const MAX_LINE: u64 = 16 * 1024;
/// Largest request body accepted (merge patches are tiny).
const MAX_BODY: usize = 1024 * 1024;
/// Patches remembered for assertions.
const MAX_PATCHES: usize = 1024;
/// How often the accept loop and idle watch streams look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// The two kinds the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
}

/// One logged watch event.
struct Logged {
    rv: u64,
    kind: Kind,
    /// `spec.nodeName` of a pod, for field-selected watches.
    node: Option<String>,
    event: Value,
}

/// A live watch.
struct Watch {
    kind: Kind,
    node: Option<String>,
    tx: SyncSender<Value>,
}

/// A merge patch the server received.
#[derive(Debug, Clone)]
pub struct ReceivedPatch {
    /// The request path (`/api/v1/namespaces/<ns>/pods/<name>/status`).
    pub path: String,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The parsed body.
    pub body: Value,
    /// Whether it was refused (see [`FakeKube::refuse_patches`]).
    pub refused: bool,
}

#[derive(Default)]
struct ApiState {
    resource_version: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    log: VecDeque<Logged>,
    /// The newest resourceVersion dropped from `log`; a watch from before it gets 410 Gone.
    trimmed_upto: u64,
    watches: Vec<Watch>,
    patches: Vec<ReceivedPatch>,
    /// Patches are answered 503 (an API server overloaded or restarting).
    refuse_patches: bool,
}

impl ApiState {
    fn next_rv(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Logs an event and sends it to the matching watches; a watch that cannot take it is dropped.
    fn emit(&mut self, kind: Kind, kind_of_event: &str, object: &Value) {
        let rv = self.resource_version;
        let node = object["spec"]["nodeName"].as_str().map(str::to_string);
        let event = json!({ "type": kind_of_event, "object": object });
        self.watches.retain(|w| {
            if w.kind != kind || (w.node.is_some() && w.node != node) {
                return true;
            }
            match w.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            }
        });
        if self.log.len() == EVENT_LOG {
            if let Some(old) = self.log.pop_front() {
                self.trimmed_upto = old.rv;
            }
        }
        self.log.push_back(Logged {
            rv,
            kind,
            node,
            event,
        });
    }

    fn put_namespace(&mut self, mut ns: Value) {
        let Some(name) = ns["metadata"]["name"].as_str().map(str::to_string) else {
            return;
        };
        let event = if self.namespaces.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        ns["metadata"]["resourceVersion"] = json!(self.next_rv().to_string());
        self.namespaces.insert(name, ns.clone());
        self.emit(Kind::Namespace, event, &ns);
    }

    fn put_pod(&mut self, mut pod: Value) {
        let key = pod_key(&pod);
        let event = if self.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        pod["metadata"]["resourceVersion"] = json!(self.next_rv().to_string());
        self.pods.insert(key, pod.clone());
        self.emit(Kind::Pod, event, &pod);
    }

    fn list(&self, kind: Kind, node: Option<&str>) -> Value {
        let (items, list_kind): (Vec<Value>, _) = match kind {
            Kind::Namespace => (self.namespaces.values().cloned().collect(), "NamespaceList"),
            Kind::Pod => (
                self.pods
                    .values()
                    .filter(|p| node.is_none() || p["spec"]["nodeName"].as_str() == node)
                    .cloned()
                    .collect(),
                "PodList",
            ),
        };
        json!({
            "apiVersion": "v1", "kind": list_kind,
            "metadata": { "resourceVersion": self.resource_version.max(1).to_string() },
            "items": items,
        })
    }

    /// Starts a watch from `since`: the logged events after it, and a live feed from now on (both taken
    /// under one lock, so nothing is lost or repeated). `None` when `since` is older than the log (410).
    fn watch(
        &mut self,
        kind: Kind,
        node: Option<String>,
        since: Option<u64>,
    ) -> Option<(Vec<Value>, Receiver<Value>)> {
        let since = since.unwrap_or(self.resource_version);
        if since < self.trimmed_upto {
            return None;
        }
        let backlog = self
            .log
            .iter()
            .filter(|l| l.rv > since && l.kind == kind && (node.is_none() || l.node == node))
            .map(|l| l.event.clone())
            .collect();
        let (tx, rx) = mpsc::sync_channel(WATCH_QUEUE);
        self.watches.push(Watch { kind, node, tx });
        Some((backlog, rx))
    }
}

fn pod_key(pod: &Value) -> (String, String) {
    let field = |f: &str| pod["metadata"][f].as_str().unwrap_or_default().to_string();
    (field("namespace"), field("name"))
}

/// A Pod object as the API server holds it right after scheduling: no IP yet (phase Pending).
pub fn pod_object(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    service_account: &str,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "uid": uid, "labels": { "app": name } },
        "spec": { "nodeName": node, "serviceAccountName": service_account,
                  "containers": [ { "name": "app", "image": "app" } ] },
        "status": { "phase": "Pending" },
    })
}

/// The listening side: the accept thread and the connections it opened.
struct Server {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<BTreeMap<u64, TcpStream>>>,
}

impl Server {
    fn shut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in std::mem::take(&mut *self.conns.lock()) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// The fake API server; stops when dropped.
pub struct FakeKube {
    netns: PathBuf,
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    server: Option<Server>,
}

impl FakeKube {
    /// Listens on an ephemeral port of 127.0.0.1 inside `ns`.
    pub fn start(ns: &Netns) -> FakeKube {
        let netns = PathBuf::from(format!("/var/run/netns/{}", ns.name));
        let listener = bind_in(&netns, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
        let addr = listener.local_addr().expect("fake API address");
        let mut api = FakeKube {
            netns,
            addr,
            state: Arc::new(Mutex::new(ApiState::default())),
            server: None,
        };
        api.serve(listener);
        api
    }

    /// Where it listens (inside the namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials) to `path`.
    pub fn write_kubeconfig(&self, path: &Path) {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, config).expect("writing the kubeconfig");
    }

    /// Closes the listener and every connection: the agent's watches break and its requests are refused.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.shut();
        }
        // Their connections are gone; the senders go too, so nothing piles up.
        self.state.lock().watches.clear();
    }

    /// Listens again on the same address, with everything that changed meanwhile in the event log.
    pub fn resume(&mut self) {
        if self.server.is_some() {
            return;
        }
        let listener = bind_in(&self.netns, self.addr);
        self.serve(listener);
    }

    /// Whether it is serving.
    pub fn serving(&self) -> bool {
        self.server.is_some()
    }

    /// Creates or replaces namespace `name` with `labels`.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        self.state.lock().put_namespace(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "uid": format!("ns-{name}"), "labels": labels },
        }));
    }

    /// Creates or replaces a pod (see [`pod_object`]).
    pub fn put_pod(&self, pod: Value) {
        self.state.lock().put_pod(pod);
    }

    /// Changes a stored pod with `f` (a MODIFIED event). Panics if there is no such pod.
    pub fn modify_pod(&self, namespace: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut state = self.state.lock();
        let key = (namespace.to_string(), name.to_string());
        let mut pod = state
            .pods
            .get(&key)
            .cloned()
            .unwrap_or_else(|| panic!("no pod {namespace}/{name} in the fake API"));
        f(&mut pod);
        state.put_pod(pod);
    }

    /// What the kubelet reports once the sandbox is networked: the pod's IPs, phase Running.
    pub fn set_pod_ips(&self, namespace: &str, name: &str, ips: &[IpAddr]) {
        self.modify_pod(namespace, name, |pod| {
            let listed: Vec<Value> = ips
                .iter()
                .map(|ip| json!({ "ip": ip.to_string() }))
                .collect();
            pod["status"]["phase"] = json!("Running");
            pod["status"]["podIP"] = json!(ips.first().map(|ip| ip.to_string()));
            pod["status"]["podIPs"] = json!(listed);
        });
    }

    /// Deletes a pod (a DELETED event carrying its last state).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut state = self.state.lock();
        if let Some(mut pod) = state
            .pods
            .remove(&(namespace.to_string(), name.to_string()))
        {
            pod["metadata"]["resourceVersion"] = json!(state.next_rv().to_string());
            state.emit(Kind::Pod, "DELETED", &pod);
        }
    }

    /// The stored pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// An annotation of the stored pod.
    pub fn pod_annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        self.pod(namespace, name).and_then(|p| {
            p["metadata"]["annotations"][key]
                .as_str()
                .map(str::to_string)
        })
    }

    /// The merge patches received so far.
    pub fn patches(&self) -> Vec<ReceivedPatch> {
        self.state.lock().patches.clone()
    }

    /// While `on`, every patch is answered 503 Service Unavailable (and recorded as refused).
    pub fn refuse_patches(&self, on: bool) {
        self.state.lock().refuse_patches = on;
    }

    /// Live watches (the agent holds one on namespaces and one on pods once it has synced).
    pub fn watches(&self) -> usize {
        self.state.lock().watches.len()
    }

    fn serve(&mut self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<BTreeMap<u64, TcpStream>>> = Arc::default();
        let (state, stop2, conns2) = (self.state.clone(), stop.clone(), conns.clone());
        let accept = std::thread::spawn(move || accept_loop(listener, state, stop2, conns2));
        self.server = Some(Server {
            stop,
            accept: Some(accept),
            conns,
        });
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `addr` from a thread inside the namespace at `netns`, so the socket lives there.
fn bind_in(netns: &Path, addr: SocketAddr) -> TcpListener {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&netns).expect("opening the node namespace");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpListener::bind(addr)
    })
    .join()
    .expect("bind thread")
    .unwrap_or_else(|e| panic!("binding the fake API server on {addr}: {e}"))
}

fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<ApiState>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<BTreeMap<u64, TcpStream>>>,
) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(0);
    while !stop.load(Ordering::SeqCst) {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        let _ = conn.set_nonblocking(false);
        let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        {
            let mut open = conns.lock();
            if open.len() >= MAX_CONNECTIONS {
                let _ = conn.shutdown(Shutdown::Both);
                continue;
            }
            match conn.try_clone() {
                Ok(c) => open.insert(id, c),
                Err(_) => continue,
            };
        }
        let (state, stop, conns) = (state.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            serve_connection(conn, &state, &stop);
            conns.lock().remove(&id);
        });
    }
}

/// One request as read from the wire.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Serves requests on one connection until it closes; a watch streams until it ends, then closes it.
fn serve_connection(conn: TcpStream, state: &Mutex<ApiState>, stop: &AtomicBool) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut reader = BufReader::new(conn);
    while let Some(req) = read_request(&mut reader) {
        let watching = matches!(
            req.query.get("watch").map(String::as_str),
            Some("true" | "1")
        );
        let node = req
            .query
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("spec.nodeName="))
            .map(str::to_string);
        let kind = match req.path.as_str() {
            "/api/v1/namespaces" => Some(Kind::Namespace),
            "/api/v1/pods" => Some(Kind::Pod),
            _ => None,
        };
        let ok = match (req.method.as_str(), kind) {
            ("GET", Some(kind)) if watching => {
                let since = req
                    .query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok());
                stream_watch(&mut out, state, stop, kind, node, since);
                return;
            }
            ("GET", Some(kind)) => {
                let list = state.lock().list(kind, node.as_deref());
                respond(&mut out, 200, &list)
            }
            ("PATCH", None) => {
                let (status, body) = patch_pod_status(state, &req);
                respond(&mut out, status, &body)
            }
            _ => {
                let _ = respond(&mut out, 404, &status_json(404, "NotFound"));
                return;
            }
        };
        if ok.is_err() {
            return;
        }
    }
}

fn stream_watch(
    out: &mut TcpStream,
    state: &Mutex<ApiState>,
    stop: &AtomicBool,
    kind: Kind,
    node: Option<String>,
    since: Option<u64>,
) {
    let started = state.lock().watch(kind, node, since);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    match started {
        None => {
            let gone = json!({ "type": "ERROR", "object": status_json(410, "Expired") });
            let _ = write_chunk(out, &gone);
        }
        Some((backlog, rx)) => {
            for event in &backlog {
                if write_chunk(out, event).is_err() {
                    return;
                }
            }
            loop {
                match rx.recv_timeout(POLL) {
                    Ok(event) => {
                        if write_chunk(out, &event).is_err() {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::SeqCst) => {}
                    Err(_) => break,
                }
            }
        }
    }
    let _ = out.write_all(b"0\r\n\r\n");
    let _ = out.shutdown(Shutdown::Both);
}

fn write_chunk(out: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(format!("{:x}\r\n", line.len()).as_bytes())?;
    out.write_all(&line)?;
    out.write_all(b"\r\n")?;
    out.flush()
}

fn respond(out: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).map_err(std::io::Error::other)?;
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

fn status_json(code: u16, reason: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Status", "status": "Failure", "message": reason,
            "reason": reason, "code": code })
}

/// `PATCH /api/v1/namespaces/<ns>/pods/<name>/status` with a JSON merge patch.
fn patch_pod_status(state: &Mutex<ApiState>, req: &Request) -> (u16, Value) {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name, "status"] = parts.as_slice() else {
        return (404, status_json(404, "NotFound"));
    };
    if req.content_type.as_deref() != Some("application/merge-patch+json") {
        return (415, status_json(415, "UnsupportedMediaType"));
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&req.body) else {
        return (400, status_json(400, "BadRequest"));
    };
    let mut state = state.lock();
    let refused = state.refuse_patches;
    if state.patches.len() < MAX_PATCHES {
        state.patches.push(ReceivedPatch {
            path: req.path.clone(),
            content_type: req.content_type.clone(),
            body: patch.clone(),
            refused,
        });
    }
    if state.refuse_patches {
        return (503, status_json(503, "ServiceUnavailable"));
    }
    let key = (ns.to_string(), name.to_string());
    let Some(mut pod) = state.pods.get(&key).cloned() else {
        return (404, status_json(404, "NotFound"));
    };
    merge(&mut pod, &patch);
    state.put_pod(pod);
    (200, state.pods[&key].clone())
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Reads one request (line, headers, `Content-Length` body); `None` on EOF, error or oversized input.
fn read_request(conn: &mut BufReader<TcpStream>) -> Option<Request> {
    let line = read_line(conn)?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut content_length = 0usize;
    let mut content_type = None;
    loop {
        let header = read_line(conn)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.trim().parse().ok()?,
            "content-type" => content_type = Some(value.trim().to_string()),
            _ => {}
        }
    }
    if content_length > MAX_BODY {
        return None;
    }
    let mut body = vec![0; content_length];
    conn.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        content_type,
        body,
    })
}

/// One CRLF-terminated line of at most [`MAX_LINE`] bytes; `None` on EOF or a longer line.
fn read_line(conn: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    let n = conn.by_ref().take(MAX_LINE).read_line(&mut line).ok()?;
    (n > 0 && line.ends_with('\n')).then_some(line)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A stand-in kubelet: `sleep` copied to a file named `kubelet`, so the agent finds "kubelet" in /proc (as
/// root, like a real kubelet). Killed on drop.
pub struct FakeKubelet {
    _process: super::netns::KillOnDrop,
    _dir: tempfile::TempDir,
}

impl FakeKubelet {
    /// Starts it (for two minutes at most).
    pub fn start() -> FakeKubelet {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("kubelet");
        std::fs::copy("/bin/sleep", &bin).unwrap();
        let child = std::process::Command::new(&bin).arg("120").spawn().unwrap();
        FakeKubelet {
            _process: super::netns::KillOnDrop(child),
            _dir: dir,
        }
    }
}
