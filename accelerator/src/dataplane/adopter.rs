//! Adopting app sockets after their first write (kernel hazard 4, `SockState::late`).
//!
//! sock_ops keeps an app's socket out of the sockhash at ESTABLISHED and marks it ready at its
//! first write when it reads as an event loop does. sock_ops may insert only at ESTABLISHED;
//! a tc program may insert any time, and on the egress of a workload's `lo` it sees every
//! segment an app sends its sidecar. So each workload whose apps are not trusted gets that
//! program on its `lo` (a tcx link pinned under `links/adopt/<netns cookie>`: it outlives the
//! agent like the rest, and goes with the netns or with `uninstall`). A workload without it
//! (its netns could not be reached) keeps its apps' sockets on TCP: safe, only slower.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier,
        links::{FdLink, PinnedLink},
    },
};
use meshaccel_common::names;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The loaded adopting program.
pub struct Adopter {
    prog: OwnedFd,
    bpffs: PathBuf,
}

/// What a sync changed, by netns cookie.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub attach: Vec<u64>,
    pub detach: Vec<u64>,
}

/// The links to make and to remove so that exactly the workloads in `want` have one.
pub fn plan(want: &BTreeSet<u64>, have: &BTreeSet<u64>) -> Changes {
    Changes {
        attach: want.difference(have).copied().collect(),
        detach: have.difference(want).copied().collect(),
    }
}

impl Adopter {
    /// Loads the program from the object being installed (its maps are the pinned ones).
    /// `replace`: give pinned links this program even if theirs looks the same (an upgrade).
    pub(crate) fn load(ebpf: &mut Ebpf, bpffs: &Path, replace: bool) -> Result<Self> {
        let load = |message: String| Error::Load { message };
        let prog: &mut SchedClassifier = ebpf
            .program_mut(names::PROG_ADOPT)
            .ok_or_else(|| load(format!("no program {}", names::PROG_ADOPT)))?
            .try_into()
            .map_err(|e| load(format!("{e}")))?;
        prog.load()
            .map_err(|e| load(format!("{}: {e:#}", names::PROG_ADOPT)))?;
        let tag = prog.info().map_err(|e| load(format!("{e}")))?.tag();
        let prog = prog
            .fd()
            .map_err(|e| load(format!("{e}")))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| load(format!("dup {} fd: {e}", names::PROG_ADOPT)))?;
        let dir = bpffs.join(crate::objects::ADOPT_LINKS);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(crate::pin_mode::DIR_MODE)
            .create(&dir)
            .map_err(|e| Error::Bpffs {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        let adopter = Self {
            prog,
            bpffs: bpffs.to_path_buf(),
        };
        adopter.take_over_links(tag, replace);
        Ok(adopter)
    }

    /// Links pinned by an agent of another version run that version's program: this one's
    /// takes its place under the same link (BPF_LINK_UPDATE, atomic), as sock_ops' does at an
    /// upgrade. A link that cannot be read or updated is left as it is (its program adopts as
    /// its version did) and said so.
    fn take_over_links(&self, our_tag: u64, replace: bool) {
        for pin in crate::objects::adopt_link_pins(&self.bpffs) {
            let tag = PinnedLink::from_pin(&pin).ok().and_then(|l| {
                let prog_id = FdLink::from(l).info().ok()?.program_id();
                aya::programs::loaded_programs()
                    .filter_map(|p| p.ok())
                    .find(|p| p.id() == prog_id)
                    .map(|p| p.tag())
            });
            if tag == Some(our_tag) && !replace {
                continue;
            }
            let swapped = super::sys::obj_get(&pin)
                .and_then(|link| super::sys::link_update(link.as_fd(), self.prog.as_fd()));
            match swapped {
                Ok(()) => {
                    info!(link = %pin.display(), "the app-socket adopter's link now runs this version's program")
                }
                Err(e) => {
                    warn!(link = %pin.display(), error = %e, "cannot give the app-socket adopter's link this version's program")
                }
            }
        }
    }

    /// Workloads (netns cookies) that have a link now.
    fn linked(&self) -> BTreeSet<u64> {
        crate::objects::adopt_link_pins(&self.bpffs)
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.parse().ok())
            .collect()
    }

    /// Gives exactly the workloads in `want` a link: `paths` names their netns files where a
    /// source knew them; the others are looked for among the node's namespaces.
    pub fn sync(&self, want: &BTreeSet<u64>, paths: &BTreeMap<u64, PathBuf>) -> Changes {
        let changes = plan(want, &self.linked());
        let mut scanned: Option<BTreeMap<u64, PathBuf>> = None;
        let mut done = Changes::default();
        for &cookie in &changes.attach {
            let path = paths.get(&cookie).cloned().or_else(|| {
                scanned
                    .get_or_insert_with(|| crate::netns::paths_by_cookie(&Default::default()))
                    .get(&cookie)
                    .cloned()
            });
            let Some(path) = path else {
                warn!(
                    netns_cookie = cookie,
                    "no file of this workload's network namespace found: its apps' sockets stay on TCP"
                );
                continue;
            };
            match self.attach(cookie, &path) {
                Ok(()) => done.attach.push(cookie),
                Err(e) => {
                    warn!(netns_cookie = cookie, netns = %path.display(), error = %e, "attaching the app-socket adopter: its apps' sockets stay on TCP")
                }
            }
        }
        for &cookie in &changes.detach {
            // The link goes with its last reference: this pin (the agent keeps no fd).
            match std::fs::remove_file(self.pin(cookie)) {
                Ok(()) => done.detach.push(cookie),
                Err(e) => {
                    warn!(netns_cookie = cookie, error = %e, "removing the app-socket adopter's link")
                }
            }
        }
        if done != Changes::default() {
            info!(attached = ?done.attach, detached = ?done.detach, "app-socket adopter links");
        }
        done
    }

    /// Links the program to `lo` (ifindex 1 in every netns) of the netns at `path`, if that is
    /// the netns of `cookie`, and pins the link.
    fn attach(&self, cookie: u64, path: &Path) -> std::io::Result<()> {
        let ns = std::fs::File::open(path)?;
        let prog = self.prog.as_fd();
        let link = std::thread::scope(|s| {
            s.spawn(|| enter_and_link(ns.as_fd(), cookie, prog))
                .join()
                .map_err(|_| std::io::Error::other("netns thread panicked"))?
        })?;
        super::sys::obj_pin(link.as_fd(), &self.pin(cookie))
    }

    fn pin(&self, cookie: u64) -> PathBuf {
        self.bpffs
            .join(crate::objects::ADOPT_LINKS)
            .join(cookie.to_string())
    }
}

/// On a thread of its own (which then ends): enters the netns, checks it is `cookie`'s, links.
fn enter_and_link(
    ns: BorrowedFd<'_>,
    cookie: u64,
    prog: BorrowedFd<'_>,
) -> std::io::Result<OwnedFd> {
    // SAFETY: setns on this short-lived thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let here = crate::netns::current_cookie()?;
    if here != cookie {
        return Err(std::io::Error::other(format!(
            "the file is the network namespace of cookie {here} now, not {cookie}"
        )));
    }
    super::sys::tcx_link_create(prog, 1, super::sys::BPF_TCX_EGRESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_links_exactly_the_wanted_workloads() {
        let want: BTreeSet<u64> = [1, 2, 3].into();
        let have: BTreeSet<u64> = [3, 4].into();
        assert_eq!(
            plan(&want, &have),
            Changes {
                attach: vec![1, 2],
                detach: vec![4],
            }
        );
        assert_eq!(plan(&have, &have), Changes::default());
    }
}
