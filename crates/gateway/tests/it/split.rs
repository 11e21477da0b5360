//! Weighted splits between tagged sides of a service (canaries), and keeping one user on one
//! side by a header or a cookie.

use futures::StreamExt;
use http::Method;
use serde_json::json;

use crate::support::{Gw, TestAgent, Upstream, count_by_id};

/// Two instances tagged v1 and two tagged v2 of `web`.
async fn two_sides(agent: &TestAgent) -> Vec<Upstream> {
    let mut ups = Vec::new();
    for id in ["v1-a", "v1-b", "v2-a", "v2-b"] {
        let up = Upstream::start(id).await;
        let tag = &id[..2];
        agent
            .register("web", id, up.port(), json!({"tags": [tag]}))
            .await;
        ups.push(up);
    }
    ups
}

fn split_route(name: &str, sticky: &str, v1: u32, v2: u32) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\npath = \"/\"\nservice = \"web\"\n{sticky}\n\
         [[route.split]]\ntags = [\"v1\"]\nweight = {v1}\n\
         [[route.split]]\ntags = [\"v2\"]\nweight = {v2}\n"
    )
}

/// The side an answer came from: "v1" or "v2".
fn side(id: &str) -> &str {
    id.get(..2).unwrap_or("")
}

/// Waits until both sides of the split have answered at least once, so that neither is
/// still missing from the table.
async fn both_sides_up(gw: &Gw) {
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + crate::support::WITHIN;
    while seen.len() < 4 {
        // Concurrent requests: one at a time, a side's balancer may keep choosing the
        // instance that looked faster.
        for a in futures::future::join_all((0..8).map(|_| gw.routed("/", &[]))).await {
            seen.insert(a.id().to_string());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {seen:?} answered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_95_5_split_by_tag_lands_within_two_points_of_its_weights_over_10000_requests() {
    let agent = TestAgent::start().await;
    let _ups = two_sides(&agent).await;
    let gw = Gw::start(&agent, Some(&split_route("canary-95-5", "", 95, 5))).await;
    both_sides_up(&gw).await;

    const N: usize = 10_000;
    let answers: Vec<_> = futures::stream::iter(0..N)
        .map(|_| gw.get("/"))
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(answers.iter().all(|a| a.status == 200));
    let counts = count_by_id(&answers);
    let v2: usize = counts
        .iter()
        .filter(|(id, _)| side(id) == "v2")
        .map(|(_, n)| n)
        .sum();
    let share = v2 as f64 * 100.0 / N as f64;
    assert!(
        (3.0..=7.0).contains(&share),
        "{share}% went to the 5% side: {counts:?}"
    );
    // Within a side the balancer spreads: both v1 instances served.
    assert!(counts["v1-a"] > 0 && counts["v1-b"] > 0, "{counts:?}");
}

#[tokio::test]
async fn a_sticky_header_keeps_each_user_on_one_side_and_users_spread_over_both() {
    let agent = TestAgent::start().await;
    let _ups = two_sides(&agent).await;
    let route = split_route("sticky-header", "sticky = { header = \"x-user\" }", 50, 50);
    let gw = Gw::start(&agent, Some(&route)).await;
    both_sides_up(&gw).await;

    let mut users_on = [0usize; 2];
    for user in 0..60 {
        let name = format!("user-{user}");
        let mut sides = std::collections::BTreeSet::new();
        for _ in 0..5 {
            let a = gw.send(Method::GET, "/", &[("x-user", &name)]).await;
            assert_eq!(a.status, 200, "{a:?}");
            sides.insert(side(a.id()).to_string());
        }
        assert_eq!(sides.len(), 1, "{name} was sent to {sides:?}");
        users_on[usize::from(sides.contains("v2"))] += 1;
    }
    assert!(
        users_on.iter().all(|n| *n >= 10),
        "users per side (v1, v2): {users_on:?}"
    );
}

#[tokio::test]
async fn a_sticky_cookie_is_set_on_the_first_answer_and_keeps_the_user_on_its_side() {
    let agent = TestAgent::start().await;
    let _ups = two_sides(&agent).await;
    let route = split_route("sticky-cookie", "sticky = { cookie = \"canary\" }", 50, 50);
    let gw = Gw::start(&agent, Some(&route)).await;
    both_sides_up(&gw).await;

    let mut users_on = [0usize; 2];
    for _ in 0..40 {
        let first = gw.get("/").await;
        assert_eq!(first.status, 200);
        let set = first.header("set-cookie");
        assert!(
            set.starts_with("canary=") && set.contains("Path=/"),
            "Set-Cookie: {set:?}"
        );
        let cookie = set.split(';').next().unwrap_or("").to_string();
        let user_side = side(first.id()).to_string();
        for _ in 0..5 {
            let a = gw
                .send(
                    Method::GET,
                    "/",
                    &[("cookie", &format!("theme=dark; {cookie}"))],
                )
                .await;
            assert_eq!(side(a.id()), user_side, "{cookie} changed sides");
            assert_eq!(
                a.header("set-cookie"),
                "",
                "a user with the cookie keeps it"
            );
        }
        users_on[usize::from(user_side == "v2")] += 1;
    }
    assert!(
        users_on.iter().all(|n| *n >= 5),
        "users per side (v1, v2): {users_on:?}"
    );
}
