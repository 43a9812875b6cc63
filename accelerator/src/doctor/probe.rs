//! Loading meshaccel's own programs and attaching them where no socket is affected: the verifier
//! and the attach calls are the final judges of what the kernel supports.
use std::{fs::File, io, path::Path};

use aya::{
    Ebpf,
    maps::SockHash,
    programs::{CgroupAttachMode, SchedClassifier, SkMsg, SockOps},
};
use meshaccel_common::{PairKey, names};

use super::{Check, Level};

/// Loads meshaccel's programs (verifier), attaches sk_msg to the object's own sockhash and
/// sock_ops to a new empty child cgroup; releases everything, and waits until the kernel has
/// freed the probe's programs (so that a doctor run right after this one does not take them for
/// another accelerator's).
pub(super) fn probe_load_and_attach(cgroup: Option<&Path>) -> Vec<Check> {
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
    let mut ebpf = match Ebpf::load(crate::objects::EBPF_OBJECT) {
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
    if let Some(Ok(p)) = ebpf
        .program_mut(names::PROG_ADOPT)
        .map(<&mut SchedClassifier>::try_from)
    {
        match p.load() {
            Ok(()) => {
                loaded.push(names::PROG_ADOPT);
                ids.extend(p.info().ok().map(|i| i.id()));
            }
            Err(e) => failed.push(format!("{}: {e:#}", names::PROG_ADOPT)),
        }
    }
    if !failed.is_empty() || loaded.len() != 3 {
        out.push(
            Check::new(
                "load",
                Level::Fail,
                format!(
                    "the verifier rejected meshaccel's programs: {}",
                    truncate(&failed.join("; "), 1500)
                ),
            )
            .fix("this kernel lacks a helper or map feature meshaccel uses (bpf_msg_redirect_hash, bpf_sk_storage_get, bpf_get_netns_cookie in sock_ops and sk_msg; sockhash updates and bpf_sk_storage_get in tc)"),
        );
        return out;
    }
    out.push(Check::new(
        "load",
        Level::Ok,
        "the verifier accepts meshaccel's sock_ops, sk_msg and tc (app-socket adopter) programs",
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
