//! For tests only: running one `#[ignore]`d test of the current test binary in a child
//! process, for tests that change process-wide state (the fd limit, the fd table) that would
//! break tests running beside them in the same process.

use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;

/// Runs test `name` (its full path, e.g. `tests::child`) of the running test binary alone in
/// a child process, with `env` set to `1` (the test returns at once without it) and the
/// command prefixed by `wrapper` (e.g. `["/usr/bin/prlimit", "--nofile=64:64"]`, or none).
/// Panics with the child's output unless the child ran that test and it passed.
pub fn run_ignored_test_in_child(name: &str, env: &str, wrapper: &[&str]) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let out = cmd
        .args([
            "--exact",
            name,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(env, "1")
        .output()
        .expect("the child test process starts");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran nothing: {text}");
}

/// [`run_ignored_test_in_child`] under `prlimit --nofile=NOFILE:NOFILE`, for a test that fills
/// its fd table (which would break tests running beside it). Skipped, with a note, where
/// `/usr/bin/prlimit` is missing.
pub fn run_ignored_test_under_fd_limit(name: &str, env: &str, nofile: u32) {
    let prlimit = "/usr/bin/prlimit";
    if !std::path::Path::new(prlimit).exists() {
        eprintln!("skipped: needs {prlimit}");
        return;
    }
    run_ignored_test_in_child(
        name,
        env,
        &[prlimit, &format!("--nofile={nofile}:{nofile}")],
    );
}

/// Opens fds (copies of stdin's) until none is free, for a test running under a low
/// `RLIMIT_NOFILE` (see [`run_ignored_test_in_child`]); they close when dropped.
pub fn fill_fd_table() -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    while let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() {
        fds.push(fd);
    }
    fds
}

/// With exactly `free` fds left (the rest of the table filled), runs `read` on `threads` threads
/// started together and returns the sum of what they return; the table is freed again before
/// it returns. For races at the fd limit (run under [`run_ignored_test_under_fd_limit`]).
pub fn at_fd_limit_on_threads(
    free: usize,
    threads: usize,
    read: impl Fn() -> usize + Sync,
) -> usize {
    let mut fillers = fill_fd_table();
    fillers.truncate(fillers.len().saturating_sub(free));
    let start = std::sync::Barrier::new(threads);
    let sum = std::thread::scope(|s| {
        let running: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    read()
                })
            })
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).sum()
    });
    drop(fillers);
    sum
}
