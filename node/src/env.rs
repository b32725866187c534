//! A container's environment as kubelet builds it: `envFrom` (every key of a ConfigMap or
//! Secret, with an optional prefix) first, then `env` entries, each a value or a reference to
//! a pod field (`metadata.name`, `metadata.namespace`, `metadata.uid`, `status.podIP`,
//! `spec.nodeName`, `status.hostIP`), a ConfigMap key or a Secret key. A required reference
//! that cannot be resolved is `CreateContainerConfigError`, with kubelet's message.

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{Client, ResourceExt};

use crate::volumes;

/// What the pod's own fields resolve to.
#[derive(Clone, Debug)]
pub struct PodFields<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Its address.
    pub pod_ip: &'a str,
    /// The node's name.
    pub node_name: &'a str,
    /// The node's address.
    pub host_ip: Option<&'a str>,
}

impl PodFields<'_> {
    fn get(&self, path: &str) -> Option<String> {
        match path {
            "metadata.name" => Some(self.pod.name_any()),
            "metadata.namespace" => self.pod.namespace(),
            "metadata.uid" => self.pod.uid(),
            "status.podIP" => Some(self.pod_ip.to_owned()),
            "spec.nodeName" => Some(self.node_name.to_owned()),
            "status.hostIP" => self.host_ip.map(str::to_owned),
            "spec.serviceAccountName" => self.pod.spec.as_ref()?.service_account_name.clone(),
            _ => {
                // `metadata.labels['key']` and `metadata.annotations['key']`, as kubelet
                // resolves them (an Indexed Job's JOB_COMPLETION_INDEX is one).
                let (map, key) = path
                    .strip_prefix("metadata.labels['")
                    .map(|k| (self.pod.labels(), k))
                    .or_else(|| {
                        path.strip_prefix("metadata.annotations['")
                            .map(|k| (self.pod.annotations(), k))
                    })?;
                map.get(key.strip_suffix("']")?).cloned()
            }
        }
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The environment of `c`, or the reason it cannot be built.
pub async fn resolve(
    client: &Client,
    c: &Container,
    fields: &PodFields<'_>,
) -> Result<Vec<cri::KeyValue>, String> {
    let ns = fields.pod.namespace().unwrap_or_default();
    let mut out: Vec<cri::KeyValue> = Vec::new();
    let mut set = |key: String, value: String| {
        out.retain(|kv| kv.key != key);
        out.push(cri::KeyValue { key, value });
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            volumes::config_map(client, &ns, &r.name, "envFrom", r.optional == Some(true)).await
        } else if let Some(r) = &from.secret_ref {
            volumes::secret(client, &ns, &r.name, "envFrom", r.optional == Some(true)).await
        } else {
            continue;
        }
        .map_err(|e| e.to_string())?;
        for (k, v) in data {
            set(format!("{prefix}{k}"), text(v));
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, None) => String::new(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    fields.get(&f.field_path).unwrap_or_default()
                } else if let Some((kind, name, key, optional)) = from
                    .config_map_key_ref
                    .as_ref()
                    .map(|k| ("ConfigMap", &k.name, &k.key, k.optional == Some(true)))
                    .or_else(|| {
                        from.secret_key_ref
                            .as_ref()
                            .map(|k| ("Secret", &k.name, &k.key, k.optional == Some(true)))
                    })
                {
                    let data = if kind == "ConfigMap" {
                        volumes::config_map(client, &ns, name, "env", optional).await
                    } else {
                        volumes::secret(client, &ns, name, "env", optional).await
                    }
                    .map_err(|e| e.to_string())?;
                    match data.get(key) {
                        Some(v) => text(v.clone()),
                        None if optional => continue,
                        None => {
                            return Err(format!("couldn't find key {key} in {kind} {ns}/{name}"));
                        }
                    }
                } else {
                    String::new()
                }
            }
        };
        set(e.name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_refs_resolve_labels_and_annotations_by_key() {
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {
            "name": "pi-2-x", "namespace": "default",
            "labels": {"app": "pi"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "2"}}}))
        .unwrap();
        let fields = PodFields {
            pod: &pod,
            pod_ip: "10.244.1.5",
            node_name: "node1",
            host_ip: None,
        };
        assert_eq!(
            fields
                .get("metadata.annotations['batch.kubernetes.io/job-completion-index']")
                .as_deref(),
            Some("2")
        );
        assert_eq!(fields.get("metadata.labels['app']").as_deref(), Some("pi"));
        assert_eq!(fields.get("metadata.labels['none']"), None);
        assert_eq!(fields.get("status.podIP").as_deref(), Some("10.244.1.5"));
    }
}
