//! The docs (`docs/`, an mdBook): the API reference is the CRDs' schema rendered, every link
//! between pages and to a heading resolves, every page is in the summary, and every alert of
//! the chart has the runbook section its `runbook_url` points to.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/src")
}

/// Every Markdown page under `docs/src`, by its path relative to it.
fn pages() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&docs(), &docs(), &mut out);
    out
}

/// mdBook's heading ids: lower-cased, spaces to dashes, other punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The ids of a page's headings (outside code blocks).
fn anchors(page: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#').replace('`', "").as_str()));
        }
    }
    out
}

/// `(target, line)` of every inline Markdown link outside code.
fn links(page: &str) -> Vec<(String, usize)> {
    let mut in_code = false;
    let mut out = Vec::new();
    for (n, line) in page.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Inline code spans may hold `](`; drop them first.
        let text: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((after[..end].to_owned(), n + 1));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn the_api_reference_is_the_crd_schema() {
    let generated = stratos::api::reference::markdown(&stratos::api::crds());
    let path = docs().join("reference/api.md");
    if std::env::var_os("STRATOS_UPDATE_DOCS").is_some() {
        fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/src/reference/api.md is stale: run STRATOS_UPDATE_DOCS=1 cargo test --test docs"
    );
}

#[test]
fn every_link_and_anchor_resolves() {
    let pages = pages();
    let mut broken = Vec::new();
    for (name, text) in &pages {
        let dir = Path::new(name).parent().unwrap_or(Path::new(""));
        for (target, line) in links(text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                name.clone()
            } else {
                // Normalise `a/../b` without touching the file system.
                let joined = dir.join(file).to_string_lossy().into_owned();
                let mut parts: Vec<&str> = Vec::new();
                for p in joined.split('/') {
                    match p {
                        ".." => {
                            parts.pop();
                        }
                        "." | "" => {}
                        p => parts.push(p),
                    }
                }
                parts.join("/")
            };
            let Some(target_page) = pages.get(&resolved) else {
                broken.push(format!("{name}:{line}: {target} (no page {resolved})"));
                continue;
            };
            if let Some(anchor) = anchor
                && !anchors(target_page).contains(anchor)
            {
                broken.push(format!("{name}:{line}: {target} (no heading #{anchor})"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_page_is_in_the_summary() {
    let pages = pages();
    let summary = &pages["SUMMARY.md"];
    let listed: BTreeSet<String> = links(summary).into_iter().map(|(t, _)| t).collect();
    let missing: Vec<&String> = pages
        .keys()
        .filter(|p| *p != "SUMMARY.md" && !listed.contains(*p))
        .collect();
    assert!(missing.is_empty(), "pages not in SUMMARY.md: {missing:?}");
}

#[test]
fn every_alert_has_its_runbook() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let rules =
        fs::read_to_string(repo.join("charts/stratos/templates/prometheusrule.yaml")).unwrap();
    let values = fs::read_to_string(repo.join("charts/stratos/values.yaml")).unwrap();
    assert!(
        values.contains(
            "runbookBaseUrl: https://github.com/stratos-sh/stratos/blob/main/docs/src/runbooks.md"
        ),
        "the default runbook base points at docs/src/runbooks.md"
    );
    let runbooks = anchors(&pages()["runbooks.md"]);
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 9, "alerts found: {alerts:?}");
    for alert in alerts {
        let anchor = alert.to_lowercase();
        assert!(
            rules.contains(&format!(
                "runbook_url: \"{{{{ .Values.metrics.prometheusRule.runbookBaseUrl }}}}#{anchor}\""
            )),
            "{alert} has no runbook_url to #{anchor}"
        );
        assert!(
            runbooks.contains(&anchor),
            "runbooks.md has no section {alert}"
        );
    }
}
