//! Server-side apply and field ownership (`metadata.managedFields`), as kube-apiserver keeps
//! them for the cases kubectl exercises.
//!
//! Every write through the API records which manager set which fields: an apply
//! (`PATCH` with `application/apply-patch+yaml`, `kubectl apply --server-side`) owns exactly the
//! fields of the configuration it sent; an update (`POST`, `PUT`, the other patch types) takes
//! the fields it changed from whoever owned them, under its `fieldManager` (or its User-Agent's
//! first word, as kube-apiserver names managers that give none). Fields are paths in the
//! FieldsV1 notation: `f:<name>` for a map key, `k:{"name":"c"}` for the element of a list merged
//! by key (containers, ports, env, volumes, ...; other lists are atomic), with `.` for the
//! element itself.
//!
//! An apply merges its configuration into the object (maps key by key, keyed lists element by
//! element), removes the fields it applied before and applies no longer when no other manager
//! owns them, and refuses with `409 Conflict` to change a field another manager owns to a
//! different value, unless forced (`force=true`, `--force-conflicts`), which takes the field
//! over.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::{patch, status::ApiError};

/// A set of field paths.
pub type Fields = BTreeSet<Vec<String>>;

/// What a write is, for the manager's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Server-side apply.
    Apply,
    /// Any other write.
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Apply => "Apply",
            Self::Update => "Update",
        }
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    fields: Fields,
}

/// Metadata the server sets: nobody owns it.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The manager of a write: `fieldManager`, else the User-Agent's first word.
pub fn manager(query: Option<&str>, user_agent: Option<&str>) -> String {
    match query.filter(|m| !m.is_empty()) {
        Some(m) => m.to_owned(),
        None => user_agent
            .and_then(|ua| ua.split('/').next())
            .filter(|m| !m.is_empty())
            .unwrap_or("unknown")
            .to_owned(),
    }
}

/// The fields `object` sets (status and server-set metadata left out).
pub fn fields_of(object: &Value) -> Fields {
    let mut out = Fields::new();
    if let Some(o) = object.as_object() {
        for (k, v) in o {
            match k.as_str() {
                "apiVersion" | "kind" | "status" => {}
                "metadata" => {
                    for (mk, mv) in v.as_object().into_iter().flatten() {
                        if !SERVER_METADATA.contains(&mk.as_str()) {
                            let mut path = vec!["f:metadata".to_owned(), format!("f:{mk}")];
                            walk(mv, mk, &mut path, &mut out);
                        }
                    }
                }
                _ => {
                    let mut path = vec![format!("f:{k}")];
                    walk(v, k, &mut path, &mut out);
                }
            }
        }
    }
    out
}

fn element_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let refs: Vec<&Value> = items.iter().collect();
    patch::merge_key(field, &refs)
}

fn key_segment(key: &str, item: &Value) -> String {
    format!(
        "k:{}",
        json!({key: item.get(key).cloned().unwrap_or(Value::Null)})
    )
}

fn walk(v: &Value, field: &str, path: &mut Vec<String>, out: &mut Fields) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                path.push(format!("f:{k}"));
                walk(c, k, path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() && element_key(field, items).is_some() => {
            let key = element_key(field, items).unwrap_or("name");
            for item in items {
                path.push(key_segment(key, item));
                path.push(".".to_owned());
                out.insert(path.clone());
                path.pop();
                walk(item, "", path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at a field path (`None` when absent).
fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut at = v;
    for seg in path {
        if seg == "." {
            continue;
        }
        if let Some(name) = seg.strip_prefix("f:") {
            at = at.get(name)?;
        } else if let Some(key) = seg.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(key).ok()?;
            at = at
                .as_array()?
                .iter()
                .find(|e| want.iter().all(|(k, v)| e.get(k) == Some(v)))?;
        } else {
            return None;
        }
    }
    Some(at)
}

/// Removes what a field path names (a list element for a path ending in `.`).
fn remove_at(v: &mut Value, path: &[String]) {
    let (path, element) = match path.split_last() {
        Some((last, rest)) if last == "." => (rest, true),
        _ => (path, false),
    };
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut at = v;
    for seg in parent_path {
        let next = if let Some(name) = seg.strip_prefix("f:") {
            at.get_mut(name)
        } else if let Some(key) = seg.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            at.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|e| want.iter().all(|(k, v)| e.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(n) => at = n,
            None => return,
        }
    }
    if let Some(name) = last.strip_prefix("f:") {
        if let Some(o) = at.as_object_mut() {
            o.remove(name);
        }
    } else if let (Some(key), true) = (last.strip_prefix("k:"), element) {
        let want: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
        if let Some(a) = at.as_array_mut() {
            a.retain(|e| !want.iter().all(|(k, v)| e.get(k) == Some(v)));
        }
    }
}

/// A field path as kubectl shows it: `.spec.containers[name="c"].image`.
fn display(path: &[String]) -> String {
    let mut s = String::new();
    for seg in path {
        if let Some(name) = seg.strip_prefix("f:") {
            s.push('.');
            s.push_str(name);
        } else if let Some(key) = seg.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            let inner: Vec<String> = want.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", inner.join(",")));
        }
    }
    s
}

fn to_v1(fields: &Fields) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut at = &mut root;
        for seg in path {
            at = at
                .entry(seg.clone())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("only objects are inserted");
        }
    }
    Value::Object(root)
}

fn from_v1(v: &Value, path: &mut Vec<String>, out: &mut Fields) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, c) in m {
                path.push(k.clone());
                from_v1(c, path, out);
                path.pop();
            }
        }
        _ if !path.is_empty() => {
            out.insert(path.clone());
        }
        _ => {}
    }
}

fn entries(object: &Value) -> Vec<Entry> {
    object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("subresource").is_none())
        .map(|e| {
            let mut fields = Fields::new();
            from_v1(&e["fieldsV1"], &mut Vec::new(), &mut fields);
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: s("time"),
                fields,
            }
        })
        .collect()
}

fn write_entries(object: &mut Value, list: Vec<Entry>) {
    let out: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            json!({"manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                   "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": to_v1(&e.fields)})
        })
        .collect();
    if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if out.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(out));
        }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Records an update by `manager` (a create when `old` is `None`): it owns the fields it
/// changed, which other managers lose; fields the update removed are nobody's.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, api_version: &str) {
    let mut list = old.map(entries).unwrap_or_default();
    let now_fields = fields_of(new);
    let changed: Fields = now_fields
        .iter()
        .filter(|p| old.is_none_or(|o| value_at(o, p) != value_at(new, p)))
        .cloned()
        .collect();
    for e in &mut list {
        e.fields
            .retain(|p| now_fields.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        match list
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == "Update")
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now();
            }
            None => list.push(Entry {
                manager: manager.to_owned(),
                operation: Operation::Update.as_str().into(),
                api_version: api_version.to_owned(),
                time: now(),
                fields: changed,
            }),
        }
    }
    write_entries(new, list);
}

/// The object a server-side apply of `config` by `manager` makes of `live` (`None`: the object
/// does not exist yet), with its `managedFields`; a `Conflict` error names the fields other
/// managers own with other values (unless `force`).
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    api_version: &str,
    force: bool,
) -> Result<Value, ApiError> {
    if !config.is_object() {
        return Err(ApiError::BadRequest(
            "the applied configuration is not an object".into(),
        ));
    }
    let applied = fields_of(config);
    let Some(live) = live else {
        let mut object = config.clone();
        write_entries(
            &mut object,
            vec![Entry {
                manager: manager.to_owned(),
                operation: Operation::Apply.as_str().into(),
                api_version: api_version.to_owned(),
                time: now(),
                fields: applied,
            }],
        );
        return Ok(object);
    };
    let mut list = entries(live);
    let mine = |e: &Entry| e.manager == manager && e.operation == "Apply";
    // Fields others own that this apply would change.
    let mut conflicts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in list.iter().filter(|e| !mine(e)) {
        for p in applied.intersection(&e.fields) {
            if p.last().is_some_and(|s| s == ".") {
                continue;
            }
            if value_at(live, p) != value_at(config, p) {
                conflicts
                    .entry(format!("{:?} using {}", e.manager, e.api_version))
                    .or_default()
                    .push(display(p));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let n: usize = conflicts.values().map(Vec::len).sum();
        let lines: Vec<String> = conflicts
            .iter()
            .flat_map(|(who, fields)| {
                fields
                    .iter()
                    .map(move |f| format!("conflict with {who}: {f}"))
            })
            .collect();
        return Err(ApiError::Conflict(format!(
            "Apply failed with {n} conflict{}: {}",
            if n == 1 { "" } else { "s" },
            lines.join("\n")
        )));
    }
    let previous: Fields = list
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: Fields = list
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut object = live.clone();
    // What this manager applied before and applies no longer goes, unless someone else owns it.
    for p in previous.difference(&applied) {
        if !others.contains(p) {
            remove_at(&mut object, p);
        }
    }
    patch::strategic(&mut object, config)?;
    if force {
        for e in list.iter_mut().filter(|e| !mine(e)) {
            e.fields
                .retain(|p| !applied.contains(p) || value_at(live, p) == value_at(config, p));
        }
    }
    list.retain(|e| !mine(e));
    list.push(Entry {
        manager: manager.to_owned(),
        operation: Operation::Apply.as_str().into(),
        api_version: api_version.to_owned(),
        time: now(),
        fields: applied,
    });
    write_entries(&mut object, list);
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                   {"name": "c", "image": image, "args": ["-a", "-b"]}]}}}})
    }

    #[test]
    fn fields_use_the_fieldsv1_notation() {
        let f = fields_of(&deployment(2, "i:1"));
        let has = |p: &[&str]| f.contains(&p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert!(has(&["f:metadata", "f:labels", "f:app"]));
        assert!(has(&["f:spec", "f:replicas"]));
        let c = r#"k:{"name":"c"}"#;
        assert!(has(&[
            "f:spec",
            "f:template",
            "f:spec",
            "f:containers",
            c,
            "."
        ]));
        assert!(has(&[
            "f:spec",
            "f:template",
            "f:spec",
            "f:containers",
            c,
            "f:image"
        ]));
        // Lists without a merge key are atomic.
        assert!(has(&[
            "f:spec",
            "f:template",
            "f:spec",
            "f:containers",
            c,
            "f:args"
        ]));
        assert!(
            !f.iter()
                .any(|p| p.contains(&"f:name".to_owned()) && p.len() == 2)
        );
        let mut again = Fields::new();
        from_v1(&to_v1(&f), &mut Vec::new(), &mut again);
        assert_eq!(again, f);
    }

    #[test]
    fn an_apply_owns_its_fields_and_conflicts_with_another_manager_unless_forced() {
        let first = apply(None, &deployment(2, "i:1"), "alice", "apps/v1", false).unwrap();
        // The same manager changes its own fields freely.
        let second = apply(
            Some(&first),
            &deployment(3, "i:1"),
            "alice",
            "apps/v1",
            false,
        )
        .unwrap();
        assert_eq!(second["spec"]["replicas"], 3);
        // Another manager applying another value is refused, naming the field.
        let err = apply(
            Some(&second),
            &deployment(5, "i:1"),
            "bob",
            "apps/v1",
            false,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("conflict with \"alice\" using apps/v1: .spec.replicas"),
            "{text}"
        );
        // The same value is shared, not a conflict.
        apply(
            Some(&second),
            &deployment(3, "i:1"),
            "bob",
            "apps/v1",
            false,
        )
        .unwrap();
        // Forced, bob takes replicas over.
        let forced = apply(Some(&second), &deployment(5, "i:1"), "bob", "apps/v1", true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 5);
        let owners = entries(&forced);
        let alice = owners.iter().find(|e| e.manager == "alice").unwrap();
        assert!(
            !alice
                .fields
                .contains(&vec!["f:spec".to_owned(), "f:replicas".to_owned()])
        );
    }

    #[test]
    fn fields_an_apply_drops_are_removed_unless_someone_else_owns_them() {
        let mut config = deployment(2, "i:1");
        config["metadata"]["labels"]["tier"] = json!("front");
        let first = apply(None, &config, "alice", "apps/v1", false).unwrap();
        let dropped = apply(
            Some(&first),
            &deployment(2, "i:1"),
            "alice",
            "apps/v1",
            false,
        )
        .unwrap();
        assert!(dropped["metadata"]["labels"].get("tier").is_none());
        assert_eq!(dropped["metadata"]["labels"]["app"], "web");
        // An update by another manager owns what it changed: an apply dropping it keeps it.
        let mut edited = first.clone();
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("i:2");
        edited["metadata"]["labels"]["tier"] = json!("back");
        record_update(Some(&first), &mut edited, "kubectl-edit", "apps/v1");
        let mut without = deployment(2, "i:1");
        without["spec"]["template"]["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("image");
        let kept = apply(Some(&edited), &without, "alice", "apps/v1", false).unwrap();
        assert_eq!(kept["metadata"]["labels"].get("tier"), Some(&json!("back")));
        assert_eq!(
            kept["spec"]["template"]["spec"]["containers"][0]["image"],
            "i:2"
        );
    }

    #[test]
    fn an_update_takes_the_fields_it_changed() {
        let mut created = deployment(2, "i:1");
        record_update(None, &mut created, "kubectl-create", "apps/v1");
        let mut scaled = created.clone();
        scaled["spec"]["replicas"] = json!(4);
        record_update(Some(&created), &mut scaled, "kubectl-scale", "apps/v1");
        let owners = entries(&scaled);
        let replicas = vec!["f:spec".to_owned(), "f:replicas".to_owned()];
        assert!(
            owners
                .iter()
                .any(|e| e.manager == "kubectl-scale" && e.fields.contains(&replicas))
        );
        assert!(
            !owners
                .iter()
                .any(|e| e.manager == "kubectl-create" && e.fields.contains(&replicas))
        );
        let err = apply(
            Some(&scaled),
            &deployment(2, "i:1"),
            "kubectl",
            "apps/v1",
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"kubectl-scale\""), "{err}");
    }
}
