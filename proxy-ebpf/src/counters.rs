//! tcx programs that count packets and bytes per interface and direction.
//!
//! They never change a verdict: they return `TC_ACT_UNSPEC` (`TCX_NEXT`) so programs attached
//! after them still run.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use weft_proxy_common::{Direction, IfaceDirKey, PacketCounter};

use crate::maps::WEFT_IFACE_COUNTERS;

#[classifier]
pub fn weft_count_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn weft_count_egress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Egress);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count(ctx: &TcContext, direction: Direction) {
    // SAFETY: `skb` is the context pointer the kernel passed to this program; reading a field of
    // `__sk_buff` through it is what the verifier allows for classifiers.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = IfaceDirKey {
        ifindex,
        direction: direction as u32,
    };
    let bytes = u64::from(ctx.len());
    match WEFT_IFACE_COUNTERS.get_ptr_mut(&key) {
        Some(counter) => {
            // SAFETY: the pointer comes from a successful per-CPU map lookup, so it is valid and
            // only this CPU writes it while the program runs.
            unsafe {
                (*counter).packets += 1;
                (*counter).bytes += bytes;
            }
        }
        None => {
            // A full map only loses counts; the packet itself is never affected.
            let _ = WEFT_IFACE_COUNTERS.insert(&key, &PacketCounter { packets: 1, bytes }, 0);
        }
    }
}
