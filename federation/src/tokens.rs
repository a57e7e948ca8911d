//! One-time, expiring join tokens, shaped like kubeadm's: `fmj1.<id>.<secret>.<ca-sha256>`.
//!
//! The id names the record in the store, the secret proves possession (only its SHA-256 is
//! stored), and the CA hash lets the joining side verify the server before it trusts anything
//! else. A token is consumed with a compare-and-swap, so two joins racing on one token cannot
//! both succeed, even on two hub replicas.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fedmesh_api::{ClusterName, TrustDomain};
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

use crate::hub::records::{TokenRecord, now_unix, token_key};
use crate::store::{Compare, KvStore, Revision, StoreError, Txn, TxnOutcome};

const PREFIX: &str = "fmj1";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "join token is malformed: expected fmj1.<id>.<secret>.<ca hash>, as printed by `fedmesh hub token create`"
    )]
    Malformed,
    #[error("a token lifetime of {0:?} does not fit a date; give a shorter one")]
    Lifetime(Duration),
    #[error("join token {0} is unknown to this hub (was it created on another clusterset?)")]
    Unknown(String),
    #[error("join token {id} expired at {at}; create a new one")]
    Expired { id: String, at: String },
    #[error("join token {id} was already used at {at}; join tokens work once — create a new one")]
    Used { id: String, at: String },
    #[error("join token {id} was issued for {issued_for}, not {cluster}")]
    WrongCluster {
        id: String,
        issued_for: String,
        cluster: String,
    },
    #[error(
        "join token {id} was issued for trust domain {issued_for}, not {trust_domain}; a token registers one cluster in one trust domain"
    )]
    WrongTrustDomain {
        id: String,
        issued_for: String,
        trust_domain: String,
    },
    #[error("join token is invalid")]
    BadSecret,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A parsed token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    secret: String,
    /// SHA-256 of the server's CA certificate, hex.
    pub ca_pin: String,
}

impl JoinToken {
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let mut parts = s.trim().split('.');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(PREFIX), Some(id), Some(secret), Some(pin), None)
                if id.len() == 16
                    && id.bytes().all(|b| b.is_ascii_hexdigit())
                    && secret.len() >= 20
                    && pin.len() == 64
                    && pin.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(Self {
                    id: id.into(),
                    secret: secret.into(),
                    ca_pin: pin.to_ascii_lowercase(),
                })
            }
            _ => Err(TokenError::Malformed),
        }
    }

    fn secret_hash(&self) -> String {
        hex::encode(digest(&SHA256, self.secret.as_bytes()))
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_pin)
    }
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Failure of the OS RNG is not recoverable in a security context; refuse to make a token.
    SystemRandom::new().fill(&mut b).unwrap_or_else(|_| {
        tracing::error!("system random number generator failed");
        std::process::abort()
    });
    b
}

fn rfc3339(unix: i64) -> String {
    fedmesh_trust::svid::rfc3339(fedmesh_trust::svid::from_unix_secs(unix.max(0) as u64))
}

/// Creates and stores a one-time token that registers `cluster` with `trust_domain`, valid for
/// `ttl`.
pub async fn create(
    store: &dyn KvStore,
    cluster: &ClusterName,
    trust_domain: &TrustDomain,
    ttl: Duration,
    ca_pin: &str,
) -> Result<(JoinToken, i64), TokenError> {
    create_with(
        store,
        Some(cluster.to_string()),
        Some(trust_domain.clone()),
        false,
        ttl,
        ca_pin,
    )
    .await
}

/// Creates and stores a token; `subject: None` lets anyone holding it use it, `reusable` lets
/// them use it until it expires.
pub async fn create_with(
    store: &dyn KvStore,
    subject: Option<String>,
    trust_domain: Option<TrustDomain>,
    reusable: bool,
    ttl: Duration,
    ca_pin: &str,
) -> Result<(JoinToken, i64), TokenError> {
    let token = JoinToken {
        id: hex::encode(random::<8>()),
        secret: URL_SAFE_NO_PAD.encode(random::<24>()),
        ca_pin: ca_pin.to_string(),
    };
    let now = now_unix();
    // A lifetime past what a date can hold must not wrap round into the past.
    let expires = i64::try_from(ttl.as_secs())
        .ok()
        .and_then(|t| now.checked_add(t))
        .ok_or(TokenError::Lifetime(ttl))?;
    let record = TokenRecord {
        subject,
        trust_domain,
        reusable,
        secret_sha256: token.secret_hash(),
        created_unix: now,
        expires_unix: expires,
        used_unix: None,
    };
    let key = token_key(&token.id);
    let value = serde_json::to_vec(&record).unwrap_or_default();
    match store
        .commit(
            Txn::new()
                .when(Compare::Absent(key.clone()))
                .put(key, value),
        )
        .await?
    {
        TxnOutcome::Committed(_) => Ok((token, expires)),
        // 64 random bits colliding: practically impossible, but never overwrite.
        TxnOutcome::Failed => Err(TokenError::Malformed),
    }
}

/// Checks `token` for `cluster` and marks it used, atomically.
pub async fn consume(
    store: &dyn KvStore,
    token: &JoinToken,
    cluster: &ClusterName,
) -> Result<(), TokenError> {
    consume_as(store, token, cluster.as_str()).await
}

/// Checks `token` for `subject` without using it up: the secret first, so that only its holder
/// learns anything more about the token (or, from the caller's later checks, the clusterset).
pub async fn verify(
    store: &dyn KvStore,
    token: &JoinToken,
    subject: &str,
) -> Result<(), TokenError> {
    check(store, token, subject).await.map(|_| ())
}

/// The token's record and its mod revision, if the token is valid for `subject` now. A caller
/// that uses the token in a transaction of its own adds [`use_in`] to it.
pub async fn check(
    store: &dyn KvStore,
    token: &JoinToken,
    subject: &str,
) -> Result<(TokenRecord, Revision), TokenError> {
    let key = token_key(&token.id);
    let kv = store
        .get(&key)
        .await?
        .ok_or_else(|| TokenError::Unknown(token.id.clone()))?;
    let record: TokenRecord =
        serde_json::from_slice(&kv.value).map_err(|_| TokenError::Unknown(token.id.clone()))?;
    if record.secret_sha256 != token.secret_hash() {
        return Err(TokenError::BadSecret);
    }
    if let Some(issued_for) = &record.subject
        && issued_for != subject
    {
        return Err(TokenError::WrongCluster {
            id: token.id.clone(),
            issued_for: issued_for.clone(),
            cluster: subject.to_string(),
        });
    }
    if let Some(at) = record.used_unix {
        return Err(TokenError::Used {
            id: token.id.clone(),
            at: rfc3339(at),
        });
    }
    if now_unix() >= record.expires_unix {
        return Err(TokenError::Expired {
            id: token.id.clone(),
            at: rfc3339(record.expires_unix),
        });
    }
    Ok((record, kv.mod_revision))
}

/// Checks `token` for `subject` and, unless it is reusable, marks it used atomically.
pub async fn consume_as(
    store: &dyn KvStore,
    token: &JoinToken,
    subject: &str,
) -> Result<(), TokenError> {
    let (record, revision) = check(store, token, subject).await?;
    if record.reusable {
        return Ok(());
    }
    match store
        .commit(use_in(Txn::new(), token, record, revision))
        .await?
    {
        TxnOutcome::Committed(_) => Ok(()),
        TxnOutcome::Failed => Err(TokenError::Used {
            id: token.id.clone(),
            at: "just now, by a concurrent join".into(),
        }),
    }
}

/// Adds to `txn` the use of a token [`check`]ed at `revision`: the transaction fails if the token
/// changed (was used) since. Reusable tokens are left as they are.
pub fn use_in(txn: Txn, token: &JoinToken, mut record: TokenRecord, revision: Revision) -> Txn {
    if record.reusable {
        return txn;
    }
    let key = token_key(&token.id);
    record.used_unix = Some(now_unix());
    let value = serde_json::to_vec(&record).unwrap_or_default();
    txn.when(Compare::ModRevision(key.clone(), revision))
        .put(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused() {
        let t = JoinToken {
            id: "0123456789abcdef".into(),
            secret: "abcdefghijklmnopqrstuvwx".into(),
            ca_pin: "a".repeat(64),
        };
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        for bad in [
            "",
            "fmj1",
            "fmj2.0123456789abcdef.abcdefghijklmnopqrstu.aa",
            "fmj1.xyz.abc.def",
            &format!("fmj1.0123456789abcdef.short.{}", "a".repeat(64)),
        ] {
            assert!(
                matches!(JoinToken::parse(bad), Err(TokenError::Malformed)),
                "{bad}"
            );
        }
    }
}
