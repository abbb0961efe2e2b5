//! One-line diagnoses for a server that cannot work in the mode it was started in, so the
//! master says why instead of crash-looping silently.
//!
//! The typical case: the preload shim does not reach the server (a Go or statically linked
//! binary, a wrapper that forks the server such as `npm start`, or `--no-preload`), so the
//! server binds the master's port itself, fails with `EADDRINUSE` and exits before it ever
//! takes a connection from fd 3. The master cannot see the failed `bind`, but it sees the
//! pattern — a worker that exits before it became ready — and it can look at the command's
//! binary; [`early_exit_hint`] turns both into one line naming the likely cause and the fix.

use std::io::Read;
use std::path::Path;

use rcluster_proto::Mode;

/// What kind of executable a command is, as far as the preload shim is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// A dynamically linked ELF (or a script): the shim can reach it.
    Dynamic,
    /// A statically linked ELF: no dynamic loader, no `LD_PRELOAD`.
    Static,
    /// A Go program: the Go runtime makes system calls directly, with or without cgo.
    Go,
    /// Not readable or not ELF.
    Unknown,
}

/// Sections only the Go toolchain writes (build info, Go ≥ 1.13; build id).
const GO_SECTIONS: [&[u8]; 2] = [b".go.buildinfo", b".note.go.buildid"];
/// How much of a binary is read (its headers and section names lie within).
const SCAN_LIMIT: u64 = 256 << 20;
/// ELF program header type of the interpreter (dynamic loader) entry.
const PT_INTERP: u64 = 3;

/// Looks at the executable `path`: its ELF program headers (a dynamic loader?) and section
/// names (Go's?).
pub fn inspect(path: &Path) -> Binary {
    let Ok(file) = std::fs::File::open(path) else {
        return Binary::Unknown;
    };
    let mut data = Vec::new();
    if file.take(SCAN_LIMIT).read_to_end(&mut data).is_err() {
        return Binary::Unknown;
    }
    classify(&data)
}

fn classify(data: &[u8]) -> Binary {
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Binary::Unknown;
    }
    let little = data[5] == 1;
    let u16_at = |o: usize| -> Option<u64> {
        let b: [u8; 2] = data.get(o..o + 2)?.try_into().ok()?;
        Some(u64::from(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }))
    };
    let u32_at = |o: usize| -> Option<u64> {
        let b: [u8; 4] = data.get(o..o + 4)?.try_into().ok()?;
        Some(u64::from(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }))
    };
    let u64_at = |o: usize| -> Option<u64> {
        let b: [u8; 8] = data.get(o..o + 8)?.try_into().ok()?;
        Some(if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let elf64 = match data[4] {
        2 => true,
        1 => false,
        _ => return Binary::Unknown,
    };
    // Section headers: (e_shoff, e_shentsize, e_shnum, e_shstrndx); in each, sh_name and
    // (sh_offset, sh_size).
    let sections = if elf64 {
        u64_at(0x28)
            .zip(u16_at(0x3a))
            .zip(u16_at(0x3c).zip(u16_at(0x3e)))
    } else {
        u32_at(0x20)
            .zip(u16_at(0x2e))
            .zip(u16_at(0x30).zip(u16_at(0x32)))
    };
    let section = |i: u64| -> Option<(u64, u64, u64)> {
        let ((shoff, shentsize), _) = sections?;
        let at = usize::try_from(shoff + i * shentsize).ok()?;
        if elf64 {
            Some((u32_at(at)?, u64_at(at + 0x18)?, u64_at(at + 0x20)?))
        } else {
            Some((u32_at(at)?, u32_at(at + 0x10)?, u32_at(at + 0x14)?))
        }
    };
    if let Some((_, (shnum, shstrndx))) = sections
        && let Some((_, names_at, names_len)) = section(shstrndx)
        && let Some(names) = usize::try_from(names_at)
            .ok()
            .zip(usize::try_from(names_at + names_len).ok())
            .and_then(|(a, b)| data.get(a..b))
    {
        let is_go = (0..shnum).filter_map(section).any(|(name, _, _)| {
            let name = names.get(name as usize..).unwrap_or(&[]);
            let name = name.split(|&b| b == 0).next().unwrap_or(&[]);
            GO_SECTIONS.contains(&name)
        });
        if is_go {
            return Binary::Go;
        }
    }
    // Program headers: (e_phoff, e_phentsize, e_phnum).
    let header = if elf64 {
        u64_at(0x20).zip(u16_at(0x36)).zip(u16_at(0x38))
    } else {
        u32_at(0x1c).zip(u16_at(0x2a)).zip(u16_at(0x2c))
    };
    let Some(((phoff, phentsize), phnum)) = header else {
        return Binary::Unknown;
    };
    let interp = (0..phnum).any(|i| {
        usize::try_from(phoff + i * phentsize)
            .ok()
            .and_then(u32_at)
            .is_some_and(|t| t == PT_INTERP)
    });
    if interp {
        Binary::Dynamic
    } else {
        Binary::Static
    }
}

/// The one line to log when a worker of `program` exited before it became ready: what most
/// likely happened, given the mode, whether the shim was preloaded and what `program` is.
pub fn early_exit_hint(mode: Mode, preload: bool, binary: Binary, program: &str) -> String {
    let kind = match binary {
        Binary::Go => Some("a Go binary"),
        Binary::Static => Some("statically linked"),
        _ => None,
    };
    match (mode, preload, kind) {
        (Mode::Dispatch, false, _) => "with --no-preload fd 3 is a dispatch channel the server \
             must read itself (docs/PROTOCOL.md); a server that binds the port itself fails with \
             EADDRINUSE, one that adopts LISTEN_FDS needs --policy shared or reuseport"
            .to_string(),
        (_, _, Some(kind)) => format!(
            "{program} is {kind}, which the preload shim cannot reach: if it binds the port \
             itself it fails with EADDRINUSE; have it take fd 3 from LISTEN_FDS (--policy shared \
             or reuseport) or speak docs/PROTOCOL.md (workers/go does both for Go)"
        ),
        (Mode::Dispatch, true, None) => "it never took its dispatch channel (fd 3); if it \
             failed to bind the port (EADDRINUSE), the shim did not reach the server: start the \
             server itself, not a wrapper that forks it (npm start), or use --policy shared or \
             reuseport with LISTEN_FDS"
            .to_string(),
        (_, false, None) => "with --no-preload the server must take fd 3 from LISTEN_FDS; one \
             that binds the port itself fails with EADDRINUSE"
            .to_string(),
        (_, true, None) => "if it failed to bind the port (EADDRINUSE), the shim did not reach \
             the server: start the server itself, not a wrapper that forks it (npm start)"
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf64(interp: bool) -> Vec<u8> {
        let mut d = vec![0u8; 64 + 2 * 56];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2; // 64-bit
        d[5] = 1; // little-endian
        d[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        d[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let second: u32 = if interp { 3 } else { 1 };
        d[120..124].copy_from_slice(&second.to_le_bytes());
        d
    }

    /// Appends a section table of two sections (null, shstrtab) whose names are `name` and
    /// ".shstrtab".
    fn with_sections(mut d: Vec<u8>, name: &[u8]) -> Vec<u8> {
        let names_at = d.len() as u64;
        let mut names = vec![0u8];
        names.extend_from_slice(name);
        names.push(0);
        d.extend_from_slice(&names);
        let shoff = d.len() as u64;
        let mut sh = |name: u32, off: u64, size: u64| {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            d.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, names_at, names.len() as u64);
        d[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        d[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        d[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        d[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        d
    }

    #[test]
    fn classifies_elf_kinds() {
        assert_eq!(classify(&elf64(true)), Binary::Dynamic);
        assert_eq!(classify(&elf64(false)), Binary::Static);
        assert_eq!(
            classify(&with_sections(elf64(true), b".go.buildinfo")),
            Binary::Go
        );
        assert_eq!(
            classify(&with_sections(elf64(false), b".text")),
            Binary::Static
        );
        // A real Go binary, where the compatibility suite built one.
        let go = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/compat/go/hello");
        if go.exists() {
            assert_eq!(inspect(&go), Binary::Go);
        }
        assert_eq!(classify(b"#!/bin/sh\nexec server\n"), Binary::Unknown);
        assert_eq!(classify(&elf64(true)[..40]), Binary::Unknown);
        // The test binary itself is a dynamically linked executable.
        let me = std::env::current_exe().unwrap();
        assert_eq!(inspect(&me), Binary::Dynamic);
        assert_eq!(inspect(Path::new("/nonexistent")), Binary::Unknown);
    }

    #[test]
    fn hints_name_the_cause() {
        let h = early_exit_hint(Mode::Dispatch, false, Binary::Dynamic, "srv");
        assert!(
            h.contains("--no-preload") && h.contains("EADDRINUSE"),
            "{h}"
        );
        let h = early_exit_hint(Mode::Dispatch, true, Binary::Go, "srv");
        assert!(
            h.contains("srv is a Go binary") && h.contains("LISTEN_FDS"),
            "{h}"
        );
        let h = early_exit_hint(Mode::Shared, true, Binary::Static, "srv");
        assert!(h.contains("statically linked"), "{h}");
        let h = early_exit_hint(Mode::Dispatch, true, Binary::Dynamic, "srv");
        assert!(h.contains("npm start"), "{h}");
        for h in [
            early_exit_hint(Mode::Reuseport, false, Binary::Unknown, "x"),
            early_exit_hint(Mode::Shared, true, Binary::Unknown, "x"),
        ] {
            assert!(!h.contains('\n') && h.contains("EADDRINUSE"), "{h}");
        }
    }
}
