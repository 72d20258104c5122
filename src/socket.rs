//! Socket set-up for the data plane: listeners, upstream connects, marks and original destinations.
//!
//! Input: addresses, the packet mark and transparency settings from config. Output: tokio sockets ready to
//! use. Every socket created here carries the packet mark so the capture rules never loop proxy traffic back
//! into the proxy. All system calls go through `socket2`'s safe API; there is no `unsafe` here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::Keepalive;
use crate::netns::InpodNetns;

/// Listen backlog: deep enough for connection bursts while the accept loop catches up.
const LISTEN_BACKLOG: i32 = 1024;

/// Options common to the proxy's sockets.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOpts {
    /// SO_MARK value, when set.
    pub mark: Option<u32>,
    /// IP_TRANSPARENT on listeners and upstream sockets (to accept TPROXY traffic and spoof sources).
    pub transparent: bool,
    /// SO_REUSEPORT on listeners, so a new proxy can bind while an old one drains.
    pub reuse_port: bool,
}

/// Binds a TCP listener. `[::]` is bound dual-stack; if IPv6 is unavailable it falls back to `0.0.0.0`.
pub fn listen(addr: SocketAddr, opts: SocketOpts) -> io::Result<TcpListener> {
    listen_in(None, addr, opts)
}

/// Binds a TCP listener in a pod's network namespace (or the current one when `netns` is `None`).
pub fn listen_in(
    netns: Option<&InpodNetns>,
    addr: SocketAddr,
    opts: SocketOpts,
) -> io::Result<TcpListener> {
    match listen_once(netns, addr, opts) {
        Err(e) if addr.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) && is_no_ipv6(&e) => {
            listen_once(netns, SocketAddr::from(([0, 0, 0, 0], addr.port())), opts)
        }
        other => other,
    }
}

/// A new non-blocking TCP socket, created inside `netns` when given (a socket belongs to the namespace it
/// was created in; binding and connecting afterwards need no further switching).
fn new_socket(netns: Option<&InpodNetns>, domain: Domain) -> io::Result<Socket> {
    new_socket_of(netns, domain, Type::STREAM, Protocol::TCP)
}

fn new_socket_of(
    netns: Option<&InpodNetns>,
    domain: Domain,
    ty: Type,
    proto: Protocol,
) -> io::Result<Socket> {
    let make = || Socket::new(domain, ty.nonblocking(), Some(proto));
    match netns {
        None => make(),
        Some(ns) => ns.run(make)?,
    }
}

/// Binds a UDP socket at `addr` in a pod's network namespace (or the current one).
pub fn udp_bind_in(
    netns: Option<&InpodNetns>,
    addr: SocketAddr,
    opts: SocketOpts,
) -> io::Result<tokio::net::UdpSocket> {
    let socket = new_socket_of(netns, Domain::for_address(addr), Type::DGRAM, Protocol::UDP)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    apply_common(&socket, addr, opts)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// A UDP socket on a random local port, connected to `dst` (so only `dst`'s datagrams are received), with
/// the proxy's mark, created in a pod's network namespace when given.
pub fn udp_connected(
    netns: Option<&InpodNetns>,
    dst: SocketAddr,
    opts: SocketOpts,
) -> io::Result<tokio::net::UdpSocket> {
    let socket = new_socket_of(netns, Domain::for_address(dst), Type::DGRAM, Protocol::UDP)?;
    apply_common(&socket, dst, opts)?;
    socket.connect(&dst.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

fn is_no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_codes::EAFNOSUPPORT) | Some(libc_codes::EADDRNOTAVAIL)
    )
}

/// errno values we branch on (Linux).
mod libc_codes {
    pub(super) const EAFNOSUPPORT: i32 = 97;
    pub(super) const EADDRNOTAVAIL: i32 = 99;
}

fn listen_once(
    netns: Option<&InpodNetns>,
    addr: SocketAddr,
    opts: SocketOpts,
) -> io::Result<TcpListener> {
    let socket = new_socket(netns, Domain::for_address(addr))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    apply_common(&socket, addr, opts)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

fn apply_common(socket: &Socket, addr: SocketAddr, opts: SocketOpts) -> io::Result<()> {
    if let Some(mark) = opts.mark {
        socket.set_mark(mark)?;
    }
    if opts.transparent {
        if addr.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_ip_transparent_v6(true)?;
        }
    }
    Ok(())
}

/// Opens a TCP connection to `dst` with the proxy's mark, optionally from `src` (which need not be a local
/// address when `opts.transparent` is set: that is how the client's address is kept towards applications).
/// With `netns`, the socket is created in that pod's network namespace (in-pod mode). `keepalive` is set
/// on the socket before it connects.
pub async fn connect(
    netns: Option<&InpodNetns>,
    dst: SocketAddr,
    src: Option<IpAddr>,
    opts: SocketOpts,
    keepalive: &Keepalive,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = new_socket(netns, Domain::for_address(dst))?;
    apply_common(&socket, dst, opts)?;
    set_keepalive(SockRef::from(&socket), keepalive)?;
    if let Some(src) = src {
        let src = match (src, dst) {
            (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (s, _) => s,
        };
        if src.is_ipv4() {
            socket.set_freebind_v4(true)?;
        } else {
            socket.set_freebind_v6(true)?;
        }
        socket.bind(&SocketAddr::new(src, 0).into())?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The destination a redirected connection was originally addressed to (`SO_ORIGINAL_DST`, IPv4 then
/// IPv6). Falls back to the local address when the connection was not redirected (e.g. TPROXY).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let found = sock
        .original_dst_v4()
        .ok()
        .and_then(|a| a.as_socket())
        .or_else(|| sock.original_dst_v6().ok().and_then(|a| a.as_socket()));
    match found {
        Some(a) => Ok(canonical(a)),
        None => stream.local_addr().map(canonical),
    }
}

/// Turns IPv4-mapped IPv6 addresses (seen on dual-stack sockets) back into IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Per-accepted-socket set-up: no Nagle delay (the proxy forwards whatever it reads at once).
pub fn accepted(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// TCP keepalive (and TCP_USER_TIMEOUT when asked for) on an accepted connection, as ztunnel sets them on
/// the connections its capture listeners accept.
pub fn keepalive(stream: &TcpStream, keepalive: &Keepalive) -> io::Result<()> {
    set_keepalive(SockRef::from(stream), keepalive)
}

fn set_keepalive(sock: SockRef<'_>, ka: &Keepalive) -> io::Result<()> {
    if ka.enabled {
        let params = socket2::TcpKeepalive::new()
            .with_time(ka.time)
            .with_interval(ka.interval)
            .with_retries(ka.retries);
        sock.set_tcp_keepalive(&params)?;
    }
    if let Some(t) = ka.user_timeout() {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

/// Makes closing `stream` send a TCP reset instead of a FIN (SO_LINGER with a zero timeout, which does
/// not block), so a refused client sees "connection reset" at once.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Whether this process may set IP_TRANSPARENT (CAP_NET_ADMIN), tested on a throwaway socket.
pub fn can_be_transparent() -> bool {
    Socket::new(Domain::IPV4, Type::STREAM, None)
        .and_then(|s| s.set_ip_transparent_v4(true))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ka() -> Keepalive {
        Keepalive {
            enabled: true,
            time: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            retries: 4,
            user_timeout: true,
        }
    }

    #[tokio::test]
    async fn accepted_and_outgoing_sockets_carry_the_configured_keepalive() {
        let l = listen("127.0.0.1:0".parse().unwrap(), SocketOpts::default()).unwrap();
        let c = connect(
            None,
            l.local_addr().unwrap(),
            None,
            SocketOpts::default(),
            &ka(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let (s, _) = l.accept().await.unwrap();
        keepalive(&s, &ka()).unwrap();
        for stream in [&c, &s] {
            let sock = SockRef::from(stream);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(3)
            );
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
            // 7 s + 4 × 3 s.
            assert_eq!(
                sock.tcp_user_timeout().unwrap(),
                Some(Duration::from_secs(19))
            );
        }
        // Turned off: nothing set.
        let off = Keepalive {
            enabled: false,
            user_timeout: false,
            ..ka()
        };
        let c = connect(
            None,
            l.local_addr().unwrap(),
            None,
            SocketOpts::default(),
            &off,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert!(!SockRef::from(&c).keepalive().unwrap());
    }

    #[tokio::test]
    async fn connections_not_redirected_report_their_local_address() {
        let l = listen("127.0.0.1:0".parse().unwrap(), SocketOpts::default()).unwrap();
        let addr = l.local_addr().unwrap();
        let c = connect(
            None,
            addr,
            None,
            SocketOpts::default(),
            &ka(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(original_dst(&s).unwrap(), addr);
        drop(c);
    }

    #[tokio::test]
    async fn dual_stack_listener_accepts_ipv4() {
        let l = listen("[::]:0".parse().unwrap(), SocketOpts::default()).unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = connect(
            None,
            SocketAddr::from(([127, 0, 0, 1], port)),
            None,
            SocketOpts::default(),
            &ka(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let (s, peer) = l.accept().await.unwrap();
        assert!(canonical(peer).is_ipv4());
        assert_eq!(original_dst(&s).unwrap().ip(), IpAddr::from([127, 0, 0, 1]));
    }
}
