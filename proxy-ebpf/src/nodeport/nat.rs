//! Address translation: rewriting a packet's destination and source with their checksums, and
//! the node's source ports for flows to remote backends (`WEFT_SNAT_FWD`/`WEFT_SNAT_REV`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT},
    programs::TcContext,
};
use weft_proxy_common::{Backend, Be16, Be32, DropReason, FlowKey, SnatRev, SockRevValue, proto};

use super::{fib, parse::Packet};
use crate::{
    lb,
    maps::{WEFT_NODE, WEFT_SNAT_FWD, WEFT_SNAT_REV, count_drop},
    packet::{ETH_HLEN, IP_CSUM, IP_DST, IP_SRC},
};

/// The source a pod's connection to itself through a service is given (169.254.42.1), so the
/// pod does not receive a packet from its own address.
const HAIRPIN_ADDR: u32 = 0xa9fe_2a01;
/// Tries at finding a free source port for a flow to a remote backend.
const SNAT_TRIES: u32 = 8;
/// Offsets of the checksum inside TCP and UDP headers.
pub(super) const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

/// Rewrites one address (source or destination) and its port, fixing the IPv4 and L4 checksums.
#[inline(always)]
pub(super) fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    dst: bool,
    addr: Be32,
    port: Be16,
) -> Result<(), i64> {
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

/// Rewrites the destination and then the source of a packet, the second rewrite computing its
/// checksum change from the packet as the first one left it.
#[inline(always)]
pub(super) fn rewrite_both(
    ctx: &TcContext,
    p: &Packet,
    dst: (Be32, Be16),
    src: (Be32, Be16),
) -> Result<(), i64> {
    rewrite(ctx, p, true, dst.0, dst.1)?;
    let after = Packet {
        flow: FlowKey {
            dst: dst.0,
            dport: dst.1,
            ..p.flow
        },
        l4: p.l4,
        new_or_udp: p.new_or_udp,
    };
    rewrite(ctx, &after, false, src.0, src.1)
}

/// A reply of a flow this node sent to a remote backend: client and frontend restored, and
/// sent back towards the client. `None` when the packet is not one.
#[inline(always)]
pub(super) fn snat_reply(ctx: &TcContext, p: &Packet) -> Option<i32> {
    // SAFETY: read-only lookup of plain integers.
    let back = *unsafe { WEFT_SNAT_REV.get(&p.flow) }?;
    if rewrite_both(
        ctx,
        p,
        (back.client, back.client_port),
        (back.front, back.front_port),
    )
    .is_err()
    {
        count_drop(DropReason::RewriteFailed);
        return Some(TC_ACT_SHOT as i32);
    }
    Some(fib::forward(ctx, back.front, back.client))
}

/// The node address and port a flow to a remote backend leaves with: the one it has, or a
/// free one from the node's range.
#[inline(always)]
pub(super) fn snat_port(p: &Packet, b: &Backend, hairpin: bool) -> Option<SockRevValue> {
    let back = SnatRev {
        client: p.flow.src,
        front: p.flow.dst,
        client_port: p.flow.sport,
        front_port: p.flow.dport,
    };
    let reply_to = |addr: Be32, port: Be16| FlowKey {
        src: b.addr,
        dst: addr,
        sport: b.port,
        dport: port,
        proto: p.flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: read-only lookup of plain integers.
    if let Some(v) = unsafe { WEFT_SNAT_FWD.get(&p.flow) }.copied() {
        // The flow keeps its port; if it moved to another backend, its replies from there
        // need their own entry (unless that exact tuple is another flow's).
        let reply = reply_to(v.addr, v.port);
        // SAFETY: as above.
        match unsafe { WEFT_SNAT_REV.get(&reply) } {
            Some(r) if *r == back => return Some(v),
            None => {
                if WEFT_SNAT_REV.insert(&reply, &back, 0).is_ok() {
                    return Some(v);
                }
            }
            Some(_) => {}
        }
    }
    let node = WEFT_NODE.get(0)?;
    let addr = if hairpin {
        Be32(HAIRPIN_ADDR.to_be())
    } else {
        node.snat_addr
    };
    if addr.0 == 0 || node.snat_port_count == 0 {
        return None;
    }
    let hash = lb::flow_hash(&p.flow);
    for i in 0..SNAT_TRIES {
        let port = node.snat_port_min as u32
            + (hash.wrapping_add(i.wrapping_mul(7919)) % node.snat_port_count as u32);
        let reply = reply_to(addr, Be16((port as u16).to_be()));
        // SAFETY: as above.
        if unsafe { WEFT_SNAT_REV.get(&reply) }.is_some() {
            continue;
        }
        let out = SockRevValue {
            addr,
            port: reply.dport,
            _pad: 0,
        };
        if WEFT_SNAT_REV.insert(&reply, &back, 0).is_err()
            || WEFT_SNAT_FWD.insert(&p.flow, &out, 0).is_err()
        {
            return None;
        }
        return Some(out);
    }
    None
}
