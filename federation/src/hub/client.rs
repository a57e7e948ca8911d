//! A client for the hub's admin API, used by `fedmesh status`, `fedmesh explain` and
//! `fedmesh hub token create`.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::access::{
    AdminTokenRequest, AdminTokenResponse, AdminTokenView, JoinTokenView, Revoked, Role,
};
use super::admin::{
    ClusterStatus, ErrorBody, Explanation, ServiceStatus, TokenRequest, TokenResponse,
};
use super::traces::{SpanView, TraceQuery, TraceSummary};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("admin URL {0:?} is not http://HOST:PORT or https://HOST:PORT")]
    Url(String),
    #[error(
        "cannot reach the hub admin API at {url}: {reason} (is `fedmesh hub` running? see --admin-listen)"
    )]
    Connect { url: String, reason: String },
    #[error(
        "the hub at {url} refused the TLS connection: {reason} (a client certificate must chain to the hub's CA or a joined cluster's trust bundle; check --admin-cert)"
    )]
    TlsRefused { url: String, reason: String },
    #[error("the hub answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("unexpected answer from the hub: {0}")]
    Body(String),
}

pub struct AdminClient {
    base: Uri,
    token: Option<String>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl AdminClient {
    /// `tls` is needed for `https://` URLs (verify the hub with its CA bundle).
    pub fn new(
        url: &str,
        token: Option<String>,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ClientError> {
        let base: Uri = url
            .trim_end_matches('/')
            .parse()
            .map_err(|_| ClientError::Url(url.into()))?;
        match base.scheme_str() {
            Some("http") | Some("https") if base.host().is_some() => {}
            _ => return Err(ClientError::Url(url.into())),
        }
        Ok(Self { base, token, tls })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let connect_err = |reason: String| ClientError::Connect {
            url: self.base.to_string(),
            reason,
        };
        let host = self
            .base
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let https = self.base.scheme_str() == Some("https");
        let port = self.base.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(
                http::header::HOST,
                self.base.authority().map(|a| a.as_str()).unwrap_or(&host),
            )
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Body(e.to_string()))?;
        let resp = if https {
            let cfg = self.tls.clone().ok_or_else(|| {
                connect_err("https needs --admin-ca (the hub's CA bundle)".into())
            })?;
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| connect_err(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| connect_err(fedmesh_trust::tls::handshake_error_message(&e)))?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
        .map_err(|e| {
            // The server's alert after our certificate went out: it did not accept it.
            if e.tls_alert {
                ClientError::TlsRefused {
                    url: self.base.to_string(),
                    reason: e.message,
                }
            } else {
                connect_err(e.message)
            }
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Body(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Status { status, message });
        }
        let _ = url;
        // 204 No Content: nothing to read (a `()` answer).
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Body(e.to_string()))
    }

    pub async fn clusters(&self) -> Result<Vec<ClusterStatus>, ClientError> {
        self.call(Method::GET, "/api/v1/clusters", None).await
    }

    pub async fn services(&self) -> Result<Vec<ServiceStatus>, ClientError> {
        self.call(Method::GET, "/api/v1/services", None).await
    }

    /// Every sidecar and gateway of the clusterset and its sync state.
    pub async fn proxies(&self) -> Result<Vec<super::proxies::ProxyStatus>, ClientError> {
        self.call(Method::GET, "/api/v1/proxies", None).await
    }

    /// Every Rollout of the clusterset, cluster by cluster.
    pub async fn rollouts(&self) -> Result<Vec<super::rollouts::ClustersetRollout>, ClientError> {
        self.call(Method::GET, "/api/v1/rollouts", None).await
    }

    /// Every cluster's gateways as every other cluster's probes found them.
    pub async fn gateways(&self) -> Result<Vec<super::gateways::GatewayStatus>, ClientError> {
        self.call(Method::GET, "/api/v1/gateways", None).await
    }

    /// The PERMISSIVE services and their plain-text share.
    pub async fn plaintext(&self) -> Result<Vec<super::plaintext::PlaintextStatus>, ClientError> {
        self.call(Method::GET, "/api/v1/plaintext", None).await
    }

    pub async fn explain(&self, service: &str, from: &str) -> Result<Explanation, ClientError> {
        let q = format!(
            "/api/v1/explain?service={}&from={}",
            urlencode(service),
            urlencode(from)
        );
        self.call(Method::GET, &q, None).await
    }

    /// Recent traces in the hub's window, newest first.
    pub async fn traces(&self, q: &TraceQuery) -> Result<Vec<TraceSummary>, ClientError> {
        let mut params = Vec::new();
        if let Some(v) = &q.service {
            params.push(format!("service={}", urlencode(v)));
        }
        if let Some(v) = &q.cluster {
            params.push(format!("cluster={}", urlencode(v)));
        }
        if let Some(v) = q.error {
            params.push(format!("error={v}"));
        }
        if let Some(v) = q.min_duration_ms {
            params.push(format!("min_duration_ms={v}"));
        }
        if let Some(v) = q.since_unix_ms {
            params.push(format!("since_unix_ms={v}"));
        }
        if let Some(v) = q.limit {
            params.push(format!("limit={v}"));
        }
        let path = if params.is_empty() {
            "/api/v1/traces".to_string()
        } else {
            format!("/api/v1/traces?{}", params.join("&"))
        };
        self.call(Method::GET, &path, None).await
    }

    /// One trace's spans, in start order.
    pub async fn trace(&self, id: &str) -> Result<Vec<SpanView>, ClientError> {
        self.call(
            Method::GET,
            &format!("/api/v1/traces/{}", urlencode(id)),
            None,
        )
        .await
    }

    pub async fn create_token(
        &self,
        cluster: &str,
        trust_domain: &str,
        ttl: Option<&str>,
    ) -> Result<TokenResponse, ClientError> {
        let body = serde_json::to_vec(&TokenRequest {
            cluster: cluster.to_string(),
            trust_domain: trust_domain.to_string(),
            ttl: ttl.map(String::from),
        })
        .map_err(|e| ClientError::Body(e.to_string()))?;
        self.call(Method::POST, "/api/v1/tokens", Some(body)).await
    }

    /// Join tokens (never their secrets).
    pub async fn join_tokens(&self) -> Result<Vec<JoinTokenView>, ClientError> {
        self.call(Method::GET, "/api/v1/tokens", None).await
    }

    pub async fn revoke_join_token(&self, id: &str) -> Result<Revoked, ClientError> {
        let path = format!("/api/v1/tokens/{}", urlencode(id));
        self.call(Method::DELETE, &path, None).await
    }

    pub async fn create_admin_token(
        &self,
        name: &str,
        role: Role,
    ) -> Result<AdminTokenResponse, ClientError> {
        let body = serde_json::to_vec(&AdminTokenRequest {
            name: name.to_string(),
            role,
        })
        .map_err(|e| ClientError::Body(e.to_string()))?;
        self.call(Method::POST, "/api/v1/admin-tokens", Some(body))
            .await
    }

    pub async fn admin_tokens(&self) -> Result<Vec<AdminTokenView>, ClientError> {
        self.call(Method::GET, "/api/v1/admin-tokens", None).await
    }

    /// Removes a cluster from the clusterset: its record, exports and trust bundle.
    pub async fn remove_cluster(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/api/v1/clusters/{}", urlencode(name));
        self.call(Method::DELETE, &path, None).await
    }

    pub async fn revoke_admin_token(&self, name: &str) -> Result<Revoked, ClientError> {
        let path = format!("/api/v1/admin-tokens/{}", urlencode(name));
        self.call(Method::DELETE, &path, None).await
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) struct SendError {
    pub message: String,
    /// The server ended the connection with a TLS alert: it refused us (our certificate, say).
    pub tls_alert: bool,
}

impl From<String> for SendError {
    fn from(message: String) -> Self {
        Self {
            message,
            tls_alert: false,
        }
    }
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.message
    }
}

pub(crate) async fn send<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, SendError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| describe(&e))?;
    let conn = tokio::spawn(conn);
    match tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await {
        Err(_) => Err("no answer within 30s".to_string().into()),
        Ok(Ok(resp)) => Ok(resp),
        // The connection's own error says why (e.g. the hub refused our client certificate,
        // which TLS 1.3 reports only after the handshake).
        Ok(Err(e)) => match tokio::time::timeout(Duration::from_secs(1), conn).await {
            Ok(Ok(Err(conn_error))) => Err(describe(&conn_error)),
            _ => Err(describe(&e)),
        },
    }
}

/// A hyper error with the TLS or socket reason under it, if there is one.
fn describe(e: &hyper::Error) -> SendError {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            let tls_alert = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(_)));
            return SendError {
                message: format!("{e}: {}", fedmesh_trust::tls::handshake_error_message(io)),
                tls_alert,
            };
        }
        source = s.source();
    }
    e.to_string().into()
}

pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
