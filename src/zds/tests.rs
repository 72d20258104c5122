//! ZDS tests: server and client over a real socket in a tempdir, hostile peers on both sides, and the exact
//! wire bytes. No root needed: the netns sent around is the test's own (`Netns::current()`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::*;
use crate::netns::Netns;
use crate::proto::workload::zds::{
    workload_request, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent,
    Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};

const WAIT: Duration = Duration::from_secs(3);

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "default".into(),
        service_account: "sa".into(),
    }
}

/// Pods to announce: uid and whether a netns is known (else KeepWorkload).
struct FixedSnapshot(Vec<(&'static str, bool)>);

impl SnapshotSource for FixedSnapshot {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.0
            .iter()
            .map(|(uid, with_netns)| SnapshotEntry {
                uid: (*uid).into(),
                info: info(uid),
                netns: with_netns.then(|| Netns::current().expect("own netns")),
            })
            .collect()
    }
}

/// A running server on a socket in its own tempdir; dropping it stops the server.
struct Agent {
    server: ZdsServer,
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(snapshot: FixedSnapshot) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        // A parent that does not exist yet: bind creates it.
        let path = dir.path().join("run/ztunnel.sock");
        let listener = bind(&path).expect("bind");
        let server = ZdsServer::new(Arc::new(snapshot));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn({
            let server = server.clone();
            async move { server.serve(listener, stopped).await }
        });
        Agent {
            server,
            path,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn wait_for_connections(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.server.connected() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} connected proxies, have {}",
                self.server.connected()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// A proxy that acks everything (NACKing adds with `nack_adds`) and reports what it received.
struct Proxy {
    seen: mpsc::Receiver<Request>,
    task: JoinHandle<Result<(), Error>>,
}

impl Proxy {
    async fn connect(path: &Path, nack_adds: Option<&'static str>) -> Proxy {
        let mut client = ZdsClient::connect(path).await.expect("connect");
        let (tx, seen) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let request = match client.recv().await {
                    Ok(request) => request,
                    Err(Error::Closed { .. }) => return Ok(()),
                    Err(e) => return Err(e),
                };
                let nack = match request {
                    Request::Add { .. } => nack_adds,
                    _ => None,
                };
                client.ack(nack).await?;
                if tx.send(request).await.is_err() {
                    return Ok(());
                }
            }
        });
        Proxy { seen, task }
    }

    async fn next(&mut self) -> Request {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("a request in time")
            .expect("proxy still running")
    }

    /// Reads up to and including SnapshotSent, returning what came before it.
    async fn snapshot(&mut self) -> Vec<Request> {
        let mut before = Vec::new();
        loop {
            match self.next().await {
                Request::SnapshotSent => return before,
                other => before.push(other),
            }
        }
    }

    async fn nothing_more(&mut self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            self.seen.try_recv().is_err(),
            "proxy got an unexpected request"
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn proxy_receives_snapshot_then_adds_and_dels() {
    let agent = Agent::start(FixedSnapshot(vec![("pod-a", true), ("pod-b", false)]));
    let mut proxy = Proxy::connect(&agent.path, None).await;
    assert!(agent.server.wait_connected(WAIT).await);

    let own = Netns::current().unwrap();
    let snapshot = proxy.snapshot().await;
    assert_eq!(snapshot.len(), 2, "{snapshot:?}");
    match &snapshot[0] {
        Request::Add {
            uid,
            info: i,
            netns,
        } => {
            assert_eq!(uid, "pod-a");
            assert_eq!(i, &info("pod-a"));
            assert_eq!(netns.id(), own.id(), "the fd names the netns that was sent");
        }
        other => panic!("expected Add, got {other:?}"),
    }
    assert!(matches!(&snapshot[1], Request::Keep { uid } if uid == "pod-b"));

    agent
        .server
        .add("pod-c", &info("pod-c"), &own)
        .await
        .unwrap();
    match proxy.next().await {
        Request::Add { uid, netns, .. } => {
            assert_eq!(uid, "pod-c");
            assert_eq!(netns.id(), own.id());
        }
        other => panic!("expected Add, got {other:?}"),
    }
    agent.server.del("pod-c").await.unwrap();
    assert!(matches!(proxy.next().await, Request::Del { uid } if uid == "pod-c"));
}

#[tokio::test]
async fn add_without_a_proxy_fails_but_del_succeeds() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let own = Netns::current().unwrap();
    let err = agent.server.add("p", &info("p"), &own).await.unwrap_err();
    assert!(matches!(err, Error::NoProxy), "{err}");
    agent.server.del("p").await.unwrap();
    assert_eq!(agent.server.connected(), 0);
    assert!(!agent.server.wait_connected(Duration::from_millis(50)).await);
}

#[tokio::test]
async fn add_goes_to_the_newest_proxy_and_del_to_all() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let mut old = Proxy::connect(&agent.path, None).await;
    assert!(old.snapshot().await.is_empty());
    let mut new = Proxy::connect(&agent.path, None).await;
    assert!(new.snapshot().await.is_empty());
    agent.wait_for_connections(2).await;

    let own = Netns::current().unwrap();
    agent.server.add("p", &info("p"), &own).await.unwrap();
    assert!(matches!(new.next().await, Request::Add { uid, .. } if uid == "p"));
    old.nothing_more().await;

    agent.server.del("p").await.unwrap();
    assert!(matches!(new.next().await, Request::Del { uid } if uid == "p"));
    assert!(matches!(old.next().await, Request::Del { uid } if uid == "p"));
}

#[tokio::test]
async fn a_disconnected_proxy_is_noticed() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let mut proxy = Proxy::connect(&agent.path, None).await;
    proxy.snapshot().await;
    agent.wait_for_connections(1).await;

    drop(proxy); // aborts the task, closing the client's socket
    agent.wait_for_connections(0).await;
    let own = Netns::current().unwrap();
    let err = agent.server.add("p", &info("p"), &own).await.unwrap_err();
    assert!(matches!(err, Error::NoProxy), "{err}");
}

#[tokio::test]
async fn a_nack_reaches_the_caller_with_its_reason_and_keeps_the_connection() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let mut proxy = Proxy::connect(&agent.path, Some("cannot start proxy")).await;
    proxy.snapshot().await;

    let own = Netns::current().unwrap();
    let err = agent.server.add("p", &info("p"), &own).await.unwrap_err();
    match err {
        Error::Nack { uid, error } => {
            assert_eq!(uid, "p");
            assert_eq!(error, "cannot start proxy");
        }
        other => panic!("expected Nack, got {other}"),
    }
    assert_eq!(agent.server.connected(), 1);
    agent.server.del("p").await.unwrap();
}

#[tokio::test]
async fn an_add_too_large_for_the_proxy_is_refused_before_sending() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let mut proxy = Proxy::connect(&agent.path, None).await;
    proxy.snapshot().await;
    let own = Netns::current().unwrap();
    let huge = info(&"n".repeat(MAX_MESSAGE));
    let err = agent.server.add("p", &huge, &own).await.unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    proxy.nothing_more().await;
    assert_eq!(agent.server.connected(), 1);
}

/// Reads one packet from a raw peer, failing after `WAIT`.
async fn raw_recv(conn: &SeqpacketConn) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut buf = [0u8; MAX_MESSAGE];
    let (n, fds) = tokio::time::timeout(WAIT, conn.recv(&mut buf))
        .await
        .expect("a packet in time")
        .expect("recv");
    (buf[..n].to_vec(), fds)
}

#[tokio::test]
async fn garbage_or_a_wrong_version_instead_of_hello_closes_only_that_connection() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let bad_hellos: [Vec<u8>; 2] = [
        vec![0xff, 0xff, 0xff],
        ZdsHello { version: 7 }.encode_to_vec(),
    ];
    for hello in bad_hellos {
        let raw = SeqpacketConn::connect(&agent.path).await.unwrap();
        raw.send(&hello, None).await.unwrap();
        let (bytes, fds) = raw_recv(&raw).await;
        assert!(bytes.is_empty() && fds.is_empty(), "expected EOF");
    }
    assert_eq!(agent.server.connected(), 0);
    let mut proxy = Proxy::connect(&agent.path, None).await;
    assert!(proxy.snapshot().await.is_empty());
    assert_eq!(agent.server.connected(), 1);
}

#[tokio::test]
async fn a_garbage_ack_fails_the_request_and_closes_the_connection() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let raw = SeqpacketConn::connect(&agent.path).await.unwrap();
    raw.send(&[0x08, 0x01], None).await.unwrap(); // ZdsHello{V1}
    let (bytes, _) = raw_recv(&raw).await;
    assert_eq!(bytes, [0x1a, 0x00], "SnapshotSent on the wire");
    raw.send(&[0x0a, 0x00], None).await.unwrap(); // ack

    let own = Netns::current().unwrap();
    let server = agent.server.clone();
    let add = tokio::spawn(async move { server.add("p", &info("p"), &own).await });
    let (bytes, fds) = raw_recv(&raw).await;
    assert_eq!(fds.len(), 1, "AddWorkload carries exactly one fd");
    let request = WorkloadRequest::decode(&bytes[..]).unwrap();
    assert!(matches!(
        request.payload,
        Some(workload_request::Payload::Add(AddWorkload { ref uid, .. })) if uid == "p"
    ));
    raw.send(&[0xff, 0xff], None).await.unwrap();
    let err = add.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err}");
    let (bytes, _) = raw_recv(&raw).await;
    assert!(bytes.is_empty(), "server closed the connection");
    agent.wait_for_connections(0).await;
}

#[tokio::test]
async fn data_from_an_idle_proxy_closes_its_connection() {
    let agent = Agent::start(FixedSnapshot(vec![]));
    let raw = SeqpacketConn::connect(&agent.path).await.unwrap();
    raw.send(&[0x08, 0x01], None).await.unwrap();
    raw_recv(&raw).await;
    raw.send(&[0x0a, 0x00], None).await.unwrap();
    agent.wait_for_connections(1).await;
    raw.send(&[0x0a, 0x00], None).await.unwrap(); // an ack nobody asked for
    let (bytes, _) = raw_recv(&raw).await;
    assert!(bytes.is_empty(), "server closed the connection");
    agent.wait_for_connections(0).await;
}

/// Whether `conn` is still open with nothing to read (probed without blocking or consuming anything).
fn open_and_quiet(conn: &SeqpacketConn) -> bool {
    let mut byte = [0u8; 1];
    let peeked = nix::sys::socket::recv(
        conn.as_fd().as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK,
    );
    matches!(peeked, Err(nix::errno::Errno::EAGAIN))
}

/// Issue 11: sockets that connect and never send `ZdsHello` held the agent's slots, each until its hello
/// deadline, so a proxy connecting behind them waited (for ever, behind a client that keeps reconnecting).
/// Now each newcomer evicts the oldest hello-less socket. The hello deadline is an hour here, so only an
/// eviction can have let the proxy in.
#[tokio::test]
async fn a_proxy_gets_its_snapshot_while_hello_less_sockets_hold_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let listener = bind(&path).unwrap();
    let server = ZdsServer::new(Arc::new(FixedSnapshot(vec![("pod-a", true)])));
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn({
        let server = server.clone();
        async move {
            server
                .serve_with(listener, stopped, Duration::from_secs(3600))
                .await
        }
    });
    // More silent sockets than slots, all queued before the proxy (accepted in this order, 5 a second).
    const EXTRA: usize = 2;
    let mut silent = Vec::new();
    for _ in 0..server::MAX_CONNECTIONS + EXTRA {
        silent.push(SeqpacketConn::connect(&path).await.unwrap());
    }
    // A generous guard, not a bound: without eviction the proxy is never let in.
    let (mut client, snapshot) = tokio::time::timeout(Duration::from_secs(60), async {
        let mut client = ZdsClient::connect(&path).await.unwrap();
        let mut before = Vec::new();
        loop {
            let request = client.recv().await.unwrap();
            client.ack(None).await.unwrap();
            if matches!(request, Request::SnapshotSent) {
                return (client, before);
            }
            before.push(request);
        }
    })
    .await
    .expect("the proxy gets its snapshot while hello-less sockets hold every slot");
    assert!(
        matches!(&snapshot[..], [Request::Add { uid, .. }] if uid == "pod-a"),
        "{snapshot:?}"
    );
    // One eviction per newcomer, oldest first; the newest silent sockets still hold their slots.
    let evicted = EXTRA + 1;
    for (i, conn) in silent.iter().enumerate() {
        if i < evicted {
            let (bytes, fds) = raw_recv(conn).await;
            assert!(
                bytes.is_empty() && fds.is_empty(),
                "socket {i}: expected EOF"
            );
        } else {
            assert!(open_and_quiet(conn), "socket {i} was closed");
        }
    }
    // The proxy is served from then on: a live add reaches it.
    let own = Netns::current().unwrap();
    let add = tokio::spawn({
        let server = server.clone();
        async move { server.add("pod-b", &info("pod-b"), &own).await }
    });
    let request = tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("the add in time")
        .unwrap();
    assert!(
        matches!(&request, Request::Add { uid, .. } if uid == "pod-b"),
        "{request:?}"
    );
    client.ack(None).await.unwrap();
    add.await.unwrap().unwrap();
    assert_eq!(server.connected(), 1);
}

/// A client on one end of a socket pair, the raw "agent" on the other, hello already checked.
async fn client_and_raw_agent() -> (ZdsClient, SeqpacketConn) {
    let (ours, theirs) = SeqpacketConn::pair().unwrap();
    let client = ZdsClient::handshake(ours).await.unwrap();
    let (hello, fds) = raw_recv(&theirs).await;
    assert_eq!(hello, [0x08, 0x01], "ZdsHello{{V1}} on the wire");
    assert!(fds.is_empty());
    (client, theirs)
}

fn request(payload: workload_request::Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add_request(uid: &str, with_info: bool) -> Vec<u8> {
    request(workload_request::Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: with_info.then(|| info(uid)),
    }))
}

/// Sends `bytes` with each of `fds` in one SCM_RIGHTS message.
fn send_with_fds(conn: &SeqpacketConn, bytes: &[u8], fds: &[&dyn AsFd]) {
    let raw: Vec<_> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [std::io::IoSlice::new(bytes)];
    sendmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

/// The receiver closed the pipe read end it was sent: its only copy, so writing now fails with EPIPE.
fn assert_no_reader_left(pipe_w: OwnedFd) {
    let err = nix::unistd::write(&pipe_w, b"x").unwrap_err();
    assert_eq!(err, nix::errno::Errno::EPIPE, "a received fd was leaked");
}

/// The client rejects the next message with a protocol error and NACKs it.
async fn expect_protocol_error(client: &mut ZdsClient, agent: &SeqpacketConn, what: &str) {
    let err = client.recv().await.unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{what}: got {err}");
    client.ack(Some(&err.to_string())).await.unwrap();
    let (bytes, _) = raw_recv(agent).await;
    let ack = WorkloadResponse::decode(&bytes[..]).unwrap();
    assert!(
        matches!(ack.payload, Some(workload_response::Payload::Ack(Ack { ref error })) if !error.is_empty()),
        "{what}: expected a NACK"
    );
}

#[tokio::test]
async fn client_rejects_malformed_requests() {
    let (mut client, agent) = client_and_raw_agent().await;
    let own = Netns::current().unwrap();

    agent.send(&[0xff, 0xff, 0xff], None).await.unwrap();
    expect_protocol_error(&mut client, &agent, "garbage").await;

    agent.send(&add_request("p", true), None).await.unwrap();
    expect_protocol_error(&mut client, &agent, "Add without fd").await;

    agent
        .send(&add_request("p", false), Some(own.as_fd()))
        .await
        .unwrap();
    expect_protocol_error(&mut client, &agent, "Add without workload_info").await;

    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    agent
        .send(&add_request("p", true), Some(pipe_r.as_fd()))
        .await
        .unwrap();
    drop(pipe_r);
    expect_protocol_error(&mut client, &agent, "Add with a pipe").await;
    assert_no_reader_left(pipe_w);

    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    send_with_fds(&agent, &add_request("p", true), &[&own, &pipe_r]);
    drop(pipe_r);
    expect_protocol_error(&mut client, &agent, "Add with two fds").await;
    assert_no_reader_left(pipe_w);

    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    let del = request(workload_request::Payload::Del(DelWorkload {
        uid: "p".into(),
    }));
    agent.send(&del, Some(pipe_r.as_fd())).await.unwrap();
    drop(pipe_r);
    expect_protocol_error(&mut client, &agent, "Del with an fd").await;
    assert_no_reader_left(pipe_w);

    // Field 4 (the retired NoSnapshotPresent) decodes to a request without a payload.
    agent.send(&[0x22, 0x00], None).await.unwrap();
    expect_protocol_error(&mut client, &agent, "empty payload").await;

    agent
        .send(&vec![0x0a; MAX_MESSAGE + 1], None)
        .await
        .unwrap();
    let err = client.recv().await.unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "oversized: got {err}");
    client.ack(Some("message too long")).await.unwrap();
    raw_recv(&agent).await;

    // The connection is still usable for a valid request.
    agent
        .send(&add_request("ok", true), Some(own.as_fd()))
        .await
        .unwrap();
    assert!(matches!(client.recv().await.unwrap(), Request::Add { uid, .. } if uid == "ok"));
}

#[tokio::test]
async fn client_enforces_the_snapshot_order() {
    let (mut client, agent) = client_and_raw_agent().await;
    let keep = request(workload_request::Payload::Keep(KeepWorkload {
        uid: "k".into(),
    }));
    let done = request(workload_request::Payload::SnapshotSent(SnapshotSent {}));

    agent.send(&keep, None).await.unwrap();
    assert!(matches!(client.recv().await.unwrap(), Request::Keep { uid } if uid == "k"));
    client.ack(None).await.unwrap();
    raw_recv(&agent).await;
    agent.send(&done, None).await.unwrap();
    assert!(matches!(
        client.recv().await.unwrap(),
        Request::SnapshotSent
    ));
    assert!(client.snapshot_done());
    client.ack(None).await.unwrap();
    let (ack, _) = raw_recv(&agent).await;
    assert_eq!(
        ack,
        [0x0a, 0x00],
        "an ACK is WorkloadResponse{{ack: Ack{{}}}}"
    );

    agent.send(&keep, None).await.unwrap();
    expect_protocol_error(&mut client, &agent, "Keep after SnapshotSent").await;
    agent.send(&done, None).await.unwrap();
    expect_protocol_error(&mut client, &agent, "second SnapshotSent").await;

    let err = client.ack(None).await.unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "unasked ack: {err}");
    drop(agent);
    assert!(matches!(client.recv().await, Err(Error::Closed { .. })));
}

#[test]
fn wire_bytes_match_istio_field_numbers() {
    let del = request(workload_request::Payload::Del(DelWorkload {
        uid: "x".into(),
    }));
    assert_eq!(del, [0x12, 0x03, 0x12, 0x01, 0x78]);
    let keep = request(workload_request::Payload::Keep(KeepWorkload {
        uid: "k".into(),
    }));
    assert_eq!(keep, [0x2a, 0x03, 0x0a, 0x01, b'k']);
    let done = request(workload_request::Payload::SnapshotSent(SnapshotSent {}));
    assert_eq!(done, [0x1a, 0x00]);
    let add = request(workload_request::Payload::Add(AddWorkload {
        uid: "u".into(),
        workload_info: Some(WorkloadInfo {
            name: "n".into(),
            namespace: "s".into(),
            service_account: "a".into(),
        }),
    }));
    assert_eq!(
        add,
        [
            0x0a, 0x0e, 0x0a, 0x01, b'u', 0x12, 0x09, 0x0a, 0x01, b'n', 0x12, 0x01, b's', 0x1a,
            0x01, b'a'
        ]
    );
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);
    let nack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error: "e".into() })),
    };
    assert_eq!(nack.encode_to_vec(), [0x0a, 0x03, 0x0a, 0x01, b'e']);
}

#[test]
fn bind_replaces_a_stale_socket_but_not_other_files() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let first = bind(&path).unwrap();
    std::mem::forget(first); // leaves a stale socket file behind, as a crashed agent would
    let second = bind(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(second);
    assert!(
        !path.exists(),
        "dropping the listener removes its socket file"
    );

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = bind(&file).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

/// This process's open fd numbers.
fn open_fds() -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// Sets the soft fd limit so that only about `free` more fds can be opened; returns the previous limits
/// (soft, hard).
fn limit_free_fds(free: usize) -> (u64, u64) {
    let open = open_fds();
    let mut limit = 0;
    let mut left = free;
    while left > 0 {
        if !open.contains(&limit) {
            left -= 1;
        }
        limit += 1;
    }
    let old = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    set_fd_limit((limit as u64, old.1));
    old
}

/// Sets the fd limit to (soft, hard).
fn set_fd_limit((soft, hard): (u64, u64)) {
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
}

#[test]
fn a_refused_zds_packet_leaves_none_of_its_fds_open_on_either_side() {
    crate::test_gate::run_alone(
        module_path!(),
        "alone_received_fds_never_outlive_a_refused_packet",
    );
}

#[tokio::test]
#[ignore = "lowers the fd limit and counts fds: run alone by a_refused_zds_packet_leaves_none_of_its_fds_open_on_either_side"]
async fn alone_received_fds_never_outlive_a_refused_packet() {
    const SENT: usize = 32;
    let agent = Agent::start(FixedSnapshot(vec![]));
    let (mut client, raw_agent) = client_and_raw_agent().await;
    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    let many: Vec<&dyn AsFd> = std::iter::repeat_n(&pipe_r as &dyn AsFd, SENT).collect();
    let oversized = vec![0x0a; MAX_MESSAGE + 1];
    let before = open_fds();

    // Proxy side: an oversized packet with fds, and an AddWorkload with far more than one fd.
    send_with_fds(&raw_agent, &oversized, &many[..3]);
    let err = client.recv().await.unwrap_err();
    assert!(err.to_string().contains("MSG_TRUNC"), "oversized: {err}");
    client.ack(Some("refused")).await.unwrap();
    raw_recv(&raw_agent).await;
    send_with_fds(&raw_agent, &add_request("p", true), &many);
    expect_protocol_error(&mut client, &raw_agent, "Add with 32 fds").await;
    // Agent side: a hello that is oversized and carries fds.
    let proxy = SeqpacketConn::connect(&agent.path).await.unwrap();
    send_with_fds(&proxy, &oversized, &many);
    let (bytes, fds) = raw_recv(&proxy).await;
    assert!(
        bytes.is_empty() && fds.is_empty(),
        "agent closes the connection"
    );
    drop(proxy);
    assert_eq!(open_fds(), before, "fds left open by refused packets");

    // Out of fd numbers part way through the list: the kernel installs the first few fds and flags the
    // packet MSG_CTRUNC. Those few must be closed too.
    let limits = limit_free_fds(6);
    send_with_fds(&raw_agent, &add_request("p", true), &many);
    let err = client.recv().await.unwrap_err();
    assert!(err.to_string().contains("MSG_CTRUNC"), "cut short: {err}");
    client.ack(Some("refused")).await.unwrap();
    raw_recv(&raw_agent).await;
    let proxy = SeqpacketConn::connect(&agent.path).await.unwrap();
    send_with_fds(&proxy, &[0x08, 0x01], &many);
    let (bytes, fds) = raw_recv(&proxy).await;
    assert!(
        bytes.is_empty() && fds.is_empty(),
        "agent closes the connection"
    );
    drop(proxy);
    set_fd_limit(limits);
    assert_eq!(open_fds(), before, "fds left open by cut-short packets");

    drop(pipe_r);
    assert_no_reader_left(pipe_w);
}
