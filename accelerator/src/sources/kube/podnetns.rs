//! Pod IP → network namespace, found on the node itself.
//!
//! The API server knows a pod's IP but not its network namespace, and the kernel keys workloads
//! by netns cookie. Every pod netns on a node is reachable from the host in one of two ways:
//! - a bind mount under `/run/netns` (containerd and CRI-O pin each pod sandbox's netns there as
//!   `cni-<uuid>`; `ip netns add` does the same), and
//! - `/proc/<pid>/ns/net` of any process in the pod (the pause container at least).
//!
//! A scan lists both (deduplicated by the namespace's inode), enters each namespace once on one
//! short-lived thread (`setns`), and asks it for its cookie (`SO_NETNS_COOKIE`) and its interface
//! addresses (`getifaddrs`). The result is an index IP → netns cookies. Cookies are never reused
//! by the kernel (unlike inodes), so an index entry can go stale (the namespace died) but never
//! point to the wrong namespace of a *live* pod unless the IP itself moved: the controller
//! therefore rescans before it trusts a (pod, IP) it has not resolved before, and on every resync.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::debug;

use crate::netns::{ScanConfig, candidates, current_cookie};

/// What one scan found: IP → cookies of the namespaces holding it (more than one = ambiguous).
#[derive(Clone, Debug, Default)]
pub struct NetnsIndex {
    by_ip: BTreeMap<IpAddr, BTreeSet<u64>>,
    /// When the last scan started (a scan can only vouch for what existed then).
    pub scanned_at: Option<Instant>,
    pub last: ScanStats,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ScanStats {
    pub namespaces: usize,
    pub addresses: usize,
    pub took: Duration,
}

/// The answer for one IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(u64),
    Missing,
    /// The IP is on interfaces of several namespaces: refuse to guess.
    Ambiguous(Vec<u64>),
}

impl NetnsIndex {
    /// An index from known pairs (tests).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (IpAddr, u64)>) -> Self {
        let mut i = NetnsIndex::default();
        for (ip, c) in pairs {
            i.by_ip.entry(ip).or_default().insert(c);
        }
        i
    }

    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        match self.by_ip.get(&ip) {
            None => Lookup::Missing,
            Some(s) if s.len() == 1 => Lookup::Found(*s.iter().next().expect("one")),
            Some(s) => Lookup::Ambiguous(s.iter().copied().collect()),
        }
    }

    /// Replaces the index with a fresh scan of the node.
    pub fn rescan(&mut self, cfg: &ScanConfig) -> io::Result<()> {
        let started = Instant::now();
        let paths = candidates(cfg);
        let found = enter_all(&paths)?;
        self.by_ip.clear();
        let mut addresses = 0;
        for (cookie, ips) in &found {
            for ip in ips {
                addresses += 1;
                self.by_ip.entry(*ip).or_default().insert(*cookie);
            }
        }
        self.scanned_at = Some(started);
        self.last = ScanStats {
            namespaces: found.len(),
            addresses,
            took: started.elapsed(),
        };
        debug!(
            namespaces = self.last.namespaces,
            addresses,
            took_us = self.last.took.as_micros() as u64,
            "netns scan"
        );
        Ok(())
    }
}

/// Enters each namespace on one short-lived thread; returns (cookie, addresses) of each one that
/// could be entered (a process may exit, a file may be no netns: skipped).
fn enter_all(paths: &[PathBuf]) -> io::Result<Vec<(u64, Vec<IpAddr>)>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut out = Vec::with_capacity(paths.len());
            for p in paths {
                if let Some(r) = enter_one(p) {
                    out.push(r);
                }
            }
            out
        })
        .join()
        .map_err(|_| io::Error::other("netns scan thread panicked"))
    })
}

fn enter_one(path: &Path) -> Option<(u64, Vec<IpAddr>)> {
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: setns on this (scan-only) thread, which ends when the scan does.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return None;
    }
    let cookie = current_cookie().ok()?;
    Some((cookie, interface_addresses().ok()?))
}

/// Addresses on the calling thread's netns interfaces, loopback and link-local left out.
fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below; it opens a netlink socket in the
    // calling thread's network namespace.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it says.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        let link_local = match ip {
            IpAddr::V4(v) => v.is_link_local(),
            IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
        };
        if !ip.is_loopback() && !ip.is_unspecified() && !link_local {
            out.push(ip);
        }
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_refuses_ambiguous_ips() {
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.3".parse().unwrap();
        let i = NetnsIndex::from_pairs([(a, 1), (b, 2), (b, 3)]);
        assert_eq!(i.lookup(a), Lookup::Found(1));
        assert_eq!(i.lookup(b), Lookup::Ambiguous(vec![2, 3]));
        assert_eq!(i.lookup("10.0.0.4".parse().unwrap()), Lookup::Missing);
    }

    /// `ioctl(SIOCSIFADDR)` argument.
    #[repr(C)]
    struct IfreqAddr {
        name: [u8; 16],
        addr: libc::sockaddr_in,
        _pad: [u8; 8],
    }

    /// A namespace of the test's own, pinned in a temp folder with an address on its `lo`, is
    /// found by that address; once unpinned (gone), a new scan forgets it. Root.
    #[test]
    fn scan_finds_a_netns_by_its_address() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root (setns): run it as root");
        }
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("ns");
        std::fs::write(&pin, b"").unwrap();
        let ip: IpAddr = "198.18.77.9".parse().unwrap();
        let pin2 = pin.clone();
        let made = std::thread::spawn(move || -> io::Result<u64> {
            // SAFETY: unshare, ioctl and mount on this thread only; it ends right after.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                let mut req = IfreqAddr {
                    name: [0; 16],
                    addr: std::mem::zeroed(),
                    _pad: [0; 8],
                };
                req.name[..2].copy_from_slice(b"lo");
                req.addr.sin_family = libc::AF_INET as u16;
                req.addr.sin_addr.s_addr = u32::from_ne_bytes([198, 18, 77, 9]);
                let rc = libc::ioctl(fd, libc::SIOCSIFADDR as _, &req);
                libc::close(fd);
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                let dst = std::ffi::CString::new(pin2.as_os_str().as_encoded_bytes()).unwrap();
                if libc::mount(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            current_cookie()
        })
        .join()
        .unwrap();
        let cookie = made.expect("a pinned netns with an address");
        let cfg = ScanConfig {
            netns_dirs: vec![dir.path().to_path_buf()],
            proc: None,
        };
        let mut idx = NetnsIndex::default();
        let r = idx.rescan(&cfg);
        let c = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: unmounting the bind mount made above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        r.unwrap();
        assert_eq!(idx.lookup(ip), Lookup::Found(cookie));
        assert_eq!(idx.last.namespaces, 1);
        idx.rescan(&cfg).unwrap();
        assert_eq!(idx.lookup(ip), Lookup::Missing, "an unpinned netns is gone");
    }
}
