//! The Kubernetes source against a fake API server: a small HTTP/1.1 server on 127.0.0.1 that serves
//! Namespace and Pod lists and watches (honouring `fieldSelector=spec.nodeName=...`), can end or expire
//! its watches, and applies merge patches to `pods/status`.

use super::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
}

/// One request as the fake server saw it.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// A live watch: its kind, the node it filters on, and where its events go.
struct Watch {
    kind: Kind,
    node: Option<String>,
    tx: mpsc::Sender<Value>,
}

#[derive(Default)]
struct ApiState {
    resource_version: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    watches: Vec<Watch>,
    /// The next watch of each kind gets a 410 Gone error event (resourceVersion too old).
    expire_namespaces: bool,
    expire_pods: bool,
    requests: Vec<Recorded>,
}

impl ApiState {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn notify(&mut self, kind: Kind, event: &str, object: &Value) {
        let node = object["spec"]["nodeName"].as_str().map(str::to_string);
        let event = json!({ "type": event, "object": object });
        self.watches.retain(|w| {
            if w.kind != kind || (w.node.is_some() && w.node != node) {
                return true;
            }
            w.tx.try_send(event.clone()).is_ok()
        });
    }

    fn put_namespace(&mut self, name: &str, labels: Value) {
        let event = if self.namespaces.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let ns = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "uid": format!("ns-{name}"), "labels": labels,
                          "resourceVersion": self.next_rv() },
        });
        self.namespaces.insert(name.to_string(), ns.clone());
        self.notify(Kind::Namespace, event, &ns);
    }

    fn put_pod(&mut self, pod: Value) {
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = json!(self.next_rv());
        let key = pod_key(&pod);
        let event = if self.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.pods.insert(key, pod.clone());
        self.notify(Kind::Pod, event, &pod);
    }

    fn delete_pod(&mut self, namespace: &str, name: &str) {
        if let Some(mut pod) = self.pods.remove(&(namespace.to_string(), name.to_string())) {
            pod["metadata"]["resourceVersion"] = json!(self.next_rv());
            self.notify(Kind::Pod, "DELETED", &pod);
        }
    }

    fn list(&mut self, kind: Kind, node: Option<&str>) -> Value {
        let items: Vec<Value> = match kind {
            Kind::Namespace => self.namespaces.values().cloned().collect(),
            Kind::Pod => self
                .pods
                .values()
                .filter(|p| node.is_none() || p["spec"]["nodeName"].as_str() == node)
                .cloned()
                .collect(),
        };
        let list_kind = match kind {
            Kind::Namespace => "NamespaceList",
            Kind::Pod => "PodList",
        };
        json!({
            "apiVersion": "v1", "kind": list_kind,
            "metadata": { "resourceVersion": self.resource_version.max(1).to_string() },
            "items": items,
        })
    }
}

fn pod_key(pod: &Value) -> (String, String) {
    (
        pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
            "labels": { "app": name }, "annotations": { "note": "x" },
        },
        "spec": { "nodeName": node, "serviceAccountName": format!("sa-{name}"),
                  "containers": [ { "name": "app" } ] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [ { "ip": ip } ] },
    })
}

/// The fake API server; stops when dropped.
struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(ApiState::default()));
        let server_state = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, server_state.clone()));
            }
        });
        FakeApi { addr, state, task }
    }

    fn client(&self) -> Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        Client::try_from(kube::Config::new(url)).expect("client")
    }

    fn with<T>(&self, f: impl FnOnce(&mut ApiState) -> T) -> T {
        f(&mut self.state.lock())
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.lock().requests.clone()
    }

    /// Ends every watch and makes the next ones fail with 410 Gone, then runs `f` while nobody watches,
    /// so only a relist can reveal its changes.
    fn drop_watches_then(&self, f: impl FnOnce(&mut ApiState)) {
        let mut state = self.state.lock();
        state.watches.clear();
        state.expire_namespaces = true;
        state.expire_pods = true;
        f(&mut state);
    }
}

/// Serves one connection: requests one after another; a watch streams until it ends, then closes it.
async fn serve(conn: TcpStream, state: Arc<Mutex<ApiState>>) {
    let mut conn = BufReader::new(conn);
    while let Some(req) = read_request(&mut conn).await {
        state.lock().requests.push(req.clone());
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
        match (req.method.as_str(), kind) {
            ("GET", Some(kind)) if watching => {
                stream_watch(conn.get_mut(), &state, kind, node).await;
                return;
            }
            ("GET", Some(kind)) => {
                let list = state.lock().list(kind, node.as_deref());
                if respond(conn.get_mut(), 200, &list).await.is_err() {
                    return;
                }
            }
            ("PATCH", None) => {
                let (status, body) = patch_pod_status(&state, &req);
                if respond(conn.get_mut(), status, &body).await.is_err() {
                    return;
                }
            }
            _ => {
                let _ = respond(conn.get_mut(), 404, &status_json(404, "NotFound")).await;
                return;
            }
        }
    }
}

fn status_json(code: u16, reason: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Status", "status": "Failure", "message": reason,
            "reason": reason, "code": code })
}

fn patch_pod_status(state: &Mutex<ApiState>, req: &Recorded) -> (u16, Value) {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name, "status"] = parts.as_slice() else {
        return (404, status_json(404, "NotFound"));
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&req.body) else {
        return (400, status_json(400, "BadRequest"));
    };
    let mut state = state.lock();
    let Some(mut pod) = state.pods.get(&(ns.to_string(), name.to_string())).cloned() else {
        return (404, status_json(404, "NotFound"));
    };
    merge(&mut pod, &patch);
    state.put_pod(pod);
    let pod = state.pods[&(ns.to_string(), name.to_string())].clone();
    (200, pod)
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

async fn stream_watch(
    conn: &mut TcpStream,
    state: &Mutex<ApiState>,
    kind: Kind,
    node: Option<String>,
) {
    let (tx, mut rx) = mpsc::channel(64);
    let expired = {
        let mut state = state.lock();
        let flag = match kind {
            Kind::Namespace => &mut state.expire_namespaces,
            Kind::Pod => &mut state.expire_pods,
        };
        let expired = std::mem::take(flag);
        if !expired {
            state.watches.push(Watch { kind, node, tx });
        }
        expired
    };
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if expired {
        let gone = json!({ "type": "ERROR", "object": status_json(410, "Expired") });
        let _ = write_chunk(conn, &gone).await;
    } else {
        while let Some(event) = rx.recv().await {
            if write_chunk(conn, &event).await.is_err() {
                return;
            }
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let _ = conn.shutdown().await;
}

async fn write_chunk(conn: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).expect("json");
    line.push(b'\n');
    conn.write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    conn.write_all(&line).await?;
    conn.write_all(b"\r\n").await?;
    conn.flush().await
}

async fn respond(conn: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).expect("json");
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&body).await?;
    conn.flush().await
}

async fn read_request(conn: &mut BufReader<TcpStream>) -> Option<Recorded> {
    let mut line = String::new();
    conn.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut content_length = 0usize;
    let mut content_type = None;
    loop {
        let mut header = String::new();
        if conn.read_line(&mut header).await.ok()? == 0 {
            return None;
        }
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
    let mut body = vec![0; content_length];
    conn.read_exact(&mut body).await.ok()?;
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    Some(Recorded {
        method,
        path: path.to_string(),
        query,
        content_type,
        body,
    })
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

/// A fake API server with two namespaces, a pod on this node and one on another, and a running source.
struct Running {
    api: FakeApi,
    source: KubeSource,
    rx: watch::Receiver<Arc<ClusterView>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Running {
    let api = FakeApi::start().await;
    api.with(|s| {
        s.put_namespace("default", json!({}));
        s.put_namespace("mesh", json!({ "istio.io/dataplane-mode": "ambient" }));
        s.put_pod(pod("mesh", "a", NODE, "10.0.0.5"));
        s.put_pod(pod("mesh", "elsewhere", "node-b", "10.0.1.5"));
    });
    let source = KubeSource::with_client(api.client(), NODE.to_string());
    let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
    let task = tokio::spawn(source.clone().run(tx));
    Running {
        api,
        source,
        rx,
        task,
    }
}

/// Waits until the published view satisfies `pred`, and returns it.
async fn view_where(
    rx: &mut watch::Receiver<Arc<ClusterView>>,
    what: &str,
    pred: impl Fn(&ClusterView) -> bool,
) -> Arc<ClusterView> {
    let found = match tokio::time::timeout(WAIT, rx.wait_for(|v| pred(v))).await {
        Ok(Ok(view)) => Some(view.clone()),
        Ok(Err(_)) => panic!("source stopped while waiting for {what}"),
        Err(_) => None,
    };
    match found {
        Some(view) => view,
        None => panic!(
            "no view with {what} within {WAIT:?}; last: {:#?}",
            rx.borrow()
        ),
    }
}

fn key(namespace: &str, name: &str) -> PodKey {
    PodKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

#[tokio::test]
async fn initial_view_has_all_namespaces_and_only_this_nodes_pods() {
    let mut run = start().await;
    let view = view_where(&mut run.rx, "synced", |v| v.synced).await;
    assert_eq!(
        view.namespaces.keys().collect::<Vec<_>>(),
        ["default", "mesh"]
    );
    assert_eq!(
        view.namespaces["mesh"]
            .labels
            .get("istio.io/dataplane-mode"),
        Some(&"ambient".to_string())
    );
    assert_eq!(view.pods.keys().collect::<Vec<_>>(), [&key("mesh", "a")]);
    let a = &view.pods[&key("mesh", "a")];
    assert_eq!(a.uid, "uid-mesh-a");
    assert_eq!(a.service_account, "sa-a");
    assert_eq!(a.labels.get("app"), Some(&"a".to_string()));
    assert_eq!(a.annotations.get("note"), Some(&"x".to_string()));
    assert_eq!(a.ips, vec!["10.0.0.5".parse::<IpAddr>().expect("ip")]);
    assert!(!a.host_network && !a.terminal);

    // Every pod request, list and watch, asks for this node's pods only.
    let pod_requests: Vec<_> = run
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect();
    assert!(pod_requests.len() >= 2, "{pod_requests:#?}");
    for r in &pod_requests {
        assert_eq!(
            r.query.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=node-a")
        );
    }
}

#[tokio::test]
async fn namespace_label_change_arrives_as_a_new_view() {
    let mut run = start().await;
    view_where(&mut run.rx, "synced", |v| v.synced).await;
    run.api.with(|s| {
        s.put_namespace("default", json!({ "istio.io/dataplane-mode": "ambient" }));
        s.put_namespace("fresh", json!({ "team": "x" }));
    });
    let view = view_where(&mut run.rx, "relabelled default", |v| {
        v.namespaces
            .get("default")
            .is_some_and(|n| n.labels.contains_key("istio.io/dataplane-mode"))
    })
    .await;
    // Both changes came in one burst, so they are published together.
    assert!(view.namespaces.contains_key("fresh"), "{view:#?}");
}

#[tokio::test]
async fn pods_added_and_deleted_on_this_node_show_up_and_others_never_do() {
    let mut run = start().await;
    view_where(&mut run.rx, "synced", |v| v.synced).await;
    run.api.with(|s| {
        s.put_pod(pod("default", "other-node", "node-b", "10.0.1.9"));
        s.put_pod(pod("default", "b", NODE, "10.0.0.9"));
    });
    let view = view_where(&mut run.rx, "pod b", |v| {
        v.pods.contains_key(&key("default", "b"))
    })
    .await;
    assert!(!view.pods.contains_key(&key("default", "other-node")));

    run.api.with(|s| s.delete_pod("mesh", "a"));
    let view = view_where(&mut run.rx, "pod a gone", |v| {
        !v.pods.contains_key(&key("mesh", "a"))
    })
    .await;
    assert_eq!(view.pods.keys().collect::<Vec<_>>(), [&key("default", "b")]);
}

#[tokio::test]
async fn finished_pods_are_marked_terminal() {
    let mut run = start().await;
    view_where(&mut run.rx, "synced", |v| v.synced).await;
    let mut done = pod("mesh", "a", NODE, "10.0.0.5");
    done["status"]["phase"] = json!("Succeeded");
    run.api.with(|s| s.put_pod(done));
    view_where(&mut run.rx, "terminal pod a", |v| {
        v.pods.get(&key("mesh", "a")).is_some_and(|p| p.terminal)
    })
    .await;
}

#[tokio::test]
async fn dropped_watch_relists_and_sees_changes_made_meanwhile() {
    let mut run = start().await;
    view_where(&mut run.rx, "synced", |v| v.synced).await;
    let lists_before = run
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.query.contains_key("watch"))
        .count();
    run.api.drop_watches_then(|s| {
        // Changes nobody is watching: only a relist can reveal them.
        let mut pods = std::mem::take(&mut s.pods);
        pods.remove(&("mesh".to_string(), "a".to_string()));
        s.pods = pods;
        s.resource_version += 1;
        s.namespaces.remove("default");
    });
    let view = view_where(&mut run.rx, "relisted view", |v| {
        v.pods.is_empty() && !v.namespaces.contains_key("default")
    })
    .await;
    assert!(view.synced);
    let lists_after = run
        .api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.query.contains_key("watch"))
        .count();
    assert!(
        lists_after >= lists_before + 2,
        "{lists_before} → {lists_after}"
    );

    // And the new watches carry on.
    run.api
        .with(|s| s.put_pod(pod("mesh", "c", NODE, "10.0.0.7")));
    view_where(&mut run.rx, "pod c", |v| {
        v.pods.contains_key(&key("mesh", "c"))
    })
    .await;
}

#[tokio::test]
async fn redirection_annotation_is_a_merge_patch_on_pod_status() {
    let mut run = start().await;
    view_where(&mut run.rx, "synced", |v| v.synced).await;
    run.source
        .set_redirection("mesh", "a", Some("enabled"))
        .await
        .expect("patch");
    let patches: Vec<_> = run
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 1);
    let patch = &patches[0];
    assert_eq!(patch.path, "/api/v1/namespaces/mesh/pods/a/status");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&patch.body).expect("json body"),
        json!({"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"}}})
    );
    // The server applied it, and the watch brings it back into the view.
    view_where(&mut run.rx, "annotated pod a", |v| {
        v.pods
            .get(&key("mesh", "a"))
            .and_then(|p| p.annotations.get(REDIRECTION_ANNOTATION))
            .is_some_and(|a| a == "enabled")
    })
    .await;

    run.source
        .set_redirection("mesh", "a", None)
        .await
        .expect("unpatch");
    let last = run.api.requests().pop().expect("request");
    assert_eq!(
        serde_json::from_slice::<Value>(&last.body).expect("json body"),
        json!({"metadata":{"annotations":{"ambient.istio.io/redirection":null}}})
    );
    view_where(&mut run.rx, "annotation removed", |v| {
        v.pods
            .get(&key("mesh", "a"))
            .is_some_and(|p| !p.annotations.contains_key(REDIRECTION_ANNOTATION))
    })
    .await;
}

#[tokio::test]
async fn patching_a_missing_pod_is_an_error_naming_it() {
    let run = start().await;
    let err = run
        .source
        .set_redirection("mesh", "ghost", Some("pending"))
        .await
        .expect_err("no such pod");
    assert!(
        matches!(&err, Error::Patch { namespace, name, .. } if namespace == "mesh" && name == "ghost"),
        "{err:?}"
    );
}

#[tokio::test]
async fn source_stops_when_nobody_listens() {
    let api = FakeApi::start().await;
    let source = KubeSource::with_client(api.client(), NODE.to_string());
    let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
    let task = tokio::spawn(source.run(tx));
    drop(rx);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("run returns")
        .expect("no panic");
}

#[test]
fn pod_being_deleted_with_all_containers_stopped_is_terminal() {
    let mut p: Pod = serde_json::from_value(pod("ns", "p", NODE, "10.0.0.1")).expect("pod");
    assert!(!is_terminal(&p));
    p.metadata.deletion_timestamp = serde_json::from_value(json!("2024-01-01T00:00:00Z")).ok();
    p.status.as_mut().expect("status").container_statuses = serde_json::from_value(json!([
        { "name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
          "state": { "running": {} } }
    ]))
    .ok();
    assert!(!is_terminal(&p), "a container still runs");
    p.status.as_mut().expect("status").container_statuses = serde_json::from_value(json!([
        { "name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
          "state": { "terminated": { "exitCode": 0 } } }
    ]))
    .ok();
    assert!(is_terminal(&p));
}

#[test]
fn pod_without_pod_ips_falls_back_to_pod_ip_and_default_service_account() {
    let mut v = pod("ns", "p", NODE, "fd00::5");
    v["status"]["podIPs"] = json!(null);
    v["spec"]["serviceAccountName"] = json!(null);
    v["spec"]["hostNetwork"] = json!(true);
    let p: Pod = serde_json::from_value(v).expect("pod");
    let (_, info) = pod_info(&p).expect("info");
    assert_eq!(info.ips, vec!["fd00::5".parse::<IpAddr>().expect("ip")]);
    assert_eq!(info.service_account, "default");
    assert!(info.host_network);
}

#[tokio::test]
async fn https_client_builds_on_the_ring_provider() {
    // Building the client builds its rustls config; with no provider installed this only works because
    // ring is the one crypto provider compiled in (no aws-lc-rs).
    let url = "https://127.0.0.1:6443".parse().expect("url");
    let mut config = kube::Config::new(url);
    config.accept_invalid_certs = true;
    Client::try_from(config).expect("https client");
}
