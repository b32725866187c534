//! The eBPF object built from `proxy-ebpf/` and embedded here, and how it is loaded.

use aya::{Ebpf, EbpfLoader};

use crate::{Result, bpffs::PinLayout};

/// The compiled kernel programs (ELF for bpfel-unknown-none), produced by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-proxy-ebpf"));

/// Loads the object: maps declared as pinned are reused from `layout.maps_dir()` when they exist
/// (so their contents survive restarts) and pinned there when they do not.
pub fn load(layout: &PinLayout) -> Result<Ebpf> {
    layout.prepare()?;
    Ok(EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .load(EBPF_OBJECT)?)
}
