//! Per-interface packet and byte counters: tcx programs on an interface's ingress and egress that
//! count into a pinned per-CPU map.
//!
//! Attachments are pinned links, so they keep counting after `weft-proxy` exits; attaching again
//! atomically swaps in the current program (an upgrade), and detaching removes the pins and the
//! interface's counter entries.

use std::io;

use aya::{
    maps::{MapData, PerCpuHashMap},
    programs::TcAttachType,
};
use serde::Serialize;
use weft_proxy_common::{Direction, IfaceDirKey, PacketCounter, names};

use crate::{
    Error, Result,
    bpffs::{PinLayout, remove_pin, unpin_and_detach},
    object, tcx,
};

const DIRECTIONS: [(Direction, TcAttachType, &str); 2] = [
    (
        Direction::Ingress,
        TcAttachType::Ingress,
        names::PROG_COUNT_INGRESS,
    ),
    (
        Direction::Egress,
        TcAttachType::Egress,
        names::PROG_COUNT_EGRESS,
    ),
];

/// One row of counters as the kernel holds them (summed over CPUs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IfaceCounters {
    /// Interface index in the network namespace the programs are attached in.
    pub ifindex: u32,
    /// Interface name, if an interface with that index exists in the current namespace.
    pub interface: Option<String>,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

fn link_name(ifindex: u32, direction: Direction) -> String {
    format!("count-{ifindex}-{}", direction.as_str())
}

/// Attaches the counting programs to both directions of `ifname` and pins the links. Idempotent:
/// attaching to an interface that already counts replaces the program in place.
pub fn attach(layout: &PinLayout, ifname: &str) -> Result<()> {
    let index = tcx::ifindex(ifname)?;
    let mut ebpf = object::load(layout, &crate::services::Limits::default())?;
    for (direction, attach_type, prog_name) in DIRECTIONS {
        let pin = layout.link(&link_name(index, direction));
        tcx::attach_pinned(&mut ebpf, prog_name, ifname, attach_type, &pin)?;
        tracing::info!(
            interface = ifname,
            ifindex = index,
            direction = direction.as_str(),
            "counter attached"
        );
    }
    Ok(())
}

/// Detaches the counters from `ifname` (removes the pinned links) and drops its counter entries.
/// Idempotent: detaching an interface that does not count succeeds.
pub fn detach(layout: &PinLayout, ifname: &str) -> Result<()> {
    detach_index(layout, tcx::ifindex(ifname)?)
}

/// Like [`detach`], by interface index (works after the interface is gone).
pub fn detach_index(layout: &PinLayout, index: u32) -> Result<()> {
    for (direction, _, _) in DIRECTIONS {
        unpin_and_detach(&layout.link(&link_name(index, direction)))?;
    }
    // Every program has stopped by now, so nothing re-creates the entries removed below.
    if let Some(mut map) = open_map(layout)? {
        for (direction, _, _) in DIRECTIONS {
            let key = IfaceDirKey {
                ifindex: index,
                direction: direction as u32,
            };
            match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(Error::Map {
                        name: names::MAP_IFACE_COUNTERS.into(),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Detaches the counters from every interface and removes the counter map's pin.
pub fn detach_all(layout: &PinLayout) -> Result<()> {
    let links = layout.links_dir();
    let entries = match std::fs::read_dir(&links) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                op: "reading",
                path: links,
                source,
            });
        }
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("count-") {
            unpin_and_detach(&entry.path())?;
        }
    }
    remove_pin(&layout.map(names::MAP_IFACE_COUNTERS))
}

fn open_map(
    layout: &PinLayout,
) -> Result<Option<PerCpuHashMap<MapData, IfaceDirKey, PacketCounter>>> {
    let path = layout.map(names::MAP_IFACE_COUNTERS);
    if !path.exists() {
        return Ok(None);
    }
    let map_err = |source| Error::Map {
        name: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let map = aya::maps::Map::PerCpuHashMap(data);
    Ok(Some(PerCpuHashMap::try_from(map).map_err(map_err)?))
}

/// Reads every counter row, summed over CPUs, sorted by interface and direction. Empty when
/// nothing was ever attached under this layout.
pub fn read(layout: &PinLayout) -> Result<Vec<IfaceCounters>> {
    let Some(map) = open_map(layout)? else {
        return Ok(Vec::new());
    };
    let names: Vec<(u32, String)> = nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::new();
    for item in map.iter() {
        let (key, per_cpu) = item.map_err(|source| Error::Map {
            name: names::MAP_IFACE_COUNTERS.into(),
            source,
        })?;
        let Some(direction) = Direction::from_raw(key.direction) else {
            continue;
        };
        let total = per_cpu
            .iter()
            .fold(PacketCounter::default(), |acc, c| acc.saturating_add(*c));
        rows.push(IfaceCounters {
            ifindex: key.ifindex,
            interface: names
                .iter()
                .find(|(i, _)| *i == key.ifindex)
                .map(|(_, n)| n.clone()),
            direction: direction.as_str(),
            packets: total.packets,
            bytes: total.bytes,
        });
    }
    rows.sort_by(|a, b| (a.ifindex, a.direction).cmp(&(b.ifindex, b.direction)));
    Ok(rows)
}

/// Renders rows as an aligned text table.
pub fn render_table(rows: &[IfaceCounters]) -> String {
    let mut out = format!(
        "{:<8} {:<16} {:<9} {:>12} {:>14}\n",
        "IFINDEX", "INTERFACE", "DIRECTION", "PACKETS", "BYTES"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<8} {:<16} {:<9} {:>12} {:>14}\n",
            r.ifindex,
            r.interface.as_deref().unwrap_or("-"),
            r.direction,
            r.packets,
            r.bytes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_header_and_a_row_per_counter() {
        let rows = vec![IfaceCounters {
            ifindex: 4,
            interface: Some("veth0".into()),
            direction: "ingress",
            packets: 3,
            bytes: 294,
        }];
        let table = render_table(&rows);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[1].contains("veth0") && lines[1].contains("294"),
            "{table}"
        );
    }

    #[test]
    fn link_names_are_per_interface_and_direction() {
        assert_eq!(link_name(7, Direction::Egress), "count-7-egress");
    }
}
