//! The API server's store: every object of every served resource in memory (the watch cache),
//! one resourceVersion counter for all of them, and a bounded history of changes for watches
//! that resume, over a [`weft_store::Backend`] that every change is written through before it is
//! acknowledged: SQLite (`Options::path`) or memory. A restart reloads the objects and the
//! history from the backend's log, so a watch resumes from a resourceVersion it was given before
//! the restart; a store in the JSON file format of earlier weft releases is converted once.
//!
//! Writes follow kube-apiserver's rules where clients notice them: names are unique per
//! namespace, a namespaced object needs its namespace, an update that carries a stale
//! `resourceVersion` is a conflict, `status` is only written through the status subresource,
//! an update that changes nothing does not bump the version, and Services get cluster IPs and
//! node ports allocated.
//!
//! Deletion is kube-apiserver's: an object with finalizers (or deleted with the `Foreground` or
//! `Orphan` propagation policy, which add `foregroundDeletion` / `orphan`) only gets a
//! `deletionTimestamp` and goes when its last finalizer is removed; a pod bound to a node is
//! deleted gracefully (its `deletionTimestamp` is when its grace period ends, and the node
//! deletes it for good once its containers have stopped); a namespace turns `Terminating`,
//! its content is deleted the same way, and it goes when it is empty.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
    path::Path,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use weft_store::Backend;

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
    /// The object after the change (for a deletion: as it was, with the deletion's version),
    /// shared with the cache.
    pub object: Arc<Value>,
    /// The object before a modification.
    pub previous: Option<Arc<Value>>,
    /// `object` as JSON, made once for all the watchers that send it.
    json: OnceLock<Vec<u8>>,
}

impl Event {
    fn new(
        rv: u64,
        kind: EventType,
        (resource, namespace): (String, String),
        object: Arc<Value>,
        previous: Option<Arc<Value>>,
    ) -> Self {
        Self {
            rv,
            kind,
            resource,
            namespace,
            object,
            previous,
            json: OnceLock::new(),
        }
    }

    /// The object as JSON: encoded by the first watcher that asks, then shared.
    pub fn object_json(&self) -> &[u8] {
        self.json
            .get_or_init(|| serde_json::to_vec(&*self.object).unwrap_or_default())
    }
}

type Key = (String, String, String);

/// Store settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// SQLite database the store is kept in; `None` keeps it in memory only.
    pub path: Option<PathBuf>,
    /// Keep the store in etcd instead (wins over `path`).
    pub etcd: Option<Etcd>,
    /// Cluster IPs are allocated from here.
    pub service_cidr: ipnet::Ipv4Net,
    /// Node ports are allocated from here (inclusive).
    pub node_ports: (u16, u16),
    /// How many changes a resuming watch can catch up on (the backend's log is compacted to
    /// keep at least this many).
    pub history: usize,
}

/// Where in etcd the store is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Etcd {
    /// The members' client URLs.
    pub endpoints: Vec<String>,
    /// The key prefix (kube-apiserver's default is `/registry`).
    pub prefix: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            path: None,
            etcd: None,
            service_cidr: "10.96.0.0/16".parse().expect("literal"),
            node_ports: (30000, 32767),
            history: 10_000,
        }
    }
}

/// The JSON file earlier releases kept the store in.
#[derive(Deserialize)]
struct Saved {
    rv: u64,
    objects: Vec<(String, Value)>,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Event>>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
    options: Options,
    backend: Box<dyn Backend>,
}

impl Inner {
    /// The objects of one resource (by its store key), in key order.
    fn of<'a>(&'a self, resource: &'a str) -> impl Iterator<Item = (&'a Key, &'a Arc<Value>)> + 'a {
        let start = (resource.to_owned(), String::new(), String::new());
        self.objects
            .range(start..)
            .take_while(move |((r, _, _), _)| r == resource)
    }

    /// The uids of the Services, which own the address claims that still hold.
    fn service_uids(&self) -> BTreeSet<&str> {
        self.of("/services")
            .filter_map(|(_, o)| meta(o, "uid"))
            .collect()
    }
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

/// The store key of address claims, which several API servers on one etcd write before they
/// hand out a cluster IP or node port (not a served resource: no client sees them).
const CLAIMS: &str = "/allocations";
/// The claims' "namespaces": not valid namespace names, so no namespace's deletion takes them.
const SERVICE_IPS: &str = "service_ips";
const NODE_PORTS: &str = "node_ports";
/// How long a claim whose Service never appeared keeps its address.
const CLAIM_GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// How often (in writes) the backend's log is compacted.
const COMPACT_EVERY: u64 = 1000;

/// The backend's key of an object: `<plural>/<namespace>/<name>` for the core group,
/// `<group>/<plural>/<namespace>/<name>` for the others (the namespace is empty for
/// cluster-scoped objects); under etcd's `/registry/` prefix, kube-apiserver's layout.
fn backend_key(key: &Key) -> String {
    format!("{}/{}/{}", key.0.trim_start_matches('/'), key.1, key.2)
}

/// The object key of a backend key (names and namespaces have no `/`; a resource key may).
fn parse_key(key: &str) -> Option<Key> {
    let mut parts = key.rsplitn(3, '/');
    let name = parts.next()?;
    let namespace = parts.next()?;
    let resource = parts.next()?;
    let resource = if resource.contains('/') {
        resource.to_owned()
    } else {
        format!("/{resource}")
    };
    Some((resource, namespace.to_owned(), name.to_owned()))
}

/// An object as the backend keeps it, with the resourceVersion of the write that made it.
fn decode(value: &[u8], rev: Option<u64>) -> Result<Value, ApiError> {
    let mut object: Value = serde_json::from_slice(value)
        .map_err(|e| ApiError::Internal(format!("a stored object is not JSON: {e}")))?;
    if let Some(rev) = rev
        && object.get("metadata").is_some_and(Value::is_object)
    {
        object["metadata"]["resourceVersion"] = json!(rev.to_string());
    }
    Ok(object)
}

fn rv_of(object: &Value) -> u64 {
    meta(object, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An object as its deletion at `rv` shows it.
fn deleted_at(object: &Value, rv: u64) -> Arc<Value> {
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    Arc::new(object)
}

fn backend_error(e: weft_store::Error) -> ApiError {
    match e {
        weft_store::Error::Compacted { asked, compacted } => ApiError::Gone {
            asked,
            oldest: compacted + 1,
        },
        weft_store::Error::Conflict { .. } => ApiError::Conflict(format!(
            "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again ({e})"
        )),
        weft_store::Error::Engine { .. } => ApiError::Internal(format!("store: {e}")),
    }
}

/// A change of the backend's log as a watch event (`None` for keys weft does not write).
fn event_of(change: &weft_store::Change) -> Result<Option<Event>, ApiError> {
    let Some((resource, namespace, _)) = parse_key(&change.key) else {
        return Ok(None);
    };
    let previous = change
        .previous
        .as_deref()
        .map(|v| decode(v, None))
        .transpose()?;
    let (kind, object, previous) = match (&change.value, previous) {
        (Some(v), None) => (EventType::Added, decode(v, Some(change.rev))?, None),
        (Some(v), Some(p)) => (EventType::Modified, decode(v, Some(change.rev))?, Some(p)),
        (None, Some(mut p)) => {
            p["metadata"]["resourceVersion"] = json!(change.rev.to_string());
            (EventType::Deleted, p, None)
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(Event::new(
        change.rev,
        kind,
        (resource, namespace),
        Arc::new(object),
        previous.map(Arc::new),
    )))
}

/// Opens the SQLite store at `path`; a JSON store of earlier releases there is converted first
/// (and kept beside it as `<name>.before-sqlite`).
fn open_sqlite(path: &Path) -> Result<weft_store::Sqlite, ApiError> {
    let io = |e: std::io::Error| ApiError::Internal(format!("opening {}: {e}", path.display()));
    let converting = path.with_extension("converting");
    let mut backup = path.as_os_str().to_owned();
    backup.push(".before-sqlite");
    let backup = PathBuf::from(backup);
    if !path.exists() && converting.exists() && backup.exists() {
        // A conversion stopped between its two renames: finish it.
        std::fs::rename(&converting, path).map_err(io)?;
    }
    let json = match std::fs::read(path) {
        Ok(bytes) => bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(e)),
    };
    if json {
        convert_json(path, &converting, &backup)?;
    }
    weft_store::Sqlite::open(path).map_err(backend_error)
}

/// Converts the JSON store at `path` into a SQLite one at the same path.
fn convert_json(path: &Path, converting: &Path, backup: &Path) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::Internal(format!("converting {}: {e}", path.display()));
    let saved: Saved = serde_json::from_slice(&std::fs::read(path).map_err(io)?)
        .map_err(|e| ApiError::Internal(format!("reading {}: {e}", path.display())))?;
    let mut revisions = BTreeSet::new();
    let mut records = Vec::with_capacity(saved.objects.len());
    for (resource, object) in &saved.objects {
        let key = (
            resource.clone(),
            meta(object, "namespace").unwrap_or("").to_owned(),
            meta(object, "name").unwrap_or("").to_owned(),
        );
        let rev = rv_of(object);
        if rev == 0 || rev > saved.rv || !revisions.insert(rev) {
            return Err(ApiError::Internal(format!(
                "converting {}: {} has resourceVersion {rev:?}, which is not a revision of its own",
                path.display(),
                backend_key(&key)
            )));
        }
        let value = serde_json::to_vec(object)
            .map_err(|e| ApiError::Internal(format!("encoding {}: {e}", key.2)))?;
        records.push(weft_store::Record {
            key: backend_key(&key),
            rev,
            value,
        });
    }
    for leftover in [
        converting.to_owned(),
        converting.with_extension("converting-wal"),
    ] {
        match std::fs::remove_file(&leftover) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    {
        let db = weft_store::Sqlite::open(converting).map_err(backend_error)?;
        db.import(saved.rv, &records).map_err(backend_error)?;
    }
    std::fs::rename(path, backup).map_err(io)?;
    std::fs::rename(converting, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    tracing::info!(
        store = %path.display(),
        objects = records.len(),
        revision = saved.rv,
        backup = %backup.display(),
        "converted a JSON store to SQLite"
    );
    Ok(())
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

/// What happens to an object's dependents when it is deleted (`propagationPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// The object goes now; the garbage collector deletes its dependents afterwards.
    Background,
    /// The object stays (with `foregroundDeletion`) until its blocking dependents are gone.
    Foreground,
    /// The dependents lose their ownerReference to the object and stay.
    Orphan,
}

/// `DeleteOptions`: from the request's body and its query parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    /// Seconds a pod gets to stop; `None` is its `terminationGracePeriodSeconds`.
    pub grace_period: Option<i64>,
    /// Dependents' fate; `None` is the resource's default (background).
    pub propagation: Option<Propagation>,
    /// Precondition: the object's uid.
    pub uid: Option<String>,
    /// Precondition: the object's resourceVersion.
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    /// Reads a `DeleteOptions` body (may be empty) and the `gracePeriodSeconds` and
    /// `propagationPolicy` query parameters (which win, as in kube-apiserver).
    pub fn parse(
        body: &[u8],
        query: &std::collections::HashMap<String, String>,
    ) -> Result<Self, ApiError> {
        let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("the DeleteOptions are not JSON: {e}")))?
        };
        let mut grace = v.get("gracePeriodSeconds").and_then(Value::as_i64);
        if let Some(g) = query.get("gracePeriodSeconds") {
            grace =
                Some(g.parse().map_err(|_| {
                    ApiError::BadRequest(format!("invalid gracePeriodSeconds {g:?}"))
                })?);
        }
        let mut policy = v
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if v.get("orphanDependents") == Some(&Value::Bool(true)) {
            policy = Some("Orphan".into());
        }
        if let Some(p) = query.get("propagationPolicy") {
            policy = Some(p.clone());
        }
        let propagation = match policy.as_deref() {
            None | Some("") => None,
            Some("Background") => Some(Propagation::Background),
            Some("Foreground") => Some(Propagation::Foreground),
            Some("Orphan") => Some(Propagation::Orphan),
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "propagationPolicy: Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
                )));
            }
        };
        if grace.is_some_and(|g| g < 0) {
            grace = Some(0);
        }
        let pre = v.get("preconditions");
        let field = |f: &str| {
            pre.and_then(|p| p.get(f))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Ok(Self {
            grace_period: grace,
            propagation,
            uid: field("uid"),
            resource_version: field("resourceVersion"),
        })
    }
}

fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn terminating(object: &Value) -> bool {
    object
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
}

/// The grace period a pod's deletion gets: none when it never reached a node or has finished.
fn pod_grace(pod: &Value, asked: Option<i64>) -> i64 {
    let unbound = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    let finished = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if unbound || finished {
        return 0;
    }
    asked
        .or_else(|| {
            pod.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30)
        .max(0)
}

/// kube-apiserver's DefaultTolerationSeconds admission: a pod that does not say otherwise
/// stays 300 s on a node that turned not-ready or unreachable before it is evicted.
fn default_tolerations(pod: &mut serde_json::Map<String, Value>) {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let list = spec.entry("tolerations").or_insert_with(|| json!([]));
    let Some(list) = list.as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let covered = list.iter().any(|t| {
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
            let k = t.get("key").and_then(Value::as_str).unwrap_or("");
            let exists = t.get("operator").and_then(Value::as_str) == Some("Exists");
            (k == key || (k.is_empty() && exists)) && (effect.is_empty() || effect == "NoExecute")
        });
        if !covered {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
}

fn timestamp_in(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Sets a pod-style condition (`type`, `status`, `lastTransitionTime`, reason, message),
/// keeping its transition time when the status stays the same.
pub fn set_condition(
    object: &mut Value,
    kind: &str,
    status: &str,
    reason: Option<&str>,
    message: Option<&str>,
) {
    let conditions = &mut object["status"]["conditions"];
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    let list = conditions.as_array_mut().expect("just made an array");
    let mut c = json!({"type": kind, "status": status, "lastTransitionTime": now()});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    if let Some(m) = message {
        c["message"] = json!(m);
    }
    match list.iter_mut().find(|x| x["type"] == kind) {
        Some(existing) => {
            if existing["status"] == status {
                c["lastTransitionTime"] = existing["lastTransitionTime"].clone();
            }
            *existing = c;
        }
        None => list.push(c),
    }
}

impl Store {
    /// Opens the store (in etcd when `options.etcd` says so; else the SQLite database at
    /// `options.path`, converting a store in the JSON format of earlier releases; in memory
    /// without a path) and makes sure the `default`,
    /// `kube-system`, `kube-public` and `kube-node-lease` namespaces exist.
    pub fn open(options: Options) -> Result<Self, ApiError> {
        let backend: Box<dyn Backend> = match (&options.etcd, &options.path) {
            (Some(etcd), _) => Box::new(
                weft_store::Etcd::connect(&etcd.endpoints, &etcd.prefix).map_err(backend_error)?,
            ),
            (None, Some(path)) => Box::new(open_sqlite(path)?),
            (None, None) => Box::new(weft_store::Memory::new()),
        };
        Self::with_backend(options, backend)
    }

    /// Opens the store over `backend`: loads every live object, and the newest changes (up to
    /// `options.history`) for watches that resume from before a restart.
    pub fn with_backend(options: Options, backend: Box<dyn Backend>) -> Result<Self, ApiError> {
        let snapshot = backend.snapshot().map_err(backend_error)?;
        let mut inner = Inner {
            rv: snapshot.rev,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
        };
        for record in &snapshot.records {
            match parse_key(&record.key) {
                Some(key) => {
                    inner
                        .objects
                        .insert(key, Arc::new(decode(&record.value, Some(record.rev))?));
                }
                None => tracing::warn!(key = record.key, "ignoring a key weft does not write"),
            }
        }
        let keep = u64::try_from(options.history).unwrap_or(u64::MAX);
        let after = snapshot.compacted.max(snapshot.rev.saturating_sub(keep));
        let changes = match backend.changes(after) {
            // Another server compacted further than this one knew.
            Err(weft_store::Error::Compacted { compacted, .. }) => backend.changes(compacted),
            other => other,
        };
        for change in changes.map_err(backend_error)? {
            if let Some(event) = event_of(&change)? {
                inner.history.push_back(Arc::new(event));
            }
        }
        tracing::info!(
            backend = backend.name(),
            revision = inner.rv,
            objects = inner.objects.len(),
            history = inner.history.len(),
            "store opened"
        );
        let (tx, _) = broadcast::channel(options.history.max(16));
        let store = Self {
            inner: Mutex::new(inner),
            tx,
            options,
            backend,
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

    /// Writes one key through to the backend (`value` `None` deletes it) if its mod revision is
    /// `expected`, and returns the revision the write made. On a shared backend the writes of
    /// other servers that came before it are applied to the cache first (this one with them:
    /// then the cache's revision is already the write's); a conflict there may come from a
    /// cache that missed them, so the cache catches up before the conflict is reported.
    fn written_through(
        &self,
        inner: &mut Inner,
        key: &Key,
        expected: u64,
        value: Option<&[u8]>,
    ) -> Result<u64, ApiError> {
        match self.backend.write(&backend_key(key), expected, value) {
            Ok(rv) if rv > inner.rv + 1 && self.backend.shared() => {
                self.catch_up_locked(inner)?;
                Ok(rv)
            }
            Ok(rv) => Ok(rv),
            Err(e @ weft_store::Error::Conflict { .. }) => {
                if self.backend.shared() {
                    self.catch_up_locked(inner)?;
                }
                Err(backend_error(e))
            }
            Err(e) => Err(backend_error(e)),
        }
    }

    /// Compacts the backend's log now and then, keeping the history watches can resume from.
    fn written(&self, inner: &mut Inner, rv: u64) {
        inner.rv = rv;
        let keep = u64::try_from(self.options.history).unwrap_or(u64::MAX);
        if rv.is_multiple_of(COMPACT_EVERY)
            && rv > keep
            && let Err(e) = self.backend.compact(rv - keep)
        {
            tracing::warn!(error = %e, "compacting the store");
        }
    }

    /// Follows the writes of the other API servers of a shared backend (etcd) on a thread of
    /// its own, so that this server's cache, history and watches see them (see
    /// [`Store::catch_up`]). Does nothing for a backend only this process writes.
    pub fn follow(self: &Arc<Self>) {
        if !self.backend.shared() {
            return;
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("weft-store-follow".into())
            .spawn(move || {
                loop {
                    let after = store.revision();
                    let followed = store.backend.follow(after, &mut |change| {
                        let mut inner = store.lock();
                        if let Err(e) = store.apply(&mut inner, &change) {
                            tracing::warn!(error = %e, key = change.key, "following the store");
                        }
                        true
                    });
                    match followed {
                        Err(weft_store::Error::Compacted { .. }) => {
                            let mut inner = store.lock();
                            if let Err(e) = store.resync(&mut inner) {
                                tracing::warn!(error = %e, "reloading the store");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "following the store"),
                        Ok(()) => {}
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "starting the store's follower");
        }
    }

    /// Brings the cache up to the backend's newest revision now, with the writes of other API
    /// servers that the follower has not delivered yet, and returns the cache's revision;
    /// `None` for a backend only this process writes, which has nothing to catch up on. A
    /// request refused with a conflict that a stale cache may have caused is worth answering
    /// again when the revision moved meanwhile.
    pub fn catch_up(&self) -> Option<u64> {
        if !self.backend.shared() {
            return None;
        }
        let mut inner = self.lock();
        if let Err(e) = self.catch_up_locked(&mut inner) {
            tracing::warn!(error = %e, "catching up with the store");
        }
        Some(inner.rv)
    }

    fn catch_up_locked(&self, inner: &mut Inner) -> Result<(), ApiError> {
        match self.backend.changes(inner.rv) {
            Ok(changes) => changes.iter().try_for_each(|c| self.apply(inner, c)),
            Err(weft_store::Error::Compacted { .. }) => self.resync(inner),
            Err(e) => Err(backend_error(e)),
        }
    }

    /// Applies a change of the backend's log to the cache (one this process did not make, or
    /// one it made while others were writing) and tells watchers. Changes at or before the
    /// cache's revision are already in it.
    fn apply(&self, inner: &mut Inner, change: &weft_store::Change) -> Result<(), ApiError> {
        if change.rev <= inner.rv {
            return Ok(());
        }
        inner.rv = change.rev;
        let Some(key) = parse_key(&change.key) else {
            return Ok(());
        };
        let event = match &change.value {
            Some(value) => {
                let object = Arc::new(decode(value, Some(change.rev))?);
                let previous = inner.objects.insert(key.clone(), object.clone());
                let kind = if previous.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                Event::new(change.rev, kind, (key.0, key.1), object, previous)
            }
            None => {
                let Some(object) = inner.objects.remove(&key) else {
                    return Ok(());
                };
                let object = deleted_at(&object, change.rev);
                Event::new(change.rev, EventType::Deleted, (key.0, key.1), object, None)
            }
        };
        self.record(inner, event);
        Ok(())
    }

    /// Reloads the cache from a snapshot when the changes since its revision are gone
    /// (compacted by another server while this one was cut off), telling watchers what differs
    /// as a relisting client would see it.
    fn resync(&self, inner: &mut Inner) -> Result<(), ApiError> {
        let snapshot = self.backend.snapshot().map_err(backend_error)?;
        tracing::warn!(
            from = inner.rv,
            to = snapshot.rev,
            "the store's log was compacted past this server's cache; reloading it"
        );
        let mut fresh = BTreeMap::new();
        for record in &snapshot.records {
            if let Some(key) = parse_key(&record.key) {
                fresh.insert(key, Arc::new(decode(&record.value, Some(record.rev))?));
            }
        }
        let old = std::mem::take(&mut inner.objects);
        inner.rv = snapshot.rev;
        let mut events = Vec::new();
        for (key, object) in &fresh {
            let previous = old.get(key);
            if previous != Some(object) {
                let kind = if previous.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                events.push((key.clone(), kind, object.clone(), previous.cloned()));
            }
        }
        for (key, object) in old {
            if !fresh.contains_key(&key) {
                let object = deleted_at(&object, snapshot.rev);
                events.push((key, EventType::Deleted, object, None));
            }
        }
        inner.objects = fresh;
        for ((resource, namespace, _), kind, object, previous) in events {
            let event = Event::new(snapshot.rev, kind, (resource, namespace), object, previous);
            self.record(inner, event);
        }
        Ok(())
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
            .map(|o| Value::clone(o))
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
        let resource = r.key();
        let (rv, shared): (u64, Vec<Arc<Value>>) = {
            let inner = self.lock();
            let items = inner
                .of(&resource)
                .filter(|((_, ns, _), o)| namespace.is_none_or(|n| n == ns) && filter(o))
                .map(|(_, o)| o.clone())
                .collect();
            (inner.rv, items)
        };
        // The copies are made after the lock is let go: writers do not wait for them.
        (rv, shared.iter().map(|o| Value::clone(o)).collect())
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
        crate::defaults::apply(r.kind, &mut object);
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
            match inner.objects.get(&ns_key) {
                None => {
                    return Err(ApiError::NotFound {
                        kind: "namespaces".into(),
                        name: ns.to_owned(),
                    });
                }
                Some(n) if terminating(n) => {
                    return Err(ApiError::Forbidden(format!(
                        "{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        r.plural
                    )));
                }
                Some(_) => {}
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
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            if r.kind == "Namespace" {
                let labels = m.entry("labels").or_insert_with(|| json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
            // Status is the controllers' to write, except a Node's, which its agent reports
            // when it registers (as kube-apiserver allows).
            if r.status && r.kind != "Node" {
                o.remove("status");
            }
            match r.kind {
                "Namespace" => {
                    o.insert("status".into(), json!({"phase": "Active"}));
                }
                "Pod" => {
                    o.insert("status".into(), json!({"phase": "Pending"}));
                    default_tolerations(o);
                }
                "Service" => {
                    o.insert("status".into(), json!({"loadBalancer": {}}));
                }
                _ => {}
            }
        }
        if r.kind == "Service" {
            self.allocate(&mut inner, &name, &mut object)?;
        }
        self.commit(&mut inner, key, object, None)
    }

    /// Writes a created or changed object through to the backend, then to the cache, and tells
    /// watchers; returns it with the resourceVersion the write made.
    fn commit(
        &self,
        inner: &mut Inner,
        key: Key,
        mut object: Value,
        previous: Option<Arc<Value>>,
    ) -> Result<Value, ApiError> {
        let expected = previous.as_deref().map_or(0, rv_of);
        object["metadata"]["resourceVersion"] = json!((inner.rv + 1).to_string());
        let bytes = serde_json::to_vec(&object)
            .map_err(|e| ApiError::Internal(format!("encoding {}: {e}", key.2)))?;
        let rv = self.written_through(inner, &key, expected, Some(&bytes))?;
        // Another writer of a shared backend may have taken the revision this one expected.
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if inner.rv >= rv {
            // Caught up with the other servers' writes, this one included.
            return Ok(object);
        }
        self.written(inner, rv);
        let shared = Arc::new(object);
        inner.objects.insert(key.clone(), shared.clone());
        let kind = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let object = Value::clone(&shared);
        let event = Event::new(rv, kind, (key.0, key.1), shared, previous);
        self.record(inner, event);
        Ok(object)
    }

    /// Cluster IP and node ports for a new Service.
    fn allocate(&self, inner: &mut Inner, name: &str, svc: &mut Value) -> Result<(), ApiError> {
        let claimed = self.allocate_from(inner, name, svc)?;
        if !self.backend.shared() {
            return Ok(());
        }
        // Several servers allocate from one range: each address is claimed with a write that
        // only one of them can make (a lost race is a conflict; the request is answered again
        // once the cache has the winner's claim).
        let owner = meta(svc, "uid").unwrap_or("").to_owned();
        for (range, value) in claimed {
            let key = (CLAIMS.to_owned(), range.to_owned(), value.clone());
            let previous = inner.objects.get(&key).cloned();
            if let Some(p) = &previous
                && p["owner"] != owner.as_str()
                && Self::claim_holds(p, &inner.service_uids())
            {
                // Claimed meanwhile by another server (seen since the allocation was made):
                // allocate again from what the cache now holds.
                return Err(ApiError::Conflict(format!(
                    "{range} {value} was allocated by another API server meanwhile"
                )));
            }
            let claim = json!({"metadata": {"name": value}, "owner": owner, "claimedAt": now()});
            self.commit(inner, key, claim, previous)?;
        }
        Ok(())
    }

    /// Whether an address claim still holds: its Service exists, or it is too young for its
    /// Service to have been written yet (a server that died between the claim and the Service
    /// leaves a claim that lapses).
    fn claim_holds(claim: &Value, services: &BTreeSet<&str>) -> bool {
        let owner = claim["owner"].as_str().unwrap_or("");
        let young = claim["claimedAt"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| chrono::Utc::now().signed_duration_since(t) < CLAIM_GRACE);
        young || services.contains(owner)
    }

    /// Allocates a Service's cluster IP and node ports from what the cache holds; returns what
    /// it allocated, as (range, value) claims.
    fn allocate_from(
        &self,
        inner: &Inner,
        name: &str,
        svc: &mut Value,
    ) -> Result<Vec<(&'static str, String)>, ApiError> {
        let r = resources::find("", "v1", "services").expect("served");
        let key = r.key();
        let services: Vec<&Value> = inner.of(&key).map(|(_, o)| &**o).collect();
        let uids = inner.service_uids();
        let claims: Vec<(&str, &str)> = inner
            .of(CLAIMS)
            .filter(|(_, o)| Self::claim_holds(o, &uids))
            .map(|((_, range, value), _)| (range.as_str(), value.as_str()))
            .collect();
        let claimed = |range: &'static str| {
            claims
                .iter()
                .filter(move |(r, _)| *r == range)
                .map(|(_, v)| *v)
        };
        let mut out = Vec::new();
        let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
            return Err(invalid(r, name, "spec: Required value"));
        };
        let kind = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_owned();
        if kind == "ExternalName" {
            return Ok(out);
        }
        spec.insert("type".into(), json!(kind));
        let used: BTreeSet<Ipv4Addr> = services
            .iter()
            .filter_map(|s| s.pointer("/spec/clusterIP")?.as_str()?.parse().ok())
            .chain(claimed(SERVICE_IPS).filter_map(|v| v.parse().ok()))
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
            out.push((SERVICE_IPS, ip.clone()));
            spec.insert("ipFamilies".into(), json!(["IPv4"]));
            spec.insert("ipFamilyPolicy".into(), json!("SingleStack"));
        }
        if kind == "NodePort" || kind == "LoadBalancer" {
            let mut used: BTreeSet<u64> = services
                .iter()
                .filter_map(|s| s.pointer("/spec/ports")?.as_array())
                .flatten()
                .filter_map(|p| p.get("nodePort")?.as_u64())
                .chain(claimed(NODE_PORTS).filter_map(|v| v.parse().ok()))
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
                            out.push((NODE_PORTS, p.to_string()));
                        }
                        None => {
                            let p = (u64::from(lo)..=u64::from(hi))
                                .find(|p| !used.contains(p))
                                .ok_or_else(|| {
                                    invalid(r, name, "spec.ports[].nodePort: no node ports left")
                                })?;
                            used.insert(p);
                            out.push((NODE_PORTS, p.to_string()));
                            port["nodePort"] = json!(p);
                        }
                    }
                }
            }
        }
        Ok(out)
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
        crate::defaults::apply(r.kind, &mut object);
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
            let mut next = Value::clone(&stored);
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
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
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
            if r.kind == "PersistentVolumeClaim" {
                Self::check_resize(&inner, r, name, &stored, &object)?;
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
        if next == *stored {
            return Ok(Value::clone(&stored));
        }
        if !status_only && next.get("spec") != stored.get("spec") {
            let g = stored["metadata"]["generation"].as_u64().unwrap_or(1);
            next["metadata"]["generation"] = json!(g + 1);
        }
        let next = self.commit(&mut inner, key.clone(), next, Some(stored))?;
        // The last finalizer of an object being deleted is gone: the deletion completes (a pod
        // still in its grace period waits for its node).
        if terminating(&next) && finalizers(&next).is_empty() && Self::due(r, &next) {
            let gone = self.remove(&mut inner, &key)?;
            return Ok(gone.unwrap_or(next));
        }
        Ok(next)
    }

    /// kube-apiserver's rules for a bound claim's storage request: it may grow only when the
    /// claim's StorageClass allows volume expansion, and never shrink below what the claim has.
    fn check_resize(
        inner: &Inner,
        r: &Resource,
        name: &str,
        stored: &Value,
        next: &Value,
    ) -> Result<(), ApiError> {
        let request = |o: &Value| {
            o.pointer("/spec/resources/requests/storage")
                .and_then(Value::as_str)
                .and_then(weft_node::quantity)
        };
        let (Some(old), Some(new)) = (request(stored), request(next)) else {
            return Ok(());
        };
        let bound = stored.pointer("/status/phase").and_then(Value::as_str) == Some("Bound");
        if new == old || !bound {
            return Ok(());
        }
        let has = stored
            .pointer("/status/capacity/storage")
            .and_then(Value::as_str)
            .and_then(weft_node::quantity)
            .unwrap_or(old);
        if new < has {
            return Err(invalid(
                r,
                name,
                "spec.resources.requests.storage: Forbidden: field can not be less than status.capacity",
            ));
        }
        let class = stored
            .pointer("/spec/storageClassName")
            .and_then(Value::as_str)
            .unwrap_or("");
        let key = (
            "storage.k8s.io/storageclasses".to_owned(),
            String::new(),
            class.to_owned(),
        );
        // A claim naming no class has the default one (as the node's provisioner chose).
        let class = if class.is_empty() {
            inner
                .objects
                .iter()
                .find(|((res, _, _), c)| {
                    *res == key.0
                        && c.pointer(
                            "/metadata/annotations/storageclass.kubernetes.io~1is-default-class",
                        )
                        .and_then(Value::as_str)
                            == Some("true")
                })
                .map(|(_, c)| c)
        } else {
            inner.objects.get(&key)
        };
        let expandable = class
            .and_then(|c| c.get("allowVolumeExpansion"))
            .and_then(Value::as_bool)
            == Some(true);
        if new > old && !expandable {
            return Err(ApiError::Forbidden(format!(
                "persistentvolumeclaims {name:?} is forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize"
            )));
        }
        Ok(())
    }

    /// Whether a terminating object without finalizers goes now: anything but a pod whose
    /// grace period has not been cut to zero.
    fn due(r: &Resource, object: &Value) -> bool {
        r.kind != "Pod"
            || object
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                == 0
    }

    /// Changes an object with `f` (spec, metadata or status alike), as one write. Nothing
    /// changes, and the version stays, when `f` leaves the object as it was.
    pub fn modify(
        &self,
        r: &Resource,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = Self::key(r, namespace, name);
        let Some(stored) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::NotFound {
                kind: r.plural.to_owned(),
                name: name.to_owned(),
            });
        };
        let mut next = Value::clone(&stored);
        f(&mut next)?;
        if next == *stored {
            return Ok(Value::clone(&stored));
        }
        if next.get("spec") != stored.get("spec") {
            let g = stored["metadata"]["generation"].as_u64().unwrap_or(1);
            next["metadata"]["generation"] = json!(g + 1);
        }
        self.commit(&mut inner, key, next, Some(stored))
    }

    /// What `pods/eviction` does before the deletion, as kube-apiserver: a running pod that one
    /// budget selects spends one of its disruptions, atomically with other evictions
    /// ([`crate::controllers::disruption::take`]; more than one budget is refused), and then
    /// gets the `DisruptionTarget` condition, for a Job's podFailurePolicy and for
    /// `kubectl describe`. Pods that ended or are being deleted are neither held back nor marked.
    pub fn admit_eviction(&self, namespace: &str, pod_name: &str) -> Result<(), ApiError> {
        use crate::controllers::disruption;
        let pods = resources::find("", "v1", "pods").expect("served");
        let budgets = resources::find("policy", "v1", "poddisruptionbudgets").expect("served");
        let pod = self.get(pods, namespace, pod_name)?;
        let phase = pod.pointer("/status/phase").and_then(Value::as_str);
        if matches!(phase, Some("Succeeded" | "Failed")) || terminating(&pod) {
            return Ok(());
        }
        let (_, selecting) = self.list(budgets, Some(namespace), |b| {
            disruption::budget_selects(b, &pod)
        });
        match selecting.as_slice() {
            [] => {}
            [budget] => {
                let name = budget["metadata"]["name"].as_str().unwrap_or("");
                let at = now();
                self.modify(budgets, namespace, name, |b| disruption::take(b, &pod, &at))?;
            }
            _ => {
                return Err(ApiError::Internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support."
                        .into(),
                ));
            }
        }
        self.modify(pods, namespace, pod_name, |pod| {
            set_condition(
                pod,
                "DisruptionTarget",
                "True",
                Some("EvictionByEvictionAPI"),
                Some("Eviction API: evicting"),
            );
            Ok(())
        })
        .map(|_| ())
    }

    /// `pods/binding`: assigns a pending pod to a node, as the scheduler does.
    pub fn bind(&self, namespace: &str, name: &str, node: &str) -> Result<Value, ApiError> {
        let pods = resources::find("", "v1", "pods").expect("served");
        if node.is_empty() {
            return Err(invalid(pods, name, "target.name: Required value"));
        }
        self.modify(pods, namespace, name, |pod| {
            if terminating(pod) {
                return Err(ApiError::Conflict(format!(
                    "pod {name} is being deleted, cannot be assigned to a host"
                )));
            }
            match pod.pointer("/spec/nodeName").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => {
                    return Err(ApiError::Conflict(format!(
                        "pod {name} is already assigned to node {n:?}"
                    )));
                }
                _ => {}
            }
            pod["spec"]["nodeName"] = json!(node);
            set_condition(pod, "PodScheduled", "True", None, None);
            Ok(())
        })
    }

    /// Deletes an object as kube-apiserver does (see the module doc): now, or by setting its
    /// `deletionTimestamp` when finalizers or a pod's grace period hold it. Returns the object
    /// as it is after the request.
    pub fn delete(
        &self,
        r: &Resource,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = Self::key(r, namespace, name);
        let Some(stored) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::NotFound {
                kind: r.plural.to_owned(),
                name: name.to_owned(),
            });
        };
        if let Some(uid) = &options.uid
            && Some(uid.as_str()) != meta(&stored, "uid")
        {
            return Err(ApiError::Conflict(format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta(&stored, "uid").unwrap_or("")
            )));
        }
        if let Some(v) = &options.resource_version
            && Some(v.as_str()) != meta(&stored, "resourceVersion")
        {
            return Err(ApiError::Conflict(format!(
                "Precondition failed: ResourceVersion in precondition: {v}, ResourceVersion in object meta: {}",
                meta(&stored, "resourceVersion").unwrap_or("")
            )));
        }
        let mut fin = finalizers(&stored);
        let add = match options.propagation {
            Some(Propagation::Foreground) => Some("foregroundDeletion"),
            Some(Propagation::Orphan) => Some("orphan"),
            _ => None,
        };
        if let Some(f) = add
            && !fin.iter().any(|x| x == f)
        {
            fin.push(f.to_owned());
        }
        let grace = if r.kind == "Pod" {
            pod_grace(&stored, options.grace_period)
        } else {
            0
        };
        let already = terminating(&stored);
        if r.kind == "Namespace" {
            return self.terminate_namespace(&mut inner, &key, stored);
        }
        if fin.is_empty() && grace == 0 {
            return Ok(self.remove(&mut inner, &key)?.unwrap_or(Value::Null));
        }
        let mut next = Value::clone(&stored);
        let m = &mut next["metadata"];
        let shorter = m["deletionGracePeriodSeconds"]
            .as_i64()
            .is_none_or(|g| grace < g);
        if !already || (r.kind == "Pod" && shorter) {
            m["deletionTimestamp"] = json!(timestamp_in(grace));
            m["deletionGracePeriodSeconds"] = json!(grace);
            if !already {
                let g = m["generation"].as_u64().unwrap_or(1);
                m["generation"] = json!(g + 1);
            }
        }
        if !fin.is_empty() {
            m["finalizers"] = json!(fin);
        }
        if next == *stored {
            return Ok(Value::clone(&stored));
        }
        self.commit(&mut inner, key, next, Some(stored))
    }

    /// Deletes every object of `r` in `namespace` (all when `None`) that `filter` accepts
    /// (`deletecollection`); returns them as they are after their deletion.
    pub fn delete_collection(
        &self,
        r: &Resource,
        namespace: Option<&str>,
        filter: impl Fn(&Value) -> bool,
        options: &DeleteOptions,
    ) -> Result<Vec<Value>, ApiError> {
        let (_, items) = self.list(r, namespace, filter);
        let mut out = Vec::new();
        for item in items {
            let ns = meta(&item, "namespace").unwrap_or("");
            let name = meta(&item, "name").unwrap_or("");
            match self.delete(r, ns, name, options) {
                Ok(v) => out.push(v),
                Err(ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Removes an object now (a DELETED event); the namespace it was the last object of goes
    /// too if it is terminating.
    fn remove(&self, inner: &mut Inner, key: &Key) -> Result<Option<Value>, ApiError> {
        let Some(stored) = inner.objects.get(key) else {
            return Ok(None);
        };
        let stored_before = Value::clone(stored);
        let rv = self.written_through(inner, key, rv_of(stored), None)?;
        if inner.rv >= rv {
            // Caught up with the other servers' writes, this deletion included.
            let mut object = stored_before;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            if !key.1.is_empty() {
                self.finish_namespace(inner, &key.1)?;
            }
            return Ok(Some(object));
        }
        self.written(inner, rv);
        let Some(object) = inner.objects.remove(key) else {
            return Ok(None);
        };
        let shared = deleted_at(&object, rv);
        let object = Value::clone(&shared);
        let event = Event::new(
            rv,
            EventType::Deleted,
            (key.0.clone(), key.1.clone()),
            shared,
            None,
        );
        self.record(inner, event);
        if !key.1.is_empty() {
            self.finish_namespace(inner, &key.1)?;
        }
        Ok(Some(object))
    }

    /// A namespace that is being deleted goes once nothing is left in it.
    fn finish_namespace(&self, inner: &mut Inner, ns: &str) -> Result<(), ApiError> {
        let ns_key = ("/namespaces".to_owned(), String::new(), ns.to_owned());
        if !inner.objects.get(&ns_key).is_some_and(|n| terminating(n))
            || inner.objects.keys().any(|(_, n, _)| n == ns)
        {
            return Ok(());
        }
        self.remove(inner, &ns_key).map(drop)
    }

    /// Marks a namespace `Terminating` and deletes its content (pods gracefully, objects with
    /// finalizers when they are released); it goes when empty.
    fn terminate_namespace(
        &self,
        inner: &mut Inner,
        key: &Key,
        stored: Arc<Value>,
    ) -> Result<Value, ApiError> {
        let name = key.2.clone();
        if !terminating(&stored) {
            let mut next = Value::clone(&stored);
            next["metadata"]["deletionTimestamp"] = json!(now());
            next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            next["status"]["phase"] = json!("Terminating");
            self.commit(inner, key.clone(), next, Some(stored))?;
        }
        let content: Vec<Key> = inner
            .objects
            .keys()
            .filter(|(_, ns, _)| *ns == name)
            .cloned()
            .collect();
        for k in content {
            let Some(object) = inner.objects.get(&k).cloned() else {
                continue;
            };
            let pod = k.0 == "/pods";
            let grace = if pod { pod_grace(&object, None) } else { 0 };
            if finalizers(&object).is_empty() && grace == 0 {
                self.remove(inner, &k)?;
            } else if !terminating(&object) {
                let mut next = Value::clone(&object);
                next["metadata"]["deletionTimestamp"] = json!(timestamp_in(grace));
                next["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                self.commit(inner, k, next, Some(object))?;
            }
        }
        self.finish_namespace(inner, &name)?;
        Ok(inner
            .objects
            .get(key)
            .map(|o| Value::clone(o))
            .unwrap_or_else(|| json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name, "kind": "namespaces"}})))
    }

    /// Starts a watch of `resource` after version `from`: `None` (or 0) replays every current
    /// object as ADDED; a version older than the history kept is [`ApiError::Gone`].
    pub fn watch(&self, r: &Resource, from: Option<u64>) -> Result<Watch, ApiError> {
        let inner = self.lock();
        let live = self.tx.subscribe();
        let backlog = match from.filter(|v| *v > 0) {
            None => inner
                .of(&r.key())
                .map(|((res, ns, _), o)| {
                    let at = (res.clone(), ns.clone());
                    Arc::new(Event::new(inner.rv, EventType::Added, at, o.clone(), None))
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
    fn a_bound_claim_grows_only_when_its_class_allows_and_never_shrinks() {
        let store = Store::open(Options::default()).unwrap();
        let sc = resources::find("storage.k8s.io", "v1", "storageclasses").unwrap();
        let pvcs = resources::find("", "v1", "persistentvolumeclaims").unwrap();
        for (name, expand) in [("fixed", false), ("elastic", true)] {
            store
                .create(
                    sc,
                    "",
                    json!({"metadata": {"name": name}, "provisioner": "csi.weft.io",
                           "allowVolumeExpansion": expand}),
                )
                .unwrap();
            store
                .create(
                    pvcs,
                    "default",
                    json!({"metadata": {"name": name}, "spec": {"storageClassName": name,
                           "accessModes": ["ReadWriteOnce"],
                           "resources": {"requests": {"storage": "1Gi"}}}}),
                )
                .unwrap();
            let mut bound = store.get(pvcs, "default", name).unwrap();
            bound["status"] = json!({"phase": "Bound", "capacity": {"storage": "1Gi"}});
            store.update(pvcs, "default", name, bound, true).unwrap();
        }
        let asked = |name: &str, size: &str| {
            let mut o = store.get(pvcs, "default", name).unwrap();
            o["spec"]["resources"]["requests"]["storage"] = json!(size);
            store.update(pvcs, "default", name, o, false)
        };
        assert!(
            matches!(asked("fixed", "2Gi"), Err(ApiError::Forbidden(m)) if m.contains("must support resize"))
        );
        assert!(asked("elastic", "2Gi").is_ok());
        assert!(
            matches!(asked("elastic", "512Mi"), Err(ApiError::Invalid { message, .. }) if message.contains("less than status.capacity"))
        );
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
        store
            .delete(ns, "", "x", &DeleteOptions::default())
            .unwrap();
        assert!(store.list(cm, None, |_| true).1.is_empty());
        assert_eq!(store.watch(cm, Some(from)).unwrap().backlog.len(), 3);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_database_keeps_objects_and_history_across_a_restart() {
        let dir = temp_dir("restart");
        let options = Options {
            path: Some(dir.join("store.db")),
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
        let from = store.revision();
        store
            .modify(cm, "default", "kept", |o| {
                o["data"]["k"] = json!("w");
                Ok(())
            })
            .unwrap();
        store
            .create(cm, "default", json!({"metadata": {"name": "gone"}}))
            .unwrap();
        store
            .delete(cm, "default", "gone", &DeleteOptions::default())
            .unwrap();
        let rv = store.revision();
        drop(store);
        let again = Store::open(options).unwrap();
        assert_eq!(again.revision(), rv);
        let kept = again.get(cm, "default", "kept").unwrap();
        assert_eq!(kept["data"]["k"], "w");
        assert_eq!(kept["metadata"]["resourceVersion"], (from + 1).to_string());
        // A watch given a version before the restart resumes: the change, the creation and the
        // deletion after it, in order.
        let backlog = again.watch(cm, Some(from)).unwrap().backlog;
        let seen: Vec<(EventType, &str)> = backlog
            .iter()
            .map(|e| (e.kind, meta(&e.object, "name").unwrap()))
            .collect();
        assert_eq!(
            seen,
            [
                (EventType::Modified, "kept"),
                (EventType::Added, "gone"),
                (EventType::Deleted, "gone")
            ]
        );
        assert_eq!(backlog[0].previous.as_ref().unwrap()["data"]["k"], "v");
        assert_eq!(backlog[2].rv, rv);
        // Writes go on from the stored revision.
        let next = again
            .create(cm, "default", json!({"metadata": {"name": "after"}}))
            .unwrap();
        assert_eq!(next["metadata"]["resourceVersion"], (rv + 1).to_string());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// One in-memory log that two stores write, as two API servers write one etcd.
    #[derive(Debug)]
    struct SharedLog(Arc<weft_store::Memory>);

    impl Backend for SharedLog {
        fn name(&self) -> &'static str {
            "shared memory"
        }
        fn snapshot(&self) -> weft_store::Result<weft_store::Snapshot> {
            self.0.snapshot()
        }
        fn write(&self, key: &str, expected: u64, value: Option<&[u8]>) -> weft_store::Result<u64> {
            self.0.write(key, expected, value)
        }
        fn changes(&self, after: u64) -> weft_store::Result<Vec<weft_store::Change>> {
            self.0.changes(after)
        }
        fn compact(&self, upto: u64) -> weft_store::Result<()> {
            self.0.compact(upto)
        }
        fn shared(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_store_catches_up_with_another_writer_and_reloads_once_its_log_is_compacted_away() {
        let log = Arc::new(weft_store::Memory::new());
        let open = || Store::with_backend(Options::default(), Box::new(SharedLog(log.clone())));
        let (a, b) = (open().unwrap(), open().unwrap());
        let cm = resources::find("", "v1", "configmaps").unwrap();
        let from = b.revision();
        let made = a
            .create(cm, "default", json!({"metadata": {"name": "one"}}))
            .unwrap();
        // B's cache has not seen A's write until it catches up; then its watchers see it too.
        assert!(b.get(cm, "default", "one").is_err());
        assert_eq!(b.catch_up(), Some(a.revision()));
        assert_eq!(b.get(cm, "default", "one").unwrap(), made);
        let seen = b.watch(cm, Some(from)).unwrap().backlog;
        assert_eq!((seen.len(), seen[0].kind), (1, EventType::Added));
        // B writes on top of A's object with the version A gave; A's stale cache conflicts,
        // catches up, and then sees B's change.
        let changed = b
            .modify(cm, "default", "one", |o| {
                o["data"] = json!({"k": "v"});
                Ok(())
            })
            .unwrap();
        let stale = a.modify(cm, "default", "one", |o| {
            o["data"] = json!({"k": "a"});
            Ok(())
        });
        assert!(matches!(stale, Err(ApiError::Conflict(_))), "{stale:?}");
        assert_eq!(a.get(cm, "default", "one").unwrap(), changed);
        // A deletes it and writes another; the log is compacted past B's revision: B reloads
        // and tells its watchers what changed.
        let before = b.revision();
        a.delete(cm, "default", "one", &DeleteOptions::default())
            .unwrap();
        a.create(cm, "default", json!({"metadata": {"name": "two"}}))
            .unwrap();
        log.compact(a.revision()).unwrap();
        b.catch_up();
        assert!(b.get(cm, "default", "one").is_err());
        assert!(b.get(cm, "default", "two").is_ok());
        let mut watch = b.watch(cm, Some(before)).unwrap();
        let mut kinds: Vec<EventType> = watch.backlog.iter().map(|e| e.kind).collect();
        while let Ok(e) = watch.live.try_recv() {
            kinds.push(e.kind);
        }
        assert!(
            kinds.contains(&EventType::Deleted) && kinds.contains(&EventType::Added),
            "{kinds:?}"
        );
    }

    #[test]
    fn a_restarted_store_resumes_watches_within_its_history_and_refuses_older_ones() {
        let dir = temp_dir("compact");
        let options = Options {
            path: Some(dir.join("store.db")),
            history: 50,
            ..Options::default()
        };
        let store = Store::open(options.clone()).unwrap();
        let cm = resources::find("", "v1", "configmaps").unwrap();
        store
            .create(cm, "default", json!({"metadata": {"name": "c"}}))
            .unwrap();
        while store.revision() < COMPACT_EVERY + 10 {
            store
                .modify(cm, "default", "c", |o| {
                    o["data"]["n"] = json!((rv_of(o) + 1).to_string());
                    Ok(())
                })
                .unwrap();
        }
        let rv = store.revision();
        drop(store);
        let again = Store::open(options).unwrap();
        // The backend was compacted at COMPACT_EVERY - 50 and 50 changes are reloaded: older
        // versions are gone, newer ones resume.
        assert!(matches!(
            again.watch(cm, Some(COMPACT_EVERY - 100)),
            Err(ApiError::Gone { .. })
        ));
        let backlog = again.watch(cm, Some(rv - 5)).unwrap().backlog;
        assert_eq!(backlog.len(), 5);
        assert!(backlog.iter().all(|e| e.kind == EventType::Modified));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_json_store_of_an_earlier_release_is_converted_once() {
        let dir = temp_dir("convert");
        let path = dir.join("store.json");
        let old = json!({"rv": 12, "objects": [
            ["/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "demo", "resourceVersion": "5"}, "status": {"phase": "Active"}}],
            ["/configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "demo", "resourceVersion": "9"}, "data": {"a": "b"}}],
        ]});
        std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
        let options = Options {
            path: Some(path.clone()),
            ..Options::default()
        };
        let store = Store::open(options.clone()).unwrap();
        let cm = resources::find("", "v1", "configmaps").unwrap();
        let c = store.get(cm, "demo", "c").unwrap();
        assert_eq!(c["data"]["a"], "b");
        assert_eq!(c["metadata"]["resourceVersion"], "9");
        // The missing system namespaces were created after the stored revision.
        assert!(store.revision() > 12);
        drop(store);
        assert!(dir.join("store.json.before-sqlite").exists());
        assert!(
            std::fs::read(&path)
                .unwrap()
                .starts_with(b"SQLite format 3")
        );
        let again = Store::open(options).unwrap();
        assert_eq!(again.get(cm, "demo", "c").unwrap()["data"]["a"], "b");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backend_keys_round_trip() {
        for key in [
            ("/configmaps", "default", "c"),
            ("apps/deployments", "demo", "web"),
            ("/nodes", "", "n1"),
        ] {
            let key = (key.0.to_owned(), key.1.to_owned(), key.2.to_owned());
            assert_eq!(parse_key(&backend_key(&key)), Some(key));
        }
        assert_eq!(
            backend_key(&("/pods".into(), "ns".into(), "p".into())),
            "pods/ns/p"
        );
    }

    #[test]
    fn a_json_store_with_shared_versions_is_refused_untouched() {
        let dir = temp_dir("refuse");
        let path = dir.join("store.json");
        let bad = br#"{"rv": 3, "objects": [
            ["/configmaps", {"metadata": {"name": "a", "namespace": "default", "resourceVersion": "2"}}],
            ["/configmaps", {"metadata": {"name": "b", "namespace": "default", "resourceVersion": "2"}}]]}"#;
        std::fs::write(&path, bad).unwrap();
        let err = Store::open(Options {
            path: Some(path.clone()),
            ..Options::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("not a revision of its own"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bad);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
