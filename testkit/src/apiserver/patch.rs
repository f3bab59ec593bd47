//! Patch semantics: JSON merge patch (RFC 7386), strategic merge patch for the built-in
//! kinds, and server-side apply with per-manager field ownership.
//!
//! Strategic merge needs to know which lists merge by key; for built-in kinds that comes
//! from Go struct tags, summarised in [`builtin_list_strategy`] for the fields this project
//! touches. Server-side apply uses the same table for built-ins and the CRD schema's
//! `x-kubernetes-list-type`/`x-kubernetes-list-map-keys` for custom resources.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// How a list field merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListStrategy {
    /// Replaced as a whole.
    Atomic,
    /// Items are objects identified by these keys.
    Map(Vec<String>),
    /// Items are scalars, merged as a set.
    Set,
}

/// Strategic-merge and apply list semantics of the built-in fields this project touches,
/// by dotted path with list indices removed (e.g. `spec.containers.env`).
pub fn builtin_list_strategy(path: &str) -> ListStrategy {
    let key = |k: &str| ListStrategy::Map(vec![k.to_owned()]);
    match path {
        "metadata.finalizers" => ListStrategy::Set,
        "metadata.ownerReferences" => key("uid"),
        "spec.containers" | "spec.initContainers" | "spec.ephemeralContainers" | "spec.volumes" => {
            key("name")
        }
        "spec.template.spec.containers"
        | "spec.template.spec.initContainers"
        | "spec.template.spec.volumes" => key("name"),
        p if p.ends_with("containers.env") || p.ends_with("Containers.env") => key("name"),
        p if p.ends_with("containers.ports") || p.ends_with("Containers.ports") => {
            key("containerPort")
        }
        p if p.ends_with("volumeMounts") => key("mountPath"),
        "status.conditions" => key("type"),
        "status.addresses" => key("type"),
        "status.containerStatuses" | "status.initContainerStatuses" => key("name"),
        _ => ListStrategy::Atomic,
    }
}

/// RFC 7386: objects merge recursively, `null` deletes, everything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch_map) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let target_map = target.as_object_mut().expect("made an object above");
            for (k, v) in patch_map {
                if v.is_null() {
                    target_map.remove(k);
                } else {
                    merge_patch(target_map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn item_matches(item: &Value, probe: &Value, keys: &[String]) -> bool {
    keys.iter().all(|k| item.get(k) == probe.get(k))
}

/// Strategic merge patch for built-in kinds, with the directives clients send:
/// `$patch: delete|replace|merge`, `$deleteFromPrimitiveList/<field>`,
/// `$setElementOrder/<field>` (accepted, order not enforced) and `$retainKeys`.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = patch.clone();
        replacement
            .as_object_mut()
            .expect("object")
            .remove("$patch");
        *target = replacement;
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(retain) = patch_map.get("$retainKeys").and_then(Value::as_array) {
        let keep: BTreeSet<&str> = retain.iter().filter_map(Value::as_str).collect();
        target
            .as_object_mut()
            .expect("object")
            .retain(|k, _| keep.contains(k.as_str()));
    }
    for (k, v) in patch_map {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        let target_map = target.as_object_mut().expect("object");
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(remove)) =
                (target_map.get_mut(field), v.as_array())
            {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        if v.is_null() {
            target_map.remove(k);
            continue;
        }
        let field_path = child_path(path, k);
        match (v, builtin_list_strategy(&field_path)) {
            (Value::Array(items), ListStrategy::Map(keys)) => {
                let existing = target_map
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(vec![]));
                if !existing.is_array() {
                    *existing = Value::Array(vec![]);
                }
                let list = existing.as_array_mut().expect("array");
                if items
                    .iter()
                    .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
                {
                    *list = items
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .cloned()
                        .collect();
                    continue;
                }
                for item in items {
                    let directive = item.get("$patch").and_then(Value::as_str);
                    let position = list.iter().position(|e| item_matches(e, item, &keys));
                    match (directive, position) {
                        (Some("delete"), Some(i)) => {
                            list.remove(i);
                        }
                        (Some("delete"), None) => {}
                        (_, Some(i)) => strategic_merge_patch(&mut list[i], item, &field_path)?,
                        (_, None) => {
                            let mut fresh = Value::Object(Map::new());
                            strategic_merge_patch(&mut fresh, item, &field_path)?;
                            list.push(fresh);
                        }
                    }
                }
            }
            (Value::Array(items), ListStrategy::Set) => {
                let existing = target_map
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(vec![]));
                let list = existing.as_array_mut().ok_or("expected a list")?;
                for item in items {
                    if !list.contains(item) {
                        list.push(item.clone());
                    }
                }
            }
            (Value::Object(_), _) => {
                let child = target_map.entry(k.clone()).or_insert(Value::Null);
                strategic_merge_patch(child, v, &field_path)?;
            }
            (other, _) => {
                target_map.insert(k.clone(), other.clone());
            }
        }
    }
    Ok(())
}

/// Where server-side apply looks up list semantics.
pub trait ListSemantics {
    fn list_strategy(&self, path: &str) -> ListStrategy;
}

/// Built-in kinds: the Go struct tags' table.
pub struct BuiltinLists;

impl ListSemantics for BuiltinLists {
    fn list_strategy(&self, path: &str) -> ListStrategy {
        builtin_list_strategy(path)
    }
}

/// Custom resources: the CRD schema's list extensions.
pub struct SchemaLists<'a>(pub &'a Value);

impl ListSemantics for SchemaLists<'_> {
    fn list_strategy(&self, path: &str) -> ListStrategy {
        if path == "metadata.finalizers" {
            return ListStrategy::Set;
        }
        let parts: Vec<&str> = path.split('.').collect();
        let mut node = self.0;
        for (i, part) in parts.iter().enumerate() {
            let next = node
                .get("properties")
                .and_then(|p| p.get(*part))
                .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()));
            let Some(next) = next else {
                return ListStrategy::Atomic;
            };
            node = next;
            // Intermediate lists: descend into their item schema.
            if i + 1 < parts.len() && node.get("type").and_then(Value::as_str) == Some("array") {
                node = node.get("items").unwrap_or(node);
            }
        }
        match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("map") => ListStrategy::Map(
                node.get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| {
                        k.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            Some("set") => ListStrategy::Set,
            _ => ListStrategy::Atomic,
        }
    }
}

/// The set of fields an applied configuration sets, as paths. Keyed list items appear as
/// `path[k=v]` so two managers can own different items of one list.
pub fn field_set(value: &Value, lists: &dyn ListSemantics) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    collect_fields(value, "", "", lists, &mut out);
    out
}

fn collect_fields(
    value: &Value,
    path: &str,
    schema_path: &str,
    lists: &dyn ListSemantics,
    out: &mut BTreeSet<String>,
) {
    match value {
        Value::Object(map) => {
            if map.is_empty() && !path.is_empty() {
                out.insert(path.to_owned());
            }
            for (k, v) in map {
                if path.is_empty() && (k == "apiVersion" || k == "kind") {
                    continue;
                }
                if path == "metadata"
                    && !matches!(
                        k.as_str(),
                        "labels" | "annotations" | "finalizers" | "ownerReferences"
                    )
                {
                    continue;
                }
                collect_fields(
                    v,
                    &child_path(path, k),
                    &child_path(schema_path, k),
                    lists,
                    out,
                );
            }
        }
        Value::Array(items) => match lists.list_strategy(schema_path) {
            ListStrategy::Map(keys) => {
                for item in items {
                    let id: Vec<String> = keys
                        .iter()
                        .map(|k| {
                            format!(
                                "{k}={}",
                                item.get(k).map(Value::to_string).unwrap_or_default()
                            )
                        })
                        .collect();
                    let item_path = format!("{path}[{}]", id.join(","));
                    out.insert(item_path.clone());
                    collect_fields(item, &item_path, schema_path, lists, out);
                }
            }
            ListStrategy::Set => {
                for item in items {
                    out.insert(format!("{path}[{item}]"));
                }
            }
            ListStrategy::Atomic => {
                out.insert(path.to_owned());
            }
        },
        _ => {
            out.insert(path.to_owned());
        }
    }
}

/// Merges an applied configuration into `target` (apply's merge: objects recursively,
/// keyed lists by key, set lists by union, everything else replaced).
pub fn apply_merge(
    target: &mut Value,
    applied: &Value,
    schema_path: &str,
    lists: &dyn ListSemantics,
) {
    match applied {
        Value::Object(map) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let target_map = target.as_object_mut().expect("object");
            for (k, v) in map {
                let p = child_path(schema_path, k);
                match (v, lists.list_strategy(&p)) {
                    (Value::Array(items), ListStrategy::Map(keys)) => {
                        let list = target_map
                            .entry(k.clone())
                            .or_insert_with(|| Value::Array(vec![]));
                        if !list.is_array() {
                            *list = Value::Array(vec![]);
                        }
                        let list = list.as_array_mut().expect("array");
                        for item in items {
                            match list.iter().position(|e| item_matches(e, item, &keys)) {
                                Some(i) => apply_merge(&mut list[i], item, &p, lists),
                                None => list.push(item.clone()),
                            }
                        }
                    }
                    (Value::Array(items), ListStrategy::Set) => {
                        let list = target_map
                            .entry(k.clone())
                            .or_insert_with(|| Value::Array(vec![]));
                        if let Some(list) = list.as_array_mut() {
                            for item in items {
                                if !list.contains(item) {
                                    list.push(item.clone());
                                }
                            }
                        }
                    }
                    (Value::Object(_), _) => apply_merge(
                        target_map.entry(k.clone()).or_insert(Value::Null),
                        v,
                        &p,
                        lists,
                    ),
                    (other, _) => {
                        target_map.insert(k.clone(), other.clone());
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Removes one field path (as produced by [`field_set`]) from an object.
pub fn remove_field(target: &mut Value, path: &str) {
    let parts = split_path(path);
    remove_parts(target, &parts);
}

fn split_path(path: &str) -> Vec<String> {
    // "a.b[k=\"x\"].c" → ["a", "b", "[k=\"x\"]", "c"]; dots inside brackets are kept.
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut depth = 0;
    for c in path.chars() {
        match c {
            '[' if depth == 0 => {
                if !current.is_empty() {
                    parts.push(std::mem::take(&mut current));
                }
                depth += 1;
                current.push(c);
            }
            ']' if depth == 1 => {
                current.push(c);
                parts.push(std::mem::take(&mut current));
                depth -= 1;
            }
            '.' if depth == 0 => {
                if !current.is_empty() {
                    parts.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

/// Whether a list item is the one a path segment names: `k="v",k2=1` for keyed items (as
/// [`field_set`] writes them), or a set item's JSON text.
fn item_selected(item: &Value, selector: &str) -> bool {
    if selector.contains('=') && item.is_object() {
        selector.split(',').all(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            item.get(k).map(Value::to_string).unwrap_or_default() == v
        })
    } else {
        serde_json::to_string(item).is_ok_and(|text| text == selector)
    }
}

fn remove_parts(target: &mut Value, parts: &[String]) {
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    if let Some(selector) = first.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let Some(list) = target.as_array_mut() else {
            return;
        };
        let matches = |item: &Value| item_selected(item, selector);
        if rest.is_empty() {
            list.retain(|item| !matches(item));
        } else if let Some(item) = list.iter_mut().find(|i| matches(i)) {
            remove_parts(item, rest);
        }
        return;
    }
    let Some(map) = target.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        map.remove(first);
    } else if let Some(child) = map.get_mut(first) {
        remove_parts(child, rest);
        if rest.len() == 1 && child.as_object().is_some_and(Map::is_empty) {
            map.remove(first);
        }
    }
}

/// The value at a field path, for conflict detection.
pub fn field_value(target: &Value, path: &str) -> Option<Value> {
    let mut node = target;
    for part in split_path(path) {
        if let Some(selector) = part.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            let list = node.as_array()?;
            node = list.iter().find(|item| item_selected(item, selector))?;
        } else {
            node = node.get(&part)?;
        }
    }
    Some(node.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": null, "b": {"c": 5}, "l": [3]}));
        assert_eq!(doc, json!({"b": {"c": 5, "d": 3}, "l": [3]}));
    }

    #[test]
    fn strategic_merge_merges_conditions_by_type_and_replaces_taints() {
        let mut node = json!({
            "metadata": {"finalizers": ["a"]},
            "spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]},
            "status": {"conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "NetworkUnavailable", "status": "True"}
            ]}
        });
        strategic_merge_patch(
            &mut node,
            &json!({
                "metadata": {"finalizers": ["b"]},
                "spec": {"taints": [{"key": "y", "effect": "NoSchedule"}]},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}
            }),
            "",
        )
        .unwrap();
        assert_eq!(node["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            node["spec"]["taints"],
            json!([{"key": "y", "effect": "NoSchedule"}])
        );
        assert_eq!(
            node["status"]["conditions"],
            json!([
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True"}
            ])
        );
        strategic_merge_patch(
            &mut node,
            &json!({
                "status": {"conditions": [{"type": "NetworkUnavailable", "$patch": "delete"}]},
                "$deleteFromPrimitiveList/metadata": null,
                "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}
            }),
            "",
        )
        .unwrap();
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
        assert_eq!(node["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn apply_field_sets_key_list_items() {
        let status =
            json!({"status": {"standby": 3, "conditions": [{"type": "Ready", "status": "True"}]}});
        let fields = field_set(&status, &BuiltinLists);
        assert!(fields.contains("status.standby"));
        assert!(fields.contains("status.conditions[type=\"Ready\"].status"));
        let mut obj = json!({"status": {"standby": 3, "lastScaleUp": {"nodes": 1}, "conditions": [{"type": "Ready", "status": "True"}, {"type": "Degraded", "status": "True"}]}});
        remove_field(&mut obj, "status.lastScaleUp.nodes");
        remove_field(&mut obj, "status.conditions[type=\"Degraded\"]");
        assert_eq!(
            obj,
            json!({"status": {"standby": 3, "conditions": [{"type": "Ready", "status": "True"}]}})
        );
        assert_eq!(
            field_value(&obj, "status.conditions[type=\"Ready\"].status"),
            Some(json!("True"))
        );
    }
}
