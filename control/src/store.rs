//! The embedded store: every object of every served resource in memory, one resourceVersion
//! counter for all of them, a bounded history of changes for watches that resume, and a single
//! JSON file written atomically after every change so a restart loses nothing.
//!
//! Writes follow kube-apiserver's rules where clients notice them: names are unique per
//! namespace, a namespaced object needs its namespace, an update that carries a stale
//! `resourceVersion` is a conflict, `status` is only written through the status subresource,
//! an update that changes nothing does not bump the version, deleting a namespace deletes what
//! is in it, and Services get cluster IPs and node ports allocated.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::{
    resources::{self, Resource},
    status::ApiError,
};

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

/// One change, as watches see it.
#[derive(Debug)]
pub struct Event {
    /// The resourceVersion the change produced.
    pub rv: u64,
    /// What happened.
    pub kind: EventType,
    /// Store key of the resource.
    pub resource: String,
    /// Namespace ("" for cluster-scoped objects).
    pub namespace: String,
    /// The object after the change (for a deletion: as it was, with the deletion's version).
    pub object: Value,
    /// The object before a modification.
    pub previous: Option<Value>,
}

type Key = (String, String, String);

/// Store settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// File the store is kept in; `None` keeps it in memory only.
    pub path: Option<PathBuf>,
    /// Cluster IPs are allocated from here.
    pub service_cidr: ipnet::Ipv4Net,
    /// Node ports are allocated from here (inclusive).
    pub node_ports: (u16, u16),
    /// How many changes a resuming watch can catch up on.
    pub history: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            path: None,
            service_cidr: "10.96.0.0/16".parse().expect("literal"),
            node_ports: (30000, 32767),
            history: 10_000,
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Saved {
    rv: u64,
    objects: Vec<(String, Value)>,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
    options: Options,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inner(rv {}, {} objects)", self.rv, self.objects.len())
    }
}

fn meta<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn invalid(r: &Resource, name: &str, message: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        kind: r.kind.to_owned(),
        name: name.to_owned(),
        message: message.into(),
    }
}

/// A DNS-1123 label or subdomain, as object names must be.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// A watch: what happened since the version asked for, then every later change.
#[derive(Debug)]
pub struct Watch {
    /// Changes to replay first (or ADDED for every object when watching from the start).
    pub backlog: Vec<Arc<Event>>,
    /// Later changes.
    pub live: broadcast::Receiver<Arc<Event>>,
}

impl Store {
    /// Opens the store, reading its file if it exists, and makes sure the `default`,
    /// `kube-system` and `kube-public` namespaces exist.
    pub fn open(options: Options) -> Result<Self, ApiError> {
        let mut inner = Inner {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
        };
        if let Some(path) = &options.path {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| {
                        ApiError::Internal(format!("reading {}: {e}", path.display()))
                    })?;
                    inner.rv = saved.rv;
                    for (resource, object) in saved.objects {
                        let key = (
                            resource,
                            meta(&object, "namespace").unwrap_or("").to_owned(),
                            meta(&object, "name").unwrap_or("").to_owned(),
                        );
                        inner.objects.insert(key, object);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ApiError::Internal(format!(
                        "reading {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        let (tx, _) = broadcast::channel(options.history.max(16));
        let store = Self {
            inner: Mutex::new(inner),
            tx,
            options,
        };
        let ns = resources::find("", "v1", "namespaces").expect("served");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            match store.create(ns, "", json!({"metadata": {"name": name}})) {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest resourceVersion.
    pub fn revision(&self) -> u64 {
        self.lock().rv
    }

    fn key(r: &Resource, namespace: &str, name: &str) -> Key {
        (
            r.key(),
            if r.namespaced { namespace } else { "" }.to_owned(),
            name.to_owned(),
        )
    }

    fn save(&self, inner: &Inner) -> Result<(), ApiError> {
        let Some(path) = &self.options.path else {
            return Ok(());
        };
        let saved = Saved {
            rv: inner.rv,
            objects: inner
                .objects
                .iter()
                .map(|((r, _, _), o)| (r.clone(), o.clone()))
                .collect(),
        };
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec(&saved)?)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))
    }

    fn record(&self, inner: &mut Inner, event: Event) {
        let event = Arc::new(event);
        inner.history.push_back(event.clone());
        while inner.history.len() > self.options.history {
            inner.history.pop_front();
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(event);
    }

    /// One object.
    pub fn get(&self, r: &Resource, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&Self::key(r, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::NotFound {
                kind: r.plural.to_owned(),
                name: name.to_owned(),
            })
    }

    /// Every object of `r` (in `namespace`, or in all when `None`) that `filter` accepts, and
    /// the version the list is consistent with.
    pub fn list(
        &self,
        r: &Resource,
        namespace: Option<&str>,
        filter: impl Fn(&Value) -> bool,
    ) -> (u64, Vec<Value>) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((res, ns, _), _)| *res == r.key() && namespace.is_none_or(|n| n == ns))
            .map(|(_, o)| o)
            .filter(|o| filter(o))
            .cloned()
            .collect();
        (inner.rv, items)
    }

    /// Creates an object; fills in its metadata and, for Services, allocates addresses.
    pub fn create(&self, r: &Resource, namespace: &str, object: Value) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::BadRequest("the body is not a JSON object".into()));
        }
        let mut object = r
            .normalize(&object)
            .map_err(|m| invalid(r, meta(&object, "name").unwrap_or(""), m))?
            .0;
        let mut inner = self.lock();
        let metadata = object
            .as_object_mut()
            .expect("checked")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if !metadata.is_object() {
            return Err(invalid(r, "", "metadata must be an object"));
        }
        let name = match (meta(&object, "name"), meta(&object, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                let suffix = uuid::Uuid::new_v4().simple().to_string();
                format!("{prefix}{}", &suffix[..5])
            }
            _ => {
                return Err(invalid(
                    r,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        if !valid_name(&name) {
            return Err(invalid(
                r,
                &name,
                "metadata.name: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
            ));
        }
        let namespace = if r.namespaced {
            let ns = meta(&object, "namespace")
                .filter(|n| !n.is_empty())
                .unwrap_or(namespace);
            if ns.is_empty() {
                return Err(ApiError::BadRequest("a namespace is required".into()));
            }
            if ns != namespace && !namespace.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "the namespace of the object ({ns}) does not match the namespace on the request ({namespace})"
                )));
            }
            let ns_key = ("/namespaces".to_owned(), String::new(), ns.to_owned());
            if !inner.objects.contains_key(&ns_key) {
                return Err(ApiError::NotFound {
                    kind: "namespaces".into(),
                    name: ns.to_owned(),
                });
            }
            ns.to_owned()
        } else {
            String::new()
        };
        let key = Self::key(r, &namespace, &name);
        if inner.objects.contains_key(&key) {
            return Err(ApiError::AlreadyExists {
                kind: r.plural.to_owned(),
                name,
            });
        }
        let rv = inner.rv + 1;
        {
            let o = object.as_object_mut().expect("checked");
            o.insert("apiVersion".into(), json!(r.api_version()));
            o.insert("kind".into(), json!(r.kind));
            let m = o
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
                .expect("checked");
            m.insert("name".into(), json!(name));
            if r.namespaced {
                m.insert("namespace".into(), json!(namespace));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("creationTimestamp".into(), json!(now()));
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            if r.kind == "Namespace" {
                let labels = m.entry("labels").or_insert_with(|| json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
            if r.status {
                o.remove("status");
            }
            match r.kind {
                "Namespace" => {
                    o.insert("status".into(), json!({"phase": "Active"}));
                }
                "Pod" => {
                    o.insert("status".into(), json!({"phase": "Pending"}));
                }
                "Service" => {
                    o.insert("status".into(), json!({"loadBalancer": {}}));
                }
                _ => {}
            }
        }
        if r.kind == "Service" {
            self.allocate(&inner, &name, &mut object)?;
        }
        self.commit(&mut inner, rv, key, object.clone(), None)?;
        Ok(object)
    }

    /// Stores a created or changed object at version `rv`, writes the file, and tells watchers.
    fn commit(
        &self,
        inner: &mut Inner,
        rv: u64,
        key: Key,
        object: Value,
        previous: Option<Value>,
    ) -> Result<(), ApiError> {
        inner.rv = rv;
        inner.objects.insert(key.clone(), object.clone());
        self.save(inner)?;
        let kind = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(
            inner,
            Event {
                rv,
                kind,
                resource: key.0,
                namespace: key.1,
                object,
                previous,
            },
        );
        Ok(())
    }

    /// Cluster IP and node ports for a new Service.
    fn allocate(&self, inner: &Inner, name: &str, svc: &mut Value) -> Result<(), ApiError> {
        let r = resources::find("", "v1", "services").expect("served");
        let services: Vec<&Value> = inner
            .objects
            .iter()
            .filter(|((res, _, _), _)| *res == r.key())
            .map(|(_, o)| o)
            .collect();
        let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
            return Err(invalid(r, name, "spec: Required value"));
        };
        let kind = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_owned();
        if kind == "ExternalName" {
            return Ok(());
        }
        spec.insert("type".into(), json!(kind));
        let used: BTreeSet<Ipv4Addr> = services
            .iter()
            .filter_map(|s| s.pointer("/spec/clusterIP")?.as_str()?.parse().ok())
            .collect();
        let cidr = self.options.service_cidr;
        let ip = match spec.get("clusterIP").and_then(Value::as_str) {
            Some("None") => None,
            Some(ip) if !ip.is_empty() => {
                let addr: Ipv4Addr = ip.parse().map_err(|_| {
                    invalid(
                        r,
                        name,
                        format!(
                            "spec.clusterIP: Invalid value: {ip:?}: must be a valid IP address"
                        ),
                    )
                })?;
                if !cidr.contains(&addr) {
                    return Err(invalid(
                        r,
                        name,
                        format!(
                            "spec.clusterIPs: Invalid value: {ip:?}: provided IP is not in the valid range. The range of valid IPs is {cidr}"
                        ),
                    ));
                }
                if used.contains(&addr) {
                    return Err(invalid(
                        r,
                        name,
                        format!(
                            "spec.clusterIPs: Invalid value: {ip:?}: provided IP is already allocated"
                        ),
                    ));
                }
                Some(addr)
            }
            _ => Some(
                cidr.hosts()
                    .skip(9)
                    .find(|a| !used.contains(a))
                    .ok_or_else(|| {
                        invalid(
                            r,
                            name,
                            format!("spec.clusterIPs: Internal error: range {cidr} is full"),
                        )
                    })?,
            ),
        };
        let ip = ip.map_or_else(|| "None".to_owned(), |a| a.to_string());
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
        if ip != "None" {
            spec.insert("ipFamilies".into(), json!(["IPv4"]));
            spec.insert("ipFamilyPolicy".into(), json!("SingleStack"));
        }
        if kind == "NodePort" || kind == "LoadBalancer" {
            let mut used: BTreeSet<u64> = services
                .iter()
                .filter_map(|s| s.pointer("/spec/ports")?.as_array())
                .flatten()
                .filter_map(|p| p.get("nodePort")?.as_u64())
                .collect();
            let (lo, hi) = self.options.node_ports;
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for port in ports.iter_mut() {
                    match port.get("nodePort").and_then(Value::as_u64) {
                        Some(p) if used.contains(&p) => {
                            return Err(invalid(
                                r,
                                name,
                                format!(
                                    "spec.ports[].nodePort: Invalid value: {p}: provided port is already allocated"
                                ),
                            ));
                        }
                        Some(p) if p < u64::from(lo) || p > u64::from(hi) => {
                            return Err(invalid(
                                r,
                                name,
                                format!(
                                    "spec.ports[].nodePort: Invalid value: {p}: provided port is not in the valid range. The range of valid ports is {lo}-{hi}"
                                ),
                            ));
                        }
                        Some(p) => {
                            used.insert(p);
                        }
                        None => {
                            let p = (u64::from(lo)..=u64::from(hi))
                                .find(|p| !used.contains(p))
                                .ok_or_else(|| {
                                    invalid(r, name, "spec.ports[].nodePort: no node ports left")
                                })?;
                            used.insert(p);
                            port["nodePort"] = json!(p);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Replaces an object (or only its status, when `status_only`). A `resourceVersion` in the
    /// new object must be the stored one.
    pub fn update(
        &self,
        r: &Resource,
        namespace: &str,
        name: &str,
        object: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::BadRequest("the body is not a JSON object".into()));
        }
        let mut object = r.normalize(&object).map_err(|m| invalid(r, name, m))?.0;
        if let Some(n) = meta(&object, "name")
            && n != name
        {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let mut inner = self.lock();
        let key = Self::key(r, namespace, name);
        let Some(stored) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::NotFound {
                kind: r.plural.to_owned(),
                name: name.to_owned(),
            });
        };
        if let Some(v) = meta(&object, "resourceVersion")
            && Some(v) != meta(&stored, "resourceVersion")
        {
            return Err(ApiError::Conflict(format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                r.plural
            )));
        }
        let mut next = if status_only {
            let mut next = stored.clone();
            next["status"] = object.get("status").cloned().unwrap_or(Value::Null);
            next
        } else {
            let o = object.as_object_mut().expect("checked");
            if r.status {
                match stored.get("status") {
                    Some(s) => o.insert("status".into(), s.clone()),
                    None => o.remove("status"),
                };
            }
            o.insert("apiVersion".into(), json!(r.api_version()));
            o.insert("kind".into(), json!(r.kind));
            let m = o.entry("metadata").or_insert_with(|| json!({}));
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
            ] {
                match stored["metadata"].get(field) {
                    Some(v) => m[field] = v.clone(),
                    None => {
                        if let Some(m) = m.as_object_mut() {
                            m.remove(field);
                        }
                    }
                }
            }
            if r.kind == "Service" {
                // The allocated addresses are immutable; an update that leaves them out keeps them.
                for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                    if let Some(v) = stored.pointer(&format!("/spec/{field}"))
                        && let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut)
                    {
                        let keep = spec.get(field).is_none_or(|n| n.is_null() || n == "");
                        if !keep && field == "clusterIP" && spec.get(field) != Some(v) {
                            return Err(invalid(
                                r,
                                name,
                                "spec.clusterIP: Invalid value: field is immutable",
                            ));
                        }
                        if keep {
                            spec.insert(field.into(), v.clone());
                        }
                    }
                }
            }
            object
        };
        next["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"].clone();
        if next == stored {
            return Ok(stored);
        }
        if !status_only && next.get("spec") != stored.get("spec") {
            let g = stored["metadata"]["generation"].as_u64().unwrap_or(1);
            next["metadata"]["generation"] = json!(g + 1);
        }
        let rv = inner.rv + 1;
        next["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.commit(&mut inner, rv, key, next.clone(), Some(stored))?;
        Ok(next)
    }

    /// Deletes an object; deleting a namespace deletes everything in it first.
    pub fn delete(&self, r: &Resource, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = Self::key(r, namespace, name);
        if !inner.objects.contains_key(&key) {
            return Err(ApiError::NotFound {
                kind: r.plural.to_owned(),
                name: name.to_owned(),
            });
        }
        let mut doomed: Vec<Key> = Vec::new();
        if r.kind == "Namespace" {
            doomed.extend(
                inner
                    .objects
                    .keys()
                    .filter(|(_, ns, _)| ns == name)
                    .cloned(),
            );
        }
        doomed.push(key);
        let mut last = Value::Null;
        for key in doomed {
            let Some(mut object) = inner.objects.remove(&key) else {
                continue;
            };
            let rv = inner.rv + 1;
            inner.rv = rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            last = object.clone();
            self.record(
                &mut inner,
                Event {
                    rv,
                    kind: EventType::Deleted,
                    resource: key.0,
                    namespace: key.1,
                    object,
                    previous: None,
                },
            );
        }
        self.save(&inner)?;
        Ok(last)
    }

    /// Starts a watch of `resource` after version `from`: `None` (or 0) replays every current
    /// object as ADDED; a version older than the history kept is [`ApiError::Gone`].
    pub fn watch(&self, r: &Resource, from: Option<u64>) -> Result<Watch, ApiError> {
        let inner = self.lock();
        let live = self.tx.subscribe();
        let backlog = match from.filter(|v| *v > 0) {
            None => inner
                .objects
                .iter()
                .filter(|((res, _, _), _)| *res == r.key())
                .map(|((res, ns, _), o)| {
                    Arc::new(Event {
                        rv: inner.rv,
                        kind: EventType::Added,
                        resource: res.clone(),
                        namespace: ns.clone(),
                        object: o.clone(),
                        previous: None,
                    })
                })
                .collect(),
            Some(v) if v >= inner.rv => Vec::new(),
            Some(v) => {
                let oldest = inner.history.front().map_or(inner.rv + 1, |e| e.rv);
                if v + 1 < oldest {
                    return Err(ApiError::Gone { asked: v, oldest });
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rv > v && e.resource == r.key())
                    .cloned()
                    .collect()
            }
        };
        Ok(Watch { backlog, live })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc_resource() -> &'static Resource {
        resources::find("", "v1", "services").unwrap()
    }

    #[test]
    fn services_get_addresses_and_conflicts_are_detected() {
        let store = Store::open(Options::default()).unwrap();
        let r = svc_resource();
        let a = store
            .create(r, "default", json!({"metadata": {"name": "a"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}}))
            .unwrap();
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(a["spec"]["ports"][0]["nodePort"], 30000);
        let b = store
            .create(
                r,
                "default",
                json!({"metadata": {"name": "b"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        assert_eq!(b["spec"]["clusterIP"], "10.96.0.11");
        let dup = store.create(
            r,
            "default",
            json!({"metadata": {"name": "c"}, "spec": {"clusterIP": "10.96.0.10"}}),
        );
        assert!(matches!(dup, Err(ApiError::Invalid { .. })), "{dup:?}");
        let outside = store.create(
            r,
            "default",
            json!({"metadata": {"name": "c"}, "spec": {"clusterIP": "10.0.0.1"}}),
        );
        assert!(
            matches!(outside, Err(ApiError::Invalid { .. })),
            "{outside:?}"
        );
        assert!(matches!(
            store.create(r, "default", json!({"metadata": {"name": "a"}, "spec": {}})),
            Err(ApiError::AlreadyExists { .. })
        ));
        assert!(matches!(
            store.create(r, "nowhere", json!({"metadata": {"name": "z"}, "spec": {}})),
            Err(ApiError::NotFound { .. })
        ));
        let mut stale = a.clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        stale["spec"]["ports"][0]["port"] = json!(81);
        assert!(matches!(
            store.update(r, "default", "a", stale, false),
            Err(ApiError::Conflict(_))
        ));
        let same = store.update(r, "default", "a", a.clone(), false).unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"], a["metadata"]["resourceVersion"],
            "a no-op keeps the version"
        );
    }

    #[test]
    fn status_is_written_only_through_its_subresource() {
        let store = Store::open(Options::default()).unwrap();
        let pods = resources::find("", "v1", "pods").unwrap();
        let p = store
            .create(pods, "default", json!({"metadata": {"name": "p"}, "spec": {"containers": []}, "status": {"podIP": "1.2.3.4"}}))
            .unwrap();
        assert_eq!(p["status"], json!({"phase": "Pending"}));
        let mut next = p.clone();
        next["status"]["podIP"] = json!("10.0.0.5");
        let unchanged = store
            .update(pods, "default", "p", next.clone(), false)
            .unwrap();
        assert!(unchanged["status"].get("podIP").is_none());
        let with_ip = store.update(pods, "default", "p", next, true).unwrap();
        assert_eq!(with_ip["status"]["podIP"], "10.0.0.5");
    }

    #[test]
    fn watches_resume_and_deleting_a_namespace_empties_it() {
        let store = Store::open(Options::default()).unwrap();
        let ns = resources::find("", "v1", "namespaces").unwrap();
        let cm = resources::find("", "v1", "configmaps").unwrap();
        store
            .create(ns, "", json!({"metadata": {"name": "x"}}))
            .unwrap();
        let first = store
            .create(cm, "x", json!({"metadata": {"name": "one"}}))
            .unwrap();
        let from: u64 = first["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        store
            .create(cm, "x", json!({"metadata": {"name": "two"}}))
            .unwrap();
        let w = store.watch(cm, Some(from)).unwrap();
        assert_eq!(w.backlog.len(), 1);
        assert_eq!(w.backlog[0].object["metadata"]["name"], "two");
        store.delete(ns, "", "x").unwrap();
        assert!(store.list(cm, None, |_| true).1.is_empty());
        assert_eq!(store.watch(cm, Some(from)).unwrap().backlog.len(), 3);
    }

    #[test]
    fn the_file_keeps_everything_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("weft-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = Options {
            path: Some(dir.join("store.json")),
            ..Options::default()
        };
        let store = Store::open(options.clone()).unwrap();
        let cm = resources::find("", "v1", "configmaps").unwrap();
        store
            .create(
                cm,
                "default",
                json!({"metadata": {"name": "kept"}, "data": {"k": "v"}}),
            )
            .unwrap();
        let rv = store.revision();
        drop(store);
        let again = Store::open(options).unwrap();
        assert_eq!(again.revision(), rv);
        assert_eq!(again.get(cm, "default", "kept").unwrap()["data"]["k"], "v");
        assert!(matches!(
            again.watch(cm, Some(1)),
            Err(ApiError::Gone { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
