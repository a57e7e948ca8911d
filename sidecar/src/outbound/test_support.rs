//! What the outbound layers' unit tests share: a compiled table with one service and two local
//! endpoints, and requests already routed through it.

use std::sync::Arc;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_dataplane::config::{RoutingTable, Scope, compile};
use fedmesh_dataplane::http::{Body, full};
use fedmesh_dataplane::policy::Selected;
use http::{Request, Response};

use super::ctx::{BoxFuture, RouteCtx};
use crate::dest::Dest;

/// A table of cluster east with `shop/web` (port 80, endpoints 127.0.0.1:1001 and :1002 in zone
/// a) under `policy`, and `shop/web-v2` (port 80, endpoint 127.0.0.1:2001).
pub(crate) fn table_with_policy(policy: pb::TrafficPolicy) -> Arc<RoutingTable> {
    let endpoint = |port: u32| pb::Endpoint {
        address: "127.0.0.1".into(),
        zone: "a".into(),
        ready: true,
        ports: vec![pb::NamedPort {
            name: "http".into(),
            port,
        }],
        ..Default::default()
    };
    let web = pb::Service {
        key: "shop/web".into(),
        ports: vec![pb::Port {
            name: "http".into(),
            protocol: "TCP".into(),
            port: 80,
            app_protocol: String::new(),
        }],
        exported: true,
        in_clusterset: true,
        endpoints: vec![endpoint(1001), endpoint(1002)],
        policy: Some(policy),
        ..Default::default()
    };
    let v2 = pb::Service {
        key: "shop/web-v2".into(),
        endpoints: vec![endpoint(2001)],
        policy: None,
        ..web.clone()
    };
    let cluster = pb::LocalCluster {
        name: "east".into(),
        trust_domain: "east.example".into(),
        region: "us-east".into(),
        peers: vec![],
        zone: String::new(),
    };
    Arc::new(
        compile(
            1,
            1,
            &cluster,
            &[
                ("shop/web".to_string(), web),
                ("shop/web-v2".to_string(), v2),
            ]
            .into(),
        )
        .unwrap(),
    )
}

pub(crate) fn dest(key: &str) -> Dest {
    Dest {
        service: key.parse().unwrap(),
        port: 80,
        scope: Scope::ClusterSet,
    }
}

/// `GET /x?y=1` to `key`, routed as the route layer would.
pub(crate) fn routed_request(table: &Arc<RoutingTable>, key: &str) -> Request<Body> {
    let mut req = Request::get("/x?y=1").body(full("")).unwrap();
    let entry = table.service_named(key).unwrap().clone();
    let route = match entry
        .policy
        .select(80, None, req.method(), req.uri(), req.headers())
    {
        Selected::Route(i, _) => Some(i),
        _ => None,
    };
    req.extensions_mut().insert(dest(key));
    req.extensions_mut().insert(Arc::new(RouteCtx {
        table: table.clone(),
        entry,
        dest: dest(key),
        route,
        backend: None,
        local_only: false,
    }));
    req
}

/// A 200 with an empty body.
pub(crate) fn ok<E: Send + 'static>() -> BoxFuture<Result<Response<Body>, E>> {
    Box::pin(std::future::ready(Ok(Response::new(full("")))))
}
