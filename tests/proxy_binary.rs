//! `fedmesh-proxy`, the binary meshed pods and gateways run: only the data plane in it, and the
//! same commands as `fedmesh sidecar` / `fedmesh gateway`.

use std::process::Command;

mod support;

/// The crates a symbol belongs to, from `nm --demangle` of a binary.
fn crates_linked(bin: &str) -> std::collections::BTreeSet<String> {
    let out = Command::new("nm")
        .args(["--demangle", "--defined-only", bin])
        .output()
        .expect("run nm (binutils)");
    assert!(
        out.status.success(),
        "nm {bin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.splitn(3, ' ').nth(2))
        .filter_map(|sym| {
            // `<T as crate::Trait>::f` and `crate::module::f` both name the crate after a `<` or
            // at the start.
            let sym = sym.trim_start_matches('<');
            let name = sym.split("::").next()?;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then(|| name.to_string())
        })
        .collect()
}

#[test]
fn the_proxy_binary_carries_the_data_plane_and_nothing_of_the_hub_kubernetes_or_the_stores() {
    let proxy = crates_linked(support::proxy_bin());
    let full = crates_linked(support::fedmesh_bin());
    // What must not be in a pod's proxy: the hub and control plane, Kubernetes clients, the
    // stores, DNS serving, the testbed and the benchmarks (the `fedmesh` binary's own crate).
    let absent = [
        "fedmesh_federation",
        "kube_client",
        "kube_runtime",
        "redb",
        "etcd_client",
        "hickory_server",
        "fedmesh_testbed",
        "fedmesh",
    ];
    for c in absent {
        // The check can see each of them: the full binary has them all.
        assert!(
            full.contains(c),
            "fedmesh itself should link {c}; is nm reading symbols?"
        );
        assert!(
            !proxy.contains(c),
            "fedmesh-proxy links {c}; it must carry only the data plane"
        );
    }
    for c in [
        "fedmesh_proxy",
        "fedmesh_sidecar",
        "fedmesh_gateway",
        "fedmesh_dataplane",
        "rustls",
        "hyper",
    ] {
        assert!(proxy.contains(c), "fedmesh-proxy should link {c}");
    }
    let size = |p: &str| std::fs::metadata(p).unwrap().len();
    let (p, f) = (size(support::proxy_bin()), size(support::fedmesh_bin()));
    eprintln!(
        "fedmesh-proxy {p} bytes, fedmesh {f} bytes ({:.2}×)",
        p as f64 / f as f64
    );
    assert!(
        p * 2 < f,
        "fedmesh-proxy ({p} bytes) should be well under half of fedmesh ({f} bytes)"
    );
}

#[test]
fn the_proxy_binary_takes_the_same_flags_as_fedmesh_and_refuses_other_commands() {
    for sub in ["sidecar", "gateway"] {
        let help = |bin: &str| {
            let out = Command::new(bin).args([sub, "--help"]).output().unwrap();
            assert!(out.status.success(), "{bin} {sub} --help failed");
            // Usage lines name the binary, and clap places the global --log-format by binary;
            // the options and their help must be the same.
            let text = String::from_utf8(out.stdout).unwrap();
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with("Usage:"))
                .map(String::from)
                .collect();
            lines.sort();
            lines
        };
        let (p, f) = (help(support::proxy_bin()), help(support::fedmesh_bin()));
        assert!(p.iter().any(|l| l.contains("--control-plane")), "{p:?}");
        assert_eq!(p, f, "fedmesh-proxy {sub} and fedmesh {sub} differ");
    }
    let out = Command::new(support::proxy_bin())
        .arg("hub")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unrecognized subcommand 'hub'"),
        "fedmesh-proxy hub: {err}"
    );
}
