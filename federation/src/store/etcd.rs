//! The HA store: etcd. Several hub replicas share one etcd; its revision is the clusterset view
//! version, its history answers "what changed since R", and its transactions give the
//! compare-and-swap that join tokens and cluster records need. All keys live under a namespace
//! prefix so one etcd can serve other users too.
//!
//! Whoever can write to this etcd can rewrite trust bundles and join tokens, so the connection is
//! authenticated: TLS (`https://` endpoints, the server checked against a CA, optionally a client
//! certificate) and etcd's own users. Plain `http://` is accepted only to loopback unless the
//! operator says otherwise ([`EtcdSecurity::allow_plaintext`]).

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as ECompare, CompareOp, ConnectOptions, EventType, GetOptions,
    Identity, TlsOptions, Txn as ETxn, TxnOp, WatchOptions,
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

/// How the hub authenticates to etcd and authenticates etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// PEM of the CA(s) that sign etcd's server certificates; required for `https://` endpoints.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and key (PEM), when etcd runs with `--client-cert-auth`.
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
    /// An etcd user and its password (etcd `auth enable`).
    pub user: Option<(String, String)>,
    /// Accept `http://` endpoints that are not on loopback (etcd reachable only on a network the
    /// operator trusts).
    pub allow_plaintext: bool,
}

impl EtcdSecurity {
    /// Refuses combinations that would not protect what the operator thinks they protect.
    fn check(&self, endpoints: &[String]) -> Result<(), StoreError> {
        let bad = |m: String| StoreError::Unavailable(format!("etcd: {m}"));
        let tls = self.ca_pem.is_some() || self.client_cert_pem.is_some();
        if self.client_cert_pem.is_some() != self.client_key_pem.is_some() {
            return Err(bad(
                "a client certificate needs its key, and a key its certificate".into(),
            ));
        }
        for e in endpoints {
            match e.split_once("://").map(|(scheme, _)| scheme) {
                Some("https") if self.ca_pem.is_none() => {
                    return Err(bad(format!(
                        "{e} is https, but no CA to check etcd's certificate was given (--etcd-ca)"
                    )));
                }
                Some("https") => {}
                Some("http") if tls => {
                    return Err(bad(format!(
                        "TLS is configured but {e} is plain http://; write https:// (nothing would be encrypted or checked)"
                    )));
                }
                Some("http") if !self.allow_plaintext && !is_loopback_url(e) => {
                    return Err(bad(format!(
                        "{e} is plain http:// off this host: anyone who can reach it could rewrite trust bundles and join tokens. Use https:// with --etcd-ca (and --etcd-cert/--etcd-key or --etcd-user), or pass --etcd-allow-plaintext if only trusted hosts can reach it"
                    )));
                }
                Some("http") => {}
                _ => return Err(bad(format!("{e} is not an http:// or https:// URL"))),
            }
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(ca) = &self.ca_pem {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if let (Some(cert), Some(key)) = (&self.client_cert_pem, &self.client_key_pem) {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        if let Some((user, password)) = &self.user {
            opts = opts
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        Ok(opts)
    }
}

fn is_loopback_url(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, _)) => h,
        None => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn err(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to etcd over plain HTTP (loopback, tests); keys are stored under `namespace`
    /// (e.g. `/fedmesh`).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, namespace, &EtcdSecurity::default()).await
    }

    /// Connects to etcd with `security`; keys are stored under `namespace`.
    pub async fn connect_with(
        endpoints: &[String],
        namespace: &str,
        security: &EtcdSecurity,
    ) -> Result<Self, StoreError> {
        security.check(endpoints)?;
        if endpoints.iter().all(|e| e.starts_with("http://")) && security.user.is_none() {
            tracing::warn!(
                endpoints = %endpoints.join(","),
                "etcd store without TLS or a user: anyone who can reach it can rewrite trust bundles and join tokens"
            );
        }
        let opts = security.connect_options()?;
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
