//! Admission of custom resources against a CRD, as kube-apiserver does it.
//!
//! Order and semantics follow the API server: absent fields are defaulted (recursively, so a
//! defaulted `{}` gets its own children's defaults); unknown fields are errors, as under
//! `kubectl apply`'s default strict field validation; the structural schema is checked
//! (types, enums, patterns, bounds, required, list-map keys); and, only when that passes,
//! the `x-kubernetes-validations` CEL rules are evaluated (through kube-cel, which
//! implements the Kubernetes CEL libraries). Messages mimic the API server's
//! `<path>: <reason>` form so tests can assert that a rejection names the field.
//!
//! Not modelled: `format` checks other than what patterns express, ratcheting on update,
//! CEL cost limits at admission (checked statically by tests instead), and
//! `x-kubernetes-embedded-resource`.

use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_cel::{RootContext, Validator};
use regex::Regex;
use serde_json::{Map, Value};

/// One rejected field, rendered like the API server's `field.Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The schema of one served version of a CRD, ready to admit objects.
pub struct CrdSchema {
    kind: String,
    api_version: String,
    group: String,
    schema: Value,
}

impl CrdSchema {
    /// Uses the storage version's `openAPIV3Schema`.
    pub fn from_crd(crd: &CustomResourceDefinition) -> Self {
        let version = crd
            .spec
            .versions
            .iter()
            .find(|v| v.storage)
            .expect("a CRD has a storage version");
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("a served version has a schema");
        Self {
            kind: crd.spec.names.kind.clone(),
            api_version: format!("{}/{}", crd.spec.group, version.name),
            group: crd.spec.group.clone(),
            schema: serde_json::to_value(schema).expect("schemas serialise"),
        }
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The raw `openAPIV3Schema`.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Defaults and validates `object` as a create would. Returns the stored form.
    pub fn admit(&self, object: &Value) -> Result<Value, Vec<FieldError>> {
        let mut object = object.clone();
        let mut errors = Vec::new();
        if object.get("apiVersion").and_then(Value::as_str) != Some(self.api_version.as_str()) {
            errors.push(FieldError {
                path: "apiVersion".into(),
                message: format!("Invalid value: must be {}", self.api_version),
            });
        }
        if object.get("kind").and_then(Value::as_str) != Some(self.kind.as_str()) {
            errors.push(FieldError {
                path: "kind".into(),
                message: format!("Invalid value: must be {}", self.kind),
            });
        }
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !is_dns_subdomain(name) {
            errors.push(FieldError {
                path: "metadata.name".into(),
                message: format!(
                    "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
                ),
            });
        }
        default_value(&self.schema, &mut object);
        check(&self.schema, &object, "", &mut errors);
        if errors.is_empty() {
            let root = RootContext {
                api_version: self.api_version.clone(),
                api_group: self.group.clone(),
                kind: self.kind.clone(),
            };
            if let Err(cel_errors) =
                Validator::new().validate_with_context(&self.schema, &object, None, Some(&root))
            {
                errors.extend(cel_errors.iter().map(|e| FieldError {
                    // A root rule's fieldPath comes back as ".spec.x"; the API server prints
                    // "spec.x", and "<nil>" for a root rule without one.
                    path: match e.field_path.trim_start_matches('.') {
                        "" => "<nil>".to_owned(),
                        p => p.to_owned(),
                    },
                    message: format!("Invalid value: {}", e.message),
                }));
            }
        }
        if errors.is_empty() {
            Ok(object)
        } else {
            Err(errors)
        }
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Applies `default`s to absent properties, then recurses into the result, like
/// apiextensions-apiserver's structural defaulting.
fn default_value(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, prop) in props {
                    if !map.contains_key(key)
                        && let Some(default) = prop.get("default")
                    {
                        map.insert(key.clone(), default.clone());
                    }
                }
                for (key, prop) in props {
                    if let Some(child) = map.get_mut(key) {
                        default_value(prop, child);
                    }
                }
            } else if let Some(additional) =
                schema.get("additionalProperties").filter(|a| a.is_object())
            {
                for child in map.values_mut() {
                    default_value(additional, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    default_value(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn short(value: &Value) -> String {
    match value {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn invalid(errors: &mut Vec<FieldError>, path: &str, value: &Value, reason: String) {
    errors.push(FieldError {
        path: path.to_owned(),
        message: format!("Invalid value: {}: {path} in body {reason}", short(value)),
    });
}

/// Structural validation of `value` at `path` against `schema`.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let nullable = schema
        .get("nullable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if value.is_null() {
        if !nullable && schema.get("type").is_some() {
            invalid(errors, path, value, "must not be null".into());
        }
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    if int_or_string {
        if !matches!(type_name(value), "integer" | "string") {
            invalid(errors, path, value, "must be an integer or a string".into());
            return;
        }
    } else if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let ok = actual == expected || (expected == "number" && actual == "integer");
        if !ok {
            invalid(
                errors,
                path,
                value,
                format!("must be of type {expected}: {:?}", actual),
            );
            return;
        }
    }

    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let supported = allowed
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        errors.push(FieldError {
            path: path.to_owned(),
            message: format!(
                "Unsupported value: {}: supported values: {supported}",
                short(value)
            ),
        });
    }

    match value {
        Value::Object(map) => check_object(schema, map, path, errors),
        Value::Array(items) => check_array(schema, items, path, errors),
        Value::String(s) => check_string(schema, s, value, path, errors),
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or_default();
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                let exclusive =
                    schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
                if v < min || (exclusive && v == min) {
                    let op = if exclusive {
                        "greater than"
                    } else {
                        "greater than or equal to"
                    };
                    invalid(errors, path, value, format!("should be {op} {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                let exclusive =
                    schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
                if v > max || (exclusive && v == max) {
                    let op = if exclusive {
                        "less than"
                    } else {
                        "less than or equal to"
                    };
                    invalid(errors, path, value, format!("should be {op} {max}"));
                }
            }
        }
        _ => {}
    }
}

fn check_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for key in required.iter().filter_map(Value::as_str) {
            if map.get(key).is_none_or(Value::is_null) {
                errors.push(FieldError {
                    path: join(path, key),
                    message: "Required value".into(),
                });
            }
        }
    }
    let count = map.len() as f64;
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_f64)
        && count > max
    {
        errors.push(FieldError {
            path: path.to_owned(),
            message: format!("Too many: {count}: must have at most {max} items"),
        });
    }
    if let Some(min) = schema.get("minProperties").and_then(Value::as_f64)
        && count < min
    {
        errors.push(FieldError {
            path: path.to_owned(),
            message: format!("Invalid value: {count}: must have at least {min} properties"),
        });
    }
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    // metadata is validated by the API server's ObjectMeta rules, not the CRD schema.
    let is_root = path.is_empty();
    for (key, child) in map {
        if is_root && (key == "metadata" || key == "apiVersion" || key == "kind") {
            continue;
        }
        let child_path = join(path, key);
        if let Some(prop) = props.and_then(|p| p.get(key)) {
            check(prop, child, &child_path, errors);
        } else if let Some(additional) = additional {
            check(additional, child, &child_path, errors);
        } else if !preserve {
            errors.push(FieldError {
                path: child_path.clone(),
                message: format!("unknown field \"{child_path}\""),
            });
        }
    }
}

fn check_array(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    let count = items.len() as f64;
    if let Some(max) = schema.get("maxItems").and_then(Value::as_f64)
        && count > max
    {
        errors.push(FieldError {
            path: path.to_owned(),
            message: format!("Too many: {count}: must have at most {max} items"),
        });
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_f64)
        && count < min
    {
        errors.push(FieldError {
            path: path.to_owned(),
            message: format!(
                "Invalid value: {count}: {path} in body should have at least {min} items"
            ),
        });
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            check(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<Option<&Value>> = keys.iter().map(|k| item.get(*k)).collect();
                if seen.contains(&key) {
                    errors.push(FieldError {
                        path: format!("{path}[{i}]"),
                        message: format!("Duplicate value: {}", short(item)),
                    });
                }
                seen.push(key);
            }
        }
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    errors.push(FieldError {
                        path: format!("{path}[{i}]"),
                        message: format!("Duplicate value: {}", short(item)),
                    });
                }
            }
        }
        _ => {}
    }
}

fn check_string(schema: &Value, s: &str, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let len = s.chars().count() as f64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_f64)
        && len > max
    {
        errors.push(FieldError {
            path: path.to_owned(),
            message: format!("Too long: may not be more than {max} bytes"),
        });
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_f64)
        && len < min
    {
        invalid(
            errors,
            path,
            value,
            format!("should be at least {min} chars long"),
        );
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match Regex::new(pattern) {
            Ok(re) if !re.is_match(s) => {
                invalid(errors, path, value, format!("should match '{pattern}'"));
            }
            Ok(_) => {}
            Err(e) => errors.push(FieldError {
                path: path.to_owned(),
                message: format!(
                    "Internal error: schema pattern {pattern:?} does not compile: {e}"
                ),
            }),
        }
    }
}
