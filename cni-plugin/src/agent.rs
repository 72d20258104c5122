//! Talking to the meshnode CNI agent: HTTP/1.1 over its unix socket, plus the enrollment hint file.
//!
//! Input: the agent run dir (`cni_agent_run_dir`), the event to send, the pod's namespace.
//! Output: the agent's [`Answer`] (status and body, at most [`MAX_ANSWER`] bytes) or a [`TransportError`]
//! when it cannot be reached within [`TIMEOUT`]; the event body in Istio's `CNIPluginAddEvent` shape
//! ([`event_body`]); and the verdict of the hint file the agent writes for when it is down ([`read_hint`]).
//! The protocol is fixed: `POST /cmdadd|/cmddel|/cmdcheck|/cmdgc` on `<run dir>/pluginevent.sock`.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::env::CniEnv;
use crate::result::IpConfig;

/// The agent's socket, relative to the run dir (istio-cni's name).
pub(crate) const SOCKET_NAME: &str = "pluginevent.sock";
/// The hint file the agent writes: namespaces where pods are enrolled by namespace label.
pub(crate) const HINT_FILE: &str = "meshnode-enrollment.json";
/// Total time for one exchange with the agent (Istio's plugin uses the same 5 s client timeout).
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);
/// Most answer body read: the agent's answers are a small JSON object or an error message.
pub(crate) const MAX_ANSWER: usize = 64 * 1024;
/// Most status line + headers read before the body.
const MAX_HEAD: usize = 8 * 1024;
/// Largest hint file accepted (a list of namespace names); larger counts as malformed.
const MAX_HINT: u64 = 1024 * 1024;

/// Why the agent could not be asked.
#[derive(Debug)]
pub(crate) enum TransportError {
    /// Connecting to the socket failed (missing, refused, permission).
    Connect {
        /// The connect error.
        source: io::Error,
    },
    /// Sending the request or reading the answer failed.
    Io {
        /// The I/O error.
        source: io::Error,
    },
    /// No complete answer within the time limit.
    Timeout {
        /// The limit.
        after: Duration,
    },
    /// The answer is not HTTP/1.x.
    BadAnswer {
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Connect { source } => write!(f, "connect: {source}"),
            TransportError::Io { source } => write!(f, "exchange: {source}"),
            TransportError::Timeout { after } => write!(f, "no answer within {after:?}"),
            TransportError::BadAnswer { reason } => write!(f, "bad answer: {reason}"),
        }
    }
}

impl std::error::Error for TransportError {}

/// The agent's HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    /// HTTP status code.
    pub(crate) status: u16,
    /// Body, lossily decoded as UTF-8, at most [`MAX_ANSWER`] bytes.
    pub(crate) body: String,
}

/// What a 200 answer says about the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Enrollment {
    /// Whether the agent enrolled the pod (an empty body, Istio's agent, means yes).
    pub(crate) enrolled: bool,
    /// The agent's reason, if it gave one.
    pub(crate) reason: String,
}

impl Answer {
    /// Reads `{"enrolled": bool, "reason": "..."}` from a 200 body; an empty or non-JSON body means enrolled.
    pub(crate) fn enrollment(&self) -> Enrollment {
        let parsed: Option<Value> = serde_json::from_str(self.body.trim()).ok();
        let field = |k: &str| parsed.as_ref().and_then(|v| v.get(k).cloned());
        Enrollment {
            enrolled: field("enrolled").and_then(|v| v.as_bool()).unwrap_or(true),
            reason: field("reason")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        }
    }
}

/// A client for the agent socket under one run dir.
#[derive(Debug, Clone)]
pub(crate) struct Agent {
    socket: PathBuf,
    timeout: Duration,
}

impl Agent {
    /// The agent of `run_dir`.
    pub(crate) fn new(run_dir: &Path) -> Agent {
        Agent {
            socket: run_dir.join(SOCKET_NAME),
            timeout: TIMEOUT,
        }
    }

    /// The socket path.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// POSTs `body` to `path` and returns the answer, within the time limit overall.
    ///
    /// The exchange runs on its own thread because std has no connect timeout for unix sockets (a connect
    /// to a listener with a full backlog blocks); if the limit passes, the thread is abandoned and dies with
    /// the process, which exits right after.
    pub(crate) fn post(&self, path: &'static str, body: Vec<u8>) -> Result<Answer, TransportError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let socket = self.socket.clone();
        let timeout = self.timeout;
        let deadline = Instant::now() + timeout;
        let spawned = std::thread::Builder::new()
            .name("agent-post".into())
            .spawn(move || {
                let _ = tx.send(exchange(&socket, path, &body, deadline));
            });
        if let Err(source) = spawned {
            return Err(TransportError::Io { source });
        }
        match rx.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(_) => Err(TransportError::Timeout { after: timeout }),
        }
    }
}

fn remaining(deadline: Instant) -> Result<Duration, TransportError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(TransportError::Timeout { after: TIMEOUT })
    } else {
        Ok(left)
    }
}

fn io_err(source: io::Error) -> TransportError {
    match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            TransportError::Timeout { after: TIMEOUT }
        }
        _ => TransportError::Io { source },
    }
}

fn exchange(
    socket: &Path,
    path: &str,
    body: &[u8],
    deadline: Instant,
) -> Result<Answer, TransportError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| TransportError::Connect { source })?;
    stream
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(io_err)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: unix\r\nUser-Agent: meshnode-cni\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).map_err(io_err)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let limit = MAX_HEAD + MAX_ANSWER;
    while buf.len() < limit {
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(io_err)?;
        let want = (limit - buf.len()).min(chunk.len());
        let n = match stream.read(&mut chunk[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A peer that closes after answering may reset instead of FIN; keep what arrived.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => 0,
            Err(e) => return Err(io_err(e)),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((head_len, Some(len))) = head_info(&buf) {
            // The declared length is the agent's word: a sum that overflows, or a body larger than we
            // would keep, ends the read here and `parse_answer` refuses it.
            match head_len.checked_add(len) {
                Some(end) if len <= MAX_ANSWER => {
                    if buf.len() >= end {
                        break;
                    }
                }
                _ => break,
            }
        }
    }
    parse_answer(&buf)
}

/// Where the head ends (after the blank line), and the Content-Length if given.
fn head_info(buf: &[u8]) -> Option<(usize, Option<usize>)> {
    let end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]);
    let len = header(&head, "content-length").and_then(|v| v.trim().parse().ok());
    Some((end, len))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Parses an HTTP/1.x answer: status, then a body delimited by Content-Length, chunked encoding or EOF.
pub(crate) fn parse_answer(buf: &[u8]) -> Result<Answer, TransportError> {
    if buf.is_empty() {
        return Err(TransportError::BadAnswer {
            reason: "connection closed without an answer",
        });
    }
    // The head must end within MAX_HEAD (plus the blank line).
    let (head_len, content_length) =
        head_info(&buf[..buf.len().min(MAX_HEAD + 4)]).ok_or(TransportError::BadAnswer {
            reason: "no complete HTTP header",
        })?;
    let head = String::from_utf8_lossy(&buf[..head_len]);
    let status_line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let status = match (parts.next(), parts.next()) {
        (Some(proto), Some(code)) if proto.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or(TransportError::BadAnswer {
        reason: "not an HTTP/1.x status line",
    })?;
    if content_length.is_some_and(|len| len > MAX_ANSWER) {
        return Err(TransportError::BadAnswer {
            reason: "Content-Length larger than the answer limit",
        });
    }
    let rest = &buf[head_len..];
    let chunked = header(&head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        let len = content_length.unwrap_or(rest.len()).min(rest.len());
        rest[..len].to_vec()
    };
    let body = &body[..body.len().min(MAX_ANSWER)];
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// Decodes chunked transfer encoding, keeping what is complete (a truncated answer is still shown).
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(rest, b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        if size == 0 {
            break;
        }
        let data = &rest[line_end + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        // The size is the agent's word: only step past a chunk (and its CRLF) that is all there.
        match size.checked_add(2) {
            Some(next) if next <= data.len() => rest = &data[next..],
            _ => break,
        }
    }
    out
}

/// The event body: Istio's `CNIPluginAddEvent` keys (Go field names) plus `PodUID`, `ContainerID`, `IfName`.
pub(crate) fn event_body(env: &CniEnv, ips: &[IpConfig]) -> Value {
    let ips: Vec<Value> = ips
        .iter()
        .map(|ip| {
            json!({
                "Interface": ip.interface,
                "Address": {
                    "IP": ip.address.addr.to_string(),
                    "Mask": base64(&ip.address.mask_bytes()),
                },
                "Gateway": ip.gateway.map(|g| g.to_string()).unwrap_or_default(),
            })
        })
        .collect();
    json!({
        "Netns": env.netns.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
        "PodName": env.pod.name.clone().unwrap_or_default(),
        "PodNamespace": env.pod.namespace.clone().unwrap_or_default(),
        "PodUID": env.pod.uid.clone().unwrap_or_default(),
        "ContainerID": env.container_id,
        "IfName": env.ifname,
        "IPs": ips,
    })
}

/// Standard base64 with padding, as Go's `encoding/json` encodes a `[]byte` (here a `net.IPMask`).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What the hint file says about a namespace's pods while the agent cannot be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hint {
    /// No pod there can be enrolled: the namespace is excluded, or the agent listed it as one no selector
    /// reaches, and the hint is still current.
    PassThrough,
    /// A pod there may have to be captured (or nothing can be ruled out): fail closed, for this reason.
    MayEnroll {
        /// Why.
        reason: String,
    },
}

/// Reads `<run_dir>/meshnode-enrollment.json` and decides for `namespace` at `now` (Unix seconds).
///
/// The agent writes `{"version": 2, "validUntil": <unix s>, "excludedNamespaces": [...],
/// "passThroughNamespaces": [...], "ambientNamespaces": [...]}` and renews it while it runs. The plugin
/// cannot see pod labels, so only a namespace that no enablement selector can reach (whatever a pod's
/// labels) passes through, and only until `validUntil`: a namespace labelled while the agent is down is
/// then not trusted for long. Excluded namespaces pass whatever the age. Anything else, an older
/// format included, fails closed.
pub(crate) fn read_hint(run_dir: &Path, namespace: &str, now: u64) -> Hint {
    let path = run_dir.join(HINT_FILE);
    let may = |why: String| Hint::MayEnroll {
        reason: format!("hint file {}: {why}", path.display()),
    };
    let mut text = Vec::new();
    let read = std::fs::File::open(&path).and_then(|f| f.take(MAX_HINT + 1).read_to_end(&mut text));
    if let Err(e) = read {
        return may(format!("it cannot be ruled out: {e}"));
    }
    if text.len() as u64 > MAX_HINT {
        return may(format!("larger than {MAX_HINT} bytes"));
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct HintFile {
        version: u32,
        valid_until: u64,
        excluded_namespaces: Vec<String>,
        pass_through_namespaces: Vec<String>,
        #[serde(default)]
        ambient_namespaces: Vec<String>,
    }
    let h = match serde_json::from_slice::<HintFile>(&text) {
        Ok(h) if h.version == 2 => h,
        Ok(h) => return may(format!("version {} is not understood", h.version)),
        Err(e) => return may(format!("malformed or from an older agent: {e}")),
    };
    let listed = |list: &[String]| list.iter().any(|n| n == namespace);
    if listed(&h.excluded_namespaces) {
        Hint::PassThrough
    } else if listed(&h.ambient_namespaces) {
        may(format!("namespace {namespace} is ambient"))
    } else if !listed(&h.pass_through_namespaces) {
        may(format!(
            "a pod in namespace {namespace} may be enrolled (by its own labels, or the namespace is new)"
        ))
    } else if now > h.valid_until {
        may(format!(
            "stale: the agent has not renewed it for {} s, so namespace labels may have changed",
            now - h.valid_until
        ))
    } else {
        Hint::PassThrough
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_go_for_masks() {
        assert_eq!(base64(&[255, 255, 255, 0]), "////AA==");
        assert_eq!(base64(&[255, 255, 0, 0]), "//8AAA==");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn answers_with_content_length_chunks_or_eof_are_read() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiEXTRA").expect("ok");
        assert_eq!((a.status, a.body.as_str()), (200, "hi"));
        let a = parse_answer(
            b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("ok");
        assert_eq!((a.status, a.body.as_str()), (500, "abcde"));
        let a = parse_answer(b"HTTP/1.0 404 Not Found\r\n\r\nno such").expect("ok");
        assert_eq!((a.status, a.body.as_str()), (404, "no such"));
        assert!(parse_answer(b"garbage\r\n\r\n").is_err());
        assert!(parse_answer(b"").is_err());
    }

    /// A one-shot agent on a socket in `dir` that reads the request head and writes `answer`.
    fn fake_agent(dir: &Path, answer: &'static [u8]) -> std::thread::JoinHandle<()> {
        let listener = std::os::unix::net::UnixListener::bind(dir.join(SOCKET_NAME)).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = s.write_all(answer);
        })
    }

    #[test]
    fn an_agent_answer_declaring_u64_max_bytes_is_a_bad_answer_not_a_crash() {
        let dir =
            std::env::temp_dir().join(format!("meshnode-cni-u64-answer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let agent = fake_agent(
            &dir,
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n{}",
        );
        let result = Agent::new(&dir).post("/cmdadd", b"{}".to_vec());
        let _ = std::fs::remove_dir_all(&dir);
        let err = result.expect_err("an answer that cannot be read whole");
        assert!(
            matches!(err, TransportError::BadAnswer { .. }),
            "expected a bad answer, got: {err}"
        );
        agent.join().expect("fake agent");
        // The same declared length, and a chunk size of 2^64-1, straight into the parser.
        let declared =
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\nhi");
        assert!(declared.is_err());
        let a = parse_answer(
            b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nffffffffffffffff\r\ncd",
        )
        .expect("ok");
        assert_eq!((a.status, a.body.as_str()), (500, "abcd"));
    }

    #[test]
    fn the_hint_lets_pods_pass_only_where_no_selector_reaches_and_only_while_current() {
        let dir = std::env::temp_dir().join(format!("meshnode-hint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |v: &Value| std::fs::write(dir.join(HINT_FILE), v.to_string()).unwrap();
        let hint = json!({
            "version": 2, "validUntil": 1000,
            "excludedNamespaces": ["kube-system"],
            "passThroughNamespaces": ["plain"],
            "ambientNamespaces": ["mesh"],
        });
        write(&hint);
        let fails = |ns: &str, now: u64, why: &str| match read_hint(&dir, ns, now) {
            Hint::MayEnroll { reason } => assert!(reason.contains(why), "{ns}: {reason}"),
            Hint::PassThrough => panic!("{ns} passed at {now}"),
        };
        assert_eq!(read_hint(&dir, "plain", 1000), Hint::PassThrough);
        assert_eq!(read_hint(&dir, "kube-system", 99_999), Hint::PassThrough);
        fails("plain", 1001, "stale");
        fails("mesh", 10, "is ambient");
        fails("unknown", 10, "may be enrolled");
        let mut v3 = hint;
        v3["version"] = json!(3);
        write(&v3);
        fails("plain", 10, "version 3");
        write(&json!({ "ambientNamespaces": [] }));
        fails("plain", 10, "older agent");
        std::fs::remove_dir_all(&dir).unwrap();
        fails("plain", 10, "cannot be ruled out");
    }

    #[test]
    fn an_empty_200_means_enrolled() {
        let a = Answer {
            status: 200,
            body: String::new(),
        };
        assert!(a.enrollment().enrolled);
        let a = Answer {
            status: 200,
            body: r#"{"enrolled":false,"reason":"namespace not ambient"}"#.into(),
        };
        assert_eq!(
            a.enrollment(),
            Enrollment {
                enrolled: false,
                reason: "namespace not ambient".into()
            }
        );
    }
}
