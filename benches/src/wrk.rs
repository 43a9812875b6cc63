//! wrk (Debian's 4.1) as an off-the-shelf load for the `wrk` benchmark: the Lua script that makes
//! it print one JSON line, and that line turned into a [`SideRun`] like the e2e tool's.
//!
//! What wrk measures, and its bias: each connection is a closed loop, latency from writing the
//! request to the end of the response. At the end, wrk "corrects" the histogram for coordinated
//! omission (`stats_correct`): for every sample above twice the mean interval between a
//! connection's requests it adds synthetic samples (value − interval, value − 2·interval, …),
//! as if the client had meant to send at the mean rate. Its percentiles (`--latency`, and the
//! histogram the script prints) include those; [`WrkReport::synthetic`] says how many there
//! were, so that a reader can tell when they matter (only the tail moves).

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::stats::{SideRun, new_hist};

/// wrk's `done` hook: summary, errors and the latency histogram (µs, `value:count …`, after
/// wrk's correction) as one JSON line on stdout.
pub const REPORT_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  local h = {}
  for i = 1, #latency do
    local v, c = latency(i)
    h[#h + 1] = string.format("%d:%d", v, c)
  end
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},"max_us":%d,"hist_us":"%s"}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.max, table.concat(h, " ")))
end
"#;

/// One wrk run, parsed.
#[derive(Debug)]
pub struct WrkReport {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub max_us: u64,
    /// (value µs, count), ascending.
    pub hist_us: Vec<(u64, u64)>,
    /// Samples wrk's correction added: histogram count − requests.
    pub synthetic: u64,
}

impl WrkReport {
    /// Parses the last line of wrk's stdout; fails on any error wrk counted (connect, read,
    /// write, non-2xx/3xx status, timeout): a bench number from a failing run is no number.
    pub fn parse(stdout: &str) -> anyhow::Result<WrkReport> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("wrk printed no report line: {stdout:?}"))?;
        let v: Value = serde_json::from_str(line).context("wrk's report line")?;
        let u = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("no {k} in wrk's report"))
        };
        let errors = &v["errors"];
        for k in ["connect", "read", "write", "status", "timeout"] {
            let n = errors[k].as_u64().unwrap_or(u64::MAX);
            ensure!(n == 0, "wrk counted {n} {k} error(s): {line}");
        }
        let mut hist_us = Vec::new();
        for pair in v["hist_us"].as_str().unwrap_or_default().split_whitespace() {
            let Some((value, count)) = pair
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            else {
                bail!("bad histogram entry {pair:?} in wrk's report");
            };
            hist_us.push((value, count));
        }
        let requests = u("requests")?;
        ensure!(requests > 0, "wrk completed no request: {line}");
        let samples: u64 = hist_us.iter().map(|p| p.1).sum();
        Ok(WrkReport {
            requests,
            duration_us: u("duration_us")?,
            bytes: u("bytes")?,
            max_us: u("max_us")?,
            hist_us,
            synthetic: samples.saturating_sub(requests),
        })
    }

    /// As one side's run: `cpu` (usage, user, system µs) and `cpu_by_cgroup` from the pods'
    /// cgroups over the run, `segs` the TCP segments of the client's netns.
    pub fn side(&self, cpu: [u64; 3], cpu_by_cgroup: Vec<u64>, segs: u64) -> SideRun {
        let mut hist = new_hist();
        for &(us, n) in &self.hist_us {
            // Bounds are a minute: wrk's timeout (seconds) keeps samples below it.
            let _ = hist.record_n((us * 1000).max(1), n);
        }
        SideRun {
            hist,
            max_ns: self.max_us * 1000,
            requests: self.requests,
            bytes: self.bytes,
            busy_ns: self.duration_us * 1000,
            cpu_usec: cpu[0],
            cpu_user_usec: cpu[1],
            cpu_sys_usec: cpu[2],
            cpu_usec_by_cgroup: cpu_by_cgroup,
            segs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Metric;

    const LINE: &str = r#"{"requests":4,"duration_us":1000,"bytes":5084,"errors":{"connect":0,"read":0,"write":0,"status":0,"timeout":0},"max_us":900,"hist_us":"50:2 60:1 900:1 450:1"}"#;

    #[test]
    fn parses_the_scripts_line() {
        let r = WrkReport::parse(&format!("Running 1s test\n  stuff\n{LINE}\n")).unwrap();
        assert_eq!((r.requests, r.synthetic, r.max_us), (4, 1, 900));
        let s = r.side([40, 10, 30], vec![25, 15], 8);
        // HDR histograms report the top of the value's bucket (3 significant digits).
        assert!((s.metric(Metric::P50) - 60.0).abs() < 0.1);
        assert_eq!(s.metric(Metric::Rate), 4000.0);
        assert_eq!(s.metric(Metric::CpuPerReq), 10.0);
        assert_eq!(s.metric(Metric::SegsPerReq), 2.0);
    }

    #[test]
    fn refuses_errors_and_empty_runs() {
        assert!(WrkReport::parse("no json").is_err());
        let bad = LINE.replace(r#""status":0"#, r#""status":3"#);
        assert!(
            WrkReport::parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("3 status")
        );
        let none = LINE.replace(r#""requests":4"#, r#""requests":0"#);
        assert!(WrkReport::parse(&none).is_err());
        let garbled = LINE.replace("50:2", "50-2");
        assert!(WrkReport::parse(&garbled).is_err());
    }
}
