//! Kernel steering for a master without CAP_BPF. `rcluster-lb steer-load` ([`run`]), started
//! with CAP_BPF (or as root), loads the maps and programs exactly as the master would
//! ([`Objects::load`]), clears close-on-exec on their fds only, names them in
//! [`RCLUSTER_STEER_FDS`], drops every capability it holds and execs its command, typically
//! `setpriv --reuid=... rcluster-lb --steer kernel ...`. The master finds the variable and
//! [`adopt`]s the fds instead of loading: it checks each one with `BPF_OBJ_GET_INFO_BY_FD` and
//! marks it close-on-exec. Using the objects (attaching, map updates, mapping the table) needs
//! no privilege.
//!
//! The value is `ATTACH:SLOTS,META,SOCKS0,PROG0[,SOCKS1,PROG1…]`: `ATTACH` is
//! `select-or-migrate` (the programs also re-place a closed listener's queue, Linux 5.14+) or
//! `select`; then fd numbers: the slot table (`steer_slots`), the meta map (`steer_meta`), and
//! per listening address, in `--listen` order, its `REUSEPORT_SOCKARRAY` and its program.
//!
//! It loads plain `reuseport` mode's program too ([`Spread`], where it loads) and names its
//! objects in [`RCLUSTER_SPREAD_FDS`], `ATTACH:META0,SOCKS0,PROG0[,META1,…]`: per listening
//! address its count, its socket array and its program. A master run with `--policy
//! reuseport` adopts those ([`Spread::adopt`]) and the other set stays unused; a steering
//! master the other way round. Neither reaches a worker: the spawner marks every fd it does not
//! place close-on-exec, and both variables are the master's own.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use anyhow::Context;
use thiserror::Error;

use super::spread::{RCLUSTER_SPREAD_FDS, Spread};
use super::{Group, META_MAP, Objects, SLOTS_MAP, SOCKS_MAP, prog};
use crate::cli::UsageError;
use crate::sys::{self, bpf};
pub use rcluster_proto::env::RCLUSTER_STEER_FDS;

/// `ATTACH` when the programs also migrate a closed listener's queue.
const SELECT_OR_MIGRATE: &str = "select-or-migrate";
/// `ATTACH` when they place new connections only.
const SELECT: &str = "select";

/// Why the objects passed in cannot be used: one line naming the variable, the fd and the
/// problem.
#[derive(Debug, Error)]
#[error("{var}: {msg}")]
pub struct HandoffError {
    var: &'static str,
    msg: String,
}

/// An error about [`RCLUSTER_STEER_FDS`].
fn err(msg: impl Into<String>) -> HandoffError {
    err_in(RCLUSTER_STEER_FDS, msg)
}

/// An error about variable `var`.
pub(super) fn err_in(var: &'static str, msg: impl Into<String>) -> HandoffError {
    HandoffError {
        var,
        msg: msg.into(),
    }
}

/// The fds of `objects` in the variable's order: table, meta, then socket array and program
/// per listening address.
fn in_order(objects: &Objects) -> Vec<&OwnedFd> {
    let mut fds = vec![&objects.slots, &objects.meta];
    for g in &objects.groups {
        fds.extend([&g.socks, &g.prog]);
    }
    fds
}

/// The variable's value: the attach type, then the fd numbers in order (see the module docs).
fn env_value(migrate: bool, fds: &[i32]) -> String {
    let list: Vec<String> = fds.iter().map(i32::to_string).collect();
    let attach = if migrate { SELECT_OR_MIGRATE } else { SELECT };
    format!("{attach}:{}", list.join(","))
}

/// The parsed value: fd numbers, not yet checked.
#[derive(Debug, PartialEq, Eq)]
struct Passed {
    migrate: bool,
    slots: i32,
    meta: i32,
    /// Per listening address: (socket array, program).
    groups: Vec<(i32, i32)>,
}

fn parse(value: &OsStr) -> Result<Passed, HandoffError> {
    let (migrate, fds) = parse_fds(
        RCLUSTER_STEER_FDS,
        value,
        "the table, the meta map, then a socket array and a program per listening address",
    )?;
    if fds.len() < 4 || !fds.len().is_multiple_of(2) {
        return Err(err(format!(
            "{} fds given; expected the table, the meta map, then a socket array and a program \
             per listening address (an even number, at least 4)",
            fds.len()
        )));
    }
    Ok(Passed {
        migrate,
        slots: fds[0],
        meta: fds[1],
        groups: fds[2..].chunks(2).map(|p| (p[0], p[1])).collect(),
    })
}

/// `ATTACH:FD,FD,…` of variable `var` (`what` says what the fds are): whether the programs
/// were loaded as `SELECT_OR_MIGRATE`, and the fd numbers, each above standard error and given
/// once.
pub(super) fn parse_fds(
    var: &'static str,
    value: &OsStr,
    what: &str,
) -> Result<(bool, Vec<i32>), HandoffError> {
    let shape = || {
        err_in(
            var,
            format!("{value:?} is not {SELECT_OR_MIGRATE}:FD,FD,… or {SELECT}:FD,FD,… ({what})"),
        )
    };
    let text = value.to_str().ok_or_else(shape)?;
    let (attach, list) = text.split_once(':').ok_or_else(shape)?;
    let migrate = match attach {
        SELECT_OR_MIGRATE => true,
        SELECT => false,
        _ => return Err(shape()),
    };
    let mut fds: Vec<i32> = Vec::new();
    for token in list.split(',') {
        let fd: i32 = token
            .trim()
            .parse()
            .map_err(|_| err_in(var, format!("{token:?} is not an fd number")))?;
        if fd < 3 {
            return Err(err_in(
                var,
                format!("fd {fd} is standard input, output or error, not a BPF object"),
            ));
        }
        if fds.contains(&fd) {
            return Err(err_in(var, format!("fd {fd} is given twice")));
        }
        fds.push(fd);
    }
    Ok((migrate, fds))
}

/// Checks that map `fd` is what `spec` creates; returns its id.
pub(super) fn check_map(
    var: &'static str,
    fd: &OwnedFd,
    spec: &bpf::MapSpec<'_>,
    what: &str,
) -> Result<u32, HandoffError> {
    let raw = fd.as_raw_fd();
    let info = bpf::map_info(fd.as_fd()).map_err(|e| {
        err_in(
            var,
            format!("fd {raw} ({what}): cannot read its description: {e}"),
        )
    })?;
    let got = (
        info.map_type,
        info.key_size,
        info.value_size,
        info.max_entries,
        info.flags,
    );
    let want = (
        spec.map_type,
        spec.key_size,
        spec.value_size,
        spec.max_entries,
        spec.flags,
    );
    if got != want {
        let show = |(t, k, v, n, f): (u32, u32, u32, u32, u32)| {
            format!("type {t}, key {k}, value {v}, {n} entries, flags {f:#x}")
        };
        return Err(err_in(
            var,
            format!(
                "fd {raw} is not {what} ({}): {}; expected {}",
                spec.name,
                show(got),
                show(want)
            ),
        ));
    }
    Ok(info.id)
}

/// Checks that `fd` is an `SK_REUSEPORT` program (`what`) using exactly the maps `build`
/// refers to ([`super::Program::map_relocs`]): by name through `map_id`, the id of each map
/// passed with it, or `None` for one of the program's own that nobody passes (any map, one per
/// such name).
pub(super) fn check_prog(
    var: &'static str,
    fd: &OwnedFd,
    what: &str,
    build: &super::Program,
    map_id: impl Fn(&str) -> Option<u32>,
) -> Result<(), HandoffError> {
    let raw = fd.as_raw_fd();
    let info = bpf::prog_info(fd.as_fd()).map_err(|e| {
        err_in(
            var,
            format!("fd {raw} ({what}): cannot read its description: {e}"),
        )
    })?;
    if info.prog_type != bpf::PROG_TYPE_SK_REUSEPORT {
        return Err(err_in(
            var,
            format!(
                "fd {raw} ({what}) is a program of type {}, not SK_REUSEPORT ({})",
                info.prog_type,
                bpf::PROG_TYPE_SK_REUSEPORT
            ),
        ));
    }
    // The maps passed with the program, by id, and how many of its own it may hold besides
    // (`None` from `map_id`: a map only the program uses, such as its per-CPU scan state,
    // which nobody passes).
    let (mut want, mut own) = (Vec::new(), Vec::new());
    for &(_, name) in build.map_relocs {
        match map_id(name) {
            Some(id) => want.push(id),
            None => own.push(name),
        }
    }
    let mut got = info.map_ids.clone();
    want.sort_unstable();
    want.dedup();
    own.sort_unstable();
    own.dedup();
    got.sort_unstable();
    got.dedup();
    let passed_used = want.iter().all(|id| got.binary_search(id).is_ok());
    if !passed_used || got.len() != want.len() + own.len() {
        return Err(err_in(
            var,
            format!(
                "fd {raw} ({what}) does not use the maps passed with it (map ids {got:?}, \
                 expected {want:?} and {} of its own)",
                own.len()
            ),
        ));
    }
    Ok(())
}

/// Takes over fd `fd` passed in variable `var`: a BPF object of `kind`, marked close-on-exec.
pub(super) fn take(
    var: &'static str,
    fd: i32,
    kind: bpf::ObjectKind,
) -> Result<OwnedFd, HandoffError> {
    bpf::adopt_inherited_object(fd, kind).map_err(|e| err_in(var, e.to_string()))
}

/// Takes over the objects named by `value` (the variable's value) for a master with
/// `listeners` listening addresses: each fd must be a BPF object of the kind its place says,
/// the maps exactly what [`Objects::load`] creates, each program an `SK_REUSEPORT` program
/// using the table, the meta map and its own socket array. Every fd taken over is marked
/// close-on-exec (a worker gets only the table, placed at `RCLUSTER_STEER_FD`); an fd that is
/// not a BPF object is left alone.
pub fn adopt(value: &OsStr, listeners: usize) -> Result<Objects, HandoffError> {
    let passed = parse(value)?;
    if passed.groups.len() != listeners {
        return Err(err(format!(
            "programs for {} listening address{} passed in, but the master listens on {} \
             (steer-load --listeners {listeners})",
            passed.groups.len(),
            if passed.groups.len() == 1 { "" } else { "es" },
            listeners
        )));
    }
    let take = |fd, kind| take(RCLUSTER_STEER_FDS, fd, kind);
    let slots = take(passed.slots, bpf::ObjectKind::Map)?;
    let meta = take(passed.meta, bpf::ObjectKind::Map)?;
    let mut groups = Vec::with_capacity(listeners);
    for &(socks, prog) in &passed.groups {
        let socks = take(socks, bpf::ObjectKind::Map)?;
        let prog = take(prog, bpf::ObjectKind::Prog)?;
        groups.push(Group { socks, prog });
    }
    let var = RCLUSTER_STEER_FDS;
    let slots_id = check_map(var, &slots, &SLOTS_MAP, "the slot table")?;
    let meta_id = check_map(var, &meta, &META_MAP, "the meta map")?;
    for (i, g) in groups.iter().enumerate() {
        let what = format!("listener {i}'s socket array");
        let socks_id = check_map(var, &g.socks, &SOCKS_MAP, &what)?;
        let what = format!("listener {i}'s program");
        check_prog(var, &g.prog, &what, &prog::LOOP, |name| match name {
            "steer_slots" => Some(slots_id),
            "steer_meta" => Some(meta_id),
            "steer_socks" => Some(socks_id),
            _ => None,
        })?;
    }
    Ok(Objects {
        slots,
        meta,
        groups,
        migrate: passed.migrate,
        scan: None,
    })
}

/// `rcluster-lb steer-load --listeners N -- COMMAND...`: loads the objects for `listeners`
/// listening addresses, passes them to `command` in [`RCLUSTER_STEER_FDS`], drops every
/// capability and execs it. Returns only on failure (exit 2 for a command that cannot be
/// executed or a bad count, 1 where the program does not load).
pub fn run(listeners: usize, command: &[OsString]) -> anyhow::Result<()> {
    if listeners == 0 || listeners > rcluster_proto::MAX_LISTENERS {
        return Err(UsageError(format!(
            "steer-load: --listeners {listeners}: between 1 and {}",
            rcluster_proto::MAX_LISTENERS
        ))
        .into());
    }
    let Some((program, args)) = command.split_first() else {
        return Err(UsageError("steer-load: no COMMAND to run".into()).into());
    };
    let objects = Objects::load(listeners).context("steer-load")?;
    let fds = in_order(&objects);
    for fd in &fds {
        sys::set_inheritable(fd.as_fd())
            .context("steer-load: cannot clear close-on-exec on a steering fd")?;
    }
    let numbers: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let value = env_value(objects.migrate, &numbers);
    // Plain reuseport mode's program too, for a master run with `--policy reuseport`: without
    // it a scaled-down worker's socket keeps taking connections while it drains.
    let spread = match Spread::load(listeners) {
        Ok(spread) => {
            let fds = spread.fds();
            for fd in &fds {
                sys::set_inheritable(*fd)
                    .context("steer-load: cannot clear close-on-exec on a spread fd")?;
            }
            let numbers: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
            Some((env_value(spread.migrates(), &numbers), spread))
        }
        Err(e) => {
            log::warn!(
                "steer-load: the reuseport spread program does not load ({e}); passing on the steering program only"
            );
            None
        }
    };
    sys::drop_capabilities().context("steer-load: cannot drop capabilities")?;
    log::info!(
        "steer-load: steering program loaded for {listeners} listening address{}{}; running {} \
         without capabilities, {RCLUSTER_STEER_FDS}={value}{}",
        if listeners == 1 { "" } else { "es" },
        objects.scan.map_or("", |scan| scan.note()),
        program.to_string_lossy(),
        spread.as_ref().map_or(String::new(), |(v, _)| format!(
            " {RCLUSTER_SPREAD_FDS}={v}"
        ))
    );
    let mut command = std::process::Command::new(program);
    command.args(args).env(RCLUSTER_STEER_FDS, &value);
    if let Some((v, _)) = &spread {
        command.env(RCLUSTER_SPREAD_FDS, v);
    }
    let error = command.exec();
    Err(UsageError(format!(
        "steer-load: cannot execute {}: {error}",
        program.to_string_lossy()
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn parsed(v: &str) -> Result<Passed, String> {
        parse(OsStr::new(v)).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_table_meta_and_one_pair_per_listener() {
        assert_eq!(
            parsed("select-or-migrate:3,4,6,7,8,9").unwrap(),
            Passed {
                migrate: true,
                slots: 3,
                meta: 4,
                groups: vec![(6, 7), (8, 9)],
            }
        );
        assert!(!parsed("select:10,11,12,13").unwrap().migrate);
    }

    #[test]
    fn refuses_what_is_not_a_list_of_fds() {
        let e = parsed("3,4,5,6").unwrap_err();
        assert!(e.starts_with("RCLUSTER_STEER_FDS: "), "{e}");
        assert!(parsed("migrate:3,4,5,6").is_err());
        assert!(parsed("select:3,4,x,6").unwrap_err().contains("\"x\""));
        assert!(parsed("select:3,4,5").unwrap_err().contains("3 fds given"));
        assert!(parsed("select:3,4").unwrap_err().contains("2 fds given"));
        assert!(
            parsed("select:3,4,5,5")
                .unwrap_err()
                .contains("fd 5 is given twice")
        );
        assert!(parsed("select:0,4,5,6").unwrap_err().contains("fd 0"));
    }

    #[test]
    fn an_fd_that_is_not_a_bpf_object_is_named_and_left_open() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let raw = file.as_raw_fd();
        let value = format!("select:{raw},{},{},{}", raw + 1000, raw + 1001, raw + 1002);
        let e = adopt(OsStr::new(&value), 1).unwrap_err().to_string();
        assert!(
            e.contains(&format!("fd {raw} is not a BPF map (/dev/null)")),
            "{e}"
        );
        // Still open: the error path closed nothing it did not own.
        assert!(file.metadata().is_ok());
    }

    #[test]
    fn the_listener_count_must_match() {
        let e = adopt(OsStr::new("select:3,4,5,6,7,8"), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("programs for 2 listening addresses passed in"),
            "{e}"
        );
        assert!(e.contains("listens on 1"), "{e}");
    }

    /// Against the real kernel (needs CAP_BPF; skips with a note without it): what
    /// [`Objects::load`] creates is adopted back; a swapped pair is refused.
    #[test]
    fn loaded_objects_round_trip() {
        let objects = match Objects::load(2) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("note: kernel steering unavailable here ({e}); skipping this test");
                return;
            }
        };
        // adopt owns the numbers it is given: hand it duplicates, given up here.
        let numbers = || -> Vec<i32> {
            in_order(&objects)
                .into_iter()
                .map(|fd| fd.try_clone().unwrap().into_raw_fd())
                .collect()
        };
        let list = |fds: &[i32]| env_value(objects.migrate, fds);
        // Passes the fds at positions `pick` (one listener) and closes the others; the error.
        let refused = |pick: [usize; 4]| {
            let n = numbers();
            let e = adopt(OsStr::new(&list(&pick.map(|i| n[i]))), 1).unwrap_err();
            for (_, &fd) in n.iter().enumerate().filter(|(i, _)| !pick.contains(i)) {
                drop(sys::adopt_inherited_fd(fd).unwrap());
            }
            e.to_string()
        };
        // Listener 1's program beside listener 0's socket array: refused, naming the program.
        let e = refused([0, 1, 2, 5]);
        assert!(e.contains("does not use the maps passed with it"), "{e}");
        // The meta map where the table belongs: refused, naming both shapes.
        let e = refused([1, 0, 2, 3]);
        assert!(e.contains("is not the slot table (steer_slots)"), "{e}");
        // The right ones, in order: adopted.
        let adopted = adopt(OsStr::new(&list(&numbers())), 2).unwrap();
        assert_eq!(adopted.listeners(), 2);
        assert_eq!(adopted.migrate, objects.migrate);
        assert!(super::super::Steering::new(adopted).is_ok());
    }
}
