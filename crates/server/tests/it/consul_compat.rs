//! Real, unmodified Consul client libraries against an agent on a real socket: py-consul
//! (PyPI) and the npm `consul` package. The scripts in tests/compat drive a whole flow each
//! (register with checks, TTL pass/fail, passing queries, HTTP checks, blocking queries,
//! catalog and agent reads, `filter` expressions, deregistration; then KV with cas, flags,
//! recurse, keys and a blocking get, sessions and locks, transactions, user events) through
//! the libraries' own calls, and exit 0 when it behaves as against Consul.
//!
//! py-consul also runs over HTTPS with mutual TLS (`py_consul_tls_check.py`).
//!
//! `tests/setup.sh` installs both clients. Where one is missing the test fails and says to
//! run it: a test that did not run never reads as a pass.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::config;

const NODE_NAME: &str = "compat-node";

/// Longest a script may run; each takes a few seconds.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(180);

fn compat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat")
}

/// Fails the test: what it needs is not installed.
fn missing(what: &str) -> ! {
    panic!("{what}: run `bash tests/setup.sh` to install what the tests drive, then test again")
}

/// Runs `program args..` with the agent's address appended, and asserts it exits 0,
/// showing everything it printed when it does not.
async fn run_script(program: &str, args: &[&str], dir: &Path) {
    let mut c = config();
    c.node = NODE_NAME.into();
    // The py-consul flow registers a script check.
    c.enable_script_checks = true;
    crate::support::run_client_script(c, program, args, &[NODE_NAME], dir, SCRIPT_DEADLINE).await;
}

/// The installed py-consul's version, or why it is not usable: python3 missing, the
/// `consul` module missing, or it being the old python-consul (same module name).
fn py_consul() -> Result<String, String> {
    let probe = r#"
import importlib.metadata as m, pathlib, sys
try:
    import consul
except ImportError as e:
    sys.exit(f"cannot import consul: {e}")
try:
    d = m.distribution("py-consul")
except m.PackageNotFoundError:
    sys.exit(f"the consul module at {consul.__file__} is not py-consul (python-consul?)")
owned = {pathlib.Path(d.locate_file(f)).resolve() for f in d.files or []}
if pathlib.Path(consul.__file__).resolve() not in owned:
    sys.exit(f"the consul module at {consul.__file__} is not py-consul's (python-consul?)")
print(d.version)
"#;
    match std::process::Command::new("python3")
        .args(["-c", probe])
        .output()
    {
        Err(e) => Err(format!("python3 is not runnable: {e}")),
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_drives_the_consul_api() {
    let version = match py_consul() {
        Ok(v) => v,
        Err(why) => missing(&format!("py-consul is not usable: {why}")),
    };
    eprintln!("py-consul {version}");
    let dir = compat_dir();
    run_script("python3", &["py_consul_check.py"], &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_works_over_https_with_mutual_tls_and_without_a_certificate_is_refused() {
    use crate::tls::{ca, leaf, serve};
    if let Err(why) = py_consul() {
        missing(&format!("py-consul is not usable: {why}"));
    }
    let ca = ca("compat CA");
    let served = serve(&leaf(&ca, "agent", false), Some(&ca), |c| {
        c.node = NODE_NAME.into();
    })
    .await;
    // The script's files beside the agent's: the CA and a client certificate it signed.
    let client = leaf(&ca, "py-consul", true);
    std::fs::write(served.dir.path().join("client.pem"), &client.cert).unwrap();
    std::fs::write(served.dir.path().join("client.key"), &client.key).unwrap();
    let files = served.dir.path().display().to_string();
    crate::support::run_script_against(
        &format!("127.0.0.1:{}", served.https.port()),
        "python3",
        &["py_consul_tls_check.py"],
        &[&files],
        &compat_dir(),
        SCRIPT_DEADLINE,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_consul_drives_the_consul_api() {
    let dir = compat_dir().join("npm-consul");
    if !dir.join("node_modules/consul/package.json").is_file() {
        missing("the npm consul package is not installed in tests/compat/npm-consul");
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        missing("node is not installed");
    }
    run_script("node", &["check.mjs"], &dir).await;
}
