//! The process's log output — ztunnel's text and JSON shapes, on stdout, through a non-blocking writer —
//! and its level, changeable while running (the admin port's `/logging`).
//!
//! Input: `RUST_LOG` (tracing `Targets` directives: `info`, `meshnode::proxy=debug,access=warn`; invalid →
//! a warning and `info`), `LOG_FORMAT` (`json`, else plain text), `MESHNODE_LOG_BUFFER_LINES` (lines the
//! writer buffers, default ztunnel's 10 000; invalid → a warning and the default). Output: one global
//! subscriber, installed by [`init`], writing [`format`]'s shapes to stdout; a [`LogControl`] that reads
//! and replaces its filter; a [`LogGuard`] that flushes on drop.
//!
//! The filter is a reload layer in front of the formatter, so a change applies to the next event on every
//! thread, with no restart. Lines go to stdout through [`writer`]: the thread that logs (a data-plane
//! worker, for access lines) only appends to a bounded buffer and never waits on stdout; when stdout does
//! not keep up and the buffer is full, **lines are dropped and counted** (ztunnel back-pressures instead;
//! why we do not is in [`writer`]'s header), and a `warn` line says how many once stdout drains. Exit paths
//! that skip destructors (`std::process::exit`) go through [`exit`], which flushes first (at most
//! [`FLUSH_DEADLINE`], so a stalled stdout cannot hold an exit).

pub mod format;
pub mod writer;

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::Subscriber;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, Layer, Registry};

/// The level used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_LEVEL: &str = "info";

/// Lines the writer buffers when `MESHNODE_LOG_BUFFER_LINES` is unset: ztunnel's bound.
pub const DEFAULT_BUFFER_LINES: usize = 10_000;

crate::config::vars::declare! { LOGGING_VARS:
    /// Log filter: `level` or `target=level` clauses, comma-separated (e.g. `info,access=debug`); also
    /// changeable at run time on the admin port's `/logging`.
    RUST_LOG = "info";
    /// `json` for one flat JSON object per line; anything else for ztunnel's tab-separated text.
    LOG_FORMAT = "plain";
    /// meshnode's own: lines buffered for stdout; when stdout does not drain, further lines are dropped
    /// and counted (the data path never waits on its log).
    MESHNODE_LOG_BUFFER_LINES = "10000";
}

/// How long [`exit`] and [`LogGuard`]'s drop wait for buffered lines to reach stdout: long enough for any
/// reader that is reading, short enough that a stalled stdout does not hold up an exit (a second signal's
/// "exit at once").
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// The process's writer, for the exit paths that cannot reach the [`LogGuard`]. The only static here:
/// the logging handle, as STYLE.md R7 allows.
static WRITER: OnceLock<Arc<writer::Shared>> = OnceLock::new();

/// Which shape lines take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `time<TAB>level<TAB>scope<TAB>message<TAB>key=value …` ([`format::Text`]).
    Text,
    /// One flat JSON object per line ([`format::Json`]).
    Json,
}

impl Format {
    /// The shape `LOG_FORMAT` asks for: `json`, else text (as ztunnel reads it).
    pub fn from_env_value(value: Option<&str>) -> Format {
        match value {
            Some("json") => Format::Json,
            _ => Format::Text,
        }
    }
}

/// The formatting layer: lines in `format` written to `writer`. [`init`] uses it over the non-blocking
/// stdout writer; tests over a buffer.
pub fn layer<S, W>(format: Format, writer: W) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer);
    match format {
        Format::Text => Box::new(fmt.event_format(format::Text).fmt_fields(format::Text)),
        Format::Json => Box::new(fmt.event_format(format::Json).fmt_fields(format::Json)),
    }
}

/// Why a level could not be set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The directive does not parse.
    #[error("invalid level {directive:?}: {reason}")]
    Invalid {
        /// What was asked for.
        directive: String,
        /// Why it is refused.
        reason: String,
    },
    /// The subscriber is gone (the process is exiting).
    #[error("the log filter can no longer be changed: {0}")]
    Reload(#[from] reload::Error),
}

/// Reads and changes the log filter of the running process. Cheap to clone.
#[derive(Clone)]
pub struct LogControl {
    inner: Arc<Inner>,
}

enum Inner {
    /// The global subscriber's filter.
    Live {
        handle: reload::Handle<Targets, Registry>,
        default: Targets,
    },
    /// A filter that affects nothing (tests, embedders that install their own subscriber).
    Detached {
        current: Box<Mutex<Targets>>,
        default: Targets,
    },
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish()
    }
}

impl LogControl {
    /// A control over no subscriber at all: `set` validates and remembers, nothing else changes.
    pub fn detached(default: &str) -> Result<LogControl, Error> {
        let default = parse(default)?;
        Ok(LogControl {
            inner: Arc::new(Inner::Detached {
                current: Box::new(Mutex::new(default.clone())),
                default,
            }),
        })
    }

    /// The filter in force, as directives (`info,access=debug`).
    pub fn current(&self) -> String {
        match &*self.inner {
            Inner::Live { handle, .. } => handle
                .with_current(|t| t.to_string())
                .unwrap_or_else(|_| "unknown (exiting)".into()),
            Inner::Detached { current, .. } => current.lock().to_string(),
        }
    }

    /// Adds `directives` to the filter in force (a later directive for the same target wins), or, with
    /// `reset`, to the start-up filter. Validates everything before changing anything; returns the new
    /// filter as [`current`](Self::current) prints it.
    pub fn set(&self, reset: bool, directives: &str) -> Result<String, Error> {
        let base = match &*self.inner {
            Inner::Live { default, .. } | Inner::Detached { default, .. } if reset => {
                default.to_string()
            }
            _ => self.current(),
        };
        let combined = if directives.is_empty() {
            base
        } else {
            validate(directives)?;
            format!("{base},{directives}")
        };
        let next = parse(&combined)?;
        match &*self.inner {
            Inner::Live { handle, .. } => handle.reload(next)?,
            Inner::Detached { current, .. } => *current.lock() = next,
        }
        Ok(self.current())
    }
}

/// Accepts what an operator types: comma-separated `level` or `target=level` clauses, each level one of
/// `off error warn info debug trace`. A bare target (which `Targets` would read as "everything") is refused.
fn validate(directives: &str) -> Result<(), Error> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let invalid = |reason: String| Error::Invalid {
        directive: directives.to_string(),
        reason,
    };
    for clause in directives.split(',') {
        let clause = clause.trim();
        let level = match clause.split_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(invalid(format!("{clause:?} names no target"))),
            None => clause,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(invalid(format!(
                "{clause:?}: the level must be one of off, error, warn, info, debug, trace"
            )));
        }
    }
    Ok(())
}

fn parse(directives: &str) -> Result<Targets, Error> {
    Targets::from_str(directives).map_err(|e| Error::Invalid {
        directive: directives.to_string(),
        reason: e.to_string(),
    })
}

/// Keeps the log writer alive; dropping it writes out what is buffered (up to [`FLUSH_DEADLINE`]) and
/// stops the writer thread. Hold it until the process exits.
#[must_use = "dropping the guard stops log output"]
pub struct LogGuard {
    writer: Option<(Arc<writer::Shared>, std::thread::JoinHandle<()>)>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((shared, thread)) = self.writer.take() {
            shared.close();
            // A writer stuck on a stalled stdout is left behind rather than joined: the process is exiting.
            if shared.flush(Instant::now() + FLUSH_DEADLINE) {
                let _ = thread.join();
            }
        }
    }
}

/// Writes out what the process's writer holds, waiting at most [`FLUSH_DEADLINE`]; true when all of it
/// reached stdout (also when [`init`] never ran).
pub fn flush() -> bool {
    WRITER
        .get()
        .is_none_or(|w| w.flush(Instant::now() + FLUSH_DEADLINE))
}

/// [`flush`], then `std::process::exit(code)`: for exit paths that skip destructors (and so the guard).
pub fn exit(code: i32) -> ! {
    flush();
    std::process::exit(code)
}

/// Lines dropped since start because stdout did not keep up with them.
pub fn dropped_lines() -> u64 {
    WRITER.get().map_or(0, |w| w.dropped_total())
}

/// The start-up filter from `RUST_LOG`: unset or blank is [`DEFAULT_LEVEL`]; a value that does not validate
/// is [`DEFAULT_LEVEL`] too, with the reason to warn about.
fn start_filter(rust_log: Option<&str>) -> (Targets, Option<Error>) {
    let default = || parse(DEFAULT_LEVEL).expect("static level");
    match rust_log {
        Some(v) if !v.trim().is_empty() => match validate(v).and_then(|()| parse(v)) {
            Ok(t) => (t, None),
            Err(e) => (default(), Some(e)),
        },
        _ => (default(), None),
    }
}

/// The writer's buffer from `MESHNODE_LOG_BUFFER_LINES`: unset is [`DEFAULT_BUFFER_LINES`]; anything but a
/// positive number is refused (the caller warns and uses the default).
fn buffer_lines(value: Option<&str>) -> Result<usize, String> {
    match value.map(|v| (v, v.parse::<usize>())) {
        None => Ok(DEFAULT_BUFFER_LINES),
        Some((_, Ok(n))) if n > 0 => Ok(n),
        Some((v, _)) => Err(v.to_string()),
    }
}

/// Installs the global subscriber (once per process): filter from `RUST_LOG`, shape from `LOG_FORMAT`,
/// stdout through the non-blocking writer sized by `MESHNODE_LOG_BUFFER_LINES`.
pub fn init() -> (LogControl, LogGuard) {
    let (default, complaint) = start_filter(std::env::var(RUST_LOG).ok().as_deref());
    let format = Format::from_env_value(std::env::var(LOG_FORMAT).ok().as_deref());
    let lines = buffer_lines(std::env::var(MESHNODE_LOG_BUFFER_LINES).ok().as_deref());
    let report: writer::Report = Box::new(|dropped| {
        tracing::warn!(dropped, "log lines dropped: stdout is not keeping up");
    });
    let (shared, thread) = writer::start(
        std::io::stdout(),
        lines.clone().unwrap_or(DEFAULT_BUFFER_LINES),
        report,
    )
    .expect("starting the log writer thread");
    let _ = WRITER.set(shared.clone());
    let (filter, handle) = reload::Layer::new(default.clone());
    tracing_subscriber::registry()
        .with(filter)
        .with(layer(format, writer::NonBlocking(shared.clone())))
        .init();
    if let Some(e) = complaint {
        tracing::warn!(error = %e, "RUST_LOG ignored; logging at {DEFAULT_LEVEL}");
    }
    if let Err(value) = lines {
        tracing::warn!(
            value,
            "{MESHNODE_LOG_BUFFER_LINES} is not a positive number of lines; buffering {DEFAULT_BUFFER_LINES}"
        );
    }
    (
        LogControl {
            inner: Arc::new(Inner::Live { handle, default }),
        },
        LogGuard {
            writer: Some((shared, thread)),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_change_adds_to_the_filter_and_reset_returns_to_the_start() {
        let c = LogControl::detached("info").unwrap();
        assert_eq!(c.current(), "info");
        let now = c.set(false, "access=debug").unwrap();
        assert!(
            now.contains("access=debug") && now.contains("info"),
            "{now}"
        );
        assert_eq!(c.set(true, "").unwrap(), "info");
        assert_eq!(c.set(true, "warn").unwrap(), "warn");
    }

    #[test]
    fn a_bad_rust_log_or_buffer_size_falls_back_to_the_default_and_says_why() {
        let (t, complaint) = start_filter(Some("access=debug,info"));
        assert!(complaint.is_none());
        assert!(t.to_string().contains("access=debug"), "{t}");
        assert_eq!(start_filter(None).0.to_string(), "info");
        assert!(start_filter(Some("  ")).1.is_none());
        let (t, complaint) = start_filter(Some("loud"));
        assert_eq!(t.to_string(), "info");
        assert!(complaint.unwrap().to_string().contains("\"loud\""));

        assert_eq!(buffer_lines(None), Ok(DEFAULT_BUFFER_LINES));
        assert_eq!(buffer_lines(Some("64")), Ok(64));
        for bad in ["0", "-1", "lots", ""] {
            assert_eq!(buffer_lines(Some(bad)), Err(bad.to_string()));
        }
    }

    #[test]
    fn a_bad_level_is_refused_and_changes_nothing() {
        let c = LogControl::detached("info").unwrap();
        for bad in ["loud", "access", "=debug", "access=loud", "info,,debug"] {
            let e = c.set(false, bad).unwrap_err();
            assert!(e.to_string().contains("invalid level"), "{bad}: {e}");
            assert_eq!(c.current(), "info", "{bad}");
        }
    }

    /// A `MakeWriter` that collects lines in memory.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// The lines `f` logs in `format`.
    fn logged(format: Format, f: impl FnOnce()) -> Vec<String> {
        let buf = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(layer(format, buf.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines().map(str::to_string).collect()
    }

    fn access_line() {
        let addr: std::net::SocketAddr = "10.0.0.1:41000".parse().unwrap();
        tracing::event!(
            target: "access",
            tracing::Level::INFO,
            src.addr = %addr,
            src.workload = "sleep-7d9f",
            src.identity = Some("spiffe://cluster.local/ns/default/sa/sleep"),
            dst.service = None::<&str>,
            direction = "outbound",
            bytes_sent = 6u64,
            duration = "3ms".to_string(),
            "connection complete"
        );
    }

    fn is_rfc3339_micros(t: &str) -> bool {
        t.len() == 27
            && t.ends_with('Z')
            && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .is_ok()
    }

    #[test]
    fn text_lines_are_time_level_scope_message_then_key_values_as_ztunnel_prints_them() {
        let lines = logged(Format::Text, || {
            access_line();
            tracing::warn!(error = "a \"quoted\" word", "upstream failed");
            tracing::info!("no fields");
            let span = tracing::info_span!("conn", id = 7);
            let _in = span.enter();
            tracing::debug!(n = 1, "inside");
        });
        assert_eq!(lines.len(), 4, "{lines:#?}");
        let cols: Vec<&str> = lines[0].split('\t').collect();
        assert!(is_rfc3339_micros(cols[0]), "{:?}", cols[0]);
        assert_eq!(
            cols[1..],
            [
                "info",
                "access",
                "connection complete",
                "src.addr=10.0.0.1:41000 src.workload=\"sleep-7d9f\" \
                 src.identity=\"spiffe://cluster.local/ns/default/sa/sleep\" direction=\"outbound\" \
                 bytes_sent=6 duration=\"3ms\""
            ]
        );
        // Level lower case, the crate prefix left off the scope, strings quoted and escaped.
        let rest = |l: &str| l.split_once('\t').unwrap().1.to_string();
        assert_eq!(
            rest(&lines[1]),
            "warn\tlogging::tests\tupstream failed\terror=\"a \\\"quoted\\\" word\""
        );
        // The message ends with a tab even when no field follows, as in ztunnel.
        assert_eq!(rest(&lines[2]), "info\tlogging::tests\tno fields\t");
        // Spans follow the scope with their fields.
        assert_eq!(
            rest(&lines[3]),
            "debug\tlogging::tests:conn{id=7}\tinside\tn=1"
        );
    }

    #[test]
    fn json_lines_are_flat_objects_with_ztunnels_keys() {
        let lines = logged(Format::Json, || {
            access_line();
            let span = tracing::info_span!("conn", id = 7);
            let _in = span.enter();
            tracing::warn!(error = "a \"quoted\"\nword", ok = true, "inside");
        });
        assert_eq!(lines.len(), 2, "{lines:#?}");
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let obj = v.as_object().unwrap();
        assert!(is_rfc3339_micros(obj["time"].as_str().unwrap()), "{v}");
        let want = serde_json::json!({
            "level": "info",
            "time": obj["time"],
            "scope": "access",
            "message": "connection complete",
            "src.addr": "10.0.0.1:41000",
            "src.workload": "sleep-7d9f",
            "src.identity": "spiffe://cluster.local/ns/default/sa/sleep",
            "direction": "outbound",
            "bytes_sent": 6,
            "duration": "3ms",
        });
        assert_eq!(v, want);
        // Keys in ztunnel's order: level, time, scope, then the fields as logged.
        assert!(
            lines[0].starts_with(r#"{"level":"info","time":""#),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains(r#"Z","scope":"access","message":"connection complete","src.addr""#),
            "{}",
            lines[0]
        );

        let v: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["scope"], "meshnode::logging::tests");
        assert_eq!(v["error"], "a \"quoted\"\nword");
        assert_eq!(v["ok"], true);
        assert_eq!(v["conn"], serde_json::json!({"id": 7}));
    }
}
