//! The hub's storage: a revisioned key-value store with watch, behind one trait.
//!
//! Two backends share one test suite: [`redb`](RedbStore) (default; one crash-safe file) and
//! [`etcd`](EtcdStore) (several hub replicas on one etcd). Every write gets a store-wide
//! revision, increasing by one per committed transaction; hubs use that revision as the version of
//! the clusterset view, so a control plane can resume on any replica. History is kept (etcd's own,
//! or redb's change log) so "what changed since revision R" can be answered after a restart.

mod etcd;
mod redb;

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use self::etcd::{EtcdSecurity, EtcdStore, MAX_TXN_OPS};
pub use self::redb::RedbStore;

pub type Revision = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// The events of one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// A condition a transaction checks before applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists with this mod revision (optimistic concurrency).
    ModRevision(String, Revision),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// An atomic transaction: if every compare holds, apply every op at one new revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put(key.into(), value));
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete(key.into()));
        self
    }
}

/// What a committed transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied at this revision.
    Committed(Revision),
    /// A compare did not hold; nothing was written.
    Failed,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "history since revision {requested} is no longer kept (oldest available: {oldest}); relist"
    )]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error(
        "invalid store location {0:?}: use redb:PATH or etcd:http://HOST:PORT[,http://HOST:PORT...]"
    )]
    BadLocation(String),
    #[error("transaction too large: {0} operations (etcd allows at most {1} per transaction)")]
    TooLarge(usize, usize),
}

pub trait KvStore: Send + Sync + 'static {
    /// `redb` or `etcd`, for logs and the admin API.
    fn backend(&self) -> &'static str;

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<KeyValue>, StoreError>>;

    /// Every key under `prefix`, in key order, as of the returned revision.
    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<(Vec<KeyValue>, Revision), StoreError>>;

    fn commit(&self, txn: Txn) -> BoxFuture<'_, Result<TxnOutcome, StoreError>>;

    /// The current revision.
    fn revision(&self) -> BoxFuture<'_, Result<Revision, StoreError>>;

    /// Changes under `prefix` after revision `after`, in revision order, then live. Fails with
    /// [`StoreError::Compacted`] when that history is gone.
    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> BoxStream<'static, Result<WatchBatch, StoreError>>;
}

/// Opens a store from `redb:PATH` or `etcd:URL[,URL...]` (plain etcd on loopback only).
pub async fn open(location: &str) -> Result<Arc<dyn KvStore>, StoreError> {
    open_with(location, &EtcdSecurity::default()).await
}

/// Opens a store from `redb:PATH` or `etcd:URL[,URL...]`, reaching etcd with `etcd`.
pub async fn open_with(
    location: &str,
    etcd: &EtcdSecurity,
) -> Result<Arc<dyn KvStore>, StoreError> {
    if let Some(path) = location.strip_prefix("redb:") {
        if path.is_empty() {
            return Err(StoreError::BadLocation(location.into()));
        }
        Ok(Arc::new(RedbStore::open(std::path::Path::new(path))?))
    } else if let Some(urls) = location.strip_prefix("etcd:") {
        let endpoints: Vec<String> = urls
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::BadLocation(location.into()));
        }
        Ok(Arc::new(
            EtcdStore::connect_with(&endpoints, "/fedmesh", etcd).await?,
        ))
    } else {
        Err(StoreError::BadLocation(location.into()))
    }
}

/// Convenience: a transaction of plain puts.
pub async fn put(store: &dyn KvStore, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
    match store.commit(Txn::new().put(key, value)).await? {
        TxnOutcome::Committed(r) => Ok(r),
        TxnOutcome::Failed => Err(StoreError::Corrupt("unconditional put failed".into())),
    }
}
