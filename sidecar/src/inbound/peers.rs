//! Open inbound connections by their caller's trust domain. A trust domain this sidecar stops
//! trusting (its cluster was removed from the clusterset, a federation was taken away) can no
//! longer complete a handshake, and the connections its workloads already had open are told to
//! stop too: HTTP/2 gets a GOAWAY and its requests in flight finish; whatever is still open after
//! the drain timeout is closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fedmesh_api::TrustDomain;
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_trust::tls::MeshIdentity;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub(crate) struct PeerDomains {
    open: Mutex<HashMap<TrustDomain, HashMap<u64, CancellationToken>>>,
    next: AtomicU64,
}

/// One open connection's place in [`PeerDomains`]; it leaves when dropped.
pub(crate) struct PeerConn {
    domains: Arc<PeerDomains>,
    trust_domain: TrustDomain,
    id: u64,
    /// Cancelled when the sidecar drains or the caller's trust domain is no longer trusted.
    pub(crate) stop: CancellationToken,
}

impl Drop for PeerConn {
    fn drop(&mut self) {
        let mut open = self.domains.lock();
        if let Some(conns) = open.get_mut(&self.trust_domain) {
            conns.remove(&self.id);
            if conns.is_empty() {
                open.remove(&self.trust_domain);
            }
        }
    }
}

impl PeerDomains {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TrustDomain, HashMap<u64, CancellationToken>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a connection from `trust_domain`; its `stop` is a child of `graceful`.
    pub(crate) fn register(
        self: &Arc<Self>,
        trust_domain: &TrustDomain,
        graceful: &CancellationToken,
    ) -> PeerConn {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stop = graceful.child_token();
        self.lock()
            .entry(trust_domain.clone())
            .or_default()
            .insert(id, stop.clone());
        PeerConn {
            domains: self.clone(),
            trust_domain: trust_domain.clone(),
            id,
            stop,
        }
    }

    /// Stops every connection from a trust domain `trusted` says no to: per such trust domain,
    /// how many.
    pub(crate) fn cut(&self, trusted: impl Fn(&TrustDomain) -> bool) -> Vec<(TrustDomain, usize)> {
        let mut cut = Vec::new();
        self.lock().retain(|td, conns| {
            if trusted(td) {
                return true;
            }
            for stop in conns.values() {
                stop.cancel();
            }
            cut.push((td.clone(), conns.len()));
            false
        });
        cut
    }

    /// Follows `identity`'s bundles until `shutdown`, cutting what they stop trusting.
    pub(crate) async fn follow(
        self: Arc<Self>,
        identity: MeshIdentity,
        metrics: Arc<ProxyMetrics>,
        shutdown: CancellationToken,
    ) {
        let mut changes = identity.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let trust = identity.trust();
            for (td, n) in self.cut(|td| trust.trusts(td.as_str())) {
                tracing::warn!(
                    trust_domain = %td,
                    connections = n,
                    "trust domain no longer trusted: its open inbound connections are told to stop"
                );
                for _ in 0..n {
                    metrics.refuse("trust_withdrawn");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_connections_of_an_untrusted_domain_stop_and_a_closed_one_leaves() {
        let domains = Arc::new(PeerDomains::default());
        let graceful = CancellationToken::new();
        let (east, west) = (
            TrustDomain::new("east.example").unwrap(),
            TrustDomain::new("west.example").unwrap(),
        );
        let a = domains.register(&east, &graceful);
        let b = domains.register(&west, &graceful);
        let c = domains.register(&west, &graceful);
        drop(c);
        assert_eq!(domains.cut(|_| true), vec![]);
        let cut = domains.cut(|td| td == &east);
        assert_eq!(cut, vec![(west.clone(), 1)], "the closed one is gone");
        assert!(b.stop.is_cancelled() && !a.stop.is_cancelled());
        // A drain stops the rest.
        graceful.cancel();
        assert!(a.stop.is_cancelled());
        drop((a, b));
        assert!(domains.lock().is_empty());
    }
}
