//! The tiny HTTP/1.1 server behind the admin ports (readiness :15021 and the agent's :8000, metrics :15020):
//! one `GET` per connection, answered and closed.
//!
//! Input: a bound listener, a shutdown signal, and a handler from (method, path) to an [`Answer`].
//! Output: the answers. Bounds shared by every admin port: request head at most 8 KiB, sent within 1 s,
//! the whole exchange within 10 s, at most [`MAX_CONCURRENT`] connections held at once.
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

    fn encode(&self) -> String {
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.body
        )
    }
}

/// Serves `handler` on `listener` until `shutdown` turns true (or its sender is gone).
pub async fn serve<H>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, handler: H)
where
    H: Fn(&str, &str) -> Answer + Send + Sync + 'static,
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
                EXCHANGE_TIMEOUT,
                answer(stream, &*handler, slot.busy_flag()),
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
    mut stream: TcpStream,
    handler: &(dyn Fn(&str, &str) -> Answer + Send + Sync),
    head_read: &AtomicBool,
) -> std::io::Result<()> {
    let head = read_head(&mut stream, MAX_REQUEST, READ_TIMEOUT).await;
    head_read.store(true, Ordering::Relaxed);
    let answer = match head {
        Head::Complete(head) => {
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(method), Some(path)) => handler(method, path),
                _ => Answer::text(400, "Bad Request", "bad request\n"),
            }
        }
        Head::TooLarge | Head::TimedOut | Head::Closed => {
            Answer::text(400, "Bad Request", "bad request\n")
        }
    };
    stream.write_all(answer.encode().as_bytes()).await?;
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
