//! A pod: a network namespace and a cgroup v2 directory, as plain data.

use std::{
    fs::{self, File},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    thread,
};

use anyhow::{Context as _, bail};

/// One pod of a [`crate::Mesh`]. Plain data: cloning it creates nothing, dropping it removes
/// nothing (the `Mesh` owns the resources).
#[derive(Clone, Debug)]
pub struct Pod {
    /// The name given to [`crate::Mesh::add_pod`].
    pub name: String,
    /// `ma-<runid>-<name>`, as listed by `ip netns`.
    pub netns_name: String,
    /// `/run/netns/<netns_name>`.
    pub netns_path: PathBuf,
    /// `<cgroup2 mount>/meshaccel-<runid>/ma-<runid>-<name>`.
    pub cgroup: PathBuf,
    /// The address of the pod's `eth0` (a /24 shared by the run's pods).
    pub ip: Ipv4Addr,
}

/// TCP counters of one network namespace (`Tcp:` of /proc/net/snmp).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub active_opens: u64,
    pub passive_opens: u64,
    pub curr_estab: u64,
    pub in_segs: u64,
    pub out_segs: u64,
    pub retrans_segs: u64,
}

impl TcpCounters {
    /// The growth since `before` (saturating; `curr_estab` is a gauge and kept as is).
    pub fn since(&self, before: &TcpCounters) -> TcpCounters {
        TcpCounters {
            active_opens: self.active_opens.saturating_sub(before.active_opens),
            passive_opens: self.passive_opens.saturating_sub(before.passive_opens),
            curr_estab: self.curr_estab,
            in_segs: self.in_segs.saturating_sub(before.in_segs),
            out_segs: self.out_segs.saturating_sub(before.out_segs),
            retrans_segs: self.retrans_segs.saturating_sub(before.retrans_segs),
        }
    }

    /// Parses the `Tcp:` header and value lines of /proc/net/snmp.
    pub fn parse_snmp(snmp: &str) -> anyhow::Result<TcpCounters> {
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            bail!("no Tcp: lines in snmp");
        };
        let mut c = TcpCounters::default();
        for (name, value) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            // CurrEstab is unsigned; MaxConn is -1 and ignored.
            let field = match name {
                "ActiveOpens" => &mut c.active_opens,
                "PassiveOpens" => &mut c.passive_opens,
                "CurrEstab" => &mut c.curr_estab,
                "InSegs" => &mut c.in_segs,
                "OutSegs" => &mut c.out_segs,
                "RetransSegs" => &mut c.retrans_segs,
                _ => continue,
            };
            *field = value
                .parse()
                .with_context(|| format!("snmp Tcp {name}={value}"))?;
        }
        Ok(c)
    }
}

impl Pod {
    /// The pod netns' TCP counters, read from /proc/thread-self/net/snmp by a short-lived thread
    /// that joined the netns (the calling thread's netns is untouched).
    /// The kernel's cookie of the pod's netns (what meshaccel's maps key workloads by).
    pub fn netns_cookie(&self) -> anyhow::Result<u64> {
        meshaccel::netns::cookie_of_path(&self.netns_path)
            .with_context(|| format!("netns cookie of {}", self.netns_path.display()))
    }

    pub fn tcp_counters(&self) -> anyhow::Result<TcpCounters> {
        let ns = File::open(&self.netns_path)
            .with_context(|| format!("opening {}", self.netns_path.display()))?;
        let snmp = thread::spawn(move || -> anyhow::Result<String> {
            // SAFETY: plain syscall on an fd this closure owns; only this thread changes netns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
            }
            fs::read_to_string("/proc/thread-self/net/snmp")
                .context("reading /proc/thread-self/net/snmp")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("snmp reader thread panicked"))?
        .with_context(|| format!("TCP counters of pod {}", self.name))?;
        TcpCounters::parse_snmp(&snmp)
    }

    /// A `Command` running `program` in the pod netns (`nsenter --net=<path> -- program`), as
    /// root, in the caller's cgroup. For pod workloads use [`crate::Mesh::spawn`] instead.
    pub fn netns_command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args` in the pod netns (see [`Pod::netns_command`]) and returns its output;
    /// fails, quoting stderr, when it exits non-zero. (`nsenter`, not `ip netns exec`, which
    /// remounts /sys.)
    pub fn netns_exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let out = self
            .netns_command(program)
            .args(args)
            .output()
            .with_context(|| format!("running nsenter {program} in pod {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{program} {} in pod {}: {}: {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 2 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
            Tcp: 1 200 120000 -1 3 4 0 0 2 1234 5678 9 0 0 0\n\
            Udp: InDatagrams\nUdp: 0\n";
        let c = TcpCounters::parse_snmp(snmp).unwrap();
        assert_eq!(
            c,
            TcpCounters {
                active_opens: 3,
                passive_opens: 4,
                curr_estab: 2,
                in_segs: 1234,
                out_segs: 5678,
                retrans_segs: 9
            }
        );
        let d = c.since(&TcpCounters {
            in_segs: 1000,
            ..Default::default()
        });
        assert_eq!(d.in_segs, 234);
        assert!(TcpCounters::parse_snmp("Ip: x\n").is_err());
    }
}
