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

/// Warns when the accelerated side still sent TCP segments for its requests: acceleration did
/// not engage.
pub fn warn_if_not_engaged(c: &Compare, bench: &str) {
    let segs = c.pooled(true).metric(Metric::SegsPerReq);
    if segs > 0.5 {
        println!(
            "WARNING: the accelerated side sent {segs:.2} TCP segments per request: acceleration \
             did not engage (see the kernel counters in {bench}.json)"
        );
    }
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
