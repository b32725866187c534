//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), which is what
//! `kubectl get` asks for: per kind the columns kubectl shows for kube-apiserver, with `-o wide`
//! columns at priority 1.

use serde_json::{Value, json};

use crate::resources::Resource;

/// Whether the client asked for a Table.
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn age(object: &Value) -> String {
    let Some(created) = object
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 3 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn s<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

fn selector(map: Option<&Value>) -> String {
    map.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Column names (with priority) and the cells of one object, for a kind.
fn columns(kind: &str) -> Vec<(&'static str, u8)> {
    match kind {
        "Pod" => vec![
            ("Name", 0),
            ("Ready", 0),
            ("Status", 0),
            ("Restarts", 0),
            ("Age", 0),
            ("IP", 1),
            ("Node", 1),
        ],
        "Service" => vec![
            ("Name", 0),
            ("Type", 0),
            ("Cluster-IP", 0),
            ("External-IP", 0),
            ("Port(s)", 0),
            ("Age", 0),
            ("Selector", 1),
        ],
        "Namespace" => vec![("Name", 0), ("Status", 0), ("Age", 0)],
        "Node" => vec![
            ("Name", 0),
            ("Status", 0),
            ("Age", 0),
            ("Internal-IP", 1),
            ("Pod-CIDR", 1),
        ],
        "NetworkPolicy" => vec![("Name", 0), ("Pod-Selector", 0), ("Age", 0)],
        "EndpointSlice" => vec![
            ("Name", 0),
            ("AddressType", 0),
            ("Ports", 0),
            ("Endpoints", 0),
            ("Age", 0),
        ],
        _ => vec![("Name", 0), ("Age", 0)],
    }
}

fn cells(kind: &str, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(age(o));
    match kind {
        "Pod" => {
            let containers = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let ready = statuses.map_or(0, |v| v.iter().filter(|c| c["ready"] == true).count());
            let restarts: u64 = statuses.map_or(0, |v| {
                v.iter().filter_map(|c| c["restartCount"].as_u64()).sum()
            });
            vec![
                name,
                json!(format!("{ready}/{containers}")),
                json!(s(o, "/status/phase")),
                json!(restarts),
                age,
                json!(or_none(s(o, "/status/podIP").into())),
                json!(or_none(s(o, "/spec/nodeName").into())),
            ]
        }
        "Service" => {
            let ports = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let proto = p["protocol"].as_str().unwrap_or("TCP");
                            match p["nodePort"].as_u64() {
                                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                                None => format!("{}/{proto}", p["port"]),
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                });
            let external: Vec<String> = o
                .pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .chain(
                    o.pointer("/status/loadBalancer/ingress")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.get("ip")),
                )
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            vec![
                name,
                json!(s(o, "/spec/type")),
                json!(or_none(s(o, "/spec/clusterIP").into())),
                json!(or_none(external.join(","))),
                json!(or_none(ports.unwrap_or_default())),
                age,
                json!(or_none(selector(o.pointer("/spec/selector")))),
            ]
        }
        "Namespace" => vec![name, json!(s(o, "/status/phase")), age],
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map_or("Unknown", |c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                });
            let ip = o
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
                .and_then(|a| a["address"].as_str())
                .unwrap_or("");
            vec![
                name,
                json!(ready),
                age,
                json!(or_none(ip.into())),
                json!(or_none(s(o, "/spec/podCIDR").into())),
            ]
        }
        "NetworkPolicy" => {
            let sel = selector(o.pointer("/spec/podSelector/matchLabels"));
            vec![
                name,
                json!(if sel.is_empty() {
                    "<none>".to_string()
                } else {
                    sel
                }),
                age,
            ]
        }
        "EndpointSlice" => {
            let ports: Vec<String> = o
                .pointer("/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p["port"].as_u64().map(|n| n.to_string()))
                .collect();
            let addrs: Vec<String> = o
                .pointer("/endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(or_none(ports.join(","))),
                json!(or_none(addrs.join(","))),
                age,
            ]
        }
        _ => vec![name, age],
    }
}

/// A Table of `objects` of resource `r`.
pub fn table(r: &Resource, objects: &[Value], resource_version: &str) -> Value {
    let defs: Vec<Value> = columns(r.kind)
        .into_iter()
        .map(|(name, priority)| {
            json!({"name": name, "type": "string", "format": if name == "Name" { "name" } else { "" },
                   "description": "", "priority": priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            json!({"cells": cells(r.kind, o), "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": o.get("metadata").cloned().unwrap_or(Value::Null)}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
           "metadata": {"resourceVersion": resource_version},
           "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_show_the_columns_kubectl_shows() {
        let svc = crate::resources::find("", "v1", "services").unwrap();
        let o = json!({"metadata": {"name": "web", "creationTimestamp": chrono::Utc::now().to_rfc3339()},
                       "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                                "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "web"}}});
        let t = table(svc, &[o], "7");
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "web",
                "NodePort",
                "10.96.0.10",
                "<none>",
                "80:30080/TCP",
                "0s",
                "app=web"
            ])
        );
        assert_eq!(t["columnDefinitions"][6]["priority"], 1);
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }
}
