//! Reloading the routes file (what SIGHUP does): a valid file swaps the routes, an invalid
//! one is refused with file, line and reason while the old routes keep serving.

use serde_json::json;

use crate::support::{Gw, TestAgent, Upstream};

const FIRST: &str = "[[route]]\nname = \"old\"\npath = \"/old\"\nservice = \"web\"\n";

const SECOND: &str =
    "[[route]]\nname = \"new\"\npath = \"/new\"\nservice = \"web\"\nprepend = \"/v2\"\n";

/// Line 9 misspells `service`.
const BROKEN: &str = "[[route]]\nname = \"new\"\npath = \"/new\"\nservice = \"web\"\n\n\
                      [[route]]\nname = \"broken\"\npath = \"/broken\"\nservce = \"web\"\n";

#[tokio::test]
async fn reload_swaps_in_a_valid_routes_file_and_refuses_an_invalid_one_keeping_the_routes() {
    let agent = TestAgent::start().await;
    let up = Upstream::start("web-1").await;
    agent.register("web", "web-1", up.port(), json!({})).await;
    let gw = Gw::start(&agent, Some(FIRST)).await;
    gw.routed("/old", &[]).await;
    let file = gw.routes_path();

    std::fs::write(&file, SECOND).expect("write routes");
    gw.gateway.reload().expect("a valid file is taken");
    let a = gw.get("/new/x").await;
    assert_eq!(
        (a.status, a.id(), a.path()),
        (200, "web-1", "/v2/new/x"),
        "{a:?}"
    );
    let a = gw.get("/old").await;
    assert_eq!(
        (a.status, a.code()),
        (404, "no_route"),
        "the old route is gone"
    );

    std::fs::write(&file, BROKEN).expect("write routes");
    let err = gw.gateway.reload().expect_err("an invalid file is refused");
    let at = format!("{}:9: ", file.display());
    assert!(err.starts_with(&at), "{err}");
    assert!(err.contains("unknown field `servce`"), "{err}");
    assert!(
        err.ends_with("(the previous routes stay in force)"),
        "{err}"
    );
    let a = gw.get("/new/x").await;
    assert_eq!((a.status, a.path()), (200, "/v2/new/x"), "{a:?}");
    assert_eq!(gw.get("/broken").await.status, 404);

    std::fs::remove_file(&file).expect("remove routes");
    let err = gw.gateway.reload().expect_err("a missing file is refused");
    assert!(
        err.starts_with(&format!("{}: cannot read it: ", file.display())),
        "{err}"
    );
    assert_eq!(gw.get("/new").await.status, 200);
}
