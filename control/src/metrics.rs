//! `metrics.k8s.io/v1beta1` as metrics-server serves it, which `kubectl top node|pod` reads:
//! NodeMetrics and PodMetrics made on each request from the nodes' Summary API
//! (`/stats/summary`, [`weft_node::stats`]) and never stored. The API server asks every node
//! concerned at once; a node that does not answer within [`NODE_TIMEOUT`] is left out, as
//! metrics-server leaves out a node it could not scrape.
//!
//! Built in rather than an aggregated API server: the API server already reaches every node's
//! endpoint (logs, exec), so a second process and an APIService would only add a hop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::resources::{self, METRICS, Resource};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::Store;
use weft_node::stats::{CpuStats, MemoryStats, Summary};

/// The group and version.
pub const GROUP: &str = "metrics.k8s.io";
/// The version served.
pub const VERSION: &str = "v1beta1";

/// How long a node may take to give its summary.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request for metrics.
#[derive(Debug)]
pub struct Request {
    /// [`METRICS`]' nodes or pods.
    pub resource: &'static Resource,
    /// The namespace of pods asked for (`None`: all).
    pub namespace: Option<String>,
    /// One object's name.
    pub name: Option<String>,
}

impl Request {
    /// The verb the request is authorized as.
    pub fn verb(&self) -> &'static str {
        if self.name.is_some() { "get" } else { "list" }
    }
}

fn nodes() -> &'static Resource {
    &METRICS[0]
}

fn pods() -> &'static Resource {
    &METRICS[1]
}

/// The metrics request a path is, if it is one.
pub fn parse(parts: &[&str]) -> Option<Request> {
    let rest = match parts {
        ["apis", GROUP, VERSION, rest @ ..] => rest,
        _ => return None,
    };
    let req = |resource, namespace: Option<&str>, name: Option<&str>| Request {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    };
    Some(match rest {
        ["nodes"] => req(nodes(), None, None),
        ["nodes", name] => req(nodes(), None, Some(name)),
        ["pods"] => req(pods(), None, None),
        ["namespaces", ns, "pods"] => req(pods(), Some(ns), None),
        ["namespaces", ns, "pods", name] => req(pods(), Some(ns), Some(name)),
        _ => return None,
    })
}

/// The group's entry in `/apis`.
pub fn group() -> Value {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"name": GROUP, "versions": [gv.clone()], "preferredVersion": gv})
}

/// Discovery documents of the group (`/apis/metrics.k8s.io[/v1beta1]`).
pub fn discovery(parts: &[&str]) -> Option<Value> {
    match parts {
        ["apis", GROUP] => {
            let mut g = group();
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            Some(g)
        }
        ["apis", GROUP, VERSION] => Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"),
            "resources": METRICS.iter().map(|r| json!({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "list"],
            })).collect::<Vec<_>>(),
        })),
        _ => None,
    }
}

/// A CPU rate as a quantity of nanocores, as metrics-server writes it.
fn cpu_quantity(nano_cores: u64) -> String {
    format!("{nano_cores}n")
}

/// Bytes as a quantity of kibibytes, as metrics-server writes memory.
fn memory_quantity(bytes: u64) -> String {
    format!("{}Ki", bytes / 1024)
}

/// A usage object, when both CPU has a rate and memory is known (metrics-server leaves out
/// what it cannot rate yet).
fn usage(cpu: Option<&CpuStats>, memory: Option<&MemoryStats>) -> Option<(String, Value)> {
    let (cpu, memory) = (cpu?, memory?);
    let cores = cpu.usage_nano_cores?;
    Some((
        cpu.time.clone(),
        json!({"cpu": cpu_quantity(cores), "memory": memory_quantity(memory.working_set_bytes)}),
    ))
}

/// The window reported with each sample: the node samples at least this often.
fn window() -> String {
    format!("{}s", weft_node::stats::SAMPLE_EVERY.as_secs())
}

/// Asks each node for its summary, at once; nodes that fail are logged and left out.
async fn summaries(
    tls: Option<&Arc<rustls::ClientConfig>>,
    nodes: &[Value],
) -> HashMap<String, Summary> {
    let asks = nodes.iter().map(|node| async move {
        let name = node["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let target = crate::server::node_endpoint(node).map_err(|e| e.to_string())?;
        let fetch = async {
            let answer = weft_node::stream::get(&target, "/stats/summary", tls).await?;
            let code = answer.status();
            let body = http_body_util::BodyExt::collect(answer.into_body())
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !code.is_success() {
                return Err(format!("{code}: {}", String::from_utf8_lossy(&body).trim()));
            }
            serde_json::from_slice::<Summary>(&body).map_err(|e| e.to_string())
        };
        let summary = tokio::time::timeout(NODE_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("no answer within {NODE_TIMEOUT:?}"))??;
        Ok::<_, String>((name, summary))
    });
    let mut out = HashMap::new();
    for (node, answer) in nodes.iter().zip(futures::future::join_all(asks).await) {
        match answer {
            Ok((name, s)) => {
                out.insert(name, s);
            }
            Err(e) => tracing::warn!(
                node = node["metadata"]["name"].as_str().unwrap_or(""),
                error = %e,
                "no resource usage from the node"
            ),
        }
    }
    out
}

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let bad = |e: crate::selector::SelectorError| ApiError::BadRequest(e.to_string());
    let labels =
        LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str)).map_err(bad)?;
    let fields =
        FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str)).map_err(bad)?;
    Ok((labels, fields))
}

fn metadata(object: &Value, now: &str) -> Value {
    let m = &object["metadata"];
    let mut out = json!({"name": m["name"], "creationTimestamp": now});
    if m["namespace"].is_string() {
        out["namespace"] = m["namespace"].clone();
    }
    if m["labels"].is_object() {
        out["labels"] = m["labels"].clone();
    }
    out
}

fn not_found(r: &Resource, name: &str) -> ApiError {
    ApiError::NotFound {
        kind: format!("{}.{}", r.kind.to_lowercase(), GROUP),
        name: name.to_owned(),
    }
}

fn list(r: &Resource, items: Vec<Value>) -> Value {
    json!({"kind": format!("{}List", r.kind), "apiVersion": format!("{GROUP}/{VERSION}"),
           "metadata": {}, "items": items})
}

/// Answers a metrics request.
pub async fn serve(
    store: &Store,
    tls: Option<&Arc<rustls::ClientConfig>>,
    req: &Request,
    query: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let (labels, fields) = selectors(query)?;
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let node_r = resources::find("", "v1", "nodes").expect("served");
    let pod_r = resources::find("", "v1", "pods").expect("served");
    let named = |o: &Value| {
        req.name
            .as_deref()
            .is_none_or(|n| o["metadata"]["name"] == n)
    };
    if std::ptr::eq(req.resource, nodes()) {
        let (_, all) = store.list(node_r, None, |o| {
            named(o) && labels.matches(o) && fields.matches(o)
        });
        let by_node = summaries(tls, &all).await;
        let items: Vec<Value> = all
            .iter()
            .filter_map(|node| {
                let s = by_node.get(node["metadata"]["name"].as_str()?)?;
                let (time, usage) = usage(s.node.cpu.as_ref(), s.node.memory.as_ref())?;
                Some(json!({"metadata": metadata(node, &now), "timestamp": time,
                            "window": window(), "usage": usage}))
            })
            .collect();
        return one_or_list(req, items);
    }
    let (_, all) = store.list(pod_r, req.namespace.as_deref(), |o| {
        named(o) && labels.matches(o) && fields.matches(o)
    });
    let wanted: Vec<&str> = all
        .iter()
        .filter_map(|p| p.pointer("/spec/nodeName").and_then(Value::as_str))
        .collect();
    let (_, hosts) = store.list(node_r, None, |n| {
        n["metadata"]["name"]
            .as_str()
            .is_some_and(|name| wanted.contains(&name))
    });
    let by_node = summaries(tls, &hosts).await;
    let items: Vec<Value> = all
        .iter()
        .filter_map(|pod| {
            let node = pod.pointer("/spec/nodeName").and_then(Value::as_str)?;
            let uid = pod.pointer("/metadata/uid").and_then(Value::as_str)?;
            let stats = by_node
                .get(node)?
                .pods
                .iter()
                .find(|p| p.pod_ref.uid == uid)?;
            let mut time = String::new();
            let mut containers = Vec::new();
            for c in &stats.containers {
                let (t, u) = usage(c.cpu.as_ref(), c.memory.as_ref())?;
                time = time.max(t);
                containers.push(json!({"name": c.name, "usage": u}));
            }
            (!containers.is_empty()).then(|| {
                json!({"metadata": metadata(pod, &now), "timestamp": time,
                       "window": window(), "containers": containers})
            })
        })
        .collect();
    one_or_list(req, items)
}

/// The list, or its one object for a request by name (NotFound when there is none).
fn one_or_list(req: &Request, mut items: Vec<Value>) -> Result<Value, ApiError> {
    let api_version = format!("{GROUP}/{VERSION}");
    match &req.name {
        Some(name) => {
            let mut one = items.pop().ok_or_else(|| {
                let shown = match &req.namespace {
                    Some(ns) => format!("{ns}/{name}"),
                    None => name.clone(),
                };
                not_found(req.resource, &shown)
            })?;
            one["kind"] = json!(req.resource.kind);
            one["apiVersion"] = json!(api_version);
            Ok(one)
        }
        None => Ok(list(req.resource, items)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_as_metrics_server_serves_them() {
        let p = |s: &str| parse(&s.split('/').filter(|x| !x.is_empty()).collect::<Vec<_>>());
        let r = p("/apis/metrics.k8s.io/v1beta1/nodes").unwrap();
        assert_eq!((r.resource.kind, r.verb()), ("NodeMetrics", "list"));
        let r = p("/apis/metrics.k8s.io/v1beta1/nodes/n1").unwrap();
        assert_eq!((r.name.as_deref(), r.verb()), (Some("n1"), "get"));
        let r = p("/apis/metrics.k8s.io/v1beta1/namespaces/demo/pods/web").unwrap();
        assert_eq!(r.resource.kind, "PodMetrics");
        assert_eq!(r.namespace.as_deref(), Some("demo"));
        assert_eq!(
            p("/apis/metrics.k8s.io/v1beta1/pods").unwrap().namespace,
            None
        );
        assert!(p("/apis/metrics.k8s.io/v1beta1/services").is_none());
        assert!(p("/apis/apps/v1/deployments").is_none());
    }

    #[test]
    fn quantities_are_written_as_metrics_server_writes_them() {
        assert_eq!(cpu_quantity(1_500_000), "1500000n");
        assert_eq!(memory_quantity(10 * 1024 * 1024 + 100), "10240Ki");
        let cpu = CpuStats {
            time: "t".into(),
            usage_nano_cores: None,
            usage_core_nano_seconds: 5,
        };
        let mem = MemoryStats {
            time: "t".into(),
            working_set_bytes: 2048,
            usage_bytes: 4096,
        };
        assert_eq!(usage(Some(&cpu), Some(&mem)), None, "no rate yet: left out");
        let cpu = CpuStats {
            usage_nano_cores: Some(7),
            ..cpu
        };
        assert_eq!(
            usage(Some(&cpu), Some(&mem)),
            Some(("t".into(), json!({"cpu": "7n", "memory": "2Ki"})))
        );
    }
}
