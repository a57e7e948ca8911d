//! The SPIFFE Workload API over a Unix socket.
//!
//! Every call must carry the `workload.spiffe.io: true` metadata (the spec's guard against
//! browsers and proxies being tricked into calling it), and the caller is attested by its Unix peer
//! credentials against the registration entries. A caller that matches no entry gets
//! `PermissionDenied` and nothing else.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::Stream;
use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::attest::{Caller, UdsPeer};
use super::authority::AuthorityRewrite;
use super::cache::SvidCache;
use super::entries::{RegistrationEntry, Selector};
use super::k8s::K8sAttestor;
use crate::bundle::BundleSet;
use crate::jwt;
use crate::workload_pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::workload_pb::*;

pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long a caller in a pod waits for entry templates to be expanded for its pod.
const TEMPLATE_EXPANSION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// An attested caller: its selectors (kept for the life of a stream, so entries that change are
/// matched again) and the entries it matched.
struct Attested {
    selectors: Arc<BTreeSet<Selector>>,
    entries: Vec<Arc<RegistrationEntry>>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct WorkloadApi {
    cache: Arc<SvidCache>,
    /// Adds `k8s:*` selectors to callers in pods (`fedmesh agent --k8s-node`).
    k8s: Option<Arc<K8sAttestor>>,
    /// Cancelled at shutdown: ends the streams, which would otherwise hold the server open.
    closing: CancellationToken,
}

impl WorkloadApi {
    pub fn new(cache: Arc<SvidCache>, closing: CancellationToken) -> Self {
        Self {
            cache,
            k8s: None,
            closing,
        }
    }

    /// Attests callers in Kubernetes pods too.
    pub fn with_k8s(mut self, attestor: Arc<K8sAttestor>) -> Self {
        self.k8s = Some(attestor);
        self
    }

    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// Checks the security header, attests the caller and returns its selectors with the
    /// entries they match now (at least one).
    async fn attest<T>(&self, req: &Request<T>) -> Result<Attested, Status> {
        match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
            Some(Ok("true")) => {}
            _ => {
                return Err(Status::invalid_argument(
                    "security header missing from request",
                ));
            }
        }
        let denied = || Status::permission_denied("no identity issued");
        let peer = req.extensions().get::<UdsPeer>();
        let cred = peer.and_then(|i| i.uds.peer_cred).ok_or_else(|| {
            tracing::warn!("Workload API call without Unix peer credentials");
            denied()
        })?;
        let caller = Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        };
        // Subscribed before anything is matched, so no change of the entries is missed.
        let mut changes = self.cache.subscribe();
        let mut selectors = caller.selectors();
        let mut in_pod = false;
        if let Some(k8s) = &self.k8s {
            match k8s.selectors(caller.pid).await {
                Ok(s) => {
                    in_pod = !s.is_empty();
                    selectors.extend(s);
                }
                Err(e) => {
                    tracing::warn!(uid = caller.uid, pid = ?caller.pid, error = %e, "Workload API caller refused");
                    return Err(denied());
                }
            }
        }
        // What was read from /proc/<pid> must have been the caller's: its process still lives,
        // so the pid was not reused by another one meanwhile.
        let uses_proc = in_pod || selectors.iter().any(|s| matches!(s, Selector::UnixPath(_)));
        if uses_proc {
            match peer.and_then(|i| i.process.as_ref()) {
                Some(p) if p.alive() => {}
                Some(_) => {
                    tracing::warn!(uid = caller.uid, pid = ?caller.pid, "Workload API caller refused: the process that connected has exited (its connection is used by another)");
                    return Err(denied());
                }
                None => {
                    tracing::warn!(uid = caller.uid, pid = ?caller.pid, "Workload API caller refused: no handle on the calling process (pidfd needs Linux 5.3), so what /proc says of its pid cannot be trusted");
                    return Err(denied());
                }
            }
        }
        let mut matched = self.matching(&selectors);
        if matched.is_empty() && in_pod {
            // The pod may have just been learned of: its templated entry follows in a moment.
            let deadline = tokio::time::Instant::now() + TEMPLATE_EXPANSION_WAIT;
            while matched.is_empty()
                && tokio::time::timeout_at(deadline, changes.changed())
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                matched = self.matching(&selectors);
            }
        }
        if matched.is_empty() {
            let selectors: Vec<String> = selectors.iter().map(|s| s.to_string()).collect();
            tracing::info!(uid = caller.uid, gid = caller.gid, pid = ?caller.pid, exe = ?caller.exe(), ?selectors, "Workload API caller matches no registration entry");
            return Err(denied());
        }
        Ok(Attested {
            selectors: Arc::new(selectors),
            entries: matched,
        })
    }

    /// The entries `selectors` match now.
    fn matching(&self, selectors: &BTreeSet<Selector>) -> Vec<Arc<RegistrationEntry>> {
        self.cache
            .entries()
            .iter()
            .filter(|e| e.matches(selectors))
            .cloned()
            .collect()
    }

    fn x509_response(&self, entries: &[Arc<RegistrationEntry>]) -> Option<X509svidResponse> {
        let bundles = self.cache.bundles();
        let td = self.cache.signer().trust_domain();
        let own = bundles
            .get(&td)
            .map(|b| b.x509_authorities_der())
            .unwrap_or_default();
        let svids: Vec<X509svid> = entries
            .iter()
            .filter_map(|e| {
                let svid = self.cache.svid(e)?;
                Some(X509svid {
                    spiffe_id: svid.id.to_string(),
                    x509_svid: svid.chain.iter().flat_map(|c| c.iter().copied()).collect(),
                    x509_svid_key: svid.key.secret_pkcs8_der().to_vec(),
                    bundle: own.clone(),
                    hint: e.hint.clone(),
                })
            })
            .collect();
        if svids.is_empty() {
            return None;
        }
        Some(X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: x509_bundle_map(&bundles, Some(&td)),
        })
    }
}

fn x509_bundle_map(
    bundles: &BundleSet,
    except: Option<&fedmesh_api::TrustDomain>,
) -> HashMap<String, Vec<u8>> {
    bundles
        .iter()
        .filter(|b| Some(b.trust_domain()) != except && !b.x509_authorities().is_empty())
        .map(|b| (b.trust_domain().id_string(), b.x509_authorities_der()))
        .collect()
}

/// A stream that sends `make()` now and again after each cache change, skipping repeats, until
/// the server closes.
fn change_stream<T, F>(cache: &SvidCache, closing: CancellationToken, make: F) -> ResponseStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn() -> Option<T> + Send + Sync + 'static,
{
    let rx = cache.subscribe();
    let state = (rx, make, None::<T>, closing);
    Box::pin(futures::stream::unfold(
        state,
        |(mut rx, make, last, closing)| async move {
            loop {
                if let Some(msg) = make()
                    && last.as_ref() != Some(&msg)
                {
                    return Some((Ok(msg.clone()), (rx, make, Some(msg), closing)));
                }
                tokio::select! {
                    changed = rx.changed() => changed.ok()?,
                    _ = closing.cancelled() => return None,
                }
            }
        },
    ))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.attest(&request).await?.selectors;
        let me = self.clone();
        // Matched again on every change: a reloaded entries file or a template expanded for
        // this pod reaches open streams.
        Ok(Response::new(change_stream(
            &self.cache,
            self.closing.clone(),
            move || me.x509_response(&me.matching(&selectors)),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.attest(&request).await?;
        let cache = self.cache.clone();
        Ok(Response::new(change_stream(
            &self.cache,
            self.closing.clone(),
            move || {
                Some(X509BundlesResponse {
                    crl: Vec::new(),
                    bundles: x509_bundle_map(&cache.bundles(), None),
                })
            },
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let entries = self.attest(&request).await?.entries;
        let req = request.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let wanted: Vec<_> = if req.spiffe_id.is_empty() {
            entries
        } else {
            let id = fedmesh_api::SpiffeId::new(&req.spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
            let found: Vec<_> = entries.into_iter().filter(|e| e.spiffe_id == id).collect();
            if found.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity issued for {id}"
                )));
            }
            found
        };
        let mut svids = Vec::with_capacity(wanted.len());
        let mut seen = std::collections::HashSet::new();
        for e in wanted {
            if !seen.insert(e.spiffe_id.clone()) {
                continue;
            }
            let token = self
                .cache
                .signer()
                .sign_jwt(e.spiffe_id.clone(), req.audience.clone(), e.ttl)
                .await
                .map_err(|err| Status::unavailable(format!("cannot sign JWT-SVID: {err}")))?;
            svids.push(Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.attest(&request).await?;
        let cache = self.cache.clone();
        Ok(Response::new(change_stream(
            &self.cache,
            self.closing.clone(),
            move || {
                Some(JwtBundlesResponse {
                    bundles: cache
                        .bundles()
                        .iter()
                        .map(|b| (b.trust_domain().id_string(), b.jwt_jwks_json().into_bytes()))
                        .collect(),
                })
            },
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.attest(&request).await?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let validated = jwt::validate(
            &req.svid,
            &req.audience,
            &self.cache.bundles(),
            SystemTime::now(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(json_object_to_struct(validated.claims)),
        }))
    }
}

fn json_object_to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(json_object_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "another process is already serving the Workload API on {0}; stop it or pick another --socket"
    )]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Workload API socket {path} would be in an unsafe place: {source}")]
    Directory {
        path: PathBuf,
        source: crate::files::FileError,
    },
}

/// Binds the Workload API socket: a stale socket file left by a crashed agent is replaced, a live
/// one is not. The socket is world-connectable (0666): callers are told apart by peer credentials.
///
/// Its directory is created (0755) if missing and must be one no other user can change
/// ([`crate::files::check_trusted_dir`]): a user who pre-created it, or could rename entries in
/// it, could swap the socket for a fake Workload API handing out their own bundle.
pub fn bind_socket(path: &Path) -> Result<UnixListener, ListenError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if std::fs::symlink_metadata(dir).is_err() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir);
    }
    crate::files::check_trusted_dir(dir).map_err(|source| ListenError::Directory {
        path: path.to_path_buf(),
        source,
    })?;
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    Ok(listener)
}

/// Serves the Workload API on `listener` until `shutdown` resolves; open streams are ended and the
/// socket file is removed.
pub async fn serve(
    listener: UnixListener,
    socket_path: PathBuf,
    cache: Arc<SvidCache>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_with_attestor(listener, socket_path, cache, None, shutdown).await
}

/// Connections one uid may hold open to the socket (mode 0666: every local user can connect, and
/// is attested only once it asks). More is a client bug or an attack, and would spend the
/// agent's file descriptors that every other workload needs.
pub const MAX_CONNECTIONS_PER_UID: usize = 256;

/// Open connections by the caller's uid.
#[derive(Clone, Default)]
struct UidSlots(Arc<std::sync::Mutex<HashMap<u32, usize>>>);

/// One connection of a uid, counted until dropped.
struct UidSlot {
    slots: UidSlots,
    uid: u32,
}

impl UidSlots {
    fn take(&self, uid: u32) -> Option<UidSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(uid).or_default();
        if *n >= MAX_CONNECTIONS_PER_UID {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// [`serve`], attesting callers in Kubernetes pods with `k8s`.
pub async fn serve_with_attestor(
    listener: UnixListener,
    socket_path: PathBuf,
    cache: Arc<SvidCache>,
    k8s: Option<Arc<K8sAttestor>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let closing = CancellationToken::new();
    let close = closing.clone();
    let shutdown = async move {
        shutdown.await;
        close.cancel();
    };
    let slots = UidSlots::default();
    let incoming = UnixListenerStream::new(listener).filter_map(move |s| match s {
        Ok(stream) => {
            let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
            match slots.take(uid) {
                Some(slot) => Some(Ok(crate::limits::Preface::h2(
                    AuthorityRewrite::new(stream).holding(slot),
                ))),
                None => {
                    tracing::debug!(
                        uid,
                        limit = MAX_CONNECTIONS_PER_UID,
                        "Workload API: a uid at its connection limit; closed a new one"
                    );
                    None
                }
            }
        }
        Err(e) => Some(Err(e)),
    });
    let result = crate::grpc::server()
        .add_service(
            match k8s {
                Some(k8s) => WorkloadApi::new(cache, closing).with_k8s(k8s),
                None => WorkloadApi::new(cache, closing),
            }
            .into_service(),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&socket_path);
    result
}
