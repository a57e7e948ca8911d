//! Every committed fuzz input — each target's seed corpus and every input that once crashed a
//! target — replayed through the same harness the fuzz targets run (`fuzz/src/lib.rs`), in the
//! ordinary test suite on a stable compiler. A crash that fuzzing found stays fixed: its input
//! sits in `fuzz/corpus/<target>/` and runs here on every `scripts/test`. `scripts/fuzz` runs the
//! targets themselves under libFuzzer.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::Path;

#[test]
fn every_committed_fuzz_input_runs_through_its_target_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut failures = Vec::new();
    let mut counted = Vec::new();
    for (name, run) in harness::TARGETS {
        let dir = corpus.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{name}: no seed corpus at {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: the seed corpus is empty");
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| run(&data)) {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{name}: {}: {why}", input.display()));
            }
        }
        counted.push(format!("{name} {}", inputs.len()));
    }
    eprintln!("replayed: {}", counted.join(", "));
    // Every corpus belongs to a target: a renamed target must not leave its inputs unreplayed.
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            harness::TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name} belongs to no target of fuzz/src/lib.rs"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
