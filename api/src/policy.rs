//! fedmesh's traffic policy CRD, `TrafficPolicy` (group `fedmesh.io`, version `v1alpha1`): what a
//! mesh does to traffic that Gateway API has no field for. Routing itself — matches, weighted
//! backends across versions and clusters, timeouts, retries — is written as Gateway API
//! `HTTPRoute`/`GRPCRoute` (see `gateway.rs`).
//!
//! A policy attaches to a Service (`targetRef`, or by default the Service of the same name) or to
//! an HTTPRoute/GRPCRoute (optionally one of its rules, by `sectionName`):
//!
//! ```yaml
//! apiVersion: fedmesh.io/v1alpha1
//! kind: TrafficPolicy
//! metadata: {name: reviews, namespace: shop}
//! spec:
//!   targetRef: {kind: Service, name: reviews}     # the default for this name
//!   authorization:
//!     allowedCallers: ["spiffe://east.example/ns/shop/sa/frontend"]
//!   timeouts: {connect: 1s}
//!   faultInjection:                                # callers' sidecars inject
//!     headers: [{name: x-chaos, value: me}]        # only these requests
//!     delay: {fixedDelay: 2s, percentage: 10}
//!     abort: {httpStatus: 503, percentage: 5}
//!   rateLimit: {requests: 100, per: 1s, burst: 20, perCaller: true}   # each endpoint's sidecar
//!   clustersetRateLimit: {requests: 1000, per: 1s}  # across every cluster serving it
//!   circuitBreaker: {maxRequests: 200, maxPendingRequests: 50, maxRetries: 10}
//!   outlierDetection: {consecutiveFailures: 5, baseEjectionTime: 10s, maxEjectionPercent: 50}
//!   loadBalancer: {type: ConsistentHash, consistentHash: {header: x-user}}
//! ```
//!
//! `backendRefs`, `rules`, `retries` and `timeouts.request` are the v1alpha1 routing fields that
//! HTTPRoute replaces: a policy still using them is converted (and says so in its status) while
//! no HTTPRoute or GRPCRoute binds the service.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
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
    status = "TrafficPolicyStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// What the policy applies to. Unset: the Service named like the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    /// Only `connect` (a request's limit is an HTTPRoute rule's `timeouts.request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
    /// A Service target: enforced by each of the service's sidecars on what it admits. A route
    /// target: enforced by each caller's sidecar on the route's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// A limit for the service across every cluster serving it (Service targets): each
    /// cluster's sidecars enforce a share of it, which the hub rebalances by demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusterset_rate_limit: Option<ClustersetRateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Deprecated (use an HTTPRoute with `fedmesh.io` `Cluster` backendRefs): a service-wide
    /// weighted split across exporting clusters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<ClusterBackendRef>,
    /// Deprecated (use HTTPRoute rules): HTTP rules, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RouteRule>,
    /// Deprecated (use an HTTPRoute rule's `retry`): retries of 502/503/504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
}

/// What fedmesh says about a policy: `Accepted` and `ResolvedRefs` conditions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The object a policy attaches to (Gateway API's `LocalPolicyTargetReferenceWithSectionName`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// `""` (core) for a Service, `gateway.networking.k8s.io` for a route.
    #[serde(default)]
    pub group: String,
    /// `Service`, `HTTPRoute` or `GRPCRoute`.
    #[schemars(extend("enum" = ["Service", "HTTPRoute", "GRPCRoute"]))]
    pub kind: String,
    pub name: String,
    /// A route's rule, by its `name` (unset: every rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Faults injected by callers' sidecars, for a share of requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultInjection {
    /// Only requests with every one of these headers (exact values); unset: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// e.g. `2s`.
    pub fixed_delay: String,
    /// The share of requests delayed, 0-100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// The HTTP status answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u32>,
    /// Or, for gRPC, the status code (1-16) answered in trailers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// The share of requests aborted, 0-100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<f64>,
}

/// A token bucket: `requests` per `per`, bursts up to `burst`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    pub requests: u32,
    /// e.g. `1s`, `1m`.
    pub per: String,
    /// Default: `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per caller SPIFFE ID (Service targets only).
    #[serde(default)]
    pub per_caller: bool,
}

/// `requests` per `per` for the service across the clusterset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClustersetRateLimitSpec {
    pub requests: u32,
    /// e.g. `1s`, `1m`.
    pub per: String,
}

/// Limits on what each caller's sidecar sends to the service at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// Failure accrual: consecutive failures eject an endpoint for a time that doubles with each
/// ejection; never more than `maxEjectionPercent` of them at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    /// `LeastRequest` (default), `RoundRobin` or `ConsistentHash`.
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["LeastRequest", "RoundRobin", "ConsistentHash"]))]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHashSpec>,
}

/// The key of a consistent hash: exactly one of these.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The calling workload's identity.
    #[serde(default)]
    pub source_identity: bool,
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
    /// Deprecated (use an HTTPRoute rule's `timeouts.request`): e.g. `5s`, a whole HTTP request.
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
