//! `fedmesh bench authz`: what zero trust costs at the callee.
//!
//! 1. The callee sidecar's instructions per request, counted by callgrind (stable where CPU time
//!    on a shared machine is not), on three services it serves at one endpoint: `bench/open` (no
//!    policy, the baseline), `bench/guarded` (50 AuthorizationPolicies of 10 rules each — 10 DENY
//!    that never match, 40 ALLOW of which only the last rule of the last one admits the caller,
//!    so every rule is evaluated) and `bench/jwt` (a RequestAuthentication). Every request carries
//!    the same ES256 token, so they differ only in what the callee does with it. HTTP/1.1
//!    through a client sidecar, one request at a time; the baseline is counted again last, to
//!    show the noise between two counts.
//! 2. JWT validations per CPU second on one thread (ES256, keys compiled as the sidecar holds
//!    them): the thread's own CPU time, so other load on the machine does not count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use fedmesh_api::pb::dataplane as pb;
use fedmesh_testbed::apps;
use fedmesh_testbed::yaml::{self, EndpointSpec};
use fedmesh_testbed::{ClusterSpec, Testbed};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;

use super::callgrind::UnderCallgrind;
use super::load::{HttpClient, Proto, free_addr, http_client, http_status, spawn, wait_until};

/// Requests counted per service.
const COUNTED: usize = 400;
const POLICIES: usize = 50;
const RULES: usize = 10;
const DENIES: usize = 10;
const ISSUER: &str = "https://login.bench.example";

pub struct Params {
    /// Request and response body size in bytes.
    pub body: usize,
    /// How long the JWT validation loop runs.
    pub duration: Duration,
}

/// The 50 policies of 10 rules on `bench/guarded`: only the last rule of the last ALLOW admits
/// `caller`; one DENY rule refuses `/denied-by-bench` (to check the policies are in force).
fn guarded_policies(caller: &str) -> String {
    let mut out = String::new();
    for i in 0..POLICIES {
        let deny = i < DENIES;
        let mut rules = String::new();
        for j in 0..RULES {
            let last = !deny && i == POLICIES - 1 && j == RULES - 1;
            let (principals, paths) = if last {
                (format!("\"{caller}\""), "\"/*\"".to_string())
            } else if deny && i == 0 && j == 0 {
                (String::new(), "\"/denied-by-bench\"".to_string())
            } else {
                (
                    format!(
                        "\"spiffe://elsewhere.example/ns/team{i}/sa/svc{j}\", \"spiffe://elsewhere.example/ns/batch{i}/*\""
                    ),
                    format!("\"/v{i}/items/{j}\", \"/v{i}/admin/{j}*\""),
                )
            };
            let from = if principals.is_empty() {
                String::new()
            } else {
                format!("from: [{{source: {{principals: [{principals}]}}}}], ")
            };
            rules.push_str(&format!(
                "    - {{{from}to: [{{operation: {{methods: [POST, GET], paths: [{paths}]}}}}], when: [{{key: \"request.headers[content-type]\", values: [\"application/*\"]}}]}}\n"
            ));
        }
        out.push_str(&format!(
            "---\napiVersion: fedmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i:02}, namespace: bench}}\nspec:\n  targetRefs: [{{kind: Service, name: guarded}}]\n  action: {}\n  rules:\n{rules}",
            if deny { "DENY" } else { "ALLOW" }
        ));
    }
    out
}

/// A P-256 key: its signing key and its JWK Set (JSON).
fn es256_key() -> anyhow::Result<(jsonwebtoken::EncodingKey, String)> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("cannot make a P-256 key"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("cannot read the P-256 key"))?;
    let public = pair.public_key().as_ref();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "bench", "alg": "ES256", "use": "sig",
        "x": b64.encode(&public[1..33]), "y": b64.encode(&public[33..]),
    }]});
    Ok((
        jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwks.to_string(),
    ))
}

fn token(key: &jsonwebtoken::EncodingKey) -> anyhow::Result<String> {
    token_for(key, "user-1")
}

fn token_for(key: &jsonwebtoken::EncodingKey, sub: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("bench".into());
    Ok(jsonwebtoken::encode(
        &h,
        &serde_json::json!({"iss": ISSUER, "aud": "bench", "sub": sub, "exp": exp, "groups": ["a", "b"]}),
        key,
    )?)
}

/// POST `body` to `uri` with `headers`; the status.
async fn post(
    client: &HttpClient,
    uri: &http::Uri,
    body: &Bytes,
    headers: &[(&str, &str)],
) -> anyhow::Result<u16> {
    let mut req =
        http::Request::post(uri.clone()).header("content-type", "application/octet-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Full::new(body.clone()))?),
    )
    .await
    .context("no answer within 10s")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != 200 && !body.starts_with(b"fedmesh: ") {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(status)
}

/// This thread's CPU time, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs `f` for `duration` (at most 10 million times); calls per CPU second of this thread.
fn per_cpu_second(duration: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<f64> {
    let (start, cpu0) = (Instant::now(), thread_cpu());
    let mut n = 0u64;
    while start.elapsed() < duration && n < 10_000_000 {
        anyhow::ensure!(f(), "the bench token does not validate");
        n += 1;
    }
    Ok(n as f64 / (thread_cpu() - cpu0).max(1e-9))
}

/// JWT validations per CPU second of this thread: of distinct tokens (each verified), of one
/// token again and again (a session: verified once, then remembered), and the baseline, ring's
/// P-256 signature check of a token alone (what verifying any ES256 token must pay).
fn jwt_rate(duration: Duration) -> anyhow::Result<(f64, f64, f64)> {
    let (key, jwks) = es256_key()?;
    let authn = fedmesh_dataplane::policy::Authn::from(
        &[pb::RequestAuthn {
            name: "RequestAuthentication bench/users".into(),
            rules: vec![pb::JwtRule {
                issuer: ISSUER.into(),
                audiences: vec!["bench".into()],
                jwks: jwks.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }][..],
    );
    // More distinct tokens than the verified-token cache holds, in turn: every one is verified.
    let distinct = (0..2_000)
        .map(|i| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token_for(&key, &format!("user-{i}"))?).parse()?,
            );
            Ok(h)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut next = distinct.iter().cycle();
    let full = per_cpu_second(duration, || {
        next.next()
            .is_some_and(|h| authn.authenticate(h).is_ok_and(|c| c.is_some()))
    })?;
    let session = &distinct[0];
    let cached = per_cpu_second(duration, || {
        authn.authenticate(session).is_ok_and(|c| c.is_some())
    })?;
    let token = token_for(&key, "user-0")?;
    // The baseline: the signature alone, with the key already parsed.
    let jwk: serde_json::Value = serde_json::from_str(&jwks)?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let coord = |k: &str| b64.decode(jwk["keys"][0][k].as_str().unwrap_or_default());
    let mut public = vec![4u8];
    public.extend(coord("x")?);
    public.extend(coord("y")?);
    let (message, signature) = token.rsplit_once('.').context("a JWT")?;
    let signature = b64.decode(signature)?;
    let verifier =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public);
    let baseline = per_cpu_second(duration, || {
        verifier.verify(message.as_bytes(), &signature).is_ok()
    })?;
    Ok((full, cached, baseline))
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    println!(
        "fedmesh bench authz: what authorization and request authentication cost at the callee"
    );
    let (per_sec, cached, baseline) =
        tokio::task::spawn_blocking(move || jwt_rate(p.duration)).await??;
    println!(
        "\n  JWT validation (ES256, keys compiled, one thread, {:?} each, per CPU second of the thread):\n    baseline: ring's P-256 signature check alone           {baseline:.0}/s\n    fedmesh, a new token each time (every one verified)    {per_sec:.0}/s ({:.2}× the baseline)\n    fedmesh, a session's token again (verified once)       {cached:.0}/s ({:.1}× the baseline)",
        p.duration,
        per_sec / baseline,
        cached / baseline
    );

    let dir = tempfile::tempdir()?;
    let tb = Testbed::start(dir.path(), &[ClusterSpec::new("east", "us-east")]).await?;
    let east = tb.cluster("east");
    let app = apps::http_fixed(TcpListener::bind("127.0.0.1:0").await?, p.body).await;
    let client_agent = east.agent("bench", "client").await?;
    let server_agent = east.agent("bench", "server").await?;
    let caller = format!("spiffe://{}/ns/bench/sa/client", east.trust_domain);
    let server_in = free_addr()?;
    for name in ["open", "guarded", "jwt"] {
        east.write(
            &format!("{name}.yaml"),
            &yaml::service(
                "bench",
                name,
                &[("http", 80, "")],
                &[EndpointSpec {
                    addr: server_in,
                    zone: "e1".into(),
                    ready: true,
                }],
            ),
        )?;
    }
    east.write("guarded-policies.yaml", &guarded_policies(&caller))?;
    let (key, jwks) = es256_key()?;
    east.write(
        "jwt-authn.yaml",
        &format!(
            "apiVersion: fedmesh.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: users, namespace: bench}}\nspec:\n  targetRefs: [{{kind: Service, name: jwt}}]\n  jwtRules: [{{issuer: \"{ISSUER}\", audiences: [bench], jwks: '{jwks}'}}]\n"
        ),
    )?;
    let bearer = format!("Bearer {}", token(&key)?);

    let (client_admin, server_admin) = (free_addr()?, free_addr()?);
    let listens: Vec<(SocketAddr, &str)> = vec![
        (free_addr()?, "bench/open:80"),
        (free_addr()?, "bench/guarded:80"),
        (free_addr()?, "bench/jwt:80"),
    ];
    let cp = east.cp_addr.to_string();
    let mut a: Vec<String> = [
        "sidecar",
        "--control-plane",
        &cp,
        "--workload-api",
        &client_agent.endpoint,
        "--admin",
        &client_admin.to_string(),
        "--zone",
        "e1",
    ]
    .map(String::from)
    .to_vec();
    for (addr, to) in &listens {
        a.extend(["--listen".to_string(), format!("{addr}={to}")]);
    }
    let _client = spawn(dir.path(), "sidecar-client", &a)?;

    let server = UnderCallgrind::start(
        dir.path(),
        "callee-sidecar",
        &[
            "sidecar",
            "--control-plane",
            &cp,
            "--workload-api",
            &server_agent.endpoint,
            "--admin",
            &server_admin.to_string(),
            "--zone",
            "e1",
            "--inbound",
            &format!("{server_in}={}", app.addr),
        ]
        .map(String::from),
        &[],
    )?;
    let result = async {
        wait_until(
            &format!("the client sidecar ready (see {})", dir.path().display()),
            || async move { http_status(client_admin, "/readyz").await == Some(200) },
        )
        .await?;
        server.ready(server_admin).await?;
        let client = http_client(Proto::H1);
        let body = Bytes::from(vec![b'q'; p.body]);
        let uri = |i: usize, path: &str| -> anyhow::Result<http::Uri> {
            Ok(format!("http://{}{path}", listens[i].0).parse()?)
        };
        // Every request carries the same token, so the three differ only in what the callee
        // does with it (bench/open and bench/guarded ignore it).
        let token: &[(&str, &str)] = &[("authorization", bearer.as_str())];
        let auth: [&[(&str, &str)]; 3] = [token, token, token];
        // Every service answers, and the policies are in force: a DENY refuses its path, the
        // RequestAuthentication a request without a token.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let mut got = Vec::new();
            for (i, h) in auth.iter().enumerate() {
                got.push(post(&client, &uri(i, "/")?, &body, h).await.map_err(|e| format!("{e:#}")));
            }
            got.push(post(&client, &uri(1, "/denied-by-bench")?, &body, &[]).await.map_err(|e| format!("{e:#}")));
            got.push(post(&client, &uri(2, "/")?, &body, &[]).await.map_err(|e| format!("{e:#}")));
            let want = [Ok(200), Ok(200), Ok(200), Ok(403), Ok(401)];
            if got == want {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the services did not answer as configured within 3 minutes: open, guarded, jwt with a token, guarded /denied-by-bench, jwt without a token answered {got:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Every policy was accepted (an invalid one would fail closed and cost less).
        let status = std::fs::read_to_string(east.data.join("status/authorizationpolicies.yaml"))
            .unwrap_or_default();
        anyhow::ensure!(
            status.matches("type: Accepted").count() == POLICIES && !status.contains("reason: Invalid"),
            "not every bench AuthorizationPolicy was accepted:\n{status}"
        );
        println!(
            "\n  instructions per request of the callee sidecar (callgrind, {COUNTED} requests per service, HTTP/1.1 via a client sidecar, one at a time, {} B bodies):",
            p.body
        );
        let mut per_request = Vec::new();
        // The baseline again at the end: how far two counts of the same path differ is the noise.
        for (i, h) in auth.iter().enumerate().chain([(0, &auth[0])]) {
            let u = uri(i, "/")?;
            for _ in 0..50 {
                post(&client, &u, &body, h).await?;
            }
            server.reset()?;
            for _ in 0..COUNTED {
                let s = post(&client, &u, &body, h).await?;
                anyhow::ensure!(s == 200, "{} answered {s}", listens[i].1);
            }
            per_request.push(server.dump().await? / COUNTED as f64);
        }
        Ok::<_, anyhow::Error>(per_request)
    }
    .await;
    drop(server);
    let per_request = result?;
    let (open, guarded, jwt, again) = (
        per_request[0],
        per_request[1],
        per_request[2],
        per_request[3],
    );
    println!("    no policy (bench/open)                                    {open:.0}");
    println!(
        "    no policy again, last (the noise between two counts)      {again:.0} ({:.3}×)",
        again / open
    );
    println!(
        "    {POLICIES} AuthorizationPolicies × {RULES} rules (bench/guarded)        {guarded:.0} ({:.3}×)",
        guarded / open
    );
    println!(
        "    RequestAuthentication, ES256 token (bench/jwt)            {jwt:.0} ({:.3}×)",
        jwt / open
    );
    let authz_ratio = guarded / open;
    println!("\n  goals:");
    println!(
        "    inbound authorization with {POLICIES} policies × {RULES} rules ≤ 1.05× the CPU per request of no policy (callee instructions): {authz_ratio:.3}× — {}",
        if authz_ratio <= 1.05 {
            "met"
        } else {
            "NOT met"
        }
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "    JWT validation (ES256, cached JWKS) ≥ 20,000/s on one core: a session's token {cached:.0}/s — {}; a new token each time {per_sec:.0}/s — {} (ring's P-256 check alone: {baseline:.0}/s)",
        met(cached >= 20_000.0),
        met(per_sec >= 20_000.0)
    );
    tb.shutdown().await;
    Ok(())
}
