//! HTTP inside one client tunnel: HTTP/1.1 or HTTP/2 served with hyper on the CONNECT stream, and each
//! request taken through the waypoint's decisions.
//!
//! Input: an accepted CONNECT stream (its first bytes already sniffed), who the client is (HBONE peer
//! address and identity) and what it dialled (`:authority`). Output: one answer per request:
//! authorization (waypoint-wide policies, then the service's: a denial is Envoy's `403 RBAC: access
//! denied`), the port's route (none: `404`, flag `NR`), its action (redirect, direct response, or forward
//! to a cluster picked by weight after the route's request changes), then [`forward`](super::forward).
//! Traffic to a bound workload's own address gets the waypoint-wide policies and goes to that workload,
//! without routes.
//!
//! Bad input never reaches the decisions and never disturbs other streams: a malformed HTTP/1 request is
//! answered `400` and a head over `max_request_headers` `431` by hyper, after which the stream ends; a head
//! not complete `header_read_timeout` after its first byte is answered `408` (Envoy's
//! `request_headers_timeout`). A keep-alive HTTP/1 tunnel with no request and nothing written for
//! [`IDLE_TIMEOUT`] is closed (Envoy's connection idle timeout). HTTP/2 clients get at most 100
//! concurrent streams and the same header limit.
//!
//! The two HTTP/1 timeouts are kept apart with a small clock the tunnel's reads and writes drive
//! ([`Clocked`]): the first byte after a response (or at the start) starts a head; the service taking the
//! request ends it; writing the answer makes the tunnel idle again. (hyper's own header timeout would also
//! close every keep-alive tunnel idle for that long, and answers nothing.)

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::authz::{self, Decision};
use super::body::{Replayable, RespBody};
use super::forward::{forward, local_reply, Forward, Target};
use super::metrics::{headers_size, RequestLog};
use super::routes::Action;
use super::snapshot::{Destination, PortProtocol, Snapshot};
use super::sniff::{Detected, Rewind};
use super::upstream::UpstreamVersion;
use super::Waypoint;
use crate::hbone::tunnel::Tunnel;
use crate::identity::Identity;

/// Envoy's body for an RBAC denial.
pub const RBAC_DENIED: &str = "RBAC: access denied";
/// Our body for a request head that did not arrive in time (Envoy's `request_headers_timeout`).
pub const REQUEST_TIMEOUT: &str = "request timeout";
/// Concurrent HTTP/2 requests per client tunnel (Envoy's waypoint allows 100 streams per connection).
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// An HTTP/1 tunnel with no request in progress and nothing written for this long is closed (Envoy's
/// default connection idle timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where an HTTP/1 tunnel is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in progress.
    Idle,
    /// A request's head has started arriving.
    Head,
    /// The request is being served.
    Request,
}

/// The phase of an HTTP/1 tunnel and when it began.
struct Clock(parking_lot::Mutex<(Phase, Instant)>);

impl Clock {
    fn new() -> Clock {
        Clock(parking_lot::Mutex::new((Phase::Idle, Instant::now())))
    }

    fn get(&self) -> (Phase, Instant) {
        *self.0.lock()
    }

    /// Moves to `to` if in one of `from`.
    fn step(&self, from: &[Phase], to: Phase) {
        let mut p = self.0.lock();
        if from.contains(&p.0) {
            *p = (to, Instant::now());
        }
    }
}

/// A tunnel whose reads start heads and whose writes end requests, on its [`Clock`].
struct Clocked<T> {
    io: T,
    clock: Arc<Clock>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Clocked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.step(&[Phase::Idle], Phase::Head);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Clocked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            // An answer is going out: the tunnel is idle (and active) until the next head starts.
            self.clock.step(&[Phase::Request, Phase::Idle], Phase::Idle);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Which HTTP/1 timeout ran out.
enum Expired {
    Head,
    Idle,
}

/// Resolves when the tunnel has spent too long in a head or idle.
async fn watch_clock(clock: &Clock, head_timeout: Duration) -> Expired {
    loop {
        let (phase, since) = clock.get();
        let now = Instant::now();
        let wake = match phase {
            Phase::Head if since + head_timeout <= now => return Expired::Head,
            Phase::Idle if since + IDLE_TIMEOUT <= now => return Expired::Idle,
            Phase::Head => since + head_timeout,
            Phase::Idle => (since + IDLE_TIMEOUT).min(now + head_timeout),
            // A head may start as soon as the answer is written: look again within one head timeout.
            Phase::Request => now + head_timeout,
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// The client and destination of one tunnel.
pub struct StreamInfo {
    /// The HBONE peer's address.
    pub peer: SocketAddr,
    /// The HBONE peer's identity (the client workload's).
    pub peer_id: Identity,
    /// The CONNECT's `:authority`.
    pub authority: String,
    /// Whether the client speaks HTTP/2 inside the tunnel.
    pub h2: bool,
}

/// Serves HTTP on `io` until the client is done (or the stream fails).
pub async fn serve(wp: Arc<Waypoint>, io: Rewind<Tunnel>, detected: Detected, info: StreamInfo) {
    let info = Arc::new(info);
    let clock = Arc::new(Clock::new());
    let handler = {
        let wp = wp.clone();
        let info = info.clone();
        let clock = clock.clone();
        service_fn(move |req: Request<Incoming>| {
            let wp = wp.clone();
            let info = info.clone();
            clock.step(&[Phase::Idle, Phase::Head], Phase::Request);
            async move { Ok::<_, Infallible>(handle(wp, info, req).await) }
        })
    };
    let cfg = &wp.cfg;
    if detected == Detected::Http2 {
        let res = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(u32::try_from(cfg.max_request_headers).unwrap_or(u32::MAX))
            .initial_stream_window_size(cfg.base.h2.stream_window)
            .initial_connection_window_size(cfg.base.h2.connection_window)
            .serve_connection(TokioIo::new(io), handler)
            .await;
        if let Err(e) = res {
            tracing::debug!(src.addr = %info.peer, error = %e, "HTTP/2 client tunnel ended with an error");
        }
        return;
    }
    let mut io = Clocked {
        io,
        clock: clock.clone(),
    };
    let expired = {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            // Our clock keeps time (see the module's header).
            .header_read_timeout(None)
            .max_header_size(cfg.max_request_headers)
            .max_buf_size(cfg.max_request_headers.max(8192) + 8192)
            .serve_connection(TokioIo::new(&mut io), handler);
        tokio::select! {
            res = conn => {
                if let Err(e) = res {
                    tracing::debug!(src.addr = %info.peer, error = %e, "HTTP/1 client tunnel ended with an error");
                }
                return;
            }
            expired = watch_clock(&clock, cfg.header_read_timeout) => expired,
        }
    };
    match expired {
        Expired::Idle => {
            tracing::debug!(src.addr = %info.peer, "idle HTTP/1 client tunnel closed");
            let _ = io.shutdown().await;
        }
        // A head started but not finished in time is owed an answer.
        Expired::Head => {
            let mut log = RequestLog::new(
                wp.metrics.clone(),
                info.peer,
                info.peer_id.clone(),
                info.authority.clone(),
                http::Method::GET,
                "-".to_string(),
            );
            log.status = 408;
            log.flags = "DPE";
            let answer = format!(
                "HTTP/1.1 408 Request Timeout\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{REQUEST_TIMEOUT}",
                REQUEST_TIMEOUT.len()
            );
            log.response_bytes = answer.len() as u64;
            let _ = io.write_all(answer.as_bytes()).await;
            let _ = io.shutdown().await;
            log.finish();
        }
    }
}

/// The request's `:authority`: the URI's (HTTP/2, absolute form) or the `Host` header.
fn host_of(parts: &http::request::Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// The request body, kept in memory when it is short enough to be sent again on a retry.
async fn replayable(body: Incoming, limit: usize) -> Result<Replayable, hyper::Error> {
    if body.is_end_stream() {
        return Ok(Replayable::Buffered(Bytes::new()));
    }
    match body.size_hint().upper() {
        Some(n) if n <= limit as u64 => Ok(Replayable::Buffered(body.collect().await?.to_bytes())),
        _ => Ok(Replayable::Stream(Some(body))),
    }
}

/// The headers Envoy's waypoint sets on every request it forwards: `x-forwarded-proto` when the client
/// sent none (the scheme inside the tunnel is plain HTTP), and `x-forwarded-client-cert` — the client's
/// own always removed, and `By=<waypoint>;URI=<client>` written when the Gateway opts in.
fn forwarding_headers(
    headers: &mut http::HeaderMap,
    snap: &Snapshot,
    waypoint: &Identity,
    client: &Identity,
) {
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
    }
    headers.remove("x-forwarded-client-cert");
    if snap.xfcc_include_client_identity() {
        let xfcc = format!("By={waypoint};URI={client}");
        if let Ok(v) = http::HeaderValue::from_str(&xfcc) {
            headers.insert("x-forwarded-client-cert", v);
        }
    }
}

fn request_id() -> http::HeaderValue {
    let v: u128 = rand::rng().random();
    let s = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (v >> 96) as u32,
        (v >> 80) as u16,
        (v >> 68) as u16 & 0x0fff,
        ((v >> 52) as u16 & 0x3fff) | 0x8000,
        v as u64 & 0xffff_ffff_ffff
    );
    http::HeaderValue::from_str(&s).expect("hex digits and dashes are a valid header value")
}

/// One request, from its head to the response head.
async fn handle(
    wp: Arc<Waypoint>,
    info: Arc<StreamInfo>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let snap = wp.snapshot();
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut log = Box::new(RequestLog::new(
        wp.metrics.clone(),
        info.peer,
        info.peer_id.clone(),
        info.authority.clone(),
        parts.method.clone(),
        path.clone(),
    ));
    log.request_bytes =
        headers_size(&parts.headers) + parts.method.as_str().len() as u64 + path.len() as u64;
    log.src_workload = snap.client(info.peer.ip(), &info.peer_id).cloned();
    if parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
    {
        log.protocol = "grpc";
    }
    if !parts.headers.contains_key("x-request-id") {
        parts.headers.insert("x-request-id", request_id());
    }
    forwarding_headers(&mut parts.headers, &snap, &wp.identity, &info.peer_id);
    let Some(dest) = snap.destination(&info.authority) else {
        // The configuration changed since the tunnel opened: nothing here serves it any more.
        return local_reply(StatusCode::NOT_FOUND, "", "NR", log);
    };
    let (dst_addr, service) = match &dest {
        Destination::Service { service, addr, .. } => (*addr, Some(*service)),
        Destination::Workload { addr, .. } => (*addr, None),
    };
    log.service = service.and_then(|s| s.address.clone());
    let principal = info.peer_id.to_string();
    let decision = {
        let areq = authz::Request {
            method: parts.method.as_str(),
            path: &path,
            host: host_of(&parts),
            headers: &parts.headers,
            source_principal: Some(&principal),
            source_ip: info.peer.ip(),
            destination_ip: dst_addr.ip(),
            destination_port: dst_addr.port(),
        };
        let wide = snap.authz().map_or(Decision::Allow, |a| a.check(&areq));
        match (wide, service) {
            (Decision::Allow, Some(s)) => s.authz.check(&areq),
            (d, _) => d,
        }
    };
    if let Decision::Deny { policy } = decision {
        log.policy = Some(policy);
        return local_reply(StatusCode::FORBIDDEN, RBAC_DENIED, "RBAC", log);
    }
    let downstream = if info.h2 {
        UpstreamVersion::Http2
    } else {
        UpstreamVersion::Http1
    };
    let body = match replayable(body, wp.cfg.retry_buffer).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(src.addr = %info.peer, error = %e, "client body failed");
            return local_reply(StatusCode::BAD_REQUEST, "", "DPE", log);
        }
    };
    log.request_bytes += match &body {
        Replayable::Buffered(b) => b.len() as u64,
        Replayable::Stream(s) => s.as_ref().and_then(|b| b.size_hint().exact()).unwrap_or(0),
    };
    let upstreams = wp.upstreams.clone();
    match dest {
        Destination::Workload { workload, addr } => {
            let f = Forward {
                upstreams: &upstreams,
                snapshot: &snap,
                target: Target::Workload(super::snapshot::Endpoint {
                    workload,
                    addr,
                    crossing: None,
                }),
                route: None,
                version: downstream,
                like: addr.ip(),
            };
            forward(f, parts, body, log).await
        }
        Destination::Service {
            service,
            port,
            addr,
        } => {
            let Some(bound) = service.port(port) else {
                return local_reply(StatusCode::NOT_FOUND, "", "NR", log);
            };
            let Some(route) = bound.routes.select(&parts) else {
                return local_reply(StatusCode::NOT_FOUND, "", "NR", log);
            };
            log.route = Some(route.name().to_string());
            let total = route.total_weight();
            let roll = if total > 0 {
                rand::rng().random_range(0..total)
            } else {
                0
            };
            let cluster_name = match route.action(&parts, roll) {
                Action::Redirect(resp) => {
                    let (mut rparts, ()) = resp.into_parts();
                    route.apply_response(&mut rparts);
                    log.status = rparts.status.as_u16();
                    log.response_bytes += headers_size(&rparts.headers);
                    return Response::from_parts(rparts, RespBody::full(Bytes::new(), Some(log)));
                }
                Action::Direct { status, body } => {
                    return local_reply(status, body, "-", log);
                }
                Action::Forward(name) => name.to_string(),
            };
            let Some(cluster) = snap.cluster(&cluster_name) else {
                // Envoy: the route names a cluster it does not have.
                return local_reply(StatusCode::SERVICE_UNAVAILABLE, "", "NC", log);
            };
            route.apply_request(&mut parts);
            let version = match bound.protocol {
                PortProtocol::Http2 => UpstreamVersion::Http2,
                PortProtocol::Http1 => UpstreamVersion::Http1,
                PortProtocol::Unknown | PortProtocol::Tcp => downstream,
            };
            let f = Forward {
                upstreams: &upstreams,
                snapshot: &snap,
                target: Target::Cluster(cluster),
                route: Some(route),
                version,
                like: addr.ip(),
            };
            forward(f, parts, body, log).await
        }
    }
}
