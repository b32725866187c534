//! Refusing a connection to a service without endpoints, as kube-proxy's REJECT rules do.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::generated::bpf_redirect, programs::TcContext};
use weft_proxy_common::proto;

use super::nat::TCP_CSUM;
use super::parse::{Packet, TCP_ACK, TCP_FLAGS};
use crate::packet::{ETH_HLEN, IP_DST, IP_SRC};

const TCP_RST: u8 = 0x04;
/// Offsets of the sequence and acknowledgement numbers in the TCP header.
const TCP_SEQ: usize = 4;
const TCP_ACK_SEQ: usize = 8;

/// Refuses a connection to a service without endpoints: a TCP SYN is turned into the RST that a
/// closed port would send and bounced out of the interface it came in on, so the client fails at
/// once (as kube-proxy's REJECT rules make it) instead of retrying into silence; anything else is
/// dropped.
#[inline(always)]
pub(super) fn refuse(ctx: &TcContext, p: &Packet) -> i32 {
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
