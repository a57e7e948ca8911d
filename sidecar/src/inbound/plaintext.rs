//! Plain text from callers outside the mesh, for PERMISSIVE services (PeerAuthentication): how
//! mTLS is adopted one namespace at a time without an outage.
//!
//! Only when the configuration has a PERMISSIVE service does the sidecar look at a connection's
//! first byte before its TLS handshake: a TLS record (0x16) goes on as mTLS; anything else, or a
//! caller silent past the protocol detection timeout (a server-first protocol), is plain text.
//! Plain text is admitted only to an endpoint address of a PERMISSIVE service; to a STRICT one
//! the connection is closed and counted (`plaintext_refused`). An admitted connection has no
//! caller identity: it is `unauthenticated` in metrics (`source_cluster`), access logs and spans,
//! never matches an identity-based ALLOW, and is served as a tunnel's opening ([`super::opaque`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fedmesh_api::ServiceKey;

use fedmesh_dataplane::policy::Subject;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::identity::UNAUTHENTICATED;
use super::{InboundConn, authz};
use crate::Sidecar;

/// Requests to PERMISSIVE services since the last report, by how they came: (mTLS, plain
/// text). Reported to the control plane with the demand; the hub shows the plain-text share.
#[derive(Clone, Default)]
pub(crate) struct PermissiveTraffic(Arc<Mutex<HashMap<ServiceKey, (u64, u64)>>>);

impl PermissiveTraffic {
    pub fn count(&self, service: &ServiceKey, plaintext: bool) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let c = match m.get_mut(service) {
            Some(c) => c,
            None => m.entry(service.clone()).or_default(),
        };
        if plaintext {
            c.1 += 1;
        } else {
            c.0 += 1;
        }
    }

    /// What was counted since the last call.
    pub fn drain(&self) -> Vec<(ServiceKey, (u64, u64))> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

impl Sidecar {
    /// Whether the caller opens with TLS. `true` also when it closed or failed before sending
    /// anything (the TLS path ends it as usual).
    pub(super) async fn starts_with_tls(&self, s: &TcpStream) -> bool {
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.options.protocol_detect_timeout, s.peek(&mut first)).await {
            Ok(Ok(1..)) => first[0] == TLS_HANDSHAKE,
            Ok(_) => true,
            // Silent: a server-first protocol in plain text.
            Err(_) => false,
        }
    }

    /// A plain-text connection addressed to `addressed`.
    pub(super) async fn inbound_plaintext(
        self: Arc<Self>,
        s: TcpStream,
        peer: SocketAddr,
        addressed: SocketAddr,
        app: Option<SocketAddr>,
        graceful: CancellationToken,
    ) {
        let table = self.config.table();
        let admitted = match table.endpoint_at(addressed) {
            Some((entry, target)) if entry.policy.permissive => {
                let app =
                    app.unwrap_or_else(|| SocketAddr::new([127, 0, 0, 1].into(), addressed.port()));
                Ok((target.sni().clone(), app))
            }
            Some((entry, _)) => Err(format!(
                "{} takes only mTLS (no PeerAuthentication makes it PERMISSIVE)",
                entry.key
            )),
            None => Err(format!(
                "{addressed} is not an endpoint of a service this sidecar serves"
            )),
        };
        drop(table);
        let (mesh, app) = match admitted {
            Ok(a) => a,
            Err(why) => {
                self.metrics.refuse("plaintext_refused");
                tracing::info!(%peer, %addressed, "plain-text connection refused: {why}");
                return;
            }
        };
        let conn = Arc::new(InboundConn::new(
            peer,
            None,
            UNAUTHENTICATED.to_string(),
            Ok((mesh, app)),
        ));
        self.inbound_opaque(s, conn, app, graceful, None).await;
    }

    /// Whether an unauthenticated caller may have its opaque (non-HTTP) connection relayed to
    /// the service it addressed: the TCP check of AuthorizationPolicies, with no identity.
    pub(super) fn unauthenticated_relay_denied(&self, conn: &InboundConn) -> bool {
        let Ok((mesh, _)) = &conn.admitted else {
            return true;
        };
        let table = self.config.table();
        let subject = Subject {
            caller: None,
            port: mesh.port,
            http: None,
        };
        match authz::authorize(
            table.service(&mesh.service).map(|e| &**e),
            &subject,
            &self.metrics,
        ) {
            Ok(()) => false,
            Err(e) => {
                tracing::info!(peer = %conn.peer, error = %e, "plain-text TCP connection denied");
                true
            }
        }
    }
}
