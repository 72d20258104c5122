//! The waypoint's request metrics, with Istio's names and labels (`reporter="waypoint"`), and its access
//! log line.
//!
//! Input: one [`RequestLog`] per HTTP request, filled in as the request goes (client, destination,
//! endpoint, route, status, flags, bytes) and finished when the response has been sent or abandoned.
//! Output: the families below in one registry per process, served as OpenMetrics text on `:15020` by
//! [`crate::metrics::serve_encoded`], and one `access` log line per request (ztunnel-like key=value).
//!
//! | name (as scraped) | type |
//! |---|---|
//! | `istio_requests_total` | counter |
//! | `istio_request_duration_milliseconds` | histogram (Istio's buckets, ms) |
//! | `istio_request_bytes` | histogram (request head + body) |
//! | `istio_response_bytes` | histogram (response head + body) |
//! | `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total` | counters (TCP ports) |
//! | `istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total` | counters (TCP ports, at close) |
//! | `istio_build` | gauge, 1, `component="proxy"` (pilot-agent's label for Istio's Envoy proxies) and `tag` |
//! | `process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`, `process_threads` | gauges, read at each scrape |
//!
//! Labels: Istio's standard set ([`RequestLabels`]); `source_*` from the client's Address workload (found
//! by its address and mTLS identity), `destination_*` from the endpoint's workload and the service
//! addressed. Empty values read `unknown`, as ztunnel writes them. Cost: one label set built and looked up
//! per family at the end of each request; nothing per byte.

use std::net::SocketAddr;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::metrics::PeerLabels;
use crate::state::{Service, Workload};

/// Istio's duration buckets (milliseconds).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets (bytes): powers of ten up to 1 GB.
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// Istio's standard request labels, as a waypoint reports them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// The client (`source_*`), the service addressed and the endpoint (`destination_*`).
    #[prometheus(flatten)]
    pub peer: PeerLabels,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The status sent to the client.
    pub response_code: String,
    /// gRPC status, `-` when none.
    pub grpc_response_status: String,
    /// Envoy's response flags (`-`, `NR`, `UH`, `UF`, `UO`, `UT`, `URX`, `DPE`…).
    pub response_flags: String,
    /// Always `mutual_tls`: clients arrive over HBONE.
    pub connection_security_policy: &'static str,
}

/// Istio's TCP labels as a waypoint reports them: the request labels without the response code and gRPC
/// status, `request_protocol="tcp"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    reporter: &'static str,
    #[prometheus(flatten)]
    peer: PeerLabels,
    request_protocol: &'static str,
    response_flags: String,
    connection_security_policy: &'static str,
}

impl From<RequestLabels> for TcpLabels {
    fn from(l: RequestLabels) -> TcpLabels {
        TcpLabels {
            reporter: l.reporter,
            peer: l.peer,
            request_protocol: "tcp",
            response_flags: l.response_flags,
            connection_security_policy: l.connection_security_policy,
        }
    }
}

/// The TCP families.
#[derive(Default)]
struct Tcp {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
}

/// The process's request metrics.
pub struct WaypointMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp: Tcp,
}

impl Default for WaypointMetrics {
    fn default() -> Self {
        WaypointMetrics::new()
    }
}

impl std::fmt::Debug for WaypointMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaypointMetrics").finish_non_exhaustive()
    }
}

impl WaypointMetrics {
    /// A registry with the request families registered.
    pub fn new() -> WaypointMetrics {
        let mut registry = Registry::default();
        let requests = Family::default();
        let duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let request_bytes = Family::new_with_constructor(size_histogram as fn() -> Histogram);
        let response_bytes = Family::new_with_constructor(size_histogram as fn() -> Histogram);
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Total number of requests", requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Duration of requests in milliseconds",
            duration.clone(),
        );
        istio.register(
            "request_bytes",
            "Size of requests in bytes",
            request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Size of responses in bytes",
            response_bytes.clone(),
        );
        let tcp = Tcp::default();
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            tcp.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            tcp.closed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            tcp.received.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            tcp.sent.clone(),
        );
        crate::metrics::register_build(istio, "proxy");
        registry.register_collector(Box::new(crate::metrics::ProcessCollector));
        WaypointMetrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp,
        }
    }

    /// Counts a TCP connection as opened towards an endpoint.
    pub fn tcp_opened(&self, labels: &TcpLabels) {
        self.tcp.opened.get_or_create(labels).inc();
    }

    /// Counts its close: `received` bytes from the client, `sent` towards it.
    pub fn tcp_closed(&self, labels: &TcpLabels, received: u64, sent: u64) {
        self.tcp.closed.get_or_create(labels).inc();
        if received > 0 {
            self.tcp.received.get_or_create(labels).inc_by(received);
        }
        if sent > 0 {
            self.tcp.sent.get_or_create(labels).inc_by(sent);
        }
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn record(&self, labels: &RequestLabels, millis: f64, request: u64, response: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
        self.request_bytes
            .get_or_create(labels)
            .observe(request as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response as f64);
    }
}

/// The standard labels for a client (`src_identity`, its workload if known), the service addressed and the
/// endpoint's workload; `request_protocol` `http`, `response_code` `0`, to be filled in.
pub fn labels(
    src_identity: &Identity,
    src: Option<&Workload>,
    service: Option<&Service>,
    dst: Option<&Workload>,
    flags: &str,
) -> RequestLabels {
    RequestLabels {
        reporter: "waypoint",
        peer: PeerLabels::new(src, Some(src_identity), dst, service),
        request_protocol: "http",
        response_code: "0".to_string(),
        grpc_response_status: "-".to_string(),
        response_flags: flags.to_string(),
        connection_security_policy: "mutual_tls",
    }
}

/// Everything known about one request, recorded once when it ends (dropped: recorded as it stands).
pub struct RequestLog {
    metrics: std::sync::Arc<WaypointMetrics>,
    start: Instant,
    /// The client's HBONE address.
    pub src: SocketAddr,
    /// The client's identity.
    pub src_identity: Identity,
    /// The client's workload, if the Address resources know it.
    pub src_workload: Option<std::sync::Arc<Workload>>,
    /// The CONNECT's `:authority`.
    pub authority: String,
    /// The service addressed.
    pub service: Option<std::sync::Arc<Service>>,
    /// The endpoint chosen (last try).
    pub endpoint: Option<(std::sync::Arc<Workload>, SocketAddr)>,
    /// `:method`.
    pub method: http::Method,
    /// `:path`.
    pub path: String,
    /// The route taken.
    pub route: Option<String>,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// The status sent.
    pub status: u16,
    /// Envoy's flags, `-` when none.
    pub flags: &'static str,
    /// The deciding policy of a denial.
    pub policy: Option<String>,
    /// Tries made upstream.
    pub tries: u32,
    /// Request size (head and body).
    pub request_bytes: u64,
    /// Response size so far (head and body).
    pub response_bytes: u64,
    done: bool,
}

impl RequestLog {
    /// A log for a request arriving now.
    pub fn new(
        metrics: std::sync::Arc<WaypointMetrics>,
        src: SocketAddr,
        src_identity: Identity,
        authority: String,
        method: http::Method,
        path: String,
    ) -> RequestLog {
        RequestLog {
            metrics,
            start: Instant::now(),
            src,
            src_identity,
            src_workload: None,
            authority,
            service: None,
            endpoint: None,
            method,
            path,
            route: None,
            protocol: "http",
            status: 0,
            flags: "-",
            policy: None,
            tries: 0,
            request_bytes: 0,
            response_bytes: 0,
            done: false,
        }
    }

    fn labels(&self) -> RequestLabels {
        let mut l = labels(
            &self.src_identity,
            self.src_workload.as_deref(),
            self.service.as_deref(),
            self.endpoint.as_ref().map(|(w, _)| &**w),
            self.flags,
        );
        l.request_protocol = self.protocol;
        l.response_code = self.status.to_string();
        l
    }

    /// Records the request (metrics and access log). Later calls do nothing.
    pub fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.start.elapsed();
        let millis = elapsed.as_secs_f64() * 1000.0;
        self.metrics.record(
            &self.labels(),
            millis,
            self.request_bytes,
            self.response_bytes,
        );
        let endpoint = self
            .endpoint
            .as_ref()
            .map_or_else(|| "-".to_string(), |(_, a)| a.to_string());
        tracing::info!(
            target: "access",
            reporter = "waypoint",
            src.addr = %self.src,
            src.identity = %self.src_identity,
            dst.hbone_addr = %self.authority,
            dst.service = self.service.as_deref().map_or("-", |s| s.hostname.as_str()),
            dst.addr = %endpoint,
            method = %self.method,
            path = %self.path,
            protocol = self.protocol,
            status = self.status,
            flags = self.flags,
            route = self.route.as_deref().unwrap_or("-"),
            policy = self.policy.as_deref().unwrap_or("-"),
            tries = self.tries,
            bytes_recv = self.request_bytes,
            bytes_sent = self.response_bytes,
            duration = format!("{}ms", elapsed.as_millis()),
            "request complete"
        );
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The size of a header block as it goes on the wire in HTTP/1.1 (`name: value\r\n` per header).
pub fn headers_size(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_waypoint_reports_its_build_and_process_figures() {
        let text = WaypointMetrics::new().encode();
        assert!(
            text.contains(&format!(
                "istio_build{{component=\"proxy\",tag=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("\nprocess_open_fds "), "{text}");
    }
}
