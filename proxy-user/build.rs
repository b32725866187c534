//! Compiles `proxy-ebpf` for the BPF target with the stable toolchain (via `aya-build`), so a plain
//! `cargo build` produces the kernel programs that `weft-proxy` embeds.

use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .context("proxy-user has no parent directory")?;
    // The kernel programs also depend on the shared types.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("proxy-common").display()
    );
    let ebpf_dir = root.join("proxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("proxy-ebpf path is not UTF-8")?;
    // SAFETY: the build script is single-threaded here; nothing else reads the environment while
    // it changes. RUSTC_BOOTSTRAP=1 lets the inner stable cargo use `-Z build-std=core`, which the
    // bpfel-unknown-none target needs (it ships no prebuilt core).
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weft-proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
