//! Map key and value types shared by the kernel side (`weft-proxy-ebpf`) and the user side
//! (`weft-proxy`) of weft's datapath.
//!
//! Owns: the exact in-memory layout of everything that crosses the BPF map boundary. Every type is
//! `#[repr(C)]` with explicit padding fields and a compile-time size assertion, so the two sides can
//! never disagree on a layout. Does not own: any logic; the programs live in `proxy-ebpf/` and the
//! loader/agent in `proxy-user/`.
//!
//! With the `user` feature the types implement `aya::Pod` so user space can read them from maps.
#![no_std]

/// Names of the maps and programs in the eBPF object, used by both sides to find each other.
pub mod names {
    /// The tcx program that counts packets and bytes.
    pub const PROG_COUNT_INGRESS: &str = "weft_count_ingress";
    /// The tcx program that counts packets and bytes leaving an interface.
    pub const PROG_COUNT_EGRESS: &str = "weft_count_egress";
    /// Per-CPU hash map: [`crate::IfaceDirKey`] → [`crate::PacketCounter`].
    pub const MAP_IFACE_COUNTERS: &str = "WEFT_IFACE_COUNTERS";
    /// Service frontends: [`crate::ServiceKey`] → [`crate::ServiceValue`].
    pub const MAP_SERVICES: &str = "WEFT_SERVICES";
    /// Backend slots: [`crate::BackendKey`] → [`crate::Backend`].
    pub const MAP_BACKENDS: &str = "WEFT_BACKENDS";
    /// Socket reverse translation (LRU): [`crate::SockRevKey`] → [`crate::SockRevValue`].
    pub const MAP_SOCK_REVNAT: &str = "WEFT_SOCK_REVNAT";
    /// Per-packet flow table of the TC path (LRU): [`crate::FlowKey`] (client → frontend) →
    /// [`crate::FlowTarget`] chosen for the flow.
    pub const MAP_CT: &str = "WEFT_CT";
    /// Reverse translation of the TC path (LRU): [`crate::FlowKey`] (backend → client) → the
    /// frontend address replies must come from.
    pub const MAP_REVNAT: &str = "WEFT_REVNAT";
    /// TC program translating frontend → backend on a node's external interface (tcx ingress).
    pub const PROG_NODEPORT_INGRESS: &str = "weft_nodeport_ingress";
    /// TC program translating backend → frontend on replies leaving that interface (tcx egress).
    pub const PROG_NODEPORT_EGRESS: &str = "weft_nodeport_egress";
    /// TC program translating services for a pod's own traffic when socket-level load
    /// balancing is off (tcx ingress of the pod's host-side interface, before policy).
    pub const PROG_SERVICE_FROM_POD: &str = "weft_service_from_pod";
    /// Per-CPU array of drop counters, indexed by [`crate::DropReason`].
    pub const MAP_DROPS: &str = "WEFT_DROPS";
    /// Maglev tables: [`crate::MaglevKey`] → [`crate::FlowTarget`] (backend and its slot).
    pub const MAP_MAGLEV: &str = "WEFT_MAGLEV";
    /// Session affinity (LRU): [`crate::AffinityKey`] → [`crate::AffinityValue`].
    pub const MAP_AFFINITY: &str = "WEFT_AFFINITY";
    /// Pods on this node that policy may isolate: pod address ([`crate::Be32`]) →
    /// [`crate::PolicyEndpoint`].
    pub const MAP_POLICY_ENDPOINTS: &str = "WEFT_POL_ENDPOINTS";
    /// LPM trie: address → peer identity (a pod, or a CIDR that a policy names).
    pub const MAP_POLICY_IPCACHE: &str = "WEFT_POL_IPCACHE";
    // (values: [`crate::PeerId`], the prefix that matched)
    /// LPM trie: [`crate::PolicyKey`] (prefix over its port) → index of the allowing policy.
    pub const MAP_POLICY_RULES: &str = "WEFT_POL_RULES";
    /// Connections policy allowed (LRU): [`crate::PolicyCtKey`] → 1; their packets and replies
    /// pass.
    pub const MAP_POLICY_CT: &str = "WEFT_POL_CT";
    /// LPM trie of this node's pod ranges: an address in them without an endpoint entry is a pod
    /// the agent has not processed yet, and its traffic is dropped until it has.
    pub const MAP_POLICY_PODNETS: &str = "WEFT_POL_PODNETS";
    /// Per-CPU array of policy verdicts on new connections, indexed by
    /// [`crate::verdict_slot`].
    pub const MAP_POLICY_VERDICTS: &str = "WEFT_POL_VERDICTS";
    /// Ring buffer of [`crate::PolicyEvent`]s: one per policy verdict on a new connection.
    pub const MAP_POLICY_EVENTS: &str = "WEFT_POL_EVENTS";
    /// Policy index → [`crate::PolicyName`], for showing events.
    pub const MAP_POLICY_NAMES: &str = "WEFT_POL_NAMES";
    /// tcx ingress on a pod's host-side interface: traffic from the pod (its egress policy).
    pub const PROG_POLICY_FROM_POD: &str = "weft_policy_from_pod";
    /// tcx egress on a pod's host-side interface: traffic to the pod (its ingress policy).
    pub const PROG_POLICY_TO_POD: &str = "weft_policy_to_pod";
    /// This node's settings for the datapath: array, entry 0 = [`crate::NodeConfig`].
    pub const MAP_NODE: &str = "WEFT_NODE";
    /// Source translation of the TC path towards remote backends (LRU): [`crate::FlowKey`]
    /// (client → frontend) → [`crate::SockRevValue`], the node address and port the flow leaves
    /// with.
    pub const MAP_SNAT_FWD: &str = "WEFT_SNAT_FWD";
    /// Replies of source-translated flows (LRU): [`crate::FlowKey`] (backend → node address and
    /// port) → [`crate::SnatRev`], the client and frontend to restore.
    pub const MAP_SNAT_REV: &str = "WEFT_SNAT_REV";
    /// Socket-LB program on connect(2) (cgroup/connect4).
    pub const PROG_CONNECT4: &str = "weft_connect4";
    /// Socket-LB program on sendmsg(2) for unconnected UDP (cgroup/sendmsg4).
    pub const PROG_SENDMSG4: &str = "weft_sendmsg4";
    /// Reverse translation of UDP reply sources (cgroup/recvmsg4).
    pub const PROG_RECVMSG4: &str = "weft_recvmsg4";
    /// Reverse translation of getpeername(2) (cgroup/getpeername4).
    pub const PROG_GETPEERNAME4: &str = "weft_getpeername4";
}

/// A `u32` stored in network byte order (as addresses are in packets and in `bpf_sock_addr`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Be32(pub u32);

impl Be32 {
    /// From a host-order value.
    pub const fn from_host(v: u32) -> Self {
        Self(v.to_be())
    }
    /// To a host-order value.
    pub const fn to_host(self) -> u32 {
        u32::from_be(self.0)
    }
    /// From IPv4 octets.
    pub const fn from_octets(o: [u8; 4]) -> Self {
        Self(u32::from_ne_bytes(o))
    }
    /// To IPv4 octets.
    pub const fn octets(self) -> [u8; 4] {
        self.0.to_ne_bytes()
    }
}

/// A `u16` stored in network byte order (ports).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Be16(pub u16);

impl Be16 {
    /// From a host-order value.
    pub const fn from_host(v: u16) -> Self {
        Self(v.to_be())
    }
    /// To a host-order value.
    pub const fn to_host(self) -> u16 {
        u16::from_be(self.0)
    }
}

/// IP protocol numbers used in keys.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP.
    pub const SCTP: u8 = 132;
}

/// A service frontend: virtual address, port and protocol (ClusterIP, externalIP, ...).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Virtual IPv4 address.
    pub addr: Be32,
    /// Service port.
    pub port: Be16,
    /// [`proto`] number.
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}

/// What a frontend leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Identifier of the backend set ([`BackendKey::service`]).
    pub id: u32,
    /// Number of backend slots in use (0: reject new connections at once).
    pub count: u32,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// With [`SERVICE_FLAG_AFFINITY`]: how long a client stays with its backend, in seconds.
    pub affinity_timeout: u32,
    /// Backends on this node: slots `0..local_count` (local backends come first). The TC path,
    /// which cannot yet reach remote backends, chooses among these only.
    pub local_count: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

/// Why the datapath refused a connection or dropped a packet (index into the drops map).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The service has no ready backend.
    NoEndpoints = 0,
    /// A backend slot was missing (the agent was between writes).
    BackendRace = 1,
    /// Rewriting the packet failed.
    RewriteFailed = 2,
    /// A NetworkPolicy isolates the pod and no rule allows the connection.
    PolicyDenied = 3,
    /// A pod of this node that the agent has not processed yet (isolated until it has).
    PolicyPending = 4,
    /// No free source port to translate a flow to a remote backend.
    SnatPortsExhausted = 5,
    /// No route (or no way to forward) towards a remote backend or back to a client.
    NoRoute = 6,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [Self; 7] = [
        Self::NoEndpoints,
        Self::BackendRace,
        Self::RewriteFailed,
        Self::PolicyDenied,
        Self::PolicyPending,
        Self::SnatPortsExhausted,
        Self::NoRoute,
    ];

    /// The label shown in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoEndpoints => "no_endpoints",
            Self::BackendRace => "backend_race",
            Self::RewriteFailed => "rewrite_failed",
            Self::PolicyDenied => "policy_denied",
            Self::PolicyPending => "policy_pending",
            Self::SnatPortsExhausted => "snat_ports_exhausted",
            Self::NoRoute => "no_route",
        }
    }
}

/// Entries in each Maglev table (prime). A flow's hash modulo this picks the entry.
pub const MAGLEV_TABLE_SIZE: u32 = 4093;

/// Backends are chosen by Maglev consistent hashing of the flow (TC path), not at random.
pub const SERVICE_FLAG_MAGLEV: u32 = 2;

/// One entry of a service's Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// [`ServiceValue::id`].
    pub service: u32,
    /// Entry index, `0..MAGLEV_TABLE_SIZE`.
    pub index: u32,
}

/// `sessionAffinity: ClientIP`: a client keeps its backend for `affinity_timeout` seconds.
pub const SERVICE_FLAG_AFFINITY: u32 = 1;

/// Who a client is for session affinity: a pod (its network namespace cookie, for socket-level
/// load balancing) or an address (for the TC path), per backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Netns cookie, or an IPv4 address in network byte order widened to u64 with bit 63 set.
    pub client: u64,
    /// [`ServiceValue::id`].
    pub service: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

/// Tag that marks [`AffinityKey::client`] as an address rather than a netns cookie.
pub const AFFINITY_CLIENT_ADDR: u64 = 1 << 63;

/// The backend a client is pinned to, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// The slot the backend was in when chosen.
    pub slot: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// The backend.
    pub backend: Backend,
    /// `bpf_ktime_get_ns()` of the last use.
    pub last_used_ns: u64,
}

/// One backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// [`ServiceValue::id`].
    pub service: u32,
    /// Slot index, `0..count`.
    pub slot: u32,
}

/// A backend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend IPv4 address.
    pub addr: Be32,
    /// Backend port.
    pub port: Be16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}

/// Reverse translation key for a socket: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// Socket cookie.
    pub cookie: u64,
    /// Backend address.
    pub addr: Be32,
    /// Backend port.
    pub port: Be16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}

/// A pod that NetworkPolicy may isolate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEndpoint {
    /// Its number in [`PolicyKey::endpoint`].
    pub id: u32,
    /// [`POLICY_INGRESS_ISOLATED`] and/or [`POLICY_EGRESS_ISOLATED`].
    pub flags: u32,
}

/// The endpoint is isolated for ingress: only allowed connections reach it.
pub const POLICY_INGRESS_ISOLATED: u32 = 1;
/// The endpoint is isolated for egress: only allowed connections leave it.
pub const POLICY_EGRESS_ISOLATED: u32 = 2;
/// [`PolicyKey::direction`] of ingress rules.
pub const POLICY_DIR_INGRESS: u8 = 1;
/// [`PolicyKey::direction`] of egress rules.
pub const POLICY_DIR_EGRESS: u8 = 2;
/// [`PeerId::len`] standing for every peer (a rule without `from`/`to`).
pub const PEER_LEN_ANY: u8 = 0xff;
/// [`PeerId::len`] of an address the ipcache does not know.
pub const PEER_LEN_WORLD: u8 = 0xfe;
/// Bits of [`PolicyKey`] before the port: always matched in full.
pub const POLICY_KEY_FIXED_BITS: u32 = 112;

/// A peer's identity: the ipcache prefix its address falls in (a pod's /32, or a CIDR that a
/// policy names). Derived from the prefix itself, so it needs no allocation and is the same on
/// every node and after every restart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    /// Network address of the prefix.
    pub addr: Be32,
    /// Prefix length, or [`PEER_LEN_ANY`] / [`PEER_LEN_WORLD`].
    pub len: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}

/// A policy rule, as the data of an LPM trie key: everything up to the port is matched exactly,
/// the port by prefix (a port range is a few prefixes); `proto` 0 with a zero-length port prefix
/// means every protocol and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// [`PolicyEndpoint::id`] of the pod the rule belongs to.
    pub endpoint: u32,
    /// The peer's identity (`len` [`PEER_LEN_ANY`] for every peer).
    pub peer: PeerId,
    /// [`POLICY_DIR_INGRESS`] or [`POLICY_DIR_EGRESS`].
    pub direction: u8,
    /// [`proto`] number, or 0 for any.
    pub proto: u8,
    /// Destination port, network order (so prefixes are port ranges).
    pub port: Be16,
}

/// The slot of `WEFT_POL_VERDICTS` counting (direction, verdict): ingress allow 0, ingress deny 1,
/// egress allow 2, egress deny 3.
pub const fn verdict_slot(direction: u8, verdict: u8) -> u32 {
    (if direction == POLICY_DIR_INGRESS {
        0
    } else {
        2
    }) + if verdict == VERDICT_ALLOW { 0 } else { 1 }
}

/// [`PolicyEvent::verdict`]: the connection may start.
pub const VERDICT_ALLOW: u8 = 1;
/// [`PolicyEvent::verdict`]: the connection was dropped.
pub const VERDICT_DENY: u8 = 2;
/// [`PolicyEvent::policy`] when no policy isolates the pod in that direction.
pub const POLICY_NOT_ISOLATED: u32 = u32::MAX;
/// [`PolicyEvent::policy`] when the pod is isolated and no rule allows the connection.
pub const POLICY_DEFAULT_DENY: u32 = u32::MAX - 1;
/// [`PolicyEvent::policy`] when the pod is in this node's pod range but not known to the agent yet.
pub const POLICY_PENDING: u32 = u32::MAX - 2;

/// One policy verdict on the first packet of a connection, sent to user space through the
/// `WEFT_POL_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEvent {
    /// Kernel time (CLOCK_MONOTONIC, ns).
    pub time_ns: u64,
    /// The packet's addresses, ports and protocol.
    pub flow: FlowKey,
    /// [`PolicyEndpoint::id`] of the pod whose policy decided.
    pub endpoint: u32,
    /// Index of the allowing policy in `WEFT_POL_NAMES`, or [`POLICY_NOT_ISOLATED`] /
    /// [`POLICY_DEFAULT_DENY`].
    pub policy: u32,
    /// [`POLICY_DIR_INGRESS`] or [`POLICY_DIR_EGRESS`].
    pub direction: u8,
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub verdict: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 6],
}

/// The name of a policy as the flow CLI shows it (`namespace/name`, zero-padded).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyName(pub [u8; 128]);

/// A connection as one pod's policy saw it: each pod keeps its own record of what it allowed, so
/// one pod's verdict never stands in for another's on the same node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyCtKey {
    /// The connection, in the direction it was opened.
    pub flow: FlowKey,
    /// [`PolicyEndpoint::id`] of the pod that allowed it.
    pub endpoint: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

/// A flow as the TC path sees it: source and destination address and port, protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: Be32,
    /// Destination address.
    pub dst: Be32,
    /// Source port.
    pub sport: Be16,
    /// Destination port.
    pub dport: Be16,
    /// [`proto`] number.
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}

/// Where a TC-path flow goes: the backend and where it was found, so the choice can be checked
/// against the current slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTarget {
    /// The backend.
    pub backend: Backend,
    /// [`ServiceValue::id`] of the frontend at the time.
    pub service: u32,
    /// The slot the backend was in.
    pub slot: u32,
}

/// The service address a socket's peer must appear as.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    /// Service address.
    pub addr: Be32,
    /// Service port.
    pub port: Be16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}

/// The client and frontend of a flow the TC path sent to a remote backend from the node's
/// address, restored on its replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatRev {
    /// Client address.
    pub client: Be32,
    /// Frontend address.
    pub front: Be32,
    /// Client port.
    pub client_port: Be16,
    /// Frontend port.
    pub front_port: Be16,
}

/// This node's settings for the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// The node's address that flows to remote backends leave from (0: remote backends are
    /// not used by the TC path).
    pub snat_addr: Be32,
    /// First source port of the range used for those flows.
    pub snat_port_min: u16,
    /// Number of ports in that range.
    pub snat_port_count: u16,
}

/// Traffic direction as seen from the interface a program is attached to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Packets arriving on the interface (tcx ingress).
    Ingress = 0,
    /// Packets leaving through the interface (tcx egress).
    Egress = 1,
}

impl Direction {
    /// Decodes the raw value stored in a map key; `None` for a value no program writes.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }

    /// Lowercase name, as shown by the CLI.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// Key of the per-interface traffic counters: which interface (by ifindex, in the network
/// namespace the program is attached in) and which direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfaceDirKey {
    /// Interface index (host byte order).
    pub ifindex: u32,
    /// A [`Direction`] as `u32`.
    pub direction: u32,
}

/// Per-CPU packet and byte counts. User space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounter {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen, counting the whole frame (`skb->len`).
    pub bytes: u64,
}

impl PacketCounter {
    /// Adds another counter (used to sum per-CPU values).
    #[must_use]
    pub const fn saturating_add(self, other: Self) -> Self {
        Self {
            packets: self.packets.saturating_add(other.packets),
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<IfaceDirKey>() == 8);
    assert!(core::mem::align_of::<IfaceDirKey>() == 4);
    assert!(core::mem::offset_of!(IfaceDirKey, direction) == 4);
    assert!(core::mem::size_of::<PacketCounter>() == 16);
    assert!(core::mem::offset_of!(PacketCounter, bytes) == 8);
    assert!(core::mem::size_of::<ServiceKey>() == 8);
    assert!(core::mem::offset_of!(ServiceKey, port) == 4);
    assert!(core::mem::offset_of!(ServiceKey, proto) == 6);
    assert!(core::mem::size_of::<BackendKey>() == 8);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::offset_of!(Backend, port) == 4);
    assert!(core::mem::size_of::<SockRevKey>() == 16);
    assert!(core::mem::offset_of!(SockRevKey, addr) == 8);
    assert!(core::mem::size_of::<SockRevValue>() == 8);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<PolicyEndpoint>() == 8);
    assert!(core::mem::size_of::<PeerId>() == 8);
    assert!(core::mem::size_of::<PolicyCtKey>() == 24);
    assert!(core::mem::size_of::<PolicyEvent>() == 40);
    assert!(core::mem::size_of::<PolicyKey>() == 16);
    assert!(core::mem::offset_of!(PolicyKey, port) * 8 == POLICY_KEY_FIXED_BITS as usize);
    assert!(core::mem::size_of::<FlowTarget>() == 16);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::offset_of!(FlowTarget, service) == 8);
    assert!(core::mem::offset_of!(ServiceValue, affinity_timeout) == 12);
    assert!(core::mem::size_of::<ServiceValue>() == 24);
    assert!(core::mem::offset_of!(ServiceValue, local_count) == 16);
    assert!(core::mem::size_of::<AffinityKey>() == 16);
    assert!(core::mem::size_of::<AffinityValue>() == 24);
    assert!(core::mem::offset_of!(AffinityValue, backend) == 8);
    assert!(core::mem::offset_of!(AffinityValue, last_used_ns) == 16);
    assert!(core::mem::offset_of!(FlowKey, sport) == 8);
    assert!(core::mem::offset_of!(FlowKey, proto) == 12);
    assert!(core::mem::size_of::<SnatRev>() == 12);
    assert!(core::mem::offset_of!(SnatRev, client_port) == 8);
    assert!(core::mem::size_of::<NodeConfig>() == 8);
    assert!(core::mem::offset_of!(NodeConfig, snat_port_count) == 6);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: IfaceDirKey is repr(C), Copy, has no padding (two u32 fields, asserted above) and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::IfaceDirKey {}
    // SAFETY: PacketCounter is repr(C), Copy, has no padding (two u64 fields, asserted above) and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PacketCounter {}
    // SAFETY: every type below is repr(C), Copy, built only of integers with explicit padding
    // fields (sizes and offsets asserted above), so every bit pattern is valid and none is
    // uninitialised.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockRevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockRevValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MaglevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyEndpoint {}
    // SAFETY: as above (no implicit padding; sizes and offsets asserted above).
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerId {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyCtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyEvent {}
    // SAFETY: a byte array.
    unsafe impl aya::Pod for super::PolicyName {}
    // SAFETY: a transparent wrapper of u32.
    unsafe impl aya::Pod for super::Be32 {}
    // SAFETY: repr(C), Copy, no implicit padding (size and offsets asserted above).
    unsafe impl aya::Pod for super::SnatRev {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_round_trips_through_raw() {
        for d in [Direction::Ingress, Direction::Egress] {
            assert_eq!(Direction::from_raw(d as u32), Some(d));
        }
        assert_eq!(Direction::from_raw(7), None);
    }

    #[test]
    fn byte_order_is_explicit() {
        let a = Be32::from_octets([10, 96, 0, 1]);
        assert_eq!(a.to_host(), 0x0a60_0001);
        assert_eq!(Be32::from_host(0x0a60_0001), a);
        assert_eq!(Be16::from_host(80).to_host(), 80);
        assert_eq!(Be16::from_host(0x1234).0.to_ne_bytes(), [0x12, 0x34]);
    }

    #[test]
    fn counters_add_saturating() {
        let a = PacketCounter {
            packets: u64::MAX,
            bytes: 1,
        };
        let b = PacketCounter {
            packets: 1,
            bytes: 2,
        };
        assert_eq!(
            a.saturating_add(b),
            PacketCounter {
                packets: u64::MAX,
                bytes: 3
            }
        );
    }
}
