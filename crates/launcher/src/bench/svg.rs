//! `nestor bench --svg DIR`: up to five plots drawn with plotters' SVG backend — start time
//! per mode and runner (median bars, p10–p90 whiskers, log scale), workload performance
//! against the native process (grouped bars per workload, a bar per mode, 95% interval
//! whiskers, log scale, higher is better), the density sweep (memory and start time as
//! units are added), and the shared directory (fs section: grouped bars per workload, a
//! bar per way to the directory, relative to the host process, log scale) and the state
//! transfer (snapshot and migration times per mode, log scale). Skipped rows are named
//! on the plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::model::*;
use super::report::column_label;

pub const START_TITLE: &str = "nestor bench: start time per mode";
pub const OVERHEAD_TITLE: &str = "nestor bench: workload overhead vs native process";
pub const DENSITY_TITLE: &str = "nestor bench: density sweep";
pub const FS_TITLE: &str = "nestor bench: shared directory vs host process";
pub const TRANSFER_TITLE: &str = "nestor bench: state transfer";

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

/// Writes start-time.svg, overhead.svg and density.svg into `dir`, and fs.svg and
/// state-transfer.svg when the report has those sections; their paths.
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
    let vals: Vec<f64> = rows
        .iter()
        .filter_map(|c| c.start.as_ref())
        .flat_map(|s| [s.p10, s.p90, s.median])
        .filter(|v| *v > 0.0)
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if vals.is_empty() {
        (0.1, 10.0)
    } else {
        (lo / 2.0, hi * 2.0)
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
        .x_desc("launch -> unit's program running, ms (median, p10-p90; log scale)")
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
    // A hair beyond the decades, so that their own ticks are drawn and labelled.
    (
        10f64.powf(lo.log10().floor()) * 0.999,
        10f64.powf(hi.log10().ceil()) * 1.001,
    )
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
        .y_label_formatter(&|v| (bars.ticks)(*v))
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
    for (i, (label, color)) in legend_rows.iter().enumerate() {
        let y = 60 + 22 * i as i32;
        legend
            .draw(&Rectangle::new([(5, y), (19, y + 12)], color.filled()))
            .map_err(err)?;
        legend
            .draw(&Text::new(label.clone(), (25, y), ("sans-serif", 13)))
            .map_err(err)?;
    }
    if let Some(f) = bars.footnote {
        legend
            .draw(&Text::new(
                f.to_string(),
                (5, 60 + 22 * legend_rows.len() as i32),
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
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(DENSITY_TITLE, ("sans-serif", 22))
        .map_err(err)?;
    let (left, right) = root.split_horizontally(550);
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
            let label = match d.status {
                Status::Skipped => format!("{} (skipped)", d.mode),
                Status::Measured => d.mode.clone(),
            };
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        if mem {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)?;
        }
    }
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
}
