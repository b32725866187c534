//! weft's eBPF programs: the kernel half of `weft-proxy`.
//!
//! Owns: code that runs in the kernel, split by concern: `counters` (tcx packet counters), `socklb`
//! (socket-level service load balancing on cgroup sock_addr hooks), `nodeport` (per-packet
//! translation at TC for traffic from outside the node), `policy` (NetworkPolicy enforcement at TC on
//! pods' host-side interfaces); all maps in `maps`. Does not
//! own: map layouts (in `weft-proxy-common`), loading, attaching or map programming (in
//! `weft-proxy`, `proxy-user/`).
//!
//! The crate only has content when compiled for the BPF target (`proxy-user/build.rs` does that via
//! `aya-build`); on the host it is an empty binary so `cargo clippy --workspace` still works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nodeport;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod socklb;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so a loaded program
    // can never get here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
