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
