//! The HTTP side of the API: discovery (`/version`, `/api`, `/apis`, resource lists), and for
//! every served resource get, list, watch, create, update, patch and delete, cluster-wide and
//! per namespace, with label and field selectors and the status subresource. Errors are
//! `Status` objects. Every request is authenticated and authorized first ([`crate::auth`]).

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{
    apply,
    auth::{self, Attributes, Authenticator, Identity},
    patch,
    resources::{self, RESOURCES, Resource},
    selector::{FieldSelector, LabelSelector},
    status::ApiError,
    store::{DeleteOptions, Event, EventType, Store},
    table,
};

/// The Kubernetes minor version the API presents (`kubectl` picks its build by it).
pub const KUBE_MINOR: &str = "32";

/// What every request is served with: the store, who may use it, and how to reach nodes.
#[derive(Clone, Debug)]
struct Api {
    store: Arc<Store>,
    auth: Arc<Authenticator>,
    kubelet: Option<Arc<rustls::ClientConfig>>,
    gate: Arc<Gate>,
}

/// The API as an axum router over a store, for the users `auth` knows; `kubelet` is the TLS
/// (with the API server's client certificate) nodes' endpoints are reached with, plain HTTP
/// without it; requests are admitted and timed out under `limits`.
pub fn router(
    store: Arc<Store>,
    auth: Arc<Authenticator>,
    kubelet: Option<Arc<rustls::ClientConfig>>,
    limits: Limits,
) -> Router {
    Router::new().fallback(admit).with_state(Api {
        store,
        auth,
        kubelet,
        gate: Arc::new(Gate::new(limits)),
    })
}

/// Holds a request to the server's [`Limits`] (long-running ones excepted), then handles it.
async fn admit(State(api): State<Api>, req: axum::extract::Request) -> Response {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // Parsed once, here; a query that does not parse is refused by the handler.
    let query: Result<HashMap<String, String>, _> =
        serde_urlencoded::from_str(req.uri().query().unwrap_or(""));
    let empty = HashMap::new();
    let q = query.as_ref().unwrap_or(&empty);
    if long_running(req.method(), &parts, q) {
        return handle(api, req, query).await;
    }
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let gate = api.gate.clone();
    let semaphore = if mutating { &gate.writes } else { &gate.reads };
    let _permit = match semaphore.as_ref().map(|s| s.clone().try_acquire_owned()) {
        Some(Err(_)) => {
            tracing::debug!(path, "too many requests in flight");
            return ApiError::TooManyRequests.into_response();
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let timeout = q
        .get("timeout")
        .and_then(|t| parse_duration(t))
        .filter(|t| !t.is_zero())
        .map_or(gate.limits.request_timeout, |t| {
            t.min(gate.limits.request_timeout)
        });
    match tokio::time::timeout(timeout, handle(api, req, query)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::debug!(path, ?timeout, "request timed out");
            ApiError::Timeout.into_response()
        }
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = json_response(code, &self.status());
        if matches!(self, Self::TooManyRequests) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// How much the server takes on at once and for how long (kube-apiserver's flags of the same
/// meaning). Long-running requests (watches, `logs -f`, exec/attach/port-forward once
/// upgraded) are not held to either.
#[derive(Clone, Debug)]
pub struct Limits {
    /// `--request-timeout`: a request not answered by then gets `504 Timeout` (a request's
    /// own `?timeout=` may ask for less).
    pub request_timeout: Duration,
    /// `--max-requests-inflight`: read requests beyond this many at once get `429` (0: no
    /// limit).
    pub max_requests_inflight: usize,
    /// `--max-mutating-requests-inflight`: the same for writes.
    pub max_mutating_requests_inflight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            max_requests_inflight: 400,
            max_mutating_requests_inflight: 200,
        }
    }
}

/// Parses a Go duration as clients send `?timeout=` (`32s`, `1m0s`, `500ms`); a bare number is
/// seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if text.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|&i| i > 0)?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * scale).ok()?;
    }
    Some(total)
}

/// The admission of requests under [`Limits`].
#[derive(Debug)]
struct Gate {
    limits: Limits,
    reads: Option<Arc<tokio::sync::Semaphore>>,
    writes: Option<Arc<tokio::sync::Semaphore>>,
}

impl Gate {
    fn new(limits: Limits) -> Self {
        let semaphore = |n: usize| (n > 0).then(|| Arc::new(tokio::sync::Semaphore::new(n)));
        Self {
            reads: semaphore(limits.max_requests_inflight),
            writes: semaphore(limits.max_mutating_requests_inflight),
            limits,
        }
    }
}

/// Whether a request stays open for as long as the client wants: a watch, a followed log, or
/// an exec/attach/port-forward stream.
fn long_running(method: &Method, parts: &[&str], query: &HashMap<String, String>) -> bool {
    let flag = |k: &str| query.get(k).is_some_and(|v| v == "true" || v == "1");
    let last = parts.last().copied().unwrap_or("");
    (method == Method::GET && (flag("watch") || (last == "log" && flag("follow"))))
        || matches!(last, "exec" | "attach" | "portforward" | "proxy")
        || parts.get(2) == Some(&"watch")
}

/// A subresource of an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sub {
    /// The object itself.
    Main,
    /// `/status`.
    Status,
    /// `/scale`.
    Scale,
    /// `pods/binding`.
    Binding,
    /// `pods/eviction`.
    Eviction,
    /// `pods/log`, proxied to the pod's node.
    Log,
    /// `pods/exec`, `pods/attach`, `pods/portforward`: upgraded streams to the pod's node.
    Stream(weft_node::stream::Kind),
}

fn subresource(r: &Resource, name: &str) -> Result<Sub, ApiError> {
    match name {
        "status" if r.status => Ok(Sub::Status),
        "scale" if r.scale => Ok(Sub::Scale),
        "binding" if r.kind == "Pod" => Ok(Sub::Binding),
        "eviction" if r.kind == "Pod" => Ok(Sub::Eviction),
        "log" if r.kind == "Pod" => Ok(Sub::Log),
        "exec" if r.kind == "Pod" => Ok(Sub::Stream(weft_node::stream::Kind::Exec)),
        "attach" if r.kind == "Pod" => Ok(Sub::Stream(weft_node::stream::Kind::Attach)),
        "portforward" if r.kind == "Pod" => Ok(Sub::Stream(weft_node::stream::Kind::PortForward)),
        _ => Err(ApiError::NoSuchResource),
    }
}

impl Sub {
    /// The subresource's name in a URL and in authorization.
    fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::Main => return None,
            Self::Status => "status",
            Self::Scale => "scale",
            Self::Binding => "binding",
            Self::Eviction => "eviction",
            Self::Log => "log",
            Self::Stream(weft_node::stream::Kind::Exec) => "exec",
            Self::Stream(weft_node::stream::Kind::Attach) => "attach",
            Self::Stream(weft_node::stream::Kind::PortForward) => "portforward",
        })
    }
}

/// Where a request points.
#[derive(Debug)]
enum Target {
    Collection(&'static Resource, Option<String>),
    Object(&'static Resource, String, String, Sub),
}

fn parse_target(parts: &[&str]) -> Result<Target, ApiError> {
    let (group, version, rest) = match parts {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::NoSuchResource),
    };
    let find =
        |plural: &str| resources::find(group, version, plural).ok_or(ApiError::NoSuchResource);
    let namespaced_in =
        |plural: &str| resources::find(group, version, plural).filter(|r| r.namespaced);
    match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced_in(plural).is_some() => {
            let r = namespaced_in(plural).expect("checked");
            let (ns, object) = ((*ns).to_owned(), |name: &str, sub| {
                Ok(Target::Object(r, (*ns).to_owned(), name.to_owned(), sub))
            });
            match tail {
                [] => Ok(Target::Collection(r, Some(ns))),
                [name] => object(name, Sub::Main),
                [name, sub] => object(name, subresource(r, sub)?),
                _ => Err(ApiError::NoSuchResource),
            }
        }
        [plural] => Ok(Target::Collection(find(plural)?, None)),
        [plural, name, tail @ ..] => {
            let r = find(plural)?;
            if r.namespaced {
                return Err(ApiError::NoSuchResource);
            }
            let sub = match tail {
                [] => Sub::Main,
                [sub] => subresource(r, sub)?,
                _ => return Err(ApiError::NoSuchResource),
            };
            Ok(Target::Object(r, String::new(), (*name).to_owned(), sub))
        }
        _ => Err(ApiError::NoSuchResource),
    }
}

/// An object's `autoscaling/v1` Scale.
fn scale_of(object: &Value) -> Result<Value, ApiError> {
    let m = &object["metadata"];
    let selector = object
        .pointer("/spec/selector")
        .map(|s| serde_json::from_value(s.clone()))
        .transpose()
        .map_err(|e| ApiError::Internal(format!("reading the selector: {e}")))?;
    let selector = LabelSelector::from_api(selector.as_ref())
        .map(|s| s.to_string())
        .unwrap_or_default();
    Ok(json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": object.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {"replicas": object.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
                   "selector": selector},
    }))
}

/// Writes the replicas of a changed Scale into its object (a resourceVersion in the Scale is
/// a precondition).
fn write_scale(
    store: &Store,
    r: &Resource,
    ns: &str,
    name: &str,
    scale: &Value,
) -> Result<Value, ApiError> {
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::Invalid {
            kind: "Scale".into(),
            name: name.to_owned(),
            message: "spec.replicas: Invalid value: must be greater than or equal to 0".into(),
        })?;
    let rv = scale
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let object = store.modify(r, ns, name, |o| {
        if let Some(v) = &rv
            && o["metadata"]["resourceVersion"].as_str() != Some(v)
        {
            return Err(ApiError::Conflict(format!(
                "Operation cannot be fulfilled on {}.{} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                r.plural, r.group
            )));
        }
        o["spec"]["replicas"] = json!(replicas);
        Ok(())
    })?;
    scale_of(&object)
}

fn success(kind: &str, name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
           "details": {"name": name, "kind": kind}})
}

fn discovery(parts: &[&str]) -> Option<Value> {
    let resource_list = |group: &str, version: &str| -> Option<Value> {
        let mut list = Vec::new();
        for r in RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            list.push(json!({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                "kind": r.kind, "shortNames": r.short_names,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            }));
            let sub = |name: &str, kind: &str, verbs: &[&str]| {
                json!({"name": format!("{}/{name}", r.plural), "singularName": "",
                       "namespaced": r.namespaced, "kind": kind, "verbs": verbs})
            };
            if r.status {
                list.push(sub("status", r.kind, &["get", "patch", "update"]));
            }
            if r.scale {
                let mut s = sub("scale", "Scale", &["get", "patch", "update"]);
                s["group"] = json!("autoscaling");
                s["version"] = json!("v1");
                list.push(s);
            }
            if r.kind == "Pod" {
                list.push(sub("log", "Pod", &["get"]));
                for stream in ["exec", "attach", "portforward"] {
                    list.push(sub(stream, "PodExecOptions", &["create", "get"]));
                }
                list.push(sub("binding", "Binding", &["create"]));
                let mut e = sub("eviction", "Eviction", &["create"]);
                e["group"] = json!("policy");
                e["version"] = json!("v1");
                list.push(e);
            }
        }
        (!list.is_empty()).then(|| {
            json!({"kind": "APIResourceList", "apiVersion": "v1",
                   "groupVersion": RESOURCES.iter().find(|r| r.group == group && r.version == version).map(|r| r.api_version()),
                   "resources": list})
        })
    };
    let group = |name: &str, version: &str| {
        let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
        json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
    };
    match parts {
        ["version"] => Some(json!({
            "major": "1", "minor": KUBE_MINOR, "gitVersion": format!("v1.{KUBE_MINOR}.0-weft.{}", env!("CARGO_PKG_VERSION")),
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
        })),
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})),
        ["apis"] => Some(json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": resources::groups().into_iter().map(|(g, v)| group(g, v))
                .chain([crate::metrics::group()]).collect::<Vec<_>>()})),
        ["apis", crate::metrics::GROUP, ..] => crate::metrics::discovery(parts),
        ["apis", g] => resources::groups()
            .into_iter()
            .find(|(name, _)| name == g)
            .map(|(g, v)| {
                let mut v = group(g, v);
                v["kind"] = json!("APIGroup");
                v["apiVersion"] = json!("v1");
                v
            }),
        ["openapi", "v3"] => {
            let mut paths = serde_json::Map::new();
            for r in RESOURCES {
                let gv = if r.group.is_empty() {
                    format!("api/{}", r.version)
                } else {
                    format!("apis/{}/{}", r.group, r.version)
                };
                paths.insert(
                    gv.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{gv}")}),
                );
            }
            Some(json!({"paths": paths}))
        }
        ["openapi", "v3", "api", v] => openapi_v3("", v),
        ["openapi", "v3", "apis", g, v] => openapi_v3(g, v),
        ["api", v] => resource_list("", v),
        ["apis", g, v] => resource_list(g, v),
        _ => None,
    }
}

/// With `fieldValidation=Strict`, a field the kind does not have is an error (otherwise it is
/// dropped), as kube-apiserver does.
fn strict_fields(
    r: &Resource,
    query: &HashMap<String, String>,
    object: &Value,
) -> Result<(), ApiError> {
    if query.get("fieldValidation").map(String::as_str) != Some("Strict") {
        return Ok(());
    }
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (_, unknown) = r.normalize(object).map_err(|message| ApiError::Invalid {
        kind: r.kind.to_owned(),
        name: name.to_owned(),
        message,
    })?;
    if unknown.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    Err(ApiError::BadRequest(format!(
        "strict decoding error: {}",
        list.join(", ")
    )))
}

/// A minimal OpenAPI v3 document for one group version: the object paths with their PATCH
/// operation and its query parameters, which is what kubectl reads to learn that the server
/// validates fields itself (`fieldValidation`).
fn openapi_v3(group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        paths.insert(path, json!({"patch": {
            "operationId": format!("patch{}", r.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": r.kind},
            "parameters": [param("dryRun"), param("fieldManager"), param("fieldValidation"), param("force")],
            "responses": {"200": {"description": "OK"}},
        }}));
    }
    if paths.is_empty() {
        return None;
    }
    // The kinds' schemas from k8s-openapi, with the references they make, in OpenAPI v3's
    // `components.schemas`; each kind's own marked with its group, version and kind, which is
    // how `kubectl explain` finds it.
    let mut generator =
        schemars::SchemaGenerator::new(schemars::generate::SchemaSettings::openapi3());
    let mut kinds = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let reference = (r.schema)(&mut generator);
        if let Some(name) = reference
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|s| s.rsplit('/').next())
        {
            kinds.push((name.to_owned(), r.kind));
        }
    }
    let mut schemas: serde_json::Map<String, Value> =
        generator.take_definitions(true).into_iter().collect();
    mark_merge_keys(&mut schemas);
    for (name, kind) in kinds {
        if let Some(s) = schemas.get_mut(&name).and_then(Value::as_object_mut) {
            s.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": group, "version": version, "kind": kind}]),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "weft", "version": format!("v1.{KUBE_MINOR}")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// Marks the list fields the server merges by key (`patch::merge_key`) with the
/// `x-kubernetes-patch-strategy`/`-merge-key` extensions the Kubernetes types carry, so that
/// kubectl's client-side apply and `kubectl patch` compute strategic patches with the same keys
/// the server merges by, rather than sending lists whole.
fn mark_merge_keys(schemas: &mut serde_json::Map<String, Value>) {
    // The properties each schema's elements have, as an empty object of those fields.
    let shapes: HashMap<String, Value> = schemas
        .iter()
        .filter_map(|(name, s)| {
            let props = s.get("properties")?.as_object()?;
            let shape = props.keys().map(|k| (k.clone(), Value::Null)).collect();
            Some((format!("#/components/schemas/{name}"), Value::Object(shape)))
        })
        .collect();
    for schema in schemas.values_mut() {
        let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
            continue;
        };
        for (field, prop) in props.iter_mut() {
            let element = prop
                .pointer("/items/$ref")
                .and_then(Value::as_str)
                .and_then(|r| shapes.get(r));
            let Some(key) = element.and_then(|e| crate::patch::merge_key(field, &[e])) else {
                continue;
            };
            if let Some(p) = prop.as_object_mut() {
                p.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
                p.insert("x-kubernetes-patch-merge-key".into(), json!(key));
            }
        }
    }
}

fn accept(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Whether a PATCH is a server-side apply.
fn is_apply(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/apply-patch"))
}

/// Refuses what cannot be an object of any kind: a body (or a patched object) that is not a
/// JSON object, or whose `metadata` is not one.
fn object_shaped(v: Value) -> Result<Value, ApiError> {
    if !v.is_object() {
        return Err(ApiError::BadRequest(
            "the object is not a JSON object".into(),
        ));
    }
    if v.get("metadata")
        .is_some_and(|m| !m.is_object() && !m.is_null())
    {
        return Err(ApiError::BadRequest("metadata must be an object".into()));
    }
    Ok(v)
}

fn body_json(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    decode_body(headers, body).and_then(object_shaped)
}

fn decode_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.starts_with(crate::protobuf::CONTENT_TYPE) {
        return crate::protobuf::decode(body).map_err(|e| match e {
            crate::protobuf::ProtoError::UnknownKind { .. } => {
                ApiError::UnsupportedMediaType(e.to_string())
            }
            _ => ApiError::BadRequest(e.to_string()),
        });
    }
    if !ct.starts_with("application/json")
        && !ct.contains("patch+json")
        && !ct.starts_with("application/apply-patch")
    {
        return Err(ApiError::UnsupportedMediaType(ct.to_owned()));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))
}

/// The largest request body accepted (kube-apiserver's limit).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// The verb authorization checks a request against (kube-apiserver's names).
fn verb(method: &Method, target: &Target, query: &HashMap<String, String>) -> &'static str {
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    match (method, target) {
        (_, Target::Object(.., Sub::Stream(_))) => "create",
        (&Method::GET, Target::Collection(..)) if watching => "watch",
        (&Method::GET, Target::Collection(..)) => "list",
        (&Method::GET, Target::Object(..)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, Target::Collection(..)) => "deletecollection",
        (&Method::DELETE, Target::Object(..)) => "delete",
        _ => "unknown",
    }
}

/// Whether `who` may make this request to `target`; `body` is read for a create's name when
/// the user is held to names.
fn allowed(
    store: &Store,
    who: &Identity,
    verb: &str,
    target: &Target,
    headers: &HeaderMap,
    body: Option<&Bytes>,
) -> Result<(), ApiError> {
    let (resource, namespace, name, sub) = match target {
        Target::Collection(r, ns) => (*r, ns.as_deref().unwrap_or(""), "", None),
        Target::Object(r, ns, name, sub) => (*r, ns.as_str(), name.as_str(), sub.name()),
    };
    let attributes = Attributes {
        verb,
        resource,
        subresource: sub,
        namespace,
        name,
    };
    let object = match body {
        Some(b) if verb == "create" && !who.groups.iter().any(|g| g == auth::MASTERS) => {
            body_json(headers, b).ok()
        }
        _ => None,
    };
    auth::authorize(store, who, &attributes, object.as_ref())
}

async fn handle(
    api: Api,
    req: axum::extract::Request,
    query: Result<HashMap<String, String>, serde_urlencoded::de::Error>,
) -> Response {
    let uri = req.uri().clone();
    let store = api.store.clone();
    let path = uri.path().trim_end_matches('/').to_owned();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let who = match api.auth.authenticate(
        req.headers(),
        req.extensions().get::<weft_pki::serve::PeerSubject>(),
    ) {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    let query = match query {
        Ok(q) => q,
        Err(e) => return ApiError::BadRequest(format!("invalid query: {e}")).into_response(),
    };
    let target = parse_target(&parts);
    let who = match who {
        Some(who) => who,
        None if auth::public_path(&parts) => Identity::anonymous(),
        None => return ApiError::Unauthorized.into_response(),
    };
    if let Ok(t @ Target::Object(_, ns, name, Sub::Stream(kind))) = &target {
        let verb = verb(req.method(), t, &query);
        if let Err(e) = allowed(&store, &who, verb, t, req.headers(), None) {
            return e.into_response();
        }
        return match proxy_stream(&store, api.kubelet.as_ref(), *kind, ns, name, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    let (head, body) = req.into_parts();
    let (method, headers) = (head.method, head.headers);
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::RequestEntityTooLarge(format!("reading the request body: {e}"))
                .into_response();
        }
    };
    tracing::debug!(%method, %uri, user = who.user, "request");
    if method == Method::POST
        && auth::is_self_review(&parts)
        && who.groups.iter().any(|g| g == auth::AUTHENTICATED)
    {
        let answer = body_json(&headers, &body)
            .and_then(|review| auth::self_review(&store, &who, &parts, &review));
        return match answer {
            Ok(v) => json_response(StatusCode::CREATED, &v),
            Err(e) => e.into_response(),
        };
    }
    if let Some(m) = crate::metrics::parse(&parts) {
        if method != Method::GET {
            return ApiError::MethodNotAllowed.into_response();
        }
        let attributes = Attributes {
            verb: m.verb(),
            resource: m.resource,
            subresource: None,
            namespace: m.namespace.as_deref().unwrap_or(""),
            name: m.name.as_deref().unwrap_or(""),
        };
        if let Err(e) = auth::authorize(&store, &who, &attributes, None) {
            return e.into_response();
        }
        return match crate::metrics::serve(&store, api.kubelet.as_ref(), &m, &query).await {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => e.into_response(),
        };
    }
    if let Ok(t) = &target
        && let Err(e) = allowed(
            &store,
            &who,
            verb(&method, t, &query),
            t,
            &headers,
            Some(&body),
        )
    {
        tracing::debug!(error = %e, %uri, "forbidden");
        return e.into_response();
    }
    if method == Method::GET {
        if matches!(parts.as_slice(), ["healthz"] | ["readyz"] | ["livez"]) {
            return (StatusCode::OK, "ok").into_response();
        }
        if let Some(v) = discovery(&parts) {
            return json_response(StatusCode::OK, &v);
        }
    }
    if method == Method::GET
        && let Ok(Target::Object(_, ns, name, Sub::Log)) = parse_target(&parts)
    {
        return match proxy_log(
            &store,
            api.kubelet.as_ref(),
            &ns,
            &name,
            &query,
            uri.query().unwrap_or(""),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
    }
    let mut seen = store.revision();
    let mut answer = serve(&store, &method, &parts, &query, &headers, &body);
    // With other API servers writing the same etcd, this one's cache may have missed their
    // newest writes: a conflict is answered again once it has caught up, as kube-apiserver
    // retries a conflicting write against what etcd holds: while the cache moves (a conflict
    // that catching up does not change, a client's stale resourceVersion, is the answer), for
    // as long as other writers keep winning the race, within bounds.
    for _ in 0..32 {
        if !matches!(answer, Err(ApiError::Conflict(_))) {
            break;
        }
        match store.catch_up() {
            Some(now) if now != seen => seen = now,
            _ => break,
        }
        answer = serve(&store, &method, &parts, &query, &headers, &body);
    }
    match answer {
        Ok(Reply::Json(code, v)) => json_response(code, &v),
        Ok(Reply::Watch(r)) => r,
        Err(e) => {
            tracing::debug!(error = %e, %uri, "refused");
            e.into_response()
        }
    }
}

enum Reply {
    Json(StatusCode, Value),
    Watch(Response),
}

fn serve(
    store: &Arc<Store>,
    method: &Method,
    parts: &[&str],
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Reply, ApiError> {
    if query.contains_key("dryRun") {
        return Err(ApiError::BadRequest(
            "dryRun is not supported by this server".into(),
        ));
    }
    let target = parse_target(parts)?;
    let ok = |v: Value| Ok(Reply::Json(StatusCode::OK, v));
    let manager = || {
        apply::manager(
            query.get("fieldManager").map(String::as_str),
            headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok()),
        )
    };
    let selectors = || -> Result<_, ApiError> {
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        Ok(move |o: &Value| labels.matches(o) && fields.matches(o))
    };
    match (method, target) {
        (&Method::GET, Target::Collection(r, ns)) => {
            let filter = selectors()?;
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                let from = match query.get("resourceVersion").map(String::as_str) {
                    None | Some("") => None,
                    Some(v) => Some(v.parse::<u64>().map_err(|_| {
                        ApiError::BadRequest(format!("invalid resourceVersion {v:?}"))
                    })?),
                };
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(1800);
                let as_table = table::wanted(accept(headers));
                return watch(
                    store,
                    r,
                    ns,
                    from,
                    Duration::from_secs(timeout),
                    as_table,
                    filter,
                )
                .map(Reply::Watch);
            }
            let (rv, items) = store.list(r, ns.as_deref(), filter);
            if table::wanted(accept(headers)) {
                return ok(table::table(r, &items, &rv.to_string()));
            }
            ok(list_of(r, rv, items))
        }
        (&Method::POST, Target::Collection(r, ns)) => {
            let mut object = body_json(headers, body)?;
            strict_fields(r, query, &object)?;
            apply::record_update(None, &mut object, &manager(), &r.api_version());
            let created = store.create(r, ns.as_deref().unwrap_or(""), object)?;
            Ok(Reply::Json(StatusCode::CREATED, created))
        }
        (&Method::DELETE, Target::Collection(r, ns)) => {
            let options = DeleteOptions::parse(body, query)?;
            let items = store.delete_collection(r, ns.as_deref(), selectors()?, &options)?;
            ok(list_of(r, store.revision(), items))
        }
        (&Method::GET, Target::Object(r, ns, name, sub @ (Sub::Main | Sub::Status))) => {
            let _ = sub;
            let o = store.get(r, &ns, &name)?;
            if table::wanted(accept(headers)) {
                let rv = o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                return ok(table::table(r, &[o], &rv));
            }
            ok(o)
        }
        (&Method::GET, Target::Object(r, ns, name, Sub::Scale)) => {
            ok(scale_of(&store.get(r, &ns, &name)?)?)
        }
        (&Method::PUT, Target::Object(r, ns, name, Sub::Scale)) => {
            let scale = body_json(headers, body)?;
            ok(write_scale(store, r, &ns, &name, &scale)?)
        }
        (&Method::PATCH, Target::Object(r, ns, name, Sub::Scale)) => {
            let mut scale = scale_of(&store.get(r, &ns, &name)?)?;
            let rv = scale["metadata"]["resourceVersion"].clone();
            apply_patch(headers, body, &mut scale)?;
            if scale["metadata"]["resourceVersion"] == rv {
                scale["metadata"]["resourceVersion"] = Value::Null;
            }
            ok(write_scale(store, r, &ns, &name, &scale)?)
        }
        (&Method::PUT, Target::Object(r, ns, name, sub @ (Sub::Main | Sub::Status))) => {
            let mut object = body_json(headers, body)?;
            strict_fields(r, query, &object)?;
            if sub == Sub::Main {
                let old = store.get(r, &ns, &name)?;
                apply::record_update(Some(&old), &mut object, &manager(), &r.api_version());
            }
            ok(store.update(r, &ns, &name, object, sub == Sub::Status)?)
        }
        (&Method::PATCH, Target::Object(r, ns, name, Sub::Main)) if is_apply(headers) => {
            let config = body_json(headers, body)?;
            strict_fields(r, query, &config)?;
            let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
                return Err(ApiError::BadRequest(
                    "PATCH: fieldManager is required for apply requests".into(),
                ));
            };
            let force = query.get("force").is_some_and(|f| f == "true");
            let live = match store.get(r, &ns, &name) {
                Ok(o) => Some(o),
                Err(ApiError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            let mut object =
                apply::apply(live.as_ref(), &config, manager, &r.api_version(), force)?;
            object["metadata"]["name"] = json!(name);
            match live {
                None => Ok(Reply::Json(
                    StatusCode::CREATED,
                    store.create(r, &ns, object)?,
                )),
                Some(live) => {
                    // The apply is to the object it read: a write in between is a conflict.
                    object["metadata"]["resourceVersion"] =
                        live["metadata"]["resourceVersion"].clone();
                    ok(store.update(r, &ns, &name, object, false)?)
                }
            }
        }
        (&Method::PATCH, Target::Object(r, ns, name, sub @ (Sub::Main | Sub::Status))) => {
            let mut object = store.get(r, &ns, &name)?;
            let rv = object["metadata"]["resourceVersion"].clone();
            let old = (sub == Sub::Main).then(|| object.clone());
            apply_patch(headers, body, &mut object)?;
            if let Some(old) = &old {
                apply::record_update(Some(old), &mut object, &manager(), &r.api_version());
            }
            strict_fields(r, query, &object)?;
            // A patch applies to the current object unless it names a version itself.
            if object["metadata"]["resourceVersion"] == Value::Null {
                object["metadata"]["resourceVersion"] = rv;
            }
            ok(store.update(r, &ns, &name, object, sub == Sub::Status)?)
        }
        (&Method::POST, Target::Object(_, ns, name, Sub::Binding)) => {
            let binding = body_json(headers, body)?;
            let node = binding
                .pointer("/target/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            store.bind(&ns, &name, node)?;
            Ok(Reply::Json(StatusCode::CREATED, success("pods", &name)))
        }
        (&Method::POST, Target::Object(r, ns, name, Sub::Eviction)) => {
            let eviction = body_json(headers, body)?;
            let options = eviction
                .get("deleteOptions")
                .map(|o| serde_json::to_vec(o).unwrap_or_default())
                .unwrap_or_default();
            let options = DeleteOptions::parse(&options, &HashMap::new())?;
            store.admit_eviction(&ns, &name)?;
            store.delete(r, &ns, &name, &options)?;
            Ok(Reply::Json(StatusCode::CREATED, success("pods", &name)))
        }
        (&Method::DELETE, Target::Object(r, ns, name, Sub::Main)) => {
            let options = DeleteOptions::parse(body, query)?;
            let out = store.delete(r, &ns, &name, &options)?;
            // A deletion that completed answers with the object (kubectl prints "deleted"
            // either way); one that waits for finalizers or a grace period answers 202.
            let code = if out.pointer("/metadata/deletionTimestamp").is_some() {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            Ok(Reply::Json(code, out))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn list_of(r: &Resource, rv: u64, items: Vec<Value>) -> Value {
    let mut list = json!({
        "kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
    });
    // Moved in, not copied as `json!` would.
    list["items"] = Value::Array(items);
    list
}

/// Applies a PATCH body to `object` by its content type.
fn apply_patch(headers: &HeaderMap, body: &Bytes, object: &mut Value) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let p: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the patch is not valid JSON: {e}")))?;
    match ct.split(';').next().unwrap_or("") {
        "application/merge-patch+json" => patch::merge(object, &p),
        "application/strategic-merge-patch+json" => patch::strategic(object, &p)?,
        "application/json-patch+json" => patch::json_patch(object, &p)?,
        other => return Err(ApiError::UnsupportedMediaType(other.to_owned())),
    }
    *object = object_shaped(std::mem::take(object))?;
    Ok(())
}

/// `pods/log`: the pod's node serves its containers' logs (`/containerLogs/...` on the port
/// its Node advertises); the answer is streamed through, `follow=true` included.
async fn proxy_log(
    store: &Store,
    tls: Option<&Arc<rustls::ClientConfig>>,
    ns: &str,
    name: &str,
    params: &HashMap<String, String>,
    query: &str,
) -> Result<Response, ApiError> {
    let (pod, target) = pod_node(store, ns, name)?;
    let container = pick_container(&pod, name, params)?;
    let forward: Vec<String> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("container="))
        .map(str::to_owned)
        .collect();
    let path = format!(
        "/containerLogs/{ns}/{name}/{container}?{}",
        forward.join("&")
    );
    let scheme = if tls.is_some() { "https" } else { "http" };
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::Internal(format!("Get \"{scheme}://{target}{path}\": {e}"))
    };
    let answer = weft_node::stream::get(&target, &path, tls)
        .await
        .map_err(|e| unreachable(&e))?;
    let code = answer.status();
    if !code.is_success() {
        let text = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(ApiError::BadRequest(text));
    }
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::new(answer.into_body()))
        .unwrap_or_default())
}

/// A pod and its node's endpoint (`address:port`), as the Node advertises it.
fn pod_node(store: &Store, ns: &str, name: &str) -> Result<(Value, String), ApiError> {
    let pods = resources::find("", "v1", "pods").expect("served");
    let nodes = resources::find("", "v1", "nodes").expect("served");
    let pod = store.get(pods, ns, name)?;
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if node_name.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let node = store.get(nodes, "", node_name)?;
    Ok((pod, node_endpoint(&node)?))
}

/// A Node's endpoint (`address:port`) as it advertises it: its first InternalIP (else
/// ExternalIP, else Hostname) and its kubelet port.
pub(crate) fn node_endpoint(node: &Value) -> Result<String, ApiError> {
    let node_name = node
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let addresses = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let address = ["InternalIP", "ExternalIP", "Hostname"]
        .iter()
        .find_map(|t| {
            addresses
                .iter()
                .find(|a| a["type"] == *t)
                .and_then(|a| a["address"].as_str())
        })
        .ok_or_else(|| ApiError::Internal(format!("node {node_name} has no address")))?
        .to_owned();
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(10250);
    Ok(format!("{address}:{port}"))
}

/// The container a request names (`container=`), or the pod's only one.
fn pick_container(
    pod: &Value,
    name: &str,
    params: &HashMap<String, String>,
) -> Result<String, ApiError> {
    let containers: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(
            pod.pointer("/spec/initContainers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        )
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    match params.get("container").filter(|c| !c.is_empty()) {
        Some(c) if containers.contains(c) => Ok(c.clone()),
        Some(c) => Err(ApiError::BadRequest(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => Err(ApiError::BadRequest(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            containers.join(" ")
        ))),
    }
}

/// `pods/exec`, `pods/attach`, `pods/portforward`: the upgrade request goes on to the pod's
/// node (`/exec/{ns}/{pod}/{container}?...` as kubelet serves it), which answers it through the
/// runtime; the streams are spliced through, whatever protocol the two ends agree on.
async fn proxy_stream(
    store: &Store,
    tls: Option<&Arc<rustls::ClientConfig>>,
    kind: weft_node::stream::Kind,
    ns: &str,
    name: &str,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let params: HashMap<String, String> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(req.uri().query().unwrap_or(""))
            .unwrap_or_default()
            .into_iter()
            .collect();
    let (pod, target) = pod_node(store, ns, name)?;
    if pod.pointer("/status/phase").and_then(Value::as_str) != Some("Running") {
        return Err(ApiError::BadRequest(format!(
            "unable to upgrade connection: pod {name} is not running"
        )));
    }
    let query = req.uri().query().unwrap_or("");
    let path = match kind {
        weft_node::stream::Kind::PortForward => format!("/portForward/{ns}/{name}?{query}"),
        weft_node::stream::Kind::Exec | weft_node::stream::Kind::Attach => {
            let container = pick_container(&pod, name, &params)?;
            let verb = if kind == weft_node::stream::Kind::Exec {
                "exec"
            } else {
                "attach"
            };
            format!("/{verb}/{ns}/{name}/{container}?{query}")
        }
    };
    Ok(weft_node::stream::proxy_upgrade(req, &target, &path, tls).await)
}

/// How long Events are kept (kube-apiserver's `--event-ttl` default).
pub const EVENT_TTL: Duration = Duration::from_secs(3600);

/// Deletes Events older than [`EVENT_TTL`] (by their last occurrence), every minute.
pub async fn sweep_events(store: Arc<Store>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(EVENT_TTL).unwrap_or_default();
        let old = |o: &Value| {
            [
                "/lastTimestamp",
                "/eventTime",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .find_map(|p| o.pointer(p).and_then(Value::as_str))
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t < cutoff)
        };
        for r in RESOURCES.iter().filter(|r| r.kind == "Event") {
            if let Err(e) = store.delete_collection(r, None, old, &DeleteOptions::default()) {
                tracing::warn!(error = %e, "expiring events");
            }
        }
    }
}

/// What a watcher with this filter sees of an event.
fn visible(
    event: &Event,
    r: &Resource,
    ns: Option<&str>,
    filter: &dyn Fn(&Value) -> bool,
) -> Option<EventType> {
    if event.resource != r.key() || ns.is_some_and(|n| n != event.namespace) {
        return None;
    }
    let now = filter(&event.object);
    match (event.kind, event.previous.as_deref().map(filter)) {
        (EventType::Modified, Some(before)) => match (before, now) {
            (true, true) => Some(EventType::Modified),
            (false, true) => Some(EventType::Added),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        },
        (kind, _) => now.then_some(kind),
    }
}

/// One line of a watch, `{"type": kind, "object": ...}`, around an object already encoded.
fn line_of(kind: &str, object: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(object.len() + 32);
    v.extend_from_slice(br#"{"type":""#);
    v.extend_from_slice(kind.as_bytes());
    v.extend_from_slice(br#"","object":"#);
    v.extend_from_slice(object);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

fn line(kind: &str, object: &Value) -> Result<Bytes, Infallible> {
    Ok(line_of(
        kind,
        &serde_json::to_vec(object).unwrap_or_default(),
    ))
}

fn watch(
    store: &Arc<Store>,
    r: &'static Resource,
    ns: Option<String>,
    from: Option<u64>,
    timeout: Duration,
    as_table: bool,
    filter: impl Fn(&Value) -> bool + Send + Sync + 'static,
) -> Result<Response, ApiError> {
    // kubectl get -w asks for Tables: each event then carries a one-row Table. Other watchers
    // share the event's JSON, encoded once.
    let render = move |e: &Event, kind: EventType| {
        if as_table {
            let rv = e.object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            line(
                kind_name(kind),
                &table::table(r, &[Value::clone(&e.object)], &rv),
            )
        } else {
            Ok(line_of(kind_name(kind), e.object_json()))
        }
    };
    let w = match store.watch(r, from) {
        Ok(w) => w,
        Err(e @ ApiError::Gone { .. }) => {
            // kube-apiserver answers an expired watch with 200 and an ERROR event.
            let body = line("ERROR", &e.status()).unwrap_or_default();
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap_or_default());
        }
        Err(e) => return Err(e),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let filter = Arc::new(filter);
    let f = filter.clone();
    let ns2 = ns.clone();
    let backlog = futures::stream::iter(
        w.backlog
            .into_iter()
            .filter_map(move |e| visible(&e, r, ns2.as_deref(), &*f).map(|k| render(&e, k)))
            .collect::<Vec<_>>(),
    );
    let live = futures::stream::unfold(Some(w.live), move |rx| {
        let (filter, ns) = (filter.clone(), ns.clone());
        async move {
            let mut rx = rx?;
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Err(_) | Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        return None;
                    }
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                        let gone = ApiError::Gone {
                            asked: 0,
                            oldest: 0,
                        };
                        return Some((line("ERROR", &gone.status()), None));
                    }
                    Ok(Ok(e)) => {
                        if let Some(k) = visible(&e, r, ns.as_deref(), &*filter) {
                            return Some((render(&e, k), Some(rx)));
                        }
                    }
                }
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(backlog.chain(live)))
        .unwrap_or_default())
}

fn kind_name(k: EventType) -> &'static str {
    match k {
        EventType::Added => "ADDED",
        EventType::Modified => "MODIFIED",
        EventType::Deleted => "DELETED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_marks_the_lists_the_server_merges_by_key() {
        let key = |doc: &Value, schema: &str, field: &str| {
            let p = &doc["components"]["schemas"][schema]["properties"][field];
            (
                p["x-kubernetes-patch-strategy"].as_str().map(str::to_owned),
                p["x-kubernetes-patch-merge-key"]
                    .as_str()
                    .map(str::to_owned),
            )
        };
        let merge = |k: &str| (Some("merge".to_owned()), Some(k.to_owned()));
        let core = openapi_v3("", "v1").expect("core v1");
        let spec = "io.k8s.api.core.v1.PodSpec";
        assert_eq!(key(&core, spec, "containers"), merge("name"));
        assert_eq!(key(&core, spec, "volumes"), merge("name"));
        let container = "io.k8s.api.core.v1.Container";
        assert_eq!(key(&core, container, "ports"), merge("containerPort"));
        assert_eq!(key(&core, container, "volumeMounts"), merge("mountPath"));
        assert_eq!(key(&core, container, "env"), merge("name"));
        assert_eq!(
            key(&core, "io.k8s.api.core.v1.ServiceSpec", "ports"),
            merge("port")
        );
        // Lists of other fields stay atomic, and so do lists of strings.
        assert_eq!(key(&core, container, "args"), (None, None));
        assert_eq!(key(&core, spec, "tolerations"), (None, None));
        let apps = openapi_v3("apps", "v1").expect("apps v1");
        assert_eq!(
            key(&apps, "io.k8s.api.core.v1.PodSpec", "containers"),
            merge("name")
        );
    }

    #[test]
    fn paths_name_collections_objects_and_status() {
        let t = parse_target(&["api", "v1", "namespaces", "x", "pods", "p", "status"]).unwrap();
        assert!(
            matches!(t, Target::Object(r, ns, name, Sub::Status) if r.plural == "pods" && ns == "x" && name == "p")
        );
        let t = parse_target(&[
            "apis",
            "apps",
            "v1",
            "namespaces",
            "x",
            "deployments",
            "d",
            "scale",
        ])
        .unwrap();
        assert!(matches!(t, Target::Object(r, _, _, Sub::Scale) if r.kind == "Deployment"));
        assert!(parse_target(&["api", "v1", "namespaces", "x", "services", "s", "scale"]).is_err());
        let t = parse_target(&["api", "v1", "namespaces", "x"]).unwrap();
        assert!(
            matches!(t, Target::Object(r, _, name, Sub::Main) if r.plural == "namespaces" && name == "x")
        );
        let t = parse_target(&["api", "v1", "namespaces", "x", "status"]).unwrap();
        assert!(matches!(t, Target::Object(r, _, _, Sub::Status) if r.plural == "namespaces"));
        let t = parse_target(&["apis", "networking.k8s.io", "v1", "networkpolicies"]).unwrap();
        assert!(matches!(t, Target::Collection(r, None) if r.kind == "NetworkPolicy"));
        assert!(parse_target(&["api", "v1", "widgets"]).is_err());
        assert!(
            parse_target(&["api", "v1", "pods", "p"]).is_err(),
            "pods are namespaced"
        );
    }

    #[test]
    fn durations_read_as_go_writes_them_and_long_requests_are_told_apart() {
        let d = |t: &str| parse_duration(t);
        assert_eq!(d("32s"), Some(Duration::from_secs(32)));
        assert_eq!(d("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(d("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(d("90"), Some(Duration::from_secs(90)));
        for bad in ["", "s", "5x", "-1s", "1s2"] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>()
        };
        let pods = ["api", "v1", "namespaces", "d", "pods"];
        assert!(long_running(&Method::GET, &pods, &q(&[("watch", "true")])));
        assert!(!long_running(&Method::GET, &pods, &q(&[])));
        let log = ["api", "v1", "namespaces", "d", "pods", "p", "log"];
        assert!(long_running(&Method::GET, &log, &q(&[("follow", "true")])));
        assert!(!long_running(&Method::GET, &log, &q(&[])));
        let exec = ["api", "v1", "namespaces", "d", "pods", "p", "exec"];
        assert!(long_running(&Method::POST, &exec, &q(&[])));
        assert!(!long_running(&Method::POST, &pods, &q(&[])));
    }
}
