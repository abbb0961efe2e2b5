//! Creating the master's listening sockets: one per `--listen` address in dispatch and shared
//! modes, one per (worker slot, address) in reuseport mode. All are created close-on-exec with
//! a backlog of `net.core.somaxconn` (std's `TcpListener` uses 128), and are owned by the master
//! for its whole life so a worker's death never closes one and never resets its queue.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `/proc/sys/net/core/somaxconn`, or 4096 (the kernel default since 5.4) if unreadable.
pub fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Parses a `--listen` value: `HOST:PORT`, `[V6]:PORT`, a bare `PORT` (meaning 127.0.0.1), or
/// `:PORT` (every address: `[::]:PORT`, dual-stack, or `0.0.0.0:PORT` on a host without
/// IPv6). Host names are resolved once, first address wins.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("invalid listen address '{text}': expected :PORT"))?;
        return Ok(if host_has_ipv6() {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        });
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !text.contains(':') {
        return Err(format!(
            "invalid listen address '{text}': expected HOST:PORT"
        ));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("listen address '{text}' resolves to nothing")),
        Err(e) => Err(format!("invalid listen address '{text}': {e}")),
    }
}

/// Whether this host can open IPv6 sockets (a container may have IPv6 disabled).
fn host_has_ipv6() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).is_ok()
}

/// Whether `addr` is bound dual-stack: the IPv6 wildcard `[::]` also takes IPv4 connections,
/// as node's `listen(port)` does; every other IPv6 address is v6-only.
pub fn is_dual_stack(addr: SocketAddr) -> bool {
    addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
}

/// Binds one listening TCP socket. `reuseport` sets `SO_REUSEPORT` so several sockets can share
/// the port (reuseport mode); `SO_REUSEADDR` is always set so a restart does not wait for
/// TIME_WAIT. `[::]` is dual-stack ([`is_dual_stack`]); other IPv6 addresses are v6-only.
pub fn bind_listener(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(!is_dual_stack(addr))?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(somaxconn())?;
    Ok(socket)
}

/// The address a bound socket ended up on (the real port when asked for port 0).
pub fn local_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an inet socket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_forms() {
        assert_eq!(
            parse_listen_addr("8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            parse_listen_addr("[::1]:0").unwrap(),
            "[::1]:0".parse().unwrap()
        );
        assert!(
            parse_listen_addr("localhost:80")
                .unwrap()
                .ip()
                .is_loopback()
        );
        let any = parse_listen_addr(":8080").unwrap();
        assert!(any.ip().is_unspecified() && any.port() == 8080, "{any}");
        assert!(parse_listen_addr(":x").is_err());
        let err = parse_listen_addr("nonsense").unwrap_err();
        assert!(err.contains("nonsense"), "{err}");
        assert!(parse_listen_addr("1.2.3.4:99999").is_err());
    }

    #[test]
    fn reuseport_sockets_share_a_port() {
        let first = bind_listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = local_addr(&first).unwrap();
        assert_ne!(addr.port(), 0);
        let second = bind_listener(addr, true).unwrap();
        assert_eq!(local_addr(&second).unwrap(), addr);
        // Without SO_REUSEPORT the port is taken.
        let err = bind_listener(addr, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn ipv6_wildcard_is_dual_stack() {
        if !host_has_ipv6() {
            eprintln!("note: no IPv6 on this host; skipped");
            return;
        }
        let socket = bind_listener("[::]:0".parse().unwrap(), false).unwrap();
        let port = local_addr(&socket).unwrap().port();
        // An IPv4 client reaches the [::] listener.
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (conn, peer) = socket.accept().unwrap();
        drop((client, conn));
        let peer = peer.as_socket().unwrap();
        assert!(
            matches!(peer.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()),
            "{peer}"
        );
    }
}
