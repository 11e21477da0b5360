//! `/metrics` of a fresh agent: every metric the README documents is there from the start,
//! with its `# HELP` line, so alerts have something to watch before the first event.

use crate::support::Agent;

/// Metrics whose labels come from open sets (routes, DNS question types, check kinds): their
/// series appear with the first sample, which a fresh agent has not seen.
const APPEAR_WITH_FIRST_SAMPLE: &[&str] = &[
    "muster_dns_queries_total",
    "muster_checks_run_total",
    "muster_check_duration_seconds",
];

/// The metric names the README's Metrics section lists.
fn documented() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let mut names: Vec<String> = section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|code| {
            let name = code.split('{').next()?;
            name.starts_with("muster_").then(|| name.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_there_from_the_start_with_help() {
    let agent = Agent::dev().await;
    let text = agent.metrics().await;
    let names = documented();
    assert!(names.len() >= 25, "the README lists only {names:?}");
    let mut missing = Vec::new();
    for name in &names {
        if !text.contains(&format!("# HELP {name} ")) {
            if APPEAR_WITH_FIRST_SAMPLE.contains(&name.as_str()) {
                continue;
            }
            missing.push(format!("{name} (no HELP)"));
        }
        let sampled = text.lines().any(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{name} "))
                    || l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name}_count")))
        });
        if !sampled && !APPEAR_WITH_FIRST_SAMPLE.contains(&name.as_str()) {
            missing.push(format!("{name} (no series)"));
        }
    }
    assert!(missing.is_empty(), "missing at start: {missing:?}\n{text}");
    // The store's failures are watchable before the first one.
    assert!(
        text.contains("muster_store_commit_failures_total 0"),
        "{text}"
    );
    assert!(
        text.contains("muster_deregistrations_total{reason=\"evicted\"} 0"),
        "{text}"
    );
}
