//! The tail of an A/B benchmark's report (`hop`, `mesh`): the lines under its tables, its
//! `<bench>.json` and `<bench>.png`, and its exit code.

use std::{path::Path, process::ExitCode};

use serde_json::{Value, json};

use crate::{
    driver, plot,
    stats::{Compare, Metric, Target},
};

/// `[{metric, target, met}]`: each target against the run's median ratio.
pub fn targets_json(c: &Compare, targets: &[Target]) -> Value {
    json!(
        targets
            .iter()
            .map(|t| json!({"metric": t.metric.key(), "target": t.show(),
                            "met": t.met(c.ratio(t.metric).median)}))
            .collect::<Vec<_>>()
    )
}

/// The line under a table: the run's own noise.
pub fn print_noise(noise: f64) {
    println!("\nrun noise (largest A/A or B/B p50 difference between halves): {noise:.3}");
}

/// The CI gate of a short run (`--check`), besides an inversion: acceleration that did not
/// engage (the accelerated side still sent more than half a TCP segment per request; a working
/// build sends ~0, TCP 4–6) and a gain below `floor`, a bound every working build clears with
/// room for the noise (the bench's docs say how it was chosen). Each failure is printed as a
/// `GATE:` line and returned.
pub fn gate(c: &Compare, bench: &str, floor: Target) -> Vec<String> {
    let mut fails = Vec::new();
    let segs = c.pooled(true).metric(Metric::SegsPerReq);
    if segs > 0.5 {
        fails.push(format!(
            "acceleration did not engage: the accelerated side sent {segs:.2} TCP segments per \
             request (see the kernel counters in {bench}.json)"
        ));
    }
    let ratio = c.ratio(floor.metric).median;
    if !floor.met(ratio) {
        fails.push(format!(
            "{} ratio {ratio:.2} misses the floor {}: the gain of a working build is gone",
            floor.metric.key(),
            floor.show()
        ));
    }
    for f in &fails {
        println!("GATE: {f}");
    }
    fails
}

/// Writes `<bench>.json` (`result`) and `<bench>.png` (`size` pixels, drawn by `draw`) into
/// `out`, and says where on stderr.
pub fn write_results(
    bench: &str,
    out: &Path,
    result: &Value,
    size: (u32, u32),
    draw: impl FnOnce(&plot::Area<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let json_path = driver::write_json(out, &format!("{bench}.json"), result)?;
    let png_path = out.join(format!("{bench}.png"));
    plot::png(&png_path, size, draw)?;
    eprintln!(
        "[{bench}] wrote {} and {}",
        json_path.display(),
        png_path.display()
    );
    Ok(())
}

/// A benchmark's exit code: 0; 1 when the run failed its `--check`; 2 on an error (logged).
pub fn exit(bench: &str, run: anyhow::Result<bool>) -> ExitCode {
    match run {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[{bench}] {e:#}");
            ExitCode::from(2)
        }
    }
}
