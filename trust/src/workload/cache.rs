//! The agent's SVID cache: one X.509-SVID per registration entry, renewed at half its lifetime,
//! with a generation counter that ticks on every SVID or bundle change so Workload API streams
//! know when to send an update.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::PrivatePkcs8KeyDer;
use tokio::sync::{Notify, watch};

use super::entries::RegistrationEntry;
use super::signer::SvidSigner;
use crate::bundle::BundleSet;
use crate::svid::{X509Svid, new_key_and_csr, rfc3339};

/// Retry delays after a failed signing: doubled up to the cap.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

struct Slot {
    svid: Option<Arc<X509Svid>>,
    next_attempt: SystemTime,
    failures: u32,
}

pub struct SvidCache {
    signer: Arc<dyn SvidSigner>,
    entries: ArcSwap<Vec<Arc<RegistrationEntry>>>,
    slots: RwLock<HashMap<String, Slot>>,
    generation: watch::Sender<u64>,
    wake: Notify,
}

impl SvidCache {
    pub fn new(signer: Arc<dyn SvidSigner>, entries: Vec<RegistrationEntry>) -> Arc<Self> {
        Arc::new(Self {
            signer,
            entries: ArcSwap::from_pointee(entries.into_iter().map(Arc::new).collect()),
            slots: RwLock::new(HashMap::new()),
            generation: watch::Sender::new(0),
            wake: Notify::new(),
        })
    }

    pub fn signer(&self) -> &Arc<dyn SvidSigner> {
        &self.signer
    }

    pub fn entries(&self) -> Arc<Vec<Arc<RegistrationEntry>>> {
        self.entries.load_full()
    }

    /// Replaces the registration entries; new ones are issued at once, removed ones dropped.
    pub fn set_entries(&self, entries: Vec<RegistrationEntry>) {
        self.entries
            .store(Arc::new(entries.into_iter().map(Arc::new).collect()));
        let keys: std::collections::HashSet<String> =
            self.entries.load().iter().map(|e| e.key()).collect();
        self.slots_mut().retain(|k, _| keys.contains(k));
        self.bump();
        self.wake.notify_one();
    }

    /// Ticks on every change of an SVID, the entries or the bundles.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn bundles(&self) -> Arc<BundleSet> {
        self.signer.bundles().borrow().clone()
    }

    pub fn svid(&self, entry: &RegistrationEntry) -> Option<Arc<X509Svid>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&entry.key())
            .and_then(|s| s.svid.clone())
            .filter(|s| s.not_after > SystemTime::now())
    }

    /// Forces renewal of every SVID now (e.g. after a CA rotation, or from tests).
    pub fn renew_all(&self) {
        for slot in self.slots_mut().values_mut() {
            slot.next_attempt = SystemTime::UNIX_EPOCH;
        }
        self.wake.notify_one();
    }

    fn slots_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Slot>> {
        self.slots.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Issues and renews SVIDs until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut bundles = self.signer.bundles();
        // Bundles that changed before this subscription reach streams opened before it too.
        self.bump();
        loop {
            let next = self.renew_due().await;
            let sleep = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_millis(10));
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                changed = bundles.changed() => {
                    if changed.is_err() {
                        tracing::error!("bundle source closed; SVIDs keep being renewed but bundles no longer change");
                        bundles = watch::channel(self.bundles()).1;
                    }
                    self.bump();
                }
            }
        }
    }

    /// Signs every SVID that is missing or due, and returns when the next one falls due.
    async fn renew_due(&self) -> SystemTime {
        let now = SystemTime::now();
        let entries = self.entries.load_full();
        let mut next = now + Duration::from_secs(3600);
        for entry in entries.iter() {
            let key = entry.key();
            let due = {
                let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
                slots.get(&key).map_or(now, |s| s.next_attempt)
            };
            if due > now {
                next = next.min(due);
                continue;
            }
            match self.issue(entry).await {
                Ok(svid) => {
                    // Half of the remaining lifetime, measured from now: notBefore is backdated and
                    // X.509 times have one-second granularity, so it is not a reliable start.
                    let renew_at = now + svid.not_after.duration_since(now).unwrap_or_default() / 2;
                    tracing::info!(spiffe_id = %entry.spiffe_id, not_after = %rfc3339(svid.not_after), "issued X509-SVID");
                    self.slots_mut().insert(
                        key,
                        Slot {
                            svid: Some(Arc::new(svid)),
                            next_attempt: renew_at,
                            failures: 0,
                        },
                    );
                    next = next.min(renew_at);
                    self.bump();
                }
                Err(e) => {
                    let mut slots = self.slots_mut();
                    let slot = slots.entry(key).or_insert(Slot {
                        svid: None,
                        next_attempt: now,
                        failures: 0,
                    });
                    slot.failures += 1;
                    let delay =
                        (RETRY_MIN * 2u32.saturating_pow(slot.failures.min(16) - 1)).min(RETRY_MAX);
                    slot.next_attempt = now + delay;
                    next = next.min(slot.next_attempt);
                    tracing::warn!(spiffe_id = %entry.spiffe_id, error = %e, retry_in = ?delay, "cannot issue X509-SVID; keeping the current one");
                }
            }
        }
        next
    }

    async fn issue(&self, entry: &RegistrationEntry) -> Result<X509Svid, String> {
        let (key, csr) = new_key_and_csr(&entry.spiffe_id).map_err(|e| e.to_string())?;
        let chain = self
            .signer
            .sign_x509(csr, entry.spiffe_id.clone(), entry.ttl)
            .await
            .map_err(|e| e.to_string())?;
        let leaf = chain.first().ok_or("signer returned an empty chain")?;
        let info = crate::svid::inspect(leaf).map_err(|e| e.to_string())?;
        if info.spiffe_id != entry.spiffe_id {
            return Err(format!(
                "signer returned an SVID for {} instead of {}",
                info.spiffe_id, entry.spiffe_id
            ));
        }
        Ok(X509Svid {
            id: info.spiffe_id,
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
}
