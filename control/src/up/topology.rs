//! The network a `weft up` cluster lives on: a private underlay (a bridge in its own network
//! namespace, holding the API server's address), one namespace per node plugged into it with
//! `eth0`, and an external host, all named after the cluster (`<name>-underlay`,
//! `<name>-node1`, ..., `<name>-ext` under `/run/netns`, so `ip netns exec` reaches them).
//! Nothing in the machine's own namespace is created or changed.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use weft_netns::{NetNs, Netlink};

/// Where named namespaces live (as `ip netns` keeps them).
pub const NETNS_DIR: &str = "/run/netns";

/// The API server's address on the underlay.
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The external host's address on the underlay.
pub const EXT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);

/// Node `i`'s (1-based) address on the underlay.
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 10 + i as u8)
}

/// Node `i`'s pod range.
pub fn pod_cidr(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

/// The cluster's pod range (all nodes').
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// The path of one of the cluster's namespaces (`underlay`, `node1`, `ext`).
pub fn netns_path(cluster: &str, role: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("{cluster}-{role}"))
}

/// Every namespace of the cluster that exists now.
pub fn existing(cluster: &str) -> Vec<PathBuf> {
    let prefix = format!("{cluster}-");
    std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(&prefix).is_some_and(|role| {
                role == "underlay"
                    || role == "ext"
                    || role
                        .strip_prefix("node")
                        .is_some_and(|i| i.parse::<usize>().is_ok())
            })
        })
        .map(|e| e.path())
        .collect()
}

/// Builds the underlay, `nodes` node namespaces (forwarding on) and the external host.
pub fn create(cluster: &str, nodes: usize) -> Result<(), weft_netns::Error> {
    let underlay = NetNs::create_named(NETNS_DIR, &format!("{cluster}-underlay"))?;
    let mut hosts: Vec<(String, Ipv4Addr, NetNs)> = Vec::new();
    for (role, addr) in (1..=nodes)
        .map(|i| (format!("node{i}"), node_addr(i)))
        .chain([("ext".to_owned(), EXT_ADDR)])
    {
        let ns = NetNs::create_named(NETNS_DIR, &format!("{cluster}-{role}"))?;
        if role != "ext" {
            ns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
                .map_err(weft_netns::Error::Socket)?;
        }
        hosts.push((role, addr, ns));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(weft_netns::Error::Socket)?;
    rt.block_on(async {
        let unl = Netlink::connect(&underlay).await?;
        unl.add_bridge("br0", None).await?;
        let br = unl.require_link("br0").await?;
        unl.add_address(br.index, IpNet::new(API_ADDR.into(), 24).expect("valid"))
            .await?;
        unl.set_up(br.index).await?;
        for (role, addr, ns) in &hosts {
            unl.add_veth(role, "eth0", Some(ns), None).await?;
            let port = unl.require_link(role).await?;
            unl.set_controller(port.index, br.index).await?;
            unl.set_up(port.index).await?;
            let nl = Netlink::connect(ns).await?;
            let eth0 = nl.require_link("eth0").await?;
            nl.add_address(eth0.index, IpNet::new((*addr).into(), 24).expect("valid"))
                .await?;
            nl.set_up(eth0.index).await?;
        }
        Ok(())
    })
}

/// Removes the cluster's namespaces (killing what still runs in them first). Idempotent.
pub fn remove(cluster: &str) {
    for path in existing(cluster) {
        weft_netns::kill_processes_in(&path, "net");
        if let Err(e) = NetNs::remove_named(&path) {
            tracing::warn!(netns = %path.display(), error = %e, "removing a namespace");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_and_names_follow_the_node_number() {
        assert_eq!(super::node_addr(1).to_string(), "10.200.0.11");
        assert_eq!(super::pod_cidr(3), "10.244.3.0/24");
        assert_eq!(
            super::netns_path("weft", "node2"),
            std::path::Path::new("/run/netns/weft-node2")
        );
    }
}
