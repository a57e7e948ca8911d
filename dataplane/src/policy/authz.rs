//! Authorization as the callee's sidecar decides it: a service's AuthorizationPolicies (and a
//! TrafficPolicy's `allowedCallers`, which is an ALLOW policy), compiled once per configuration.
//!
//! The order is Istio's: a matching DENY refuses; a matching AUDIT is recorded and changes
//! nothing; then, if the service has any ALLOW policy, the request must match one of them. No
//! policy: any authenticated caller. An invalid policy fails closed (an ALLOW matches nothing, a
//! DENY everything). On opaque TCP there is no method, path or header: an ALLOW rule that needs
//! one matches nothing, a DENY rule ignores it (denies more, never less).
//!
//! A caller without an identity (plain text to a PERMISSIVE service) never matches a source
//! that names identities: not an ALLOW's (it is not allowed by who it is), and a DENY's only
//! through its `not*` fields (it is none of the listed callers). A rule without `from` matches
//! it, as any caller.

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{SpiffeId, TrustDomain};
use http::{HeaderMap, Method};

use super::CallerPattern;
use super::authn::Claims;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// A value that is exact or, ending in `*`, a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Text {
    Exact(String),
    Prefix(String),
}

impl Text {
    fn new(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(p) => Self::Prefix(p.to_string()),
            None => Self::Exact(s.to_string()),
        }
    }
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Prefix(p) => v.starts_with(p.as_str()),
        }
    }
}

fn any_text(list: &[Text], v: &str) -> bool {
    list.iter().any(|t| t.matches(v))
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Source {
    principals: Vec<CallerPattern>,
    not_principals: Vec<CallerPattern>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    trust_domains: Vec<TrustDomain>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Operation {
    methods: Vec<Method>,
    paths: Vec<Text>,
    not_paths: Vec<Text>,
    ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    Header(http::HeaderName),
    /// A validated JWT's claim, by its path.
    Claim(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Condition {
    key: Key,
    values: Vec<Text>,
    not_values: Vec<Text>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AuthzPolicy {
    name: String,
    action: Action,
    rules: Vec<Rule>,
    invalid: bool,
    /// The routes it targets (`HTTPRoute shop/web`); empty: the whole service.
    routes: Vec<String>,
}

/// A service's policies, ready to evaluate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Authz {
    policies: Vec<AuthzPolicy>,
    /// Derived from `policies` ([`Authz::index`]): some policy targets routes; some ALLOW covers
    /// the whole service; the routes some ALLOW targets.
    has_routes: bool,
    allow_wide: bool,
    allow_routes: Vec<String>,
}

/// What is being authorized: a caller, the service port it called and, for HTTP and gRPC, the
/// request.
pub struct Subject<'a> {
    /// `None`: plain text from outside the mesh (unauthenticated).
    pub caller: Option<&'a SpiffeId>,
    pub port: u16,
    pub http: Option<HttpRequest<'a>>,
}

pub struct HttpRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The claims of the request's validated JWT, if it carried one.
    pub claims: Option<&'a Claims>,
    /// The route the request takes (`HTTPRoute shop/web`), when a policy targets routes.
    pub route: Option<&'a str>,
}

/// The outcome: `denied_by` names the policy that refused (or the ALLOW policies none of which
/// matched); `audited` the AUDIT policies that matched.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub denied_by: Option<Denial<'a>>,
    pub audited: Vec<&'a str>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denial<'a> {
    /// A DENY policy matched.
    Denied(&'a str),
    /// The service has ALLOW policies and none matched (their names).
    NotAllowed(Vec<&'a str>),
}

impl Denial<'_> {
    /// The policy to name in metrics: the DENY, or the first ALLOW that was not met.
    pub fn policy(&self) -> &str {
        match self {
            Denial::Denied(p) => p,
            Denial::NotAllowed(ps) => ps.first().copied().unwrap_or_default(),
        }
    }
}

/// The namespace of a caller's ID (`spiffe://TD/ns/NAMESPACE/...`).
pub fn namespace_of(id: &SpiffeId) -> Option<&str> {
    let mut parts = id.path().trim_start_matches('/').split('/');
    match (parts.next(), parts.next()) {
        (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

impl Source {
    fn positive(&self) -> bool {
        !self.principals.is_empty() || !self.namespaces.is_empty() || !self.trust_domains.is_empty()
    }

    fn negative(&self) -> bool {
        !self.not_principals.is_empty() || !self.not_namespaces.is_empty()
    }

    fn matches(&self, caller: Option<&SpiffeId>, deny: bool) -> bool {
        let Some(caller) = caller else {
            return !self.positive() && (!self.negative() || deny);
        };
        let ns = namespace_of(caller);
        (self.principals.is_empty() || self.principals.iter().any(|p| p.matches(caller)))
            && !self.not_principals.iter().any(|p| p.matches(caller))
            && (self.namespaces.is_empty()
                || ns.is_some_and(|n| self.namespaces.iter().any(|w| w == n)))
            && !ns.is_some_and(|n| self.not_namespaces.iter().any(|w| w == n))
            && (self.trust_domains.is_empty()
                || self
                    .trust_domains
                    .iter()
                    .any(|t| t == caller.trust_domain()))
    }
}

impl Operation {
    fn http_only(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.not_paths.is_empty()
    }

    /// `deny`: on TCP, HTTP-only fields are ignored (a DENY denies more); otherwise they make
    /// the operation match nothing.
    fn matches(&self, s: &Subject<'_>, deny: bool) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&s.port) {
            return false;
        }
        match &s.http {
            None => deny || !self.http_only(),
            Some(r) => {
                (self.methods.is_empty() || self.methods.contains(r.method))
                    && (self.paths.is_empty() || any_text(&self.paths, r.path))
                    && !any_text(&self.not_paths, r.path)
            }
        }
    }
}

impl Condition {
    fn matches(&self, s: &Subject<'_>, deny: bool) -> bool {
        let Some(r) = &s.http else { return deny };
        let values: Vec<std::borrow::Cow<'_, str>> = match &self.key {
            Key::Header(h) => r
                .headers
                .get_all(h)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(Into::into)
                .collect(),
            Key::Claim(path) => claim_values(r.claims, path),
        };
        (self.values.is_empty() || values.iter().any(|v| any_text(&self.values, v.as_ref())))
            && !values
                .iter()
                .any(|v| any_text(&self.not_values, v.as_ref()))
    }
}

/// A claim's values: a string, each string of a list, or a number or boolean as text.
fn claim_values<'a>(claims: Option<&'a Claims>, path: &[String]) -> Vec<std::borrow::Cow<'a, str>> {
    let mut at = claims.and_then(|c| c.get(path.first()?));
    for p in path.iter().skip(1) {
        at = at.and_then(|v| v.get(p));
    }
    let one = |v: &'a serde_json::Value| match v {
        serde_json::Value::String(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
        serde_json::Value::Number(n) => Some(n.to_string().into()),
        serde_json::Value::Bool(b) => Some(b.to_string().into()),
        _ => None,
    };
    match at {
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(one).collect(),
        Some(v) => one(v).into_iter().collect(),
        None => Vec::new(),
    }
}

impl AuthzPolicy {
    /// Whether the policy covers the request: a route-targeted one, only requests of its routes
    /// (on opaque TCP, which takes no route, a DENY still applies: it denies more, never less).
    fn applies(&self, s: &Subject<'_>) -> bool {
        if self.routes.is_empty() {
            return true;
        }
        match &s.http {
            Some(r) => r.route.is_some_and(|x| self.routes.iter().any(|y| y == x)),
            None => self.action == Action::Deny,
        }
    }

    /// Whether the request matches one of `rules` (the indices of the rules whose `from` its
    /// caller matches).
    fn matches(&self, rules: &[u32], s: &Subject<'_>) -> bool {
        let deny = self.action == Action::Deny;
        if self.invalid {
            return deny;
        }
        rules.iter().any(|&i| {
            let r = &self.rules[i as usize];
            (r.to.is_empty() || r.to.iter().any(|o| o.matches(s, deny)))
                && r.when.iter().all(|c| c.matches(s, deny))
        })
    }
}

/// The rules of a service's policies whose `from` one caller matches, per policy: what a caller
/// is does not change on its connection, so this is worked out once per connection (and
/// configuration), and each request then checks only these rules' `to` and `when`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallerRules(Vec<(u32, Vec<u32>)>);

impl Authz {
    /// A TrafficPolicy's `allowedCallers` as the ALLOW policy it is.
    pub fn allow_callers(&mut self, name: &str, callers: Vec<CallerPattern>) {
        self.policies.push(AuthzPolicy {
            name: name.to_string(),
            action: Action::Allow,
            rules: vec![Rule {
                from: vec![Source {
                    principals: callers,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            invalid: false,
            routes: Vec::new(),
        });
        self.index();
    }

    /// Works out what evaluation needs of the policies as a whole.
    fn index(&mut self) {
        let allows = || self.policies.iter().filter(|p| p.action == Action::Allow);
        self.has_routes = self.policies.iter().any(|p| !p.routes.is_empty());
        self.allow_wide = allows().any(|p| p.routes.is_empty());
        let mut routes: Vec<String> = allows().flat_map(|p| p.routes.iter().cloned()).collect();
        routes.sort();
        routes.dedup();
        self.allow_routes = routes;
    }

    /// Some ALLOW policy covers the request (then one must match it).
    fn allows_apply(&self, s: &Subject<'_>) -> bool {
        self.allow_wide
            || s.http
                .as_ref()
                .and_then(|r| r.route)
                .is_some_and(|route| self.allow_routes.iter().any(|x| x == route))
    }

    /// No policy: every authenticated caller may call.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Some policy targets routes: the request's route must be known to evaluate it.
    pub fn has_routes(&self) -> bool {
        self.has_routes
    }

    /// The rules `caller` can match (see [`CallerRules`]); only the policies that can match it
    /// at all (one of its rules can, or it is invalid: a DENY then matches everything).
    pub fn caller_rules(&self, caller: Option<&SpiffeId>) -> CallerRules {
        CallerRules(
            self.policies
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let deny = p.action == Action::Deny;
                    let rules: Vec<u32> = (0..p.rules.len() as u32)
                        .filter(|&i| {
                            let r = &p.rules[i as usize];
                            r.from.is_empty() || r.from.iter().any(|f| f.matches(caller, deny))
                        })
                        .collect();
                    (p.invalid || !rules.is_empty()).then_some((i as u32, rules))
                })
                .collect(),
        )
    }

    pub fn evaluate<'a>(&'a self, s: &Subject<'_>) -> Verdict<'a> {
        self.evaluate_for(&self.caller_rules(s.caller), s)
    }

    /// [`Authz::evaluate`] with the caller's rules worked out already (`rules` must come from
    /// this `Authz` and `s.caller`).
    pub fn evaluate_for<'a>(&'a self, rules: &CallerRules, s: &Subject<'_>) -> Verdict<'a> {
        let mut verdict = Verdict::default();
        let each = || {
            rules
                .0
                .iter()
                .map(|(i, r)| (&self.policies[*i as usize], &r[..]))
                .filter(|(p, _)| p.applies(s))
        };
        for (p, r) in each() {
            if p.action == Action::Deny && p.matches(r, s) {
                verdict.denied_by = Some(Denial::Denied(&p.name));
                return verdict;
            }
        }
        let mut allowed = false;
        for (p, r) in each() {
            match p.action {
                Action::Audit if p.matches(r, s) => verdict.audited.push(p.name.as_str()),
                Action::Allow if !allowed => allowed = p.matches(r, s),
                _ => {}
            }
        }
        if !allowed && self.allows_apply(s) {
            verdict.denied_by = Some(Denial::NotAllowed(
                self.policies
                    .iter()
                    .filter(|p| p.action == Action::Allow && p.applies(s))
                    .map(|p| p.name.as_str())
                    .collect(),
            ));
        }
        verdict
    }
}

fn texts(v: &[String]) -> Vec<Text> {
    v.iter().map(|s| Text::new(s)).collect()
}

fn callers(v: &[String]) -> Result<Vec<CallerPattern>, String> {
    v.iter().map(|c| CallerPattern::parse(c)).collect()
}

impl TryFrom<&[pb::AuthzPolicy]> for Authz {
    type Error = String;

    fn try_from(list: &[pb::AuthzPolicy]) -> Result<Self, String> {
        let mut policies = Vec::new();
        for p in list {
            let action = match pb::AuthzAction::try_from(p.action) {
                Ok(pb::AuthzAction::AuthzAllow) => Action::Allow,
                Ok(pb::AuthzAction::AuthzDeny) => Action::Deny,
                Ok(pb::AuthzAction::AuthzAudit) => Action::Audit,
                Err(_) => return Err(format!("{}: unknown action {}", p.name, p.action)),
            };
            let rules = p
                .rules
                .iter()
                .map(|r| rule(r).map_err(|e| format!("{}: {e}", p.name)))
                .collect::<Result<Vec<_>, String>>()?;
            policies.push(AuthzPolicy {
                name: p.name.clone(),
                action,
                rules,
                invalid: p.invalid,
                routes: p.routes.clone(),
            });
        }
        let mut authz = Self {
            policies,
            ..Self::default()
        };
        authz.index();
        Ok(authz)
    }
}

fn rule(r: &pb::AuthzRule) -> Result<Rule, String> {
    Ok(Rule {
        from: r
            .from
            .iter()
            .map(|f| -> Result<Source, String> {
                Ok(Source {
                    principals: callers(&f.principals)?,
                    not_principals: callers(&f.not_principals)?,
                    namespaces: f.namespaces.clone(),
                    not_namespaces: f.not_namespaces.clone(),
                    trust_domains: f
                        .trust_domains
                        .iter()
                        .map(|t| {
                            TrustDomain::new(t).map_err(|e| format!("trust domain {t:?}: {e}"))
                        })
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<_, _>>()?,
        to: r
            .to
            .iter()
            .map(|o| -> Result<Operation, String> {
                Ok(Operation {
                    methods: o
                        .methods
                        .iter()
                        .map(|m| {
                            Method::from_bytes(m.as_bytes())
                                .map_err(|_| format!("method {m:?} is not an HTTP method"))
                        })
                        .collect::<Result<_, _>>()?,
                    paths: texts(&o.paths),
                    not_paths: texts(&o.not_paths),
                    ports: o
                        .ports
                        .iter()
                        .map(|p| u16::try_from(*p).map_err(|_| format!("port {p} is not a port")))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<_, _>>()?,
        when: r
            .when
            .iter()
            .map(|c| -> Result<Condition, String> {
                let key = if c.claim.is_empty() {
                    Key::Header(
                        http::HeaderName::from_bytes(c.header.to_ascii_lowercase().as_bytes())
                            .map_err(|_| format!("header {:?} is not a header name", c.header))?,
                    )
                } else {
                    Key::Claim(c.claim.clone())
                };
                Ok(Condition {
                    key,
                    values: texts(&c.values),
                    not_values: texts(&c.not_values),
                })
            })
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn policy(name: &str, action: pb::AuthzAction, rules: Vec<pb::AuthzRule>) -> pb::AuthzPolicy {
        pb::AuthzPolicy {
            name: name.into(),
            action: action as i32,
            rules,
            invalid: false,
            routes: Vec::new(),
        }
    }

    fn from(principals: &[&str]) -> pb::AuthzSource {
        pb::AuthzSource {
            principals: principals.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    const FRONTEND: &str = "spiffe://east.example/ns/shop/sa/frontend";
    const BATCH: &str = "spiffe://west.example/ns/jobs/sa/batch";

    fn http<'a>(m: &'a Method, path: &'a str, h: &'a HeaderMap) -> Option<HttpRequest<'a>> {
        Some(HttpRequest {
            method: m,
            path,
            headers: h,
            claims: None,
            route: None,
        })
    }

    #[test]
    fn deny_wins_allow_lists_and_audit_only_records() {
        let authz = Authz::try_from(
            &[
                policy(
                    "AuthorizationPolicy shop/readers",
                    pb::AuthzAction::AuthzAllow,
                    vec![pb::AuthzRule {
                        from: vec![pb::AuthzSource {
                            namespaces: vec!["shop".into()],
                            ..Default::default()
                        }],
                        to: vec![pb::AuthzOperation {
                            methods: vec!["GET".into()],
                            paths: vec!["/api/*".into()],
                            ..Default::default()
                        }],
                        when: vec![],
                    }],
                ),
                policy(
                    "AuthorizationPolicy shop/no-admin",
                    pb::AuthzAction::AuthzDeny,
                    vec![pb::AuthzRule {
                        to: vec![pb::AuthzOperation {
                            paths: vec!["/api/admin*".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                ),
                policy(
                    "AuthorizationPolicy shop/watch-west",
                    pb::AuthzAction::AuthzAudit,
                    vec![pb::AuthzRule {
                        from: vec![pb::AuthzSource {
                            trust_domains: vec!["west.example".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                ),
            ][..],
        )
        .unwrap();
        let h = HeaderMap::new();
        let (get, post) = (Method::GET, Method::POST);
        let frontend = id(FRONTEND);
        let batch = id(BATCH);
        let ask = |caller: &SpiffeId, m: &Method, path: &str| {
            let v = authz.evaluate(&Subject {
                caller: Some(caller),
                port: 80,
                http: http(m, path, &h),
            });
            (
                v.denied_by.map(|d| d.policy().to_string()),
                v.audited.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(ask(&frontend, &get, "/api/items"), (None, vec![]));
        assert_eq!(
            ask(&frontend, &get, "/api/admin/users").0.as_deref(),
            Some("AuthorizationPolicy shop/no-admin"),
            "a DENY wins over an ALLOW"
        );
        assert_eq!(
            ask(&frontend, &post, "/api/items").0.as_deref(),
            Some("AuthorizationPolicy shop/readers"),
            "not allowed: POST"
        );
        let (denied, audited) = ask(&batch, &get, "/api/items");
        assert_eq!(
            denied.as_deref(),
            Some("AuthorizationPolicy shop/readers"),
            "not in namespace shop"
        );
        assert_eq!(audited, vec!["AuthorizationPolicy shop/watch-west"]);
    }

    #[test]
    fn on_tcp_an_allow_needing_http_matches_nothing_and_a_deny_ignores_it() {
        let rule_get = pb::AuthzRule {
            from: vec![from(&["spiffe://east.example/ns/shop/*"])],
            to: vec![pb::AuthzOperation {
                methods: vec!["GET".into()],
                ports: vec![80],
                ..Default::default()
            }],
            when: vec![],
        };
        let allow = Authz::try_from(
            &[policy(
                "allow",
                pb::AuthzAction::AuthzAllow,
                vec![rule_get.clone()],
            )][..],
        )
        .unwrap();
        let deny =
            Authz::try_from(&[policy("deny", pb::AuthzAction::AuthzDeny, vec![rule_get])][..])
                .unwrap();
        let frontend = id(FRONTEND);
        let tcp = |port| Subject {
            caller: Some(&frontend),
            port,
            http: None,
        };
        assert!(allow.evaluate(&tcp(80)).denied_by.is_some());
        assert!(deny.evaluate(&tcp(80)).denied_by.is_some());
        assert!(
            deny.evaluate(&tcp(5432)).denied_by.is_none(),
            "ports still apply to a DENY"
        );
    }

    #[test]
    fn an_invalid_policy_fails_closed_and_headers_condition_http() {
        let mut p = policy("bad-allow", pb::AuthzAction::AuthzAllow, vec![]);
        p.invalid = true;
        let mut d = policy("bad-deny", pb::AuthzAction::AuthzDeny, vec![]);
        d.invalid = true;
        let frontend = id(FRONTEND);
        let h = HeaderMap::new();
        let m = Method::GET;
        let s = Subject {
            caller: Some(&frontend),
            port: 80,
            http: http(&m, "/", &h),
        };
        let v = Authz::try_from(&[p][..]).unwrap();
        assert_eq!(
            v.evaluate(&s).denied_by,
            Some(Denial::NotAllowed(vec!["bad-allow"]))
        );
        let v = Authz::try_from(&[d][..]).unwrap();
        assert_eq!(v.evaluate(&s).denied_by, Some(Denial::Denied("bad-deny")));

        let when = Authz::try_from(
            &[policy(
                "by-header",
                pb::AuthzAction::AuthzAllow,
                vec![pb::AuthzRule {
                    when: vec![pb::AuthzCondition {
                        header: "X-Tenant".into(),
                        values: vec!["acme-*".into()],
                        not_values: vec!["acme-evil".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )][..],
        )
        .unwrap();
        let mut h = HeaderMap::new();
        let ask = |h: &HeaderMap| {
            when.evaluate(&Subject {
                caller: Some(&frontend),
                port: 80,
                http: http(&m, "/", h),
            })
            .denied_by
            .is_none()
        };
        assert!(!ask(&h), "no header");
        h.insert("x-tenant", "acme-east".parse().unwrap());
        assert!(ask(&h));
        h.insert("x-tenant", "acme-evil".parse().unwrap());
        assert!(!ask(&h));
    }

    #[test]
    fn sources_combine_fields_with_and_and_values_with_or() {
        let authz = Authz::try_from(
            &[policy(
                "p",
                pb::AuthzAction::AuthzAllow,
                vec![pb::AuthzRule {
                    from: vec![pb::AuthzSource {
                        namespaces: vec!["shop".into(), "jobs".into()],
                        not_principals: vec!["spiffe://west.example/ns/jobs/sa/batch".into()],
                        trust_domains: vec!["east.example".into(), "west.example".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )][..],
        )
        .unwrap();
        let ok = |s: &str| {
            authz
                .evaluate(&Subject {
                    caller: Some(&id(s)),
                    port: 80,
                    http: None,
                })
                .denied_by
                .is_none()
        };
        assert!(ok(FRONTEND));
        assert!(ok("spiffe://west.example/ns/jobs/sa/report"));
        assert!(!ok(BATCH), "notPrincipals");
        assert!(!ok("spiffe://north.example/ns/shop/sa/x"), "trust domain");
        assert!(!ok("spiffe://east.example/fedmesh/gateway"), "no namespace");
    }

    /// Plain text to a PERMISSIVE service has no caller: an identity-based ALLOW never admits
    /// it, a DENY by `notPrincipals` refuses it, and a rule without `from` takes it as anyone.
    #[test]
    fn an_unauthenticated_caller_never_matches_an_identity_based_allow() {
        let h = HeaderMap::new();
        let get = Method::GET;
        let ask = |authz: &Authz, caller: Option<&SpiffeId>| {
            authz
                .evaluate(&Subject {
                    caller,
                    port: 80,
                    http: http(&get, "/", &h),
                })
                .denied_by
                .map(|d| d.policy().to_string())
        };
        let frontend = id(FRONTEND);
        let by_identity = Authz::try_from(
            &[
                policy(
                    "shop-only",
                    pb::AuthzAction::AuthzAllow,
                    vec![pb::AuthzRule {
                        from: vec![pb::AuthzSource {
                            namespaces: vec!["shop".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                ),
                policy(
                    "not-from-jobs",
                    pb::AuthzAction::AuthzAllow,
                    vec![pb::AuthzRule {
                        from: vec![pb::AuthzSource {
                            not_namespaces: vec!["jobs".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                ),
            ][..],
        )
        .unwrap();
        assert_eq!(ask(&by_identity, Some(&frontend)), None);
        assert_eq!(ask(&by_identity, None).as_deref(), Some("shop-only"));

        let deny_strangers = Authz::try_from(
            &[policy(
                "mesh-only",
                pb::AuthzAction::AuthzDeny,
                vec![pb::AuthzRule {
                    from: vec![pb::AuthzSource {
                        not_principals: vec!["spiffe://east.example/*".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )][..],
        )
        .unwrap();
        assert_eq!(ask(&deny_strangers, Some(&frontend)), None);
        assert_eq!(ask(&deny_strangers, None).as_deref(), Some("mesh-only"));

        let anyone = Authz::try_from(
            &[policy(
                "gets",
                pb::AuthzAction::AuthzAllow,
                vec![pb::AuthzRule {
                    to: vec![pb::AuthzOperation {
                        methods: vec!["GET".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )][..],
        )
        .unwrap();
        assert_eq!(ask(&anyone, None), None);
    }

    /// `when` on a JWT claim: a string claim, an element of a list claim, a nested claim; no
    /// token means no value.
    #[test]
    fn claims_of_the_validated_token_decide_when_conditions() {
        let authz = Authz::try_from(
            &[policy(
                "admins",
                pb::AuthzAction::AuthzAllow,
                vec![pb::AuthzRule {
                    when: vec![
                        pb::AuthzCondition {
                            claim: vec!["groups".into()],
                            values: vec!["admin*".into()],
                            ..Default::default()
                        },
                        pb::AuthzCondition {
                            claim: vec!["org".into(), "tier".into()],
                            not_values: vec!["free".into()],
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }],
            )][..],
        )
        .unwrap();
        let h = HeaderMap::new();
        let get = Method::GET;
        let frontend = id(FRONTEND);
        let ask = |claims: Option<&Claims>| {
            authz
                .evaluate(&Subject {
                    caller: Some(&frontend),
                    port: 80,
                    http: Some(HttpRequest {
                        method: &get,
                        path: "/",
                        headers: &h,
                        claims,
                        route: None,
                    }),
                })
                .denied_by
                .is_none()
        };
        let claims = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert!(ask(Some(&claims(serde_json::json!({
            "groups": ["users", "admins"], "org": {"tier": "gold"}
        })))));
        assert!(!ask(Some(&claims(serde_json::json!({
            "groups": ["admins"], "org": {"tier": "free"}
        })))));
        assert!(!ask(Some(&claims(serde_json::json!({"groups": "users"})))));
        assert!(!ask(None));
    }

    /// A policy targeting a route covers only the requests that take it: an ALLOW there does not
    /// make the rest of the service default-deny; on TCP (no route) only a DENY applies.
    #[test]
    fn a_route_targeted_policy_covers_only_its_routes_requests() {
        let mut admins = policy(
            "admins",
            pb::AuthzAction::AuthzAllow,
            vec![pb::AuthzRule {
                from: vec![from(&[FRONTEND])],
                ..Default::default()
            }],
        );
        admins.routes = vec!["HTTPRoute shop/admin".into()];
        let mut no_tcp = policy(
            "no-tcp",
            pb::AuthzAction::AuthzDeny,
            vec![pb::AuthzRule::default()],
        );
        no_tcp.routes = vec!["HTTPRoute shop/admin".into()];
        let authz = Authz::try_from(&[admins][..]).unwrap();
        assert!(authz.has_routes());
        let (h, get, batch) = (HeaderMap::new(), Method::GET, id(BATCH));
        let ask = |authz: &Authz, route: Option<&str>| {
            authz
                .evaluate(&Subject {
                    caller: Some(&batch),
                    port: 80,
                    http: Some(HttpRequest {
                        method: &get,
                        path: "/",
                        headers: &h,
                        claims: None,
                        route,
                    }),
                })
                .denied_by
                .map(|d| d.policy().to_string())
        };
        assert_eq!(
            ask(&authz, Some("HTTPRoute shop/admin")).as_deref(),
            Some("admins")
        );
        assert_eq!(ask(&authz, Some("HTTPRoute shop/rest")), None);
        assert_eq!(ask(&authz, None), None);
        let deny = Authz::try_from(&[no_tcp][..]).unwrap();
        let tcp = Subject {
            caller: Some(&batch),
            port: 80,
            http: None,
        };
        assert_eq!(
            deny.evaluate(&tcp).denied_by,
            Some(Denial::Denied("no-tcp"))
        );
        assert_eq!(ask(&deny, Some("HTTPRoute shop/rest")), None);
    }
}
