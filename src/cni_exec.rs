//! Calling a CNI plugin chain (a conflist) exactly as a container runtime does through libcni.
//!
//! Input: a conflist as JSON, an [`Attachment`] (container id, netns path, interface name, `CNI_ARGS`), and
//! the directories plugin binaries are looked up in ([`Runtime::cni_path`], the runtime's `CNI_PATH`).
//! Output: the final ADD result, or an [`Error`] naming the plugin and carrying its CNI error.
//!
//! Per plugin, stdin is the plugin's object plus the list's `cniVersion` and `name` (+ `prevResult`, + the
//! GC attachment list), with `capabilities` removed; the environment is the inherited one without any
//! `CNI_*` variable, plus `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`.
//! ADD runs the plugins in order, threading each result into the next as `prevResult`; DEL runs them in
//! reverse with the ADD's final result and keeps going past failures. Child processes inherit the calling
//! thread's network namespace: callers that want plugins to see a "node" namespace run this on a thread
//! inside it (`Netns::run_on_thread`). Used by tests, the sandbox and benchmarks.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Map, Value};

/// Most stdout or stderr kept from a plugin: a result is a few KiB; the rest is drained and dropped.
const MAX_OUTPUT: u64 = 1024 * 1024;
/// Spawn attempts after `ETXTBSY` before giving up.
const SPAWN_RETRIES: u32 = 5;

/// Where plugin binaries are found.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    /// Directories searched in order for a plugin's `type` (passed to plugins as `CNI_PATH`).
    pub cni_path: Vec<PathBuf>,
}

/// The container an operation is about.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`: letters, digits, then also `_`, `.`, `-`.
    pub container_id: String,
    /// `CNI_NETNS`: path of the container's network namespace.
    pub netns: PathBuf,
    /// `CNI_IFNAME`: the interface to create in it.
    pub ifname: String,
    /// `CNI_ARGS`, as key/value pairs (e.g. `K8S_POD_NAME`). Add `IgnoreUnknown=1` as containerd and CRI-O
    /// do, or Go plugins refuse keys they do not know.
    pub args: Vec<(String, String)>,
}

/// Why a chain operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The conflist is not one libcni would accept.
    #[error("invalid conflist: {reason}")]
    BadConfig {
        /// What is wrong.
        reason: String,
    },
    /// The attachment has a field libcni would refuse.
    #[error("invalid {field} {value:?}: {reason}")]
    BadAttachment {
        /// `container_id` or `ifname`.
        field: &'static str,
        /// The value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The conflist's version does not have this operation (CHECK before 0.4.0).
    #[error("cniVersion {version} does not support {command}")]
    Unsupported {
        /// The CNI command.
        command: &'static str,
        /// The list's version.
        version: String,
    },
    /// No executable named after the plugin's `type` in any `cni_path` directory.
    #[error("plugin {plugin:?} not found in {searched:?}")]
    PluginNotFound {
        /// The plugin type.
        plugin: String,
        /// The directories searched.
        searched: Vec<PathBuf>,
    },
    /// The plugin could not be started or talked to.
    #[error("running plugin {plugin} ({}): {source}", path.display())]
    Spawn {
        /// The plugin type.
        plugin: String,
        /// The binary.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The plugin failed with a CNI error object.
    #[error("plugin {plugin} failed with CNI error {code}: {msg} ({details})")]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// The CNI error code.
        code: u64,
        /// `msg`.
        msg: String,
        /// `details`.
        details: String,
    },
    /// The plugin failed without a parsable CNI error; `output` is its stdout, or stderr when stdout was empty.
    #[error("plugin {plugin} failed ({status}): {output}")]
    Failed {
        /// The plugin type.
        plugin: String,
        /// How it exited.
        status: ExitStatus,
        /// What it said.
        output: String,
    },
    /// The plugin succeeded but its ADD result is not a JSON object.
    #[error("plugin {plugin} printed an invalid result ({reason}): {output}")]
    BadOutput {
        /// The plugin type.
        plugin: String,
        /// The parse error.
        reason: String,
        /// The output, lossily decoded.
        output: String,
    },
}

/// The parts of a conflist the runtime uses.
struct List<'a> {
    version: String,
    name: &'a str,
    plugins: Vec<&'a Map<String, Value>>,
    disable_check: bool,
    disable_gc: bool,
}

/// What one plugin invocation gets besides its configuration.
struct Call<'a> {
    command: &'static str,
    attachment: Option<&'a Attachment>,
    /// Keys added to the plugin's stdin (`prevResult`, `cni.dev/valid-attachments`).
    inject: Vec<(&'static str, Value)>,
}

impl Runtime {
    /// ADD: runs every plugin in order, each getting the previous one's result as `prevResult`, and returns
    /// the last result.
    pub fn add(&self, conflist: &Value, att: &Attachment) -> Result<Value, Error> {
        self.add_from(conflist, att, None)
    }

    /// ADD for a runtime that wired the interface itself (the sandbox): the first plugin of `conflist`
    /// gets `prev_result` (what that wiring produced) as its `prevResult`, as if an interface plugin had
    /// run before it; the rest as in [`Runtime::add`].
    pub fn add_after(
        &self,
        conflist: &Value,
        att: &Attachment,
        prev_result: Value,
    ) -> Result<Value, Error> {
        self.add_from(conflist, att, Some(prev_result))
    }

    fn add_from(
        &self,
        conflist: &Value,
        att: &Attachment,
        mut prev: Option<Value>,
    ) -> Result<Value, Error> {
        let list = parse_list(conflist)?;
        validate(att)?;
        for plugin in &list.plugins {
            let inject = prev.take().map(|p| ("prevResult", p)).into_iter().collect();
            let call = Call {
                command: "ADD",
                attachment: Some(att),
                inject,
            };
            let out = self.exec(&list, plugin, call)?;
            prev = Some(parse_result(plugin_type(plugin)?, &out)?);
        }
        prev.ok_or_else(|| Error::BadConfig {
            reason: "no plugins".into(),
        })
    }

    /// DEL: runs every plugin in reverse order with the ADD's final result as `prevResult` (if known); keeps
    /// going past failures and returns the first.
    pub fn del(
        &self,
        conflist: &Value,
        att: &Attachment,
        prev_result: Option<&Value>,
    ) -> Result<(), Error> {
        let list = parse_list(conflist)?;
        validate(att)?;
        let mut first_error = None;
        for plugin in list.plugins.iter().rev() {
            let call = Call {
                command: "DEL",
                attachment: Some(att),
                inject: prev_result
                    .map(|p| ("prevResult", p.clone()))
                    .into_iter()
                    .collect(),
            };
            if let Err(e) = self.exec(&list, plugin, call) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// CHECK: runs every plugin in order with the ADD's final result; stops at the first failure. Does
    /// nothing when the list sets `disableCheck`; refused for lists older than 0.4.0.
    pub fn check(
        &self,
        conflist: &Value,
        att: &Attachment,
        prev_result: &Value,
    ) -> Result<(), Error> {
        let list = parse_list(conflist)?;
        validate(att)?;
        if version_lt(&list.version, "0.4.0") {
            return Err(Error::Unsupported {
                command: "CHECK",
                version: list.version,
            });
        }
        if list.disable_check {
            return Ok(());
        }
        for plugin in &list.plugins {
            let call = Call {
                command: "CHECK",
                attachment: Some(att),
                inject: vec![("prevResult", prev_result.clone())],
            };
            self.exec(&list, plugin, call)?;
        }
        Ok(())
    }

    /// GC: gives every plugin the `(container id, ifname)` attachments still valid; keeps going past
    /// failures and returns the first. A no-op before 1.1.0 or with `disableGC`, as in libcni.
    pub fn gc(&self, conflist: &Value, valid: &[(String, String)]) -> Result<(), Error> {
        let list = parse_list(conflist)?;
        if version_lt(&list.version, "1.1.0") || list.disable_gc {
            return Ok(());
        }
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(id, ifname)| serde_json::json!({ "containerID": id, "ifname": ifname }))
            .collect();
        let mut first_error = None;
        for plugin in &list.plugins {
            let call = Call {
                command: "GC",
                attachment: None,
                inject: vec![(
                    "cni.dev/valid-attachments",
                    Value::Array(attachments.clone()),
                )],
            };
            if let Err(e) = self.exec(&list, plugin, call) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// STATUS: asks every plugin whether it can serve ADD; stops at the first failure. A no-op before 1.1.0.
    pub fn status(&self, conflist: &Value) -> Result<(), Error> {
        let list = parse_list(conflist)?;
        if version_lt(&list.version, "1.1.0") {
            return Ok(());
        }
        for plugin in &list.plugins {
            let call = Call {
                command: "STATUS",
                attachment: None,
                inject: Vec::new(),
            };
            self.exec(&list, plugin, call)?;
        }
        Ok(())
    }

    /// Finds a plugin binary.
    fn find(&self, plugin: &str) -> Result<PathBuf, Error> {
        self.cni_path
            .iter()
            .map(|dir| dir.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::PluginNotFound {
                plugin: plugin.to_string(),
                searched: self.cni_path.clone(),
            })
    }

    /// Runs one plugin; returns its stdout on success.
    fn exec(
        &self,
        list: &List<'_>,
        plugin: &Map<String, Value>,
        call: Call<'_>,
    ) -> Result<Vec<u8>, Error> {
        let kind = plugin_type(plugin)?;
        let path = self.find(kind)?;
        let mut conf = plugin.clone();
        conf.remove("capabilities");
        conf.insert("cniVersion".into(), list.version.clone().into());
        conf.insert("name".into(), list.name.into());
        for (key, value) in call.inject {
            conf.insert(key.into(), value);
        }
        let stdin = Value::Object(conf).to_string().into_bytes();

        let att = call.attachment;
        let cni_args = att
            .map(|a| {
                a.args
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(";")
            })
            .unwrap_or_default();
        let cni_path = std::env::join_paths(&self.cni_path).map_err(|e| Error::BadConfig {
            reason: format!("cni_path cannot be joined: {e}"),
        })?;
        let env: Vec<(OsString, OsString)> = vec![
            ("CNI_COMMAND".into(), call.command.into()),
            (
                "CNI_CONTAINERID".into(),
                att.map(|a| a.container_id.clone())
                    .unwrap_or_default()
                    .into(),
            ),
            (
                "CNI_NETNS".into(),
                att.map(|a| a.netns.clone().into_os_string())
                    .unwrap_or_default(),
            ),
            (
                "CNI_IFNAME".into(),
                att.map(|a| a.ifname.clone()).unwrap_or_default().into(),
            ),
            ("CNI_ARGS".into(), cni_args.into()),
            ("CNI_PATH".into(), cni_path),
        ];
        let spawn_err = |source| Error::Spawn {
            plugin: kind.to_string(),
            path: path.clone(),
            source,
        };
        let (status, stdout, stderr) = run_child(&path, env, stdin).map_err(spawn_err)?;
        if status.success() {
            return Ok(stdout);
        }
        Err(plugin_error(kind, status, &stdout, &stderr))
    }
}

/// Turns a failed run into the plugin's CNI error, or its text when it printed none (as libcni does).
fn plugin_error(plugin: &str, status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> Error {
    if let Ok(Value::Object(err)) = serde_json::from_slice::<Value>(stdout) {
        if let Some(code) = err.get("code").and_then(Value::as_u64) {
            let text = |k: &str| {
                err.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            return Error::Plugin {
                plugin: plugin.to_string(),
                code,
                msg: text("msg"),
                details: text("details"),
            };
        }
    }
    let output = if stdout.iter().all(u8::is_ascii_whitespace) {
        stderr
    } else {
        stdout
    };
    Error::Failed {
        plugin: plugin.to_string(),
        status,
        output: String::from_utf8_lossy(output).trim().to_string(),
    }
}

fn parse_result(plugin: &str, stdout: &[u8]) -> Result<Value, Error> {
    let bad = |reason: String| Error::BadOutput {
        plugin: plugin.to_string(),
        reason,
        output: String::from_utf8_lossy(stdout).into_owned(),
    };
    match serde_json::from_slice::<Value>(stdout) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(bad("not a JSON object".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Spawns `path` with the filtered environment, feeds `stdin`, and collects bounded stdout and stderr.
fn run_child(
    path: &Path,
    env: Vec<(OsString, OsString)>,
    stdin: Vec<u8>,
) -> io::Result<(ExitStatus, Vec<u8>, Vec<u8>)> {
    let inherited = std::env::vars_os().filter(|(k, _)| !k.to_string_lossy().starts_with("CNI_"));
    let mut command = Command::new(path);
    command
        .env_clear()
        .envs(inherited)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A binary just written (an install, a test) can be briefly "busy" while another thread's fork still
    // holds its write fd; libcni retries the same way.
    let mut attempt = 0;
    let mut child = loop {
        match command.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempt < SPAWN_RETRIES => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50) * attempt);
            }
            other => break other?,
        }
    };
    let (Some(mut child_in), Some(child_out), Some(child_err)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(io::Error::other("child pipes missing"));
    };
    // Writer and stderr reader on their own threads so no pipe can fill up and stall the plugin.
    let writer = std::thread::spawn(move || {
        // A plugin that exits without reading stdin closes the pipe; that is its business.
        let _ = child_in.write_all(&stdin);
    });
    let err_reader = std::thread::spawn(move || read_bounded(child_err));
    let stdout = read_bounded(child_out);
    let status = child.wait()?;
    let _ = writer.join();
    let stderr = err_reader
        .join()
        .map_err(|_| io::Error::other("stderr reader panicked"))?;
    Ok((status, stdout?, stderr?))
}

/// Reads up to [`MAX_OUTPUT`] bytes and drains the rest.
fn read_bounded(mut r: impl Read) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    (&mut r).take(MAX_OUTPUT).read_to_end(&mut buf)?;
    io::copy(&mut r, &mut io::sink())?;
    Ok(buf)
}

fn plugin_type(plugin: &Map<String, Value>) -> Result<&str, Error> {
    match plugin.get("type").and_then(Value::as_str) {
        Some(t) if !t.is_empty() && !t.contains('/') && t != "." && t != ".." => Ok(t),
        _ => Err(Error::BadConfig {
            reason: format!(
                "plugin without a valid \"type\": {}",
                Value::Object(plugin.clone())
            ),
        }),
    }
}

fn parse_list(conflist: &Value) -> Result<List<'_>, Error> {
    let bad = |reason: &str| Error::BadConfig {
        reason: reason.to_string(),
    };
    let obj = conflist
        .as_object()
        .ok_or_else(|| bad("not a JSON object"))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("missing \"name\""))?;
    // The highest of cniVersion and cniVersions, as libcni picks it.
    let mut versions: Vec<&str> = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .into_iter()
        .collect();
    if let Some(list) = obj.get("cniVersions").and_then(Value::as_array) {
        versions.extend(list.iter().filter_map(Value::as_str));
    }
    let version = versions
        .into_iter()
        .filter(|v| parse_version(v).is_some())
        .max_by_key(|v| parse_version(v))
        .ok_or_else(|| bad("missing or invalid \"cniVersion\""))?
        .to_string();
    let plugins = obj
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing \"plugins\" list"))?
        .iter()
        .map(|p| {
            p.as_object()
                .ok_or_else(|| bad("a plugin is not an object"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if plugins.is_empty() {
        return Err(bad("empty \"plugins\" list"));
    }
    for p in &plugins {
        plugin_type(p)?;
    }
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(List {
        version,
        name,
        plugins,
        disable_check: flag("disableCheck"),
        disable_gc: flag("disableGC"),
    })
}

fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let out = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(out)
}

fn version_lt(a: &str, b: &str) -> bool {
    parse_version(a) < parse_version(b)
}

/// The checks libcni makes before running anything.
fn validate(att: &Attachment) -> Result<(), Error> {
    let bad = |field, value: &str, reason| Error::BadAttachment {
        field,
        value: value.to_string(),
        reason,
    };
    let id = &att.container_id;
    let mut chars = id.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(bad(
            "container_id",
            id,
            "must start with a letter or digit, then letters, digits, '_', '.', '-'",
        ));
    }
    let ifname = &att.ifname;
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(bad(
            "ifname",
            ifname,
            "must be 1-15 bytes without '/', ':' or whitespace",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
