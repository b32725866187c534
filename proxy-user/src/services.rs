//! Programming the service maps from the desired state, incrementally.
//!
//! The kernel holds, per frontend, a [`ServiceValue`] (backend-set id and count) and `count`
//! [`Backend`] slots. [`ServiceMaps::apply`] diffs the desired state against what it last wrote
//! (read back from the pinned maps at start, so a restarted agent converges and removes stale
//! entries) and touches only frontends that changed: the cost of a change is proportional to the
//! change, not to the number of services. Writes are ordered so a concurrent connect(2) never
//! reads a slot index at or above the slots written: slots first when growing, count first when
//! shrinking.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use serde::Serialize;
use weft_proxy_common::{
    Backend, BackendKey, Be16, Be32, FlowTarget, MaglevKey, NodeConfig, SERVICE_FLAG_AFFINITY,
    SERVICE_FLAG_MAGLEV, ServiceKey, ServiceValue, names,
};

use crate::{
    Error, Result,
    bpffs::PinLayout,
    maps::KvMap,
    model::{BackendAddr, Desired, Frontend, FrontendState},
};

/// Map size limits (entries). They apply when the maps are first created.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Frontends.
    pub max_services: u32,
    /// Backend slots over all frontends.
    pub max_backends: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: 65_536,
            max_backends: 262_144,
        }
    }
}

/// What one [`ServiceMaps::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Frontends added.
    pub added: usize,
    /// Frontends whose backends changed.
    pub updated: usize,
    /// Frontends removed.
    pub removed: usize,
    /// Frontends left as they were.
    pub unchanged: usize,
    /// Frontends that could not be written (see the returned errors).
    pub failed: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    id: u32,
    backends: Vec<BackendAddr>,
    local_count: usize,
    affinity_timeout: Option<u32>,
    maglev: bool,
    /// The Maglev table written for it (backend indices), empty when none or unknown.
    table: Vec<u32>,
}

impl Programmed {
    fn matches(&self, want: &FrontendState) -> bool {
        self.backends == want.backends
            && self.local_count == want.local_count
            && self.affinity_timeout == want.affinity_timeout
            && self.maglev == want.maglev
    }

    fn from_want(id: u32, want: &FrontendState, table: Vec<u32>) -> Self {
        Self {
            id,
            backends: want.backends.clone(),
            local_count: want.local_count,
            affinity_timeout: want.affinity_timeout,
            maglev: want.maglev,
            table,
        }
    }
}

/// One row of what the kernel holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    /// `addr:port/proto`.
    pub frontend: String,
    /// Backend set id.
    pub id: u32,
    /// `addr:port` of each slot.
    pub backends: Vec<String>,
    /// How many of them (the first ones) are on this node.
    pub local: usize,
}

/// (frontend, backend) address pairs.
pub type UdpPairs = BTreeSet<(SocketAddrV4, SocketAddrV4)>;

const PROTO_UDP: u8 = 17;

/// (frontend, backend) of every UDP frontend of a desired state.
pub fn udp_pairs(desired: &Desired) -> UdpPairs {
    pairs(desired.iter().map(|(f, s)| (f, &s.backends[..])))
}

fn pairs<'a>(frontends: impl Iterator<Item = (&'a Frontend, &'a [BackendAddr])>) -> UdpPairs {
    frontends
        .filter(|(f, _)| f.proto == PROTO_UDP)
        .flat_map(|(f, backends)| {
            backends.iter().map(move |b| {
                (
                    SocketAddrV4::new(f.addr, f.port),
                    SocketAddrV4::new(b.addr, b.port),
                )
            })
        })
        .collect()
}

/// The node settings map (aya's `Array` has no `Debug`).
struct NodeMap(Array<MapData, NodeConfig>);

impl std::fmt::Debug for NodeMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeMap")
    }
}

/// The service, backend and Maglev maps, for [`ServiceMaps::with_maps`].
pub struct Maps {
    /// Frontend → backend set.
    pub services: Box<dyn KvMap<ServiceKey, ServiceValue>>,
    /// (set, slot) → backend.
    pub backends: Box<dyn KvMap<BackendKey, Backend>>,
    /// (set, index) → Maglev choice.
    pub maglev: Box<dyn KvMap<MaglevKey, FlowTarget>>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps")
    }
}

/// The service and backend maps, and what is programmed in them.
pub struct ServiceMaps {
    services: Box<dyn KvMap<ServiceKey, ServiceValue>>,
    backends: Box<dyn KvMap<BackendKey, Backend>>,
    maglev: Box<dyn KvMap<MaglevKey, FlowTarget>>,
    node: Option<NodeMap>,
    current: BTreeMap<Frontend, Programmed>,
    /// Backend-set ids in use, kept alongside `current` so allocating one is O(log n).
    ids: BTreeSet<u32>,
    limits: Limits,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map {
        name: name.into(),
        source,
    }
}

/// The kernel key of a frontend.
pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: Be32::from_octets(f.addr.octets()),
        port: Be16::from_host(f.port),
        proto: f.proto,
        _pad: 0,
    }
}

fn frontend(k: &ServiceKey) -> Frontend {
    Frontend {
        addr: k.addr.octets().into(),
        port: k.port.to_host(),
        proto: k.proto,
    }
}

fn backend(b: &BackendAddr) -> Backend {
    Backend {
        addr: Be32::from_octets(b.addr.octets()),
        port: Be16::from_host(b.port),
        _pad: 0,
    }
}

fn backend_addr(b: &Backend) -> BackendAddr {
    BackendAddr {
        addr: b.addr.octets().into(),
        port: b.port.to_host(),
    }
}

fn open_pinned(layout: &PinLayout, name: &'static str) -> Result<MapData> {
    MapData::from_pin(layout.map(name)).map_err(map_err(name))
}

impl std::fmt::Debug for ServiceMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMaps")
            .field("frontends", &self.current.len())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ServiceMaps {
    /// Opens the pinned maps under `layout` and reads what they hold; slots that no frontend
    /// references (left by a crash in the middle of an update) are deleted.
    pub fn open(layout: &PinLayout, limits: Limits) -> Result<Self> {
        Self::open_inner(layout, limits, true)
    }

    /// Opens the maps to look at them only: nothing is written, not even stale slots removed
    /// (the agent may be in the middle of an update, with slots written ahead of the count).
    pub fn open_read_only(layout: &PinLayout) -> Result<Self> {
        Self::open_inner(layout, Limits::default(), false)
    }

    fn open_inner(layout: &PinLayout, limits: Limits, clean_stale: bool) -> Result<Self> {
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(Map::HashMap(open_pinned(layout, names::MAP_SERVICES)?))
                .map_err(map_err(names::MAP_SERVICES))?;
        let backends: HashMap<MapData, BackendKey, Backend> =
            HashMap::try_from(Map::HashMap(open_pinned(layout, names::MAP_BACKENDS)?))
                .map_err(map_err(names::MAP_BACKENDS))?;
        let maglev: HashMap<MapData, MaglevKey, FlowTarget> =
            HashMap::try_from(Map::HashMap(open_pinned(layout, names::MAP_MAGLEV)?))
                .map_err(map_err(names::MAP_MAGLEV))?;
        // Looking only, the node map may not exist yet (an agent starting up pins its maps one
        // by one); it is not needed for that.
        let node = match open_pinned(layout, names::MAP_NODE) {
            Ok(m) => Some(NodeMap(
                Array::try_from(Map::Array(m)).map_err(map_err(names::MAP_NODE))?,
            )),
            Err(_) if !clean_stale => None,
            Err(e) => return Err(e),
        };
        let maps = Maps {
            services: Box::new(services),
            backends: Box::new(backends),
            maglev: Box::new(maglev),
        };
        let mut me = Self::with_maps(maps, limits, clean_stale)?;
        me.node = node;
        Ok(me)
    }

    /// Programs `maps` (the kernel's, or in-memory ones in tests), reading back what they hold;
    /// with `clean_stale`, slots no frontend references are deleted.
    pub fn with_maps(maps: Maps, limits: Limits, clean_stale: bool) -> Result<Self> {
        let mut me = Self {
            services: maps.services,
            backends: maps.backends,
            maglev: maps.maglev,
            node: None,
            current: BTreeMap::new(),
            ids: BTreeSet::new(),
            limits,
        };
        me.read_back(clean_stale)?;
        Ok(me)
    }

    fn read_back(&mut self, clean_stale: bool) -> Result<()> {
        let mut by_id: BTreeMap<u32, (Frontend, u32, Option<u32>, u32)> = BTreeMap::new();
        let mut maglev_ids: BTreeMap<u32, bool> = BTreeMap::new();
        for (k, v) in self
            .services
            .entries()
            .map_err(map_err(names::MAP_SERVICES))?
        {
            let affinity = (v.flags & SERVICE_FLAG_AFFINITY != 0).then_some(v.affinity_timeout);
            maglev_ids.insert(v.id, v.flags & SERVICE_FLAG_MAGLEV != 0);
            by_id.insert(v.id, (frontend(&k), v.count, affinity, v.local_count));
        }
        let mut slots: BTreeMap<u32, BTreeMap<u32, Backend>> = BTreeMap::new();
        let mut stale = Vec::new();
        for (k, b) in self
            .backends
            .entries()
            .map_err(map_err(names::MAP_BACKENDS))?
        {
            match by_id.get(&k.service) {
                Some((_, count, _, _)) if k.slot < *count => {
                    slots.entry(k.service).or_default().insert(k.slot, b);
                }
                _ => stale.push(k),
            }
        }
        for k in stale.into_iter().filter(|_| clean_stale) {
            let _ = self.backends.remove(&k);
        }
        for (id, (f, count, affinity_timeout, local_count)) in by_id {
            let got = slots.remove(&id).unwrap_or_default();
            // Slot order is meaningful (local backends first): keep it.
            let mut backends: Vec<BackendAddr> = got.values().map(backend_addr).collect();
            if backends.len() != count as usize {
                // A torn update: force a rewrite by recording nothing for it.
                backends.clear();
            }
            let local_count = local_count as usize;
            self.current.insert(
                f,
                Programmed {
                    id,
                    backends,
                    local_count,
                    affinity_timeout,
                    maglev: maglev_ids.get(&id).copied().unwrap_or(false),
                    // Unknown until rewritten: the next change writes the whole table.
                    table: Vec::new(),
                },
            );
            self.ids.insert(id);
        }
        Ok(())
    }

    /// The lowest free id above the highest in use, or a gap when ids run out (never in practice).
    fn free_id(&self) -> u32 {
        match self.ids.last() {
            None => 1,
            Some(&max) if max < u32::MAX => max + 1,
            Some(_) => (1..)
                .find(|i| !self.ids.contains(i))
                .expect("ids are plenty"),
        }
    }

    fn write_slots(&mut self, id: u32, backends: &[BackendAddr]) -> Result<()> {
        for (slot, b) in backends.iter().enumerate() {
            self.backends
                .insert(
                    BackendKey {
                        service: id,
                        slot: slot as u32,
                    },
                    backend(b),
                )
                .map_err(|e| {
                    limit_error(
                        e,
                        names::MAP_BACKENDS,
                        "--max-backends",
                        self.limits.max_backends,
                    )
                })?;
        }
        Ok(())
    }

    /// (frontend, backend) of every UDP frontend as programmed.
    pub fn udp_pairs(&self) -> UdpPairs {
        pairs(self.current.iter().map(|(f, p)| (f, &p.backends[..])))
    }

    /// What the datapath knows of this node (its address for flows to remote backends).
    pub fn node_config(&self) -> NodeConfig {
        self.node
            .as_ref()
            .and_then(|n| n.0.get(&0, 0).ok())
            .unwrap_or_default()
    }

    /// Sets what the datapath knows of this node; returns whether it changed.
    pub fn set_node_config(&mut self, want: NodeConfig) -> Result<bool> {
        if self.node_config() == want {
            return Ok(false);
        }
        let Some(node) = self.node.as_mut() else {
            return Ok(false);
        };
        node.0.set(0, want, 0).map_err(map_err(names::MAP_NODE))?;
        Ok(true)
    }

    fn delete_slots(&mut self, id: u32, from: usize, to: usize) {
        for slot in from..to {
            let _ = self.backends.remove(&BackendKey {
                service: id,
                slot: slot as u32,
            });
        }
    }

    /// Writes the Maglev table of a frontend that uses one (over all its backends: the TC path
    /// reaches remote ones by translating the source), changing only entries that differ from
    /// what `old` wrote; removes the table of one that no longer does. Returns the table now in
    /// the map.
    fn write_table(&mut self, id: u32, want: &FrontendState, old: &Programmed) -> Result<Vec<u32>> {
        let table = if want.maglev {
            let names: Vec<String> = want.backends.iter().map(ToString::to_string).collect();
            crate::maglev::table(&names, crate::maglev::TABLE_SIZE)
        } else {
            Vec::new()
        };
        if table.is_empty() {
            if old.maglev {
                self.delete_table(id);
            }
            return Ok(table);
        }
        for (index, &slot) in table.iter().enumerate() {
            let before = old
                .table
                .get(index)
                .map(|&s| (s, old.backends.get(s as usize)));
            if before == Some((slot, want.backends.get(slot as usize))) {
                continue;
            }
            let key = MaglevKey {
                service: id,
                index: index as u32,
            };
            let value = FlowTarget {
                backend: backend(&want.backends[slot as usize]),
                service: id,
                slot,
            };
            self.maglev.insert(key, value).map_err(|e| {
                limit_error(
                    e,
                    names::MAP_MAGLEV,
                    "fewer Maglev services (64 fit)",
                    262_144,
                )
            })?;
        }
        Ok(table)
    }

    fn delete_table(&mut self, id: u32) {
        for index in 0..crate::maglev::TABLE_SIZE {
            let _ = self.maglev.remove(&MaglevKey { service: id, index });
        }
    }

    fn set_service(&mut self, f: &Frontend, id: u32, want: &FrontendState) -> Result<()> {
        let v = ServiceValue {
            id,
            count: want.backends.len() as u32,
            flags: service_flags(want),
            affinity_timeout: want.affinity_timeout.unwrap_or(0),
            local_count: want.local_count as u32,
            _pad: 0,
        };
        self.services.insert(service_key(f), v).map_err(|e| {
            limit_error(
                e,
                names::MAP_SERVICES,
                "--max-services",
                self.limits.max_services,
            )
        })
    }

    /// Brings the maps to `desired`. Frontends that fail (a full map) are reported; the others are
    /// still applied.
    pub fn apply(&mut self, desired: &Desired) -> (ApplyReport, Vec<Error>) {
        let mut report = ApplyReport::default();
        let mut errors = Vec::new();
        let gone: Vec<Frontend> = self
            .current
            .keys()
            .filter(|f| !desired.contains_key(f))
            .copied()
            .collect();
        for f in gone {
            let p = self.current.remove(&f).expect("listed");
            self.ids.remove(&p.id);
            let _ = self.services.remove(&service_key(&f));
            self.delete_slots(p.id, 0, p.backends.len());
            if p.maglev {
                self.delete_table(p.id);
            }
            report.removed += 1;
        }
        for (f, want) in desired {
            match self.current.get(f).cloned() {
                Some(p) if p.matches(want) => report.unchanged += 1,
                Some(p) => {
                    let (old, new) = (p.backends.len(), want.backends.len());
                    let res = if new >= old {
                        self.write_slots(p.id, &want.backends)
                            .and_then(|()| self.write_table(p.id, want, &p))
                            .and_then(|t| self.set_service(f, p.id, want).map(|()| t))
                    } else {
                        self.set_service(f, p.id, want)
                            .and_then(|()| self.write_slots(p.id, &want.backends))
                            .and_then(|()| self.write_table(p.id, want, &p))
                    };
                    match res {
                        Ok(table) => {
                            self.delete_slots(p.id, new, old);
                            self.current
                                .insert(*f, Programmed::from_want(p.id, want, table));
                            report.updated += 1;
                        }
                        Err(e) => {
                            errors.push(e);
                            report.failed += 1;
                        }
                    }
                }
                None => {
                    let id = self.free_id();
                    let none = Programmed::from_want(
                        id,
                        &FrontendState {
                            maglev: false,
                            ..want.clone()
                        },
                        Vec::new(),
                    );
                    let res = self
                        .write_slots(id, &want.backends)
                        .and_then(|()| self.write_table(id, want, &none))
                        .and_then(|t| self.set_service(f, id, want).map(|()| t));
                    match res {
                        Ok(table) => {
                            self.current
                                .insert(*f, Programmed::from_want(id, want, table));
                            self.ids.insert(id);
                            report.added += 1;
                        }
                        Err(e) => {
                            self.delete_slots(id, 0, want.backends.len());
                            errors.push(e);
                            report.failed += 1;
                        }
                    }
                }
            }
        }
        (report, errors)
    }

    /// Number of frontends programmed.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether nothing is programmed.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Number of backend slots programmed.
    pub fn backend_count(&self) -> usize {
        self.current.values().map(|p| p.backends.len()).sum()
    }
}

fn limit_error(e: MapError, name: &'static str, flag: &str, limit: u32) -> Error {
    let full =
        matches!(&e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
    if full {
        Error::Limit {
            map: name,
            limit,
            flag: flag.to_owned(),
        }
    } else {
        Error::Map {
            name: name.into(),
            source: e,
        }
    }
}

/// The `SERVICE_FLAG_*` bits of a frontend.
fn service_flags(want: &FrontendState) -> u32 {
    let mut flags = 0;
    if want.affinity_timeout.is_some() {
        flags |= SERVICE_FLAG_AFFINITY;
    }
    if want.maglev {
        flags |= SERVICE_FLAG_MAGLEV;
    }
    flags
}

/// Every map [`ServiceMaps::open`] opens.
const MAPS_OPENED: [&str; 3] = [names::MAP_SERVICES, names::MAP_BACKENDS, names::MAP_MAGLEV];

/// Reads what the kernel holds, for `weft-proxy services`.
pub fn read(layout: &PinLayout) -> Result<Vec<ServiceRow>> {
    // Nothing programmed yet (or the agent is still creating its maps).
    if !MAPS_OPENED.iter().all(|m| layout.map(m).exists()) {
        return Ok(Vec::new());
    }
    let maps = ServiceMaps::open_read_only(layout)?;
    Ok(maps
        .current
        .iter()
        .map(|(f, p)| ServiceRow {
            frontend: f.to_string(),
            id: p.id,
            backends: p.backends.iter().map(ToString::to_string).collect(),
            local: p.local_count,
        })
        .collect())
}

/// Forgets every TC-path flow, like `conntrack -F`: each flow chooses its backend again on its
/// next packet. Returns how many flows were forgotten.
pub fn flush_flows(layout: &PinLayout) -> Result<usize> {
    use weft_proxy_common::{SnatRev, SockRevValue};
    let flows = clear_lru::<FlowTarget>(layout, names::MAP_CT)?;
    clear_lru::<SockRevValue>(layout, names::MAP_REVNAT)?;
    clear_lru::<SockRevValue>(layout, names::MAP_SNAT_FWD)?;
    clear_lru::<SnatRev>(layout, names::MAP_SNAT_REV)?;
    Ok(flows)
}

/// Removes every entry of a pinned LRU map keyed by flows; returns how many there were.
fn clear_lru<V: aya::Pod>(layout: &PinLayout, name: &'static str) -> Result<usize> {
    let mut map: HashMap<MapData, weft_proxy_common::FlowKey, V> =
        HashMap::try_from(Map::LruHashMap(open_pinned(layout, name)?)).map_err(map_err(name))?;
    let keys: Vec<weft_proxy_common::FlowKey> =
        map.keys().filter_map(std::result::Result::ok).collect();
    for k in &keys {
        let _ = map.remove(k);
    }
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    //! Service programming against in-memory maps: what is written, in what order, and what a
    //! restart finds.

    use super::*;
    use crate::maps::{Log, Memory, Write};

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: [10, 96, 0, last].into(),
            port,
            proto: 6,
        }
    }

    fn state(backends: &[u8]) -> FrontendState {
        FrontendState {
            service: "default/web".into(),
            backends: backends
                .iter()
                .map(|b| BackendAddr {
                    addr: [10, 244, 0, *b].into(),
                    port: 8080,
                })
                .collect(),
            local_count: backends.len(),
            affinity_timeout: None,
            maglev: false,
        }
    }

    struct Fixture {
        log: Log,
        services: Vec<(ServiceKey, ServiceValue)>,
        backends: Vec<(BackendKey, Backend)>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                log: Log::default(),
                services: Vec::new(),
                backends: Vec::new(),
            }
        }

        fn open(&self, limits: Limits) -> ServiceMaps {
            let maps = Maps {
                services: Box::new(
                    Memory::new("services", limits.max_services as usize, self.log.clone())
                        .with(self.services.clone()),
                ),
                backends: Box::new(
                    Memory::new("backends", limits.max_backends as usize, self.log.clone())
                        .with(self.backends.clone()),
                ),
                maglev: Box::new(Memory::new("maglev", 262_144, self.log.clone())),
            };
            ServiceMaps::with_maps(maps, limits, true).unwrap()
        }

        fn writes(&self) -> Vec<Write> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    /// Which map each write went to.
    fn maps_written(w: &[Write]) -> Vec<&'static str> {
        w.iter()
            .map(|w| match w {
                Write::Insert(m, _) => *m,
                Write::Remove(m, _) => *m,
            })
            .collect()
    }

    #[test]
    fn a_change_touches_only_its_frontend_slots_before_count_when_growing() {
        let fx = Fixture::new();
        let mut m = fx.open(Limits::default());
        let desired: Desired = [(fe(1, 80), state(&[1, 2])), (fe(2, 80), state(&[3]))].into();
        let (r, errors) = m.apply(&desired);
        assert!(errors.is_empty());
        assert_eq!((r.added, r.updated, r.unchanged), (2, 0, 0));
        assert_eq!((m.len(), m.backend_count()), (2, 3));
        let first = fx.writes();
        assert_eq!(first.len(), 5, "3 slots and 2 frontends: {first:?}");

        // Nothing changed: nothing written.
        let (r, _) = m.apply(&desired);
        assert_eq!(r.unchanged, 2);
        assert!(fx.writes().is_empty());

        // Growing: the new slots go in before the count that makes them reachable.
        let mut grown = desired.clone();
        grown.insert(fe(1, 80), state(&[1, 2, 4]));
        let (r, _) = m.apply(&grown);
        assert_eq!((r.updated, r.unchanged), (1, 1));
        let w = fx.writes();
        assert_eq!(
            maps_written(&w),
            ["backends", "backends", "backends", "services"]
        );

        // Shrinking: the count first, then the slots beyond it go.
        let mut shrunk = grown.clone();
        shrunk.insert(fe(1, 80), state(&[4]));
        m.apply(&shrunk);
        let w = fx.writes();
        assert_eq!(
            maps_written(&w),
            ["services", "backends", "backends", "backends"]
        );
        assert!(matches!(&w[2], Write::Remove(..)) && matches!(&w[3], Write::Remove(..)));

        // A removed frontend takes its slots with it.
        shrunk.remove(&fe(2, 80));
        let (r, _) = m.apply(&shrunk);
        assert_eq!(r.removed, 1);
        let w = fx.writes();
        assert!(w.iter().all(|w| matches!(w, Write::Remove(..))), "{w:?}");
        assert_eq!((m.len(), m.backend_count()), (1, 1));
    }

    #[test]
    fn a_full_map_fails_one_frontend_names_the_flag_and_leaves_no_slots() {
        let fx = Fixture::new();
        let limits = Limits {
            max_services: 2,
            max_backends: 10,
        };
        let mut m = fx.open(limits);
        let desired: Desired = (1..=3).map(|i| (fe(i, 80), state(&[i]))).collect();
        let (r, errors) = m.apply(&desired);
        assert_eq!((r.added, r.failed), (2, 1));
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(msg.contains("--max-services"), "{msg}");
        assert_eq!(
            m.backend_count(),
            2,
            "the failed frontend's slot was removed"
        );
        let w = fx.writes();
        let slots_in = w
            .iter()
            .filter(|w| matches!(w, Write::Insert("backends", _)))
            .count();
        let slots_out = w
            .iter()
            .filter(|w| matches!(w, Write::Remove("backends", _)))
            .count();
        assert_eq!((slots_in, slots_out), (3, 1), "{w:?}");
    }

    #[test]
    fn a_restart_reads_back_removes_stale_slots_and_rewrites_a_torn_update() {
        let mut fx = Fixture::new();
        let mut before = fx.open(Limits::default());
        let desired: Desired = [(fe(1, 80), state(&[1, 2])), (fe(2, 443), state(&[3]))].into();
        before.apply(&desired);
        let ids: BTreeMap<Frontend, u32> = before.current.iter().map(|(f, p)| (*f, p.id)).collect();
        // What the kernel would hold after a crash: the maps as written, plus a slot written
        // ahead of a count that never came (service 2's slot 1), and a set with no frontend.
        fx.services = [(1, 2), (2, 1)]
            .iter()
            .map(|&(i, n)| {
                let f = fe(i, if i == 1 { 80 } else { 443 });
                let v = ServiceValue {
                    id: ids[&f],
                    count: n,
                    local_count: n,
                    ..ServiceValue::default()
                };
                (service_key(&f), v)
            })
            .collect();
        let slot = |service, slot, b: u8| {
            (
                BackendKey { service, slot },
                backend(&BackendAddr {
                    addr: [10, 244, 0, b].into(),
                    port: 8080,
                }),
            )
        };
        let (a, b) = (ids[&fe(1, 80)], ids[&fe(2, 443)]);
        // Frontend 1 lost slot 1 (torn); frontend 2 has a slot ahead of its count; id 99 is stale.
        fx.backends = vec![slot(a, 0, 1), slot(b, 0, 3), slot(b, 1, 9), slot(99, 0, 7)];
        fx.writes();
        let mut after = fx.open(Limits::default());
        let w = fx.writes();
        assert_eq!(
            w.iter().filter(|w| matches!(w, Write::Remove(..))).count(),
            2,
            "the slot ahead of its count and the stale set's: {w:?}"
        );
        let (r, errors) = after.apply(&desired);
        assert!(errors.is_empty());
        assert_eq!(
            (r.updated, r.unchanged),
            (1, 1),
            "the torn frontend is rewritten, the whole one left"
        );
        assert_eq!(after.backend_count(), 3);
        assert_eq!(after.current[&fe(1, 80)].id, a, "ids survive the restart");
    }
}
