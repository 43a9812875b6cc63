//! Field offsets of the running kernel's socket structures, from its BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! Both programs also read, with `bpf_probe_read_kernel`, who created a socket (`sk_uid`: the
//! sidecar's UID or an app's) and whether its file is non-blocking (`sk_socket` -> `file` ->
//! `f_flags`): an app's socket enters the sockhash only when it is (kernel hazard 4).
//!
//! The sk_msg program reads three fields through BTF pointers (`bpf_skc_to_tcp_sock`): the
//! peer socket's receive memory (`sk_rmem_alloc`, which counts what waits in its sk_msg ingress
//! queue and its TCP receive queue) and its own `write_seq` / `snd_una`. The verifier checks
//! each load against the kernel's BTF, so the offsets must be this kernel's: they are read here
//! and handed to the program as read-only globals before it is loaded. Without BTF the program
//! gets 0 and those checks are compiled out by the verifier (no queue limit; `doctor`
//! reports BTF missing).
use std::{collections::HashMap, path::Path};

/// Byte offsets inside `struct tcp_sock`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSockOffsets {
    /// `sk_backlog.rmem_alloc` of the embedded `struct sock` (`sk_rmem_alloc`).
    pub rmem_alloc: u32,
    pub write_seq: u32,
    pub snd_una: u32,
    /// `struct sock`'s `sk_socket`, `struct socket`'s `file`, `struct file`'s `f_flags`.
    pub sk_socket: u32,
    pub socket_file: u32,
    pub file_flags: u32,
    /// `struct sock`'s `sk_uid` (a `kuid_t`: one u32).
    pub sk_uid: u32,
    /// `struct file`'s `f_ep`: whether an epoll instance watches the file (an event loop's).
    pub file_ep: u32,
}

impl TcpSockOffsets {
    /// Hands the offsets to meshaccel's programs as their read-only globals (before loading).
    pub fn set_globals<'a>(&'a self, loader: &mut aya::EbpfLoader<'a>) {
        loader.override_global("OFF_RMEM_ALLOC", &self.rmem_alloc, true);
        loader.override_global("OFF_WRITE_SEQ", &self.write_seq, true);
        loader.override_global("OFF_SND_UNA", &self.snd_una, true);
        loader.override_global("OFF_SK_SOCKET", &self.sk_socket, true);
        loader.override_global("OFF_SOCKET_FILE", &self.socket_file, true);
        loader.override_global("OFF_FILE_FLAGS", &self.file_flags, true);
        loader.override_global("OFF_SK_UID", &self.sk_uid, true);
        loader.override_global("OFF_FILE_EP", &self.file_ep, true);
    }
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// Referenced type (typedef, qualifiers), else 0.
    refers: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob: enough to resolve struct member offsets.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id (0 is void).
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn err(message: impl Into<String>) -> String {
    message.into()
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&data).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let u16_at = |o: usize| -> Result<u16, String> {
            data.get(o..o + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .ok_or_else(|| err("truncated"))
        };
        let u32_at = |o: usize| -> Result<u32, String> {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| err("truncated"))
        };
        if u16_at(0)? != BTF_MAGIC {
            return Err(err("not little-endian BTF (bad magic)"));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| err("string section out of bounds"))?
            .to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            refers: 0,
            members: Vec::new(),
        }];
        let (mut o, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        if end > data.len() {
            return Err(err("type section out of bounds"));
        }
        while o < end {
            let (name, info, size_or_type) = (u32_at(o)?, u32_at(o + 4)?, u32_at(o + 8)?);
            o += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                name,
                kind,
                refers: 0,
                members: Vec::new(),
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => o += 4,
                KIND_ARRAY => o += 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = o + 12 * i;
                        let off = u32_at(m + 8)?;
                        t.members.push(Member {
                            name: u32_at(m)?,
                            ty: u32_at(m + 4)?,
                            bit_offset: if kind_flag { off & 0xff_ffff } else { off },
                        });
                    }
                    o += 12 * vlen;
                }
                KIND_ENUM | KIND_FUNC_PROTO => o += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => o += 12 * vlen,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    t.refers = size_or_type
                }
                _ => {}
            }
            types.push(t);
        }
        let mut btf = Self {
            strings,
            types,
            structs_by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let name = btf.string(t.name).to_string();
                // The first definition wins (vmlinux has one of each).
                btf.structs_by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            if t.refers == 0 {
                return Some(t);
            }
            id = t.refers;
        }
        None
    }

    /// Bit offset of the member `name` of a struct/union, looking through anonymous members;
    /// with the member's type.
    fn member(&self, t: &Type, name: &str) -> Option<(u32, u32)> {
        for m in &t.members {
            if m.name != 0 && self.string(m.name) == name {
                return Some((m.bit_offset, m.ty));
            }
        }
        for m in &t.members {
            if m.name == 0
                && let Some(inner) = self.resolve(m.ty)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some((off, ty)) = self.member(inner, name)
            {
                return Some((m.bit_offset + off, ty));
            }
        }
        None
    }

    /// Byte offset of `path` (member names, nested) inside `struct name`.
    pub fn offset(&self, name: &str, path: &[&str]) -> Result<u32, String> {
        let id = *self
            .structs_by_name
            .get(name)
            .ok_or_else(|| format!("no struct {name}"))?;
        let mut t = self.resolve(id).ok_or_else(|| format!("bad type {id}"))?;
        let mut bits = 0u32;
        for (i, field) in path.iter().enumerate() {
            let (off, ty) = self
                .member(t, field)
                .ok_or_else(|| format!("struct {name} has no {}", path[..=i].join(".")))?;
            bits += off;
            t = self.resolve(ty).ok_or_else(|| format!("bad type {ty}"))?;
        }
        if !bits.is_multiple_of(8) {
            return Err(format!("{name}.{} is a bitfield", path.join(".")));
        }
        Ok(bits / 8)
    }

    pub fn tcp_sock_offsets(&self) -> Result<TcpSockOffsets, String> {
        // A socket's address is both its `struct sock` and its `struct tcp_sock`.
        let sock_in_tcp = self.offset("tcp_sock", &["inet_conn", "icsk_inet", "sk"])?;
        if sock_in_tcp != 0 {
            return Err(format!(
                "struct sock at offset {sock_in_tcp} of struct tcp_sock"
            ));
        }
        Ok(TcpSockOffsets {
            rmem_alloc: self.offset("sock", &["sk_backlog", "rmem_alloc"])?,
            write_seq: self.offset("tcp_sock", &["write_seq"])?,
            snd_una: self.offset("tcp_sock", &["snd_una"])?,
            sk_socket: self.offset("sock", &["sk_socket"])?,
            socket_file: self.offset("socket", &["file"])?,
            file_flags: self.offset("file", &["f_flags"])?,
            sk_uid: self.offset("sock", &["sk_uid", "val"])?,
            file_ep: self.offset("file", &["f_ep"])?,
        })
    }
}

/// This kernel's offsets, or why they are unknown.
pub fn running_kernel() -> Result<TcpSockOffsets, String> {
    Btf::from_file(Path::new("/sys/kernel/btf/vmlinux"))?.tcp_sock_offsets()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built blob: struct inner { int a; int b; }; struct outer { int x; struct { int
    /// pad; struct inner in; }; } — offsets through an anonymous member and a nested struct.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0pad\0in\0".to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { a @0, b @32 }
        push(&[s("inner"), KIND_STRUCT << 24 | 2, 8]);
        push(&[s("a"), 1, 0, s("b"), 1, 32]);
        // 3: anonymous struct { pad @0, in @64 }
        push(&[0, KIND_STRUCT << 24 | 2, 16]);
        push(&[s("pad"), 1, 0, s("in"), 2, 64]);
        // 4: struct outer { x @0, <anon> @64 }
        push(&[s("outer"), KIND_STRUCT << 24 | 2, 24]);
        push(&[s("x"), 1, 0, 0, 3, 64]);
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn offsets_through_anonymous_and_nested_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset("outer", &["x"]).unwrap(), 0);
        assert_eq!(btf.offset("outer", &["pad"]).unwrap(), 8);
        assert_eq!(btf.offset("outer", &["in", "b"]).unwrap(), 8 + 8 + 4);
        assert!(
            btf.offset("outer", &["in", "c"])
                .unwrap_err()
                .contains("in.c")
        );
        assert!(
            btf.offset("nope", &["x"])
                .unwrap_err()
                .contains("no struct nope")
        );
    }

    #[test]
    fn bad_blobs_are_errors() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0u8; 24]).is_err());
        let mut b = blob();
        b.truncate(40);
        assert!(Btf::parse(&b).is_err());
    }

    /// The running kernel (every machine this project supports has BTF): the offsets exist and
    /// are plausible (inside struct tcp_sock, 4-byte aligned).
    #[test]
    fn running_kernel_has_the_fields() {
        let o = running_kernel().expect("this kernel's BTF");
        for v in [
            o.rmem_alloc,
            o.write_seq,
            o.snd_una,
            o.sk_socket,
            o.file_flags,
            o.sk_uid,
        ] {
            assert!(v > 0 && v < 4096 && v % 4 == 0, "{o:?}");
        }
        // `file` is a later member of `struct socket` (after state, type, flags); `f_ep` a
        // pointer after `f_flags`.
        assert!(
            o.socket_file > 0 && o.socket_file.is_multiple_of(8),
            "{o:?}"
        );
        assert!(
            o.file_ep > o.file_flags && o.file_ep.is_multiple_of(8),
            "{o:?}"
        );
    }
}
