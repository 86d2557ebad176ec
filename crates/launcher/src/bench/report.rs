//! The Markdown report `nestor bench` prints: a header (host, kernel, KVM, date, test
//! host), the efficiency table measured (unit size, units per host, start time,
//! stop time; a column per mode and runner), the workload tables against the native
//! process, services, state transfer (with its goals met or not), the shared directory
//! (fs: each way to it against a host process, with its goal) and the density sweep;
//! with `--svg`, the list of plots written. Skipped rows stay in every table, with their
//! reason.

use std::fmt::Write;

use super::model::*;

fn ms(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.2} ms")
    } else if x < 1000.0 {
        format!("{x:.1} ms")
    } else {
        format!("{:.2} s", x / 1000.0)
    }
}

fn summary(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{} [{}–{}]", ms(s.median), ms(s.p10), ms(s.p90)),
        None => "-".into(),
    }
}

pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / 1024.0 / 1024.0 / 1024.0)
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

fn kib(k: i64) -> String {
    let sign = if k < 0 { "-" } else { "" };
    format!("{sign}{}", bytes(k.unsigned_abs() * 1024))
}

fn num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// "crun version 1.8.1" -> "crun 1.8.1"; long paths dropped.
pub fn short_version(runner: &str, version: &str) -> String {
    let first = version.split(" (").next().unwrap_or_default();
    let v = first
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or_default();
    if v.is_empty() {
        runner.to_string()
    } else {
        format!("{runner} {v}")
    }
}

pub fn column_label(s: &StartStop) -> String {
    let who = match s.runner.as_str() {
        "nestor-image" => "nestor run IMAGE".to_string(),
        "process" => "native".to_string(),
        _ => short_version(&s.runner, &s.version),
    };
    format!("{}: {who}", s.mode)
}

/// A ratio with the digits it needs: small ones keep theirs.
fn ratio(q: f64) -> String {
    if q >= 100.0 {
        format!("{q:.0}")
    } else if q < 0.0001 {
        "<0.0001".into()
    } else if q < 0.1 {
        format!("{q:.4}")
    } else {
        format!("{q:.2}")
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Skip reasons, each printed in full once: the first time with a number, `[n]`, and
/// every later time as `see [n]`, so that a reason shared by many cells (no KVM, a peer
/// not installed) does not fill the report.
#[derive(Default)]
struct Reasons(Vec<String>);

impl Reasons {
    fn say(&mut self, why: &str) -> String {
        let why = cell(why);
        match self.0.iter().position(|r| *r == why) {
            Some(i) => format!("see [{}]", i + 1),
            None => {
                self.0.push(why.clone());
                format!("{why} [{}]", self.0.len())
            }
        }
    }
}

/// The report: one section after another (see the module docs).
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let mut why = Reasons::default();
    header(&mut o, &r.header, &mut why);
    if r.partial {
        let _ = writeln!(
            o,
            "- **partial**: this run was cut short; it holds the modes measured before that"
        );
    }
    modes(&mut o, r, &mut why);
    efficiency(&mut o, r, &mut why);
    jail_cost(&mut o, r);
    warm_cost(&mut o, r);
    workloads(&mut o, r);
    services(&mut o, r, &mut why);
    state_transfer(&mut o, r, &mut why);
    fs(&mut o, r, &mut why);
    disk_files(&mut o, r);
    fio_reference(&mut o, r, &mut why);
    skipped_workloads(&mut o, r, &mut why);
    density(&mut o, r, &mut why);
    o
}

/// The plots `--svg DIR` wrote: a line per file with what it shows.
pub fn plots(files: &[std::path::PathBuf]) -> String {
    let mut o = String::new();
    if files.is_empty() {
        return o;
    }
    let dir = files[0].parent().map(|d| d.display().to_string());
    let _ = writeln!(o, "\n## Plots ({})\n", dir.unwrap_or_default());
    for f in files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let _ = writeln!(o, "- `{name}`: {}", super::svg::caption(&name));
    }
    o
}

/// The header table (host, kernel, KVM, date, test host, runs, version) and its notes.
fn header(o: &mut String, h: &Header, why: &mut Reasons) {
    let _ = writeln!(o, "# nestor bench\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(
        o,
        "| host | {}: {}, {} cores, {} MiB |",
        h.host, h.cpu, h.cores, h.mem_total_mib
    );
    let _ = writeln!(o, "| kernel | {} |", h.kernel);
    let _ = writeln!(
        o,
        "| KVM | /dev/kvm {}; module {}; hardware-assisted: **{}**; Linux guest boots here: **{}** ({}) |",
        if h.kvm.device { "present" } else { "absent" },
        h.kvm.module,
        if h.kvm.hardware_assisted { "yes" } else { "no" },
        if h.kvm.guest_boot { "yes" } else { "no" },
        if h.kvm.guest_boot {
            cell(&h.kvm.guest_boot_detail)
        } else {
            why.say(&h.kvm.guest_boot_detail)
        }
    );
    let _ = writeln!(o, "| date | {} |", h.date);
    let _ = writeln!(
        o,
        "| inside the KVM test host | {} |",
        if h.inside_testhost {
            "**yes**: QEMU TCG with nested SVM; timings compare only within this run"
        } else {
            "no"
        }
    );
    let _ = writeln!(
        o,
        "| runs | {} timed start/stop runs per row{}; workloads {} s each |",
        h.runs,
        if h.quick { " (--quick)" } else { "" },
        h.workload_secs
    );
    let _ = writeln!(o, "| nestor | {} |\n", h.nestor_version);
    for n in &h.notes {
        // Reports before skip reasons were numbered repeat the KVM line in a note.
        if !n.starts_with("VM modes skipped: ") {
            let _ = writeln!(o, "- {n}");
        }
    }
}

/// Every mode, measured or skipped with its reason.
fn modes(o: &mut String, r: &Report, why: &mut Reasons) {
    let _ = writeln!(o, "\n## Modes\n\n| mode | what | status |\n|---|---|---|");
    for m in &r.modes {
        let st = match m.status {
            Status::Measured => "measured".to_string(),
            Status::Skipped => format!(
                "**skipped**: {}",
                why.say(m.reason.as_deref().unwrap_or_default())
            ),
        };
        let _ = writeln!(o, "| {} | {} | {} |", m.mode, m.description, st);
    }
}

/// The efficiency table: a column per mode and runner, a row per property, then
/// the skipped columns with their reasons.
fn efficiency(o: &mut String, r: &Report, why: &mut Reasons) {
    let cols = &r.start_stop;
    if cols.is_empty() && r.unit_size.is_empty() {
        return; // not among --sections
    }
    let _ = writeln!(o, "\n## Efficiency (measured here)\n");
    let mut head = "| property |".to_string();
    let mut sep = "|---|".to_string();
    for c in cols {
        let _ = write!(head, " {} |", cell(&column_label(c)));
        sep.push_str("---|");
    }
    let _ = writeln!(o, "{head}\n{sep}");
    let size_of = |c: &StartStop| {
        r.unit_size
            .iter()
            .find(|s| s.mode == c.mode && s.runner == c.runner)
    };
    let row = |o: &mut String, name: &str, f: &dyn Fn(&StartStop) -> String| {
        let mut line = format!("| {name} |");
        for c in cols {
            let _ = write!(line, " {} |", f(c));
        }
        let _ = writeln!(o, "{line}");
    };
    row(o, "unit size: disk", &|c| {
        size_of(c)
            .filter(|s| s.disk_bytes > 0)
            .map(|s| bytes(s.disk_bytes))
            .unwrap_or_else(|| "-".into())
    });
    row(o, "unit size: memory (idle PSS)", &|c| {
        size_of(c)
            .and_then(|s| s.idle_pss_kib)
            .map(|k| kib(k as i64))
            .unwrap_or_else(|| "-".into())
    });
    row(o, "memory overhead vs process", &|c| {
        size_of(c)
            .and_then(|s| s.overhead_kib)
            .map(|k| format!("{}{}", if k >= 0 { "+" } else { "" }, kib(k)))
            .unwrap_or_else(|| "-".into())
    });
    row(o, "units per host (memory budget)", &|c| {
        units_per_host(r, c)
    });
    row(o, "start time, median [p10–p90]", &|c| summary(&c.start));
    row(o, "stop time, median [p10–p90]", &|c| summary(&c.stop));
    row(o, "start + stop, median", &|c| {
        c.total.as_ref().map(|s| ms(s.median)).unwrap_or("-".into())
    });
    let native = cols
        .iter()
        .find(|c| c.mode == "process")
        .and_then(|c| c.total.as_ref().map(|s| s.median));
    row(
        o,
        "start + stop vs process",
        &|c| match (c.total.as_ref(), native) {
            (Some(t), Some(n)) if n > 0.0 => format!("{:.1}x", t.median / n),
            _ => "-".into(),
        },
    );
    row(o, "status", &|c| match c.status {
        Status::Measured => format!("measured ({} runs)", c.samples.len()),
        Status::Skipped => "**skipped**".into(),
    });
    skipped_columns(o, cols, why);
}

/// What the jail adds to a start (`run --vm` jails nestor-vmm by default): each jailed
/// mode's start median against its unjailed twin's, both measured in this run.
fn jail_cost(o: &mut String, r: &Report) {
    let start = |mode: &str| {
        r.start_stop
            .iter()
            .find(|c| c.mode == mode && c.status == Status::Measured && is_main(r, c))
            .and_then(|c| c.start.as_ref().map(|s| s.median))
    };
    let mut parts = Vec::new();
    for (jailed, plain) in [("jailed-vm", "vm"), ("jailed-vm-container", "vm-container")] {
        if let (Some(j), Some(p)) = (start(jailed), start(plain)) {
            parts.push(format!(
                "{jailed} {} against {plain} {} ({}{}, {:.2}x)",
                ms(j),
                ms(p),
                if j >= p { "+" } else { "-" },
                ms((j - p).abs()),
                j / p
            ));
        }
    }
    if !parts.is_empty() {
        let _ = writeln!(
            o,
            "\nThe jail's start cost (start medians; `run --vm` jails nestor-vmm unless `--no-jail`): {}.",
            parts.join("; ")
        );
    }
}

/// What a warm start saves: each VM-container mode's `--vm-warm` start median against
/// its cold one, both measured in this run.
fn warm_cost(o: &mut String, r: &Report) {
    let mut parts = Vec::new();
    for w in r
        .start_stop
        .iter()
        .filter(|c| c.runner.ends_with(WARM) && c.status == Status::Measured)
    {
        let cold = r
            .start_stop
            .iter()
            .find(|c| c.mode == w.mode && c.status == Status::Measured && is_main(r, c))
            .and_then(|c| c.start.as_ref().map(|s| s.median));
        if let (Some(c), Some(t)) = (cold, w.start.as_ref().map(|s| s.median)) {
            parts.push(format!(
                "{} {} against {} cold ({:.2}x)",
                w.mode,
                ms(t),
                ms(c),
                t / c
            ));
        }
    }
    if !parts.is_empty() {
        let _ = writeln!(
            o,
            "\nWarm starts (`run --vm --vm-warm`: the VM restored from a snapshot of a booted idle one of its shape, made by an uncounted first run; start medians): {}.",
            parts.join("; ")
        );
    }
}

/// The "units per host" cell: the density sweep's figure, in the mode's own column only.
fn units_per_host(r: &Report, c: &StartStop) -> String {
    let main = r
        .density
        .iter()
        .find(|d| d.mode == c.mode && d.is_plain())
        .filter(|_| is_main(r, c));
    match main {
        Some(d) if d.status == Status::Measured => {
            if d.budget_reached {
                format!("{} in {} MiB", d.fit, d.budget_mib)
            } else {
                format!(
                    "≈{:.0} in {} MiB ({} started)",
                    d.estimated_units_in_budget.unwrap_or(0.0),
                    d.budget_mib,
                    d.fit
                )
            }
        }
        _ => "-".into(),
    }
}

/// The start/stop columns that were skipped, with their reasons: one line per reason.
fn skipped_columns(o: &mut String, cols: &[StartStop], why: &mut Reasons) {
    let items = cols
        .iter()
        .filter(|c| c.status == Status::Skipped)
        .map(|c| (column_label(c), c.reason.clone().unwrap_or_default()))
        .collect::<Vec<_>>();
    list_by_reason(o, "Skipped:", items, why);
}

/// "- a, b: reason" lines under `title`, the items sharing a reason on one line.
fn list_by_reason(o: &mut String, title: &str, items: Vec<(String, String)>, why: &mut Reasons) {
    let mut groups: Vec<(Vec<String>, String)> = Vec::new();
    for (what, reason) in items {
        match groups.iter_mut().find(|g| g.1 == reason) {
            Some(g) => g.0.push(what),
            None => groups.push((vec![what], reason)),
        }
    }
    if !groups.is_empty() {
        let _ = writeln!(o, "\n{title}");
        for (whats, reason) in groups {
            let _ = writeln!(o, "- {}: {}", whats.join(", "), why.say(&reason));
        }
    }
}

/// The workload table: a row per built-in workload, a column per mode, each value with
/// its ratio to the native run made just before.
fn workloads(o: &mut String, r: &Report) {
    if r.workloads.is_empty() {
        return; // not among --sections
    }
    // Workloads: a row per workload, a column per mode.
    let _ = writeln!(
        o,
        "\n## Workloads (the same `nestor workload` program in every mode; median value, and median ratio to a native run made just before each run [95% interval])\n"
    );
    let mut head = "| workload | unit |".to_string();
    let mut sep = "|---|---|".to_string();
    for s in &r.workloads {
        let _ = write!(head, " {} |", s.mode);
        sep.push_str("---|");
    }
    let _ = writeln!(o, "{head}\n{sep}");
    let mut names: Vec<(String, String, bool)> = Vec::new();
    for s in &r.workloads {
        for x in s.results.iter().filter(|x| x.tool == "built-in") {
            if !names.iter().any(|n| n.0 == x.workload) {
                names.push((x.workload.clone(), x.unit.clone(), x.higher_is_better));
            }
        }
    }
    for (w, unit, hib) in &names {
        let mut line = format!(
            "| {w} | {unit}{} |",
            if *hib { "" } else { " (lower is better)" }
        );
        for s in &r.workloads {
            let x = s
                .results
                .iter()
                .find(|x| x.tool == "built-in" && &x.workload == w);
            let c = match x {
                Some(x) if x.status == Status::Measured => match (x.value, x.ratio_vs_process) {
                    (Some(v), Some(q)) => {
                        let interval = match x.ratio_interval {
                            Some([lo, hi]) => format!(" [{}–{}]", ratio(lo), ratio(hi)),
                            None => String::new(),
                        };
                        let same = if x.no_difference() { " ≈" } else { "" };
                        format!("{} ({}x{interval}{same})", num(v), ratio(q))
                    }
                    (Some(v), None) => num(v),
                    _ => "-".into(),
                },
                Some(_) => "skipped".into(),
                None => "-".into(),
            };
            let _ = write!(line, " {c} |");
        }
        let _ = writeln!(o, "{line}");
    }
}

/// Servers reached from the host through each mode's published port: TCP and Redis,
/// ratios to the native process on loopback; the goals and the IBM study beside them.
fn services(o: &mut String, r: &Report, why: &mut Reasons) {
    if r.services.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\n## Services over the network (the host reaches a server in each mode through its published port; ratio to the same server as a host process on loopback)\n"
    );
    let _ = writeln!(
        o,
        "| mode | TCP stream MB/s | TCP RTT µs (lower is better) | Redis SET ops/s | Redis GET ops/s | GET p50 / p99 ms |\n|---|---|---|---|---|---|"
    );
    let base = r.services.iter().find(|s| s.mode == "process");
    let redis = |s: &ServiceSet, t: &str| s.redis.iter().find(|x| x.test == t).cloned();
    let ratio = |v: Option<f64>, b: Option<f64>| match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{} ({:.2}x)", num(v), v / b),
        (Some(v), _) => num(v),
        _ => "-".into(),
    };
    let base_rps = |t: &str| base.and_then(|b| redis(b, t)).map(|x| x.rps);
    for s in &r.services {
        if s.status == Status::Skipped {
            let _ = writeln!(o, "| {} | skipped | | | | |", s.mode);
            continue;
        }
        let rtt = s.rtt_us.as_ref().map(|x| x.median);
        let get = redis(s, "GET");
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            s.mode,
            ratio(s.tcp_mbps, base.and_then(|b| b.tcp_mbps)),
            ratio(rtt, base.and_then(|b| b.rtt_us.as_ref().map(|x| x.median))),
            ratio(redis(s, "SET").map(|x| x.rps), base_rps("SET")),
            ratio(get.as_ref().map(|x| x.rps), base_rps("GET")),
            get.map(|x| format!("{:.3} / {:.3}", x.p50_ms, x.p99_ms))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let _ = writeln!(o);
    for s in &r.services {
        if let Some(r) = &s.reason {
            let _ = writeln!(o, "- {} (TCP): {}", s.mode, why.say(r));
        }
        if let Some(r) = &s.redis_reason {
            let _ = writeln!(o, "- {} (Redis): {}", s.mode, why.say(r));
        }
        if !s.path.is_empty() {
            let _ = writeln!(o, "- {}: {}", s.mode, s.path);
        }
        if let Some(x) = s.redis.first() {
            let _ = writeln!(
                o,
                "- {} (Redis): redis-benchmark -n {} -c {} per test (fewer where a 1000-request probe said the full count would not end in time)",
                s.mode, x.requests, x.clients
            );
        }
    }
    let by = |m: &str| {
        r.services
            .iter()
            .find(|s| s.mode == m && s.status == Status::Measured)
    };
    if let (Some(c), Some(b)) = (by("container"), base) {
        if let (Some(t), Some(bt), Some(rt), Some(brt)) = (
            c.tcp_mbps,
            b.tcp_mbps,
            c.rtt_us.as_ref().map(|x| x.median),
            b.rtt_us.as_ref().map(|x| x.median),
        ) {
            let _ = writeln!(
                o,
                "\nGoals for a native container through its published port: throughput {:.2}x loopback (goal >= 0.8x: {}), RTT {:.2}x (goal <= 1.5x: {}).",
                t / bt,
                if t / bt >= 0.8 { "met" } else { "missed" },
                rt / brt,
                if rt / brt <= 1.5 { "met" } else { "missed" }
            );
        }
    }
    // IBM's study (Felter et al., 2015) found Docker equal to or better than KVM for
    // Redis, and a VM around containers paying the VM's cost: the same comparison here.
    let get_rps = |m: &str| by(m).and_then(|s| redis(s, "GET")).map(|x| x.rps);
    if let (Some(c), Some(v)) = (get_rps("container"), get_rps("vm-container")) {
        let _ = writeln!(
            o,
            "Redis GET beside the IBM study (Felter et al. 2015: containers equal or beat KVM; a VM boundary around containers costs what the VM costs): container {:.2}x native, container in a microVM {:.2}x native, {:.2}x the container.",
            c / base_rps("GET").unwrap_or(f64::NAN),
            v / base_rps("GET").unwrap_or(f64::NAN),
            v / c
        );
    }
}

/// The fs section's goal: virtio-fs (cache auto, the default) sequential reads at half a
/// host process's speed or better.
pub const FS_GOAL_SEQ_READ: f64 = 0.5;

/// Host runs around an fs row further apart than this make its ratio loose (`~`).
pub const HOST_RUNS_APART: f64 = 2.0;

fn host_runs_disagree(v: &[f64]) -> bool {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    lo > 0.0 && hi / lo > HOST_RUNS_APART
}

/// The fs rows: a row per way to the directory (modes in the run's order), a column per
/// workload, each figure with its ratio to the host process's runs around it; the
/// goal, met or not.
fn fs(o: &mut String, r: &Report, why: &mut Reasons) {
    if r.fs.is_empty() {
        return; // not among --sections
    }
    let _ = writeln!(
        o,
        "\n## Shared directory (one tmpfs directory through each way to it; value, and ratio to a host process on the same directory: the geometric mean of its runs just before and after the row; higher is better)\n"
    );
    let mut head = "| way | mode |".to_string();
    let mut sep = "|---|---|".to_string();
    for (w, unit) in super::fs::WORKLOADS {
        let _ = write!(head, " {w} {unit} |");
        sep.push_str("---|");
    }
    let _ = writeln!(o, "{head}\n{sep}");
    for s in &r.fs {
        for row in &s.rows {
            let mut line = format!("| {} | {} |", row.path, s.mode);
            if row.status == Status::Skipped {
                let _ = write!(
                    line,
                    " skipped: {} |",
                    why.say(row.reason.as_deref().unwrap_or_default())
                );
                line.push_str(&" |".repeat(super::fs::WORKLOADS.len() - 1));
                let _ = writeln!(o, "{line}");
                continue;
            }
            for (w, _) in super::fs::WORKLOADS {
                let x = row.results.iter().find(|x| x.workload == w);
                let c = match x {
                    Some(x) => match (x.value, x.ratio_vs_host) {
                        (Some(v), Some(q)) => format!(
                            "{} ({}x{}){}",
                            num(v),
                            ratio(q),
                            if host_runs_disagree(&x.host_values) {
                                " ~"
                            } else {
                                ""
                            },
                            if x.direct == Some(false) { " b" } else { "" }
                        ),
                        (Some(v), None) => num(v),
                        _ => "skipped".into(),
                    },
                    None => "-".into(),
                };
                let _ = write!(line, " {c} |");
            }
            let _ = writeln!(o, "{line}");
        }
    }
    let _ = writeln!(o);
    for s in &r.fs {
        if !s.dir.is_empty() {
            let _ = writeln!(
                o,
                "- {}: directory {}, {} MiB sequential, {} s per timed pattern",
                s.mode, s.dir, s.disk_mib, s.secs
            );
        }
        for row in s.rows.iter().filter(|r| r.status == Status::Measured) {
            let _ = writeln!(o, "- {} {}: {}", s.mode, row.path, cell(&row.description));
            for x in row.results.iter().filter(|x| x.status == Status::Skipped) {
                let _ = writeln!(
                    o,
                    "  - {}: skipped: {}",
                    x.workload,
                    why.say(x.reason.as_deref().unwrap_or_default())
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "- `b`: buffered (the file system refused O_DIRECT; fdatasync, and the cache dropped before reads); others O_DIRECT. `~`: the host runs before and after the row differ by more than {HOST_RUNS_APART}x (the machine's load changed; both are in the JSON's `host_values`), so that ratio is loose"
    );
    let seq_read = |path: &str| {
        r.fs.iter()
            .flat_map(|s| s.rows.iter())
            .find(|row| row.path == path && row.status == Status::Measured)
            .and_then(|row| row.results.iter().find(|x| x.workload == "disk-seq-read"))
            .and_then(|x| x.ratio_vs_host)
    };
    if let Some(q) = seq_read("virtio-fs-auto") {
        let always = [("always", "virtio-fs-always"), ("never", "virtio-fs-never")]
            .iter()
            .filter_map(|(c, p)| seq_read(p).map(|a| format!("; with cache {c} {}x", ratio(a))))
            .collect::<String>();
        let _ = writeln!(
            o,
            "\nGoal, in this run: virtio-fs (cache auto) sequential read {}x the host process (goal >= {FS_GOAL_SEQ_READ}x: {}){always}.",
            ratio(q),
            verdict(q >= FS_GOAL_SEQ_READ)
        );
    }
}

/// A median with its range, "-" for none.
fn med_range(s: &Option<Summary>, f: fn(f64) -> String) -> String {
    match s {
        Some(s) if s.n > 1 && f(s.min) != f(s.max) => {
            format!("{} [{}–{}]", f(s.median), f(s.min), f(s.max))
        }
        Some(s) => f(s.median),
        None => "-".into(),
    }
}

fn mib(b: f64) -> String {
    bytes(b.max(0.0) as u64)
}

/// Guest memory in MiB as people say it.
fn mem(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// A goal's verdict.
fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

/// The state-transfer figures a section's goals are set in: checkpoint and restore
/// against the cold start of the same guest, and pre-copy's paused time of an idle one.
pub struct XferGoals {
    pub checkpoint_vs_cold: Option<f64>,
    pub restore_vs_cold: Option<f64>,
    /// nestor-vmm's rows: the restore against the fresh boot, both VMMs started
    /// without address randomization.
    pub fixed_restore_vs_cold: Option<f64>,
    pub precopy_idle_paused_ms: Option<f64>,
}

pub fn xfer_goals(x: &StateTransfer) -> XferGoals {
    let at = x
        .snapshots
        .iter()
        .find(|s| s.mem_mib == x.goal_mem_mib && s.status == Status::Measured);
    let med = |s: &Option<Summary>| s.as_ref().map(|s| s.median);
    let ratio = |f: fn(&SnapshotRow) -> &Option<Summary>,
                 cold: fn(&SnapshotRow) -> &Option<Summary>| {
        let s = at?;
        match (med(f(s)), med(cold(s))) {
            (Some(v), Some(c)) if c > 0.0 => Some(v / c),
            _ => None,
        }
    };
    let vs = |f: fn(&SnapshotRow) -> &Option<Summary>| ratio(f, |s| &s.cold_start_ms);
    XferGoals {
        checkpoint_vs_cold: vs(|s| &s.checkpoint_ms),
        restore_vs_cold: vs(|s| &s.restore_ms),
        fixed_restore_vs_cold: ratio(|s| &s.fixed_restore_ms, |s| &s.fixed_cold_start_ms),
        precopy_idle_paused_ms: x
            .migrations
            .iter()
            .find(|m| m.strategy == "pre-copy" && m.guest == "idle")
            .and_then(|m| med(&m.paused_ms)),
    }
}

/// Checkpoint, restore and migration of VM containers, CRIU beside them; the goals
/// with their verdicts, and the anchors the goals were set from.
fn state_transfer(o: &mut String, r: &Report, why: &mut Reasons) {
    for x in &r.state_transfer {
        let vmm = x.mode == "vm";
        let _ = writeln!(
            o,
            "\n## State transfer: {} ({}; {} round{}; median [min–max])\n",
            x.mode,
            if vmm {
                "nestor-vmm: `snapshot-create` on its API, `--restore DIR --resume`"
            } else if x.jailed {
                "`run --vm -d --jail`"
            } else {
                "`run --vm -d --no-jail`"
            },
            x.rounds,
            if x.rounds == 1 { "" } else { "s" }
        );
        // Skipped whole (no KVM guest, no image): one line, not a table of skips.
        let whole = x.status == Status::Skipped && x.reason.is_some();
        if whole {
            let _ = writeln!(
                o,
                "VM rows **skipped**: {}",
                why.say(x.reason.as_deref().unwrap_or_default())
            );
        } else {
            vm_rows(o, x, why);
        }
        if !vmm {
            criu_row(o, &x.criu, why);
        }
        if !whole {
            goals(o, x);
        }
        let _ = writeln!(
            o,
            "\nAnchors (other VMMs, other machines; {}): Firecracker's CI baselines, 180 ms for a full snapshot of 2 vCPUs and 256 MiB and 70 ms for a diff snapshot; Cloud Hypervisor's default downtime limit, 300 ms.",
            if r.header.inside_testhost {
                "these figures are TCG timings and do not compare with them"
            } else {
                "for scale only"
            }
        );
    }
}

/// The snapshot table (per guest memory size) and the migration table, then the
/// reasons of rounds that failed in rows other rounds measured.
fn vm_rows(o: &mut String, x: &StateTransfer, why: &mut Reasons) {
    let head = if x.mode == "vm" {
        "| guest memory | fresh boot (launch to the guest's init) | snapshot-create (paused) | vs boot | snapshot on disk | restore (launch to the vCPUs running) | vs boot |"
    } else {
        "| guest memory | cold start (run -d until it runs) | checkpoint (snapshot; the VM stops) | vs cold start | snapshot on disk | restore (until it runs) | vs cold start |"
    };
    let _ = writeln!(o, "{head}\n|---|---|---|---|---|---|---|");
    for s in &x.snapshots {
        if s.status == Status::Skipped {
            let _ = writeln!(
                o,
                "| {} | skipped: {} | | | | | |",
                mem(s.mem_mib),
                why.say(s.reason.as_deref().unwrap_or_default())
            );
            continue;
        }
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} |",
            mem(s.mem_mib),
            med_range(&s.cold_start_ms, ms),
            med_range(&s.checkpoint_ms, ms),
            vs_cold(&s.checkpoint_ms, &s.cold_start_ms),
            med_range(&s.snapshot_bytes, mib),
            med_range(&s.restore_ms, ms),
            vs_cold(&s.restore_ms, &s.cold_start_ms),
        );
        if s.fixed_restore_ms.is_some() {
            let _ = writeln!(
                o,
                "| {}, VMM at fixed addresses | {} | | | | {} | {} |",
                mem(s.mem_mib),
                med_range(&s.fixed_cold_start_ms, ms),
                med_range(&s.fixed_restore_ms, ms),
                vs_cold(&s.fixed_restore_ms, &s.fixed_cold_start_ms),
            );
        }
    }
    if x.snapshots.iter().any(|s| s.fixed_restore_ms.is_some()) {
        let _ = writeln!(
            o,
            "\n*VMM at fixed addresses*: the boot and the restore again, each nestor-vmm started without address randomization. Under TCG (the test host) a process's code is translated afresh wherever randomization placed it, at every start, which hardware does not do; this pair shows the VMM's own restore path without that cost."
        );
    }
    if x.migrations.is_empty() {
        failed_rounds(o, x, why);
        return;
    }
    let _ = writeln!(
        o,
        "\nLive migration of a {} guest to a second data root (`nestor migrate`; paused: from the pause to the destination running it):\n\n| strategy | guest | paused | vs stop-copy | total | sent | rounds |\n|---|---|---|---|---|---|---|",
        mem(x.goal_mem_mib)
    );
    for m in &x.migrations {
        if m.status == Status::Skipped {
            let _ = writeln!(
                o,
                "| {} | {} | skipped: {} | | | | |",
                m.strategy,
                m.guest,
                why.say(m.reason.as_deref().unwrap_or_default())
            );
            continue;
        }
        let stop = x
            .migrations
            .iter()
            .find(|s| s.strategy == "stop-copy" && s.guest == m.guest)
            .and_then(|s| s.paused_ms.as_ref().map(|p| p.median));
        let vs = match (m.paused_ms.as_ref(), stop) {
            (Some(p), Some(s)) if s > 0.0 && m.strategy != "stop-copy" => {
                format!("{:.2}x", p.median / s)
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {vs} | {} | {} | {} |",
            m.strategy,
            m.guest,
            med_range(&m.paused_ms, ms),
            med_range(&m.total_ms, ms),
            med_range(&m.sent_bytes, mib),
            med_range(&m.rounds, |v| format!("{v:.0}")),
        );
    }
    failed_rounds(o, x, why);
}

/// `v`'s median against `cold`'s, as "0.12x"; "-" where either is missing.
fn vs_cold(v: &Option<Summary>, cold: &Option<Summary>) -> String {
    match (v, cold) {
        (Some(v), Some(c)) if c.median > 0.0 => format!("{:.2}x", v.median / c.median),
        _ => "-".into(),
    }
}

/// The reasons of rounds that failed in rows other rounds measured.
fn failed_rounds(o: &mut String, x: &StateTransfer, why: &mut Reasons) {
    let failed = x
        .snapshots
        .iter()
        .filter(|s| s.status == Status::Measured)
        .map(|s| (mem(s.mem_mib), &s.reason))
        .chain(
            x.migrations
                .iter()
                .filter(|m| m.status == Status::Measured)
                .map(|m| (format!("{} {}", m.strategy, m.guest), &m.reason)),
        );
    for (what, reason) in failed {
        if let Some(e) = reason {
            let _ = writeln!(o, "- {what}: a round failed: {}", why.say(e));
        }
    }
}

/// CRIU's row: figures, or why it was skipped (never counted as a pass).
fn criu_row(o: &mut String, c: &CriuRow, why: &mut Reasons) {
    match c.status {
        Status::Measured => {
            let _ = writeln!(
                o,
                "\nCRIU on a native busybox container (OCI `checkpoint`, `restore --detach`): checkpoint {}, restore {}, images {}.",
                med_range(&c.checkpoint_ms, ms),
                med_range(&c.restore_ms, ms),
                med_range(&c.image_bytes, mib)
            );
            if let Some(e) = &c.reason {
                let _ = writeln!(o, "- CRIU: a round failed: {}", why.say(e));
            }
        }
        Status::Skipped => {
            let _ = writeln!(
                o,
                "\nCRIU on a native container: **skipped** (not counted): {}",
                why.say(c.reason.as_deref().unwrap_or_default())
            );
        }
    }
}

/// The goals, met or not, from this run's figures.
fn goals(o: &mut String, x: &StateTransfer) {
    let g = xfer_goals(x);
    let mut goals = Vec::new();
    if let Some(q) = g.checkpoint_vs_cold {
        goals.push(format!(
            "checkpoint of a {} guest {q:.2}x its cold start (goal <= 1.0x: {})",
            mem(x.goal_mem_mib),
            verdict(q <= 1.0)
        ));
    }
    if let Some(q) = g.restore_vs_cold {
        goals.push(format!(
            "restore to running {q:.2}x (goal <= 0.1x: {})",
            verdict(q <= 0.1)
        ));
    }
    if let Some(q) = g.fixed_restore_vs_cold {
        goals.push(format!(
            "with the VMM at fixed addresses {q:.2}x ({})",
            verdict(q <= 0.1)
        ));
    }
    if let Some(p) = g.precopy_idle_paused_ms {
        goals.push(format!(
            "pre-copy paused an idle guest {} (goal <= 100 ms: {})",
            ms(p),
            verdict(p <= 100.0)
        ));
    }
    if !goals.is_empty() {
        let at = if x.goal_mem_mib == 256 {
            String::new()
        } else {
            format!(
                " (set for a 256 MiB guest; measured at {})",
                mem(x.goal_mem_mib)
            )
        };
        let _ = writeln!(o, "\nGoals, in this run{at}: {}.", goals.join("; "));
    }
}

/// Where each mode's disk workload wrote, and whether with O_DIRECT; whether the native
/// process and container shared one file, and that the VM modes have disks of their own.
fn disk_files(o: &mut String, r: &Report) {
    let direct: Vec<String> = r
        .workloads
        .iter()
        .filter_map(|s| {
            let x = s.results.iter().find(|x| {
                x.tool == "built-in"
                    && x.workload == "disk-seq-write"
                    && x.status == Status::Measured
            })?;
            let d = &x.detail;
            Some(format!(
                "{}: {}{}",
                s.mode,
                d["path"].as_str().unwrap_or("?"),
                match (d["direct"].as_bool(), d["block_device"].as_bool()) {
                    (Some(true), Some(true)) => " (block device, O_DIRECT)",
                    (Some(true), _) => " (O_DIRECT)",
                    _ => " (buffered: the file system refused O_DIRECT; fdatasync + cache dropped)",
                }
            ))
        })
        .collect();
    if !direct.is_empty() {
        let _ = writeln!(o, "\nDisk workload files: {}.", direct.join("; "));
    }
    let path = |mode: &str| {
        r.workloads
            .iter()
            .filter(|s| s.mode == mode)
            .flat_map(|s| s.results.iter())
            .find(|x| {
                x.tool == "built-in"
                    && x.workload == "disk-seq-write"
                    && x.status == Status::Measured
            })
            .and_then(|x| x.detail["path"].as_str())
    };
    match (path("process"), path("container")) {
        (Some(p), Some(c)) if p == c => {
            let _ = writeln!(
                o,
                "The native process and the native container write the same file on the same file system (a directory of the bench's temp dir, bind-mounted into the container at its own path), so their disk ratios compare the ways to it, not two places."
            );
        }
        (Some(_), Some(_)) => {
            let _ = writeln!(
                o,
                "**The native process and the native container wrote to different places** (a run made before they shared one file): their disk ratios may compare two file systems, not the ways to one."
            );
        }
        _ => {}
    }
    let vms: Vec<&str> = r
        .workloads
        .iter()
        .filter(|s| !matches!(s.mode.as_str(), "process" | "container"))
        .filter(|s| path(&s.mode).is_some())
        .map(|s| s.mode.as_str())
        .collect();
    if !vms.is_empty() {
        let _ = writeln!(
            o,
            "The VM modes ({}) write a disk of their own, not that file: a raw image file in the bench's temp dir as the guest's /dev/vda (plain microVMs) or an ext4 volume image there mounted at /bench (containers in a VM); their disk figures include virtio-blk and the guest's file system.",
            vms.join(", ")
        );
    }
}

/// fio's figures on the host, the reference for the built-in disk workloads.
fn fio_reference(o: &mut String, r: &Report, why: &mut Reasons) {
    let fio: Vec<_> = r
        .workloads
        .iter()
        .flat_map(|s| s.results.iter())
        .filter(|x| x.tool == "fio")
        .collect();
    if !fio.is_empty() {
        let _ = writeln!(
            o,
            "\nfio on the host (psync; O_DIRECT unless the file system refuses it), a reference for the built-in disk figures of the process column:"
        );
        for x in fio {
            match x.value {
                Some(v) => {
                    let _ = writeln!(
                        o,
                        "- {}: {} {}{}",
                        x.workload,
                        num(v),
                        x.unit,
                        if x.detail["direct"] == false {
                            " (buffered)"
                        } else {
                            ""
                        }
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "- fio: skipped: {}",
                        why.say(x.reason.as_deref().unwrap_or_default())
                    );
                }
            }
        }
    }
}

/// The skipped workloads with their reasons (one line for a mode that skipped them all).
fn skipped_workloads(o: &mut String, r: &Report, why: &mut Reasons) {
    let mut reasons: Vec<(String, String)> = Vec::new();
    for s in &r.workloads {
        let skipped: Vec<_> = s
            .results
            .iter()
            .filter(|x| x.status == Status::Skipped)
            .collect();
        let first = skipped.first().and_then(|x| x.reason.clone());
        if !skipped.is_empty()
            && skipped.len() == s.results.iter().filter(|x| x.tool == "built-in").count()
            && skipped.iter().all(|x| x.reason == first)
        {
            reasons.push((
                format!("{} (all workloads)", s.mode),
                first.unwrap_or_default(),
            ));
            continue;
        }
        for x in skipped {
            reasons.push((
                format!("{} {}", s.mode, x.workload),
                x.reason.clone().unwrap_or_default(),
            ));
        }
    }
    list_by_reason(o, "Skipped workloads:", reasons, why);
}

/// The density sweep: units started one by one until the memory budget.
fn density(o: &mut String, r: &Report, why: &mut Reasons) {
    if r.density.is_empty() {
        return; // not among --sections
    }
    let _ = writeln!(
        o,
        "\n## Density (units started one by one until the memory budget)\n\n| mode | budget | units started | PSS of all units: started → idle {} s | idle units per GiB | start time: first → last | status |\n|---|---|---|---|---|---|---|",
        crate::bench::SETTLE_SECS
    );
    for d in &r.density {
        let first = d.points.first();
        let last = d.points.last();
        let st = match (d.status, &d.reason) {
            (Status::Skipped, r) => format!("**skipped**: {}", why.say(r.as_deref().unwrap_or(""))),
            (_, Some(r)) => cell(r),
            _ if d.budget_reached => "budget reached".into(),
            _ => format!("stopped at {} units (--density-max)", d.max_units),
        };
        let _ = writeln!(
            o,
            "| {} | {} MiB | {} | {}{} | {} | {} | {} |",
            d.label(),
            d.budget_mib,
            d.points.len(),
            last.map(|p| kib(p.total_pss_kib as i64))
                .unwrap_or("-".into()),
            d.settled_pss_kib
                .map(|k| format!(" → {}", kib(k as i64)))
                .unwrap_or_default(),
            d.units_per_gib()
                .map(|u| format!("{u:.1}"))
                .unwrap_or("-".into()),
            match (first, last) {
                (Some(f), Some(l)) => format!("{} → {}", ms(f.start_ms), ms(l.start_ms)),
                _ => "-".into(),
            },
            st
        );
    }
    for with in r.density.iter().filter(|d| !d.is_plain()) {
        let without = r
            .density
            .iter()
            .find(|d| d.mode == with.mode && d.is_plain());
        if let (Some(a), Some(b)) = (
            with.units_per_gib(),
            without.and_then(Density::units_per_gib),
        ) {
            let x = a / b;
            let _ = writeln!(
                o,
                "\n{}: with the balloon{} {:.1} idle units per GiB, without {:.1}: **{:.2}x** (goal >= 2x: {})",
                with.mode,
                if with.mem_merge { " and KSM" } else { "" },
                a,
                b,
                x,
                if x >= 2.0 { "met" } else { "not met" }
            );
        }
    }
}

pub fn is_main(r: &Report, c: &StartStop) -> bool {
    // The mode's own runner is the first row of its mode.
    r.start_stop
        .iter()
        .find(|s| s.mode == c.mode)
        .is_some_and(|s| s.runner == c.runner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_shorten() {
        assert_eq!(short_version("crun", "crun version 1.8.1"), "crun 1.8.1");
        assert_eq!(
            short_version(
                "qemu-microvm",
                "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7)"
            ),
            "qemu-microvm 7.2.19"
        );
        assert_eq!(short_version("x", ""), "x");
    }

    fn sum(v: &[f64]) -> Option<Summary> {
        Summary::of(v)
    }

    fn xfer() -> StateTransfer {
        let snap = |mib, cold: f64, ck: f64, rs: f64| SnapshotRow {
            mem_mib: mib,
            status: Status::Measured,
            reason: None,
            cold_start_ms: sum(&[cold]),
            checkpoint_ms: sum(&[ck]),
            restore_ms: sum(&[rs]),
            snapshot_bytes: sum(&[51.0 * 1048576.0]),
            fixed_cold_start_ms: None,
            fixed_restore_ms: None,
        };
        let mv = |s: &str, g: &str, p: f64| MigrationRow {
            strategy: s.into(),
            guest: g.into(),
            status: Status::Measured,
            reason: None,
            paused_ms: sum(&[p, p + 10.0]),
            total_ms: sum(&[3000.0]),
            sent_bytes: sum(&[75.0 * 1048576.0]),
            rounds: sum(&[3.0]),
        };
        StateTransfer {
            mode: "vm-container".into(),
            status: Status::Measured,
            reason: None,
            jailed: false,
            rounds: 2,
            goal_mem_mib: 256,
            snapshots: vec![
                snap(128, 2000.0, 900.0, 500.0),
                snap(256, 2500.0, 1184.0, 681.0),
                SnapshotRow {
                    status: Status::Skipped,
                    reason: Some("round 1: out of memory".into()),
                    ..snap(1024, 0.0, 0.0, 0.0)
                },
            ],
            migrations: vec![
                mv("pre-copy", "idle", 90.0),
                mv("stop-copy", "idle", 1385.0),
                MigrationRow {
                    status: Status::Skipped,
                    reason: Some("round 1: no /dev/userfaultfd in the jail".into()),
                    ..mv("post-copy", "idle", 0.0)
                },
            ],
            criu: CriuRow {
                status: Status::Skipped,
                reason: Some("criu check fails on this kernel (6.18)".into()),
                checkpoint_ms: None,
                restore_ms: None,
                image_bytes: None,
            },
        }
    }

    #[test]
    fn state_transfer_renders_ratios_goals_and_skips() {
        let mut r: Report = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/bench-testhost.json"
            ))
            .unwrap(),
        )
        .unwrap();
        // A report from before the section loads with none, and renders none.
        assert!(r.state_transfer.is_empty());
        assert!(!markdown(&r).contains("## State transfer"));
        r.state_transfer.push(xfer());
        let md = markdown(&r);
        for want in [
            "## State transfer: vm-container (`run --vm -d --no-jail`; 2 rounds",
            "| 256 MiB | 2.50 s | 1.18 s | 0.47x | 51.0 MiB | 681.0 ms | 0.27x |",
            "| 1 GiB | skipped: round 1: out of memory [",
            "| pre-copy | idle | 95.0 ms [90.0 ms–100.0 ms] | 0.07x | 3.00 s | 75.0 MiB | 3 |",
            "| post-copy | idle | skipped: round 1: no /dev/userfaultfd in the jail [",
            "CRIU on a native container: **skipped** (not counted): criu check fails",
            "checkpoint of a 256 MiB guest 0.47x its cold start (goal <= 1.0x: **met**)",
            "restore to running 0.27x (goal <= 0.1x: **not met**)",
            "pre-copy paused an idle guest 95.0 ms (goal <= 100 ms: **met**)",
            "TCG timings and do not compare",
        ] {
            assert!(md.contains(want), "{want:?} missing in\n{md}");
        }
        let g = xfer_goals(&xfer());
        assert!((g.restore_vs_cold.unwrap() - 681.0 / 2500.0).abs() < 1e-9);
        assert!(g.fixed_restore_vs_cold.is_none());
        assert!(!md.contains("fixed addresses"));
        // nestor-vmm's rows with the fixed-address pair: its own row, its own ratio
        // (against the fixed-address boot) and its goal verdict.
        let mut x = xfer();
        x.mode = "vm".into();
        x.migrations.clear();
        x.snapshots[1].fixed_cold_start_ms = sum(&[2000.0]);
        x.snapshots[1].fixed_restore_ms = sum(&[150.0]);
        r.state_transfer = vec![x.clone()];
        let md = markdown(&r);
        for want in [
            "| 256 MiB, VMM at fixed addresses | 2.00 s | | | | 150.0 ms | 0.07x |",
            "restore to running 0.27x (goal <= 0.1x: **not met**); with the VMM at fixed addresses 0.07x (**met**)",
            "*VMM at fixed addresses*: the boot and the restore again",
        ] {
            assert!(md.contains(want), "{want:?} missing in\n{md}");
        }
        let g = xfer_goals(&x);
        assert!((g.fixed_restore_vs_cold.unwrap() - 0.075).abs() < 1e-9);
    }

    /// Whether the native process and the native container wrote the same disk file is
    /// said from their paths; the VM modes' own disks are named.
    #[test]
    fn disk_files_say_whether_process_and_container_shared_one_file() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/bench-testhost.json"
        );
        let mut r: Report = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        // The stored run is from before: the container wrote under its rootfs.
        let md = markdown(&r);
        assert!(md.contains("wrote to different places"), "{md}");
        assert!(!md.contains("write the same file"), "{md}");
        assert!(
            md.contains("The VM modes (vm, vm-container, jailed-vm) write a disk of their own"),
            "{md}"
        );
        for s in r.workloads.iter_mut() {
            if s.mode == "process" || s.mode == "container" {
                for x in s.results.iter_mut() {
                    if let Some(d) = x.detail.as_object_mut() {
                        d.insert(
                            "path".into(),
                            "/tmp/nestor-bench-1-2/disk/workload-disk".into(),
                        );
                    }
                }
            }
        }
        let md = markdown(&r);
        assert!(
            md.contains("write the same file on the same file system"),
            "{md}"
        );
        assert!(!md.contains("different places"), "{md}");
    }

    /// A balloon's density row beside the same mode's without: its own row, the
    /// idle units per GiB of each, and their ratio against the goal.
    #[test]
    fn balloon_density_is_compared_with_the_same_mode_without() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/bench-testhost.json"
        );
        let mut r: Report = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let mut without = r.density.iter().find(|d| d.mode == "vm").unwrap().clone();
        let n = without.points.last().unwrap().count as u64;
        without.settled_pss_kib = Some(n * 100 * 1024);
        let mut with = without.clone();
        with.balloon = true;
        with.settled_pss_kib = Some(n * 40 * 1024);
        let mut merged = with.clone();
        merged.mem_merge = true;
        merged.settled_pss_kib = Some(n * 20 * 1024);
        r.density = vec![without, with, merged];
        let md = markdown(&r);
        assert!(md.contains("| vm, balloon + KSM | 256 MiB | 3 |"), "{md}");
        assert!(
            md.contains("vm: with the balloon and KSM 51.2 idle units per GiB, without 10.2: **5.00x** (goal >= 2x: met)"),
            "{md}"
        );
        assert!(md.contains("| vm, balloon | 256 MiB | 3 |"), "{md}");
        assert!(md.contains(" → 300.0 MiB | 10.2 |"), "{md}");
        assert!(
            md.contains("vm: with the balloon 25.6 idle units per GiB, without 10.2: **2.50x** (goal >= 2x: met)"),
            "{md}"
        );
    }

    /// The test host's report (a real one, kept as test data) rendered section by
    /// section: every section once, in order, with rows the data implies.
    #[test]
    fn testhost_report_renders_every_section_in_order() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/bench-testhost.json"
        );
        let r: Report = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let md = markdown(&r);
        let mut at = 0;
        for heading in [
            "# nestor bench\n",
            "| inside the KVM test host | **yes**",
            "\n## Modes\n",
            "| jailed-vm-container | both: nestor run --vm --jail | **skipped**: ",
            "\n## Efficiency",
            "| start + stop vs process | 1.0x |",
            "\nSkipped:\n- container: nestor run IMAGE: ",
            "\n## Workloads",
            "| net-rtt | µs (lower is better) |",
            "\nDisk workload files: process: ",
            "\nfio on the host",
            "\nSkipped workloads:\n",
            "- jailed-vm-container (all workloads): ",
            "\n## Density",
            "| vm | 256 MiB | 3 | 153.7 MiB | - | 4.21 s → 4.34 s | stopped at 3 units (--density-max) |",
        ] {
            let found = md[at..].find(heading);
            assert!(found.is_some(), "{heading:?} missing after byte {at} of\n{md}");
            at += found.unwrap_or_default() + heading.len();
            assert_eq!(md.matches(heading).count(), 1, "{heading:?} more than once");
        }
        // A reason shared by many cells is printed once, numbered, then referred to.
        let last = md.lines().last().unwrap();
        assert!(last.starts_with("| jailed-vm-container |"), "{last}");
        assert!(last.contains("**skipped**: see ["), "{last}");
        assert_eq!(
            md.matches("nestor run --vm --jail not available in this build")
                .count(),
            1,
            "{md}"
        );
    }
}
