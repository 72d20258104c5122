//! CNI errors: what went wrong, and the CNI error object the runtime receives for it.
//!
//! Input: failures found by the other modules (environment, config, prevResult, agent).
//! Output: [`Error`], which `main` prints on **stdout** as `{"cniVersion","code","msg","details"}` before
//! exiting 1 (libcni parses errors from stdout; stderr only carries logs). Codes follow the CNI spec's
//! table, plus libcni's code 8 (`ErrInvalidNetNS`) for a `CNI_NETNS` path that does not exist.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::agent::TransportError;

/// CNI error code 1: incompatible CNI version.
pub(crate) const CODE_INCOMPATIBLE_VERSION: u32 = 1;
/// CNI error code 4: invalid environment variables (the message names them).
pub(crate) const CODE_INVALID_ENV: u32 = 4;
/// CNI error code 5: I/O failure.
pub(crate) const CODE_IO: u32 = 5;
/// CNI error code 6: failed to decode content.
pub(crate) const CODE_DECODE: u32 = 6;
/// CNI error code 7: invalid network config.
pub(crate) const CODE_INVALID_CONFIG: u32 = 7;
/// libcni's `ErrInvalidNetNS` (8): the netns path is not usable.
pub(crate) const CODE_INVALID_NETNS: u32 = 8;
/// CNI error code 11: try again later (the runtime retries the sandbox).
pub(crate) const CODE_TRY_AGAIN: u32 = 11;

/// Why the plugin refuses a command.
#[derive(Debug)]
pub(crate) enum Error {
    /// A variable the command needs is unset or empty.
    MissingEnv {
        /// The variable, e.g. `CNI_NETNS`.
        var: &'static str,
    },
    /// A variable holds a value the spec does not allow.
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `CNI_NETNS` names a path that does not exist or cannot be inspected.
    NetnsNotFound {
        /// The path given.
        path: PathBuf,
        /// What `stat` said.
        source: io::Error,
    },
    /// Stdin could not be read.
    ReadStdin {
        /// The read error.
        source: io::Error,
    },
    /// Stdin (or a part of it) is not the JSON it must be.
    Decode {
        /// What was being decoded: "network configuration", "prevResult", ….
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// A key the configuration must have is missing.
    MissingConfigKey {
        /// The key.
        key: &'static str,
    },
    /// A configuration key holds the wrong type of value.
    InvalidConfigKey {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A `cniVersion` (of the config or of prevResult) this plugin does not speak.
    UnsupportedVersion {
        /// Where it came from: "network configuration" or "prevResult".
        what: &'static str,
        /// The version asked for.
        version: String,
    },
    /// CHECK with a config version older than 0.4.0, which has no CHECK (as libcni's skel refuses it).
    CheckNotAllowed {
        /// The config version.
        version: &'static str,
    },
    /// The agent answered, but not with 200.
    AgentRejected {
        /// The request path, e.g. `/cmdadd`.
        request: &'static str,
        /// The HTTP status.
        status: u16,
        /// The answer body (the agent's message).
        body: String,
    },
    /// The agent could not be reached and the pod may need the mesh, so the plugin fails closed.
    AgentUnreachable {
        /// The agent's socket.
        socket: PathBuf,
        /// Namespace and name of the pod.
        pod: String,
        /// Why the pod may need the mesh (hint file lists its namespace, or the hint file is unusable).
        why_needed: String,
        /// The transport failure.
        cause: TransportError,
    },
}

impl Error {
    /// The CNI error code.
    pub(crate) fn code(&self) -> u32 {
        match self {
            Error::MissingEnv { .. } | Error::InvalidEnv { .. } => CODE_INVALID_ENV,
            Error::NetnsNotFound { .. } => CODE_INVALID_NETNS,
            Error::ReadStdin { .. } => CODE_IO,
            Error::Decode { .. } => CODE_DECODE,
            Error::MissingConfigKey { .. } | Error::InvalidConfigKey { .. } => CODE_INVALID_CONFIG,
            Error::UnsupportedVersion { .. } | Error::CheckNotAllowed { .. } => {
                CODE_INCOMPATIBLE_VERSION
            }
            Error::AgentRejected { .. } | Error::AgentUnreachable { .. } => CODE_TRY_AGAIN,
        }
    }

    /// The short message (`msg`).
    pub(crate) fn msg(&self) -> String {
        match self {
            Error::MissingEnv { var } => format!("required environment variable {var} is missing"),
            Error::InvalidEnv { var, reason, .. } => format!("invalid {var}: {reason}"),
            Error::NetnsNotFound { path, .. } => {
                format!("CNI_NETNS {} does not exist", path.display())
            }
            Error::ReadStdin { .. } => "cannot read the network configuration from stdin".into(),
            Error::Decode { what, .. } => format!("failed to decode the {what}"),
            Error::MissingConfigKey { key } => {
                format!("invalid network configuration: missing {key:?}")
            }
            Error::InvalidConfigKey { key, .. } => {
                format!("invalid network configuration: bad {key:?}")
            }
            Error::UnsupportedVersion { what, version } => {
                format!("incompatible CNI version {version:?} in the {what}")
            }
            Error::CheckNotAllowed { .. } => "config version does not allow CHECK".into(),
            Error::AgentRejected { .. } => "meshnode CNI agent could not enroll the pod".into(),
            Error::AgentUnreachable { .. } => "meshnode CNI agent is unreachable".into(),
        }
    }

    /// The longer explanation (`details`).
    pub(crate) fn details(&self) -> String {
        match self {
            Error::MissingEnv { var } => format!("{var} must be set for this CNI_COMMAND"),
            Error::InvalidEnv { var, value, .. } => format!("{var}={value:?}"),
            Error::NetnsNotFound { path, source } => {
                format!("CNI_NETNS={}: {source}", path.display())
            }
            Error::ReadStdin { source } => source.to_string(),
            Error::Decode { reason, .. } => reason.clone(),
            Error::MissingConfigKey { key } => format!("the configuration on stdin has no {key:?}"),
            Error::InvalidConfigKey { reason, .. } => reason.clone(),
            Error::UnsupportedVersion { version, .. } => format!(
                "cniVersion {version:?} is not one of {:?}",
                crate::result::SUPPORTED_VERSIONS
            ),
            Error::CheckNotAllowed { version } => {
                format!("CHECK needs cniVersion 0.4.0 or later, the configuration has {version}")
            }
            Error::AgentRejected { body, .. } => body.clone(),
            Error::AgentUnreachable {
                socket,
                pod,
                why_needed,
                cause,
            } => format!(
                "pod {pod} may need the mesh ({why_needed}) and the meshnode CNI agent at {} is \
                 unreachable ({cause}); failing closed so the pod does not start without traffic capture",
                socket.display()
            ),
        }
    }

    /// The CNI error object, in the requested version.
    pub(crate) fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.msg(),
            "details": self.details(),
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Error::AgentRejected {
            request, status, ..
        } = self
        {
            write!(f, "{request} answered {status}: ")?;
        }
        write!(f, "{}: {}", self.msg(), self.details())
    }
}

impl std::error::Error for Error {}
