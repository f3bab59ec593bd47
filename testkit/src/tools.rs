//! External tools the tests drive (kubectl, helm), found through `STRATOS_KUBECTL` /
//! `STRATOS_HELM`, then `$HOME/.cache/stratos/tools/bin` where `.ci/run` installs them.
//! Missing tools skip a test locally and fail it under CI.

use std::path::PathBuf;

fn find(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home)
        .join(".cache/stratos/tools/bin")
        .join(name);
    p.is_file().then_some(p)
}

fn required(env: &str, name: &str) -> Option<PathBuf> {
    let found = find(env, name);
    if found.is_none() {
        let msg = format!("{name} not found: run `.ci/run` once, or set {env}");
        if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
            panic!("{msg}");
        }
        eprintln!("skipping: {msg}");
    }
    found
}

pub fn kubectl() -> Option<PathBuf> {
    required("STRATOS_KUBECTL", "kubectl")
}

pub fn helm() -> Option<PathBuf> {
    required("STRATOS_HELM", "helm")
}
