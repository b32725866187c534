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
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: IfaceDirKey is repr(C), Copy, has no padding (two u32 fields, asserted above) and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::IfaceDirKey {}
    // SAFETY: PacketCounter is repr(C), Copy, has no padding (two u64 fields, asserted above) and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PacketCounter {}
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
