//! Runs the fuzz targets' invariants (fuzz/invariants.rs, fuzz/request_path.rs) over every saved input under
//! fuzz/corpus/<target>/: hand-written seeds plus what `cargo fuzz` found. This is how the
//! fuzzing runs in CI without a nightly toolchain.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[path = "../../fuzz/invariants.rs"]
mod invariants;
#[path = "../../fuzz/request_path.rs"]
mod request_path;

fn run_corpus(target: &str, check: fn(&[u8]), at_least: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        // FUZZ_INPUT=<part of a file name> replays just the inputs it names.
        .filter(|p| {
            std::env::var("FUZZ_INPUT").map_or(true, |only| p.to_string_lossy().contains(&only))
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= at_least || std::env::var_os("FUZZ_INPUT").is_some(),
        "{}: {} inputs, expected at least {at_least}",
        dir.display(),
        files.len()
    );
    let mut failed = Vec::new();
    let mut slowest = (std::time::Duration::ZERO, String::new());
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let started = std::time::Instant::now();
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
        if std::env::var_os("FUZZ_TIMES").is_some() {
            eprintln!("{:>6} ms {}", started.elapsed().as_millis(), path.display());
        }
        if started.elapsed() > slowest.0 {
            slowest = (started.elapsed(), path.display().to_string());
        }
    }
    eprintln!(
        "{target}: {} inputs, slowest {:?} ({})",
        files.len(),
        slowest.0,
        slowest.1
    );
    assert!(failed.is_empty(), "invariants failed on: {failed:#?}");
}

#[test]
fn json_edit_corpus_holds_the_invariants() {
    run_corpus("json_edit", invariants::check_json_edit, 20);
}

#[test]
fn headers_corpus_holds_the_invariants() {
    run_corpus("headers", invariants::check_headers, 15);
}

/// Every saved client connection against the in-process sidecar and simulators, one after
/// another on the same servers (as the fuzzer runs them).
#[test]
fn request_path_corpus_holds_the_invariants() {
    run_corpus("request_path", request_path::check_request_path, 50);
}
