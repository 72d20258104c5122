//! `meshnode-cni`: the chained CNI plugin that enrolls pods into meshnode (CNI spec 1.1).
//!
//! Input: the CNI command in `CNI_COMMAND` and the network configuration on stdin, as a container runtime
//! passes them. Output: a result or a CNI error object on stdout; logs go to stderr only.
//!
//! This first version answers `VERSION` and refuses every other command with a CNI error, so a runtime
//! that calls it gets a clear answer rather than silence; pod enrollment arrives with the capture work.

use std::io::Read;

/// CNI versions this plugin speaks.
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// CNI error code 4: invalid or unsupported command/configuration.
const ERR_INVALID_CONFIG: u32 = 4;
/// CNI error code 1: incompatible CNI version.
const ERR_INCOMPATIBLE_VERSION: u32 = 1;

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let requested = serde_json::from_str::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| "1.1.0".to_string());
    let code = match command.as_str() {
        "VERSION" => {
            let out = serde_json::json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS });
            println!("{out}");
            0
        }
        _ if !SUPPORTED_VERSIONS.contains(&requested.as_str()) => error(
            &requested,
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            &format!("cniVersion {requested} is not one of {SUPPORTED_VERSIONS:?}"),
        ),
        other => error(
            &requested,
            ERR_INVALID_CONFIG,
            "command not supported yet",
            &format!("meshnode-cni does not handle CNI_COMMAND={other:?} yet (only VERSION)"),
        ),
    };
    std::process::exit(code);
}

fn error(version: &str, code: u32, msg: &str, details: &str) -> i32 {
    eprintln!("meshnode-cni: {msg}: {details}");
    let out =
        serde_json::json!({ "cniVersion": version, "code": code, "msg": msg, "details": details });
    println!("{out}");
    1
}
