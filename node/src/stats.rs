//! Resource usage as kubelet's Summary API (`GET /stats/summary`) reports it, which the API
//! server's `metrics.k8s.io` (and so `kubectl top`) reads: every container's CPU and memory from
//! the runtime (CRI `ListContainerStats`), each pod's as the sum of its containers', and the
//! node's from the cgroup its pods are made under (cgroup v1 or v2).
//!
//! The node is that cgroup rather than the whole machine, as kubelet's root cgroup would be:
//! several weft nodes may share one machine, and each should show what runs on it.
//!
//! CPU usage is a rate: the cumulative core-nanoseconds of two samples at least a second apart.
//! The node samples every [`SAMPLE_EVERY`] so that a rate is there when someone asks; a request
//! samples afresh and rates against the previous sample.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use k8s_cri::v1::{ContainerStats, ListContainerStatsRequest};
use serde::{Deserialize, Serialize};

use crate::agent::{CONTAINER_LABEL, Cri, NAME_LABEL, NS_LABEL, UID_LABEL};

/// How often the node samples without being asked.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The shortest interval a rate is taken over.
const MIN_INTERVAL_NS: i64 = 1_000_000_000;

/// kubelet's `Summary` (the fields metrics consumers read).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The node's usage.
    pub node: NodeStats,
    /// Every running pod's usage.
    pub pods: Vec<PodStats>,
}

/// A node's usage.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStats {
    /// The Node's name.
    pub node_name: String,
    /// CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
}

/// Which pod a [`PodStats`] is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct PodReference {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// UID.
    pub uid: String,
}

/// A pod's usage.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStats {
    /// The pod.
    pub pod_ref: PodReference,
    /// Its containers' usage.
    pub containers: Vec<ContainerStatsSummary>,
    /// The sum of its containers' CPU (without a rate until every container has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// The sum of its containers' memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
}

/// A container's usage.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatsSummary {
    /// The container's name in its pod.
    pub name: String,
    /// CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
}

/// CPU usage at a time.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CpuStats {
    /// When it was sampled (RFC 3339).
    pub time: String,
    /// Cores in use, in billionths, over the last sampling interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_nano_cores: Option<u64>,
    /// Cumulative CPU time.
    pub usage_core_nano_seconds: u64,
}

/// Memory usage at a time.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStats {
    /// When it was sampled (RFC 3339).
    pub time: String,
    /// What the kernel would not reclaim first: usage minus inactive file pages (what the
    /// OOM killer and `kubectl top` look at).
    pub working_set_bytes: u64,
    /// All memory charged, page cache included.
    pub usage_bytes: u64,
}

/// One cumulative CPU reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reading {
    at_ns: i64,
    core_ns: u64,
}

/// Turns cumulative readings into rates, per key (a container ID, or the node).
///
/// Two readings are kept per key, at least a second apart. A new reading a second or more after
/// the newer one is rated against it and replaces the older; one closer than that is rated
/// against the older one, so a rate is always over at least a second and is there however
/// often someone asks.
#[derive(Debug, Default)]
struct Rates {
    kept: HashMap<String, (Option<Reading>, Reading)>,
}

fn per_second(from: Reading, to: Reading) -> u64 {
    let dt = (to.at_ns - from.at_ns).max(1) as u128;
    ((to.core_ns - from.core_ns) as u128 * 1_000_000_000 / dt) as u64
}

impl Rates {
    /// The rate at `now` of `key`, once there is an earlier reading a second or more before.
    fn rate(&mut self, key: &str, now: Reading) -> Option<u64> {
        let Some((older, newer)) = self.kept.get(key).copied() else {
            self.kept.insert(key.to_owned(), (None, now));
            return None;
        };
        if now.at_ns < newer.at_ns || now.core_ns < newer.core_ns {
            // Time went back, or a restarted container's counter starts again: start over.
            self.kept.insert(key.to_owned(), (None, now));
            return None;
        }
        if now.at_ns - newer.at_ns >= MIN_INTERVAL_NS {
            self.kept.insert(key.to_owned(), (Some(newer), now));
            return Some(per_second(newer, now));
        }
        older.map(|o| per_second(o, now))
    }

    /// Forgets keys not in `seen`.
    fn retain(&mut self, seen: &std::collections::HashSet<String>) {
        self.kept.retain(|k, _| seen.contains(k));
    }
}

/// The node's sampler.
#[derive(Debug)]
pub struct Sampler {
    cri: Cri,
    node_name: String,
    cgroup: String,
    rates: Mutex<Rates>,
}

/// The key under which the node's own readings are kept.
const NODE_KEY: &str = "";

fn rfc3339(ns: i64) -> String {
    let t = k8s_openapi::jiff::Timestamp::from_nanosecond(ns as i128)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

impl Sampler {
    /// A sampler for the node `node_name`, whose pods are under the cgroup `cgroup`.
    pub fn new(cri: Cri, node_name: &str, cgroup: &str) -> Self {
        Self {
            cri,
            node_name: node_name.to_owned(),
            cgroup: cgroup.to_owned(),
            rates: Mutex::new(Rates::default()),
        }
    }

    /// Samples now.
    pub async fn summary(&self) -> Result<Summary, tonic::Status> {
        let stats = self
            .cri
            .runtime
            .clone()
            .list_container_stats(ListContainerStatsRequest { filter: None })
            .await?
            .into_inner()
            .stats;
        let node = cgroup_usage(&self.cgroup);
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        Ok(summarize(
            &self.node_name,
            stats,
            node,
            now_ns(),
            &mut rates,
        ))
    }

    /// Samples every [`SAMPLE_EVERY`] until the process ends, so that a rate is ready.
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            if let Err(e) = self.summary().await {
                tracing::debug!(error = %e, "sampling container stats");
            }
        }
    }
}

/// A cgroup's cumulative CPU time and memory, read at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CgroupUsage {
    core_ns: u64,
    usage_bytes: u64,
    working_set_bytes: u64,
}

/// Builds the summary from the runtime's container stats and the node cgroup's usage.
fn summarize(
    node_name: &str,
    stats: Vec<ContainerStats>,
    node: Option<CgroupUsage>,
    now: i64,
    rates: &mut Rates,
) -> Summary {
    let mut seen = std::collections::HashSet::new();
    let mut pods: Vec<PodStats> = Vec::new();
    let mut index: HashMap<PodReference, usize> = HashMap::new();
    for s in stats {
        let Some(attrs) = s.attributes else { continue };
        let label = |k: &str| attrs.labels.get(k).cloned().unwrap_or_default();
        let pod = PodReference {
            name: label(NAME_LABEL),
            namespace: label(NS_LABEL),
            uid: label(UID_LABEL),
        };
        if pod.uid.is_empty() {
            continue;
        }
        let name = attrs
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_else(|| label(CONTAINER_LABEL));
        let cpu = s.cpu.and_then(|c| {
            let core_ns = c.usage_core_nano_seconds?.value;
            let at_ns = if c.timestamp > 0 { c.timestamp } else { now };
            seen.insert(attrs.id.clone());
            let rate = rates
                .rate(&attrs.id, Reading { at_ns, core_ns })
                .or_else(|| c.usage_nano_cores.map(|v| v.value).filter(|v| *v > 0));
            Some(CpuStats {
                time: rfc3339(at_ns),
                usage_nano_cores: rate,
                usage_core_nano_seconds: core_ns,
            })
        });
        let memory = s.memory.and_then(|m| {
            let at_ns = if m.timestamp > 0 { m.timestamp } else { now };
            Some(MemoryStats {
                time: rfc3339(at_ns),
                working_set_bytes: m.working_set_bytes?.value,
                usage_bytes: m.usage_bytes.map(|v| v.value).unwrap_or_default(),
            })
        });
        let i = *index.entry(pod.clone()).or_insert_with(|| {
            pods.push(PodStats {
                pod_ref: pod,
                ..PodStats::default()
            });
            pods.len() - 1
        });
        pods[i]
            .containers
            .push(ContainerStatsSummary { name, cpu, memory });
    }
    for p in &mut pods {
        p.containers.sort_by(|a, b| a.name.cmp(&b.name));
        p.cpu = sum_cpu(&p.containers);
        p.memory = sum_memory(&p.containers);
    }
    pods.sort_by(|a, b| {
        (&a.pod_ref.namespace, &a.pod_ref.name).cmp(&(&b.pod_ref.namespace, &b.pod_ref.name))
    });
    let node = NodeStats {
        node_name: node_name.to_owned(),
        cpu: node.map(|u| {
            seen.insert(NODE_KEY.to_owned());
            CpuStats {
                time: rfc3339(now),
                usage_nano_cores: rates.rate(
                    NODE_KEY,
                    Reading {
                        at_ns: now,
                        core_ns: u.core_ns,
                    },
                ),
                usage_core_nano_seconds: u.core_ns,
            }
        }),
        memory: node.map(|u| MemoryStats {
            time: rfc3339(now),
            working_set_bytes: u.working_set_bytes,
            usage_bytes: u.usage_bytes,
        }),
    };
    rates.retain(&seen);
    Summary { node, pods }
}

/// A pod's CPU: the sum of its containers', when each has a rate.
fn sum_cpu(containers: &[ContainerStatsSummary]) -> Option<CpuStats> {
    let cpus: Vec<&CpuStats> = containers.iter().filter_map(|c| c.cpu.as_ref()).collect();
    if cpus.is_empty() || cpus.len() != containers.len() {
        return None;
    }
    Some(CpuStats {
        time: cpus
            .iter()
            .map(|c| c.time.clone())
            .max()
            .unwrap_or_default(),
        usage_nano_cores: cpus.iter().map(|c| c.usage_nano_cores).sum(),
        usage_core_nano_seconds: cpus.iter().map(|c| c.usage_core_nano_seconds).sum(),
    })
}

/// A pod's memory: the sum of its containers'.
fn sum_memory(containers: &[ContainerStatsSummary]) -> Option<MemoryStats> {
    let mems: Vec<&MemoryStats> = containers
        .iter()
        .filter_map(|c| c.memory.as_ref())
        .collect();
    if mems.is_empty() || mems.len() != containers.len() {
        return None;
    }
    Some(MemoryStats {
        time: mems
            .iter()
            .map(|m| m.time.clone())
            .max()
            .unwrap_or_default(),
        working_set_bytes: mems.iter().map(|m| m.working_set_bytes).sum(),
        usage_bytes: mems.iter().map(|m| m.usage_bytes).sum(),
    })
}

/// Where each cgroup hierarchy holding a controller is mounted (`""` for cgroup v2).
fn hierarchies() -> Vec<(String, PathBuf)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [_, path, "cgroup2", ..] => Some((String::new(), PathBuf::from(path))),
                [_, path, "cgroup", opts, ..] => Some(((*opts).to_owned(), PathBuf::from(path))),
                _ => None,
            }
        })
        .collect()
}

/// A `key value` line's value in a cgroup stat file.
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The usage of the cgroup `relative` (a cgroupfs path), from cgroup v1's cpuacct and memory
/// controllers or from cgroup v2.
fn cgroup_usage(relative: &str) -> Option<CgroupUsage> {
    let rel = relative.trim_start_matches('/');
    let hs = hierarchies();
    let controller = |name: &str| {
        hs.iter()
            .find(|(opts, _)| opts.split(',').any(|o| o == name))
            .map(|(_, p)| p.join(rel))
    };
    match (controller("cpuacct"), controller("memory")) {
        (Some(cpu), Some(mem)) => {
            let core_ns = read(&cpu.join("cpuacct.usage"))?.trim().parse().ok()?;
            let usage: u64 = read(&mem.join("memory.usage_in_bytes"))?
                .trim()
                .parse()
                .ok()?;
            let inactive = stat_value(&read(&mem.join("memory.stat"))?, "total_inactive_file")
                .unwrap_or_default();
            Some(CgroupUsage {
                core_ns,
                usage_bytes: usage,
                working_set_bytes: usage.saturating_sub(inactive),
            })
        }
        _ => {
            let dir = hs.iter().find(|(o, _)| o.is_empty())?.1.join(rel);
            let core_ns = stat_value(&read(&dir.join("cpu.stat"))?, "usage_usec")? * 1000;
            let usage: u64 = read(&dir.join("memory.current"))?.trim().parse().ok()?;
            let inactive =
                stat_value(&read(&dir.join("memory.stat"))?, "inactive_file").unwrap_or_default();
            Some(CgroupUsage {
                core_ns,
                usage_bytes: usage,
                working_set_bytes: usage.saturating_sub(inactive),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{ContainerAttributes, ContainerMetadata, CpuUsage, MemoryUsage, UInt64Value};

    fn container(
        id: &str,
        pod: &str,
        name: &str,
        at: i64,
        core_ns: u64,
        ws: u64,
    ) -> ContainerStats {
        let labels = [
            (NAME_LABEL, pod),
            (NS_LABEL, "demo"),
            (UID_LABEL, &format!("uid-{pod}")),
            (CONTAINER_LABEL, name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        ContainerStats {
            attributes: Some(ContainerAttributes {
                id: id.to_owned(),
                metadata: Some(ContainerMetadata {
                    name: name.to_owned(),
                    attempt: 0,
                }),
                labels,
                annotations: Default::default(),
            }),
            cpu: Some(CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: Some(UInt64Value { value: core_ns }),
                usage_nano_cores: None,
            }),
            memory: Some(MemoryUsage {
                timestamp: at,
                working_set_bytes: Some(UInt64Value { value: ws }),
                usage_bytes: Some(UInt64Value { value: ws * 2 }),
                ..Default::default()
            }),
            writable_layer: None,
        }
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn rates_come_from_two_samples_a_second_apart_and_pods_sum_their_containers() {
        let mut rates = Rates::default();
        let node = |core_ns| {
            Some(CgroupUsage {
                core_ns,
                usage_bytes: 300,
                working_set_bytes: 200,
            })
        };
        let first = summarize(
            "n1",
            vec![
                container("a", "web", "app", 10 * S, 1_000, 100),
                container("b", "web", "sidecar", 10 * S, 5_000, 50),
            ],
            node(0),
            10 * S,
            &mut rates,
        );
        assert_eq!(first.pods.len(), 1);
        let web = &first.pods[0];
        assert_eq!(web.pod_ref.uid, "uid-web");
        assert_eq!(web.containers[0].name, "app");
        assert_eq!(
            web.cpu
                .as_ref()
                .map(|c| (c.usage_nano_cores, c.usage_core_nano_seconds)),
            Some((None, 6_000)),
            "no rate from a single sample"
        );
        assert_eq!(web.memory.as_ref().map(|m| m.working_set_bytes), Some(150));
        assert_eq!(first.node.cpu.as_ref().unwrap().usage_nano_cores, None);

        // Two seconds later: app used half a core, the sidecar a quarter, the node 1.5 cores.
        let second = summarize(
            "n1",
            vec![
                container("a", "web", "app", 12 * S, 1_000 + S as u64, 100),
                container("b", "web", "sidecar", 12 * S, 5_000 + S as u64 / 2, 50),
            ],
            node(3 * S as u64),
            12 * S,
            &mut rates,
        );
        let web = &second.pods[0];
        let cores = |c: &ContainerStatsSummary| c.cpu.as_ref().unwrap().usage_nano_cores;
        assert_eq!(cores(&web.containers[0]), Some(500_000_000));
        assert_eq!(cores(&web.containers[1]), Some(250_000_000));
        assert_eq!(
            web.cpu.as_ref().unwrap().usage_nano_cores,
            Some(750_000_000)
        );
        assert_eq!(
            second.node.cpu.as_ref().unwrap().usage_nano_cores,
            Some(1_500_000_000)
        );
        assert_eq!(second.node.memory.as_ref().unwrap().working_set_bytes, 200);
        assert_eq!(web.cpu.as_ref().unwrap().time, "1970-01-01T00:00:12Z");

        // A container that goes away is forgotten; a restarted one (counter reset) starts over.
        let third = summarize(
            "n1",
            vec![container("a", "web", "app", 13 * S, 10, 100)],
            None,
            13 * S,
            &mut rates,
        );
        assert_eq!(third.pods[0].containers.len(), 1);
        assert_eq!(third.pods[0].cpu.as_ref().unwrap().usage_nano_cores, None);
        assert!(!rates.kept.contains_key("b"));
        assert!(!rates.kept.contains_key(NODE_KEY));
        assert_eq!(third.node.cpu, None);
    }

    #[test]
    fn rates_span_at_least_a_second_however_often_they_are_asked_for() {
        let mut r = Rates::default();
        let at = |s: f64, core: u64| Reading {
            at_ns: (s * S as f64) as i64,
            core_ns: core,
        };
        assert_eq!(r.rate("x", at(0.0, 0)), None);
        assert_eq!(
            r.rate("x", at(0.5, 250_000_000)),
            None,
            "half a second: no rate yet"
        );
        assert_eq!(r.rate("x", at(1.0, 500_000_000)), Some(500_000_000));
        // Asked again at once, and again and again: rated against the reading before.
        assert_eq!(r.rate("x", at(1.0, 500_000_000)), Some(500_000_000));
        assert_eq!(r.rate("x", at(1.5, 500_000_000)), Some(333_333_333));
        assert_eq!(r.rate("x", at(2.0, 1_500_000_000)), Some(1_000_000_000));
        assert_eq!(
            r.rate("x", at(2.0, 10)),
            None,
            "a counter reset starts over"
        );
        assert_eq!(
            r.rate("x", at(1.0, 20)),
            None,
            "time going back starts over"
        );
    }

    #[test]
    fn stat_files_are_read_by_key() {
        let text = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(stat_value(text, "usage_usec"), Some(1234));
        assert_eq!(stat_value(text, "user"), None);
    }
}
