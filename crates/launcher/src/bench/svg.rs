//! `nestor bench --svg DIR`: three plots drawn with plotters' SVG backend — start time
//! per mode and runner (median bars, p10–p90 whiskers, log scale), workload overhead
//! against the native process (ratio per workload and mode), and the density sweep
//! (memory and start time as units are added). Skipped rows are named on the plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::model::*;
use super::report::column_label;

pub const START_TITLE: &str = "nestor bench: start time per mode";
pub const OVERHEAD_TITLE: &str = "nestor bench: workload overhead vs native process";
pub const DENSITY_TITLE: &str = "nestor bench: density sweep";

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

/// Writes start-time.svg, overhead.svg and density.svg into `dir`; their paths.
pub fn write_all(r: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let files = vec![
        dir.join("start-time.svg"),
        dir.join("overhead.svg"),
        dir.join("density.svg"),
    ];
    start_time(r, &files[0])?;
    overhead(r, &files[1])?;
    density(r, &files[2])?;
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

fn overhead(r: &Report, path: &Path) -> Result<()> {
    let mut names: Vec<String> = Vec::new();
    for s in &r.workloads {
        for x in s.results.iter().filter(|x| x.tool == "built-in") {
            if !names.contains(&x.workload) {
                names.push(x.workload.clone());
            }
        }
    }
    let n = names.len().max(1);
    let ratios: Vec<f64> = r
        .workloads
        .iter()
        .flat_map(|s| s.results.iter())
        .filter_map(|x| x.ratio_vs_process)
        .collect();
    let hi = ratios.iter().copied().fold(1.5, f64::max) * 1.1;
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(OVERHEAD_TITLE, ("sans-serif", 22))
        .map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}; value / native (rtt: >1 is slower, others: <1 is slower)",
                subtitle(r)
            ),
            ("sans-serif", 13),
        )
        .margin(10)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("ratio to the native process")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            (0..=n).map(|i| (SegmentValue::Exact(i), 1.0)),
            BLACK.stroke_width(1),
        ))
        .map_err(err)?
        .label("native = 1")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    for (j, s) in r.workloads.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let pts: Vec<(SegmentValue<usize>, f64)> = names
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                s.results
                    .iter()
                    .find(|x| x.tool == "built-in" && &x.workload == w)
                    .and_then(|x| x.ratio_vs_process)
                    .map(|q| (SegmentValue::CenterOf(i), q))
            })
            .collect();
        let label = if pts.is_empty() {
            format!("{} (skipped)", s.mode)
        } else {
            s.mode.clone()
        };
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
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
