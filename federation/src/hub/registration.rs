//! Registering clusters: join tokens bound to one cluster and one trust domain, one owner per
//! trust domain, and the identities of the current registration.
//!
//! A join uses its token, writes the cluster record and claims the trust domain in one
//! transaction, so two joins cannot both register one name or one trust domain, even on two hub
//! replicas. The record keeps the serial numbers of the identities issued to this registration
//! (the current one and, after a renewal, the next), as SPIRE keeps an agent's: an identity of an
//! earlier registration of the same name — the cluster was removed, or joined again — is refused
//! when it renews or connects, instead of living on until it expires.

use std::time::Duration;

use fedmesh_api::{ClusterName, TrustDomain};
use rustls_pki_types::CertificateDer;

use super::Hub;
use super::records::*;
use crate::store::{Compare, StoreError, Txn, TxnOutcome};
use crate::tokens::{self, JoinToken, TokenError};

/// How often a renewal retries when another write to the cluster record (a publish, a heartbeat)
/// came between its read and its write.
const RENEW_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "join token {0} names no trust domain (it was created by an older hub); create a new one with `fedmesh hub token create --cluster NAME --trust-domain TD`"
    )]
    TokenWithoutTrustDomain(String),
    #[error("cluster {cluster} is registered with trust domain {registered}, not {trust_domain}")]
    OtherTrustDomain {
        cluster: ClusterName,
        registered: TrustDomain,
        trust_domain: TrustDomain,
    },
    #[error(
        "trust domain {trust_domain} already belongs to cluster {owner}; every cluster needs its own"
    )]
    TrustDomainTaken {
        trust_domain: TrustDomain,
        owner: String,
    },
    #[error("the CSR cannot be signed: {0}")]
    BadCsr(String),
    #[error("cluster {0} is not registered (removed by an operator?); join again with a new token")]
    NotRegistered(ClusterName),
    #[error(
        "this certificate belongs to an earlier registration of cluster {0} (the cluster was removed or joined again); join again with a new token"
    )]
    Revoked(ClusterName),
    #[error("the registration of cluster {0} changed concurrently; retry")]
    Concurrent(ClusterName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Hub {
    /// Creates a join token that registers `cluster` with `trust_domain`, and nothing else.
    pub async fn create_token(
        &self,
        cluster: &ClusterName,
        trust_domain: &TrustDomain,
        ttl: Option<Duration>,
    ) -> Result<(String, i64), TokenError> {
        let (t, expires) = tokens::create(
            &**self.store(),
            cluster,
            trust_domain,
            ttl.unwrap_or(self.config.token_ttl),
            &self.ca_pin(),
        )
        .await?;
        Ok((t.to_string(), expires))
    }

    /// Issues a cluster identity for a CSR; returns the chain and the leaf's serial.
    fn sign_cluster(
        &self,
        cluster: &ClusterName,
        csr: &[u8],
    ) -> Result<(Vec<CertificateDer<'static>>, String), RegistrationError> {
        let id = super::cluster_id(&self.trust_domain(), cluster);
        let issued = self
            .ca()
            .sign_csr_for(csr, &id, Some(self.config.cluster_svid_ttl))
            .map_err(|e| RegistrationError::BadCsr(e.to_string()))?;
        let serial = issued
            .chain
            .first()
            .and_then(|c| fedmesh_trust::svid::inspect(c).ok())
            .map(|i| i.serial_hex)
            .ok_or_else(|| RegistrationError::BadCsr("the CA issued no certificate".into()))?;
        Ok((issued.chain, serial))
    }

    /// Registers `cluster` with `trust_domain` (or registers it again, revoking the identities of
    /// its earlier registration) and returns its new identity. The token is checked first, so only
    /// its holder learns anything about the clusterset.
    pub(crate) async fn join(
        &self,
        token: &JoinToken,
        cluster: &ClusterName,
        trust_domain: &TrustDomain,
        csr: &[u8],
    ) -> Result<Vec<CertificateDer<'static>>, RegistrationError> {
        let store = self.store();
        let (token_record, token_revision) =
            tokens::check(&**store, token, cluster.as_str()).await?;
        match &token_record.trust_domain {
            None => return Err(RegistrationError::TokenWithoutTrustDomain(token.id.clone())),
            Some(td) if td != trust_domain => {
                return Err(TokenError::WrongTrustDomain {
                    id: token.id.clone(),
                    issued_for: td.to_string(),
                    trust_domain: trust_domain.to_string(),
                }
                .into());
            }
            Some(_) => {}
        }
        let existing = self.stored_cluster(cluster).await?;
        if let Some((r, _)) = &existing
            && &r.trust_domain != trust_domain
        {
            return Err(RegistrationError::OtherTrustDomain {
                cluster: cluster.clone(),
                registered: r.trust_domain.clone(),
                trust_domain: trust_domain.clone(),
            });
        }
        let owner_key = trust_domain_key(trust_domain);
        let owner = store.get(&owner_key).await?;
        if let Some(kv) = &owner
            && kv.value != cluster.as_str().as_bytes()
        {
            return Err(RegistrationError::TrustDomainTaken {
                trust_domain: trust_domain.clone(),
                owner: String::from_utf8_lossy(&kv.value).into_owned(),
            });
        }
        let (chain, serial) = self.sign_cluster(cluster, csr)?;

        let key = cluster_key(cluster);
        let mut txn = tokens::use_in(Txn::new(), token, token_record, token_revision);
        let record = match existing {
            Some((mut r, revision)) => {
                txn = txn.when(Compare::ModRevision(key.clone(), revision));
                r.identity_serials = vec![serial];
                r
            }
            None => {
                txn = txn.when(Compare::Absent(key.clone()));
                ClusterRecord {
                    name: cluster.clone(),
                    trust_domain: trust_domain.clone(),
                    region: String::new(),
                    gateways: vec![],
                    joined_unix: now_unix(),
                    stale: false,
                    expired: false,
                    protocol_version: 0,
                    published_version: 0,
                    identity_serials: vec![serial],
                    problems: vec![],
                    routes: vec![],
                }
            }
        };
        txn = txn.put(key, serde_json::to_vec(&record).unwrap_or_default());
        txn = match owner {
            Some(kv) => txn.when(Compare::ModRevision(owner_key, kv.mod_revision)),
            None => txn
                .when(Compare::Absent(owner_key.clone()))
                .put(owner_key, cluster.as_str().as_bytes().to_vec()),
        };
        match store.commit(txn).await? {
            TxnOutcome::Committed(_) => Ok(chain),
            TxnOutcome::Failed => Err(RegistrationError::Concurrent(cluster.clone())),
        }
    }

    /// Checks that the identity with `serial` belongs to `cluster`'s current registration. The
    /// next identity of a renewal, once used, becomes the only one; a record written before
    /// serials were kept adopts the first identity presented.
    pub(crate) async fn check_registration(
        &self,
        cluster: &ClusterName,
        serial: Option<&str>,
    ) -> Result<(), RegistrationError> {
        let serial = serial.ok_or_else(|| RegistrationError::Revoked(cluster.clone()))?;
        let (mut record, revision) = self
            .stored_cluster(cluster)
            .await?
            .ok_or_else(|| RegistrationError::NotRegistered(cluster.clone()))?;
        let known = record.identity_serials.iter().any(|s| s == serial);
        if !known && !record.identity_serials.is_empty() {
            return Err(RegistrationError::Revoked(cluster.clone()));
        }
        // Adopt (no serials yet), or promote the renewed identity once it is used; the older of
        // two stays valid until then.
        let newest = record.identity_serials.last().is_some_and(|s| s == serial);
        if !known || (newest && record.identity_serials.len() > 1) {
            // Best effort: a concurrent write keeps the list as it was, which is still correct.
            record.identity_serials = vec![serial.to_string()];
            let key = cluster_key(cluster);
            self.store()
                .commit(
                    Txn::new()
                        .when(Compare::ModRevision(key.clone(), revision))
                        .put(key, serde_json::to_vec(&record).unwrap_or_default()),
                )
                .await?;
        }
        Ok(())
    }

    /// Renews the identity with `serial` of `cluster`'s current registration: the new identity is
    /// recorded beside it (the cluster may still use the current one until it switches).
    pub(crate) async fn renew_registration(
        &self,
        cluster: &ClusterName,
        serial: Option<&str>,
        csr: &[u8],
    ) -> Result<Vec<CertificateDer<'static>>, RegistrationError> {
        let serial = serial.ok_or_else(|| RegistrationError::Revoked(cluster.clone()))?;
        for _ in 0..RENEW_ATTEMPTS {
            let (mut record, revision) = self
                .stored_cluster(cluster)
                .await?
                .ok_or_else(|| RegistrationError::NotRegistered(cluster.clone()))?;
            if !record.identity_serials.is_empty()
                && !record.identity_serials.iter().any(|s| s == serial)
            {
                return Err(RegistrationError::Revoked(cluster.clone()));
            }
            let (chain, next) = self.sign_cluster(cluster, csr)?;
            record.identity_serials = vec![serial.to_string(), next];
            let key = cluster_key(cluster);
            let outcome = self
                .store()
                .commit(
                    Txn::new()
                        .when(Compare::ModRevision(key.clone(), revision))
                        .put(key, serde_json::to_vec(&record).unwrap_or_default()),
                )
                .await?;
            if matches!(outcome, TxnOutcome::Committed(_)) {
                return Ok(chain);
            }
        }
        Err(RegistrationError::Concurrent(cluster.clone()))
    }

    /// Records the owner of every registered cluster's trust domain where a store written by an
    /// older hub lacks it, so the one-owner rule covers clusters that joined before it existed.
    pub(crate) async fn index_trust_domains(&self) {
        let Ok((kvs, _)) = self.store().list(CLUSTERS).await else {
            return;
        };
        for kv in kvs {
            let Ok(r) = serde_json::from_slice::<ClusterRecord>(&kv.value) else {
                continue;
            };
            let key = trust_domain_key(&r.trust_domain);
            let txn = Txn::new()
                .when(Compare::Absent(key.clone()))
                .put(key.clone(), r.name.as_str().as_bytes().to_vec());
            if let Ok(TxnOutcome::Failed) = self.store().commit(txn).await
                && let Ok(Some(owner)) = self.store().get(&key).await
                && owner.value != r.name.as_str().as_bytes()
            {
                tracing::warn!(
                    cluster = %r.name,
                    trust_domain = %r.trust_domain,
                    owner = %String::from_utf8_lossy(&owner.value),
                    "two registered clusters claim one trust domain; remove one (`fedmesh hub` admin API)"
                );
            }
        }
    }
}
