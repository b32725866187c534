//! Backend selection shared by the socket and TC paths: a random slot, or the backend a client is
//! pinned to when the service has `sessionAffinity: ClientIP` and the pin is still fresh and
//! still valid (its slot holds the same backend).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use weft_proxy_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, SERVICE_FLAG_AFFINITY, ServiceValue,
};

use crate::maps::{WEFT_AFFINITY, WEFT_BACKENDS};

/// Picks a backend among slots `0..n` (`n` > 0: all backends, or the local ones) for `client` (a
/// netns cookie, or a tagged address). `None` when the agent is between writing the count and
/// the slots.
#[inline(always)]
pub fn pick(svc: &ServiceValue, n: u32, client: u64) -> Option<(Backend, u32)> {
    let affinity = svc.flags & SERVICE_FLAG_AFFINITY != 0;
    let key = AffinityKey {
        client,
        service: svc.id,
        _pad: 0,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if affinity {
        // SAFETY: read-only lookup of plain integers.
        if let Some(pin) = unsafe { WEFT_AFFINITY.get(&key) } {
            let fresh = now.saturating_sub(pin.last_used_ns)
                < u64::from(svc.affinity_timeout) * 1_000_000_000;
            // SAFETY: as above.
            let same = unsafe {
                WEFT_BACKENDS.get(&BackendKey {
                    service: svc.id,
                    slot: pin.slot,
                })
            }
            .is_some_and(|b| *b == pin.backend);
            if fresh && same && pin.slot < n {
                let v = AffinityValue {
                    last_used_ns: now,
                    ..*pin
                };
                let _ = WEFT_AFFINITY.insert(&key, &v, 0);
                return Some((v.backend, v.slot));
            }
        }
    }
    // SAFETY: a helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % n;
    // SAFETY: read-only lookup.
    let backend = *unsafe {
        WEFT_BACKENDS.get(&BackendKey {
            service: svc.id,
            slot,
        })
    }?;
    if affinity {
        let v = AffinityValue {
            slot,
            _pad: 0,
            backend,
            last_used_ns: now,
        };
        let _ = WEFT_AFFINITY.insert(&key, &v, 0);
    }
    Some((backend, slot))
}

/// Whether `slot` of backend set `service` still holds `backend` (and is below `n`).
#[inline(always)]
pub fn still_valid(svc: &ServiceValue, n: u32, service: u32, slot: u32, backend: &Backend) -> bool {
    // SAFETY: read-only lookup of plain integers.
    svc.id == service
        && slot < n
        && unsafe { WEFT_BACKENDS.get(&BackendKey { service, slot }) }.is_some_and(|b| b == backend)
}

/// A hash of a flow for Maglev: source address and port, destination port and protocol. The
/// destination address is left out because a NodePort's differs on every node, and every node
/// must pick the same backend for a flow.
#[inline(always)]
pub fn flow_hash(f: &weft_proxy_common::FlowKey) -> u32 {
    let mut h = f.src.0
        ^ ((u32::from(f.sport.0) << 16) | u32::from(f.dport.0)).rotate_left(7)
        ^ (u32::from(f.proto) << 24);
    // murmur3's finaliser.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
