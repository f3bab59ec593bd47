//! The API reference, rendered from the CRDs' own OpenAPI schemas (what the API server
//! enforces), so the docs cannot drift from the types: `docs/src/reference/api.md` is this
//! output, checked by `tests/docs.rs`.

use std::fmt::Write;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

/// Markdown for every kind: one table per kind's spec and status, a row per field.
pub fn markdown(crds: &[CustomResourceDefinition]) -> String {
    let mut out = String::from(
        "# API reference\n\n\
         Generated from the CRDs' OpenAPI schemas (`stratos crds`); do not edit by hand: \
         `STRATOS_UPDATE_DOCS=1 cargo test --test docs` rewrites this page.\n",
    );
    for crd in crds {
        let names = &crd.spec.names;
        for version in &crd.spec.versions {
            let Some(schema) = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| serde_json::to_value(s).ok())
            else {
                continue;
            };
            let _ = write!(
                out,
                "\n## {kind}\n\n`{group}/{version}`, {scope}-scoped; short names: {short}.\n",
                kind = names.kind,
                group = crd.spec.group,
                version = version.name,
                scope = crd.spec.scope.to_lowercase(),
                short = names
                    .short_names
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            if let Some(d) = schema.get("description").and_then(Value::as_str) {
                let _ = writeln!(out, "\n{}", one_line(d));
            }
            for part in ["spec", "status"] {
                let Some(sub) = schema.pointer(&format!("/properties/{part}")) else {
                    continue;
                };
                let _ = writeln!(
                    out,
                    "\n### {} `{part}`\n\n| field | type | required | default | constraints | description |\n|---|---|---|---|---|---|",
                    names.kind
                );
                let required = required_of(&schema);
                rows(&mut out, part, sub, required.contains(&part.to_owned()));
            }
            let rules = cel_rules(&schema);
            if !rules.is_empty() {
                let _ = writeln!(out, "\nValidation rules (CEL) checked at admission:\n");
                for (path, message) in rules {
                    let _ = writeln!(out, "- `{path}`: {}", one_line(&message));
                }
            }
        }
    }
    out
}

fn required_of(schema: &Value) -> Vec<String> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn rows(out: &mut String, path: &str, schema: &Value, required: bool) {
    let type_ = type_of(schema);
    let default = schema
        .get("default")
        .map(|d| format!("`{d}`"))
        .unwrap_or_default();
    let description = schema
        .get("description")
        .and_then(Value::as_str)
        .map(one_line)
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "| `{path}` | {type_} | {} | {default} | {} | {} |",
        if required { "yes" } else { "" },
        constraints(schema),
        description.replace('|', "\\|")
    );
    let fields = schema.get("properties").and_then(Value::as_object);
    let items = schema.get("items");
    if let Some(fields) = fields {
        let required = required_of(schema);
        for (name, sub) in fields {
            rows(out, &format!("{path}.{name}"), sub, required.contains(name));
        }
    } else if let Some(items) = items
        && let Some(fields) = items.get("properties").and_then(Value::as_object)
    {
        let required = required_of(items);
        for (name, sub) in fields {
            rows(
                out,
                &format!("{path}[].{name}"),
                sub,
                required.contains(name),
            );
        }
    }
}

fn type_of(schema: &Value) -> String {
    let base = schema.get("type").and_then(Value::as_str).unwrap_or("");
    match base {
        "array" => {
            let item = schema.get("items").map(type_of).unwrap_or_default();
            format!("[{item}]")
        }
        "object" if schema.get("additionalProperties").is_some() => {
            let value = schema
                .get("additionalProperties")
                .map(type_of)
                .unwrap_or_default();
            format!("map[string]{value}")
        }
        "" if schema.get("x-kubernetes-int-or-string").is_some() => "int or string".into(),
        other => other.into(),
    }
}

fn constraints(schema: &Value) -> String {
    let mut c = Vec::new();
    let mut push = |label: &str, key: &str| {
        if let Some(v) = schema.get(key) {
            // Whole numbers as such: kube's schema types carry every bound as a float.
            let v = match v.as_f64() {
                Some(f) if f.fract() == 0.0 => format!("{}", f as i64),
                _ => v.to_string(),
            };
            c.push(format!("{label} {v}"));
        }
    };
    push("≥", "minimum");
    push("≤", "maximum");
    push("length ≥", "minLength");
    push("length ≤", "maxLength");
    push("items ≥", "minItems");
    push("items ≤", "maxItems");
    push("entries ≤", "maxProperties");
    if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
        c.push(format!("pattern `{}`", p.replace('|', "\\|")));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        let values: Vec<String> = e
            .iter()
            .filter_map(Value::as_str)
            .map(|v| format!("`{v}`"))
            .collect();
        c.push(format!("one of {}", values.join(", ")));
    }
    c.join("; ")
}

/// Every `x-kubernetes-validations` rule's message, with the path it sits on.
fn cel_rules(schema: &Value) -> Vec<(String, String)> {
    fn walk(path: &str, s: &Value, out: &mut Vec<(String, String)>) {
        if let Some(rules) = s.get("x-kubernetes-validations").and_then(Value::as_array) {
            for r in rules {
                let message = r
                    .get("message")
                    .and_then(Value::as_str)
                    .or_else(|| r.get("rule").and_then(Value::as_str))
                    .unwrap_or_default();
                out.push((path.to_owned(), message.to_owned()));
            }
        }
        if let Some(fields) = s.get("properties").and_then(Value::as_object) {
            for (name, sub) in fields {
                let p = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                walk(&p, sub, out);
            }
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, out);
        }
    }
    let mut out = Vec::new();
    walk("", schema, &mut out);
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_field_has_a_row() {
        let md = markdown(&crate::api::crds());
        for field in [
            "`spec.poolSize`",
            "`spec.minStandby`",
            "`spec.template.nodeClassRef.name`",
            "`spec.preWarm.timeoutAction`",
            "`spec.scaleDown.emptyNodeTTL`",
            "`spec.blockDeviceMappings[].volumeType`",
            "`spec.metadataOptions.httpTokens`",
        ] {
            assert!(md.contains(field), "{field} missing");
        }
        assert!(md.contains("minStandby must be less than or equal to poolSize"));
    }
}
