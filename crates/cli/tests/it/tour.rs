//! The README's five-minute tour, run as a script, top to bottom, against its own agent on
//! free ports: every `#>` line the README shows must appear in what the command before it
//! prints. A command with such lines is retried until they appear or a deadline passes, which
//! is the wait a reader at the keyboard does without noticing.

use std::path::Path;

use crate::support::{BIN, PATIENCE, Proc, code, free_port};

/// One command of the tour, and the parts of its output the README shows.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The tour's shell blocks as steps, continuation lines joined.
fn tour() -> Vec<Step> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## A five-minute tour\n")
        .nth(1)
        .expect("a tour section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = line.trim() == "```sh";
            continue;
        }
        if !in_block || line.trim().is_empty() {
            continue;
        }
        if let Some(shown) = line.strip_prefix("#> ") {
            steps
                .last_mut()
                .expect("a #> line follows a command")
                .expected
                .push(shown.to_string());
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(line);
        steps.push(Step {
            command: std::mem::take(&mut pending),
            expected: Vec::new(),
        });
    }
    steps
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The tour as a bash script: the test's own ports and binary instead of the README's
/// `cargo build` and port exports; each command with shown output through `expect`.
fn script(steps: &[Step], bin_dir: &Path, port: u16) -> String {
    let mut out = format!(
        r#"set -u
export PATH={bin}:$PATH
export MUSTER_HTTP_ADDR=127.0.0.1:{port} MUSTER_DNS_ADDR=127.0.0.1:0
expect() {{
    local cmd=$1 out ok e
    shift
    local deadline=$((SECONDS + {patience}))
    while :; do
        out=$(eval "$cmd" 2>&1)
        ok=1
        for e in "$@"; do [[ $out == *"$e"* ]] || ok=0; done
        if ((ok)); then printf '%s\n' "$out"; return 0; fi
        if ((SECONDS >= deadline)); then
            printf 'TOUR FAILED: %s\nexpected to see: %s\nit printed:\n%s\n' "$cmd" "$*" "$out"
            exit 1
        fi
        sleep 0.2
    done
}}
"#,
        bin = bin_dir.display(),
        patience = PATIENCE.as_secs(),
    );
    for step in steps {
        let c = &step.command;
        if c.starts_with("cargo build") || c.starts_with("export MUSTER_") {
            continue;
        }
        out.push_str(&format!("echo {}\n", quote(&format!("$ {c}"))));
        if step.expected.is_empty() {
            out.push_str(c);
            out.push('\n');
        } else {
            out.push_str("expect ");
            out.push_str(&quote(c));
            for e in &step.expected {
                out.push(' ');
                out.push_str(&quote(e));
            }
            out.push('\n');
        }
    }
    out.push_str("echo TOUR DONE\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_gives_the_outputs_it_shows() {
    let steps = tour();
    let shown: usize = steps.iter().map(|s| s.expected.len()).sum();
    assert!(
        steps.len() >= 20 && shown >= 15,
        "the tour parsed into {} commands and {shown} shown outputs",
        steps.len()
    );
    let bin_dir = Path::new(BIN).parent().expect("the binary's directory");
    let text = script(&steps, bin_dir, free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c").arg(text).current_dir(dir.path());
    // Its own process group: whatever the tour leaves running is killed with it.
    let mut proc = Proc::spawn(cmd, true);
    let status = proc.wait_exit(PATIENCE * 8).await;
    let out = proc.stdout.clone();
    crate::support::wait_until("the tour's output to close", PATIENCE, || {
        let done = out.closed();
        async move { done }
    })
    .await;
    let printed = proc.stdout.text();
    assert!(
        code(status) == 0 && printed.contains("TOUR DONE"),
        "the tour failed ({status}):\n{printed}\nstderr:\n{}",
        proc.stderr.text()
    );
}
