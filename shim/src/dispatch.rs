//! `accept` on a dispatch channel: receive one CONN message and its fd (unix(7) SCM_RIGHTS,
//! cmsg(3)), and make the result look like accept4(2)'s.

use std::mem;
use std::os::fd::BorrowedFd;

use libc::{c_int, sockaddr, socklen_t};

use crate::conns::Marked;
use crate::listener::{Listener, Room};
use crate::state::{Shim, errno, set_errno, warn};
use crate::{real, sockaddr as sa};
use rcluster_proto::{HEADER_LEN, ToWorker};

/// Room for this many fds per message, so a misbehaving master that attaches several is
/// detected (and the extras closed) rather than truncated silently by the kernel.
const MAX_FDS_PER_MSG: usize = 8;

/// Control buffer, aligned for `cmsghdr` (CMSG_SPACE(8 * 4) = 48 on 64-bit Linux).
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

enum Received {
    /// A valid CONN and its connection fd (close-on-exec).
    Conn(c_int),
    /// Something that is not a connection; already dealt with, read the next message.
    Skip,
    /// The master closed its end.
    Eof,
    /// recvmsg failed; errno is set (EAGAIN on an empty non-blocking channel, EINTR, …).
    Failed,
    /// Near the fd limit: the waiting connection's fd does not fit; it stays queued.
    NoRoom,
}

/// One message as read: its bytes, the fds the kernel installed for it, and whether some
/// could not be installed (`MSG_CTRUNC`: this process had no free fd for them).
struct Raw {
    data: [u8; 2 * HEADER_LEN],
    n: usize,
    fds: [c_int; MAX_FDS_PER_MSG],
    count: usize,
    truncated: bool,
    ctrunc: bool,
}

impl Raw {
    fn fds(&self) -> &[c_int] {
        &self.fds[..self.count]
    }

    fn bytes(&self) -> &[u8] {
        &self.data[..self.n]
    }

    fn close_fds(&self) {
        close_all(self.fds());
    }
}

/// Closes fds received just now, owned by nobody else.
fn close_all(fds: &[c_int]) {
    for &fd in fds {
        // SAFETY: as documented, the fds are ours to close.
        unsafe { real::close(fd) };
    }
}

/// recvmsg(2) of one message with `flags` added to `MSG_CMSG_CLOEXEC` (so the connection is
/// never inherited by a concurrent fork+exec before the caller's flags are applied); `None`
/// when it fails (errno set: EAGAIN on an empty non-blocking channel, EINTR, …).
fn read_message(fd: c_int, flags: c_int) -> Option<Raw> {
    let mut raw = Raw {
        data: [0u8; 2 * HEADER_LEN],
        n: 0,
        fds: [-1; MAX_FDS_PER_MSG],
        count: 0,
        truncated: false,
        ctrunc: false,
    };
    let mut cbuf = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: raw.data.as_mut_ptr().cast(),
        iov_len: raw.data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is an empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: msg points at iov and cbuf, which outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
    if n < 0 {
        return None;
    }
    raw.n = n as usize;
    // SAFETY: msg was filled by recvmsg; the CMSG_* macros walk its control buffer within
    // msg_controllen, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 ints.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<c_int>();
                for k in 0..payload / mem::size_of::<c_int>() {
                    let fd = std::ptr::read_unaligned(data.add(k));
                    if raw.count < MAX_FDS_PER_MSG {
                        raw.fds[raw.count] = fd;
                        raw.count += 1;
                    } else {
                        real::close(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    raw.truncated = msg.msg_flags & libc::MSG_TRUNC != 0;
    raw.ctrunc = msg.msg_flags & libc::MSG_CTRUNC != 0;
    Some(raw)
}

/// One message: a connection, or what else it was.
fn receive(l: &Listener, fd: c_int) -> Received {
    match read_message(fd, 0) {
        Some(raw) => interpret(l, raw),
        None => Received::Failed,
    }
}

/// Near the fd limit, where the kernel would close a connection whose fd does not fit (and
/// another thread of the server can take the last free fd between any check and the read):
/// the message is first read with `MSG_PEEK`, which installs copies of its fds and leaves it
/// queued, and consumed only once a copy is held. Nothing fits: nothing is consumed
/// ([`Received::NoRoom`]). The consuming read may install the fds again (closed: the copies
/// serve) or not (`MSG_CTRUNC`: the copies serve). If another thread consumed the peeked
/// message first (its CONN bytes, which carry the master's connection number, differ), the
/// copies are closed and the message read is handled as usual. Threads of the process take
/// turns here ([`Listener::tight_reader`]), and the process holds the channel lock
/// ([`rcluster_sys::lock_channel`]) across both reads, which the master also takes to read the
/// queue back (after FULL, or to drain); so that other reader is only ever a master that
/// ignores the lock.
fn receive_tight(l: &Listener, fd: c_int) -> Received {
    // A blocking caller waits for a message first, outside the turn taking
    // (`Listener::tight_reader`), whose reads never block.
    if !is_nonblocking(fd) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            return Received::Failed;
        }
    }
    let _turn = l.tight_reader();
    // And with the master, which takes back what is queued (after FULL, to drain) by reading
    // the same queue: between our two reads it could take the peeked message, and our second
    // read would then get the next one with no fd for it. Without the lock (`ENOLCK`), read as
    // before.
    // SAFETY: fd is the listener's channel, open for the whole call.
    let chan = unsafe { BorrowedFd::borrow_raw(fd) };
    let _exclusive = rcluster_sys::lock_channel(chan, true);
    let Some(peeked) = read_message(fd, libc::MSG_PEEK | libc::MSG_DONTWAIT) else {
        if errno() == libc::EAGAIN && !is_nonblocking(fd) {
            // Another thread took what woke us: wait again.
            return Received::Skip;
        }
        return Received::Failed;
    };
    if peeked.count == 0 {
        if peeked.ctrunc {
            return Received::NoRoom;
        }
        // Not a connection (or end of file): nothing to keep; read it as usual, without
        // blocking while other threads wait for their turn.
        return match read_message(fd, libc::MSG_DONTWAIT) {
            Some(raw) => interpret(l, raw),
            None if errno() == libc::EAGAIN && !is_nonblocking(fd) => Received::Skip,
            None => Received::Failed,
        };
    }
    let Some(taken) = read_message(fd, libc::MSG_DONTWAIT) else {
        // Another thread consumed it and nothing else is queued: the copies were a peek.
        let e = errno();
        peeked.close_fds();
        set_errno(e);
        return Received::Skip;
    };
    if taken.bytes() == peeked.bytes() {
        taken.close_fds();
        interpret(l, peeked)
    } else {
        peeked.close_fds();
        interpret(l, taken)
    }
}

/// What a message read from the channel means for `accept`.
fn interpret(l: &Listener, raw: Raw) -> Received {
    let fds = raw.fds();
    // SOCK_SEQPACKET: a zero-length read is end of file (the master never sends empty ones).
    if raw.n == 0 && fds.is_empty() {
        return Received::Eof;
    }
    let decoded = if raw.truncated {
        None
    } else {
        ToWorker::decode(raw.bytes()).ok()
    };
    match decoded {
        Some(ToWorker::Conn { .. }) if !fds.is_empty() => {
            if fds.len() > 1 {
                warn("CONN message carried more than one fd; extra fds closed");
                close_all(&fds[1..]);
            }
            Received::Conn(fds[0])
        }
        Some(ToWorker::Conn { .. }) => {
            // The master counted a connection we will never see: balance its books.
            warn("CONN message without an fd; reported closed");
            // SAFETY: getpid cannot fail.
            l.conn_closed(1, unsafe { libc::getpid() } as u32, false);
            Received::Skip
        }
        None => {
            warn("malformed message on the dispatch channel (wrong protocol version?); dropped");
            close_all(fds);
            Received::Skip
        }
    }
}

fn is_nonblocking(fd: c_int) -> bool {
    // SAFETY: F_GETFL takes no argument; an invalid fd reports an error.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    fl >= 0 && fl & libc::O_NONBLOCK != 0
}

/// accept4(2) on listener `l`'s dispatch channel, reachable as the server's `fd`.
///
/// # Safety
/// `addr`/`len` as for accept4(2).
pub unsafe fn accept(
    shim: &Shim,
    l: &Listener,
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    // Socket-activated servers accept without bind/listen: accepting is being ready.
    l.mark_listening();
    l.flush();
    shim.maybe_notify_ready();
    loop {
        if l.is_orphaned() {
            return orphaned(fd);
        }
        let received = match l.room() {
            Room::Plenty => receive(l, fd),
            Room::Tight => receive_tight(l, fd),
            Room::Full => Received::NoRoom,
        };
        let conn = match received {
            Received::Conn(conn) => conn,
            Received::Skip => continue,
            Received::Failed => return -1,
            Received::NoRoom => {
                // As accept(2) at the fd limit; the master was told (FULL) and dispatches
                // elsewhere until this process has room again.
                l.full();
                set_errno(libc::EMFILE);
                return -1;
            }
            Received::Eof => {
                if l.mark_orphaned() {
                    // No connection can ever arrive again. Ask the process to stop the
                    // conventional way (SIGTERM, as the master's drain signal would), and let
                    // the server's signal handling run now (EINTR) instead of blocking.
                    warn("dispatch channel closed by the master; sending SIGTERM to self");
                    // SAFETY: kill on our own pid.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    set_errno(if is_nonblocking(fd) {
                        libc::EAGAIN
                    } else {
                        libc::EINTR
                    });
                    return -1;
                }
                return orphaned(fd);
            }
        };
        l.received(conn);
        // One getpid for the whole hand-off (a real system call: see `Shim::pid`).
        let pid = shim.pid();
        // Track it before anyone can learn the number (conns.rs).
        match shim.conns.mark(conn, l.index, pid) {
            Marked::Fresh => shim.opened(l, pid),
            Marked::Stale(i) => {
                shim.conn_closed(i, pid, false);
                shim.opened(l, pid);
            }
            // Cannot watch its close: report it finished now rather than never.
            Marked::Untracked => l.conn_closed(1, pid, false),
        }
        // What a connection accepted from a TCP listener would have inherited from it.
        l.opts.apply(conn);
        apply_accept_flags(conn, flags);
        if !addr.is_null() && !len.is_null() {
            // accept(2) reports the peer: ask the connection itself (getpeername truncates and
            // sets *len like accept does). A peer that already reset has no name any more;
            // report the unspecified address of the listener's family rather than nothing.
            // SAFETY: addr/len valid per the caller's contract.
            if unsafe { libc::getpeername(conn, addr, len) } != 0 {
                // SAFETY: as above.
                unsafe { sa::write(&sa::unspecified_like(&l.addr), addr, len) };
            }
        }
        return conn;
    }
}

/// accept4(2)'s flags, applied by hand: the fd came from another process. The master accepts
/// with `SOCK_NONBLOCK` (docs/PROTOCOL.md §2), so `O_NONBLOCK` is cleared only when the server
/// did not ask for it (accept(2): a new socket does not inherit it); and it was received
/// close-on-exec. An event-loop server (`SOCK_NONBLOCK | SOCK_CLOEXEC`) costs no system call.
fn apply_accept_flags(conn: c_int, flags: c_int) {
    if flags & libc::SOCK_NONBLOCK == 0 {
        let mut off: c_int = 0;
        // SAFETY: FIONBIO reads one int from valid storage; on an fd we own.
        unsafe { libc::ioctl(conn, libc::FIONBIO, &mut off) };
    }
    if flags & libc::SOCK_CLOEXEC == 0 {
        // SAFETY: fcntl on an fd we own; an error leaves it close-on-exec.
        unsafe { libc::fcntl(conn, libc::F_SETFD, 0) };
    }
}

/// `accept` after the master went away: nothing will ever arrive. A non-blocking caller gets
/// EAGAIN; a blocking caller waits, as on an idle listener, until a signal (the SIGTERM already
/// raised, normally) interrupts it.
fn orphaned(fd: c_int) -> c_int {
    if !is_nonblocking(fd) {
        // SAFETY: poll with no fds only sleeps until a signal arrives.
        unsafe { libc::poll(std::ptr::null_mut(), 0, -1) };
        if errno() == libc::EINTR {
            return -1;
        }
    }
    set_errno(libc::EAGAIN);
    -1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcluster_sys::testing::{
        at_fd_limit_on_threads, fill_fd_table, run_ignored_test_under_fd_limit,
    };
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    /// Set in the child process that runs [`fd_limit_child`].
    const CHILD: &str = "RCLUSTER_SHIM_FD_LIMIT_CHILD";

    /// Near the fd limit nothing is lost: with no free fd a waiting connection stays queued
    /// (`NoRoom`), and with one free fd, taken by the peek so that the consuming read has none,
    /// the connection still arrives. A plain read at the same point loses it, which is why the
    /// tight path exists. Run in a child process under `prlimit --nofile=64` (skipped with a
    /// note without it): it fills its fd table, which would break tests running beside it.
    #[test]
    fn near_the_fd_limit_a_connection_is_queued_or_received_never_lost() {
        run_ignored_test_under_fd_limit("dispatch::tests::fd_limit_child", CHILD, 64);
    }

    /// Set in the child process that runs [`two_readers_child`].
    const TWO_READERS: &str = "RCLUSTER_SHIM_TWO_READERS_CHILD";

    /// Two threads reading the channel at once near the fd limit lose nothing: with two CONNs
    /// queued and two free fds, both could peek the first message (taking both fds), and the one
    /// whose consuming read then got the second would find no fd for it. Many rounds, in a
    /// child process under `prlimit --nofile=64`: every connection arrives, now or once there
    /// is room again.
    #[test]
    fn two_threads_reading_near_the_fd_limit_lose_no_connection() {
        run_ignored_test_under_fd_limit("dispatch::tests::two_readers_child", TWO_READERS, 64);
    }

    #[test]
    #[ignore = "run in a child process by two_threads_reading_near_the_fd_limit_lose_no_connection"]
    fn two_readers_child() {
        if std::env::var_os(TWO_READERS).is_none() {
            return;
        }
        let (l, master) = crate::listener::tests::pair();
        let chan = l.chan.as_raw_fd();
        for round in 0..1500 {
            let mut peers = Vec::new();
            for seq in [2 * round, 2 * round + 1] {
                let (sent, peer) = UnixStream::pair().unwrap();
                let msg = ToWorker::Conn { seq }.encode();
                rcluster_sys::scm::sendmsg_fd(master.as_fd(), &msg, sent.as_fd()).unwrap();
                peers.push(peer);
            }
            let got = at_fd_limit_on_threads(2, 2, || match receive_tight(&l, chan) {
                Received::Conn(conn) => {
                    close_all(&[conn]);
                    1
                }
                _ => 0,
            });
            // What is still queued, read with room to spare.
            let mut later = 0;
            while let Some(raw) = read_message(chan, libc::MSG_DONTWAIT) {
                later += raw.count;
                raw.close_fds();
            }
            assert_eq!(got + later, 2, "round {round}: a connection was lost");
        }
    }

    /// A blocking read near the fd limit waits for a message before it takes its turn and the
    /// channel lock: a master taking back what is queued meanwhile never finds the lock held by
    /// an idle worker (it would put the reclaim off, then take it without the lock).
    #[test]
    fn a_blocking_tight_read_waits_without_holding_the_channel_lock() {
        let (l, master) = crate::listener::tests::pair();
        let chan = l.chan.as_raw_fd();
        let (sent, _peer) = UnixStream::pair().unwrap();
        let (free, got) = rcluster_sys::testing::channel_lock_free_while_blocked(
            l.chan.as_fd(),
            || match receive_tight(&l, chan) {
                Received::Conn(conn) => {
                    close_all(&[conn]);
                    1
                }
                _ => 0,
            },
            || {
                let msg = ToWorker::Conn { seq: 1 }.encode();
                rcluster_sys::scm::sendmsg_fd(master.as_fd(), &msg, sent.as_fd()).unwrap();
            },
        );
        assert_eq!(got, 1);
        assert!(free, "the channel lock was held while the worker waited");
    }

    /// Set in the child process that runs [`reclaim_race_child`].
    const RECLAIM_RACE: &str = "RCLUSTER_SHIM_RECLAIM_RACE_CHILD";

    /// The master taking back what is queued, while the worker reads near its fd limit, costs
    /// no connection: with one free fd the peek takes it, and if another process consumed the
    /// peeked message before the second read, that read would get the next one with no fd for
    /// it. Many rounds against a reclaiming process that honours the channel lock, as the
    /// master does; every connection ends up with one of the two.
    #[test]
    fn the_master_reclaiming_during_a_tight_read_loses_no_connection() {
        run_ignored_test_under_fd_limit("dispatch::tests::reclaim_race_child", RECLAIM_RACE, 64);
    }

    #[test]
    #[ignore = "run in a child process by the_master_reclaiming_during_a_tight_read_loses_no_connection"]
    fn reclaim_race_child() {
        if std::env::var_os(RECLAIM_RACE).is_none() {
            return;
        }
        let (l, master) = crate::listener::tests::pair();
        let chan = l.chan.as_raw_fd();
        rcluster_sys::set_nonblocking(l.chan.as_fd(), true).unwrap();
        let rounds = 10_000;
        let (got, reclaimed) = rcluster_sys::testing::tight_reads_against_a_reclaimer(
            l.chan.as_fd(),
            master,
            rounds,
            |seq| ToWorker::Conn { seq }.encode().to_vec(),
            || match receive_tight(&l, chan) {
                Received::Conn(conn) => {
                    close_all(&[conn]);
                    1
                }
                _ => 0,
            },
        );
        assert_eq!(got + reclaimed, 2 * rounds, "connections were lost");
    }

    #[test]
    #[ignore = "run in a child process by near_the_fd_limit_a_connection_is_queued_or_received_never_lost"]
    fn fd_limit_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let (l, master) = crate::listener::tests::pair();
        let chan = l.chan.as_raw_fd();
        // Two connections (stream socketpairs), each sent in a CONN with the master's
        // sequence number, our copy of the sent end closed so only the message holds it.
        let (sent1, mut peer1) = UnixStream::pair().unwrap();
        let (sent2, mut peer2) = UnixStream::pair().unwrap();
        for (seq, sent) in [(1, sent1), (2, sent2)] {
            let msg = ToWorker::Conn { seq }.encode();
            rcluster_sys::scm::sendmsg_fd(master.as_fd(), &msg, sent.as_fd()).unwrap();
        }
        // No free fd left.
        let mut fillers = fill_fd_table();
        assert!(matches!(receive_tight(&l, chan), Received::NoRoom));
        // One free fd: the peek takes it, the consuming read finds none (MSG_CTRUNC).
        drop(fillers.pop());
        let Received::Conn(conn) = receive_tight(&l, chan) else {
            panic!("the first connection did not arrive");
        };
        // SAFETY: conn was just received and is ours.
        let mut conn = UnixStream::from(unsafe { OwnedFd::from_raw_fd(conn) });
        peer1.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x", "the received fd is the first connection");
        // The same point without the tight path: the kernel drops the fd, the client is lost.
        let _no_room = fill_fd_table();
        assert!(matches!(receive(&l, chan), Received::Skip));
        assert_eq!(
            peer2.read(&mut byte).unwrap(),
            0,
            "the second connection was closed on receipt"
        );
    }
}
