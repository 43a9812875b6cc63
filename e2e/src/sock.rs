//! Small IPv4 socket helpers std lacks: listen with a big backlog, connect from a fixed local
//! address (`SO_REUSEADDR`), and read the pre-NAT destination of a REDIRECTed connection.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn to_sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr = libc::in_addr {
        s_addr: u32::from(*addr.ip()).to_be(),
    };
    sa
}

fn from_sockaddr(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value outlives the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

fn bind(fd: RawFd, addr: SocketAddrV4) -> io::Result<()> {
    let sa = to_sockaddr(addr);
    // SAFETY: sa is a valid sockaddr_in and its size is passed.
    cvt(unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as _,
        )
    })?;
    Ok(())
}

/// A listening socket on `addr` with `SO_REUSEADDR` and the given backlog.
pub fn listen(addr: SocketAddrV4, backlog: i32) -> io::Result<TcpListener> {
    let fd = tcp_socket()?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    bind(fd.as_raw_fd(), addr)?;
    // SAFETY: plain syscall on a socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(TcpListener::from(fd))
}

/// [`listen`] with `SO_REUSEPORT` too: several processes share the port, the kernel spreads
/// the connections over them (each holds its part: one process's descriptors are limited).
pub fn listen_reuseport(addr: SocketAddrV4, backlog: i32) -> io::Result<TcpListener> {
    let fd = tcp_socket()?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    bind(fd.as_raw_fd(), addr)?;
    // SAFETY: plain syscall on a socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(TcpListener::from(fd))
}

/// Connects to `to`, first binding to `from` (with `SO_REUSEADDR`) when given.
pub fn connect(to: SocketAddrV4, from: Option<SocketAddrV4>) -> io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(to);
    };
    let fd = tcp_socket()?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    bind(fd.as_raw_fd(), from)?;
    connect_bound(fd, to)
}

/// Connects the bound socket `fd` to `to` (blocking).
fn connect_bound(fd: OwnedFd, to: SocketAddrV4) -> io::Result<TcpStream> {
    connect_blocking(fd.as_raw_fd(), to.into())?;
    Ok(TcpStream::from(fd))
}

/// A blocking `connect(2)`. A signal that interrupts it does not stop the handshake: calling
/// `connect` again would answer `EALREADY`, so it waits until the socket is writable and takes
/// the handshake's result from `SO_ERROR`.
fn connect_blocking(fd: RawFd, to: std::net::SocketAddr) -> io::Result<()> {
    match connect_once(fd, to) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => finish_connect(fd),
        r => r,
    }
}

/// One `connect(2)` call.
fn connect_once(fd: RawFd, to: std::net::SocketAddr) -> io::Result<()> {
    let (ss, len) = to_storage(to);
    // SAFETY: ss holds a valid sockaddr of length len.
    cvt(unsafe { libc::connect(fd, (&raw const ss).cast(), len) })?;
    Ok(())
}

/// Waits for a handshake already under way and returns its outcome.
fn finish_connect(fd: RawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd we own; poll only reads the descriptor's state.
    while let Err(e) = cvt(unsafe { libc::poll(&mut pfd, 1, -1) }) {
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err/len are valid for writes and len holds err's size.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    match err {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Connects to `to` from the local address `from` with the port left to `connect`
/// (`IP_BIND_ADDRESS_NO_PORT`): the kernel then picks a port free for this 4-tuple, not one free
/// for every destination, so each local address gives a full ephemeral range per destination.
pub fn connect_from_ip(to: SocketAddrV4, from: Ipv4Addr) -> io::Result<TcpStream> {
    let fd = tcp_socket()?;
    set_int(
        fd.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1,
    )?;
    bind(fd.as_raw_fd(), SocketAddrV4::new(from, 0))?;
    connect_bound(fd, to)
}

/// The destination the peer originally connected to, before a netfilter REDIRECT/DNAT
/// (`getsockopt(SOL_IP, SO_ORIGINAL_DST)`). `ENOENT` when the connection was not NATed.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sa/len are valid for writes and len holds sa's size.
    cvt(unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    })?;
    Ok(from_sockaddr(&sa))
}

// ---------------------------------------------------------------------------------------------
// IPv4 and IPv6 (the dual-stack relay and the soak tools)

/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h), at `SOL_IPV6`.
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

fn to_storage(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    match addr {
        std::net::SocketAddr::V4(a) => {
            let sa = to_sockaddr(a);
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sa) };
            (ss, size_of::<libc::sockaddr_in>() as _)
        }
        std::net::SocketAddr::V6(a) => {
            // SAFETY: sockaddr_in6 is plain data.
            let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sa.sin6_scope_id = a.scope_id();
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sa) };
            (ss, size_of::<libc::sockaddr_in6>() as _)
        }
    }
}

fn tcp_socket_for(addr: &std::net::SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind_any(fd: RawFd, addr: std::net::SocketAddr) -> io::Result<()> {
    let (ss, len) = to_storage(addr);
    // SAFETY: ss holds a valid sockaddr of length len.
    cvt(unsafe { libc::bind(fd, (&raw const ss).cast(), len) })?;
    Ok(())
}

/// [`listen`] for IPv4 or IPv6. An IPv6 listener is `IPV6_V6ONLY` unless `dual_stack` (then an
/// IPv4 client appears as a v4-mapped address `::ffff:a.b.c.d`, as on a dual-stack Envoy).
pub fn listen_any(
    addr: std::net::SocketAddr,
    backlog: i32,
    dual_stack: bool,
) -> io::Result<TcpListener> {
    let fd = tcp_socket_for(&addr)?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        set_int(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (!dual_stack).into(),
        )?;
    }
    bind_any(fd.as_raw_fd(), addr)?;
    // SAFETY: plain syscall on a socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(TcpListener::from(fd))
}

/// [`connect`] for IPv4 or IPv6.
pub fn connect_any(
    to: std::net::SocketAddr,
    from: Option<std::net::SocketAddr>,
) -> io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(to);
    };
    let fd = tcp_socket_for(&to)?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    bind_any(fd.as_raw_fd(), from)?;
    connect_blocking(fd.as_raw_fd(), to)?;
    Ok(TcpStream::from(fd))
}

/// [`original_dst`] for IPv4 or IPv6 connections: `IP6T_SO_ORIGINAL_DST` at `SOL_IPV6` for an
/// IPv6 connection, `SO_ORIGINAL_DST` at `SOL_IP` for IPv4 (also on an IPv6 socket whose peer is
/// v4-mapped: the result is then that IPv4 address).
pub fn original_dst_any(stream: &TcpStream) -> io::Result<std::net::SocketAddr> {
    let v4 = match stream.local_addr()? {
        std::net::SocketAddr::V4(_) => true,
        std::net::SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        return original_dst(stream).map(Into::into);
    }
    // SAFETY: sockaddr_in6 is plain data.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: sa/len are valid for writes and len holds sa's size.
    cvt(unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            (&raw mut sa).cast(),
            &mut len,
        )
    })?;
    Ok(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr),
        u16::from_be(sa.sin6_port),
        sa.sin6_flowinfo,
        sa.sin6_scope_id,
    )))
}

/// Sets `SO_LINGER {on, 0}`: the next close() sends a RST instead of a FIN.
pub fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: l outlives the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Reads like an event loop: `poll` for readability until `deadline` (then `TimedOut`; None: no
/// deadline), then a non-blocking `recv` (`MSG_DONTWAIT`), again while that answers EAGAIN (what
/// a non-blocking read answers when nothing is there). The tools read this way so that their
/// sockets may be accelerated as a trusted workload's (`appSockets: trusted`): a non-blocking
/// read never waits inside the kernel's sockmap receive path, whose blocking reads can fail
/// with EAGAIN (kernel hazard 4). EINTR is retried, as an event loop does. (Poll first: a
/// request/response reader usually arrives before the data, and then this costs two calls.)
pub fn read_ready(
    stream: &impl AsRawFd,
    buf: &mut [u8],
    deadline: Option<std::time::Instant>,
) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"));
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue; // the deadline check above ends it
        }
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake started without waiting (as one a signal interrupted goes on), then
    /// finished by `finish_connect`: its outcome, success or refusal, is the handshake's.
    fn started(to: SocketAddrV4) -> OwnedFd {
        let fd = tcp_socket().unwrap();
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if let Err(e) = connect_once(fd.as_raw_fd(), to.into()) {
            assert_eq!(e.raw_os_error(), Some(libc::EINPROGRESS), "{e}");
        }
        fd
    }

    #[test]
    fn a_handshake_under_way_is_finished_with_its_outcome() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(open) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let fd = started(open);
        finish_connect(fd.as_raw_fd()).unwrap();
        let (_, from) = listener.accept().unwrap();
        assert_eq!(
            TcpStream::from(fd).local_addr().unwrap(),
            from,
            "the accepted connection is this socket's"
        );

        drop(listener); // nothing listens there any more
        let err = finish_connect(started(open).as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }
}
