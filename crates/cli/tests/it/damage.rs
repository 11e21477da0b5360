//! A damaged or incomplete data directory: the agent refuses to start with one line that
//! names the file and what to do, keeps the evidence, and `--recover` starts from what is
//! readable. Each case is made the way it happens: by `kill -9`, then damage to the files.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use serde_json::json;

use crate::support::{Agent, PATIENCE, Proc, Storage, code, muster_command};

/// Registers `n` instances, kills the agent with SIGKILL (so the write-ahead log still holds
/// them) and returns the log segment they are in.
async fn crashed_with_registrations(dir: &Path, n: u32) -> PathBuf {
    let mut agent = Agent::durable(dir).await;
    for i in 0..n {
        let body = json!({"address": "10.0.0.1", "port": 1000 + i, "ttl": "10m"});
        agent.register("web", &format!("web-{i}"), body).await;
    }
    agent.proc.kill9();
    let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name()?.to_str()?.to_string();
            let number = name.strip_prefix("muster.wal.")?.parse().ok()?;
            let bytes = std::fs::read(&path).ok()?;
            bytes.iter().any(|b| *b != 0).then_some((number, path))
        })
        .collect();
    segments.sort();
    segments.pop().expect("a log segment with commits").1
}

/// Starts the agent on `dir` with `extra` flags and waits for it to exit; its status and
/// stderr.
async fn failed_start(dir: &Path, extra: &[&str]) -> (ExitStatus, String) {
    let mut cmd = muster_command(&[
        "agent",
        "--http-addr",
        "127.0.0.1:0",
        "--dns-addr",
        "127.0.0.1:0",
        "--log",
        "warn",
    ]);
    cmd.arg("--data-dir").arg(dir).args(extra);
    let mut proc = Proc::spawn(cmd, false);
    let status = proc.wait_exit(PATIENCE).await;
    let stderr = proc.stderr.clone();
    crate::support::wait_until("the agent's stderr to close", PATIENCE, || {
        let done = stderr.closed();
        async move { done }
    })
    .await;
    (status, proc.stderr.text())
}

/// The one error line an agent that refused to start printed, after checking that it said
/// nothing else of note (no panic, no backtrace).
fn refusal(status: ExitStatus, stderr: &str) -> String {
    assert_eq!(code(status), 1, "the agent must exit 1; stderr:\n{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "a refusal is not a panic:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    errors[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_middle_of_the_log_refuses_to_start_until_recover_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let segment = crashed_with_registrations(dir.path(), 30).await;
    // Four bytes flipped in the middle of what the log holds.
    let mut bytes = std::fs::read(&segment).unwrap();
    let used = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
    let middle = used / 2;
    for b in &mut bytes[middle..middle + 4] {
        *b ^= 0xff;
    }
    std::fs::write(&segment, &bytes).unwrap();

    let (status, stderr) = failed_start(dir.path(), &[]).await;
    let line = refusal(status, &stderr);
    assert!(line.contains(&segment.display().to_string()), "{line}");
    assert!(line.contains("damaged at byte"), "{line}");
    assert!(line.contains("--recover"), "{line}");
    // Nothing was deleted: the damaged segment is still there, unchanged.
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);

    // An operator who accepts the loss of the damaged commit gets every other one back.
    let mut agent = Agent::start_with(Storage::Dir(dir.path()), &["--recover"], |c| c).await;
    let ids = agent.instance_ids("web", Some("any")).await;
    assert!(
        (28..30).contains(&ids.len()),
        "{} of 30 registrations recovered: {ids:?}",
        ids.len()
    );
    let mut kept = segment.clone().into_os_string();
    kept.push(".damaged");
    assert!(Path::new(&kept).exists(), "the damaged segment is kept");
    agent.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_refuses_to_start_rather_than_start_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::durable(dir.path()).await;
    agent
        .register("web", "web-1", json!({"address": "10.0.0.1", "port": 80}))
        .await;
    agent.terminate().await;
    std::fs::remove_file(dir.path().join("muster.redb")).unwrap();

    let (status, stderr) = failed_start(dir.path(), &[]).await;
    let line = refusal(status, &stderr);
    assert!(line.contains("muster.redb is missing"), "{line}");
    assert!(line.contains("restore muster.redb from a backup"), "{line}");
    assert!(
        !dir.path().join("muster.redb").exists(),
        "nothing was recreated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_after_a_crash_refuses_to_start_from_the_log_alone() {
    let dir = tempfile::tempdir().unwrap();
    crashed_with_registrations(dir.path(), 5).await;
    std::fs::remove_file(dir.path().join("muster.redb")).unwrap();
    let (status, stderr) = failed_start(dir.path(), &[]).await;
    let line = refusal(status, &stderr);
    assert!(line.contains("muster.redb is missing"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::durable(dir.path()).await;
    for i in 0..40 {
        let body = json!({"address": "10.0.0.1", "port": 1000 + i});
        agent.register("web", &format!("web-{i}"), body).await;
    }
    agent.terminate().await;
    let db = dir.path().join("muster.redb");
    let mut bytes = std::fs::read(&db).unwrap();
    // Garbage over every page but the file header: whatever redb reads first is damaged.
    for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
        *b ^= (i % 251) as u8 | 1;
    }
    std::fs::write(&db, &bytes).unwrap();

    let (status, stderr) = failed_start(dir.path(), &[]).await;
    let line = refusal(status, &stderr);
    assert!(line.contains(&db.display().to_string()), "{line}");
    assert!(line.contains("restore it from a backup"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Agent::durable(dir.path()).await;
    let (status, stderr) = failed_start(dir.path(), &[]).await;
    let line = refusal(status, &stderr);
    assert!(line.contains("in use by another muster agent"), "{line}");
    first.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_data_directory_says_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the directory should be.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let (status, stderr) = failed_start(&file, &[]).await;
    let line = refusal(status, &stderr);
    assert!(line.contains(&file.display().to_string()), "{line}");
    assert!(!line.contains("another agent"), "{line}");
}
