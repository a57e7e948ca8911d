//! A steady stream of mTLS requests between two trust domains completes with zero failures across
//! SVID rotations (every ~second) and a CA rotation of both CAs. Identities come from two agents
//! through the Workload API, as real workloads get them; each trust domain's bundle reaches the
//! other's agent through a SPIFFE bundle endpoint.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fedmesh_trust::ca::TrustDomainCa;
use fedmesh_trust::endpoint::{self, BundleEndpointClient, ClientProfile, ServerProfile};
use fedmesh_trust::source::WorkloadApiFollower;
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use fedmesh_trust::workload::LocalCaSigner;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const CLIENT: &str = "spiffe://east.example/ns/default/sa/frontend";
const SERVER: &str = "spiffe://west.example/ns/default/sa/backend";
/// The run ends once every phase has carried traffic and both sides present SVIDs of their new
/// CAs; this only bounds a run that never gets there (then the test fails, saying what is missing).
const LIMIT: Duration = Duration::from_secs(60);
/// New connections wanted in each phase (before rotation, during prepare, after activation).
const PER_PHASE: u64 = 10;

/// Federation as SPIFFE defines it: `from` publishes its bundle at an `https_web` bundle
/// endpoint (refresh hint 1 s) and `to`'s agent fetches it by the hint and serves it to its
/// workloads, as a FederatedTrustDomain does. (Through the hub, the same rotation is tested
/// end to end in tests/dataplane.rs and tests/spire.rs.)
async fn federate(from: &Arc<TrustDomainCa>, to: Arc<LocalCaSigner>) {
    let (roots, chain, key) = web_pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(endpoint::serve(
        listener,
        ServerProfile::HttpsWeb { chain, key },
        from.subscribe_bundle(),
        std::future::pending(),
    ));
    let client = BundleEndpointClient::new(
        &format!("https://localhost:{port}/"),
        from.trust_domain(),
        ClientProfile::HttpsWeb {
            roots: Arc::new(roots),
        },
    )
    .unwrap();
    let (mut rx, _task) = client.spawn_refresher(None, std::future::pending());
    tokio::spawn(async move {
        loop {
            if let Some(b) = rx.borrow_and_update().clone() {
                to.set_federated((*b).clone());
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The X.509 roots `ident` trusts for `trust_domain`.
fn roots_of(ident: &MeshIdentity, trust_domain: &str) -> usize {
    ident
        .trust()
        .anchors(&td(trust_domain))
        .map_or(0, |a| a.len())
}

/// Whether `root` signed `leaf` (checked at the leaf's own issue time: old leaves have expired).
fn signed_by(leaf: &[u8], root: &CertificateDer<'static>) -> bool {
    let anchor = [webpki::anchor_from_trusted_cert(root).unwrap().to_owned()];
    let issued = fedmesh_trust::svid::inspect(leaf).unwrap().not_before;
    let at = UnixTime::since_unix_epoch(
        issued.duration_since(std::time::UNIX_EPOCH).unwrap() + Duration::from_secs(1),
    );
    let leaf = CertificateDer::from(leaf.to_vec());
    webpki::EndEntityCert::try_from(&leaf)
        .unwrap()
        .verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchor,
            &[],
            at,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_ok()
}

async fn ping(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> std::io::Result<()> {
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    if &buf != b"pong" {
        return Err(std::io::Error::other("bad reply"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_mtls_stream_survives_svid_and_ca_rotation_with_zero_failures() {
    let dir = tempfile::tempdir().unwrap();
    let east = short_lived_ca(dir.path(), "east.example", Duration::from_secs(2));
    let west = short_lived_ca(dir.path(), "west.example", Duration::from_secs(2));
    let east_agent =
        TestAgent::start(dir.path(), east.clone(), &TestAgent::entry_for_me(CLIENT)).await;
    let west_agent =
        TestAgent::start(dir.path(), west.clone(), &TestAgent::entry_for_me(SERVER)).await;
    federate(&east, west_agent.signer.clone()).await;
    federate(&west, east_agent.signer.clone()).await;

    let client = MeshIdentity::new();
    let server = MeshIdentity::new();
    let _cf = WorkloadApiFollower::start(
        &east_agent.endpoint(),
        client.clone(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let _sf = WorkloadApiFollower::start(
        &west_agent.endpoint(),
        server.clone(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        client.ready().await;
        server.ready().await;
        while client.trust().anchors(&td("west.example")).is_none()
            || server.trust().anchors(&td("east.example")).is_none()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both identities and federated bundles delivered");

    // Server: answers every "ping" with "pong" on every connection; records client leaves.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server_config(Authorizer::id(id(CLIENT)), vec![]));
    let client_leaves: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let server_errors = Arc::new(AtomicU64::new(0));
    {
        let (leaves, errors) = (client_leaves.clone(), server_errors.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, leaves, errors) = (acceptor.clone(), leaves.clone(), errors.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("server handshake failed: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    if let Some(c) = tls.get_ref().1.peer_certificates() {
                        leaves.lock().unwrap().insert(c[0].to_vec());
                    }
                    let mut buf = [0u8; 4];
                    while tls.read_exact(&mut buf).await.is_ok() {
                        if tls.write_all(b"pong").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    let connector = TlsConnector::from(client.client_config(Authorizer::id(id(SERVER)), vec![]));
    let name = ServerName::try_from("backend.west").unwrap();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let server_leaves: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let start = Instant::now();
    // 0: before rotation, 1: next authorities published, 2: activated.
    let phase = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());

    // One long-lived connection across all rotations: it must never be dropped. Its pings are
    // counted per phase.
    let long_lived = {
        let (connector, name, ok, failed) =
            (connector.clone(), name.clone(), ok.clone(), failed.clone());
        let (phase, stop) = (phase.clone(), stop.clone());
        tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut by_phase = [0u64; 3];
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                match ping(&mut tls).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        by_phase[phase.load(Ordering::Relaxed) as usize] += 1;
                    }
                    Err(e) => {
                        eprintln!("long-lived ping failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                };
                tokio::select! {
                    _ = &mut stopped => return by_phase,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
    };

    // New connections back to back, one request each; the CAs rotate as the phases fill:
    // prepare (publish the next authority) once phase 0 has carried its share, activate once
    // phase 1 has.
    let mut new_by_phase = [0u64; 3];
    let new_roots_in_use = || {
        if phase.load(Ordering::Relaxed) < 2 {
            return false;
        }
        let (east_root, west_root) = (
            east.bundle().x509_authorities()[1].clone(),
            west.bundle().x509_authorities()[1].clone(),
        );
        client_leaves
            .lock()
            .unwrap()
            .iter()
            .any(|l| signed_by(l, &east_root))
            && server_leaves
                .lock()
                .unwrap()
                .iter()
                .any(|l| signed_by(l, &west_root))
    };
    // SVIDs (2 s) renew several times over: each side presents at least four.
    let svids_rotated =
        || client_leaves.lock().unwrap().len() >= 4 && server_leaves.lock().unwrap().len() >= 4;
    while start.elapsed() < LIMIT
        && !(new_by_phase[2] >= PER_PHASE && new_roots_in_use() && svids_rotated())
    {
        let now = phase.load(Ordering::Relaxed);
        if now < 2 && new_by_phase[now as usize] >= PER_PHASE {
            if now == 0 {
                east.prepare_next(None).unwrap();
                west.prepare_next(None).unwrap();
            } else {
                // As an operator (or the CA's schedule) does: activate once the other side's
                // workloads trust the next authority, fetched from the bundle endpoint.
                if roots_of(&client, "west.example") < 2 || roots_of(&server, "east.example") < 2 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                east.activate_next().unwrap();
                west.activate_next().unwrap();
            }
            phase.store(now + 1, Ordering::Relaxed);
            continue;
        }
        let attempt = async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = connector.connect(name.clone(), tcp).await?;
            if let Some(c) = tls.get_ref().1.peer_certificates() {
                server_leaves.lock().unwrap().insert(c[0].to_vec());
            }
            ping(&mut tls).await?;
            tls.shutdown().await
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => {
                ok.fetch_add(1, Ordering::Relaxed);
                new_by_phase[now as usize] += 1;
            }
            other => {
                eprintln!("request failed at {:?}: {other:?}", start.elapsed());
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_one();
    let long_by_phase = long_lived.await.unwrap();

    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "ok={ok} failed={failed} new_connections={new_by_phase:?} long_lived_pings={long_by_phase:?} in {:?}",
        start.elapsed()
    );
    assert_eq!(failed, 0, "no request may fail across rotations");
    assert_eq!(server_errors.load(Ordering::Relaxed), 0);
    assert!(
        new_by_phase.iter().all(|n| *n >= PER_PHASE),
        "new connections in every phase (before, prepared, activated): {new_by_phase:?}"
    );
    assert!(
        long_by_phase.iter().all(|n| *n >= 1),
        "the long-lived connection carried pings in every phase: {long_by_phase:?}"
    );
    assert!(
        new_roots_in_use(),
        "both sides came to present SVIDs of their new CAs within {LIMIT:?}"
    );

    // Rotation really happened on both sides, and the new CAs signed SVIDs that were used.
    let client_leaves = client_leaves.lock().unwrap().clone();
    let server_leaves = server_leaves.lock().unwrap().clone();
    assert!(
        client_leaves.len() >= 4,
        "client SVID rotated: {}",
        client_leaves.len()
    );
    assert!(
        server_leaves.len() >= 4,
        "server SVID rotated: {}",
        server_leaves.len()
    );
    let new_east_root = east.bundle().x509_authorities()[1].clone();
    let new_west_root = west.bundle().x509_authorities()[1].clone();
    assert!(client_leaves.iter().any(|l| signed_by(l, &new_east_root)));
    assert!(server_leaves.iter().any(|l| signed_by(l, &new_west_root)));
    let old_east_root = east.bundle().x509_authorities()[0].clone();
    assert!(client_leaves.iter().any(|l| signed_by(l, &old_east_root)));
}
