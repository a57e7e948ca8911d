//! `fedmesh ca` and `fedmesh agent` as a user runs them: real processes, the Workload API on a
//! real Unix socket, clients from PyPI (`spiffe`) and crates.io (`spiffe`).

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

const WEB: &str = "spiffe://east.example/ns/default/sa/web";

struct Setup {
    dir: tempfile::TempDir,
    agent: Proc,
    socket: std::path::PathBuf,
}

/// `fedmesh agent --ca-dir CA` in `d` with `entries` and more flags, serving on `<d>/agent.sock`
/// once it is there.
fn agent_on(d: &Path, ca: &Path, entries: &str, extra: &[&str]) -> (Proc, std::path::PathBuf) {
    let (entries_file, socket) = (d.join("entries.yaml"), d.join("agent.sock"));
    std::fs::write(&entries_file, entries).unwrap();
    let mut args = vec![
        "agent",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--entries",
        entries_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let agent = Proc::start("agent", &args, d);
    wait_until("the agent socket", Duration::from_secs(20), || {
        socket.exists()
    });
    (agent, socket)
}

fn start_agent(entries: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let east = d.join("east-ca");
    let west = d.join("west-ca");
    for (td, path) in [("east.example", &east), ("west.example", &west)] {
        ca_init(path, td, &[]);
    }
    let west_bundle = fedmesh(&["ca", "bundle", "--dir", west.to_str().unwrap()]);
    assert!(west_bundle.status.success());
    std::fs::write(d.join("west.json"), &west_bundle.stdout).unwrap();
    let federated = format!("west.example={}", d.join("west.json").display());
    let (agent, socket) = agent_on(d, &east, entries, &["--federated-bundle", &federated]);
    Setup { dir, agent, socket }
}

/// Checks, with the crates.io `spiffe` client, that the agent on `socket` hands out WEB's SVID.
fn assert_serves_web(socket: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let source = spiffe::X509Source::builder()
            .endpoint(format!("unix:{}", socket.display()))
            .build()
            .await
            .unwrap();
        assert_eq!(source.svid().unwrap().spiffe_id().to_string(), WEB);
        source.shutdown().await;
    });
}

fn my_entry() -> String {
    format!(
        "entries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:{}\"]\n",
        uid()
    )
}

#[test]
fn python_spiffe_client_gets_svid_bundles_and_jwts_from_the_agent() {
    let s = start_agent(&my_entry());
    let out = python_with("spiffe")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/workload_api_client.py"))
        .arg(&s.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.agent.log()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spiffe_id"], WEB);
    assert_eq!(v["chain_verified"], true, "{v}");
    assert_eq!(
        v["bundle_trust_domains"],
        serde_json::json!(["east.example", "west.example"])
    );
    assert_eq!(v["jwt_spiffe_id"], WEB);
    assert_eq!(v["jwt_validated_spiffe_id"], WEB);
    assert_eq!(v["wrong_audience_rejected"], true);
    // Refused for its audience, not for any other failure.
    assert!(
        v["wrong_audience_error"]
            .as_str()
            .is_some_and(|e| e.contains("audience")),
        "{v}"
    );
    assert!(
        v["jwt_bundle_trust_domains"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "east.example")
    );
}

#[test]
fn rust_spiffe_x509_source_gets_svid_and_bundles_from_the_agent() {
    let s = start_agent(&my_entry());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let source = spiffe::X509Source::builder()
            .endpoint(format!("unix:{}", s.socket.display()))
            .build()
            .await
            .unwrap();
        let svid = source.svid().unwrap();
        assert_eq!(svid.spiffe_id().to_string(), WEB);
        let bundles = source.bundle_set().unwrap();
        assert!(
            bundles
                .get(&spiffe::TrustDomain::new("east.example").unwrap())
                .is_some()
        );
        assert!(
            bundles
                .get(&spiffe::TrustDomain::new("west.example").unwrap())
                .is_some()
        );
        source.shutdown().await;
    });
}

#[test]
fn agent_stops_cleanly_on_sigterm_with_open_streams_and_removes_its_socket() {
    let mut s = start_agent(&my_entry());
    // A workload holding a FetchX509SVID stream open must not keep the agent alive.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let source = rt.block_on(async {
        spiffe::X509Source::builder()
            .endpoint(format!("unix:{}", s.socket.display()))
            .build()
            .await
            .unwrap()
    });
    let status = s
        .agent
        .terminate(Duration::from_secs(10))
        .expect("agent exited");
    drop(source);
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        s.agent.log()
    );
    assert!(!s.socket.exists(), "socket removed");
    drop(s.dir);
}

#[test]
fn agent_refuses_to_start_on_bad_entries_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ca_init(&ca, "east.example", &[]);
    let entries = dir.path().join("entries.yaml");
    // The agent's start with `text` as its entries fails; its error output.
    let start_error = |text: &str| {
        std::fs::write(&entries, text).unwrap();
        let out = fedmesh(&[
            "agent",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--socket",
            dir.path().join("a.sock").to_str().unwrap(),
            "--entries",
            entries.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = start_error(
        "entries:\n  - spiffe_id: spiffe://east.example/ok\n    selectors: [\"unix:uid:1\"]\n  - spiffe_id: spiffe://east.example/bad\n    selectors: [\"docker:label:x\"]\n",
    );
    assert!(
        err.contains("entry 1") && err.contains("docker:label:x"),
        "{err}"
    );
    // A template without the Kubernetes attestor: nothing would ever expand it.
    let err = start_error(
        "entries:\n  - spiffe_id: spiffe://east.example/ns/{ns}/sa/{sa}\n    selectors: [\"k8s:container-name:proxy\"]\n",
    );
    assert!(
        err.contains("template") && err.contains("--k8s-node"),
        "{err}"
    );
}

/// `fedmesh workload fetch` as the README shows it: the caller's SVID, key (0600) and every
/// bundle written as PEM; a good edit of the agent's entries file applies without a restart (the
/// next fetch gets the new identity); a socket nobody serves is a clear error.
#[test]
fn workload_fetch_writes_the_svid_and_bundles_and_a_good_edit_of_the_entries_applies() {
    let s = start_agent(&my_entry());
    let out_dir = s.dir.path().join("out");
    let socket = s.socket.to_str().unwrap();
    let fetch = |write: Option<&Path>| {
        let mut args = vec!["workload", "fetch", "--socket", socket];
        if let Some(w) = write {
            args.extend(["--write", w.to_str().unwrap()]);
        }
        fedmesh(&args)
    };
    let out = fetch(Some(&out_dir));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(WEB),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let chain = fedmesh_trust::bundle::parse_pem_certificates(
        &std::fs::read(out_dir.join("svid.pem")).unwrap(),
    )
    .unwrap();
    let leaf = fedmesh_trust::svid::inspect(&chain[0]).unwrap();
    assert_eq!(leaf.spiffe_id.to_string(), WEB);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is the caller's alone");
    for td in ["east.example", "west.example"] {
        let roots = fedmesh_trust::bundle::parse_pem_certificates(
            &std::fs::read(out_dir.join(format!("bundle.{td}.pem"))).unwrap(),
        )
        .unwrap();
        assert_eq!(roots.len(), 1, "{td}'s bundle");
    }

    // A good edit: the same caller now gets another identity, with no restart.
    const API: &str = "spiffe://east.example/ns/default/sa/api";
    std::fs::write(
        s.dir.path().join("entries.yaml"),
        my_entry().replace(WEB, API),
    )
    .unwrap();
    wait_until("the edited entry to apply", Duration::from_secs(20), || {
        let out = fetch(None);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(API)
    });

    let out = fedmesh(&[
        "workload",
        "fetch",
        "--socket",
        s.dir.path().join("nobody.sock").to_str().unwrap(),
        "--timeout",
        "2s",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nobody.sock"),
        "the error names the socket: {err}"
    );
}

#[test]
fn agent_keeps_the_last_good_entries_when_the_file_turns_bad() {
    let s = start_agent(&my_entry());
    std::fs::write(s.dir.path().join("entries.yaml"), "entries: [\n").unwrap();
    wait_until(
        "the agent to report the bad file",
        Duration::from_secs(20),
        || s.agent.log().contains("keeping the previous entries"),
    );
    assert_serves_web(&s.socket);
}

#[test]
fn ca_cli_signs_csrs_and_refuses_foreign_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ca_init(&ca, "east.example", &["--svid-ttl", "10m"]);
    let key = rcgen::KeyPair::generate().unwrap();
    let write_csr = |name: &str, uri: &str| {
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let path = dir.path().join(name);
        std::fs::write(&path, p.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
        path
    };
    let good = write_csr("good.csr", "spiffe://east.example/ns/a/sa/b");
    let out = fedmesh_ok(&[
        "ca",
        "sign",
        "--dir",
        ca.to_str().unwrap(),
        "--csr",
        good.to_str().unwrap(),
    ]);
    // The chain's leaf is an X509-SVID for the CSR's ID, for the CA's --svid-ttl (10 minutes).
    let chain = fedmesh_trust::bundle::parse_pem_certificates(&out.stdout).unwrap();
    let leaf = fedmesh_trust::svid::inspect(&chain[0]).unwrap();
    assert_eq!(
        leaf.spiffe_id.to_string(),
        "spiffe://east.example/ns/a/sa/b"
    );
    assert!(!leaf.is_ca);
    let lifetime = leaf.not_after.duration_since(leaf.not_before).unwrap();
    assert!(
        (Duration::from_secs(540)..=Duration::from_secs(660)).contains(&lifetime),
        "an SVID of --svid-ttl 10m lives {lifetime:?}"
    );

    let foreign = write_csr("foreign.csr", "spiffe://west.example/ns/a/sa/b");
    let out = fedmesh(&[
        "ca",
        "sign",
        "--dir",
        ca.to_str().unwrap(),
        "--csr",
        foreign.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("signs only for trust domain east.example"),
        "{err}"
    );

    let out = fedmesh(&[
        "ca",
        "bundle",
        "--dir",
        ca.to_str().unwrap(),
        "--format",
        "pem",
    ]);
    assert!(out.status.success());
    let roots = fedmesh_trust::bundle::parse_pem_certificates(&out.stdout).unwrap();
    assert_eq!(roots.len(), 1, "one authority before any rotation");
    fedmesh_ok(&["ca", "status", "--dir", ca.to_str().unwrap()]);
    let out = fedmesh(&[
        "ca",
        "status",
        "--dir",
        dir.path().join("missing").to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "a missing CA directory is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("fedmesh ca init"));
}

/// `fedmesh ca rotate --step` as the README shows it, with `ca status` after each step: prepare
/// publishes a second authority that signs nothing yet, activate makes it the signer and retires
/// the old one (still in the bundle while its SVIDs live), prune keeps a retired authority whose
/// SVIDs may still be valid; steps out of order are refused with what to do.
#[test]
fn ca_rotation_steps_on_the_cli_show_in_ca_status_and_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ca_init(&ca, "east.example", &[]);
    let ca_dir = ca.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = fedmesh(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // (authority, state) rows of `ca status`.
    let states = || -> Vec<(String, String)> {
        let (ok, out, err) = run(&["ca", "status", "--dir", ca_dir]);
        assert!(ok, "{err}");
        out.lines()
            .skip_while(|l| !l.starts_with("AUTHORITY"))
            .skip(1)
            .map(|l| {
                let mut f = l.split_whitespace();
                (f.next().unwrap().to_string(), f.next().unwrap().to_string())
            })
            .collect()
    };
    let roots = || {
        let (ok, out, err) = run(&["ca", "bundle", "--dir", ca_dir, "--format", "pem"]);
        assert!(ok, "{err}");
        fedmesh_trust::bundle::parse_pem_certificates(out.as_bytes())
            .unwrap()
            .len()
    };
    let first = states();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, "active");

    let (ok, _, err) = run(&["ca", "rotate", "--dir", ca_dir, "--step", "activate"]);
    assert!(
        !ok && err.contains("there is no prepared authority to activate; prepare one first"),
        "{err}"
    );

    let (ok, _, err) = run(&["ca", "rotate", "--dir", ca_dir, "--step", "prepare"]);
    assert!(ok, "{err}");
    let prepared = states();
    assert_eq!(prepared.len(), 2, "{prepared:?}");
    assert_eq!(prepared[0], first[0], "the old authority still signs");
    assert_eq!(prepared[1].1, "prepared");
    assert_eq!(
        roots(),
        2,
        "the prepared authority is published before it signs"
    );

    let (ok, _, err) = run(&["ca", "rotate", "--dir", ca_dir, "--step", "activate"]);
    assert!(ok, "{err}");
    let activated = states();
    assert_eq!(
        activated,
        vec![
            (first[0].0.clone(), "retired".to_string()),
            (prepared[1].0.clone(), "active".to_string())
        ]
    );
    assert_eq!(
        roots(),
        2,
        "the retired authority stays trusted while its SVIDs live"
    );

    let (ok, _, err) = run(&["ca", "rotate", "--dir", ca_dir, "--step", "prune"]);
    assert!(ok && err.contains("nothing to prune"), "{err}");
    assert_eq!(states(), activated);
}

/// The socket is open to every local user and the first header block of a connection is decoded
/// before any caller is attested. HPACK lets one byte stand for a 4 KB table entry: a 60 KB
/// block of such references once decoded to 240 MB. Now the decoded size is bounded: the agent
/// closes the connection, its memory stays flat, and it keeps serving.
#[test]
fn an_hpack_bomb_on_the_workload_api_socket_is_refused_with_the_agents_memory_bounded() {
    use fedmesh_test_support::attack::*;
    use std::io::{Read, Write};
    let s = start_agent(&my_entry());
    let pid = s.agent.child.id();
    let before = proc_kib(pid, "VmRSS");
    let mut block = literal_indexed(b"x-bomb", &[b'a'; 4000]);
    block.resize(60 * 1024, indexed(62)[0]);
    for attempt in 0..3 {
        let mut bytes = client_start();
        let mut chunks = block.chunks(16 * 1024).peekable();
        let mut kind = HEADERS;
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            bytes.extend(frame(kind, flags, 1, chunk));
            kind = CONTINUATION;
        }
        let mut c = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(&bytes);
        let mut answer = Vec::new();
        let closed = c.read_to_end(&mut answer);
        assert!(
            closed.is_ok(),
            "attempt {attempt}: the agent closes the connection ({closed:?})"
        );
    }
    let peak = proc_kib(pid, "VmHWM");
    assert!(
        peak.saturating_sub(before) < 32 * 1024,
        "the agent grew from {before} KiB to a peak of {peak} KiB"
    );
    assert!(
        s.agent.log().contains("decodes beyond the limit"),
        "{}",
        s.agent.log()
    );
    // Still serving workloads.
    assert_serves_web(&s.socket);
}

/// The agent rotates its CA on schedule (`--rotation-check`, as the README says): it prepares
/// the next authority at half the active one's life and activates it at three quarters, and
/// the workloads it serves get the next authority in their bundle before it signs, then SVIDs
/// signed by it.
#[test]
fn the_agent_rotates_its_ca_on_the_schedule_it_checks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = d.join("ca");
    // An 8 s authority: prepared after ~4 s, active after ~6 s. SVIDs live 1 s, so the agent
    // fetches new ones all along.
    ca_init(
        &ca,
        "east.example",
        &[
            "--ca-ttl",
            "8s",
            "--svid-ttl",
            "1s",
            "--max-svid-ttl",
            "2s",
            "--jwt-ttl",
            "1s",
            "--max-jwt-ttl",
            "2s",
        ],
    );
    let (agent, socket) = agent_on(d, &ca, &my_entry(), &["--rotation-check", "100ms"]);
    let states = || -> Vec<(String, String)> {
        let out = fedmesh_ok(&["ca", "status", "--dir", ca.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip_while(|l| !l.starts_with("AUTHORITY"))
            .skip(1)
            .map(|l| {
                let mut f = l.split_whitespace();
                (f.next().unwrap().to_string(), f.next().unwrap().to_string())
            })
            .collect()
    };
    let first = states();
    assert_eq!(first.len(), 1, "{first:?}");
    let first_id = first[0].0.clone();
    // What a workload holds: the roots of its bundle and the authority that signed its SVID
    // (the issuer's subject key identifier names it, as `ca status` does).
    let out_dir = d.join("out");
    let fetch = || {
        fedmesh_ok(&[
            "workload",
            "fetch",
            "--socket",
            socket.to_str().unwrap(),
            "--write",
            out_dir.to_str().unwrap(),
        ]);
        let read = |f: &str| {
            fedmesh_trust::bundle::parse_pem_certificates(&std::fs::read(out_dir.join(f)).unwrap())
                .unwrap()
        };
        (read("bundle.east.example.pem").len(), read("svid.pem"))
    };
    let (roots, _) = fetch();
    assert_eq!(roots, 1);

    let mut prepared = None;
    wait_until(
        "the next authority prepared",
        Duration::from_secs(30),
        || {
            let s = states();
            prepared = s
                .iter()
                .find(|(_, st)| st == "prepared")
                .map(|(id, _)| id.clone());
            prepared.is_some()
        },
    );
    let prepared = prepared.unwrap();
    let ski_of = |authority: &str| {
        let pem = std::fs::read(ca.join(format!("authorities/{authority}.crt"))).unwrap();
        let der = fedmesh_trust::bundle::parse_pem_certificates(&pem).unwrap();
        key_ids(&der[0])
            .0
            .expect("an authority has a subject key identifier")
    };
    // Workloads trust the next authority before it signs: the first fetch whose bundle holds
    // both still carries an SVID of the old one.
    let mut first_with_both = None;
    wait_until(
        "workloads to trust the prepared authority",
        Duration::from_secs(20),
        || {
            let (roots, chain) = fetch();
            if roots == 2 {
                first_with_both = Some(chain);
            }
            roots == 2
        },
    );
    let chain = first_with_both.unwrap();
    assert_eq!(
        key_ids(&chain[0]).1,
        Some(ski_of(&first_id)),
        "the SVID handed out with the two-authority bundle is still the old authority's"
    );
    wait_until(
        "the prepared authority active",
        Duration::from_secs(30),
        || {
            let s = states();
            s.contains(&(first_id.clone(), "retired".into()))
                && s.contains(&(prepared.clone(), "active".into()))
        },
    );
    let log = agent.log();
    assert!(log.contains("prepared next CA authority"), "{log}");
    assert!(
        log.contains(&format!(
            "activated CA authority trust_domain=east.example authority={prepared}"
        )),
        "{log}"
    );
    // SVIDs now come from the new authority: the leaf's authority key identifier is the new
    // authority's subject key identifier.
    let ski = ski_of(&prepared);
    wait_until(
        "an SVID signed by the new authority",
        Duration::from_secs(20),
        || {
            let (_, chain) = fetch();
            key_ids(&chain[0]).1.as_ref() == Some(&ski)
        },
    );
}

/// A certificate's (subject, authority) key identifiers.
fn key_ids(der: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let (mut ski, mut aki) = (None, None);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => {}
        }
    }
    (ski, aki)
}

/// A process no registration entry matches gets the agent's refusal from `fedmesh workload
/// fetch` at once, with what to check — not a wait until `--timeout` (review found it waited out
/// its 10 s deadline on the PermissionDenied it had been given).
#[test]
fn workload_fetch_by_an_unregistered_process_says_so_instead_of_timing_out() {
    // Entries for another uid only.
    let s = start_agent(&format!(
        "entries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:{}\"]\n",
        uid() + 1
    ));
    let out = fedmesh(&[
        "workload",
        "fetch",
        "--socket",
        s.socket.to_str().unwrap(),
        "--timeout",
        "10m",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("has no identity for this process")
            && err.contains(&format!("uid {}", uid()))
            && err.contains("--entries"),
        "{err}"
    );
    assert!(!err.contains("within"), "refused, not timed out: {err}");
}

/// The Workload API socket is open to every local user (mode 0666), and review found one uid
/// could hold 5,000 connections until the agent ran out of file descriptors. A uid now holds at
/// most 256: past that a new connection is closed at once, and it is served again as soon as it
/// lets some go.
#[test]
fn one_uid_cannot_hold_more_than_its_share_of_the_workload_api_socket() {
    use std::io::Read;
    let s = start_agent(&my_entry());
    let held: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&s.socket).unwrap())
        .collect();
    for c in &held {
        c.set_nonblocking(true).unwrap();
    }
    // The agent closes what is over the limit, and only that.
    let closed = || {
        held.iter()
            .filter(|c| matches!((&**c).read(&mut [0u8; 1]), Ok(0)))
            .count()
    };
    wait_until(
        "44 connections over the limit closed",
        Duration::from_secs(30),
        || closed() >= 44,
    );
    assert_eq!(closed(), 44, "exactly those over 256");
    let pid = s.agent.child.id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // Each connection holds its socket and the caller's pidfd (taken at accept for attestation).
    assert!(fds < 2 * 256 + 64, "the agent holds {fds} fds");
    // Letting some go makes room: the uid is served again.
    drop(held);
    fedmesh_ok(&["workload", "fetch", "--socket", s.socket.to_str().unwrap()]);
}
