//! Clients for the apps behind the mesh: HTTP/1.1 through a sidecar's HTTP proxy (one kept-alive
//! connection, reopened when it breaks).

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::apps::EchoResponse;

/// HTTP/1.1 through an HTTP proxy (absolute-form requests).
pub struct ProxyClient {
    proxy: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// A response: its status, headers and body.
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The echo app's answer.
    pub fn echo(&self) -> anyhow::Result<EchoResponse> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "not an echo response ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl ProxyClient {
    pub fn new(proxy: SocketAddr) -> Self {
        Self {
            proxy,
            sender: None,
        }
    }

    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = TcpStream::connect(self.proxy)
                .await
                .with_context(|| format!("connecting to the sidecar proxy at {}", self.proxy))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just set"))
    }

    /// `GET url` (e.g. `http://api.shop.svc.clusterset.local/hello`).
    pub async fn get(&mut self, url: &str) -> anyhow::Result<Reply> {
        self.request("GET", url, &[], Bytes::new()).await
    }

    pub async fn request(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body))?;
        let sender = self.sender().await?;
        sender.ready().await?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Asks a DNS server (a control plane's, for `*.svc.clusterset.local`) for the A records of
/// `name`.
pub async fn dns_a(server: SocketAddr, name: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let mut config = ResolverConfig::from_parts(None, vec![], vec![]);
    let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
    udp.port = server.port();
    tcp.port = server.port();
    config.add_name_server(NameServerConfig::new(server.ip(), true, vec![udp, tcp]));
    let resolver =
        hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .build()
            .map_err(|e| e.to_string())?;
    let lookup = resolver
        .ipv4_lookup(name)
        .await
        .map_err(|e| e.to_string())?;
    Ok(lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            hickory_resolver::proto::rr::RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}
