//! Records the git revision for `stratos version`. Container builds without `.git` may pass
//! it in through `STRATOS_GIT_REVISION`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=STRATOS_GIT_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let revision = std::env::var("STRATOS_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=STRATOS_GIT_REVISION={revision}");
}
