//! The desired service state, computed from Kubernetes objects: which frontends (virtual address,
//! port, protocol) exist and which ready backends each leads to.
//!
//! Pure: no I/O, so every rule (service types, EndpointSlices versus selector-derived endpoints,
//! named target ports, endpoint conditions, bad objects) is unit-tested. Invalid or partial
//! objects are reported as [`Problem`]s and skipped; they never disturb other services.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use weft_proxy_common::proto;

/// The Kubernetes objects the proxy reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// Pods (for selector-derived endpoints and named ports).
    pub pods: Vec<Pod>,
    /// Nodes (for NodePort addresses).
    pub nodes: Vec<Node>,
    /// Namespaces (their labels, for NetworkPolicy namespace selectors).
    pub namespaces: Vec<k8s_openapi::api::core::v1::Namespace>,
    /// NetworkPolicies.
    pub network_policies: Vec<k8s_openapi::api::networking::v1::NetworkPolicy>,
}

/// A service frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    /// Virtual address.
    pub addr: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, proto_name(self.proto))
    }
}

/// A backend endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    /// Address.
    pub addr: Ipv4Addr,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// What one frontend leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// `namespace/name:port` of the service port.
    pub service: String,
    /// Ready backends, those on this node first, each group sorted (an empty set refuses
    /// connections).
    pub backends: Vec<BackendAddr>,
    /// How many of `backends` are on this node (the TC path uses only these).
    pub local_count: usize,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend.
    pub affinity_timeout: Option<u32>,
    /// Annotation `weft.io/lb-algorithm: maglev`: the TC path chooses backends by Maglev
    /// consistent hashing of the flow instead of at random.
    pub maglev: bool,
}

/// The annotation that selects the backend selection algorithm of a service.
pub const LB_ALGORITHM_ANNOTATION: &str = "weft.io/lb-algorithm";

/// The whole desired state.
pub type Desired = BTreeMap<Frontend, FrontendState>;

/// An object that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `Kind namespace/name`.
    pub object: String,
    /// What is wrong.
    pub reason: String,
}

/// Protocol name for display.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::SCTP => "sctp",
        _ => "?",
    }
}

fn proto_of(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        "SCTP" => Some(proto::SCTP),
        _ => None,
    }
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

fn port_u16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// The node's own IPv4 addresses (InternalIP and ExternalIP), for NodePort frontends.
fn node_addrs(objects: &Objects, node_name: &str) -> Vec<Ipv4Addr> {
    objects
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(node_name))
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// The address this node's TC path translates flows to remote backends to: its first
/// InternalIP (else ExternalIP), which other nodes route back to it.
pub fn node_snat_addr(objects: &Objects, node_name: &str) -> Option<Ipv4Addr> {
    let addrs: Vec<(bool, Ipv4Addr)> = objects
        .nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(node_name))
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .filter_map(|a| Some((a.type_ == "InternalIP", a.address.parse().ok()?)))
        .collect();
    addrs
        .iter()
        .find(|(internal, _)| *internal)
        .or(addrs.first())
        .map(|(_, a)| *a)
}

fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

/// Resolves a service port's targetPort on a pod (numeric, or by container port name).
fn target_port(sp: &ServicePort, pod: Option<&Pod>) -> Option<u16> {
    match &sp.target_port {
        None => port_u16(sp.port),
        Some(IntOrString::Int(p)) => port_u16(*p),
        Some(IntOrString::String(name)) => pod?
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| port_u16(cp.container_port)),
    }
}

/// Ready backends of one service port, from its EndpointSlices, else from the pods its selector
/// matches; local ones (on `node`) first, and how many are local.
fn backends(
    objects: &Objects,
    svc: &Service,
    sp: &ServicePort,
    node: &str,
) -> (Vec<BackendAddr>, usize) {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let slices: Vec<&EndpointSlice> = objects
        .slices
        .iter()
        .filter(|s| s.metadata.namespace.as_deref().unwrap_or("default") == ns)
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .map(String::as_str)
                == Some(name)
        })
        .filter(|s| s.address_type == "IPv4")
        .collect();
    let mut out = BTreeSet::new();
    if !slices.is_empty() {
        for slice in slices {
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))
                .and_then(|p| p.port)
                .and_then(port_u16);
            let Some(port) = port else { continue };
            for ep in &slice.endpoints {
                let c = ep.conditions.as_ref();
                // Absent `ready` means ready; terminating endpoints take no new connections.
                let ready = c.and_then(|c| c.ready).unwrap_or(true)
                    && !c.and_then(|c| c.terminating).unwrap_or(false);
                if !ready {
                    continue;
                }
                let remote = ep.node_name.as_deref() != Some(node);
                for a in &ep.addresses {
                    if let Ok(addr) = a.parse() {
                        out.insert((remote, BackendAddr { addr, port }));
                    }
                }
            }
        }
        return split_local(out);
    }
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return (Vec::new(), 0);
    };
    for pod in objects
        .pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == ns)
    {
        if labels_match(selector, pod.metadata.labels.as_ref())
            && pod_ready(pod)
            && let (Some(addr), Some(port)) = (pod_ip(pod), target_port(sp, Some(pod)))
        {
            let remote = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node);
            out.insert((remote, BackendAddr { addr, port }));
        }
    }
    split_local(out)
}

/// Orders backends local first (the set is keyed `(remote, addr)`) and counts the local ones.
fn split_local(set: BTreeSet<(bool, BackendAddr)>) -> (Vec<BackendAddr>, usize) {
    let local = set.iter().filter(|(remote, _)| !remote).count();
    (set.into_iter().map(|(_, b)| b).collect(), local)
}

/// Computes every frontend this node must serve and its backends.
pub fn desired(objects: &Objects, node_name: &str) -> (Desired, Vec<Problem>) {
    let mut out = Desired::new();
    let mut problems = Vec::new();
    let node_addrs = node_addrs(objects, node_name);
    for svc in &objects.services {
        let id = ns_name(&svc.metadata);
        let problem = |reason: String| Problem {
            object: format!("Service {id}"),
            reason,
        };
        let Some(spec) = &svc.spec else {
            problems.push(problem("no spec".into()));
            continue;
        };
        let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
        if ty == "ExternalName" {
            continue;
        }
        // Cluster IPs follow internalTrafficPolicy; external addresses (externalIPs, load balancer
        // ingress, NodePorts) follow externalTrafficPolicy.
        let mut vips: Vec<(Ipv4Addr, bool)> = Vec::new();
        let mut bad = None;
        let cluster_ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
            (_, Some(ip)) => vec![ip],
            _ => vec![],
        };
        let n_cluster = cluster_ips.len();
        for (i, ip) in cluster_ips
            .iter()
            .copied()
            .chain(spec.external_ips.iter().flatten())
            .enumerate()
        {
            if ip == "None" {
                continue; // headless: no virtual address
            }
            match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(a)) => vips.push((a, i >= n_cluster)),
                Ok(std::net::IpAddr::V6(_)) => {} // IPv6 frontends are not served yet
                Err(_) => bad = Some(format!("invalid address {ip:?}")),
            }
        }
        for ing in svc
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
        {
            if let Some(Ok(std::net::IpAddr::V4(a))) = ing.ip.as_ref().map(|i| i.parse()) {
                vips.push((a, true));
            }
        }
        if let Some(reason) = bad {
            problems.push(problem(reason));
            continue;
        }
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(10_800)
        });
        let maglev = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
            .is_some_and(|v| v == "maglev");
        for sp in spec.ports.iter().flatten() {
            let (Some(port), Some(p)) = (port_u16(sp.port), proto_of(sp.protocol.as_deref()))
            else {
                problems.push(problem(format!(
                    "invalid port {} / protocol {:?}",
                    sp.port, sp.protocol
                )));
                continue;
            };
            let (all, local_count) = backends(objects, svc, sp, node_name);
            let state = FrontendState {
                service: format!(
                    "{id}:{}",
                    sp.name.as_deref().unwrap_or(&sp.port.to_string())
                ),
                backends: all,
                local_count,
                affinity_timeout: affinity,
                maglev,
            };
            let local_only = FrontendState {
                backends: state.backends[..local_count].to_vec(),
                ..state.clone()
            };
            let internal = if spec.internal_traffic_policy.as_deref() == Some("Local") {
                &local_only
            } else {
                &state
            };
            let external = if spec.external_traffic_policy.as_deref() == Some("Local") {
                &local_only
            } else {
                &state
            };
            for (addr, is_external) in &vips {
                let s = if *is_external { external } else { internal };
                out.insert(
                    Frontend {
                        addr: *addr,
                        port,
                        proto: p,
                    },
                    s.clone(),
                );
            }
            if matches!(ty, "NodePort" | "LoadBalancer")
                && let Some(np) = sp.node_port.and_then(port_u16)
            {
                for addr in &node_addrs {
                    out.insert(
                        Frontend {
                            addr: *addr,
                            port: np,
                            proto: p,
                        },
                        external.clone(),
                    );
                }
            }
        }
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(yaml: &str) -> Objects {
        crate::manifests::parse_str(yaml, "test").0
    }

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.7]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP, targetPort: 5353}]
"#;

    fn pod(name: &str, ip: &str, ready: bool) -> String {
        format!(
            r#"
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
spec: {{containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{}"}}]}}
"#,
            if ready { "True" } else { "False" }
        )
    }

    #[test]
    fn selector_endpoints_use_ready_pods_and_named_ports() {
        let o = objs(&format!(
            "{SVC}{}{}",
            pod("a", "10.244.0.5", true),
            pod("b", "10.244.0.6", false)
        ));
        let (d, problems) = desired(&o, "n1");
        assert!(problems.is_empty(), "{problems:?}");
        let http = &d[&Frontend {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: proto::TCP,
        }];
        assert_eq!(
            http.backends,
            vec![BackendAddr {
                addr: "10.244.0.5".parse().unwrap(),
                port: 8080
            }]
        );
        assert_eq!(http.service, "default/web:http");
        let dns = &d[&Frontend {
            addr: "10.96.0.10".parse().unwrap(),
            port: 53,
            proto: proto::UDP,
        }];
        assert_eq!(dns.backends[0].port, 5353);
        assert!(d.contains_key(&Frontend {
            addr: "192.0.2.7".parse().unwrap(),
            port: 80,
            proto: proto::TCP
        }));
    }

    #[test]
    fn endpoint_slices_win_and_conditions_are_respected() {
        let slice = r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9000}]
endpoints:
- addresses: [10.244.1.1]
- addresses: [10.244.1.2]
  conditions: {ready: false}
- addresses: [10.244.1.3]
  conditions: {ready: true, terminating: true}
- addresses: [10.244.1.4]
  conditions: {ready: true}
"#;
        let o = objs(&format!("{SVC}{}{slice}", pod("a", "10.244.0.5", true)));
        let (d, _) = desired(&o, "n1");
        let http = &d[&Frontend {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: proto::TCP,
        }];
        let addrs: Vec<String> = http.backends.iter().map(|b| b.to_string()).collect();
        assert_eq!(addrs, vec!["10.244.1.1:9000", "10.244.1.4:9000"]);
        // The slice has no "dns" port: that frontend has no backends and will refuse.
        assert!(
            d[&Frontend {
                addr: "10.96.0.10".parse().unwrap(),
                port: 53,
                proto: proto::UDP
            }]
                .backends
                .is_empty()
        );
    }

    #[test]
    fn session_affinity_and_its_timeout() {
        let yaml = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.40, sessionAffinity: ClientIP,\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ports: [{port: 80}]}\n---\n\
                    kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.41, sessionAffinity: ClientIP, ports: [{port: 80}]}\n---\n\
                    kind: Service\nmetadata: {name: c}\nspec: {clusterIP: 10.96.0.42, ports: [{port: 80}]}\n";
        let (d, _) = desired(&objs(yaml), "n1");
        let t = |a: &str| {
            d[&Frontend {
                addr: a.parse().unwrap(),
                port: 80,
                proto: proto::TCP,
            }]
                .affinity_timeout
        };
        assert_eq!(
            (t("10.96.0.40"), t("10.96.0.41"), t("10.96.0.42")),
            (Some(60), Some(10_800), None)
        );
    }

    #[test]
    fn the_maglev_annotation_is_read() {
        let yaml = "kind: Service\nmetadata: {name: a, annotations: {weft.io/lb-algorithm: maglev}}\n\
                    spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}\n---\n\
                    kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.51, ports: [{port: 80}]}\n";
        let (d, _) = desired(&objs(yaml), "n1");
        let m = |a: &str| {
            d[&Frontend {
                addr: a.parse().unwrap(),
                port: 80,
                proto: proto::TCP,
            }]
                .maglev
        };
        assert!(m("10.96.0.50") && !m("10.96.0.51"));
    }

    #[test]
    fn nodeports_use_this_nodes_addresses() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec: {type: NodePort, clusterIP: 10.96.0.20, ports: [{port: 80, nodePort: 30080}], selector: {app: x}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.200.0.10}, {type: Hostname, address: n1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 10.200.0.11}]}
"#;
        let (d, _) = desired(&objs(yaml), "n1");
        assert!(d.contains_key(&Frontend {
            addr: "10.200.0.10".parse().unwrap(),
            port: 30080,
            proto: proto::TCP
        }));
        assert!(!d.contains_key(&Frontend {
            addr: "10.200.0.11".parse().unwrap(),
            port: 30080,
            proto: proto::TCP
        }));
    }

    #[test]
    fn bad_services_are_reported_and_skipped() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: bad}
spec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badport}
spec: {clusterIP: 10.96.0.31, ports: [{port: 80, protocol: ICMP}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
"#;
        let (d, problems) = desired(&objs(yaml), "n1");
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].object.contains("default/bad")
                && problems[0].reason.contains("10.96.0.999")
        );
    }
}
