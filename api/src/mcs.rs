//! The Multi-Cluster Services API (KEP-1645), group `multicluster.x-k8s.io`, version `v1alpha1`:
//! `ServiceExport` (a cluster offers a Service to the clusterset) and `ServiceImport` (the
//! clusterset-wide view of an exported service, present in every cluster).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "multicluster.x-k8s.io";
pub const VERSION: &str = "v1alpha1";
/// Label on derived EndpointSlices: the imported service they belong to.
pub const LABEL_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
/// Label on derived EndpointSlices: the cluster the endpoints come from.
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
/// Label marking objects fedmesh manages (so it never touches anyone else's).
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "fedmesh.io";

/// ServiceExport condition types.
pub mod condition {
    /// The export is well-formed: a Service of the same name exists and can be exported.
    pub const VALID: &str = "Valid";
    /// The export is published to the clusterset and imported by the other clusters.
    pub const READY: &str = "Ready";
    /// The export's properties conflict with another cluster's export of the same service.
    pub const CONFLICT: &str = "Conflict";
}

/// Reasons used on ServiceExport conditions.
pub mod reason {
    pub const EXPORTED: &str = "Exported";
    pub const NO_SERVICE: &str = "NoService";
    pub const INVALID_SERVICE_TYPE: &str = "InvalidServiceType";
    pub const PENDING: &str = "Pending";
    pub const HUB_UNREACHABLE: &str = "HubUnreachable";
    pub const NO_CONFLICTS: &str = "NoConflicts";
    pub const PORT_CONFLICT: &str = "PortConflict";
    pub const TYPE_CONFLICT: &str = "TypeConflict";
    pub const SESSION_AFFINITY_CONFLICT: &str = "SessionAffinityConflict";
}

/// Marks the Service of the same name and namespace as exported to the clusterset. It has no
/// spec (KEP-1645): its existence is the export.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceExport",
    namespaced,
    no_spec,
    status = "ServiceExportStatus",
    shortname = "svcex",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct ServiceExportSpec {}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExportStatus {
    /// `Valid`, `Ready` and `Conflict` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// How a ServiceImport is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceImportType {
    /// One clusterset IP for the service, load-balanced across exporting clusters.
    #[default]
    ClusterSetIP,
    /// No clusterset IP; DNS names the endpoints.
    Headless,
}

/// The clusterset view of an exported service.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceImport",
    namespaced,
    status = "ServiceImportStatus",
    shortname = "svcim",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".spec.ips"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    pub ports: Vec<ServicePort>,
    /// Clusterset IPs allocated in this cluster for the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(rename = "type")]
    pub type_: ServiceImportType,
    /// `None` or `ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportStatus {
    /// The clusters that export this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub cluster: String,
}

/// The CRDs fedmesh uses — ServiceExport, ServiceImport and fedmesh's TrafficPolicy,
/// AuthorizationPolicy, PeerAuthentication, RequestAuthentication, FederatedTrustDomain and
/// Rollout — as
/// multi-document YAML, as `fedmesh crds` prints them.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut out = String::from("# Generated by `fedmesh crds` from fedmesh-api; do not edit.\n");
    for crd in [
        ServiceExport::crd(),
        ServiceImport::crd(),
        crate::policy::TrafficPolicy::crd(),
        crate::authz::AuthorizationPolicy::crd(),
        crate::authn::PeerAuthentication::crd(),
        crate::authn::RequestAuthentication::crd(),
        crate::federation::FederatedTrustDomain::crd(),
        crate::rollout::Rollout::crd(),
    ] {
        out.push_str("---\n");
        // Serializing a derived CRD cannot fail; fall back to JSON (valid YAML) just in case.
        let json = serde_json::to_value(&crd).unwrap_or_default();
        out.push_str(&serde_saphyr::to_string(&json).unwrap_or_else(|_| json.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crds_have_the_mcs_group_version_and_kinds() {
        let e = ServiceExport::crd();
        assert_eq!(e.spec.group, GROUP);
        assert_eq!(e.spec.names.kind, "ServiceExport");
        assert_eq!(e.spec.scope, "Namespaced");
        assert_eq!(e.spec.versions[0].name, VERSION);
        assert!(
            e.spec.versions[0]
                .subresources
                .as_ref()
                .unwrap()
                .status
                .is_some()
        );
        let i = ServiceImport::crd();
        assert_eq!(i.spec.names.kind, "ServiceImport");
        assert_eq!(i.spec.names.short_names, Some(vec!["svcim".to_string()]));
    }

    #[test]
    fn service_import_serializes_like_kep_1645() {
        let mut si = ServiceImport::new(
            "web",
            ServiceImportSpec {
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    protocol: Some("TCP".into()),
                    app_protocol: None,
                    port: 80,
                }],
                ips: vec!["240.240.0.1".into()],
                type_: ServiceImportType::ClusterSetIP,
                session_affinity: None,
                session_affinity_config: None,
            },
        );
        si.status = Some(ServiceImportStatus {
            clusters: vec![ClusterStatus {
                cluster: "east".into(),
            }],
        });
        let v = serde_json::to_value(&si).unwrap();
        assert_eq!(v["apiVersion"], "multicluster.x-k8s.io/v1alpha1");
        assert_eq!(v["spec"]["type"], "ClusterSetIP");
        assert_eq!(v["spec"]["ports"][0]["port"], 80);
        assert_eq!(v["status"]["clusters"][0]["cluster"], "east");
    }

    #[test]
    fn crd_yaml_parses_back() {
        let yaml = crd_yaml();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        let names: Vec<&str> = docs
            .iter()
            .map(|d| {
                assert_eq!(d["kind"], "CustomResourceDefinition");
                d["metadata"]["name"].as_str().unwrap()
            })
            .collect();
        assert_eq!(
            names,
            [
                "serviceexports.multicluster.x-k8s.io",
                "serviceimports.multicluster.x-k8s.io",
                "trafficpolicies.fedmesh.io",
                "authorizationpolicies.fedmesh.io",
                "peerauthentications.fedmesh.io",
                "requestauthentications.fedmesh.io",
                "federatedtrustdomains.fedmesh.io",
                "rollouts.fedmesh.io"
            ]
        );
    }
}
