//! What the kernel offers: its release (for the record only), its BTF, and the program and map
//! types meshaccel needs (aya's feature probes).
use std::io;

use aya::{maps::MapType, programs::ProgramType};

use super::{Check, Level};

pub(super) fn kernel_release() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Check::new(
        "kernel",
        Level::Info,
        format!("Linux {release} (support is probed below, not inferred from the version)"),
    )
}

pub(super) fn btf() -> Check {
    const PATH: &str = "/sys/kernel/btf/vmlinux";
    match std::fs::File::open(PATH).and_then(|mut f| {
        let mut magic = [0u8; 2];
        io::Read::read_exact(&mut f, &mut magic)?;
        Ok(magic)
    }) {
        Ok(m) if u16::from_le_bytes(m) == 0xeb9f || u16::from_be_bytes(m) == 0xeb9f => {
            // The queue bound needs three socket field offsets from it (hazard 5).
            match crate::kernel_btf::running_kernel() {
                Ok(o) => Check::new(
                    "btf",
                    Level::Ok,
                    format!(
                        "kernel BTF at {PATH}; socket offsets for the unread-bytes bound: sk_rmem_alloc {}, write_seq {}, snd_una {}; for telling app sockets and how they read: sk_uid {}, sk_socket {}, socket.file {}, file.f_flags {}",
                        o.rmem_alloc, o.write_seq, o.snd_una, o.sk_uid, o.sk_socket, o.socket_file, o.file_flags
                    ),
                ),
                Err(e) => Check::new(
                    "btf",
                    Level::Warn,
                    format!("kernel BTF at {PATH}, but not the socket fields meshaccel reads ({e}): a stalled reader's queue will not be bounded, and every app socket stays on TCP"),
                ),
            }
        }
        Ok(_) => Check::new("btf", Level::Warn, format!("{PATH} is not BTF")),
        Err(e) => Check::new(
            "btf",
            Level::Warn,
            format!("no kernel BTF ({PATH}: {e}); meshaccel's programs carry their own BTF, the load probe below decides"),
        )
        .fix("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is)"),
    }
}

pub(super) fn program_and_map_types() -> Vec<Check> {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    let mut errors = Vec::new();
    for (t, n) in [
        (ProgramType::SockOps, "sock_ops"),
        (ProgramType::SkMsg, "sk_msg"),
    ] {
        match aya::sys::is_program_supported(t) {
            Ok(true) => {}
            Ok(false) => missing.push(n),
            Err(e) => errors.push(format!("{n}: {e}")),
        }
    }
    out.push(if !missing.is_empty() {
        Check::new(
            "program types",
            Level::Fail,
            format!("the kernel cannot load {} programs", missing.join(", ")),
        )
        .fix("meshaccel needs a kernel with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_BPF_STREAM_PARSER")
    } else if !errors.is_empty() {
        Check::new(
            "program types",
            Level::Fail,
            format!("probing failed: {}", errors.join("; ")),
        )
        .fix("run as root (or with CAP_BPF + CAP_SYS_ADMIN)")
    } else {
        Check::new("program types", Level::Ok, "sock_ops and sk_msg load")
    });
    let mut missing = Vec::new();
    let mut errors = Vec::new();
    for (t, n) in [
        (MapType::SockHash, "sockhash"),
        (MapType::SkStorage, "sk_storage"),
        (MapType::Hash, "hash"),
        (MapType::Array, "array"),
        (MapType::PerCpuArray, "percpu_array"),
        (MapType::PerCpuHash, "percpu_hash"),
    ] {
        match aya::sys::is_map_supported(t) {
            Ok(true) => {}
            Ok(false) => missing.push(n),
            Err(e) => errors.push(format!("{n}: {e}")),
        }
    }
    out.push(if !missing.is_empty() {
        Check::new(
            "map types",
            Level::Fail,
            format!("the kernel cannot create {} maps", missing.join(", ")),
        )
        .fix("meshaccel needs CONFIG_BPF_STREAM_PARSER (sockhash) and BTF support (sk_storage)")
    } else if !errors.is_empty() {
        Check::new(
            "map types",
            Level::Fail,
            format!("probing failed: {}", errors.join("; ")),
        )
        .fix("run as root (or with CAP_BPF + CAP_SYS_ADMIN)")
    } else {
        Check::new(
            "map types",
            Level::Ok,
            "sockhash, sk_storage, hash, array, percpu_array, percpu_hash",
        )
    });
    out
}
