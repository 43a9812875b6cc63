//! The bpffs folder meshaccel pins under: on the bpffs mounted there, or on one it mounts.
use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is on a bpffs (also `doctor`'s check).
pub(crate) fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let err = |message: String| Error::Bpffs {
        path: path.into(),
        message,
    };
    let target = CString::new(path.as_os_str().as_bytes()).map_err(|e| err(e.to_string()))?;
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(format!(
            "mounting a bpffs: {}",
            std::io::Error::last_os_error()
        )));
    }
    tracing::info!(path = %path.display(), "mounted a bpffs");
    Ok(())
}

/// Makes `dir` a folder on a bpffs: uses the bpffs it is already on, else mounts one on it (or
/// on its empty parent when the folder cannot be created there, as under /sys/fs/bpf on a host
/// that does not mount it).
pub(crate) fn ensure_bpffs(dir: &Path) -> Result<()> {
    let err = |message: String| Error::Bpffs {
        path: dir.into(),
        message,
    };
    if dir.is_dir() && is_bpffs(dir) {
        return Ok(());
    }
    if !dir.exists() && std::fs::create_dir_all(dir).is_err() {
        let parent = dir
            .parent()
            .ok_or_else(|| err("has no parent folder".into()))?;
        let empty = std::fs::read_dir(parent)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !(parent.is_dir() && empty) {
            return Err(err(
                "cannot create it, and its parent is not an empty folder to mount a bpffs on"
                    .into(),
            ));
        }
        mount_bpffs(parent)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("creating it on the new bpffs: {e}")))?;
    }
    if !is_bpffs(dir) {
        mount_bpffs(dir)?;
    }
    Ok(())
}
