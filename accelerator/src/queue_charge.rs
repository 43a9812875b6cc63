//! Whether this kernel counts redirected bytes against the receiving socket, which the queue
//! bound (`--max-unread-bytes`, kernel hazard 5) relies on.
//!
//! The sk_msg program holds a sender on TCP when its peer's `sk_rmem_alloc` is above the limit.
//! Linux charges bytes redirected into a socket's ingress queue to that counter since 6.13
//! ("tcp_bpf: charge receive socket buffer in bpf_tcp_ingress()", backported to some stable
//! kernels). Without it the peer looks empty however much waits: the bound bounds nothing, and a
//! reader that stops reading lets its sender queue kernel memory without limit.
//!
//! `doctor` finds out by trying ([`probe`]): meshaccel's own programs with throwaway maps, a
//! new child cgroup, and one loopback connection made in it by a forked child, whose client
//! writes 256 KiB that nobody reads, with a 16 KiB limit. Held: charged. Everything redirected
//! and never held: not charged. When it cannot probe, it judges by the kernel version
//! ([`judge_release`]); so does the agent at start ([`agent_warning`]), which must not move
//! processes between cgroups.
use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{CgroupAttachMode, SkMsg, SockOps},
};
use meshaccel_common::{Config, WorkloadPolicy, counter, names, tuning};

/// The first release that charges redirected bytes to the receiver.
pub const CHARGED_SINCE: (u32, u32) = (6, 13);

/// What happens where the bytes are not charged.
pub const CONSEQUENCE: &str = "--max-unread-bytes bounds nothing there: a reader that stops reading lets its sender queue redirected bytes in kernel memory without limit (one connection took 560 MB in 3 s without the bound), until the host's TCP memory limit hits every socket";

/// What the version says (a backport can make an older kernel charge them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByVersion {
    Charged,
    NotUnlessBackported,
}

/// (major, minor) of a kernel release string such as `6.12.5-1-amd64` or `6.18.44-fc-v1252`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+', '_']);
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// The judgement by version; `None` when the release cannot be read.
pub fn judge_release(release: &str) -> Option<ByVersion> {
    parse_release(release).map(|v| {
        if v >= CHARGED_SINCE {
            ByVersion::Charged
        } else {
            ByVersion::NotUnlessBackported
        }
    })
}

/// The warning the agent logs once at start, if any: on a kernel older than 6.13 (or one it
/// cannot read the version of) while the bound is on.
pub fn agent_warning(release: &str, max_unread_bytes: u32) -> Option<String> {
    if max_unread_bytes == 0 {
        return None;
    }
    match judge_release(release) {
        Some(ByVersion::Charged) => None,
        Some(ByVersion::NotUnlessBackported) => Some(format!(
            "kernel {release} is older than {}.{}: unless it carries the backport of \"tcp_bpf: charge receive socket buffer in bpf_tcp_ingress()\", redirected bytes are not charged to the receiving socket and {CONSEQUENCE}; `meshaccel doctor` probes it",
            CHARGED_SINCE.0, CHARGED_SINCE.1
        )),
        None => Some(format!(
            "cannot read the kernel version from {release:?}: if the kernel is older than {}.{} without the backport, {CONSEQUENCE}; `meshaccel doctor` probes it",
            CHARGED_SINCE.0, CHARGED_SINCE.1
        )),
    }
}

/// The kernel release (`/proc/sys/kernel/osrelease`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// What the probe saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// The sender was held after `redirected` bytes: the reader's queue is charged.
    Charged { redirected: u64 },
    /// `redirected` bytes reached a reader that read none of them and the sender was never
    /// held: not charged.
    NotCharged { redirected: u64 },
}

/// Bytes the probe's client writes, and the limit it runs with.
const PROBE_WRITES: usize = 4;
const PROBE_CHUNK: usize = 64 << 10;
const PROBE_LIMIT: u32 = 16 << 10;

/// Reads the probe's counters (pure): held means charged; bytes redirected past two unread
/// checks without a hold mean not charged; anything else tells nothing.
pub fn judge_probe(inserted: u64, redirected: u64, held: u64) -> Result<Probed, String> {
    if held > 0 {
        Ok(Probed::Charged { redirected })
    } else if redirected >= 2 * u64::from(tuning::CHECK_BYTES) {
        Ok(Probed::NotCharged { redirected })
    } else {
        Err(format!(
            "the probe connection was not accelerated ({inserted} socket(s) inserted, {redirected} bytes redirected)"
        ))
    }
}

/// Runs the functional probe under `cgroup` (a new child cgroup is made and removed there).
/// `Err` says why it could not tell. Waits until the kernel has freed the probe's programs.
pub fn probe(cgroup: &Path) -> Result<Probed, String> {
    let mut ids = Vec::new();
    let out = probe_inner(cgroup, &mut ids);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .any(|p| ids.contains(&p.id()))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

fn probe_inner(cgroup: &Path, ids: &mut Vec<u32>) -> Result<Probed, String> {
    let offsets = crate::dataplane::btf::running_kernel()
        .map_err(|e| format!("no kernel BTF offsets, so no queue bound at all ({e})"))?;
    let mut loader = aya::EbpfLoader::new();
    offsets.set_globals(&mut loader);
    let mut ebpf = loader
        .load(crate::objects::EBPF_OBJECT)
        .map_err(|e| format!("loading meshaccel's programs: {e:#}"))?;
    // This netns, every connection (scope all), sockets of any uid treated as the sidecar's.
    let cookie = crate::netns::current_cookie().map_err(|e| format!("netns cookie: {e}"))?;
    {
        let mut cfg: Array<_, Config> = ebpf
            .map_mut(names::CONFIG)
            .ok_or("no config map")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        let c = Config {
            enabled: 1,
            epoch: 1,
            scope: meshaccel_common::SCOPE_ALL,
            queue_limit: PROBE_LIMIT,
            // SAFETY: geteuid cannot fail.
            proxy_uid: unsafe { libc::geteuid() },
            ..Config::default()
        };
        cfg.set(0, c, 0).map_err(|e| format!("config: {e}"))?;
        let mut wl: HashMap<_, u64, WorkloadPolicy> = ebpf
            .map_mut(names::WORKLOADS)
            .ok_or("no workloads map")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        let policy = WorkloadPolicy {
            flags: meshaccel_common::POLICY_ENABLED | meshaccel_common::POLICY_TRUST_APPS,
            workload_id: 0,
        };
        wl.insert(cookie, policy, 0)
            .map_err(|e| format!("workload: {e}"))?;
    }
    let socks_fd = {
        let socks: aya::maps::SockHash<_, meshaccel_common::PairKey> = ebpf
            .map(names::SOCKS)
            .ok_or("no sockhash")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        socks.fd().try_clone().map_err(|e| format!("{e}"))?
    };
    let stats: PerCpuArray<_, u64> = ebpf
        .take_map(names::STATS)
        .ok_or("no counters")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let msg: &mut SkMsg = ebpf
        .program_mut(names::PROG_SK_MSG)
        .ok_or("no sk_msg program")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    msg.load().map_err(|e| format!("loading sk_msg: {e:#}"))?;
    ids.extend(msg.info().ok().map(|i| i.id()));
    msg.attach(&socks_fd)
        .map_err(|e| format!("attaching sk_msg: {e:#}"))?;
    let ops: &mut SockOps = ebpf
        .program_mut(names::PROG_SOCK_OPS)
        .ok_or("no sock_ops program")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    ops.load().map_err(|e| format!("loading sock_ops: {e:#}"))?;
    ids.extend(ops.info().ok().map(|i| i.id()));

    let child = cgroup.join(format!("meshaccel-doctor-queue-{}", std::process::id()));
    std::fs::create_dir(&child)
        .map_err(|e| format!("cannot create a probe cgroup {}: {e}", child.display()))?;
    let run = std::fs::File::open(&child)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            let link = ops
                .attach(&f, CgroupAttachMode::Single)
                .map_err(|e| format!("attaching sock_ops: {e:#}"))?;
            let res = connection_in(&child);
            let _ = ops.detach(link);
            res
        })
        .and_then(|()| {
            let sum =
                |i: u32| -> u64 { stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or_default() };
            judge_probe(
                sum(counter::INSERTED),
                sum(counter::REDIRECT_BYTES),
                sum(counter::HOLD_QUEUE),
            )
        });
    // The child has exited: the cgroup is empty (its sockets do not keep it).
    let mut removed = std::fs::remove_dir(&child);
    for _ in 0..50 {
        if removed.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        removed = std::fs::remove_dir(&child);
    }
    if let Err(e) = removed {
        tracing::warn!(cgroup = %child.display(), error = %e, "could not remove the probe cgroup");
    }
    run
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into an array of two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: two new fds nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Forks a child that joins the cgroup `cg`, makes one loopback connection there and writes
/// [`PROBE_WRITES`] × [`PROBE_CHUNK`] bytes from its client, which its server never reads;
/// returns once it has written (its sockets stay open until then), and reaps it.
fn connection_in(cg: &Path) -> Result<(), String> {
    let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .map_err(|e| e.to_string())?;
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    // SAFETY: the child runs only async-signal-safe calls on memory prepared before the fork
    // (no allocation, no locks) and ends with _exit; doctor runs no other thread meanwhile.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            // The parent's ends: the child must not hold them (it waits for EOF on `go`).
            libc::close(ready_r.as_raw_fd());
            libc::close(go_w.as_raw_fd());
            child(&procs, ready_w.as_raw_fd(), go_r.as_raw_fd())
        }
    }
    drop((ready_w, go_r));
    let mut pfd = libc::pollfd {
        fd: ready_r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll and read on a pipe we own.
    let written = unsafe {
        libc::poll(&mut pfd, 1, 5000) == 1 && {
            let mut b = 0u8;
            libc::read(ready_r.as_raw_fd(), (&raw mut b).cast(), 1) == 1
        }
    };
    if !written {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    drop(go_w); // the child exits when it reads EOF
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if written {
        return Ok(());
    }
    Err(
        match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
            Some(10) => format!("could not move a process into {}", cg.display()),
            Some(11) => "could not make a loopback connection".into(),
            _ => "the probe connection did not report back within 5 s".into(),
        },
    )
}

/// The forked child. Async-signal-safe calls only.
unsafe fn child(procs: &CString, ready: i32, go: i32) -> ! {
    static CHUNK: [u8; PROBE_CHUNK] = [0x6d; PROBE_CHUNK];
    // SAFETY (whole body): plain syscalls on fds this process owns and memory prepared before
    // the fork.
    unsafe {
        // Join the probe cgroup: sockets created from now on are its (sock_ops runs for them).
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(10);
        }
        libc::close(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let sa = (&raw mut addr).cast::<libc::sockaddr>();
        let l = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if l < 0
            || c < 0
            || libc::bind(l, sa, len) != 0
            || libc::listen(l, 1) != 0
            || libc::getsockname(l, sa, &mut len) != 0
            || libc::connect(c, sa, len) != 0
        {
            libc::_exit(11);
        }
        let s = libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut());
        if s < 0 {
            libc::_exit(11);
        }
        for _ in 0..PROBE_WRITES {
            let n = libc::send(
                c,
                CHUNK.as_ptr().cast(),
                CHUNK.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            if n <= 0 {
                break;
            }
        }
        libc::write(ready, c"1".as_ptr().cast(), 1);
        let mut b = 0u8;
        libc::read(go, (&raw mut b).cast(), 1);
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_read_as_distributions_write_them() {
        for (s, v) in [
            ("6.18.44-fc-v1252", (6, 18)),
            ("6.12.5-1-amd64", (6, 12)),
            ("6.13", (6, 13)),
            ("5.15.0-126-generic\n", (5, 15)),
            ("6.1.0+", (6, 1)),
            ("4.19.325_custom", (4, 19)),
            ("6.13rc3", (6, 13)),
        ] {
            assert_eq!(parse_release(s), Some(v), "{s}");
        }
        for bad in ["", "unknown", "6", "x.y"] {
            assert_eq!(parse_release(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn from_6_13_redirected_bytes_are_charged() {
        assert_eq!(judge_release("6.13.0"), Some(ByVersion::Charged));
        assert_eq!(judge_release("6.18.44-fc-v1252"), Some(ByVersion::Charged));
        assert_eq!(judge_release("7.0.1"), Some(ByVersion::Charged));
        assert_eq!(
            judge_release("6.12.60"),
            Some(ByVersion::NotUnlessBackported)
        );
        assert_eq!(
            judge_release("5.15.0-126-generic"),
            Some(ByVersion::NotUnlessBackported)
        );
        assert_eq!(judge_release("junk"), None);
    }

    #[test]
    fn the_agent_warns_on_older_kernels_while_the_bound_is_on() {
        assert_eq!(agent_warning("6.18.44", tuning::QUEUE_LIMIT), None);
        let w = agent_warning("6.12.5-1-amd64", tuning::QUEUE_LIMIT).expect("a warning");
        assert!(
            w.contains("6.12.5-1-amd64")
                && w.contains("older than 6.13")
                && w.contains("--max-unread-bytes bounds nothing")
                && w.contains("meshaccel doctor"),
            "{w}"
        );
        assert_eq!(
            agent_warning("6.12.5", 0),
            None,
            "no bound asked for: nothing to warn"
        );
        assert!(agent_warning("junk", 1).is_some_and(|w| w.contains("cannot read")));
    }

    #[test]
    fn the_probe_counters_decide() {
        assert_eq!(
            judge_probe(2, 65536, 1),
            Ok(Probed::Charged { redirected: 65536 })
        );
        assert_eq!(
            judge_probe(2, 4 * 65536, 0),
            Ok(Probed::NotCharged {
                redirected: 4 * 65536
            })
        );
        // Too little redirected for a check to have looked, or nothing inserted: no verdict.
        assert!(judge_probe(2, 65536, 0).is_err());
        assert!(
            judge_probe(0, 0, 0)
                .unwrap_err()
                .contains("0 socket(s) inserted")
        );
    }
}
