//! What the hub refuses, and how clearly: a cluster publishing for another cluster, another trust
//! domain's bundle, a newer protocol, misused join tokens, malformed source files.

mod common;

use std::time::Duration;

use common::*;
use fedmesh_api::pb::federation as pb;
use fedmesh_api::pb::federation::federation_client::FederationClient;
use fedmesh_api::{ClusterName, FEDERATION_PROTOCOL_VERSION, TrustDomain};
use fedmesh_federation::control_plane::hub_link::HubCredentials;
use tokio::sync::mpsc;

/// Opens a Federate stream with a cluster's real hub identity.
async fn raw_stream(
    creds: &HubCredentials,
    protocol_version: u32,
) -> Result<
    (
        mpsc::Sender<pb::ClusterMessage>,
        tonic::Streaming<pb::HubMessage>,
    ),
    tonic::Status,
> {
    let mut client = FederationClient::new(creds.channel().unwrap());
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::ClusterMessage {
        msg: Some(pb::cluster_message::Msg::Hello(pb::Hello {
            protocol_version,
            resume_from: 0,
            region: String::new(),
            update_parts: false,
        })),
    })
    .await
    .unwrap();
    let inbound = client
        .federate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

async fn publish_result(inbound: &mut tonic::Streaming<pb::HubMessage>) -> pb::PublishResult {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        if let Some(pb::hub_message::Msg::PublishResult(r)) = m.msg {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_may_publish_only_its_own_exports_and_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    west.wait_for("east's bundle", |s| s.clusterset.bundles.len() == 2)
        .await;
    let creds = east.cp.credentials.clone().unwrap();
    let (tx, mut inbound) = raw_stream(&creds, FEDERATION_PROTOCOL_VERSION)
        .await
        .unwrap();
    let export = pb::Export {
        service: "shop/web".into(),
        r#type: pb::ServiceType::ClusterSetIp as i32,
        ports: vec![pb::Port {
            name: "http".into(),
            protocol: "TCP".into(),
            port: 80,
            app_protocol: String::new(),
        }],
        created_unix: 1,
        ..Default::default()
    };
    let send = |p: pb::Publish| {
        let tx = tx.clone();
        async move {
            tx.send(pb::ClusterMessage {
                msg: Some(pb::cluster_message::Msg::Publish(p)),
            })
            .await
            .unwrap()
        }
    };

    // East, authenticated as east, claims to publish for west.
    send(pb::Publish {
        version: 1000,
        cluster: "west".into(),
        upserts: vec![export.clone()],
        ..Default::default()
    })
    .await;
    let r = publish_result(&mut inbound).await;
    assert!(!r.accepted);
    assert!(
        r.error.contains("may publish only its own state"),
        "{}",
        r.error
    );

    // East publishes west's trust domain bundle.
    let west_bundle = west.cp.ca.bundle();
    send(pb::Publish {
        version: 1001,
        cluster: "east".into(),
        bundle: Some(pb::Bundle {
            trust_domain: "west.example".into(),
            jwks: west_bundle.to_json().into_bytes(),
            sequence: west_bundle.sequence(),
        }),
        ..Default::default()
    })
    .await;
    let r = publish_result(&mut inbound).await;
    assert!(!r.accepted);
    assert!(
        r.error
            .contains("only the bundle of its own trust domain east.example"),
        "{}",
        r.error
    );

    // A stale version and a malformed export are refused too.
    send(pb::Publish {
        version: 1,
        cluster: "east".into(),
        ..Default::default()
    })
    .await;
    assert!(
        publish_result(&mut inbound)
            .await
            .error
            .contains("not newer")
    );
    let mut bad = export.clone();
    bad.ports[0].protocol = "HTTP".into();
    send(pb::Publish {
        version: 1002,
        cluster: "east".into(),
        upserts: vec![bad],
        ..Default::default()
    })
    .await;
    let r = publish_result(&mut inbound).await;
    assert!(r.error.contains("not TCP, UDP or SCTP"), "{}", r.error);

    // Nothing of that reached anyone: west still has east's real bundle and no import.
    let snap = west.snapshot();
    assert!(snap.clusterset.imports.is_empty());
    let held = &snap.clusterset.bundles[&TrustDomain::new("west.example").unwrap()];
    assert_eq!(held.jwks, west_bundle.to_json().into_bytes());
    let refused = hub.hub.metrics.encode();
    assert!(
        refused.contains("fedmesh_hub_refused_total{reason=\"publish\"} 4"),
        "{refused}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_protocol_version_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let err = raw_stream(
        &east.cp.credentials.clone().unwrap(),
        FEDERATION_PROTOCOL_VERSION + 1,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("upgrade the hub"),
        "{}",
        err.message()
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_one_time_expiring_and_bound_to_a_cluster_and_its_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = hub.addr.to_string();
    let east = ClusterName::new("east").unwrap();
    let td = TrustDomain::new("east.example").unwrap();
    let join = |token: String, cluster: &'static str, td: &'static str, sub: &'static str| {
        let (addr, dir) = (addr.clone(), dir.path().join(sub));
        async move {
            HubCredentials::join(
                &dir,
                &addr,
                &token,
                &ClusterName::new(cluster).unwrap(),
                &TrustDomain::new(td).unwrap(),
            )
            .await
            .err()
            .map(|e| e.to_string())
        }
    };

    let (token, _) = hub.hub.create_token(&east, &td, None).await.unwrap();
    let err = join(token.clone(), "west", "west.example", "w")
        .await
        .unwrap();
    assert!(err.contains("issued for east, not west"), "{err}");
    // The attack: east's token used to register east under west's trust domain.
    let err = join(token.clone(), "east", "west.example", "w2")
        .await
        .unwrap();
    assert!(
        err.contains("issued for trust domain east.example, not west.example"),
        "{err}"
    );
    assert!(
        join(token.clone(), "east", "east.example", "e1")
            .await
            .is_none(),
        "first use works"
    );
    let err = join(token, "east", "east.example", "e2").await.unwrap();
    assert!(err.contains("already used"), "{err}");

    // A token whose lifetime is over (zero: expired the moment it is made; no clock to wait on).
    let (short, _) = hub
        .hub
        .create_token(&east, &td, Some(Duration::ZERO))
        .await
        .unwrap();
    let err = join(short, "east", "east.example", "e3").await.unwrap();
    assert!(err.contains("expired"), "{err}");

    let err = join("fmj1.nonsense".into(), "east", "east.example", "e4")
        .await
        .unwrap();
    assert!(err.contains("malformed"), "{err}");

    // A token pinning another CA: the client refuses to talk to this hub at all.
    let (token, _) = hub.hub.create_token(&east, &td, None).await.unwrap();
    let forged = format!("{}.{}", token.rsplit_once('.').unwrap().0, "ab".repeat(32));
    let err = join(forged, "east", "east.example", "e5").await.unwrap();
    assert!(err.contains("pinned"), "{err}");

    // A second cluster may not take a trust domain that is already in use, even with a token
    // made out for it.
    let (t2, _) = hub
        .hub
        .create_token(&ClusterName::new("evil").unwrap(), &td, None)
        .await
        .unwrap();
    let err = join(t2, "evil", "east.example", "e6").await.unwrap();
    assert!(err.contains("already belongs to cluster east"), "{err}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_source_file_is_reported_and_its_last_good_content_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    let web: fedmesh_api::ServiceKey = "shop/web".parse().unwrap();
    east.export_web(80, &[("10.1.0.1", "a")]);
    west.wait_for("import", |s| s.clusterset.imports.contains_key(&web))
        .await;

    // What the operator sees: the hub's status of east (`fedmesh status`) names the file and
    // what is wrong in it, while the last good content stays in force.
    let problems = |hub: &HubHandle| {
        fedmesh_federation::hub::admin::cluster_statuses(&hub.hub)
            .into_iter()
            .find(|c| c.name == "east")
            .map(|c| c.problems)
            .unwrap_or_default()
    };
    for (bad, named) in [
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  portz: [{port: 80}]\n  ports: [{name: http, port: 80}]\n",
            "spec.portz",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: Web_1, namespace: shop}\n",
            "Web_1",
        ),
        (
            "this: [is, not: valid yaml\n",
            "line 1 column 7: unclosed bracket",
        ),
    ] {
        east.write("web.yaml", bad);
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen = problems(&hub);
            if seen.iter().any(|p| p.message.contains(named)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let p = seen
            .iter()
            .find(|p| p.message.contains(named))
            .unwrap_or_else(|| panic!("{named:?} is not named in east's problems: {seen:#?}"));
        assert_eq!(
            (p.kind.as_str(), p.name.as_str(), p.condition.as_str()),
            ("File", "web.yaml", "Valid"),
            "{p:#?}"
        );
        assert_eq!(seen.len(), 1, "one problem for one bad file: {seen:#?}");
        // The export stays: the last good web.yaml is still in force.
        assert!(
            west.snapshot().clusterset.imports.contains_key(&web),
            "{bad}"
        );
        assert!(east.snapshot().local.services.contains_key(&web));
    }
    // Mended: the problem goes.
    east.export_web(80, &[("10.1.0.2", "a")]);
    for _ in 0..200 {
        if problems(&hub).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(problems(&hub), vec![]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_clusters_open_stream_is_ended_and_it_cannot_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    west.wait_for("east's bundle", |s| s.clusterset.bundles.len() == 2)
        .await;
    let creds = east.cp.credentials.clone().unwrap();
    let (_tx, mut inbound) = raw_stream(&creds, FEDERATION_PROTOCOL_VERSION)
        .await
        .unwrap();

    assert!(
        hub.hub
            .remove_cluster(&ClusterName::new("east").unwrap())
            .await
            .unwrap()
    );
    // The open stream ends with a status that says what happened and what to do.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the stream of a removed cluster ends");
    let status = ended.expect("with a status, not a silent close");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("was removed") && status.message().contains("join again"),
        "{}",
        status.message()
    );
    // Its certificate still verifies, but a new stream is refused too.
    let again = raw_stream(&creds, FEDERATION_PROTOCOL_VERSION).await;
    let refused = match again {
        Err(s) => s,
        Ok((_tx, mut inbound)) => inbound.message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // And west no longer sees east's bundle.
    west.wait_for("east's bundle withdrawn", |s| {
        s.clusterset.bundles.len() == 1
    })
    .await;
    hub.stop().await;
}

async fn join_as(
    hub: &HubHandle,
    dir: &std::path::Path,
    cluster: &str,
    td: &str,
) -> Result<HubCredentials, String> {
    let (cluster, td) = (
        ClusterName::new(cluster).unwrap(),
        TrustDomain::new(td).unwrap(),
    );
    let (token, _) = hub.hub.create_token(&cluster, &td, None).await.unwrap();
    HubCredentials::join(dir, &hub.addr.to_string(), &token, &cluster, &td)
        .await
        .map_err(|e| e.to_string())
}

/// Renews `creds`'s cluster identity now (whatever its age).
async fn renew_now(creds: &HubCredentials, cluster: &str) -> Result<(), tonic::Status> {
    let id =
        fedmesh_api::SpiffeId::new(&format!("spiffe://hub.fedmesh/cluster/{cluster}")).unwrap();
    let (_, csr) = fedmesh_trust::svid::new_key_and_csr(&id).unwrap();
    FederationClient::new(creds.channel().unwrap())
        .renew(pb::RenewRequest { csr })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_cannot_both_claim_one_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    for round in 0..5 {
        let td = format!("same{round}.example");
        let (name_a, name_b) = (format!("a{round}"), format!("b{round}"));
        let (dir_a, dir_b) = (dir.path().join(&name_a), dir.path().join(&name_b));
        let (a, b) = tokio::join!(
            join_as(&hub, &dir_a, &name_a, &td),
            join_as(&hub, &dir_b, &name_b, &td),
        );
        assert!(
            a.is_ok() != b.is_ok(),
            "round {round}: exactly one registers {td}: {:?} / {:?}",
            a.as_ref().err(),
            b.as_ref().err()
        );
        let err = a.err().or(b.err()).unwrap();
        assert!(
            err.contains("already belongs to cluster") || err.contains("changed concurrently"),
            "{err}"
        );
    }
    hub.stop().await;
}

/// A cluster removed by an operator and registered again under the same name gets a new
/// registration: the identities issued to the earlier one can neither renew nor connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_clusters_old_identity_is_refused_after_the_name_registers_again() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let old = join_as(&hub, &dir.path().join("old"), "east", "east.example")
        .await
        .unwrap();
    renew_now(&old, "east")
        .await
        .expect("a registered cluster renews");
    raw_stream(&old, FEDERATION_PROTOCOL_VERSION)
        .await
        .expect("and connects");

    assert!(
        hub.hub
            .remove_cluster(&ClusterName::new("east").unwrap())
            .await
            .unwrap()
    );
    let new = join_as(&hub, &dir.path().join("new"), "east", "east.example")
        .await
        .expect("the name and its trust domain are free again");

    let err = renew_now(&old, "east").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("earlier registration of cluster east"),
        "{}",
        err.message()
    );
    let err = raw_stream(&old, FEDERATION_PROTOCOL_VERSION)
        .await
        .err()
        .unwrap();
    assert!(
        err.message().contains("earlier registration"),
        "{}",
        err.message()
    );

    renew_now(&new, "east")
        .await
        .expect("the new registration renews");
    raw_stream(&new, FEDERATION_PROTOCOL_VERSION)
        .await
        .expect("and connects with its first identity until it switches");
    hub.stop().await;
}

/// What a cluster reports about its exports is not trusted to decide for others: the hub stamps
/// an export's age when it first arrives (a cluster claiming 1970 once won every conflict),
/// endpoint counts that overflow are refused, and a gateway address must name one host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_cannot_win_conflicts_by_claiming_the_past_or_publish_impossible_counts() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    let web: fedmesh_api::ServiceKey = "shop/web".parse().unwrap();
    west.export_web(80, &[("10.2.0.1", "a")]);
    east.wait_for("west's export", |s| s.clusterset.imports.contains_key(&web))
        .await;
    // Later (the hub ages exports by when it first received them, to the millisecond), east
    // claims an export from 1970 with the same port name on another number.
    let (tx, mut inbound) = raw_stream(
        &east.cp.credentials.clone().unwrap(),
        FEDERATION_PROTOCOL_VERSION,
    )
    .await
    .unwrap();
    let export = pb::Export {
        service: "shop/web".into(),
        r#type: pb::ServiceType::ClusterSetIp as i32,
        ports: vec![pb::Port {
            name: "http".into(),
            protocol: "TCP".into(),
            port: 8080,
            app_protocol: String::new(),
        }],
        endpoints: vec![pb::LocalityEndpoints {
            region: "r".into(),
            zone: "a".into(),
            ready: 1,
            total: 1,
        }],
        created_unix: 1,
        ..Default::default()
    };
    let mut version = 1_000_000;
    let mut publish = |p: pb::Publish| {
        version += 1;
        let tx = tx.clone();
        async move {
            tx.send(pb::ClusterMessage {
                msg: Some(pb::cluster_message::Msg::Publish(pb::Publish {
                    version,
                    cluster: "east".into(),
                    ..p
                })),
            })
            .await
            .unwrap()
        }
    };

    let mut overflow = export.clone();
    overflow.endpoints = vec![
        pb::LocalityEndpoints {
            region: "r".into(),
            zone: "a".into(),
            ready: u32::MAX,
            total: u32::MAX,
        },
        pb::LocalityEndpoints {
            region: "r".into(),
            zone: "b".into(),
            ready: 2,
            total: 2,
        },
    ];
    publish(pb::Publish {
        upserts: vec![overflow],
        ..Default::default()
    })
    .await;
    let r = publish_result(&mut inbound).await;
    assert!(r.error.contains("more than 2^32 endpoints"), "{}", r.error);

    for gateway in ["0.0.0.0:15443", "224.0.0.1:15443", "gw:0", "[::]:1"] {
        publish(pb::Publish {
            gateways: Some(pb::Gateways {
                addresses: vec![gateway.into()],
            }),
            ..Default::default()
        })
        .await;
        let r = publish_result(&mut inbound).await;
        assert!(
            !r.accepted && r.error.contains("gateway"),
            "{gateway}: {}",
            r.error
        );
    }

    publish(pb::Publish {
        upserts: vec![export],
        ..Default::default()
    })
    .await;
    assert!(publish_result(&mut inbound).await.accepted);
    let snap = west
        .wait_for("both exports merged", |s| {
            s.clusterset
                .imports
                .get(&web)
                .is_some_and(|i| i.clusters.len() == 2)
        })
        .await;
    let i = &snap.clusterset.imports[&web];
    assert_eq!(i.ports[0].port, 80, "west's export is older and wins");
    assert_eq!(
        (
            i.conflicts[0].cluster.as_str(),
            i.conflicts[0].winner.as_str()
        ),
        ("east", "west")
    );
    let east_age = i
        .clusters
        .iter()
        .find(|c| c.cluster == "east")
        .unwrap()
        .exported_unix;
    assert!(
        east_age > 1_000_000_000,
        "the hub stamped east's export: {east_age}"
    );
    hub.stop().await;
}

/// Every cluster identity is signed by the hub's CA, so the CA pin alone would let one cluster
/// answer as the hub to another that is joining and collect its token. The joining side checks
/// the hub's SPIFFE ID too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_identity_cannot_pose_as_the_hub_to_a_joining_control_plane() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    join_as(&hub, &dir.path().join("east"), "east", "east.example")
        .await
        .unwrap();
    // East's hub-issued identity, with the hub's CA appended as the hub itself serves it.
    let mut chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.path().join("east/identity.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    chain.push(hub.hub.ca().active_certificate().unwrap());
    let key = PrivateKeyDer::from_pem_file(dir.path().join("east/identity.key")).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap().to_string();
    let received = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))
            .accept(tcp)
            .await
        else {
            return 0;
        };
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
        got.len()
    });

    let (west, td) = (
        ClusterName::new("west").unwrap(),
        TrustDomain::new("west.example").unwrap(),
    );
    let (token, _) = hub.hub.create_token(&west, &td, None).await.unwrap();
    let err = HubCredentials::join(&dir.path().join("west"), &impostor, &token, &west, &td)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(
            "the server is spiffe://hub.fedmesh/cluster/east, not spiffe://hub.fedmesh/hub"
        ),
        "{err}"
    );
    assert_eq!(
        received.await.unwrap(),
        0,
        "the token never reached the impostor"
    );
    // The real hub still takes the token.
    HubCredentials::join(
        &dir.path().join("west"),
        &hub.addr.to_string(),
        &token,
        &west,
        &td,
    )
    .await
    .unwrap();
    hub.stop().await;
}
