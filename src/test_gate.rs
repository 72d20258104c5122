//! Whether a test that needs something of the machine (root, a CNI plugin binary, cgroup v2) can run here.
//!
//! Input: the test's name, what it needs, and `MESHNODE_TEST_STRICT` from the environment (`.ci/run` sets
//! it). Output: `true` (run it), or `false` after printing `SKIPPED <test>: <why>`. In strict mode a missing
//! requirement fails the test instead, so a CI machine that lost root or a package cannot turn the suite
//! green by skipping. Every test that can skip goes through here (unit tests, `tests/`, benches).

/// Set (to anything but `0`) to turn every skip into a failure.
pub const STRICT_VAR: &str = "MESHNODE_TEST_STRICT";

/// Whether skipping is forbidden in this run.
pub fn strict() -> bool {
    std::env::var_os(STRICT_VAR).is_some_and(|v| !v.is_empty() && v != "0")
}

/// `true` when `available`; else the test is skipped (or, in strict mode, fails) because of `why`.
pub fn needs(test: &str, available: bool, why: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        !strict(),
        "{test}: {why}, and {STRICT_VAR} forbids skipping (CI runs every test)"
    );
    println!("SKIPPED {test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// `true` when `available`; else prints `SKIPPED <test>: <why>` and returns `false`, also in strict mode.
///
/// Only for artifacts a run is *given* rather than a machine requirement: a reference binary built by hand
/// (`ZTUNNEL_BIN` for the interop test) is not something `.ci/run` can install, so its absence is reported,
/// not failed.
pub fn optional(test: &str, available: bool, why: &str) -> bool {
    if !available {
        println!("SKIPPED {test}: {why}");
        eprintln!("SKIPPED {test}: {why}");
    }
    available
}

/// `true` when running as root (network namespaces, nftables, netlink writes need it).
pub fn needs_root(test: &str) -> bool {
    needs(
        test,
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces); run the tests as root to include it",
    )
}

/// Returns from the calling test (printing SKIPPED) unless running as root; fails it under strict mode.
#[doc(hidden)]
#[macro_export]
macro_rules! needs_root {
    ($name:expr) => {
        if !$crate::test_gate::needs_root($name) {
            return;
        }
    };
}

/// Runs the ignored unit test `name` of the module `module` (its `module_path!()`) alone, in a new process
/// of this test binary, and fails unless it passed there: for tests that change the process's fd limit,
/// count its fds or need most of them, which tests running in parallel would disturb. A skip in there is
/// printed here too.
#[cfg(test)]
pub(crate) fn run_alone(module: &str, name: &str) {
    let module = module.split_once("::").expect("crate::module").1;
    let test = format!("{module}::{name}");
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            test.as_str(),
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in its own process:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in stdout.lines().filter(|l| l.starts_with("SKIPPED")) {
        println!("{line}");
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_available_requirement_runs_the_test_and_a_missing_one_skips_it() {
        // This process's environment decides strictness; both branches are checked without it.
        if strict() {
            assert!(needs("t", true, "x"));
            let r = std::panic::catch_unwind(|| needs("t", false, "missing thing"));
            let msg = r.unwrap_err();
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(
                msg.contains("missing thing") && msg.contains(STRICT_VAR),
                "{msg}"
            );
        } else {
            assert!(needs("t", true, "x"));
            assert!(!needs("t", false, "missing thing"));
        }
    }
}
