//! NetworkPolicy as the contents of the policy maps, computed without the kernel: from
//! [`Compiled`] policy to [`Desired`] (endpoints and their isolation, pod ranges, known prefixes,
//! and each isolated pod's rule keys, ports split into prefixes and named ports resolved), and
//! [`Touched`], the parts a change may alter. [`crate::policymap`] writes it to the kernel.
//! The map layout is described there.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_proxy_common::{
    Be16, Be32, PEER_LEN_ANY, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, POLICY_EGRESS_ISOLATED,
    POLICY_INGRESS_ISOLATED, POLICY_KEY_FIXED_BITS, PeerId, PolicyKey,
};

use super::{Compiled, EndpointPolicy, PeerMatch, PolicyPod, PortMatch, Proto, Rule};

/// What the maps should hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Local pods, with their isolation flags (0: not isolated).
    pub endpoints: BTreeMap<Ipv4Addr, u32>,
    /// This node's pod ranges: addresses in them without an endpoint are pending.
    pub podnets: BTreeSet<Ipv4Net>,
    /// Known prefixes.
    pub ipcache: BTreeSet<Ipv4Net>,
    /// Rules of each isolated local pod.
    pub rules: BTreeMap<Ipv4Addr, EndpointRules>,
    /// Names of the policies rules point at, by index (an empty name is a free index).
    pub policies: Vec<String>,
}

/// One pod's rules: (prefix length, key) → index into [`Desired::policies`].
pub type EndpointRules = BTreeMap<(u32, PolicyKeyOrd), u32>;

impl Desired {
    /// Rule entries over all pods.
    pub fn rule_count(&self) -> usize {
        self.rules.values().map(BTreeMap::len).sum()
    }
}

/// The parts of [`Desired`] a change may have altered; [`PolicyMaps::apply_touched`] compares
/// only these with the kernel, so a change costs in proportion to its size.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Pods whose flags or rules may differ.
    pub endpoints: BTreeSet<Ipv4Addr>,
    /// Prefixes that may have been added or removed.
    pub ipcache: BTreeSet<Ipv4Net>,
    /// Policy name indices that may differ.
    pub names: BTreeSet<u32>,
    /// Whether the pod ranges may differ.
    pub podnets: bool,
}

impl Touched {
    /// Everything either side holds: a full comparison.
    pub fn all(a: &Desired, b: &Desired) -> Self {
        Touched {
            endpoints: a
                .endpoints
                .keys()
                .chain(b.endpoints.keys())
                .chain(a.rules.keys())
                .chain(b.rules.keys())
                .copied()
                .collect(),
            ipcache: a.ipcache.union(&b.ipcache).copied().collect(),
            names: (0..a.policies.len().max(b.policies.len()) as u32).collect(),
            podnets: true,
        }
    }
}

/// [`PolicyKey`] with an order, for the desired set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyKeyOrd {
    endpoint: u32,
    peer: (u32, u8),
    direction: u8,
    proto: u8,
    port: u16,
}

impl PolicyKeyOrd {
    pub(crate) fn key(&self) -> PolicyKey {
        PolicyKey {
            endpoint: self.endpoint,
            peer: peer_id(self.peer.0, self.peer.1),
            direction: self.direction,
            proto: self.proto,
            port: Be16(self.port.to_be()),
        }
    }

    pub(crate) fn from_key(k: &PolicyKey) -> Self {
        PolicyKeyOrd {
            endpoint: k.endpoint,
            peer: (u32::from_be(k.peer.addr.0), k.peer.len),
            direction: k.direction,
            proto: k.proto,
            port: u16::from_be(k.port.0),
        }
    }
}

pub(crate) fn peer_id(addr: u32, len: u8) -> PeerId {
    PeerId {
        addr: Be32(addr.to_be()),
        len,
        _pad: [0; 3],
    }
}

/// Splits a port range into prefixes (value, prefix length in bits of 16).
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest aligned block starting at lo that stays within hi.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size /= 2;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn proto_ports(p: &PortMatch, named: impl Fn(Proto, &str) -> Option<u16>) -> Vec<(u8, u16, u32)> {
    match p {
        PortMatch::All => vec![(0, 0, 0)],
        PortMatch::Range(proto, a, b) => port_prefixes(*a, *b)
            .into_iter()
            .map(|(port, len)| (proto.number(), port, len))
            .collect(),
        PortMatch::Named(proto, name) => named(*proto, name)
            .map(|port| vec![(proto.number(), port, 16)])
            .unwrap_or_default(),
    }
}

/// The prefixes a pod's rules need in the ipcache beyond the pods' own: every CIDR and
/// `except` its ipBlock peers name.
pub fn block_prefixes(rules: &[Rule]) -> impl Iterator<Item = Ipv4Net> + '_ {
    rules
        .iter()
        .flat_map(|r| r.peers.iter())
        .flat_map(|p| match p {
            PeerMatch::Block { cidr, except } => std::iter::once(*cidr)
                .chain(except.iter().copied())
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        })
}

/// One local pod's isolation flags and rule entries. `index` gives each policy's name index.
pub fn endpoint_rules(
    ep: &EndpointPolicy,
    ip: Ipv4Addr,
    ipcache: &BTreeSet<Ipv4Net>,
    pods: &BTreeMap<Ipv4Addr, PolicyPod>,
    mut index: impl FnMut(&str) -> u32,
) -> (u32, EndpointRules) {
    let mut flags = 0;
    let mut out = EndpointRules::new();
    let id = u32::from(ip);
    for (dir, rules, flag) in [
        (POLICY_DIR_INGRESS, &ep.ingress, POLICY_INGRESS_ISOLATED),
        (POLICY_DIR_EGRESS, &ep.egress, POLICY_EGRESS_ISOLATED),
    ] {
        let Some(rules) = rules else { continue };
        flags |= flag;
        for r in rules {
            let idx = index(&r.policy);
            add_rule(&mut out, ipcache, pods, id, ip, dir, r, idx);
        }
    }
    (flags, out)
}

/// Computes the maps' contents for the pods in `local` (this node's) and the node's pod ranges.
pub fn desired(c: &Compiled, local: &BTreeSet<Ipv4Addr>, podnets: &[Ipv4Net]) -> Desired {
    let mut d = Desired {
        podnets: podnets.iter().map(Ipv4Net::trunc).collect(),
        ..Desired::default()
    };
    for ip in local {
        d.endpoints.insert(*ip, 0);
    }
    // Every prefix a peer can be identified by.
    for ip in c.pods.keys() {
        d.ipcache.insert(Ipv4Net::from(*ip));
    }
    for ep in c.endpoints.values() {
        for rules in [&ep.ingress, &ep.egress].into_iter().flatten() {
            d.ipcache.extend(block_prefixes(rules));
        }
    }
    let mut policy_index: BTreeMap<String, u32> = BTreeMap::new();
    for (ip, ep) in &c.endpoints {
        if !local.contains(ip) {
            continue;
        }
        let (flags, rules) = endpoint_rules(ep, *ip, &d.ipcache, &c.pods, |name| {
            let n = policy_index.len() as u32;
            *policy_index.entry(name.to_owned()).or_insert(n)
        });
        if !rules.is_empty() {
            d.rules.insert(*ip, rules);
        }
        d.endpoints.insert(*ip, flags);
    }
    let mut names: Vec<(u32, String)> = policy_index.into_iter().map(|(k, v)| (v, k)).collect();
    names.sort();
    d.policies = names.into_iter().map(|(_, n)| n).collect();
    d
}

#[allow(clippy::too_many_arguments)]
fn add_rule(
    out: &mut EndpointRules,
    ipcache: &BTreeSet<Ipv4Net>,
    pods: &BTreeMap<Ipv4Addr, PolicyPod>,
    id: u32,
    ip: Ipv4Addr,
    dir: u8,
    r: &Rule,
    idx: u32,
) {
    // Peers as (identity prefix, the pod behind it if it is one).
    let mut peers: Vec<((u32, u8), Option<Ipv4Addr>)> = Vec::new();
    for p in &r.peers {
        match p {
            PeerMatch::Any => peers.push(((0, PEER_LEN_ANY), None)),
            PeerMatch::Pods(ips) => {
                peers.extend(ips.iter().map(|i| ((u32::from(*i), 32), Some(*i))))
            }
            PeerMatch::Block { cidr, except } => {
                // Only the prefixes whose address falls in the block (an ordered range).
                let lo = Ipv4Net::new(cidr.network(), 0).unwrap_or(*cidr);
                let hi = Ipv4Net::new(cidr.broadcast(), 32).unwrap_or(*cidr);
                for net in ipcache.range(lo..=hi) {
                    let inside = cidr.contains(net) && !except.iter().any(|e| e.contains(net));
                    if inside {
                        let pod = (net.prefix_len() == 32 && pods.contains_key(&net.addr()))
                            .then_some(net.addr());
                        peers.push(((u32::from(net.network()), net.prefix_len()), pod));
                    }
                }
            }
        }
    }
    for (peer, peer_pod) in peers {
        for port in &r.ports {
            // Named ports resolve against the destination: this pod for ingress, the peer for
            // egress ("any" peer: every pod that has the port).
            let dest_pods: Vec<Option<Ipv4Addr>> = match (port, dir) {
                (PortMatch::Named(..), POLICY_DIR_INGRESS) => vec![Some(ip)],
                (PortMatch::Named(..), _) if peer.1 == PEER_LEN_ANY => {
                    pods.keys().map(|p| Some(*p)).collect()
                }
                (PortMatch::Named(..), _) => vec![peer_pod],
                _ => vec![None],
            };
            for dest in dest_pods {
                let named = |proto: Proto, name: &str| {
                    dest.and_then(|p| pods.get(&p))
                        .and_then(|p| p.named_ports.get(&(name.to_string(), proto)).copied())
                };
                // An "any" egress peer with a named port narrows to the pods that have it.
                let peer = match (port, dir, dest) {
                    (PortMatch::Named(..), POLICY_DIR_EGRESS, Some(p))
                        if peer.1 == PEER_LEN_ANY =>
                    {
                        (u32::from(p), 32)
                    }
                    _ => peer,
                };
                for (proto, value, bits) in proto_ports(port, named) {
                    let key = PolicyKeyOrd {
                        endpoint: id,
                        peer,
                        direction: dir,
                        proto,
                        port: value,
                    };
                    out.entry((POLICY_KEY_FIXED_BITS + bits, key))
                        .or_insert(idx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_split_into_prefixes() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, u16::MAX), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 81), vec![(80, 15)]);
        assert_eq!(port_prefixes(79, 82), vec![(79, 16), (80, 15), (82, 16)]);
        // Every port of a range is covered exactly once.
        for (a, b) in [(1, 65535), (1000, 2000), (3, 3), (65534, 65535)] {
            let pf = port_prefixes(a, b);
            assert!(pf.len() <= 30, "{a}-{b}: {}", pf.len());
            for port in [a, b, a + (b - a) / 2] {
                let hits = pf
                    .iter()
                    .filter(|(v, len)| {
                        let mask = if *len == 0 { 0 } else { u16::MAX << (16 - len) };
                        port & mask == *v
                    })
                    .count();
                assert_eq!(hits, 1, "{port} in {a}-{b}");
            }
        }
    }
}
