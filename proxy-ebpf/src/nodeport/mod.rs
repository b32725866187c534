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
//!
//! Split by concern as Cilium's `bpf/lib` is: [`parse`] (the packet's flow), [`nat`] (rewrites and
//! source ports), [`fib`] (sending a translated packet on), [`reject`] (RST refusals); load
//! balancing is `crate::lb`. This file holds the programs and the translation that uses them.

mod fib;
mod nat;
mod parse;
mod reject;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use weft_proxy_common::{
    AFFINITY_CLIENT_ADDR, DropReason, FlowKey, FlowTarget, MAGLEV_TABLE_SIZE, MaglevKey,
    SERVICE_FLAG_AFFINITY, SERVICE_FLAG_MAGLEV, ServiceKey, ServiceValue, SockRevValue,
};

use crate::{
    lb,
    maps::{
        WEFT_CT, WEFT_MAGLEV, WEFT_NODE, WEFT_REVNAT, WEFT_SERVICES, WEFT_SNAT_FWD, count_drop,
    },
};
use fib::forward;
use nat::{rewrite, rewrite_both, snat_port, snat_reply};
use parse::parse;
use reject::refuse;

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
