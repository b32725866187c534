//! The long-running agent in standalone mode: attach the socket load balancer, then keep the
//! service maps in line with a directory of manifests.

use std::path::PathBuf;

use aya::programs::TcAttachType;
use serde::Serialize;
use weft_proxy_common::names;

use crate::{
    Error, Result,
    bpffs::PinLayout,
    manifests, model,
    services::{ApplyReport, Limits, ServiceMaps},
    socklb, tcx,
};

/// What the agent serves and where.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory of Kubernetes YAML.
    pub manifests: PathBuf,
    /// This node's name (for NodePort addresses).
    pub node_name: String,
    /// cgroup2 directory the socket load balancer is attached to.
    pub cgroup: PathBuf,
    /// bpffs layout.
    pub layout: PinLayout,
    /// Map sizes.
    pub limits: Limits,
    /// External interfaces on which NodePort/externalIP traffic from outside the node is
    /// translated per packet (tcx).
    pub nodeport_ifaces: Vec<String>,
}

/// One synchronisation.
#[derive(Clone, Debug, Serialize)]
pub struct SyncReport {
    /// Frontends desired.
    pub frontends: usize,
    /// What changed in the maps.
    pub applied: ApplyReport,
    /// Objects skipped, as `object: reason`.
    pub problems: Vec<String>,
    /// Frontends that could not be programmed.
    pub errors: Vec<String>,
    /// How long computing and programming took, in microseconds.
    pub micros: u128,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    maps: ServiceMaps,
    last: Option<Vec<(PathBuf, u64, Option<std::time::SystemTime>)>>,
}

impl Agent {
    /// Loads the programs, attaches them to the cgroup (or upgrades them in place) and opens the
    /// maps with what they hold, so the first [`Agent::sync`] removes anything stale.
    pub fn start(config: Config) -> Result<Self> {
        let mut ebpf = crate::object::load(&config.layout, &config.limits)?;
        socklb::attach(&mut ebpf, &config.layout, &config.cgroup)?;
        for iface in &config.nodeport_ifaces {
            let index = tcx::ifindex(iface)?;
            for (attach_type, prog, dir) in [
                (
                    TcAttachType::Ingress,
                    names::PROG_NODEPORT_INGRESS,
                    "ingress",
                ),
                (TcAttachType::Egress, names::PROG_NODEPORT_EGRESS, "egress"),
            ] {
                let pin = config.layout.link(&format!("nodeport-{index}-{dir}"));
                tcx::attach_pinned(&mut ebpf, prog, iface, attach_type, &pin)?;
            }
            tracing::info!(interface = iface, "per-packet service translation attached");
        }
        // The links and maps are pinned; the loader object is no longer needed.
        drop(ebpf);
        let maps = ServiceMaps::open(&config.layout, config.limits)?;
        Ok(Self {
            config,
            maps,
            last: None,
        })
    }

    /// Frontends and backend slots programmed.
    pub fn totals(&self) -> (usize, usize) {
        (self.maps.len(), self.maps.backend_count())
    }

    /// Re-reads the manifests if they changed (or `force`) and programs the difference.
    pub fn sync(&mut self, force: bool) -> Result<Option<SyncReport>> {
        let seen = manifests::fingerprint(&self.config.manifests);
        if !force && self.last.as_ref() == Some(&seen) {
            return Ok(None);
        }
        let t0 = std::time::Instant::now();
        let (objects, mut problems) =
            manifests::load_dir(&self.config.manifests).map_err(|source| Error::Io {
                op: "reading manifests in",
                path: self.config.manifests.clone(),
                source,
            })?;
        let (desired, more) = model::desired(&objects, &self.config.node_name);
        problems.extend(more);
        let (applied, errors) = self.maps.apply(&desired);
        self.last = Some(seen);
        Ok(Some(SyncReport {
            frontends: desired.len(),
            applied,
            problems: problems
                .iter()
                .map(|p| format!("{}: {}", p.object, p.reason))
                .collect(),
            errors: errors.iter().map(ToString::to_string).collect(),
            micros: t0.elapsed().as_micros(),
        }))
    }
}
