//! Sending one HTTP request on to an endpoint, with the route's retries and timeouts, and answering failures
//! as Envoy does.
//!
//! Input: the request (head, and a body kept for retries when small), the [`Target`] (a cluster, or a bound
//! workload's own address), the route if any, and the HTTP version the port calls for. Output: the response
//! for the client — the endpoint's (headers changed by the route), or Envoy's own for a failure:
//!
//! | failure | status | body | flags |
//! |---|---|---|---|
//! | the cluster is at its request limit | 503 | `upstream connect error or disconnect/reset before headers. reset reason: overflow` | `UO` |
//! | no endpoint can be picked | 503 | `no healthy upstream` | `UH` |
//! | connecting (TCP, TLS, HBONE CONNECT, HTTP handshake) failed | 503 | `upstream connect error or disconnect/reset before headers. reset reason: connection failure` | `UF` |
//! | the endpoint reset before the response headers | 503 | `… reset reason: connection termination` | `UC` |
//! | the route's timeout (or the last try's per-try timeout) | 504 | `upstream request timeout` | `UT` |
//!
//! `URX` is added when the tries were used up on a retriable failure. The cluster's
//! [`Endpoints`](super::balance::Endpoints) admit the request (HTTP/2 upstreams: `admit_multiplexed`;
//! the permit and the endpoint's in-flight count are held until the response body ends), admit each
//! retry (`admit_retry`: DestinationRule `maxRetries`; refused, the last answer stands) and get every
//! try's outcome (outlier detection); a retry goes to another endpoint when one is available (`pick` with
//! the previous one excluded), after Envoy's jittered backoff (25 ms base, doubling, at most 250 ms). A
//! body too long to keep is streamed, and its request is not retried. Timeouts cover the wait for the
//! response headers (Envoy's also cover the body).

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use rand::Rng;
use tokio::time::Instant;

use super::balance::{Outcome, Permit, PoolLimits};
use super::body::{Held, Replayable, RespBody, UpBody};
use super::metrics::{headers_size, RequestLog};
use super::routes::{RetryPolicy, Route};
use super::snapshot::{Cluster, Endpoint, Snapshot};
use super::upstream::{ConnSettings, Error as UpError, UpstreamVersion, Upstreams};

/// Envoy's body for a connection failure.
pub const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
/// Envoy's body for a reset before the response headers.
pub const CONNECTION_TERMINATION: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
/// Envoy's body for a circuit-breaker overflow.
pub const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";
/// Envoy's body when no endpoint is available.
pub const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
/// Envoy's body for a route timeout.
pub const UPSTREAM_TIMEOUT: &str = "upstream request timeout";

/// Envoy's first retry backoff.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Envoy's longest retry backoff (ten times the base).
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Headers that describe one hop and are not forwarded (RFC 9110 §7.6.1, plus HTTP/1's framing).
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Where a request goes.
pub enum Target<'s> {
    /// One of a cluster's endpoints.
    Cluster(&'s Cluster),
    /// A workload bound to the waypoint, at the address the client dialled.
    Workload(Endpoint),
}

/// An answer of the waypoint's own, with Envoy's status, body and flags.
pub fn local_reply(
    status: StatusCode,
    body: &str,
    flags: &'static str,
    mut log: Box<RequestLog>,
) -> Response<RespBody> {
    log.status = status.as_u16();
    log.flags = flags;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if !body.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    log.response_bytes += headers_size(resp.headers()) + body.len() as u64;
    let (parts, ()) = resp.into_parts();
    Response::from_parts(
        parts,
        RespBody::full(Bytes::copy_from_slice(body.as_bytes()), Some(log)),
    )
}

/// Why a try got no usable response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Connect,
    RefusedStream,
    Reset,
    PerTryTimeout,
    Timeout,
}

impl Failure {
    fn retried_by(self, p: &RetryPolicy) -> bool {
        match self {
            Failure::Connect => p.on_connect_failure || p.on_5xx || p.on_gateway_error,
            Failure::RefusedStream => p.on_refused_stream || p.on_5xx,
            Failure::Reset => p.on_reset || p.on_5xx,
            Failure::PerTryTimeout => p.on_5xx || p.on_gateway_error || p.on_reset,
            Failure::Timeout => false,
        }
    }

    fn outcome(self) -> Outcome {
        match self {
            Failure::Connect => Outcome::ConnectFailure,
            _ => Outcome::Reset,
        }
    }

    fn reply(self, retried: bool, log: Box<RequestLog>) -> Response<RespBody> {
        let (status, body, flags) = match (self, retried) {
            (Failure::Connect | Failure::RefusedStream, false) => {
                (StatusCode::SERVICE_UNAVAILABLE, CONNECT_FAILURE, "UF")
            }
            (Failure::Connect | Failure::RefusedStream, true) => {
                (StatusCode::SERVICE_UNAVAILABLE, CONNECT_FAILURE, "UF,URX")
            }
            (Failure::Reset, false) => (
                StatusCode::SERVICE_UNAVAILABLE,
                CONNECTION_TERMINATION,
                "UC",
            ),
            (Failure::Reset, true) => (
                StatusCode::SERVICE_UNAVAILABLE,
                CONNECTION_TERMINATION,
                "UC,URX",
            ),
            (Failure::PerTryTimeout | Failure::Timeout, _) => {
                (StatusCode::GATEWAY_TIMEOUT, UPSTREAM_TIMEOUT, "UT")
            }
        };
        local_reply(status, body, flags, log)
    }
}

/// Whether a gRPC status in the response headers (a trailers-only answer) is retried.
fn grpc_retried(p: &RetryPolicy, headers: &HeaderMap) -> bool {
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some("14") => p.on_unavailable,
        Some("1") => p.on_cancelled,
        _ => false,
    }
}

/// The request for one try, in the form `version` needs: origin-form and `Host` for HTTP/1.1, absolute
/// URI (`:authority`) for HTTP/2; hop-by-hop headers removed.
fn request_for(parts: &Parts, body: UpBody, version: UpstreamVersion) -> Request<UpBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    let mut headers = parts.headers.clone();
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    match version {
        UpstreamVersion::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            *req.uri_mut() = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
            if let Some(a) = authority
                .as_deref()
                .and_then(|a| HeaderValue::from_str(a).ok())
            {
                headers.insert(header::HOST, a);
            }
        }
        UpstreamVersion::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            headers.remove(header::HOST);
            let scheme = parts.uri.scheme_str().unwrap_or("http");
            let uri = authority
                .and_then(|a| Uri::try_from(format!("{scheme}://{a}{path}")).ok())
                .unwrap_or_else(|| Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/")));
            *req.uri_mut() = uri;
        }
    }
    *req.headers_mut() = headers;
    req
}

/// The endpoint's response for the client: the route's header changes, hop-by-hop headers dropped.
fn response_for(
    resp: Response<hyper::body::Incoming>,
    on_end: Option<super::body::OnEnd>,
    held: Held,
    route: Option<&Route>,
    mut log: Box<RequestLog>,
    flags: &'static str,
) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    for h in &HOP_BY_HOP {
        parts.headers.remove(h);
    }
    parts.headers.remove("keep-alive");
    if let Some(r) = route {
        r.apply_response(&mut parts);
    }
    log.status = parts.status.as_u16();
    log.flags = flags;
    log.response_bytes += headers_size(&parts.headers);
    Response::from_parts(
        parts,
        RespBody::upstream(body, on_end, Some(log)).holding(held),
    )
}

/// Envoy's jittered exponential backoff before retry `n` (1-based).
fn backoff(n: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << n.saturating_sub(1).min(8))
        .min(BACKOFF_MAX);
    rand::rng().random_range(Duration::ZERO..=cap)
}

/// Everything [`forward`] needs besides the request.
pub struct Forward<'a> {
    /// The connections to endpoints.
    pub upstreams: &'a Upstreams,
    /// The configuration the request is served with.
    pub snapshot: &'a Snapshot,
    /// Where it goes.
    pub target: Target<'a>,
    /// Its route (retries, timeout, response headers), if any.
    pub route: Option<&'a Route>,
    /// The version to speak to the endpoint.
    pub version: UpstreamVersion,
    /// An address of the family the endpoint's should be of.
    pub like: std::net::IpAddr,
}

/// Sends the request to an endpoint of `f.target`, retrying as the route says.
pub async fn forward(
    f: Forward<'_>,
    parts: Parts,
    mut body: Replayable,
    mut log: Box<RequestLog>,
) -> Response<RespBody> {
    let policy = f.route.map(|r| r.retry());
    let max_retries = policy.map_or(0, |p| p.attempts);
    let overall = f
        .route
        .and_then(|r| r.timeout())
        .map(|t| Instant::now() + t);
    // Held until the response body ends: the cluster's request budget.
    let permit = match &f.target {
        Target::Cluster(c) => {
            let admitted = match f.version {
                UpstreamVersion::Http2 => c.endpoints.admit_multiplexed(),
                UpstreamVersion::Http1 => c.endpoints.admit(),
            };
            match admitted {
                Some(p) => Some(p),
                None => return local_reply(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW, "UO", log),
            }
        }
        Target::Workload(_) => None,
    };
    // The retry budget taken by the try in progress, if it is a retry.
    let mut retry_permit: Option<Permit> = None;
    let mut exclude: Option<String> = None;
    let mut tries: u32 = 0;
    loop {
        tries += 1;
        log.tries = tries;
        let retried = tries > 1;
        let (ep, cluster) = match &f.target {
            Target::Cluster(c) => {
                let picked = c
                    .endpoints
                    .pick(std::time::Instant::now(), exclude.as_deref())
                    .and_then(|uid| Some((f.snapshot.endpoint(c, uid, f.like)?, uid.to_string())));
                match picked {
                    Some((ep, uid)) => (ep, Some((*c, uid))),
                    None => {
                        let flags = if retried { "UH,URX" } else { "UH" };
                        return local_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            NO_HEALTHY_UPSTREAM,
                            flags,
                            log,
                        );
                    }
                }
            }
            Target::Workload(ep) => (ep.clone(), None),
        };
        log.endpoint = Some((ep.workload.clone(), ep.addr));
        let active = cluster.as_ref().and_then(|(c, uid)| c.endpoints.begin(uid));
        let Some(up_body) = body.for_try() else {
            // Unreachable: a streamed body is never retried.
            return Failure::Reset.reply(retried, log);
        };
        let req = request_for(&parts, up_body, f.version);
        let per_try = policy
            .and_then(|p| p.per_try_timeout)
            .map(|t| Instant::now() + t);
        let deadline = match (per_try, overall) {
            (Some(a), Some(b)) => Some((a.min(b), a < b)),
            (Some(a), None) => Some((a, true)),
            (None, Some(b)) => Some((b, false)),
            (None, None) => None,
        };
        let settings = match &cluster {
            Some((c, _)) => conn_settings(c.endpoints.limits()),
            None => f.upstreams.defaults(),
        };
        let sent = f.upstreams.request(&ep, f.version, req, settings);
        let result = match deadline {
            Some((at, per_try_first)) => match tokio::time::timeout_at(at, sent).await {
                Ok(r) => r.map_err(classify),
                Err(_) if per_try_first => Err(Failure::PerTryTimeout),
                Err(_) => Err(Failure::Timeout),
            },
            None => sent.await.map_err(classify),
        };
        let now = std::time::Instant::now();
        let mut can_retry = |p: Option<&RetryPolicy>| {
            let allowed = p.is_some()
                && tries <= max_retries
                && body.can_replay()
                && overall.is_none_or(|o| Instant::now() < o);
            if !allowed {
                return false;
            }
            // DestinationRule maxRetries: retries in flight across the cluster.
            match &cluster {
                Some((c, _)) => match c.endpoints.admit_retry() {
                    Some(p) => {
                        retry_permit = Some(p);
                        true
                    }
                    None => false,
                },
                None => true,
            }
        };
        match result {
            Ok((resp, on_end)) => {
                let status = resp.status();
                if let Some((c, uid)) = &cluster {
                    let outcome = if status.is_server_error() {
                        Outcome::Status(status.as_u16())
                    } else {
                        Outcome::Success
                    };
                    c.endpoints.record(uid, outcome, now);
                }
                let retriable = policy
                    .is_some_and(|p| p.retries_status(status) || grpc_retried(p, resp.headers()));
                if retriable && can_retry(policy) {
                    tracing::debug!(endpoint = %ep.addr, %status, try_ = tries, "retrying");
                    drop(resp);
                    exclude = cluster.map(|(_, uid)| uid);
                    tokio::time::sleep(backoff(tries)).await;
                    continue;
                }
                let flags = if retriable && retried { "URX" } else { "-" };
                let held: Held = Box::new((permit, active, retry_permit));
                let resp = response_for(resp, on_end, held, f.route, log, flags);
                return match overall {
                    Some(at) => resp.map(|b| b.until(at)),
                    None => resp,
                };
            }
            Err(failure) => {
                if let Some((c, uid)) = &cluster {
                    c.endpoints.record(uid, failure.outcome(), now);
                }
                tracing::debug!(endpoint = %ep.addr, ?failure, try_ = tries, "endpoint request failed");
                if policy.is_some_and(|p| failure.retried_by(p)) && can_retry(policy) {
                    exclude = cluster.map(|(_, uid)| uid);
                    tokio::time::sleep(backoff(tries)).await;
                    continue;
                }
                return failure.reply(retried, log);
            }
        }
    }
}

fn classify(e: UpError) -> Failure {
    match e {
        UpError::Connect { addr, reason } => {
            tracing::debug!(%addr, %reason, "endpoint connection failed");
            Failure::Connect
        }
        UpError::RefusedStream { .. } => Failure::RefusedStream,
        UpError::Reset { .. } => Failure::Reset,
    }
}

/// A cluster's DestinationRule `connectionPool` as the upstream connections apply it.
fn conn_settings(limits: &PoolLimits) -> ConnSettings {
    ConnSettings {
        connect_timeout: limits.connect_timeout,
        idle_timeout: limits.idle_timeout,
        max_requests_per_connection: limits.max_requests_per_connection,
    }
}
