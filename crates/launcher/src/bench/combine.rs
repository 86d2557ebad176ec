//! Reports made from other reports: `nestor bench --merge A.json B.json…` joins runs that
//! each measured some modes (the main job runs each mode in its own test-host boot, so a
//! boot that dies costs one mode, not all), and `nestor bench --compare OLD.json NEW.json`
//! prints what changed between two runs, row by row, as ratios. Owns the merge rule and
//! the comparison table; the rows themselves are the `model`'s.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::model::*;

/// Reads a report written by `nestor bench --json` (a partial one too).
pub fn load(p: &Path) -> Result<Report> {
    let bytes = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
    let r: Report = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a nestor bench report", p.display()))?;
    if r.schema != SCHEMA {
        bail!(
            "{}: schema '{}', this nestor reads '{SCHEMA}'",
            p.display(),
            r.schema
        );
    }
    Ok(r)
}

/// One report from several: for each mode, the rows of the first report that measured it
/// (or, where none did, of the first that has it, with its skip reason). The header is the
/// first report's, with guest_boot true if any run booted a guest, and every report's notes
/// once each plus one saying where each mode came from.
pub fn merge(parts: &[(String, Report)]) -> Result<Report> {
    let Some((_, first)) = parts.first() else {
        bail!("--merge needs at least one report");
    };
    let mut order: Vec<String> = Vec::new();
    let mut source: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (_, r)) in parts.iter().enumerate() {
        for m in &r.modes {
            if !order.contains(&m.mode) {
                order.push(m.mode.clone());
            }
            let better = m.status == Status::Measured
                && source
                    .get(&m.mode)
                    .and_then(|&j| parts[j].1.modes.iter().find(|x| x.mode == m.mode))
                    .is_some_and(|x| x.status != Status::Measured);
            if !source.contains_key(&m.mode) || better {
                source.insert(m.mode.clone(), i);
            }
        }
    }
    let mut out = first.clone();
    out.partial = parts.iter().any(|(_, r)| r.partial);
    out.modes.clear();
    out.start_stop.clear();
    out.unit_size.clear();
    out.density.clear();
    out.workloads.clear();
    out.services.clear();
    out.state_transfer.clear();
    out.fs.clear();
    let mut notes: Vec<String> = Vec::new();
    for (_, r) in parts {
        out.header.kvm.guest_boot |= r.header.kvm.guest_boot;
        if r.header.kvm.guest_boot && !first.header.kvm.guest_boot {
            out.header.kvm.guest_boot_detail = r.header.kvm.guest_boot_detail.clone();
        }
        for n in &r.header.notes {
            if !notes.contains(n) {
                notes.push(n.clone());
            }
        }
    }
    let mut from: Vec<(String, Vec<String>)> = Vec::new();
    let mut xfer_from: Vec<String> = Vec::new();
    for m in &order {
        let (name, r) = &parts[source[m]];
        match from.iter_mut().find(|(n, _)| n == name) {
            Some((_, ms)) => ms.push(m.clone()),
            None => from.push((name.clone(), vec![m.clone()])),
        }
        out.modes
            .extend(r.modes.iter().filter(|x| &x.mode == m).cloned());
        out.start_stop
            .extend(r.start_stop.iter().filter(|x| &x.mode == m).cloned());
        out.unit_size
            .extend(r.unit_size.iter().filter(|x| &x.mode == m).cloned());
        out.density
            .extend(r.density.iter().filter(|x| &x.mode == m).cloned());
        out.workloads
            .extend(r.workloads.iter().filter(|x| &x.mode == m).cloned());
        // Services, state transfer and fs may come from a test-host boot of their own
        // (their VM launches would crowd the mode's boot): from the first report that
        // measured them.
        let mut note = |what: &str, n: &String| {
            if n != name {
                xfer_from.push(format!("{what} of {m} from {n}"));
            }
        };
        if let Some((n, x)) = take(parts, m, |r| &r.services) {
            note("services", n);
            out.services.push(x);
        }
        if let Some((n, x)) = take(parts, m, |r| &r.state_transfer) {
            note("state transfer", n);
            out.state_transfer.push(x);
        }
        if let Some((n, x)) = take(parts, m, |r| &r.fs) {
            note("fs", n);
            out.fs.push(x);
        }
    }
    if parts.len() > 1 {
        notes.push(format!(
            "merged from {} runs ({}): timings compare across them only as far as the runs' machines and loads do; workload ratios pair each mode with a native run of its own run",
            parts.len(),
            from.iter()
                .map(|(n, ms)| format!("{} from {n}", ms.join(", ")))
                .chain(xfer_from)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    out.header.notes = notes;
    Ok(out)
}

/// The row `get` finds in the first report where it was measured, else in the first
/// that has it; with that report's name.
fn first_measured<T>(
    parts: &[(String, Report)],
    get: impl Fn(&Report) -> Option<(T, Status)>,
) -> Option<(&String, T)> {
    let mut fallback = None;
    for (n, r) in parts {
        if let Some((x, st)) = get(r) {
            if st == Status::Measured {
                return Some((n, x));
            }
            fallback.get_or_insert((n, x));
        }
    }
    fallback
}

/// A section's row of one mode, measured or not.
trait ModeRow: Clone {
    fn mode(&self) -> &str;
    fn status(&self) -> Status;
}

macro_rules! mode_row {
    ($($t:ty),*) => {$(
        impl ModeRow for $t {
            fn mode(&self) -> &str {
                &self.mode
            }
            fn status(&self) -> Status {
                self.status
            }
        }
    )*};
}
mode_row!(ServiceSet, StateTransfer, FsSet);

/// The row of mode `m` in the first report that measured it (else the first that
/// has it), with that report's name.
fn take<'a, T: ModeRow>(
    parts: &'a [(String, Report)],
    m: &str,
    rows: impl Fn(&Report) -> &Vec<T>,
) -> Option<(&'a String, T)> {
    first_measured(parts, |r| {
        rows(r)
            .iter()
            .find(|x| x.mode() == m)
            .map(|x| (x.clone(), x.status()))
    })
}

/// A row both reports have: what, its unit, the old and new values, and whether higher
/// is better.
struct Row {
    section: &'static str,
    what: String,
    unit: String,
    old: f64,
    new: f64,
    higher_is_better: bool,
}

fn rows(r: &Report) -> Vec<(String, &'static str, String, f64, bool)> {
    let mut v = Vec::new();
    for s in &r.start_stop {
        let label = super::report::column_label(s);
        if let Some(x) = &s.start {
            v.push((
                format!("{label}: start"),
                "start/stop",
                "ms".into(),
                x.median,
                false,
            ));
        }
        if let Some(x) = &s.stop {
            v.push((
                format!("{label}: stop"),
                "start/stop",
                "ms".into(),
                x.median,
                false,
            ));
        }
    }
    for u in &r.unit_size {
        if let Some(p) = u.idle_pss_kib {
            v.push((
                format!("{}: {} idle PSS", u.mode, u.runner),
                "unit size",
                "KiB".into(),
                p as f64,
                false,
            ));
        }
    }
    for d in &r.density {
        if let Some(e) = d.estimated_units_in_budget {
            v.push((
                format!("{}: units in {} MiB", d.label(), d.budget_mib),
                "density",
                "units".into(),
                e,
                true,
            ));
        }
    }
    for s in &r.workloads {
        for x in &s.results {
            if let Some(val) = x.value {
                v.push((
                    format!("{}: {} ({})", s.mode, x.workload, x.tool),
                    "workloads",
                    x.unit.clone(),
                    val,
                    x.higher_is_better,
                ));
            }
        }
    }
    for s in &r.fs {
        for row in &s.rows {
            for x in &row.results {
                if let Some(val) = x.value {
                    v.push((
                        format!("{}: {} {}", s.mode, row.path, x.workload),
                        "fs",
                        x.unit.clone(),
                        val,
                        true,
                    ));
                }
            }
        }
    }
    for s in &r.services {
        if let Some(t) = s.tcp_mbps {
            v.push((
                format!("{}: TCP", s.mode),
                "services",
                "MB/s".into(),
                t,
                true,
            ));
        }
        if let Some(t) = &s.rtt_us {
            v.push((
                format!("{}: RTT", s.mode),
                "services",
                "µs".into(),
                t.median,
                false,
            ));
        }
        for x in &s.redis {
            v.push((
                format!("{}: redis {}", s.mode, x.test),
                "services",
                "ops/s".into(),
                x.rps,
                true,
            ));
        }
    }
    for x in &r.state_transfer {
        let mut add = |what: String, s: &Option<Summary>| {
            if let Some(s) = s {
                v.push((what, "state transfer", "ms".into(), s.median, false));
            }
        };
        for s in &x.snapshots {
            add(
                format!("{}: checkpoint {} MiB", x.mode, s.mem_mib),
                &s.checkpoint_ms,
            );
            add(
                format!("{}: restore {} MiB", x.mode, s.mem_mib),
                &s.restore_ms,
            );
        }
        for m in &x.migrations {
            add(
                format!("{}: {} {} paused", x.mode, m.strategy, m.guest),
                &m.paused_ms,
            );
        }
        add(
            format!("{}: CRIU checkpoint", x.mode),
            &x.criu.checkpoint_ms,
        );
        add(format!("{}: CRIU restore", x.mode), &x.criu.restore_ms);
    }
    v
}

fn paired(old: &Report, new: &Report) -> (Vec<Row>, Vec<String>) {
    let newrows = rows(new);
    let mut out = Vec::new();
    let mut only = Vec::new();
    for (what, section, unit, o, hib) in rows(old) {
        match newrows.iter().find(|r| r.0 == what) {
            Some(n) => out.push(Row {
                section,
                what,
                unit,
                old: o,
                new: n.3,
                higher_is_better: hib,
            }),
            None => only.push(format!("{what} (old only)")),
        }
    }
    for n in &newrows {
        if !out.iter().any(|r| r.what == n.0) && !only.iter().any(|o| o.starts_with(&n.0)) {
            only.push(format!("{} (new only)", n.0));
        }
    }
    (out, only)
}

/// The change from `old` to `new` as a Markdown table: new/old per row, and a verdict
/// ("better", "worse", or "same" within `noise`, a relative band such as 0.05).
pub fn compare(old: &Report, new: &Report, noise: f64) -> String {
    let (rows, only) = paired(old, new);
    let mut o = String::new();
    let _ = writeln!(o, "# nestor bench: what changed\n");
    let _ = writeln!(
        o,
        "old: {} ({}), new: {} ({}). Ratio = new / old; \"same\" within ±{:.0}%.\n",
        old.header.date,
        old.header.host,
        new.header.date,
        new.header.host,
        noise * 100.0
    );
    if old.header.inside_testhost != new.header.inside_testhost {
        let _ = writeln!(
            o,
            "- one run was inside the KVM test host and the other not: timings do not compare\n"
        );
    }
    let _ = writeln!(o, "| section | row | old | new | new/old | |");
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    let (mut better, mut worse) = (0, 0);
    for r in &rows {
        let ratio = if r.old != 0.0 {
            r.new / r.old
        } else {
            f64::NAN
        };
        let verdict = if !ratio.is_finite() {
            "-"
        } else if (ratio - 1.0).abs() <= noise {
            "same"
        } else if (ratio > 1.0) == r.higher_is_better {
            better += 1;
            "better"
        } else {
            worse += 1;
            "worse"
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} {} | {} {} | {:.2}x | {verdict} |",
            r.section,
            r.what.replace('|', "\\|"),
            fmt(r.old),
            r.unit,
            fmt(r.new),
            r.unit,
            ratio
        );
    }
    let _ = writeln!(
        o,
        "\n{} rows in both: {better} better, {worse} worse, {} the same.",
        rows.len(),
        rows.len() - better - worse
    );
    if !only.is_empty() {
        let _ = writeln!(o, "In one run only: {}.", only.join("; "));
    }
    o
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Report {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench-testhost.json");
        load(&p).unwrap()
    }

    /// The stored report split by mode into two runs, in the order the main job runs them.
    fn split(r: &Report, modes: &[&str]) -> Report {
        let keep = |m: &String| modes.contains(&m.as_str());
        let mut x = r.clone();
        x.modes.retain(|e| keep(&e.mode));
        x.start_stop.retain(|e| keep(&e.mode));
        x.unit_size.retain(|e| keep(&e.mode));
        x.density.retain(|e| keep(&e.mode));
        x.workloads.retain(|e| keep(&e.mode));
        x.services.retain(|e| keep(&e.mode));
        x.state_transfer.retain(|e| keep(&e.mode));
        x
    }

    #[test]
    fn merging_a_split_report_gives_back_every_mode_in_order() {
        let r = stored();
        let a = split(&r, &["process", "container", "vm"]);
        let b = split(&r, &["vm-container", "jailed-vm", "jailed-vm-container"]);
        let m = merge(&[("a".into(), a), ("b".into(), b)]).unwrap();
        let names = |r: &Report| r.modes.iter().map(|m| m.mode.clone()).collect::<Vec<_>>();
        assert_eq!(names(&m), names(&r));
        assert_eq!(m.start_stop.len(), r.start_stop.len());
        assert_eq!(m.workloads.len(), r.workloads.len());
        assert!(m
            .header
            .notes
            .iter()
            .any(|n| n.contains("merged from 2 runs")));
    }

    #[test]
    fn state_transfer_comes_from_the_boot_that_measured_it() {
        let r = stored();
        let main = split(&r, &["vm-container"]);
        assert!(main.state_transfer.is_empty());
        let mut own = main.clone();
        own.start_stop.clear();
        own.state_transfer.push(StateTransfer {
            mode: "vm-container".into(),
            status: Status::Measured,
            reason: None,
            jailed: false,
            rounds: 1,
            goal_mem_mib: 256,
            snapshots: vec![],
            migrations: vec![],
            criu: CriuRow {
                status: Status::Skipped,
                reason: Some("no criu".into()),
                checkpoint_ms: None,
                restore_ms: None,
                image_bytes: None,
            },
        });
        let m = merge(&[("main".into(), main.clone()), ("xfer".into(), own)]).unwrap();
        assert_eq!(m.start_stop.len(), main.start_stop.len());
        assert_eq!(m.state_transfer.len(), 1);
        assert!(m
            .header
            .notes
            .iter()
            .any(|n| n.contains("state transfer of vm-container from xfer")));
    }

    #[test]
    fn services_come_from_the_boot_that_measured_them() {
        let r = stored();
        let main = split(&r, &["vm-container"]);
        assert!(main.services.is_empty());
        let mut own = main.clone();
        own.start_stop.clear();
        own.services.push(ServiceSet {
            mode: "vm-container".into(),
            runner: "nestor".into(),
            status: Status::Measured,
            reason: None,
            path: "published 127.0.0.1:40000 -> 5201/tcp".into(),
            tcp_mbps: Some(14.0),
            rtt_us: None,
            redis: vec![],
            redis_reason: Some("no redis-benchmark".into()),
        });
        let m = merge(&[("main".into(), main.clone()), ("svc".into(), own)]).unwrap();
        assert_eq!(m.start_stop.len(), main.start_stop.len());
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.services[0].tcp_mbps, Some(14.0));
        assert!(m
            .header
            .notes
            .iter()
            .any(|n| n.contains("services of vm-container from svc")));
    }

    #[test]
    fn a_measured_mode_wins_over_a_skipped_one() {
        let r = stored();
        let mut skipped = split(&r, &["vm"]);
        for e in &mut skipped.modes {
            e.status = Status::Skipped;
            e.reason = Some("the test host died".into());
        }
        skipped.start_stop.clear();
        let good = split(&r, &["vm"]);
        let m = merge(&[("dead".into(), skipped), ("retry".into(), good)]).unwrap();
        assert_eq!(m.modes.len(), 1);
        assert_eq!(m.modes[0].status, Status::Measured);
        assert!(!m.start_stop.is_empty());
        assert!(merge(&[]).is_err());
    }

    #[test]
    fn compare_reports_the_ratio_and_verdict_of_a_changed_row() {
        let old = stored();
        let mut new = old.clone();
        let s = new
            .start_stop
            .iter_mut()
            .find(|s| s.start.is_some())
            .unwrap();
        let label = super::super::report::column_label(s);
        s.start.as_mut().unwrap().median *= 2.0;
        let text = compare(&old, &new, 0.05);
        let line = text
            .lines()
            .find(|l| l.contains(&format!("{label}: start")))
            .unwrap();
        assert!(line.contains("| 2.00x | worse |"), "{line}");
        assert!(text.contains(" 1 worse,"), "{text}");
        let same = compare(&old, &old, 0.05);
        assert!(same.contains(" 0 better, 0 worse,"), "{same}");
    }
}
