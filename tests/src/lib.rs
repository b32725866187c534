//! weft's cross-component tests and benchmarks.
//!
//! Owns: tests that span more than one weft binary or the test bed itself (`tests/*.rs`), and
//! helpers for them. A component's own integration tests live beside it (for example
//! `proxy-user/tests/`), where Cargo can hand them the component's binary.

use std::path::PathBuf;

/// Path of a weft binary built by the same `cargo test --workspace` run (next to the test
/// executable's `deps/` directory). Panics with the command to run if it is missing.
pub fn weft_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace` (or run `cargo test --workspace`)",
        path.display()
    );
    path
}
