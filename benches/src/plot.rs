//! PNG plots (plotters' bitmap backend). Text is drawn with DejaVu Sans embedded by the `dejavu`
//! crate (plotters' `ab_glyph` font backend): no system fonts, no fontconfig.

use std::{path::Path, sync::Once};

use anyhow::anyhow;
use hdrhistogram::Histogram;
use plotters::{
    coord::Shift,
    prelude::*,
    style::{FontStyle, register_font},
};

/// Baseline (TCP through the stack) and accelerated colours, used everywhere.
pub const BASELINE: RGBColor = RGBColor(0xd6, 0x5f, 0x2a);
pub const ACCELERATED: RGBColor = RGBColor(0x1f, 0x6f, 0xb4);
pub const ALT: [RGBColor; 2] = [RGBColor(0x2a, 0x9d, 0x4a), RGBColor(0x8e, 0x44, 0xad)];

static FONTS: Once = Once::new();

fn fonts() {
    FONTS.call_once(|| {
        for (style, bytes) in [
            (FontStyle::Normal, dejavu::sans::regular()),
            (FontStyle::Bold, dejavu::sans::bold()),
        ] {
            if register_font("sans-serif", style, bytes).is_err() {
                eprintln!("[plot] cannot load the embedded DejaVu font");
            }
        }
    });
}

pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws into a `w`×`h` PNG at `path`, `f` filling the white root area.
pub fn png(
    path: &Path,
    (w, h): (u32, u32),
    f: impl FnOnce(&Area<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    fonts();
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    f(&root)?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn e<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

fn nines_label(x: f64) -> String {
    match x.round() as i32 {
        0 => "p0".into(),
        1 => "p90".into(),
        2 => "p99".into(),
        3 => "p99.9".into(),
        4 => "p99.99".into(),
        n => format!("{n} nines"),
    }
}

/// A latency percentile plot: x = percentile on a "nines" scale (p0, p90, p99, p99.9 …), y =
/// latency in µs (log scale); one line per histogram.
pub fn percentiles(
    area: &Area<'_>,
    title: &str,
    series: &[(String, &Histogram<u64>, RGBColor)],
) -> anyhow::Result<()> {
    let count = series.iter().map(|s| s.1.len()).min().unwrap_or(0).max(10);
    // Up to the quantile the data can resolve (at least ~10 samples beyond it).
    let max_x = ((count as f64 / 10.0).log10()).clamp(1.0, 4.0);
    let mut lo = f64::MAX;
    let mut hi: f64 = 0.0;
    let mut lines = Vec::new();
    for (label, h, color) in series {
        let mut pts = Vec::new();
        let steps = 200;
        for i in 0..=steps {
            let x = max_x * i as f64 / steps as f64;
            let q = 1.0 - 10f64.powf(-x);
            let v = h.value_at_quantile(q) as f64 / 1000.0;
            lo = lo.min(v);
            hi = hi.max(v);
            pts.push((x, v));
        }
        lines.push((label.clone(), pts, *color));
    }
    if lines.is_empty() || hi <= 0.0 {
        return Ok(());
    }
    let (lo, hi) = ((lo * 0.8).max(0.1), hi * 1.25);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x + 1e-6, (lo..hi).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(max_x as usize + 1)
        .y_labels(12)
        .x_label_formatter(&|x| nines_label(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("latency (µs)")
        .x_desc("percentile")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    for (label, pts, color) in lines {
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    Ok(())
}

/// "64", "1K", "1M" for a byte size.
pub fn size_label(bytes: f64) -> String {
    let b = bytes.round() as u64;
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

/// One point of a by-size plot: size (bytes), value, and optionally its spread (min, max),
/// drawn as a whisker.
pub type SizePoint = (u64, f64, Option<(f64, f64)>);

/// One line of a by-size plot.
pub struct SizeSeries {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<SizePoint>,
}

/// Values by message size: x = size (log2), y = value (log scale when `log_y`), an optional
/// reference line (e.g. ratio 1.0).
pub fn by_size(
    area: &Area<'_>,
    title: &str,
    y_desc: &str,
    series: &[SizeSeries],
    log_y: bool,
    reference: Option<f64>,
) -> anyhow::Result<()> {
    by_log2_x(
        area,
        title,
        "message size (bytes)",
        &|x: &f64| size_label(2f64.powf(*x)),
        y_desc,
        series,
        log_y,
        reference,
    )
}

/// "90", "1.4k", "23k", "1.2M" for a count.
pub fn count_label(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.0}k", n / 1e3)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Values by a count (x = the count's log2, labelled by `count_label`), as [`by_size`] draws
/// them by message size.
pub fn by_count(
    area: &Area<'_>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[SizeSeries],
    log_y: bool,
) -> anyhow::Result<()> {
    by_log2_x(
        area,
        title,
        x_desc,
        &|x: &f64| count_label(2f64.powf(*x)),
        y_desc,
        series,
        log_y,
        None,
    )
}

#[allow(clippy::too_many_arguments)]
fn by_log2_x(
    area: &Area<'_>,
    title: &str,
    x_desc: &str,
    xfmt: &dyn Fn(&f64) -> String,
    y_desc: &str,
    series: &[SizeSeries],
    log_y: bool,
    reference: Option<f64>,
) -> anyhow::Result<()> {
    let all: Vec<(u64, f64)> = series
        .iter()
        .flat_map(|s| {
            s.points.iter().flat_map(|&(x, y, sp)| {
                let mut v = vec![(x, y)];
                if let Some((a, b)) = sp {
                    v.extend([(x, a), (x, b)]);
                }
                v
            })
        })
        .filter(|(_, y)| y.is_finite() && *y > 0.0)
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let lx = |x: u64| (x as f64).log2();
    let x0 = all.iter().map(|p| lx(p.0)).fold(f64::MAX, f64::min) - 0.5;
    let x1 = all.iter().map(|p| lx(p.0)).fold(f64::MIN, f64::max) + 0.5;
    let mut y0 = all.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let mut y1 = all.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    if let Some(r) = reference {
        y0 = y0.min(r);
        y1 = y1.max(r);
    }
    let pad = |y0: f64, y1: f64| {
        if log_y {
            (y0 / 1.3, y1 * 1.3)
        } else {
            let m = ((y1 - y0) * 0.1).max(0.05);
            ((y0 - m).max(0.0), y1 + m)
        }
    };
    let (y0, y1) = pad(y0, y1);
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let n_x = (x1 - x0).round() as usize + 1;
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .x_labels(n_x)
                .y_labels(10)
                .x_label_formatter(xfmt)
                .y_label_formatter(&|y| {
                    if *y >= 100.0 {
                        format!("{y:.0}")
                    } else {
                        format!("{y:.2}")
                    }
                })
                .y_desc(y_desc)
                .x_desc(x_desc)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(e)?;
            if let Some(r) = reference {
                chart
                    .draw_series(LineSeries::new(
                        [(x0, r), (x1, r)],
                        BLACK.mix(0.5).stroke_width(1),
                    ))
                    .map_err(e)?;
            }
            for s in series {
                let color = s.color;
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .filter(|p| p.1.is_finite() && p.1 > 0.0)
                    .map(|&(x, y, _)| (lx(x), y))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(e)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(e)?;
                for &(x, _, sp) in &s.points {
                    if let Some((a, b)) = sp
                        && a.is_finite()
                        && b.is_finite()
                        && a > 0.0
                    {
                        chart
                            .draw_series(std::iter::once(PathElement::new(
                                [(lx(x), a), (lx(x), b)],
                                color.stroke_width(1),
                            )))
                            .map_err(e)?;
                    }
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(e)?;
        }};
    }
    if log_y {
        draw!(
            b.build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                .map_err(e)?
        );
    } else {
        draw!(b.build_cartesian_2d(x0..x1, y0..y1).map_err(e)?);
    }
    Ok(())
}

/// A text panel (a title and lines), for a summary next to the plots.
pub fn text(area: &Area<'_>, title: &str, lines: &[String]) -> anyhow::Result<()> {
    let (w, _) = area.dim_in_pixel();
    area.draw(&Text::new(
        title.to_string(),
        (12, 12),
        ("sans-serif", 20).into_font().style(FontStyle::Bold),
    ))
    .map_err(e)?;
    let size = if w < 500 { 13 } else { 15 };
    for (i, l) in lines.iter().enumerate() {
        area.draw(&Text::new(
            l.clone(),
            (12, 44 + i as i32 * (size + 6)),
            ("sans-serif", size).into_font(),
        ))
        .map_err(e)?;
    }
    Ok(())
}
