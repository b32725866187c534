//! NetworkPolicy in the kernel: writes the difference between what the policy maps hold and the
//! [`Desired`] contents [`crate::policy::rules`] computes.
//!
//! * `WEFT_POL_ENDPOINTS`: every local pod, keyed by address, with its isolation flags; its
//!   endpoint number is its address, so it needs no allocation.
//! * `WEFT_POL_PODNETS`: the node's pod ranges; an address in them that has no endpoint entry is a
//!   pod the agent has not processed yet, and the datapath drops its traffic until it has.
//! * `WEFT_POL_IPCACHE`: every pod's /32 and every CIDR and `except` a policy names; a lookup gives
//!   the longest prefix an address falls in, which is the peer's identity ([`PeerId`]).
//! * `WEFT_POL_RULES`: (endpoint, peer, direction, protocol, port prefix). A rule's peers become
//!   identities (an ipBlock: its own prefix and every known prefix inside it and outside its
//!   excepts), its ports become port prefixes (a range splits into at most 30), a named port is
//!   resolved against the destination pod.
//!
//! Writes go rules and ipcache first, then endpoints; removals the other way round, so a pod is
//! never isolated by rules that are half written.

use std::net::Ipv4Addr;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ipnet::Ipv4Net;
use serde::Serialize;
use weft_proxy_common::{Be32, PeerId, PolicyEndpoint, PolicyKey, PolicyName, names};

use crate::maps::KvMap;

use crate::policy::rules::peer_id;
pub use crate::policy::rules::{Desired, EndpointRules, PolicyKeyOrd, Touched};
use crate::{Error, Result, bpffs::PinLayout};

/// Sizes of what the policy maps hold.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PolicyCounts {
    /// Local pods.
    pub endpoints: usize,
    /// Of which isolated in some direction.
    pub isolated: usize,
    /// Known prefixes.
    pub ipcache: usize,
    /// Rule entries.
    pub rules: usize,
    /// Pod ranges of this node.
    pub pod_ranges: usize,
    /// Named policies.
    pub policies: usize,
}

/// What one [`PolicyMaps::apply`] wrote.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PolicyReport {
    /// Endpoints written or removed.
    pub endpoints: usize,
    /// ipcache entries written or removed.
    pub ipcache: usize,
    /// Rule entries written or removed.
    pub rules: usize,
}

/// The policy maps, for [`PolicyMaps::with_maps`].
pub struct Maps {
    /// Local pods (address → endpoint).
    pub endpoints: Box<dyn KvMap<Be32, PolicyEndpoint>>,
    /// Known prefixes → peer identity.
    pub ipcache: Box<dyn KvMap<(u32, Be32), PeerId>>,
    /// Rule keys → policy name index.
    pub rules: Box<dyn KvMap<(u32, PolicyKey), u32>>,
    /// The node's pod ranges.
    pub podnets: Box<dyn KvMap<(u32, Be32), u32>>,
    /// Policy names by index.
    pub names: Box<dyn KvMap<u32, PolicyName>>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps")
    }
}

/// The policy maps and what they hold.
#[derive(Debug)]
pub struct PolicyMaps {
    maps: Maps,
    current: Desired,
}

fn open_map(layout: &PinLayout, name: &'static str) -> Result<Map> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    Ok(match name {
        names::MAP_POLICY_ENDPOINTS => Map::HashMap(data),
        _ => Map::LpmTrie(data),
    })
}

fn map_err(what: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map {
        name: what.to_string(),
        source,
    }
}

impl PolicyMaps {
    /// Opens the pinned maps and reads what they hold.
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let endpoints: BpfHashMap<MapData, Be32, PolicyEndpoint> =
            BpfHashMap::try_from(open_map(layout, names::MAP_POLICY_ENDPOINTS)?)
                .map_err(map_err(names::MAP_POLICY_ENDPOINTS))?;
        let ipcache: LpmTrie<MapData, Be32, PeerId> =
            LpmTrie::try_from(open_map(layout, names::MAP_POLICY_IPCACHE)?)
                .map_err(map_err(names::MAP_POLICY_IPCACHE))?;
        let rules: LpmTrie<MapData, PolicyKey, u32> =
            LpmTrie::try_from(open_map(layout, names::MAP_POLICY_RULES)?)
                .map_err(map_err(names::MAP_POLICY_RULES))?;
        let podnets: LpmTrie<MapData, Be32, u32> =
            LpmTrie::try_from(open_map(layout, names::MAP_POLICY_PODNETS)?)
                .map_err(map_err(names::MAP_POLICY_PODNETS))?;
        let names_map: BpfHashMap<MapData, u32, PolicyName> = BpfHashMap::try_from(Map::HashMap(
            MapData::from_pin(layout.map(names::MAP_POLICY_NAMES))
                .map_err(map_err(names::MAP_POLICY_NAMES))?,
        ))
        .map_err(map_err(names::MAP_POLICY_NAMES))?;
        Self::with_maps(Maps {
            endpoints: Box::new(endpoints),
            ipcache: Box::new(ipcache),
            rules: Box::new(rules),
            podnets: Box::new(podnets),
            names: Box::new(names_map),
        })
    }

    /// Writes to `maps` (the kernel's, or in-memory ones in tests), reading what they hold.
    pub fn with_maps(maps: Maps) -> Result<Self> {
        let prefix = |(len, addr): (u32, Be32)| {
            Ipv4Net::new(Ipv4Addr::from(u32::from_be(addr.0)), len as u8).ok()
        };
        let mut current = Desired::default();
        for (k, _) in maps
            .podnets
            .entries()
            .map_err(map_err(names::MAP_POLICY_PODNETS))?
        {
            current.podnets.extend(prefix(k));
        }
        for (k, e) in maps
            .endpoints
            .entries()
            .map_err(map_err(names::MAP_POLICY_ENDPOINTS))?
        {
            current
                .endpoints
                .insert(Ipv4Addr::from(u32::from_be(k.0)), e.flags);
        }
        for (k, _) in maps
            .ipcache
            .entries()
            .map_err(map_err(names::MAP_POLICY_IPCACHE))?
        {
            current.ipcache.extend(prefix(k));
        }
        for ((len, k), idx) in maps
            .rules
            .entries()
            .map_err(map_err(names::MAP_POLICY_RULES))?
        {
            let key = PolicyKeyOrd::from_key(&k);
            current
                .rules
                .entry(Ipv4Addr::from(k.endpoint))
                .or_default()
                .insert((len, key), idx);
        }
        for (slot, n) in maps
            .names
            .entries()
            .map_err(map_err(names::MAP_POLICY_NAMES))?
        {
            let len = n.0.iter().position(|b| *b == 0).unwrap_or(n.0.len());
            let name = String::from_utf8_lossy(&n.0[..len]).into_owned();
            let slot = slot as usize;
            if current.policies.len() <= slot {
                current.policies.resize(slot + 1, String::new());
            }
            current.policies[slot] = name;
        }
        Ok(PolicyMaps { maps, current })
    }

    /// What the kernel holds: (local pods, isolated pods, ipcache prefixes, rule entries, pod
    /// ranges).
    pub fn counts(&self) -> PolicyCounts {
        PolicyCounts {
            endpoints: self.current.endpoints.len(),
            isolated: self.current.endpoints.values().filter(|f| **f != 0).count(),
            ipcache: self.current.ipcache.len(),
            rules: self.current.rule_count(),
            pod_ranges: self.current.podnets.len(),
            policies: self
                .current
                .policies
                .iter()
                .filter(|n| !n.is_empty())
                .count(),
        }
    }

    /// Writes the difference between what the maps hold and `want`, comparing everything.
    pub fn apply(&mut self, want: &Desired) -> Result<PolicyReport> {
        let touched = Touched::all(want, &self.current);
        self.apply_touched(want, &touched)
    }

    /// Writes the difference between what the maps hold and `want` in the parts `touched`
    /// names (everything else is taken to be equal already).
    pub fn apply_touched(&mut self, want: &Desired, touched: &Touched) -> Result<PolicyReport> {
        let mut report = PolicyReport::default();
        let prefix_key = |net: &Ipv4Net| {
            (
                u32::from(net.prefix_len()),
                Be32(u32::from(net.network()).to_be()),
            )
        };
        let name_of = |d: &Desired, i: u32| {
            d.policies
                .get(i as usize)
                .filter(|n| !n.is_empty())
                .cloned()
        };
        // Names first, so an event never points at a name not yet written.
        for &i in &touched.names {
            let name = name_of(want, i);
            if name.is_some() && name != name_of(&self.current, i) {
                let name = name.unwrap_or_default();
                let mut buf = [0u8; 128];
                let n = name.len().min(buf.len() - 1);
                buf[..n].copy_from_slice(&name.as_bytes()[..n]);
                self.maps
                    .names
                    .insert(i, PolicyName(buf))
                    .map_err(map_err(names::MAP_POLICY_NAMES))?;
            }
        }
        // Additions and changes: ipcache and rules first.
        for net in &touched.ipcache {
            if want.ipcache.contains(net) && !self.current.ipcache.contains(net) {
                self.maps
                    .ipcache
                    .insert(
                        prefix_key(net),
                        peer_id(u32::from(net.network()), net.prefix_len()),
                    )
                    .map_err(map_err(names::MAP_POLICY_IPCACHE))?;
                self.current.ipcache.insert(*net);
                report.ipcache += 1;
            }
        }
        let empty = EndpointRules::new();
        for ip in &touched.endpoints {
            let want_rules = want.rules.get(ip).unwrap_or(&empty);
            let cur_rules = self.current.rules.get(ip).unwrap_or(&empty);
            for ((len, k), idx) in want_rules {
                if cur_rules.get(&(*len, *k)) != Some(idx) {
                    self.maps
                        .rules
                        .insert((*len, k.key()), *idx)
                        .map_err(map_err(names::MAP_POLICY_RULES))?;
                    report.rules += 1;
                }
            }
        }
        for ip in &touched.endpoints {
            let Some(flags) = want.endpoints.get(ip) else {
                continue;
            };
            if self.current.endpoints.get(ip) != Some(flags) {
                let value = PolicyEndpoint {
                    id: u32::from(*ip),
                    flags: *flags,
                };
                self.maps
                    .endpoints
                    .insert(Be32(u32::from(*ip).to_be()), value)
                    .map_err(map_err(names::MAP_POLICY_ENDPOINTS))?;
                self.current.endpoints.insert(*ip, *flags);
                report.endpoints += 1;
            }
        }
        if touched.podnets {
            // Pod ranges after the endpoints they cover, so no known pod is ever taken for
            // pending; removals before the endpoints are removed.
            for net in want.podnets.difference(&self.current.podnets) {
                self.maps
                    .podnets
                    .insert(prefix_key(net), 1)
                    .map_err(map_err(names::MAP_POLICY_PODNETS))?;
                report.endpoints += 1;
            }
            for net in self.current.podnets.difference(&want.podnets) {
                let _ = self.maps.podnets.remove(&prefix_key(net));
                report.endpoints += 1;
            }
            self.current.podnets = want.podnets.clone();
        }
        // Removals: endpoints, then their stale rules, then prefixes and names.
        for ip in &touched.endpoints {
            if !want.endpoints.contains_key(ip) && self.current.endpoints.remove(ip).is_some() {
                let _ = self.maps.endpoints.remove(&Be32(u32::from(*ip).to_be()));
                report.endpoints += 1;
            }
            let want_rules = want.rules.get(ip).unwrap_or(&empty);
            if let Some(cur_rules) = self.current.rules.get(ip) {
                for (len, k) in cur_rules.keys().filter(|k| !want_rules.contains_key(k)) {
                    let _ = self.maps.rules.remove(&(*len, k.key()));
                    report.rules += 1;
                }
            }
            match want.rules.get(ip) {
                Some(r) => self.current.rules.insert(*ip, r.clone()),
                None => self.current.rules.remove(ip),
            };
        }
        for net in &touched.ipcache {
            if !want.ipcache.contains(net) && self.current.ipcache.remove(net) {
                let _ = self.maps.ipcache.remove(&prefix_key(net));
                report.ipcache += 1;
            }
        }
        for &i in &touched.names {
            let name = name_of(want, i);
            if name.is_none() && name_of(&self.current, i).is_some() {
                let _ = self.maps.names.remove(&i);
            }
            let slot = i as usize;
            if self.current.policies.len() <= slot {
                self.current.policies.resize(slot + 1, String::new());
            }
            self.current.policies[slot] = name.unwrap_or_default();
        }
        while self.current.policies.last().is_some_and(String::is_empty) {
            self.current.policies.pop();
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    //! Policy map diffs against in-memory maps: what is written, in what order, and what a
    //! restarted agent finds.

    use super::*;
    use crate::maps::{Log, Memory, Write};
    use weft_proxy_common::{Be16, POLICY_DIR_INGRESS, POLICY_INGRESS_ISOLATED};

    /// An in-memory map, holding what `from` holds.
    fn mem<K: Ord, V>(
        name: &'static str,
        capacity: usize,
        log: &Log,
        from: Option<&dyn KvMap<K, V>>,
    ) -> Memory<K, V> {
        Memory::new(name, capacity, log.clone())
            .with(from.map(|m| m.entries().unwrap()).unwrap_or_default())
    }

    fn open(log: &Log, from: Option<&PolicyMaps>) -> PolicyMaps {
        let maps = Maps {
            endpoints: Box::new(mem(
                "endpoints",
                1024,
                log,
                from.map(|p| &*p.maps.endpoints),
            )),
            ipcache: Box::new(mem("ipcache", 1024, log, from.map(|p| &*p.maps.ipcache))),
            rules: Box::new(mem("rules", 1024, log, from.map(|p| &*p.maps.rules))),
            podnets: Box::new(mem("podnets", 16, log, from.map(|p| &*p.maps.podnets))),
            names: Box::new(mem("names", 64, log, from.map(|p| &*p.maps.names))),
        };
        PolicyMaps::with_maps(maps).unwrap()
    }

    fn writes(log: &Log) -> Vec<Write> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    fn maps_written(w: &[Write]) -> Vec<(&'static str, bool)> {
        let mut out: Vec<(&'static str, bool)> = Vec::new();
        for w in w {
            let step = match w {
                Write::Insert(m, _) => (*m, true),
                Write::Remove(m, _) => (*m, false),
            };
            if out.last() != Some(&step) {
                out.push(step);
            }
        }
        out
    }

    /// One isolated pod (10.244.0.2) admitting 10.244.0.3 on TCP 80, named by policy `web`.
    fn isolated() -> Desired {
        let pod: Ipv4Addr = [10, 244, 0, 2].into();
        let peer: Ipv4Addr = [10, 244, 0, 3].into();
        let key = PolicyKeyOrd::from_key(&PolicyKey {
            endpoint: u32::from(pod),
            peer: peer_id(u32::from(peer), 32),
            direction: POLICY_DIR_INGRESS,
            proto: 6,
            port: Be16(80u16.to_be()),
        });
        Desired {
            endpoints: [(pod, POLICY_INGRESS_ISOLATED), (peer, 0)].into(),
            podnets: ["10.244.0.0/24".parse().unwrap()].into(),
            ipcache: ["10.244.0.2/32", "10.244.0.3/32"]
                .iter()
                .map(|n| n.parse().unwrap())
                .collect(),
            rules: [(pod, [((128, key), 0)].into())].into(),
            policies: vec!["default/web".into()],
        }
    }

    #[test]
    fn rules_and_prefixes_go_in_before_the_endpoint_that_uses_them_and_out_after() {
        let log = Log::default();
        let mut m = open(&log, None);
        let want = isolated();
        let r = m.apply(&want).unwrap();
        assert_eq!((r.endpoints, r.ipcache, r.rules), (3, 2, 1));
        assert_eq!(
            maps_written(&writes(&log)),
            [
                ("names", true),
                ("ipcache", true),
                ("rules", true),
                ("endpoints", true),
                ("podnets", true)
            ]
        );
        assert_eq!(m.counts().isolated, 1);

        // The same again: nothing written.
        assert_eq!(m.apply(&want).unwrap(), PolicyReport::default());
        assert!(writes(&log).is_empty());

        // The pod goes: its endpoint first, then its rules, its prefix and the name.
        let mut gone = want.clone();
        let pod: Ipv4Addr = [10, 244, 0, 2].into();
        gone.endpoints.remove(&pod);
        gone.rules.remove(&pod);
        gone.ipcache.remove(&"10.244.0.2/32".parse().unwrap());
        gone.policies.clear();
        let r = m.apply(&gone).unwrap();
        assert_eq!((r.endpoints, r.ipcache, r.rules), (1, 1, 1));
        assert_eq!(
            maps_written(&writes(&log)),
            [
                ("endpoints", false),
                ("rules", false),
                ("ipcache", false),
                ("names", false)
            ]
        );
        assert_eq!(m.counts().policies, 0);
    }

    #[test]
    fn a_restarted_agent_reads_the_maps_back_and_converges_without_rewriting() {
        let log = Log::default();
        let mut before = open(&log, None);
        let want = isolated();
        before.apply(&want).unwrap();
        writes(&log);
        let mut after = open(&log, Some(&before));
        assert_eq!(after.current, want, "read back as written");
        assert_eq!(after.apply(&want).unwrap(), PolicyReport::default());
        assert!(writes(&log).is_empty());
        // A full apply of less removes what is no longer wanted, stale rules included.
        let r = after.apply(&Desired::default()).unwrap();
        assert_eq!((r.rules, r.ipcache), (1, 2));
        assert_eq!(after.counts(), PolicyCounts::default());
    }

    #[test]
    fn a_full_map_is_an_error_naming_it_and_the_endpoint_is_not_isolated() {
        let log = Log::default();
        let mut m = open(&log, None);
        m.maps.rules = Box::new(Memory::new("rules", 0, log.clone()));
        let e = m.apply(&isolated()).unwrap_err();
        assert!(e.to_string().contains(names::MAP_POLICY_RULES), "{e}");
        assert!(
            !writes(&log)
                .iter()
                .any(|w| matches!(w, Write::Insert("endpoints", _))),
            "no endpoint is isolated by rules that were not written"
        );
    }
}
