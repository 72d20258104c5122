//! Shared pieces of the fuzz targets: the CNI plugin's parsers (the plugin is a binary crate, so its modules
//! are compiled here from their own files, unchanged) and the process set-up every target runs first.
//! The meshnode library's entry points live in `meshnode::fuzzing`.
#![allow(dead_code, unreachable_pub)]

#[path = "../../cni-plugin/src/agent.rs"]
mod agent;
#[path = "../../cni-plugin/src/config.rs"]
mod config;
#[path = "../../cni-plugin/src/env.rs"]
mod env;
#[path = "../../cni-plugin/src/error.rs"]
mod error;
#[path = "../../cni-plugin/src/log.rs"]
mod log;
#[path = "../../cni-plugin/src/result.rs"]
mod result;

use std::path::PathBuf;

/// Once per process: writes to a socket whose peer is gone must fail with EPIPE, not kill the fuzzer
/// (libFuzzer's `main` does not ignore SIGPIPE the way a Rust `main` does).
pub fn init() {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

const VERSIONS: [result::Version; 5] = [
    result::Version::V0_3_0,
    result::Version::V0_3_1,
    result::Version::V0_4_0,
    result::Version::V1_0_0,
    result::Version::V1_1_0,
];

/// The plugin's stdin: the network configuration, then its `prevResult` decoded, converted to every
/// supported version (decoded again: a result the plugin prints must stay readable), and turned into the
/// event body sent to the agent.
pub fn cni_stdin(data: &[u8]) {
    let _ = config::peek_version(data);
    let Ok(conf) = config::NetConf::parse(data) else {
        return;
    };
    let Some(prev) = &conf.prev_result else {
        return;
    };
    let Ok(parsed) = result::CniResult::parse(prev) else {
        return;
    };
    for version in VERSIONS {
        let out = parsed.to_json(version);
        if let Err(e) = result::CniResult::parse(&out) {
            panic!("the plugin's own {version:?} result does not decode: {e}\n{out}");
        }
    }
    let env = env::CniEnv {
        container_id: "c".into(),
        netns: Some(PathBuf::from("/var/run/netns/x")),
        ifname: "eth0".into(),
        pod: env::PodArgs::default(),
    };
    let _ = agent::event_body(&env, &parsed.ips).to_string();
}

/// The plugin's environment: lines `NAME=value` (the last one for a name wins), read through the same
/// lookup function the plugin gives `std::env::var`; `CNI_COMMAND`, then what that command needs,
/// including `CNI_ARGS`; then the event body built from it.
pub fn cni_env(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let get = |var: &str| -> Option<String> {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| *k == var)
            .map(|(_, v)| v.to_string())
            .last()
    };
    if let Some(args) = get("CNI_ARGS") {
        let _ = env::parse_cni_args(&args);
    }
    let Ok(command) = env::command(&get) else {
        return;
    };
    if let Ok(env) = env::CniEnv::parse(command, &get) {
        let _ = agent::event_body(&env, &[]).to_string();
    }
}

/// The agent's HTTP answer as the plugin reads it off the socket, and the enrollment it says.
pub fn cni_agent_answer(data: &[u8]) {
    if let Ok(answer) = agent::parse_answer(data) {
        let _ = answer.enrollment();
    }
}

/// The plugin's reading of the agent's hint file (`agent::read_hint`: size bound, JSON, version, lists,
/// `validUntil`) for one pod. Input: the pod's namespace on the first line, the current time (Unix seconds,
/// decimal; anything else is 0) on the second, the file's bytes after that. The file is really written
/// and read back from a scratch run directory, as the plugin reads it.
///
/// Besides never panicking, the verdict must fail closed: a pod may pass through only when the file is
/// a version-2 hint that excludes its namespace, or lists it as one no selector reaches (and not as
/// ambient) while `validUntil` has not passed. That is checked against an independent reading of the
/// file with `serde_json::Value`.
pub fn plugin_hint(data: &[u8]) {
    use std::sync::OnceLock;
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| meshnode::fuzzing::scratch_dir("hint"));
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let namespace = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let now: u64 = std::str::from_utf8(lines.next().unwrap_or_default())
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let file = lines.next().unwrap_or_default();
    std::fs::write(dir.join(agent::HINT_FILE), file).expect("writing the hint file");
    let verdict = agent::read_hint(dir, &namespace, now);
    if verdict != agent::Hint::PassThrough {
        return;
    }
    // Passing through is allowed only where the file itself says so. Read as lossy UTF-8: serde skips
    // the fields it does not know without checking their strings' UTF-8 (harmless: the fields the
    // verdict rests on are checked), where `Value` would refuse the whole file.
    let text = String::from_utf8_lossy(file);
    let hint: serde_json::Value =
        serde_json::from_str(&text).expect("a hint that let a pod through is JSON");
    let listed = |key: &str| {
        hint[key]
            .as_array()
            .is_some_and(|l| l.iter().any(|n| n.as_str() == Some(namespace.as_str())))
    };
    assert_eq!(
        hint["version"].as_u64(),
        Some(2),
        "passed on a hint of another version"
    );
    let excluded = listed("excludedNamespaces");
    let current = hint["validUntil"]
        .as_u64()
        .is_some_and(|until| now <= until);
    let unreachable = listed("passThroughNamespaces") && !listed("ambientNamespaces") && current;
    assert!(
        excluded || unreachable,
        "namespace {namespace:?} passed through at {now}: {hint}"
    );
}
