//! Prometheus metrics of the agent and the datapath, served as text on `GET /metrics`.
//!
//! Agent side: frontends and backend slots programmed, synchronisations by result, changes by
//! operation, objects skipped, frontends that could not be programmed, and
//! `weft_proxy_network_programming_duration_seconds` (time to recompute the desired state and
//! program the difference, in the spirit of kube-proxy's metric of that name). Datapath side:
//! `weft_proxy_drops_total{reason}`, summed over CPUs from the kernel's drop counters at each
//! scrape.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
};

use aya::maps::{Map, MapData, PerCpuArray};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use weft_proxy_common::{DropReason, names};

use crate::{Error, Result, agent::SyncReport, bpffs::PinLayout};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabel {
    what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    services: Gauge,
    backends: Gauge,
    skipped: Gauge,
    syncs: Family<ResultLabel, Counter>,
    changes: Family<OpLabel, Counter>,
    recomputed: Family<WhatLabel, Counter>,
    errors: Counter,
    programming: Histogram,
    drops: Family<ReasonLabel, Counter>,
    drops_seen: Mutex<[u64; DropReason::ALL.len()]>,
    verdicts: Family<VerdictLabel, Counter>,
    verdicts_seen: Mutex<[u64; 4]>,
    layout: PinLayout,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    direction: &'static str,
    verdict: &'static str,
}

/// The (direction, verdict) of each `WEFT_POL_VERDICTS` slot.
const VERDICT_SLOTS: [(&str, &str); 4] = [
    ("ingress", "allowed"),
    ("ingress", "denied"),
    ("egress", "allowed"),
    ("egress", "denied"),
];

/// Adds to monotone counters what the kernel counted since the last look.
fn add_deltas(now: &[u64], seen: &mut [u64], mut inc: impl FnMut(usize, u64)) {
    for (i, (n, s)) in now.iter().zip(seen.iter_mut()).enumerate() {
        inc(i, n.saturating_sub(*s));
        *s = (*s).max(*n);
    }
}

impl Metrics {
    /// Metrics reading the datapath's pinned maps under `layout`.
    pub fn new(layout: PinLayout) -> Self {
        let mut registry = Registry::with_prefix("weft_proxy");
        let services = Gauge::default();
        let backends = Gauge::default();
        let skipped = Gauge::default();
        let syncs = Family::<ResultLabel, Counter>::default();
        let changes = Family::<OpLabel, Counter>::default();
        let recomputed = Family::<WhatLabel, Counter>::default();
        let errors = Counter::default();
        let programming = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        let drops = Family::<ReasonLabel, Counter>::default();
        let verdicts = Family::<VerdictLabel, Counter>::default();
        registry.register("services", "Service frontends programmed", services.clone());
        registry.register(
            "backends",
            "Backend slots programmed over all frontends",
            backends.clone(),
        );
        registry.register(
            "skipped_objects",
            "Objects skipped as invalid in the last synchronisation",
            skipped.clone(),
        );
        registry.register(
            "syncs",
            "Synchronisations of the desired state, by result",
            syncs.clone(),
        );
        registry.register(
            "frontend_changes",
            "Frontends added, updated or removed",
            changes.clone(),
        );
        registry.register(
            "policy_recomputed",
            "NetworkPolicy work done by synchronisations: policies compiled and pods whose rules were computed again",
            recomputed.clone(),
        );
        registry.register(
            "programming_errors",
            "Frontends that could not be programmed",
            errors.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "Time to compute the desired state and program the difference",
            programming.clone(),
        );
        registry.register(
            "drops",
            "Connections refused or packets dropped by the datapath, by reason",
            drops.clone(),
        );
        registry.register(
            "policy_verdicts",
            "NetworkPolicy verdicts on new connections, by direction and verdict",
            verdicts.clone(),
        );
        Self {
            registry,
            services,
            backends,
            skipped,
            syncs,
            changes,
            recomputed,
            errors,
            programming,
            drops,
            drops_seen: Mutex::new([0; DropReason::ALL.len()]),
            verdicts,
            verdicts_seen: Mutex::new([0; 4]),
            layout,
        }
    }

    /// Records one synchronisation and the resulting totals.
    pub fn record_sync(&self, report: &SyncReport, services: usize, backends: usize) {
        self.syncs
            .get_or_create(&ResultLabel {
                result: if report.errors.is_empty() {
                    "ok"
                } else {
                    "partial"
                },
            })
            .inc();
        for (op, n) in [
            ("added", report.applied.added),
            ("updated", report.applied.updated),
            ("removed", report.applied.removed),
        ] {
            self.changes.get_or_create(&OpLabel { op }).inc_by(n as u64);
        }
        for (what, n) in [
            ("policies", report.policy_work.policies),
            ("endpoints", report.policy_work.endpoints),
        ] {
            self.recomputed
                .get_or_create(&WhatLabel { what })
                .inc_by(n as u64);
        }
        self.errors.inc_by(report.errors.len() as u64);
        self.skipped.set(report.problems.len() as i64);
        self.services.set(services as i64);
        self.backends.set(backends as i64);
        self.programming.observe(report.micros as f64 / 1e6);
    }

    /// Records a synchronisation that failed as a whole.
    pub fn record_failure(&self) {
        self.syncs
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
    }

    /// The kernel's drop counters, summed over CPUs, in [`DropReason::ALL`] order.
    pub fn kernel_drops(layout: &PinLayout) -> Result<[u64; DropReason::ALL.len()]> {
        Self::per_cpu_sums(layout, names::MAP_DROPS)
    }

    /// The slots of a pinned per-CPU counter array, summed over CPUs.
    fn per_cpu_sums<const N: usize>(layout: &PinLayout, name: &'static str) -> Result<[u64; N]> {
        let path = layout.map(name);
        let map_err = |source| Error::Map {
            name: name.into(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(map_err)?;
        let arr: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err)?;
        let mut out = [0; N];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0).map_err(map_err)?.iter().sum();
        }
        Ok(out)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        if let Ok(now) = Self::kernel_drops(&self.layout) {
            let mut seen = self.drops_seen.lock().expect("drops lock");
            add_deltas(&now, &mut *seen, |i, d| {
                self.drops
                    .get_or_create(&ReasonLabel {
                        reason: DropReason::ALL[i].as_str(),
                    })
                    .inc_by(d);
            });
        }
        if let Ok(now) = Self::per_cpu_sums::<4>(&self.layout, names::MAP_POLICY_VERDICTS) {
            let mut seen = self.verdicts_seen.lock().expect("verdicts lock");
            add_deltas(&now, &mut *seen, |i, d| {
                let (direction, verdict) = VERDICT_SLOTS[i];
                self.verdicts
                    .get_or_create(&VerdictLabel { direction, verdict })
                    .inc_by(d);
            });
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Serves `GET /metrics` on `addr` from a background thread.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr> {
        let listener = TcpListener::bind(addr).map_err(|source| Error::Io {
            op: "listening for metrics on",
            path: addr.to_string().into(),
            source,
        })?;
        let bound = listener.local_addr().map_err(|source| Error::Io {
            op: "metrics",
            path: addr.to_string().into(),
            source,
        })?;
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let response = if request.starts_with("GET /metrics") {
                    let body = me.render();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = s.write_all(response.as_bytes());
            }
        });
        Ok(bound)
    }
}
