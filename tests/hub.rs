//! The hub as an operator runs it, every part a real process: two replicas on a secured etcd
//! (TLS, client certificate, user and password), one killed with SIGKILL while a control plane
//! is connected to it; the admin API over TLS for a client certificate whose SPIFFE ID is
//! listed with `--admin-id`; operator withdrawal with `DELETE` over HTTP; and a silent cluster
//! marked stale, then its exports withdrawn after `--expire-after`.

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedmesh_test_support::EtcdServer;
use fedmesh_testbed::yaml::{self, EndpointSpec};
use support::federation::{
    Hub, admin_args, admin_request, cp_args, etcd_replica_args, join_token_file, run, start_cp,
    start_hub_with,
};
use support::{Proc, fedmesh, fedmesh_ok, free_port, wait_until};

/// Publishes and exports `shop/<name>` from the control plane of `cluster` (its directory
/// source `<dir>/<cluster>-src`).
fn export(dir: &Path, cluster: &str, name: &str) {
    let src = dir.join(format!("{cluster}-src"));
    let ep = EndpointSpec {
        addr: "127.0.0.1:9".parse().unwrap(),
        zone: "z1".into(),
        ready: true,
    };
    std::fs::write(
        src.join(format!("{name}.yaml")),
        yaml::service("shop", name, &[("http", 80, "http")], &[ep]),
    )
    .unwrap();
    std::fs::write(
        src.join(format!("{name}-export.yaml")),
        yaml::service_export("shop", name),
    )
    .unwrap();
}

/// `fedmesh status -o json` with `admin` flags; panics with its stderr on failure.
fn status(admin: &[String]) -> serde_json::Value {
    let mut a = vec!["status".to_string(), "-o".into(), "json".into()];
    a.extend_from_slice(admin);
    let out = run(&a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The services in a status, as "ns/name@cluster" for each exporting cluster.
fn exports(s: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|svc| {
            svc["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    format!(
                        "{}@{}",
                        svc["service"].as_str().unwrap(),
                        c["cluster"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v
}

fn cluster<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
}

fn wait_admin(port: u16) {
    wait_until("the hub admin API", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A hub replica on the secured etcd; the CA directory and the admin token are shared, as
/// one Kubernetes Secret mounted by every replica.
fn start_replica(dir: &Path, etcd: &EtcdServer, name: &str, grpc: u16, admin: u16) -> Hub {
    let args = etcd_replica_args(
        etcd,
        dir,
        name,
        &dir.join("admin-token"),
        &format!("127.0.0.1:{grpc}"),
        &format!("127.0.0.1:{admin}"),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = Proc::start(name, &args, dir);
    wait_admin(admin);
    Hub {
        proc,
        admin: format!("http://127.0.0.1:{admin}"),
        grpc: format!("127.0.0.1:{grpc}"),
        token_file: dir.join("admin-token"),
    }
}

#[test]
fn two_hub_replicas_on_a_secured_etcd_serve_one_clusterset_and_a_control_plane_outlives_one() {
    let etcd = EtcdServer::start_secure();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ports = [(free_port(), free_port()), (free_port(), free_port())];
    let mut hub_a = start_replica(d, &etcd, "hub-a", ports[0].0, ports[0].1);
    // The second replica starts once the first has made the shared CA and admin token.
    let hub_b = start_replica(d, &etcd, "hub-b", ports[1].0, ports[1].1);
    // Tokens come from replica a; the control plane knows both replicas.
    let token = join_token_file(d, &hub_a, "east");
    let mut args = cp_args(d, &hub_a, "east", "east-data", &token, free_port());
    let at = args.iter().position(|a| a == "--hub").unwrap() + 1;
    args[at] = format!("{},{}", hub_a.grpc, hub_b.grpc);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _east = Proc::start("east", &args, d);
    export(d, "east", "api");

    let via_a = admin_args(&hub_a);
    let via_b = admin_args(&hub_b);
    wait_until(
        "the export, read through replica b",
        Duration::from_secs(30),
        || exports(&status(&via_b)) == ["shop/api@east"],
    );
    assert_eq!(exports(&status(&via_a)), ["shop/api@east"]);
    let s = status(&via_a);
    assert_eq!(
        cluster(&s, "east").unwrap()["hub_replica"],
        "hub-a",
        "east starts on the first replica it was given: {s}"
    );

    // Replica a dies without a word. Whichever replica east was on, its next export reaches
    // the clusterset through the one left.
    hub_a.proc.child.kill().unwrap();
    hub_a.proc.child.wait().unwrap();
    export(d, "east", "reviews");
    wait_until(
        "the second export, after replica a died",
        Duration::from_secs(60),
        || exports(&status(&via_b)) == ["shop/api@east", "shop/reviews@east"],
    );
    let east = status(&via_b);
    let east = cluster(&east, "east").unwrap();
    assert_eq!(east["connected"], true, "{east}");
    assert_eq!(east["hub_replica"], "hub-b", "{east}");

    // Restarted, replica a reads the same clusterset from etcd: nothing was lost.
    hub_a.proc = start_replica(d, &etcd, "hub-a", ports[0].0, ports[0].1).proc;
    assert_eq!(
        exports(&status(&via_a)),
        ["shop/api@east", "shop/reviews@east"]
    );
}

/// A CSR for `id` with a fresh key: (CSR PEM, key PEM).
fn csr_for(id: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

/// An operator's client certificate for `id`, signed by the hub's own CA with `fedmesh ca sign`
/// as the README says: (chain file, key file).
fn operator_cert(dir: &Path, ca_dir: &Path, name: &str, id: &str) -> (PathBuf, PathBuf) {
    let (csr, key) = csr_for(id);
    let csr_file = dir.join(format!("{name}.csr"));
    std::fs::write(&csr_file, csr).unwrap();
    let key_file = dir.join(format!("{name}.key"));
    support::write_secret(&key_file, &key);
    let out = run(&[
        "ca".into(),
        "sign".into(),
        "--dir".into(),
        ca_dir.display().to_string(),
        "--csr".into(),
        csr_file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = dir.join(format!("{name}.pem"));
    std::fs::write(&chain, out.stdout).unwrap();
    (chain, key_file)
}

#[test]
fn over_admin_tls_a_listed_spiffe_id_needs_no_token_and_any_other_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub_with(
        d,
        &[
            "--admin-tls",
            "--admin-id",
            "spiffe://hub.fedmesh/ops/oncall",
        ],
    );
    let data = d.join("hub");
    let admin = hub.admin.trim_start_matches("http://").to_string();
    let ca_dir = data.join("ca");
    let bundle = d.join("hub-ca.pem");
    let out = run(&[
        "ca".into(),
        "bundle".into(),
        "--dir".into(),
        ca_dir.display().to_string(),
        "--format".into(),
        "pem".into(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&bundle, out.stdout).unwrap();
    let url = format!("https://{admin}");
    let no_token = d.join("no-token");
    let with = |extra: &[&Path]| {
        let mut a: Vec<String> = [
            "status",
            "--admin",
            &url,
            "--admin-ca",
            bundle.to_str().unwrap(),
            "--admin-token-file",
            no_token.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if let [cert, key] = extra {
            a.extend([
                "--admin-cert".into(),
                cert.display().to_string(),
                "--admin-key".into(),
                key.display().to_string(),
            ]);
        }
        run(&a)
    };

    // The on-call engineer's certificate is enough.
    let (cert, key) = operator_cert(d, &ca_dir, "oncall", "spiffe://hub.fedmesh/ops/oncall");
    let out = with(&[&cert, &key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("CLUSTER"));

    // A certificate from the same CA for an ID not listed is not.
    let (cert, key) = operator_cert(d, &ca_dir, "intern", "spiffe://hub.fedmesh/ops/intern");
    let out = with(&[&cert, &key]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("403") && err.contains("spiffe://hub.fedmesh/ops/intern is not an admin ID"),
        "{err}"
    );

    // Nor is one from a CA the hub does not trust, whatever ID it claims.
    let other = d.join("other-ca");
    support::ca_init(&other, "hub.fedmesh", &[]);
    let (cert, key) = operator_cert(d, &other, "forged", "spiffe://hub.fedmesh/ops/oncall");
    let out = with(&[&cert, &key]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("forged: {err}");
    assert!(err.contains("certificate"), "the refusal says why: {err}");

    // The token still works over TLS; plain HTTP to the TLS port does not.
    let out = run(&[
        "status".into(),
        "--admin".into(),
        url.clone(),
        "--admin-ca".into(),
        bundle.display().to_string(),
        "--admin-token-file".into(),
        data.join("admin-token").display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "status".into(),
        "--admin".into(),
        format!("http://{admin}"),
        "--admin-token-file".into(),
        data.join("admin-token").display().to_string(),
    ]);
    assert!(!out.status.success());
}

#[test]
fn operators_withdraw_over_http_and_a_silent_cluster_goes_stale_then_expires() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub_with(d, &["--stale-after", "1s", "--expire-after", "6s"]);
    let via = admin_args(&hub);
    let mut east = start_cp(d, &hub, "east");
    let mut west = start_cp(d, &hub, "west");
    export(d, "east", "api");
    export(d, "east", "orders");
    export(d, "west", "reviews");
    let all = ["shop/api@east", "shop/orders@east", "shop/reviews@west"];
    wait_until("three exports", Duration::from_secs(30), || {
        exports(&status(&via)) == all
    });

    // Both control planes go away for good.
    for cp in [&mut east, &mut west] {
        cp.child.kill().unwrap();
        cp.child.wait().unwrap();
    }
    // Silent past --stale-after: stale, and everything still routable.
    wait_until("both clusters stale", Duration::from_secs(30), || {
        let s = status(&via);
        ["east", "west"]
            .iter()
            .all(|c| cluster(&s, c).unwrap()["stale"] == true)
    });
    let s = status(&via);
    assert_eq!(exports(&s), all, "stale clusters keep their exports");
    assert_eq!(cluster(&s, "west").unwrap()["expired"], false);
    // What an alert watches: per cluster, stale, connected and seconds since last seen.
    let (code, metrics) = admin_request(&hub, "GET", "/metrics", "");
    assert_eq!(code, 200, "{metrics}");
    for c in ["east", "west"] {
        let series = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("fedmesh_hub_{name}{{cluster=\"{c}\"}} ")))
                .map(|v| v.trim().parse::<i64>().unwrap())
        };
        assert_eq!(series("cluster_stale"), Some(1), "{metrics}");
        assert_eq!(series("cluster_connected"), Some(0), "{metrics}");
        assert!(
            series("cluster_last_seen_seconds").unwrap() >= 1,
            "{metrics}"
        );
    }

    // An operator withdraws one export with plain HTTP calls, then removes a cluster with the CLI.
    assert_eq!(
        admin_request(
            &hub,
            "DELETE",
            "/api/v1/clusters/east/exports/shop/orders",
            ""
        )
        .0,
        204
    );
    let (code, body) = admin_request(
        &hub,
        "DELETE",
        "/api/v1/clusters/east/exports/shop/orders",
        "",
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("does not export"), "{body}");
    assert_eq!(
        exports(&status(&via)),
        ["shop/api@east", "shop/reviews@west"]
    );
    let mut remove = vec!["hub", "cluster", "remove", "east"];
    remove.extend(via.iter().map(String::as_str));
    let out = fedmesh_ok(&remove);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed cluster east"),
        "{out:?}"
    );
    let mut again = vec!["hub", "cluster", "remove", "east"];
    again.extend(via.iter().map(String::as_str));
    let out = fedmesh(&again);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no cluster east"),
        "{out:?}"
    );
    let s = status(&via);
    assert!(cluster(&s, "east").is_none(), "{s}");
    let (_, metrics) = admin_request(&hub, "GET", "/metrics", "");
    assert!(
        !metrics.contains("cluster=\"east\""),
        "a removed cluster leaves the metrics: {metrics}"
    );
    assert_eq!(exports(&s), ["shop/reviews@west"]);

    // West, silent past --expire-after, loses its exports but stays listed as expired.
    wait_until("west's exports withdrawn", Duration::from_secs(60), || {
        exports(&status(&via)).is_empty()
    });
    let s = status(&via);
    assert_eq!(cluster(&s, "west").unwrap()["expired"], true, "{s}");
    assert!(
        hub.proc.log().contains("cluster expired"),
        "{}",
        hub.proc.log()
    );

    // Each operator change is in the audit log with who made it.
    let (code, body) = admin_request(&hub, "GET", "/api/v1/audit", "");
    assert_eq!(code, 200, "{body}");
    let audit: serde_json::Value = serde_json::from_str(&body).unwrap();
    let records = audit
        .as_array()
        .or_else(|| audit["records"].as_array())
        .unwrap();
    let done: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (f("actor"), f("action"), f("target"))
        })
        .filter(|(_, a, _)| a == "export.withdraw" || a == "cluster.remove")
        .collect();
    // Newest first.
    assert_eq!(
        done,
        [
            ("admin token".into(), "cluster.remove".into(), "east".into()),
            (
                "admin token".into(),
                "export.withdraw".into(),
                "east/shop/orders".into()
            ),
        ],
        "{body}"
    );
}
