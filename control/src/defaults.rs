//! kube-apiserver's defaulting, for the fields clients (and weft's own agents) read back: a
//! pod's restart and DNS policy, grace period, scheduler, each container's pull policy,
//! termination message, port protocol and probe timings; a Deployment's strategy, history
//! limit and progress deadline; a Service's port protocol, target port and policies. Applied
//! on every write, so an object reads the same however it was written, and idempotent, so a
//! template copied from a Deployment to its ReplicaSet stays equal to it.

use serde_json::{Map, Value, json};

fn set(o: &mut Map<String, Value>, key: &str, v: Value) {
    if o.get(key).is_none_or(Value::is_null) {
        o.insert(key.to_owned(), v);
    }
}

fn obj<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    v.get_mut(key).and_then(Value::as_object_mut)
}

fn probe(p: &mut Value) {
    let Some(p) = p.as_object_mut() else {
        return;
    };
    set(p, "timeoutSeconds", json!(1));
    set(p, "periodSeconds", json!(10));
    set(p, "successThreshold", json!(1));
    set(p, "failureThreshold", json!(3));
    if let Some(h) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
        set(h, "path", json!("/"));
        set(h, "scheme", json!("HTTP"));
    }
}

fn container(c: &mut Value) {
    let image_latest = c
        .get("image")
        .and_then(Value::as_str)
        .map(|i| {
            let name = i.rsplit('/').next().unwrap_or(i);
            !i.contains('@') && name.split_once(':').is_none_or(|(_, tag)| tag == "latest")
        })
        .unwrap_or(false);
    let Some(o) = c.as_object_mut() else {
        return;
    };
    set(
        o,
        "imagePullPolicy",
        json!(if image_latest {
            "Always"
        } else {
            "IfNotPresent"
        }),
    );
    set(o, "terminationMessagePath", json!("/dev/termination-log"));
    set(o, "terminationMessagePolicy", json!("File"));
    for port in o
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(p) = port.as_object_mut() {
            set(p, "protocol", json!("TCP"));
        }
    }
    for key in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = o.get_mut(key) {
            probe(p);
        }
    }
}

/// Defaults of a PodSpec (of a pod or a template); `pod` adds what only pods get (requests
/// copied from limits).
fn pod_spec(spec: &mut Value, pod: bool) {
    let Some(s) = spec.as_object_mut() else {
        return;
    };
    set(s, "restartPolicy", json!("Always"));
    set(s, "dnsPolicy", json!("ClusterFirst"));
    set(s, "terminationGracePeriodSeconds", json!(30));
    set(s, "schedulerName", json!("default-scheduler"));
    set(s, "securityContext", json!({}));
    for key in ["containers", "initContainers"] {
        for c in s
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            container(c);
            if pod
                && let Some(r) = obj(c, "resources")
                && let Some(limits) = r.get("limits").and_then(Value::as_object).cloned()
            {
                let requests = r.entry("requests").or_insert_with(|| json!({}));
                if let Some(req) = requests.as_object_mut() {
                    for (k, v) in limits {
                        req.entry(k).or_insert(v);
                    }
                }
            }
        }
    }
}

fn template(spec: &mut Map<String, Value>) {
    if let Some(t) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
        pod_spec(t, false);
    }
}

/// Applies the defaults of `kind` to `object` in place.
pub fn apply(kind: &str, object: &mut Value) {
    match kind {
        "Pod" => {
            if let Some(spec) = object.get_mut("spec") {
                pod_spec(spec, true);
            }
        }
        "Deployment" => {
            let Some(spec) = obj(object, "spec") else {
                return;
            };
            set(spec, "replicas", json!(1));
            set(spec, "revisionHistoryLimit", json!(10));
            set(spec, "progressDeadlineSeconds", json!(600));
            let strategy = spec.entry("strategy").or_insert_with(|| json!({}));
            if let Some(st) = strategy.as_object_mut() {
                set(st, "type", json!("RollingUpdate"));
                if st.get("type") == Some(&json!("RollingUpdate")) {
                    let ru = st.entry("rollingUpdate").or_insert_with(|| json!({}));
                    if let Some(ru) = ru.as_object_mut() {
                        set(ru, "maxSurge", json!("25%"));
                        set(ru, "maxUnavailable", json!("25%"));
                    }
                }
            }
            template(spec);
        }
        "ReplicaSet" => {
            if let Some(spec) = obj(object, "spec") {
                set(spec, "replicas", json!(1));
                template(spec);
            }
        }
        "StatefulSet" => {
            if let Some(spec) = obj(object, "spec") {
                set(spec, "replicas", json!(1));
                set(spec, "podManagementPolicy", json!("OrderedReady"));
                set(spec, "revisionHistoryLimit", json!(10));
                set(
                    spec,
                    "persistentVolumeClaimRetentionPolicy",
                    json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
                );
                let strategy = spec.entry("updateStrategy").or_insert_with(|| json!({}));
                if let Some(st) = strategy.as_object_mut() {
                    set(st, "type", json!("RollingUpdate"));
                    if st.get("type") == Some(&json!("RollingUpdate")) {
                        let ru = st.entry("rollingUpdate").or_insert_with(|| json!({}));
                        if let Some(ru) = ru.as_object_mut() {
                            set(ru, "partition", json!(0));
                        }
                    }
                }
                template(spec);
            }
        }
        "DaemonSet" | "Job" => {
            if let Some(spec) = obj(object, "spec") {
                template(spec);
            }
        }
        "Service" => {
            let Some(spec) = obj(object, "spec") else {
                return;
            };
            let kind = spec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_owned();
            if kind == "ExternalName" {
                return;
            }
            set(spec, "type", json!(kind));
            set(spec, "sessionAffinity", json!("None"));
            set(spec, "internalTrafficPolicy", json!("Cluster"));
            if kind == "NodePort" || kind == "LoadBalancer" {
                set(spec, "externalTrafficPolicy", json!("Cluster"));
            }
            for port in spec
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let number = port.get("port").cloned();
                if let Some(p) = port.as_object_mut() {
                    set(p, "protocol", json!("TCP"));
                    if let Some(n) = number {
                        set(p, "targetPort", n);
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_and_templates_get_kube_apiserver_defaults_once() {
        let mut d = json!({"spec": {"selector": {}, "template": {"spec": {"containers": [
            {"name": "c", "image": "echo:1", "ports": [{"containerPort": 80}],
             "readinessProbe": {"httpGet": {"port": 80}}},
            {"name": "d", "image": "registry/x"}]}}}});
        apply("Deployment", &mut d);
        let again = {
            let mut x = d.clone();
            apply("Deployment", &mut x);
            x
        };
        assert_eq!(d, again, "idempotent");
        let spec = &d["spec"];
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(spec["revisionHistoryLimit"], 10);
        let c = &spec["template"]["spec"]["containers"];
        assert_eq!(c[0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c[1]["imagePullPolicy"], "Always");
        assert_eq!(c[0]["ports"][0]["protocol"], "TCP");
        assert_eq!(c[0]["readinessProbe"]["timeoutSeconds"], 1);
        assert_eq!(c[0]["readinessProbe"]["httpGet"]["path"], "/");
        assert_eq!(spec["template"]["spec"]["restartPolicy"], "Always");
        let mut pod = json!({"spec": {"containers": [{"name": "c", "image": "x:1",
            "resources": {"limits": {"cpu": "1"}}}]}});
        apply("Pod", &mut pod);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["requests"]["cpu"],
            "1"
        );
        let mut svc = json!({"spec": {"ports": [{"port": 80}]}});
        apply("Service", &mut svc);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
    }
}
