//! Network namespace identity: the kernel's netns cookie, as the eBPF programs see it.
use std::{io, os::fd::AsRawFd as _, path::Path};

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netns cookie of the namespace at `path` (a /run/netns file or /proc/PID/ns/net).
/// Found by entering it on a short-lived thread and asking a socket there (SO_NETNS_COOKIE).
pub fn cookie_of_path(path: &Path) -> io::Result<u64> {
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only; the thread ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::EINVAL) {
                    io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace")
                } else {
                    e
                });
            }
            current_cookie()
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    // SAFETY: plain socket syscalls on a fd we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_cookie_is_stable_and_not_a_file_netns() {
        let a = cookie_of_path(Path::new("/proc/self/ns/net"))
            .expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        assert_eq!(a, current_cookie().unwrap());
        assert_ne!(a, 0);
        let err = cookie_of_path(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(cookie_of_path(Path::new("/nonexistent/netns")).is_err());
    }
}
