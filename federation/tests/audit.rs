//! The audit log over the wire: an operator creates a join token and removes a cluster through
//! the admin API, a control plane joins over the federation protocol, and `GET /api/v1/audit`
//! shows each change with who made it — never the token itself — newest first; records past
//! their retention go.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedmesh_federation::hub::audit;
use fedmesh_federation::store::{KvStore, RedbStore};

async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    admin_call(addr, method, path, Some("t0ken"), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_in_the_audit_log_with_who_made_it_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KvStore> = Arc::new(RedbStore::open(&dir.path().join("hub.redb")).unwrap());
    let hub = start_hub(
        dir.path(),
        store.clone(),
        "127.0.0.1:0".parse().unwrap(),
        hub_config(),
    )
    .await;
    let addr = hub.serve_admin("t0ken").await;

    // An operator creates a token; the cluster joins with it; the operator removes the cluster.
    let (status, body) = call(
        addr,
        "POST",
        "/api/v1/tokens",
        r#"{"cluster":"east","trust_domain":"east.example"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let token = serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    hub.join(dir.path(), "east", &token).await;
    let (status, body) = call(addr, "DELETE", "/api/v1/clusters/east", "").await;
    assert_eq!(status, 204, "{body}");
    // Nothing changed, nothing recorded.
    let (status, _) = call(addr, "DELETE", "/api/v1/clusters/west", "").await;
    assert_eq!(status, 404);

    let (status, body) = call(addr, "GET", "/api/v1/audit", "").await;
    assert_eq!(status, 200, "{body}");
    let log: serde_json::Value = serde_json::from_str(&body).unwrap();
    let what: Vec<(&str, &str, &str)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["actor"].as_str().unwrap(),
                r["target"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        what,
        [
            ("cluster.remove", "admin token", "east"),
            ("cluster.join", "cluster east", "east"),
            ("token.create", "admin token", "east"),
        ],
        "{log:#}"
    );
    let token_id = token.split('.').nth(1).unwrap();
    assert!(
        log[2]["detail"].as_str().unwrap().contains(token_id),
        "the token is named by its ID: {log:#}"
    );
    assert!(
        !body.contains(&token),
        "the token itself is never recorded: {body}"
    );
    assert!(log[0]["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(log[0]["replica"], hub.hub.config.replica.as_str());

    // Filters: the newest only; since a time after everything.
    let (_, body) = call(addr, "GET", "/api/v1/audit?limit=1", "").await;
    let one: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["action"], "cluster.remove");
    let after = log[0]["unix_ms"].as_i64().unwrap() + 1;
    let (_, body) = call(
        addr,
        "GET",
        &format!("/api/v1/audit?since_unix_ms={after}"),
        "",
    )
    .await;
    assert_eq!(body.trim(), "[]");
    let (_, doc) = call(addr, "GET", "/api/openapi.json", "").await;
    assert!(
        doc.contains("/api/v1/audit") && doc.contains("AuditRecord"),
        "documented"
    );

    // Past the retention, records go.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        audit::expire(&*store, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(audit::expire(&*store, Duration::ZERO).await.unwrap(), 3);
    let (_, body) = call(addr, "GET", "/api/v1/audit", "").await;
    assert_eq!(body.trim(), "[]");
    hub.stop().await;
}
