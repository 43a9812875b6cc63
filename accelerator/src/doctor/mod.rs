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
//!
//! This file is the report: the checks in the order they run, their text rendering (JSON is their
//! serde form) and whether they add up to a failure (the exit code). Each check lives in the file
//! named for what it looks at.
mod bpffs;
mod capabilities;
mod capture;
mod cgroup;
mod conflicts;
mod kernel;
mod probe;
mod queue_bound;

use std::path::PathBuf;

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
    /// One line for a log or an Event: the finding and what to do about it.
    pub fn line(&self) -> String {
        match &self.fix {
            Some(fix) => format!("{}: {}; fix: {fix}", self.name, self.detail),
            None => format!("{}: {}", self.name, self.detail),
        }
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
    checks.push(kernel::kernel_release());
    checks.push(capabilities::capabilities());
    let cgroup = cgroup::cgroup_check(cfg.cgroup.as_deref(), &mut checks);
    let ours = bpffs::installation(&cfg.bpffs, &mut checks);
    checks.extend(bpffs::pin_permissions(&cfg.bpffs));
    // Before our own probe programs exist, so that they are not taken for foreign ones.
    checks.extend(conflicts::foreign_programs(cgroup.as_deref(), &ours));
    checks.push(kernel::btf());
    checks.extend(kernel::program_and_map_types());
    if checks
        .iter()
        .all(|c| !(c.level == Level::Fail && (c.name == "program types" || c.name == "map types")))
    {
        checks.extend(probe::probe_load_and_attach(cgroup.as_deref()));
    }
    checks.push(queue_bound::queue_bound(cgroup.as_deref()));
    for ns in &cfg.netns {
        checks.extend(capture::istio_capture(ns, &cfg.bpffs));
    }
    Report {
        ok: checks.iter().all(|c| c.level != Level::Fail),
        checks,
    }
}

/// The checks the agent runs itself at start, before it installs: read-only and cheap (no probe
/// programs, no cgroup writes), the ones whose finding an operator cannot see otherwise. Only
/// those that did not pass (warn, fail) are returned; the agent logs each and posts it as an
/// Event on its pod.
pub fn startup_checks() -> Vec<Check> {
    let mut checks = vec![kernel::btf()];
    checks.extend(kernel::program_and_map_types());
    checks.retain(|c| c.level >= Level::Warn);
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

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
