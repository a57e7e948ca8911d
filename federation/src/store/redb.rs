//! The embedded store: one redb file. Each transaction is one redb write transaction (fsynced on
//! commit), bumps the revision, and appends its events to a change log so watchers — and hubs
//! restarted later — can ask for everything after a revision. The log keeps the most recent
//! [`LOG_RETENTION`] revisions.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{
    Compare, Event, KeyValue, KvStore, Op, Revision, StoreError, Txn, TxnOutcome, WatchBatch,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
const COMPACTED: &str = "compacted";
/// Revisions of history kept for resuming watchers.
pub const LOG_RETENTION: u64 = 200_000;

/// Log entries a catching-up watcher reads at a time.
const HISTORY_PAGE: usize = 1024;

pub struct RedbStore {
    db: Arc<Database>,
    events: broadcast::Sender<Arc<WatchBatch>>,
    /// Held from the start of a write transaction until its batch is broadcast, so watchers
    /// receive batches in revision order.
    write_lock: Arc<std::sync::Mutex<()>>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the database file. Only one process may hold it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let db = Database::create(path).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot open {}: {e} (is another hub using it?)",
                path.display()
            ))
        })?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(KV).map_err(err)?;
            txn.open_table(LOG).map_err(err)?;
            txn.open_table(META).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(Self {
            db: Arc::new(db),
            events: broadcast::channel(1024).0,
            write_lock: Arc::new(std::sync::Mutex::new(())),
        })
    }
}

/// Value records: create revision, mod revision, then the value.
fn encode_record(create: Revision, modr: Revision, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + value.len());
    v.extend_from_slice(&create.to_be_bytes());
    v.extend_from_slice(&modr.to_be_bytes());
    v.extend_from_slice(value);
    v
}

fn decode_record(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < 16 {
        return Err(StoreError::Corrupt(format!("record of {key} is truncated")));
    }
    let rev = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    Ok(KeyValue {
        key: key.to_string(),
        create_revision: rev(&raw[..8]),
        mod_revision: rev(&raw[8..16]),
        value: raw[16..].to_vec(),
    })
}

/// Log entries: a list of (kind, key, value) for one revision.
fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        match e {
            Event::Put(kv) => {
                out.push(b'P');
                put_bytes(&mut out, kv.key.as_bytes());
                out.extend_from_slice(&kv.create_revision.to_be_bytes());
                put_bytes(&mut out, &kv.value);
            }
            Event::Delete { key, .. } => {
                out.push(b'D');
                put_bytes(&mut out, key.as_bytes());
            }
        }
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn decode_events(revision: Revision, mut raw: &[u8]) -> Result<Vec<Event>, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("change log entry {revision} is malformed"));
    fn take<'a>(raw: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (a, b) = (raw.get(..n)?, raw.get(n..)?);
        *raw = b;
        Some(a)
    }
    fn bytes<'a>(raw: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(take(raw, 4)?.try_into().ok()?) as usize;
        take(raw, len)
    }
    let mut events = Vec::new();
    while !raw.is_empty() {
        let kind = take(&mut raw, 1).ok_or_else(corrupt)?[0];
        let key = String::from_utf8(bytes(&mut raw).ok_or_else(corrupt)?.to_vec())
            .map_err(|_| corrupt())?;
        match kind {
            b'P' => {
                let create = u64::from_be_bytes(
                    take(&mut raw, 8)
                        .ok_or_else(corrupt)?
                        .try_into()
                        .map_err(|_| corrupt())?,
                );
                let value = bytes(&mut raw).ok_or_else(corrupt)?.to_vec();
                events.push(Event::Put(KeyValue {
                    key,
                    value,
                    create_revision: create,
                    mod_revision: revision,
                }));
            }
            b'D' => events.push(Event::Delete { key, revision }),
            _ => return Err(corrupt()),
        }
    }
    Ok(events)
}

impl RedbStore {
    fn commit_blocking(
        db: &Database,
        txn: Txn,
    ) -> Result<(TxnOutcome, Option<WatchBatch>), StoreError> {
        let w = db.begin_write().map_err(err)?;
        let outcome;
        let batch;
        {
            let mut kv = w.open_table(KV).map_err(err)?;
            for c in &txn.compares {
                let holds = match c {
                    Compare::Absent(k) => kv.get(k.as_str()).map_err(err)?.is_none(),
                    Compare::ModRevision(k, r) => match kv.get(k.as_str()).map_err(err)? {
                        Some(raw) => decode_record(k, raw.value())?.mod_revision == *r,
                        None => false,
                    },
                };
                if !holds {
                    return Ok((TxnOutcome::Failed, None));
                }
            }
            let mut meta = w.open_table(META).map_err(err)?;
            let revision = meta
                .get(REVISION)
                .map_err(err)?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            let mut events = Vec::with_capacity(txn.ops.len());
            for op in &txn.ops {
                match op {
                    Op::Put(k, v) => {
                        let create = match kv.get(k.as_str()).map_err(err)? {
                            Some(raw) => decode_record(k, raw.value())?.create_revision,
                            None => revision,
                        };
                        kv.insert(k.as_str(), encode_record(create, revision, v).as_slice())
                            .map_err(err)?;
                        events.push(Event::Put(KeyValue {
                            key: k.clone(),
                            value: v.clone(),
                            create_revision: create,
                            mod_revision: revision,
                        }));
                    }
                    Op::Delete(k) => {
                        if kv.remove(k.as_str()).map_err(err)?.is_some() {
                            events.push(Event::Delete {
                                key: k.clone(),
                                revision,
                            });
                        }
                    }
                }
            }
            if events.is_empty() {
                // Nothing changed (e.g. deleting a missing key): no new revision, as in etcd.
                return Ok((TxnOutcome::Committed(revision - 1), None));
            }
            meta.insert(REVISION, revision).map_err(err)?;
            let mut log = w.open_table(LOG).map_err(err)?;
            log.insert(revision, encode_events(&events).as_slice())
                .map_err(err)?;
            // Keep the log bounded: drop the oldest entries past the retention window.
            if revision > LOG_RETENTION {
                let floor = revision - LOG_RETENTION;
                let compacted = meta
                    .get(COMPACTED)
                    .map_err(err)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                if floor > compacted {
                    let old: Vec<u64> = log
                        .range(compacted..=floor)
                        .map_err(err)?
                        .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                        .collect();
                    for r in old {
                        log.remove(r).map_err(err)?;
                    }
                    meta.insert(COMPACTED, floor).map_err(err)?;
                }
            }
            outcome = TxnOutcome::Committed(revision);
            batch = Some(WatchBatch { revision, events });
        }
        w.commit().map_err(err)?;
        Ok((outcome, batch))
    }

    /// Up to `limit` log entries after `after` (exclusive). A watcher far behind reads the log a
    /// page at a time, so catching up never holds the whole retained log in memory.
    fn history_blocking(
        db: &Database,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<WatchBatch>, StoreError> {
        let r = db.begin_read().map_err(err)?;
        let meta = r.open_table(META).map_err(err)?;
        let compacted = meta
            .get(COMPACTED)
            .map_err(err)?
            .map(|v| v.value())
            .unwrap_or(0);
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted,
            });
        }
        let log = r.open_table(LOG).map_err(err)?;
        let mut out = Vec::new();
        for entry in log.range(after + 1..).map_err(err)?.take(limit) {
            let (k, v) = entry.map_err(err)?;
            let revision = k.value();
            out.push(WatchBatch {
                revision,
                events: decode_events(revision, v.value())?,
            });
        }
        Ok(out)
    }
}

fn filter(batch: &WatchBatch, prefix: &str) -> Option<WatchBatch> {
    let events: Vec<Event> = batch
        .events
        .iter()
        .filter(|e| e.key().starts_with(prefix))
        .cloned()
        .collect();
    (!events.is_empty()).then_some(WatchBatch {
        revision: batch.revision,
        events,
    })
}

impl KvStore for RedbStore {
    fn backend(&self) -> &'static str {
        "redb"
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<KeyValue>, StoreError>> {
        let (db, key) = (self.db.clone(), key.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let r = db.begin_read().map_err(err)?;
                let kv = r.open_table(KV).map_err(err)?;
                match kv.get(key.as_str()).map_err(err)? {
                    Some(raw) => Ok(Some(decode_record(&key, raw.value())?)),
                    None => Ok(None),
                }
            })
            .await
            .map_err(err)?
        })
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<(Vec<KeyValue>, Revision), StoreError>> {
        let (db, prefix) = (self.db.clone(), prefix.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let r = db.begin_read().map_err(err)?;
                let revision = r
                    .open_table(META)
                    .map_err(err)?
                    .get(REVISION)
                    .map_err(err)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                let kv = r.open_table(KV).map_err(err)?;
                let mut out = Vec::new();
                for entry in kv.range(prefix.as_str()..).map_err(err)? {
                    let (k, v) = entry.map_err(err)?;
                    if !k.value().starts_with(prefix.as_str()) {
                        break;
                    }
                    out.push(decode_record(k.value(), v.value())?);
                }
                Ok((out, revision))
            })
            .await
            .map_err(err)?
        })
    }

    fn commit(&self, txn: Txn) -> BoxFuture<'_, Result<TxnOutcome, StoreError>> {
        let db = self.db.clone();
        let events = self.events.clone();
        let lock = self.write_lock.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let _order = lock.lock().unwrap_or_else(|p| p.into_inner());
                let (outcome, batch) = Self::commit_blocking(&db, txn)?;
                if let Some(b) = batch {
                    let _ = events.send(Arc::new(b));
                }
                Ok(outcome)
            })
            .await
            .map_err(err)?
        })
    }

    fn revision(&self) -> BoxFuture<'_, Result<Revision, StoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let r = db.begin_read().map_err(err)?;
                Ok(r.open_table(META)
                    .map_err(err)?
                    .get(REVISION)
                    .map_err(err)?
                    .map(|v| v.value())
                    .unwrap_or(0))
            })
            .await
            .map_err(err)?
        })
    }

    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> BoxStream<'static, Result<WatchBatch, StoreError>> {
        let db = self.db.clone();
        // Subscribe before reading history, so nothing falls between the two.
        let rx = self.events.subscribe();
        let prefix = prefix.to_string();
        struct State {
            db: Arc<Database>,
            rx: broadcast::Receiver<Arc<WatchBatch>>,
            prefix: String,
            last: Revision,
            backlog: std::collections::VecDeque<WatchBatch>,
            caught_up: bool,
            failed: bool,
        }
        let state = State {
            db,
            rx,
            prefix,
            last: after,
            backlog: Default::default(),
            caught_up: false,
            failed: false,
        };
        Box::pin(futures::stream::unfold(state, |mut s| async move {
            if s.failed {
                return None;
            }
            loop {
                if let Some(b) = s.backlog.pop_front() {
                    s.last = b.revision;
                    if let Some(f) = filter(&b, &s.prefix) {
                        return Some((Ok(f), s));
                    }
                    continue;
                }
                if !s.caught_up {
                    let (db, last) = (s.db.clone(), s.last);
                    let history = tokio::task::spawn_blocking(move || {
                        Self::history_blocking(&db, last, HISTORY_PAGE)
                    })
                    .await
                    .map_err(err)
                    .and_then(|r| r);
                    match history {
                        Ok(h) => {
                            // A short page is the end of the log; the live feed takes over.
                            s.caught_up = h.len() < HISTORY_PAGE;
                            s.backlog.extend(h);
                            continue;
                        }
                        Err(e) => {
                            s.failed = true;
                            return Some((Err(e), s));
                        }
                    }
                }
                match s.rx.recv().await {
                    // A gap means we missed a batch: read it back from the log.
                    Ok(b) if b.revision > s.last + 1 => s.caught_up = false,
                    Ok(b) if b.revision > s.last => {
                        s.last = b.revision;
                        if let Some(f) = filter(&b, &s.prefix) {
                            return Some((Ok(f), s));
                        }
                    }
                    Ok(_) => {}
                    // Fell behind the live feed: catch up from the log.
                    Err(broadcast::error::RecvError::Lagged(_)) => s.caught_up = false,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }))
    }
}
