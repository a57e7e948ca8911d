//! The matches and filters of a Gateway API route, translated field by field into the data
//! plane's protos (and checked on the way), and the spec's precedence among matches.

use std::cmp::Reverse;

use fedmesh_api::gateway::{HeaderFilter, HttpRouteMatch, PathModifier, ValueMatch};
use fedmesh_api::pb::dataplane as pb;

pub(super) fn is_core(group: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("") | Some("core"))
}

pub(super) fn value_match(m: &ValueMatch, what: &str) -> Result<pb::ValueMatch, String> {
    let regex = match m.type_.as_deref() {
        None | Some("Exact") => false,
        Some("RegularExpression") => {
            regex::Regex::new(&m.value)
                .map_err(|e| format!("{what} {:?}: not a regular expression: {e}", m.value))?;
            true
        }
        Some(other) => return Err(format!("{what} match type {other:?} is not supported")),
    };
    Ok(pb::ValueMatch {
        name: m.name.clone(),
        value: m.value.clone(),
        regex,
    })
}

/// Checks a path value as Gateway API requires for Exact and PathPrefix.
fn check_path(v: &str) -> Result<(), String> {
    if !v.starts_with('/') {
        return Err(format!("path {v:?} must start with /"));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if v.contains(bad) {
            return Err(format!("path {v:?} must not contain {bad:?}"));
        }
    }
    if v.ends_with("/..") || v.ends_with("/.") {
        return Err(format!("path {v:?} must not end in /. or /.."));
    }
    Ok(())
}

pub(super) fn http_match(m: &HttpRouteMatch) -> Result<pb::RouteMatch, String> {
    let path = match &m.path {
        None => pb::PathMatch {
            r#type: pb::path_match::Type::Prefix as i32,
            value: "/".into(),
        },
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let t = match p.type_.as_deref() {
                None | Some("PathPrefix") => {
                    check_path(&value)?;
                    pb::path_match::Type::Prefix
                }
                Some("Exact") => {
                    check_path(&value)?;
                    pb::path_match::Type::Exact
                }
                Some("RegularExpression") => {
                    regex::Regex::new(&value)
                        .map_err(|e| format!("path {value:?} is not a regular expression: {e}"))?;
                    pb::path_match::Type::Regex
                }
                Some(other) => return Err(format!("path match type {other:?} is not supported")),
            };
            pb::PathMatch {
                r#type: t as i32,
                value,
            }
        }
    };
    let method = match m.method.as_deref() {
        None => String::new(),
        Some(
            m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH"),
        ) => m.to_string(),
        Some(other) => return Err(format!("method {other:?} is not an HTTP method")),
    };
    Ok(pb::RouteMatch {
        path: Some(path),
        header_matches: first_by_name(&m.headers, true)
            .iter()
            .map(|h| value_match(h, "header"))
            .collect::<Result<_, _>>()?,
        query_params: first_by_name(&m.query_params, false)
            .iter()
            .map(|q| value_match(q, "query parameter"))
            .collect::<Result<_, _>>()?,
        method,
        ..Default::default()
    })
}

/// When names repeat, the first entry counts (Gateway API).
pub(super) fn first_by_name(list: &[ValueMatch], case_insensitive: bool) -> Vec<ValueMatch> {
    let mut seen = std::collections::BTreeSet::new();
    list.iter()
        .filter(|m| {
            seen.insert(if case_insensitive {
                m.name.to_ascii_lowercase()
            } else {
                m.name.clone()
            })
        })
        .cloned()
        .collect()
}

pub(super) fn header_modifier(f: &HeaderFilter) -> Result<pb::HeaderModifier, String> {
    let mut names = std::collections::BTreeSet::new();
    let mut check = |n: &str| -> Result<(), String> {
        http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| format!("{n:?} is not a header name"))?;
        if !names.insert(n.to_ascii_lowercase()) {
            return Err(format!(
                "header {n:?} is given more than one action; one action per header"
            ));
        }
        Ok(())
    };
    for h in f.set.iter().chain(&f.add) {
        check(&h.name)?;
        http::HeaderValue::from_str(&h.value)
            .map_err(|_| format!("header {} value {:?} is not valid", h.name, h.value))?;
    }
    for n in &f.remove {
        check(n)?;
    }
    let hs = |v: &[fedmesh_api::gateway::HttpHeader]| {
        v.iter()
            .map(|h| pb::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    Ok(pb::HeaderModifier {
        set: hs(&f.set),
        add: hs(&f.add),
        remove: f.remove.clone(),
    })
}

pub(super) fn path_modifier(
    p: &PathModifier,
    prefix_matched: bool,
) -> Result<pb::PathModifier, String> {
    match p.type_.as_str() {
        "ReplaceFullPath" => Ok(pb::PathModifier {
            full: true,
            value: p.replace_full_path.clone().unwrap_or_default(),
        }),
        "ReplacePrefixMatch" if prefix_matched => Ok(pb::PathModifier {
            full: false,
            value: p.replace_prefix_match.clone().unwrap_or_default(),
        }),
        "ReplacePrefixMatch" => Err(
            "ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix"
                .into(),
        ),
        other => Err(format!("path modifier type {other:?} is not supported")),
    }
}

/// The precedence key of one match (lower sorts first).
pub(super) type Precedence = (u8, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

pub(super) fn precedence(m: &pb::RouteMatch) -> Precedence {
    let (kind, len) = match &m.path {
        Some(p) if p.r#type == pb::path_match::Type::Exact as i32 => (0, p.value.len()),
        Some(p) if p.r#type == pb::path_match::Type::Prefix as i32 => (1, p.value.len()),
        Some(p) => (2, p.value.len()),
        None => (1, 1),
    };
    (
        kind,
        Reverse(len),
        u8::from(m.method.is_empty()),
        Reverse(m.header_matches.len()),
        Reverse(m.query_params.len()),
    )
}

pub(super) fn grpc_precedence(
    m: &pb::RouteMatch,
) -> (Reverse<usize>, Reverse<usize>, Reverse<usize>) {
    (
        Reverse(m.grpc_service.len()),
        Reverse(m.grpc_method.len()),
        Reverse(m.header_matches.len()),
    )
}
