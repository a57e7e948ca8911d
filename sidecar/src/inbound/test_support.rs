//! What the inbound layers' unit tests share: a service entry under a policy, and requests as
//! the identity layer leaves them.

use std::sync::Arc;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_dataplane::config::ServiceEntry;
use fedmesh_dataplane::http::{Body, full};
use fedmesh_dataplane::sni::MeshSni;
use http::Request;

use super::identity::InboundCtx;
use crate::outbound::test_support::table_with_policy;

/// `shop/web` of cluster east (port 80, two endpoints here) under `policy`.
pub(crate) fn web_entry(policy: pb::TrafficPolicy) -> Arc<ServiceEntry> {
    table_with_policy(policy)
        .service_named("shop/web")
        .unwrap()
        .clone()
}

/// `GET /` to `entry` on port 80 from `caller`, identified.
pub(crate) fn request_from(entry: &Arc<ServiceEntry>, caller: &str) -> Request<Body> {
    let mut req = Request::get("/").body(full("")).unwrap();
    req.extensions_mut().insert(InboundCtx {
        caller: Some(caller.parse().unwrap()),
        mesh: MeshSni::new(80, entry.key.clone(), "east".parse().unwrap()),
        app: "127.0.0.1:1001".parse().unwrap(),
        entry: Some(entry.clone()),
        tunnel_h1: false,
    });
    req
}
