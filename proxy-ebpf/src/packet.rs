//! The IPv4 header of a packet at TC, read once for the service and policy programs.

use aya_ebpf::programs::TcContext;
use weft_proxy_common::Be32;

/// Length of the Ethernet header (tcx on Ethernet-like devices: veth, physical).
pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header.
pub const IP_PROTO: usize = 9;
/// Offset of the header checksum.
pub const IP_CSUM: usize = 10;
/// Offset of the source address.
pub const IP_SRC: usize = 12;
/// Offset of the destination address.
pub const IP_DST: usize = 16;

/// What the programs need of an IPv4 header.
pub struct Ipv4 {
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: Be32,
    /// Destination address.
    pub dst: Be32,
    /// Offset of the transport header, when this packet carries it (not a later fragment).
    pub l4: Option<usize>,
}

/// Parses an IPv4 packet's header; `None` for anything else.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Option<Ipv4> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6).ok()?;
    Some(Ipv4 {
        proto: ctx.load(ETH_HLEN + IP_PROTO).ok()?,
        src: Be32(ctx.load(ETH_HLEN + IP_SRC).ok()?),
        dst: Be32(ctx.load(ETH_HLEN + IP_DST).ok()?),
        // Only unfragmented packets (or first fragments) carry ports.
        l4: (u16::from_be(frag) & 0x1fff == 0).then_some(ETH_HLEN + ihl),
    })
}
