//! The eBPF object built from `proxy-ebpf/` and embedded here, and how it is loaded.

use aya::{Ebpf, EbpfLoader};

use weft_proxy_common::names;

use crate::{Result, bpffs::PinLayout, services::Limits};

/// The compiled kernel programs (ELF for bpfel-unknown-none), produced by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-proxy-ebpf"));

/// Loads the object: maps declared as pinned are reused from `layout.maps_dir()` when they exist
/// (so their contents survive restarts) and pinned there when they do not. `limits` sizes the
/// service maps when they are created (existing pinned maps keep their size).
pub fn load(layout: &PinLayout, limits: &Limits) -> Result<Ebpf> {
    crate::bpffs::prepare(layout)?;
    Ok(EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .map_max_entries(names::MAP_SERVICES, limits.max_services)
        .map_max_entries(names::MAP_BACKENDS, limits.max_backends)
        .load(EBPF_OBJECT)?)
}
