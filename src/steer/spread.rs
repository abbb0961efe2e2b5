//! Plain `reuseport` mode's program (`bpf/spread.bpf.c`): the kernel's own hash spread, over
//! the worker slots in service rather than every socket of the group.
//!
//! A removed slot's listener (scale-down) stays in the kernel's group while the worker draining
//! on it keeps it open: its server's own copy, and the shim's. A server finishing a long
//! request, or one whose drain the shim holds, can keep it there for seconds, and without a
//! program about one new connection in N is hashed to it meanwhile and waits with nobody
//! accepting. The program selects only among the listeners the master has put at indexes
//! `0..n` of its socket array ([`Spread::serve`]), so a removed slot gets no new connection from
//! the moment the master takes it out. Attached as `SELECT_OR_MIGRATE` (5.14+), it also places
//! a closing listener's queue on one in service instead of the kernel resetting it.
//!
//! One program, socket array and count per listening address (a program's maps are fixed at
//! load). Loading needs CAP_BPF, as steering does; where it cannot load the supervisor falls back
//! to [`super::load_migrate_only`] and then to no program (`src/master/supervisor.rs`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::sys::bpf::{self, MapSpec, ProgLoadError, ProgSpec};
use rcluster_proto::steer as page;

use super::handoff::{self, HandoffError};
use super::{SteerError, classify, prog};
pub use rcluster_proto::env::RCLUSTER_SPREAD_FDS;

/// `spread_socks`: the listeners in service at indexes `0..n`.
const SOCKS_MAP: MapSpec<'static> = MapSpec {
    map_type: bpf::MAP_TYPE_REUSEPORT_SOCKARRAY,
    key_size: 4,
    value_size: 8,
    max_entries: page::MAX_SLOTS as u32,
    flags: 0,
    name: "spread_socks",
};

/// `spread_meta`: one `u32`, n.
const META_MAP: MapSpec<'static> = MapSpec {
    map_type: bpf::MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: 4,
    max_entries: 1,
    flags: 0,
    name: "spread_meta",
};

/// One listening address's program and maps.
#[derive(Debug)]
struct Group {
    socks: OwnedFd,
    meta: OwnedFd,
    prog: OwnedFd,
    /// How many indexes of `socks` the last [`Spread::serve`] filled.
    filled: usize,
}

impl Group {
    fn new(socks: OwnedFd, meta: OwnedFd, prog: OwnedFd) -> Group {
        Group {
            socks,
            meta,
            prog,
            filled: 0,
        }
    }
}

/// The loaded program of plain reuseport mode, one per listening address.
#[derive(Debug)]
pub struct Spread {
    groups: Vec<Group>,
    /// Attached as `SELECT_OR_MIGRATE` (5.14+): a closing listener's queue is re-placed.
    migrate: bool,
}

impl Spread {
    /// Creates the maps and loads one program per listening address, as `SELECT_OR_MIGRATE`
    /// where the kernel knows that attach type (5.14+), as `SELECT` before. Fails without
    /// CAP_BPF, under a seccomp profile that forbids `bpf(2)`, or before 4.19.
    pub fn load(listeners: usize) -> Result<Spread, SteerError> {
        let mut groups = Vec::with_capacity(listeners);
        let mut migrate = true;
        for _ in 0..listeners {
            let socks = bpf::map_create(&SOCKS_MAP).map_err(|e| classify("socket array", e))?;
            let meta = bpf::map_create(&META_MAP).map_err(|e| classify("spread count", e))?;
            let prog = loop {
                match load_prog(socks.as_fd(), meta.as_fd(), migrate)? {
                    Ok(p) => break p,
                    // Before 5.14 the attach type is unknown: place new connections only.
                    Err(e) if migrate && e.error.raw_os_error() == Some(libc::EINVAL) => {
                        migrate = false
                    }
                    Err(e) => return Err(SteerError::Prog(e)),
                }
            };
            groups.push(Group::new(socks, meta, prog));
        }
        Ok(Spread { groups, migrate })
    }

    /// The fds `steer-load` passes on in [`RCLUSTER_SPREAD_FDS`]: per listening address its
    /// count, socket array and program.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.groups
            .iter()
            .flat_map(|g| [g.meta.as_fd(), g.socks.as_fd(), g.prog.as_fd()])
            .collect()
    }

    /// Takes over what a privileged `steer-load` loaded ([`RCLUSTER_SPREAD_FDS`], `value`) for
    /// a master with `listeners` listening addresses: each map exactly what [`Spread::load`]
    /// creates, each program an `SK_REUSEPORT` program using its own two. Every fd taken over
    /// is marked close-on-exec; one that is not a BPF object is left alone.
    pub fn adopt(value: &std::ffi::OsStr, listeners: usize) -> Result<Spread, HandoffError> {
        let var = RCLUSTER_SPREAD_FDS;
        let (migrate, fds) = handoff::parse_fds(
            var,
            value,
            "a count, a socket array and a program per listening address",
        )?;
        if fds.len() != 3 * listeners {
            return Err(handoff::err_in(
                var,
                format!(
                    "{} fds given; expected a count, a socket array and a program for each of \
                     the master's {listeners} listening address{}",
                    fds.len(),
                    if listeners == 1 { "" } else { "es" }
                ),
            ));
        }
        let mut groups = Vec::with_capacity(listeners);
        for (i, triple) in fds.chunks(3).enumerate() {
            let meta = handoff::take(var, triple[0], bpf::ObjectKind::Map)?;
            let socks = handoff::take(var, triple[1], bpf::ObjectKind::Map)?;
            let prog = handoff::take(var, triple[2], bpf::ObjectKind::Prog)?;
            let meta_id =
                handoff::check_map(var, &meta, &META_MAP, &format!("listener {i}'s count"))?;
            let socks_id = handoff::check_map(
                var,
                &socks,
                &SOCKS_MAP,
                &format!("listener {i}'s socket array"),
            )?;
            handoff::check_prog(
                var,
                &prog,
                &format!("listener {i}'s program"),
                &prog::SPREAD,
                |name| {
                    Some(if name == META_MAP.name {
                        meta_id
                    } else {
                        socks_id
                    })
                },
            )?;
            groups.push(Group::new(socks, meta, prog));
        }
        Ok(Spread { groups, migrate })
    }

    /// Whether a closing listener's queue is re-placed (5.14+).
    pub fn migrates(&self) -> bool {
        self.migrate
    }

    /// The programs' runs and average ns per run, when `kernel.bpf_stats_enabled` is on (the
    /// kernel counts nothing otherwise).
    pub fn cost(&self) -> Option<(u64, u64)> {
        let (ns, runs) = super::run_stats_of(self.groups.iter().map(|g| g.prog.as_fd()));
        ns.checked_div(runs).map(|per_run| (runs, per_run))
    }

    /// Attaches listener `listener`'s program to the reuseport group `socket` belongs to.
    pub fn attach(&self, listener: usize, socket: BorrowedFd<'_>) -> io::Result<()> {
        bpf::attach_reuseport_ebpf(socket, self.group(listener)?.prog.as_fd())
    }

    fn group(&self, listener: usize) -> io::Result<&Group> {
        self.groups.get(listener).ok_or_else(|| no_group(listener))
    }

    /// Makes `sockets` (listening, `SO_REUSEPORT`, all of listener `listener`'s group) the ones
    /// new connections are spread over, at indexes `0..len`. A socket can sit at one index of
    /// an array only (`EBUSY` otherwise): the indexes whose socket (by its cookie, what a
    /// lookup returns) is not the one wanted there are cleared first, then the sockets missing
    /// from their index written. The count goes first when it shrinks and last when it grows,
    /// so the program never draws an index past the sockets it is meant to reach. A connection
    /// arriving meanwhile may go to a socket of either set, or where an index is empty to the
    /// kernel's hash: nothing is refused.
    pub fn serve(&mut self, listener: usize, sockets: &[BorrowedFd<'_>]) -> io::Result<()> {
        let group = self
            .groups
            .get_mut(listener)
            .ok_or_else(|| no_group(listener))?;
        let n = sockets.len().min(page::MAX_SLOTS);
        let set_count = |n: usize| {
            bpf::map_update_elem(
                group.meta.as_fd(),
                &0u32.to_ne_bytes(),
                &(n as u32).to_ne_bytes(),
                bpf::ANY,
            )
        };
        if n < group.filled {
            set_count(n)?;
        }
        let wanted = sockets[..n]
            .iter()
            .map(|s| crate::sys::socket_cookie(*s))
            .collect::<io::Result<Vec<u64>>>()?;
        let at = |i: usize| {
            let mut cookie = [0u8; 8];
            bpf::map_lookup_elem(group.socks.as_fd(), &(i as u32).to_ne_bytes(), &mut cookie)
                .ok()
                .map(|()| u64::from_ne_bytes(cookie))
        };
        // Whether index i already holds the socket wanted there; any other is taken out.
        let placed: Vec<bool> = (0..group.filled.max(n))
            .map(|i| match at(i) {
                Some(c) if wanted.get(i) == Some(&c) => true,
                Some(_) => {
                    // ENOENT: the kernel dropped a socket that closed since the lookup.
                    let _ = bpf::map_delete_elem(group.socks.as_fd(), &(i as u32).to_ne_bytes());
                    false
                }
                None => false,
            })
            .collect();
        for (i, sock) in sockets[..n].iter().enumerate() {
            if !placed[i] {
                let fd = u64::from(sock.as_raw_fd() as u32).to_ne_bytes();
                bpf::map_update_elem(
                    group.socks.as_fd(),
                    &(i as u32).to_ne_bytes(),
                    &fd,
                    bpf::ANY,
                )?;
            }
        }
        set_count(n)?;
        group.filled = n;
        Ok(())
    }
}

fn no_group(listener: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("no spread program for listener {listener}"),
    )
}

/// Loads [`prog::SPREAD`] with its two maps patched in: `Err` when a map reference cannot be
/// patched, `Ok(Err)` when the kernel refuses the program.
fn load_prog(
    socks: BorrowedFd<'_>,
    meta: BorrowedFd<'_>,
    migrate: bool,
) -> Result<Result<OwnedFd, ProgLoadError>, SteerError> {
    let mut insns = prog::SPREAD.insns.to_vec();
    for &(index, name) in prog::SPREAD.map_relocs {
        let map = match name {
            "spread_socks" => socks,
            "spread_meta" => meta,
            _ => unreachable!("scripts/gen-bpf.sh emits only the program's maps"),
        };
        bpf::patch_map_fd(&mut insns, index, map).map_err(|e| SteerError::Setup {
            what: "bad map reference in the embedded program",
            error: e,
        })?;
    }
    Ok(bpf::prog_load(&ProgSpec {
        prog_type: bpf::PROG_TYPE_SK_REUSEPORT,
        attach_type: if migrate {
            bpf::SK_REUSEPORT_SELECT_OR_MIGRATE
        } else {
            bpf::SK_REUSEPORT_SELECT
        },
        insns: &insns,
        license: prog::LICENSE,
        name: "rcluster_spread",
        btf: None,
        func_info: &[],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::Socket;
    use std::net::{SocketAddr, TcpStream};

    /// `n` listeners of one new reuseport group on 127.0.0.1, with the program attached and
    /// serving them all; `None` (with a note) where it does not load.
    fn group(n: usize) -> Option<(Spread, Vec<Socket>, SocketAddr)> {
        let mut spread = match Spread::load(1) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("note: the spread program does not load here ({e}); skipping");
                return None;
            }
        };
        let first = crate::master::listener::bind_listener("127.0.0.1:0".parse().unwrap(), true)
            .expect("bind");
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let mut socks = vec![first];
        for _ in 1..n {
            socks.push(crate::master::listener::bind_listener(addr, true).expect("bind"));
        }
        spread.attach(0, socks[0].as_fd()).expect("attach");
        let fds: Vec<_> = socks.iter().map(|s| s.as_fd()).collect();
        spread.serve(0, &fds).expect("serve");
        Some((spread, socks, addr))
    }

    /// Opens `count` connections, then accepts from every listener until `expect` connections
    /// (opened here or queued before) have been taken or 5 s have passed; returns how many each
    /// listener gave.
    fn spread_of(socks: &[Socket], addr: SocketAddr, count: usize, expect: usize) -> Vec<usize> {
        let clients: Vec<_> = (0..count)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut got = vec![0; socks.len()];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.iter().sum::<usize>() < expect && std::time::Instant::now() < deadline {
            for (s, n) in socks.iter().zip(got.iter_mut()) {
                s.set_nonblocking(true).unwrap();
                *n += std::iter::from_fn(|| s.accept().ok()).count();
            }
        }
        drop(clients);
        got
    }

    #[test]
    fn connections_go_only_to_the_sockets_served() {
        let Some((mut spread, socks, addr)) = group(3) else {
            return;
        };
        let all = spread_of(&socks, addr, 60, 60);
        assert_eq!(all.iter().sum::<usize>(), 60);
        assert!(all.iter().all(|&c| c > 0), "{all:?}");
        // The last socket taken out: it stays in the group, but gets nothing.
        spread
            .serve(0, &[socks[0].as_fd(), socks[1].as_fd()])
            .expect("serve");
        let two = spread_of(&socks, addr, 60, 60);
        assert_eq!(two[2], 0, "{two:?}");
        assert_eq!(two[0] + two[1], 60, "{two:?}");
        assert!(two[0] > 0 && two[1] > 0, "{two:?}");
        // Put back.
        let fds: Vec<_> = socks.iter().map(|s| s.as_fd()).collect();
        spread.serve(0, &fds).expect("serve");
        assert!(spread_of(&socks, addr, 60, 60)[2] > 0);
        // A listener it has no program for is an error, not a panic.
        assert!(spread.serve(1, &fds).is_err());
        assert!(spread.attach(1, socks[0].as_fd()).is_err());
    }

    #[test]
    fn what_is_passed_in_must_be_three_fds_per_listener() {
        let e = Spread::adopt(std::ffi::OsStr::new("select:5,6,7,8"), 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("RCLUSTER_SPREAD_FDS: 4 fds given"), "{e}");
        let e = Spread::adopt(std::ffi::OsStr::new("7,8,9"), 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("RCLUSTER_SPREAD_FDS: "), "{e}");
    }

    /// Against the real kernel (skips with a note where it does not load): what
    /// [`Spread::load`] creates is adopted back and serves; a count where the socket array
    /// belongs is refused.
    #[test]
    fn loaded_objects_round_trip() {
        use std::os::fd::IntoRawFd;
        let loaded = match Spread::load(1) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("note: the spread program does not load here ({e}); skipping");
                return;
            }
        };
        // adopt owns the numbers it is given: hand it duplicates, given up here.
        let numbers = || -> Vec<i32> {
            loaded
                .fds()
                .into_iter()
                .map(|fd| fd.try_clone_to_owned().unwrap().into_raw_fd())
                .collect()
        };
        let attach = if loaded.migrates() {
            "select-or-migrate"
        } else {
            "select"
        };
        let n = numbers();
        let swapped = format!("{attach}:{},{},{}", n[1], n[0], n[2]);
        let e = Spread::adopt(std::ffi::OsStr::new(&swapped), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not listener 0's count (spread_meta)"), "{e}");
        // (All three were BPF objects: the refused adoption took them and closed them.)
        let n = numbers();
        let value = format!("{attach}:{},{},{}", n[0], n[1], n[2]);
        let mut adopted = Spread::adopt(std::ffi::OsStr::new(&value), 1).expect("adopted");
        assert_eq!(adopted.migrates(), loaded.migrates());
        let sock = crate::master::listener::bind_listener("127.0.0.1:0".parse().unwrap(), true)
            .expect("bind");
        adopted.attach(0, sock.as_fd()).expect("attach");
        adopted.serve(0, &[sock.as_fd()]).expect("serve");
    }

    #[test]
    fn a_closed_sockets_queue_moves_to_one_served() {
        let Some((mut spread, mut socks, addr)) = group(3) else {
            return;
        };
        if !spread.migrates() {
            eprintln!("note: no SELECT_OR_MIGRATE here (Linux before 5.14); skipping");
            return;
        }
        // Only socket 2 served: every connection queues there.
        spread.serve(0, &[socks[2].as_fd()]).expect("serve");
        let clients: Vec<_> = (0..20)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        // Served: 0 and 1. Closing 2 moves its queue to them, none reset.
        spread
            .serve(0, &[socks[0].as_fd(), socks[1].as_fd()])
            .expect("serve");
        drop(socks.pop());
        let got = spread_of(&socks, addr, 0, 20);
        assert_eq!(got.iter().sum::<usize>(), 20, "{got:?}");
        drop(clients);
    }
}
