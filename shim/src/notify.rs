//! `READY=1` on `NOTIFY_SOCKET` (the sd_notify(3) convention), sent once every listener is
//! listening, so masters that wait for that signal see unmodified servers become ready. The
//! dispatch channel's READY message is sent independently of this (listener.rs).

use std::mem;

/// Where `NOTIFY_SOCKET` points: a filesystem path, or an abstract name given as `@name`.
pub struct NotifyTarget {
    addr: libc::sockaddr_un,
    len: libc::socklen_t,
}

impl NotifyTarget {
    /// Parses the variable's value; `None` if it is not a unix socket address that fits.
    pub fn parse(value: &[u8]) -> Option<NotifyTarget> {
        // SAFETY: sockaddr_un is plain data; zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let (first, rest) = value.split_first()?;
        let path: Vec<u8> = match first {
            b'/' => value.to_vec(),
            // unix(7): an abstract address starts with a NUL byte instead of '@'.
            b'@' => std::iter::once(0).chain(rest.iter().copied()).collect(),
            _ => return None,
        };
        // Leave room for a terminating NUL for path names.
        if path.len() >= addr.sun_path.len() {
            return None;
        }
        for (dst, src) in addr.sun_path.iter_mut().zip(&path) {
            *dst = *src as libc::c_char;
        }
        let len = mem::size_of::<libc::sa_family_t>() + path.len() + usize::from(*first == b'/');
        Some(NotifyTarget {
            addr,
            len: len as libc::socklen_t,
        })
    }

    /// Sends `READY=1`. Best effort: the master also learns readiness from the channel, or
    /// from its configured start delay.
    pub fn send_ready(&self) {
        self.send(b"READY=1");
    }

    /// Sends `STOPPING=1`: the server closed a listener (reuseport and shared modes, where there
    /// is no channel to say it on). Best effort, like READY.
    pub fn send_stopping(&self) {
        self.send(b"STOPPING=1");
    }

    fn send(&self, msg: &[u8]) {
        // SAFETY: plain socket creation; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return;
        }
        // SAFETY: msg and addr are valid for the lengths given; fd is our own socket, closed
        // with the real close (it was never handed out, so no bookkeeping is needed).
        unsafe {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_NOSIGNAL,
                (&raw const self.addr).cast(),
                self.len,
            );
            crate::real::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_abstract_names() {
        let t = NotifyTarget::parse(b"/run/x.sock").unwrap();
        assert_eq!(t.len as usize, 2 + 11 + 1);
        let t = NotifyTarget::parse(b"@abc").unwrap();
        assert_eq!(t.addr.sun_path[0], 0);
        assert_eq!(t.len as usize, 2 + 4);
        assert!(NotifyTarget::parse(b"relative").is_none());
        assert!(NotifyTarget::parse(b"").is_none());
        assert!(NotifyTarget::parse(&[b'/'; 200]).is_none());
    }
}
