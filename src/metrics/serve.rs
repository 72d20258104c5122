//! `GET /metrics` (and its alias `GET /stats/prometheus`, as ztunnel serves it) over HTTP/1.1 (ztunnel's
//! `:15020`): the registry as OpenMetrics text, through
//! [`crate::admin_http`] (its bounds: 8 KiB request heads, 2 s to send them, a few scrapes at once).
//!
//! Input: a bound listener, the process's [`Metrics`], a shutdown signal. Output: one answer per connection.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Metrics;
use crate::admin_http::Answer;

/// ztunnel's content type for the text exposition.
const CONTENT_TYPE: &str = "application/openmetrics-text;charset=utf-8;version=1.0.0";

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>) {
    serve_encoded(listener, move || metrics.encode(), shutdown).await
}

/// Serves `GET /metrics` with whatever `encode` renders (any registry as OpenMetrics text).
pub async fn serve_encoded(
    listener: TcpListener,
    encode: impl Fn() -> String + Send + Sync + 'static,
    shutdown: watch::Receiver<bool>,
) {
    crate::admin_http::serve(listener, shutdown, move |method, path| {
        let path = path.split('?').next().unwrap_or_default();
        if method == "GET" && (path == "/metrics" || path == "/stats/prometheus") {
            Answer {
                status: 200,
                reason: "OK",
                content_type: CONTENT_TYPE,
                body: encode(),
            }
        } else {
            Answer::not_found()
        }
    })
    .await
}
