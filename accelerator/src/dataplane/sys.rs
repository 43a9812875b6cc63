//! Every raw bpf(2) call of meshaccel, for commands aya 0.14 does not expose: which programs
//! are attached to a cgroup or a sockhash (`BPF_PROG_QUERY`), creating a named array map
//! outside an object (the layout stamp, [`crate::layout_stamp`]), a tcx link made and pinned
//! from a thread inside another network namespace (aya's attach needs the program's owner, by
//! name), and swapping the program behind a pinned link in place (aya keeps `BPF_LINK_UPDATE`
//! to itself). Attr structs follow `union bpf_attr` in linux/bpf.h.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Attach types (`enum bpf_attach_type`).
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_SK_MSG_VERDICT: u32 = 7;
pub const BPF_TCX_EGRESS: u32 = 47;
/// `BPF_PROG_QUERY` flags and the attach flags it reports.
pub const BPF_F_QUERY_EFFECTIVE: u32 = 1;
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
pub const BPF_F_ALLOW_MULTI: u32 = 2;

const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// `union bpf_attr`'s `query` member, zero-padded to the union's start.
#[repr(C)]
#[derive(Default)]
pub(crate) struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `union bpf_attr`'s map-create member, up to `map_extra`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_value_type_id: u32,
    map_extra: u64,
}

/// `union bpf_attr`'s `link_create` member with its `tcx` part (relative_fd, expected_revision).
#[repr(C)]
#[derive(Default)]
struct TcxLinkAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// `union bpf_attr`'s member for `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr`'s `link_update` member.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// bpf(2) `cmd` on `attr`, which the kernel may write back into (`BPF_PROG_QUERY` does).
///
/// # Safety
/// `attr` is laid out as `cmd`'s member of `union bpf_attr`, and every pointer in it stays
/// valid for the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller's promise; the size is the attr's own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// [`bpf`] for a command that returns a new fd.
///
/// # Safety
/// As for [`bpf`], and `cmd` returns a new fd on success.
unsafe fn bpf_new_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: the caller's promise.
    let fd = unsafe { bpf(cmd, attr) }?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A tcx link of `prog` on interface `ifindex` of the calling thread's network namespace, at
/// the end of its chain (`attach_type`: [`BPF_TCX_EGRESS`]).
pub fn tcx_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = TcxLinkAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    // SAFETY: bpf(2) with a correctly laid out, initialised attr for BPF_LINK_CREATE.
    unsafe { bpf_new_fd(BPF_LINK_CREATE, &mut attr) }
}

/// Pins a bpf object (here a link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: bpf(2) with a correctly laid out attr; pathname points at `c`, which outlives it.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }?;
    Ok(())
}

/// A new fd on the object pinned at `path` (aya keeps a pinned link's fd to itself).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) with a correctly laid out attr; pathname points at `c`, which outlives it.
    unsafe { bpf_new_fd(BPF_OBJ_GET, &mut attr) }
}

/// Swaps the program behind `link` for `prog`, atomically: every socket sees one or the other.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) with a correctly laid out, initialised attr for BPF_LINK_UPDATE.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }?;
    Ok(())
}

/// Programs of `attach_type` attached to `target` (a cgroup or a sockmap/sockhash): (the
/// target's attach flags, program ids). `query_flags`: [`BPF_F_QUERY_EFFECTIVE`] for a cgroup's
/// programs that run for its sockets, inherited ones included.
pub fn prog_query(
    target: BorrowedFd<'_>,
    attach_type: u32,
    query_flags: u32,
) -> io::Result<(u32, Vec<u32>)> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        query_flags,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: bpf(2) with a correctly laid out attr; prog_ids points at `ids` (prog_cnt slots),
    // which outlives the call.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }?;
    ids.truncate(attr.prog_cnt as usize);
    Ok((attr.attach_flags, ids))
}

/// A new ARRAY map named `name` (at most 15 characters) with 4-byte keys.
pub fn create_array(name: &str, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    if name.len() > 15 || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("map name {name:?}: at most 15 characters, no NUL"),
        ));
    }
    map_name[..name.len()].copy_from_slice(name.as_bytes());
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size,
        max_entries,
        map_name,
        ..Default::default()
    };
    // SAFETY: bpf(2) with a correctly laid out, initialised attr for BPF_MAP_CREATE.
    unsafe { bpf_new_fd(BPF_MAP_CREATE, &mut attr) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_linux() {
        // offsetof(union bpf_attr, query.prog_cnt) == 24, .revision == 56 (linux/bpf.h).
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_ids), 16);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_cnt), 24);
        assert_eq!(std::mem::offset_of!(QueryAttr, revision), 56);
        // map_name at 28, btf_fd at 48, map_extra at 64.
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_name), 28);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, btf_fd), 48);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_extra), 64);
        // link_create.tcx.relative_fd at 16, .expected_revision at 24.
        assert_eq!(std::mem::offset_of!(TcxLinkAttr, relative_fd), 16);
        assert_eq!(std::mem::offset_of!(TcxLinkAttr, expected_revision), 24);
        // The obj (pin/get) member: bpf_fd at 8, file_flags at 12.
        assert_eq!(std::mem::offset_of!(ObjAttr, bpf_fd), 8);
        assert_eq!(std::mem::offset_of!(ObjAttr, file_flags), 12);
        // link_update: new_prog_fd at 4, flags at 8, old_prog_fd at 12.
        assert_eq!(std::mem::offset_of!(LinkUpdateAttr, new_prog_fd), 4);
        assert_eq!(std::mem::offset_of!(LinkUpdateAttr, flags), 8);
        assert_eq!(std::mem::offset_of!(LinkUpdateAttr, old_prog_fd), 12);
    }

    #[test]
    fn a_long_map_name_is_refused_before_the_kernel() {
        let e = create_array("MESHACCEL_TOO_LONG", 16, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("MESHACCEL_TOO_LONG"), "{e}");
    }
}
