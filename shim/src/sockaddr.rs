//! Conversions between C `sockaddr` buffers and `SocketAddr`, and the rule deciding which
//! `bind` address stands for which rcluster listener.

use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::{sockaddr, sockaddr_in, sockaddr_in6, socklen_t};

/// Reads an IPv4/IPv6 address passed to `bind`; `None` for other families or short buffers.
///
/// # Safety
/// `addr` must be null or point to `len` readable bytes.
pub unsafe fn read(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); unaligned because the
    // caller's buffer need not be aligned.
    let family = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) };
    match c_int_of(family) {
        libc::AF_INET if len as usize >= mem::size_of::<sockaddr_in>() => {
            // SAFETY: the buffer holds a whole sockaddr_in (length checked).
            let sin = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= mem::size_of::<sockaddr_in6>() => {
            // SAFETY: the buffer holds a whole sockaddr_in6 (length checked).
            let sin6 = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn c_int_of(family: libc::sa_family_t) -> libc::c_int {
    libc::c_int::from(family)
}

/// A `sockaddr_storage` holding `sa`, and its meaningful length.
pub fn to_storage(sa: &SocketAddr) -> (libc::sockaddr_storage, socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(v4) => {
            // SAFETY: plain data, zero is valid.
            let mut sin: sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast::<sockaddr_in>(), sin) };
            mem::size_of::<sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: plain data, zero is valid.
            let mut sin6: sockaddr_in6 = unsafe { mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<sockaddr_in6>(), sin6) };
            mem::size_of::<sockaddr_in6>()
        }
    };
    (storage, len as socklen_t)
}

/// Writes `sa` the way the kernel fills an address result (accept(2), getsockname(2)): at most
/// `*len` bytes are copied (silently truncated), and `*len` is set to the full size.
///
/// # Safety
/// `len` must be null or valid for reads and writes; if not null, `addr` must be valid for
/// `*len` bytes of writes.
pub unsafe fn write(sa: &SocketAddr, addr: *mut sockaddr, len: *mut socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let (storage, full) = to_storage(sa);
    // SAFETY: len is valid (caller contract, checked non-null).
    let room = unsafe { *len } as usize;
    let n = room.min(full as usize);
    // SAFETY: storage has `full` ≥ n initialised bytes; addr has room for `room` ≥ n bytes.
    unsafe {
        std::ptr::copy_nonoverlapping((&raw const storage).cast::<u8>(), addr.cast::<u8>(), n);
        *len = full;
    }
}

/// The unspecified address of `sa`'s family, port 0: what `accept` reports when the peer is
/// already gone and `getpeername` fails, so servers that format the peer address keep working.
pub fn unspecified_like(sa: &SocketAddr) -> SocketAddr {
    match sa {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a server's `bind(bound)` asks for the rcluster listener at `listener`: same port, and
/// either address unspecified (`0.0.0.0`/`::` — node binds `::` by default) or the same address
/// (an IPv4-mapped IPv6 address counts as its IPv4 address). Port 0 never matches.
pub fn claims(listener: &SocketAddr, bound: &SocketAddr) -> bool {
    if listener.port() == 0 || listener.port() != bound.port() {
        return false;
    }
    let (l, b) = (canonical(listener.ip()), canonical(bound.ip()));
    b.is_unspecified() || l.is_unspecified() || l == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn claim_rule() {
        let l = sa("127.0.0.1:8080");
        assert!(claims(&l, &sa("127.0.0.1:8080")));
        assert!(claims(&l, &sa("0.0.0.0:8080")));
        assert!(claims(&l, &sa("[::]:8080")));
        assert!(claims(&l, &sa("[::ffff:127.0.0.1]:8080")));
        assert!(!claims(&l, &sa("127.0.0.1:8081")));
        assert!(!claims(&l, &sa("10.0.0.1:8080")));
        assert!(!claims(&l, &sa("[::1]:8080")));
        assert!(claims(&sa("0.0.0.0:9000"), &sa("10.0.0.1:9000")));
        assert!(claims(&sa("[::1]:9000"), &sa("[::1]:9000")));
        assert!(!claims(&sa("0.0.0.0:0"), &sa("0.0.0.0:0")));
    }

    #[test]
    fn write_then_read_round_trips_and_truncates() {
        for s in ["127.0.0.1:8080", "[::1]:9000"] {
            let a = sa(s);
            // SAFETY: plain data, zero is valid.
            let mut st: libc::sockaddr_storage = unsafe { mem::zeroed() };
            let mut len = mem::size_of_val(&st) as socklen_t;
            let p = (&raw mut st).cast::<sockaddr>();
            // SAFETY: st and len are valid for the sizes given.
            let back = unsafe {
                write(&a, p, &mut len);
                read(p, len)
            };
            assert_eq!(back, Some(a));
        }
        let mut small = [0xffu8; 4];
        let mut len: socklen_t = 4;
        // SAFETY: small has room for 4 bytes, len says 4.
        unsafe { write(&sa("127.0.0.1:1"), small.as_mut_ptr().cast(), &mut len) };
        assert_eq!(len as usize, mem::size_of::<sockaddr_in>());
        assert_eq!(&small[..2], &(libc::AF_INET as u16).to_ne_bytes());
        assert_eq!(&small[2..4], &1u16.to_be_bytes());
    }
}
