//! fedmesh's `AuthorizationPolicy` (group `fedmesh.io`, version `v1alpha1`), in the shape Istio
//! users write: who may call which services, enforced by the callee's sidecars on the caller's
//! verified SPIFFE ID (and, for HTTP and gRPC, the method, path and headers).
//!
//! ```yaml
//! apiVersion: fedmesh.io/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: {name: api-readers, namespace: shop}
//! spec:
//!   targetRefs: [{kind: Service, name: api}]      # or a route; none: every service of the namespace
//!   action: ALLOW                                 # ALLOW (default), DENY (wins), AUDIT
//!   rules:
//!     - from:
//!         - source:
//!             principals: ["spiffe://east.example/ns/shop/sa/frontend", "spiffe://west.example/ns/shop/*"]
//!             namespaces: [shop]
//!             clusters: [east, west]
//!       to:
//!         - operation: {methods: [GET], paths: ["/api/*"], ports: [80]}
//!       when:
//!         - {key: "request.headers[x-tenant]", values: ["acme-*"]}
//! ```
//!
//! With any ALLOW policy a service admits only what one allows; a DENY that matches refuses
//! whatever allows it; an AUDIT counts and logs what it matches and lets it through. A policy
//! that does not validate fails closed (an ALLOW allows nothing, a DENY denies everything) and
//! says why in its status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fedmesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    shortname = "fap",
    status = "AuthorizationPolicyStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The Services it applies to (`kind: Service`), or routes (`group: gateway.networking.k8s.io`,
    /// `kind: HTTPRoute` or `GRPCRoute`: only the requests that route takes, on its Services).
    /// None: every service of the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<AuthzTargetRef>,
    /// `ALLOW` (default), `DENY` or `AUDIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["ALLOW", "DENY", "AUDIT"]))]
    pub action: Option<String>,
    /// A request matches the policy when it matches one rule. An ALLOW without rules allows
    /// nothing; `rules: [{}]` matches every request.
    #[serde(default)]
    pub rules: Vec<AuthzRuleSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzTargetRef {
    /// `""` (core).
    #[serde(default)]
    pub group: String,
    /// `Service`, or `HTTPRoute` / `GRPCRoute` (group `gateway.networking.k8s.io`).
    #[schemars(extend("enum" = ["Service", "HTTPRoute", "GRPCRoute"]))]
    pub kind: String,
    pub name: String,
}

/// `from` (one must match; none: any caller), `to` (one must match; none: any request) and
/// every `when`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRuleSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzWhen>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzFrom {
    pub source: AuthzSourceSpec,
}

/// Every field given must hold; within a field one value suffices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSourceSpec {
    /// SPIFFE IDs, exact or ending in `/*` (a whole last segment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// The caller's namespace (`spiffe://TD/ns/NAMESPACE/...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// The caller's trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    /// The caller's cluster (of the clusterset; each is its own trust domain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzTo {
    pub operation: AuthzOperationSpec,
}

/// Methods, paths and headers apply to HTTP and gRPC only: on opaque TCP an ALLOW rule naming
/// them matches nothing, and a DENY rule ignores them (it denies more, never less).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzOperationSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact, or ending in `*` for a prefix. gRPC: `/package.Service/Method`, `/package.Service/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// The service ports called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u32>,
}

/// A condition: `key` is `request.headers[NAME]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzWhen {
    pub key: String,
    /// Exact, or ending in `*` for a prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuthorizationPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
