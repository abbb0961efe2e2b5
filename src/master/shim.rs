//! Finding the preload shim (`librcluster_shim.so`) that unmodified servers are started with.

use std::path::PathBuf;

use log::warn;

/// File name of the preload shim, looked for next to the master's binary.
pub const SHIM_FILE: &str = "librcluster_shim.so";

/// The preload shim next to the master's binary (also where cargo puts it). Warns clearly when
/// it is missing.
pub fn find_shim() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Next to the binary (an install; `cargo build` copies the library up to target/<profile>/),
    // one level up, and in deps/: `cargo test` builds the library only there and never copies it
    // up, so on a fresh checkout `cargo test --workspace` has no other copy.
    let candidates = [
        dir.join(SHIM_FILE),
        dir.join("..").join(SHIM_FILE),
        dir.join("deps").join(SHIM_FILE),
    ];
    if let Some(found) = newest_file(&candidates) {
        return found.canonicalize().ok();
    }
    warn!(
        "preload shim {SHIM_FILE} not found next to {} : unmodified servers will not see \
         dispatched connections (build it with `cargo build --release -p rcluster-shim`, or \
         pass --no-preload for workers that speak LISTEN_FDS or the channel protocol)",
        exe.display()
    );
    None
}

/// The most recently modified of the existing regular files among `paths` (the first on a tie),
/// so a copy an earlier `cargo build` left next to the binary does not shadow the library a later
/// `cargo test` rebuilt in deps/.
fn newest_file(paths: &[PathBuf]) -> Option<&PathBuf> {
    let mut best: Option<(&PathBuf, std::time::SystemTime)> = None;
    for p in paths {
        let Ok(meta) = std::fs::metadata(p) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        if best.is_none_or(|(_, t)| mtime > t) {
            best = Some((p, mtime));
        }
    }
    best.map(|(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn newest_shim_copy_wins() {
        let dir = std::env::temp_dir().join(format!("rcluster-find-shim-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("deps")).unwrap();
        let (up, deps, missing) = (dir.join("a.so"), dir.join("deps/a.so"), dir.join("none.so"));
        std::fs::write(&up, b"old").unwrap();
        std::fs::write(&deps, b"new").unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&up)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let all = [up.clone(), missing.clone(), deps.clone()];
        assert_eq!(newest_file(&all), Some(&deps));
        assert_eq!(newest_file(&[missing.clone(), up.clone()]), Some(&up));
        assert_eq!(
            newest_file(&[missing, dir.join("deps")]),
            None,
            "directories are not files"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
