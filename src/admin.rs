//! The proxy's admin API (ztunnel's localhost:15000): what `istioctl ztunnel-config` and people read.
//!
//! Input: the admin listeners (bound on localhost only, see [`bind`]) and an [`AdminInputs`]: the state
//! handle, the certificate manager, in-pod mode's pods, the [`LogControl`], and a [`ShutdownTrigger`].
//! Output: answers, over [`crate::admin_http`]'s bounded server:
//!
//! | path | methods | what |
//! |---|---|---|
//! | `/` | GET | an HTML index of these endpoints |
//! | `/config_dump` | GET | state, certificates, pods, config, version as JSON ([`config_dump`]) |
//! | `/logging` | GET, POST | the log filter; `POST ?level=<directives>` adds to it, `?reset` returns to the start-up one |
//! | `/quitquitquit` | POST | starts the graceful shutdown SIGTERM starts; answers once drained or at the deadline |
//! | `/debug/pprof/profile` | GET | a CPU profile in pprof's format, `?seconds=` (1–300, default 10), `?frequency=` (Hz, 1–1000, default 100) ([`profile`]) |
//! | `/debug/pprof/heap` | GET | the live sampled allocations in pprof's format, once activated ([`heap`]) |
//! | `/debug/pprof/heap/profiling` | GET, POST | whether allocations are sampled; `?activate=true\|false` switches (as ztunnel) |
//!
//! An unknown path is 404, a known one with another method 405, a bad query 400; nothing changes on a 4xx.
//! The server stops accepting when the proxy starts shutting down.

pub mod config_dump;
pub mod heap;
mod pprof;
pub mod profile;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin_http::{Answer, Reply, Replying, Request};
use crate::config::Config;
use crate::identity::CertManager;
use crate::inpod::PodStates;
use crate::logging::LogControl;
use crate::socket::{self, SocketOpts};
use crate::state::StateHandle;

/// How long one admin exchange may take, besides `/quitquitquit`'s own deadline: reading, rendering and
/// writing a dump of a large mesh stays well within it.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the proxy's graceful shutdown and tells when it is over. Cheap to clone.
#[derive(Clone)]
pub struct ShutdownTrigger {
    request: Arc<watch::Sender<bool>>,
    stopped: watch::Receiver<bool>,
    deadline: Duration,
}

impl ShutdownTrigger {
    /// A trigger that sets `request` to true and then waits (at most `deadline`) for `stopped` to turn true.
    pub fn new(
        request: Arc<watch::Sender<bool>>,
        stopped: watch::Receiver<bool>,
        deadline: Duration,
    ) -> ShutdownTrigger {
        ShutdownTrigger {
            request,
            stopped,
            deadline,
        }
    }

    /// Starts the shutdown; returns whether it finished within the deadline.
    pub async fn shutdown_and_wait(&self) -> bool {
        self.request.send_replace(true);
        let mut stopped = self.stopped.clone();
        let waited = tokio::time::timeout(self.deadline, stopped.wait_for(|s| *s)).await;
        matches!(waited, Ok(Ok(_)))
    }
}

/// What the admin endpoints read and act on.
pub struct AdminInputs {
    /// The configuration (for `/config_dump`).
    pub cfg: Arc<Config>,
    /// The mesh state.
    pub state: StateHandle,
    /// The certificates held.
    pub certs: Arc<CertManager>,
    /// In-pod mode's pods (`None` in dedicated mode).
    pub pods: Option<PodStates>,
    /// The log filter.
    pub logs: LogControl,
    /// The graceful shutdown `/quitquitquit` starts.
    pub shutdown: ShutdownTrigger,
}

/// The admin addresses for `port`: `127.0.0.1`, and `[::1]` when IPv6 is on, as ztunnel binds.
pub fn addresses(cfg: &Config, port: u16) -> Vec<SocketAddr> {
    let mut out = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
    if cfg.ipv6_enabled {
        out.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    }
    out
}

/// Binds the admin port on localhost in the current network namespace. IPv6 loopback is skipped (with a
/// debug line) where the host has none; failing on `127.0.0.1` is an error.
pub fn bind(cfg: &Config) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for addr in addresses(cfg, cfg.ports.admin) {
        match socket::listen(addr, SocketOpts::default()) {
            Ok(l) => out.push(l),
            Err(e) if addr.is_ipv6() => {
                tracing::debug!(%addr, error = %e, "no IPv6 loopback; admin port on IPv4 only")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A running admin server: [`finished`](Self::finished) waits for its answers in flight.
pub struct AdminServer {
    in_flight: mpsc::Receiver<()>,
}

impl AdminServer {
    /// Waits until every admin connection (the `/quitquitquit` answer among them) has been answered and
    /// the server stopped accepting, or `bound` passed.
    pub async fn finished(mut self, bound: Duration) {
        let _ = tokio::time::timeout(bound, self.in_flight.recv()).await;
    }
}

/// Serves the admin API on `listeners` until `stop` turns true.
pub fn spawn(
    listeners: Vec<TcpListener>,
    inputs: AdminInputs,
    stop: watch::Receiver<bool>,
) -> AdminServer {
    let (guard, in_flight) = mpsc::channel::<()>(1);
    let admin = Arc::new(Admin {
        inputs,
        _guard: guard,
    });
    // Room for the longest of /quitquitquit's drain and a CPU profile's sampling.
    let exchange = EXCHANGE_TIMEOUT
        + admin
            .inputs
            .shutdown
            .deadline
            .max(Duration::from_secs(profile::MAX_SECONDS));
    for l in listeners {
        let admin = admin.clone();
        tokio::spawn(crate::admin_http::serve_async(
            l,
            stop.clone(),
            exchange,
            move |req| {
                let admin = admin.clone();
                Box::pin(async move { admin.handle(req).await }) as Replying
            },
        ));
    }
    AdminServer { in_flight }
}

/// The endpoints, sharing the inputs. Held by every connection task: its drop (the last one) closes
/// `_guard`, which is how [`AdminServer::finished`] learns nothing is left to answer.
struct Admin {
    inputs: AdminInputs,
    _guard: mpsc::Sender<()>,
}

/// The endpoints and what each does, for the index page.
const ENDPOINTS: [(&str, &str); 6] = [
    ("config_dump", "workloads, services, policies, certificates and pods as this proxy sees them (JSON)"),
    ("logging", "the log filter; POST ?level=&lt;directives&gt; to change it, POST ?reset to go back to the start-up filter"),
    ("quitquitquit", "POST: drain and stop the proxy, as SIGTERM does"),
    ("debug/pprof/profile", "CPU profile in pprof's format (go tool pprof); ?seconds= (1-300, default 10), ?frequency= (Hz, 1-1000, default 100)"),
    ("debug/pprof/heap", "heap profile in pprof's format: live allocations sampled since activation"),
    ("debug/pprof/heap/profiling", "whether allocations are sampled; ?activate=true|false to switch"),
];

/// What `/logging` says about itself on a bad request.
const LOGGING_USAGE: &str = "\
GET  /logging                       show the log filter in force
POST /logging                       the same
POST /logging?level=LEVEL           set the level of every target: off, error, warn, info, debug or trace
POST /logging?level=TARGET=LEVEL,.. set the level of some targets (e.g. meshnode::proxy=debug,access=info)
POST /logging?reset                 go back to the filter the process started with (RUST_LOG)
POST /logging?reset&level=...       go back, then apply the given levels
";

impl Admin {
    async fn handle(&self, req: Request) -> Reply {
        tracing::debug!(method = %req.method, target = %req.target, "admin request");
        let method = req.method.as_str();
        match req.path() {
            "/" => match method {
                "GET" => index(),
                _ => not_allowed("GET"),
            },
            "/config_dump" => match method {
                "GET" => self.config_dump(),
                _ => not_allowed("GET"),
            },
            "/logging" => self.logging(&req),
            "/quitquitquit" => match method {
                "POST" => self.quit().await,
                _ => not_allowed("POST"),
            },
            "/debug/pprof/profile" => match method {
                "GET" => cpu_profile(&req).await,
                _ => not_allowed("GET"),
            },
            "/debug/pprof/heap" => match method {
                "GET" => heap_profile(),
                _ => not_allowed("GET"),
            },
            "/debug/pprof/heap/profiling" => match method {
                "GET" | "POST" => heap_switch(&req),
                _ => not_allowed("GET or POST"),
            },
            _ => Answer::not_found().into(),
        }
    }

    fn config_dump(&self) -> Reply {
        let i = &self.inputs;
        let state = i.state.load();
        let sources = config_dump::Sources {
            state: &state,
            certificates: i.certs.certificates(),
            pods: i.pods.as_ref().map(PodStates::snapshot).unwrap_or_default(),
            cfg: &i.cfg,
        };
        let dump = config_dump::render(&sources);
        match serde_json::to_vec_pretty(&dump) {
            Ok(body) => Reply {
                status: 200,
                reason: "OK",
                content_type: "application/json",
                body,
            },
            Err(e) => Answer::text(
                500,
                "Internal Server Error",
                format!("rendering the dump: {e}\n"),
            )
            .into(),
        }
    }

    fn logging(&self, req: &Request) -> Reply {
        let logs = &self.inputs.logs;
        let current = |prefix: &str| -> Reply {
            Answer::text(200, "OK", format!("{prefix}{}\n", logs.current())).into()
        };
        let mut level: Option<String> = None;
        let mut reset = false;
        for (name, value) in req.query() {
            match (name.as_str(), value) {
                ("level", Some(v)) if level.is_none() => level = Some(v),
                ("level", Some(_)) => return bad_logging("give level once"),
                ("reset", Some(_)) => reset = true,
                (_, None) => return bad_logging("a query value is not valid UTF-8"),
                (other, Some(_)) => {
                    return bad_logging(&format!("unknown parameter {other:?}"));
                }
            }
        }
        let changes = level.is_some() || reset;
        match req.method.as_str() {
            "GET" if !changes => current("current log level is "),
            "GET" => Answer::text(
                405,
                "Method Not Allowed",
                format!("changing the level takes POST\n\n{LOGGING_USAGE}"),
            )
            .into(),
            "POST" if !changes => current("current log level is "),
            "POST" => {
                let level = level.unwrap_or_default();
                if !reset && level.trim().is_empty() {
                    return bad_logging("level is empty");
                }
                match logs.set(reset, &level) {
                    Ok(now) => {
                        tracing::info!(filter = %now, "log level changed through the admin port");
                        Answer::text(200, "OK", format!("current log level is {now}\n")).into()
                    }
                    Err(e) => bad_logging(&e.to_string()),
                }
            }
            _ => Answer::text(
                405,
                "Method Not Allowed",
                format!("/logging takes GET or POST\n\n{LOGGING_USAGE}"),
            )
            .into(),
        }
    }

    async fn quit(&self) -> Reply {
        tracing::info!("shutdown requested through the admin port (/quitquitquit)");
        if self.inputs.shutdown.shutdown_and_wait().await {
            Answer::text(200, "OK", "stopped: every connection drained\n").into()
        } else {
            Answer::text(
                200,
                "OK",
                format!(
                    "shutting down: connections still open after {:?} are being closed\n",
                    self.inputs.shutdown.deadline
                ),
            )
            .into()
        }
    }
}

/// `/debug/pprof/profile?seconds=&frequency=`.
async fn cpu_profile(req: &Request) -> Reply {
    let mut seconds = profile::DEFAULT_SECONDS;
    let mut frequency = profile::DEFAULT_FREQUENCY;
    let bad =
        |why: String| -> Reply { Answer::text(400, "Bad Request", format!("{why}\n")).into() };
    for (name, value) in req.query() {
        let value = value.unwrap_or_default();
        match name.as_str() {
            "seconds" => match value.parse::<u64>() {
                Ok(s) if (1..=profile::MAX_SECONDS).contains(&s) => seconds = s,
                _ => {
                    return bad(format!(
                        "seconds must be a whole number from 1 to {}, not {value:?}",
                        profile::MAX_SECONDS
                    ))
                }
            },
            "frequency" => match value.parse::<u32>() {
                Ok(f) if (1..=profile::MAX_FREQUENCY).contains(&f) => frequency = f,
                _ => {
                    return bad(format!(
                        "frequency must be a whole number of Hz from 1 to {}, not {value:?}",
                        profile::MAX_FREQUENCY
                    ))
                }
            },
            other => return bad(format!("unknown parameter {other:?} (seconds, frequency)")),
        }
    }
    tracing::info!(
        seconds,
        frequency,
        "CPU profile requested through the admin port"
    );
    match profile::cpu(Duration::from_secs(seconds), frequency).await {
        Ok(body) => Reply {
            status: 200,
            reason: "OK",
            content_type: "application/octet-stream",
            body,
        },
        Err(e @ profile::Error::Busy) => Answer::text(409, "Conflict", format!("{e}\n")).into(),
        Err(e) => Answer::text(500, "Internal Server Error", format!("{e}\n")).into(),
    }
}

/// `/debug/pprof/heap`.
fn heap_profile() -> Reply {
    match heap::dump() {
        Ok(body) => Reply {
            status: 200,
            reason: "OK",
            content_type: "application/octet-stream",
            body,
        },
        Err(e @ heap::Error::Unavailable) => {
            Answer::text(501, "Not Implemented", format!("{e}\n")).into()
        }
        Err(e @ heap::Error::Inactive) => Answer::text(409, "Conflict", format!("{e}\n")).into(),
        Err(e) => Answer::text(500, "Internal Server Error", format!("{e}\n")).into(),
    }
}

/// `/debug/pprof/heap/profiling?activate=true|false` (ztunnel takes it on any method; so do we, GET or
/// POST).
fn heap_switch(req: &Request) -> Reply {
    let mut want = None;
    for (name, value) in req.query() {
        match (name.as_str(), value.as_deref()) {
            ("activate", Some("true")) => want = Some(true),
            ("activate", Some("false")) => want = Some(false),
            ("activate", v) => {
                return Answer::text(
                    400,
                    "Bad Request",
                    format!("invalid activate value {v:?}; expected true or false\n"),
                )
                .into()
            }
            (other, _) => {
                return Answer::text(
                    400,
                    "Bad Request",
                    format!("unknown parameter {other:?} (activate)\n"),
                )
                .into()
            }
        }
    }
    let now = match want {
        Some(on) => {
            tracing::info!(
                active = on,
                "heap profiling switched through the admin port"
            );
            heap::set_active(on)
        }
        None => heap::active(),
    };
    match now {
        Ok(on) => Answer::text(200, "OK", format!("heap profiling active: {on}\n")).into(),
        Err(e @ heap::Error::Unavailable) => {
            Answer::text(501, "Not Implemented", format!("{e}\n")).into()
        }
        Err(e) => Answer::text(500, "Internal Server Error", format!("{e}\n")).into(),
    }
}

fn bad_logging(why: &str) -> Reply {
    Answer::text(
        400,
        "Bad Request",
        format!("{why}; the log filter is unchanged\n\n{LOGGING_USAGE}"),
    )
    .into()
}

fn not_allowed(allowed: &str) -> Reply {
    Answer::text(
        405,
        "Method Not Allowed",
        format!("method not allowed; this path takes {allowed}\n"),
    )
    .into()
}

fn index() -> Reply {
    let mut rows = String::new();
    for (path, what) in ENDPOINTS {
        rows.push_str(&format!(
            "    <tr><td><a href=\"/{path}\">/{path}</a></td><td>{what}</td></tr>\n"
        ));
    }
    let body = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n  <meta charset=\"utf-8\">\n  <title>meshnode admin</title>\n  <style>\n    body {{ font-family: sans-serif; margin: 2em; }}\n    td {{ padding: 0.3em 1em 0.3em 0; vertical-align: top; }}\n  </style>\n</head>\n<body>\n  <h1>meshnode {version}: admin</h1>\n  <table>\n{rows}  </table>\n</body>\n</html>\n",
        version = env!("CARGO_PKG_VERSION"),
    );
    Reply {
        status: 200,
        reason: "OK",
        content_type: "text/html; charset=utf-8",
        body: body.into_bytes(),
    }
}

#[cfg(test)]
mod tests;
