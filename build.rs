//! Embeds the preload shim in the master binary, so `cargo install --path .` (which installs
//! binaries only, never a cdylib) gives a tool that runs unmodified servers from any directory.
//!
//! The shim's cdylib is built by a nested `cargo build --release -p rcluster-shim` into its own
//! target directory under `OUT_DIR` (so it never waits on the outer build's lock), stripped, and
//! copied to `OUT_DIR/librcluster_shim.so`; `src/master/shim.rs` includes those bytes and the
//! SHA-256 this script computes (`RCLUSTER_SHIM_SHA256`), which names the file the master
//! materialises at start.
//!
//! Packagers may skip the nested build with `RCLUSTER_EMBED_SHIM=/path/to/librcluster_shim.so`
//! (embed that file) or `RCLUSTER_EMBED_SHIM=none` (embed nothing: the master then needs
//! `--shim PATH` or `RCLUSTER_SHIM` to run unmodified servers). Where the shim's sources are
//! absent (a crate unpacked from a registry without them), nothing is embedded, with a warning.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const SHIM_FILE: &str = "librcluster_shim.so";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dest = out.join(SHIM_FILE);
    println!("cargo:rerun-if-env-changed=RCLUSTER_EMBED_SHIM");

    let bytes: Vec<u8> = match env::var_os("RCLUSTER_EMBED_SHIM") {
        Some(v) if v == "none" => Vec::new(),
        Some(path) => {
            println!("cargo:rerun-if-changed={}", Path::new(&path).display());
            fs::read(&path).unwrap_or_else(|e| {
                panic!("RCLUSTER_EMBED_SHIM={}: {e}", Path::new(&path).display())
            })
        }
        None => {
            let shim_dir = manifest.join("shim");
            if shim_dir.join("Cargo.toml").is_file() {
                for watched in [
                    "shim/src",
                    "shim/Cargo.toml",
                    "crates/proto/src",
                    "Cargo.lock",
                ] {
                    println!("cargo:rerun-if-changed={watched}");
                }
                build_shim(&manifest, &out)
            } else {
                println!(
                    "cargo:warning=the preload shim's sources are not here: nothing embedded; \
                     the master will need --shim PATH to run unmodified servers"
                );
                Vec::new()
            }
        }
    };
    let hash = if bytes.is_empty() {
        String::new()
    } else {
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    fs::write(&dest, &bytes).expect("write the embedded shim to OUT_DIR");
    println!("cargo:rustc-env=RCLUSTER_SHIM_SHA256={hash}");
}

/// Builds the shim's cdylib, release and stripped, whatever profile the master is built with:
/// what the master embeds is what an installed user gets.
fn build_shim(manifest: &Path, out: &Path) -> Vec<u8> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let target_dir = out.join("shim-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(manifest)
        .args(["build", "--release", "--lib", "-p", "rcluster-shim"])
        .args(["--target", &target])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        // A lint or coverage wrapper of the outer build (cargo clippy sets one) has no business
        // in the library the master ships.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the preload shim: {e}"));
    assert!(
        status.success(),
        "building the preload shim (cargo build --release -p rcluster-shim) failed: {status}"
    );
    let built = target_dir.join(&target).join("release").join(SHIM_FILE);
    fs::read(&built).unwrap_or_else(|e| panic!("{}: {e}", built.display()))
}
