//! Records the git commit for `ferry_build_info` (and `ferry --version`):
//! `FERRY_GIT_COMMIT` when the builder sets it (a container build has no
//! `.git`), else `git rev-parse`, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=FERRY_GIT_COMMIT");
    let commit = std::env::var("FERRY_GIT_COMMIT").ok().filter(|s| !s.is_empty()).or_else(|| {
        // Rebuilt when HEAD moves: HEAD itself, and the branch it names.
        for f in ["HEAD", "packed-refs"] {
            if let Some(p) = git(&["rev-parse", "--git-path", f]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(p) = git(&["rev-parse", "--git-path", &r]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    println!("cargo:rustc-env=FERRY_GIT_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}
