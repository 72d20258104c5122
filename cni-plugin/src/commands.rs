//! The CNI commands: ADD, DEL, CHECK, GC, STATUS, VERSION for a chained plugin that changes no networking.
//!
//! Input: an environment lookup and stdin. Output: an [`Outcome`]: what to print on stdout (a result, a
//! version object, a CNI error, or nothing) and the exit status. ADD and CHECK ask the agent about the pod
//! and fail with code 11 when it refuses, or when it is unreachable and the pod may need the mesh (fail
//! closed); a pod the mesh does not want is never blocked because meshnode is down. DEL and GC are best
//! effort. prevResult is always passed through on a successful ADD, converted to the requested version.

use std::fmt;
use std::io::Read;

use crate::agent::{self, Agent, Hint};
use crate::config::{self, NetConf};
use crate::env::{self, CniEnv, Command};
use crate::error::Error;
use crate::log::{Level, Logger};
use crate::result::{CniResult, Version, SUPPORTED_VERSIONS};

/// Largest stdin accepted: a conflist entry plus a prevResult is a few KiB.
const MAX_STDIN: u64 = 4 * 1024 * 1024;

/// Name prefixes of the agent's own pods (Istio's and ours) in `pod_namespace`: they are never enrolled,
/// which avoids a deadlock where the agent's pod waits for the agent.
const AGENT_POD_PREFIXES: &[&str] = &["istio-cni-node-", "meshnode-cni-node-"];

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// One JSON document for stdout, if any.
    pub(crate) stdout: Option<String>,
    /// The exit status: 0 on success, 1 with a CNI error on stdout.
    pub(crate) exit_code: i32,
}

/// Runs one invocation.
pub(crate) fn run(get: &dyn Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    let mut input = Vec::new();
    let read = stdin.take(MAX_STDIN + 1).read_to_end(&mut input);
    let requested = config::peek_version(&input);
    let result = match read {
        Err(source) => Err(Error::ReadStdin { source }),
        Ok(_) if input.len() as u64 > MAX_STDIN => Err(Error::Decode {
            what: "network configuration",
            reason: format!("stdin is larger than {MAX_STDIN} bytes"),
        }),
        Ok(_) => execute(get, &input, requested.as_deref()),
    };
    match result {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(e) => {
            let container = get("CNI_CONTAINERID").unwrap_or_default();
            Logger::new(Level::Error, &container).error(format_args!("{e}"));
            // The error is in the requested version when that is one we speak, else in the newest.
            let version = requested
                .as_deref()
                .and_then(Version::parse)
                .unwrap_or(Version::LATEST);
            Outcome {
                stdout: Some(e.to_json(version.as_str()).to_string()),
                exit_code: 1,
            }
        }
    }
}

fn execute(
    get: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    requested: Option<&str>,
) -> Result<Option<String>, Error> {
    let command = env::command(get)?;
    if command == Command::Version {
        let out = serde_json::json!({
            "cniVersion": requested.unwrap_or(Version::LATEST.as_str()),
            "supportedVersions": SUPPORTED_VERSIONS,
        });
        return Ok(Some(out.to_string()));
    }
    let env = CniEnv::parse(command, get)?;
    let conf = NetConf::parse(stdin)?;
    let log = Logger::new(conf.log_level, &env.container_id);
    match command {
        Command::Add => add(&env, &conf, &log).map(Some),
        Command::Check => check(&env, &conf, &log).map(|()| None),
        Command::Del => {
            del(&env, &conf, &log);
            Ok(None)
        }
        Command::Gc => {
            gc(&conf, &log);
            Ok(None)
        }
        // STATUS succeeds whenever the config parses, even with the agent down: a failing STATUS marks the
        // node's whole pod network not ready, which would also block pods that are not enrolled while the
        // agent restarts. Pods that need the agent are failed closed at ADD instead.
        Command::Status => Ok(None),
        Command::Version => Ok(None),
    }
}

/// ADD: decide, ask the agent if the pod may be enrolled, and pass prevResult through.
fn add(env: &CniEnv, conf: &NetConf, log: &Logger) -> Result<String, Error> {
    check_netns(env)?;
    let prev = prev_result(conf)?;
    let out = prev.to_json(conf.version).to_string();
    match pod_to_enroll(env, conf) {
        Err(skip) => log.debug(format_args!("passing through: {skip}")),
        Ok(pod) => ask_agent(env, conf, log, "/cmdadd", &prev, &pod)?,
    }
    Ok(out)
}

/// CHECK: the same decision as ADD; the agent confirms the pod's state.
fn check(env: &CniEnv, conf: &NetConf, log: &Logger) -> Result<(), Error> {
    if conf.version < Version::V0_4_0 {
        return Err(Error::CheckNotAllowed {
            version: conf.version.as_str(),
        });
    }
    check_netns(env)?;
    let prev = prev_result(conf)?;
    match pod_to_enroll(env, conf) {
        Err(skip) => {
            log.debug(format_args!("nothing to check: {skip}"));
            Ok(())
        }
        Ok(pod) => ask_agent(env, conf, log, "/cmdcheck", &prev, &pod),
    }
}

/// DEL: tell the agent, best effort. Never fails: DEL must be idempotent and succeed when things are gone.
fn del(env: &CniEnv, conf: &NetConf, log: &Logger) {
    let prev = prev_result(conf).unwrap_or_else(|e| {
        log.warn(format_args!("ignoring prevResult on DEL: {e}"));
        CniResult::default()
    });
    let pod = match pod_to_enroll(env, conf) {
        Err(skip) => {
            log.debug(format_args!("nothing to tell the agent: {skip}"));
            return;
        }
        Ok(pod) => pod,
    };
    let agent = Agent::new(&conf.run_dir);
    let body = agent::event_body(env, &prev.ips).to_string().into_bytes();
    match agent.post("/cmddel", body) {
        Ok(a) if a.status == 200 => log.debug(format_args!("agent released {pod}")),
        Ok(a) => log.warn(format_args!(
            "agent answered {} to DEL of {pod} (ignored): {}",
            a.status, a.body
        )),
        Err(e) => log.warn(format_args!(
            "agent at {} unreachable on DEL of {pod} (ignored): {e}",
            agent.socket().display()
        )),
    }
}

/// GC: forward the attachments the runtime still knows; best effort.
fn gc(conf: &NetConf, log: &Logger) {
    let Some(valid) = &conf.valid_attachments else {
        // Without the list, sending an empty one would tell the agent that nothing is valid.
        log.warn(format_args!(
            "GC without cni.dev/valid-attachments: nothing sent"
        ));
        return;
    };
    let agent = Agent::new(&conf.run_dir);
    let body = serde_json::json!({ "ValidAttachments": valid })
        .to_string()
        .into_bytes();
    match agent.post("/cmdgc", body) {
        Ok(a) if a.status == 200 => log.debug(format_args!("agent GC done")),
        Ok(a) => log.warn(format_args!(
            "agent answered {} to GC (ignored): {}",
            a.status, a.body
        )),
        Err(e) => log.warn(format_args!(
            "agent at {} unreachable on GC (ignored): {e}",
            agent.socket().display()
        )),
    }
}

/// Asks the agent; on a transport failure, the hint file decides whether to fail closed.
fn ask_agent(
    env: &CniEnv,
    conf: &NetConf,
    log: &Logger,
    request: &'static str,
    prev: &CniResult,
    pod: &Pod,
) -> Result<(), Error> {
    let agent = Agent::new(&conf.run_dir);
    let body = agent::event_body(env, &prev.ips).to_string().into_bytes();
    let cause = match agent.post(request, body) {
        Ok(a) if a.status == 200 => {
            let e = a.enrollment();
            let verdict = if e.enrolled {
                "enrolled"
            } else {
                "not enrolled"
            };
            log.debug(format_args!(
                "{request}: agent says {pod} is {verdict} {}",
                e.reason
            ));
            return Ok(());
        }
        Ok(a) => {
            return Err(Error::AgentRejected {
                request,
                status: a.status,
                body: a.body,
            })
        }
        Err(cause) => cause,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let why_needed = match agent::read_hint(&conf.run_dir, &pod.namespace, now) {
        Hint::PassThrough => {
            log.warn(format_args!(
                "agent at {} unreachable ({cause}); no pod in namespace {} can be enrolled per the hint file, \
                 so {pod} passes through",
                agent.socket().display(),
                pod.namespace
            ));
            return Ok(());
        }
        Hint::MayEnroll { reason } => reason,
    };
    Err(Error::AgentUnreachable {
        socket: agent.socket().to_path_buf(),
        pod: pod.to_string(),
        why_needed,
        cause,
    })
}

/// The pod an event is about.
#[derive(Debug, Clone)]
struct Pod {
    namespace: String,
    name: String,
}

impl fmt::Display for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a pod is none of the agent's business.
#[derive(Debug, Clone)]
enum Skip {
    NotKubernetes,
    Excluded(String),
    AgentPod(Pod),
    AmbientDisabled,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotKubernetes => {
                write!(f, "no K8S_POD_NAME/K8S_POD_NAMESPACE: not a Kubernetes pod")
            }
            Skip::Excluded(ns) => write!(f, "namespace {ns} is in exclude_namespaces"),
            Skip::AgentPod(pod) => write!(f, "{pod} is the CNI agent's own pod"),
            Skip::AmbientDisabled => write!(f, "ambient_enabled is false"),
        }
    }
}

fn pod_to_enroll(env: &CniEnv, conf: &NetConf) -> Result<Pod, Skip> {
    let (Some(name), Some(namespace)) = (&env.pod.name, &env.pod.namespace) else {
        return Err(Skip::NotKubernetes);
    };
    let pod = Pod {
        namespace: namespace.clone(),
        name: name.clone(),
    };
    if conf.exclude_namespaces.iter().any(|n| n == namespace) {
        return Err(Skip::Excluded(pod.namespace));
    }
    if conf.pod_namespace.as_deref() == Some(namespace.as_str())
        && AGENT_POD_PREFIXES.iter().any(|p| name.starts_with(p))
    {
        return Err(Skip::AgentPod(pod));
    }
    if conf.ambient_enabled == Some(false) {
        return Err(Skip::AmbientDisabled);
    }
    Ok(pod)
}

fn prev_result(conf: &NetConf) -> Result<CniResult, Error> {
    match &conf.prev_result {
        Some(prev) => CniResult::parse(prev),
        None => Ok(CniResult::default()),
    }
}

/// ADD and CHECK need the pod's netns to exist (libcni's skel checks the same for ADD).
fn check_netns(env: &CniEnv) -> Result<(), Error> {
    let Some(path) = &env.netns else {
        return Err(Error::MissingEnv { var: "CNI_NETNS" });
    };
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|source| Error::NetnsNotFound {
            path: path.clone(),
            source,
        })
}
