//! `cargo xtask <task>`: multi-step chores that plain cargo cannot express.
//!
//! * `cargo xtask bindings [--release]` builds the ferry-ffi cdylib and
//!   generates the Kotlin, Swift and Python bindings into `bindings/`, laid
//!   out as packages (see `bindings/README.md`), with the host's shared
//!   library copied into the Python package.
//! * `cargo xtask bindings --check` generates into a scratch directory and
//!   fails when the committed generated sources differ (drift), writing
//!   nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Generated file (relative to the bindgen's per-language output) and where
/// it is committed (relative to `bindings/`).
const LAYOUT: &[(&str, &str, &str)] = &[
    ("python", "ferry.py", "python/ferry/ferry.py"),
    ("kotlin", "dev/ferry/sdk/ferry.kt", "kotlin/ferry/src/main/kotlin/dev/ferry/sdk/ferry.kt"),
    ("swift", "Ferry.swift", "swift/Sources/Ferry/Ferry.swift"),
    ("swift", "FerryFFI.h", "swift/Headers/FerryFFI.h"),
    // An xcframework's headers directory wants the module map under this name.
    ("swift", "FerryFFI.modulemap", "swift/Headers/module.modulemap"),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bindings") => {
            let mut release = false;
            let mut check = false;
            for a in &args[1..] {
                match a.as_str() {
                    "--release" => release = true,
                    "--check" => check = true,
                    other => bail!("unknown option {other}\n{USAGE}"),
                }
            }
            bindings(release, check)
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
    }
}

const USAGE: &str = "usage: cargo xtask bindings [--release] [--check]";

/// The workspace being worked on, asked from cargo at run time (a path
/// baked in at compile time would point at whichever checkout built this
/// binary first when several share a target directory).
fn workspace_root(cargo: &str) -> Result<PathBuf> {
    let out = Command::new(cargo)
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .output()
        .context("running cargo locate-project")?;
    if !out.status.success() {
        bail!("cargo locate-project failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let manifest = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    Ok(manifest.parent().context("the workspace manifest has a directory")?.to_path_buf())
}

/// `$CARGO_TARGET_DIR` (relative to the current directory, as cargo reads
/// it) or `<workspace>/target`.
fn target_dir(root: &Path) -> Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(d) => std::env::current_dir()?.join(d),
        None => root.join("target"),
    })
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn bindings(release: bool, check: bool) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = workspace_root(&cargo)?;
    let target = target_dir(&root)?;
    let started = std::time::Instant::now();

    let mut build = Command::new(&cargo);
    build.current_dir(&root).args(["build", "--package", "ferry-ffi", "--lib"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    // The generator only reads metadata from the library, so the dev
    // profile is enough for it (release would add minutes of build).
    run(Command::new(&cargo).current_dir(&root).args(["build", "--package", "xtask", "--bin", "uniffi-bindgen"]))?;

    let profile = if release { "release" } else { "debug" };
    let lib_name = format!("{}ferry_ffi{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let lib = target.join(profile).join(&lib_name);
    let bindgen = target.join("debug").join(format!("uniffi-bindgen{}", std::env::consts::EXE_SUFFIX));
    let scratch = target.join("ferry-bindings-gen");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    for lang in ["python", "kotlin", "swift"] {
        // --no-format: the output must not depend on which formatters
        // (ktlint, swiftformat) happen to be installed, or drift checks
        // would differ between machines.
        run(Command::new(&bindgen)
            .current_dir(&root)
            .args(["generate", "--library"])
            .arg(&lib)
            .args(["--language", lang, "--no-format", "--out-dir"])
            .arg(scratch.join(lang)))?;
    }

    let bindings = root.join("bindings");
    if check {
        let mut drift = Vec::new();
        for (lang, generated, committed) in LAYOUT {
            let fresh = std::fs::read(scratch.join(lang).join(generated))?;
            let old = std::fs::read(bindings.join(committed)).unwrap_or_default();
            if fresh != old {
                drift.push(*committed);
            }
        }
        if !drift.is_empty() {
            bail!(
                "generated bindings differ from the committed ones (run `cargo xtask bindings` and commit):\n  {}",
                drift.join("\n  ")
            );
        }
        println!("bindings: no drift in {} committed generated files", LAYOUT.len());
        return Ok(());
    }

    for (lang, generated, committed) in LAYOUT {
        let dest = bindings.join(committed);
        std::fs::create_dir_all(dest.parent().expect("a file path"))?;
        std::fs::copy(scratch.join(lang).join(generated), &dest)
            .with_context(|| format!("writing {}", dest.display()))?;
    }
    // The Python package loads the library from its own directory.
    let py_lib = bindings.join("python/ferry").join(&lib_name);
    std::fs::copy(&lib, &py_lib).with_context(|| format!("copying {}", lib.display()))?;
    println!(
        "bindings: {} files into {} and {} ({profile}) into the Python package in {:.1} s",
        LAYOUT.len(),
        bindings.display(),
        lib_name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
