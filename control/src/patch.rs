//! The patch types kubectl sends: JSON merge patch (RFC 7386), strategic merge patch (lists of
//! objects merged by their merge key, with the `$patch`, `$setElementOrder`, `$retainKeys` and
//! `$deleteFromPrimitiveList` directives that `kubectl apply` emits) and JSON patch (RFC 6902).

use serde_json::{Map, Value};

use crate::status::ApiError;

/// RFC 7386: objects merge, `null` deletes, everything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("just made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merge key of a list field, as the Kubernetes types declare it
/// (`patchMergeKey`), decided by the field name and what its elements carry.
pub(crate) fn merge_key(field: &str, elements: &[&Value]) -> Option<&'static str> {
    let candidates: &[&str] = match field {
        "ports" => &["containerPort", "port"],
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "volumeDevices" => &["name"],
        "volumeMounts" => &["mountPath"],
        "conditions" => &["type"],
        "addresses" => &["type"],
        "ownerReferences" => &["uid"],
        "hostAliases" => &["ip"],
        "topologySpreadConstraints" => &["topologyKey"],
        _ => return None,
    };
    candidates
        .iter()
        .copied()
        .find(|k| elements.iter().all(|e| e.get(*k).is_some()))
}

/// Strategic merge patch.
pub fn strategic(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = p.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return Ok(());
    }
    if p.get("$patch").and_then(Value::as_str) == Some("delete") {
        *target = Value::Null;
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("just made an object");
    let mut orders: Vec<(&str, &Vec<Value>)> = Vec::new();
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if let Some(order) = v.as_array() {
                orders.push((field, order));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(gone)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(Value::Array(current)), Value::Array(items)) => {
                let all: Vec<&Value> = current.iter().chain(items.iter()).collect();
                match merge_key(k, &all) {
                    Some(key) => merge_list(current, items, key)?,
                    None => *current = items.clone(),
                }
            }
            (Some(current), Value::Object(_)) if current.is_object() => strategic(current, v)?,
            _ => {
                let mut fresh = Value::Null;
                strategic(&mut fresh, v)?;
                t.insert(k.clone(), fresh);
            }
        }
    }
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (field, order) in orders {
        let Some(Value::Array(list)) = t.get_mut(field) else {
            continue;
        };
        let all: Vec<&Value> = list.iter().chain(order.iter()).collect();
        let Some(key) = merge_key(field, &all) else {
            continue;
        };
        let position = |e: &Value| {
            order
                .iter()
                .position(|o| o.get(key) == e.get(key))
                .unwrap_or(usize::MAX)
        };
        list.sort_by_key(position);
    }
    t.retain(|_, v| !v.is_null());
    Ok(())
}

fn merge_list(current: &mut Vec<Value>, items: &[Value], key: &str) -> Result<(), ApiError> {
    for item in items {
        let id = item.get(key);
        let at = current.iter().position(|c| c.get(key) == id);
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = at {
                current.remove(i);
            }
            continue;
        }
        match at {
            Some(i) => strategic(&mut current[i], item)?,
            None => {
                let mut fresh = Value::Null;
                strategic(&mut fresh, item)?;
                current.push(fresh);
            }
        }
    }
    Ok(())
}

fn pointer_parts(path: &str) -> Result<Vec<String>, ApiError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path.strip_prefix('/').ok_or_else(|| {
        ApiError::BadRequest(format!("json patch path {path:?} must start with /"))
    })?;
    Ok(rest
        .split('/')
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// RFC 6902 JSON patch: add, remove, replace, move, copy, test.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let ops = ops
        .as_array()
        .ok_or_else(|| bad("a json patch is a list of operations".into()))?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("operation without path".into()))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| bad(format!("{kind} {path}: no value")))
        };
        match kind {
            "add" => insert(target, path, value()?)?,
            "remove" => {
                remove(target, path)?;
            }
            "replace" => {
                remove(target, path)?;
                insert(target, path, value()?)?;
            }
            "move" | "copy" => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{kind} without from")))?;
                let v = if kind == "move" {
                    remove(target, from)?
                } else {
                    target
                        .pointer(from)
                        .cloned()
                        .ok_or_else(|| bad(format!("{from} does not exist")))?
                };
                insert(target, path, v)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value()?) {
                    return Err(ApiError::Invalid {
                        kind: String::new(),
                        name: String::new(),
                        message: format!("test of {path} failed"),
                    });
                }
            }
            other => return Err(bad(format!("unknown json patch operation {other:?}"))),
        }
    }
    Ok(())
}

fn parent<'a>(target: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), ApiError> {
    let mut parts = pointer_parts(path)?;
    let last = parts
        .pop()
        .ok_or_else(|| ApiError::BadRequest("cannot patch the whole object".into()))?;
    let mut at = target;
    for p in parts {
        at = match at {
            Value::Object(m) => m.get_mut(&p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| ApiError::BadRequest(format!("{path}: parent does not exist")))?;
    }
    Ok((at, last))
}

fn insert(target: &mut Value, path: &str, v: Value) -> Result<(), ApiError> {
    let (at, last) = parent(target, path)?;
    match at {
        Value::Object(m) => {
            m.insert(last, v);
        }
        Value::Array(a) if last == "-" => a.push(v),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| ApiError::BadRequest(format!("{path}: bad index")))?;
            if i > a.len() {
                return Err(ApiError::BadRequest(format!("{path}: index out of range")));
            }
            a.insert(i, v);
        }
        _ => {
            return Err(ApiError::BadRequest(format!(
                "{path}: parent is not a container"
            )));
        }
    }
    Ok(())
}

fn remove(target: &mut Value, path: &str) -> Result<Value, ApiError> {
    let (at, last) = parent(target, path)?;
    let gone = match at {
        Value::Object(m) => m.remove(&last),
        Value::Array(a) => last
            .parse::<usize>()
            .ok()
            .filter(|i| *i < a.len())
            .map(|i| a.remove(i)),
        _ => None,
    };
    gone.ok_or_else(|| ApiError::BadRequest(format!("{path} does not exist")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_deletes_with_null() {
        let mut v = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
        merge(
            &mut v,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"x": [3]}}),
        );
        assert_eq!(
            v,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [3]}})
        );
    }

    #[test]
    fn strategic_patch_merges_lists_by_key_like_kubectl_apply() {
        let mut svc = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443}], "selector": {"app": "a"}}});
        let patch = json!({"spec": {
            "$setElementOrder/ports": [{"port": 443}, {"port": 80}, {"port": 53}],
            "ports": [{"port": 80, "targetPort": 9090}, {"port": 53, "protocol": "UDP"}],
            "selector": {"app": "b"}}});
        strategic(&mut svc, &patch).unwrap();
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"port": 443}, {"port": 80, "targetPort": 9090}, {"port": 53, "protocol": "UDP"}])
        );
        strategic(
            &mut svc,
            &json!({"spec": {"ports": [{"$patch": "delete", "port": 443}]}}),
        )
        .unwrap();
        assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 2);
        strategic(
            &mut svc,
            &json!({"spec": {"selector": {"$patch": "replace", "tier": "x"}}}),
        )
        .unwrap();
        assert_eq!(svc["spec"]["selector"], json!({"tier": "x"}));
    }

    #[test]
    fn json_patch_operations() {
        let mut v = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2]});
        json_patch(
            &mut v,
            &json!([
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "replace", "path": "/list/0", "value": 9},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "remove", "path": "/metadata/labels/a"},
                {"op": "test", "path": "/list/1", "value": 2},
            ]),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"metadata": {"labels": {"b/c": "2"}}, "list": [9, 2, 3]})
        );
        assert!(json_patch(&mut v, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
