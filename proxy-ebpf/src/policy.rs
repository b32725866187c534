//! NetworkPolicy enforcement at TC on each pod's host-side interface.
//!
//! tcx ingress there sees what the pod sends (its egress policy), tcx egress what it receives (its
//! ingress policy). A packet of a pod that `WEFT_POL_ENDPOINTS` marks isolated in that direction
//! passes if it belongs to a connection already allowed (either way round, so replies pass; a
//! connection the pod opens in a direction it is not isolated in is remembered too), or if
//! a rule allows it: the peer's identity (from the `WEFT_POL_IPCACHE` LPM trie) or "any", with the
//! protocol and destination port (an LPM prefix over the port) or "every protocol". That is at most
//! one ipcache and four rule lookups, whatever the number of policies or rules. Otherwise it is
//! dropped and counted. Not IPv4, or not an isolated pod: left alone (`TC_ACT_UNSPEC`).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use weft_proxy_common::{
    Be16, Be32, DropReason, FlowKey, PEER_LEN_ANY, PEER_LEN_WORLD, POLICY_DEFAULT_DENY,
    POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, POLICY_EGRESS_ISOLATED, POLICY_INGRESS_ISOLATED,
    POLICY_KEY_FIXED_BITS, POLICY_NOT_ISOLATED, POLICY_PENDING, PeerId, PolicyCtKey, PolicyEvent,
    PolicyKey, VERDICT_ALLOW, VERDICT_DENY, proto,
};

use crate::maps::{
    WEFT_POL_CT, WEFT_POL_ENDPOINTS, WEFT_POL_EVENTS, WEFT_POL_IPCACHE, WEFT_POL_PODNETS,
    WEFT_POL_RULES, WEFT_POL_VERDICTS, count_drop,
};
use crate::packet;

/// Reports a verdict on a new connection (dropped silently when the ring is full).
#[inline(always)]
fn report(f: &FlowKey, endpoint: u32, policy: u32, direction: u8, verdict: u8) {
    if let Some(c) =
        WEFT_POL_VERDICTS.get_ptr_mut(weft_proxy_common::verdict_slot(direction, verdict))
    {
        // SAFETY: a per-CPU slot only this CPU writes while the program runs.
        unsafe { *c += 1 };
    }
    if let Some(mut entry) = WEFT_POL_EVENTS.reserve::<PolicyEvent>(0) {
        entry.write(PolicyEvent {
            // SAFETY: a helper without arguments or memory access.
            time_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
            flow: *f,
            endpoint,
            policy,
            direction,
            verdict,
            _pad: [0; 6],
        });
        entry.submit(0);
    }
}

/// Traffic leaving the pod (tcx ingress of its host-side interface).
#[classifier]
pub fn weft_policy_from_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, POLICY_DIR_EGRESS)
}

/// Traffic entering the pod (tcx egress of its host-side interface).
#[classifier]
pub fn weft_policy_to_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, POLICY_DIR_INGRESS)
}

#[inline(always)]
fn flow(ctx: &TcContext) -> Option<FlowKey> {
    let ip = packet::ipv4(ctx)?;
    let (sport, dport) = match ip.l4 {
        Some(l4) if matches!(ip.proto, proto::TCP | proto::UDP | proto::SCTP) => {
            (Be16(ctx.load(l4).ok()?), Be16(ctx.load(l4 + 2).ok()?))
        }
        _ => (Be16(0), Be16(0)),
    };
    Some(FlowKey {
        src: ip.src,
        dst: ip.dst,
        sport,
        dport,
        proto: ip.proto,
        _pad: [0; 3],
    })
}

#[inline(always)]
fn enforce(ctx: &TcContext, direction: u8) -> i32 {
    let Some(f) = flow(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let (pod, peer, isolated) = if direction == POLICY_DIR_EGRESS {
        (f.src, f.dst, POLICY_EGRESS_ISOLATED)
    } else {
        (f.dst, f.src, POLICY_INGRESS_ISOLATED)
    };
    // SAFETY: read-only lookup of plain integers, copied out at once.
    let Some(ep) = (unsafe { WEFT_POL_ENDPOINTS.get(&pod) }).copied() else {
        // A pod of this node that the agent has not seen yet: isolated until it has, so a policy
        // that selects it applies from its first packet.
        if WEFT_POL_PODNETS.get(Key::new(32, pod)).is_some() {
            report(
                &f,
                u32::from_be(pod.0),
                POLICY_PENDING,
                direction,
                VERDICT_DENY,
            );
            count_drop(DropReason::PolicyPending);
            return TC_ACT_SHOT;
        }
        return TC_ACT_UNSPEC;
    };
    let fwd = PolicyCtKey {
        flow: f,
        endpoint: ep.id,
        _pad: 0,
    };
    let reverse = PolicyCtKey {
        flow: FlowKey {
            src: f.dst,
            dst: f.src,
            sport: f.dport,
            dport: f.sport,
            proto: f.proto,
            _pad: [0; 3],
        },
        endpoint: ep.id,
        _pad: 0,
    };
    // SAFETY: as above; only presence is looked at.
    if unsafe { WEFT_POL_CT.get(&fwd).is_some() || WEFT_POL_CT.get(&reverse).is_some() } {
        return TC_ACT_UNSPEC;
    }
    if ep.flags & isolated == 0 {
        // Not isolated this way: the connection is allowed, and is remembered so that its replies
        // pass the pod's isolation in the other direction, and so that it outlives a policy that
        // isolates the pod later (established connections are kept, as Cilium keeps them).
        let _ = WEFT_POL_CT.insert(&fwd, &1, 0);
        if ep.flags != 0 {
            report(&f, ep.id, POLICY_NOT_ISOLATED, direction, VERDICT_ALLOW);
        }
        return TC_ACT_UNSPEC;
    }
    let world = PeerId {
        addr: Be32(0),
        len: PEER_LEN_WORLD,
        _pad: [0; 3],
    };
    let identity = WEFT_POL_IPCACHE
        .get(Key::new(32, peer))
        .copied()
        .unwrap_or(world);
    let any = PeerId {
        addr: Be32(0),
        len: PEER_LEN_ANY,
        _pad: [0; 3],
    };
    let full = POLICY_KEY_FIXED_BITS + 16;
    let mut allowed = None;
    for id in [identity, any] {
        for (p, port) in [(f.proto, f.dport), (0, Be16(0))] {
            let key = Key::new(
                full,
                PolicyKey {
                    endpoint: ep.id,
                    peer: id,
                    direction,
                    proto: p,
                    port,
                },
            );
            if let Some(policy) = WEFT_POL_RULES.get(key) {
                allowed = Some(*policy);
            }
        }
    }
    if let Some(policy) = allowed {
        let _ = WEFT_POL_CT.insert(&fwd, &1, 0);
        report(&f, ep.id, policy, direction, VERDICT_ALLOW);
        return TC_ACT_UNSPEC;
    }
    report(&f, ep.id, POLICY_DEFAULT_DENY, direction, VERDICT_DENY);
    count_drop(DropReason::PolicyDenied);
    TC_ACT_SHOT
}
