//! Plugin logging: leveled lines on stderr, never on stdout (stdout carries only the CNI result or error).
//!
//! Input: the level from `plugin_log_level` (istio-cni's key; default `warn`, as Istio's) and the container
//! being handled. Output: one `meshnode-cni <level> [<container>] <message>` line per event on stderr, which
//! the runtime forwards to its journal.

use std::fmt;
use std::io::Write;

/// How much to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// Only failures.
    Error,
    /// Failures and degraded operation (the default).
    Warn,
    /// Decisions worth seeing in the journal.
    Info,
    /// Every decision.
    Debug,
}

impl Level {
    /// istio-cni's default (`LOG_LEVEL` = warn).
    pub(crate) const DEFAULT: Level = Level::Warn;

    /// Parses a level name; Istio also uses `none` and `fatal`, which map to `Error`.
    pub(crate) fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_lowercase().as_str() {
            "none" | "fatal" | "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" | "trace" => Level::Debug,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// Writes leveled lines to stderr.
#[derive(Debug, Clone)]
pub(crate) struct Logger {
    level: Level,
    container: String,
}

impl Logger {
    /// A logger at `level` for `container` (may be empty: GC, STATUS, VERSION).
    pub(crate) fn new(level: Level, container: &str) -> Logger {
        Logger {
            level,
            container: container.to_string(),
        }
    }

    /// Logs at `level` if enabled. Write failures are ignored: a closed stderr must not fail the command.
    pub(crate) fn log(&self, level: Level, args: fmt::Arguments<'_>) {
        if level <= self.level {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "meshnode-cni {} [{}] {args}",
                level.name(),
                self.container
            );
        }
    }

    /// Logs at error level.
    pub(crate) fn error(&self, args: fmt::Arguments<'_>) {
        self.log(Level::Error, args);
    }

    /// Logs at warn level.
    pub(crate) fn warn(&self, args: fmt::Arguments<'_>) {
        self.log(Level::Warn, args);
    }

    /// Logs at debug level.
    pub(crate) fn debug(&self, args: fmt::Arguments<'_>) {
        self.log(Level::Debug, args);
    }
}
