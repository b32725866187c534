//! The VXLAN overlay between nodes: one VXLAN device per node and, for every other node, a route
//! to its pod CIDR, a neighbour entry and an FDB entry, programmed from a list of nodes.
//!
//! Addressing follows flannel's VXLAN backend: a node's VTEP address is the network address of its
//! pod CIDR (assigned /32 to the device) and routes to a peer's pod CIDR go `via` the peer's VTEP
//! address `onlink`. Unlike flannel, the VTEP MAC is derived from the node's underlay address
//! ([`vtep_mac`]), so a node list of (name, address, pod CIDR) is all any node needs: no MAC has to
//! be published. Reconciliation diffs the desired entries against what the kernel holds and changes
//! only the difference, so a node joining or leaving costs three netlink requests per other node
//! touched, not a rebuild.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use weft_netns::Netlink;

/// VXLAN encapsulation overhead on an IPv4 underlay (outer IP 20 + UDP 8 + VXLAN 8 + Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Default VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 1;
/// Default UDP port (the one Linux and flannel use, not IANA's 4789, to coexist with other
/// VXLAN users on 4789).
pub const DEFAULT_PORT: u16 = 8472;

/// One node as the overlay needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Node name.
    pub name: String,
    /// The node's underlay address (the VXLAN packets' outer address).
    pub address: Ipv4Addr,
    /// The node's pod CIDR.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

/// Overlay settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name in the node list.
    pub node_name: String,
    /// VXLAN device name.
    pub device: String,
    /// VNI.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
}

impl Settings {
    /// Defaults for a node.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            device: crate::plugin::VXLAN_DEVICE.to_owned(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
        }
    }
}

/// Errors of the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The node list is inconsistent.
    #[error("invalid node list: {0}")]
    Invalid(String),
    /// This node is not in the list.
    #[error("node {0} is not in the node list")]
    NotListed(String),
    /// No local interface has this node's underlay address.
    #[error("no interface in this namespace has the node address {0}")]
    NoUnderlay(Ipv4Addr),
    /// A link with the device name exists but is not a VXLAN device.
    #[error("{name} exists and is a {kind}, not vxlan")]
    WrongKind {
        /// Device name.
        name: String,
        /// Its kind.
        kind: String,
    },
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] weft_netns::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The MAC of a node's VXLAN device, derived from its underlay address (locally administered).
pub fn vtep_mac(address: Ipv4Addr) -> [u8; 6] {
    let o = address.octets();
    [0x02, 0x77, o[0], o[1], o[2], o[3]]
}

/// The VTEP address of a node: its pod CIDR's network address.
pub fn vtep_ip(pod_cidr: Ipv4Net) -> Ipv4Addr {
    pod_cidr.network()
}

/// What the kernel should hold for the peers of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Peer pod CIDR → peer VTEP address (route via, onlink).
    pub routes: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Peer VTEP address → peer VTEP MAC (neighbour entry).
    pub neighbours: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// Peer VTEP MAC → peer underlay address (FDB entry).
    pub fdb: BTreeMap<[u8; 6], Ipv4Addr>,
}

/// Validates the list and computes this node's entry and its plan for the peers.
pub fn plan(node_name: &str, nodes: &[NodeEntry]) -> Result<(NodeEntry, Plan), OverlayError> {
    let mut names = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for n in nodes {
        if !names.insert(n.name.as_str()) {
            return Err(OverlayError::Invalid(format!(
                "node {} is listed twice",
                n.name
            )));
        }
        if !addrs.insert(n.address) {
            return Err(OverlayError::Invalid(format!(
                "address {} is used by two nodes",
                n.address
            )));
        }
        if n.pod_cidr.prefix_len() > 30 {
            return Err(OverlayError::Invalid(format!(
                "node {}: pod CIDR {} is too small",
                n.name, n.pod_cidr
            )));
        }
    }
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            if a.pod_cidr.contains(&b.pod_cidr.network())
                || b.pod_cidr.contains(&a.pod_cidr.network())
            {
                return Err(OverlayError::Invalid(format!(
                    "pod CIDRs of {} ({}) and {} ({}) overlap",
                    a.name, a.pod_cidr, b.name, b.pod_cidr
                )));
            }
        }
    }
    let local = nodes
        .iter()
        .find(|n| n.name == node_name)
        .cloned()
        .ok_or_else(|| OverlayError::NotListed(node_name.to_owned()))?;
    let mut p = Plan::default();
    for peer in nodes.iter().filter(|n| n.name != node_name) {
        let (ip, mac) = (vtep_ip(peer.pod_cidr.trunc()), vtep_mac(peer.address));
        p.routes.insert(peer.pod_cidr.trunc(), ip);
        p.neighbours.insert(ip, mac);
        p.fdb.insert(mac, peer.address);
    }
    Ok((local, p))
}

/// What one reconciliation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Entries added or corrected.
    pub changed: usize,
    /// Stale entries removed.
    pub removed: usize,
    /// Entries that were already right.
    pub unchanged: usize,
    /// Whether the device itself was created.
    pub created_device: bool,
}

fn to_mac(v: &[u8]) -> Option<[u8; 6]> {
    v.try_into().ok()
}

/// Brings the kernel in line with the node list: the VXLAN device, then routes, neighbours and
/// FDB entries for every peer; removes entries for nodes that left.
pub async fn reconcile(
    nl: &Netlink,
    settings: &Settings,
    nodes: &[NodeEntry],
) -> Result<Report, OverlayError> {
    let (local, plan) = plan(&settings.node_name, nodes)?;
    let mut report = Report::default();
    let dev = ensure_device(nl, settings, &local, &mut report).await?;

    let have_routes: BTreeMap<Ipv4Net, Option<Ipv4Addr>> = nl
        .routes_v4()
        .await?
        .into_iter()
        .filter(|r| r.oif == Some(dev))
        .filter_map(|r| match (r.dst, r.gateway) {
            (IpNet::V4(d), Some(std::net::IpAddr::V4(g))) => Some((d, Some(g))),
            (IpNet::V4(d), _) => Some((d, None)),
            _ => None,
        })
        .collect();
    for (dst, gw) in &plan.routes {
        if have_routes.get(dst) == Some(&Some(*gw)) {
            report.unchanged += 1;
        } else {
            nl.replace_route_v4_onlink(IpNet::V4(*dst), *gw, dev)
                .await?;
            report.changed += 1;
        }
    }
    for (dst, gw) in &have_routes {
        if !plan.routes.contains_key(dst) {
            nl.del_route_v4(IpNet::V4(*dst), *gw, Some(dev)).await?;
            report.removed += 1;
        }
    }

    let have_neigh: BTreeMap<Ipv4Addr, Option<[u8; 6]>> = nl
        .neighbours(dev)
        .await?
        .into_iter()
        .map(|(ip, mac)| (ip, to_mac(&mac)))
        .collect();
    for (ip, mac) in &plan.neighbours {
        if have_neigh.get(ip) == Some(&Some(*mac)) {
            report.unchanged += 1;
        } else {
            tracing::debug!(%ip, ?mac, have = ?have_neigh.get(ip), "neighbour");
            nl.replace_neighbour(dev, *ip, mac).await?;
            report.changed += 1;
        }
    }
    for (ip, mac) in &have_neigh {
        if !plan.neighbours.contains_key(ip) {
            nl.del_neighbour(dev, *ip, &mac.unwrap_or_default(), false)
                .await?;
            report.removed += 1;
        }
    }

    let have_fdb: Vec<(Vec<u8>, Ipv4Addr)> = nl.fdb(dev).await?;
    for (mac, dst) in &plan.fdb {
        if have_fdb
            .iter()
            .any(|(m, d)| m.as_slice() == mac && d == dst)
        {
            report.unchanged += 1;
        } else {
            tracing::debug!(?mac, %dst, ?have_fdb, "fdb entry");
            nl.replace_fdb(dev, mac, *dst).await?;
            report.changed += 1;
        }
    }
    for (mac, dst) in &have_fdb {
        let wanted = to_mac(mac).and_then(|m| plan.fdb.get(&m)) == Some(dst);
        if !wanted {
            nl.del_neighbour(dev, *dst, mac, true).await?;
            report.removed += 1;
        }
    }
    Ok(report)
}

async fn ensure_device(
    nl: &Netlink,
    settings: &Settings,
    local: &NodeEntry,
    report: &mut Report,
) -> Result<u32, OverlayError> {
    let mac = vtep_mac(local.address).to_vec();
    let dev = match nl.link_by_name(&settings.device).await? {
        Some(d) => {
            if let Some(kind) = d.kind.as_deref().filter(|k| *k != "vxlan") {
                return Err(OverlayError::WrongKind {
                    name: settings.device.clone(),
                    kind: kind.to_owned(),
                });
            }
            if d.mac.as_deref() != Some(mac.as_slice()) {
                nl.set_mac(d.index, mac).await?;
            }
            d
        }
        None => {
            let (underlay, _) = nl
                .all_addresses()
                .await?
                .into_iter()
                .find(|(_, a)| a.addr() == std::net::IpAddr::V4(local.address))
                .ok_or(OverlayError::NoUnderlay(local.address))?;
            let mtu = nl
                .link_by_index(underlay)
                .await?
                .and_then(|l| l.mtu)
                .unwrap_or(1500);
            nl.add_vxlan(
                &settings.device,
                settings.vni,
                local.address,
                underlay,
                settings.port,
                mtu - VXLAN_OVERHEAD,
                mac,
            )
            .await?;
            report.created_device = true;
            nl.require_link(&settings.device).await?
        }
    };
    let vtep = IpNet::V4(Ipv4Net::new(vtep_ip(local.pod_cidr.trunc()), 32).expect("valid /32"));
    if !nl.addresses(dev.index).await?.contains(&vtep) {
        nl.add_address(dev.index, vtep).await?;
    }
    if !dev.up {
        nl.set_up(dev.index).await?;
    }
    Ok(dev.index)
}

/// Removes the overlay device (and with it every route, neighbour and FDB entry through it).
pub async fn teardown(nl: &Netlink, settings: &Settings) -> Result<bool, OverlayError> {
    Ok(nl.delete_link_by_name(&settings.device).await?)
}

/// Reads a node list: a JSON array of `{"name", "address", "podCIDR"}`, or `{"nodes": [...]}`.
pub fn read_nodes(path: &Path) -> Result<Vec<NodeEntry>, OverlayError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum File {
        List(Vec<NodeEntry>),
        Wrapped { nodes: Vec<NodeEntry> },
    }
    let bytes = std::fs::read(path).map_err(|source| OverlayError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let file: File = serde_json::from_slice(&bytes)
        .map_err(|e| OverlayError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(match file {
        File::List(n) | File::Wrapped { nodes: n } => n,
    })
}

/// Writes this node's pod CIDR where weft-cni's IPAM reads it (`ipam.podCIDRFile`), atomically,
/// and only when it changed.
pub fn write_pod_cidr(path: &Path, cidr: Ipv4Net) -> Result<(), OverlayError> {
    let text = format!("{}\n", cidr.trunc());
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let io = |source| OverlayError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, addr: &str, cidr: &str) -> NodeEntry {
        NodeEntry {
            name: name.into(),
            address: addr.parse().unwrap(),
            pod_cidr: cidr.parse().unwrap(),
        }
    }

    #[test]
    fn the_plan_covers_every_peer_and_not_self() {
        let nodes = [
            node("a", "10.200.0.10", "10.244.0.0/24"),
            node("b", "10.200.0.11", "10.244.1.0/24"),
            node("c", "10.200.0.12", "10.244.2.0/24"),
        ];
        let (local, p) = plan("a", &nodes).unwrap();
        assert_eq!(local.name, "a");
        assert_eq!(p.routes.len(), 2);
        assert_eq!(
            p.routes[&"10.244.1.0/24".parse().unwrap()],
            "10.244.1.0".parse::<Ipv4Addr>().unwrap()
        );
        let mac_b = vtep_mac("10.200.0.11".parse().unwrap());
        assert_eq!(p.neighbours[&"10.244.1.0".parse().unwrap()], mac_b);
        assert_eq!(p.fdb[&mac_b], "10.200.0.11".parse::<Ipv4Addr>().unwrap());
        assert!(!p.routes.contains_key(&"10.244.0.0/24".parse().unwrap()));
    }

    #[test]
    fn inconsistent_lists_are_rejected() {
        let a = node("a", "10.200.0.10", "10.244.0.0/24");
        let dup = node("a", "10.200.0.11", "10.244.1.0/24");
        assert!(
            plan("a", &[a.clone(), dup])
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let overlap = node("b", "10.200.0.11", "10.244.0.0/16");
        assert!(
            plan("a", &[a.clone(), overlap])
                .unwrap_err()
                .to_string()
                .contains("overlap")
        );
        assert!(matches!(plan("zz", &[a]), Err(OverlayError::NotListed(_))));
    }

    #[test]
    fn vtep_macs_are_local_unicast_and_distinct() {
        let m = vtep_mac("10.0.0.1".parse().unwrap());
        assert_eq!(m[0] & 0x03, 0x02, "locally administered, unicast");
        assert_ne!(m, vtep_mac("10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn node_files_come_in_two_shapes() {
        let dir = std::env::temp_dir().join(format!("weft-overlay-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("nodes.json");
        std::fs::write(
            &f,
            r#"[{"name":"a","address":"10.0.0.1","podCIDR":"10.244.0.0/24"}]"#,
        )
        .unwrap();
        assert_eq!(read_nodes(&f).unwrap().len(), 1);
        std::fs::write(
            &f,
            r#"{"nodes":[{"name":"a","address":"10.0.0.1","podCIDR":"10.244.0.0/24"}]}"#,
        )
        .unwrap();
        assert_eq!(read_nodes(&f).unwrap().len(), 1);
        std::fs::write(&f, r#"{"nodes":[{"name":"a"}]}"#).unwrap();
        assert!(read_nodes(&f).is_err());
        let pc = dir.join("sub/pod-cidr");
        write_pod_cidr(&pc, "10.244.3.7/24".parse().unwrap()).unwrap();
        assert_eq!(std::fs::read_to_string(&pc).unwrap(), "10.244.3.0/24\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
