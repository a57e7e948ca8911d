//! The JWK Sets RequestAuthentications name by `jwksUri`, fetched by the control plane (as
//! Istio's istiod does) so the sidecars need no route to the identity provider and it is asked
//! once per cluster, not once per pod. Each set is kept with the time it was fetched and
//! refreshed every `refresh`; a set seen for the first time is fetched at once. A set that
//! cannot be fetched keeps its last good copy (the keys in force do not vanish with a network
//! blip); one never fetched carries the error, which the sidecars give as the reason they refuse
//! that issuer's tokens and the policy's status shows.
//!
//! `https://` (system roots), `http://`, and `file:///path` (read again at each refresh).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The largest JWK Set accepted.
const MAX_JWKS: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// The last set fetched, or why there is none.
    set: Result<String, String>,
    fetched: Option<Instant>,
}

pub struct Jwks {
    entries: Mutex<BTreeMap<String, Entry>>,
    refresh: Duration,
    client: Option<Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<bytes::Bytes>>>,
}

impl Jwks {
    pub fn new(refresh: Duration) -> Self {
        let client = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| tracing::warn!(error = %e, "no system roots: JWKS over https will fail"))
            .ok()
            .map(|b| {
                let https = b.https_or_http().enable_http1().build();
                Client::builder(TokioExecutor::new()).build(https)
            });
        Self {
            entries: Mutex::default(),
            refresh,
            client,
        }
    }

    /// The set at `uri` as last fetched; a uri met for the first time is remembered (the next
    /// [`Jwks::refresh_due`] fetches it) and reported as not fetched yet.
    pub fn get(&self, uri: &str) -> Result<String, String> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .entry(uri.to_string())
            .or_insert_with(|| Entry {
                set: Err("the control plane has not fetched it yet".into()),
                fetched: None,
            })
            .set
            .clone()
    }

    /// Fetches every set that is due (never fetched, or older than `refresh`); `true` when one
    /// changed. Uris no longer asked for since the last round are forgotten.
    pub async fn refresh_due(&self, wanted: &[String]) -> bool {
        let due: Vec<String> = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.retain(|uri, _| wanted.contains(uri));
            entries
                .iter()
                .filter(|(_, e)| e.fetched.is_none_or(|t| t.elapsed() >= self.refresh))
                .map(|(u, _)| u.clone())
                .collect()
        };
        let mut changed = false;
        for uri in due {
            let got = self.fetch(&uri).await;
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let Some(e) = entries.get_mut(&uri) else {
                continue;
            };
            let set = match (got, &e.set) {
                (Ok(s), _) => Ok(s),
                (Err(err), Ok(old)) => {
                    tracing::warn!(%uri, error = %err, "cannot refresh a JWK Set; the last one fetched stays in force");
                    Ok(old.clone())
                }
                (Err(err), Err(_)) => {
                    tracing::warn!(%uri, error = %err, "cannot fetch a JWK Set");
                    Err(err)
                }
            };
            changed |= set != e.set;
            *e = Entry {
                set,
                fetched: Some(Instant::now()),
            };
        }
        changed
    }

    async fn fetch(&self, uri: &str) -> Result<String, String> {
        if let Some(path) = uri.strip_prefix("file://") {
            return tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("cannot read {path}: {e}"));
        }
        let client = self
            .client
            .as_ref()
            .ok_or("this host has no TLS roots to fetch it with")?;
        let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
        let get = async {
            let resp = client
                .get(parsed)
                .await
                .map_err(|e| format!("GET {uri}: {}", crate::error_chain(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("GET {uri}: {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS)
                .collect()
                .await
                .map_err(|e| format!("GET {uri}: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| format!("GET {uri}: not UTF-8"))
        };
        tokio::time::timeout(FETCH_TIMEOUT, get)
            .await
            .map_err(|_| format!("GET {uri}: no answer within {FETCH_TIMEOUT:?}"))?
    }
}
