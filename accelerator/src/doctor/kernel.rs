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

/// What a node without the socket field offsets loses (see `dataplane::btf`): the programs
/// cannot tell the sidecar's sockets from the apps' nor how an app reads, so they keep every
/// connection on TCP (an app socket needs a known non-blocking file to be accelerated).
const WITHOUT_OFFSETS: &str = "meshaccel cannot tell the sidecar's sockets from the apps' nor how an app reads, so every connection on this node stays on plain TCP (nothing is accelerated, nothing breaks), and a stalled reader's queue could not be bounded";
const BTF_FIX: &str = "run a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is) and give the agent the host's /sys (the chart's default)";

pub(super) fn btf() -> Check {
    const PATH: &str = "/sys/kernel/btf/vmlinux";
    let magic = std::fs::File::open(PATH).and_then(|mut f| {
        let mut magic = [0u8; 2];
        io::Read::read_exact(&mut f, &mut magic)?;
        Ok(magic)
    });
    let problem = match magic {
        Ok(m) if u16::from_le_bytes(m) == 0xeb9f || u16::from_be_bytes(m) == 0xeb9f => {
            match crate::dataplane::btf::running_kernel() {
                Ok(o) => {
                    return Check::new(
                        "btf",
                        Level::Ok,
                        format!(
                            "kernel BTF at {PATH}; socket offsets for the unread-bytes bound: sk_rmem_alloc {}, write_seq {}, snd_una {}; for telling app sockets and how they read: sk_uid {}, sk_socket {}, socket.file {}, file.f_flags {}, file.f_ep {}",
                            o.rmem_alloc,
                            o.write_seq,
                            o.snd_una,
                            o.sk_uid,
                            o.sk_socket,
                            o.socket_file,
                            o.file_flags,
                            o.file_ep
                        ),
                    );
                }
                Err(e) => {
                    format!("kernel BTF at {PATH}, but not the socket fields meshaccel reads ({e})")
                }
            }
        }
        Ok(_) => format!("{PATH} is not BTF"),
        Err(e) => format!("no kernel BTF ({PATH}: {e})"),
    };
    Check::new("btf", Level::Warn, format!("{problem}: {WITHOUT_OFFSETS}")).fix(BTF_FIX)
}

pub(super) fn program_and_map_types() -> Vec<Check> {
    let programs = [
        (ProgramType::SockOps, "sock_ops"),
        (ProgramType::SkMsg, "sk_msg"),
        (ProgramType::SchedClassifier, "sched_cls"),
    ]
    .map(|(t, n)| {
        (
            n,
            aya::sys::is_program_supported(t).map_err(|e| e.to_string()),
        )
    });
    let maps = [
        (MapType::SockHash, "sockhash"),
        (MapType::SkStorage, "sk_storage"),
        (MapType::Hash, "hash"),
        (MapType::Array, "array"),
        (MapType::PerCpuArray, "percpu_array"),
        (MapType::PerCpuHash, "percpu_hash"),
    ]
    .map(|(t, n)| (n, aya::sys::is_map_supported(t).map_err(|e| e.to_string())));
    vec![
        supported(
            "program types",
            &programs,
            ("load", "programs"),
            "meshaccel needs a kernel with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_BPF_STREAM_PARSER and CONFIG_NET_XGRESS (tcx)",
            "sock_ops, sk_msg and sched_cls load",
        ),
        supported(
            "map types",
            &maps,
            ("create", "maps"),
            "meshaccel needs CONFIG_BPF_STREAM_PARSER (sockhash) and BTF support (sk_storage)",
            "sockhash, sk_storage, hash, array, percpu_array, percpu_hash",
        ),
    ]
}

/// One check over a kind's feature probes: any the kernel lacks fails it with `fix`; any probe
/// that could not run fails it as a permission problem; else it is ok with `ok`.
fn supported(
    name: &str,
    probes: &[(&str, Result<bool, String>)],
    (verb, kind): (&str, &str),
    fix: &str,
    ok: &str,
) -> Check {
    let missing: Vec<&str> = probes
        .iter()
        .filter(|(_, r)| matches!(r, Ok(false)))
        .map(|(n, _)| *n)
        .collect();
    let errors: Vec<String> = probes
        .iter()
        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
        .collect();
    if !missing.is_empty() {
        Check::new(
            name,
            Level::Fail,
            format!("the kernel cannot {verb} {} {kind}", missing.join(", ")),
        )
        .fix(fix)
    } else if !errors.is_empty() {
        Check::new(
            name,
            Level::Fail,
            format!("probing failed: {}", errors.join("; ")),
        )
        .fix("run as root (or with CAP_BPF + CAP_SYS_ADMIN)")
    } else {
        Check::new(name, Level::Ok, ok)
    }
}
