//! Sending a translated packet on: a FIB lookup for its new destination and a redirect out of
//! the interface it names, with the next hop's MAC address (or the kernel resolving it).

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup},
    cty::c_void,
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use weft_proxy_common::{Be32, DropReason};

use crate::maps::count_drop;

/// AF_INET.
const AF_INET: u8 = 2;

/// Sends a packet whose addresses were just rewritten out of the interface the FIB picks for
/// `dst`, with the next hop's MAC address (or lets the kernel resolve it).
#[inline(always)]
pub(super) fn forward(ctx: &TcContext, src: Be32, dst: Be32) -> i32 {
    // SAFETY: an all-zero bpf_fib_lookup is a valid value (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    // SAFETY: the context's __sk_buff is valid for the program's whole run.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = src.0;
    params.__bindgen_anon_4.ipv4_dst = dst.0;
    // SAFETY: the helper reads and writes `params` only, whose size it is given.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if ctx.store(0, &params.dmac, 0).is_err() || ctx.store(6, &params.smac, 0).is_err() {
                count_drop(DropReason::RewriteFailed);
                return TC_ACT_SHOT as i32;
            }
            // SAFETY: a helper taking plain integers.
            unsafe { bpf_redirect(params.ifindex, 0) as i32 }
        }
        // SAFETY: a null neighbour means "resolve the destination's address" (the kernel's
        // documented use).
        BPF_FIB_LKUP_RET_NO_NEIGH => unsafe {
            bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        _ => {
            count_drop(DropReason::NoRoute);
            TC_ACT_SHOT as i32
        }
    }
}
