//! One test suite for both store backends: redb (a file) and etcd (a real etcd process).

mod common;

use std::sync::Arc;
use std::time::Duration;

use fedmesh_federation::store::{
    Compare, EtcdSecurity, EtcdStore, Event, KvStore, RedbStore, StoreError, Txn, TxnOutcome,
    WatchBatch,
};
use fedmesh_test_support::EtcdServer;
use futures::StreamExt;
use futures::stream::BoxStream;

async fn next_batch(w: &mut BoxStream<'static, Result<WatchBatch, StoreError>>) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a watch event within 10s")
        .expect("stream open")
        .expect("no error")
}

fn committed(o: TxnOutcome) -> u64 {
    match o {
        TxnOutcome::Committed(r) => r,
        TxnOutcome::Failed => panic!("transaction unexpectedly failed"),
    }
}

/// The behaviour both backends must share.
async fn suite(store: Arc<dyn KvStore>) {
    let r0 = store.revision().await.unwrap();

    // Puts: one revision per transaction, create/mod revisions tracked.
    let r1 = committed(
        store
            .commit(Txn::new().put("a/1", b"one".to_vec()))
            .await
            .unwrap(),
    );
    assert_eq!(r1, r0 + 1);
    let r2 = committed(
        store
            .commit(Txn::new().put("a/1", b"uno".to_vec()))
            .await
            .unwrap(),
    );
    assert_eq!(r2, r1 + 1);
    let kv = store.get("a/1").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"uno"[..], r1, r2)
    );
    assert!(store.get("a/missing").await.unwrap().is_none());

    // A multi-op transaction is one revision.
    let r3 = committed(
        store
            .commit(
                Txn::new()
                    .put("a/2", b"two".to_vec())
                    .put("a/3", b"three".to_vec())
                    .put("b/1", vec![]),
            )
            .await
            .unwrap(),
    );
    assert_eq!(r3, r2 + 1);

    // List: key order, only the prefix, with the snapshot revision.
    let (kvs, rev) = store.list("a/").await.unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2", "a/3"]
    );
    assert!(rev >= r3);
    assert!(kvs.iter().all(|k| k.mod_revision <= rev));

    // Compare-and-swap.
    let absent = |k: &str| Compare::Absent(k.into());
    assert_eq!(
        store
            .commit(Txn::new().when(absent("a/1")).put("a/1", vec![]))
            .await
            .unwrap(),
        TxnOutcome::Failed
    );
    assert_eq!(store.get("a/1").await.unwrap().unwrap().value, b"uno");
    let r4 = committed(
        store
            .commit(Txn::new().when(absent("t/x")).put("t/x", b"mine".to_vec()))
            .await
            .unwrap(),
    );
    assert_eq!(
        store
            .commit(
                Txn::new()
                    .when(absent("t/x"))
                    .put("t/x", b"theirs".to_vec())
            )
            .await
            .unwrap(),
        TxnOutcome::Failed,
        "only one writer wins"
    );
    assert_eq!(
        store
            .commit(
                Txn::new()
                    .when(Compare::ModRevision("t/x".into(), r4 - 1))
                    .put("t/x", vec![])
            )
            .await
            .unwrap(),
        TxnOutcome::Failed
    );
    let r5 = committed(
        store
            .commit(
                Txn::new()
                    .when(Compare::ModRevision("t/x".into(), r4))
                    .put("t/x", b"used".to_vec()),
            )
            .await
            .unwrap(),
    );

    // Deletes; deleting a missing key changes nothing.
    let r6 = committed(store.commit(Txn::new().delete("a/2")).await.unwrap());
    assert!(r6 > r5);
    assert!(store.get("a/2").await.unwrap().is_none());
    let noop = committed(store.commit(Txn::new().delete("a/never")).await.unwrap());
    assert_eq!(noop, r6, "no revision for a no-op");

    // Watch from the past replays history (prefix-filtered, grouped by revision), then goes live.
    let mut w = store.watch("a/", r0);
    let b = next_batch(&mut w).await;
    assert_eq!(b.revision, r1);
    assert!(matches!(&b.events[..], [Event::Put(kv)] if kv.key == "a/1" && kv.value == b"one"));
    assert_eq!(next_batch(&mut w).await.revision, r2);
    let b = next_batch(&mut w).await;
    assert_eq!((b.revision, b.events.len()), (r3, 2), "b/1 is filtered out");
    let b = next_batch(&mut w).await;
    assert_eq!(b.revision, r6);
    assert!(
        matches!(&b.events[..], [Event::Delete { key, revision }] if key == "a/2" && *revision == r6)
    );
    let r7 = committed(
        store
            .commit(Txn::new().put("a/4", b"live".to_vec()))
            .await
            .unwrap(),
    );
    let b = next_batch(&mut w).await;
    assert_eq!(b.revision, r7);

    // A second watcher from "now" sees only what follows.
    let mut w2 = store.watch("", r7);
    let r8 = committed(store.commit(Txn::new().put("c/1", vec![1])).await.unwrap());
    assert_eq!(next_batch(&mut w2).await.revision, r8);
}

/// Concurrent writers while a watcher is live: it must see every revision exactly once, in order.
async fn concurrent_commits_are_all_watched(store: Arc<dyn KvStore>) {
    const WRITERS: usize = 8;
    const EACH: usize = 60;
    let from = store.revision().await.unwrap();
    let mut w = store.watch("cc/", from);
    // The watcher is caught up and live before any write happens.
    let marker = committed(
        store
            .commit(Txn::new().put("cc/start", vec![]))
            .await
            .unwrap(),
    );
    assert_eq!(next_batch(&mut w).await.revision, marker);
    let consumer = tokio::spawn(async move {
        let (mut last, mut seen) = (marker, 0);
        while seen < WRITERS * EACH {
            let b = next_batch(&mut w).await;
            assert_eq!(
                b.revision,
                last + 1,
                "revisions arrive in order, none missing"
            );
            last = b.revision;
            seen += b.events.len();
        }
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    committed(
                        store
                            .commit(Txn::new().put(format!("cc/{t}/{i}"), vec![1]))
                            .await
                            .unwrap(),
                    );
                }
            })
        })
        .collect();
    for h in writers {
        h.await.unwrap();
    }
    consumer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_concurrent_commits_are_all_watched() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_commits_are_all_watched(Arc::new(
        RedbStore::open(&dir.path().join("hub.redb")).unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_concurrent_commits_are_all_watched() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    concurrent_commits_are_all_watched(Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.url), "/cc")
            .await
            .unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn redb_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(
        RedbStore::open(&dir.path().join("hub.redb")).unwrap(),
    ))
    .await;
}

/// The suite over TLS with a client certificate and an etcd user, as a hub should run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_suite() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start_secure)
        .await
        .unwrap();
    suite(Arc::new(
        EtcdStore::connect_with(
            std::slice::from_ref(&etcd.url),
            "/suite",
            &common::etcd_security(&etcd),
        )
        .await
        .unwrap(),
    ))
    .await;
}

/// Whoever can write to the hub's etcd can rewrite trust bundles and join tokens. A secured etcd
/// refuses a client without its credentials, and the hub refuses settings that would send or
/// accept anything unprotected, each with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_without_credentials_is_refused_and_unsafe_settings_say_so() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start_secure)
        .await
        .unwrap();
    let url = std::slice::from_ref(&etcd.url);
    let good = common::etcd_security(&etcd);
    let connect = |security: EtcdSecurity| {
        let url = url.to_vec();
        async move {
            EtcdStore::connect_with(&url, "/x", &security)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    connect(good.clone()).await.expect("with its credentials");

    let mut no_client_cert = good.clone();
    no_client_cert.client_cert_pem = None;
    no_client_cert.client_key_pem = None;
    no_client_cert.user = None;
    connect(no_client_cert)
        .await
        .expect_err("etcd asks for a client certificate");
    let mut wrong_password = good.clone();
    wrong_password.user = Some(("root".into(), "guess".into()));
    let err = connect(wrong_password).await.unwrap_err();
    assert!(
        err.contains("authentication failed") || err.contains("invalid"),
        "{err}"
    );

    // Plain HTTP to the TLS port with TLS configured: refused before anything is sent.
    let plain = etcd.url.replacen("https://", "http://", 1);
    let err = EtcdStore::connect_with(&[plain], "/x", &good)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("TLS is configured but") && err.contains("write https://"),
        "{err}"
    );
    // https without a CA to check the server.
    let mut no_ca = good.clone();
    no_ca.ca_pem = None;
    let err = connect(no_ca).await.unwrap_err();
    assert!(err.contains("--etcd-ca"), "{err}");
    // Plain HTTP off this host needs the operator to say so.
    let remote = ["http://192.0.2.10:2379".to_string()];
    let err = EtcdStore::connect_with(&remote, "/x", &EtcdSecurity::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--etcd-allow-plaintext"), "{err}");
}

#[tokio::test]
async fn redb_keeps_data_and_history_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.redb");
    let (r1, r2) = {
        let s = RedbStore::open(&path).unwrap();
        let r1 = committed(
            s.commit(Txn::new().put("k/1", b"a".to_vec()))
                .await
                .unwrap(),
        );
        let r2 = committed(
            s.commit(Txn::new().delete("k/1").put("k/2", b"b".to_vec()))
                .await
                .unwrap(),
        );
        (r1, r2)
    };
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.revision().await.unwrap(), r2);
    assert_eq!(s.get("k/2").await.unwrap().unwrap().value, b"b");
    // History after r1 survives the restart, deletions included.
    let mut w = s.watch("k/", r1);
    let b = next_batch(&mut w).await;
    assert_eq!(b.revision, r2);
    assert_eq!(b.events.len(), 2);
    assert!(
        b.events
            .iter()
            .any(|e| matches!(e, Event::Delete { key, .. } if key == "k/1"))
    );
    // Only one process may hold the file.
    let err = RedbStore::open(&path).err().unwrap().to_string();
    assert!(err.contains("another hub"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_history_is_shared_by_two_clients() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    let url = std::slice::from_ref(&etcd.url);
    let a = EtcdStore::connect(url, "/ha").await.unwrap();
    let b = EtcdStore::connect(url, "/ha").await.unwrap();
    let r0 = a.revision().await.unwrap();
    let r1 = committed(
        a.commit(Txn::new().put("x/1", b"from a".to_vec()))
            .await
            .unwrap(),
    );
    // The other replica sees the write, through get and through watch from an older revision.
    assert_eq!(b.get("x/1").await.unwrap().unwrap().mod_revision, r1);
    let mut w = b.watch("x/", r0);
    assert_eq!(next_batch(&mut w).await.revision, r1);
    // Namespaces keep installations apart.
    let other = EtcdStore::connect(url, "/other").await.unwrap();
    assert!(other.list("x/").await.unwrap().0.is_empty());

    let err = EtcdStore::connect(&["http://127.0.0.1:1".to_string()], "/x")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("cannot reach etcd"), "{err}");
}

#[tokio::test]
async fn store_locations_parse_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let loc = format!("redb:{}", dir.path().join("x.redb").display());
    assert_eq!(
        fedmesh_federation::store::open(&loc)
            .await
            .unwrap()
            .backend(),
        "redb"
    );
    for bad in ["", "redb:", "file:/tmp/x", "etcd:"] {
        let err = fedmesh_federation::store::open(bad)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("redb:PATH or etcd:"), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_a_watcher_far_behind_reads_the_whole_history_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("hub.redb")).unwrap();
    // More revisions than one page of the log, so catching up crosses pages.
    let n = 2500u64;
    let first = committed(
        s.commit(Txn::new().put("k/0", b"0".to_vec()))
            .await
            .unwrap(),
    );
    for i in 1..n {
        s.commit(Txn::new().put(format!("k/{}", i % 7), i.to_string().into_bytes()))
            .await
            .unwrap();
    }
    let mut w = s.watch("k/", first - 1);
    for i in 0..n {
        let b = next_batch(&mut w).await;
        assert_eq!(
            b.revision,
            first + i,
            "revisions arrive in order, none skipped"
        );
    }
    // Then the live feed: a new commit arrives too.
    let last = committed(
        s.commit(Txn::new().put("k/live", b"x".to_vec()))
            .await
            .unwrap(),
    );
    assert_eq!(next_batch(&mut w).await.revision, last);
}
