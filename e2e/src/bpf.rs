//! Raw bpf(2) for tests that look at or tamper with what the agent pinned, independently of
//! the agent's own code: open a pin, read and write a map element, list the programs attached to
//! a sockhash or cgroup, detach one, or load and attach a trivial program of another
//! "accelerator". Attr offsets follow `union bpf_attr` in linux/bpf.h.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_PIN: i64 = 6;
const BPF_OBJ_GET: i64 = 7;
const BPF_PROG_ATTACH: i64 = 8;
const BPF_PROG_DETACH: i64 = 9;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_PROG_QUERY: i64 = 16;

/// `enum bpf_map_type`.
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
/// `enum bpf_prog_type`.
pub const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
pub const BPF_PROG_TYPE_SK_MSG: u32 = 16;
/// `enum bpf_attach_type`.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_SK_MSG_VERDICT: u32 = 7;
/// `BPF_OBJ_GET` file flags.
pub const BPF_F_RDONLY: u32 = 1 << 3;

fn sys_bpf(cmd: i64, attr: &mut [u8; 128]) -> io::Result<i64> {
    // SAFETY: bpf(2) with a zero-initialised 128-byte attr laid out per linux/bpf.h; pointers
    // inside it point at buffers the caller keeps alive across the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put32(attr: &mut [u8; 128], off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(attr: &mut [u8; 128], off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a new fd the kernel just returned to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// BPF_OBJ_GET: an fd on the object pinned at `path` (`flags`: 0 read-write, or
/// [`BPF_F_RDONLY`]).
pub fn obj_get(path: &Path, flags: u32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    put64(&mut attr, 0, c.as_ptr() as u64);
    put32(&mut attr, 12, flags);
    sys_bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// BPF_MAP_LOOKUP_ELEM into `value` (its length must be the map's value size).
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, map.as_raw_fd() as u32);
    put64(&mut attr, 8, key.as_ptr() as u64);
    put64(&mut attr, 16, value.as_mut_ptr() as u64);
    sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(|_| ())
}

/// BPF_MAP_UPDATE_ELEM (BPF_ANY).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, map.as_raw_fd() as u32);
    put64(&mut attr, 8, key.as_ptr() as u64);
    put64(&mut attr, 16, value.as_ptr() as u64);
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// BPF_PROG_QUERY: the ids of the programs of `attach_type` attached to `target` (a cgroup, a
/// sockmap or sockhash).
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, target.as_raw_fd() as u32);
    put32(&mut attr, 4, attach_type);
    put64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put32(&mut attr, 24, ids.len() as u32);
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    let cnt = u32::from_ne_bytes(attr[24..28].try_into().unwrap());
    ids.truncate(cnt as usize);
    Ok(ids)
}

/// BPF_PROG_GET_FD_BY_ID.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, id);
    sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned)
}

/// A trivial program (`r0 = 1; exit`) of `prog_type`, expecting `attach_type`, named `name`:
/// another "accelerator" of the tests, loaded without an object file.
pub fn prog_load_trivial(prog_type: u32, attach_type: u32, name: &str) -> io::Result<OwnedFd> {
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog_type);
    put32(&mut attr, 4, 2);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    attr[48..48 + name.len()].copy_from_slice(name.as_bytes());
    put32(&mut attr, 68, attach_type);
    sys_bpf(BPF_PROG_LOAD, &mut attr).map(owned)
}

/// A new SOCKHASH map (4-byte keys) of `max_entries`.
pub fn create_sockhash(max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_MAP_TYPE_SOCKHASH);
    put32(&mut attr, 4, 4);
    put32(&mut attr, 8, 4);
    put32(&mut attr, 12, max_entries);
    sys_bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// BPF_PROG_ATTACH of `prog` to `target` (a cgroup, a sockmap or sockhash), exclusively (no
/// BPF_F_ALLOW_MULTI).
pub fn prog_attach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    attach_cmd(BPF_PROG_ATTACH, target, prog, attach_type)
}

/// BPF_PROG_DETACH of `prog` from `target` (for a sockhash, the program must be named).
pub fn prog_detach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    attach_cmd(BPF_PROG_DETACH, target, prog, attach_type)
}

/// BPF_PROG_ATTACH and BPF_PROG_DETACH share their attr: target fd, program fd, attach type.
fn attach_cmd(
    cmd: i64,
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, target.as_raw_fd() as u32);
    put32(&mut attr, 4, prog.as_raw_fd() as u32);
    put32(&mut attr, 8, attach_type);
    sys_bpf(cmd, &mut attr).map(|_| ())
}

/// The kernel id of the object behind `fd` (map, program or link: `id` is the second u32 of
/// each info struct).
pub fn obj_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u8; 256];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, fd.as_raw_fd() as u32);
    put32(&mut attr, 4, info.len() as u32);
    put64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(u32::from_ne_bytes(info[4..8].try_into().unwrap()))
}

/// The program a link runs (`bpf_link_info.prog_id`, the third u32).
pub fn link_prog_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u8; 256];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, link.as_raw_fd() as u32);
    put32(&mut attr, 4, info.len() as u32);
    put64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(u32::from_ne_bytes(info[8..12].try_into().unwrap()))
}

/// A new ARRAY map (4-byte keys) named `name`.
pub fn create_array(name: &str, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, 2); // BPF_MAP_TYPE_ARRAY
    put32(&mut attr, 4, 4);
    put32(&mut attr, 8, value_size);
    put32(&mut attr, 12, max_entries);
    let n = name.len().min(15);
    attr[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    sys_bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// BPF_OBJ_PIN: pins `fd` at `path` (on a bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    put64(&mut attr, 0, c.as_ptr() as u64);
    put32(&mut attr, 8, fd.as_raw_fd() as u32);
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}
