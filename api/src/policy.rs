//! fedmesh's routing policy CRD, `TrafficPolicy` (group `fedmesh.io`, version `v1alpha1`).
//!
//! It reads like Gateway API — weighted `backendRefs`, `rules` with path/header `matches`,
//! `timeouts`, `retries` — with what Gateway API lacks for a multi-cluster mesh: backends are
//! *clusters* exporting the service, and `authorization` lists the SPIFFE IDs allowed to call it.
//!
//! ```yaml
//! apiVersion: fedmesh.io/v1alpha1
//! kind: TrafficPolicy
//! metadata: {name: web, namespace: shop}      # applies to the service shop/web
//! spec:
//!   backendRefs:                              # a service-wide 80/20 split across clusters
//!     - {cluster: east, weight: 80}
//!     - {cluster: west, weight: 20}
//!   rules:                                    # per-route overrides, first match wins
//!     - matches: [{path: {type: PathPrefix, value: /beta}}]
//!       backendRefs: [{cluster: west, weight: 1}]
//!   timeouts: {connect: 1s, request: 5s}
//!   retries: {attempts: 2}
//!   authorization:
//!     allowedCallers: ["spiffe://east.example/ns/shop/sa/frontend"]
//! ```

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fedmesh.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    shortname = "tp",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// Weighted split of the whole service across exporting clusters. Empty: locality-aware
    /// routing (same zone, same region, then other clusters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<ClusterBackendRef>,
    /// HTTP rules, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RouteRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterBackendRef {
    /// A cluster exporting the service.
    pub cluster: String,
    /// Relative weight (Gateway API semantics; 0 sends nothing).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<ClusterBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// Only `PathPrefix` is supported.
    #[serde(rename = "type", default = "path_prefix")]
    pub type_: String,
    pub value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// e.g. `1s` — establishing a connection to an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    /// e.g. `5s` — a whole HTTP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    pub attempts: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// SPIFFE IDs allowed to call the service; an ID ending in `/*` allows a prefix. When a policy
    /// lists callers, everyone else is denied.
    #[serde(default)]
    pub allowed_callers: Vec<String>,
}
