//! fedmesh with SPIRE, the reference implementation of SPIFFE, built from its own module by
//! `scripts/peers` and run as processes (server and agent, join-token node attestation, unix
//! workload attestation):
//!
//! - SPIRE as a cluster's identity provider: SPIRE's CA and the cluster's CA are intermediates
//!   under one root, SPIRE's agent hands our sidecar its SVID through the Workload API, and a
//!   request crosses two clusters through the gateways with it; the callee sees SPIRE's ID.
//! - SPIRE federating with us, both ways: SPIRE fetches a cluster's bundle from the control
//!   plane's bundle endpoint, the control plane fetches SPIRE's (a FederatedTrustDomain), and
//!   workloads of the two trust domains call each other with mTLS verified each way; removing
//!   the relationship ends the trust; over `https_web` too (Web PKI, no bundle to start from).
//! - CA rotation on either side (SPIRE's `localauthority x509` prepare/activate/taint, and ours)
//!   while workloads of each trust domain call the other's: no call fails.
//!
//! Skipped (with the reason) where `scripts/peers` could not build SPIRE; required in CI
//! (`FEDMESH_REQUIRE_PEERS=1`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::{ClusterSpec, Testbed, WorkloadSpec};
use support::mesh::{endpoints, get, http_workload, init_logs, serve_http, url, wait_routable};
use support::peers::{EndpointProfile, PeerProfile, Spire, SpireOptions};

/// A self-signed root (the organisation's) as PEM files, and its PEM cert and key.
fn root_ca(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "example root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("root.pem"), dir.join("root.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    support::write_secret(&key_path, &key.serialize_pem());
    (cert_path, key_path, cert.pem(), key.serialize_pem())
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/spiffe_mtls.py")
}

/// The control plane's endpoint SPIFFE ID (`https_spiffe`).
fn cp_id(td: &str) -> String {
    format!("spiffe://{td}/fedmesh/control-plane")
}

/// Gives SPIRE `cluster`'s bundle to start from (it authenticates SPIRE's first fetch from the
/// control plane's bundle endpoint), then has SPIRE fetch it from that endpoint at once.
fn spire_federates_with(spire: &Spire, tb: &Testbed, cluster: &str) {
    let c = tb.cluster(cluster);
    let cp = c.control_plane().unwrap();
    let file = spire.dir.join(format!("{cluster}-bundle.json"));
    std::fs::write(&file, cp.ca.bundle().to_json()).unwrap();
    let id = format!("spiffe://{}", c.trust_domain);
    spire.server(&[
        "bundle",
        "set",
        "-format",
        "spiffe",
        "-id",
        &id,
        "-path",
        file.to_str().unwrap(),
    ]);
    spire.server(&["federation", "refresh", "-id", &id]);
}

fn bundle_url(tb: &Testbed, cluster: &str) -> String {
    let addr = tb
        .cluster(cluster)
        .control_plane()
        .unwrap()
        .bundle_endpoint_addr
        .expect("the control plane serves its bundle endpoint");
    format!("https://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_issues_a_sidecars_identity_and_its_request_crosses_two_clusters() {
    let dir = tempfile::tempdir().unwrap();
    init_logs();
    let (root_cert, root_key, root_pem, root_key_pem) = root_ca(dir.path());
    // West's CA is an intermediate under the root, as SPIRE's will be: the bundle the hub
    // carries for west (the root) verifies both. East serves its bundle endpoint for SPIRE.
    let mut west = ClusterSpec::new("west", "us-west");
    west.upstream = Some(fedmesh_trust::ca::UpstreamAuthority {
        cert_pem: root_pem,
        key_pem: root_key_pem,
        bundle_pem: None,
    });
    let mut east = ClusterSpec::new("east", "us-east");
    east.bundle_endpoint = true;
    let tb = Testbed::start(&dir.path().join("tb"), &[west, east])
        .await
        .unwrap();
    let east_url = bundle_url(&tb, "east");
    let spire_dir = dir.path().join("spire");
    let Some(spire) = tokio::task::block_in_place(|| {
        Spire::start(
            &spire_dir,
            "west.fedmesh.test",
            SpireOptions {
                upstream: Some((root_cert, root_key)),
                federates_with: vec![(
                    "east.fedmesh.test".into(),
                    east_url,
                    PeerProfile::HttpsSpiffe(cp_id("east.fedmesh.test")),
                )],
                ..SpireOptions::default()
            },
        )
    }) else {
        return;
    };
    // SPIRE learns east's bundle from east's control plane, and hands it to the workload with
    // its SVID; nothing of ours issues west's workload identity.
    tokio::task::block_in_place(|| {
        spire_federates_with(&spire, &tb, "east");
        spire.register(
            "spiffe://west.fedmesh.test/ns/shop/sa/web",
            &["east.fedmesh.test"],
        );
    });

    let east = tb.cluster("east");
    let (api, _app) = http_workload(east, "api", "e1").await;
    serve_http(east, "api", &endpoints(&[&api]));
    let mut spec = WorkloadSpec::new("shop", "web", "w1");
    spec.workload_api = Some(spire.endpoint());
    let web = tb
        .cluster("west")
        .workload(&spec, "127.0.0.1:9".parse().unwrap())
        .await
        .expect("the sidecar takes its SVID from the SPIRE agent");
    wait_routable(&tb, &web, "api", &["east"]).await;

    let reply = get(&mut ProxyClient::new(web.proxy), &url("api", "/"), &[]).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let echo = reply.echo().unwrap();
    assert_eq!(echo.cluster, "east");
    assert_eq!(
        echo.caller, "spiffe://west.fedmesh.test/ns/shop/sa/web",
        "east's sidecar verified the caller's SPIRE SVID and passed its ID to the app"
    );

    // The SVID the sidecar holds is the one SPIRE's agent serves (SPIRE's own CA signed it).
    let fetched = spire_dir.join("fetched");
    std::fs::create_dir_all(&fetched).unwrap();
    let out = Command::new(support::peers::bin("spire", "spire-agent").unwrap())
        .args(["api", "fetch", "x509", "-socketPath"])
        .arg(&spire.agent_socket)
        .arg("-write")
        .arg(&fetched)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let spire_leaf = std::fs::read(fetched.join("svid.0.pem")).unwrap();
    let spire_leaf = fedmesh_trust::bundle::parse_pem_certificates(&spire_leaf).unwrap()[0].clone();
    let held = web.identity.svid().expect("the sidecar holds an SVID");
    assert_eq!(
        held.certified_key.cert[0], spire_leaf,
        "the sidecar's SVID is SPIRE's, not one our CA signed"
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(&held.certified_key.cert[0]).unwrap();
    let west_ca = tb.cluster("west").control_plane().unwrap().ca.clone();
    let ours = west_ca.active_certificate().unwrap();
    let (_, ours) = x509_parser::parse_x509_certificate(&ours).unwrap();
    assert_ne!(
        leaf.issuer(),
        ours.subject(),
        "SPIRE's intermediate signed it, not west's CA"
    );
    tb.shutdown().await;
}

/// East (our control plane, serving its bundle endpoint) and a SPIRE server of trust domain
/// payments.example that federates with east (SPIRE holds east's bundle and keeps fetching it),
/// SPIRE's workload `ledger` registered to federate with east, and east's `api` behind a sidecar.
/// East does not federate back yet: [`federate`].
struct WithSpire {
    tb: Testbed,
    spire: Spire,
    spire_dir: std::path::PathBuf,
    api: fedmesh_testbed::Workload,
    _app: fedmesh_testbed::apps::RunningApp,
}

async fn east_and_spire(dir: &Path, east_refresh: Option<Duration>) -> Option<WithSpire> {
    let mut east = ClusterSpec::new("east", "us-east");
    east.bundle_endpoint = true;
    east.bundle_refresh_hint = east_refresh;
    let tb = Testbed::start(&dir.join("tb"), &[east]).await.unwrap();
    let spire_dir = dir.join("spire");
    let east_url = bundle_url(&tb, "east");
    let spire = tokio::task::block_in_place(|| {
        Spire::start(
            &spire_dir,
            "payments.example",
            SpireOptions {
                bundle_endpoint: Some(EndpointProfile::HttpsSpiffe),
                federates_with: vec![(
                    "east.fedmesh.test".into(),
                    east_url,
                    PeerProfile::HttpsSpiffe(cp_id("east.fedmesh.test")),
                )],
                ..SpireOptions::default()
            },
        )
    })?;
    tokio::task::block_in_place(|| {
        spire_federates_with(&spire, &tb, "east");
        spire.register("spiffe://payments.example/ledger", &["east.fedmesh.test"]);
    });
    let east = tb.cluster("east");
    let (api, app) = http_workload(east, "api", "e1").await;
    serve_http(east, "api", &endpoints(&[&api]));
    east.wait_gateway_serves("shop/api").await.unwrap();
    Some(WithSpire {
        tb,
        spire,
        spire_dir,
        api,
        _app: app,
    })
}

/// East federates with SPIRE's trust domain (a FederatedTrustDomain, https_spiffe, starting from
/// the bundle SPIRE shows): waits until it is Ready and east's sidecar trusts payments.example.
async fn federate(w: &WithSpire) {
    let east = w.tb.cluster("east");
    let spire_bundle =
        tokio::task::block_in_place(|| w.spire.server(&["bundle", "show", "-format", "spiffe"]));
    let ftd = format!(
        "apiVersion: fedmesh.io/v1alpha1\nkind: FederatedTrustDomain\nmetadata: {{name: payments}}\nspec:\n  trustDomain: payments.example\n  bundleEndpointURL: {}\n  bundleEndpointProfile: {{type: https_spiffe, endpointSPIFFEID: 'spiffe://payments.example/spire/server'}}\n  trustDomainBundle: '{}'\n",
        w.spire.bundle_endpoint.as_deref().unwrap(),
        spire_bundle.trim().replace('\n', "").replace('\'', "''"),
    );
    east.write("federation.yaml", &ftd).unwrap();
    let status = east.data.join("status/federatedtrustdomains.yaml");
    tokio::task::block_in_place(|| {
        support::wait_until(
            "the FederatedTrustDomain to be Ready",
            Duration::from_secs(30),
            || {
                std::fs::read_to_string(&status)
                    .is_ok_and(|s| s.contains("BundleFetched") && s.contains("payments.example"))
            },
        )
    });
    w.api.wait_trusts("payments.example").await.unwrap();
}

/// SPIRE's workload `ledger` (Python, SPIRE's Workload API) serving mTLS for east's workloads;
/// its port.
fn start_ledger(w: &WithSpire) -> (support::Proc, String) {
    let port_file = w.spire_dir.join("ledger.port");
    let mut server_cmd = support::python_with("h2");
    server_cmd
        .arg(script())
        .arg("serve")
        .arg(&w.spire.agent_socket)
        .arg(&port_file)
        .arg("east.fedmesh.test");
    let ledger = support::Proc::spawn("ledger", server_cmd, &w.spire_dir);
    support::wait_until(
        "the SPIRE workload to listen",
        Duration::from_secs(30),
        || port_file.exists(),
    );
    (ledger, std::fs::read_to_string(&port_file).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_and_fedmesh_federate_both_ways_and_verify_each_others_workloads() {
    let dir = tempfile::tempdir().unwrap();
    init_logs();
    let Some(w) = east_and_spire(dir.path(), None).await else {
        return;
    };
    let (spire, api) = (&w.spire, &w.api);
    let east = w.tb.cluster("east");
    let python = || support::python_with("h2");
    let call_api = || {
        let out = python()
            .arg(script())
            .args(["call"])
            .arg(&spire.agent_socket)
            .arg(api.inbound.to_string())
            .arg(api.id.to_string())
            .args(["--h2", "p80.api.shop.east.fedmesh"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (
            out.status.success().then_some(said),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Before the relationship, east's sidecars do not know the trust domain: refused.
    let (reply, said) = tokio::task::block_in_place(call_api);
    assert!(
        reply.is_none() && said.contains("alert certificate unknown"),
        "a SPIRE workload got in before east federated: {reply:?} {said}"
    );

    // East federates with SPIRE: its control plane fetches SPIRE's bundle over https_spiffe.
    federate(&w).await;

    // SPIRE's workload calls east's sidecar: each side verifies the other against the bundle
    // of the other's trust domain, and the app sees SPIRE's ID.
    let (reply, said) = tokio::task::block_in_place(call_api);
    let reply: serde_json::Value = serde_json::from_str(&reply.expect(&said)).unwrap();
    assert_eq!(reply["status"], 200, "{reply}");
    let echo: serde_json::Value = serde_json::from_str(reply["body"].as_str().unwrap()).unwrap();
    assert_eq!(echo["caller"], "spiffe://payments.example/ledger", "{echo}");

    // And back: a workload with our SVID calls SPIRE's workload, which verifies it against the
    // bundle SPIRE fetched from east's bundle endpoint.
    let ours = east.agent("shop", "reporter").await.unwrap();
    let (_ledger, port) = tokio::task::block_in_place(|| start_ledger(&w));
    let socket = ours.endpoint.strip_prefix("unix:").unwrap().to_string();
    let out = tokio::task::block_in_place(|| {
        python()
            .arg(script())
            .arg("call")
            .arg(&socket)
            .arg(format!("127.0.0.1:{port}"))
            .arg("spiffe://payments.example/ledger")
            .output()
            .unwrap()
    });
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    let answer: serde_json::Value = serde_json::from_str(reply["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        answer["caller"], "spiffe://east.fedmesh.test/ns/shop/sa/reporter",
        "SPIRE's workload verified our SVID"
    );

    // The relationship removed: east's sidecars stop trusting SPIRE's trust domain.
    east.remove("federation.yaml");
    let mut rx = api.identity.subscribe();
    tokio::time::timeout(Duration::from_secs(30), async {
        while api.identity.trust().trusts("payments.example") {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("east's sidecar dropped the bundle of a trust domain it no longer federates with");
    let (reply, said) = tokio::task::block_in_place(call_api);
    assert!(
        reply.is_none() && said.contains("alert certificate unknown"),
        "a SPIRE workload got in after the relationship ended: {reply:?} {said}"
    );
    w.tb.shutdown().await;
}

/// `spiffe_mtls.py show SOCKET`: the SVID's ID and issuer and the bundles a Workload API
/// holds now.
fn show(socket: &Path) -> serde_json::Value {
    let out = support::python_with("h2")
        .arg(script())
        .arg("show")
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A steady stream of calls (`spiffe_mtls.py stream`) from the workload of Workload API `socket`
/// to `addr`, which must be `peer`, each on a new connection; it runs until `stop` exists (and
/// is killed if the test fails first).
fn stream(
    name: &str,
    socket: &Path,
    addr: &str,
    peer: &str,
    stop: &Path,
    h2_sni: Option<&str>,
) -> support::Proc {
    let mut cmd = support::python_with("h2");
    cmd.arg(script())
        .arg("stream")
        .arg(socket)
        .args([addr, peer])
        .arg(stop);
    if let Some(sni) = h2_sni {
        cmd.args(["--h2", sni]);
    }
    support::Proc::spawn(name, cmd, stop.parent().unwrap())
}

/// A stream's report once it stopped: (sent, failed, the first errors).
fn stream_report(mut p: support::Proc) -> (u64, u64, serde_json::Value) {
    p.wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{} did not stop: {}", p.name, p.log()));
    let log = p.log();
    let r: serde_json::Value = log
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("{} reported nothing: {log}", p.name));
    (
        r["sent"].as_u64().unwrap(),
        r["failed"].as_u64().unwrap(),
        r["errors"].clone(),
    )
}

/// The authority ID under `section` ("Active X.509 authority", "Prepared X.509 authority") in
/// `spire-server localauthority x509 ...` output.
fn authority_id(out: &str, section: &str) -> String {
    out.lines()
        .skip_while(|l| !l.trim_start().starts_with(section))
        .find_map(|l| l.trim().strip_prefix("Authority ID:"))
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| panic!("no {section} in {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotations_on_either_side_cost_no_request_of_a_steady_stream() {
    let dir = tempfile::tempdir().unwrap();
    init_logs();
    // East's bundle asks to be fetched again every 2 s, so SPIRE sees east's next authority soon.
    let Some(w) = east_and_spire(dir.path(), Some(Duration::from_secs(2))).await else {
        return;
    };
    federate(&w).await;
    let east = w.tb.cluster("east");
    let ours = east.agent("shop", "reporter").await.unwrap();
    let our_socket = std::path::PathBuf::from(ours.endpoint.strip_prefix("unix:").unwrap());
    let spire_socket = w.spire.agent_socket.clone();
    let (_ledger, port) = tokio::task::block_in_place(|| start_ledger(&w));

    // Into east: SPIRE's workload calls east's api sidecar (HTTP/2); out of east: our workload
    // calls SPIRE's ledger. Every call a new handshake with what each side holds at that moment.
    let stop = dir.path().join("stop");
    let into_east = stream(
        "into-east",
        &spire_socket,
        &w.api.inbound.to_string(),
        &w.api.id.to_string(),
        &stop,
        Some("p80.api.shop.east.fedmesh"),
    );
    let out_of_east = stream(
        "out-of-east",
        &our_socket,
        &format!("127.0.0.1:{port}"),
        "spiffe://payments.example/ledger",
        &stop,
        None,
    );
    let status = east.data.join("status/federatedtrustdomains.yaml");
    tokio::task::block_in_place(|| {
        // SPIRE rotates its CA: prepare the next authority; activate it only once east holds it
        // (the FederatedTrustDomain's status counts the authorities; SPIRE's refresh hint is a
        // minute) and so does our workload's Workload API; then taint the old one, which makes
        // SPIRE's agent give its workloads new SVIDs at once.
        let spire = &w.spire;
        let before = show(&spire_socket)["issuer"].clone();
        let prepared = authority_id(
            &spire.server(&["localauthority", "x509", "prepare"]),
            "Prepared X.509 authority",
        );
        support::wait_until(
            "east to hold SPIRE's next authority",
            Duration::from_secs(90),
            || {
                std::fs::read_to_string(&status).is_ok_and(|s| s.contains("2 X.509 authorities"))
                    && show(&our_socket)["bundles"]["payments.example"] == 2
            },
        );
        let old = authority_id(
            &spire.server(&["localauthority", "x509", "show"]),
            "Active X.509 authority",
        );
        spire.server(&[
            "localauthority",
            "x509",
            "activate",
            "-authorityID",
            &prepared,
        ]);
        spire.server(&["localauthority", "x509", "taint", "-authorityID", &old]);
        support::wait_until(
            "SPIRE's workload to hold an SVID of the new authority",
            Duration::from_secs(60),
            || show(&spire_socket)["issuer"] != before,
        );

        // East rotates its CA the same way: prepare; activate once SPIRE's workloads hold the
        // next authority (SPIRE fetched east's bundle again, its agent passed it on).
        let ca = east.control_plane().unwrap().ca.clone();
        ca.prepare_next(None).unwrap();
        support::wait_until(
            "SPIRE's workload to hold east's next authority",
            Duration::from_secs(60),
            || show(&spire_socket)["bundles"]["east.fedmesh.test"] == 2,
        );
        ca.activate_next().unwrap();
    });
    // SVIDs issued before keep their lifetime (renewed at half of it); one issued from now on
    // comes from the new authority, and SPIRE's workload verifies it.
    let before = tokio::task::block_in_place(|| show(&our_socket))["issuer"].clone();
    let newcomer = east.agent("shop", "auditor").await.unwrap();
    let newcomer_socket =
        std::path::PathBuf::from(newcomer.endpoint.strip_prefix("unix:").unwrap());
    let out = tokio::task::block_in_place(|| {
        assert_ne!(
            show(&newcomer_socket)["issuer"],
            before,
            "east's new authority signs"
        );
        support::python_with("h2")
            .arg(script())
            .arg("call")
            .arg(&newcomer_socket)
            .arg(format!("127.0.0.1:{port}"))
            .arg("spiffe://payments.example/ledger")
            .output()
            .unwrap()
    });
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let answer: serde_json::Value = serde_json::from_str(reply["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        answer["caller"], "spiffe://east.fedmesh.test/ns/shop/sa/auditor",
        "SPIRE's workload verified an SVID of east's new authority"
    );
    std::fs::write(&stop, "").unwrap();
    for (name, child) in [("into east", into_east), ("out of east", out_of_east)] {
        let (sent, failed, errors) = tokio::task::block_in_place(|| stream_report(child));
        eprintln!("{name}: {sent} calls, {failed} failed {errors}");
        assert!(sent >= 20, "{name}: only {sent} calls were made");
        assert_eq!(
            failed, 0,
            "{name}: {failed} of {sent} calls failed: {errors}"
        );
    }
    w.tb.shutdown().await;
}

/// A Web PKI of the test's own: a root (`root.pem`, what `SSL_CERT_FILE` names) and, for each
/// of `names`, a serving certificate for 127.0.0.1 signed by it (`NAME.pem`, `NAME.key` 0600).
fn web_pki(dir: &Path, names: &[&str]) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::default();
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "test web root");
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root_cert = root.self_signed(&root_key).unwrap();
    std::fs::write(dir.join("root.pem"), root_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(root, root_key);
    for name in names {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} bundle endpoint"));
        params.subject_alt_names = vec![rcgen::SanType::IpAddress(std::net::IpAddr::from([
            127, 0, 0, 1,
        ]))];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        support::write_secret(&dir.join(format!("{name}.key")), &key.serialize_pem());
    }
    dir.join("root.pem")
}

/// The X.509 authorities (DER, base64) of a SPIFFE bundle in JWK Set form.
fn x509_authorities(bundle_json: &str) -> Vec<String> {
    let set: serde_json::Value = serde_json::from_str(bundle_json)
        .unwrap_or_else(|e| panic!("not a SPIFFE bundle ({e}): {bundle_json}"));
    let mut out: Vec<String> = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .map(|k| k["x5c"][0].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn spire_and_a_control_plane_federate_over_https_web() {
    // No bundle given to either side first: with https_web, each authenticates the other's
    // bundle endpoint by Web PKI (here a root of the test's, through SSL_CERT_FILE, which both
    // Go's and our client honor), as a user would with certificates from a public CA.
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web");
    let root = web_pki(&web, &["east", "spire"]);
    let (data, source) = (dir.path().join("east"), dir.path().join("east-source"));
    std::fs::create_dir_all(&source).unwrap();
    let endpoint = format!("127.0.0.1:{}", support::free_port());
    let mut cmd = Command::new(support::fedmesh_bin());
    cmd.args(["control-plane", "--cluster", "east"])
        .args(["--trust-domain", "east.fedmesh.test"])
        .arg("--data-dir")
        .arg(&data)
        .arg(format!("--source=dir:{}", source.display()))
        .args(["--listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0"])
        .args(["--bundle-endpoint", &endpoint])
        .arg("--bundle-endpoint-cert")
        .arg(web.join("east.pem"))
        .arg("--bundle-endpoint-key")
        .arg(web.join("east.key"))
        .env("SSL_CERT_FILE", &root);
    let _east = support::Proc::spawn("control-plane", cmd, dir.path());
    support::wait_until(
        "east's bundle endpoint to listen",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(&endpoint).is_ok(),
    );

    let Some(spire) = Spire::start(
        &dir.path().join("spire"),
        "payments.example",
        SpireOptions {
            bundle_endpoint: Some(EndpointProfile::HttpsWeb {
                cert: web.join("spire.pem"),
                key: web.join("spire.key"),
            }),
            federates_with: vec![(
                "east.fedmesh.test".into(),
                format!("https://{endpoint}"),
                PeerProfile::HttpsWeb,
            )],
            env: vec![("SSL_CERT_FILE".into(), root.clone())],
            ..SpireOptions::default()
        },
    ) else {
        return;
    };

    // SPIRE fetched east's bundle from the control plane's https_web endpoint: the same
    // authorities `fedmesh ca bundle` prints for east's CA.
    let ours = support::fedmesh(&["ca", "bundle", "--dir", data.join("ca").to_str().unwrap()]);
    assert!(ours.status.success(), "{ours:?}");
    let ours = x509_authorities(&String::from_utf8_lossy(&ours.stdout));
    assert!(!ours.is_empty());
    support::wait_until(
        "SPIRE to hold east's bundle, fetched over https_web",
        Duration::from_secs(60),
        || {
            // Fails until SPIRE has fetched it.
            let Ok(seen) = spire.server_try(&[
                "bundle",
                "list",
                "-id",
                "spiffe://east.fedmesh.test",
                "-format",
                "spiffe",
            ]) else {
                return false;
            };
            x509_authorities(seen.trim()) == ours
        },
    );

    // And east fetches SPIRE's bundle from SPIRE's https_web endpoint, with no bundle to start
    // from: the FederatedTrustDomain becomes Ready and the bundle is kept in east's data dir.
    std::fs::write(
        source.join("federation.yaml"),
        format!(
            "apiVersion: fedmesh.io/v1alpha1\nkind: FederatedTrustDomain\nmetadata: {{name: payments}}\nspec:\n  trustDomain: payments.example\n  bundleEndpointURL: {}\n  bundleEndpointProfile: {{type: https_web}}\n",
            spire.bundle_endpoint.as_deref().unwrap()
        ),
    )
    .unwrap();
    let status = data.join("status/federatedtrustdomains.yaml");
    support::wait_until(
        "east's FederatedTrustDomain to be Ready",
        Duration::from_secs(30),
        || std::fs::read_to_string(&status).is_ok_and(|s| s.contains("BundleFetched")),
    );
    let theirs = spire.server(&["bundle", "show", "-format", "spiffe"]);
    let held = std::fs::read_to_string(data.join("federated/payments.example.json")).unwrap();
    assert_eq!(
        x509_authorities(&held),
        x509_authorities(theirs.trim()),
        "east holds SPIRE's authorities"
    );
}
