//! Per-packet service translation at TC, for traffic that socket-level load balancing never sees:
//! connections from outside the node to a NodePort, externalIP or LoadBalancer address.
//!
//! Ingress on the node's external interface: a packet to a frontend gets a backend (the same one
//! for every packet of the flow, kept in `WEFT_CT`). A backend on this node: the packet is DNATed
//! and the kernel routes it to the pod; egress on the same interface SNATs the reply back to the
//! frontend address (`WEFT_REVNAT`), so the client address is preserved end to end. A backend on
//! another node (`externalTrafficPolicy: Cluster`): the packet is also SNATed to this node's
//! address and a port of its own (`WEFT_SNAT_FWD`/`WEFT_SNAT_REV`) so the reply comes back here,
//! and is sent out by a FIB lookup and redirect; the reply, arriving on an interface this program
//! is on, gets the client and frontend back and is redirected to the client the same way.
//! Programs return `TC_ACT_UNSPEC` for anything that is not theirs, so later tcx programs run.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup,
    },
    cty::c_void,
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use weft_proxy_common::{
    AFFINITY_CLIENT_ADDR, Backend, Be16, Be32, DropReason, FlowKey, FlowTarget, MAGLEV_TABLE_SIZE,
    MaglevKey, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_MAGLEV, ServiceKey, ServiceValue, SnatRev,
    SockRevValue, proto,
};

use crate::{
    lb,
    maps::{
        WEFT_CT, WEFT_MAGLEV, WEFT_NODE, WEFT_REVNAT, WEFT_SERVICES, WEFT_SNAT_FWD, WEFT_SNAT_REV,
        count_drop,
    },
    packet::{self, ETH_HLEN, IP_CSUM, IP_DST, IP_SRC},
};

/// The source a pod's connection to itself through a service is given (169.254.42.1), so the
/// pod does not receive a packet from its own address.
const HAIRPIN_ADDR: u32 = 0xa9fe_2a01;
/// AF_INET.
const AF_INET: u8 = 2;
/// Tries at finding a free source port for a flow to a remote backend.
const SNAT_TRIES: u32 = 8;

/// Offsets of the checksum inside TCP and UDP headers.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
/// Offset of the flags byte in the TCP header, and the flags used.
const TCP_FLAGS: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_RST: u8 = 0x04;
/// Offsets of the sequence and acknowledgement numbers in the TCP header.
const TCP_SEQ: usize = 4;
const TCP_ACK_SEQ: usize = 8;

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

/// Sends a packet whose addresses were just rewritten out of the interface the FIB picks for
/// `dst`, with the next hop's MAC address (or lets the kernel resolve it).
#[inline(always)]
fn forward(ctx: &TcContext, src: Be32, dst: Be32) -> i32 {
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

/// Refuses a connection to a service without endpoints: a TCP SYN is turned into the RST that a
/// closed port would send and bounced out of the interface it came in on, so the client fails at
/// once (as kube-proxy's REJECT rules make it) instead of retrying into silence; anything else is
/// dropped.
#[inline(always)]
fn refuse(ctx: &TcContext, p: &Packet) -> i32 {
    if p.flow.proto != proto::TCP || !p.new_or_udp {
        return TC_ACT_SHOT as i32;
    }
    let bounced = (|| -> Result<(), i64> {
        let seq: u32 = ctx.load(p.l4 + TCP_SEQ)?;
        let old_ack: u32 = ctx.load(p.l4 + TCP_ACK_SEQ)?;
        let new_ack = (u32::from_be(seq).wrapping_add(1)).to_be();
        let old_word: u16 = ctx.load(p.l4 + TCP_FLAGS - 1)?;
        // The flags byte is the second byte of the word: keep the data offset, set RST|ACK.
        let new_word = u16::from_ne_bytes([old_word.to_ne_bytes()[0], TCP_RST | TCP_ACK]);
        let csum = p.l4 + TCP_CSUM;
        ctx.l4_csum_replace(csum, u64::from(seq), 0, 4)?;
        ctx.store(p.l4 + TCP_SEQ, &0u32, 0)?;
        ctx.l4_csum_replace(csum, u64::from(old_ack), u64::from(new_ack), 4)?;
        ctx.store(p.l4 + TCP_ACK_SEQ, &new_ack, 0)?;
        ctx.l4_csum_replace(csum, u64::from(old_word), u64::from(new_word), 2)?;
        ctx.store(p.l4 + TCP_FLAGS - 1, &new_word, 0)?;
        // Swapping addresses and ports changes no checksum (the sums are the same).
        ctx.store(ETH_HLEN + IP_SRC, &p.flow.dst.0, 0)?;
        ctx.store(ETH_HLEN + IP_DST, &p.flow.src.0, 0)?;
        ctx.store(p.l4, &p.flow.dport.0, 0)?;
        ctx.store(p.l4 + 2, &p.flow.sport.0, 0)?;
        let dmac: [u8; 6] = ctx.load(0)?;
        let smac: [u8; 6] = ctx.load(6)?;
        ctx.store(0, &smac, 0)?;
        ctx.store(6, &dmac, 0)?;
        Ok(())
    })();
    if bounced.is_err() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: the context's __sk_buff is valid for the program's whole run; the helper takes
    // plain integers.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// Rewrites the destination and then the source of a packet, the second rewrite computing its
/// checksum change from the packet as the first one left it.
#[inline(always)]
fn rewrite_both(
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
fn snat_reply(ctx: &TcContext, p: &Packet) -> Option<i32> {
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
    Some(forward(ctx, back.front, back.client))
}

/// The node address and port a flow to a remote backend leaves with: the one it has, or a
/// free one from the node's range.
#[inline(always)]
fn snat_port(p: &Packet, b: &Backend, hairpin: bool) -> Option<SockRevValue> {
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

/// How many slots the TC path may choose from: every backend when remote ones can be reached
/// (this node has an address to translate to), else this node's only.
#[inline(always)]
fn reachable(svc: &ServiceValue) -> u32 {
    match WEFT_NODE.get(0) {
        Some(n) if n.snat_addr.0 != 0 && n.snat_port_count != 0 => svc.count,
        _ => svc.local_count,
    }
}

#[classifier]
pub fn weft_nodeport_ingress(ctx: TcContext) -> i32 {
    translate(&ctx, false)
}

/// Service translation for a pod's own traffic when socket-level load balancing is off, on the
/// ingress of its host-side interface (packets from the pod). Every backend is reachable
/// without source translation (pod addresses route across the cluster); the reply is
/// translated back by `weft_nodeport_egress` on the client's interface. A pod reaching itself
/// through its service (hairpin) is given the source 169.254.42.1.
#[classifier]
pub fn weft_service_from_pod(ctx: TcContext) -> i32 {
    translate(&ctx, true)
}

#[inline(always)]
fn translate(ctx: &TcContext, from_pod: bool) -> i32 {
    let Some(p) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if let Some(verdict) = snat_reply(ctx, &p) {
        return verdict;
    }
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
    let n = if from_pod { svc.count } else { reachable(svc) };
    // SAFETY: read-only lookup of plain integers.
    let known = unsafe { WEFT_CT.get(&p.flow) }.copied();
    let (backend, remote) = match known {
        // A packet of an established TCP connection keeps its backend, even one that is now
        // terminating. A new connection reusing the 5-tuple, and UDP, keep it only while its slot
        // still holds it; otherwise they choose again (UDP flows move off removed backends).
        // Whether it went to a remote backend was decided when the backend was chosen.
        Some(t) if !p.new_or_udp || lb::still_valid(svc, n, t.service, t.slot, &t.backend) => {
            // SAFETY: read-only lookup of plain integers.
            (t.backend, unsafe { WEFT_SNAT_FWD.get(&p.flow) }.is_some())
        }
        _ => {
            if n == 0 {
                count_drop(DropReason::NoEndpoints);
                return refuse(ctx, &p);
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
                // The table covers every backend; without a way to reach remote ones, flows
                // hashed to them choose among the local ones instead.
                .filter(|(_, slot)| *slot < n)
                .or_else(|| lb::pick(svc, n, client))
            } else {
                lb::pick(svc, n, client)
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
            // Translated at the source too: a pod's reaching itself, or (from outside the
            // node) a remote backend. Everything else only has its destination translated.
            let remote = if from_pod {
                b.addr == p.flow.src
            } else {
                slot >= svc.local_count
            };
            if !remote {
                // A flow that moved here from a remote backend leaves without translation now.
                let _ = WEFT_SNAT_FWD.remove(&p.flow);
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
            }
            (b, remote)
        }
    };
    if !remote {
        if rewrite(ctx, &p, true, backend.addr, backend.port).is_err() {
            count_drop(DropReason::RewriteFailed);
            return TC_ACT_SHOT as i32;
        }
        return TC_ACT_UNSPEC;
    }
    // A remote backend: leave from this node's address so the reply comes back here (or,
    // hairpin, from an address the pod does not own).
    let Some(out) = snat_port(&p, &backend, from_pod) else {
        count_drop(DropReason::SnatPortsExhausted);
        return TC_ACT_SHOT as i32;
    };
    if rewrite_both(ctx, &p, (backend.addr, backend.port), (out.addr, out.port)).is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT as i32;
    }
    forward(ctx, out.addr, backend.addr)
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
