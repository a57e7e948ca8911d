//! The HA store: etcd. Several hub replicas share one etcd; its revision is the clusterset view
//! version, its history answers "what changed since R", and its transactions give the
//! compare-and-swap that join tokens and cluster records need. All keys live under a namespace
//! prefix so one etcd can serve other users too.

use std::time::Duration;

use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, EventType, GetOptions, Txn as ETxn,
    TxnOp, WatchOptions,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::{
    Compare, Event, KeyValue, KvStore, Op, Revision, StoreError, Txn, TxnOutcome, WatchBatch,
};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

pub struct EtcdStore {
    client: Client,
    namespace: String,
}

fn err(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to etcd; keys are stored under `namespace` (e.g. `/fedmesh`).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(opts)).await.map_err(|e| {
            StoreError::Unavailable(format!("cannot reach etcd at {}: {e}", endpoints.join(",")))
        })?;
        let store = Self {
            client,
            namespace: namespace.trim_end_matches('/').to_string(),
        };
        // Fail at startup, not at the first request, when etcd is not there.
        store.revision().await.map_err(|e| {
            StoreError::Unavailable(format!("cannot reach etcd at {}: {e}", endpoints.join(",")))
        })?;
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}/{}", self.namespace, key)
    }

    fn strip(&self, key: &[u8]) -> Result<String, StoreError> {
        let k = std::str::from_utf8(key)
            .map_err(|_| StoreError::Corrupt("non-UTF-8 key in etcd".into()))?;
        Ok(k.strip_prefix(&format!("{}/", self.namespace))
            .unwrap_or(k)
            .to_string())
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision() as u64,
            mod_revision: kv.mod_revision() as u64,
        })
    }
}

impl KvStore for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<KeyValue>, StoreError>> {
        let key = self.full(key);
        Box::pin(async move {
            let mut c = self.client.kv_client();
            let resp = c.get(key, None).await.map_err(err)?;
            resp.kvs().first().map(|kv| self.kv(kv)).transpose()
        })
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<(Vec<KeyValue>, Revision), StoreError>> {
        let prefix = self.full(prefix);
        Box::pin(async move {
            let mut c = self.client.kv_client();
            let resp = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(err)?;
            let revision = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
            let kvs = resp
                .kvs()
                .iter()
                .map(|kv| self.kv(kv))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((kvs, revision))
        })
    }

    fn commit(&self, txn: Txn) -> BoxFuture<'_, Result<TxnOutcome, StoreError>> {
        Box::pin(async move {
            if txn.ops.len() > MAX_TXN_OPS {
                return Err(StoreError::TooLarge(txn.ops.len(), MAX_TXN_OPS));
            }
            let compares: Vec<ECompare> = txn
                .compares
                .iter()
                .map(|c| match c {
                    // A key that never existed (or was deleted) has create revision 0.
                    Compare::Absent(k) => {
                        ECompare::create_revision(self.full(k), CompareOp::Equal, 0)
                    }
                    Compare::ModRevision(k, r) => {
                        ECompare::mod_revision(self.full(k), CompareOp::Equal, *r as i64)
                    }
                })
                .collect();
            let ops: Vec<TxnOp> = txn
                .ops
                .iter()
                .map(|o| match o {
                    Op::Put(k, v) => TxnOp::put(self.full(k), v.clone(), None),
                    Op::Delete(k) => TxnOp::delete(self.full(k), None),
                })
                .collect();
            let mut c = self.client.kv_client();
            let resp = c
                .txn(ETxn::new().when(compares).and_then(ops))
                .await
                .map_err(err)?;
            if !resp.succeeded() {
                return Ok(TxnOutcome::Failed);
            }
            Ok(TxnOutcome::Committed(
                resp.header().map(|h| h.revision() as u64).unwrap_or(0),
            ))
        })
    }

    fn revision(&self) -> BoxFuture<'_, Result<Revision, StoreError>> {
        let key = self.full("\0revision-probe");
        Box::pin(async move {
            let mut c = self.client.kv_client();
            let resp = c
                .get(key, Some(GetOptions::new().with_count_only()))
                .await
                .map_err(err)?;
            Ok(resp.header().map(|h| h.revision() as u64).unwrap_or(0))
        })
    }

    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> BoxStream<'static, Result<WatchBatch, StoreError>> {
        let client = self.client.clone();
        let full_prefix = self.full(prefix);
        let namespace = self.namespace.clone();
        let me = EtcdStore {
            client: client.clone(),
            namespace,
        };
        let stream = async_watch(me, full_prefix, after);
        Box::pin(stream)
    }
}

fn async_watch(
    store: EtcdStore,
    prefix: String,
    after: Revision,
) -> impl futures::Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static {
    struct State {
        store: EtcdStore,
        prefix: String,
        after: Revision,
        stream: Option<etcd_client::WatchStream>,
        pending: std::collections::VecDeque<WatchBatch>,
        done: bool,
    }
    let state = State {
        store,
        prefix,
        after,
        stream: None,
        pending: Default::default(),
        done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if let Some(b) = s.pending.pop_front() {
                s.after = b.revision;
                return Some((Ok(b), s));
            }
            if s.stream.is_none() {
                let mut w = s.store.client.watch_client();
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(s.after as i64 + 1);
                match w.watch(s.prefix.clone(), Some(opts)).await {
                    Ok(stream) => s.stream = Some(stream),
                    Err(e) => {
                        s.done = true;
                        return Some((Err(err(e)), s));
                    }
                }
            }
            let Some(stream) = s.stream.as_mut() else {
                continue;
            };
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    s.done = true;
                    return Some((Err(StoreError::Unavailable("etcd watch closed".into())), s));
                }
                Err(e) => {
                    s.done = true;
                    return Some((Err(err(e)), s));
                }
            };
            if msg.canceled() {
                s.done = true;
                let e = if msg.compact_revision() > 0 {
                    StoreError::Compacted {
                        requested: s.after,
                        oldest: msg.compact_revision() as u64,
                    }
                } else {
                    StoreError::Unavailable(format!("etcd watch canceled: {}", msg.cancel_reason()))
                };
                return Some((Err(e), s));
            }
            // One response may span several revisions: regroup by revision.
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                let revision = kv.mod_revision() as u64;
                let event = match ev.event_type() {
                    EventType::Put => match s.store.kv(kv) {
                        Ok(kv) => Event::Put(kv),
                        Err(e) => return Some((Err(e), s)),
                    },
                    EventType::Delete => match s.store.strip(kv.key()) {
                        Ok(key) => Event::Delete { key, revision },
                        Err(e) => return Some((Err(e), s)),
                    },
                };
                match s.pending.back_mut() {
                    Some(b) if b.revision == revision => b.events.push(event),
                    _ => s.pending.push_back(WatchBatch {
                        revision,
                        events: vec![event],
                    }),
                }
            }
        }
    })
}
