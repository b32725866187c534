//! NetworkPolicy (`networking.k8s.io/v1`) semantics, computed in user space.
//!
//! From NetworkPolicy, Namespace and Pod objects this module computes, for every pod with an IP,
//! whether it is isolated for ingress and for egress and which rules allow traffic in each isolated
//! direction ([`Compiled`]). [`Compiled::allows`] answers "may a connection from A to B on this
//! protocol and port start?" with upstream semantics; it is the reference the eBPF datapath's maps
//! are generated from and checked against.
//!
//! Semantics (upstream's, as its e2e suite tests them):
//! * a pod is isolated in a direction when some policy in its namespace selects it and has that
//!   direction in `policyTypes` (defaulted: `Ingress`, plus `Egress` when egress rules exist);
//! * policies are additive; a connection needs the source's egress and the destination's ingress;
//! * a peer's `podSelector` and `namespaceSelector` together mean both (AND), separate peers mean
//!   either (OR); `namespaceSelector` matches namespace labels, which always include
//!   `kubernetes.io/metadata.name`; `ipBlock` matches any address in its CIDR and none of its
//!   `except` prefixes (pods included);
//! * ports: protocol defaults to TCP, an absent port means every port of that protocol, `endPort`
//!   makes a range, a named port resolves against the destination pod's container ports (so an
//!   egress rule with a named port never matches a non-pod destination);
//! * an invalid policy (bad selector, CIDR, protocol, or `endPort` below `port`) is reported and
//!   fails closed: the pods it selects are isolated in its directions and it allows nothing; if its
//!   own pod selector is the invalid part, every pod of its namespace is isolated.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::Problem;

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Transport protocols a policy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Proto {
    /// Parses a `protocol` field (absent means TCP).
    pub fn parse(s: Option<&str>) -> Result<Proto, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            "SCTP" => Ok(Proto::Sctp),
            other => Err(format!("protocol {other:?} is not one of TCP, UDP, SCTP")),
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }
}

/// Which ports of which protocol a rule allows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port of every protocol (a rule without `ports`).
    All,
    /// A range of one protocol (`port`..=`endPort`; every port when the port is absent).
    Range(Proto, u16, u16),
    /// A named container port of the destination pod.
    Named(Proto, String),
}

/// Who a rule allows to talk (to an isolated pod, or be talked to by one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// Anyone (a rule without `from` / `to`).
    Any,
    /// These pods, by IP.
    Pods(BTreeSet<Ipv4Addr>),
    /// Addresses in `cidr` but in none of `except`.
    Block {
        /// The block.
        cidr: Ipv4Net,
        /// Carved out of it.
        except: Vec<Ipv4Net>,
    },
}

impl PeerMatch {
    fn matches(&self, ip: Ipv4Addr) -> bool {
        match self {
            PeerMatch::Any => true,
            PeerMatch::Pods(ips) => ips.contains(&ip),
            PeerMatch::Block { cidr, except } => {
                cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
            }
        }
    }
}

/// One allow rule of one policy, in one direction, for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `namespace/name` of the policy it came from (for flow events).
    pub policy: String,
    /// Peers (any of them).
    pub peers: Vec<PeerMatch>,
    /// Ports (any of them).
    pub ports: Vec<PortMatch>,
}

/// A pod's isolation: `None` in a direction means not isolated (everything allowed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Ingress rules if isolated for ingress.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules if isolated for egress.
    pub egress: Option<Vec<Rule>>,
}

/// A pod as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Named container ports: (name, protocol) → port.
    pub named_ports: BTreeMap<(String, Proto), u16>,
}

/// The outcome for every pod.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// Pods by IP.
    pub pods: BTreeMap<Ipv4Addr, PolicyPod>,
    /// Isolation and rules by pod IP.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
}

/// Which rule decided a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; by this policy, or `None` when the side is not isolated.
    Allow(Option<String>),
    /// Denied by isolation with no matching rule.
    DefaultDeny,
}

impl Compiled {
    fn side(
        &self,
        rules: Option<&Vec<Rule>>,
        peer: Ipv4Addr,
        dst_pod: Option<&PolicyPod>,
        proto: Proto,
        port: u16,
    ) -> Verdict {
        let Some(rules) = rules else {
            return Verdict::Allow(None);
        };
        for r in rules {
            let peer_ok = r.peers.iter().any(|p| p.matches(peer));
            let port_ok = r.ports.iter().any(|p| match p {
                PortMatch::All => true,
                PortMatch::Range(pr, a, b) => *pr == proto && (*a..=*b).contains(&port),
                PortMatch::Named(pr, name) => {
                    *pr == proto
                        && dst_pod
                            .and_then(|d| d.named_ports.get(&(name.clone(), proto)))
                            .is_some_and(|p| *p == port)
                }
            });
            if peer_ok && port_ok {
                return Verdict::Allow(Some(r.policy.clone()));
            }
        }
        Verdict::DefaultDeny
    }

    /// The egress verdict at `src` for a connection to `dst`.
    pub fn egress(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: Proto, port: u16) -> Verdict {
        let rules = self.endpoints.get(&src).and_then(|e| e.egress.as_ref());
        self.side(rules, dst, self.pods.get(&dst), proto, port)
    }

    /// The ingress verdict at `dst` for a connection from `src`.
    pub fn ingress(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: Proto, port: u16) -> Verdict {
        let rules = self.endpoints.get(&dst).and_then(|e| e.ingress.as_ref());
        self.side(rules, src, self.pods.get(&dst), proto, port)
    }

    /// Whether a connection from `src` to `dst` may start: egress at the source and ingress at the
    /// destination both allow it (or it is a pod talking to itself).
    pub fn allows(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: Proto, port: u16) -> bool {
        // A pod reaching itself never leaves its network namespace (upstream's e2e suite allows
        // loopback in every scenario too).
        if src == dst {
            return true;
        }
        matches!(self.egress(src, dst, proto, port), Verdict::Allow(_))
            && matches!(self.ingress(src, dst, proto, port), Verdict::Allow(_))
    }
}

/// One side's verdict, for people and flow events.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SideTrace {
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// Why: `not isolated`, `policy ns/name`, or `default deny`.
    pub reason: String,
}

/// Both sides of a connection's verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Trace {
    /// The source pod (`namespace/name`), if the source is a pod.
    pub from_pod: Option<String>,
    /// The destination pod, if the destination is a pod.
    pub to_pod: Option<String>,
    /// Egress at the source.
    pub egress: SideTrace,
    /// Ingress at the destination.
    pub ingress: SideTrace,
    /// Whether the connection may start.
    pub allowed: bool,
}

fn side_trace(v: Verdict) -> SideTrace {
    match v {
        Verdict::Allow(None) => SideTrace {
            verdict: "allow",
            reason: "not isolated".into(),
        },
        Verdict::Allow(Some(p)) => SideTrace {
            verdict: "allow",
            reason: format!("policy {p}"),
        },
        Verdict::DefaultDeny => SideTrace {
            verdict: "deny",
            reason: "default deny".into(),
        },
    }
}

impl Compiled {
    /// Both verdicts of a connection, with the reasons.
    pub fn trace(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: Proto, port: u16) -> Trace {
        let name = |ip| {
            self.pods
                .get(&ip)
                .map(|p: &PolicyPod| format!("{}/{}", p.namespace, p.name))
        };
        let egress = side_trace(self.egress(src, dst, proto, port));
        let ingress = side_trace(self.ingress(src, dst, proto, port));
        Trace {
            from_pod: name(src),
            to_pod: name(dst),
            allowed: egress.verdict == "allow" && ingress.verdict == "allow",
            egress,
            ingress,
        }
    }
}

/// Whether `labels` match a label selector; an error names what is invalid in the selector.
pub fn selector_matches(
    sel: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    if let Some(ml) = &sel.match_labels
        && ml.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return Ok(false);
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "selector: operator {} on {:?} needs values",
                    e.operator, e.key
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                    "selector: operator {} on {:?} takes no values",
                    e.operator, e.key
                ));
            }
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => !have.is_some_and(|v| values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => {
                return Err(format!(
                    "selector: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                ));
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn pod_view(pod: &Pod) -> Option<PolicyPod> {
    let ip: Ipv4Addr = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    let mut named_ports = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        for p in c.ports.iter().flatten() {
            if let (Some(name), Ok(proto)) = (&p.name, Proto::parse(p.protocol.as_deref())) {
                named_ports.insert((name.clone(), proto), p.container_port as u16);
            }
        }
    }
    Some(PolicyPod {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        ip,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        named_ports,
    })
}

/// Namespace labels by name, with `kubernetes.io/metadata.name` always set, including for
/// namespaces only known from their pods.
fn namespace_labels(
    namespaces: &[Namespace],
    pods: &BTreeMap<Ipv4Addr, PolicyPod>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for ns in namespaces {
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        out.insert(name, labels);
    }
    for p in pods.values() {
        out.entry(p.namespace.clone()).or_insert_with(|| {
            BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), p.namespace.clone())])
        });
    }
    out
}

struct Ctx<'a> {
    pods: &'a BTreeMap<Ipv4Addr, PolicyPod>,
    namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
}

impl Ctx<'_> {
    fn peer(&self, policy_ns: &str, peer: &NetworkPolicyPeer) -> Result<PeerMatch, String> {
        if let Some(block) = &peer.ip_block {
            if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                return Err("a peer with ipBlock may not also have selectors".into());
            }
            let cidr: Ipv4Net = block
                .cidr
                .parse()
                .map_err(|_| format!("ipBlock.cidr {:?} is not an IPv4 CIDR", block.cidr))?;
            let mut except = Vec::new();
            for e in block.except.iter().flatten() {
                let net: Ipv4Net = e
                    .parse()
                    .map_err(|_| format!("ipBlock.except {e:?} is not an IPv4 CIDR"))?;
                if !cidr.contains(&net) {
                    return Err(format!("ipBlock.except {e} is not inside {cidr}"));
                }
                except.push(net);
            }
            return Ok(PeerMatch::Block {
                cidr: cidr.trunc(),
                except,
            });
        }
        let mut ips = BTreeSet::new();
        for p in self.pods.values() {
            let ns_ok = match &peer.namespace_selector {
                None => p.namespace == policy_ns,
                Some(sel) => selector_matches(sel, &self.namespaces[&p.namespace])?,
            };
            let pod_ok = match &peer.pod_selector {
                None => true,
                Some(sel) => selector_matches(sel, &p.labels)?,
            };
            if ns_ok && pod_ok {
                ips.insert(p.ip);
            }
        }
        // Selectors are checked even when no pod exists to exercise them.
        if let Some(sel) = &peer.namespace_selector {
            selector_matches(sel, &BTreeMap::new())?;
        }
        if let Some(sel) = &peer.pod_selector {
            selector_matches(sel, &BTreeMap::new())?;
        }
        Ok(PeerMatch::Pods(ips))
    }

    fn rule(
        &self,
        policy: &str,
        policy_ns: &str,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
    ) -> Result<Rule, String> {
        let peers = match peers {
            None => vec![PeerMatch::Any],
            Some(v) if v.is_empty() => vec![PeerMatch::Any],
            Some(v) => v
                .iter()
                .map(|p| self.peer(policy_ns, p))
                .collect::<Result<_, _>>()?,
        };
        let ports = match ports {
            None => vec![PortMatch::All],
            Some(v) if v.is_empty() => vec![PortMatch::All],
            Some(v) => v.iter().map(port).collect::<Result<_, _>>()?,
        };
        Ok(Rule {
            policy: policy.to_string(),
            peers,
            ports,
        })
    }
}

fn port(p: &NetworkPolicyPort) -> Result<PortMatch, String> {
    let proto = Proto::parse(p.protocol.as_deref())?;
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortMatch::Range(proto, 0, u16::MAX)),
        (None, Some(_)) => Err("endPort needs a numeric port".into()),
        (Some(IntOrString::String(name)), None) => Ok(PortMatch::Named(proto, name.clone())),
        (Some(IntOrString::String(_)), Some(_)) => {
            Err("endPort cannot be used with a named port".into())
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = u16::try_from(*n)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("port {n} is not a port number"))?;
            let last = match end {
                None => first,
                Some(e) => {
                    let e = u16::try_from(e)
                        .map_err(|_| format!("endPort {e} is not a port number"))?;
                    if e < first {
                        return Err(format!("endPort {e} is below port {first}"));
                    }
                    e
                }
            };
            Ok(PortMatch::Range(proto, first, last))
        }
    }
}

/// The directions a policy applies to: `policyTypes`, or the default.
fn directions(spec: &NetworkPolicySpec) -> Result<(bool, bool), String> {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            let mut ingress = false;
            let mut egress = false;
            for t in types {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        return Err(format!("policyTypes: {other:?} is not Ingress or Egress"));
                    }
                }
            }
            Ok((ingress, egress))
        }
        _ => Ok((true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))),
    }
}

/// What one policy contributes: the pods it selects and, per direction it applies to, its
/// rules (empty when it is invalid: it then isolates and allows nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOutput {
    /// `namespace/name`.
    pub id: String,
    /// Pods it selects.
    pub selected: BTreeSet<Ipv4Addr>,
    /// Ingress rules, if it applies to ingress.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules, if it applies to egress.
    pub egress: Option<Vec<Rule>>,
    /// What is wrong with it.
    pub problems: Vec<Problem>,
}

impl PolicyOutput {
    /// Adds its rules to a pod it selects.
    pub fn merge_into(&self, ep: &mut EndpointPolicy) {
        if let Some(r) = &self.ingress {
            ep.ingress
                .get_or_insert_with(Vec::new)
                .extend(r.iter().cloned());
        }
        if let Some(r) = &self.egress {
            ep.egress
                .get_or_insert_with(Vec::new)
                .extend(r.iter().cloned());
        }
    }
}

/// `namespace/name` of a policy.
pub fn policy_id(np: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        np.metadata.namespace.as_deref().unwrap_or("default"),
        np.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Pods as policy sees them (those with an IP), by IP.
pub fn pod_views(pods: &[Pod]) -> BTreeMap<Ipv4Addr, PolicyPod> {
    pods.iter()
        .filter_map(pod_view)
        .map(|p| (p.ip, p))
        .collect()
}

/// Namespace labels by name (see [`compile`]).
pub fn namespace_views(
    namespaces: &[Namespace],
    pods: &BTreeMap<Ipv4Addr, PolicyPod>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    namespace_labels(namespaces, pods)
}

/// Computes one policy against the pods and namespace labels given.
pub fn compile_policy(
    np: &NetworkPolicy,
    pods: &BTreeMap<Ipv4Addr, PolicyPod>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> PolicyOutput {
    let ctx = Ctx { pods, namespaces };
    let ns = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let id = policy_id(np);
    let spec = np.spec.clone().unwrap_or_default();
    let pod_selector = spec.pod_selector.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let report = |problems: &mut Vec<Problem>, reason: String| {
        problems.push(Problem {
            object: format!("NetworkPolicy {id}"),
            reason: format!("{reason}; the pods it selects allow nothing from it (fail closed)"),
        });
    };
    // Who it selects; with an invalid pod selector, the whole namespace.
    let mut invalid = false;
    let selected: BTreeSet<Ipv4Addr> = match pods
        .values()
        .filter(|p| p.namespace == ns)
        .map(|p| selector_matches(&pod_selector, &p.labels).map(|m| (p.ip, m)))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            selector_matches(&pod_selector, &BTreeMap::new())?;
            Ok(v)
        }) {
        Ok(v) => v
            .into_iter()
            .filter(|(_, m)| *m)
            .map(|(ip, _)| ip)
            .collect(),
        Err(e) => {
            report(&mut problems, format!("podSelector: {e}"));
            invalid = true;
            pods.values()
                .filter(|p| p.namespace == ns)
                .map(|p| p.ip)
                .collect()
        }
    };
    let (ingress, egress) = match directions(&spec) {
        Ok(d) => d,
        Err(e) => {
            report(&mut problems, e);
            invalid = true;
            (true, true)
        }
    };
    let rules = (|| -> Result<(Vec<Rule>, Vec<Rule>), String> {
        let mut ing = Vec::new();
        let mut eg = Vec::new();
        if ingress {
            for r in spec.ingress.iter().flatten() {
                ing.push(ctx.rule(&id, &ns, r.from.as_ref(), r.ports.as_ref())?);
            }
        }
        if egress {
            for r in spec.egress.iter().flatten() {
                eg.push(ctx.rule(&id, &ns, r.to.as_ref(), r.ports.as_ref())?);
            }
        }
        Ok((ing, eg))
    })();
    let (ing_rules, eg_rules) = match rules {
        Ok(r) if !invalid => r,
        Ok(_) => (Vec::new(), Vec::new()),
        Err(e) => {
            report(&mut problems, e);
            (Vec::new(), Vec::new())
        }
    };
    PolicyOutput {
        id,
        selected,
        ingress: ingress.then_some(ing_rules),
        egress: egress.then_some(eg_rules),
        problems,
    }
}

/// Computes every pod's isolation and rules. Invalid policies are reported and fail closed.
pub fn compile(
    policies: &[NetworkPolicy],
    namespaces: &[Namespace],
    pods: &[Pod],
) -> (Compiled, Vec<Problem>) {
    let pods = pod_views(pods);
    let ns_labels = namespace_labels(namespaces, &pods);
    let mut endpoints: BTreeMap<Ipv4Addr, EndpointPolicy> = BTreeMap::new();
    let mut problems = Vec::new();
    for np in policies {
        let out = compile_policy(np, &pods, &ns_labels);
        for ip in &out.selected {
            out.merge_into(endpoints.entry(*ip).or_default());
        }
        problems.extend(out.problems);
    }
    (Compiled { pods, endpoints }, problems)
}

pub mod engine;
pub mod rules;

#[cfg(test)]
mod tests;
