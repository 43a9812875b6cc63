//! What one A/B run measured, and how rounds turn into ratios with their spread.
//!
//! A run (one `ab-rr` / `ab-http` of the e2e tool) reports, per side (A = baseline, B =
//! accelerated) and per half (every other block of that side), an HDR histogram of latencies and
//! counters. A comparison is several rounds of such runs: each round gives one ratio B/A per
//! metric; the headline is the median of those ratios, the spread their min and max. The two
//! halves of a side give the run's own noise: the A/A (and B/B) ratio.

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Latencies up to a minute, 3 significant digits (as the e2e tool records them).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// A histogram from the tool's `[[value_ns, count], …]`, or from the compact string
/// `"value_ns:count value_ns:count …"` of [`hist_to_json`].
pub fn hist_from_json(v: &Value) -> anyhow::Result<Histogram<u64>> {
    let mut h = new_hist();
    let mut record = |value: u64, count: u64| {
        h.record_n(value.max(1), count)
            .with_context(|| format!("recording {value}"))
    };
    match v {
        Value::Array(pairs) => {
            for pair in pairs {
                let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) else {
                    bail!("bad histogram entry {pair}");
                };
                record(value, count)?;
            }
        }
        Value::String(s) => {
            for pair in s.split_whitespace() {
                let parsed = pair
                    .split_once(':')
                    .and_then(|(v, c)| Some((v.parse().ok()?, c.parse().ok()?)));
                let Some((value, count)) = parsed else {
                    bail!("bad histogram entry {pair:?}");
                };
                record(value, count)?;
            }
        }
        _ => bail!("histogram is neither an array nor a string"),
    }
    Ok(h)
}

/// The histogram as the compact string `"value_ns:count value_ns:count …"` (one JSON string,
/// so that pretty-printed result files stay readable).
pub fn hist_to_json(h: &Histogram<u64>) -> Value {
    let parts: Vec<String> = h
        .iter_recorded()
        .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
        .collect();
    Value::String(parts.join(" "))
}

/// One side of a run (or one half of it).
#[derive(Clone, Debug)]
pub struct SideRun {
    pub hist: Histogram<u64>,
    pub max_ns: u64,
    pub requests: u64,
    pub bytes: u64,
    pub busy_ns: u64,
    /// Summed over the cgroups the tool was given (`cpu.stat` usage_usec, user_usec,
    /// system_usec).
    pub cpu_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_sys_usec: u64,
    /// usage_usec per cgroup, in the order given to the tool.
    pub cpu_usec_by_cgroup: Vec<u64>,
    /// TCP segments in + out of the client's netns.
    pub segs: u64,
}

fn sum(v: &Value) -> u64 {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

impl SideRun {
    pub fn empty() -> SideRun {
        SideRun {
            hist: new_hist(),
            max_ns: 0,
            requests: 0,
            bytes: 0,
            busy_ns: 0,
            cpu_usec: 0,
            cpu_user_usec: 0,
            cpu_sys_usec: 0,
            cpu_usec_by_cgroup: Vec::new(),
            segs: 0,
        }
    }

    fn from_half(v: &Value) -> anyhow::Result<SideRun> {
        let u = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("no {k} in the tool's report"))
        };
        Ok(SideRun {
            hist: hist_from_json(&v["hist"])?,
            max_ns: u("max_ns")?,
            requests: u("requests")?,
            bytes: u("bytes")?,
            busy_ns: u("busy_ns")?,
            cpu_usec: sum(&v["cpu_usec"]),
            cpu_user_usec: sum(&v["cpu_user_usec"]),
            cpu_sys_usec: sum(&v["cpu_system_usec"]),
            cpu_usec_by_cgroup: v["cpu_usec"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default(),
            segs: u("tcp_in_segs")? + u("tcp_out_segs")?,
        })
    }

    pub fn merge(&mut self, o: &SideRun) {
        self.hist.add(&o.hist).expect("histograms of equal bounds");
        self.max_ns = self.max_ns.max(o.max_ns);
        self.requests += o.requests;
        self.bytes += o.bytes;
        self.busy_ns += o.busy_ns;
        self.cpu_usec += o.cpu_usec;
        self.cpu_user_usec += o.cpu_user_usec;
        self.cpu_sys_usec += o.cpu_sys_usec;
        if self.cpu_usec_by_cgroup.len() < o.cpu_usec_by_cgroup.len() {
            self.cpu_usec_by_cgroup
                .resize(o.cpu_usec_by_cgroup.len(), 0);
        }
        for (a, b) in self
            .cpu_usec_by_cgroup
            .iter_mut()
            .zip(&o.cpu_usec_by_cgroup)
        {
            *a += b;
        }
        self.segs += o.segs;
    }

    pub fn metric(&self, m: Metric) -> f64 {
        let q = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        let per_req = |x: f64| x / self.requests.max(1) as f64;
        let secs = self.busy_ns as f64 / 1e9;
        match m {
            Metric::P50 => q(0.50),
            Metric::P90 => q(0.90),
            Metric::P99 => q(0.99),
            Metric::P999 => q(0.999),
            Metric::Max => self.max_ns as f64 / 1000.0,
            Metric::Mean => self.hist.mean() / 1000.0,
            Metric::Rate => self.requests as f64 / secs.max(1e-9),
            Metric::MBps => self.bytes as f64 / secs.max(1e-9) / 1e6,
            Metric::CpuPerReq => per_req(self.cpu_usec as f64),
            Metric::UserCpuPerReq => per_req(self.cpu_user_usec as f64),
            Metric::SysCpuPerReq => per_req(self.cpu_sys_usec as f64),
            Metric::SegsPerReq => per_req(self.segs as f64),
        }
    }

    /// Its metrics, and with `with_hist` its histogram.
    pub fn to_json(&self, with_hist: bool) -> Value {
        let mut m = serde_json::Map::new();
        for metric in Metric::ALL {
            m.insert(metric.key().into(), json!(round3(self.metric(metric))));
        }
        m.insert("requests".into(), json!(self.requests));
        m.insert("bytes".into(), json!(self.bytes));
        m.insert("busy_ns".into(), json!(self.busy_ns));
        m.insert("cpu_usec".into(), json!(self.cpu_usec));
        m.insert(
            "cpu_us_per_req_by_cgroup".into(),
            json!(
                self.cpu_usec_by_cgroup
                    .iter()
                    .map(|&c| round3(c as f64 / self.requests.max(1) as f64))
                    .collect::<Vec<_>>()
            ),
        );
        m.insert("segs".into(), json!(self.segs));
        if with_hist {
            m.insert("hist".into(), hist_to_json(&self.hist));
        }
        Value::Object(m)
    }
}

pub fn round3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        x
    }
}

/// What the tables show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    P50,
    P90,
    P99,
    P999,
    Max,
    Mean,
    /// Requests per second.
    Rate,
    /// Payload megabytes per second (both directions).
    MBps,
    /// CPU microseconds per request (the pods' cgroups).
    CpuPerReq,
    /// Of which user space.
    UserCpuPerReq,
    /// Of which kernel.
    SysCpuPerReq,
    /// TCP segments per request (the client's netns).
    SegsPerReq,
}

impl Metric {
    /// The rows of a request/response benchmark's table (hop, mesh), in order.
    pub const TABLE: [Metric; 11] = [
        Metric::P50,
        Metric::P90,
        Metric::P99,
        Metric::P999,
        Metric::Max,
        Metric::Mean,
        Metric::Rate,
        Metric::CpuPerReq,
        Metric::UserCpuPerReq,
        Metric::SysCpuPerReq,
        Metric::SegsPerReq,
    ];
}

impl Metric {
    pub const ALL: [Metric; 12] = [
        Metric::P50,
        Metric::P90,
        Metric::P99,
        Metric::P999,
        Metric::Max,
        Metric::Mean,
        Metric::Rate,
        Metric::MBps,
        Metric::CpuPerReq,
        Metric::UserCpuPerReq,
        Metric::SysCpuPerReq,
        Metric::SegsPerReq,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Metric::P50 => "p50_us",
            Metric::P90 => "p90_us",
            Metric::P99 => "p99_us",
            Metric::P999 => "p999_us",
            Metric::Max => "max_us",
            Metric::Mean => "mean_us",
            Metric::Rate => "per_sec",
            Metric::MBps => "mb_per_sec",
            Metric::CpuPerReq => "cpu_us_per_req",
            Metric::UserCpuPerReq => "user_cpu_us_per_req",
            Metric::SysCpuPerReq => "kernel_cpu_us_per_req",
            Metric::SegsPerReq => "tcp_segs_per_req",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::P50 => "p50 latency (µs)",
            Metric::P90 => "p90 latency (µs)",
            Metric::P99 => "p99 latency (µs)",
            Metric::P999 => "p99.9 latency (µs)",
            Metric::Max => "max latency (µs)",
            Metric::Mean => "mean latency (µs)",
            Metric::Rate => "requests per second",
            Metric::MBps => "throughput (MB/s)",
            Metric::CpuPerReq => "CPU µs per request",
            Metric::UserCpuPerReq => "… of which user space",
            Metric::SysCpuPerReq => "… of which kernel",
            Metric::SegsPerReq => "TCP segments per request",
        }
    }
}

/// One A/B run: both halves of both sides.
#[derive(Clone, Debug)]
pub struct AbRun {
    pub a: [SideRun; 2],
    pub b: [SideRun; 2],
    /// Kernel counters that moved during the run (`meshaccel status`), and anything else the
    /// benchmark wants to keep with it.
    pub extra: Value,
}

impl AbRun {
    /// Parses the tool's report (which must say `ok`).
    pub fn parse(report: &Value) -> anyhow::Result<AbRun> {
        if report["ok"] != true {
            bail!("the A/B client failed: {}", report["error"]);
        }
        let half = |side: &str, i: usize| {
            SideRun::from_half(&report["sides"][side][i])
                .with_context(|| format!("side {side} half {i}"))
        };
        Ok(AbRun {
            a: [half("a", 0)?, half("a", 1)?],
            b: [half("b", 0)?, half("b", 1)?],
            extra: Value::Null,
        })
    }

    pub fn side(&self, accelerated: bool) -> SideRun {
        let h = if accelerated { &self.b } else { &self.a };
        let mut s = h[0].clone();
        s.merge(&h[1]);
        s
    }
}

/// Median, min and max of some values (NaN-free; empty gives NaN).
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    pub fn to_json(self) -> Value {
        json!({"median": round3(self.median), "min": round3(self.min), "max": round3(self.max)})
    }

    /// `0.53 [0.51–0.56]`
    pub fn show(self) -> String {
        format!("{:.2} [{:.2}–{:.2}]", self.median, self.min, self.max)
    }
}

/// Several rounds of the same A/B run.
#[derive(Clone, Debug, Default)]
pub struct Compare {
    pub rounds: Vec<AbRun>,
}

impl Compare {
    pub fn pooled(&self, accelerated: bool) -> SideRun {
        let mut s = SideRun::empty();
        for r in &self.rounds {
            s.merge(&r.side(accelerated));
        }
        s
    }

    /// B/A per round.
    pub fn ratios(&self, m: Metric) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|r| r.side(true).metric(m) / r.side(false).metric(m))
            .collect()
    }

    pub fn ratio(&self, m: Metric) -> Spread {
        Spread::of(&self.ratios(m))
    }

    /// The pooled ratio: B/A over all rounds together.
    pub fn pooled_ratio(&self, m: Metric) -> f64 {
        self.pooled(true).metric(m) / self.pooled(false).metric(m)
    }

    /// The run's own noise for a metric: the largest |X/X − 1| between the two halves of one
    /// side within one round, over both sides and all rounds.
    pub fn noise(&self, m: Metric) -> f64 {
        self.rounds
            .iter()
            .flat_map(|r| [&r.a, &r.b])
            .map(|h| (h[0].metric(m) / h[1].metric(m) - 1.0).abs())
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max)
    }

    /// Pooled values per side (with their histograms when `with_hist`), ratios with their
    /// spread, pooled ratios, per-round ratios, the run's noise and each run's extra data.
    pub fn to_json(&self, metrics: &[Metric], with_hist: bool) -> Value {
        let mut ratios = serde_json::Map::new();
        let mut pooled_ratios = serde_json::Map::new();
        let mut per_round = serde_json::Map::new();
        let mut noise = serde_json::Map::new();
        for &m in metrics {
            ratios.insert(m.key().into(), self.ratio(m).to_json());
            pooled_ratios.insert(m.key().into(), json!(round3(self.pooled_ratio(m))));
            per_round.insert(
                m.key().into(),
                json!(self.ratios(m).into_iter().map(round3).collect::<Vec<_>>()),
            );
            noise.insert(m.key().into(), json!(round3(self.noise(m))));
        }
        json!({
            "rounds": self.rounds.len(),
            "baseline": self.pooled(false).to_json(with_hist),
            "accelerated": self.pooled(true).to_json(with_hist),
            "ratio": ratios,
            "pooled_ratio": pooled_ratios,
            "ratio_per_round": per_round,
            "noise": noise,
            "runs": self.rounds.iter().map(|r| r.extra.clone()).collect::<Vec<_>>(),
        })
    }
}

/// A target on a ratio accelerated/baseline.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub metric: Metric,
    /// true: the ratio must be ≤ `value`; false: ≥.
    pub at_most: bool,
    pub value: f64,
}

impl Target {
    pub const fn at_most(metric: Metric, value: f64) -> Target {
        Target {
            metric,
            at_most: true,
            value,
        }
    }
    pub const fn at_least(metric: Metric, value: f64) -> Target {
        Target {
            metric,
            at_most: false,
            value,
        }
    }
    pub fn met(&self, ratio: f64) -> bool {
        if self.at_most {
            ratio <= self.value
        } else {
            ratio >= self.value
        }
    }
    pub fn show(&self) -> String {
        format!("{} {:.2}", if self.at_most { "≤" } else { "≥" }, self.value)
    }
}

/// A markdown table of a comparison: pooled values, the ratio with its spread, the pooled
/// ratio, the target and whether the median ratio meets it.
pub fn table(c: &Compare, metrics: &[Metric], targets: &[Target]) -> String {
    let (a, b) = (c.pooled(false), c.pooled(true));
    let mut out = String::new();
    out.push_str(
        "| metric | baseline | accelerated | ratio (median of rounds) [min–max] | pooled ratio | target |\n",
    );
    out.push_str("|---|---:|---:|---|---:|---|\n");
    for &m in metrics {
        let (x, y) = (a.metric(m), b.metric(m));
        let prec = match m {
            Metric::Rate => 0,
            Metric::MBps => 1,
            Metric::SegsPerReq => 2,
            _ => 1,
        };
        let r = c.ratio(m);
        let target = targets
            .iter()
            .find(|t| t.metric == m)
            .map(|t| {
                format!(
                    "{} {}",
                    t.show(),
                    if t.met(r.median) { "met" } else { "**missed**" }
                )
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "| {} | {x:.prec$} | {y:.prec$} | {} | {:.2} | {target} |\n",
            m.label(),
            r.show(),
            c.pooled_ratio(m)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half(lat_us: &[u64], busy_ms: u64) -> SideRun {
        let mut h = new_hist();
        for &l in lat_us {
            h.record(l * 1000).unwrap();
        }
        SideRun {
            max_ns: lat_us.iter().max().copied().unwrap_or(0) * 1000,
            requests: lat_us.len() as u64,
            bytes: lat_us.len() as u64 * 100,
            busy_ns: busy_ms * 1_000_000,
            cpu_usec: lat_us.len() as u64 * 10,
            cpu_user_usec: lat_us.len() as u64 * 4,
            cpu_sys_usec: lat_us.len() as u64 * 6,
            cpu_usec_by_cgroup: vec![lat_us.len() as u64 * 10],
            segs: 0,
            hist: h,
        }
    }

    #[test]
    fn spread_and_ratios() {
        let s = Spread::of(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[1.0, 2.0]);
        assert_eq!(s.median, 1.5);

        let round = |a: u64, b: u64| AbRun {
            a: [half(&[a; 10], 1), half(&[a; 10], 1)],
            b: [half(&[b; 10], 1), half(&[b; 10], 1)],
            extra: Value::Null,
        };
        let c = Compare {
            rounds: vec![round(100, 50), round(100, 60), round(100, 55)],
        };
        let r = c.ratio(Metric::P50);
        assert!((r.median - 0.55).abs() < 0.01, "{r:?}");
        assert!((r.min - 0.50).abs() < 0.01 && (r.max - 0.60).abs() < 0.01);
        assert_eq!(c.noise(Metric::P50), 0.0);
        assert!((c.pooled(false).metric(Metric::Rate) - 10_000.0).abs() < 1.0);
        assert!((c.pooled(true).metric(Metric::CpuPerReq) - 10.0).abs() < 1e-9);
        assert!(Target::at_most(Metric::P50, 0.55).met(0.55));
        assert!(!Target::at_least(Metric::Rate, 1.2).met(1.1));
    }

    #[test]
    fn parses_the_tools_report_and_round_trips_histograms() {
        let h = half(&[5, 7, 7, 900], 2);
        let j = hist_to_json(&h.hist);
        let back = hist_from_json(&j).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.value_at_quantile(0.5), h.hist.value_at_quantile(0.5));
        let j: Value = json!(
            h.hist
                .iter_recorded()
                .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
                .collect::<Vec<_>>()
        );
        let half_json = json!({"requests": 4, "bytes": 0, "busy_ns": 2, "blocks": 1,
            "max_ns": 900_000, "cpu_usec": [3, 4], "tcp_in_segs": 1, "tcp_out_segs": 2,
            "skipped": 0, "hist": j});
        let report = json!({"ok": true, "sides": {"a": [half_json.clone(), half_json.clone()],
            "b": [half_json.clone(), half_json]}});
        let r = AbRun::parse(&report).unwrap();
        assert_eq!(r.side(false).requests, 8);
        assert_eq!(r.side(true).cpu_usec, 14);
        assert_eq!(r.side(true).segs, 6);
        assert!(AbRun::parse(&json!({"ok": false, "error": "x"})).is_err());
    }
}
