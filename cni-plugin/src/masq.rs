//! Masquerade (SNAT to the node's address) for pod traffic leaving the cluster's pod network,
//! programmed as one nftables table per network over netlink (libnftnl via `nftnl`).
//!
//! ```text
//! table ip weft-<network>-<hash> {
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr <pod subnet> ip daddr != <cluster CIDR> masquerade } }
//! ```
//!
//! The table is per node, not per pod, so an ADD only pays for one table-list round trip; it is
//! written (atomically, in one batch) only when missing. Its name carries a hash of the subnet and
//! cluster CIDR, so a changed pod CIDR yields a new table and the stale one is removed in the same
//! batch. Pod-to-pod traffic, across nodes too, keeps its source address.

use std::{collections::HashSet, ffi::CString, net::Ipv4Addr};

use ipnet::Ipv4Net;
use nftnl::{Batch, Chain, FinalizedBatch, MsgType, ProtoFamily, Rule, Table, nft_expr};

use crate::error::{Error, Result};

/// Priority of the srcnat hook (`NF_IP_PRI_NAT_SRC`).
const SRCNAT: i32 = 100;

fn fnv32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn prefix(network: &str) -> String {
    format!("weft-{network}-")
}

/// The table name for a network, pod subnet and cluster CIDR.
pub fn table_name(network: &str, subnet: Ipv4Net, cluster: Ipv4Net) -> String {
    format!(
        "{}{:08x}",
        prefix(network),
        fnv32(&format!("{subnet}|{cluster}"))
    )
}

fn nl_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Nftables {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|e| Error::internal(format!("nftables name {s:?}: {e}")))
}

/// Names of every nftables table in this network namespace.
fn tables() -> Result<HashSet<String>> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(|e| nl_err("socket", e))?;
    let portid = socket.portid();
    let seq = 0;
    socket
        .send(&nftnl::table::get_tables_nlmsg(seq))
        .map_err(|e| nl_err("list tables", e))?;
    let mut found: HashSet<CString> = HashSet::new();
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    loop {
        let n = socket
            .recv_raw(&mut buffer)
            .map_err(|e| nl_err("list tables", e))?;
        if n == 0 {
            break;
        }
        match mnl::cb_run2(
            &buffer[..n],
            seq,
            portid,
            nftnl::table::get_tables_cb,
            &mut found,
        ) {
            Ok(mnl::CbResult::Stop) => break,
            Ok(mnl::CbResult::Ok) => {}
            Err(e) => return Err(nl_err("list tables", e)),
        }
    }
    Ok(found
        .into_iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect())
}

fn send(batch: &FinalizedBatch) -> Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(|e| nl_err("socket", e))?;
    let portid = socket.portid();
    socket.send_all(batch).map_err(|e| nl_err("send", e))?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket
            .recv(&mut buffer[..])
            .map_err(|e| nl_err("receive", e))?
        {
            let message = message.map_err(|e| nl_err("receive", e))?;
            let seq = expected
                .next()
                .ok_or_else(|| nl_err("receive", "unexpected acknowledgement"))?;
            mnl::cb_run(message, seq, portid).map_err(|e| nl_err("apply", e))?;
        }
    }
    Ok(())
}

/// Whether the masquerade table for this network, subnet and cluster CIDR is present.
pub fn present(network: &str, subnet: Ipv4Net, cluster: Ipv4Net) -> Result<bool> {
    Ok(tables()?.contains(&table_name(network, subnet, cluster)))
}

/// Makes sure pod traffic from `subnet` to anything outside `cluster` is masqueraded. Returns
/// whether it had to write the table.
pub fn ensure(network: &str, subnet: Ipv4Net, cluster: Ipv4Net) -> Result<bool> {
    let name = table_name(network, subnet, cluster);
    let existing = tables()?;
    if existing.contains(&name) {
        return Ok(false);
    }
    let mut batch = Batch::new();
    for stale in existing.iter().filter(|t| t.starts_with(&prefix(network))) {
        let t = Table::new(&cstring(stale)?, ProtoFamily::Ipv4);
        batch.add(&t, MsgType::Del);
    }
    let table = Table::new(&cstring(&name)?, ProtoFamily::Ipv4);
    batch.add(&table, MsgType::Add);
    let mut chain = Chain::new(c"postrouting", &table);
    chain.set_type(nftnl::ChainType::Nat);
    chain.set_hook(nftnl::Hook::PostRouting, SRCNAT);
    chain.set_policy(nftnl::Policy::Accept);
    batch.add(&chain, MsgType::Add);
    let mut rule = Rule::new(&chain);
    rule.add_expr(&nft_expr!(payload ipv4 saddr));
    rule.add_expr(&nft_expr!(bitwise mask subnet.netmask(), xor Ipv4Addr::UNSPECIFIED));
    rule.add_expr(&nft_expr!(cmp == subnet.network()));
    rule.add_expr(&nft_expr!(payload ipv4 daddr));
    rule.add_expr(&nft_expr!(bitwise mask cluster.netmask(), xor Ipv4Addr::UNSPECIFIED));
    rule.add_expr(&nft_expr!(cmp != cluster.network()));
    rule.add_expr(&nft_expr!(counter));
    rule.add_expr(&nft_expr!(masquerade));
    batch.add(&rule, MsgType::Add);
    // A kernel without nftables NAT answers "Operation not supported" or "No such file": the
    // error's details say so (`Error::Nftables`).
    send(&batch.finalize())?;
    Ok(true)
}

/// Removes every masquerade table of a network (for uninstalling).
pub fn remove(network: &str) -> Result<usize> {
    let mut batch = Batch::new();
    let mut n = 0;
    for t in tables()?.iter().filter(|t| t.starts_with(&prefix(network))) {
        batch.add(&Table::new(&cstring(t)?, ProtoFamily::Ipv4), MsgType::Del);
        n += 1;
    }
    if n > 0 {
        send(&batch.finalize())?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_follow_the_addresses() {
        let a = table_name(
            "net",
            "10.244.1.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        );
        let b = table_name(
            "net",
            "10.244.2.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        );
        assert!(a.starts_with("weft-net-") && b.starts_with("weft-net-"));
        assert_ne!(a, b);
        assert_eq!(
            a,
            table_name(
                "net",
                "10.244.1.0/24".parse().unwrap(),
                "10.244.0.0/16".parse().unwrap()
            )
        );
    }
}
