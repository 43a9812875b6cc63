//! `report`: turns the results of `hop`, `mesh`, `wrk`, `sweep` and `cross-node` (their JSON
//! files; `mesh` and `wrk` one per connection count) into one summary: `performance.md` (the
//! tables the README shows) and `performance.png` (latency percentiles of hop, mesh and wrk, gain
//! by message size of the sweep). Whichever of the files exist are used.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser;
use meshaccel_benches::{
    driver::machine_line,
    plot::{self, SizeSeries},
    stats::hist_from_json,
};
use serde_json::Value;

/// Summarises the benchmark results into performance.md and performance.png.
#[derive(Parser, Debug)]
struct Args {
    /// Where hop.json, mesh-<n>.json, wrk-<n>.json and sweep.json are, and where the summary
    /// goes.
    #[arg(long, env = "MESHACCEL_BENCH_OUT", default_value = "benches/results")]
    dir: PathBuf,
    /// The command that produced the results (quoted in the summary).
    #[arg(
        long,
        env = "MESHACCEL_BENCH_COMMAND",
        default_value = "sudo scripts/bench.sh"
    )]
    command: String,
}

fn load(dir: &Path, name: &str) -> anyhow::Result<Option<Value>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
    ))
}

/// Every `<bench>-<connections>.json` in `dir`, by connection count.
fn load_counts(dir: &Path, bench: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let prefix = format!("{bench}-");
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let count = name
            .strip_prefix(&prefix)
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok());
        if count.is_some()
            && let Some(v) = load(dir, &name)?
        {
            out.push(v);
        }
    }
    out.sort_by_key(|v| v["connections"].as_u64().unwrap_or(0));
    Ok(out)
}

/// "1 conn." / "16 conn.", and the placement when it is a diagnostic one.
fn conns_label(v: &Value) -> String {
    let pin = match v["pin"].as_str() {
        Some("none") | None => String::new(),
        Some(p) => format!(", pinned {p} (diagnostic)"),
    };
    format!("{} conn.{pin}", v["connections"])
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Rows `| bench | metric | baseline | accelerated | ratio [min–max] | target |`.
fn rows(out: &mut String, bench: &str, result: &Value, targets: &Value, metrics: &[(&str, &str)]) {
    for (key, label) in metrics {
        let r = &result["ratio"][key];
        let prec = if key.starts_with("per_sec") { 0 } else { 1 };
        let target = targets
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["metric"] == *key))
            .map(|t| {
                format!(
                    "{} {}",
                    t["target"].as_str().unwrap_or(""),
                    if t["met"] == true {
                        "met"
                    } else {
                        "**missed**"
                    }
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {bench} | {label} | {:.prec$} | {:.prec$} | {:.2} [{:.2}–{:.2}] | {target} |",
            f(&result["baseline"][key]),
            f(&result["accelerated"][key]),
            f(&r["median"]),
            f(&r["min"]),
            f(&r["max"]),
        );
    }
}

const LAT: [(&str, &str); 5] = [
    ("p50_us", "p50 latency (µs)"),
    ("p90_us", "p90 latency (µs)"),
    ("p99_us", "p99 latency (µs)"),
    ("p999_us", "p99.9 latency (µs)"),
    ("max_us", "max latency (µs)"),
];

fn run(a: &Args) -> anyhow::Result<()> {
    let hop = load(&a.dir, "hop.json")?;
    let meshes = load_counts(&a.dir, "mesh")?;
    let wrks = load_counts(&a.dir, "wrk")?;
    // The cross-node benchmark is the sweep's `remote` path run on its own: one table.
    let sweep = match (
        load(&a.dir, "sweep.json")?,
        load(&a.dir, "cross-node.json")?,
    ) {
        (Some(mut s), Some(c)) => {
            if let (Some(cells), Some(more)) = (s["cells"].as_array_mut(), c["cells"].as_array()) {
                cells.extend(more.iter().cloned());
            }
            Some(s)
        }
        (s, c) => s.or(c),
    };
    let all: Vec<&Value> = hop
        .iter()
        .chain(&meshes)
        .chain(&wrks)
        .chain(sweep.iter())
        .collect();
    anyhow::ensure!(
        !all.is_empty(),
        "no hop.json, mesh-<n>.json, wrk-<n>.json, sweep.json or cross-node.json in {}",
        a.dir.display()
    );
    let mut md = String::new();
    // The machine each result was measured on; when results of several machines are in the
    // folder (e.g. a bench re-run elsewhere), each is named with its benches.
    let mut machines: Vec<(String, Vec<String>)> = Vec::new();
    for v in &all {
        let mut m = v["machine"].clone();
        if let Some(o) = m.as_object_mut() {
            o.remove("other_cpu_load");
            o.remove("steal");
        }
        let line = machine_line(&m);
        let bench = v["bench"].as_str().unwrap_or("?").to_string();
        match machines.iter_mut().find(|(l, _)| *l == line) {
            Some((_, benches)) => benches.push(bench),
            None => machines.push((line, vec![bench])),
        }
    }
    let machine_text = if machines.len() == 1 {
        machines[0].0.clone()
    } else {
        machines
            .iter()
            .map(|(l, b)| format!("{}: {l}", b.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let _ = writeln!(
        md,
        "Ratios are accelerated / baseline, both measured in the same run, interleaved (blocks A B B A …\n\
         on baseline and accelerated connections that live side by side); the ratio is the median over\n\
         the rounds, [min–max] its spread; baseline and accelerated values are pooled over the rounds.\n\
         Machine: {}. Other work on the machine during the runs (share of its CPU time, noise; steal: time the hypervisor took the vCPUs away, each time a stall): {}.",
        machine_text,
        all.iter()
            .map(|v| {
                let steal = v["machine"]["steal"]
                    .as_f64()
                    .map(|x| format!(" (steal {:.2}%)", x * 100.0))
                    .unwrap_or_default();
                format!(
                    "{} {:.0}%{steal}",
                    v["bench"].as_str().unwrap_or("?"),
                    f(&v["machine"]["other_cpu_load"]) * 100.0,
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "Command: `{}`.\n", a.command);
    let _ = writeln!(
        md,
        "| benchmark | metric | baseline | accelerated | ratio [min–max] | target |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---|---|");
    if let Some(h) = &hop {
        let name = format!("hop, {} B ping-pong", h["size"]);
        let mut metrics = LAT.to_vec();
        metrics.push(("per_sec", "round trips per second"));
        rows(&mut md, &name, &h["result"], &h["targets"], &metrics);
    }
    // A closed loop's rows, the mesh's and wrk's alike.
    let mut closed_loop = LAT.to_vec();
    closed_loop.extend([
        ("per_sec", "requests per second"),
        ("cpu_us_per_req", "CPU µs per request"),
    ]);
    for m in &meshes {
        let name = format!(
            "mesh, HTTP {} B, {}, closed loop",
            m["size"],
            conns_label(m)
        );
        rows(
            &mut md,
            &name,
            &m["closed"]["result"],
            &m["closed"]["targets"],
            &closed_loop,
        );
        if !m["fixed_rate"].is_null() {
            let name = format!(
                "mesh, HTTP {} B, {}, fixed {:.0} req/s",
                m["size"],
                conns_label(m),
                f(&m["fixed_rate"]["rate"])
            );
            let mut metrics = LAT.to_vec();
            metrics.push(("cpu_us_per_req", "CPU µs per request"));
            rows(
                &mut md,
                &name,
                &m["fixed_rate"]["result"],
                &m["fixed_rate"]["targets"],
                &metrics,
            );
        }
    }
    for w in &wrks {
        let name = format!("wrk → nginx, {} B, {}", w["size"], conns_label(w));
        rows(
            &mut md,
            &name,
            &w["closed"]["result"],
            &w["closed"]["targets"],
            &closed_loop,
        );
    }
    if let Some(s) = &sweep {
        let cells = s["cells"].as_array().cloned().unwrap_or_default();
        let mut sizes: Vec<u64> = cells.iter().filter_map(|c| c["size"].as_u64()).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let paths: Vec<String> = {
            let mut p: Vec<String> = cells
                .iter()
                .filter_map(|c| c["path"].as_str().map(String::from))
                .collect();
            p.dedup();
            p
        };
        for kind in ["throughput", "latency"] {
            let what = if kind == "throughput" {
                "throughput ratio (target ≥ 1.00 at every size)"
            } else {
                "p50 latency ratio"
            };
            let _ = writeln!(
                md,
                "\nsweep, {what}, by write size; ↑ client→server, ↓ server→client:\n"
            );
            let mut head = String::from("| size |");
            let mut rule = String::from("|---:|");
            for p in &paths {
                for d in ["↑", "↓"] {
                    let _ = write!(head, " {p} {d} |");
                    rule.push_str("---|");
                }
            }
            let _ = writeln!(md, "{head}\n{rule}");
            for size in &sizes {
                let _ = write!(md, "| {} |", plot::size_label(*size as f64));
                for p in &paths {
                    for d in ["up", "down"] {
                        let cell = cells.iter().find(|c| {
                            c["size"] == *size
                                && c["path"] == p.as_str()
                                && c["dir"] == d
                                && c["kind"] == kind
                        });
                        match cell {
                            Some(c) => {
                                let key = c["metric"].as_str().unwrap_or("");
                                let r = &c["result"]["ratio"][key];
                                // Bold: slower beyond the run's noise; "≈": slower within it.
                                let (bold, mark) = match c["verdict"].as_str() {
                                    Some("slower") => ("**", ""),
                                    Some("within_noise") => ("", " ≈"),
                                    _ => ("", ""),
                                };
                                let tcp = if c["kept_on_tcp"] == true { " ᵀ" } else { "" };
                                let _ = write!(
                                    md,
                                    " {bold}{:.2} [{:.2}–{:.2}]{bold}{mark}{tcp} |",
                                    f(&r["median"]),
                                    f(&r["min"]),
                                    f(&r["max"]),
                                );
                            }
                            None => md.push_str(" |"),
                        }
                    }
                }
                md.push('\n');
            }
        }
        let _ = writeln!(
            md,
            "\n**bold**: slower beyond the run's own noise; ≈: slower within it; ᵀ: the \
             accelerated side's connection stayed on TCP (its service had streamed small writes \
             in the unmeasured round, see the dataplane's small-write policy): TCP against TCP."
        );
    }
    if let Some(w) = wrks.first() {
        let _ = writeln!(
            md,
            "\nwrk → nginx: Debian's wrk and nginx through both Envoys, acceleration off/on by run \
             (A B B A, {} rounds of {} s); latency percentiles are wrk's, after its coordinated-\
             omission correction (synthetic samples: {}).",
            w["rounds"],
            w["seconds"],
            wrks.iter()
                .map(|w| format!(
                    "{:.1}% at {} conn.",
                    f(&w["synthetic_share"]) * 100.0,
                    w["connections"]
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let md_path = a.dir.join("performance.md");
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    print!("{md}");

    let png_path = a.dir.join("performance.png");
    // Panels, two per row: hop, mesh and wrk percentiles, then the sweep's two gain curves.
    let mut lat_panels: Vec<(String, &Value, &str)> = Vec::new();
    if let Some(h) = &hop {
        let title = format!("hop: app ↔ sidecar, {} B ping-pong", h["size"]);
        lat_panels.push((title, &h["result"], ""));
    }
    for m in &meshes {
        let title = format!(
            "mesh: app → Envoy → mTLS → Envoy → app, HTTP {} B, {}",
            m["size"],
            conns_label(m)
        );
        lat_panels.push((title, &m["closed"]["result"], ", closed loop"));
    }
    for w in &wrks {
        let title = format!(
            "wrk → Envoy → mTLS → Envoy → nginx, {} B, {}",
            w["size"],
            conns_label(w)
        );
        lat_panels.push((title, &w["closed"]["result"], ""));
    }
    let panels = lat_panels.len() + if sweep.is_some() { 2 } else { 0 };
    let rows_n = panels.div_ceil(2).max(1);
    plot::png(&png_path, (1400, 500 * rows_n as u32), |area| {
        let parts = area.split_evenly((rows_n, 2));
        let pair = |v: &Value| -> anyhow::Result<_> {
            Ok((
                hist_from_json(&v["baseline"]["hist"])?,
                hist_from_json(&v["accelerated"]["hist"])?,
            ))
        };
        for (i, (title, result, mode)) in lat_panels.iter().enumerate() {
            let (x, y) = pair(result)?;
            plot::percentiles(
                &parts[i],
                title,
                &[
                    (format!("baseline (TCP){mode}"), &x, plot::BASELINE),
                    (format!("accelerated{mode}"), &y, plot::ACCELERATED),
                ],
            )?;
        }
        let first_sweep = lat_panels.len();
        if let Some(s) = &sweep {
            let cells = s["cells"].as_array().cloned().unwrap_or_default();
            for (i, path) in ["hop", "mesh"].into_iter().enumerate() {
                let mut series = Vec::new();
                for (kind, dir, color, label) in [
                    ("throughput", "up", plot::ACCELERATED, "throughput ↑"),
                    ("throughput", "down", plot::ALT[1], "throughput ↓"),
                    ("latency", "up", plot::BASELINE, "1 / p50 latency ↑"),
                    ("latency", "down", plot::ALT[0], "1 / p50 latency ↓"),
                ] {
                    let points: Vec<_> = cells
                        .iter()
                        .filter(|c| c["path"] == path && c["kind"] == kind && c["dir"] == dir)
                        .filter_map(|c| {
                            let g = &c["gain"];
                            Some((
                                c["size"].as_u64()?,
                                f(&g["median"]),
                                Some((f(&g["min"]), f(&g["max"]))),
                            ))
                        })
                        .collect();
                    if !points.is_empty() {
                        series.push(SizeSeries {
                            label: label.into(),
                            color,
                            points,
                        });
                    }
                }
                if !series.is_empty() {
                    plot::by_size(
                        &parts[first_sweep + i],
                        &format!("sweep, {path}: gain accelerated/baseline (> 1 is better)"),
                        "gain",
                        &series,
                        false,
                        Some(1.0),
                    )?;
                }
            }
        }
        Ok(())
    })?;
    eprintln!(
        "[report] wrote {} and {}",
        md_path.display(),
        png_path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[report] {e:#}");
            ExitCode::from(2)
        }
    }
}
