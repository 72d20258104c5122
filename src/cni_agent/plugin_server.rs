//! The plugin event server: HTTP/1.1 over the unix socket `<run_dir>/pluginevent.sock`.
//!
//! Input: `POST /cmdadd`, `/cmddel`, `/cmdcheck`, `/cmdgc` from `meshnode-cni` (istio-cni's wire format:
//! Go field names as JSON keys, plus `PodUID`, `ContainerID`, `IfName`). Output: each request handed to
//! the agent as a [`PluginRequest`] with a channel for its [`Answer`], and the answer written back: 200
//! with `{"enrolled": bool, "reason": ...}`, or an error status whose body is the message. Garbage gets a
//! 400 and the connection closes; the server keeps serving. Bounds: 64 KiB per request, 5 s to send it,
//! 64 connections at once. When all 64 are taken, a new connection evicts the oldest one still sending its
//! request (answered 503), so sockets that send nothing or dribble cannot keep the plugin out; a connection
//! whose request is with the agent is never evicted (when all are, newcomers wait in the socket backlog).

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::conn_slots::{Evicted, Slot, Slots, WhenAllBusy};

/// Largest request accepted (headers and body).
const MAX_REQUEST: usize = 64 * 1024;
/// Time a client has to send its whole request (the plugin's own timeout is 5 s).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections held at once. A newcomer takes the slot of the oldest one still sending its request; when
/// every one has handed its request to the agent, newcomers wait in the socket backlog.
const MAX_CONCURRENT: usize = 64;

/// A pod IP as the plugin reports it (Go `net.IPNet`: only `IP` is used).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventAddress {
    /// The address.
    #[serde(rename = "IP")]
    pub ip: String,
}

/// One `IPs` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventIp {
    /// The address.
    #[serde(rename = "Address", default)]
    pub address: EventAddress,
}

/// An ADD / DEL / CHECK event from the plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginEvent {
    /// `CNI_NETNS`.
    #[serde(rename = "Netns", default)]
    pub netns: String,
    /// `K8S_POD_NAME`.
    #[serde(rename = "PodName", default)]
    pub pod_name: String,
    /// `K8S_POD_NAMESPACE`.
    #[serde(rename = "PodNamespace", default)]
    pub pod_namespace: String,
    /// `K8S_POD_UID` (may be empty).
    #[serde(rename = "PodUID", default)]
    pub pod_uid: String,
    /// `CNI_CONTAINERID`.
    #[serde(rename = "ContainerID", default)]
    pub container_id: String,
    /// `CNI_IFNAME`.
    #[serde(rename = "IfName", default)]
    pub ifname: String,
    /// Addresses from the previous plugin's result.
    #[serde(rename = "IPs", default, deserialize_with = "null_as_empty")]
    pub ips: Vec<EventIp>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<EventIp>, D::Error> {
    Ok(Option::<Vec<EventIp>>::deserialize(d)?.unwrap_or_default())
}

impl PluginEvent {
    /// The pod IPs that parse.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.ips
            .iter()
            .filter_map(|i| i.address.ip.parse().ok())
            .collect()
    }
}

/// One attachment a GC keeps.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    /// Its container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface.
    #[serde(default)]
    pub ifname: String,
}

/// A GC event: everything not listed may be cleaned up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GcEvent {
    /// Attachments still in use.
    #[serde(rename = "ValidAttachments", default)]
    pub valid: Vec<Attachment>,
}

/// What the plugin asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginRequest {
    /// A pod sandbox was created.
    Add(PluginEvent),
    /// A pod sandbox is going away.
    Del(PluginEvent),
    /// Is the pod still as ADD left it?
    Check(PluginEvent),
    /// Clean up everything but these.
    Gc(GcEvent),
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
}

impl Answer {
    /// 200 with the enrollment outcome.
    pub fn enrolled(enrolled: bool, reason: &str) -> Answer {
        Answer {
            status: 200,
            body: serde_json::json!({ "enrolled": enrolled, "reason": reason }).to_string(),
        }
    }

    /// An error status with its message.
    pub fn error(status: u16, message: impl Into<String>) -> Answer {
        Answer {
            status,
            body: message.into(),
        }
    }
}

/// A request and where its answer goes.
pub type Job = (PluginRequest, oneshot::Sender<Answer>);

/// Binds the socket: removes a stale one, creates the directory (0750), restricts the socket to root
/// (0600: only the container runtime, which runs the plugin as root, may enroll pods; istio-cni uses 0666).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves plugin requests until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    jobs: mpsc::Sender<Job>,
    shutdown: watch::Receiver<bool>,
) {
    serve_with(listener, jobs, shutdown, READ_TIMEOUT).await
}

/// [`serve`], each client having `read_timeout` to send its request (tests lengthen it, so that only an
/// eviction can free a slot).
async fn serve_with(
    listener: UnixListener,
    jobs: mpsc::Sender<Job>,
    mut shutdown: watch::Receiver<bool>,
    read_timeout: Duration,
) {
    let slots = Slots::new(MAX_CONCURRENT, WhenAllBusy::Wait);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                // Waits only while every held connection has a request with the agent.
                let (slot, evicted) = tokio::select! {
                    admitted = slots.admit() => admitted,
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                tokio::spawn(handle(stream, jobs.clone(), slot, evicted, read_timeout));
            }
            Err(e) => {
                tracing::warn!(error = %e, "plugin socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    mut stream: UnixStream,
    jobs: mpsc::Sender<Job>,
    slot: Slot,
    evicted: Evicted,
    read_timeout: Duration,
) {
    let read = tokio::select! {
        read = tokio::time::timeout(read_timeout, read_request(&mut stream)) => Some(read),
        _ = evicted => None,
    };
    let Some(read) = read else {
        tracing::debug!("plugin connection evicted: no request yet while every slot was taken");
        // Best effort and never blocking: the socket goes either way.
        let _ = stream.try_write(encode(&Answer::error(503, EVICTED)).as_bytes());
        return;
    };
    // From here on the connection is a real request (or its answer): never evicted.
    slot.set_busy();
    let answer = match read {
        Err(_) => Answer::error(
            408,
            format!("request not received within {}s", read_timeout.as_secs()),
        ),
        Ok(Err(a)) => a,
        Ok(Ok(req)) => {
            let (tx, rx) = oneshot::channel();
            if jobs.send((req, tx)).await.is_err() {
                Answer::error(503, "the agent is shutting down")
            } else {
                rx.await
                    .unwrap_or_else(|_| Answer::error(500, "the agent dropped the request"))
            }
        }
    };
    if answer.status >= 400 {
        tracing::warn!(status = answer.status, message = %answer.body, "plugin request refused");
    }
    let _ = stream.write_all(encode(&answer).as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// What an evicted connection is told.
const EVICTED: &str =
    "every plugin connection slot was taken and this one had sent no complete request; retry";

/// The HTTP/1.1 response carrying `answer`.
fn encode(answer: &Answer) -> String {
    let reason = match answer.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        answer.status,
        if answer.status == 200 {
            "application/json"
        } else {
            "text/plain"
        },
        answer.body.len(),
        answer.body
    )
}

/// Reads one request and decodes its body; any problem becomes the answer to send.
pub(crate) async fn read_request(stream: &mut UnixStream) -> Result<PluginRequest, Answer> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= MAX_REQUEST {
            return Err(Answer::error(413, "request headers too large"));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Answer::error(400, format!("reading request: {e}")))?;
        if n == 0 {
            return Err(Answer::error(
                400,
                "connection closed before a full request",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end])
        .map_err(|_| Answer::error(400, "request headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    if !request_line.ends_with("HTTP/1.1") && !request_line.ends_with("HTTP/1.0") {
        return Err(Answer::error(400, "not an HTTP/1.x request"));
    }
    let mut length: Option<usize> = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = Some(
                    v.trim()
                        .parse()
                        .map_err(|_| Answer::error(400, "bad Content-Length"))?,
                );
            }
        }
    }
    if method != "POST" {
        return Err(Answer::error(
            405,
            format!("{method} not allowed; use POST"),
        ));
    }
    let length = length.ok_or_else(|| Answer::error(400, "Content-Length required"))?;
    // The declared length is the client's word: add it without overflowing before comparing.
    let end = header_end
        .checked_add(length)
        .filter(|end| *end <= MAX_REQUEST)
        .ok_or_else(|| {
            Answer::error(
                413,
                format!("request body of {length} bytes exceeds the {MAX_REQUEST}-byte limit"),
            )
        })?;
    while buf.len() < end {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Answer::error(400, format!("reading body: {e}")))?;
        if n == 0 {
            return Err(Answer::error(
                400,
                "connection closed before the whole body",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[header_end..end];
    let bad = |e: serde_json::Error| {
        Answer::error(400, format!("{path}: body is not a valid event: {e}"))
    };
    Ok(match path.as_str() {
        "/cmdadd" => PluginRequest::Add(serde_json::from_slice(body).map_err(bad)?),
        "/cmddel" => PluginRequest::Del(serde_json::from_slice(body).map_err(bad)?),
        "/cmdcheck" => PluginRequest::Check(serde_json::from_slice(body).map_err(bad)?),
        "/cmdgc" => PluginRequest::Gc(serde_json::from_slice(body).map_err(bad)?),
        other => return Err(Answer::error(404, format!("unknown path {other:?}"))),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn roundtrip(path: &Path, raw: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Issue 11: 64 sockets that sent nothing held every slot for the 5 s read timeout, again and again, and
    /// every CNI ADD on the node waited behind them. Now a newcomer evicts the oldest connection still
    /// sending its request (a dribbling one too). The read timeout is an hour here, so only an eviction can
    /// have made room for the request.
    #[tokio::test]
    async fn a_request_is_answered_while_silent_and_dribbling_sockets_hold_every_slot() {
        use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pluginevent.sock");
        let l = bind(&sock).unwrap();
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve_with(l, tx, shutdown, Duration::from_secs(3600)));
        tokio::spawn(async move {
            while let Some((_, answer)) = rx.recv().await {
                let _ = answer.send(Answer::enrolled(true, "served"));
            }
        });
        // Oldest first (connections are accepted in this order): sockets dribbling a header that never
        // ends, a byte a second, then sockets that send nothing; more of them than slots.
        const DRIBBLING: usize = 8;
        let mut held: Vec<(OwnedReadHalf, Option<OwnedWriteHalf>)> = Vec::new();
        for _ in 0..DRIBBLING {
            let (read, mut write) = UnixStream::connect(&sock).await.unwrap().into_split();
            tokio::spawn(async move {
                let mut next: &[u8] = b"POST /cmdadd HTTP/1.1\r\nX-Slow: ";
                // Ends when the server closes the socket.
                while write.write_all(next).await.is_ok() {
                    next = b"a";
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            held.push((read, None));
        }
        for _ in 0..MAX_CONCURRENT {
            let (read, write) = UnixStream::connect(&sock).await.unwrap().into_split();
            held.push((read, Some(write)));
        }
        // A generous guard, not a bound: without eviction the request is never read.
        let ok = tokio::time::timeout(
            Duration::from_secs(60),
            roundtrip(
                &sock,
                b"POST /cmdadd HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            ),
        )
        .await
        .expect("the request is answered while other sockets hold every slot");
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.contains("served"),
            "{ok}"
        );
        // One eviction per newcomer, oldest first: every dribbling socket and the oldest silent one were
        // told why; the newest silent sockets still hold their slots (none timed out).
        let evicted = held.len() + 1 - MAX_CONCURRENT;
        assert_eq!(evicted, DRIBBLING + 1);
        for (i, (read, _)) in held.iter_mut().enumerate() {
            if i < evicted {
                let mut out = String::new();
                tokio::time::timeout(Duration::from_secs(10), read.read_to_string(&mut out))
                    .await
                    .expect("an evicted socket is closed")
                    .unwrap();
                assert!(
                    out.starts_with("HTTP/1.1 503") && out.contains("slot"),
                    "socket {i}: {out:?}"
                );
            } else {
                let mut byte = [0u8; 1];
                let quiet = read.try_read(&mut byte);
                assert!(
                    quiet
                        .as_ref()
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
                    "socket {i} should still be open and unanswered: {quiet:?}"
                );
            }
        }
        // Still serving.
        let again = roundtrip(
            &sock,
            b"POST /cmdadd HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    }

    #[tokio::test]
    async fn a_content_length_of_u64_max_gets_413_and_the_server_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pluginevent.sock");
        let l = bind(&sock).unwrap();
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve(l, tx, shutdown));
        tokio::spawn(async move {
            while let Some((_, answer)) = rx.recv().await {
                let _ = answer.send(Answer::enrolled(false, "test"));
            }
        });
        for length in [u64::MAX, u64::MAX - 2, MAX_REQUEST as u64] {
            let raw = format!("POST /cmdadd HTTP/1.1\r\nContent-Length: {length}\r\n\r\n{{}}");
            let out = roundtrip(&sock, raw.as_bytes()).await;
            assert!(
                out.starts_with("HTTP/1.1 413 Payload Too Large") && out.contains("limit"),
                "Content-Length {length} -> {out:?}"
            );
        }
        let ok = roundtrip(
            &sock,
            b"POST /cmdadd HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }

    #[tokio::test]
    async fn istio_style_add_events_reach_the_agent_and_garbage_gets_400() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/pluginevent.sock");
        let l = bind(&sock).unwrap();
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve(l, tx, shutdown));
        tokio::spawn(async move {
            while let Some((req, answer)) = rx.recv().await {
                let PluginRequest::Add(ev) = req else {
                    let _ = answer.send(Answer::error(500, "unexpected"));
                    continue;
                };
                let _ = answer.send(Answer::enrolled(
                    true,
                    &format!("{} {:?}", ev.pod_name, ev.ips()),
                ));
            }
        });
        let body = r#"{"Netns":"/var/run/netns/x","PodName":"web","PodNamespace":"default","IPs":[{"Interface":null,"Address":{"IP":"10.1.0.5","Mask":"////AA=="},"Gateway":"10.1.0.1"}]}"#;
        let req = format!(
            "POST /cmdadd HTTP/1.1\r\nHost: unix\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let out = roundtrip(&sock, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.contains(r#""enrolled":true"#) && out.contains("web [10.1.0.5]"),
            "{out}"
        );

        for (raw, status) in [
            (&b"\x00\x01garbage\r\n\r\n"[..], "400"),
            (b"GET /cmdadd HTTP/1.1\r\n\r\n", "405"),
            (
                b"POST /cmdadd HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nop}",
                "400",
            ),
            (
                b"POST /other HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                "404",
            ),
            (
                b"POST /cmdadd HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
                "413",
            ),
        ] {
            let out = roundtrip(&sock, raw).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status}")),
                "{raw:?} -> {out}"
            );
        }
        // Still serving after all that.
        let out = roundtrip(&sock, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// Found by the `plugin_request` fuzz target's harness: a Content-Length near `usize::MAX` overflowed the
    /// size check (a panic with overflow checks, an out-of-range slice without) instead of getting 413.
    #[tokio::test]
    async fn a_content_length_near_usize_max_is_too_large_not_a_panic() {
        for length in [usize::MAX, usize::MAX - 40] {
            let (mut client, mut server) = UnixStream::pair().unwrap();
            let raw = format!("POST /cmdadd HTTP/1.1\r\nContent-Length: {length}\r\n\r\n{{}}");
            client.write_all(raw.as_bytes()).await.unwrap();
            client.shutdown().await.unwrap();
            let answer = read_request(&mut server).await.expect_err("refused");
            assert_eq!(answer.status, 413, "{length}: {}", answer.body);
        }
    }
}
