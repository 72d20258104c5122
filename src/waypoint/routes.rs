//! HTTP routing at the waypoint for one service port: route selection, backend choice, redirects and
//! direct responses, request and response transformation, timeouts and retry policy — with the
//! semantics of the Envoy routes istiod builds from VirtualServices and HTTPRoutes.
//!
//! Owner: the waypoint. Whoever applies a new `Waypoint` configuration builds one [`RouteTable`] per
//! service port; per request the handler calls [`RouteTable::select`] (`None`: answer 404, Envoy's `NR`),
//! then [`Route::action`] with a random roll, [`Route::apply_request`] before forwarding and
//! [`Route::apply_response`] on the way back, and honours [`Route::timeout`] and [`Route::retry`].
//! Pure: no I/O, no clock, no randomness of its own; everything is immutable after [`RouteTable::new`].
//!
//! **Inputs.** A `crate::proto::waypoint::Port`; per request the `http::request::Parts`.
//! **Outputs.** A [`RouteTable`] or an [`Error`] naming the route and field; per request the selected
//! [`Route`], an [`Action`], and changed request/response heads.
//!
//! **Matching** (first route whose any match fits; a route without matches matches every request; a port
//! without routes gets one catch-all route to its `tcp` backends, else to `default_cluster`):
//! - path: on the path without query. `exact` is equality; `prefix` is plain string-prefix, as Envoy's
//!   route `prefix` and VirtualService `uri.prefix` (`/api` matches `/api`, `/api/x` and `/apix`); with
//!   `path_segment_prefix` (Gateway API `PathPrefix`) whole segments only (`/api`, `/api/x`, not `/apix`),
//!   and a prefix rewrite or redirect then joins the replacement and the rest with one `/`.
//! - headers: all values joined with `,`; no value = present. `invert` negates, and an absent header
//!   compares as empty (Istio sets Envoy's `treat_missing_header_as_empty` for `withoutHeaders`), so an
//!   inverted value match fits a request without the header. `:authority` (or `host`), `:method`, `:path`
//!   and `:scheme` read the request line.
//! - method: equal. Query parameters: the first parameter of that name, percent-decoded; no value = present.
//!
//! **Transformation**, in Envoy's order (`HeaderParser::evaluateHeaders`, then the route's host and path
//! rewrites): remove, then set (overwrite), then add (append); then the authority rewrite; then the path
//! rewrite, which replaces the prefix that matched (the whole path after an exact match; `/` when the
//! match had no path) and keeps the query. A `set`/`add` of `host` or `:authority` is an authority rewrite
//! (as Istio translates it); removing `host` is ignored (Envoy refuses to); other pseudo-headers are
//! refused. Values are literal (no Envoy `%…%` substitution).
//!
//! **Redirects** follow the Gateway API rules (which Istio's conversion targets): scheme, host and path
//! replace the request's when set; the port is the configured one, else the scheme's well-known port when
//! the scheme changes, else the request's; a well-known port is left out of `Location`; the query is kept
//! unless the new path has one. Status 301 unless set (301, 302, 303, 307 or 308).
//!
//! **Retries** ([`RetryPolicy`]): unset → Istio's default (2 retries on connect-failure, refused-stream,
//! unavailable, cancelled, retriable-status-codes with 503); attempts 0 → none; otherwise Istio's
//! `ConvertPolicy`: the default with the attempts replaced, and conditions and codes replaced when any are
//! given. Conditions outside [`SUPPORTED_RETRY_ON`] are refused.
//!
//! [`normalize_path`] is Envoy's path normalization (Istio's default, `BASE`) for the caller to apply to
//! the request before it routes and authorizes it.

mod compile;
mod normalize;
mod retry;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, HOST, LOCATION};
use http::{request, response, HeaderMap, Response, StatusCode, Uri};

use crate::proto::waypoint as pb;

pub use normalize::normalize_path;
pub use retry::RetryPolicy;

/// Retry conditions (`RetryPolicy.retry_on`) this waypoint implements; numeric entries are status codes.
pub const SUPPORTED_RETRY_ON: [&str; 9] = [
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "retriable-4xx",
];

/// Name of the catch-all route of a port without routes.
pub const DEFAULT_ROUTE: &str = "default";

/// A route table that cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A port with no routes, no `tcp` backends and no `default_cluster`.
    #[error("port {port}: no routes, no tcp backends and no default cluster")]
    NoBackend {
        /// The service port.
        port: u32,
    },
    /// A route with no forward, redirect or direct response.
    #[error("route {route}: no action (forward, redirect or direct response)")]
    NoAction {
        /// The route's name (or `routes[i]`).
        route: String,
    },
    /// A backend without a cluster name.
    #[error("route {route}: backends[{index}] names no cluster")]
    EmptyCluster {
        /// The route's name (or `routes[i]`).
        route: String,
        /// Index of the backend.
        index: usize,
    },
    /// Backend weights that add up to more than `u32::MAX`.
    #[error("route {route}: backend weights add up to more than {}", u32::MAX)]
    WeightOverflow {
        /// The route's name (or `routes[i]`).
        route: String,
    },
    /// A header name that is not valid HTTP, or a pseudo-header that cannot be matched or changed there.
    #[error("route {route}: {field}: {name:?} is not a usable header name")]
    InvalidHeaderName {
        /// The route's name (or `routes[i]`).
        route: String,
        /// The field (`request_headers.set`, `matches[0].headers`, …).
        field: &'static str,
        /// As written.
        name: String,
    },
    /// A header value that is not valid HTTP.
    #[error("route {route}: {field}: the value of {name:?} is not a valid header value")]
    InvalidHeaderValue {
        /// The route's name (or `routes[i]`).
        route: String,
        /// The field.
        field: &'static str,
        /// The header's name.
        name: String,
    },
    /// A status code outside what the field allows.
    #[error("route {route}: {field}: status {status} is not allowed here")]
    InvalidStatus {
        /// The route's name (or `routes[i]`).
        route: String,
        /// `redirect.status`, `direct_response.status` or `retries.retriable_status_codes`.
        field: &'static str,
        /// As written.
        status: u32,
    },
    /// A redirect or rewrite part that cannot appear in a URL.
    #[error("route {route}: {field}: {value:?} is not valid here")]
    InvalidUrlPart {
        /// The route's name (or `routes[i]`).
        route: String,
        /// `redirect.scheme`, `redirect.port`, `rewrite.authority`, …
        field: &'static str,
        /// As written.
        value: String,
    },
    /// A negative or out-of-range duration.
    #[error("route {route}: {field}: invalid duration")]
    InvalidDuration {
        /// The route's name (or `routes[i]`).
        route: String,
        /// `timeout` or `retries.per_try_timeout`.
        field: &'static str,
    },
    /// A retry condition outside [`SUPPORTED_RETRY_ON`].
    #[error("route {route}: retries.retry_on: {value:?} is not supported")]
    UnsupportedRetryOn {
        /// The route's name (or `routes[i]`).
        route: String,
        /// As written.
        value: String,
    },
}

/// The compiled routes of one service port.
#[derive(Debug)]
pub struct RouteTable {
    port: u32,
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compiles a port's routes (or its catch-all route), refusing anything that cannot be honoured.
    pub fn new(port: &pb::Port) -> Result<RouteTable, Error> {
        let routes = if port.routes.is_empty() {
            let backends = if !port.tcp.is_empty() {
                port.tcp.clone()
            } else if !port.default_cluster.is_empty() {
                vec![pb::WeightedCluster {
                    cluster: port.default_cluster.clone(),
                    weight: 1,
                }]
            } else {
                return Err(Error::NoBackend { port: port.port });
            };
            let route = pb::Route {
                name: DEFAULT_ROUTE.into(),
                action: Some(pb::route::Action::Forward(pb::Forward { backends })),
                ..Default::default()
            };
            vec![Route::compile(&route, 0)?]
        } else {
            (port.routes.iter().enumerate())
                .map(|(i, r)| Route::compile(r, i))
                .collect::<Result<_, _>>()?
        };
        Ok(RouteTable {
            port: port.port,
            routes,
        })
    }

    /// The service port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route with a match that fits the request; `None`: no route (answer 404).
    pub fn select(&self, parts: &request::Parts) -> Option<&Route> {
        let req = View::new(parts);
        self.routes.iter().find(|r| r.matched(&req).is_some())
    }
}

/// What to do with a request, from [`Route::action`].
#[derive(Debug)]
pub enum Action<'r> {
    /// Forward to this cluster.
    Forward(&'r str),
    /// Answer with this redirect (status and `Location`).
    Redirect(Response<()>),
    /// Answer with this status and body.
    Direct {
        /// The status.
        status: StatusCode,
        /// The body.
        body: &'r str,
    },
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    name: String,
    matches: Vec<Match>,
    target: Target,
    request_ops: HeaderOps,
    response_ops: HeaderOps,
    authority: Option<HeaderValue>,
    path_prefix: Option<String>,
    /// Gateway API `ReplaceFullPath`: the whole path, whatever matched; wins over `path_prefix`.
    full_path: Option<String>,
    timeout: Option<Duration>,
    retry: RetryPolicy,
}

#[derive(Debug)]
enum Target {
    Forward {
        backends: Vec<(String, u32)>,
        total: u32,
    },
    Redirect(Redirect),
    Direct {
        status: StatusCode,
        body: String,
    },
}

#[derive(Debug)]
struct Redirect {
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<String>,
    /// Gateway API `ReplacePrefixMatch` in a redirect: replaces the prefix that matched; `path` wins.
    path_prefix: Option<String>,
    status: StatusCode,
}

#[derive(Debug, Default)]
struct Match {
    path: Option<Str>,
    headers: Vec<HeaderMatch>,
    method: Option<String>,
    query: Vec<(String, Option<Str>)>,
}

/// An exact or prefix string match.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Str {
    Exact(String),
    Prefix(String),
    /// Gateway API `PathPrefix` (`RouteMatch.path_segment_prefix`): whole path segments only, so `/api`
    /// matches `/api`, `/api/` and `/api/v1` but not `/apiv1`. Stored without a trailing `/`.
    SegmentPrefix(String),
}

impl Str {
    fn compile(m: &pb::StringMatch) -> Option<Str> {
        match &m.kind {
            Some(pb::string_match::Kind::Exact(v)) => Some(Str::Exact(v.clone())),
            Some(pb::string_match::Kind::Prefix(v)) => Some(Str::Prefix(v.clone())),
            None => None,
        }
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            Str::Exact(v) => value == v.as_bytes(),
            Str::Prefix(v) => value.starts_with(v.as_bytes()),
            Str::SegmentPrefix(v) => {
                value.starts_with(v.as_bytes()) && matches!(value.get(v.len()), None | Some(b'/'))
            }
        }
    }
}

#[derive(Debug)]
struct HeaderMatch {
    header: RequestPart,
    /// `None`: present.
    value: Option<Str>,
    invert: bool,
}

/// A header, or a pseudo-header read from the request line.
#[derive(Debug)]
enum RequestPart {
    Header(HeaderName),
    Authority,
    Method,
    Path,
    Scheme,
}

/// The prefix a matching route replaces in a path rewrite.
#[derive(Debug, Clone, Copy)]
enum Matched<'r> {
    WholePath,
    Prefix(&'r str),
    /// A whole-segment prefix (no trailing `/`): the replacement joins the rest with exactly one `/`.
    Segments(&'r str),
}

#[derive(Debug, Default)]
struct HeaderOps {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    /// Envoy's order: remove, then overwrite, then append.
    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The parts of a request that matching reads.
struct View<'p> {
    parts: &'p request::Parts,
    path: &'p str,
    query: Option<&'p str>,
}

impl<'p> View<'p> {
    fn new(parts: &'p request::Parts) -> Self {
        View {
            parts,
            path: parts.uri.path(),
            query: parts.uri.query(),
        }
    }

    fn part(&self, part: &RequestPart) -> Option<Cow<'p, [u8]>> {
        match part {
            RequestPart::Authority => authority(self.parts).map(|a| Cow::Borrowed(a.as_bytes())),
            RequestPart::Method => Some(Cow::Borrowed(self.parts.method.as_str().as_bytes())),
            RequestPart::Path => Some(Cow::Borrowed(
                self.parts
                    .uri
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .as_bytes(),
            )),
            RequestPart::Scheme => Some(Cow::Borrowed(scheme(self.parts).as_bytes())),
            RequestPart::Header(name) => joined(&self.parts.headers, name),
        }
    }
}

/// The request's `:authority` (HTTP/2, absolute form) or Host header.
fn authority(parts: &request::Parts) -> Option<&str> {
    match parts.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => parts.headers.get(HOST).and_then(|h| h.to_str().ok()),
    }
}

/// The request's scheme; `http` when the URI carries none (plaintext inside the tunnel).
fn scheme(parts: &request::Parts) -> &str {
    parts.uri.scheme_str().unwrap_or("http")
}

/// All values of a header joined with `,` (Envoy); `None` when absent.
fn joined<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let rest: Vec<&HeaderValue> = values.collect();
    if rest.is_empty() {
        return Some(Cow::Borrowed(first.as_bytes()));
    }
    let mut out = first.as_bytes().to_vec();
    for v in rest {
        out.push(b',');
        out.extend_from_slice(v.as_bytes());
    }
    Some(Cow::Owned(out))
}

impl Match {
    fn fits(&self, req: &View<'_>) -> bool {
        self.path
            .as_ref()
            .is_none_or(|p| p.matches(req.path.as_bytes()))
            && self
                .method
                .as_ref()
                .is_none_or(|m| req.parts.method.as_str() == m)
            && self.headers.iter().all(|h| h.fits(req))
            && self.query.iter().all(
                |(name, value)| match (query_param(req.query, name), value) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(v), Some(m)) => m.matches(v.as_bytes()),
                },
            )
    }
}

impl HeaderMatch {
    fn fits(&self, req: &View<'_>) -> bool {
        let value = req.part(&self.header);
        match (&self.value, value) {
            (None, v) => v.is_some() != self.invert,
            (Some(m), Some(v)) => m.matches(&v) != self.invert,
            // Absent: no match, or, inverted, compared as empty (`treat_missing_header_as_empty`).
            (Some(m), None) => self.invert && !m.matches(b""),
        }
    }
}

/// The first value of query parameter `name`, percent-decoded (Envoy's `getFirstValue`).
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

impl Route {
    /// The route's name (`<namespace>/<object>[.<index>]`, or [`DEFAULT_ROUTE`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sum of the backend weights (0 for redirects and direct responses).
    pub fn total_weight(&self) -> u32 {
        match &self.target {
            Target::Forward { total, .. } => *total,
            _ => 0,
        }
    }

    /// What to do: the backend under `roll` (uniform in `[0, total_weight())`, taken modulo the total),
    /// the redirect for this request, or the direct response. All weights zero (or no backends): a direct
    /// 500, as Istio configures for an HTTPRoute whose backends all weigh 0.
    pub fn action(&self, parts: &request::Parts, roll: u32) -> Action<'_> {
        match &self.target {
            Target::Forward { total: 0, .. } => Action::Direct {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: "",
            },
            Target::Forward { backends, total } => {
                let mut roll = roll % total;
                let mut chosen = "";
                for (cluster, weight) in backends {
                    chosen = cluster;
                    if roll < *weight {
                        break;
                    }
                    roll -= weight;
                }
                // The roll is below the sum of the weights, so the loop stopped at a weighted backend.
                Action::Forward(chosen)
            }
            Target::Redirect(r) => {
                let matched = match (&r.path, &r.path_prefix) {
                    (None, Some(_)) => self.matched(&View::new(parts)),
                    _ => None,
                };
                r.response(parts, matched)
            }
            Target::Direct { status, body } => Action::Direct {
                status: *status,
                body,
            },
        }
    }

    /// Header set/add/remove, then authority rewrite, then path-prefix rewrite, as Envoy applies them
    /// (see the module docs). Call it on the request [`RouteTable::select`] chose this route for, before
    /// forwarding it.
    pub fn apply_request(&self, parts: &mut request::Parts) {
        // Which match fitted decides the prefix a path rewrite replaces; find it before the header
        // changes can alter what fits.
        let matched = match (&self.full_path, &self.path_prefix) {
            (Some(_), _) => Some(Matched::WholePath),
            (None, Some(_)) => self.matched(&View::new(parts)),
            (None, None) => None,
        };
        self.request_ops.apply(&mut parts.headers);
        if let Some(authority) = &self.authority {
            rewrite_authority(parts, authority);
        }
        if let (Some(replacement), Some(matched)) = (
            self.full_path.as_ref().or(self.path_prefix.as_ref()),
            matched,
        ) {
            rewrite_path(parts, matched, replacement);
        }
    }

    /// Header set/add/remove on the response, in Envoy's order.
    pub fn apply_response(&self, parts: &mut response::Parts) {
        self.response_ops.apply(&mut parts.headers);
    }

    /// The whole-request timeout; `None`: none.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The retry policy, with Istio's defaults resolved.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The first fitting match's path rewrite prefix; `None` when no match fits.
    fn matched(&self, req: &View<'_>) -> Option<Matched<'_>> {
        if self.matches.is_empty() {
            return Some(Matched::Prefix("/"));
        }
        let m = self.matches.iter().find(|m| m.fits(req))?;
        Some(match &m.path {
            Some(Str::Exact(_)) => Matched::WholePath,
            Some(Str::Prefix(p)) => Matched::Prefix(p),
            Some(Str::SegmentPrefix(p)) => Matched::Segments(p),
            // Istio gives a route without a path match Envoy's `prefix: "/"`.
            None => Matched::Prefix("/"),
        })
    }
}

fn rewrite_authority(parts: &mut request::Parts, authority: &HeaderValue) {
    if parts.uri.authority().is_some() {
        let mut uri = parts.uri.clone().into_parts();
        if let Ok(a) = authority.to_str().unwrap_or_default().parse() {
            uri.authority = Some(a);
            if let Ok(new) = Uri::from_parts(uri) {
                parts.uri = new;
            }
        }
    }
    if parts.uri.authority().is_none() || parts.headers.contains_key(HOST) {
        parts.headers.insert(HOST, authority.clone());
    }
}

/// `path` with the part `matched` replaced by `replacement` (the query is not part of `path`).
fn replaced_path(path: &str, matched: Matched<'_>, replacement: &str) -> String {
    match matched {
        Matched::WholePath => replacement.to_owned(),
        Matched::Prefix(prefix) => {
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            format!("{replacement}{rest}")
        }
        Matched::Segments(prefix) => {
            // `rest` is empty or starts with '/': prefix /api, replacement /v2 or /: /api/x → /v2/x or /x.
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            match (replacement.trim_end_matches('/'), rest) {
                ("", "") => "/".to_owned(),
                (r, "") => r.to_owned(),
                (r, rest) => format!("{r}{rest}"),
            }
        }
    }
}

fn rewrite_path(parts: &mut request::Parts, matched: Matched<'_>, replacement: &str) {
    let mut new = replaced_path(parts.uri.path(), matched, replacement);
    if let Some(q) = parts.uri.query() {
        new.push('?');
        new.push_str(q);
    }
    let mut uri = parts.uri.clone().into_parts();
    if let Ok(pq) = new.parse() {
        uri.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(uri) {
            parts.uri = u;
        }
    }
}

impl Redirect {
    fn response(&self, parts: &request::Parts, matched: Option<Matched<'_>>) -> Action<'static> {
        let request_scheme = scheme(parts);
        let scheme = self.scheme.as_deref().unwrap_or(request_scheme);
        let (request_host, request_port) = split_host_port(authority(parts).unwrap_or_default());
        let host = self.host.as_deref().unwrap_or(request_host);
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => Some(p),
            (None, Some(_)) => None,
            (None, None) => request_port,
        }
        .filter(|p| Some(*p) != well_known_port(scheme));
        let mut location = format!("{scheme}://{host}");
        if let Some(p) = port {
            location.push_str(&format!(":{p}"));
        }
        let prefixed = match (&self.path_prefix, matched) {
            (Some(replacement), Some(m)) => Some(replaced_path(parts.uri.path(), m, replacement)),
            _ => None,
        };
        match self.path.as_ref().or(prefixed.as_ref()) {
            Some(path) => {
                location.push_str(path);
                if let (false, Some(q)) = (path.contains('?'), parts.uri.query()) {
                    location.push('?');
                    location.push_str(q);
                }
            }
            None => location.push_str(parts.uri.path_and_query().map_or("/", |pq| pq.as_str())),
        }
        match HeaderValue::try_from(location) {
            Ok(location) => {
                let mut response = Response::new(());
                *response.status_mut() = self.status;
                response.headers_mut().insert(LOCATION, location);
                Action::Redirect(response)
            }
            // Only a request authority with bytes a header cannot carry gets here.
            Err(_) => Action::Direct {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: "",
            },
        }
    }
}

/// `("host", Some(80))` from `host:80`, `("[::1]", Some(80))` from `[::1]:80`.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let split_at = if authority.starts_with('[') {
        authority.find(']').map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    match split_at.map(|i| authority.split_at(i)) {
        Some((host, port)) => match port.strip_prefix(':').and_then(|p| p.parse().ok()) {
            Some(p) => (host, Some(p)),
            None => (authority, None),
        },
        None => (authority, None),
    }
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}
