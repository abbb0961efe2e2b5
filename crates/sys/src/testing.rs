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

/// Opens fds (copies of stdin's) until none is free, for a test running under a low
/// `RLIMIT_NOFILE` (see [`run_ignored_test_in_child`]); they close when dropped.
pub fn fill_fd_table() -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    while let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() {
        fds.push(fd);
    }
    fds
}
