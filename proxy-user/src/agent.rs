//! The long-running agent: attach the socket load balancer, then keep the service maps and the
//! NetworkPolicy maps in line with the desired state (a directory of manifests, or the
//! Kubernetes API), and the policy programs attached to every pod-facing interface.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use aya::programs::TcAttachType;
use serde::Serialize;
use weft_proxy_common::{Be32, NodeConfig, names};

use crate::{
    Error, Result,
    bpffs::PinLayout,
    kube_source::KubeSource,
    manifests, model,
    policy::engine::{Engine, Work},
    policymap::{PolicyMaps, PolicyReport},
    services::{ApplyReport, Limits, ServiceMaps},
    socklb, tcx,
};

/// Where desired state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// Standalone: a directory of Kubernetes YAML, watched for changes.
    Manifests(PathBuf),
    /// A Kubernetes API server (kube-apiserver or weft's own).
    Kubernetes(Box<kube::Config>),
}

impl std::fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Manifests(dir) => write!(f, "manifests in {}", dir.display()),
            Self::Kubernetes(c) => write!(f, "the Kubernetes API at {}", c.cluster_url),
        }
    }
}

/// The running source.
#[derive(Debug)]
enum Source {
    Manifests(PathBuf),
    Kubernetes(Box<KubeSource>),
}

/// What the source looked like at the last synchronisation.
#[derive(Debug, PartialEq)]
enum Seen {
    Files(Vec<(PathBuf, u64, Option<std::time::SystemTime>)>),
    Generation(u64),
}

/// What the agent serves and where.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where desired state comes from.
    pub source: SourceConfig,
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
    /// Name prefixes of pods' host-side interfaces, where NetworkPolicy is enforced.
    pub policy_iface_prefixes: Vec<String>,
    /// The address flows from outside to remote backends leave this node with (default: the
    /// Node's InternalIP); `0.0.0.0` to use only this node's backends on the TC path.
    pub snat_addr: Option<std::net::Ipv4Addr>,
    /// Source ports for those flows (keep them outside `ip_local_port_range`).
    pub snat_ports: (u16, u16),
    /// Socket-level load balancing for the cgroup's processes; when off, pods' service traffic
    /// is translated per packet on their host-side interfaces instead.
    pub socket_lb: bool,
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
    /// What changed in the NetworkPolicy maps.
    pub policy: PolicyReport,
    /// How much of the NetworkPolicy state was computed again.
    pub policy_work: Work,
    /// How long computing and programming took, in microseconds.
    pub micros: u128,
}

/// The loaded eBPF object, kept to attach policy programs to interfaces that appear later.
struct Loaded(aya::Ebpf);

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ebpf")
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    maps: ServiceMaps,
    policy: PolicyMaps,
    engine: Engine,
    policy_synced: bool,
    /// UDP (frontend, backend) pairs as last programmed.
    udp_pairs: crate::services::UdpPairs,
    ebpf: Loaded,
    attached: HashSet<String>,
    source: Source,
    last: Option<Seen>,
}

impl Agent {
    /// Loads the programs, attaches them to the cgroup (or upgrades them in place) and opens the
    /// maps with what they hold, so the first [`Agent::sync`] removes anything stale.
    pub fn start(config: Config) -> Result<Self> {
        let mut ebpf = crate::object::load(&config.layout, &config.limits)?;
        if config.socket_lb {
            socklb::attach(&mut ebpf, &config.layout, &config.cgroup)?;
        } else {
            // Turned off since an earlier run: take the hooks away.
            let _ = socklb::detach(&config.layout, &config.cgroup);
        }
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
        tcx::pin_programs(
            &mut ebpf,
            &[names::PROG_POLICY_FROM_POD, names::PROG_POLICY_TO_POD],
            &config.layout,
        )?;
        let maps = ServiceMaps::open(&config.layout, config.limits)?;
        let policy = PolicyMaps::open(&config.layout)?;
        let source = match &config.source {
            SourceConfig::Manifests(dir) => Source::Manifests(dir.clone()),
            SourceConfig::Kubernetes(c) => Source::Kubernetes(Box::new(
                KubeSource::start((**c).clone()).map_err(|e| Error::Source(e.to_string()))?,
            )),
        };
        let mut agent = Self {
            source,
            engine: Engine::new(),
            policy_synced: false,
            // What an earlier run left programmed, so backends that left while the agent was
            // down count as departed too.
            udp_pairs: maps.udp_pairs(),
            config,
            maps,
            policy,
            ebpf: Loaded(ebpf),
            attached: HashSet::new(),
            last: None,
        };
        agent.attach_policy()?;
        Ok(agent)
    }

    /// Attaches the policy programs to pod-facing interfaces that do not have them yet.
    fn attach_policy(&mut self) -> Result<()> {
        // if_nameindex(3) asks the kernel about this network namespace (/sys/class/net shows
        // the namespace sysfs was mounted in, which need not be ours).
        let Ok(interfaces) = nix::net::if_::if_nameindex() else {
            return Ok(());
        };
        let present: HashSet<String> = interfaces
            .iter()
            .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
            .filter(|n| {
                self.config
                    .policy_iface_prefixes
                    .iter()
                    .any(|p| !p.is_empty() && n.starts_with(p.as_str()))
            })
            .collect();
        self.attached.retain(|n| present.contains(n));
        // Links of interfaces that are gone (a pod deleted) leave their pins behind.
        if let Ok(pins) = std::fs::read_dir(self.config.layout.links_dir()) {
            for pin in pins.flatten() {
                let name = pin.file_name().to_string_lossy().into_owned();
                let Some(index) = name
                    .strip_prefix("policy-")
                    .or_else(|| name.strip_prefix("svc-"))
                    .and_then(|r| r.split('-').next())
                    .and_then(|i| i.parse::<u32>().ok())
                else {
                    continue;
                };
                if nix::net::if_::if_indextoname(index).is_err() {
                    let _ = crate::bpffs::remove_pin(&pin.path());
                }
            }
        }
        for iface in present {
            if self.attached.contains(&iface) {
                continue;
            }
            let index = tcx::ifindex(&iface)?;
            for (attach_type, prog, ingress) in [
                (TcAttachType::Ingress, names::PROG_POLICY_FROM_POD, true),
                (TcAttachType::Egress, names::PROG_POLICY_TO_POD, false),
            ] {
                let pin = self.config.layout.policy_link(index, ingress);
                tcx::attach_pinned(&mut self.ebpf.0, prog, &iface, attach_type, &pin)?;
            }
            if !self.config.socket_lb {
                // Service translation first on the way out of the pod (policy then sees the
                // backend), reverse translation last on the way in (after policy has matched the
                // reply to its connection).
                for (attach_type, prog, dir, order) in [
                    (
                        TcAttachType::Ingress,
                        names::PROG_SERVICE_FROM_POD,
                        "from-pod",
                        tcx::Order::First,
                    ),
                    (
                        TcAttachType::Egress,
                        names::PROG_NODEPORT_EGRESS,
                        "to-pod",
                        tcx::Order::Last,
                    ),
                ] {
                    let pin = self.config.layout.link(&format!("svc-{index}-{dir}"));
                    tcx::attach_pinned_at(
                        &mut self.ebpf.0,
                        prog,
                        &iface,
                        attach_type,
                        &pin,
                        order,
                    )?;
                }
            }
            tracing::info!(interface = iface, "policy enforcement attached");
            self.attached.insert(iface);
        }
        Ok(())
    }

    /// Frontends and backend slots programmed.
    pub fn totals(&self) -> (usize, usize) {
        (self.maps.len(), self.maps.backend_count())
    }

    /// Waits up to `timeout` for the source to change (the Kubernetes API wakes it at once;
    /// a manifests directory is looked at again after `timeout`).
    pub fn wait(&self, timeout: std::time::Duration) {
        match &self.source {
            Source::Manifests(_) => std::thread::sleep(timeout),
            Source::Kubernetes(k) => {
                let seen = match self.last {
                    Some(Seen::Generation(g)) => Some(g),
                    _ => None,
                };
                k.wait_for_change(seen, timeout);
            }
        }
    }

    /// Re-reads the desired state if it changed (or `force`) and programs the difference.
    /// Returns `None` when nothing changed, and also while the Kubernetes API has not been
    /// listed completely yet (the datapath keeps what it has).
    pub fn sync(&mut self, force: bool) -> Result<Option<SyncReport>> {
        self.attach_policy()?;
        let seen = match &self.source {
            Source::Manifests(dir) => Seen::Files(manifests::fingerprint(dir)),
            Source::Kubernetes(k) => match k.generation() {
                Some(g) => Seen::Generation(g),
                None => return Ok(None),
            },
        };
        if !force && self.last.as_ref() == Some(&seen) {
            return Ok(None);
        }
        let t0 = std::time::Instant::now();
        let (objects, mut problems) = match &self.source {
            Source::Manifests(dir) => manifests::load_dir(dir).map_err(|source| Error::Io {
                op: "reading manifests in",
                path: dir.clone(),
                source,
            })?,
            Source::Kubernetes(k) => (k.snapshot(), Vec::new()),
        };
        let (desired, more) = model::desired(&objects, &self.config.node_name);
        problems.extend(more);
        let snat = self
            .config
            .snat_addr
            .or_else(|| model::node_snat_addr(&objects, &self.config.node_name))
            .filter(|a| !a.is_unspecified());
        let (lo, hi) = self.config.snat_ports;
        let node = NodeConfig {
            snat_addr: Be32(snat.map_or(0, |a| u32::from(a).to_be())),
            snat_port_min: lo,
            snat_port_count: hi.saturating_sub(lo).saturating_add(1),
        };
        if self.maps.set_node_config(node)? {
            tracing::info!(snat = ?snat, ports = ?(lo, hi), "remote backends from outside the node leave from this address");
        }
        let (applied, errors) = self.maps.apply(&desired);
        // Connected UDP sockets of departed backends would keep sending into the void.
        let udp_now = crate::services::udp_pairs(&desired);
        let gone: crate::services::UdpPairs =
            self.udp_pairs.difference(&udp_now).copied().collect();
        self.udp_pairs = udp_now;
        match socklb::terminate_udp(&self.config.layout, &self.config.cgroup, &gone) {
            Ok(0) => {}
            Ok(n) => tracing::info!(sockets = n, "UDP sockets of departed backends terminated"),
            Err(e) => tracing::warn!(error = %e, "terminating UDP sockets of departed backends"),
        }
        let local: BTreeSet<std::net::Ipv4Addr> = objects
            .pods
            .iter()
            .filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                    == Some(self.config.node_name.as_str())
            })
            .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
            .collect();
        let podnets: Vec<ipnet::Ipv4Net> = objects
            .nodes
            .iter()
            .filter(|n| n.metadata.name.as_deref() == Some(self.config.node_name.as_str()))
            .filter_map(|n| n.spec.as_ref())
            .flat_map(|s| {
                s.pod_cidrs
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .chain(s.pod_cidr.clone())
            })
            .filter_map(|c| c.parse().ok())
            .collect();
        let (touched, policy_work, more) = self.engine.update(
            &objects.network_policies,
            &objects.namespaces,
            &objects.pods,
            &local,
            &podnets,
        );
        problems.extend(more);
        // The first time, and after a failed write, compare everything with the kernel (it
        // may hold what an earlier run wrote); afterwards only what the change touched.
        let written = if self.policy_synced {
            self.policy.apply_touched(self.engine.desired(), &touched)
        } else {
            self.policy.apply(self.engine.desired())
        };
        self.policy_synced = written.is_ok();
        let policy = written?;
        self.last = Some(seen);
        Ok(Some(SyncReport {
            frontends: desired.len(),
            applied,
            problems: problems
                .iter()
                .map(|p| format!("{}: {}", p.object, p.reason))
                .collect(),
            errors: errors.iter().map(ToString::to_string).collect(),
            policy,
            policy_work,
            micros: t0.elapsed().as_micros(),
        }))
    }
}
