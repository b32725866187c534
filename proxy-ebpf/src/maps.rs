//! Every map of the datapath, declared in one place. Pinned maps are reused across agent restarts.

use aya_ebpf::{macros::map, maps::PerCpuHashMap};
use weft_proxy_common::{IfaceDirKey, PacketCounter};

/// Packets and bytes per (interface, direction), for every interface a counter program is on.
#[map(name = "WEFT_IFACE_COUNTERS")]
pub static WEFT_IFACE_COUNTERS: PerCpuHashMap<IfaceDirKey, PacketCounter> =
    PerCpuHashMap::pinned(4096, 0);
