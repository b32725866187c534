//! Incremental NetworkPolicy: the compiled state and the maps' desired contents are kept between
//! changes, and each new view of the objects recomputes only what the change affects.
//!
//! A policy is compiled again only when it changed, or when a pod or namespace that changed
//! (before or after the change) is one its pod selector or a peer selector matches. A pod's rules
//! are computed again only when a policy selecting it was compiled again, when the pod itself
//! changed, or when a prefix inside one of its ipBlock peers appeared or disappeared. The result
//! names what it touched ([`Touched`]) so the kernel maps are compared only there. The full
//! [`super::compile`] + [`rules::desired`] path stays the reference; tests check that both
//! always agree.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};

use super::rules::{self, Desired, Touched};
use super::{
    EndpointPolicy, PeerMatch, PolicyOutput, PolicyPod, PortMatch, compile_policy, namespace_views,
    pod_views, policy_id, selector_matches,
};
use crate::model::Problem;

type Labels = BTreeMap<String, String>;

/// How much one update recomputed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Work {
    /// Policies compiled again.
    pub policies: usize,
    /// Pods whose rules were computed again.
    pub endpoints: usize,
}

/// The incremental state.
#[derive(Debug, Default)]
pub struct Engine {
    pods: BTreeMap<Ipv4Addr, PolicyPod>,
    namespaces: BTreeMap<String, Labels>,
    policies: BTreeMap<String, (NetworkPolicy, PolicyOutput)>,
    endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
    selecting: BTreeMap<Ipv4Addr, BTreeSet<String>>,
    ipcache_refs: BTreeMap<Ipv4Net, usize>,
    index: BTreeMap<String, u32>,
    local: BTreeSet<Ipv4Addr>,
    desired: Desired,
}

fn peers(np: &NetworkPolicy) -> impl Iterator<Item = &NetworkPolicyPeer> {
    let spec = np.spec.as_ref();
    let from = spec
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.from.iter().flatten());
    let to = spec
        .and_then(|s| s.egress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.to.iter().flatten());
    from.chain(to)
}

/// Whether an egress rule allows any peer on a named port: its rules depend on every pod's
/// named ports.
fn any_peer_named_port(out: &PolicyOutput) -> bool {
    out.egress.iter().flatten().any(|r| {
        r.peers.contains(&PeerMatch::Any)
            && r.ports.iter().any(|p| matches!(p, PortMatch::Named(..)))
    })
}

/// The ipBlock prefixes a policy puts in the ipcache (none while it selects no pod).
fn blocks(out: &PolicyOutput) -> Vec<Ipv4Net> {
    let mut v: Vec<Ipv4Net> = Vec::new();
    if out.selected.is_empty() {
        return v;
    }
    for rules in [&out.ingress, &out.egress].into_iter().flatten() {
        v.extend(rules::block_prefixes(rules));
    }
    v
}

/// Whether a policy's result can depend on `pod` (as it was or is now) or on the namespaces
/// whose labels changed.
fn affected_by(
    np: &NetworkPolicy,
    out: &PolicyOutput,
    pods: &[&PolicyPod],
    ns_changes: &[(&str, Option<&Labels>, Option<&Labels>)],
    old_ns: &BTreeMap<String, Labels>,
    new_ns: &BTreeMap<String, Labels>,
) -> bool {
    let ns = np.metadata.namespace.as_deref().unwrap_or("default");
    let target = np
        .spec
        .as_ref()
        .and_then(|s| s.pod_selector.clone())
        .unwrap_or_default();
    if !pods.is_empty() && any_peer_named_port(out) {
        return true;
    }
    let matches = |sel, labels| selector_matches(sel, labels).unwrap_or(true);
    for pod in pods {
        if pod.namespace == ns && matches(&target, &pod.labels) {
            return true;
        }
        for peer in peers(np).filter(|p| p.ip_block.is_none()) {
            let ns_ok = match &peer.namespace_selector {
                None => pod.namespace == ns,
                Some(sel) => [old_ns.get(&pod.namespace), new_ns.get(&pod.namespace)]
                    .into_iter()
                    .flatten()
                    .any(|l| matches(sel, l)),
            };
            let pod_ok = peer
                .pod_selector
                .as_ref()
                .is_none_or(|sel| matches(sel, &pod.labels));
            if ns_ok && pod_ok {
                return true;
            }
        }
    }
    for (_, before, after) in ns_changes {
        for sel in peers(np).filter_map(|p| p.namespace_selector.as_ref()) {
            if [before, after]
                .into_iter()
                .flatten()
                .any(|l| matches(sel, l))
            {
                return true;
            }
        }
    }
    false
}

impl Engine {
    /// An engine that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the maps should hold now.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Every pod's isolation and rules, as [`super::compile`] computes them.
    pub fn endpoints(&self) -> &BTreeMap<Ipv4Addr, EndpointPolicy> {
        &self.endpoints
    }

    fn reference(&mut self, net: Ipv4Net, delta: &mut BTreeSet<Ipv4Net>) {
        let n = self.ipcache_refs.entry(net).or_insert(0);
        *n += 1;
        if *n == 1 {
            delta.insert(net);
        }
    }

    fn release(&mut self, net: Ipv4Net, delta: &mut BTreeSet<Ipv4Net>) {
        if let Some(n) = self.ipcache_refs.get_mut(&net) {
            *n -= 1;
            if *n == 0 {
                self.ipcache_refs.remove(&net);
                delta.insert(net);
            }
        }
    }

    /// Takes a new view of the objects and this node's pods and pod ranges; returns what may
    /// have changed in [`Engine::desired`], how much was recomputed, and every invalid policy.
    pub fn update(
        &mut self,
        policies: &[NetworkPolicy],
        namespaces: &[Namespace],
        pods: &[Pod],
        local: &BTreeSet<Ipv4Addr>,
        podnets: &[Ipv4Net],
    ) -> (Touched, Work, Vec<Problem>) {
        let mut touched = Touched::default();
        let mut work = Work::default();
        let new_pods = pod_views(pods);
        let new_ns = namespace_views(namespaces, &new_pods);

        // What changed among pods and namespaces.
        let mut changed: Vec<(Option<PolicyPod>, Option<PolicyPod>)> = Vec::new();
        for (ip, p) in &new_pods {
            let old = self.pods.get(ip);
            if old != Some(p) {
                changed.push((old.cloned(), Some(p.clone())));
            }
        }
        for (ip, p) in &self.pods {
            if !new_pods.contains_key(ip) {
                changed.push((Some(p.clone()), None));
            }
        }
        let mut ns_changes: Vec<(&str, Option<&Labels>, Option<&Labels>)> = Vec::new();
        for (name, l) in &new_ns {
            if self.namespaces.get(name) != Some(l) {
                ns_changes.push((name, self.namespaces.get(name), Some(l)));
            }
        }
        for (name, l) in &self.namespaces {
            if !new_ns.contains_key(name) {
                ns_changes.push((name, Some(l), None));
            }
        }
        let changed_views: Vec<&PolicyPod> = changed
            .iter()
            .flat_map(|(a, b)| a.iter().chain(b.iter()))
            .collect();

        // Which policies to compile again.
        let wanted: BTreeMap<String, &NetworkPolicy> =
            policies.iter().map(|np| (policy_id(np), np)).collect();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        for (id, np) in &wanted {
            match self.policies.get(id) {
                None => {
                    dirty.insert(id.clone());
                }
                Some((old, _)) if old.spec != np.spec => {
                    dirty.insert(id.clone());
                }
                Some((old, out)) => {
                    if affected_by(
                        old,
                        out,
                        &changed_views,
                        &ns_changes,
                        &self.namespaces,
                        &new_ns,
                    ) {
                        dirty.insert(id.clone());
                    }
                }
            }
        }
        dirty.extend(
            self.policies
                .keys()
                .filter(|id| !wanted.contains_key(*id))
                .cloned(),
        );

        let mut delta: BTreeSet<Ipv4Net> = BTreeSet::new();
        let mut affected: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for (old, new) in &changed {
            match (old, new) {
                (None, Some(p)) => self.reference(Ipv4Net::from(p.ip), &mut delta),
                (Some(p), None) => self.release(Ipv4Net::from(p.ip), &mut delta),
                _ => {}
            }
            affected.extend(old.iter().chain(new.iter()).map(|p| p.ip));
        }
        for id in &dirty {
            if let Some((_, out)) = self.policies.remove(id) {
                for ip in &out.selected {
                    affected.insert(*ip);
                    if let Some(s) = self.selecting.get_mut(ip) {
                        s.remove(id);
                    }
                }
                for net in blocks(&out) {
                    self.release(net, &mut delta);
                }
            }
            match wanted.get(id) {
                Some(np) => {
                    work.policies += 1;
                    let out = compile_policy(np, &new_pods, &new_ns);
                    for ip in &out.selected {
                        affected.insert(*ip);
                        self.selecting.entry(*ip).or_default().insert(id.clone());
                    }
                    for net in blocks(&out) {
                        self.reference(net, &mut delta);
                    }
                    if !self.index.contains_key(id) {
                        let used: BTreeSet<u32> = self.index.values().copied().collect();
                        let free = (0..).find(|i| !used.contains(i)).unwrap_or(0);
                        self.index.insert(id.clone(), free);
                        touched.names.insert(free);
                        let slot = free as usize;
                        if self.desired.policies.len() <= slot {
                            self.desired.policies.resize(slot + 1, String::new());
                        }
                        self.desired.policies[slot] = id.clone();
                    }
                    self.policies.insert(id.clone(), ((*np).clone(), out));
                }
                None => {
                    if let Some(i) = self.index.remove(id) {
                        touched.names.insert(i);
                        self.desired.policies[i as usize].clear();
                    }
                }
            }
        }
        while self.desired.policies.last().is_some_and(String::is_empty) {
            self.desired.policies.pop();
        }
        // Pods whose ipBlock peers gained or lost a known prefix inside them.
        if !delta.is_empty() {
            for (_, out) in self.policies.values() {
                let b = blocks(out);
                if b.iter()
                    .any(|block| delta.iter().any(|d| block.contains(d)))
                {
                    affected.extend(out.selected.iter().copied());
                }
            }
        }
        for net in &delta {
            if self.ipcache_refs.contains_key(net) {
                self.desired.ipcache.insert(*net);
            } else {
                self.desired.ipcache.remove(net);
            }
        }
        touched.ipcache = delta;
        affected.extend(local.symmetric_difference(&self.local).copied());
        self.local = local.clone();
        self.pods = new_pods;
        self.namespaces = new_ns;

        // Rules of the affected pods.
        for ip in &affected {
            let ids = self.selecting.get(ip).cloned().unwrap_or_default();
            if ids.is_empty() {
                self.selecting.remove(ip);
                self.endpoints.remove(ip);
            } else {
                let mut ep = EndpointPolicy::default();
                for id in &ids {
                    if let Some((_, out)) = self.policies.get(id) {
                        out.merge_into(&mut ep);
                    }
                }
                self.endpoints.insert(*ip, ep);
            }
            touched.endpoints.insert(*ip);
            if !self.local.contains(ip) {
                self.desired.endpoints.remove(ip);
                self.desired.rules.remove(ip);
                continue;
            }
            work.endpoints += 1;
            let (flags, rules) = match self.endpoints.get(ip) {
                Some(ep) => {
                    let index = &self.index;
                    rules::endpoint_rules(ep, *ip, &self.desired.ipcache, &self.pods, |n| {
                        index.get(n).copied().unwrap_or(0)
                    })
                }
                None => (0, Default::default()),
            };
            self.desired.endpoints.insert(*ip, flags);
            if rules.is_empty() {
                self.desired.rules.remove(ip);
            } else {
                self.desired.rules.insert(*ip, rules);
            }
        }
        let podnets: BTreeSet<Ipv4Net> = podnets.iter().map(Ipv4Net::trunc).collect();
        if podnets != self.desired.podnets {
            self.desired.podnets = podnets;
            touched.podnets = true;
        }
        let problems = self
            .policies
            .values()
            .flat_map(|(_, out)| out.problems.iter().cloned())
            .collect();
        (touched, work, problems)
    }
}

#[cfg(test)]
mod tests;
