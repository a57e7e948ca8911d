//! The embedded store: one redb file. Each transaction is one redb write transaction (fsynced on
//! commit), bumps the revision, and appends its events to a change log so watchers — and hubs
//! restarted later — can ask for everything after a revision. The log keeps the most recent
//! [`LOG_RETENTION`] revisions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// After a failed reopen, operations fail at once with its error for this long before the next
/// attempt (a full disk is not cleared in microseconds).
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);

pub struct RedbStore {
    db: Arc<Handle>,
    events: broadcast::Sender<Arc<WatchBatch>>,
    /// Held from the start of a write transaction until its batch is broadcast, so watchers
    /// receive batches in revision order.
    write_lock: Arc<Mutex<()>>,
}

/// Why one operation failed: redb's own error (an I/O error among them spends the handle), or
/// one of ours (a malformed record, compacted history).
enum Fail {
    Redb(redb::Error),
    Store(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

fn err(e: impl Into<redb::Error>) -> Fail {
    Fail::Redb(e.into())
}

fn joined(e: tokio::task::JoinError) -> StoreError {
    StoreError::Unavailable(format!("a store operation did not finish: {e}"))
}

/// The open database file. redb answers every call after one I/O error (a full disk, a failing
/// device) with `PreviousIo`, reads included, until the file is closed and opened again. So an
/// I/O error spends the handle here, and the next operation opens the file afresh: redb finds its
/// last commit, and writes succeed again once the disk has room, with no restart. Nothing but
/// this slot keeps a `Database` beyond one operation, so a spent one closes (and releases the
/// file's lock) as soon as the operations still running on it end.
struct Handle {
    path: PathBuf,
    slot: Mutex<Slot>,
}

enum Slot {
    Open(Arc<Database>),
    /// Spent, or its reopen failed: the error, and when to try again.
    Closed(Option<(StoreError, Instant)>),
}

impl Handle {
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Slot::Open(db) => return Ok(db.clone()),
            Slot::Closed(Some((e, retry))) if Instant::now() < *retry => return Err(e.clone()),
            Slot::Closed(_) => {}
        }
        match open_database(&self.path) {
            Ok(db) => {
                tracing::info!(path = %self.path.display(), "store file reopened after an I/O error");
                let db = Arc::new(db);
                *slot = Slot::Open(db.clone());
                Ok(db)
            }
            Err(e) => {
                let e = self.describe(e);
                *slot = Slot::Closed(Some((e.clone(), Instant::now() + REOPEN_BACKOFF)));
                Err(e)
            }
        }
    }

    /// Runs one (blocking) operation on the database.
    fn run<T>(&self, op: impl FnOnce(&Database) -> Result<T, Fail>) -> Result<T, StoreError> {
        let db = self.db()?;
        match op(&db) {
            Ok(v) => Ok(v),
            Err(Fail::Store(e)) => Err(e),
            Err(Fail::Redb(e)) => {
                if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
                    let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                    if matches!(&*slot, Slot::Open(d) if Arc::ptr_eq(d, &db)) {
                        *slot = Slot::Closed(None);
                    }
                }
                Err(self.describe(Fail::Redb(e)))
            }
        }
    }

    /// A redb error as the operator should read it: what is wrong and what to do.
    fn describe(&self, e: Fail) -> StoreError {
        let path = self.path.display();
        match e {
            Fail::Store(e) => e,
            Fail::Redb(redb::Error::Io(io))
                if io.kind() == std::io::ErrorKind::StorageFull
                    || io.raw_os_error() == Some(libc::ENOSPC) =>
            {
                StoreError::Unavailable(format!(
                    "no space left on the device holding {path}: free space there; what is \
                     stored is kept, and writes resume once there is room (no restart needed)"
                ))
            }
            Fail::Redb(redb::Error::Io(io)) => {
                StoreError::Unavailable(format!("I/O error on {path}: {io}"))
            }
            Fail::Redb(redb::Error::PreviousIo) => StoreError::Unavailable(format!(
                "{path} failed an earlier write; it is opened again at the next operation"
            )),
            Fail::Redb(redb::Error::DatabaseAlreadyOpen) => StoreError::Unavailable(format!(
                "cannot open {path}: it is in use (by another hub, or by operations still \
                 running on a handle spent by an I/O error)"
            )),
            Fail::Redb(e) => StoreError::Unavailable(format!("{path}: {e}")),
        }
    }
}

/// redb's page cache. Its default (1 GiB) fills with every page a commit writes, and the hub
/// commits often (presence heartbeats, publishes) while it reads the store rarely (a cluster's
/// exports, catch-up history): the view in memory answers everything else.
const CACHE_BYTES: usize = 64 << 20;

/// Opens (or creates) the file and its tables.
fn open_database(path: &Path) -> Result<Database, Fail> {
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(err)?;
    let txn = db.begin_write().map_err(err)?;
    {
        txn.open_table(KV).map_err(err)?;
        txn.open_table(LOG).map_err(err)?;
        txn.open_table(META).map_err(err)?;
    }
    txn.commit().map_err(err)?;
    Ok(db)
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
        let handle = Handle {
            path: path.to_path_buf(),
            slot: Mutex::new(Slot::Closed(None)),
        };
        let db = open_database(path).map_err(|e| match e {
            Fail::Redb(redb::Error::DatabaseAlreadyOpen) => StoreError::Unavailable(format!(
                "cannot open {}: another hub is using it",
                path.display()
            )),
            e => handle.describe(e),
        })?;
        *handle.slot.lock().unwrap_or_else(|p| p.into_inner()) = Slot::Open(Arc::new(db));
        Ok(Self {
            db: Arc::new(handle),
            events: broadcast::channel(1024).0,
            write_lock: Arc::new(Mutex::new(())),
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
    fn commit_blocking(db: &Database, txn: Txn) -> Result<(TxnOutcome, Option<WatchBatch>), Fail> {
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
    ) -> Result<Vec<WatchBatch>, Fail> {
        let r = db.begin_read().map_err(err)?;
        let meta = r.open_table(META).map_err(err)?;
        let compacted = meta
            .get(COMPACTED)
            .map_err(err)?
            .map(|v| v.value())
            .unwrap_or(0);
        if after < compacted {
            return Err(Fail::Store(StoreError::Compacted {
                requested: after,
                oldest: compacted,
            }));
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
                db.run(|db| {
                    let r = db.begin_read().map_err(err)?;
                    let kv = r.open_table(KV).map_err(err)?;
                    match kv.get(key.as_str()).map_err(err)? {
                        Some(raw) => Ok(Some(decode_record(&key, raw.value())?)),
                        None => Ok(None),
                    }
                })
            })
            .await
            .map_err(joined)?
        })
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<(Vec<KeyValue>, Revision), StoreError>> {
        let (db, prefix) = (self.db.clone(), prefix.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                db.run(|db| {
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
            })
            .await
            .map_err(joined)?
        })
    }

    fn commit(&self, txn: Txn) -> BoxFuture<'_, Result<TxnOutcome, StoreError>> {
        let db = self.db.clone();
        let events = self.events.clone();
        let lock = self.write_lock.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let _order = lock.lock().unwrap_or_else(|p| p.into_inner());
                let (outcome, batch) = db.run(|db| Self::commit_blocking(db, txn))?;
                if let Some(b) = batch {
                    let _ = events.send(Arc::new(b));
                }
                Ok(outcome)
            })
            .await
            .map_err(joined)?
        })
    }

    fn revision(&self) -> BoxFuture<'_, Result<Revision, StoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                db.run(|db| {
                    let r = db.begin_read().map_err(err)?;
                    Ok(r.open_table(META)
                        .map_err(err)?
                        .get(REVISION)
                        .map_err(err)?
                        .map(|v| v.value())
                        .unwrap_or(0))
                })
            })
            .await
            .map_err(joined)?
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
            db: Arc<Handle>,
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
                        db.run(|db| Self::history_blocking(db, last, HISTORY_PAGE))
                    })
                    .await
                    .map_err(joined)
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
