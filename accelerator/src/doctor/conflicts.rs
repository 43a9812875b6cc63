//! Other programs on the node that would collide with meshaccel's: sock_ops programs in effect on
//! the cgroup, sk_msg programs loaded anywhere.
use std::{collections::BTreeSet, fs::File, io, path::Path};

use aya::programs::ProgramType;
use meshaccel_common::names;

use super::{Check, Level};
use crate::dataplane::sys::{BPF_CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE};

/// Programs of `attach_type` on the cgroup at `cgroup`: (the cgroup's own attach flags, ids).
/// With `effective`, the programs that run for its sockets (inherited ones included).
fn prog_query(cgroup: &Path, attach_type: u32, effective: bool) -> io::Result<(u32, Vec<u32>)> {
    let f = File::open(cgroup)?;
    let flags = if effective {
        crate::dataplane::sys::BPF_F_QUERY_EFFECTIVE
    } else {
        0
    };
    crate::dataplane::sys::prog_query(std::os::fd::AsFd::as_fd(&f), attach_type, flags)
}

fn prog_label(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .map(|p| format!("id {id} `{}`", p.name_as_str().unwrap_or("?")))
        .unwrap_or_else(|| format!("id {id}"))
}

/// sock_ops programs in effect on the cgroup and sk_msg programs on the node that are not ours.
pub(super) fn foreign_programs(cgroup: Option<&Path>, ours: &BTreeSet<u32>) -> Vec<Check> {
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
