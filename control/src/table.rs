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

/// `done/wanted` as kubectl shows READY and COMPLETIONS: two integers of the object, each with
/// the default the API gives it.
fn ratio(o: &Value, done: (&str, i64), wanted: (&str, i64)) -> Value {
    let n = |(p, d): (&str, i64)| o.pointer(p).and_then(Value::as_i64).unwrap_or(d);
    json!(format!("{}/{}", n(done), n(wanted)))
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
        "PersistentVolumeClaim" => vec![
            ("Name", 0),
            ("Status", 0),
            ("Volume", 0),
            ("Capacity", 0),
            ("Access Modes", 0),
            ("StorageClass", 0),
            ("Age", 0),
            ("VolumeMode", 1),
        ],
        "PersistentVolume" => vec![
            ("Name", 0),
            ("Capacity", 0),
            ("Access Modes", 0),
            ("Reclaim Policy", 0),
            ("Status", 0),
            ("Claim", 0),
            ("StorageClass", 0),
            ("Reason", 0),
            ("Age", 0),
            ("VolumeMode", 1),
        ],
        "StorageClass" => vec![
            ("Name", 0),
            ("Provisioner", 0),
            ("ReclaimPolicy", 0),
            ("VolumeBindingMode", 0),
            ("AllowVolumeExpansion", 0),
            ("Age", 0),
        ],
        "EndpointSlice" => vec![
            ("Name", 0),
            ("AddressType", 0),
            ("Ports", 0),
            ("Endpoints", 0),
            ("Age", 0),
        ],
        "Deployment" => vec![
            ("Name", 0),
            ("Ready", 0),
            ("Up-to-date", 0),
            ("Available", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ],
        "PodDisruptionBudget" => vec![
            ("Name", 0),
            ("Min Available", 0),
            ("Max Unavailable", 0),
            ("Allowed Disruptions", 0),
            ("Age", 0),
        ],
        "Job" => vec![
            ("Name", 0),
            ("Status", 0),
            ("Completions", 0),
            ("Duration", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ],
        "StatefulSet" => vec![
            ("Name", 0),
            ("Ready", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
        ],
        "ControllerRevision" => vec![("Name", 0), ("Controller", 0), ("Revision", 0), ("Age", 0)],
        "DaemonSet" => vec![
            ("Name", 0),
            ("Desired", 0),
            ("Current", 0),
            ("Ready", 0),
            ("Up-to-date", 0),
            ("Available", 0),
            ("Node Selector", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ],
        "ReplicaSet" => vec![
            ("Name", 0),
            ("Desired", 0),
            ("Current", 0),
            ("Ready", 0),
            ("Age", 0),
            ("Containers", 1),
            ("Images", 1),
            ("Selector", 1),
        ],
        "Event" => vec![
            ("Last Seen", 0),
            ("Type", 0),
            ("Reason", 0),
            ("Object", 0),
            ("Message", 0),
        ],
        "Endpoints" => vec![("Name", 0), ("Endpoints", 0), ("Age", 0)],
        _ => vec![("Name", 0), ("Age", 0)],
    }
}

/// Access modes as kubectl abbreviates them (`RWO,RWX`).
fn access_modes(v: Option<&Value>) -> String {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(",")
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
                json!(pod_status(o)),
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
            let mut ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map_or("Unknown", |c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .to_owned();
            if o.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
                ready.push_str(",SchedulingDisabled");
            }
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
        "Deployment" => {
            let n = |p: &str| o.pointer(p).and_then(Value::as_i64).unwrap_or(0);
            let (containers, images) =
                containers_images(o.pointer("/spec/template/spec/containers"));
            vec![
                name,
                ratio(o, ("/status/readyReplicas", 0), ("/spec/replicas", 1)),
                json!(n("/status/updatedReplicas")),
                json!(n("/status/availableReplicas")),
                age,
                json!(containers),
                json!(images),
                json!(or_none(label_selector(o.pointer("/spec/selector")))),
            ]
        }
        "PersistentVolumeClaim" => vec![
            name,
            json!(s(o, "/status/phase")),
            json!(s(o, "/spec/volumeName")),
            json!(s(o, "/status/capacity/storage")),
            json!(access_modes(o.pointer("/status/accessModes"))),
            json!(or_none(s(o, "/spec/storageClassName").to_owned())),
            age,
            json!(s(o, "/spec/volumeMode")),
        ],
        "PersistentVolume" => {
            let claim = match (
                s(o, "/spec/claimRef/namespace"),
                s(o, "/spec/claimRef/name"),
            ) {
                (_, "") => String::new(),
                (ns, n) => format!("{ns}/{n}"),
            };
            vec![
                name,
                json!(s(o, "/spec/capacity/storage")),
                json!(access_modes(o.pointer("/spec/accessModes"))),
                json!(s(o, "/spec/persistentVolumeReclaimPolicy")),
                json!(s(o, "/status/phase")),
                json!(claim),
                json!(s(o, "/spec/storageClassName")),
                json!(s(o, "/status/reason")),
                age,
                json!(s(o, "/spec/volumeMode")),
            ]
        }
        "StorageClass" => {
            let default = o
                .pointer("/metadata/annotations/storageclass.kubernetes.io~1is-default-class")
                .and_then(Value::as_str)
                == Some("true");
            vec![
                json!(if default {
                    format!("{} (default)", s(o, "/metadata/name"))
                } else {
                    s(o, "/metadata/name").to_owned()
                }),
                json!(s(o, "/provisioner")),
                json!(match s(o, "/reclaimPolicy") {
                    "" => "Delete",
                    p => p,
                }),
                json!(match s(o, "/volumeBindingMode") {
                    "" => "Immediate",
                    m => m,
                }),
                json!(
                    o.pointer("/allowVolumeExpansion")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                ),
                age,
            ]
        }
        "PodDisruptionBudget" => {
            // kubectl's columns: an int-or-string as written, N/A when not set.
            let bound = |p: &str| match o.pointer(p) {
                Some(Value::Number(n)) => json!(n.to_string()),
                Some(Value::String(v)) => json!(v),
                _ => json!("N/A"),
            };
            vec![
                json!(s(o, "/metadata/name")),
                bound("/spec/minAvailable"),
                bound("/spec/maxUnavailable"),
                json!(
                    o.pointer("/status/disruptionsAllowed")
                        .and_then(Value::as_i64)
                        .unwrap_or(0)
                ),
                age,
            ]
        }
        "Job" => {
            let condition = |t: &str| {
                o.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| c.iter().any(|c| c["type"] == t && c["status"] == "True"))
            };
            let status = if condition("Complete") {
                "Complete"
            } else if condition("Failed") {
                "Failed"
            } else if o.pointer("/spec/suspend") == Some(&json!(true)) {
                "Suspended"
            } else {
                "Running"
            };
            let secs = |p: &str| {
                o.pointer(p)
                    .and_then(Value::as_str)
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            };
            let duration = match (secs("/status/startTime"), secs("/status/completionTime")) {
                (Some(a), Some(b)) => format!("{}s", (b - a).num_seconds()),
                (Some(a), None) => {
                    format!("{}s", (chrono::Utc::now().fixed_offset() - a).num_seconds())
                }
                _ => String::new(),
            };
            let (containers, images) =
                containers_images(o.pointer("/spec/template/spec/containers"));
            vec![
                name,
                json!(status),
                ratio(o, ("/status/succeeded", 0), ("/spec/completions", 1)),
                json!(duration),
                age,
                json!(containers),
                json!(images),
                json!(or_none(label_selector(o.pointer("/spec/selector")))),
            ]
        }
        "StatefulSet" => {
            let (containers, images) =
                containers_images(o.pointer("/spec/template/spec/containers"));
            vec![
                name,
                ratio(o, ("/status/readyReplicas", 0), ("/spec/replicas", 1)),
                age,
                json!(containers),
                json!(images),
            ]
        }
        "ControllerRevision" => {
            let controller = o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|r| r["controller"] == json!(true))
                .map(|r| {
                    let kind = r["kind"].as_str().unwrap_or("").to_lowercase();
                    let group = r["apiVersion"]
                        .as_str()
                        .and_then(|v| v.split_once('/'))
                        .map_or(String::new(), |(g, _)| format!(".{g}"));
                    format!("{kind}{group}/{}", r["name"].as_str().unwrap_or(""))
                })
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(controller),
                json!(o.get("revision").and_then(Value::as_i64).unwrap_or(0)),
                age,
            ]
        }
        "DaemonSet" => {
            let n = |p: &str| json!(o.pointer(p).and_then(Value::as_i64).unwrap_or(0));
            let (containers, images) =
                containers_images(o.pointer("/spec/template/spec/containers"));
            let selector: Vec<String> = o
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            vec![
                name,
                n("/status/desiredNumberScheduled"),
                n("/status/currentNumberScheduled"),
                n("/status/numberReady"),
                n("/status/updatedNumberScheduled"),
                n("/status/numberAvailable"),
                json!(or_none(selector.join(","))),
                age,
                json!(containers),
                json!(images),
                json!(or_none(label_selector(o.pointer("/spec/selector")))),
            ]
        }
        "ReplicaSet" => {
            let n = |p: &str| o.pointer(p).and_then(Value::as_i64).unwrap_or(0);
            let (containers, images) =
                containers_images(o.pointer("/spec/template/spec/containers"));
            vec![
                name,
                json!(
                    o.pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                ),
                json!(n("/status/replicas")),
                json!(n("/status/readyReplicas")),
                age,
                json!(containers),
                json!(images),
                json!(or_none(label_selector(o.pointer("/spec/selector")))),
            ]
        }
        "Event" => {
            let when = [
                "/lastTimestamp",
                "/eventTime",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .find_map(|p| o.pointer(p).and_then(Value::as_str))
            .map(|t| self::age(&json!({"metadata": {"creationTimestamp": t}})))
            .unwrap_or_else(|| "<unknown>".into());
            let object = format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            );
            vec![
                json!(when),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(s(o, "/message")),
            ]
        }
        "Endpoints" => {
            let eps: Vec<String> = o
                .pointer("/subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|sub| {
                    let ports: Vec<u64> = sub["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["port"].as_u64())
                        .collect();
                    sub["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a["ip"].as_str().map(str::to_owned))
                        .flat_map(move |ip| {
                            ports.clone().into_iter().map(move |p| format!("{ip}:{p}"))
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            vec![name, json!(or_none(eps.join(","))), age]
        }
        _ => vec![name, age],
    }
}

/// A pod's STATUS column as kubectl prints it: the reason of a waiting or terminated
/// container (ContainerCreating, CrashLoopBackOff, ErrImageNeverPull, Completed ...),
/// `Init:N/M` while init containers run, `Terminating` once deleted, else the phase.
fn pod_status(o: &Value) -> String {
    let mut reason = o
        .pointer("/status/reason")
        .and_then(Value::as_str)
        .unwrap_or_else(|| s(o, "/status/phase"))
        .to_owned();
    let inits = o
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array);
    let init_total = o
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let mut initializing = false;
    for (i, c) in inits.into_iter().flatten().enumerate() {
        if c.pointer("/state/terminated/exitCode")
            .and_then(Value::as_i64)
            == Some(0)
        {
            continue;
        }
        initializing = true;
        reason = match (
            c.pointer("/state/terminated"),
            c.pointer("/state/waiting/reason").and_then(Value::as_str),
        ) {
            (Some(t), _) => match t["reason"].as_str().filter(|r| !r.is_empty()) {
                Some(r) => format!("Init:{r}"),
                None => format!("Init:ExitCode:{}", t["exitCode"]),
            },
            (None, Some(r)) if r != "PodInitializing" => format!("Init:{r}"),
            _ => format!("Init:{i}/{init_total}"),
        };
        break;
    }
    if !initializing {
        let mut running = false;
        for c in o
            .pointer("/status/containerStatuses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .rev()
        {
            if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
                reason = r.to_owned();
            } else if let Some(t) = c.pointer("/state/terminated") {
                reason = t["reason"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("ExitCode:{}", t["exitCode"]));
            } else if c.pointer("/state/running").is_some() && c["ready"] == true {
                running = true;
            }
        }
        if reason == "Completed" && running {
            reason = "Running".into();
        }
    }
    if o.pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
    {
        reason = "Terminating".into();
    }
    reason
}

fn containers_images(containers: Option<&Value>) -> (String, String) {
    let list = containers
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = list.iter().filter_map(|c| c["name"].as_str()).collect();
    let images: Vec<&str> = list.iter().filter_map(|c| c["image"].as_str()).collect();
    (names.join(","), images.join(","))
}

/// A metav1.LabelSelector in kubectl's short form.
fn label_selector(sel: Option<&Value>) -> String {
    sel.and_then(|v| serde_json::from_value(v.clone()).ok())
        .and_then(|s| crate::selector::LabelSelector::from_api(Some(&s)).ok())
        .map(|s| s.to_string())
        .unwrap_or_default()
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

    #[test]
    fn pod_status_reads_like_kubectls() {
        let init = |state: Value| {
            json!({"spec": {"initContainers": [{"name": "a"}, {"name": "b"}]},
                   "status": {"phase": "Pending", "initContainerStatuses": [
                       {"name": "a", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                       {"name": "b", "state": state}]}})
        };
        assert_eq!(pod_status(&init(json!({"running": {}}))), "Init:1/2");
        assert_eq!(
            pod_status(&init(
                json!({"terminated": {"exitCode": 1, "reason": "Error"}})
            )),
            "Init:Error"
        );
        assert_eq!(
            pod_status(&init(json!({"terminated": {"exitCode": 3}}))),
            "Init:ExitCode:3"
        );
        assert_eq!(
            pod_status(&init(json!({"waiting": {"reason": "CrashLoopBackOff"}}))),
            "Init:CrashLoopBackOff"
        );
        let app = json!({"status": {"phase": "Pending", "containerStatuses": [
            {"name": "c", "state": {"waiting": {"reason": "CreateContainerConfigError"}}}]}});
        assert_eq!(pod_status(&app), "CreateContainerConfigError");
    }

    #[test]
    fn storage_kinds_show_kubectls_columns() {
        let find = |plural| {
            crate::resources::find(
                if plural == "storageclasses" {
                    "storage.k8s.io"
                } else {
                    ""
                },
                "v1",
                plural,
            )
            .unwrap()
        };
        let pvc = json!({"metadata": {"name": "notes"}, "spec": {"volumeName": "pvc-1", "storageClassName": "weft-local", "volumeMode": "Filesystem"},
                         "status": {"phase": "Bound", "capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"]}});
        let t = table(find("persistentvolumeclaims"), &[pvc], "1");
        assert_eq!(
            t["rows"][0]["cells"].as_array().unwrap()[..6],
            [
                json!("notes"),
                json!("Bound"),
                json!("pvc-1"),
                json!("64Mi"),
                json!("RWO"),
                json!("weft-local")
            ]
        );
        let pv = json!({"metadata": {"name": "pvc-1"}, "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                        "persistentVolumeReclaimPolicy": "Delete", "claimRef": {"namespace": "demo", "name": "notes"}, "storageClassName": "weft-local"},
                        "status": {"phase": "Bound"}});
        let t = table(find("persistentvolumes"), &[pv], "1");
        assert_eq!(t["rows"][0]["cells"][2], "RWO,RWX");
        assert_eq!(t["rows"][0]["cells"][5], "demo/notes");
        let sc = json!({"metadata": {"name": "weft-local", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                        "provisioner": "csi.weft.io", "volumeBindingMode": "WaitForFirstConsumer"});
        let t = table(find("storageclasses"), &[sc], "1");
        assert_eq!(
            t["rows"][0]["cells"].as_array().unwrap()[..5],
            [
                json!("weft-local (default)"),
                json!("csi.weft.io"),
                json!("Delete"),
                json!("WaitForFirstConsumer"),
                json!(false)
            ]
        );
    }
}
