//! The dashboard at `/ui/`: how its files are served, and the pages themselves in Debian's
//! headless Chromium (playwright-core) and headless Firefox ESR (puppeteer-core over WebDriver
//! BiDi), driven by the scripts in `tests/ui` against agents on real sockets, in cluster mode
//! against real etcd. `tests/setup.sh` installs the browsers and their drivers; where one is
//! missing the test fails and says to run it.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use serde_json::json;
use tokio::time::Instant;

use muster_cluster::testing::{EtcdCluster, Proxy};

use crate::cluster::{cluster_config, eventually, start};
use crate::support::{config, serve};

/// Debian's Chromium, where the scripts look for it.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's Firefox ESR, where firefox.mjs looks for it.
const FIREFOX: &str = "/usr/bin/firefox-esr";
/// Longest a browser script may run; the longest takes about 15 s.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);
/// One browser at a time: two sharing the machine's two cores with everything else make the
/// scripts' one-second checks of live updates race each other rather than the page.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// The KV value limit of the agent the browser drives: the script checks that a larger value
/// is refused and the page says why.
const KV_LIMIT: usize = 512;

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/ui")
}

/// Fails the test: what it needs is not installed.
fn missing(what: &str) -> ! {
    panic!("{what}: run `bash tests/setup.sh` to install what the tests drive, then test again")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
        .to_str()
        .unwrap()
}

/// Fails the test unless the browser at `executable` and the npm `driver` that drives it are
/// installed.
fn needs_browser(executable: &str, driver: &str) {
    if !Path::new(executable).is_file() {
        missing(&format!("the browser {executable} is not installed"));
    }
    if !ui_dir()
        .join("node_modules")
        .join(driver)
        .join("package.json")
        .is_file()
    {
        missing(&format!("{driver} is not installed in tests/ui"));
    }
}

/// Runs `node script args..` in tests/ui and asserts it exits 0, showing everything it
/// printed when it does not.
async fn run_script(script: &str, args: &[&str]) {
    let _alone = ONE_BROWSER.lock().await;
    let child = tokio::process::Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(ui_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| missing(&format!("cannot start node: {e}")));
    let out = tokio::time::timeout(SCRIPT_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} still running after {SCRIPT_DEADLINE:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
}

#[tokio::test]
async fn dashboard_files_are_served_with_their_types_and_revalidated() {
    let (addr, shutdown) = serve(config()).await;
    let http = client();
    let base = format!("http://{addr}");

    let r = http.get(format!("{base}/ui")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(header(r.headers(), "location"), "/ui/");

    for (path, kind) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let h = r.headers().clone();
        assert_eq!(header(&h, "content-type"), kind, "{path}");
        assert_eq!(header(&h, "cache-control"), "no-cache", "{path}");
        assert_eq!(header(&h, "x-content-type-options"), "nosniff", "{path}");
        assert!(header(&h, "content-security-policy").contains("connect-src 'self'"));
        let etag = header(&h, "etag").to_string();
        assert!(etag.starts_with('"') && etag.len() > 10, "{path}: {etag}");
        assert!(!r.bytes().await.unwrap().is_empty(), "{path} is empty");

        // The browser revalidates: the same file is a 304 without a body.
        let again = http
            .get(format!("{base}{path}"))
            .header(header::IF_NONE_MATCH, &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(header(again.headers(), "etag"), etag);
        assert!(again.bytes().await.unwrap().is_empty());
        let stale = http
            .get(format!("{base}{path}"))
            .header(header::IF_NONE_MATCH, "\"0000000000000000\"")
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), StatusCode::OK, "{path} with an old ETag");
    }

    // Routing is by fragment: a path that is not a file is a 404, not the page.
    for path in ["/ui/services", "/ui/app.js.map", "/ui/index.htm"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let r = http.post(format!("{base}/ui/app.js")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    shutdown.cancel();
}

/// An agent in self-preservation: its only renewer lapsed, and with `min_renewers` at 1 that
/// is too few renewed in time.
async fn preserving_agent() -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let mut c = config();
    c.self_preservation.enabled = true;
    c.self_preservation.min_renewers = 1;
    let (addr, shutdown) = serve(c).await;
    let http = client();
    let r = http
        .put(format!(
            "http://{addr}/api/v1/services/batch/instances/batch-1"
        ))
        .json(&json!({"address": "10.0.9.1", "port": 8000, "ttl": "1s"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s: serde_json::Value = http
            .get(format!("http://{addr}/api/v1/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["self_preservation"]["active"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "self-preservation never engaged: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (addr, shutdown)
}

/// The whole dashboard in a real browser: listing, live updates, filters, the service page
/// with checks, maintenance, key/value, agents, the lost-stream indicator, the token, and no
/// errors logged by any page. Screenshots go to `MUSTER_UI_SCREENSHOTS` when set (the
/// README's are made with `MUSTER_UI_SCREENSHOTS=docs/screenshots`), else to a temporary
/// directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_works_in_chromium() {
    needs_browser(CHROMIUM, "playwright-core");
    let mut c = config();
    c.node = "ui-node".into();
    c.limits.max_kv_value_bytes = KV_LIMIT;
    let (addr, shutdown) = serve(c).await;
    let (preserving, preserving_shutdown) = preserving_agent().await;

    let temp = tempfile::tempdir().unwrap();
    let shots = match std::env::var_os("MUSTER_UI_SCREENSHOTS") {
        Some(d) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(d),
        None => temp.path().to_path_buf(),
    };
    std::fs::create_dir_all(&shots).unwrap();

    run_script(
        "dashboard.mjs",
        &[
            &addr.to_string(),
            &preserving.to_string(),
            &shots.to_string_lossy(),
        ],
    )
    .await;
    shutdown.cancel();
    preserving_shutdown.cancel();
    for page in ["services", "service", "kv", "agents"] {
        for size in ["desktop", "phone"] {
            let shot = shots.join(format!("{page}-{size}.png"));
            let bytes = std::fs::read(&shot)
                .unwrap_or_else(|e| panic!("no screenshot {}: {e}", shot.display()));
            assert!(
                bytes.starts_with(b"\x89PNG"),
                "{} is not a PNG",
                shot.display()
            );
        }
    }
}

/// The dashboard in Firefox too: every page shows its content, a registration shows within a
/// second, a filter narrows the list, a key edit reaches the agent, every page fits a phone's
/// width, and no page logs an error or a warning. Chromium's test goes deeper; this one is
/// there for what differs between the engines (streams, forms, layout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_works_in_firefox() {
    needs_browser(FIREFOX, "puppeteer-core");
    let mut c = config();
    c.node = "ui-firefox".into();
    let (addr, shutdown) = serve(c).await;
    run_script("firefox.mjs", &[&addr.to_string()]).await;
    shutdown.cancel();
}

/// Cluster mode: the agents page lists every agent and the etcd connection, and an agent cut
/// off from etcd is flagged on every page while it goes on showing its last copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_dashboard_lists_every_agent_and_flags_one_cut_off_from_etcd() {
    needs_browser(CHROMIUM, "playwright-core");
    let etcd = EtcdCluster::start(1).await.unwrap();
    let ttl = Duration::from_secs(4);
    // c reaches etcd only through a proxy the test controls.
    let proxy = Proxy::start(etcd.client_addr(0)).unwrap();
    let c = start(
        cluster_config("c", vec![format!("http://{}", proxy.addr())], ttl),
        None,
    )
    .await;
    let _a = start(cluster_config("a", etcd.endpoints(), ttl), None).await;
    let status = || async {
        c.get("/api/v1/status")
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    eventually(Duration::from_secs(5), "c sees both agents", || async {
        status().await["cluster"]["members"]
            .as_array()
            .is_some_and(|m| m.len() == 2)
    })
    .await;
    run_script("cluster.mjs", &[&c.addr.to_string(), "joined", "a,c"]).await;

    proxy.blackhole().unwrap();
    eventually(
        Duration::from_secs(6),
        "c notices it is cut off",
        || async { status().await["cluster"]["known_leader"] == false },
    )
    .await;
    run_script("cluster.mjs", &[&c.addr.to_string(), "cut", "a,c"]).await;
}
