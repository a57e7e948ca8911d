//! Trust domains outside the clusterset that a cluster federates with, in the shape SPIRE users
//! write (SPIRE's `ClusterFederatedTrustDomain`; group `fedmesh.io`, version `v1alpha1`):
//!
//! ```yaml
//! apiVersion: fedmesh.io/v1alpha1
//! kind: FederatedTrustDomain
//! metadata: {name: spire-payments}
//! spec:
//!   trustDomain: payments.example
//!   bundleEndpointURL: https://spire.payments.example:8443
//!   bundleEndpointProfile:
//!     type: https_spiffe                      # or https_web (Web PKI, system roots)
//!     endpointSPIFFEID: spiffe://payments.example/spire/server
//!   trustDomainBundle: '{"keys": [...]}'      # https_spiffe: the bundle to trust the first fetch
//! ```
//!
//! The control plane fetches the bundle from the endpoint (each fetched bundle authenticates the
//! next, as the SPIFFE federation spec describes) and hands it to its cluster's workloads with
//! their own; SVIDs of that trust domain are then verified against it. It is cluster-scoped: one
//! namespace's owner must not widen what every workload trusts. Trust domains of the clusterset
//! come from the hub and cannot be named here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fedmesh.io",
    version = "v1alpha1",
    kind = "FederatedTrustDomain",
    shortname = "fftd",
    status = "FederatedTrustDomainStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Trust Domain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.bundleEndpointURL"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FederatedTrustDomainSpec {
    /// The foreign trust domain, e.g. `payments.example`.
    pub trust_domain: String,
    /// Its SPIFFE bundle endpoint (`https://`).
    #[serde(rename = "bundleEndpointURL")]
    pub bundle_endpoint_url: String,
    pub bundle_endpoint_profile: BundleEndpointProfile,
    /// The trust domain's bundle (SPIFFE bundle JSON) to authenticate the first `https_spiffe`
    /// fetch. Later fetches are authenticated by the bundle fetched before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain_bundle: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleEndpointProfile {
    /// `https_spiffe` (the endpoint presents an SVID of the foreign trust domain) or `https_web`
    /// (a Web PKI certificate, verified with the system's roots).
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["https_spiffe", "https_web"]))]
    pub type_: String,
    /// `https_spiffe`: the SPIFFE ID the endpoint must present.
    #[serde(
        rename = "endpointSPIFFEID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_spiffe_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FederatedTrustDomainStatus {
    /// `Accepted` (the spec is usable) and `Ready` (a bundle is held).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
