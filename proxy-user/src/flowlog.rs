//! Policy flow events: reading the kernel's `WEFT_POL_EVENTS` ring buffer, naming the deciding
//! policy, filtering and formatting, for `weft-proxy flows observe` (in the spirit of
//! `hubble observe`).

use std::net::Ipv4Addr;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use serde::Serialize;
use weft_proxy_common::{
    POLICY_DEFAULT_DENY, POLICY_DIR_INGRESS, POLICY_NOT_ISOLATED, POLICY_PENDING, PolicyEvent,
    PolicyName, VERDICT_ALLOW, names,
};

use crate::{Error, Result, bpffs::PinLayout};

/// One verdict, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Kernel monotonic time, ns.
    pub time_ns: u64,
    /// Source address.
    pub src: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Destination port.
    pub dport: u16,
    /// `tcp`, `udp`, `sctp`, `icmp` or the protocol number.
    pub proto: String,
    /// The pod whose policy decided.
    pub pod: Ipv4Addr,
    /// `ingress` or `egress` (of that pod).
    pub direction: &'static str,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    /// `policy ns/name`, `not isolated` or `default deny`.
    pub reason: String,
}

/// Which flows to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only `allowed` or `denied`.
    pub verdict: Option<String>,
    /// Only flows from or to this address.
    pub ip: Option<Ipv4Addr>,
    /// Only this destination port.
    pub port: Option<u16>,
}

impl Filter {
    /// Whether `f` passes.
    pub fn matches(&self, f: &Flow) -> bool {
        self.verdict.as_deref().is_none_or(|v| v == f.verdict)
            && self.ip.is_none_or(|ip| f.src == ip || f.dst == ip)
            && self.port.is_none_or(|p| f.dport == p)
    }
}

/// A reader of the pinned event ring.
pub struct Observer {
    ring: RingBuf<MapData>,
    names: BpfHashMap<MapData, u32, PolicyName>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

fn map(layout: &PinLayout, name: &'static str) -> Result<MapData> {
    MapData::from_pin(layout.map(name)).map_err(|source| Error::Map {
        name: name.to_string(),
        source,
    })
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

impl Observer {
    /// Opens the pinned ring (the agent must have run once).
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let err = |name: &'static str| {
            move |source| Error::Map {
                name: name.to_string(),
                source,
            }
        };
        let ring = RingBuf::try_from(Map::RingBuf(map(layout, names::MAP_POLICY_EVENTS)?))
            .map_err(err(names::MAP_POLICY_EVENTS))?;
        let names_map = BpfHashMap::try_from(Map::HashMap(map(layout, names::MAP_POLICY_NAMES)?))
            .map_err(err(names::MAP_POLICY_NAMES))?;
        Ok(Observer {
            ring,
            names: names_map,
        })
    }

    fn decode(&self, e: &PolicyEvent) -> Flow {
        let ip = |b: u32| Ipv4Addr::from(u32::from_be(b));
        let reason = match e.policy {
            POLICY_NOT_ISOLATED => "not isolated".to_string(),
            POLICY_DEFAULT_DENY => "default deny".to_string(),
            POLICY_PENDING => "pending (not yet known to the agent)".to_string(),
            idx => match self.names.get(&idx, 0) {
                Ok(n) => {
                    let len = n.0.iter().position(|b| *b == 0).unwrap_or(n.0.len());
                    format!("policy {}", String::from_utf8_lossy(&n.0[..len]))
                }
                Err(_) => format!("policy #{idx}"),
            },
        };
        Flow {
            time_ns: e.time_ns,
            src: ip(e.flow.src.0),
            sport: u16::from_be(e.flow.sport.0),
            dst: ip(e.flow.dst.0),
            dport: u16::from_be(e.flow.dport.0),
            proto: proto_name(e.flow.proto),
            pod: Ipv4Addr::from(e.endpoint),
            direction: if e.direction == POLICY_DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            verdict: if e.verdict == VERDICT_ALLOW {
                "allowed"
            } else {
                "denied"
            },
            reason,
        }
    }

    /// Every event waiting in the ring, oldest first.
    pub fn drain(&mut self) -> Vec<Flow> {
        let mut raw = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<PolicyEvent>() {
                // SAFETY: the kernel wrote a whole PolicyEvent (length checked); it is read
                // unaligned into a plain-integer struct.
                raw.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PolicyEvent>()) });
            }
        }
        raw.iter().map(|e| self.decode(e)).collect()
    }
}

/// One line of `flows observe`.
pub fn render(f: &Flow) -> String {
    format!(
        "{:>14.6} {:<21} -> {:<21} {:<4} {:<7} of {:<15} {:<7} {}",
        f.time_ns as f64 / 1e9,
        format!("{}:{}", f.src, f.sport),
        format!("{}:{}", f.dst, f.dport),
        f.proto,
        f.direction,
        f.pod,
        f.verdict.to_uppercase(),
        f.reason
    )
}
