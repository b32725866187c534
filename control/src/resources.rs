//! The kinds the API serves: where each lives in the URL space, whether it is namespaced, and
//! how an object of it is checked (by decoding it into its `k8s-openapi` type, so a field of the
//! wrong type is refused the way kube-apiserver refuses it).

use serde_json::Value;

/// One served resource.
#[derive(Debug)]
pub struct Resource {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Version within the group.
    pub version: &'static str,
    /// Plural name in URLs.
    pub plural: &'static str,
    /// Singular name (discovery).
    pub singular: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Short names kubectl accepts (`svc`, `ns`, ...).
    pub short_names: &'static [&'static str],
    /// Whether `status` is a subresource: writes to the object keep the stored status, and
    /// writes to `/status` change nothing else.
    pub status: bool,
    /// Whether `/scale` is served (`spec.replicas` as an `autoscaling/v1` Scale).
    pub scale: bool,
    /// Decodes an object as its typed form and encodes it again; the message says what is
    /// wrong.
    normalize: fn(&Value) -> Result<Value, String>,
    /// Registers the kind's OpenAPI schema (and those it refers to) with a generator and
    /// returns a reference to it.
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
) -> Result<Value, String> {
    let typed = T::deserialize(v).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Fields of `given` that its typed form dropped (kube-apiserver's "unknown field" list), as
/// dotted paths.
fn unknown_fields(given: &Value, kept: &Value, path: &str, out: &mut Vec<String>) {
    match (given, kept) {
        (Value::Object(g), Value::Object(k)) => {
            for (key, v) in g {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    Some(kv) => unknown_fields(v, kv, &here, out),
                    None if v.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(g), Value::Array(k)) => {
            for (i, (gv, kv)) in g.iter().zip(k).enumerate() {
                unknown_fields(gv, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

macro_rules! resource {
    ($group:literal, $version:literal, $plural:literal, $singular:literal, $kind:literal,
     $namespaced:literal, [$($short:literal),*], $status:literal, $ty:ty $(, $scale:literal)?) => {
        Resource {
            group: $group,
            version: $version,
            plural: $plural,
            singular: $singular,
            kind: $kind,
            namespaced: $namespaced,
            short_names: &[$($short),*],
            status: $status,
            scale: false $(|| $scale)?,
            normalize: roundtrip::<$ty>,
            schema: |g| g.subschema_for::<$ty>(),
        }
    };
}

use k8s_openapi::api::{
    apps::v1 as apps, batch::v1 as batch, coordination::v1 as coordination, core::v1 as core,
    discovery::v1 as discovery, events::v1 as events, networking::v1 as networking,
    policy::v1 as policy, storage::v1 as storage,
};

/// `metrics.k8s.io`'s two read-only resources ([`crate::metrics`]): computed from the nodes'
/// usage on each request, never stored, so they are not in [`RESOURCES`].
pub static METRICS: &[Resource] = &[
    resource!(
        "metrics.k8s.io",
        "v1beta1",
        "nodes",
        "",
        "NodeMetrics",
        false,
        [],
        false,
        serde_json::Value
    ),
    resource!(
        "metrics.k8s.io",
        "v1beta1",
        "pods",
        "",
        "PodMetrics",
        true,
        [],
        false,
        serde_json::Value
    ),
];

/// Every resource served, in discovery order.
pub static RESOURCES: &[Resource] = &[
    resource!(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        ["ns"],
        true,
        core::Namespace
    ),
    resource!(
        "",
        "v1",
        "nodes",
        "node",
        "Node",
        false,
        ["no"],
        true,
        core::Node
    ),
    resource!(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        true,
        ["po"],
        true,
        core::Pod
    ),
    resource!(
        "",
        "v1",
        "services",
        "service",
        "Service",
        true,
        ["svc"],
        true,
        core::Service
    ),
    resource!(
        "",
        "v1",
        "endpoints",
        "endpoints",
        "Endpoints",
        true,
        ["ep"],
        false,
        core::Endpoints
    ),
    resource!(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        ["cm"],
        false,
        core::ConfigMap
    ),
    resource!(
        "",
        "v1",
        "secrets",
        "secret",
        "Secret",
        true,
        [],
        false,
        core::Secret
    ),
    resource!(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        ["sa"],
        false,
        core::ServiceAccount
    ),
    resource!(
        "",
        "v1",
        "persistentvolumes",
        "persistentvolume",
        "PersistentVolume",
        false,
        ["pv"],
        true,
        core::PersistentVolume
    ),
    resource!(
        "",
        "v1",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        "PersistentVolumeClaim",
        true,
        ["pvc"],
        true,
        core::PersistentVolumeClaim
    ),
    resource!(
        "",
        "v1",
        "events",
        "event",
        "Event",
        true,
        ["ev"],
        false,
        core::Event
    ),
    resource!(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        true,
        ["deploy"],
        true,
        apps::Deployment,
        true
    ),
    resource!(
        "apps",
        "v1",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        true,
        ["rs"],
        true,
        apps::ReplicaSet,
        true
    ),
    resource!(
        "apps",
        "v1",
        "statefulsets",
        "statefulset",
        "StatefulSet",
        true,
        ["sts"],
        true,
        apps::StatefulSet,
        true
    ),
    resource!(
        "apps",
        "v1",
        "daemonsets",
        "daemonset",
        "DaemonSet",
        true,
        ["ds"],
        true,
        apps::DaemonSet
    ),
    resource!(
        "apps",
        "v1",
        "controllerrevisions",
        "controllerrevision",
        "ControllerRevision",
        true,
        [],
        false,
        apps::ControllerRevision
    ),
    resource!(
        "batch",
        "v1",
        "jobs",
        "job",
        "Job",
        true,
        [],
        true,
        batch::Job
    ),
    resource!(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        [],
        false,
        coordination::Lease
    ),
    resource!(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
        [],
        false,
        discovery::EndpointSlice
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "networkpolicy",
        "NetworkPolicy",
        true,
        ["netpol"],
        true,
        networking::NetworkPolicy
    ),
    resource!(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        "PodDisruptionBudget",
        true,
        ["pdb"],
        true,
        policy::PodDisruptionBudget
    ),
    resource!(
        "storage.k8s.io",
        "v1",
        "storageclasses",
        "storageclass",
        "StorageClass",
        false,
        ["sc"],
        false,
        storage::StorageClass
    ),
    resource!(
        "storage.k8s.io",
        "v1",
        "csidrivers",
        "csidriver",
        "CSIDriver",
        false,
        [],
        false,
        storage::CSIDriver
    ),
    resource!(
        "storage.k8s.io",
        "v1",
        "csinodes",
        "csinode",
        "CSINode",
        false,
        [],
        false,
        storage::CSINode
    ),
    resource!(
        "storage.k8s.io",
        "v1",
        "volumeattachments",
        "volumeattachment",
        "VolumeAttachment",
        false,
        [],
        true,
        storage::VolumeAttachment
    ),
    resource!(
        "events.k8s.io",
        "v1",
        "events",
        "event",
        "Event",
        true,
        ["ev"],
        false,
        events::Event
    ),
];

impl Resource {
    /// `apiVersion` of its objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Stable key of the resource in the store (`group/plural`).
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// Checks an object's shape against the typed API and returns it as the typed API encodes
    /// it (fields the kind does not have are dropped, as kube-apiserver drops them), with the
    /// paths of the fields that were dropped.
    pub fn normalize(&self, object: &Value) -> Result<(Value, Vec<String>), String> {
        let kept = (self.normalize)(object)?;
        let mut unknown = Vec::new();
        unknown_fields(object, &kept, "", &mut unknown);
        Ok((kept, unknown))
    }
}

/// The resource at `group`/`version`/`plural`, if served.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource objects of `apiVersion` and `kind` belong to (as an ownerReference names them).
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// The resource with this store key.
pub fn by_key(key: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.key() == key)
}

/// Served groups other than the core one, in order, each with its versions.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_checked_against_their_types() {
        let svc = find("", "v1", "services").unwrap();
        let (kept, unknown) = svc
            .normalize(
                &serde_json::json!({"spec": {"ports": [{"port": 80, "prot": "TCP"}], "typo": 1}}),
            )
            .unwrap();
        assert_eq!(unknown, ["spec.ports[0].prot", "spec.typo"]);
        assert_eq!(kept["spec"], serde_json::json!({"ports": [{"port": 80}]}));
        let err = svc
            .normalize(&serde_json::json!({"spec": {"ports": "eighty"}}))
            .unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        assert_eq!(
            find("networking.k8s.io", "v1", "networkpolicies")
                .unwrap()
                .api_version(),
            "networking.k8s.io/v1"
        );
        assert_eq!(groups()[0], ("apps", "v1"));
    }
}
