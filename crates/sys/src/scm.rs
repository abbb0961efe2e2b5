//! Passing fds over a unix socket with `SCM_RIGHTS` (unix(7), cmsg(3)): up to
//! [`SEND_MAX_FDS`] fds per message, single `sendmsg`/`recvmsg` (one fd, or several into a
//! caller's vector), and a `sendmmsg(2)` batch for the acceptor's hot path.
//!
//! Pitfalls handled here, measured on the target kernel: a control buffer too small for what
//! arrives sets `MSG_CTRUNC` and the kernel closes the fds that did not fit, so the receive
//! buffer has room for several fds and any extra ones are closed and reported; received fds are
//! not close-on-exec unless `MSG_CMSG_CLOEXEC` is passed, so it always is.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::syscall;

/// Most fds one sent message carries ([`rcluster_proto::MAX_FDS_PER_CONN`]).
pub const SEND_MAX_FDS: usize = rcluster_proto::MAX_FDS_PER_CONN;
/// Bytes of control buffer for one `SCM_RIGHTS` message with up to [`SEND_MAX_FDS`] fds: a
/// 16-byte `cmsghdr` plus 4 bytes per fd, 8-aligned (`CMSG_SPACE`, cmsg(3)).
const CMSG_SEND_LEN: usize = 16 + 4 * SEND_MAX_FDS;
/// A receive buffer for up to this many fds: more than a sender may put in one message, so a
/// misbehaving peer is detected (`MSG_CTRUNC`) instead of silently truncated.
pub const RECV_MAX_FDS: usize = 64;

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgSend([u8; CMSG_SEND_LEN]);

#[repr(C, align(8))]
struct CmsgRecv([u8; 16 + 4 * RECV_MAX_FDS]);

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE((fds * mem::size_of::<RawFd>()) as u32) as usize }
}

/// Fills the message's control buffer with one `SCM_RIGHTS` header carrying `fds`.
fn write_cmsg_fds(msg: &mut libc::msghdr, fds: impl ExactSizeIterator<Item = RawFd>) {
    let count = fds.len();
    debug_assert!(count <= SEND_MAX_FDS && msg.msg_controllen >= cmsg_space(count));
    // SAFETY: msg.msg_control points to an 8-aligned CmsgSend buffer whose msg_controllen is
    // CMSG_SPACE(4 * count) ≤ CMSG_SEND_LEN, so CMSG_FIRSTHDR is non-null and its data area
    // holds `count` ints.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN((count * mem::size_of::<RawFd>()) as u32) as _;
        let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, fd) in fds.enumerate() {
            std::ptr::write_unaligned(data.add(i), fd);
        }
    }
}

/// Sends `data` with `fd` attached as one message. `MSG_NOSIGNAL` so a dead peer is `EPIPE`
/// rather than a SIGPIPE; `MSG_DONTWAIT` so a full channel is `EAGAIN` whatever the fd's mode.
pub fn sendmsg_fd(chan: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let mut cmsg = CmsgSend([0; CMSG_SEND_LEN]);
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(1) as _;
    write_cmsg_fds(&mut msg, std::iter::once(fd.as_raw_fd()));
    // SAFETY: msg points at iov/cmsg buffers that live until the call returns.
    let n = syscall!(sendmsg(
        chan.as_raw_fd(),
        &msg,
        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT
    ))?;
    debug_assert_eq!(n as usize, data.len(), "seqpacket sends whole messages");
    Ok(())
}

/// Sends `data` without fds (worker → master notifications, READY from the master in tests).
pub fn send(chan: BorrowedFd<'_>, data: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: data is a valid buffer for the call.
    let n = syscall!(send(
        chan.as_raw_fd(),
        data.as_ptr().cast(),
        data.len(),
        flags | libc::MSG_NOSIGNAL
    ))?;
    Ok(n as usize)
}

/// One message read by [`recvmsg_fd`].
#[derive(Debug)]
pub struct Received {
    /// Bytes of payload written into the caller's buffer (0 with no fd means end of stream).
    pub len: usize,
    /// The fd that came with the message, already close-on-exec.
    pub fd: Option<OwnedFd>,
    /// The message was longer than the buffer (`MSG_TRUNC`); the rest is gone.
    pub truncated: bool,
    /// More than one fd arrived; the extras were closed.
    pub extra_fds: usize,
}

/// Receives one message and at most one fd; extra fds are closed and counted.
/// `flags` may add `MSG_DONTWAIT`.
pub fn recvmsg_fd(
    chan: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<Received> {
    let mut fds = Vec::new();
    let got = recvmsg_fds(chan, buf, flags, &mut fds)?;
    let extra_fds = fds.len().saturating_sub(1);
    fds.truncate(1);
    Ok(Received {
        len: got.len,
        fd: fds.pop(),
        truncated: got.truncated,
        extra_fds,
    })
}

/// What [`recvmsg_fds`] read besides the fds.
#[derive(Debug, Clone, Copy)]
pub struct ReceivedMsg {
    /// Bytes of payload written into the caller's buffer (0 with no fd means end of stream).
    pub len: usize,
    /// The message was longer than the buffer (`MSG_TRUNC`); the rest is gone.
    pub truncated: bool,
}

/// Receives one message; the fds that came with it (close-on-exec, in order) are appended to
/// `fds`. A message with more than [`RECV_MAX_FDS`] fds is an `InvalidData` error (the kernel
/// closed what did not fit, and what did is closed here). `flags` may add `MSG_DONTWAIT`.
pub fn recvmsg_fds(
    chan: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<ReceivedMsg> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgRecv([0; 16 + 4 * RECV_MAX_FDS]);
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    // SAFETY: msg points at buffers that live until the call returns.
    let n = syscall!(recvmsg(
        chan.as_raw_fd(),
        &mut msg,
        flags | libc::MSG_CMSG_CLOEXEC
    ))?;
    let first_new = fds.len();
    // SAFETY: after recvmsg, msg_control/msg_controllen describe the control data the kernel
    // wrote; CMSG_FIRSTHDR/NXTHDR walk it within those bounds; each SCM_RIGHTS data area holds
    // (cmsg_len - CMSG_LEN(0)) / 4 fds that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = data_len / mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // The kernel closed the fds that did not fit; what we did get is closed here.
        fds.truncate(first_new);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control data truncated (MSG_CTRUNC): too many fds in one message",
        ));
    }
    Ok(ReceivedMsg {
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

/// A batch of (payload, fd) items for one channel, sent with one `sendmmsg(2)`: consecutive
/// items share a message, up to the `fds_per_msg` given to [`SendBatch::send`], and each
/// message carries the payload of its first item. Capacity is fixed at construction so pushing
/// and sending never allocate on the hot path. The fds of the items sent are closed (the
/// receiver holds its own references from then on); items that did not fit are handed back by
/// [`SendBatch::pop_unsent`] for dispatch elsewhere.
pub struct SendBatch<const N: usize> {
    payloads: Vec<[u8; N]>,
    fds: Vec<OwnedFd>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgSend>,
    capacity: usize,
}

// SAFETY: the raw pointers inside `hdrs`/`iovs` are scratch space rebuilt from the batch's own
// buffers on every send; they are never dereferenced outside `send`, which holds `&mut self`.
#[allow(unsafe_code)]
unsafe impl<const N: usize> Send for SendBatch<N> {}

impl<const N: usize> SendBatch<N> {
    /// A batch that holds up to `capacity` messages (at most 1024, `UIO_MAXIOV`).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, 1024);
        SendBatch {
            payloads: Vec::with_capacity(capacity),
            fds: Vec::with_capacity(capacity),
            // SAFETY: mmsghdr is plain data; zeroed is valid.
            hdrs: vec![unsafe { mem::zeroed() }; capacity],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                capacity
            ],
            cmsgs: vec![CmsgSend([0; CMSG_SEND_LEN]); capacity],
            capacity,
        }
    }

    /// Messages waiting to be sent.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// No message is waiting.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The batch is at capacity and must be sent before the next push.
    pub fn is_full(&self) -> bool {
        self.fds.len() == self.capacity
    }

    /// Queues one message. Returns the fd back if the batch is full.
    pub fn push(&mut self, payload: [u8; N], fd: OwnedFd) -> Result<(), ([u8; N], OwnedFd)> {
        if self.is_full() {
            return Err((payload, fd));
        }
        self.payloads.push(payload);
        self.fds.push(fd);
        Ok(())
    }

    /// Sends as many queued items as the channel takes, in order, with one `sendmmsg`, up to
    /// `fds_per_msg` (clamped to 1 ..= [`SEND_MAX_FDS`]) per message. Returns how many items
    /// were sent (their fds are closed here). `Err(WouldBlock)` means the channel took none;
    /// other errors (`EPIPE`: the worker's end is gone) likewise sent none.
    pub fn send(&mut self, chan: BorrowedFd<'_>, fds_per_msg: usize) -> io::Result<usize> {
        let count = self.fds.len();
        if count == 0 {
            return Ok(0);
        }
        let per_msg = fds_per_msg.clamp(1, SEND_MAX_FDS);
        let mut messages = 0;
        for first in (0..count).step_by(per_msg) {
            let k = per_msg.min(count - first);
            self.iovs[messages] = libc::iovec {
                iov_base: self.payloads[first].as_mut_ptr().cast(),
                iov_len: N,
            };
            let hdr = &mut self.hdrs[messages].msg_hdr;
            hdr.msg_name = std::ptr::null_mut();
            hdr.msg_namelen = 0;
            hdr.msg_iov = &mut self.iovs[messages];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[messages].0.as_mut_ptr().cast();
            hdr.msg_controllen = cmsg_space(k) as _;
            hdr.msg_flags = 0;
            write_cmsg_fds(
                hdr,
                self.fds[first..first + k].iter().map(|f| f.as_raw_fd()),
            );
            self.hdrs[messages].msg_len = 0;
            messages += 1;
        }
        // SAFETY: hdrs[..messages] point at iovs/payloads/cmsgs entries owned by self that are
        // not touched until the call returns.
        let sent_msgs = syscall!(sendmmsg(
            chan.as_raw_fd(),
            self.hdrs.as_mut_ptr(),
            messages as libc::c_uint,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT
        ))? as usize;
        let sent = (sent_msgs * per_msg).min(count);
        // Close our copies of what the kernel now holds in the channel, keep the rest in order.
        self.fds.drain(..sent);
        self.payloads.drain(..sent);
        Ok(sent)
    }

    /// Takes back the oldest message not sent, for dispatch to another channel.
    pub fn pop_unsent(&mut self) -> Option<([u8; N], OwnedFd)> {
        if self.fds.is_empty() {
            return None;
        }
        Some((self.payloads.remove(0), self.fds.remove(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socketpair_seqpacket;
    use std::os::fd::AsFd;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [-1; 2];
        // SAFETY: fds is valid storage for two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 returned two new fds.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn write_all(fd: BorrowedFd<'_>, data: &[u8]) {
        // SAFETY: data is a valid buffer.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n as usize, data.len());
    }

    fn read_some(fd: BorrowedFd<'_>) -> Vec<u8> {
        let mut buf = [0u8; 64];
        // SAFETY: buf is a valid buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        buf[..n as usize].to_vec()
    }

    #[test]
    fn passes_one_fd_and_payload() {
        let (a, b) = socketpair_seqpacket().unwrap();
        let (r, w) = pipe();
        sendmsg_fd(a.as_fd(), b"hello", w.as_fd()).unwrap();
        drop(w);
        let mut buf = [0u8; 16];
        let got = recvmsg_fd(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert!(!got.truncated);
        let passed = got.fd.expect("an fd");
        // SAFETY: F_GETFD on an open fd.
        let flags = unsafe { libc::fcntl(passed.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds are close-on-exec"
        );
        write_all(passed.as_fd(), b"x");
        assert_eq!(read_some(r.as_fd()), b"x");
    }

    #[test]
    fn batch_sends_in_order_and_reports_would_block() {
        let (a, b) = socketpair_seqpacket().unwrap();
        // A small send buffer makes the channel fill up after a few messages.
        crate::setsockopt_int(a.as_fd(), libc::SO_SNDBUF, 4096).unwrap();
        let mut batch = SendBatch::<4>::with_capacity(256);
        let mut readers = Vec::new();
        for i in 0..256u32 {
            let (r, w) = pipe();
            readers.push(r);
            batch.push(i.to_le_bytes(), w).unwrap();
        }
        let sent = batch.send(a.as_fd(), 1).unwrap();
        assert!(sent > 0 && sent < 256, "sent {sent}");
        assert_eq!(batch.len(), 256 - sent);
        // The first unsent one is next in order.
        let (payload, _fd) = batch.pop_unsent().unwrap();
        assert_eq!(u32::from_le_bytes(payload) as usize, sent);
        for (i, reader) in readers.iter().enumerate().take(sent) {
            let mut buf = [0u8; 4];
            let got = recvmsg_fd(b.as_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap();
            assert_eq!(u32::from_le_bytes(buf) as usize, i);
            write_all(got.fd.unwrap().as_fd(), b"y");
            assert_eq!(read_some(reader.as_fd()), b"y");
        }
        let mut buf = [0u8; 4];
        let err = recvmsg_fd(b.as_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // Full again? Now everything left fits after draining.
        let err = {
            let mut full = SendBatch::<4>::with_capacity(1);
            let (_r, w) = pipe();
            full.push([0; 4], w).unwrap();
            // Fill the channel until EAGAIN.
            loop {
                let (_r2, w2) = pipe();
                if let Err(e) = sendmsg_fd(a.as_fd(), &[0; 4], w2.as_fd()) {
                    break (e, full);
                }
            }
        };
        assert_eq!(err.0.kind(), io::ErrorKind::WouldBlock);
        let mut full = err.1;
        assert_eq!(
            full.send(a.as_fd(), 1).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(full.len(), 1, "nothing lost when the channel is full");
    }

    #[test]
    fn batch_groups_fds_into_messages() {
        let (a, b) = socketpair_seqpacket().unwrap();
        let mut batch = SendBatch::<4>::with_capacity(64);
        let mut readers = Vec::new();
        for i in 0..10u32 {
            let (r, w) = pipe();
            readers.push(r);
            batch.push(i.to_le_bytes(), w).unwrap();
        }
        assert_eq!(batch.send(a.as_fd(), 4).unwrap(), 10);
        // Messages of 4, 4 and 2 fds, each with its first item's payload, fds in order.
        let mut next = 0usize;
        for want in [4, 4, 2] {
            let mut buf = [0u8; 4];
            let mut fds = Vec::new();
            let got = recvmsg_fds(b.as_fd(), &mut buf, libc::MSG_DONTWAIT, &mut fds).unwrap();
            assert_eq!(got.len, 4);
            assert_eq!(u32::from_le_bytes(buf) as usize, next);
            assert_eq!(fds.len(), want);
            for fd in fds {
                write_all(fd.as_fd(), b"z");
                assert_eq!(read_some(readers[next].as_fd()), b"z");
                next += 1;
            }
        }
        // One fd per message when the receiver allows only one; the extra-fd check still works.
        let (r, w) = pipe();
        batch.push(7u32.to_le_bytes(), w).unwrap();
        let (_r2, w2) = pipe();
        batch.push(8u32.to_le_bytes(), w2).unwrap();
        assert_eq!(batch.send(a.as_fd(), 1).unwrap(), 2);
        let mut buf = [0u8; 4];
        let one = recvmsg_fd(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(one.extra_fds, 0);
        write_all(one.fd.unwrap().as_fd(), b"q");
        assert_eq!(read_some(r.as_fd()), b"q");
    }

    #[test]
    fn unread_fds_can_be_reclaimed_from_the_receiving_end() {
        // The master keeps the worker's end; after the worker dies it reads back what is queued.
        let (master, worker_end) = socketpair_seqpacket().unwrap();
        let (_r, w) = pipe();
        sendmsg_fd(master.as_fd(), b"conn", w.as_fd()).unwrap();
        let dup = worker_end.try_clone().unwrap();
        drop(worker_end);
        let mut buf = [0u8; 8];
        let got = recvmsg_fd(dup.as_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap();
        assert!(got.fd.is_some());
    }
}
