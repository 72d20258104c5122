//! The process's log output and its level, changeable while running (the admin port's `/logging`).
//!
//! Input: `RUST_LOG` (tracing `Targets` directives: `info`, `meshnode::proxy=debug,access=warn`; invalid →
//! a warning and `info`), `LOG_FORMAT` (`json` or plain). Output: one global subscriber, installed by
//! [`init`], and a [`LogControl`] that reads and replaces its filter. The filter is a reload layer in
//! front of the formatter, so a change applies to the next event on every thread, with no restart.

use std::str::FromStr;
use std::sync::Arc;

use parking_lot::Mutex;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, Registry};

/// The level used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_LEVEL: &str = "info";

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

/// Keeps the log writer alive; dropping it flushes what is buffered. Hold it until the process exits.
#[must_use = "dropping the guard stops log output"]
pub struct LogGuard(());

/// Installs the global subscriber (once per process): filter from `RUST_LOG`, format from `LOG_FORMAT`.
pub fn init() -> (LogControl, LogGuard) {
    let (default, complaint) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => match validate(&v).and_then(|()| parse(&v)) {
            Ok(t) => (t, None),
            Err(e) => (parse(DEFAULT_LEVEL).expect("static level"), Some(e)),
        },
        _ => (parse(DEFAULT_LEVEL).expect("static level"), None),
    };
    let (filter, handle) = reload::Layer::new(default.clone());
    let json = std::env::var("LOG_FORMAT").as_deref() == Ok("json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    if let Some(e) = complaint {
        tracing::warn!(error = %e, "RUST_LOG ignored; logging at {DEFAULT_LEVEL}");
    }
    (
        LogControl {
            inner: Arc::new(Inner::Live { handle, default }),
        },
        LogGuard(()),
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
    fn a_bad_level_is_refused_and_changes_nothing() {
        let c = LogControl::detached("info").unwrap();
        for bad in ["loud", "access", "=debug", "access=loud", "info,,debug"] {
            let e = c.set(false, bad).unwrap_err();
            assert!(e.to_string().contains("invalid level"), "{bad}: {e}");
            assert_eq!(c.current(), "info", "{bad}");
        }
    }
}
