//! The hub's admin API against its own OpenAPI document, by schemathesis (PyPI): generated
//! requests — valid, invalid, and sequences that create, list and revoke tokens — must get the
//! statuses, content types and bodies the document promises, never a server error, and refuse
//! what the schema forbids. It runs with the hub's admin token (from a config file reading the
//! environment, not a command line) and checks also what an unauthenticated client gets.

mod support;

use support::federation::{admin_request, start_hub};
use support::python_with;

#[test]
fn schemathesis_finds_nothing_the_openapi_document_does_not_promise() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let token = std::fs::read_to_string(&hub.token_file).unwrap();
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "headers = { Authorization = \"Bearer ${FEDMESH_ST_TOKEN}\" }\n",
    )
    .unwrap();
    let out = python_with("schemathesis")
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .args([
            "run",
            &format!("{}/api/openapi.json", hub.admin),
            "--checks",
            "all",
            "--phases",
            "coverage,fuzzing,stateful",
            "--max-examples",
            "50",
            "--no-color",
        ])
        .env("FEDMESH_ST_TOKEN", token.trim())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
    assert!(
        report.contains("Tested: 22"),
        "every operation tested: {report}"
    );
    // It was authenticated: its sequences created and revoked tokens, which the audit log records.
    let (status, audit) = admin_request(&hub, "GET", "/api/v1/audit?limit=1000", "");
    assert_eq!(status, 200, "{audit}");
    assert!(
        audit.contains("\"action\":\"token.create\"")
            && audit.contains("\"actor\":\"admin token\""),
        "no authenticated change was made: {audit}"
    );
}
