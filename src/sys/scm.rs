//! Passing one fd per message over a unix socket with `SCM_RIGHTS` (unix(7), cmsg(3)): single
//! `sendmsg`/`recvmsg`, and a `sendmmsg(2)` batch for the acceptor's hot path.
//!
//! Pitfalls handled here, measured on the target kernel: a control buffer too small for what
//! arrives sets `MSG_CTRUNC` and the kernel closes the fds that did not fit, so the receive
//! buffer has room for several fds and any extra ones are closed and reported; received fds are
//! not close-on-exec unless `MSG_CMSG_CLOEXEC` is passed, so it always is.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::syscall;

/// Bytes of control buffer for one `SCM_RIGHTS` message with one fd (`CMSG_SPACE(4)` is 24 on
/// 64-bit Linux); 32 keeps headroom and alignment.
const CMSG_ONE_FD_LEN: usize = 32;
/// A receive buffer for up to this many fds, so a misbehaving peer sending several is detected
/// instead of silently truncated.
const RECV_MAX_FDS: usize = 8;

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgOneFd([u8; CMSG_ONE_FD_LEN]);

#[repr(C, align(8))]
struct CmsgRecv([u8; 16 + 8 * RECV_MAX_FDS]);

fn cmsg_space_one_fd() -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) as usize }
}

/// Fills `cmsg` with an `SCM_RIGHTS` header carrying `fd`; returns the control length.
fn write_cmsg_one_fd(msg: &mut libc::msghdr, fd: RawFd) {
    // SAFETY: msg.msg_control points to a CmsgOneFd buffer of msg_controllen ≥ CMSG_SPACE(4)
    // bytes, 8-aligned, so CMSG_FIRSTHDR is non-null and its data area holds one int.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
}

/// Sends `data` with `fd` attached as one message. `MSG_NOSIGNAL` so a dead peer is `EPIPE`
/// rather than a SIGPIPE; `MSG_DONTWAIT` so a full channel is `EAGAIN` whatever the fd's mode.
pub fn sendmsg_fd(chan: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let mut cmsg = CmsgOneFd([0; CMSG_ONE_FD_LEN]);
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space_one_fd() as _;
    write_cmsg_one_fd(&mut msg, fd.as_raw_fd());
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

/// Receives one message and at most one fd. `flags` may add `MSG_DONTWAIT`.
pub fn recvmsg_fd(
    chan: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgRecv([0; 16 + 8 * RECV_MAX_FDS]);
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
    let mut fds: Vec<OwnedFd> = Vec::new();
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
        // The kernel closed the fds that did not fit; what we did get is closed by drop.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control data truncated (MSG_CTRUNC): too many fds in one message",
        ));
    }
    let extra_fds = fds.len().saturating_sub(1);
    fds.truncate(1);
    Ok(Received {
        len: n as usize,
        fd: fds.pop(),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        extra_fds,
    })
}

/// A batch of (payload, fd) messages for one channel, sent with one `sendmmsg(2)`. Capacity is
/// fixed at construction so pushing and sending never allocate on the hot path. The fd of each
/// message sent is closed (the receiver holds its own reference from then on); messages that did
/// not fit are handed back by [`SendBatch::pop_unsent`] for dispatch elsewhere.
pub struct SendBatch<const N: usize> {
    payloads: Vec<[u8; N]>,
    fds: Vec<OwnedFd>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgOneFd>,
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
            cmsgs: vec![CmsgOneFd([0; CMSG_ONE_FD_LEN]); capacity],
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

    /// Sends as many queued messages as the channel takes, in order, with one `sendmmsg`.
    /// Returns how many were sent (their fds are closed here). `Err(WouldBlock)` means the
    /// channel took none; other errors (`EPIPE`: the worker's end is gone) likewise sent none.
    pub fn send(&mut self, chan: BorrowedFd<'_>) -> io::Result<usize> {
        let count = self.fds.len();
        if count == 0 {
            return Ok(0);
        }
        let control_len = cmsg_space_one_fd();
        for i in 0..count {
            self.iovs[i] = libc::iovec {
                iov_base: self.payloads[i].as_mut_ptr().cast(),
                iov_len: N,
            };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = std::ptr::null_mut();
            hdr.msg_namelen = 0;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[i].0.as_mut_ptr().cast();
            hdr.msg_controllen = control_len as _;
            hdr.msg_flags = 0;
            write_cmsg_one_fd(hdr, self.fds[i].as_raw_fd());
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: hdrs[..count] point at iovs/payloads/cmsgs entries owned by self that are not
        // touched until the call returns.
        let sent = syscall!(sendmmsg(
            chan.as_raw_fd(),
            self.hdrs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT
        ))? as usize;
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
    use crate::sys::socketpair_seqpacket;
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
        crate::sys::setsockopt_int(a.as_fd(), libc::SO_SNDBUF, 4096).unwrap();
        let mut batch = SendBatch::<4>::with_capacity(256);
        let mut readers = Vec::new();
        for i in 0..256u32 {
            let (r, w) = pipe();
            readers.push(r);
            batch.push(i.to_le_bytes(), w).unwrap();
        }
        let sent = batch.send(a.as_fd()).unwrap();
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
            full.send(a.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(full.len(), 1, "nothing lost when the channel is full");
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
