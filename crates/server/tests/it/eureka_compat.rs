//! Real, unmodified Eureka clients against an agent on a real socket: py_eureka_client
//! (PyPI) and eureka-js-client (npm), versions pinned by `tests/setup.sh` and
//! `tests/compat/npm-eureka/package-lock.json`. Each script drives a whole flow through the
//! client's own calls (register, heartbeat, discovery of an application registered through
//! the native API, delta fetches following changes, OUT_OF_SERVICE and back, a lapsed
//! heartbeat hiding an instance, deregistration on stop) and exits 0 when it behaves as
//! against Eureka.
//!
//! Where a client is missing the test fails and says to run `tests/setup.sh`: a test that
//! did not run never reads as a pass.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::config;

/// Longest a script may run; each takes well under a minute.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);

fn compat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat")
}

fn missing(what: &str) -> ! {
    panic!("{what}: run `bash tests/setup.sh` to install what the tests drive, then test again")
}

/// Runs `program args.. HOST:PORT` against a fresh agent and asserts it exits 0, showing
/// everything it printed when it does not.
async fn run_script(program: &str, args: &[&str], dir: &Path) {
    crate::support::run_client_script(config(), program, args, &[], dir, SCRIPT_DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_eureka_client_registers_discovers_and_follows_deltas() {
    let probe = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m; import py_eureka_client; print(m.version('py-eureka-client'))",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => {
            eprintln!(
                "py-eureka-client {}",
                String::from_utf8_lossy(&o.stdout).trim()
            );
        }
        Ok(o) => missing(&format!(
            "py-eureka-client is not usable: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => missing(&format!("python3 is not runnable: {e}")),
    }
    run_script("python3", &["py_eureka_check.py"], &compat_dir()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eureka_js_client_registers_discovers_and_follows_deltas() {
    let dir = compat_dir().join("npm-eureka");
    if !dir
        .join("node_modules/eureka-js-client/package.json")
        .is_file()
    {
        missing("eureka-js-client is not installed in tests/compat/npm-eureka");
    }
    run_script("node", &["check.mjs"], &dir).await;
}
