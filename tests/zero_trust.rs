//! Zero trust at the callee's sidecar, driven as a user would: AuthorizationPolicies on the
//! caller's SPIFFE ID, PeerAuthentication PERMISSIVE for callers outside the mesh, and
//! RequestAuthentication with real JWTs (signed by PyJWT, keys served as a JWK Set over HTTP and
//! fetched by the control plane).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::yaml;
use fedmesh_testbed::{Cluster, ClusterSpec, Testbed, Workload};
use support::mesh::{
    client_workload, endpoints, http_workload, serve_http, testbed, url, wait_routable,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until `w`'s configuration of `shop/api` satisfies `f` (its TrafficPolicy as sent).
async fn wait_api_policy(
    w: &Workload,
    what: &str,
    f: impl Fn(&fedmesh_api::pb::dataplane::TrafficPolicy) -> bool,
) {
    w.wait_config(what, |t| {
        t.service_named("shop/api")
            .and_then(|e| e.svc.policy.as_ref())
            .is_some_and(&f)
    })
    .await
    .unwrap();
}

/// The conditions (`name/Type` → status) of the objects in `<data-dir>/status/<file>`, once there
/// are `n` of them (the control plane writes them for the directory source).
async fn status_conditions(c: &Cluster, file: &str, n: usize) -> Vec<(String, String)> {
    let file = c.data.join("status").join(file);
    let read = |text: &str| -> Vec<(String, String)> {
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).unwrap_or_default();
        docs.iter()
            .flat_map(|d| {
                let name = d["metadata"]["name"].as_str().unwrap_or("").to_string();
                d["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |c| {
                        (
                            format!("{name}/{}", c["type"].as_str().unwrap_or("")),
                            c["status"].as_str().unwrap_or("").to_string(),
                        )
                    })
            })
            .collect()
    };
    let mut conditions = Vec::new();
    for _ in 0..100 {
        conditions = read(&std::fs::read_to_string(&file).unwrap_or_default());
        if conditions.len() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    conditions.sort();
    conditions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_by_spiffe_id_denies_callers_a_policy_does_not_list() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (w, _w_app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&w]));
    let frontend = client_workload(east, "frontend", "e1").await;
    let intruder = client_workload(east, "intruder", "e1").await;
    west.write(
        "api-policy.yaml",
        &yaml::traffic_policy("shop", "api", &[&frontend.id.to_string()]),
    )
    .unwrap();
    wait_api_policy(&w, "the authorization policy", |p| {
        !p.allowed_callers.is_empty()
    })
    .await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    wait_routable(&tb, &intruder, "api", &["west"]).await;
    let ok = ProxyClient::new(frontend.proxy)
        .get(&url("api", "/"))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let denied = ProxyClient::new(intruder.proxy)
        .get(&url("api", "/"))
        .await
        .unwrap();
    assert_eq!(denied.status, 403);
    let msg = String::from_utf8_lossy(&denied.body);
    assert!(
        msg.contains(&intruder.id.to_string()) && msg.contains("may not call shop/api"),
        "{msg}"
    );
    assert!(w.metrics.encode().contains(r#"reason="unauthorized""#));
    tb.shutdown().await;
}

/// An AuthorizationPolicy as an Istio user writes it, enforced by the callee's sidecar in west on
/// callers from east: an ALLOW by principal, method and path, a DENY that wins over it, everyone
/// else refused; each refusal names the policy, is counted with the caller, and the policies'
/// status says they are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_allow_by_principal_method_and_path_and_a_deny_wins() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (w, _w_app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&w]));
    let frontend = client_workload(east, "frontend", "e1").await;
    let intruder = client_workload(east, "intruder", "e1").await;
    west.write(
        "api-authz.yaml",
        &format!(
            r#"apiVersion: fedmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: api-readers, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  rules:
    - from: [{{source: {{principals: ["{}"], clusters: [east]}}}}]
      to: [{{operation: {{methods: [GET], paths: ["/api/*"]}}}}]
---
apiVersion: fedmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: shop}}
spec:
  action: DENY
  rules:
    - to: [{{operation: {{paths: ["/api/admin*"]}}}}]
"#,
            frontend.id
        ),
    )
    .unwrap();
    wait_api_policy(&w, "the authorization policies", |p| {
        p.authorization.len() == 2
    })
    .await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    wait_routable(&tb, &intruder, "api", &["west"]).await;

    let mut f = ProxyClient::new(frontend.proxy);
    let mut i = ProxyClient::new(intruder.proxy);
    assert_eq!(f.get(&url("api", "/api/items")).await.unwrap().status, 200);
    let cases = [
        (
            f.get(&url("api", "/api/admin/users")).await.unwrap(),
            "denied by AuthorizationPolicy shop/no-admin",
        ),
        (
            f.request("POST", &url("api", "/api/items"), &[], bytes::Bytes::new())
                .await
                .unwrap(),
            "no ALLOW policy matches: AuthorizationPolicy shop/api-readers",
        ),
        (
            i.get(&url("api", "/api/items")).await.unwrap(),
            "no ALLOW policy matches: AuthorizationPolicy shop/api-readers",
        ),
    ];
    for (reply, why) in &cases {
        let msg = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.status, 403, "{msg}");
        assert!(
            msg.contains("may not call shop/api") && msg.contains(why),
            "{msg}"
        );
    }
    let metrics = w.metrics.encode();
    for (policy, caller) in [
        ("AuthorizationPolicy shop/no-admin", frontend.id.to_string()),
        (
            "AuthorizationPolicy shop/api-readers",
            intruder.id.to_string(),
        ),
    ] {
        let line = format!(
            "fedmesh_sidecar_authz_total{{service=\"shop/api\",policy=\"{policy}\",source_principal=\"{caller}\",result=\"denied\"}} 1"
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    // Their status, as the control plane writes it for the directory source: both accepted.
    let mut conditions = status_conditions(west, "authorizationpolicies.yaml", 4).await;
    conditions.sort();
    assert_eq!(
        conditions,
        [
            "api-readers/Accepted",
            "api-readers/ResolvedRefs",
            "no-admin/Accepted",
            "no-admin/ResolvedRefs"
        ]
        .map(|c| (c.to_string(), "True".to_string()))
    );
    tb.shutdown().await;
}

/// A plain-text HTTP/1.1 request straight to a sidecar's inbound address, as a caller outside the
/// mesh sends it: the status and body, or `None` when the sidecar closed the connection.
async fn plain_get(inbound: SocketAddr, path: &str, extra: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(inbound).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

const PERMISSIVE: &str = "apiVersion: fedmesh.io/v1alpha1
kind: PeerAuthentication
metadata: {name: migrate, namespace: shop}
spec:
  mtls: {mode: PERMISSIVE}
";

/// Migrating a namespace to mTLS: while its PeerAuthentication is PERMISSIVE the sidecar also
/// serves plain text from callers outside the mesh, as `unauthenticated` (no identity reaches the
/// app, a forged one is dropped, metrics say so), and an identity-based ALLOW never admits it;
/// STRICT (the default, and again once the policy is gone) closes plain-text connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_service_takes_plain_text_as_unauthenticated_and_strict_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("west", "us-west")]).await;
    let west = tb.cluster("west");
    let (w, _app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&w]));
    let frontend = client_workload(west, "frontend", "w1").await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;

    assert_eq!(plain_get(w.inbound, "/strict", "").await, None, "STRICT");

    west.write("peer.yaml", PERMISSIVE).unwrap();
    wait_api_policy(&w, "PERMISSIVE", |p| p.mtls_mode == 1).await;
    let forged = "x-forwarded-client-cert: By=x;URI=spiffe://west.example/ns/shop/sa/admin\r\n";
    let (status, body) = plain_get(w.inbound, "/plain", forged)
        .await
        .expect("served");
    assert_eq!(status, 200, "{body}");
    let echo: fedmesh_testbed::apps::EchoResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(echo.caller, "", "no identity reaches the app: {body}");
    assert_eq!(echo.path, "/plain");
    // Sidecars keep using mTLS, with their identity.
    let r = ProxyClient::new(frontend.proxy)
        .get(&url("api", "/mtls"))
        .await
        .unwrap();
    assert_eq!(r.echo().unwrap().caller, frontend.id.to_string());
    let metrics = w.metrics.encode();
    assert!(
        metrics.contains(
            r#"fedmesh_sidecar_requests_total{reporter="destination",source_principal="unknown",source_cluster="unauthenticated",destination_cluster="west",destination_service="shop/api",response_code="200"} 1"#
        ),
        "{metrics}"
    );

    // `fedmesh status` shows how much plain text the service still gets (the sidecar reports
    // every 2 s, the control plane passes it on to the hub). The last request is plain text, so
    // the last report counts some.
    assert_eq!(
        plain_get(w.inbound, "/again", "").await.map(|r| r.0),
        Some(200)
    );
    let mut shown = String::new();
    for _ in 0..60 {
        let out = std::process::Command::new(support::fedmesh_bin())
            .args(["status"])
            .env("FEDMESH_ADMIN", format!("http://{}", tb.hub_admin))
            .env("FEDMESH_ADMIN_TOKEN", &tb.hub_admin_token)
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        shown = String::from_utf8_lossy(&out.stdout).to_string();
        if shown.contains("PERMISSIVE SERVICE") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let row = shown
        .lines()
        .find(|l| l.starts_with("shop/api ") && l.contains('%'))
        .unwrap_or_else(|| panic!("no plain-text row:\n{shown}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "west", "{row}");
    let plain: f64 = cols[3].parse().unwrap();
    let share: f64 = cols[4].trim_end_matches('%').parse().unwrap();
    assert!(plain > 0.0 && share > 0.0 && share <= 100.0, "{shown}");

    // An ALLOW by identity: the frontend passes, plain text never does.
    west.write(
        "authz.yaml",
        &format!(
            "apiVersion: fedmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: frontend-only, namespace: shop}}\nspec:\n  rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]\n",
            frontend.id
        ),
    )
    .unwrap();
    wait_api_policy(&w, "the ALLOW policy", |p| p.authorization.len() == 1).await;
    let (status, body) = plain_get(w.inbound, "/plain", "").await.expect("answered");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("unauthenticated may not call shop/api")
            && body.contains("AuthorizationPolicy shop/frontend-only"),
        "{body}"
    );
    let r = ProxyClient::new(frontend.proxy)
        .get(&url("api", "/mtls"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        status_conditions(west, "peerauthentications.yaml", 2).await,
        ["migrate/Accepted", "migrate/ResolvedRefs"].map(|c| (c.to_string(), "True".to_string()))
    );

    // The policy gone: STRICT again.
    west.remove("peer.yaml");
    wait_api_policy(&w, "STRICT", |p| p.mtls_mode == 0).await;
    assert_eq!(plain_get(w.inbound, "/strict", "").await, None, "STRICT");
    assert!(w.metrics.encode().contains(r#"reason="tls_handshake""#));
    tb.shutdown().await;
}

/// The token issuer of `tests/tools/jwt_issuer.py` (real PyJWT, ES256): its port; it stops when
/// the child is dropped (its stdin closes).
struct Issuer {
    port: u16,
    _child: tokio::process::Child,
}

impl Issuer {
    async fn start() -> Self {
        let mut cmd: tokio::process::Command = support::python_with("jwt").into();
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tools/jwt_issuer.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
        let mut child = cmd.spawn().expect("python runs");
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
            .await
            .unwrap();
        Self {
            port: line.trim().parse().expect("the issuer prints its port"),
            _child: child,
        }
    }

    async fn call(&self, method: &str, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        s.write_all(format!("{method} {path} HTTP/1.0\r\ncontent-length: 0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    /// A token with these query parameters (see the script).
    async fn token(&self, query: &str) -> String {
        self.call("GET", &format!("/token?{query}")).await
    }
}

const ISS: &str = "https://login.example.com";

/// Request authentication with real tokens: a RequestAuthentication whose keys the control
/// plane fetches from the issuer's JWK Set, and an AuthorizationPolicy on a claim. A missing,
/// expired, foreign-issuer, wrong-audience, wrongly signed or unsigned (`alg: none`) token is
/// answered 401 with the reason; after the issuer rotates its key, new tokens pass (once the
/// control plane refetched the set) and tokens of the retired key are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_checks_real_jwts_and_their_claims_drive_authorization() {
    support::mesh::init_logs();
    let issuer = Issuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new("west", "us-west");
    spec.jwks_refresh = Some(Duration::from_secs(1));
    let tb = Testbed::start(dir.path(), &[spec]).await.unwrap();
    let west = tb.cluster("west");
    let (w, _app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&w]));
    let frontend = client_workload(west, "frontend", "w1").await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    west.write(
        "authn.yaml",
        &format!(
            r#"apiVersion: fedmesh.io/v1alpha1
kind: RequestAuthentication
metadata: {{name: users, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  jwtRules:
    - issuer: {ISS}
      audiences: [shop]
      jwksUri: http://127.0.0.1:{}/jwks.json
---
apiVersion: fedmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: admins, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  rules:
    - to: [{{operation: {{paths: ["/public*"]}}}}]
    - to: [{{operation: {{paths: ["/admin*"]}}}}]
      when: [{{key: "request.auth.claims[groups]", values: [admins]}}]
"#,
            issuer.port
        ),
    )
    .unwrap();
    wait_api_policy(&w, "the fetched keys", |p| {
        p.request_authn
            .first()
            .is_some_and(|a| !a.rules[0].jwks.is_empty())
    })
    .await;
    let mut f = ProxyClient::new(frontend.proxy);
    let mut ask = async |path: &str, token: &str| {
        let auth = format!("Bearer {token}");
        let headers: &[(&str, &str)] = if token.is_empty() {
            &[]
        } else {
            &[("authorization", &auth)]
        };
        let r = f
            .request("GET", &url("api", path), headers, bytes::Bytes::new())
            .await
            .unwrap();
        (
            r.status.as_u16(),
            String::from_utf8_lossy(&r.body).to_string(),
        )
    };

    let user = issuer
        .token(&format!("iss={ISS}&aud=shop&exp=600&groups=users"))
        .await;
    let admin = issuer
        .token(&format!("iss={ISS}&aud=shop&exp=600&groups=admins,users"))
        .await;
    assert_eq!(ask("/public/a", &user).await.0, 200);
    let (status, body) = ask("/admin/a", &user).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("AuthorizationPolicy shop/admins"), "{body}");
    assert_eq!(ask("/admin/a", &admin).await.0, 200);

    for (token, why) in [
        (String::new(), "a JWT is required"),
        (
            issuer.token(&format!("iss={ISS}&aud=shop&exp=-3600")).await,
            "the token has expired",
        ),
        (
            issuer
                .token("iss=https://evil.example&aud=shop&exp=600")
                .await,
            "issuer \"https://evil.example\" is not accepted",
        ),
        (
            issuer
                .token(&format!("iss={ISS}&aud=billing&exp=600"))
                .await,
            "the token's audience is not accepted",
        ),
        (
            issuer
                .token(&format!("iss={ISS}&aud=shop&exp=600&foreign=1"))
                .await,
            "the token's signature does not verify",
        ),
        (
            issuer
                .token(&format!(
                    "iss={ISS}&aud=shop&exp=600&groups=admins&alg=none"
                ))
                .await,
            "the token is not signed (alg none), which is never accepted",
        ),
    ] {
        let (status, body) = ask("/public/a", &token).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(
            body.contains("shop/api requires a valid JWT") && body.contains(why),
            "{why}: {body}"
        );
    }
    assert!(
        w.metrics
            .encode()
            .contains(r#"reason="unauthenticated"} 6"#)
    );

    // Key rotation: the issuer retires key-1 for key-2; the control plane refetches within its
    // refresh (1 s here) and the sidecar takes key-2's tokens and refuses key-1's.
    issuer.call("POST", "/rotate").await;
    let fresh = issuer.token(&format!("iss={ISS}&aud=shop&exp=600")).await;
    let mut passed = false;
    for _ in 0..100 {
        if ask("/public/b", &fresh).await.0 == 200 {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        passed,
        "a token of the new key is accepted after the refresh"
    );
    let (status, body) = ask("/public/b", &user).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("has no key \"key-1\""), "{body}");
    assert_eq!(
        status_conditions(west, "requestauthentications.yaml", 2).await,
        ["users/Accepted", "users/ResolvedRefs"].map(|c| (c.to_string(), "True".to_string()))
    );
    tb.shutdown().await;
}

/// An AuthorizationPolicy that targets a route (Gateway API, GAMMA) covers only the requests that
/// route takes: the callee's sidecar selects the route as the caller's did, so `/admin` (route
/// api-admin) is for the frontend only while the rest of `shop/api` stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_on_a_route_covers_only_that_routes_requests() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("west", "us-west")]).await;
    let west = tb.cluster("west");
    let (w, _app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&w]));
    let frontend = client_workload(west, "frontend", "w1").await;
    let intruder = client_workload(west, "intruder", "w1").await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    wait_routable(&tb, &intruder, "api", &["west"]).await;
    let route = |name: &str, prefix: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: api, port: 80}}]\n  rules: [{{matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}], backendRefs: [{{name: api, port: 80}}]}}]\n"
        )
    };
    west.write(
        "routes.yaml",
        &format!(
            "{}---\n{}",
            route("api-admin", "/admin"),
            route("api-rest", "/")
        ),
    )
    .unwrap();
    west.write(
        "authz.yaml",
        &format!(
            "apiVersion: fedmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: admins, namespace: shop}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: api-admin}}]\n  rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]\n",
            frontend.id
        ),
    )
    .unwrap();
    for who in [&w, &frontend, &intruder] {
        wait_api_policy(who, "the routes and the policy", |p| {
            p.routes.len() >= 2
                && p.authorization
                    .first()
                    .is_some_and(|a| a.routes == ["HTTPRoute shop/api-admin"])
        })
        .await;
    }
    let mut f = ProxyClient::new(frontend.proxy);
    let mut i = ProxyClient::new(intruder.proxy);
    assert_eq!(
        f.get(&url("api", "/admin/users")).await.unwrap().status,
        200
    );
    assert_eq!(i.get(&url("api", "/items")).await.unwrap().status, 200);
    let denied = i.get(&url("api", "/admin/users")).await.unwrap();
    let msg = String::from_utf8_lossy(&denied.body);
    assert_eq!(denied.status, 403, "{msg}");
    assert!(
        msg.contains(&format!("{} may not call shop/api", intruder.id))
            && msg.contains("no ALLOW policy matches: AuthorizationPolicy shop/admins"),
        "{msg}"
    );
    assert_eq!(
        status_conditions(west, "authorizationpolicies.yaml", 2).await,
        ["admins/Accepted", "admins/ResolvedRefs"].map(|c| (c.to_string(), "True".to_string()))
    );
    tb.shutdown().await;
}
