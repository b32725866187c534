//! The long-running agent: attach the socket load balancer, then keep the service maps and the
//! NetworkPolicy maps in line with the desired state (a directory of manifests, or the
//! Kubernetes API), and the policy programs attached to every pod-facing interface.
//!
//! Two halves: [`Reconciler`] turns what a [`Source`] holds into map contents, over the map seam
//! ([`crate::maps`]), with no kernel of its own, so it is unit-tested with in-memory maps and
//! objects; [`Agent`] adds the programs and their attachments. [`Agent::reconcile`] is one turn
//! of the loop: it says what to do next, waiting for a change after a success and backing off
//! after a failure ([`Backoff`]), as kube-rs's `Controller` with an error policy does.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::time::Duration;

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

/// What a source looked like at a synchronisation, to tell whether it changed since.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    /// A manifests directory's files: (path, length, modification time).
    Files(Vec<(PathBuf, u64, Option<std::time::SystemTime>)>),
    /// The Kubernetes API's change counter.
    Generation(u64),
}

/// Where desired state comes from, as the reconciler reads it: the seam between reconciliation
/// and the world (a manifests directory or the Kubernetes API; tests use objects in memory).
pub trait Source: Send + std::fmt::Debug {
    /// What the source looks like now; `None` while it is not ready (the Kubernetes API not
    /// listed completely yet), when the datapath keeps what it has.
    fn seen(&self) -> Option<Seen>;
    /// The objects now, and the problems met reading them.
    fn objects(&self) -> Result<(model::Objects, Vec<model::Problem>)>;
    /// Waits up to `timeout` for a change since `seen`.
    fn wait(&self, seen: Option<&Seen>, timeout: Duration);
}

/// A directory of manifests, read again when its files change.
#[derive(Debug)]
pub struct ManifestDir(pub PathBuf);

impl Source for ManifestDir {
    fn seen(&self) -> Option<Seen> {
        Some(Seen::Files(manifests::fingerprint(&self.0)))
    }
    fn objects(&self) -> Result<(model::Objects, Vec<model::Problem>)> {
        manifests::load_dir(&self.0).map_err(|source| Error::Io {
            op: "reading manifests in",
            path: self.0.clone(),
            source,
        })
    }
    fn wait(&self, _: Option<&Seen>, timeout: Duration) {
        std::thread::sleep(timeout);
    }
}

impl Source for KubeSource {
    fn seen(&self) -> Option<Seen> {
        self.generation().map(Seen::Generation)
    }
    fn objects(&self) -> Result<(model::Objects, Vec<model::Problem>)> {
        Ok((self.snapshot(), Vec::new()))
    }
    fn wait(&self, seen: Option<&Seen>, timeout: Duration) {
        let seen = match seen {
            Some(Seen::Generation(g)) => Some(*g),
            _ => None,
        };
        self.wait_for_change(seen, timeout);
    }
}

/// The error policy: after a failed synchronisation the next comes sooner than a poll would
/// bring it but later each time (doubling from [`Backoff::FIRST`] up to [`Backoff::MAX`]), and
/// a success resets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The wait after a first failure.
    pub const FIRST: Duration = Duration::from_millis(200);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(30);

    /// Records a failure and returns how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        let wait = Self::FIRST
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// Records a success.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// What the loop does after one [`Agent::reconcile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait up to this long for the source to change, then synchronise what changed.
    Wait(Duration),
    /// Synchronise everything again after this long (an earlier attempt failed).
    Retry(Duration),
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

/// What the reconciler needs of the node's configuration.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// This node's name.
    pub node_name: String,
    /// See [`Config::snat_addr`].
    pub snat_addr: Option<std::net::Ipv4Addr>,
    /// See [`Config::snat_ports`].
    pub snat_ports: (u16, u16),
}

/// Desired state to map contents: everything the agent does but attaching programs.
#[derive(Debug)]
pub struct Reconciler {
    node: NodeSettings,
    maps: ServiceMaps,
    policy: PolicyMaps,
    engine: Engine,
    policy_synced: bool,
    /// UDP (frontend, backend) pairs as last programmed.
    udp_pairs: crate::services::UdpPairs,
    source: Box<dyn Source>,
    last: Option<Seen>,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    reconciler: Reconciler,
    ebpf: Loaded,
    attached: HashSet<String>,
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
        let source: Box<dyn Source> = match &config.source {
            SourceConfig::Manifests(dir) => Box::new(ManifestDir(dir.clone())),
            SourceConfig::Kubernetes(c) => Box::new(
                KubeSource::start((**c).clone()).map_err(|e| Error::Source(e.to_string()))?,
            ),
        };
        let node = NodeSettings {
            node_name: config.node_name.clone(),
            snat_addr: config.snat_addr,
            snat_ports: config.snat_ports,
        };
        let mut agent = Self {
            reconciler: Reconciler::new(node, maps, policy, source),
            config,
            ebpf: Loaded(ebpf),
            attached: HashSet::new(),
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
        self.reconciler.totals()
    }

    /// Waits up to `timeout` for the source to change (the Kubernetes API wakes it at once;
    /// a manifests directory is looked at again after `timeout`).
    pub fn wait(&self, timeout: Duration) {
        self.reconciler.wait(timeout);
    }

    /// Attaches policy to new interfaces, programs the difference from the desired state if it
    /// changed (or `force`), and ends the connected UDP sockets of backends that left.
    pub fn sync(&mut self, force: bool) -> Result<Option<SyncReport>> {
        self.attach_policy()?;
        let Some((report, gone)) = self.reconciler.sync(force)? else {
            return Ok(None);
        };
        // Connected UDP sockets of departed backends would keep sending into the void.
        match socklb::terminate_udp(&self.config.layout, &self.config.cgroup, &gone) {
            Ok(0) => {}
            Ok(n) => tracing::info!(sockets = n, "UDP sockets of departed backends terminated"),
            Err(e) => tracing::warn!(error = %e, "terminating UDP sockets of departed backends"),
        }
        Ok(Some(report))
    }

    /// One turn of the loop: [`Agent::sync`] (everything when `force`), and what to do next:
    /// wait up to `poll` for a change after a success, retry after `backoff`'s wait after a
    /// failure.
    pub fn reconcile(
        &mut self,
        force: bool,
        backoff: &mut Backoff,
        poll: Duration,
    ) -> (Result<Option<SyncReport>>, Next) {
        next_after(self.sync(force), backoff, poll)
    }
}

/// What follows a synchronisation's outcome.
fn next_after<T>(outcome: Result<T>, backoff: &mut Backoff, poll: Duration) -> (Result<T>, Next) {
    let next = match &outcome {
        Ok(_) => {
            backoff.succeeded();
            Next::Wait(poll)
        }
        Err(_) => Next::Retry(backoff.failed()),
    };
    (outcome, next)
}

impl Reconciler {
    /// A reconciler writing to `maps` and `policy` (which it reads back first) from `source`.
    pub fn new(
        node: NodeSettings,
        maps: ServiceMaps,
        policy: PolicyMaps,
        source: Box<dyn Source>,
    ) -> Self {
        Self {
            node,
            engine: Engine::new(),
            policy_synced: false,
            // What an earlier run left programmed, so backends that left while the agent was
            // down count as departed too.
            udp_pairs: maps.udp_pairs(),
            maps,
            policy,
            source,
            last: None,
        }
    }

    /// Frontends and backend slots programmed.
    pub fn totals(&self) -> (usize, usize) {
        (self.maps.len(), self.maps.backend_count())
    }

    /// Waits up to `timeout` for the source to change.
    pub fn wait(&self, timeout: Duration) {
        self.source.wait(self.last.as_ref(), timeout);
    }

    /// Re-reads the desired state if it changed (or `force`) and programs the difference.
    /// Returns `None` when nothing changed, and also while the source is not ready (the
    /// datapath keeps what it has); else the report and the UDP (frontend, backend) pairs
    /// no longer programmed.
    pub fn sync(&mut self, force: bool) -> Result<Option<(SyncReport, crate::services::UdpPairs)>> {
        let Some(seen) = self.source.seen() else {
            return Ok(None);
        };
        if !force && self.last.as_ref() == Some(&seen) {
            return Ok(None);
        }
        let t0 = std::time::Instant::now();
        let (objects, mut problems) = self.source.objects()?;
        let node_name = self.node.node_name.as_str();
        let (desired, more) = model::desired(&objects, node_name);
        problems.extend(more);
        let snat = self
            .node
            .snat_addr
            .or_else(|| model::node_snat_addr(&objects, node_name))
            .filter(|a| !a.is_unspecified());
        let (lo, hi) = self.node.snat_ports;
        let node = NodeConfig {
            snat_addr: Be32(snat.map_or(0, |a| u32::from(a).to_be())),
            snat_port_min: lo,
            snat_port_count: hi.saturating_sub(lo).saturating_add(1),
        };
        if self.maps.set_node_config(node)? {
            tracing::info!(snat = ?snat, ports = ?(lo, hi), "remote backends from outside the node leave from this address");
        }
        let (applied, errors) = self.maps.apply(&desired);
        let udp_now = crate::services::udp_pairs(&desired);
        let gone: crate::services::UdpPairs =
            self.udp_pairs.difference(&udp_now).copied().collect();
        self.udp_pairs = udp_now;
        let local: BTreeSet<std::net::Ipv4Addr> = objects
            .pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name))
            .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
            .collect();
        let podnets: Vec<ipnet::Ipv4Net> = objects
            .nodes
            .iter()
            .filter(|n| n.metadata.name.as_deref() == Some(node_name))
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
        let report = SyncReport {
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
        };
        Ok(Some((report, gone)))
    }
}

#[cfg(test)]
mod tests {
    //! The reconciler over in-memory maps and objects, and the loop's error policy.

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::maps::{Log, Memory};

    /// Objects in memory, with a change counter; `None` until they are "listed".
    #[derive(Debug, Default, Clone)]
    struct Objects(Arc<Mutex<Option<(u64, String)>>>);

    impl Objects {
        fn set(&self, yaml: &str) {
            let mut o = self.0.lock().unwrap();
            let n = o.as_ref().map_or(1, |(n, _)| n + 1);
            *o = Some((n, yaml.to_owned()));
        }
    }

    impl Source for Objects {
        fn seen(&self) -> Option<Seen> {
            self.0
                .lock()
                .unwrap()
                .as_ref()
                .map(|(n, _)| Seen::Generation(*n))
        }
        fn objects(&self) -> Result<(model::Objects, Vec<model::Problem>)> {
            let yaml = self.0.lock().unwrap().as_ref().map(|(_, y)| y.clone());
            Ok(manifests::parse_str(&yaml.unwrap_or_default(), "memory"))
        }
        fn wait(&self, _: Option<&Seen>, _: Duration) {}
    }

    fn reconciler(source: &Objects) -> Reconciler {
        let log = Log::default();
        let maps = ServiceMaps::with_maps(
            crate::services::Maps {
                services: Box::new(Memory::new("services", 64, log.clone())),
                backends: Box::new(Memory::new("backends", 64, log.clone())),
                maglev: Box::new(Memory::new("maglev", 64, log.clone())),
            },
            Limits::default(),
            true,
        )
        .unwrap();
        let policy = PolicyMaps::with_maps(crate::policymap::Maps {
            endpoints: Box::new(Memory::new("endpoints", 64, log.clone())),
            ipcache: Box::new(Memory::new("ipcache", 64, log.clone())),
            rules: Box::new(Memory::new("rules", 256, log.clone())),
            podnets: Box::new(Memory::new("podnets", 8, log.clone())),
            names: Box::new(Memory::new("names", 8, log.clone())),
        })
        .unwrap();
        let node = NodeSettings {
            node_name: "n1".into(),
            snat_addr: None,
            snat_ports: (30000, 32767),
        };
        Reconciler::new(node, maps, policy, Box::new(source.clone()))
    }

    fn world(backends: &[&str]) -> String {
        let mut y = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
             spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 53, protocol: UDP, targetPort: 5353}]}\n",
        );
        for (i, ip) in backends.iter().enumerate() {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, namespace: default, labels: {{app: web}}}}\n\
                 spec: {{nodeName: n1, containers: [{{name: c, image: x}}]}}\n\
                 status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
            ));
        }
        y
    }

    #[test]
    fn the_reconciler_waits_for_its_source_programs_changes_only_and_names_departed_udp() {
        let source = Objects::default();
        let mut r = reconciler(&source);
        assert!(
            r.sync(true).unwrap().is_none(),
            "not listed yet: nothing done"
        );

        source.set(&world(&["10.244.0.5", "10.244.0.6"]));
        let (report, gone) = r.sync(false).unwrap().unwrap();
        assert_eq!((report.frontends, report.applied.added), (1, 1));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(gone.is_empty());
        assert_eq!(r.totals(), (1, 2));

        // Nothing changed: nothing to do, unless forced.
        assert!(r.sync(false).unwrap().is_none());
        let (report, _) = r.sync(true).unwrap().unwrap();
        assert_eq!(report.applied.unchanged, 1);

        // A backend leaves: its UDP pairing is reported so its sockets can be ended.
        source.set(&world(&["10.244.0.5"]));
        let (report, gone) = r.sync(false).unwrap().unwrap();
        assert_eq!(report.applied.updated, 1);
        let gone: Vec<String> = gone.iter().map(|(_, b)| b.to_string()).collect();
        assert_eq!(gone, ["10.244.0.6:5353"]);
        assert_eq!(r.totals(), (1, 1));
    }

    #[test]
    fn failures_back_off_doubling_to_a_cap_and_a_success_resets() {
        let mut b = Backoff::default();
        let poll = Duration::from_secs(1);
        let fail = || Err::<(), _>(Error::Source("down".into()));
        let waits: Vec<Next> = (0..10)
            .map(|_| next_after(fail(), &mut b, poll).1)
            .collect();
        assert_eq!(waits[0], Next::Retry(Backoff::FIRST));
        assert_eq!(waits[1], Next::Retry(Backoff::FIRST * 2));
        assert_eq!(waits[2], Next::Retry(Backoff::FIRST * 4));
        assert_eq!(waits[9], Next::Retry(Backoff::MAX));
        assert_eq!(next_after(Ok(()), &mut b, poll).1, Next::Wait(poll));
        assert_eq!(
            next_after(fail(), &mut b, poll).1,
            Next::Retry(Backoff::FIRST)
        );
    }
}
