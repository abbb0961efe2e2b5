//! The preload shim the master injects into unmodified servers (`LD_PRELOAD`): the copy
//! embedded in this binary at build time (see `build.rs`), written once to a private,
//! content-addressed file, or a packager's file given with `--shim PATH` / `RCLUSTER_SHIM`.
//!
//! `ld.so` loads whatever file is at the path it is given, so the path is only used when no
//! other user can change what it names: the file and every directory above it must belong to
//! this user or root and be writable by no one else (a world-writable directory above is
//! accepted only with the sticky bit, like `/tmp`, and never as the file's own directory). The
//! path must also contain no space or colon, on which `LD_PRELOAD` splits (ld.so(8)).
//!
//! Called once, from [`crate::cli::Args::into_config`], on the main thread; owns no fds.

use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// The shim built with this binary (empty when it was built without one, see `build.rs`).
pub const EMBEDDED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/librcluster_shim.so"));
/// SHA-256 of [`EMBEDDED`], hex (empty when nothing is embedded).
const EMBEDDED_SHA256: &str = env!("RCLUSTER_SHIM_SHA256");
/// Environment override of `--shim`.
pub const SHIM_ENV: &str = "RCLUSTER_SHIM";

/// The shim file for `LD_PRELOAD`: `explicit` (`--shim`), else `$RCLUSTER_SHIM`, else the
/// embedded copy materialised in a private directory. The error is one line saying what to do.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let from_env = std::env::var_os(SHIM_ENV).filter(|v| !v.is_empty());
    let given = explicit
        .map(|p| (p.to_path_buf(), "--shim"))
        .or_else(|| from_env.map(|v| (PathBuf::from(v), SHIM_ENV)));
    if let Some((path, what)) = given {
        return check_given(&path).map_err(|e| format!("{what} {}: {e}", path.display()));
    }
    if EMBEDDED.is_empty() {
        return Err(
            "this rcluster-lb was built without the preload shim: pass --shim \
                    PATH/librcluster_shim.so (or set RCLUSTER_SHIM), or --no-preload for \
                    servers that read LISTEN_FDS or speak the channel protocol"
                .into(),
        );
    }
    let euid = sys::geteuid();
    let mut reasons = Vec::new();
    for dir in candidate_dirs(euid) {
        match materialise(&dir, EMBEDDED, EMBEDDED_SHA256, euid) {
            Ok(path) => return Ok(path),
            Err(e) => reasons.push(format!("{}: {e}", dir.display())),
        }
    }
    Err(format!(
        "no private place to write the preload shim ({}); pass --shim PATH or --no-preload",
        reasons.join("; ")
    ))
}

/// Where the embedded shim may be written, best first: root's `/run/rcluster-lb`, then the
/// user's runtime directory, cache directory, and a per-user directory under the temp dir.
fn candidate_dirs(euid: libc::uid_t) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if euid == 0 {
        dirs.push(PathBuf::from("/run/rcluster-lb"));
    }
    let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(run) = abs(std::env::var_os("XDG_RUNTIME_DIR")) {
        dirs.push(run.join("rcluster-lb"));
    }
    if let Some(cache) = abs(std::env::var_os("XDG_CACHE_HOME"))
        .or_else(|| abs(std::env::var_os("HOME")).map(|h| h.join(".cache")))
    {
        dirs.push(cache.join("rcluster-lb"));
    }
    dirs.push(std::env::temp_dir().join(format!("rcluster-lb-{euid}")));
    dirs
}

/// Writes `bytes` as `dir/librcluster_shim-<hash>.so` (or reuses an identical file there) after
/// checking that no other user can change `dir`, and returns the path.
fn materialise(dir: &Path, bytes: &[u8], sha256: &str, euid: libc::uid_t) -> io::Result<PathBuf> {
    // Root's directory must be readable by workers that run as another user (--user); a
    // user's own may be private.
    let mode = if euid == 0 { 0o755 } else { 0o700 };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    let dir = dir.canonicalize()?;
    check_dir_chain(&dir, euid, true).map_err(io::Error::other)?;
    // An existing directory keeps its mode (an earlier version made root's 0700): open it up
    // for reading, or workers running as another user cannot load the file.
    if fs::metadata(&dir)?.mode() & mode != mode {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
    }
    let name = format!("librcluster_shim-{}.so", sha256.get(..16).unwrap_or(sha256));
    let path = dir.join(&name);
    check_preload_path(&path).map_err(io::Error::other)?;
    let same =
        fs::read(&path).is_ok_and(|existing| existing == bytes) && check_file(&path, euid).is_ok();
    if !same {
        // Written under a temporary name and renamed, so a master starting at the same time
        // never preloads a half-written file.
        let tmp = dir.join(format!(".{name}.{}.tmp", sys::getpid()));
        let _ = fs::remove_file(&tmp);
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    check_file(&path, euid).map_err(io::Error::other)?;
    Ok(path)
}

/// A packager's shim: the file it names (symlinks resolved) must pass the same checks as ours.
fn check_given(path: &Path) -> Result<PathBuf, String> {
    let real = path.canonicalize().map_err(|e| e.to_string())?;
    let euid = sys::geteuid();
    check_file(&real, euid)?;
    check_dir_chain(real.parent().unwrap_or(Path::new("/")), euid, true)?;
    check_preload_path(&real)?;
    Ok(real)
}

/// `LD_PRELOAD` separates entries with spaces and colons: a path containing one would be split.
fn check_preload_path(path: &Path) -> Result<(), String> {
    let bytes = path.as_os_str().as_bytes();
    if bytes
        .iter()
        .any(|b| matches!(b, b' ' | b':' | b'\t' | b'\n'))
    {
        return Err(format!(
            "{} contains a space or colon, which LD_PRELOAD cannot carry",
            path.display()
        ));
    }
    Ok(())
}

fn trusted_owner(uid: libc::uid_t, euid: libc::uid_t) -> bool {
    uid == euid || uid == 0
}

/// A regular file (not a symlink) owned by us or root and writable by no one else.
fn check_file(path: &Path, euid: libc::uid_t) -> Result<(), String> {
    let meta = fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if !trusted_owner(meta.uid(), euid) {
        return Err(format!(
            "owned by uid {}, not by this user ({euid}) or root: refusing to preload it",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:o}): refusing to preload it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// `dir` and every directory above it belong to us or root; none is writable by others,
/// except sticky ones above the first (`innermost` = `dir` itself is checked strictly).
fn check_dir_chain(dir: &Path, euid: libc::uid_t, innermost: bool) -> Result<(), String> {
    let mut strict = innermost;
    for d in dir.ancestors() {
        let meta = fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if !trusted_owner(meta.uid(), euid) {
            return Err(format!(
                "directory {} is owned by uid {}, not by this user ({euid}) or root",
                d.display(),
                meta.uid()
            ));
        }
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.mode() & 0o022 != 0 && (strict || !sticky) {
            return Err(format!(
                "directory {} is writable by group or others (mode {:o})",
                d.display(),
                meta.mode() & 0o7777
            ));
        }
        strict = false;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rcluster-shim-{name}-{}", sys::getpid()));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        dir
    }

    #[test]
    fn the_binary_embeds_a_shim() {
        assert!(EMBEDDED.starts_with(b"\x7fELF"), "an ELF shared object");
        assert_eq!(EMBEDDED_SHA256.len(), 64);
    }

    #[test]
    fn materialises_once_and_repairs_a_changed_copy() {
        let dir = scratch("mat");
        let euid = sys::geteuid();
        let a = materialise(&dir.join("sub"), b"shim", "abcdef0123456789ff", euid).unwrap();
        assert!(a.ends_with("librcluster_shim-abcdef0123456789.so"));
        assert_eq!(fs::read(&a).unwrap(), b"shim");
        fs::write(&a, b"tampered").unwrap();
        let b = materialise(&dir.join("sub"), b"shim", "abcdef0123456789ff", euid).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            fs::read(&b).unwrap(),
            b"shim",
            "a changed copy is rewritten"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Root's directory is read by workers running as another user: one left private (mode
    /// 0700, as a control socket directory once was) is opened up to 0755 before use.
    #[test]
    fn roots_directory_is_readable_by_all() {
        let dir = scratch("open");
        let sub = dir.join("run");
        fs::DirBuilder::new().mode(0o700).create(&sub).unwrap();
        let path = materialise(&sub, b"shim", "00", 0);
        if sys::geteuid() == 0 {
            path.unwrap();
            let mode = fs::metadata(&sub).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o755, "{mode:o}");
        } else {
            eprintln!("note: not root; root's directory mode is not checked");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_writable_files_and_directories_and_odd_paths() {
        let dir = scratch("refuse");
        let euid = sys::geteuid();
        let file = dir.join("lib.so");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(check_given(&file).unwrap(), file.canonicalize().unwrap());
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(check_given(&file).unwrap_err().contains("writable"));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        // A world-writable (even sticky) directory right above the file is refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_given(&file).unwrap_err().contains("directory"));
        assert!(materialise(&dir, b"x", "00", euid).is_err());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let spaced = dir.join("a b");
        fs::create_dir(&spaced).unwrap();
        let err = materialise(&spaced, b"x", "00", euid).unwrap_err();
        assert!(err.to_string().contains("space or colon"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_file_owned_by_another_user() {
        if sys::geteuid() != 0 {
            eprintln!("skipped: needs root to give a file to another uid");
            return;
        }
        let dir = scratch("owner");
        let file = dir.join("lib.so");
        fs::write(&file, b"x").unwrap();
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
        let err = check_given(&file).unwrap_err();
        assert!(err.contains("owned by uid 65534"), "{err}");
        // A directory owned by another user is refused too, even if the file is ours.
        std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = check_given(&file).unwrap_err();
        assert!(err.contains("owned by uid 65534"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
