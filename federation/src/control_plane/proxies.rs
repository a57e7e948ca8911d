//! The data-plane components this control plane serves: one entry per open configuration stream
//! (identity, role, node, the versions sent and acknowledged, the SVID it connected with). The
//! admin socket lists them (`fedmesh control-plane proxy-status`) and the hub gets them every few
//! seconds (`fedmesh proxy-status`), as Istio's `proxy-status` shows each proxy's sync state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fedmesh_api::pb::federation as pb;
use serde::{Deserialize, Serialize};

/// One proxy as the control plane sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyView {
    pub identity: String,
    pub role: String,
    pub node: String,
    pub connected_unix: i64,
    pub sent_version: u64,
    pub acked_version: u64,
    /// When it last acknowledged an update (0: never).
    pub acked_unix: i64,
    /// Why it refused the last update it refused (empty: it applied everything it acknowledged).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nack_error: String,
    /// Expiry of the SVID its stream was opened with (0: unknown).
    pub svid_not_after_unix: i64,
    /// What its outlier detection holds ejected, as it last said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected: Vec<EjectedView>,
}

/// An endpoint or another cluster's gateway a proxy's outlier detection took out of its
/// balancing for a while.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EjectedView {
    pub cluster: String,
    /// Another cluster, through its gateway: ejected for every service there.
    pub remote: bool,
    /// ip:port of an endpoint, host:port of a gateway.
    pub address: String,
    /// The service whose failed requests ejected it.
    pub service: String,
    /// When the ejection ends (ms since the epoch).
    pub until_unix_ms: i64,
    /// Ejections in a row (each doubles the time out).
    pub ejections: u32,
}

impl EjectedView {
    pub fn from_pb(e: &pb::EjectedTarget) -> Self {
        Self {
            cluster: e.cluster.clone(),
            remote: e.remote,
            address: e.address.clone(),
            service: e.service.clone(),
            until_unix_ms: e.until_unix_ms,
            ejections: e.ejections,
        }
    }

    fn to_pb(&self) -> pb::EjectedTarget {
        pb::EjectedTarget {
            cluster: self.cluster.clone(),
            remote: self.remote,
            address: self.address.clone(),
            service: self.service.clone(),
            until_unix_ms: self.until_unix_ms,
            ejections: self.ejections,
        }
    }
}

impl ProxyView {
    /// `SYNCED` when it acknowledged the last version it was sent, `NACK` when it refused it,
    /// `PENDING` while an update is on its way.
    pub fn sync_state(&self) -> &'static str {
        if !self.nack_error.is_empty() {
            "NACK"
        } else if self.acked_version >= self.sent_version {
            "SYNCED"
        } else {
            "PENDING"
        }
    }

    pub fn from_pb(p: &pb::ProxyState) -> Self {
        Self {
            identity: p.identity.clone(),
            role: p.role.clone(),
            node: p.node.clone(),
            connected_unix: p.connected_unix,
            sent_version: p.sent_version,
            acked_version: p.acked_version,
            acked_unix: p.acked_unix,
            nack_error: p.nack_error.clone(),
            svid_not_after_unix: p.svid_not_after_unix,
            ejected: p.ejected.iter().map(EjectedView::from_pb).collect(),
        }
    }

    fn to_pb(&self) -> pb::ProxyState {
        pb::ProxyState {
            identity: self.identity.clone(),
            role: self.role.clone(),
            node: self.node.clone(),
            connected_unix: self.connected_unix,
            sent_version: self.sent_version,
            acked_version: self.acked_version,
            acked_unix: self.acked_unix,
            nack_error: self.nack_error.clone(),
            svid_not_after_unix: self.svid_not_after_unix,
            ejected: self.ejected.iter().map(EjectedView::to_pb).collect(),
        }
    }
}

#[derive(Default)]
pub struct Proxies {
    open: Mutex<BTreeMap<u64, ProxyView>>,
    next: std::sync::atomic::AtomicU64,
    /// Something changed since the last report to the hub.
    changed: AtomicBool,
}

/// A stream's entry; it leaves the list when dropped (the stream ended).
pub struct ProxyEntry {
    proxies: Arc<Proxies>,
    id: u64,
}

impl Drop for ProxyEntry {
    fn drop(&mut self) {
        self.proxies.lock().remove(&self.id);
        self.proxies.changed.store(true, Ordering::Relaxed);
    }
}

impl ProxyEntry {
    fn update(&self, f: impl FnOnce(&mut ProxyView)) {
        if let Some(v) = self.proxies.lock().get_mut(&self.id) {
            f(v);
        }
        self.proxies.changed.store(true, Ordering::Relaxed);
    }

    pub fn sent(&self, version: u64) {
        self.update(|v| v.sent_version = v.sent_version.max(version));
    }

    /// An acknowledgement of `version`: applied, or refused with `error`.
    pub fn acked(&self, version: u64, error: Option<&str>) {
        self.update(|v| {
            v.acked_unix = unix(SystemTime::now());
            match error {
                Some(e) => v.nack_error = e.to_string(),
                None => {
                    v.acked_version = v.acked_version.max(version);
                    v.nack_error.clear();
                }
            }
        });
    }

    /// What the proxy's outlier detection holds ejected now (it sends only changes).
    pub fn health(&self, h: &fedmesh_api::pb::dataplane::Health) {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let ejected = h
            .ejected
            .iter()
            .map(|e| EjectedView {
                cluster: e.cluster.clone(),
                remote: e.remote,
                address: e.address.clone(),
                service: e.service.clone(),
                until_unix_ms: now_ms + i64::from(e.remaining_ms),
                ejections: e.ejections,
            })
            .collect();
        self.update(|v| v.ejected = ejected);
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Proxies {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyView>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream opened by `identity` (`role` on `node`, its SVID valid until `svid_not_after`).
    pub fn connected(
        self: &Arc<Self>,
        identity: &str,
        role: &str,
        node: &str,
        svid_not_after: Option<SystemTime>,
    ) -> ProxyEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            ProxyView {
                identity: identity.to_string(),
                role: role.to_string(),
                node: node.to_string(),
                connected_unix: unix(SystemTime::now()),
                sent_version: 0,
                acked_version: 0,
                acked_unix: 0,
                nack_error: String::new(),
                svid_not_after_unix: svid_not_after.map_or(0, unix),
                ejected: Vec::new(),
            },
        );
        self.changed.store(true, Ordering::Relaxed);
        ProxyEntry {
            proxies: self.clone(),
            id,
        }
    }

    /// Every open stream's proxy, by identity and node.
    pub fn list(&self) -> Vec<ProxyView> {
        let mut v: Vec<ProxyView> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| (&a.identity, &a.node).cmp(&(&b.identity, &b.node)));
        v
    }

    /// The report for the hub if anything changed since the last one (or `force`).
    pub fn report(&self, config_version: u64, force: bool) -> Option<pb::ProxyReport> {
        if !self.changed.swap(false, Ordering::Relaxed) && !force {
            return None;
        }
        Some(pb::ProxyReport {
            config_version,
            proxies: self.list().iter().map(ProxyView::to_pb).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_listed_while_open_with_its_sync_state() {
        let proxies = Arc::new(Proxies::default());
        let a = proxies.connected("spiffe://e/ns/shop/sa/web", "sidecar", "pod-1", None);
        assert!(proxies.report(1, false).is_some());
        assert!(proxies.report(1, false).is_none(), "nothing changed since");
        a.sent(3);
        assert_eq!(proxies.list()[0].sync_state(), "PENDING");
        a.acked(3, None);
        assert_eq!(proxies.list()[0].sync_state(), "SYNCED");
        a.sent(4);
        a.acked(4, Some("route web: bad regex"));
        let v = &proxies.list()[0];
        assert_eq!((v.sync_state(), v.acked_version), ("NACK", 3));
        a.health(&fedmesh_api::pb::dataplane::Health {
            ejected: vec![fedmesh_api::pb::dataplane::Ejection {
                cluster: "west".into(),
                remote: true,
                address: "gw.west:15443".into(),
                service: "shop/api".into(),
                remaining_ms: 4_000,
                ejections: 2,
            }],
        });
        let r = proxies.report(4, false).expect("an ejection is news");
        let e = &ProxyView::from_pb(&r.proxies[0]).ejected[0];
        assert_eq!(
            (e.cluster.as_str(), e.remote, e.ejections),
            ("west", true, 2)
        );
        assert!(e.until_unix_ms > unix(SystemTime::now()) * 1000);
        drop(a);
        assert!(proxies.list().is_empty());
        assert_eq!(proxies.report(5, false).unwrap().proxies.len(), 0);
    }
}
