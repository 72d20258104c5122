//! The sandbox's bookinfo-like apps (productpage, details, reviews-v1/v2/v3, ratings) and the HTTP client the
//! scenario calls them with.
//!
//! Input: an [`AppConfig`] (which app, where to listen, where its upstreams are) and a bound listener, or
//! for the client an address, a path and a timeout. Output: answers shaped like real bookinfo's (JSON from the
//! backends, a plain-text page from productpage stating what each upstream gave), each with `x-app: <name>`;
//! for the client an [`Outcome`] that says what happened on the wire (answered, reset, closed, refused,
//! timed out). Each pod of the sandbox runs one app (`meshnode sandbox app`, wired by the lead's CLI).
//!
//! The server is hand-written HTTP/1.1: one request per connection, head at most 8 KiB within 10 s, at most
//! [`MAX_CONNECTIONS`] exchanges at once (more wait in the kernel backlog). Upstream failures never fail a
//! page: productpage and reviews answer 200 and say what was unavailable, as bookinfo does.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::admin_http::{self, read_head, Head};

#[cfg(test)]
mod tests;

/// Exchanges served at once; the scenario sends a handful, the bound keeps a runaway loop from eating memory.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest request head accepted (larger gets 431).
const MAX_HEAD: usize = 8 * 1024;
/// Time allowed to send the request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to write an answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering, unread request bytes are drained this long before closing, so the kernel sends FIN and
/// not RST (an RST could destroy the answer before the client reads it).
const LINGER: Duration = Duration::from_secs(1);
/// productpage's budget per upstream call (bookinfo's productpage uses 3 s too).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// reviews' budget for ratings: below [`UPSTREAM_TIMEOUT`], so a hung ratings still lets reviews answer
/// productpage in time.
const RATINGS_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer the client reads.
const MAX_RESPONSE: usize = 1024 * 1024;
/// Shutdown waits this long for exchanges in flight.
const DRAIN: Duration = Duration::from_secs(5);
/// The product every page shows (bookinfo's product 0).
const PRODUCT_ID: u32 = 0;
/// What reviews says when ratings does not answer (bookinfo's text).
const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

/// One bookinfo service (reviews with its version, 1..=3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum App {
    /// The page: calls details and reviews.
    Productpage,
    /// Book details.
    Details,
    /// Reviews; v2 and v3 call ratings (black and red stars).
    Reviews(u8),
    /// Star ratings.
    Ratings,
    /// Not bookinfo: the outside world's server, standing in for an external API
    /// ([`super::model::OUTSIDE_HOST`]); answers every GET with its name and the client address it saw.
    External,
}

impl App {
    /// The upstream names this app calls (keys of [`AppConfig::upstreams`]).
    pub fn upstreams(&self) -> &'static [&'static str] {
        match self {
            App::Productpage => &["details", "reviews"],
            App::Reviews(2 | 3) => &["ratings"],
            _ => &[],
        }
    }
}

impl FromStr for App {
    type Err = AppError;

    fn from_str(s: &str) -> Result<App, AppError> {
        match s {
            "productpage" => Ok(App::Productpage),
            "details" => Ok(App::Details),
            "reviews-v1" => Ok(App::Reviews(1)),
            "reviews-v2" => Ok(App::Reviews(2)),
            "reviews-v3" => Ok(App::Reviews(3)),
            "ratings" => Ok(App::Ratings),
            "external" => Ok(App::External),
            _ => Err(AppError::UnknownApp {
                name: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            App::Productpage => f.write_str("productpage"),
            App::Details => f.write_str("details"),
            App::Reviews(v) => write!(f, "reviews-v{v}"),
            App::Ratings => f.write_str("ratings"),
            App::External => f.write_str("external"),
        }
    }
}

/// What one app process serves and calls.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Which app.
    pub app: App,
    /// Where [`run`] listens.
    pub listen: SocketAddr,
    /// Upstream name (`details`, `reviews`, `ratings`) → address.
    pub upstreams: BTreeMap<String, SocketAddr>,
}

/// Why an app could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The name is none of bookinfo's apps (or a reviews version outside 1..=3).
    #[error("unknown app {name:?}: expected productpage, details, reviews-v1, reviews-v2, reviews-v3, ratings or external")]
    UnknownApp {
        /// The name given.
        name: String,
    },
    /// The app calls an upstream that was not given.
    #[error("{app} calls {upstream} but no --upstream {upstream}=IP:PORT was given")]
    MissingUpstream {
        /// The app.
        app: App,
        /// The missing upstream's name.
        upstream: &'static str,
    },
    /// The listen address could not be bound.
    #[error("{app}: cannot listen on {addr}: {source}")]
    Bind {
        /// The app.
        app: App,
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: io::Error,
    },
    /// The runtime or the signal handlers could not be set up.
    #[error("{app}: cannot start ({what}): {source}")]
    Start {
        /// The app.
        app: App,
        /// `"runtime"` or `"signal handler"`.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Checks the app is a real one and that every upstream it calls is given.
fn validate(cfg: &AppConfig) -> Result<(), AppError> {
    if let App::Reviews(v) = cfg.app {
        if !(1..=3).contains(&v) {
            return Err(AppError::UnknownApp {
                name: cfg.app.to_string(),
            });
        }
    }
    match cfg
        .app
        .upstreams()
        .iter()
        .find(|u| !cfg.upstreams.contains_key(**u))
    {
        Some(upstream) => Err(AppError::MissingUpstream {
            app: cfg.app,
            upstream,
        }),
        None => Ok(()),
    }
}

/// Runs the app on a current-thread runtime: binds `cfg.listen`, serves until SIGTERM or SIGINT.
pub fn run(cfg: AppConfig) -> Result<(), AppError> {
    validate(&cfg)?;
    let app = cfg.app;
    let start = |what| move |source| AppError::Start { app, what, source };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(start("runtime"))?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(start("signal handler"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(start("signal handler"))?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| AppError::Bind { app, addr: cfg.listen, source })?;
        tracing::info!(%app, listen = %cfg.listen, upstreams = ?cfg.upstreams, "sandbox app serving");
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        serve(cfg, listener, stop).await
    })
}

/// Serves `cfg.app` on `listener` until `shutdown` resolves, then waits up to 5 s for exchanges in flight.
/// A missing upstream is an error before anything is accepted.
pub async fn serve(
    cfg: AppConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    validate(&cfg)?;
    let cfg = Arc::new(cfg);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let served = cfg.clone();
    admin_http::accept_bounded(
        &listener,
        limit.clone(),
        shutdown,
        "sandbox app",
        move |stream| {
            let cfg = served.clone();
            async move { exchange(stream, &cfg).await }
        },
    )
    .await;
    // Every permit back means every exchange finished.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, limit.acquire_many(all)).await;
    Ok(())
}

/// An answer before encoding.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: body.into(),
        }
    }

    fn json(body: Value) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: body.to_string(),
        }
    }

    fn encode(&self, app: App, keep_alive: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            _ => "Internal Server Error",
        };
        let allow = if self.status == 405 {
            "allow: GET\r\n"
        } else {
            ""
        };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nx-app: {app}\r\n{allow}\
             connection: {connection}\r\n\r\n{}",
            self.status,
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// One connection: read a head, answer; again while the client keeps the connection alive (HTTP/1.1
/// without `connection: close`), else close.
async fn exchange(mut stream: TcpStream, cfg: &AppConfig) {
    let mut first = true;
    loop {
        let (reply, keep) = match read_head(&mut stream, MAX_HEAD, HEAD_TIMEOUT).await {
            Head::Complete(head) => (
                answer(cfg, &head, stream.peer_addr().ok()).await,
                keeps_alive(&head),
            ),
            Head::TooLarge => (Reply::text(431, "request head larger than 8 KiB\n"), false),
            // A kept-alive connection left idle is closed without an answer, as servers do.
            Head::TimedOut if !first => return,
            Head::TimedOut => (
                Reply::text(408, "request head not received within 10 s\n"),
                false,
            ),
            Head::Closed => return,
        };
        first = false;
        let bytes = reply.encode(cfg.app, keep);
        if !matches!(
            tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        if !keep {
            break;
        }
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Whether a request head asks to keep the connection: HTTP/1.1 without `connection: close`.
fn keeps_alive(head: &[u8]) -> bool {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let http11 = lines
        .next()
        .is_some_and(|l| l.trim_end().ends_with("HTTP/1.1"));
    http11
        && !lines.any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("connection")
                    && value.trim().eq_ignore_ascii_case("close")
            })
        })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Routes one request head (without its final blank line).
async fn answer(cfg: &AppConfig, head: &[u8], peer: Option<SocketAddr>) -> Reply {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (method, target) = match parts[..] {
        [m, t, v] if v.starts_with("HTTP/1.") && t.starts_with('/') && !m.is_empty() => (m, t),
        _ => return Reply::text(400, "malformed request line\n"),
    };
    if method != "GET" {
        return Reply::text(405, "only GET is served\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    if path == "/health" {
        return Reply::text(200, "ok");
    }
    let id = |prefix: &str| path.strip_prefix(prefix).map(str::parse::<u32>);
    match cfg.app {
        App::Productpage if path == "/" || path == "/productpage" => productpage(cfg).await,
        App::External => Reply::text(
            200,
            format!(
                "hello from {}\nclient {}\n",
                super::model::OUTSIDE_HOST,
                peer.map_or_else(|| "unknown".to_string(), |p| p.ip().to_string())
            ),
        ),
        App::Details => match id("/details/") {
            Some(Ok(id)) => Reply::json(details(id)),
            Some(Err(_)) => Reply::text(400, "product id must be a number\n"),
            None => Reply::text(404, "not found\n"),
        },
        App::Ratings => match id("/ratings/") {
            Some(Ok(id)) => Reply::json(ratings(id)),
            Some(Err(_)) => Reply::text(400, "product id must be a number\n"),
            None => Reply::text(404, "not found\n"),
        },
        App::Reviews(version) => match id("/reviews/") {
            Some(Ok(id)) => Reply::json(reviews(cfg, version, id).await),
            Some(Err(_)) => Reply::text(400, "product id must be a number\n"),
            None => Reply::text(404, "not found\n"),
        },
        _ => Reply::text(404, "not found\n"),
    }
}

fn details(id: u32) -> Value {
    json!({"id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback", "pages": 200,
           "publisher": "PublisherA", "language": "English"})
}

fn ratings(id: u32) -> Value {
    json!({"id": id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
}

/// Calls an upstream by name with the async client.
async fn call(cfg: &AppConfig, upstream: &str, path: &str, timeout: Duration) -> Outcome {
    match cfg.upstreams.get(upstream) {
        Some(addr) => get_async(*addr, path, timeout).await,
        None => Outcome::Failed(format!("no upstream {upstream} configured")),
    }
}

async fn reviews(cfg: &AppConfig, version: u8, id: u32) -> Value {
    let color = match version {
        2 => Some("black"),
        3 => Some("red"),
        _ => None,
    };
    let stars: Result<Value, String> = match color {
        None => Err(String::new()),
        Some(_) => match call(cfg, "ratings", &format!("/ratings/{id}"), RATINGS_TIMEOUT).await {
            Outcome::Answered {
                status: 200, body, ..
            } => serde_json::from_str::<Value>(&body)
                .ok()
                .map(|v| v["ratings"].clone())
                .filter(Value::is_object)
                .ok_or_else(|| "ratings answered without ratings".to_string()),
            other => Err(other.to_string()),
        },
    };
    let texts = [
        ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
        ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."),
    ];
    let list: Vec<Value> = texts
        .iter()
        .map(|(reviewer, text)| {
            let mut review = json!({"reviewer": reviewer, "text": text});
            match (color, &stars) {
                (Some(color), Ok(stars)) => {
                    review["rating"] = json!({"stars": stars[*reviewer], "color": color});
                }
                (Some(_), Err(_)) => review["rating"] = json!({"error": RATINGS_UNAVAILABLE}),
                (None, _) => {}
            }
            review
        })
        .collect();
    json!({"id": id.to_string(), "podname": cfg.app.to_string(), "version": format!("v{version}"),
           "reviews": list})
}

/// The page: one line per upstream saying what it gave.
async fn productpage(cfg: &AppConfig) -> Reply {
    let (details_path, reviews_path) = (
        format!("/details/{PRODUCT_ID}"),
        format!("/reviews/{PRODUCT_ID}"),
    );
    let (details, reviews) = tokio::join!(
        call(cfg, "details", &details_path, UPSTREAM_TIMEOUT),
        call(cfg, "reviews", &reviews_path, UPSTREAM_TIMEOUT),
    );
    let details = match &details {
        Outcome::Answered {
            status: 200, body, ..
        } => {
            match serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["author"].as_str().map(String::from))
            {
                Some(author) => format!("details: ok ({author})"),
                None => "details: unavailable (answer without an author)".to_string(),
            }
        }
        other => format!("details: unavailable ({other})"),
    };
    let reviews = match &reviews {
        Outcome::Answered {
            status: 200,
            app,
            body,
        } => match serde_json::from_str::<Value>(body) {
            Ok(v) => {
                let name = app
                    .clone()
                    .or_else(|| v["podname"].as_str().map(String::from));
                let rating = &v["reviews"][0]["rating"];
                let stars = match (rating["color"].as_str(), rating.get("error")) {
                    (Some(color), _) => format!("ratings: {color} stars"),
                    (None, Some(_)) => "ratings: unavailable".to_string(),
                    (None, None) => "no ratings".to_string(),
                };
                format!(
                    "reviews: ok ({}, {stars})",
                    name.as_deref().unwrap_or("unknown")
                )
            }
            Err(_) => "reviews: unavailable (answer is not JSON)".to_string(),
        },
        other => format!("reviews: unavailable ({other})"),
    };
    Reply::text(
        200,
        format!(
            "The Comedy of Errors (served by {})\n{details}\n{reviews}\n",
            cfg.app
        ),
    )
}

/// What a GET got, as the scenario's table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer.
    Answered {
        /// Status code.
        status: u16,
        /// The `x-app` header: which app answered.
        app: Option<String>,
        /// The body (lossy UTF-8).
        body: String,
    },
    /// The connection was reset (RST) before a full answer.
    Reset,
    /// The peer closed cleanly before sending any byte.
    Closed,
    /// Nobody listens (RST to the SYN).
    Refused,
    /// No full answer within the timeout.
    TimedOut {
        /// The timeout that ran out.
        after: Duration,
    },
    /// Anything else (unreachable network, malformed answer, ...).
    Failed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Answered {
                status,
                app: Some(app),
                ..
            } => write!(f, "HTTP {status} from {app}"),
            Outcome::Answered {
                status, app: None, ..
            } => write!(f, "HTTP {status} (no x-app)"),
            Outcome::Reset => f.write_str("connection reset"),
            Outcome::Closed => f.write_str("closed without an answer"),
            Outcome::Refused => f.write_str("connection refused"),
            Outcome::TimedOut { after } if after.subsec_millis() == 0 => {
                write!(f, "timed out after {} s", after.as_secs())
            }
            Outcome::TimedOut { after } => write!(f, "timed out after {} ms", after.as_millis()),
            Outcome::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl Outcome {
    fn from_io(e: &io::Error, timeout: Duration) -> Outcome {
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Outcome::Reset,
            io::ErrorKind::ConnectionRefused => Outcome::Refused,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Outcome::TimedOut { after: timeout }
            }
            _ => Outcome::Failed(e.to_string()),
        }
    }
}

fn request(addr: SocketAddr, method: &str, path: &str) -> Vec<u8> {
    let length = if method == "GET" || method == "HEAD" {
        ""
    } else {
        "content-length: 0\r\n"
    };
    format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: meshnode-sandbox\r\n{length}connection: close\r\n\r\n")
        .into_bytes()
}

/// Answer bytes as they arrive; says when the answer is complete.
#[derive(Default)]
struct Collector {
    buf: Vec<u8>,
}

impl Collector {
    /// Adds bytes; `Some` once the answer is complete (by content-length) or too large.
    fn push(&mut self, bytes: &[u8]) -> Option<Outcome> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_RESPONSE {
            return Some(Outcome::Failed("answer larger than 1 MiB".to_string()));
        }
        match self.parse() {
            Ok((outcome, Body::Complete)) => Some(outcome),
            _ => None,
        }
    }

    /// The outcome at EOF.
    fn finish(&self) -> Outcome {
        if self.buf.is_empty() {
            return Outcome::Closed;
        }
        match self.parse() {
            Ok((outcome, Body::Complete | Body::UntilEof)) => outcome,
            Ok((_, Body::Short)) => Outcome::Failed("answer body cut short".to_string()),
            Err(why) => Outcome::Failed(why),
        }
    }

    /// The answer so far and how much of its body is here (`Err` while the head is incomplete or malformed).
    fn parse(&self) -> Result<(Outcome, Body), String> {
        let end = find(&self.buf, b"\r\n\r\n")
            .ok_or_else(|| format!("answer cut short after {} bytes", self.buf.len()))?;
        let head = String::from_utf8_lossy(&self.buf[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = match status_line.split_whitespace().collect::<Vec<_>>()[..] {
            [v, code, ..] if v.starts_with("HTTP/") => code.parse::<u16>().ok(),
            _ => None,
        }
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
        let (mut app, mut length) = (None, None);
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("x-app") {
                    app = Some(value.trim().to_string());
                } else if name.trim().eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let body = &self.buf[end + 4..];
        let (body, state) = match length {
            Some(n) if body.len() >= n => (&body[..n], Body::Complete),
            Some(_) => (body, Body::Short),
            None => (body, Body::UntilEof),
        };
        let body = String::from_utf8_lossy(body).into_owned();
        Ok((Outcome::Answered { status, app, body }, state))
    }
}

/// How much of an answer's body has arrived.
enum Body {
    /// All `content-length` bytes.
    Complete,
    /// Fewer than `content-length` bytes.
    Short,
    /// No `content-length`: the body ends at EOF.
    UntilEof,
}

/// A blocking `GET path` to `addr`, all of it within `timeout`. For threads that entered a pod's netns.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Outcome {
    call_blocking(addr, "GET", path, timeout)
}

/// A blocking `method path` (no body) to `addr`, all of it within `timeout`.
pub fn call_blocking(addr: SocketAddr, method: &str, path: &str, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    let Some(connect_budget) = left() else {
        return Outcome::TimedOut { after: timeout };
    };
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, connect_budget) {
        Ok(s) => s,
        Err(e) => return Outcome::from_io(&e, timeout),
    };
    let write = left()
        .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
        .and_then(|d| stream.set_write_timeout(Some(d)))
        .and_then(|()| stream.write_all(&request(addr, method, path)));
    if let Err(e) = write {
        return Outcome::from_io(&e, timeout);
    }
    let mut answer = Collector::default();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let Some(d) = left() else {
            return Outcome::TimedOut { after: timeout };
        };
        let read = stream
            .set_read_timeout(Some(d))
            .and_then(|()| stream.read(&mut chunk));
        match read {
            Ok(0) => return answer.finish(),
            Ok(n) => {
                if let Some(done) = answer.push(&chunk[..n]) {
                    return done;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Outcome::from_io(&e, timeout),
        }
    }
}

/// A kept-alive HTTP/1.1 connection: one `GET` after another on the same connection (blocking; open it
/// on a thread inside a pod's namespace, use it from any thread).
pub struct KeptAlive {
    addr: SocketAddr,
    stream: std::net::TcpStream,
    timeout: Duration,
}

impl KeptAlive {
    /// Connects to `addr` within `timeout`.
    pub fn open(addr: SocketAddr, timeout: Duration) -> io::Result<KeptAlive> {
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(KeptAlive {
            addr,
            stream,
            timeout,
        })
    }

    /// `GET path` on the connection; its answer (a reset or a close is the connection's end).
    pub fn get(&mut self, path: &str) -> Outcome {
        let head = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: meshnode-sandbox\r\n\r\n",
            self.addr
        );
        if let Err(e) = self.stream.write_all(head.as_bytes()) {
            return Outcome::from_io(&e, self.timeout);
        }
        let mut answer = Collector::default();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return answer.finish(),
                Ok(n) => {
                    if let Some(done) = answer.push(&chunk[..n]) {
                        return done;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Outcome::from_io(&e, self.timeout),
            }
        }
    }
}

/// The async `GET` the apps call their upstreams with.
async fn get_async(addr: SocketAddr, path: &str, timeout: Duration) -> Outcome {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Outcome::from_io(&e, timeout))?;
        stream
            .write_all(&request(addr, "GET", path))
            .await
            .map_err(|e| Outcome::from_io(&e, timeout))?;
        let mut answer = Collector::default();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return Ok(answer.finish()),
                Ok(n) => {
                    if let Some(done) = answer.push(&chunk[..n]) {
                        return Ok(done);
                    }
                }
                Err(e) => return Err(Outcome::from_io(&e, timeout)),
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(outcome) | Err(outcome)) => outcome,
        Err(_) => Outcome::TimedOut { after: timeout },
    }
}
