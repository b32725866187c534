//! The headers of an IPv4 TCP or UDP packet, read once: its flow, where its L4 header is, and
//! whether it opens a flow.

use aya_ebpf::programs::TcContext;
use weft_proxy_common::{Be16, FlowKey, proto};

use crate::packet;

/// Offset of the flags byte in the TCP header, and the flags used.
pub(super) const TCP_FLAGS: usize = 13;
pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_ACK: u8 = 0x10;

/// The parsed headers of one IPv4 TCP/UDP packet.
pub(super) struct Packet {
    /// Its addresses, ports and protocol.
    pub(super) flow: FlowKey,
    /// Offset of the L4 header.
    pub(super) l4: usize,
    /// A UDP datagram, or a TCP segment that opens a connection (SYN without ACK).
    pub(super) new_or_udp: bool,
}

/// Parses a packet at TC; `None` for anything but IPv4 TCP or UDP with its L4 header.
#[inline(always)]
pub(super) fn parse(ctx: &TcContext) -> Option<Packet> {
    let ip = packet::ipv4(ctx)?;
    let l4 = ip.l4?;
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return None;
    }
    let new_or_udp = ip.proto == proto::UDP || {
        let flags: u8 = ctx.load(l4 + TCP_FLAGS).ok()?;
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    };
    Some(Packet {
        flow: FlowKey {
            src: ip.src,
            dst: ip.dst,
            sport: Be16(ctx.load(l4).ok()?),
            dport: Be16(ctx.load(l4 + 2).ok()?),
            proto: ip.proto,
            _pad: [0; 3],
        },
        l4,
        new_or_udp,
    })
}
