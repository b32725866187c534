//! Socket-level service load balancing (cgroup sock_addr hooks).
//!
//! On connect(2) (and on every sendmsg(2) of an unconnected UDP socket) a destination that is a
//! service frontend is rewritten to one of its backends, once, before any packet exists: the
//! connection then runs pod-to-pod with no per-packet translation. The chosen backend is recorded
//! per socket so recvmsg(2) and getpeername(2) report the service address, as the application
//! expects. A frontend with no backends refuses the connection immediately (EPERM) instead of
//! letting it hang.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use weft_proxy_common::{Be16, Be32, DropReason, ServiceKey, SockRevKey, SockRevValue};

use crate::{
    lb,
    maps::{WEFT_SERVICES, WEFT_SOCK_REVNAT, count_drop},
};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn weft_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn weft_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

/// Service address → backend, if the destination is a frontend.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed; these fields are readable in
    // connect4/sendmsg4 programs.
    let (addr, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let key = ServiceKey {
        addr: Be32(addr),
        // The port is the low 16 bits of the field, already in network byte order.
        port: Be16(port as u16),
        proto: protocol as u8,
        _pad: 0,
    };
    // SAFETY: the value is only read, and the map holds plain integers.
    let Some(svc) = (unsafe { WEFT_SERVICES.get(&key) }) else {
        return ALLOW;
    };
    if svc.count == 0 {
        count_drop(DropReason::NoEndpoints);
        return REJECT;
    }
    // The pod (its network namespace) is the client for session affinity.
    // SAFETY: the context is a bpf_sock_addr, for which the helper is allowed.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    let Some((backend, _)) = lb::pick(svc, svc.count, netns) else {
        // The agent is between writing the count and the slots: refuse rather than misroute.
        count_drop(DropReason::BackendRace);
        return REJECT;
    };
    // SAFETY: writing user_ip4/user_port is what connect4/sendmsg4 programs may do.
    unsafe {
        (*sa).user_ip4 = backend.addr.0;
        (*sa).user_port = u32::from(backend.port.0);
    }
    // SAFETY: the context is a bpf_sock_addr, for which the helper is allowed.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let rev = SockRevKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let svc_addr = SockRevValue {
        addr: key.addr,
        port: key.port,
        _pad: 0,
    };
    // A full LRU evicts the oldest entry; failure only costs the reverse view of one socket.
    let _ = WEFT_SOCK_REVNAT.insert(&rev, &svc_addr, 0);
    ALLOW
}

/// Backend → service address, for sockets [`translate`] rewrote.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer the kernel passed; the helper is allowed for sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: these fields are readable in recvmsg4/getpeername4 programs.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockRevKey {
        cookie,
        addr: Be32(addr),
        port: Be16(port as u16),
        _pad: 0,
    };
    // SAFETY: the value is only read.
    if let Some(v) = unsafe { WEFT_SOCK_REVNAT.get(&key) } {
        // SAFETY: these fields are writable in recvmsg4/getpeername4 programs.
        unsafe {
            (*sa).user_ip4 = v.addr.0;
            (*sa).user_port = u32::from(v.port.0);
        }
    }
}
