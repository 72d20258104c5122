//! Readiness (:15021 `GET /healthz/ready`, and the CNI agent's :8000 `GET /readyz`), as ztunnel answers it: `200 ready` once every start-up task
//! has finished, `500 not ready, pending: ...` before.
//!
//! Input: start-up tasks registered by name and marked done by whoever owns them; HTTP/1.1 requests.
//! Output: the answers. Requests are read with a 2 s deadline and an 8 KiB cap, like ztunnel's admin
//! servers, so a slow or hostile client cannot hold the port.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Longest request accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time allowed to send the request headers.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The set of start-up tasks still pending.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<&'static str>>,
}

/// A pending task; marks itself done when dropped or when [`Task::done`] is called.
pub struct Task {
    ready: Arc<Readiness>,
    name: &'static str,
}

impl Task {
    /// Marks the task done.
    pub fn done(self) {}
}

impl Drop for Task {
    fn drop(&mut self) {
        self.ready.pending.lock().remove(self.name);
    }
}

impl Readiness {
    /// A new, empty (ready) set.
    pub fn new() -> Arc<Readiness> {
        Arc::default()
    }

    /// Registers a pending task.
    pub fn register(self: &Arc<Self>, name: &'static str) -> Task {
        self.pending.lock().insert(name);
        Task {
            ready: self.clone(),
            name,
        }
    }

    /// Names of pending tasks; empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending.lock().iter().copied().collect()
    }
}

/// Serves readiness on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    ready: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let ready = ready.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(READ_TIMEOUT * 2, answer(stream, &ready)).await;
                    });
                }
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

async fn answer(mut stream: TcpStream, ready: &Readiness) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if buf.len() > MAX_REQUEST {
                return Ok(false);
            }
        }
    })
    .await;
    let response = match complete {
        Ok(Ok(true)) => {
            let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                // ztunnel's path, and istio-cni's (`/readyz` on its health port).
                (Some("GET"), Some("/healthz/ready" | "/readyz")) => {
                    let pending = ready.pending();
                    if pending.is_empty() {
                        reply(200, "OK", "ready\n")
                    } else {
                        reply(
                            500,
                            "Internal Server Error",
                            &format!("not ready, pending: {}\n", pending.join(", ")),
                        )
                    }
                }
                // Liveness: the process answers.
                (Some("GET"), Some("/healthz")) => reply(200, "OK", "alive\n"),
                (Some(_), Some(_)) => reply(404, "Not Found", "not found\n"),
                _ => reply(400, "Bad Request", "bad request\n"),
            }
        }
        _ => reply(400, "Bad Request", "bad request\n"),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn reply(code: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
