//! The CNI environment: which command the runtime asks for, and for which container.
//!
//! Input: a lookup of environment variables (the process environment in `main`, a map in tests).
//! Output: [`CniEnv`], validated the way libcni's skel validates it: the variables each command requires are
//! present and non-empty, `CNI_CONTAINERID` and `CNI_IFNAME` have the allowed shape, and `CNI_ARGS` is parsed
//! into the Kubernetes pod keys containerd and CRI-O set ([`PodArgs`]); other keys are ignored.

use std::path::PathBuf;

use crate::error::Error;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// The operation the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Attach a container.
    Add,
    /// Detach a container (best effort, idempotent).
    Del,
    /// Verify an attachment.
    Check,
    /// Remove resources of attachments the runtime no longer knows.
    Gc,
    /// Can the plugin serve ADD?
    Status,
    /// Which versions does the plugin speak?
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

/// The pod keys of `CNI_ARGS` (a runtime convention, not part of the spec).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PodArgs {
    /// `K8S_POD_NAME`.
    pub(crate) name: Option<String>,
    /// `K8S_POD_NAMESPACE`.
    pub(crate) namespace: Option<String>,
    /// `K8S_POD_UID`.
    pub(crate) uid: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID` (the sandbox id).
    pub(crate) infra_container_id: Option<String>,
}

/// The validated environment of one invocation.
#[derive(Debug, Clone)]
pub(crate) struct CniEnv {
    /// `CNI_CONTAINERID` (empty for GC and STATUS).
    pub(crate) container_id: String,
    /// `CNI_NETNS`, when set.
    pub(crate) netns: Option<PathBuf>,
    /// `CNI_IFNAME` (empty for GC and STATUS).
    pub(crate) ifname: String,
    /// The pod keys of `CNI_ARGS`.
    pub(crate) pod: PodArgs,
}

/// Reads `CNI_COMMAND` alone (VERSION needs nothing else).
pub(crate) fn command(get: &dyn Fn(&str) -> Option<String>) -> Result<Command, Error> {
    let value = non_empty(get, "CNI_COMMAND").ok_or(Error::MissingEnv { var: "CNI_COMMAND" })?;
    Command::parse(&value).ok_or(Error::InvalidEnv {
        var: "CNI_COMMAND",
        value,
        reason: "not one of ADD, DEL, CHECK, GC, STATUS, VERSION",
    })
}

impl CniEnv {
    /// Reads and validates what `command` needs. Empty variables count as unset, as in libcni.
    pub(crate) fn parse(
        command: Command,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CniEnv, Error> {
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = non_empty(get, "CNI_CONTAINERID").unwrap_or_default();
        if per_container && container_id.is_empty() {
            return Err(Error::MissingEnv {
                var: "CNI_CONTAINERID",
            });
        }
        if !container_id.is_empty() {
            validate_container_id(&container_id)?;
        }
        let netns = non_empty(get, "CNI_NETNS").map(PathBuf::from);
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            return Err(Error::MissingEnv { var: "CNI_NETNS" });
        }
        let ifname = non_empty(get, "CNI_IFNAME").unwrap_or_default();
        if per_container {
            if ifname.is_empty() {
                return Err(Error::MissingEnv { var: "CNI_IFNAME" });
            }
            validate_ifname(&ifname)?;
        }
        let pod = match non_empty(get, "CNI_ARGS") {
            Some(args) => parse_cni_args(&args)?,
            None => PodArgs::default(),
        };
        Ok(CniEnv {
            container_id,
            netns,
            ifname,
            pod,
        })
    }
}

fn non_empty(get: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<String> {
    get(var).filter(|v| !v.is_empty())
}

/// `CNI_CONTAINERID`: an alphanumeric first character, then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), Error> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(Error::InvalidEnv {
            var: "CNI_CONTAINERID",
            value: id.to_string(),
            reason:
                "must start with a letter or digit and contain only letters, digits, '_', '.', '-'",
        })
    }
}

/// `CNI_IFNAME`: what Linux accepts as an interface name (libcni's `ValidateInterfaceName`).
fn validate_ifname(name: &str) -> Result<(), Error> {
    let reason = if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not interface names")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidEnv {
            var: "CNI_IFNAME",
            value: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`), keeping the pod keys and ignoring the others. An entry without `=` is
/// invalid (libcni refuses it too); empty entries (a trailing `;`) are skipped.
pub(crate) fn parse_cni_args(args: &str) -> Result<PodArgs, Error> {
    let mut pod = PodArgs::default();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(Error::InvalidEnv {
                var: "CNI_ARGS",
                value: args.to_string(),
                reason: "every entry must be KEY=VALUE, separated by ';'",
            });
        };
        let slot = match key {
            "K8S_POD_NAME" => &mut pod.name,
            "K8S_POD_NAMESPACE" => &mut pod.namespace,
            "K8S_POD_UID" => &mut pod.uid,
            "K8S_POD_INFRA_CONTAINER_ID" => &mut pod.infra_container_id,
            _ => continue,
        };
        *slot = Some(value.to_string()).filter(|v| !v.is_empty());
    }
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_yield_the_pod_keys_and_ignore_the_rest() {
        let pod = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1234-5678;",
        )
        .expect("valid CNI_ARGS");
        assert_eq!(pod.name.as_deref(), Some("web-0"));
        assert_eq!(pod.namespace.as_deref(), Some("default"));
        assert_eq!(pod.uid.as_deref(), Some("1234-5678"));
        assert_eq!(pod.infra_container_id.as_deref(), Some("abc123"));
    }

    #[test]
    fn cni_args_values_may_contain_equals_signs() {
        let pod = parse_cni_args("K8S_POD_NAME=a=b").expect("valid");
        assert_eq!(pod.name.as_deref(), Some("a=b"));
    }

    #[test]
    fn cni_args_entry_without_equals_is_refused_naming_the_variable() {
        let err = parse_cni_args("K8S_POD_NAME=x;garbage").expect_err("invalid");
        assert_eq!(err.code(), crate::error::CODE_INVALID_ENV);
        assert!(err.msg().contains("CNI_ARGS"), "{}", err.msg());
    }

    #[test]
    fn empty_cni_args_values_count_as_absent() {
        let pod = parse_cni_args("K8S_POD_NAME=;K8S_POD_NAMESPACE=ns").expect("valid");
        assert_eq!(pod.name, None);
        assert_eq!(pod.namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn container_ids_follow_the_spec_shape() {
        assert!(validate_container_id("abc-1.2_3").is_ok());
        assert!(validate_container_id("-abc").is_err());
        assert!(validate_container_id("a/b").is_err());
        assert!(validate_container_id("ä").is_err());
    }

    #[test]
    fn add_without_netns_names_cni_netns() {
        let get = |k: &str| match k {
            "CNI_CONTAINERID" => Some("c1".to_string()),
            "CNI_IFNAME" => Some("eth0".to_string()),
            _ => None,
        };
        let err = CniEnv::parse(Command::Add, &get).expect_err("netns is required");
        assert!(err.msg().contains("CNI_NETNS"), "{}", err.msg());
        // DEL does not need it.
        assert!(CniEnv::parse(Command::Del, &get).is_ok());
    }
}
