//! Every map of the datapath, declared in one place. Pinned maps are reused across agent restarts.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use weft_proxy_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Be32, FlowKey, FlowTarget, IfaceDirKey,
    MaglevKey, NodeConfig, PacketCounter, PeerId, PolicyCtKey, PolicyEndpoint, PolicyKey,
    ServiceKey, ServiceValue, SnatRev, SockRevKey, SockRevValue,
};

/// Packets and bytes per (interface, direction), for every interface a counter program is on.
#[map(name = "WEFT_IFACE_COUNTERS")]
pub static WEFT_IFACE_COUNTERS: PerCpuHashMap<IfaceDirKey, PacketCounter> =
    PerCpuHashMap::pinned(4096, 0);

/// Service frontends (virtual address, port, protocol) → backend set. Size is set by the agent.
#[map(name = "WEFT_SERVICES")]
pub static WEFT_SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(65536, 0);

/// (backend set, slot) → backend address. Size is set by the agent.
#[map(name = "WEFT_BACKENDS")]
pub static WEFT_BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(262_144, 0);

/// (socket, backend) → service address, so replies and getpeername(2) show the service.
#[map(name = "WEFT_SOCK_REVNAT")]
pub static WEFT_SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(262_144, 0);

/// TC path: (client → frontend) flow → the backend chosen for it, so every packet of a flow goes
/// to the same backend.
#[map(name = "WEFT_CT")]
pub static WEFT_CT: LruHashMap<FlowKey, FlowTarget> = LruHashMap::pinned(262_144, 0);

/// TC path: (backend → client) flow → the frontend address replies are rewritten to.
#[map(name = "WEFT_REVNAT")]
pub static WEFT_REVNAT: LruHashMap<FlowKey, SockRevValue> = LruHashMap::pinned(262_144, 0);

/// Session affinity: (client, backend set) → the backend the client keeps while it is fresh.
#[map(name = "WEFT_AFFINITY")]
pub static WEFT_AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(262_144, 0);

/// This node's settings (entry 0), written by the agent.
#[map(name = "WEFT_NODE")]
pub static WEFT_NODE: Array<NodeConfig> = Array::pinned(1, 0);

/// TC path: (client → frontend) flow sent to a remote backend → the node address and port it
/// leaves with.
#[map(name = "WEFT_SNAT_FWD")]
pub static WEFT_SNAT_FWD: LruHashMap<FlowKey, SockRevValue> = LruHashMap::pinned(262_144, 0);

/// TC path: (remote backend → node address and port) → the client and frontend to restore on
/// replies.
#[map(name = "WEFT_SNAT_REV")]
pub static WEFT_SNAT_REV: LruHashMap<FlowKey, SnatRev> = LruHashMap::pinned(262_144, 0);

/// Drops and refusals by reason (`weft_proxy_common::DropReason`), per CPU.
#[map(name = "WEFT_DROPS")]
pub static WEFT_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(8, 0);

/// Counts one drop or refusal.
#[inline(always)]
pub fn count_drop(reason: weft_proxy_common::DropReason) {
    if let Some(c) = WEFT_DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot only this CPU writes while the program runs.
        unsafe { *c += 1 };
    }
}

/// Maglev tables of services that use them: (backend set, entry) → backend and its slot.
#[map(name = "WEFT_MAGLEV")]
pub static WEFT_MAGLEV: HashMap<MaglevKey, FlowTarget> = HashMap::pinned(262_144, 0);

/// NetworkPolicy: pods on this node that policy may isolate, by address.
#[map(name = "WEFT_POL_ENDPOINTS")]
pub static WEFT_POL_ENDPOINTS: HashMap<Be32, PolicyEndpoint> = HashMap::pinned(16_384, 0);

/// NetworkPolicy: address → peer identity, the longest prefix it falls in (a pod's /32, or a CIDR a
/// policy names).
#[map(name = "WEFT_POL_IPCACHE")]
pub static WEFT_POL_IPCACHE: LpmTrie<Be32, PeerId> = LpmTrie::pinned(65_536, 0);

/// NetworkPolicy: allow rules; the value is the index of the allowing policy.
#[map(name = "WEFT_POL_RULES")]
pub static WEFT_POL_RULES: LpmTrie<PolicyKey, u32> = LpmTrie::pinned(262_144, 0);

/// NetworkPolicy: connections that were allowed; their packets and their replies pass.
#[map(name = "WEFT_POL_CT")]
pub static WEFT_POL_CT: LruHashMap<PolicyCtKey, u32> = LruHashMap::pinned(262_144, 0);

/// NetworkPolicy: one event per verdict on a new connection, for `weft-proxy flows observe`.
#[map(name = "WEFT_POL_EVENTS")]
pub static WEFT_POL_EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);

/// NetworkPolicy: policy index → name (written by the agent, read by the CLI).
#[map(name = "WEFT_POL_NAMES")]
pub static WEFT_POL_NAMES: HashMap<u32, weft_proxy_common::PolicyName> = HashMap::pinned(65_536, 0);

/// NetworkPolicy: this node's pod ranges (an address in them with no endpoint entry is pending).
#[map(name = "WEFT_POL_PODNETS")]
pub static WEFT_POL_PODNETS: LpmTrie<Be32, u32> = LpmTrie::pinned(64, 0);

/// NetworkPolicy: verdicts on new connections by (direction, verdict), per CPU.
#[map(name = "WEFT_POL_VERDICTS")]
pub static WEFT_POL_VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(4, 0);
