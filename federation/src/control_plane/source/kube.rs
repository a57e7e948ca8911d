//! The Kubernetes source and writer (kube-rs).
//!
//! Reads: Services, EndpointSlices and ServiceExports in all namespaces, with watchers. Nothing is
//! published until all three have completed their initial list, so a restarted control plane
//! never withdraws an export it simply has not seen yet.
//!
//! Writes (server-side apply, field manager `fedmesh`, only objects labelled as managed by
//! fedmesh): a ServiceImport per service exported anywhere in the clusterset (in the service's
//! namespace, which must exist here — namespace sameness), a derived EndpointSlice per remote
//! exporting cluster pointing at that cluster's gateways, and the status conditions of this
//! cluster's ServiceExports.
//!
//! RBAC (least privilege, see deploy/multicluster): get/list/watch services, endpointslices,
//! serviceexports; patch serviceexports/status; get/list/watch/create/patch/delete
//! serviceimports, serviceimports/status and endpointslices labelled managed-by fedmesh.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_api::authn::{PeerAuthentication, RequestAuthentication};
use fedmesh_api::authz::AuthorizationPolicy;
use fedmesh_api::federation::FederatedTrustDomain;
use fedmesh_api::gateway::{GRPCRoute, HTTPRoute};
use fedmesh_api::mcs::{
    LABEL_MANAGED_BY, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, MANAGED_BY, ServiceExport,
    ServiceImport,
};
use fedmesh_api::pb::federation as pb;
use fedmesh_api::policy::TrafficPolicy;
use fedmesh_api::rollout::Rollout;
use fedmesh_api::{ClusterName, ServiceKey};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{LocalObjects, key_of};

const FIELD_MANAGER: &str = "fedmesh";
/// How many kinds the source watches; it publishes once every one has listed.
const WATCHED_KINDS: usize = 11;
/// Kinds whose CRD may be absent.
const OPTIONAL_KINDS: [&str; 8] = [
    "federatedtrustdomains",
    "rollouts",
    "trafficpolicies",
    "authorizationpolicies",
    "peerauthentications",
    "requestauthentications",
    "httproutes",
    "grpcroutes",
];

#[derive(Default)]
struct State {
    services: BTreeMap<ServiceKey, Service>,
    slices: BTreeMap<String, EndpointSlice>,
    exports: BTreeMap<ServiceKey, ServiceExport>,
    policies: BTreeMap<ServiceKey, TrafficPolicy>,
    authz_policies: BTreeMap<ServiceKey, AuthorizationPolicy>,
    peer_authns: BTreeMap<ServiceKey, PeerAuthentication>,
    request_authns: BTreeMap<ServiceKey, RequestAuthentication>,
    http_routes: BTreeMap<ServiceKey, HTTPRoute>,
    grpc_routes: BTreeMap<ServiceKey, GRPCRoute>,
    federated_tds: BTreeMap<String, FederatedTrustDomain>,
    rollouts: BTreeMap<ServiceKey, Rollout>,
    /// Which watchers have completed their initial list.
    ready: BTreeSet<&'static str>,
}

pub struct KubeSource {
    objects: watch::Sender<Arc<LocalObjects>>,
    initialized: watch::Sender<bool>,
}

impl KubeSource {
    /// Starts the three watchers on `client`.
    pub fn start(client: kube::Client, shutdown: CancellationToken) -> Arc<Self> {
        let me = Arc::new(Self {
            objects: watch::Sender::new(Arc::new(LocalObjects::default())),
            initialized: watch::Sender::new(false),
        });
        let state = Arc::new(Mutex::new(State::default()));
        spawn_watch::<Service>(
            Api::all(client.clone()),
            "services",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<EndpointSlice>(
            Api::all(client.clone()),
            "endpointslices",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<ServiceExport>(
            Api::all(client.clone()),
            "serviceexports",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<TrafficPolicy>(
            Api::all(client.clone()),
            "trafficpolicies",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<Rollout>(
            Api::all(client.clone()),
            "rollouts",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<AuthorizationPolicy>(
            Api::all(client.clone()),
            "authorizationpolicies",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<PeerAuthentication>(
            Api::all(client.clone()),
            "peerauthentications",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<RequestAuthentication>(
            Api::all(client.clone()),
            "requestauthentications",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<HTTPRoute>(
            Api::all(client.clone()),
            "httproutes",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<GRPCRoute>(
            Api::all(client.clone()),
            "grpcroutes",
            state.clone(),
            me.clone(),
            shutdown.clone(),
        );
        spawn_watch::<FederatedTrustDomain>(
            Api::all(client),
            "federatedtrustdomains",
            state,
            me.clone(),
            shutdown,
        );
        me
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<LocalObjects>> {
        self.objects.subscribe()
    }

    /// True once every watcher listed its objects.
    pub fn initialized(&self) -> watch::Receiver<bool> {
        self.initialized.subscribe()
    }

    fn publish(&self, st: &State) {
        if st.ready.len() < WATCHED_KINDS {
            return;
        }
        let objs = LocalObjects {
            services: st.services.clone(),
            slices: st.slices.clone(),
            exports: st.exports.clone(),
            policies: st.policies.clone(),
            rollouts: st.rollouts.clone(),
            authz_policies: st.authz_policies.clone(),
            peer_authns: st.peer_authns.clone(),
            request_authns: st.request_authns.clone(),
            http_routes: st.http_routes.clone(),
            grpc_routes: st.grpc_routes.clone(),
            federated_tds: st.federated_tds.clone(),
        };
        self.objects.send_if_modified(|cur| {
            if **cur == objs {
                false
            } else {
                *cur = Arc::new(objs);
                true
            }
        });
        self.initialized.send_replace(true);
    }
}

/// How a watched kind lands in the state.
trait Watched:
    kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    fn insert(st: &mut State, o: Self);
    fn remove(st: &mut State, o: &Self);
    fn clear(st: &mut State);
}

impl Watched for Service {
    fn insert(st: &mut State, o: Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.services.insert(k, o);
        }
    }
    fn remove(st: &mut State, o: &Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.services.remove(&k);
        }
    }
    fn clear(st: &mut State) {
        st.services.clear();
    }
}

impl Watched for EndpointSlice {
    fn insert(st: &mut State, o: Self) {
        // Our own derived slices describe remote clusters; they are not local endpoints.
        let managed = o
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_MANAGED_BY))
            .is_some_and(|v| v == MANAGED_BY);
        if managed {
            return;
        }
        let key = format!(
            "{}/{}",
            o.metadata.namespace.as_deref().unwrap_or("default"),
            o.metadata.name.as_deref().unwrap_or("")
        );
        st.slices.insert(key, o);
    }
    fn remove(st: &mut State, o: &Self) {
        let key = format!(
            "{}/{}",
            o.metadata.namespace.as_deref().unwrap_or("default"),
            o.metadata.name.as_deref().unwrap_or("")
        );
        st.slices.remove(&key);
    }
    fn clear(st: &mut State) {
        st.slices.clear();
    }
}

/// A namespaced kind kept in one map of the state by its namespace/name.
macro_rules! watched_by_key {
    ($kind:ty, $field:ident) => {
        impl Watched for $kind {
            fn insert(st: &mut State, o: Self) {
                let Some(k) = key_of(&o.metadata) else { return };
                st.$field.insert(k, o);
            }
            fn remove(st: &mut State, o: &Self) {
                if let Some(k) = key_of(&o.metadata) {
                    st.$field.remove(&k);
                }
            }
            fn clear(st: &mut State) {
                st.$field.clear();
            }
        }
    };
}
watched_by_key!(AuthorizationPolicy, authz_policies);
watched_by_key!(PeerAuthentication, peer_authns);
watched_by_key!(RequestAuthentication, request_authns);
watched_by_key!(Rollout, rollouts);

impl Watched for FederatedTrustDomain {
    fn insert(st: &mut State, o: Self) {
        if let Some(name) = o.metadata.name.clone() {
            st.federated_tds.insert(name, o);
        }
    }
    fn remove(st: &mut State, o: &Self) {
        if let Some(name) = &o.metadata.name {
            st.federated_tds.remove(name);
        }
    }
    fn clear(st: &mut State) {
        st.federated_tds.clear();
    }
}

impl Watched for TrafficPolicy {
    fn insert(st: &mut State, o: Self) {
        // Checked by the control plane, which keeps the last valid version of each policy in
        // force and says what is wrong on the policy's status.
        let Some(k) = key_of(&o.metadata) else { return };
        st.policies.insert(k, o);
    }
    fn remove(st: &mut State, o: &Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.policies.remove(&k);
        }
    }
    fn clear(st: &mut State) {
        st.policies.clear();
    }
}

impl Watched for HTTPRoute {
    fn insert(st: &mut State, o: Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.http_routes.insert(k, o);
        }
    }
    fn remove(st: &mut State, o: &Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.http_routes.remove(&k);
        }
    }
    fn clear(st: &mut State) {
        st.http_routes.clear();
    }
}

impl Watched for GRPCRoute {
    fn insert(st: &mut State, o: Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.grpc_routes.insert(k, o);
        }
    }
    fn remove(st: &mut State, o: &Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.grpc_routes.remove(&k);
        }
    }
    fn clear(st: &mut State) {
        st.grpc_routes.clear();
    }
}

impl Watched for ServiceExport {
    fn insert(st: &mut State, o: Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.exports.insert(k, o);
        }
    }
    fn remove(st: &mut State, o: &Self) {
        if let Some(k) = key_of(&o.metadata) {
            st.exports.remove(&k);
        }
    }
    fn clear(st: &mut State) {
        st.exports.clear();
    }
}

/// Patches the status of the namespaced object `ns/name` of kind `K`.
async fn patch_status<K>(
    client: kube::Client,
    ns: &str,
    name: &str,
    params: &PatchParams,
    patch: &Patch<&serde_json::Value>,
) -> kube::Result<()>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client, ns)
        .patch_status(name, params, patch)
        .await
        .map(|_| ())
}

fn spawn_watch<K: Watched>(
    api: Api<K>,
    name: &'static str,
    state: Arc<Mutex<State>>,
    source: Arc<KubeSource>,
    shutdown: CancellationToken,
) where
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        // Objects of an in-progress (re)list; swapped in at InitDone so a relist never shows a
        // partial picture.
        let mut relist: Option<Vec<K>> = None;
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = stream.next() => ev,
            };
            let Some(ev) = ev else { return };
            match ev {
                Ok(watcher::Event::Init) => relist = Some(Vec::new()),
                Ok(watcher::Event::InitApply(o)) => relist.get_or_insert_with(Vec::new).push(o),
                Ok(watcher::Event::InitDone) => {
                    let objs = relist.take().unwrap_or_default();
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    K::clear(&mut st);
                    for o in objs {
                        K::insert(&mut st, o);
                    }
                    if st.ready.insert(name) {
                        tracing::info!(kind = name, "initial list complete");
                    }
                    source.publish(&st);
                }
                Ok(watcher::Event::Apply(o)) => {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    K::insert(&mut st, o);
                    source.publish(&st);
                }
                Ok(watcher::Event::Delete(o)) => {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    K::remove(&mut st, &o);
                    source.publish(&st);
                }
                // An optional CRD (ours, or Gateway API's) may not be installed: that simply
                // means none of those objects.
                Err(watcher::Error::InitialListFailed(kube::Error::Api(e)))
                    if e.code == 404 && OPTIONAL_KINDS.contains(&name) =>
                {
                    {
                        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                        if st.ready.insert(name) {
                            tracing::info!(
                                kind = name,
                                "this CRD is not installed, so there are none (TrafficPolicy, AuthorizationPolicy: `fedmesh crds | kubectl apply -f -`; HTTPRoute/GRPCRoute: the Gateway API standard CRDs)"
                            );
                        }
                        source.publish(&st);
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Err(e) => {
                    // The watcher retries by itself; keep serving the last state meanwhile.
                    tracing::warn!(kind = name, error = %e, "Kubernetes watch error; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
}

/// Writes ServiceImports, derived EndpointSlices and ServiceExport status.
pub struct KubeWriter {
    client: kube::Client,
    cluster: ClusterName,
    /// What we last wrote, to skip unchanged objects.
    written: tokio::sync::Mutex<BTreeMap<String, serde_json::Value>>,
    /// A write, delete or list failed this round: try again after `backoff`.
    failed: std::sync::atomic::AtomicBool,
    /// An import waits for its namespace to be created here: look again now and then.
    waiting_namespace: std::sync::atomic::AtomicBool,
    backoff: std::sync::Mutex<Duration>,
}

/// The first retry after a failed write, doubled up to [`MAX_BACKOFF`] while writes keep failing.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often imports into namespaces this cluster does not have are tried again.
const NAMESPACE_RECHECK: Duration = Duration::from_secs(30);

fn managed_labels(service: &ServiceKey) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_SERVICE_NAME.to_string(), service.name.to_string()),
    ])
}

impl KubeWriter {
    pub fn new(client: kube::Client, cluster: ClusterName) -> Self {
        Self {
            client,
            cluster,
            written: Default::default(),
            failed: Default::default(),
            waiting_namespace: Default::default(),
            backoff: std::sync::Mutex::new(MIN_BACKOFF),
        }
    }

    /// When to write again although nothing changed: after a round in which something failed
    /// (a 403 until RBAC is fixed, the API server unreachable), with backoff, or while an import
    /// waits for its namespace. None when every write went through.
    pub fn retry_after(&self) -> Option<Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        let failed = self.failed.swap(false, Relaxed);
        let waiting = self.waiting_namespace.swap(false, Relaxed);
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        if failed {
            let after = *backoff;
            *backoff = (after * 2).min(MAX_BACKOFF);
            return Some(after);
        }
        *backoff = MIN_BACKOFF;
        waiting.then_some(NAMESPACE_RECHECK)
    }

    /// A write of `key` failed: it is written again on the next round.
    async fn failed(&self, key: &str) {
        self.forget(key).await;
        self.note_failure();
    }

    fn note_failure(&self) {
        self.failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn changed(&self, key: &str, value: &serde_json::Value) -> bool {
        let mut w = self.written.lock().await;
        if w.get(key) == Some(value) {
            return false;
        }
        w.insert(key.to_string(), value.clone());
        true
    }

    async fn forget(&self, key: &str) {
        self.written.lock().await.remove(key);
    }

    /// Makes the cluster's ServiceImports and derived EndpointSlices match `imports`.
    pub async fn sync_imports(
        &self,
        imports: &[ServiceImport],
        clusterset: &super::super::state::ClusterSet,
    ) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut wanted_imports = BTreeSet::new();
        let mut wanted_slices = BTreeSet::new();
        for si in imports {
            let (Some(ns), Some(name)) = (si.metadata.namespace.clone(), si.metadata.name.clone())
            else {
                continue;
            };
            let Ok(key) = ServiceKey::new(&ns, &name) else {
                continue;
            };
            wanted_imports.insert((ns.clone(), name.clone()));
            let mut obj = si.clone();
            obj.metadata.labels = Some(managed_labels(&key));
            obj.metadata.managed_fields = None;
            let status = obj.status.take();
            let api: Api<ServiceImport> = Api::namespaced(self.client.clone(), &ns);
            let value = serde_json::to_value(&obj).unwrap_or_default();
            if self.changed(&format!("si/{ns}/{name}"), &value).await {
                match api.patch(&name, &params, &Patch::Apply(&obj)).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        tracing::info!(service = %key, "namespace does not exist here; not importing (namespace sameness)");
                        self.forget(&format!("si/{ns}/{name}")).await;
                        self.waiting_namespace
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(service = %key, error = %e, "cannot write ServiceImport; will retry");
                        self.failed(&format!("si/{ns}/{name}")).await;
                        continue;
                    }
                }
            }
            if let Some(status) = status {
                let patch = serde_json::json!({
                    "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                    "kind": "ServiceImport",
                    "status": status,
                });
                if self.changed(&format!("sis/{ns}/{name}"), &patch).await
                    && let Err(e) = api
                        .patch_status(&name, &params, &Patch::Apply(&patch))
                        .await
                {
                    tracing::warn!(service = %key, error = %e, "cannot write ServiceImport status");
                    self.failed(&format!("sis/{ns}/{name}")).await;
                }
            }
            // One derived EndpointSlice per remote exporting cluster: its gateway addresses.
            let Some(import) = clusterset.imports.get(&key) else {
                continue;
            };
            for ic in &import.clusters {
                if ic.cluster == self.cluster.as_str() {
                    continue;
                }
                let Ok(remote) = ClusterName::new(&ic.cluster) else {
                    continue;
                };
                let gateways: Vec<String> = clusterset
                    .clusters
                    .get(&remote)
                    .map(|c| c.gateways.clone())
                    .unwrap_or_default();
                let slice = derived_slice(&key, &remote, import, &gateways);
                let slice_name = slice.metadata.name.clone().unwrap_or_default();
                wanted_slices.insert((ns.clone(), slice_name.clone()));
                let value = serde_json::to_value(&slice).unwrap_or_default();
                if self.changed(&format!("es/{ns}/{slice_name}"), &value).await {
                    let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
                    if let Err(e) = api.patch(&slice_name, &params, &Patch::Apply(&slice)).await {
                        tracing::warn!(service = %key, error = %e, "cannot write derived EndpointSlice");
                        self.failed(&format!("es/{ns}/{slice_name}")).await;
                    }
                }
            }
        }
        self.delete_stale(&wanted_imports, &wanted_slices).await;
    }

    /// Deletes fedmesh-managed ServiceImports and EndpointSlices that are no longer wanted.
    async fn delete_stale(
        &self,
        imports: &BTreeSet<(String, String)>,
        slices: &BTreeSet<(String, String)>,
    ) {
        let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
        let all_si: Api<ServiceImport> = Api::all(self.client.clone());
        match all_si.list(&lp).await {
            Ok(list) => {
                for si in list {
                    let (ns, name) = (
                        si.metadata.namespace.unwrap_or_default(),
                        si.metadata.name.unwrap_or_default(),
                    );
                    if !imports.contains(&(ns.clone(), name.clone())) {
                        let api: Api<ServiceImport> = Api::namespaced(self.client.clone(), &ns);
                        if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
                            tracing::warn!(%ns, %name, error = %e, "cannot delete withdrawn ServiceImport");
                            self.note_failure();
                        } else {
                            tracing::info!(%ns, %name, "deleted withdrawn ServiceImport");
                        }
                        self.forget(&format!("si/{ns}/{name}")).await;
                        self.forget(&format!("sis/{ns}/{name}")).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list ServiceImports");
                self.note_failure();
            }
        }
        let all_es: Api<EndpointSlice> = Api::all(self.client.clone());
        match all_es.list(&lp).await {
            Ok(list) => {
                for es in list {
                    let (ns, name) = (
                        es.metadata.namespace.unwrap_or_default(),
                        es.metadata.name.unwrap_or_default(),
                    );
                    if !slices.contains(&(ns.clone(), name.clone())) {
                        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
                        if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
                            tracing::warn!(%ns, %name, error = %e, "cannot delete withdrawn EndpointSlice");
                            self.note_failure();
                        }
                        self.forget(&format!("es/{ns}/{name}")).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list derived EndpointSlices");
                self.note_failure();
            }
        }
    }

    /// Writes the conditions of this cluster's ServiceExports.
    /// Writes fedmesh's entries of each route's `status.parents` (server-side apply under
    /// fedmesh's field manager leaves other controllers' entries alone).
    pub async fn sync_route_status(
        &self,
        routes: &[(&'static str, ServiceKey, fedmesh_api::gateway::RouteStatus)],
    ) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for (kind, key, status) in routes {
            let (ns, name) = (key.namespace.to_string(), key.name.to_string());
            let patch = serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": kind,
                "status": status,
            });
            let id = format!("route/{kind}/{ns}/{name}");
            if !self.changed(&id, &patch).await {
                continue;
            }
            let result = if *kind == "GRPCRoute" {
                Api::<GRPCRoute>::namespaced(self.client.clone(), &ns)
                    .patch_status(&name, &params, &Patch::Apply(&patch))
                    .await
                    .map(|_| ())
            } else {
                Api::<HTTPRoute>::namespaced(self.client.clone(), &ns)
                    .patch_status(&name, &params, &Patch::Apply(&patch))
                    .await
                    .map(|_| ())
            };
            if let Err(err) = result {
                tracing::warn!(%ns, %name, kind, error = %err, "cannot write route status");
                self.failed(&id).await;
            }
        }
    }

    pub async fn sync_policy_status(
        &self,
        policies: &[(
            &'static str,
            ServiceKey,
            fedmesh_api::policy::TrafficPolicyStatus,
        )],
    ) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for (kind, key, status) in policies {
            let (ns, name) = (key.namespace.to_string(), key.name.to_string());
            let patch = serde_json::json!({
                "apiVersion": "fedmesh.io/v1alpha1",
                "kind": kind,
                "status": status,
            });
            let id = format!("{kind}/{ns}/{name}");
            if !self.changed(&id, &patch).await {
                continue;
            }
            let (c, p) = (self.client.clone(), Patch::Apply(&patch));
            let result = match *kind {
                "AuthorizationPolicy" => {
                    patch_status::<AuthorizationPolicy>(c, &ns, &name, &params, &p).await
                }
                "PeerAuthentication" => {
                    patch_status::<PeerAuthentication>(c, &ns, &name, &params, &p).await
                }
                "RequestAuthentication" => {
                    patch_status::<RequestAuthentication>(c, &ns, &name, &params, &p).await
                }
                _ => patch_status::<TrafficPolicy>(c, &ns, &name, &params, &p).await,
            };
            if let Err(err) = result {
                tracing::warn!(%ns, %name, error = %err, "cannot write {kind} status");
                self.failed(&id).await;
            }
        }
    }

    /// Writes Rollouts' status.
    pub async fn sync_rollout_status(&self, rollouts: &[super::super::rollouts::RolloutView]) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for r in rollouts {
            let patch = serde_json::json!({
                "apiVersion": "fedmesh.io/v1alpha1",
                "kind": "Rollout",
                "status": r.status,
            });
            let id = format!("Rollout/{}/{}", r.namespace, r.name);
            if !self.changed(&id, &patch).await {
                continue;
            }
            let (c, p) = (self.client.clone(), Patch::Apply(&patch));
            if let Err(err) = patch_status::<Rollout>(c, &r.namespace, &r.name, &params, &p).await {
                tracing::warn!(ns = %r.namespace, name = %r.name, error = %err, "cannot write Rollout status");
                self.failed(&id).await;
            }
        }
    }

    /// Writes FederatedTrustDomains' status (cluster-scoped).
    pub async fn sync_federated_status(
        &self,
        statuses: &[(String, fedmesh_api::federation::FederatedTrustDomainStatus)],
    ) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for (name, status) in statuses {
            let patch = serde_json::json!({
                "apiVersion": "fedmesh.io/v1alpha1",
                "kind": "FederatedTrustDomain",
                "status": status,
            });
            let id = format!("FederatedTrustDomain/{name}");
            if !self.changed(&id, &patch).await {
                continue;
            }
            let api: Api<FederatedTrustDomain> = Api::all(self.client.clone());
            if let Err(err) = api.patch_status(name, &params, &Patch::Apply(&patch)).await {
                tracing::warn!(%name, error = %err, "cannot write FederatedTrustDomain status");
                self.failed(&id).await;
            }
        }
    }

    pub async fn sync_export_status(&self, exports: &[ServiceExport]) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for e in exports {
            let (Some(ns), Some(name)) = (e.metadata.namespace.clone(), e.metadata.name.clone())
            else {
                continue;
            };
            let patch = serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport",
                "status": e.status,
            });
            // Compare without transition times (they only move when a condition flips).
            if !self.changed(&format!("se/{ns}/{name}"), &patch).await {
                continue;
            }
            let api: Api<ServiceExport> = Api::namespaced(self.client.clone(), &ns);
            if let Err(err) = api
                .patch_status(&name, &params, &Patch::Apply(&patch))
                .await
            {
                tracing::warn!(%ns, %name, error = %err, "cannot write ServiceExport status");
                self.failed(&format!("se/{ns}/{name}")).await;
            }
        }
    }
}

fn derived_slice(
    key: &ServiceKey,
    remote: &ClusterName,
    import: &pb::Import,
    gateways: &[String],
) -> EndpointSlice {
    let mut labels = managed_labels(key);
    labels.insert(LABEL_SOURCE_CLUSTER.to_string(), remote.to_string());
    // Gateways given as IP:port become endpoints; host names cannot go into an IP slice.
    let addresses: Vec<String> = gateways
        .iter()
        .filter_map(|g| {
            g.rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        })
        .filter(|h| h.parse::<std::net::Ipv4Addr>().is_ok())
        .collect();
    EndpointSlice {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(format!("{}-{}", key.name, remote)),
            namespace: Some(key.namespace.to_string()),
            labels: Some(labels),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            addresses
                .into_iter()
                .map(|a| Endpoint {
                    addresses: vec![a],
                    conditions: Some(k8s_openapi::api::discovery::v1::EndpointConditions {
                        ready: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            import
                .ports
                .iter()
                .map(|p| EndpointPort {
                    name: (!p.name.is_empty()).then(|| p.name.clone()),
                    port: Some(p.port as i32),
                    protocol: Some(p.protocol.clone()),
                    app_protocol: (!p.app_protocol.is_empty()).then(|| p.app_protocol.clone()),
                })
                .collect(),
        ),
    }
}
