//! Child processes: entering a pod between fork and exec, tracking children with pidfds so that
//! teardown never signals a recycled pid, and waiting for readiness or output with a timeout.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::{Child, Output},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs in the forked child before exec (so: async-signal-safe only, no allocation): join the pod
/// cgroup, then its netns, then drop to `uid` (gid = uid, no supplementary groups). In this
/// order because joining a cgroup and setns need root, and the cgroup must be joined before the
/// process opens any socket.
pub(crate) fn enter_pod(
    cgroup_procs_fd: RawFd,
    netns_fd: RawFd,
    uid: Option<u32>,
) -> io::Result<()> {
    // SAFETY (all blocks below): plain syscalls on fds the parent opened for us and on stack
    // buffers that outlive the calls.
    let mut buf = [0u8; 12];
    let pid = format_u32(unsafe { libc::getpid() } as u32, &mut buf);
    let n = unsafe { libc::write(cgroup_procs_fd, pid.as_ptr().cast(), pid.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    cvt(unsafe { libc::setns(netns_fd, libc::CLONE_NEWNET) })?;
    if let Some(uid) = uid {
        cvt(unsafe { libc::setgroups(0, std::ptr::null()) })?;
        cvt(unsafe { libc::setgid(uid) })?;
        cvt(unsafe { libc::setuid(uid) })?;
    }
    Ok(())
}

/// Decimal digits of `v` at the end of `buf`, without allocating.
fn format_u32(mut v: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// A child this run started, held by a pidfd so that teardown cannot hit a recycled pid.
pub(crate) struct Tracked {
    pub(crate) pid: u32,
    pub(crate) what: String,
    pidfd: OwnedFd,
}

impl Tracked {
    pub(crate) fn new(child: &Child, what: String) -> io::Result<Tracked> {
        // SAFETY: plain syscall; the child is ours and not reaped yet (we still own its `Child`).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Tracked {
            pid: child.id(),
            what,
            pidfd,
        })
    }

    /// SIGKILL, then reap (unless whoever holds the `Child` reaped it already).
    pub(crate) fn kill_and_reap(&self, timeout: Duration) -> anyhow::Result<()> {
        let fd = self.pidfd.as_raw_fd();
        // SAFETY: plain syscall on our pidfd. ESRCH: already reaped, fine.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<u8>(),
                0,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).context("pidfd_send_signal(SIGKILL)");
            }
        }
        // The pidfd polls readable once the process has exited.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is valid for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == 0 {
            bail!("still running {timeout:?} after SIGKILL");
        }
        // SAFETY: siginfo is plain data, valid for writes.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on our pidfd. ECHILD: the `Child`'s owner reaped it already.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ECHILD) {
                return Err(e).context("waitid(P_PIDFD)");
            }
        }
        Ok(())
    }
}

/// [`wait_ready_timeout`] with 10 s.
pub fn wait_ready(child: &mut Child) -> anyhow::Result<()> {
    wait_ready_timeout(child, Duration::from_secs(10))
}

/// Reads the child's stdout (which must be piped) until a line `ready`, at most `timeout`.
///
/// Reads one byte at a time, so whatever the child prints after `ready` stays in the pipe for the
/// caller. Other lines before `ready` are skipped (and quoted in the error if it never comes).
pub fn wait_ready_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let fd = child
        .stdout
        .as_ref()
        .context("wait_ready: the child's stdout is not piped")?
        .as_raw_fd();
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "pid {} printed no `ready` line within {timeout:?} (output so far: {seen:?})",
                child.id()
            );
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is valid for the call.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll on the child's stdout");
        }
        if n == 0 {
            continue;
        }
        let mut byte = 0u8;
        // SAFETY: reading one byte into a stack variable.
        let r = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        match r {
            1 if byte == b'\n' => {
                let text = String::from_utf8_lossy(&line).into_owned();
                if text.trim() == "ready" {
                    return Ok(());
                }
                seen.push_str(&text);
                seen.push('\n');
                line.clear();
            }
            1 => line.push(byte),
            0 => {
                let status = wait_briefly(child);
                bail!(
                    "pid {} closed stdout before printing `ready` ({status}; output: {:?})",
                    child.id(),
                    format!("{seen}{}", String::from_utf8_lossy(&line))
                );
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("reading the child's stdout");
                }
            }
        }
    }
}

fn wait_briefly(child: &mut Child) -> String {
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
        thread::sleep(Duration::from_millis(10));
    }
    "still running".to_string()
}

/// Like [`Child::wait_with_output`], but SIGKILLs the child and fails after `timeout`.
/// Collects whichever of stdout/stderr are piped.
pub fn wait_output_timeout(mut child: Child, timeout: Duration) -> anyhow::Result<Output> {
    fn drain<R: io::Read + Send + 'static>(r: Option<R>) -> Option<thread::JoinHandle<Vec<u8>>> {
        r.map(|mut r| {
            thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    // The readers end at EOF: when the child (and any grandchild holding the pipe) is gone.
    let join = |h: Option<thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    let stdout = join(out);
    let stderr = join(err);
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "pid {} did not exit within {timeout:?}; killed. stdout: {:?} stderr: {:?}",
            child.id(),
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format() {
        let mut b = [0; 12];
        assert_eq!(format_u32(0, &mut b), b"0");
        assert_eq!(format_u32(4194304, &mut b), b"4194304");
        assert_eq!(format_u32(u32::MAX, &mut b), b"4294967295");
    }
}
