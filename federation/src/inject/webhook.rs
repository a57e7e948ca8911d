//! The mutating admission webhook: the Kubernetes API server sends it each Pod created in a
//! namespace labelled `fedmesh.io/inject=enabled` (the MutatingWebhookConfiguration's
//! `namespaceSelector`), bare Pods included, and it answers with the JSON patch that injects the
//! sidecar ([`super::inject_pod`]) — as a native sidecar (an init container with `restartPolicy:
//! Always`) on Kubernetes 1.29 and later. A Deployment, StatefulSet or DaemonSet sent to it gets its
//! pod template injected.
//!
//! It is served over HTTPS by the control plane with a certificate from the cluster's own CA
//! naming the hosts the API server calls it by (`--webhook-host`, e.g.
//! `fedmesh-control-plane.fedmesh-system.svc`): the configuration's `caBundle` is the trust
//! domain's bundle (`fedmesh ca bundle --format pem`). The certificate is renewed at half its
//! life, and after a CA rotation.
//!
//! A pod it cannot inject (host network, an app container running as the sidecar's uid) is
//! refused with the reason and what to do; a pod annotated `fedmesh.io/inject: disabled` passes
//! unchanged. With `failurePolicy: Fail` (the kind manifests), no pod of an injected namespace
//! starts outside the mesh while the webhook is down; they are created once it is back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use base64::Engine;
use fedmesh_api::SpiffeId;
use fedmesh_trust::ca::TrustDomainCa;
use fedmesh_trust::tls::MeshIdentity;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{InjectOptions, inject_object};

/// What the webhook serves with.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    /// The names (or IP addresses) the API server reaches the webhook by.
    pub hosts: Vec<String>,
    pub inject: InjectOptions,
    /// The MutatingWebhookConfiguration whose `caBundle` the control plane keeps set to its
    /// trust bundle (on Kubernetes).
    pub configuration: String,
}

/// Keeps the `caBundle` of every webhook of the MutatingWebhookConfiguration `name` equal to the
/// trust domain's X.509 authorities (PEM), now and after each CA rotation, until `shutdown`. A
/// configuration that does not exist (yet), or could not be written, is tried again every 10 s.
pub async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    ca: Arc<TrustDomainCa>,
    shutdown: CancellationToken,
) {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client);
    let mut rotations = ca.subscribe_bundle();
    let mut said_missing = false;
    loop {
        let pem = ca.bundle().x509_authorities_pem().into_bytes();
        let result = async {
            let Some(mut mwc) = api.get_opt(&name).await? else {
                return Ok::<_, kube::Error>(false);
            };
            let mut changed = false;
            for w in mwc.webhooks.iter_mut().flatten() {
                if w.client_config.ca_bundle.as_ref().map(|b| &b.0) != Some(&pem) {
                    w.client_config.ca_bundle = Some(ByteString(pem.clone()));
                    changed = true;
                }
            }
            if changed {
                api.replace(&name, &Default::default(), &mwc).await?;
                tracing::info!(configuration = %name, "set the webhook configuration's caBundle to this cluster's CA");
            }
            Ok(true)
        }
        .await;
        let retry = match result {
            Ok(true) => false,
            Ok(false) => {
                if !said_missing {
                    tracing::info!(configuration = %name, "no MutatingWebhookConfiguration of that name yet; its caBundle is set once it exists");
                    said_missing = true;
                }
                true
            }
            Err(e) => {
                tracing::warn!(configuration = %name, error = %e, "cannot set the webhook configuration's caBundle (RBAC: get and update mutatingwebhookconfigurations); retrying");
                true
            }
        };
        let wait = if retry {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            r = rotations.changed() => if r.is_err() { return },
        }
    }
}

/// Kubernetes 1.29 runs init containers with `restartPolicy: Always` as sidecars by default.
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let minor: u32 = minor.trim_end_matches('+').parse().unwrap_or(0);
    major == "1" && minor >= 29
}

/// Binds and serves the webhook until `shutdown`, presenting a certificate of `ca` for `id` and
/// the configured hosts. Returns the address it listens on.
pub async fn serve(
    config: WebhookConfig,
    ca: Arc<TrustDomainCa>,
    id: SpiffeId,
    shutdown: CancellationToken,
) -> Result<SocketAddr, String> {
    let identity = MeshIdentity::new();
    issue(&ca, &id, &config.hosts, &identity)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {} for the webhook: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let tls = identity.server_config_without_client_auth();
    let http = fedmesh_trust::http_server::HttpListener::new(listener, Some(tls), "webhook")
        .map_err(|e| e.to_string())?;
    let router = axum::Router::new()
        .route("/inject", post(review))
        .with_state(Arc::new(config.inject.clone()));
    tokio::spawn(fedmesh_trust::http_server::serve(
        http,
        router,
        fedmesh_trust::http_server::Versions::Http1And2,
        "webhook",
        shutdown.clone(),
    ));
    // Renewed at half its remaining life, and at once after a CA rotation.
    let mut rotations = ca.subscribe_bundle();
    tokio::spawn(async move {
        loop {
            let left = identity
                .svid()
                .and_then(|s| {
                    s.not_after
                        .duration_since(std::time::SystemTime::now())
                        .ok()
                })
                .unwrap_or_default();
            let wait = (left / 2).max(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                r = rotations.changed() => if r.is_err() { return },
            }
            if let Err(e) = issue(&ca, &id, &config.hosts, &identity) {
                tracing::error!(error = %e, "cannot renew the webhook's certificate; retrying");
            }
        }
    });
    tracing::info!(address = %addr, "sidecar injection webhook listening");
    Ok(addr)
}

fn issue(
    ca: &TrustDomainCa,
    id: &SpiffeId,
    hosts: &[String],
    identity: &MeshIdentity,
) -> Result<(), String> {
    let (key, csr) = fedmesh_trust::svid::new_key_and_csr(id).map_err(|e| e.to_string())?;
    let issued = ca
        .sign_serving_cert(&csr, id, hosts, None)
        .map_err(|e| format!("cannot issue the webhook's certificate: {e}"))?;
    identity
        .set_svid_parts(
            issued.chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| e.to_string())
}

/// One AdmissionReview (`admission.k8s.io/v1`): allowed with the patch that injects, allowed
/// unchanged, or refused with the reason.
async fn review(
    State(options): State<Arc<InjectOptions>>,
    Json(review): Json<Value>,
) -> Json<Value> {
    let request = &review["request"];
    let uid = request["uid"].clone();
    let answer = |response: Value| {
        let mut response = response;
        response["uid"] = uid.clone();
        Json(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }))
    };
    let mut object = request["object"].clone();
    let before = object.clone();
    let what = format!(
        "{} {}/{}",
        request["kind"]["kind"].as_str().unwrap_or("object"),
        request["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"]
            .as_str()
            .or_else(|| object["metadata"]["generateName"].as_str())
            .unwrap_or("?"),
    );
    match inject_object(&mut object, &options) {
        Ok(0) => answer(json!({"allowed": true})),
        Ok(_) => {
            let patch = patch(&before, &object);
            tracing::info!(object = %what, "injected the sidecar");
            answer(json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
            }))
        }
        Err(e) => {
            tracing::warn!(object = %what, error = %e, "refused a pod the sidecar cannot be injected into");
            answer(json!({
                "allowed": false,
                "status": {"code": 400, "message": format!("fedmesh: {e:#}")},
            }))
        }
    }
}

/// The JSON patch from `before` to `after`, which differ only in `spec` and the annotations.
fn patch(before: &Value, after: &Value) -> Value {
    let mut ops = vec![json!({"op": "replace", "path": "/spec", "value": after["spec"]})];
    if before["metadata"]["annotations"] != after["metadata"]["annotations"]
        && !after["metadata"]["annotations"].is_null()
    {
        // `add` sets a member whether or not it exists.
        ops.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": after["metadata"]["annotations"],
        }));
    }
    Value::Array(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_from_kubernetes_1_29() {
        assert!(!supports_native_sidecars("1", "28"));
        assert!(supports_native_sidecars("1", "29"));
        assert!(supports_native_sidecars("1", "34+"));
        assert!(!supports_native_sidecars("1", ""));
    }

    #[test]
    fn the_patch_replaces_the_spec_and_sets_the_annotations() {
        let before = json!({"kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app"}]}});
        let mut pod = before.clone();
        assert_eq!(
            inject_object(&mut pod, &InjectOptions::default()).unwrap(),
            1
        );
        let p = patch(&before, &pod);
        assert_eq!(p[0]["op"], "replace");
        assert_eq!(p[0]["path"], "/spec");
        assert_eq!(p[1]["path"], "/metadata/annotations");
        assert_eq!(p[1]["value"]["fedmesh.io/inject"], "injected");
    }
}
