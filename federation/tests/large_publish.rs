//! A large full publish right after Hello (thousands of exports in one message) is applied and
//! answered; the stream does not stall. A cluster that takes updates in parts gets the large
//! snapshot in parts of at most `IMPORTS_PER_PART` imports, which gathered hold every import.

mod common;

use std::time::Duration;

use common::*;
use fedmesh_api::pb::federation as pb;
use fedmesh_api::pb::federation::federation_client::FederationClient;
use fedmesh_api::{ClusterName, FEDERATION_PROTOCOL_VERSION, TrustDomain};
use fedmesh_federation::control_plane::hub_link::HubCredentials;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_publish_right_after_hello_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    for round in 0..3 {
        let name = format!("c{round}");
        let cluster = ClusterName::new(&name).unwrap();
        let td = TrustDomain::new(&format!("{name}.x")).unwrap();
        let (token, _) = hub.hub.create_token(&cluster, &td, None).await.unwrap();
        let creds = HubCredentials::join(
            &dir.path().join(&name),
            &hub.addr.to_string(),
            &token,
            &cluster,
            &td,
        )
        .await
        .unwrap();
        let mut client =
            FederationClient::new(creds.channel().unwrap()).max_decoding_message_size(256 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(pb::ClusterMessage {
            msg: Some(pb::cluster_message::Msg::Hello(pb::Hello {
                protocol_version: FEDERATION_PROTOCOL_VERSION,
                resume_from: 0,
                region: String::new(),
                // The last round's cluster, as control planes do; the first two as older ones.
                update_parts: round == 2,
            })),
        })
        .await
        .unwrap();
        let mut inbound = client
            .federate(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let exports: Vec<pb::Export> = (0..5000)
            .map(|i| pb::Export {
                service: format!("bench/{name}-svc-{i:05}"),
                r#type: pb::ServiceType::ClusterSetIp as i32,
                ports: vec![pb::Port {
                    name: "http".into(),
                    protocol: "TCP".into(),
                    port: 80,
                    app_protocol: String::new(),
                }],
                endpoints: vec![pb::LocalityEndpoints {
                    region: "r".into(),
                    zone: "z".into(),
                    ready: 1,
                    total: 1,
                }],
                created_unix: 1,
                ..Default::default()
            })
            .collect();
        tx.send(pb::ClusterMessage {
            msg: Some(pb::cluster_message::Msg::Publish(pb::Publish {
                version: 1,
                cluster: name.clone(),
                full: true,
                upserts: exports,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let (mut pending, mut snapshot, mut largest) = (None, None, 0);
        let accepted = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let m = inbound.message().await.unwrap().unwrap();
                match m.msg {
                    Some(pb::hub_message::Msg::PublishResult(r)) => return r,
                    Some(pb::hub_message::Msg::Update(part)) => {
                        largest = largest.max(part.imports.len());
                        if let Some(u) =
                            fedmesh_federation::update_parts::gather(&mut pending, part)
                            && u.snapshot
                        {
                            snapshot.get_or_insert(u);
                        }
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: no PublishResult within 20s"));
        assert!(accepted.accepted, "{}", accepted.error);
        // The first update is a snapshot of the earlier clusters' exports (and perhaps already
        // this one's).
        let snapshot = snapshot.expect("a snapshot came first");
        let held = snapshot.imports.len();
        assert!(
            held == round * 5000 || held == (round + 1) * 5000,
            "round {round}: the snapshot held {held} imports"
        );
        if round == 2 {
            assert!(
                largest <= fedmesh_federation::update_parts::IMPORTS_PER_PART,
                "a part held {largest} imports"
            );
        } else {
            assert!(
                largest >= held,
                "round {round}: the snapshot is one message"
            );
        }
        // Every export is in the hub's view, as published. The view follows the store's watch,
        // so it may trail the PublishResult (which means "written") by a moment under load.
        let want: Vec<fedmesh_api::ServiceKey> = (0..5000)
            .map(|i| format!("bench/{name}-svc-{i:05}").parse().unwrap())
            .collect();
        let start = std::time::Instant::now();
        loop {
            let held = {
                let view = hub.hub.view();
                let mut held = view.services_exported_by(&cluster);
                held.sort();
                held
            };
            if held == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "round {round}: the view holds {} of the 5000 exports 10 s after they were accepted",
                held.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        {
            let view = hub.hub.view();
            let one = view
                .exports_of(&want[4999])
                .and_then(|by| by.get(&cluster))
                .expect("the last export is held");
            assert_eq!(one.ports.len(), 1, "round {round}");
        }
        let status = fedmesh_federation::hub::admin::cluster_statuses(&hub.hub)
            .into_iter()
            .find(|c| c.name == name)
            .expect("the cluster is listed");
        assert_eq!(status.exports, 5000, "round {round}");
        drop(tx);
    }
    hub.stop().await;
}
