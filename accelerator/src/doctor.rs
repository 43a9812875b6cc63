//! `meshaccel doctor`: can acceleration work on this node, and if not, why and how to fix it.
//!
//! Everything is found by **probing**, never by kernel version strings: program and map types
//! are probed by loading tiny programs and creating maps (aya's feature probes); then meshaccel's
//! own programs are loaded (the verifier is the final judge of helpers and BTF), the sk_msg
//! program is attached to its sockhash and the sock_ops program to a temporary empty child
//! cgroup (no socket is affected; everything is released before returning). Other programs that
//! would collide with meshaccel are found in the kernel: sock_ops programs in effect on the
//! cgroup (`BPF_PROG_QUERY`) and sk_msg programs loaded on the node (a socket carries one sk_msg
//! program, so another sockmap accelerator makes meshaccel's inserts fail). For a pod network
//! namespace (`--netns`), Istio's capture rules are read with `iptables-save` inside it.
use std::{
    collections::BTreeSet,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    Ebpf,
    maps::{MapType, SockHash},
    programs::{CgroupAttachMode, ProgramType, SkMsg, SockOps},
};
use meshaccel_common::{PairKey, names};

use crate::dataplane::Dataplane;

/// How bad a finding is. `Fail` means acceleration cannot work (non-zero exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

/// One finding.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    /// What to do about it (for `warn` and `fail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, level: Level, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            level,
            detail: detail.into(),
            fix: None,
        }
    }
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// All findings; `ok` is false when any of them is `fail`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let tag = match c.level {
                Level::Ok => "[ OK ]",
                Level::Info => "[INFO]",
                Level::Warn => "[WARN]",
                Level::Fail => "[FAIL]",
            };
            out.push_str(&format!("{tag} {}: {}\n", c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("       fix: {fix}\n"));
            }
        }
        let fails = self
            .checks
            .iter()
            .filter(|c| c.level == Level::Fail)
            .count();
        let warns = self
            .checks
            .iter()
            .filter(|c| c.level == Level::Warn)
            .count();
        if self.ok {
            out.push_str(&format!(
                "OK: acceleration can work on this node ({warns} warning(s))\n"
            ));
        } else {
            out.push_str(&format!(
                "NOT OK: {fails} problem(s) stop acceleration on this node ({warns} warning(s))\n"
            ));
        }
        out
    }
}

/// What to check.
#[derive(Clone, Debug)]
pub struct DoctorConfig {
    /// The cgroup v2 folder the agent attaches to (default: the cgroup v2 root).
    pub cgroup: Option<PathBuf>,
    /// The agent's bpffs folder.
    pub bpffs: PathBuf,
    /// Pod network namespaces to look for Istio's capture rules in.
    pub netns: Vec<PathBuf>,
}

/// Runs every check.
pub fn run(cfg: &DoctorConfig) -> Report {
    let mut checks = Vec::new();
    checks.push(kernel_release());
    checks.push(capabilities());
    let cgroup = cgroup_check(cfg.cgroup.as_deref(), &mut checks);
    let ours = installation(&cfg.bpffs, &mut checks);
    checks.extend(pin_permissions(&cfg.bpffs));
    // Before our own probe programs exist, so that they are not taken for foreign ones.
    checks.extend(foreign_programs(cgroup.as_deref(), &ours));
    checks.push(btf());
    checks.extend(program_and_map_types());
    if checks
        .iter()
        .all(|c| !(c.level == Level::Fail && (c.name == "program types" || c.name == "map types")))
    {
        checks.extend(probe_load_and_attach(cgroup.as_deref()));
    }
    checks.push(queue_bound(cgroup.as_deref()));
    for ns in &cfg.netns {
        checks.extend(istio_capture(ns, &cfg.bpffs));
    }
    Report {
        ok: checks.iter().all(|c| c.level != Level::Fail),
        checks,
    }
}

fn kernel_release() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Check::new(
        "kernel",
        Level::Info,
        format!("Linux {release} (support is probed below, not inferred from the version)"),
    )
}

/// Bits of the effective capability set (`CapEff` in /proc/self/status).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn capabilities() -> Check {
    const FIX: &str = "run as root; in a container grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON (the Helm chart does)";
    let Some(eff) = effective_caps() else {
        return Check::new(
            "capabilities",
            Level::Warn,
            "cannot read CapEff from /proc/self/status",
        );
    };
    let has = |c: u32| eff & (1 << c) != 0;
    let missing = |caps: &[(u32, &'static str)]| -> Vec<&'static str> {
        caps.iter()
            .filter(|(c, _)| !has(*c))
            .map(|(_, n)| *n)
            .collect()
    };
    let hard = missing(&[
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]);
    let soft = missing(&[(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]);
    if !hard.is_empty() {
        Check::new(
            "capabilities",
            Level::Fail,
            format!(
                "missing {} (attaching to a cgroup and entering network namespaces need them)",
                hard.join(", ")
            ),
        )
        .fix(FIX)
    } else if !soft.is_empty() {
        Check::new(
            "capabilities",
            Level::Warn,
            format!(
                "missing {}; CAP_SYS_ADMIN stands in for them on this kernel if the probes below pass",
                soft.join(", ")
            ),
        )
        .fix(FIX)
    } else {
        Check::new(
            "capabilities",
            Level::Ok,
            "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON",
        )
    }
}

fn btf() -> Check {
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

fn program_and_map_types() -> Vec<Check> {
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

/// Loads meshaccel's programs (verifier), attaches sk_msg to the object's own sockhash and
/// sock_ops to a new empty child cgroup; releases everything, and waits until the kernel has
/// freed the probe's programs (so that a doctor run right after this one does not take them for
/// another accelerator's).
fn probe_load_and_attach(cgroup: Option<&Path>) -> Vec<Check> {
    let mut ids = Vec::new();
    let out = probe(cgroup, &mut ids);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline
        && aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .any(|p| ids.contains(&p.id()))
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    out
}

fn probe(cgroup: Option<&Path>, ids: &mut Vec<u32>) -> Vec<Check> {
    let mut out = Vec::new();
    let mut ebpf = match Ebpf::load(crate::dataplane::EBPF_OBJECT) {
        Ok(e) => e,
        Err(e) => {
            out.push(
                Check::new(
                    "load",
                    Level::Fail,
                    format!("creating meshaccel's maps / reading its object: {e:#}"),
                )
                .fix("see the error; a kernel with BTF and sk_storage support is needed"),
            );
            return out;
        }
    };
    let socks_fd = match ebpf.map(names::SOCKS).map(SockHash::<_, PairKey>::try_from) {
        Some(Ok(m)) => m.fd().try_clone(),
        _ => Err(io::Error::other("no sockhash in the object")),
    };
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    if let Some(Ok(p)) = ebpf
        .program_mut(names::PROG_SK_MSG)
        .map(<&mut SkMsg>::try_from)
    {
        match p.load() {
            Ok(()) => {
                loaded.push(names::PROG_SK_MSG);
                ids.extend(p.info().ok().map(|i| i.id()));
            }
            Err(e) => failed.push(format!("{}: {e:#}", names::PROG_SK_MSG)),
        }
    }
    if let Some(Ok(p)) = ebpf
        .program_mut(names::PROG_SOCK_OPS)
        .map(<&mut SockOps>::try_from)
    {
        match p.load() {
            Ok(()) => {
                loaded.push(names::PROG_SOCK_OPS);
                ids.extend(p.info().ok().map(|i| i.id()));
            }
            Err(e) => failed.push(format!("{}: {e:#}", names::PROG_SOCK_OPS)),
        }
    }
    if !failed.is_empty() || loaded.len() != 2 {
        out.push(
            Check::new(
                "load",
                Level::Fail,
                format!(
                    "the verifier rejected meshaccel's programs: {}",
                    truncate(&failed.join("; "), 1500)
                ),
            )
            .fix("this kernel lacks a helper or map feature meshaccel uses (bpf_msg_redirect_hash, bpf_sk_storage_get, bpf_get_netns_cookie in sock_ops and sk_msg)"),
        );
        return out;
    }
    out.push(Check::new(
        "load",
        Level::Ok,
        "the verifier accepts meshaccel's sock_ops and sk_msg programs",
    ));

    // sk_msg on the sockhash.
    let msg_attach = socks_fd.map_err(|e| e.to_string()).and_then(|fd| {
        let p: &mut SkMsg = ebpf
            .program_mut(names::PROG_SK_MSG)
            .and_then(|p| p.try_into().ok())
            .ok_or("no sk_msg program")?;
        p.attach(&fd).map(|_| ()).map_err(|e| format!("{e:#}"))
    });
    if let Err(e) = &msg_attach {
        out.push(
            Check::new(
                "attach sk_msg",
                Level::Fail,
                format!("attaching sk_msg to a sockhash: {e}"),
            )
            .fix("needs CONFIG_BPF_STREAM_PARSER"),
        );
    }

    // sock_ops on an empty child cgroup: the same call as the agent's, on no sockets.
    let Some(cgroup) = cgroup else {
        out.push(Check::new(
            "attach",
            Level::Warn,
            "no cgroup v2 to probe attaching sock_ops on",
        ));
        return out;
    };
    let child = cgroup.join(format!("meshaccel-doctor-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&child) {
        out.push(
            Check::new(
                "attach",
                Level::Warn,
                format!(
                    "cannot create a probe cgroup {}: {e}; attach not probed",
                    child.display()
                ),
            )
            .fix("run doctor as root with the node's cgroup v2 mounted read-write"),
        );
        return out;
    }
    let res = (|| -> Result<(), String> {
        let f = File::open(&child).map_err(|e| e.to_string())?;
        let p: &mut SockOps = ebpf
            .program_mut(names::PROG_SOCK_OPS)
            .and_then(|p| p.try_into().ok())
            .ok_or("no sock_ops program")?;
        let id = p
            .attach(&f, CgroupAttachMode::Single)
            .map_err(|e| format!("{e:#}"))?;
        p.detach(id).map_err(|e| format!("{e:#}"))
    })();
    let rm = std::fs::remove_dir(&child);
    match res {
        Ok(()) if msg_attach.is_ok() => out.push(Check::new(
            "attach",
            Level::Ok,
            format!(
                "sock_ops attaches to a cgroup under {} with a bpf_link; sk_msg attaches to a sockhash",
                cgroup.display()
            ),
        )),
        Ok(()) => {}
        Err(e) => out.push(
            Check::new(
                "attach",
                Level::Fail,
                format!("attaching sock_ops to a cgroup under {}: {e}", cgroup.display()),
            )
            .fix("another program attached to this cgroup or an ancestor without BPF_F_ALLOW_MULTI blocks it (see `other programs`); or the kernel lacks CONFIG_CGROUP_BPF"),
        ),
    }
    if let Err(e) = rm {
        out.push(Check::new(
            "attach",
            Level::Warn,
            format!("could not remove the probe cgroup {}: {e}", child.display()),
        ));
    }
    out
}

/// Whether `--max-unread-bytes` bounds anything on this kernel (kernel hazard 5): probed with a
/// loopback connection in a probe cgroup, else judged by the kernel version.
fn queue_bound(cgroup: Option<&Path>) -> Check {
    let probed = match cgroup {
        Some(cg) => crate::queue_charge::probe(cg),
        None => Err("no cgroup v2 to probe in".into()),
    };
    queue_bound_check(&probed, &crate::queue_charge::release())
}

/// The check from the probe's result, or from the release when it could not probe (pure).
fn queue_bound_check(probed: &Result<crate::queue_charge::Probed, String>, release: &str) -> Check {
    use crate::queue_charge::{ByVersion, CHARGED_SINCE, CONSEQUENCE, Probed};
    const NAME: &str = "queue bound";
    const FIX: &str = "use Linux 6.13 or later, or a stable kernel with the backport of \"tcp_bpf: charge receive socket buffer in bpf_tcp_ingress()\"";
    let since = format!("{}.{}", CHARGED_SINCE.0, CHARGED_SINCE.1);
    match probed {
        Ok(Probed::Charged { redirected }) => Check::new(
            NAME,
            Level::Ok,
            format!(
                "redirected bytes count against the receiving socket (probed: a sender to a reader that read nothing was held on TCP after {redirected} bytes): --max-unread-bytes bounds what a stalled reader queues"
            ),
        ),
        Ok(Probed::NotCharged { redirected }) => Check::new(
            NAME,
            Level::Warn,
            format!(
                "redirected bytes do not count against the receiving socket on this kernel (probed: {redirected} bytes redirected to a reader that read none, never held): {CONSEQUENCE}"
            ),
        )
        .fix(FIX),
        Err(why) => match crate::queue_charge::judge_release(release) {
            Some(ByVersion::Charged) => Check::new(
                NAME,
                Level::Info,
                format!(
                    "not probed ({why}); Linux {release} is {since} or later, which counts redirected bytes against the receiving socket"
                ),
            ),
            Some(ByVersion::NotUnlessBackported) => Check::new(
                NAME,
                Level::Warn,
                format!(
                    "not probed ({why}); Linux {release} is older than {since}: unless it carries the backport, redirected bytes do not count against the receiving socket and {CONSEQUENCE}"
                ),
            )
            .fix(FIX),
            None => Check::new(
                NAME,
                Level::Warn,
                format!("not probed ({why}), and the kernel version {release:?} cannot be read"),
            ),
        },
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn cgroup_check(given: Option<&Path>, checks: &mut Vec<Check>) -> Option<PathBuf> {
    let v1_too = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("cgroup"))
    });
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => match crate::cgroup::cgroup2_root() {
            Some(p) => p,
            None => {
                checks.push(
                    Check::new("cgroup v2", Level::Fail, "no cgroup2 mount in /proc/mounts")
                        .fix("mount cgroup v2 (`mount -t cgroup2 none /sys/fs/cgroup/unified` on a hybrid host), or pass --cgroup"),
                );
                return None;
            }
        },
    };
    if !crate::cgroup::is_cgroup2(&path) {
        checks.push(
            Check::new(
                "cgroup v2",
                Level::Fail,
                format!("{} is not a cgroup v2 folder", path.display()),
            )
            .fix("pass --cgroup (MESHACCEL_CGROUP) a folder of the cgroup v2 hierarchy; in the Helm chart set hostPaths.cgroup to the node's cgroup v2 root"),
        );
        return None;
    }
    checks.push(Check::new(
        "cgroup v2",
        Level::Ok,
        format!(
            "{}{}",
            path.display(),
            if v1_too {
                " (hybrid host: cgroup v1 is mounted too; sock_ops uses v2)"
            } else {
                ""
            }
        ),
    ));
    Some(path)
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// The bpffs check and, when meshaccel is installed there, what it holds. Returns the ids of
/// meshaccel's own programs under `bpffs`.
fn installation(bpffs: &Path, checks: &mut Vec<Check>) -> BTreeSet<u32> {
    let mut ours = BTreeSet::new();
    // The folder, or the nearest existing ancestor (the agent creates the folder on it).
    let on_bpffs = bpffs.ancestors().find(|p| p.exists()).is_some_and(is_bpffs);
    if on_bpffs {
        checks.push(Check::new(
            "bpffs",
            Level::Ok,
            format!("{} is on a bpffs", bpffs.display()),
        ));
    } else {
        checks.push(
            Check::new(
                "bpffs",
                Level::Warn,
                format!(
                    "{} is not on a bpffs: the agent will mount one (there, or on its empty parent), and its pins (which keep acceleration attached across agent restarts) then live only as long as that mount — in a container, as long as the container",
                    bpffs.display()
                ),
            )
            .fix("mount the node's bpffs (`mount -t bpf bpf /sys/fs/bpf`; systemd does it at boot on most distributions) and, in Kubernetes, mount it into the agent (the chart's hostPaths.bpffs)"),
        );
    }
    if Dataplane::is_installed(bpffs) {
        match Dataplane::open(bpffs).and_then(|d| d.status()) {
            Ok(st) => {
                ours.extend(st.prog_ids.iter().copied());
                checks.push(Check::new(
                    "installation",
                    Level::Info,
                    format!(
                        "meshaccel is installed under {}: acceleration {}, {} socket(s), {} workload(s) enabled, link {:?}, programs {:?}",
                        bpffs.display(),
                        if st.enabled { "on" } else { "off" },
                        st.sockets,
                        st.workloads_enabled,
                        st.link_id,
                        st.prog_ids
                    ),
                ));
            }
            Err(e) => checks.push(
                Check::new(
                    "installation",
                    Level::Warn,
                    format!("pins under {} cannot be read: {e}", bpffs.display()),
                )
                .fix(format!(
                    "`meshaccel uninstall --bpffs {}` and restart the agent",
                    bpffs.display()
                )),
            ),
        }
    } else {
        checks.push(Check::new(
            "installation",
            Level::Info,
            format!("nothing of meshaccel is pinned under {}", bpffs.display()),
        ));
    }
    ours
}

/// Whether others than root can reach meshaccel's pins (`MESHACCEL_PEERS` holds kernel socket
/// addresses). Nothing to say when nothing is pinned.
fn pin_permissions(bpffs: &Path) -> Option<Check> {
    if crate::pin_mode::entries(bpffs).iter().all(|(_, dir)| *dir) {
        return None;
    }
    Some(permissions_check(
        bpffs,
        &crate::pin_mode::open_to_others(bpffs),
    ))
}

/// The check from the entries found open to others (pure, for tests).
fn permissions_check(bpffs: &Path, open: &[(PathBuf, u32)]) -> Check {
    const NAME: &str = "pin permissions";
    if open.is_empty() {
        return Check::new(
            NAME,
            Level::Ok,
            format!(
                "{} and its folders are {:o}, its pins {:o}: only root opens them",
                bpffs.display(),
                crate::pin_mode::DIR_MODE,
                crate::pin_mode::PIN_MODE
            ),
        );
    }
    let list: Vec<String> = open
        .iter()
        .map(|(p, m)| format!("{} ({m:o})", p.display()))
        .collect();
    Check::new(
        NAME,
        Level::Warn,
        format!(
            "others than root can reach {}: the pins hold kernel socket addresses (MESHACCEL_PEERS) and steer traffic",
            list.join(", ")
        ),
    )
    .fix(format!(
        "restart the agent (it sets the folders to {:o} and the pins to {:o}), or `chmod -R go-rwx {}`",
        crate::pin_mode::DIR_MODE,
        crate::pin_mode::PIN_MODE,
        bpffs.display()
    ))
}

use crate::bpf_sys::{BPF_CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE};

/// Programs of `attach_type` on the cgroup at `cgroup`: (the cgroup's own attach flags, ids).
/// With `effective`, the programs that run for its sockets (inherited ones included).
fn prog_query(cgroup: &Path, attach_type: u32, effective: bool) -> io::Result<(u32, Vec<u32>)> {
    let f = File::open(cgroup)?;
    let flags = if effective {
        crate::bpf_sys::BPF_F_QUERY_EFFECTIVE
    } else {
        0
    };
    crate::bpf_sys::prog_query(std::os::fd::AsFd::as_fd(&f), attach_type, flags)
}

fn prog_label(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .map(|p| format!("id {id} `{}`", p.name_as_str().unwrap_or("?")))
        .unwrap_or_else(|| format!("id {id}"))
}

/// sock_ops programs in effect on the cgroup and sk_msg programs on the node that are not ours.
fn foreign_programs(cgroup: Option<&Path>, ours: &BTreeSet<u32>) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(cg) = cgroup {
        match (
            prog_query(cg, BPF_CGROUP_SOCK_OPS, true),
            prog_query(cg, BPF_CGROUP_SOCK_OPS, false),
        ) {
            (Ok((_, effective)), Ok((own_flags, own))) => {
                let foreign: Vec<u32> = effective
                    .iter()
                    .copied()
                    .filter(|id| !ours.contains(id))
                    .collect();
                let exclusive = !own.is_empty()
                    && own.iter().any(|id| !ours.contains(id))
                    && own_flags & (BPF_F_ALLOW_MULTI | BPF_F_ALLOW_OVERRIDE) == 0;
                if exclusive {
                    out.push(
                        Check::new(
                            "other sock_ops",
                            Level::Fail,
                            format!(
                                "{} is attached to {} exclusively (no BPF_F_ALLOW_MULTI): attaching meshaccel's sock_ops there fails",
                                foreign.iter().map(|i| prog_label(*i)).collect::<Vec<_>>().join(", "),
                                cg.display()
                            ),
                        )
                        .fix("remove the other program (`bpftool cgroup show` / `bpftool cgroup detach`) or have it attach with BPF_F_ALLOW_MULTI"),
                    );
                } else if !foreign.is_empty() {
                    out.push(
                        Check::new(
                            "other sock_ops",
                            Level::Warn,
                            format!(
                                "{} also run(s) for sockets under {}; harmless unless it puts them into a sockmap of its own (see `other sk_msg`)",
                                foreign.iter().map(|i| prog_label(*i)).collect::<Vec<_>>().join(", "),
                                cg.display()
                            ),
                        )
                        .fix("check what the program is: `bpftool cgroup tree`, `bpftool prog show id ID`"),
                    );
                } else {
                    out.push(Check::new(
                        "other sock_ops",
                        Level::Ok,
                        format!(
                            "no other sock_ops program runs for sockets under {}",
                            cg.display()
                        ),
                    ));
                }
            }
            (Err(e), _) | (_, Err(e)) => out.push(Check::new(
                "other sock_ops",
                Level::Warn,
                format!("cannot query the programs on {}: {e}", cg.display()),
            )),
        }
    }
    let sk_msg = ProgramType::SkMsg;
    let mut foreign = Vec::new();
    let mut errors = 0;
    for p in aya::programs::loaded_programs() {
        match p {
            Ok(p) if p.program_type() == sk_msg.into() && !ours.contains(&p.id()) => {
                foreign.push(format!(
                    "id {} `{}`{}",
                    p.id(),
                    p.name_as_str().unwrap_or("?"),
                    if p.name_as_str() == Some(names::PROG_SK_MSG) {
                        " (another meshaccel agent, with a different --bpffs?)"
                    } else {
                        ""
                    }
                ));
            }
            Ok(_) => {}
            Err(_) => errors += 1,
        }
    }
    if !foreign.is_empty() {
        out.push(
            Check::new(
                "other sk_msg",
                Level::Fail,
                format!(
                    "another sockmap accelerator is loaded: sk_msg program {}; a socket carries one sk_msg program, so meshaccel's inserts of every socket it holds fail",
                    foreign.join(", ")
                ),
            )
            .fix("run one sockmap accelerator per node: disable the other (e.g. Cilium's sockops acceleration, Merbridge) or uninstall it (`bpftool prog show` names it)"),
        );
    } else if errors > 0 {
        out.push(Check::new(
            "other sk_msg",
            Level::Warn,
            format!("{errors} loaded program(s) could not be inspected"),
        ));
    } else {
        out.push(Check::new(
            "other sk_msg",
            Level::Ok,
            "no other sk_msg program is loaded",
        ));
    }
    out
}

/// Istio's sidecar capture as found in one netns's iptables rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// Some ISTIO_* chain exists.
    pub chains: bool,
    /// `ISTIO_REDIRECT`'s `--to-ports` (Envoy's virtualOutbound).
    pub outbound_port: Option<u16>,
    /// `ISTIO_IN_REDIRECT`'s `--to-ports`, or `ISTIO_TPROXY`'s `--on-port` (virtualInbound).
    pub inbound_port: Option<u16>,
    /// Outbound traffic is sent to ISTIO_REDIRECT (not only declared).
    pub outbound_active: bool,
    /// Inbound traffic is sent to ISTIO_IN_REDIRECT / ISTIO_TPROXY.
    pub inbound_active: bool,
    pub tproxy: bool,
    /// The proxy's uid (`-m owner --uid-owner N -j RETURN` in ISTIO_OUTPUT).
    pub proxy_uid: Option<u32>,
}

/// Reads Istio's capture from `iptables-save` output (all tables; `-N` or `:` chain lines).
pub fn parse_capture(save: &str) -> Capture {
    let mut c = Capture::default();
    let after = |words: &[&str], flag: &str| -> Option<String> {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
    };
    for line in save.lines() {
        let line = line.trim();
        if line.starts_with("-N ISTIO_") || line.starts_with(":ISTIO_") {
            c.chains = true;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 2 || (words[0] != "-A" && words[0] != "-I") {
            continue;
        }
        let chain = words[1];
        let target = after(&words, "-j");
        match (chain, target.as_deref()) {
            ("ISTIO_REDIRECT", Some("REDIRECT")) => {
                c.outbound_port = after(&words, "--to-ports").and_then(|p| p.parse().ok());
            }
            ("ISTIO_IN_REDIRECT", Some("REDIRECT")) => {
                c.inbound_port = after(&words, "--to-ports").and_then(|p| p.parse().ok());
            }
            ("ISTIO_TPROXY", Some("TPROXY")) => {
                c.tproxy = true;
                c.inbound_port = after(&words, "--on-port").and_then(|p| p.parse().ok());
            }
            ("ISTIO_OUTPUT", Some("ISTIO_REDIRECT")) => c.outbound_active = true,
            ("ISTIO_INBOUND", Some("ISTIO_IN_REDIRECT" | "ISTIO_TPROXY")) => {
                c.inbound_active = true;
            }
            ("ISTIO_OUTPUT", Some("RETURN")) if c.proxy_uid.is_none() => {
                if let Some(i) = words.iter().position(|w| *w == "--uid-owner")
                    && words.get(i.wrapping_sub(1)) != Some(&"!")
                {
                    c.proxy_uid = words.get(i + 1).and_then(|u| u.parse().ok());
                }
            }
            _ => {}
        }
    }
    c
}

/// `iptables-save` of every backend present, run inside the netns at `path`.
fn iptables_save_in(path: &Path) -> io::Result<String> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only; the thread ends right after. Children spawned
            // from it start in this netns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut all = String::new();
            let mut ran = false;
            for tool in ["iptables-legacy-save", "iptables-nft-save", "iptables-save"] {
                if ran && tool == "iptables-save" {
                    break;
                }
                if let Ok(out) = Command::new(tool).output()
                    && out.status.success()
                {
                    ran = true;
                    all.push_str(&String::from_utf8_lossy(&out.stdout));
                }
            }
            if ran {
                Ok(all)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no iptables-save found (install iptables)",
                ))
            }
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

fn istio_capture(ns: &Path, bpffs: &Path) -> Vec<Check> {
    let name = format!("istio capture {}", ns.display());
    let mut out = Vec::new();
    let save = match iptables_save_in(ns) {
        Ok(s) => s,
        Err(e) => {
            out.push(
                Check::new(&name, Level::Fail, format!("cannot read the rules there: {e}"))
                    .fix("pass a network namespace file: /proc/PID/ns/net of a process of the pod, or /run/netns/NAME"),
            );
            return out;
        }
    };
    let c = parse_capture(&save);
    if !c.chains {
        out.push(
            Check::new(
                &name,
                Level::Warn,
                "no ISTIO_* chains: this pod has no sidecar capture (istio-init / istio-cni did not run, or it has no sidecar)",
            )
            .fix("label its namespace for injection (`istio-injection=enabled` or `istio.io/rev`) and restart the pod; meshaccel still pairs its other local connections when its workload is enabled"),
        );
    } else {
        let port = |p: Option<u16>| p.map_or("?".to_string(), |p| p.to_string());
        let detail = format!(
            "outbound → {}{}, inbound → {}{} ({}), proxy uid {}",
            port(c.outbound_port),
            if c.outbound_active {
                ""
            } else {
                " (not applied to any traffic)"
            },
            port(c.inbound_port),
            if c.inbound_active {
                ""
            } else {
                " (not applied to any traffic)"
            },
            if c.tproxy { "TPROXY" } else { "REDIRECT" },
            c.proxy_uid.map_or("?".to_string(), |u| u.to_string()),
        );
        let level = if c.outbound_port.is_some() && c.inbound_port.is_some() {
            Level::Ok
        } else {
            Level::Warn
        };
        out.push(Check::new(&name, level, format!("Istio capture: {detail}")));
    }
    // Is the pod's workload enabled in meshaccel's maps?
    if let (Ok(cookie), Ok(dp)) = (crate::netns::cookie_of_path(ns), Dataplane::open(bpffs)) {
        let on = dp.workloads.get(&cookie, 0).is_ok();
        out.push(Check::new(
            format!("workload {}", ns.display()),
            Level::Info,
            format!(
                "netns cookie {cookie}: acceleration {} for it in meshaccel's maps",
                if on { "enabled" } else { "not enabled" }
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> String {
        let dir = std::env::var_os("MESHACCEL_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
        let p = dir.join("iptables").join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "fixture {} not found ({e}): set MESHACCEL_FIXTURES to the shared fixtures",
                p.display()
            )
        })
    }

    #[test]
    fn capture_from_istio_goldens() {
        let basic = parse_capture(&fixture("istio-cni-sidecar/basic.txt.golden"));
        assert_eq!(
            basic,
            Capture {
                chains: true,
                outbound_port: Some(15001),
                inbound_port: Some(15006),
                outbound_active: true,
                inbound_active: true,
                tproxy: false,
                proxy_uid: Some(1337),
            }
        );
        let tp = parse_capture(&fixture("istio-cni-sidecar/tproxy.txt.golden"));
        assert!(
            tp.tproxy && tp.inbound_active && tp.outbound_active,
            "{tp:?}"
        );
        assert_eq!(
            (tp.outbound_port, tp.inbound_port),
            (Some(15001), Some(15006))
        );
        let uid = parse_capture(&fixture("istio-cni-sidecar/custom-uid.txt.golden"));
        assert!(uid.proxy_uid.is_some_and(|u| u != 1337), "{uid:?}");
        // No include ranges: outbound capture is declared but not applied.
        let empty = parse_capture(&fixture("istio-iptables-capture/empty.golden"));
        assert!(empty.chains && !empty.outbound_active, "{empty:?}");
        // iptables-save's own format declares chains with ':'.
        let saved = ":ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n";
        assert!(parse_capture(saved).chains);
        assert_eq!(
            parse_capture("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            Capture::default()
        );
    }

    #[test]
    fn cap_eff_is_parsed() {
        let s = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let caps = parse_cap_eff(s).unwrap();
        assert!(caps & (1 << CAP_BPF) != 0 && caps & (1 << CAP_SYS_ADMIN) != 0);
        assert_eq!(parse_cap_eff("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(parse_cap_eff("nothing"), None);
    }

    #[test]
    fn pins_open_to_others_are_flagged_by_name() {
        let b = Path::new("/sys/fs/bpf/meshaccel");
        let ok = permissions_check(b, &[]);
        assert_eq!(ok.level, Level::Ok, "{ok:?}");
        let peers = b.join("maps/MESHACCEL_PEERS");
        let c = permissions_check(b, &[(b.to_path_buf(), 0o755), (peers, 0o644)]);
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.contains("/sys/fs/bpf/meshaccel (755)")
                && c.detail.contains("maps/MESHACCEL_PEERS (644)"),
            "{c:?}"
        );
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("chmod -R go-rwx /sys/fs/bpf/meshaccel")),
            "{c:?}"
        );
    }

    #[test]
    fn queue_bound_probed_or_judged_by_version() {
        use crate::queue_charge::Probed;
        let c = queue_bound_check(&Ok(Probed::Charged { redirected: 65536 }), "5.10.0");
        assert_eq!(c.level, Level::Ok, "a probe beats the version: {c:?}");
        let c = queue_bound_check(&Ok(Probed::NotCharged { redirected: 262144 }), "6.18.0");
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.detail.contains("262144 bytes") && c.detail.contains("bounds nothing"),
            "{c:?}"
        );
        let why = Err("cannot create a probe cgroup".to_string());
        let c = queue_bound_check(&why, "6.13.2");
        assert_eq!(c.level, Level::Info, "{c:?}");
        assert!(
            c.detail
                .contains("not probed (cannot create a probe cgroup)"),
            "{c:?}"
        );
        let c = queue_bound_check(&why, "6.6.58-lts");
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.detail.contains("older than 6.13")
                && c.detail.contains("--max-unread-bytes bounds nothing"),
            "{c:?}"
        );
        assert!(c.fix.as_deref().is_some_and(|f| f.contains("backport")));
        assert_eq!(queue_bound_check(&why, "??").level, Level::Warn);
    }

    #[test]
    fn report_fails_on_any_fail() {
        let r = Report {
            ok: false,
            checks: vec![
                Check::new("a", Level::Ok, "fine"),
                Check::new("b", Level::Fail, "broken").fix("do this"),
            ],
        };
        let t = r.render_text();
        assert!(t.contains("[FAIL] b: broken\n       fix: do this"), "{t}");
        assert!(t.contains("NOT OK: 1 problem(s)"), "{t}");
    }
}
