//! The tiny HTTP/1.1 server behind the admin ports (readiness :15021 and the agent's :8000, metrics :15020,
//! the proxy's admin API :15000): one request per connection, answered and closed.
//!
//! Input: a bound listener, a shutdown signal, and a handler: from (method, path) to an [`Answer`]
//! ([`serve`]), or from a [`Request`] to a future of a [`Reply`] ([`serve_async`], for answers that take
//! time: a profile, a drain). Output: the answers. Bounds shared by every admin port: request head at most
//! 8 KiB, sent within 1 s, the whole exchange within 10 s (or the exchange time given to [`serve_async`]),
//! at most [`MAX_CONCURRENT`] connections held at once. A request body is never read.
//!
//! What a kubelet probe needs is to be accepted at once and answered within its timeout (1 s by default),
//! however many idle or slow sockets others hold. So every connection is accepted immediately; when all
//! slots are taken, the oldest connection still waiting for its request head is closed to make room (or,
//! if every one has sent its request, the oldest of all: a client that does not read its answer), through
//! [`crate::conn_slots`]. A probe's whole exchange takes well under a millisecond, so it is never the oldest
//! one waiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::conn_slots::{Slots, WhenAllBusy};

/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time allowed to send the request head: probes, scrapes and curl send it right after connecting.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for the whole exchange (reading, answering, writing).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at once (each at most one head buffer, [`MAX_REQUEST`]): this bounds memory, not who
/// gets in, since a new connection evicts an idle one when all are taken.
pub const MAX_CONCURRENT: usize = 32;

/// An answer: status, reason phrase, content type, body.
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// `content-type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Answer {
    /// A `text/plain` answer.
    pub fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Answer {
        Answer {
            status,
            reason,
            content_type: "text/plain",
            body: body.into(),
        }
    }

    /// `404 not found`.
    pub fn not_found() -> Answer {
        Answer::text(404, "Not Found", "not found\n")
    }
}

/// A request as the handler of [`serve_async`] sees it: the request line's method and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target as sent: path, then `?query` if any.
    pub target: String,
}

impl Request {
    /// The target's path (without the query).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The query's `name=value` pairs, percent-decoded (`+` is a space); a name without `=` has an empty
    /// value. `None` for a pair that is not valid UTF-8 once decoded.
    pub fn query(&self) -> Vec<(String, Option<String>)> {
        let Some((_, q)) = self.target.split_once('?') else {
            return Vec::new();
        };
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k).unwrap_or_default(), percent_decode(v))
            })
            .collect()
    }
}

/// `%XX` and `+` decoding of a query component; `None` when the result is not UTF-8 or an escape is cut.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// An answer of [`serve_async`]'s handler: like [`Answer`], with a body of bytes (a profile is binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// `content-type`.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl From<Answer> for Reply {
    fn from(a: Answer) -> Reply {
        Reply {
            status: a.status,
            reason: a.reason,
            content_type: a.content_type,
            body: a.body.into_bytes(),
        }
    }
}

impl Reply {
    fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
        )
        .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// What [`serve_async`]'s handler returns.
pub type Replying = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

/// Serves `handler` on `listener` until `shutdown` turns true (or its sender is gone).
pub async fn serve<H>(listener: TcpListener, shutdown: watch::Receiver<bool>, handler: H)
where
    H: Fn(&str, &str) -> Answer + Send + Sync + 'static,
{
    serve_async(listener, shutdown, EXCHANGE_TIMEOUT, move |req: Request| {
        let reply = Reply::from(handler(&req.method, &req.target));
        Box::pin(std::future::ready(reply)) as Replying
    })
    .await
}

/// Serves `handler` on `listener` until `shutdown` turns true (or its sender is gone); each exchange
/// (reading the head, the handler's future, writing the answer) gets `exchange_timeout`. Connections
/// already answering when `shutdown` turns true finish (within their exchange time).
pub async fn serve_async<H>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    exchange_timeout: Duration,
    handler: H,
) where
    H: Fn(Request) -> Replying + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    // A connection is busy once its head is in; if all are, the oldest is a client not reading its answer.
    let slots = Slots::new(MAX_CONCURRENT, WhenAllBusy::EvictOldest);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(server = "admin port", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Never waits: with every slot taken, the oldest connection is evicted (its socket closes).
        let (slot, evicted) = slots.admit().await;
        let handler = handler.clone();
        tokio::spawn(async move {
            let exchange = tokio::time::timeout(
                exchange_timeout,
                answer_async(stream, &*handler, slot.busy_flag()),
            );
            tokio::select! {
                _ = exchange => {}
                _ = evicted => {}
            }
        });
    }
}

/// Accepts connections on `listener` until `shutdown` resolves, at most as many at once as `limit` has
/// permits (more wait in the kernel backlog); each is served by `on_conn` on a task of its own, holding a
/// permit until it is done. `what` names the server in logs. Every tiny HTTP server here (the admin ports,
/// the sandbox's apps) accepts this way.
pub async fn accept_bounded<F, Fut>(
    listener: &TcpListener,
    limit: Arc<Semaphore>,
    shutdown: impl std::future::Future<Output = ()>,
    what: &'static str,
    on_conn: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = &mut shutdown => return,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let served = on_conn(stream);
                    tokio::spawn(async move {
                        served.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(server = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => return,
        }
    }
}

/// Reads one request head and writes the handler's answer (400 for anything that is not a request line).
pub(crate) async fn answer(
    stream: TcpStream,
    handler: &(dyn Fn(&str, &str) -> Answer + Send + Sync),
    head_read: &AtomicBool,
) -> std::io::Result<()> {
    let handler = |req: Request| {
        let reply = Reply::from(handler(&req.method, &req.target));
        Box::pin(std::future::ready(reply)) as Replying
    };
    answer_async(stream, &handler, head_read).await
}

/// [`answer`] with a handler answering through a future.
async fn answer_async(
    mut stream: TcpStream,
    handler: &(dyn Fn(Request) -> Replying + Send + Sync),
    head_read: &AtomicBool,
) -> std::io::Result<()> {
    let head = read_head(&mut stream, MAX_REQUEST, READ_TIMEOUT).await;
    head_read.store(true, Ordering::Relaxed);
    let bad = || Reply::from(Answer::text(400, "Bad Request", "bad request\n"));
    let reply = match head {
        Head::Complete(head) => {
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(method), Some(target)) => {
                    handler(Request {
                        method: method.to_string(),
                        target: target.to_string(),
                    })
                    .await
                }
                _ => bad(),
            }
        }
        Head::TooLarge | Head::TimedOut | Head::Closed => bad(),
    };
    stream.write_all(&reply.encode()).await?;
    stream.shutdown().await
}

/// How reading a request head ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// The head, without its final blank line.
    Complete(Vec<u8>),
    /// Longer than allowed.
    TooLarge,
    /// Not complete in time.
    TimedOut,
    /// The peer closed (or the read failed) first.
    Closed,
}

/// Reads one request head of at most `max` bytes, within `timeout`.
pub async fn read_head(stream: &mut TcpStream, max: usize, timeout: Duration) -> Head {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let read = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Head::Closed,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = buf
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .filter(|end| *end <= max)
            {
                buf.truncate(end);
                return Head::Complete(std::mem::take(&mut buf));
            }
            if buf.len() > max {
                return Head::TooLarge;
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Head::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_split_and_percent_decoded() {
        let req = Request {
            method: "POST".into(),
            target: "/logging?level=meshnode%3A%3Aproxy%3Ddebug,info&reset&x=a+b&bad=%zz".into(),
        };
        assert_eq!(req.path(), "/logging");
        assert_eq!(
            req.query(),
            vec![
                ("level".into(), Some("meshnode::proxy=debug,info".into())),
                ("reset".into(), Some(String::new())),
                ("x".into(), Some("a b".into())),
                ("bad".into(), None),
            ]
        );
        let bare = Request {
            method: "GET".into(),
            target: "/".into(),
        };
        assert_eq!(bare.path(), "/");
        assert!(bare.query().is_empty());
    }

    async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(raw).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn a_probe_is_answered_while_more_idle_sockets_than_slots_are_open() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve(l, shutdown, |_: &str, p: &str| match p {
            "/healthz/ready" => Answer::text(200, "OK", "ready\n"),
            _ => Answer::not_found(),
        }));
        // Sockets that connect and never send a request: several times the slots.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONCURRENT + 128 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let probe = tokio::time::timeout(
            Duration::from_secs(10),
            exchange(addr, b"GET /healthz/ready HTTP/1.1\r\nHost: a\r\n\r\n"),
        )
        .await
        .expect("the probe is answered while idle sockets hold the port");
        assert!(probe.starts_with("HTTP/1.1 200 OK"), "{probe}");
        // The oldest idle socket made room: it was closed without an answer.
        let mut first = idle.remove(0);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut rest))
            .await
            .expect("the oldest idle socket is closed");
        assert!(closed.map_or(true, |n| n == 0), "{rest:?}");
    }

    #[tokio::test]
    async fn requests_reach_the_handler_and_garbage_or_oversized_heads_get_400() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve(l, shutdown, |m: &str, p: &str| match (m, p) {
            ("GET", "/x") => Answer::text(200, "OK", "x\n"),
            _ => Answer::not_found(),
        }));
        let ok = exchange(addr, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("\r\n\r\nx\n"),
            "{ok}"
        );
        let missing = exchange(addr, b"GET /y HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let garbage = exchange(addr, b"\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let mut huge = b"GET /x HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST + 10));
        let big = exchange(addr, &huge).await;
        assert!(big.starts_with("HTTP/1.1 400"), "{big}");
        // Still serving.
        assert!(exchange(addr, b"GET /x HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
    }
}
