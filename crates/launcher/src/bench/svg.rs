//! `nestor bench --svg DIR`: up to six plots drawn with plotters' SVG backend — start time
//! per mode and runner (median bars, p10–p90 whiskers, log scale), workload performance
//! against the native process (grouped bars per workload, a bar per mode, 95% interval
//! whiskers, log scale, higher is better), the density sweep (memory and start time as
//! units are added), the efficiency table as one chart (a bar group per mode and runner,
//! a bar per property against the native process, higher is better, log scale), and the
//! shared directory (fs section: grouped bars per workload, a bar per way to the
//! directory, relative to the host process, log scale) and the state transfer (snapshot
//! and migration times per mode, log scale). Log axes span at least two whole decades and
//! label only those ("10 ms", "1 s", "0.1x"); every legend has an area of its own beside
//! the data. Skipped rows are named on the plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::model::*;
use super::report::{column_label, is_main};

pub const START_TITLE: &str = "nestor bench: start time per mode";
pub const OVERHEAD_TITLE: &str = "nestor bench: workload overhead vs native process";
pub const DENSITY_TITLE: &str = "nestor bench: density sweep";
pub const FS_TITLE: &str = "nestor bench: shared directory vs host process";
pub const TRANSFER_TITLE: &str = "nestor bench: state transfer";
pub const EFFICIENCY_TITLE: &str = "nestor bench: efficiency vs native process";

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Writes start-time.svg, overhead.svg and density.svg into `dir`, efficiency.svg when
/// the report has start/stop or unit-size rows, and fs.svg and state-transfer.svg when
/// it has those sections; their paths.
pub fn write_all(r: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut files = vec![
        dir.join("start-time.svg"),
        dir.join("overhead.svg"),
        dir.join("density.svg"),
    ];
    start_time(r, &files[0])?;
    overhead(r, &files[1])?;
    density(r, &files[2])?;
    if !r.start_stop.is_empty() || !r.unit_size.is_empty() {
        let f = dir.join("efficiency.svg");
        efficiency(r, &f)?;
        files.push(f);
    }
    if !r.fs.is_empty() {
        let f = dir.join("fs.svg");
        fs(r, &f)?;
        files.push(f);
    }
    if !r.state_transfer.is_empty() {
        let f = dir.join("state-transfer.svg");
        state_transfer(r, &f)?;
        files.push(f);
    }
    Ok(files)
}

/// What the plot in file `name` (as `write_all` names it) shows, for the report's list.
pub fn caption(name: &str) -> &'static str {
    match name {
        "start-time.svg" => "start time per mode and runner (median, p10-p90, log scale)",
        "overhead.svg" => {
            "workload performance against the native process (a bar per mode, 95% interval)"
        }
        "density.svg" => "density sweep: memory and start time as units are added",
        "efficiency.svg" => {
            "the efficiency table as one chart: each mode's start, stop, memory, disk and units per host against the native process, higher is better"
        }
        "fs.svg" => "shared directory: each way to it against a host process",
        "state-transfer.svg" => "state transfer: snapshot times and migration paused times",
        _ => "",
    }
}

fn subtitle(r: &Report) -> String {
    let h = &r.header;
    format!(
        "{}, kernel {}, KVM {}{}{}",
        h.host,
        h.kernel,
        h.kvm.module,
        if h.inside_testhost {
            ", inside the TCG test host (compare within this run only)"
        } else {
            ""
        },
        if h.quick { ", --quick" } else { "" }
    )
}

fn start_time(r: &Report, path: &Path) -> Result<()> {
    let rows = &r.start_stop;
    let n = rows.len().max(1);
    let labels: Vec<String> = rows
        .iter()
        .map(|c| match c.status {
            Status::Measured => column_label(c),
            Status::Skipped => format!("{} (skipped)", column_label(c)),
        })
        .collect();
    let vals: Vec<(f64, Option<[f64; 2]>)> = rows
        .iter()
        .filter_map(|c| c.start.as_ref())
        .filter(|s| s.median > 0.0)
        .map(|s| {
            (
                s.median,
                Some([s.p10.max(s.median / 1e3), s.p90.max(s.median)]),
            )
        })
        .collect();
    let (lo, hi) = if vals.is_empty() {
        decades([(1.0, None)].iter(), false)
    } else {
        decades(vals.iter(), false)
    };
    let height = 140 + 34 * n as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(START_TITLE, ("sans-serif", 22)).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(subtitle(r), ("sans-serif", 13))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(330)
        .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|v| log_label(*v, ms_tick))
        .x_desc("launch -> unit's program running (median, p10-p90; log scale)")
        .draw()
        .map_err(err)?;
    for (i, c) in rows.iter().enumerate() {
        let Some(s) = &c.start else { continue };
        let color = COLORS[i % COLORS.len()];
        let mut bar = Rectangle::new(
            [
                (lo, SegmentValue::Exact(i)),
                (s.median.max(lo), SegmentValue::Exact(i + 1)),
            ],
            color.mix(0.7).filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        chart.draw_series(std::iter::once(bar)).map_err(err)?;
        chart
            .draw_series(std::iter::once(ErrorBar::new_horizontal(
                SegmentValue::CenterOf(i),
                s.p10.max(lo),
                s.median.max(lo),
                s.p90.max(lo),
                BLACK.filled(),
                10,
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Performance relative to native, higher is better: the ratio, or its inverse where
/// lower is better (rtt), with its 95% interval turned the same way.
fn performance(x: &WorkloadResult) -> Option<(f64, Option<[f64; 2]>)> {
    let q = x.ratio_vs_process.filter(|q| *q > 0.0)?;
    let iv = x.ratio_interval.filter(|[lo, hi]| *lo > 0.0 && *hi > 0.0);
    Some(if x.higher_is_better {
        (q, iv)
    } else {
        (1.0 / q, iv.map(|[lo, hi]| [1.0 / hi, 1.0 / lo]))
    })
}

/// "0.01x", "0.5x", "2x": a log axis's tick without trailing zeros.
fn tick(v: f64) -> String {
    let s = if v >= 1.0 {
        format!("{v:.1}")
    } else {
        let digits = (-v.log10()).ceil().max(1.0) as usize + 1;
        format!("{v:.digits$}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}x")
}

/// One bar series of a grouped-bar plot: its legend label and, per group, the value
/// (performance relative to the baseline, higher is better) and its interval, if any.
type Series = (String, Vec<Option<(f64, Option<[f64; 2]>)>>);

/// Grouped bars: a group per workload, a bar per mode (the native process is the line
/// at 1x), each with its 95% interval as a whisker; log scale, higher is better.
fn overhead(r: &Report, path: &Path) -> Result<()> {
    let mut names: Vec<String> = Vec::new();
    for s in &r.workloads {
        for x in s.results.iter().filter(|x| x.tool == "built-in") {
            if !names.contains(&x.workload) {
                names.push(x.workload.clone());
            }
        }
    }
    let series: Vec<Series> = r
        .workloads
        .iter()
        .filter(|s| s.mode != "process")
        .map(|s| {
            let vals: Vec<_> = names
                .iter()
                .map(|w| {
                    s.results
                        .iter()
                        .find(|x| x.tool == "built-in" && &x.workload == w)
                        .and_then(performance)
                })
                .collect();
            let label = if vals.iter().any(Option::is_some) {
                s.mode.clone()
            } else {
                format!("{} (skipped)", s.mode)
            };
            (label, vals)
        })
        .collect();
    grouped_bars(
        path,
        OVERHEAD_TITLE,
        &format!("{}; higher is better (rtt inverted)", subtitle(r)),
        &Bars {
            names: &names,
            series: &series,
            baseline: Some("native process = 1x"),
            y_desc: "performance relative to the native process",
            footnote: Some("whiskers: 95% interval"),
            ticks: tick,
        },
    )
}

/// The fs section: a group per workload, a bar per way to the directory (the host
/// process is the line at 1x; the bar against the geometric mean of the host runs around
/// the row, the whisker against each of them); log scale, higher is better.
fn fs(r: &Report, path: &Path) -> Result<()> {
    let names: Vec<String> = super::fs::WORKLOADS
        .iter()
        .map(|(w, _)| w.to_string())
        .collect();
    let series: Vec<Series> =
        r.fs.iter()
            .flat_map(|s| s.rows.iter())
            .filter(|row| row.path != "host")
            .map(|row| {
                let vals: Vec<_> = names
                    .iter()
                    .map(|w| {
                        let x = row.results.iter().find(|x| &x.workload == w)?;
                        let q = x.ratio_vs_host.filter(|q| *q > 0.0)?;
                        // The ratio against each host run around the row, as a whisker.
                        let v = x.value?;
                        let lo = x.host_values.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = x.host_values.iter().copied().fold(0.0, f64::max);
                        let iv = (x.host_values.len() > 1 && lo > 0.0).then(|| [v / hi, v / lo]);
                        Some((q, iv))
                    })
                    .collect();
                let label = if vals.iter().any(Option::is_some) {
                    row.path.clone()
                } else {
                    format!("{} (skipped)", row.path)
                };
                (label, vals)
            })
            .collect();
    grouped_bars(
        path,
        FS_TITLE,
        &format!("{}; higher is better", subtitle(r)),
        &Bars {
            names: &names,
            series: &series,
            baseline: Some("host process = 1x"),
            y_desc: "relative to a host process on the same directory",
            footnote: Some("whiskers: against each host run"),
            ticks: tick,
        },
    )
}

/// The lowest and highest whole decades holding every value and interval, and 1 when
/// `around_one` (a ratio plot's baseline).
fn decades<'a>(
    vals: impl Iterator<Item = &'a (f64, Option<[f64; 2]>)>,
    around_one: bool,
) -> (f64, f64) {
    let (mut lo, mut hi) = if around_one {
        (0.5f64, 2.0f64)
    } else {
        (f64::INFINITY, 0.0f64)
    };
    for (q, iv) in vals {
        let [a, b] = iv.unwrap_or([*q, *q]);
        lo = lo.min(a.min(*q));
        hi = hi.max(b.max(*q));
    }
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        (lo, hi) = (0.5, 2.0); // nothing measured
    }
    // At least two decades: over a lone one plotters puts a key point at every tenth,
    // whose labels run together (and its top twice).
    let (a, b) = (lo.log10().floor(), hi.log10().ceil());
    let b = b.max(a + 2.0);
    // A hair beyond the decades, so that their own ticks are drawn and labelled.
    (10f64.powf(a) * 0.999, 10f64.powf(b) * 1.001)
}

/// A log axis's label for the key point `v`: whole decades only, "" for the other key
/// points (which keep their grid line). With `decades`' range of at least two decades
/// plotters puts no key point between decades; `""` keeps it so if it ever does.
fn log_label(v: f64, fmt: fn(f64) -> String) -> String {
    if v <= 0.0 || !v.is_finite() {
        return String::new();
    }
    let l = v.log10();
    if (l - l.round()).abs() < 1e-9 {
        fmt(10f64.powf(l.round()))
    } else {
        String::new()
    }
}

/// A grouped-bar plot on a log axis of whole decades: a group per name, a bar per
/// series, the baseline (if any) a line at 1, the legend beside the bars.
struct Bars<'a> {
    names: &'a [String],
    series: &'a [Series],
    /// The legend line of the baseline drawn at 1 (ratio plots).
    baseline: Option<&'a str>,
    y_desc: &'a str,
    footnote: Option<&'a str>,
    ticks: fn(f64) -> String,
}

/// One grouped-bar plot in a file of its own, under a title and subtitle.
fn grouped_bars(path: &Path, title: &str, sub: &str, bars: &Bars) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let root = root.titled(sub, ("sans-serif", 13)).map_err(err)?;
    draw_bars(&root, bars, 230)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Draws `bars` on `area`, the legend in its rightmost `legend_w` pixels (never over
/// the bars).
fn draw_bars(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    bars: &Bars,
    legend_w: u32,
) -> Result<()> {
    let names = bars.names;
    let n = names.len().max(1);
    let k = bars.series.len().max(1);
    let (lo, hi) = decades(
        bars.series.iter().flat_map(|s| s.1.iter().flatten()),
        bars.baseline.is_some(),
    );
    let (w, _) = area.dim_in_pixel();
    let (plot, legend) = area.split_horizontally(w.saturating_sub(legend_w));
    let mut chart = ChartBuilder::on(&plot)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| log_label(*v, bars.ticks))
        .y_desc(bars.y_desc)
        .draw()
        .map_err(err)?;
    let mut legend_rows = Vec::new();
    if let Some(b) = bars.baseline {
        chart
            .draw_series(LineSeries::new(
                [(-0.5, 1.0), (n as f64 - 0.5, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?;
        legend_rows.push((b.to_string(), BLACK));
    }
    let width = 0.8 / k as f64;
    for (j, (label, vals)) in bars.series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        for (i, v) in vals.iter().enumerate() {
            let Some((q, iv)) = v else { continue };
            let x0 = i as f64 - 0.4 + width * j as f64;
            let (x1, xm) = (x0 + width * 0.9, x0 + width * 0.45);
            chart
                .draw_series([Rectangle::new([(x0, lo), (x1, *q)], color.filled())])
                .map_err(err)?;
            if let Some([a, b]) = iv {
                let whisker = BLACK.stroke_width(1);
                let cap = width * 0.2;
                chart
                    .draw_series([
                        PathElement::new(vec![(xm, *a), (xm, *b)], whisker),
                        PathElement::new(vec![(xm - cap, *a), (xm + cap, *a)], whisker),
                        PathElement::new(vec![(xm - cap, *b), (xm + cap, *b)], whisker),
                    ])
                    .map_err(err)?;
            }
        }
        legend_rows.push((label.clone(), color));
    }
    draw_legend(&legend, &legend_rows, bars.footnote)
}

/// A legend in an area of its own (beside the plot, never over its data): a swatch and
/// a label per row, then the footnote, if any.
fn draw_legend(
    legend: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    rows: &[(String, RGBColor)],
    footnote: Option<&str>,
) -> Result<()> {
    for (i, (label, color)) in rows.iter().enumerate() {
        let y = 60 + 22 * i as i32;
        legend
            .draw(&Rectangle::new([(5, y), (19, y + 12)], color.filled()))
            .map_err(err)?;
        legend
            .draw(&Text::new(label.clone(), (25, y), ("sans-serif", 13)))
            .map_err(err)?;
    }
    if let Some(f) = footnote {
        legend
            .draw(&Text::new(
                f.to_string(),
                (5, 60 + 22 * rows.len() as i32),
                ("sans-serif", 12),
            ))
            .map_err(err)?;
    }
    Ok(())
}

/// "10 ms", "1 s", "0.5 ms": a log axis's tick of milliseconds.
fn ms_tick(v: f64) -> String {
    let (x, unit) = if v >= 1000.0 {
        (v / 1000.0, "s")
    } else {
        (v, "ms")
    };
    let s = tick(x);
    format!("{} {unit}", s.trim_end_matches('x'))
}

/// The efficiency table's properties as bars, each against the native process's and
/// turned so that higher is better: the process's figure over the unit's (start, stop,
/// idle memory, disk), or the unit's over the process's (units per host).
pub const EFFICIENCY_ROWS: [&str; 5] = [
    "start time",
    "stop time",
    "memory (idle PSS)",
    "unit size on disk",
    "units per host",
];

/// The efficiency table as one chart: a group of bars per mode and runner (the table's
/// columns but the native process, the line at 1x), a bar per property
/// (`EFFICIENCY_ROWS`), p10–p90 whiskers on the times; log scale, higher is better.
fn efficiency(r: &Report, path: &Path) -> Result<()> {
    let process = r.start_stop.iter().find(|c| c.mode == "process");
    let size_of = |c: &StartStop| {
        r.unit_size
            .iter()
            .find(|s| s.mode == c.mode && s.runner == c.runner && s.status == Status::Measured)
    };
    let units = |c: &StartStop| {
        r.density
            .iter()
            .filter(|_| is_main(r, c))
            .find(|d| d.mode == c.mode && d.is_plain() && d.status == Status::Measured)
            .and_then(|d| {
                if d.budget_reached {
                    Some(d.fit as f64)
                } else {
                    d.estimated_units_in_budget
                }
            })
            .filter(|u| *u > 0.0)
    };
    // Native over the unit's median, the whisker from the unit's p90 and p10.
    let time = |base: Option<&Summary>, s: Option<&Summary>| {
        let (b, s) = (base?.median, s?);
        (b > 0.0 && s.median > 0.0).then(|| {
            let iv = (s.p10 > 0.0 && s.p90 > 0.0).then_some([b / s.p90, b / s.p10]);
            (b / s.median, iv)
        })
    };
    let ratio = |num: Option<f64>, den: Option<f64>| match (num, den) {
        (Some(n), Some(d)) if n > 0.0 && d > 0.0 => Some((n / d, None)),
        _ => None,
    };
    let cols: Vec<&StartStop> = r
        .start_stop
        .iter()
        .filter(|c| c.mode != "process")
        .collect();
    let names: Vec<String> = cols
        .iter()
        .map(|c| match c.status {
            Status::Measured => column_label(c),
            Status::Skipped => format!("{} (skipped)", column_label(c)),
        })
        .collect();
    let mut series: Vec<Series> = EFFICIENCY_ROWS
        .iter()
        .map(|l| (l.to_string(), Vec::new()))
        .collect();
    for c in &cols {
        let measured = c.status == Status::Measured;
        let p = process.filter(|_| measured);
        let vals = [
            time(p.and_then(|p| p.start.as_ref()), c.start.as_ref()),
            time(p.and_then(|p| p.stop.as_ref()), c.stop.as_ref()),
            ratio(
                p.and_then(|p| size_of(p)?.idle_pss_kib).map(|k| k as f64),
                size_of(c).and_then(|s| s.idle_pss_kib).map(|k| k as f64),
            ),
            ratio(
                p.and_then(size_of).map(|s| s.disk_bytes as f64),
                size_of(c).map(|s| s.disk_bytes as f64),
            ),
            ratio(units(c), p.and_then(units)),
        ];
        for (s, v) in series.iter_mut().zip(vals) {
            s.1.push(v.filter(|_| measured));
        }
    }
    let n = names.len().max(1);
    let k = series.len();
    let (lo, hi) = decades(series.iter().flat_map(|s| s.1.iter().flatten()), true);
    let height = 160 + 12 * (k as u32 + 1) * n as u32;
    let root = SVGBackend::new(path, (1100, height.max(360))).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(EFFICIENCY_TITLE, ("sans-serif", 22))
        .map_err(err)?;
    let root = root
        .titled(
            &format!("{}; higher is better", subtitle(r)),
            ("sans-serif", 13),
        )
        .map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w - 240);
    // A group per column, the first at the top: group i is centred on y = n - 1 - i.
    let mut chart = ChartBuilder::on(&plot)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(290)
        .build_cartesian_2d((lo..hi).log_scale(), -0.5f64..(n as f64 - 0.5))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n + 1)
        .y_label_formatter(&|y| {
            let j = y.round();
            if (y - j).abs() < 1e-6 && j >= 0.0 && (j as usize) < n {
                names.get(n - 1 - j as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_formatter(&|v| log_label(*v, tick))
        .x_desc("relative to the native process (log scale)")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(1.0, -0.5), (1.0, n as f64 - 0.5)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?;
    let height = 0.8 / k as f64;
    for (j, (_, vals)) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        for (i, v) in vals.iter().enumerate() {
            let Some((q, iv)) = v else { continue };
            let y0 = (n - 1 - i) as f64 + 0.4 - height * (j + 1) as f64;
            let (y1, ym) = (y0 + height * 0.9, y0 + height * 0.45);
            chart
                .draw_series([Rectangle::new([(lo, y0), (*q, y1)], color.filled())])
                .map_err(err)?;
            if let Some([a, b]) = iv {
                let whisker = BLACK.stroke_width(1);
                let cap = height * 0.2;
                chart
                    .draw_series([
                        PathElement::new(vec![(*a, ym), (*b, ym)], whisker),
                        PathElement::new(vec![(*a, ym - cap), (*a, ym + cap)], whisker),
                        PathElement::new(vec![(*b, ym - cap), (*b, ym + cap)], whisker),
                    ])
                    .map_err(err)?;
            }
        }
    }
    let mut rows = vec![("native process = 1x".to_string(), BLACK)];
    rows.extend(
        series
            .iter()
            .enumerate()
            .map(|(j, s)| (s.0.clone(), COLORS[j % COLORS.len()])),
    );
    draw_legend(&legend, &rows, Some("whiskers: the unit's p10-p90 (times)"))?;
    root.present().map_err(err)?;
    Ok(())
}

/// The state-transfer section: per mode and guest size, the cold start, checkpoint and
/// restore (left); per mode and guest, each migration strategy's paused time (right).
/// Medians, min–max whiskers where rounds were several; log scale, lower is better.
fn state_transfer(r: &Report, path: &Path) -> Result<()> {
    let med = |s: &Option<Summary>| {
        s.as_ref()
            .filter(|s| s.median > 0.0)
            .map(|s| (s.median, (s.n > 1).then_some([s.min.max(1e-3), s.max])))
    };
    let mut snap_names = Vec::new();
    let mut snap: Vec<Series> = ["cold start", "checkpoint", "restore"]
        .iter()
        .map(|l| (l.to_string(), vec![]))
        .collect();
    let mut move_names = Vec::new();
    let mut moves: Vec<Series> = super::transfer::STRATEGIES
        .iter()
        .map(|l| (format!("{l} (paused)"), vec![]))
        .collect();
    for x in &r.state_transfer {
        for s in &x.snapshots {
            snap_names.push(format!("{} {} MiB", x.mode, s.mem_mib));
            let m = s.status == Status::Measured;
            for (i, v) in [&s.cold_start_ms, &s.checkpoint_ms, &s.restore_ms]
                .into_iter()
                .enumerate()
            {
                snap[i].1.push(if m { med(v) } else { None });
            }
        }
        for guest in ["idle", "dirtying"] {
            move_names.push(format!("{} {guest}", x.mode));
            for (i, st) in super::transfer::STRATEGIES.iter().enumerate() {
                let row = x
                    .migrations
                    .iter()
                    .find(|m| m.strategy == *st && m.guest == guest)
                    .filter(|m| m.status == Status::Measured);
                moves[i].1.push(row.and_then(|m| med(&m.paused_ms)));
            }
        }
    }
    let root = SVGBackend::new(path, (1300, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(TRANSFER_TITLE, ("sans-serif", 22))
        .map_err(err)?;
    let root = root
        .titled(
            &format!(
                "{}; medians, min-max whiskers over rounds; lower is better",
                subtitle(r)
            ),
            ("sans-serif", 13),
        )
        .map_err(err)?;
    let (left, right) = root.split_horizontally(680);
    draw_bars(
        &left,
        &Bars {
            names: &snap_names,
            series: &snap,
            baseline: None,
            y_desc: "snapshot: time, log scale",
            footnote: None,
            ticks: ms_tick,
        },
        130,
    )?;
    draw_bars(
        &right,
        &Bars {
            names: &move_names,
            series: &moves,
            baseline: None,
            y_desc: "live migration: guest paused, log scale",
            footnote: None,
            ticks: ms_tick,
        },
        150,
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn density(r: &Report, path: &Path) -> Result<()> {
    let max_n = r
        .density
        .iter()
        .flat_map(|d| d.points.iter().map(|p| p.count))
        .max()
        .unwrap_or(1)
        .max(1);
    let max_mib = r
        .density
        .iter()
        .flat_map(|d| d.points.iter().map(|p| p.total_pss_kib as f64 / 1024.0))
        .fold(1.0, f64::max)
        * 1.1;
    let max_ms = r
        .density
        .iter()
        .flat_map(|d| d.points.iter().map(|p| p.start_ms))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (1120, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(DENSITY_TITLE, ("sans-serif", 22))
        .map_err(err)?;
    // The legend in a column of its own at the right, off both panels' data.
    let (plots, legend) = root.split_horizontally(880);
    let (left, right) = plots.split_horizontally(440);
    let panels: [(&DrawingArea<SVGBackend, _>, &str, f64, bool); 2] = [
        (&left, "PSS of all units, MiB", max_mib, true),
        (&right, "start time of the n-th unit, ms", max_ms, false),
    ];
    for (area, desc, top, mem) in panels {
        let mut chart = ChartBuilder::on(area)
            .caption(desc, ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0usize..max_n + 1, 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("units running")
            .y_desc(desc)
            .draw()
            .map_err(err)?;
        for (j, d) in r.density.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            let pts: Vec<(usize, f64)> = d
                .points
                .iter()
                .map(|p| {
                    (
                        p.count,
                        if mem {
                            p.total_pss_kib as f64 / 1024.0
                        } else {
                            p.start_ms
                        },
                    )
                })
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?;
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
    }
    let rows: Vec<(String, RGBColor)> = r
        .density
        .iter()
        .enumerate()
        .map(|(j, d)| {
            let label = match d.status {
                Status::Skipped => format!("{} (skipped)", d.label()),
                Status::Measured => d.label(),
            };
            (label, COLORS[j % COLORS.len()])
        })
        .collect();
    draw_legend(&legend, &rows, None)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_short() {
        assert_eq!(tick(1.0), "1x");
        assert_eq!(tick(10.0), "10x");
        assert_eq!(tick(0.1), "0.1x");
        assert_eq!(tick(0.01), "0.01x");
        assert_eq!(tick(0.5), "0.5x");
        assert_eq!(tick(2.5), "2.5x");
    }

    #[test]
    fn log_labels_are_whole_decades_over_two_or_more() {
        assert_eq!(log_label(10.0, ms_tick), "10 ms");
        assert_eq!(log_label(1000.0, ms_tick), "1 s");
        assert_eq!(log_label(9.999999999999, ms_tick), "10 ms");
        assert_eq!(log_label(20.0, ms_tick), "");
        assert_eq!(log_label(0.01, tick), "0.01x");
        assert_eq!(log_label(0.5, tick), "");
        let one = [(20.0, Some([12.0, 40.0]))];
        let (lo, hi) = decades(one.iter(), false);
        assert!(
            lo < 10.0 && lo > 9.9 && hi > 1000.0 && hi < 1002.0,
            "{lo} {hi}"
        );
    }

    /// The stored test-host run (every section but state transfer and fs measured).
    fn stored() -> Report {
        serde_json::from_str(include_str!("../../tests/data/bench-testhost.json")).unwrap()
    }

    /// Each `<text>` of an SVG file: its x, y and trimmed content.
    fn texts(path: &Path) -> Vec<(f64, f64, String)> {
        let text = std::fs::read_to_string(path).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| {
                let num = |a| n.attribute(a).unwrap_or("0").parse::<f64>().unwrap();
                (
                    num("x"),
                    num("y"),
                    n.text().unwrap_or("").trim().to_string(),
                )
            })
            .collect()
    }

    /// The start-time axis: "10 ms"-style labels of whole decades, apart from each
    /// other, none twice; no bare numbers such as plotters' "10.0".
    #[test]
    fn start_time_axis_has_clean_separate_labels() {
        let mut narrow = stored();
        for c in narrow.start_stop.iter_mut() {
            if let Some(s) = c.start.as_mut() {
                (s.median, s.p10, s.p90) = (25.0, 12.0, 40.0);
            }
        }
        for (r, min_labels) in [(stored(), 4), (narrow, 3)] {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("start-time.svg");
            start_time(&r, &f).unwrap();
            let all = texts(&f);
            assert!(
                !all.iter().any(|t| t.2.parse::<f64>().is_ok()),
                "a bare number among {all:?}"
            );
            let mut ticks: Vec<(f64, f64)> = all
                .iter()
                .filter_map(|(x, _, t)| {
                    let (v, unit) = t.split_once(' ')?;
                    let v: f64 = v.parse().ok()?;
                    let scale = match unit {
                        "ms" => 1.0,
                        "s" => 1000.0,
                        _ => return None,
                    };
                    Some((*x, v * scale))
                })
                .collect();
            assert!(ticks.len() >= min_labels, "{ticks:?}");
            ticks.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in ticks.windows(2) {
                assert!(w[1].0 - w[0].0 >= 50.0, "labels too close: {ticks:?}");
            }
            for (_, v) in &ticks {
                let l = v.log10();
                assert!((l - l.round()).abs() < 1e-9, "{v} is not a whole decade");
            }
        }
    }

    /// The density legend names every mode, right of all the data and grid of both
    /// panels.
    #[test]
    fn density_legend_is_beside_the_plots() {
        let r = stored();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("density.svg");
        density(&r, &f).unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        let mut right = 0f64;
        for n in doc.descendants() {
            let xs: Vec<f64> = match n.tag_name().name() {
                "line" => ["x1", "x2"]
                    .iter()
                    .filter_map(|a| n.attribute(*a)?.parse().ok())
                    .collect(),
                "circle" => {
                    let c: f64 = n.attribute("cx").unwrap().parse().unwrap();
                    let rad: f64 = n.attribute("r").unwrap().parse().unwrap();
                    vec![c + rad]
                }
                "polyline" => n
                    .attribute("points")
                    .unwrap()
                    .split_whitespace()
                    .filter_map(|p| p.split(',').next()?.parse().ok())
                    .collect(),
                _ => continue,
            };
            right = xs.into_iter().fold(right, f64::max);
        }
        assert!(right > 500.0, "no plot found ({right})");
        let all = texts(&f);
        for d in &r.density {
            let label = match d.status {
                Status::Measured => d.mode.clone(),
                Status::Skipped => format!("{} (skipped)", d.mode),
            };
            let (x, _, _) = all
                .iter()
                .find(|t| t.2 == label)
                .unwrap_or_else(|| panic!("no legend row {label:?} in {all:?}"));
            assert!(
                *x > right,
                "legend row {label:?} at x {x}, the plots reach {right}"
            );
        }
    }

    /// efficiency.svg is written with the others and has a group per column of the
    /// efficiency table but the native process's, and a legend row per property.
    #[test]
    fn efficiency_chart_has_every_mode_and_property() {
        let r = stored();
        let dir = tempfile::tempdir().unwrap();
        let files = write_all(&r, dir.path()).unwrap();
        let f = dir.path().join("efficiency.svg");
        assert!(files.contains(&f), "{files:?}");
        let all: Vec<String> = texts(&f).into_iter().map(|t| t.2).collect();
        assert!(all.contains(&EFFICIENCY_TITLE.to_string()));
        for c in r.start_stop.iter().filter(|c| c.mode != "process") {
            let label = match c.status {
                Status::Measured => column_label(c),
                Status::Skipped => format!("{} (skipped)", column_label(c)),
            };
            assert!(all.contains(&label), "{label:?} not in {all:?}");
        }
        for m in r.modes.iter().filter(|m| m.mode != "process") {
            assert!(
                all.iter().any(|t| t.starts_with(&format!("{}: ", m.mode))),
                "mode {} not in {all:?}",
                m.mode
            );
        }
        for p in EFFICIENCY_ROWS {
            assert!(all.contains(&p.to_string()), "{p:?} not in {all:?}");
        }
        assert!(all.contains(&"1x".to_string()), "{all:?}");
    }
}
