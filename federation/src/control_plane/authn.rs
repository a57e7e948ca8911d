//! PeerAuthentications and RequestAuthentications, checked and compiled for the callee's
//! sidecars, with a report per policy for its status.
//!
//! - PeerAuthentication sets a service's `mtls_mode`: a policy naming the service wins over one
//!   for its whole namespace; between two at the same level, STRICT wins (the safe choice). An
//!   invalid one counts as STRICT and says why.
//! - RequestAuthentication becomes a `pb::RequestAuthn` on every service it targets, its rules
//!   carrying the keys: inline `jwks`, or the JWK Set at `jwksUri` as the control plane last
//!   fetched it ([`super::jwks`]). An invalid policy is still compiled, as `invalid`, so the
//!   sidecars refuse every token (fail closed) with the reason.

use std::collections::BTreeMap;

use fedmesh_api::ServiceKey;
use fedmesh_api::authn::{JwtRuleSpec, PeerAuthentication, RequestAuthentication};
use fedmesh_api::gateway::reason;
use fedmesh_api::pb::dataplane as pb;

use super::authz::targets;
use super::jwks::Jwks;
use super::policy::{PolicyReport, policy_reason};
use super::routes::Cond;
use super::source::LocalObjects;

pub const PEER_KIND: &str = "PeerAuthentication";
pub const REQUEST_KIND: &str = "RequestAuthentication";

/// What each service (`namespace/name`) gets, and a report per policy.
#[derive(Default)]
pub struct CompiledAuthn {
    pub mtls: BTreeMap<String, pb::MtlsMode>,
    pub request: BTreeMap<String, Vec<pb::RequestAuthn>>,
    pub reports: Vec<PolicyReport>,
    /// The `jwksUri`s in use (the JWKS cache fetches these).
    pub jwks_uris: Vec<String>,
}

fn mode(m: Option<&str>) -> Result<pb::MtlsMode, String> {
    match m.unwrap_or("STRICT") {
        "STRICT" => Ok(pb::MtlsMode::MtlsStrict),
        "PERMISSIVE" => Ok(pb::MtlsMode::MtlsPermissive),
        other => Err(format!("mtls.mode {other:?}: use STRICT or PERMISSIVE")),
    }
}

fn report(
    kind: &'static str,
    key: &ServiceKey,
    generation: Option<i64>,
    services: &[String],
    accepted: Cond,
    missing: Vec<String>,
) -> PolicyReport {
    PolicyReport {
        kind,
        policy: key.clone(),
        target: (services.len() == 1).then(|| services[0].clone()),
        generation,
        accepted,
        resolved_refs: if missing.is_empty() {
            Cond::ok(reason::RESOLVED_REFS)
        } else {
            Cond::no(policy_reason::TARGET_NOT_FOUND, missing.join("; "))
        },
    }
}

fn peer(
    key: &ServiceKey,
    p: &PeerAuthentication,
    local: &LocalObjects,
    out: &mut CompiledAuthn,
    chosen: &mut BTreeMap<String, (bool, pb::MtlsMode)>,
) {
    let targeted = targets(key, &p.spec.target_refs, local);
    let checked = mode(p.spec.mtls.mode.as_deref());
    let (services, missing) = match &targeted {
        Ok((s, m)) => (s.clone(), m.clone()),
        Err(_) => (Vec::new(), Vec::new()),
    };
    let accepted = match (&checked, &targeted) {
        (Ok(_), Ok(_)) => Cond::ok(reason::ACCEPTED),
        (Err(e), _) | (_, Err(e)) => Cond::no(
            policy_reason::INVALID,
            format!("{e}; its targets stay STRICT until fixed"),
        ),
    };
    let m = checked.unwrap_or(pb::MtlsMode::MtlsStrict);
    let specific = !p.spec.target_refs.is_empty();
    for s in &services {
        let c = chosen.entry(s.clone()).or_insert((specific, m));
        // The more specific policy wins; at the same level, STRICT.
        if (specific && !c.0) || (specific == c.0 && m == pb::MtlsMode::MtlsStrict) {
            *c = (specific, m);
        }
    }
    out.reports.push(report(
        PEER_KIND,
        key,
        p.metadata.generation,
        &services,
        accepted,
        missing,
    ));
}

/// A rule, checked; its keys from `jwks`. `Err`: the policy is invalid.
fn jwt_rule(r: &JwtRuleSpec, jwks: &Jwks, uris: &mut Vec<String>) -> Result<pb::JwtRule, String> {
    if r.issuer.is_empty() {
        return Err("a jwtRule needs an issuer".into());
    }
    let mut out = pb::JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        ..Default::default()
    };
    for h in &r.from_headers {
        let name = h.name.to_ascii_lowercase();
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("fromHeaders: {:?} is not a header name", h.name))?;
        out.from_headers.push(pb::JwtHeader {
            name,
            prefix: h.prefix.clone().unwrap_or_default(),
        });
    }
    let set = match (&r.jwks_uri, &r.jwks) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(format!(
                "issuer {}: give jwksUri or jwks (one of them)",
                r.issuer
            ));
        }
        (None, Some(inline)) => Ok(inline.clone()),
        (Some(uri), None) => {
            if !["https://", "http://", "file:///"]
                .iter()
                .any(|s| uri.starts_with(s))
            {
                return Err(format!(
                    "jwksUri {uri:?}: use https://, http:// or file:///PATH"
                ));
            }
            uris.push(uri.clone());
            jwks.get(uri).map_err(|e| format!("JWKS {uri}: {e}"))
        }
    };
    match set {
        Ok(s) => match serde_json::from_str::<serde_json::Value>(&s) {
            Ok(v) if v.get("keys").is_some_and(|k| k.is_array()) => out.jwks = s,
            _ => out.jwks_error = "it is not a JWK Set (a JSON object with \"keys\")".into(),
        },
        Err(e) => out.jwks_error = e,
    }
    Ok(out)
}

fn request(
    key: &ServiceKey,
    p: &RequestAuthentication,
    local: &LocalObjects,
    jwks: &Jwks,
    out: &mut CompiledAuthn,
) {
    let name = format!("{REQUEST_KIND} {key}");
    let targeted = targets(key, &p.spec.target_refs, local);
    let rules = if p.spec.jwt_rules.is_empty() {
        Err("give at least one jwtRule".to_string())
    } else {
        p.spec
            .jwt_rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                jwt_rule(r, jwks, &mut out.jwks_uris).map_err(|e| format!("jwtRules[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let (compiled, accepted) = match (rules, targeted.as_ref().map_err(Clone::clone)) {
        (Ok(rules), Ok(_)) => {
            let unavailable: Vec<String> = rules
                .iter()
                .filter(|r| !r.jwks_error.is_empty())
                .map(|r| format!("issuer {}: {}", r.issuer, r.jwks_error))
                .collect();
            let accepted = if unavailable.is_empty() {
                Cond::ok(reason::ACCEPTED)
            } else {
                Cond::no(
                    policy_reason::INVALID,
                    format!(
                        "{}; those issuers' tokens are refused until their keys are available",
                        unavailable.join("; ")
                    ),
                )
            };
            (
                pb::RequestAuthn {
                    name: name.clone(),
                    rules,
                    allow_missing: p.spec.allow_missing,
                    invalid: String::new(),
                },
                accepted,
            )
        }
        (Err(e), _) | (_, Err(e)) => (
            pb::RequestAuthn {
                name: name.clone(),
                invalid: e.clone(),
                ..Default::default()
            },
            Cond::no(
                policy_reason::INVALID,
                format!("{e}; every request to its targets is refused until fixed"),
            ),
        ),
    };
    let (services, missing) = match targeted {
        Ok(t) => t,
        // A bad targetRef: fail closed on every service of the namespace.
        Err(_) => (super::authz::namespace_services(key, local), Vec::new()),
    };
    for s in &services {
        out.request
            .entry(s.clone())
            .or_default()
            .push(compiled.clone());
    }
    out.reports.push(report(
        REQUEST_KIND,
        key,
        p.metadata.generation,
        &services,
        accepted,
        missing,
    ));
}

pub fn compile(local: &LocalObjects, jwks: &Jwks) -> CompiledAuthn {
    let mut out = CompiledAuthn::default();
    let mut chosen = BTreeMap::new();
    for (key, p) in &local.peer_authns {
        peer(key, p, local, &mut out, &mut chosen);
    }
    out.mtls = chosen.into_iter().map(|(s, (_, m))| (s, m)).collect();
    for (key, p) in &local.request_authns {
        request(key, p, local, jwks, &mut out);
    }
    out.jwks_uris.sort();
    out.jwks_uris.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(docs: &str) -> LocalObjects {
        let shop = crate::control_plane::authz::tests::SHOP;
        LocalObjects::from_yaml(&format!("{shop}\n---\n{docs}"))
    }

    const PA: &str = "apiVersion: fedmesh.io/v1alpha1\nkind: PeerAuthentication\n";
    const RA: &str = "apiVersion: fedmesh.io/v1alpha1\nkind: RequestAuthentication\n";

    #[test]
    fn a_service_level_mode_beats_the_namespace_and_strict_wins_a_tie() {
        let l = local(&format!(
            "{PA}metadata: {{name: ns, namespace: shop}}\nspec: {{mtls: {{mode: PERMISSIVE}}}}\n---\n{PA}metadata: {{name: api-strict, namespace: shop}}\nspec: {{targetRefs: [{{kind: Service, name: api}}], mtls: {{mode: STRICT}}}}\n---\n{PA}metadata: {{name: typo, namespace: shop}}\nspec: {{targetRefs: [{{kind: Service, name: gone}}], mtls: {{mode: permissive}}}}\n"
        ));
        let c = compile(&l, &Jwks::new(std::time::Duration::from_secs(60)));
        assert_eq!(c.mtls["shop/web"], pb::MtlsMode::MtlsPermissive);
        assert_eq!(c.mtls["shop/api"], pb::MtlsMode::MtlsStrict);
        let typo = c
            .reports
            .iter()
            .find(|r| r.policy.name.as_str() == "typo")
            .unwrap();
        assert!(typo.accepted.message.contains("use STRICT or PERMISSIVE"));
        assert!(
            typo.resolved_refs
                .message
                .contains("Service shop/gone does not exist")
        );
    }

    #[test]
    fn request_authentication_carries_inline_keys_and_unfetched_ones_say_why() {
        let l = local(&format!(
            "{RA}metadata: {{name: users, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, name: api}}]\n  jwtRules:\n    - issuer: https://a.example\n      jwks: '{{\"keys\": []}}'\n      fromHeaders: [{{name: X-JWT, prefix: \"Token \"}}]\n    - issuer: https://b.example\n      jwksUri: https://b.example/jwks.json\n---\n{RA}metadata: {{name: both, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, name: web}}]\n  jwtRules: [{{issuer: https://c.example, jwks: '{{}}', jwksUri: 'file:///x'}}]\n"
        ));
        let c = compile(&l, &Jwks::new(std::time::Duration::from_secs(60)));
        let api = &c.request["shop/api"][0];
        assert_eq!(api.name, "RequestAuthentication shop/users");
        assert_eq!(api.rules[0].jwks, "{\"keys\": []}");
        assert_eq!(api.rules[0].from_headers[0].name, "x-jwt");
        assert!(api.rules[1].jwks_error.contains("has not fetched it yet"));
        assert_eq!(c.jwks_uris, vec!["https://b.example/jwks.json"]);
        let web = &c.request["shop/web"][0];
        assert!(web.invalid.contains("give jwksUri or jwks (one of them)"));
        let users = c
            .reports
            .iter()
            .find(|r| r.policy.name.as_str() == "users")
            .unwrap();
        assert!(!users.accepted.status);
        assert!(users.accepted.message.contains("issuer https://b.example"));
    }
}
