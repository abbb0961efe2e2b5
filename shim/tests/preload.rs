//! Drives real, unmodified servers (python's http.server, a node http server, a threaded
//! python accept loop) under the shim, with this file playing the master: it owns the public
//! TCP listener, hands each accepted connection to the worker as a CONN message over a
//! SOCK_SEQPACKET socketpair placed at the worker's fd 3, and checks the READY/CLOSED it gets
//! back. Every wait has a deadline; every spawned process is killed and reaped on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use std::{fs, io, mem, thread};

use rcluster_proto::{ToMaster, ToWorker};

/// Generous: node starting on a loaded 2-core machine. Only an upper bound, never a sleep.
const DEADLINE: Duration = Duration::from_secs(30);

fn shim_path() -> PathBuf {
    // The test binary is target/<profile>/deps/preload-<hash>; `cargo test` builds the library
    // (cdylib + rlib) for the same run next to it in deps/ (it is uplifted to target/<profile>/
    // only by `cargo build`).
    let exe = std::env::current_exe().expect("test executable path");
    let so = exe.with_file_name("librcluster_shim.so");
    assert!(so.exists(), "{} not built", so.display());
    so
}

/// The real python interpreter: `python3` on PATH may be a wrapper script (pyenv), which
/// would load the shim first and consume its environment.
fn python() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 runs");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rcluster-shim-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn socketpair_seqpacket() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1; 2];
    // SAFETY: fds is valid storage for two ints.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: socketpair returned two fresh fds owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[repr(C, align(8))]
struct Cmsg([u8; 32]);

/// Master → worker: CONN carrying `conn` (SCM_RIGHTS, one fd).
fn send_conn(chan: BorrowedFd<'_>, seq: u64, conn: BorrowedFd<'_>) {
    let msg = ToWorker::Conn { seq }.encode();
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut _,
        iov_len: msg.len(),
    };
    let mut cbuf = Cmsg([0; 32]);
    // SAFETY: msghdr is plain data; zeroed is an empty header.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cbuf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
    // SAFETY: the control buffer is 8-aligned and CMSG_SPACE(4) ≤ 32 bytes long, so the first
    // header and its one-int payload fit; hdr points at live buffers during sendmsg.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&hdr);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), conn.as_raw_fd());
        libc::sendmsg(chan.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL)
    };
    assert_eq!(n, 16, "sendmsg: {}", io::Error::last_os_error());
}

/// Worker → master: the next message, or `None` at the deadline or on EOF.
fn recv_msg(chan: BorrowedFd<'_>, deadline: Instant) -> Option<ToMaster> {
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut pfd = libc::pollfd {
            fd: chan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(60_000) as i32) };
        if r <= 0 {
            continue;
        }
        let mut buf = [0u8; 64];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(chan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return None;
        }
        let msg = ToMaster::decode(&buf[..n as usize]);
        return Some(msg.unwrap_or_else(|e| panic!("bad message from the worker: {e}")));
    }
}

/// Reads worker → master messages until `want_closed` CLOSED have been counted. Returns
/// (closed total, READY count, STOPPING count) so callers can also check nothing extra came.
fn collect_closed(chan: BorrowedFd<'_>, want_closed: u64) -> (u64, u32, u32) {
    let deadline = Instant::now() + DEADLINE;
    let (mut closed, mut ready, mut stopping) = (0, 0, 0);
    while closed < want_closed {
        match recv_msg(chan, deadline) {
            Some(ToMaster::Closed { count }) => closed += count,
            Some(ToMaster::Ready { .. }) => ready += 1,
            Some(ToMaster::Stopping) => stopping += 1,
            Some(other) => panic!("unexpected message {other:?}"),
            None => break,
        }
    }
    (closed, ready, stopping)
}

fn wait_ready(chan: BorrowedFd<'_>) {
    let got = recv_msg(chan, Instant::now() + DEADLINE);
    assert_eq!(
        got,
        Some(ToMaster::Ready { max_fds: 0 }),
        "worker did not send READY"
    );
}

/// A spawned worker, killed and reaped on drop (also when the test fails).
struct Worker {
    child: Child,
    lines: Option<mpsc::Receiver<String>>,
}

impl Worker {
    /// Starts `program args` as a worker with `fds` at 3, 4, … and the contract env.
    fn spawn(
        program: &Path,
        args: &[&str],
        mode: &str,
        listen: &[SocketAddr],
        fds: Vec<OwnedFd>,
        extra_env: &[(&str, &str)],
        cwd: &Path,
    ) -> Worker {
        let listen_list: Vec<String> = listen.iter().map(|a| a.to_string()).collect();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(cwd)
            .env("LD_PRELOAD", shim_path())
            // For servers that hand the shim to a child on purpose (it must be filtered out).
            .env("SHIM_PATH", shim_path())
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", vec!["http"; fds.len()].join(":"))
            .env("PORT", listen[0].port().to_string())
            .env("RCLUSTER_WORKER_ID", "0")
            .env("RCLUSTER_GENERATION", "0")
            .env("RCLUSTER_MODE", mode)
            .env("RCLUSTER_LISTEN", listen_list.join(","))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: the closure only makes async-signal-safe calls (fcntl, dup2) on fds that
        // stay open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // First move every source out of the 3.. range so placing one cannot clobber
                // another, then put source i at 3+i (dup2 clears close-on-exec).
                let mut high = [0; 16];
                for (slot, &fd) in high.iter_mut().zip(&raw) {
                    *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if *slot < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for (i, &fd) in high.iter().take(raw.len()).enumerate() {
                    if libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program:?}: {e}"));
        drop(fds);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Worker {
            child,
            lines: Some(rx),
        }
    }

    /// The next stdout line starting with `prefix`, skipping others.
    fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        let rx = self.lines.as_ref().unwrap();
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {prefix:?} line from the worker"));
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no {prefix:?} line from the worker: {e}"),
            }
        }
    }

    /// Waits for the worker to exit on its own: poll(2) on a pidfd (pidfd_open(2)), which
    /// becomes readable when the process exits, then reap it.
    fn wait_exit(&mut self) -> ExitStatus {
        // SAFETY: pidfd_open takes a pid and flags; the child is ours and not yet reaped.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.child.id(), 0) };
        assert!(pidfd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, DEADLINE.as_millis() as i32) };
        assert_eq!(r, 1, "worker did not exit");
        self.child.wait().unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's "master": the public listener and one dispatch channel.
struct Master {
    public: TcpListener,
    chan: OwnedFd,
    seq: u64,
}

impl Master {
    /// Returns the master and the worker's end of the channel.
    fn new() -> (Master, OwnedFd) {
        let public = TcpListener::bind("127.0.0.1:0").unwrap();
        let (chan, worker_end) = socketpair_seqpacket();
        (
            Master {
                public,
                chan,
                seq: 0,
            },
            worker_end,
        )
    }

    fn addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap()
    }

    /// A client connects to the public listener; the master accepts it and dispatches it.
    fn connect_and_dispatch(&mut self) -> TcpStream {
        let client = TcpStream::connect(self.addr()).unwrap();
        client.set_read_timeout(Some(DEADLINE)).unwrap();
        let (conn, _) = self.public.accept().unwrap();
        // As the master sends them (docs/PROTOCOL.md §2).
        conn.set_nonblocking(true).unwrap();
        self.seq += 1;
        send_conn(self.chan.as_fd(), self.seq, conn.as_fd());
        client
    }
}

fn http_get(mut client: TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n");
    client.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    client.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
fn python_http_server_dispatch() {
    let dir = temp_dir("py-http");
    fs::write(dir.join("hello.txt"), "hello from the worker\n").unwrap();
    let (mut master, worker_end) = Master::new();
    let port = master.addr().port().to_string();
    let _worker = Worker::spawn(
        &python(),
        &["-m", "http.server", &port, "--bind", "127.0.0.1"],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[],
        &dir,
    );
    wait_ready(master.chan.as_fd());
    const N: u64 = 5;
    for _ in 0..N {
        let resp = http_get(master.connect_and_dispatch(), "/hello.txt");
        assert!(resp.starts_with("HTTP/1.0 200"), "response: {resp}");
        assert!(
            resp.ends_with("hello from the worker\n"),
            "response: {resp}"
        );
    }
    let (closed, ready, stopping) = collect_closed(master.chan.as_fd(), N);
    assert_eq!((closed, ready, stopping), (N, 0, 0));
    let _ = fs::remove_dir_all(dir);
}

/// Accepts twice through the shim with libc's `accept4` (ctypes), once with no flags and once
/// with `SOCK_NONBLOCK | SOCK_CLOEXEC`, and prints each connection's two flags.
const ACCEPT_FLAGS_SERVER: &str = r#"
import ctypes, fcntl, os, socket
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(16)
for flags in (0, socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC):
    fd = libc.accept4(s.fileno(), None, None, flags)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    nonblocking = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
    cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    print("accepted", flags, int(nonblocking), int(cloexec), flush=True)
    os.close(fd)
"#;

#[test]
fn accept_flags_are_applied_to_dispatched_connections_as_accept4_would() {
    let dir = temp_dir("accept-flags");
    let (mut master, worker_end) = Master::new();
    let port = master.addr().port().to_string();
    let worker = Worker::spawn(
        &python(),
        &["-c", ACCEPT_FLAGS_SERVER],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[("PORT", &port)],
        &dir,
    );
    wait_ready(master.chan.as_fd());
    // Connections arrive non-blocking and close-on-exec (MSG_CMSG_CLOEXEC).
    let _first = master.connect_and_dispatch();
    assert_eq!(
        worker.line("accepted"),
        "accepted 0 0 0",
        "no flags: blocking, inherited"
    );
    let _second = master.connect_and_dispatch();
    let both = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    assert_eq!(worker.line("accepted"), format!("accepted {both} 1 1"));
    let _ = fs::remove_dir_all(dir);
}

const NODE_SERVER: &str = r#"
const env = process.env, cp = require('child_process');
const seen = (out) => out.toString().split('\0').filter(l => /^(RCLUSTER_|LD_PRELOAD=)/.test(l)).join(',') || '-';
console.log(['node-env', env.RCLUSTER_WORKER_ID, env.RCLUSTER_GENERATION, env.RCLUSTER_MODE, env.LD_PRELOAD || '-'].join(' '));
console.log(['node-child', seen(cp.execFileSync('/bin/cat', ['/proc/self/environ'])),
  seen(cp.execFileSync('/bin/cat', ['/proc/self/environ'], { env: { ...env, LD_PRELOAD: env.SHIM_PATH } }))].join(' '));
require('http').createServer((q, s) => s.end('ok')).listen(env.PORT,
  function () { console.log('listening ' + JSON.stringify(this.address())); });
"#;

#[test]
fn node_http_server_dispatch_binding_any() {
    let (mut master, worker_end) = Master::new();
    let worker = Worker::spawn(
        Path::new("node"),
        &["-e", NODE_SERVER],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[("RCLUSTER_WORKER_ID", "2"), ("RCLUSTER_GENERATION", "5")],
        &std::env::temp_dir(),
    );
    // The worker reads its contract; its children (libuv's fork + exec) see none of it, even
    // when handed our LD_PRELOAD entry explicitly.
    assert_eq!(worker.line("node-env "), "node-env 2 5 dispatch -");
    assert_eq!(worker.line("node-child "), "node-child - -");
    wait_ready(master.chan.as_fd());
    // node bound "::" but getsockname reports the listener's address.
    let line = worker.line("listening ");
    assert!(
        line.contains("127.0.0.1") && line.contains(&master.addr().port().to_string()),
        "{line}"
    );
    const N: u64 = 8;
    for _ in 0..N {
        let resp = http_get(master.connect_and_dispatch(), "/");
        assert!(resp.starts_with("HTTP/1.1 200"), "response: {resp}");
        assert!(resp.ends_with("ok"), "response: {resp}");
    }
    let (closed, ready, stopping) = collect_closed(master.chan.as_fd(), N);
    assert_eq!((closed, ready, stopping), (N, 0, 0));
}

/// A wrapper that replaces itself with the server (`sh -c 'exec …'`, then `/usr/bin/env`, as
/// pyenv's `python3` shim script does) hands the contract over; the shim follows the same
/// process across exec (execve from sh, execvp from env). The wrapper itself can read the
/// contract; the commands it forks cannot.
const WRAPPER: &str = r#"
if [ "$RCLUSTER_WORKER_ID" = 1 ]; then slot=first; else slot=other; fi
echo "wrapper $RCLUSTER_WORKER_ID $RCLUSTER_MODE ${LD_PRELOAD:--} $slot"
seen() { tr '\0' '\n' | grep -E '^(RCLUSTER_|LD_PRELOAD=)' | tr '\n' , | sed 's/,$//'; }
a=$(/bin/cat /proc/self/environ | seen); b=$(LD_PRELOAD="$SHIM_PATH" /bin/cat /proc/self/environ | seen)
echo "wrapper-child ${a:--} ${b:--}"
exec /usr/bin/env "$0" "$@"
"#;

#[test]
fn exec_wrappers_hand_the_contract_to_the_server() {
    let dir = temp_dir("wrapped");
    fs::write(dir.join("w.txt"), "through two wrappers\n").unwrap();
    let (mut master, worker_end) = Master::new();
    let port = master.addr().port().to_string();
    let python = python();
    let worker = Worker::spawn(
        Path::new("/bin/sh"),
        &[
            "-c",
            WRAPPER,
            python.to_str().unwrap(),
            "-m",
            "http.server",
            &port,
            "--bind",
            "127.0.0.1",
        ],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[("RCLUSTER_WORKER_ID", "1")],
        &dir,
    );
    assert_eq!(worker.line("wrapper "), "wrapper 1 dispatch - first");
    assert_eq!(worker.line("wrapper-child "), "wrapper-child - -");
    wait_ready(master.chan.as_fd());
    let resp = http_get(master.connect_and_dispatch(), "/w.txt");
    assert!(resp.ends_with("through two wrappers\n"), "response: {resp}");
    assert_eq!(collect_closed(master.chan.as_fd(), 1), (1, 0, 0));
    let _ = fs::remove_dir_all(dir);
}

/// Four threads block in accept() on one socket; every connection is served exactly once, the
/// CLOSED counts add up. The server reads its contract; children it starts — subprocess
/// (vfork + execv, or execve with an explicit environment that names the shim), posix_spawn
/// and posix_spawnp — see neither the shim nor RCLUSTER_*, and other LD_PRELOAD entries stay.
const THREADED_SERVER: &str = r#"
import os, socket, subprocess, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
# /proc/self/environ: what exec passed, before a shim loaded by mistake could edit it.
probe = "env = dict(l.split('=', 1) for l in open('/proc/self/environ').read().split(chr(0)) if '=' in l); print(env.get('LD_PRELOAD', '-'), ','.join(sorted(k for k in env if k.startswith('RCLUSTER_'))) or '-')"
argv = [sys.executable, "-c", probe]
child = subprocess.run(argv, capture_output=True, text=True)
print("child-env", child.stdout.strip(), flush=True)
env = dict(os.environ, LD_PRELOAD=os.environ["SHIM_PATH"])
child = subprocess.run(argv, capture_output=True, text=True, env=env)
print("child-execve-env", child.stdout.strip(), flush=True)
def spawned(spawn, path, env):
    r, w = os.pipe()
    pid = spawn(path, argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)])
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode().strip()
print("spawn-env", spawned(os.posix_spawn, sys.executable, dict(os.environ, LD_PRELOAD=os.environ["SHIM_PATH"] + " libm.so.6")), flush=True)
print("spawnp-env", spawned(os.posix_spawnp, sys.executable, os.environ), flush=True)
print("own-env", os.environ.get("LD_PRELOAD", "-"), os.environ.get("LISTEN_FDS", "-"), os.environ.get("RCLUSTER_MODE", "-"), os.environ.get("RCLUSTER_WORKER_ID", "-"), os.environ.get("RCLUSTER_GENERATION", "-"), flush=True)
def serve(tid):
    while True:
        c, addr = s.accept()
        data = c.recv(100)
        c.sendall(b"thread %d peer %s got %s" % (tid, addr[0].encode(), data))
        c.close()
threads = [threading.Thread(target=serve, args=(i,), daemon=True) for i in range(4)]
for t in threads:
    t.start()
print("serving", flush=True)
for t in threads:
    t.join()
"#;

#[test]
fn python_threads_blocking_in_accept_get_each_connection_once() {
    let (mut master, worker_end) = Master::new();
    let worker = Worker::spawn(
        &python(),
        &["-c", THREADED_SERVER],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[("RCLUSTER_WORKER_ID", "3"), ("RCLUSTER_GENERATION", "7")],
        &std::env::temp_dir(),
    );
    wait_ready(master.chan.as_fd());
    assert_eq!(worker.line("child-env"), "child-env - -");
    assert_eq!(worker.line("child-execve-env"), "child-execve-env - -");
    assert_eq!(worker.line("spawn-env"), "spawn-env libm.so.6 -");
    assert_eq!(worker.line("spawnp-env"), "spawnp-env - -");
    assert_eq!(worker.line("own-env"), "own-env - 1 dispatch 3 7");
    worker.line("serving");
    // Queue every connection first so the threads race for them.
    const N: usize = 24;
    let clients: Vec<TcpStream> = (0..N).map(|_| master.connect_and_dispatch()).collect();
    let mut seen_threads = std::collections::HashSet::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        // One write: the server answers after a single recv.
        c.write_all(format!("req-{i}").as_bytes()).unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(
            resp.ends_with(&format!("peer 127.0.0.1 got req-{i}")),
            "{resp}"
        );
        seen_threads.insert(resp.split(' ').nth(1).unwrap().to_string());
    }
    let (closed, ready, stopping) = collect_closed(master.chan.as_fd(), N as u64);
    assert_eq!((closed, ready, stopping), (N as u64, 0, 0));
    eprintln!(
        "connections served by {} distinct threads",
        seen_threads.len()
    );
}

#[test]
fn master_closing_the_channel_stops_the_worker() {
    let (master, worker_end) = Master::new();
    let mut worker = Worker::spawn(
        &python(),
        &["-c", THREADED_SERVER],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[],
        &std::env::temp_dir(),
    );
    wait_ready(master.chan.as_fd());
    worker.line("serving");
    drop(master);
    let status = worker.wait_exit();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
}

#[test]
fn shared_mode_python_http_server_and_notify_socket() {
    let dir = temp_dir("shared");
    fs::write(dir.join("index.html"), "shared listener\n").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let fd: OwnedFd = listener.into();
    let _worker = Worker::spawn(
        &python(),
        &[
            "-m",
            "http.server",
            &addr.port().to_string(),
            "--bind",
            "0.0.0.0",
        ],
        "shared",
        &[addr],
        vec![fd],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
        &dir,
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");
    let client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    let resp = http_get(client, "/");
    assert!(
        resp.starts_with("HTTP/1.0 200") && resp.ends_with("shared listener\n"),
        "{resp}"
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn without_the_contract_everything_passes_through() {
    let script = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); \
                  print('port', s.getsockname()[1], flush=True); c, _ = s.accept(); \
                  c.sendall(b'direct'); c.close()";
    let mut cmd = Command::new(python());
    cmd.args(["-c", script])
        .env("LD_PRELOAD", shim_path())
        .env_remove("RCLUSTER_MODE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut worker = Worker {
        child: cmd.spawn().unwrap(),
        lines: None,
    };
    let mut out = BufReader::new(worker.child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("port ").unwrap().parse().unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert_eq!(resp, "direct");
    assert!(worker.wait_exit().success());
}

/// A forked child closing its inherited copy of a connection must not report it (the parent
/// still holds it); closing the listener reports STOPPING after the exact CLOSED counts.
const FORKING_SERVER: &str = r#"
import os, socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.bind(("::", int(os.environ["PORT"])))
s.listen()
for _ in range(3):
    c, _ = s.accept()
    pid = os.fork()
    if pid == 0:
        c.close()
        os._exit(0)
    os.waitpid(pid, 0)
    c.sendall(b"served")
    c.close()
s.close()
"#;

#[test]
fn fork_children_do_not_count_and_listener_close_sends_stopping() {
    let (mut master, worker_end) = Master::new();
    let mut worker = Worker::spawn(
        &python(),
        &["-c", FORKING_SERVER],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[],
        &std::env::temp_dir(),
    );
    wait_ready(master.chan.as_fd());
    for _ in 0..3 {
        let mut c = master.connect_and_dispatch();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert_eq!(resp, "served");
    }
    assert!(worker.wait_exit().success());
    // Everything the worker sent is still queued; the worker's end is closed now, so reading
    // runs into end of file after the last message.
    let deadline = Instant::now() + DEADLINE;
    let mut msgs = Vec::new();
    while let Some(m) = recv_msg(master.chan.as_fd(), deadline) {
        msgs.push(m);
    }
    let closed: u64 = msgs
        .iter()
        .map(|m| match m {
            ToMaster::Closed { count } => *count,
            _ => 0,
        })
        .sum();
    assert_eq!(closed, 3, "{msgs:?}");
    assert_eq!(msgs.last(), Some(&ToMaster::Stopping), "{msgs:?}");
}

/// reuseport mode: fd 3 is a real listening socket; node binds "::" on its port, makes it
/// non-blocking and accepts from it; readiness arrives on NOTIFY_SOCKET (abstract address).
#[test]
fn reuseport_mode_node_with_abstract_notify_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let name = format!("rcluster-shim-test-{}-{}", std::process::id(), addr.port());
    let notify = {
        use std::os::linux::net::SocketAddrExt;
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&sa).unwrap()
    };
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let script =
        "require('http').createServer((q, s) => s.end('node ok')).listen(process.env.PORT)";
    let _worker = Worker::spawn(
        Path::new("node"),
        &["-e", script],
        "reuseport",
        &[addr],
        vec![listener.into()],
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
        &std::env::temp_dir(),
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");
    for _ in 0..3 {
        let client = TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(DEADLINE)).unwrap();
        let resp = http_get(client, "/");
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("node ok"),
            "{resp}"
        );
    }
}

/// A pre-fork server that adopts fd 3 from `LISTEN_FDS` the way gunicorn's arbiter does
/// (`socket.fromfd`, close the original, set TCP options, `listen`), forks two acceptor
/// children and reaps them. A child reads one line: `hold` keeps the connection open until the
/// child is killed; anything else is answered with what the connection's options are.
const PREFORK_ADOPTER: &str = r#"
import os, socket, sys, time
T, S = socket.IPPROTO_TCP, socket.SOL_SOCKET
probe = socket.fromfd(3, socket.AF_UNIX, socket.SOCK_STREAM)
name = probe.getsockname()
probe.close()
ls = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)
os.close(3)
ls.setsockopt(S, socket.SO_REUSEADDR, 1)
ls.setsockopt(T, socket.TCP_NODELAY, 1)
ls.setsockopt(S, socket.SO_KEEPALIVE, 1)
ls.setsockopt(T, socket.TCP_KEEPIDLE, 77)
ls.setsockopt(T, socket.TCP_DEFER_ACCEPT, 5)
try:
    ls.setsockopt(T, socket.TCP_KEEPCNT, -1)
    bad = "accepted"
except OSError as e:
    bad = "refused"
print("listener", name[1] == int(os.environ["PORT"]), ls.getsockopt(S, socket.SO_ACCEPTCONN),
      ls.getsockopt(S, socket.SO_TYPE) == socket.SOCK_STREAM, ls.getsockopt(T, socket.TCP_NODELAY),
      ls.getsockopt(T, socket.TCP_KEEPIDLE), ls.getsockopt(T, socket.TCP_DEFER_ACCEPT) > 0,
      ls.getsockopt(S, socket.SO_REUSEADDR), bad, flush=True)
ls.listen(16)
for _ in range(2):
    if os.fork() == 0:
        while True:
            c, _ = ls.accept()
            if c.recv(64).startswith(b"hold"):
                print("holding", os.getpid(), flush=True)
                time.sleep(600)
            c.sendall(("%d %d %d %d" % (os.getpid(), c.getsockopt(T, socket.TCP_NODELAY),
                c.getsockopt(S, socket.SO_KEEPALIVE), c.getsockopt(T, socket.TCP_KEEPIDLE))).encode())
            c.close()
while True:
    pid, _ = os.waitpid(-1, 0)
    print("reaped", pid, flush=True)
"#;

/// gunicorn's way: fd 3 adopted without `bind`, TCP options set on it, acceptors forked. The
/// options are accepted (and a bad value refused as the kernel would), read back as a
/// listener's, applied to every connection; the children's closes are reported, and a child
/// killed while holding a connection has it reported closed when its parent reaps it.
#[test]
fn adopted_channel_takes_tcp_options_and_forked_acceptors_are_accounted() {
    let (mut master, worker_end) = Master::new();
    let worker = Worker::spawn(
        &python(),
        &["-c", PREFORK_ADOPTER],
        "dispatch",
        &[master.addr()],
        vec![worker_end],
        &[],
        &std::env::temp_dir(),
    );
    assert_eq!(
        worker.line("listener"),
        "listener True 1 True 1 77 True 1 refused"
    );
    wait_ready(master.chan.as_fd());
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let mut c = master.connect_and_dispatch();
        c.write_all(b"x\n").unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let f: Vec<&str> = resp.split_whitespace().collect();
        assert_eq!(
            &f[1..],
            ["1", "1", "77"],
            "options applied to the connection"
        );
        pids.insert(f[0].to_string());
    }
    assert!(
        !pids.contains(&worker.child.id().to_string()),
        "the children accept"
    );
    let (closed, _, stopping) = collect_closed(master.chan.as_fd(), 6);
    assert_eq!((closed, stopping), (6, 0));

    let mut held = master.connect_and_dispatch();
    held.write_all(b"hold\n").unwrap();
    let holder: i32 = worker.line("holding")[8..].trim().parse().unwrap();
    // SAFETY: kill of a child of our worker, by pid.
    unsafe { libc::kill(holder, libc::SIGKILL) };
    assert_eq!(worker.line("reaped"), format!("reaped {holder}"));
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
    let (closed, _, _) = collect_closed(master.chan.as_fd(), 1);
    assert_eq!(closed, 1, "the dead child's connection is reported closed");
    drop(worker);
}
