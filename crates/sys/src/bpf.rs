//! `bpf(2)` without libbpf: creating maps, loading BTF and a program, attaching a
//! `BPF_PROG_TYPE_SK_REUSEPORT` program to a reuseport group, updating map elements, and
//! `mmap`ing a `BPF_F_MMAPABLE` array so the master and workers count on it with atomics.
//!
//! `union bpf_attr` is built as a zeroed 144-byte buffer written at the field offsets of
//! `linux/bpf.h` (checked against the header when this was written; the kernel accepts a
//! larger-than-known attr only if the extra bytes are zero, and zero means "absent" for every
//! field not set here). Every fd comes back as an `OwnedFd`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_PERCPU_ARRAY`: one value per CPU per key.
pub const MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`: index → listening socket, for `bpf_sk_select_reuseport`.
pub const MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
/// `BPF_F_MMAPABLE` (5.5+): an array whose values can be `mmap`ed.
pub const F_MMAPABLE: u32 = 1 << 10;
/// `BPF_PROG_TYPE_SK_REUSEPORT` (4.19+).
pub const PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// `BPF_SK_REUSEPORT_SELECT`: the program places new connections.
pub const SK_REUSEPORT_SELECT: u32 = 39;
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (5.14+): it also places the queue of a closed listener.
pub const SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;
/// `BPF_ANY` for map updates.
pub const ANY: u64 = 0;

const MAP_CREATE: libc::c_int = 0;
const MAP_LOOKUP_ELEM: libc::c_int = 1;
const MAP_UPDATE_ELEM: libc::c_int = 2;
const MAP_DELETE_ELEM: libc::c_int = 3;
const PROG_LOAD: libc::c_int = 5;
const OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BTF_LOAD: libc::c_int = 18;
/// `BPF_PSEUDO_MAP_FD`: the `src_reg` of a 64-bit immediate load whose `imm` is a map fd.
const PSEUDO_MAP_FD: u8 = 1;
/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;
/// `SO_DETACH_REUSEPORT_BPF` (5.3+).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;
/// Size of `union bpf_attr` this code fills (the kernel's is 144 bytes in 6.x headers).
const ATTR_SIZE: usize = 144;
/// Verifier log buffer on a failed load (one retry with the log on).
const LOG_SIZE: usize = 256 * 1024;

/// A zeroed `union bpf_attr`, written field by field at the header's offsets.
#[repr(C, align(8))]
struct Attr([u8; ATTR_SIZE]);

impl Attr {
    fn new() -> Attr {
        Attr([0; ATTR_SIZE])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn ptr<T>(&mut self, off: usize, p: *const T) -> &mut Attr {
        self.u64(off, p as usize as u64)
    }
}

/// `bpf(cmd, attr, size)`. Every pointer written into `attr` points to memory that outlives the
/// call (the callers keep it borrowed across it).
fn bpf(cmd: libc::c_int, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised buffer of ATTR_SIZE bytes; the pointers inside it
    // were taken from slices the callers hold across this call, with the lengths given beside
    // them; the kernel reads and writes only within those lengths.
    let res = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr().cast::<libc::c_void>(),
            ATTR_SIZE as libc::c_uint,
        )
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(res)
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: a bpf(2) command that creates an object returns a new fd (close-on-exec, bpf(2)
    // "BPF_MAP_CREATE ... The close-on-exec file descriptor flag is automatically enabled")
    // that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }
}

/// What `BPF_MAP_CREATE` needs for the maps this project uses.
#[derive(Debug, Clone, Copy)]
pub struct MapSpec<'a> {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Number of elements.
    pub max_entries: u32,
    /// `BPF_F_*`.
    pub flags: u32,
    /// Shown by bpftool (at most 15 bytes are kept).
    pub name: &'a str,
}

/// `BPF_MAP_CREATE`.
pub fn map_create(spec: &MapSpec<'_>) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, spec.map_type)
        .u32(4, spec.key_size)
        .u32(8, spec.value_size)
        .u32(12, spec.max_entries)
        .u32(16, spec.flags);
    let name = spec.name.as_bytes();
    let n = name.len().min(15);
    attr.0[28..28 + n].copy_from_slice(&name[..n]);
    bpf(MAP_CREATE, &mut attr).map(owned)
}

/// `BPF_MAP_UPDATE_ELEM` with `flags` (`ANY`). `key` and `value` must be the map's sizes.
pub fn map_update_elem(
    map: BorrowedFd<'_>,
    key: &[u8],
    value: &[u8],
    flags: u64,
) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .ptr(8, key.as_ptr())
        .ptr(16, value.as_ptr())
        .u64(24, flags);
    bpf(MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_LOOKUP_ELEM` into `value` (the map's value size).
pub fn map_lookup_elem(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .ptr(8, key.as_ptr())
        .ptr(16, value.as_mut_ptr());
    bpf(MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_DELETE_ELEM` (a `REUSEPORT_SOCKARRAY` entry; array maps cannot delete).
pub fn map_delete_elem(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32).ptr(8, key.as_ptr());
    bpf(MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// `BPF_BTF_LOAD` of a raw BTF blob (header, types, strings).
pub fn btf_load(btf: &[u8]) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.ptr(0, btf.as_ptr()).u32(16, btf.len() as u32);
    bpf(BTF_LOAD, &mut attr).map(owned)
}

/// What `BPF_PROG_LOAD` needs for an `SK_REUSEPORT` program with a callback.
#[derive(Debug)]
pub struct ProgSpec<'a> {
    /// `BPF_PROG_TYPE_*`.
    pub prog_type: u32,
    /// `expected_attach_type`.
    pub attach_type: u32,
    /// The instructions, map references already patched ([`patch_map_fd`]).
    pub insns: &'a [u64],
    /// License string (GPL-compatible for GPL-only helpers).
    pub license: &'a str,
    /// Shown by bpftool (at most 15 bytes are kept).
    pub name: &'a str,
    /// BTF the func_info refers to.
    pub btf: Option<BorrowedFd<'a>>,
    /// `struct bpf_func_info { insn_off, type_id }` records.
    pub func_info: &'a [[u32; 2]],
}

/// A failed `BPF_PROG_LOAD`: the error and, when the verifier said why, its log.
#[derive(Debug)]
pub struct ProgLoadError {
    /// The errno.
    pub error: io::Error,
    /// The verifier's log (empty when the kernel refused before verifying).
    pub log: String,
}

impl std::fmt::Display for ProgLoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        // The last lines say why; the whole log can be tens of kilobytes.
        let tail: Vec<&str> = self.log.lines().rev().take(4).collect();
        if !tail.is_empty() {
            write!(f, " (verifier: ")?;
            for (i, line) in tail.iter().rev().enumerate() {
                write!(f, "{}{line}", if i > 0 { " | " } else { "" })?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProgLoadError {}

/// Patches the 64-bit immediate load at `insns[index]` (two slots) to load `map`'s fd.
pub fn patch_map_fd(insns: &mut [u64], index: usize, map: BorrowedFd<'_>) -> io::Result<()> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a 64-bit immediate load");
    let insn = insns.get(index).copied().ok_or_else(bad)?;
    if insn & 0xff != 0x18 || index + 1 >= insns.len() {
        return Err(bad());
    }
    let regs = ((insn >> 8) & 0x0f) | (u64::from(PSEUDO_MAP_FD) << 4);
    let fd = map.as_raw_fd() as u32;
    insns[index] = (insn & 0xffff) & !0xff00 | (regs << 8) | (u64::from(fd) << 32);
    insns[index + 1] &= 0x0000_0000_ffff_ffff;
    Ok(())
}

/// `BPF_PROG_LOAD`. On failure it loads once more with the verifier log on, so the error says
/// why.
pub fn prog_load(spec: &ProgSpec<'_>) -> Result<OwnedFd, ProgLoadError> {
    let license = std::ffi::CString::new(spec.license).map_err(|_| ProgLoadError {
        error: io::Error::new(io::ErrorKind::InvalidInput, "license contains a NUL byte"),
        log: String::new(),
    })?;
    let attempt = |log: Option<&mut [u8]>| {
        let mut attr = Attr::new();
        attr.u32(0, spec.prog_type)
            .u32(4, spec.insns.len() as u32)
            .ptr(8, spec.insns.as_ptr())
            .ptr(16, license.as_ptr())
            .u32(68, spec.attach_type);
        let name = spec.name.as_bytes();
        let n = name.len().min(15);
        attr.0[48..48 + n].copy_from_slice(&name[..n]);
        if let Some(btf) = spec.btf {
            attr.u32(72, btf.as_raw_fd() as u32)
                .u32(76, 8)
                .ptr(80, spec.func_info.as_ptr())
                .u32(88, spec.func_info.len() as u32);
        }
        if let Some(buf) = log {
            attr.u32(24, 1)
                .u32(28, buf.len() as u32)
                .ptr(32, buf.as_mut_ptr());
        }
        bpf(PROG_LOAD, &mut attr).map(owned)
    };
    match attempt(None) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            let mut buf = vec![0u8; LOG_SIZE];
            // The retry's own outcome is ignored: the first error is the one reported.
            if let Ok(fd) = attempt(Some(&mut buf)) {
                return Ok(fd);
            }
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            Err(ProgLoadError {
                error,
                log: String::from_utf8_lossy(&buf[..end]).trim_end().to_string(),
            })
        }
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (a `struct bpf_prog_info` or `bpf_map_info`, whose
/// pointer fields the caller has set to buffers that outlive the call). Needs no privilege on
/// an fd this process holds (Linux 6.5+ also where `kernel.unprivileged_bpf_disabled` is set).
fn obj_info(obj: BorrowedFd<'_>, info: &mut [u64]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, obj.as_raw_fd() as u32)
        .u32(4, std::mem::size_of_val(info) as u32)
        .ptr(8, info.as_mut_ptr());
    bpf(OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// The `u32` at byte `off` (4-aligned) of an info struct held as `u64` words.
fn u32_at(info: &[u64], off: usize) -> u32 {
    let word = info[off / 8].to_ne_bytes();
    let at = off % 8;
    u32::from_ne_bytes([word[at], word[at + 1], word[at + 2], word[at + 3]])
}

fn set_u32(info: &mut [u64], off: usize, v: u32) {
    let mut word = info[off / 8].to_ne_bytes();
    word[off % 8..off % 8 + 4].copy_from_slice(&v.to_ne_bytes());
    info[off / 8] = u64::from_ne_bytes(word);
}

/// Run statistics of a loaded program (`BPF_OBJ_GET_INFO_BY_FD`): total run time in ns and run
/// count, both zero unless `kernel.bpf_stats_enabled` was 1 while it ran.
pub fn prog_run_stats(prog: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // struct bpf_prog_info is 232 bytes in 6.x headers; run_time_ns at 192, run_cnt at 200.
    let mut info = [0u64; 29];
    obj_info(prog, &mut info)?;
    Ok((info[192 / 8], info[200 / 8]))
}

/// Instructions the verifier processed to accept a loaded program (`verified_insns` of
/// `struct bpf_prog_info`, at 216; Linux 5.16+, 0 on older kernels): how far it stayed from the
/// verifier's limit of a million.
pub fn prog_verified_insns(prog: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u64; 29];
    obj_info(prog, &mut info)?;
    Ok(u32_at(&info, 216))
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a map: the fields [`MapSpec`] set, and its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// The kernel's id of the map (what a program's `map_ids` list).
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Number of elements.
    pub max_entries: u32,
    /// `BPF_F_*`.
    pub flags: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` of a map (`EINVAL` for a program or any other fd).
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    // struct bpf_map_info: type 0, id 4, key_size 8, value_size 12, max_entries 16,
    // map_flags 20; 88 bytes in 6.x headers (a shorter buffer gets the first bytes).
    let mut info = [0u64; 11];
    obj_info(map, &mut info)?;
    Ok(MapInfo {
        map_type: u32_at(&info, 0),
        id: u32_at(&info, 4),
        key_size: u32_at(&info, 8),
        value_size: u32_at(&info, 12),
        max_entries: u32_at(&info, 16),
        flags: u32_at(&info, 20),
    })
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a program: its type and the maps it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgInfo {
    /// `BPF_PROG_TYPE_*`.
    pub prog_type: u32,
    /// The ids of the maps the program uses ([`MapInfo::id`]), in the kernel's order.
    pub map_ids: Vec<u32>,
}

/// `BPF_OBJ_GET_INFO_BY_FD` of a program (`EINVAL` for a map or any other fd).
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    // struct bpf_prog_info: type 0, nr_map_ids 52, map_ids (a pointer) 56.
    const MAX_MAPS: usize = 64;
    let mut ids = [0u32; MAX_MAPS];
    let mut info = [0u64; 29];
    set_u32(&mut info, 52, MAX_MAPS as u32);
    info[56 / 8] = ids.as_mut_ptr() as usize as u64;
    obj_info(prog, &mut info)?;
    let count = (u32_at(&info, 52) as usize).min(MAX_MAPS);
    Ok(ProgInfo {
        prog_type: u32_at(&info, 0),
        map_ids: ids[..count].to_vec(),
    })
}

/// A kind of BPF object an fd can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A map (`anon_inode:bpf-map`).
    Map,
    /// A program (`anon_inode:bpf-prog`).
    Prog,
}

impl ObjectKind {
    fn link(self) -> &'static str {
        match self {
            ObjectKind::Map => "anon_inode:bpf-map",
            ObjectKind::Prog => "anon_inode:bpf-prog",
        }
    }

    /// "BPF map" or "BPF program", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            ObjectKind::Map => "BPF map",
            ObjectKind::Prog => "BPF program",
        }
    }
}

/// What `/proc/self/fd/N` points to (`anon_inode:bpf-map`, `socket:[123]`, a path).
fn fd_target(fd: libc::c_int) -> io::Result<std::ffi::OsString> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).map(|p| p.into_os_string())
}

/// Takes ownership of the inherited fd number `fd` if it is a BPF object of `kind` (by
/// `/proc/self/fd/N`), marking it close-on-exec. Anything else is left as it is (not closed:
/// it is not this caller's), and the error says what it is.
pub fn adopt_inherited_object(fd: libc::c_int, kind: ObjectKind) -> io::Result<OwnedFd> {
    let target = fd_target(fd).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::ENOENT) => "not open".to_string(),
            _ => e.to_string(),
        };
        io::Error::new(e.kind(), format!("fd {fd}: {why}"))
    })?;
    if target != kind.link() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fd {fd} is not a {} ({})",
                kind.describe(),
                target.to_string_lossy()
            ),
        ));
    }
    super::adopt_inherited_fd(fd)
}

/// `setsockopt(SO_ATTACH_REUSEPORT_EBPF)`: `prog` places connections among the reuseport group
/// `socket` belongs to (any member attaches it for the whole group).
pub fn attach_reuseport_ebpf(socket: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    super::setsockopt_int(socket, SO_ATTACH_REUSEPORT_EBPF, prog.as_raw_fd())
}

/// `setsockopt(SO_DETACH_REUSEPORT_BPF)`: back to the kernel's hash.
pub fn detach_reuseport_bpf(socket: BorrowedFd<'_>) -> io::Result<()> {
    super::setsockopt_int(socket, SO_DETACH_REUSEPORT_BPF, 0)
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array's values (`mmap(2)` of the map fd),
/// unmapped on drop. Everyone who maps it — the master, each worker, and the program in the
/// kernel — sees the same memory, so it is read and written only through atomics.
#[derive(Debug)]
pub struct MapMmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that this type only exposes as atomics; it may be
// used and unmapped from any thread.
unsafe impl Send for MapMmap {}
// SAFETY: as above: every access goes through an atomic type.
unsafe impl Sync for MapMmap {}

impl MapMmap {
    /// Maps the first `len` bytes of `map`'s values read-write and shared.
    pub fn new(map: BorrowedFd<'_>, len: usize) -> io::Result<MapMmap> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL), of a borrowed, open fd; the
        // result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(MapMmap { ptr, len })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `mmap` refuses a zero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 8-aligned 64-bit word at byte `offset`, if inside the mapping.
    pub fn u64_at(&self, offset: usize) -> Option<&AtomicU64> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: offset is in bounds and 8-aligned (mmap returns a page-aligned address); the
        // memory lives as long as &self, and is only ever accessed atomically.
        Some(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast::<u64>()) })
    }

    /// The 4-aligned 32-bit word at byte `offset`, if inside the mapping.
    pub fn u32_at(&self, offset: usize) -> Option<&AtomicU32> {
        if !offset.is_multiple_of(4) || offset.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in bounds, 4-aligned, lives as long as &self, accessed atomically only.
        Some(unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(offset).cast::<u32>()) })
    }
}

impl Drop for MapMmap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned and nothing borrows the memory past
        // &self's lifetime.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), self.len);
        }
    }
}

/// Whether `fd` is a BPF map (`/proc/self/fd/N` reads `anon_inode:bpf-map`): a number taken
/// from the environment is checked before it is mapped writable.
pub fn is_bpf_map(fd: BorrowedFd<'_>) -> bool {
    fd_target(fd.as_raw_fd()).is_ok_and(|target| target == ObjectKind::Map.link())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn patches_a_map_load() {
        // r1 = 0 ll (two slots), then exit.
        let mut insns = [0x0000_0000_0000_0118u64, 0, 0x95];
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_fd().as_raw_fd() as u64;
        patch_map_fd(&mut insns, 0, file.as_fd()).unwrap();
        assert_eq!(insns[0] & 0xff, 0x18);
        assert_eq!((insns[0] >> 8) & 0x0f, 1, "dst register kept");
        assert_eq!((insns[0] >> 12) & 0x0f, u64::from(PSEUDO_MAP_FD));
        assert_eq!(insns[0] >> 32, fd);
        assert!(patch_map_fd(&mut insns, 2, file.as_fd()).is_err());
    }
}
