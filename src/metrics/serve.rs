//! `GET /metrics` over HTTP/1.1 (ztunnel's `:15020`): the registry as OpenMetrics text.
//!
//! Input: a bound listener, the process's [`Metrics`], a shutdown signal. Output: one answer per
//! connection (`connection: close`). Requests are read with a 2 s deadline and an 8 KiB cap, at most
//! [`MAX_SCRAPES`] at once, so a slow or hostile client cannot hold the port or the memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::Metrics;

/// Longest request accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Time allowed to send the request headers.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for the whole exchange (reading, encoding, writing).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; Prometheus scrapes one at a time, a few more leave room for humans.
const MAX_SCRAPES: usize = 8;
/// ztunnel's content type for the text exposition.
const CONTENT_TYPE: &str = "application/openmetrics-text;charset=utf-8;version=1.0.0";

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stopped(&mut shutdown) => return,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, answer(stream, &metrics)).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone), holding no borrow of the value after.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
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
                (Some("GET"), Some(path))
                    if path == "/metrics" || path.starts_with("/metrics?") =>
                {
                    reply(200, "OK", CONTENT_TYPE, &metrics.encode())
                }
                (Some(_), Some(_)) => reply(404, "Not Found", "text/plain", "not found\n"),
                _ => reply(400, "Bad Request", "text/plain", "bad request\n"),
            }
        }
        _ => reply(400, "Bad Request", "text/plain", "bad request\n"),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn reply(code: u16, reason: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
