//! `/v1/coordinate/...`: network coordinates, as Consul gives a node that has measured
//! nothing yet.
//!
//! Consul estimates round-trip times between its agents with Vivaldi coordinates learned
//! from gossip. muster does not gossip, so the agent's node keeps the coordinate a fresh
//! Consul node starts with, which `?near=` sorting and `consul rtt` read as "no
//! information". External nodes have no coordinates, as in Consul (they run no agent).

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::body::{self, Obj};
use super::render::Node;
use super::{ConsulError, Query, empty};
use crate::AppState;

/// The dimensions of a Vivaldi coordinate's `Vec` (Consul's default, `coordinate.DefaultConfig`).
const DIMENSIONS: usize = 8;

/// The coordinate of a node that has measured nothing: the origin, with Consul's initial
/// error, adjustment and height (`coordinate.NewCoordinate`).
pub fn initial() -> Value {
    json!({"Vec": vec![0.0; DIMENSIONS], "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05})
}

fn entry(node: &str) -> Value {
    json!({"Node": node, "Segment": "", "Coord": initial()})
}

/// `GET /v1/coordinate/datacenters`: the WAN coordinates of each datacenter's servers.
pub async fn datacenters(State(state): State<AppState>) -> Response {
    let node = Node::of(&state);
    let body = json!([{
        "Datacenter": node.datacenter,
        "AreaID": "wan",
        "Coordinates": [{"Node": format!("{}.{}", node.name, node.datacenter), "Coord": initial()}],
    }]);
    super::json(1, &body)
}

/// `GET /v1/coordinate/nodes`: the LAN coordinates of the datacenter's nodes.
pub async fn nodes(
    State(state): State<AppState>,
    caller: crate::acl::Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    let node = Node::of(&state);
    let readable = caller.allows(
        crate::acl::Resource::Node,
        &node.name,
        crate::acl::Access::Read,
    );
    let list = if readable {
        json!([entry(&node.name)])
    } else {
        json!([])
    };
    Ok(crate::http::auth::mark_filtered(
        &caller,
        !readable,
        super::json(state.snapshot().index, &list),
    ))
}

/// `GET /v1/coordinate/node/:node`: that node's coordinates; 404 with an empty body (as
/// Consul answers) for a node that has none.
pub async fn node(
    State(state): State<AppState>,
    caller: crate::acl::Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    let node = Node::of(&state);
    let index = state.snapshot().index;
    if !node.is(&name)
        || !caller.allows(
            crate::acl::Resource::Node,
            &node.name,
            crate::acl::Access::Read,
        )
    {
        return Ok((StatusCode::NOT_FOUND, super::meta_headers(index)).into_response());
    }
    Ok(super::json(index, &json!([entry(&node.name)])))
}

/// `PUT /v1/coordinate/update`: a coordinate some agent measured. Checked as Consul checks
/// it and accepted; the agent's own answers keep the initial coordinate (see the module).
pub async fn update(bytes: Bytes) -> Result<Response, ConsulError> {
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    o.str(&["Node"])?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConsulError::bad_request("Missing node name"))?;
    o.str(&["Segment"])?;
    let coord = o
        .obj(&["Coord"])?
        .ok_or_else(|| ConsulError::bad_request("Missing coordinate (Coord)"))?;
    let vec = match coord.get(&["Vec"]) {
        Some(Value::Array(items)) => items.iter().map(Value::as_f64).collect::<Option<Vec<_>>>(),
        _ => None,
    }
    .ok_or_else(|| {
        ConsulError::bad_request("invalid coordinate: Vec must be an array of numbers")
    })?;
    if vec.len() != DIMENSIONS {
        return Err(ConsulError::bad_request(format!(
            "coordinate dimensionality does not match: {} dimensions, this agent uses {DIMENSIONS}",
            vec.len()
        )));
    }
    for name in ["Error", "Adjustment", "Height"] {
        match coord.get(&[name]) {
            None => {}
            Some(v) if v.as_f64().is_some() => {}
            Some(_) => {
                return Err(ConsulError::bad_request(format!(
                    "invalid coordinate: {name} must be a number"
                )));
            }
        }
    }
    Ok(empty())
}
