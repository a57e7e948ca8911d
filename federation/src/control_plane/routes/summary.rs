//! The routes in force, in words, one entry per rule: what the cluster tells the hub so `fedmesh
//! explain` can name the route and the split a request meets.

use fedmesh_api::pb::dataplane as dp;
use fedmesh_api::pb::federation as pb;

use super::CompiledRoutes;

/// Every rule of every route bound to a service, in the order the data plane tries them.
pub fn summaries(compiled: &CompiledRoutes) -> Vec<pb::RouteSummary> {
    compiled
        .by_parent
        .iter()
        .flat_map(|(parent, routes)| {
            routes.iter().map(move |r| pb::RouteSummary {
                service: parent.to_string(),
                source: r.source.clone(),
                matches: matches(r),
                backends: r.backend_refs.iter().map(backend).collect(),
                consumer_namespace: r.consumer_namespace.clone(),
                invalid: r.invalid.clone(),
            })
        })
        .collect()
}

fn matches(r: &dp::Route) -> String {
    let port = (r.port != 0).then(|| format!("port {}", r.port));
    let each: Vec<String> = r.matches.iter().map(one_match).collect();
    let any = each.is_empty() || each.iter().any(String::is_empty);
    let body = if any {
        "any request".to_string()
    } else {
        each.join(" or ")
    };
    match port {
        Some(p) => format!("{body} on {p}"),
        None => body,
    }
}

fn one_match(m: &dp::RouteMatch) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &m.path {
        let kind = match dp::path_match::Type::try_from(p.r#type) {
            Ok(dp::path_match::Type::Exact) => "Exact",
            Ok(dp::path_match::Type::Regex) => "RegularExpression",
            _ => "PathPrefix",
        };
        if !(kind == "PathPrefix" && (p.value.is_empty() || p.value == "/")) {
            parts.push(format!("{kind} {}", p.value));
        }
    } else if !m.path_prefix.is_empty() && m.path_prefix != "/" {
        parts.push(format!("PathPrefix {}", m.path_prefix));
    }
    if !m.method.is_empty() {
        parts.push(m.method.clone());
    }
    if !m.grpc_service.is_empty() || !m.grpc_method.is_empty() {
        let or_any = |s: &str| {
            if s.is_empty() {
                "*".to_string()
            } else {
                s.to_string()
            }
        };
        parts.push(format!(
            "gRPC {}/{}",
            or_any(&m.grpc_service),
            or_any(&m.grpc_method)
        ));
    }
    let value = |v: &dp::ValueMatch, sep: &str| {
        let op = if v.regex { "~" } else { "=" };
        format!("{sep} {}{op}{}", v.name, v.value)
    };
    let mut headers: Vec<_> = m.headers.iter().collect();
    headers.sort();
    parts.extend(headers.into_iter().map(|(k, v)| format!("header {k}={v}")));
    parts.extend(m.header_matches.iter().map(|v| value(v, "header")));
    parts.extend(m.query_params.iter().map(|v| value(v, "query")));
    parts.join(", ")
}

fn backend(b: &dp::BackendRef) -> pb::WeightedBackend {
    let name = match dp::backend_ref::Kind::try_from(b.kind) {
        Ok(dp::backend_ref::Kind::Service) => format!("service {}", b.service),
        Ok(dp::backend_ref::Kind::ServiceImport) if !b.cluster.is_empty() => {
            format!("serviceimport {} in cluster {}", b.service, b.cluster)
        }
        Ok(dp::backend_ref::Kind::ServiceImport) => format!("serviceimport {}", b.service),
        _ if !b.cluster.is_empty() => format!("cluster {}", b.cluster),
        _ => "the service itself".to_string(),
    };
    pb::WeightedBackend {
        name,
        weight: b.weight,
        unresolved: b.unresolved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_split_reads_as_words() {
        let r = dp::Route {
            source: "HTTPRoute shop/reviews".into(),
            matches: vec![dp::RouteMatch {
                path: Some(dp::PathMatch {
                    r#type: dp::path_match::Type::Prefix as i32,
                    value: "/v2".into(),
                }),
                method: "GET".into(),
                ..Default::default()
            }],
            backend_refs: vec![
                dp::BackendRef {
                    cluster: "west".into(),
                    weight: 70,
                    ..Default::default()
                },
                dp::BackendRef {
                    kind: dp::backend_ref::Kind::Service as i32,
                    service: "shop/reviews-v2".into(),
                    weight: 30,
                    unresolved: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let compiled = CompiledRoutes {
            by_parent: [("shop/reviews".parse().unwrap(), vec![r])].into(),
            reports: vec![],
        };
        let s = &summaries(&compiled)[0];
        assert_eq!(s.service, "shop/reviews");
        assert_eq!(s.matches, "PathPrefix /v2, GET");
        assert_eq!(s.backends[0].name, "cluster west");
        assert_eq!(s.backends[1].name, "service shop/reviews-v2");
        assert!(s.backends[1].unresolved);
        let any = dp::Route::default();
        assert_eq!(matches(&any), "any request");
    }
}
