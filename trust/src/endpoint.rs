//! The SPIFFE bundle endpoint: how trust domains publish their bundle to each other over HTTPS.
//!
//! Two profiles, as the SPIFFE federation spec defines them:
//! - `https_web`: the server has a Web PKI certificate; clients verify it with ordinary roots.
//! - `https_spiffe`: the server presents an SVID; clients verify it against the bundle they
//!   already hold for that trust domain (bootstrapped once, then each fetched bundle authenticates
//!   the next fetch) and check the endpoint's SPIFFE ID.
//!
//! The client refreshes by the bundle's `spiffe_refresh_hint` and keeps the last good bundle when a
//! fetch fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedmesh_api::{SpiffeId, TrustDomain};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::bundle::{BundleSet, BundleUpdate, MAX_BUNDLE_BYTES, SpiffeBundle};
use crate::tls::{Authorizer, MeshIdentity, crypto_provider, handshake_error_message};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections; beyond it a new one is closed at once.
const MAX_CONNECTIONS: usize = 1024;
/// On shutdown, open connections get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(3600);

/// How the endpoint authenticates itself.
pub enum ServerProfile {
    /// `https_web`: a Web PKI certificate chain and its key.
    HttpsWeb {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
    /// `https_spiffe`: the endpoint's own SVID, from its identity (follows rotation).
    HttpsSpiffe { identity: MeshIdentity },
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("bundle endpoint TLS setup: {0}")]
    Tls(String),
    #[error("bundle endpoint URL {url:?} is not usable: {reason}")]
    Url { url: String, reason: String },
    #[error("fetching the bundle of {trust_domain} from {url}: {reason}")]
    Fetch {
        trust_domain: TrustDomain,
        url: String,
        reason: String,
    },
    #[error(
        "the https_spiffe profile needs a bootstrap bundle for {0} to authenticate the endpoint; pass one"
    )]
    NoBootstrapBundle(TrustDomain),
}

/// Serves `bundle` (following its updates) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    profile: ServerProfile,
    bundle: watch::Receiver<Arc<SpiffeBundle>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), EndpointError> {
    let config = match profile {
        ServerProfile::HttpsWeb { chain, key } => {
            let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| EndpointError::Tls(e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| EndpointError::Tls(e.to_string()))?;
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        }
        ServerProfile::HttpsSpiffe { identity } => identity.server_config_without_client_auth(),
    };
    let acceptor = TlsAcceptor::from(config);
    let server = crate::listen::Server::new("bundle endpoint", MAX_CONNECTIONS, DRAIN_TIMEOUT);
    let stop = CancellationToken::new();
    let serving = server.serve(
        listener,
        stop.clone(),
        |peer| tracing::debug!(%peer, "bundle endpoint: too many connections; closed a new one"),
        move |tcp, peer, graceful| {
            let (acceptor, bundle) = (acceptor.clone(), bundle.clone());
            async move { serve_connection(acceptor, tcp, peer, bundle, graceful).await }
        },
    );
    tokio::pin!(serving, shutdown);
    tokio::select! {
        _ = &mut serving => {}
        _ = &mut shutdown => {
            stop.cancel();
            serving.await;
        }
    }
    Ok(())
}

/// One connection: the TLS handshake (bounded in time), then HTTP/1.1 until the client closes or
/// the endpoint shuts down.
async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    bundle: watch::Receiver<Arc<SpiffeBundle>>,
    graceful: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "bundle endpoint handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "bundle endpoint handshake timed out");
            return;
        }
    };
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let bundle = bundle.borrow().clone();
        async move { Ok::<_, std::convert::Infallible>(respond(&req, &bundle)) }
    });
    let conn = crate::limits::http1().serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = graceful.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "bundle endpoint connection ended with an error");
    }
}

fn respond<B>(req: &Request<B>, bundle: &SpiffeBundle) -> Response<Full<Bytes>> {
    let mut resp = if req.method() == Method::GET {
        let mut r = Response::new(Full::new(Bytes::from(bundle.to_json())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"only GET is supported\n")));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r
    };
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

/// How the client authenticates the endpoint.
#[derive(Clone)]
pub enum ClientProfile {
    /// `https_web`: verify the server against these roots and the URL's host name.
    HttpsWeb { roots: Arc<RootCertStore> },
    /// `https_spiffe`: the server must present this SPIFFE ID, verified against the bundle we hold.
    HttpsSpiffe { endpoint_id: SpiffeId },
}

/// Fetches one trust domain's bundle from its endpoint.
#[derive(Clone)]
pub struct BundleEndpointClient {
    url: String,
    uri: Uri,
    trust_domain: TrustDomain,
    profile: ClientProfile,
    timeout: Duration,
}

impl BundleEndpointClient {
    pub fn new(
        url: &str,
        trust_domain: TrustDomain,
        profile: ClientProfile,
    ) -> Result<Self, EndpointError> {
        let bad = |reason: &str| EndpointError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("bundle endpoints are served over https only"));
        }
        if uri.host().is_none() {
            return Err(bad("no host"));
        }
        Ok(Self {
            url: url.to_string(),
            uri,
            trust_domain,
            profile,
            timeout: Duration::from_secs(10),
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn err(&self, reason: impl Into<String>) -> EndpointError {
        EndpointError::Fetch {
            trust_domain: self.trust_domain.clone(),
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    /// Fetches the bundle once. `current` is the bundle held now (required for `https_spiffe`,
    /// where it authenticates the endpoint).
    pub async fn fetch(
        &self,
        current: Option<&SpiffeBundle>,
    ) -> Result<SpiffeBundle, EndpointError> {
        tokio::time::timeout(self.timeout, self.fetch_inner(current))
            .await
            .map_err(|_| self.err(format!("no answer within {:?}", self.timeout)))?
    }

    async fn fetch_inner(
        &self,
        current: Option<&SpiffeBundle>,
    ) -> Result<SpiffeBundle, EndpointError> {
        let host = self.uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = self.uri.port_u16().unwrap_or(443);
        let config = match &self.profile {
            ClientProfile::HttpsWeb { roots } => {
                let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| self.err(e.to_string()))?
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(cfg)
            }
            ClientProfile::HttpsSpiffe { endpoint_id } => {
                let current = current
                    .ok_or_else(|| EndpointError::NoBootstrapBundle(self.trust_domain.clone()))?;
                let verifier = MeshIdentity::new();
                let mut set = BundleSet::new();
                set.update(current.clone());
                verifier.set_bundles(set);
                verifier.anonymous_client_config(Authorizer::id(endpoint_id.clone()))
            }
        };
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| self.err(format!("{host:?} is not a valid server name")))?;
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| self.err(format!("connect: {e}")))?;
        let tls = TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|e| self.err(format!("TLS: {}", handshake_error_message(&e))))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.err(format!("HTTP: {e}")))?;
        let conn_task = tokio::spawn(conn);
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let req = Request::get(path)
            .header(
                http::header::HOST,
                self.uri.authority().map(|a| a.as_str()).unwrap_or(host),
            )
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| self.err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.err(format!("HTTP: {e}")))?;
        if resp.status() != StatusCode::OK {
            conn_task.abort();
            return Err(self.err(format!("HTTP status {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map_err(|e| self.err(format!("reading body: {e}")))?
            .to_bytes();
        conn_task.abort();
        SpiffeBundle::from_json(self.trust_domain.clone(), &body)
            .map_err(|e| self.err(e.to_string()))
    }

    /// Keeps fetching, by the bundle's refresh hint; a failed fetch keeps the last good bundle and
    /// retries sooner. The receiver holds `None` until the first bundle is known.
    pub fn spawn_refresher(
        self,
        initial: Option<SpiffeBundle>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (watch::Receiver<Option<Arc<SpiffeBundle>>>, JoinHandle<()>) {
        let (rx, _errors, task) = self.spawn_refresher_reporting(initial, shutdown);
        (rx, task)
    }

    /// As [`BundleEndpointClient::spawn_refresher`], and also reports each attempt: the second
    /// receiver holds `Err(reason)` after a failed fetch and `Ok(n)` after the `n`th good one.
    #[allow(clippy::type_complexity)]
    pub fn spawn_refresher_reporting(
        self,
        initial: Option<SpiffeBundle>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (
        watch::Receiver<Option<Arc<SpiffeBundle>>>,
        watch::Receiver<Result<u64, String>>,
        JoinHandle<()>,
    ) {
        let (tx, rx) = watch::channel(initial.map(Arc::new));
        let (attempts, attempts_rx) = watch::channel(Ok(0));
        let task = tokio::spawn(async move {
            tokio::pin!(shutdown);
            let mut failures = 0u32;
            let mut fetched = 0u64;
            loop {
                let current = tx.borrow().clone();
                let wait = match self.fetch(current.as_deref()).await {
                    Ok(bundle) => {
                        failures = 0;
                        let mut set = BundleSet::new();
                        if let Some(c) = &current {
                            set.update_arc(c.clone());
                        }
                        let hint = bundle.refresh_hint();
                        match set.update(bundle) {
                            BundleUpdate::Added | BundleUpdate::Replaced => {
                                let fresh = set.get(&self.trust_domain).cloned();
                                tracing::info!(trust_domain = %self.trust_domain, sequence = fresh.as_ref().map(|b| b.sequence()), "bundle updated from endpoint");
                                tx.send_replace(fresh);
                            }
                            BundleUpdate::Unchanged => {}
                            BundleUpdate::Stale { held, offered } => {
                                tracing::warn!(trust_domain = %self.trust_domain, held, offered, "endpoint served an older bundle; keeping ours");
                            }
                        }
                        fetched += 1;
                        attempts.send_modify(|a| *a = Ok(fetched));
                        hint.unwrap_or(DEFAULT_REFRESH)
                            .clamp(MIN_REFRESH, MAX_REFRESH)
                    }
                    Err(e) => {
                        failures += 1;
                        let hint = current
                            .as_ref()
                            .and_then(|b| b.refresh_hint())
                            .unwrap_or(DEFAULT_REFRESH);
                        let backoff =
                            Duration::from_secs(1) * 2u32.saturating_pow(failures.min(6) - 1);
                        let wait = backoff.min(hint).clamp(MIN_REFRESH, MAX_REFRESH);
                        tracing::warn!(error = %e, retry_in = ?wait, "bundle fetch failed; keeping the last good bundle");
                        attempts.send_modify(|a| *a = Err(e.to_string()));
                        wait
                    }
                };
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        (rx, attempts_rx, task)
    }
}
