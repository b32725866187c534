//! The scheduling decision, pure: kube-scheduler's default filters (NodeUnschedulable,
//! TaintToleration, NodeAffinity with nodeSelector, NodePorts, NodeResourcesFit,
//! PodTopologySpread, InterPodAffinity) and scores (NodeResourcesFit LeastAllocated,
//! NodeResourcesBalancedAllocation, TaintToleration, NodeAffinity, default spreading of a
//! controller's pods across nodes), over a snapshot of the nodes and the pods bound to them.
//! The failure message is kube-scheduler's ("0/3 nodes are available: 1 Insufficient cpu, 2
//! node(s) had untolerated taint {k: v}. ...").

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodAffinityTerm, Taint, Toleration,
};

use crate::selector::LabelSelector;

/// Amounts of the resources the scheduler counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu: i64,
    /// Memory in bytes.
    pub memory: i64,
    /// Ephemeral storage in bytes.
    pub storage: i64,
    /// Pods.
    pub pods: i64,
}

impl Resources {
    fn add(&mut self, o: &Resources) {
        self.cpu += o.cpu;
        self.memory += o.memory;
        self.storage += o.storage;
        self.pods += o.pods;
    }

    fn max(&mut self, o: &Resources) {
        self.cpu = self.cpu.max(o.cpu);
        self.memory = self.memory.max(o.memory);
        self.storage = self.storage.max(o.storage);
    }
}

pub use weft_node::quantity;

fn amounts(
    map: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> Resources {
    let get = |k: &str| {
        map.and_then(|m| m.get(k))
            .and_then(|q| quantity(&q.0))
            .unwrap_or(0.0)
    };
    Resources {
        cpu: (get("cpu") * 1000.0).ceil() as i64,
        memory: get("memory").ceil() as i64,
        storage: get("ephemeral-storage").ceil() as i64,
        pods: map
            .and_then(|m| m.get("pods"))
            .and_then(|q| quantity(&q.0))
            .map_or(0, |p| p as i64),
    }
}

/// What a pod asks for: the sum over its containers, or the largest init container if that is
/// more, plus its overhead; one pod. With `non_zero`, a container without requests counts as
/// 100m CPU and 200 MiB, as kube-scheduler scores it.
pub fn requests(pod: &Pod, non_zero: bool) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources {
            pods: 1,
            ..Resources::default()
        };
    };
    let of = |c: &k8s_openapi::api::core::v1::Container| {
        let mut r = amounts(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
        if non_zero {
            if r.cpu == 0 {
                r.cpu = 100;
            }
            if r.memory == 0 {
                r.memory = 200 * 1024 * 1024;
            }
        }
        r
    };
    let mut total = Resources::default();
    for c in &spec.containers {
        total.add(&of(c));
    }
    for c in spec.init_containers.iter().flatten() {
        total.max(&of(c));
    }
    total.add(&amounts(spec.overhead.as_ref()));
    total.pods = 1;
    total
}

/// Whether a toleration tolerates a taint.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(e) = t.effect.as_deref()
        && !e.is_empty()
        && e != taint.effect
    {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key),
        _ => {
            t.key.as_deref() == Some(taint.key.as_str())
                && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

/// One node with what is already placed on it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The node.
    pub node: Node,
    /// What its pods request.
    pub requested: Resources,
    /// What its pods request, counted as scoring does.
    pub requested_non_zero: Resources,
    /// Its pods (bound or assumed).
    pub pods: Vec<Pod>,
    /// Those of its pods with required anti-affinity terms (checked against every incoming
    /// pod, so kept apart to make that check cost nothing when there are none).
    pub anti_affinity: Vec<Pod>,
}

fn required_anti_affinity(pod: &Pod) -> &[PodAffinityTerm] {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_deref()
        })
        .unwrap_or(&[])
}

impl NodeInfo {
    /// A node with nothing on it.
    pub fn new(node: Node) -> Self {
        Self {
            node,
            requested: Resources::default(),
            requested_non_zero: Resources::default(),
            pods: Vec::new(),
            anti_affinity: Vec::new(),
        }
    }

    /// Counts a pod as placed here.
    pub fn add(&mut self, pod: Pod) {
        self.requested.add(&requests(&pod, false));
        self.requested_non_zero.add(&requests(&pod, true));
        if !required_anti_affinity(&pod).is_empty() {
            self.anti_affinity.push(pod.clone());
        }
        self.pods.push(pod);
    }

    fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or("")
    }

    fn label(&self, key: &str) -> Option<&str> {
        if key == "kubernetes.io/hostname" && !self.labels().contains_key(key) {
            return Some(self.name());
        }
        self.labels().get(key).map(String::as_str)
    }

    fn labels(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.node.metadata.labels.as_ref().unwrap_or(&EMPTY)
    }

    fn allocatable(&self) -> Resources {
        let status = self.node.status.as_ref();
        let mut a = amounts(
            status
                .and_then(|s| s.allocatable.as_ref())
                .or(status.and_then(|s| s.capacity.as_ref())),
        );
        if a.pods == 0 {
            a.pods = 110;
        }
        a
    }

    fn taints(&self) -> &[Taint] {
        self.node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or(&[])
    }
}

fn tolerations(pod: &Pod) -> &[Toleration] {
    pod.spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[])
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(x)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|x| x.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" { v > x } else { v < x }
        }
        _ => false,
    }
}

fn term_matches(term: &NodeSelectorTerm, node: &NodeInfo) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, node.labels().get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(node.name())))
}

/// nodeSelector and required node affinity.
fn affinity_fits(pod: &Pod, node: &NodeInfo) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| node.labels().get(k) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    selector_ok
        && required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)))
}

fn host_ports(pod: &Pod) -> Vec<(String, String, i32)> {
    pod.spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let hp = p.host_port.filter(|h| *h > 0)?;
            Some((
                p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                hp,
            ))
        })
        .collect()
}

fn term_selects(term: &PodAffinityTerm, owner: &Pod, candidate: &Pod) -> bool {
    let ns = candidate.metadata.namespace.as_deref().unwrap_or("");
    let namespaces = term.namespaces.as_deref().unwrap_or(&[]);
    let ns_ok = if namespaces.is_empty() && term.namespace_selector.is_none() {
        owner.metadata.namespace.as_deref() == Some(ns)
    } else {
        namespaces.iter().any(|n| n == ns) || term.namespace_selector.is_some()
    };
    ns_ok
        && LabelSelector::from_api(term.label_selector.as_ref())
            .is_ok_and(|s| s.matches_labels(candidate.metadata.labels.as_ref()))
}

/// The cluster as the scheduler sees it for one decision.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every node.
    pub nodes: Vec<NodeInfo>,
}

/// Pods in the topology domain of `node` for `key`.
fn pods_in_domain<'a>(
    snap: &'a Snapshot,
    node: &NodeInfo,
    key: &str,
) -> impl Iterator<Item = &'a Pod> {
    let value = node.label(key).map(str::to_owned);
    snap.nodes
        .iter()
        .filter(move |n| value.is_some() && n.label(key).map(str::to_owned) == value)
        .flat_map(|n| n.pods.iter())
}

/// The annotation the scheduler puts on its own copy of a pod (never written to the API) with
/// the node selector terms of the PersistentVolumes the pod's claims are bound to: a JSON list,
/// one list of terms per volume, each satisfied by any of its terms.
pub const VOLUME_AFFINITY: &str = "scheduler.weft.io/volume-node-affinity";

/// Whether the node can reach every bound volume of the pod (kube-scheduler's VolumeBinding
/// filter for bound claims).
fn volumes_reachable(pod: &Pod, node: &NodeInfo) -> bool {
    let Some(raw) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VOLUME_AFFINITY))
    else {
        return true;
    };
    let volumes: Vec<Vec<NodeSelectorTerm>> = serde_json::from_str(raw).unwrap_or_default();
    volumes
        .iter()
        .all(|terms| terms.iter().any(|t| term_matches(t, node)))
}

/// Whether a daemon pod belongs on the node, as kube's DaemonSet controller decides it: the
/// pod's node selector and required affinity match and it tolerates the node's NoSchedule and
/// NoExecute taints (resources are the scheduler's business: a daemon pod that does not fit
/// stays Pending there).
pub fn daemon_eligible(pod: &Pod, node: &NodeInfo) -> bool {
    let tol = tolerations(pod);
    affinity_fits(pod, node)
        && node
            .taints()
            .iter()
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .all(|t| tol.iter().any(|x| tolerates(x, t)))
}

/// The reasons `node` cannot take `pod` (empty when it can), from the first filter that
/// refuses it, in kube-scheduler's order.
pub fn filter(pod: &Pod, node: &NodeInfo, snap: &Snapshot) -> Vec<String> {
    let tol = tolerations(pod);
    if node
        .node
        .spec
        .as_ref()
        .is_some_and(|s| s.unschedulable == Some(true))
    {
        let taint = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        if !tol.iter().any(|t| tolerates(t, &taint)) {
            return vec!["node(s) were unschedulable".into()];
        }
    }
    if let Some(t) = node
        .taints()
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tol.iter().any(|x| tolerates(x, t)))
    {
        return vec![format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t.key,
            t.value.as_deref().unwrap_or("")
        )];
    }
    if !affinity_fits(pod, node) {
        return vec!["node(s) didn't match Pod's node affinity/selector".into()];
    }
    if !volumes_reachable(pod, node) {
        return vec!["node(s) had volume node affinity conflict".into()];
    }
    let wanted = host_ports(pod);
    if !wanted.is_empty() {
        let used: Vec<_> = node.pods.iter().flat_map(host_ports).collect();
        let clash = wanted.iter().any(|(ip, proto, port)| {
            used.iter().any(|(uip, uproto, uport)| {
                uport == port
                    && uproto == proto
                    && (uip == ip || uip == "0.0.0.0" || ip == "0.0.0.0")
            })
        });
        if clash {
            return vec!["node(s) didn't have free ports for the requested pod ports".into()];
        }
    }
    let want = requests(pod, false);
    let alloc = node.allocatable();
    let mut short = Vec::new();
    if node.requested.pods + 1 > alloc.pods {
        short.push("Too many pods".to_owned());
    }
    if want.cpu > 0 && node.requested.cpu + want.cpu > alloc.cpu {
        short.push("Insufficient cpu".to_owned());
    }
    if want.memory > 0 && node.requested.memory + want.memory > alloc.memory {
        short.push("Insufficient memory".to_owned());
    }
    if want.storage > 0 && node.requested.storage + want.storage > alloc.storage {
        short.push("Insufficient ephemeral-storage".to_owned());
    }
    if !short.is_empty() {
        return short;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    for c in spec.topology_spread_constraints.iter().flatten() {
        if c.when_unsatisfiable != "DoNotSchedule" {
            continue;
        }
        let Ok(sel) = LabelSelector::from_api(c.label_selector.as_ref()) else {
            continue;
        };
        let same_ns = |p: &&Pod| p.metadata.namespace == pod.metadata.namespace;
        let mut counts: HashMap<String, i64> = HashMap::new();
        for n in snap.nodes.iter().filter(|n| affinity_fits(pod, n)) {
            if let Some(v) = n.label(&c.topology_key) {
                let here = n
                    .pods
                    .iter()
                    .filter(same_ns)
                    .filter(|p| sel.matches_labels(p.metadata.labels.as_ref()))
                    .count() as i64;
                *counts.entry(v.to_owned()).or_default() += here;
            }
        }
        let Some(domain) = node.label(&c.topology_key) else {
            return vec![
                "node(s) didn't match pod topology spread constraints (missing required label)"
                    .into(),
            ];
        };
        let min = counts.values().copied().min().unwrap_or(0);
        let here = counts.get(domain).copied().unwrap_or(0);
        let self_match = i64::from(sel.matches_labels(pod.metadata.labels.as_ref()));
        if here + self_match - min > i64::from(c.max_skew) {
            return vec!["node(s) didn't match pod topology spread constraints".into()];
        }
    }
    let affinity = spec.affinity.unwrap_or_default();
    for term in affinity.pod_anti_affinity.iter().flat_map(|a| {
        a.required_during_scheduling_ignored_during_execution
            .iter()
            .flatten()
    }) {
        if pods_in_domain(snap, node, &term.topology_key).any(|p| term_selects(term, pod, p)) {
            return vec!["node(s) didn't match pod anti-affinity rules".into()];
        }
    }
    // Existing pods' anti-affinity against the incoming one.
    for n in &snap.nodes {
        for p in &n.anti_affinity {
            for term in required_anti_affinity(p) {
                let same_domain = n.label(&term.topology_key).is_some()
                    && n.label(&term.topology_key) == node.label(&term.topology_key);
                if same_domain && term_selects(term, p, pod) {
                    return vec!["node(s) didn't satisfy existing pods anti-affinity rules".into()];
                }
            }
        }
    }
    for term in affinity.pod_affinity.iter().flat_map(|a| {
        a.required_during_scheduling_ignored_during_execution
            .iter()
            .flatten()
    }) {
        let here =
            pods_in_domain(snap, node, &term.topology_key).any(|p| term_selects(term, pod, p));
        let anywhere = snap
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter())
            .any(|p| term_selects(term, pod, p));
        // The first pod of a group that selects itself may go anywhere.
        if !here && (anywhere || !term_selects(term, pod, pod)) {
            return vec!["node(s) didn't match pod affinity rules".into()];
        }
    }
    Vec::new()
}

/// The pod's controller (for default spreading).
fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Scores of the feasible nodes (indices into `snap.nodes`), weighted as the default profile.
pub fn score(pod: &Pod, feasible: &[usize], snap: &Snapshot) -> Vec<i64> {
    let want = requests(pod, true);
    let tol = tolerations(pod);
    let preferred = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.preferred_during_scheduling_ignored_during_execution
                .clone()
        })
        .unwrap_or_default();
    let owner = controller_uid(pod);
    let mut raw = Vec::new();
    for &i in feasible {
        let n = &snap.nodes[i];
        let alloc = n.allocatable();
        let frac = |used: i64, add: i64, cap: i64| {
            if cap <= 0 {
                1.0
            } else {
                ((used + add) as f64 / cap as f64).min(1.0)
            }
        };
        let fc = frac(n.requested_non_zero.cpu, want.cpu, alloc.cpu);
        let fm = frac(n.requested_non_zero.memory, want.memory, alloc.memory);
        let least = ((1.0 - fc) * 100.0 + (1.0 - fm) * 100.0) / 2.0;
        let balanced = (1.0 - (fc - fm).abs() / 2.0) * 100.0;
        let intolerable = n
            .taints()
            .iter()
            .filter(|t| t.effect == "PreferNoSchedule" && !tol.iter().any(|x| tolerates(x, t)))
            .count() as i64;
        let affinity: i64 = preferred
            .iter()
            .filter(|p| term_matches(&p.preference, n))
            .map(|p| i64::from(p.weight))
            .sum();
        let siblings = owner.map_or(0, |o| {
            n.pods
                .iter()
                .filter(|p| controller_uid(p) == Some(o))
                .count() as i64
        });
        raw.push((
            least as i64,
            balanced as i64,
            intolerable,
            affinity,
            siblings,
        ));
    }
    let max_intolerable = raw.iter().map(|r| r.2).max().unwrap_or(0);
    let max_affinity = raw.iter().map(|r| r.3).max().unwrap_or(0);
    let max_siblings = raw.iter().map(|r| r.4).max().unwrap_or(0);
    let reverse = |v: i64, max: i64| if max == 0 { 100 } else { 100 * (max - v) / max };
    raw.iter()
        .map(|&(least, balanced, intolerable, affinity, siblings)| {
            let affinity = if max_affinity == 0 {
                0
            } else {
                100 * affinity / max_affinity
            };
            least
                + balanced
                + 3 * reverse(intolerable, max_intolerable)
                + 2 * affinity
                + 2 * reverse(siblings, max_siblings)
        })
        .collect()
}

/// The node for `pod` (index into `snap.nodes`), or kube-scheduler's message of why none.
/// Ties go to the `tie`-th best node modulo their number, so equal nodes are used in turn.
pub fn choose(pod: &Pod, snap: &Snapshot, tie: usize) -> Result<usize, String> {
    let mut feasible = Vec::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut resource_failures = 0;
    for (i, n) in snap.nodes.iter().enumerate() {
        let why = filter(pod, n, snap);
        if why.is_empty() {
            feasible.push(i);
        } else {
            if why
                .iter()
                .any(|w| w.starts_with("Insufficient") || w == "Too many pods")
            {
                resource_failures += 1;
            }
            for w in why {
                *reasons.entry(w).or_default() += 1;
            }
        }
    }
    if feasible.is_empty() {
        let total = snap.nodes.len();
        let mut msg = format!("0/{total} nodes are available");
        if !reasons.is_empty() {
            let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            msg.push_str(&format!(": {}", list.join(", ")));
        }
        msg.push('.');
        if total > 0 {
            let mut pre = Vec::new();
            if resource_failures > 0 {
                pre.push(format!(
                    "{resource_failures} No preemption victims found for incoming pod"
                ));
            }
            if total > resource_failures {
                pre.push(format!(
                    "{} Preemption is not helpful for scheduling",
                    total - resource_failures
                ));
            }
            msg.push_str(&format!(
                " preemption: 0/{total} nodes are available: {}.",
                pre.join(", ")
            ));
        }
        return Err(msg);
    }
    let scores = score(pod, &feasible, snap);
    let best = scores.iter().copied().max().unwrap_or(0);
    let ties: Vec<usize> = feasible
        .iter()
        .zip(&scores)
        .filter(|(_, s)| **s == best)
        .map(|(i, _)| *i)
        .collect();
    Ok(ties[tie % ties.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str, memory: &str, extra: serde_json::Value) -> NodeInfo {
        let mut v = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                           "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"}}});
        crate::patch::merge(&mut v, &extra);
        NodeInfo::new(serde_json::from_value(v).unwrap())
    }

    fn pod(cpu: &str, extra: serde_json::Value) -> Pod {
        let mut v = json!({"metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}},
                           "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}});
        crate::patch::merge(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_message_counts_each_reason_like_kube_scheduler() {
        let snap = Snapshot {
            nodes: vec![
                node("a", "1", "1Gi", json!({})),
                node(
                    "b",
                    "4",
                    "1Gi",
                    json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
                ),
                node("c", "4", "1Gi", json!({"spec": {"unschedulable": true}})),
            ],
        };
        let err = choose(&pod("2", json!({})), &snap, 0).unwrap_err();
        assert_eq!(
            err,
            "0/3 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: db}, \
             1 node(s) were unschedulable. preemption: 0/3 nodes are available: 1 No preemption victims found \
             for incoming pod, 2 Preemption is not helpful for scheduling."
        );
        let tolerant = pod(
            "2",
            json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(choose(&tolerant, &snap, 0), Ok(1));
        let selected = pod(
            "100m",
            json!({"spec": {"nodeSelector": {"kubernetes.io/hostname": "a"}}}),
        );
        assert_eq!(choose(&selected, &snap, 0), Ok(0));
    }

    #[test]
    fn pods_follow_their_bound_volumes() {
        let snap = Snapshot {
            nodes: vec![
                node("a", "4", "1Gi", json!({})),
                node(
                    "b",
                    "4",
                    "1Gi",
                    json!({"metadata": {"labels": {"topology.weft.io/node": "b"}}}),
                ),
            ],
        };
        let on = |terms: serde_json::Value| {
            pod(
                "100m",
                json!({"metadata": {"annotations": {VOLUME_AFFINITY: terms.to_string()}}}),
            )
        };
        let to_b = on(
            json!([[{"matchExpressions": [{"key": "topology.weft.io/node", "operator": "In", "values": ["b"]}]}]]),
        );
        assert_eq!(choose(&to_b, &snap, 0), Ok(1));
        assert_eq!(choose(&to_b, &snap, 1), Ok(1));
        let nowhere = on(
            json!([[{"matchExpressions": [{"key": "topology.weft.io/node", "operator": "In", "values": ["z"]}]}]]),
        );
        assert!(
            choose(&nowhere, &snap, 0).unwrap_err().starts_with(
                "0/2 nodes are available: 2 node(s) had volume node affinity conflict."
            ),
        );
    }

    #[test]
    fn anti_affinity_and_spreading_keep_replicas_apart() {
        let mut snap = Snapshot {
            nodes: vec![
                node("a", "4", "8Gi", json!({})),
                node("b", "4", "8Gi", json!({})),
            ],
        };
        let anti = json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}}});
        let first = pod("100m", anti.clone());
        let at = choose(&first, &snap, 0).unwrap();
        snap.nodes[at].add(first);
        let second = pod("100m", anti.clone());
        let other = choose(&second, &snap, 0).unwrap();
        assert_ne!(at, other);
        snap.nodes[other].add(second);
        assert!(
            choose(&pod("100m", anti), &snap, 0)
                .unwrap_err()
                .contains("anti-affinity")
        );
        // Default spreading: pods of one controller go to the emptier node.
        let owned = json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u1", "controller": true}]}});
        let mut snap = Snapshot {
            nodes: vec![
                node("a", "4", "8Gi", json!({})),
                node("b", "4", "8Gi", json!({})),
            ],
        };
        snap.nodes[0].add(pod("100m", owned.clone()));
        assert_eq!(choose(&pod("100m", owned), &snap, 0), Ok(1));
    }

    proptest! {
        /// Whatever arrives, no node ends up with more requested than it has.
        #[test]
        fn never_over_commits(cpus in proptest::collection::vec(1u32..3000, 1..60), nodes in 1usize..5) {
            let mut snap = Snapshot { nodes: (0..nodes).map(|i| node(&format!("n{i}"), "2", "4Gi", json!({}))).collect() };
            for (k, c) in cpus.iter().enumerate() {
                let p = pod(&format!("{c}m"), json!({}));
                if let Ok(i) = choose(&p, &snap, k) {
                    snap.nodes[i].add(p);
                }
            }
            for n in &snap.nodes {
                prop_assert!(n.requested.cpu <= 2000, "{} has {}m", n.name(), n.requested.cpu);
            }
        }
    }
}
