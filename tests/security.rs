//! Attacks replayed against the release binary's processes: each test performs an attack found by
//! review (see SECURITY.md) and checks that it is refused or bounded — and that legitimate use
//! still works afterwards.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fedmesh_test_support::attack::{accept_any_server, proc_kib};
use http_body_util::BodyExt;
use support::federation::*;
use support::*;

/// One connection without a client certificate opening `streams` gRPC calls to `path` at once,
/// each sending a message that claims 4 MiB and delivering up to `body` bytes of it. Returns the
/// outcomes: a `grpc-status` code, or how the stream failed.
async fn grpc_flood(
    addr: &str,
    path: &str,
    streams: usize,
    body: usize,
) -> BTreeMap<String, usize> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(accept_any_server(vec![b"h2".to_vec()]))
        .connect(
            rustls_pki_types::ServerName::try_from("attacker").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_reset_streams(usize::MAX)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut sender = sender.clone();
        let uri = format!("https://{addr}{path}");
        calls.spawn(async move {
            // The gRPC prefix announces 4 MiB; the rest follows in 64 KiB chunks.
            let mut first = vec![0u8, 0x00, 0x40, 0x00, 0x00];
            first.resize(64 * 1024, 0);
            let chunks = std::iter::once(Bytes::from(first))
                .chain(std::iter::repeat_n(
                    Bytes::from(vec![0u8; 64 * 1024]),
                    body / (64 * 1024),
                ))
                .map(|b| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)));
            let req = http::Request::post(uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(http_body_util::StreamBody::new(futures::stream::iter(
                    chunks,
                )))
                .unwrap();
            let call = async {
                let resp = sender.send_request(req).await.map_err(|e| format!("{e}"))?;
                if let Some(s) = resp.headers().get("grpc-status") {
                    return Ok::<_, String>(s.to_str().unwrap_or("?").to_string());
                }
                let collected = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("{e}"))?;
                Ok(collected
                    .trailers()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|s| s.to_str().ok())
                    .unwrap_or("none")
                    .to_string())
            };
            match tokio::time::timeout(Duration::from_secs(30), call).await {
                Ok(Ok(code)) => format!("grpc-status {code}"),
                Ok(Err(e)) if e.contains("refused") => "refused stream".to_string(),
                Ok(Err(_)) => "stream error".to_string(),
                Err(_) => "still open after 30s".to_string(),
            }
        });
    }
    let mut outcomes = BTreeMap::new();
    while let Some(r) = calls.join_next().await {
        *outcomes.entry(r.unwrap()).or_insert(0) += 1;
    }
    outcomes
}

/// Joining needs no certificate, so the control plane's and the hub's gRPC ports take calls from
/// anyone. A flood of Join streams, each feeding a message toward tonic's 4 MiB default, once
/// made a control plane hold 1.15 GB. Now calls without a certificate are few at once, small
/// and short; the processes' memory stays flat and they keep serving.
#[test]
fn a_stream_flood_without_a_certificate_is_bounded_on_the_control_plane_and_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let cp_port = free_port();
    let cp = start_cp_on(dir.path(), &hub, "east", cp_port);
    let cp_addr = format!("127.0.0.1:{cp_port}");
    wait_until(
        "the control plane's gRPC port",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(&cp_addr).is_ok(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, pid, addr, path, streams) in [
        (
            "control plane",
            cp.child.id(),
            cp_addr.as_str(),
            "/fedmesh.identity.v1.Identity/Join",
            300,
        ),
        (
            "hub",
            hub.proc.child.id(),
            hub.grpc.as_str(),
            "/fedmesh.federation.v1.Federation/Join",
            1000,
        ),
    ] {
        let before = proc_kib(pid, "VmRSS");
        let outcomes = rt.block_on(grpc_flood(addr, path, streams, 1024 * 1024));
        let peak = proc_kib(pid, "VmHWM");
        assert!(
            peak.saturating_sub(before) < 96 * 1024,
            "{name}: {before} KiB before, a peak of {peak} KiB during the flood ({outcomes:?})"
        );
        assert!(
            outcomes.get("grpc-status 8").copied().unwrap_or(0) > 0,
            "{name}: calls beyond the limit are answered RESOURCE_EXHAUSTED: {outcomes:?}"
        );
        assert_eq!(
            outcomes.get("still open after 30s"),
            None,
            "{name}: every call ends: {outcomes:?}"
        );
        // Other methods need a certificate, before any body is read.
        let other = rt.block_on(grpc_flood(
            addr,
            "/fedmesh.identity.v1.Identity/SignX509Svid",
            1,
            0,
        ));
        assert_eq!(
            other.get("grpc-status 16"),
            Some(&1),
            "{name}: UNAUTHENTICATED for a call that needs an SVID: {other:?}"
        );
    }
    // Both keep serving: the control plane is still connected to the hub.
    let mut args = vec!["status".to_string()];
    args.extend(admin_args(&hub));
    wait_until(
        "east connected after the flood",
        Duration::from_secs(30),
        || {
            let out = run(&args);
            String::from_utf8_lossy(&out.stdout).contains("east")
        },
    );
}

/// Every `-----BEGIN ... PRIVATE KEY-----` body line (base64, long enough to be unique) in the
/// files under `dir`.
fn private_key_lines(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            private_key_lines(&path, out);
        } else if let Ok(text) = std::fs::read_to_string(&path)
            && text.contains("PRIVATE KEY-----")
        {
            for line in text
                .lines()
                .filter(|l| l.len() >= 40 && !l.starts_with("-----"))
            {
                out.push((path.display().to_string(), line.to_string()));
            }
        }
    }
}

/// `secret` in a 0600 file at `path`; the path.
fn secret_file(path: &std::path::Path, secret: &str) -> String {
    write_secret(path, secret);
    path.display().to_string()
}

/// No secret a run makes — the hub's admin token, a cluster's join token, node join tokens, the
/// private keys of the CA, the hub credentials and the agents — appears in any log line (fedmesh's
/// crates at debug level) or error message, also when a token is refused: wrong, reused, altered.
#[test]
fn no_token_or_private_key_appears_in_any_log_or_error_message() {
    // SAFETY: set before any thread is started; nextest runs this test in its own process.
    unsafe {
        std::env::set_var(
            "FEDMESH_TEST_LOG",
            "info,fedmesh=debug,fedmesh_federation=debug,fedmesh_trust=debug",
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d);
    let cp_port = free_port();
    let mut cp = start_cp_on(d, &hub, "east", cp_port);
    let cp_data = d.join("east-data");
    wait_until(
        "the control plane's admin socket",
        Duration::from_secs(30),
        || cp_data.join("admin.sock").exists(),
    );
    let mut errors = Vec::new();
    let mut run_err = |what: &str, args: &[&str]| {
        let out = fedmesh(args);
        assert!(!out.status.success(), "{what} succeeded");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        errors.push((what.to_string(), text));
    };

    // The hub's admin API with a wrong token.
    let wrong_admin = secret_file(
        &d.join("wrong-admin"),
        "fmadmin-this-is-not-the-admin-token-0123456789",
    );
    run_err(
        "status with a wrong admin token",
        &[
            "status",
            "--admin",
            &hub.admin,
            "--admin-token-file",
            &wrong_admin,
        ],
    );

    // A cluster join token used a second time.
    let args = cp_args(
        d,
        &hub,
        "east",
        "east-again-data",
        &d.join("east.token"),
        free_port(),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut again = Proc::start("east-again", &args, d);
    assert!(
        again
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| !s.success()),
        "a reused join token is refused: {}",
        again.log()
    );

    // A node token: one agent joins with it; a second with the same token, and a third with its
    // secret altered, are refused.
    let data = cp_data.to_str().unwrap();
    let out = fedmesh(&[
        "control-plane",
        "token",
        "create",
        "--node",
        "node-1",
        "--data-dir",
        data,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let parts: Vec<&str> = node_token.split('.').collect();
    assert_eq!(parts.len(), 4, "fmj1.ID.SECRET.PIN: {node_token}");
    let altered = format!(
        "{}.{}.{}.{}",
        parts[0],
        parts[1],
        parts[2].chars().rev().collect::<String>(),
        parts[3]
    );
    let out = fedmesh(&[
        "control-plane",
        "entry",
        "create",
        "--node",
        "node-1",
        "--spiffe-id",
        "spiffe://east.example/ns/shop/sa/web",
        "--data-dir",
        data,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = d.join("entries.yaml");
    std::fs::write(
        &entries,
        format!(
            "entries:\n  - spiffe_id: spiffe://east.example/ns/shop/sa/web\n    selectors: [\"unix:uid:{}\"]\n",
            uid()
        ),
    )
    .unwrap();
    let cp_addr = format!("127.0.0.1:{cp_port}");
    let agent = |name: &str, token: &str| {
        let token_file = secret_file(&d.join(format!("{name}.token")), token);
        Proc::start(
            name,
            &[
                "agent",
                "--control-plane",
                &cp_addr,
                "--node",
                "node-1",
                "--join-token-file",
                &token_file,
                "--data-dir",
                d.join(name).to_str().unwrap(),
                "--socket",
                d.join(format!("{name}.sock")).to_str().unwrap(),
                "--entries",
                entries.to_str().unwrap(),
            ],
            d,
        )
    };
    let mut joined = agent("agent-1", &node_token);
    wait_until("agent-1's Workload API", Duration::from_secs(30), || {
        d.join("agent-1.sock").exists()
    });
    for (name, token, why) in [
        ("agent-reused", node_token.as_str(), "already used"),
        ("agent-altered", altered.as_str(), "join token"),
    ] {
        let mut a = agent(name, token);
        assert!(
            a.wait_exit(Duration::from_secs(30))
                .is_some_and(|s| !s.success()),
            "{name} is refused: {}",
            a.log()
        );
        assert!(a.log().contains(why), "{name}: {}", a.log());
    }
    joined.terminate(Duration::from_secs(10));
    cp.terminate(Duration::from_secs(10));
    drop(hub);

    let admin_token = std::fs::read_to_string(d.join("hub").join("admin-token")).unwrap();
    let join_token = std::fs::read_to_string(d.join("east.token")).unwrap();
    let mut secrets: Vec<(String, String)> = vec![
        ("the hub's admin token".into(), admin_token.trim().into()),
        (
            "the wrong admin token".into(),
            "fmadmin-this-is-not-the-admin-token-0123456789".into(),
        ),
    ];
    for (name, token) in [
        ("east's join token", join_token.trim()),
        ("node-1's join token", node_token.as_str()),
        ("the altered node token", altered.as_str()),
    ] {
        secrets.push((name.to_string(), token.to_string()));
        // The secret part alone (the ID and the CA pin are not secret).
        secrets.push((
            format!("the secret of {name}"),
            token.split('.').nth(2).unwrap().to_string(),
        ));
    }
    let mut keys = Vec::new();
    private_key_lines(d, &mut keys);
    let key_files: std::collections::BTreeSet<&str> =
        keys.iter().map(|(f, _)| f.as_str()).collect();
    assert!(
        key_files.iter().any(|f| f.contains("agent-1"))
            && key_files.iter().any(|f| f.contains("/ca")),
        "the CA's and the agent's keys were found: {key_files:?}"
    );
    for (file, line) in keys {
        secrets.push((format!("a private key line of {file}"), line));
    }

    let mut texts: Vec<(String, String)> = errors;
    for entry in std::fs::read_dir(d).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            texts.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
    // The refusals were logged where an operator looks, so the check below covers them.
    let all: String = texts.iter().map(|(_, t)| t.as_str()).collect();
    for logged in [
        "refused an agent's join: join token",
        "was already used",
        "join token is invalid",
        "agent joined",
        "joined the hub",
    ] {
        assert!(all.contains(logged), "no log says {logged:?}");
    }
    for (what, secret) in &secrets {
        for (name, text) in &texts {
            assert!(!text.contains(secret.as_str()), "{what} appears in {name}");
        }
    }
}

/// A join token's lifetime is bounded and cannot wrap round into the past (review found
/// `99999999999999d` answered 201 with an expiry that had wrapped), and a request body with a
/// field the API does not know is refused with the field named, not silently half-applied.
#[test]
fn the_admin_api_refuses_absurd_token_lifetimes_and_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let hub = support::federation::start_hub(dir.path());
    let token = |ttl: &str| {
        admin_request(
            &hub,
            "POST",
            "/api/v1/tokens",
            &format!(r#"{{"cluster": "east", "trust_domain": "east.example", "ttl": "{ttl}"}}"#),
        )
    };
    for ttl in ["99999999999999d", "213503982334601d", "8d", "0s"] {
        let (code, body) = token(ttl);
        assert_eq!(code, 400, "{ttl}: {body}");
        assert!(
            body.contains("ttl"),
            "{ttl}: the answer names the field: {body}"
        );
    }
    let (code, body) = token("7d");
    assert_eq!(code, 201, "{body}");
    let expires = serde_json::from_str::<serde_json::Value>(&body).unwrap()["expires"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(expires.starts_with("20"), "{expires}");

    let (code, body) = admin_request(
        &hub,
        "POST",
        "/api/v1/tokens",
        r#"{"cluster": "east", "trust_domain": "east.example", "tll": "1h"}"#,
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("tll"), "the unknown field is named: {body}");
    let (code, body) = admin_request(
        &hub,
        "POST",
        "/api/v1/admin-tokens",
        r#"{"name": "ci", "role": "read-only", "expires": "1h"}"#,
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("expires"), "{body}");

    // Every refusal is JSON, with what to do: a body that is not JSON, one not sent as JSON, a
    // path or a method the API does not serve.
    let refusals = [
        (
            support::federation::admin_request_as(
                &hub,
                "POST",
                "/api/v1/tokens",
                "cluster=east",
                "application/x-www-form-urlencoded",
            ),
            415,
            "Content-Type: application/json",
        ),
        (
            admin_request(&hub, "POST", "/api/v1/tokens", "{\"cluster\": "),
            400,
            "not valid JSON",
        ),
        (
            admin_request(
                &hub,
                "POST",
                "/api/v1/tokens",
                r#"{"cluster": "east", "trust_domain": "east.example", "tll": "1h"}"#,
            ),
            422,
            "/api/openapi.json",
        ),
        (
            admin_request(&hub, "GET", "/api/v1/nope", ""),
            404,
            "/api/openapi.json",
        ),
        (
            admin_request(&hub, "PUT", "/api/v1/clusters", ""),
            405,
            "/api/openapi.json",
        ),
    ];
    for ((code, body), want_code, hint) in refusals {
        assert_eq!(code, want_code, "{body}");
        if want_code == 405 {
            assert!(
                body.contains("/api/v1/clusters does not take PUT"),
                "{body}"
            );
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{want_code} answered as JSON ({e}): {body:?}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert!(
            v["hint"].as_str().is_some_and(|h| h.contains(hint)),
            "{want_code}: the hint says {hint:?}: {v}"
        );
    }
    // The OpenAPI document lists them.
    let (_, doc) = admin_request(&hub, "GET", "/api/openapi.json", "");
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let post = &doc["paths"]["/api/v1/tokens"]["post"]["responses"];
    for code in ["201", "400", "415", "422"] {
        assert!(
            post.get(code).is_some(),
            "POST /api/v1/tokens documents {code}: {post}"
        );
    }
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The hub's admin port held idle and slow clients forever (review: 5,000 half-open connections
/// took the hub from 16 to 5,016 fds). Now a request head must arrive within 10 s, so idle and
/// slow-loris connections are cut, and at most 1,024 are open at once; a good client is served
/// once they are gone.
#[test]
fn the_hub_admin_port_cuts_idle_and_slow_clients_and_bounds_its_connections() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let pid = hub.proc.child.id();
    let addr: std::net::SocketAddr = hub.admin.trim_start_matches("http://").parse().unwrap();
    let before = open_fds(pid);

    // 1,100 connections that never send a byte, and one that sends its head a byte at a time.
    let mut idle: Vec<std::net::TcpStream> = (0..1100)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n")
        .unwrap();
    wait_until(
        "the hub to take in what it will",
        Duration::from_secs(30),
        || open_fds(pid) >= before + 1000,
    );
    let held = open_fds(pid);
    // 1,024 served, and at most the 64 accepted connections queued for the server loop (closed
    // as it reaches them when it is full).
    assert!(
        held <= before + 1024 + 64 + 8,
        "{held} fds open (from {before}): the connection limit holds"
    );
    // The slow one keeps dribbling; it is cut all the same.
    let slow_cut = std::thread::spawn(move || {
        for _ in 0..120 {
            if slow.write_all(b"X").is_err() {
                return true;
            }
            let mut b = [0u8; 1];
            slow.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            if matches!(slow.read(&mut b), Ok(0)) {
                return true;
            }
        }
        false
    });
    // Every idle connection ends: cut by the head timeout, or refused over the limit.
    for c in &mut idle {
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = Vec::new();
        assert!(
            matches!(c.read_to_end(&mut b), Ok(0)),
            "an idle connection is closed without an answer"
        );
    }
    assert!(slow_cut.join().unwrap(), "the slow-loris connection is cut");
    drop(idle);
    wait_until(
        "the hub's fds back to where they were",
        Duration::from_secs(30),
        || open_fds(pid) <= before + 4,
    );
    let mut a = vec!["status".to_string()];
    a.extend(admin_args(&hub));
    let out = run(&a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
