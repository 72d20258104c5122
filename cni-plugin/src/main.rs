//! `meshnode-cni`: the chained CNI plugin (spec 1.1) that enrolls pods into meshnode.
//!
//! Input: `CNI_COMMAND` and friends in the environment and the network configuration on stdin, as a
//! container runtime passes them. Output: a result, a version object or a CNI error on stdout (exit 1 on
//! error); logs on stderr only. The plugin changes no networking: for a pod that may be enrolled it POSTs the
//! event to the meshnode CNI agent over a unix socket and passes `prevResult` through.
//!
//! # Layout
//!
//! - [`commands`] — what each CNI command does.
//! - [`env`] — `CNI_*` variables and `CNI_ARGS`.
//! - [`config`] — the configuration on stdin.
//! - [`result`] — prevResult parsing and version conversion.
//! - [`agent`] — HTTP over the agent's unix socket, the event body, the hint file.
//! - [`error`] — CNI error codes and objects.
//! - [`log`] — leveled stderr logging.

mod agent;
mod commands;
mod config;
mod env;
mod error;
mod log;
mod result;

use std::io::Write;

fn main() {
    let get = |name: &str| std::env::var(name).ok();
    let outcome = commands::run(&get, &mut std::io::stdin().lock());
    if let Some(out) = outcome.stdout {
        let mut stdout = std::io::stdout().lock();
        // If stdout is gone, the runtime cannot read anything anyway; the exit status still tells.
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    std::process::exit(outcome.exit_code);
}
