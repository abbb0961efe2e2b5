//! Creating the master's listening sockets: one per `--listen` address in dispatch and shared
//! modes, one per (worker slot, address) in reuseport mode. All are created close-on-exec with
//! a backlog of `net.core.somaxconn` (std's `TcpListener` uses 128), and are owned by the master
//! for its whole life so a worker's death never closes one and never resets its queue.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `/proc/sys/net/core/somaxconn`, or 4096 (the kernel default since 5.4) if unreadable.
pub fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Parses a `--listen` value: `HOST:PORT`, `[V6]:PORT`, or a bare `PORT` (meaning 127.0.0.1).
/// Host names are resolved once, first address wins.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
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

/// Binds one listening TCP socket. `reuseport` sets `SO_REUSEPORT` so several sockets can share
/// the port (reuseport mode); `SO_REUSEADDR` is always set so a restart does not wait for
/// TIME_WAIT. IPv6 sockets are v6-only so `[::]:P` and `0.0.0.0:P` can both be listed.
pub fn bind_listener(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
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
}
