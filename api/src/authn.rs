//! How a service's sidecars authenticate what reaches them, in the shape Istio users write
//! (group `fedmesh.io`, version `v1alpha1`):
//!
//! - `PeerAuthentication`: whether a service takes only mTLS from other sidecars (`STRICT`, the
//!   default) or also plain text from callers outside the mesh (`PERMISSIVE`, to migrate a
//!   namespace to mTLS without an outage).
//! - `RequestAuthentication`: the JWTs a service accepts (issuer, audiences, keys), whose claims
//!   AuthorizationPolicies can then require.
//!
//! ```yaml
//! apiVersion: fedmesh.io/v1alpha1
//! kind: PeerAuthentication
//! metadata: {name: migrate, namespace: shop}
//! spec:
//!   targetRefs: [{kind: Service, name: api}]      # none: every service of the namespace
//!   mtls: {mode: PERMISSIVE}                      # STRICT (default) or PERMISSIVE
//! ---
//! apiVersion: fedmesh.io/v1alpha1
//! kind: RequestAuthentication
//! metadata: {name: users, namespace: shop}
//! spec:
//!   targetRefs: [{kind: Service, name: api}]
//!   jwtRules:
//!     - issuer: https://login.example.com
//!       audiences: [shop]
//!       jwksUri: https://login.example.com/.well-known/jwks.json   # or file:///path, or jwks: '{...}'
//!       fromHeaders: [{name: x-jwt}]              # default: Authorization: Bearer
//! ```
//!
//! A service-level PeerAuthentication wins over its namespace's; between two at the same level,
//! STRICT wins. A request to a service with a RequestAuthentication must carry a token that one
//! of its rules validates (unless `allowMissing`), else it is answered 401 with the reason.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::authz::AuthzTargetRef;

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fedmesh.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    shortname = "fpa",
    status = "AuthnStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// The Services it applies to (`kind: Service`). None: every service of the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<AuthzTargetRef>,
    #[serde(default)]
    pub mtls: MtlsSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// `STRICT` (default): only mTLS from sidecars. `PERMISSIVE`: plain text from callers
    /// outside the mesh too, labelled unauthenticated; it never matches an identity-based ALLOW.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["STRICT", "PERMISSIVE"]))]
    pub mode: Option<String>,
}

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fedmesh.io",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    namespaced,
    shortname = "fra",
    status = "AuthnStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// The Services it applies to (`kind: Service`). None: every service of the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<AuthzTargetRef>,
    /// The token must validate under one rule (the one of its issuer).
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
    /// A request without any token passes (unauthenticated; AuthorizationPolicy decides). A
    /// token that does not validate is refused all the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_missing: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRuleSpec {
    /// The token's `iss`.
    pub issuer: String,
    /// The token's `aud` must hold one of these. None: any audience.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the control plane fetches the keys (a JWK Set): `https://`, `http://` or
    /// `file:///path`. Refreshed periodically; the sidecars get the keys with their config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JWK Set itself, as JSON (instead of `jwksUri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers the token may come in. None: `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeaderSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeaderSpec {
    pub name: String,
    /// Stripped from the value before the token (e.g. `"Bearer "`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuthnStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
