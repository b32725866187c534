//! Per-packet service translation at TC, for traffic that socket-level load balancing never sees:
//! connections from outside the node to a NodePort, externalIP or LoadBalancer address.
//!
//! Ingress on the node's external interface: a packet to a frontend gets a backend (the same one
//! for every packet of the flow, kept in `WEFT_CT`) and is DNATed to it; the kernel then routes it
//! to the pod. Egress on the same interface: a reply from that backend to the client is SNATed
//! back to the frontend address (`WEFT_REVNAT`). The client address is preserved end to end, as
//! with `externalTrafficPolicy: Local`; only local backends are reachable this way so far.
//! Programs return `TC_ACT_UNSPEC` for anything that is not theirs, so later tcx programs run.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use weft_proxy_common::{
    AFFINITY_CLIENT_ADDR, Be16, Be32, DropReason, FlowKey, FlowTarget, MAGLEV_TABLE_SIZE,
    MaglevKey, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_MAGLEV, ServiceKey, SockRevValue, proto,
};

use crate::{
    lb,
    maps::{WEFT_CT, WEFT_MAGLEV, WEFT_REVNAT, WEFT_SERVICES, count_drop},
    packet::{self, ETH_HLEN, IP_CSUM, IP_DST, IP_SRC},
};

/// Offsets of the checksum inside TCP and UDP headers.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
/// Offset of the flags byte in the TCP header, and the flags used.
const TCP_FLAGS: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The parsed headers of one IPv4 TCP/UDP packet.
struct Packet {
    flow: FlowKey,
    /// Offset of the L4 header.
    l4: usize,
    /// A UDP datagram, or a TCP segment that opens a connection (SYN without ACK).
    new_or_udp: bool,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
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

/// Rewrites one address (source or destination) and its port, fixing the IPv4 and L4 checksums.
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Packet, dst: bool, addr: Be32, port: Be16) -> Result<(), i64> {
    let (addr_off, port_off) = if dst { (IP_DST, 2) } else { (IP_SRC, 0) };
    let (old_addr, old_port) = if dst {
        (p.flow.dst, p.flow.dport)
    } else {
        (p.flow.src, p.flow.sport)
    };
    let (csum_off, mangled) = if p.flow.proto == proto::TCP {
        (p.l4 + TCP_CSUM, 0)
    } else {
        // A zero UDP checksum means "none" and must stay zero.
        (p.l4 + UDP_CSUM, u64::from(BPF_F_MARK_MANGLED_0))
    };
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_addr.0),
        u64::from(addr.0),
        u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
    )?;
    ctx.l3_csum_replace(
        ETH_HLEN + IP_CSUM,
        u64::from(old_addr.0),
        u64::from(addr.0),
        4,
    )?;
    ctx.store(ETH_HLEN + addr_off, &addr.0, 0)?;
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_port.0),
        u64::from(port.0),
        mangled | 2,
    )?;
    ctx.store(p.l4 + port_off, &port.0, 0)?;
    Ok(())
}

#[classifier]
pub fn weft_nodeport_ingress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    let key = ServiceKey {
        addr: p.flow.dst,
        port: p.flow.dport,
        proto: p.flow.proto,
        _pad: 0,
    };
    // SAFETY: read-only lookup of plain integers.
    let Some(svc) = (unsafe { WEFT_SERVICES.get(&key) }) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: as above.
    let known = unsafe { WEFT_CT.get(&p.flow) }.copied();
    let backend = match known {
        // A packet of an established TCP connection keeps its backend, even one that is now
        // terminating. A new connection reusing the 5-tuple, and UDP, keep it only while its slot
        // still holds it; otherwise they choose again (UDP flows move off removed backends).
        Some(t)
            if !p.new_or_udp
                || lb::still_valid(svc, svc.local_count, t.service, t.slot, &t.backend) =>
        {
            t.backend
        }
        _ => {
            // Only local backends are reachable from here (no SNAT for remote ones yet).
            if svc.local_count == 0 {
                count_drop(DropReason::NoEndpoints);
                return TC_ACT_SHOT as i32;
            }
            let client = AFFINITY_CLIENT_ADDR | u64::from(p.flow.src.0);
            let maglev =
                svc.flags & SERVICE_FLAG_MAGLEV != 0 && svc.flags & SERVICE_FLAG_AFFINITY == 0;
            let chosen = if maglev {
                let index = lb::flow_hash(&p.flow) % MAGLEV_TABLE_SIZE;
                // SAFETY: read-only lookup of plain integers.
                unsafe {
                    WEFT_MAGLEV.get(&MaglevKey {
                        service: svc.id,
                        index,
                    })
                }
                .map(|t| (t.backend, t.slot))
            } else {
                lb::pick(svc, svc.local_count, client)
            };
            let Some((b, slot)) = chosen else {
                count_drop(DropReason::BackendRace);
                return TC_ACT_SHOT as i32;
            };
            let _ = WEFT_CT.insert(
                &p.flow,
                &FlowTarget {
                    backend: b,
                    service: svc.id,
                    slot,
                },
                0,
            );
            let reply = FlowKey {
                src: b.addr,
                dst: p.flow.src,
                sport: b.port,
                dport: p.flow.sport,
                proto: p.flow.proto,
                _pad: [0; 3],
            };
            let front = SockRevValue {
                addr: p.flow.dst,
                port: p.flow.dport,
                _pad: 0,
            };
            let _ = WEFT_REVNAT.insert(&reply, &front, 0);
            b
        }
    };
    if rewrite(&ctx, &p, true, backend.addr, backend.port).is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT as i32;
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn weft_nodeport_egress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: read-only lookup of plain integers.
    let Some(front) = (unsafe { WEFT_REVNAT.get(&p.flow) }) else {
        return TC_ACT_UNSPEC;
    };
    let front = *front;
    if rewrite(&ctx, &p, false, front.addr, front.port).is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT as i32;
    }
    TC_ACT_UNSPEC
}
