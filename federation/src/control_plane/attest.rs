//! Node attestation on Kubernetes, as SPIRE's `k8s_psat`: an agent proves which node it runs on
//! with its pod's projected service-account token (audience [`AUDIENCE`]). The control plane asks
//! the API server (TokenReview) whose token it is, requires the agent's service account and a
//! token bound to a pod, and reads that pod's `spec.nodeName` itself: the agent's word for its
//! node is checked, never taken.
//!
//! The agent, which has no join token to pin our CA with, verifies us with the trust bundle we
//! publish in the ConfigMap [`BUNDLE_CONFIGMAP`] of the system namespace (as Istio publishes
//! `istio-ca-root-cert`), kept current across CA rotation.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;

use fedmesh_trust::ca::TrustDomainCa;

/// The audience an agent's projected token must carry: a token made for another audience (the
/// API server's own, or another system's) is refused, so no other token can be replayed here.
pub const AUDIENCE: &str = "fedmesh";
/// The ConfigMap (system namespace) holding our trust bundle for agents that join.
pub const BUNDLE_CONFIGMAP: &str = "fedmesh-ca-bundle";
/// Its key: the trust domain's SPIFFE bundle (JWK Set JSON).
pub const BUNDLE_KEY: &str = "bundle.spiffe";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const FIELD_MANAGER: &str = "fedmesh-control-plane";

/// Why an agent's service-account token did not prove its node.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("the API server did not accept the service-account token: {0}")]
    NotAuthenticated(String),
    #[error(
        "the token is not for audience {AUDIENCE} (it is for {0:?}); mount a projected serviceAccountToken with audience {AUDIENCE}"
    )]
    Audience(Vec<String>),
    #[error("the token belongs to {got}, not to the agent's service account {want}")]
    ServiceAccount { got: String, want: String },
    #[error(
        "the token is not bound to a pod (a legacy Secret token?); mount a projected serviceAccountToken"
    )]
    NotPodBound,
    #[error("pod {pod} {why}")]
    Pod { pod: String, why: String },
    #[error("pod {pod} runs on node {actual}, not {claimed}")]
    WrongNode {
        pod: String,
        actual: String,
        claimed: String,
    },
    #[error("the Kubernetes API: {0}")]
    Api(String),
}

impl AttestError {
    /// A label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAuthenticated(_) => "token_rejected",
            Self::Audience(_) => "wrong_audience",
            Self::ServiceAccount { .. } => "wrong_service_account",
            Self::NotPodBound => "not_pod_bound",
            Self::Pod { .. } => "pod_gone",
            Self::WrongNode { .. } => "wrong_node",
            Self::Api(_) => "kubernetes_api",
        }
    }
}

/// Checks agents' service-account tokens and nodes against the API server.
pub struct K8sAttestor {
    client: kube::Client,
    /// `system:serviceaccount:<ns>:<name>` of the agents.
    agent_user: String,
}

impl K8sAttestor {
    pub fn new(client: kube::Client, namespace: &str, service_account: &str) -> Self {
        Self {
            client,
            agent_user: format!("system:serviceaccount:{namespace}:{service_account}"),
        }
    }

    /// The pod (`ns/name`) that holds `token`, if the token is an agent's, bound to a live pod
    /// scheduled on `node`.
    pub async fn attest(&self, token: &str, node: &str) -> Result<String, AttestError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AttestError::Api(format!("TokenReview: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AttestError::NotAuthenticated(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| a == AUDIENCE) {
            return Err(AttestError::Audience(audiences));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.agent_user {
            return Err(AttestError::ServiceAccount {
                got: username,
                want: self.agent_user.clone(),
            });
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AttestError::NotPodBound);
        };
        // system:serviceaccount:<ns>:<name>: the pod lives in the service account's namespace.
        let ns = username.split(':').nth(2).unwrap_or_default();
        let pod_ref = format!("{ns}/{pod_name}");
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| AttestError::Api(format!("reading pod {pod_ref}: {e}")))?
            .ok_or_else(|| AttestError::Pod {
                pod: pod_ref.clone(),
                why: "no longer exists".into(),
            })?;
        let gone = |why: &str| AttestError::Pod {
            pod: pod_ref.clone(),
            why: why.into(),
        };
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(gone(
                "was replaced by another pod of that name (the token's pod is gone)",
            ));
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(gone("is being deleted"));
        }
        let actual = pod
            .spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| gone("is not scheduled on any node"))?;
        if actual != node {
            return Err(AttestError::WrongNode {
                pod: pod_ref,
                actual,
                claimed: node.to_string(),
            });
        }
        Ok(pod_ref)
    }

    /// Whether the node still exists: a node deleted from the cluster can no longer renew its
    /// agent's identity.
    pub async fn node_exists(&self, node: &str) -> Result<bool, AttestError> {
        Api::<Node>::all(self.client.clone())
            .get_opt(node)
            .await
            .map(|n| n.is_some())
            .map_err(|e| AttestError::Api(format!("reading node {node}: {e}")))
    }
}

/// Keeps [`BUNDLE_CONFIGMAP`] in `namespace` equal to the CA's bundle (current and prepared
/// authorities), until `shutdown`. A failed write is logged and retried.
pub fn publish_bundle(
    client: kube::Client,
    namespace: String,
    ca: Arc<TrustDomainCa>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
        let mut changes = ca.subscribe_bundle();
        let mut written: Option<String> = None;
        loop {
            let json = ca.bundle().to_json();
            if written.as_ref() != Some(&json) {
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(BUNDLE_CONFIGMAP.into()),
                        namespace: Some(namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/part-of".to_string(),
                            "fedmesh".to_string(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([
                        (BUNDLE_KEY.to_string(), json.clone()),
                        ("trust-domain".to_string(), ca.trust_domain().to_string()),
                    ])),
                    ..Default::default()
                };
                let params = PatchParams::apply(FIELD_MANAGER).force();
                match api
                    .patch(BUNDLE_CONFIGMAP, &params, &Patch::Apply(&cm))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(%namespace, configmap = BUNDLE_CONFIGMAP, "published the trust bundle for agents");
                        written = Some(json);
                    }
                    Err(e) => {
                        tracing::warn!(%namespace, error = %e, "cannot publish the trust bundle for agents; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
        }
    });
}
